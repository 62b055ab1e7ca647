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

mod delete;
pub mod plan;

use plan::{Facts, plan};
pub use plan::{GcPlan, Target};

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
    /// Cache-relative file name (for a leftover upload, with ` (incomplete upload)`).
    pub file: String,
    /// The store path, for narinfos.
    pub store_path: Option<String>,
    pub reason: Option<Reason>,
    pub bytes: u64,
    /// What it is, which says how it is removed.
    pub target: Target,
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

/// Collects garbage in `cache` (whose writer lock the caller holds): gathers what the cache
/// holds (every absence it acts on confirmed), plans what goes ([`plan::plan`]), and unless
/// `dry_run` removes it ([`delete::delete`]).
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
    let keep: Vec<String> =
        keep.iter().map(|k| index.find(k).map(|p| p.hash_part().to_owned())).collect::<Result<_, _>>()?;
    let cutoff = now.checked_sub(older_than).unwrap_or(SystemTime::UNIX_EPOCH);
    let unnamed_cutoff = now.checked_sub(grace(older_than)).unwrap_or(SystemTime::UNIX_EPOCH);

    // An absence is only believed once the storage answers it for that file alone.
    let unknown = |rel: &str| {
        let path = cache.locate(rel);
        move |source| GcError::Unknown { path, source }
    };
    let mut with_nar: HashSet<&str> = HashSet::new();
    let mut sorted: Vec<(&String, &crate::index::Entry)> = index.entries.iter().collect();
    sorted.sort_by_key(|(h, _)| h.as_str());
    for (h, e) in &sorted {
        let Ok(ni) = &e.narinfo else { continue };
        let rel = ni.nar_file().unwrap_or_default();
        if cache.nar_present(ni, false).map_err(unknown(&rel))? {
            with_nar.insert(h.as_str());
        } else if cache.nar_present(ni, true).map_err(unknown(&rel))? {
            // The listing said missing or the wrong size; asked alone, it is there.
            return Err(GcError::Contradicted { path: cache.locate(&rel) });
        }
    }
    // References without a narinfo in the listing: absent only if a lookup says so.
    let mut absent: Vec<&str> = with_nar
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
    let upstreams = cache.upstreams()?;
    let mut debug_links = Vec::new();
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
        let target = archive.as_deref().and_then(|a| a.strip_prefix("../")).map(str::to_owned);
        debug_links.push((rel, target));
    }
    let size = |rel: &str| cache.file_size(rel);
    let modified = |rel: &str| cache.stat(rel).map(|m| m.modified);
    let facts = Facts {
        index: &index,
        with_nar,
        left_upstream: &|h| upstreams.covers(h).is_some(),
        keep,
        cutoff,
        unnamed_cutoff,
        size: &size,
        nar_files: cache.nar_files()?,
        modified: &modified,
        debug_links,
        leftovers: cache.temp_files()?,
    };
    let mut report = plan(&facts).report(|name| cache.locate(name).display().to_string());

    if !dry_run {
        // A bucket: while this marker is there, a push checks its closure at the end.
        let marker =
            if cache.exclusive() || report.removals.is_empty() { None } else { start_deleting(cache, now)? };
        let deleted = delete::delete(cache, &index, &mut report);
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
