//! The command-line options every server binary shares, each also read from
//! a `FLAGMESH_*` environment variable and from a `--config` TOML file
//! (command line and environment win over the file), and logging setup.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use std::time::Duration;

use crate::auth::{AuthConfigError, Authenticator, Security};
use crate::limits::Limits;
use crate::tls::{ClientTls, ServerTls, ServerTlsFiles, TlsError};

/// The core options of `flagmesh-control`, `flagmesh-hub` and `flagmesh-pop`.
#[derive(clap::Args, Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct CommonArgs {
    /// A TOML file with any of these options (kebab-case keys).
    #[arg(long, env = "FLAGMESH_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// gRPC listener (`127.0.0.1:0` picks a free port).
    #[arg(long, env = "FLAGMESH_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// HTTP listener: /metrics, /healthz, /readyz (and OFREP on a PoP).
    #[arg(long = "http-listen", env = "FLAGMESH_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Where sled keeps this node's state.
    #[arg(long = "data-dir", env = "FLAGMESH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Hub and PoP: an upstream address (repeat, or comma-separate, for several).
    #[arg(long = "upstream", env = "FLAGMESH_UPSTREAM", value_delimiter = ',')]
    pub upstream: Vec<String>,
    /// This node's id in reports and metrics (default: the host name and port).
    #[arg(long = "node-id", env = "FLAGMESH_NODE_ID")]
    pub node_id: Option<String>,
    /// This node's region.
    #[arg(long, env = "FLAGMESH_REGION")]
    pub region: Option<String>,
    /// No credentials required (logged loudly at start); never the default.
    #[arg(long = "insecure-dev", env = "FLAGMESH_INSECURE_DEV")]
    pub insecure_dev: bool,
    /// A TOML file of `[[token]]` tables (`name`, `role`, `sha256`, `flag_sets`).
    #[arg(long = "tokens-file", env = "FLAGMESH_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Credentials as `name:role:sha256hex`, comma-separated.
    #[arg(long = "tokens", env = "FLAGMESH_TOKENS", hide_env_values = true)]
    pub tokens: Option<String>,
    /// The mesh credential this node presents to its upstreams.
    #[arg(
        long = "mesh-token",
        env = "FLAGMESH_MESH_TOKEN",
        hide_env_values = true
    )]
    pub mesh_token: Option<String>,
    /// Log format: `text` or `json`.
    #[arg(long = "log-format", env = "FLAGMESH_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Serve without TLS, explicitly (local development, or TLS terminated
    /// in front of the node); without it a server needs `--tls-cert`.
    #[arg(long, env = "FLAGMESH_PLAINTEXT")]
    pub plaintext: bool,
    /// TLS certificate chain (PEM) of the gRPC listener (and of the HTTP
    /// listener unless `--http-tls-cert` is given); reloaded when it changes.
    #[arg(long = "tls-cert", env = "FLAGMESH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `--tls-cert`.
    #[arg(long = "tls-key", env = "FLAGMESH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates are verified against (mTLS); mesh
    /// calls then need a verified client certificate.
    #[arg(long = "tls-client-ca", env = "FLAGMESH_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Refuse every gRPC connection without a verified client certificate.
    #[arg(
        long = "tls-require-client-cert",
        env = "FLAGMESH_TLS_REQUIRE_CLIENT_CERT"
    )]
    pub tls_require_client_cert: bool,
    /// TLS certificate (PEM) of the HTTP listener, if it differs.
    #[arg(long = "http-tls-cert", env = "FLAGMESH_HTTP_TLS_CERT")]
    pub http_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `--http-tls-cert`.
    #[arg(long = "http-tls-key", env = "FLAGMESH_HTTP_TLS_KEY")]
    pub http_tls_key: Option<PathBuf>,
    /// How often certificate files are checked for changes, in milliseconds.
    #[arg(long = "tls-reload-ms", env = "FLAGMESH_TLS_RELOAD_MS")]
    pub tls_reload_ms: Option<u64>,
    /// Hub and PoP: CA (PEM) the upstream's certificate is verified
    /// against; turns on TLS to upstreams.
    #[arg(long = "upstream-ca", env = "FLAGMESH_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// Hub and PoP: client certificate (PEM) presented to upstreams (mTLS).
    #[arg(long = "client-cert", env = "FLAGMESH_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// Hub and PoP: private key (PEM) of `--client-cert`.
    #[arg(long = "client-key", env = "FLAGMESH_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
    /// Hub and PoP: the name expected in upstream certificates (default:
    /// the upstream's host).
    #[arg(long = "upstream-tls-name", env = "FLAGMESH_UPSTREAM_TLS_NAME")]
    pub upstream_tls_name: Option<String>,
    /// Open streams one client (credential and address) may hold; 0: no limit.
    #[arg(
        long = "max-streams-per-client",
        env = "FLAGMESH_MAX_STREAMS_PER_CLIENT"
    )]
    pub max_streams_per_client: Option<usize>,
    /// Admin calls per second per credential (sustained); 0: no limit.
    #[arg(long = "admin-rate", env = "FLAGMESH_ADMIN_RATE")]
    pub admin_rate: Option<f64>,
    /// Admin calls a credential may make in a burst.
    #[arg(long = "admin-burst", env = "FLAGMESH_ADMIN_BURST")]
    pub admin_burst: Option<f64>,
    /// Largest Admin request, in bytes.
    #[arg(long = "max-message-bytes", env = "FLAGMESH_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Control: flags one flag set may hold.
    #[arg(long = "max-flags-per-set", env = "FLAGMESH_MAX_FLAGS_PER_SET")]
    pub max_flags_per_set: Option<usize>,
    /// Serve `/metrics` without a credential (otherwise a read credential).
    #[arg(long = "metrics-public", env = "FLAGMESH_METRICS_PUBLIC")]
    pub metrics_public: bool,
    /// Export traces over OTLP/gRPC to this endpoint (for example
    /// `http://127.0.0.1:4317`); also read from `OTEL_EXPORTER_OTLP_ENDPOINT`.
    #[arg(long = "otlp-endpoint", env = "FLAGMESH_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// Keeps the trace exporter alive; `shutdown` flushes it.
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Flushes and stops the trace exporter.
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            eprintln!("flushing traces failed: {e}");
        }
    }
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("config file {path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// Credentials are misconfigured.
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
    /// A certificate, key or CA could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// An option's value is out of range.
    #[error("{0}")]
    Invalid(String),
    /// A required option is missing.
    #[error("{0}")]
    Missing(String),
}

