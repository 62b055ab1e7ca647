//! What a cache keeps about the runs that write it: removals, push records and gc markers,
//! upstream records, and the bucket's request counts and local copies.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{Cache, CacheError, FileProblem, Leftover, Meta, Record, UPSTREAMS_LIMIT};
use crate::upstream::Upstreams;

impl Cache {
    /// Removes a cache file (a link itself, never what it points to).
    pub fn remove(&self, rel: &str) -> Result<(), CacheError> {
        match self.resolve(rel) {
            Some(rel) => Ok(self.backend.remove(rel)?),
            None => Ok(()),
        }
    }

    /// Removes a temporary file, or aborts an incomplete upload.
    pub fn remove_leftover(&self, l: &Leftover) -> Result<(), CacheError> {
        Ok(self.backend.remove_leftover(l)?)
    }

    /// The protocol of storage without a writers' lock (a bucket), if this cache is on one.
    fn shared(&self) -> Option<&dyn crate::storage::Shared> {
        self.backend.shared()
    }

    /// Records the narinfos a push names, where modification times cannot be touched.
    pub fn record_push(&self, hash_parts: &[&str]) -> Result<Option<String>, CacheError> {
        Ok(self.shared().map(|s| s.record_push(hash_parts)).transpose()?.flatten())
    }

    /// Removes a push record.
    pub fn remove_record(&self, name: &str) -> Result<(), CacheError> {
        Ok(self.backend.remove(name)?)
    }

    /// On a bucket: says a gc is about to delete (see [`Cache::deleting`]); the marker's name.
    pub fn start_deleting(&self) -> Result<Option<String>, CacheError> {
        Ok(self.shared().map(|s| s.start_deleting()).transpose()?.flatten())
    }

    /// Removes the marker [`Cache::start_deleting`] wrote, once the gc's deletions have landed.
    pub fn done_deleting(&self, marker: &str) -> Result<(), CacheError> {
        match self.shared() {
            Some(s) => Ok(s.done_deleting(marker)?),
            None => Ok(()),
        }
    }

    /// On a bucket: the markers of gcs deleting now, or killed while they deleted. A push that
    /// finds none after writing its push record knows that whatever it then finds present
    /// stays: a gc that starts later reads the record before it deletes and spares what it
    /// names.
    pub fn deleting(&self) -> Result<Vec<Meta>, CacheError> {
        Ok(self.shared().map(|s| s.deleting()).transpose()?.unwrap_or_default())
    }

    /// The push records, on a bucket, each hash part handed to `each` with its record's
    /// time. A record that cannot be read is the error.
    pub fn push_records(&self, each: &mut dyn FnMut(&str, SystemTime)) -> Result<Vec<Record>, CacheError> {
        Ok(self.shared().map(|s| s.push_records(&|_| false, each)).transpose()?.unwrap_or_default())
    }

    /// The hash parts named by push records not in `known` (records written since those were
    /// listed).
    pub fn new_push_records(&self, known: &HashSet<String>) -> Result<HashSet<String>, CacheError> {
        let mut named = HashSet::new();
        if let Some(s) = self.shared() {
            s.push_records(&|n| known.contains(n), &mut |h, _| {
                named.insert(h.to_owned());
            })?;
        }
        Ok(named)
    }

    /// Prepares to look up `paths` store paths (a bucket may list itself once).
    pub fn prepare_lookups(&self, paths: usize) -> Result<Option<String>, CacheError> {
        Ok(self.shared().map(|s| s.prepare_lookups(paths)).transpose()?.flatten())
    }

    /// [`Cache::prepare_lookups`] with the top level as `top`, the caller's own listing of it
    /// just before ([`Cache::list_entries`] of `""`, everything kept): a bucket lists only
    /// `nar/` then.
    pub fn prepare_lookups_after(&self, paths: usize, top: Vec<Meta>) -> Result<Option<String>, CacheError> {
        Ok(self.shared().map(|s| s.prepare_lookups_after(paths, top)).transpose()?.flatten())
    }

    /// What this cache leaves to other caches: every upstreams record, merged. A record that
    /// cannot be read or parsed is the error (verify and gc must not guess).
    pub fn upstreams(&self) -> Result<Upstreams, CacheError> {
        let mut merged = Upstreams::default();
        let names = self.list(crate::layout::STATE_DIR, |n| {
            let base = n.rsplit('/').next().unwrap_or_default();
            base.starts_with(crate::layout::UPSTREAMS_PREFIX)
        })?;
        for rel in names {
            let bad = |source| CacheError::BadFile { path: self.locate(&rel), source };
            let Some(bytes) = self.backend.read(&rel, UPSTREAMS_LIMIT).map_err(bad)? else { continue };
            let text = String::from_utf8(bytes).map_err(|_| bad(FileProblem::NotText))?;
            let r: Upstreams = text
                .parse()
                .map_err(|source| CacheError::BadUpstreams { path: self.locate(&rel), source })?;
            merged.merge(&r);
        }
        Ok(merged)
    }

    /// Writes `record` as a new upstreams record, durably. Returns its name.
    pub fn add_upstreams(&mut self, record: &Upstreams) -> Result<String, CacheError> {
        self.create_subdir(crate::layout::STATE_DIR)?;
        let ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis();
        // Unique without coordination: the time, and random bits (the pid, failing those).
        let mut b = [0u8; 4];
        let id = getrandom::fill(&mut b).map_or(std::process::id(), |()| u32::from_le_bytes(b));
        let rel = format!("{}/{}{ms}-{id:08x}", crate::layout::STATE_DIR, crate::layout::UPSTREAMS_PREFIX);
        self.write_atomic(&rel, record.to_string().as_bytes())?;
        Ok(rel)
    }

    /// The bytes sent to a remote cache so far ([`crate::storage::Shared::bytes_sent`]).
    pub fn bytes_sent(&self) -> Option<u64> {
        self.shared().and_then(|s| s.bytes_sent())
    }

    /// Learns at once what the cache holds of these paths, recording nothing ([`crate::storage::Shared::look_ahead`]).
    pub fn look_ahead(&self, hash_parts: &[&str]) -> Result<(), CacheError> {
        if let Some(s) = self.shared() {
            s.look_ahead(hash_parts)?;
        }
        Ok(())
    }

    /// Requests made to a bucket so far, by kind.
    pub fn requests(&self) -> std::collections::HashMap<&'static str, crate::storage::Requests> {
        self.shared().map(|s| s.requests()).unwrap_or_default()
    }

    /// Keeps copies of a bucket's narinfos in `dir` on this machine and reads a narinfo from
    /// its copy while the bucket's listing shows it unchanged (see
    /// [`crate::storage::Shared::keep_copies`]); nothing for a directory.
    pub fn keep_copies(&self, dir: &Path) -> Result<(), crate::storage::s3::CopiesError> {
        self.shared().map_or(Ok(()), |s| s.keep_copies(dir))
    }

    /// Where the copies are kept and how many reads they answered, when they are.
    pub fn copies_used(&self) -> Option<(PathBuf, u64)> {
        self.shared().and_then(|s| s.copies_used())
    }
}
