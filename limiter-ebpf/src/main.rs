//! The limiter XDP program.
//!
//! Per packet: parse → allow list → block list (penalty box) → deny list → the rules of the
//! destination port, in the order the agent sorted them: shared (per-port aggregate) buckets,
//! then per-source, then per-(source, port) buckets → verdict. See `limiter-common` for the
//! maps and `../../shared/DESIGN.md` for why the aggregate bucket comes first.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic intrinsics: the BPF target has no atomic CAS in core::sync")]

mod bucket;
mod established;
mod parse;
mod synproxy;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_boot_ns, bpf_loop},
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use limiter_common::{
    Addr, BlockEntry, Bucket, CONFIG_FLAG_DEBUG_LOG, CONFIG_FLAG_NO_ALLOW, CONFIG_FLAG_NO_ALLOW_HOSTS,
    CONFIG_FLAG_NO_BLOCK, CONFIG_FLAG_NO_DENY, CONFIG_FLAG_NO_DENY_HOSTS, CONFIG_FLAG_RECORD_PARSE, COUNT_BYTES,
    COUNT_CONNECTIONS, Config, Counter, DEFAULT_SOURCE_ENTRIES, DROPPED_SOURCE_ENTRIES, DROPPED_SOURCE_SAMPLE,
    FRAGMENT_DROPPED, FRAGMENT_ENTRIES, FragmentEntry, FragmentKey, GLOBAL_SOURCE_ENTRIES, KEY_BY_PORT, KEY_BY_SOURCE,
    LIST_ENTRIES, LIST_HOST_PREFIX, ListKey, ListValue, MAX_RULES, MAX_RULES_PER_PORT, PARSE_FRAG_FIRST,
    PARSE_FRAG_LATER, PARSE_KIND_IP, PARSE_KIND_NOT_IP, PARSE_KIND_UNPARSED, PARSE_L4_CHAIN, PARSE_L4_TRUNCATED,
    PROTO_ANY, PROTO_TCP, PROTO_UDP, ParseRecord, PortKey, PortRules, RULE_FLAG_GLOBAL_SOURCE, RULE_FLAG_INVERT,
    RULE_FLAG_SHADOW, RuleConfig, RuleCounter, SHARED_BUCKET_ENTRIES, STATS_ENTRIES, SharedBucketKey, SourceBucketKey,
    XDP_DROP, XDP_PASS, reason,
};
// The SYN proxy's hook (synproxy.rs), kept apart from the list above.
use limiter_common::{PARSE_FRAG_NONE, synproxy::CONFIG_FLAG_SYNPROXY};

use core::ffi::c_void;

use crate::{
    bucket::{Charge, charge, refund},
    parse::{Packet, Parsed, parse},
};

// All maps, in one place. The agent sizes the per-source table at load time
// (`EbpfLoader::map_max_entries`). Maps only the agent writes are not preallocated, so their
// capacity costs memory only when used; the bucket maps the program inserts into are.

#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "ALLOW")]
static ALLOW: LpmTrie<ListKey, ListValue> = LpmTrie::with_max_entries(LIST_ENTRIES, 0);

#[map(name = "DENY")]
static DENY: LpmTrie<ListKey, ListValue> = LpmTrie::with_max_entries(LIST_ENTRIES, 0);

/// Single hosts of the allow and deny lists (see `LIST_HOST_PREFIX`). Keyed by the tries' own
/// key (its prefix length always `LIST_HOST_PREFIX`), so one key on the stack serves both
/// kinds of lookup: the stack has no room for a second.
#[map(name = "ALLOW_HOSTS")]
static ALLOW_HOSTS: HashMap<Key<ListKey>, ListValue> = HashMap::with_max_entries(LIST_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "DENY_HOSTS")]
static DENY_HOSTS: HashMap<Key<ListKey>, ListValue> = HashMap::with_max_entries(LIST_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "BLOCK")]
static BLOCK: HashMap<Addr, BlockEntry> = HashMap::with_max_entries(limiter_common::BLOCK_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "PORT_RULES")]
static PORT_RULES: HashMap<PortKey, PortRules> = HashMap::with_max_entries(4 * 65_536, BPF_F_NO_PREALLOC);

#[map(name = "RULES")]
static RULES: Array<RuleConfig> = Array::with_max_entries(2 * MAX_RULES, 0);

