//! Remote mode: evaluation through PoPs, nearest first. Each call has a
//! deadline; `UNAVAILABLE`, a missed deadline or a broken connection moves
//! on to the next PoP. A circuit breaker per PoP opens after repeated
//! failures, so a dead PoP costs one deadline and then nothing until a
//! half-open probe finds it back. When nothing answers, typed calls return
//! the caller's default with reason `ERROR`: they never fail.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flagmesh_client::BearerToken;
use flagmesh_client::ClientTls;
use flagmesh_proto::convert::{map_to_struct, struct_to_map, value_to_json};
use flagmesh_proto::v1 as pb;
use flagmesh_proto::v1::evaluation_client::EvaluationClient;
use serde_json::{Map, Value};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::details::{Details, FromJson};

/// How a remote client behaves.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// PoP addresses, nearest first (`host:port` or URIs).
    pub pops: Vec<String>,
    /// An evaluation key, if the PoPs require one.
    pub token: Option<String>,
    /// The flag set (empty: each PoP's default).
    pub flag_set: String,
    /// The deadline of one call to one PoP.
    pub deadline: Duration,
    /// Consecutive failures that open a PoP's breaker.
    pub failures_to_open: u32,
    /// How long an open breaker skips its PoP before a half-open probe.
    pub open_for: Duration,
    /// TLS to the PoPs (a CA to trust, optionally a client certificate);
    /// `None`: plaintext.
    pub tls: Option<ClientTls>,
}

impl RemoteConfig {
    /// Defaults: 250 ms deadline, breaker opens after 3 failures for 5 s.
    pub fn new(pops: Vec<String>) -> Self {
        Self {
            pops,
            token: None,
            flag_set: String::new(),
            deadline: Duration::from_millis(250),
            failures_to_open: 3,
            open_for: Duration::from_secs(5),
            tls: None,
        }
    }
}

/// Why a remote call failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Every PoP failed or was skipped by its breaker.
    #[error("no PoP answered: {0}")]
    Unavailable(String),
    /// A PoP refused the call (credentials, bad request).
    #[error("{0:?}: {1}")]
    Refused(Code, String),
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Breaker {
    Closed { failures: u32 },
    Open { until: Instant },
}

struct Pop {
    address: String,
    client: EvaluationClient<InterceptedService<Channel, BearerToken>>,
    breaker: Mutex<Breaker>,
    attempts: AtomicU64,
}

/// A breaker's state, for observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls skip this PoP until a probe is due.
    Open,
    /// A probe is due: the next call tries this PoP.
    HalfOpen,
}

/// Evaluates through PoPs.
pub struct RemoteClient {
    config: RemoteConfig,
    pops: Vec<Pop>,
}

impl RemoteClient {
    /// A client; connections are made lazily, so this never blocks.
    pub fn new(config: RemoteConfig) -> Result<Self, RemoteError> {
        if config.pops.is_empty() {
            return Err(RemoteError::Config(
                "at least one PoP address is needed".into(),
            ));
        }
        let token = BearerToken::new(config.token.as_deref())
            .map_err(|e| RemoteError::Config(e.message().into()))?;
        let mut pops = Vec::with_capacity(config.pops.len());
        for address in &config.pops {
            let endpoint = flagmesh_client::endpoint(address, config.tls.as_ref())
                .map_err(|e| RemoteError::Config(format!("{address}: {e}")))?
                .connect_timeout(config.deadline)
                .timeout(config.deadline)
                .tcp_nodelay(true);
            pops.push(Pop {
                address: address.clone(),
                client: EvaluationClient::with_interceptor(endpoint.connect_lazy(), token.clone()),
                breaker: Mutex::new(Breaker::Closed { failures: 0 }),
                attempts: AtomicU64::new(0),
            });
        }
        Ok(Self { config, pops })
    }

