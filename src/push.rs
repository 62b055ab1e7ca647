//! The push pipeline: store paths in, a cache that real Nix accepts out.
//!
//! A path streams once through
//! `dump -> (NarSize, NarHash) -> compressor -> (FileSize, FileHash) -> temp file`, so nothing
//! is held whole in memory. An xz NAR of several blocks is read once too, and cut as it is
//! read into blocks of the block size (24 MiB at level 6), each compressed as a unit of its
//! own on whichever thread is free, while at most `--jobs` + 1 blocks of input wait (in an
//! unnamed file, the page cache, not the heap); finished blocks are appended in order, and
//! nothing of the path is published unless what was read hashes to the NarHash the store
//! records. Work runs on `--jobs` threads, the most bytes first. A narinfo is published only after its NAR is in place and after the narinfos
//! of all its references, so a run killed at any moment leaves a cache in which every
//! narinfo a client can fetch is complete.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use thiserror::Error;

use crate::cache::{Cache, CacheError, Lookup, NewFile, Staged};
use crate::compression::Compression;
use crate::hash::{HashingWriter, NixHash};
use crate::nar::dump::{DumpError, dump_listing};
use crate::nar::listing::{Entry, debuginfo_json};
use crate::narinfo::NarInfo;
use crate::progress::{PathProgress, Progress, ProgressWriter};
use crate::signing::SecretKey;
use crate::store::{PathInfo, StoreLocation};
use crate::store_path::StorePath;
use crate::xz;

/// Bytes of NAR batched before they reach the hasher and the compressor.
const NAR_BUFFER: usize = 256 << 10;

/// Bytes of compressed output batched per write to the cache.
const FILE_BUFFER: usize = 256 << 10;

/// A compressed block waiting for its turn is kept in memory up to this size, then in an
/// unnamed file in the cache.
const SPILL_IN_MEMORY: usize = 1 << 20;

/// Bytes of a block's input read back from its spool file at a time.
const INPUT_PIECE: usize = 1 << 20;

/// One thread's worth of work: a path (`block == 0`) or block `block - 1` of a path's xz
/// stream. The derived order is the order of work: the most bytes to compress first (the
/// read of a path cut into blocks before anything, since it makes the work of the others),
/// then the largest path, its blocks in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Unit {
    bytes: Reverse<u64>,
    rank: usize,
    block: usize,
    path: usize,
}

/// Hands out units, the largest first, to `--jobs` threads.
///
/// A path of several xz blocks (24 MiB of NAR each at level 6) becomes a unit per block
/// as its read cuts them: every thread compresses one block at a time with one match
/// finder, and a large path is spread over all cores. Blocks and paths are taken by their
/// bytes, largest first (a 17 MiB path before the 15 MiB last block of a larger one), so
/// that the cores finish together: what is left at the end is small.
struct Queue {
    state: Mutex<QueueState>,
    changed: Condvar,
}

struct QueueState {
    ready: BinaryHeap<Reverse<Unit>>,
    /// Units added and not yet done (ready or running).
    open: usize,
}

impl Queue {
    fn new(units: impl IntoIterator<Item = Unit>) -> Self {
        let ready: BinaryHeap<_> = units.into_iter().map(Reverse).collect();
        let open = ready.len();
        Queue { state: Mutex::new(QueueState { ready, open }), changed: Condvar::new() }
    }

    /// The next unit, or `None` once every unit is done.
    fn next(&self) -> Option<Unit> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(Reverse(u)) = st.ready.pop() {
                return Some(u);
            }
            if st.open == 0 {
                return None;
            }
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Adds units; called by a running unit, before it is done.
    fn add(&self, units: impl IntoIterator<Item = Unit>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let before = st.ready.len();
        st.ready.extend(units.into_iter().map(Reverse));
        st.open += st.ready.len() - before;
        self.changed.notify_all();
    }

    fn done(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.open -= 1;
        if st.open == 0 {
            self.changed.notify_all();
        }
    }
}

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

/// Whether a write failed because the filesystem is full (or over quota).
fn is_full(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
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
}

struct Done {
    narinfo: NarInfo,
    outcome: Outcome,
    /// Its NAR and side files, written but not yet durable or in place.
    staged: Vec<Staged>,
    nar_bytes: u64,
    file_bytes: u64,
}

/// Publishes narinfos in dependency order as paths finish, a batch at a time.
///
/// Workers leave each NAR and side file staged (written, closed, under a temporary name).
/// A batch stages its narinfos, makes all of it durable at once ([`Cache::sync_data`]: the
/// files' fsyncs in parallel), renames the NARs and side files into place and fsyncs their
/// directories, then renames the narinfos and fsyncs the top directory, before any path that
/// refers to them is published. A batch of many small paths waits for the disk a few times,
/// not twice per path. One thread publishes at a time; paths that finish meanwhile go into
/// its next batch.
struct Publisher<'a> {
    cache: &'a Cache,
    /// Each path is said as its narinfo is published.
    progress: &'a Progress,
    infos: &'a [PathInfo],
    index: HashMap<&'a StorePath, usize>,
    referrers: Vec<Vec<usize>>,
    /// Whether side files go to `debuginfo/`, which then needs syncing too.
    debuginfo: bool,
    state: Mutex<PubState>,
}

