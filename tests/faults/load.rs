//! What every fault case runs while it breaks something: clients making a checkable history
//! (puts, compare-and-set Txns and reads on a few keys, each operation recorded with what its
//! client saw) and a watcher that resumes from the last revision it saw whenever its watch
//! ends, as kube-apiserver's reflector does. Afterwards the history goes to the
//! linearizability checker and the watcher's events are held to etcd's watch guarantees.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aq_tests::lincheck::{Event, Op};
use etcd_client::{Compare, CompareOp, EventType, Txn, TxnOp, WatchOptions};

/// How long one client operation may take before its outcome counts as unknown.
const OP_DEADLINE: Duration = Duration::from_secs(10);

/// A clock every part of a case shares: nanoseconds since the case began.
#[derive(Clone)]
pub struct Clock(Arc<Instant>);

impl Clock {
    pub fn new() -> Clock {
        Clock(Arc::new(Instant::now()))
    }

    pub fn now(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

/// Clients writing and reading `keys` keys under `prefix` through `endpoints` until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    /// When each acknowledged write's answer came, as the clients go.
    acked: Arc<Mutex<Vec<u64>>>,
    /// The code and message of each error clients got.
    errors: Arc<Mutex<Vec<(tonic::Code, String)>>>,
    clients: Vec<tokio::task::JoinHandle<Vec<Event>>>,
}

/// What a load recorded.
pub struct History {
    /// Every operation, for the checker.
    pub events: Vec<Event>,
    /// The codes and messages of the errors clients got.
    pub errors: Vec<(tonic::Code, String)>,
}

impl History {
    /// The puts and compare-and-sets that succeeded, as (key, revision, value).
    pub fn acknowledged_writes(&self) -> Vec<(String, i64, String)> {
        self.events
            .iter()
            .filter_map(|e| match &e.op {
                Op::Put { value, revision: Some(revision) } => Some((e.key.clone(), *revision, value.clone())),
                Op::Cas { value, outcome: Some(Some(revision)), .. } => Some((e.key.clone(), *revision, value.clone())),
                _ => None,
            })
            .collect()
    }

