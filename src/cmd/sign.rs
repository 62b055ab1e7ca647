//! `nixcache sign`: add our signature where it is missing; NARs are never touched, and the
//! narinfos keep their modification times (gc's record of pushes).
//!
//! A signature vouches for the path, so `sign`, which has no store to compare with, signs
//! only what the cache itself proves: a narinfo that parses strictly, sits under its own
//! name, and names a NAR that is there with its FileSize and FileHash and (unless
//! `--no-check-contents`) decompresses to its NarSize and NarHash. Anything else is reported
//! and left unsigned; a narinfo is only ever rewritten under its own name.

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use rayon::prelude::*;

use crate::cache::{Cache, Staged};
use crate::cli::SignArgs;
use crate::index::Index;
use crate::verify::check_nar;

pub fn run(args: &SignArgs) -> anyhow::Result<bool> {
    let key = super::read_secret_key(&args.secret_key)?;
    let public = [key.public_key()];
    let mut cache = Cache::open(&args.dest)?;
    cache.lock(|| {
        if !args.quiet {
            crate::elog!("waiting for another nixcache writing to {} ...", args.dest);
        }
    })?;
    let index = Index::load(&cache)?;
    let selected: Option<std::collections::HashSet<String>> = if args.paths.is_empty() {
        None
    } else {
        let roots = args
            .paths
            .iter()
            .map(|p| index.find(&super::store_path_arg(&cache, p)).map(|p| p.hash_part().to_owned()))
            .collect::<Result<Vec<_>, _>>()?;
        Some(index.closure(roots.iter().map(String::as_str)))
    };
    let (already, failed, refused) = (AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0));
    let mut unusable = 0;
    let todo: Vec<_> = index
        .entries
        .iter()
        .filter(|(h, _)| selected.as_ref().is_none_or(|s| s.contains(*h)))
        .filter_map(|(_, e)| match &e.narinfo {
            Ok(ni) => Some((e, ni)),
            Err(err) => {
                crate::elog!("warning: {}: {}, not signed", e.file, crate::error_chain(err));
                unusable += 1;
                None
            }
        })
        .collect();
    // Every rewritten narinfo is staged, all are made durable at once, then renamed into place.
    let staged: Vec<Staged> = todo
        .par_iter()
        .filter_map(|(entry, ni)| {
            if ni.verified_by(&public) {
                already.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            let path = ni.store_dir.display(&ni.store_path);
            let mut problems = Vec::new();
            check_nar(&cache, ni, !args.no_check_contents, &mut |_, message| problems.push(message));
            if !problems.is_empty() {
                crate::elog!("error: {path}: not signed: {}", problems.join("; "));
                refused.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            let mut ni = (*ni).clone();
            ni.add_signature(&key);
            match cache.stage_narinfo(&entry.file, &ni, entry.modified) {
                Ok(s) => Some(s),
                Err(e) => {
                    crate::elog!("error: cannot sign {path}: {e}");
                    failed.fetch_add(1, Ordering::Relaxed);
                    None
                }
            }
        })
        .collect();
    let mut signed = 0;
    if !staged.is_empty() {
        cache.sync_data(&staged).context("nothing was signed")?;
        for s in staged {
            match s.commit() {
                Ok(()) => signed += 1,
                Err(e) => {
                    crate::elog!("error: cannot sign: {e}");
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        cache.sync_dir("")?;
    }
    let (already, failed, refused) = (already.into_inner(), failed.into_inner(), refused.into_inner());
    if !args.quiet {
        crate::elog!(
            "{}: {signed} signed by {}, {already} already were, {refused} refused (NAR does not match), {failed} failed, {unusable} unusable",
            crate::progress::plural(todo.len() + unusable, "narinfo"),
            key.name()
        );
        super::say_requests(&cache);
    }
    Ok(failed == 0 && unusable == 0 && refused == 0)
}
