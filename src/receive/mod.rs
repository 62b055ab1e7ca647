//! Receiving a push into a cache directory from another machine: what `serve
//! --upload-token-file` does with Nix's own uploads (`nix copy --to http://HOST`).
//!
//! Nothing sent is trusted. A NAR is received into `.nixcache/incoming/` (never served: its
//! name starts with a dot) and kept only if its bytes hash to the FileHash its name carries. A
//! narinfo is published only when it parses strictly, sits under its own name, is for this
//! cache's store, names a NAR that was received (or is in the cache) with the FileHash and
//! FileSize it says, that NAR decompresses to the NarHash and NarSize it says, every reference
//! is in the cache (or left to an upstream on purpose), and it carries a valid signature by a
//! trusted key (unless unsigned uploads are allowed). Then, under the cache's lock as a push
//! takes it, the NAR is renamed into `nar/` and made durable, and the narinfo written
//! atomically after it: a client never sees a narinfo whose NAR or references are missing,
//! and a gc (which takes the same lock) never runs between the check and the publish. A
//! refused upload leaves nothing a client can see.
//!
//! Each receiver (a `serve`, or one `nixcache receive` per SSH push) keeps its NARs in a
//! directory of its own under `incoming/`, beside a lock file it holds while it runs; a
//! receiver that starts removes the directories whose lock nobody holds (left by a killed
//! receiver or a cut-off upload), never another running receiver's.

pub mod stdio;
mod upload;

pub use upload::{LOG_LIMIT, Upload};

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::cache::{CACHE_INFO, Cache, CacheError, CacheInfo};
use crate::compression::Compression;
use crate::hash::NixHash;
use crate::layout;
use crate::narinfo::NarInfo;
use crate::signing::{PublicKey, SecretKey};
use crate::storage::remote::wire::{HAVE_BATCH, HaveAnswer, HaveRequest, Held};

/// Where NARs wait for their narinfo, under the cache.
pub const INCOMING: &str = ".nixcache/incoming";

/// The largest upload taken by default.
pub const DEFAULT_MAX_UPLOAD: u64 = 64 << 30;

/// What a receiver accepts, and how.
pub struct ReceiveConfig {
    /// A narinfo must carry a valid signature by one of these.
    pub trusted: Vec<PublicKey>,
    /// Take narinfos without a trusted signature.
    pub allow_unsigned: bool,
    /// The receiver adds its own signatures with these.
    pub keys: Vec<SecretKey>,
    /// A larger upload is refused (413).
    pub max_upload: u64,
    /// How long a publish waits for another writer's lock (a push, a gc) before it is
    /// answered 503.
    pub lock_timeout: Duration,
}

