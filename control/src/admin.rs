//! The `flagmesh.v1.Admin` service: every definition is validated (see
//! [`crate::validate`]) before it is stored; writes check expected
//! revisions under the store's commit lock; the store publishes each
//! committed change to the fan-out, and it is recorded for the propagation
//! view.

use std::sync::Arc;

use flagmesh_client::identity::principal;
use flagmesh_engine::{FlagDocument, Strictness, ValidationError, ValueType, validate_context};
use flagmesh_mesh::compiled::{PopFlag, Target, evaluate_response};
use flagmesh_proto::convert::struct_to_map;
use flagmesh_proto::v1::admin_server::Admin;
use flagmesh_proto::v1::*;
use serde_json::{Map, Value};
use tonic::{Request, Response, Status};

use crate::error::ControlError;
use crate::propagation::Propagation;
use crate::store::{ChangeRequest, CommitOutcome, FlagStore, FlagWrite, SetWrite, StateView};
use crate::validate::*;

/// The Admin service.
pub struct AdminService<S: ?Sized> {
    store: Arc<S>,
    propagation: Arc<Propagation>,
    max_flags_per_set: usize,
}

impl<S: FlagStore + ?Sized> AdminService<S> {
    /// The service over a store (which publishes what it commits); a flag
    /// set holds at most `max_flags_per_set` flags.
    pub fn new(store: Arc<S>, propagation: Arc<Propagation>, max_flags_per_set: usize) -> Self {
        Self {
            store,
            propagation,
            max_flags_per_set,
        }
    }

    /// Commits (in a blocking task: sled flushes); the store publishes the
    /// delta to the fan-out in commit order.
    async fn commit(
        &self,
        mut plan: impl FnMut(&dyn StateView) -> Result<ChangeRequest, ControlError> + Send + 'static,
        dry_run: bool,
    ) -> Result<CommitOutcome, Status> {
        let store = self.store.clone();
        let propagation = self.propagation.clone();
        let span = tracing::info_span!("commit", revision = tracing::field::Empty, dry_run);
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let outcome = store.commit(&mut plan, dry_run)?;
            if let Some(d) = &outcome.delta {
                span.record("revision", d.to_revision);
            }
            if let Some(delta) = &outcome.delta {
                propagation.committed(delta.to_revision, delta.committed_at_unix_ms);
                tracing::info!(
                    revision = delta.to_revision,
                    changes = outcome.changes.len(),
                    "committed"
                );
            }
            Ok::<_, ControlError>(outcome)
        })
        .await
        .map_err(|e| Status::internal(format!("commit task failed: {e}")))?
        .map_err(Status::from)
    }
}

/// One flag's write: who, what, and the new definition (`None`: delete).
struct OneFlag {
    actor: String,
    operation: &'static str,
    comment: String,
    flag_set: String,
    key: String,
    definition: Option<Vec<u8>>,
    /// What the definition was accepted with.
    warnings: Vec<ValidationWarning>,
    /// Check only, write nothing.
    dry_run: bool,
}

impl OneFlag {
    fn new(
        actor: String,
        operation: &'static str,
        comment: String,
        flag_set: String,
        key: String,
        definition: Option<Vec<u8>>,
    ) -> Self {
        Self {
            actor,
            operation,
            comment,
            flag_set,
            key,
            definition,
            warnings: Vec::new(),
            dry_run: false,
        }
    }

    /// The same write, checked only.
    fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// The same write, accepted with `warnings`.
    fn warned(mut self, warnings: &[ValidationError]) -> Self {
        self.warnings = warnings_of(&self.flag_set, warnings, false);
        self
    }

    /// The flag, as errors name it.
    fn what(&self) -> String {
        format!("flag \"{}\" of flag set \"{}\"", self.key, self.flag_set)
    }
}

