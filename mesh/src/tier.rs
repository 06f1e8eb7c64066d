//! Where a replica's flags live between uses: their stored definitions in
//! memory or only in the replica's sled store, and their compiled form
//! held up to a memory budget.
//!
//! A [`Tier`] is shared by every flag of a state. With a store, a flag
//! keeps only its key and revisions in memory; its definition is read from
//! sled when it is first evaluated and compiled. With a budget, compiled
//! flags are held until their estimated size passes it, and then the least
//! recently used are dropped (by the CLOCK approximation of LRU: a flag
//! used since the hand last passed gets a second chance), to be read and
//! compiled again on their next use. Hot flags are never dropped.
//!
//! A dropped flag cannot come back stale: a changed flag is a new
//! [`crate::compiled::PopFlag`] with its own compiled slot, and the store
//! is written before a state naming the change is published. A flag read
//! back at another revision than its own (the store moved on while an
//! older state was still being served) is compiled from what the store
//! holds and not kept.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use flagmesh_proto::v1::Flag;

use crate::compiled::PopFlag;
use crate::keys;
use crate::stored;

/// Where the resident list is kept in a store, for warming after a restart.
const RESIDENT: &[u8] = b"m:resident";

/// The budget and bookkeeping of compiled flags, shared by every flag of a
/// state (and by the states that follow it).
pub struct Tier {
    /// Whether definitions live in the store rather than in each flag.
    in_store: bool,
    /// The store, until [`Tier::close`] lets go of it.
    store: arc_swap::ArcSwapOption<sled::Tree>,
    /// Decodes what the store holds (its dictionary read on first need).
    codec: stored::Codec,
    budget: usize,
    /// Hot flags: keys by set (looked up without building a key).
    hot: HashMap<String, HashSet<String>>,
    used: AtomicUsize,
    resident: AtomicUsize,
    clock: Mutex<VecDeque<Weak<PopFlag>>>,
    hits: Striped,
    misses: AtomicU64,
    evictions: AtomicU64,
    cold_nanos: AtomicU64,
    /// A hash of the resident list last saved (not written again unchanged).
    saved: AtomicU64,
}

impl std::fmt::Debug for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tier")
            .field("in_store", &self.in_store)
            .field("budget", &self.budget)
            .field("used", &self.used.load(Ordering::Relaxed))
            .finish()
    }
}

/// A counter bumped by every evaluation on every thread: each thread adds
/// to a slot of its own cache line, so the increments do not contend (one
/// shared counter would bounce its line between cores on each of them).
#[derive(Default)]
struct Striped([Slot; STRIPES]);

const STRIPES: usize = 8;

#[derive(Default)]
#[repr(align(128))]
struct Slot(AtomicU64);

static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static STRIPE: usize = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
}

impl Striped {
    fn add_one(&self) {
        let i = STRIPE.with(|s| *s);
        self.0[i].0.fetch_add(1, Ordering::Relaxed);
    }

    fn sum(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

/// Counters of a tier, for metrics and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierStats {
    /// The budget in bytes (`usize::MAX`: none).
    pub budget: usize,
    /// Estimated bytes of the compiled flags held (hot flags, held beyond
    /// the budget, are not counted).
    pub used: usize,
    /// Compiled flags held.
    pub resident: usize,
    /// Evaluations that found their flag compiled.
    pub hits: u64,
    /// Evaluations that read and compiled their flag.
    pub misses: u64,
    /// Compiled flags dropped for the budget.
    pub evictions: u64,
    /// Time spent reading and compiling on misses.
    pub cold: Duration,
}

/// Why a flag has no compiled form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uncompiled {
    /// Its definition does not compile (it resolves with PARSE_ERROR).
    Definition(String),
    /// Its definition could not be read from the store (GENERAL).
    Store(String),
}

impl std::fmt::Display for Uncompiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Definition(e) => write!(f, "flag does not compile: {e}"),
            Self::Store(e) => write!(f, "flag could not be read from the store: {e}"),
        }
    }
}

