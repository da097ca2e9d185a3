//! The limiter's own scenarios: each check over K distinct sources, list sizes, and the
//! new-source path.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context as _, Result};
use ipnet::IpNet;
use limiter_agent::dataplane::{Dataplane, LoadOptions};
use limiter_agent::plan::{
    CountKind, KernelPlan, KernelRule, Limit, ListEntry, PortTarget, Protocol, SourceSelector, Unit,
};
use limiter_common::{XDP_DROP, XDP_PASS, reason};
use serde_json::{Value, json};

use super::{Expect, Measured, PORT, Sources, measure, unlimited, warm_up};
use crate::Config;
use crate::bpf::{Cycler, TrivialXdp};

/// Where the checks' sources live: 100.64.0.0/10 holds 4 million addresses.
pub const CHECK_BASE: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 0);
const CHECK_NET: &str = "100.64.0.0/10";
/// Where list entries live: 32.0.0.0 upwards (100,000 /24s need 25.6 million addresses).
pub const LIST_BASE: Ipv4Addr = Ipv4Addr::new(32, 0, 0, 0);

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

fn check_net() -> IpNet {
    CHECK_NET.parse().unwrap_or(IpNet::from(IpAddr::V4(CHECK_BASE)))
}

/// One measured check.
pub struct Scenario {
    pub check: &'static str,
    pub path: &'static str,
    pub plan: KernelPlan,
    pub verdict: u32,
    pub reason: u32,
}

/// The allow and deny scenarios also carry a per-(source, port) rule that the packet would
/// otherwise hit, so the list is what decides.
fn guarded(mut p: KernelPlan) -> KernelPlan {
    p.rules.push(rule("guard", one_per_hour(), true, true, None));
    p
}

pub fn scenarios() -> Vec<Scenario> {
    let rules = |r: KernelRule| KernelPlan { rules: vec![r], ..Default::default() };
    let entry = || vec![ListEntry { net: check_net(), policy: "bench".into() }];
    let s = |check, path, plan, verdict, reason| Scenario { check, path, plan, verdict, reason };
    vec![
        s(
            "allow hit",
            "pass",
            guarded(KernelPlan { allow: entry(), ..Default::default() }),
            XDP_PASS,
            reason::PASS_ALLOW_LIST,
        ),
        s(
            "deny hit",
            "drop",
            guarded(KernelPlan { deny: entry(), ..Default::default() }),
            XDP_DROP,
            reason::DROP_DENY_LIST,
        ),
        s(
            "per-port bucket",
            "pass",
            rules(rule("port", unlimited(), false, true, None)),
            XDP_PASS,
            reason::PASS_CONFORMING,
        ),
        s(
            "per-port bucket",
            "drop",
            rules(rule("port", one_per_hour(), false, true, None)),
            XDP_DROP,
            reason::DROP_SHARED_BUCKET,
        ),
        // Per-source rules without targets apply to every port; the selector names the
        // measured sources.
        s(
            "per-source bucket",
            "pass",
            rules(rule("source", unlimited(), true, false, Some(check_net()))),
            XDP_PASS,
            reason::PASS_CONFORMING,
        ),
        s(
            "per-source bucket",
            "drop",
            rules(rule("source", one_per_hour(), true, false, Some(check_net()))),
            XDP_DROP,
            reason::DROP_SOURCE_BUCKET,
        ),
        s(
            "per-(source, port) bucket",
            "pass",
            rules(rule("source-port", unlimited(), true, true, None)),
            XDP_PASS,
            reason::PASS_CONFORMING,
        ),
        s(
            "per-(source, port) bucket",
            "drop",
            rules(rule("source-port", one_per_hour(), true, true, None)),
            XDP_DROP,
            reason::DROP_SOURCE_PORT_BUCKET,
        ),
    ]
}

/// Loads the limiter with `plan`, warms it up over `sources` (every source once, so drop
/// scenarios have spent their one token and every bucket exists), and measures it.
#[expect(clippy::too_many_arguments, reason = "one bench row's whole description, spelled out at each call")]
pub fn measure_limiter(
    cfg: &Config,
    trivial: &TrivialXdp,
    what: String,
    plan: &KernelPlan,
    options: LoadOptions,
    sources: Sources,
    warm: u32,
    verdict: u32,
    reason_id: u32,
) -> Result<(Measured, usize)> {
    let mut dp = Dataplane::load(options).context("loading the XDP program")?;
    dp.apply(plan).context("applying the bench plan")?;
    let cycler = Cycler::new(dp.program_fd()?, sources.base, sources.count, sources.stride)?;
    warm_up(&cycler, warm)?;
    let tracked = dp.tracked_sources();
    let dp_ref = &dp;
    let m = measure(
        cfg,
        trivial,
        &cycler,
        sources,
        Expect {
            what: format!("{what} (expected reason {})", reason::name(reason_id)),
            verdict,
            counted: Box::new(move || Ok(dp_ref.stats()?.reason(reason_id).packets)),
        },
    )?;
    Ok((m, tracked))
}