/// A path's share of a batch: its NAR and side files, then its narinfo (none if skipped).
struct Pending {
    files: Vec<Staged>,
    narinfo: Option<Staged>,
}

#[derive(Default)]
struct PubState {
    waiting: HashMap<usize, Done>,
    /// Per path, its references in this closure (itself aside) not yet published.
    unpublished_refs: Vec<usize>,
    /// Waiting paths whose references are all published.
    ready: Vec<usize>,
    published: Vec<bool>,
    /// A thread is publishing; others leave their paths to it.
    publishing: bool,
    report: PushReport,
}

impl<'a> Publisher<'a> {
    fn new(cache: &'a Cache, progress: &'a Progress, infos: &'a [PathInfo], debuginfo: bool) -> Self {
        let index: HashMap<&StorePath, usize> = infos.iter().enumerate().map(|(i, p)| (&p.path, i)).collect();
        let mut referrers = vec![Vec::new(); infos.len()];
        let mut unpublished_refs = vec![0; infos.len()];
        for (i, info) in infos.iter().enumerate() {
            let refs: std::collections::HashSet<usize> =
                info.references.iter().filter_map(|r| index.get(r).copied()).filter(|&j| j != i).collect();
            unpublished_refs[i] = refs.len();
            for j in refs {
                referrers[j].push(i);
            }
        }
        let state = PubState { published: vec![false; infos.len()], unpublished_refs, ..Default::default() };
        Publisher { cache, progress, infos, index, referrers, debuginfo, state: Mutex::new(state) }
    }

