//! The SYN proxy: a second XDP program, reached by a tail call from the main program for the
//! TCP segments of ports whose policy turned the proxy on (`SYNPROXY_PORTS`).
//!
//! It keeps no per-connection state. A segment the kernel has a socket for (an established
//! connection, one in the listener's SYN queue, or in TIME-WAIT) goes back to the main
//! program untouched. For the rest:
//! - a SYN is answered here with a SYN-ACK whose sequence number is a SYN cookie from the
//!   kernel's own secret (`bpf_tcp_raw_gen_syncookie_*`), built in place and sent back out
//!   (`XDP_TX`); the client's options (window scale, SACK, ECN) travel in the low bits of the
//!   timestamp value, the encoding netfilter's SYNPROXY decodes. In threshold mode only the
//!   SYNs the port's meter refuses (those above the threshold rate) are answered so; the others
//!   go to the listener as if there were no proxy.
//! - an ACK must carry a valid cookie (`bpf_tcp_raw_check_syncookie_*`): it then goes back to
//!   the main program as a new connection (the `Connections` rules count it there), and on to
//!   the kernel, where netfilter's SYNPROXY checks the cookie again and opens the connection
//!   to the real listener on the client's behalf. A bad or stale cookie is dropped here.
//!
//! Shapes it does not build answers for (VLAN tags, IPv4 options, IPv6 extension headers, a
//! SYN with payload) go back to the main program unanswered: the rules judge them, and the
//! kernel's netfilter SYNPROXY still checks every ACK. See the README, "SYN proxy".
//!
//! Everything is read from a copy of the headers in a per-CPU map value (`SYNPROXY_SCRATCH`)
//! and the SYN-ACK is built there, then written over the frame: one bounds proof for the
//! verifier instead of one per header field.

use core::ffi::c_void;

use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_sock_tuple, iphdr, ipv6hdr, tcphdr, xdp_action},
    helpers::{
        bpf_ktime_get_boot_ns, bpf_ktime_get_ns, bpf_loop, bpf_sk_release, bpf_skc_lookup_tcp,
        bpf_tcp_raw_check_syncookie_ipv4, bpf_tcp_raw_check_syncookie_ipv6, bpf_tcp_raw_gen_syncookie_ipv4,
        bpf_tcp_raw_gen_syncookie_ipv6, bpf_xdp_adjust_tail, bpf_xdp_load_bytes, bpf_xdp_store_bytes,
    },
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use limiter_common::{
    Addr, Bucket, CONFIG_FLAG_NO_ALLOW, CONFIG_FLAG_NO_BLOCK, CONFIG_FLAG_NO_DENY, Config, Counter, LIST_KEY_SET_BITS,
    ListKey, PortKey, ipv4_mapped,
    synproxy::{PROG_MAIN, PROG_SYNPROXY, PROGRAMS_ENTRIES, SYNPROXY_MODE_THRESHOLD, SynproxyPort, event, port_key},
};

use crate::bucket::{Charge, charge};

#[map(name = "SYNPROXY_PORTS")]
pub(crate) static SYNPROXY_PORTS: HashMap<PortKey, SynproxyPort> = HashMap::with_max_entries(4 * 65_536, 1);

#[map(name = "SYNPROXY_METERS")]
static SYNPROXY_METERS: Array<Bucket> = Array::with_max_entries(65_536, 0);

#[map(name = "SYNPROXY_STATS")]
static SYNPROXY_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(event::COUNT, 0);

#[map(name = "PROGRAMS")]
static PROGRAMS: ProgramArray = ProgramArray::with_max_entries(PROGRAMS_ENTRIES, 0);

/// Room for Ethernet + IPv6 + the longest TCP header (14 + 40 + 60), rounded up.
const FRAME: usize = 128;
const MASK: usize = FRAME - 1;

#[repr(C)]
pub struct Scratch {
    /// The first bytes of the frame as received; zero past its end.
    frame: [u8; FRAME],
    /// The SYN-ACK being built.
    out: [u8; FRAME],
    /// Option walk: next offset into `frame`, end of the options.
    opt_off: u32,
    opt_end: u32,
    /// Client's tsval (host order); its window scale (0xf: none), SACK permitted, timestamps.
    tsval: u32,
    wscale: u8,
    sack: u8,
    ts: u8,
    _pad: u8,
}

