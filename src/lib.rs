//! nixcache: turn Nix store paths into a static binary cache.
//!
//! Pure format modules ([`nixbase32`], [`hash`], [`store_path`], [`narinfo`], [`signing`],
//! [`nar`], [`layout`], [`upstream`]'s record) never touch the filesystem; [`store`],
//! [`storage`], [`cache`] and [`upstream::lookup`] are the I/O edges. Layers import only downwards: [`cache`] is built on [`storage`], which knows nothing of
//! it.
// Denied, with two measured exceptions: the LZMA2 encoder each thread keeps from block to
// block (`xz::Raw`), which saves the page faults of a new one per 24 MiB block; and serve's
// `malloc_trim` once a crowd of connections has gone (`serve::trim`: 54 MiB kept, 7 MiB
// after).
#![deny(unsafe_code)]

pub mod cache;
pub mod cache_info;
pub mod compression;
pub mod content_address;
pub mod gc;
pub mod hash;
pub mod index;
pub mod interrupt;
pub mod layout;
pub mod nar;
pub mod nar_check;
pub mod narinfo;
pub mod netrc;
pub mod nixbase32;
pub mod path_info;
pub mod progress;
pub mod push;
pub mod receive;
pub mod retry;
pub mod serve;
pub mod signing;
pub mod storage;
pub mod store;
pub mod store_path;
pub mod upstream;
pub mod util;
pub mod verify;
pub mod xz;

pub mod cli;
pub mod cmd;

pub use util::{error_chain, plain};
