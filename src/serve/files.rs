//! What a request names, and the answer a static file server gives for it: the cache file a
//! request path maps to, its Content-Type and Cache-Control (as `examples/nginx/nixcache.conf`
//! sets them), and the conditional and Range handling of RFC 9110 for one file. Pure: no I/O.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::layout::{self, CACHE_INFO};
use crate::nixbase32;

/// The kinds of file a cache serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    CacheInfo,
    NarInfo,
    Nar,
    Listing,
    Log,
    DebugInfo,
    Realisation,
}

impl Kind {
    /// As Nix writes them to a binary cache.
    pub fn content_type(self) -> &'static str {
        match self {
            Kind::CacheInfo => "text/x-nix-cache-info",
            Kind::NarInfo => "text/x-nix-narinfo",
            Kind::Nar => "application/x-nix-nar",
            Kind::Listing | Kind::DebugInfo | Kind::Realisation => "application/json",
            Kind::Log => "text/plain; charset=utf-8",
        }
    }

    /// A narinfo can change (a re-sign, a gc, a repair), so it is short-lived; a NAR is named
    /// by the hash of its contents and never changes.
    pub fn cache_control(self) -> &'static str {
        match self {
            Kind::CacheInfo => "public, max-age=3600",
            Kind::Nar => "public, max-age=31536000, immutable",
            Kind::NarInfo | Kind::Listing | Kind::DebugInfo | Kind::Realisation | Kind::Log => {
                "public, max-age=300"
            }
        }
    }
}

/// A request path that names a cache file: the cache-relative name and its kind.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    pub rel: String,
    pub kind: Kind,
    /// For a narinfo, the hash part it is for (what a lazy server fills).
    pub hash: Option<String>,
}

/// Maps the path of a request (as sent: percent-encoded, without the query) to the cache
/// file it names, or `None`: the request names nothing a client may read, and is answered 404.
///
/// The path is decoded once, then must be exactly `/<name>` or `/<subdir>/<name>`: no empty,
/// `.` or `..` component, no NUL or backslash, no name starting with `.` (the writers' lock,
/// temporary files, `.nixcache/`), only the names Nix asks for at the top.
pub fn target(path: &str) -> Option<Target> {
    let decoded = percent_decode(path)?;
    let rest = decoded.strip_prefix('/')?;
    if rest.contains(['\0', '\\']) {
        return None;
    }
    let plain = |c: &str| !c.is_empty() && !c.starts_with('.');
    let parts: Vec<&str> = rest.split('/').collect();
    let (kind, hash) = match parts[..] {
        [CACHE_INFO] => (Kind::CacheInfo, None),
        [name] => {
            let (stem, kind) = if let Some(stem) = layout::hash_of_narinfo(name) {
                (stem, Kind::NarInfo)
            } else if let Some(stem) = layout::hash_of_listing(name) {
                (stem, Kind::Listing)
            } else {
                return None;
            };
            if stem.len() != 32 || !nixbase32::is_nix32(stem) {
                return None;
            }
            (kind, (kind == Kind::NarInfo).then(|| stem.to_owned()))
        }
        [sub, name] if plain(name) => {
            let kind = match sub {
                "nar" => Kind::Nar,
                "log" => Kind::Log,
                "debuginfo" => Kind::DebugInfo,
                "realisations" => Kind::Realisation,
                _ => return None,
            };
            (kind, None)
        }
        _ => return None,
    };
    Some(Target { rel: rest.to_owned(), kind, hash })
}

/// Decodes `%XX` escapes; `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_owned());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A file's validators: its ETag (as nginx makes it, from the modification time and size)
/// and Last-Modified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validators {
    pub etag: String,
    pub last_modified: String,
    /// The modification time in whole seconds, which is what Last-Modified can say.
    modified: SystemTime,
}

impl Validators {
    pub fn new(modified: SystemTime, size: u64) -> Validators {
        let secs = modified.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let modified = UNIX_EPOCH + Duration::from_secs(secs);
        Validators {
            etag: format!("\"{secs:x}-{size:x}\""),
            last_modified: httpdate::fmt_http_date(modified),
            modified,
        }
    }

    /// Whether a request with these `If-None-Match` and `If-Modified-Since` headers already
    /// has the file (a 304): If-None-Match decides when present, as RFC 9110 says.
    pub fn not_modified(&self, if_none_match: Option<&str>, if_modified_since: Option<&str>) -> bool {
        if let Some(inm) = if_none_match {
            return inm
                .split(',')
                .map(str::trim)
                .any(|t| t == "*" || t.trim_start_matches("W/") == self.etag);
        }
        if_modified_since
            .and_then(|d| httpdate::parse_http_date(d).ok())
            .is_some_and(|since| self.modified <= since)
    }

