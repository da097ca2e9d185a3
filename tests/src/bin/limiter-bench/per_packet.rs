//! Per-packet cost of each check through `BPF_PROG_TEST_RUN`, against a trivial XDP program
//! measured in the same run.
//!
//! For every (check, path, occupancy) a fresh program is loaded with a plan that contains the
//! check under test plus a "filler" rule (one bucket per source and port on UDP 7000, never
//! exhausted). The per-source table is filled to the occupancy by running one frame per
//! distinct source to port 7000 through the program itself, so the entries are exactly the
//! ones live traffic would create. Then the measured frame runs `repeat` times in the kernel
//! (`BPF_PROG_TEST_RUN` reports the mean), alternating with the trivial program, `runs` times.
//! Every measured run is checked: the verdict and the program's own reason counter must say
//! the intended path was taken for every one of the `repeat` runs.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use ipnet::IpNet;
use limiter_agent::{
    dataplane::{Dataplane, LoadOptions},
    plan::{CountKind, KernelPlan, KernelRule, Limit, ListEntry, PortTarget, Protocol, SourceSelector, Unit},
};
use limiter_common::{XDP_DROP, XDP_PASS, reason};
use limiter_tests::packet::Packet;
use serde_json::{Value, json};

use crate::sys::{TrivialXdp, thread_cpu_time};
use crate::{Config, median};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 1);
const FILLER_PORT: u16 = 7000;
const PORT: u16 = 9000;

/// One measured scenario.
struct Scenario {
    check: &'static str,
    path: &'static str,
    /// The measured frame's source.
    source: Ipv4Addr,
    /// The extra plan pieces (the filler rule is added to all).
    plan: KernelPlan,
    verdict: u32,
    reason: u32,
}

/// Never exhausted: one token per nanosecond, and a burst far beyond any run.
fn unlimited() -> Limit {
    Limit { requests: 1_000_000_000, unit: Unit::Second, burst: 1_000_000_000_000 }
}

/// Exhausted after the first packet for an hour.
fn one_per_hour() -> Limit {
    Limit { requests: 1, unit: Unit::Hour, burst: 0 }
}

fn rule(name: &str, limit: Limit, distinct: bool, by_port: bool, net: Option<IpNet>) -> KernelRule {
    KernelRule {
        name: format!("bench/{name}"),
        targets: if by_port { vec![PortTarget { port: PORT, protocol: Protocol::Udp }] } else { Vec::new() },
        source: SourceSelector { nets: net.into_iter().collect(), distinct, invert: false },
        count: CountKind::Packets,
        limit,
        shadow: false,
        global: false,
    }
}

fn host(ip: Ipv4Addr) -> IpNet {
    IpNet::from(IpAddr::V4(ip))
}

fn scenarios() -> Vec<Scenario> {
    let src = Ipv4Addr::new(198, 18, 0, 7);
    let rules = |r: KernelRule| KernelPlan { rules: vec![r], ..Default::default() };
    // The allow and deny scenarios also carry a per-(source, port) rule that the packet would
    // otherwise hit, so the list is what decides.
    let guarded = |mut p: KernelPlan| {
        p.rules.push(rule("guard", one_per_hour(), true, true, None));
        p
    };
    vec![
        Scenario {
            check: "allow hit",
            path: "pass",
            source: src,
            plan: guarded(KernelPlan {
                allow: vec![ListEntry { net: host(src), policy: "bench".into() }],
                ..Default::default()
            }),
            verdict: XDP_PASS,
            reason: reason::PASS_ALLOW_LIST,
        },
        Scenario {
            check: "deny hit",
            path: "drop",
            source: src,
            plan: guarded(KernelPlan {
                deny: vec![ListEntry { net: host(src), policy: "bench".into() }],
                ..Default::default()
            }),
            verdict: XDP_DROP,
            reason: reason::DROP_DENY_LIST,
        },
        Scenario {
            check: "per-port bucket",
            path: "pass",
            source: src,
            plan: rules(rule("port", unlimited(), false, true, None)),
            verdict: XDP_PASS,
            reason: reason::PASS_CONFORMING,
        },
        Scenario {
            check: "per-port bucket",
            path: "drop",
            source: src,
            plan: rules(rule("port", one_per_hour(), false, true, None)),
            verdict: XDP_DROP,
            reason: reason::DROP_SHARED_BUCKET,
        },
        // Per-source rules without targets apply to every port; the selector keeps the
        // filler traffic (10.0.0.0/8) out of them.
        Scenario {
            check: "per-source bucket",
            path: "pass",
            source: src,
            plan: rules(rule("source", unlimited(), true, false, Some("198.18.0.0/16".parse().unwrap_or(host(src))))),
            verdict: XDP_PASS,
            reason: reason::PASS_CONFORMING,
        },
        Scenario {
            check: "per-source bucket",
            path: "drop",
            source: src,
            plan: rules(rule(
                "source",
                one_per_hour(),
                true,
                false,
                Some("198.18.0.0/16".parse().unwrap_or(host(src))),
            )),
            verdict: XDP_DROP,
            reason: reason::DROP_SOURCE_BUCKET,
        },
        Scenario {
            check: "per-(source, port) bucket",
            path: "pass",
            source: src,
            plan: rules(rule("source-port", unlimited(), true, true, None)),
            verdict: XDP_PASS,
            reason: reason::PASS_CONFORMING,
        },
        Scenario {
            check: "per-(source, port) bucket",
            path: "drop",
            source: src,
            plan: rules(rule("source-port", one_per_hour(), true, true, None)),
            verdict: XDP_DROP,
            reason: reason::DROP_SOURCE_PORT_BUCKET,
        },
    ]
}

