//! Map names, keys and values.
//!
//! Addresses are IPv6, 16 bytes in network byte order; an IPv4 address is stored IPv4-mapped
//! (`::ffff:a.b.c.d`), so one LPM trie and one bucket key shape serve both families. Ports are
//! in host byte order (the program converts once when it parses).
//!
//! Policy maps are double-buffered: every policy entry carries the *set* (0 or 1) it belongs
//! to, and the program reads only the set named by [`Config::active_set`]. The agent writes a
//! whole new policy into the inactive set and then flips `active_set` with one 4-byte store, so
//! no packet is judged by a half-written policy. Buckets are keyed by a stable rule id, not by
//! set, so a rule that survives a reload keeps its state.

use crate::bucket::BucketParams;

/// Names of the maps in the object file, shared so the loader cannot drift from the program.
pub mod names {
    pub const CONFIG: &str = "CONFIG";
    pub const ALLOW: &str = "ALLOW";
    pub const DENY: &str = "DENY";
    pub const ALLOW_HOSTS: &str = "ALLOW_HOSTS";
    pub const DENY_HOSTS: &str = "DENY_HOSTS";
    pub const BLOCK: &str = "BLOCK";
    pub const PORT_RULES: &str = "PORT_RULES";
    pub const RULES: &str = "RULES";
    pub const SHARED_BUCKETS: &str = "SHARED_BUCKETS";
    pub const SOURCE_BUCKETS: &str = "SOURCE_BUCKETS";
    pub const STATS: &str = "STATS";
    pub const RULE_STATS: &str = "RULE_STATS";
    pub const DROPPED_SOURCES: &str = "DROPPED_SOURCES";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const PARSE_RECORD: &str = "PARSE_RECORD";
    pub const GLOBAL_SOURCE_COUNTS: &str = "GLOBAL_SOURCE_COUNTS";
    /// The XDP program's function name.
    pub const PROGRAM: &str = "limiter";
}

/// An IPv6 address or an IPv4-mapped IPv4 address, network byte order.
pub type Addr = [u8; 16];

/// Rule slots per policy set. Rule ids (which key the buckets) are below this too.
pub const MAX_RULES: u32 = 1024;
/// Rules the program evaluates for one packet: the port's list, then the any-port list.
pub const MAX_RULES_PER_PORT: usize = 16;
/// Default capacity of the per-source bucket table (LRU).
pub const DEFAULT_SOURCE_ENTRIES: u32 = 1 << 20;
/// Capacity of the shared (per-port aggregate) bucket table.
pub const SHARED_BUCKET_ENTRIES: u32 = 16_384;
/// Entries in each of the allow and deny lists (each trie and each host hash), across both
/// sets.
pub const LIST_ENTRIES: u32 = 262_144;
/// Sources tracked in `DROPPED_SOURCES` (the "top limited sources" view), per CPU, LRU.
pub const DROPPED_SOURCE_ENTRIES: u32 = 16_384;
/// A source not yet in `DROPPED_SOURCES` is added on one drop in this many (per CPU and
/// reason), so a spoofed flood does not churn the table on every packet; once in, every
/// drop is counted.
pub const DROPPED_SOURCE_SAMPLE: u64 = 16;
/// Entries in the block list (penalty box).
pub const BLOCK_ENTRIES: u32 = 65_536;
/// IPv6 extension headers the parser walks. A chain that does not reach the transport
/// header within this many is dropped after the lists (`header_chain`). Linux itself has no
/// bound (the packet length is the limit), but the chain RFC 8200 section 4.1 recommends has
/// at most 7 (hop-by-hop, destination options, routing, fragment, AH, ESP, destination
/// options again), so 16 is beyond anything legitimate; Cilium gives up after 4.
pub const MAX_IPV6_EXT_HEADERS: u32 = 16;
/// Datagrams whose first fragment's port and verdict are remembered for their later
/// fragments (LRU, shared by all CPUs).
pub const FRAGMENT_ENTRIES: u32 = 16_384;