/// Every check over each number of distinct sources.
pub fn checks(cfg: &Config, trivial: &TrivialXdp) -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    for &k in &cfg.occupancies {
        for s in scenarios() {
            let sources = Sources::new(CHECK_BASE, k);
            let what = format!("{} / {} over {k} sources", s.check, s.path);
            let (m, tracked) = measure_limiter(
                cfg,
                trivial,
                what,
                &s.plan,
                LoadOptions::default(),
                sources,
                k.max(100),
                s.verdict,
                s.reason,
            )?;
            eprintln!(
                "per-packet: {:<26} {:<4} {k:>9} sources (tracked {tracked:>9}): {:6.1} ns, x{:.1} trivial ({:.1} ns), harness {:.1} ns",
                s.check, s.path, m.cpu_ns, m.ratio, m.trivial_cpu_ns, m.harness_ns
            );
            let mut row = m.json();
            row["check"] = json!(s.check);
            row["path"] = json!(s.path);
            row["sources"] = json!(k);
            row["occupancy"] = json!(k);
            row["tracked"] = json!(tracked);
            rows.push(row);
        }
    }
    Ok(rows)
}

/// Allow and deny lists of exact hosts or of /24 prefixes, the traffic cycling over one
/// source per entry, so every entry is hit.
pub fn lists(cfg: &Config, trivial: &TrivialXdp) -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    for &n in &cfg.list_sizes {
        for kind in ["hosts", "prefixes"] {
            for list in ["allow", "deny"] {
                let (prefix, stride) = if kind == "hosts" { (32u8, 1u32) } else { (24, 256) };
                // Inside each /24, source .1.
                let offset = if kind == "hosts" { 0 } else { 1 };
                let base = Ipv4Addr::from(u32::from(LIST_BASE) + offset);
                let sources = Sources { base, count: n, stride };
                let entries: Vec<ListEntry> = (0..n)
                    .map(|i| {
                        let net = IpNet::new(IpAddr::V4(Ipv4Addr::from(u32::from(LIST_BASE) + i * stride)), prefix)
                            .unwrap_or(IpNet::from(IpAddr::V4(LIST_BASE)));
                        ListEntry { net, policy: "bench".into() }
                    })
                    .collect();
                let plan = if list == "allow" {
                    guarded(KernelPlan { allow: entries, ..Default::default() })
                } else {
                    guarded(KernelPlan { deny: entries, ..Default::default() })
                };
                let (verdict, reason_id) = if list == "allow" {
                    (XDP_PASS, reason::PASS_ALLOW_LIST)
                } else {
                    (XDP_DROP, reason::DROP_DENY_LIST)
                };
                let what = format!("{list} list of {n} {kind}");
                let (m, _) = measure_limiter(
                    cfg,
                    trivial,
                    what,
                    &plan,
                    LoadOptions::default(),
                    sources,
                    n.max(100),
                    verdict,
                    reason_id,
                )?;
                eprintln!(
                    "per-packet: {list} list hit, {n:>7} {kind:<8}: {:6.1} ns, x{:.1} trivial",
                    m.cpu_ns, m.ratio
                );
                let mut row = m.json();
                row["list"] = json!(list);
                row["kind"] = json!(kind);
                row["entries"] = json!(n);
                row["sources"] = json!(n);
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

/// Every frame from a source never seen before, with the per-source table full: the insert
/// path, which evicts the least recently used entry.
pub fn new_source(cfg: &Config, trivial: &TrivialXdp) -> Result<Value> {
    let capacity = cfg.new_source_capacity;
    // 64.0.0.0/2: a billion addresses, far more than a measurement uses.
    let sources = Sources::new(Ipv4Addr::new(64, 0, 0, 0), 1 << 30);
    let net: IpNet = "64.0.0.0/2".parse().unwrap_or(IpNet::from(IpAddr::V4(sources.base)));
    let plan = KernelPlan { rules: vec![rule("source", unlimited(), true, false, Some(net))], ..Default::default() };
    // The warm-up fills the table; the measurement's harness counter continues from there...
    let mut dp = Dataplane::load(LoadOptions { source_entries: capacity, ..Default::default() })
        .context("loading the XDP program")?;
    dp.apply(&plan).context("applying the bench plan")?;
    let cycler = Cycler::new(dp.program_fd()?, sources.base, sources.count, sources.stride)?;
    warm_up(&cycler, capacity + capacity / 8)?;
    // ...so every measured run is a source the table has not seen.
    cycler.set_next(capacity + capacity / 8)?;
    let tracked = dp.tracked_sources();
    let dp_ref = &dp;
    let m = measure(
        cfg,
        trivial,
        &cycler,
        sources,
        Expect {
            what: "per-source bucket, new source each frame".into(),
            verdict: XDP_PASS,
            counted: Box::new(move || Ok(dp_ref.stats()?.reason(reason::PASS_CONFORMING).packets)),
        },
    )?;
    let failed = dp.stats()?.reason(reason::EVENT_SOURCE_INSERT_FAILED).packets;
    eprintln!(
        "per-packet: per-source bucket, new source every frame, table of {capacity} full ({tracked} tracked): {:6.1} ns, x{:.1} trivial, {failed} inserts failed",
        m.cpu_ns, m.ratio
    );
    let mut v = m.json();
    v["capacity"] = json!(capacity);
    v["tracked"] = json!(tracked);
    v["insert_failures"] = json!(failed);
    Ok(v)
}
