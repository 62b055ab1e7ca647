//! `nixcache receive`: the [`Receiver`] on standard input and output, for a push over SSH
//! (the framing is [`crate::storage::remote::wire`]'s). The SSH login is what lets a pusher
//! in; every upload is checked as `serve` checks it. Nothing but answers is written to
//! standard output.

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};

use super::{Receiver, Refused, Upload};
use crate::cache::Cache;
use crate::layout::FileKind;
use crate::storage::remote::wire::{self, HaveRequest, RequestHead, Verb};

/// The largest "have" question read.
const HAVE_LIMIT: u64 = 64 << 20;

/// An answer: status, the size a HEAD found, body.
type Answer = (u16, Option<u64>, Vec<u8>);

/// Answers requests from `input` on `output` until the sender closes its end. An error is
/// the stream's (it broke, or it is not the protocol); a refused request is an answer.
pub fn run(receiver: &Receiver, input: impl Read, output: impl Write) -> io::Result<()> {
    let mut r = BufReader::with_capacity(256 << 10, input);
    let mut w = BufWriter::with_capacity(64 << 10, output);
    writeln!(w, "{}", wire::GREETING)?;
    w.flush()?;
    let cache = Cache::inspect(receiver.dir()).map_err(io::Error::other)?;
    while let Some(head) = wire::read_request(&mut r)? {
        let (status, size, body) = answer(receiver, &cache, &head, &mut r)?;
        wire::write_answer(&mut w, status, size, &body)?;
        // Requests already here are answered before the answers are sent on.
        if r.buffer().is_empty() {
            w.flush()?;
        }
    }
    w.flush()
}

fn refused(e: &Refused) -> Answer {
    (e.status(), None, format!("{}\n", crate::util::error_chain(e)).into_bytes())
}

/// Reads and drops what is left of a body: the stream stays in step after a refusal.
fn skip(r: &mut impl BufRead, n: u64) -> io::Result<()> {
    let skipped = io::copy(&mut r.take(n), &mut io::sink())?;
    if skipped < n { Err(io::ErrorKind::UnexpectedEof.into()) } else { Ok(()) }
}

/// Reads a body of `n` bytes, at most `limit`; `None` (skipped) when it is longer.
fn body(r: &mut impl BufRead, n: u64, limit: u64) -> io::Result<Option<Vec<u8>>> {
    if n > limit {
        skip(r, n)?;
        return Ok(None);
    }
    let mut buf = Vec::with_capacity(n as usize);
    r.take(n).read_to_end(&mut buf)?;
    if (buf.len() as u64) < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Some(buf))
}

fn answer(
    receiver: &Receiver,
    cache: &Cache,
    head: &RequestHead,
    r: &mut impl BufRead,
) -> io::Result<Answer> {
    let rel = head.rel.as_str();
    match head.verb {
        Verb::Put => put(receiver, rel, head.len, r),
        Verb::Have => {
            let Some(text) = body(r, head.len, HAVE_LIMIT)? else {
                return Ok(refused(&Refused::TooLarge { limit: HAVE_LIMIT }));
            };
            let req: HaveRequest = match serde_json::from_slice(&text) {
                Ok(q) => q,
                Err(e) => {
                    return Ok(refused(&Refused::BadNarInfo(format!("the question does not parse: {e}"))));
                }
            };
            Ok(match receiver.have(&req) {
                Ok(a) => (200, None, serde_json::to_vec(&a).expect("serializable")),
                Err(e) => refused(&e),
            })
        }
        Verb::Get if rel == super::UPSTREAMS_REQUEST => {
            skip(r, head.len)?;
            Ok(match receiver.upstreams() {
                Ok(text) => (200, None, text.into_bytes()),
                Err(e) => refused(&e),
            })
        }
        Verb::Get | Verb::Head => {
            skip(r, head.len)?;
            // What a pusher reads: nix-cache-info, narinfos, listings; never a NAR.
            let readable =
                matches!(FileKind::of(rel), FileKind::CacheInfo | FileKind::NarInfo | FileKind::Listing)
                    && !rel.contains('/');
            if !readable && !matches!(FileKind::of(rel), FileKind::Nar) {
                return Ok(refused(&Refused::NotAnUpload(rel.to_owned())));
            }
            if head.verb == Verb::Head || !readable {
                if head.verb == Verb::Get {
                    return Ok((403, None, b"NARs are not read over this link\n".to_vec()));
                }
                return Ok(match cache.try_stat(rel) {
                    Ok(Some(m)) => (200, Some(m.size), Vec::new()),
                    Ok(None) => (404, None, Vec::new()),
                    Err(e) => (500, None, format!("{rel} {e}\n").into_bytes()),
                });
            }
            Ok(match cache.read_text(rel) {
                Ok(Some(text)) => (200, None, text.into_bytes()),
                Ok(None) => (404, None, Vec::new()),
                Err(e) => (500, None, format!("{rel} {e}\n").into_bytes()),
            })
        }
    }
}

fn put(receiver: &Receiver, rel: &str, len: u64, r: &mut impl BufRead) -> io::Result<Answer> {
    let Some(upload) = Upload::of(rel) else {
        skip(r, len)?;
        return Ok(refused(&Refused::NotAnUpload(rel.to_owned())));
    };
    let result = match upload {
        Upload::Nar { name, file_hash } => {
            let mut nar = match receiver.begin_nar(&name, &file_hash, Some(len)) {
                Ok(n) => n,
                Err(e) => {
                    skip(r, len)?;
                    return Ok(refused(&e));
                }
            };
            let mut left = len;
            while left > 0 {
                let buf = r.fill_buf()?;
                if buf.is_empty() {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                let n = buf.len().min(left as usize);
                let taken = nar.write(&buf[..n]);
                r.consume(n);
                left -= n as u64;
                if let Err(e) = taken {
                    skip(r, left)?;
                    return Ok(refused(&e));
                }
            }
            nar.finish().map(|()| None)
        }
        small => {
            let limit = small.limit();
            let Some(buf) = body(r, len, limit)? else {
                return Ok(refused(&Refused::TooLarge { limit }));
            };
            receiver.put_small(small, &buf)
        }
    };
    Ok(match result {
        Ok(_) => (201, None, Vec::new()),
        Err(e) => refused(&e),
    })
}
