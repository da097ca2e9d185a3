//! End-to-end flood over veth: the limiter (XDP, native mode on the server's veth) against an
//! nftables per-source meter with the same limit (netdev ingress hook, the earliest nftables
//! hook, on the same veth) and against no filter, with the same generator, offered rate and
//! duration.
//!
//! Topology: a client namespace and a server namespace joined by a veth pair (harness
//! `Topology`). The generator (one thread, pinned to CPU 0) writes frames from `SOURCES`
//! spoofed sources to UDP port 9000 through an AF_PACKET socket on the client end, paced in
//! 1 ms steps. The receiver is a UDP socket in the server namespace drained by a thread pinned
//! to CPU 1.
//!
//! What is counted:
//! - offered: frames the generator wrote;
//! - admitted: datagrams that reached the server's UDP layer (`Udp: InDatagrams +
//!   RcvbufErrors` of the server namespace's `/proc/net/snmp`), i.e. what the filter let
//!   through, whether or not the receiver kept up;
//! - CPU per million offered packets, whole path: the generator thread's CPU time (its
//!   AF_PACKET transmit, plus the veth receive path that the kernel runs inline in that
//!   thread when it re-enables softirqs: XDP, nftables, IP and UDP), plus the `ksoftirqd`
//!   threads (softirq work deferred out of it), plus the receiving thread. All three are the
//!   scheduler's exact per-thread run time, so other work on the machine does not leak in.
//!   The transmit share is the same for every filter (same generator, frames and rate), so
//!   differences between rows are receive-side differences. (`/proc/stat` softirq time was
//!   tried first: on this kernel it is tick-sampled at 250 Hz and system-wide, and runs
//!   varied tenfold with other work on the machine.)
//!
//! XDP on veth: in native mode veth runs the program from its NAPI poll on frames that
//! arrive as skbs from the peer, and it copies a frame into a fresh page when the skb lacks
//! XDP headroom (frames from an AF_PACKET socket do), so veth's native mode costs more per
//! packet than native mode on a NIC, where XDP runs before any skb exists. Generic mode is
//! measured too.

use std::io;
use std::net::{Ipv4Addr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use limiter_agent::dataplane::{AttachMode, Dataplane, LoadOptions};
use limiter_agent::plan::{CountKind, KernelPlan, KernelRule, Limit, PortTarget, Protocol, SourceSelector, Unit};
use limiter_tests::netns::{Netns, Topology};
use limiter_tests::packet::Packet;
use limiter_tests::rawsock::{RawSender, udp_socket};
use serde_json::{Value, json};

use crate::sys::{ksoftirqd_ns, pin_to_cpu, thread_cpu_time};
use crate::{Config, median};

const PORT: u16 = 9000;
const MARKER: &[u8] = b"limiter-bench-flood";
/// Distinct spoofed sources the flood comes from (10.77.x.y).
const SOURCES: u32 = 1000;
/// Per-source limit, the same for the limiter and nftables: 20 packets/s, depth 20 + 5.
const RATE_PER_SOURCE: u64 = 20;
const BURST: u64 = 5;
/// nftables' `limit ... burst N` bucket holds N packets (not rate + N, as measured here: with
/// `burst 5` a source got 20/s x 3 s + 4), so the same depth as the limiter's is rate + burst.
const NFT_BURST: u64 = RATE_PER_SOURCE + BURST;
/// Offered packets per second (all sources together): well inside what one core can write
/// into a veth, so every filter sees the same load.
const OFFERED_PPS: u64 = 100_000;
const SMOKE_OFFERED_PPS: u64 = 20_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Filter {
    None,
    Limiter,
    LimiterGeneric,
    Nftables,
}

impl Filter {
    fn name(self) -> &'static str {
        match self {
            Filter::None => "no filter",
            Filter::Limiter => "limiter (XDP native)",
            Filter::LimiterGeneric => "limiter (XDP generic)",
            Filter::Nftables => "nftables meter (netdev ingress)",
        }
    }
    fn key(self) -> &'static str {
        match self {
            Filter::None => "none",
            Filter::Limiter => "limiter",
            Filter::LimiterGeneric => "limiter_generic",
            Filter::Nftables => "nftables",
        }
    }
}

