//! The `aq` command line. Exit codes: 0 success, 1 a check failed (fixture mismatch), 2 bad
//! input (missing file, not a component, wrong world, bad arguments).

mod bench;
mod bench_put;
mod policy;
mod serve;

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
    /// Measure aq.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum PolicyCommand {
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
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Evaluation latency of each built-in policy, a fresh instance per call.
    Policy {
        /// Evaluations per policy.
        #[arg(long, default_value_t = 20_000)]
        iterations: u32,
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
    },
}

/// A failure of a command, with the exit code it maps to.
#[derive(Debug)]
pub(crate) enum CliError {
    /// Bad input: exit 2.
    Input(String),
    /// A check failed: exit 1 (details already printed).
    Check,
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::Input(e.to_string())
    }
}

/// Runs the command line.
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
        Command::Bench(BenchCommand::Policy { iterations }) => bench::policy(iterations),
        Command::Bench(BenchCommand::Put { seconds, clients, etcd }) => bench_put::put(seconds, &clients, &etcd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Check) => ExitCode::from(1),
        Err(CliError::Input(message)) => {
            eprintln!("aq: error: {message}");
            ExitCode::from(2)
        }
    }
}