    /// Records a finished path and publishes what is ready, unless another thread is
    /// publishing (it takes this path into its next batch). Returns the paths whose narinfo
    /// could not be written; their referrers stay unpublished.
    fn complete(&self, i: usize, done: Done) -> Vec<(usize, PushError)> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.waiting.insert(i, done);
        if st.unpublished_refs[i] == 0 {
            st.ready.push(i);
        }
        if st.publishing {
            return Vec::new();
        }
        st.publishing = true;
        let mut failed = Vec::new();
        loop {
            let mut batch: Vec<(usize, Done)> = std::mem::take(&mut st.ready)
                .into_iter()
                .map(|k| (k, st.waiting.remove(&k).expect("ready paths wait")))
                .collect();
            if batch.is_empty() {
                st.publishing = false;
                return failed;
            }
            drop(st);
            let results = self.write_batch(&mut batch);
            st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            for ((k, done), result) in batch.into_iter().zip(results) {
                if let Err(e) = result {
                    failed.push((k, e));
                    continue;
                }
                st.published[k] = true;
                // Said once the narinfo is in place: a client can fetch it from now on.
                let abs = || done.narinfo.store_dir.display(&self.infos[k].path);
                let sizes = || {
                    format!(
                        "({} -> {})",
                        crate::progress::bytes(done.nar_bytes),
                        crate::progress::bytes(done.file_bytes)
                    )
                };
                match done.outcome {
                    Outcome::Pushed => self.progress.println(&format!("pushed {} {}", abs(), sizes())),
                    Outcome::Repaired => self.progress.println(&format!("repaired {} {}", abs(), sizes())),
                    Outcome::Signed => self.progress.println(&format!("signed {}", abs())),
                    Outcome::Skipped => {}
                }
                let r = &mut st.report;
                match done.outcome {
                    Outcome::Pushed => r.pushed += 1,
                    Outcome::Skipped => r.skipped += 1,
                    Outcome::Signed => r.signed += 1,
                    Outcome::Repaired => r.repaired += 1,
                }
                r.nar_bytes += done.nar_bytes;
                r.file_bytes += done.file_bytes;
                r.outcomes.push((k, done.outcome, done.nar_bytes, done.file_bytes));
                if let Some(nar) = done.narinfo.nar_file() {
                    r.nars.insert(k, (nar, done.narinfo.file_size));
                }
                for &j in &self.referrers[k] {
                    st.unpublished_refs[j] -= 1;
                    if st.unpublished_refs[j] == 0 && st.waiting.contains_key(&j) {
                        st.ready.push(j);
                    }
                }
            }
        }
    }

    /// Puts one batch in place, durably: files, then narinfos. One result per path.
    fn write_batch(&self, batch: &mut [(usize, Done)]) -> Vec<Result<(), PushError>> {
        let pending: Vec<Result<Pending, PushError>> = batch
            .iter_mut()
            .map(|(k, done)| {
                let rel = Cache::narinfo_rel(&self.infos[*k].path);
                let narinfo = match done.outcome {
                    // Only its time is touched, which gc reads.
                    Outcome::Skipped => self.cache.touch(&rel).map(|()| None),
                    _ => self.cache.stage(&rel, done.narinfo.to_string().as_bytes()).map(Some),
                }?;
                Ok(Pending { files: std::mem::take(&mut done.staged), narinfo })
            })
            .collect();
        let staged = || pending.iter().flatten().flat_map(|p| p.files.iter().chain(&p.narinfo));
        if staged().next().is_none() {
            return pending.into_iter().map(|r| r.map(drop)).collect();
        }
        let sync_failed = |e: CacheError| {
            let e = Arc::new(e);
            move |r: Result<(), PushError>| r.and(Err(PushError::Sync(e.clone())))
        };
        if let Err(e) = self.cache.sync_data(staged()) {
            return pending.into_iter().map(|r| r.map(drop)).map(sync_failed(e)).collect();
        }
        // A narinfo may name only a NAR that is in place.
        let narinfos: Vec<Result<Option<Staged>, PushError>> = pending
            .into_iter()
            .map(|r| {
                let p = r?;
                p.files.into_iter().try_for_each(Staged::commit)?;
                Ok(p.narinfo)
            })
            .collect();
        let sync = |sub: &str| self.cache.sync_dir(sub);
        let dirs = if self.debuginfo { sync("nar").and_then(|()| sync("debuginfo")) } else { sync("nar") };
        if let Err(e) = dirs {
            return narinfos.into_iter().map(|r| r.map(drop)).map(sync_failed(e)).collect();
        }
        // The narinfos at once where the storage is a server; `Ok(true)`: one to commit.
        let mut staged = Vec::new();
        let results: Vec<Result<bool, PushError>> = narinfos
            .into_iter()
            .map(|r| {
                r.map(|n| match n {
                    Some(n) => {
                        staged.push(n);
                        true
                    }
                    None => false,
                })
            })
            .collect();
        let mut committed = self.cache.commit_all(staged).into_iter();
        let results: Vec<Result<(), PushError>> = results
            .into_iter()
            .map(|r| match r {
                Ok(true) => Ok(committed.next().expect("one result per narinfo")?),
                Ok(false) => Ok(()),
                Err(e) => Err(e),
            })
            .collect();
        match sync("") {
            // Written but perhaps not durable: nothing may refer to them.
            Err(e) => results.into_iter().map(sync_failed(e)).collect(),
            Ok(()) => results,
        }
    }

    fn fail(&self, i: usize, e: PushError) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.report.failed.push((self.infos[i].path.clone(), e));
    }

    fn finish(self) -> PushReport {
        let mut st = self.state.into_inner().unwrap_or_else(|e| e.into_inner());
        // Whatever still waits has a reference that failed (directly or further down).
        let mut waiting: Vec<usize> = st.waiting.keys().copied().collect();
        waiting.sort();
        for k in waiting {
            let dependency = self.infos[k]
                .references
                .iter()
                .find(|r| self.index.get(r).is_some_and(|&j| j != k && !st.published[j]))
                .cloned()
                .expect("a waiting path has an unpublished reference");
            st.report.failed.push((self.infos[k].path.clone(), PushError::Dependency { dependency }));
        }
        st.report
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
    let run = Run {
        store,
        cache,
        infos,
        opts,
        progress,
        publisher: Publisher::new(cache, progress, infos, opts.index_debug_info),
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
    let worker = || {
        while let Some(unit) = run.queue.next() {
            run.unit(unit);
            run.queue.done();
        }
    };
    match rayon::ThreadPoolBuilder::new()
        .num_threads(jobs)
        .stack_size(32 << 20)
        .thread_name(|i| format!("nixcache-push-{i}"))
        .build()
    {
        Ok(pool) => pool.scope(|s| {
            for _ in 0..jobs {
                s.spawn(|_| worker());
            }
        }),
        // No threads to be had: do the work here.
        Err(_) => worker(),
    }
    run.publisher.finish()
}

/// How many times a push on shared storage pushes again what vanished under it before it
/// gives up ([`missing_now`]).
pub const SETTLE_ROUNDS: usize = 3;

/// The paths of `infos` that are not whole in `cache` now (narinfo and NAR, as the storage
/// answers afresh: a new listing, or a lookup each), by index. Where writers do not exclude
/// each other (a bucket), a gc may have removed what this push found present and skipped, and
/// a server may have lost an acknowledged write: a push checks its closure at the end, pushes
/// again what is missing, and exits 0 only once the check finds it whole.
pub fn missing_now(cache: &Cache, infos: &[PathInfo], report: &PushReport) -> Result<Vec<usize>, CacheError> {
    cache.prepare_lookups(infos.len())?;
    // A lookup that fails counts as missing: the path is pushed again, never skipped.
    let whole = |i: usize| {
        let Some((nar, size)) = report.nars.get(&i) else { return false };
        let holds = |rel: &str, size| cache.holds(rel, size, false).unwrap_or(false);
        holds(&Cache::narinfo_rel(&infos[i].path), None) && holds(nar, *size)
    };
    Ok((0..infos.len()).filter(|&i| !whole(i)).collect())
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
        let d = self.finished.fetch_add(1, Ordering::Relaxed) + 1;
        self.progress.path_done(d, self.infos.len());
    }

    /// Skips, signs or lists a path the cache has; otherwise says what writing it will be.
    fn plan(&self, info: &PathInfo) -> Result<Plan, PushError> {
        let (cache, opts) = (self.cache, self.opts);
        let abs = self.store.store_dir.display(&info.path);
        let (found, existed) = existing(cache, &self.store.store_dir, info, |w| {
            // Never signed or kept as found: rewritten from the store.
            self.progress.warn(&format!("warning: {abs}: {w}; rewriting it"))
        });
        Ok(match found {
            Some(ni)
                if !opts.force && cache.has_nar(&ni) && !(opts.repair && self.nar_is_wrong(&abs, &ni)) =>
            {
                let mut narinfo = ni;
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
            _ if existed && !opts.force => Plan::Write(Outcome::Repaired),
            _ => Plan::Write(Outcome::Pushed),
        })
    }

    /// With `--repair`: whether the NAR a narinfo names is not what the narinfo says (read and
    /// decompressed in full). Says what is wrong.
    fn nar_is_wrong(&self, abs: &str, ni: &NarInfo) -> bool {
        let mut wrong = Vec::new();
        crate::nar_check::check_nar(self.cache, ni, true, &mut |_, m| wrong.push(m));
        if !wrong.is_empty() {
            self.progress.warn(&format!("warning: {abs}: {}; rewriting it", wrong.join("; ")));
        }
        !wrong.is_empty()
    }

    /// The xz parameters of a path whose NAR is compressed a block per unit: one of several
    /// blocks, or one that may have to be stored (which needs its input again, held).
    fn xz_blocks(&self, i: usize) -> Option<xz::Params> {
        self.xz.filter(|p| p.may_store(self.infos[i].nar_size))
    }

    /// Reads the path's NAR for its hash (checked against the database) and its listing.
    fn list_pass(&self, info: &PathInfo) -> Result<Option<Entry>, PushError> {
        let abs = self.store.store_dir.display(&info.path);
        let sink = BufWriter::with_capacity(NAR_BUFFER, HashingWriter::new(io::sink()));
        let (sink, listing) = dump_listing(&self.store.real_path(&info.path), sink, true)?;
        let (_, nar_size, nar_hash) = sink.into_inner().map_err(|e| write_err(e.into_error()))?.finish();
        check_hash(&abs, info, nar_hash, nar_size)?;
        Ok(listing)
    }

    /// Compresses a path in one stream on this thread:
    /// `dump -> (NarSize, NarHash) -> compressor -> (FileSize, FileHash) -> temp file`.
    fn write_streaming(&self, info: &PathInfo, outcome: Outcome) -> Result<Done, PushError> {
        let (cache, opts) = (self.cache, self.opts);
        let abs = self.store.store_dir.display(&info.path);
        let ext = opts.compression.extension();
        let bar = self.progress.path(info.path.as_str(), info.nar_size);
        let tmp = cache.create_file("nar", ext)?;
        let file = HashingWriter::new(BufWriter::with_capacity(FILE_BUFFER, ToCache(tmp)));
        let encoder =
            opts.compression.encoder_for(file, opts.level, info.nar_size, opts.jobs).map_err(write_err)?;
        let nar = HashingWriter::new(ProgressWriter::new(encoder, &bar));
        // The NAR writer emits many 8-16 byte tokens; batch them for the hasher and compressor.
        let nar = BufWriter::with_capacity(NAR_BUFFER, nar);
        let want_listing = opts.nar_listing || opts.index_debug_info;
        let (nar, listing) = dump_listing(&self.store.real_path(&info.path), nar, want_listing)?;
        let nar = nar.into_inner().map_err(|e| write_err(e.into_error()))?;
        let (shown, nar_size, nar_hash) = nar.finish();
        let file = shown.into_inner().finish().map_err(write_err)?;
        let (buffered, file_size, file_hash) = file.finish();
        let ToCache(tmp) = buffered.into_inner().map_err(|e| write_err(e.into_error()))?;
        drop(bar);
        check_hash(&abs, info, nar_hash, nar_size)?;
        self.publish_nar(info, tmp, outcome, (nar_size, nar_hash), (file_size, file_hash), listing.as_ref())
    }

    /// Opens the output of a path compressed a block per unit.
    fn open_blocks(&self, i: usize, params: xz::Params, outcome: Outcome) -> Result<Blocked, PushError> {
        let info = &self.infos[i];
        let tmp = self.cache.create_file("nar", self.opts.compression.extension())?;
        let mut out = HashingWriter::new(BufWriter::with_capacity(FILE_BUFFER, ToCache(tmp)));
        out.write_all(&xz::stream_header()).map_err(write_err)?;
        Ok(Blocked {
            params,
            outcome,
            bar: self.progress.path(info.path.as_str(), info.nar_size),
            limit: self.opts.jobs.max(1) + 1,
            spool: scratch(self.cache).map_err(write_err)?,
            state: Mutex::new(BlockedState {
                out: Some(out),
                input: Vec::new(),
                free: Vec::new(),
                slots: 0,
                untaken: 0,
                held: 0,
                waiting: Vec::new(),
                next: 0,
                blocks: Vec::new(),
                read: None,
                left: 1,
                error: None,
            }),
            freed: Condvar::new(),
        })
    }

    /// Reads the NAR of a path compressed a block per unit (unit `u`), once: hashes it and
    /// cuts it into blocks, each queued as a unit as soon as it is cut, so other threads
    /// compress while this one reads. With `limit` blocks held, this thread compresses the
    /// oldest one no thread has taken, or waits for one to finish. Nothing is published
    /// unless the NarHash of what was read is the one the database records. Returns the
    /// path's result if this was its last unit.
    fn read_blocks(&self, i: usize, b: &Blocked, u: Unit) -> Option<Result<Done, PushError>> {
        let info = &self.infos[i];
        let want_listing = self.opts.nar_listing || self.opts.index_debug_info;
        let cutter = Cutter { run: self, b, unit: u, slot: None, len: 0 };
        let nar = HashingWriter::new(cutter);
        let nar = BufWriter::with_capacity(NAR_BUFFER, nar);
        let read = dump_listing(&self.store.real_path(&info.path), nar, want_listing)
            .map_err(PushError::from)
            .and_then(|(nar, listing)| {
                let (mut cutter, nar_size, nar_hash) =
                    nar.into_inner().map_err(|e| write_err(e.into_error()))?.finish();
                cutter.cut(false).map_err(write_err)?;
                check_hash(&self.store.store_dir.display(&info.path), info, nar_hash, nar_size)?;
                Ok(ReadPass { listing, nar_size, nar_hash })
            });
        {
            let mut st = b.lock();
            match read {
                Ok(p) => st.read = Some(p),
                // A corrupt path says more than a block's error; a block's error is why
                // the read stopped.
                Err(e @ PushError::Corrupt { .. }) => st.error = Some(e),
                Err(e) => {
                    st.error.get_or_insert(e);
                }
            }
        }
        // The blocks no thread has taken yet are units in the queue, taken in their turn.
        let mut st = b.lock();
        st.left -= 1;
        (st.left == 0).then(|| self.finish_blocks(info, b, &mut st))
    }

    /// Compresses block `k` of path `i` unless the reading thread already took it. Returns
    /// the path's result when this was its last unit to finish.
    fn block(&self, i: usize, b: &Blocked, k: usize) -> Option<Result<Done, PushError>> {
        let input = b.lock().input[k].take();
        if let Some(input) = input {
            self.compress_block(b, k, input);
        }
        let mut st = b.lock();
        st.left -= 1;
        (st.left == 0).then(|| self.finish_blocks(&self.infos[i], b, &mut st))
    }

    /// Compresses block `k` (its `input`, read back from the path's spool file), or stores
    /// it as liblzma's multithreaded encoder would, then appends every block that is next in
    /// order to the output. Skipped once the path has failed.
    fn compress_block(&self, b: &Blocked, k: usize, input: Input) {
        let compressed = if b.lock().error.is_some() {
            None
        } else {
            let mut piece = vec![0u8; INPUT_PIECE.min(input.len as usize)];
            let mut encode = |stored: bool| {
                let spill = Spill { cache: self.cache, data: SpillData::Memory(Vec::new()) };
                let mut enc = if stored {
                    xz::BlockEncoder::stored(spill, input.len)
                } else {
                    xz::BlockEncoder::new(&b.params, spill)?
                };
                let mut done = 0;
                while done < input.len {
                    let n = (input.len - done).min(piece.len() as u64) as usize;
                    b.spool.read_exact_at(&mut piece[..n], input.offset(&b.params) + done).map_err(tag)?;
                    enc.write_all(&piece[..n])?;
                    done += n as u64;
                    // Progress is what is compressed (counted once: a stored block was first
                    // compressed), which is what the push waits for.
                    if !stored {
                        b.bar.inc(n as u64);
                    }
                }
                enc.finish().map(|(spill, block)| (spill.data, block))
            };
            Some(encode(false).and_then(|(spill, block)| {
                if !b.params.would_store(&block) {
                    return Ok((spill, block));
                }
                drop(spill);
                encode(true)
            }))
        };
        let mut st = b.lock();
        st.release(input);
        b.freed.notify_all();
        match compressed {
            Some(Ok(done)) => st.waiting[k] = Some(done),
            Some(Err(e)) => {
                st.error.get_or_insert(write_err(e));
            }
            None => {}
        }
        if st.error.is_none()
            && let Err(e) = st.append_ready(&b.params)
        {
            st.error = Some(write_err(e));
        }
    }

    /// Once every unit of a path compressed a block per unit is done: ends the stream and
    /// puts its NAR in place.
    fn finish_blocks(&self, info: &PathInfo, b: &Blocked, st: &mut BlockedState) -> Result<Done, PushError> {
        if let Some(e) = st.error.take() {
            return Err(e);
        }
        let pass = st.read.take().expect("the read succeeded when nothing failed");
        debug_assert_eq!(st.next, st.input.len(), "every block is appended");
        let mut out = st.out.take().expect("finished once");
        out.write_all(&xz::index_and_footer(&b.params, &st.blocks)).map_err(write_err)?;
        let (buffered, file_size, file_hash) = out.finish();
        let ToCache(tmp) = buffered.into_inner().map_err(|e| write_err(e.into_error()))?;
        let nar = (pass.nar_size, pass.nar_hash);
        self.publish_nar(info, tmp, b.outcome, nar, (file_size, file_hash), pass.listing.as_ref())
    }

    /// Moves a written NAR into place with its side files; returns the narinfo to publish.
    fn publish_nar(
        &self,
        info: &PathInfo,
        tmp: Box<dyn NewFile>,
        outcome: Outcome,
        (nar_size, nar_hash): (u64, NixHash),
        (file_size, file_hash): (u64, NixHash),
        listing: Option<&Entry>,
    ) -> Result<Done, PushError> {
        let (cache, opts) = (self.cache, self.opts);
        let url = crate::layout::nar_name(&file_hash.to_nix32(), opts.compression.extension());
        // Made durable and put in place before its narinfo (see Publisher).
        let mut staged = vec![tmp.stage(&url)?];
        staged.extend(side_files(cache, info, &url, listing, opts)?);
        let mut narinfo = NarInfo {
            store_dir: self.store.store_dir.clone(),
            store_path: info.path.clone(),
            url,
            compression: opts.compression.name().to_owned(),
            file_hash: Some(file_hash),
            file_size: Some(file_size),
            nar_hash,
            nar_size,
            references: info.references.clone(),
            deriver: info.deriver.clone(),
            system: None,
            sigs: info.sigs.clone(),
            ca: info.ca.clone(),
            extra: Vec::new(),
        };
        for k in &opts.keys {
            narinfo.add_signature(k);
        }
        Ok(Done { narinfo, outcome, staged, nar_bytes: nar_size, file_bytes: file_size })
    }
}

/// An error from a write into the cache, tagged so that it keeps its meaning on its way up
/// through the NAR writer (which reports errors as the store file it was archiving).
#[derive(Debug, Error)]
#[error("writing to the cache failed")]
struct CacheWriteFailed(#[source] io::Error);

/// A writer into the cache: its errors are tagged as the cache's.
struct ToCache<W>(W);

impl<W: Write> Write for ToCache<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(tag)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(tag)
    }
}