/// Sources tracked in `GLOBAL_SOURCE_COUNTS` (per CPU, LRU). Only sources of global
/// per-source rules ([`RULE_FLAG_GLOBAL_SOURCE`]) enter it, and the agent reads it every sync
/// period: it needs room for the sources active within about one period, not for every source
/// the per-source buckets track. An evicted source restarts its count from 0 (the agent
/// then misses at most what it admitted since its last read).
pub const GLOBAL_SOURCE_ENTRIES: u32 = 65_536;

/// IP protocol numbers the program distinguishes.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
/// Protocol value of a [`PortKey`] that matches every protocol (rules without targets).
pub const PROTO_ANY: u8 = 0;

/// XDP verdicts as the kernel numbers them (`enum xdp_action`).
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// The single entry (index 0) of the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Which policy set (0 or 1) the program reads.
    pub active_set: u32,
    /// IPv6 sources are bucketed and blocked by this prefix (default 64): a host owns a /64.
    pub ipv6_source_prefix: u32,
    /// Verdict for frames the parser cannot follow (truncated, garbage, too many IPv6
    /// extension headers): [`XDP_PASS`] by default, so a parser gap never blackholes traffic.
    pub unparsed_verdict: u32,
    /// `CONFIG_FLAG_*` bits.
    pub flags: u32,
}

const _: () = assert!(core::mem::size_of::<Config>() == 16);

/// Emit aya-log debug records for drops (sampled by the log ring; off by default).
pub const CONFIG_FLAG_DEBUG_LOG: u32 = 1;
/// Write what the parser read into `PARSE_RECORD` for every frame (tests and the
/// differential fuzzer only: it costs a map write per packet).
pub const CONFIG_FLAG_RECORD_PARSE: u32 = 2;
/// The active set's allow list holds no prefix shorter than a host: the program skips the
/// `ALLOW` trie (its hosts are in `ALLOW_HOSTS`, see [`CONFIG_FLAG_NO_ALLOW_HOSTS`]). Written
/// together with `active_set`, so it always describes the set in force. Negative on purpose: an agent that
/// does not know the flag leaves it clear, and the list is probed as before.
pub const CONFIG_FLAG_NO_ALLOW: u32 = 4;
/// The active set's deny list is empty (as [`CONFIG_FLAG_NO_ALLOW`]).
pub const CONFIG_FLAG_NO_DENY: u32 = 8;
/// The active set's allow list holds no single host ([`LIST_HOST_PREFIX`]): `ALLOW_HOSTS` is
/// not probed. `CONFIG_FLAG_NO_ALLOW` then says the same of its prefixes (the trie).
pub const CONFIG_FLAG_NO_ALLOW_HOSTS: u32 = 32;
/// The active set's deny list holds no single host (as [`CONFIG_FLAG_NO_ALLOW_HOSTS`]).
pub const CONFIG_FLAG_NO_DENY_HOSTS: u32 = 64;
/// The block list holds no entry: the program skips its lookup (a hash lookup of a source
/// nobody blocked is one cache miss per packet once sources are many). The agent clears it
/// before it inserts an entry and sets it after it removes the last, so no entry is ever
/// skipped.
pub const CONFIG_FLAG_NO_BLOCK: u32 = 16;

impl Default for Config {
    fn default() -> Self {
        Self { active_set: 0, ipv6_source_prefix: 64, unparsed_verdict: XDP_PASS, flags: 0 }
    }
}

/// Key data of the `ALLOW` and `DENY` LPM tries: the set, then the address. The LPM prefix
/// length counts the 32 bits of `set` too, so a /24 IPv4 network in set 1 has prefix
/// `32 + 96 + 24`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListKey {
    /// The policy set, as a big-endian u32 so it is the leading bits of the LPM key.
    pub set_be: u32,
    pub addr: Addr,
}

const _: () = assert!(core::mem::size_of::<ListKey>() == 20);

/// Bits of [`ListKey`] before the address starts.
pub const LIST_KEY_SET_BITS: u32 = 32;

