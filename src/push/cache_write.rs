//! Writes into the cache, their errors tagged as the cache's so that they keep their meaning
//! on their way up through the NAR writer (which reports errors as the store file it was
//! archiving); a full disk says so.

use std::fs::File;
use std::io::{self, Write};

use thiserror::Error;

use super::PushError;
use crate::cache::{Cache, CacheError};
use crate::nar::dump::DumpError;

/// An error from a write into the cache, tagged so that it keeps its meaning on its way up
/// through the NAR writer (which reports errors as the store file it was archiving).
#[derive(Debug, Error)]
#[error("writing to the cache failed")]
pub(super) struct CacheWriteFailed(#[source] io::Error);

/// A writer into the cache: its errors are tagged as the cache's.
pub(super) struct ToCache<W>(pub(super) W);

impl<W: Write> Write for ToCache<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(tag)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(tag)
    }
}

pub(super) fn tag(e: io::Error) -> io::Error {
    if e.get_ref().is_some_and(|r| r.is::<CacheWriteFailed>()) {
        return e;
    }
    io::Error::new(e.kind(), CacheWriteFailed(e))
}

/// The error for a failed write into the cache: a full disk says so.
pub(super) fn write_err(e: io::Error) -> PushError {
    let e = if e.get_ref().is_some_and(|r| r.is::<CacheWriteFailed>()) {
        let kind = e.kind();
        match e.into_inner().map(|inner| inner.downcast::<CacheWriteFailed>()) {
            Some(Ok(tagged)) => tagged.0,
            _ => kind.into(),
        }
    } else {
        e
    };
    if is_full(&e) { PushError::CacheFull(e) } else { PushError::CacheWrite(e) }
}

impl From<DumpError> for PushError {
    /// A failed write into the cache is the cache's, not the store file's being read.
    fn from(e: DumpError) -> Self {
        if e.source.get_ref().is_some_and(|r| r.is::<CacheWriteFailed>()) {
            return write_err(e.source);
        }
        PushError::Dump(e)
    }
}

/// An unnamed file beside the cache (a directory's, or the temporary directory for a
/// bucket), its errors tagged as the cache's.
pub(super) fn scratch(cache: &Cache) -> io::Result<File> {
    cache.scratch().map_err(|e| match e {
        CacheError::Storage(crate::cache::StorageError::Io { source, .. }) => tag(source),
        e => tag(io::Error::other(e)),
    })
}

/// Whether a write failed because the filesystem is full (or over quota).
pub(super) fn is_full(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
}