fn tag(e: io::Error) -> io::Error {
    if e.get_ref().is_some_and(|r| r.is::<CacheWriteFailed>()) {
        return e;
    }
    io::Error::new(e.kind(), CacheWriteFailed(e))
}

/// The error for a failed write into the cache: a full disk says so.
fn write_err(e: io::Error) -> PushError {
    let e = if e.get_ref().is_some_and(|r| r.is::<CacheWriteFailed>()) {
        let kind = e.kind();
        match e.into_inner().map(|inner| inner.downcast::<CacheWriteFailed>()) {
            Some(Ok(tagged)) => tagged.0,
            _ => kind.into(),
        }
    } else {
        e
    };
    if is_full(&e) { PushError::CacheFull(e) } else { PushError::CacheWrite(e) }
}

impl From<DumpError> for PushError {
    /// A failed write into the cache is the cache's, not the store file's being read.
    fn from(e: DumpError) -> Self {
        if e.source.get_ref().is_some_and(|r| r.is::<CacheWriteFailed>()) {
            return write_err(e.source);
        }
        PushError::Dump(e)
    }
}

/// What the read of a path compressed a block per unit learns of its NAR.
struct ReadPass {
    listing: Option<Entry>,
    nar_size: u64,
    nar_hash: NixHash,
}

