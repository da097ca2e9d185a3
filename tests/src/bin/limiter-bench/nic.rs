//! NIC-like flood: frames reach the shielded interface as xdp_frames, so its XDP program runs
//! before any skb exists and only what passes gets one, as on a NIC driver.
//!
//! Live-frames injection (`BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES`) is the usual
//! tool, but this machine kind refuses it with EPERM; a redirect chain gives the same
//! delivery:
//!
//! ```text
//! fwd namespace:  generator (AF_PACKET) -> g0 ==veth== f0 [XDP: bpf_redirect(s1)]
//!                                                   s1 ==veth== s0 (srv namespace, shielded)
//! ```
//!
//! f0's native XDP program redirects every frame into s1, whose veth transmit hands it as
//! an xdp_frame to s0's receive queue; s0's NAPI poll runs s0's XDP program on it, and builds
//! an skb only for what passes. s0 has threaded NAPI (`/sys/class/net/s0/threaded`), so all
//! of its receive work (XDP, skb, nftables or iptables, IP, UDP) runs in its own kernel
//! thread, pinned to CPU 1, whose scheduler run time is the receive cost measured here. The
//! generator and f0's forwarding run on CPU 0 and are the same for every filter.
//!
//! veth only receives xdp_frames while s0 has an XDP program (that is what enables its NAPI),
//! so the filters that are not XDP programs (nftables, iptables, none) sit behind the trivial
//! `XDP_PASS` program, which adds a few nanoseconds per frame.

use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::OwnedFd;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use limiter_agent::dataplane::{AttachMode, Dataplane, LoadOptions};
use limiter_agent::plan::{CountKind, KernelPlan, KernelRule, Limit, PortTarget, Protocol, SourceSelector, Unit};
use limiter_tests::netns::{Netns, VethPair};
use limiter_tests::packet::Packet;
use limiter_tests::rawsock::{RawSender, udp_socket};
use serde_json::{Value, json};

use crate::bpf::Prog;
use crate::flood::{NftTable, nft_meter_ruleset, reached_udp};
use crate::sys::{pin_thread_to_cpu, pin_to_cpu};
use crate::xdp_filter::XdpFilter;
use crate::{Config, median};

const PORT: u16 = 9000;
/// Distinct sources (10.78.x.y).
const SOURCES: u32 = 1000;
/// Per-source limit of the rate limiters: with 100 packets/s offered per source over 3 s,
/// 7/s with a depth of 7 admits (3 x 7 + 7) / 300 = 9.3% of the frames: the 90% drop mix.
const RATE_PER_SOURCE: u64 = 7;
/// Sources xdp-filter drops (the same 90% of the traffic, by address instead of by rate).
const DENIED_SOURCES: u32 = 900;
const OFFERED_PPS: u64 = 100_000;
const SMOKE_OFFERED_PPS: u64 = 20_000;
const NAPI_CPU: usize = 1;
const WARM_UP_FRAMES: usize = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[expect(clippy::enum_variant_names, reason = "XdpFilter is the peer's own name (xdp-tools' xdp-filter)")]
enum Filter {
    None,
    Limiter,
    Nftables,
    Iptables,
    XdpFilter,
}

impl Filter {
    const ALL: [Filter; 5] = [Filter::None, Filter::Limiter, Filter::Nftables, Filter::Iptables, Filter::XdpFilter];
    fn key(self) -> &'static str {
        match self {
            Filter::None => "none",
            Filter::Limiter => "limiter",
            Filter::Nftables => "nftables",
            Filter::Iptables => "iptables",
            Filter::XdpFilter => "xdp_filter",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Filter::None => "no filter (XDP_PASS)",
            Filter::Limiter => "limiter (XDP native)",
            Filter::Nftables => "nftables meter (netdev ingress)",
            Filter::Iptables => "iptables hashlimit (raw PREROUTING)",
            Filter::XdpFilter => "xdp-filter (XDP native, 900 sources denied)",
        }
    }
}

struct Chain {
    fwd: Netns,
    srv: Netns,
    /// The shielded interface (in `srv`); named after this process so its NAPI thread's name
    /// (`napi/<ifname>-<id>`) is ours alone.
    shielded: String,
    shielded_mac: [u8; 6],
    shielded_ip: Ipv4Addr,
    /// Keeps f0's redirect program attached.
    _redirect_link: OwnedFd,
    _redirect: Prog,
}

