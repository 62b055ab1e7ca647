//! A path in one stream on one thread, and the narinfo of a path whose NAR is written.

use std::io::{self, BufWriter};

use super::cache_write::{ToCache, write_err};
use super::plan::{check_hash, side_files};
use super::{Done, FILE_BUFFER, NAR_BUFFER, Outcome, PushError, Run};
use crate::cache::NewFile;
use crate::hash::{HashingWriter, NixHash};
use crate::nar::dump::dump_listing;
use crate::nar::listing::Entry;
use crate::narinfo::NarInfo;
use crate::path_info::PathInfo;
use crate::progress::ProgressWriter;

impl Run<'_> {
    /// Reads the path's NAR for its hash (checked against the database) and its listing.
    pub(super) fn list_pass(&self, info: &PathInfo) -> Result<Option<Entry>, PushError> {
        let abs = self.store.store_dir.display(&info.path);
        let sink = BufWriter::with_capacity(NAR_BUFFER, HashingWriter::new(io::sink()));
        let (sink, listing) = dump_listing(&self.store.real_path(&info.path), sink, true)?;
        let (_, nar_size, nar_hash) = sink.into_inner().map_err(|e| write_err(e.into_error()))?.finish();
        check_hash(&abs, info, nar_hash, nar_size)?;
        Ok(listing)
    }

    /// Compresses a path in one stream on this thread:
    /// `dump -> (NarSize, NarHash) -> compressor -> (FileSize, FileHash) -> temp file`.
    pub(super) fn write_streaming(&self, info: &PathInfo, outcome: Outcome) -> Result<Done, PushError> {
        let (cache, opts) = (self.cache, self.opts);
        let abs = self.store.store_dir.display(&info.path);
        let ext = opts.compression.extension();
        let bar = self.progress.path(info.path.as_str(), info.nar_size);
        let tmp = cache.create_file("nar", ext)?;
        let file = HashingWriter::new(BufWriter::with_capacity(FILE_BUFFER, ToCache(tmp)));
        let encoder =
            opts.compression.encoder_for(file, opts.level, info.nar_size, opts.jobs).map_err(write_err)?;
        let nar = HashingWriter::new(ProgressWriter::new(encoder, &bar));
        // The NAR writer emits many 8-16 byte tokens; batch them for the hasher and compressor.
        let nar = BufWriter::with_capacity(NAR_BUFFER, nar);
        let want_listing = opts.nar_listing || opts.index_debug_info;
        let (nar, listing) = dump_listing(&self.store.real_path(&info.path), nar, want_listing)?;
        let nar = nar.into_inner().map_err(|e| write_err(e.into_error()))?;
        let (shown, nar_size, nar_hash) = nar.finish();
        let file = shown.into_inner().finish().map_err(write_err)?;
        let (buffered, file_size, file_hash) = file.finish();
        let ToCache(tmp) = buffered.into_inner().map_err(|e| write_err(e.into_error()))?;
        drop(bar);
        check_hash(&abs, info, nar_hash, nar_size)?;
        self.publish_nar(info, tmp, outcome, (nar_size, nar_hash), (file_size, file_hash), listing.as_ref())
    }

    /// Moves a written NAR into place with its side files; returns the narinfo to publish.
    pub(super) fn publish_nar(
        &self,
        info: &PathInfo,
        tmp: Box<dyn NewFile>,
        outcome: Outcome,
        (nar_size, nar_hash): (u64, NixHash),
        (file_size, file_hash): (u64, NixHash),
        listing: Option<&Entry>,
    ) -> Result<Done, PushError> {
        let (cache, opts) = (self.cache, self.opts);
        let url = crate::layout::nar_name(&file_hash.to_nix32(), opts.compression.extension());
        // Made durable and put in place before its narinfo (see Publisher).
        let mut staged = vec![tmp.stage(&url)?];
        staged.extend(side_files(cache, info, &url, listing, opts)?);
        let mut narinfo = NarInfo {
            store_dir: self.store.store_dir.clone(),
            store_path: info.path.clone(),
            url,
            compression: opts.compression.name().to_owned(),
            file_hash: Some(file_hash),
            file_size: Some(file_size),
            nar_hash,
            nar_size,
            references: info.references.clone(),
            deriver: info.deriver.clone(),
            system: None,
            sigs: info.sigs.clone(),
            ca: info.ca.clone(),
            extra: Vec::new(),
        };
        for k in &opts.keys {
            narinfo.add_signature(k);
        }
        Ok(Done { narinfo, outcome, staged, nar_bytes: nar_size, file_bytes: file_size })
    }
}