/// A NAR file being written, hashed on its way to the cache.
type CacheOut = HashingWriter<BufWriter<ToCache<Box<dyn NewFile>>>>;

/// A path whose xz blocks are compressed as separate units.
struct Blocked {
    params: xz::Params,
    outcome: Outcome,
    bar: PathProgress,
    /// Blocks of input held at most (cut and not yet compressed): one more than `--jobs`,
    /// so that a block is ready for each thread that finishes one while the reading thread
    /// compresses another.
    limit: usize,
    /// An unnamed file holding the input of the blocks cut and not yet compressed, a block
    /// size per slot: in the page cache, which the kernel can write out, not on the heap.
    /// Slots are reused, so it grows to `limit` + 1 blocks at most.
    spool: File,
    state: Mutex<BlockedState>,
    /// A block's input was let go.
    freed: Condvar,
}

impl Blocked {
    fn lock(&self) -> std::sync::MutexGuard<'_, BlockedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the input of the oldest block no thread has taken (none once the path failed).
    fn take_next(&self, st: &mut BlockedState) -> Option<(usize, Input)> {
        while st.untaken < st.input.len() {
            let k = st.untaken;
            st.untaken += 1;
            if let Some(input) = st.input[k].take() {
                if st.error.is_some() {
                    st.release(input);
                    continue;
                }
                return Some((k, input));
            }
        }
        None
    }
}

