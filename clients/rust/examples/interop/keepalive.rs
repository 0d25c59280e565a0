//! Counting the HTTP/2 PING frames the client writes, so the keepalive case
//! proves pings were really sent (a connection "survives" trivially if
//! nothing pings).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::task::{Context, Poll};

use connmeta::{ConnectOptions, Target, TlsConfig};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tonic::transport::{Channel, Uri};

const PREFACE_LEN: usize = 24; // "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#[derive(Default)]
struct Parser {
    pings: u64,
    preface: usize,
    header: Vec<u8>,
    skip_body: usize,
}

impl Parser {
    fn observe(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            if self.preface > 0 {
                let n = self.preface.min(b.len());
                self.preface -= n;
                b = &b[n..];
            } else if self.skip_body > 0 {
                let n = self.skip_body.min(b.len());
                self.skip_body -= n;
                b = &b[n..];
            } else {
                let n = (9 - self.header.len()).min(b.len());
                self.header.extend_from_slice(&b[..n]);
                b = &b[n..];
                if self.header.len() == 9 {
                    let h = &self.header;
                    let len =
                        (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                    const TYPE_PING: u8 = 0x6;
                    const FLAG_ACK: u8 = 0x1;
                    if h[3] == TYPE_PING && h[4] & FLAG_ACK == 0 {
                        self.pings += 1;
                    }
                    self.skip_body = len;
                    self.header.clear();
                }
            }
        }
    }
}

#[derive(Clone, Default)]
pub struct PingCounter(Arc<Mutex<Parser>>);

impl PingCounter {
    pub fn pings(&self) -> u64 {
        self.0.lock().unwrap().pings
    }
}

struct Counting<S> {
    inner: S,
    counter: PingCounter,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.counter.0.lock().unwrap().observe(&buf[..n]);
        }
        res
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    // Not vectored: every byte then goes through poll_write and is seen.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

/// A channel to `target` whose outgoing PINGs are counted. With
/// `opts.tls` (and a TCP target) it makes the TLS connection itself and
/// counts inside it, where the HTTP/2 frames are still plaintext.
pub async fn counting_channel(
    target: &str,
    opts: &ConnectOptions,
    counter: PingCounter,
) -> Result<Channel, String> {
    let parsed = Target::parse(target).map_err(|e| e.to_string())?;
    let tls = match (&parsed, &opts.tls) {
        (Target::Tcp(_), Some(tls)) => Some(rustls_connector(tls)?),
        _ => None,
    };
    // tonic must not wrap TLS around ours: a plain http:// endpoint.
    let plain = ConnectOptions {
        tls: None,
        ..opts.clone()
    };
    let endpoint = plain.endpoint(&parsed).map_err(|e| e.to_string())?;
    let connector = tower::service_fn(move |uri: Uri| {
        let (parsed, counter, tls) = (parsed.clone(), counter.clone(), tls.clone());
        async move {
            {
                let mut p = counter.0.lock().unwrap();
                *p = Parser {
                    pings: p.pings,
                    preface: PREFACE_LEN,
                    ..Parser::default()
                };
            }
            let io: Pin<Box<dyn AsyncReadWrite>> = match parsed {
                Target::Unix(path) => Box::pin(UnixStream::connect(path).await?),
                Target::Tcp(_) => {
                    let tcp = TcpStream::connect(authority(&uri)).await?;
                    match tls {
                        None => Box::pin(tcp),
                        Some(tls) => {
                            let host = uri.host().unwrap_or_default();
                            let host = host.trim_start_matches('[').trim_end_matches(']');
                            let name = ServerName::try_from(host.to_owned())
                                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                            Box::pin(tls.connect(name, tcp).await?)
                        }
                    }
                }
            };
            Ok::<_, io::Error>(TokioIo::new(Counting { inner: io, counter }))
        }
    });
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("connect {target}: {e:?}"))
}

fn authority(uri: &Uri) -> String {
    uri.authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default()
}

/// A rustls client for `tls`'s files, offering HTTP/2 (ALPN h2), as
/// tonic's own connector does.
fn rustls_connector(tls: &TlsConfig) -> Result<TlsConnector, String> {
    let pem_err = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&tls.ca).map_err(|e| pem_err("CA", &e))? {
        roots
            .add(cert.map_err(|e| pem_err("CA", &e))?)
            .map_err(|e| pem_err("CA", &e))?;
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match &tls.identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| pem_err("client certificate", &e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_err("client certificate", &e))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err("client key", &e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| e.to_string())?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

trait AsyncReadWrite: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> AsyncReadWrite for T {}
