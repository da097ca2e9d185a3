//! The SYN proxy (run only with `--only synproxy`).
//!
//! - **SYN-ACKs per second per core**: the kernel-measured time of one run of the program on
//!   a SYN to a proxied port (parse, hand-over by tail call, socket lookup, checksums, cookie,
//!   SYN-ACK built and `XDP_TX`), through `BPF_PROG_TEST_RUN`, less the same for a trivial XDP
//!   program (the harness's floor). Each run rewrites the frame into its SYN-ACK, so runs are
//!   single (`repeat` 1), many of them, median over runs of the mean; the per-run timer's own
//!   cost is what the trivial program's figure takes out. Beside it, the same program on the
//!   same SYN with the proxy off (no rule: parsed, judged and passed).
//! - **Legitimate success ratio under a spoofed flood**: the setup (a 100/s burst 20
//!   `Connections` ceiling on TCP 9100; client 0 floods spoofed SYNs through an AF_PACKET
//!   socket at 1x, 10x and 100x the ceiling; client 1 opens a connection every 100 ms, each
//!   given 1 s), with the proxy off and on: the share of legitimate connections made.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use limiter_agent::{
    dataplane::{AttachMode, Dataplane, LoadOptions},
    plan::{
        CountKind, KernelPlan, KernelRule, Limit, PortTarget, Protocol, SourceSelector, SynproxyMode, SynproxyTarget,
        Unit,
    },
    synproxy as nft,
};
use limiter_tests::{
    netns::{Netns, Topology},
    packet::Packet,
    rawsock::RawSender,
    synproxy::{client_side_xdp, spoofed_syn},
};
use rand::{Rng, SeedableRng, rngs::SmallRng};
use serde_json::{Value, json};

use crate::{Config, bpf::TrivialXdp, median};

const PORT: u16 = 9100;
const CEILING: u64 = 100;

fn plan(proxy: bool) -> KernelPlan {
    KernelPlan {
        rules: vec![KernelRule {
            name: "bench/ceiling".into(),
            targets: vec![PortTarget { port: PORT, protocol: Protocol::Tcp }],
            source: SourceSelector::everyone(false),
            count: CountKind::Connections,
            limit: Limit { requests: CEILING, unit: Unit::Second, burst: 20 },
            shadow: false,
            global: false,
        }],
        synproxy: if proxy {
            vec![SynproxyTarget { port: PORT, mode: SynproxyMode::Always, policy: "bench".into() }]
        } else {
            Vec::new()
        },
        ..Default::default()
    }
}

/// Removes the netfilter half from `ns` on drop.
struct NftGuard<'a>(&'a Netns);

impl Drop for NftGuard<'_> {
    fn drop(&mut self) {
        let _ = self.0.run(nft::remove);
    }
}

pub fn run(cfg: &Config) -> Result<Value> {
    let mut cost = synack_cost(cfg)?;
    cost["marker"] = marker_cost(cfg)?;
    let mut rows = Vec::new();
    for multiple in [1u64, 10, 100] {
        for proxy in [false, true] {
            rows.push(success(cfg, multiple, proxy)?);
        }
    }
    Ok(json!({ "cost": cost, "rows": rows, "ceiling_per_second": CEILING }))
}

