//! Where a cache's files live: a directory ([`dir`]), an S3-compatible bucket ([`s3`]), or a
//! directory on another machine behind a receiver there ([`remote`]), behind one interface,
//! [`Backend`]. Push, verify, sign and gc work on a [`Cache`], which
//! holds the cache's rules (names, narinfos, `nix-cache-info`); a backend only stores, lists
//! and fetches bytes under cache-relative names (`x.narinfo`, `nar/y.nar.xz`).
//!
//! What differs between them is said here once:
//!
//! | | directory | bucket | remote |
//! |---|---|---|---|
//! | a new file | temporary name, fsync, rename | one PUT, or a multipart upload to a temporary key and a server-side copy | a PUT (over HTTP, or framed over SSH); the receiver checks it, then does what a directory does |
//! | durable | after fsync of file and directory | when the server answers | when the receiver answers |
//! | writers | one at a time (a file lock) | no lock: content-addressed NARs make races harmless | the receiver takes the directory's lock for each publish |
//! | gc's record of a push | the narinfo's modification time | a push record object | the narinfo's time, touched by the receiver when the push asks what it has |
//!
//! [`Cache`]: crate::cache::Cache

pub mod dir;
mod lock;
pub mod remote;
pub mod s3;

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use std::io;

use thiserror::Error;

use crate::layout::SUBDIRS;

/// Where a cache is: `--dest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dest {
    Dir(PathBuf),
    Bucket(s3::BucketUrl),
    /// Another machine's directory, through a receiver there (ssh://, http://).
    Remote(remote::RemoteDest),
}

impl fmt::Display for Dest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dest::Dir(p) => write!(f, "{}", p.display()),
            Dest::Bucket(b) => write!(f, "{b}"),
            Dest::Remote(r) => write!(f, "{}", r.url),
        }
    }
}

impl From<&Path> for Dest {
    fn from(p: &Path) -> Self {
        Dest::Dir(p.to_owned())
    }
}

impl From<&Dest> for Dest {
    fn from(d: &Dest) -> Self {
        d.clone()
    }
}

impl Default for Dest {
    fn default() -> Self {
        Dest::Dir(PathBuf::new())
    }
}

/// Why a file in the cache cannot be used as what its name says, or could not be read.
#[derive(Debug, Error)]
pub enum FileProblem {
    #[error("is a {0}, not a regular file; nixcache never reads or writes through one")]
    NotRegular(&'static str),
    #[error("is {size} bytes, more than the {limit} bytes such a file may have")]
    TooLarge { size: u64, limit: u64 },
    #[error("is not UTF-8 text")]
    NotText,
    /// Not a fact about the file: reading it failed (a local I/O error; on a bucket a
    /// transport error, a timeout, a 5xx after the retries, or a body that ended early).
    /// Nothing may be concluded from it: gc stops on one.
    #[error("cannot be read")]
    Io(#[source] io::Error),
}

impl FileProblem {
    /// Whether this says something about the file itself (read in full and bad), rather
    /// than that reading it failed.
    pub fn is_established(&self) -> bool {
        !matches!(self, FileProblem::Io(_))
    }
}

/// What the storage could not do.
#[derive(Debug, Error)]
pub enum StorageError {
    #[error("{} exists and is not a directory; --dest must be a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("{} does not exist", path.display())]
    Missing { path: PathBuf },
    #[error("cannot {action} {}", path.display())]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("{} {source}", path.display())]
    BadFile { path: PathBuf, source: FileProblem },
    #[error(
        "the cache {} cannot be opened for writing (its lock file cannot be created or written): run as the cache's owner, or check that it is not on read-only media; verify only reads it",
        dir.display()
    )]
    NotWritable { dir: PathBuf, source: io::Error },
    #[error(
        "another process has held {} for more than {}s{}: a push, gc or sign runs, or someone holds the lock (`flock`); try again later",
        path.display(), waited.as_secs(), holders.as_deref().map(|h| format!(" ({h})")).unwrap_or_default()
    )]
    LockTimeout { path: PathBuf, waited: std::time::Duration, holders: Option<String> },
    #[error(
        "{} is a {kind}; a cache's {} must be a real directory (nixcache never follows links inside a cache): replace it with a directory",
        path.display(), SUBDIRS.join("/, ") + "/"
    )]
    NotARealDirectory { path: PathBuf, kind: &'static str },
    #[error(transparent)]
    Bucket(s3::S3Error),
    #[error(transparent)]
    Remote(remote::RemoteError),
}

impl From<s3::S3Error> for StorageError {
    fn from(e: s3::S3Error) -> Self {
        StorageError::Bucket(e)
    }
}

/// A cache file opened for streaming.
pub type Reader = Box<dyn Read + Send>;

