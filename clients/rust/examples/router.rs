//! A router in a dozen lines: the helper subscribes, waits while another
//! router is active, asks the function once per connect the proxy holds,
//! answers, and reconnects by itself. This one sends connects to `origin-a`
//! to `origin-b:8443` and lets every other connect go as planned. (The
//! interop case `router_helper_retargets` runs `route` against the real
//! server.)
//!
//! ```text
//! cargo run --example router -- 127.0.0.1:50051 certs/ca.pem certs/router.pem certs/router.key
//! ```

use std::convert::Infallible;

use connmeta::router::{Decision, Router};
use connmeta::v1::Address;

/// Routes every connect the sidecar asks about as `name`, until an error
/// retrying cannot fix.
pub async fn route(client: &connmeta::Client, name: &str) -> Result<Infallible, connmeta::Error> {
    Router::new(client, name)
        .run(|query| async move {
            Ok(match query.target() {
                Some(a) if a.host == "origin-a" => {
                    Decision::Address(Address::new("origin-b", 8443))
                }
                _ => Decision::NoChange,
            })
        })
        .await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [target, ca, cert, key] = &args[..] else {
        return Err("usage: router HOST:PORT CA.pem CERT.pem KEY.key".into());
    };
    let opts = connmeta::ConnectOptions {
        tls: Some(connmeta::TlsConfig::new(ca, cert, key)),
        ..Default::default()
    };
    let client = connmeta::connect_with(target, &opts).await?;
    route(&client, "example-router").await?;
    Ok(())
}
