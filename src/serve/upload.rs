//! Uploads (`serve --upload-token-file`): the PUTs Nix's `nix copy --to http://HOST` sends
//! (`nix-cache-info`, `nar/...`, `<hash>.ls`, then `<hash>.narinfo` last), taken from a client
//! with a token, each checked by the [`Receiver`] before anything is visible.

use std::sync::Arc;

use base64::Engine;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use super::{Body, Shared, files, status};
use crate::receive::{Receiver, Refused, Upload};
use crate::storage::remote::wire::HaveRequest;

/// The largest "have" question read.
const HAVE_LIMIT: u64 = 64 << 20;

/// Who may upload (the tokens of `--upload-token-file`, one a line), and where it goes.
pub struct Uploads {
    pub tokens: Tokens,
    pub receiver: Receiver,
}

/// Tokens a request may carry (`--upload-token-file`, `--read-token-file`).
pub struct Tokens(pub Vec<String>);

impl Tokens {
    /// Whether the request carries one of the tokens: as the password of HTTP Basic
    /// authentication (what Nix sends from its netrc file) or as a Bearer token. Every token
    /// is compared, each in constant time.
    pub fn authorized<B>(&self, req: &Request<B>) -> bool {
        let Some(value) = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let sent = if let Some(b) = value.strip_prefix("Basic ") {
            let decoded = base64::engine::general_purpose::STANDARD.decode(b.trim()).unwrap_or_default();
            match String::from_utf8(decoded).ok().and_then(|t| t.split_once(':').map(|(_, p)| p.to_owned())) {
                Some(p) => p,
                None => return false,
            }
        } else if let Some(t) = value.strip_prefix("Bearer ") {
            t.trim().to_owned()
        } else {
            return false;
        };
        self.0.iter().fold(false, |found, t| found | same(t.as_bytes(), sent.as_bytes()))
    }
}

/// The answer to a request without a token that is wanted: 401, asking for Basic
/// authentication (Nix then sends its netrc file's password).
pub(super) fn unauthorized(what: &str) -> Response<Body> {
    let mut r = status(
        StatusCode::UNAUTHORIZED,
        &format!(
            "{what} need a token: the password of HTTP Basic authentication (Nix's netrc-file) or a Bearer token\n"
        ),
    );
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"nixcache\""));
    r
}

/// Whether `a` and `b` are equal, in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads the lines of a token file: one token a line, blank lines and `#` comments passed over.
pub fn read_tokens(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect()
}

fn refused(e: &Refused) -> Response<Body> {
    let code = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
    status(code, &format!("{}\n", crate::util::error_chain(e)))
}

/// Hands each piece of a request's body to `take`, in order; a body that breaks off is
/// [`Refused::CutShort`].
async fn each_piece(
    body: &mut Incoming,
    declared: Option<u64>,
    mut take: impl FnMut(&[u8]) -> Result<(), Refused>,
) -> Result<(), Refused> {
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(Refused::CutShort { got, declared: declared.unwrap_or(got) });
        };
        if let Ok(data) = frame.into_data() {
            got += data.len() as u64;
            take(&data)?;
        }
    }
    Ok(())
}

