//! The SYN proxy's TC-ingress half: it marks the segments of connections the kernel already
//! has a socket for, so the nftables SYNPROXY rules let through the ones conntrack never saw.
//!
//! Why: conntrack starts tracking when the proxy's netfilter table is first installed (its
//! `ct` expressions load it), and with `nf_conntrack_tcp_loose = 0`, which SYNPROXY needs so
//! that a cookie ACK is invalid rather than picked up, the next segment of a connection that
//! was open before is invalid too, and the table's rules would treat it as a bad cookie and
//! drop it. netfilter cannot tell such a segment from a cookie ACK for a listener bound to a
//! specific address (nft's `socket wildcard 0` matches both), but a socket lookup can: this
//! program runs before netfilter, asks the kernel for the segment's socket the way the XDP
//! proxy does (`has_socket` there) and, for any socket but a listener, sets
//! [`SYNPROXY_ESTABLISHED_MARK`] in `skb->mark`; the table accepts marked segments before its
//! SYNPROXY rule.
//!
//! It never drops or changes anything else: every path ends in `TC_ACT_OK`. With no port
//! proxied (`CONFIG_FLAG_SYNPROXY` clear) it stops after one array lookup.

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_OK, bpf_sock_tuple},
    helpers::{bpf_sk_release, bpf_skc_lookup_tcp},
    macros::classifier,
    programs::TcContext,
};
use limiter_common::synproxy::{CONFIG_FLAG_SYNPROXY, SYNPROXY_ESTABLISHED_MARK, port_key};

use crate::{
    CONFIG,
    synproxy::{CURRENT_NETNS, ETH_HLEN, SYNPROXY_PORTS, TCP_LISTEN, TCP_SYN},
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

#[classifier]
pub fn synproxy_established(ctx: TcContext) -> i32 {
    if established(&ctx) {
        // SAFETY: reading a field of this program's own context.
        let mark = unsafe { (*ctx.skb.skb).mark };
        ctx.set_mark(mark | SYNPROXY_ESTABLISHED_MARK);
    }
    TC_ACT_OK
}

/// Whether the frame is a TCP segment other than a SYN, for a proxied port of the active
/// set, whose 4-tuple has a socket other than a listener.
#[inline(always)]
fn established(ctx: &TcContext) -> bool {
    let Some(config) = CONFIG.get(0) else { return false };
    if config.flags & CONFIG_FLAG_SYNPROXY == 0 {
        return false;
    }
    // SAFETY: a plain C union of integers; zero is a valid value.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let Ok(ethertype) = ctx.load::<[u8; 2]>(12) else { return false };
    let (l4, size) = match u16::from_be_bytes(ethertype) {
        ETH_P_IP => {
            let Ok(ip) = ctx.load::<[u8; 20]>(ETH_HLEN) else { return false };
            // TCP, and not a fragment past the first (which carries no ports).
            if ip[0] >> 4 != 4 || ip[9] != 6 || u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
                return false;
            }
            // SAFETY: writing union fields.
            let t = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
            t.saddr = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
            t.daddr = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
            (ETH_HLEN + usize::from(ip[0] & 0x0f) * 4, 12)
        }
        ETH_P_IPV6 => {
            let Ok(ip) = ctx.load::<[u8; 40]>(ETH_HLEN) else { return false };
            // TCP right after the fixed header (the XDP proxy hands segments behind extension
            // headers to the rules too, see `UNHANDLED_SHAPE`).
            if ip[0] >> 4 != 6 || ip[6] != 6 {
                return false;
            }
            let word = |i: usize| u32::from_ne_bytes([ip[i], ip[i + 1], ip[i + 2], ip[i + 3]]);
            // SAFETY: writing union fields.
            let t = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
            t.saddr = [word(8), word(12), word(16), word(20)];
            t.daddr = [word(24), word(28), word(32), word(36)];
            (ETH_HLEN + 40, 36)
        }
        _ => return false,
    };
    // Ports and flags: bytes 0..4 and 13 of the TCP header.
    let Ok(tcp) = ctx.load::<[u8; 14]>(l4) else { return false };
    if tcp[13] & TCP_SYN != 0 {
        return false;
    }
    let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    if SYNPROXY_PORTS.get_ptr(port_key(dport, (config.active_set & 1) as u8)).is_none() {
        return false;
    }
    if size == 12 {
        // SAFETY: as above.
        let t = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
        t.sport = u16::from_ne_bytes([tcp[0], tcp[1]]);
        t.dport = u16::from_ne_bytes([tcp[2], tcp[3]]);
    } else {
        // SAFETY: as above.
        let t = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
        t.sport = u16::from_ne_bytes([tcp[0], tcp[1]]);
        t.dport = u16::from_ne_bytes([tcp[2], tcp[3]]);
    }
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
