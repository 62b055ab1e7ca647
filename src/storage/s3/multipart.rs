//! Multipart uploads: start, send a part, complete, abort.

use rusty_s3::Method;

use super::S3Error;
use super::answers::{self, error_code, xml_values};
use super::client::{BodyError, Client};
use super::request::Body;
use crate::layout::content_type;

impl Client {
    pub(super) fn create_multipart(&self, rel: &str, key: &str) -> Result<String, S3Error> {
        let what = || format!("starting an upload to {}", self.url_of(rel));
        self.send_with(
            "create-multipart",
            &what,
            Method::Post,
            Some(key),
            &[("uploads", "")],
            &[("content-type", content_type(rel))],
            Body::None,
            &[200],
            |r| {
                let body = Self::body_text(r, 1 << 20)?;
                match xml_values(&body, "UploadId").first().map(|u| answers::xml_unescape(u)) {
                    Some(Ok(id)) if !id.is_empty() => Ok(id),
                    _ => Err(BodyError::Retry("no UploadId in the answer".into())),
                }
            },
        )
    }
    pub(super) fn upload_part(&self, key: &str, id: &str, n: usize, data: &[u8]) -> Result<String, S3Error> {
        let number = n.to_string();
        let what = || format!("uploading part {n} of s3://{}/{key}", self.url.bucket);
        let query = [("partNumber", number.as_str()), ("uploadId", id)];
        let r =
            self.send("upload-part", &what, Method::Put, Some(key), &query, &[], Body::Bytes(data), &[200])?;
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
        let mut body = String::from("<CompleteMultipartUpload>");
        for (n, etag) in etags.iter().enumerate() {
            let etag = etag.replace('&', "&amp;").replace('"', "&quot;");
            body.push_str(&format!("<Part><PartNumber>{}</PartNumber><ETag>{etag}</ETag></Part>", n + 1));
        }
        body.push_str("</CompleteMultipartUpload>");
        self.send_with(
            "complete-multipart",
            &what,
            Method::Post,
            Some(key),
            &[("uploadId", id)],
            &[],
            Body::Bytes(body.as_bytes()),
            &[200],
            |r| {
                let answer = Self::body_text(r, 1 << 20)?;
                if answer.contains("<Error>") {
                    let (code, message) = error_code(&answer);
                    let message = self.printable(&message);
                    return Err(BodyError::Fail(S3Error::Status {
                        what: what(),
                        status: 200,
                        code,
                        message,
                    }));
                }
                if !answer.contains("<CompleteMultipartUploadResult") {
                    return Err(BodyError::Retry("no CompleteMultipartUploadResult in the answer".into()));
                }
                Ok(())
            },
        )
    }
    pub(super) fn abort_multipart(&self, key: &str, id: &str) -> Result<(), S3Error> {
        let what = || format!("aborting the upload to s3://{}/{key}", self.url.bucket);
        self.send(
            "abort-multipart",
            &what,
            Method::Delete,
            Some(key),
            &[("uploadId", id)],
            &[],
            Body::None,
            &[200, 204, 404],
        )
        .map(drop)
    }
}
