//! `aq bench admission`: Kubernetes AdmissionReviews through aq's validating webhook over HTTPS
//! (a self-signed certificate, a `webhook` token, kept-alive connections), as kube-apiserver
//! sends them, at one and several concurrent clients: the round trip's p50 and p99.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::CliError;
use super::bench_put::{RemoveOnDrop, admin_token, spawn_serve};
use crate::backend::managed::EtcdProcess;

const WEBHOOK_TOKEN: &str = "aq_bench_webhook_token";

/// A pod creation in namespace `team-<client>`, as kube-apiserver reviews it.
fn review(uid: &str, client: usize) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "name": format!("web-{uid}"),
            "namespace": format!("team-{client}"),
            "operation": "CREATE",
            "userInfo": { "username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts", "system:authenticated"] },
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": format!("web-{uid}"), "namespace": format!("team-{client}"), "labels": { "app": "web" } },
                "spec": { "containers": [ { "name": "web", "image": "nginx:1.27", "ports": [ { "containerPort": 80 } ] } ] }
            },
            "oldObject": null,
            "dryRun": false
        }
    })
}

pub(super) fn admission(reviews: usize, clients: &[usize], etcd_binary: &str) -> Result<(), CliError> {
    if reviews == 0 || clients.is_empty() || clients.contains(&0) {
        return Err(CliError::Input("--reviews must be at least 1 and --clients positive counts, e.g. 1,16".into()));
    }
    let dir = std::env::temp_dir().join(format!("aq-bench-admission-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(dir.clone());
    let etcd = EtcdProcess::spawn(etcd_binary, "bench", &dir.join("etcd")).map_err(|e| CliError::Input(e.to_string()))?;

    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
        .map_err(|e| CliError::Input(format!("cannot make a certificate: {e}")))?;
    let (cert, key) = (dir.join("aq.pem"), dir.join("aq-key.pem"));
    std::fs::write(&cert, certified.cert.pem())?;
    std::fs::write(&key, certified.key_pair.serialize_pem())?;
    let layout_path = dir.join("layout.toml");
    std::fs::write(
        &layout_path,
        format!(
            "{}\n[[admin.tokens]]\nname = \"kube-apiserver\"\nrole = \"webhook\"\nhash = {:?}\n",
            super::bench_put::layout(etcd.client_url()),
            crate::admin::auth::hash_token(WEBHOOK_TOKEN)
        ),
    )?;
    let extra = ["--tls-cert".into(), cert.clone().into_os_string(), "--tls-key".into(), key.into_os_string()];
    let (_aq, _, admin_port, data) = spawn_serve(&dir, "aq", &layout_path, &extra)?;
    let tls = crate::tls::client_roots(&cert).map_err(CliError::Input)?;
    let new_agent = || -> ureq::Agent {
        ureq::Agent::config_builder().http_status_as_error(false).tls_config(tls.clone()).build().into()
    };
    let agent = new_agent();
    let base = format!("https://127.0.0.1:{admin_port}");
    wait_healthy(&agent, &base)?;
    admin_token("aq", &data)?;
    let url = format!("{base}/v1/admission/validate");

    println!("{reviews} AdmissionReviews (a pod CREATE, decided by the registry scope's quota policy) per client count,");
    println!("over HTTPS with a webhook token, each client one kept-alive connection sending one review at a time");
    println!("{:>8} {:>10} {:>10} {:>10} {:>12}", "clients", "p50", "p99", "max", "reviews/s");
    for &count in clients {
        // A short warm-up, then the measured run.
        let _ = measure(&new_agent, &url, count, (count * 20).min(reviews))?;
        let (latencies, elapsed) = measure(&new_agent, &url, count, reviews)?;
        let p = |q: f64| super::bench::percentile(&latencies, q);
        println!(
            "{count:>8} {:>7.2} ms {:>7.2} ms {:>7.2} ms {:>12.0}",
            p(0.5).as_secs_f64() * 1e3,
            p(0.99).as_secs_f64() * 1e3,
            latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
            latencies.len() as f64 / elapsed.as_secs_f64(),
        );
    }
    Ok(())
}

/// Waits (up to 20 s) until aq's admin API answers `/healthz` over HTTPS.
fn wait_healthy(agent: &ureq::Agent, base: &str) -> Result<(), CliError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if agent.get(&format!("{base}/healthz")).call().is_ok_and(|r| r.status() == 200) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(CliError::Input("aq's admin API did not answer over HTTPS within 20 s".into()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `reviews` reviews spread over `clients` threads; every round trip's time, sorted, and the
/// whole run's.
fn measure(
    new_agent: &(dyn Fn() -> ureq::Agent + Sync),
    url: &str,
    clients: usize,
    reviews: usize,
) -> Result<(Vec<Duration>, Duration), CliError> {
    let started = Instant::now();
    let results: Vec<Result<Vec<Duration>, CliError>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..clients)
            .map(|client| {
                // Each client an agent of its own: its own connection.
                let agent = new_agent();
                let share = reviews / clients + usize::from(client < reviews % clients);
                s.spawn(move || -> Result<Vec<Duration>, CliError> {
                    let mut times = Vec::with_capacity(share);
                    for n in 0..share {
                        let body = serde_json::to_vec(&review(&format!("{client}-{n}"), client)).expect("reviews serialise");
                        let sent = Instant::now();
                        let mut response = agent
                            .post(url)
                            .header("authorization", &format!("Bearer {WEBHOOK_TOKEN}"))
                            .header("content-type", "application/json")
                            .send(&body[..])
                            .map_err(|e| CliError::Input(format!("review {client}-{n}: {e}")))?;
                        let text = response.body_mut().read_to_string().map_err(|e| CliError::Input(e.to_string()))?;
                        times.push(sent.elapsed());
                        let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                        if response.status() != 200 || answer["response"]["allowed"] != true {
                            return Err(CliError::Input(format!("review {client}-{n} was not allowed: {} {text}", response.status())));
                        }
                    }
                    Ok(times)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or_else(|_| Err(CliError::Input("a client panicked".into())))).collect()
    });
    let elapsed = started.elapsed();
    let mut latencies = Vec::with_capacity(reviews);
    for result in results {
        latencies.extend(result?);
    }
    latencies.sort();
    Ok((latencies, elapsed))
}
