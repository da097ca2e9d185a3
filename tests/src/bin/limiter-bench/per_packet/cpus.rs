//! One shared bucket (a per-port rule) hit from both CPUs at once: two threads, one pinned to
//! each CPU, start `BPF_PROG_TEST_RUN` calls on the same frame together, so the bucket's cache
//! line moves between the CPUs on every run; against the same calls from one CPU alone, and
//! against the trivial program run the same two ways (what the machine itself adds when both
//! CPUs are busy).

use std::sync::Barrier;

use anyhow::{Context as _, Result, bail, ensure};
use limiter_agent::dataplane::{Dataplane, LoadOptions};
use limiter_common::{XDP_PASS, reason};
use serde_json::{Value, json};

use super::limiter::{CHECK_BASE, scenarios};
use super::{PORT, frame, timed};
use crate::bpf::{Prog, test_run};
use crate::sys::pin_to_cpu;
use crate::{Config, median};

/// CPU ns per run on each of CPUs 0 and 1, both running `fd` at once.
fn both(cfg: &Config, fd: i32, f: &[u8]) -> Result<(f64, f64)> {
    let barrier = Barrier::new(2);
    let per_cpu = std::thread::scope(|s| -> Result<Vec<f64>> {
        let handles: Vec<_> = (0..2)
            .map(|cpu| {
                let barrier = &barrier;
                s.spawn(move || -> Result<f64> {
                    pin_to_cpu(cpu)?;
                    barrier.wait();
                    let (v, _, ns) = timed(cfg.repeat, |n| test_run(fd, f, n))?;
                    ensure!(v == XDP_PASS, "verdict {v} on CPU {cpu}");
                    Ok(ns)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().map_err(|_| anyhow::anyhow!("a bench thread panicked"))?).collect()
    })?;
    Ok((per_cpu[0], per_cpu[1]))
}

fn alone(cfg: &Config, fd: i32, f: &[u8]) -> Result<f64> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<f64> {
            pin_to_cpu(0)?;
            let (v, _, ns) = timed(cfg.repeat, |n| test_run(fd, f, n))?;
            ensure!(v == XDP_PASS, "verdict {v}");
            Ok(ns)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the bench thread panicked"))?
    })
}

pub fn run(cfg: &Config) -> Result<Value> {
    if std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) < 2 {
        bail!("the two-CPU measurement needs two CPUs");
    }
    let Some(s) = scenarios().into_iter().find(|s| s.check == "per-port bucket" && s.path == "pass") else {
        bail!("no per-port pass scenario");
    };
    let mut dp = Dataplane::load(LoadOptions::default()).context("loading the XDP program")?;
    dp.apply(&s.plan).context("applying the bench plan")?;
    let fd = dp.program_fd()?;
    let trivial = Prog::trivial()?;
    let f = frame(CHECK_BASE, PORT);
    test_run(fd, &f, 100)?;
    let stats = dp.stats()?;
    let (before, contended_before) =
        (stats.reason(reason::PASS_CONFORMING).packets, stats.reason(reason::EVENT_BUCKET_CONTENDED).packets);
    let (mut lim_alone, mut lim_both, mut triv_alone, mut triv_both) = (vec![], vec![], vec![], vec![]);
    for _ in 0..cfg.runs {
        triv_alone.push(alone(cfg, trivial.fd(), &f)?);
        let (a, b) = both(cfg, trivial.fd(), &f)?;
        triv_both.push((a + b) / 2.0);
        lim_alone.push(alone(cfg, fd, &f)?);
        let (a, b) = both(cfg, fd, &f)?;
        lim_both.push((a + b) / 2.0);
    }
    // A charge that loses six compare-and-swaps in a row to the other CPU's charges refuses its
    // packet (`bucket_contended`, README "Buckets and concurrency"): with both CPUs doing
    // nothing but charging this one bucket it happens, rarely; how rarely is a figure here.
    let stats = dp.stats()?;
    let counted = stats.reason(reason::PASS_CONFORMING).packets - before;
    let contended = stats.reason(reason::EVENT_BUCKET_CONTENDED).packets - contended_before;
    ensure!(
        counted > 0 && (counted + contended) % (3 * u64::from(cfg.repeat)) == 0,
        "per-port pass took another path: {counted} runs counted, {contended} contended"
    );
    let out = json!({
        "check": s.check,
        "path": s.path,
        "alone_cpu_ns": median(&lim_alone),
        "both_cpu_ns": median(&lim_both),
        "trivial_alone_cpu_ns": median(&triv_alone),
        "trivial_both_cpu_ns": median(&triv_both),
        "slowdown": median(&lim_both) / median(&lim_alone),
        "trivial_slowdown": median(&triv_both) / median(&triv_alone),
        "both_cpu_ns_runs": lim_both,
        "runs_total": counted + contended,
        "contended_refusals": contended,
    });
    eprintln!(
        "per-packet: per-port bucket pass on both CPUs at once: {:.1} ns per run each, alone {:.1} ns (trivial {:.1} / {:.1}); {contended} of {} runs refused as contended",
        median(&lim_both),
        median(&lim_alone),
        median(&triv_both),
        median(&triv_alone),
        counted + contended,
    );
    Ok(out)
}