    /// When each acknowledged write's answer came.
    pub fn acknowledged_at(&self) -> Vec<u64> {
        self.events
            .iter()
            .filter(|e| matches!(e.op, Op::Put { revision: Some(_), .. } | Op::Cas { outcome: Some(Some(_)), .. }))
            .filter_map(|e| e.ret)
            .collect()
    }
}

impl Load {
    /// Starts `clients` clients (spread over `endpoints`) on keys `<prefix>k0 …`.
    pub fn start(endpoints: &[String], prefix: &str, clients: usize, keys: usize, clock: &Clock) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for c in 0..clients {
            let endpoint = endpoints[c % endpoints.len()].clone();
            let (stop, done, acked, errors) = (stop.clone(), done.clone(), acked.clone(), errors.clone());
            let (prefix, clock) = (prefix.to_string(), clock.clone());
            tasks.push(tokio::spawn(async move {
                let connect = etcd_client::Client::connect([endpoint], None);
                let mut client = tokio::time::timeout(OP_DEADLINE, connect).await.expect("a client connects in time").expect("a client connects to aq");
                // A small deterministic generator per client: which key, which operation.
                let mut rng = aq_tests::Rng(0x9e37_79b9_7f4a_7c15u64 ^ (c as u64 + 1));
                let mut next = move || rng.next_u64();
                let mut last_seen = vec![0i64; keys];
                let mut events = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let k = (next() % keys as u64) as usize;
                    let key = format!("{prefix}k{k}");
                    let value = format!("c{c}-{n}");
                    let call = clock.now();
                    let kind = next() % 3;
                    let failed = |status: etcd_client::Error| {
                        let (code, message) = match &status {
                            etcd_client::Error::GRpcStatus(s) => (s.code(), s.message().to_string()),
                            other => (tonic::Code::Unknown, other.to_string()),
                        };
                        errors.lock().unwrap().push((code, message));
                    };
                    // An error that says nothing was written leaves the operation out, as a
                    // failed read is: it did not happen.
                    // So does one whose client could not connect to aq at all.
                    let not_sent = |status: &etcd_client::Error| {
                        let said = format!("{status:?}");
                        said.contains(aq_host::backend::NOT_SENT) || said.contains("tcp connect error") || said.contains("ConnectionRefused")
                    };
                    let op = match kind {
                        0 => match tokio::time::timeout(OP_DEADLINE, client.put(key.as_str(), value.as_str(), None)).await {
                            Ok(Ok(answer)) => Some(Op::Put { value, revision: Some(answer.header().unwrap().revision()) }),
                            Ok(Err(e)) => {
                                let unsent = not_sent(&e);
                                failed(e);
                                (!unsent).then_some(Op::Put { value, revision: None })
                            }
                            Err(_) => Some(Op::Put { value, revision: None }),
                        },
                        1 => match tokio::time::timeout(OP_DEADLINE, client.get(key.as_str(), None)).await {
                            Ok(Ok(answer)) => {
                                let seen = answer.kvs().first().map(|kv| (kv.value_str().unwrap().to_string(), kv.mod_revision()));
                                last_seen[k] = seen.as_ref().map(|(_, rev)| *rev).unwrap_or(0);
                                Some(Op::Get { seen })
                            }
                            // A read that failed changed nothing: it is left out.
                            Ok(Err(e)) => {
                                failed(e);
                                None
                            }
                            Err(_) => None,
                        },
                        _ => {
                            let expect = last_seen[k];
                            let txn = Txn::new()
                                .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, expect)])
                                .and_then([TxnOp::put(key.as_str(), value.as_str(), None)]);
                            match tokio::time::timeout(OP_DEADLINE, client.txn(txn)).await {
                                Ok(Ok(answer)) => {
                                    let outcome = answer.succeeded().then(|| answer.header().unwrap().revision());
                                    Some(Op::Cas { expect, value, outcome: Some(outcome) })
                                }
                                Ok(Err(e)) => {
                                    let unsent = not_sent(&e);
                                    failed(e);
                                    (!unsent).then_some(Op::Cas { expect, value, outcome: None })
                                }
                                Err(_) => Some(Op::Cas { expect, value, outcome: None }),
                            }
                        }
                    };
                    let Some(op) = op else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    let known = !matches!(op, Op::Put { revision: None, .. } | Op::Cas { outcome: None, .. });
                    let wrote = matches!(op, Op::Put { revision: Some(_), .. } | Op::Cas { outcome: Some(Some(_)), .. });
                    let ret = known.then(|| clock.now());
                    if let (true, Some(at)) = (wrote, ret) {
                        acked.lock().unwrap().push(at);
                    }
                    events.push(Event { key, call, ret, op });
                    done.fetch_add(1, Ordering::Relaxed);
                    if !known {
                        // After an error, a moment before the next try, as clients back off.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                events
            }));
        }
        Load { stop, done, acked, errors, clients: tasks }
    }

    /// Operations finished so far (unknown outcomes included).
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Writes that succeeded and were answered after `since`.
    pub fn acked_since(&self, since: u64) -> usize {
        self.acked.lock().unwrap().iter().filter(|&&at| at > since).count()
    }

    /// Waits until `what` holds of the load, up to `deadline`.
    pub async fn wait(&self, what: &str, deadline: Duration, condition: impl Fn(&Load) -> bool) {
        let started = Instant::now();
        while !condition(self) {
            assert!(started.elapsed() < deadline, "the load did not reach: {what} (done {}, errors {:?})", self.done(), self.errors());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The errors clients got so far: code and message.
    pub fn errors(&self) -> Vec<(tonic::Code, String)> {
        self.errors.lock().unwrap().clone()
    }

    /// Stops the clients and answers what they recorded.
    pub async fn stop(self) -> History {
        self.stop.store(true, Ordering::Relaxed);
        let mut events = Vec::new();
        for client in self.clients {
            let ended = tokio::time::timeout(OP_DEADLINE * 3, client).await.expect("a load client stops");
            events.extend(ended.expect("a load client ends"));
        }
        let errors = std::mem::take(&mut *self.errors.lock().unwrap());
        History { events, errors }
    }
}

/// One watch event as a client saw it: revision, key, put or delete, value.
pub type Seen = (i64, String, bool, String);

/// A watcher of a prefix through aq that starts over from the revision after the last it saw
/// whenever its watch is canceled or its stream ends.
pub struct Watcher {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<Vec<Seen>>>,
    /// Why each watch ended (its cancel reason, or how its stream ended), in order.
    ended: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Watcher {
    /// Watches keys under `prefix` at `endpoint` from `start` (a revision).
    pub async fn start(endpoint: &str, prefix: &str, start: i64) -> Watcher {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let ended = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (endpoint, prefix) = (endpoint.to_string(), prefix.to_string());
        let (created_tx, created_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn({
            let (mut stopped, ended) = (stopped, ended.clone());
            async move {
                let mut created = Some(created_tx);
                let mut answers: Vec<Vec<Seen>> = Vec::new();
                let mut from = start;
                while !*stopped.borrow() {
                    let connect = etcd_client::Client::connect([endpoint.as_str()], None);
                    let Ok(Ok(mut client)) = tokio::time::timeout(OP_DEADLINE, connect).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let options = WatchOptions::new().with_prefix().with_start_revision(from);
                    let Ok(Ok(mut stream)) = tokio::time::timeout(OP_DEADLINE, client.watch(prefix.as_str(), Some(options))).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let why = loop {
                        let message = tokio::select! {
                            m = stream.message() => m,
                            _ = stopped.changed() => break String::new(),
                        };
                        let response = match message {
                            Ok(Some(response)) => response,
                            Ok(None) => break "the stream ended".to_string(),
                            Err(error) => break format!("the stream failed: {error}"),
                        };
                        if response.created()
                            && let Some(created) = created.take()
                        {
                            let _ = created.send(());
                        }
                        if response.canceled() {
                            break format!("canceled: {} (compact revision {})", response.cancel_reason(), response.compact_revision());
                        }
                        if response.events().is_empty() {
                            continue;
                        }
                        let batch: Vec<Seen> = response
                            .events()
                            .iter()
                            .map(|e| {
                                let kv = e.kv().expect("an event has its key");
                                (
                                    kv.mod_revision(),
                                    kv.key_str().unwrap().to_string(),
                                    e.event_type() == EventType::Put,
                                    kv.value_str().unwrap_or_default().to_string(),
                                )
                            })
                            .collect();
                        from = batch.last().map(|s| s.0 + 1).unwrap_or(from);
                        answers.push(batch);
                    };
                    if !*stopped.borrow() {
                        ended.lock().unwrap().push(why);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                answers
            }
        });
        tokio::time::timeout(Duration::from_secs(30), created_rx).await.expect("the watch is created").expect("the watcher runs");
        Watcher { stop, task, ended }
    }

    /// Why the watch ended each time it was opened again (empty: it never ended).
    pub fn ended(&self) -> Vec<String> {
        self.ended.lock().unwrap().clone()
    }

    /// Stops watching; answers every answer's events, in the order they came.
    pub async fn stop(self) -> Vec<Vec<Seen>> {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(30), self.task).await.expect("the watcher stops").expect("the watcher ends")
    }
}

/// Every event under `prefix` from `start` up to `end` (a revision), read by a fresh watch.
pub async fn all_events(endpoint: &str, prefix: &str, start: i64, end: i64) -> Vec<Seen> {
    let mut client = etcd_client::Client::connect([endpoint], None).await.expect("a client connects");
    let options = WatchOptions::new().with_prefix().with_start_revision(start);
    let mut stream = client.watch(prefix, Some(options)).await.expect("a watch");
    let mut all = Vec::new();
    if end < start {
        return all;
    }
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), stream.message()).await;
        let response = message.expect("events up to the end revision").expect("the watch stream").expect("an answer");
        assert!(!response.canceled(), "the reference watch was canceled: {}", response.cancel_reason());
        for e in response.events() {
            let kv = e.kv().unwrap();
            all.push((kv.mod_revision(), kv.key_str().unwrap().to_string(), e.event_type() == EventType::Put, kv.value_str().unwrap_or_default().to_string()));
        }
        if all.last().is_some_and(|s| s.0 >= end) {
            return all;
        }
    }
}

/// Holds a watcher's answers to etcd's watch guarantees against `reference` (every event of
/// the same range and revisions, from a watch that saw no fault): ordered by revision, each
/// event once, none missing, and a revision's events all in one answer.
pub fn check_watch(answers: &[Vec<Seen>], reference: &[Seen]) -> Result<(), String> {
    let mut revision_answer: BTreeMap<i64, usize> = BTreeMap::new();
    for (i, batch) in answers.iter().enumerate() {
        for event in batch {
            match revision_answer.insert(event.0, i) {
                Some(other) if other != i => {
                    return Err(format!("revision {} came in two answers ({other} and {i}): not atomic", event.0));
                }
                _ => {}
            }
        }
    }
    let seen: Vec<&Seen> = answers.iter().flatten().collect();
    for pair in seen.windows(2) {
        if pair[1].0 < pair[0].0 {
            return Err(format!("revision {} after {}: out of order", pair[1].0, pair[0].0));
        }
    }
    let unique: HashSet<(&i64, &String)> = seen.iter().map(|s| (&s.0, &s.1)).collect();
    if unique.len() != seen.len() {
        return Err(format!("{} events but {} distinct: an event came twice", seen.len(), unique.len()));
    }
    let last = seen.last().map(|s| s.0).unwrap_or(0);
    let expected: Vec<&Seen> = reference.iter().filter(|s| s.0 <= last).collect();
    if expected != seen {
        let missing: Vec<&&Seen> = expected.iter().filter(|e| !seen.contains(e)).take(5).collect();
        return Err(format!("the watcher saw {} events, the reference {} up to revision {last}; missing e.g. {missing:?}", seen.len(), expected.len()));
    }
    Ok(())
}

/// The p99 of `samples`.
pub fn p99(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}