#[map(name = "SYNPROXY_SCRATCH")]
static SYNPROXY_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// What the proxy left for the main program it tail-calls back: which frame, and how to
/// judge it.
#[repr(C)]
pub struct Handoff {
    data: u64,
    data_end: u64,
    back: u32,
    /// The main program's `SYNPROXY_PORTS` key, here rather than on its stack, which has no
    /// room left (512 bytes for the whole call chain).
    key: PortKey,
    /// The frame the main program is judging came back from the proxy with a valid cookie:
    /// read (and cleared) by [`take_validated`], so no register of the main program holds it
    /// across the calls in between.
    validated: u32,
    _pad: u32,
}

#[map(name = "SYNPROXY_HANDOFF")]
static SYNPROXY_HANDOFF: PerCpuArray<Handoff> = PerCpuArray::with_max_entries(1, 0);

const BACK_NONE: u32 = 0;
/// Judge it as the rules would without the proxy.
const BACK_CONTINUE: u32 = 1;
/// A valid cookie: judge it as a new connection.
const BACK_CONNECTION: u32 = 2;

/// Called by the main program, after the lists, for an unfragmented TCP segment to `port`.
/// For a segment of a proxied port met for the first time it does not return: the proxy
/// program takes over (and comes back through a tail call, or ends the frame itself). When it
/// returns, the segment is judged by the rules: as a new connection if the proxy validated its
/// cookie ([`take_validated`]), else as without the proxy (no proxy on the port, a segment
/// the proxy handed back, or no proxy program in the table: an agent setting up).
#[inline(always)]
pub fn hand_off(ctx: &XdpContext, set: u32, port: u16) {
    let Some(h) = SYNPROXY_HANDOFF.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU slot; programs run to completion on their CPU, tail calls included.
    let h = unsafe { &mut *h };
    if h.back != BACK_NONE {
        let back = h.back;
        h.back = BACK_NONE;
        // The note is for this frame: the proxy wrote it just before jumping here.
        if h.data == ctx.data() as u64 && h.data_end == ctx.data_end() as u64 {
            h.validated = (back == BACK_CONNECTION) as u32;
            return;
        }
    }
    h.key = port_key(port, set as u8);
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "the key must stay in the map value: by value it would be copied onto the main program's stack"
    )]
    let missing = SYNPROXY_PORTS.get_ptr(&h.key).is_none();
    if missing {
        return;
    }
    // SAFETY: the context is this program's own.
    unsafe { PROGRAMS.tail_call(ctx, PROG_SYNPROXY) };
}

/// Whether the frame being judged came back from the proxy with a valid cookie; clears it.
#[inline(always)]
pub fn take_validated() -> bool {
    let Some(h) = SYNPROXY_HANDOFF.get_ptr_mut(0) else { return false };
    // SAFETY: as in `hand_off`.
    let h = unsafe { &mut *h };
    let v = h.validated != 0;
    h.validated = 0;
    v
}

#[xdp]
pub fn synproxy(ctx: XdpContext) -> u32 {
    match proxy(&ctx) {
        Ok(action) => action,
        Err(back) => go_back(&ctx, back),
    }
}

/// Tail-calls the main program with a note saying how to judge the frame.
#[inline(always)]
fn go_back(ctx: &XdpContext, back: u32) -> u32 {
    if let Some(h) = SYNPROXY_HANDOFF.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, as in `hand_off`.
        let h = unsafe { &mut *h };
        h.data = ctx.data() as u64;
        h.data_end = ctx.data_end() as u64;
        h.back = back;
        // SAFETY: the context is this program's own.
        unsafe { PROGRAMS.tail_call(ctx, PROG_MAIN) };
        // No main program in the table: nothing judges the frame, so the kernel does.
        h.back = BACK_NONE;
    }
    xdp_action::XDP_PASS
}

