//! Writing into a cache: new files, staged files made durable and committed, narinfos
//! replaced, `nix-cache-info`, and what interrupted runs left.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{CACHE_INFO, Cache, CacheError, CacheInfo, NewFile, Staged, StorageError};
use crate::narinfo::NarInfo;
use crate::store_path::StoreDir;

impl Cache {
    /// Records that a push included the narinfo `rel` now (which `gc` reads).
    pub fn touch(&self, rel: &str) -> Result<(), CacheError> {
        match self.resolve(rel) {
            Some(rel) => Ok(self.backend.touch(rel)?),
            None => Err(StorageError::Io {
                action: "open",
                path: self.locate(rel),
                source: io::ErrorKind::NotFound.into(),
            }
            .into()),
        }
    }

    /// A new file in the cache subdirectory `sub` ("" or "nar"), named when staged.
    pub fn create_file(&self, sub: &str, suffix: &str) -> Result<Box<dyn NewFile>, CacheError> {
        Ok(self.backend.create(sub, suffix)?)
    }

    /// Scratch space for a push, gone when closed.
    pub fn scratch(&self) -> Result<File, CacheError> {
        Ok(self.backend.scratch()?)
    }

    /// Writes `data` to the cache-relative `rel` atomically and durably.
    pub fn write_atomic(&self, rel: &str, data: &[u8]) -> Result<(), CacheError> {
        let staged = self.stage(rel, data)?;
        self.sync_data([&staged])?;
        staged.commit()?;
        self.sync_dir(Path::new(rel).parent().and_then(Path::to_str).unwrap_or(""))
    }

    /// Stages `data` to become the cache-relative `rel`, to be made durable with
    /// [`Cache::sync_data`] and then [committed](Staged::commit).
    pub fn stage(&self, rel: &str, data: &[u8]) -> Result<Staged, CacheError> {
        Ok(self.backend.stage(rel, data, None)?)
    }

    /// Makes the contents of staged files durable, all at once.
    pub fn sync_data<'s>(&self, files: impl IntoIterator<Item = &'s Staged>) -> Result<(), CacheError> {
        let files: Vec<&Staged> = files.into_iter().collect();
        Ok(self.backend.sync(&files)?)
    }

    /// Makes the names committed into the subdirectory `sub` ("" for the top) durable.
    pub fn sync_dir(&self, sub: &str) -> Result<(), CacheError> {
        Ok(self.backend.sync_dir(sub)?)
    }

    /// Replaces a narinfo with a rewritten one, durable before it appears, that keeps the old
    /// one's modification time where the storage can: a change that is not a push (adding a
    /// signature) must not make gc think a push included the path. It replaces `file`, which
    /// must be the narinfo's own name: a misnamed narinfo never overwrites the right one. The
    /// caller syncs the top directory ([`Cache::sync_dir`]) once all are replaced.
    pub fn replace_narinfo(&self, file: &str, ni: &NarInfo, modified: SystemTime) -> Result<(), CacheError> {
        assert_eq!(file, ni.file_name(), "a narinfo is rewritten only under its own name");
        Ok(self.backend.replace(file, ni.to_string().as_bytes(), Some(modified))?)
    }

    /// Reads `nix-cache-info`, if present.
    pub fn cache_info(&self) -> Result<Option<CacheInfo>, CacheError> {
        let path = self.locate(CACHE_INFO);
        match self.read_text(CACHE_INFO) {
            Ok(Some(s)) => s.parse().map(Some).map_err(|reason| CacheError::BadCacheInfo { path, reason }),
            Ok(None) => Ok(None),
            Err(source) => Err(CacheError::BadFile { path, source }),
        }
    }

    /// Makes `nix-cache-info` say `wanted`, keeping the existing priority and mass-query
    /// settings where `wanted` leaves them open. Refuses a cache made for another store.
    pub fn ensure_cache_info(
        &self,
        store_dir: &StoreDir,
        want_mass_query: Option<bool>,
        priority: Option<u32>,
        default_priority: u32,
    ) -> Result<CacheInfo, CacheError> {
        let existing = self.cache_info()?;
        if let Some(e) = &existing
            && &e.store_dir != store_dir
        {
            return Err(CacheError::StoreDirMismatch {
                path: PathBuf::from(self.describe()),
                found: e.store_dir.to_string(),
                wanted: store_dir.to_string(),
            });
        }
        // An existing cache keeps what it says, absent fields included, unless a flag
        // changes them; a new one gets the defaults.
        let info = match &existing {
            Some(e) => CacheInfo {
                store_dir: store_dir.clone(),
                want_mass_query: want_mass_query.or(e.want_mass_query),
                priority: priority.or(e.priority),
            },
            None => CacheInfo {
                store_dir: store_dir.clone(),
                want_mass_query: Some(want_mass_query.unwrap_or(true)),
                priority: Some(priority.unwrap_or(default_priority)),
            },
        };
        if existing.as_ref() != Some(&info) {
            self.write_atomic(CACHE_INFO, info.to_string().as_bytes())?;
        }
        Ok(info)
    }

    /// Removes temporary files left by killed runs, where writers exclude each other (call
    /// with the lock held); on a bucket, other pushes may be writing theirs, and gc removes
    /// them once stale.
    pub fn clean_temp_files(&self) -> Result<Vec<String>, CacheError> {
        if !self.exclusive() {
            return Ok(Vec::new());
        }
        let mut removed = Vec::new();
        for l in self.temp_files()? {
            self.backend.remove_leftover(&l)?;
            removed.push(l.name);
        }
        Ok(removed)
    }
}
