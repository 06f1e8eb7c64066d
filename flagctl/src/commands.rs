//! `flagctl`'s commands: connecting to the control plane (TLS, token)
//! and running one Admin call per command. Every failure becomes one line.

use std::path::PathBuf;

use flagmesh_client::{BearerToken, ClientTls, hash_token};
use flagmesh_proto::convert::struct_to_map;
use flagmesh_proto::v1::admin_client::AdminClient;
use flagmesh_proto::v1::*;
use serde_json::{Value, json};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::args::{Cli, Command, Output};
use crate::render::*;

type Client = AdminClient<InterceptedService<Channel, BearerToken>>;

/// Why a command failed: one line for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CliError(pub String);

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        Self(format!("{:?}: {}", s.code(), s.message()))
    }
}

async fn connect(cli: &Cli) -> Result<Client, CliError> {
    let tls = ClientTls {
        ca: cli.ca_cert.clone(),
        cert: cli.client_cert.clone(),
        key: cli.client_key.clone(),
        domain: None,
    };
    let tls = tls.enabled().then_some(tls);
    let endpoint = flagmesh_client::endpoint(&cli.server, tls.as_ref())
        .map_err(|e| CliError(format!("--server {}: {e}", cli.server)))?
        .connect_timeout(std::time::Duration::from_secs(5));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| CliError(format!("cannot reach {}: {e}", cli.server)))?;
    let token = BearerToken::new(cli.token.as_deref())?;
    Ok(AdminClient::with_interceptor(channel, token).max_decoding_message_size(64 << 20))
}

fn read_source(path: &PathBuf) -> Result<String, CliError> {
    std::fs::read_to_string(path).map_err(|e| CliError(format!("{}: {e}", path.display())))
}