/// Prefix length of a list entry for one host (IPv4 /32 or IPv6 /128). Such entries live in
/// the `ALLOW_HOSTS` / `DENY_HOSTS` hashes (keyed by the trie key with this prefix length),
/// not in the tries:
/// one hash lookup instead of a trie walk whose depth grows with the list (a 100,000-host
/// trie is some 17 nodes deep, each a cache miss). A host is the longest prefix there is, so
/// looking the hash up first gives the trie's own answer.
pub const LIST_HOST_PREFIX: u32 = LIST_KEY_SET_BITS + 128;

/// Value of the `ALLOW` and `DENY` tries: the rule (policy) that put the entry there, for stats.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListValue {
    pub rule_id: u32,
}

/// Value of the `BLOCK` hash (key: the source [`Addr`], IPv6 masked to the source prefix).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockEntry {
    /// `CLOCK_BOOTTIME` nanoseconds after which the entry no longer applies; the agent
    /// deletes expired entries, the program ignores them meanwhile.
    pub expires_at_ns: u64,
}

/// Key of `PORT_RULES`: which rules apply to traffic for this destination port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PortKey {
    /// Destination port, host byte order; 0 with [`PROTO_ANY`] is the any-port list.
    pub port: u16,
    /// [`PROTO_TCP`], [`PROTO_UDP`] or [`PROTO_ANY`].
    pub protocol: u8,
    /// The policy set (0 or 1).
    pub set: u8,
}

const _: () = assert!(core::mem::size_of::<PortKey>() == 4);

/// Value of `PORT_RULES`: slots into `RULES`, in evaluation order (shared buckets first,
/// then per-source, then per-(source, port)).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortRules {
    pub len: u32,
    pub slots: [u32; MAX_RULES_PER_PORT],
}

const _: () = assert!(core::mem::size_of::<PortRules>() == 4 + 4 * MAX_RULES_PER_PORT);

/// How a rule keys its buckets ([`RuleConfig::key_flags`]).
/// No flag: one bucket for all traffic the rule selects.
pub const KEY_BY_SOURCE: u8 = 1;
/// One bucket per destination port the rule targets.
pub const KEY_BY_PORT: u8 = 2;

/// What a rule counts ([`RuleConfig::count`]).
pub const COUNT_PACKETS: u8 = 0;
pub const COUNT_BYTES: u8 = 1;
/// TCP segments with SYN and without ACK; UDP datagrams; other protocols are not counted.
pub const COUNT_CONNECTIONS: u8 = 2;

/// [`RuleConfig::flags`]: count and report, never drop.
pub const RULE_FLAG_SHADOW: u8 = 1;
/// [`RuleConfig::flags`]: the rule selects sources *outside* its CIDR.
pub const RULE_FLAG_INVERT: u8 = 2;
/// [`RuleConfig::flags`]: a `global` rule keyed by source. Each admitted charge also adds
/// its tokens to the source's count in `GLOBAL_SOURCE_COUNTS` (a refund takes them back),
/// which the agent sums across nodes in Redis per fixed window.
pub const RULE_FLAG_GLOBAL_SOURCE: u8 = 4;

/// One entry of the `RULES` array, at index `set * MAX_RULES + slot`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RuleConfig {
    pub bucket: BucketParams,
    /// Source selector network (see [`Addr`]); with `source_prefix` 0 it selects everyone.
    pub source_net: Addr,
    /// Prefix length of `source_net` in the 128-bit (IPv4-mapped) space.
    pub source_prefix: u32,
    /// Stable id of the rule across reloads: keys its buckets and its `RULE_STATS` entry.
    pub rule_id: u32,
    /// `KEY_BY_*` bits.
    pub key_flags: u8,
    /// `COUNT_*`.
    pub count: u8,
    /// `RULE_FLAG_*` bits.
    pub flags: u8,
    pub _pad: [u8; 5],
}

const _: () = assert!(core::mem::size_of::<RuleConfig>() == 16 + 16 + 4 + 4 + 8);

