//! Header parsing, bounded and verifier-friendly.
//!
//! Every read goes through [`ptr_at`], which proves to the verifier that the bytes lie inside
//! the frame. The parser stops being able to say "unparsed" once it has the source address:
//! from then on it reports how far it got ([`Packet::l4`], [`Packet::fragment`]) and the
//! caller judges the frame by everything that does not need the missing part (the lists, the
//! any-port rules), because an attacker picks whatever shape the parser cannot follow.

use aya_ebpf::programs::XdpContext;
use limiter_common::{
    Addr, MAX_IPV6_EXT_HEADERS, PARSE_FRAG_FIRST, PARSE_FRAG_LATER, PARSE_FRAG_NONE, PARSE_L4_CHAIN, PARSE_L4_COMPLETE,
    PARSE_L4_NONE, PARSE_L4_TRUNCATED, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, ipv4_mapped,
};

/// A header the source address depends on is cut short or invalid.
pub struct Unparsed;

/// What the parser made of a frame.
pub enum Parsed {
    /// Not IPv4 or IPv6 (ARP, LLDP...): never limited.
    NotIp,
    /// No source address could be read: truncated Ethernet, VLAN or fixed IP header, bad
    /// version or IHL, IPv4 options cut short, a third VLAN tag, an IPv4-mapped IPv6 source.
    Unparsed,
    Ip(Packet),
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// The pre-standard QinQ outer tag that some switches still emit (Linux `ETH_P_QINQ1`).
const ETH_P_QINQ1: u16 = 0x9100;
const VLAN_HLEN: usize = 4;
const IPV6_HLEN: usize = 40;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
/// Mobility (RFC 6275), HIP (RFC 7401), Shim6 (RFC 5533): extension headers in IANA's list
/// (RFC 7045), all in the generic `(length + 1) * 8` format.
const IPPROTO_MH: u8 = 135;
const IPPROTO_HIP: u8 = 139;
const IPPROTO_SHIM6: u8 = 140;

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

const IPV4_MF: u16 = 0x2000;
const IPV4_OFFSET: u16 = 0x1fff;

/// What the rules need to know about an IP packet.
pub struct Packet {
    /// Source address (IPv4-mapped for IPv4), not yet masked.
    pub src: Addr,
    /// Destination address, the same encoding; keys the fragment table.
    pub dst: Addr,
    pub is_ipv6: bool,
    /// IP protocol of the transport header, or of the last header reached (see
    /// `limiter_common::ParseRecord::protocol`).
    pub protocol: u8,
    /// Destination port, host order; 0 when the packet has no ports.
    pub dst_port: u16,
    /// The transport header was read and carries ports (TCP/UDP, not a later fragment).
    pub has_ports: bool,
    /// TCP segment with SYN set and ACK clear: a new connection attempt.
    pub tcp_syn: bool,
    /// `PARSE_FRAG_*`.
    pub fragment: u8,
    /// IP identification of a fragment (IPv4: 16 bits, IPv6: 32 bits), host order.
    pub frag_id: u32,
    /// The protocol that keys the fragment table (`limiter_common::FragmentKey::protocol`):
    /// IPv4's protocol field, or the IPv6 fragment header's next header. Not `protocol`,
    /// which for an IPv6 first fragment is the transport past any headers that follow the
    /// fragment header, while its later fragments only carry the fragment header's value.
    pub frag_protocol: u8,
    /// How far the transport header got: `PARSE_L4_*`.
    pub l4: u8,
}

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, Unparsed> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(Unparsed);
    }
    Ok((start + offset) as *const T)
}

#[inline(always)]
fn be16_at(ctx: &XdpContext, offset: usize) -> Result<u16, Unparsed> {
    // SAFETY: ptr_at checked both bytes lie inside the frame; read_unaligned because frames
    // carry no alignment guarantee past the Ethernet header.
    Ok(u16::from_be(unsafe { ptr_at::<u16>(ctx, offset)?.read_unaligned() }))
}

#[inline(always)]
fn bytes_at<const N: usize>(ctx: &XdpContext, offset: usize) -> Result<[u8; N], Unparsed> {
    // SAFETY: as above.
    Ok(unsafe { ptr_at::<[u8; N]>(ctx, offset)?.read_unaligned() })
}

/// `N` bytes at `offset` if they lie inside both the frame and the IP datagram, which ends
/// at `ip_end`. Bytes past the IP length (Ethernet padding, or trailing bytes an attacker
/// appends) are not part of the packet the stack delivers, so they never count as headers.
#[inline(always)]
fn ip_bytes_at<const N: usize>(ctx: &XdpContext, offset: usize, ip_end: usize) -> Option<[u8; N]> {
    if offset + N > ip_end {
        return None;
    }
    bytes_at::<N>(ctx, offset).ok()
}