pub(crate) const ETH_HLEN: usize = 14;
const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const TCP_ECE: u8 = 0x40;
const TCP_CWR: u8 = 0x80;
/// `TCP_LISTEN` in the kernel's `enum tcp_state`.
pub(crate) const TCP_LISTEN: u32 = 10;
/// `BPF_F_CURRENT_NETNS`: look up in the namespace of the receiving device.
pub(crate) const CURRENT_NETNS: u64 = u64::MAX;
/// Timestamp-value bits that carry the client's options (`TSBITS` in the kernel).
const TS_OPT_BITS: u32 = 6;
const TS_OPT_WSCALE_NONE: u8 = 0xf;
const TS_OPT_SACK: u32 = 1 << 4;
const TS_OPT_ECN: u32 = 1 << 5;
const TCP_MAX_WSCALE: u8 = 14;

#[inline(always)]
fn note(e: u32, len: u64) {
    if let Some(c) = SYNPROXY_STATS.get_ptr_mut(e) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
}

#[inline(always)]
fn at(b: &[u8; FRAME], i: usize) -> u8 {
    b[i & MASK]
}

#[inline(always)]
fn be16(b: &[u8; FRAME], i: usize) -> u32 {
    (u32::from(at(b, i)) << 8) | u32::from(at(b, i + 1))
}

#[inline(always)]
fn be32(b: &[u8; FRAME], i: usize) -> u32 {
    (be16(b, i) << 16) | be16(b, i + 2)
}

#[inline(always)]
fn put16(b: &mut [u8; FRAME], i: usize, v: u32) {
    b[i & MASK] = (v >> 8) as u8;
    b[(i + 1) & MASK] = v as u8;
}

#[inline(always)]
fn put32(b: &mut [u8; FRAME], i: usize, v: u32) {
    put16(b, i, v >> 16);
    put16(b, i + 2, v);
}

/// Ones'-complement sum of the big-endian 16-bit words of `b[from..from + 2 * words]`,
/// counting only the first `len` bytes (the rest as zero), unfolded.
#[inline(always)]
fn sum_words(b: &[u8; FRAME], from: usize, words: usize, len: usize) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < words {
        // Branch-free: the verifier walks one path whatever `len` is.
        let keep = 0u32.wrapping_sub((2 * i < len) as u32);
        sum += be16(b, from + 2 * i) & keep;
        i += 1;
    }
    sum
}

#[inline(always)]
fn fold(mut sum: u32) -> u32 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum & 0xffff
}

/// Sum of the IPv4 or IPv6 pseudo-header of a TCP segment of `len` bytes whose addresses are
/// in `b` as an IP header starting at `ETH_HLEN`.
#[inline(always)]
fn pseudo_sum(b: &[u8; FRAME], v6: bool, len: usize) -> u32 {
    let addrs = if v6 { sum_words(b, ETH_HLEN + 8, 16, 32) } else { sum_words(b, ETH_HLEN + 12, 4, 8) };
    addrs + 6 + len as u32
}