/// A file in the cache, as listed.
#[derive(Clone, Debug)]
pub struct Meta {
    /// Cache-relative name.
    pub name: String,
    pub size: u64,
    pub modified: SystemTime,
    /// What it is when it is not a regular file (a directory cache's links and special
    /// files); `None` for a regular file or an object.
    pub not_regular: Option<&'static str>,
    /// The object's ETag, as a bucket gave it; `None` for a directory's file.
    pub etag: Option<String>,
}

/// A file being written; [`NewFile::stage`] names it once its contents (and so its name)
/// are known.
pub trait NewFile: Write + Send {
    /// Ends the file and makes it ready to go in place as `dest` (cache-relative).
    fn stage(self: Box<Self>, dest: &str) -> Result<Staged, StorageError>;
}

/// What a file written but not yet in place needs: made durable ([`Backend::sync`]), then
/// committed. Dropped uncommitted, it leaves nothing behind.
pub struct Staged {
    dest: String,
    /// A local file to fsync before the commit (directory caches).
    durable: Option<PathBuf>,
    commit: Box<dyn FnOnce() -> Result<(), StorageError> + Send>,
}

impl Staged {
    pub fn new(
        dest: &str,
        durable: Option<PathBuf>,
        commit: impl FnOnce() -> Result<(), StorageError> + Send + 'static,
    ) -> Self {
        Staged { dest: dest.to_owned(), durable, commit: Box::new(commit) }
    }

    /// The cache-relative name it goes to.
    pub fn dest(&self) -> &str {
        &self.dest
    }

    /// The local file to make durable first, if any.
    pub fn durable(&self) -> Option<&Path> {
        self.durable.as_deref()
    }

    /// Puts it in place: only after [`Backend::sync`] covered it. The caller then syncs the
    /// directory ([`Backend::sync_dir`]).
    pub fn commit(self) -> Result<(), StorageError> {
        (self.commit)()
    }
}

/// Requests of one kind made to a bucket: how many (each try counts) and how long they took
/// from sending to the end of their answers (for a streamed download, to its head), added up
/// over the threads that sent them; the pauses between tries are not counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    pub count: u64,
    pub time: Duration,
}

/// Requests made to a bucket, in words, with the time spent waiting on each kind (added up
/// over threads, so it can exceed the wall time):
/// `52 requests (30 put, 20 get, 2 copy); waited 2.45 s (copy 1.30 s, put 0.90 s, get 0.25 s)`.
pub fn requests_summary(counts: &HashMap<&'static str, Requests>) -> String {
    let mut kinds: Vec<_> = counts.iter().collect();
    kinds.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
    let total: u64 = counts.values().map(|r| r.count).sum();
    let each: Vec<String> = kinds.iter().map(|(k, r)| format!("{} {k}", r.count)).collect();
    kinds.sort_by(|a, b| b.1.time.cmp(&a.1.time).then(a.0.cmp(b.0)));
    let waited: std::time::Duration = counts.values().map(|r| r.time).sum();
    let times: Vec<String> =
        kinds.iter().map(|(k, r)| format!("{k} {:.2} s", r.time.as_secs_f64())).collect();
    format!(
        "{} ({}); waited {:.2} s ({})",
        crate::progress::plural(total as usize, "request"),
        each.join(", "),
        waited.as_secs_f64(),
        times.join(", ")
    )
}

pub(crate) fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> StorageError + 'a {
    move |source| StorageError::Io { action, path: path.to_owned(), source }
}

/// An incomplete upload or temporary file some run left behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leftover {
    /// What to call it: a cache-relative name, with the upload id for an upload.
    pub name: String,
    pub size: u64,
    pub modified: SystemTime,
    /// For a multipart upload, its id: removing it aborts the upload.
    pub upload_id: Option<String>,
}

/// A push record, as listed.
#[derive(Clone, Debug)]
pub struct Record {
    /// Cache-relative name.
    pub name: String,
    /// When written, as the server said.
    pub modified: SystemTime,
    /// Why it is not a record nixcache wrote (misplaced, too large, not hash parts): reported,
    /// and removed with the window like any record.
    pub problem: Option<String>,
}

/// The storage of a cache. Names are cache-relative and already checked
/// (by the cache above): a plain name at the top or one in a subdirectory.
pub trait Backend: Send + Sync {
    /// Where the cache is, for messages.
    fn describe(&self) -> String;

    /// What to call the file `rel` in a message.
    fn locate(&self, rel: &str) -> PathBuf;

    /// Subdirectories that exist but are not real directories, and what they are (nothing
    /// under them is read).
    fn bad_dirs(&self) -> Vec<(&'static str, &'static str)>;