/// The nftables ruleset: one dynamic set keyed by source address, each element with its own
/// `limit` (a token bucket of rate + burst), in a netdev ingress chain on the server veth.
fn nft_ruleset(iface: &str) -> String {
    nft_meter_ruleset(iface, RATE_PER_SOURCE, NFT_BURST)
}

/// The same shape for any rate and depth (the NIC-like flood uses its own).
pub fn nft_meter_ruleset(iface: &str, rate: u64, depth: u64) -> String {
    format!(
        "table netdev limiter_bench {{\n\
         \tset per_source {{ type ipv4_addr; size 65536; flags dynamic,timeout; timeout 60s; }}\n\
         \tchain ingress {{\n\
         \t\ttype filter hook ingress device \"{iface}\" priority -500; policy accept;\n\
         \t\tmeta protocol ip udp dport {PORT} update @per_source {{ ip saddr limit rate over {rate}/second burst {depth} packets }} counter drop\n\
         \t}}\n\
         }}\n"
    )
}

/// Loads the nftables ruleset into `ns`; the table is deleted on drop (and with the namespace).
pub struct NftTable<'a> {
    ns: &'a Netns,
}

impl<'a> NftTable<'a> {
    fn load(ns: &'a Netns, iface: &str) -> Result<Self> {
        Self::load_ruleset(ns, &nft_ruleset(iface))
    }

    pub fn load_ruleset(ns: &'a Netns, ruleset: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("limiter-bench-{}.nft", std::process::id()));
        std::fs::write(&path, ruleset).context("writing the nftables ruleset")?;
        let path_str = path.to_string_lossy().into_owned();
        let out = ns.output(&["nft", "-f", &path_str]);
        let _ = std::fs::remove_file(&path);
        let out = out?;
        if !out.status.success() {
            bail!("nft -f failed: {} (is nftables installed? cargo xtask setup)", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Self { ns })
    }
}

impl Drop for NftTable<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.ns.exec(&["nft", "delete", "table", "netdev", "limiter_bench"]) {
            eprintln!("limiter-bench: could not delete the nftables table: {e:#}");
        }
    }
}

fn limiter_plan() -> KernelPlan {
    KernelPlan {
        rules: vec![KernelRule {
            name: "bench/per-source".into(),
            targets: vec![PortTarget { port: PORT, protocol: Protocol::Udp }],
            source: SourceSelector::everyone(true),
            count: CountKind::Packets,
            limit: Limit { requests: RATE_PER_SOURCE, unit: Unit::Second, burst: BURST },
            shadow: false,
            global: false,
        }],
        ..Default::default()
    }
}

/// `Udp: InDatagrams` and `RcvbufErrors` of the calling thread's network namespace.
fn udp_mib() -> Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/thread-self/net/snmp").context("reading /proc/thread-self/net/snmp")?;
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else { bail!("no Udp lines in /proc/net/snmp") };
    let get = |field: &str| -> Result<u64> {
        let i = names.split_whitespace().position(|n| n == field).context("missing Udp field")?;
        values.split_whitespace().nth(i).and_then(|v| v.parse().ok()).context("bad Udp value")
    };
    Ok((get("InDatagrams")?, get("RcvbufErrors")?))
}

pub fn reached_udp(ns: &Netns) -> Result<u64> {
    let (delivered, rcvbuf) = ns.run(udp_mib)?;
    Ok(delivered + rcvbuf)
}

