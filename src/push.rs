//! The push pipeline: store paths in, a cache that real Nix accepts out.
//!
//! Each path streams once through
//! `dump -> (NarSize, NarHash) -> compressor -> (FileSize, FileHash) -> temp file`, so nothing
//! is held whole in memory. Paths run in parallel, largest first. A narinfo is published only
//! after its NAR is in place and after the narinfos of all its references, so a run killed at
//! any moment leaves a cache in which every narinfo a client can fetch is complete.

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufWriter, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use thiserror::Error;

use crate::cache::{Cache, CacheError, Lookup};
use crate::compression::Compression;
use crate::hash::{HashingWriter, NixHash};
use crate::nar::dump::{DumpError, dump_listing};
use crate::nar::listing::{Entry, debuginfo_json};
use crate::narinfo::NarInfo;
use crate::progress::{Progress, ProgressWriter};
use crate::signing::SecretKey;
use crate::store::{PathInfo, StoreLocation};
use crate::store_path::StorePath;

/// Bytes of NAR batched before they reach the hasher and the compressor.
const NAR_BUFFER: usize = 256 << 10;

/// NARs at least this large ask for the whole thread budget for their compressor: two of
/// xz's 24 MiB blocks at level 6, so that a second thread has work.
const LARGE_NAR: u64 = 48 << 20;

/// Hands out paths, largest first, with compressor threads from a budget of `--jobs`.
///
/// More compressor threads than cores cost memory (each xz thread holds ~140 MB at level 6)
/// and cache contention, so the budget is never exceeded. A path that wants more threads
/// than are free waits while a smaller one that fits goes first: when a large path's
/// compressor is down to its last block, the core it frees runs another path instead of
/// idling.
struct Scheduler {
    state: Mutex<SchedState>,
    changed: Condvar,
}

struct SchedState {
    /// (index, threads wanted), largest NAR first.
    queue: VecDeque<(usize, usize)>,
    free: usize,
}

impl Scheduler {
    fn new(queue: VecDeque<(usize, usize)>, jobs: usize) -> Self {
        Scheduler { state: Mutex::new(SchedState { queue, free: jobs }), changed: Condvar::new() }
    }

    /// The next path and its threads, or `None` when all are handed out.
    fn next(&self) -> Option<(usize, Threads<'_>)> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if st.queue.is_empty() {
                return None;
            }
            let free = st.free;
            if let Some(pos) = st.queue.iter().position(|&(_, want)| want <= free) {
                let (i, n) = st.queue.remove(pos).expect("found");
                st.free -= n;
                return Some((i, Threads { sched: self, n }));
            }
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn give_back(&self, n: usize) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).free += n;
        self.changed.notify_all();
    }
}

/// Compressor threads of one path, given back on drop.
struct Threads<'a> {
    sched: &'a Scheduler,
    n: usize,
}

impl Threads<'_> {
    /// Gives back all threads but one: called once all input is in the compressor, whose
    /// other threads then run out of blocks.
    fn keep_one(&mut self) {
        if self.n > 1 {
            self.sched.give_back(self.n - 1);
            self.n = 1;
        }
    }
}

impl Drop for Threads<'_> {
    fn drop(&mut self) {
        self.sched.give_back(self.n);
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
    Dump(#[from] DumpError),
    #[error(
        "{path} is corrupt in the store: its contents hash to {actual} ({actual_size} bytes) but the Nix database records {expected} ({expected_size} bytes); repair it with `nix-store --verify --check-contents --repair`"
    )]
    Corrupt { path: String, expected: NixHash, actual: NixHash, expected_size: u64, actual_size: u64 },
    #[error("cannot write the NAR of {path}")]
    Write { path: String, source: io::Error },
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("not published because its reference {dependency} failed")]
    Dependency { dependency: StorePath },
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
}

impl PushReport {
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

struct Done {
    narinfo: NarInfo,
    outcome: Outcome,
    nar_bytes: u64,
    file_bytes: u64,
}

/// Publishes narinfos in dependency order as paths finish.
struct Publisher<'a> {
    cache: &'a Cache,
    infos: &'a [PathInfo],
    index: HashMap<&'a StorePath, usize>,
    referrers: Vec<Vec<usize>>,
    state: Mutex<PubState>,
}