/// The input of a block cut and not yet compressed: `len` bytes in slot `slot` of its path's
/// spool file.
#[derive(Clone, Copy, Debug)]
struct Input {
    slot: u64,
    len: u64,
}

impl Input {
    fn offset(&self, params: &xz::Params) -> u64 {
        self.slot * params.block_size()
    }
}

struct BlockedState {
    out: Option<CacheOut>,
    /// The input of each block cut, until a thread takes it.
    input: Vec<Option<Input>>,
    /// Slots of the spool file no block holds.
    free: Vec<u64>,
    /// Slots of the spool file so far.
    slots: u64,
    /// Blocks before this one have been taken.
    untaken: usize,
    /// Blocks of input cut and not yet compressed.
    held: usize,
    /// Blocks compressed but not yet appended (a later block finished first).
    waiting: Vec<Option<(SpillData, xz::Block)>>,
    /// The next block to append.
    next: usize,
    /// Blocks appended, for the index.
    blocks: Vec<xz::Block>,
    /// What the read found, once it is done.
    read: Option<ReadPass>,
    /// Units not yet done: the read and the blocks queued.
    left: usize,
    error: Option<PushError>,
}

impl BlockedState {
    /// A slot of the spool file for the next block's input.
    fn take_slot(&mut self) -> u64 {
        self.free.pop().unwrap_or_else(|| {
            self.slots += 1;
            self.slots - 1
        })
    }

