//! A cache on another machine, written through a receiver there: `nixcache receive` over
//! SSH ([`ssh`]), or an HTTP server that takes Nix's uploads ([`http`]: `nixcache serve
//! --upload-token-file`, or any server `nix copy --to http://` writes to).
//!
//! The receiver checks and publishes; this side only sends. A NAR is sent as soon as it is
//! compressed (the receiver keeps it out of sight until its narinfo comes), a narinfo only
//! once its NAR and its references' narinfos were taken, so the push pipeline's order is the
//! receiver's publishing order. The receiver takes its cache's lock for each publish, which
//! orders it with a gc or a push there: writers exclude each other, as on a directory.
//!
//! Before it looks, a push asks in one request which of its paths the cache holds
//! ([`wire::HaveRequest`], recorded as a push of those paths for gc), where the receiver is
//! nixcache; another server is asked path by path.

pub mod http;
mod location;
mod outgoing;
pub mod ssh;
pub mod wire;

pub use location::{Auth, RemoteDest, RemoteUrl};

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use thiserror::Error;

use super::{
    Backend, FileProblem, Leftover, Meta, NewFile, Reader, Record, Requests, Shared, Staged, StorageError,
};
use wire::{HaveAnswer, HaveRequest, Verb};

/// What a remote cache did not do.
#[derive(Debug, Error)]
pub enum RemoteError {
    #[error("{url} refused {what} ({status}): {message}")]
    Refused { url: String, what: String, status: u16, message: String },
    #[error(
        "{url} wants a token to take uploads (401): pass --upload-token-file FILE, or put `machine {host} password TOKEN` in the netrc file Nix reads (netrc-file in nix.conf, /etc/nix/netrc, or ~/.netrc)"
    )]
    Unauthorized { url: String, host: String },
    #[error(
        "{url} takes no uploads ({status}): start its nixcache serve with --upload-token-file, or make the server accept PUT"
    )]
    NoUploads { url: String, status: u16 },
    #[error("cannot reach {url}: {reason}")]
    Transport { url: String, reason: String },
    #[error(
        "{host} has no `{program}` to receive the push (the remote shell exited with 127): install nixcache there, or pass --remote-program with its path"
    )]
    NotInstalled { host: String, program: String },
    #[error(
        "ssh to {host} failed (exit {code}; its message is above): check that `ssh {host}` works without a prompt"
    )]
    SshFailed { host: String, code: String },
    #[error("the receiver on {host} ended: {reason}")]
    Lost { host: String, reason: String },
    #[error("cannot start ssh")]
    Spawn(#[source] io::Error),
}

/// A request's body.
pub enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// A file, sent whole from its start, and its length.
    File(&'a File, u64),
}

impl Body<'_> {
    fn len(&self) -> u64 {
        match self {
            Body::Empty => 0,
            Body::Bytes(b) => b.len() as u64,
            Body::File(_, n) => *n,
        }
    }
}

/// An answer: its status, the size a HEAD found, its body.
pub struct Answer {
    pub status: u16,
    pub size: Option<u64>,
    pub body: Vec<u8>,
}

impl Answer {
    fn message(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let text = text.trim();
        if text.is_empty() { "no reason given".into() } else { text.chars().take(500).collect() }
    }
}

/// A way to send requests to a receiver.
pub trait Transport: Send + Sync {
    /// Sends one request; an answer of any status is `Ok`. A GET's body is read up to `limit`.
    fn send(&self, verb: Verb, rel: &str, body: Body<'_>, limit: u64) -> Result<Answer, RemoteError>;
}

/// The name the receiver's merged upstream records are read under.
const MERGED_RECORDS: &str = ".nixcache/upstreams.merged";

/// What the "have" answer said of a file: its size and (a narinfo) its text; `None`: not there.
type Known = Option<(u64, Option<Vec<u8>>)>;

/// A remote cache, as a push writes it.
pub struct RemoteBackend {
    dest: RemoteDest,
    transport: Arc<dyn Transport>,
    /// What the "have" answer said, per cache-relative name.
    known: Mutex<HashMap<String, Known>>,
    counts: Arc<Counts>,
    uploaders: Arc<outgoing::Uploaders>,
}

/// Requests made, by kind, and the bytes of the bodies sent.
#[derive(Default)]
struct Counts {
    requests: Mutex<HashMap<&'static str, Requests>>,
    sent: std::sync::atomic::AtomicU64,
}

impl RemoteBackend {
    /// Connects: for SSH, starts the receiver on the far side and waits until it is ready.
    pub fn connect(dest: &RemoteDest) -> Result<RemoteBackend, StorageError> {
        let transport: Arc<dyn Transport> = match &dest.url {
            RemoteUrl::Http(base) => Arc::new(http::Http::new(base, dest.auth.clone())?),
            RemoteUrl::Ssh { .. } => Arc::new(ssh::Ssh::start(dest)?),
        };
        let counts = Arc::new(Counts::default());
        // Over ssh one stream carries everything: two uploads keep it busy while the receiver
        // answers one. Over HTTP, connections of their own.
        let n = if matches!(dest.url, RemoteUrl::Ssh { .. }) { 2 } else { 4 };
        let uploaders = Arc::new(outgoing::Uploaders::start(n, &transport, &counts, &dest.url.to_string()));
        Ok(RemoteBackend {
            dest: dest.clone(),
            transport,
            known: Mutex::new(HashMap::new()),
            counts,
            uploaders,
        })
    }

