//! TLS on every listener (rustls with the ring provider).
//!
//! A listener's certificate, key and optional client CA are read from files
//! and re-read whenever one of them changes (a watcher compares size and
//! modification time every `reload_interval`); a new handshake uses the
//! newest configuration, open connections keep theirs. A file that fails to
//! load is logged and the previous configuration stays in use, so a
//! half-written certificate never takes a listener down.
//!
//! With a client CA, a listener verifies client certificates against it.
//! By default a client without a certificate may still connect (services
//! and `flagctl` authenticate with tokens), but the access layer refuses
//! mesh calls on a connection without a verified client certificate;
//! `require_client_cert` refuses such connections outright.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
pub use flagmesh_client::tls::{TlsError, load_certs, load_key};
use rustls::pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The files of a TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// Certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA (PEM, one or more certificates) client certificates are verified against.
    pub client_ca: Option<PathBuf>,
    /// Refuse connections without a verified client certificate.
    pub require_client_cert: bool,
}

/// When a certificate expires, in Unix seconds; `None` when it cannot be
/// parsed as X.509.
fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn rustls_error(e: impl std::fmt::Display) -> TlsError {
    TlsError::Rustls(e.to_string())
}

/// A root store holding every certificate of a CA file.
fn roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs("CA", path)? {
        roots.add(cert).map_err(rustls_error)?;
    }
    Ok(roots)
}

impl ServerTlsFiles {
    /// A rustls server configuration from the files, offering `alpn`, and
    /// when its certificate expires (Unix seconds; 0 when it cannot be read).
    pub fn build(&self, alpn: &[&[u8]]) -> Result<(rustls::ServerConfig, i64), TlsError> {
        let certs = load_certs("certificate", &self.cert)?;
        let expires = certs.first().and_then(not_after).unwrap_or(0);
        let key = load_key(&self.key)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(rustls_error)?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(ca)?),
                    provider(),
                );
                let verifier = if self.require_client_cert {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                builder.with_client_cert_verifier(verifier.build().map_err(rustls_error)?)
            }
            None if self.require_client_cert => {
                return Err(TlsError::Incomplete(
                    "requiring client certificates needs a client CA (--tls-client-ca)".into(),
                ));
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).map_err(rustls_error)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok((config, expires))
    }

    fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
    }

    /// Size and modification time of every file (changes when any is replaced).
    fn stamp(&self) -> Vec<Option<(u64, SystemTime)>> {
        self.paths()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .and_then(|m| Some((m.len(), m.modified().ok()?)))
            })
            .collect()
    }
}

/// The TLS configuration of one listener, reloaded when its files change.
#[derive(Debug)]
pub struct ServerTls {
    files: ServerTlsFiles,
    alpn: Vec<&'static [u8]>,
    config: ArcSwap<rustls::ServerConfig>,
    stamp: Mutex<Vec<Option<(u64, SystemTime)>>>,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
    handshake_failures: AtomicU64,
    /// When the certificate in use expires, Unix seconds (0: unknown).
    not_after: AtomicI64,
}