    /// The input of a block is compressed (or will never be): its slot is free again.
    fn release(&mut self, input: Input) {
        self.held -= 1;
        self.free.push(input.slot);
    }

    /// Appends the blocks that are next in order.
    fn append_ready(&mut self, params: &xz::Params) -> io::Result<()> {
        let out = self.out.as_mut().expect("open until finished");
        while let Some(Some((spill, block))) = self.waiting.get_mut(self.next).map(Option::take) {
            out.write_all(&xz::block_header(params, &block))?;
            spill.copy_to(out)?;
            out.write_all(&xz::block_trailer(&block))?;
            self.blocks.push(block);
            self.next += 1;
        }
        Ok(())
    }
}

/// The end of the read of a path compressed a block per unit: cuts the NAR into blocks of
/// the block size, written to a slot of the path's spool file, and queues each.
struct Cutter<'r, 'a> {
    run: &'r Run<'a>,
    b: &'r Blocked,
    unit: Unit,
    /// The slot the block being cut is written to.
    slot: Option<u64>,
    /// Bytes of the block being cut.
    len: u64,
}

/// The read stopped because a block of the path failed (that error is the path's).
#[derive(Debug, Error)]
#[error("stopped: a block of this path failed")]
struct Stopped;

impl Cutter<'_, '_> {
    /// Queues the bytes read since the last cut as a block; then, unless this was the last
    /// cut (`more` is false), holds the read while `limit` blocks are held: compresses the
    /// oldest one no thread has taken, or waits.
    fn cut(&mut self, more: bool) -> io::Result<()> {
        let b = self.b;
        let mut st = b.lock();
        if st.error.is_some() {
            return Err(io::Error::other(Stopped));
        }
        if let Some(slot) = self.slot.take() {
            let k = st.input.len();
            let len = std::mem::take(&mut self.len);
            st.input.push(Some(Input { slot, len }));
            st.waiting.push(None);
            st.held += 1;
            st.left += 1;
            self.run.queue.add([Unit { bytes: Reverse(len), block: k + 1, ..self.unit }]);
        }
        while more && st.held >= b.limit && st.error.is_none() {
            match b.take_next(&mut st) {
                Some((k, data)) => {
                    drop(st);
                    self.run.compress_block(b, k, data);
                    st = b.lock();
                }
                None => st = b.freed.wait(st).unwrap_or_else(|e| e.into_inner()),
            }
        }
        if st.error.is_some() {
            return Err(io::Error::other(Stopped));
        }
        Ok(())
    }
}

