//! `nixcache serve`: a cache directory over HTTP, as a static file server serves it, and
//! optionally filled lazily from the local store ([`fill`]).
//!
//! The one asynchronous edge of nixcache: hyper's HTTP/1 server on tokio. A request path is
//! mapped to a cache-relative name ([`files::target`]), opened through the cache's own
//! resolver ([`Cache::local_file`]: no link followed below the cache, only a regular file),
//! and sent. As nginx does without thread pools, a file is opened and read on the worker
//! that serves the connection, a chunk per poll: page-cache work, with no thread hop per
//! chunk. A fill runs the synchronous push pipeline on a blocking thread, once per path
//! however many clients ask at the same time.
//!
//! Connections: idle ones and slow request heads are closed after the timeout (hyper's header
//! read timeout, which also runs between requests), request heads are limited to
//! [`MAX_HEAD`], and a client that stops reading is cut off once a write has waited the
//! timeout. On SIGTERM or SIGINT the listeners close, responses under way finish (fills
//! included), idle connections are closed, and [`run`] returns.

mod accept;
mod access_log;
mod chunks;
pub mod files;
pub mod fill;
pub mod tls;
mod trim;
pub mod upload;
mod write_timeout;

use access_log::Logger;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use thiserror::Error;
use tokio::sync::watch;

use crate::cache::{Cache, CacheError};
use crate::storage::FileProblem;
use files::{Kind, Range, Target, Validators};
use fill::{Filled, Filler};

/// The largest request head (request line and headers) read; a larger one is answered 431.
pub const MAX_HEAD: usize = 16 << 10;

/// Files up to this size are read whole when opened.
const SMALL: u64 = 64 << 10;

/// How long responses under way may take to finish after SIGTERM.
const GRACE: Duration = Duration::from_secs(60);

/// What to serve, and how.
pub struct ServeConfig {
    pub dest: PathBuf,
    pub listeners: Vec<std::net::TcpListener>,
    /// Idle connections, slow request heads and stalled writes are cut off after this.
    pub timeout: Duration,
    /// One line per request on stderr.
    pub access_log: bool,
    /// With `--from-store`.
    pub filler: Option<Filler>,
    /// Worker threads.
    pub threads: usize,
    /// What `GET /` answers: the lines a client puts in nix.conf.
    pub index: String,
    /// With `--upload-token-file`.
    pub uploads: Option<upload::Uploads>,
    /// With `--tls-cert` and `--tls-key`.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// With `--read-token-file`: reads need one of these (or an upload token).
    pub readers: Option<upload::Tokens>,
}

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot start the server")]
    Start(#[source] io::Error),
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// What every connection shares.
struct Shared {
    cache: Cache,
    filler: Option<Arc<Filler>>,
    /// Fills under way, by hash part: later askers wait for the same outcome.
    fills: Mutex<HashMap<String, watch::Receiver<Option<FillOutcome>>>>,
    log: Option<Logger>,
    index: Bytes,
    /// Becomes true on SIGTERM: fill waiters are answered 503 and no fill starts.
    stopping: watch::Receiver<bool>,
    uploads: Option<upload::Uploads>,
    readers: Option<upload::Tokens>,
}

/// What a fill came to: whether the narinfo is there now, or why it failed.
type FillOutcome = Result<bool, FillFailure>;

/// Why a fill failed, for the answer.
#[derive(Clone, Debug)]
struct FillFailure {
    /// Another writer held the cache's lock too long: 503, come back later.
    busy: bool,
    message: Arc<str>,
}

/// Seconds a client is told to wait after a fill found the cache's lock held.
const RETRY_AFTER: &str = "10";

/// Serves until SIGTERM or SIGINT; `ready` runs once the listeners accept.
///
/// Each worker thread runs a single-threaded runtime that accepts on every listener and keeps
/// the connections it accepted, as nginx's worker processes do: a request is parsed, answered
/// and written on one thread, with no hand-off or work stealing between threads. (Measured on
/// 2 cores: tokio's multi-threaded scheduler answered 0.75x-0.9x nginx's narinfo requests per
/// second; a runtime per thread, about 1.0x.)
pub fn run(config: ServeConfig, ready: impl FnOnce()) -> Result<(), ServeError> {
    let cache = Cache::inspect(config.dest.as_path())?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        cache,
        filler: config.filler.map(Arc::new),
        fills: Mutex::new(HashMap::new()),
        log: config.access_log.then(Logger::start),
        index: Bytes::from(config.index),
        stopping: stop_rx.clone(),
        uploads: config.uploads,
        readers: config.readers,
    });
    // A fill runs on a blocking thread of the runtime that asked for it; misses never start
    // one ([`Filler::would_serve`]), and two per worker are the most.
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(2)
            .build()
            .map_err(ServeError::Start)
    };
    let main = runtime()?;
    // Signals are caught from here on, before a client can connect.
    let (mut term, mut int) = main
        .block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            Ok::<_, io::Error>((signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?))
        })
        .map_err(ServeError::Start)?;
    let mut workers = Vec::new();
    for i in 0..config.threads.max(1) {
        let listeners = config.listeners.iter().map(|l| l.try_clone()).collect::<Result<Vec<_>, _>>();
        let listeners = listeners.map_err(ServeError::Start)?;
        let (rt, shared, stop) = (runtime()?, shared.clone(), stop_rx.clone());
        let (timeout, tls) = (config.timeout, config.tls.clone());
        let worker = std::thread::Builder::new().name(format!("nixcache-serve-{i}")).spawn(move || {
            let served = rt.block_on(async move {
                let graceful = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
                let mut accepting = Vec::new();
                for l in listeners {
                    l.set_nonblocking(true)?;
                    let l = tokio::net::TcpListener::from_std(l)?;
                    let (shared, stop, graceful) = (shared.clone(), stop.clone(), graceful.clone());
                    let tls = tls.clone();
                    accepting.push(tokio::spawn(accept::accept(l, shared, stop, graceful, timeout, tls)));
                }
                for a in accepting {
                    let _ = a.await;
                }
                // Every accept loop has dropped its handle: this one is the last.
                if let Ok(g) = Arc::try_unwrap(graceful) {
                    let _ = tokio::time::timeout(GRACE, g.shutdown()).await;
                }
                Ok::<_, io::Error>(())
            });
            // A fill still running (its waiters were answered 503) is not waited for.
            rt.shutdown_timeout(Duration::from_millis(100));
            served
        });
        workers.push(worker.map_err(ServeError::Start)?);
    }
    let trimmer = trim::start();
    ready();
    main.block_on(async {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    });
    let _ = stop_tx.send(true);
    drop(trimmer);
    let mut result = Ok(());
    for w in workers {
        match w.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(ServeError::Start(e)),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    // A fill abandoned above leaves only temporary files (as a kill would): removed now, and
    // no fill thread can make another.
    let removed = crate::interrupt::remove_registered();
    if removed > 0 {
        crate::elog!(
            "a fill under way was abandoned: {} removed; what it had published stays",
            crate::progress::plural(removed, "temporary file")
        );
    }
    result
}

