//! A cache: its rules, on a directory or a bucket ([`crate::storage`]); its layout is in
//! [`crate::layout`].
//!
//! Nothing in a cache is trusted to be what its name says: names are checked before any
//! file is touched ([`Cache::resolve`]), text files are read with a size limit
//! ([`TEXT_LIMIT`]), and a narinfo must parse strictly and sit under its own name.

use std::fs::File;
use std::io;
use std::path::PathBuf;

use thiserror::Error;

mod records;
mod write;

pub use crate::cache_info::CacheInfo;
use crate::narinfo::{NarInfo, NarInfoError};
pub use crate::storage::Backend;
use crate::storage::dir::DirBackend;
use crate::storage::remote::RemoteBackend;
use crate::storage::s3::S3Backend;
pub use crate::storage::{Dest, FileProblem, Leftover, Meta, NewFile, Reader, Record, Staged, StorageError};
use crate::store_path::StorePath;

pub use crate::layout::{CACHE_INFO, LOCK_FILE, SUBDIRS, TEMP_PREFIX};

/// The largest text file (narinfo, `nix-cache-info`, debug-info link) nixcache reads. Nix
/// writes a few hundred bytes; a narinfo with thousands of references stays far below.
pub const TEXT_LIMIT: u64 = 4 << 20;

/// The largest upstreams record read: a push that left out a million paths writes about 100 MB.
pub const UPSTREAMS_LIMIT: u64 = 256 << 20;

/// Why a narinfo file in the cache cannot be used.
#[derive(Debug, Error)]
pub enum BadNarInfo {
    #[error(transparent)]
    File(#[from] FileProblem),
    #[error("does not parse")]
    Parse(#[from] NarInfoError),
    #[error("holds the narinfo of {found}, whose file is {expected}")]
    Misnamed { found: String, expected: String },
    /// Listed, and then answered as absent: no client can fetch it either.
    #[error("is listed but cannot be fetched")]
    Unfetchable,
}

#[derive(Debug, Error)]
pub enum CacheError {
    /// What the storage below could not do.
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{} is not a valid nix-cache-info: {reason}", path.display())]
    BadCacheInfo { path: PathBuf, reason: String },
    #[error("{} {source}", path.display())]
    BadFile { path: PathBuf, source: FileProblem },
    #[error(
        "the cache at {} is for store {found}, not {wanted}; use a separate cache directory per store directory",
        path.display()
    )]
    StoreDirMismatch { path: PathBuf, found: String, wanted: String },
    #[error(
        "{} is not an upstreams record nixcache can read ({source}); nothing was done: move it away if it is not nixcache's, and push again with the --skip flags it recorded",
        path.display()
    )]
    BadUpstreams { path: PathBuf, source: crate::upstream::UpstreamsError },
}

impl CacheError {
    /// The I/O error underneath, when the storage failed on one.
    pub fn io(&self) -> Option<&io::Error> {
        match self {
            CacheError::Storage(StorageError::Io { source, .. }) => Some(source),
            _ => None,
        }
    }
}

/// What a narinfo file holds, if anything.
#[derive(Debug)]
pub enum Lookup {
    Missing,
    Invalid(BadNarInfo),
    Found(Box<NarInfo>),
}

/// An open cache.
pub struct Cache {
    backend: Box<dyn Backend>,
    /// Subdirectories that are not real directories, and what they are: nothing under them
    /// is read. Only [`Cache::inspect`] opens such a cache.
    bad_dirs: Vec<(&'static str, &'static str)>,
}

impl Cache {
    fn new(backend: Box<dyn Backend>) -> Cache {
        let bad_dirs = backend.bad_dirs();
        Cache { backend, bad_dirs }
    }

    /// A cache on a backend opened by the caller (say, a bucket with explicit credentials).
    pub fn on(backend: Box<dyn Backend>) -> Cache {
        Self::new(backend)
    }

    /// Opens `dest` for writing, creating a directory and its subdirectories when missing.
    pub fn create(dest: impl Into<Dest>) -> Result<Cache, CacheError> {
        match dest.into() {
            Dest::Dir(dir) => Self::writable(Self::new(Box::new(DirBackend::create(&dir)?))),
            Dest::Bucket(b) => Ok(Self::new(Box::new(S3Backend::connect(&b, false)?))),
            Dest::Remote(r) => Ok(Self::new(Box::new(RemoteBackend::connect(&r)?))),
        }
    }

