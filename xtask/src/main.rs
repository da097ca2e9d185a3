//! Developer tasks for limiter. Run `cargo xtask --help`.

mod bench;
mod fuzz;
mod image;
mod lint;
mod peer;
mod run;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "limiter developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install, idempotently, the eBPF nightly, bpf-linker, Debian packages and bpffs.
    Setup(setup::SetupArgs),
    /// Set up, then run the unit tests, envoyproxy/ratelimit's own cases against the agent, and (as
    /// root) the privileged integration tests.
    Test(test::TestArgs),
    /// Set up and build, then run the built-in sandbox demo, or the agent with the given args.
    Run(run::RunArgs),
    /// Set up, build, measure (as root) and write bench/REPORT.md and bench/chart.png.
    Bench(bench::BenchArgs),
    /// Differential fuzzing (as root): generated and mutated frames through the real XDP
    /// program, checked against etherparse; writes bench/FUZZ.md.
    Fuzz(fuzz::FuzzArgs),
    /// Set up, build the agent statically (musl) and its OCI image with podman, tagged with its version.
    Image(image::ImageArgs),
    /// rustfmt check, clippy for the host crates and for the eBPF crate's target.
    Lint,
    /// Print `export PATH=...` with bpf-linker first: `eval "$(cargo xtask env)"`.
    Env,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<()> = match &cli.command {
        Cmd::Setup(args) => setup::cmd(args),
        Cmd::Test(args) => test::cmd(args),
        Cmd::Run(args) => run::cmd(args),
        Cmd::Bench(args) => bench::cmd(args),
        Cmd::Fuzz(args) => fuzz::cmd(args),
        Cmd::Image(args) => image::cmd(args),
        Cmd::Lint => lint::cmd(),
        Cmd::Env => print_env(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<util::Interrupted>() => {
            eprintln!("xtask: interrupted; cleaned up");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_env() -> Result<()> {
    let path = util::path_with_bpf_linker()?;
    let path = path.to_string_lossy();
    // Single-quote for the shell; a quote inside becomes '\''.
    println!("export PATH='{}'", path.replace('\'', r"'\''"));
    Ok(())
}
