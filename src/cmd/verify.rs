//! `nixcache verify`: exit 0 when clean, 1 when problems were found, 2 when verify could not
//! run.

use std::process::ExitCode;

use crate::cache::Cache;
use crate::cli::VerifyArgs;
use crate::progress::{Mode, Progress};
use crate::verify::{VerifyReport, verify};

fn run_inner(args: &VerifyArgs) -> anyhow::Result<VerifyReport> {
    let keys = args
        .trusted_public_keys
        .iter()
        .map(|k| super::parse_public_key_arg(k))
        .collect::<anyhow::Result<Vec<_>>>()?;
    super::remote::refuse(&args.dest, "verify")?;
    super::check_dest(&args.dest, &[])?;
    let mut cache = Cache::inspect(&args.dest)?;
    let mode = Mode::detect(args.quiet || args.json);
    cache.lock_shared(|_| {
        if mode != Mode::Quiet {
            crate::elog!("waiting for a writer of {} to finish ...", args.dest);
        }
    })?;
    let jobs =
        args.jobs.map_or_else(|| std::thread::available_parallelism().map_or(1, usize::from), usize::from);
    let top = cache.list_entries("", |_| true)?;
    let files = top.iter().filter(|m| crate::cache::is_narinfo_name(&m.name)).count();
    // A bucket: one listing of nar/ (after the narinfos', so it has their NARs) answers for
    // every NAR's size, instead of a request each; the top level as just listed answers for
    // the narinfos.
    cache.prepare_lookups_after(files, top)?;
    let total: u64 = cache.nar_entries()?.iter().filter(|m| m.not_regular.is_none()).map(|m| m.size).sum();
    let progress = Progress::new(mode, "verifying", files, total);
    let report = verify(&cache, &keys, jobs, &progress)?;
    progress.finish();
    if mode != Mode::Quiet {
        super::say_requests(&cache);
    }
    Ok(report)
}

pub fn run(args: &VerifyArgs) -> ExitCode {
    let report = match run_inner(args) {
        Ok(r) => r,
        Err(e) => {
            crate::elog!("error: {}", crate::util::error_chain(e.as_ref()));
            return ExitCode::from(2);
        }
    };
    if args.json {
        let ok = report.problems.is_empty();
        let value = serde_json::json!({
            "ok": ok,
            "narinfos": report.narinfos,
            "narBytes": report.nar_bytes,
            "signaturesChecked": !args.trusted_public_keys.is_empty(),
            "problems": report.problems,
            "leftToUpstreams": report.left_to_upstreams,
        });
        crate::outln!("{value:#}");
    } else {
        for p in &report.problems {
            crate::outln!("{}: {}: {}", p.path, p.kind, p.message);
        }
        if !args.quiet {
            let left: usize = report.left_to_upstreams.values().sum();
            if left > 0 {
                let why: Vec<String> =
                    report.left_to_upstreams.iter().map(|(r, n)| format!("{n} {r}")).collect();
                crate::elog!(
                    "{} left to upstreams or excluded, as this cache's records say ({}): clients need those caches as substituters too",
                    crate::progress::plural(left, "referenced path"),
                    why.join(", ")
                );
            }
            crate::elog!(
                "{}, {} of NAR checked: {}{}",
                crate::progress::plural(report.narinfos, "narinfo"),
                crate::progress::bytes(report.nar_bytes),
                if report.problems.is_empty() {
                    "no problems".to_owned()
                } else {
                    crate::progress::plural(report.problems.len(), "problem")
                },
                if args.trusted_public_keys.is_empty() {
                    "; signatures were not checked (give --trusted-public-key NAME:KEY to check them)"
                } else {
                    ""
                }
            );
        }
    }
    if report.problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) }
}
