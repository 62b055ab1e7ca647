//! One module per subcommand: orchestration only, errors with context via anyhow.

pub mod gc;
pub mod keygen;
pub mod partial;
pub mod push;
pub mod receive;
pub mod remote;
pub mod serve;
pub mod sign;
pub mod verify;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::signing::SecretKey;

/// A bad value found after parsing (no paths given, a `--dest` in the store): printed as an
/// error and exit status 2, as clap's own usage errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// Refuses a `--dest` directory that is, is inside, or contains a Nix store: the logical
/// `/nix/store` (or `store_dir`), and the real one under `--root`. Links are followed as far
/// as the directory exists, so `/nix/store/../store/x` and a link into the store are caught.
pub fn check_dest(dest: &crate::storage::Dest, stores: &[PathBuf]) -> Result<(), Usage> {
    let crate::storage::Dest::Dir(dir) = dest else { return Ok(()) };
    let dir = real_path(dir);
    let mut stores: Vec<PathBuf> = stores.iter().map(|s| real_path(s)).collect();
    stores.push(real_path(Path::new("/nix/store")));
    for store in stores {
        let what = if dir == store {
            "is"
        } else if dir.starts_with(&store) {
            "is inside"
        } else if store.starts_with(&dir) {
            "contains"
        } else {
            continue;
        };
        return Err(Usage(format!(
            "--dest {} {what} the Nix store {}: a cache there would write its files into the store (or gc remove them from it); give a directory of its own, such as /var/lib/static-nix-cache",
            dir.display(),
            store.display()
        )));
    }
    Ok(())
}

/// `p` made absolute, with links and `..` resolved as far as it exists.
fn real_path(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let mut missing = Vec::new();
    let mut at = abs.as_path();
    loop {
        if let Ok(real) = at.canonicalize() {
            return missing.iter().rev().fold(real, |acc: PathBuf, c| acc.join(c));
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_owned());
                at = parent;
            }
            _ => return abs,
        }
    }
}

/// Says that a writer waits for the cache's lock, and for whom.
pub fn say_waiting(dest: &crate::storage::Dest, who: Option<&str>, limit: Option<std::time::Duration>) {
    let who = who.map(|w| format!(", {w}")).unwrap_or_default();
    let limit = match limit {
        Some(l) => format!("giving up after {}s", l.as_secs()),
        None => "--lock-timeout gives up after a while".into(),
    };
    crate::elog!("waiting for the lock of {dest}{who}: another nixcache (or a flock) is writing it; {limit}");
}

/// Fails, before anything is created, on a cache without `nix-cache-info`: not a cache (a
/// typo in `--dest`), which gc would find empty and sign would have nothing to sign in.
pub fn require_cache_info(cache: &crate::cache::Cache) -> anyhow::Result<()> {
    if cache.cache_info()?.is_none() {
        anyhow::bail!(
            "{} has no nix-cache-info, so it is not a binary cache (a push writes one): check --dest; nothing was changed",
            cache.describe()
        );
    }
    Ok(())
}

/// The keys Nix's own configuration names: `trusted-public-keys` and `secret-key-files`
/// (with their `extra-` forms) from `$NIX_CONF_DIR/nix.conf` (default `/etc/nix`) and
/// `$NIX_CONFIG`. Read only to tell the user; nixcache never signs with them unasked.
#[derive(Debug, Default)]
pub struct NixConfKeys {
    pub trusted: Vec<crate::signing::PublicKey>,
    pub secret_key_files: Vec<PathBuf>,
    /// `netrc-file`, if set.
    pub netrc_file: Option<PathBuf>,
}

impl NixConfKeys {
    pub fn read() -> NixConfKeys {
        let dir = std::env::var_os("NIX_CONF_DIR").map_or_else(|| PathBuf::from("/etc/nix"), PathBuf::from);
        let mut text = std::fs::read_to_string(dir.join("nix.conf")).unwrap_or_default();
        if let Some(extra) = std::env::var_os("NIX_CONFIG") {
            text.push('\n');
            text.push_str(&extra.to_string_lossy());
        }
        Self::parse(&text)
    }