    fn url(&self) -> String {
        self.dest.url.to_string()
    }

    /// Sends a request, counted and timed by its kind.
    fn send(&self, verb: Verb, rel: &str, body: Body<'_>, limit: u64) -> Result<Answer, RemoteError> {
        send_counted(&*self.transport, &self.counts, verb, rel, body, limit)
    }

    fn known(&self, rel: &str) -> Option<Known> {
        self.known.lock().unwrap_or_else(|e| e.into_inner()).get(rel).cloned()
    }

    /// Asks which of `hashes` the cache holds (recording them as pushed, with `record`), and
    /// keeps the answer for [`Backend::stat`] and [`Backend::read`]. `false` when the server
    /// does not know the request (not nixcache): lookups are made one by one.
    pub fn ask_have(&self, hashes: &[&str], record: bool) -> Result<bool, StorageError> {
        for chunk in hashes.chunks(wire::HAVE_BATCH) {
            let req = HaveRequest { hashes: chunk.iter().map(|h| (*h).to_owned()).collect(), record };
            let body = serde_json::to_vec(&req).expect("serializable");
            let answer = self.send(Verb::Have, "-", Body::Bytes(&body), 256 << 20)?;
            if matches!(answer.status, 404 | 405 | 501) {
                return Ok(false);
            }
            let answer = refused(&self.url(), "the question which paths it has", answer)?;
            let have: HaveAnswer = serde_json::from_slice(&answer.body).map_err(|e| RemoteError::Lost {
                host: self.url(),
                reason: format!("its answer to which paths it has is not what nixcache sends: {e}"),
            })?;
            let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            for h in chunk {
                known.insert(crate::layout::narinfo_name(h), None);
            }
            for (h, held) in have.present {
                if !chunk.contains(&h.as_str()) {
                    continue;
                }
                let nar = held.narinfo.parse::<crate::narinfo::NarInfo>().ok().and_then(|ni| ni.nar_file());
                if let Some(nar) = nar {
                    known.insert(nar, held.nar_size.map(|s| (s, None)));
                }
                let text = held.narinfo.into_bytes();
                known.insert(crate::layout::narinfo_name(&h), Some((text.len() as u64, Some(text))));
            }
        }
        Ok(true)
    }

    fn put(&self, rel: &str, body: Body<'_>) -> Result<(), StorageError> {
        put(&*self.transport, &self.counts, &self.url(), rel, body)
    }
}

fn send_counted(
    transport: &dyn Transport,
    counts: &Counts,
    verb: Verb,
    rel: &str,
    body: Body<'_>,
    limit: u64,
) -> Result<Answer, RemoteError> {
    let started = Instant::now();
    counts.sent.fetch_add(body.len(), std::sync::atomic::Ordering::Relaxed);
    let r = transport.send(verb, rel, body, limit);
    let kind = match verb {
        Verb::Get => "get",
        Verb::Head => "head",
        Verb::Put => "put",
        Verb::Have => "have",
    };
    let mut c = counts.requests.lock().unwrap_or_else(|e| e.into_inner());
    let e = c.entry(kind).or_default();
    e.count += 1;
    e.time += started.elapsed();
    r
}

/// The answer if it is a success, else the error it says.
fn refused(url: &str, what: &str, a: Answer) -> Result<Answer, RemoteError> {
    match a.status {
        200..=299 => Ok(a),
        _ => Err(failure(url, what, &a)),
    }
}

/// What an answer that is not a success says.
fn failure(url: &str, what: &str, a: &Answer) -> RemoteError {
    match a.status {
        401 => RemoteError::Unauthorized {
            url: url.to_owned(),
            host: url::Url::parse(url).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default(),
        },
        405 | 501 => RemoteError::NoUploads { url: url.to_owned(), status: a.status },
        status => {
            RemoteError::Refused { url: url.to_owned(), what: what.to_owned(), status, message: a.message() }
        }
    }
}

fn put(
    transport: &dyn Transport,
    counts: &Counts,
    url: &str,
    rel: &str,
    body: Body<'_>,
) -> Result<(), StorageError> {
    let a = send_counted(transport, counts, Verb::Put, rel, body, 0)?;
    refused(url, rel, a)?;
    Ok(())
}

fn unsupported(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("{what} is not done over the link: run it where the cache is (ssh HOST nixcache ...)"),
    )
}