#[map(name = "SHARED_BUCKETS")]
static SHARED_BUCKETS: HashMap<SharedBucketKey, Bucket> = HashMap::with_max_entries(SHARED_BUCKET_ENTRIES, 0);

#[map(name = "SOURCE_BUCKETS")]
static SOURCE_BUCKETS: LruHashMap<SourceBucketKey, Bucket> = LruHashMap::with_max_entries(DEFAULT_SOURCE_ENTRIES, 0);

#[map(name = "STATS")]
static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(STATS_ENTRIES, 0);

/// Packets and bytes dropped per source address (IPv6 by source prefix), for "top limited
/// sources". Per-CPU LRU: no contention, and old sources age out.
#[map(name = "DROPPED_SOURCES")]
static DROPPED_SOURCES: LruPerCpuHashMap<Addr, Counter> = LruPerCpuHashMap::with_max_entries(DROPPED_SOURCE_ENTRIES, 0);

/// Tokens admitted per (global per-source rule, source), cumulative, per CPU: never reset
/// here; the agent reads the growth each sync period and sums it across nodes in Redis.
/// Per-CPU, so a charge adds without atomics; LRU, so a flood of sources only forgets old ones.
#[map(name = "GLOBAL_SOURCE_COUNTS")]
static GLOBAL_SOURCE_COUNTS: LruPerCpuHashMap<SourceBucketKey, u64> =
    LruPerCpuHashMap::with_max_entries(GLOBAL_SOURCE_ENTRIES, 0);

#[map(name = "RULE_STATS")]
static RULE_STATS: PerCpuArray<RuleCounter> = PerCpuArray::with_max_entries(MAX_RULES, 0);

/// The port and verdict of each fragmented datagram's first fragment, for its later
/// fragments (which carry no ports). LRU: a flood of first fragments only forgets old
/// datagrams, whose later fragments are then dropped as `fragment_unknown`.
#[map(name = "FRAGMENTS")]
static FRAGMENTS: LruHashMap<FragmentKey, FragmentEntry> = LruHashMap::with_max_entries(FRAGMENT_ENTRIES, 0);

/// Scratch space for [`fragment_key`].
#[map(name = "FRAGMENT_KEY")]
static FRAGMENT_KEY: PerCpuArray<FragmentKey> = PerCpuArray::with_max_entries(1, 0);

/// What the parser read from the last frame, per CPU, when `CONFIG_FLAG_RECORD_PARSE` is set.
#[map(name = "PARSE_RECORD")]
static PARSE_RECORD: PerCpuArray<ParseRecord> = PerCpuArray::with_max_entries(1, 0);

const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;
const BPF_F_NO_PREALLOC: u32 = 1;
/// Debug records are sampled: the first drop of each reason on each CPU, then one in this many.
const DEBUG_LOG_EVERY: u64 = 1024;

