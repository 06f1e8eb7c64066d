//! Certificates for TLS tests, made on the spot with rcgen: a CA, and
//! server or client certificates it signs, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A test certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// Its certificate (PEM file).
    pub cert: PathBuf,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

fn err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl Ca {
    /// A new CA named `name`, its certificate written to `dir/name.pem`.
    pub fn new(dir: &Path, name: &str) -> std::io::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer =
            CertifiedIssuer::self_signed(params, KeyPair::generate().map_err(err)?).map_err(err)?;
        let cert = dir.join(format!("{name}.pem"));
        std::fs::write(&cert, issuer.pem())?;
        Ok(Self { issuer, cert })
    }

    fn issue(
        &self,
        dir: &Path,
        name: &str,
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> std::io::Result<CertFiles> {
        let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(sans).map_err(err)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().map_err(err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        let files = CertFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        write_atomically(&files.key, key.serialize_pem().as_bytes())?;
        write_atomically(&files.cert, cert.pem().as_bytes())?;
        Ok(files)
    }

    /// A server certificate for `127.0.0.1` and `localhost`.
    pub fn server(&self, dir: &Path, name: &str) -> std::io::Result<CertFiles> {
        self.issue(
            dir,
            name,
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate named `name`.
    pub fn client(&self, dir: &Path, name: &str) -> std::io::Result<CertFiles> {
        self.issue(dir, name, &[name], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// Replaces `path` in one step (write beside it, then rename), as
/// certificate rotation tools do.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Copies a certificate and key over `to` (key first, then certificate).
pub fn install(from: &CertFiles, to: &CertFiles) -> std::io::Result<()> {
    write_atomically(&to.key, &std::fs::read(&from.key)?)?;
    write_atomically(&to.cert, &std::fs::read(&from.cert)?)
}
