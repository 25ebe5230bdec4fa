//! The `aq` command line. Exit codes: 0 success, 1 a check failed (fixture mismatch, a dry run
//! not allowed) or the admin API refused, 2 bad input (missing file, not a component, wrong
//! world, bad arguments, aq unreachable).

mod bench;
mod bench_admission;
mod bench_critical;
mod bench_put;
mod bench_soak;
mod bench_split;
mod bench_swap;
mod policy;
mod remote;
mod scaffold;
mod serve;
mod snapshot;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// aq: govern etcd by scope with sandboxed WebAssembly policies.
#[derive(Parser)]
#[command(name = "aq", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the etcd API, governing every mutation with its scope's policy.
    Serve(serve::ServeArgs),
    /// Work with policy components.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The scopes of a running aq.
    #[command(subcommand)]
    Scopes(ScopesCommand),
    /// Live moves of scopes between groups.
    #[command(subcommand)]
    Migrations(MigrationsCommand),
    /// The etcd groups of a running aq.
    #[command(subcommand)]
    Groups(GroupsCommand),
    /// Dry-run a mutation against a scope's active policy on a running aq; exit 1 unless it
    /// is allowed.
    Eval {
        /// The scope.
        scope: String,
        /// A put, as key=value (repeatable).
        #[arg(long = "put")]
        puts: Vec<String>,
        /// A delete of a key (repeatable).
        #[arg(long = "delete")]
        deletes: Vec<String>,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Make a new admin API token and print the configuration that accepts it.
    Token {
        /// Who will hold it.
        #[arg(long)]
        name: String,
        /// webhook, reader, operator or admin.
        #[arg(long, default_value = "operator")]
        role: String,
    },
    /// ed25519 keys (principals, policy publishers).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Principals: who can sign requests and approvals.
    #[command(subcommand)]
    Principals(PrincipalsCommand),
    /// Writes waiting for approvals.
    #[command(subcommand)]
    Proposals(ProposalsCommand),
    /// Approve a proposal: check its digest against its request, sign it, send it.
    Approve {
        /// The proposal id.
        id: String,
        /// The approver's private key.
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Reject a pending proposal.
    Reject {
        /// The proposal id.
        id: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Lineage: export a scope's records and check an export offline.
    #[command(subcommand)]
    Lineage(LineageCommand),
    /// Backups: one archive of every etcd group, the meta records and the scope layout.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Put a key through aq, signed with each --key.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
        #[command(flatten)]
        signing: SigningArgs,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Delete a key through aq, signed with each --key.
    Del {
        /// The key.
        key: String,
        #[command(flatten)]
        signing: SigningArgs,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Measure aq.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum ScopesCommand {
    /// The scope tree with bindings and counters.
    Ls {
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Move a scope's keys live onto another group; follows the move to its end unless
    /// `--detach`. Exit 0 when it is done, 1 when it rolled back or left an error.
    Move {
        /// The scope.
        scope: String,
        /// The group it moves to.
        #[arg(long)]
        to: String,
        /// Print the migration's id and return at once.
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Split a scope at a key: a new scope takes the keys from there to the scope's end, with
    /// the same policy, and moves live to `--to` when given.
    Split {
        /// The scope.
        scope: String,
        /// The new scope's first key.
        #[arg(long)]
        at: String,
        /// The group the new scope moves to; default: it stays on the scope's group.
        #[arg(long)]
        to: Option<String>,
        /// The new scope's id; default `<scope>-<n>`.
        #[arg(long)]
        id: Option<String>,
        /// Return once the move has started.
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Merge a scope back into the scope holding it, which governs its keys from then on;
    /// they move live onto that scope's group first when they are elsewhere.
    Merge {
        /// The scope.
        scope: String,
        /// Return once the move has started.
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        remote: remote::Remote,
    },
}

#[derive(Subcommand)]
enum GroupsCommand {
    /// Every group, its endpoints and scopes, and whether aq started it for a split.
    Ls {
        #[command(flatten)]
        remote: remote::Remote,
    },
}

#[derive(Subcommand)]
enum MigrationsCommand {
    /// Every migration, oldest first.
    Ls {
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// One migration's record.
    Show {
        /// Its id.
        id: String,
        #[command(flatten)]
        remote: remote::Remote,
    },
}

/// How `aq put` and `aq del` sign and where they send.
#[derive(clap::Args)]
pub(crate) struct SigningArgs {
    /// A private key (from `aq keys gen`); repeat to sign with several.
    #[arg(long = "key", required = true)]
    pub(crate) keys: Vec<PathBuf>,
    /// aq's etcd API.
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    pub(crate) endpoint: String,
    /// The scope owning the key; default: looked up through the admin API.
    #[arg(long)]
    pub(crate) scope: Option<String>,
    /// When approvals are needed, wait this many seconds for the proposal's outcome.
    #[arg(long)]
    pub(crate) wait: Option<f64>,
}

#[derive(Subcommand)]
enum LineageCommand {
    /// Export a scope's lineage (a fresh checkpoint is signed first).
    Export {
        /// The scope.
        scope: String,
        /// Write here instead of standard output.
        #[arg(long, short)]
        out: Option<PathBuf>,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Check an export offline: the chain of records, checkpoints, the root log. Exit 1 naming
    /// the record when it does not verify.
    Verify {
        /// The export file.
        export: PathBuf,
        /// Require checkpoints signed by this public key (hex or file); repeatable.
        #[arg(long = "trust")]
        trusted: Vec<String>,
    },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Save an archive through aq's etcd API (the Snapshot call `etcdctl snapshot save` makes
    /// too); it is verified once written.
    Save {
        /// Where to write it (written beside it first, then renamed).
        path: PathBuf,
        /// aq's etcd API.
        #[arg(long, default_value = "127.0.0.1:2379")]
        endpoints: String,
        /// `name:password` of an etcd user with the root role, once etcd auth is on in aq.
        #[arg(long)]
        user: Option<String>,
    },
    /// Rebuild a data directory from an archive (verified first): each group aq managed gets
    /// its etcd data and credentials back; `aq serve --data-dir <dir>` then starts from it.
    Restore {
        /// The archive.
        path: PathBuf,
        /// The data directory to rebuild; it must hold no etcd data yet.
        #[arg(long)]
        data_dir: PathBuf,
        /// Debian's etcdctl, which restores each group's etcd snapshot.
        #[arg(long, default_value = "etcdctl")]
        etcdctl: String,
    },
    /// Check an archive offline: its manifest, each group's size and digest, each etcd
    /// snapshot's own checksum. Exit 1 naming what is wrong.
    Verify {
        /// The archive.
        path: PathBuf,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ProposalsCommand {
    /// Pending proposals (all of them with --all).
    Ls {
        /// Include committed, expired, rejected and void ones.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        remote: remote::Remote,
    },
}

#[derive(Subcommand)]
enum PrincipalsCommand {
    /// Add a principal (or replace one with the same id).
    Add {
        /// Its id.
        id: String,
        /// A public key, hex or a `.pub` file; repeatable.
        #[arg(long = "key", required = true)]
        keys: Vec<String>,
        /// A role; repeatable.
        #[arg(long = "role")]
        roles: Vec<String>,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// List principals.
    Ls {
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Remove a principal.
    Rm {
        /// Its id.
        id: String,
        #[command(flatten)]
        remote: remote::Remote,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Write a new key pair: the private key to FILE (mode 0600), the public key to FILE.pub.
    Gen {
        /// Where the private key goes.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Create a policy project (source, fixtures, configuration, build script) to start from.
    New {
        /// The language to write it in.
        #[arg(long, value_enum)]
        lang: scaffold::Language,
        /// The directory to create; its name is the policy's.
        dir: PathBuf,
        /// aq's sdk/ directory, for Rust projects; default: the one aq was built from.
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Evaluate fixture files on a component and compare with their expected outcomes.
    Test {
        /// The component: a `.wasm` file, or `builtin:<name>`.
        component: String,
        /// The binding's configuration (JSON file); default `{}`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Fixture files or directories of them.
        #[arg(required = true)]
        fixtures: Vec<PathBuf>,
    },
    /// Print a component's digest, world, exports and imports.
    Inspect {
        /// The component: a `.wasm` file, or `builtin:<name>`.
        component: String,
    },
    /// Store a component on a running aq (validated there first).
    Push {
        /// The component: a `.wasm` file, or `builtin:<name>`.
        component: String,
        /// Sign it with this ed25519 private key (from `aq keys gen`).
        #[arg(long)]
        sign_key: Option<PathBuf>,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// List stored policies and where they are bound.
    Ls {
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Bind a stored policy to a scope (hot swap on every replica).
    Bind {
        /// The scope.
        scope: String,
        /// The stored policy's digest.
        digest: String,
        /// The policy's configuration: JSON text or @file; default {}.
        #[arg(long)]
        config: Option<String>,
        /// closed or open; default: the scope's current.
        #[arg(long)]
        fail_mode: Option<String>,
        /// CPU deadline per evaluation; default: the scope's current.
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Memory cap per evaluation; default: the scope's current.
        #[arg(long)]
        memory_mib: Option<u64>,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Return a scope to its previous binding.
    Rollback {
        /// The scope.
        scope: String,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Delete a stored policy no scope binds.
    Rm {
        /// The policy's digest.
        digest: String,
        #[command(flatten)]
        remote: remote::Remote,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Evaluation latency of each built-in policy (and of components given with --component),
    /// a fresh instance per call.
    Policy {
        /// Evaluations per policy.
        #[arg(long, default_value_t = 20_000)]
        iterations: u32,
        /// Also measure a component: NAME=PATH (repeatable), bound with --component-config.
        #[arg(long = "component")]
        components: Vec<String>,
        /// The configuration (JSON file) the --component policies are bound with; default {}.
        #[arg(long)]
        component_config: Option<PathBuf>,
    },
    /// Kubernetes AdmissionReviews through aq's webhook over HTTPS: round-trip p50 and p99.
    Admission {
        /// Reviews per client count.
        #[arg(long, default_value_t = 2000)]
        reviews: usize,
        /// Concurrent clients, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        clients: Vec<usize>,
        /// The etcd binary.
        #[arg(long, default_value = "etcd")]
        etcd: String,
    },
    /// Puts through aq, directly to etcd and through etcd's grpc-proxy, in one run.
    Put {
        /// Seconds per measured configuration.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Concurrent clients, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,64")]
        clients: Vec<usize>,
        /// The etcd binary.
        #[arg(long, default_value = "etcd")]
        etcd: String,
        /// `put`: plain puts; `kube`: what kube-apiserver sends, a create Txn (compare
        /// create_revision = 0) then update Txns (compare mod_revision), reading the key on a
        /// failed compare.
        #[arg(long, default_value = "put", value_parser = ["put", "kube"])]
        workload: String,
        /// Pin etcd, the proxy in between (aq or grpc-proxy) and the clients to cores of their
        /// own (needs at least 3 cores).
        #[arg(long)]
        pin: bool,
    },
    /// A live split of a loaded scope onto another etcd group with writers running: phases,
    /// keys copied per second, the longest write, lost writes, throughput before and after.
    Split {
        /// Keys in the scope; its upper half moves.
        #[arg(long, default_value_t = 100_000)]
        keys: usize,
        /// Writers running through the split.
        #[arg(long, default_value_t = 32)]
        writers: usize,
        /// Seconds per throughput measurement.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// The etcd binary.
        #[arg(long, default_value = "etcd")]
        etcd: String,
    },
    /// Critical-scope puts (two signatures, approval rule, full lineage) against direct etcd.
    Critical {
        /// Seconds per measured configuration.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Concurrent clients.
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// The etcd binary.
        #[arg(long, default_value = "etcd")]
        etcd: String,
    },
    /// aq with managed etcd under mixed Kubernetes-shaped load for minutes, a managed etcd
    /// killed now and then: throughput, p99, errors, aq's memory and descriptors over time;
    /// exit 1 when memory or descriptors keep growing instead of levelling off.
    Soak {
        /// How long to run, in minutes.
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Concurrent clients.
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Seconds between faults (a managed group's etcd killed, in turn; with --members 3
        /// or 5, one member of it).
        #[arg(long, default_value_t = 60)]
        fault_every: u64,
        /// Members of each managed etcd group (1, 3 or 5).
        #[arg(long, default_value_t = 1)]
        members: usize,
        /// The etcd binary.
        #[arg(long, default_value = "etcd")]
        etcd: String,
    },
    /// How fast a policy swap on one replica is enforced by another, under write load.
    Swap {
        /// Swaps to make.
        #[arg(long, default_value_t = 100)]
        swaps: usize,
        /// Writers per replica.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// The etcd binary.
        #[arg(long, default_value = "etcd")]
        etcd: String,
    },
}

/// A failure of a command, with the exit code it maps to.
#[derive(Debug)]
pub(crate) enum CliError {
    /// Bad input: exit 2.
    Input(String),
    /// A check failed: exit 1 (details already printed).
    Check,
    /// The admin API refused: exit 1 with its reason.
    Refused(String),
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::Input(e.to_string())
    }
}

/// Runs the command line.
/// A progress bar on stderr with `template` over `len` steps, when stderr is a terminal; `None`
/// otherwise (a pipe, a file, CI), so nothing but the results is printed there.
pub(super) fn progress_bar(len: u64, template: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal().then(|| {
        let style = indicatif::ProgressStyle::with_template(template).expect("a valid template").progress_chars("=> ");
        indicatif::ProgressBar::new(len).with_style(style)
    })
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AQ_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Policy(PolicyCommand::Test { component, config, fixtures }) => {
            policy::test(&component, config.as_deref(), &fixtures)
        }
        Command::Policy(PolicyCommand::Inspect { component }) => policy::inspect(&component),
        Command::Policy(PolicyCommand::New { lang, dir, sdk }) => scaffold::new_policy(lang, &dir, sdk.as_deref()),
        Command::Policy(PolicyCommand::Push { component, sign_key, remote }) => {
            remote::push(&remote, &component, sign_key.as_deref())
        }
        Command::Policy(PolicyCommand::Ls { remote }) => remote::list_policies(&remote),
        Command::Policy(PolicyCommand::Bind { scope, digest, config, fail_mode, timeout_ms, memory_mib, remote }) => {
            let options = remote::BindOptions {
                config: config.as_deref(),
                fail_mode: fail_mode.as_deref(),
                timeout_ms,
                memory_mib,
            };
            remote::bind(&remote, &scope, &digest, options)
        }
        Command::Policy(PolicyCommand::Rollback { scope, remote }) => remote::rollback(&remote, &scope),
        Command::Policy(PolicyCommand::Rm { digest, remote }) => remote::remove(&remote, &digest),
        Command::Scopes(ScopesCommand::Ls { remote }) => remote::list_scopes(&remote),
        Command::Scopes(ScopesCommand::Move { scope, to, detach, remote }) => remote::move_scope(&remote, &scope, &to, detach),
        Command::Scopes(ScopesCommand::Merge { scope, detach, remote }) => remote::merge_scope(&remote, &scope, detach),
        Command::Scopes(ScopesCommand::Split { scope, at, to, id, detach, remote }) => {
            remote::split_scope(&remote, &scope, &at, to.as_deref(), id.as_deref(), detach)
        }
        Command::Migrations(MigrationsCommand::Ls { remote }) => remote::list_migrations(&remote),
        Command::Groups(GroupsCommand::Ls { remote }) => remote::list_groups(&remote),
        Command::Migrations(MigrationsCommand::Show { id, remote }) => remote::show_migration(&remote, &id),
        Command::Eval { scope, puts, deletes, remote } => remote::eval(&remote, &scope, &puts, &deletes),
        Command::Token { name, role } => remote::token(&name, &role),
        Command::Keys(KeysCommand::Gen { out }) => remote::keygen(&out),
        Command::Principals(PrincipalsCommand::Add { id, keys, roles, remote }) => {
            remote::add_principal(&remote, &id, &keys, &roles)
        }
        Command::Principals(PrincipalsCommand::Ls { remote }) => remote::list_principals(&remote),
        Command::Principals(PrincipalsCommand::Rm { id, remote }) => remote::remove_principal(&remote, &id),
        Command::Proposals(ProposalsCommand::Ls { all, remote }) => remote::list_proposals(&remote, all),
        Command::Lineage(LineageCommand::Export { scope, out, remote }) => remote::lineage_export(&remote, &scope, out.as_deref()),
        Command::Lineage(LineageCommand::Verify { export, trusted }) => remote::lineage_verify(&export, &trusted),
        Command::Snapshot(SnapshotCommand::Save { path, endpoints, user }) => snapshot::save(&path, &endpoints, user.as_deref()),
        Command::Snapshot(SnapshotCommand::Verify { path, json }) => snapshot::verify(&path, json),
        Command::Snapshot(SnapshotCommand::Restore { path, data_dir, etcdctl }) => snapshot::restore(&path, &data_dir, &etcdctl),
        Command::Approve { id, key, remote } => remote::approve(&remote, &id, &key),
        Command::Reject { id, reason, remote } => remote::reject(&remote, &id, &reason),
        Command::Put { key, value, signing, remote } => remote::signed_write(&remote, &signing, &key, Some(&value)),
        Command::Del { key, signing, remote } => remote::signed_write(&remote, &signing, &key, None),
        Command::Bench(BenchCommand::Policy { iterations, components, component_config }) => {
            bench::policy(iterations, &components, component_config.as_deref())
        }
        Command::Bench(BenchCommand::Put { seconds, clients, etcd, workload, pin }) => {
            bench_put::put(seconds, &clients, &etcd, workload == "kube", pin)
        }
        Command::Bench(BenchCommand::Admission { reviews, clients, etcd }) => bench_admission::admission(reviews, &clients, &etcd),
        Command::Bench(BenchCommand::Swap { swaps, clients, etcd }) => bench_swap::swap(swaps, clients, &etcd),
        Command::Bench(BenchCommand::Soak { minutes, clients, fault_every, members, etcd }) => {
            bench_soak::soak(minutes, clients, fault_every, members, &etcd)
        }
        Command::Bench(BenchCommand::Split { keys, writers, seconds, etcd }) => bench_split::split(keys, writers, seconds, &etcd),
        Command::Bench(BenchCommand::Critical { seconds, clients, etcd }) => bench_critical::critical(seconds, clients, &etcd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Check) => ExitCode::from(1),
        Err(CliError::Refused(message)) => {
            eprintln!("aq: {message}");
            ExitCode::from(1)
        }
        Err(CliError::Input(message)) => {
            eprintln!("aq: error: {message}");
            ExitCode::from(2)
        }
    }
}
