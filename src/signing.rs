//! Ed25519 keys and signatures in Nix's text format.
//!
//! - secret key file: `<name>:<base64 of 64 bytes: seed ‖ public key>`
//! - public key:      `<name>:<base64 of 32 bytes>`
//! - signature:       `<name>:<base64 of 64 bytes>` (a narinfo `Sig:` line)
//!
//! What is signed is the path's fingerprint:
//! `1;<store path>;<sha256:nix32 NarHash>;<NarSize>;<comma-separated full reference paths>`.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use thiserror::Error;

use crate::hash::NixHash;

/// Why a key or signature does not parse.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("expected <name>:<base64>, found no ':' (is this a key file?)")]
    Shape,
    #[error("the key name is empty")]
    EmptyName,
    #[error("the part after ':' is not valid base64")]
    Base64,
    #[error("the key data is {got} bytes, expected {expected}")]
    Length { got: usize, expected: usize },
    #[error("the secret key's public half does not match its seed")]
    Mismatch,
    #[error("the public key is not a valid ed25519 point")]
    Point,
    #[error(
        "it has {found:?} at byte {at}: a key is exactly NAME:BASE64, with nothing around it but one final newline"
    )]
    Stray { found: char, at: usize },
}

/// Splits `NAME:BASE64`, allowing one final newline as Nix does (it reads a key file whole
/// and strips nothing else, so a stray space would end up in every `Sig:` line).
fn split(s: &str) -> Result<(&str, Vec<u8>), KeyError> {
    let s = s.strip_suffix('\n').unwrap_or(s);
    if let Some((at, found)) = s.char_indices().find(|(_, c)| c.is_whitespace() || c.is_control()) {
        return Err(KeyError::Stray { found, at });
    }
    let (name, data) = s.split_once(':').ok_or(KeyError::Shape)?;
    if name.is_empty() {
        return Err(KeyError::EmptyName);
    }
    let bytes = STANDARD.decode(data).map_err(|_| KeyError::Base64)?;
    Ok((name, bytes))
}

fn fixed<const N: usize>(v: Vec<u8>) -> Result<[u8; N], KeyError> {
    let got = v.len();
    v.try_into().map_err(|_| KeyError::Length { got, expected: N })
}

/// A named ed25519 secret key. Debug is redacted; the key is wiped on drop by ed25519-dalek.
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    /// Makes a key from a 32-byte seed (from the OS random source, in `keygen`).
    pub fn from_seed(name: &str, seed: &[u8; 32]) -> Result<Self, KeyError> {
        if name.is_empty() {
            return Err(KeyError::EmptyName);
        }
        Ok(SecretKey { name: name.to_owned(), key: SigningKey::from_bytes(seed) })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey { name: self.name.clone(), key: self.key.verifying_key() }
    }

    /// Signs a fingerprint.
    pub fn sign(&self, fingerprint: &str) -> Signature {
        let sig = self.key.sign(fingerprint.as_bytes());
        Signature { name: self.name.clone(), bytes: sig.to_bytes() }
    }
}

impl FromStr for SecretKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, bytes) = split(s)?;
        let mut bytes: [u8; 64] = fixed(bytes)?;
        // from_keypair_bytes checks that the public half belongs to the seed.
        let key = SigningKey::from_keypair_bytes(&bytes).map_err(|_| KeyError::Mismatch);
        bytes.fill(0);
        Ok(SecretKey { name: name.to_owned(), key: key? })
    }
}

impl fmt::Display for SecretKey {
    /// The key file's content, as `nix-store --generate-binary-cache-key` writes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, STANDARD.encode(self.key.to_keypair_bytes()))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}:<redacted>)", self.name)
    }
}

/// A named ed25519 public key, as in `trusted-public-keys`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when `sig` is by this key (same name) and valid for `fingerprint`.
    pub fn verify(&self, fingerprint: &str, sig: &Signature) -> bool {
        sig.name == self.name
            && self
                .key
                .verify_strict(fingerprint.as_bytes(), &ed25519_dalek::Signature::from_bytes(&sig.bytes))
                .is_ok()
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, bytes) = split(s.trim())?;
        let key = VerifyingKey::from_bytes(&fixed(bytes)?).map_err(|_| KeyError::Point)?;
        Ok(PublicKey { name: name.to_owned(), key })
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, STANDARD.encode(self.key.to_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A named signature, the value of a narinfo `Sig:` line.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature {
    name: String,
    bytes: [u8; 64],
}

impl Signature {
    /// The name of the key that made it.
    pub fn key_name(&self) -> &str {
        &self.name
    }
}

impl FromStr for Signature {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, bytes) = split(s)?;
        Ok(Signature { name: name.to_owned(), bytes: fixed(bytes)? })
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, STANDARD.encode(self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

/// The text Nix signs for a path: `1;path;narHash;narSize;refs`.
///
/// `references` are full store paths; they are joined in the order given, which must be
/// sorted (narinfo order) for the signature to match Nix's.
pub fn fingerprint<'a>(
    store_path: &str,
    nar_hash: &NixHash,
    nar_size: u64,
    references: impl IntoIterator<Item = &'a str>,
) -> String {
    let refs: Vec<&str> = references.into_iter().collect();
    format!("1;{store_path};{nar_hash};{nar_size};{}", refs.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made by `nix-store --generate-binary-cache-key test-1 sk pk` (Nix 2.8).
    const SK: &str =
        "test-1:DaVAtE34wRiYlkhMVRJG5spv2VArFiUHISv+7i+jdY4VzxifVsU1VuYoI7QhmnY9AdqH8BXoysHSEDOajn4/Kw==";
    const PK: &str = "test-1:Fc8Yn1bFNVbmKCO0IZp2PQHah/AV6MrB0hAzmo5+Pys=";

    #[test]
    fn keys_round_trip() {
        let sk: SecretKey = format!("{SK}\n").parse().unwrap();
        assert_eq!(sk.to_string(), SK);
        assert_eq!(sk.public_key().to_string(), PK);
        assert_eq!(PK.parse::<PublicKey>().unwrap(), sk.public_key());
        assert!(!format!("{sk:?}").contains("DaVA"));
    }

    #[test]
    fn rejects_bad_keys() {
        assert_eq!("garbage".parse::<SecretKey>().unwrap_err(), KeyError::Shape);
        assert_eq!(":AAAA".parse::<SecretKey>().unwrap_err(), KeyError::EmptyName);
        assert_eq!("a:!!".parse::<SecretKey>().unwrap_err(), KeyError::Base64);
        assert_eq!(PK.parse::<SecretKey>().unwrap_err(), KeyError::Length { got: 32, expected: 64 });
        // A seed with someone else's public half.
        let mut bytes = STANDARD.decode(&SK[7..]).unwrap();
        bytes[40] ^= 1;
        let forged = format!("test-1:{}", STANDARD.encode(bytes));
        assert_eq!(forged.parse::<SecretKey>().unwrap_err(), KeyError::Mismatch);
    }
}
