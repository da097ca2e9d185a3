//! `cargo xtask bench`: for now only the smoke benchmark, if the tests crate has one.
//! The full suite (BPF_PROG_TEST_RUN cost ratios, veth flood vs nftables) is a later issue.

use anyhow::{Context as _, Result};

use crate::{setup, util};

pub fn cmd() -> Result<()> {
    setup::ensure()?;
    util::run(util::cargo()?.args(["build", "--release", "-p", "limiter-agent"]))
        .context("release build of limiter-agent failed: see the compiler errors above")?;

    let smoke = util::workspace_root()?.join("tests/tests/bench_smoke.rs");
    if smoke.exists() {
        util::run(util::cargo()?.args([
            "test",
            "-p",
            "limiter-tests",
            "--release",
            "--test",
            "bench_smoke",
            "--",
            "--nocapture",
            "--test-threads=1",
        ]))
        .context("bench_smoke failed: see above (it needs root)")?;
    } else {
        println!("bench: {} does not exist yet; nothing measured", smoke.display());
    }
    println!(
        "bench: the full benchmark suite (per-packet cost vs a trivial XDP program, veth flood vs \
         nftables) is not implemented yet"
    );
    Ok(())
}
