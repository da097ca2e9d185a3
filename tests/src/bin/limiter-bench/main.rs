//! `limiter-bench`: the measurements behind `cargo xtask bench` (which builds and runs this as
//! root, then turns its JSON into `bench/REPORT.md` and `bench/chart.png`).
//!
//! ```text
//! limiter-bench [--smoke] [--only SECTION[,SECTION...]] --out FILE.json
//! ```
//! Sections: `per_packet`, `nic`, `flood`, `accuracy`, `memory`, `agent`, `rls`; and `synproxy`,
//! run only when named with `--only`. `--smoke` runs every
//! section at toy sizes (a few iterations) so the test suite can check that the bench still
//! produces every figure; its numbers mean nothing.
//!
//! Every figure is a median over `runs` repetitions; the JSON keeps the individual runs.

mod accuracy;
mod agent;
mod bpf;
mod flood;
mod memory;
mod nic;
mod per_packet;
mod rls;
mod synproxy;
mod sys;
mod xdp_filter;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

/// Sizes of one bench run.
#[derive(Clone, Debug)]
pub struct Config {
    pub smoke: bool,
    /// Repetitions of every measurement; figures are their median.
    pub runs: usize,
    /// `BPF_PROG_TEST_RUN` repeat count per measured run.
    pub repeat: u32,
    /// Distinct sources the per-packet harness cycles through.
    pub occupancies: Vec<u32>,
    /// Allow and deny list sizes for the per-packet cost.
    pub list_sizes: Vec<u32>,
    /// Per-source table capacity for the new-source path (filled before it is timed).
    pub new_source_capacity: u32,
    /// Length of one flood run, seconds.
    pub flood_seconds: f64,
    /// Length of one accuracy run, seconds.
    pub accuracy_seconds: f64,
    /// Occupancies at which kernel memory is read.
    pub memory_occupancies: Vec<u32>,
    /// Policy sizes (rules/CIDRs) for compile+apply.
    pub policy_sizes: Vec<usize>,
    /// Measured length of one rate limit service run, seconds (after the warm-up).
    pub rls_seconds: f64,
    /// Warm-up of one rate limit service run, seconds.
    pub rls_warmup_seconds: f64,
    /// gRPC calls the load client keeps in flight.
    pub rls_concurrency: usize,
    /// HTTP/2 connections they are spread over.
    pub rls_connections: usize,
    /// Distinct regular `x-user-id` values.
    pub rls_users: usize,
}

impl Config {
    fn full() -> Self {
        Self {
            smoke: false,
            runs: 5,
            repeat: 1_000_000,
            occupancies: vec![1, 10_000, 1_000_000],
            list_sizes: vec![1, 1_000, 100_000],
            new_source_capacity: limiter_common::DEFAULT_SOURCE_ENTRIES,
            flood_seconds: 3.0,
            accuracy_seconds: 2.0,
            memory_occupancies: vec![1, 10_000, 1_000_000],
            policy_sizes: vec![10, 1_000, 100_000],
            rls_seconds: 3.0,
            rls_warmup_seconds: 0.5,
            rls_concurrency: 64,
            rls_connections: 4,
            rls_users: 4096,
        }
    }

    fn smoke() -> Self {
        Self {
            smoke: true,
            runs: 3,
            repeat: 200_000,
            occupancies: vec![1, 100],
            list_sizes: vec![1, 100],
            new_source_capacity: 4_096,
            flood_seconds: 0.3,
            accuracy_seconds: 0.3,
            memory_occupancies: vec![1, 1_000],
            policy_sizes: vec![10, 100],
            rls_seconds: 0.3,
            rls_warmup_seconds: 0.1,
            rls_concurrency: 8,
            rls_connections: 2,
            rls_users: 64,
        }
    }
}

pub const SECTIONS: [&str; 7] = ["per_packet", "nic", "flood", "accuracy", "memory", "agent", "rls"];
/// Sections run only when named with `--only` (not by a full run or `--smoke`).
pub const ONLY_SECTIONS: [&str; 1] = ["synproxy"];

/// Median of a non-empty sample (mean of the middle two for even sizes).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

struct Args {
    smoke: bool,
    only: Vec<String>,
    out: PathBuf,
}

fn parse_args() -> Result<Args> {
    let mut smoke = false;
    let mut only: Vec<String> = Vec::new();
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--smoke" => smoke = true,
            "--only" => {
                let list = args.next().context("--only needs a comma-separated list of sections")?;
                for s in list.split(',').filter(|s| !s.is_empty()) {
                    if !SECTIONS.contains(&s) && !ONLY_SECTIONS.contains(&s) {
                        bail!(
                            "unknown section {s:?}; sections are {}, {}",
                            SECTIONS.join(", "),
                            ONLY_SECTIONS.join(", ")
                        );
                    }
                    only.push(s.to_owned());
                }
            }
            "--out" => out = Some(PathBuf::from(args.next().context("--out needs a file name")?)),
            "-h" | "--help" => {
                println!("limiter-bench [--smoke] [--only {}] --out FILE.json", SECTIONS.join(","));
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    let out = out.context("--out FILE.json is required")?;
    if only.is_empty() {
        only = SECTIONS.iter().map(|s| (*s).to_owned()).collect();
    }
    Ok(Args { smoke, only, out })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("limiter-bench needs root (BPF, network namespaces): run it through `sudo -E cargo xtask bench`");
    }
    let cfg = if args.smoke { Config::smoke() } else { Config::full() };
    let started = Instant::now();
    let mut results = serde_json::Map::new();
    results.insert("machine".into(), sys::machine());
    results.insert(
        "config".into(),
        json!({
            "smoke": cfg.smoke,
            "runs": cfg.runs,
            "repeat": cfg.repeat,
            "occupancies": cfg.occupancies,
            "list_sizes": cfg.list_sizes,
            "flood_seconds": cfg.flood_seconds,
            "accuracy_seconds": cfg.accuracy_seconds,
            "rls_seconds": cfg.rls_seconds,
        }),
    );
    let trivial = bpf::TrivialXdp::trivial()?;
    let mut section_seconds = serde_json::Map::new();
    for section in &args.only {
        let t = Instant::now();
        eprintln!("limiter-bench: {section}");
        let value: Value = match section.as_str() {
            "per_packet" => per_packet::run(&cfg, &trivial)?,
            "nic" => nic::run(&cfg)?,
            "flood" => flood::run(&cfg)?,
            "accuracy" => accuracy::run(&cfg)?,
            "memory" => memory::run(&cfg)?,
            "agent" => agent::run(&cfg)?,
            "rls" => rls::run(&cfg)?,
            "synproxy" => synproxy::run(&cfg)?,
            other => bail!("unknown section {other}"),
        };
        eprintln!("limiter-bench: {section} took {:.1} s", t.elapsed().as_secs_f64());
        section_seconds.insert(section.clone(), json!(t.elapsed().as_secs_f64()));
        results.insert(section.clone(), value);
    }
    results.insert("section_seconds".into(), Value::Object(section_seconds));
    results.insert("elapsed_seconds".into(), json!(started.elapsed().as_secs_f64()));
    let text = serde_json::to_string_pretty(&Value::Object(results))?;
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.out, text).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("limiter-bench: wrote {}", args.out.display());
    Ok(())
}
