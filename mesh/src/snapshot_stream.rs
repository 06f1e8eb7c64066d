//! What a `Subscribe` call returns, and how a snapshot travels in it.
//!
//! A snapshot is not encoded up front: the fan-out queues one
//! [`SnapshotChunks`] (a shared, read-only state and a position in it), and
//! the [`SubscribeStream`] encodes the next chunk only when the transport
//! asks for it. A subscriber therefore never holds the whole encoded state
//! (at most the chunk in flight), and subscribers that reconnect together
//! share one consistent read of the state ([`crate::Fanout`] keeps it only
//! while some stream still uses it).

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use flagmesh_proto::shared::SharedSyncEvent;
use flagmesh_proto::v1::{Snapshot, SyncEvent, sync_event::Event};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::Status;

use crate::fanout::{Cursor, FanoutStats};
use crate::source::SourceSnapshot;

/// A snapshot being sent, chunk by chunk.
pub struct SnapshotChunks {
    state: Arc<SourceSnapshot>,
    filter: Option<Arc<HashSet<String>>>,
    chunk_bytes: usize,
    next_flag: usize,
    next_chunk: u32,
    done: bool,
}

impl SnapshotChunks {
    /// The chunks of `state` (only the sets of `filter`, if any), each of
    /// about `chunk_bytes`.
    pub fn new(
        state: Arc<SourceSnapshot>,
        filter: Option<Arc<HashSet<String>>>,
        chunk_bytes: usize,
    ) -> Self {
        Self {
            state,
            filter,
            chunk_bytes: chunk_bytes.max(1),
            next_flag: 0,
            next_chunk: 0,
            done: false,
        }
    }

    /// Where a subscriber stands once it has applied the snapshot.
    pub fn cursor(&self) -> Cursor {
        Some((self.state.history_id.as_str().into(), self.state.revision))
    }

    fn keeps(&self, set: &str) -> bool {
        self.filter.as_ref().is_none_or(|f| f.contains(set))
    }
}

impl Iterator for SnapshotChunks {
    type Item = SharedSyncEvent;

    fn next(&mut self) -> Option<SharedSyncEvent> {
        if self.done {
            return None;
        }
        let state = self.state.clone();
        let mut chunk = Snapshot {
            history_id: state.history_id.clone(),
            revision: state.revision,
            // a filtered (partial) state is not checked against the whole one
            digest: self.filter.is_none().then_some(state.digest),
            chunk: self.next_chunk,
            ..Default::default()
        };
        if self.next_chunk == 0 {
            chunk.flag_sets = state
                .flag_sets
                .iter()
                .filter(|s| self.keeps(&s.id))
                .cloned()
                .collect();
        }
        let mut bytes = 0usize;
        while let Some(flag) = state.flags.get(self.next_flag) {
            self.next_flag += 1;
            if !self.keeps(&flag.flag_set) {
                continue;
            }
            bytes += flag.definition_json.len() + flag.key.len() + flag.flag_set.len() + 16;
            chunk.flags.push(flag.clone());
            if bytes >= self.chunk_bytes {
                break;
            }
        }
        chunk.last = self.next_flag >= state.flags.len();
        self.done = chunk.last;
        self.next_chunk += 1;
        Some(SharedSyncEvent::new(&SyncEvent {
            event: Some(Event::Snapshot(chunk)),
        }))
    }
}

/// What the fan-out queues for one subscriber.
pub enum Outgoing {
    /// An encoded event (a delta, a heartbeat).
    Event(SharedSyncEvent),
    /// A snapshot, encoded as the subscriber takes it.
    Snapshot(SnapshotChunks),
}

/// The stream a `Subscribe` call returns.
pub struct SubscribeStream {
    rx: mpsc::Receiver<Result<Outgoing, Status>>,
    snapshot: Option<SnapshotChunks>,
    stats: Arc<FanoutStats>,
}

impl SubscribeStream {
    pub(crate) fn new(
        rx: mpsc::Receiver<Result<Outgoing, Status>>,
        stats: Arc<FanoutStats>,
    ) -> Self {
        Self {
            rx,
            snapshot: None,
            stats,
        }
    }

    /// The next chunk of the snapshot in flight, counted as sent.
    fn next_chunk(&mut self) -> Option<SharedSyncEvent> {
        let chunk = self.snapshot.as_mut()?.next();
        match &chunk {
            Some(c) => {
                self.stats
                    .bytes_sent
                    .fetch_add(c.len() as u64, Ordering::Relaxed);
                self.stats.deltas_sent.fetch_add(1, Ordering::Relaxed);
            }
            None => self.snapshot = None,
        }
        chunk
    }
}

impl Stream for SubscribeStream {
    type Item = Result<SharedSyncEvent, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(chunk) = self.next_chunk() {
                return Poll::Ready(Some(Ok(chunk)));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(Outgoing::Event(e)))) => return Poll::Ready(Some(Ok(e))),
                Poll::Ready(Some(Ok(Outgoing::Snapshot(s)))) => self.snapshot = Some(s),
                Poll::Ready(Some(Err(status))) => return Poll::Ready(Some(Err(status))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use flagmesh_proto::v1::Flag;
    use prost::Message as _;

    use super::*;

    fn state(flags: usize) -> Arc<SourceSnapshot> {
        Arc::new(SourceSnapshot {
            history_id: "h".into(),
            revision: 9,
            digest: 42,
            flags: (0..flags)
                .map(|i| Flag {
                    flag_set: if i % 2 == 0 { "even" } else { "odd" }.into(),
                    key: format!("f{i}"),
                    definition_json: vec![b'x'; 100],
                    ..Default::default()
                })
                .collect(),
            flag_sets: Vec::new(),
        })
    }

    fn decode(e: &SharedSyncEvent) -> Snapshot {
        match SyncEvent::decode(e.bytes().as_ref()).map(|e| e.event) {
            Ok(Some(Event::Snapshot(s))) => s,
            other => panic!("not a snapshot: {other:?}"),
        }
    }

    #[test]
    fn chunks_cover_the_state_once_in_order_and_end_with_last() {
        let chunks: Vec<Snapshot> = SnapshotChunks::new(state(1_000), None, 10_000)
            .map(|e| decode(&e))
            .collect();
        assert!(chunks.len() > 5, "{} chunks", chunks.len());
        assert!(chunks.iter().enumerate().all(|(i, c)| c.chunk == i as u32));
        assert!(chunks.iter().rev().skip(1).all(|c| !c.last));
        assert!(chunks.last().is_some_and(|c| c.last));
        assert!(
            chunks
                .iter()
                .all(|c| c.digest == Some(42) && c.revision == 9)
        );
        let keys: Vec<String> = chunks
            .iter()
            .flat_map(|c| c.flags.iter().map(|f| f.key.clone()))
            .collect();
        assert_eq!(
            keys,
            (0..1_000).map(|i| format!("f{i}")).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_filtered_or_empty_state_still_ends_and_is_not_checked() {
        let filter = Some(Arc::new(HashSet::from(["odd".to_owned()])));
        let chunks: Vec<Snapshot> = SnapshotChunks::new(state(10), filter, 1 << 20)
            .map(|e| decode(&e))
            .collect();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].digest, None);
        assert!(chunks[0].flags.iter().all(|f| f.flag_set == "odd"));
        assert_eq!(chunks[0].flags.len(), 5);
        let empty: Vec<Snapshot> = SnapshotChunks::new(state(0), None, 1 << 20)
            .map(|e| decode(&e))
            .collect();
        assert_eq!(empty.len(), 1);
        assert!(empty[0].last && empty[0].digest == Some(42));
    }
}
