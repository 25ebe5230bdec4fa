//! The gate's Prometheus metrics. Names follow Prometheus conventions (`_total` counters,
//! `_seconds` histograms); the admin API serves them at `/metrics`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A metric's labels, as name-value pairs.
pub type Labels = Vec<(String, String)>;

fn evaluation_histogram() -> Histogram {
    // 1 µs to about 0.5 s.
    Histogram::new(exponential_buckets(1e-6, 2.0, 20))
}

/// Counters and histograms of the request path.
pub struct GateMetrics {
    registry: Registry,
    evaluations: Family<Labels, Counter>,
    evaluation_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    policy_failures: Family<Labels, Counter>,
    routed: Family<Labels, Counter>,
    guard_retries: Family<Labels, Counter>,
    backend_errors: Family<Labels, Counter>,
    swaps: Family<Labels, Counter>,
    advice: Family<Labels, Counter>,
    adaptations: Family<Labels, Counter>,
    groups_started: Counter,
    decision_lines_dropped: Counter,
    admission_reviews: Family<Labels, Counter>,
    admission_review_seconds: Histogram,
    /// Metrics under the names other software gives them, without aq's prefix: gRPC calls
    /// handled, as go-grpc-prometheus counts them in etcd.
    unprefixed: Registry,
    grpc_handled: Family<Labels, Counter>,
}

fn scope(id: &str) -> Labels {
    vec![("scope".to_string(), id.to_string())]
}

fn adaptation(id: &str, action: &str, outcome: &str) -> Labels {
    vec![("scope".to_string(), id.to_string()), ("action".to_string(), action.to_string()), ("outcome".to_string(), outcome.to_string())]
}

impl Default for GateMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("aq");
        let evaluations = Family::<Labels, Counter>::default();
        let evaluation_seconds = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(evaluation_histogram);
        let policy_failures = Family::<Labels, Counter>::default();
        let routed = Family::<Labels, Counter>::default();
        let guard_retries = Family::<Labels, Counter>::default();
        let backend_errors = Family::<Labels, Counter>::default();
        let swaps = Family::<Labels, Counter>::default();
        let advice = Family::<Labels, Counter>::default();
        let adaptations = Family::<Labels, Counter>::default();
        let groups_started = Counter::default();
        let decision_lines_dropped = Counter::default();
        let admission_reviews = Family::<Labels, Counter>::default();
        let admission_review_seconds = evaluation_histogram();
        registry.register("policy_evaluations", "Policy evaluations by scope and verdict", evaluations.clone());
        registry.register(
            "policy_evaluation_seconds",
            "Time to evaluate a policy, a fresh instance included",
            evaluation_seconds.clone(),
        );
        registry.register("policy_failures", "Policy failures by scope and kind", policy_failures.clone());
        registry.register("routed_ops", "Requests routed to a scope, by kind (read, write)", routed.clone());
        registry.register("guard_retries", "Writes evaluated again because a policy read or a nonce guard moved before they landed", guard_retries.clone());
        registry.register("backend_errors", "Errors returned by etcd groups", backend_errors.clone());
        registry.register("policy_swaps", "Changes of a scope's active policy binding on this replica", swaps.clone());
        registry.register(
            "scope_advice",
            "Answers of scopes' policies to advise (keep, split, merge, failed), on the advising replica",
            advice.clone(),
        );
        registry.register(
            "scope_adaptations",
            "What the advising replica did with split and merge advice, by action (split, merge) and outcome (started, held, failed)",
            adaptations.clone(),
        );
        registry.register("groups_started", "Managed etcd groups started at run time for splits", groups_started.clone());
        registry.register(
            "decision_lines_dropped",
            "Decision log lines dropped because the log writer fell behind",
            decision_lines_dropped.clone(),
        );
        registry.register(
            "admission_reviews",
            "Kubernetes admission reviews answered, by operation and whether they were allowed",
            admission_reviews.clone(),
        );
        registry.register(
            "admission_review_seconds",
            "Time to answer an admission review, from its parsed body to the answer",
            admission_review_seconds.clone(),
        );
        let mut unprefixed = Registry::default();
        let grpc_handled = Family::<Labels, Counter>::default();
        unprefixed.register(
            "grpc_server_handled",
            "gRPC calls of the etcd API completed, by type, service, method and status code, as etcd counts them",
            grpc_handled.clone(),
        );
        GateMetrics {
            registry,
            unprefixed,
            grpc_handled,
            evaluations,
            evaluation_seconds,
            policy_failures,
            routed,
            guard_retries,
            backend_errors,
            swaps,
            advice,
            adaptations,
            groups_started,
            decision_lines_dropped,
            admission_reviews,
            admission_review_seconds,
        }
    }
}

