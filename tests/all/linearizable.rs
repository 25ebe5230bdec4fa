//! A concurrent history through two replicas (puts, compare-and-set Txns, reads on a few keys)
//! checked for linearizability against a model of etcd keys.

use std::sync::Arc;
use std::time::Instant;

use aq_tests::etcd::TestGateway;
use aq_tests::lincheck::{Event, Op, check};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};

const CLIENTS: usize = 6;
const OPS: usize = 30;
const KEYS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_concurrent_history_through_two_replicas_is_linearizable() {
    let gw = TestGateway::start().await;
    let replica = gw.replica().await;
    let endpoints = [gw.endpoint(), replica.running.addr.to_string()];
    let origin = Arc::new(Instant::now());
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let endpoint = endpoints[c % 2].clone();
        let origin = origin.clone();
        clients.push(tokio::spawn(async move {
            let mut client = etcd_client::Client::connect([endpoint], None).await.unwrap();
            let now = || origin.elapsed().as_nanos() as u64;
            // A small deterministic generator per client: which key, which operation.
            let mut rng = aq_tests::Rng(0x9e37_79b9_7f4a_7c15u64 ^ (c as u64 + 1));
            let mut next = move || rng.next_u64();
            let mut last_seen = [0i64; KEYS];
            let mut events = Vec::new();
            for n in 0..OPS {
                let k = (next() % KEYS as u64) as usize;
                let key = format!("/registry/pods/lin/k{k}");
                let value = format!("c{c}-{n}");
                let call = now();
                let op = match next() % 3 {
                    0 => {
                        let answer = client.put(key.as_str(), value.as_str(), None).await.expect("put");
                        Op::Put { value, revision: Some(answer.header().unwrap().revision()) }
                    }
                    1 => {
                        let answer = client.get(key.as_str(), None).await.expect("get");
                        let seen = answer.kvs().first().map(|kv| (kv.value_str().unwrap().to_string(), kv.mod_revision()));
                        last_seen[k] = seen.as_ref().map(|(_, rev)| *rev).unwrap_or(0);
                        Op::Get { seen }
                    }
                    _ => {
                        let expect = last_seen[k];
                        let txn = Txn::new()
                            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, expect)])
                            .and_then([TxnOp::put(key.as_str(), value.as_str(), None)]);
                        let answer = client.txn(txn).await.expect("txn");
                        let outcome = answer.succeeded().then(|| answer.header().unwrap().revision());
                        Op::Cas { expect, value, outcome: Some(outcome) }
                    }
                };
                events.push(Event { key, call, ret: Some(now()), op });
            }
            events
        }));
    }
    let mut history = Vec::new();
    for client in clients {
        history.extend(client.await.unwrap());
    }
    assert_eq!(history.len(), CLIENTS * OPS);
    let cas_won = history.iter().filter(|e| matches!(e.op, Op::Cas { outcome: Some(Some(_)), .. })).count();
    let cas_lost = history.iter().filter(|e| matches!(e.op, Op::Cas { outcome: Some(None), .. })).count();
    assert!(cas_won > 0 && cas_lost > 0, "the history exercises both branches ({cas_won} won, {cas_lost} lost)");
    if let Err(violation) = check(&history) {
        panic!("{violation}");
    }
}
