//! Single objects: look up, download, upload, copy, delete.

use std::fs::File;

use rusty_s3::Method;

use super::answers::{self, error_code, parse_time, xml_values};
use super::bucket_url::url_encode_path;
use super::client::{BodyError, Client, etag_of};
use super::request::Body;
use super::{FileProblem, Meta, S3Backend, S3Error};
use crate::layout::content_type;

impl Client {
    /// What a HEAD of `rel` answers, never from a listing: `None` for a 404.
    pub(super) fn head(&self, rel: &str) -> Result<Option<Meta>, S3Error> {
        let key = self.key(rel);
        let what = || format!("looking up {}", self.url_of(rel));
        let r = self.send("head", &what, Method::Head, Some(&key), &[], &[], Body::None, &[200, 404])?;
        if r.status().as_u16() == 404 {
            return Ok(None);
        }
        let header = |h: &str| r.headers().get(h).and_then(|v| v.to_str().ok());
        let bad = |reason: &str| S3Error::BadAnswer { what: what(), reason: reason.into() };
        Ok(Some(Meta {
            name: rel.to_owned(),
            size: header("content-length")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad("no Content-Length"))?,
            modified: header("last-modified").and_then(parse_time).ok_or_else(|| bad("no Last-Modified"))?,
            not_regular: None,
            etag: etag_of(&r),
        }))
    }
    pub(super) fn put(&self, rel: &str, data: &[u8]) -> Result<(), S3Error> {
        let key = self.key(rel);
        let what = || format!("uploading {}", self.url_of(rel));
        let r = self.send(
            "put",
            &what,
            Method::Put,
            Some(&key),
            &[],
            &[("content-type", content_type(rel))],
            Body::Bytes(data),
            &[200],
        )?;
        let etag = etag_of(&r);
        if let (Some(copies), Some(etag)) = (self.copies_of(rel), &etag) {
            copies.put(&key, etag, data);
        }
        self.noted(rel, data.len() as u64, etag);
        Ok(())
    }
    /// Uploads the whole of `f` (`size` bytes) to `rel` in one PUT.
    pub(super) fn put_file(&self, rel: &str, f: &File, size: u64) -> Result<(), S3Error> {
        let key = self.key(rel);
        let what = || format!("uploading {}", self.url_of(rel));
        let headers = [("content-type", content_type(rel))];
        let r = self.send("put", &what, Method::Put, Some(&key), &[], &headers, Body::File(f), &[200])?;
        self.noted(rel, size, etag_of(&r));
        Ok(())
    }
    pub(super) fn delete(&self, rel: &str) -> Result<(), S3Error> {
        let key = self.key(rel);
        let what = || format!("deleting {}", self.url_of(rel));
        self.send("delete", &what, Method::Delete, Some(&key), &[], &[], Body::None, &[200, 204, 404])?;
        if let Some(copies) = self.copies_of(rel) {
            copies.forget(&key);
        }
        if let Some(s) = self.snapshot.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            s.remove(rel);
        }
        Ok(())
    }
    /// Copies the object at `from` (a key) to `rel`, server-side.
    pub(super) fn copy(&self, from: &str, rel: &str, size: u64) -> Result<(), S3Error> {
        let key = self.key(rel);
        let source = format!("/{}/{}", self.url.bucket, url_encode_path(from));
        let what = || format!("copying an upload to {}", self.url_of(rel));
        let limit = self.tuning.copy_limit;
        if size <= limit {
            let headers = [
                ("content-type", content_type(rel)),
                ("x-amz-copy-source", source.as_str()),
                ("x-amz-metadata-directive", "REPLACE"),
            ];
            // A copy can fail after its 200 has been sent: the error is in the body, and an
            // answer without its CopyObjectResult is no copy. Copying again is harmless.
            self.send_with("copy", &what, Method::Put, Some(&key), &[], &headers, Body::None, &[200], |r| {
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
                    let headers =
                        [("x-amz-copy-source", source.as_str()), ("x-amz-copy-source-range", range.as_str())];
                    let query = [("partNumber", number.as_str()), ("uploadId", id.as_str())];
                    let etag = self.send_with(
                        "copy-part",
                        &what,
                        Method::Put,
                        Some(&key),
                        &query,
                        &headers,
                        Body::None,
                        &[200],
                        |r| {
                            let body = Self::body_text(r, 1 << 20)?;
                            let etag = xml_values(&body, "ETag").first().map(|e| answers::xml_unescape(e));
                            match etag {
                                Some(Ok(e)) if body.contains("<CopyPartResult") => Ok(e),
                                _ => Err(BodyError::Retry(
                                    "no CopyPartResult with an ETag in the answer".into(),
                                )),
                            }
                        },
                    )?;
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

impl S3Backend {
    /// GETs `rel` if it is at most `limit` bytes, keeping a copy of a narinfo.
    pub(super) fn download(&self, rel: &str, limit: u64) -> Result<Option<Vec<u8>>, FileProblem> {
        let key = self.client.key(rel);
        let copies = self.client.copies_of(rel);
        let what = || format!("downloading {}", self.client.url_of(rel));
        // The whole body in the try, retried like the request: a read cut short is no file.
        let got = self
            .client
            .send_with("get", &what, Method::Get, Some(&key), &[], &[], Body::None, &[200, 404], |r| {
                if r.status().as_u16() == 404 {
                    return Ok(None);
                }
                if let Some(size) = r.body().content_length().filter(|&n| n > limit) {
                    return Ok(Some(Err(FileProblem::TooLarge { size, limit })));
                }
                let etag = etag_of(&r);
                match Client::body_bytes(r, limit + 1)? {
                    b if b.len() as u64 > limit => {
                        Ok(Some(Err(FileProblem::TooLarge { size: b.len() as u64, limit })))
                    }
                    b => Ok(Some(Ok((b, etag)))),
                }
            })
            .map_err(|e| FileProblem::Io(e.into_io()))?
            .transpose()?;
        Ok(got.map(|(body, etag)| {
            if let (Some(copies), Some(etag)) = (copies, etag) {
                copies.put(&key, &etag, &body);
            }
            body
        }))
    }
}
