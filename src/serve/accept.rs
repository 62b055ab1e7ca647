//! Accepting connections: plain HTTP, or HTTPS after a TLS handshake ([`super::tls`]).

use std::convert::Infallible;
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
        let open = trim::Connection::opened();
        // Watched from here, before its task runs: a shutdown from now on waits for it. The
        // task holds no handle on the shutdown itself, which the last accept loop takes.
        let watcher = graceful.watcher();
        let shared = shared.clone();
        let service = hyper::service::service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(handle(&shared, req, peer).await) }
        });
        match &tls {
            None => {
                let stream = TokioIo::new(WriteTimeout::new(stream, timeout));
                let conn = watcher.watch(http1(timeout).serve_connection(stream, service));
                tokio::spawn(async move {
                    let _ = conn.await;
                    drop(open);
                });
            }
            Some(tls) => {
                // The handshake runs in the connection's task, within the timeout: a client
                // that never finishes it holds nothing else.
                let handshake = tls.accept(WriteTimeout::new(stream, timeout));
                tokio::spawn(async move {
                    if let Ok(Ok(stream)) = tokio::time::timeout(timeout, handshake).await {
                        let _ = watcher
                            .watch(http1(timeout).serve_connection(TokioIo::new(stream), service))
                            .await;
                    }
                    drop(open);
                });
            }
        }
    }
}

/// How every connection speaks HTTP/1: idle connections and slow request heads cut off after
/// the timeout, request heads of at most [`MAX_HEAD`].
fn http1(timeout: Duration) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new()).header_read_timeout(timeout).max_buf_size(MAX_HEAD);
    b
}
