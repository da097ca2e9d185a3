//! The SYN proxy's side of the data path: its XDP program (reached by a tail call from the
//! main program), its tail-call table, its per-port entries and its counters. The nftables
//! half (netfilter SYNPROXY, which completes the handshakes) is `crate::synproxy`.

use std::path::Path;

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray, ProgramArray},
    programs::{
        SchedClassifier, TcAttachType, TestRun as _, Xdp,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
    },
};
use limiter_common::{
    Counter, PortKey,
    bucket::BucketParams,
    synproxy::{
        PROG_MAIN, PROG_SYNPROXY, SYNPROXY_MODE_ALWAYS, SYNPROXY_MODE_THRESHOLD, SynproxyPort, event, names, port_key,
    },
};
use log::{info, warn};

use super::{DataplaneError, Result, ignore_missing, map_err, take};
use crate::plan::{KernelPlan, SynproxyMode};

/// What the SYN-ACKs announce for the server. netfilter SYNPROXY does not rescale windows or
/// rewrite MSS between the client and the server, so these must be what the listener itself
/// would announce: the agent reads them from the host (see [`SynproxyHost::detect`]) and writes
/// the same into the nftables `synproxy` statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynproxyHost {
    pub mss4: u16,
    pub mss6: u16,
    pub wscale: u8,
    pub ttl: u8,
}

impl Default for SynproxyHost {
    /// Ethernet (MTU 1500) and Linux's defaults.
    fn default() -> Self {
        Self { mss4: 1460, mss6: 1440, wscale: 7, ttl: 64 }
    }
}

impl SynproxyHost {
    /// The values of the calling thread's network namespace: window scale as
    /// `tcp_select_initial_window` computes it from `tcp_rmem[2]` and `rmem_max`; TTL from
    /// `ip_default_ttl`; MSS for an MTU of 1500 (a listener behind a smaller MTU announces
    /// less; the client then sends at most what we announced, which the path must carry).
    pub fn detect() -> Self {
        let read = |p: &str| std::fs::read_to_string(Path::new(p)).ok();
        let mut host = Self::default();
        let rmem_max = read("/proc/sys/net/core/rmem_max").and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
        let tcp_rmem = read("/proc/sys/net/ipv4/tcp_rmem")
            .and_then(|s| s.split_whitespace().nth(2).and_then(|v| v.parse::<u64>().ok()))
            .unwrap_or(0);
        let space = rmem_max.max(tcp_rmem);
        if space > 0 {
            host.wscale = wscale_for(space);
        }
        if let Some(ttl) = read("/proc/sys/net/ipv4/ip_default_ttl").and_then(|s| s.trim().parse::<u8>().ok()) {
            host.ttl = ttl;
        }
        host
    }
}

/// The window scale Linux announces for a receive space of `space` bytes.
pub fn wscale_for(space: u64) -> u8 {
    let log2 = 63 - space.max(1).leading_zeros() as i64;
    (log2 - 15).clamp(0, 14) as u8
}

/// Loads the proxy program and puts both programs in the tail-call table: the main program
/// first, so the proxy never finds its way back missing. With a pinned table (the shield kept
/// across agents) this swaps the running programs' successors in place.
pub(super) fn load_program(ebpf: &mut Ebpf) -> Result<()> {
    let main_fd = {
        let main: &mut Xdp = ebpf
            .program_mut(limiter_common::names::PROGRAM)
            .ok_or(DataplaneError::MissingMap { name: limiter_common::names::PROGRAM })?
            .try_into()
            .map_err(DataplaneError::Verify)?;
        main.fd().map_err(DataplaneError::Verify)?.try_clone().map_err(|e| DataplaneError::Synproxy(e.to_string()))?
    };
    let proxy: &mut Xdp = ebpf
        .program_mut(names::PROGRAM)
        .ok_or(DataplaneError::MissingMap { name: names::PROGRAM })?
        .try_into()
        .map_err(DataplaneError::Verify)?;
    proxy.load().map_err(DataplaneError::Verify)?;
    let proxy_fd =
        proxy.fd().map_err(DataplaneError::Verify)?.try_clone().map_err(|e| DataplaneError::Synproxy(e.to_string()))?;
    let map = ebpf.map_mut(names::PROGRAMS).ok_or(DataplaneError::MissingMap { name: names::PROGRAMS })?;
    let mut programs = ProgramArray::try_from(map).map_err(map_err(names::PROGRAMS, "opening"))?;
    programs.set(PROG_MAIN, &main_fd, 0).map_err(map_err(names::PROGRAMS, "setting the main program"))?;
    programs.set(PROG_SYNPROXY, &proxy_fd, 0).map_err(map_err(names::PROGRAMS, "setting the proxy program"))?;
    Ok(())
}