#[xdp]
pub fn limiter(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let config = match CONFIG.get(0) {
        Some(c) => *c,
        None => Config::default(),
    };
    let parsed = parse(&ctx);
    if config.flags & CONFIG_FLAG_RECORD_PARSE != 0 {
        record_parse(&parsed);
    }
    // The SYN proxy of the port, if any (synproxy.rs), answers SYNs and checks cookies; it may
    // end the frame there. A segment with a valid cookie comes back to be judged below as a new
    // connection (`judge_rules`). Here, where little is live, so the stack does not grow.
    if config.flags & CONFIG_FLAG_SYNPROXY != 0
        && let Parsed::Ip(p) = &parsed
        && p.protocol == PROTO_TCP
        && p.has_ports
        && p.fragment == PARSE_FRAG_NONE
    {
        synproxy::hand_off(&ctx, config.active_set & 1, p.dst_port);
    }
    let (verdict_reason, rule_id) = match parsed {
        Parsed::Ip(packet) => {
            let source = source_key_addr(&packet, config.ipv6_source_prefix);
            let (why, rule) = judge(&config, &packet, &source, len);
            if reason::is_drop(why) {
                note_dropped_source(&source, why, len);
            }
            (why, rule)
        }
        Parsed::NotIp => (reason::PASS_NOT_IP, NO_RULE),
        Parsed::Unparsed if config.unparsed_verdict == XDP_DROP => (reason::DROP_UNPARSED, NO_RULE),
        Parsed::Unparsed => (reason::PASS_UNPARSED, NO_RULE),
    };
    let seen = count(verdict_reason, len);
    if reason::is_drop(verdict_reason) {
        if config.flags & CONFIG_FLAG_DEBUG_LOG != 0 && seen % DEBUG_LOG_EVERY == 1 {
            debug!(
                &ctx,
                "drop reason={} rule={} (sampled: drop {} of this reason on this CPU)", verdict_reason, rule_id, seen
            );
        }
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

const NO_RULE: u32 = u32::MAX;

/// The verdict reason for an IP packet, and the rule that decided it (or [`NO_RULE`]).
///
/// The source is known here, so the lists always apply, whatever the rest of the frame is.
#[inline(always)]
fn judge(config: &Config, packet: &Packet, source: &Addr, len: u64) -> (u32, u32) {
    let set = config.active_set & 1;
    let list_key = Key::new(LIST_HOST_PREFIX, ListKey { set_be: set.to_be(), addr: packet.src });
    // Empty lists are not probed (a lookup costs a helper call even on an empty map). Hosts
    // first: one hash lookup, and a host is the longest match the trie could give.
    // SAFETY (both host lookups): the value is only read here, and the agent writes a set's
    // entries before it makes the set active.
    if config.flags & CONFIG_FLAG_NO_ALLOW_HOSTS == 0 && unsafe { ALLOW_HOSTS.get(&list_key) }.is_some() {
        return (reason::PASS_ALLOW_LIST, NO_RULE);
    }
    if config.flags & CONFIG_FLAG_NO_ALLOW == 0 && ALLOW.get(&list_key).is_some() {
        return (reason::PASS_ALLOW_LIST, NO_RULE);
    }
    // The clock is read only where it is needed (a block entry, then the buckets): a list
    // hit never pays for it.
    if config.flags & CONFIG_FLAG_NO_BLOCK == 0
        && let Some(block) = BLOCK.get_ptr(source)
    {
        let now = unsafe { bpf_ktime_get_boot_ns() };
        // SAFETY: pointer from a successful map lookup.
        if unsafe { (*block).expires_at_ns } > now {
            return (reason::DROP_BLOCK_LIST, NO_RULE);
        }
    }
    if config.flags & CONFIG_FLAG_NO_DENY_HOSTS == 0
        && let Some(entry) = unsafe { DENY_HOSTS.get(&list_key) }
    {
        return (reason::DROP_DENY_LIST, entry.rule_id);
    }
    if config.flags & CONFIG_FLAG_NO_DENY == 0
        && let Some(entry) = DENY.get(&list_key)
    {
        return (reason::DROP_DENY_LIST, entry.rule_id);
    }
    // Shapes whose port cannot be known. The stack discards them itself (a truncated segment
    // or header chain; an IPv6 first fragment without the whole header chain, RFC 8200 4.5)
    // or they exist only to slip past filters (RFC 1858 tiny IPv4 fragments, RFC 3128), so
    // dropping them costs no legitimate traffic, while judging them by the any-port rules
    // alone would let them past every port rule.
    if packet.l4 == PARSE_L4_CHAIN {
        return (reason::DROP_HEADER_CHAIN, NO_RULE);
    }
    if packet.l4 == PARSE_L4_TRUNCATED && (packet.protocol == PROTO_TCP || packet.protocol == PROTO_UDP) {
        return (reason::DROP_L4_TRUNCATED, NO_RULE);
    }

    // Fragmented: the first fragment judges the datagram by its port and leaves the port and
    // its verdict for the later fragments, which are judged by the same port's rules (as
    // Cilium does). Each fragment counts as a packet and its bytes; only the first counts as
    // a connection. One call site of `judge_rules` for every kind of packet: the verifier
    // walks its rule loops once per call site.
    let mut port = packet.dst_port;
    let mut protocol = packet.protocol;
    let mut has_port = packet.has_ports;
    let mut later: Option<*mut FragmentEntry> = None;
    if packet.fragment == PARSE_FRAG_LATER {
        let Some(entry) = fragment_key(packet).and_then(|key| FRAGMENTS.get_ptr_mut(key)) else {
            return (reason::DROP_FRAGMENT_UNKNOWN, NO_RULE);
        };
        // SAFETY: pointer from a successful map lookup; a racing writer can only set the flag.
        let e = unsafe { *entry };
        if e.flags & FRAGMENT_DROPPED != 0 {
            return (reason::DROP_FRAGMENT_OF_DROPPED, NO_RULE);
        }
        let _ = count(reason::EVENT_NON_FIRST_FRAGMENT, len);
        port = e.port;
        protocol = e.port_protocol;
        has_port = e.port_protocol != PROTO_ANY;
        later = Some(entry);
    }
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let (why, rule) = judge_rules(set, packet, source, len, now, port, protocol, has_port);
    if packet.fragment == PARSE_FRAG_FIRST {
        let entry = FragmentEntry {
            port: if packet.has_ports { packet.dst_port } else { 0 },
            port_protocol: if packet.has_ports { packet.protocol } else { PROTO_ANY },
            flags: if reason::is_drop(why) { FRAGMENT_DROPPED } else { 0 },
        };
        // A full table evicts the oldest datagram; an insert that fails anyway leaves the
        // later fragments to be dropped as unknown (the safe side).
        if let Some(key) = fragment_key(packet) {
            let _ = FRAGMENTS.insert(key, entry, BPF_ANY);
        }
    } else if let Some(entry) = later
        && reason::is_drop(why)
    {
        // The datagram cannot be reassembled now: its remaining fragments cost nothing.
        // SAFETY: as above.
        unsafe { (*entry).flags |= FRAGMENT_DROPPED };
    }
    (why, rule)
}

/// The datagram a fragment belongs to, as reassembly identifies it, written into this CPU's
/// `FRAGMENT_KEY` slot: 40 bytes the program's stack (512 bytes for the whole call chain,
/// rule callbacks included) has no room for.
#[inline(always)]
fn fragment_key(packet: &Packet) -> Option<&'static FragmentKey> {
    let key = FRAGMENT_KEY.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, no other user while this program runs on this CPU.
    let key = unsafe { &mut *key };
    key.src = packet.src;
    key.dst = packet.dst;
    key.id = packet.frag_id;
    key.protocol = packet.frag_protocol;
    key._pad = [0; 3];
    Some(key)
}

/// The verdict of the rules of `port` (`has_port`) or of the any-port list, for a packet
/// that passed the lists.
#[expect(clippy::too_many_arguments, reason = "inlined: the arguments are registers, not a struct to build")]
#[inline(always)]
fn judge_rules(
    set: u32,
    packet: &Packet,
    source: &Addr,
    len: u64,
    now: u64,
    port: u16,
    protocol: u8,
    has_port: bool,
) -> (u32, u32) {
    // The port's own list already includes the any-port rules (the agent merges them), so one
    // lookup finds everything that applies.
    let mut port_key = PortKey { port: 0, protocol: PROTO_ANY, set: set as u8 };
    let mut rules = None;
    if has_port {
        port_key.port = port;
        port_key.protocol = protocol;
        rules = PORT_RULES.get_ptr(port_key);
    }
    if rules.is_none() {
        port_key.port = 0;
        port_key.protocol = PROTO_ANY;
        rules = PORT_RULES.get_ptr(port_key);
    }
    let Some(rules) = rules else {
        return (reason::PASS_NO_RULE, NO_RULE);
    };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return (reason::PASS_NO_RULE, NO_RULE);
    };
    // SAFETY: per-CPU slot, no other user while this program runs on this CPU; the rule list
    // is a live map value that the agent never writes while its set is active.
    let (s, rules) = unsafe { (&mut *scratch, &*rules) };
    s.src = packet.src;
    s.source = *source;
    s.len = len;
    s.now = now;
    s.set = set;
    s.port = port_key.port;
    s.port_protocol = port_key.protocol;
    s.packet_protocol = packet.protocol;
    s.tcp_syn = (packet.tcp_syn || (packet.protocol == PROTO_TCP && synproxy::take_validated())) as u8;
    s.later_fragment = (packet.fragment == PARSE_FRAG_LATER) as u8;
    s.slots = rules.slots;
    s.charged = 0;
    s.global = 0;
    s.applied = 0;
    s.shadowed = 0;
    s.refused_rule = NO_RULE;
    s.refused_flags = 0;
    let n = if rules.len > MAX_RULES_PER_PORT as u32 { MAX_RULES_PER_PORT as u32 } else { rules.len };
    if n == 1 {
        // The common case, one rule for the port: a direct call skips `bpf_loop`'s own cost.
        judge_rule(0, core::ptr::null_mut());
    } else {
        // SAFETY: bpf_loop calls `judge_rule` n times; a null context is allowed, the callback
        // finds its state in SCRATCH.
        unsafe { bpf_loop(n, judge_rule as *mut c_void, core::ptr::null_mut(), 0) };
    }

    if s.refused_rule != NO_RULE {
        if s.charged != 0 {
            // Give back what earlier buckets took for a packet that is dropped anyway, so a
            // source over its own limit cannot drain the shared (per-port) bucket for others.
            // SAFETY: as above.
            unsafe { bpf_loop(n, refund_rule as *mut c_void, core::ptr::null_mut(), 0) };
        }
        let why = if s.refused_flags & KEY_BY_SOURCE == 0 {
            reason::DROP_SHARED_BUCKET
        } else if s.refused_flags & KEY_BY_PORT == 0 {
            reason::DROP_SOURCE_BUCKET
        } else {
            reason::DROP_SOURCE_PORT_BUCKET
        };
        return (why, s.refused_rule);
    }
    if s.global != 0 {
        // SAFETY: as above.
        unsafe { bpf_loop(n, count_global_rule as *mut c_void, core::ptr::null_mut(), 0) };
    }
    if s.shadowed != 0 {
        (reason::PASS_SHADOW, NO_RULE)
    } else if s.applied != 0 {
        (reason::PASS_CONFORMING, NO_RULE)
    } else {
        (reason::PASS_NO_RULE, NO_RULE)
    }
}

