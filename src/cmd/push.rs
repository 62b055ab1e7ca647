//! `nixcache push`: resolve the arguments, read the closure, then run the pipeline.
//!
//! Everything that can be checked before the cache is touched (keys, paths, the closure) is
//! checked first, so bad input leaves the destination as it was.

use std::io::BufRead;
use std::time::Instant;

use anyhow::{Context, bail};

use super::partial::Partial;
use crate::cache::Cache;
use crate::cli::PushArgs;
use crate::progress::{self, Mode, Progress};
use crate::push::{PushOptions, push};
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
        let (found, existed) = match &cache {
            Some(c) => crate::push::existing(c, store.store_dir(), info, |_| {}),
            None => (None, false),
        };
        let complete = found.filter(|ni| cache.as_ref().is_some_and(|c| c.has_nar(ni)) && !args.force);
        let what = match complete {
            Some(ni) if public.iter().all(|k| ni.verified_by(std::slice::from_ref(k))) => {
                there += 1;
                "already there"
            }
            Some(_) => {
                sign += 1;
                "would sign"
            }
            None => {
                write += 1;
                bytes += info.nar_size;
                if existed { "would repair" } else { "would push" }
            }
        };
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

    let store = Store::open(&args.store.config()).context("cannot open the Nix store")?;
    let mut args_paths = args.paths.clone();
    if args.stdin {
        for line in std::io::stdin().lock().lines() {
            let line = line.context("cannot read paths from standard input")?;
            let line = line.trim();
            if !line.is_empty() {
                args_paths.push(line.into());
            }
        }
    }
    if args_paths.is_empty() {
        bail!("no store paths given (pass paths as arguments or with --stdin)");
    }
    let roots = args_paths.iter().map(|p| store.resolve(p)).collect::<Result<Vec<_>, _>>()?;
    let infos = store
        .closure(&roots, args.include_outputs)
        .with_context(|| format!("cannot read the closure from the {}", store.source_name()))?;
    let mode = Mode::detect(args.quiet);
    // The cache as it is, for its records (and the dry run), before anything is written. A
    // bucket a push will write is opened with the push's credentials: what is wrong with them
    // is the first thing said.
    let opened = match &args.dest {
        crate::storage::Dest::Dir(d) if !d.exists() => None,
        crate::storage::Dest::Bucket(_) if !args.dry_run => Some(Cache::create(args.dest_with_uploads())?),
        dest => Some(Cache::inspect(dest)?),
    };
    let recorded = Partial::recorded(args, opened.as_ref())?;
    let partial = Partial::decide(args, store.store_dir(), &infos, recorded)?;
    if mode != Mode::Quiet {
        for line in partial.recorded_line(&args.dest.to_string()).iter().chain(&partial.warnings) {
            crate::elog!("{line}");
        }
    }
    if args.dry_run {
        return dry_run(args, &store, &infos, &partial, opened.as_ref());
    }
    let closure = infos;
    let infos = partial.kept(&closure);

    let mut cache = match (&args.dest, opened) {
        (crate::storage::Dest::Bucket(_), Some(c)) => c,
        _ => Cache::create(args.dest_with_uploads())?,
    };
    cache.lock(|| {
        if mode != Mode::Quiet {
            crate::elog!("waiting for another nixcache writing to {} ...", args.dest);
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
    let hashes: Vec<&str> = infos.iter().map(|i| i.path.hash_part()).collect();
    cache.record_push(&hashes)?;
    // Before looking, after the record: whether a gc may be deleting what this push finds.
    let gc_deleting = !cache.exclusive() && cache.deleting().map_or(true, |m| !m.is_empty());
    super::keep_copies(&cache, &args.dest, args.no_local_copies, mode == Mode::Quiet);
    let lookups = cache.prepare_lookups(infos.len())?;

    let total: u64 = infos.iter().map(|i| i.nar_size).sum();
    if mode != Mode::Quiet {
        // At once, before any path is read: what this run is about.
        crate::elog!(
            "pushing {}, {} of NAR, to {}, {}, {}",
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
    let mut report = push(&store.location(), &cache, &infos, &opts, &progress);
    progress.finish();
    let again = settle(&cache, &store.location(), &infos, &opts, &mut report, gc_deleting)?;

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
    if !report.ok() {
        for (p, e) in &report.failed {
            if matches!(e, crate::push::PushError::Dependency { .. }) {
                crate::elog!("error: {}: {}", store.store_dir().display(p), crate::error_chain(e));
            }
        }
        let full = report.failed.iter().filter(|(_, e)| e.is_cache_full()).count();
        if full > 0 {
            // What is left to write, at the compression ratio of what was written.
            let sizes: std::collections::HashMap<_, _> =
                infos.iter().map(|i| (&i.path, i.nar_size)).collect();
            let left: u64 = report.failed.iter().filter_map(|(p, _)| sizes.get(p)).sum();
            let ratio =
                if report.nar_bytes > 0 { report.file_bytes as f64 / report.nar_bytes as f64 } else { 1.0 };
            crate::elog!(
                "error: the cache's filesystem is full ({} paths could not be written to {}); about {} more free space is needed ({} of NAR left, at the {:.0}% ratio of this run): free space there, then push again",
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

/// On storage without a writers' lock: checks the closure is whole in the cache now and pushes
/// again what is not ([`crate::push::missing_now`]), at most [`crate::push::SETTLE_ROUNDS`]
/// times; what is still missing then fails the push. Returns how many paths went again.
///
/// A push that wrote nothing (no write to have been lost) and found no gc deleting once its
/// record was written (`gc_deleting`; a gc that starts later spares what the record names)
/// needs no check: what it found stays.
fn settle(
    cache: &Cache,
    store: &crate::store::StoreLocation,
    infos: &[crate::store::PathInfo],
    opts: &PushOptions,
    report: &mut crate::push::PushReport,
    gc_deleting: bool,
) -> anyhow::Result<usize> {
    if cache.exclusive() || !report.ok() {
        return Ok(0);
    }
    if !gc_deleting && report.pushed + report.repaired + report.signed == 0 {
        return Ok(0);
    }
    let mut again = 0;
    for round in 0..=crate::push::SETTLE_ROUNDS {
        let missing = crate::push::missing_now(cache, infos, report)?;
        if missing.is_empty() {
            break;
        }
        if round == crate::push::SETTLE_ROUNDS {
            anyhow::bail!(
                "{} of this push are still missing from {} after pushing them again {} times: another writer keeps removing them (a gc with a short --older-than?) or the server loses writes",
                progress::plural(missing.len(), "path"),
                cache.describe(),
                crate::push::SETTLE_ROUNDS
            );
        }
        again += missing.len();
        let quiet = Progress::new(Mode::Quiet, "pushing", infos.len(), 0);
        let r = push(store, cache, infos, opts, &quiet);
        report.repaired += r.pushed + r.repaired;
        report.nar_bytes += r.nar_bytes;
        report.file_bytes += r.file_bytes;
        report.failed.extend(r.failed);
        report.nars.extend(r.nars);
        if !report.ok() {
            break;
        }
    }
    Ok(again)
}