    /// Opens an existing cache for writing. Refuses a directory whose subdirectories are
    /// links or files: a writer would write, touch or delete through them.
    pub fn open(dest: impl Into<Dest>) -> Result<Cache, CacheError> {
        match dest.into() {
            Dest::Dir(dir) => Self::writable(Self::new(Box::new(DirBackend::open(&dir)?))),
            Dest::Bucket(b) => Ok(Self::new(Box::new(S3Backend::connect(&b, false)?))),
            Dest::Remote(r) => Ok(Self::new(Box::new(RemoteBackend::connect(&r)?))),
        }
    }

    fn writable(cache: Cache) -> Result<Cache, CacheError> {
        if let Some((sub, kind)) = cache.bad_dirs.first() {
            return Err(StorageError::NotARealDirectory { path: cache.locate(sub), kind }.into());
        }
        Ok(cache)
    }

    /// Opens an existing cache to look at it, even when a subdirectory is not a real
    /// directory ([`Cache::bad_dirs`]); nothing under such a one is read.
    pub fn inspect(dest: impl Into<Dest>) -> Result<Cache, CacheError> {
        match dest.into() {
            Dest::Dir(dir) => Ok(Self::new(Box::new(DirBackend::open(&dir)?))),
            // Reading a public bucket needs no credentials.
            Dest::Bucket(b) => Ok(Self::new(Box::new(S3Backend::connect(&b, true)?))),
            Dest::Remote(r) => Ok(Self::new(Box::new(RemoteBackend::connect(&r)?))),
        }
    }

    /// Where the cache is, for messages.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// What to call the cache file `rel` in a message.
    pub fn locate(&self, rel: &str) -> PathBuf {
        self.backend.locate(rel)
    }

    /// Subdirectories that exist but are not real directories, and what they are.
    pub fn bad_dirs(&self) -> &[(&'static str, &'static str)] {
        &self.bad_dirs
    }

