//! The decision log: one JSON line per deny and require-approval decision (and per allow when
//! asked), with the scope, the policy digest that decided, the verdict, the reason and the
//! principal; and one per answer of a policy to `advise`, with what it was shown. Lines are written by a dedicated thread; the request path only queues them and,
//! when the queue is full, counts the line as dropped (`aq_decision_lines_dropped_total`)
//! instead of waiting.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;

use serde::Serialize;

/// Lines queued before new ones are dropped.
const QUEUE: usize = 16 * 1024;

/// Where decision lines go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DecisionSink {
    /// Nowhere.
    #[default]
    Off,
    /// Standard output.
    Stdout,
    /// Appended to a file.
    File(PathBuf),
}

impl DecisionSink {
    /// `-` is standard output, `off` disables the log, anything else is a file.
    pub fn parse(text: &str) -> Self {
        match text {
            "-" => DecisionSink::Stdout,
            "off" | "" => DecisionSink::Off,
            path => DecisionSink::File(PathBuf::from(path)),
        }
    }
}

/// One logged decision.
#[derive(Debug, Serialize)]
pub struct DecisionLine<'a> {
    /// RFC 3339 time of the decision.
    pub time: String,
    /// The scope.
    pub scope: &'a str,
    /// blake3 digest (hex) of the policy that decided.
    pub policy: String,
    /// `allow`, `deny` or `require_approval`.
    pub verdict: &'a str,
    /// The policy's reason (deny), or the approval rule in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    /// The verified principals of the request; empty when it carried none.
    pub principals: Vec<&'a str>,
    /// The transport identity (mTLS name, etcd user, or an admission review's Kubernetes user), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<&'a str>,
    /// The first key the request touches.
    pub key: String,
    /// How many operations the request has.
    pub ops: usize,
    /// How the policy failed, when the verdict is its fail mode's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<&'a str>,
    /// The policy's annotations.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: &'a std::collections::BTreeMap<String, String>,
}

/// One logged answer of a scope's policy to `advise`.
#[derive(Debug, Serialize)]
pub struct AdviceLine<'a> {
    /// RFC 3339 time of the advice.
    pub time: String,
    /// The scope.
    pub scope: &'a str,
    /// blake3 digest (hex) of the policy that advised.
    pub policy: String,
    /// `keep`, `split`, `merge`, or `failed`.
    pub advice: &'a str,
    /// Where to split (the key, as text when it is UTF-8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// What the policy saw.
    pub stats: &'a aq_sdk::ScopeStats,
    /// How the policy failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// How many recent decisions other than allows are kept.
const RECENT: usize = 20;

