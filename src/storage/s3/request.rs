//! A request to a bucket as a value: its operation, key, query, headers, body and the
//! statuses that answer it. Built by the modules of each operation, checked by their unit
//! tests without a server, sent by [`super::client::Client::send`].

use std::fs::File;
use std::io::{self, Seek};

use rusty_s3::Method;

/// An answer, its body not yet read.
pub(super) type Response = ureq::http::Response<ureq::Body>;

/// What a request does. Its name is the key of its count in `requests` (the summary line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    List,
    ListUploads,
    Head,
    Get,
    Put,
    Delete,
    Copy,
    CreateMultipart,
    UploadPart,
    CopyPart,
    CompleteMultipart,
    AbortMultipart,
}

impl Op {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Op::List => "list",
            Op::ListUploads => "list-uploads",
            Op::Head => "head",
            Op::Get => "get",
            Op::Put => "put",
            Op::Delete => "delete",
            Op::Copy => "copy",
            Op::CreateMultipart => "create-multipart",
            Op::UploadPart => "upload-part",
            Op::CopyPart => "copy-part",
            Op::CompleteMultipart => "complete-multipart",
            Op::AbortMultipart => "abort-multipart",
        }
    }

    pub(super) fn method(self) -> Method {
        match self {
            Op::List | Op::ListUploads | Op::Get => Method::Get,
            Op::Head => Method::Head,
            Op::Put | Op::Copy | Op::UploadPart | Op::CopyPart => Method::Put,
            Op::CreateMultipart | Op::CompleteMultipart => Method::Post,
            Op::Delete | Op::AbortMultipart => Method::Delete,
        }
    }
}

/// What a request sends.
#[derive(Clone, Copy, Debug)]
pub(super) enum Body<'a> {
    None,
    Bytes(&'a [u8]),
    /// The whole of a file, read from its start on every try.
    File(&'a File),
}

/// One request: sent (and signed) again as it is on every try.
#[derive(Clone, Debug)]
pub(super) struct Request<'a> {
    pub(super) op: Op,
    /// The object's key (with the prefix); `None` for the bucket.
    pub(super) key: Option<&'a str>,
    pub(super) query: Vec<(&'a str, &'a str)>,
    /// Sent and signed; names in lowercase.
    pub(super) headers: Vec<(&'a str, &'a str)>,
    pub(super) body: Body<'a>,
    /// The statuses that answer it; any other is an error.
    pub(super) ok: &'static [u16],
}

impl<'a> Request<'a> {
    /// `op` on the object `key`, answered by 200.
    pub(super) fn object(op: Op, key: &'a str) -> Self {
        Request { op, key: Some(key), query: Vec::new(), headers: Vec::new(), body: Body::None, ok: &[200] }
    }

    /// `op` on the bucket itself, answered by 200.
    pub(super) fn bucket(op: Op) -> Self {
        Request { op, key: None, query: Vec::new(), headers: Vec::new(), body: Body::None, ok: &[200] }
    }

    pub(super) fn query(mut self, name: &'a str, value: &'a str) -> Self {
        self.query.push((name, value));
        self
    }

    pub(super) fn header(mut self, name: &'a str, value: &'a str) -> Self {
        self.headers.push((name, value));
        self
    }

    pub(super) fn body(mut self, body: Body<'a>) -> Self {
        self.body = body;
        self
    }

    pub(super) fn ok(mut self, ok: &'static [u16]) -> Self {
        self.ok = ok;
        self
    }

    /// Whether `name` is sent with `value` in the query.
    #[cfg(test)]
    pub(super) fn has_query(&self, name: &str, value: &str) -> bool {
        self.query.contains(&(name, value))
    }

    /// The value of header `name`, if it is sent.
    #[cfg(test)]
    pub(super) fn header_value(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_keep_their_counted_names_and_methods() {
        assert_eq!(Op::CopyPart.as_str(), "copy-part");
        assert_eq!(Op::CompleteMultipart.method(), Method::Post);
        assert_eq!(Op::AbortMultipart.method(), Method::Delete);
        assert_eq!(Op::ListUploads.method(), Method::Get);
        let r = Request::object(Op::Put, "k").header("content-type", "text/plain").ok(&[200, 204]);
        assert_eq!(
            (r.key, r.header_value("content-type"), r.ok),
            (Some("k"), Some("text/plain"), &[200, 204][..])
        );
    }
}