/// The answer to a request that may not write: uploads are off (405) or it has no token (401).
fn not_allowed(shared: &Shared, req: &Request<Incoming>) -> Option<Response<Body>> {
    let Some(uploads) = &shared.uploads else {
        let mut r =
            status(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD: this server takes no uploads\n");
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Some(r);
    };
    if !uploads.tokens.authorized(req) {
        return Some(unauthorized("uploads"));
    }
    None
}

/// Answers nixcache's "which of these do you have" (POST [`crate::storage::remote::wire::HAVE_PATH`], JSON), asked
/// by a pusher with a token: with `record`, the paths found count as pushed now.
pub(super) async fn have(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    if let Some(r) = not_allowed(shared, &req) {
        return r;
    }
    let mut body = req.into_body();
    let mut buf = Vec::new();
    let read = each_piece(&mut body, None, |piece| {
        buf.extend_from_slice(piece);
        if buf.len() as u64 > HAVE_LIMIT { Err(Refused::TooLarge { limit: HAVE_LIMIT }) } else { Ok(()) }
    });
    if let Err(e) = read.await {
        return refused(&e);
    }
    let question: HaveRequest = match serde_json::from_slice(&buf) {
        Ok(q) => q,
        Err(e) => return refused(&Refused::BadNarInfo(format!("the question does not parse: {e}"))),
    };
    let shared = shared.clone();
    let answered = tokio::task::spawn_blocking(move || {
        let Some(uploads) = &shared.uploads else { unreachable!("uploads are on") };
        uploads.receiver.have(&question)
    })
    .await;
    match answered {
        Ok(Ok(a)) => {
            let mut r = status(StatusCode::OK, "");
            *r.body_mut() = Body::bytes(serde_json::to_vec(&a).expect("serializable").into());
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Ok(Err(e)) => refused(&e),
        Err(_) => status(StatusCode::INTERNAL_SERVER_ERROR, "the question's answer failed\n"),
    }
}

/// Answers `GET /_nixcache/v1/upstreams` from a pusher with a token: the cache's upstream
/// records, merged, which a partial push reads before it decides.
pub(super) async fn upstreams(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    if let Some(r) = not_allowed(shared, &req) {
        return r;
    }
    let shared = shared.clone();
    let answered = tokio::task::spawn_blocking(move || {
        let Some(uploads) = &shared.uploads else { unreachable!("uploads are on") };
        uploads.receiver.upstreams()
    })
    .await;
    match answered {
        Ok(Ok(text)) => status(StatusCode::OK, &text),
        Ok(Err(e)) => refused(&e),
        Err(_) => status(StatusCode::INTERNAL_SERVER_ERROR, "the records could not be read\n"),
    }
}

/// Answers a PUT.
pub(super) async fn put(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    if let Some(r) = not_allowed(shared, &req) {
        return r;
    }
    let Some(uploads) = &shared.uploads else { unreachable!("uploads are on") };
    let path = req.uri().path().to_owned();
    // nixcache's own state is no file a client reads (files::target refuses dot names): only
    // an upstreams record, by its strict name.
    let upload = match path.strip_prefix("/.nixcache/") {
        Some(_) => Upload::of(&path[1..]).filter(|u| matches!(u, Upload::Upstreams { .. })),
        None => files::target(&path).and_then(|t| Upload::of(&t.rel)),
    };
    let Some(upload) = upload else {
        return refused(&Refused::NotAnUpload(path));
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = req.into_body();
    let result = match upload {
        Upload::Nar { name, file_hash } => {
            let mut nar = match uploads.receiver.begin_nar(&name, &file_hash, declared) {
                Ok(n) => n,
                Err(e) => return refused(&e),
            };
            if let Err(e) = each_piece(&mut body, declared, |piece| nar.write(piece)).await {
                return refused(&e);
            }
            tokio::task::spawn_blocking(move || nar.finish().map(|()| None)).await
        }
        small => {
            let mut buf = Vec::new();
            let limit = small.limit();
            let read = each_piece(&mut body, declared, |piece| {
                buf.extend_from_slice(piece);
                let too_large = buf.len() as u64 > limit;
                if too_large { Err(Refused::TooLarge { limit }) } else { Ok(()) }
            });
            if let Err(e) = read.await {
                return refused(&e);
            }
            let shared = shared.clone();
            tokio::task::spawn_blocking(move || {
                let Some(uploads) = &shared.uploads else { unreachable!("uploads are on") };
                uploads.receiver.put_small(small, &buf)
            })
            .await
        }
    };
    match result {
        Ok(Ok(published)) => {
            if let Some(p) = published {
                crate::elog!("received {p}");
            }
            status(StatusCode::CREATED, "")
        }
        Ok(Err(e)) => {
            if e.status() >= 500 {
                crate::elog!("error: an upload to {path} failed: {}", crate::util::error_chain(&e));
            }
            refused(&e)
        }
        Err(_) => status(StatusCode::INTERNAL_SERVER_ERROR, "the upload's check failed\n"),
    }
}
