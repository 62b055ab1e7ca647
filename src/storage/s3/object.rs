//! Single objects: look up, download, upload, delete.

use std::fs::File;

use super::answers::parse_time;
use super::client::{Client, etag_of};
use super::request::{Body, Op, Request};
use super::{FileProblem, Meta, S3Backend, S3Error};
use crate::layout::content_type;

impl Client {
    /// What a HEAD of `rel` answers, never from a listing: `None` for a 404.
    pub(super) fn head(&self, rel: &str) -> Result<Option<Meta>, S3Error> {
        let key = self.key(rel);
        let what = || format!("looking up {}", self.url_of(rel));
        let r = self.send(&Request::object(Op::Head, &key).ok(&[200, 404]), &what)?;
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
        let put =
            Request::object(Op::Put, &key).header("content-type", content_type(rel)).body(Body::Bytes(data));
        let r = self.send(&put, &what)?;
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
        let put =
            Request::object(Op::Put, &key).header("content-type", content_type(rel)).body(Body::File(f));
        let r = self.send(&put, &what)?;
        self.noted(rel, size, etag_of(&r));
        Ok(())
    }

    pub(super) fn delete(&self, rel: &str) -> Result<(), S3Error> {
        let key = self.key(rel);
        let what = || format!("deleting {}", self.url_of(rel));
        self.send(&Request::object(Op::Delete, &key).ok(&[200, 204, 404]), &what)?;
        if let Some(copies) = self.copies_of(rel) {
            copies.forget(&key);
        }
        if let Some(s) = self.snapshot.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            s.remove(rel);
        }
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
            .send_with(&Request::object(Op::Get, &key).ok(&[200, 404]), &what, |r| {
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
