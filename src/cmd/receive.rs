//! `nixcache receive`: take a push over standard input and output (what `push --dest
//! ssh://HOST/DIR` runs on HOST).

use anyhow::Context;

use super::Usage;
use crate::cache::Cache;
use crate::cli::ReceiveArgs;
use crate::receive::Receiver;
use crate::storage::Dest;

pub fn run(args: &ReceiveArgs) -> anyhow::Result<bool> {
    let Dest::Dir(dir) = &args.dest else {
        return Err(
            Usage(format!("receive writes a cache directory on this machine, not {}", args.dest)).into()
        );
    };
    super::check_dest(&args.dest, &[])?;
    // Without a trusted key, the SSH login is what lets a pusher in.
    let config = super::receive_config(
        &args.trusted_public_keys,
        &args.secret_keys,
        args.trusted_public_keys.is_empty(),
        args.max_upload_size,
        args.lock_timeout,
    )?;
    // A push may start a cache: the directory is made as a local push makes it.
    Cache::create(dir.as_path())?;
    let receiver = Receiver::open(dir, config)
        .with_context(|| format!("cannot prepare {} for uploads", dir.display()))?;
    crate::receive::stdio::run(&receiver, std::io::stdin().lock(), std::io::stdout().lock())
        .context("the push's connection broke")?;
    Ok(true)
}