impl GateMetrics {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.unprefixed).expect("writing to a String");
        // One exposition: the first registry's end marker goes.
        if out.ends_with("# EOF\n") {
            out.truncate(out.len() - "# EOF\n".len());
        }
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }

    /// `grpc_server_handled_total`, which the etcd API's server layer counts into.
    pub fn grpc_handled(&self) -> Family<Labels, Counter> {
        self.grpc_handled.clone()
    }

    pub(super) fn evaluated(&self, scope_id: &str, verdict: &str, seconds: f64) {
        let mut labels = scope(scope_id);
        self.evaluation_seconds.get_or_create(&labels).observe(seconds);
        labels.push(("verdict".to_string(), verdict.to_string()));
        self.evaluations.get_or_create(&labels).inc();
    }

    /// Counts an admission review answered in `seconds`.
    pub fn admission_reviewed(&self, operation: &str, allowed: bool, seconds: f64) {
        let labels = vec![("operation".to_string(), operation.to_string()), ("allowed".to_string(), allowed.to_string())];
        self.admission_reviews.get_or_create(&labels).inc();
        self.admission_review_seconds.observe(seconds);
    }

    /// Admission reviews of `operation` answered so far with `allowed`.
    pub fn admission_reviews(&self, operation: &str, allowed: bool) -> u64 {
        let labels = vec![("operation".to_string(), operation.to_string()), ("allowed".to_string(), allowed.to_string())];
        self.admission_reviews.get_or_create(&labels).get()
    }

    pub(super) fn policy_failed(&self, scope_id: &str, kind: &str) {
        let mut labels = scope(scope_id);
        labels.push(("kind".to_string(), kind.to_string()));
        self.policy_failures.get_or_create(&labels).inc();
    }

    pub(super) fn routed(&self, scope_id: &str, kind: &str) {
        let mut labels = scope(scope_id);
        labels.push(("kind".to_string(), kind.to_string()));
        self.routed.get_or_create(&labels).inc();
    }

    pub(super) fn guard_retry(&self, scope_id: &str) {
        self.guard_retries.get_or_create(&scope(scope_id)).inc();
    }

    pub(super) fn backend_error(&self, group: &str) {
        self.backend_errors.get_or_create(&vec![("group".to_string(), group.to_string())]).inc();
    }

    /// The counter the decision log increments for each line it drops.
    pub fn decision_lines_dropped(&self) -> Counter {
        self.decision_lines_dropped.clone()
    }

    /// Counts a change of a scope's active binding.
    pub fn swapped(&self, scope_id: &str) {
        self.swaps.get_or_create(&scope(scope_id)).inc();
    }

    /// Counts a policy's answer to `advise` (`keep`, `split`, `merge`, `failed`).
    pub fn advised(&self, scope_id: &str, advice: &str) {
        let mut labels = scope(scope_id);
        labels.push(("advice".to_string(), advice.to_string()));
        self.advice.get_or_create(&labels).inc();
    }

    /// Counts what became of a scope's `action` advice (`split`, `merge`): `outcome` is
    /// `started`, `held` or `failed`.
    pub fn adapted(&self, scope_id: &str, action: &str, outcome: &str) {
        self.adaptations.get_or_create(&adaptation(scope_id, action, outcome)).inc();
    }

    /// Counts a group started at run time.
    pub fn group_started(&self) {
        self.groups_started.inc();
    }

    /// Groups started at run time by this replica.
    pub fn groups_started(&self) -> u64 {
        self.groups_started.get()
    }

    /// How often a scope's `action` advice had `outcome`, on this replica.
    pub fn adaptations(&self, scope_id: &str, action: &str, outcome: &str) -> u64 {
        self.adaptations.get_or_create(&adaptation(scope_id, action, outcome)).get()
    }

    /// Answers `advice` of a scope's policy so far, on this replica.
    pub fn advice(&self, scope_id: &str, advice: &str) -> u64 {
        let mut labels = scope(scope_id);
        labels.push(("advice".to_string(), advice.to_string()));
        self.advice.get_or_create(&labels).get()
    }

    /// Binding changes of a scope so far.
    pub fn swaps(&self, scope_id: &str) -> u64 {
        self.swaps.get_or_create(&scope(scope_id)).get()
    }

    /// Evaluations of a scope with `verdict` so far.
    pub fn evaluations(&self, scope_id: &str, verdict: &str) -> u64 {
        let mut labels = scope(scope_id);
        labels.push(("verdict".to_string(), verdict.to_string()));
        self.evaluations.get_or_create(&labels).get()
    }

    /// Fence retries of a scope so far.
    pub fn guard_retries(&self, scope_id: &str) -> u64 {
        self.guard_retries.get_or_create(&scope(scope_id)).get()
    }

    /// Requests of `kind` (`read`, `write`) routed to a scope so far.
    pub fn routed_count(&self, scope_id: &str, kind: &str) -> u64 {
        let mut labels = scope(scope_id);
        labels.push(("kind".to_string(), kind.to_string()));
        self.routed.get_or_create(&labels).get()
    }
}

