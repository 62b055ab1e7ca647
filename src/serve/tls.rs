//! `serve --tls-cert FILE --tls-key FILE`: HTTPS with rustls, so an upload token (or a read
//! token) need not cross a network in clear.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read a PEM certificate chain from {0}")]
    Certs(String, #[source] rustls_pki_types::pem::Error),
    #[error("{0} holds no certificate (PEM, BEGIN CERTIFICATE)")]
    NoCerts(String),
    #[error("cannot read a PEM private key from {0} (PKCS#8, PKCS#1 or SEC1)")]
    Key(String, #[source] rustls_pki_types::pem::Error),
    #[error("the certificate and key cannot be used together")]
    Config(#[source] rustls::Error),
}

/// The acceptor for the certificate chain in `cert` and the private key in `key` (PEM).
pub fn acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let name = |p: &Path| p.display().to_string();
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certs(name(cert), e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCerts(name(cert)));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key(name(key), e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Config)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