impl Chain {
    fn new() -> Result<Self> {
        let fwd = Netns::new("bench-nic-fwd")?;
        let srv = Netns::new("bench-nic-srv")?;
        VethPair::new(&fwd, "g0", &[], &fwd, "f0", &[])?;
        let shielded = format!("xs{}", std::process::id() % 100_000);
        let pair = VethPair::new(&fwd, "s1", &["10.78.255.2/16"], &srv, &shielded, &["10.78.255.1/16"])?;
        let redirect = Prog::redirect(pair.a.ifindex)?;
        let f0 = fwd.link_info("f0")?.0;
        let link = fwd.run(|| redirect.attach_native(f0))?;
        Ok(Self {
            shielded_mac: pair.b.mac,
            shielded_ip: pair.b.ipv4().context("shielded address")?,
            shielded,
            fwd,
            srv,
            _redirect_link: link,
            _redirect: redirect,
        })
    }

    /// Kernel threads `napi/<shielded>-*` and their run time so far, in ns.
    fn napi_threads(&self) -> Result<Vec<(i32, u64)>> {
        let prefix = format!("napi/{}-", self.shielded);
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").context("reading /proc")? {
            let Ok(entry) = entry else { continue };
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else { continue };
            // comm is cut at 15 bytes: compare what is left of the prefix.
            let comm = comm.trim_end();
            if !(comm.starts_with(&prefix) || (comm.len() == 15 && prefix.starts_with(comm))) {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(entry.path().join("schedstat")) else { continue };
            let ns = stat.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
            out.push((pid, ns));
        }
        Ok(out)
    }
}

struct RunResult {
    offered: u64,
    admitted: u64,
    napi_s: f64,
    threads: usize,
}