struct RunResult {
    offered: u64,
    admitted: u64,
    received: u64,
    seconds: f64,
    /// CPU time of the `ksoftirqd/N` threads (softirq work deferred out of the sender).
    ksoftirqd_s: f64,
    receiver_s: f64,
    /// CPU time of the generator thread: its transmit path plus the receive processing the
    /// kernel runs inline when it re-enables softirqs in that thread (scheduler-accounted,
    /// so exact and untouched by other processes).
    sender_s: f64,
}

/// One flood run with whatever filter is in place.
fn flood(topo: &Topology, frames: &[Vec<u8>], pps: u64, seconds: f64) -> Result<RunResult> {
    let c = topo.client(0);
    let tx = RawSender::open(&c.ns, &c.client.name)?;
    let sock: UdpSocket = udp_socket(&topo.server, (Ipv4Addr::UNSPECIFIED, PORT).into())?;
    sock.set_read_timeout(Some(Duration::from_millis(20)))?;
    let stop = AtomicBool::new(false);
    let mib_before = reached_udp(&topo.server)?;
    let ksoftirqd_before = ksoftirqd_ns()?;
    let start = Instant::now();
    let ((offered, sender_cpu), (received, receiver_cpu)) =
        thread::scope(|s| -> Result<((u64, Duration), (u64, Duration))> {
            let receiver = s.spawn(|| -> Result<(u64, Duration)> {
                pin_to_cpu(1)?;
                let cpu0 = thread_cpu_time();
                let mut buf = [0u8; 2048];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match sock.recv(&mut buf) {
                        Ok(len) => n += u64::from(&buf[..len] == MARKER),
                        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok((n, thread_cpu_time() - cpu0))
            });
            let sender = s.spawn(|| -> Result<(u64, Duration)> {
                pin_to_cpu(0)?;
                let cpu0 = thread_cpu_time();
                let per_ms = (pps / 1000).max(1);
                let end = start + Duration::from_secs_f64(seconds);
                let mut step = Instant::now();
                let mut sent = 0u64;
                let mut i = 0usize;
                // Bounded by time and by count.
                let max = pps.saturating_mul(seconds.ceil() as u64 + 1);
                while Instant::now() < end && sent < max {
                    for _ in 0..per_ms {
                        tx.send(&frames[i % frames.len()])?;
                        i += 1;
                    }
                    sent += per_ms;
                    step += Duration::from_millis(1);
                    if let Some(wait) = step.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                }
                Ok((sent, thread_cpu_time() - cpu0))
            });
            let sent = sender.join().map_err(|_| anyhow::anyhow!("the sender thread panicked"))?;
            // Let the last frames drain through the stack before stopping the receiver.
            thread::sleep(Duration::from_millis(200));
            stop.store(true, Ordering::Relaxed);
            let received = receiver.join().map_err(|_| anyhow::anyhow!("the receiver thread panicked"))?;
            Ok((sent?, received?))
        })?;
    let elapsed = start.elapsed().as_secs_f64();
    let ksoftirqd_after = ksoftirqd_ns()?;
    let mib_after = reached_udp(&topo.server)?;
    Ok(RunResult {
        offered,
        admitted: mib_after - mib_before,
        received,
        seconds: elapsed,
        ksoftirqd_s: ksoftirqd_after.saturating_sub(ksoftirqd_before) as f64 / 1e9,
        receiver_s: receiver_cpu.as_secs_f64(),
        sender_s: sender_cpu.as_secs_f64(),
    })
}

pub fn run(cfg: &Config) -> Result<Value> {
    let pps = if cfg.smoke { SMOKE_OFFERED_PPS } else { OFFERED_PPS };
    let topo = Topology::new("bench-flood", 1).context("creating the flood namespaces")?;
    let c = topo.client(0);
    let dst = c.server.ipv4().context("server address")?;
    let frames: Vec<Vec<u8>> = (0..SOURCES)
        .map(|i| {
            let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 77, 0, 1)) + i);
            Packet::eth().dst_mac(c.server.mac).ipv4(src, dst).udp(40000, PORT).payload(MARKER).build()
        })
        .collect();
    let iface = c.server.name.clone();
    let mut rows = Vec::new();
    let mut per_filter = Vec::new();
    for filter in [Filter::None, Filter::Limiter, Filter::LimiterGeneric, Filter::Nftables] {
        let mut runs = Vec::new();
        for _ in 0..cfg.runs {
            // A fresh filter per run, so each starts with full buckets.
            let result = match filter {
                Filter::None => flood(&topo, &frames, pps, cfg.flood_seconds)?,
                Filter::Limiter | Filter::LimiterGeneric => {
                    let mut dp = Dataplane::load(LoadOptions::default()).context("loading the XDP program")?;
                    dp.apply(&limiter_plan())?;
                    let want = if filter == Filter::Limiter { AttachMode::Native } else { AttachMode::Generic };
                    topo.server.run(|| dp.attach(&iface, want))?;
                    flood(&topo, &frames, pps, cfg.flood_seconds)?
                }
                Filter::Nftables => {
                    let _nft = NftTable::load(&topo.server, &iface)?;
                    flood(&topo, &frames, pps, cfg.flood_seconds)?
                }
            };
            let cpu_ms_per_mpkt =
                (result.sender_s + result.ksoftirqd_s + result.receiver_s) * 1e3 / (result.offered as f64 / 1e6);
            eprintln!(
                "flood: {:<32} offered {:>8} in {:.2} s, admitted {:>7}, received {:>7}, ksoftirqd {:.3} s, receiver {:.3} s, sender {:.3} s => {cpu_ms_per_mpkt:.0} ms CPU per million",
                filter.name(),
                result.offered,
                result.seconds,
                result.admitted,
                result.received,
                result.ksoftirqd_s,
                result.receiver_s,
                result.sender_s
            );
            runs.push((result, cpu_ms_per_mpkt));
        }
        let col = |f: &dyn Fn(&(RunResult, f64)) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        let cpu = col(&|r| r.1);
        per_filter.push((filter, cpu));
        rows.push(json!({
            "filter": filter.key(),
            "label": filter.name(),
            "offered": col(&|r| r.0.offered as f64),
            "admitted": col(&|r| r.0.admitted as f64),
            "received": col(&|r| r.0.received as f64),
            "seconds": col(&|r| r.0.seconds),
            "ksoftirqd_s": col(&|r| r.0.ksoftirqd_s),
            "receiver_s": col(&|r| r.0.receiver_s),
            "sender_s": col(&|r| r.0.sender_s),
            "receiver_thread_ms_per_mpkt": col(&|r| r.0.receiver_s * 1e3 / (r.0.offered as f64 / 1e6)),
            "cpu_ms_per_mpkt": cpu,
            "cpu_ms_per_mpkt_runs": runs.iter().map(|r| r.1).collect::<Vec<_>>(),
        }));
    }
    let cpu_of = |f: Filter| per_filter.iter().find(|(x, _)| *x == f).map(|(_, c)| *c).unwrap_or(f64::NAN);
    let expected_admitted =
        f64::from(SOURCES) * (RATE_PER_SOURCE as f64 * cfg.flood_seconds + (RATE_PER_SOURCE + BURST) as f64);
    Ok(json!({
        "offered_pps": pps,
        "seconds": cfg.flood_seconds,
        "sources": SOURCES,
        "rate_per_source": RATE_PER_SOURCE,
        "burst": BURST,
        "expected_admitted": expected_admitted,
        "nft_ruleset": nft_ruleset(&iface),
        "rows": rows,
        "ratio_limiter_to_nftables": cpu_of(Filter::Limiter) / cpu_of(Filter::Nftables),
        "ratio_limiter_to_none": cpu_of(Filter::Limiter) / cpu_of(Filter::None),
        "ratio_limiter_generic_to_nftables": cpu_of(Filter::LimiterGeneric) / cpu_of(Filter::Nftables),
        "nft_burst": NFT_BURST,
    }))
}
