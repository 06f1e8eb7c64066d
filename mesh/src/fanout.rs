//! The server side of `Subscribe`: one shared, bounded ring of recent
//! deltas, each encoded once; every subscriber is a cursor into it.
//!
//! A subscriber is first brought to the head (a snapshot when it has no
//! state, is of another history, or resumes below what the ring and the
//! source retain; otherwise one coalesced delta), then receives each new
//! delta as the very bytes every other subscriber receives, and a Progress
//! heartbeat when idle. Each subscriber has a small bounded queue: one that
//! accepts nothing for `send_timeout` is cut off (it resumes from its own
//! store), so a slow subscriber never slows the others and memory stays
//! bounded by the ring plus a few events per subscriber. Snapshots are
//! encoded chunk by chunk as the subscriber takes them, from one read of
//! the state that subscribers reconnecting together share
//! ([`crate::snapshot_stream`]).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use flagmesh_proto::shared::SharedSyncEvent;
use flagmesh_proto::v1::{Delta, Progress, SubscribeRequest, SyncEvent, sync_event::Event};
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::coalesce::{coalesce, filter_delta};
use crate::snapshot_stream::{Outgoing, SnapshotChunks, SubscribeStream};
use crate::source::{SourceError, SourceSnapshot, SyncSource};
use tokio_util::sync::CancellationToken;

/// Tuning of a fan-out.
#[derive(Debug, Clone)]
pub struct FanoutConfig {
    /// Most deltas the ring keeps.
    pub ring_revisions: usize,
    /// Most encoded bytes the ring keeps.
    pub ring_bytes: usize,
    /// Progress heartbeat interval on an idle stream.
    pub heartbeat: Duration,
    /// How long a subscriber may accept nothing before it is cut off.
    pub send_timeout: Duration,
    /// Events queued per subscriber.
    pub queue: usize,
    /// Target size of one snapshot chunk.
    pub snapshot_chunk_bytes: usize,
    /// A coalesced catch-up delta larger than this (encoded) is sent as a
    /// snapshot instead, in chunks.
    pub max_catch_up_delta_bytes: usize,
    /// The flag sets this server's state holds (empty: every set). A
    /// server with a partial state refuses subscribers that ask for more.
    pub scope: Vec<String>,
    /// Whether deltas are encoded and kept while nobody subscribes. A hub
    /// keeps them, so that PoPs reconnecting after a moment resume by
    /// delta; a PoP, rarely followed, does not: a subscriber that comes
    /// later catches up by snapshot.
    pub ring_without_subscribers: bool,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        Self {
            ring_revisions: 1024,
            ring_bytes: 16 << 20,
            heartbeat: Duration::from_secs(2),
            send_timeout: Duration::from_secs(10),
            queue: 16,
            snapshot_chunk_bytes: 64 << 10,
            max_catch_up_delta_bytes: 4 << 20,
            scope: Vec::new(),
            ring_without_subscribers: true,
        }
    }
}

/// The head of the state a fan-out serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The history.
    pub history_id: Arc<str>,
    /// The newest revision.
    pub revision: u64,
    /// Whether this server is itself connected upstream (always true at control).
    pub upstream_connected: bool,
    /// The state digest at `revision` (`None`: not known, as for a
    /// partial state).
    pub digest: Option<u64>,
}

struct RingEntry {
    delta: Arc<Delta>,
    event: SharedSyncEvent,
}

#[derive(Default)]
struct Ring {
    entries: VecDeque<RingEntry>,
    bytes: usize,
}

/// Counters of a fan-out, for metrics.
#[derive(Debug, Default)]
pub struct FanoutStats {
    /// Subscribers connected now.
    pub subscribers: AtomicI64,
    /// Subscribers cut off for not reading.
    pub cut_off: AtomicU64,
    /// Snapshots sent (whole snapshots, not chunks).
    pub snapshots_sent: AtomicU64,
    /// Deltas sent.
    pub deltas_sent: AtomicU64,
    /// Deltas sent as shared bytes (no per-subscriber encoding).
    pub shared_sends: AtomicU64,
    /// Bytes of snapshots and deltas sent.
    pub bytes_sent: AtomicU64,
}