fn flood(chain: &Chain, frames: &[Vec<u8>], warm_up: &[u8], pps: u64, seconds: f64) -> Result<RunResult> {
    // veth has NAPI only while an XDP program is attached (the kernel refuses `threaded` with
    // EIO before), and makes a new one at each attach: so threaded NAPI is turned on here,
    // once the filter of this run is in place.
    chain
        .srv
        .exec(&["sh", "-c", &format!("echo 1 > /sys/class/net/{}/threaded", chain.shielded)])
        .context("enabling threaded NAPI on the shielded veth")?;
    let threads = chain.napi_threads()?;
    if threads.is_empty() {
        bail!("no NAPI thread for {} (threaded NAPI not in effect?)", chain.shielded);
    }
    for (tid, _) in &threads {
        pin_thread_to_cpu(*tid, NAPI_CPU).with_context(|| format!("pinning NAPI thread {tid}"))?;
    }
    // A socket on the port, so admitted frames end in UDP delivery (counted by the MIB even
    // when its queue is full), not in an ICMP error. Nobody reads it during the run: the
    // receiving application's work is not the receive path's.
    let sock: UdpSocket = udp_socket(&chain.srv, (Ipv4Addr::UNSPECIFIED, PORT).into())?;
    let tx = RawSender::open(&chain.fwd, "g0")?;
    // A few frames from a source outside the measured set first: the first frames after an
    // attach or a switch to threaded NAPI can be lost while the new NAPI instance starts.
    for _ in 0..WARM_UP_FRAMES {
        tx.send(warm_up)?;
    }
    thread::sleep(Duration::from_millis(100));
    let mib_before = reached_udp(&chain.srv)?;
    let napi_before: u64 = chain.napi_threads()?.iter().map(|t| t.1).sum();
    let offered = thread::scope(|s| {
        s.spawn(|| -> Result<u64> {
            pin_to_cpu(0)?;
            let start = Instant::now();
            let per_ms = (pps / 1000).max(1);
            let end = start + Duration::from_secs_f64(seconds);
            let max = pps.saturating_mul(seconds.ceil() as u64 + 1);
            let (mut sent, mut i, mut step) = (0u64, 0usize, Instant::now());
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
            Ok(sent)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the generator thread panicked"))?
    })?;
    thread::sleep(Duration::from_millis(200));
    // UDP counts a datagram in InDatagrams when it is read: drain what is still queued.
    sock.set_nonblocking(true)?;
    let mut buf = [0u8; 2048];
    while sock.recv(&mut buf).is_ok() {}
    let after = chain.napi_threads()?;
    let napi_after: u64 = after.iter().map(|t| t.1).sum();
    let mib_after = reached_udp(&chain.srv)?;
    Ok(RunResult {
        offered,
        admitted: mib_after - mib_before,
        napi_s: napi_after.saturating_sub(napi_before) as f64 / 1e9,
        threads: after.len(),
    })
}

fn limiter_plan() -> KernelPlan {
    KernelPlan {
        rules: vec![KernelRule {
            name: "bench/per-source".into(),
            targets: vec![PortTarget { port: PORT, protocol: Protocol::Udp }],
            source: SourceSelector::everyone(true),
            count: CountKind::Packets,
            limit: Limit { requests: RATE_PER_SOURCE, unit: Unit::Second, burst: 0 },
            shadow: false,
            global: false,
        }],
        ..Default::default()
    }
}

/// An iptables `hashlimit` rule in `ns` (raw table, PREROUTING: the earliest iptables hook),
/// removed on drop.
struct Hashlimit<'a> {
    ns: &'a Netns,
    args: Vec<String>,
}

impl<'a> Hashlimit<'a> {
    fn add(ns: &'a Netns, name: &str) -> Result<Self> {
        let rate = format!("{RATE_PER_SOURCE}/sec");
        let burst = RATE_PER_SOURCE.to_string();
        let port = PORT.to_string();
        let args: Vec<String> = [
            "PREROUTING",
            "-p",
            "udp",
            "--dport",
            &port,
            "-m",
            "hashlimit",
            "--hashlimit-mode",
            "srcip",
            "--hashlimit-above",
            &rate,
            "--hashlimit-burst",
            &burst,
            "--hashlimit-name",
            name,
            "-j",
            "DROP",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let mut full = vec!["iptables", "-t", "raw", "-A"];
        full.extend(args.iter().map(String::as_str));
        ns.exec(&full).context("adding the iptables hashlimit rule (is iptables installed? cargo xtask setup)")?;
        Ok(Self { ns, args })
    }
}

impl Drop for Hashlimit<'_> {
    fn drop(&mut self) {
        let mut full = vec!["iptables", "-t", "raw", "-D"];
        full.extend(self.args.iter().map(String::as_str));
        if let Err(e) = self.ns.exec(&full) {
            eprintln!("limiter-bench: could not remove the iptables rule: {e:#}");
        }
    }
}

pub fn run(cfg: &Config) -> Result<Value> {
    let pps = if cfg.smoke { SMOKE_OFFERED_PPS } else { OFFERED_PPS };
    let chain = Chain::new().context("building the redirect chain")?;
    let sources: Vec<Ipv4Addr> =
        (0..SOURCES).map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 78, 0, 1)) + i)).collect();
    let frames: Vec<Vec<u8>> = sources
        .iter()
        .map(|&src| {
            Packet::eth()
                .dst_mac(chain.shielded_mac)
                .ipv4(src, chain.shielded_ip)
                .udp(40000, PORT)
                .payload(&[0u8; 18])
                .build()
        })
        .collect();
    let warm_up = Packet::eth()
        .dst_mac(chain.shielded_mac)
        .ipv4(Ipv4Addr::new(10, 79, 0, 1), chain.shielded_ip)
        .udp(40000, PORT + 1)
        .payload(&[0u8; 18])
        .build();
    let trivial = Prog::trivial()?;
    let ifindex = chain.srv.link_info(&chain.shielded)?.0;
    // Round robin: run 1 of every filter, then run 2 of every filter, and so on. The receive
    // cost on a shared VM drifts by a factor of two or three over a minute (other work, the
    // host); taking each filter's runs in one block would hand that drift to whichever filter
    // ran in the bad minute.
    let mut runs_of: Vec<Vec<(RunResult, f64)>> = Filter::ALL.iter().map(|_| Vec::new()).collect();
    for run in 0..cfg.runs {
        for (filter, runs) in Filter::ALL.into_iter().zip(runs_of.iter_mut()) {
            // A fresh filter per run, so each starts with full buckets.
            let result = match filter {
                Filter::None => {
                    let _link = chain.srv.run(|| trivial.attach_native(ifindex))?;
                    flood(&chain, &frames, &warm_up, pps, cfg.flood_seconds)?
                }
                Filter::Limiter => {
                    let mut dp = Dataplane::load(LoadOptions::default()).context("loading the XDP program")?;
                    dp.apply(&limiter_plan())?;
                    chain.srv.run(|| dp.attach(&chain.shielded, AttachMode::Native))?;
                    flood(&chain, &frames, &warm_up, pps, cfg.flood_seconds)?
                }
                Filter::Nftables => {
                    let _link = chain.srv.run(|| trivial.attach_native(ifindex))?;
                    let ruleset = nft_meter_ruleset(&chain.shielded, RATE_PER_SOURCE, RATE_PER_SOURCE);
                    let _nft = NftTable::load_ruleset(&chain.srv, &ruleset)?;
                    flood(&chain, &frames, &warm_up, pps, cfg.flood_seconds)?
                }
                Filter::Iptables => {
                    let _link = chain.srv.run(|| trivial.attach_native(ifindex))?;
                    let _rule = Hashlimit::add(&chain.srv, &format!("lb{run}"))?;
                    flood(&chain, &frames, &warm_up, pps, cfg.flood_seconds)?
                }
                Filter::XdpFilter => {
                    let mut xf = XdpFilter::load(&chain.srv, &chain.shielded)?;
                    xf.deny_sources(&sources[..DENIED_SOURCES as usize])?;
                    flood(&chain, &frames, &warm_up, pps, cfg.flood_seconds)?
                }
            };
            let ms_per_mframe = result.napi_s * 1e3 / (result.offered as f64 / 1e6);
            eprintln!(
                "nic-like flood: {:<44} offered {:>8}, admitted {:>7} ({:.1}%), NAPI thread(s) {} {:.3} s => {ms_per_mframe:.0} ms CPU per million frames",
                filter.label(),
                result.offered,
                result.admitted,
                100.0 * result.admitted as f64 / result.offered as f64,
                result.threads,
                result.napi_s
            );
            runs.push((result, ms_per_mframe));
        }
    }
    let mut rows = Vec::new();
    let mut cpu_of = Vec::new();
    for (filter, runs) in Filter::ALL.into_iter().zip(runs_of) {
        let col = |f: &dyn Fn(&(RunResult, f64)) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        let cpu = col(&|r| r.1);
        cpu_of.push((filter, cpu));
        rows.push(json!({
            "filter": filter.key(),
            "label": filter.label(),
            "offered": col(&|r| r.0.offered as f64),
            "admitted": col(&|r| r.0.admitted as f64),
            "admitted_share": col(&|r| r.0.admitted as f64 / r.0.offered as f64),
            "napi_s": col(&|r| r.0.napi_s),
            "cpu_ms_per_mframe": cpu,
            "cpu_ms_per_mframe_runs": runs.iter().map(|r| r.1).collect::<Vec<_>>(),
        }));
    }
    let cpu = |f: Filter| cpu_of.iter().find(|(x, _)| *x == f).map(|(_, c)| *c).unwrap_or(f64::NAN);
    Ok(json!({
        "method": "redirect chain (live-frames BPF_PROG_TEST_RUN is refused with EPERM here)",
        "offered_pps": pps,
        "seconds": cfg.flood_seconds,
        "sources": SOURCES,
        "rate_per_source": RATE_PER_SOURCE,
        "denied_sources": DENIED_SOURCES,
        "rows": rows,
        "ratio_limiter_to_nftables": cpu(Filter::Limiter) / cpu(Filter::Nftables),
        "ratio_limiter_to_iptables": cpu(Filter::Limiter) / cpu(Filter::Iptables),
        "ratio_limiter_to_xdp_filter": cpu(Filter::Limiter) / cpu(Filter::XdpFilter),
        "ratio_limiter_to_none": cpu(Filter::Limiter) / cpu(Filter::None),
    }))
}