/// ALPN of gRPC listeners.
pub const ALPN_GRPC: &[&[u8]] = &[b"h2"];
/// ALPN of HTTP listeners (HTTP/1.1 only).
pub const ALPN_HTTP: &[&[u8]] = &[b"http/1.1"];

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl ServerTls {
    /// Loads the files; an error names the file and what is wrong.
    pub fn load(files: ServerTlsFiles, alpn: &[&'static [u8]]) -> Result<Arc<Self>, TlsError> {
        let stamp = files.stamp();
        let (config, expires) = files.build(alpn)?;
        Ok(Arc::new(Self {
            files,
            alpn: alpn.to_vec(),
            config: ArcSwap::from_pointee(config),
            stamp: Mutex::new(stamp),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            handshake_failures: AtomicU64::new(0),
            not_after: AtomicI64::new(expires),
        }))
    }

    /// The files this listener uses.
    pub fn files(&self) -> &ServerTlsFiles {
        &self.files
    }

    /// Whether client certificates are verified (a client CA is configured).
    pub fn verifies_clients(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Re-reads the files if any changed since the last load. `Ok(true)`:
    /// reloaded; an error leaves the previous configuration in use.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = self.files.stamp();
        {
            let mut seen = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == now {
                return Ok(false);
            }
            // remember the attempt: a broken file is reported once, not
            // every interval, and tried again when it changes
            *seen = now;
        }
        match self.files.build(&self.alpn) {
            Ok((config, expires)) => {
                self.config.store(Arc::new(config));
                self.not_after.store(expires, Ordering::Relaxed);
                self.reloads.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            Err(e) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Checks the files every `every` on `tasks` until `stop`.
    pub fn spawn_watcher(
        self: &Arc<Self>,
        every: Duration,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) {
        let tls = self.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                match tls.reload_if_changed() {
                    Ok(true) => {
                        tracing::info!(cert = %tls.files.cert.display(), "TLS certificate reloaded")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "TLS reload failed; the previous certificate stays in use")
                    }
                }
            }
        });
    }

    /// When the certificate in use expires, Unix seconds (0: unknown).
    pub fn not_after(&self) -> i64 {
        self.not_after.load(Ordering::Relaxed)
    }

    /// Successful reloads so far.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Reloads that failed (previous configuration kept).
    pub fn reload_failures(&self) -> u64 {
        self.reload_failures.load(Ordering::Relaxed)
    }

    /// Handshakes that failed or timed out.
    pub fn handshake_failures(&self) -> u64 {
        self.handshake_failures.load(Ordering::Relaxed)
    }

    /// Accepts TCP connections on `listener` and yields those whose TLS
    /// handshake succeeds. Handshakes run concurrently, each bounded in
    /// time, so a slow or silent client holds up nobody else.
    pub fn incoming(
        self: &Arc<Self>,
        listener: TcpListener,
    ) -> mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)> {
        let (tx, rx) = mpsc::channel(64);
        let tls = self.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = tx.closed() => return,
                    a = listener.accept() => a,
                };
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // out of descriptors and the like: back off briefly
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = TlsAcceptor::from(tls.config.load_full());
                let (tx, tls) = (tx.clone(), tls.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tls.handshake_failures.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            tls.handshake_failures.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                });
            }
        });
        rx
    }
}

