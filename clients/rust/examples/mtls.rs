//! Mutual TLS over TCP: the sidecar's certificate is checked against the
//! CA, and the client certificate is the caller's identity, which the
//! sidecar's authorization policy decides on (reader may read, writer may
//! also update). Unix-socket targets ignore `tls` and stay plaintext.
//!
//! ```text
//! connmeta certs init --dir certs
//! connmeta serve --listen 127.0.0.1:50051 --tls-cert certs/server.pem --tls-key certs/server.key --client-ca certs/ca.pem
//! cargo run --example mtls -- 127.0.0.1:50051 certs/ca.pem certs/reader.pem certs/reader.key
//! ```

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [target, ca, cert, key] = &args[..] else {
        return Err("usage: mtls HOST:PORT CA.pem CERT.pem KEY.key".into());
    };

    let opts = connmeta::ConnectOptions {
        tls: Some(connmeta::TlsConfig::new(ca, cert, key)), // certs/ca.pem, certs/reader.pem, certs/reader.key
        ..Default::default()
    };
    let client = connmeta::connect_with(target, &opts).await?;
    match client.get("4c9e1a52-8d0f-4f49-a1b4-5c0f4b8f9f00").await {
        Ok(record) => println!("revision {}", record.metadata.unwrap_or_default().revision),
        Err(connmeta::Error::NotFound(_)) => println!("no such connection"),
        Err(connmeta::Error::PermissionDenied(_)) => println!("this certificate may not read"),
        Err(e) => return Err(e.into()),
    }
    Ok(())
}
