//! Parsers for option values that clap cannot check by itself, each answering a bad value
//! with a sentence that says what was probably meant.

use std::num::NonZeroUsize;
use std::path::PathBuf;

use crate::compression::Compression;
use crate::storage::Dest;
use crate::storage::remote::{RemoteDest, RemoteUrl};

/// Parses `--jobs`: at least 1, at most [`max_jobs`] (four per core, at most
/// 1024; more threads only add memory and contention).
pub(super) fn parse_jobs(s: &str) -> Result<NonZeroUsize, String> {
    let n: usize = s.parse().map_err(|_| format!("{s:?} is not a number of threads"))?;
    let max = max_jobs();
    match NonZeroUsize::new(n) {
        None => Err("--jobs must be at least 1 (leave it out to use every core)".into()),
        Some(_) if n > max => Err(format!(
            "{n} threads is more than the maximum of {max} (four per core, at most 1024); leave --jobs out to use every core"
        )),
        Some(j) => Ok(j),
    }
}

/// Parses `--dest`: a directory, a `file://` URL of one (the `nix copy --to` habit), an
/// `s3://bucket/prefix?...` URL, or a cache on another machine: `ssh://[USER@]HOST[:PORT]/DIR`,
/// the scp form `[USER@]HOST:DIR`, or `http(s)://HOST[:PORT][/PREFIX]`. Other schemes,
/// settings in a file:// URL and a host in one get a sentence.
pub fn parse_dest(s: &str) -> Result<Dest, String> {
    if s.is_empty() {
        return Err(
            "--dest is empty: give the cache directory (or file:///DIR, or s3://BUCKET/PREFIX)".into()
        );
    }
    let Some((scheme, rest)) = s.split_once("://") else {
        // `[USER@]HOST:DIR`, as scp and rsync take it: pushed over ssh.
        if let Some((host, dir)) = scp_form(s) {
            return RemoteUrl::scp(host, dir)
                .map(|u| Dest::Remote(RemoteDest::new(u)))
                .map_err(|e| format!("{e}; for a local directory with a colon in its name, write ./{s}"));
        }
        return Ok(Dest::Dir(PathBuf::from(s)));
    };
    match scheme {
        "file" if rest.contains('?') => Err(format!(
            "{s:?}: nixcache reads no settings from the URL; use its flags (-c/--compression, --priority, ...) and --dest file://{}",
            rest.split('?').next().unwrap_or_default()
        )),
        "file" if rest.is_empty() => Err("file:// needs a directory: file:///var/cache/nix".into()),
        "file" => {
            // file://HOST/DIR: the part before the first slash is a host, never a directory.
            let (host, dir) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            match host {
                "" | "localhost" if !dir.is_empty() => Ok(Dest::Dir(PathBuf::from(dir))),
                _ => Err(format!(
                    "{s:?} names the host {host:?} (file://HOST/DIR); a directory on this machine is file:///{rest} (three slashes) or just /{rest}"
                )),
            }
        }
        "s3" => s.parse().map(Dest::Bucket),
        "http" | "https" => RemoteUrl::http(s).map(|u| Dest::Remote(RemoteDest::new(u))),
        "ssh" => RemoteUrl::ssh(s).map(|u| Dest::Remote(RemoteDest::new(u))),
        "ssh-ng" => Err(format!(
            "{s:?}: nixcache pushes over ssh://HOST/DIR (it runs nixcache receive there); ssh-ng:// is Nix's store protocol"
        )),
        _ => Err(format!(
            "{s:?}: nixcache writes a cache directory (or file:///dir), an S3 bucket (s3://bucket/prefix), or a cache on another machine (ssh://HOST/DIR, HOST:DIR, http://HOST:PORT); {scheme}:// is not supported"
        )),
    }
}

/// `HOST:DIR` as scp and rsync take it (`root@pi:/var/cache`, `pi:cache`): a colon before any
/// slash, with something before it. Returns the host and the directory.
fn scp_form(s: &str) -> Option<(&str, &str)> {
    let colon = s.find(':')?;
    let slash = s.find('/').unwrap_or(usize::MAX);
    (colon > 0 && colon < slash).then(|| (&s[..colon], &s[colon + 1..]))
}

/// Parses `--skip-upstream`: an http://, https:// or file:/// URL of a binary cache.
pub(super) fn parse_upstream(s: &str) -> Result<String, String> {
    let ok = s.starts_with("http://") && s.len() > 7
        || s.starts_with("https://") && s.len() > 8
        || s.strip_prefix("file://").is_some_and(|d| d.starts_with('/'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a binary cache URL: give http://HOST/..., https://HOST/... or file:///DIR (as substituters spells it)"
        ))
    }
}

/// Parses `-c/--compression`, with the values for completions and `--help` but without
/// clap's did-you-mean (which offers bzip2 for gzip).
#[derive(Clone)]
pub(super) struct CompressionParser;

impl clap::builder::TypedValueParser for CompressionParser {
    type Value = Compression;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Compression, clap::Error> {
        let s = value.to_string_lossy();
        s.parse().map_err(|_| {
            cmd.clone().error(
                clap::error::ErrorKind::InvalidValue,
                format!("nixcache compresses NARs with xz, bzip2, zstd or none, not {s:?} (xz is the default, zstd the fastest)"),
            )
        })
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        Some(Box::new(Compression::ALL.into_iter().map(|c| clap::builder::PossibleValue::new(c.name()))))
    }
}

