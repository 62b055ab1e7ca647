//! One listing of the bucket that a push's lookups are answered from, kept up to date with
//! what the run itself writes and deletes; and the copies of narinfos kept on this machine.

use std::time::SystemTime;

use super::client::Client;
use super::copies::Copies;
use super::{Meta, S3Backend, StorageError};
use crate::layout::FileKind;

impl Client {
    /// What the listing says of `rel`: `None` when there is no listing or it did not cover
    /// `rel` (it covers the top level and `nar/`), else whether and what it is.
    pub(super) fn listed(&self, rel: &str) -> Option<Option<Meta>> {
        let snapshot = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        snapshot.as_ref().filter(|_| listed_in(rel).is_some()).map(|s| s.get(rel).cloned())
    }

    /// Remembers that `rel` now exists, for lookups answered from the listing.
    pub(super) fn noted(&self, rel: &str, size: u64, etag: Option<String>) {
        if let Some(s) = self.snapshot.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            s.insert(
                rel.to_owned(),
                Meta { name: rel.to_owned(), size, modified: SystemTime::now(), not_regular: None, etag },
            );
        }
    }

    /// The copies kept on this machine, when `rel` is a narinfo and they are kept.
    pub(super) fn copies_of(&self, rel: &str) -> Option<&Copies> {
        self.copies.get().filter(|_| !rel.contains('/') && FileKind::of(rel) == FileKind::NarInfo)
    }

    /// The copy of `rel` kept on this machine, if it is the object `listed` (same ETag and
    /// size) and at most `limit` bytes.
    pub(super) fn copy_of(&self, rel: &str, listed: &Meta, limit: u64) -> Option<Vec<u8>> {
        let (copies, etag) = (self.copies_of(rel)?, listed.etag.as_ref()?);
        (listed.size <= limit).then(|| copies.get(&self.key(rel), etag, listed.size)).flatten()
    }
}

impl S3Backend {
    /// The listing lookups are answered from: the top level (or `top`, as the caller listed
    /// it) and `nar/`. A listing page names up to 1000 objects; without one, each path costs
    /// a request or two. It lists when that takes fewer requests than the paths.
    pub(super) fn lookups_listing(
        &self,
        paths: usize,
        top: Option<Vec<Meta>>,
    ) -> Result<Option<String>, StorageError> {
        let c = &self.client;
        // Whatever was listed before is forgotten: the answers are asked for again.
        *c.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let budget = paths.max(1);
        // The two listings at once: each is a chain of pages, one request after another.
        let nar_dir = c.key("nar/");
        let (top, nars) = std::thread::scope(|scope| {
            let nars = scope.spawn(|| c.list_keys(&nar_dir, true, Some(budget)));
            let top = match top {
                Some(top) => Ok(Some(top)),
                None => c.list_keys(&c.prefix, true, Some(budget)),
            };
            (top, nars.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
        });
        let (Some(top), Some(nars)) =
            (top.map_err(self.io("list", ""))?, nars.map_err(self.io("list", "nar"))?)
        else {
            return Ok(Some(format!(
                "looking up each of the {paths} paths (the bucket is too large to list for this push)"
            )));
        };
        let n = top.len() + nars.len();
        let map = top.into_iter().chain(nars).map(|m| (m.name.clone(), m)).collect();
        *c.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = Some(map);
        Ok(Some(format!("listed the bucket once ({n} objects)")))
    }

    /// What [`super::Backend::listed_once`] answers.
    pub(super) fn listed_once_in(&self, sub: &str) -> Option<Vec<Meta>> {
        if !["", "nar"].contains(&sub) {
            return None;
        }
        let snapshot = self.client.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        let in_sub = |m: &&Meta| listed_in(&m.name) == Some(sub);
        let mut listed: Vec<Meta> = snapshot.as_ref()?.values().filter(in_sub).cloned().collect();
        listed.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        Some(listed)
    }
}

/// The directory of `rel` that a lookups' listing covers (the top level, `""`, or `"nar"`),
/// if it is one of those.
pub(super) fn listed_in(rel: &str) -> Option<&'static str> {
    match rel.split_once('/') {
        None => Some(""),
        Some(("nar", n)) if !n.contains('/') => Some("nar"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lookups_listing_covers_the_top_level_and_nar() {
        assert_eq!(listed_in("abc.narinfo"), Some(""));
        assert_eq!(listed_in("nar/x.nar.xz"), Some("nar"));
        assert_eq!(listed_in("nar/a/b"), None);
        assert_eq!(listed_in("debuginfo/x"), None);
        assert_eq!(listed_in(".nixcache/pushes/x"), None);
    }
}