/// Why an upload was not taken: each is a 4xx (or 5xx) with a sentence.
#[derive(Debug, Error)]
pub enum Refused {
    #[error(
        "{0} is not a file a cache takes uploads of (nix-cache-info, <hash>.narinfo, <hash>.ls, nar/<filehash>.nar[.ext], debuginfo/<build-id>.debug, log/<drv>, realisations/<id>.doi, .nixcache/upstreams.<id>)"
    )]
    NotAnUpload(String),
    #[error("the upload is larger than the receiver's limit of {limit} bytes (--max-upload-size)")]
    TooLarge { limit: u64 },
    #[error("the body ended after {got} of its {declared} bytes")]
    CutShort { got: u64, declared: u64 },
    #[error("{name}: its bytes hash to {actual}, not to the hash its name says")]
    WrongFileHash { name: String, actual: String },
    #[error("{0}")]
    BadNarInfo(String),
    #[error("{what}: {reason}")]
    Rejected { what: String, reason: String },
    #[error("the NAR {0} was not uploaded before its narinfo (upload it first)")]
    NoNar(String),
    #[error(
        "not signed by a key this cache trusts ({trusted}); sign it, or run the receiver with --allow-unsigned-uploads"
    )]
    Untrusted { trusted: String },
    #[error("another writer holds the cache's lock; try again")]
    Busy(#[source] CacheError),
    #[error("the cache's filesystem is full")]
    Full(#[source] io::Error),
    #[error("cannot write to the cache")]
    Io(#[source] io::Error),
    #[error(transparent)]
    Cache(#[from] CacheError),
}

impl Refused {
    /// The HTTP status that says it.
    pub fn status(&self) -> u16 {
        match self {
            Refused::NotAnUpload(_) => 403,
            Refused::TooLarge { .. } => 413,
            Refused::NoNar(_) => 409,
            Refused::Untrusted { .. } => 403,
            Refused::Busy(_) => 503,
            Refused::Full(_) => 507,
            Refused::Io(_) | Refused::Cache(_) => 500,
            _ => 400,
        }
    }
}

fn io_refused(e: io::Error) -> Refused {
    if matches!(e.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded) {
        Refused::Full(e)
    } else {
        Refused::Io(e)
    }
}

pub use crate::storage::remote::wire::UPSTREAMS_REQUEST;

/// Receives uploads into the cache directory `dir`.
pub struct Receiver {
    dir: PathBuf,
    /// This receiver's own directory under [`INCOMING`].
    incoming: PathBuf,
    config: ReceiveConfig,
    /// Held (locked) while the receiver runs: its `incoming` directory is in use.
    _alive: File,
}

impl Receiver {
    /// Opens the cache to receive into, with a directory of its own under `incoming/`; removes
    /// what receivers no longer running left there.
    pub fn open(dir: &Path, config: ReceiveConfig) -> Result<Receiver, Refused> {
        let parent = dir.join(INCOMING);
        fs::create_dir_all(&parent).map_err(io_refused)?;
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).map_err(|e| Refused::Io(io::Error::other(e.to_string())))?;
        let id = format!("{}-{:016x}", std::process::id(), u64::from_le_bytes(b));
        let alive = File::create(parent.join(format!("{id}.lock"))).map_err(io_refused)?;
        alive.try_lock().map_err(|e| Refused::Io(io::Error::other(e.to_string())))?;
        let incoming = parent.join(&id);
        fs::create_dir(&incoming).map_err(io_refused)?;
        remove_abandoned(&parent, &id);
        Ok(Receiver { dir: dir.to_owned(), incoming, config, _alive: alive })
    }

    pub fn config(&self) -> &ReceiveConfig {
        &self.config
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Which of the hash parts asked about the cache has a narinfo for, with the narinfo and
    /// the size of its NAR. With `record`, under the cache's lock, each one found counts as
    /// pushed now (its narinfo's time is touched, as a push touches it), so a gc that starts
    /// afterwards keeps it for its window.
    pub fn have(&self, req: &HaveRequest) -> Result<HaveAnswer, Refused> {
        if req.hashes.len() > HAVE_BATCH {
            return Err(Refused::BadNarInfo(format!("more than {HAVE_BATCH} hash parts in one question")));
        }
        if let Some(h) = req.hashes.iter().find(|h| h.len() != 32 || !crate::nixbase32::is_nix32(h)) {
            return Err(Refused::BadNarInfo(format!("{h:?} is not the hash part of a store path")));
        }
        let cache = if req.record { self.locked()? } else { Cache::open(self.dir.as_path())? };
        let mut present = BTreeMap::new();
        for h in &req.hashes {
            let rel = layout::narinfo_name(h);
            let Ok(Some(text)) = cache.read_text(&rel) else { continue };
            let nar = text.parse::<NarInfo>().ok().and_then(|ni| ni.nar_file());
            let nar_size = nar.and_then(|n| cache.stat(&n)).map(|m| m.size);
            if req.record {
                cache.touch(&rel)?;
            }
            present.insert(h.clone(), Held { narinfo: text, nar_size });
        }
        Ok(HaveAnswer { version: 1, present })
    }

    /// Starts receiving the NAR `name` (`<filehash>.nar[.ext]`), `declared` bytes long if the
    /// sender said.
    pub fn begin_nar(
        &self,
        name: &str,
        file_hash: &str,
        declared: Option<u64>,
    ) -> Result<IncomingNar, Refused> {
        if declared.is_some_and(|d| d > self.config.max_upload) {
            return Err(Refused::TooLarge { limit: self.config.max_upload });
        }
        let tmp = tempfile::Builder::new()
            .prefix(crate::layout::TEMP_PREFIX)
            .tempfile_in(&self.incoming)
            .map_err(io_refused)?;
        Ok(IncomingNar {
            tmp: Some(tmp),
            dest: self.incoming.join(name),
            name: name.to_owned(),
            file_hash: file_hash.to_owned(),
            hasher: Sha256::new(),
            size: 0,
            limit: self.config.max_upload,
            declared,
        })
    }

    /// `nix-cache-info`: taken when it says this cache's store (nothing changes), refused
    /// otherwise.
    pub fn put_cache_info(&self, body: &[u8]) -> Result<(), Refused> {
        let sent: CacheInfo = std::str::from_utf8(body)
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| Refused::BadNarInfo("nix-cache-info does not parse".into()))?;
        // Under the lock: a push writing it at the same time writes its own settings.
        let cache = self.locked()?;
        match cache.cache_info()? {
            Some(have) if have.store_dir == sent.store_dir => Ok(()),
            Some(have) => Err(Refused::Rejected {
                what: CACHE_INFO.into(),
                reason: format!("this cache is for {}, not {}", have.store_dir, sent.store_dir),
            }),
            None => {
                cache.write_atomic(CACHE_INFO, sent.to_string().as_bytes())?;
                Ok(())
            }
        }
    }

    /// A NAR listing (`<hash>.ls`): a JSON object, at most [`crate::cache::TEXT_LIMIT`] bytes,
    /// written in place. Only its outline is checked: Nix writes file names as their bytes (a
    /// listing need not be UTF-8), and a deep tree nests deeper than a JSON parser goes.
    pub fn put_listing(&self, hash: &str, body: &[u8]) -> Result<(), Refused> {
        if !(body.trim_ascii().starts_with(b"{") && body.trim_ascii().ends_with(b"}")) {
            return Err(Refused::BadNarInfo(format!("{hash}.ls is not JSON")));
        }
        let cache = self.locked()?;
        cache.write_atomic(&layout::listing_name(hash), body)?;
        Ok(())
    }

    /// Takes an upload other than a NAR (whose body is read whole first, at most
    /// [`crate::cache::TEXT_LIMIT`] bytes). Returns the store path published, for a narinfo.
    pub fn put_small(&self, upload: Upload, body: &[u8]) -> Result<Option<String>, Refused> {
        match upload {
            Upload::CacheInfo => self.put_cache_info(body).map(|()| None),
            Upload::Listing { hash } => self.put_listing(&hash, body).map(|()| None),
            Upload::NarInfo { hash } => self.put_narinfo(&hash, body).map(Some),
            Upload::DebugInfo { rel } => self.put_debuginfo(&rel, body).map(|()| None),
            Upload::Upstreams { rel } => self.put_upstreams(&rel, body).map(|()| None),
            Upload::Log { rel } => self.put_side("log", &rel, body).map(|()| None),
            Upload::Realisation { rel } => {
                json_object(&rel, body)?;
                self.put_side("realisations", &rel, body).map(|()| None)
            }
            Upload::Nar { name, .. } => Err(Refused::NotAnUpload(format!("nar/{name} (a NAR is streamed)"))),
        }
    }

    /// A file of `sub` (a build log, a realisation), written in place under the lock.
    fn put_side(&self, sub: &'static str, rel: &str, body: &[u8]) -> Result<(), Refused> {
        let mut cache = self.locked()?;
        cache.create_subdir(sub)?;
        cache.write_atomic(rel, body)?;
        Ok(())
    }

    /// A debug-info link (`debuginfo/<build-id>.debug`): a JSON object, written in place.
    pub fn put_debuginfo(&self, rel: &str, body: &[u8]) -> Result<(), Refused> {
        json_object(rel, body)?;
        self.put_side("debuginfo", rel, body)
    }

    /// An upstreams record: taken when it parses, written under its own name (records are
    /// never rewritten: each push that adds to the policy writes one).
    pub fn put_upstreams(&self, rel: &str, body: &[u8]) -> Result<(), Refused> {
        let text =
            std::str::from_utf8(body).map_err(|_| Refused::BadNarInfo(format!("{rel} is not text")))?;
        text.parse::<crate::upstream::Upstreams>()
            .map_err(|e| Refused::BadNarInfo(format!("{rel} does not parse: {e}")))?;
        self.put_side(layout::STATE_DIR, rel, body)
    }

    /// The cache's upstream records, merged: what a partial push reads before it decides.
    pub fn upstreams(&self) -> Result<String, Refused> {
        Ok(Cache::open(self.dir.as_path())?.upstreams()?.to_string())
    }

    /// Checks a narinfo sent to `<hash>.narinfo` with everything it names, and publishes it
    /// with its NAR (see the module's documentation). Returns the store path published.
    pub fn put_narinfo(&self, hash: &str, body: &[u8]) -> Result<String, Refused> {
        let text =
            std::str::from_utf8(body).map_err(|_| Refused::BadNarInfo("the narinfo is not text".into()))?;
        let mut ni: NarInfo =
            text.parse().map_err(|e| Refused::BadNarInfo(format!("the narinfo does not parse: {e}")))?;
        let path = ni.store_dir.display(&ni.store_path);
        let reject = |reason: String| Refused::Rejected { what: path.clone(), reason };
        if ni.store_path.hash_part() != hash {
            return Err(reject(format!(
                "sent as {hash}.narinfo, but its StorePath's hash part is {}",
                ni.store_path.hash_part()
            )));
        }
        // What the NAR file must be.
        let Some(rel) = ni.nar_file() else {
            return Err(reject(format!("its URL {:?} does not name a file in the cache", ni.url)));
        };
        let Some(Upload::Nar { name, file_hash }) = Upload::of(&rel) else {
            return Err(reject(format!("its URL {:?} is not nar/<filehash>.nar[.ext]", ni.url)));
        };
        let compression: Compression = ni
            .compression
            .parse()
            .map_err(|_| reject(format!("unknown compression {:?}", ni.compression)))?;
        if !name.ends_with(compression.extension()) {
            return Err(reject(format!("its URL {:?} does not end in {}", ni.url, compression.extension())));
        }
        match ni.file_hash {
            Some(h) if h.to_nix32() == file_hash => {}
            Some(h) => return Err(reject(format!("its FileHash {h} is not the one its URL names"))),
            None => return Err(reject("it has no FileHash".into())),
        }
        // Signatures first: cheap, and an untrusted sender's NAR is not decompressed.
        if !self.config.allow_unsigned && !ni.verified_by(&self.config.trusted) {
            let trusted: Vec<String> = self.config.trusted.iter().map(|k| k.name().to_owned()).collect();
            return Err(Refused::Untrusted {
                trusted: if trusted.is_empty() {
                    "none given: --trusted-public-key".into()
                } else {
                    trusted.join(", ")
                },
            });
        }
        let incoming = self.incoming.join(&name);
        let published = self.dir.join("nar").join(&name);
        let nar_at = if incoming.exists() {
            incoming.clone()
        } else if published.exists() {
            published.clone()
        } else {
            return Err(Refused::NoNar(rel));
        };
        let size = fs::metadata(&nar_at).map_err(io_refused)?.len();
        if ni.file_size.is_some_and(|s| s != size) {
            return Err(reject(format!(
                "its FileSize is {}, the NAR received is {size} bytes",
                ni.file_size.unwrap_or(0)
            )));
        }
        // The NAR the sender made: decompressed (an xz file of several blocks on all cores),
        // hashed. What the threaded decoder cannot vouch for is decoded again on one thread
        // before it is refused.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let f = File::open(&nar_at).map_err(io_refused)?;
        let threaded = crate::nar_check::decoded_nar_threaded(compression, f, size, threads)
            .filter(|&(s, h)| s == ni.nar_size && h == ni.nar_hash);
        let (nar_size, nar_hash) = match threaded {
            Some(found) => found,
            None => {
                let f = File::open(&nar_at).map_err(io_refused)?;
                crate::nar_check::decoded_nar(compression, f, size)
                    .map_err(|e| reject(format!("its NAR does not decompress as {compression}: {e}")))?
            }
        };
        if nar_size != ni.nar_size || nar_hash != ni.nar_hash {
            return Err(reject(format!(
                "its NAR is {nar_size} bytes hashing to {nar_hash}; the narinfo says {} bytes, {}",
                ni.nar_size, ni.nar_hash
            )));
        }
        for k in &self.config.keys {
            ni.add_signature(k);
        }
        // Under the lock: references, then the NAR, then the narinfo.
        let cache = self.locked()?;
        if cache.cache_info()?.is_some_and(|ci| ci.store_dir != ni.store_dir) {
            return Err(reject(format!("it is for the store {}, this cache is not", ni.store_dir)));
        }
        let upstreams = cache.upstreams()?;
        for r in ni.references.iter().filter(|r| **r != ni.store_path) {
            let there = cache.stat(&layout::narinfo_name(r.hash_part())).is_some();
            if !there && upstreams.covers(r.hash_part()).is_none() {
                return Err(reject(format!(
                    "its reference {} is not in the cache: upload it first (a push sends references first)",
                    ni.store_dir.display(r)
                )));
            }
        }
        if nar_at == incoming {
            if published.exists() {
                let _ = fs::remove_file(&incoming);
            } else {
                fs::rename(&incoming, &published).map_err(io_refused)?;
                cache.sync_dir("nar")?;
            }
        } else if !published.exists() {
            return Err(Refused::NoNar(rel));
        }
        cache.write_atomic(&ni.file_name(), ni.to_string().as_bytes())?;
        Ok(path)
    }

    /// The cache, its writers' lock taken (a push's, a gc's): released when dropped.
    fn locked(&self) -> Result<Cache, Refused> {
        let mut cache = Cache::open(self.dir.as_path())?;
        cache.lock_within(Some(self.config.lock_timeout), |_| {}).map_err(|e| match e {
            CacheError::Storage(crate::storage::StorageError::LockTimeout { .. }) => Refused::Busy(e),
            e => Refused::Cache(e),
        })?;
        Ok(cache)
    }
}

/// Refuses a body that is not one JSON object (a debug-info link, a realisation).
fn json_object(rel: &str, body: &[u8]) -> Result<(), Refused> {
    if serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| v.is_object()) {
        Ok(())
    } else {
        Err(Refused::BadNarInfo(format!("{rel} is not a JSON object")))
    }
}

impl Drop for Receiver {
    /// What never got its narinfo goes with the receiver.
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.incoming);
        let _ = fs::remove_file(self.incoming.with_extension("lock"));
    }
}

