//! One module per subcommand: orchestration only, errors with context via anyhow.

pub mod gc;
pub mod keygen;
pub mod push;
pub mod sign;
pub mod verify;

use std::path::Path;

use anyhow::Context;

use crate::signing::SecretKey;

/// Reads a secret key file.
pub fn read_secret_key(path: &Path) -> anyhow::Result<SecretKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read secret key file {}", path.display()))?;
    text.parse().with_context(|| {
        format!("{} is not a Nix secret key (make one with `nixcache keygen`)", path.display())
    })
}
