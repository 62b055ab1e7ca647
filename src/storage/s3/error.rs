//! What goes wrong talking to a bucket, in words that never hold a secret.

use std::io;

use thiserror::Error;

use super::credentials::CredentialsError;

/// What went wrong talking to the bucket. Never holds a secret or a signed URL.
#[derive(Debug, Error)]
pub enum S3Error {
    #[error(transparent)]
    NoCredentials(#[from] CredentialsError),
    #[error("{bucket} refused the credentials from {source_name} ({code}: {message}); check them")]
    Refused { bucket: String, source_name: String, code: String, message: String },
    #[error("the bucket {bucket} does not exist at {endpoint}; create it first")]
    NoSuchBucket { bucket: String, endpoint: String },
    #[error("cannot reach {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("{what}: the server answered {status} {code}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Status { what: String, status: u16, code: String, message: String },
    #[error("{what}: the server's answer does not parse: {reason}")]
    BadAnswer { what: String, reason: String },
    #[error("{endpoint} is not a usable endpoint: {reason}")]
    BadEndpoint { endpoint: String, reason: String },
    #[error("reading back the temporary file (in TMPDIR) a NAR was held in: {0}")]
    Spool(#[source] io::Error),
}

impl S3Error {
    pub(super) fn into_io(self) -> io::Error {
        let kind = match &self {
            S3Error::Unreachable { .. } => io::ErrorKind::ConnectionRefused,
            S3Error::Refused { .. } => io::ErrorKind::PermissionDenied,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }
}

/// A transport error in words, without the URL (a signed URL carries a session token).
pub(super) fn transport(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Io(io) => io.to_string(),
        ureq::Error::ConnectionFailed => "the connection failed".into(),
        ureq::Error::HostNotFound => "the host was not found".into(),
        ureq::Error::Timeout(t) => format!("timed out ({t})"),
        ureq::Error::Tls(t) => format!("TLS: {t}"),
        ureq::Error::BodyExceedsLimit(n) => format!("the answer is longer than {n} bytes"),
        ureq::Error::StatusCode(s) => format!("status {s}"),
        _ => "the request failed".into(),
    }
}
