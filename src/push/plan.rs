//! What a push does with a path, decided from what the cache holds: one decision, used by
//! the push and by `--dry-run`.

use crate::cache::{Cache, Lookup, Staged};
use crate::hash::NixHash;
use crate::nar::listing::{Entry, debuginfo_json};
use crate::narinfo::NarInfo;
use crate::path_info::PathInfo;
use crate::signing::PublicKey;
use crate::store_path::{StoreDir, StorePath};

use super::{PushError, PushOptions};

/// What the cache holds of a path decides what a push does with it.
#[derive(Debug)]
pub enum Decision {
    /// Narinfo and NAR are there, as the store says (and, with `--repair`, the NAR checked):
    /// nothing to write but the signatures it lacks.
    Present(Box<NarInfo>),
    /// A narinfo is there, but it, its NAR or its contents are wrong: rewritten.
    Repair,
    /// Not there (or `--force`): written.
    Push,
}

impl Decision {
    /// Whether the narinfo that is there lacks the signature of one of `keys`.
    pub fn lacks_signatures(&self, keys: &[PublicKey]) -> bool {
        matches!(self, Decision::Present(ni) if !keys.iter().all(|k| ni.verified_by(std::slice::from_ref(k))))
    }

    /// What a dry run says of it.
    pub fn dry_run_verb(&self, keys: &[PublicKey]) -> &'static str {
        match self {
            Decision::Present(_) if self.lacks_signatures(keys) => "would sign",
            Decision::Present(_) => "already there",
            Decision::Repair => "would repair",
            Decision::Push => "would push",
        }
    }
}

/// Decides what a push (with `force` and `repair` as given) does with `info`; `warn` is told
/// why a narinfo that is there is not kept (it is rewritten).
pub fn decide(
    cache: &Cache,
    store_dir: &StoreDir,
    info: &PathInfo,
    force: bool,
    repair: bool,
    warn: &mut dyn FnMut(&str),
) -> Decision {
    let (found, existed) = existing(cache, store_dir, info, |w| warn(w));
    match found {
        Some(ni) if !force && cache.has_nar(&ni) && !(repair && nar_is_wrong(cache, &ni, warn)) => {
            Decision::Present(Box::new(ni))
        }
        _ if existed && !force => Decision::Repair,
        _ => Decision::Push,
    }
}

/// With `--repair`: whether the NAR a narinfo names is not what the narinfo says (read and
/// decompressed in full); `warn` is told what is wrong.
fn nar_is_wrong(cache: &Cache, ni: &NarInfo, warn: &mut dyn FnMut(&str)) -> bool {
    let mut wrong = Vec::new();
    crate::nar_check::check_nar(cache, ni, true, &mut |_, m| wrong.push(m));
    if !wrong.is_empty() {
        warn(&wrong.join("; "));
    }
    !wrong.is_empty()
}

/// What the cache holds for `info`: its narinfo if it says what the store says (else `warn`
/// is told how it differs), and whether any narinfo file is there at all.
pub fn existing(
    cache: &Cache,
    store_dir: &StoreDir,
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
fn disagreement(ni: &NarInfo, info: &PathInfo, store_dir: &StoreDir) -> Vec<&'static str> {
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
pub(super) fn check_hash(
    abs: &str,
    info: &PathInfo,
    nar_hash: NixHash,
    nar_size: u64,
) -> Result<(), PushError> {
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
pub(super) fn side_files(
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

pub(super) fn listing_rel(p: &StorePath) -> String {
    crate::layout::listing_name(p.hash_part())
}
