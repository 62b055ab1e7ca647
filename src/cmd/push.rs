//! `nixcache push`: resolve the arguments, read the closure, then run the pipeline.
//!
//! Everything that can be checked before the cache is touched (keys, paths, the closure) is
//! checked first, so bad input leaves the destination as it was.

use std::io::{BufRead, IsTerminal};
use std::time::Instant;

use anyhow::Context;

use super::partial::Partial;
use crate::cache::Cache;
use crate::cli::PushArgs;
use crate::progress::{self, Mode, Progress};
use crate::push::{Decision, PushOptions, push};
use crate::store::Store;

/// `push --dry-run`: what a push would do, path by path on stdout and in a summary, without
/// creating, locking or changing anything.
fn dry_run(
    args: &PushArgs,
    store: &Store,
    infos: &[crate::store::PathInfo],
    partial: &Partial,
    cache: Option<&Cache>,
) -> anyhow::Result<bool> {
    let keys =
        args.secret_keys.iter().map(|p| super::read_secret_key(p)).collect::<anyhow::Result<Vec<_>>>()?;
    let public: Vec<_> = keys.iter().map(|k| k.public_key()).collect();
    let (mut there, mut sign, mut write, mut bytes) = (0, 0, 0, 0);
    for (info, left) in infos.iter().zip(&partial.left) {
        let abs = store.store_dir().display(&info.path);
        if let Some(r) = left {
            let verb = if r.elsewhere() { "would skip" } else { "would leave out" };
            crate::outln!("{verb} {abs} ({}): {}", progress::bytes(info.nar_size), r.describe());
            continue;
        }
        // What the push would decide (with --repair, the NARs there are read and checked).
        let decision = match &cache {
            Some(c) => crate::push::decide(c, store.store_dir(), info, args.force, args.repair, &mut |_| {}),
            None => Decision::Push,
        };
        match &decision {
            Decision::Present(_) if decision.lacks_signatures(&public) => sign += 1,
            Decision::Present(_) => there += 1,
            Decision::Repair | Decision::Push => {
                write += 1;
                bytes += info.nar_size;
            }
        }
        let what = decision.dry_run_verb(&public);
        crate::outln!("{what} {abs} ({})", progress::bytes(info.nar_size));
    }
    crate::elog!(
        "dry run: {} of closure; {there} already there, {sign} to sign, {write} to write ({} of NAR, {}); nothing was changed",
        progress::plural(infos.len(), "path"),
        progress::bytes(bytes),
        args.compression()
    );
    for line in partial.summary(infos).iter().chain(&partial.lookups) {
        crate::elog!("dry run: {line}");
    }
    Ok(true)
}

/// `--json`: the run as one object; field names are documented in nixcache-push(1) and kept.
fn json(
    args: &PushArgs,
    store_dir: &crate::store_path::StoreDir,
    closure: &[crate::store::PathInfo],
    infos: &[crate::store::PathInfo],
    report: &crate::push::PushReport,
    partial: &Partial,
    started: Instant,
) -> serde_json::Value {
    let errors: Vec<_> = report
        .failed
        .iter()
        .map(|(p, e)| serde_json::json!({"path": store_dir.display(p), "error": crate::util::error_chain(e)}))
        .collect();
    let mut v = serde_json::json!({
        "dest": args.dest.to_string(),
        "compression": args.compression().to_string(),
        "closure": closure.len(),
        "left_out": closure.len() - infos.len(),
        "paths": infos.len(),
        "pushed": report.pushed,
        "skipped": report.skipped,
        "repaired": report.repaired,
        "signed": report.signed,
        "failed": report.failed.len(),
        "nar_bytes": report.nar_bytes,
        "file_bytes": report.file_bytes,
        "seconds": started.elapsed().as_secs_f64(),
        "ok": report.ok(),
        "errors": errors,
    });
    if args.json_paths {
        let mut each: Vec<serde_json::Value> = Vec::new();
        let failed: std::collections::HashSet<_> = report.failed.iter().map(|(p, _)| p).collect();
        let done: std::collections::HashMap<usize, _> =
            report.outcomes.iter().map(|&(k, o, n, f)| (k, (o, n, f))).collect();
        for (k, info) in infos.iter().enumerate() {
            let (outcome, nar, file) = match done.get(&k) {
                Some(&(o, n, f)) => (o.name(), n, f),
                None if failed.contains(&info.path) => ("failed", 0, 0),
                None => ("not-published", 0, 0),
            };
            each.push(serde_json::json!({
                "path": store_dir.display(&info.path), "outcome": outcome, "nar_bytes": nar, "file_bytes": file,
            }));
        }
        for (info, r) in closure.iter().zip(&partial.left) {
            if let Some(r) = r {
                each.push(serde_json::json!({
                    "path": store_dir.display(&info.path), "outcome": "left-out", "reason": r.describe(),
                    "nar_bytes": 0, "file_bytes": 0,
                }));
            }
        }
        v["path_outcomes"] = serde_json::Value::Array(each);
    }
    v
}

