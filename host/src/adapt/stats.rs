//! What each scope's load looks like, counted on the request path of every replica.
//!
//! Each scope has one [`ScopeCounters`] per replica, shared by every routing that holds the
//! scope, so counts survive a reroute. Writes, reads, guarded writes and failed guards are plain
//! atomic counters, cumulative since the replica started. The shape of the load (the next path
//! segment of written keys, and the split-key reservoir of [`super::split`]) is kept per window:
//! [`ScopeCounters::publish`] hands it out with the totals and starts the next window.
//!
//! Every replica publishes, per scope, a [`Window`]: what it counted since its previous one
//! ([`Stats::windows`]). The advising replica reads every replica's latest window and turns them
//! into the [`aq_sdk::ScopeStats`] a policy's `advise` sees ([`stats_of`]): rates add up over
//! replicas, shapes are merged.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::split::{Sample, SplitFinder, candidates};
use crate::index::{KeyRange, Scope};

/// Distinct next path segments counted per window; the rest are counted together.
const SEGMENTS: usize = 1024;
/// Longest segment kept, in bytes.
const SEGMENT_BYTES: usize = 64;

/// One scope's counters on this replica.
pub struct ScopeCounters {
    /// The scope's first key: segments are what follows it.
    start: Vec<u8>,
    writes: AtomicU64,
    reads: AtomicU64,
    guarded: AtomicU64,
    conflicts: AtomicU64,
    shape: Mutex<Shape>,
    /// When counting began: the start of the first window.
    created: std::time::Instant,
}

/// The load's shape in the current window.
struct Shape {
    segments: HashMap<Vec<u8>, u64>,
    other_segments: u64,
    finder: SplitFinder,
}

impl ScopeCounters {
    fn new(start: &[u8], seed: u64) -> Self {
        ScopeCounters {
            start: start.to_vec(),
            writes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            guarded: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            shape: Mutex::new(Shape { segments: HashMap::new(), other_segments: 0, finder: SplitFinder::new(seed) }),
            created: std::time::Instant::now(),
        }
    }

    /// Counts a write over `range` (a delete's range, a Txn's first range).
    pub fn wrote(&self, range: &KeyRange) {
        self.count_write(&range.start, |finder| finder.record(range));
    }

    /// Counts a write of one key (a Put).
    pub fn wrote_key(&self, key: &[u8]) {
        self.count_write(key, |finder| finder.record_key(key));
    }

    fn count_write(&self, start: &[u8], record: impl FnOnce(&mut SplitFinder)) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let segment = self.segment(start);
        let mut guard = self.shape.lock().expect("scope counters lock");
        let shape = &mut *guard;
        if let Some(count) = shape.segments.get_mut(segment) {
            *count += 1;
        } else if shape.segments.len() < SEGMENTS {
            shape.segments.insert(segment.to_vec(), 1);
        } else {
            shape.other_segments += 1;
        }
        record(&mut shape.finder);
    }

    /// Counts a read over `range`.
    pub fn read(&self, range: &KeyRange) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.shape.lock().expect("scope counters lock").finder.record(range);
    }

    /// Counts a write sent with guards (policy reads, a nonce); `failed` when they did not
    /// hold, so the write was decided again.
    pub fn guarded(&self, failed: bool) {
        self.guarded.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.conflicts.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The path segment of `key` after the scope's start: up to and including the next `/`.
    fn segment<'k>(&self, key: &'k [u8]) -> &'k [u8] {
        let rest = key.strip_prefix(self.start.as_slice()).unwrap_or(key);
        let end = rest.iter().position(|&b| b == b'/').map_or(rest.len(), |at| at + 1);
        &rest[..end.min(SEGMENT_BYTES)]
    }

    /// The totals so far and this window's shape; the next window starts empty.
    pub fn publish(&self) -> Counts {
        let mut shape = self.shape.lock().expect("scope counters lock");
        let segments = std::mem::take(&mut shape.segments);
        let other_segments = std::mem::take(&mut shape.other_segments);
        let samples = shape.finder.samples().to_vec();
        shape.finder.reset();
        drop(shape);
        Counts {
            writes: self.writes.load(Ordering::Relaxed),
            reads: self.reads.load(Ordering::Relaxed),
            guarded: self.guarded.load(Ordering::Relaxed),
            conflicts: self.conflicts.load(Ordering::Relaxed),
            segments: segments.into_iter().map(|(segment, n)| (hex::encode(segment), n)).collect(),
            other_segments,
            samples,
        }
    }
}

