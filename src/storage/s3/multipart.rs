//! Multipart uploads (start, send a part, complete, abort) and server-side copies, which
//! are multipart uploads above the copy limit. The requests are built by plain functions,
//! unit-tested for their shape.

use super::S3Error;
use super::answers::{self, error_code, xml_values};
use super::bucket_url::url_encode_path;
use super::client::{BodyError, Client};
use super::request::{Body, Op, Request};
use crate::layout::content_type;

/// Starts a multipart upload to `key` (the object `rel`).
fn create_request<'a>(key: &'a str, rel: &str) -> Request<'a> {
    Request::object(Op::CreateMultipart, key).query("uploads", "").header("content-type", content_type(rel))
}

/// Part `number` of upload `id`.
fn part_request<'a>(key: &'a str, id: &'a str, number: &'a str, data: &'a [u8]) -> Request<'a> {
    Request::object(Op::UploadPart, key)
        .query("partNumber", number)
        .query("uploadId", id)
        .body(Body::Bytes(data))
}

/// What completes an upload: every part's number and ETag, in order, XML-escaped.
fn complete_body(etags: &[String]) -> String {
    let mut body = String::from("<CompleteMultipartUpload>");
    for (n, etag) in etags.iter().enumerate() {
        let etag = etag.replace('&', "&amp;").replace('"', "&quot;");
        body.push_str(&format!("<Part><PartNumber>{}</PartNumber><ETag>{etag}</ETag></Part>", n + 1));
    }
    body.push_str("</CompleteMultipartUpload>");
    body
}

fn complete_request<'a>(key: &'a str, id: &'a str, body: &'a str) -> Request<'a> {
    Request::object(Op::CompleteMultipart, key).query("uploadId", id).body(Body::Bytes(body.as_bytes()))
}

/// Aborting an upload that is already gone is no error.
fn abort_request<'a>(key: &'a str, id: &'a str) -> Request<'a> {
    Request::object(Op::AbortMultipart, key).query("uploadId", id).ok(&[200, 204, 404])
}

/// Copies `source` (`/bucket/key`, encoded) to `key` (the object `rel`) in one request, with
/// the Content-Type of `rel`.
fn copy_request<'a>(key: &'a str, rel: &str, source: &'a str) -> Request<'a> {
    Request::object(Op::Copy, key)
        .header("content-type", content_type(rel))
        .header("x-amz-copy-source", source)
        .header("x-amz-metadata-directive", "REPLACE")
}

/// Copies the bytes `range` (`bytes=FIRST-LAST`) of `source` as part `number` of upload `id`.
fn copy_part_request<'a>(
    key: &'a str,
    source: &'a str,
    range: &'a str,
    number: &'a str,
    id: &'a str,
) -> Request<'a> {
    Request::object(Op::CopyPart, key)
        .header("x-amz-copy-source", source)
        .header("x-amz-copy-source-range", range)
        .query("partNumber", number)
        .query("uploadId", id)
}

impl Client {
    pub(super) fn create_multipart(&self, rel: &str, key: &str) -> Result<String, S3Error> {
        let what = || format!("starting an upload to {}", self.url_of(rel));
        self.send_with(&create_request(key, rel), &what, |r| {
            let body = Self::body_text(r, 1 << 20)?;
            match xml_values(&body, "UploadId").first().map(|u| answers::xml_unescape(u)) {
                Some(Ok(id)) if !id.is_empty() => Ok(id),
                _ => Err(BodyError::Retry("no UploadId in the answer".into())),
            }
        })
    }

