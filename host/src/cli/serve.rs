//! `aq serve`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::CliError;
use crate::config::Config;
use crate::serve::{ServeOptions, describe, start};

pub(super) fn run(config: Option<&Path>, data_dir: PathBuf, listen: SocketAddr, etcd: String) -> Result<(), CliError> {
    let config = match config {
        Some(path) => Config::load(path).map_err(CliError::Input)?,
        None => Config::default_layout(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Input(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async move {
        let options = ServeOptions { listen, data_dir: data_dir.clone(), etcd_binary: etcd };
        let mut running = start(config, options).await.map_err(CliError::Input)?;
        print!("{}", describe(&running, &data_dir));
        println!("aq: ready; stop with Ctrl-C");
        tokio::select! {
            result = running.wait() => result.map_err(CliError::Input),
            _ = tokio::signal::ctrl_c() => {
                println!("aq: stopping");
                running.stop().await;
                Ok(())
            }
        }
    })
}
