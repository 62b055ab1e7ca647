//! nixcache: turn Nix store paths into a static binary cache.
//!
//! Pure format modules ([`nixbase32`], [`hash`], [`store_path`], [`narinfo`], [`signing`],
//! [`nar`], [`layout`], [`upstream`]'s record) never touch the filesystem; [`store`],
//! [`storage`], [`cache`] and [`upstream::lookup`] are the I/O edges. Layers import only downwards: [`cache`] is built on [`storage`], which knows nothing of
//! it.
// Denied, with one measured exception: the LZMA2 encoder each thread keeps from block to
// block (`xz::Raw`), which saves the page faults of a new one per 24 MiB block.
#![deny(unsafe_code)]

pub mod cache;
pub mod compression;
pub mod content_address;
pub mod gc;
pub mod hash;
pub mod index;
pub mod layout;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub mod progress;
pub mod push;
pub mod retry;
pub mod serve;
pub mod signing;
pub mod storage;
pub mod store;
pub mod store_path;
pub mod upstream;
pub mod verify;
pub mod xz;

/// Formats an error with its sources: `outer: inner: innermost`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
pub mod cli;
pub mod cmd;