/// Answers one request.
async fn handle(shared: &Arc<Shared>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let access = shared.log.as_ref().map(|log| Access {
        log: *log,
        peer,
        method: req.method().clone(),
        path: req.uri().path().to_owned(),
        started: Instant::now(),
        status: 0,
    });
    let mut resp = if req.method() == Method::PUT {
        upload::put(shared, req).await
    } else if req.method() == Method::POST && req.uri().path() == crate::storage::remote::wire::HAVE_PATH {
        upload::have(shared, req).await
    } else if req.method() == Method::GET
        && req.uri().path().strip_prefix('/') == Some(crate::receive::UPSTREAMS_REQUEST)
    {
        upload::upstreams(shared, req).await
    } else if !may_read(shared, &req) {
        upload::unauthorized("reads")
    } else {
        answer(shared, &req).await
    };
    if let Some(mut a) = access {
        a.status = resp.status().as_u16();
        resp.body_mut().access = Some(a);
    }
    resp
}

/// Whether a read may be answered: always, unless `--read-token-file` asks for a token (an
/// upload token will do too).
fn may_read(shared: &Shared, req: &Request<Incoming>) -> bool {
    match &shared.readers {
        None => true,
        Some(readers) => {
            readers.authorized(req) || shared.uploads.as_ref().is_some_and(|u| u.tokens.authorized(req))
        }
    }
}

async fn answer(shared: &Arc<Shared>, req: &Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = status(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if req.uri().path() == "/" {
        let mut r = status(StatusCode::OK, "");
        *r.body_mut() = Body::bytes(shared.index.clone());
        return r;
    }
    let Some(target) = files::target(req.uri().path()) else { return not_found() };
    match shared.cache.local_file(&target.rel) {
        Ok(Some(f)) => return file_response(req, &target, f),
        Ok(None) => {}
        Err(e) => return unreadable(shared, &target, e),
    }
    let (Some(filler), Some(hash)) = (&shared.filler, &target.hash) else { return not_found() };
    // A path the store does not have is answered here and now; an error is left for the fill
    // to say, and so is a path outside the roots (the fill reads them again).
    if let Ok(false) = filler.would_serve(hash) {
        return not_found();
    }
    match fill(shared, filler, hash).await {
        Ok(true) => match shared.cache.local_file(&target.rel) {
            Ok(Some(f)) => file_response(req, &target, f),
            Ok(None) => {
                status(StatusCode::INTERNAL_SERVER_ERROR, "the narinfo went away after it was filled\n")
            }
            Err(e) => unreadable(shared, &target, e),
        },
        Ok(false) => not_found(),
        Err(e) if e.busy => {
            let mut r = status(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("cannot fill {} now: {}\n", target.rel, e.message),
            );
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER));
            r
        }
        // Nix retries a 500; a 404 it would remember for an hour.
        Err(e) => {
            status(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot fill {}: {}\n", target.rel, e.message))
        }
    }
}

