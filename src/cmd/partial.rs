//! `push --skip-signed-by / --skip-upstream / --exclude`: which paths of the closure a push
//! leaves to other caches, decided before the cache is touched.

use std::collections::{BTreeMap, HashSet};

use anyhow::bail;

use crate::cache::Cache;
use crate::cli::PushArgs;
use crate::progress;
use crate::store::PathInfo;
use crate::store_path::StoreDir;
use crate::upstream::lookup::{self, Upstream};
use crate::upstream::{Policy, Reason, Upstreams};

/// What a push leaves out, and what it must record.
#[derive(Default)]
pub struct Partial {
    /// Per path of the closure, why it is left out (None: pushed).
    pub left: Vec<Option<Reason>>,
    /// What the cache had recorded before this push.
    pub recorded: Upstreams,
    /// The policy and paths this push applies; what of it is not recorded yet is written.
    pub wanted: Upstreams,
    /// One line per upstream asked.
    pub lookups: Vec<String>,
    /// Warnings for the first lines (an upstream that could not be reached).
    pub warnings: Vec<String>,
}

impl Partial {
    /// What the cache `opened` recorded (none when there is no cache yet, or with `--no-skip`).
    pub fn recorded(args: &PushArgs, opened: Option<&Cache>) -> anyhow::Result<Upstreams> {
        Ok(match opened {
            Some(cache) if !args.no_skip => cache.upstreams()?,
            _ => Upstreams::default(),
        })
    }

    /// Decides what of `infos` to leave out, from the flags and what the cache `recorded`.
    pub fn decide(
        args: &PushArgs,
        store_dir: &StoreDir,
        infos: &[PathInfo],
        recorded: Upstreams,
    ) -> anyhow::Result<Partial> {
        let mut wanted = Upstreams {
            signed_by: args.skip_signed_by.clone(),
            upstreams: args.skip_upstream.iter().map(|u| u.trim_end_matches('/').to_owned()).collect(),
            excludes: args.exclude.clone(),
            ..Default::default()
        };
        wanted.merge(&Upstreams { left: Default::default(), ..recorded.clone() });
        let policy = Policy::new(wanted.signed_by.clone(), &wanted.excludes)?;

        let mut left: Vec<Option<Reason>> = infos
            .iter()
            .map(|i| {
                // What an earlier push left out stays out (re-running asks no upstream again);
                // an exclusion is decided afresh, as the expressions are recorded too.
                policy
                    .local_reason(store_dir, i)
                    .or_else(|| recorded.covers(i.path.hash_part()).filter(|r| r.elsewhere()).cloned())
            })
            .collect();

        let mut p = Partial { recorded, ..Default::default() };
        let mut opened = Vec::new();
        for url in &wanted.upstreams {
            match Upstream::open(url, store_dir) {
                Ok(u) => opened.push(u),
                Err(e) if e.recoverable() => p.warnings.push(format!("warning: {e}")),
                Err(e) => return Err(e.into()),
            }
        }
        if !opened.is_empty() {
            let ask: Vec<usize> = (0..infos.len()).filter(|&i| left[i].is_none()).collect();
            let paths: Vec<_> = ask.iter().map(|&i| &infos[i].path).collect();
            let (found, asked) = lookup::find(&opened, store_dir, &paths);
            for (&i, f) in ask.iter().zip(found) {
                if let Some(u) = f {
                    left[i] = Some(Reason::Upstream(opened[u].url().to_owned()));
                }
            }
            p.lookups = opened.iter().zip(asked).map(|(u, n)| u.summary(n)).collect();
        }

        // A pushed path that references an excluded one leaves a hole clients fall into.
        let excluded: HashSet<&str> = infos
            .iter()
            .zip(&left)
            .filter(|(_, r)| matches!(r, Some(Reason::Excluded(_))))
            .map(|(i, _)| i.path.hash_part())
            .collect();
        if !excluded.is_empty() && !args.allow_incomplete {
            let mut holes = Vec::new();
            for (info, r) in infos.iter().zip(&left) {
                if r.is_some() {
                    continue;
                }
                for dep in info.references.iter().filter(|d| excluded.contains(d.hash_part())) {
                    holes.push(format!(
                        "  {} references {}",
                        store_dir.display(&info.path),
                        store_dir.display(dep)
                    ));
                }
            }
            if !holes.is_empty() {
                bail!(
                    "{} of the closure reference --exclude'd paths; nothing was written. Clients could not restore them from this cache: exclude them too, or pass --allow-incomplete to push them anyway:\n{}",
                    progress::plural(holes.len(), "reference"),
                    holes.join("\n")
                );
            }
        }
        for (info, r) in infos.iter().zip(&left) {
            if let Some(r) = r {
                wanted.leave(&info.path, r.clone());
            }
        }
        p.left = left;
        p.wanted = wanted;
        Ok(p)
    }

    /// Whether any path is left out.
    pub fn any(&self) -> bool {
        self.left.iter().any(Option::is_some)
    }

    /// The first line, when the cache's records decide part of this push.
    pub fn recorded_line(&self, dest: &str) -> Option<String> {
        let r = &self.recorded;
        if r.signed_by.is_empty() && r.upstreams.is_empty() && r.excludes.is_empty() {
            return None;
        }
        let mut what: Vec<String> = r.signed_by.iter().map(|k| format!("signed by {}", k.name())).collect();
        what.extend(r.upstreams.iter().map(|u| format!("on {u}")));
        what.extend(r.excludes.iter().map(|e| format!("matching --exclude '{e}'")));
        Some(format!(
            "{dest} is a partial cache: as recorded in it, paths {} are left out ({} recorded); --no-skip pushes them all",
            what.join(", "),
            progress::plural(r.left.len(), "path")
        ))
    }

    /// `1234 paths (5.6 GiB of NAR) skipped: signed by cache.nixos.org-1`, per reason.
    pub fn summary(&self, infos: &[PathInfo]) -> Vec<String> {
        let mut by: BTreeMap<&Reason, (usize, u64)> = BTreeMap::new();
        for (info, r) in infos.iter().zip(&self.left) {
            if let Some(r) = r {
                let e = by.entry(r).or_default();
                e.0 += 1;
                e.1 += info.nar_size;
            }
        }
        by.into_iter()
            .map(|(r, (n, bytes))| {
                let verb = if r.elsewhere() { "skipped" } else { "left out" };
                let why = match r {
                    Reason::Excluded(e) => format!("they match --exclude '{e}'"),
                    r => r.describe(),
                };
                format!("{} ({} of NAR) {verb}: {why}", progress::plural(n, "path"), progress::bytes(bytes))
            })
            .collect()
    }

    /// The paths to push.
    pub fn kept(&self, infos: &[PathInfo]) -> Vec<PathInfo> {
        infos.iter().zip(&self.left).filter(|(_, r)| r.is_none()).map(|(i, _)| i.clone()).collect()
    }

    /// Writes what this push adds to the cache's records, before any narinfo that relies on
    /// it is published (a gc meanwhile must see the hole is deliberate). The policy is
    /// recorded even when nothing is left out this time (an upstream that could not be
    /// reached), so the next push still asks it.
    pub fn record(&self, cache: &mut Cache) -> anyhow::Result<Option<String>> {
        let new = self.recorded.missing(&self.wanted);
        if new.is_empty() {
            return Ok(None);
        }
        Ok(Some(cache.add_upstreams(&new)?))
    }
}
