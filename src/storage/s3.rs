//! A cache in an S3-compatible bucket (AWS S3, R2, B2, Garage, SeaweedFS, Ceph RGW, MinIO).
//!
//! Object keys are exactly the file names of a directory cache, under a key prefix, and
//! carry the Content-Types Nix's own S3 store sets. Requests are signed with AWS Signature
//! Version 4 by `rusty-s3` (sans-IO) and sent by `ureq` (blocking, like the rest of
//! nixcache: compression runs on `--jobs` threads, and each NAR's parts go up from a thread
//! of their own while the next part is compressed).
//!
//! - A NAR's name is its own hash, known only once it is compressed. One that fits in a part
//!   goes up in one PUT under its name from memory; one up to [`SPOOL_LIMIT`] is held in a
//!   temporary file while it is compressed and goes up in one PUT under its name; a larger
//!   one streams up as a multipart upload to a temporary key while it is compressed, is
//!   copied to its name by the server (CopyObject, or UploadPartCopy above 5 GiB) and the
//!   temporary key deleted.
//! - Writers take no lock: there is nothing to lock a bucket with that every server honours
//!   (Garage ignores conditional writes). Content-addressed NAR keys make racing uploads of
//!   the same NAR harmless, and a narinfo is only written after its NAR and its references.
//! - Nothing can set an object's modification time, so a push writes a push record
//!   (`.nixcache/pushes/...`) naming every narinfo of its closure before it looks at the
//!   bucket; gc counts a path as pushed when its newest record or its narinfo was written.
//! - Failed requests are retried with backoff on 5xx, 429 and SlowDown, at most
//!   [`ATTEMPTS`] times; a run that fails aborts its multipart uploads, and gc aborts the
//!   ones left by killed runs.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use rusty_s3::{Bucket, Method, UrlStyle};
use thiserror::Error;
use url::Url;

use super::answers::{self, error_code, parse_time, printable, redact_url, xml_values};
use super::copies::{Copies, CopiesError};
use super::credentials::{self, Creds};
use super::{Backend, Leftover, Meta, NewFile, Reader, Record, Requests, Staged};
use super::{FileProblem, StorageError};
use crate::layout::TEMP_PREFIX;

use crate::retry::ATTEMPTS;

/// The first part of a multipart upload; every thousand parts the size doubles, so no
/// upload needs more than S3's 10,000 parts (8 MiB x 1000 x (1 + 2 + ... + 512) is about
/// 8 PiB). A NAR that fits in one part goes up in one PUT.
pub const PART_SIZE: usize = 8 << 20;

/// The largest object CopyObject copies; a larger one is copied a part at a time.
const COPY_LIMIT: u64 = 5 << 30;

/// How much of a NAR larger than a part is held in a temporary file (in `TMPDIR`) while it
/// is compressed, so that it goes up in one PUT under its name once its hash is known:
/// [`SPOOL_LIMIT`], or `NIXCACHE_S3_SPOOL_LIMIT` bytes (at most 4 GiB; 0 turns it off). A
/// larger NAR goes up as a multipart upload to a temporary key and is copied to its name.
pub const SPOOL_LIMIT: u64 = 64 << 20;

fn spool_limit() -> u64 {
    std::env::var("NIXCACHE_S3_SPOOL_LIMIT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SPOOL_LIMIT)
        .min(4 << 30)
}

/// Where push records live, under the prefix.
const RECORDS: &str = ".nixcache/pushes";

/// Where a gc says it is deleting ([`Backend::start_deleting`]).
const GC_MARKERS: &str = ".nixcache/gc";

/// How long a request may go without a byte from the server (its answer's head or body)
/// before it is given up and tried again: [`READ_TIMEOUT`], or `NIXCACHE_S3_READ_TIMEOUT`
/// seconds.
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);

fn read_timeout() -> Duration {
    std::env::var("NIXCACHE_S3_READ_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(READ_TIMEOUT, Duration::from_secs)
}

/// The most hash parts one push record holds; a larger closure writes several records. A
/// record is at most [`RECORD_LIMIT`] bytes, and a larger object is not nixcache's.
pub const RECORD_PATHS: usize = 100_000;
/// The largest push record read: [`RECORD_PATHS`] hash parts, one per line.
pub const RECORD_LIMIT: u64 = (RECORD_PATHS as u64) * 33;

/// Uploads in flight at once, across all NARs of a run.
pub const DEFAULT_UPLOADS: usize = 8;

/// `s3://bucket/prefix?endpoint=...&region=...&profile=...&addressing-style=...`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketUrl {
    pub bucket: String,
    /// The key prefix, without leading or trailing slashes; empty for the bucket's root.
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: String,
    pub profile: Option<String>,
    pub addressing: Addressing,
    /// Parts in flight at once.
    pub uploads: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addressing {
    /// Path style for a custom endpoint, virtual-hosted for AWS.
    Auto,
    Path,
    Virtual,
}

impl fmt::Display for BucketUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}", self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        Ok(())
    }
}

impl FromStr for BucketUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix("s3://").ok_or_else(|| format!("{s:?} is not an s3:// URL"))?;
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        if bucket.is_empty() {
            return Err(format!("{s:?} names no bucket: s3://BUCKET/PREFIX"));
        }
        let mut url = BucketUrl {
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            endpoint: None,
            region: "us-east-1".to_owned(),
            profile: None,
            addressing: Addressing::Auto,
            uploads: DEFAULT_UPLOADS,
        };
        if url.prefix.split('/').any(|c| c == "." || c == "..") || url.prefix.contains("//") {
            return Err(format!("{s:?}: the key prefix may not have empty, . or .. components"));
        }
        let mut scheme = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match k {
                "endpoint" => url.endpoint = Some(v),
                "region" => url.region = v,
                "profile" => url.profile = Some(v),
                "scheme" => scheme = Some(v),
                "addressing-style" => {
                    url.addressing = match v.as_str() {
                        "auto" => Addressing::Auto,
                        "path" => Addressing::Path,
                        "virtual" => Addressing::Virtual,
                        _ => return Err(format!("addressing-style={v}: use auto, path or virtual")),
                    }
                }
                _ => {
                    return Err(format!(
                        "{s:?}: nixcache reads only endpoint, region, profile, scheme and addressing-style from an s3:// URL; `{k}` is a Nix store setting: use nixcache's flags (-c/--compression, --priority, ...)"
                    ));
                }
            }
        }
        // Nix takes a bare host in `endpoint` with `scheme`; a full URL says its own.
        if let Some(e) = &url.endpoint
            && !e.contains("://")
        {
            url.endpoint = Some(format!("{}://{e}", scheme.as_deref().unwrap_or("https")));
        }
        Ok(url)
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What went wrong talking to the bucket. Never holds a secret or a signed URL.
#[derive(Debug, Error)]
pub enum S3Error {
    #[error(
        "no S3 credentials found; looked in {looked}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or add the profile to ~/.aws/credentials"
    )]
    NoCredentials { looked: String },
    #[error("{bucket} refused the credentials from {source_name} ({code}: {message}); check them")]
    Refused { bucket: String, source_name: String, code: String, message: String },
    #[error("the bucket {bucket} does not exist at {endpoint}; create it first")]
    NoSuchBucket { bucket: String, endpoint: String },
    #[error("cannot reach {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("{what}: the server answered {status} {code}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Status { what: String, status: u16, code: String, message: String },
    #[error("{what}: the server's answer does not parse: {reason}")]
    BadAnswer { what: String, reason: String },
    #[error("{endpoint} is not a usable endpoint: {reason}")]
    BadEndpoint { endpoint: String, reason: String },
    #[error("reading back the temporary file (in TMPDIR) a NAR was held in: {0}")]
    Spool(#[source] io::Error),
}

