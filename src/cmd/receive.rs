//! `nixcache receive`: take a push over standard input and output (what `push --dest
//! ssh://HOST/DIR` runs on HOST).

use anyhow::Context;

use super::Usage;
use crate::cache::Cache;
use crate::cli::ReceiveArgs;
use crate::receive::{DEFAULT_MAX_UPLOAD, ReceiveConfig, Receiver};
use crate::storage::Dest;

pub fn run(args: &ReceiveArgs) -> anyhow::Result<bool> {
    let Dest::Dir(dir) = &args.dest else {
        return Err(
            Usage(format!("receive writes a cache directory on this machine, not {}", args.dest)).into()
        );
    };
    super::check_dest(&args.dest, &[])?;
    let trusted = args
        .trusted_public_keys
        .iter()
        .map(|k| super::parse_public_key_arg(k))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let keys =
        args.secret_keys.iter().map(|p| super::read_secret_key(p)).collect::<anyhow::Result<Vec<_>>>()?;
    // A push may start a cache: the directory is made as a local push makes it.
    Cache::create(dir.as_path())?;
    let config = ReceiveConfig {
        allow_unsigned: trusted.is_empty(),
        trusted,
        keys,
        max_upload: args.max_upload_size.unwrap_or(DEFAULT_MAX_UPLOAD),
        lock_timeout: args.lock_timeout,
    };
    let receiver = Receiver::open(dir, config)
        .with_context(|| format!("cannot prepare {} for uploads", dir.display()))?;
    crate::receive::stdio::run(&receiver, std::io::stdin().lock(), std::io::stdout().lock())
        .context("the push's connection broke")?;
    Ok(true)
}
