//! Reading frames back: [`parse`] and the receive-side predicate [`is_udp_to`].

use std::net::IpAddr;

use super::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
    NEXTHDR_AUTH, NEXTHDR_DEST, NEXTHDR_FRAGMENT, NEXTHDR_HOP, NEXTHDR_ROUTING,
};

/// What [`parse`] found in a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed<'a> {
    /// VLAN tags outermost first, as (TPID, TCI).
    pub tags: Vec<(u16, u16)>,
    /// The innermost ethertype.
    pub ethertype: u16,
    pub l3: usize,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    /// IPv6 extension header codes in chain order (empty for IPv4).
    pub ext_chain: Vec<u8>,
    /// Upper-layer protocol after the IPv6 chain / IPv4 protocol field.
    pub protocol: Option<u8>,
    /// Fragment offset (8-byte units) and more-fragments flag, if the packet is a fragment.
    pub fragment: Option<(u16, bool)>,
    /// Offset of the L4 header.
    pub l4: Option<usize>,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    /// L4 payload (TCP/UDP/ICMP data; the rest of the frame for other protocols and
    /// non-first fragments).
    pub payload: &'a [u8],
}

/// Parses Ethernet, any number of 802.1Q/802.1ad tags, IPv4/IPv6 (walking the extension
/// headers above) and TCP/UDP/ICMP/ICMPv6. `None` if the frame is too short for its headers.
pub fn parse(frame: &[u8]) -> Option<Parsed<'_>> {
    let be16 = |at: usize| -> Option<u16> { Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?])) };
    let mut off = 12;
    let mut tags = Vec::new();
    let mut ethertype = be16(off)?;
    while ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        tags.push((ethertype, be16(off + 2)?));
        off += 4;
        ethertype = be16(off)?;
    }
    let l3 = off + 2;
    let mut p = Parsed {
        tags,
        ethertype,
        l3,
        src: None,
        dst: None,
        ext_chain: Vec::new(),
        protocol: None,
        fragment: None,
        l4: None,
        sport: None,
        dport: None,
        payload: frame.get(l3..)?,
    };
    let (proto, mut l4) = match ethertype {
        ETH_P_IPV4 => {
            let h = frame.get(l3..l3 + 20)?;
            let ihl = usize::from(h[0] & 0x0f) * 4;
            let ff = u16::from_be_bytes([h[6], h[7]]);
            p.src = Some(IpAddr::from(<[u8; 4]>::try_from(&h[12..16]).ok()?));
            p.dst = Some(IpAddr::from(<[u8; 4]>::try_from(&h[16..20]).ok()?));
            let (offset, more) = (ff & 0x1fff, ff & 0x2000 != 0);
            if offset != 0 || more {
                p.fragment = Some((offset, more));
            }
            (h[9], l3 + ihl)
        }
        ETH_P_IPV6 => {
            let h = frame.get(l3..l3 + 40)?;
            p.src = Some(IpAddr::from(<[u8; 16]>::try_from(&h[8..24]).ok()?));
            p.dst = Some(IpAddr::from(<[u8; 16]>::try_from(&h[24..40]).ok()?));
            let mut next = h[6];
            let mut at = l3 + 40;
            while matches!(next, NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_FRAGMENT | NEXTHDR_AUTH) {
                p.ext_chain.push(next);
                let e = frame.get(at..at + 8)?;
                if next == NEXTHDR_FRAGMENT {
                    let fo = u16::from_be_bytes([e[2], e[3]]);
                    p.fragment = Some((fo >> 3, fo & 1 != 0));
                    at += 8;
                } else if next == NEXTHDR_AUTH {
                    at += 4 * (usize::from(e[1]) + 2);
                } else {
                    at += 8 * (usize::from(e[1]) + 1);
                }
                next = e[0];
            }
            (next, at)
        }
        _ => return Some(p),
    };
    p.protocol = Some(proto);
    if p.fragment.is_some_and(|(off, _)| off != 0) {
        p.payload = frame.get(l4..)?;
        return Some(p);
    }
    p.l4 = Some(l4);
    match proto {
        IPPROTO_TCP => {
            p.sport = be16(l4);
            p.dport = be16(l4 + 2);
            l4 += usize::from(frame.get(l4 + 12)? >> 4) * 4;
        }
        IPPROTO_UDP => {
            p.sport = be16(l4);
            p.dport = be16(l4 + 2);
            l4 += 8;
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => l4 += 8,
        _ => {}
    }
    p.payload = frame.get(l4..)?;
    Some(p)
}

/// Whether `frame` is UDP to `dport` whose payload contains `marker`: the usual predicate for
/// counting a test's own frames on a receiver.
pub fn is_udp_to(frame: &[u8], dport: u16, marker: &[u8]) -> bool {
    parse(frame).is_some_and(|p| {
        p.protocol == Some(IPPROTO_UDP)
            && p.dport == Some(dport)
            && (marker.is_empty() || p.payload.windows(marker.len()).any(|w| w == marker))
    })
}