/// Removes the directories under `parent` (`incoming/`) of receivers no longer running: those
/// whose lock file nobody holds. `own` is this receiver's.
fn remove_abandoned(parent: &Path, own: &str) {
    let Ok(entries) = fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".lock") else { continue };
        if id == own {
            continue;
        }
        let Ok(f) = File::options().write(true).open(e.path()) else { continue };
        if f.try_lock().is_ok() {
            let _ = fs::remove_dir_all(parent.join(id));
            let _ = fs::remove_file(e.path());
        }
    }
    // What older receivers left directly in incoming/ (one directory for all).
    if let Ok(entries) = fs::read_dir(parent) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_file()) && !e.file_name().to_string_lossy().ends_with(".lock")
            {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// A NAR being received: written to a temporary file in `incoming/`, hashed as it comes.
pub struct IncomingNar {
    tmp: Option<tempfile::NamedTempFile>,
    dest: PathBuf,
    name: String,
    file_hash: String,
    hasher: Sha256,
    size: u64,
    limit: u64,
    declared: Option<u64>,
}

impl IncomingNar {
    /// Takes the next piece of the body.
    pub fn write(&mut self, piece: &[u8]) -> Result<(), Refused> {
        self.size += piece.len() as u64;
        if self.size > self.limit {
            return Err(Refused::TooLarge { limit: self.limit });
        }
        self.hasher.update(piece);
        let tmp = self.tmp.as_mut().expect("open until finished");
        tmp.write_all(piece).map_err(io_refused)
    }

    /// The body ended: the NAR is kept (durable, under its name in `incoming/`) if it is whole
    /// and hashes to the FileHash its name says.
    pub fn finish(mut self) -> Result<(), Refused> {
        if let Some(declared) = self.declared.filter(|&d| d != self.size) {
            return Err(Refused::CutShort { got: self.size, declared });
        }
        let actual = NixHash(self.hasher.clone().finalize().into()).to_nix32();
        if actual != self.file_hash {
            return Err(Refused::WrongFileHash { name: self.name.clone(), actual });
        }
        let tmp = self.tmp.take().expect("finished once");
        tmp.as_file().sync_all().map_err(io_refused)?;
        tmp.persist(&self.dest).map_err(|e| io_refused(e.error))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_by_name() {
        let h = "0123456789abcdfghijklmnpqrsvwxyz";
        let f = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
        assert_eq!(Upload::of("nix-cache-info"), Some(Upload::CacheInfo));
        assert_eq!(Upload::of(&format!("{h}.narinfo")), Some(Upload::NarInfo { hash: h.into() }));
        assert_eq!(Upload::of(&format!("{h}.ls")), Some(Upload::Listing { hash: h.into() }));
        assert_eq!(
            Upload::of(&format!("nar/{f}.nar.xz")),
            Some(Upload::Nar { name: format!("{f}.nar.xz"), file_hash: f.into() })
        );
        assert_eq!(Upload::of("log/abc-hello.drv"), Some(Upload::Log { rel: "log/abc-hello.drv".into() }));
        let doi = "realisations/sha256:1b8m!out.doi";
        assert_eq!(Upload::of(doi), Some(Upload::Realisation { rel: doi.into() }));
        let record = ".nixcache/upstreams.1765000000000-0a1b2c3d";
        assert_eq!(Upload::of(record), Some(Upload::Upstreams { rel: record.into() }));
        assert_eq!(
            Upload::of("debuginfo/0a1b.debug"),
            Some(Upload::DebugInfo { rel: "debuginfo/0a1b.debug".into() })
        );
        for no in [
            format!("nar/{f}.tar"),
            "nar/x.nar".into(),
            format!("nar/{h}.nar"),
            "log/.hidden".into(),
            "log/a/b".into(),
            "log/a b".into(),
            "realisations/x.json".into(),
            "debuginfo/xyz.debug".into(),
            ".nixcache/incoming/x".into(),
            ".nixcache/upstreams.a/b".into(),
            ".nixcache.lock".into(),
        ] {
            assert_eq!(Upload::of(&no), None, "{no}");
        }
        assert_eq!(Refused::TooLarge { limit: 1 }.status(), 413);
        assert_eq!(Refused::Untrusted { trusted: String::new() }.status(), 403);
    }
}
