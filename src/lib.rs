//! nixcache: turn Nix store paths into a static binary cache.
//!
//! Pure format modules ([`nixbase32`], [`hash`], [`store_path`], [`narinfo`], [`signing`],
//! [`nar`]) never touch the filesystem; [`store`] and [`cache`] are the I/O edges.
#![forbid(unsafe_code)]

pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub mod signing;
pub mod store_path;
pub mod compression;
pub mod store;
pub mod cache;
