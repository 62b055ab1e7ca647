//! The client every request goes through: signing, retries, accounting, errors.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::{Instant, SystemTime};

use rusty_s3::{Bucket, Method};
use url::Url;

use super::answers::{error_code, printable};
use super::copies::Copies;
use super::credentials::{self, Creds};
use super::error::transport;
pub(super) use super::request::Response;
use super::request::{Request, with_body};
use super::tuning::Tuning;
use super::{BucketUrl, Meta, Requests, S3Error, StorageError};
use crate::retry::ATTEMPTS;

/// A counting semaphore: uploads in flight.
pub(super) struct Slots {
    pub(super) free: Mutex<usize>,
    pub(super) changed: Condvar,
}

impl Slots {
    pub(super) fn take(&self) {
        let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *f == 0 {
            f = self.changed.wait(f).unwrap_or_else(|e| e.into_inner());
        }
        *f -= 1;
    }

    pub(super) fn give(&self) {
        *self.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.changed.notify_one();
    }
}

/// What every request needs; shared with upload threads.
pub(super) struct Client {
    pub(super) agent: ureq::Agent,
    pub(super) bucket: Bucket,
    /// None: anonymous. Replaced when temporary ones are due ([`Client::creds`]).
    pub(super) creds: RwLock<Option<Arc<Creds>>>,
    /// Where the credentials came from can be asked again (found, not given by the caller).
    pub(super) refreshable: bool,
    /// One refresh at a time.
    pub(super) refreshing: Mutex<()>,
    /// The key prefix with a trailing slash, or empty.
    pub(super) prefix: String,
    pub(super) endpoint: String,
    pub(super) url: BucketUrl,
    /// Requests made and the time spent on them (their answers read), by kind.
    pub(super) counts: Mutex<HashMap<&'static str, Requests>>,
    pub(super) slots: Slots,
    /// Objects known to exist (name -> meta), from one listing, when lookups use it.
    pub(super) snapshot: Mutex<Option<HashMap<String, Meta>>>,
    /// Copies of narinfos kept on this machine, when the command keeps them.
    pub(super) copies: OnceLock<Copies>,
    pub(super) tuning: Tuning,
}

/// A request being timed: its time is added to its kind's when it ends.
pub(super) struct Timed<'c> {
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
pub(super) enum BodyError {
    /// The body broke off, stalled or was not what such an answer must be: try again.
    Retry(String),
    /// Final (the answer is complete and wrong, or too large).
    Fail(S3Error),
}

impl Client {
    pub(super) fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }

    pub(super) fn rel<'k>(&self, key: &'k str) -> &'k str {
        key.strip_prefix(self.prefix.as_str()).unwrap_or(key)
    }

    /// Counts a request of `kind` now and, when the guard is dropped, the time it took.
    pub(super) fn count(&self, kind: &'static str) -> Timed<'_> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).entry(kind).or_default().count += 1;
        Timed { client: self, kind, started: Instant::now() }
    }

    /// The credentials to sign with now: temporary ones are fetched again from where they
    /// came from once due ([`credentials::REFRESH_BEFORE`] their expiry). A failed refresh
    /// keeps the old ones (they may still work; the server says when not).
    pub(super) fn creds(&self) -> Option<Arc<Creds>> {
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
    pub(super) fn printable(&self, message: &str) -> String {
        let creds = self.creds.read().unwrap_or_else(|e| e.into_inner()).clone();
        let secrets: Vec<&str> = creds
            .as_deref()
            .map(|c| [c.creds.key(), c.creds.secret(), c.creds.token().unwrap_or_default()].to_vec())
            .unwrap_or_default();
        printable(message, &secrets)
    }

    /// A signed URL for `method` on `key` (None: the bucket), with `query` and the signed
    /// `headers` (lowercase names).
    pub(super) fn presign(
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

    /// Sends `req`, retrying transport errors, 5xx and 429 with backoff; a final status not
    /// in `req.ok` is an error that says what to do ([`Client::check`]). `what` names the
    /// request in errors.
    pub(super) fn send(&self, req: &Request<'_>, what: &dyn Fn() -> String) -> Result<Response, S3Error> {
        self.send_with(req, what, Ok)
    }

    /// [`Client::send`], and `read` the answer (status in `req.ok`) in the same try: a body
    /// that breaks off, stalls past the read timeout or is not what it must be
    /// ([`BodyError::Retry`]) is tried again like a failed request, and after the last try is
    /// an error, never a short answer.
    pub(super) fn send_with<T>(
        &self,
        req: &Request<'_>,
        what: &dyn Fn() -> String,
        read: impl Fn(Response) -> Result<T, BodyError>,
    ) -> Result<T, S3Error> {
        let (method, headers) = (req.op.method(), req.headers.as_slice());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let timed = self.count(req.op.as_str());
            let url = self.presign(method, req.key, &req.query, headers);
            let uri = url.as_str();
            let result = match method {
                Method::Get => self.agent.get(uri).call(),
                Method::Head => self.agent.head(uri).call(),
                Method::Delete => self.agent.delete(uri).call(),
                Method::Put => with_body(self.agent.put(uri), headers, req.body),
                Method::Post => with_body(self.agent.post(uri), headers, req.body),
            };
            let last = attempt >= ATTEMPTS;
            match result {
                Ok(r) if last || !crate::retry::retryable(r.status().as_u16()) => {
                    match read(self.check(what, r, req.ok)?) {
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
    pub(super) fn check(
        &self,
        what: &dyn Fn() -> String,
        mut r: Response,
        ok: &[u16],
    ) -> Result<Response, S3Error> {
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
    pub(super) fn body_text(r: Response, limit: u64) -> Result<String, BodyError> {
        let bytes = Self::body_bytes(r, limit)?;
        String::from_utf8(bytes).map_err(|_| BodyError::Retry("the answer is not UTF-8".into()))
    }

    /// Reads a whole body of at most `limit` bytes, checked against its Content-Length.
    pub(super) fn body_bytes(r: Response, limit: u64) -> Result<Vec<u8>, BodyError> {
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

    /// The cache error for a failed `action` on `rel`.
    pub(super) fn cache_err<'a>(
        &'a self,
        action: &'static str,
        rel: &'a str,
    ) -> impl Fn(S3Error) -> StorageError + 'a {
        move |e| StorageError::Io { action, path: PathBuf::from(self.url_of(rel)), source: e.into_io() }
    }

    pub(super) fn url_of(&self, rel: &str) -> String {
        format!("s3://{}/{}", self.url.bucket, self.key(rel))
    }
}

/// The ETag an answer gives, if any.
pub(super) fn etag_of(r: &Response) -> Option<String> {
    r.headers().get("etag").and_then(|v| v.to_str().ok()).map(str::to_owned)
}
