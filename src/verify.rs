//! Checking a cache the way a client would depend on it, without changing it.
//!
//! For every narinfo, in parallel and streaming: it parses; its file name matches its
//! StorePath; its NAR exists with the FileSize and FileHash it claims; decompressed, the NAR
//! has NarSize and NarHash; every reference has a narinfo, or was left to an upstream on
//! purpose (the cache's upstreams records say so); with trusted keys, a signature by
//! one of them verifies (or the CA makes the path self-certifying). Also: nix-cache-info is
//! present and sane, and no NAR file is unused and no temporary file is left behind.

use std::collections::{BTreeSet, HashSet};

use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;
use serde::Serialize;

use crate::cache::{CACHE_INFO, Cache, CacheError, FileProblem, TEMP_PREFIX};
use crate::content_address::ca_store_path;
use crate::layout::STATE_DIR;
use crate::nar_check::check_nar;
use crate::narinfo::NarInfo;
use crate::progress::Progress;
use crate::signing::PublicKey;
use crate::upstream::Upstreams;

/// One thing wrong with the cache.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// The store path concerned, or the cache file when no store path is.
    pub path: String,
    /// A stable, machine-readable name: `nar-hash`, `missing-reference`, `untrusted`…
    pub kind: &'static str,
    pub message: String,
}

/// The result of a verification.
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub narinfos: usize,
    pub nar_bytes: u64,
    pub problems: Vec<Problem>,
    /// References absent here that the cache's upstreams records say were left out on
    /// purpose: per reason (`signed by upstream-1`), how many distinct paths.
    pub left_to_upstreams: std::collections::BTreeMap<String, usize>,
}

/// Checks the whole cache with `jobs` threads.
pub fn verify(
    cache: &Cache,
    trusted: &[PublicKey],
    jobs: usize,
    progress: &Progress,
) -> Result<VerifyReport, CacheError> {
    let mut problems = Vec::new();
    for (sub, kind) in cache.bad_dirs() {
        problems.push(Problem {
            path: format!("{sub}/"),
            kind: "not-a-directory",
            message: format!(
                "is a {kind}, not a real directory: nothing under it was read, and push, sign and gc refuse the cache until it is replaced by a directory"
            ),
        });
    }
    let cache_info = match cache.cache_info() {
        Ok(Some(ci)) => Some(ci),
        Ok(None) => {
            problems.push(Problem {
                path: CACHE_INFO.into(),
                kind: "cache-info",
                message: "nix-cache-info is missing; Nix will not use this cache (a push writes it)".into(),
            });
            None
        }
        Err(e) => {
            problems.push(Problem {
                path: CACHE_INFO.into(),
                kind: "cache-info",
                message: crate::util::error_chain(&e),
            });
            None
        }
    };
    // What a partial cache left out on purpose; an unreadable record covers nothing.
    let upstreams = match cache.upstreams() {
        Ok(u) => u,
        Err(e) => {
            problems.push(Problem {
                path: STATE_DIR.into(),
                kind: "upstreams",
                message: crate::util::error_chain(&e),
            });
            Upstreams::default()
        }
    };
    let files = cache.narinfo_files()?;
    let present: HashSet<String> =
        files.iter().filter_map(|f| crate::layout::hash_of_narinfo(f)).map(str::to_owned).collect();
    let done = AtomicUsize::new(0);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(jobs.max(1)).build();
    let check_all = || {
        files
            .par_iter()
            .map(|f| {
                let store_dir = cache_info.as_ref().map(|c| c.store_dir.as_str());
                let r = check_one(cache, f, (&present, &upstreams), trusted, store_dir);
                progress.advance(r.3);
                progress.path_done(done.fetch_add(1, Ordering::Relaxed) + 1, files.len());
                r
            })
            .collect::<Vec<_>>()
    };
    let results = match &pool {
        Ok(pool) => pool.install(check_all),
        Err(_) => check_all(),
    };
    let mut used = HashSet::new();
    let mut nar_bytes = 0;
    let mut left = HashSet::new();
    for (ps, url, n, _, l) in results {
        problems.extend(ps);
        left.extend(l);
        if let Some(u) = url {
            used.insert(u);
        }
        nar_bytes += n;
    }
    for rel in cache.nar_files()? {
        if !used.contains(&rel) {
            problems.push(Problem {
                path: rel,
                kind: "unused-nar",
                message: "no narinfo uses this NAR file (`nixcache gc` removes it)".into(),
            });
        }
    }
    for l in cache.temp_files()? {
        if l.upload_id.is_some() {
            // Another push may be uploading it; gc aborts it once stale.
            continue;
        }
        problems.push(Problem {
            path: l.name,
            kind: "temporary-file",
            message: format!("left by an interrupted run ({TEMP_PREFIX}*; the next push or gc removes it)"),
        });
    }
    problems.sort();
    let mut left_to_upstreams = std::collections::BTreeMap::new();
    for h in left {
        if let Some(r) = upstreams.covers(&h) {
            *left_to_upstreams.entry(r.describe()).or_default() += 1;
        }
    }
    Ok(VerifyReport { narinfos: files.len(), nar_bytes, problems, left_to_upstreams })
}

