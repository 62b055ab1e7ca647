//! What the environment may change of how a bucket is talked to, read once when it is
//! opened.

use std::time::Duration;

use super::{COPY_LIMIT, READ_TIMEOUT, SPOOL_LIMIT};

/// Read once, at [`super::S3Backend::connect`].
#[derive(Clone, Copy, Debug)]
pub(super) struct Tuning {
    /// See [`SPOOL_LIMIT`]: `NIXCACHE_S3_SPOOL_LIMIT` bytes, at most 4 GiB.
    pub(super) spool_limit: u64,
    /// See [`READ_TIMEOUT`]: `NIXCACHE_S3_READ_TIMEOUT` seconds.
    pub(super) read_timeout: Duration,
    /// The largest object copied in one CopyObject: [`COPY_LIMIT`], or
    /// `NIXCACHE_S3_COPY_LIMIT` bytes (tests use it to copy in parts).
    pub(super) copy_limit: u64,
}

impl Tuning {
    pub(super) fn from_env() -> Tuning {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        Tuning {
            spool_limit: var("NIXCACHE_S3_SPOOL_LIMIT").unwrap_or(SPOOL_LIMIT).min(4 << 30),
            read_timeout: var("NIXCACHE_S3_READ_TIMEOUT").map_or(READ_TIMEOUT, Duration::from_secs),
            copy_limit: var("NIXCACHE_S3_COPY_LIMIT").unwrap_or(COPY_LIMIT),
        }
    }
}
