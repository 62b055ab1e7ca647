//! The push pipeline: store paths in, a cache that real Nix accepts out.
//!
//! A path streams once through
//! `dump -> (NarSize, NarHash) -> compressor -> (FileSize, FileHash) -> temp file`, so nothing
//! is held whole in memory. An xz NAR of several blocks is read once too, and cut as it is
//! read into blocks of the block size (24 MiB at level 6), each compressed as a unit of its
//! own on whichever thread is free, while at most `--jobs` + 1 blocks of input wait (in an
//! unnamed file, the page cache, not the heap); finished blocks are appended in order, and
//! nothing of the path is published unless what was read hashes to the NarHash the store
//! records. Work runs on `--jobs` threads, the most bytes first. A narinfo is published only
//! after its NAR is in place and after the narinfos of all its references, so a run killed at
//! any moment leaves a cache in which every narinfo a client can fetch is complete.
//!
//! - [`queue`]: the units of work (a path, or a block of one) and the queue that orders them;
//! - [`plan`]: what the cache holds decides what is done with a path ([`decide`], also what
//!   `--dry-run` says);
//! - `stream` and `blocks`: a path compressed in one stream, or read once and cut into xz
//!   blocks compressed on all threads; `cache_write`: their writes, errors tagged;
//! - `publish`: narinfos in dependency order, a batch at a time;
//! - [`settle`]: on storage without a lock, the closure checked whole at the end.

mod blocks;
mod cache_write;
pub mod plan;
mod publish;
mod queue;
pub mod settle;
mod stream;

use std::cmp::Reverse;
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::cache::{Cache, CacheError, Staged};
use crate::compression::Compression;
use crate::hash::NixHash;
use crate::nar::dump::DumpError;
use crate::narinfo::NarInfo;
use crate::path_info::PathInfo;
use crate::progress::Progress;
use crate::signing::SecretKey;
use crate::store::StoreLocation;
use crate::store_path::StorePath;
use crate::xz;
use blocks::Blocked;
use cache_write::is_full;
use plan::{listing_rel, side_files};
use publish::Publisher;
use queue::{Queue, Unit};

pub use plan::{Decision, decide, existing};
pub use settle::{Announced, SETTLE_ROUNDS, SettleError, Settled, announce, missing_now, settle};

/// Bytes of NAR batched before they reach the hasher and the compressor.
const NAR_BUFFER: usize = 256 << 10;

/// Bytes of compressed output batched per write to the cache.
const FILE_BUFFER: usize = 256 << 10;

/// A compressed block waiting for its turn is kept in memory up to this size, then in an
/// unnamed file in the cache.
const SPILL_IN_MEMORY: usize = 1 << 20;

/// Bytes of a block's input read back from its spool file at a time.
const INPUT_PIECE: usize = 1 << 20;

/// How to push.
pub struct PushOptions {
    pub compression: Compression,
    /// Checked with [`Compression::level`].
    pub level: i32,
    pub jobs: usize,
    /// Rewrite narinfos and NARs that are already there.
    pub force: bool,
    /// Check the NARs already there, and rewrite those that are wrong.
    pub repair: bool,
    pub keys: Vec<SecretKey>,
    /// Write `<hashpart>.ls` NAR listings.
    pub nar_listing: bool,
    /// Write `debuginfo/<build-id>.debug` links for NARs written in this run.
    pub index_debug_info: bool,
}

/// Why one path was not pushed.
#[derive(Debug, Error)]
pub enum PushError {
    #[error(transparent)]
    Dump(DumpError),
    #[error("the cache's filesystem is full; free space on it (or push to a larger disk) and push again")]
    CacheFull(#[source] io::Error),
    #[error("cannot write to the cache")]
    CacheWrite(#[source] io::Error),
    #[error(
        "{path} is corrupt in the store (or changed while it was read): its contents hash to {actual} ({actual_size} bytes) but the Nix database records {expected} ({expected_size} bytes); repair it with `nix-store --verify --check-contents --repair`"
    )]
    Corrupt { path: String, expected: NixHash, actual: NixHash, expected_size: u64, actual_size: u64 },
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("not published: the cache directory could not be synced, so its files may not be on disk")]
    Sync(#[source] Arc<CacheError>),
    #[error("not published because its reference {dependency} failed")]
    Dependency { dependency: StorePath },
}

impl From<crate::cache::StorageError> for PushError {
    fn from(e: crate::cache::StorageError) -> Self {
        PushError::Cache(e.into())
    }
}

impl PushError {
    /// Whether the cache's filesystem was full (or over quota).
    pub fn is_cache_full(&self) -> bool {
        match self {
            PushError::CacheFull(_) => true,
            PushError::Cache(e) => e.io().is_some_and(is_full),
            PushError::Sync(e) => e.io().is_some_and(is_full),
            _ => false,
        }
    }
}

