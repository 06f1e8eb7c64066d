//! `flagmesh.v1.Evaluation` at the PoP: every evaluation reads the current
//! immutable state (one atomic load, no lock held while evaluating), checks
//! the context once per request, and answers with value, variant, reason,
//! error code, metadata, the flag's `mod_revision`, the state revision, the
//! PoP's id and whether it is stale. Resolution failures are answered
//! in-band (reason `ERROR`), so a caller always gets its default and a
//! reason; only credentials fail a call.

use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use flagmesh_client::identity::principal;
use flagmesh_engine::{ValueType, validate_context};
use flagmesh_mesh::subscriber::SyncStatus;
use flagmesh_proto::convert::{map_to_struct, struct_to_map};
use flagmesh_proto::encoded::EncodedEvaluateAllResponse;
use flagmesh_proto::encoded::evaluation_server::Evaluation;
use flagmesh_proto::v1 as pb;
use flagmesh_proto::wire;
use serde_json::Value;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

pub use flagmesh_mesh::compiled::{Outcome, Target, evaluate_response, write_evaluate_response};
use flagmesh_mesh::compiled::{PopFlag, PopState, SetState};

/// What the evaluation service reads.
#[derive(Clone)]
pub struct EvalContext {
    /// The current state.
    pub state: Arc<ArcSwap<PopState>>,
    /// Notified with the revision after every apply.
    pub changes: watch::Receiver<u64>,
    /// The subscriber's status (staleness).
    pub status: watch::Receiver<SyncStatus>,
    /// This PoP's id.
    pub pop_id: String,
    /// The flag set of requests that name none.
    pub default_flag_set: String,
    /// Evaluation counters.
    pub stats: Arc<crate::stats::EvalStats>,
}

impl EvalContext {
    /// Whether answers are stale now.
    pub fn stale(&self, state: &PopState) -> bool {
        state.revision == 0 || self.status.borrow().stale()
    }

    /// The flag set a request means.
    pub fn set_name<'a>(&'a self, requested: &'a str) -> &'a str {
        if requested.is_empty() {
            &self.default_flag_set
        } else {
            requested
        }
    }
}

/// The Evaluation service.
pub struct EvaluationService {
    ctx: EvalContext,
}

impl EvaluationService {
    /// The service over a PoP's state.
    pub fn new(ctx: EvalContext) -> Self {
        Self { ctx }
    }
}

/// Maps the proto's expected type to the engine's.
pub fn value_type(t: i32) -> ValueType {
    match pb::ValueType::try_from(t) {
        Ok(pb::ValueType::Bool) => ValueType::Bool,
        Ok(pb::ValueType::String) => ValueType::String,
        Ok(pb::ValueType::Int) => ValueType::Int,
        Ok(pb::ValueType::Float) => ValueType::Float,
        Ok(pb::ValueType::Object) => ValueType::Object,
        _ => ValueType::Any,
    }
}

impl EvaluationService {
    fn response(
        &self,
        key: &str,
        o: &Outcome<'_>,
        state: &PopState,
        stale: bool,
    ) -> pb::EvaluateResponse {
        pb::EvaluateResponse {
            revision: state.revision,
            pop_id: self.ctx.pop_id.clone(),
            stale,
            ..evaluate_response(key, o)
        }
    }