pub fn filler_rule() -> KernelRule {
    KernelRule {
        name: "bench/filler".into(),
        targets: vec![PortTarget { port: FILLER_PORT, protocol: Protocol::Udp }],
        source: SourceSelector::everyone(true),
        count: CountKind::Packets,
        limit: unlimited(),
        shadow: false,
        global: false,
    }
}

fn frame(src: Ipv4Addr, port: u16) -> Vec<u8> {
    Packet::eth().ipv4(src, SERVER).udp(40000, port).payload(&[0u8; 18]).build()
}

/// Offset of the IPv4 source address in an untagged Ethernet + IPv4 frame.
const IPV4_SRC_OFFSET: usize = 14 + 12;

/// Runs one frame per filler source through the program, so `count` (rule, source, port)
/// entries exist in the per-source table. Sources are 10.0.0.1 upwards.
pub fn populate(dp: &mut Dataplane, count: u32) -> Result<()> {
    let mut f = frame(Ipv4Addr::new(10, 0, 0, 1), FILLER_PORT);
    for i in 0..count {
        let addr = u32::from(Ipv4Addr::new(10, 0, 0, 1)) + i;
        f[IPV4_SRC_OFFSET..IPV4_SRC_OFFSET + 4].copy_from_slice(&addr.to_be_bytes());
        let verdict = dp.test_run(&f).context("populating the per-source table")?;
        ensure!(verdict == XDP_PASS, "filler packet {i} was dropped");
    }
    Ok(())
}

/// Runs `test_run` with `repeat` and with `2 * repeat`; returns the verdict, the kernel's
/// mean duration of the longer call, and the CPU time per run of the difference between the
/// two calls, which cancels the fixed cost of a `BPF_PROG_TEST_RUN` call (for XDP with a
/// repeat above 1 the kernel flips a static key around the loop: some 100 µs per call).
fn timed(repeat: u32, mut test_run: impl FnMut(u32) -> Result<(u32, Duration)>) -> Result<(u32, Duration, f64)> {
    // A preemption or interrupt inside the shorter call can make the difference meaningless
    // (zero or negative) for a cheap program; such a pair is measured again, at most 5 times.
    for _ in 0..5 {
        let t0 = thread_cpu_time();
        let (v1, _) = test_run(repeat)?;
        let t1 = thread_cpu_time();
        let (v2, dur) = test_run(2 * repeat)?;
        let t2 = thread_cpu_time();
        ensure!(v1 == v2, "verdict changed between runs: {v1} then {v2}");
        let short = (t1 - t0).as_nanos() as f64;
        let long = (t2 - t1).as_nanos() as f64;
        if long > short {
            return Ok((v2, dur, (long - short) / f64::from(repeat)));
        }
    }
    bail!(
        "CPU time of {} runs was not above that of {repeat} runs five times in a row: the machine is too busy to measure",
        2 * repeat
    )
}