    fn parse(text: &str) -> NixConfKeys {
        let mut keys = NixConfKeys::default();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or_default();
            let Some((name, value)) = line.split_once('=') else { continue };
            let name = name.trim();
            let values = value.split_whitespace();
            match name.strip_prefix("extra-").unwrap_or(name) {
                "trusted-public-keys" | "binary-cache-public-keys" => {
                    if !name.starts_with("extra-") {
                        keys.trusted.clear();
                    }
                    keys.trusted.extend(values.filter_map(|v| v.parse().ok()));
                }
                "netrc-file" => keys.netrc_file = values.last().map(PathBuf::from),
                "secret-key-files" => {
                    if !name.starts_with("extra-") {
                        keys.secret_key_files.clear();
                    }
                    keys.secret_key_files.extend(values.map(PathBuf::from));
                }
                _ => {}
            }
        }
        keys
    }

    /// The public key called `name`: from trusted-public-keys, or derived from a readable
    /// secret key file of that name.
    pub fn public_key(&self, name: &str) -> Option<crate::signing::PublicKey> {
        self.trusted.iter().find(|k| k.name() == name).cloned().or_else(|| {
            self.secret_key_files.iter().find_map(|f| {
                let key: crate::signing::SecretKey = std::fs::read_to_string(f).ok()?.parse().ok()?;
                (key.name() == name).then(|| key.public_key())
            })
        })
    }
}

/// The names of the keys that sign a sample of the cache's narinfos, most used first: the
/// first 16 of `known` (narinfos the caller knows are there), or of the cache's listing when
/// it knows none.
pub fn signing_key_names(cache: &crate::cache::Cache, known: &[String]) -> Vec<String> {
    let listed = if known.is_empty() { cache.narinfo_files().unwrap_or_default() } else { Vec::new() };
    let mut count: std::collections::BTreeMap<String, usize> = Default::default();
    for file in known.iter().chain(&listed).take(16) {
        if let Ok(Some(ni)) = cache.read_narinfo(file) {
            for s in &ni.sigs {
                *count.entry(s.key_name().to_owned()).or_default() += 1;
            }
        }
    }
    let mut names: Vec<(String, usize)> = count.into_iter().collect();
    names.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    names.into_iter().map(|(n, _)| n).collect()
}

/// Reads a secret key file, warning when every user can read it.
pub fn read_secret_key(path: &Path) -> anyhow::Result<SecretKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read secret key file {}", path.display()))?;
    let key = text.parse().with_context(|| {
        format!("{} is not a Nix secret key (make one with `nixcache keygen`)", path.display())
    })?;
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o004 != 0
    {
        crate::elog!(
            "warning: the secret key {} is readable by every user (mode {:o}); `chmod 600` it",
            path.display(),
            m.permissions().mode() & 0o777
        );
    }
    Ok(key)
}

/// A path argument of `gc --keep` or `sign` as push takes it: `./result` or another link
/// into the store, a path inside a store path, or a store path, resolved on this machine
/// when it exists here; otherwise as written (the cache host may have no store).
pub fn store_path_arg(cache: &crate::cache::Cache, arg: &str) -> String {
    let store_dir = cache.cache_info().ok().flatten().map(|ci| ci.store_dir).unwrap_or_default();
    let here = Path::new(arg);
    if std::fs::symlink_metadata(here).is_err() {
        return arg.to_owned();
    }
    match crate::store::StoreLocation::local(&store_dir).resolve(here) {
        Ok(p) => store_dir.display(&p),
        Err(_) => arg.to_owned(),
    }
}

/// Where a bucket's narinfos are kept on this machine between runs:
/// `$XDG_CACHE_HOME/nixcache/buckets`, else `~/.cache/nixcache/buckets`.
pub fn copies_dir() -> Option<std::path::PathBuf> {
    let var = |k| std::env::var_os(k).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    let base = var("XDG_CACHE_HOME")
        .filter(|p| p.is_absolute())
        .or_else(|| var("HOME").map(|h| h.join(".cache")))?;
    Some(base.join("nixcache").join("buckets"))
}

/// Keeps a bucket's narinfos on this machine for the next run ([`copies_dir`]), unless
/// `off`; what goes wrong is a warning (said with `--quiet` too), never the end of the run.
pub fn keep_copies(cache: &crate::cache::Cache, dest: &crate::storage::Dest, off: bool) {
    if off || !matches!(dest, crate::storage::Dest::Bucket(_)) {
        return;
    }
    let Some(dir) = copies_dir() else {
        crate::elog!(
            "warning: neither XDG_CACHE_HOME nor HOME is set: the bucket's narinfos are not kept on this machine, and the next push downloads them again"
        );
        return;
    };
    if let Err(e) = cache.keep_copies(&dir) {
        crate::elog!(
            "warning: the bucket's narinfos are not kept on this machine ({e}); the next push downloads them again (set XDG_CACHE_HOME to a writable directory, or pass --no-local-copies)"
        );
    }
}

