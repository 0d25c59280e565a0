//! Counting the HTTP/2 PING frames the client writes, so the keepalive case
//! proves pings were really sent (a connection "survives" trivially if
//! nothing pings).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::task::{Context, Poll};

use connmeta::{ConnectOptions, Target};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
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

/// A channel to `target` whose outgoing PINGs are counted.
pub async fn counting_channel(
    target: &str,
    opts: &ConnectOptions,
    counter: PingCounter,
) -> Result<Channel, String> {
    let parsed = Target::parse(target).map_err(|e| e.to_string())?;
    let endpoint = opts.endpoint(&parsed).map_err(|e| e.to_string())?;
    let connector = tower::service_fn(move |uri: Uri| {
        let (parsed, counter) = (parsed.clone(), counter.clone());
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
                    let authority = uri
                        .authority()
                        .map(|a| a.as_str().to_owned())
                        .unwrap_or_default();
                    Box::pin(TcpStream::connect(authority).await?)
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

trait AsyncReadWrite: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> AsyncReadWrite for T {}