impl Tier {
    /// Definitions in memory, everything compiled is kept: what a state
    /// without a store (an SDK in memory, a preview) uses.
    pub fn held() -> Arc<Self> {
        Arc::new(Self::new(None, None, Vec::new()))
    }

    /// Definitions read from `store` (a replica's tree) when `store` is
    /// given, compiled flags held up to `budget` bytes (`None`: all), and
    /// the `hot` flags (set, key) compiled at start and never dropped.
    pub fn new(
        store: Option<sled::Tree>,
        budget: Option<usize>,
        hot: Vec<(String, String)>,
    ) -> Self {
        Self {
            in_store: store.is_some(),
            store: arc_swap::ArcSwapOption::from_pointee(store),
            codec: stored::Codec::default(),
            budget: budget.unwrap_or(usize::MAX),
            hot: hot.into_iter().fold(HashMap::new(), |mut m, (set, key)| {
                m.entry(set).or_insert_with(HashSet::new).insert(key);
                m
            }),
            used: AtomicUsize::new(0),
            resident: AtomicUsize::new(0),
            clock: Mutex::new(VecDeque::new()),
            hits: Striped::default(),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            cold_nanos: AtomicU64::new(0),
            saved: AtomicU64::new(0),
        }
    }

    /// Whether flags keep their definitions in memory.
    pub fn holds_definitions(&self) -> bool {
        !self.in_store
    }

    /// Lets go of the store (a stopped node's states may outlive it, and
    /// sled keeps its lock while any handle is held). Flags not compiled
    /// then answer GENERAL.
    pub fn close(&self) {
        self.store.store(None);
    }

    pub(crate) fn is_bounded(&self) -> bool {
        self.budget != usize::MAX
    }

    /// Whether (set, key) was named hot.
    pub fn is_hot(&self, set: &str, key: &str) -> bool {
        self.hot.get(set).is_some_and(|keys| keys.contains(key))
    }

    /// The counters now.
    pub fn stats(&self) -> TierStats {
        TierStats {
            budget: self.budget,
            used: self.used.load(Ordering::Relaxed),
            resident: self.resident.load(Ordering::Relaxed),
            hits: self.hits.sum(),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            cold: Duration::from_nanos(self.cold_nanos.load(Ordering::Relaxed)),
        }
    }

    pub(crate) fn hit(&self) {
        self.hits.add_one();
    }

