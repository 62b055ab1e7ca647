//! Where a remote cache is (`--dest`), and what reaching it takes.

use std::fmt;

/// Where a remote cache is: `--dest http(s)://HOST[:PORT][/PREFIX]`, `ssh://[USER@]HOST[:PORT]/DIR`
/// or `[USER@]HOST:DIR`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteUrl {
    /// The base URL, without a trailing slash.
    Http(String),
    Ssh {
        /// `[USER@]HOST`, as ssh takes it.
        target: String,
        port: Option<u16>,
        /// The cache directory on the remote machine (relative: to the login's home).
        path: String,
        /// Given as `HOST:DIR` (said back the same way).
        scp: bool,
    },
}

impl fmt::Display for RemoteUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RemoteUrl::Http(u) => write!(f, "{u}"),
            RemoteUrl::Ssh { target, path, scp: true, .. } => write!(f, "{target}:{path}"),
            RemoteUrl::Ssh { target, port, path, .. } => {
                let port = port.map(|p| format!(":{p}")).unwrap_or_default();
                let host = if target.contains(':') { format!("[{target}]") } else { target.clone() };
                let slash = if path.starts_with('/') { "" } else { "/" };
                write!(f, "ssh://{host}{port}{slash}{path}")
            }
        }
    }
}

impl RemoteUrl {
    /// `http://`/`https://` URLs: no query, no fragment.
    pub fn http(s: &str) -> Result<RemoteUrl, String> {
        let u = url::Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        if u.query().is_some() || u.fragment().is_some() {
            return Err(format!(
                "{s:?}: nixcache reads no settings from the URL (Nix's ?secret-key= is -k, the token --upload-token-file)"
            ));
        }
        if u.host_str().is_none_or(str::is_empty) {
            return Err(format!("{s:?} names no host"));
        }
        Ok(RemoteUrl::Http(s.trim_end_matches('/').to_owned()))
    }

    /// `ssh://[USER@]HOST[:PORT]/DIR`.
    pub fn ssh(s: &str) -> Result<RemoteUrl, String> {
        let u = url::Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        let host = u.host_str().filter(|h| !h.is_empty()).ok_or_else(|| format!("{s:?} names no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if u.query().is_some() || u.password().is_some() {
            return Err(format!("{s:?}: give ssh options in NIX_SSHOPTS or ~/.ssh/config, not in the URL"));
        }
        let path = percent_decode(u.path());
        if path.is_empty() || path == "/" {
            return Err(format!("{s:?} names no directory: ssh://HOST/var/lib/static-nix-cache"));
        }
        let target =
            if u.username().is_empty() { host.to_owned() } else { format!("{}@{host}", u.username()) };
        Ok(RemoteUrl::Ssh { target, port: u.port(), path, scp: false })
    }

    /// The scp form `[USER@]HOST:DIR`.
    pub fn scp(host: &str, dir: &str) -> Result<RemoteUrl, String> {
        if dir.is_empty() {
            return Err(format!("{host}: names no directory: {host}:/var/lib/static-nix-cache"));
        }
        Ok(RemoteUrl::Ssh { target: host.to_owned(), port: None, path: dir.to_owned(), scp: true })
    }

    /// The host, for the netrc file and messages.
    pub fn host(&self) -> Option<String> {
        match self {
            RemoteUrl::Http(u) => url::Url::parse(u).ok()?.host_str().map(str::to_owned),
            RemoteUrl::Ssh { target, .. } => Some(target.rsplit('@').next().unwrap_or(target).to_owned()),
        }
    }
}

/// `%XX` escapes decoded (a URL's path as the user typed it, spaces and all).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).and_then(|&c| hex(c)), b.get(i + 2).and_then(|&c| hex(c))) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How to reach a remote cache: where, and with what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteDest {
    pub url: RemoteUrl,
    /// The `Authorization` header an HTTP receiver is sent, if any.
    pub auth: Option<Auth>,
    /// The program run on the far side of SSH (`--remote-program`).
    pub program: String,
}

impl RemoteDest {
    pub fn new(url: RemoteUrl) -> RemoteDest {
        RemoteDest { url, auth: None, program: "nixcache".into() }
    }
}

/// Credentials for an HTTP receiver.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// A token (`--upload-token-file`), sent as `Authorization: Bearer`.
    Bearer(String),
    /// A login and password from a netrc file, as Nix sends them (HTTP Basic).
    Basic { login: String, password: String },
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::Bearer(_) => write!(f, "Bearer(..)"),
            Auth::Basic { login, .. } => write!(f, "Basic({login}, ..)"),
        }
    }
}