/// Per-CPU state of one packet's rule evaluation, shared with the `bpf_loop` callbacks.
///
/// Rules are evaluated by `bpf_loop` rather than an unrolled loop so the verifier checks the
/// body once instead of once per rule and per combination of earlier outcomes (an unrolled
/// 16-rule loop exhausts its one-million-instruction budget). Keeping the state in a map
/// value rather than in registers also keeps it opaque to the verifier, which would otherwise
/// track a bitmask like `charged` value by value.
#[repr(C)]
pub struct Scratch {
    src: Addr,
    /// Source as buckets key it (IPv6 masked to the source prefix).
    source: Addr,
    len: u64,
    now: u64,
    set: u32,
    /// The `PORT_RULES` key the list came from (0/any for the any-port list).
    port: u16,
    port_protocol: u8,
    packet_protocol: u8,
    tcp_syn: u8,
    /// A fragment other than the first: never a new connection.
    later_fragment: u8,
    _pad: [u8; 2],
    slots: [u32; MAX_RULES_PER_PORT],
    /// Bit i: rule i charged its bucket.
    charged: u32,
    applied: u32,
    shadowed: u32,
    /// The rule that refused the packet, or `NO_RULE`.
    refused_rule: u32,
    refused_flags: u8,
    _pad2: [u8; 7],
    /// Bit i: rule i is a global per-source rule and charged its bucket.
    global: u32,
    _pad3: u32,
    /// Key and value of a `GLOBAL_SOURCE_COUNTS` access (see [`count_global_rule`]).
    global_key: SourceBucketKey,
    global_tokens: u64,
}

