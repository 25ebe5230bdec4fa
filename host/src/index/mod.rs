//! The scope index: non-overlapping key ranges, each owned by one scope.
//!
//! Lookups are a binary search over ranges sorted by their start key. Ranges use etcd's
//! conventions: a scope owns `[start, end)`, where an empty `end` means "to the end of the
//! keyspace". Request ranges come as etcd sends them (`range_end` empty: one key; `"\0"`: every
//! key from `key` on) and are normalised by [`KeyRange::from_request`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

pub use aq_sdk::keys::prefix_end;

/// A half-open key range `[start, end)`; an empty `end` is the end of the keyspace.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeyRange {
    /// First key in the range.
    pub start: Vec<u8>,
    /// First key after the range; empty for "no upper bound".
    pub end: Vec<u8>,
}

impl KeyRange {
    /// The range an etcd request names with `key` and `range_end`.
    pub fn from_request(key: &[u8], range_end: &[u8]) -> Self {
        match range_end {
            [] => KeyRange { start: key.to_vec(), end: successor(key) },
            [0] => KeyRange { start: key.to_vec(), end: Vec::new() },
            end => KeyRange { start: key.to_vec(), end: end.to_vec() },
        }
    }

    /// The range of every key starting with `prefix`.
    pub fn prefix(prefix: &[u8]) -> Self {
        KeyRange { start: prefix.to_vec(), end: prefix_end(prefix) }
    }

    /// Whether the range holds `key`.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && (self.end.is_empty() || key < self.end.as_slice())
    }

    /// Whether the range holds no key at all.
    pub fn is_empty(&self) -> bool {
        !self.end.is_empty() && self.end <= self.start
    }

    /// The part of `self` inside `other`, if any.
    pub fn intersect(&self, other: &KeyRange) -> Option<KeyRange> {
        let start = std::cmp::max(&self.start, &other.start).clone();
        let end = match (self.end.is_empty(), other.end.is_empty()) {
            (true, true) => Vec::new(),
            (true, false) => other.end.clone(),
            (false, true) => self.end.clone(),
            (false, false) => std::cmp::min(&self.end, &other.end).clone(),
        };
        let range = KeyRange { start, end };
        (!range.is_empty()).then_some(range)
    }

    /// The range as etcd's `(key, range_end)`: a single key gets an empty `range_end`, an open
    /// end gets `"\0"`.
    pub fn to_request(&self) -> (Vec<u8>, Vec<u8>) {
        if self.end.is_empty() {
            (self.start.clone(), vec![0])
        } else if self.end == successor(&self.start) {
            (self.start.clone(), Vec::new())
        } else {
            (self.start.clone(), self.end.clone())
        }
    }
}

impl fmt::Debug for KeyRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = if self.end.is_empty() { "∞".to_string() } else { String::from_utf8_lossy(&self.end).into_owned() };
        write!(f, "[{}, {end})", String::from_utf8_lossy(&self.start))
    }
}

/// The smallest key greater than `key`: `key` followed by a zero byte.
pub fn successor(key: &[u8]) -> Vec<u8> {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    next
}

/// Orders range ends, an empty end (no bound) last.
fn cmp_end(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    match (a.is_empty(), b.is_empty()) {
        (true, true) => std::cmp::Ordering::Equal,
        (true, false) => std::cmp::Ordering::Greater,
        (false, true) => std::cmp::Ordering::Less,
        (false, false) => a.cmp(b),
    }
}

/// Whether `outer` holds every key of `inner`.
fn contains_range(outer: &KeyRange, inner: &KeyRange) -> bool {
    inner.start >= outer.start && cmp_end(&inner.end, &outer.end) != std::cmp::Ordering::Greater
}

fn same_owner(a: &Option<Arc<Scope>>, b: &Option<Arc<Scope>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// A scope as the index knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    /// Stable identifier.
    pub id: String,
    /// The keys it owns.
    pub range: KeyRange,
    /// The backend group holding it.
    pub group: String,
    /// Operator labels.
    pub labels: BTreeMap<String, String>,
    /// How its revisions as clients see them follow its group's.
    pub revisions: RevisionShift,
    /// What splits, merges and moves did to it.
    pub adapted: Adapted,
}

