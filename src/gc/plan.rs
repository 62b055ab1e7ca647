//! What a gc removes, decided from what it found, as a value: no I/O here, so the decision is
//! unit-tested over an index in memory. Completeness (a fixpoint from the leaves), liveness
//! (the window and `--keep`), the order of removal (referrers first, in layers) and the
//! files that go with what goes.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use super::{GcReport, Reason, Removal};
use crate::cache::Leftover;
use crate::index::Index;
use crate::layout;

/// What a removal is, and so how it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The narinfo of hash part `hash`, in deletion layer `layer` (the directory is synced
    /// between layers).
    NarInfo { hash: String, layer: usize },
    /// The listing of `hash`, in its narinfo's layer.
    Listing { hash: String, layer: usize },
    /// A NAR file no remaining narinfo names.
    Nar,
    /// A debug-info link whose NAR goes.
    DebugLink,
    /// A temporary file or an incomplete upload a killed run left.
    Leftover(Leftover),
    /// A bucket's push record older than the window.
    Record,
}

impl Target {
    /// The deletion layer of a narinfo or listing.
    pub fn layer(&self) -> Option<usize> {
        match self {
            Target::NarInfo { layer, .. } | Target::Listing { layer, .. } => Some(*layer),
            _ => None,
        }
    }

    /// The hash part of the path a narinfo or listing is of.
    pub fn hash(&self) -> Option<&str> {
        match self {
            Target::NarInfo { hash, .. } | Target::Listing { hash, .. } => Some(hash),
            _ => None,
        }
    }
}

/// What a gc found in the cache, every absence among it confirmed.
pub struct Facts<'a> {
    pub index: &'a Index,
    /// The narinfos that parse and whose NAR is there.
    pub with_nar: HashSet<&'a str>,
    /// Whether the cache leaves the path of a hash part to an upstream, on purpose.
    pub left_upstream: &'a dyn Fn(&str) -> bool,
    /// Hash parts whose closures stay (`--keep`).
    pub keep: Vec<String>,
    /// A path included by a push since then stays.
    pub cutoff: SystemTime,
    /// A NAR no narinfo names, or a leftover, older than this goes.
    pub unnamed_cutoff: SystemTime,
    /// The size of a file, if it is there.
    pub size: &'a dyn Fn(&str) -> Option<u64>,
    /// The NAR files (cache-relative), and when one was written.
    pub nar_files: Vec<String>,
    pub modified: &'a dyn Fn(&str) -> Option<SystemTime>,
    /// The debug-info links and the NAR file each points to, when it could be read.
    pub debug_links: Vec<(String, Option<String>)>,
    pub leftovers: Vec<Leftover>,
}

/// What goes, in order.
#[derive(Debug)]
pub struct GcPlan {
    /// Paths that stay.
    pub kept: usize,
    pub removals: Vec<Removal>,
    /// Push records that are not nixcache's, and why.
    pub bad_records: Vec<(String, String)>,
}

impl GcPlan {
    /// The plan as a report (what a dry run shows); `locate` names a record in warnings.
    pub fn report(self, locate: impl Fn(&str) -> String) -> GcReport {
        let warnings = self
            .bad_records
            .iter()
            .map(|(name, why)| {
                format!("{} {why}; it counts for nothing and goes with the window", locate(name))
            })
            .collect();
        let removed_paths =
            self.removals.iter().filter(|r| matches!(r.target, Target::NarInfo { .. })).count();
        let bytes_freed = self.removals.iter().map(|r| r.bytes).sum();
        GcReport { warnings, kept: self.kept, removed_paths, removals: self.removals, bytes_freed }
    }
}

