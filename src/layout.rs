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

/// What a file of a cache is, by its cache-relative name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    CacheInfo,
    NarInfo,
    Nar,
    Listing,
    DebugInfo,
    Log,
    Realisation,
    /// nixcache's own (`.nixcache/...`, the lock).
    State,
    Other,
}

impl FileKind {
    /// The kind of `rel`, by its name alone (a temporary file is the kind it will be).
    pub fn of(rel: &str) -> FileKind {
        if rel == CACHE_INFO {
            FileKind::CacheInfo
        } else if rel.ends_with(NARINFO_SUFFIX) {
            FileKind::NarInfo
        } else if rel.starts_with("nar/") {
            FileKind::Nar
        } else if rel.ends_with(LISTING_SUFFIX) {
            FileKind::Listing
        } else if rel.starts_with("debuginfo/") {
            FileKind::DebugInfo
        } else if rel.starts_with("log/") {
            FileKind::Log
        } else if rel.starts_with("realisations/") {
            FileKind::Realisation
        } else if rel.split('/').next() == Some(STATE_DIR) || rel == LOCK_FILE {
            FileKind::State
        } else {
            FileKind::Other
        }
    }

    /// The Content-Type Nix's S3 store gives a file of this kind.
    pub fn content_type(self) -> &'static str {
        match self {
            FileKind::CacheInfo => "text/x-nix-cache-info",
            FileKind::NarInfo => "text/x-nix-narinfo",
            FileKind::Nar => "application/x-nix-nar",
            FileKind::Listing | FileKind::DebugInfo => "application/json",
            _ => "text/plain",
        }
    }
}

/// The Content-Type Nix's S3 store gives `rel`.
pub fn content_type(rel: &str) -> &'static str {
    FileKind::of(rel).content_type()
}

const NARINFO_SUFFIX: &str = ".narinfo";
const LISTING_SUFFIX: &str = ".ls";

/// `<hashpart>.narinfo`: a store path's narinfo.
pub fn narinfo_name(hash_part: &str) -> String {
    format!("{hash_part}{NARINFO_SUFFIX}")
}

/// `<hashpart>.ls`: the listing of a store path's NAR.
pub fn listing_name(hash_part: &str) -> String {
    format!("{hash_part}{LISTING_SUFFIX}")
}

/// `nar/<filehash><extension>` (`.nar.xz`, ...): a NAR file, named by its own hash (nix32).
pub fn nar_name(file_hash: &str, extension: &str) -> String {
    format!("nar/{file_hash}{extension}")
}

/// `debuginfo/<build-id>`: the link from a build id to the NAR member with its debug info.
pub fn debuginfo_name(build_id: &str) -> String {
    format!("debuginfo/{build_id}")
}

/// Whether a name at the top of a cache is a narinfo's (not a temporary file's).
pub fn is_narinfo_name(name: &str) -> bool {
    name.ends_with(NARINFO_SUFFIX) && !is_temp(name)
}

/// The hash part a narinfo's name carries: `abc` of `abc.narinfo`.
pub fn hash_of_narinfo(name: &str) -> Option<&str> {
    name.strip_suffix(NARINFO_SUFFIX)
}

/// The hash part a listing's name carries: `abc` of `abc.ls`.
pub fn hash_of_listing(name: &str) -> Option<&str> {
    name.strip_suffix(LISTING_SUFFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_to_their_kinds() {
        let h = "0123456789abcdfghijklmnpqrsvwxyz";
        assert_eq!(FileKind::of(&narinfo_name(h)), FileKind::NarInfo);
        assert_eq!(hash_of_narinfo(&narinfo_name(h)), Some(h));
        assert_eq!(hash_of_listing(&listing_name(h)), Some(h));
        assert_eq!(FileKind::of(&listing_name(h)), FileKind::Listing);
        assert_eq!(nar_name(h, ".nar.xz"), format!("nar/{h}.nar.xz"));
        assert_eq!(FileKind::of(&nar_name(h, ".nar")), FileKind::Nar);
        assert_eq!(FileKind::of(&debuginfo_name("ab12")), FileKind::DebugInfo);
        assert_eq!(FileKind::of(".nixcache/pushes/1-2"), FileKind::State);
        // A temporary file is the kind it will be, not nixcache's state.
        assert_eq!(FileKind::of(".nixcache-tmp-1"), FileKind::Other);
        assert_eq!(FileKind::of("log/x"), FileKind::Log);
        assert!(is_narinfo_name("a.narinfo") && !is_narinfo_name(".nixcache-tmp-1.narinfo"));
    }

    #[test]
    fn content_types_are_nix_s() {
        assert_eq!(content_type("nix-cache-info"), "text/x-nix-cache-info");
        assert_eq!(content_type("abc.narinfo"), "text/x-nix-narinfo");
        assert_eq!(content_type("nar/x.nar.xz"), "application/x-nix-nar");
        assert_eq!(content_type("abc.ls"), "application/json");
        assert_eq!(content_type("debuginfo/ab"), "application/json");
    }
}