impl<S: FlagStore + ?Sized> AdminService<S> {
    /// Commits `write` if `check` passes against the state it would change.
    async fn write_one(
        &self,
        write: OneFlag,
        check: impl Fn(&dyn StateView, &OneFlag) -> Result<(), ControlError> + Send + 'static,
    ) -> Result<Response<WriteResponse>, Status> {
        let warned = write.warnings.clone();
        let dry_run = write.dry_run;
        let outcome = self
            .commit(
                move |view| {
                    check(view, &write)?;
                    let mut change = one_flag(
                        &write.actor,
                        write.operation,
                        &write.comment,
                        &write.flag_set,
                        &write.key,
                        write.definition.clone(),
                    );
                    change.warnings = write.warnings.clone();
                    Ok(change)
                },
                dry_run,
            )
            .await?;
        let mut response = written(&outcome);
        let r = response.get_mut();
        r.warnings = warned;
        if dry_run {
            r.dry_run = true;
            r.changed = !outcome.changes.is_empty();
        }
        Ok(response)
    }
}

fn actor<T>(req: &Request<T>) -> String {
    principal(req)
        .map(|p| p.name.clone())
        .unwrap_or_else(|| "anonymous".into())
}

/// A change set writing one flag (`None` deletes it).
fn one_flag(
    actor: &str,
    operation: &str,
    comment: &str,
    flag_set: &str,
    key: &str,
    definition: Option<Vec<u8>>,
) -> ChangeRequest {
    ChangeRequest {
        actor: actor.to_owned(),
        operation: operation.to_owned(),
        comment: comment.to_owned(),
        flags: vec![FlagWrite {
            flag_set: flag_set.to_owned(),
            key: key.to_owned(),
            definition,
        }],
        sets: vec![],
        warnings: Vec::new(),
    }
}

/// The answer to a single-flag or flag-set write.
fn written(outcome: &CommitOutcome) -> Response<WriteResponse> {
    Response::new(WriteResponse {
        revision: outcome.revision,
        changed: outcome.delta.is_some(),
        warnings: Vec::new(),
        dry_run: false,
    })
}

/// The answer to an apply or a revert: its changes ordered by flag.
fn changes_made(
    outcome: CommitOutcome,
    dry_run: bool,
    warnings: Vec<ValidationWarning>,
) -> Response<ApplyFlagSetResponse> {
    let mut changes = outcome.changes;
    changes.sort_by(|a, b| (&a.flag_set, &a.key).cmp(&(&b.flag_set, &b.key)));
    Response::new(ApplyFlagSetResponse {
        revision: outcome.revision,
        changes,
        dry_run,
        warnings,
    })
}

fn flag_not_found(flag_set: &str, key: &str) -> Status {
    Status::not_found(format!(
        "flag \"{key}\" not found in flag set \"{flag_set}\""
    ))
}

fn page_size(requested: u32, default: usize) -> usize {
    match requested {
        0 => default,
        n => (n as usize).min(1000),
    }
}

#[tonic::async_trait]
impl<S: FlagStore + ?Sized> Admin for AdminService<S> {
    async fn get_flag(
        &self,
        request: Request<GetFlagRequest>,
    ) -> Result<Response<GetFlagResponse>, Status> {
        let r = request.into_inner();
        let flag = self
            .store
            .get_flag(&r.flag_set, &r.key)?
            .ok_or_else(|| flag_not_found(&r.flag_set, &r.key))?;
        Ok(Response::new(GetFlagResponse {
            flag: Some(flag),
            revision: self.store.head()?.revision,
        }))
    }