#[map(name = "SCRATCH")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// `bpf_loop` callback: judges the packet by rule `index` of its port's list. Returns 1 to
/// stop the loop (a rule refused the packet), 0 to go on.
#[inline(never)]
extern "C" fn judge_rule(index: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = SCRATCH.get_ptr_mut(0) else { return 1 };
    // SAFETY: per-CPU slot, only this program on this CPU uses it.
    let s = unsafe { &mut *s };
    let i = (index as usize) % MAX_RULES_PER_PORT;
    let Some(rule) = RULES.get(s.set * MAX_RULES + (s.slots[i] % MAX_RULES)) else { return 0 };
    let Some(tokens) = tokens(s, rule) else { return 0 };
    s.applied = 1;
    let Some(tat) = bucket(s, rule) else {
        // No per-source state could be created: judge by the other buckets only.
        let _ = count(reason::EVENT_SOURCE_INSERT_FAILED, s.len);
        return 0;
    };
    // SAFETY: pointer from a successful map lookup.
    match unsafe { charge(tat, s.now, rule.bucket.cost_ns(tokens), rule.bucket.burst_ns) } {
        Charge::Admitted => {
            s.charged |= 1 << i;
            if rule.flags & RULE_FLAG_GLOBAL_SOURCE != 0 {
                s.global |= 1 << i;
            }
            rule_count(rule.rule_id, s.len, RuleOutcome::Passed);
            return 0;
        }
        Charge::Contended => {
            let _ = count(reason::EVENT_BUCKET_CONTENDED, s.len);
        }
        Charge::Refused => {}
    }
    if rule.flags & RULE_FLAG_SHADOW != 0 {
        s.shadowed = 1;
        rule_count(rule.rule_id, s.len, RuleOutcome::ShadowDropped);
        return 0;
    }
    rule_count(rule.rule_id, s.len, RuleOutcome::Dropped);
    s.refused_rule = rule.rule_id;
    s.refused_flags = rule.key_flags;
    1
}