/// What a replica (or the sum of replicas) counted for a scope: totals since start, and one
/// window's shape.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Writes sent to etcd.
    pub writes: u64,
    /// Reads.
    pub reads: u64,
    /// Writes sent with guards.
    pub guarded: u64,
    /// Guarded writes whose guards failed.
    pub conflicts: u64,
    /// Writes in the window by next path segment (hex).
    pub segments: BTreeMap<String, u64>,
    /// Writes in the window under segments past the first [`SEGMENTS`].
    pub other_segments: u64,
    /// The window's split-key samples.
    pub samples: Vec<Sample>,
}

impl Counts {
    /// Adds another replica's counts.
    pub fn add(&mut self, other: &Counts) {
        self.writes += other.writes;
        self.reads += other.reads;
        self.guarded += other.guarded;
        self.conflicts += other.conflicts;
        for (segment, n) in &other.segments {
            *self.segments.entry(segment.clone()).or_default() += n;
        }
        self.other_segments += other.other_segments;
        self.samples.extend(other.samples.iter().cloned());
    }

    /// Shannon entropy, in bits, of the window's writes over their next path segment.
    pub fn key_entropy(&self) -> f64 {
        let counts = self.segments.values().copied().chain((self.other_segments > 0).then_some(self.other_segments));
        let total: u64 = self.segments.values().sum::<u64>() + self.other_segments;
        if total == 0 {
            return 0.0;
        }
        counts
            .filter(|&n| n > 0)
            .map(|n| {
                let p = n as f64 / total as f64;
                -p * p.log2()
            })
            .sum()
    }
}

impl Counts {
    /// What happened between `earlier` and `self`: the totals' differences, with `self`'s
    /// window shape.
    pub fn since(&self, earlier: &Counts) -> Counts {
        Counts {
            writes: self.writes.saturating_sub(earlier.writes),
            reads: self.reads.saturating_sub(earlier.reads),
            guarded: self.guarded.saturating_sub(earlier.guarded),
            conflicts: self.conflicts.saturating_sub(earlier.conflicts),
            ..self.clone()
        }
    }
}

/// One replica's window of one scope, as it publishes it to the meta group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// The replica (its anchor id).
    pub replica: String,
    /// When the window ended (Unix milliseconds).
    pub at_ms: u64,
    /// How long it lasted.
    pub seconds: f64,
    /// What happened in it: counts are of the window, not totals.
    pub counts: Counts,
}

/// The statistics `advise` sees for a scope over `range` from every replica's latest window,
/// with the scope's stored `keys` and `bytes`. Rates add up over replicas.
pub fn stats_of(windows: &[Window], range: &KeyRange, keys: u64, bytes: u64) -> aq_sdk::ScopeStats {
    let rate = |count: fn(&Counts) -> u64| -> f64 {
        windows.iter().filter(|w| w.seconds > 0.0).map(|w| count(&w.counts) as f64 / w.seconds).sum()
    };
    let mut sum = Counts::default();
    for window in windows {
        sum.add(&window.counts);
    }
    aq_sdk::ScopeStats {
        keys,
        bytes,
        write_rate: rate(|c| c.writes),
        read_rate: rate(|c| c.reads),
        key_entropy: sum.key_entropy(),
        conflict_rate: if sum.guarded == 0 { 0.0 } else { sum.conflicts as f64 / sum.guarded as f64 },
        split_candidates: candidates(&sum.samples, range).into_iter().map(aq_sdk::Bytes).collect(),
    }
}

/// Every scope's counters on this replica, by scope id.
#[derive(Default)]
pub struct Stats {
    scopes: Mutex<HashMap<String, Arc<ScopeCounters>>>,
    /// Per scope, when its last window ended and the totals then.
    last: Mutex<HashMap<String, (std::time::Instant, Counts)>>,
}

impl Stats {
    /// The counters of `scope`, made on first use.
    pub fn counters(&self, scope: &Scope) -> Arc<ScopeCounters> {
        let mut scopes = self.scopes.lock().expect("stats lock");
        let seed = scopes.len() as u64 ^ blake3::hash(scope.id.as_bytes()).as_bytes()[0] as u64;
        scopes.entry(scope.id.clone()).or_insert_with(|| Arc::new(ScopeCounters::new(&scope.range.start, seed))).clone()
    }

    /// The counters of a scope, if it was ever routed here.
    pub fn get(&self, id: &str) -> Option<Arc<ScopeCounters>> {
        self.scopes.lock().expect("stats lock").get(id).cloned()
    }

