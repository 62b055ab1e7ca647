//! Carrying out a gc's plan: layer by layer, sparing what a push started meanwhile names.

use std::collections::HashSet;

use super::{GcError, GcReport, Target};
use crate::cache::Cache;
use crate::index::Index;

/// Removes what `report` names, in its order: each removal as its [`Target`] says, the
/// directory synced between layers of narinfos.
pub(super) fn delete(cache: &Cache, index: &Index, report: &mut GcReport) -> Result<(), GcError> {
    // Where writers do not exclude each other (a bucket), a push may start while gc
    // works: it records its closure before it looks. Before each layer of narinfos and
    // before the NARs, gc reads the records written since it started and spares what they
    // name (with the NARs those narinfos name), so it never takes away what such a push
    // found present and skipped.
    let known: HashSet<String> = index.records.iter().map(|(n, _)| n.clone()).collect();
    let mut spared: HashSet<String> = HashSet::new();
    let mut spared_nars: HashSet<String> = HashSet::new();
    let mut kept_back = vec![false; report.removals.len()];
    let layer = |i: usize| report.removals[i].target.layer();
    for (i, r) in report.removals.iter().enumerate() {
        if i > 0 && layer(i - 1).is_some() && layer(i) != layer(i - 1) {
            cache.sync_dir("")?;
        }
        let boundary = i == 0 || layer(i) != layer(i - 1);
        if boundary && !cache.exclusive() {
            for h in cache.new_push_records(&known)? {
                if let Some(nar) =
                    index.entries.get(&h).and_then(|e| e.narinfo.as_ref().ok()).and_then(|ni| ni.nar_file())
                {
                    spared_nars.insert(nar);
                }
                spared.insert(h);
            }
        }
        let spare = match &r.target {
            Target::NarInfo { hash, .. } | Target::Listing { hash, .. } => spared.contains(hash),
            Target::Nar => spared_nars.contains(&r.file),
            _ => false,
        };
        if spare {
            kept_back[i] = true;
            continue;
        }
        match &r.target {
            Target::Leftover(l) => cache.remove_leftover(l)?,
            Target::Record => cache.remove_record(&r.file)?,
            Target::NarInfo { .. } | Target::Listing { .. } | Target::Nar | Target::DebugLink => {
                cache.remove(&r.file)?
            }
        }
    }
    let mut k = kept_back.iter();
    report.removals.retain(|_| !k.next().copied().unwrap_or(false));
    let spared_paths = report.removed_paths - report.removals.iter().filter(|r| r.reason.is_some()).count();
    if spared_paths > 0 {
        report.removed_paths -= spared_paths;
        report.kept += spared_paths;
        report.warnings.push(format!("kept {spared_paths} paths that a push started during this gc names"));
    }
    report.bytes_freed = report.removals.iter().map(|r| r.bytes).sum();
    Ok(())
}
