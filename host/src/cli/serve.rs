//! `aq serve`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::CliError;
use crate::config::Config;
use crate::gate::decisions::DecisionSink;
use crate::serve::{ServeOptions, describe, start};

/// Prints a status line; a closed standard output (`aq serve | head`) must not stop the server.
fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// `aq serve`'s flags.
#[derive(clap::Args)]
pub(super) struct ServeArgs {
    /// Layout of groups and scopes (TOML); default: the built-in Kubernetes layout.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where managed etcd data, compiled policies, the admin token and the decision log live.
    #[arg(long, default_value = "aq-data")]
    data_dir: PathBuf,
    /// Address of the etcd API.
    #[arg(long, default_value = "127.0.0.1:2379")]
    listen: SocketAddr,
    /// Address of the admin API.
    #[arg(long, default_value = "127.0.0.1:7070")]
    admin_listen: SocketAddr,
    /// The etcd binary for managed groups.
    #[arg(long, default_value = "etcd")]
    etcd: String,
    /// Where decision lines go: a file, `-` for standard output, or `off`; default
    /// `<data-dir>/decisions.log`.
    #[arg(long)]
    decision_log: Option<String>,
    /// Log allowed requests too, not only denies and approval requests.
    #[arg(long)]
    log_allows: bool,
    /// Serve the etcd API and the admin API over TLS with this certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// This replica's name; it is the principal `anchor:<name>` policies name as a voter.
    /// Default: `aq-` and the first 8 hex digits of the identity key in the data directory.
    #[arg(long)]
    name: Option<String>,
    /// The admin API URL other replicas use to reach this one, when --admin-listen is not it
    /// (behind NAT, or listening on 0.0.0.0).
    #[arg(long)]
    advertise_admin_url: Option<String>,
    /// How often this replica signs checkpoints of the lineage logs that grew (e.g. `1s`,
    /// `500ms`); exports and `POST /v1/lineage/{scope}/checkpoint` also sign one on demand.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    checkpoint_interval: std::time::Duration,
    /// Policy instances each scope keeps instantiated and initialised ahead of its requests,
    /// each serving one request; 0 instantiates on every request (less CPU when idle, more
    /// latency per write).
    #[arg(long, default_value_t = crate::engine::EngineConfig::default().warm_per_binding)]
    warm_instances: usize,
    /// How often the advising replica (one at a time, elected in the meta group) asks every
    /// scope's policy for advice on its load (e.g. `10s`).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    advise_interval: std::time::Duration,
    /// How long a token from the etcd API's Authenticate stays good, in seconds, once etcd
    /// auth is enabled through aq (`etcdctl auth enable`); clients then log in again.
    #[arg(long, default_value_t = crate::auth::DEFAULT_TOKEN_TTL.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    auth_token_ttl: u64,
}

pub(super) fn run(args: ServeArgs) -> Result<(), CliError> {
    let ServeArgs {
        config,
        data_dir,
        listen,
        admin_listen,
        etcd,
        decision_log,
        log_allows,
        tls_cert,
        tls_key,
        name,
        advertise_admin_url,
        checkpoint_interval,
        warm_instances,
        advise_interval,
        auth_token_ttl,
    } = args;
    let tls = tls_cert.zip(tls_key).map(|(cert, key)| crate::tls::TlsFiles { cert, key });
    let config = match config {
        Some(path) => Config::load(&path).map_err(CliError::Input)?,
        None => Config::default_layout(),
    };
    let decision_log = match decision_log {
        Some(text) => DecisionSink::parse(&text),
        None => DecisionSink::File(data_dir.join("decisions.log")),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Input(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async move {
        let options = ServeOptions {
            listen,
            admin_listen: Some(admin_listen),
            data_dir: data_dir.clone(),
            etcd_binary: etcd,
            decision_log,
            log_allows,
            tls,
            name,
            advertise_admin_url,
            checkpoint_interval,
            warm_instances,
            advise_interval,
            auth_token_ttl: std::time::Duration::from_secs(auth_token_ttl),
        };
        let mut running = start(config, options).await.map_err(CliError::Input)?;
        // Watch for signals before saying ready: a supervisor may stop aq as soon as it reads it.
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| CliError::Input(format!("cannot watch for SIGTERM: {e}")))?;
        let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(|e| CliError::Input(format!("cannot watch for SIGINT: {e}")))?;
        say(&describe(&running, &data_dir));
        say("aq: ready; stop with Ctrl-C\n");
        // On Ctrl-C or SIGTERM: stop serving, then the managed etcd processes stop as
        // `running` drops.
        tokio::select! {
            result = running.wait() => result.map_err(CliError::Input),
            _ = interrupt.recv() => {
                say("aq: stopping\n");
                running.stop().await;
                Ok(())
            }
            _ = terminate.recv() => {
                say("aq: stopping (SIGTERM)\n");
                running.stop().await;
                Ok(())
            }
        }
    })
}
