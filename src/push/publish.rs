//! Publishing: narinfos in dependency order as paths finish, a batch at a time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Done, Outcome, PushError, PushReport};
use crate::cache::{Cache, CacheError, Staged};
use crate::path_info::PathInfo;
use crate::progress::Progress;
use crate::store_path::StorePath;

/// Publishes narinfos in dependency order as paths finish, a batch at a time.
///
/// Workers leave each NAR and side file staged (written, closed, under a temporary name).
/// A batch stages its narinfos, makes all of it durable at once ([`Cache::sync_data`]: the
/// files' fsyncs in parallel), renames the NARs and side files into place and fsyncs their
/// directories, then renames the narinfos and fsyncs the top directory, before any path that
/// refers to them is published. A batch of many small paths waits for the disk a few times,
/// not twice per path. One thread publishes at a time; paths that finish meanwhile go into
/// its next batch.
///
/// Where a commit waits on a link (a remote cache: each NAR's upload, each narinfo's check on
/// the receiver), publishing runs on a thread of its own ([`Publisher::run_in_background`]),
/// so no worker stops compressing to wait for the link.
pub(super) struct Publisher<'a> {
    pub(super) cache: &'a Cache,
    /// Each path is said as its narinfo is published.
    pub(super) progress: &'a Progress,
    pub(super) infos: &'a [PathInfo],
    pub(super) index: HashMap<&'a StorePath, usize>,
    pub(super) referrers: Vec<Vec<usize>>,
    /// Whether side files go to `debuginfo/`, which then needs syncing too.
    pub(super) debuginfo: bool,
    pub(super) state: Mutex<PubState>,
    /// Publishing runs on a thread of its own, woken here.
    pub(super) background: bool,
    pub(super) wake: std::sync::Condvar,
}

/// A path's share of a batch: its NAR and side files, then its narinfo (none if skipped).
pub(super) struct Pending {
    files: Vec<Staged>,
    narinfo: Option<Staged>,
}

#[derive(Default)]
pub(super) struct PubState {
    waiting: HashMap<usize, Done>,
    /// Per path, its references in this closure (itself aside) not yet published.
    unpublished_refs: Vec<usize>,
    /// Waiting paths whose references are all published.
    ready: Vec<usize>,
    published: Vec<bool>,
    /// A thread is publishing; others leave their paths to it.
    publishing: bool,
    /// The workers have all finished (with a background publisher: nothing more will come).
    workers_done: bool,
    report: PushReport,
}

impl<'a> Publisher<'a> {
    pub(super) fn new(
        cache: &'a Cache,
        progress: &'a Progress,
        infos: &'a [PathInfo],
        debuginfo: bool,
        background: bool,
    ) -> Self {
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
        Publisher {
            cache,
            progress,
            infos,
            index,
            referrers,
            debuginfo,
            state: Mutex::new(state),
            background,
            wake: std::sync::Condvar::new(),
        }
    }

    /// Records a finished path and publishes what is ready, unless another thread is
    /// publishing (it takes this path into its next batch). Returns the paths whose narinfo
    /// could not be written; their referrers stay unpublished.
    pub(super) fn complete(&self, i: usize, done: Done) -> Vec<(usize, PushError)> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.waiting.insert(i, done);
        if st.unpublished_refs[i] == 0 {
            st.ready.push(i);
        }
        if self.background {
            self.wake.notify_one();
            return Vec::new();
        }
        if st.publishing {
            return Vec::new();
        }
        self.publish_ready(st)
    }

    /// Publishes until nothing is ready, from `st` (locked), then lets go of the lock.
    fn publish_ready<'s>(&'s self, mut st: std::sync::MutexGuard<'s, PubState>) -> Vec<(usize, PushError)> {
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
    pub(super) fn write_batch(&self, batch: &mut [(usize, Done)]) -> Vec<Result<(), PushError>> {
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

    /// The background publisher: publishes what becomes ready until the workers are done and
    /// nothing is left, handing what failed to `report`.
    pub(super) fn run_in_background(&self, report: impl Fn(Vec<(usize, PushError)>)) {
        loop {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            while st.ready.is_empty() && !st.workers_done {
                st = self.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.ready.is_empty() {
                return;
            }
            report(self.publish_ready(st));
        }
    }

    /// Says the workers have finished: a background publisher ends once it has published
    /// what is ready.
    pub(super) fn workers_done(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).workers_done = true;
        self.wake.notify_all();
    }

    pub(super) fn fail(&self, i: usize, e: PushError) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.report.failed.push((self.infos[i].path.clone(), e));
    }

    pub(super) fn finish(self) -> PushReport {
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
