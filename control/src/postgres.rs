//! The control plane's store on PostgreSQL, for several active control
//! instances sharing one database (the `postgres` driver with an `r2d2`
//! pool: the store's interface is synchronous and runs on blocking
//! threads, which is what that pair is built for).
//!
//! - Each commit is one transaction: the `flagmesh_meta` row (history,
//!   revision, digest, compaction point) is locked `FOR UPDATE` for its
//!   length, so revisions are gap-free and in commit order across
//!   instances; the plan's compare-and-swap checks read inside it; flags,
//!   flag sets, the change log, the audit entry and the digest are written
//!   together; `NOTIFY flagmesh_commits` fires on commit. Compaction of the
//!   change log happens in the same locked transaction, so one instance at
//!   a time does it.
//! - Publication: every instance tails the change log in revision order
//!   from what it last published ([`PgStore::publish_to`]), its own commits
//!   included: one ordered way in. `LISTEN` only wakes the tail; it also
//!   reads every 500 ms, so no notification is needed for correctness.
//! - The schema is versioned and migrated on start under an advisory lock.
//! - A database outage fails writes with `UNAVAILABLE`; the fan-out and
//!   reads from memory go on, and the tail reconnects with backoff.

use std::cell::RefCell;
use std::time::Duration;

use flagmesh_mesh::SourceSnapshot;
use flagmesh_proto::v1::{ChangeSet, Delta, Flag, FlagSet};
use postgres::types::ToSql;
use postgres::{Client, GenericClient, NoTls};
use prost::Message as _;
use r2d2_postgres::PostgresConnectionManager;
use tokio_util::sync::CancellationToken;

use crate::change::Write;
use crate::error::ControlError;
use crate::store::{
    CommitOutcome, FlagStore, Plan, Publisher, StateView, StoreExport, StoreHead, now_ms,
};

type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

/// The schema, one migration per version, applied in order.
const MIGRATIONS: &[&str] = &[
    // 1: the state, the change log and the audit trail
    r#"
    CREATE TABLE flagmesh_meta (
        id integer PRIMARY KEY CHECK (id = 1),
        history_id text NOT NULL,
        revision bigint NOT NULL,
        digest bigint NOT NULL,
        compacted_through bigint NOT NULL
    );
    CREATE TABLE flagmesh_flags (
        flag_set text COLLATE "C" NOT NULL,
        key text COLLATE "C" NOT NULL,
        record bytea NOT NULL,
        PRIMARY KEY (flag_set, key)
    );
    CREATE TABLE flagmesh_flag_sets (
        id text COLLATE "C" PRIMARY KEY,
        record bytea NOT NULL
    );
    CREATE TABLE flagmesh_change_log (revision bigint PRIMARY KEY, delta bytea NOT NULL);
    CREATE TABLE flagmesh_audit (revision bigint PRIMARY KEY, change_set bytea NOT NULL);
    "#,
];

/// The advisory lock key of migrations (any constant; "flagmesh").
const MIGRATION_LOCK: i64 = 0x666c_6167_6d65_7368;

/// The channel commits are announced on.
const CHANNEL: &str = "flagmesh_commits";

/// How often the tail reads even without a notification.
const TAIL_POLL: Duration = Duration::from_millis(500);

/// Rows the tail reads at once.
const TAIL_BATCH: i64 = 1_000;

/// A database error as the control plane reports it: no connection (or a
/// lost one) is `UNAVAILABLE`, the rest a storage failure.
fn db_error(e: postgres::Error) -> ControlError {
    if e.as_db_error().is_none() {
        ControlError::Unavailable(format!("the database is unavailable: {e}"))
    } else {
        ControlError::Storage(e.to_string())
    }
}

fn pool_error(e: r2d2::Error) -> ControlError {
    ControlError::Unavailable(format!("the database is unavailable: {e}"))
}

/// u64 values kept in bigint columns, bit for bit.
fn to_db(v: u64) -> i64 {
    v as i64
}