    /// What the subdirectory `sub` is, when it exists but is not a real directory.
    fn bad_dir(&self, sub: &str) -> Option<&'static str> {
        self.bad_dirs.iter().find(|(b, _)| *b == sub).map(|(_, kind)| *kind)
    }

    /// Creates the subdirectory `sub` (`debuginfo`) when missing.
    pub fn create_subdir(&mut self, sub: &'static str) -> Result<(), CacheError> {
        let made = self.backend.create_subdir(sub);
        self.bad_dirs = self.backend.bad_dirs();
        Ok(made?)
    }

    /// Takes the writers' lock, waiting for another writer to finish. `on_wait` runs once if
    /// the lock is held by someone else. A bucket has no lock.
    pub fn lock(&mut self, on_wait: impl FnMut(Option<&str>)) -> Result<(), CacheError> {
        self.lock_within(None, on_wait)
    }

    /// [`Cache::lock`], giving up with [`StorageError::LockTimeout`] after `wait`.
    pub fn lock_within(
        &mut self,
        wait: Option<std::time::Duration>,
        mut on_wait: impl FnMut(Option<&str>),
    ) -> Result<(), CacheError> {
        Ok(self.backend.lock(false, wait, &mut on_wait)?)
    }

    /// Takes the lock shared, for readers, when the lock file exists and can be opened:
    /// a reader then waits for a writer to finish.
    pub fn lock_shared(&mut self, mut on_wait: impl FnMut(Option<&str>)) -> Result<(), CacheError> {
        Ok(self.backend.lock(true, None, &mut on_wait)?)
    }

    /// Whether committing a file waits on a link ([`Backend::commits_wait`]).
    pub fn commits_wait(&self) -> bool {
        self.backend.commits_wait()
    }

    /// Whether writers exclude each other (a directory's lock).
    pub fn exclusive(&self) -> bool {
        self.backend.exclusive()
    }

    /// Commits staged files, as many at once as the storage is best given; one result each,
    /// in order.
    pub fn commit_all(&self, staged: Vec<Staged>) -> Vec<Result<(), CacheError>> {
        crate::util::map_in_order(
            staged.into_iter(),
            self.backend.commits_at_once(),
            |_| false,
            |s| Ok(s.commit()?),
        )
    }

    pub fn narinfo_rel(p: &StorePath) -> String {
        crate::layout::narinfo_name(p.hash_part())
    }

    /// `rel` (`x.narinfo`, `nar/y.nar.xz`) if it can be in the cache: a plain name at the
    /// top, or one in a subdirectory that is a real directory. Never `..`, `.`, an empty
    /// component or a deeper path.
    pub fn resolve<'r>(&self, rel: &'r str) -> Option<&'r str> {
        let parts: Vec<&str> = rel.split('/').collect();
        let plain = |c: &str| !c.is_empty() && c != "." && c != "..";
        match parts[..] {
            [name] if plain(name) => Some(rel),
            [sub, name] if SUBDIRS.contains(&sub) && plain(name) && self.bad_dir(sub).is_none() => Some(rel),
            [crate::layout::STATE_DIR, name] if plain(name) => Some(rel),
            _ => None,
        }
    }

    /// Reads the regular file `rel` of at most [`TEXT_LIMIT`] bytes as text; `None` if it is
    /// missing (or cannot be in the cache).
    pub fn read_text(&self, rel: &str) -> Result<Option<String>, FileProblem> {
        let Some(rel) = self.resolve(rel) else { return Ok(None) };
        text(self.backend.read(rel, TEXT_LIMIT)?)
    }

    /// Opens the regular file `rel` for reading, with its size; `None` if it is missing.
    pub fn open_file(&self, rel: &str) -> Result<Option<(Reader, u64)>, FileProblem> {
        match self.resolve(rel) {
            Some(rel) => self.backend.open(rel),
            None => Ok(None),
        }
    }

    /// Opens the regular file `rel` on this machine to send it, if it can be in the cache
    /// ([`Cache::resolve`]): no link is followed below the cache, only a regular file is
    /// opened. `None` if it is missing; an error from a cache not on this machine.
    pub fn local_file(&self, rel: &str) -> Result<Option<(File, std::fs::Metadata)>, FileProblem> {
        match self.resolve(rel) {
            Some(rel) => self.backend.local_file(rel),
            None => Ok(None),
        }
    }

    /// Reads the narinfo file `rel`: what it holds, or why it cannot be used (a narinfo for
    /// another path than its name says cannot: Nix would refuse it).
    pub fn read_narinfo(&self, rel: &str) -> Result<Option<NarInfo>, BadNarInfo> {
        narinfo_named(rel, self.read_text(rel)?)
    }

    /// [`Cache::read_narinfo`] of a top-level narinfo as a listing of this run showed it
    /// ([`Cache::narinfo_entries`]): on a bucket, from the copy kept on this machine when it
    /// is the one listed.
    pub fn read_listed_narinfo(&self, listed: &Meta) -> Result<Option<NarInfo>, BadNarInfo> {
        let Some(rel) = self.resolve(&listed.name) else { return Ok(None) };
        narinfo_named(rel, text(self.backend.read_listed(rel, listed, TEXT_LIMIT)?)?)
    }

    /// Reads and parses the narinfo of `p`; a file that cannot be used is [`Lookup::Invalid`].
    pub fn lookup(&self, p: &StorePath) -> Lookup {
        match self.read_narinfo(&Self::narinfo_rel(p)) {
            Ok(Some(ni)) => Lookup::Found(Box::new(ni)),
            Ok(None) => Lookup::Missing,
            Err(e) => Lookup::Invalid(e),
        }
    }

    /// What the cache file `rel` is, if it exists (a link or special file included).
    pub fn stat(&self, rel: &str) -> Option<Meta> {
        self.try_stat(rel).ok().flatten()
    }

    /// What the cache file `rel` is, if it exists; an error when that could not be found out.
    pub fn try_stat(&self, rel: &str) -> Result<Option<Meta>, FileProblem> {
        match self.resolve(rel) {
            Some(rel) => self.backend.stat(rel),
            None => Ok(None),
        }
    }

    /// What the cache file `rel` is, asked of the storage now (never from a listing taken
    /// earlier); an error when that could not be found out.
    pub fn stat_fresh(&self, rel: &str) -> Result<Option<Meta>, FileProblem> {
        match self.resolve(rel) {
            Some(rel) => self.backend.stat_fresh(rel),
            None => Ok(None),
        }
    }

    /// Whether the NAR a narinfo points at is there with the FileSize it claims, as the
    /// storage answers (`fresh`: asked now, not from a listing); an error when it could not
    /// be found out, which is no answer.
    pub fn nar_present(&self, ni: &NarInfo, fresh: bool) -> Result<bool, FileProblem> {
        match ni.nar_file() {
            Some(rel) => self.holds(&rel, ni.file_size, fresh),
            None => Ok(false),
        }
    }

    /// Whether `rel` is a regular file of `size` bytes (any size when `None`), as the storage
    /// answers (`fresh`: asked now, not from a listing).
    pub fn holds(&self, rel: &str, size: Option<u64>, fresh: bool) -> Result<bool, FileProblem> {
        let meta = if fresh { self.stat_fresh(rel)? } else { self.try_stat(rel)? };
        Ok(meta.filter(|m| m.not_regular.is_none()).is_some_and(|m| size.is_none_or(|s| s == m.size)))
    }

    /// Size of a cache file, if it exists and is a regular file.
    pub fn file_size(&self, rel: &str) -> Option<u64> {
        self.stat(rel).filter(|m| m.not_regular.is_none()).map(|m| m.size)
    }

    /// True when the NAR a narinfo points at is there, with the FileSize it claims.
    pub fn has_nar(&self, ni: &NarInfo) -> bool {
        self.nar_present(ni, false).unwrap_or(false)
    }

    /// The narinfo files at the top of the cache, sorted: every entry so named, links and
    /// special files included, so they can be reported and replaced.
    pub fn narinfo_files(&self) -> Result<Vec<String>, CacheError> {
        Ok(self.narinfo_entries()?.into_iter().map(|m| m.name).collect())
    }

    /// The narinfo files, as listed.
    pub fn narinfo_entries(&self) -> Result<Vec<Meta>, CacheError> {
        self.list_entries("", is_narinfo_name)
    }

    /// The NAR files, as cache-relative names (`nar/….nar.xz`), sorted.
    pub fn nar_files(&self) -> Result<Vec<String>, CacheError> {
        Ok(self.nar_entries()?.into_iter().map(|m| m.name).collect())
    }

    /// The NAR files, as listed.
    pub fn nar_entries(&self) -> Result<Vec<Meta>, CacheError> {
        self.list_entries("nar", |n| !crate::layout::is_temp(n))
    }

    /// The entries of the cache subdirectory `sub` whose base names `keep` accepts, sorted:
    /// files, links and special files, never directories; none if `sub` is missing or is
    /// not a real directory (never listed through a link). On a bucket, after
    /// [`Cache::prepare_lookups`] has listed it, the top level and `nar/` as then listed.
    pub fn list_entries(&self, sub: &str, keep: impl Fn(&str) -> bool) -> Result<Vec<Meta>, CacheError> {
        let mut found = self.backend.list_once(sub)?;
        found.retain(|m| keep(m.name.rsplit('/').next().unwrap_or_default()));
        Ok(found)
    }

    /// Cache-relative names in `sub` whose base names `keep` accepts, sorted.
    pub fn list(&self, sub: &str, keep: impl Fn(&str) -> bool) -> Result<Vec<String>, CacheError> {
        Ok(self.list_entries(sub, keep)?.into_iter().map(|m| m.name).collect())
    }

    /// Temporary files and incomplete uploads left by runs (or being written by running
    /// ones, on a bucket).
    pub fn temp_files(&self) -> Result<Vec<Leftover>, CacheError> {
        Ok(self.backend.leftovers()?)
    }
}

