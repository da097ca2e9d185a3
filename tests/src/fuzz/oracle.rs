//! The independent reading of a frame: what a correct data path must see, from the
//! `etherparse` crate.
//!
//! etherparse decodes every header here (Ethernet, VLAN, IPv4, IPv6 and each extension
//! header, TCP, UDP). Where its notion of a frame differs by design from what the XDP program
//! must do, the mapping is written out below, each with its reason, rather than letting the
//! two parsers silently agree.

use etherparse::{
    EtherType, IpNumber, Ipv6ExtensionSlice, Ipv6ExtensionsSlice, Ipv6RawExtHeaderSlice, LaxLinkExtSlice, LaxNetSlice,
    LaxSlicedPacket, LinkSlice, TcpHeaderSlice, UdpHeaderSlice,
    err::{Layer, ipv6_exts::HeaderError, ipv6_exts::HeaderSliceError},
};
use limiter_common::{Addr, MAX_IPV6_EXT_HEADERS, ipv4_mapped};

/// Fragment kind, as `limiter_common::PARSE_FRAG_*` numbers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Frag {
    None = 0,
    First = 1,
    Later = 2,
}

/// How far the transport header got, as `limiter_common::PARSE_L4_*` numbers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4 {
    Complete = 0,
    Truncated = 1,
    /// A later fragment: no transport header.
    None = 2,
    /// The IPv6 extension-header chain is cut short, invalid, or longer than the bound.
    Chain = 3,
}

/// What the data path must see in an IP packet whose source it could read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ip {
    pub version: u8,
    /// IPv4-mapped for IPv4, network order.
    pub src: Addr,
    pub dst: Addr,
    /// The transport protocol, or the next header where the IPv6 walk stopped.
    pub protocol: u8,
    pub fragment: Frag,
    /// Identification of a fragment (IPv4 16 bits, IPv6 32 bits); 0 when not fragmented.
    pub frag_id: u32,
    /// Protocol of the datagram as reassembly keys it: IPv4's protocol field, the IPv6
    /// fragment header's next header.
    pub frag_protocol: u8,
    pub l4: L4,
    pub dst_port: Option<u16>,
    /// TCP with SYN and without ACK.
    pub tcp_syn: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reading {
    NotIp,
    /// No source address: the frame is not judged.
    Unparsed,
    Ip(Ip),
}

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_AUTH: u8 = 51;
/// Mobility, HIP, Shim6: extension headers (RFC 7045 / IANA) in the generic layout.
const EXT_GENERIC_UNKNOWN_TO_ETHERPARSE: [u8; 3] = [135, 139, 140];

/// Reads `frame` as the data path must.
pub fn read(frame: &[u8]) -> Reading {
    let Ok(p) = LaxSlicedPacket::from_ethernet(frame) else { return Reading::Unparsed };
    let mut ether_type = match &p.link {
        Some(LinkSlice::Ethernet2(e)) => e.ether_type(),
        _ => return Reading::Unparsed,
    };
    let mut tags = 0;
    for ext in &p.link_exts {
        match ext {
            LaxLinkExtSlice::Vlan(v) => {
                tags += 1;
                ether_type = v.ether_type();
            }
            // Mapping: etherparse looks inside MACsec (0x88e5) frames that are not encrypted;
            // the program, like the stack on the lower device, sees an ethertype that is not
            // IP (the macsec device, not this one, delivers what is inside): not IP.
            LaxLinkExtSlice::Macsec(_) => return Reading::NotIp,
        }
    }
    // Mapping: etherparse follows up to three tags; the program follows two (802.1Q, QinQ)
    // and calls a third unparsed, as the README's table says.
    if tags >= 3 {
        return Reading::Unparsed;
    }
    if let Some((_, layer)) = &p.stop_err {
        match layer {
            Layer::VlanHeader => return Reading::Unparsed,
            Layer::MacsecHeader => return Reading::NotIp,
            Layer::IpHeader | Layer::Ipv4Header | Layer::Ipv6Header => return Reading::Unparsed,
            _ => {}
        }
    }
    if ether_type != EtherType(ETH_P_IPV4) && ether_type != EtherType(ETH_P_IPV6) {
        // ARP (etherparse decodes it) and every other ethertype: not IP.
        return Reading::NotIp;
    }
    let l3 = match &p.link {
        Some(LinkSlice::Ethernet2(e)) => e.header_len() + 4 * tags,
        _ => return Reading::Unparsed,
    };
    match &p.net {
        Some(LaxNetSlice::Ipv4(ip)) => {
            // Mapping: etherparse picks the IP version from the header's version field; the
            // stack (ip_rcv, ipv6_rcv) and the program go by the ethertype and refuse a
            // version that does not match it.
            if ether_type != EtherType(ETH_P_IPV4) {
                return Reading::Unparsed;
            }
            ipv4(frame, l3, ip.header())
        }
        Some(LaxNetSlice::Ipv6(ip)) => {
            if ether_type != EtherType(ETH_P_IPV6) {
                return Reading::Unparsed;
            }
            ipv6(frame, l3, ip)
        }
        // The ethertype says IP but etherparse found no IP header: unparsed.
        _ => Reading::Unparsed,
    }
}