/// `bpf_loop` callback: gives back the charge of rule `index` if it took one.
#[inline(never)]
extern "C" fn refund_rule(index: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = SCRATCH.get_ptr_mut(0) else { return 1 };
    // SAFETY: as in `judge_rule`.
    let s = unsafe { &mut *s };
    let i = (index as usize) % MAX_RULES_PER_PORT;
    if s.charged & (1 << i) == 0 {
        return 0;
    }
    let Some(rule) = RULES.get(s.set * MAX_RULES + (s.slots[i] % MAX_RULES)) else { return 0 };
    let Some(tokens) = tokens(s, rule) else { return 0 };
    // Look up only: if the entry vanished since the charge (evicted from the LRU by another
    // CPU, or purged by the agent with a retired rule), there is nothing to give back, and
    // creating it here would only make a bucket nobody charged.
    if let Some(tat) = existing_bucket(s, rule) {
        // SAFETY: pointer from a successful map lookup.
        unsafe { refund(tat, rule.bucket.cost_ns(tokens)) };
    }
    0
}

/// `bpf_loop` callback, for an admitted packet: adds what global per-source rule `index`
/// charged to the source's count on this CPU in `GLOBAL_SOURCE_COUNTS`.
///
/// A pass of its own after the verdict, rather than a count in `judge_rule` taken back by
/// `refund_rule`: a refused packet never touches the map, and `judge_rule`, which the program
/// also calls directly, keeps its frame (the two frames together are at the 512-byte limit).
/// For the same reason the key and value live in `Scratch`, not on the stack.
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by reference the helpers read key and value in SCRATCH; by value they would be copied to the stack"
)]
#[inline(never)]
extern "C" fn count_global_rule(index: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = SCRATCH.get_ptr_mut(0) else { return 1 };
    // SAFETY: as in `judge_rule`.
    let s = unsafe { &mut *s };
    let i = (index as usize) % MAX_RULES_PER_PORT;
    if s.global & (1 << i) == 0 {
        return 0;
    }
    let Some(rule) = RULES.get(s.set * MAX_RULES + (s.slots[i] % MAX_RULES)) else { return 0 };
    let Some(tokens) = tokens(s, rule) else { return 0 };
    let (port, protocol) = key_port(s, rule);
    s.global_key.rule_id = rule.rule_id;
    s.global_key.port = port;
    s.global_key.protocol = protocol;
    s.global_key._pad = 0;
    s.global_key.addr = s.source;
    if let Some(c) = GLOBAL_SOURCE_COUNTS.get_ptr_mut(&s.global_key) {
        // SAFETY: this CPU's value of a live entry; only this program on this CPU writes it.
        unsafe { *c += tokens };
        return 0;
    }
    // A new entry's other CPUs start at 0 (the kernel zeroes them). A full table evicts the
    // least recently used source; an insert that fails anyway loses this count only.
    s.global_tokens = tokens;
    let _ = GLOBAL_SOURCE_COUNTS.insert(&s.global_key, &s.global_tokens, BPF_NOEXIST);
    0
}

