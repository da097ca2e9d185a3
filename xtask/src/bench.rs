//! `cargo xtask bench`: builds `limiter-bench` (a binary of the tests crate, which links the
//! agent library and the namespace/packet harness), runs it as root, and turns its JSON into
//! `bench/REPORT.md` and `bench/chart.png`.
//!
//! xtask itself must not depend on limiter-agent (its build script needs the eBPF toolchain,
//! which `setup` installs), so the measuring happens in the child process and only the
//! report is written here.

mod chart;
mod report;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{setup, util};

/// Sections `limiter-bench` knows (see `tests/src/bin/limiter-bench/main.rs`).
pub const SECTIONS: [&str; 5] = ["per_packet", "flood", "accuracy", "memory", "agent"];

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A tiny run (few iterations, small sizes) that only checks every figure is produced;
    /// written to target/bench-smoke/ unless --out-dir is given. Its numbers mean nothing.
    #[arg(long)]
    pub smoke: bool,
    /// Run only these sections (comma-separated): per_packet, flood, accuracy, memory, agent.
    /// Written to target/bench-only/ unless --out-dir is given, so the committed report stays whole.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Where to write results.json, REPORT.md and chart.png (default: bench/ for a full run).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
}

pub fn cmd(args: &BenchArgs) -> Result<()> {
    for s in &args.only {
        if !SECTIONS.contains(&s.as_str()) {
            bail!("unknown section {s:?}: choose from {}", SECTIONS.join(", "));
        }
    }
    if !util::is_root()? {
        bail!(
            "the benchmarks load XDP programs and create network namespaces: rerun as root (sudo -E cargo xtask bench)"
        );
    }
    setup::ensure()?;
    util::run(util::cargo()?.args(["build", "--release", "-p", "limiter-tests", "--bin", "limiter-bench"]))
        .context("release build of limiter-bench failed: see the compiler errors above")?;

    let root = util::workspace_root()?;
    let out_dir = match &args.out_dir {
        Some(d) => d.clone(),
        None if args.smoke => util::target_dir()?.join("bench-smoke"),
        None if !args.only.is_empty() => util::target_dir()?.join("bench-only"),
        None => root.join("bench"),
    };
    std::fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let json_path = out_dir.join("results.json");
    let bin = util::target_dir()?.join("release/limiter-bench");
    let mut run = Command::new(&bin);
    run.current_dir(&root).arg("--out").arg(&json_path);
    if args.smoke {
        run.arg("--smoke");
    }
    if !args.only.is_empty() {
        run.arg("--only").arg(args.only.join(","));
    }
    util::run(&mut run).context("limiter-bench failed: see its output above")?;
    render(&json_path, &out_dir, &invocation(args))
}

/// The command that repeats this run, for the report.
fn invocation(args: &BenchArgs) -> String {
    let mut s = String::from("sudo -E cargo xtask bench");
    if args.smoke {
        s.push_str(" --smoke");
    }
    if !args.only.is_empty() {
        s.push_str(" --only ");
        s.push_str(&args.only.join(","));
    }
    s
}

/// Writes `REPORT.md` and `chart.png` into `out_dir` from `results.json`.
pub fn render(json_path: &Path, out_dir: &Path, command: &str) -> Result<()> {
    let text = std::fs::read_to_string(json_path).with_context(|| format!("cannot read {}", json_path.display()))?;
    let results: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", json_path.display()))?;
    let md = report::markdown(&results, command);
    let report_path = out_dir.join("REPORT.md");
    std::fs::write(&report_path, md).with_context(|| format!("cannot write {}", report_path.display()))?;
    let chart_path = out_dir.join("chart.png");
    chart::draw(&results, &chart_path)?;
    println!("bench: wrote {}, {} and {}", json_path.display(), report_path.display(), chart_path.display());
    Ok(())
}