/// An IPv6 extension header the walk follows (every one in IANA's list but ESP, whose
/// payload is encrypted: it ends the walk like a transport).
#[inline(always)]
fn is_extension(next: u8) -> bool {
    matches!(
        next,
        IPPROTO_HOPOPTS
            | IPPROTO_ROUTING
            | IPPROTO_FRAGMENT
            | IPPROTO_AH
            | IPPROTO_DSTOPTS
            | IPPROTO_MH
            | IPPROTO_HIP
            | IPPROTO_SHIM6
    )
}

#[inline(always)]
fn is_vlan(ether_type: u16) -> bool {
    ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD || ether_type == ETH_P_QINQ1
}

/// Parses the frame.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    match parse_frame(ctx) {
        Ok(Some(packet)) => Parsed::Ip(packet),
        Ok(None) => Parsed::NotIp,
        Err(Unparsed) => Parsed::Unparsed,
    }
}

#[inline(always)]
fn parse_frame(ctx: &XdpContext) -> Result<Option<Packet>, Unparsed> {
    let mut offset = ETH_HLEN;
    let mut ether_type = be16_at(ctx, 12)?;
    // Up to two VLAN tags: 802.1Q, or QinQ (an 802.1ad or 0x9100 outer tag + inner). Unrolled.
    if is_vlan(ether_type) {
        ether_type = be16_at(ctx, offset + 2)?;
        offset += VLAN_HLEN;
        if is_vlan(ether_type) {
            ether_type = be16_at(ctx, offset + 2)?;
            offset += VLAN_HLEN;
        }
    }
    match ether_type {
        ETH_P_IP => parse_ipv4(ctx, offset).map(Some),
        ETH_P_IPV6 => parse_ipv6(ctx, offset).map(Some),
        // A third VLAN tag is not something we follow: judge it unparsed, not "not IP".
        t if is_vlan(t) => Err(Unparsed),
        _ => Ok(None),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, l3: usize) -> Result<Packet, Unparsed> {
    // Read the fixed 20 bytes through one fixed-size check first. Checking the variable
    // header length first would let LLVM drop these fixed checks as implied, and the verifier
    // cannot follow that implication (it tracks ranges per pointer, not arithmetic).
    let header = bytes_at::<20>(ctx, l3)?;
    let version_ihl = header[0];
    let header_len = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || header_len < 20 {
        return Err(Unparsed);
    }
    // The options must be present too: a frame cut inside them is unparsed.
    ptr_at::<u8>(ctx, l3 + header_len - 1)?;
    let total_len = u16::from_be_bytes([header[2], header[3]]) as usize;
    let frag = u16::from_be_bytes([header[6], header[7]]);
    let fragment = if frag & IPV4_OFFSET != 0 {
        PARSE_FRAG_LATER
    } else if frag & IPV4_MF != 0 {
        PARSE_FRAG_FIRST
    } else {
        PARSE_FRAG_NONE
    };
    let mut packet = Packet {
        src: ipv4_mapped([header[12], header[13], header[14], header[15]]),
        dst: ipv4_mapped([header[16], header[17], header[18], header[19]]),
        is_ipv6: false,
        protocol: header[9],
        dst_port: 0,
        has_ports: false,
        tcp_syn: false,
        fragment,
        frag_id: u16::from_be_bytes([header[4], header[5]]) as u32,
        frag_protocol: header[9],
        l4: PARSE_L4_NONE,
    };
    if fragment != PARSE_FRAG_LATER {
        // A total length below the header length leaves no room for a transport header.
        parse_l4(ctx, l3 + header_len, l3 + total_len, &mut packet);
    }
    Ok(packet)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, l3: usize) -> Result<Packet, Unparsed> {
    let header = bytes_at::<{ IPV6_HLEN }>(ctx, l3)?;
    if header[0] >> 4 != 6 {
        return Err(Unparsed);
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&header[8..24]);
    // An IPv4-mapped source (::ffff:a.b.c.d) would match IPv4 list entries and buckets, which
    // share that encoding. Such packets are invalid on the wire (RFC 4291 2.5.5.2; the stack
    // discards them in ip6_rcv_core), so they are unparsed rather than mistaken for IPv4.
    if src[..10] == [0u8; 10] && src[10] == 0xff && src[11] == 0xff {
        return Err(Unparsed);
    }
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&header[24..40]);
    // Payload length 0 is a jumbogram (RFC 2675) or nothing at all; either way the frame's
    // end is the only bound there is.
    let payload_len = u16::from_be_bytes([header[4], header[5]]) as usize;
    let ip_end = if payload_len == 0 { usize::MAX } else { l3 + IPV6_HLEN + payload_len };
    let mut next = header[6];
    let mut offset = l3 + IPV6_HLEN;
    let mut fragment = PARSE_FRAG_NONE;
    let mut frag_id = 0u32;
    let mut frag_protocol = 0u8;
    // Where the walk ended: the transport header (`PARSE_L4_COMPLETE` until parse_l4 says
    // otherwise), a later fragment, or a chain cut short or past the bound.
    let mut ended = PARSE_L4_CHAIN;
    // A bounded walk: MAX_IPV6_EXT_HEADERS headers, and one more step to see the transport.
    // Each header is at most 2 KiB, so `offset` stays below the verifier's 64 KiB packet
    // range after all of them.
    for i in 0..MAX_IPV6_EXT_HEADERS + 1 {
        // The extra step only looks at what follows header number MAX_IPV6_EXT_HEADERS: a
        // transport ends the walk; an extension header, a fragment header too, is past the
        // bound (a later fragment there must not be looked up, nor a first one recorded).
        if i == MAX_IPV6_EXT_HEADERS && is_extension(next) {
            break;
        }
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_MH | IPPROTO_HIP | IPPROTO_SHIM6
            | IPPROTO_AH => {
                let Some(ext) = ip_bytes_at::<2>(ctx, offset, ip_end) else { break };
                let size = if next == IPPROTO_AH { (ext[1] as usize + 2) * 4 } else { (ext[1] as usize + 1) * 8 };
                // The whole header must be there, not just its first two bytes: the stack
                // drops a chain cut inside a header, and following the cut header's next
                // header would judge whatever it names (or a port read from its bytes).
                if ip_bytes_at::<1>(ctx, offset + size - 1, ip_end).is_none() {
                    break;
                }
                next = ext[0];
                offset += size;
            }
            IPPROTO_FRAGMENT => {
                let Some(frag) = ip_bytes_at::<8>(ctx, offset, ip_end) else { break };
                next = frag[0];
                offset += 8;
                let offset_flags = u16::from_be_bytes([frag[2], frag[3]]);
                if fragment == PARSE_FRAG_NONE {
                    frag_id = u32::from_be_bytes([frag[4], frag[5], frag[6], frag[7]]);
                    frag_protocol = frag[0];
                }
                if offset_flags >> 3 != 0 {
                    fragment = PARSE_FRAG_LATER;
                    ended = PARSE_L4_NONE;
                    break;
                }
                // Offset 0 without "more fragments" is an atomic fragment (RFC 6946): a
                // whole packet.
                if offset_flags & 1 != 0 {
                    fragment = PARSE_FRAG_FIRST;
                }
            }
            _ => {
                ended = PARSE_L4_COMPLETE;
                break;
            }
        }
    }
    let mut packet = Packet {
        src,
        dst,
        is_ipv6: true,
        protocol: next,
        dst_port: 0,
        has_ports: false,
        tcp_syn: false,
        fragment,
        frag_id,
        frag_protocol,
        l4: ended,
    };
    if ended == PARSE_L4_COMPLETE {
        parse_l4(ctx, offset, ip_end, &mut packet);
    }
    Ok(packet)
}

