//! The OpenFeature flagd protocols at the PoP, so existing flagd providers
//! work unchanged: `flagd.evaluation.v1.Service` and
//! `flagd.evaluation.v2.Service` (RPC providers; `EventStream` sends
//! `provider_ready` first, then `configuration_change` naming the flags that
//! changed, and `keep_alive` when idle), and `flagd.sync.v1.FlagSyncService`
//! (in-process providers: the whole flag document of the selected set, once
//! and again after every change). The flag set is chosen by the
//! `flagd-selector` header (or the request's `selector`), else the PoP's
//! default. Errors follow flagd's mapping to gRPC codes.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use flagmesh_client::identity::principal;
use flagmesh_engine::{ErrorCode, Reason, ValueType, validate_context};
use flagmesh_proto::convert::{map_to_struct, struct_to_map};
use flagmesh_proto::flagd::evaluation::{v1, v2};
use flagmesh_proto::flagd::sync::v1 as sync;
use serde_json::{Map, Value};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::evaluation::{EvalContext, Outcome, Target};
use crate::state::{PopState, SetState};

/// How often an idle EventStream sends `keep_alive`.
pub const KEEP_ALIVE: Duration = Duration::from_secs(20);

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The flagd services over a PoP's state.
#[derive(Clone)]
pub struct Flagd {
    ctx: EvalContext,
}

impl Flagd {
    /// The services.
    pub fn new(ctx: EvalContext) -> Self {
        Self { ctx }
    }

    /// The flag set a request selects: `flagd-selector` header, then the
    /// request's selector, then the default. `flagSetId=NAME` is accepted.
    fn selected<T>(&self, req: &Request<T>, field: &str) -> Result<String, Status> {
        let header = req
            .metadata()
            .get("flagd-selector")
            .and_then(|v| v.to_str().ok());
        let raw = header.filter(|h| !h.is_empty()).unwrap_or(field);
        let name = raw.strip_prefix("flagSetId=").unwrap_or(raw).trim();
        let set = self.ctx.set_name(name).to_owned();
        if let Some(p) = principal(req)
            && !p.may_use_flag_set(&set)
        {
            return Err(Status::permission_denied(format!(
                "credential \"{}\" may not evaluate flag set \"{set}\"",
                p.name
            )));
        }
        Ok(set)
    }

    fn evaluate<T, R>(
        &self,
        req: Request<T>,
        key: impl Fn(&T) -> (&str, Option<&prost_types::Struct>),
        expected: ValueType,
        build: impl FnOnce(&Outcome<'_>, &str) -> R,
    ) -> Result<Response<R>, Status> {
        let set = self.selected(&req, "")?;
        let inner = req.into_inner();
        let (flag_key, context) = key(&inner);
        let context = Value::Object(context.map(struct_to_map).unwrap_or_default());
        if let Err(e) = validate_context(&context) {
            return Err(Status::invalid_argument(format!(
                "flag: {flag_key}, error: {}",
                e.message
            )));
        }
        let state = self.ctx.state.load();
        let started = std::time::Instant::now();
        let target = Target::lookup(&state, &set, flag_key);
        let outcome = target.resolve(&context, None, expected);
        self.ctx
            .stats
            .record(outcome.resolution.reason, started.elapsed());
        if let Some(err) = &outcome.resolution.error {
            return Err(status_of(flag_key, err.code, &err.message));
        }
        Ok(Response::new(build(&outcome, flag_key)))
    }
}

/// flagd's mapping of resolution errors to gRPC codes.
pub fn status_of(key: &str, code: ErrorCode, message: &str) -> Status {
    let text = format!("flag: {key}, error: {}, {message}", code.as_str());
    match code {
        ErrorCode::FlagNotFound => Status::not_found(text),
        ErrorCode::TypeMismatch | ErrorCode::InvalidContext | ErrorCode::TargetingKeyMissing => {
            Status::invalid_argument(text)
        }
        ErrorCode::ParseError => Status::data_loss(text),
        ErrorCode::General => Status::unknown(text),
    }
}

fn reason(o: &Outcome<'_>) -> String {
    o.resolution.reason.as_str().to_owned()
}

fn variant(o: &Outcome<'_>) -> String {
    o.resolution.variant.unwrap_or_default().to_owned()
}

fn metadata(o: &Outcome<'_>) -> Option<prost_types::Struct> {
    Some(flagmesh_mesh::compiled::metadata_struct(
        o.resolution.metadata,
    ))
}

fn object(o: &Outcome<'_>) -> Option<prost_types::Struct> {
    o.resolution.object_value().map(map_to_struct)
}

/// The flags of `new` that differ from `old` (changed, added or removed).
fn changed_keys(old: Option<&SetState>, new: &SetState) -> BTreeMap<String, &'static str> {
    let mut out = BTreeMap::new();
    for (k, f) in &new.flags {
        match old.and_then(|o| o.flags.get(k)) {
            Some(prev) if Arc::ptr_eq(prev, f) => {}
            Some(_) => {
                out.insert(k.to_string(), "update");
            }
            None => {
                out.insert(k.to_string(), "write");
            }
        }
    }
    if let Some(o) = old {
        for k in o.flags.keys() {
            if !new.flags.contains_key(k) {
                out.insert(k.to_string(), "delete");
            }
        }
    }
    out
}