fn ipv4(frame: &[u8], l3: usize, h: etherparse::Ipv4HeaderSlice<'_>) -> Reading {
    let header_len = h.slice().len();
    let total = usize::from(h.total_len());
    // The datagram ends at its total length, or at the frame's end if that comes first.
    // Mapping: with a total length below the header length etherparse falls back to the
    // frame's length; the stack discards such a packet (ip_rcv_core) and nothing after the
    // header belongs to it, so the transport header is absent.
    let end = if total < header_len { l3 + header_len } else { (l3 + total).min(frame.len()) };
    let offset = h.fragments_offset().value();
    let fragment = if offset != 0 {
        Frag::Later
    } else if h.more_fragments() {
        Frag::First
    } else {
        Frag::None
    };
    // Mapping: etherparse walks an AH (51) in IPv4 to the protocol behind it; the stack hands
    // IPv4 AH to IPsec, which drops it without a security association, and the program (like
    // xdp-filter and Cilium) treats 51 as a transport protocol without ports.
    let protocol = h.protocol().0;
    let mut ip = Ip {
        version: 4,
        src: ipv4_mapped(h.source()),
        dst: ipv4_mapped(h.destination()),
        protocol,
        fragment,
        frag_id: if fragment == Frag::None { 0 } else { u32::from(h.identification()) },
        frag_protocol: protocol,
        l4: L4::None,
        dst_port: None,
        tcp_syn: false,
    };
    if fragment != Frag::Later {
        transport(&frame[(l3 + header_len).min(end)..end], &mut ip);
    }
    Reading::Ip(ip)
}

fn ipv6(frame: &[u8], l3: usize, ip6: &etherparse::LaxIpv6Slice<'_>) -> Reading {
    let h = ip6.header();
    let src = h.source();
    // Mapping: etherparse accepts any source; an IPv4-mapped one (::ffff:0:0/96) is invalid
    // on the wire (RFC 4291 2.5.5.2), the stack drops it (ip6_rcv_core), and the program must
    // not judge it as the IPv4 address it encodes: unparsed.
    if src[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] {
        return Reading::Unparsed;
    }
    // etherparse bounds the payload by the payload length (the frame's end when 0, a
    // jumbogram, or when the frame is shorter); everything after the fixed header up to that
    // bound is extension headers and transport.
    let payload = ip6.payload().payload;
    let end = payload.as_ptr() as usize + payload.len() - frame.as_ptr() as usize;
    let mut rest = &frame[l3 + 40..end.max(l3 + 40)];
    let mut next = h.next_header();
    let mut ip = Ip {
        version: 6,
        src,
        dst: h.destination(),
        protocol: 0,
        fragment: Frag::None,
        frag_id: 0,
        frag_protocol: 0,
        l4: L4::Chain,
        dst_port: None,
        tcp_syn: false,
    };
    let mut walked = 0u32;
    // etherparse's own walk, resumed where it stops by design (see the two mappings inside).
    loop {
        let (exts, after, r, err) = Ipv6ExtensionsSlice::from_slice_lax(next, rest);
        // etherparse's iterator trusts the slice to end at a transport header: where the walk
        // stopped on an error it would read on past the slice, so it is stepped only while
        // walked headers remain.
        let total = exts.slice().len();
        let mut consumed = 0;
        let mut iter = exts.into_iter();
        while consumed < total {
            let Some(ext) = iter.next() else { break };
            consumed += match &ext {
                Ipv6ExtensionSlice::HopByHop(s)
                | Ipv6ExtensionSlice::Routing(s)
                | Ipv6ExtensionSlice::DestinationOptions(s) => s.slice().len(),
                Ipv6ExtensionSlice::Fragment(f) => f.slice().len(),
                Ipv6ExtensionSlice::Authentication(a) => a.slice().len(),
            };
            walked += 1;
            if walked > MAX_IPV6_EXT_HEADERS {
                // Mapping: etherparse has no bound; the program walks MAX_IPV6_EXT_HEADERS
                // (Linux has none either, the README justifies the bound) and judges a longer
                // chain as a chain it cannot follow.
                ip.l4 = L4::Chain;
                return Reading::Ip(ip);
            }
            if let Ipv6ExtensionSlice::Fragment(f) = ext {
                let later = f.fragment_offset().value() != 0;
                // RFC 6946: an atomic fragment (offset 0, no more) is a whole packet.
                if (later || f.more_fragments()) && ip.fragment == Frag::None {
                    ip.frag_id = f.identification();
                    ip.frag_protocol = f.next_header().0;
                }
                if later {
                    // Mapping: etherparse walks on into the later fragment's data as if it
                    // were headers; what follows a later fragment's header is data.
                    ip.fragment = Frag::Later;
                    ip.protocol = f.next_header().0;
                    ip.l4 = L4::None;
                    return Reading::Ip(ip);
                }
                if f.more_fragments() {
                    ip.fragment = Frag::First;
                }
            }
        }
        next = after;
        rest = r;
        let resume = match &err {
            // Mapping: etherparse refuses a hop-by-hop header anywhere but first (RFC 8200
            // 4.1). The stack drops such a packet later; the program, like the kernel's own
            // ipv6_skip_exthdr that netfilter uses, walks it as an options header. Judging it
            // by its port is never less safe, so the walk goes on through it.
            Some((HeaderSliceError::Content(HeaderError::HopByHopNotAtStart), _)) => true,
            // Mapping: etherparse refuses an AH whose length field is 0 (8 bytes, shorter than
            // its 12 fixed bytes). The kernel's ipv6_skip_exthdr (netfilter) walks it as the
            // length says, and so does the program; the stack drops AH without a security
            // association anyway. The walk goes on past its 8 bytes.
            Some((HeaderSliceError::Content(HeaderError::IpAuth(_)), _)) => true,
            // The same AH of length 0 where fewer than its 12 fixed bytes are left: etherparse
            // reports the short slice before it looks at the length field, but the header is
            // 8 bytes and they are all there (the parser's F2 check sees them; found by the
            // fuzzer once cut headers were caught).
            Some((HeaderSliceError::Len(_), _)) if next.0 == NEXTHDR_AUTH && rest.len() >= 8 && rest[1] == 0 => true,
            // A header cut short or invalid (AH shorter than its fixed part): the chain
            // cannot be followed.
            Some(_) => {
                ip.l4 = L4::Chain;
                return Reading::Ip(ip);
            }
            // Mapping: etherparse does not list Mobility, HIP and Shim6 as extension headers
            // (it stops there); RFC 7045 and IANA do, and the program walks them.
            None => EXT_GENERIC_UNKNOWN_TO_ETHERPARSE.contains(&next.0),
        };
        if !resume {
            break;
        }
        debug_assert!(
            next.0 == NEXTHDR_HOP || next.0 == NEXTHDR_AUTH || EXT_GENERIC_UNKNOWN_TO_ETHERPARSE.contains(&next.0)
        );
        // All have the generic layout, which etherparse's raw extension header decodes (an AH
        // with length 0 too: 8 * (0 + 1) = 4 * (0 + 2) bytes).
        let Ok(raw) = Ipv6RawExtHeaderSlice::from_slice(rest) else {
            ip.l4 = L4::Chain;
            return Reading::Ip(ip);
        };
        walked += 1;
        if walked > MAX_IPV6_EXT_HEADERS {
            ip.l4 = L4::Chain;
            return Reading::Ip(ip);
        }
        next = raw.next_header();
        rest = &rest[raw.slice().len()..];
    }
    ip.protocol = next.0;
    transport(rest, &mut ip);
    Reading::Ip(ip)
}

