//! `nixcache sign`: add our signature where it is missing; NARs are never touched, and the
//! narinfos keep their modification times (gc's record of pushes).
//!
//! A signature vouches for the path, so `sign`, which has no store to compare with, signs
//! only what the cache itself proves: a narinfo that parses strictly, sits under its own
//! name, and names a NAR that is there with its FileSize and FileHash and (unless
//! `--no-check-contents`) decompresses to its NarSize and NarHash. Anything else is reported
//! and left unsigned; a narinfo is only ever rewritten under its own name.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use anyhow::Context;
use rayon::prelude::*;

use crate::cache::Cache;
use crate::cli::SignArgs;
use crate::index::Index;
use crate::nar_check::check_nar;
use crate::narinfo::NarInfo;

/// Rewrites in flight at once: as many fsyncs (or PUTs) as push keeps in flight.
const WRITERS: usize = 16;

pub fn run(args: &SignArgs) -> anyhow::Result<bool> {
    let key = super::read_secret_key(&args.secret_key)?;
    let public = [key.public_key()];
    super::remote::refuse(&args.dest, "sign")?;
    super::check_dest(&args.dest, &[])?;
    let mut cache = Cache::open(&args.dest)?;
    super::require_cache_info(&cache)?;
    cache.lock_within(args.lock_timeout, |who| {
        if !args.quiet {
            super::say_waiting(&args.dest, who, args.lock_timeout);
        }
    })?;
    // What is read and rewritten is kept, so the next push need not download it again.
    super::keep_copies(&cache, &args.dest, args.no_local_copies);
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
                crate::elog!("warning: {}: {}, not signed", e.file, crate::util::error_chain(err));
                unusable += 1;
                None
            }
        })
        .collect();
    // The checks and signatures take the CPU, on rayon's threads; the rewrites wait for the
    // disk (or the bucket), so WRITERS of them are in flight on threads of their own, fed
    // through a short queue. Each rewrite is flushed before its name replaces the old one;
    // the directory is flushed once, at the end.
    let signed = AtomicUsize::new(0);
    let signed_paths = Mutex::new(Vec::new());
    let (tx, rx) = std::sync::mpsc::sync_channel::<(&str, NarInfo, SystemTime)>(4 * WRITERS);
    let rx = Mutex::new(rx);
    std::thread::scope(|s| {
        for _ in 0..WRITERS {
            s.spawn(|| {
                loop {
                    let Ok((file, ni, modified)) = rx.lock().unwrap_or_else(|e| e.into_inner()).recv() else {
                        break;
                    };
                    match cache.replace_narinfo(file, &ni, modified) {
                        Ok(()) => {
                            signed.fetch_add(1, Ordering::Relaxed);
                            if args.json_paths {
                                let path = ni.store_dir.display(&ni.store_path);
                                signed_paths.lock().unwrap_or_else(|e| e.into_inner()).push(path);
                            }
                        }
                        Err(e) => {
                            let path = ni.store_dir.display(&ni.store_path);
                            crate::elog!("error: cannot sign {path}: {e}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        todo.par_iter().for_each_with(tx, |tx, (entry, ni)| {
            if ni.verified_by(&public) {
                already.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let mut problems = Vec::new();
            check_nar(&cache, ni, !args.no_check_contents, &mut |_, message| problems.push(message));
            if !problems.is_empty() {
                let path = ni.store_dir.display(&ni.store_path);
                crate::elog!("error: {path}: not signed: {}", problems.join("; "));
                refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let mut ni = (*ni).clone();
            ni.add_signature(&key);
            // The writers end only when every sender is gone.
            tx.send((entry.file.as_str(), ni, entry.modified)).expect("writers run until the queue closes");
        });
    });
    let signed = signed.into_inner();
    if signed > 0 {
        cache.sync_dir("").context("what was signed may not survive a power cut")?;
    }
    let (already, failed, refused) = (already.into_inner(), failed.into_inner(), refused.into_inner());
    if args.json {
        let mut v = serde_json::json!({
            "dest": args.dest.to_string(),
            "key": key.name(),
            "narinfos": todo.len() + unusable,
            "signed": signed,
            "already_signed": already,
            "refused": refused,
            "failed": failed,
            "unusable": unusable,
            "ok": failed == 0 && unusable == 0 && refused == 0,
        });
        if args.json_paths {
            let mut paths = signed_paths.into_inner().unwrap_or_else(|e| e.into_inner());
            paths.sort();
            v["signed_paths"] = paths.into();
        }
        crate::outln!("{v}");
    } else if !args.quiet {
        crate::elog!(
            "{}: {signed} signed by {}, {already} already were, {refused} refused (NAR does not match), {failed} failed, {unusable} unusable",
            crate::progress::plural(todo.len() + unusable, "narinfo"),
            key.name()
        );
        super::say_requests(&cache);
    }
    Ok(failed == 0 && unusable == 0 && refused == 0)
}
