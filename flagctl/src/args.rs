//! `flagctl`'s command line: global options and one subcommand per
//! operation.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

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
        /// Refuse a definition with warnings (rules flagd still loads,
        /// such as a misused operator) instead of writing it.
        #[arg(long)]
        strict: bool,
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
        /// Refuse a document with warnings (rules flagd still loads, such
        /// as a misused operator) instead of applying it.
        #[arg(long)]
        strict: bool,
    },
    /// Restore a flag, or every flag of a set, to what it was at a
    /// revision, as a new change (the history keeps both).
    Revert {
        /// The flag set.
        flag_set: String,
        /// The flag key (default: every flag of the set).
        key: Option<String>,
        /// The revision whose definitions come back.
        #[arg(long = "to-revision")]
        to_revision: u64,
        /// Show the diff, change nothing.
        #[arg(long = "dry-run")]
        dry_run: bool,
        /// A note for the audit trail (default: "revert to revision N").
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
