//! Configuration of a server binary, read once at start.
//!
//! One rule for every option of every binary: the command line wins over
//! the environment (`FLAGMESH_*`), which wins over the `--config` TOML
//! file, which wins over the option's default. The file's keys are the
//! long option names (`http-listen = "127.0.0.1:9090"`, `upstream =
//! ["a:1", "b:2"]`); a key that names no option of that binary is refused
//! by name. clap parses every value, whatever its source, so a bad value
//! gets the same one-line error everywhere.
//!
//! [`CommonArgs`] holds the options every server has; each binary flattens
//! it into its own arguments next to the options only it has.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgAction, Parser};

use crate::credentials::{AuthConfigError, Authenticator};
use crate::limits::Limits;
use crate::security::Security;
use crate::tls::{ServerTls, ServerTlsFiles, TlsError};

/// The options of `flagmesh-control`, `flagmesh-hub` and `flagmesh-pop` alike.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CommonArgs {
    /// A TOML file with any option of this program (long names as keys).
    #[arg(long, env = "FLAGMESH_CONFIG")]
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
    /// No credentials required (logged loudly at start); never the default.
    #[arg(long = "insecure-dev", env = "FLAGMESH_INSECURE_DEV")]
    pub insecure_dev: bool,
    /// A TOML file of `[[token]]` tables (`name`, `role`, `sha256`, `flag_sets`).
    #[arg(long = "tokens-file", env = "FLAGMESH_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Credentials as `name:role:sha256hex`, comma-separated.
    #[arg(long = "tokens", env = "FLAGMESH_TOKENS", hide_env_values = true)]
    pub tokens: Option<String>,
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
    #[arg(
        long = "tls-reload-ms",
        env = "FLAGMESH_TLS_RELOAD_MS",
        default_value_t = 2_000
    )]
    pub tls_reload_ms: u64,
    /// Open streams one client (credential and address) may hold; 0: no limit.
    #[arg(
        long = "max-streams-per-client",
        env = "FLAGMESH_MAX_STREAMS_PER_CLIENT",
        default_value_t = 256
    )]
    pub max_streams_per_client: usize,
    /// Serve `/metrics` without a credential (otherwise a read credential).
    #[arg(long = "metrics-public", env = "FLAGMESH_METRICS_PUBLIC")]
    pub metrics_public: bool,
    /// Export traces over OTLP/gRPC to this endpoint (for example
    /// `http://127.0.0.1:4317`); also read from `OTEL_EXPORTER_OTLP_ENDPOINT`.
    #[arg(long = "otlp-endpoint", env = "FLAGMESH_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// How long a stop waits, in all, for open connections and tasks, in
    /// milliseconds.
    #[arg(long = "drain-ms", env = "FLAGMESH_DRAIN_MS", default_value_t = 5_000)]
    pub drain_ms: u64,
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read or holds something no option takes.
    #[error("config file {path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The command line, the environment or a file value is not valid.
    #[error("{0}")]
    Args(#[from] clap::Error),
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

/// Parses a binary's arguments from the process's command line,
/// environment and `--config` file; on an error prints it and exits
/// non-zero (`--help` and `--version` exit zero).
pub fn parse<A: Parser>() -> A {
    match parse_from::<A, _, _>(std::env::args_os()) {
        Ok(a) => a,
        Err(ConfigError::Args(e)) => e.exit(),
        Err(e) => {
            let program = A::command().get_name().to_owned();
            eprintln!("{program}: {e}");
            std::process::exit(2);
        }
    }
}

/// Parses `argv` (program name first) with the environment and the file
/// named by `--config`, if any: command line over environment over file
/// over defaults.
pub fn parse_from<A, I, T>(argv: I) -> Result<A, ConfigError>
where
    A: Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let command = A::command();
    let matches = command.clone().try_get_matches_from(&argv)?;
    let Some(path) = matches.get_one::<PathBuf>("config").cloned() else {
        return Ok(A::from_arg_matches(&matches)?);
    };
    let file_error = |message: String| ConfigError::File {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| file_error(e.to_string()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| file_error(e.to_string()))?;
    for (key, value) in &table {
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && a.get_id() != "config")
            .ok_or_else(|| file_error(format!("unknown key \"{key}\": no option --{key}")))?;
        // the command line and the environment win over the file
        if matches!(
            matches.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        argv.extend(file_arguments(key, value, arg.get_action()).map_err(file_error)?);
    }
    A::try_parse_from(&argv).map_err(|e| file_error(e.render().to_string().trim_end().to_owned()))
}

/// The command-line form of a file's `key = value`.
fn file_arguments(
    key: &str,
    value: &toml::Value,
    action: &ArgAction,
) -> Result<Vec<OsString>, String> {
    let scalar = |v: &toml::Value| -> Result<String, String> {
        Ok(match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(format!(
                    "\"{key}\": a {} is not an option value",
                    other.type_str()
                ));
            }
        })
    };
    match (action, value) {
        (ArgAction::SetTrue, toml::Value::Boolean(true)) => Ok(vec![format!("--{key}").into()]),
        (ArgAction::SetTrue, toml::Value::Boolean(false)) => Ok(Vec::new()),
        (ArgAction::SetTrue, _) => Err(format!("\"{key}\": true or false")),
        (_, toml::Value::Array(items)) => items
            .iter()
            .map(|v| Ok(format!("--{key}={}", scalar(v)?).into()))
            .collect(),
        (_, v) => Ok(vec![format!("--{key}={}", scalar(v)?).into()]),
    }
}