impl Write for Cutter<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let b = self.b;
        let size = b.params.block_size();
        let slot = match self.slot {
            Some(slot) => slot,
            None => *self.slot.insert(b.lock().take_slot()),
        };
        let n = buf.len().min((size - self.len) as usize);
        b.spool.write_all_at(&buf[..n], slot * size + self.len).map_err(tag)?;
        self.len += n as u64;
        if self.len == size {
            self.cut(true)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A finished block's compressed bytes: in memory while small, then in an unnamed file.
struct Spill<'a> {
    cache: &'a Cache,
    data: SpillData,
}

enum SpillData {
    Memory(Vec<u8>),
    File(File),
}

impl SpillData {
    fn copy_to(self, out: &mut impl Write) -> io::Result<()> {
        match self {
            SpillData::Memory(v) => out.write_all(&v),
            SpillData::File(mut f) => {
                f.seek(SeekFrom::Start(0))?;
                io::copy(&mut f, out).map(drop)
            }
        }
    }
}

impl Write for Spill<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let SpillData::Memory(v) = &mut self.data
            && v.len() + buf.len() > SPILL_IN_MEMORY
        {
            let mut f = scratch(self.cache)?;
            f.write_all(v).map_err(tag)?;
            self.data = SpillData::File(f);
        }
        match &mut self.data {
            SpillData::Memory(v) => v.write(buf),
            SpillData::File(f) => f.write(buf).map_err(tag),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An unnamed file beside the cache (a directory's, or the temporary directory for a
/// bucket), its errors tagged as the cache's.
fn scratch(cache: &Cache) -> io::Result<File> {
    cache.scratch().map_err(|e| match e {
        CacheError::Storage(crate::cache::StorageError::Io { source, .. }) => tag(source),
        e => tag(io::Error::other(e)),
    })
}

fn listing_rel(p: &StorePath) -> String {
    crate::layout::listing_name(p.hash_part())
}

/// What the cache holds for `info`: its narinfo if it says what the store says (else `warn`
/// is told how it differs), and whether any narinfo file is there at all.
pub fn existing(
    cache: &Cache,
    store_dir: &crate::store_path::StoreDir,
    info: &PathInfo,
    warn: impl FnOnce(&str),
) -> (Option<NarInfo>, bool) {
    match cache.lookup(&info.path) {
        Lookup::Missing => (None, false),
        Lookup::Invalid(_) => (None, true),
        Lookup::Found(ni) => {
            let wrong = disagreement(&ni, info, store_dir);
            if !wrong.is_empty() {
                warn(&format!("the cache's narinfo disagrees with the store ({})", wrong.join(", ")));
            }
            (wrong.is_empty().then_some(*ni), true)
        }
    }
}

/// The fields in which a narinfo found in the cache differs from what the store says of the
/// path: everything a signature or a client depends on.
fn disagreement(ni: &NarInfo, info: &PathInfo, store_dir: &crate::store_path::StoreDir) -> Vec<&'static str> {
    let sorted = |v: &[StorePath]| {
        let mut v = v.to_vec();
        v.sort();
        v.dedup();
        v
    };
    let mut wrong = Vec::new();
    if &ni.store_dir != store_dir || ni.store_path != info.path {
        wrong.push("StorePath");
    }
    if ni.nar_hash != info.nar_hash {
        wrong.push("NarHash");
    }
    if info.nar_size != 0 && ni.nar_size != info.nar_size {
        wrong.push("NarSize");
    }
    if sorted(&ni.references) != sorted(&info.references) {
        wrong.push("References");
    }
    if ni.deriver != info.deriver {
        wrong.push("Deriver");
    }
    if ni.ca != info.ca {
        wrong.push("CA");
    }
    wrong
}

/// The NAR made from the store must be the one Nix registered.
fn check_hash(abs: &str, info: &PathInfo, nar_hash: NixHash, nar_size: u64) -> Result<(), PushError> {
    if nar_hash != info.nar_hash || (info.nar_size != 0 && nar_size != info.nar_size) {
        return Err(PushError::Corrupt {
            path: abs.to_owned(),
            expected: info.nar_hash,
            actual: nar_hash,
            expected_size: info.nar_size,
            actual_size: nar_size,
        });
    }
    Ok(())
}

/// The listing and debug-info links, staged to go in place after the NAR and before the
/// narinfo.
fn side_files(
    cache: &Cache,
    info: &PathInfo,
    url: &str,
    listing: Option<&Entry>,
    opts: &PushOptions,
) -> Result<Vec<Staged>, PushError> {
    let mut staged = Vec::new();
    let Some(listing) = listing else { return Ok(staged) };
    if opts.nar_listing {
        staged.push(cache.stage(&listing_rel(&info.path), &listing.to_listing_json())?);
    }
    if opts.index_debug_info {
        for (key, member) in listing.debug_files() {
            let rel = crate::layout::debuginfo_name(&key);
            // Like Nix: the first NAR that provides a build id keeps it.
            if cache.file_size(&rel).is_none() {
                staged.push(cache.stage(&rel, &debuginfo_json(url, &member))?);
            }
        }
    }
    Ok(staged)
}