    /// Makes the subdirectory `sub` ready to hold files.
    fn create_subdir(&self, sub: &'static str) -> Result<(), StorageError>;

    /// Takes the writers' lock (or, `shared`, waits for writers), calling `on_wait` once if
    /// someone else holds it (with who, where that can be seen), and failing with
    /// [`StorageError::LockTimeout`] once it has waited `wait` (None: as long as it takes). A
    /// bucket has none.
    fn lock(
        &mut self,
        shared: bool,
        wait: Option<std::time::Duration>,
        on_wait: &mut dyn FnMut(Option<&str>),
    ) -> Result<(), StorageError>;

    /// Whether writers exclude each other: then a writer may remove every temporary file it
    /// finds, since no other writer is running.
    fn exclusive(&self) -> bool;

    /// Whether committing a file waits on a link (a remote cache: the upload's answer): then a
    /// push publishes on a thread of its own, and no worker waits.
    fn commits_wait(&self) -> bool {
        false
    }

    /// How many staged files are best committed at once: one where a commit is a rename, more
    /// where it is a request to a server.
    fn commits_at_once(&self) -> usize {
        1
    }

    /// The entries of the subdirectory `sub` ("" for the top), sorted by name: never
    /// directories, and nothing when `sub` is missing or not a real directory.
    fn list(&self, sub: &str) -> Result<Vec<Meta>, StorageError>;

    /// What `rel` is, if it exists (a bucket may answer from a listing taken earlier).
    fn stat(&self, rel: &str) -> Result<Option<Meta>, FileProblem>;

    /// What `rel` is, asked of the storage now, never from a listing: what gc confirms an
    /// absence with before it acts on it.
    fn stat_fresh(&self, rel: &str) -> Result<Option<Meta>, FileProblem> {
        self.stat(rel)
    }

    /// Like [`Backend::read`], for a file as this run's listing showed it: a bucket answers
    /// from the copy kept on this machine when it has the listed ETag and size.
    fn read_listed(&self, rel: &str, listed: &Meta, limit: u64) -> Result<Option<Vec<u8>>, FileProblem> {
        let _ = listed;
        self.read(rel, limit)
    }

    /// The bytes of `rel`, if it exists and is at most `limit` bytes.
    fn read(&self, rel: &str, limit: u64) -> Result<Option<Vec<u8>>, FileProblem> {
        let Some((r, size)) = self.open(rel)? else { return Ok(None) };
        if size > limit {
            return Err(FileProblem::TooLarge { size, limit });
        }
        // Room for what the size says and one byte more: two reads, where growing from
        // nothing takes six for a narinfo.
        let mut buf = Vec::with_capacity(size as usize + 1);
        r.take(limit + 1).read_to_end(&mut buf).map_err(FileProblem::Io)?;
        if buf.len() as u64 > limit {
            return Err(FileProblem::TooLarge { size: buf.len() as u64, limit });
        }
        Ok(Some(buf))
    }

    /// Opens `rel` for streaming, with its size.
    fn open(&self, rel: &str) -> Result<Option<(Reader, u64)>, FileProblem>;

    /// Opens the regular file `rel` on this machine, with its metadata, following no link
    /// below the cache: what a server sends. Storage elsewhere (a bucket) has none.
    fn local_file(&self, rel: &str) -> Result<Option<(File, std::fs::Metadata)>, FileProblem> {
        let _ = rel;
        Err(FileProblem::Io(io::Error::new(io::ErrorKind::Unsupported, "not a file on this machine")))
    }

    /// A new file to be written in the subdirectory `sub`, named when staged.
    fn create(&self, sub: &str, suffix: &str) -> Result<Box<dyn NewFile>, StorageError>;

    /// Stages `data` to become `rel`, with the modification time `modified` where the
    /// storage keeps one.
    fn stage(&self, rel: &str, data: &[u8], modified: Option<SystemTime>) -> Result<Staged, StorageError>;

    /// Makes the contents of staged files durable.
    fn sync(&self, staged: &[&Staged]) -> Result<(), StorageError>;

    /// Puts `data` in place as `rel` now, its contents durable before the name appears (the
    /// caller syncs the directory afterwards, once for many): [`Backend::stage`], then
    /// [`Backend::sync`] and [`Staged::commit`] of that one file.
    fn replace(&self, rel: &str, data: &[u8], modified: Option<SystemTime>) -> Result<(), StorageError> {
        let staged = self.stage(rel, data, modified)?;
        self.sync(&[&staged])?;
        staged.commit()
    }

    /// Makes the names committed into the subdirectory `sub` durable.
    fn sync_dir(&self, sub: &str) -> Result<(), StorageError>;

    /// Records that a push included the file `rel` now (a directory keeps it as the file's
    /// modification time; a bucket keeps push records instead, see [`Shared::record_push`]).
    fn touch(&self, rel: &str) -> Result<(), StorageError>;

    /// Removes `rel` (a link itself, never what it points to); gone already is fine.
    fn remove(&self, rel: &str) -> Result<(), StorageError>;

    /// Scratch space for a push: a file without a name, gone when closed.
    fn scratch(&self) -> Result<File, StorageError>;

    /// Temporary files and incomplete uploads left by runs, with their ages.
    fn leftovers(&self) -> Result<Vec<Leftover>, StorageError>;

    /// Removes a leftover (aborts an upload).
    fn remove_leftover(&self, l: &Leftover) -> Result<(), StorageError>;

    /// What storage without a writers' lock adds (a bucket): `None` for a directory, whose
    /// lock and file times make it needless.
    fn shared(&self) -> Option<&dyn Shared> {
        None
    }

    /// [`Shared::listed_once`] where there is such a listing, else [`Backend::list`].
    fn list_once(&self, sub: &str) -> Result<Vec<Meta>, StorageError> {
        match self.shared().and_then(|s| s.listed_once(sub)) {
            Some(listed) => Ok(listed),
            None => self.list(sub),
        }
    }
}

/// The protocol of storage that is not a directory on this machine. A bucket: writers do not
/// exclude each other and its files have no times a push can set, so push records stand in
/// for narinfo times, gc says it is deleting, and lookups are answered from one listing. A
/// remote cache: one "have" answer stands in for the records and the lookups. Both count
/// their requests.
pub trait Shared {
    /// Records, before a push looks at the cache, the narinfo hash parts it names (where
    /// modification times cannot be touched). Returns the record's name, if one was written.
    fn record_push(&self, hash_parts: &[&str]) -> Result<Option<String>, StorageError>;

