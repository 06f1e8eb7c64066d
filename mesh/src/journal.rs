//! The replica's journal: what makes an applied event durable before it is
//! served, without a sled batch or a sled flush for every event.
//!
//! Every sled batch (`apply_batch`, flushed or not) seals sled's log buffer
//! and hands it to sled's I/O thread pool, whose seven idle threads all
//! wake for it; at one batch per applied change that was about a third
//! of a whole mesh's CPU on one machine (BENCHMARKS.md, "Propagation").
//! Instead, each applied event's writes are appended to a file of the
//! replica's own and synced there, on the applying thread, and then given
//! to sled key by key (the journal is what makes the event atomic across a
//! crash); sled is flushed in the background now and then (a checkpoint),
//! after which the journal written before it is deleted.
//!
//! Recovery: when the replica opens, the journal's records are given to
//! sled again in the order they were written. That is correct whatever
//! prefix of them sled kept: each record sets or removes keys to absolute
//! values, sled never holds a record the journal does not (the journal is
//! synced first), and every record before the journal's first was flushed
//! by a checkpoint. A record cut short by a crash (its length or checksum
//! does not match) was never acknowledged, and it and anything after it are
//! ignored.
//!
//! Layout: `<replica dir>/journal/<sequence>.log`, each a run of records
//! `[payload length: u32 LE][xxh3-64 of length and payload: u64 LE][payload]`
//! written over a segment filled with zeros when it was made (so that a
//! record's sync writes its bytes only, not the file's new length as well:
//! about a third less CPU and wall time per sync on ext4; zeros after the
//! last record are where the next one goes, not a cut);
//! a payload is a run of operations `[1][key length: u32][key][value
//! length: u32][value]` (set) or `[0][key length: u32][key]` (remove).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::Xxh3;

/// How long journaled writes wait for a checkpoint (sled flushed, journal
/// deleted), on average: each wait is drawn between half and one and a
/// half times this, so that nodes which received the same changes at the
/// same moment do not all flush at once later (a burst of flushes on a
/// machine of many nodes is a burst of latency for the next change).
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(30);
/// A journal this large is checkpointed at once.
pub const CHECKPOINT_BYTES: u64 = 8 << 20;
/// Each segment is made this long, filled with zeros; records past it
/// lengthen the file.
const SEGMENT_BYTES: usize = 1 << 20;

const HEADER: usize = 12;
const SET: u8 = 1;
const REMOVE: u8 = 0;

/// The writes of one applied event, in order: journaled, then given to
/// sled.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Writes {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Writes {
    /// Sets `key` to `value`.
    pub fn insert(&mut self, key: impl AsRef<[u8]>, value: Vec<u8>) {
        self.ops.push((key.as_ref().to_vec(), Some(value)));
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.ops.push((key.as_ref().to_vec(), None));
    }

    /// The journal record of these writes, its header included.
    pub fn record(&self) -> Vec<u8> {
        let size: usize = self
            .ops
            .iter()
            .map(|(k, v)| 9 + k.len() + v.as_ref().map_or(0, Vec::len))
            .sum();
        let mut out = Vec::with_capacity(HEADER + size);
        out.resize(HEADER, 0);
        for (key, value) in &self.ops {
            match value {
                Some(v) => {
                    out.push(SET);
                    put(&mut out, key);
                    put(&mut out, v);
                }
                None => {
                    out.push(REMOVE);
                    put(&mut out, key);
                }
            }
        }
        let (header, payload) = out.split_at_mut(HEADER);
        let len = (payload.len() as u32).to_le_bytes();
        header[..4].copy_from_slice(&len);
        header[4..].copy_from_slice(&checksum(&len, payload).to_le_bytes());
        out
    }

    /// The writes a record's payload holds (what [`Writes::record`] wrote
    /// after the header); `None` when it does not parse.
    fn parse(mut payload: &[u8]) -> Option<Self> {
        fn take<'a>(p: &mut &'a [u8]) -> Option<&'a [u8]> {
            let len = u32::from_le_bytes(p.get(..4)?.try_into().ok()?) as usize;
            let bytes = p.get(4..4 + len)?;
            *p = &p[4 + len..];
            Some(bytes)
        }
        let mut writes = Self::default();
        while let Some((&op, rest)) = payload.split_first() {
            payload = rest;
            let key = take(&mut payload)?;
            match op {
                SET => writes.insert(key, take(&mut payload)?.to_vec()),
                REMOVE => writes.remove(key),
                _ => return None,
            }
        }
        Some(writes)
    }

    /// The writes as one sled batch (atomic across a crash on its own).
    pub fn into_batch(self) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (key, value) in self.ops {
            match value {
                Some(v) => batch.insert(key, v),
                None => batch.remove(key),
            }
        }
        batch
    }

    /// Gives the writes to `tree` one key at a time, in order: for writes
    /// already journaled, which make them atomic across a crash. (A sled
    /// batch would also write sled's log buffer out, through its I/O
    /// threads, for every event: it seals the buffer to mark the batch.)
    pub fn apply_each(self, tree: &sled::Tree) -> sled::Result<()> {
        for (key, value) in self.ops {
            match value {
                Some(v) => tree.insert(key, v)?,
                None => tree.remove(key)?,
            };
        }
        Ok(())
    }
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn checksum(len: &[u8], payload: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(len);
    h.update(payload);
    h.digest()
}