impl S3Error {
    fn into_io(self) -> io::Error {
        let kind = match &self {
            S3Error::Unreachable { .. } => io::ErrorKind::ConnectionRefused,
            S3Error::Refused { .. } => io::ErrorKind::PermissionDenied,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }
}

/// The Content-Type Nix's S3 store gives a key.
fn content_type(rel: &str) -> &'static str {
    if rel == crate::layout::CACHE_INFO {
        "text/x-nix-cache-info"
    } else if rel.ends_with(".narinfo") {
        "text/x-nix-narinfo"
    } else if rel.starts_with("nar/") {
        "application/x-nix-nar"
    } else if rel.ends_with(".ls") || rel.starts_with("debuginfo/") {
        "application/json"
    } else {
        "text/plain"
    }
}

/// A counting semaphore: uploads in flight.
struct Slots {
    free: Mutex<usize>,
    changed: Condvar,
}

impl Slots {
    fn take(&self) {
        let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *f == 0 {
            f = self.changed.wait(f).unwrap_or_else(|e| e.into_inner());
        }
        *f -= 1;
    }

    fn give(&self) {
        *self.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.changed.notify_one();
    }
}

/// What every request needs; shared with upload threads.
struct Client {
    agent: ureq::Agent,
    bucket: Bucket,
    /// None: anonymous. Replaced when temporary ones are due ([`Client::creds`]).
    creds: RwLock<Option<Arc<Creds>>>,
    /// Where the credentials came from can be asked again (found, not given by the caller).
    refreshable: bool,
    /// One refresh at a time.
    refreshing: Mutex<()>,
    /// The key prefix with a trailing slash, or empty.
    prefix: String,
    endpoint: String,
    url: BucketUrl,
    /// Requests made and the time spent on them (their answers read), by kind.
    counts: Mutex<HashMap<&'static str, Requests>>,
    slots: Slots,
    /// Objects known to exist (name -> meta), from one listing, when lookups use it.
    snapshot: Mutex<Option<HashMap<String, Meta>>>,
    /// Copies of narinfos kept on this machine, when the command keeps them.
    copies: OnceLock<Copies>,
}

type Response = ureq::http::Response<ureq::Body>;

/// What a request sends.
#[derive(Clone, Copy)]
enum Body<'a> {
    None,
    Bytes(&'a [u8]),
    /// The whole of a file, read from its start on every try.
    File(&'a File),
}

/// Sends a PUT or POST with its headers and body; a file is sent from its start on every try.
fn with_body(
    mut r: ureq::RequestBuilder<ureq::typestate::WithBody>,
    headers: &[(&str, &str)],
    body: Body<'_>,
) -> Result<Response, ureq::Error> {
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    match body {
        Body::Bytes(b) => r.send(b),
        Body::File(mut f) => {
            f.seek(io::SeekFrom::Start(0))?;
            r.send(f)
        }
        Body::None => r.send_empty(),
    }
}

/// A request being timed: its time is added to its kind's when it ends.
struct Timed<'c> {
    client: &'c Client,
    kind: &'static str,
    started: Instant,
}

impl Drop for Timed<'_> {
    fn drop(&mut self) {
        let took = self.started.elapsed();
        self.client.counts.lock().unwrap_or_else(|e| e.into_inner()).entry(self.kind).or_default().time +=
            took;
    }
}

/// Why reading an answer's body failed: worth another try, or final.
enum BodyError {
    /// The body broke off, stalled or was not what such an answer must be: try again.
    Retry(String),
    /// Final (the answer is complete and wrong, or too large).
    Fail(S3Error),
}