    pub(crate) fn missed(&self, started: Instant) {
        self.misses.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.cold_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The stored flag (set, key), if the store holds it.
    pub(crate) fn read(&self, set: &str, key: &str) -> Result<Option<Flag>, Uncompiled> {
        let Some(tree) = self.store.load_full() else {
            return Err(Uncompiled::Store("the node's store is closed".into()));
        };
        let bytes = tree
            .get(keys::flag(set, key))
            .map_err(|e| Uncompiled::Store(e.to_string()))?;
        bytes
            .map(|b| {
                self.codec
                    .decode(b.as_ref(), &tree)
                    .map_err(|e| Uncompiled::Store(e.to_string()))
            })
            .transpose()
    }

    /// Takes on `flag`'s newly kept compiled form of `size` bytes, and
    /// drops others while the budget is passed.
    pub(crate) fn admit(&self, flag: &Arc<PopFlag>, size: usize) {
        self.used.fetch_add(size, Ordering::Relaxed);
        self.resident.fetch_add(1, Ordering::Relaxed);
        if !self.is_bounded() || flag.pinned {
            return;
        }
        let mut clock = self.clock.lock().unwrap_or_else(|p| p.into_inner());
        clock.push_back(Arc::downgrade(flag));
        // at most two passes: the first takes every second chance
        let mut turns = clock.len() * 2;
        while self.used.load(Ordering::Relaxed) > self.budget && turns > 0 {
            turns -= 1;
            let Some(next) = clock.pop_front() else { break };
            let Some(next) = next.upgrade() else { continue };
            if next.take_reference() {
                clock.push_back(Arc::downgrade(&next));
            } else if next.drop_compiled() {
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        // flags replaced by a change leave dead entries behind; sweep them
        // before they outnumber the live ones
        if clock.len() > 2 * self.resident.load(Ordering::Relaxed) + 1024 {
            clock.retain(|w| w.strong_count() > 0);
        }
    }

    /// `size` bytes of a compiled form no longer kept.
    pub(crate) fn release(&self, size: usize) {
        self.used.fetch_sub(size, Ordering::Relaxed);
        self.resident.fetch_sub(1, Ordering::Relaxed);
    }

    /// The flags held compiled now, most recently admitted last: what a
    /// restarted node warms first.
    fn resident_flags(&self) -> Vec<(String, String)> {
        let clock = self.clock.lock().unwrap_or_else(|p| p.into_inner());
        clock
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|f| f.is_compiled())
            .map(|f| (f.flag_set().to_owned(), f.key().to_owned()))
            .collect()
    }

    /// Records which flags are held compiled, so that a restart warms the
    /// same ones. Nothing is recorded without a store or a budget (then
    /// every flag that is used stays compiled anyway).
    pub fn save_resident(&self) -> Result<usize, sled::Error> {
        let Some(tree) = self.store.load_full() else {
            return Ok(0);
        };
        if !self.is_bounded() {
            return Ok(0);
        }
        let flags = self.resident_flags();
        let mut v = Vec::new();
        for (set, key) in &flags {
            v.extend_from_slice(&keys::flag(set, key));
            v.push(b'\n');
        }
        let hash = xxhash_rust::xxh3::xxh3_64(&v);
        if self.saved.swap(hash, Ordering::Relaxed) != hash {
            tree.insert(RESIDENT, v)?;
        }
        Ok(flags.len())
    }

    /// The flags to compile ahead of first use: the hot ones, then those
    /// held compiled when the resident list was last saved (most recent
    /// first), as (set, key).
    pub fn warm_list(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .hot
            .iter()
            .flat_map(|(set, keys)| keys.iter().map(move |key| (set.clone(), key.clone())))
            .collect();
        out.sort();
        let saved = self
            .store
            .load_full()
            .and_then(|t| t.get(RESIDENT).ok().flatten());
        if let Some(saved) = saved {
            let mut recent: Vec<(String, String)> = saved
                .split(|b| *b == b'\n')
                .filter_map(keys::parse_flag)
                .map(|(set, key)| (set.to_owned(), key.to_owned()))
                .filter(|(set, key)| !self.is_hot(set, key))
                .collect();
            recent.reverse();
            out.extend(recent);
        }
        out
    }

    /// Whether more compiled flags fit in the budget.
    pub fn has_room(&self) -> bool {
        self.used.load(Ordering::Relaxed) < self.budget
    }
}

/// The estimated memory of a flag compiled from `definition_len` bytes of
/// JSON: compiled targeting and variants take about three times their
/// text, plus the flag's own fixed parts. Measured against RSS by
/// `flagmesh-bench memory` (see BENCHMARKS.md).
pub fn estimated_size(definition_len: usize) -> usize {
    512 + 3 * definition_len
}

/// A tier's counters as prometheus metrics.
pub struct TierMetrics(pub Arc<Tier>);

impl std::fmt::Debug for TierMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TierMetrics").finish()
    }
}