impl CommonArgs {
    /// Fills every option not given on the command line or in the
    /// environment from the `--config` file, if any.
    pub fn merge_config_file(mut self) -> Result<Self, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let err = |message: String| ConfigError::File {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
        let file: CommonArgs = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        macro_rules! fill {
            ($($field:ident),*) => { $( if self.$field.is_none() { self.$field = file.$field; } )* };
        }
        fill!(
            listen,
            http_listen,
            data_dir,
            node_id,
            region,
            tokens_file,
            tokens,
            mesh_token,
            log_format,
            otlp_endpoint,
            tls_cert,
            tls_key,
            tls_client_ca,
            http_tls_cert,
            http_tls_key,
            tls_reload_ms,
            upstream_ca,
            client_cert,
            client_key,
            upstream_tls_name,
            max_streams_per_client,
            admin_rate,
            admin_burst,
            max_message_bytes,
            max_flags_per_set
        );
        if self.upstream.is_empty() {
            self.upstream = file.upstream;
        }
        self.insecure_dev |= file.insecure_dev;
        self.plaintext |= file.plaintext;
        self.tls_require_client_cert |= file.tls_require_client_cert;
        self.metrics_public |= file.metrics_public;
        Ok(self)
    }

    /// The gRPC listen address (default `127.0.0.1:0`).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// The data directory, or an error naming the option.
    pub fn require_data_dir(&self) -> Result<PathBuf, ConfigError> {
        self.data_dir.clone().ok_or_else(|| {
            ConfigError::Missing("--data-dir (FLAGMESH_DATA_DIR) is required".into())
        })
    }

