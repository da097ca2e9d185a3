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

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Ethertypes the builder writes.
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
/// IEEE local experimental ethertype: what a frame without an IP layer carries by default.
pub const ETH_P_EXPERIMENTAL: u16 = 0x88b5;

/// IPv6 next-header values of the extension headers.
pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_AUTH: u8 = 51;
pub const NEXTHDR_NONE: u8 = 59;
pub const NEXTHDR_DEST: u8 = 60;

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

    fn write(&self, next: u8, out: &mut Vec<u8>) {
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
struct V4 {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    tos: u8,
    id: u16,
    df: bool,
    mf: bool,
    frag_offset: u16,
    ttl: u8,
    options: Vec<u8>,
    ihl: Option<u8>,
}

#[derive(Clone, Debug)]
struct V6 {
    src: Ipv6Addr,
    dst: Ipv6Addr,
    traffic_class: u8,
    flow_label: u32,
    hop_limit: u8,
    ext: Vec<Ipv6Ext>,
}

#[derive(Clone, Debug)]
enum L3 {
    None,
    V4(V4),
    V6(V6),
}

#[derive(Clone, Debug)]
enum L4 {
    None,
    Tcp { sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, window: u16, options: Vec<u8> },
    Udp { sport: u16, dport: u16 },
    Icmp { typ: u8, code: u8, rest: [u8; 4] },
    Icmpv6 { typ: u8, code: u8, rest: [u8; 4] },
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

    /// Sets both MAC addresses.
    pub fn macs(self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.src_mac(src).dst_mac(dst)
    }

    pub fn src_mac(mut self, mac: [u8; 6]) -> Self {
        self.src_mac = mac;
        self
    }

    pub fn dst_mac(mut self, mac: [u8; 6]) -> Self {
        self.dst_mac = mac;
        self
    }

    /// Appends an 802.1Q tag (TPID 0x8100) with VLAN id `vid` (priority 0). Tags are written
    /// outermost first, in call order.
    pub fn vlan(self, vid: u16) -> Self {
        self.tag(ETH_P_8021Q, vid)
    }

    /// Appends QinQ: an outer 802.1ad tag (0x88a8) and an inner 802.1Q tag (0x8100).
    pub fn qinq(self, outer_vid: u16, inner_vid: u16) -> Self {
        self.tag(ETH_P_8021AD, outer_vid).tag(ETH_P_8021Q, inner_vid)
    }

    /// Appends a tag with any TPID and TCI (for odd stacks, e.g. three tags or 0x9100).
    pub fn tag(mut self, tpid: u16, tci: u16) -> Self {
        self.tags.push((tpid, tci));
        self
    }

    /// Overrides the innermost ethertype (default: from the IP layer, else
    /// [`ETH_P_EXPERIMENTAL`]).
    pub fn ethertype(mut self, ethertype: u16) -> Self {
        self.ethertype = Some(ethertype);
        self
    }

    /// An IPv4 header (TTL 64, ID 1, no flags).
    pub fn ipv4(mut self, src: impl Into<Ipv4Addr>, dst: impl Into<Ipv4Addr>) -> Self {
        self.l3 = L3::V4(V4 {
            src: src.into(),
            dst: dst.into(),
            tos: 0,
            id: 1,
            df: false,
            mf: false,
            frag_offset: 0,
            ttl: 64,
            options: Vec::new(),
            ihl: None,
        });
        self
    }

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

    /// IPv4 or IPv6 by the address family; panics if the families differ.
    pub fn ip(self, src: IpAddr, dst: IpAddr) -> Self {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => self.ipv4(s, d),
            (IpAddr::V6(s), IpAddr::V6(d)) => self.ipv6(s, d),
            _ => panic!("ip({src}, {dst}): mixed address families"),
        }
    }

    fn v4(&mut self, what: &str) -> &mut V4 {
        match &mut self.l3 {
            L3::V4(v4) => v4,
            _ => panic!("{what} needs ipv4() first"),
        }
    }

    fn v6(&mut self, what: &str) -> &mut V6 {
        match &mut self.l3 {
            L3::V6(v6) => v6,
            _ => panic!("{what} needs ipv6() first"),
        }
    }

    /// IPv4 options, zero-padded (EOL) to a multiple of 4 bytes; at most 40 bytes unless
    /// [`Packet::ihl`] overrides the header length.
    pub fn ip_options(mut self, options: &[u8]) -> Self {
        self.v4("ip_options()").options = options.to_vec();
        self
    }

    /// Overrides the IPv4 IHL field (header length in 32-bit words) without changing the bytes.
    pub fn ihl(mut self, ihl: u8) -> Self {
        self.v4("ihl()").ihl = Some(ihl);
        self
    }

    pub fn ip_id(mut self, id: u16) -> Self {
        self.v4("ip_id()").id = id;
        self
    }

    pub fn tos(mut self, tos: u8) -> Self {
        self.v4("tos()").tos = tos;
        self
    }

    /// Sets the IPv4 don't-fragment flag.
    pub fn df(mut self) -> Self {
        self.v4("df()").df = true;
        self
    }

    /// Sets the IPv4 more-fragments flag.
    pub fn mf(mut self) -> Self {
        self.v4("mf()").mf = true;
        self
    }

    /// IPv4 fragment offset in 8-byte units, as on the wire (13 bits).
    pub fn frag_offset(mut self, units: u16) -> Self {
        assert!(units < 1 << 13, "IPv4 fragment offset {units} does not fit 13 bits");
        self.v4("frag_offset()").frag_offset = units;
        self
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

    pub fn traffic_class(mut self, tc: u8) -> Self {
        self.v6("traffic_class()").traffic_class = tc;
        self
    }

    pub fn flow_label(mut self, label: u32) -> Self {
        self.v6("flow_label()").flow_label = label & 0xf_ffff;
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

    /// A TCP header (seq 1, window 64240, no flags yet: add [`Packet::syn`] etc.).
    pub fn tcp(mut self, sport: u16, dport: u16) -> Self {
        self.l4 = L4::Tcp { sport, dport, seq: 1, ack: 0, flags: 0, window: 64240, options: Vec::new() };
        self
    }

    fn tcp_mut(&mut self, what: &str) -> (&mut u32, &mut u32, &mut u8, &mut Vec<u8>) {
        match &mut self.l4 {
            L4::Tcp { seq, ack, flags, options, .. } => (seq, ack, flags, options),
            _ => panic!("{what} needs tcp() first"),
        }
    }

    /// ORs TCP flag bits (see [`tcp_flags`]).
    pub fn tcp_flags(mut self, bits: u8) -> Self {
        *self.tcp_mut("tcp_flags()").2 |= bits;
        self
    }

    pub fn syn(self) -> Self {
        self.tcp_flags(tcp_flags::SYN)
    }

    /// Sets the ACK flag (the acknowledgment number is [`Packet::ack_num`]).
    pub fn ack(self) -> Self {
        self.tcp_flags(tcp_flags::ACK)
    }

    pub fn fin(self) -> Self {
        self.tcp_flags(tcp_flags::FIN)
    }

    pub fn rst(self) -> Self {
        self.tcp_flags(tcp_flags::RST)
    }

    pub fn psh(self) -> Self {
        self.tcp_flags(tcp_flags::PSH)
    }

    pub fn seq(mut self, seq: u32) -> Self {
        *self.tcp_mut("seq()").0 = seq;
        self
    }

    pub fn ack_num(mut self, ack: u32) -> Self {
        *self.tcp_mut("ack_num()").1 = ack;
        self
    }

    /// TCP options, zero-padded to a multiple of 4 bytes (at most 40).
    pub fn tcp_options(mut self, options: &[u8]) -> Self {
        assert!(options.len() <= 40, "TCP options longer than 40 bytes");
        *self.tcp_mut("tcp_options()").3 = options.to_vec();
        self
    }

    pub fn udp(mut self, sport: u16, dport: u16) -> Self {
        self.l4 = L4::Udp { sport, dport };
        self
    }

    /// ICMP echo request (type 8).
    pub fn icmp_echo(mut self, id: u16, seq: u16) -> Self {
        self.l4 = L4::Icmp { typ: 8, code: 0, rest: id_seq(id, seq) };
        self
    }

    /// ICMPv6 echo request (type 128).
    pub fn icmpv6_echo(mut self, id: u16, seq: u16) -> Self {
        self.l4 = L4::Icmpv6 { typ: 128, code: 0, rest: id_seq(id, seq) };
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

    fn l4_header(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(60);
        match &self.l4 {
            L4::None => {}
            L4::Tcp { sport, dport, seq, ack, flags, window, options } => {
                let mut opts = options.clone();
                opts.resize(opts.len().div_ceil(4) * 4, 0);
                let doff = ((20 + opts.len()) / 4) as u8;
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&seq.to_be_bytes());
                h.extend_from_slice(&ack.to_be_bytes());
                h.extend_from_slice(&[doff << 4, *flags]);
                h.extend_from_slice(&window.to_be_bytes());
                h.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
                h.extend_from_slice(&opts);
            }
            L4::Udp { sport, dport } => {
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                h.extend_from_slice(&[0, 0]);
            }
            L4::Icmp { typ, code, rest } | L4::Icmpv6 { typ, code, rest } => {
                h.extend_from_slice(&[*typ, *code, 0, 0]);
                h.extend_from_slice(rest);
            }
        }
        h
    }
}

fn id_seq(id: u16, seq: u16) -> [u8; 4] {
    let [a, b] = id.to_be_bytes();
    let [c, d] = seq.to_be_bytes();
    [a, b, c, d]
}

/// Adds `data` as big-endian 16-bit words (odd length padded with a zero byte) to `sum`.
fn sum_words(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([w[0], w[1]])));
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    // Fold early so long inputs never overflow.
    (sum & 0xffff) + (sum >> 16)
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The Internet checksum (RFC 1071) over the concatenation of `parts` (each part is summed
/// as if it started on an even offset). A region that carries its correct checksum sums to 0.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    fold(parts.iter().fold(0, |sum, p| sum_words(p, sum)))
}

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

/// `len` random bytes from `seed` (deterministic, so a failing case can be replayed).
pub fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

/// `count` malformed frames from `seed`, at least 14 bytes each (AF_PACKET refuses shorter
/// ones on Ethernet): pure noise, a valid Ethernet header with an IPv4 or IPv6 ethertype and
/// noise after it, and valid TCP/UDP packets truncated at a random byte.
pub fn garbage_frames(seed: u64, count: usize) -> Vec<Vec<u8>> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..count)
        .map(|i| {
            let len = rng.random_range(14..200);
            match i % 3 {
                0 => garbage(rng.random(), len),
                1 => {
                    let et = if rng.random() { ETH_P_IPV4 } else { ETH_P_IPV6 };
                    Packet::eth().ethertype(et).payload(&garbage(rng.random(), len - 14)).build()
                }
                _ => {
                    let p = if rng.random() {
                        Packet::eth().ipv4([192, 0, 2, 1], [192, 0, 2, 2])
                    } else {
                        Packet::eth().ipv6(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST).hop_by_hop(1)
                    };
                    let p = if rng.random() { p.tcp(1, 2).syn() } else { p.udp(1, 2) };
                    let full = p.payload(b"garbage").build();
                    let cut = rng.random_range(14..full.len());
                    full[..cut].to_vec()
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_rfc1071_example() {
        // RFC 1071 section 3 example: sum 0xddf2, checksum !0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&data]), !0xddf2);
    }

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
