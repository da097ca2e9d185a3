//! Per-CPU counters: one [`Counter`] per [`Reason`] index in `STATS`, one [`RuleCounter`] per
//! rule id in `RULE_STATS`. The agent sums the CPUs.

/// Why a packet got its verdict (index into `STATS`). Every packet is counted under exactly
/// one verdict reason; the `EVENT_*` entries after them count side events.
pub mod reason {
    /// No rule applies to the packet.
    pub const PASS_NO_RULE: u32 = 0;
    /// Every bucket that applies had tokens.
    pub const PASS_CONFORMING: u32 = 1;
    /// Source is on the allow list.
    pub const PASS_ALLOW_LIST: u32 = 2;
    /// Not IPv4 or IPv6 (ARP, LLDP...): never limited.
    pub const PASS_NOT_IP: u32 = 3;
    /// The parser could not follow the frame and the unparsed verdict is pass.
    pub const PASS_UNPARSED: u32 = 4;
    /// A rule in shadow mode would have dropped it.
    pub const PASS_SHADOW: u32 = 5;
    /// The parser could not follow the frame and the unparsed verdict is drop.
    pub const DROP_UNPARSED: u32 = 6;
    /// Source is in the block list (penalty box) and the entry has not expired.
    pub const DROP_BLOCK_LIST: u32 = 7;
    /// Source is on the deny list.
    pub const DROP_DENY_LIST: u32 = 8;
    /// A shared bucket (per-port aggregate or one bucket per rule) ran out.
    pub const DROP_SHARED_BUCKET: u32 = 9;
    /// A per-source bucket ran out.
    pub const DROP_SOURCE_BUCKET: u32 = 10;
    /// A per-(source, port) bucket ran out.
    pub const DROP_SOURCE_PORT_BUCKET: u32 = 11;
    /// The frame claims TCP or UDP but its first (or only) fragment does not hold the whole
    /// transport header within the IP length (RFC 1858's tiny fragment, a truncated
    /// segment): the port or the flags cannot be judged. Dropped after the lists.
    pub const DROP_L4_TRUNCATED: u32 = 12;
    /// The IPv6 extension-header chain is cut short, or is longer than the walk bound
    /// ([`crate::MAX_IPV6_EXT_HEADERS`]): the transport protocol cannot be known. Dropped
    /// after the lists.
    pub const DROP_HEADER_CHAIN: u32 = 13;
    /// A fragment other than the first whose first fragment was not seen (lost, reordered,
    /// forgotten by the fragment table, or never sent): its port cannot be known.
    pub const DROP_FRAGMENT_UNKNOWN: u32 = 14;
    /// A fragment other than the first whose datagram was already dropped (its first
    /// fragment, or an earlier later fragment, was refused by a bucket).
    pub const DROP_FRAGMENT_OF_DROPPED: u32 = 15;
    /// Number of verdict reasons. Drop reasons are `DROP_UNPARSED..VERDICT_REASONS`.
    pub const VERDICT_REASONS: u32 = 16;

    /// A per-source bucket could not be created (table full and eviction failed); the
    /// packet was judged by the other buckets only.
    pub const EVENT_SOURCE_INSERT_FAILED: u32 = 16;
    /// A bucket update lost its compare-and-swap race too often and refused the packet.
    pub const EVENT_BUCKET_CONTENDED: u32 = 17;
    /// A fragment other than the first, judged by the rules of the port its first fragment
    /// carried.
    pub const EVENT_NON_FIRST_FRAGMENT: u32 = 18;
    /// Total entries in `STATS`.
    pub const COUNT: u32 = 19;

    /// Metric label for a reason index.
    pub const fn name(r: u32) -> &'static str {
        match r {
            PASS_NO_RULE => "no_rule",
            PASS_CONFORMING => "conforming",
            PASS_ALLOW_LIST => "allow_list",
            PASS_NOT_IP => "not_ip",
            PASS_UNPARSED => "unparsed",
            PASS_SHADOW => "shadow",
            DROP_UNPARSED => "unparsed",
            DROP_BLOCK_LIST => "block_list",
            DROP_DENY_LIST => "deny_list",
            DROP_SHARED_BUCKET => "shared_bucket",
            DROP_SOURCE_BUCKET => "source_bucket",
            DROP_SOURCE_PORT_BUCKET => "source_port_bucket",
            DROP_L4_TRUNCATED => "l4_truncated",
            DROP_HEADER_CHAIN => "header_chain",
            DROP_FRAGMENT_UNKNOWN => "fragment_unknown",
            DROP_FRAGMENT_OF_DROPPED => "fragment_of_dropped",
            EVENT_SOURCE_INSERT_FAILED => "source_insert_failed",
            EVENT_BUCKET_CONTENDED => "bucket_contended",
            EVENT_NON_FIRST_FRAGMENT => "non_first_fragment",
            _ => "unknown",
        }
    }

    /// Whether a verdict reason means the packet was dropped.
    pub const fn is_drop(r: u32) -> bool {
        r >= DROP_UNPARSED && r < VERDICT_REASONS
    }
}

pub use reason::COUNT as STATS_ENTRIES;

/// Packets and bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<Counter>() == 16);

/// What one rule did with the packets it judged.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCounter {
    pub passed: Counter,
    pub dropped: Counter,
    /// Would have been dropped, but the rule is in shadow mode.
    pub shadow_dropped: Counter,
}

const _: () = assert!(core::mem::size_of::<RuleCounter>() == 48);
