//! What a request to a bucket is: its operation, key, query, headers and body.

use std::fs::File;
use std::io::{self, Seek};

use super::client::Response;

/// What a request sends.
#[derive(Clone, Copy)]
pub(super) enum Body<'a> {
    None,
    Bytes(&'a [u8]),
    /// The whole of a file, read from its start on every try.
    File(&'a File),
}

/// Sends a PUT or POST with its headers and body; a file is sent from its start on every try.
pub(super) fn with_body(
    mut r: ureq::RequestBuilder<ureq::typestate::WithBody>,
    headers: &[(&str, &str)],
    body: Body<'_>,
) -> Result<Response, ureq::Error> {
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    match body {
        Body::Bytes(b) => r.send(b),
        Body::File(mut f) => {
            f.seek(io::SeekFrom::Start(0))?;
            r.send(f)
        }
        Body::None => r.send_empty(),
    }
}
