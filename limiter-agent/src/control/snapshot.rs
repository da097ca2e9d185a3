//! What a snapshot holds, as `top` reads it: the JSON types of the control socket's answer
//! and how the run loop's counters become one ([`Snapshot::build`]).

use std::net::IpAddr;

use limiter_common::reason;
use serde::{Deserialize, Serialize};

use super::RlsStatus;
use crate::dataplane::Stats;

/// What the agent is doing, as of `time_unix_ms`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Agent version.
    pub version: String,
    /// When the counters were read (milliseconds since the Unix epoch).
    pub time_unix_ms: u64,
    /// Seconds since the agent started.
    pub uptime_s: u64,
    pub interfaces: Vec<Interface>,
    pub policy: PolicyStatus,
    /// Every counter of `STATS`, in index order: the verdict reasons, then the side events.
    pub reasons: Vec<ReasonCount>,
    pub rules: Vec<RuleCount>,
    /// The sources with the most dropped packets, most first (at most
    /// [`TOP_SOURCES`](super::TOP_SOURCES)).
    pub top_sources: Vec<SourceCount>,
    pub sources: SourceTable,
    /// The rate limit service (absent from agents older than this field: all zero).
    #[serde(default)]
    pub rls: RlsStatus,
    /// Set when no agent runs and the counters were read from a pinned shield (`top`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unattended: Option<Unattended>,
}

/// A shield that runs without an agent: what its pin directory records.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unattended {
    pub pin_dir: String,
    /// When the pinned set was made (Unix seconds).
    pub pinned_at_unix_s: u64,
    /// The policies in force, as the last agent recorded them.
    pub policy: String,
    pub last_agent_pid: u32,
    /// When the last agent stopped (Unix seconds); 0: it did not stop cleanly (killed).
    pub agent_stopped_unix_s: u64,
    /// Sources in the block list whose block has not expired.
    pub blocked_now: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    /// `native` or `generic`.
    pub mode: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatus {
    /// Kernel rules, allow and deny entries of the policy in force.
    pub rules: usize,
    pub allow: usize,
    pub deny: usize,
    /// False while the last reload attempt was rejected (the previous policy stays in force).
    pub last_reload_ok: bool,
    pub reloads_applied: u64,
    pub reloads_rejected: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    #[default]
    Pass,
    Drop,
    /// A side event, counted besides the packet's verdict.
    Event,
}

impl Verdict {
    pub fn of(r: u32) -> Self {
        if r >= reason::VERDICT_REASONS {
            Self::Event
        } else if reason::is_drop(r) {
            Self::Drop
        } else {
            Self::Pass
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Drop => "drop",
            Self::Event => "event",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonCount {
    /// `limiter_common::reason::name` (the same label the metrics use).
    pub reason: String,
    pub verdict: Verdict,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleCount {
    /// `policy/rule`.
    pub name: String,
    pub passed_packets: u64,
    pub passed_bytes: u64,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
    pub shadow_dropped_packets: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCount {
    /// The source address (IPv6: its source prefix's first address).
    pub source: IpAddr,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
}

/// Occupancy of the per-source bucket table, sampled (see
/// [`TRACKED_SAMPLE_EVERY`](super::TRACKED_SAMPLE_EVERY)).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceTable {
    pub tracked: u64,
    pub capacity: u64,
    pub sampled_at_unix_ms: u64,
}

/// The parts of a snapshot that do not come from the counters.
#[derive(Clone, Debug, Default)]
pub struct Meta {
    pub time_unix_ms: u64,
    pub uptime_s: u64,
    pub interfaces: Vec<Interface>,
    pub policy: PolicyStatus,
    pub sources: SourceTable,
    pub rls: RlsStatus,
}

impl Snapshot {
    /// Assembles a snapshot from counters read out of the data path (`None`: no XDP program;
    /// the kernel sections are empty).
    pub fn build(kernel: Option<(&Stats, &[(IpAddr, limiter_common::Counter)])>, meta: Meta) -> Self {
        let Some((stats, top)) = kernel else {
            return Self {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                time_unix_ms: meta.time_unix_ms,
                uptime_s: meta.uptime_s,
                interfaces: meta.interfaces,
                policy: meta.policy,
                sources: meta.sources,
                rls: meta.rls,
                ..Self::default()
            };
        };
        let reasons = (0..reason::COUNT)
            .map(|r| {
                let c = stats.reason(r);
                ReasonCount {
                    reason: reason::name(r).to_owned(),
                    verdict: Verdict::of(r),
                    packets: c.packets,
                    bytes: c.bytes,
                }
            })
            .collect();
        let rules = stats
            .rules
            .iter()
            .map(|(name, c)| RuleCount {
                name: name.clone(),
                passed_packets: c.passed.packets,
                passed_bytes: c.passed.bytes,
                dropped_packets: c.dropped.packets,
                dropped_bytes: c.dropped.bytes,
                shadow_dropped_packets: c.shadow_dropped.packets,
            })
            .collect();
        let top_sources = top
            .iter()
            .map(|(source, c)| SourceCount { source: *source, dropped_packets: c.packets, dropped_bytes: c.bytes })
            .collect();
        Self {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            time_unix_ms: meta.time_unix_ms,
            uptime_s: meta.uptime_s,
            interfaces: meta.interfaces,
            policy: meta.policy,
            reasons,
            rules,
            top_sources,
            sources: meta.sources,
            rls: meta.rls,
            unattended: None,
        }
    }

    /// Whether the agent runs the XDP program (else it serves the rate limit service only):
    /// a kernel snapshot always lists every reason.
    pub fn has_kernel(&self) -> bool {
        !self.interfaces.is_empty() || !self.reasons.is_empty()
    }

    /// Packets and bytes over every reason with this verdict.
    pub fn total(&self, verdict: Verdict) -> (u64, u64) {
        self.reasons.iter().filter(|r| r.verdict == verdict).fold((0, 0), |(p, b), r| (p + r.packets, b + r.bytes))
    }
}