impl Client {
    /// Runs `upload` on a thread of its own once one of the `--uploads` slots is free
    /// (waiting here for it), and frees the slot when it ends.
    fn in_slot<T: Send + 'static>(
        self: &Arc<Self>,
        upload: impl FnOnce(&Client) -> T + Send + 'static,
    ) -> JoinHandle<T> {
        self.slots.take();
        let c = self.clone();
        std::thread::spawn(move || {
            let r = upload(&c);
            c.slots.give();
            r
        })
    }

    fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }

    fn rel<'k>(&self, key: &'k str) -> &'k str {
        key.strip_prefix(self.prefix.as_str()).unwrap_or(key)
    }

    /// Counts a request of `kind` now and, when the guard is dropped, the time it took.
    fn count(&self, kind: &'static str) -> Timed<'_> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).entry(kind).or_default().count += 1;
        Timed { client: self, kind, started: Instant::now() }
    }

    /// The credentials to sign with now: temporary ones are fetched again from where they
    /// came from once due ([`credentials::REFRESH_BEFORE`] their expiry). A failed refresh
    /// keeps the old ones (they may still work; the server says when not).
    fn creds(&self) -> Option<Arc<Creds>> {
        let current = self.creds.read().unwrap_or_else(|e| e.into_inner()).clone();
        let now = SystemTime::now();
        if !self.refreshable || !current.as_ref().is_some_and(|c| c.due(now)) {
            return current;
        }
        let _one = self.refreshing.lock().unwrap_or_else(|e| e.into_inner());
        // Another thread may have just done it.
        let current = self.creds.read().unwrap_or_else(|e| e.into_inner()).clone();
        if !current.as_ref().is_some_and(|c| c.due(now)) {
            return current;
        }
        let _timed = self.count("credentials");
        match credentials::find(self.url.profile.as_deref()) {
            Ok(fresh) => {
                let fresh = Some(Arc::new(fresh));
                *self.creds.write().unwrap_or_else(|e| e.into_inner()) = fresh.clone();
                fresh
            }
            Err(_) => current,
        }
    }

    /// What a server's message may say in ours: see [`answers::printable`].
    fn printable(&self, message: &str) -> String {
        let creds = self.creds.read().unwrap_or_else(|e| e.into_inner()).clone();
        let secrets: Vec<&str> = creds
            .as_deref()
            .map(|c| [c.creds.key(), c.creds.secret(), c.creds.token().unwrap_or_default()].to_vec())
            .unwrap_or_default();
        printable(message, &secrets)
    }

    /// A signed URL for `method` on `key` (None: the bucket), with `query` and the signed
    /// `headers` (lowercase names).
    fn presign(
        &self,
        method: Method,
        key: Option<&str>,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> Url {
        let url = match key {
            Some(k) => self.bucket.object_url(k),
            None => self.bucket.base_url().clone(),
        };
        let mut query: Vec<(&str, &str)> = query.to_vec();
        query.sort();
        let mut headers: Vec<(&str, &str)> = headers.to_vec();
        headers.sort();
        match self.creds().as_deref() {
            Some(c) => rusty_s3::signing::sign(
                &jiff::Timestamp::now(),
                method,
                url,
                c.creds.key(),
                c.creds.secret(),
                c.creds.token(),
                self.bucket.region(),
                3600,
                query.iter().copied(),
                headers.iter().copied(),
            ),
            None => {
                let mut url = url;
                if !query.is_empty() {
                    let mut q = url.query_pairs_mut();
                    for (k, v) in &query {
                        q.append_pair(k, v);
                    }
                }
                url
            }
        }
    }

    /// Sends a request, retrying transport errors, 5xx and 429 with backoff; a final status
    /// not in `ok` is an error that says what to do ([`Client::check`]). `what` names the
    /// request in errors.
    // The request's parts, each a plain value: a struct of them would only be taken apart.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        kind: &'static str,
        what: &dyn Fn() -> String,
        method: Method,
        key: Option<&str>,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: Body<'_>,
        ok: &[u16],
    ) -> Result<Response, S3Error> {
        self.send_with(kind, what, method, key, query, headers, body, ok, Ok)
    }

    /// [`Client::send`], and `read` the answer (status in `ok`) in the same try: a body that
    /// breaks off, stalls past the read timeout or is not what it must be
    /// ([`BodyError::Retry`]) is tried again like a failed request, and after the last try is
    /// an error, never a short answer.
    #[allow(clippy::too_many_arguments)]
    fn send_with<T>(
        &self,
        kind: &'static str,
        what: &dyn Fn() -> String,
        method: Method,
        key: Option<&str>,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: Body<'_>,
        ok: &[u16],
        read: impl Fn(Response) -> Result<T, BodyError>,
    ) -> Result<T, S3Error> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let timed = self.count(kind);
            let url = self.presign(method, key, query, headers);
            let uri = url.as_str();
            let result = match method {
                Method::Get => self.agent.get(uri).call(),
                Method::Head => self.agent.head(uri).call(),
                Method::Delete => self.agent.delete(uri).call(),
                Method::Put => with_body(self.agent.put(uri), headers, body),
                Method::Post => with_body(self.agent.post(uri), headers, body),
            };
            let last = attempt >= ATTEMPTS;
            match result {
                Ok(r) if last || !crate::retry::retryable(r.status().as_u16()) => {
                    match read(self.check(what, r, ok)?) {
                        Ok(t) => return Ok(t),
                        Err(BodyError::Fail(e)) => return Err(e),
                        Err(BodyError::Retry(reason)) if last => {
                            return Err(S3Error::BadAnswer {
                                what: what(),
                                reason: format!("{reason} (tried {ATTEMPTS} times)"),
                            });
                        }
                        Err(BodyError::Retry(_)) => {}
                    }
                }
                Ok(_) => {}
                Err(e) if last => {
                    return Err(S3Error::Unreachable {
                        endpoint: self.endpoint.clone(),
                        reason: transport(&e),
                    });
                }
                Err(_) => {}
            }
            // The pause before the next try is no time spent on the request.
            drop(timed);
            std::thread::sleep(crate::retry::pause(attempt));
        }
    }

    /// Turns an unexpected status into an error that says what to do.
    fn check(&self, what: &dyn Fn() -> String, mut r: Response, ok: &[u16]) -> Result<Response, S3Error> {
        let status = r.status().as_u16();
        if ok.contains(&status) {
            return Ok(r);
        }
        let body = r.body_mut().with_config().limit(64 << 10).read_to_string().unwrap_or_default();
        let (code, message) = error_code(&body);
        let (code, message) = (self.printable(&code), self.printable(&message));
        Err(match (status, code.as_str()) {
            (404, "NoSuchBucket") => {
                S3Error::NoSuchBucket { bucket: self.url.bucket.clone(), endpoint: self.endpoint.clone() }
            }
            (403, _)
            | (400, "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "AuthorizationHeaderMalformed") => {
                S3Error::Refused {
                    bucket: self.url.to_string(),
                    source_name: self
                        .creds
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_ref()
                        .map_or_else(|| "nowhere (anonymous)".into(), |c| c.source.clone()),
                    code: if code.is_empty() { status.to_string() } else { code },
                    message,
                }
            }
            _ => S3Error::Status { what: what(), status, code, message },
        })
    }

    /// Reads a whole text body of at most `limit` bytes; one that breaks off or stalls is
    /// worth another try.
    fn body_text(r: Response, limit: u64) -> Result<String, BodyError> {
        let bytes = Self::body_bytes(r, limit)?;
        String::from_utf8(bytes).map_err(|_| BodyError::Retry("the answer is not UTF-8".into()))
    }

    /// Reads a whole body of at most `limit` bytes, checked against its Content-Length.
    fn body_bytes(r: Response, limit: u64) -> Result<Vec<u8>, BodyError> {
        let declared = r.body().content_length();
        let mut out = Vec::new();
        r.into_body()
            .into_with_config()
            .limit(limit)
            .reader()
            .read_to_end(&mut out)
            .map_err(|e| BodyError::Retry(format!("the answer broke off: {e}")))?;
        if declared.is_some_and(|d| d != out.len() as u64) {
            return Err(BodyError::Retry(format!(
                "the answer ended after {} of its {} bytes",
                out.len(),
                declared.unwrap_or_default()
            )));
        }
        Ok(out)
    }

    /// Every object under `prefix` (a key prefix), with `direct` only those directly under it
    /// (delimiter `/`); `None` when that takes more than `max_pages` pages. Parsed strictly
    /// ([`answers::list_page`]), keys url-encoded by the server and decoded here, so a key with
    /// any character is listed as what it is.
    fn list_keys(
        &self,
        prefix: &str,
        direct: bool,
        max_pages: Option<usize>,
    ) -> Result<Option<Vec<Meta>>, S3Error> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        let mut pages = 0;
        loop {
            if max_pages.is_some_and(|m| pages >= m) {
                return Ok(None);
            }
            pages += 1;
            let what = || format!("listing {}/{prefix}", self.url.bucket);
            let mut query = vec![("list-type", "2"), ("prefix", prefix), ("encoding-type", "url")];
            if direct {
                query.push(("delimiter", "/"));
            }
            if let Some(t) = &token {
                query.push(("continuation-token", t.as_str()));
            }
            let page =
                self.send_with("list", &what, Method::Get, None, &query, &[], Body::None, &[200], |r| {
                    let body = Self::body_text(r, 64 << 20)?;
                    answers::list_page(&body, prefix).map_err(BodyError::Retry)
                })?;
            for o in page.objects {
                let rel = self.rel(&o.key).to_owned();
                if rel.ends_with('/') {
                    continue;
                }
                out.push(Meta {
                    name: rel,
                    size: o.size,
                    modified: o.modified,
                    not_regular: None,
                    etag: o.etag,
                });
            }
            match page.next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Some(out))
    }

    /// What a HEAD of `rel` answers, never from a listing: `None` for a 404.
    fn head(&self, rel: &str) -> Result<Option<Meta>, S3Error> {
        let key = self.key(rel);
        let what = || format!("looking up {}", self.url_of(rel));
        let r = self.send("head", &what, Method::Head, Some(&key), &[], &[], Body::None, &[200, 404])?;
        if r.status().as_u16() == 404 {
            return Ok(None);
        }
        let header = |h: &str| r.headers().get(h).and_then(|v| v.to_str().ok());
        let bad = |reason: &str| S3Error::BadAnswer { what: what(), reason: reason.into() };
        Ok(Some(Meta {
            name: rel.to_owned(),
            size: header("content-length")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad("no Content-Length"))?,
            modified: header("last-modified").and_then(parse_time).ok_or_else(|| bad("no Last-Modified"))?,
            not_regular: None,
            etag: etag_of(&r),
        }))
    }

    fn put(&self, rel: &str, data: &[u8]) -> Result<(), S3Error> {
        let key = self.key(rel);
        let what = || format!("uploading {}", self.url_of(rel));
        let r = self.send(
            "put",
            &what,
            Method::Put,
            Some(&key),
            &[],
            &[("content-type", content_type(rel))],
            Body::Bytes(data),
            &[200],
        )?;
        let etag = etag_of(&r);
        if let (Some(copies), Some(etag)) = (self.copies_of(rel), &etag) {
            copies.put(&key, etag, data);
        }
        self.noted(rel, data.len() as u64, etag);
        Ok(())
    }

    /// Uploads the whole of `f` (`size` bytes) to `rel` in one PUT.
    fn put_file(&self, rel: &str, f: &File, size: u64) -> Result<(), S3Error> {
        let key = self.key(rel);
        let what = || format!("uploading {}", self.url_of(rel));
        let headers = [("content-type", content_type(rel))];
        let r = self.send("put", &what, Method::Put, Some(&key), &[], &headers, Body::File(f), &[200])?;
        self.noted(rel, size, etag_of(&r));
        Ok(())
    }

    /// What the listing says of `rel`: `None` when there is no listing or it did not cover
    /// `rel` (it covers the top level and `nar/`), else whether and what it is.
    fn listed(&self, rel: &str) -> Option<Option<Meta>> {
        let snapshot = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        snapshot.as_ref().filter(|_| listed_in(rel).is_some()).map(|s| s.get(rel).cloned())
    }

    /// Remembers that `rel` now exists, for lookups answered from the listing.
    fn noted(&self, rel: &str, size: u64, etag: Option<String>) {
        if let Some(s) = self.snapshot.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            s.insert(
                rel.to_owned(),
                Meta { name: rel.to_owned(), size, modified: SystemTime::now(), not_regular: None, etag },
            );
        }
    }

    /// The copies kept on this machine, when `rel` is a narinfo and they are kept.
    fn copies_of(&self, rel: &str) -> Option<&Copies> {
        self.copies.get().filter(|_| !rel.contains('/') && rel.ends_with(".narinfo"))
    }

    /// The copy of `rel` kept on this machine, if it is the object `listed` (same ETag and
    /// size) and at most `limit` bytes.
    fn copy_of(&self, rel: &str, listed: &Meta, limit: u64) -> Option<Vec<u8>> {
        let (copies, etag) = (self.copies_of(rel)?, listed.etag.as_ref()?);
        (listed.size <= limit).then(|| copies.get(&self.key(rel), etag, listed.size)).flatten()
    }

    fn delete(&self, rel: &str) -> Result<(), S3Error> {
        let key = self.key(rel);
        let what = || format!("deleting {}", self.url_of(rel));
        self.send("delete", &what, Method::Delete, Some(&key), &[], &[], Body::None, &[200, 204, 404])?;
        if let Some(copies) = self.copies_of(rel) {
            copies.forget(&key);
        }
        if let Some(s) = self.snapshot.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            s.remove(rel);
        }
        Ok(())
    }

    /// The cache error for a failed `action` on `rel`.
    fn cache_err<'a>(&'a self, action: &'static str, rel: &'a str) -> impl Fn(S3Error) -> StorageError + 'a {
        move |e| StorageError::Io { action, path: PathBuf::from(self.url_of(rel)), source: e.into_io() }
    }

    fn url_of(&self, rel: &str) -> String {
        format!("s3://{}/{}", self.url.bucket, self.key(rel))
    }

    /// Copies the object at `from` (a key) to `rel`, server-side.
    fn copy(&self, from: &str, rel: &str, size: u64) -> Result<(), S3Error> {
        let key = self.key(rel);
        let source = format!("/{}/{}", self.url.bucket, url_encode_path(from));
        let what = || format!("copying an upload to {}", self.url_of(rel));
        let limit =
            std::env::var("NIXCACHE_S3_COPY_LIMIT").ok().and_then(|v| v.parse().ok()).unwrap_or(COPY_LIMIT);
        if size <= limit {
            let headers = [
                ("content-type", content_type(rel)),
                ("x-amz-copy-source", source.as_str()),
                ("x-amz-metadata-directive", "REPLACE"),
            ];
            // A copy can fail after its 200 has been sent: the error is in the body, and an
            // answer without its CopyObjectResult is no copy. Copying again is harmless.
            self.send_with("copy", &what, Method::Put, Some(&key), &[], &headers, Body::None, &[200], |r| {
                let body = Self::body_text(r, 1 << 20)?;
                if body.contains("<Error>") {
                    let (code, message) = error_code(&body);
                    return Err(BodyError::Retry(format!("{}: {}", code, self.printable(&message))));
                }
                if !body.contains("<CopyObjectResult") {
                    return Err(BodyError::Retry("the answer has no CopyObjectResult".into()));
                }
                Ok(())
            })?;
        } else {
            let part = limit.max(size.div_ceil(9000));
            let id = self.create_multipart(rel, &key)?;
            let copied = (|| {
                let mut etags = Vec::new();
                for (n, start) in (0..size).step_by(part as usize).enumerate() {
                    let end = (start + part).min(size) - 1;
                    let range = format!("bytes={start}-{end}");
                    let number = (n + 1).to_string();
                    let headers =
                        [("x-amz-copy-source", source.as_str()), ("x-amz-copy-source-range", range.as_str())];
                    let query = [("partNumber", number.as_str()), ("uploadId", id.as_str())];
                    let etag = self.send_with(
                        "copy-part",
                        &what,
                        Method::Put,
                        Some(&key),
                        &query,
                        &headers,
                        Body::None,
                        &[200],
                        |r| {
                            let body = Self::body_text(r, 1 << 20)?;
                            let etag = xml_values(&body, "ETag").first().map(|e| answers::xml_unescape(e));
                            match etag {
                                Some(Ok(e)) if body.contains("<CopyPartResult") => Ok(e),
                                _ => Err(BodyError::Retry(
                                    "no CopyPartResult with an ETag in the answer".into(),
                                )),
                            }
                        },
                    )?;
                    etags.push(etag);
                }
                self.complete_multipart(rel, &key, &id, &etags)
            })();
            if copied.is_err() {
                let _ = self.abort_multipart(&key, &id);
            }
            copied?;
        }
        // Acknowledged is not done: the object must be there, whole.
        let etag = match self.head(rel)? {
            Some(m) if m.size == size => m.etag,
            found => {
                return Err(S3Error::BadAnswer {
                    what: what(),
                    reason: match found {
                        Some(m) => format!("the copy is {} bytes, not {size}", m.size),
                        None => "the server acknowledged the copy but does not have it".into(),
                    },
                });
            }
        };
        self.noted(rel, size, etag);
        Ok(())
    }

    fn create_multipart(&self, rel: &str, key: &str) -> Result<String, S3Error> {
        let what = || format!("starting an upload to {}", self.url_of(rel));
        self.send_with(
            "create-multipart",
            &what,
            Method::Post,
            Some(key),
            &[("uploads", "")],
            &[("content-type", content_type(rel))],
            Body::None,
            &[200],
            |r| {
                let body = Self::body_text(r, 1 << 20)?;
                match xml_values(&body, "UploadId").first().map(|u| answers::xml_unescape(u)) {
                    Some(Ok(id)) if !id.is_empty() => Ok(id),
                    _ => Err(BodyError::Retry("no UploadId in the answer".into())),
                }
            },
        )
    }

    fn upload_part(&self, key: &str, id: &str, n: usize, data: &[u8]) -> Result<String, S3Error> {
        let number = n.to_string();
        let what = || format!("uploading part {n} of s3://{}/{key}", self.url.bucket);
        let query = [("partNumber", number.as_str()), ("uploadId", id)];
        let r =
            self.send("upload-part", &what, Method::Put, Some(key), &query, &[], Body::Bytes(data), &[200])?;
        r.headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| S3Error::BadAnswer { what: what(), reason: "no ETag".into() })
    }

    fn complete_multipart(&self, rel: &str, key: &str, id: &str, etags: &[String]) -> Result<(), S3Error> {
        let what = || format!("completing the upload to {}", self.url_of(rel));
        let mut body = String::from("<CompleteMultipartUpload>");
        for (n, etag) in etags.iter().enumerate() {
            let etag = etag.replace('&', "&amp;").replace('"', "&quot;");
            body.push_str(&format!("<Part><PartNumber>{}</PartNumber><ETag>{etag}</ETag></Part>", n + 1));
        }
        body.push_str("</CompleteMultipartUpload>");
        self.send_with(
            "complete-multipart",
            &what,
            Method::Post,
            Some(key),
            &[("uploadId", id)],
            &[],
            Body::Bytes(body.as_bytes()),
            &[200],
            |r| {
                let answer = Self::body_text(r, 1 << 20)?;
                if answer.contains("<Error>") {
                    let (code, message) = error_code(&answer);
                    let message = self.printable(&message);
                    return Err(BodyError::Fail(S3Error::Status {
                        what: what(),
                        status: 200,
                        code,
                        message,
                    }));
                }
                if !answer.contains("<CompleteMultipartUploadResult") {
                    return Err(BodyError::Retry("no CompleteMultipartUploadResult in the answer".into()));
                }
                Ok(())
            },
        )
    }

    fn abort_multipart(&self, key: &str, id: &str) -> Result<(), S3Error> {
        let what = || format!("aborting the upload to s3://{}/{key}", self.url.bucket);
        self.send(
            "abort-multipart",
            &what,
            Method::Delete,
            Some(key),
            &[("uploadId", id)],
            &[],
            Body::None,
            &[200, 204, 404],
        )
        .map(drop)
    }
}