/// The proxy's verdict: `Ok(action)` ends the frame here, `Err(back)` hands it back to the
/// main program with that note.
#[inline(always)]
fn proxy(ctx: &XdpContext) -> Result<u32, u32> {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let Some(s) = SYNPROXY_SCRATCH.get_ptr_mut(0) else { return Err(BACK_CONTINUE) };
    // SAFETY: per-CPU slot, only this program on this CPU uses it.
    let s = unsafe { &mut *s };
    let copied = if len > FRAME as u64 { FRAME } else { len as usize };
    // The smallest frame we answer: Ethernet + IPv4 + TCP without options.
    if copied < ETH_HLEN + 20 + 20 {
        note(event::UNHANDLED_SHAPE, len);
        return Err(BACK_CONTINUE);
    }
    s.frame = [0; FRAME];
    // SAFETY: `copied` is within both the frame and the buffer.
    if unsafe { bpf_xdp_load_bytes(ctx.as_ptr().cast(), 0, s.frame.as_mut_ptr().cast(), copied as u32) } != 0 {
        return Err(BACK_CONTINUE);
    }
    let f = &s.frame;
    let ethertype = be16(f, 12);
    let (v6, l4, ip_payload) = match ethertype {
        // IPv4 without options, not fragmented (the main program hands over only those, but
        // the bytes are read again here).
        0x0800 if at(f, ETH_HLEN) == 0x45 && at(f, ETH_HLEN + 9) == 6 && be16(f, ETH_HLEN + 6) & 0x3fff == 0 => {
            (false, ETH_HLEN + 20, be16(f, ETH_HLEN + 2).wrapping_sub(20))
        }
        0x86dd if at(f, ETH_HLEN) >> 4 == 6 && at(f, ETH_HLEN + 6) == 6 => (true, ETH_HLEN + 40, be16(f, ETH_HLEN + 4)),
        _ => {
            note(event::UNHANDLED_SHAPE, len);
            return Err(BACK_CONTINUE);
        }
    };
    let tcp_len = usize::from(at(f, l4 + 12) >> 4) * 4;
    let flags = at(f, l4 + 13);
    if tcp_len < 20 || l4 + tcp_len > copied || ip_payload > 0xffff || (ip_payload as usize) < tcp_len {
        note(event::MALFORMED, len);
        return Ok(xdp_action::XDP_DROP);
    }
    let payload = ip_payload as usize - tcp_len;

    if has_socket(ctx, f, v6, l4) {
        note(event::ESTABLISHED, len);
        return Err(BACK_CONTINUE);
    }
    if flags & TCP_RST != 0 {
        note(event::RST, len);
        return Err(BACK_CONTINUE);
    }
    match flags & (TCP_SYN | TCP_ACK | TCP_FIN) {
        TCP_SYN => {}
        // An ACK (with or without data or FIN) for no socket must finish a cookie handshake.
        f_ if f_ & (TCP_SYN | TCP_ACK) == TCP_ACK => {
            // SAFETY: fixed-size header copies in a map value.
            let bad = unsafe {
                if v6 {
                    bpf_tcp_raw_check_syncookie_ipv6(
                        s.frame.as_mut_ptr().add(ETH_HLEN).cast::<ipv6hdr>(),
                        s.frame.as_mut_ptr().add(ETH_HLEN + 40).cast::<tcphdr>(),
                    )
                } else {
                    bpf_tcp_raw_check_syncookie_ipv4(
                        s.frame.as_mut_ptr().add(ETH_HLEN).cast::<iphdr>(),
                        s.frame.as_mut_ptr().add(ETH_HLEN + 20).cast::<tcphdr>(),
                    )
                }
            };
            if bad != 0 {
                note(event::COOKIE_INVALID, len);
                return Ok(xdp_action::XDP_DROP);
            }
            note(event::COOKIE_VALID, len);
            return Err(BACK_CONNECTION);
        }
        // SYN-ACK, SYN with FIN, FIN alone, no flag: nothing a listener answers.
        _ => {
            note(event::MALFORMED, len);
            return Ok(xdp_action::XDP_DROP);
        }
    }

    // A SYN. The main program has not judged the lists yet (it hands over first, where its
    // stack has room): they apply here before anything is answered.
    let config = match crate::CONFIG.get(0) {
        Some(c) => *c,
        None => Config::default(),
    };
    match lists(f, v6, &config) {
        Lists::Proxy => {}
        Lists::Allowed => return Err(BACK_CONTINUE),
        Lists::Denied => return Err(BACK_CONTINUE),
    }
    let port = be16(f, l4 + 2) as u16;
    let set = config.active_set & 1;
    let Some(cfg) = SYNPROXY_PORTS.get_ptr(port_key(port, set as u8)) else { return Err(BACK_CONTINUE) };
    // SAFETY: a live map value; the agent never writes the active set's entries.
    let cfg = unsafe { &*cfg };
    if cfg.mode == SYNPROXY_MODE_THRESHOLD && below_threshold(port, cfg) {
        note(event::BELOW_THRESHOLD, len);
        return Err(BACK_CONTINUE);
    }
    if payload != 0 {
        note(event::UNHANDLED_SHAPE, len);
        return Err(BACK_CONTINUE);
    }
    // Checksums before answering: a corrupted SYN gets no SYN-ACK (the kernel would drop it).
    let ip_ok = v6 || fold(sum_words(f, ETH_HLEN, 10, 20)) == 0xffff;
    let tcp_ok = fold(sum_words(f, l4, 30, tcp_len) + pseudo_sum(f, v6, tcp_len)) == 0xffff;
    if !ip_ok || !tcp_ok {
        note(event::MALFORMED, len);
        return Ok(xdp_action::XDP_DROP);
    }
    // SAFETY: header copies in a map value; `tcp_len` is the header's own length (20..=60)
    // and lies within the buffer.
    let cookie = unsafe {
        if v6 {
            bpf_tcp_raw_gen_syncookie_ipv6(
                s.frame.as_mut_ptr().add(ETH_HLEN).cast::<ipv6hdr>(),
                s.frame.as_mut_ptr().add(ETH_HLEN + 40).cast::<tcphdr>(),
                tcp_len as u32,
            )
        } else {
            bpf_tcp_raw_gen_syncookie_ipv4(
                s.frame.as_mut_ptr().add(ETH_HLEN).cast::<iphdr>(),
                s.frame.as_mut_ptr().add(ETH_HLEN + 20).cast::<tcphdr>(),
                tcp_len as u32,
            )
        }
    };
    if cookie < 0 {
        note(event::MALFORMED, len);
        return Ok(xdp_action::XDP_DROP);
    }
    read_options(s, l4, tcp_len);
    let out_len = build_synack(s, cfg, v6, l4, cookie as u32, flags);
    // SAFETY: the frame is this program's; `out_len` is at most 14 + 40 + 40 bytes.
    unsafe {
        if bpf_xdp_adjust_tail(ctx.as_ptr().cast(), out_len as i32 - len as i32) != 0 {
            return Ok(xdp_action::XDP_DROP);
        }
        if bpf_xdp_store_bytes(ctx.as_ptr().cast(), 0, s.out.as_mut_ptr().cast(), out_len as u32) != 0 {
            return Ok(xdp_action::XDP_DROP);
        }
    }
    note(event::SYNACK_SENT, out_len as u64);
    Ok(xdp_action::XDP_TX)
}