fn synack_cost(cfg: &Config) -> Result<Value> {
    let ns = Netns::new("bench-synp")?;
    let _nft = NftGuard(&ns);
    let singles = if cfg.smoke { 2_000 } else { 50_000 };
    let syn = Packet::eth()
        .ip(Ipv4Addr::new(198, 51, 100, 7).into(), Ipv4Addr::new(192, 0, 2, 1).into())
        .tcp(40_000, PORT)
        .seq(1000)
        .syn()
        .tcp_options(&[2, 4, 5, 180, 4, 2, 8, 10, 0, 0, 0, 9, 0, 0, 0, 0, 1, 3, 3, 7])
        .build();
    let trivial = TrivialXdp::trivial()?;
    let mean_ns = |run: &mut dyn FnMut() -> Result<(u32, Duration)>, want: u32| -> Result<f64> {
        let mut total = 0u128;
        for _ in 0..singles {
            let (verdict, d) = run()?;
            anyhow::ensure!(verdict == want, "verdict {verdict}, expected {want}");
            total += d.as_nanos();
        }
        Ok(total as f64 / singles as f64)
    };
    let (mut proxied, mut passed, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    ns.run(|| -> Result<()> {
        for proxy in [true, false] {
            let mut dp = Dataplane::load(LoadOptions::default()).context("load the XDP programs")?;
            // No rule: a run is the proxy alone, or the main program passing the SYN (the
            // ceiling would start dropping after its burst).
            let bare = KernelPlan { rules: Vec::new(), ..plan(proxy) };
            dp.apply(&bare).context("apply")?;
            for _ in 0..cfg.runs {
                let ns = mean_ns(&mut || dp.test_run_repeat(&syn, 1).map_err(Into::into), if proxy { 3 } else { 2 })?;
                if proxy {
                    proxied.push(ns)
                } else {
                    passed.push(ns)
                }
                if proxy {
                    floor.push(mean_ns(&mut || trivial.test_run(&syn, 1), 2)?);
                }
            }
        }
        Ok(())
    })?;
    let synack_ns = (median(&proxied) - median(&floor)).max(1.0);
    Ok(json!({
        "single_runs": singles,
        "proxied_ns": median(&proxied),
        "passed_ns": median(&passed),
        "floor_ns": median(&floor),
        "synack_ns": synack_ns,
        "synacks_per_second_per_core": 1e9 / synack_ns,
        "runs_detail": {"proxied": proxied, "passed": passed, "floor": floor},
    }))
}

/// The TC-ingress marker's cost per segment, kernel-measured (`repeat` runs per call, the
/// mean of each call, median over calls): with no port proxied (the price every attached
/// interface pays), and on an ACK of an established connection of a proxied port (the socket
/// lookup that lets connections older than conntrack through). The connection is real, over
/// the namespace's loopback, where test runs arrive.
fn marker_cost(cfg: &Config) -> Result<Value> {
    let ns = Netns::new("bench-synpm")?;
    let _nft = NftGuard(&ns);
    let repeat = if cfg.smoke { 1_000 } else { 100_000 };
    let calls = if cfg.smoke { 3 } else { 20 };
    ns.run(|| -> Result<Value> {
        std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status()?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, PORT))?;
        let client = TcpStream::connect((Ipv4Addr::LOCALHOST, PORT))?;
        let _accepted = listener.accept()?;
        let lo = Ipv4Addr::LOCALHOST.into();
        let ack = Packet::eth().ip(lo, lo).tcp(client.local_addr()?.port(), PORT).seq(1).ack().build();
        let mut dp = Dataplane::load(LoadOptions::default()).context("load the programs")?;
        let measure = |dp: &mut Dataplane, want: u32| -> Result<f64> {
            let mut means = Vec::new();
            for _ in 0..calls {
                let (mark, d) = dp.marker_test_run(&ack, repeat)?;
                anyhow::ensure!(mark == want, "mark {mark:#x}, expected {want:#x}");
                means.push(d.as_nanos() as f64);
            }
            Ok(median(&means))
        };
        let trivial = crate::bpf::Prog::trivial_tc()?;
        let mut floors = Vec::new();
        for _ in 0..calls {
            floors.push(trivial.test_run(&ack, repeat)?.1.as_nanos() as f64);
        }
        let floor_ns = median(&floors);
        dp.apply(&KernelPlan { rules: Vec::new(), ..plan(false) })?;
        let idle_ns = measure(&mut dp, 0)?;
        dp.apply(&KernelPlan { rules: Vec::new(), ..plan(true) })?;
        let established_ns = measure(&mut dp, limiter_common::synproxy::SYNPROXY_ESTABLISHED_MARK)?;
        Ok(json!({
            "repeat": repeat,
            "calls": calls,
            "floor_ns": floor_ns,
            "idle_ns": idle_ns,
            "established_ns": established_ns,
            "idle_over_floor_ns": (idle_ns - floor_ns).max(0.0),
            "established_over_floor_ns": (established_ns - floor_ns).max(0.0),
        }))
    })
}

