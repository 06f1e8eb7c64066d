//! The OpenFeature provider (`open-feature` 0.3): both modes behind
//! `FeatureProvider`, with reasons, variants, error codes and flag metadata
//! mapped, and provider events (ready, stale, configuration changes) on a
//! broadcast channel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use open_feature::provider::{
    FeatureProvider, ProviderMetadata, ProviderStatus, ResolutionDetails,
};
use open_feature::{
    EvaluationContext, EvaluationContextFieldValue, EvaluationError, EvaluationErrorCode,
    EvaluationReason, FlagMetadata, FlagMetadataValue, StructValue,
};
use serde_json::{Map, Value};
use tokio::sync::broadcast;

use crate::details::{Details, FromJson};
use crate::local::LocalClient;
use crate::remote::RemoteClient;

/// A provider event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderEvent {
    /// State is available.
    Ready,
    /// Answers may be stale (upstream lost or behind).
    Stale,
    /// Flags changed; the state is now at this revision.
    ConfigurationChanged {
        /// The new revision.
        revision: u64,
    },
}

enum Mode {
    Remote(Box<RemoteClient>),
    Local(Arc<LocalClient>),
}

/// flagmesh as an OpenFeature provider.
pub struct FlagmeshProvider {
    mode: Mode,
    metadata: ProviderMetadata,
    events: broadcast::Sender<ProviderEvent>,
    /// Whether `Ready` was sent; set and sent under this lock, so that a
    /// follower added later knows whether it missed it.
    ready: Arc<Mutex<bool>>,
}

/// Provider events from when they were followed ([`FlagmeshProvider::events`]),
/// starting with `Ready` when the provider was ready already.
pub struct ProviderEvents {
    missed_ready: bool,
    rx: broadcast::Receiver<ProviderEvent>,
}

impl ProviderEvents {
    /// The next event; `Err` once the provider is gone, or when this
    /// follower fell more than 64 events behind (`Lagged`).
    pub async fn recv(&mut self) -> Result<ProviderEvent, broadcast::error::RecvError> {
        if std::mem::take(&mut self.missed_ready) {
            return Ok(ProviderEvent::Ready);
        }
        self.rx.recv().await
    }
}

/// Locks `m`, also when a holder panicked (a flag is never left half set).
fn lock(m: &Mutex<bool>) -> std::sync::MutexGuard<'_, bool> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FlagmeshProvider {
    /// Evaluates through PoPs.
    pub fn remote(client: RemoteClient) -> Self {
        let (events, _) = broadcast::channel(64);
        Self {
            mode: Mode::Remote(Box::new(client)),
            metadata: ProviderMetadata::new("flagmesh-remote"),
            events,
            ready: Arc::default(),
        }
    }

    /// Evaluates in-process from a followed stream; emits events as the
    /// state changes. Must be called inside a tokio runtime.
    pub fn local(client: LocalClient) -> Self {
        let (events, _) = broadcast::channel(64);
        let client = Arc::new(client);
        let ready_sent = Arc::new(Mutex::new(false));
        let (c, tx, sent) = (client.clone(), events.clone(), ready_sent.clone());
        tokio::spawn(async move {
            let mut changes = c.changes();
            let mut was_stale = None;
            let mut ready = false;
            let mut reported = 0;
            loop {
                let revision = *changes.borrow_and_update();
                if revision > 0 && !ready {
                    ready = true;
                    let mut sent = lock(&sent);
                    *sent = true;
                    let _ = tx.send(ProviderEvent::Ready);
                } else if revision > 0 && revision != reported {
                    let _ = tx.send(ProviderEvent::ConfigurationChanged { revision });
                }
                reported = revision;
                let stale = c.stale();
                if was_stale != Some(stale) && stale && ready {
                    let _ = tx.send(ProviderEvent::Stale);
                }
                was_stale = Some(stale);
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {
                        // staleness can change without a new revision
                        let stale = c.stale();
                        if was_stale == Some(false) && stale {
                            let _ = tx.send(ProviderEvent::Stale);
                        }
                        was_stale = Some(stale);
                        continue;
                    }
                }
            }
        });
        Self {
            mode: Mode::Local(client),
            metadata: ProviderMetadata::new("flagmesh-local"),
            events,
            ready: ready_sent,
        }
    }

    /// Follows provider events from now on, starting with `Ready` when the
    /// provider is ready already (as an OpenFeature handler added late runs).
    pub fn events(&self) -> ProviderEvents {
        let sent = lock(&self.ready);
        ProviderEvents {
            missed_ready: *sent,
            rx: self.events.subscribe(),
        }
    }

    async fn details<T: FromJson>(
        &self,
        key: &str,
        ctx: &EvaluationContext,
        default: T,
    ) -> Details<T> {
        let context = context_json(ctx);
        match &self.mode {
            Mode::Remote(c) => c.value(key, &context, default).await,
            Mode::Local(c) => c.value(key, &context, default),
        }
    }
}

/// An OpenFeature context as the JSON object flagmesh evaluates.
pub fn context_json(ctx: &EvaluationContext) -> Value {
    let mut m = Map::new();
    if let Some(tk) = &ctx.targeting_key {
        m.insert("targetingKey".into(), Value::String(tk.clone()));
    }
    for (k, v) in &ctx.custom_fields {
        let json = match v {
            EvaluationContextFieldValue::Bool(b) => Value::Bool(*b),
            EvaluationContextFieldValue::Int(i) => Value::from(*i),
            EvaluationContextFieldValue::Float(f) => serde_json::Number::from_f64(*f)
                .map(Value::Number)
                .unwrap_or(Value::Null),
            EvaluationContextFieldValue::String(s) => Value::String(s.clone()),
            EvaluationContextFieldValue::DateTime(t) => Value::String(t.to_string()),
            EvaluationContextFieldValue::Struct(s) => match s.downcast_ref::<Value>() {
                Some(v) => v.clone(),
                None => match s.downcast_ref::<StructValue>() {
                    Some(sv) => struct_json(sv),
                    None => Value::Null,
                },
            },
        };
        m.insert(k.clone(), json);
    }
    Value::Object(m)
}