    /// The credentials this server checks.
    pub fn authenticator(&self) -> Result<Arc<Authenticator>, ConfigError> {
        Ok(Arc::new(Authenticator::configure(
            self.tokens_file.as_deref(),
            self.tokens.as_deref(),
            self.insecure_dev,
        )?))
    }

    /// Credentials, TLS and limits of this server. Refuses plaintext unless
    /// asked for (`--plaintext`, or `--insecure-dev`).
    pub fn security(&self) -> Result<Security, ConfigError> {
        let auth = self.authenticator()?;
        let listener = |cert: &Option<PathBuf>, key: &Option<PathBuf>, what: &str| match (cert, key)
        {
            (Some(cert), Some(key)) => Ok(Some((cert.clone(), key.clone()))),
            (None, None) => Ok(None),
            _ => Err(ConfigError::Missing(format!(
                "{what}: a certificate needs its key and a key its certificate"
            ))),
        };
        let grpc = listener(&self.tls_cert, &self.tls_key, "--tls-cert/--tls-key")?;
        let http = listener(
            &self.http_tls_cert,
            &self.http_tls_key,
            "--http-tls-cert/--http-tls-key",
        )?
        .or_else(|| grpc.clone());
        if grpc.is_none() && !(self.plaintext || self.insecure_dev) {
            return Err(ConfigError::Missing(
                "no TLS certificate: pass --tls-cert and --tls-key, or --plaintext to serve without TLS".into(),
            ));
        }
        if grpc.is_none() && (self.tls_client_ca.is_some() || self.tls_require_client_cert) {
            return Err(ConfigError::Missing(
                "--tls-client-ca and --tls-require-client-cert need --tls-cert and --tls-key"
                    .into(),
            ));
        }
        let grpc_tls = grpc
            .map(|(cert, key)| {
                ServerTls::load(
                    ServerTlsFiles {
                        cert,
                        key,
                        client_ca: self.tls_client_ca.clone(),
                        require_client_cert: self.tls_require_client_cert,
                    },
                    crate::tls::ALPN_GRPC,
                )
            })
            .transpose()?;
        let http_tls = http
            .filter(|_| self.http_listen.is_some())
            .map(|(cert, key)| {
                ServerTls::load(
                    ServerTlsFiles {
                        cert,
                        key,
                        client_ca: None,
                        require_client_cert: false,
                    },
                    crate::tls::ALPN_HTTP,
                )
            })
            .transpose()?;
        let d = Limits::default();
        let rate = self.admin_rate.unwrap_or(d.admin_rate_per_sec);
        let burst = self.admin_burst.unwrap_or(d.admin_burst);
        if !(rate.is_finite() && rate >= 0.0) {
            return Err(ConfigError::Invalid(format!(
                "--admin-rate {rate}: calls per second, 0 or more (0: no limit)"
            )));
        }
        if !(burst.is_finite() && burst >= 1.0) {
            return Err(ConfigError::Invalid(format!(
                "--admin-burst {burst}: at least 1"
            )));
        }
        let max_flags = self.max_flags_per_set.unwrap_or(d.max_flags_per_set);
        if max_flags == 0 {
            return Err(ConfigError::Invalid(
                "--max-flags-per-set 0: a flag set must be able to hold a flag".into(),
            ));
        }
        let max_message = self.max_message_bytes.unwrap_or(d.max_message_bytes);
        if max_message < 64 << 10 {
            return Err(ConfigError::Invalid(format!(
                "--max-message-bytes {max_message}: at least 65536 (one flag may be 256 KiB)"
            )));
        }
        Ok(Security {
            auth,
            grpc_tls,
            http_tls,
            tls_reload: Duration::from_millis(self.tls_reload_ms.unwrap_or(2_000).max(50)),
            limits: Limits {
                streams_per_client: self.max_streams_per_client.unwrap_or(d.streams_per_client),
                admin_rate_per_sec: rate,
                admin_burst: burst,
                max_message_bytes: max_message,
                max_flags_per_set: max_flags,
                metrics_public: self.metrics_public,
                ..d
            },
        })
    }

