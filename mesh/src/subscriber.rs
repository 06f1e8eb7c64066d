//! The subscriber: follows an upstream's `Subscribe` stream into a
//! [`ReplicaStore`], with failover across upstreams.
//!
//! Upstreams are tried in rendezvous order (`xxh3(node_id, upstream)`,
//! highest first), so subscribers spread across hubs and fail over
//! deterministically. A subscription resumes from the replica's persisted
//! revision; a gap resubscribes from there; a digest mismatch or another
//! history resubscribes for a snapshot; a stream silent for longer than the
//! stall timeout (missed heartbeats) is dropped. Rounds in which no upstream
//! answered back off exponentially, with jitter.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flagmesh_proto::v1::sync_client::SyncClient;
use flagmesh_proto::v1::{NodeRole, SubscribeRequest, SyncEvent};
use tokio::sync::watch;
use xxhash_rust::xxh3::xxh3_64;

use crate::replica::{Applied, ApplyError, ReplicaStore};
use flagmesh_client::BearerToken;
use tokio_util::sync::CancellationToken;

/// Sees every applied snapshot and delta, after it is persisted.
pub trait ReplicaObserver: Send + Sync + 'static {
    /// `applied` is a [`Applied::Snapshot`] or [`Applied::Delta`].
    fn applied(&self, applied: &Applied);
}

/// How a subscriber runs.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// This node's id.
    pub node_id: String,
    /// This node's role.
    pub role: NodeRole,
    /// This node's region.
    pub region: String,
    /// Upstream addresses (`host:port` or URIs).
    pub upstreams: Vec<String>,
    /// The mesh credential presented upstream.
    pub mesh_token: Option<String>,
    /// TLS to upstreams (`None`: plaintext).
    pub tls: Option<flagmesh_client::ClientTls>,
    /// Flag sets to follow (empty: all).
    pub flag_sets: Vec<String>,
    /// First backoff after a round with no upstream.
    pub backoff_min: Duration,
    /// Longest backoff.
    pub backoff_max: Duration,
    /// A stream silent this long is considered stalled and dropped.
    pub stall_timeout: Duration,
    /// Connection timeout.
    pub connect_timeout: Duration,
}