/// Key of `SHARED_BUCKETS` (hash, never evicted: losing an aggregate bucket would hand a
/// flood a fresh burst).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SharedBucketKey {
    pub rule_id: u32,
    /// Destination port (host order) when the rule keys by port, else 0.
    pub port: u16,
    /// Protocol when the rule keys by port, else 0.
    pub protocol: u8,
    pub _pad: u8,
}

const _: () = assert!(core::mem::size_of::<SharedBucketKey>() == 8);

/// Key of `SOURCE_BUCKETS` (LRU: under a flood of new sources the least recently seen
/// source loses its state, which only ever hands it a full bucket again).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SourceBucketKey {
    pub rule_id: u32,
    /// Destination port (host order) when the rule keys by port, else 0.
    pub port: u16,
    /// Protocol when the rule keys by port, else 0.
    pub protocol: u8,
    pub _pad: u8,
    /// The source, IPv6 masked to [`Config::ipv6_source_prefix`].
    pub addr: Addr,
}

const _: () = assert!(core::mem::size_of::<SourceBucketKey>() == 24);

/// Value of both bucket maps: the GCRA state (see [`crate::bucket`]).
///
/// Two words so that a refund never races a charge: charges compare-and-swap `tat_ns`,
/// refunds only add to `refunded_ns`, and the bucket's state is their difference (see
/// [`crate::bucket::charge`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Bucket {
    /// Theoretical arrival time, `CLOCK_BOOTTIME` ns, plus every refund so far; 0 = new and
    /// full.
    pub tat_ns: u64,
    /// Credit handed back by refunds since the bucket was created, in nanoseconds of the
    /// bucket's clock. Only ever grows (it would wrap after 584 years of refunds).
    pub refunded_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Bucket>() == 16);

/// Key of `FRAGMENTS`: one fragmented datagram, as reassembly identifies it (RFC 791: source,
/// destination, protocol, identification; RFC 8200: source, destination, identification).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragmentKey {
    /// Source address, unmasked (see [`Addr`]).
    pub src: Addr,
    /// Destination address (see [`Addr`]).
    pub dst: Addr,
    /// IPv4 identification (16 bits) or IPv6 fragment identification (32 bits), host order.
    pub id: u32,
    /// IPv4 protocol field, or the next header of the IPv6 fragment header.
    pub protocol: u8,
    pub _pad: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<FragmentKey>() == 40);

/// Value of `FRAGMENTS`: what the first fragment told about its datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragmentEntry {
    /// Destination port of the first fragment, host order; 0 when it had none.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`] when `port` is set, else [`PROTO_ANY`].
    pub port_protocol: u8,
    /// `FRAGMENT_*` bits.
    pub flags: u8,
}

const _: () = assert!(core::mem::size_of::<FragmentEntry>() == 4);

/// [`FragmentEntry::flags`]: the datagram was dropped (its first fragment, or a later one,
/// was refused); later fragments are dropped without charging any bucket.
pub const FRAGMENT_DROPPED: u8 = 1;