impl Backend for RemoteBackend {
    fn describe(&self) -> String {
        self.url()
    }

    fn locate(&self, rel: &str) -> PathBuf {
        PathBuf::from(format!("{}/{rel}", self.url()))
    }

    fn bad_dirs(&self) -> Vec<(&'static str, &'static str)> {
        Vec::new()
    }

    fn create_subdir(&self, _sub: &'static str) -> Result<(), StorageError> {
        Ok(())
    }

    /// The receiver takes its cache's lock for each publish.
    fn lock(
        &mut self,
        _shared: bool,
        _wait: Option<std::time::Duration>,
        _on_wait: &mut dyn FnMut(Option<&str>),
    ) -> Result<(), StorageError> {
        Ok(())
    }

    /// The receiver's lock orders its writers (and leaves nothing temporary to this side).
    fn exclusive(&self) -> bool {
        true
    }

    fn commits_at_once(&self) -> usize {
        8
    }

    fn commits_wait(&self) -> bool {
        true
    }

    /// Not listed over the link: what a push needs comes from the "have" answer. But for
    /// `.nixcache/`, whose upstream records a receiver sends merged, as one file.
    fn list(&self, sub: &str) -> Result<Vec<Meta>, StorageError> {
        if sub != crate::layout::STATE_DIR {
            return Ok(Vec::new());
        }
        let a = self.send(Verb::Get, wire::UPSTREAMS_REQUEST, Body::Empty, 64 << 20)?;
        if matches!(a.status, 403..=405) {
            // Not nixcache: no records to read.
            return Ok(Vec::new());
        }
        let a = refused(&self.url(), "its upstream records", a)?;
        if a.body.is_empty() {
            return Ok(Vec::new());
        }
        let size = a.body.len() as u64;
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(MERGED_RECORDS.into(), Some((size, Some(a.body))));
        Ok(vec![Meta {
            name: MERGED_RECORDS.into(),
            size,
            modified: SystemTime::now(),
            not_regular: None,
            etag: None,
        }])
    }

    fn stat(&self, rel: &str) -> Result<Option<Meta>, FileProblem> {
        let size = match self.known(rel) {
            Some(k) => k.map(|(size, _)| size),
            None => {
                let a = self
                    .send(Verb::Head, rel, Body::Empty, 0)
                    .map_err(|e| FileProblem::Io(io::Error::other(e)))?;
                match a.status {
                    404 | 410 => None,
                    200..=299 => Some(a.size.unwrap_or(0)),
                    _ => return Err(FileProblem::Io(io::Error::other(failure(&self.url(), rel, &a)))),
                }
            }
        };
        Ok(size.map(|size| Meta {
            name: rel.to_owned(),
            size,
            modified: SystemTime::now(),
            not_regular: None,
            etag: None,
        }))
    }

    fn read(&self, rel: &str, limit: u64) -> Result<Option<Vec<u8>>, FileProblem> {
        if let Some(k) = self.known(rel) {
            match k {
                None => return Ok(None),
                Some((_, Some(text))) => return Ok(Some(text)),
                Some((_, None)) => {}
            }
        }
        let a = self
            .send(Verb::Get, rel, Body::Empty, limit)
            .map_err(|e| FileProblem::Io(io::Error::other(e)))?;
        match a.status {
            404 | 410 => Ok(None),
            200..=299 if a.body.len() as u64 > limit => {
                Err(FileProblem::TooLarge { size: a.body.len() as u64, limit })
            }
            200..=299 => Ok(Some(a.body)),
            413 => Err(FileProblem::TooLarge { size: limit + 1, limit }),
            _ => Err(FileProblem::Io(io::Error::other(failure(&self.url(), rel, &a)))),
        }
    }