impl CommonArgs {
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

    /// The drain deadline of a stop.
    pub fn drain(&self) -> Duration {
        Duration::from_millis(self.drain_ms)
    }

    /// The credentials this server checks.
    pub fn authenticator(&self) -> Result<Arc<Authenticator>, ConfigError> {
        Ok(Arc::new(Authenticator::configure(
            self.tokens_file.as_deref(),
            self.tokens.as_deref(),
            self.insecure_dev,
        )?))
    }

    /// Starts logging (and trace export) as `service`.
    pub fn init_telemetry(&self, service: &str) -> crate::telemetry::TelemetryGuard {
        crate::telemetry::init(
            service,
            self.log_format.as_deref(),
            self.otlp_endpoint.as_deref(),
        )
    }

    /// Credentials, TLS and limits of this server (no rate limit: a node
    /// with rate-limited methods sets it). Refuses plaintext unless asked
    /// for (`--plaintext`, or `--insecure-dev`).
    pub fn security(&self) -> Result<Security, ConfigError> {
        let auth = self.authenticator()?;
        let grpc = pair(&self.tls_cert, &self.tls_key, "--tls-cert/--tls-key")?;
        let http = pair(
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
        Ok(Security {
            auth,
            grpc_tls,
            http_tls,
            tls_reload: Duration::from_millis(self.tls_reload_ms.max(50)),
            limits: Limits {
                streams_per_client: self.max_streams_per_client,
                rate_per_sec: 0.0,
                metrics_public: self.metrics_public,
                ..Limits::default()
            },
        })
    }
}

/// A certificate and its key, both or neither.
fn pair(
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
    what: &str,
) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some((cert.clone(), key.clone()))),
        (None, None) => Ok(None),
        _ => Err(ConfigError::Missing(format!(
            "{what}: a certificate needs its key and a key its certificate"
        ))),
    }
}

