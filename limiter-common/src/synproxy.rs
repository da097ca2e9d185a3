//! The SYN proxy: maps, values and counters shared by its XDP program (`limiter-ebpf`,
//! `synproxy.rs`) and the agent.
//!
//! The main program tail-calls the proxy program (slot [`PROG_SYNPROXY`] of `PROGRAMS`) for
//! the unfragmented TCP segments of ports that have a `SYNPROXY_PORTS` entry in the active
//! set; the proxy answers SYNs with a SYN cookie (`XDP_TX`), drops ACKs whose cookie is bad,
//! and hands everything else back to the main program (slot [`PROG_MAIN`]) to be judged by
//! the port's rules, a segment with a valid cookie as a new connection.

use crate::PortKey;

pub mod names {
    /// `PortKey` (protocol TCP, with the policy set) → [`super::SynproxyPort`].
    pub const SYNPROXY_PORTS: &str = "SYNPROXY_PORTS";
    /// One GCRA bucket per port (index = port): the threshold meter.
    pub const SYNPROXY_METERS: &str = "SYNPROXY_METERS";
    /// Per-CPU counters, indexed by [`super::event`].
    pub const SYNPROXY_STATS: &str = "SYNPROXY_STATS";
    /// The tail-call table: [`super::PROG_SYNPROXY`], [`super::PROG_MAIN`].
    pub const PROGRAMS: &str = "PROGRAMS";
    /// Private per-CPU scratch of the proxy program (header copies, the SYN-ACK built).
    pub const SYNPROXY_SCRATCH: &str = "SYNPROXY_SCRATCH";
    /// Private per-CPU note the proxy leaves for the main program it tail-calls back.
    pub const SYNPROXY_HANDOFF: &str = "SYNPROXY_HANDOFF";
    /// The proxy program's function name.
    pub const PROGRAM: &str = "synproxy";
    /// The TC-ingress program that marks segments of connections with a socket
    /// ([`super::SYNPROXY_ESTABLISHED_MARK`]).
    pub const ESTABLISHED_PROGRAM: &str = "synproxy_established";
}

/// `PROGRAMS` slot of the proxy program.
pub const PROG_SYNPROXY: u32 = 0;
/// `PROGRAMS` slot of the main program, for the way back.
pub const PROG_MAIN: u32 = 1;
pub const PROGRAMS_ENTRIES: u32 = 2;

/// `CONFIG.flags` bit: some port of the active set has the proxy on, so the main program
/// looks TCP segments up in `SYNPROXY_PORTS` (otherwise it never pays for that lookup).
/// A high bit, away from the data path's own flags.
pub const CONFIG_FLAG_SYNPROXY: u32 = 1 << 16;

/// The `skb->mark` bit the TC-ingress program (`synproxy_established`) sets on a segment
/// of a proxied port whose 4-tuple has a socket other than a listener; the agent's nftables
/// table and ip6tables chain accept segments with this bit before their SYNPROXY rule, so
/// connections opened before conntrack started tracking survive the proxy switching on.
///
/// One bit, set with OR and tested under its own mask, so other users of the mark keep
/// theirs. Bit 25 lies outside kube-proxy's (0x4000, 0x8000), Cilium's magic (0x0f00),
/// AWS VPC CNI's (0x80), Istio's (0x539) and Weave's (0x20000, 0x40000) marks; Calico
/// allocates its bits from the low end of its mask (default 0xffff0000), so it collides only
/// where Calico has allocated ten or more bits.
pub const SYNPROXY_ESTABLISHED_MARK: u32 = 1 << 25;

/// Cookies for every SYN.
pub const SYNPROXY_MODE_ALWAYS: u8 = 1;
/// Cookies only for SYNs above the port's threshold rate (its meter refuses them); the SYNs
/// below it go to the listener as without the proxy.
pub const SYNPROXY_MODE_THRESHOLD: u8 = 2;

/// Value of `SYNPROXY_PORTS`. What the SYN-ACK announces must match what the nftables
/// `synproxy` statement of the port is configured with (the agent writes both).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynproxyPort {
    /// `SYNPROXY_MODE_*`.
    pub mode: u8,
    /// Window scale the SYN-ACK announces for the server (0..=14).
    pub wscale: u8,
    /// TTL / hop limit of the SYN-ACK.
    pub ttl: u8,
    pub _pad: u8,
    /// MSS the SYN-ACK announces over IPv4 and IPv6, host order.
    pub mss4: u16,
    pub mss6: u16,
    /// Threshold meter (mode threshold): GCRA cost of one SYN and burst tolerance, ns.
    pub cost_ns: u64,
    pub burst_ns: u64,
}

const _: () = assert!(core::mem::size_of::<SynproxyPort>() == 24);

/// The key of a port's entry in `SYNPROXY_PORTS`.
pub const fn port_key(port: u16, set: u8) -> PortKey {
    PortKey { port, protocol: crate::PROTO_TCP, set }
}

/// Indexes of `SYNPROXY_STATS`.
pub mod event {
    /// SYN answered with a cookie SYN-ACK (`XDP_TX`).
    pub const SYNACK_SENT: u32 = 0;
    /// ACK with a valid cookie: handed on as a new connection.
    pub const COOKIE_VALID: u32 = 1;
    /// ACK (no socket for it) whose cookie is bad or stale: dropped.
    pub const COOKIE_INVALID: u32 = 2;
    /// Segment of a connection the kernel has a socket for: handed on untouched.
    pub const ESTABLISHED: u32 = 3;
    /// SYN below the threshold: handed on to the listener.
    pub const BELOW_THRESHOLD: u32 = 4;
    /// A shape the proxy does not build answers for (VLAN tag, IPv4 options, IPv6 extension
    /// headers, SYN with payload): handed on to the rules and the kernel, whose netfilter
    /// SYNPROXY still checks it.
    pub const UNHANDLED_SHAPE: u32 = 5;
    /// Bad checksum, SYN with RST or FIN, SYN-ACK or no flag at all, no socket: dropped.
    pub const MALFORMED: u32 = 6;
    /// RST with no socket: handed on (the kernel drops it; a connection completing in
    /// netfilter may still need it).
    pub const RST: u32 = 7;
    pub const COUNT: u32 = 8;

    pub const fn name(e: u32) -> &'static str {
        match e {
            SYNACK_SENT => "synack_sent",
            COOKIE_VALID => "cookie_valid",
            COOKIE_INVALID => "cookie_invalid",
            ESTABLISHED => "established",
            BELOW_THRESHOLD => "below_threshold",
            UNHANDLED_SHAPE => "unhandled_shape",
            MALFORMED => "malformed",
            RST => "rst",
            _ => "unknown",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::SynproxyPort {}
}