/// The decision log of one gateway.
pub struct DecisionLog {
    queue: Option<SyncSender<Vec<u8>>>,
    /// The latest decisions other than allows, as their lines, oldest first, kept whether or
    /// not lines are written anywhere (the scope map shows them).
    recent: std::sync::Mutex<std::collections::VecDeque<Arc<[u8]>>>,
    log_allows: bool,
    dropped: Counter,
    /// The thread writing the lines; joined on drop, so the last lines are written.
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for DecisionLog {
    fn drop(&mut self) {
        self.queue = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl DecisionLog {
    /// A log that writes nothing.
    pub fn off() -> Self {
        DecisionLog { queue: None, recent: Default::default(), log_allows: false, dropped: Counter::default(), writer: None }
    }

    /// Opens `sink`; `log_allows` also logs allowed requests; lines dropped are counted in
    /// `dropped`.
    pub fn open(sink: &DecisionSink, log_allows: bool, dropped: Counter) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = match sink {
            DecisionSink::Off => return Ok(Self::off()),
            DecisionSink::Stdout => Box::new(std::io::stdout()),
            DecisionSink::File(path) => {
                Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("cannot open the decision log {}: {e}", path.display()))
                })?)
            }
        };
        let (queue, lines) = mpsc::sync_channel::<Vec<u8>>(QUEUE);
        let writer = std::thread::Builder::new().name("aq-decision-log".into()).spawn(move || write_lines(out, lines))?;
        Ok(DecisionLog { queue: Some(queue), recent: Default::default(), log_allows, dropped, writer: Some(writer) })
    }

    /// Whether a decision with `verdict` is recorded: every one that is not an allow (kept
    /// among the recent ones), allows only when they are logged.
    pub fn wants(&self, verdict: &str) -> bool {
        verdict != "allow" || (self.queue.is_some() && self.log_allows)
    }

    /// Queues a line, and keeps it among the recent ones if it is not an allow.
    pub fn record(&self, line: &DecisionLine<'_>) {
        if line.verdict == "allow" {
            self.queue_line(line);
            return;
        }
        let bytes = line_bytes(line);
        {
            let mut recent = self.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(Arc::from(&bytes[..bytes.len() - 1]));
        }
        self.queue_bytes(bytes);
    }

    /// The latest decisions other than allows, newest first.
    pub fn recent(&self) -> Vec<serde_json::Value> {
        let recent: Vec<Arc<[u8]>> = self.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).iter().rev().cloned().collect();
        recent.iter().map(|line| serde_json::from_slice(line).expect("decision lines are JSON")).collect()
    }

    /// Queues the line of a policy's evaluation of `context` (callers check [`Self::wants`]).
    pub fn record_evaluation(&self, context: &aq_sdk::Context, evaluation: &crate::engine::Evaluation) {
        let reason = match &evaluation.decision.verdict {
            aq_sdk::Verdict::Allow => None,
            aq_sdk::Verdict::Deny(reason) => Some(reason.clone()),
            aq_sdk::Verdict::RequireApproval(rule) => Some(format!(
                "approvals of weight {} needed from {}",
                rule.threshold,
                rule.voters.iter().map(|v| format!("{} ({})", v.principal, v.weight)).collect::<Vec<_>>().join(", ")
            )),
        };
        let key = match context.ops.first() {
            Some(aq_sdk::Op::Put(p)) => &p.key.0,
            Some(aq_sdk::Op::DeleteRange(d)) => &d.key.0,
            None => &Vec::new(),
        };
        let transport = context.transport.tls_name.as_deref().or(context.transport.etcd_user.as_deref()).or(context
            .transport
            .kube_user
            .as_ref()
            .map(|u| u.username.as_str()));
        self.record(&DecisionLine {
            time: now_rfc3339(),
            scope: &context.scope.id,
            policy: evaluation.digest.to_hex(),
            verdict: evaluation.decision.verdict.kind(),
            reason: reason.as_deref(),
            principals: context.credentials.iter().map(|c| c.principal.as_str()).collect(),
            transport,
            key: String::from_utf8_lossy(key).into_owned(),
            ops: context.ops.len(),
            failure: evaluation.failure.as_ref().map(|f| f.kind()),
            annotations: &evaluation.decision.annotations,
        });
    }

    /// Queues an advice line; every advice is logged.
    pub fn record_advice(&self, line: &AdviceLine<'_>) {
        self.queue_line(line);
    }

    fn queue_line(&self, line: &impl Serialize) {
        if self.queue.is_some() {
            self.queue_bytes(line_bytes(line));
        }
    }

    fn queue_bytes(&self, bytes: Vec<u8>) {
        let Some(queue) = &self.queue else { return };
        match queue.try_send(bytes) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

/// A line as written: JSON and a newline.
fn line_bytes(line: &impl Serialize) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(line).expect("decision lines serialise");
    bytes.push(b'\n');
    bytes
}

/// The current time in RFC 3339, for decision lines.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// Writes queued lines, flushing whenever the queue runs empty.
fn write_lines(out: Box<dyn Write + Send>, lines: mpsc::Receiver<Vec<u8>>) {
    let mut out = std::io::BufWriter::new(out);
    while let Ok(line) = lines.recv() {
        let mut result = out.write_all(&line);
        while let Ok(line) = lines.try_recv() {
            result = result.and_then(|()| out.write_all(&line));
        }
        if let Err(e) = result.and_then(|()| out.flush()) {
            tracing::error!("cannot write the decision log: {e}");
        }
    }
}
