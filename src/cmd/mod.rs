//! One module per subcommand: orchestration only, errors with context via anyhow.

pub mod gc;
pub mod keygen;
pub mod partial;
pub mod push;
pub mod serve;
pub mod sign;
pub mod verify;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Context;

use crate::signing::SecretKey;

/// Reads a secret key file, warning when every user can read it.
pub fn read_secret_key(path: &Path) -> anyhow::Result<SecretKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read secret key file {}", path.display()))?;
    let key = text.parse().with_context(|| {
        format!("{} is not a Nix secret key (make one with `nixcache keygen`)", path.display())
    })?;
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o004 != 0
    {
        crate::elog!(
            "warning: the secret key {} is readable by every user (mode {:o}); `chmod 600` it",
            path.display(),
            m.permissions().mode() & 0o777
        );
    }
    Ok(key)
}

/// A path argument of `gc --keep` or `sign` as push takes it: `./result` or another link
/// into the store, a path inside a store path, or a store path, resolved on this machine
/// when it exists here; otherwise as written (the cache host may have no store).
pub fn store_path_arg(cache: &crate::cache::Cache, arg: &str) -> String {
    let store_dir = cache.cache_info().ok().flatten().map(|ci| ci.store_dir).unwrap_or_default();
    let here = Path::new(arg);
    if std::fs::symlink_metadata(here).is_err() {
        return arg.to_owned();
    }
    match crate::store::StoreLocation::local(&store_dir).resolve(here) {
        Ok(p) => store_dir.display(&p),
        Err(_) => arg.to_owned(),
    }
}

/// Where a bucket's narinfos are kept on this machine between runs:
/// `$XDG_CACHE_HOME/nixcache/buckets`, else `~/.cache/nixcache/buckets`.
pub fn copies_dir() -> Option<std::path::PathBuf> {
    let var = |k| std::env::var_os(k).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    let base = var("XDG_CACHE_HOME")
        .filter(|p| p.is_absolute())
        .or_else(|| var("HOME").map(|h| h.join(".cache")))?;
    Some(base.join("nixcache").join("buckets"))
}

/// Keeps a bucket's narinfos on this machine for the next run ([`copies_dir`]), unless
/// `off`; what goes wrong is a warning, never the end of the run.
pub fn keep_copies(cache: &crate::cache::Cache, dest: &crate::storage::Dest, off: bool, quiet: bool) {
    if off || !matches!(dest, crate::storage::Dest::Bucket(_)) {
        return;
    }
    let Some(dir) = copies_dir() else {
        if !quiet {
            crate::elog!(
                "warning: neither XDG_CACHE_HOME nor HOME is set: the bucket's narinfos are not kept on this machine, and the next push downloads them again"
            );
        }
        return;
    };
    if let Err(e) = cache.keep_copies(&dir)
        && !quiet
    {
        crate::elog!(
            "warning: the bucket's narinfos are not kept on this machine ({e}); the next push downloads them again (set XDG_CACHE_HOME to a writable directory, or pass --no-local-copies)"
        );
    }
}

/// The most threads `--jobs` may ask for: four per core, at most 1024.
pub fn max_jobs() -> usize {
    (4 * std::thread::available_parallelism().map_or(1, usize::from)).min(1024)
}

/// Says what requests a command made to a bucket (nothing for a directory), and how many
/// narinfos were read from the copies kept on this machine instead.
pub fn say_requests(cache: &crate::cache::Cache) {
    let requests = cache.requests();
    if !requests.is_empty() {
        crate::elog!("{}", crate::progress::requests(&requests));
    }
    if let Some((file, n)) = cache.copies_used()
        && n > 0
    {
        crate::elog!(
            "{} read from the copies kept in {}",
            crate::progress::plural(n as usize, "narinfo"),
            file.display()
        );
    }
}
