//! The `s3://` URL of a bucket cache, as Nix spells it.

use std::fmt;
use std::str::FromStr;

use super::DEFAULT_UPLOADS;

/// `s3://bucket/prefix?endpoint=...&region=...&profile=...&addressing-style=...`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketUrl {
    pub bucket: String,
    /// The key prefix, without leading or trailing slashes; empty for the bucket's root.
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: String,
    pub profile: Option<String>,
    pub addressing: Addressing,
    /// Parts in flight at once.
    pub uploads: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addressing {
    /// Path style for a custom endpoint, virtual-hosted for AWS.
    Auto,
    Path,
    Virtual,
}

impl fmt::Display for BucketUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}", self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        Ok(())
    }
}

impl FromStr for BucketUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix("s3://").ok_or_else(|| format!("{s:?} is not an s3:// URL"))?;
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        if bucket.is_empty() {
            return Err(format!("{s:?} names no bucket: s3://BUCKET/PREFIX"));
        }
        let mut url = BucketUrl {
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            endpoint: None,
            region: "us-east-1".to_owned(),
            profile: None,
            addressing: Addressing::Auto,
            uploads: DEFAULT_UPLOADS,
        };
        if url.prefix.split('/').any(|c| c == "." || c == "..") || url.prefix.contains("//") {
            return Err(format!("{s:?}: the key prefix may not have empty, . or .. components"));
        }
        let mut scheme = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match k {
                "endpoint" => url.endpoint = Some(v),
                "region" => url.region = v,
                "profile" => url.profile = Some(v),
                "scheme" => scheme = Some(v),
                "addressing-style" => {
                    url.addressing = match v.as_str() {
                        "auto" => Addressing::Auto,
                        "path" => Addressing::Path,
                        "virtual" => Addressing::Virtual,
                        _ => return Err(format!("addressing-style={v}: use auto, path or virtual")),
                    }
                }
                _ => {
                    return Err(format!(
                        "{s:?}: nixcache reads only endpoint, region, profile, scheme and addressing-style from an s3:// URL; `{k}` is a Nix store setting: use nixcache's flags (-c/--compression, --priority, ...)"
                    ));
                }
            }
        }
        // Nix takes a bare host in `endpoint` with `scheme`; a full URL says its own.
        if let Some(e) = &url.endpoint
            && !e.contains("://")
        {
            url.endpoint = Some(format!("{}://{e}", scheme.as_deref().unwrap_or("https")));
        }
        Ok(url)
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(super) fn url_encode_path(key: &str) -> String {
    let mut out = String::new();
    for b in key.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_urls() {
        let u: BucketUrl = "s3://b/some/prefix/?endpoint=http://127.0.0.1:9000&region=eu-1".parse().unwrap();
        assert_eq!((u.bucket.as_str(), u.prefix.as_str()), ("b", "some/prefix"));
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(u.region, "eu-1");
        assert_eq!(u.to_string(), "s3://b/some/prefix");
        let bare: BucketUrl =
            "s3://b?endpoint=minio.local:9000&scheme=http&addressing-style=path".parse().unwrap();
        assert_eq!(bare.endpoint.as_deref(), Some("http://minio.local:9000"));
        assert_eq!(
            (bare.prefix.as_str(), bare.addressing, bare.region.as_str()),
            ("", Addressing::Path, "us-east-1")
        );
        assert!("s3://b?compression=zstd".parse::<BucketUrl>().unwrap_err().contains("--compression"));
        assert!("s3:///x".parse::<BucketUrl>().is_err());
        assert!("s3://b/../x".parse::<BucketUrl>().is_err());
        assert!("s3://b?addressing-style=odd".parse::<BucketUrl>().is_err());
        let enc: BucketUrl = "s3://b?endpoint=http%3A%2F%2Fh%3A1".parse().unwrap();
        assert_eq!(enc.endpoint.as_deref(), Some("http://h:1"));
    }
}