#[cfg(test)]
mod tests {
    use super::GateMetrics;

    /// Metric family names in an exposition (`# TYPE <name> <type>`), with a counter's `_total`.
    fn families(exposition: &str) -> std::collections::BTreeSet<String> {
        exposition
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .filter_map(|rest| rest.split_once(' '))
            .map(|(name, kind)| if kind == "counter" { format!("{name}_total") } else { name.to_string() })
            .collect()
    }

    /// `aq_…` and `grpc_…` names a text mentions, a histogram's series folded to its family.
    fn mentioned(text: &str) -> std::collections::BTreeSet<String> {
        let mut names = std::collections::BTreeSet::new();
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("aq_") || word.starts_with("grpc_server_") {
                let name = word.strip_suffix("_bucket").or_else(|| word.strip_suffix("_count")).unwrap_or(word);
                names.insert(name.to_string());
            }
        }
        names
    }

    #[test]
    fn the_readme_table_and_the_grafana_dashboard_name_exactly_the_metrics_aq_serves() {
        // A family shows in the exposition once it has a series: give each one.
        let metrics = GateMetrics::default();
        metrics.evaluated("s", "allow", 1e-6);
        metrics.admission_reviewed("CREATE", true, 1e-3);
        metrics.policy_failed("s", "timeout");
        metrics.routed("s", "write");
        metrics.guard_retry("s");
        metrics.backend_error("main");
        metrics.swapped("s");
        metrics.advised("s", "keep");
        metrics.adapted("s", "split", "started");
        metrics.group_started();
        metrics.grpc_handled().get_or_create(&vec![("grpc_method".to_string(), "Put".to_string())]).inc();
        let served = families(&metrics.encode());
        assert!(served.contains("grpc_server_handled_total") && served.contains("aq_policy_evaluations_total"), "{served:?}");
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
        let table: String = readme.lines().filter(|l| l.starts_with("| `aq_") || l.starts_with("| `grpc_")).collect::<Vec<_>>().join("\n");
        assert_eq!(mentioned(&table), served, "README's metrics table");
        let dashboard = std::fs::read_to_string(format!("{root}/examples/grafana/aq-dashboard.json")).unwrap();
        let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
        let exprs: Vec<String> = dashboard["panels"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_string()))
            .collect();
        let used = mentioned(&exprs.join("\n"));
        assert_eq!(used, served, "the dashboard charts every metric, and only those aq serves");
    }
}