/// Checks a request rate limit's options (`option` names them in errors):
/// a rate of 0 or more calls per second (0: no limit), a burst of at least 1.
pub fn rate_limit(option: &str, rate: f64, burst: f64) -> Result<(f64, f64), ConfigError> {
    if !(rate.is_finite() && rate >= 0.0) {
        return Err(ConfigError::Invalid(format!(
            "--{option}-rate {rate}: calls per second, 0 or more (0: no limit)"
        )));
    }
    if !(burst.is_finite() && burst >= 1.0) {
        return Err(ConfigError::Invalid(format!(
            "--{option}-burst {burst}: at least 1"
        )));
    }
    Ok((rate, burst))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binary with the common options and one of its own.
    #[derive(Parser, Debug)]
    #[command(name = "test-node")]
    struct Node {
        #[command(flatten)]
        common: CommonArgs,
        /// A node option.
        #[arg(
            long = "heartbeat-ms",
            env = "FLAGMESH_TEST_HEARTBEAT_MS",
            default_value_t = 2_000
        )]
        heartbeat_ms: u64,
        /// A list option.
        #[arg(long = "upstream", value_delimiter = ',')]
        upstream: Vec<String>,
        /// A true/false option with a value.
        #[arg(long = "sync-writes", default_value_t = true, action = ArgAction::Set)]
        sync_writes: bool,
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(f.path(), text).expect("write");
        f
    }

    fn parse(args: &[&str]) -> Result<Node, ConfigError> {
        parse_from(std::iter::once("test-node").chain(args.iter().copied()))
    }

    #[test]
    fn file_fills_what_the_command_line_leaves() {
        let f = file(
            "heartbeat-ms = 150\nupstream = [\"a:1\", \"b:2\"]\ninsecure-dev = true\nsync-writes = false\nlisten = \"127.0.0.1:7000\"\n",
        );
        let path = f.path().to_string_lossy().to_string();
        let n = parse(&["--config", &path]).expect("parsed");
        assert_eq!(n.heartbeat_ms, 150);
        assert_eq!(n.upstream, ["a:1", "b:2"]);
        assert!(n.common.insecure_dev);
        assert!(!n.sync_writes);
        assert_eq!(
            n.common.listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 7000)))
        );
        // the command line wins
        let n = parse(&[
            "--config",
            &path,
            "--heartbeat-ms",
            "90",
            "--upstream",
            "c:3",
        ])
        .expect("parsed");
        assert_eq!(n.heartbeat_ms, 90);
        assert_eq!(n.upstream, ["c:3"]);
        // defaults stay where neither says anything
        assert_eq!(n.common.drain_ms, 5_000);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_by_name() {
        let f = file("heartbeat-ms = 150\nheartbeat-msec = 3\n");
        let e = parse(&["--config", &f.path().to_string_lossy()])
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|m| m.contains("\"heartbeat-msec\"")),
            "{e:?}"
        );
        let f = file("heartbeat-ms = \"soon\"\n");
        let e = parse(&["--config", &f.path().to_string_lossy()])
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|m| m.contains("--heartbeat-ms") && m.contains("soon")),
            "{e:?}"
        );
        let f = file("insecure-dev = \"yes\"\n");
        assert!(parse(&["--config", &f.path().to_string_lossy()]).is_err());
        let f = file("config = \"other.toml\"\n");
        assert!(parse(&["--config", &f.path().to_string_lossy()]).is_err());
        let e = parse(&["--config", "/nonexistent/flagmesh.toml"])
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|m| m.contains("/nonexistent/flagmesh.toml"))
        );
    }

    #[test]
    fn plaintext_must_be_asked_for() {
        let mut a = CommonArgs {
            tokens: Some(format!("ops:read:{}", crate::credentials::hash_token("x"))),
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
    fn rate_limits_out_of_range_are_refused_with_the_option_named() {
        for (rate, burst, option) in [
            (-1.0, 1.0, "--admin-rate"),
            (f64::NAN, 1.0, "--admin-rate"),
            (1.0, 0.5, "--admin-burst"),
        ] {
            let e = rate_limit("admin", rate, burst)
                .err()
                .map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|m| m.contains(option)),
                "{option}: {e:?}"
            );
        }
        assert!(rate_limit("admin", 0.0, 1.0).is_ok());
    }
}
