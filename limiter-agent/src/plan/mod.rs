//! The compiled plan: what the policy compiler hands to the data path.
//!
//! `policy` turns documents into a [`KernelPlan`]; `dataplane` turns a plan into map entries.
//! Nothing here knows about YAML or about BPF maps, so each side can be tested alone.

pub mod l7;

use std::fmt;
use std::time::Duration;

use ipnet::IpNet;
pub use l7::{Algorithm, Attribute, EntryMatch, EntryValue, L7Plan, L7Rule, L7Target, Scope};

/// What the kernel enforces for one policy set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelPlan {
    /// Sources never limited, checked first.
    pub allow: Vec<ListEntry>,
    /// Sources always dropped (after the allow list and the block list).
    pub deny: Vec<ListEntry>,
    /// Rate-limit rules, in policy order.
    pub rules: Vec<KernelRule>,
    /// Ports whose SYNs the kernel program answers with SYN cookies (README, "SYN proxy").
    pub synproxy: Vec<SynproxyTarget>,
}

/// A TCP port behind the XDP SYN proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynproxyTarget {
    pub port: u16,
    pub mode: SynproxyMode,
    /// `policy-name` that asked for it.
    pub policy: String,
}

/// When the proxy answers a port's SYNs itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynproxyMode {
    /// Every SYN.
    Always,
    /// Only SYNs beyond this rate (a token bucket of new connections per unit, with burst);
    /// the others go to the listener as without the proxy.
    Threshold(Limit),
}

/// A policy's `penalty`: a source the rate limit service denies `over_limit_events` times
/// `within` the window, in any of `rules`, goes into the kernel block list for `block`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyPenalty {
    /// The policy's name (the `policy` label of `limiter_escalations_total`).
    pub policy: String,
    pub over_limit_events: u32,
    pub within: Duration,
    pub block: Duration,
    /// Full names of the policy's L7 rules (`policy/rule`) whose denials count.
    pub rules: Vec<String>,
}

/// An allow or deny list entry and the policy it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListEntry {
    pub net: IpNet,
    /// `policy-name` that listed it (for logs and stats).
    pub policy: String,
}

/// One kernel-enforced token bucket rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelRule {
    /// `policy-name/rule-name`; unique in a plan; appears in metrics and logs.
    pub name: String,
    /// Destination ports the rule protects; empty means every port (and port-less traffic).
    pub targets: Vec<PortTarget>,
    /// Which sources the rule selects and whether each gets its own bucket.
    pub source: SourceSelector,
    pub count: CountKind,
    pub limit: Limit,
    /// Count and report, never drop (policy `mode: Shadow`).
    pub shadow: bool,
    /// A `rateLimit.global` rule: with `--rls-backend redis` each node enforces its share of
    /// `limit` following its demand (see [`crate::sync`]); `false` counts the whole limit on this node.
    /// Kernel guards of global L7 rules are `false`: a guard is a coarse backstop and must not
    /// cut connections whose requests the shared L7 count would admit.
    pub global: bool,
}

impl KernelRule {
    /// Whether every distinct source gets its own bucket.
    pub fn per_source(&self) -> bool {
        self.source.distinct
    }

    /// A `global` rule keyed by source: every node enforces the full per-source limit, and
    /// the sources' admitted counts are summed across nodes per fixed window of the rule's
    /// unit (see [`crate::sync::window`]); it takes no demand share.
    pub fn global_per_source(&self) -> bool {
        self.global && self.source.distinct
    }

    /// A `global` rule with one bucket for all its sources: each node enforces a share of it
    /// that follows demand (see [`crate::sync::demand`]).
    pub fn global_shared(&self) -> bool {
        self.global && !self.source.distinct
    }
}

/// `sourceCIDR` selector. `0.0.0.0/0` + `::/0` with `distinct: false` is "everyone shares one
/// bucket"; a rule without a selector compiles to that.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceSelector {
    /// The networks selected. Empty means every source (both families).
    pub nets: Vec<IpNet>,
    /// `type: Distinct`: one bucket per source address (IPv6: per source prefix).
    pub distinct: bool,
    /// Select sources *outside* `nets`.
    pub invert: bool,
}

impl SourceSelector {
    pub fn everyone(distinct: bool) -> Self {
        Self { nets: Vec::new(), distinct, invert: false }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortTarget {
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// What a kernel bucket counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CountKind {
    Packets,
    Bytes,
    /// New TCP connections (SYN without ACK); UDP datagrams.
    Connections,
}

impl fmt::Display for CountKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CountKind::Packets => "Packets",
            CountKind::Bytes => "Bytes",
            CountKind::Connections => "Connections",
        })
    }
}

/// `limit: {requests, unit, burst}`: a token bucket of `requests` per `unit`, depth
/// `requests + burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Limit {
    pub requests: u64,
    pub unit: Unit,
    pub burst: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    /// Any other period, e.g. kgateway's `fillInterval: 10s` (nanoseconds, > 0).
    Interval {
        ns: u64,
    },
}

impl Unit {
    pub const fn as_ns(self) -> u64 {
        use limiter_common::bucket::*;
        match self {
            Unit::Second => NS_PER_SECOND,
            Unit::Minute => NS_PER_MINUTE,
            Unit::Hour => NS_PER_HOUR,
            Unit::Day => NS_PER_DAY,
            Unit::Interval { ns } => ns,
        }
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unit::Second => "Second",
            Unit::Minute => "Minute",
            Unit::Hour => "Hour",
            Unit::Day => "Day",
            Unit::Interval { ns } => return write_interval(f, *ns),
        })
    }
}

/// `250ms`, `10s`, `90s`, `2h`: the shortest exact spelling of a period.
fn write_interval(f: &mut fmt::Formatter<'_>, ns: u64) -> fmt::Result {
    const STEPS: [(u64, &str); 6] = [
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
        (1, "ns"),
    ];
    for (step, suffix) in STEPS {
        if ns >= step && ns.is_multiple_of(step) {
            return write!(f, "{}{suffix}", ns / step);
        }
    }
    write!(f, "{ns}ns")
}