/// What brings a subscriber to the head.
pub enum CatchUp {
    /// Events, in order (none when it is there already).
    Events(Vec<SharedSyncEvent>),
    /// A snapshot, encoded chunk by chunk as the subscriber takes it.
    Snapshot(SnapshotChunks),
}

impl CatchUp {
    /// Every event, a snapshot's chunks encoded at once (for callers that
    /// are not a stream).
    pub fn into_events(self) -> Vec<SharedSyncEvent> {
        match self {
            Self::Events(events) => events,
            Self::Snapshot(chunks) => chunks.collect(),
        }
    }
}

/// Where a subscriber stands: its history and revision (`None`: no state).
pub type Cursor = Option<(Arc<str>, u64)>;

/// The fan-out of one server.
pub struct Fanout {
    ring: RwLock<Ring>,
    head: watch::Sender<Head>,
    source: Arc<dyn SyncSource>,
    config: FanoutConfig,
    stop: CancellationToken,
    stats: Arc<FanoutStats>,
    /// The states read for the snapshots being sent now, shared by them and
    /// each dropped with the last one: the whole state's, and one per set
    /// of flag sets filtered subscribers follow (when the source reads
    /// sets alone).
    snapshots: Mutex<Vec<SharedRead>>,
}

/// The flag sets a shared read holds (`None`: every set), and the read.
type SharedRead = (Option<Arc<HashSet<String>>>, Weak<SourceSnapshot>);

impl Fanout {
    /// A fan-out at `head`, serving from `source`, ending every stream when `stop` is cancelled.
    pub fn new(
        source: Arc<dyn SyncSource>,
        head: Head,
        config: FanoutConfig,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let (tx, _) = watch::channel(head);
        Arc::new(Self {
            ring: RwLock::new(Ring::default()),
            head: tx,
            source,
            config,
            stop,
            stats: Arc::default(),
            snapshots: Mutex::default(),
        })
    }

    /// The current head.
    pub fn head(&self) -> Head {
        self.head.borrow().clone()
    }

    /// How many deltas and encoded bytes the ring holds now.
    pub fn ring_usage(&self) -> (usize, usize) {
        let ring = self.ring.read().unwrap_or_else(|p| p.into_inner());
        (ring.entries.len(), ring.bytes)
    }

    /// Counters.
    pub fn stats(&self) -> &FanoutStats {
        &self.stats
    }

    /// A number that moves whenever this fan-out does real work: a new
    /// revision (every delta moves it), each MiB sent (snapshots streaming),
    /// a snapshot done, a subscriber coming or going. Heartbeats, which
    /// never stop while anyone subscribes, move it only once per MiB of
    /// them. A sign of activity for releasing memory when quiet.
    pub fn activity(&self) -> u64 {
        let s = &self.stats;
        self.head().revision
            ^ (s.bytes_sent.load(Ordering::Relaxed) >> 20).rotate_left(7)
            ^ s.snapshots_sent.load(Ordering::Relaxed).rotate_left(29)
            ^ (s.subscribers.load(Ordering::Relaxed) as u64).rotate_left(41)
    }

    /// Publishes a committed delta to every subscriber. A delta that does
    /// not continue from the head (or is of another history) restarts the
    /// ring from it; one at or below the head of the same history is
    /// dropped, so the head never moves back whatever the order publishers
    /// call in (subscribers fill any gap from the source).
    pub fn publish(&self, delta: Delta) {
        self.publish_shared(Arc::new(delta));
    }

    /// [`Fanout::publish`] of a delta already shared (nothing is copied).
    #[tracing::instrument(name = "publish", skip_all, fields(revision = delta.to_revision, from = delta.from_revision))]
    pub fn publish_shared(&self, delta: Arc<Delta>) {
        // nobody to send it to, and nothing kept for later: the head
        // moves and a later subscriber catches up from the source
        let event = self
            .keeps_ring()
            .then(|| SharedSyncEvent::from_delta(&delta));
        // the head is read and moved under the ring's lock: two publishers
        // never interleave between the check and the move
        let mut ring = self.ring.write().unwrap_or_else(|p| p.into_inner());
        // the last subscriber may have left meanwhile (and emptied the ring)
        let event = event.filter(|_| self.keeps_ring());
        let head = self.head();
        let same_history = *head.history_id == delta.history_id;
        if same_history && delta.to_revision <= head.revision {
            tracing::debug!(head = head.revision, "delta at or below the head dropped");
            return;
        }
        if !same_history || delta.from_revision != head.revision || event.is_none() {
            ring.entries.clear();
            ring.bytes = 0;
        }
        let Some(event) = event else {
            drop(ring);
            self.move_head(&delta, same_history);
            return;
        };
        // the decoded delta is kept too: count it like its encoding
        ring.bytes += 2 * event.len();
        ring.entries.push_back(RingEntry {
            delta: delta.clone(),
            event,
        });
        while ring.entries.len() > self.config.ring_revisions
            || (ring.bytes > self.config.ring_bytes && ring.entries.len() > 1)
        {
            if let Some(old) = ring.entries.pop_front() {
                ring.bytes -= 2 * old.event.len();
            }
        }
        self.move_head(&delta, same_history);
    }

