//! A cache: its rules, on a directory or a bucket ([`crate::storage`]); its layout is in
//! [`crate::layout`].
//!
//! Nothing in a cache is trusted to be what its name says: names are checked before any
//! file is touched ([`Cache::resolve`]), text files are read with a size limit
//! ([`TEXT_LIMIT`]), and a narinfo must parse strictly and sit under its own name.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use thiserror::Error;

pub use crate::cache_info::CacheInfo;
use crate::narinfo::{NarInfo, NarInfoError};
pub use crate::storage::Backend;
use crate::storage::dir::DirBackend;
use crate::storage::s3::S3Backend;
pub use crate::storage::{Dest, FileProblem, Leftover, Meta, NewFile, Reader, Record, Staged, StorageError};
use crate::store_path::{StoreDir, StorePath};
use crate::upstream::Upstreams;

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
        }
    }

    /// Opens an existing cache for writing. Refuses a directory whose subdirectories are
    /// links or files: a writer would write, touch or delete through them.
    pub fn open(dest: impl Into<Dest>) -> Result<Cache, CacheError> {
        match dest.into() {
            Dest::Dir(dir) => Self::writable(Self::new(Box::new(DirBackend::open(&dir)?))),
            Dest::Bucket(b) => Ok(Self::new(Box::new(S3Backend::connect(&b, false)?))),
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

    /// Records that a push included the narinfo `rel` now (which `gc` reads).
    pub fn touch(&self, rel: &str) -> Result<(), CacheError> {
        match self.resolve(rel) {
            Some(rel) => Ok(self.backend.touch(rel)?),
            None => Err(StorageError::Io {
                action: "open",
                path: self.locate(rel),
                source: io::ErrorKind::NotFound.into(),
            }
            .into()),
        }
    }

    /// A new file in the cache subdirectory `sub` ("" or "nar"), named when staged.
    pub fn create_file(&self, sub: &str, suffix: &str) -> Result<Box<dyn NewFile>, CacheError> {
        Ok(self.backend.create(sub, suffix)?)
    }

    /// Scratch space for a push, gone when closed.
    pub fn scratch(&self) -> Result<File, CacheError> {
        Ok(self.backend.scratch()?)
    }

    /// Writes `data` to the cache-relative `rel` atomically and durably.
    pub fn write_atomic(&self, rel: &str, data: &[u8]) -> Result<(), CacheError> {
        let staged = self.stage(rel, data)?;
        self.sync_data([&staged])?;
        staged.commit()?;
        self.sync_dir(Path::new(rel).parent().and_then(Path::to_str).unwrap_or(""))
    }

    /// Stages `data` to become the cache-relative `rel`, to be made durable with
    /// [`Cache::sync_data`] and then [committed](Staged::commit).
    pub fn stage(&self, rel: &str, data: &[u8]) -> Result<Staged, CacheError> {
        Ok(self.backend.stage(rel, data, None)?)
    }

    /// Makes the contents of staged files durable, all at once.
    pub fn sync_data<'s>(&self, files: impl IntoIterator<Item = &'s Staged>) -> Result<(), CacheError> {
        let files: Vec<&Staged> = files.into_iter().collect();
        Ok(self.backend.sync(&files)?)
    }

    /// Makes the names committed into the subdirectory `sub` ("" for the top) durable.
    pub fn sync_dir(&self, sub: &str) -> Result<(), CacheError> {
        Ok(self.backend.sync_dir(sub)?)
    }

    /// Replaces a narinfo with a rewritten one, durable before it appears, that keeps the old
    /// one's modification time where the storage can: a change that is not a push (adding a
    /// signature) must not make gc think a push included the path. It replaces `file`, which
    /// must be the narinfo's own name: a misnamed narinfo never overwrites the right one. The
    /// caller syncs the top directory ([`Cache::sync_dir`]) once all are replaced.
    pub fn replace_narinfo(&self, file: &str, ni: &NarInfo, modified: SystemTime) -> Result<(), CacheError> {
        assert_eq!(file, ni.file_name(), "a narinfo is rewritten only under its own name");
        Ok(self.backend.replace(file, ni.to_string().as_bytes(), Some(modified))?)
    }

    /// Reads `nix-cache-info`, if present.
    pub fn cache_info(&self) -> Result<Option<CacheInfo>, CacheError> {
        let path = self.locate(CACHE_INFO);
        match self.read_text(CACHE_INFO) {
            Ok(Some(s)) => s.parse().map(Some).map_err(|reason| CacheError::BadCacheInfo { path, reason }),
            Ok(None) => Ok(None),
            Err(source) => Err(CacheError::BadFile { path, source }),
        }
    }

    /// Makes `nix-cache-info` say `wanted`, keeping the existing priority and mass-query
    /// settings where `wanted` leaves them open. Refuses a cache made for another store.
    pub fn ensure_cache_info(
        &self,
        store_dir: &StoreDir,
        want_mass_query: Option<bool>,
        priority: Option<u32>,
        default_priority: u32,
    ) -> Result<CacheInfo, CacheError> {
        let existing = self.cache_info()?;
        if let Some(e) = &existing
            && &e.store_dir != store_dir
        {
            return Err(CacheError::StoreDirMismatch {
                path: PathBuf::from(self.describe()),
                found: e.store_dir.to_string(),
                wanted: store_dir.to_string(),
            });
        }
        // An existing cache keeps what it says, absent fields included, unless a flag
        // changes them; a new one gets the defaults.
        let info = match &existing {
            Some(e) => CacheInfo {
                store_dir: store_dir.clone(),
                want_mass_query: want_mass_query.or(e.want_mass_query),
                priority: priority.or(e.priority),
            },
            None => CacheInfo {
                store_dir: store_dir.clone(),
                want_mass_query: Some(want_mass_query.unwrap_or(true)),
                priority: Some(priority.unwrap_or(default_priority)),
            },
        };
        if existing.as_ref() != Some(&info) {
            self.write_atomic(CACHE_INFO, info.to_string().as_bytes())?;
        }
        Ok(info)
    }

    /// Removes temporary files left by killed runs, where writers exclude each other (call
    /// with the lock held); on a bucket, other pushes may be writing theirs, and gc removes
    /// them once stale.
    pub fn clean_temp_files(&self) -> Result<Vec<String>, CacheError> {
        if !self.exclusive() {
            return Ok(Vec::new());
        }
        let mut removed = Vec::new();
        for l in self.temp_files()? {
            self.backend.remove_leftover(&l)?;
            removed.push(l.name);
        }
        Ok(removed)
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

    /// Removes a cache file (a link itself, never what it points to).
    pub fn remove(&self, rel: &str) -> Result<(), CacheError> {
        match self.resolve(rel) {
            Some(rel) => Ok(self.backend.remove(rel)?),
            None => Ok(()),
        }
    }

    /// Removes a temporary file, or aborts an incomplete upload.
    pub fn remove_leftover(&self, l: &Leftover) -> Result<(), CacheError> {
        Ok(self.backend.remove_leftover(l)?)
    }

    /// Records the narinfos a push names, where modification times cannot be touched.
    pub fn record_push(&self, hash_parts: &[&str]) -> Result<Option<String>, CacheError> {
        Ok(self.backend.record_push(hash_parts)?)
    }

    /// Removes a push record.
    pub fn remove_record(&self, name: &str) -> Result<(), CacheError> {
        Ok(self.backend.remove(name)?)
    }

    /// On a bucket: says a gc is about to delete (see [`Cache::deleting`]); the marker's name.
    pub fn start_deleting(&self) -> Result<Option<String>, CacheError> {
        Ok(self.backend.start_deleting()?)
    }

    /// Removes the marker [`Cache::start_deleting`] wrote, once the gc's deletions have landed.
    pub fn done_deleting(&self, marker: &str) -> Result<(), CacheError> {
        Ok(self.backend.done_deleting(marker)?)
    }

    /// On a bucket: the markers of gcs deleting now, or killed while they deleted. A push that
    /// finds none after writing its push record knows that whatever it then finds present
    /// stays: a gc that starts later reads the record before it deletes and spares what it
    /// names.
    pub fn deleting(&self) -> Result<Vec<Meta>, CacheError> {
        Ok(self.backend.deleting()?)
    }

    /// The push records, on a bucket, each hash part handed to `each` with its record's
    /// time. A record that cannot be read is the error.
    pub fn push_records(&self, each: &mut dyn FnMut(&str, SystemTime)) -> Result<Vec<Record>, CacheError> {
        Ok(self.backend.push_records(&|_| false, each)?)
    }

    /// The hash parts named by push records not in `known` (records written since those were
    /// listed).
    pub fn new_push_records(&self, known: &HashSet<String>) -> Result<HashSet<String>, CacheError> {
        let mut named = HashSet::new();
        self.backend.push_records(&|n| known.contains(n), &mut |h, _| {
            named.insert(h.to_owned());
        })?;
        Ok(named)
    }

    /// Prepares to look up `paths` store paths (a bucket may list itself once).
    pub fn prepare_lookups(&self, paths: usize) -> Result<Option<String>, CacheError> {
        Ok(self.backend.prepare_lookups(paths)?)
    }

    /// [`Cache::prepare_lookups`] with the top level as `top`, the caller's own listing of it
    /// just before ([`Cache::list_entries`] of `""`, everything kept): a bucket lists only
    /// `nar/` then.
    pub fn prepare_lookups_after(&self, paths: usize, top: Vec<Meta>) -> Result<Option<String>, CacheError> {
        Ok(self.backend.prepare_lookups_after(paths, top)?)
    }

    /// What this cache leaves to other caches: every upstreams record, merged. A record that
    /// cannot be read or parsed is the error (verify and gc must not guess).
    pub fn upstreams(&self) -> Result<Upstreams, CacheError> {
        let mut merged = Upstreams::default();
        let names = self.list(crate::layout::STATE_DIR, |n| {
            let base = n.rsplit('/').next().unwrap_or_default();
            base.starts_with(crate::layout::UPSTREAMS_PREFIX)
        })?;
        for rel in names {
            let bad = |source| CacheError::BadFile { path: self.locate(&rel), source };
            let Some(bytes) = self.backend.read(&rel, UPSTREAMS_LIMIT).map_err(bad)? else { continue };
            let text = String::from_utf8(bytes).map_err(|_| bad(FileProblem::NotText))?;
            let r: Upstreams = text
                .parse()
                .map_err(|source| CacheError::BadUpstreams { path: self.locate(&rel), source })?;
            merged.merge(&r);
        }
        Ok(merged)
    }

    /// Writes `record` as a new upstreams record, durably. Returns its name.
    pub fn add_upstreams(&mut self, record: &Upstreams) -> Result<String, CacheError> {
        self.create_subdir(crate::layout::STATE_DIR)?;
        let ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis();
        // Unique without coordination: the time, and random bits (the pid, failing those).
        let mut b = [0u8; 4];
        let id = getrandom::fill(&mut b).map_or(std::process::id(), |()| u32::from_le_bytes(b));
        let rel = format!("{}/{}{ms}-{id:08x}", crate::layout::STATE_DIR, crate::layout::UPSTREAMS_PREFIX);
        self.write_atomic(&rel, record.to_string().as_bytes())?;
        Ok(rel)
    }

    /// Requests made to a bucket so far, by kind.
    pub fn requests(&self) -> std::collections::HashMap<&'static str, crate::storage::Requests> {
        self.backend.requests()
    }

    /// Keeps copies of a bucket's narinfos in `dir` on this machine and reads a narinfo from
    /// its copy while the bucket's listing shows it unchanged (see
    /// [`crate::storage::copies`]); nothing for a directory.
    pub fn keep_copies(&self, dir: &Path) -> Result<(), crate::storage::s3::CopiesError> {
        self.backend.keep_copies(dir)
    }

    /// Where the copies are kept and how many reads they answered, when they are.
    pub fn copies_used(&self) -> Option<(PathBuf, u64)> {
        self.backend.copies_used()
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
