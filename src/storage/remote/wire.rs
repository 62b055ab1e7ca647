//! What a pusher and a receiver say to each other: over SSH, Nix's upload requests framed on
//! the receiver's standard input and output; over HTTP and SSH alike, the body of nixcache's
//! own "which of these do you have" request ([`HaveRequest`], [`HaveAnswer`]).
//!
//! The framing (version 1) is text headers and exact byte counts, so a body is never
//! escaped or scanned:
//!
//! ```text
//! receiver: nixcache-receive 1\n                      (once, when it is ready)
//! sender:   PUT nar/1b8m....nar.xz 48213\n<48213 bytes>
//! receiver: 201 0\n
//! sender:   GET nix-cache-info 0\n
//! receiver: 200 52\n<52 bytes>                          (404 0\n when missing)
//! sender:   HEAD 0123....narinfo 0\n
//! receiver: 200 0 1043\n                                (a third field: the file's size)
//! sender:   HAVE - 120\n<120 bytes of JSON: a HaveRequest>
//! receiver: 200 3301\n<a HaveAnswer>
//! ```
//!
//! Answers come in the order of the requests; a sender may send several before reading one.
//! A refused request is its HTTP status and a sentence saying why, as the body.

use std::collections::BTreeMap;
use std::io::{self, BufRead, Read, Write};

use serde::{Deserialize, Serialize};

/// The first line a receiver writes.
pub const GREETING: &str = "nixcache-receive 1";

/// The HTTP path of the "have" request on a nixcache server (POST, JSON body).
pub const HAVE_PATH: &str = "/_nixcache/v1/have";

/// What a pusher GETs to read the cache's upstream records, merged (over HTTP with the upload
/// token): a partial push reads them before it decides.
pub const UPSTREAMS_REQUEST: &str = "_nixcache/v1/upstreams";

/// Hash parts asked about in one "have" request, at most.
pub const HAVE_BATCH: usize = 10_000;

/// The longest header line either side reads.
const HEADER_LIMIT: usize = 4096;

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Get,
    Head,
    Put,
    Have,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Head => "HEAD",
            Verb::Put => "PUT",
            Verb::Have => "HAVE",
        }
    }

    fn parse(s: &str) -> Option<Verb> {
        [Verb::Get, Verb::Head, Verb::Put, Verb::Have].into_iter().find(|v| v.as_str() == s)
    }
}

/// A request's header: its body of `len` bytes follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub verb: Verb,
    /// The cache-relative name (`-` for HAVE).
    pub rel: String,
    pub len: u64,
}

/// An answer's header: its body of `len` bytes follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnswerHead {
    pub status: u16,
    pub len: u64,
    /// For HEAD: the file's size.
    pub size: Option<u64>,
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Reads one header line; `None` at the end of the stream.
fn read_line(r: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let n = r.by_ref().take(HEADER_LIMIT as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.pop() != Some(b'\n') {
        return Err(if n > HEADER_LIMIT {
            bad(format!("a header line is longer than {HEADER_LIMIT} bytes"))
        } else {
            io::ErrorKind::UnexpectedEof.into()
        });
    }
    String::from_utf8(line).map(Some).map_err(|_| bad("a header line is not UTF-8".into()))
}

pub fn write_request(w: &mut impl Write, verb: Verb, rel: &str, len: u64) -> io::Result<()> {
    if rel.is_empty() || rel.contains(char::is_whitespace) {
        return Err(bad(format!("{rel:?} cannot be sent as a name")));
    }
    writeln!(w, "{} {rel} {len}", verb.as_str())
}

/// Reads a request's header; `None` when the sender has closed the stream between requests.
pub fn read_request(r: &mut impl BufRead) -> io::Result<Option<RequestHead>> {
    let Some(line) = read_line(r)? else { return Ok(None) };
    let mut parts = line.split(' ');
    let (Some(verb), Some(rel), Some(len), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(format!("{line:?} is not a request (VERB NAME LENGTH)")));
    };
    let verb =
        Verb::parse(verb).ok_or_else(|| bad(format!("{verb:?} is not a request this receiver knows")))?;
    let len = len.parse().map_err(|_| bad(format!("{len:?} is not a length")))?;
    Ok(Some(RequestHead { verb, rel: rel.to_owned(), len }))
}