/// A push without `-k`: says which keys sign the cache's narinfos already (its new ones will
/// lack them; `present` are narinfos known to be there), and which key files Nix's own
/// nix.conf names (not used unasked).
fn warn_unsigned(cache: Option<&Cache>, present: &[String]) {
    let names = cache.map(|c| super::signing_key_names(c, present)).unwrap_or_default();
    if !names.is_empty() {
        crate::elog!(
            "warning: no --secret-key, but this cache's narinfos are signed by {}: what this push writes is unsigned, and clients that trust only those keys will not use it; pass -k with the secret key of {}",
            names.join(", "),
            names[0]
        );
    }
    let conf = super::NixConfKeys::read();
    if !conf.secret_key_files.is_empty() {
        let files: Vec<String> = conf.secret_key_files.iter().map(|f| f.display().to_string()).collect();
        crate::elog!(
            "warning: nix.conf has secret-key-files = {}; nixcache signs only with the keys it is given: pass -k {} (or set NIXCACHE_SECRET_KEY_FILE) to sign with it",
            files.join(" "),
            files[0]
        );
    }
}

/// Store paths from `--stdin`, one a line; blank lines and `#` comments are passed over.
fn read_paths(input: impl BufRead) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut paths = Vec::new();
    for line in input.lines() {
        let line = line?;
        let line = line.trim();
        if !line.is_empty() && !line.starts_with('#') {
            paths.push(line.into());
        }
    }
    Ok(paths)
}

/// Runs `work`; meanwhile, for a remote cache and on a terminal, the overall bar says what has
/// crossed the link and how fast (it counts NAR bytes compressed, which run ahead of a slow
/// link).
fn with_link_progress<T>(cache: &Cache, progress: &Progress, work: impl FnOnce() -> T) -> T {
    if cache.bytes_sent().is_none() || progress.mode() != Mode::Bars {
        return work();
    }
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let (started, mut last) = (Instant::now(), (Instant::now(), 0u64));
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(250));
                let sent = cache.bytes_sent().unwrap_or(0);
                let rate = (sent - last.1) as f64 / last.0.elapsed().as_secs_f64().max(0.001);
                if last.0.elapsed() >= std::time::Duration::from_secs(2) || started.elapsed().as_secs() < 2 {
                    last = (Instant::now(), sent);
                }
                progress.note(format!("sent {} ({}/s)", progress::bytes(sent), progress::bytes(rate as u64)));
            }
        });
        let result = work();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        result
    })
}

/// nix-serve's default: ahead of cache.nixos.org (40) on clients that use both.
pub(crate) const DEFAULT_PRIORITY: u32 = 30;