impl prometheus_client::collector::Collector for TierMetrics {
    fn encode(
        &self,
        mut e: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        use crate::metrics::{counter, gauge};
        let s = self.0.stats();
        let budget = if s.budget == usize::MAX {
            f64::INFINITY
        } else {
            s.budget as f64
        };
        gauge(
            &mut e,
            "flagmesh_compiled_flags_budget_bytes",
            "The memory budget of compiled flags (+Inf: none).",
            budget,
        )?;
        gauge(
            &mut e,
            "flagmesh_compiled_flags_bytes",
            "Estimated memory of the compiled flags held (hot flags not counted).",
            s.used as f64,
        )?;
        gauge(
            &mut e,
            "flagmesh_compiled_flags",
            "Compiled flags held in memory.",
            s.resident as f64,
        )?;
        counter(
            &mut e,
            "flagmesh_compiled_flag_hits_total",
            "Evaluations that found their flag compiled (counted under a budget only).",
            s.hits,
        )?;
        counter(
            &mut e,
            "flagmesh_compiled_flag_misses_total",
            "Evaluations that read their flag from the store and compiled it.",
            s.misses,
        )?;
        counter(
            &mut e,
            "flagmesh_compiled_flag_evictions_total",
            "Compiled flags dropped to stay within the budget.",
            s.evictions,
        )?;
        // a counter of seconds (exposed with `_total`)
        prometheus_client::encoding::EncodeMetric::encode(
            &prometheus_client::metrics::counter::ConstCounter::new(s.cold.as_secs_f64()),
            e.encode_descriptor(
                "flagmesh_compiled_flag_miss_seconds",
                "Time spent reading and compiling flags on misses.",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SourceSnapshot;
    use crate::compiled::PopState;

    fn flag(i: usize) -> Flag {
        Flag {
            flag_set: "s".into(),
            key: format!("f{i}"),
            definition_json: format!(
                r#"{{"state":"ENABLED","variants":{{"a":{i},"b":0}},"defaultVariant":"a"}}"#
            )
            .into_bytes(),
            mod_revision: 1,
            create_revision: 1,
        }
    }

    #[test]
    fn the_budget_is_accounted_exactly_under_concurrent_use_and_released_with_the_state() {
        let db = sled::Config::new().temporary(true).open().expect("sled");
        let tree = db.open_tree("replica").expect("tree");
        let flags: Vec<Flag> = (0..200).map(flag).collect();
        for f in &flags {
            tree.insert(keys::flag(&f.flag_set, &f.key), stored::encode_flag(f))
                .expect("insert");
        }
        let budget = 20 * estimated_size(flags[0].definition_json.len());
        let tier = Arc::new(Tier::new(
            Some(tree),
            Some(budget),
            vec![("s".into(), "f0".into())],
        ));
        let state = Arc::new(PopState::from_snapshot_in(
            &SourceSnapshot {
                history_id: "h".into(),
                revision: 1,
                digest: 0,
                flags: flags.clone(),
                flag_sets: vec![],
            },
            tier.clone(),
        ));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let state = state.clone();
                std::thread::spawn(move || {
                    let mut x = 0x9E37_79B9_u64 + t;
                    for _ in 0..5_000 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let key = format!("f{}", x % 200);
                        let f = state.sets["s"].flags.get(key.as_str()).expect("flag");
                        let held = f.compiled();
                        let held = held.as_deref().expect("compiled");
                        assert!(held.is_ok(), "{key}: {held:?}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let s = tier.stats();
        let held: Vec<_> = state.sets["s"]
            .flags
            .values()
            .filter(|f| f.is_compiled())
            .collect();
        assert_eq!(s.resident, held.len(), "{s:?}");
        // the hot flag is held and not charged; the others are charged
        assert!(state.sets["s"].flags.get("f0").expect("f0").is_compiled());
        let charged: usize = held
            .iter()
            .filter(|f| f.key() != "f0")
            .map(|f| {
                estimated_size(
                    flags[f.key()[1..].parse::<usize>().expect("n")]
                        .definition_json
                        .len(),
                )
            })
            .sum();
        assert_eq!(s.used, charged, "{s:?}");
        assert!(s.used <= budget, "{s:?}");
        assert!(s.evictions > 0 && s.misses > 200, "{s:?}");
        drop(held);
        drop(state);
        let s = tier.stats();
        assert_eq!(
            (s.used, s.resident),
            (0, 0),
            "released with the state: {s:?}"
        );
    }
}