fn from_db(v: i64) -> u64 {
    v as u64
}

fn decode<M: prost::Message + Default>(bytes: &[u8]) -> Result<M, ControlError> {
    Ok(M::decode(bytes)?)
}

/// The store.
pub struct PgStore {
    /// Always `Some` but while dropping (the pool's connections close on
    /// a blocking section).
    pool: Option<Pool>,
    url: String,
    retain: u64,
}

impl PgStore {
    /// Connects to `url`, migrates the schema, and, when the database holds
    /// no mesh yet, creates one (a new history) only with `init`.
    pub fn open(url: &str, retain: u64, init: bool) -> Result<Self, ControlError> {
        blocking(|| Self::open_now(url, retain, init))
    }

    fn open_now(url: &str, retain: u64, init: bool) -> Result<Self, ControlError> {
        let store = Self::connect(url, retain)?;
        store.migrate()?;
        let mut conn = store.conn()?;
        let exists = conn
            .query_opt("SELECT 1 FROM flagmesh_meta WHERE id = 1", &[])
            .map_err(db_error)?
            .is_some();
        if !exists {
            if !init {
                return Err(ControlError::NotInitialised(
                    "the database (--database-url)".into(),
                ));
            }
            let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
            // two instances initialising at once end with one history
            conn.execute(
                "INSERT INTO flagmesh_meta VALUES (1, $1, 0, 0, 0) ON CONFLICT (id) DO NOTHING",
                &[&id],
            )
            .map_err(db_error)?;
            tracing::warn!("created a new mesh in the database: a new history");
        }
        Ok(store)
    }

    /// Moves a mesh into an empty database: every flag and flag set, the
    /// revision, digest and history id, the retained change log and the
    /// audit trail, in one transaction. Subscribers resume on the database
    /// exactly where they stood (by delta). A database that already holds
    /// a mesh is refused.
    pub fn import(url: &str, retain: u64, export: &StoreExport) -> Result<(), ControlError> {
        blocking(|| Self::import_now(url, retain, export).map(drop))
    }

    fn import_now(url: &str, retain: u64, export: &StoreExport) -> Result<Self, ControlError> {
        let store = Self::connect(url, retain)?;
        store.migrate()?;
        let mut conn = store.conn()?;
        let mut tx = conn.transaction().map_err(db_error)?;
        tx.execute("LOCK TABLE flagmesh_meta IN EXCLUSIVE MODE", &[])
            .map_err(db_error)?;
        if tx
            .query_opt("SELECT history_id FROM flagmesh_meta WHERE id = 1", &[])
            .map_err(db_error)?
            .is_some()
        {
            return Err(ControlError::FailedPrecondition(
                "the database holds a mesh already: import only into an empty one".into(),
            ));
        }
        let h = &export.head;
        tx.execute(
            "INSERT INTO flagmesh_meta VALUES (1, $1, $2, $3, $4)",
            &[
                &h.history_id,
                &to_db(h.revision),
                &to_db(h.digest),
                &to_db(h.compacted_through),
            ],
        )
        .map_err(db_error)?;
        for f in &export.flags {
            tx.execute(
                "INSERT INTO flagmesh_flags VALUES ($1, $2, $3)",
                &[&f.flag_set, &f.key, &f.encode_to_vec()],
            )
            .map_err(db_error)?;
        }
        for s in &export.flag_sets {
            tx.execute(
                "INSERT INTO flagmesh_flag_sets VALUES ($1, $2)",
                &[&s.id, &s.encode_to_vec()],
            )
            .map_err(db_error)?;
        }
        for d in &export.change_log {
            tx.execute(
                "INSERT INTO flagmesh_change_log VALUES ($1, $2)",
                &[&to_db(d.to_revision), &d.encode_to_vec()],
            )
            .map_err(db_error)?;
        }
        for c in &export.audit {
            tx.execute(
                "INSERT INTO flagmesh_audit VALUES ($1, $2)",
                &[&to_db(c.revision), &c.encode_to_vec()],
            )
            .map_err(db_error)?;
        }
        tx.commit().map_err(db_error)?;
        Ok(store)
    }

