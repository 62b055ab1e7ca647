//! The `.narinfo` text format.
//!
//! ```text
//! StorePath: /nix/store/<hash>-<name>
//! URL: nar/<nix32 FileHash>.nar.xz
//! Compression: xz
//! FileHash: sha256:<nix32>
//! FileSize: <bytes>
//! NarHash: sha256:<nix32>
//! NarSize: <bytes>
//! References: <base names, space separated, sorted; the line is there even when empty>
//! Deriver: <base name>          (when known)
//! System: <system>              (rare)
//! Sig: <key name>:<base64>      (zero or more)
//! CA: <content address>         (when content-addressed)
//! ```
//!
//! Fields are written in this order, which is Nix's. Unknown keys are kept and written
//! back after the known ones, so `parse(s).to_string() == s` for any file Nix writes.
//!
//! Parsing is at least as strict as Nix's (`NarInfo::NarInfo` in libstore), so a narinfo
//! that parses here is one Nix reads as meant: every line is `Key: value` ending in `\n`
//! (Nix takes the value from two characters after the colon to the next `\n`, so a
//! missing final newline is an error there, and a bare `Key:` or an empty line makes it
//! read the next line as the value), no carriage returns or other control characters,
//! sizes are plain decimal and NarSize is not zero, References are separated by single
//! spaces, and CA is a content address Nix can parse.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::hash::NixHash;
use crate::signing::{self, PublicKey, SecretKey, Signature};
use crate::store_path::{StoreDir, StorePath};

/// Why a narinfo does not parse.
#[derive(Debug, Error)]
pub enum NarInfoError {
    #[error("line {line}: expected 'Key: value', found {text:?}")]
    Line { line: usize, text: String },
    #[error("line {line}: bad {key} value {value:?}")]
    Value { line: usize, key: &'static str, value: String },
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("field {0} appears twice")]
    Duplicate(&'static str),
    #[error("the last line does not end with a newline")]
    Unterminated,
    #[error("line {line}: control character {found:?} (a CRLF line end?)")]
    Control { line: usize, found: char },
}

/// A parsed narinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarInfo {
    pub store_dir: StoreDir,
    pub store_path: StorePath,
    pub url: String,
    pub compression: String,
    pub file_hash: Option<NixHash>,
    pub file_size: Option<u64>,
    pub nar_hash: NixHash,
    pub nar_size: u64,
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub system: Option<String>,
    pub sigs: Vec<Signature>,
    pub ca: Option<String>,
    /// Keys this module does not know, in file order.
    pub extra: Vec<(String, String)>,
}

impl NarInfo {
    /// The text a signature covers.
    pub fn fingerprint(&self) -> String {
        let refs: Vec<String> = self.references.iter().map(|r| self.store_dir.display(r)).collect();
        signing::fingerprint(
            &self.store_dir.display(&self.store_path),
            &self.nar_hash,
            self.nar_size,
            refs.iter().map(String::as_str),
        )
    }

    /// True when a signature by a key of this name is present.
    pub fn signed_by(&self, key_name: &str) -> bool {
        self.sigs.iter().any(|s| s.key_name() == key_name)
    }

    /// Adds a signature by `key`, replacing any earlier one by a key of the same name.
    /// Returns false when an identical signature was already there.
    pub fn add_signature(&mut self, key: &SecretKey) -> bool {
        let sig = key.sign(&self.fingerprint());
        if self.sigs.contains(&sig) {
            return false;
        }
        self.sigs.retain(|s| s.key_name() != key.name());
        self.sigs.push(sig);
        true
    }

    /// True when some signature verifies with one of `keys`.
    pub fn verified_by(&self, keys: &[PublicKey]) -> bool {
        let fp = self.fingerprint();
        self.sigs.iter().any(|s| keys.iter().any(|k| k.verify(&fp, s)))
    }

    /// The narinfo's file name in a cache: `<hashpart>.narinfo`.
    pub fn file_name(&self) -> String {
        crate::layout::narinfo_name(self.store_path.hash_part())
    }

    /// The cache-relative file the URL names, as a client reaches it: Nix appends the URL to
    /// the cache's (`DIR/./nar/x`, `http://host/nar//x`), and both the filesystem and
    /// web servers resolve `.` and empty components. `None` for a URL that leaves the cache
    /// (`..`, an absolute URL).
    pub fn nar_file(&self) -> Option<String> {
        let url = &self.url;
        if url.contains("://") || url.starts_with('/') {
            return None;
        }
        let mut parts = Vec::new();
        for c in url.split('/') {
            match c {
                "" | "." => {}
                ".." => return None,
                c => parts.push(c),
            }
        }
        (!parts.is_empty()).then(|| parts.join("/"))
    }
}

