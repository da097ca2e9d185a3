//! Hand-built frames for verdict and traffic tests.
//!
//! A [`Packet`] is a by-value builder; [`Packet::build`] writes correct lengths and checksums
//! (IPv4 header, TCP/UDP/ICMPv6 with the pseudo header, ICMP) unless a test asks for a broken
//! field on purpose:
//!
//! ```
//! use limiter_tests::packet::Packet;
//! let frame = Packet::eth()
//!     .vlan(10)
//!     .ipv4([10, 9, 0, 2], [10, 9, 0, 1])
//!     .ip_options(&[0x94, 0x04, 0, 0]) // router alert
//!     .tcp(40000, 443)
//!     .syn()
//!     .payload(b"hello")
//!     .build();
//! assert_eq!(frame.len(), 14 + 4 + 24 + 20 + 5);
//! ```
//!
//! [`parse`] reads frames back (for receive-side predicates and the builder's own tests); it is
//! deliberately independent of the XDP program's parser.

// One file per layer of the builder (ethernet and VLAN tags, ipv4, ipv6 with its extension
// headers, l4), plus the checksum, reading frames back (reader) and random malformed frames.
// `Packet::build_with_offsets` stays here: lengths and checksums depend on every layer.
mod checksum;
mod ethernet;
mod fragment;
mod ipv4;
mod ipv6;
mod l4;
mod malformed;
mod reader;

use std::net::IpAddr;

pub use checksum::checksum;
use checksum::{fold, sum_words};
use ipv4::V4;
pub use ipv6::Ipv6Ext;
use ipv6::V6;
use l4::L4;
pub use malformed::{garbage, garbage_frames};
pub use reader::{Parsed, is_udp_to, parse};

/// Ethertypes the builder writes.
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
/// The pre-standard QinQ outer TPID some switches still use (Linux `ETH_P_QINQ1`).
pub const ETH_P_QINQ1: u16 = 0x9100;
/// IEEE local experimental ethertype: what a frame without an IP layer carries by default.
pub const ETH_P_EXPERIMENTAL: u16 = 0x88b5;

/// IPv6 next-header values of the extension headers.
pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_AUTH: u8 = 51;
pub const NEXTHDR_NONE: u8 = 59;
pub const NEXTHDR_DEST: u8 = 60;
pub const NEXTHDR_MOBILITY: u8 = 135;
pub const NEXTHDR_HIP: u8 = 139;
pub const NEXTHDR_SHIM6: u8 = 140;

/// IP protocol numbers of the upper layers the builder writes.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
/// RFC 3692 experimental protocol: what an IPv4 packet without an L4 layer carries by default.
pub const IPPROTO_EXPERIMENTAL: u8 = 253;

/// TCP flag bits, for [`Packet::tcp_flags`].
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
}

/// Default source MAC (locally administered).
pub const DEFAULT_SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Default destination MAC (locally administered).
pub const DEFAULT_DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
#[derive(Clone, Debug)]
enum L3 {
    None,
    V4(V4),
    V6(V6),
}
/// Builder for one Ethernet frame. Methods that configure a layer panic if that layer is not
/// there (e.g. [`Packet::df`] before [`Packet::ipv4`]): a test that builds the wrong frame
/// should fail loudly.
#[derive(Clone, Debug)]
pub struct Packet {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    tags: Vec<(u16, u16)>,
    ethertype: Option<u16>,
    l3: L3,
    protocol: Option<u8>,
    ip_len: Option<u16>,
    l4: L4,
    payload: Vec<u8>,
    truncate: Option<usize>,
    bad_ip_checksum: bool,
    bad_l4_checksum: bool,
}

/// A built frame and where its layers start, for truncating at a layer boundary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Built {
    pub bytes: Vec<u8>,
    /// Offset of the IP header (after Ethernet and VLAN tags).
    pub l3: usize,
    /// Offset of the L4 header (after IPv4 options / IPv6 extension headers).
    pub l4: usize,
    /// Offset of the L4 payload.
    pub payload: usize,
}

impl Default for Packet {
    fn default() -> Self {
        Self::eth()
    }
}

