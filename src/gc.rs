//! Closure-aware garbage collection of a cache directory.
//!
//! A path stays if a push named or walked it within the window (its narinfo's modification
//! time, which push touches) or if it is in the closure of a `--keep` path, and only if it is
//! complete: its NAR is there and everything it references stays. Everything else goes, in
//! an order that never shows a client a narinfo whose references are gone, even after a
//! power cut: narinfos of referrers before those of their references (in layers, the
//! directory synced between them), then NAR files no remaining narinfo uses, listings and
//! debug-info links of what went, and stale temporary files.
//!
//! Invariant afterwards: every remaining narinfo has its NAR and all its references, here or,
//! in a partial cache, left to an upstream on purpose as its upstreams records say (gc never
//! deletes a path because an upstream has it, and keeps the records).
//!
//! What counts as evidence: a narinfo goes only for a reason gc has established. It was read
//! in full and is bad; or no push named it within the window, by times the storage stated;
//! or its closure is incomplete because the storage *answered* that a member is absent, a
//! listing's absence confirmed by asking for that file alone (a bucket: a HEAD answering
//! 404). A file that could not be read, a lookup that failed (a transport error, a timeout, a
//! 5xx after the retries, a body that ended early), or a lookup that contradicts the listing
//! stops the run before anything is removed: exit 1, never a deletion.
//!
//! A writer that does not take our lock (`nix copy --to file://`, rsync, another machine on
//! shared storage) writes a NAR before the narinfo that names it. So a NAR file no narinfo
//! names, and a temporary file, go only once older than [`grace`] (the window, at least
//! [`MIN_GRACE`]); a NAR named by a narinfo this run removes goes at once.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use thiserror::Error;

use crate::cache::{Cache, CacheError, FileProblem};
use crate::index::Index;
use crate::layout;

/// Parses `90s`, `30m`, `36h`, `14d` or `2w`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("{s:?} is not a duration like 90s, 30m, 36h, 14d or 2w");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| err())?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => return Err(err()),
    };
    n.checked_mul(secs).map(Duration::from_secs).ok_or_else(err)
}

/// The least time a NAR file no narinfo names, or a temporary file, is kept: long enough for
/// any writer to name the NAR it just wrote.
pub const MIN_GRACE: Duration = Duration::from_secs(3600);

/// How old an unnamed NAR or temporary file must be to go: the window, at least [`MIN_GRACE`].
pub fn grace(older_than: Duration) -> Duration {
    older_than.max(MIN_GRACE)
}

#[derive(Debug, Error)]
pub enum GcError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Index(#[from] crate::index::IndexError),
    #[error("cannot remove {}", path.display())]
    Remove { path: std::path::PathBuf, source: std::io::Error },
    #[error("could not find out whether {} is there, so nothing was removed; run gc again", path.display())]
    Unknown { path: std::path::PathBuf, source: FileProblem },
    #[error(
        "{} is there, though the listing did not show it: the listing is not to be trusted, so nothing was removed",
        path.display()
    )]
    Contradicted { path: std::path::PathBuf },
}

/// Why a narinfo goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not included by a push within the window, nor kept.
    Old,
    /// Its NAR or part of its closure is missing: clients would fail on it.
    Incomplete,
    /// It serves nothing valid: a link or special file, unreadable, misnamed, or it does not
    /// parse.
    Unusable,
}

/// A file that goes (or would go, on a dry run).
#[derive(Debug)]
pub struct Removal {
    /// Cache-relative file name.
    pub file: String,
    /// The store path, for narinfos.
    pub store_path: Option<String>,
    pub reason: Option<Reason>,
    pub bytes: u64,
}

#[derive(Debug, Default)]
pub struct GcReport {
    /// What was found that nixcache does not write (a bucket's misplaced or malformed push
    /// records), and why; such files go with the window.
    pub warnings: Vec<String>,
    pub kept: usize,
    pub removed_paths: usize,
    /// In deletion order.
    pub removals: Vec<Removal>,
    pub bytes_freed: u64,
}