/// What the parser read from one frame, written to `PARSE_RECORD` (a one-entry per-CPU array)
/// when [`CONFIG_FLAG_RECORD_PARSE`] is set. Tests and the differential fuzzer compare it with
/// an independent parser's reading of the same frame.
///
/// `BPF_PROG_TEST_RUN` runs on the calling CPU: read that CPU's slot, or the slot whose `seq`
/// moved.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ParseRecord {
    /// Bumped once per recorded frame, per CPU.
    pub seq: u64,
    /// Source address as read from the IP header, IPv4-mapped for IPv4, not masked to the
    /// IPv6 source prefix; network byte order. All zero unless `kind` is [`PARSE_KIND_IP`].
    pub src: Addr,
    /// Destination port, host byte order; valid when `has_port` is 1, else 0.
    pub dst_port: u16,
    /// [`PARSE_KIND_NOT_IP`], [`PARSE_KIND_UNPARSED`] (no source could be read: truncated
    /// Ethernet, VLAN or fixed IP header, bad version or IHL, a third VLAN tag, an
    /// IPv4-mapped IPv6 source) or [`PARSE_KIND_IP`] (a source was read; the frame is judged).
    pub kind: u8,
    /// 4 or 6 when `kind` is [`PARSE_KIND_IP`], else 0.
    pub ip_version: u8,
    /// The transport protocol reached: IPv4's protocol field; for IPv6, the next-header value
    /// where the extension-header walk stopped (the transport protocol, the fragment header's
    /// next header for a later fragment; when `l4` is [`PARSE_L4_CHAIN`], the next-header
    /// value of the last header read, i.e. the first one not walked: the extension header
    /// that was cut short, or header number `MAX_IPV6_EXT_HEADERS + 1`, which is not walked).
    /// 0 unless `kind` is [`PARSE_KIND_IP`].
    pub protocol: u8,
    /// [`PARSE_FRAG_NONE`] (not fragmented, or an IPv6 atomic fragment: offset 0 and no more
    /// fragments), [`PARSE_FRAG_FIRST`] (offset 0, more fragments) or [`PARSE_FRAG_LATER`]
    /// (offset not 0).
    pub fragment: u8,
    /// 1 when the destination port was read: TCP with its fixed 20 bytes, or UDP with its 8
    /// bytes, inside both the frame and the IP length (TCP options are not needed), in a
    /// frame that is not a later fragment.
    pub has_port: u8,
    /// How far the transport header got: `PARSE_L4_*`.
    pub l4: u8,
}

const _: () = assert!(core::mem::size_of::<ParseRecord>() == 32);

/// [`ParseRecord::kind`] values.
pub const PARSE_KIND_NOT_IP: u8 = 0;
pub const PARSE_KIND_UNPARSED: u8 = 1;
pub const PARSE_KIND_IP: u8 = 2;

/// [`ParseRecord::fragment`] values.
pub const PARSE_FRAG_NONE: u8 = 0;
pub const PARSE_FRAG_FIRST: u8 = 1;
pub const PARSE_FRAG_LATER: u8 = 2;

/// [`ParseRecord::l4`]: the transport header was read whole (TCP 20 bytes, UDP 8, ICMP and
/// ICMPv6 4), or the protocol is one whose header the program does not read (GRE, ESP,
/// IPv6 no-next-header...).
pub const PARSE_L4_COMPLETE: u8 = 0;
/// TCP, UDP, ICMP or ICMPv6 whose header does not fit in the frame and the IP length.
pub const PARSE_L4_TRUNCATED: u8 = 1;
/// A later fragment: it carries no transport header.
pub const PARSE_L4_NONE: u8 = 2;
/// IPv6 only: the extension-header chain was cut short, or longer than
/// [`MAX_IPV6_EXT_HEADERS`]; the transport header was not reached.
pub const PARSE_L4_CHAIN: u8 = 3;

/// Converts an IPv4 address (network order octets) to its IPv4-mapped [`Addr`].
#[inline(always)]
pub const fn ipv4_mapped(v4: [u8; 4]) -> Addr {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3]]
}

/// Prefix length, in the mapped 128-bit space, of an IPv4 prefix.
pub const IPV4_MAPPED_PREFIX: u32 = 96;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, and have no padding or invalid bit patterns
    // (asserted by the size checks above).
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for ListKey {}
    unsafe impl aya::Pod for ListValue {}
    unsafe impl aya::Pod for BlockEntry {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for PortRules {}
    unsafe impl aya::Pod for RuleConfig {}
    unsafe impl aya::Pod for SharedBucketKey {}
    unsafe impl aya::Pod for SourceBucketKey {}
    unsafe impl aya::Pod for Bucket {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentEntry {}
    unsafe impl aya::Pod for ParseRecord {}
    unsafe impl aya::Pod for crate::stats::Counter {}
    unsafe impl aya::Pod for crate::stats::RuleCounter {}
}