fn url_encode_path(key: &str) -> String {
    let mut out = String::new();
    for b in key.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A transport error in words, without the URL (a signed URL carries a session token).
fn transport(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Io(io) => io.to_string(),
        ureq::Error::ConnectionFailed => "the connection failed".into(),
        ureq::Error::HostNotFound => "the host was not found".into(),
        ureq::Error::Timeout(t) => format!("timed out ({t})"),
        ureq::Error::Tls(t) => format!("TLS: {t}"),
        ureq::Error::BodyExceedsLimit(n) => format!("the answer is longer than {n} bytes"),
        ureq::Error::StatusCode(s) => format!("status {s}"),
        _ => "the request failed".into(),
    }
}

/// A cache in a bucket.
pub struct S3Backend {
    client: Arc<Client>,
}

/// 128 random bits, in hex: a name no other run picks.
fn random_id() -> Result<String, S3Error> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)
        .map_err(|e| S3Error::BadAnswer { what: "drawing random bits".into(), reason: e.to_string() })?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// `<dir>/<ms since the epoch, 13 digits>-<random id>`: the name of a push record (which adds
/// `-<n>`) or a gc's marker, unique without coordination and sorted by when it was written.
fn stamped_name(dir: &str) -> Result<String, S3Error> {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Ok(format!("{dir}/{:013}-{}", now.as_millis(), random_id()?))
}

