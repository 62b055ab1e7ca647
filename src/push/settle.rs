//! The end of a push on storage without a writers' lock (a bucket): the closure is checked
//! whole, and what vanished is pushed again.

use thiserror::Error;

use super::{PushOptions, PushReport, push};
use crate::cache::{CACHE_INFO, Cache, CacheError, CacheInfo};
use crate::path_info::PathInfo;
use crate::progress::{Mode, Progress, plural};
use crate::store::StoreLocation;

/// Before a push looks at a cache without a writers' lock: its closure is recorded (a gc
/// that starts from now on keeps what it names), then whether a gc may already be deleting.
/// On a locked cache (a directory) the record is its narinfos' times, and no gc runs at once.
#[derive(Clone, Copy, Debug)]
pub struct Announced {
    /// A gc may be deleting what this push finds: the closure is checked at the end.
    pub gc_deleting: bool,
}

/// Records the push of `infos` ([`Cache::record_push`]) and asks whether a gc is deleting.
pub fn announce(cache: &Cache, infos: &[PathInfo]) -> Result<Announced, CacheError> {
    let hashes: Vec<&str> = infos.iter().map(|i| i.path.hash_part()).collect();
    cache.record_push(&hashes)?;
    // After the record: a gc deleting now may take what this push finds.
    let gc_deleting = !cache.exclusive() && cache.deleting().map_or(true, |m| !m.is_empty());
    Ok(Announced { gc_deleting })
}

/// What the end of a push found.
#[derive(Debug, Default)]
pub struct Settled {
    /// Paths found missing and pushed again.
    pub again: usize,
    /// `nix-cache-info` was missing and was written again.
    pub wrote_cache_info: bool,
}

/// The closure still is not whole after [`SETTLE_ROUNDS`] rounds.
#[derive(Debug, Error)]
pub enum SettleError {
    #[error(
        "{} of this push are still missing from {cache} after pushing them again {SETTLE_ROUNDS} times: another writer keeps removing them (a gc with a short --older-than?) or the server loses writes",
        plural(*missing, "path")
    )]
    StillMissing { missing: usize, cache: String },
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// On storage without a writers' lock: checks the closure is whole in the cache now and pushes
/// again what is not ([`missing_now`]), at most [`SETTLE_ROUNDS`] times; what is still
/// missing then fails the push. What the rounds write counts as repaired in `report`.
///
/// The check looks for `nix-cache-info` too, and has `write_cache_info` write it again when
/// the server lost it (an acknowledged write lost in a crash leaves a cache no client opens).
///
/// A push that wrote nothing (no write to have been lost) and found no gc deleting once its
/// record was written ([`Announced`]; a gc that starts later spares what the record names)
/// needs no check: what it found stays.
pub fn settle(
    cache: &Cache,
    store: &StoreLocation,
    infos: &[PathInfo],
    opts: &PushOptions,
    report: &mut PushReport,
    announced: Announced,
    write_cache_info: impl Fn() -> Result<CacheInfo, CacheError>,
) -> Result<Settled, SettleError> {
    let mut settled = Settled::default();
    if cache.exclusive() || !report.ok() {
        return Ok(settled);
    }
    if !announced.gc_deleting && report.pushed + report.repaired + report.signed == 0 {
        return Ok(settled);
    }
    for round in 0..=SETTLE_ROUNDS {
        let missing = missing_now(cache, infos, report)?;
        if missing.is_empty() {
            break;
        }
        if round == SETTLE_ROUNDS {
            return Err(SettleError::StillMissing { missing: missing.len(), cache: cache.describe() });
        }
        settled.again += missing.len();
        let quiet = Progress::new(Mode::Quiet, "pushing", infos.len(), 0);
        report.absorb_again(push(store, cache, infos, opts, &quiet));
        if !report.ok() {
            break;
        }
    }
    if report.ok() && !cache.holds(CACHE_INFO, None, true).unwrap_or(false) {
        write_cache_info()?;
        settled.wrote_cache_info = true;
    }
    Ok(settled)
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
