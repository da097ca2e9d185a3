//! `cargo xtask bench`: builds `limiter-bench` (a binary of the tests crate, which links the
//! agent library and the namespace/packet harness), runs it as root, and turns its JSON into
//! `bench/REPORT.md` and `bench/chart.png`.
//!
//! xtask itself must not depend on limiter-agent (its build script needs the eBPF toolchain,
//! which `setup` installs), so the measuring happens in the child process and only the
//! report is written here.

mod chart;
mod cost;
mod report;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{setup, util};

/// Sections `limiter-bench` knows (see `tests/src/bin/limiter-bench/main.rs`).
pub const SECTIONS: [&str; 7] = ["per_packet", "nic", "flood", "accuracy", "memory", "agent", "rls"];
/// Sections run only when named with `--only`.
pub const ONLY_SECTIONS: [&str; 1] = ["synproxy"];

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A tiny run (few iterations, small sizes) that only checks every figure is produced;
    /// written to target/bench-smoke/ unless --out-dir is given. Its numbers mean nothing.
    #[arg(long)]
    pub smoke: bool,
    /// Run only these sections (comma-separated): per_packet, nic, flood, accuracy, memory, agent, rls;
    /// synproxy runs only when named here.
    /// Written to target/bench-only/ unless --out-dir is given, so the committed report stays whole.
    /// The other sections of a results.json already in the output directory (from a run of the
    /// same kind, smoke or not) are kept: `--only rls --out-dir bench` refreshes that section of
    /// the committed report and leaves the rest as it was.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Where to write results.json, REPORT.md and chart.png (default: bench/ for a full run).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
}

pub fn cmd(args: &BenchArgs) -> Result<()> {
    for s in &args.only {
        if !SECTIONS.contains(&s.as_str()) && !ONLY_SECTIONS.contains(&s.as_str()) {
            bail!("unknown section {s:?}: choose from {}, {}", SECTIONS.join(", "), ONLY_SECTIONS.join(", "));
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
    // A partial run writes beside the results it merges into, so a failed run leaves them alone.
    let fresh_path = if args.only.is_empty() { json_path.clone() } else { out_dir.join("results.partial.json") };
    let bin = util::target_dir()?.join("release/limiter-bench");
    let mut run = Command::new(&bin);
    run.current_dir(&root).arg("--out").arg(&fresh_path);
    if args.smoke {
        run.arg("--smoke");
    }
    if !args.only.is_empty() {
        run.arg("--only").arg(args.only.join(","));
    }
    util::run(&mut run).context("limiter-bench failed: see its output above")?;
    let command = invocation(args);
    let fresh = read_json(&fresh_path)?;
    let previous = if args.only.is_empty() || !json_path.exists() { None } else { Some(read_json(&json_path)?) };
    let merged = merge(previous, fresh, &command);
    let text = serde_json::to_string_pretty(&merged).context("serialising the results")?;
    std::fs::write(&json_path, text).with_context(|| format!("cannot write {}", json_path.display()))?;
    if fresh_path != json_path {
        std::fs::remove_file(&fresh_path).with_context(|| format!("cannot remove {}", fresh_path.display()))?;
    }
    render(&json_path, &out_dir, &command)
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// The results to keep: the fresh run's sections, plus, for a partial run, every other section
/// of `previous` when it is of the same kind (smoke or not; a smoke figure must never sit in a
/// real report). `section_commands` records which command produced each section, so the
/// report can say which ones are older.
fn merge(previous: Option<Value>, mut fresh: Value, command: &str) -> Value {
    let ran: Vec<String> = SECTIONS.iter().filter(|s| fresh.get(**s).is_some()).map(|s| (*s).to_owned()).collect();
    let mut commands = serde_json::Map::new();
    let smoke = |v: &Value| v["config"]["smoke"].as_bool().unwrap_or(false);
    if let Some(prev) = previous.filter(|p| smoke(p) == smoke(&fresh)) {
        for section in SECTIONS.iter().filter(|s| !ran.iter().any(|r| r == *s)) {
            if let Some(v) = prev.get(*section) {
                fresh[*section] = v.clone();
                let by = prev["section_commands"][*section].as_str().unwrap_or("an earlier run");
                commands.insert((*section).to_owned(), Value::from(by));
                if let Some(secs) = prev["section_seconds"].get(*section) {
                    fresh["section_seconds"][*section] = secs.clone();
                }
            }
        }
    }
    for section in &ran {
        commands.insert(section.clone(), Value::from(command));
    }
    fresh["section_commands"] = Value::Object(commands);
    fresh
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
    let results = read_json(json_path)?;
    let md = report::markdown(&results, command);
    let report_path = out_dir.join("REPORT.md");
    std::fs::write(&report_path, md).with_context(|| format!("cannot write {}", report_path.display()))?;
    let chart_path = out_dir.join("chart.png");
    chart::draw(&results, &chart_path)?;
    println!("bench: wrote {}, {} and {}", json_path.display(), report_path.display(), chart_path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_partial_run_keeps_the_other_sections_of_the_same_kind() {
        let previous = json!({
            "config": {"smoke": false},
            "flood": {"rows": [1]},
            "rls": {"rows": ["old"]},
            "section_commands": {"flood": "sudo -E cargo xtask bench", "rls": "sudo -E cargo xtask bench"},
            "section_seconds": {"flood": 90.0, "rls": 40.0},
        });
        let fresh = json!({"config": {"smoke": false}, "rls": {"rows": ["new"]}, "section_seconds": {"rls": 41.0}});
        let merged = merge(Some(previous.clone()), fresh.clone(), "sudo -E cargo xtask bench --only rls");
        assert_eq!(merged["rls"], json!({"rows": ["new"]}));
        assert_eq!(merged["flood"], json!({"rows": [1]}));
        assert_eq!(merged["section_commands"]["flood"], "sudo -E cargo xtask bench");
        assert_eq!(merged["section_commands"]["rls"], "sudo -E cargo xtask bench --only rls");
        assert_eq!(merged["section_seconds"], json!({"rls": 41.0, "flood": 90.0}));

        // Never a smoke section in a real report, nor the other way round.
        let smoke = json!({"config": {"smoke": true}, "rls": {"rows": ["toy"]}});
        let merged = merge(Some(previous), smoke, "sudo -E cargo xtask bench --smoke --only rls");
        assert!(merged.get("flood").is_none());
        assert!(merge(None, fresh, "x").get("flood").is_none());
    }
}