/// Checks one narinfo file against the narinfos `present` and what the cache left to
/// `upstreams`. Returns its problems, the NAR URL it uses, the NAR and file bytes read, and
/// the hash parts of its references left to upstreams.
fn check_one(
    cache: &Cache,
    file: &str,
    (present, upstreams): (&HashSet<String>, &Upstreams),
    trusted: &[PublicKey],
    store_dir: Option<&str>,
) -> (Vec<Problem>, Option<String>, u64, u64, Vec<String>) {
    let mut problems = Vec::new();
    let text = match cache.read_text(file) {
        Ok(Some(t)) => t,
        Ok(None) => {
            // Listed, yet not there when asked: a client cannot fetch it either (or a gc
            // removed it meanwhile).
            let message = "is listed but cannot be fetched (`nixcache gc` removes what it can reach; a key no request can name must be removed by other means)".into();
            return (
                vec![Problem { path: file.into(), kind: "unfetchable", message }],
                None,
                0,
                0,
                Vec::new(),
            );
        }
        Err(e) => return (vec![file_problem(file, &e)], None, 0, 0, Vec::new()),
    };
    let ni: NarInfo = match text.parse() {
        Ok(ni) => ni,
        Err(e) => {
            let message = format!("does not parse (Nix would refuse it; `nixcache push` rewrites it): {e}");
            return (
                vec![Problem { path: file.into(), kind: "unparsable", message }],
                None,
                0,
                0,
                Vec::new(),
            );
        }
    };
    let path = ni.store_dir.display(&ni.store_path);
    let mut problem = |kind, message: String| {
        let message = format!("{message} ({})", fix(kind));
        problems.push(Problem { path: path.clone(), kind, message })
    };
    if file != ni.file_name() {
        problem("file-name", format!("is in {file} but belongs in {}", ni.file_name()));
    }
    if let Some(sd) = store_dir
        && sd != ni.store_dir.as_str()
    {
        problem("store-dir", format!("is in store {} but nix-cache-info says {sd}", ni.store_dir));
    }
    let mut left = Vec::new();
    for r in &ni.references {
        if present.contains(r.hash_part()) {
            continue;
        }
        if upstreams.covers(r.hash_part()).is_some() {
            left.push(r.hash_part().to_owned());
        } else {
            problem("missing-reference", format!("references {r}, which has no narinfo in the cache"));
        }
    }
    if !trusted.is_empty() && !ni.verified_by(trusted) {
        let self_certifying = ni.ca.as_deref().is_some_and(|ca| {
            ca_store_path(&ni.store_dir, &ni.store_path, ca, &ni.references).as_ref() == Some(&ni.store_path)
        });
        if !self_certifying {
            let names: BTreeSet<&str> = ni.sigs.iter().map(|s| s.key_name()).collect();
            let found = if names.is_empty() {
                "it has no signatures".to_owned()
            } else {
                format!("signed by {}", names.into_iter().collect::<Vec<_>>().join(", "))
            };
            problem("untrusted", format!("no valid signature by a trusted key ({found})"));
        }
    }
    let nar_bytes = check_nar(cache, &ni, true, &mut problem);
    let nar_file = ni.nar_file();
    let file_bytes = nar_file.as_deref().and_then(|f| cache.file_size(f)).unwrap_or(0);
    (problems, nar_file, nar_bytes, file_bytes, left)
}

/// What repairs a problem of `kind` found in a narinfo or its NAR.
fn fix(kind: &str) -> &'static str {
    match kind {
        "missing-reference" => "push the path again: a push writes the whole closure",
        "untrusted" => "`nixcache sign --secret-key KEY` signs it, or push it again with the key",
        "store-dir" => "a cache serves one store directory: use one cache per store directory",
        "file-name" => "`nixcache gc` removes it; pushing the path writes the right file",
        // Its NAR: missing, unreadable, the wrong size, bytes or hash, or named wrongly.
        _ => "`nixcache push --repair PATH` rewrites it from the store",
    }
}

/// A cache file that is not what its name says.
fn file_problem(file: &str, e: &FileProblem) -> Problem {
    let (kind, message) = crate::nar_check::file_problem(e);
    Problem { path: file.into(), kind, message }
}
