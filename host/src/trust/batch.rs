//! The signatures of concurrent requests, verified together. One ed25519 verification costs
//! about 30 µs; a batch of 16 costs about 13 µs a signature (one multiscalar multiplication
//! for the whole batch). The first request to arrive starts a drain task and is verified at
//! once; requests that arrive while a batch is being verified wait for the next one, so a
//! batch grows with the load and a lone request waits for nothing.
//!
//! A batch either verifies as a whole or tells nothing about which signature is bad: when it
//! fails, each request of it is verified on its own with `verify_strict`, so one forged
//! request costs its batch a second pass and never refuses another request. A request alone
//! in its batch is verified with `verify_strict` directly.
//!
//! A batch accepts every signature `verify_strict` accepts. It may also accept one whose `R`
//! has a small-order component, which `verify_strict` refuses; only the key's holder can make
//! such a signature, over a message it signs anyway. Weak (small-order) public keys never get
//! this far: principals cannot be added with one.

use std::sync::{Arc, Mutex};

use ed25519_dalek::{Signature, VerifyingKey};
use tokio::sync::oneshot;

/// The most requests verified in one batch: past about 16 signatures a batch saves little more
/// per signature, and a batch blocks its worker thread while it runs (about 0.4 ms for 16
/// requests of two signatures).
const MAX_BATCH: usize = 16;

/// The signatures of one request: each with its key, over the request's digest.
pub(crate) struct Signed {
    pub(crate) digest: [u8; 32],
    pub(crate) signatures: Vec<(VerifyingKey, Signature)>,
}

impl Signed {
    /// Every signature verifies on its own, strictly.
    pub(crate) fn verify_strict(&self) -> bool {
        self.signatures.iter().all(|(key, signature)| key.verify_strict(&self.digest, signature).is_ok())
    }
}

struct Waiting {
    signed: Signed,
    done: oneshot::Sender<bool>,
}

#[derive(Default)]
struct Queue {
    pending: Vec<Waiting>,
    draining: bool,
}

/// Verifies the signatures of concurrent requests in batches.
#[derive(Default)]
pub(crate) struct Batcher {
    queue: Mutex<Queue>,
}

impl Batcher {
    /// Whether every signature of `signed` verifies.
    pub(crate) async fn verify(self: &Arc<Self>, signed: Signed) -> bool {
        let (done, verified) = oneshot::channel();
        let start = {
            let mut queue = self.queue.lock().expect("signature queue");
            queue.pending.push(Waiting { signed, done });
            !std::mem::replace(&mut queue.draining, true)
        };
        if start {
            tokio::spawn(self.clone().drain());
        }
        // The drain task answers every request it takes, so a dropped sender means it panicked.
        verified.await.unwrap_or(false)
    }

    /// Verifies batches until the queue is empty.
    async fn drain(self: Arc<Self>) {
        loop {
            let batch = {
                let mut queue = self.queue.lock().expect("signature queue");
                if queue.pending.is_empty() {
                    queue.draining = false;
                    return;
                }
                let take = queue.pending.len().min(MAX_BATCH);
                queue.pending.drain(..take).collect::<Vec<_>>()
            };
            let answers = verify_batch(batch.iter().map(|w| &w.signed));
            for (waiting, verified) in batch.into_iter().zip(answers) {
                let _ = waiting.done.send(verified);
            }
            // Requests queued meanwhile form the next batch; let their tasks run first.
            tokio::task::yield_now().await;
        }
    }
}

/// Whether each request's signatures verify: one batch verification for all of them, and each
/// on its own only when the batch fails.
fn verify_batch<'a>(requests: impl ExactSizeIterator<Item = &'a Signed> + Clone) -> Vec<bool> {
    if requests.len() == 1 {
        return requests.map(Signed::verify_strict).collect();
    }
    let (mut messages, mut signatures, mut keys) = (Vec::new(), Vec::new(), Vec::new());
    for signed in requests.clone() {
        for (key, signature) in &signed.signatures {
            messages.push(&signed.digest[..]);
            signatures.push(*signature);
            keys.push(*key);
        }
    }
    if ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok() {
        return vec![true; requests.len()];
    }
    requests.map(Signed::verify_strict).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn signed(seed: u8, forged: bool) -> Signed {
        let digest = [seed; 32];
        let keys = [SigningKey::from_bytes(&[seed; 32]), SigningKey::from_bytes(&[seed.wrapping_add(100); 32])];
        let signatures = keys
            .iter()
            .map(|key| {
                let signature = if forged { key.sign(b"something else") } else { key.sign(&digest) };
                (key.verifying_key(), signature)
            })
            .collect();
        Signed { digest, signatures }
    }

    #[test]
    fn a_batch_names_exactly_the_forged_requests() {
        let requests: Vec<Signed> = (1..=20).map(|i| signed(i, i % 7 == 0)).collect();
        let answers = verify_batch(requests.iter());
        let expected: Vec<bool> = (1..=20).map(|i| i % 7 != 0).collect();
        assert_eq!(answers, expected);
        let clean: Vec<Signed> = (1..=20).map(|i| signed(i, false)).collect();
        assert_eq!(verify_batch(clean.iter()), vec![true; 20]);
        assert_eq!(verify_batch(std::iter::once(&signed(3, true))), vec![false]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_each_get_their_own_answer_round_after_round() {
        let batcher = Arc::new(Batcher::default());
        for round in 0..3u8 {
            let tasks: Vec<_> = (1..=40u8)
                .map(|i| {
                    let batcher = batcher.clone();
                    tokio::spawn(async move { (i, batcher.verify(signed(i, (i + round) % 5 == 0)).await) })
                })
                .collect();
            for task in tasks {
                // A drain task that never stopped, or never started, leaves requests unanswered.
                let (i, verified) = tokio::time::timeout(std::time::Duration::from_secs(10), task)
                    .await
                    .expect("every request is answered")
                    .unwrap();
                assert_eq!(verified, (i + round) % 5 != 0, "request {i} of round {round}");
            }
        }
    }
}