/// Loads the TC-ingress marker (`limiter-ebpf/src/established.rs`): it sets
/// `SYNPROXY_ESTABLISHED_MARK` on segments of proxied ports that have a socket, so the
/// netfilter half lets through connections that were open before conntrack tracked them.
pub(super) fn load_marker(ebpf: &mut Ebpf) -> Result<()> {
    marker(ebpf)?.load().map_err(DataplaneError::Verify)
}

fn marker(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    ebpf.program_mut(names::ESTABLISHED_PROGRAM)
        .ok_or(DataplaneError::MissingMap { name: names::ESTABLISHED_PROGRAM })?
        .try_into()
        .map_err(DataplaneError::Verify)
}

/// Attaches the marker to the TC ingress of `iface` (a TCX link, kernel 6.6+). Unpinned
/// (`pin` `None`), the link belongs to the program and goes with the `Dataplane`. Pinned, a
/// live link at `pin` gets this agent's program in place (`bpf_link_update`, no moment
/// without a marker), else a new link is attached and pinned there, beside the XDP link.
pub(super) fn attach_marker(ebpf: &mut Ebpf, iface: &str, pin: Option<&Path>) -> Result<()> {
    let err = |action: &'static str| {
        let iface = iface.to_owned();
        move |e: String| DataplaneError::Link { iface, action, detail: format!("TC ingress (SYN proxy marker): {e}") }
    };
    let program = marker(ebpf)?;
    let Some(pin) = pin else {
        program.attach(iface, TcAttachType::Ingress).map_err(|e| err("attaching")(e.to_string()))?;
        return Ok(());
    };
    if pin.exists() {
        let kept = PinnedLink::from_pin(pin)
            .map_err(|e| e.to_string())
            .and_then(|p| SchedClassifierLink::try_from(FdLink::from(p)).map_err(|e| e.to_string()))
            .and_then(|link| program.attach_to_link(link).map_err(|e| e.to_string()));
        match kept {
            Ok(_) => {
                info!("{iface}: kept its pinned TC marker link; program replaced in place");
                return Ok(());
            }
            // An interface deleted and made again leaves its old link defunct.
            Err(e) => warn!("{iface}: the pinned TC marker link {} is unusable ({e}); attaching anew", pin.display()),
        }
        let _ = std::fs::remove_file(pin);
    }
    let id = program.attach(iface, TcAttachType::Ingress).map_err(|e| err("attaching")(e.to_string()))?;
    let link = program.take_link(id).map_err(|e| err("taking the link")(e.to_string()))?;
    let fd = FdLink::try_from(link)
        .map_err(|_| err("pinning")("attached through netlink, not TCX: pinning needs kernel 6.6".into()))?;
    fd.pin(pin).map_err(|e| err("pinning")(e.to_string()))?;
    Ok(())
}

/// Runs the marker on `frame` `repeat` times in the kernel (`BPF_PROG_TEST_RUN`, in the
/// calling thread's network namespace): returns the `skb->mark` it left and the kernel's mean
/// duration per run. Tests and benchmarks only.
pub(super) fn marker_test_run(ebpf: &mut Ebpf, frame: &[u8], repeat: u32) -> Result<(u32, std::time::Duration)> {
    // In: the head of `struct __sk_buff` up to and including `mark` (`len` and `pkt_type` must
    // be zero). Out: room for the whole struct (192 bytes today), or the kernel refuses with
    // ENOSPC; `mark` is at offset 8.
    let ctx_in = [0u8; 12];
    let mut ctx_out = [0u8; 256];
    let mut opts = aya::programs::TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.ctx_in = Some(&ctx_in);
    opts.ctx_out = Some(&mut ctx_out);
    opts.repeat = repeat.max(1);
    let result = marker(ebpf)?.test_run(opts).map_err(DataplaneError::TestRun)?;
    let mark = u32::from_ne_bytes([ctx_out[8], ctx_out[9], ctx_out[10], ctx_out[11]]);
    Ok((mark, result.duration))
}

