//! TLS on the client side of a flagmesh link: reading PEM files with
//! errors that name them, and building a tonic endpoint for an address
//! (`http://` without TLS, `https://` with a CA and an optional client
//! certificate). Every client uses this: hubs and PoPs towards their
//! upstreams, the SDK, `flagctl`. A client reads its files at every
//! connection attempt, so a rotated certificate or CA is used from the next
//! reconnect on.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a TLS configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{what} {path}: {source}")]
    Read {
        /// Which file (certificate, key, CA).
        what: &'static str,
        /// Its path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A file holds no usable PEM item.
    #[error("{what} {path}: {message}")]
    Pem {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// rustls refused the certificate, key or CA.
    #[error("TLS configuration: {0}")]
    Rustls(String),
    /// An option needs another one.
    #[error("{0}")]
    Incomplete(String),
}

/// Reads a file, naming it on failure.
pub fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// A PEM error naming the file.
pub fn pem_error(what: &'static str, path: &Path, message: impl ToString) -> TlsError {
    TlsError::Pem {
        what,
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Reads every certificate of a PEM file (at least one).
pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certs(what, path, &read(what, path)?)
}

/// Every certificate of PEM `bytes` read from `path` (at least one).
pub fn parse_certs(
    what: &'static str,
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, path, e))?;
    if certs.is_empty() {
        return Err(pem_error(what, path, "no CERTIFICATE block"));
    }
    Ok(certs)
}

/// Reads the private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    parse_key(path, &read("key", path)?)
}

/// The private key in PEM `bytes` read from `path`.
pub fn parse_key(path: &Path, bytes: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(bytes).map_err(|e| pem_error("key", path, e))
}

/// How a node connects to its upstreams over TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// CA the upstream's certificate is verified against.
    pub ca: Option<PathBuf>,
    /// Client certificate presented to the upstream (mTLS).
    pub cert: Option<PathBuf>,
    /// Its private key.
    pub key: Option<PathBuf>,
    /// The name expected in the upstream's certificate (default: the host
    /// of the upstream address).
    pub domain: Option<String>,
}

impl ClientTls {
    /// Whether TLS is used at all.
    pub fn enabled(&self) -> bool {
        self.ca.is_some() || self.cert.is_some()
    }

    /// tonic's client TLS configuration, from the files as they are now.
    pub fn config(&self) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
        let mut config = tonic::transport::ClientTlsConfig::new();
        // each file is read once and parsed here, so a bad one gets an error
        // naming it rather than a failed handshake later
        if let Some(ca) = &self.ca {
            let pem = read("CA", ca)?;
            parse_certs("CA", ca, &pem)?;
            config = config.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let (cert_pem, key_pem) = (read("client certificate", cert)?, read("key", key)?);
                parse_certs("client certificate", cert, &cert_pem)?;
                parse_key(key, &key_pem)?;
                config = config.identity(tonic::transport::Identity::from_pem(cert_pem, key_pem));
            }
            (None, None) => {}
            _ => {
                return Err(TlsError::Incomplete(
                    "a client certificate needs its key, and a key its certificate (--client-cert, --client-key)".into(),
                ));
            }
        }
        if let Some(d) = &self.domain {
            config = config.domain_name(d.clone());
        }
        Ok(config)
    }
}

/// An endpoint for `upstream` (`host:port` or a URL): plaintext `http://`
/// without TLS, `https://` with the given TLS files.
pub fn endpoint(
    upstream: &str,
    tls: Option<&ClientTls>,
) -> Result<tonic::transport::Endpoint, String> {
    let tls = tls.filter(|t| t.enabled());
    let uri = if upstream.contains("://") {
        upstream.to_owned()
    } else if tls.is_some() {
        format!("https://{upstream}")
    } else {
        format!("http://{upstream}")
    };
    let endpoint = tonic::transport::Endpoint::from_shared(uri)
        .map_err(|e| format!("bad upstream address {upstream}: {e}"))?;
    match tls {
        Some(t) => {
            let config = t.config().map_err(|e| e.to_string())?;
            endpoint.tls_config(config).map_err(|e| format!("TLS: {e}"))
        }
        None => Ok(endpoint),
    }
}
