//! Reading one connection, and telling "not there" apart from other errors:
//! `connmeta::Error` sorts them by the ErrorInfo reason the sidecar attaches
//! to every error.
//!
//! ```text
//! cargo run --example get_connection -- unix:///run/connmeta/connmeta.sock 4c9e1a52-8d0f-4f49-a1b4-5c0f4b8f9f00
//! ```

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let target = args.next().unwrap_or_else(|| "127.0.0.1:50051".into());
    let id = args
        .next()
        .unwrap_or_else(|| "4c9e1a52-8d0f-4f49-a1b4-5c0f4b8f9f00".into());

    let client = connmeta::connect(&target).await?;
    match client.get(&id).await {
        Ok(record) => println!("revision {}", record.metadata.unwrap_or_default().revision),
        Err(connmeta::Error::NotFound(_)) => println!("no such connection"),
        Err(e) => return Err(e.into()),
    }
    Ok(())
}
