//! All narinfos of a cache in memory, with their modification times: what `sign` and `gc`
//! walk closures over. Closures are computed from narinfo `References:`, so they need only
//! the cache, not the store that pushed it.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use thiserror::Error;

use crate::cache::{Cache, CacheError};
use crate::narinfo::{NarInfo, NarInfoError};
use crate::store_path::StorePath;

/// One narinfo file.
#[derive(Debug)]
pub struct Entry {
    /// The narinfo's file name, `<hashpart>.narinfo`.
    pub file: String,
    pub narinfo: Result<NarInfo, NarInfoError>,
    /// When a push last included the path.
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
}

impl Index {
    pub fn load(cache: &Cache) -> Result<Index, CacheError> {
        let mut entries = HashMap::new();
        for file in cache.narinfo_files()? {
            let path = cache.path(&file);
            let io = |action| {
                let path = path.clone();
                move |source| CacheError::Io { action, path, source }
            };
            let modified =
                std::fs::metadata(cache.path(&file)).and_then(|m| m.modified()).map_err(io("stat"))?;
            let text = std::fs::read_to_string(cache.path(&file)).map_err(io("read"))?;
            let hash = file.trim_end_matches(".narinfo").to_owned();
            entries.insert(hash, Entry { file, narinfo: text.parse(), modified });
        }
        Ok(Index { entries })
    }

    pub fn get(&self, p: &StorePath) -> Option<&NarInfo> {
        self.entries.get(p.hash_part()).and_then(|e| e.narinfo.as_ref().ok())
    }

    /// Finds a store path given as `/nix/store/<hash>-<name>`, `<hash>-<name>` or `<hash>`.
    pub fn find(&self, arg: &str) -> Result<StorePath, IndexError> {
        let base = arg.rsplit('/').next().unwrap_or(arg);
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