/// Collects garbage in `cache` (whose writer lock the caller holds).
pub fn gc(
    cache: &Cache,
    older_than: Duration,
    keep: &[String],
    now: SystemTime,
    dry_run: bool,
) -> Result<GcReport, GcError> {
    let (index, top) = Index::load_listing(cache)?;
    // A bucket: one listing answers for every NAR, instead of a request each. Taken after
    // the narinfos were listed, so it has the NAR of every narinfo listed (a push writes the
    // NAR first); the top level is the one the narinfos were listed from.
    cache.prepare_lookups_after(index.entries.len(), top)?;
    let keep_roots: Vec<String> =
        keep.iter().map(|k| index.find(k).map(|p| p.hash_part().to_owned())).collect::<Result<_, _>>()?;
    let cutoff = now.checked_sub(older_than).unwrap_or(SystemTime::UNIX_EPOCH);

    // Complete: parses, NAR present, and every reference complete (a fixpoint from the leaves).
    // An absence is only believed once the storage answers it for that file alone.
    let unknown = |rel: &str| {
        let path = cache.locate(rel);
        move |source| GcError::Unknown { path, source }
    };
    let mut complete: HashSet<&str> = HashSet::new();
    let mut sorted: Vec<(&String, &crate::index::Entry)> = index.entries.iter().collect();
    sorted.sort_by_key(|(h, _)| h.as_str());
    for (h, e) in &sorted {
        let Ok(ni) = &e.narinfo else { continue };
        let rel = ni.nar_file().unwrap_or_default();
        if cache.nar_present(ni, false).map_err(unknown(&rel))? {
            complete.insert(h.as_str());
        } else if cache.nar_present(ni, true).map_err(unknown(&rel))? {
            // The listing said missing or the wrong size; asked alone, it is there.
            return Err(GcError::Contradicted { path: cache.locate(&rel) });
        }
    }
    // References without a narinfo in the listing: absent only if a lookup says so.
    let mut absent: Vec<&str> = complete
        .iter()
        .filter_map(|h| index.entries[*h].narinfo.as_ref().ok())
        .flat_map(|ni| ni.references.iter().map(|r| r.hash_part()))
        .filter(|r| !index.entries.contains_key(*r))
        .collect();
    absent.sort();
    absent.dedup();
    for r in absent {
        let rel = layout::narinfo_name(r);
        if cache.stat_fresh(&rel).map_err(unknown(&rel))?.is_some() {
            return Err(GcError::Contradicted { path: cache.locate(&rel) });
        }
    }
    // A reference absent here that the cache left to an upstream on purpose is no hole.
    let upstreams = cache.upstreams()?;
    let elsewhere = |r: &str| !index.entries.contains_key(r) && upstreams.covers(r).is_some();
    loop {
        let broken: Vec<&str> = complete
            .iter()
            .copied()
            .filter(|h| {
                let ni = index.entries[*h].narinfo.as_ref().expect("complete entries parse");
                ni.references.iter().map(|r| r.hash_part()).any(|r| !complete.contains(r) && !elsewhere(r))
            })
            .collect();
        if broken.is_empty() {
            break;
        }
        for b in broken {
            complete.remove(b);
        }
    }

    let recent = index.entries.iter().filter(|(_, e)| e.modified >= cutoff).map(|(h, _)| h.as_str());
    let roots: Vec<&str> = recent.chain(keep_roots.iter().map(String::as_str)).collect();
    let live: HashSet<String> =
        index.closure(roots).into_iter().filter(|h| complete.contains(h.as_str())).collect();

    // Narinfos to remove, referrers first: a depth-first post-order over References gives
    // references first, so reverse it.
    let doomed: HashSet<&str> =
        index.entries.keys().map(String::as_str).filter(|h| !live.contains(*h)).collect();
    let mut order = Vec::new();
    let mut visited = HashSet::new();
    let mut sorted: Vec<&str> = doomed.iter().copied().collect();
    sorted.sort();
    for h in sorted {
        post_order(&index, &doomed, h, &mut visited, &mut order);
    }
    order.reverse();
    // Unlinks reach the disk in any order unless the directory is synced between them, so
    // narinfos go in layers: first those no other doomed narinfo references, then their
    // references, and so on, the directory synced after each layer (and after the last,
    // before any NAR goes). A power cut mid-gc leaves no narinfo whose reference or NAR is
    // gone. Layer of a narinfo: one more than its deepest doomed referrer's.
    let mut layer: HashMap<&str, usize> = HashMap::new();
    for &h in &order {
        let l = *layer.entry(h).or_insert(0);
        let refs = index.entries[h].narinfo.as_ref().map(|ni| ni.references.as_slice()).unwrap_or_default();
        for r in refs.iter().map(|r| r.hash_part()).filter(|r| *r != h && doomed.contains(r)) {
            let e = layer.entry(index.entries.get_key_value(r).expect("doomed entries exist").0).or_insert(0);
            *e = (*e).max(l + 1);
        }
    }
    // Stable: referrers still come first within a layer.
    order.sort_by_key(|h| layer[h]);

    let mut report = GcReport { kept: live.len(), ..Default::default() };
    for (name, why) in &index.bad_records {
        report.warnings.push(format!(
            "{} {why}; it counts for nothing and goes with the window",
            cache.locate(name).display()
        ));
    }
    // The layer of each removal: narinfos and their listings; None for the rest.
    let mut layers: Vec<Option<usize>> = Vec::new();
    let size = |rel: &str| cache.file_size(rel).unwrap_or(0);
    for h in &order {
        let e = &index.entries[*h];
        let reason = match &e.narinfo {
            Err(_) => Reason::Unusable,
            Ok(_) if !complete.contains(h) => Reason::Incomplete,
            Ok(_) => Reason::Old,
        };
        let store_path = e.narinfo.as_ref().ok().map(|ni| ni.store_dir.display(&ni.store_path));
        report.removals.push(Removal {
            file: e.file.clone(),
            store_path,
            reason: Some(reason),
            bytes: size(&e.file),
        });
        layers.push(Some(layer[h]));
        report.removed_paths += 1;
        let ls = layout::listing_name(h);
        if cache.file_size(&ls).is_some() {
            report.removals.push(Removal {
                file: ls.clone(),
                store_path: None,
                reason: None,
                bytes: size(&ls),
            });
            layers.push(Some(layer[h]));
        }
    }

    // NAR files that no remaining narinfo uses: those a removed narinfo named, and others
    // once they are past the grace period (a writer may be about to name them).
    let freed: HashSet<String> = doomed
        .iter()
        .filter_map(|h| index.entries[*h].narinfo.as_ref().ok())
        .filter_map(|ni| ni.nar_file())
        .collect();
    let unnamed_cutoff = now.checked_sub(grace(older_than)).unwrap_or(SystemTime::UNIX_EPOCH);
    let stale = |rel: &str| cache.stat(rel).is_some_and(|m| m.modified < unnamed_cutoff);
    let used: HashSet<String> = live
        .iter()
        .filter_map(|h| index.entries[h].narinfo.as_ref().ok())
        .filter_map(|ni| ni.nar_file())
        .collect();
    for rel in cache.nar_files()? {
        if !used.contains(&rel) && (freed.contains(&rel) || stale(&rel)) {
            report.removals.push(Removal { bytes: size(&rel), file: rel, store_path: None, reason: None });
        }
    }
    // Debug-info links whose NAR goes.
    for name in cache.list("debuginfo", |n| !crate::layout::is_temp(n))? {
        let rel = layout::debuginfo_name(&name);
        let text = match cache.read_text(&rel) {
            Ok(t) => t,
            Err(source) if !source.is_established() => return Err(unknown(&rel)(source)),
            Err(_) => None,
        };
        let archive = text
            .and_then(|b| serde_json::from_str::<HashMap<String, String>>(&b).ok())
            .and_then(|m| m.get("archive").cloned());
        let target = archive.as_deref().and_then(|a| a.strip_prefix("../"));
        if !target.is_some_and(|t| used.contains(t)) {
            report.removals.push(Removal { bytes: size(&rel), file: rel, store_path: None, reason: None });
        }
    }
    // Temporary files and incomplete uploads: of killed runs once past the grace period.
    let mut leftovers = Vec::new();
    for l in cache.temp_files()? {
        if l.modified < unnamed_cutoff {
            report.removals.push(Removal {
                bytes: l.size,
                file: l.name.clone(),
                store_path: None,
                reason: None,
            });
            leftovers.push(l);
        }
    }
    // Push records (a bucket's) older than the window name nothing gc still needs.
    let mut records = Vec::new();
    for (name, when) in &index.records {
        if *when < cutoff {
            report.removals.push(Removal { bytes: 0, file: name.clone(), store_path: None, reason: None });
            records.push(name.clone());
        }
    }
    report.bytes_freed = report.removals.iter().map(|r| r.bytes).sum();

    if !dry_run {
        // A bucket: while this marker is there, a push checks its closure at the end.
        let marker =
            if cache.exclusive() || report.removals.is_empty() { None } else { start_deleting(cache, now)? };
        let deleted = delete(cache, &index, &mut report, layers, &leftovers, &records);
        if let Some(m) = marker {
            let done = cache.done_deleting(&m);
            deleted?;
            done?;
        } else {
            deleted?;
        }
    }
    Ok(report)
}