/// The whole records at the start of `bytes`, and where they end.
fn records(bytes: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + HEADER) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let mut sum = [0u8; 8];
        sum.copy_from_slice(&header[4..]);
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else {
            break;
        };
        if checksum(&header[..4], payload) != u64::from_le_bytes(sum) {
            break;
        }
        out.push(payload);
        at += HEADER + len;
    }
    (out, at)
}

fn segment_path(dir: &Path, sequence: u64) -> PathBuf {
    dir.join(format!("{sequence:020}.log"))
}

/// The journal's segments, oldest first.
fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let sequence = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(s) = sequence {
            found.push((s, path));
        }
    }
    found.sort();
    Ok(found)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// What recovery found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Records given to sled again.
    pub records: u64,
    /// Bytes after the last whole record, ignored (a write cut short).
    pub ignored_bytes: u64,
}

struct Open {
    file: File,
    sequence: u64,
    /// Bytes appended since the last checkpoint began: where the next
    /// record goes in `file`.
    bytes: u64,
    /// When the oldest record not yet checkpointed was appended.
    dirty_since: Option<Instant>,
    /// Set once a write or sync failed: nothing more is accepted, since
    /// what the file holds is no longer known.
    broken: Option<String>,
    stopping: bool,
}

struct Shared {
    dir: PathBuf,
    every: Duration,
    open: Mutex<Open>,
    wake: Condvar,
    checkpoints: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A replica's journal, with the thread that checkpoints it.
pub struct Journal {
    shared: Arc<Shared>,
    recovered: Recovered,
    checkpointer: Option<JoinHandle<()>>,
}

impl Journal {
    /// Opens the journal in `dir`, gives what it holds to `tree` again,
    /// flushes `db`, and starts afresh with a thread that checkpoints about
    /// `every` (see [`CHECKPOINT_EVERY`]).
    pub fn open(dir: &Path, db: &sled::Db, tree: &sled::Tree, every: Duration) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let found = segments(dir)?;
        let mut recovered = Recovered::default();
        let mut cut = false;
        // whether the last segment is still as it was made: no record
        let mut last_blank = false;
        for (_, path) in &found {
            if cut {
                let len = fs::metadata(path)?.len();
                recovered.ignored_bytes += len;
                last_blank = false;
                continue;
            }
            let mut bytes = Vec::new();
            File::open(path)?.read_to_end(&mut bytes)?;
            let (whole, end) = records(&bytes);
            for payload in whole {
                let writes = Writes::parse(payload).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("an unreadable journal record in {}", path.display()),
                    )
                })?;
                tree.apply_batch(writes.into_batch())
                    .map_err(io::Error::other)?;
                recovered.records += 1;
            }
            if bytes[end..].iter().any(|b| *b != 0) {
                // a write cut short: nothing after it was acknowledged
                recovered.ignored_bytes += (bytes.len() - end) as u64;
                cut = true;
            }
            last_blank = end == 0 && !cut && bytes.len() == SEGMENT_BYTES;
        }
        if recovered.ignored_bytes > 0 {
            tracing::warn!(
                records = recovered.records,
                ignored_bytes = recovered.ignored_bytes,
                "the journal ended in a write cut short; the records before it were recovered"
            );
        } else if recovered.records > 0 {
            tracing::info!(
                records = recovered.records,
                "recovered the journal's records"
            );
        }
        // nothing recovered: sled took nothing to flush, and a last segment
        // still blank is written into rather than made again
        let reuse = match found.last() {
            Some((sequence, path)) if recovered.records == 0 && last_blank => {
                Some((*sequence, path.clone()))
            }
            _ => None,
        };
        if recovered.records > 0 {
            db.flush().map_err(io::Error::other)?;
        }
        for (sequence, path) in &found {
            if reuse.as_ref().map(|(s, _)| s) != Some(sequence) {
                fs::remove_file(path)?;
            }
        }
        let (sequence, file) = match reuse {
            Some((sequence, path)) => (sequence, OpenOptions::new().write(true).open(path)?),
            None => {
                let sequence = found.last().map(|(s, _)| s + 1).unwrap_or(1);
                (sequence, create_segment(dir, sequence)?)
            }
        };
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            every,
            open: Mutex::new(Open {
                file,
                sequence,
                bytes: 0,
                dirty_since: None,
                broken: None,
                stopping: false,
            }),
            wake: Condvar::new(),
            checkpoints: AtomicU64::new(0),
        });
        let checkpointer = {
            let shared = shared.clone();
            let db = db.clone();
            std::thread::Builder::new()
                .name("journal".into())
                .spawn(move || checkpoints(&shared, &db))?
        };
        Ok(Self {
            shared,
            recovered,
            checkpointer: Some(checkpointer),
        })
    }

    /// What was recovered when the journal opened.
    pub fn recovered(&self) -> Recovered {
        self.recovered
    }

    /// Checkpoints done since the journal opened.
    pub fn checkpoints(&self) -> u64 {
        self.shared.checkpoints.load(Ordering::Relaxed)
    }

    /// Appends one record (made by [`Writes::record`]), syncs it to disk, then runs `apply` (giving
    /// the same writes to sled), all before a checkpoint can start a new
    /// segment: a checkpoint's flush thus covers every record of the
    /// segments it deletes. When the append fails, nothing is taken to be
    /// journaled, `apply` does not run, and the journal accepts nothing
    /// more.
    pub fn write(&self, record: &[u8], apply: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let mut open = self.shared.lock();
        if let Some(why) = &open.broken {
            return Err(io::Error::other(format!(
                "the journal failed earlier: {why}"
            )));
        }
        let at = open.bytes;
        if let Err(e) = open
            .file
            .write_all_at(record, at)
            .and_then(|_| open.file.sync_data())
        {
            open.broken = Some(e.to_string());
            return Err(e);
        }
        open.bytes += record.len() as u64;
        let first = open.dirty_since.is_none();
        open.dirty_since.get_or_insert_with(Instant::now);
        if first || open.bytes >= CHECKPOINT_BYTES {
            self.shared.wake.notify_one();
        }
        apply()
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.checkpointer.take() {
            let _ = t.join();
        }
    }
}

