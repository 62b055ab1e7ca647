//! Store paths: `<store dir>/<nix32 digest of 20 bytes>-<name>`.
//!
//! [`StorePath`] is the base name (what narinfo `References:` lists); the store directory is
//! kept apart in [`StoreDir`] because the same path has the same base name in every store.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::nixbase32;

/// Length of the nix32 digest at the start of a store path's base name.
pub const HASH_LEN: usize = 32;
const MAX_NAME_LEN: usize = 211;

/// Why a string is not a store path.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StorePathError {
    #[error("{0:?} is not a store path base name (expected <32 nix32 chars>-<name>)")]
    Shape(String),
    #[error("store path {0:?} has an invalid hash part")]
    Hash(String),
    #[error("store path {0:?} has an invalid name (allowed: A-Z a-z 0-9 +-._?=, not starting with '.')")]
    Name(String),
    #[error("{path:?} is not in the store {store_dir:?}")]
    NotInStore { path: String, store_dir: String },
    #[error("store directory {0:?} must be an absolute path without a trailing slash")]
    StoreDir(String),
}

/// A store path's base name: 20-byte digest and checked name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    // The nix32 text sorts like Nix's StorePathSet, so keep it as text.
    base: String,
}

impl StorePath {
    /// The 32-character hash part, the narinfo's file stem.
    pub fn hash_part(&self) -> &str {
        &self.base[..HASH_LEN]
    }

    /// The name after the hash and dash.
    pub fn name(&self) -> &str {
        &self.base[HASH_LEN + 1..]
    }

    /// The 20-byte digest.
    pub fn digest(&self) -> [u8; 20] {
        nixbase32::decode(self.hash_part()).expect("checked when parsed")
    }

    pub fn is_derivation(&self) -> bool {
        self.base.ends_with(".drv")
    }

    pub fn as_str(&self) -> &str {
        &self.base
    }
}

impl FromStr for StorePath {
    type Err = StorePathError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() < HASH_LEN + 2 || s.as_bytes()[HASH_LEN] != b'-' {
            return Err(StorePathError::Shape(s.to_owned()));
        }
        let (hash, name) = (&s[..HASH_LEN], &s[HASH_LEN + 1..]);
        if nixbase32::decode::<20>(hash).is_err() {
            return Err(StorePathError::Hash(s.to_owned()));
        }
        let name_ok = name.len() <= MAX_NAME_LEN
            && !name.starts_with('.')
            && name.bytes().all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c));
        if !name_ok {
            return Err(StorePathError::Name(s.to_owned()));
        }
        Ok(StorePath { base: s.to_owned() })
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({})", self.base)
    }
}

/// The logical store directory, `/nix/store` unless configured otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreDir(String);

impl Default for StoreDir {
    fn default() -> Self {
        StoreDir("/nix/store".to_owned())
    }
}

impl StoreDir {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `<store dir>/<base name>`.
    pub fn display(&self, path: &StorePath) -> String {
        format!("{}/{}", self.0, path)
    }

    /// Parses an absolute store path, which must sit directly in this store directory.
    pub fn parse_path(&self, abs: &str) -> Result<StorePath, StorePathError> {
        let not_in_store = || StorePathError::NotInStore { path: abs.to_owned(), store_dir: self.0.clone() };
        let base = abs.strip_prefix(&self.0).and_then(|r| r.strip_prefix('/')).ok_or_else(not_in_store)?;
        if base.contains('/') {
            return Err(not_in_store());
        }
        base.parse()
    }
}

impl FromStr for StoreDir {
    type Err = StorePathError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !s.starts_with('/') || (s.len() > 1 && s.ends_with('/')) || s.contains("//") {
            return Err(StorePathError::StoreDir(s.to_owned()));
        }
        Ok(StoreDir(s.to_owned()))
    }
}

impl fmt::Display for StoreDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432";

    #[test]
    fn round_trip() {
        let p: StorePath = P.parse().unwrap();
        assert_eq!(p.to_string(), P);
        assert_eq!(p.hash_part(), "00bgd045z0d4icpbc2yyz4gx48ak44la");
        assert_eq!(p.name(), "net-tools-1.60_p20170221182432");
        assert_eq!(nixbase32::encode(&p.digest()), p.hash_part());
        let sd = StoreDir::default();
        assert_eq!(sd.parse_path(&sd.display(&p)).unwrap(), p);
    }

    #[test]
    fn rejects() {
        assert!(matches!("foo".parse::<StorePath>(), Err(StorePathError::Shape(_))));
        let e = "00bgd045z0d4icpbc2yyz4gx48ak44le-x";
        assert!(matches!(e.parse::<StorePath>(), Err(StorePathError::Hash(_))));
        let n = "00bgd045z0d4icpbc2yyz4gx48ak44la-a b";
        assert!(matches!(n.parse::<StorePath>(), Err(StorePathError::Name(_))));
        let dot = "00bgd045z0d4icpbc2yyz4gx48ak44la-.x";
        assert!(matches!(dot.parse::<StorePath>(), Err(StorePathError::Name(_))));
        let sd = StoreDir::default();
        assert!(matches!(sd.parse_path("/tmp/x"), Err(StorePathError::NotInStore { .. })));
        assert!(matches!(
            sd.parse_path(&format!("/nix/store/{P}/bin")),
            Err(StorePathError::NotInStore { .. })
        ));
        assert!("relative".parse::<StoreDir>().is_err());
        assert!("/nix/store/".parse::<StoreDir>().is_err());
    }
}