    fn connect(url: &str, retain: u64) -> Result<Self, ControlError> {
        let config: postgres::Config = url
            .parse()
            .map_err(|e| ControlError::InvalidArgument(format!("--database-url: {e}")))?;
        let pool = r2d2::Pool::builder()
            .max_size(8)
            .connection_timeout(Duration::from_secs(5))
            .build(PostgresConnectionManager::new(config, NoTls))
            .map_err(pool_error)?;
        Ok(Self {
            pool: Some(pool),
            url: url.to_owned(),
            retain: retain.max(1),
        })
    }

    fn conn(
        &self,
    ) -> Result<r2d2::PooledConnection<PostgresConnectionManager<NoTls>>, ControlError> {
        self.pool
            .as_ref()
            .ok_or_else(|| ControlError::Unavailable("the store is closing".into()))?
            .get()
            .map_err(pool_error)
    }

    /// Applies the migrations not applied yet, one instance at a time.
    fn migrate(&self) -> Result<(), ControlError> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction().map_err(db_error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .map_err(db_error)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS flagmesh_schema (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .map_err(db_error)?;
        let applied: i32 = tx
            .query_one("SELECT coalesce(max(version), 0) FROM flagmesh_schema", &[])
            .map_err(db_error)?
            .get(0);
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
            let version = i as i32 + 1;
            tx.batch_execute(sql).map_err(db_error)?;
            tx.execute(
                "INSERT INTO flagmesh_schema (version) VALUES ($1)",
                &[&version],
            )
            .map_err(db_error)?;
            tracing::info!(version, "database schema migrated");
        }
        tx.commit().map_err(db_error)
    }

    /// Publishes every commit of the database (any instance's) to
    /// `publisher`, in revision order, after the revision the fan-out
    /// stands at (`after`), until `stop`. Runs on its own thread with its
    /// own connection; reconnects with backoff.
    pub fn tail(&self, after: u64, publisher: Publisher, stop: CancellationToken) {
        let url = self.url.clone();
        let spawned = std::thread::Builder::new()
            .name("flagmesh-pg-tail".into())
            .spawn(move || tail(&url, after, &publisher, &stop));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the change-log tail");
        }
    }
}

/// The tail's loop: see [`PgStore::tail`].
fn tail(url: &str, mut after: u64, publish: &Publisher, stop: &CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        match tail_connected(url, &mut after, publish, stop) {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, retry_ms = backoff.as_millis() as u64, "change-log tail lost the database");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn tail_connected(
    url: &str,
    after: &mut u64,
    publish: &Publisher,
    stop: &CancellationToken,
) -> Result<(), postgres::Error> {
    let mut client = Client::connect(url, NoTls)?;
    client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
    loop {
        if stop.is_cancelled() {
            return Ok(());
        }
        let rows = client.query(
            "SELECT revision, delta FROM flagmesh_change_log WHERE revision > $1 ORDER BY revision LIMIT $2",
            &[&to_db(*after), &TAIL_BATCH],
        )?;
        let full = rows.len() as i64 == TAIL_BATCH;
        for row in rows {
            let revision = from_db(row.get(0));
            let bytes: Vec<u8> = row.get(1);
            match Delta::decode(bytes.as_slice()) {
                Ok(delta) => publish(&delta),
                Err(e) => tracing::error!(error = %e, revision, "corrupt change-log entry"),
            }
            *after = revision;
        }
        if full {
            continue;
        }
        // woken by a commit, or after the poll interval at the latest
        let mut notifications = client.notifications();
        let mut waiting = notifications.timeout_iter(TAIL_POLL);
        postgres::fallible_iterator::FallibleIterator::next(&mut waiting)?;
    }
}

/// Read access inside a commit's transaction.
struct TxView<'a>(RefCell<postgres::Transaction<'a>>);