/// An axum listener over [`ServerTls::incoming`].
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// TLS on `listener` with `tls`.
    pub fn new(listener: TcpListener, tls: &Arc<ServerTls>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Self {
            rx: tls.incoming(listener),
            local,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // the accept task ended (it only does when this listener is
            // dropped); nothing will arrive any more
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair,
    };
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject as _;

    struct TestCa(CertifiedIssuer<'static, KeyPair>);

    impl TestCa {
        fn new() -> Self {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            Self(CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("ca"))
        }

        /// (certificate PEM, key PEM)
        fn issue(&self, usage: ExtendedKeyUsagePurpose) -> (String, String) {
            self.issue_until(usage, (2100, 1, 1))
        }

        /// Valid until the start of (year, month, day), UTC.
        fn issue_until(
            &self,
            usage: ExtendedKeyUsagePurpose,
            until: (i32, u8, u8),
        ) -> (String, String) {
            let mut p = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
            p.extended_key_usages = vec![usage];
            p.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
            let key = KeyPair::generate().expect("key");
            let cert = p.signed_by(&key, &self.0).expect("sign");
            (cert.pem(), key.serialize_pem())
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    /// A TLS handshake with `listener`'s TLS, trusting `ca`, optionally
    /// presenting a client certificate; Ok when both sides accept.
    async fn handshake(
        tls: &Arc<ServerTls>,
        ca: &TestCa,
        client: Option<(String, String)>,
    ) -> Result<(), String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let mut incoming = tls.incoming(listener);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.0.der().clone()).map_err(|e| e.to_string())?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let mut config = match client {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![
                        CertificateDer::from_pem_slice(cert.as_bytes())
                            .map_err(|e| e.to_string())?,
                    ],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| e.to_string())?,
                )
                .map_err(|e| e.to_string())?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name =
            rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let mut stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        // TLS 1.3 reports a refused client certificate only on the next read
        use tokio::io::AsyncReadExt as _;
        let served = tokio::time::timeout(Duration::from_secs(2), incoming.recv()).await;
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut byte)).await;
        if let Ok(Err(e)) = read {
            return Err(e.to_string());
        }
        match served {
            Ok(Some(_)) => Ok(()),
            _ => Err("the server did not accept the connection".into()),
        }
    }

    #[tokio::test]
    async fn client_certificates_optional_or_required() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = TestCa::new();
        let (cert, key) = ca.issue(ExtendedKeyUsagePurpose::ServerAuth);
        let client = ca.issue(ExtendedKeyUsagePurpose::ClientAuth);
        let ca_file = write(dir.path(), "ca.pem", &ca.0.pem());
        let mut files = ServerTlsFiles {
            cert: write(dir.path(), "s.crt", &cert),
            key: write(dir.path(), "s.key", &key),
            client_ca: Some(ca_file),
            require_client_cert: false,
        };
        let optional = ServerTls::load(files.clone(), ALPN_GRPC).expect("load");
        assert!(optional.verifies_clients());
        assert!(handshake(&optional, &ca, None).await.is_ok());
        assert!(
            handshake(&optional, &ca, Some(client.clone()))
                .await
                .is_ok()
        );
        // a client certificate from another CA is refused even when optional
        let other = TestCa::new().issue(ExtendedKeyUsagePurpose::ClientAuth);
        assert!(handshake(&optional, &ca, Some(other)).await.is_err());

        files.require_client_cert = true;
        let required = ServerTls::load(files, ALPN_GRPC).expect("load");
        assert!(handshake(&required, &ca, None).await.is_err());
        assert!(handshake(&required, &ca, Some(client)).await.is_ok());
        assert!(required.handshake_failures() >= 1);
    }

    #[tokio::test]
    async fn reloads_changed_files_and_keeps_the_last_good_configuration() {
        let dir = tempfile::tempdir().expect("dir");
        let (ca1, ca2) = (TestCa::new(), TestCa::new());
        let (cert, key) = ca1.issue(ExtendedKeyUsagePurpose::ServerAuth);
        let files = ServerTlsFiles {
            cert: write(dir.path(), "s.crt", &cert),
            key: write(dir.path(), "s.key", &key),
            client_ca: None,
            require_client_cert: false,
        };
        let tls = ServerTls::load(files.clone(), ALPN_GRPC).expect("load");
        let first_expiry = tls.not_after();
        assert!(
            first_expiry
                > std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64),
            "expiry {first_expiry}"
        );
        assert!(matches!(tls.reload_if_changed(), Ok(false)));
        assert!(handshake(&tls, &ca1, None).await.is_ok());
        assert!(handshake(&tls, &ca2, None).await.is_err());

        // a broken certificate: reported, previous configuration kept
        std::fs::write(&files.cert, "not a certificate").expect("write");
        assert!(tls.reload_if_changed().is_err());
        assert_eq!(tls.reload_failures(), 1);
        // reported once, not again until the file changes
        assert!(matches!(tls.reload_if_changed(), Ok(false)));
        assert!(handshake(&tls, &ca1, None).await.is_ok());

        // rotated to a certificate of another CA: picked up
        let (cert, key) = ca2.issue_until(ExtendedKeyUsagePurpose::ServerAuth, (2033, 5, 18));
        std::fs::write(&files.key, key).expect("write");
        std::fs::write(&files.cert, cert).expect("write");
        assert!(matches!(tls.reload_if_changed(), Ok(true)));
        assert_eq!(tls.reloads(), 1);
        // 2033-05-18T00:00:00Z
        assert_eq!(
            tls.not_after(),
            1_999_987_200,
            "the new certificate's expiry"
        );
        assert!(handshake(&tls, &ca2, None).await.is_ok());
        assert!(handshake(&tls, &ca1, None).await.is_err());
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let files = ServerTlsFiles {
            cert: dir.path().join("nope.crt"),
            key: dir.path().join("nope.key"),
            client_ca: None,
            require_client_cert: false,
        };
        let e = ServerTls::load(files, ALPN_GRPC)
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|m| m.contains("nope.crt")));
        let empty = write(dir.path(), "empty.pem", "");
        let e = load_certs("CA", &empty).err().map(|e| e.to_string());
        assert!(e.is_some_and(|m| m.contains("empty.pem") && m.contains("no CERTIFICATE")));
        let half = flagmesh_client::ClientTls {
            cert: Some(dir.path().join("c.crt")),
            ..flagmesh_client::ClientTls::default()
        };
        assert!(half.config().is_err());
    }
}
