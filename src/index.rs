//! All narinfos of a cache in memory, with their modification times: what `sign` and `gc`
//! walk closures over. Closures are computed from narinfo `References:`, so they need only
//! the cache, not the store that pushed it.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use thiserror::Error;

use crate::cache::{BadNarInfo, Cache, CacheError, Meta};
use crate::layout::{hash_of_narinfo, is_narinfo_name};
use crate::narinfo::NarInfo;
use crate::store_path::StorePath;

/// One narinfo file.
#[derive(Debug)]
pub struct Entry {
    /// The narinfo's file name, `<hashpart>.narinfo`.
    pub file: String,
    /// What it holds, or why it serves nothing valid (a link, a special file, too large, not
    /// text, not parsing, or misnamed): such an entry is reported, never trusted.
    pub narinfo: Result<NarInfo, BadNarInfo>,
    /// When a push last included the path (the file's own time, never a link target's).
    pub modified: SystemTime,
}

#[derive(Debug, Error)]
pub enum IndexError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("{path} is not in the cache (no {hash_part}.narinfo)")]
    NotInCache { path: String, hash_part: String },
}

/// The narinfos of a cache, by hash part.
pub struct Index {
    pub entries: HashMap<String, Entry>,
    /// A bucket's push records: name and when written (see [`Cache::push_records`]).
    pub records: Vec<(String, SystemTime)>,
    /// Records that are not what nixcache writes, and why: their paths count for nothing,
    /// and they go with the window.
    pub bad_records: Vec<(String, String)>,
}

/// Narinfos read at once: a bucket answers each in a round trip of its own.
const READERS: usize = 8;

/// What reading one listed narinfo found. A file that could not be read (not established:
/// the storage failed, not the file) is the error that stops the load.
type Read = Result<Result<Option<NarInfo>, BadNarInfo>, CacheError>;

/// Reads the narinfos `listed`, in their order, [`READERS`] at a time (on a bucket, from the
/// copies kept on this machine where they are the ones listed). Stops at the first file that
/// could not be read: no more are asked for once one is.
fn read_all(cache: &Cache, listed: &[&Meta]) -> Result<Vec<Result<Option<NarInfo>, BadNarInfo>>, CacheError> {
    let read = |m: &&Meta| -> Read {
        match cache.read_listed_narinfo(m) {
            Err(BadNarInfo::File(source)) if !source.is_established() => {
                Err(CacheError::BadFile { path: cache.locate(&m.name), source })
            }
            r => Ok(r),
        }
    };
    let threads = if listed.len() < 2 * READERS { 1 } else { READERS };
    crate::util::map_in_order(listed.iter(), threads, Result::is_err, read).into_iter().collect()
}

impl Index {
    /// Reads every narinfo. One that was read and is bad (a link, too large, not text, not
    /// parsing, misnamed) is an entry with its error; one that could not be read stops the
    /// load: nothing may be concluded about a file nobody saw, nor about a cache missing one.
    pub fn load(cache: &Cache) -> Result<Index, CacheError> {
        Ok(Self::load_listing(cache)?.0)
    }

    /// [`Index::load`], with the listing of the top level the narinfos were read from:
    /// everything there, sorted (for [`Cache::prepare_lookups_after`]).
    pub fn load_listing(cache: &Cache) -> Result<(Index, Vec<Meta>), CacheError> {
        let mut entries = HashMap::new();
        // Where modification times cannot be touched (a bucket), push records say when a
        // push last named a path.
        let mut recorded: HashMap<String, SystemTime> = HashMap::new();
        let (mut records, mut bad_records) = (Vec::new(), Vec::new());
        let listed = cache.push_records(&mut |h, when| {
            if let Some(t) = recorded.get_mut(h) {
                *t = (*t).max(when);
            } else {
                recorded.insert(h.to_owned(), when);
            }
        })?;
        for r in listed {
            if let Some(why) = r.problem {
                bad_records.push((r.name.clone(), why));
            }
            records.push((r.name, r.modified));
        }
        let top = cache.list_entries("", |_| true)?;
        let listed: Vec<&Meta> = top.iter().filter(|m| is_narinfo_name(&m.name)).collect();
        let read = read_all(cache, &listed)?;
        for (meta, read) in listed.into_iter().zip(read) {
            let file = meta.name.clone();
            let hash = hash_of_narinfo(&file).unwrap_or(&file);
            let modified = recorded.get(hash).map_or(meta.modified, |&r| r.max(meta.modified));
            let narinfo = match read {
                Ok(Some(ni)) => Ok(ni),
                // Listed, then answered absent: removed meanwhile (removing it again is
                // harmless), or a key no request can name.
                Ok(None) => Err(BadNarInfo::Unfetchable),
                Err(e) => Err(e),
            };
            let hash = hash_of_narinfo(&file).unwrap_or(&file).to_owned();
            entries.insert(hash, Entry { file, narinfo, modified });
        }
        Ok((Index { entries, records, bad_records }, top))
    }

    pub fn get(&self, p: &StorePath) -> Option<&NarInfo> {
        self.entries.get(p.hash_part()).and_then(|e| e.narinfo.as_ref().ok())
    }

    /// Finds a store path given as `/nix/store/<hash>-<name>`, a path inside one,
    /// `<hash>-<name>` or `<hash>`: the first component that is a store path's base name.
    pub fn find(&self, arg: &str) -> Result<StorePath, IndexError> {
        let base = arg
            .split('/')
            .find(|c| c.parse::<StorePath>().is_ok())
            .unwrap_or_else(|| arg.rsplit('/').next().unwrap_or(arg));
        let hash = base.get(..crate::store_path::HASH_LEN).unwrap_or(base);
        self.entries
            .get(hash)
            .and_then(|e| e.narinfo.as_ref().ok())
            .map(|ni| ni.store_path.clone())
            .ok_or_else(|| IndexError::NotInCache { path: arg.to_owned(), hash_part: hash.to_owned() })
    }

    /// The hash parts reachable from `roots` through References that have a narinfo.
    pub fn closure<'a>(&self, roots: impl IntoIterator<Item = &'a str>) -> HashSet<String> {
        let mut seen = HashSet::new();
        let mut stack: Vec<String> = roots.into_iter().map(str::to_owned).collect();
        while let Some(h) = stack.pop() {
            let Some(e) = self.entries.get(&h) else { continue };
            if !seen.insert(h) {
                continue;
            }
            if let Ok(ni) = &e.narinfo {
                stack.extend(
                    ni.references.iter().map(|r| r.hash_part().to_owned()).filter(|r| !seen.contains(r)),
                );
            }
        }
        seen
    }
}
