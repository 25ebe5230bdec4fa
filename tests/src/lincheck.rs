//! A linearizability checker for histories of etcd key operations, in the style of Wing and
//! Gong with Lowe's memoisation (the search Knossos and Porcupine run): each key is checked on
//! its own (linearizability is compositional), by trying, at every step, each operation that
//! could take effect next, remembering (operations done, state) pairs already explored.
//!
//! The model is one etcd key: absent, or a value and the revision that wrote it. Puts and
//! compare-and-set Txns report the revision they wrote, reads the value and mod revision they
//! saw. An operation whose outcome is unknown (its client got an error or gave up) may have
//! taken effect at any time after it was called, or never.

use std::collections::{BTreeMap, HashSet};

/// What a key holds: its value and the revision that last wrote it.
pub type State = Option<(String, i64)>;

/// An operation on one key and what its client saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A put of `value`, written at `revision` (`None`: outcome unknown).
    Put {
        /// The value written.
        value: String,
        /// The revision the answer carried.
        revision: Option<i64>,
    },
    /// A linearizable read that saw `seen`.
    Get {
        /// What it saw.
        seen: State,
    },
    /// A Txn: if the key's mod revision is `expect` (0: absent), put `value`. `outcome`:
    /// `Some(Some(rev))` it succeeded at `rev`, `Some(None)` its compare failed, `None` unknown.
    Cas {
        /// The mod revision compared against.
        expect: i64,
        /// The value put on success.
        value: String,
        /// What the client learned.
        outcome: Option<Option<i64>>,
    },
}

/// One operation in a history: its key, when it was called and when it returned (`None`: never,
/// as far as the client knows), in nanoseconds from any common origin.
#[derive(Clone, Debug)]
pub struct Event {
    /// The key.
    pub key: String,
    /// When the client sent it.
    pub call: u64,
    /// When the answer arrived.
    pub ret: Option<u64>,
    /// What it was and what it saw.
    pub op: Op,
}

/// The revision of a write whose answer nobody saw: any revision matches it.
const UNSEEN: i64 = -1;

fn mod_revision(state: &State) -> i64 {
    state.as_ref().map(|(_, rev)| *rev).unwrap_or(0)
}

/// Whether a compare of the mod revision against `expect` may hold in `state`.
fn may_equal(state: &State, expect: i64) -> bool {
    mod_revision(state) == expect || (mod_revision(state) == UNSEEN && expect != 0)
}

/// Whether it may fail.
fn may_differ(state: &State, expect: i64) -> bool {
    mod_revision(state) != expect || mod_revision(state) == UNSEEN
}

/// The states `op` can leave `state` in, given what its client saw (none: impossible here).
fn step(state: &State, op: &Op) -> Vec<State> {
    match op {
        Op::Get { seen } => {
            let unseen_write = matches!((state, seen), (Some((now, UNSEEN)), Some((read, _))) if now == read);
            if seen == state || unseen_write { vec![seen.clone()] } else { Vec::new() }
        }
        Op::Put { value, revision: Some(rev) } => {
            if *rev > mod_revision(state) { vec![Some((value.clone(), *rev))] } else { Vec::new() }
        }
        // Unknown: it took effect (at a revision nobody saw) or not.
        Op::Put { value, revision: None } => vec![Some((value.clone(), UNSEEN)), state.clone()],
        Op::Cas { expect, value, outcome: Some(Some(rev)) } => {
            if may_equal(state, *expect) && *rev > mod_revision(state) { vec![Some((value.clone(), *rev))] } else { Vec::new() }
        }
        Op::Cas { expect, outcome: Some(None), .. } => {
            if may_differ(state, *expect) { vec![state.clone()] } else { Vec::new() }
        }
        Op::Cas { expect, value, outcome: None } => {
            let mut next = vec![state.clone()];
            if may_equal(state, *expect) {
                next.insert(0, Some((value.clone(), UNSEEN)));
            }
            next
        }
    }
}

/// Why a history is not linearizable: the key, and its operations in call order.
#[derive(Debug)]
pub struct Violation {
    /// The key whose operations admit no order.
    pub key: String,
    /// Its history.
    pub events: Vec<Event>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "the operations on key {} are not linearizable:", self.key)?;
        for event in &self.events {
            let ret = event.ret.map(|r| r.to_string()).unwrap_or_else(|| "?".into());
            writeln!(f, "  [{} .. {ret}] {:?}", event.call, event.op)?;
        }
        Ok(())
    }
}

/// Checks a history whose keys start absent. Returns the first key without a valid order.
pub fn check(history: &[Event]) -> Result<(), Violation> {
    let mut by_key: BTreeMap<&str, Vec<Event>> = BTreeMap::new();
    for event in history {
        by_key.entry(&event.key).or_default().push(event.clone());
    }
    for (key, mut events) in by_key {
        events.sort_by_key(|e| e.call);
        if !linearizable(&events) {
            return Err(Violation { key: key.to_string(), events });
        }
    }
    Ok(())
}

/// Whether one key's operations (sorted by call) have an order consistent with their real-time
/// order and the model.
fn linearizable(events: &[Event]) -> bool {
    let mut done = vec![false; events.len()];
    let mut seen: HashSet<(Vec<u64>, State)> = HashSet::new();
    search(events, &mut done, &None, &mut seen)
}

/// Search states one key's check may visit before it gives up (loudly, never as a pass).
const SEARCH_LIMIT: usize = 2_000_000;