impl fmt::Display for NarInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "StorePath: {}", self.store_dir.display(&self.store_path))?;
        writeln!(f, "URL: {}", self.url)?;
        writeln!(f, "Compression: {}", self.compression)?;
        if let Some(h) = &self.file_hash {
            writeln!(f, "FileHash: {h}")?;
        }
        if let Some(s) = self.file_size {
            writeln!(f, "FileSize: {s}")?;
        }
        writeln!(f, "NarHash: {}", self.nar_hash)?;
        writeln!(f, "NarSize: {}", self.nar_size)?;
        let refs: Vec<&str> = self.references.iter().map(StorePath::as_str).collect();
        writeln!(f, "References: {}", refs.join(" "))?;
        if let Some(d) = &self.deriver {
            writeln!(f, "Deriver: {d}")?;
        }
        if let Some(s) = &self.system {
            writeln!(f, "System: {s}")?;
        }
        for sig in &self.sigs {
            writeln!(f, "Sig: {sig}")?;
        }
        if let Some(ca) = &self.ca {
            writeln!(f, "CA: {ca}")?;
        }
        for (k, v) in &self.extra {
            writeln!(f, "{k}: {v}")?;
        }
        Ok(())
    }
}

/// A size as Nix writes it: decimal digits only.
fn decimal(s: &str) -> Option<u64> {
    s.bytes().all(|b| b.is_ascii_digit()).then(|| s.parse().ok()).flatten()
}

fn set<T>(slot: &mut Option<T>, key: &'static str, v: T) -> Result<(), NarInfoError> {
    if slot.replace(v).is_some() {
        return Err(NarInfoError::Duplicate(key));
    }
    Ok(())
}

