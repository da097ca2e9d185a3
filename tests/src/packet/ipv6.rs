//! The IPv6 header of a [`Packet`] and its extension headers.

use std::net::Ipv6Addr;

use super::{L3, NEXTHDR_AUTH, NEXTHDR_DEST, NEXTHDR_FRAGMENT, NEXTHDR_HOP, NEXTHDR_ROUTING, Packet};

/// An IPv6 extension header. Lengths (`len`) are the on-wire `Hdr Ext Len`: the header is
/// `8 * (len + 1)` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ipv6Ext {
    /// Hop-by-hop options (0), filled with skippable options.
    HopByHop { len: u8 },
    /// Routing header (43) with the given type and segments left; the type-specific data is
    /// zeros. Use type 253 (experimental) with `segments_left: 0` for a header the kernel skips.
    Routing { len: u8, routing_type: u8, segments_left: u8 },
    /// Destination options (60), filled with skippable options.
    DestOpts { len: u8 },
    /// Fragment header (44): `offset` in 8-byte units (13 bits), M flag, identification.
    Fragment { offset: u16, more: bool, id: u32 },
    /// Authentication header (51, RFC 4302). Unlike the others its length counts 4-byte
    /// units minus 2: the header is `4 * (len + 2)` bytes (24 for `len: 4`, i.e. a 96-bit
    /// ICV). IPv6 wants a multiple of 8, so `len` should be even. SPI and sequence number are
    /// fixed, the ICV is zeros (nothing here verifies it).
    Auth { len: u8 },
    /// Any header in the generic `next, len, data` layout, with next-header value `code`.
    Generic { code: u8, len: u8 },
}

impl Ipv6Ext {
    /// The next-header value that announces this header.
    pub fn code(&self) -> u8 {
        match self {
            Ipv6Ext::HopByHop { .. } => NEXTHDR_HOP,
            Ipv6Ext::Routing { .. } => NEXTHDR_ROUTING,
            Ipv6Ext::DestOpts { .. } => NEXTHDR_DEST,
            Ipv6Ext::Fragment { .. } => NEXTHDR_FRAGMENT,
            Ipv6Ext::Auth { .. } => NEXTHDR_AUTH,
            Ipv6Ext::Generic { code, .. } => *code,
        }
    }

    pub(super) fn write(&self, next: u8, out: &mut Vec<u8>) {
        match *self {
            Ipv6Ext::HopByHop { len } | Ipv6Ext::DestOpts { len } => {
                out.extend_from_slice(&[next, len]);
                fill_options(out, 8 * (usize::from(len) + 1) - 2);
            }
            Ipv6Ext::Routing { len, routing_type, segments_left } => {
                out.extend_from_slice(&[next, len, routing_type, segments_left]);
                out.resize(out.len() + 8 * (usize::from(len) + 1) - 4, 0);
            }
            Ipv6Ext::Fragment { offset, more, id } => {
                assert!(offset < 1 << 13, "IPv6 fragment offset {offset} does not fit 13 bits");
                out.extend_from_slice(&[next, 0]);
                out.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                out.extend_from_slice(&id.to_be_bytes());
            }
            Ipv6Ext::Auth { len } => {
                assert!(len >= 1, "an AH of len {len} is shorter than its 12 fixed bytes");
                out.extend_from_slice(&[next, len, 0, 0]);
                out.extend_from_slice(&0x0000_1000u32.to_be_bytes()); // SPI
                out.extend_from_slice(&1u32.to_be_bytes()); // sequence number
                out.resize(out.len() + 4 * (usize::from(len) + 2) - 12, 0);
            }
            Ipv6Ext::Generic { len, .. } => {
                out.extend_from_slice(&[next, len]);
                out.resize(out.len() + 8 * (usize::from(len) + 1) - 2, 0);
            }
        }
    }
}