/// Parses `--listen`: `ADDR:PORT`, `[::]:PORT`, `HOST:PORT` (localhost), `:PORT` or `PORT`
/// (every IPv4 and IPv6 address for `:PORT`, loopback for `PORT`).
pub fn parse_listen(s: &str) -> Result<Vec<std::net::SocketAddr>, String> {
    use std::net::{SocketAddr, ToSocketAddrs};
    let bad = || {
        format!("{s:?} is not an address to listen on: give PORT, :PORT, HOST:PORT or ADDR:PORT ([::]:5000)")
    };
    if let Ok(port) = s.parse::<u16>() {
        return Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))]);
    }
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| bad())?;
        return Ok(vec![SocketAddr::from(([0u16; 8], port))]);
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    // localhost is loopback; its IPv6 name may not be configured where this runs.
    if let Some(port) = s.strip_prefix("localhost:") {
        let port: u16 = port.parse().map_err(|_| bad())?;
        return Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))]);
    }
    let addrs: Vec<SocketAddr> = s.to_socket_addrs().map_err(|_| bad())?.collect();
    if addrs.is_empty() { Err(bad()) } else { Ok(addrs) }
}

/// A public key as trusted-public-keys spells it, or a file that holds one (as
/// `verify --trusted-public-key` takes it).
pub(super) fn parse_public_key(s: &str) -> Result<crate::signing::PublicKey, String> {
    s.trim().parse().or_else(|e| {
        let from_file = std::fs::read_to_string(s).ok().and_then(|text| text.trim().parse().ok());
        from_file.ok_or_else(|| {
            format!(
                "{e}; give a public key as trusted-public-keys spells it, NAME:BASE64 (cache.nixos.org-1:6NCH...), or a file holding one"
            )
        })
    })
}

/// The most threads `--jobs` may ask for: four per core, at most 1024.
pub fn max_jobs() -> usize {
    (4 * std::thread::available_parallelism().map_or(1, usize::from)).min(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dest_takes_directories_file_urls_and_remote_caches() {
        let dir = |s: &str| match parse_dest(s) {
            Ok(Dest::Dir(d)) => d,
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(dir("/var/cache"), PathBuf::from("/var/cache"));
        assert_eq!(dir("file:///var/cache"), PathBuf::from("/var/cache"));
        assert_eq!(dir("file://localhost/var/cache"), PathBuf::from("/var/cache"));
        assert_eq!(dir("./a:b"), PathBuf::from("./a:b"));
        assert_eq!(dir("cache"), PathBuf::from("cache"));
        let remote = |s: &str| match parse_dest(s) {
            Ok(Dest::Remote(r)) => r.url,
            other => panic!("{s}: {other:?}"),
        };
        let ssh = |target: &str, port, path: &str, scp| RemoteUrl::Ssh {
            target: target.into(),
            port,
            path: path.into(),
            scp,
        };
        assert_eq!(remote("root@pi:/var/cache"), ssh("root@pi", None, "/var/cache", true));
        assert_eq!(remote("pi:cache"), ssh("pi", None, "cache", true));
        assert_eq!(
            remote("ssh://root@pi:2222/var/my%20cache"),
            ssh("root@pi", Some(2222), "/var/my cache", false)
        );
        assert_eq!(remote("ssh://[::1]:22/c"), ssh("::1", Some(22), "/c", false));
        assert_eq!(remote("http://pi:5000/"), RemoteUrl::Http("http://pi:5000".into()));
        assert_eq!(
            remote("https://cache.example/prefix"),
            RemoteUrl::Http("https://cache.example/prefix".into())
        );
        // Said back as given.
        for s in ["root@pi:/var/cache", "ssh://root@pi:2222/var/c", "http://pi:5000"] {
            assert_eq!(remote(s).to_string(), s);
        }
        for bad in [
            "file://tmp/x",
            "file://host",
            "",
            "pi:",
            "ssh://pi",
            "ssh://pi/",
            "http://x/?secret-key=k",
            "ssh-ng://pi",
            "ftp://x/y",
        ] {
            assert!(parse_dest(bad).is_err(), "{bad}");
        }
        assert!(parse_dest("file://tmp/x").unwrap_err().contains("file:///tmp/x"));
        assert_eq!(scp_form("root@pi:/srv"), Some(("root@pi", "/srv")));
        assert_eq!(scp_form("/a:b"), None);
        assert_eq!(scp_form(":x"), None);
    }

    #[test]
    fn listen_takes_a_port_a_colon_port_localhost_and_addresses() {
        use std::net::SocketAddr;
        let one = |s: &str| parse_listen(s).unwrap();
        assert_eq!(one("5000"), vec![SocketAddr::from(([127, 0, 0, 1], 5000))]);
        assert_eq!(one(":5000"), vec![SocketAddr::from(([0u16; 8], 5000))]);
        assert_eq!(one("localhost:5000"), vec![SocketAddr::from(([127, 0, 0, 1], 5000))]);
        assert_eq!(one("[::]:80"), vec!["[::]:80".parse().unwrap()]);
        assert_eq!(one("0.0.0.0:80"), vec!["0.0.0.0:80".parse().unwrap()]);
        for bad in ["", ":", "x:y", "70000", "host.invalid.:5000:1"] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn upstreams_are_cache_urls() {
        for good in ["http://x", "https://cache.nixos.org", "file:///srv/cache"] {
            assert!(parse_upstream(good).is_ok(), "{good}");
        }
        for bad in ["cache.nixos.org", "file://relative", "http://", "s3://b"] {
            assert!(parse_upstream(bad).is_err(), "{bad}");
        }
    }
}