    pub(super) fn upload_part(&self, key: &str, id: &str, n: usize, data: &[u8]) -> Result<String, S3Error> {
        let number = n.to_string();
        let what = || format!("uploading part {n} of s3://{}/{key}", self.url.bucket);
        let r = self.send(&part_request(key, id, &number, data), &what)?;
        r.headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| S3Error::BadAnswer { what: what(), reason: "no ETag".into() })
    }

    pub(super) fn complete_multipart(
        &self,
        rel: &str,
        key: &str,
        id: &str,
        etags: &[String],
    ) -> Result<(), S3Error> {
        let what = || format!("completing the upload to {}", self.url_of(rel));
        let body = complete_body(etags);
        self.send_with(&complete_request(key, id, &body), &what, |r| {
            let answer = Self::body_text(r, 1 << 20)?;
            if answer.contains("<Error>") {
                let (code, message) = error_code(&answer);
                let message = self.printable(&message);
                return Err(BodyError::Fail(S3Error::Status { what: what(), status: 200, code, message }));
            }
            if !answer.contains("<CompleteMultipartUploadResult") {
                return Err(BodyError::Retry("no CompleteMultipartUploadResult in the answer".into()));
            }
            Ok(())
        })
    }

    pub(super) fn abort_multipart(&self, key: &str, id: &str) -> Result<(), S3Error> {
        let what = || format!("aborting the upload to s3://{}/{key}", self.url.bucket);
        self.send(&abort_request(key, id), &what).map(drop)
    }

    /// Copies the object at `from` (a key) to `rel`, server-side: in one request up to the
    /// copy limit, else a part at a time into a multipart upload.
    pub(super) fn copy(&self, from: &str, rel: &str, size: u64) -> Result<(), S3Error> {
        let key = self.key(rel);
        let source = format!("/{}/{}", self.url.bucket, url_encode_path(from));
        let what = || format!("copying an upload to {}", self.url_of(rel));
        let limit = self.tuning.copy_limit;
        if size <= limit {
            // A copy can fail after its 200 has been sent: the error is in the body, and an
            // answer without its CopyObjectResult is no copy. Copying again is harmless.
            self.send_with(&copy_request(&key, rel, &source), &what, |r| {
                let body = Self::body_text(r, 1 << 20)?;
                if body.contains("<Error>") {
                    let (code, message) = error_code(&body);
                    return Err(BodyError::Retry(format!("{}: {}", code, self.printable(&message))));
                }
                if !body.contains("<CopyObjectResult") {
                    return Err(BodyError::Retry("the answer has no CopyObjectResult".into()));
                }
                Ok(())
            })?;
        } else {
            let part = limit.max(size.div_ceil(9000));
            let id = self.create_multipart(rel, &key)?;
            let copied = (|| {
                let mut etags = Vec::new();
                for (n, start) in (0..size).step_by(part as usize).enumerate() {
                    let end = (start + part).min(size) - 1;
                    let range = format!("bytes={start}-{end}");
                    let number = (n + 1).to_string();
                    let req = copy_part_request(&key, &source, &range, &number, &id);
                    let etag = self.send_with(&req, &what, |r| {
                        let body = Self::body_text(r, 1 << 20)?;
                        let etag = xml_values(&body, "ETag").first().map(|e| answers::xml_unescape(e));
                        match etag {
                            Some(Ok(e)) if body.contains("<CopyPartResult") => Ok(e),
                            _ => Err(BodyError::Retry("no CopyPartResult with an ETag in the answer".into())),
                        }
                    })?;
                    etags.push(etag);
                }
                self.complete_multipart(rel, &key, &id, &etags)
            })();
            if copied.is_err() {
                let _ = self.abort_multipart(&key, &id);
            }
            copied?;
        }
        // Acknowledged is not done: the object must be there, whole.
        let etag = match self.head(rel)? {
            Some(m) if m.size == size => m.etag,
            found => {
                return Err(S3Error::BadAnswer {
                    what: what(),
                    reason: match found {
                        Some(m) => format!("the copy is {} bytes, not {size}", m.size),
                        None => "the server acknowledged the copy but does not have it".into(),
                    },
                });
            }
        };
        self.noted(rel, size, etag);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copied_part_names_its_source_range_part_and_upload() {
        let r = copy_part_request("p/nar/x.nar.xz", "/b/p/.nixcache-tmp-1", "bytes=0-99", "1", "up-1");
        assert_eq!((r.op.as_str(), r.key), ("copy-part", Some("p/nar/x.nar.xz")));
        assert_eq!(r.header_value("x-amz-copy-source"), Some("/b/p/.nixcache-tmp-1"));
        assert_eq!(r.header_value("x-amz-copy-source-range"), Some("bytes=0-99"));
        assert!(r.has_query("partNumber", "1") && r.has_query("uploadId", "up-1"));
        assert!(matches!(r.body, Body::None));
    }

    #[test]
    fn a_copy_replaces_the_metadata_with_the_content_type_of_its_name() {
        let r = copy_request("p/abc.narinfo", "abc.narinfo", "/b/src");
        assert_eq!(r.header_value("content-type"), Some("text/x-nix-narinfo"));
        assert_eq!(r.header_value("x-amz-metadata-directive"), Some("REPLACE"));
        assert_eq!(r.ok, &[200]);
    }

    #[test]
    fn completing_lists_every_part_in_order_escaped() {
        let body = complete_body(&["\"a&b\"".to_owned(), "\"c\"".to_owned()]);
        assert_eq!(
            body,
            "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>&quot;a&amp;b&quot;</ETag></Part>\
             <Part><PartNumber>2</PartNumber><ETag>&quot;c&quot;</ETag></Part></CompleteMultipartUpload>"
        );
        let r = complete_request("k", "id", &body);
        assert_eq!(r.op.method(), rusty_s3::Method::Post);
        assert!(r.has_query("uploadId", "id") && matches!(r.body, Body::Bytes(b) if b == body.as_bytes()));
        assert_eq!(abort_request("k", "id").ok, &[200, 204, 404]);
        assert!(create_request("k", "nar/x.nar.xz").has_query("uploads", ""));
        assert_eq!(part_request("k", "id", "3", b"x").header_value("content-type"), None);
    }
}
