//! `flagctl`, the operator CLI over the Admin API: commands, and their
//! output as human-readable tables (default) or JSON (`--output json`).
//! Every failure becomes one clear line on stderr and a non-zero exit.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use flagmesh_mesh::auth::{BearerToken, hash_token};
use flagmesh_proto::convert::struct_to_map;
use flagmesh_proto::v1::admin_client::AdminClient;
use flagmesh_proto::v1::*;
use serde_json::{Value, json};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The flagmesh operator CLI.
#[derive(Parser, Debug)]
#[command(name = "flagctl", version, about = "Operate a flagmesh control plane")]
pub struct Cli {
    /// The control plane's gRPC address.
    #[arg(
        long,
        env = "FLAGMESH_SERVER",
        default_value = "127.0.0.1:7070",
        global = true
    )]
    pub server: String,
    /// A bearer token (read, write or admin role).
    #[arg(long, env = "FLAGMESH_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// CA (PEM) the server's certificate is verified against; turns on TLS
    /// (as does an `https://` server address).
    #[arg(long = "ca-cert", env = "FLAGMESH_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM), for servers that require one.
    #[arg(long = "client-cert", env = "FLAGMESH_CLIENT_CERT", global = true)]
    pub client_cert: Option<PathBuf>,
    /// Private key (PEM) of `--client-cert`.
    #[arg(long = "client-key", env = "FLAGMESH_CLIENT_KEY", global = true)]
    pub client_key: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable tables.
    Table,
    /// JSON, for scripts.
    Json,
}

/// flagctl commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show one flag.
    Get {
        /// The flag set.
        flag_set: String,
        /// The flag key.
        key: String,
    },
    /// List flags (every page).
    List {
        /// Only this flag set.
        #[arg(long = "flag-set")]
        flag_set: Option<String>,
    },
    /// List flag sets.
    Sets,
    /// Create or replace a flag from a file or inline JSON.
    Set {
        /// The flag set.
        flag_set: String,
        /// The flag key.
        key: String,
        /// Inline flagd flag definition JSON.
        #[arg(long, conflicts_with = "file")]
        json: Option<String>,
        /// A file holding the flagd flag definition (JSON).
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
        /// Fail unless the flag's mod_revision is this (0: must not exist).
        /// Default: the revision read just before writing.
        #[arg(long = "expected-revision")]
        expected_revision: Option<u64>,
        /// A note for the audit trail.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Delete a flag.
    Delete {
        /// The flag set.
        flag_set: String,
        /// The flag key.
        key: String,
        /// Fail unless the flag's mod_revision is this.
        #[arg(long = "expected-revision", default_value_t = 0)]
        expected_revision: u64,
        /// A note for the audit trail.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Apply a flagd document (JSON or YAML) to a flag set, atomically.
    Apply {
        /// The document.
        #[arg(long, short = 'f')]
        file: PathBuf,
        /// The flag set (default: the document's metadata.flagSetId).
        #[arg(long = "flag-set")]
        flag_set: Option<String>,
        /// Keep flags the document does not mention (default: replace the set).
        #[arg(long)]
        merge: bool,
        /// Show the diff, change nothing.
        #[arg(long = "dry-run")]
        dry_run: bool,
        /// A note for the audit trail.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Export a flag set as a flagd document.
    Export {
        /// The flag set.
        flag_set: String,
    },
    /// Show the change history, newest first.
    History {
        /// Only changes to this flag set.
        #[arg(long = "flag-set")]
        flag_set: Option<String>,
        /// Only changes to this flag key.
        #[arg(long)]
        key: Option<String>,
        /// How many change sets.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Show the current revision.
    Revision,
    /// Show which nodes run which revision and how long propagation took.
    Status {
        /// How many recent revisions.
        #[arg(long, default_value_t = 10)]
        recent: u32,
    },
    /// Print the SHA-256 of a token, as tokens files and FLAGMESH_TOKENS take it.
    HashToken {
        /// The token.
        token: String,
    },
}

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
    let tls = flagmesh_mesh::tls::ClientTls {
        ca: cli.ca_cert.clone(),
        cert: cli.client_cert.clone(),
        key: cli.client_key.clone(),
        domain: None,
    };
    let tls = tls.enabled().then_some(tls);
    let endpoint = flagmesh_mesh::tls::endpoint(&cli.server, tls.as_ref())
        .map_err(|e| CliError(format!("--server {}: {e}", cli.server)))?
        .connect_timeout(std::time::Duration::from_secs(5));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| CliError(format!("cannot reach {}: {e}", cli.server)))?;
    let token = BearerToken::new(cli.token.as_deref())?;
    Ok(AdminClient::with_interceptor(channel, token).max_decoding_message_size(64 << 20))
}

/// Aligns rows into columns under a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let text: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn flag_json(f: &Flag) -> Value {
    json!({
        "flag_set": f.flag_set,
        "key": f.key,
        "definition": serde_json::from_slice::<Value>(&f.definition_json).unwrap_or(Value::Null),
        "mod_revision": f.mod_revision,
        "create_revision": f.create_revision,
    })
}