/// One flood run: the share of legitimate connections made.
fn success(cfg: &Config, multiple: u64, proxy: bool) -> Result<Value> {
    let seconds = if cfg.smoke { 1.0 } else { 3.0 };
    let mut ratios = Vec::new();
    let mut synacks = Vec::new();
    let (mut ceiling_passed, mut ceiling_dropped) = (Vec::new(), Vec::new());
    for _ in 0..cfg.runs.min(3) {
        let topo = Topology::new("bench-synp", 2)?;
        let _nft = NftGuard(&topo.server);
        let mut dp = Dataplane::load(LoadOptions::default()).context("load the XDP programs")?;
        let ifaces: Vec<String> = topo.clients.iter().map(|c| c.server.name.clone()).collect();
        topo.server.run(|| -> Result<()> {
            dp.apply(&plan(proxy)).context("apply")?;
            for iface in &ifaces {
                dp.attach(iface, AttachMode::Native).context("attach")?;
            }
            Ok(())
        })?;
        let _peers = client_side_xdp(&topo)?;
        let listener = topo.server.run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)))?;
        listener.set_nonblocking(true)?;
        let (attacker, legit) = (topo.client(0), topo.client(1));
        let tx = RawSender::open(&attacker.ns, &attacker.client.name)?;
        let (mac, attacked): ([u8; 6], IpAddr) = (attacker.server.mac, attacker.server.ipv4().unwrap().into());
        let server: SocketAddr = (legit.server.ipv4().unwrap(), PORT).into();
        let rate = CEILING * multiple;
        let attempts = (seconds * 10.0) as usize;
        let done = AtomicBool::new(false);
        let made = thread::scope(|s| -> Result<usize> {
            let done = &done;
            s.spawn(move || {
                let mut rng = SmallRng::seed_from_u64(multiple);
                let start = Instant::now();
                let mut sent = 0u64;
                // Paced in 1 ms steps, as evenly as hping3's `-i u1000`: a generator that sends
                // in coarser bursts leaves the shared bucket's refills to whoever comes between
                // two bursts, which flatters the unproxied rows.
                // Until the legitimate client is done (each failed attempt takes its whole second,
                // so the series outlasts its nominal length), bounded.
                let bound = seconds + 1.5 + attempts as f64;
                while !done.load(Ordering::Relaxed) && start.elapsed().as_secs_f64() < bound {
                    let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                    while sent < due {
                        let _ = tx.send(&spoofed_syn(&mut rng, mac, attacked, PORT));
                        sent += 1;
                    }
                    thread::sleep(Duration::from_millis(1));
                }
            });
            thread::sleep(Duration::from_millis(500));
            let made = legit.ns.run(|| {
                let mut jitter = SmallRng::seed_from_u64(multiple + 1000);
                (0..attempts)
                    .filter(|_| {
                        let start = Instant::now();
                        // A random offset within the flood's pacing step: both generators wake
                        // on the same timer ticks, and a client that always sends just after a
                        // tick meets the bucket's refill before the flood does.
                        thread::sleep(Duration::from_micros(jitter.random_range(0..1_000)));
                        let ok = TcpStream::connect_timeout(&server, Duration::from_secs(1)).is_ok();
                        if let Some(rest) = Duration::from_millis(100).checked_sub(start.elapsed()) {
                            thread::sleep(rest);
                        }
                        ok
                    })
                    .count()
            });
            done.store(true, Ordering::Relaxed);
            // Drain the accept queue so it never fills.
            while listener.accept().is_ok() {}
            Ok(made)
        })?;
        ratios.push(made as f64 / attempts as f64);
        let ceiling = dp.stats()?.rules.get("bench/ceiling").copied().unwrap_or_default();
        ceiling_passed.push(ceiling.passed.packets as f64);
        ceiling_dropped.push(ceiling.dropped.packets as f64);
        synacks.push(dp.synproxy_stats()?[limiter_common::synproxy::event::SYNACK_SENT as usize].packets as f64);
    }
    Ok(json!({
        "multiple": multiple,
        "flood_per_second": CEILING * multiple,
        "proxy": proxy,
        "seconds": seconds,
        "success_ratio": median(&ratios),
        "synacks_from_xdp": median(&synacks),
        "ceiling_passed": median(&ceiling_passed),
        "ceiling_dropped": median(&ceiling_dropped),
        "runs_detail": ratios,
    }))
}