/// The proxy's maps, owned by the `Dataplane`.
pub(super) struct SynproxyMaps {
    ports: HashMap<MapData, PortKey, SynproxyPort>,
    stats: PerCpuArray<MapData, Counter>,
    pub(super) host: SynproxyHost,
}

impl SynproxyMaps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            ports: take(ebpf, names::SYNPROXY_PORTS)?,
            stats: take(ebpf, names::SYNPROXY_STATS)?,
            host: SynproxyHost::detect(),
        })
    }

    /// Replaces the entries of (inactive) `set` with the plan's proxied ports.
    pub(super) fn write_set(&mut self, set: u8, plan: &KernelPlan) -> Result<()> {
        self.clear_set(set)?;
        if !plan.synproxy.is_empty() {
            // The namespace applying the plan is the one whose listeners the SYN-ACKs speak for.
            self.host = SynproxyHost::detect();
        }
        for target in &plan.synproxy {
            let value = entry(target.mode, self.host)?;
            self.ports
                .insert(port_key(target.port, set), value, 0)
                .map_err(map_err(names::SYNPROXY_PORTS, "writing a port"))?;
        }
        Ok(())
    }

    fn clear_set(&mut self, set: u8) -> Result<()> {
        let old: Vec<PortKey> = self.ports.keys().filter_map(|k| k.ok()).filter(|k| k.set == set).collect();
        for k in old {
            ignore_missing(self.ports.remove(&k)).map_err(map_err(names::SYNPROXY_PORTS, "removing"))?;
        }
        Ok(())
    }

    /// Whether `set` proxies any port (`CONFIG_FLAG_SYNPROXY`).
    pub(super) fn any_in_set(&self, set: u8) -> bool {
        self.ports.keys().filter_map(|k| k.ok()).any(|k| k.set == set)
    }

    /// Counters summed over CPUs, indexed by `limiter_common::synproxy::event`.
    pub(super) fn stats(&self) -> Result<Vec<Counter>> {
        (0..event::COUNT)
            .map(|e| {
                let per_cpu = self.stats.get(&e, 0).map_err(map_err(names::SYNPROXY_STATS, "reading"))?;
                Ok(per_cpu.iter().fold(Counter::default(), |mut c, x| {
                    c.packets += x.packets;
                    c.bytes += x.bytes;
                    c
                }))
            })
            .collect()
    }
}

/// The proxied ports of `plan`, sorted.
pub(super) fn ports(plan: &KernelPlan) -> Vec<u16> {
    let mut ports: Vec<u16> = plan.synproxy.iter().map(|t| t.port).collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

fn entry(mode: SynproxyMode, host: SynproxyHost) -> Result<SynproxyPort> {
    let mut v = SynproxyPort {
        mode: SYNPROXY_MODE_ALWAYS,
        wscale: host.wscale,
        ttl: host.ttl,
        mss4: host.mss4,
        mss6: host.mss6,
        ..Default::default()
    };
    if let SynproxyMode::Threshold(limit) = mode {
        let params = BucketParams::for_packets(limit.requests, limit.unit.as_ns(), limit.burst).ok_or(
            DataplaneError::Synproxy(format!(
                "synProxy threshold {} per {}: out of range (more than zero, at most one per nanosecond)",
                limit.requests, limit.unit
            )),
        )?;
        v.mode = SYNPROXY_MODE_THRESHOLD;
        v.cost_ns = params.cost_ns(1);
        v.burst_ns = params.burst_ns;
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_scale_follows_the_kernel_formula() {
        // tcp_rmem[2] of 6 MiB (Linux's default): ilog2 = 22, scale 7.
        assert_eq!(wscale_for(6_291_456), 7);
        assert_eq!(wscale_for(65_535), 0);
        assert_eq!(wscale_for(1 << 40), 14);
    }
}