impl Packet {
    /// An Ethernet frame from [`DEFAULT_SRC_MAC`] to [`DEFAULT_DST_MAC`] with nothing inside.
    pub fn eth() -> Packet {
        Packet {
            src_mac: DEFAULT_SRC_MAC,
            dst_mac: DEFAULT_DST_MAC,
            tags: Vec::new(),
            ethertype: None,
            l3: L3::None,
            protocol: None,
            ip_len: None,
            l4: L4::None,
            payload: Vec::new(),
            truncate: None,
            bad_ip_checksum: false,
            bad_l4_checksum: false,
        }
    }
    /// IPv4 or IPv6 by the address family; panics if the families differ.
    pub fn ip(self, src: IpAddr, dst: IpAddr) -> Self {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => self.ipv4(s, d),
            (IpAddr::V6(s), IpAddr::V6(d)) => self.ipv6(s, d),
            _ => panic!("ip({src}, {dst}): mixed address families"),
        }
    }
    /// IPv4 TTL or IPv6 hop limit.
    pub fn ttl(mut self, ttl: u8) -> Self {
        match &mut self.l3 {
            L3::V4(v4) => v4.ttl = ttl,
            L3::V6(v6) => v6.hop_limit = ttl,
            L3::None => panic!("ttl() needs ipv4() or ipv6() first"),
        }
        self
    }
    /// Overrides the upper-layer protocol (IPv4 protocol / last IPv6 next header); default:
    /// from the L4 layer, else [`IPPROTO_EXPERIMENTAL`] (IPv4) or [`NEXTHDR_NONE`] (IPv6).
    pub fn protocol(mut self, protocol: u8) -> Self {
        self.protocol = Some(protocol);
        self
    }

    /// Overrides the IPv4 total length / IPv6 payload length field.
    pub fn ip_len(mut self, len: u16) -> Self {
        self.ip_len = Some(len);
        self
    }
    /// Sets the payload after the L4 header (or after the IP header if there is no L4).
    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// Cuts the built frame to at most `n` bytes; lengths and checksums still describe the
    /// whole packet, as a truncated capture would.
    pub fn truncate_to(mut self, n: usize) -> Self {
        self.truncate = Some(n);
        self
    }

    /// Writes a wrong IPv4 header checksum.
    pub fn bad_ip_checksum(mut self) -> Self {
        self.bad_ip_checksum = true;
        self
    }

    /// Writes a wrong L4 checksum.
    pub fn bad_l4_checksum(mut self) -> Self {
        self.bad_l4_checksum = true;
        self
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        self.build_with_offsets().bytes
    }

    /// The frame's bytes and its layer offsets (offsets refer to the untruncated frame).
    pub fn build_with_offsets(&self) -> Built {
        let upper = self.protocol.unwrap_or(match (&self.l4, &self.l3) {
            (L4::Tcp { .. }, _) => IPPROTO_TCP,
            (L4::Udp { .. }, _) => IPPROTO_UDP,
            (L4::Icmp { .. }, _) => IPPROTO_ICMP,
            (L4::Icmpv6 { .. }, _) => IPPROTO_ICMPV6,
            (L4::None, L3::V6(_)) => NEXTHDR_NONE,
            (L4::None, _) => IPPROTO_EXPERIMENTAL,
        });

        let mut l4 = self.l4_header();
        let l4_header_len = l4.len();
        l4.extend_from_slice(&self.payload);
        let l4_len = l4.len();

        let mut out = Vec::with_capacity(64 + l4_len);
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        for (tpid, tci) in &self.tags {
            out.extend_from_slice(&tpid.to_be_bytes());
            out.extend_from_slice(&tci.to_be_bytes());
        }
        let ethertype = self.ethertype.unwrap_or(match self.l3 {
            L3::V4(_) => ETH_P_IPV4,
            L3::V6(_) => ETH_P_IPV6,
            L3::None => ETH_P_EXPERIMENTAL,
        });
        out.extend_from_slice(&ethertype.to_be_bytes());
        let l3_off = out.len();

        // Pseudo-header sum for the L4 checksum (None: no pseudo header, i.e. ICMPv4 or no IP).
        let pseudo: Option<u32> = match &self.l3 {
            L3::None => None,
            L3::V4(v4) => {
                let mut opts = v4.options.clone();
                opts.resize(opts.len().div_ceil(4) * 4, 0);
                let hlen = 20 + opts.len();
                assert!(
                    hlen <= 60 || v4.ihl.is_some(),
                    "IPv4 options of {} bytes do not fit (max 40); set ihl() to build it anyway",
                    v4.options.len()
                );
                let ihl = v4.ihl.unwrap_or((hlen / 4) as u8);
                let total = self.ip_len.unwrap_or((hlen + l4_len) as u16);
                let flags_frag = (u16::from(v4.df) << 14) | (u16::from(v4.mf) << 13) | v4.frag_offset;
                let start = out.len();
                out.push(0x40 | (ihl & 0x0f));
                out.push(v4.tos);
                out.extend_from_slice(&total.to_be_bytes());
                out.extend_from_slice(&v4.id.to_be_bytes());
                out.extend_from_slice(&flags_frag.to_be_bytes());
                out.extend_from_slice(&[v4.ttl, upper, 0, 0]);
                out.extend_from_slice(&v4.src.octets());
                out.extend_from_slice(&v4.dst.octets());
                out.extend_from_slice(&opts);
                let mut csum = checksum(&[&out[start..]]);
                if self.bad_ip_checksum {
                    csum ^= 0x5a5a;
                }
                out[start + 10..start + 12].copy_from_slice(&csum.to_be_bytes());
                let mut pseudo = sum_words(&v4.src.octets(), 0);
                pseudo = sum_words(&v4.dst.octets(), pseudo);
                Some(pseudo + u32::from(upper) + l4_len as u32)
            }
            L3::V6(v6) => {
                let mut ext = Vec::new();
                for (i, e) in v6.ext.iter().enumerate() {
                    let next = v6.ext.get(i + 1).map_or(upper, Ipv6Ext::code);
                    e.write(next, &mut ext);
                }
                let first = v6.ext.first().map_or(upper, Ipv6Ext::code);
                let plen = self.ip_len.unwrap_or((ext.len() + l4_len) as u16);
                let vtf = (6u32 << 28) | (u32::from(v6.traffic_class) << 20) | v6.flow_label;
                out.extend_from_slice(&vtf.to_be_bytes());
                out.extend_from_slice(&plen.to_be_bytes());
                out.extend_from_slice(&[first, v6.hop_limit]);
                out.extend_from_slice(&v6.src.octets());
                out.extend_from_slice(&v6.dst.octets());
                out.extend_from_slice(&ext);
                // RFC 8200 8.1: with a routing header the pseudo header should name the final
                // destination; this builder uses the IPv6 destination field.
                let mut pseudo = sum_words(&v6.src.octets(), 0);
                pseudo = sum_words(&v6.dst.octets(), pseudo);
                Some(pseudo + l4_len as u32 + u32::from(upper))
            }
        };
        let l4_off = out.len();

        let csum_at = match self.l4 {
            L4::None => None,
            L4::Tcp { .. } => Some(16),
            L4::Udp { .. } => Some(6),
            L4::Icmp { .. } | L4::Icmpv6 { .. } => Some(2),
        };
        if let Some(at) = csum_at {
            let initial = match self.l4 {
                L4::Icmp { .. } => 0,
                _ => pseudo.unwrap_or(0),
            };
            let mut csum = fold(sum_words(&l4, initial));
            if matches!(self.l4, L4::Udp { .. }) && csum == 0 {
                csum = 0xffff; // 0 means "no checksum" in UDP
            }
            if self.bad_l4_checksum {
                csum ^= 0x5a5a;
            }
            l4[at..at + 2].copy_from_slice(&csum.to_be_bytes());
        }
        out.extend_from_slice(&l4);
        let payload_off = l4_off + l4_header_len;
        if let Some(n) = self.truncate {
            out.truncate(n);
        }
        Built { bytes: out, l3: l3_off, l4: l4_off, payload: payload_off }
    }
}
