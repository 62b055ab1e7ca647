//! What Nix knows about a valid store path, as the store reports it. Pure: read by
//! [`crate::store`], used by everything that pushes or decides what to push.

use crate::hash::NixHash;
use crate::signing::Signature;
use crate::store_path::StorePath;

/// What Nix knows about a valid store path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub nar_hash: NixHash,
    pub nar_size: u64,
    /// Sorted, self-reference included.
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub sigs: Vec<Signature>,
    pub ca: Option<String>,
}
