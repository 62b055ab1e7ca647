//! `nixcache keygen NAME SECRET_FILE PUBLIC_FILE`: the two files
//! `nix-store --generate-binary-cache-key` writes, with the same contents and modes.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, bail};

use crate::cli::KeygenArgs;
use crate::signing::SecretKey;

fn write_new(path: &Path, mode: u32, text: &str) -> anyhow::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

pub fn run(args: &KeygenArgs) -> anyhow::Result<()> {
    if args.name.is_empty() || args.name.contains(':') || args.name.chars().any(char::is_whitespace) {
        return Err(super::Usage(format!(
            "key name {:?} must be non-empty, without ':' or spaces (e.g. cache.example.org-1)",
            args.name
        ))
        .into());
    }
    for p in [&args.secret_file, &args.public_file] {
        if p.symlink_metadata().is_ok() {
            bail!("{} already exists; refusing to overwrite a key", p.display());
        }
    }
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut r| r.read_exact(&mut seed))
        .context("cannot read random bytes from /dev/urandom")?;
    let key = SecretKey::from_seed(&args.name, &seed)?;
    seed.fill(0);
    write_new(&args.secret_file, 0o600, &key.to_string())?;
    if let Err(e) = write_new(&args.public_file, 0o644, &key.public_key().to_string()) {
        // Don't leave half a key pair.
        let _ = std::fs::remove_file(&args.secret_file);
        return Err(e);
    }
    Ok(())
}