    fn check_access<T>(&self, req: &Request<T>, set: &str) -> Result<(), Status> {
        match principal(req) {
            Some(p) if !p.may_use_flag_set(set) => Err(Status::permission_denied(format!(
                "credential \"{}\" may not evaluate flag set \"{set}\"",
                p.name
            ))),
            _ => Ok(()),
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Evaluation for EvaluationService {
    async fn evaluate(
        &self,
        request: Request<pb::EvaluateRequest>,
    ) -> Result<Response<pb::EvaluateResponse>, Status> {
        let set = self.ctx.set_name(&request.get_ref().flag_set).to_owned();
        self.check_access(&request, &set)?;
        let r = request.into_inner();
        let started = std::time::Instant::now();
        let context = Value::Object(r.context.as_ref().map(struct_to_map).unwrap_or_default());
        let context_error = validate_context(&context).err();
        let state = self.ctx.state.load();
        let stale = self.ctx.stale(&state);
        let target = Target::lookup(&state, &set, &r.flag_key);
        let o = target.resolve(
            &context,
            context_error.as_ref(),
            value_type(r.expected_type),
        );
        let response = self.response(&r.flag_key, &o, &state, stale);
        self.ctx
            .stats
            .record(o.resolution.reason, started.elapsed());
        Ok(Response::new(response))
    }

    async fn evaluate_all(
        &self,
        request: Request<pb::EvaluateAllRequest>,
    ) -> Result<Response<EncodedEvaluateAllResponse>, Status> {
        let set_name = self.ctx.set_name(&request.get_ref().flag_set).to_owned();
        self.check_access(&request, &set_name)?;
        let r = request.into_inner();
        let context = Value::Object(r.context.as_ref().map(struct_to_map).unwrap_or_default());
        let context_error = validate_context(&context).err();
        let state = self.ctx.state.load();
        let stale = self.ctx.stale(&state);
        let empty = SetState::default();
        let set = state
            .sets
            .get(&set_name)
            .map(|s| s.as_ref())
            .unwrap_or(&empty);
        let mut batch = crate::stats::EvalBatch::default();
        // each flag's answer is written into `flag`, then into the answer
        // as one element of its repeated field 1 (`flags`), in key order
        let flags = set.sorted();
        let mut out = Vec::with_capacity(64 + flags.len() * 160);
        let mut flag = Vec::with_capacity(256);
        let mut started = std::time::Instant::now();
        for f in flags {
            let target = Target::of(f);
            let o = target.resolve(&context, context_error.as_ref(), ValueType::Any);
            // one clock read per flag: a flag's time runs from the end of the
            // one before (its answer written included) to its own resolution
            let now = std::time::Instant::now();
            batch.record(o.resolution.reason, now - started);
            started = now;
            flag.clear();
            write_evaluate_response(
                &mut flag,
                f.key(),
                &o,
                state.revision,
                &self.ctx.pop_id,
                stale,
            );
            wire::message_body(1, &flag, &mut out);
        }
        self.ctx.stats.record_batch(&batch);
        wire::varint(2, state.revision, &mut out);
        wire::bytes(3, self.ctx.pop_id.as_bytes(), &mut out);
        wire::boolean(4, stale, &mut out);
        if !set.metadata.is_empty() {
            wire::message(5, &map_to_struct(&set.metadata), &mut out);
        }
        Ok(Response::new(EncodedEvaluateAllResponse::from_encoded(out)))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let set_name = self.ctx.set_name(&request.get_ref().flag_set).to_owned();
        self.check_access(&request, &set_name)?;
        let ctx = self.ctx.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut changes = ctx.changes.clone();
            let mut last: Option<Arc<SetState>> = None;
            let mut last_revision = 0u64;
            loop {
                let state = ctx.state.load_full();
                if state.revision != last_revision || last.is_none() {
                    let current = state.sets.get(&set_name).cloned().unwrap_or_default();
                    let event = watch_event(last.as_deref(), &current, &state, ctx.stale(&state));
                    if let Some(event) = event
                        && tx.send(Ok(event)).await.is_err()
                    {
                        return;
                    }
                    last = Some(current);
                    last_revision = state.revision;
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
}

/// A flag as stored, for a watch event; one whose definition cannot be
/// read is left out (and logged), as it cannot be evaluated either.
fn stored(f: &PopFlag) -> Option<pb::Flag> {
    f.stored()
        .map_err(|e| tracing::error!(key = %f.key(), error = %e, "flag left out of a watch event"))
        .ok()
}

/// The event taking a watcher from `old` (None: nothing yet) to `new`;
/// `None` when the watched set did not change.
fn watch_event(
    old: Option<&SetState>,
    new: &SetState,
    state: &PopState,
    stale: bool,
) -> Option<pb::WatchEvent> {
    let metadata = (!new.metadata.is_empty()).then(|| map_to_struct(&new.metadata));
    let full = match old {
        None => true,
        Some(o) => o.metadata != new.metadata,
    };
    if full {
        return Some(pb::WatchEvent {
            revision: state.revision,
            full: true,
            upserts: new.flags.values().filter_map(|f| stored(f)).collect(),
            deletes: Vec::new(),
            metadata,
            stale,
        });
    }
    let old = old?;
    let upserts: Vec<pb::Flag> = new
        .flags
        .iter()
        .filter(|(k, f)| old.flags.get(k).is_none_or(|o| !Arc::ptr_eq(o, f)))
        .filter_map(|(_, f)| stored(f))
        .collect();
    let deletes: Vec<String> = old
        .flags
        .keys()
        .filter(|k| !new.flags.contains_key(k))
        .map(|k| k.to_string())
        .collect();
    if upserts.is_empty() && deletes.is_empty() {
        return None;
    }
    Some(pb::WatchEvent {
        revision: state.revision,
        full: false,
        upserts,
        deletes,
        metadata,
        stale,
    })
}
