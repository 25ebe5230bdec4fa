//! Where to split a scope: split keys sampled from the requests themselves, the way CockroachDB's
//! load-based splitter and TiKV's split checker choose them.
//!
//! A reservoir holds up to [`SAMPLES`] start keys of recent requests, each an equally likely
//! pick from every request seen. Every request that does not replace a sample is counted against
//! each sample: entirely at or after it (`right`), entirely before it (`left`), or straddling it
//! (`contained`: a range read or delete that a split there would cut in two). A sample is a
//! candidate once [`MIN_COUNTED`] requests were counted against it, its imbalance
//! `|left − right| / (left + right)` is below [`MAX_IMBALANCE`], and fewer than
//! [`MAX_CONTAINED`] of its requests straddle it. The most balanced candidate comes first.

use serde::{Deserialize, Serialize};

use crate::index::KeyRange;

/// Samples kept.
pub const SAMPLES: usize = 20;
/// A candidate whose sides differ by this share of the requests or more is refused.
pub const MAX_IMBALANCE: f64 = 0.25;
/// A candidate that this share of the requests or more would cut in two is refused.
pub const MAX_CONTAINED: f64 = 0.5;
/// Requests counted against a sample before it can be a candidate.
pub const MIN_COUNTED: u64 = 100;

/// One sampled key and how the requests since fell around it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// The key (hex in JSON).
    #[serde(with = "hex::serde")]
    pub key: Vec<u8>,
    /// Requests entirely before the key.
    pub left: u64,
    /// Requests at or after the key.
    pub right: u64,
    /// Requests spanning the key.
    pub contained: u64,
}

impl Sample {
    fn counted(&self) -> u64 {
        self.left + self.right + self.contained
    }

    /// `|left − right| / (left + right)`; 1 when no request fell on either side.
    pub fn imbalance(&self) -> f64 {
        let sides = self.left + self.right;
        if sides == 0 {
            return 1.0;
        }
        self.left.abs_diff(self.right) as f64 / sides as f64
    }

    /// The share of counted requests that straddle the key.
    pub fn contained_share(&self) -> f64 {
        match self.counted() {
            0 => 0.0,
            counted => self.contained as f64 / counted as f64,
        }
    }
}

/// Where a counted request ends.
#[derive(Clone, Copy)]
enum Bound<'a> {
    /// It is one key: it ends right after its start.
    Key,
    /// Before this key.
    Before(&'a [u8]),
    /// At the end of the keyspace.
    Open,
}

/// The reservoir of one scope's requests.
#[derive(Clone, Debug)]
pub struct SplitFinder {
    samples: Vec<Sample>,
    seen: u64,
    random: u64,
}

impl SplitFinder {
    /// An empty reservoir whose replacement choices follow `seed`.
    pub fn new(seed: u64) -> Self {
        SplitFinder { samples: Vec::with_capacity(SAMPLES), seen: 0, random: seed }
    }

    /// Counts one request over `span`.
    pub fn record(&mut self, span: &KeyRange) {
        let end = if span.end.is_empty() { Bound::Open } else { Bound::Before(&span.end) };
        self.record_span(&span.start, end);
    }

    /// Counts one request of a single key (a Put), without building its range.
    pub fn record_key(&mut self, key: &[u8]) {
        self.record_span(key, Bound::Key);
    }

    fn record_span(&mut self, start: &[u8], end: Bound<'_>) {
        let seen = self.seen;
        self.seen += 1;
        let slot = if (seen as usize) < SAMPLES { seen as usize } else { (self.next_random() % (seen + 1)) as usize };
        if slot < SAMPLES {
            let sample = Sample { key: start.to_vec(), left: 0, right: 0, contained: 0 };
            if slot < self.samples.len() {
                self.samples[slot] = sample;
            } else {
                self.samples.push(sample);
            }
            return;
        }
        for sample in &mut self.samples {
            let key = sample.key.as_slice();
            let before = match end {
                Bound::Key => start < key,
                Bound::Before(end) => end <= key,
                Bound::Open => false,
            };
            if start >= key {
                sample.right += 1;
            } else if before {
                sample.left += 1;
            } else {
                sample.contained += 1;
            }
        }
    }

    /// The samples and their counts, for publishing.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Requests seen since the reservoir was made.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Forgets everything: the next window starts afresh.
    pub fn reset(&mut self) {
        self.samples.clear();
        self.seen = 0;
    }