/// What the adaptive changes did to a scope, which the advise loop's rules read: only a scope
/// a split made merges on advice, and one changed a moment ago is left alone for a cool-down.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Adapted {
    /// The scope it was split from; `None` for a scope of the configuration.
    pub split_from: Option<String>,
    /// When a split, merge or move last changed it (Unix seconds); 0: never.
    pub changed_at: u64,
}

/// How a scope's revisions, as clients see them, follow its group's. A scope that never moved
/// shows its group's revisions (the default: all zero). A scope that moved (split or merge)
/// keeps its revisions strictly increasing across the move: clients see
/// `logical = backend + offset`. The move rewrote every key of the scope on the new group from
/// logical revision `base` on, and the copy was complete at `floor`: revisions below `floor`
/// are history the move did not carry (or carried only in part), answered as compacted. The
/// translation itself is the gate's (`gate/revision.rs`); the index only carries the numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RevisionShift {
    /// Added to the group's revisions.
    pub offset: i64,
    /// The first revision clients can read at; 0: all of them.
    pub floor: i64,
    /// The first revision of the scope on its group (its move's first write); every key of the
    /// scope has a mod revision at or above it. 0: the scope never moved.
    pub base: i64,
    /// When keys last arrived from another group by a merge: that group's own revision at which
    /// it gave them up, so a watch re-homed across the merge knows where their old copy ends.
    /// 0: no merge (a move's hand-off follows from `base`).
    #[serde(default)]
    pub handed: i64,
}

/// Why a set of scopes cannot form an index.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// Two scopes share keys without one containing the other.
    #[error("scopes {first} {first_range:?} and {second} {second_range:?} overlap; nest one inside the other or separate them")]
    Overlap {
        /// One scope.
        first: String,
        /// Its range.
        first_range: Box<KeyRange>,
        /// The other.
        second: String,
        /// Its range.
        second_range: Box<KeyRange>,
    },
    /// A scope owns no key.
    #[error("scope {0} has an empty range; its end must sort after its start")]
    Empty(String),
    /// Two scopes share an id.
    #[error("scope id {0} is used twice")]
    DuplicateId(String),
}

/// Where aq keeps its own keys (fences, lineage, bookkeeping) in every group. Clients can never
/// read, write or watch them through aq: the index carves this range out of whichever scope
/// would cover it.
pub const RESERVED_PREFIX: &[u8] = b"\xffaq/";

/// Who owns a key.
#[derive(Debug, PartialEq, Eq)]
pub enum Owner<'a> {
    /// A scope.
    Scope(&'a Arc<Scope>),
    /// aq itself: the reserved keyspace.
    Reserved,
    /// Nobody: no scope covers the key.
    Unowned,
}

/// One contiguous run of keys and its owner (`None`: reserved).
#[derive(Debug)]
struct Entry {
    range: KeyRange,
    scope: Option<Arc<Scope>>,
}

/// Non-overlapping scopes sorted by start key, with the reserved range carved out. Keys outside
/// every scope have no owner.
#[derive(Debug, Default)]
pub struct ScopeIndex {
    scopes: Vec<Arc<Scope>>,
    entries: Vec<Entry>,
}