/// Whether `rel` is a temporary name a nixcache run gives: directly under the cache (or its
/// `nar/` or `debuginfo/`), [`TEMP_PREFIX`] and then only name characters. Nothing else is
/// ever aborted or removed as a leftover: not another program's upload, not another cache's
/// under a longer prefix.
pub fn is_own_temp(rel: &str) -> bool {
    let name = match rel.split_once('/') {
        None => rel,
        Some((sub, name)) if (sub == "nar" || sub == "debuginfo") && !name.contains('/') => name,
        Some(_) => return false,
    };
    name.strip_prefix(TEMP_PREFIX)
        .is_some_and(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)))
}

/// Whether `name` (under `.nixcache/pushes/`) is a push record's name: milliseconds, a dash,
/// then a run's id.
fn is_record_name(name: &str) -> bool {
    name.split_once('-').is_some_and(|(ms, id)| {
        ms.len() == 13
            && ms.bytes().all(|b| b.is_ascii_digit())
            && !id.is_empty()
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    })
}

impl S3Backend {
    /// Opens the bucket: finds credentials (anonymous if `anonymous_ok` and none are found)
    /// and checks that the bucket answers.
    pub fn connect(url: &BucketUrl, anonymous_ok: bool) -> Result<S3Backend, StorageError> {
        let creds = match credentials::find(url.profile.as_deref()) {
            Ok(c) => Some(c),
            Err(_) if anonymous_ok => None,
            Err(e) => return Err(e.into()),
        };
        Self::connect_as(url, creds, true)
    }

    /// Opens the bucket with the given key and secret (for a program that has them from
    /// elsewhere than the environment).
    pub fn connect_with(url: &BucketUrl, key: &str, secret: &str) -> Result<S3Backend, StorageError> {
        let creds = Creds::lasting(rusty_s3::Credentials::new(key, secret), "the caller");
        Self::connect_as(url, Some(creds), false)
    }

    fn connect_as(
        url: &BucketUrl,
        creds: Option<Creds>,
        refreshable: bool,
    ) -> Result<S3Backend, StorageError> {
        let aws = url.endpoint.is_none();
        let typed =
            url.endpoint.clone().unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", url.region));
        // Said in messages without any user:password written into it.
        let endpoint = redact_url(&typed);
        let bad = |reason: String| S3Error::BadEndpoint { endpoint: endpoint.clone(), reason };
        let parsed: Url = typed.parse().map_err(|e: url::ParseError| bad(e.to_string()))?;
        let style = match url.addressing {
            Addressing::Path => UrlStyle::Path,
            Addressing::Virtual => UrlStyle::VirtualHost,
            Addressing::Auto if aws => UrlStyle::VirtualHost,
            Addressing::Auto => UrlStyle::Path,
        };
        let bucket = Bucket::new(parsed, style, url.bucket.clone(), url.region.clone())
            .map_err(|e| bad(format!("{e:?}")))?;
        let agent = ureq::Agent::new_with_config(
            ureq::config::Config::builder()
                .http_status_as_error(false)
                .timeout_connect(Some(Duration::from_secs(10)))
                .timeout_recv_response(Some(Duration::from_secs(120)))
                // A server that stops sending, headers or body, with the connection open.
                .timeout_per_read(Some(read_timeout()))
                .timeout_per_write(Some(read_timeout()))
                .max_idle_connections_per_host(64)
                .user_agent(concat!("nixcache/", env!("CARGO_PKG_VERSION")))
                .build(),
        );
        let client = Client {
            agent,
            bucket,
            creds: RwLock::new(creds.map(Arc::new)),
            refreshable,
            refreshing: Mutex::new(()),
            prefix: if url.prefix.is_empty() { String::new() } else { format!("{}/", url.prefix) },
            endpoint,
            url: url.clone(),
            counts: Mutex::new(HashMap::new()),
            slots: Slots { free: Mutex::new(url.uploads.max(1)), changed: Condvar::new() },
            snapshot: Mutex::new(None),
            copies: OnceLock::new(),
        };
        // One small listing: the endpoint answers, the bucket exists, the credentials work.
        let what = || format!("opening {}", client.url);
        client.send(
            "list",
            &what,
            Method::Get,
            None,
            &[("list-type", "2"), ("max-keys", "1"), ("prefix", &client.prefix)],
            &[],
            Body::None,
            &[200],
        )?;
        Ok(S3Backend { client: Arc::new(client) })
    }