    /// TLS to upstreams, if configured.
    pub fn client_tls(&self) -> Option<ClientTls> {
        let tls = ClientTls {
            ca: self.upstream_ca.clone(),
            cert: self.client_cert.clone(),
            key: self.client_key.clone(),
            domain: self.upstream_tls_name.clone(),
        };
        tls.enabled().then_some(tls)
    }

    /// Installs the tracing subscriber: logs go to stderr (stdout carries
    /// only the ready line), filtered by `RUST_LOG` (default `info`); with
    /// an OTLP endpoint, spans are also exported as `service`.
    pub fn init_logging(&self, service: &str) -> TelemetryGuard {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let (text, json) = if self.log_format.as_deref() == Some("json") {
            (
                None,
                Some(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .with_writer(std::io::stderr),
                ),
            )
        } else {
            (
                Some(
                    tracing_subscriber::fmt::layer()
                        .with_ansi(ansi)
                        .with_writer(std::io::stderr),
                ),
                None,
            )
        };
        let endpoint = self
            .otlp_endpoint
            .clone()
            .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
            .filter(|e| !e.is_empty());
        let mut guard = TelemetryGuard::default();
        let otel = endpoint.and_then(|endpoint| match otlp_provider(&endpoint, service) {
            Ok(provider) => {
                use opentelemetry::trace::TracerProvider as _;
                let tracer = provider.tracer("flagmesh");
                guard.provider = Some(provider);
                Some(tracing_opentelemetry::layer().with_tracer(tracer))
            }
            Err(e) => {
                eprintln!("{service}: OTLP export to {endpoint} disabled: {e}");
                None
            }
        });
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(text)
            .with(json)
            .with(otel)
            .try_init();
        guard
    }
}

fn otlp_provider(
    endpoint: &str,
    service: &str,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, Box<dyn std::error::Error>> {
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> CommonArgs {
        CommonArgs {
            insecure_dev: true,
            ..CommonArgs::default()
        }
    }

    #[test]
    fn plaintext_must_be_asked_for() {
        let mut a = CommonArgs {
            tokens: Some(format!("ops:read:{}", crate::auth::hash_token("x"))),
            ..CommonArgs::default()
        };
        let e = a.security().err().map(|e| e.to_string());
        assert!(e.is_some_and(|m| m.contains("--plaintext") && m.contains("--tls-cert")));
        a.plaintext = true;
        assert!(
            a.security()
                .is_ok_and(|s| s.grpc_tls.is_none() && s.http_tls.is_none())
        );
        a.tls_client_ca = Some("ca.pem".into());
        assert!(a.security().is_err(), "a client CA without a certificate");
    }

    #[test]
    fn limits_out_of_range_are_refused_with_the_option_named() {
        for (args, option) in [
            (
                CommonArgs {
                    admin_rate: Some(-1.0),
                    ..dev()
                },
                "--admin-rate",
            ),
            (
                CommonArgs {
                    admin_rate: Some(f64::NAN),
                    ..dev()
                },
                "--admin-rate",
            ),
            (
                CommonArgs {
                    admin_burst: Some(0.5),
                    ..dev()
                },
                "--admin-burst",
            ),
            (
                CommonArgs {
                    max_flags_per_set: Some(0),
                    ..dev()
                },
                "--max-flags-per-set",
            ),
            (
                CommonArgs {
                    max_message_bytes: Some(100),
                    ..dev()
                },
                "--max-message-bytes",
            ),
        ] {
            let e = args.security().err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|m| m.contains(option)),
                "{option}: {e:?}"
            );
        }
        let ok = CommonArgs {
            admin_rate: Some(0.0),
            max_streams_per_client: Some(0),
            ..dev()
        }
        .security();
        assert!(ok.is_ok_and(|s| s.limits.admin_rate_per_sec == 0.0 && s.limits.streams_per_client == 0));
    }
}