/// What happened to one path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// New in the cache.
    Pushed,
    /// Narinfo and NAR were there; nothing written.
    Skipped,
    /// Narinfo and NAR were there; our signature was added.
    Signed,
    /// A narinfo was there but its NAR was missing, truncated or it did not parse.
    Repaired,
}

impl Outcome {
    /// The word for it in `--json` output.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Pushed => "pushed",
            Outcome::Skipped => "skipped",
            Outcome::Signed => "signed",
            Outcome::Repaired => "repaired",
        }
    }
}

/// The totals of a run.
#[derive(Debug, Default)]
pub struct PushReport {
    pub pushed: usize,
    pub skipped: usize,
    pub signed: usize,
    pub repaired: usize,
    /// Uncompressed NAR bytes read, and compressed bytes written, for paths written.
    pub nar_bytes: u64,
    pub file_bytes: u64,
    pub failed: Vec<(StorePath, PushError)>,
    /// Per path published (by index into the closure): what happened, and its NAR and file
    /// bytes written (0 when nothing was).
    pub outcomes: Vec<(usize, Outcome, u64, u64)>,
    /// Per path published (by index into the closure): the NAR its narinfo names and that
    /// file's size, for the check at the end ([`missing_now`]).
    pub nars: HashMap<usize, (String, Option<u64>)>,
}

impl PushReport {
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }

    /// Adds the report of a push of paths found missing at the end ([`settle`]): what it
    /// wrote was there before, so it counts as repaired.
    pub fn absorb_again(&mut self, again: PushReport) {
        self.repaired += again.pushed + again.repaired;
        self.nar_bytes += again.nar_bytes;
        self.file_bytes += again.file_bytes;
        self.failed.extend(again.failed);
        self.nars.extend(again.nars);
    }
}

/// Pushes `infos` (a closure) into `cache`. Errors are per path and collected in the report.
pub fn push(
    store: &StoreLocation,
    cache: &Cache,
    infos: &[PathInfo],
    opts: &PushOptions,
    progress: &Progress,
) -> PushReport {
    let jobs = opts.jobs.max(1);
    // An unusable level fails each path in its encoder, with the error.
    let xz = (opts.compression == Compression::Xz).then(|| xz::Params::new(opts.level as u32).ok()).flatten();
    let mut order: Vec<usize> = (0..infos.len()).collect();
    order.sort_by(|&a, &b| infos[b].nar_size.cmp(&infos[a].nar_size).then(a.cmp(&b)));
    // Where commits wait on a link, a thread of its own publishes, and `jobs` workers compress.
    let background = cache.commits_wait();
    let run = Run {
        store,
        cache,
        infos,
        opts,
        progress,
        publisher: Publisher::new(cache, progress, infos, opts.index_debug_info, background),
        queue: Queue::new(order.into_iter().enumerate().map(|(rank, path)| {
            let blocked = xz.is_some_and(|p| p.may_store(infos[path].nar_size));
            let bytes = if blocked { u64::MAX } else { infos[path].nar_size };
            Unit { bytes: Reverse(bytes), rank, block: 0, path }
        })),
        xz,
        blocked: Mutex::new(HashMap::new()),
        finished: AtomicUsize::new(0),
        said_full: AtomicBool::new(false),
    };
    let working = AtomicUsize::new(jobs);
    let worker = || {
        while let Some(unit) = run.queue.next() {
            run.unit(unit);
            run.queue.done();
        }
        if working.fetch_sub(1, Ordering::AcqRel) == 1 {
            run.publisher.workers_done();
        }
    };
    match rayon::ThreadPoolBuilder::new()
        .num_threads(jobs + usize::from(background))
        .stack_size(32 << 20)
        .thread_name(|i| format!("nixcache-push-{i}"))
        .build()
    {
        Ok(pool) => pool.scope(|s| {
            if background {
                s.spawn(|_| run.publisher.run_in_background(|failed| run.report(failed)));
            }
            for _ in 0..jobs {
                s.spawn(|_| worker());
            }
        }),
        // No threads to be had: do the work here, then what is left to publish.
        Err(_) => {
            for _ in 0..jobs {
                worker();
            }
            if background {
                run.publisher.run_in_background(|failed| run.report(failed));
            }
        }
    }
    run.publisher.finish()
}

struct Done {
    narinfo: NarInfo,
    outcome: Outcome,
    /// Its NAR and side files, written but not yet durable or in place.
    staged: Vec<Staged>,
    nar_bytes: u64,
    file_bytes: u64,
}

