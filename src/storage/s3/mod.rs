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

mod answers;
mod bucket_url;
mod client;
mod copies;
mod credentials;
mod error;
mod list;
mod multipart;
mod object;
mod records;
mod request;
mod snapshot;
mod tuning;
mod upload;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use rusty_s3::{Bucket, UrlStyle};
use url::Url;

use super::{Backend, Leftover, Meta, NewFile, Reader, Record, Requests, Shared, Staged};
use super::{FileProblem, StorageError};
use crate::layout::TEMP_PREFIX;
use answers::redact_url;
use client::Client;
use client::Slots;
use copies::Copies;
use credentials::Creds;
use records::random_id;
use request::{Op, Request};
use tuning::Tuning;
use upload::Upload;

pub use bucket_url::{Addressing, BucketUrl};
pub use copies::CopiesError;
pub use credentials::CredentialsError;
pub use error::S3Error;
pub use records::is_own_temp;

/// The first part of a multipart upload; every thousand parts the size doubles, so no
/// upload needs more than S3's 10,000 parts (8 MiB x 1000 x (1 + 2 + ... + 512) is about
/// 8 PiB). A NAR that fits in one part goes up in one PUT.
pub const PART_SIZE: usize = 8 << 20;

/// The largest object CopyObject copies; a larger one is copied a part at a time.
pub const COPY_LIMIT: u64 = 5 << 30;

/// How much of a NAR larger than a part is held in a temporary file (in `TMPDIR`) while it
/// is compressed, so that it goes up in one PUT under its name once its hash is known:
/// [`SPOOL_LIMIT`], or `NIXCACHE_S3_SPOOL_LIMIT` bytes (at most 4 GiB; 0 turns it off). A
/// larger NAR goes up as a multipart upload to a temporary key and is copied to its name.
pub const SPOOL_LIMIT: u64 = 64 << 20;

/// How long a request may go without a byte from the server (its answer's head or body)
/// before it is given up and tried again: [`READ_TIMEOUT`], or `NIXCACHE_S3_READ_TIMEOUT`
/// seconds.
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// The most hash parts one push record holds; a larger closure writes several records. A
/// record is at most [`RECORD_LIMIT`] bytes, and a larger object is not nixcache's.
pub const RECORD_PATHS: usize = 100_000;
/// The largest push record read: [`RECORD_PATHS`] hash parts, one per line.
pub const RECORD_LIMIT: u64 = (RECORD_PATHS as u64) * 33;

/// Uploads in flight at once, across all NARs of a run.
pub const DEFAULT_UPLOADS: usize = 8;

/// A cache in a bucket.
pub struct S3Backend {
    client: Arc<Client>,
}

impl S3Backend {
    /// Opens the bucket: finds credentials (anonymous if `anonymous_ok` and none are found)
    /// and checks that the bucket answers.
    pub fn connect(url: &BucketUrl, anonymous_ok: bool) -> Result<S3Backend, StorageError> {
        let creds = match credentials::find(url.profile.as_deref()) {
            Ok(c) => Some(c),
            Err(_) if anonymous_ok => None,
            Err(e) => return Err(S3Error::from(e).into()),
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
        let tuning = Tuning::from_env();
        let agent = ureq::Agent::new_with_config(
            ureq::config::Config::builder()
                .http_status_as_error(false)
                .timeout_connect(Some(Duration::from_secs(10)))
                .timeout_recv_response(Some(Duration::from_secs(120)))
                // A server that stops sending, headers or body, with the connection open.
                .timeout_per_read(Some(tuning.read_timeout))
                .timeout_per_write(Some(tuning.read_timeout))
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
            tuning,
        };
        // One small listing: the endpoint answers, the bucket exists, the credentials work.
        let what = || format!("opening {}", client.url);
        let probe = Request::bucket(Op::List)
            .query("list-type", "2")
            .query("max-keys", "1")
            .query("prefix", &client.prefix);
        client.send(&probe, &what)?;
        Ok(S3Backend { client: Arc::new(client) })
    }

    fn io<'a>(&'a self, action: &'static str, rel: &'a str) -> impl Fn(S3Error) -> StorageError + 'a {
        self.client.cache_err(action, rel)
    }
}

impl Backend for S3Backend {
    fn shared(&self) -> Option<&dyn Shared> {
        Some(self)
    }

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
            .send(&Request::object(Op::Get, &key).ok(&[200, 404]), &what)
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
            spool_limit: self.client.tuning.spool_limit,
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
        self.own_leftovers()
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
}

impl Shared for S3Backend {
    fn record_push(&self, hash_parts: &[&str]) -> Result<Option<String>, StorageError> {
        self.write_push_record(hash_parts)
    }

    fn push_records(
        &self,
        skip: &dyn Fn(&str) -> bool,
        each: &mut dyn FnMut(&str, SystemTime),
    ) -> Result<Vec<Record>, StorageError> {
        self.read_push_records(skip, each)
    }

    fn start_deleting(&self) -> Result<Option<String>, StorageError> {
        self.write_gc_marker()
    }

    fn done_deleting(&self, marker: &str) -> Result<(), StorageError> {
        self.remove(marker)
    }

    fn deleting(&self) -> Result<Vec<Meta>, StorageError> {
        self.gc_markers()
    }

    fn prepare_lookups(&self, paths: usize) -> Result<Option<String>, StorageError> {
        self.lookups_listing(paths, None)
    }

    fn prepare_lookups_after(&self, paths: usize, top: Vec<Meta>) -> Result<Option<String>, StorageError> {
        self.lookups_listing(paths, Some(top))
    }

    fn listed_once(&self, sub: &str) -> Option<Vec<Meta>> {
        self.listed_once_in(sub)
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