impl ScopeIndex {
    /// Builds an index. Scope ranges may nest — the innermost scope owns a key, so
    /// `/registry/secrets/` can be carved out of `/registry/` — but must not partly overlap.
    /// Empty ranges, identical ranges and duplicate ids are refused.
    pub fn new(scopes: Vec<Scope>) -> Result<Self, IndexError> {
        let mut scopes: Vec<Arc<Scope>> = scopes.into_iter().map(Arc::new).collect();
        scopes.sort_by(|a, b| a.range.start.cmp(&b.range.start).then_with(|| cmp_end(&b.range.end, &a.range.end)));
        let mut ids = std::collections::BTreeSet::new();
        for scope in &scopes {
            if scope.range.is_empty() {
                return Err(IndexError::Empty(scope.id.clone()));
            }
            if !ids.insert(scope.id.as_str()) {
                return Err(IndexError::DuplicateId(scope.id.clone()));
            }
        }
        for (i, a) in scopes.iter().enumerate() {
            for b in &scopes[i + 1..] {
                let nested = contains_range(&a.range, &b.range) && a.range != b.range;
                if a.range.intersect(&b.range).is_some() && !nested {
                    return Err(IndexError::Overlap {
                        first: a.id.clone(),
                        first_range: Box::new(a.range.clone()),
                        second: b.id.clone(),
                        second_range: Box::new(b.range.clone()),
                    });
                }
            }
        }

        // Cut the keyspace at every boundary; each piece belongs to the reserved range or to the
        // innermost scope containing it (the one starting last, then ending first).
        let reserved = KeyRange::prefix(RESERVED_PREFIX);
        let mut cuts: Vec<Vec<u8>> = vec![Vec::new(), reserved.start.clone(), reserved.end.clone()];
        for scope in &scopes {
            cuts.push(scope.range.start.clone());
            if !scope.range.end.is_empty() {
                cuts.push(scope.range.end.clone());
            }
        }
        cuts.sort();
        cuts.dedup();
        let mut entries: Vec<Entry> = Vec::new();
        for (i, start) in cuts.iter().enumerate() {
            let range = KeyRange { start: start.clone(), end: cuts.get(i + 1).cloned().unwrap_or_default() };
            let owner = if reserved.contains(start) {
                Some(None)
            } else {
                scopes.iter().rev().find(|s| s.range.contains(start)).map(|s| Some(s.clone()))
            };
            let Some(scope) = owner else { continue };
            match entries.last_mut() {
                Some(last) if last.range.end == range.start && same_owner(&last.scope, &scope) => {
                    last.range.end = range.end;
                }
                _ => entries.push(Entry { range, scope }),
            }
        }
        Ok(ScopeIndex { scopes, entries })
    }