    /// How many calls were sent to the PoP at `index` (for observation and tests).
    pub fn attempts(&self, index: usize) -> u64 {
        self.pops
            .get(index)
            .map(|p| p.attempts.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// The breaker of the PoP at `index`.
    pub fn breaker(&self, index: usize) -> Option<BreakerState> {
        let p = self.pops.get(index)?;
        let b = *p.breaker.lock().unwrap_or_else(|e| e.into_inner());
        Some(match b {
            Breaker::Closed { .. } => BreakerState::Closed,
            Breaker::Open { until } if Instant::now() >= until => BreakerState::HalfOpen,
            Breaker::Open { .. } => BreakerState::Open,
        })
    }

    fn may_try(&self, p: &Pop) -> bool {
        match *p.breaker.lock().unwrap_or_else(|e| e.into_inner()) {
            Breaker::Closed { .. } => true,
            Breaker::Open { until } => Instant::now() >= until,
        }
    }

    fn succeeded(&self, p: &Pop) {
        *p.breaker.lock().unwrap_or_else(|e| e.into_inner()) = Breaker::Closed { failures: 0 };
    }

    fn failed(&self, p: &Pop) {
        let mut b = p.breaker.lock().unwrap_or_else(|e| e.into_inner());
        *b = match *b {
            Breaker::Closed { failures } if failures + 1 >= self.config.failures_to_open => {
                Breaker::Open {
                    until: Instant::now() + self.config.open_for,
                }
            }
            Breaker::Closed { failures } => Breaker::Closed {
                failures: failures + 1,
            },
            // a failed half-open probe opens it again
            Breaker::Open { .. } => Breaker::Open {
                until: Instant::now() + self.config.open_for,
            },
        };
    }

    /// Runs `call` against PoPs in order until one answers.
    async fn first_answer<T, F, Fut>(&self, mut call: F) -> Result<T, RemoteError>
    where
        F: FnMut(EvaluationClient<InterceptedService<Channel, BearerToken>>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut errors = Vec::new();
        for p in &self.pops {
            if !self.may_try(p) {
                continue;
            }
            p.attempts.fetch_add(1, Ordering::Relaxed);
            match tokio::time::timeout(self.config.deadline, call(p.client.clone())).await {
                Ok(Ok(r)) => {
                    self.succeeded(p);
                    return Ok(r.into_inner());
                }
                Ok(Err(s))
                    if matches!(
                        s.code(),
                        Code::Unavailable
                            | Code::DeadlineExceeded
                            | Code::Unknown
                            | Code::Cancelled
                    ) =>
                {
                    self.failed(p);
                    errors.push(format!("{}: {}", p.address, s.message()));
                }
                Ok(Err(s)) => return Err(RemoteError::Refused(s.code(), s.message().to_owned())),
                Err(_) => {
                    self.failed(p);
                    errors.push(format!(
                        "{}: deadline of {:?} passed",
                        p.address, self.config.deadline
                    ));
                }
            }
        }
        if errors.is_empty() {
            errors.push("every PoP's circuit breaker is open".into());
        }
        Err(RemoteError::Unavailable(errors.join("; ")))
    }

    /// Evaluates one flag; fails only when no PoP answered or one refused.
    pub async fn evaluate(
        &self,
        key: &str,
        context: &Value,
        expected: pb::ValueType,
    ) -> Result<pb::EvaluateResponse, RemoteError> {
        let req = pb::EvaluateRequest {
            flag_set: self.config.flag_set.clone(),
            flag_key: key.to_owned(),
            context: context.as_object().map(map_to_struct),
            expected_type: expected as i32,
        };
        self.first_answer(|mut c| {
            let req = req.clone();
            async move { c.evaluate(req).await }
        })
        .await
    }

    /// Evaluates every flag of the flag set.
    pub async fn evaluate_all(
        &self,
        context: &Value,
    ) -> Result<pb::EvaluateAllResponse, RemoteError> {
        let req = pb::EvaluateAllRequest {
            flag_set: self.config.flag_set.clone(),
            context: context.as_object().map(map_to_struct),
        };
        self.first_answer(|mut c| {
            let req = req.clone();
            async move { c.evaluate_all(req).await }
        })
        .await
    }

    /// A typed evaluation that always returns a value (see [`Details`]).
    pub async fn value<T: FromJson>(&self, key: &str, context: &Value, default: T) -> Details<T> {
        let expected = match T::TYPE {
            flagmesh_engine::ValueType::Bool => pb::ValueType::Bool,
            flagmesh_engine::ValueType::String => pb::ValueType::String,
            flagmesh_engine::ValueType::Int => pb::ValueType::Int,
            flagmesh_engine::ValueType::Float => pb::ValueType::Float,
            flagmesh_engine::ValueType::Object => pb::ValueType::Object,
            flagmesh_engine::ValueType::Any => pb::ValueType::Any,
        };
        match self.evaluate(key, context, expected).await {
            Ok(r) => details_of(r, default),
            Err(e) => Details::fallback(default, "GENERAL", e.to_string()),
        }
    }

    /// A boolean flag, or `default`.
    pub async fn bool_value(&self, key: &str, context: &Value, default: bool) -> Details<bool> {
        self.value(key, context, default).await
    }

    /// A string flag, or `default`.
    pub async fn string_value(&self, key: &str, context: &Value, default: &str) -> Details<String> {
        self.value(key, context, default.to_owned()).await
    }

    /// An integer flag, or `default`.
    pub async fn int_value(&self, key: &str, context: &Value, default: i64) -> Details<i64> {
        self.value(key, context, default).await
    }

    /// A number flag, or `default`.
    pub async fn float_value(&self, key: &str, context: &Value, default: f64) -> Details<f64> {
        self.value(key, context, default).await
    }

    /// An object flag, or `default`.
    pub async fn json_value(
        &self,
        key: &str,
        context: &Value,
        default: Map<String, Value>,
    ) -> Details<Map<String, Value>> {
        self.value(key, context, default).await
    }
}

/// The name the proto gives a reason, as OpenFeature spells it.
pub fn reason_name(r: i32) -> &'static str {
    match pb::Reason::try_from(r) {
        Ok(pb::Reason::Static) => "STATIC",
        Ok(pb::Reason::TargetingMatch) => "TARGETING_MATCH",
        Ok(pb::Reason::Default) => "DEFAULT",
        Ok(pb::Reason::Disabled) => "DISABLED",
        _ => "ERROR",
    }
}

/// The name the proto gives an error code.
pub fn error_name(c: i32) -> Option<&'static str> {
    Some(match pb::ErrorCode::try_from(c) {
        Ok(pb::ErrorCode::FlagNotFound) => "FLAG_NOT_FOUND",
        Ok(pb::ErrorCode::ParseError) => "PARSE_ERROR",
        Ok(pb::ErrorCode::TypeMismatch) => "TYPE_MISMATCH",
        Ok(pb::ErrorCode::TargetingKeyMissing) => "TARGETING_KEY_MISSING",
        Ok(pb::ErrorCode::InvalidContext) => "INVALID_CONTEXT",
        Ok(pb::ErrorCode::General) => "GENERAL",
        _ => return None,
    })
}

/// Typed details from a PoP's answer.
pub fn details_of<T: FromJson>(r: pb::EvaluateResponse, default: T) -> Details<T> {
    let value = r
        .value
        .as_ref()
        .map(value_to_json)
        .and_then(|v| T::from_json(&v));
    let error_code = error_name(r.error_code).map(str::to_owned);
    let (value, variant) = match value {
        Some(v) if error_code.is_none() => (v, (!r.variant.is_empty()).then_some(r.variant)),
        _ => (default, None),
    };
    Details {
        value,
        variant,
        reason: reason_name(r.reason).to_owned(),
        error_code,
        error_message: (!r.error_message.is_empty()).then_some(r.error_message),
        metadata: r.metadata.as_ref().map(struct_to_map).unwrap_or_default(),
        revision: r.revision,
        pop_id: r.pop_id,
        stale: r.stale,
    }
}