/// The transport header at the start of `data` (which ends where the datagram ends).
fn transport(data: &[u8], ip: &mut Ip) {
    ip.l4 = L4::Truncated;
    match IpNumber(ip.protocol) {
        IpNumber::TCP => {
            // Mapping: etherparse decodes a TCP header only with all of its options and a
            // valid data offset; the program needs the fixed 20 bytes (ports, flags) and the
            // stack drops a segment whose options are cut short or whose offset is below 5.
            // etherparse decodes the fixed part here, with the data offset set to 5.
            if data.len() < 20 {
                return;
            }
            let mut fixed = [0u8; 20];
            fixed.copy_from_slice(&data[..20]);
            fixed[12] = (5 << 4) | (fixed[12] & 0x0f);
            let Ok(tcp) = TcpHeaderSlice::from_slice(&fixed) else { return };
            ip.dst_port = Some(tcp.destination_port());
            ip.tcp_syn = tcp.syn() && !tcp.ack();
        }
        IpNumber::UDP => {
            let Ok(udp) = UdpHeaderSlice::from_slice(data) else { return };
            ip.dst_port = Some(udp.destination_port());
        }
        // Mapping: etherparse (like the stack's icmp_rcv and icmpv6_rcv) wants the 8-byte
        // ICMP header; the program reads type, code and checksum (4 bytes) and judges ICMP by
        // the lists and any-port rules either way, so the verdict is the same. The oracle uses
        // the program's documented 4 bytes.
        IpNumber::ICMP | IpNumber::IPV6_ICMP if data.len() < 4 => return,
        // GRE, ESP, SCTP, IGMP (etherparse decodes it), no next header...: no ports.
        _ => {}
    }
    ip.l4 = L4::Complete;
}

/// A short description, for disagreement reports.
pub fn describe(r: &Reading) -> String {
    match r {
        Reading::NotIp => "not IP".into(),
        Reading::Unparsed => "unparsed (no source)".into(),
        Reading::Ip(ip) => format!(
            "IPv{} src {} proto {} frag {:?} l4 {:?} port {:?}{}",
            ip.version,
            crate::fuzz::addr_string(&ip.src),
            ip.protocol,
            ip.fragment,
            ip.l4,
            ip.dst_port,
            if ip.tcp_syn { " SYN" } else { "" }
        ),
    }
}
