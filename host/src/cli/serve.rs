//! `aq serve`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::CliError;
use crate::config::Config;
use crate::serve::{ServeOptions, describe, start};

/// Prints a status line; a closed standard output (`aq serve | head`) must not stop the server.
fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

pub(super) fn run(
    config: Option<&Path>,
    data_dir: PathBuf,
    listen: SocketAddr,
    admin_listen: SocketAddr,
    etcd: String,
) -> Result<(), CliError> {
    let config = match config {
        Some(path) => Config::load(path).map_err(CliError::Input)?,
        None => Config::default_layout(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Input(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async move {
        let options = ServeOptions { listen, admin_listen: Some(admin_listen), data_dir: data_dir.clone(), etcd_binary: etcd };
        let mut running = start(config, options).await.map_err(CliError::Input)?;
        say(&describe(&running, &data_dir));
        say("aq: ready; stop with Ctrl-C\n");
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| CliError::Input(format!("cannot watch for SIGTERM: {e}")))?;
        // On Ctrl-C or SIGTERM: stop serving, then the managed etcd processes stop as
        // `running` drops.
        tokio::select! {
            result = running.wait() => result.map_err(CliError::Input),
            _ = tokio::signal::ctrl_c() => {
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