    /// The listing lookups are answered from: the top level (or `top`, as the caller listed
    /// it) and `nar/`. A listing page names up to 1000 objects; without one, each path costs
    /// a request or two. It lists when that takes fewer requests than the paths.
    fn lookups_listing(&self, paths: usize, top: Option<Vec<Meta>>) -> Result<Option<String>, StorageError> {
        let c = &self.client;
        // Whatever was listed before is forgotten: the answers are asked for again.
        *c.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let budget = paths.max(1);
        // The two listings at once: each is a chain of pages, one request after another.
        let nar_dir = c.key("nar/");
        let (top, nars) = std::thread::scope(|scope| {
            let nars = scope.spawn(|| c.list_keys(&nar_dir, true, Some(budget)));
            let top = match top {
                Some(top) => Ok(Some(top)),
                None => c.list_keys(&c.prefix, true, Some(budget)),
            };
            (top, nars.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
        });
        let (Some(top), Some(nars)) =
            (top.map_err(self.io("list", ""))?, nars.map_err(self.io("list", "nar"))?)
        else {
            return Ok(Some(format!(
                "looking up each of the {paths} paths (the bucket is too large to list for this push)"
            )));
        };
        let n = top.len() + nars.len();
        let map = top.into_iter().chain(nars).map(|m| (m.name.clone(), m)).collect();
        *c.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = Some(map);
        Ok(Some(format!("listed the bucket once ({n} objects)")))
    }

    /// GETs `rel` if it is at most `limit` bytes, keeping a copy of a narinfo.
    fn download(&self, rel: &str, limit: u64) -> Result<Option<Vec<u8>>, FileProblem> {
        let key = self.client.key(rel);
        let copies = self.client.copies_of(rel);
        let what = || format!("downloading {}", self.client.url_of(rel));
        // The whole body in the try, retried like the request: a read cut short is no file.
        let got = self
            .client
            .send_with("get", &what, Method::Get, Some(&key), &[], &[], Body::None, &[200, 404], |r| {
                if r.status().as_u16() == 404 {
                    return Ok(None);
                }
                if let Some(size) = r.body().content_length().filter(|&n| n > limit) {
                    return Ok(Some(Err(FileProblem::TooLarge { size, limit })));
                }
                let etag = etag_of(&r);
                match Client::body_bytes(r, limit + 1)? {
                    b if b.len() as u64 > limit => {
                        Ok(Some(Err(FileProblem::TooLarge { size: b.len() as u64, limit })))
                    }
                    b => Ok(Some(Ok((b, etag)))),
                }
            })
            .map_err(|e| FileProblem::Io(e.into_io()))?
            .transpose()?;
        Ok(got.map(|(body, etag)| {
            if let (Some(copies), Some(etag)) = (copies, etag) {
                copies.put(&key, &etag, &body);
            }
            body
        }))
    }

    fn io<'a>(&'a self, action: &'static str, rel: &'a str) -> impl Fn(S3Error) -> StorageError + 'a {
        self.client.cache_err(action, rel)
    }
}

impl Backend for S3Backend {
    fn describe(&self) -> String {
        self.client.url.to_string()
    }

    fn locate(&self, rel: &str) -> PathBuf {
        PathBuf::from(self.client.url_of(rel))
    }

    fn bad_dirs(&self) -> Vec<(&'static str, &'static str)> {
        Vec::new()
    }

    fn create_subdir(&self, _: &'static str) -> Result<(), StorageError> {
        Ok(())
    }

    fn lock(
        &mut self,
        _: bool,
        _: Option<std::time::Duration>,
        _: &mut dyn FnMut(Option<&str>),
    ) -> Result<(), StorageError> {
        Ok(())
    }

    fn exclusive(&self) -> bool {
        false
    }

    fn commits_at_once(&self) -> usize {
        self.client.url.uploads.max(1)
    }

    fn list(&self, sub: &str) -> Result<Vec<Meta>, StorageError> {
        let prefix =
            if sub.is_empty() { self.client.prefix.clone() } else { self.client.key(&format!("{sub}/")) };
        let found = self.client.list_keys(&prefix, true, None).map_err(self.io("list", sub))?;
        Ok(found.unwrap_or_default())
    }

    fn stat(&self, rel: &str) -> Result<Option<Meta>, FileProblem> {
        if let Some(known) = self.client.listed(rel) {
            return Ok(known);
        }
        self.stat_fresh(rel)
    }

    fn stat_fresh(&self, rel: &str) -> Result<Option<Meta>, FileProblem> {
        self.client.head(rel).map_err(|e| FileProblem::Io(e.into_io()))
    }

    fn read_listed(&self, rel: &str, listed: &Meta, limit: u64) -> Result<Option<Vec<u8>>, FileProblem> {
        match self.client.copy_of(rel, listed, limit) {
            Some(body) => Ok(Some(body)),
            None => self.read(rel, limit),
        }
    }

    fn read(&self, rel: &str, limit: u64) -> Result<Option<Vec<u8>>, FileProblem> {
        match self.client.listed(rel) {
            Some(None) => Ok(None),
            // The copy when it is unchanged since it was made, as this run's listing says.
            Some(Some(listed)) => match self.client.copy_of(rel, &listed, limit) {
                Some(body) => Ok(Some(body)),
                None => self.download(rel, limit),
            },
            None => self.download(rel, limit),
        }
    }

    fn open(&self, rel: &str) -> Result<Option<(Reader, u64)>, FileProblem> {
        if let Some(None) = self.client.listed(rel) {
            return Ok(None);
        }
        let key = self.client.key(rel);
        let what = || format!("downloading {}", self.client.url_of(rel));
        let r = self
            .client
            .send("get", &what, Method::Get, Some(&key), &[], &[], Body::None, &[200, 404])
            .map_err(|e| FileProblem::Io(e.into_io()))?;
        if r.status().as_u16() == 404 {
            return Ok(None);
        }
        let size = r.body().content_length().unwrap_or(0);
        Ok(Some((Box::new(r.into_body().into_reader()), size)))
    }

    fn create(&self, sub: &str, suffix: &str) -> Result<Box<dyn NewFile>, StorageError> {
        // Unique across processes and machines: two pushes never share an upload's key.
        let tmp =
            format!("{sub}/{TEMP_PREFIX}{}{suffix}", random_id().map_err(self.io("name an upload in", sub))?);
        Ok(Box::new(Upload {
            client: self.client.clone(),
            tmp_rel: tmp.trim_start_matches('/').to_owned(),
            buf: Vec::new(),
            spool: None,
            spooled: 0,
            spool_limit: spool_limit(),
            id: None,
            etags: Vec::new(),
            inflight: None,
            size: 0,
            failed: None,
        }))
    }

    fn stage(&self, rel: &str, data: &[u8], _: Option<SystemTime>) -> Result<Staged, StorageError> {
        let (client, rel_owned, data) = (self.client.clone(), rel.to_owned(), data.to_vec());
        Ok(Staged::new(rel, None, move || {
            client.put(&rel_owned, &data).map_err(client.cache_err("write", &rel_owned))
        }))
    }

    fn sync(&self, _: &[&Staged]) -> Result<(), StorageError> {
        // An object is durable once the server has answered.
        Ok(())
    }

    fn sync_dir(&self, _: &str) -> Result<(), StorageError> {
        Ok(())
    }

    fn touch(&self, _: &str) -> Result<(), StorageError> {
        // The push record, written before the push looked, names it.
        Ok(())
    }

    fn remove(&self, rel: &str) -> Result<(), StorageError> {
        self.client.delete(rel).map_err(self.io("remove", rel))
    }

    fn scratch(&self) -> Result<File, StorageError> {
        let dir = std::env::temp_dir();
        tempfile::tempfile_in(&dir).map_err(|source| StorageError::Io {
            action: "create a scratch file in",
            path: dir,
            source,
        })
    }

