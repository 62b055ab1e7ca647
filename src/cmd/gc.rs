//! `nixcache gc`: under the writers' lock, so a push racing a gc loses nothing.

use std::time::SystemTime;

use crate::cache::Cache;
use crate::cli::GcArgs;
use crate::gc::{Reason, gc};
use crate::progress::bytes;

pub fn run(args: &GcArgs) -> anyhow::Result<bool> {
    super::remote::refuse(&args.dest, "gc")?;
    super::check_dest(&args.dest, &[])?;
    let mut cache = Cache::open(&args.dest)?;
    super::require_cache_info(&cache)?;
    cache.lock_within(args.lock_timeout, |who| {
        if !args.quiet {
            super::say_waiting(&args.dest, who, args.lock_timeout);
        }
    })?;
    super::keep_copies(&cache, &args.dest, args.no_local_copies);
    let keep: Vec<String> = args.keep.iter().map(|k| super::store_path_arg(&cache, k)).collect();
    let report = gc(&cache, args.older_than, &keep, SystemTime::now(), args.dry_run)?;
    for w in &report.warnings {
        crate::elog!("warning: {w}");
    }
    if args.json {
        let mut v = serde_json::json!({
            "dest": args.dest.to_string(),
            "dry_run": args.dry_run,
            "kept": report.kept,
            "removed_paths": report.removed_paths,
            "removed_files": report.removals.len(),
            "bytes_freed": report.bytes_freed,
            "warnings": report.warnings,
        });
        if args.json_paths {
            let each: Vec<_> = report
                .removals
                .iter()
                .map(|r| {
                    let why = match r.reason {
                        Some(Reason::Old) => Some("old"),
                        Some(Reason::Incomplete) => Some("incomplete"),
                        Some(Reason::Unusable) => Some("unusable"),
                        None => None,
                    };
                    serde_json::json!({"file": r.file, "path": r.store_path, "reason": why})
                })
                .collect();
            v["removals"] = each.into();
        }
        crate::outln!("{v}");
        return Ok(true);
    }
    if !args.quiet {
        let verb = if args.dry_run { "would remove" } else { "removed" };
        for r in &report.removals {
            let why = match r.reason {
                Some(Reason::Old) => " (not pushed recently)",
                Some(Reason::Incomplete) => " (incomplete: NAR or reference missing)",
                Some(Reason::Unusable) => " (not a usable narinfo)",
                None => "",
            };
            match &r.store_path {
                Some(p) => crate::outln!("{verb} {p}{why}"),
                None => crate::outln!("{verb} {}{why}", r.file),
            }
        }
    }
    if args.quiet {
        return Ok(true);
    }
    crate::elog!(
        "{} kept, {} {}, {} {}",
        crate::progress::plural(report.kept, "path"),
        crate::progress::plural(report.removed_paths, "path"),
        if args.dry_run { "would be removed" } else { "removed" },
        bytes(report.bytes_freed),
        if args.dry_run { "would be freed" } else { "freed" }
    );
    super::say_requests(&cache);
    Ok(true)
}
