//! The command-line options every server binary shares, each also read from
//! a `FLAGMESH_*` environment variable and from a `--config` TOML file
//! (command line and environment win over the file), and logging setup.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use crate::auth::{AuthConfigError, Authenticator};

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
            log_format
        );
        if self.upstream.is_empty() {
            self.upstream = file.upstream;
        }
        self.insecure_dev |= file.insecure_dev;
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