/// Decides what goes (see the module's documentation in [`super`]).
pub fn plan(f: &Facts<'_>) -> GcPlan {
    let index = f.index;
    // Complete: parses, NAR present, and every reference complete (a fixpoint from the
    // leaves). A reference absent here that the cache left to an upstream on purpose is no
    // hole.
    let mut complete = f.with_nar.clone();
    let elsewhere = |r: &str| !index.entries.contains_key(r) && (f.left_upstream)(r);
    loop {
        let broken: Vec<&str> = complete
            .iter()
            .copied()
            .filter(|h| {
                let ni = index.entries[*h].narinfo.as_ref().expect("complete entries parse");
                ni.references.iter().map(|r| r.hash_part()).any(|r| !complete.contains(r) && !elsewhere(r))
            })
            .collect();
        if broken.is_empty() {
            break;
        }
        for b in broken {
            complete.remove(b);
        }
    }

    let recent = index.entries.iter().filter(|(_, e)| e.modified >= f.cutoff).map(|(h, _)| h.as_str());
    let roots: Vec<&str> = recent.chain(f.keep.iter().map(String::as_str)).collect();
    let live: HashSet<String> =
        index.closure(roots).into_iter().filter(|h| complete.contains(h.as_str())).collect();

    // Narinfos to remove, referrers first: a depth-first post-order over References gives
    // references first, so reverse it.
    let doomed: HashSet<&str> =
        index.entries.keys().map(String::as_str).filter(|h| !live.contains(*h)).collect();
    let mut order = Vec::new();
    let mut visited = HashSet::new();
    let mut sorted: Vec<&str> = doomed.iter().copied().collect();
    sorted.sort();
    for h in sorted {
        post_order(index, &doomed, h, &mut visited, &mut order);
    }
    order.reverse();
    // Unlinks reach the disk in any order unless the directory is synced between them, so
    // narinfos go in layers: first those no other doomed narinfo references, then their
    // references, and so on, the directory synced after each layer (and after the last,
    // before any NAR goes). A power cut mid-gc leaves no narinfo whose reference or NAR is
    // gone. Layer of a narinfo: one more than its deepest doomed referrer's.
    let mut layer: HashMap<&str, usize> = HashMap::new();
    for &h in &order {
        let l = *layer.entry(h).or_insert(0);
        let refs = index.entries[h].narinfo.as_ref().map(|ni| ni.references.as_slice()).unwrap_or_default();
        for r in refs.iter().map(|r| r.hash_part()).filter(|r| *r != h && doomed.contains(r)) {
            let e = layer.entry(index.entries.get_key_value(r).expect("doomed entries exist").0).or_insert(0);
            *e = (*e).max(l + 1);
        }
    }
    // Stable: referrers still come first within a layer.
    order.sort_by_key(|h| layer[h]);

    let size = |rel: &str| (f.size)(rel).unwrap_or(0);
    let mut removals = Vec::new();
    let other = |file: String, bytes: u64, target: Target| Removal {
        file,
        store_path: None,
        reason: None,
        bytes,
        target,
    };
    for h in &order {
        let e = &index.entries[*h];
        let reason = match &e.narinfo {
            Err(_) => Reason::Unusable,
            Ok(_) if !complete.contains(h) => Reason::Incomplete,
            Ok(_) => Reason::Old,
        };
        let store_path = e.narinfo.as_ref().ok().map(|ni| ni.store_dir.display(&ni.store_path));
        let (hash, layer) = (h.to_string(), layer[h]);
        removals.push(Removal {
            file: e.file.clone(),
            store_path,
            reason: Some(reason),
            bytes: size(&e.file),
            target: Target::NarInfo { hash: hash.clone(), layer },
        });
        let ls = layout::listing_name(h);
        if (f.size)(&ls).is_some() {
            removals.push(other(ls.clone(), size(&ls), Target::Listing { hash, layer }));
        }
    }

    // NAR files that no remaining narinfo uses: those a removed narinfo named, and others
    // once they are past the grace period (a writer may be about to name them).
    let freed: HashSet<String> = doomed
        .iter()
        .filter_map(|h| index.entries[*h].narinfo.as_ref().ok())
        .filter_map(|ni| ni.nar_file())
        .collect();
    let stale = |rel: &str| (f.modified)(rel).is_some_and(|m| m < f.unnamed_cutoff);
    let used: HashSet<String> = live
        .iter()
        .filter_map(|h| index.entries[h].narinfo.as_ref().ok())
        .filter_map(|ni| ni.nar_file())
        .collect();
    for rel in &f.nar_files {
        if !used.contains(rel) && (freed.contains(rel) || stale(rel)) {
            removals.push(other(rel.clone(), size(rel), Target::Nar));
        }
    }
    // Debug-info links whose NAR goes.
    for (rel, target) in &f.debug_links {
        if !target.as_ref().is_some_and(|t| used.contains(t)) {
            removals.push(other(rel.clone(), size(rel), Target::DebugLink));
        }
    }
    // Temporary files and incomplete uploads: of killed runs once past the grace period.
    for l in &f.leftovers {
        if l.modified < f.unnamed_cutoff {
            removals.push(other(l.name.clone(), l.size, Target::Leftover(l.clone())));
        }
    }
    // Push records (a bucket's) older than the window name nothing gc still needs.
    for (name, when) in &index.records {
        if *when < f.cutoff {
            removals.push(other(name.clone(), 0, Target::Record));
        }
    }
    GcPlan { kept: live.len(), removals, bad_records: index.bad_records.clone() }
}