/// Reads the transport header at `l4` (the datagram ends at `ip_end`); sets `packet.l4`.
#[inline(always)]
fn parse_l4(ctx: &XdpContext, l4: usize, ip_end: usize, packet: &mut Packet) {
    // Each header is copied out through one fixed-size check, and fields are taken from the
    // copy: separate checks per field would be merged by LLVM into the first one, leaving
    // reads the verifier cannot prove in bounds.
    packet.l4 = PARSE_L4_TRUNCATED;
    match packet.protocol {
        PROTO_TCP => {
            // The fixed 20-byte header must be there (ports and flags); options are not needed.
            let Some(tcp) = ip_bytes_at::<20>(ctx, l4, ip_end) else { return };
            packet.dst_port = u16::from_be_bytes([tcp[2], tcp[3]]);
            packet.tcp_syn = tcp[13] & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
            packet.has_ports = true;
        }
        PROTO_UDP => {
            let Some(udp) = ip_bytes_at::<8>(ctx, l4, ip_end) else { return };
            packet.dst_port = u16::from_be_bytes([udp[2], udp[3]]);
            packet.has_ports = true;
        }
        // Type, code, checksum.
        PROTO_ICMP | PROTO_ICMPV6 if ip_bytes_at::<4>(ctx, l4, ip_end).is_none() => return,
        // Other transports (GRE, SCTP, ESP...) have no ports we know: any-port rules apply.
        _ => {}
    }
    packet.l4 = PARSE_L4_COMPLETE;
}