/// Runs one command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    if let Command::HashToken { token } = &cli.command {
        println!("{}", hash_token(token));
        return Ok(());
    }
    let mut client = connect(&cli).await?;
    let json_out = cli.output == Output::Json;
    match &cli.command {
        Command::HashToken { .. } => {}
        Command::Get { flag_set, key } => {
            let r = client
                .get_flag(GetFlagRequest {
                    flag_set: flag_set.clone(),
                    key: key.clone(),
                })
                .await?
                .into_inner();
            let f = r.flag.unwrap_or_default();
            if json_out {
                print_json(&flag_json(&f));
            } else {
                println!("flag        {}/{}", f.flag_set, f.key);
                println!(
                    "revision    {} (created at {})",
                    f.mod_revision, f.create_revision
                );
                print!("{}", pretty(&String::from_utf8_lossy(&f.definition_json)));
            }
        }
        Command::List { flag_set } => {
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let r = client
                    .list_flags(ListFlagsRequest {
                        flag_set: flag_set.clone().unwrap_or_default(),
                        page_size: 1000,
                        page_token: token.clone(),
                    })
                    .await?
                    .into_inner();
                all.extend(r.flags);
                if r.next_page_token.is_empty() {
                    break;
                }
                token = r.next_page_token;
            }
            if json_out {
                print_json(&Value::Array(all.iter().map(flag_json).collect()));
            } else {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|f| {
                        let (state, default, targeting) = summary(&f.definition_json);
                        vec![
                            f.flag_set.clone(),
                            f.key.clone(),
                            state,
                            default,
                            targeting,
                            f.mod_revision.to_string(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &[
                            "FLAG SET",
                            "KEY",
                            "STATE",
                            "DEFAULT",
                            "TARGETING",
                            "REVISION"
                        ],
                        &rows
                    )
                );
            }
        }
        Command::Sets => {
            let r = client
                .list_flag_sets(ListFlagSetsRequest {})
                .await?
                .into_inner();
            if json_out {
                let sets: Vec<Value> = r
                    .flag_sets
                    .iter()
                    .map(|s| {
                        json!({"id": s.id, "flag_count": s.flag_count, "mod_revision": s.mod_revision,
                               "metadata": s.metadata.as_ref().map(struct_to_map).unwrap_or_default()})
                    })
                    .collect();
                print_json(&Value::Array(sets));
            } else {
                let rows: Vec<Vec<String>> = r
                    .flag_sets
                    .iter()
                    .map(|s| {
                        vec![
                            s.id.clone(),
                            s.flag_count.to_string(),
                            s.mod_revision.to_string(),
                        ]
                    })
                    .collect();
                print!("{}", table(&["FLAG SET", "FLAGS", "REVISION"], &rows));
            }
        }
        Command::Set {
            flag_set,
            key,
            json,
            file,
            expected_revision,
            comment,
            strict,
        } => {
            let definition_json = match (json, file) {
                (Some(j), _) => j.clone(),
                (None, Some(f)) => read_source(f)?,
                (None, None) => return Err(CliError("set needs --json or --file".into())),
            };
            let expected = match expected_revision {
                Some(e) => *e,
                None => match client
                    .get_flag(GetFlagRequest {
                        flag_set: flag_set.clone(),
                        key: key.clone(),
                    })
                    .await
                {
                    Ok(r) => r.into_inner().flag.map(|f| f.mod_revision).unwrap_or(0),
                    Err(s) if s.code() == tonic::Code::NotFound => 0,
                    Err(s) => return Err(s.into()),
                },
            };
            let r = client
                .update_flag(UpdateFlagRequest {
                    flag_set: flag_set.clone(),
                    key: key.clone(),
                    definition_json,
                    expected_mod_revision: expected,
                    force: false,
                    comment: comment.clone(),
                    strict: *strict,
                    dry_run: false,
                })
                .await?
                .into_inner();
            if json_out {
                print_json(&json!({"revision": r.revision, "changed": r.changed,
                    "warnings": r.warnings.iter().map(warning_json).collect::<Vec<_>>()}));
                return Ok(());
            }
            eprint!("{}", render_warnings(&r.warnings));
            if r.changed {
                println!("{flag_set}/{key} written as revision {}", r.revision);
            } else {
                println!("{flag_set}/{key} unchanged (revision {})", r.revision);
            }
        }
        Command::Delete {
            flag_set,
            key,
            expected_revision,
            comment,
        } => {
            let r = client
                .delete_flag(DeleteFlagRequest {
                    flag_set: flag_set.clone(),
                    key: key.clone(),
                    expected_mod_revision: *expected_revision,
                    comment: comment.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            if json_out {
                print_json(&json!({"revision": r.revision, "changed": r.changed}));
            } else {
                println!("{flag_set}/{key} deleted as revision {}", r.revision);
            }
        }
        Command::Apply {
            file,
            flag_set,
            merge,
            dry_run,
            comment,
            strict,
        } => {
            let document = read_source(file)?;
            let r = client
                .apply_flag_set(ApplyFlagSetRequest {
                    flag_set: flag_set.clone().unwrap_or_default(),
                    document,
                    mode: if *merge {
                        ApplyMode::Merge
                    } else {
                        ApplyMode::Replace
                    } as i32,
                    dry_run: *dry_run,
                    expected_mod_revision: 0,
                    comment: comment.clone(),
                    strict: *strict,
                })
                .await?
                .into_inner();
            print_outcome(&r, json_out, "applied");
        }
        Command::Revert {
            flag_set,
            key,
            to_revision,
            dry_run,
            comment,
        } => {
            let r = client
                .revert(RevertRequest {
                    flag_set: flag_set.clone(),
                    key: key.clone().unwrap_or_default(),
                    to_revision: *to_revision,
                    comment: comment.clone(),
                    dry_run: *dry_run,
                })
                .await?
                .into_inner();
            print_outcome(&r, json_out, "reverted");
        }
        Command::Export { flag_set } => {
            let r = client
                .export_flag_set(ExportFlagSetRequest {
                    flag_set: flag_set.clone(),
                })
                .await?
                .into_inner();
            println!("{}", r.document);
        }
        Command::History {
            flag_set,
            key,
            limit,
        } => {
            let r = client
                .list_history(ListHistoryRequest {
                    flag_set: flag_set.clone().unwrap_or_default(),
                    key: key.clone().unwrap_or_default(),
                    page_size: *limit,
                    page_token: String::new(),
                })
                .await?
                .into_inner();
            if json_out {
                let sets: Vec<Value> = r
                    .change_sets
                    .iter()
                    .map(|c| {
                        json!({"revision": c.revision, "committed_at_unix_ms": c.committed_at_unix_ms,
                               "actor": c.actor, "operation": c.operation, "comment": c.comment,
                               "changes": c.changes.iter().map(change_json).collect::<Vec<_>>(),
                               "warnings": c.warnings.iter().map(warning_json).collect::<Vec<_>>()})
                    })
                    .collect();
                print_json(&Value::Array(sets));
            } else {
                let rows: Vec<Vec<String>> = r
                    .change_sets
                    .iter()
                    .map(|c| {
                        let what: Vec<String> = c
                            .changes
                            .iter()
                            .map(|x| {
                                let key = if x.key.is_empty() {
                                    "(metadata)"
                                } else {
                                    &x.key
                                };
                                format!("{} {}/{}", kind_name(x.kind), x.flag_set, key)
                            })
                            .collect();
                        let mut what = what.join(", ");
                        if !c.warnings.is_empty() {
                            what.push_str(&format!(" ({} warnings)", c.warnings.len()));
                        }
                        vec![
                            c.revision.to_string(),
                            format_ms(c.committed_at_unix_ms),
                            c.actor.clone(),
                            c.operation.clone(),
                            what,
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &[
                            "REVISION",
                            "COMMITTED (UTC)",
                            "ACTOR",
                            "OPERATION",
                            "CHANGES"
                        ],
                        &rows
                    )
                );
            }
        }
        Command::Revision => {
            let r = client
                .get_revision(GetRevisionRequest {})
                .await?
                .into_inner();
            if json_out {
                print_json(&json!({"revision": r.revision, "history_id": r.history_id,
                                    "oldest_revision": r.oldest_revision, "digest": format!("{:016x}", r.digest)}));
            } else {
                println!(
                    "revision {} (history {}, change log from {}, digest {:016x})",
                    r.revision, r.history_id, r.oldest_revision, r.digest
                );
            }
        }
        Command::Status { recent } => {
            let r = client
                .get_propagation(GetPropagationRequest {
                    recent_revisions: *recent,
                })
                .await?
                .into_inner();
            print_status(&r, json_out);
        }
    }
    Ok(())
}

/// Prints what an apply or a revert did (or would do, on a dry run).
fn print_outcome(r: &ApplyFlagSetResponse, json_out: bool, done: &str) {
    if json_out {
        print_json(&json!({
            "revision": r.revision,
            "dry_run": r.dry_run,
            "changes": r.changes.iter().map(change_json).collect::<Vec<_>>(),
            "warnings": r.warnings.iter().map(warning_json).collect::<Vec<_>>(),
        }));
        return;
    }
    eprint!("{}", render_warnings(&r.warnings));
    for c in &r.changes {
        print!("{}", render_change(c));
    }
    let count = |k: &str| r.changes.iter().filter(|c| kind_name(c.kind) == k).count();
    let counts = format!(
        "{} to create, {} to update, {} to delete",
        count("create"),
        count("update"),
        count("delete")
    );
    if r.dry_run {
        println!(
            "dry run: {counts}; nothing written (revision {})",
            r.revision
        );
    } else if r.changes.is_empty() {
        println!("no changes (revision {})", r.revision);
    } else {
        println!(
            "{done} as revision {}: {}",
            r.revision,
            counts.replace(" to ", " ")
        );
    }
}