impl SubscriberConfig {
    /// Defaults for a node: 100 ms to 5 s backoff, 6 s stall timeout.
    pub fn new(node_id: String, role: NodeRole, region: String, upstreams: Vec<String>) -> Self {
        Self {
            node_id,
            role,
            region,
            upstreams,
            mesh_token: None,
            tls: None,
            flag_sets: Vec::new(),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(6),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// What a subscriber currently knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStatus {
    /// Whether a stream is open.
    pub connected: bool,
    /// The upstream it follows (or last followed).
    pub upstream: String,
    /// The newest revision seen upstream.
    pub head_revision: u64,
    /// The revision applied locally.
    pub applied_revision: u64,
    /// Whether the upstream said it is connected to its own upstream.
    pub upstream_connected: bool,
    /// When the last message arrived (none yet: `None`).
    pub last_message: Option<Instant>,
    /// When the last snapshot or delta was applied, Unix ms.
    pub applied_at_unix_ms: i64,
    /// Since when (Unix ms) the applied revision has been behind the head
    /// seen upstream; `None` when caught up.
    pub behind_since_unix_ms: Option<i64>,
    /// The last revision refused (digest mismatch, malformed), 0 when none.
    pub rejected_revision: u64,
    /// Why it was refused.
    pub rejected_error: String,
    /// The history of the state held ("" before the first sync).
    pub history_id: String,
    /// An upstream on another history, refused (the node keeps its state
    /// until an operator adopts the other history); `None` once an
    /// upstream of its own history delivers again.
    pub history_conflict: Option<HistoryConflict>,
}

/// An upstream found serving another history than the one held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryConflict {
    /// The upstream.
    pub upstream: String,
    /// The history it serves.
    pub history_id: String,
}

impl SyncStatus {
    /// Stale: not connected, behind the head seen, or the upstream itself
    /// is cut off from its upstream.
    pub fn stale(&self) -> bool {
        !self.connected || self.applied_revision < self.head_revision || !self.upstream_connected
    }
}

/// Counters of a subscriber, for metrics.
#[derive(Debug, Default)]
pub struct SubscriberStats {
    /// Streams opened after the first.
    pub reconnects: AtomicU64,
    /// Digest mismatches detected (each followed by a resync).
    pub digest_mismatches: AtomicU64,
    /// Gaps detected (each followed by a resubscribe).
    pub gaps: AtomicU64,
    /// Snapshots applied.
    pub snapshots: AtomicU64,
    /// Deltas applied.
    pub deltas: AtomicU64,
    /// Snapshot bytes received.
    pub snapshot_bytes: AtomicU64,
    /// Delta bytes received.
    pub delta_bytes: AtomicU64,
    /// Snapshots of another history refused.
    pub history_conflicts: AtomicU64,
    /// Streams renewed on the same connection, once quiet, after a large
    /// message grew their receive buffer ([`RENEW_AFTER_BYTES`]).
    pub stream_renewals: AtomicU64,
}

/// A message larger than this grows the stream's receive buffer to its
/// size, and the buffer keeps that size as long as the stream lives: a
/// node that received one large delta (a bulk import) would hold several
/// MiB it no longer needs. Once the stream is quiet again (its next
/// heartbeat), the subscriber opens a new stream on the same connection,
/// resuming from the revision it holds, and drops the old one with its
/// buffer. Snapshots come in small chunks and never reach this.
pub const RENEW_AFTER_BYTES: u64 = 1 << 20;

/// Deltas up to this size are applied on the runtime's thread, larger ones
/// (and snapshots) on the blocking pool.
const APPLY_INLINE_BYTES: u64 = 16 << 10;

/// Orders upstreams for `node_id` by rendezvous hashing, best first.
pub fn rendezvous_order(node_id: &str, upstreams: &[String]) -> Vec<String> {
    let mut scored: Vec<(u64, &String)> = upstreams
        .iter()
        .map(|u| {
            let mut key = Vec::with_capacity(node_id.len() + u.len() + 1);
            key.extend_from_slice(node_id.as_bytes());
            key.push(0);
            key.extend_from_slice(u.as_bytes());
            (xxh3_64(&key), u)
        })
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored.into_iter().map(|(_, u)| u.clone()).collect()
}

/// A `Sync` client carrying the mesh credential.
type UpstreamClient = SyncClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>,
>;

/// A subscriber.
pub struct Subscriber {
    config: SubscriberConfig,
    replica: Arc<ReplicaStore>,
    observer: Arc<dyn ReplicaObserver>,
    status: watch::Sender<SyncStatus>,
    stats: Arc<SubscriberStats>,
    /// Digest mismatches in a row, without a good apply between them.
    mismatches: std::sync::atomic::AtomicU32,
}

/// Digest mismatches in a row after which an upstream is avoided for a
/// while (another one may serve a sound state).
const MISMATCHES_BEFORE_AVOIDING: u32 = 3;

enum Ended {
    /// The stream ended after it delivered messages.
    AfterProgress(String),
    /// The upstream said, for longer than the stall timeout, that it is
    /// itself disconnected: another upstream may be fresher.
    CutOff(String),
    /// Nothing was delivered.
    WithoutProgress(String),
    /// What the upstream sent was refused (a digest mismatch, another
    /// history): try the others, and back off before asking it again.
    Refused(String),
    /// Shutdown.
    Shutdown,
}

impl Subscriber {
    /// A subscriber writing into `replica` and telling `observer`.
    pub fn new(
        config: SubscriberConfig,
        replica: Arc<ReplicaStore>,
        observer: Arc<dyn ReplicaObserver>,
    ) -> Self {
        let position = replica.position();
        let (status, _) = watch::channel(SyncStatus {
            applied_revision: position.revision,
            history_id: position.history_id,
            ..Default::default()
        });
        Self {
            config,
            replica,
            observer,
            status,
            stats: Arc::new(SubscriberStats::default()),
            mismatches: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// Follows the status.
    pub fn status(&self) -> watch::Receiver<SyncStatus> {
        self.status.subscribe()
    }

    /// The counters.
    pub fn stats(&self) -> Arc<SubscriberStats> {
        self.stats.clone()
    }

    /// Runs until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) {
        // upstreams recently left because they were cut off from their own
        // upstream: tried last until the instant stored here
        let mut avoid: std::collections::HashMap<String, Instant> =
            std::collections::HashMap::new();
        let mut force_snapshot = false;
        let mut failed_rounds = 0u32;
        let mut streams = 0u64;
        loop {
            let now = Instant::now();
            avoid.retain(|_, until| *until > now);
            let mut order = rendezvous_order(&self.config.node_id, &self.config.upstreams);
            // stable: avoided upstreams go last, keeping rendezvous order otherwise
            order.sort_by_key(|u| avoid.contains_key(u));
            let mut progressed = false;
            for upstream in &order {
                if streams > 0 {
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                streams += 1;
                let ended = tokio::select! {
                    _ = stop.cancelled() => Ended::Shutdown,
                    e = self.follow(upstream, &mut force_snapshot) => e,
                };
                self.status.send_modify(|s| s.connected = false);
                self.replica.discard_pending();
                match ended {
                    Ended::Shutdown => return,
                    Ended::AfterProgress(reason) => {
                        tracing::info!(upstream = %upstream, reason, "upstream stream ended; resubscribing");
                        progressed = true;
                        break;
                    }
                    Ended::CutOff(reason) => {
                        tracing::info!(upstream = %upstream, reason, "leaving an upstream that is cut off from its own");
                        avoid.insert(
                            upstream.clone(),
                            Instant::now() + self.config.stall_timeout * 5,
                        );
                        progressed = true;
                        break;
                    }
                    Ended::WithoutProgress(reason) => {
                        tracing::debug!(upstream = %upstream, reason, "upstream unavailable; trying the next");
                    }
                    Ended::Refused(reason) => {
                        tracing::info!(upstream = %upstream, reason, "upstream's events refused; trying the next");
                        if self.mismatches.load(Ordering::Relaxed) >= MISMATCHES_BEFORE_AVOIDING {
                            avoid
                                .insert(upstream.clone(), Instant::now() + self.config.backoff_max);
                        }
                    }
                }
            }
            if progressed {
                failed_rounds = 0;
                continue;
            }
            failed_rounds = failed_rounds.saturating_add(1);
            let base = self.config.backoff_min.as_millis() as u64;
            let exp = base
                .saturating_mul(1u64 << failed_rounds.min(16))
                .min(self.config.backoff_max.as_millis() as u64);
            let wait = Duration::from_millis(exp / 2 + fastrand::u64(0..=exp / 2));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Opens a `Subscribe` stream on `client`, resuming from the revision
    /// the replica holds (from scratch when a snapshot is needed).
    async fn open_stream(
        &self,
        client: &mut UpstreamClient,
        force_snapshot: &mut bool,
    ) -> Result<tonic::Streaming<SyncEvent>, String> {
        let position = self.replica.position();
        // a widened scope is made whole by a snapshot only
        if self.replica.needs_snapshot() {
            *force_snapshot = true;
        }
        let (history_id, resume_revision) = if *force_snapshot {
            (String::new(), 0)
        } else {
            (position.history_id, position.revision)
        };
        let request = SubscribeRequest {
            node_id: self.config.node_id.clone(),
            role: self.config.role as i32,
            region: self.config.region.clone(),
            history_id,
            resume_revision,
            flag_sets: self.config.flag_sets.clone(),
        };
        match tokio::time::timeout(self.config.stall_timeout, client.subscribe(request)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(format!("subscribe: {:?}: {}", s.code(), s.message())),
            Err(_) => Err("subscribe timed out".into()),
        }
    }

    async fn follow(&self, upstream: &str, force_snapshot: &mut bool) -> Ended {
        // TLS files are read at every attempt: a rotated certificate is
        // used from the next connection on
        let endpoint = match flagmesh_client::endpoint(upstream, self.config.tls.as_ref()) {
            Ok(e) => e
                .connect_timeout(self.config.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(self.config.stall_timeout),
            Err(e) => return Ended::WithoutProgress(e),
        };
        let channel =
            match tokio::time::timeout(self.config.connect_timeout, endpoint.connect()).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Ended::WithoutProgress(format!("connect: {e}")),
                Err(_) => return Ended::WithoutProgress("connect timed out".into()),
            };
        let token = match BearerToken::new(self.config.mesh_token.as_deref()) {
            Ok(t) => t,
            Err(e) => return Ended::WithoutProgress(e.message().to_owned()),
        };
        let mut client =
            SyncClient::with_interceptor(channel, token).max_decoding_message_size(64 << 20);
        let mut stream = match self.open_stream(&mut client, force_snapshot).await {
            Ok(s) => s,
            Err(reason) => return Ended::WithoutProgress(reason),
        };
        self.status.send_modify(|s| {
            s.connected = true;
            s.upstream = upstream.to_owned();
        });
        let mut delivered = false;
        // a message above RENEW_AFTER_BYTES came since the stream opened
        let mut grown = false;
        let mut cut_off_since: Option<Instant> = None;
        let alternatives = self.config.upstreams.len() > 1;
        let ended = |delivered: bool, reason: String| {
            if delivered {
                Ended::AfterProgress(reason)
            } else {
                Ended::WithoutProgress(reason)
            }
        };
        loop {
            let message = match tokio::time::timeout(self.config.stall_timeout, stream.message())
                .await
            {
                Err(_) => {
                    return ended(
                        delivered,
                        format!("stalled: no message for {:?}", self.config.stall_timeout),
                    );
                }
                Ok(Err(s)) => return ended(delivered, format!("{:?}: {}", s.code(), s.message())),
                Ok(Ok(None)) => return ended(delivered, "closed by upstream".into()),
                Ok(Ok(Some(m))) => m,
            };
            delivered = true;
            // recorded without waking watchers: a heartbeat changes nothing they act on
            self.status.send_if_modified(|s| {
                s.last_message = Some(Instant::now());
                false
            });
            let size = prost::Message::encoded_len(&message) as u64;
            grown |= size > RENEW_AFTER_BYTES;
            // at a hub or PoP, a small delta or a heartbeat is applied
            // here: its journal sync (about 0.1 ms) holds this worker, while
            // the other serves, and saves the two thread hand-offs of the
            // blocking pool, a quarter of a PoP's thread switches per change
            // (BENCHMARKS.md, propagation); a large delta, and any part of
            // a snapshot (its last compiles every flag), go to the pool. An
            // SDK runs in its application's runtime, perhaps on one thread:
            // it never holds that runtime's thread for a disk sync
            let inline = self.config.role != NodeRole::Sdk
                && size <= APPLY_INLINE_BYTES
                && !matches!(
                    message.event,
                    Some(flagmesh_proto::v1::sync_event::Event::Snapshot(_))
                );
            let result = if inline {
                self.replica.apply(message)
            } else {
                let replica = self.replica.clone();
                match tokio::task::spawn_blocking(move || replica.apply(message)).await {
                    Ok(r) => r,
                    Err(e) => return ended(delivered, format!("apply task failed: {e}")),
                }
            };
            match result {
                Ok(Applied::Progress {
                    head_revision,
                    upstream_connected,
                    ..
                }) => {
                    let now = crate::now_ms();
                    self.status.send_modify(|s| {
                        s.head_revision = s.head_revision.max(head_revision);
                        s.upstream_connected = upstream_connected;
                        if s.head_revision > s.applied_revision && s.behind_since_unix_ms.is_none()
                        {
                            s.behind_since_unix_ms = Some(now);
                        }
                    });
                    if upstream_connected {
                        cut_off_since = None;
                    } else {
                        let since = *cut_off_since.get_or_insert_with(Instant::now);
                        if alternatives && since.elapsed() > self.config.stall_timeout {
                            return Ended::CutOff(format!(
                                "its upstream has been unreachable for over {:?}",
                                self.config.stall_timeout
                            ));
                        }
                    }
                    // quiet after a large message: a new stream, without
                    // the buffer it grew (never in a half-received snapshot)
                    if grown && !self.replica.has_pending() {
                        drop(stream);
                        stream = match self.open_stream(&mut client, force_snapshot).await {
                            Ok(s) => s,
                            Err(reason) => return ended(delivered, reason),
                        };
                        grown = false;
                        self.stats.stream_renewals.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(upstream, "stream renewed after a large message");
                    }
                }
                Ok(applied @ (Applied::Snapshot(_) | Applied::Delta(_))) => {
                    let revision = match &applied {
                        Applied::Snapshot(s) => {
                            self.stats.snapshots.fetch_add(1, Ordering::Relaxed);
                            self.stats.snapshot_bytes.fetch_add(size, Ordering::Relaxed);
                            s.revision
                        }
                        Applied::Delta(d) => {
                            self.stats.deltas.fetch_add(1, Ordering::Relaxed);
                            self.stats.delta_bytes.fetch_add(size, Ordering::Relaxed);
                            d.to_revision
                        }
                        _ => 0,
                    };
                    *force_snapshot = false;
                    let kind = if matches!(applied, Applied::Snapshot(_)) {
                        "snapshot"
                    } else {
                        "delta"
                    };
                    let _span = tracing::info_span!("apply", node = %self.config.node_id, revision, kind, upstream).entered();
                    tracing::debug!(revision, upstream, "applied");
                    self.observer.applied(&applied);
                    let now = crate::now_ms();
                    self.mismatches.store(0, Ordering::Relaxed);
                    let history = match &applied {
                        Applied::Snapshot(snap) => Some(snap.history_id.clone()),
                        _ => None,
                    };
                    self.status.send_modify(|s| {
                        if let Some(h) = history.filter(|h| *h != s.history_id) {
                            // a new (adopted) history: what was seen of the
                            // old one says nothing about this one
                            s.history_id = h;
                            s.head_revision = revision;
                            s.behind_since_unix_ms = None;
                            s.rejected_revision = 0;
                            s.rejected_error.clear();
                        }
                        s.history_conflict = None;
                        s.applied_revision = revision;
                        s.head_revision = s.head_revision.max(revision);
                        s.applied_at_unix_ms = now;
                        s.upstream_connected = true;
                        if s.applied_revision >= s.head_revision {
                            s.behind_since_unix_ms = None;
                        }
                    });
                }
                Ok(Applied::Buffered | Applied::Ignored) => {}
                Err(e @ ApplyError::Gap { .. }) => {
                    self.stats.gaps.fetch_add(1, Ordering::Relaxed);
                    return Ended::AfterProgress(format!(
                        "{e}; resubscribing from the local revision"
                    ));
                }
                Err(ApplyError::OtherHistory {
                    local,
                    upstream: theirs,
                }) => {
                    self.stats.history_conflicts.fetch_add(1, Ordering::Relaxed);
                    let conflict = HistoryConflict {
                        upstream: upstream.to_owned(),
                        history_id: theirs.clone(),
                    };
                    let new = self.status.borrow().history_conflict.as_ref() != Some(&conflict);
                    if new {
                        tracing::error!(
                            local_history = %local,
                            upstream_history = %theirs,
                            upstream,
                            "HISTORY CONFLICT: the upstream serves another history; this node keeps serving the state it holds until an operator adopts the other history (--adopt-history {theirs})"
                        );
                    }
                    self.status
                        .send_modify(|s| s.history_conflict = Some(conflict));
                    // resume from what is held, never from scratch
                    *force_snapshot = false;
                    return Ended::Refused(format!(
                        "history conflict: upstream serves {theirs}, this node holds {local}"
                    ));
                }
                Err(
                    e @ (ApplyError::DigestMismatch { .. }
                    | ApplyError::WrongHistory { .. }
                    | ApplyError::Malformed(_)),
                ) => {
                    let mismatch = matches!(e, ApplyError::DigestMismatch { .. });
                    if mismatch {
                        self.stats.digest_mismatches.fetch_add(1, Ordering::Relaxed);
                        self.mismatches.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::warn!(error = %e, upstream, "refused an event; resyncing from a snapshot");
                    let rejected = match &e {
                        ApplyError::DigestMismatch { revision, .. } => *revision,
                        _ => self.replica.position().revision + 1,
                    };
                    self.status.send_modify(|s| {
                        s.rejected_revision = rejected;
                        s.rejected_error = e.to_string();
                    });
                    *force_snapshot = true;
                    if mismatch {
                        // asked again at once it would likely send the same:
                        // back off, and after repeated ones try the others first
                        return Ended::Refused(e.to_string());
                    }
                    return Ended::AfterProgress(e.to_string());
                }
                Err(e @ ApplyError::Storage(_)) => {
                    tracing::error!(error = %e, "the replica store failed");
                    return Ended::WithoutProgress(e.to_string());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_is_deterministic_and_spreads() {
        let ups: Vec<String> = (0..3).map(|i| format!("hub-{i}:7000")).collect();
        assert_eq!(
            rendezvous_order("pop-1", &ups),
            rendezvous_order("pop-1", &ups)
        );
        let mut firsts = std::collections::HashMap::new();
        for p in 0..300 {
            let order = rendezvous_order(&format!("pop-{p}"), &ups);
            assert_eq!(order.len(), 3);
            *firsts.entry(order[0].clone()).or_insert(0) += 1;
        }
        for u in &ups {
            let n = firsts.get(u).copied().unwrap_or(0);
            assert!((60..=140).contains(&n), "{u} preferred by {n} of 300");
        }
        // removing an upstream only moves the subscribers that preferred it
        let fewer: Vec<String> = ups[1..].to_vec();
        for p in 0..300 {
            let id = format!("pop-{p}");
            let before = rendezvous_order(&id, &ups);
            if before[0] != ups[0] {
                assert_eq!(rendezvous_order(&id, &fewer)[0], before[0]);
            }
        }
    }
}