/// How old the marker of a gc must be to be taken for one killed while it deleted.
pub const MARKER_STALE: Duration = Duration::from_secs(24 * 3600);

/// Writes this gc's marker ([`Cache::start_deleting`]), first removing those of gcs killed
/// while they deleted (older than [`MARKER_STALE`]).
fn start_deleting(cache: &Cache, now: SystemTime) -> Result<Option<String>, GcError> {
    let stale = now.checked_sub(MARKER_STALE).unwrap_or(SystemTime::UNIX_EPOCH);
    for m in cache.deleting()? {
        if m.modified < stale {
            cache.done_deleting(&m.name)?;
        }
    }
    Ok(cache.start_deleting()?)
}

/// Removes what `report` names, layer by layer, sparing what a push started meanwhile names.
fn delete(
    cache: &Cache,
    index: &Index,
    report: &mut GcReport,
    mut layers: Vec<Option<usize>>,
    leftovers: &[crate::cache::Leftover],
    records: &[String],
) -> Result<(), GcError> {
    layers.resize(report.removals.len(), None);
    // Where writers do not exclude each other (a bucket), a push may start while gc
    // works: it records its closure before it looks. Before each layer of narinfos and
    // before the NARs, gc reads the records written since it started and spares what they
    // name (with the NARs those narinfos name), so it never takes away what such a push
    // found present and skipped.
    let known: HashSet<String> = index.records.iter().map(|(n, _)| n.clone()).collect();
    let mut spared: HashSet<String> = HashSet::new();
    let mut spared_nars: HashSet<String> = HashSet::new();
    let mut kept_back = vec![false; report.removals.len()];
    for (i, r) in report.removals.iter().enumerate() {
        if i > 0 && layers[i - 1].is_some() && layers[i] != layers[i - 1] {
            cache.sync_dir("")?;
        }
        let boundary = i == 0 || layers[i] != layers[i - 1];
        if boundary && !cache.exclusive() {
            for h in cache.new_push_records(&known)? {
                if let Some(nar) =
                    index.entries.get(&h).and_then(|e| e.narinfo.as_ref().ok()).and_then(|ni| ni.nar_file())
                {
                    spared_nars.insert(nar);
                }
                spared.insert(h);
            }
        }
        let hash = layout::hash_of_narinfo(&r.file).or_else(|| layout::hash_of_listing(&r.file));
        if hash.is_some_and(|h| spared.contains(h)) || spared_nars.contains(&r.file) {
            kept_back[i] = true;
            continue;
        }
        if let Some(l) = leftovers.iter().find(|l| l.name == r.file) {
            cache.remove_leftover(l)?;
        } else if records.contains(&r.file) {
            cache.remove_record(&r.file)?;
        } else {
            cache.remove(&r.file)?;
        }
    }
    let mut k = kept_back.iter();
    report.removals.retain(|_| !k.next().copied().unwrap_or(false));
    let spared_paths = report.removed_paths - report.removals.iter().filter(|r| r.reason.is_some()).count();
    if spared_paths > 0 {
        report.removed_paths -= spared_paths;
        report.kept += spared_paths;
        report.warnings.push(format!("kept {spared_paths} paths that a push started during this gc names"));
    }
    report.bytes_freed = report.removals.iter().map(|r| r.bytes).sum();
    Ok(())
}

fn post_order<'a>(
    index: &'a Index,
    doomed: &HashSet<&'a str>,
    h: &'a str,
    visited: &mut HashSet<&'a str>,
    out: &mut Vec<&'a str>,
) {
    if !visited.insert(h) {
        return;
    }
    if let Ok(ni) = &index.entries[h].narinfo {
        for r in &ni.references {
            if let Some((k, _)) = index.entries.get_key_value(r.hash_part())
                && doomed.contains(k.as_str())
            {
                post_order(index, doomed, k.as_str(), visited, out);
            }
        }
    }
    out.push(h);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("36h"), Ok(Duration::from_secs(36 * 3600)));
        assert_eq!(parse_duration("14d"), Ok(Duration::from_secs(14 * 86400)));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(14 * 86400)));
        for bad in ["", "14", "d", "1.5d", "14 d", "-1d", "99999999999999999999w"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