/// Whether the kernel has a socket other than a listener for the segment's 4-tuple: an
/// established connection (made through the proxy or before it), a request in the
/// listener's SYN queue (a SYN that went to the listener below the threshold), TIME-WAIT.
#[inline(always)]
fn has_socket(ctx: &XdpContext, f: &[u8; FRAME], v6: bool, l4: usize) -> bool {
    // SAFETY: a plain C union of integers; zero is a valid value.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let ports = |i: usize| u16::from_ne_bytes([at(f, l4 + i), at(f, l4 + i + 1)]);
    let addr = |i: usize| u32::from_ne_bytes([at(f, i), at(f, i + 1), at(f, i + 2), at(f, i + 3)]);
    let size = if v6 {
        // SAFETY: writing union fields.
        let t = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
        t.saddr = [addr(22), addr(26), addr(30), addr(34)];
        t.daddr = [addr(38), addr(42), addr(46), addr(50)];
        t.sport = ports(0);
        t.dport = ports(2);
        36
    } else {
        // SAFETY: as above.
        let t = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
        t.saddr = addr(26);
        t.daddr = addr(30);
        t.sport = ports(0);
        t.dport = ports(2);
        12
    };
    // SAFETY: the tuple is on the stack, of the size given; the reference is released below.
    unsafe {
        let sk = bpf_skc_lookup_tcp(ctx.as_ptr(), &mut tuple, size, CURRENT_NETNS, 0);
        if sk.is_null() {
            return false;
        }
        let state = (*sk).state;
        bpf_sk_release(sk.cast());
        state != TCP_LISTEN
    }
}

/// An IPv6 source as the block list keys it: masked to the source prefix (`source_key_addr`).
#[inline(always)]
fn masked(src: &Addr, v6_prefix: u32) -> Addr {
    let prefix = if v6_prefix == 0 || v6_prefix > 128 { 128 } else { v6_prefix };
    let hi = u64::from_be_bytes(crate::half(src, 0)) & crate::mask64(prefix);
    let lo = u64::from_be_bytes(crate::half(src, 8)) & crate::mask64(prefix.saturating_sub(64));
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&hi.to_be_bytes());
    out[8..].copy_from_slice(&lo.to_be_bytes());
    out
}