    /// The push records, each hash part they name handed to `each` with the record's time as
    /// the server stated it (streamed: a record is never held whole). A record that cannot
    /// be read is the error: what it names is unknown.
    /// Records whose names `skip` accepts are listed but not read.
    fn push_records(
        &self,
        skip: &dyn Fn(&str) -> bool,
        each: &mut dyn FnMut(&str, SystemTime),
    ) -> Result<Vec<Record>, StorageError>;

    /// Says, where writers do not exclude each other, that a gc is about to delete: an object
    /// under `.nixcache/gc/`, there until [`Shared::done_deleting`]. Returns its name.
    fn start_deleting(&self) -> Result<Option<String>, StorageError>;

    /// Removes the marker [`Shared::start_deleting`] wrote: the gc's deletions have landed.
    fn done_deleting(&self, marker: &str) -> Result<(), StorageError>;

    /// The markers of gcs deleting now (or killed while they deleted).
    fn deleting(&self) -> Result<Vec<Meta>, StorageError>;

    /// Prepares to look up `paths` store paths: a bucket may list itself once instead of
    /// asking per path, when that is cheaper. Says which it chose.
    fn prepare_lookups(&self, paths: usize) -> Result<Option<String>, StorageError>;

    /// [`Shared::prepare_lookups`] with the top level as the caller has just listed it: only
    /// `nar/` is listed now, after it (so a NAR named by a narinfo in `top` is in the listing).
    fn prepare_lookups_after(&self, paths: usize, top: Vec<Meta>) -> Result<Option<String>, StorageError>;

    /// What the listing [`Shared::prepare_lookups`] took found directly in `sub` (the top
    /// level or `nar`), sorted, when it took one that covers `sub`: for the rest of the run
    /// it answers for those directories, as it does for [`Backend::stat`].
    fn listed_once(&self, sub: &str) -> Option<Vec<Meta>>;

    /// Requests made so far, by kind, for the summary and the benchmark.
    fn requests(&self) -> HashMap<&'static str, Requests>;

    /// Keeps copies of the narinfos read and written in `dir` on this machine, and reads a
    /// narinfo from its copy while the listing shows it unchanged ([`s3::CopiesError`]'s copies).
    fn keep_copies(&self, dir: &Path) -> Result<(), s3::CopiesError>;

    /// Where the copies are kept and how many reads they answered, when they are.
    fn copies_used(&self) -> Option<(PathBuf, u64)>;

    /// The bytes of request bodies sent so far, where they cross a link (a remote cache).
    fn bytes_sent(&self) -> Option<u64> {
        None
    }

    /// Learns at once what the cache holds of these store paths, without recording a push
    /// (a dry run): a remote cache answers in one request what would take one per path.
    fn look_ahead(&self, hash_parts: &[&str]) -> Result<(), StorageError> {
        let _ = hash_parts;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::Requests;

    #[test]
    fn requests_by_count_then_by_time() {
        let r = |count, ms| Requests { count, time: Duration::from_millis(ms) };
        let counts = HashMap::from([("put", r(30, 900)), ("get", r(20, 250)), ("copy", r(2, 1300))]);
        assert_eq!(
            super::requests_summary(&counts),
            "52 requests (30 put, 20 get, 2 copy); waited 2.45 s (copy 1.30 s, put 0.90 s, get 0.25 s)"
        );
    }
}