    /// splitmix64: fast, and good enough to choose reservoir slots.
    fn next_random(&mut self) -> u64 {
        self.random = self.random.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.random;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The keys of `samples` that could split `scope` (strictly inside it), acceptable by the
/// thresholds above, the most balanced first. `samples` may come from several replicas.
pub fn candidates<'a>(samples: impl IntoIterator<Item = &'a Sample>, scope: &KeyRange) -> Vec<Vec<u8>> {
    let mut accepted: Vec<(&Sample, f64)> = samples
        .into_iter()
        .filter(|s| s.key > scope.start && scope.contains(&s.key))
        .filter(|s| s.counted() >= MIN_COUNTED && s.imbalance() < MAX_IMBALANCE && s.contained_share() < MAX_CONTAINED)
        .map(|s| (s, s.imbalance()))
        .collect();
    accepted.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.key.cmp(&b.0.key)));
    let mut keys: Vec<Vec<u8>> = accepted.into_iter().map(|(s, _)| s.key.clone()).collect();
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> KeyRange {
        KeyRange::from_request(k.as_bytes(), b"")
    }

    fn scope() -> KeyRange {
        KeyRange::prefix(b"/s/")
    }

    #[test]
    fn uniform_load_is_split_near_its_middle() {
        let mut finder = SplitFinder::new(7);
        for round in 0..50 {
            for i in 0..100 {
                finder.record(&key(&format!("/s/{:03}", (i * 37 + round) % 100)));
            }
        }
        let found = candidates(finder.samples(), &scope());
        assert!(!found.is_empty(), "{:?}", finder.samples());
        let best = String::from_utf8(found[0].clone()).unwrap();
        let n: u32 = best.trim_start_matches("/s/").parse().unwrap();
        // Within the band the imbalance bound allows: 25% either side of the middle.
        assert!((38..=62).contains(&n), "best split {best}");
        // Every candidate passes the thresholds, most balanced first.
        let imbalance = |k: &Vec<u8>| finder.samples().iter().find(|s| &s.key == k).unwrap().imbalance();
        assert!(found.windows(2).all(|w| imbalance(&w[0]) <= imbalance(&w[1])));
        assert!(found.iter().all(|k| imbalance(k) < MAX_IMBALANCE));
    }

    #[test]
    fn one_hot_key_offers_no_split() {
        let mut finder = SplitFinder::new(1);
        for _ in 0..5000 {
            finder.record(&key("/s/hot"));
        }
        // Every sample is the hot key: every request is at or after it, so none is balanced.
        assert!(candidates(finder.samples(), &scope()).is_empty());
    }

    #[test]
    fn ranges_over_a_key_keep_it_from_being_chosen() {
        let mut finder = SplitFinder::new(3);
        for i in 0..4000u32 {
            if i % 4 == 0 {
                finder.record(&key(&format!("/s/{:03}", i % 100)));
            } else {
                // Most requests read the whole scope: any split would cut them.
                finder.record(&KeyRange::prefix(b"/s/"));
            }
        }
        let found = candidates(finder.samples(), &scope());
        for k in &found {
            let sample = finder.samples().iter().find(|s| &s.key == k).unwrap();
            assert!(sample.contained_share() < MAX_CONTAINED, "{sample:?}");
        }
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn counts_and_thresholds_are_as_documented() {
        let sample = |left, right, contained| Sample { key: b"/s/m".to_vec(), left, right, contained };
        let inside = scope();
        // 60/40: imbalance 0.2, accepted; 70/30: 0.4, refused.
        assert_eq!(candidates([&sample(60, 40, 0)], &inside), vec![b"/s/m".to_vec()]);
        assert!(candidates([&sample(70, 30, 0)], &inside).is_empty());
        // Half the requests straddling the key: refused.
        assert!(candidates([&sample(50, 50, 100)], &inside).is_empty());
        // Too few requests counted.
        assert!(candidates([&sample(40, 40, 0)], &inside).is_empty());
        // The scope's own start cannot split it, nor a key outside it.
        let at_start = Sample { key: b"/s/".to_vec(), ..sample(50, 50, 0) };
        let outside = Sample { key: b"/t/".to_vec(), ..sample(50, 50, 0) };
        assert!(candidates([&at_start, &outside], &inside).is_empty());

        let mut finder = SplitFinder::new(0);
        for k in ["/s/m", "/s/a", "/s/z"] {
            finder.record(&key(k));
        }
        assert_eq!(finder.seen(), 3);
        assert_eq!(finder.samples().len(), 3, "the first requests fill the reservoir");
        finder.reset();
        assert_eq!((finder.seen(), finder.samples().len()), (0, 0));
    }

    #[test]
    fn a_key_counts_as_its_one_key_range() {
        let (mut by_key, mut by_range) = (SplitFinder::new(5), SplitFinder::new(5));
        for i in 0..500u32 {
            let k = format!("/s/{:03}", (i * 13) % 100);
            by_key.record_key(k.as_bytes());
            by_range.record(&key(&k));
        }
        assert_eq!(by_key.samples(), by_range.samples());
    }

    #[test]
    fn samples_from_several_replicas_are_judged_together() {
        let mut a = SplitFinder::new(11);
        let mut b = SplitFinder::new(12);
        for i in 0..3000u32 {
            a.record(&key(&format!("/s/{:03}", i % 100)));
            b.record(&key(&format!("/s/{:03}", (i * 7) % 100)));
        }
        let both = candidates(a.samples().iter().chain(b.samples()), &scope());
        let one = candidates(a.samples(), &scope());
        assert!(both.len() >= one.len());
        let sample = a.samples()[0].clone();
        let json = serde_json::to_string(&sample).unwrap();
        assert_eq!(serde_json::from_str::<Sample>(&json).unwrap(), sample);
    }
}