    /// Every scope's window since the previous call (the first starts when the scope was first
    /// routed here), as `replica` publishes them; each scope's next window starts now.
    pub fn windows(&self, replica: &str) -> Vec<(String, Window)> {
        let scopes: Vec<(String, Arc<ScopeCounters>)> =
            self.scopes.lock().expect("stats lock").iter().map(|(id, c)| (id.clone(), c.clone())).collect();
        let now = std::time::Instant::now();
        let at_ms = crate::clock::unix_ms();
        let mut last = self.last.lock().expect("stats lock");
        scopes
            .into_iter()
            .map(|(id, counters)| {
                let totals = counters.publish();
                let (since, earlier) = last.remove(&id).unwrap_or((counters.created, Counts::default()));
                let window = Window {
                    replica: replica.to_string(),
                    at_ms,
                    seconds: now.duration_since(since).as_secs_f64(),
                    counts: totals.since(&earlier),
                };
                last.insert(id.clone(), (now, Counts { segments: BTreeMap::new(), samples: Vec::new(), ..totals }));
                (id, window)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> Scope {
        Scope { id: "s".into(), range: KeyRange::prefix(b"/registry/"), group: "main".into(), labels: Default::default(), revisions: Default::default(), adapted: Default::default() }
    }

    fn put(key: &str) -> KeyRange {
        KeyRange::from_request(key.as_bytes(), b"")
    }

    #[test]
    fn writes_reads_and_conflicts_become_rates() {
        let stats = Stats::default();
        let counters = stats.counters(&scope());
        assert!(Arc::ptr_eq(&counters, &stats.counters(&scope())), "one set of counters per scope");
        counters.wrote_key(b"/registry/before/the/window");
        let first = stats.windows("anchor:a");
        assert_eq!(first[0].1.counts.writes, 1);
        for i in 0..300 {
            counters.wrote_key(format!("/registry/pods/p{i}").as_bytes());
        }
        for _ in 0..100 {
            counters.read(&KeyRange::prefix(b"/registry/pods/"));
        }
        for failed in [true, false, false, false] {
            counters.guarded(failed);
        }
        let (scope_id, mut window) = stats.windows("anchor:a").remove(0);
        assert_eq!((scope_id.as_str(), window.replica.as_str()), ("s", "anchor:a"));
        assert_eq!((window.counts.writes, window.counts.reads, window.counts.guarded), (300, 100, 4));
        assert_eq!(window.counts.segments.get(&hex::encode("pods/")), Some(&300));
        // As if it lasted 10 s, and a second replica saw the same.
        window.seconds = 10.0;
        let mut other = window.clone();
        other.replica = "anchor:b".into();
        let stats_of_one = stats_of(std::slice::from_ref(&window), &scope().range, 42, 4200);
        assert_eq!((stats_of_one.keys, stats_of_one.bytes), (42, 4200));
        assert_eq!((stats_of_one.write_rate, stats_of_one.read_rate), (30.0, 10.0));
        assert_eq!(stats_of_one.conflict_rate, 0.25);
        // One segment took every write.
        assert_eq!(stats_of_one.key_entropy, 0.0);
        let both = stats_of(&[window, other], &scope().range, 42, 4200);
        assert_eq!((both.write_rate, both.read_rate, both.conflict_rate), (60.0, 20.0, 0.25));
        // The next window starts empty; the totals go on underneath.
        let next = stats.windows("anchor:a").remove(0).1;
        assert_eq!((next.counts.writes, next.counts.reads), (0, 0));
        assert!(next.counts.segments.is_empty() && next.counts.samples.is_empty());
        assert_eq!(counters.publish().writes, 301);
    }

    #[test]
    fn entropy_counts_the_spread_over_children() {
        let counters = Stats::default().counters(&scope());
        for kind in ["pods", "services", "configmaps", "secrets"] {
            for i in 0..25 {
                counters.wrote(&put(&format!("/registry/{kind}/ns/x{i}")));
            }
        }
        let counts = counters.publish();
        assert!((counts.key_entropy() - 2.0).abs() < 1e-9, "four even children are two bits: {}", counts.key_entropy());
        let mut sum = counts.clone();
        sum.add(&counts);
        assert_eq!(sum.writes, 200);
        assert!((sum.key_entropy() - 2.0).abs() < 1e-9);
        assert_eq!(sum.samples.len(), counts.samples.len() * 2);
    }

    #[test]
    fn counts_survive_json_and_a_hot_scope_offers_split_candidates() {
        let counters = Stats::default().counters(&scope());
        for round in 0..30 {
            for i in 0..100 {
                counters.wrote(&put(&format!("/registry/pods/{:03}", (i * 37 + round) % 100)));
            }
        }
        let counts = counters.publish();
        let back: Counts = serde_json::from_str(&serde_json::to_string(&counts).unwrap()).unwrap();
        assert_eq!(back, counts);
        let window = Window { replica: "anchor:a".into(), at_ms: 0, seconds: 1.0, counts: back };
        let stats = stats_of(&[window], &scope().range, 100, 0);
        assert!(!stats.split_candidates.is_empty());
        assert!(stats.split_candidates.iter().all(|k| k.0.starts_with(b"/registry/pods/")));
    }
}