    /// Whether an `If-Range` value still names this file, so a Range applies.
    pub fn if_range_holds(&self, if_range: &str) -> bool {
        let v = if_range.trim();
        v == self.etag || v == self.last_modified
    }
}

/// What a Range header asks of a file of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Range {
    /// No range asked (absent, not `bytes=`, or empty): the whole file.
    Whole,
    /// Bytes `start..=end`.
    Part { start: u64, end: u64 },
    /// Malformed, or nothing of the file can be sent: 416.
    Unsatisfiable,
}

impl Range {
    /// Parses a `Range` header for a file of `size` bytes, answering as nginx does (checked
    /// against nginx 1.22 in the tests): a header not starting `bytes=`, or `bytes=` alone,
    /// is no range; a malformed one (a part that is not `[digits]-[digits]`, an empty part, a
    /// number that overflows) is 416; of several ranges the first satisfiable one is sent
    /// alone (nginx sends them all as multipart/byteranges; one is what RFC 9110 allows), and
    /// none satisfiable is 416.
    pub fn parse(header: Option<&str>, size: u64) -> Range {
        let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else { return Range::Whole };
        if spec.trim().is_empty() {
            return Range::Whole;
        }
        let num = |s: &str| -> Result<Option<u64>, ()> {
            if s.is_empty() {
                Ok(None)
            } else if s.bytes().all(|b| b.is_ascii_digit()) {
                s.parse().map(Some).map_err(|_| ())
            } else {
                Err(())
            }
        };
        let mut first = None;
        for part in spec.split(',') {
            let Some((a, b)) = part.trim().split_once('-') else { return Range::Unsatisfiable };
            let (Ok(a), Ok(b)) = (num(a), num(b)) else { return Range::Unsatisfiable };
            let satisfiable = match (a, b) {
                (None, None) => return Range::Unsatisfiable,
                (None, Some(0)) => None,
                (None, Some(n)) => (size > 0).then(|| (size - n.min(size), size - 1)),
                (Some(s), None) => (s < size).then(|| (s, size - 1)),
                (Some(s), Some(e)) => (s <= e && s < size).then(|| (s, e.min(size - 1))),
            };
            if first.is_none() {
                first = satisfiable;
            }
        }
        match first {
            Some((start, end)) => Range::Part { start, end },
            None => Range::Unsatisfiable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "0c8dsnyf2wrgqk2kqv6fdcw8f8w0asgh";

    #[test]
    fn targets_are_the_files_nix_asks_for() {
        let t = target(&format!("/{H}.narinfo")).unwrap();
        assert_eq!(
            (t.rel.as_str(), t.kind, t.hash.as_deref()),
            (&*format!("{H}.narinfo"), Kind::NarInfo, Some(H))
        );
        assert_eq!(target("/nix-cache-info").unwrap().kind, Kind::CacheInfo);
        assert_eq!(target(&format!("/{H}.ls")).unwrap().kind, Kind::Listing);
        assert_eq!(target("/nar/1abc.nar.xz").unwrap().kind, Kind::Nar);
        assert_eq!(target("/log/abc-foo.drv").unwrap().kind, Kind::Log);
        assert_eq!(target("/debuginfo/0123.debug").unwrap().kind, Kind::DebugInfo);
        assert_eq!(target("/realisations/sha256:x!out.doi").unwrap().kind, Kind::Realisation);
        // An encoded slash decodes to the same file: harmless.
        assert_eq!(target("/nar%2F1abc.nar.xz").unwrap().rel, "nar/1abc.nar.xz");
    }

    #[test]
    fn nothing_else_is_a_target() {
        for p in [
            "/",
            "",
            "nix-cache-info",
            "//nix-cache-info",
            "/nix-cache-info/",
            "/../etc/passwd",
            "/nar/../../etc/passwd",
            "/%2e%2e/etc/passwd",
            "/nar/%2e%2e",
            "/nar%2f..%2f..%2fetc%2fpasswd",
            "/nar/",
            "/nar//x",
            "/nar/.",
            "/nar/..",
            "/nar/.nixcache-tmp-1.nar.xz",
            "/.nixcache.lock",
            "/.nixcache/pushes/x",
            "/nar/a/b",
            "/etc/passwd",
            "/%00.narinfo",
            "/nar/x%00y",
            "/nar/x\\..\\y",
            "/nar/%zz",
            "/nar/%c3%28",
            "/README",
            "/x.narinfo",
            &format!("/{}.narinfo", &H[..31]),
            &format!("/{}e.narinfo", &H[..31]), // e is not a nixbase32 digit
            &format!("/{H}.narinfo.xz"),
            &format!("//{H}.narinfo"),
            &format!("/nar/../{H}.narinfo"),
        ] {
            assert_eq!(target(p), None, "{p}");
        }
    }

    #[test]
    fn ranges() {
        let r = |h: &str, size| Range::parse(Some(h), size);
        assert_eq!(Range::parse(None, 10), Range::Whole);
        assert_eq!(r("bytes=0-4", 10), Range::Part { start: 0, end: 4 });
        assert_eq!(r("bytes=5-", 10), Range::Part { start: 5, end: 9 });
        assert_eq!(r("bytes=5-100", 10), Range::Part { start: 5, end: 9 });
        assert_eq!(r("bytes=-3", 10), Range::Part { start: 7, end: 9 });
        assert_eq!(r("bytes=-30", 10), Range::Part { start: 0, end: 9 });
        assert_eq!(r("bytes=10-", 10), Range::Unsatisfiable);
        assert_eq!(r("bytes=-0", 10), Range::Unsatisfiable);
        assert_eq!(r("bytes=0-", 0), Range::Unsatisfiable);
        assert_eq!(r("bytes=+1-2", 10), Range::Unsatisfiable);
    }

    /// What nginx 1.22 answered for each header on a file of 14,000,112 bytes (`curl -H
    /// "Range: ..."`): the status, and the range sent (206) or none.
    #[test]
    fn ranges_as_nginx_answers_them() {
        const SIZE: u64 = 14_000_112;
        let part = |start, end| Range::Part { start, end };
        for (header, want) in [
            ("bytes=0-99", part(0, 99)),
            ("bytes=-100", part(14_000_012, 14_000_111)),
            ("bytes=100-", part(100, 14_000_111)),
            ("bytes=5-2", Range::Unsatisfiable),
            ("bytes=abc", Range::Unsatisfiable),
            ("bytes=", Range::Whole),
            ("bytes=0-99,200-299", part(0, 99)),
            ("bytes=0-99, 200-299", part(0, 99)),
            ("bytes=0-99 ,200-299", part(0, 99)),
            ("bytes=99999999-", Range::Unsatisfiable),
            ("bytes=-0", Range::Unsatisfiable),
            ("items=0-5", Range::Whole),
            ("bytes = 0-99", Range::Whole),
            ("bytes=-99999999", part(0, 14_000_111)),
            ("bytes=0-99999999", part(0, 14_000_111)),
            ("bytes=14000112-", Range::Unsatisfiable),
            ("bytes=14000111-", part(14_000_111, 14_000_111)),
            ("bytes=1-2-3", Range::Unsatisfiable),
            ("bytes=0-99,abc", Range::Unsatisfiable),
            ("bytes=-", Range::Unsatisfiable),
            ("bytes=0x-5", Range::Unsatisfiable),
            ("bytes=,0-5", Range::Unsatisfiable),
            ("bytes=0-5,", Range::Unsatisfiable),
            ("bytes=99999999-,0-5", part(0, 5)),
            ("bytes=5-2,0-5", part(0, 5)),
            ("bytes= 0-99", part(0, 99)),
            ("bytes=00-01", part(0, 1)),
            ("bytes=18446744073709551616-", Range::Unsatisfiable),
            ("bytes=0-18446744073709551616", Range::Unsatisfiable),
        ] {
            assert_eq!(Range::parse(Some(header), SIZE), want, "{header}");
        }
    }

    #[test]
    fn validators() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_500);
        let v = Validators::new(t, 300);
        assert_eq!(v.etag, "\"6553f100-12c\"");
        assert_eq!(v.last_modified, "Tue, 14 Nov 2023 22:13:20 GMT");
        assert!(v.not_modified(Some("\"6553f100-12c\""), None));
        assert!(v.not_modified(Some("\"x\", W/\"6553f100-12c\""), None));
        assert!(v.not_modified(Some("*"), None));
        assert!(!v.not_modified(Some("\"x\""), Some("Tue, 14 Nov 2023 22:13:20 GMT")));
        assert!(v.not_modified(None, Some("Tue, 14 Nov 2023 22:13:20 GMT")));
        assert!(!v.not_modified(None, Some("Tue, 14 Nov 2023 22:13:19 GMT")));
        assert!(!v.not_modified(None, Some("not a date")));
        assert!(v.if_range_holds("\"6553f100-12c\"") && v.if_range_holds("Tue, 14 Nov 2023 22:13:20 GMT"));
        assert!(!v.if_range_holds("\"6553f100-12d\""));
    }
}