fn set_of(state: &PopState, set: &str) -> Arc<SetState> {
    state.sets.get(set).cloned().unwrap_or_default()
}

/// Streams `provider_ready`, then a `configuration_change` per change of the
/// selected set, and `keep_alive` when idle, as messages built by `make`.
fn event_stream<T: Send + 'static>(
    ctx: EvalContext,
    set: String,
    make: fn(&str, Option<prost_types::Struct>) -> T,
) -> EventStream<T> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut changes = ctx.changes.clone();
        let mut last = set_of(&ctx.state.load(), &set);
        if tx
            .send(Ok(make(
                "provider_ready",
                Some(prost_types::Struct::default()),
            )))
            .await
            .is_err()
        {
            return;
        }
        loop {
            tokio::select! {
                r = changes.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let current = set_of(&ctx.state.load(), &set);
                    let changed = changed_keys(Some(&last), &current);
                    last = current;
                    if changed.is_empty() {
                        continue;
                    }
                    let mut flags = Map::new();
                    for (k, kind) in changed {
                        flags.insert(k.clone(), serde_json::json!({"type": kind, "source": "flagmesh", "flagKey": k}));
                    }
                    let mut data = Map::new();
                    data.insert("flags".into(), Value::Object(flags));
                    if tx.send(Ok(make("configuration_change", Some(map_to_struct(&data))))).await.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep(KEEP_ALIVE) => {
                    if tx.send(Ok(make("keep_alive", Some(prost_types::Struct::default())))).await.is_err() {
                        return;
                    }
                }
                _ = tx.closed() => return,
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// What the flagd evaluation services (v1 and v2) have in common: the
/// typed resolvers (one per value type), each resolving one flag with
/// [`Flagd::evaluate`] and building its response from the outcome, and the
/// event stream. A macro inside an `#[async_trait]` impl is not rewritten
/// by it, so this spells the boxed future those trait methods return; both
/// answer synchronously, so the future is ready.
macro_rules! flagd_evaluation {
    (
        $pkg:ident, variant: |$vo:ident| $variant:expr;
        $($method:ident($req:ident) -> $resp:ident, $ty:expr, |$o:ident| $value:expr;)*
    ) => {
        type EventStreamStream = EventStream<$pkg::EventStreamResponse>;

        fn event_stream<'life0, 'async_trait>(
            &'life0 self,
            request: Request<$pkg::EventStreamRequest>,
        ) -> Pin<Box<dyn std::future::Future<Output = Result<Response<Self::EventStreamStream>, Status>> + Send + 'async_trait>>
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            let answer = self.selected(&request, "").map(|set| {
                Response::new(event_stream(self.ctx.clone(), set, |t, data| {
                    $pkg::EventStreamResponse {
                        r#type: t.to_owned(),
                        data,
                    }
                }))
            });
            Box::pin(std::future::ready(answer))
        }
    $(
        fn $method<'life0, 'async_trait>(
            &'life0 self,
            request: Request<$pkg::$req>,
        ) -> Pin<Box<dyn std::future::Future<Output = Result<Response<$pkg::$resp>, Status>> + Send + 'async_trait>>
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            let answer = self.evaluate(
                request,
                |i| (&i.flag_key, i.context.as_ref()),
                $ty,
                |$o, _| $pkg::$resp {
                    value: $value,
                    reason: reason($o),
                    variant: {
                        let $vo = $o;
                        $variant
                    },
                    metadata: metadata($o),
                },
            );
            Box::pin(std::future::ready(answer))
        }
    )*
    };
}

