//! `limiter-fuzz`: the differential fuzzer behind `cargo xtask fuzz` (which builds and runs
//! this as root).
//!
//! ```text
//! limiter-fuzz [--frames N] [--seed S] [--keep K] --out FILE.md [--command TEXT]
//! ```
//! Writes the summary (frames, shapes, disagreements) to FILE.md and exits non-zero if any
//! frame disagreed.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use limiter_tests::fuzz::{self, Options};

fn main() -> Result<()> {
    let mut opts = Options { frames: 1_000_000, seed: 1, keep: 20 };
    let mut out = None;
    let mut command = String::from("limiter-fuzz");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |what: &str| args.next().with_context(|| format!("{a} needs {what}"));
        match a.as_str() {
            "--frames" => opts.frames = value("a count")?.parse().context("--frames")?,
            "--seed" => opts.seed = value("a number")?.parse().context("--seed")?,
            "--keep" => opts.keep = value("a count")?.parse().context("--keep")?,
            "--out" => out = Some(PathBuf::from(value("a file name")?)),
            "--command" => command = value("the command line to quote")?,
            other => bail!("unknown argument {other:?} (see the usage in limiter-fuzz's doc comment)"),
        }
    }
    let out = out.context("--out FILE.md is required")?;
    limiter_tests::require_root();
    let summary = fuzz::run(&opts, |s| {
        eprintln!(
            "limiter-fuzz: {} frames, {} disagreements, {:.0} s",
            s.frames,
            s.disagreements,
            s.elapsed.as_secs_f64()
        );
    })?;
    std::fs::write(&out, summary.markdown(&command)).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "limiter-fuzz: {} frames (seed {}) in {:.1} s: {} disagreements; summary in {}",
        summary.frames,
        summary.seed,
        summary.elapsed.as_secs_f64(),
        summary.disagreements,
        out.display()
    );
    for d in summary.kept.iter().take(5) {
        eprintln!("{d}");
    }
    if summary.disagreements > 0 {
        bail!("{} frames disagree with etherparse: see {}", summary.disagreements, out.display());
    }
    Ok(())
}