    async fn list_flags(
        &self,
        request: Request<ListFlagsRequest>,
    ) -> Result<Response<ListFlagsResponse>, Status> {
        let r = request.into_inner();
        let limit = page_size(r.page_size, 100);
        let after = if r.page_token.is_empty() {
            None
        } else {
            let raw = hex::decode(&r.page_token)
                .map_err(|_| Status::invalid_argument("page_token: not a token from this API"))?;
            let text = String::from_utf8(raw)
                .map_err(|_| Status::invalid_argument("page_token: not a token from this API"))?;
            let (s, k) = text
                .split_once('\0')
                .ok_or_else(|| Status::invalid_argument("page_token: not a token from this API"))?;
            Some((s.to_owned(), k.to_owned()))
        };
        let set = (!r.flag_set.is_empty()).then_some(r.flag_set.as_str());
        let revision = self.store.head()?.revision;
        let mut flags = self.store.list_flags(
            set,
            after.as_ref().map(|(s, k)| (s.as_str(), k.as_str())),
            limit + 1,
        )?;
        let next_page_token = if flags.len() > limit {
            flags.truncate(limit);
            flags
                .last()
                .map(|f| hex::encode(format!("{}\0{}", f.flag_set, f.key)))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListFlagsResponse {
            flags,
            next_page_token,
            revision,
        }))
    }

    async fn create_flag(
        &self,
        request: Request<CreateFlagRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let actor = actor(&request);
        let r = request.into_inner();
        check_flag_set(&r.flag_set)?;
        check_key(&r.key)?;
        let (def, warnings) = validate_definition(&r.key, &r.definition_json, r.strict)?;
        let max = self.max_flags_per_set;
        let write = OneFlag::new(actor, "create", r.comment, r.flag_set, r.key, Some(def))
            .warned(&warnings)
            .dry_run(r.dry_run);
        self.write_one(write, move |view, w| {
            if let Some(f) = view.flag(&w.flag_set, &w.key)? {
                return Err(ControlError::AlreadyExists(format!(
                    "flag \"{}\" exists in flag set \"{}\" (mod_revision {})",
                    w.key, w.flag_set, f.mod_revision
                )));
            }
            let held = view.flag_set(&w.flag_set)?.map_or(0, |s| s.flag_count);
            check_flag_count(&w.flag_set, held as usize + 1, max)
        })
        .await
    }

    async fn update_flag(
        &self,
        request: Request<UpdateFlagRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let actor = actor(&request);
        let r = request.into_inner();
        check_flag_set(&r.flag_set)?;
        check_key(&r.key)?;
        let (def, warnings) = validate_definition(&r.key, &r.definition_json, r.strict)?;
        let (expected, force) = (r.expected_mod_revision, r.force);
        let write = OneFlag::new(actor, "update", r.comment, r.flag_set, r.key, Some(def))
            .warned(&warnings)
            .dry_run(r.dry_run);
        self.write_one(write, move |view, w| {
            let current = view.flag(&w.flag_set, &w.key)?.map(|f| f.mod_revision);
            expect_revision(&w.what(), current, expected, force, true)
        })
        .await
    }

    async fn delete_flag(
        &self,
        request: Request<DeleteFlagRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let actor = actor(&request);
        let r = request.into_inner();
        let expected = r.expected_mod_revision;
        let write =
            OneFlag::new(actor, "delete", r.comment, r.flag_set, r.key, None).dry_run(r.dry_run);
        self.write_one(write, move |view, w| {
            let current = view.flag(&w.flag_set, &w.key)?.map(|f| f.mod_revision);
            expect_revision(&w.what(), current, expected, false, false)
        })
        .await
    }

    async fn list_flag_sets(
        &self,
        _request: Request<ListFlagSetsRequest>,
    ) -> Result<Response<ListFlagSetsResponse>, Status> {
        Ok(Response::new(ListFlagSetsResponse {
            flag_sets: self.store.list_flag_sets()?,
            revision: self.store.head()?.revision,
        }))
    }

    async fn delete_flag_set(
        &self,
        request: Request<DeleteFlagSetRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let actor = actor(&request);
        let r = request.into_inner();
        let outcome = self
            .commit(
                move |view| {
                    let current = view.flag_set(&r.flag_set)?.map(|s| s.mod_revision);
                    let what = format!("flag set \"{}\"", r.flag_set);
                    expect_revision(&what, current, r.expected_mod_revision, false, false)?;
                    let flags = view
                        .flags_of(&r.flag_set)?
                        .into_iter()
                        .map(|f| FlagWrite {
                            flag_set: f.flag_set,
                            key: f.key,
                            definition: None,
                        })
                        .collect();
                    Ok(ChangeRequest {
                        actor: actor.clone(),
                        operation: "delete-set".into(),
                        comment: r.comment.clone(),
                        flags,
                        sets: vec![SetWrite {
                            flag_set: r.flag_set.clone(),
                            metadata: Map::new(),
                            delete: true,
                        }],
                        warnings: Vec::new(),
                    })
                },
                false,
            )
            .await?;
        Ok(written(&outcome))
    }

    async fn apply_flag_set(
        &self,
        request: Request<ApplyFlagSetRequest>,
    ) -> Result<Response<ApplyFlagSetResponse>, Status> {
        let actor = actor(&request);
        let r = request.into_inner();
        let invalid =
            |e: flagmesh_engine::DocumentError| Status::invalid_argument(format!("document: {e}"));
        let (doc, warnings) = if r.strict {
            (
                FlagDocument::parse(&r.document, Strictness::Strict).map_err(invalid)?,
                Vec::new(),
            )
        } else {
            FlagDocument::parse_with_warnings(&r.document).map_err(invalid)?
        };
        let flag_set = match (r.flag_set.as_str(), doc.flag_set_id.as_deref()) {
            ("", Some(id)) => id.to_owned(),
            ("", None) => {
                return Err(Status::invalid_argument(
                    "flag_set: name the flag set, or set metadata.flagSetId in the document",
                ));
            }
            (given, Some(id)) if given != id => {
                return Err(Status::invalid_argument(format!(
                    "flag_set: the request names \"{given}\" but the document's metadata.flagSetId is \"{id}\""
                )));
            }
            (given, _) => given.to_owned(),
        };
        check_flag_set(&flag_set)?;
        for key in doc.flags.keys() {
            check_key(key)?;
        }
        let warnings = warnings_of(&flag_set, &warnings, true);
        let audit_warnings = warnings.clone();
        let replace = r.mode() != ApplyMode::Merge;
        let max = self.max_flags_per_set;
        check_flag_count(&flag_set, doc.flags.len(), max)?;
        let mut writes: Vec<FlagWrite> = Vec::with_capacity(doc.flags.len());
        for (k, d) in &doc.flags {
            let definition = d.to_canonical_json();
            // the same limit as one flag written alone
            if definition.len() > MAX_DEFINITION_BYTES {
                return Err(Status::invalid_argument(format!(
                    "flag \"{k}\": definition larger than {MAX_DEFINITION_BYTES} bytes"
                )));
            }
            writes.push(FlagWrite {
                flag_set: flag_set.clone(),
                key: k.clone(),
                definition: Some(definition),
            });
        }
        let metadata = doc.metadata.clone();
        let expected = r.expected_mod_revision;
        let comment = r.comment.clone();
        let outcome = self
            .commit(
                move |view| {
                    let current = view.flag_set(&flag_set)?.map(|s| s.mod_revision);
                    if expected != 0 {
                        expect_revision(
                            &format!("flag set \"{flag_set}\""),
                            current,
                            expected,
                            false,
                            false,
                        )?;
                    }
                    let mut flags = writes.clone();
                    if !replace {
                        let held: std::collections::HashSet<String> = view
                            .flags_of(&flag_set)?
                            .into_iter()
                            .map(|f| f.key)
                            .collect();
                        let added = writes.iter().filter(|w| !held.contains(&w.key)).count();
                        check_flag_count(&flag_set, held.len() + added, max)?;
                    }
                    if replace {
                        for f in view.flags_of(&flag_set)? {
                            if !flags.iter().any(|w| w.key == f.key) {
                                flags.push(FlagWrite {
                                    flag_set: f.flag_set,
                                    key: f.key,
                                    definition: None,
                                });
                            }
                        }
                    }
                    Ok(ChangeRequest {
                        actor: actor.clone(),
                        operation: "apply".into(),
                        comment: comment.clone(),
                        flags,
                        sets: vec![SetWrite {
                            flag_set: flag_set.clone(),
                            metadata: metadata.clone(),
                            delete: false,
                        }],
                        warnings: audit_warnings.clone(),
                    })
                },
                r.dry_run,
            )
            .await?;
        Ok(changes_made(outcome, r.dry_run, warnings))
    }

    async fn export_flag_set(
        &self,
        request: Request<ExportFlagSetRequest>,
    ) -> Result<Response<ExportFlagSetResponse>, Status> {
        let r = request.into_inner();
        let set = self
            .store
            .get_flag_set(&r.flag_set)?
            .ok_or_else(|| Status::not_found(format!("flag set \"{}\" not found", r.flag_set)))?;
        let mut flags = Map::new();
        let mut after: Option<(String, String)> = None;
        loop {
            let page = self.store.list_flags(
                Some(&r.flag_set),
                after.as_ref().map(|(s, k)| (s.as_str(), k.as_str())),
                1000,
            )?;
            let Some(last) = page.last() else { break };
            after = Some((last.flag_set.clone(), last.key.clone()));
            for f in page {
                let def: Value = serde_json::from_slice(&f.definition_json).map_err(|e| {
                    Status::internal(format!("stored flag {} unreadable: {e}", f.key))
                })?;
                flags.insert(f.key, def);
            }
        }
        let mut doc = Map::new();
        doc.insert("flags".into(), Value::Object(flags));
        let metadata = set.metadata.as_ref().map(struct_to_map).unwrap_or_default();
        if !metadata.is_empty() {
            doc.insert("metadata".into(), Value::Object(metadata));
        }
        Ok(Response::new(ExportFlagSetResponse {
            document: serde_json::to_string_pretty(&Value::Object(doc)).unwrap_or_default(),
            revision: self.store.head()?.revision,
        }))
    }

    async fn list_history(
        &self,
        request: Request<ListHistoryRequest>,
    ) -> Result<Response<ListHistoryResponse>, Status> {
        let r = request.into_inner();
        let limit = page_size(r.page_size, 50);
        let before =
            if r.page_token.is_empty() {
                None
            } else {
                Some(r.page_token.parse::<u64>().map_err(|_| {
                    Status::invalid_argument("page_token: not a token from this API")
                })?)
            };
        let set = (!r.flag_set.is_empty()).then_some(r.flag_set.as_str());
        let key = (!r.key.is_empty()).then_some(r.key.as_str());
        let mut change_sets = self.store.history(before, limit + 1, set, key)?;
        let next_page_token = if change_sets.len() > limit {
            change_sets.truncate(limit);
            change_sets
                .last()
                .map(|c| c.revision.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListHistoryResponse {
            change_sets,
            next_page_token,
            oldest_revision: self.store.head()?.compacted_through + 1,
        }))
    }

    async fn get_revision(
        &self,
        _request: Request<GetRevisionRequest>,
    ) -> Result<Response<GetRevisionResponse>, Status> {
        let head = self.store.head()?;
        Ok(Response::new(GetRevisionResponse {
            revision: head.revision,
            history_id: head.history_id,
            oldest_revision: head.compacted_through + 1,
            digest: head.digest,
        }))
    }

    async fn get_propagation(
        &self,
        request: Request<GetPropagationRequest>,
    ) -> Result<Response<GetPropagationResponse>, Status> {
        let recent = match request.get_ref().recent_revisions {
            0 => 20,
            n => n.min(500) as usize,
        };
        let head = self.store.head()?.revision;
        Ok(Response::new(self.propagation.view(head, recent)))
    }

    async fn revert(
        &self,
        request: Request<RevertRequest>,
    ) -> Result<Response<ApplyFlagSetResponse>, Status> {
        let actor = actor(&request);
        let r = request.into_inner();
        check_flag_set(&r.flag_set)?;
        if !r.key.is_empty() {
            check_key(&r.key)?;
        }
        let head = self.store.head()?;
        if r.to_revision > head.revision {
            return Err(Status::invalid_argument(format!(
                "to_revision: {} is after the newest revision, {}",
                r.to_revision, head.revision
            )));
        }
        let targets = revert_targets(self.store.as_ref(), &r, head.revision)?;
        let comment = match r.comment.as_str() {
            "" => format!("revert to revision {}", r.to_revision),
            c => c.to_owned(),
        };
        let outcome = self
            .commit(
                move |view| {
                    let mut flags = Vec::with_capacity(targets.len());
                    for t in &targets {
                        let now = view.flag(&r.flag_set, &t.key)?.map(|f| f.mod_revision);
                        if now != t.current {
                            return Err(ControlError::FailedPrecondition(format!(
                                "flag \"{}\" of flag set \"{}\" changed while the revert was prepared; nothing was reverted, try again",
                                t.key, r.flag_set
                            )));
                        }
                        flags.push(FlagWrite {
                            flag_set: r.flag_set.clone(),
                            key: t.key.clone(),
                            definition: t.definition.clone(),
                        });
                    }
                    Ok(ChangeRequest {
                        actor: actor.clone(),
                        operation: "revert".into(),
                        comment: comment.clone(),
                        flags,
                        sets: vec![],
                        warnings: Vec::new(),
                    })
                },
                r.dry_run,
            )
            .await?;
        Ok(changes_made(outcome, r.dry_run, Vec::new()))
    }

    async fn preview_evaluation(
        &self,
        request: Request<PreviewEvaluationRequest>,
    ) -> Result<Response<EvaluateResponse>, Status> {
        let r = request.into_inner();
        let stored = self.store.get_flag(&r.flag_set, &r.key)?;
        let flag = if r.definition_json.is_empty() {
            stored.ok_or_else(|| flag_not_found(&r.flag_set, &r.key))?
        } else {
            check_key(&r.key)?;
            let (definition, _) = validate_definition(&r.key, &r.definition_json, false)?;
            Flag {
                flag_set: r.flag_set.clone(),
                key: r.key.clone(),
                definition_json: definition,
                mod_revision: stored.map_or(0, |f| f.mod_revision),
                create_revision: 0,
            }
        };
        let metadata = self
            .store
            .get_flag_set(&r.flag_set)?
            .and_then(|s| s.metadata)
            .map(|m| struct_to_map(&m))
            .unwrap_or_default();
        let flag = Arc::new(PopFlag::new(flag, Arc::new(metadata)));
        let context = Value::Object(r.context.as_ref().map(struct_to_map).unwrap_or_default());
        let invalid = validate_context(&context).err();
        let target = Target::of(&flag);
        let outcome = target.resolve(&context, invalid.as_ref(), ValueType::Any);
        Ok(Response::new(EvaluateResponse {
            revision: self.store.head()?.revision,
            ..evaluate_response(&r.key, &outcome)
        }))
    }

    async fn who_am_i(
        &self,
        request: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        let p = principal(&request)
            .ok_or_else(|| Status::unauthenticated("no credential was presented"))?;
        Ok(Response::new(WhoAmIResponse {
            name: p.name.clone(),
            role: p.role.as_str().to_owned(),
            flag_sets: p.flag_sets.clone(),
        }))
    }
}