/// Tokens the packet costs under `rule`, or `None` if the rule does not select it.
#[inline(always)]
fn tokens(s: &Scratch, rule: &RuleConfig) -> Option<u64> {
    if !source_matches(rule, &s.src) {
        return None;
    }
    match rule.count {
        COUNT_BYTES => Some(s.len),
        // A datagram is one connection attempt however many fragments carry it.
        COUNT_CONNECTIONS if s.later_fragment != 0 => None,
        COUNT_CONNECTIONS => match s.packet_protocol {
            PROTO_TCP if s.tcp_syn != 0 => Some(1),
            PROTO_UDP => Some(1),
            _ => None,
        },
        _ => Some(1),
    }
}

/// The bucket `rule` charges for this packet, created full on first use.
#[inline(always)]
fn bucket(s: &Scratch, rule: &RuleConfig) -> Option<*mut Bucket> {
    if rule.key_flags & KEY_BY_SOURCE == 0 {
        lookup_or_create(&SHARED_BUCKETS, &shared_key(s, rule))
    } else {
        lookup_or_create_lru(&SOURCE_BUCKETS, &source_key(s, rule))
    }
}

/// The bucket `rule` charged for this packet, if it still exists; never creates one.
#[inline(always)]
fn existing_bucket(s: &Scratch, rule: &RuleConfig) -> Option<*mut Bucket> {
    if rule.key_flags & KEY_BY_SOURCE == 0 {
        SHARED_BUCKETS.get_ptr_mut(shared_key(s, rule))
    } else {
        SOURCE_BUCKETS.get_ptr_mut(source_key(s, rule))
    }
}

/// Port and protocol in the bucket key: the packet's when the rule keys by port, else 0.
#[inline(always)]
fn key_port(s: &Scratch, rule: &RuleConfig) -> (u16, u8) {
    if rule.key_flags & KEY_BY_PORT != 0 { (s.port, s.port_protocol) } else { (0, 0) }
}

#[inline(always)]
fn shared_key(s: &Scratch, rule: &RuleConfig) -> SharedBucketKey {
    let (port, protocol) = key_port(s, rule);
    SharedBucketKey { rule_id: rule.rule_id, port, protocol, _pad: 0 }
}

#[inline(always)]
fn source_key(s: &Scratch, rule: &RuleConfig) -> SourceBucketKey {
    let (port, protocol) = key_port(s, rule);
    SourceBucketKey { rule_id: rule.rule_id, port, protocol, _pad: 0, addr: s.source }
}

#[inline(always)]
fn lookup_or_create(map: &HashMap<SharedBucketKey, Bucket>, key: &SharedBucketKey) -> Option<*mut Bucket> {
    if let Some(b) = map.get_ptr_mut(key) {
        return Some(b);
    }
    // Lost a race with another CPU creating it: that is fine, NOEXIST keeps theirs.
    let _ = map.insert(key, Bucket { tat_ns: 0, refunded_ns: 0 }, BPF_NOEXIST);
    map.get_ptr_mut(key)
}

#[inline(always)]
fn lookup_or_create_lru(map: &LruHashMap<SourceBucketKey, Bucket>, key: &SourceBucketKey) -> Option<*mut Bucket> {
    if let Some(b) = map.get_ptr_mut(key) {
        return Some(b);
    }
    let _ = map.insert(key, Bucket { tat_ns: 0, refunded_ns: 0 }, BPF_NOEXIST);
    map.get_ptr_mut(key)
}

/// Whether the rule's source selector selects `src`.
#[inline(always)]
fn source_matches(rule: &RuleConfig, src: &Addr) -> bool {
    let inside = prefix_matches(&rule.source_net, src, rule.source_prefix);
    inside != (rule.flags & RULE_FLAG_INVERT != 0)
}

/// Whether the first `prefix` bits of `a` and `b` agree.
#[inline(always)]
fn prefix_matches(net: &Addr, addr: &Addr, prefix: u32) -> bool {
    let net = [u64::from_be_bytes(half(net, 0)), u64::from_be_bytes(half(net, 8))];
    let addr = [u64::from_be_bytes(half(addr, 0)), u64::from_be_bytes(half(addr, 8))];
    let hi_mask = mask64(prefix);
    let lo_mask = mask64(prefix.saturating_sub(64));
    (net[0] ^ addr[0]) & hi_mask == 0 && (net[1] ^ addr[1]) & lo_mask == 0
}