/// `done` as a bit set: the memo's half of a search state, 64 operations to a word.
fn bits(done: &[bool]) -> Vec<u64> {
    let mut words = vec![0u64; done.len().div_ceil(64)];
    for (i, _) in done.iter().enumerate().filter(|(_, d)| **d) {
        words[i / 64] |= 1 << (i % 64);
    }
    words
}

fn search(events: &[Event], done: &mut Vec<bool>, state: &State, seen: &mut HashSet<(Vec<u64>, State)>) -> bool {
    // Every operation that returned has been placed: the rest (outcome unknown) may all have
    // taken effect after the last observation, or never.
    let open = || events.iter().zip(done.iter()).filter(|(_, d)| !**d);
    if open().all(|(e, _)| e.ret.is_none()) {
        return true;
    }
    // The earliest return among the operations not placed yet: nothing called after it can
    // take effect before it.
    let first_return = open().filter_map(|(e, _)| e.ret).min().unwrap_or(u64::MAX);
    for i in 0..events.len() {
        if done[i] || events[i].call > first_return {
            continue;
        }
        for next in step(state, &events[i].op) {
            done[i] = true;
            assert!(
                seen.len() < SEARCH_LIMIT,
                "the linearizability search of key {} passed {SEARCH_LIMIT} states: the history has too many operations of unknown outcome to check",
                events[i].key
            );
            if seen.insert((bits(done), next.clone())) && search(events, done, &next, seen) {
                return true;
            }
            done[i] = false;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(call: u64, ret: u64, op: Op) -> Event {
        Event { key: "k".into(), call, ret: Some(ret), op }
    }
    fn put(value: &str, revision: i64) -> Op {
        Op::Put { value: value.into(), revision: Some(revision) }
    }
    fn get(seen: Option<(&str, i64)>) -> Op {
        Op::Get { seen: seen.map(|(v, r)| (v.to_string(), r)) }
    }

    #[test]
    fn a_read_after_a_write_sees_it() {
        assert!(check(&[at(0, 10, put("a", 5)), at(20, 30, get(Some(("a", 5))))]).is_ok());
        let stale = check(&[at(0, 10, put("a", 5)), at(20, 30, get(None))]).unwrap_err();
        assert_eq!(stale.key, "k");
        assert!(stale.to_string().contains("not linearizable"), "{stale}");
    }

    #[test]
    fn a_read_concurrent_with_a_write_may_see_either() {
        for seen in [None, Some(("a", 5))] {
            assert!(check(&[at(0, 30, put("a", 5)), at(10, 20, get(seen))]).is_ok(), "{seen:?}");
        }
        assert!(check(&[at(0, 30, put("a", 5)), at(10, 20, get(Some(("b", 5))))]).is_err(), "a value never written");
    }

    #[test]
    fn reads_never_go_back_in_time() {
        // The first read saw the write; a later read cannot miss it.
        let history = [at(0, 100, put("a", 5)), at(10, 20, get(Some(("a", 5)))), at(30, 40, get(None))];
        assert!(check(&history).is_err());
        // Two writes: the revisions order them.
        let history = [at(0, 10, put("a", 5)), at(0, 10, put("b", 6)), at(20, 30, get(Some(("a", 5))))];
        assert!(check(&history).is_err(), "b at revision 6 came after a");
        let history = [at(0, 10, put("a", 5)), at(0, 10, put("b", 6)), at(20, 30, get(Some(("b", 6))))];
        assert!(check(&history).is_ok());
    }

    #[test]
    fn compare_and_set_succeeds_only_on_the_revision_it_compared() {
        let cas = |expect, outcome| Op::Cas { expect, value: "c".into(), outcome };
        // Two clients read revision 5 and both try to replace it: one wins.
        let history = [at(0, 10, put("a", 5)), at(20, 30, cas(5, Some(Some(7)))), at(20, 30, cas(5, Some(None)))];
        assert!(check(&history).is_ok());
        let both_won = [at(0, 10, put("a", 5)), at(20, 30, cas(5, Some(Some(7)))), at(20, 30, cas(5, Some(Some(8))))];
        assert!(check(&both_won).is_err());
        // A compare that failed against what must still be there.
        assert!(check(&[at(0, 10, put("a", 5)), at(20, 30, cas(5, Some(None)))]).is_err());
    }

    #[test]
    fn an_operation_with_an_unknown_outcome_may_have_happened_or_not() {
        let lost = Event { key: "k".into(), call: 0, ret: None, op: Op::Put { value: "a".into(), revision: None } };
        for seen in [None, Some(("a", 1)), Some(("a", 77))] {
            assert!(check(&[lost.clone(), at(20, 30, get(seen))]).is_ok(), "{seen:?}");
        }
        // Once a read saw it at a revision, later reads see that revision.
        let history = [lost.clone(), at(20, 30, get(Some(("a", 7)))), at(40, 50, get(Some(("a", 8))))];
        assert!(check(&history).is_err());
        // ...but not before it was called.
        let late = Event { call: 50, ..lost };
        assert!(check(&[late, at(20, 30, get(Some(("a", 1))))]).is_err());
    }

    #[test]
    fn keys_are_checked_apart() {
        let other = Event { key: "j".into(), ..at(0, 10, put("x", 9)) };
        let history = [at(0, 10, put("a", 5)), other, at(20, 30, get(Some(("a", 5))))];
        assert!(check(&history).is_ok());
    }
}
