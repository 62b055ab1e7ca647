//! What a push to another machine needs resolved before it connects: the HTTP credentials,
//! and the options that only make sense where the cache is.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::Usage;
use crate::cli::PushArgs;
use crate::storage::Dest;
use crate::storage::remote::{Auth, RemoteDest, RemoteUrl};

/// The token file's first token (blank lines and `#` comments passed over).
fn read_token(file: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the upload token in {}", file.display()))?;
    crate::serve::upload::read_tokens(&text).into_iter().next().with_context(|| {
        format!("{} holds no token (one a line; blank lines and # comments are passed over)", file.display())
    })
}

/// The netrc files Nix would read, in its order: `NETRC`, `netrc-file` in nix.conf (default
/// `$NIX_CONF_DIR/netrc`), then `~/.netrc` as curl reads it.
fn netrc_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(f) = std::env::var_os("NETRC") {
        files.push(PathBuf::from(f));
    }
    let conf_dir = std::env::var_os("NIX_CONF_DIR").map_or_else(|| PathBuf::from("/etc/nix"), PathBuf::from);
    files.push(super::NixConfKeys::read().netrc_file.unwrap_or_else(|| conf_dir.join("netrc")));
    if let Some(home) = std::env::var_os("HOME") {
        files.push(PathBuf::from(home).join(".netrc"));
    }
    files
}

/// `--dest` as the push connects to it: `--remote-program` applied, and for http(s):// the
/// credentials (`--upload-token-file`, else the host's entry in a netrc file). Refuses
/// `--repair`, which reads the NARs there.
pub fn resolve(args: &PushArgs) -> anyhow::Result<Dest> {
    let dest = args.dest_with_uploads();
    let Dest::Remote(r) = &dest else {
        if args.upload_token_file.is_some() {
            return Err(Usage(
                "--upload-token-file is for an http(s):// --dest (a server that takes uploads)".into(),
            )
            .into());
        }
        return Ok(dest);
    };
    if args.repair {
        return Err(Usage(format!(
            "--repair reads the NARs in the cache: run it where the cache is (ssh HOST nixcache push --repair --dest DIR ...), not over the link to {}",
            r.url
        ))
        .into());
    }
    let auth = match &r.url {
        RemoteUrl::Ssh { .. } if args.upload_token_file.is_some() => {
            return Err(Usage(
                "--upload-token-file is for an http(s):// --dest; over ssh the login is what lets the push in".into(),
            )
            .into());
        }
        RemoteUrl::Ssh { .. } => None,
        RemoteUrl::Http(_) => match &args.upload_token_file {
            Some(f) => Some(Auth::Bearer(read_token(f)?)),
            None => r
                .url
                .host()
                .and_then(|host| {
                    netrc_files().iter().find_map(|f| {
                        let text = std::fs::read_to_string(f).ok()?;
                        crate::netrc::lookup(&text, &host)
                    })
                })
                .map(|c| Auth::Basic { login: c.login, password: c.password }),
        },
    };
    Ok(Dest::Remote(RemoteDest { auth, ..r.clone() }))
}

/// The commands that read or change a cache where it is: a usage error for a remote one.
pub fn refuse(dest: &Dest, command: &str) -> Result<(), Usage> {
    match dest {
        Dest::Remote(r) => {
            let (host, dir) = match &r.url {
                RemoteUrl::Ssh { target, path, .. } => (target.clone(), path.clone()),
                RemoteUrl::Http(_) => (r.url.host().unwrap_or_default(), "DIR".into()),
            };
            Err(Usage(format!(
                "{command} runs where the cache is, not over the link: ssh {host} nixcache {command} --dest {dir}"
            )))
        }
        _ => Ok(()),
    }
}