fn post_order<'a>(
    index: &'a Index,
    doomed: &HashSet<&'a str>,
    h: &'a str,
    visited: &mut HashSet<&'a str>,
    out: &mut Vec<&'a str>,
) {
    if !visited.insert(h) {
        return;
    }
    if let Ok(ni) = &index.entries[h].narinfo {
        for r in &ni.references {
            if let Some((k, _)) = index.entries.get_key_value(r.hash_part())
                && doomed.contains(k.as_str())
            {
                post_order(index, doomed, k.as_str(), visited, out);
            }
        }
    }
    out.push(h);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cache::BadNarInfo;
    use crate::index::Entry;

    const T0: SystemTime = SystemTime::UNIX_EPOCH;
    const HASH: &str = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";

    fn hash(c: char) -> String {
        // A valid hash part: 32 nixbase32 digits.
        std::iter::repeat_n(c, 32).collect()
    }

    /// An index of paths named by one letter each: (letter, references, pushed at (s),
    /// parses).
    fn index(paths: &[(char, &str, u64, bool)]) -> Index {
        let mut entries = HashMap::new();
        for &(c, refs, at, parses) in paths {
            let h = hash(c);
            let refs: Vec<String> = refs.chars().map(|r| format!("{}-{r}", hash(r))).collect();
            let text = format!(
                "StorePath: /nix/store/{h}-{c}\nURL: nar/{c}.nar\nCompression: none\nNarHash: sha256:{HASH}\nNarSize: 1\nReferences: {}\n",
                refs.join(" ")
            );
            let narinfo = if parses { Ok(text.parse().unwrap()) } else { Err(BadNarInfo::Unfetchable) };
            let entry =
                Entry { file: format!("{h}.narinfo"), narinfo, modified: T0 + Duration::from_secs(at) };
            entries.insert(h, entry);
        }
        Index {
            entries,
            records: vec![("r-old".into(), T0), ("r-new".into(), T0 + Duration::from_secs(100))],
            bad_records: Vec::new(),
        }
    }

    fn facts<'a>(index: &'a Index, with_nar: &str, keep: &str) -> Facts<'a> {
        let with_nar =
            index.entries.keys().map(String::as_str).filter(|h| with_nar.contains(&h[..1])).collect();
        Facts {
            index,
            with_nar,
            left_upstream: &|h| h.starts_with('z'),
            keep: keep.chars().map(hash).collect(),
            cutoff: T0 + Duration::from_secs(50),
            unnamed_cutoff: T0 + Duration::from_secs(10),
            size: &|rel| (!rel.ends_with(".ls") || rel.starts_with('d')).then_some(7),
            nar_files: ["nar/a.nar", "nar/d.nar", "nar/stale.nar", "nar/fresh.nar"]
                .map(String::from)
                .to_vec(),
            modified: &|rel| Some(T0 + Duration::from_secs(if rel == "nar/fresh.nar" { 20 } else { 1 })),
            debug_links: vec![
                ("debuginfo/1".into(), Some("nar/a.nar".into())),
                ("debuginfo/2".into(), Some("nar/d.nar".into())),
            ],
            leftovers: vec![Leftover {
                name: ".nixcache-tmp-1".into(),
                size: 3,
                modified: T0,
                upload_id: None,
            }],
        }
    }

    fn files(plan: &GcPlan) -> Vec<(&str, Option<usize>)> {
        plan.removals.iter().map(|r| (r.file.as_str(), r.target.layer())).collect()
    }

    #[test]
    fn old_incomplete_and_unusable_go_referrers_first_and_the_rest_stays() {
        // a -> b -> c pushed recently; d old, with a listing; f -> h recent but h's NAR is
        // missing; g does not parse; k old but kept; w refers to a path left to an upstream.
        let idx = index(&[
            ('a', "b", 100, true),
            ('b', "c", 100, true),
            ('c', "", 100, true),
            ('d', "", 1, true),
            ('h', "", 100, true),
            ('f', "h", 100, true),
            ('g', "", 100, false),
            ('k', "", 1, true),
            ('w', "z", 100, true),
        ]);
        let plan = plan(&facts(&idx, "abcdfkw", "k"));
        assert_eq!(plan.kept, 5, "a, b, c, k and w stay");
        let (f, e, d, g) = (hash('f'), hash('h'), hash('d'), hash('g'));
        let mut narinfos: Vec<_> = plan.removals.iter().filter(|r| r.reason.is_some()).collect();
        narinfos.sort_by_key(|r| r.target.layer());
        let layer = |h: &str| {
            plan.removals.iter().find(|r| r.target.hash() == Some(h)).and_then(|r| r.target.layer())
        };
        // f refers to h: f goes in an earlier layer than e.
        assert!(layer(&f) < layer(&e), "{:?}", files(&plan));
        let reason = |h: &str| {
            plan.removals
                .iter()
                .find(|r| r.target == Target::NarInfo { hash: h.to_owned(), layer: layer(h).unwrap() })
                .unwrap()
                .reason
        };
        assert_eq!(
            (reason(&f), reason(&e), reason(&d), reason(&g)),
            (Some(Reason::Incomplete), Some(Reason::Incomplete), Some(Reason::Old), Some(Reason::Unusable))
        );
        assert_eq!(narinfos.len(), 4);
        // d's listing goes with it, in its layer; the others have none.
        assert!(
            plan.removals
                .iter()
                .any(|r| r.target == Target::Listing { hash: d.clone(), layer: layer(&d).unwrap() })
        );
        // The NAR d named goes at once, an unnamed one once stale; a's stays, the fresh one too.
        let nars: Vec<&str> =
            plan.removals.iter().filter(|r| r.target == Target::Nar).map(|r| r.file.as_str()).collect();
        assert_eq!(nars, ["nar/d.nar", "nar/stale.nar"]);
        let rest: Vec<&Target> = plan
            .removals
            .iter()
            .skip_while(|r| r.target != Target::Nar)
            .map(|r| &r.target)
            .filter(|t| **t != Target::Nar)
            .collect();
        assert!(matches!(rest[..], [Target::DebugLink, Target::Leftover(_), Target::Record]), "{rest:?}");
        assert_eq!(plan.removals.iter().find(|r| r.target == Target::DebugLink).unwrap().file, "debuginfo/2");
        assert_eq!(plan.removals.last().unwrap().file, "r-old");
        let report = plan.report(str::to_owned);
        assert_eq!((report.removed_paths, report.kept), (4, 5));
        assert_eq!(report.bytes_freed, report.removals.iter().map(|r| r.bytes).sum::<u64>());
    }

    #[test]
    fn a_reference_left_to_no_upstream_is_a_hole() {
        let idx = index(&[('a', "x", 100, true)]);
        let plan = plan(&facts(&idx, "a", ""));
        assert_eq!(plan.kept, 0);
        assert_eq!(plan.removals[0].reason, Some(Reason::Incomplete));
    }
}