enum Lists {
    Proxy,
    /// Allow-listed: never limited, so never proxied either; the listener answers.
    Allowed,
    /// Denied or blocked: the main program drops it (and counts it there).
    Denied,
}

/// What the allow, block and deny lists say of the SYN's source, as the main program reads
/// them (`judge`), so a source they drop never gets a SYN-ACK.
#[inline(always)]
fn lists(f: &[u8; FRAME], v6: bool, config: &Config) -> Lists {
    let mut src: Addr = ipv4_mapped([at(f, 26), at(f, 27), at(f, 28), at(f, 29)]);
    if v6 {
        let mut i = 0;
        while i < 16 {
            src[i] = f[ETH_HLEN + 8 + i];
            i += 1;
        }
    }
    let set = config.active_set & 1;
    let key = Key::new(LIST_KEY_SET_BITS + 128, ListKey { set_be: set.to_be(), addr: src });
    if config.flags & CONFIG_FLAG_NO_ALLOW == 0 && crate::ALLOW.get(&key).is_some() {
        return Lists::Allowed;
    }
    if config.flags & CONFIG_FLAG_NO_DENY == 0 && crate::DENY.get(&key).is_some() {
        return Lists::Denied;
    }
    if config.flags & CONFIG_FLAG_NO_BLOCK == 0 {
        let source = if v6 { masked(&src, config.ipv6_source_prefix) } else { src };
        if let Some(block) = crate::BLOCK.get_ptr(source) {
            let now = unsafe { bpf_ktime_get_boot_ns() };
            // SAFETY: pointer from a successful map lookup.
            if unsafe { (*block).expires_at_ns } > now {
                return Lists::Denied;
            }
        }
    }
    Lists::Proxy
}

/// Whether the port's meter admits this SYN (threshold mode: the rate is below the threshold).
#[inline(always)]
fn below_threshold(port: u16, cfg: &SynproxyPort) -> bool {
    let Some(meter) = SYNPROXY_METERS.get_ptr_mut(u32::from(port)) else { return false };
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // SAFETY: pointer from a successful map lookup.
    matches!(unsafe { charge(meter, now, cfg.cost_ns, cfg.burst_ns) }, Charge::Admitted)
}

/// Reads the SYN's window scale, SACK permitted and timestamp options into `s`.
#[inline(always)]
fn read_options(s: &mut Scratch, l4: usize, tcp_len: usize) {
    s.opt_off = (l4 + 20) as u32;
    s.opt_end = (l4 + tcp_len) as u32;
    s.wscale = TS_OPT_WSCALE_NONE;
    s.sack = 0;
    s.ts = 0;
    s.tsval = 0;
    // SAFETY: the callback finds its state in SYNPROXY_SCRATCH; 40 option bytes at most.
    unsafe { bpf_loop(40, option_step as *mut c_void, core::ptr::null_mut(), 0) };
}

/// `bpf_loop` callback: reads one option; returns 1 at the end of the options.
#[inline(never)]
extern "C" fn option_step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = SYNPROXY_SCRATCH.get_ptr_mut(0) else { return 1 };
    // SAFETY: per-CPU slot, only this program on this CPU uses it.
    let s = unsafe { &mut *s };
    let off = s.opt_off as usize;
    let end = s.opt_end as usize;
    if off >= end || end > FRAME {
        return 1;
    }
    let kind = at(&s.frame, off);
    if kind == 0 {
        return 1;
    }
    if kind == 1 {
        s.opt_off += 1;
        return 0;
    }
    let size = usize::from(at(&s.frame, off + 1));
    if size < 2 || off + size > end {
        return 1;
    }
    match (kind, size) {
        (3, 3) => {
            let w = at(&s.frame, off + 2);
            s.wscale = if w < TCP_MAX_WSCALE { w } else { TCP_MAX_WSCALE };
        }
        (4, 2) => s.sack = 1,
        (8, 10) => {
            s.ts = 1;
            s.tsval = be32(&s.frame, off + 2);
        }
        _ => {}
    }
    s.opt_off += size as u32;
    0
}