impl FromStr for NarInfo {
    type Err = NarInfoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut path, mut url, mut compression, mut file_hash, mut file_size) =
            (None, None, None, None, None);
        let (mut nar_hash, mut nar_size, mut references, mut deriver, mut system, mut ca) =
            (None, None, None, None, None, None);
        let mut sigs = Vec::new();
        let mut extra = Vec::new();
        if !s.is_empty() && !s.ends_with('\n') {
            return Err(NarInfoError::Unterminated);
        }
        for (i, text) in s.split_terminator('\n').enumerate() {
            let line = i + 1;
            if let Some(found) = text.chars().find(|c| c.is_control()) {
                return Err(NarInfoError::Control { line, found });
            }
            let (key, value) =
                text.split_once(": ").ok_or_else(|| NarInfoError::Line { line, text: text.to_owned() })?;
            if key.is_empty() || key.contains(':') {
                return Err(NarInfoError::Line { line, text: text.to_owned() });
            }
            macro_rules! parse {
                ($name:literal, $e:expr) => {
                    $e.map_err(|_| NarInfoError::Value { line, key: $name, value: value.to_owned() })?
                };
            }
            match key {
                "StorePath" => {
                    let (dir, base) = parse!("StorePath", value.rsplit_once('/').ok_or(()));
                    let dir: StoreDir = parse!("StorePath", dir.parse());
                    set(&mut path, "StorePath", (dir, parse!("StorePath", base.parse())))?
                }
                "URL" => set(&mut url, "URL", value.to_owned())?,
                "Compression" => set(&mut compression, "Compression", value.to_owned())?,
                "FileHash" => set(&mut file_hash, "FileHash", parse!("FileHash", value.parse()))?,
                "FileSize" => set(&mut file_size, "FileSize", parse!("FileSize", decimal(value).ok_or(())))?,
                "NarHash" => set(&mut nar_hash, "NarHash", parse!("NarHash", value.parse()))?,
                "NarSize" => set(
                    &mut nar_size,
                    "NarSize",
                    parse!("NarSize", decimal(value).filter(|n| *n > 0).ok_or(())),
                )?,
                "References" => {
                    let refs: Result<Vec<StorePath>, _> =
                        value.split(' ').filter(|r| !r.is_empty()).map(str::parse).collect();
                    set(&mut references, "References", parse!("References", refs))?
                }
                "Deriver" if value != "unknown-deriver" => {
                    set(&mut deriver, "Deriver", parse!("Deriver", value.parse()))?
                }
                "System" => set(&mut system, "System", value.to_owned())?,
                "Sig" => sigs.push(parse!("Sig", value.parse())),
                "CA" => {
                    let valid = crate::content_address::is_valid(value);
                    set(&mut ca, "CA", parse!("CA", valid.then(|| value.to_owned()).ok_or(())))?
                }
                _ => extra.push((key.to_owned(), value.to_owned())),
            }
        }
        let (store_dir, store_path) = path.ok_or(NarInfoError::Missing("StorePath"))?;
        Ok(NarInfo {
            store_dir,
            store_path,
            url: url.filter(|u| !u.is_empty()).ok_or(NarInfoError::Missing("URL"))?,
            // Nix reads a missing Compression as bzip2, the format's first default.
            compression: compression.unwrap_or_else(|| "bzip2".to_owned()),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(NarInfoError::Missing("NarHash"))?,
            nar_size: nar_size.ok_or(NarInfoError::Missing("NarSize"))?,
            references: references.unwrap_or_default(),
            deriver,
            system,
            sigs,
            ca,
            extra,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Written by Nix 2.8: `nix copy --to file://…?compression=xz` of a store path signed
    // beforehand with `nix store sign --key-file` using the key in signing.rs's tests.
    pub(crate) const NIX_NARINFO: &str = include_str!("../tests/data/nix-2.8.narinfo");
    const PK: &str = "test-1:Fc8Yn1bFNVbmKCO0IZp2PQHah/AV6MrB0hAzmo5+Pys=";

    #[test]
    fn round_trip_nix_written() {
        let ni: NarInfo = NIX_NARINFO.parse().unwrap();
        assert_eq!(ni.to_string(), NIX_NARINFO);
        assert!(!ni.references.is_empty());
    }

    #[test]
    fn nix_signature_verifies_and_ours_matches() {
        let ni: NarInfo = NIX_NARINFO.parse().unwrap();
        let pk: PublicKey = PK.parse().unwrap();
        assert!(ni.verified_by(std::slice::from_ref(&pk)), "{}", ni.fingerprint());
        // ed25519 is deterministic: our signature must equal the one Nix made.
        let sk: SecretKey = include_str!("../tests/data/test-1.secret").parse().unwrap();
        let mut ours = ni.clone();
        assert!(!ours.add_signature(&sk), "same key, same fingerprint: nothing to add");
        ours.sigs.clear();
        assert!(ours.add_signature(&sk));
        assert_eq!(
            ours.sigs,
            ni.sigs.iter().filter(|s| s.key_name() == "test-1").cloned().collect::<Vec<_>>()
        );
        // A changed NarSize breaks it.
        let mut bad = ni;
        bad.nar_size += 1;
        assert!(!bad.verified_by(&[pk]));
    }

    #[test]
    fn empty_references_line_is_written() {
        let mut ni: NarInfo = NIX_NARINFO.parse().unwrap();
        ni.references.clear();
        assert!(ni.to_string().contains("\nReferences: \n"));
        let again: NarInfo = ni.to_string().parse().unwrap();
        assert_eq!(again, ni);
    }

    #[test]
    fn as_strict_as_nix() {
        let ok = NIX_NARINFO;
        assert!(ok.parse::<NarInfo>().is_ok());
        let crlf = ok.replace('\n', "\r\n");
        assert!(matches!(crlf.parse::<NarInfo>(), Err(NarInfoError::Control { line: 1, found: '\r' })));
        let unterminated = ok.trim_end_matches('\n');
        assert!(matches!(unterminated.parse::<NarInfo>(), Err(NarInfoError::Unterminated)));
        let bad_ca = format!("{ok}CA: fixed:r:sha256:1234\n");
        assert!(matches!(bad_ca.parse::<NarInfo>(), Err(NarInfoError::Value { key: "CA", .. })));
        let good_ca = format!("{ok}CA: fixed:r:sha256:{}\n", "1".repeat(52));
        assert!(good_ca.parse::<NarInfo>().is_ok());
        for (from, to) in [
            ("NarSize: ", "NarSize: +"),
            ("FileSize: ", "FileSize:  "),
            ("References: ", "References:\t"),
            ("\nURL: ", "\n\nURL: "),
        ] {
            let bad = ok.replacen(from, to, 1);
            assert!(bad.parse::<NarInfo>().is_err(), "{bad}");
        }
        let zero =
            ok.lines().map(|l| if l.starts_with("NarSize") { "NarSize: 0" } else { l }).collect::<Vec<_>>();
        assert!((zero.join("\n") + "\n").parse::<NarInfo>().is_err());
    }

    #[test]
    fn nar_file_resolves_like_a_client() {
        let mut ni: NarInfo = NIX_NARINFO.parse().unwrap();
        for (url, file) in [
            ("nar/x.nar.xz", Some("nar/x.nar.xz")),
            ("./nar/x.nar.xz", Some("nar/x.nar.xz")),
            ("nar//x.nar.xz", Some("nar/x.nar.xz")),
            ("nar/./x.nar.xz", Some("nar/x.nar.xz")),
            ("nar/../x.nar.xz", None),
            ("../x.nar.xz", None),
            ("/etc/passwd", None),
            ("http://elsewhere/nar/x.nar.xz", None),
        ] {
            ni.url = url.into();
            assert_eq!(ni.nar_file().as_deref(), file, "{url}");
        }
    }

    #[test]
    fn rejects() {
        assert!(matches!("garbage\n".parse::<NarInfo>(), Err(NarInfoError::Line { line: 1, .. })));
        assert!(matches!("URL: x\n".parse::<NarInfo>(), Err(NarInfoError::Missing("StorePath"))));
        let bad_hash = NIX_NARINFO.replace("NarHash: sha256:", "NarHash: md5:");
        assert!(matches!(bad_hash.parse::<NarInfo>(), Err(NarInfoError::Value { key: "NarHash", .. })));
    }
}
