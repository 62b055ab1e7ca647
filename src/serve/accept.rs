//! Accepting connections: plain HTTP, or HTTPS after a TLS handshake ([`super::tls`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::watch;

use super::write_timeout::WriteTimeout;
use super::{MAX_HEAD, Shared, handle, trim};

/// Accepts connections until told to stop.
pub(super) async fn accept(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    graceful: Arc<hyper_util::server::graceful::GracefulShutdown>,
    timeout: Duration,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let mut said_full = false;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors (or another passing trouble): say it once, back off
                // instead of spinning, and go on serving the connections there are.
                if !said_full {
                    crate::elog!("warning: cannot accept a connection: {e}");
                    said_full = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        said_full = false;
        let _ = stream.set_nodelay(true);
        let (shared, graceful) = (shared.clone(), graceful.clone());
        let open = trim::Connection::opened();
        match &tls {
            None => {
                let stream = WriteTimeout::new(stream, timeout);
                tokio::spawn(async move {
                    serve(stream, shared, peer, timeout, &graceful).await;
                    drop(open);
                });
            }
            Some(tls) => {
                // The handshake runs in the connection's task, within the timeout: a client
                // that never finishes it holds nothing else.
                let handshake = tls.accept(WriteTimeout::new(stream, timeout));
                tokio::spawn(async move {
                    if let Ok(Ok(stream)) = tokio::time::timeout(timeout, handshake).await {
                        serve(stream, shared, peer, timeout, &graceful).await;
                    }
                    drop(open);
                });
            }
        }
    }
}

/// HTTP/1 on an accepted connection (plain, or TLS once the handshake is done), until it
/// closes; a graceful shutdown lets its response under way finish.
async fn serve<S>(
    stream: S,
    shared: Arc<Shared>,
    peer: SocketAddr,
    timeout: Duration,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(&shared, req, peer).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(stream), service);
    let _ = graceful.watch(conn).await;
}