fn create_segment(dir: &Path, sequence: u64) -> io::Result<File> {
    let path = segment_path(dir, sequence);
    let made = (|| {
        let mut file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)?;
        let zeros = vec![0u8; 64 << 10];
        for _ in 0..SEGMENT_BYTES / zeros.len() {
            file.write_all(&zeros)?;
        }
        file.sync_all()?;
        // the new name must outlive a crash as surely as what is written to it
        sync_dir(dir)?;
        Ok(file)
    })();
    if made.is_err() {
        // a segment half made (a full disk) would refuse the next attempt;
        // one left behind by a crash holds no record and is read as empty
        let _ = fs::remove_file(&path);
    }
    made
}

/// The checkpointing thread: once journaled writes are about `every` old
/// (or the journal is [`CHECKPOINT_BYTES`] long), starts a new segment,
/// flushes sled (everything in the older segments is then in sled's files)
/// and deletes the older segments. Asleep while nothing is journaled.
fn checkpoints(shared: &Shared, db: &sled::Db) {
    let wait = || shared.every.mul_f64(0.5 + fastrand::f64());
    let mut after = wait();
    let mut open = shared.lock();
    loop {
        let Some(since) = open.dirty_since else {
            if open.stopping {
                return;
            }
            open = shared.wake.wait(open).unwrap_or_else(|p| p.into_inner());
            continue;
        };
        let due = since + after;
        let now = Instant::now();
        if !open.stopping && open.bytes < CHECKPOINT_BYTES && now < due {
            open = shared
                .wake
                .wait_timeout(open, due - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            continue;
        }
        if open.broken.is_some() {
            // what the last segment holds is not known: it stays for recovery
            return;
        }
        // only this thread changes the sequence; appends go on meanwhile
        let next = open.sequence + 1;
        drop(open);
        let made = create_segment(&shared.dir, next);
        open = shared.lock();
        match made {
            Ok(file) => {
                open.file = file;
                open.sequence = next;
                open.bytes = 0;
                open.dirty_since = None;
                after = wait();
            }
            Err(e) => {
                tracing::warn!(error = %e, "the journal could not start a new segment; it stays in one");
                if open.stopping {
                    return;
                }
                open = shared
                    .wake
                    .wait_timeout(open, shared.every)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            }
        }
        drop(open);
        match db.flush() {
            Ok(_) => {
                // every segment before the one just started is now in sled
                if let Ok(found) = segments(&shared.dir) {
                    for (s, path) in found {
                        if s < next
                            && let Err(e) = fs::remove_file(&path)
                        {
                            tracing::warn!(error = %e, path = %path.display(), "a checkpointed journal segment could not be deleted");
                        }
                    }
                }
                shared.checkpoints.fetch_add(1, Ordering::Relaxed);
            }
            // the older segments stay, and are recovered if need be
            Err(e) => tracing::warn!(error = %e, "flushing sled for a journal checkpoint failed"),
        }
        open = shared.lock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree_of(db: &sled::Db) -> sled::Tree {
        db.open_tree("replica").expect("tree")
    }

    fn contents(tree: &sled::Tree) -> Vec<(Vec<u8>, Vec<u8>)> {
        tree.iter()
            .map(|kv| {
                let (k, v) = kv.expect("read");
                (k.to_vec(), v.to_vec())
            })
            .collect()
    }

    fn writes_of(ops: &[(&str, Option<&str>)]) -> Writes {
        let mut w = Writes::default();
        for (k, v) in ops {
            match v {
                Some(v) => w.insert(k, v.as_bytes().to_vec()),
                None => w.remove(k),
            }
        }
        w
    }

    fn writes(ops: &[(&str, Option<&str>)]) -> Vec<u8> {
        writes_of(ops).record()
    }

    #[test]
    fn a_record_reads_back_as_its_writes_and_a_cut_record_is_not_read() {
        let one = writes(&[("a", Some("1")), ("b", None)]);
        let two = writes(&[("c", Some(""))]);
        let mut bytes = [one.clone(), two.clone()].concat();
        let (whole, end) = records(&bytes);
        assert_eq!((whole.len(), end), (2, bytes.len()));
        assert_eq!((whole[0], whole[1]), (&one[HEADER..], &two[HEADER..]));
        assert_eq!(
            Writes::parse(whole[0]),
            Some(writes_of(&[("a", Some("1")), ("b", None)]))
        );
        assert_eq!(Writes::parse(whole[1]), Some(writes_of(&[("c", Some(""))])));
        // cut anywhere inside the second record: only the first is whole
        for cut in one.len() + 1..bytes.len() {
            let (whole, end) = records(&bytes[..cut]);
            assert_eq!((whole.len(), end), (1, one.len()), "cut at {cut}");
        }
        // a flipped byte in the second record's payload
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(records(&bytes).0.len(), 1);
        // an operation of no known kind
        assert!(Writes::parse(&[7, 1, 0, 0, 0, b'k']).is_none());
        assert!(Writes::parse(&[SET, 9, 0, 0, 0, b'k']).is_none());
    }

    /// Records appended but never given to sled (as after a crash that
    /// lost sled's unflushed writes) are recovered in order, up to a record
    /// cut short.
    #[test]
    fn recovery_gives_sled_the_records_in_order_up_to_a_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal_dir = dir.path().join("journal");
        fs::create_dir_all(&journal_dir).expect("dir");
        let mut first = writes(&[("a", Some("1")), ("b", Some("1"))]);
        first.extend(writes(&[("a", Some("2")), ("b", None)]));
        fs::write(segment_path(&journal_dir, 4), &first).expect("write");
        let mut second = writes(&[("c", Some("3"))]);
        let cut = writes(&[("a", Some("lost"))]);
        second.extend_from_slice(&cut[..cut.len() - 2]);
        fs::write(segment_path(&journal_dir, 5), &second).expect("write");
        fs::write(
            segment_path(&journal_dir, 6),
            writes(&[("d", Some("after the cut"))]),
        )
        .expect("write");

        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .expect("db");
        let tree = tree_of(&db);
        tree.insert("b", "stale").expect("insert");
        let journal = Journal::open(&journal_dir, &db, &tree, CHECKPOINT_EVERY).expect("open");
        assert_eq!(journal.recovered().records, 3);
        assert!(journal.recovered().ignored_bytes > 0);
        assert_eq!(
            contents(&tree),
            vec![
                (b"a".to_vec(), b"2".to_vec()),
                (b"c".to_vec(), b"3".to_vec())
            ]
        );
        // recovered into sled and flushed: the journal starts afresh
        let left = segments(&journal_dir).expect("segments");
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].0, 7);
        let fresh = fs::read(&left[0].1).expect("read");
        assert_eq!(fresh.len(), SEGMENT_BYTES);
        assert!(fresh.iter().all(|b| *b == 0));
    }

    /// The zeros a segment was made with, after its last record, are room
    /// for the next one, not a write cut short.
    #[test]
    fn zeros_after_the_last_record_are_not_a_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal_dir = dir.path().join("journal");
        fs::create_dir_all(&journal_dir).expect("dir");
        let mut bytes = writes(&[("a", Some("1"))]);
        bytes.extend(writes(&[("b", Some("2"))]));
        bytes.resize(bytes.len() + 4096, 0);
        fs::write(segment_path(&journal_dir, 1), &bytes).expect("write");
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .expect("db");
        let tree = tree_of(&db);
        let journal = Journal::open(&journal_dir, &db, &tree, CHECKPOINT_EVERY).expect("open");
        assert_eq!(
            journal.recovered(),
            Recovered {
                records: 2,
                ignored_bytes: 0
            }
        );
        assert_eq!(contents(&tree).len(), 2);
    }

    /// Appending syncs each record; the checkpoint flushes sled and deletes
    /// what it covered, and a journal reopened over it recovers nothing.
    #[test]
    fn a_checkpoint_deletes_what_sled_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal_dir = dir.path().join("journal");
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .flush_every_ms(None)
            .open()
            .expect("db");
        let tree = tree_of(&db);
        let every = Duration::from_millis(100);
        let journal = Journal::open(&journal_dir, &db, &tree, every).expect("open");
        for i in 0..3 {
            let mut w = Writes::default();
            w.insert(format!("k{i}"), vec![i]);
            let record = w.record();
            journal
                .write(&record, || w.apply_each(&tree).map_err(io::Error::other))
                .expect("write");
        }
        let segment = segment_path(&journal_dir, 1);
        let deadline = Instant::now() + Duration::from_secs(20);
        while journal.checkpoints() == 0 {
            assert!(Instant::now() < deadline, "no checkpoint");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!segment.exists(), "the checkpointed segment stays");
        drop(journal);
        let journal = Journal::open(&journal_dir, &db, &tree, every).expect("reopen");
        assert_eq!(journal.recovered(), Recovered::default());
        assert_eq!(contents(&tree).len(), 3);
        // the blank segment the checkpoint made is written into, not made again
        let left: Vec<u64> = segments(&journal_dir)
            .expect("segments")
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(left, vec![2]);
    }
}