    /// NARs are not read back over the link (`push --repair` runs where the cache is).
    fn open(&self, _rel: &str) -> Result<Option<(Reader, u64)>, FileProblem> {
        Err(FileProblem::Io(unsupported("reading a NAR back")))
    }

    fn create(&self, _sub: &str, _suffix: &str) -> Result<Box<dyn NewFile>, StorageError> {
        let file = self.scratch()?;
        Ok(Box::new(outgoing::Outgoing { file, len: 0, uploaders: self.uploaders.clone() }))
    }

    fn stage(&self, rel: &str, data: &[u8], _modified: Option<SystemTime>) -> Result<Staged, StorageError> {
        let (transport, counts, url, rel2, data) =
            (self.transport.clone(), self.counts.clone(), self.url(), rel.to_owned(), data.to_vec());
        Ok(Staged::new(rel, None, move || put(&*transport, &counts, &url, &rel2, Body::Bytes(&data))))
    }

    fn replace(&self, rel: &str, data: &[u8], _modified: Option<SystemTime>) -> Result<(), StorageError> {
        self.put(rel, Body::Bytes(data))
    }

    fn sync(&self, _staged: &[&Staged]) -> Result<(), StorageError> {
        Ok(())
    }

    fn sync_dir(&self, _sub: &str) -> Result<(), StorageError> {
        Ok(())
    }

    /// The "have" request recorded the push already.
    fn touch(&self, _rel: &str) -> Result<(), StorageError> {
        Ok(())
    }

    fn remove(&self, rel: &str) -> Result<(), StorageError> {
        Err(StorageError::Io {
            action: "remove",
            path: self.locate(rel),
            source: unsupported("removing a file"),
        })
    }

    fn scratch(&self) -> Result<File, StorageError> {
        tempfile::tempfile().map_err(|source| StorageError::Io {
            action: "create a temporary file in",
            path: std::env::temp_dir(),
            source,
        })
    }

    fn leftovers(&self) -> Result<Vec<Leftover>, StorageError> {
        Ok(Vec::new())
    }

    fn remove_leftover(&self, _l: &Leftover) -> Result<(), StorageError> {
        Ok(())
    }

    fn shared(&self) -> Option<&dyn Shared> {
        Some(self)
    }
}

/// Where the remote's "have" answer stands in for records and listings.
impl Shared for RemoteBackend {
    /// Asks which of the paths the cache holds, recording them there as pushed.
    fn record_push(&self, hash_parts: &[&str]) -> Result<Option<String>, StorageError> {
        self.ask_have(hash_parts, true)?;
        Ok(None)
    }

    fn push_records(
        &self,
        _skip: &dyn Fn(&str) -> bool,
        _each: &mut dyn FnMut(&str, SystemTime),
    ) -> Result<Vec<Record>, StorageError> {
        Ok(Vec::new())
    }

    fn start_deleting(&self) -> Result<Option<String>, StorageError> {
        Ok(None)
    }

    fn done_deleting(&self, _marker: &str) -> Result<(), StorageError> {
        Ok(())
    }

    fn deleting(&self) -> Result<Vec<Meta>, StorageError> {
        Ok(Vec::new())
    }

    fn prepare_lookups(&self, _paths: usize) -> Result<Option<String>, StorageError> {
        Ok(None)
    }

    fn prepare_lookups_after(&self, _paths: usize, _top: Vec<Meta>) -> Result<Option<String>, StorageError> {
        Ok(None)
    }

    fn listed_once(&self, _sub: &str) -> Option<Vec<Meta>> {
        None
    }

    fn requests(&self) -> HashMap<&'static str, Requests> {
        self.counts.requests.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn keep_copies(&self, _dir: &std::path::Path) -> Result<(), super::s3::CopiesError> {
        Ok(())
    }

    fn copies_used(&self) -> Option<(PathBuf, u64)> {
        None
    }

    fn bytes_sent(&self) -> Option<u64> {
        Some(self.counts.sent.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn look_ahead(&self, hash_parts: &[&str]) -> Result<(), StorageError> {
        self.ask_have(hash_parts, false).map(drop)
    }
}

impl From<RemoteError> for StorageError {
    fn from(e: RemoteError) -> Self {
        StorageError::Remote(e)
    }
}
