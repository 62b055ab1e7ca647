//! Listings: the objects under a prefix, and the incomplete multipart uploads.

use std::time::SystemTime;

use super::answers;
use super::client::{BodyError, Client};
use super::request::{Op, Request};
use super::{Meta, S3Error};

/// An incomplete multipart upload under the cache's prefix.
pub(super) struct PendingUpload {
    /// Its key, relative to the prefix.
    pub(super) rel: String,
    pub(super) id: String,
    pub(super) initiated: SystemTime,
}

impl Client {
    /// Every object under `prefix` (a key prefix), with `direct` only those directly under it
    /// (delimiter `/`); `None` when that takes more than `max_pages` pages. Parsed strictly
    /// ([`answers::list_page`]), keys url-encoded by the server and decoded here, so a key with
    /// any character is listed as what it is.
    pub(super) fn list_keys(
        &self,
        prefix: &str,
        direct: bool,
        max_pages: Option<usize>,
    ) -> Result<Option<Vec<Meta>>, S3Error> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        let mut pages = 0;
        loop {
            if max_pages.is_some_and(|m| pages >= m) {
                return Ok(None);
            }
            pages += 1;
            let what = || format!("listing {}/{prefix}", self.url.bucket);
            let mut query = vec![("list-type", "2"), ("prefix", prefix), ("encoding-type", "url")];
            if direct {
                query.push(("delimiter", "/"));
            }
            if let Some(t) = &token {
                query.push(("continuation-token", t.as_str()));
            }
            let page = self.send_with(&Request { query, ..Request::bucket(Op::List) }, &what, |r| {
                let body = Self::body_text(r, 64 << 20)?;
                answers::list_page(&body, prefix).map_err(BodyError::Retry)
            })?;
            for o in page.objects {
                let rel = self.rel(&o.key).to_owned();
                if rel.ends_with('/') {
                    continue;
                }
                out.push(Meta {
                    name: rel,
                    size: o.size,
                    modified: o.modified,
                    not_regular: None,
                    etag: o.etag,
                });
            }
            match page.next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Some(out))
    }

    /// Every incomplete multipart upload under the prefix (with its slash: not the uploads of
    /// a cache whose prefix merely starts with ours).
    pub(super) fn list_uploads(&self) -> Result<Vec<PendingUpload>, S3Error> {
        let what = || format!("listing the incomplete uploads of {}", self.url);
        let mut found = Vec::new();
        let mut marker: Option<(String, String)> = None;
        loop {
            let mut query = vec![("uploads", ""), ("prefix", self.prefix.as_str()), ("encoding-type", "url")];
            if let Some((k, u)) = &marker {
                query.push(("key-marker", k.as_str()));
                query.push(("upload-id-marker", u.as_str()));
            }
            let page =
                self.send_with(&Request { query, ..Request::bucket(Op::ListUploads) }, &what, |r| {
                    let body = Client::body_text(r, 64 << 20)?;
                    answers::upload_page(&body, &self.prefix).map_err(BodyError::Retry)
                })?;
            for u in page.uploads {
                found.push(PendingUpload {
                    rel: self.rel(&u.key).to_owned(),
                    id: u.id,
                    initiated: u.initiated,
                });
            }
            match page.next {
                Some(next) => marker = Some(next),
                None => break,
            }
        }
        Ok(found)
    }
}
