//! The names every layer of a cache agrees on, from the storage below to the commands above:
//! what a cache's own files are called. Pure constants, no I/O.
//!
//! ```text
//! nix-cache-info            StoreDir, WantMassQuery, Priority
//! <hashpart>.narinfo        one per store path
//! nar/<filehash>.nar.<ext>  the compressed NARs, named by their own hash
//! log/, realisations/       created empty in a directory: Nix creates them when it opens a
//!                           file:// cache, which fails on read-only media if they are missing
//! .nixcache.lock            a directory's writers' lock (push, sign, gc); clients never read it
//! .nixcache/pushes/         a bucket's push records (see `storage::s3`)
//! .nixcache/upstreams.*     what a partial cache leaves to other caches (see `upstream`)
//! ```

/// Prefix of every temporary file a writer leaves while it works.
pub const TEMP_PREFIX: &str = ".nixcache-tmp-";
/// A directory cache's writers' lock.
pub const LOCK_FILE: &str = ".nixcache.lock";
/// nixcache's own files, never served and never read by clients.
pub const STATE_DIR: &str = ".nixcache";
/// Upstream records are `.nixcache/upstreams.<ms>-<id>`: one per push that left something
/// new out, never rewritten, so writers that do not exclude each other (on a bucket) lose none.
pub const UPSTREAMS_PREFIX: &str = "upstreams.";

/// What Nix reads first.
pub const CACHE_INFO: &str = "nix-cache-info";

/// The subdirectories of a cache. When present, each must be a real directory.
pub const SUBDIRS: [&str; 4] = ["nar", "debuginfo", "log", "realisations"];

/// Whether the base name `name` is a temporary file's (one nixcache writes and removes).
pub fn is_temp(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX)
}

/// The Content-Type Nix's S3 store gives a key.
pub fn content_type(rel: &str) -> &'static str {
    if rel == CACHE_INFO {
        "text/x-nix-cache-info"
    } else if rel.ends_with(".narinfo") {
        "text/x-nix-narinfo"
    } else if rel.starts_with("nar/") {
        "application/x-nix-nar"
    } else if rel.ends_with(".ls") || rel.starts_with("debuginfo/") {
        "application/json"
    } else {
        "text/plain"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_are_nix_s() {
        assert_eq!(content_type("nix-cache-info"), "text/x-nix-cache-info");
        assert_eq!(content_type("abc.narinfo"), "text/x-nix-narinfo");
        assert_eq!(content_type("nar/x.nar.xz"), "application/x-nix-nar");
        assert_eq!(content_type("abc.ls"), "application/json");
        assert_eq!(content_type("debuginfo/ab"), "application/json");
    }
}