pub fn run(cfg: &Config, trivial: &TrivialXdp) -> Result<Value> {
    let mut rows = Vec::new();
    for &occupancy in &cfg.occupancies {
        for s in scenarios() {
            let mut plan = s.plan.clone();
            plan.rules.push(filler_rule());
            let mut dp = Dataplane::load(LoadOptions::default()).context("loading the XDP program")?;
            dp.apply(&plan).context("applying the bench plan")?;
            // The measured source holds one entry itself when its check keeps per-source state.
            let keeps_state = s.check.starts_with("per-source") || s.check.starts_with("per-(source");
            populate(&mut dp, occupancy.saturating_sub(u32::from(keeps_state)))?;
            let measured = frame(s.source, PORT);
            // Warm up: the first packet takes the one token of the drop scenarios, and the
            // caches and the bucket exist before timing starts.
            dp.test_run_repeat(&measured, 100)?;
            let tracked = dp.tracked_sources();
            let mut ns_runs = Vec::new();
            let mut trivial_runs = Vec::new();
            let mut cpu_runs = Vec::new();
            let mut trivial_cpu_runs = Vec::new();
            for _ in 0..cfg.runs {
                let (tv, tdur, tcpu) = timed(cfg.repeat, |n| trivial.test_run(&measured, n))?;
                ensure!(tv == XDP_PASS, "the trivial program returned {tv}");
                trivial_runs.push(tdur.as_nanos() as f64);
                trivial_cpu_runs.push(tcpu);
                let before = dp.stats()?.reason(s.reason).packets;
                let (verdict, dur, cpu) = timed(cfg.repeat, |n| Ok(dp.test_run_repeat(&measured, n)?))?;
                let after = dp.stats()?.reason(s.reason).packets;
                // Each attempt of `timed` runs the frame 3 x repeat times; all must take the path.
                let counted = after - before;
                if verdict != s.verdict || counted == 0 || counted % (3 * u64::from(cfg.repeat)) != 0 {
                    bail!(
                        "{} / {}: expected verdict {} with reason {} for all {} runs, got verdict {verdict} and {} counted",
                        s.check,
                        s.path,
                        s.verdict,
                        reason::name(s.reason),
                        3 * cfg.repeat,
                        counted
                    );
                }
                ns_runs.push(dur.as_nanos() as f64);
                cpu_runs.push(cpu);
            }
            let ns = median(&ns_runs);
            let trivial_ns = median(&trivial_runs);
            let cpu_ns = median(&cpu_runs);
            let trivial_cpu_ns = median(&trivial_cpu_runs);
            // The ratio uses thread CPU time per run: the kernel's figure is whole nanoseconds,
            // too coarse for a ~10 ns baseline.
            // Ratio per run (both programs measured back to back), then the median: steadier
            // on a shared machine than a ratio of medians.
            let ratio_runs: Vec<f64> = cpu_runs.iter().zip(&trivial_cpu_runs).map(|(a, b)| a / b).collect();
            let ratio = median(&ratio_runs);
            eprintln!(
                "per-packet: {:<26} {:<4} occupancy {:>9} (tracked {tracked:>9}): {ns:>4} ns ({cpu_ns:.2} cpu), trivial {trivial_ns} ns ({trivial_cpu_ns:.2} cpu), ratio {ratio:.2}",
                s.check, s.path, occupancy
            );
            rows.push(json!({
                "check": s.check,
                "path": s.path,
                "occupancy": occupancy,
                "tracked": tracked,
                "ns": ns,
                "ns_runs": ns_runs,
                "trivial_ns": trivial_ns,
                "trivial_ns_runs": trivial_runs,
                "cpu_ns": cpu_ns,
                "cpu_ns_runs": cpu_runs,
                "trivial_cpu_ns": trivial_cpu_ns,
                "trivial_cpu_ns_runs": trivial_cpu_runs,
                "ratio": ratio,
                "ratio_runs": ratio_runs,
            }));
        }
    }
    Ok(json!({ "repeat": cfg.repeat, "runs": cfg.runs, "rows": rows }))
}