fn of_json(v: &open_feature::Value) -> Value {
    match v {
        open_feature::Value::Bool(b) => Value::Bool(*b),
        open_feature::Value::Int(i) => Value::from(*i),
        open_feature::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        open_feature::Value::String(s) => Value::String(s.clone()),
        open_feature::Value::Array(a) => Value::Array(a.iter().map(of_json).collect()),
        open_feature::Value::Struct(s) => struct_json(s),
    }
}

fn struct_json(s: &StructValue) -> Value {
    Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), of_json(v)))
            .collect(),
    )
}

/// A JSON value as an OpenFeature value.
pub fn json_of(v: &Value) -> open_feature::Value {
    match v {
        Value::Bool(b) => open_feature::Value::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => open_feature::Value::Int(i),
            None => open_feature::Value::Float(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => open_feature::Value::String(s.clone()),
        Value::Array(a) => open_feature::Value::Array(a.iter().map(json_of).collect()),
        Value::Object(m) => open_feature::Value::Struct(StructValue {
            fields: m
                .iter()
                .map(|(k, v)| (k.clone(), json_of(v)))
                .collect::<HashMap<_, _>>(),
        }),
        Value::Null => open_feature::Value::String(String::new()),
    }
}

fn reason(r: &str) -> EvaluationReason {
    match r {
        "STATIC" => EvaluationReason::Static,
        "TARGETING_MATCH" => EvaluationReason::TargetingMatch,
        "DEFAULT" => EvaluationReason::Default,
        "DISABLED" => EvaluationReason::Disabled,
        "ERROR" => EvaluationReason::Error,
        other => EvaluationReason::Other(other.to_owned()),
    }
}

fn error_code(c: &str) -> EvaluationErrorCode {
    match c {
        "FLAG_NOT_FOUND" => EvaluationErrorCode::FlagNotFound,
        "PARSE_ERROR" => EvaluationErrorCode::ParseError,
        "TYPE_MISMATCH" => EvaluationErrorCode::TypeMismatch,
        "TARGETING_KEY_MISSING" => EvaluationErrorCode::TargetingKeyMissing,
        "INVALID_CONTEXT" => EvaluationErrorCode::InvalidContext,
        other => EvaluationErrorCode::General(other.to_owned()),
    }
}

/// Maps details to the OpenFeature result: errors become
/// `EvaluationError`s (the OpenFeature client then returns the default).
fn resolution<T, U>(
    d: Details<T>,
    map: impl FnOnce(T) -> U,
) -> Result<ResolutionDetails<U>, EvaluationError> {
    if let Some(code) = &d.error_code {
        return Err(EvaluationError {
            code: error_code(code),
            message: d.error_message.clone(),
        });
    }
    let mut metadata = FlagMetadata::default();
    for (k, v) in &d.metadata {
        let value = match v {
            Value::Bool(b) => FlagMetadataValue::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => FlagMetadataValue::Int(i),
                None => FlagMetadataValue::Float(n.as_f64().unwrap_or(0.0)),
            },
            Value::String(s) => FlagMetadataValue::String(s.clone()),
            _ => continue,
        };
        metadata = metadata.with_value(k.clone(), value);
    }
    Ok(ResolutionDetails {
        value: map(d.value),
        variant: d.variant,
        reason: Some(reason(&d.reason)),
        flag_metadata: Some(metadata),
    })
}

#[async_trait::async_trait]
impl FeatureProvider for FlagmeshProvider {
    fn status(&self) -> ProviderStatus {
        match &self.mode {
            Mode::Remote(_) => ProviderStatus::Ready,
            Mode::Local(c) if c.revision() == 0 => ProviderStatus::NotReady,
            Mode::Local(c) if c.stale() => ProviderStatus::STALE,
            Mode::Local(_) => ProviderStatus::Ready,
        }
    }

    fn metadata(&self) -> &ProviderMetadata {
        &self.metadata
    }

    async fn resolve_bool_value(
        &self,
        flag_key: &str,
        ctx: &EvaluationContext,
    ) -> Result<ResolutionDetails<bool>, EvaluationError> {
        resolution(self.details(flag_key, ctx, false).await, |v| v)
    }

    async fn resolve_int_value(
        &self,
        flag_key: &str,
        ctx: &EvaluationContext,
    ) -> Result<ResolutionDetails<i64>, EvaluationError> {
        resolution(self.details(flag_key, ctx, 0i64).await, |v| v)
    }

    async fn resolve_float_value(
        &self,
        flag_key: &str,
        ctx: &EvaluationContext,
    ) -> Result<ResolutionDetails<f64>, EvaluationError> {
        resolution(self.details(flag_key, ctx, 0f64).await, |v| v)
    }

    async fn resolve_string_value(
        &self,
        flag_key: &str,
        ctx: &EvaluationContext,
    ) -> Result<ResolutionDetails<String>, EvaluationError> {
        resolution(self.details(flag_key, ctx, String::new()).await, |v| v)
    }

    async fn resolve_struct_value(
        &self,
        flag_key: &str,
        ctx: &EvaluationContext,
    ) -> Result<ResolutionDetails<StructValue>, EvaluationError> {
        resolution(self.details(flag_key, ctx, Map::new()).await, |m| {
            StructValue {
                fields: m.iter().map(|(k, v)| (k.clone(), json_of(v))).collect(),
            }
        })
    }
}
