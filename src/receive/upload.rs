//! What an upload is, by the name it is sent to: each kind a cache takes, and the strict
//! form of its name (anything else is refused before a byte is written).

use crate::layout::{self, FileKind};

/// What an upload is, by the name it is sent to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upload {
    CacheInfo,
    /// `<hash>.narinfo`
    NarInfo {
        hash: String,
    },
    /// `<hash>.ls`
    Listing {
        hash: String,
    },
    /// `nar/<filehash>.nar[.ext]`: the file name, and the FileHash it names (nix32).
    Nar {
        name: String,
        file_hash: String,
    },
    /// `debuginfo/<build-id>.debug`: where a debug file's NAR member is (JSON).
    DebugInfo {
        rel: String,
    },
    /// `log/<drv name>`: a build log (`nix store copy-log --to`).
    Log {
        rel: String,
    },
    /// `realisations/<drv output>.doi`: a realisation of a content-addressed derivation (JSON).
    Realisation {
        rel: String,
    },
    /// `.nixcache/upstreams.<time>-<id>`: a partial push's record of what it leaves to
    /// upstreams (written before the narinfos that rely on it).
    Upstreams {
        rel: String,
    },
}

impl Upload {
    /// What a cache-relative name (already checked by [`crate::serve::files::target`]) takes.
    pub fn of(rel: &str) -> Option<Upload> {
        match FileKind::of(rel) {
            FileKind::CacheInfo => Some(Upload::CacheInfo),
            FileKind::NarInfo if !rel.contains('/') => {
                Some(Upload::NarInfo { hash: layout::hash_of_narinfo(rel)?.to_owned() })
            }
            FileKind::Listing if !rel.contains('/') => {
                Some(Upload::Listing { hash: layout::hash_of_listing(rel)?.to_owned() })
            }
            FileKind::Nar => {
                let name = rel.strip_prefix("nar/")?;
                let (file_hash, ext) = name.split_once('.')?;
                let known = [".nar", ".nar.xz", ".nar.bz2", ".nar.zst"];
                let ok = file_hash.len() == 52
                    && crate::nixbase32::is_nix32(file_hash)
                    && known.contains(&format!(".{ext}").as_str());
                ok.then(|| Upload::Nar { name: name.to_owned(), file_hash: file_hash.to_owned() })
            }
            FileKind::DebugInfo => {
                let id = rel.strip_prefix("debuginfo/")?.strip_suffix(".debug")?;
                let ok = !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_hexdigit());
                ok.then(|| Upload::DebugInfo { rel: rel.to_owned() })
            }
            FileKind::Log => {
                let name = rel.strip_prefix("log/")?;
                plain_name(name, b"+._?=-").then(|| Upload::Log { rel: rel.to_owned() })
            }
            FileKind::Realisation => {
                let name = rel.strip_prefix("realisations/")?;
                let ok = plain_name(name, b"+._?=-:!") && name.ends_with(".doi");
                ok.then(|| Upload::Realisation { rel: rel.to_owned() })
            }
            FileKind::State => {
                let name = rel.strip_prefix(".nixcache/")?.strip_prefix(layout::UPSTREAMS_PREFIX)?;
                let ok = !name.is_empty()
                    && name.len() <= 64
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
                ok.then(|| Upload::Upstreams { rel: rel.to_owned() })
            }
            _ => None,
        }
    }

    /// The largest body this upload may have: a build log's, or a small file's.
    pub fn limit(&self) -> u64 {
        match self {
            Upload::Log { .. } => LOG_LIMIT,
            _ => crate::cache::TEXT_LIMIT,
        }
    }
}

/// The largest build log taken.
pub const LOG_LIMIT: u64 = 64 << 20;

/// A name of one path component: not empty, not hidden, at most 255 bytes, of letters,
/// digits and `extra`.
fn plain_name(name: &str, extra: &[u8]) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 255
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}