#[tonic::async_trait]
impl v1::service_server::Service for Flagd {
    async fn resolve_all(
        &self,
        request: Request<v1::ResolveAllRequest>,
    ) -> Result<Response<v1::ResolveAllResponse>, Status> {
        let set = self.selected(&request, "")?;
        let context = Value::Object(
            request
                .get_ref()
                .context
                .as_ref()
                .map(struct_to_map)
                .unwrap_or_default(),
        );
        if let Err(e) = validate_context(&context) {
            return Err(Status::invalid_argument(e.message.to_string()));
        }
        let state = self.ctx.state.load();
        let set_state = set_of(&state, &set);
        let mut flags = std::collections::HashMap::new();
        for (k, f) in &set_state.flags {
            let target = Target::of(f);
            let o = target.resolve(&context, None, ValueType::Any);
            let r = &o.resolution;
            // like flagd: flags that do not resolve to a value are left out
            let Some(v) = r.value else { continue };
            if r.error.is_some() || r.reason == Reason::Disabled {
                continue;
            }
            let value = match v {
                Value::Bool(b) => v1::any_flag::Value::BoolValue(*b),
                Value::String(s) => v1::any_flag::Value::StringValue(s.clone()),
                Value::Number(n) => v1::any_flag::Value::DoubleValue(n.as_f64().unwrap_or(0.0)),
                Value::Object(m) => v1::any_flag::Value::ObjectValue(map_to_struct(m)),
                _ => continue,
            };
            flags.insert(
                k.to_string(),
                v1::AnyFlag {
                    reason: reason(&o),
                    variant: variant(&o),
                    metadata: metadata(&o),
                    value: Some(value),
                },
            );
        }
        Ok(Response::new(v1::ResolveAllResponse {
            flags,
            metadata: Some(map_to_struct(&set_state.metadata)),
        }))
    }

    flagd_evaluation! {
        v1, variant: |o| variant(o);
        resolve_boolean(ResolveBooleanRequest) -> ResolveBooleanResponse,
            ValueType::Bool, |o| o.resolution.bool_value().unwrap_or_default();
        resolve_string(ResolveStringRequest) -> ResolveStringResponse,
            ValueType::String, |o| o.resolution.string_value().unwrap_or_default().to_owned();
        resolve_float(ResolveFloatRequest) -> ResolveFloatResponse,
            ValueType::Float, |o| o.resolution.float_value().unwrap_or_default();
        resolve_int(ResolveIntRequest) -> ResolveIntResponse,
            ValueType::Int, |o| o.resolution.int_value().unwrap_or_default();
        resolve_object(ResolveObjectRequest) -> ResolveObjectResponse,
            ValueType::Object, |o| object(o);
    }
}