/// Fills `n` bytes of an options header. Linux rejects runs of padding longer than 7 bytes
/// (`ip6_parse_tlv`), so long fillers use the RFC 4727 experimental option 0x1e, whose
/// top bits say "skip if unknown".
fn fill_options(out: &mut Vec<u8>, mut n: usize) {
    while n > 0 {
        match n {
            1 => {
                out.push(0); // Pad1
                n = 0;
            }
            2..=7 => {
                out.extend_from_slice(&[1, (n - 2) as u8]); // PadN
                out.resize(out.len() + n - 2, 0);
                n = 0;
            }
            _ => {
                let take = n.min(257);
                // A remainder of 1..=7 is padded next; padding after a real option is fine.
                out.extend_from_slice(&[0x1e, (take - 2) as u8]);
                out.resize(out.len() + take - 2, 0);
                n -= take;
            }
        }
    }
}

#[derive(Clone, Debug)]
pub(super) struct V6 {
    pub(super) src: Ipv6Addr,
    pub(super) dst: Ipv6Addr,
    pub(super) traffic_class: u8,
    pub(super) flow_label: u32,
    pub(super) hop_limit: u8,
    pub(super) ext: Vec<Ipv6Ext>,
}

impl Packet {
    /// An IPv6 header (hop limit 64) without extension headers.
    pub fn ipv6(mut self, src: impl Into<Ipv6Addr>, dst: impl Into<Ipv6Addr>) -> Self {
        self.l3 = L3::V6(V6 {
            src: src.into(),
            dst: dst.into(),
            traffic_class: 0,
            flow_label: 0,
            hop_limit: 64,
            ext: Vec::new(),
        });
        self
    }
    fn v6(&mut self, what: &str) -> &mut V6 {
        match &mut self.l3 {
            L3::V6(v6) => v6,
            _ => panic!("{what} needs ipv6() first"),
        }
    }
    pub fn traffic_class(mut self, tc: u8) -> Self {
        self.v6("traffic_class()").traffic_class = tc;
        self
    }

    pub fn flow_label(mut self, label: u32) -> Self {
        self.v6("flow_label()").flow_label = label & 0xf_ffff;
        self
    }
    /// Appends an IPv6 extension header; headers chain in call order.
    pub fn ext(mut self, ext: Ipv6Ext) -> Self {
        self.v6("ext()").ext.push(ext);
        self
    }

    /// Appends a hop-by-hop options header of `8 * (len + 1)` bytes.
    pub fn hop_by_hop(self, len: u8) -> Self {
        self.ext(Ipv6Ext::HopByHop { len })
    }

    /// Appends a destination options header of `8 * (len + 1)` bytes.
    pub fn dest_opts(self, len: u8) -> Self {
        self.ext(Ipv6Ext::DestOpts { len })
    }

    /// Appends a routing header (experimental type 253) of `8 * (len + 1)` bytes.
    pub fn routing(self, len: u8, segments_left: u8) -> Self {
        self.ext(Ipv6Ext::Routing { len, routing_type: 253, segments_left })
    }

    /// Appends an IPv6 fragment header: `offset` in 8-byte units, M flag, identification.
    pub fn fragment6(self, offset: u16, more: bool, id: u32) -> Self {
        self.ext(Ipv6Ext::Fragment { offset, more, id })
    }

    /// Appends an authentication header of `4 * (len + 2)` bytes (see [`Ipv6Ext::Auth`]).
    pub fn ah(self, len: u8) -> Self {
        self.ext(Ipv6Ext::Auth { len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{IPPROTO_UDP, parse};

    #[test]
    fn authentication_headers_count_four_byte_units() {
        let b = Packet::eth().ipv6(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST).ah(4).udp(1, 9).build_with_offsets();
        assert_eq!(b.l4 - b.l3, 40 + 24);
        assert_eq!(b.bytes[b.l3 + 6], NEXTHDR_AUTH);
        assert_eq!(b.bytes[b.l3 + 40], IPPROTO_UDP);
        let p = parse(&b.bytes).unwrap();
        assert_eq!(p.ext_chain, vec![NEXTHDR_AUTH]);
        assert_eq!((p.l4, p.dport), (Some(b.l4), Some(9)));
    }

    #[test]
    fn fill_options_never_pads_more_than_7() {
        for n in [6usize, 14, 22, 254, 2046] {
            let mut v = Vec::new();
            fill_options(&mut v, n);
            assert_eq!(v.len(), n);
        }
    }
}