    /// Who owns `key`. O(log n).
    pub fn lookup(&self, key: &[u8]) -> Owner<'_> {
        let after = self.entries.partition_point(|e| e.range.start.as_slice() <= key);
        match after.checked_sub(1).map(|i| &self.entries[i]) {
            Some(entry) if entry.range.contains(key) => match &entry.scope {
                Some(scope) => Owner::Scope(scope),
                None => Owner::Reserved,
            },
            _ => Owner::Unowned,
        }
    }

    /// The scopes sharing keys with `range`, in key order, each with the shared part. The
    /// reserved range is never part of the answer; a scope split by it appears twice.
    pub fn overlapping(&self, range: &KeyRange) -> Vec<(&Arc<Scope>, KeyRange)> {
        // Start at the entry holding (or following) range.start.
        let first = self
            .entries
            .partition_point(|e| !e.range.end.is_empty() && e.range.end.as_slice() <= range.start.as_slice());
        self.entries[first..]
            .iter()
            .take_while(|e| range.end.is_empty() || e.range.start < range.end)
            .filter_map(|e| Some((e.scope.as_ref()?, e.range.intersect(range)?)))
            .collect()
    }

    /// The ranges `group` must let aq write: every key of the scopes it holds, and aq's reserved
    /// keys (which every group keeps), as few ranges as cover them, in key order.
    pub fn group_ranges(&self, group: &str) -> Vec<KeyRange> {
        let mut ranges: Vec<KeyRange> = Vec::new();
        for entry in &self.entries {
            let held = match &entry.scope {
                Some(scope) => scope.group == group,
                None => true,
            };
            if !held {
                continue;
            }
            match ranges.last_mut() {
                Some(last) if last.end == entry.range.start => last.end = entry.range.end.clone(),
                _ => ranges.push(entry.range.clone()),
            }
        }
        ranges
    }

    /// The innermost scope whose range holds all of scope `id`'s: the one that owns its keys
    /// once it is gone.
    pub fn parent_of(&self, id: &str) -> Option<&Arc<Scope>> {
        let child = self.get(id)?;
        self.scopes
            .iter()
            .filter(|s| s.id != child.id && contains_range(&s.range, &child.range))
            // Scopes nest, so the holders of one range are ordered by their starts.
            .max_by(|a, b| a.range.start.cmp(&b.range.start).then_with(|| cmp_end(&b.range.end, &a.range.end)))
    }

    /// Every scope, in key order.
    pub fn scopes(&self) -> &[Arc<Scope>] {
        &self.scopes
    }

    /// A scope by id.
    pub fn get(&self, id: &str) -> Option<&Arc<Scope>> {
        self.scopes.iter().find(|s| s.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(id: &str, start: &str, end: &str) -> Scope {
        Scope {
            id: id.into(),
            range: KeyRange { start: start.into(), end: end.into() },
            group: "g".into(),
            labels: BTreeMap::new(),
            revisions: Default::default(),
            adapted: Default::default(),
        }
    }

    #[test]
    fn a_scope_s_parent_is_the_innermost_scope_holding_it() {
        let index = ScopeIndex::new(vec![
            scope("all", "", ""),
            scope("registry", "/registry/", "/registry0"),
            scope("events", "/registry/events/", "/registry/events0"),
            scope("late", "/registry/events/x", "/registry/events0"),
        ])
        .unwrap();
        assert_eq!(index.parent_of("late").unwrap().id, "events");
        assert_eq!(index.parent_of("events").unwrap().id, "registry");
        assert_eq!(index.parent_of("registry").unwrap().id, "all");
        assert!(index.parent_of("all").is_none());
        assert!(index.parent_of("nobody").is_none());
    }

    #[test]
    fn a_group_holds_its_scopes_ranges_and_the_reserved_keys_merged() {
        let mut index = vec![scope("all", "", ""), scope("events", "/registry/events/", "/registry/events0")];
        index[1].group = "events".into();
        let index = ScopeIndex::new(index).unwrap();
        let range = |start: &str, end: &[u8]| KeyRange { start: start.into(), end: end.to_vec() };
        assert_eq!(
            index.group_ranges("g"),
            vec![range("", b"/registry/events/"), range("/registry/events0", b"")],
            "the reserved range merges with the catch-all around it"
        );
        assert_eq!(
            index.group_ranges("events"),
            vec![range("/registry/events/", b"/registry/events0"), KeyRange::prefix(RESERVED_PREFIX)]
        );
        assert_eq!(index.group_ranges("none"), vec![KeyRange::prefix(RESERVED_PREFIX)]);
    }

    fn kubernetes() -> ScopeIndex {
        ScopeIndex::new(vec![
            scope("catch-all", "", "/registry/"),
            scope("secrets", "/registry/secrets/", "/registry/secrets0"),
            scope("events", "/registry/events/", "/registry/events0"),
            scope("registry-a", "/registry/", "/registry/events/"),
            scope("registry-b", "/registry/events0", "/registry/secrets/"),
            scope("registry-c", "/registry/secrets0", "/registry0"),
            scope("tail", "/registry0", ""),
        ])
        .unwrap()
    }

    #[test]
    fn lookup_finds_the_owner() {
        let index = kubernetes();
        let owner = |k: &str| match index.lookup(k.as_bytes()) {
            Owner::Scope(s) => Some(s.id.as_str()),
            _ => None,
        };
        assert_eq!(owner("/registry/secrets/ns/a"), Some("secrets"));
        assert_eq!(owner("/registry/secrets/"), Some("secrets"));
        assert_eq!(owner("/registry/secrets0"), Some("registry-c"));
        assert_eq!(owner("/registry/pods/x"), Some("registry-b"));
        assert_eq!(owner("/registry/events/e"), Some("events"));
        assert_eq!(owner("/a"), Some("catch-all"));
        assert_eq!(owner("\u{7f}"), Some("tail"));
    }

    #[test]
    fn the_innermost_nested_scope_owns_a_key() {
        let index = ScopeIndex::new(vec![
            scope("catch-all", "", ""),
            scope("registry", "/registry/", "/registry0"),
            scope("secrets", "/registry/secrets/", "/registry/secrets0"),
        ])
        .unwrap();
        let owner = |k: &[u8]| match index.lookup(k) {
            Owner::Scope(s) => s.id.clone(),
            other => format!("{other:?}"),
        };
        assert_eq!(owner(b"/registry/secrets/a"), "secrets");
        assert_eq!(owner(b"/registry/pods/a"), "registry");
        assert_eq!(owner(b"/registry/secrets0"), "registry");
        assert_eq!(owner(b"/other"), "catch-all");
        assert_eq!(owner(b"\xffaq/fence/x"), "Reserved");
        assert_eq!(owner(b"\xffzz"), "catch-all");
        let ids: Vec<String> =
            index.overlapping(&KeyRange::prefix(b"/registry/")).iter().map(|(s, _)| s.id.clone()).collect();
        assert_eq!(ids, ["registry", "secrets", "registry"]);
    }

    #[test]
    fn gaps_have_no_owner() {
        let index = ScopeIndex::new(vec![scope("a", "a", "b"), scope("c", "c", "d")]).unwrap();
        assert_eq!(index.lookup(b"b"), Owner::Unowned);
        assert_eq!(index.lookup(b"0"), Owner::Unowned);
        assert_eq!(index.lookup(b"e"), Owner::Unowned);
        assert!(matches!(index.lookup(b"a\xff"), Owner::Scope(s) if s.id == "a"));
    }

    #[test]
    fn overlaps_empty_ranges_and_duplicates_are_refused() {
        let overlap = ScopeIndex::new(vec![scope("a", "a", "c"), scope("b", "b", "d")]).unwrap_err();
        assert!(overlap.to_string().contains("scopes a [a, c) and b [b, d) overlap"), "{overlap}");
        let same = ScopeIndex::new(vec![scope("a", "a", "c"), scope("b", "a", "c")]).unwrap_err();
        assert!(matches!(same, IndexError::Overlap { .. }), "{same}");
        assert_eq!(ScopeIndex::new(vec![scope("a", "b", "a")]).unwrap_err(), IndexError::Empty("a".into()));
        assert_eq!(
            ScopeIndex::new(vec![scope("a", "a", "b"), scope("a", "c", "d")]).unwrap_err(),
            IndexError::DuplicateId("a".into())
        );
    }

    #[test]
    fn a_range_is_split_at_scope_boundaries_in_key_order() {
        let index = kubernetes();
        let parts: Vec<(String, KeyRange)> = index
            .overlapping(&KeyRange::prefix(b"/registry/"))
            .into_iter()
            .map(|(s, r)| (s.id.clone(), r))
            .collect();
        let ids: Vec<&str> = parts.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["registry-a", "events", "registry-b", "secrets", "registry-c"]);
        assert_eq!(parts[0].1, KeyRange { start: b"/registry/".to_vec(), end: b"/registry/events/".to_vec() });
        assert_eq!(parts[4].1, KeyRange { start: b"/registry/secrets0".to_vec(), end: b"/registry0".to_vec() });
        // A single key touches one scope; everything touches all of them.
        assert_eq!(index.overlapping(&KeyRange::from_request(b"/registry/secrets/a", b"")).len(), 1);
        // Everything: all seven scopes, and `tail` twice, around the reserved range.
        let everything = index.overlapping(&KeyRange::from_request(b"\0", b"\0"));
        assert_eq!(everything.len(), 8);
        assert!(everything.iter().all(|(_, part)| KeyRange::prefix(RESERVED_PREFIX).intersect(part).is_none()));
    }

    #[test]
    fn reserved_keys_belong_to_no_scope() {
        let index = kubernetes();
        let mut fence = RESERVED_PREFIX.to_vec();
        fence.extend_from_slice(b"fence/secrets");
        assert_eq!(index.lookup(&fence), Owner::Reserved);
        assert!(index.overlapping(&KeyRange::prefix(RESERVED_PREFIX)).is_empty());
        assert!(matches!(index.lookup(b"\xffaq0"), Owner::Scope(s) if s.id == "tail"));
    }

    #[test]
    fn request_ranges_round_trip() {
        for (key, end) in [(&b"a"[..], &b""[..]), (b"a", b"\0"), (b"a", b"b")] {
            assert_eq!(KeyRange::from_request(key, end).to_request(), (key.to_vec(), end.to_vec()));
        }
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(&[0xff]), Vec::<u8>::new());
    }
}
