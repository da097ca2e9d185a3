//! `cargo xtask fuzz`: builds `limiter-fuzz` (a binary of the tests crate, which links the
//! agent library and the fuzzer in `tests/src/fuzz`), runs it as root for many frames, and
//! leaves its summary in `bench/FUZZ.md`, which the README quotes.
//!
//! As with `bench`, xtask does not link the agent itself (its build script needs the eBPF
//! toolchain that `setup` installs): the fuzzing happens in the child process.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{setup, util};

#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// Frames to generate, mutate and judge.
    #[arg(long, default_value_t = 1_000_000)]
    pub frames: u64,
    /// Seed of the frame generator: the same seed gives the same frames, so a disagreement
    /// replays with it.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where to write the summary (default: bench/FUZZ.md).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn cmd(args: &FuzzArgs) -> Result<()> {
    if !util::is_root()? {
        bail!("the fuzzer loads the XDP program to run frames through it: rerun as root (sudo -E cargo xtask fuzz)");
    }
    setup::ensure()?;
    util::run(util::cargo()?.args(["build", "--release", "-p", "limiter-tests", "--bin", "limiter-fuzz"]))
        .context("release build of limiter-fuzz failed: see the compiler errors above")?;
    let root = util::workspace_root()?;
    let out = args.out.clone().unwrap_or_else(|| root.join("bench/FUZZ.md"));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let command = format!("sudo -E cargo xtask fuzz --frames {} --seed {}", args.frames, args.seed);
    let bin = util::target_dir()?.join("release/limiter-fuzz");
    let mut run = Command::new(&bin);
    run.current_dir(&root)
        .args(["--frames", &args.frames.to_string(), "--seed", &args.seed.to_string(), "--command", &command])
        .arg("--out")
        .arg(&out);
    util::run(&mut run).with_context(|| format!("limiter-fuzz found disagreements or failed: see {}", out.display()))
}