impl StateView for TxView<'_> {
    fn flag(&self, flag_set: &str, key: &str) -> Result<Option<Flag>, ControlError> {
        one(&mut *self.0.borrow_mut(), FLAG, &[&flag_set, &key])
    }

    fn flags_of(&self, flag_set: &str) -> Result<Vec<Flag>, ControlError> {
        all(&mut *self.0.borrow_mut(), FLAGS_OF, &[&flag_set])
    }

    fn flag_set(&self, flag_set: &str) -> Result<Option<FlagSet>, ControlError> {
        one(&mut *self.0.borrow_mut(), FLAG_SET, &[&flag_set])
    }
}

const FLAG: &str = "SELECT record FROM flagmesh_flags WHERE flag_set = $1 AND key = $2";
const FLAGS_OF: &str = "SELECT record FROM flagmesh_flags WHERE flag_set = $1 ORDER BY key";
const FLAG_SET: &str = "SELECT record FROM flagmesh_flag_sets WHERE id = $1";
const FLAG_SETS: &str = "SELECT record FROM flagmesh_flag_sets ORDER BY id";

/// The record (a protobuf message) of the one row `sql` finds, if any.
fn one<M: prost::Message + Default>(
    client: &mut impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<M>, ControlError> {
    client
        .query_opt(sql, params)
        .map_err(db_error)?
        .map(|r| decode(r.get::<_, &[u8]>(0)))
        .transpose()
}

/// The records of every row `sql` finds.
fn all<M: prost::Message + Default>(
    client: &mut impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<M>, ControlError> {
    client
        .query(sql, params)
        .map_err(db_error)?
        .iter()
        .map(|r| decode(r.get::<_, &[u8]>(0)))
        .collect()
}

fn head_of(row: &postgres::Row) -> StoreHead {
    StoreHead {
        history_id: row.get(0),
        revision: from_db(row.get(1)),
        digest: from_db(row.get(2)),
        compacted_through: from_db(row.get(3)),
    }
}

const HEAD: &str =
    "SELECT history_id, revision, digest, compacted_through FROM flagmesh_meta WHERE id = 1";

impl PgStore {
    fn head_now(&self) -> Result<StoreHead, ControlError> {
        let row = self.conn()?.query_one(HEAD, &[]).map_err(db_error)?;
        Ok(head_of(&row))
    }

    fn get_flag_now(&self, flag_set: &str, key: &str) -> Result<Option<Flag>, ControlError> {
        one(&mut *self.conn()?, FLAG, &[&flag_set, &key])
    }

    fn list_flags_now(
        &self,
        flag_set: Option<&str>,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<Flag>, ControlError> {
        let (after_set, after_key) = after.unwrap_or(("", ""));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        all(
            &mut *self.conn()?,
            "SELECT record FROM flagmesh_flags
             WHERE ($1::text IS NULL OR flag_set = $1) AND (flag_set, key) > ($2, $3)
             ORDER BY flag_set, key LIMIT $4",
            &[&flag_set, &after_set, &after_key, &limit],
        )
    }

    fn list_flag_sets_now(&self) -> Result<Vec<FlagSet>, ControlError> {
        all(&mut *self.conn()?, FLAG_SETS, &[])
    }

    fn get_flag_set_now(&self, flag_set: &str) -> Result<Option<FlagSet>, ControlError> {
        one(&mut *self.conn()?, FLAG_SET, &[&flag_set])
    }

    fn commit_now(&self, plan: Plan<'_>, dry_run: bool) -> Result<CommitOutcome, ControlError> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction().map_err(db_error)?;
        // the revision counter, locked until commit: revisions are handed
        // out in commit order, across every instance
        let head = head_of(
            &tx.query_one(&format!("{HEAD} FOR UPDATE"), &[])
                .map_err(db_error)?,
        );
        let view = TxView(RefCell::new(tx));
        let request = plan(&view)?;
        let c = crate::change::compute(&view, &head, request, now_ms())?;
        let mut tx = view.0.into_inner();
        if c.changes.is_empty() || dry_run {
            tx.rollback().map_err(db_error)?;
            return Ok(CommitOutcome {
                revision: head.revision,
                changes: c.changes,
                delta: None,
            });
        }
        for w in &c.writes {
            match w {
                Write::Flag(f) => tx.execute(
                    "INSERT INTO flagmesh_flags VALUES ($1, $2, $3)
                     ON CONFLICT (flag_set, key) DO UPDATE SET record = EXCLUDED.record",
                    &[&f.flag_set, &f.key, &f.encode_to_vec()],
                ),
                Write::DeleteFlag { flag_set, key } => tx.execute(
                    "DELETE FROM flagmesh_flags WHERE flag_set = $1 AND key = $2",
                    &[flag_set, key],
                ),
                Write::FlagSet(set) => tx.execute(
                    "INSERT INTO flagmesh_flag_sets VALUES ($1, $2)
                     ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
                    &[&set.id, &set.encode_to_vec()],
                ),
                Write::DeleteFlagSet(id) => {
                    tx.execute("DELETE FROM flagmesh_flag_sets WHERE id = $1", &[id])
                }
            }
            .map_err(db_error)?;
        }
        let revision = to_db(c.revision);
        tx.execute(
            "INSERT INTO flagmesh_change_log VALUES ($1, $2)",
            &[&revision, &c.delta.encode_to_vec()],
        )
        .map_err(db_error)?;
        tx.execute(
            "INSERT INTO flagmesh_audit VALUES ($1, $2)",
            &[&revision, &c.audit.encode_to_vec()],
        )
        .map_err(db_error)?;
        let mut compacted = head.compacted_through;
        if c.revision.saturating_sub(compacted) > self.retain {
            compacted = c.revision - self.retain;
            tx.execute(
                "DELETE FROM flagmesh_change_log WHERE revision <= $1",
                &[&to_db(compacted)],
            )
            .map_err(db_error)?;
        }
        tx.execute(
            "UPDATE flagmesh_meta SET revision = $1, digest = $2, compacted_through = $3 WHERE id = 1",
            &[&revision, &to_db(c.digest), &to_db(compacted)],
        )
        .map_err(db_error)?;
        tx.batch_execute(&format!("NOTIFY {CHANNEL}"))
            .map_err(db_error)?;
        tx.commit().map_err(db_error)?;
        Ok(CommitOutcome {
            revision: c.revision,
            changes: c.changes,
            delta: Some(c.delta),
        })
    }

    fn history_now(
        &self,
        before: Option<u64>,
        limit: usize,
        flag_set: Option<&str>,
        key: Option<&str>,
    ) -> Result<Vec<ChangeSet>, ControlError> {
        let mut conn = self.conn()?;
        let mut out = Vec::new();
        let mut below = to_db(before.unwrap_or(u64::MAX).min(i64::MAX as u64));
        loop {
            let rows = conn
                .query(
                    "SELECT revision, change_set FROM flagmesh_audit WHERE revision < $1 ORDER BY revision DESC LIMIT 500",
                    &[&below],
                )
                .map_err(db_error)?;
            if rows.is_empty() {
                return Ok(out);
            }
            for row in &rows {
                below = row.get(0);
                let cs: ChangeSet = decode(row.get::<_, &[u8]>(1))?;
                let matches = cs.changes.iter().any(|c| {
                    flag_set.is_none_or(|s| c.flag_set == s) && key.is_none_or(|k| c.key == k)
                });
                if matches {
                    out.push(cs);
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
        }
    }

    fn snapshot_now(&self) -> Result<SourceSnapshot, ControlError> {
        let mut conn = self.conn()?;
        // one consistent read; writers are never held up by it
        let mut tx = conn
            .build_transaction()
            .isolation_level(postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(db_error)?;
        let head = head_of(&tx.query_one(HEAD, &[]).map_err(db_error)?);
        let flags: Vec<Flag> = all(
            &mut tx,
            "SELECT record FROM flagmesh_flags ORDER BY flag_set, key",
            &[],
        )?;
        let flag_sets: Vec<FlagSet> = all(&mut tx, FLAG_SETS, &[])?;
        tx.commit().map_err(db_error)?;
        Ok(SourceSnapshot {
            history_id: head.history_id,
            revision: head.revision,
            digest: head.digest,
            flags,
            flag_sets,
        })
    }

    fn deltas_now(
        &self,
        history_id: &str,
        from: u64,
        to: u64,
    ) -> Result<Option<Vec<Delta>>, ControlError> {
        let mut conn = self.conn()?;
        let head = head_of(&conn.query_one(HEAD, &[]).map_err(db_error)?);
        if head.history_id != history_id || from < head.compacted_through || to > head.revision {
            return Ok(None);
        }
        let deltas: Vec<Delta> = all(
            &mut *conn,
            "SELECT delta FROM flagmesh_change_log WHERE revision > $1 AND revision <= $2 ORDER BY revision",
            &[&to_db(from), &to_db(to)],
        )?;
        Ok((deltas.len() as u64 == to - from).then_some(deltas))
    }

    fn publish_to_now(
        &self,
        publisher: Publisher,
        stop: &CancellationToken,
    ) -> Result<(), ControlError> {
        let after = self.head_now()?.revision;
        self.tail(after, publisher, stop.clone());
        Ok(())
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // closing a connection blocks: not on an async worker
        if let Some(pool) = self.pool.take() {
            blocking(move || drop(pool));
        }
    }
}

/// Every call runs the synchronous client off the async workers: on a
/// multi-threaded runtime the worker hands its tasks to others meanwhile.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

impl FlagStore for PgStore {
    fn head(&self) -> Result<StoreHead, ControlError> {
        blocking(|| self.head_now())
    }

    fn get_flag(&self, flag_set: &str, key: &str) -> Result<Option<Flag>, ControlError> {
        blocking(|| self.get_flag_now(flag_set, key))
    }

    fn list_flags(
        &self,
        flag_set: Option<&str>,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<Flag>, ControlError> {
        blocking(|| self.list_flags_now(flag_set, after, limit))
    }

    fn list_flag_sets(&self) -> Result<Vec<FlagSet>, ControlError> {
        blocking(|| self.list_flag_sets_now())
    }

    fn get_flag_set(&self, flag_set: &str) -> Result<Option<FlagSet>, ControlError> {
        blocking(|| self.get_flag_set_now(flag_set))
    }

    fn commit(&self, plan: Plan<'_>, dry_run: bool) -> Result<CommitOutcome, ControlError> {
        blocking(|| self.commit_now(plan, dry_run))
    }

    fn history(
        &self,
        before: Option<u64>,
        limit: usize,
        flag_set: Option<&str>,
        key: Option<&str>,
    ) -> Result<Vec<ChangeSet>, ControlError> {
        blocking(|| self.history_now(before, limit, flag_set, key))
    }

    fn snapshot(&self) -> Result<SourceSnapshot, ControlError> {
        blocking(|| self.snapshot_now())
    }

    fn deltas(
        &self,
        history_id: &str,
        from: u64,
        to: u64,
    ) -> Result<Option<Vec<Delta>>, ControlError> {
        blocking(|| self.deltas_now(history_id, from, to))
    }

    fn publish_to(
        &self,
        publisher: Publisher,
        stop: &CancellationToken,
    ) -> Result<(), ControlError> {
        blocking(|| self.publish_to_now(publisher, stop))
    }
}
