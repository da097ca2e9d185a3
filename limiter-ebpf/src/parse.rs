//! Header parsing, bounded and verifier-friendly.
//!
//! Every read goes through [`ptr_at`], which proves to the verifier that the bytes lie inside
//! the frame. Anything the parser cannot follow is [`Unparsed`]: the caller applies the
//! configured verdict for it (pass by default), so a gap in the parser never blackholes
//! traffic and never reads out of bounds.

use aya_ebpf::programs::XdpContext;
use limiter_common::{Addr, MAX_IPV6_EXT_HEADERS, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, ipv4_mapped};

/// The parser gave up: truncated header, bad version or length, too many IPv6 extension
/// headers.
pub struct Unparsed;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_HLEN: usize = 4;
const IPV6_HLEN: usize = 40;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// What the rules need to know about an IP packet.
pub struct Packet {
    /// Source address (IPv4-mapped for IPv4), not yet masked.
    pub src: Addr,
    pub is_ipv6: bool,
    /// IP protocol of the transport header (or of the last header reached).
    pub protocol: u8,
    /// Destination port, host order; 0 when the packet has no ports.
    pub dst_port: u16,
    /// The transport header was parsed and carries ports (TCP/UDP, not a later fragment).
    pub has_ports: bool,
    /// TCP segment with SYN set and ACK clear: a new connection attempt.
    pub tcp_syn: bool,
    /// A fragment other than the first: it carries no transport header.
    pub non_first_fragment: bool,
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

/// Parses the frame. `Ok(None)` for frames that are not IP (ARP, LLDP...), which are never
/// limited.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Option<Packet>, Unparsed> {
    let mut offset = ETH_HLEN;
    let mut ether_type = be16_at(ctx, 12)?;
    // Up to two VLAN tags: 802.1Q, or QinQ (802.1ad outer + 802.1Q inner). Unrolled.
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        ether_type = be16_at(ctx, offset + 2)?;
        offset += VLAN_HLEN;
        if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
            ether_type = be16_at(ctx, offset + 2)?;
            offset += VLAN_HLEN;
        }
    }
    match ether_type {
        ETH_P_IP => parse_ipv4(ctx, offset).map(Some),
        ETH_P_IPV6 => parse_ipv6(ctx, offset).map(Some),
        // A third VLAN tag is not something we follow: judge it unparsed, not "not IP".
        ETH_P_8021Q | ETH_P_8021AD => Err(Unparsed),
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
    let frag = u16::from_be_bytes([header[6], header[7]]);
    let protocol = header[9];
    let src = ipv4_mapped([header[12], header[13], header[14], header[15]]);
    let non_first_fragment = frag & 0x1fff != 0;
    let mut packet =
        Packet { src, is_ipv6: false, protocol, dst_port: 0, has_ports: false, tcp_syn: false, non_first_fragment };
    if !non_first_fragment {
        parse_l4(ctx, l3 + header_len, &mut packet)?;
    }
    Ok(packet)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, l3: usize) -> Result<Packet, Unparsed> {
    let header = bytes_at::<{ IPV6_HLEN }>(ctx, l3)?;
    if header[0] >> 4 != 6 {
        return Err(Unparsed);
    }
    let mut next = header[6];
    let mut src = [0u8; 16];
    src.copy_from_slice(&header[8..24]);
    // An IPv4-mapped source (::ffff:a.b.c.d) would match IPv4 list entries and buckets, which
    // share that encoding. Such packets are invalid on the wire (RFC 4291 2.5.5.2; the stack
    // discards them in ip6_rcv_core), so they are unparsed rather than mistaken for IPv4.
    if src[..10] == [0u8; 10] && src[10] == 0xff && src[11] == 0xff {
        return Err(Unparsed);
    }
    let mut offset = l3 + IPV6_HLEN;
    let mut non_first_fragment = false;
    let mut reached_transport = false;
    // A bounded walk over the extension headers; each one is at most 2 KiB, so `offset`
    // stays far below the verifier's 64 KiB packet range.
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let ext = bytes_at::<2>(ctx, offset)?;
                next = ext[0];
                offset += (ext[1] as usize + 1) * 8;
            }
            IPPROTO_AH => {
                let ext = bytes_at::<2>(ctx, offset)?;
                next = ext[0];
                offset += (ext[1] as usize + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let frag = bytes_at::<8>(ctx, offset)?;
                next = frag[0];
                offset += 8;
                if u16::from_be_bytes([frag[2], frag[3]]) >> 3 != 0 {
                    non_first_fragment = true;
                    reached_transport = true;
                    break;
                }
            }
            _ => {
                reached_transport = true;
                break;
            }
        }
    }
    if !reached_transport {
        return Err(Unparsed);
    }
    let mut packet = Packet {
        src,
        is_ipv6: true,
        protocol: next,
        dst_port: 0,
        has_ports: false,
        tcp_syn: false,
        non_first_fragment,
    };
    if !non_first_fragment {
        parse_l4(ctx, offset, &mut packet)?;
    }
    Ok(packet)
}

#[inline(always)]
fn parse_l4(ctx: &XdpContext, l4: usize, packet: &mut Packet) -> Result<(), Unparsed> {
    // Each header is copied out through one fixed-size check, and fields are taken from the
    // copy: separate checks per field would be merged by LLVM into the first one, leaving
    // reads the verifier cannot prove in bounds.
    match packet.protocol {
        PROTO_TCP => {
            // The fixed 20-byte header must be there; options are not needed.
            let tcp = bytes_at::<20>(ctx, l4)?;
            packet.dst_port = u16::from_be_bytes([tcp[2], tcp[3]]);
            packet.tcp_syn = tcp[13] & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
            packet.has_ports = true;
        }
        PROTO_UDP => {
            let udp = bytes_at::<8>(ctx, l4)?;
            packet.dst_port = u16::from_be_bytes([udp[2], udp[3]]);
            packet.has_ports = true;
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            // Type, code, checksum.
            ptr_at::<[u8; 4]>(ctx, l4)?;
        }
        // Other transports (GRE, SCTP, ESP...) have no ports we know: any-port rules apply.
        _ => {}
    }
    Ok(())
}