#[derive(Default)]
struct PubState {
    waiting: HashMap<usize, Done>,
    published: Vec<bool>,
    report: PushReport,
}

impl<'a> Publisher<'a> {
    fn new(cache: &'a Cache, infos: &'a [PathInfo]) -> Self {
        let index: HashMap<&StorePath, usize> = infos.iter().enumerate().map(|(i, p)| (&p.path, i)).collect();
        let mut referrers = vec![Vec::new(); infos.len()];
        for (i, info) in infos.iter().enumerate() {
            for r in &info.references {
                if let Some(&j) = index.get(r)
                    && j != i
                {
                    referrers[j].push(i);
                }
            }
        }
        let state = PubState { published: vec![false; infos.len()], ..Default::default() };
        Publisher { cache, infos, index, referrers, state: Mutex::new(state) }
    }

    fn ready(&self, st: &PubState, i: usize) -> bool {
        self.infos[i].references.iter().all(|r| match self.index.get(r) {
            Some(&j) => j == i || st.published[j],
            None => true,
        })
    }

    /// Records a finished path and publishes everything that became ready.
    fn complete(&self, i: usize, done: Done) -> Result<(), PushError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.waiting.insert(i, done);
        let mut work = vec![i];
        let mut first_err = None;
        while let Some(k) = work.pop() {
            if !st.waiting.contains_key(&k) || !self.ready(&st, k) {
                continue;
            }
            let done = st.waiting.remove(&k).expect("checked");
            let rel = Cache::narinfo_rel(&self.infos[k].path);
            let written = match done.outcome {
                Outcome::Skipped => self.cache.touch(&rel),
                _ => self.cache.write_atomic(&rel, done.narinfo.to_string().as_bytes()),
            };
            if let Err(e) = written {
                // Report against the path itself; its dependents stay unpublished.
                if k == i {
                    first_err = Some(e);
                } else {
                    st.report.failed.push((self.infos[k].path.clone(), e.into()));
                }
                continue;
            }
            st.published[k] = true;
            let r = &mut st.report;
            match done.outcome {
                Outcome::Pushed => r.pushed += 1,
                Outcome::Skipped => r.skipped += 1,
                Outcome::Signed => r.signed += 1,
                Outcome::Repaired => r.repaired += 1,
            }
            r.nar_bytes += done.nar_bytes;
            r.file_bytes += done.file_bytes;
            work.extend(self.referrers[k].iter().copied());
        }
        first_err.map_or(Ok(()), |e| Err(e.into()))
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
    let publisher = Publisher::new(cache, infos);
    let jobs = opts.jobs.max(1);
    // Only xz has a multithreaded mode whose output does not depend on the thread count.
    let multithreaded = opts.compression == Compression::Xz;
    let mut order: Vec<usize> = (0..infos.len()).collect();
    order.sort_by(|&a, &b| infos[b].nar_size.cmp(&infos[a].nar_size).then(a.cmp(&b)));
    let queue = order
        .into_iter()
        .map(|i| (i, if multithreaded && infos[i].nar_size >= LARGE_NAR { jobs } else { 1 }))
        .collect();
    let scheduler = Scheduler::new(queue, jobs);
    let finished = AtomicUsize::new(0);
    let worker = || {
        while let Some((i, mut threads)) = scheduler.next() {
            let info = &infos[i];
            let result = process(store, cache, info, opts, progress, &mut threads)
                .and_then(|done| publisher.complete(i, done));
            if let Err(e) = result {
                progress.warn(&format!(
                    "error: {}: {}",
                    store.store_dir.display(&info.path),
                    crate::error_chain(&e)
                ));
                publisher.fail(i, e);
            }
            let d = finished.fetch_add(1, Ordering::Relaxed) + 1;
            progress.path_done(d, infos.len());
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
    publisher.finish()
}

fn process(
    store: &StoreLocation,
    cache: &Cache,
    info: &PathInfo,
    opts: &PushOptions,
    progress: &Progress,
    threads: &mut Threads<'_>,
) -> Result<Done, PushError> {
    let sd = &store.store_dir;
    let abs = sd.display(&info.path);
    let existing = cache.lookup(&info.path)?;
    let outcome = match existing {
        Lookup::Found(ni) if !opts.force && ni.nar_hash == info.nar_hash && cache.has_nar(&ni) => {
            let mut narinfo = *ni;
            let mut added = false;
            for k in &opts.keys {
                if !narinfo.verified_by(&[k.public_key()]) {
                    added |= narinfo.add_signature(k);
                }
            }
            if opts.nar_listing && cache.file_size(&listing_rel(&info.path)).is_none() {
                // Listing missing for a path that is otherwise there: list it from the store.
                let (sink, listing) =
                    dump_listing(&store.real_path(&info.path), HashingWriter::new(io::sink()), true)?;
                let (_, nar_size, nar_hash) = sink.finish();
                check_hash(&abs, info, nar_hash, nar_size)?;
                write_side_files(cache, info, &narinfo.url, listing.as_ref(), opts)?;
            }
            let outcome = if added { Outcome::Signed } else { Outcome::Skipped };
            if outcome == Outcome::Signed {
                progress.println(&format!("signed {abs}"));
            }
            return Ok(Done { narinfo, outcome, nar_bytes: 0, file_bytes: 0 });
        }
        Lookup::Found(_) | Lookup::Invalid(_) if !opts.force => Outcome::Repaired,
        _ => Outcome::Pushed,
    };

    let ext = opts.compression.extension();
    let bar = progress.path(info.path.as_str(), info.nar_size);
    let mut tmp = cache.temp_file("nar", ext)?;
    let write_err = |source| PushError::Write { path: abs.clone(), source };
    let (nar_size, nar_hash, file_size, file_hash, listing) = {
        let file = HashingWriter::new(BufWriter::with_capacity(1 << 20, tmp.file()));
        let encoder = opts.compression.encoder(file, opts.level, threads.n as u32).map_err(write_err)?;
        let nar = HashingWriter::new(ProgressWriter::new(encoder, &bar));
        // The NAR writer emits many 8-16 byte tokens; batch them so the compressor (whose
        // multithreaded mode takes locks on every call) and the hasher see large chunks.
        let nar = BufWriter::with_capacity(NAR_BUFFER, nar);
        let want_listing = opts.nar_listing || opts.index_debug_info;
        let (nar, listing) = dump_listing(&store.real_path(&info.path), nar, want_listing)?;
        let nar = nar.into_inner().map_err(|e| write_err(e.into_error()))?;
        threads.keep_one();
        let (shown, nar_size, nar_hash) = nar.finish();
        let file = shown.into_inner().finish().map_err(write_err)?;
        let (mut buffered, file_size, file_hash) = file.finish();
        buffered.flush().map_err(write_err)?;
        (nar_size, nar_hash, file_size, file_hash, listing)
    };
    drop(bar);
    check_hash(&abs, info, nar_hash, nar_size)?;
    let url = format!("nar/{}{ext}", file_hash.to_nix32());
    tmp.persist(&cache.path(&url))?;
    write_side_files(cache, info, &url, listing.as_ref(), opts)?;

    let mut narinfo = NarInfo {
        store_dir: sd.clone(),
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
    progress.println(&format!(
        "{} {abs} ({} -> {})",
        if outcome == Outcome::Repaired { "repaired" } else { "pushed" },
        crate::progress::bytes(nar_size),
        crate::progress::bytes(file_size)
    ));
    Ok(Done { narinfo, outcome, nar_bytes: nar_size, file_bytes: file_size })
}

fn listing_rel(p: &StorePath) -> String {
    format!("{}.ls", p.hash_part())
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

/// The listing and debug-info links, written after the NAR and before the narinfo.
fn write_side_files(
    cache: &Cache,
    info: &PathInfo,
    url: &str,
    listing: Option<&Entry>,
    opts: &PushOptions,
) -> Result<(), PushError> {
    let Some(listing) = listing else { return Ok(()) };
    if opts.nar_listing {
        cache.write_atomic(&listing_rel(&info.path), &listing.to_listing_json())?;
    }
    if opts.index_debug_info {
        for (key, member) in listing.debug_files() {
            let rel = format!("debuginfo/{key}");
            // Like Nix: the first NAR that provides a build id keeps it.
            if cache.file_size(&rel).is_none() {
                cache.write_atomic(&rel, &debuginfo_json(url, &member))?;
            }
        }
    }
    Ok(())
}