/// Whether a top-level name is a narinfo's (not a temporary file's).
pub use crate::layout::is_narinfo_name;

/// A file's bytes as text.
fn text(bytes: Option<Vec<u8>>) -> Result<Option<String>, FileProblem> {
    bytes.map(|b| String::from_utf8(b).map_err(|_| FileProblem::NotText)).transpose()
}

/// The narinfo in `text`, read from `rel`: one for another path than its name says cannot be
/// used (Nix would refuse it).
fn narinfo_named(rel: &str, text: Option<String>) -> Result<Option<NarInfo>, BadNarInfo> {
    let Some(text) = text else { return Ok(None) };
    let ni: NarInfo = text.parse()?;
    if ni.file_name() != rel {
        return Err(BadNarInfo::Misnamed {
            found: ni.store_dir.display(&ni.store_path),
            expected: ni.file_name(),
        });
    }
    Ok(Some(ni))
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::Write;

    use super::*;
    use crate::store_path::StoreDir;

    #[test]
    fn temp_files_vanish_unless_persisted() {
        let t = tempfile::tempdir().unwrap();
        let c = Cache::create(t.path()).unwrap();
        {
            let mut tf = c.create_file("nar", ".x").unwrap();
            tf.write_all(b"half").unwrap();
            assert_eq!(c.temp_files().unwrap().len(), 1);
        }
        assert!(c.temp_files().unwrap().is_empty());
        c.write_atomic("a.narinfo", b"x").unwrap();
        assert_eq!(fs::read(t.path().join("a.narinfo")).unwrap(), b"x");
        assert!(c.temp_files().unwrap().is_empty());
    }

    #[test]
    fn staged_files_appear_only_when_committed() {
        let t = tempfile::tempdir().unwrap();
        let c = Cache::create(t.path()).unwrap();
        let staged: Vec<Staged> = (0..200)
            .map(|i| c.stage(&format!("nar/{i}.nar"), format!("nar {i}").as_bytes()).unwrap())
            .collect();
        // Waiting files hold no descriptors (other tests' may come and go meanwhile).
        let open_here = fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| fs::read_link(e.unwrap().path()).ok())
            .filter(|target| target.starts_with(t.path()))
            .count();
        assert_eq!(open_here, 0);
        assert_eq!(c.temp_files().unwrap().len(), 200);
        assert!(c.nar_files().unwrap().is_empty());
        c.sync_data(&staged).unwrap();
        let mut staged = staged.into_iter();
        let first = staged.next().unwrap();
        assert_eq!(first.dest(), "nar/0.nar");
        first.commit().unwrap();
        assert_eq!(fs::read(t.path().join("nar/0.nar")).unwrap(), b"nar 0");
        // The rest are dropped uncommitted: gone, names and all.
        drop(staged);
        assert_eq!(c.nar_files().unwrap(), ["nar/0.nar"]);
        assert!(c.temp_files().unwrap().is_empty());
    }

    #[test]
    fn store_dir_mismatch_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let c = Cache::create(t.path()).unwrap();
        c.ensure_cache_info(&StoreDir::default(), None, None, 30).unwrap();
        let other: StoreDir = "/other/store".parse().unwrap();
        assert!(matches!(
            c.ensure_cache_info(&other, None, None, 30),
            Err(CacheError::StoreDirMismatch { .. })
        ));
        let kept = c.ensure_cache_info(&StoreDir::default(), Some(false), None, 50).unwrap();
        assert_eq!((kept.want_mass_query, kept.priority), (Some(false), Some(30)));
    }

    #[test]
    fn a_cache_written_by_nix_keeps_its_absent_fields() {
        let t = tempfile::tempdir().unwrap();
        let c = Cache::create(t.path()).unwrap();
        // What `nix copy --to file://` writes.
        fs::write(t.path().join(CACHE_INFO), "StoreDir: /nix/store\n").unwrap();
        let kept = c.ensure_cache_info(&StoreDir::default(), None, None, 30).unwrap();
        assert_eq!((kept.want_mass_query, kept.priority), (None, None));
        assert_eq!(fs::read_to_string(t.path().join(CACHE_INFO)).unwrap(), "StoreDir: /nix/store\n");
        // A flag changes only its own field.
        c.ensure_cache_info(&StoreDir::default(), None, Some(10), 30).unwrap();
        assert_eq!(
            fs::read_to_string(t.path().join(CACHE_INFO)).unwrap(),
            "StoreDir: /nix/store\nPriority: 10\n"
        );
    }

    #[test]
    fn dest_that_is_a_file() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        fs::write(&f, "").unwrap();
        assert!(matches!(
            Cache::create(f.as_path()),
            Err(CacheError::Storage(StorageError::NotADirectory { .. }))
        ));
    }
}