    /// Whether deltas are kept for catching up: always, or (a PoP) while
    /// something subscribes.
    fn keeps_ring(&self) -> bool {
        self.config.ring_without_subscribers || self.stats.subscribers.load(Ordering::Relaxed) > 0
    }

    /// Empties the ring once its last subscriber left, where deltas are
    /// kept only for subscribers: otherwise the last deltas (a bulk change
    /// can be several MiB, encoded and decoded) would stay until the next
    /// change.
    fn release_ring_if_unused(&self) {
        let mut ring = self.ring.write().unwrap_or_else(|p| p.into_inner());
        if !self.keeps_ring() {
            ring.entries.clear();
            ring.bytes = 0;
        }
    }

    fn move_head(&self, delta: &Delta, same_history: bool) {
        self.head.send_modify(|h| {
            if !same_history {
                h.history_id = delta.history_id.as_str().into();
            }
            h.revision = delta.to_revision;
            h.digest = delta.digest;
        });
    }

    /// The state was replaced (a snapshot applied at a hub): the ring
    /// restarts empty at `revision` of `history_id`, with `digest`.
    pub fn reset(&self, history_id: &str, revision: u64, digest: Option<u64>) {
        {
            let mut ring = self.ring.write().unwrap_or_else(|p| p.into_inner());
            ring.entries.clear();
            ring.bytes = 0;
        }
        self.head.send_modify(|h| {
            h.history_id = history_id.into();
            h.revision = revision;
            h.digest = digest;
        });
    }

    /// Whether this server is connected upstream (reported in Progress).
    pub fn set_upstream_connected(&self, connected: bool) {
        self.head.send_if_modified(|h| {
            let changed = h.upstream_connected != connected;
            h.upstream_connected = connected;
            changed
        });
    }

    /// Opens a subscription. Fails with `UNAVAILABLE` when the subscriber
    /// is ahead of this server in the same history.
    pub fn subscribe(self: &Arc<Self>, req: SubscribeRequest) -> Result<SubscribeStream, Status> {
        if !self.config.scope.is_empty() {
            let outside = if req.flag_sets.is_empty() {
                Some("every flag set".to_owned())
            } else {
                req.flag_sets
                    .iter()
                    .find(|s| !self.config.scope.contains(s))
                    .map(|s| format!("flag set \"{s}\""))
            };
            if let Some(outside) = outside {
                return Err(Status::failed_precondition(format!(
                    "this server holds only flag sets {:?}, not {outside}: subscribe within them, or to another upstream",
                    self.config.scope
                )));
            }
        }
        let head = self.head();
        if !req.history_id.is_empty()
            && req.history_id == *head.history_id
            && req.resume_revision > head.revision
        {
            return Err(Status::unavailable(format!(
                "this server is at revision {}, behind the requested {}: try another upstream",
                head.revision, req.resume_revision
            )));
        }
        let (tx, rx) = mpsc::channel(self.config.queue);
        let fanout = self.clone();
        tokio::spawn(async move {
            fanout.stats.subscribers.fetch_add(1, Ordering::Relaxed);
            let node = req.node_id.clone();
            let outcome = fanout.session(req, &tx).await;
            if fanout.stats.subscribers.fetch_sub(1, Ordering::Relaxed) == 1 {
                fanout.release_ring_if_unused();
            }
            match outcome {
                Ok(()) => tracing::debug!(node = %node, "subscriber left"),
                Err(reason) => tracing::info!(node = %node, reason, "subscriber stream ended"),
            }
        });
        Ok(SubscribeStream::new(rx, self.stats.clone()))
    }