/// The state of one push, shared by its threads.
struct Run<'a> {
    store: &'a StoreLocation,
    cache: &'a Cache,
    infos: &'a [PathInfo],
    opts: &'a PushOptions,
    progress: &'a Progress,
    publisher: Publisher<'a>,
    queue: Queue,
    /// With xz: its preset and block size, for paths of several blocks.
    xz: Option<xz::Params>,
    /// Paths whose xz blocks are being compressed, by index.
    blocked: Mutex<HashMap<usize, Arc<Blocked>>>,
    finished: AtomicUsize,
    /// A path failed on a full cache disk and that was said.
    said_full: AtomicBool,
}

/// What a path needs, decided from what the cache already has.
enum Plan {
    Done(Box<Done>),
    Write(Outcome),
}

impl Run<'_> {
    fn unit(&self, u: Unit) {
        let i = u.path;
        if u.block > 0 {
            let b = self.blocked.lock().unwrap_or_else(|e| e.into_inner()).get(&i).cloned();
            let b = b.expect("blocks are queued after their path's state");
            if let Some(result) = self.block(i, &b, u.block - 1) {
                self.blocked.lock().unwrap_or_else(|e| e.into_inner()).remove(&i);
                drop(b);
                self.path_finished(i, result);
            }
            return;
        }
        let result = match self.plan(&self.infos[i]) {
            Ok(Plan::Done(done)) => Ok(*done),
            Ok(Plan::Write(outcome)) => match self.xz_blocks(i) {
                Some(params) => match self.open_blocks(i, params, outcome) {
                    Ok(b) => {
                        let b = Arc::new(b);
                        self.blocked.lock().unwrap_or_else(|e| e.into_inner()).insert(i, b.clone());
                        if let Some(result) = self.read_blocks(i, &b, u) {
                            self.blocked.lock().unwrap_or_else(|e| e.into_inner()).remove(&i);
                            drop(b);
                            self.path_finished(i, result);
                        }
                        return;
                    }
                    Err(e) => Err(e),
                },
                None => self.write_streaming(&self.infos[i], outcome),
            },
            Err(e) => Err(e),
        };
        self.path_finished(i, result);
    }

    /// Publishes a finished path (when its references are), or reports its failure.
    fn path_finished(&self, i: usize, result: Result<Done, PushError>) {
        let failed = match result {
            Ok(done) => self.publisher.complete(i, done),
            Err(e) => vec![(i, e)],
        };
        self.report(failed);
        let d = self.finished.fetch_add(1, Ordering::Relaxed) + 1;
        self.progress.path_done(d, self.infos.len());
    }

    /// Says why paths failed (a full disk once) and records them.
    fn report(&self, failed: Vec<(usize, PushError)>) {
        for (k, e) in failed {
            // A full disk is said once; the summary says how much space is missing.
            if !e.is_cache_full() || !self.said_full.swap(true, Ordering::Relaxed) {
                self.progress.warn(&format!(
                    "error: {}: {}",
                    self.store.store_dir.display(&self.infos[k].path),
                    crate::util::error_chain(&e)
                ));
            }
            self.publisher.fail(k, e);
        }
    }

    /// Skips, signs or lists a path the cache has; otherwise says what writing it will be.
    fn plan(&self, info: &PathInfo) -> Result<Plan, PushError> {
        let (cache, opts) = (self.cache, self.opts);
        let abs = self.store.store_dir.display(&info.path);
        // What is not kept is never signed or kept as found: rewritten from the store.
        let mut warn = |w: &str| self.progress.warn(&format!("warning: {abs}: {w}; rewriting it"));
        Ok(match decide(cache, &self.store.store_dir, info, opts.force, opts.repair, &mut warn) {
            Decision::Present(ni) => {
                let mut narinfo = *ni;
                let mut added = false;
                let mut staged = Vec::new();
                for k in &opts.keys {
                    if !narinfo.verified_by(&[k.public_key()]) {
                        added |= narinfo.add_signature(k);
                    }
                }
                if opts.nar_listing && cache.file_size(&listing_rel(&info.path)).is_none() {
                    // Listing missing for a path that is otherwise there: list it from the store.
                    let listing = self.list_pass(info)?;
                    staged = side_files(cache, info, &narinfo.url, listing.as_ref(), opts)?;
                }
                let outcome = if added { Outcome::Signed } else { Outcome::Skipped };
                Plan::Done(Box::new(Done { narinfo, outcome, staged, nar_bytes: 0, file_bytes: 0 }))
            }
            Decision::Repair => Plan::Write(Outcome::Repaired),
            Decision::Push => Plan::Write(Outcome::Pushed),
        })
    }

    /// The xz parameters of a path whose NAR is compressed a block per unit: one of several
    /// blocks, or one that may have to be stored (which needs its input again, held).
    fn xz_blocks(&self, i: usize) -> Option<xz::Params> {
        self.xz.filter(|p| p.may_store(self.infos[i].nar_size))
    }
}
