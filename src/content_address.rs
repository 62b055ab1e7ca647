//! Content addresses (the narinfo `CA:` field) and the store paths they imply.
//!
//! A content-addressed path is self-certifying: its store path is computed from its contents,
//! so a client can trust it without a signature. Nix computes:
//!
//! ```text
//! store path digest = compress20(sha256("<type>:sha256:<hex>:<store dir>:<name>"))
//! text:sha256:H           type = "text" + ":<ref>"…           over H
//! fixed:r:sha256:H        type = "source" + ":<ref>"… [":self"] over H
//! fixed[:r]:<algo>:H      type = "output:out", over sha256("fixed:out:[r:]<algo>:<hex H>:")
//! ```
//!
//! where `compress20` XOR-folds 32 bytes into 20.

use sha2::{Digest, Sha256};

use crate::hash::NixHash;
use crate::nixbase32;
use crate::store_path::{StoreDir, StorePath};

fn compress20(h: &[u8; 32]) -> [u8; 20] {
    let mut out = [0u8; 20];
    for (i, b) in h.iter().enumerate() {
        out[i % 20] ^= b;
    }
    out
}

fn make_store_path(store_dir: &StoreDir, ty: &str, hash_hex: &str, name: &str) -> Option<StorePath> {
    let s = format!("{ty}:sha256:{hash_hex}:{store_dir}:{name}");
    let digest: [u8; 32] = Sha256::digest(s.as_bytes()).into();
    format!("{}-{name}", nixbase32::encode(&compress20(&digest))).parse().ok()
}

fn with_refs(ty: &str, store_dir: &StoreDir, refs: &[&StorePath], self_ref: bool) -> String {
    let mut s = ty.to_owned();
    for r in refs {
        s.push(':');
        s.push_str(&store_dir.display(r));
    }
    if self_ref {
        s.push_str(":self");
    }
    s
}

fn hex_of(algo: &str, digest: &str) -> Option<String> {
    let len = match algo {
        "md5" => 16,
        "sha1" => 20,
        "sha256" => 32,
        "sha512" => 64,
        _ => return None,
    };
    let bytes: Vec<u8> = match digest.len() {
        n if n == len * 2 => {
            (0..len).map(|i| u8::from_str_radix(&digest[2 * i..2 * i + 2], 16).ok()).collect::<Option<_>>()?
        }
        n if n == nixbase32::encoded_len(len) => match len {
            16 => nixbase32::decode::<16>(digest).ok()?.to_vec(),
            20 => nixbase32::decode::<20>(digest).ok()?.to_vec(),
            32 => nixbase32::decode::<32>(digest).ok()?.to_vec(),
            64 => nixbase32::decode::<64>(digest).ok()?.to_vec(),
            _ => return None,
        },
        _ => return None,
    };
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// True when `ca` is a content address Nix parses: `text:sha256:<hash>` or
/// `fixed:[r:]<algo>:<hash>` with a known algorithm and a digest of the right length.
pub fn is_valid(ca: &str) -> bool {
    if let Some(rest) = ca.strip_prefix("text:") {
        return rest.parse::<NixHash>().is_ok();
    }
    let Some(rest) = ca.strip_prefix("fixed:") else { return false };
    let rest = rest.strip_prefix("r:").unwrap_or(rest);
    rest.split_once(':').is_some_and(|(algo, digest)| hex_of(algo, digest).is_some())
}

/// The store path that content address `ca` gives a path named `name` with `references`
/// (which may include the path itself). `None` when the CA does not parse.
pub fn ca_store_path(
    store_dir: &StoreDir,
    path: &StorePath,
    ca: &str,
    references: &[StorePath],
) -> Option<StorePath> {
    let name = path.name();
    let self_ref = references.contains(path);
    let others: Vec<&StorePath> = references.iter().filter(|r| *r != path).collect();
    if let Some(rest) = ca.strip_prefix("text:") {
        let h: NixHash = rest.parse().ok()?;
        if self_ref {
            return None;
        }
        return make_store_path(store_dir, &with_refs("text", store_dir, &others, false), &h.to_hex(), name);
    }
    let rest = ca.strip_prefix("fixed:")?;
    let (recursive, rest) = match rest.strip_prefix("r:") {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let (algo, digest) = rest.split_once(':')?;
    let hex = hex_of(algo, digest)?;
    if recursive && algo == "sha256" {
        return make_store_path(store_dir, &with_refs("source", store_dir, &others, self_ref), &hex, name);
    }
    if !references.is_empty() {
        return None;
    }
    let inner = format!("fixed:out:{}{algo}:{hex}:", if recursive { "r:" } else { "" });
    let inner_hex = NixHash::digest(inner.as_bytes()).to_hex();
    make_store_path(store_dir, "output:out", &inner_hex, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_path_from_nix() {
        // builtins.toFile "edge-text-ca" "a content-addressed text file\n" in Nix 2.8.
        let p: StorePath = "14r4qd881dzamw4j8n40zvxj6d0v0i52-edge-text-ca".parse().unwrap();
        let ca = "text:sha256:1mg9nyqvs8311ycvfx0azcmwimn02dfs66l62n0mqlimqiv0q6ia";
        assert_eq!(ca_store_path(&StoreDir::default(), &p, ca, &[]), Some(p.clone()));
        let other = "text:sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
        assert_ne!(ca_store_path(&StoreDir::default(), &p, other, &[]), Some(p));
    }

    #[test]
    fn source_path_from_nix() {
        // builtins.path { path = ./tests/fixture-src; name = "edge-source-ca"; } in Nix 2.8.
        let p: StorePath = "sdpnrwa90v9ssa0r0982r8cgpg7dddmb-edge-source-ca".parse().unwrap();
        let ca = "fixed:r:sha256:1l1x4wfgqxp9kmq9nsczx3arnb18228fysx9a9pijyis2fmwvlac";
        assert_eq!(ca_store_path(&StoreDir::default(), &p, ca, &[]), Some(p.clone()));
        // The same hash as a flat file gives another path.
        let flat = "fixed:sha256:1l1x4wfgqxp9kmq9nsczx3arnb18228fysx9a9pijyis2fmwvlac";
        assert_ne!(ca_store_path(&StoreDir::default(), &p, flat, &[]), Some(p));
    }

    #[test]
    fn garbage_is_none() {
        let p: StorePath = "14r4qd881dzamw4j8n40zvxj6d0v0i52-x".parse().unwrap();
        assert_eq!(ca_store_path(&StoreDir::default(), &p, "nonsense", &[]), None);
        assert_eq!(ca_store_path(&StoreDir::default(), &p, "fixed:sha256:zz", &[]), None);
    }
}
