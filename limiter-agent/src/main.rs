//! `limiter-agent`: parses arguments and hands each subcommand to `limiter_agent::cli`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use limiter_agent::cli;

#[derive(Parser)]
#[command(name = "limiter-agent", version, about = "XDP rate limiter and DoS shield")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the XDP program, apply the policy and shield the interfaces, and serve the Envoy
    /// rate limit service and metrics, until SIGINT/SIGTERM (SIGHUP reloads the policy). The
    /// program stays attached and pinned after exit unless --detach-on-exit.
    Run(Box<cli::run::RunArgs>),
    /// Validate policy files: every error with file, line, column and field.
    Check(cli::check::CheckArgs),
    /// Show the compiled plan: each rule's layer (kernel, kernel guard, L7), key, rate, burst,
    /// scope and mode, and the Envoy `rate_limits` actions a gateway needs for the L7 rules.
    Explain(cli::explain::ExplainArgs),
    /// Live view of a running agent (rates passed and dropped, by reason, rule and source),
    /// read from its control socket.
    Top(cli::top::TopArgs),
    /// Remove the shield a stopped agent left in force: its XDP links, program and maps
    /// pinned under --pin-dir (all of them, or one interface's link with --iface).
    Detach(cli::detach::DetachArgs),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check(args) => cli::check::run(args),
        Command::Explain(args) => cli::explain::run(args),
        Command::Top(args) => cli::top::run(args).map(|()| ExitCode::SUCCESS),
        Command::Run(args) => run_agent(*args).map(|()| ExitCode::SUCCESS),
        Command::Detach(args) => cli::detach::run(args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_agent(args: cli::run::RunArgs) -> anyhow::Result<()> {
    if !args.ifaces.is_empty() {
        cli::run::require_root()?;
    }
    // Several workers: rate limit service calls are decided on every core. The run loop (the
    // kernel maps, reloads, signals) stays on the thread that blocks on it.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("limiter-agent")
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the tokio runtime: {e}"))?;
    runtime.block_on(cli::run::run(args))
}