pub fn write_answer(w: &mut impl Write, status: u16, size: Option<u64>, body: &[u8]) -> io::Result<()> {
    match size {
        Some(s) => writeln!(w, "{status} {} {s}", body.len())?,
        None => writeln!(w, "{status} {}", body.len())?,
    }
    w.write_all(body)
}

pub fn read_answer(r: &mut impl BufRead) -> io::Result<AnswerHead> {
    let line = read_line(r)?.ok_or(io::ErrorKind::UnexpectedEof)?;
    let mut parts = line.split(' ');
    let status = parts.next().and_then(|s| s.parse().ok());
    let len = parts.next().and_then(|s| s.parse().ok());
    let size = parts.next().map(|s| s.parse::<u64>());
    match (status, len, size, parts.next()) {
        (Some(status), Some(len), None, None) => Ok(AnswerHead { status, len, size: None }),
        (Some(status), Some(len), Some(Ok(s)), None) => Ok(AnswerHead { status, len, size: Some(s) }),
        _ => Err(bad(format!("{line:?} is not an answer (STATUS LENGTH [SIZE])"))),
    }
}

/// Reads the greeting; a stream that says something else is not a receiver.
pub fn read_greeting(r: &mut impl BufRead) -> io::Result<()> {
    match read_line(r)? {
        Some(l) if l == GREETING => Ok(()),
        Some(l) if l.starts_with("nixcache-receive ") => Err(bad(format!(
            "the receiver speaks {l:?}, this nixcache {GREETING:?}: install the same version on both"
        ))),
        Some(l) => Err(bad(format!("the remote command printed {l:?} instead of {GREETING:?}"))),
        None => Err(io::ErrorKind::UnexpectedEof.into()),
    }
}

/// "Which of these do you have": hash parts of store paths. With `record`, what the cache
/// has counts as pushed now (gc's window starts again for it), as a push's touch does.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HaveRequest {
    pub hashes: Vec<String>,
    #[serde(default)]
    pub record: bool,
}

/// What a cache holds of one path asked about.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Held {
    /// The narinfo, as it is in the cache.
    pub narinfo: String,
    /// The size of the NAR file it names, if that file is there.
    pub nar_size: Option<u64>,
}

/// The answer: what the cache holds of each hash part asked about that it has a narinfo for.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HaveAnswer {
    pub version: u32,
    pub present: BTreeMap<String, Held>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        write_request(&mut buf, Verb::Put, "nar/x.nar.xz", 3).unwrap();
        buf.extend_from_slice(b"abc");
        write_request(&mut buf, Verb::Head, "x.narinfo", 0).unwrap();
        let mut r = io::Cursor::new(buf);
        let head = read_request(&mut r).unwrap().unwrap();
        assert_eq!(head, RequestHead { verb: Verb::Put, rel: "nar/x.nar.xz".into(), len: 3 });
        let mut body = [0; 3];
        io::Read::read_exact(&mut r, &mut body).unwrap();
        assert_eq!(&body, b"abc");
        assert_eq!(read_request(&mut r).unwrap().unwrap().verb, Verb::Head);
        assert_eq!(read_request(&mut r).unwrap(), None);

        let mut buf = Vec::new();
        write_answer(&mut buf, 200, Some(1043), b"").unwrap();
        write_answer(&mut buf, 404, None, b"no").unwrap();
        let mut r = io::Cursor::new(buf);
        assert_eq!(read_answer(&mut r).unwrap(), AnswerHead { status: 200, len: 0, size: Some(1043) });
        assert_eq!(read_answer(&mut r).unwrap(), AnswerHead { status: 404, len: 2, size: None });
    }

    #[test]
    fn bad_frames_are_errors() {
        for bad in ["PUT x\n", "FETCH x 0\n", "PUT x y\n", "PUT x 1 2\n", "PUT x 1"] {
            assert!(read_request(&mut io::Cursor::new(bad)).is_err(), "{bad:?}");
        }
        let long = format!("GET {} 0\n", "a".repeat(5000));
        assert!(read_request(&mut io::Cursor::new(long)).is_err());
        assert!(write_request(&mut Vec::new(), Verb::Get, "a b", 0).is_err());
        assert!(read_greeting(&mut io::Cursor::new("bash: nixcache: command not found\n")).is_err());
        assert!(read_greeting(&mut io::Cursor::new("nixcache-receive 2\n")).is_err());
        read_greeting(&mut io::Cursor::new(format!("{GREETING}\n"))).unwrap();
    }
}