#[inline(always)]
fn half(a: &Addr, at: usize) -> [u8; 8] {
    [a[at], a[at + 1], a[at + 2], a[at + 3], a[at + 4], a[at + 5], a[at + 6], a[at + 7]]
}

/// The top `bits` bits set (saturating at 64).
#[inline(always)]
fn mask64(bits: u32) -> u64 {
    if bits == 0 {
        0
    } else if bits >= 64 {
        u64::MAX
    } else {
        u64::MAX << (64 - bits)
    }
}

/// The source as buckets and the block list key it: IPv6 masked to `v6_prefix` bits (a host
/// typically owns a whole /64, so per-address buckets would be trivially evaded).
#[inline(always)]
fn source_key_addr(packet: &Packet, v6_prefix: u32) -> Addr {
    if !packet.is_ipv6 {
        return packet.src;
    }
    let prefix = if v6_prefix == 0 || v6_prefix > 128 { 128 } else { v6_prefix };
    let hi = u64::from_be_bytes(half(&packet.src, 0)) & mask64(prefix);
    let lo = u64::from_be_bytes(half(&packet.src, 8)) & mask64(prefix.saturating_sub(64));
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&hi.to_be_bytes());
    out[8..].copy_from_slice(&lo.to_be_bytes());
    out
}

/// Writes what the parser read into this CPU's `PARSE_RECORD` slot.
#[inline(always)]
fn record_parse(parsed: &Parsed) {
    let Some(r) = PARSE_RECORD.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
    let r = unsafe { &mut *r };
    // Field by field, in place: a whole-struct store would need a 32-byte temporary on the
    // stack.
    r.seq += 1;
    r.src = [0; 16];
    r.kind = PARSE_KIND_IP;
    r.ip_version = 0;
    r.protocol = 0;
    r.fragment = 0;
    r.has_port = 0;
    r.dst_port = 0;
    r.l4 = 0;
    match parsed {
        Parsed::NotIp => r.kind = PARSE_KIND_NOT_IP,
        Parsed::Unparsed => r.kind = PARSE_KIND_UNPARSED,
        Parsed::Ip(p) => {
            r.src = p.src;
            r.ip_version = if p.is_ipv6 { 6 } else { 4 };
            r.protocol = p.protocol;
            r.fragment = p.fragment;
            r.has_port = p.has_ports as u8;
            r.dst_port = if p.has_ports { p.dst_port } else { 0 };
            r.l4 = p.l4;
        }
    }
}

/// Adds a drop to the source's entry in `DROPPED_SOURCES`; a new source gets an entry on one
/// drop in `DROPPED_SOURCE_SAMPLE` only (see there).
#[inline(always)]
fn note_dropped_source(source: &Addr, why: u32, len: u64) {
    if let Some(c) = DROPPED_SOURCES.get_ptr_mut(source) {
        // SAFETY: per-CPU value of a live entry.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
        return;
    }
    let Some(seen) = STATS.get_ptr(why) else { return };
    // SAFETY: per-CPU slot; read before this packet is counted.
    if unsafe { (*seen).packets } % DROPPED_SOURCE_SAMPLE == 0 {
        let _ = DROPPED_SOURCES.insert(source, Counter { packets: 1, bytes: len }, BPF_NOEXIST);
    }
}

/// Counts one packet under `index`; returns that counter's packet count on this CPU.
#[inline(always)]
fn count(index: u32, len: u64) -> u64 {
    let Some(c) = STATS.get_ptr_mut(index) else { return 0 };
    // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
    unsafe {
        (*c).packets += 1;
        (*c).bytes += len;
        (*c).packets
    }
}

enum RuleOutcome {
    Passed,
    Dropped,
    ShadowDropped,
}

#[inline(always)]
fn rule_count(rule_id: u32, len: u64, outcome: RuleOutcome) {
    if let Some(c) = RULE_STATS.get_ptr_mut(rule_id) {
        // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
        let c = unsafe { &mut *c };
        let counter = match outcome {
            RuleOutcome::Passed => &mut c.passed,
            RuleOutcome::Dropped => &mut c.dropped,
            RuleOutcome::ShadowDropped => &mut c.shadow_dropped,
        };
        counter.packets += 1;
        counter.bytes += len;
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

const _: () = assert!(XDP_PASS == xdp_action::XDP_PASS && XDP_DROP == xdp_action::XDP_DROP);