fn summary(def: &[u8]) -> (String, String, String) {
    let v: Value = serde_json::from_slice(def).unwrap_or(Value::Null);
    let state = v["state"].as_str().unwrap_or("?").to_owned();
    let default = v["defaultVariant"].as_str().unwrap_or("-").to_owned();
    let targeting = if v.get("targeting").is_some() {
        "yes"
    } else {
        "no"
    }
    .to_owned();
    (state, default, targeting)
}

fn kind_name(k: i32) -> &'static str {
    match ChangeKind::try_from(k) {
        Ok(ChangeKind::Create) => "create",
        Ok(ChangeKind::Update) => "update",
        Ok(ChangeKind::Delete) => "delete",
        _ => "change",
    }
}

fn change_json(c: &FlagChange) -> Value {
    let parse = |s: &str| {
        if s.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(s).unwrap_or(Value::Null)
        }
    };
    json!({
        "flag_set": c.flag_set,
        "key": c.key,
        "kind": kind_name(c.kind),
        "before": parse(&c.before_json),
        "after": parse(&c.after_json),
    })
}

fn pretty(json: &str) -> String {
    serde_json::from_str::<Value>(json)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .map(|s| s + "\n")
        .unwrap_or_default()
}

/// A change as a diff: a header line and, for updates, a unified diff.
pub fn render_change(c: &FlagChange) -> String {
    let what = if c.key.is_empty() {
        format!("{} (flag-set metadata)", c.flag_set)
    } else {
        format!("{}/{}", c.flag_set, c.key)
    };
    let sign = match kind_name(c.kind) {
        "create" => "+",
        "delete" => "-",
        _ => "~",
    };
    let mut out = format!("{sign} {} {what}\n", kind_name(c.kind));
    let (before, after) = (pretty(&c.before_json), pretty(&c.after_json));
    let diff = similar::TextDiff::from_lines(&before, &after);
    for change in diff.iter_all_changes() {
        let mark = match change.tag() {
            similar::ChangeTag::Delete => "-",
            similar::ChangeTag::Insert => "+",
            similar::ChangeTag::Equal => " ",
        };
        if kind_name(c.kind) == "update" || change.tag() != similar::ChangeTag::Equal {
            let _ = write!(out, "    {mark} {change}");
        }
    }
    out
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
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
                })
                .await?
                .into_inner();
            if json_out {
                print_json(&json!({"revision": r.revision, "changed": r.changed}));
            } else if r.changed {
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
                })
                .await?
                .into_inner();
            if json_out {
                print_json(&json!({
                    "revision": r.revision,
                    "dry_run": r.dry_run,
                    "changes": r.changes.iter().map(change_json).collect::<Vec<_>>(),
                }));
            } else {
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
                        "applied as revision {}: {}",
                        r.revision,
                        counts.replace(" to ", " ")
                    );
                }
            }
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
                               "changes": c.changes.iter().map(change_json).collect::<Vec<_>>()})
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
                        vec![
                            c.revision.to_string(),
                            format_ms(c.committed_at_unix_ms),
                            c.actor.clone(),
                            c.operation.clone(),
                            what.join(", "),
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

use crate::propagation::role_name;

fn print_status(r: &GetPropagationResponse, json_out: bool) {
    if json_out {
        print_json(&crate::propagation::view_json(r));
        return;
    }
    println!("head revision {}", r.head_revision);
    let mut dist: Vec<(&u64, &u32)> = r.applied_distribution.iter().collect();
    dist.sort();
    let parts: Vec<String> = dist
        .iter()
        .rev()
        .map(|(rev, n)| format!("r{rev}: {n}"))
        .collect();
    println!(
        "nodes by applied revision: {}",
        if parts.is_empty() {
            "none reported".into()
        } else {
            parts.join(", ")
        }
    );
    let rows: Vec<Vec<String>> = r
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.node_id.clone(),
                role_name(n.role).into(),
                n.region.clone(),
                n.upstream.clone(),
                n.applied_revision.to_string(),
                n.lag_revisions.to_string(),
                format_ms(n.last_report_unix_ms),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "NODE",
                "ROLE",
                "REGION",
                "UPSTREAM",
                "APPLIED",
                "LAG",
                "LAST REPORT (UTC)"
            ],
            &rows
        )
    );
    let rows: Vec<Vec<String>> = r
        .revisions
        .iter()
        .map(|p| {
            vec![
                p.revision.to_string(),
                format_ms(p.committed_at_unix_ms),
                format!("{}/{}", p.nodes_applied, p.nodes_total),
                p.all_applied_after_ms
                    .map(|ms| format!("{ms} ms"))
                    .unwrap_or_else(|| "pending".into()),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "REVISION",
                "COMMITTED (UTC)",
                "APPLIED",
                "ALL APPLIED AFTER"
            ],
            &rows
        )
    );
}

/// Formats Unix milliseconds as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn format_ms(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let secs = ms / 1000;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil-from-days (Howard Hinnant's algorithm, public domain)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_times() {
        assert_eq!(format_ms(0), "-");
        assert_eq!(format_ms(1_700_000_000_000), "2023-11-14 22:13:20");
    }

    #[test]
    fn aligns_tables() {
        let t = table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1\n");
    }
}