    fn leftovers(&self) -> Result<Vec<Leftover>, StorageError> {
        let mut found = Vec::new();
        for sub in ["", "nar", "debuginfo"] {
            for m in self.list_once(sub)? {
                if is_own_temp(&m.name) {
                    found.push(Leftover {
                        name: m.name,
                        size: m.size,
                        modified: m.modified,
                        upload_id: None,
                    });
                }
            }
        }
        let c = &self.client;
        let what = || format!("listing the incomplete uploads of {}", c.url);
        let mut marker: Option<(String, String)> = None;
        loop {
            // The prefix with its slash: not the uploads of a cache whose prefix merely starts
            // with ours.
            let mut query = vec![("uploads", ""), ("prefix", c.prefix.as_str()), ("encoding-type", "url")];
            if let Some((k, u)) = &marker {
                query.push(("key-marker", k.as_str()));
                query.push(("upload-id-marker", u.as_str()));
            }
            let page = c
                .send_with("list-uploads", &what, Method::Get, None, &query, &[], Body::None, &[200], |r| {
                    let body = Client::body_text(r, 64 << 20)?;
                    answers::upload_page(&body, &c.prefix).map_err(BodyError::Retry)
                })
                .map_err(self.io("list the uploads of", ""))?;
            for u in page.uploads {
                let rel = c.rel(&u.key);
                if !is_own_temp(rel) {
                    continue;
                }
                found.push(Leftover {
                    name: format!("{rel} (incomplete upload)"),
                    size: 0,
                    modified: u.initiated,
                    upload_id: Some(u.id),
                });
            }
            match page.next {
                Some(next) => marker = Some(next),
                None => break,
            }
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    fn remove_leftover(&self, l: &Leftover) -> Result<(), StorageError> {
        match &l.upload_id {
            Some(id) => {
                let rel = l.name.trim_end_matches(" (incomplete upload)");
                let key = self.client.key(rel);
                self.client.abort_multipart(&key, id).map_err(self.io("abort the upload to", rel))
            }
            None => self.remove(&l.name),
        }
    }

    fn record_push(&self, hash_parts: &[&str]) -> Result<Option<String>, StorageError> {
        let run = stamped_name(RECORDS).map_err(self.io("name the push record in", RECORDS))?;
        let mut first = None;
        // A record holds at most RECORD_PATHS: a larger closure writes several.
        for (n, chunk) in hash_parts.chunks(RECORD_PATHS).enumerate() {
            let name = format!("{run}-{n}");
            let mut body = String::with_capacity(chunk.len() * 33);
            for h in chunk {
                body.push_str(h);
                body.push('\n');
            }
            self.client.put(&name, body.as_bytes()).map_err(self.io("write the push record", &name))?;
            first.get_or_insert(name);
        }
        Ok(first)
    }

    fn push_records(
        &self,
        skip: &dyn Fn(&str) -> bool,
        each: &mut dyn FnMut(&str, SystemTime),
    ) -> Result<Vec<Record>, StorageError> {
        let c = &self.client;
        // Every key below, not only the direct ones: a misplaced object is found (and goes with
        // the window) instead of lying there forever.
        let dir = c.key(&format!("{RECORDS}/"));
        let listed = c.list_keys(&dir, false, None).map_err(self.io("list", RECORDS))?.unwrap_or_default();
        let mut out = Vec::new();
        for m in listed {
            let name = m.name.strip_prefix(&format!("{RECORDS}/")).unwrap_or(&m.name);
            let problem = if skip(&m.name) {
                None
            } else if !is_record_name(name) {
                Some("is not a push record's name (nixcache writes .nixcache/pushes/<ms>-<id>)".to_owned())
            } else {
                match self.read(&m.name, RECORD_LIMIT) {
                    // Gone since the listing: another gc removed it.
                    Ok(None) => continue,
                    Ok(Some(bytes)) => parse_record(&bytes, |h| each(h, m.modified)).err(),
                    Err(e) if e.is_established() => Some(e.to_string()),
                    // Not read: what it names is unknown, so nothing may be concluded.
                    Err(source) => return Err(StorageError::BadFile { path: self.locate(&m.name), source }),
                }
            };
            out.push(Record { name: m.name, modified: m.modified, problem });
        }
        Ok(out)
    }

    fn start_deleting(&self) -> Result<Option<String>, StorageError> {
        let name = stamped_name(GC_MARKERS).map_err(self.io("name the gc marker in", GC_MARKERS))?;
        let body = b"a nixcache gc is deleting; pushes check their closure at the end while this is here\n";
        self.client.put(&name, body).map_err(self.io("write the gc marker", &name))?;
        Ok(Some(name))
    }

    fn done_deleting(&self, marker: &str) -> Result<(), StorageError> {
        self.remove(marker)
    }

    fn deleting(&self) -> Result<Vec<Meta>, StorageError> {
        let dir = self.client.key(&format!("{GC_MARKERS}/"));
        let listed = self.client.list_keys(&dir, false, None).map_err(self.io("list", GC_MARKERS))?;
        Ok(listed.unwrap_or_default())
    }

    fn prepare_lookups(&self, paths: usize) -> Result<Option<String>, StorageError> {
        self.lookups_listing(paths, None)
    }

    fn prepare_lookups_after(&self, paths: usize, top: Vec<Meta>) -> Result<Option<String>, StorageError> {
        self.lookups_listing(paths, Some(top))
    }

    fn listed_once(&self, sub: &str) -> Option<Vec<Meta>> {
        if !["", "nar"].contains(&sub) {
            return None;
        }
        let snapshot = self.client.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        let in_sub = |m: &&Meta| listed_in(&m.name) == Some(sub);
        let mut listed: Vec<Meta> = snapshot.as_ref()?.values().filter(in_sub).cloned().collect();
        listed.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        Some(listed)
    }

    fn requests(&self) -> HashMap<&'static str, Requests> {
        self.client.counts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn keep_copies(&self, dir: &Path) -> Result<(), CopiesError> {
        let c = &self.client;
        if c.copies.get().is_none() {
            let _ = c.copies.set(Copies::open(dir, &c.endpoint, &c.url.bucket)?);
        }
        Ok(())
    }

    fn copies_used(&self) -> Option<(PathBuf, u64)> {
        self.client.copies.get().map(|c| (c.file().to_owned(), c.used()))
    }
}

/// The directory of `rel` that a lookups' listing covers (the top level, `""`, or `"nar"`),
/// if it is one of those.
fn listed_in(rel: &str) -> Option<&'static str> {
    match rel.split_once('/') {
        None => Some(""),
        Some(("nar", n)) if !n.contains('/') => Some("nar"),
        _ => None,
    }
}

/// The ETag an answer gives, if any.
fn etag_of(r: &Response) -> Option<String> {
    r.headers().get("etag").and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// Hands each hash part of a push record to `each`; the first line that is not one is the
/// error (what came before it was handed on: a record is only ever more generous).
fn parse_record(bytes: &[u8], mut each: impl FnMut(&str)) -> Result<(), String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "is not text".to_owned())?;
    for (n, line) in text.lines().enumerate() {
        if line.len() != crate::store_path::HASH_LEN || crate::nixbase32::decode::<20>(line).is_err() {
            return Err(format!("line {} is not a store path's hash part", n + 1));
        }
        each(line);
    }
    Ok(())
}

/// A NAR going up. Up to [`PART_SIZE`] it is held in memory and goes up in one PUT; up to
/// the spool limit it is held in a temporary file as well and goes up in one PUT, the file's
/// whole contents; beyond that it goes up as a multipart upload to a temporary key, parts of
/// [`PART_SIZE`] (growing), each on a thread of its own while the next fills, and is copied
/// to its name.
struct Upload {
    client: Arc<Client>,
    /// The temporary name a multipart upload goes to.
    tmp_rel: String,
    buf: Vec<u8>,
    /// The full parts written so far, while no multipart upload has started.
    spool: Option<File>,
    /// How many bytes of `spool` were written whole (a failed write leaves more).
    spooled: u64,
    spool_limit: u64,
    id: Option<String>,
    etags: Vec<String>,
    inflight: Option<JoinHandle<Result<String, S3Error>>>,
    size: u64,
    /// A part failed: every later write fails with it.
    failed: Option<String>,
}

impl Upload {
    fn part_size(&self) -> usize {
        PART_SIZE << (self.etags.len() / 1000).min(9)
    }