/// A file that is there but not a regular file is not served (404); one that cannot be read
/// is a 500, said on stderr.
fn unreadable(shared: &Shared, target: &Target, e: FileProblem) -> Response<Body> {
    if e.is_established() {
        return not_found();
    }
    crate::elog!("error: {} {}", shared.cache.locate(&target.rel).display(), crate::util::error_chain(&e));
    status(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the file\n")
}

/// Waits for the fill of `hash`, starting it unless one is under way.
async fn fill(shared: &Arc<Shared>, filler: &Arc<Filler>, hash: &str) -> FillOutcome {
    let stopping = || FillFailure { busy: true, message: Arc::from("the server is stopping") };
    if *shared.stopping.borrow() {
        return Err(stopping());
    }
    let mut rx = {
        let mut fills = shared.fills.lock().unwrap_or_else(|e| e.into_inner());
        match fills.get(hash) {
            Some(rx) => rx.clone(),
            None => {
                let (tx, rx) = watch::channel(None);
                fills.insert(hash.to_owned(), rx.clone());
                let (shared, filler, hash) = (shared.clone(), filler.clone(), hash.to_owned());
                // On a thread of its own, not tied to the request: a client that goes away
                // does not stop a fill others wait for.
                tokio::task::spawn_blocking(move || {
                    // The waiters are told first: nothing a client waits for waits on a log
                    // line (the log never blocks, but it comes second all the same).
                    let (outcome, line) = match filler.fill(&hash) {
                        Ok(Filled::Pushed { path, paths, pushed, nar_bytes, file_bytes, seconds }) => {
                            let line = (pushed > 0).then(|| {
                                format!(
                                    "filled {path}: {pushed} of {} pushed, {} NAR -> {} in {seconds:.2}s",
                                    crate::progress::plural(paths, "path"),
                                    crate::progress::bytes(nar_bytes),
                                    crate::progress::bytes(file_bytes),
                                )
                            });
                            (Ok(true), line)
                        }
                        Ok(Filled::NotServed(_)) => (Ok(false), None),
                        Err(e) => {
                            let busy = matches!(e, fill::FillError::Busy(_));
                            let e = crate::util::error_chain(&e);
                            let line = format!("error: cannot fill {hash}: {e}");
                            (Err(FillFailure { busy, message: Arc::from(e) }), Some(line))
                        }
                    };
                    shared.fills.lock().unwrap_or_else(|e| e.into_inner()).remove(&hash);
                    let _ = tx.send(Some(outcome));
                    if let Some(line) = line {
                        crate::elog!("{line}");
                    }
                });
                rx
            }
        }
    };
    // On SIGTERM a long fill (an xz closure can take minutes) is not waited for: its clients
    // are told to come back, and the server stops within its grace for other responses.
    let mut stop = shared.stopping.clone();
    tokio::select! {
        v = rx.wait_for(Option::is_some) => match v {
            Ok(v) => v.clone().expect("waited for a value"),
            Err(_) => Err(FillFailure { busy: false, message: Arc::from("the fill ended without an outcome") }),
        },
        _ = stop.wait_for(|s| *s) => Err(stopping()),
    }
}

fn not_found() -> Response<Body> {
    status(StatusCode::NOT_FOUND, "not found\n")
}

fn status(code: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(Body::bytes(Bytes::copy_from_slice(text.as_bytes())));
    *r.status_mut() = code;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The answer for an open file: 200, 206, 304 or 416, with the headers of its kind.
fn file_response(
    req: &Request<Incoming>,
    target: &Target,
    (file, meta): (std::fs::File, std::fs::Metadata),
) -> Response<Body> {
    let size = meta.len();
    let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
    let v = Validators::new(modified, size);
    if target.kind == Kind::NarInfo {
        keep_fresh(&file, modified);
    }
    let h = |name| req.headers().get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    let mut builder = Response::builder()
        .header(header::CONTENT_TYPE, target.kind.content_type())
        .header(header::CACHE_CONTROL, target.kind.cache_control())
        .header(header::ETAG, &v.etag)
        .header(header::LAST_MODIFIED, &v.last_modified)
        .header(header::ACCEPT_RANGES, "bytes");
    if v.not_modified(h(header::IF_NONE_MATCH), h(header::IF_MODIFIED_SINCE)) {
        return builder.status(StatusCode::NOT_MODIFIED).body(Body::empty()).expect("valid response");
    }
    let range = match h(header::IF_RANGE) {
        Some(ir) if !v.if_range_holds(ir) => Range::Whole,
        _ => Range::parse(h(header::RANGE), size),
    };
    let (start, len) = match range {
        Range::Whole => (0, size),
        Range::Part { start, end } => {
            builder = builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"));
            (start, end - start + 1)
        }
        Range::Unsatisfiable => {
            return builder
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                .header(header::CONTENT_LENGTH, 0)
                .body(Body::empty())
                .expect("valid response");
        }
    };
    builder = builder.header(header::CONTENT_LENGTH, len);
    let body = if req.method() == Method::HEAD {
        Body::empty()
    } else if target.kind != Kind::Nar && len <= SMALL {
        let mut buf = vec![0; len as usize];
        match file.read_exact_at(&mut buf, start) {
            Ok(()) => Body::bytes(Bytes::from(buf)),
            // Shrunk since it was opened: cut the response off rather than send a short file.
            Err(e) => Body::failed(e),
        }
    } else {
        Body::file(file, chunks::FileId::of(&meta), start, len)
    };
    builder.body(body).expect("valid response")
}

/// How old a served narinfo's modification time may get before serving it renews it.
const FRESH: Duration = Duration::from_secs(600);

/// A narinfo a client fetches is in use: its modification time, gc's record of when a push
/// last named the path, is renewed (at most every [`FRESH`], so a busy server writes little),
/// and a gc with any `--older-than` longer than that never removes what clients fetch from a
/// live cache, filled or pushed. Read-only media and files of another owner stay as they are.
fn keep_fresh(file: &std::fs::File, modified: std::time::SystemTime) {
    if modified.elapsed().is_ok_and(|age| age > FRESH) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
}

/// A response body: nothing, bytes in memory, or a range of an open file, read a chunk at a
/// time as the connection can take it. Logs the request when dropped, with the bytes sent.
pub struct Body {
    inner: Inner,
    sent: u64,
    access: Option<Access>,
}

enum Inner {
    Empty,
    Bytes(Option<Bytes>),
    File { file: std::fs::File, id: chunks::FileId, offset: u64, remaining: u64 },
    Failed(Option<io::Error>),
}

impl Body {
    fn new(inner: Inner) -> Body {
        Body { inner, sent: 0, access: None }
    }
    fn empty() -> Body {
        Body::new(Inner::Empty)
    }
    fn bytes(b: Bytes) -> Body {
        Body::new(Inner::Bytes(Some(b)))
    }
    fn file(file: std::fs::File, id: chunks::FileId, offset: u64, remaining: u64) -> Body {
        Body::new(Inner::File { file, id, offset, remaining })
    }
    fn failed(e: io::Error) -> Body {
        Body::new(Inner::Failed(Some(e)))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        let chunk = match &mut this.inner {
            Inner::Empty => None,
            Inner::Bytes(b) => b.take().map(Ok),
            Inner::Failed(e) => e.take().map(Err),
            Inner::File { remaining: 0, .. } => None,
            // Shrunk under us: the error ends the response short, so the client sees it failed.
            Inner::File { file, id, offset, remaining } => {
                Some(chunks::next(file, *id, *offset, *remaining).inspect(|b| {
                    *offset += b.len() as u64;
                    *remaining -= b.len() as u64;
                }))
            }
        };
        if let Some(Ok(b)) = &chunk {
            this.sent += b.len() as u64;
        }
        Poll::Ready(chunk.map(|c| c.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Empty => true,
            Inner::Bytes(b) => b.is_none(),
            Inner::File { remaining, .. } => *remaining == 0,
            Inner::Failed(e) => e.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Empty | Inner::Failed(_) => SizeHint::with_exact(0),
            Inner::Bytes(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::File { remaining, .. } => SizeHint::with_exact(*remaining),
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        if let Some(a) = self.access.take() {
            a.log.line(format!(
                "{} {} {} {} {} {:.1}ms",
                a.peer,
                a.method,
                a.path,
                a.status,
                self.sent,
                a.started.elapsed().as_secs_f64() * 1000.0
            ));
        }
    }
}

/// What the access line of a request says.
struct Access {
    log: Logger,
    peer: SocketAddr,
    method: Method,
    path: String,
    started: Instant,
    status: u16,
}
