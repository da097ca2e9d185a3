//! Accuracy: packets admitted against what the configured bucket allows, for one sender and
//! for two concurrent senders (one per CPU) sharing one bucket, over veth with the program
//! attached natively to the server side (the method of the `concurrent_senders...` traffic
//! test, repeated and reported instead of asserted).
//!
//! Configured = rate x (last send - first send) + depth (rate + burst). Admitted is counted
//! by AF_PACKET receivers on the server veths, which see a frame only if XDP passed it.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use limiter_agent::dataplane::{AttachMode, Dataplane, LoadOptions};
use limiter_agent::plan::{CountKind, KernelPlan, KernelRule, Limit, PortTarget, Protocol, SourceSelector, Unit};
use limiter_tests::netns::Topology;
use limiter_tests::packet::{Packet, is_udp_to};
use limiter_tests::rawsock::{RawReceiver, RawSender};
use serde_json::{Value, json};

use crate::sys::pin_to_cpu;
use crate::{Config, median};

const PORT: u16 = 9000;
const MARKER: &[u8] = b"limiter-bench-accuracy";
/// One shared bucket: 4000 packets/s, depth 4000 + 1000.
const RATE: u64 = 4000;
const BURST: u64 = 1000;
/// Senders together offer this multiple of the rate.
const OVERLOAD: u64 = 10;

fn plan() -> KernelPlan {
    KernelPlan {
        rules: vec![KernelRule {
            name: "bench/shared".into(),
            targets: vec![PortTarget { port: PORT, protocol: Protocol::Udp }],
            source: SourceSelector::everyone(false),
            count: CountKind::Packets,
            limit: Limit { requests: RATE, unit: Unit::Second, burst: BURST },
            shadow: false,
            global: false,
        }],
        ..Default::default()
    }
}

struct Outcome {
    offered: u64,
    admitted: u64,
    configured: f64,
}

fn one_run(topo: &Topology, senders: usize, seconds: f64) -> Result<Outcome> {
    let mut dp = Dataplane::load(LoadOptions { source_entries: 4096, ..Default::default() })?;
    dp.apply(&plan())?;
    let ifaces: Vec<String> = topo.clients.iter().map(|c| c.server.name.clone()).collect();
    topo.server.run(|| -> Result<()> {
        for iface in &ifaces {
            let mode = dp.attach(iface, AttachMode::Native)?;
            if mode != "native" {
                bail!("expected native XDP on veth, got {mode}");
            }
        }
        Ok(())
    })?;
    let receivers: Vec<RawReceiver> =
        topo.clients.iter().map(|c| RawReceiver::open(&topo.server, &c.server.name)).collect::<std::io::Result<_>>()?;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let per_ms = (RATE * OVERLOAD / 1000 / senders as u64) as usize;
    let sent: Vec<(u64, u64, u64)> = thread::scope(|s| {
        let handles: Vec<_> = topo.clients[..senders]
            .iter()
            .enumerate()
            .map(|(i, c)| {
                s.spawn(move || -> Result<(u64, u64, u64)> {
                    let tx = RawSender::open(&c.ns, &c.client.name)?;
                    pin_to_cpu(i)?;
                    let frame = Packet::eth()
                        .dst_mac(c.server.mac)
                        .ipv4(c.client.ipv4().context("client address")?, c.server.ipv4().context("server address")?)
                        .udp(40000, PORT)
                        .payload(MARKER)
                        .build();
                    let mut n = 0u64;
                    let first = start.elapsed().as_nanos() as u64;
                    let mut step = Instant::now();
                    while Instant::now() < end {
                        for _ in 0..per_ms {
                            tx.send(&frame)?;
                        }
                        n += per_ms as u64;
                        step += Duration::from_millis(1);
                        if let Some(wait) = step.checked_duration_since(Instant::now()) {
                            thread::sleep(wait);
                        }
                    }
                    Ok((n, first, start.elapsed().as_nanos() as u64))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().map_err(|_| anyhow::anyhow!("sender panicked"))?).collect::<Result<_>>()
    })?;
    let offered: u64 = sent.iter().map(|s| s.0).sum();
    let first = sent.iter().map(|s| s.1).min().unwrap_or(0);
    let last = sent.iter().map(|s| s.2).max().unwrap_or(0);
    let mut admitted = 0u64;
    for rx in &receivers {
        admitted +=
            rx.count_matching(Instant::now() + Duration::from_millis(300), |f| is_udp_to(f, PORT, MARKER))? as u64;
        if rx.drops()? != 0 {
            bail!("an AF_PACKET receiver dropped frames: the count would be short");
        }
    }
    let window_s = last.saturating_sub(first) as f64 / 1e9;
    let configured = RATE as f64 * window_s + (RATE + BURST) as f64;
    Ok(Outcome { offered, admitted, configured })
}

pub fn run(cfg: &Config) -> Result<Value> {
    let topo = Topology::new("bench-acc", 2).context("creating the accuracy namespaces")?;
    let mut rows = Vec::new();
    for senders in [1usize, 2] {
        let mut outcomes = Vec::new();
        for _ in 0..cfg.runs {
            let o = one_run(&topo, senders, cfg.accuracy_seconds)?;
            eprintln!(
                "accuracy: {senders} sender(s): offered {}, admitted {}, configured {:.0} ({:+.3}%)",
                o.offered,
                o.admitted,
                o.configured,
                (o.admitted as f64 - o.configured) / o.configured * 100.0
            );
            outcomes.push(o);
        }
        let error_runs: Vec<f64> =
            outcomes.iter().map(|o| (o.admitted as f64 - o.configured) / o.configured * 100.0).collect();
        let abs_error_runs: Vec<f64> = error_runs.iter().map(|e| e.abs()).collect();
        rows.push(json!({
            "senders": senders,
            "offered": median(&outcomes.iter().map(|o| o.offered as f64).collect::<Vec<_>>()),
            "admitted": median(&outcomes.iter().map(|o| o.admitted as f64).collect::<Vec<_>>()),
            "configured": median(&outcomes.iter().map(|o| o.configured).collect::<Vec<_>>()),
            "admitted_runs": outcomes.iter().map(|o| o.admitted).collect::<Vec<_>>(),
            "configured_runs": outcomes.iter().map(|o| o.configured).collect::<Vec<_>>(),
            "signed_error_pct_runs": error_runs,
            "abs_error_pct_median": median(&abs_error_runs),
        }));
    }
    Ok(json!({ "rate": RATE, "burst": BURST, "overload": OVERLOAD, "seconds": cfg.accuracy_seconds, "rows": rows }))
}