/// One flag a revert writes: what it was at the revision (`None`: it did
/// not exist) and its mod revision now (`None`: it does not exist now).
struct RevertTarget {
    key: String,
    definition: Option<Vec<u8>>,
    current: Option<u64>,
}

/// The flags a revert restores: every flag of the set (or the one flag)
/// changed after `to_revision`, each to the definition its first change
/// after that revision replaced. Reads the history newest first down to it.
fn revert_targets<S: FlagStore + ?Sized>(
    store: &S,
    r: &RevertRequest,
    head: u64,
) -> Result<Vec<RevertTarget>, ControlError> {
    use std::collections::BTreeMap;
    let key = (!r.key.is_empty()).then_some(r.key.as_str());
    let mut targets: BTreeMap<String, RevertTarget> = BTreeMap::new();
    let mut before = Some(head + 1);
    'pages: while let Some(b) = before {
        let page = store.history(Some(b), 200, Some(&r.flag_set), key)?;
        before = page
            .last()
            .map(|c| c.revision)
            .filter(|_| page.len() == 200);
        for cs in page {
            if cs.revision <= r.to_revision {
                break 'pages;
            }
            for c in cs.changes {
                if c.flag_set != r.flag_set || c.key.is_empty() || key.is_some_and(|k| k != c.key) {
                    continue;
                }
                let definition = (!c.before_json.is_empty()).then(|| c.before_json.into_bytes());
                let current = (!c.after_json.is_empty()).then_some(cs.revision);
                // newest first: the first change seen says what the flag is
                // now, the last one what it was at the revision
                targets
                    .entry(c.key.clone())
                    .and_modify(|t| t.definition = definition.clone())
                    .or_insert(RevertTarget {
                        key: c.key,
                        definition,
                        current,
                    });
            }
        }
    }
    Ok(targets.into_values().collect())
}