/// A public key given on the command line: the key itself (NAME:BASE64), or a file holding one.
pub(crate) fn parse_public_key_arg(arg: &str) -> anyhow::Result<crate::signing::PublicKey> {
    // A key itself, or a file that holds one.
    if let Ok(k) = arg.parse() {
        return Ok(k);
    }
    let text = std::fs::read_to_string(arg)
        .with_context(|| format!("{arg:?} is neither a public key (NAME:BASE64) nor a readable key file"))?;
    text.parse().with_context(|| format!("{arg} does not hold a Nix public key"))
}

/// What a receiver (`serve --upload-token-file`, `receive`) takes: the trusted keys parsed
/// (each NAME:BASE64 or a file holding one), its own secret keys read.
pub(crate) fn receive_config(
    trusted: &[String],
    secret_keys: &[PathBuf],
    allow_unsigned: bool,
    max_upload: Option<u64>,
    lock_timeout: std::time::Duration,
) -> anyhow::Result<crate::receive::ReceiveConfig> {
    Ok(crate::receive::ReceiveConfig {
        trusted: trusted.iter().map(|k| parse_public_key_arg(k)).collect::<anyhow::Result<Vec<_>>>()?,
        allow_unsigned,
        keys: secret_keys.iter().map(|p| read_secret_key(p)).collect::<anyhow::Result<Vec<_>>>()?,
        max_upload: max_upload.unwrap_or(crate::receive::DEFAULT_MAX_UPLOAD),
        lock_timeout,
    })
}

/// Says what requests a command made to a bucket (nothing for a directory), and how many
/// narinfos were read from the copies kept on this machine instead.
pub fn say_requests(cache: &crate::cache::Cache) {
    let requests = cache.requests();
    if !requests.is_empty() {
        match cache.bytes_sent() {
            Some(sent) => crate::elog!(
                "{}; {} sent to {}",
                crate::storage::requests_summary(&requests),
                crate::progress::bytes(sent),
                cache.describe()
            ),
            None => crate::elog!("{}", crate::storage::requests_summary(&requests)),
        }
    }
    if let Some((file, n)) = cache.copies_used()
        && n > 0
    {
        crate::elog!(
            "{} read from the copies kept in {}",
            crate::progress::plural(n as usize, "narinfo"),
            file.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Dest;

    #[test]
    fn nix_conf_keys_follow_nix_s_override_and_extra_rules() {
        let k = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
        let conf = NixConfKeys::parse(&format!(
            "trusted-public-keys = other-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n\
             trusted-public-keys = {k} # comment\nextra-trusted-public-keys = not-a-key\n\
             secret-key-files = /etc/nix/a.sec\nextra-secret-key-files = /etc/nix/b.sec\n"
        ));
        assert_eq!(conf.trusted.iter().map(|k| k.to_string()).collect::<Vec<_>>(), [k]);
        assert_eq!(conf.secret_key_files, [PathBuf::from("/etc/nix/a.sec"), PathBuf::from("/etc/nix/b.sec")]);
        assert_eq!(conf.public_key("cache.nixos.org-1").map(|k| k.to_string()).as_deref(), Some(k));
        assert!(conf.public_key("other-1").is_none());
    }

    #[test]
    fn a_dest_at_in_or_around_a_store_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let store = t.path().join("root/nix/store");
        std::fs::create_dir_all(&store).unwrap();
        let stores = [store.clone()];
        let check = |p: PathBuf| check_dest(&Dest::Dir(p), &stores);
        assert!(check(store.clone()).is_err());
        assert!(check(store.join("sub/cache")).is_err());
        assert!(check(store.join("../store/x")).is_err());
        assert!(check(t.path().join("root")).is_err());
        assert!(check(PathBuf::from("/")).is_err());
        assert!(check(PathBuf::from("/nix/store/x")).is_err());
        assert!(check(t.path().join("cache")).is_ok());
        assert!(check(t.path().join("root/nix/store-cache")).is_ok());
        std::os::unix::fs::symlink(&store, t.path().join("link")).unwrap();
        assert!(check(t.path().join("link/cache")).is_err());
    }
}
