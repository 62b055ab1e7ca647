//! SHA-256 hashes as Nix prints them, and a `Write` adapter that counts and hashes.
//!
//! Nix writes hashes in narinfo files as `sha256:<nix32>`. Its database stores
//! `sha256:<hex>`, and newer `nix path-info --json` prints SRI (`sha256-<base64>`); all three
//! parse, and Display always gives the narinfo form.

use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::nixbase32;

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NixHash(pub [u8; 32]);

/// Why a string is not a SHA-256 hash.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HashError {
    #[error("hash {0:?} is not SHA-256 (expected sha256:… or sha256-…)")]
    Algorithm(String),
    #[error("hash {0:?} has a digest of the wrong length or alphabet")]
    Digest(String),
}

impl NixHash {
    /// Hashes a byte slice in one go.
    pub fn digest(data: &[u8]) -> Self {
        NixHash(Sha256::digest(data).into())
    }

    /// The nix32 digest without the `sha256:` prefix, as used in NAR file names.
    pub fn to_nix32(&self) -> String {
        nixbase32::encode(&self.0)
    }

    /// Lower-case hex, as in the Nix database.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses a bare digest in nix32 (52 chars), hex (64) or base64 (44).
    pub fn from_digest(s: &str) -> Result<Self, HashError> {
        let err = || HashError::Digest(s.to_owned());
        match s.len() {
            52 => nixbase32::decode::<32>(s).map(NixHash).map_err(|_| err()),
            64 => {
                let mut out = [0u8; 32];
                for (i, b) in out.iter_mut().enumerate() {
                    *b = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(err)?, 16)
                        .map_err(|_| err())?;
                }
                Ok(NixHash(out))
            }
            44 => {
                let v = STANDARD.decode(s).map_err(|_| err())?;
                Ok(NixHash(v.try_into().map_err(|_| err())?))
            }
            _ => Err(err()),
        }
    }
}

impl fmt::Display for NixHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_nix32())
    }
}

impl fmt::Debug for NixHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for NixHash {
    type Err = HashError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digest = s
            .strip_prefix("sha256:")
            .or_else(|| s.strip_prefix("sha256-"))
            .ok_or_else(|| HashError::Algorithm(s.to_owned()))?;
        NixHash::from_digest(digest)
    }
}

/// A `Write` that passes bytes through while counting and hashing them.
///
/// Stacked twice (NAR side and file side) it gives NarSize, NarHash, FileSize and FileHash in
/// the one pass that writes the file.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Sha256::new(), count: 0 }
    }

    /// Bytes written so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Returns the inner writer, the byte count and the hash.
    pub fn finish(self) -> (W, u64, NixHash) {
        (self.inner, self.count, NixHash(self.hasher.finalize().into()))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A `Read` that counts and hashes the bytes read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: io::Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader { inner, hasher: Sha256::new(), count: 0 }
    }

    /// Bytes read so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Returns the byte count and the hash.
    pub fn finish(self) -> (u64, NixHash) {
        (self.count, NixHash(self.hasher.finalize().into()))
    }
}

impl<R: io::Read> io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_agree() {
        let h = NixHash::digest(b"abc");
        let nix32 = "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
        assert_eq!(h.to_string(), nix32);
        assert_eq!(nix32.parse::<NixHash>().unwrap(), h);
        let hex = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(hex.parse::<NixHash>().unwrap(), h);
        let sri = "sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=";
        assert_eq!(sri.parse::<NixHash>().unwrap(), h);
        assert_eq!(h.to_hex(), &hex[7..]);
    }

    #[test]
    fn rejects() {
        assert!(matches!("md5:abc".parse::<NixHash>(), Err(HashError::Algorithm(_))));
        assert!(matches!("sha256:abc".parse::<NixHash>(), Err(HashError::Digest(_))));
    }

    #[test]
    fn hashing_writer() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"ab").unwrap();
        w.write_all(b"c").unwrap();
        let (inner, n, h) = w.finish();
        assert_eq!((inner.as_slice(), n, h), (&b"abc"[..], 3, NixHash::digest(b"abc")));
    }
}