    fn wait_inflight(&mut self) -> Result<(), S3Error> {
        if let Some(h) = self.inflight.take() {
            let etag = h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))?;
            self.etags.push(etag);
        }
        Ok(())
    }

    /// The buffer is a full part: into the spool while the NAR is within its limit (and the
    /// spool can be written), else up as the next part.
    fn full_part(&mut self) -> Result<(), S3Error> {
        if self.id.is_none() && self.spool_part() {
            return Ok(());
        }
        self.send_part()
    }

    /// Appends the buffer to the spool, made on first use; false when the NAR is beyond the
    /// limit or the spool cannot be written (then it is given up for this NAR: what it holds
    /// past `spooled` is not to be trusted).
    fn spool_part(&mut self) -> bool {
        if self.size > self.spool_limit {
            return false;
        }
        if self.spool.is_none() {
            // No temporary file is no failure: the NAR goes up in parts instead.
            self.spool = tempfile::tempfile_in(std::env::temp_dir()).ok();
        }
        let Some(f) = self.spool.as_mut() else { return false };
        if f.write_all(&self.buf).is_err() {
            self.spool_limit = 0;
            return false;
        }
        self.spooled += self.buf.len() as u64;
        self.buf.clear();
        true
    }

    /// Sends the buffer as the next part, on its own thread; the spool's parts go first.
    fn send_part(&mut self) -> Result<(), S3Error> {
        let key = self.client.key(&self.tmp_rel);
        if self.id.is_none() {
            self.id = Some(self.client.create_multipart(&self.tmp_rel, &key)?);
        }
        if let Some(mut f) = self.spool.take() {
            let pending = std::mem::take(&mut self.buf);
            f.seek(io::SeekFrom::Start(0)).map_err(S3Error::Spool)?;
            let mut spooled = (&f).take(std::mem::take(&mut self.spooled));
            loop {
                let mut part = Vec::with_capacity(self.part_size());
                (&mut spooled)
                    .take(self.part_size() as u64)
                    .read_to_end(&mut part)
                    .map_err(S3Error::Spool)?;
                if part.is_empty() {
                    break;
                }
                self.buf = part;
                self.send_one()?;
            }
            self.buf = pending;
        }
        self.send_one()
    }

    fn send_one(&mut self) -> Result<(), S3Error> {
        let key = self.client.key(&self.tmp_rel);
        self.wait_inflight()?;
        let data = std::mem::take(&mut self.buf);
        let id = self.id.clone().expect("started");
        let n = self.etags.len() + 1;
        self.inflight = Some(self.client.in_slot(move |c| c.upload_part(&key, &id, n, &data)));
        Ok(())
    }
}

impl Write for Upload {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(f) = &self.failed {
            return Err(io::Error::other(f.clone()));
        }
        let room = self.part_size() - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        self.size += n as u64;
        if self.buf.len() == self.part_size()
            && let Err(e) = self.full_part()
        {
            self.failed = Some(e.to_string());
            return Err(e.into_io());
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl NewFile for Upload {
    fn stage(mut self: Box<Self>, dest: &str) -> Result<Staged, StorageError> {
        let client = self.client.clone();
        // One PUT: on a thread of its own (one of the upload slots), so that the pusher
        // goes on with the next path; committing waits for it, before any narinfo names it.
        let whole = if self.id.is_some() {
            None
        } else if self.spool.is_none() {
            Some(Whole::Memory(std::mem::take(&mut self.buf)))
        } else if self.spool_part() {
            Some(Whole::Spooled(self.spool.take().expect("spooled")))
        } else {
            None
        };
        if let Some(whole) = whole {
            let (rel, size) = (dest.to_owned(), self.size);
            let put = client.in_slot(move |c| match &whole {
                Whole::Memory(buf) => c.put(&rel, buf),
                Whole::Spooled(f) => c.put_file(&rel, f, size),
            });
            let rel = dest.to_owned();
            return Ok(Staged::new(dest, None, move || {
                let r = put.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
                r.map_err(client.cache_err("upload", &rel))
            }));
        }
        let io = client.cache_err("upload", dest);
        if !self.buf.is_empty() || self.spool.is_some() {
            self.send_part().map_err(&io)?;
        }
        self.wait_inflight().map_err(&io)?;
        let key = self.client.key(&self.tmp_rel);
        let id = self.id.clone().expect("started");
        self.client.complete_multipart(&self.tmp_rel, &key, &id, &self.etags).map_err(&io)?;
        // Complete: nothing to abort any more; the temporary object goes after the copy.
        self.id = None;
        let copied = self.client.copy(&key, dest, self.size);
        let _ = self.client.delete(&self.tmp_rel);
        copied.map_err(&io)?;
        Ok(Staged::new(dest, None, || Ok(())))
    }
}

/// A NAR that goes up in one PUT.
enum Whole {
    Memory(Vec<u8>),
    /// The whole of the file.
    Spooled(File),
}

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = self.inflight.take().map(JoinHandle::join);
        if let Some(id) = self.id.take() {
            let _ = self.client.abort_multipart(&self.client.key(&self.tmp_rel), &id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lookups_listing_covers_the_top_level_and_nar() {
        assert_eq!(listed_in("abc.narinfo"), Some(""));
        assert_eq!(listed_in("nar/x.nar.xz"), Some("nar"));
        assert_eq!(listed_in("nar/a/b"), None);
        assert_eq!(listed_in("debuginfo/x"), None);
        assert_eq!(listed_in(".nixcache/pushes/x"), None);
    }

    #[test]
    fn bucket_urls() {
        let u: BucketUrl = "s3://b/some/prefix/?endpoint=http://127.0.0.1:9000&region=eu-1".parse().unwrap();
        assert_eq!((u.bucket.as_str(), u.prefix.as_str()), ("b", "some/prefix"));
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(u.region, "eu-1");
        assert_eq!(u.to_string(), "s3://b/some/prefix");
        let bare: BucketUrl =
            "s3://b?endpoint=minio.local:9000&scheme=http&addressing-style=path".parse().unwrap();
        assert_eq!(bare.endpoint.as_deref(), Some("http://minio.local:9000"));
        assert_eq!(
            (bare.prefix.as_str(), bare.addressing, bare.region.as_str()),
            ("", Addressing::Path, "us-east-1")
        );
        assert!("s3://b?compression=zstd".parse::<BucketUrl>().unwrap_err().contains("--compression"));
        assert!("s3:///x".parse::<BucketUrl>().is_err());
        assert!("s3://b/../x".parse::<BucketUrl>().is_err());
        assert!("s3://b?addressing-style=odd".parse::<BucketUrl>().is_err());
        let enc: BucketUrl = "s3://b?endpoint=http%3A%2F%2Fh%3A1".parse().unwrap();
        assert_eq!(enc.endpoint.as_deref(), Some("http://h:1"));
    }

    #[test]
    fn content_types_are_nix_s() {
        assert_eq!(content_type("nix-cache-info"), "text/x-nix-cache-info");
        assert_eq!(content_type("abc.narinfo"), "text/x-nix-narinfo");
        assert_eq!(content_type("nar/x.nar.xz"), "application/x-nix-nar");
        assert_eq!(content_type("abc.ls"), "application/json");
        assert_eq!(content_type("debuginfo/ab"), "application/json");
    }

    #[test]
    fn own_names() {
        for own in ["nar/.nixcache-tmp-0123abcd.nar.xz", ".nixcache-tmp-1-2", "debuginfo/.nixcache-tmp-x"] {
            assert!(is_own_temp(own), "{own}");
        }
        for other in [
            "b/nar/.nixcache-tmp-1.nar.xz",
            "backup.tar",
            "nar/x.nar.xz",
            "log/.nixcache-tmp-1",
            "nar/.nixcache-tmp-",
            "nar/.nixcache-tmp-a b",
        ] {
            assert!(!is_own_temp(other), "{other}");
        }
        assert!(is_record_name("1764660000000-0123abcd-0") && is_record_name("1764660000000-123-4"));
        assert!(
            !is_record_name("x/1764660000000-1")
                && !is_record_name("176466-1")
                && !is_record_name("1764660000000-")
        );
        let h = "0123456789abcdfghijklmnpqrsvwxyz";
        let mut seen = Vec::new();
        assert!(parse_record(format!("{h}\n{h}\n").as_bytes(), |x| seen.push(x.to_owned())).is_ok());
        assert_eq!(seen.len(), 2);
        assert!(parse_record(b"not a hash\n", |_| {}).is_err());
        assert!(parse_record(&[0xff], |_| {}).is_err());
    }
}
