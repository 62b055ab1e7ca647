//! `nixcache sign`: add our signature where it is missing; NARs are never touched, and the
//! narinfos keep their modification times (gc's record of pushes).

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use rayon::prelude::*;

use crate::cache::{Cache, Staged};
use crate::cli::SignArgs;
use crate::index::Index;

pub fn run(args: &SignArgs) -> anyhow::Result<bool> {
    let key = super::read_secret_key(&args.secret_key)?;
    let public = [key.public_key()];
    let mut cache = Cache::open(&args.dest)?;
    cache.lock(|| {
        if !args.quiet {
            eprintln!("waiting for another nixcache writing to {} ...", args.dest.display());
        }
    })?;
    let index = Index::load(&cache)?;
    let selected: Option<std::collections::HashSet<String>> = if args.paths.is_empty() {
        None
    } else {
        let roots = args
            .paths
            .iter()
            .map(|p| index.find(p).map(|p| p.hash_part().to_owned()))
            .collect::<Result<Vec<_>, _>>()?;
        Some(index.closure(roots.iter().map(String::as_str)))
    };
    let (already, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let mut unparsable = 0;
    let todo: Vec<_> = index
        .entries
        .iter()
        .filter(|(h, _)| selected.as_ref().is_none_or(|s| s.contains(*h)))
        .filter_map(|(_, e)| match &e.narinfo {
            Ok(ni) => Some((ni, e.modified)),
            Err(err) => {
                eprintln!("warning: {} does not parse, not signed: {err}", e.file);
                unparsable += 1;
                None
            }
        })
        .collect();
    // Every rewritten narinfo is staged, all are made durable at once, then renamed into place.
    let staged: Vec<Staged> = todo
        .par_iter()
        .filter_map(|(ni, modified)| {
            if ni.verified_by(&public) {
                already.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            let mut ni = (*ni).clone();
            ni.add_signature(&key);
            match cache.stage_narinfo(&ni, *modified) {
                Ok(s) => Some(s),
                Err(e) => {
                    eprintln!("error: cannot sign {}: {e}", ni.store_dir.display(&ni.store_path));
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
                    eprintln!("error: cannot sign: {e}");
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        cache.sync_dir("")?;
    }
    let (already, failed) = (already.into_inner(), failed.into_inner());
    if !args.quiet {
        eprintln!(
            "{} narinfos: {signed} signed by {}, {already} already were, {failed} failed, {unparsable} unparsable",
            todo.len() + unparsable,
            key.name()
        );
    }
    Ok(failed == 0 && unparsable == 0)
}