pub fn run(args: &PushArgs) -> anyhow::Result<bool> {
    let started = Instant::now();
    let keys =
        args.secret_keys.iter().map(|p| super::read_secret_key(p)).collect::<anyhow::Result<Vec<_>>>()?;
    let level = args.compression().level(args.compression_level)?;
    let jobs = args
        .jobs
        .map(usize::from)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));

    super::check_dest(&args.dest, &[args.store.real_store_dir(), args.store.store_dir.as_str().into()])?;
    let dest = super::remote::resolve(args)?;
    let store = Store::open(&args.store.config()).context("cannot open the Nix store")?;
    let mut args_paths = args.paths.clone();
    // `nix-build | nixcache push --dest X`: with no paths given, a pipe is read as --stdin.
    if args.stdin || (args_paths.is_empty() && !std::io::stdin().is_terminal()) {
        args_paths
            .extend(read_paths(std::io::stdin().lock()).context("cannot read paths from standard input")?);
    }
    if args_paths.is_empty() {
        return Err(super::Usage(
            "no store paths given: pass them as arguments (./result, /nix/store/...), or on standard input with --stdin".into(),
        )
        .into());
    }
    let roots = args_paths.iter().map(|p| store.resolve(p)).collect::<Result<Vec<_>, _>>()?;
    let infos = store
        .closure(&roots, args.include_outputs)
        .with_context(|| format!("cannot read the closure from the {}", store.source_name()))?;
    let mode = Mode::detect(args.quiet || args.json);
    // The cache as it is, for its records (and the dry run), before anything is written. A
    // bucket a push will write is opened with the push's credentials: what is wrong with them
    // is the first thing said.
    let opened = match &dest {
        crate::storage::Dest::Dir(d) if !d.exists() => None,
        crate::storage::Dest::Bucket(_) if !args.dry_run => Some(Cache::create(&dest)?),
        // Connected once (over ssh, the receiver runs from here to the end).
        crate::storage::Dest::Remote(_) => Some(Cache::create(&dest)?),
        dest => Some(Cache::inspect(dest)?),
    };
    let recorded = Partial::recorded(args, opened.as_ref())?;
    let partial = Partial::decide(args, store.store_dir(), &infos, recorded)?;
    if mode != Mode::Quiet
        && let Some(line) = partial.recorded_line(&args.dest.to_string())
    {
        crate::elog!("{line}");
    }
    // Warnings are said with --quiet too: a partial cache silently turning into a full one
    // in a timer is what -q must not hide.
    for line in &partial.warnings {
        crate::elog!("{line}");
    }
    if args.dry_run {
        if let Some(c) = &opened {
            // A remote cache says in one answer which paths it has (nothing is recorded).
            let hashes: Vec<&str> = infos.iter().map(|i| i.path.hash_part()).collect();
            c.look_ahead(&hashes)?;
        }
        if keys.is_empty() {
            warn_unsigned(opened.as_ref(), &[]);
        }
        return dry_run(args, &store, &infos, &partial, opened.as_ref());
    }
    let closure = infos;
    let infos = partial.kept(&closure);

    let mut cache = match (&dest, opened) {
        (crate::storage::Dest::Bucket(_) | crate::storage::Dest::Remote(_), Some(c)) => c,
        _ => Cache::create(&dest)?,
    };
    cache.lock_within(args.lock_timeout, |who| {
        if mode != Mode::Quiet {
            super::say_waiting(&args.dest, who, args.lock_timeout);
        }
    })?;
    for p in cache.clean_temp_files()? {
        if mode != Mode::Quiet {
            crate::elog!("removed {} left by an interrupted run", p);
        }
    }
    cache.ensure_cache_info(store.store_dir(), args.want_mass_query(), args.priority, DEFAULT_PRIORITY)?;
    partial.record(&mut cache)?;
    // Before looking: a gc that starts from now on keeps what this push names.
    let announced = crate::push::announce(&cache, &infos)?;
    super::keep_copies(&cache, &args.dest, args.no_local_copies);
    let lookups = cache.prepare_lookups(infos.len())?;
    // The closure's narinfos the cache has (a bucket answers from the listing just made, so a
    // push without -k samples their signatures without listing the bucket again).
    let present: Vec<String> = if mode != Mode::Quiet || keys.is_empty() {
        infos.iter().map(|i| Cache::narinfo_rel(&i.path)).filter(|rel| cache.stat(rel).is_some()).collect()
    } else {
        Vec::new()
    };
    if keys.is_empty() {
        warn_unsigned(Some(&cache), &present);
    }

    let total: u64 = infos.iter().map(|i| i.nar_size).sum();
    if mode != Mode::Quiet {
        // At once, before any path is read: what this run is about, and how much of it is
        // new (a no-op nightly push reads as one).
        let new = infos.len() - present.len();
        crate::elog!(
            "pushing {} ({new} not in the cache yet), {} of NAR, to {}, {}, {}",
            progress::plural(infos.len(), "path"),
            progress::bytes(total),
            args.dest,
            args.compression(),
            progress::plural(jobs, "thread")
        );
    }
    if let Some(how) = lookups
        && mode != Mode::Quiet
    {
        crate::elog!("{how}");
    }
    let progress = Progress::new(mode, "pushing", infos.len(), total);
    if args.index_debug_info {
        cache.create_subdir("debuginfo")?;
    }
    let opts = PushOptions {
        compression: args.compression(),
        level,
        jobs,
        force: args.force,
        repair: args.repair,
        keys,
        nar_listing: args.nar_listing,
        index_debug_info: args.index_debug_info,
    };
    let mut report =
        with_link_progress(&cache, &progress, || push(&store.location(), &cache, &infos, &opts, &progress));
    progress.finish();
    let write_cache_info = || {
        cache.ensure_cache_info(store.store_dir(), args.want_mass_query(), args.priority, DEFAULT_PRIORITY)
    };
    let settled = crate::push::settle(
        &cache,
        &store.location(),
        &infos,
        &opts,
        &mut report,
        announced,
        write_cache_info,
    )?;
    if settled.wrote_cache_info {
        crate::elog!(
            "nix-cache-info was missing from {} at the end of the push: written again",
            cache.describe()
        );
    }
    let again = settled.again;

    if mode != Mode::Quiet {
        let ratio = if report.nar_bytes > 0 {
            format!(" ({:.1}%)", 100.0 * report.file_bytes as f64 / report.nar_bytes as f64)
        } else {
            String::new()
        };
        // Every narinfo written in the run is signed too, when there is a key.
        let written = if opts.keys.is_empty() { 0 } else { report.pushed + report.repaired };
        crate::elog!(
            "{}: {} pushed, {} skipped, {} repaired, {} signed, {} failed; {} NAR -> {} {}{ratio} in {:.2}s",
            progress::plural(infos.len(), "path"),
            report.pushed,
            report.skipped,
            report.repaired,
            report.signed + written,
            report.failed.len(),
            progress::bytes(report.nar_bytes),
            progress::bytes(report.file_bytes),
            args.compression(),
            started.elapsed().as_secs_f64(),
        );
        if again > 0 {
            crate::elog!(
                "{} of this push were missing from {} when it checked at the end (a gc ran meanwhile, or the server lost a write): pushed again",
                progress::plural(again, "path"),
                args.dest
            );
        }
        for line in partial.summary(&closure).iter().chain(&partial.lookups) {
            crate::elog!("{line}");
        }
        super::say_requests(&cache);
    }
    if args.json {
        crate::outln!("{}", json(args, store.store_dir(), &closure, &infos, &report, &partial, started));
    }
    if !report.ok() {
        for (p, e) in &report.failed {
            if matches!(e, crate::push::PushError::Dependency { .. }) {
                crate::elog!("error: {}: {}", store.store_dir().display(p), crate::util::error_chain(e));
            }
        }
        let full = report.failed.iter().filter(|(_, e)| e.is_cache_full()).count();
        if full > 0 {
            // What is left to write, at the compression ratio of the closure's paths in the
            // cache now: the same figure when the push is run again without freeing space.
            let sizes: std::collections::HashMap<_, _> =
                infos.iter().map(|i| (&i.path, i.nar_size)).collect();
            let left: u64 = report.failed.iter().filter_map(|(p, _)| sizes.get(p)).sum();
            let (mut nar, mut file) = (0u64, 0u64);
            for i in &infos {
                if let Ok(Some(ni)) = cache.read_narinfo(&Cache::narinfo_rel(&i.path)) {
                    nar += ni.nar_size;
                    file += ni.file_size.unwrap_or(ni.nar_size);
                }
            }
            let ratio = if nar > 0 { file as f64 / nar as f64 } else { 1.0 };
            crate::elog!(
                "error: the cache's filesystem is full ({} paths could not be written to {}); about {} more free space is needed ({} of NAR left, at the {:.0}% ratio of the closure's paths in the cache): free space there, then push again",
                full,
                args.dest,
                progress::bytes((left as f64 * ratio) as u64),
                progress::bytes(left),
                ratio * 100.0
            );
        }
        crate::elog!(
            "error: {} of {} paths were not published; the cache is consistent, fix the errors above and push again",
            report.failed.len(),
            infos.len()
        );
    }
    Ok(report.ok())
}
