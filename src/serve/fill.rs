//! Lazy filling (`serve --from-store`): a narinfo the cache lacks, for a path that is valid
//! in the local store and may be served, is made by pushing the path's closure into the cache
//! with push's pipeline and all its guarantees, under the cache's writers' lock.
//!
//! Synchronous, like the core it calls: the server runs a fill on a blocking thread. The
//! whole closure is pushed before the request is answered: push publishes every narinfo only
//! after its NAR and its references' narinfos, so the directory is a whole cache at every
//! moment, and the references Nix asks for next are plain files by then.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use thiserror::Error;

use crate::cache::{Cache, CacheError};
use crate::progress::{Mode, Progress};
use crate::push::{PushOptions, push};
use crate::store::{Store, StoreConfig, StoreError};
use crate::store_path::StorePath;

/// Which store paths may be served.
#[derive(Clone, Debug)]
pub enum Policy {
    /// Everything valid (nix-serve's and harmonia's behaviour).
    WholeStore,
    /// The closures of these roots: store paths, links into the store, directories of
    /// GC-root links. Read again at every fill, so a root added or removed counts at once.
    Roots(Vec<PathBuf>),
}

/// How to fill.
pub struct FillConfig {
    pub dest: PathBuf,
    pub store: StoreConfig,
    pub policy: Policy,
    pub push: PushOptions,
    /// How long a fill waits for another writer of the cache (a push, gc, sign, or anyone
    /// holding the lock) before its clients are told to come back later.
    pub lock_wait: std::time::Duration,
}

/// Why a fill did not happen or did not finish.
#[derive(Debug, Error)]
pub enum FillError {
    #[error("cannot read the Nix store")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("{failed} of {paths} paths of the closure of {path} were not published; first: {first}")]
    Push { path: String, paths: usize, failed: usize, first: String },
    /// The cache's lock was held past [`FillConfig::lock_wait`]: try again later (503).
    #[error(transparent)]
    Busy(CacheError),
}

/// What a fill did.
#[derive(Debug)]
pub enum Filled {
    /// The closure is in the cache now.
    Pushed { path: String, paths: usize, pushed: usize, nar_bytes: u64, file_bytes: u64, seconds: f64 },
    /// The path may not be served from here: the request is a 404.
    NotServed(&'static str),
}

/// The closure the roots had when last read.
#[derive(Default)]
struct Allowed {
    roots: Vec<StorePath>,
    paths: HashSet<StorePath>,
}

thread_local! {
    /// Each serving thread's own read connection to the Nix database, for misses.
    static STORE: std::cell::RefCell<Option<Store>> = const { std::cell::RefCell::new(None) };
}

pub struct Filler {
    config: FillConfig,
    allowed: Mutex<Allowed>,
}

impl Filler {
    /// Checks that the store can be read and every root names something, and reads the
    /// roots' closure once.
    pub fn new(config: FillConfig) -> Result<Filler, FillError> {
        let store = Store::open(&config.store)?;
        if let Policy::Roots(args) = &config.policy {
            for a in args {
                store.location().roots(a)?;
            }
        }
        let filler = Filler { config, allowed: Mutex::new(Allowed::default()) };
        filler.allows(&store, None)?;
        Ok(filler)
    }

    /// How many store paths the roots' closure holds when last read (`None`: the whole store).
    pub fn allowed_paths(&self) -> Option<usize> {
        match self.config.policy {
            Policy::WholeStore => None,
            Policy::Roots(_) => Some(self.allowed.lock().unwrap_or_else(|e| e.into_inner()).paths.len()),
        }
    }

    /// Whether `p` may be served, reading the roots again (their closure only when the roots
    /// changed).
    fn allows(&self, store: &Store, p: Option<&StorePath>) -> Result<bool, FillError> {
        let Policy::Roots(args) = &self.config.policy else { return Ok(true) };
        let loc = store.location();
        // A root that went away (a result link deleted) names nothing now.
        let mut roots: Vec<StorePath> = args.iter().filter_map(|a| loc.roots(a).ok()).flatten().collect();
        roots.sort();
        roots.dedup();
        let mut allowed = self.allowed.lock().unwrap_or_else(|e| e.into_inner());
        if allowed.roots != roots || allowed.paths.is_empty() {
            let closure = store.closure(&roots, false)?;
            allowed.paths = closure.into_iter().map(|i| i.path).collect();
            allowed.roots = roots;
        }
        Ok(p.is_none_or(|p| allowed.paths.contains(p)))
    }

    /// Whether a fill of `hash` could serve anything, cheaply, for a request on a serving
    /// thread: asked of this thread's own connection to the Nix database, kept open. A path
    /// the store does not have (what a scan or a client of many caches asks for most) then
    /// costs about what a static 404 does, with no thread started and no database opened.
    /// `Ok(true)` is only a hint: the fill itself decides again.
    pub fn would_serve(&self, hash: &str) -> Result<bool, FillError> {
        STORE.with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.is_none() {
                *cell = Some(Store::open(&self.config.store)?);
            }
            let store = cell.as_ref().expect("opened above");
            // Without the database a lookup reads the store directory and runs nix-store:
            // not on a serving thread, but on the fill's, as before.
            if !store.reads_database() {
                return Ok(true);
            }
            let found = match store.path_from_hash_part(hash) {
                Ok(found) => found,
                Err(e) => {
                    // Opened afresh next time (a database replaced or moved).
                    *cell = None;
                    return Err(e.into());
                }
            };
            // A valid path outside the roots is left to the fill, which reads the roots
            // again: a root added a moment ago must count (Nix remembers a 404 for an hour).
            Ok(found.is_some())
        })
    }

    /// Fills the cache with the closure of the path whose hash part is `hash`, if it is valid
    /// in the store and may be served. Waits for other writers of the cache (push, gc, sign,
    /// another fill) to finish first.
    pub fn fill(&self, hash: &str) -> Result<Filled, FillError> {
        let started = Instant::now();
        // Opened afresh: a long-running server must see paths built since it started.
        let store = Store::open(&self.config.store)?;
        let Some(p) = store.path_from_hash_part(hash)? else {
            return Ok(Filled::NotServed("not a valid path in the store"));
        };
        if !self.allows(&store, Some(&p))? {
            return Ok(Filled::NotServed("outside the closures of --roots"));
        }
        let infos = store.closure(std::slice::from_ref(&p), false)?;
        let mut cache = Cache::open(self.config.dest.as_path())?;
        cache.lock_within(Some(self.config.lock_wait), |_| {}).map_err(|e| match e {
            CacheError::Storage(crate::storage::StorageError::LockTimeout { .. }) => FillError::Busy(e),
            e => FillError::Cache(e),
        })?;
        // As every push does before it looks (a no-op on a directory, which is locked).
        crate::push::announce(&cache, &infos)?;
        cache.prepare_lookups(infos.len())?;
        let quiet = Progress::new(Mode::Quiet, "filling", infos.len(), 0);
        let report = push(&store.location(), &cache, &infos, &self.config.push, &quiet);
        let path = store.store_dir().display(&p);
        if let Some((failed, e)) = report.failed.first() {
            return Err(FillError::Push {
                path,
                paths: infos.len(),
                failed: report.failed.len(),
                first: format!("{}: {}", store.store_dir().display(failed), crate::util::error_chain(e)),
            });
        }
        Ok(Filled::Pushed {
            path,
            paths: infos.len(),
            pushed: report.pushed + report.repaired,
            nar_bytes: report.nar_bytes,
            file_bytes: report.file_bytes,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}
