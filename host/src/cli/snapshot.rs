//! `aq snapshot save|verify|restore`: aq's backup archive (`crate::snapshot`), saved through
//! aq's own etcd API, checked offline, and rebuilt into a data directory.

use std::io::Write;
use std::path::Path;

use super::CliError;

/// Prints what a verified archive holds.
fn describe(manifest: &crate::snapshot::Manifest) {
    let bytes: u64 = manifest.groups.iter().map(|g| g.bytes).sum();
    let epoch = manifest.layout.as_ref().map(|l| l.epoch.to_string()).unwrap_or_else(|| "-".into());
    println!("{} groups, {bytes} bytes, layout epoch {epoch}, home {}", manifest.groups.len(), manifest.home);
    for group in &manifest.groups {
        let revision = if group.revision_from == group.revision_to {
            group.revision_to.to_string()
        } else {
            format!("{}..{}", group.revision_from, group.revision_to)
        };
        println!("  {:<12} revision {revision:<10} {:>10} bytes  blake3 {}", group.name, group.bytes, &group.blake3[..16]);
    }
}

/// `aq snapshot verify`.
pub(super) fn verify(path: &Path, json: bool) -> Result<(), CliError> {
    if !path.exists() {
        return Err(CliError::Input(format!("{} does not exist", path.display())));
    }
    match crate::snapshot::verify(path) {
        Ok(manifest) if json => {
            println!("{}", serde_json::to_string_pretty(&manifest).expect("JSON"));
            Ok(())
        }
        Ok(manifest) => {
            print!("ok: {}: ", path.display());
            describe(&manifest);
            Ok(())
        }
        Err(e) => {
            println!("FAILED: {}: {e}", path.display());
            Err(CliError::Check)
        }
    }
}

/// `aq snapshot save`.
pub(super) fn save(path: &Path, endpoints: &str, user: Option<&str>) -> Result<(), CliError> {
    let options = match user {
        Some(user) => {
            let (name, password) =
                user.split_once(':').ok_or_else(|| CliError::Input("--user takes name:password".into()))?;
            Some(etcd_client::ConnectOptions::new().with_user(name, password))
        }
        None => None,
    };
    let partial = path.with_extension("part");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Input(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async {
        let endpoints: Vec<String> = endpoints.split(',').map(str::to_string).collect();
        let mut client = etcd_client::Client::connect(&endpoints, options)
            .await
            .map_err(|e| CliError::Input(format!("cannot reach aq at {}: {e}", endpoints.join(","))))?;
        let mut stream = client.snapshot().await.map_err(|e| CliError::Refused(format!("aq refused the snapshot: {e}")))?;
        let mut file = std::fs::File::create(&partial)
            .map_err(|e| CliError::Input(format!("cannot write {}: {e}", partial.display())))?;
        // On a terminal, a bar of the bytes received; nothing otherwise.
        let bar = super::progress_bar(0, "snapshot [{bar:30}] {bytes}/{total_bytes}, {bytes_per_sec}, {elapsed}");
        loop {
            let message = match stream.message().await {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(e) => {
                    drop(file);
                    let _ = std::fs::remove_file(&partial);
                    return Err(CliError::Refused(format!("the snapshot broke off: {e}")));
                }
            };
            file.write_all(message.blob()).map_err(|e| CliError::Input(format!("cannot write {}: {e}", partial.display())))?;
            if let Some(bar) = &bar {
                if bar.length() == Some(0) {
                    bar.set_length(message.blob().len() as u64 + message.remaining_bytes());
                }
                bar.inc(message.blob().len() as u64);
            }
        }
        if let Some(bar) = &bar {
            bar.finish_and_clear();
        }
        file.sync_all().map_err(|e| CliError::Input(format!("cannot write {}: {e}", partial.display())))?;
        Ok(())
    })?;
    match crate::snapshot::verify(&partial) {
        Ok(manifest) => {
            std::fs::rename(&partial, path).map_err(|e| CliError::Input(format!("cannot move it to {}: {e}", path.display())))?;
            print!("snapshot saved at {}: ", path.display());
            describe(&manifest);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(CliError::Refused(format!("the archive aq sent does not verify: {e}")))
        }
    }
}

/// `aq snapshot restore`.
pub(super) fn restore(path: &Path, data_dir: &Path, etcdctl: &str) -> Result<(), CliError> {
    if !path.exists() {
        return Err(CliError::Input(format!("{} does not exist", path.display())));
    }
    // One call per group to etcdctl: on a terminal, a spinner with the time it takes.
    let spinner = super::progress_bar(0, "{spinner} restoring {msg}, {elapsed}");
    if let Some(spinner) = &spinner {
        spinner.set_message(path.display().to_string());
        spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    }
    let restored = crate::snapshot::restore(path, data_dir, etcdctl);
    if let Some(spinner) = spinner {
        spinner.finish_and_clear();
    }
    let restored = restored.map_err(CliError::Refused)?;
    for group in &restored.managed {
        println!("group {group}: restored under {}", crate::adapt::groups::group_dir(data_dir, group).display());
    }
    for (group, db) in &restored.external {
        println!(
            "group {group}: aq does not manage it; restore {} into its cluster (etcdctl snapshot restore), then start aq",
            db.display()
        );
    }
    println!("start aq with: aq serve --data-dir {} (and the same --config)", data_dir.display());
    Ok(())
}
