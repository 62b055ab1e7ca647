//! An HTTP receiver: the requests `nix copy --to http://HOST` makes (GET, HEAD, PUT under
//! the cache's names), and nixcache's POST [`wire::HAVE_PATH`] where the server is nixcache.
//! Transport failures and overloaded answers (429, 5xx but 507) are tried again, as
//! [`crate::retry`] says: every request is idempotent (a PUT sends the same bytes again).

use std::io::{Read, Seek};
use std::time::Duration;

use base64::Engine;

use super::wire::{self, Verb};
use super::{Answer, Auth, Body, RemoteError, Transport};
use crate::retry;

pub struct Http {
    agent: ureq::Agent,
    base: String,
    authorization: Option<String>,
}

/// The certificate authorities to trust instead of the built-in ones, as Nix takes them:
/// the PEM file `NIX_SSL_CERT_FILE` (or `SSL_CERT_FILE`) names.
fn custom_roots(base: &str) -> Result<Option<ureq::tls::RootCerts>, RemoteError> {
    let set = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let Some(file) = set("NIX_SSL_CERT_FILE").or_else(|| set("SSL_CERT_FILE")) else {
        return Ok(None);
    };
    let bad = |reason: String| RemoteError::Transport { url: base.to_owned(), reason };
    let pem =
        std::fs::read(&file).map_err(|e| bad(format!("cannot read {}: {e}", file.to_string_lossy())))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let Ok(ureq::tls::PemItem::Certificate(c)) = item {
            certs.push(c);
        }
    }
    if certs.is_empty() {
        return Err(bad(format!("{} holds no PEM certificate", file.to_string_lossy())));
    }
    Ok(Some(ureq::tls::RootCerts::new_with_certs(&certs)))
}

impl Http {
    pub fn new(base: &str, auth: Option<Auth>) -> Result<Http, RemoteError> {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(roots) = custom_roots(base)? {
            tls = tls.root_certs(roots);
        }
        let agent = ureq::Agent::new_with_config(
            ureq::config::Config::builder()
                .tls_config(tls.build())
                .http_status_as_error(false)
                .timeout_connect(Some(Duration::from_secs(10)))
                // A receiver checks a NAR (decompresses and hashes it) before it answers a
                // narinfo: minutes for a large one on a small machine.
                .timeout_recv_response(Some(Duration::from_secs(3600)))
                .timeout_per_read(Some(Duration::from_secs(300)))
                .timeout_per_write(Some(Duration::from_secs(300)))
                .max_idle_connections_per_host(16)
                .user_agent(concat!("nixcache/", env!("CARGO_PKG_VERSION")))
                .build(),
        );
        let authorization = auth.map(|a| match a {
            Auth::Bearer(t) => format!("Bearer {t}"),
            Auth::Basic { login, password } => {
                let pair = format!("{login}:{password}");
                format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
            }
        });
        Ok(Http { agent, base: base.to_owned(), authorization })
    }

    fn once(&self, verb: Verb, rel: &str, body: &Body<'_>, limit: u64) -> Result<Answer, ureq::Error> {
        let url = match verb {
            Verb::Have => format!("{}{}", self.base, wire::HAVE_PATH),
            _ => format!("{}/{rel}", self.base),
        };
        let auth = self.authorization.as_deref();
        let mut response = match verb {
            Verb::Get | Verb::Head => {
                let mut r = if verb == Verb::Get { self.agent.get(&url) } else { self.agent.head(&url) };
                if let Some(a) = auth {
                    r = r.header("authorization", a);
                }
                r.call()?
            }
            Verb::Put | Verb::Have => {
                let mut r = if verb == Verb::Put { self.agent.put(&url) } else { self.agent.post(&url) };
                if let Some(a) = auth {
                    r = r.header("authorization", a);
                }
                let ct =
                    if verb == Verb::Have { "application/json" } else { crate::layout::content_type(rel) };
                r = r.header("content-type", ct);
                match body {
                    Body::Empty => r.send_empty()?,
                    Body::Bytes(b) => r.send(*b)?,
                    Body::File(f, _) => {
                        let mut f = *f;
                        f.rewind()?;
                        r.send(f)?
                    }
                }
            }
        };
        let status = response.status().as_u16();
        let size = response
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let mut out = Vec::new();
        if verb != Verb::Head {
            // An error's sentence is short; a GET is read to one byte past its limit.
            let cap = if (200..300).contains(&status) { limit.max(64 << 10) + 1 } else { 64 << 10 };
            response.body_mut().as_reader().take(cap).read_to_end(&mut out)?;
        }
        Ok(Answer { status, size, body: out })
    }
}

impl Transport for Http {
    fn send(&self, verb: Verb, rel: &str, body: Body<'_>, limit: u64) -> Result<Answer, RemoteError> {
        let mut attempt = 1;
        loop {
            let r = self.once(verb, rel, &body, limit);
            let again = match &r {
                Ok(a) => retry::retryable(a.status) && a.status != 507,
                // A certificate or a URL that is wrong stays wrong.
                // (rustls's refusal of a certificate comes as an I/O error of kind InvalidData.)
                Err(ureq::Error::Io(e)) => e.kind() != std::io::ErrorKind::InvalidData,
                Err(e) => matches!(e, ureq::Error::Timeout(_) | ureq::Error::ConnectionFailed),
            };
            if !again || attempt >= retry::ATTEMPTS {
                return r.map_err(|e| {
                    let mut reason = e.to_string();
                    if reason.contains("certificate") {
                        reason.push_str(
                            " (to trust the authority that signed the server's certificate, set NIX_SSL_CERT_FILE to its PEM file, as for Nix)",
                        );
                    }
                    RemoteError::Transport { url: self.base.clone(), reason }
                });
            }
            std::thread::sleep(retry::pause(attempt));
            attempt += 1;
        }
    }
}