#[tonic::async_trait]
impl v2::service_server::Service for Flagd {
    flagd_evaluation! {
        v2, variant: |o| o.resolution.variant.map(str::to_owned);
        resolve_boolean(ResolveBooleanRequest) -> ResolveBooleanResponse,
            ValueType::Bool, |o| o.resolution.bool_value();
        resolve_string(ResolveStringRequest) -> ResolveStringResponse,
            ValueType::String, |o| o.resolution.string_value().map(str::to_owned);
        resolve_float(ResolveFloatRequest) -> ResolveFloatResponse,
            ValueType::Float, |o| o.resolution.float_value();
        resolve_int(ResolveIntRequest) -> ResolveIntResponse,
            ValueType::Int, |o| o.resolution.int_value();
        resolve_object(ResolveObjectRequest) -> ResolveObjectResponse,
            ValueType::Object, |o| object(o);
    }
}

/// The selected set as a flagd document (map form) and its metadata.
pub fn document(set: &SetState) -> (String, Map<String, Value>) {
    let mut flags = Map::new();
    for (k, f) in &set.flags {
        let def = f.stored().map_err(|e| e.to_string()).and_then(|s| {
            serde_json::from_slice::<Value>(&s.definition_json).map_err(|e| e.to_string())
        });
        match def {
            Ok(def) => {
                flags.insert(k.to_string(), def);
            }
            Err(e) => tracing::error!(key = %k, error = %e, "flag left out of a synced document"),
        }
    }
    // the set's metadata as written, as flagd serves a source's: a
    // `flagSetId` is there only when the document has one
    let metadata = (*set.metadata).clone();
    let mut doc = Map::new();
    doc.insert("flags".into(), Value::Object(flags));
    doc.insert("metadata".into(), Value::Object(metadata.clone()));
    (
        serde_json::to_string(&Value::Object(doc)).unwrap_or_default(),
        metadata,
    )
}

#[tonic::async_trait]
impl sync::flag_sync_service_server::FlagSyncService for Flagd {
    type SyncFlagsStream = EventStream<sync::SyncFlagsResponse>;

    async fn sync_flags(
        &self,
        request: Request<sync::SyncFlagsRequest>,
    ) -> Result<Response<Self::SyncFlagsStream>, Status> {
        #[allow(deprecated)]
        let field = request.get_ref().selector.clone();
        let set = self.selected(&request, &field)?;
        let ctx = self.ctx.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut changes = ctx.changes.clone();
            let mut last: Option<Arc<SetState>> = None;
            loop {
                let current = set_of(&ctx.state.load(), &set);
                let differs = match &last {
                    None => true,
                    Some(l) => {
                        l.metadata != current.metadata
                            || !changed_keys(Some(l), &current).is_empty()
                    }
                };
                if differs {
                    let (flag_configuration, metadata) = document(&current);
                    let msg = sync::SyncFlagsResponse {
                        flag_configuration,
                        sync_context: Some(map_to_struct(&metadata)),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    last = Some(current);
                }
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn fetch_all_flags(
        &self,
        request: Request<sync::FetchAllFlagsRequest>,
    ) -> Result<Response<sync::FetchAllFlagsResponse>, Status> {
        #[allow(deprecated)]
        let field = request.get_ref().selector.clone();
        let set = self.selected(&request, &field)?;
        let (flag_configuration, _) = document(&set_of(&self.ctx.state.load(), &set));
        Ok(Response::new(sync::FetchAllFlagsResponse {
            flag_configuration,
        }))
    }

    async fn get_metadata(
        &self,
        request: Request<sync::GetMetadataRequest>,
    ) -> Result<Response<sync::GetMetadataResponse>, Status> {
        let set = self.selected(&request, "")?;
        let (_, metadata) = document(&set_of(&self.ctx.state.load(), &set));
        Ok(Response::new(sync::GetMetadataResponse {
            metadata: Some(map_to_struct(&metadata)),
        }))
    }
}