/// Builds the SYN-ACK answering the SYN in `s.frame` into `s.out`; returns its length.
#[inline(always)]
fn build_synack(s: &mut Scratch, cfg: &SynproxyPort, v6: bool, l4: usize, cookie: u32, syn_flags: u8) -> usize {
    let f = &s.frame;
    let o = &mut s.out;
    *o = [0; FRAME];
    // Ethernet: back where it came from.
    let mut i = 0;
    while i < 6 {
        o[i] = f[6 + i];
        o[6 + i] = f[i];
        i += 1;
    }
    o[12] = f[12];
    o[13] = f[13];

    // Options: MSS; with timestamps, SACK permitted (or two NOPs) and the timestamp whose value
    // carries the client's options; window scale only if the client sent one. Without
    // timestamps the cookie can carry none of these (the kernel's own cookies behave alike).
    let ecn = syn_flags & (TCP_ECE | TCP_CWR) == (TCP_ECE | TCP_CWR);
    let mut t = l4 + 20;
    put32(o, t, (2 << 24) | (4 << 16) | u32::from(if v6 { cfg.mss6 } else { cfg.mss4 }));
    t += 4;
    let ts = s.ts != 0;
    if ts {
        let now_ms = (unsafe { bpf_ktime_get_ns() } / 1_000_000) as u32;
        let mut tsval = (now_ms & !((1 << TS_OPT_BITS) - 1)) | u32::from(s.wscale & 0xf);
        if s.sack != 0 {
            tsval |= TS_OPT_SACK;
        }
        if ecn {
            tsval |= TS_OPT_ECN;
        }
        let head = if s.sack != 0 { (4 << 24) | (2 << 16) } else { (1 << 24) | (1 << 16) };
        put32(o, t, head | (8 << 8) | 10);
        put32(o, t + 4, tsval);
        put32(o, t + 8, s.tsval);
        t += 12;
        if s.wscale != TS_OPT_WSCALE_NONE {
            put32(o, t, (1 << 24) | (3 << 16) | (3 << 8) | u32::from(cfg.wscale));
            t += 4;
        }
    }
    let tcp_len = t - l4;

    // TCP header.
    put16(o, l4, be16(f, l4 + 2));
    put16(o, l4 + 2, be16(f, l4));
    put32(o, l4 + 4, cookie);
    put32(o, l4 + 8, be32(f, l4 + 4).wrapping_add(1));
    o[(l4 + 12) & MASK] = ((tcp_len / 4) << 4) as u8;
    o[(l4 + 13) & MASK] = TCP_SYN | TCP_ACK | if ts && ecn { TCP_ECE } else { 0 };
    // Window 0 as netfilter's SYNPROXY answers: the real one comes with the server's reply.

    // IP header, addresses swapped.
    if v6 {
        o[ETH_HLEN] = 0x60;
        put16(o, ETH_HLEN + 4, tcp_len as u32);
        o[ETH_HLEN + 6] = 6;
        o[ETH_HLEN + 7] = cfg.ttl;
        let mut i = 0;
        while i < 16 {
            o[ETH_HLEN + 8 + i] = f[ETH_HLEN + 24 + i];
            o[ETH_HLEN + 24 + i] = f[ETH_HLEN + 8 + i];
            i += 1;
        }
    } else {
        o[ETH_HLEN] = 0x45;
        put16(o, ETH_HLEN + 2, (20 + tcp_len) as u32);
        // Don't fragment, as Linux sends its own SYN-ACKs.
        put16(o, ETH_HLEN + 6, 0x4000);
        o[ETH_HLEN + 8] = cfg.ttl;
        o[ETH_HLEN + 9] = 6;
        let mut i = 0;
        while i < 4 {
            o[ETH_HLEN + 12 + i] = f[ETH_HLEN + 16 + i];
            o[ETH_HLEN + 16 + i] = f[ETH_HLEN + 12 + i];
            i += 1;
        }
        let ip_sum = fold(sum_words(o, ETH_HLEN, 10, 20));
        put16(o, ETH_HLEN + 10, !ip_sum & 0xffff);
    }
    // The unused tail of `out` is zero, so summing the longest header is summing this one.
    let tcp_sum = fold(sum_words(o, l4, 20, 40) + pseudo_sum(o, v6, tcp_len));
    put16(o, l4 + 16, !tcp_sum & 0xffff);
    l4 + tcp_len
}