    async fn session(
        self: &Arc<Self>,
        req: SubscribeRequest,
        tx: &mpsc::Sender<Result<Outgoing, Status>>,
    ) -> Result<(), &'static str> {
        let filter: Option<Arc<HashSet<String>>> =
            (!req.flag_sets.is_empty()).then(|| Arc::new(req.flag_sets.iter().cloned().collect()));
        let mut cursor: Cursor = (!req.history_id.is_empty() && req.resume_revision > 0)
            .then(|| (req.history_id.as_str().into(), req.resume_revision));
        let mut head_rx = self.head.subscribe();
        let stop = self.stop.clone();
        loop {
            head_rx.borrow_and_update();
            // the common case (a live subscriber one entry behind, or up to
            // date) is served from the ring without leaving this task
            let caught_up = match self.catch_up_from_ring(&cursor, filter.is_some()) {
                Some(done) => Ok(Ok(done)),
                None => {
                    let fanout = self.clone();
                    let (from, sets) = (cursor.clone(), filter.clone());
                    tokio::task::spawn_blocking(move || fanout.catch_up(&from, sets.as_ref())).await
                }
            };
            match caught_up {
                Ok(Ok((CatchUp::Events(events), next))) => {
                    for e in events {
                        self.send(tx, Outgoing::Event(e)).await?;
                    }
                    cursor = next;
                }
                Ok(Ok((CatchUp::Snapshot(chunks), next))) => {
                    self.stats.snapshots_sent.fetch_add(1, Ordering::Relaxed);
                    self.send(tx, Outgoing::Snapshot(chunks)).await?;
                    cursor = next;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "reading state for a subscriber failed");
                    let _ = tx
                        .send(Err(Status::unavailable(
                            "this server cannot read its state",
                        )))
                        .await;
                    return Err("state unavailable");
                }
                Err(_) => return Err("catch-up task failed"),
            }
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                changed = head_rx.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
                _ = tokio::time::sleep(self.config.heartbeat) => {
                    let head = self.head();
                    let revision = cursor.as_ref().map(|c| c.1).unwrap_or(0);
                    let progress = SyncEvent {
                        event: Some(Event::Progress(Progress {
                            revision,
                            head_revision: head.revision.max(revision),
                            history_id: head.history_id.to_string(),
                            upstream_connected: head.upstream_connected,
                            // checked only by a whole-state subscriber at the head
                            head_digest: head
                                .digest
                                .filter(|_| filter.is_none() && revision == head.revision),
                        })),
                    };
                    self.send(tx, Outgoing::Event(SharedSyncEvent::new(&progress)))
                        .await?;
                }
                _ = tx.closed() => return Ok(()),
            }
        }
    }

    /// [`Fanout::catch_up`] when the ring alone answers it: nothing to
    /// send, or one shared entry. `None` when the source may be needed.
    fn catch_up_from_ring(&self, cursor: &Cursor, filtered: bool) -> Option<(CatchUp, Cursor)> {
        let head = self.head();
        let (history, rev) = cursor.as_ref()?;
        if head.history_id.is_empty() || *history != head.history_id {
            return None;
        }
        if *rev >= head.revision {
            return Some((CatchUp::Events(Vec::new()), cursor.clone()));
        }
        if filtered {
            return None;
        }
        let ring = self.ring.read().unwrap_or_else(|p| p.into_inner());
        let entry = ring
            .entries
            .iter()
            .find(|e| e.delta.from_revision == *rev)?;
        if entry.delta.to_revision != head.revision {
            return None;
        }
        self.stats.shared_sends.fetch_add(1, Ordering::Relaxed);
        Some((
            CatchUp::Events(vec![entry.event.clone()]),
            Some((history.clone(), head.revision)),
        ))
    }

    /// The events that bring a subscriber standing at `cursor` to this
    /// server's head, and where it stands after them: nothing when it is
    /// there already (or ahead: it waits for the head to catch up); one
    /// delta (the ring's shared bytes when a single entry covers it, else
    /// the ring's or the source's deltas coalesced); or a snapshot, in
    /// chunks, when neither retains what it misses or its history differs.
    /// Blocking: it may read the source.
    pub fn catch_up(
        &self,
        cursor: &Cursor,
        filter: Option<&Arc<HashSet<String>>>,
    ) -> Result<(CatchUp, Cursor), SourceError> {
        let head = self.head();
        if head.history_id.is_empty() {
            // nothing to serve until this server has state
            return Ok((CatchUp::Events(Vec::new()), cursor.clone()));
        }
        match cursor {
            Some((history, rev)) if *history == head.history_id && *rev >= head.revision => {
                Ok((CatchUp::Events(Vec::new()), cursor.clone()))
            }
            Some((history, rev)) if *history == head.history_id => {
                match self.deltas_between(history, *rev, head.revision, filter.map(|f| &**f))? {
                    Some(event) => Ok((
                        CatchUp::Events(vec![event]),
                        Some((history.clone(), head.revision)),
                    )),
                    None => self.snapshot_chunks(filter),
                }
            }
            _ => self.snapshot_chunks(filter),
        }
    }

    /// The state for a snapshot: the one snapshots being sent now already
    /// read, if it is still the head, else one new consistent read of the
    /// source (subscribers asking together wait for it and share it). A
    /// filtered subscriber's is a read of its flag sets only, shared with
    /// those following the same sets.
    fn shared_state(
        &self,
        filter: Option<&Arc<HashSet<String>>>,
    ) -> Result<Arc<SourceSnapshot>, SourceError> {
        // a source that reads a set no faster than all of them: one read
        let sets = filter.filter(|_| self.source.reads_sets_alone());
        let same = |held: &Option<Arc<HashSet<String>>>| held.as_deref() == sets.map(|s| &**s);
        let mut shared = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        shared.retain(|(_, state)| state.strong_count() > 0);
        let head = self.head();
        if let Some(state) = shared
            .iter()
            .find(|(held, _)| same(held))
            .and_then(|(_, state)| state.upgrade())
            .filter(|state| {
                *state.history_id == *head.history_id && state.revision >= head.revision
            })
        {
            return Ok(state);
        }
        let state = Arc::new(match sets {
            Some(sets) => self.source.snapshot_of(sets)?,
            None => self.source.snapshot()?,
        });
        shared.retain(|(held, _)| !same(held));
        shared.push((sets.cloned(), Arc::downgrade(&state)));
        Ok(state)
    }

    fn snapshot_chunks(
        &self,
        filter: Option<&Arc<HashSet<String>>>,
    ) -> Result<(CatchUp, Cursor), SourceError> {
        let chunks = SnapshotChunks::new(
            self.shared_state(filter)?,
            filter.cloned(),
            self.config.snapshot_chunk_bytes,
        );
        let cursor = chunks.cursor();
        Ok((CatchUp::Snapshot(chunks), cursor))
    }

    fn deltas_between(
        &self,
        history: &str,
        from: u64,
        to: u64,
        filter: Option<&HashSet<String>>,
    ) -> Result<Option<SharedSyncEvent>, SourceError> {
        let from_ring = {
            let ring = self.ring.read().unwrap_or_else(|p| p.into_inner());
            match ring
                .entries
                .iter()
                .position(|e| e.delta.from_revision == from)
            {
                Some(i) => {
                    let run: Vec<&RingEntry> = ring
                        .entries
                        .iter()
                        .skip(i)
                        .take_while(|e| e.delta.to_revision <= to)
                        .collect();
                    match run.as_slice() {
                        [] => None,
                        [one] if filter.is_none() && one.delta.to_revision == to => {
                            self.stats.shared_sends.fetch_add(1, Ordering::Relaxed);
                            return Ok(Some(one.event.clone()));
                        }
                        many => Some(many.iter().map(|e| e.delta.clone()).collect::<Vec<_>>()),
                    }
                }
                None => None,
            }
        };
        let deltas: Vec<Arc<Delta>> = match from_ring {
            Some(ds) => ds,
            None => match self.source.deltas(history, from, to)? {
                Some(ds) => ds.into_iter().map(Arc::new).collect(),
                None => return Ok(None),
            },
        };
        let Some(merged) = coalesce(&deltas) else {
            return Ok(None);
        };
        if merged.from_revision != from || merged.to_revision != to {
            return Ok(None);
        }
        let merged = match filter {
            Some(sets) => filter_delta(merged, sets),
            None => merged,
        };
        // a huge catch-up goes as a chunked snapshot, not one message
        if prost::Message::encoded_len(&merged) > self.config.max_catch_up_delta_bytes {
            return Ok(None);
        }
        Ok(Some(SharedSyncEvent::new(&SyncEvent {
            event: Some(Event::Delta(merged)),
        })))
    }

    async fn send(
        &self,
        tx: &mpsc::Sender<Result<Outgoing, Status>>,
        item: Outgoing,
    ) -> Result<(), &'static str> {
        // a snapshot's chunks are counted as the stream encodes them
        let len = match &item {
            Outgoing::Event(e) => Some(e.len() as u64),
            Outgoing::Snapshot(_) => None,
        };
        match tokio::time::timeout(self.config.send_timeout, tx.send(Ok(item))).await {
            Ok(Ok(())) => {
                if let Some(len) = len {
                    self.stats.bytes_sent.fetch_add(len, Ordering::Relaxed);
                    self.stats.deltas_sent.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            Ok(Err(_)) => Err("subscriber went away"),
            Err(_) => {
                self.stats.cut_off.fetch_add(1, Ordering::Relaxed);
                Err("subscriber accepted nothing before the send deadline: cut off")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source with nothing in it (these tests never read it).
    struct Empty;

    impl SyncSource for Empty {
        fn snapshot(&self) -> Result<crate::SourceSnapshot, SourceError> {
            Ok(crate::SourceSnapshot::default())
        }

        fn deltas(&self, _: &str, _: u64, _: u64) -> Result<Option<Vec<Delta>>, SourceError> {
            Ok(None)
        }
    }

    fn fanout() -> Arc<Fanout> {
        fanout_at(0, FanoutConfig::default())
    }

    /// A fan-out over nothing, at `revision` of history `h`.
    fn fanout_at(revision: u64, config: FanoutConfig) -> Arc<Fanout> {
        Fanout::new(
            Arc::new(Empty),
            Head {
                history_id: "h".into(),
                revision,
                upstream_connected: true,
                digest: None,
            },
            config,
            CancellationToken::new(),
        )
    }

    fn delta(history: &str, to: u64) -> Delta {
        Delta {
            history_id: history.into(),
            from_revision: to - 1,
            to_revision: to,
            ..Default::default()
        }
    }

    #[test]
    fn the_head_never_moves_back_under_concurrent_publishers() {
        const REVISIONS: u64 = 2_000;
        for _ in 0..5 {
            let f = fanout();
            let mut heads = f.head.subscribe();
            // four publishers each take every fourth revision, racing
            let publishers: Vec<_> = (0..4u64)
                .map(|p| {
                    let f = f.clone();
                    std::thread::spawn(move || {
                        for to in (1..=REVISIONS).filter(|r| r % 4 == p) {
                            f.publish(delta("h", to));
                        }
                    })
                })
                .collect();
            let mut seen = 0;
            while publishers.iter().any(|p| !p.is_finished()) {
                let now = heads.borrow_and_update().revision;
                assert!(now >= seen, "the head moved back from {seen} to {now}");
                seen = now;
            }
            for p in publishers {
                p.join().expect("publisher");
            }
            assert_eq!(f.head().revision, REVISIONS);
            // what the ring holds is chained and ends at the head
            let ring = f.ring.read().expect("ring");
            let revisions: Vec<(u64, u64)> = ring
                .entries
                .iter()
                .map(|e| (e.delta.from_revision, e.delta.to_revision))
                .collect();
            assert!(
                revisions.windows(2).all(|w| w[0].1 == w[1].0),
                "{revisions:?}"
            );
            assert_eq!(revisions.last().map(|r| r.1), Some(REVISIONS));
        }
    }

    #[test]
    fn without_subscribers_a_pop_keeps_no_deltas_and_a_late_subscriber_gets_a_snapshot() {
        let f = fanout_at(
            0,
            FanoutConfig {
                ring_without_subscribers: false,
                ..FanoutConfig::default()
            },
        );
        for to in 1..=5 {
            f.publish(delta("h", to));
        }
        assert_eq!(f.head().revision, 5, "the head moves");
        assert_eq!(f.ring_usage(), (0, 0), "nothing is kept");
        let cursor: Cursor = Some(("h".into(), 3));
        let (catch_up, _) = f.catch_up(&cursor, None).expect("catch up");
        assert!(matches!(catch_up, CatchUp::Snapshot(_)));
        // with a subscriber, deltas are kept again
        f.stats.subscribers.fetch_add(1, Ordering::Relaxed);
        f.publish(delta("h", 6));
        assert_eq!(f.ring_usage().0, 1);
    }

    #[tokio::test]
    async fn a_pop_empties_its_ring_when_its_last_subscriber_leaves() {
        let f = fanout_at(
            0,
            FanoutConfig {
                ring_without_subscribers: false,
                heartbeat: Duration::from_millis(20),
                ..FanoutConfig::default()
            },
        );
        async fn subscribers_become(f: &Fanout, n: i64) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while f.stats.subscribers.load(Ordering::Relaxed) != n {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never {n} subscribers"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let request = SubscribeRequest {
            node_id: "sdk".into(),
            ..Default::default()
        };
        let stream = f.subscribe(request.clone()).expect("subscribe");
        let other = f.subscribe(request).expect("subscribe");
        subscribers_become(&f, 2).await;
        for to in 1..=3 {
            f.publish(delta("h", to));
        }
        assert_eq!(f.ring_usage().0, 3, "kept while subscribed");
        drop(stream);
        subscribers_become(&f, 1).await;
        assert_eq!(f.ring_usage().0, 3, "kept while one still subscribes");
        drop(other);
        subscribers_become(&f, 0).await;
        assert_eq!(
            f.ring_usage(),
            (0, 0),
            "the deltas outlived the subscribers"
        );
        // the head stays where it was
        assert_eq!(f.head().revision, 3);
    }

    /// Sets "a" and "b", one flag each, at revision 1; counts its reads.
    /// Reads a set alone when `alone`.
    #[derive(Default)]
    struct Counting {
        alone: bool,
        whole: AtomicU64,
        filtered: Mutex<Vec<Vec<String>>>,
    }

    impl Counting {
        fn state(&self, keep: impl Fn(&str) -> bool) -> crate::SourceSnapshot {
            crate::SourceSnapshot {
                history_id: "h".into(),
                revision: 1,
                digest: 7,
                flags: ["a", "b"]
                    .into_iter()
                    .filter(|s| keep(s))
                    .map(|s| flagmesh_proto::v1::Flag {
                        flag_set: s.into(),
                        key: format!("in-{s}"),
                        ..Default::default()
                    })
                    .collect(),
                flag_sets: Vec::new(),
            }
        }
    }

    impl SyncSource for Counting {
        fn snapshot(&self) -> Result<crate::SourceSnapshot, SourceError> {
            self.whole.fetch_add(1, Ordering::Relaxed);
            Ok(self.state(|_| true))
        }

        fn snapshot_of(
            &self,
            sets: &HashSet<String>,
        ) -> Result<crate::SourceSnapshot, SourceError> {
            let mut asked: Vec<String> = sets.iter().cloned().collect();
            asked.sort();
            self.filtered.lock().expect("lock").push(asked);
            Ok(self.state(|s| sets.contains(s)))
        }

        fn reads_sets_alone(&self) -> bool {
            self.alone
        }

        fn deltas(&self, _: &str, _: u64, _: u64) -> Result<Option<Vec<Delta>>, SourceError> {
            Ok(None)
        }
    }

    #[tokio::test]
    async fn filtered_subscribers_read_only_their_sets_and_share_each_read() {
        // a source that reads sets alone: one read per distinct filter
        let source = snapshots_of_four_subscribers(true).await;
        let mut filtered = source.filtered.lock().expect("lock").clone();
        filtered.sort();
        assert_eq!(filtered, [vec!["a".to_owned()], vec!["b".to_owned()]]);
        assert_eq!(source.whole.load(Ordering::Relaxed), 1);
        // one that does not: every subscriber shares one whole read
        let source = snapshots_of_four_subscribers(false).await;
        assert!(source.filtered.lock().expect("lock").is_empty());
        assert_eq!(source.whole.load(Ordering::Relaxed), 1);
    }

    /// Subscribers to sets a, a, b and every set, all at once; checks what
    /// each is sent and returns the source's counts.
    async fn snapshots_of_four_subscribers(alone: bool) -> Arc<Counting> {
        use prost::Message as _;
        use tokio_stream::StreamExt as _;
        let source = Arc::new(Counting {
            alone,
            ..Counting::default()
        });
        let f = Fanout::new(
            source.clone(),
            Head {
                history_id: "h".into(),
                revision: 1,
                upstream_connected: true,
                digest: Some(7),
            },
            FanoutConfig::default(),
            CancellationToken::new(),
        );
        let ask = |sets: &[&str]| SubscribeRequest {
            node_id: "sdk".into(),
            flag_sets: sets.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        };
        // nothing is read from the streams yet: every snapshot stays in flight
        let mut streams = vec![
            f.subscribe(ask(&["a"])).expect("subscribe"),
            f.subscribe(ask(&["a"])).expect("subscribe"),
            f.subscribe(ask(&["b"])).expect("subscribe"),
            f.subscribe(ask(&[])).expect("subscribe"),
        ];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while f.stats.snapshots_sent.load(Ordering::Relaxed) < 4 {
            assert!(tokio::time::Instant::now() < deadline, "snapshots not sent");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut keys = Vec::new();
        for s in &mut streams {
            let event = s.next().await.expect("an event").expect("not an error");
            match SyncEvent::decode(event.bytes().as_ref()).map(|e| e.event) {
                Ok(Some(Event::Snapshot(snap))) => {
                    assert!(snap.last);
                    keys.push(snap.flags.iter().map(|f| f.key.clone()).collect::<Vec<_>>());
                }
                other => panic!("not a snapshot: {other:?}"),
            }
        }
        assert_eq!(
            keys,
            [
                vec!["in-a"],
                vec!["in-a"],
                vec!["in-b"],
                vec!["in-a", "in-b"]
            ]
        );
        source
    }

    #[test]
    fn another_history_restarts_the_ring() {
        let f = fanout();
        for to in 1..=5 {
            f.publish(delta("h", to));
        }
        f.publish(delta("h", 3));
        assert_eq!(f.head().revision, 5, "an old delta is dropped");
        f.publish(delta("other", 2));
        assert_eq!(&*f.head().history_id, "other");
        assert_eq!(f.head().revision, 2);
        assert_eq!(f.ring_usage().0, 1);
    }

    #[tokio::test]
    async fn a_partial_server_refuses_subscribers_that_ask_for_more() {
        let f = Fanout::new(
            Arc::new(Empty),
            Head {
                history_id: "h".into(),
                revision: 0,
                upstream_connected: true,
                digest: None,
            },
            FanoutConfig {
                scope: vec!["a".into(), "b".into()],
                ..FanoutConfig::default()
            },
            CancellationToken::new(),
        );
        let ask = |sets: &[&str]| SubscribeRequest {
            node_id: "n".into(),
            flag_sets: sets.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        };
        for refused in [&[][..], &["c"], &["a", "c"]] {
            let e = f.subscribe(ask(refused)).err();
            assert_eq!(
                e.as_ref().map(Status::code),
                Some(tonic::Code::FailedPrecondition),
                "{refused:?}"
            );
            assert!(e.is_some_and(|s| s.message().contains("holds only flag sets")));
        }
        assert!(f.subscribe(ask(&["a"])).is_ok());
        assert!(f.subscribe(ask(&["b", "a"])).is_ok());
    }

    #[test]
    fn a_catch_up_over_the_cap_becomes_a_snapshot() {
        for (cap, expect_snapshot) in [(512, true), (1 << 20, false)] {
            let f = fanout_at(
                1,
                FanoutConfig {
                    max_catch_up_delta_bytes: cap,
                    ..FanoutConfig::default()
                },
            );
            for to in 2..=3 {
                let mut d = delta("h", to);
                d.upserts.push(flagmesh_proto::v1::Flag {
                    flag_set: "s".into(),
                    key: format!("k{to}"),
                    definition_json: vec![b'x'; 400],
                    ..Default::default()
                });
                f.publish(d);
            }
            let (catch_up, cursor) = f.catch_up(&Some(("h".into(), 1)), None).expect("catch up");
            assert_eq!(
                matches!(catch_up, CatchUp::Snapshot(_)),
                expect_snapshot,
                "cap {cap}"
            );
            if !expect_snapshot {
                assert_eq!(cursor.map(|c| c.1), Some(3));
            }
        }
    }
}
