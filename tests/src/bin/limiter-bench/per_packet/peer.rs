//! Debian xdp-tools' `xdp-filter` timed by the same harness on the same frames as the
//! limiter: its matched path (the source is in its deny list) against the limiter's deny
//! hit, its unmatched path (no list matches, the frame passes) against the limiter's
//! per-source bucket pass, at the same numbers of sources and list entries.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result};
use aya::maps::{Map, MapData, PerCpuArray};
use limiter_agent::dataplane::LoadOptions;
use limiter_common::{XDP_DROP, XDP_PASS};
use limiter_tests::netns::{Netns, VethPair};
use serde_json::{Value, json};

use super::limiter::{CHECK_BASE, LIST_BASE, measure_limiter, scenarios};
use super::{Expect, Measured, Sources, measure, warm_up};
use crate::Config;
use crate::bpf::{Cycler, TrivialXdp};
use crate::xdp_filter::{IPV4_CAPACITY, XdpFilter};

/// xdp-filter's per-action packet counters (`xdp_stats_map`: per-CPU array indexed by XDP
/// action, values `{rx_packets, rx_bytes}`).
fn action_packets(stats: &PerCpuArray<MapData, [u64; 2]>, action: u32) -> Result<u64> {
    Ok(stats.get(&action, 0).context("reading xdp-filter's stats")?.iter().map(|v| v[0]).sum())
}

fn measure_filter(
    cfg: &Config,
    trivial: &TrivialXdp,
    filter: &XdpFilter<'_>,
    stats: &PerCpuArray<MapData, [u64; 2]>,
    sources: Sources,
    matched: bool,
) -> Result<Measured> {
    let prog = filter.program()?;
    let cycler = Cycler::new(prog.fd(), sources.base, sources.count, sources.stride)?;
    warm_up(&cycler, sources.count.max(100))?;
    let action = if matched { XDP_DROP } else { XDP_PASS };
    measure(
        cfg,
        trivial,
        &cycler,
        sources,
        Expect {
            what: format!(
                "xdp-filter {} over {} sources",
                if matched { "matched" } else { "unmatched" },
                sources.count
            ),
            verdict: action,
            counted: Box::new(move || action_packets(stats, action)),
        },
    )
}

pub fn run(cfg: &Config, trivial: &TrivialXdp) -> Result<Value> {
    let ns = Netns::new("bench-xdpfilter").context("creating the xdp-filter namespace")?;
    // The measured counters are xdp-filter's own per-action counts, which a real frame on the
    // link would add to: no IPv6 on it means no router or neighbour solicitations.
    ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
    ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
    VethPair::new(&ns, "xf0", &[], &ns, "xf1", &[])?;
    let mut filter = XdpFilter::load(&ns, "xf0")?;
    let stats_path = filter.pin_dir().join("xdp_stats_map");
    let stats: PerCpuArray<MapData, [u64; 2]> = PerCpuArray::try_from(Map::PerCpuArray(
        MapData::from_pin(&stats_path).with_context(|| format!("opening {}", stats_path.display()))?,
    ))
    .context("xdp-filter's stats map")?;
    let mut rows = Vec::new();
    // Matched: the deny list holds exactly the sources the traffic cycles over (exact hosts:
    // xdp-filter has no prefixes), as the limiter's host lists in the same run.
    let mut listed = 0u32;
    for &n in cfg.list_sizes.iter().filter(|&&n| n as usize <= IPV4_CAPACITY) {
        let sources = Sources::new(LIST_BASE, n);
        let addrs: Vec<Ipv4Addr> = (listed..n).map(|i| sources.nth(i)).collect();
        filter.deny_sources(&addrs)?;
        listed = n;
        let m = measure_filter(cfg, trivial, &filter, &stats, sources, true)?;
        eprintln!("per-packet: xdp-filter matched, {n:>7} hosts listed: {:6.1} ns, x{:.1} trivial", m.cpu_ns, m.ratio);
        let mut row = m.json();
        row["path"] = json!("matched");
        row["entries"] = json!(n);
        row["sources"] = json!(n);
        rows.push(row);
    }
    // Unmatched: the same sources as the limiter's checks, none of them listed.
    for &k in &cfg.occupancies {
        let m = measure_filter(cfg, trivial, &filter, &stats, Sources::new(CHECK_BASE, k), false)?;
        eprintln!("per-packet: xdp-filter unmatched, {k:>9} sources: {:6.1} ns, x{:.1} trivial", m.cpu_ns, m.ratio);
        let mut row = m.json();
        row["path"] = json!("unmatched");
        row["entries"] = json!(listed);
        row["sources"] = json!(k);
        rows.push(row);
    }
    drop(filter);
    // The limiter's one-source figures again, measured right beside the peer's, for the ratios.
    let mut limiter = Vec::new();
    for s in
        scenarios().into_iter().filter(|s| matches!((s.check, s.path), ("deny hit", _) | ("per-source bucket", "pass")))
    {
        let (m, _) = measure_limiter(
            cfg,
            trivial,
            format!("{} / {}", s.check, s.path),
            &s.plan,
            LoadOptions::default(),
            Sources::new(CHECK_BASE, 1),
            100,
            s.verdict,
            s.reason,
        )?;
        let mut row = m.json();
        row["check"] = json!(s.check);
        row["path"] = json!(s.path);
        limiter.push(row);
    }
    Ok(json!({
        "program": crate::xdp_filter::PROGRAM,
        "features": "tcp,udp,ipv6,ipv4,ethernet (default), policy allow, native mode, no dispatcher",
        "rows": rows,
        "limiter_beside": limiter,
    }))
}
