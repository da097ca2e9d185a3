//! Frames for the differential fuzzer: valid frames of every shape the XDP parser knows,
//! built with [`Packet`], then mutated. Deterministic from a seed, so a failure replays with
//! `--seed`.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, Ipv6Addr};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::packet::{ETH_P_8021AD, ETH_P_8021Q, Ipv6Ext, Packet};

/// The pre-standard QinQ outer TPID.
pub const ETH_P_QINQ1: u16 = 0x9100;

/// What a frame was built as, one label per dimension, for the coverage summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Shape {
    pub link: &'static str,
    pub l3: &'static str,
    pub fragment: &'static str,
    pub l4: &'static str,
    pub mutation: &'static str,
}

/// One generated frame.
#[derive(Clone, Debug)]
pub struct Frame {
    pub bytes: Vec<u8>,
    pub shape: Shape,
}

/// Destination of every IP frame (the shielded host).
pub const DST4: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
pub const DST6: Ipv6Addr = Ipv6Addr::new(0xfd09, 0, 0, 0, 0, 0, 0, 1);

/// Source networks by the policy class they fall in (see `model::policy`): the third octet
/// of 10.9.N.0/24 and the second group of fd09:N::/64.
pub const CLASS_ALLOW: u8 = 1;
pub const CLASS_DENY: u8 = 2;
pub const CLASS_ANY_DROP: u8 = 3;
pub const CLASS_ANY_PASS: u8 = 4;
pub const CLASS_NEUTRAL: u8 = 5;

/// Ports the policy has rules for: dropped (bucket drained), passed, counted as connections.
pub const PORT_DROP: u16 = 9000;
pub const PORT_PASS: u16 = 9001;
pub const PORT_CONN: u16 = 9002;

/// A fragmented datagram's identity, so later fragments can follow a first one.
#[derive(Clone, Copy, Debug)]
struct Datagram {
    v6: bool,
    src4: Ipv4Addr,
    src6: Ipv6Addr,
    id: u32,
    protocol: u8,
}

pub struct Generator {
    rng: SmallRng,
    /// Frames of a truncation sweep still to hand out.
    queued: VecDeque<Frame>,
    recent: Vec<Datagram>,
}

impl Generator {
    pub fn new(seed: u64) -> Self {
        Self { rng: SmallRng::seed_from_u64(seed), queued: VecDeque::new(), recent: Vec::new() }
    }

    fn chance(&mut self, percent: u32) -> bool {
        self.rng.random_range(0..100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.rng.random_range(0..items.len())]
    }

    fn source4(&mut self) -> Ipv4Addr {
        if self.chance(5) {
            return Ipv4Addr::from(self.rng.random::<u32>());
        }
        let class = self.rng.random_range(CLASS_ALLOW..=CLASS_NEUTRAL);
        Ipv4Addr::new(10, 9, class, self.rng.random_range(2..6))
    }

    fn source6(&mut self) -> (Ipv6Addr, &'static str) {
        match self.rng.random_range(0..100) {
            // IPv4-mapped sources are invalid on the wire; the deny-listed IPv4 one is the case
            // that matters (it must not be mistaken for 10.9.2.2).
            0..4 => (Ipv4Addr::new(10, 9, CLASS_DENY, 2).to_ipv6_mapped(), "IPv6 mapped source"),
            4..8 => (Ipv6Addr::from(self.rng.random::<u128>()), "IPv6"),
            _ => {
                let class = self.rng.random_range(CLASS_ALLOW..=CLASS_NEUTRAL);
                // Another address in the same /64 now and then: buckets key IPv6 by prefix.
                let low = self.rng.random_range(2..6) as u16;
                let sub = if self.chance(10) { self.rng.random::<u16>() } else { 0 };
                (Ipv6Addr::new(0xfd09, u16::from(class), 0, 0, sub, 0, 0, low), "IPv6")
            }
        }
    }

    fn port(&mut self) -> u16 {
        match self.rng.random_range(0..10) {
            0..3 => PORT_DROP,
            3..5 => PORT_PASS,
            5..7 => PORT_CONN,
            _ => self.rng.random(),
        }
    }

    fn payload(&mut self, max: usize) -> Vec<u8> {
        let n = self.rng.random_range(0..=max);
        (0..n).map(|_| self.rng.random()).collect()
    }

    /// VLAN tags: none, one of each TPID, two (QinQ in every combination), three.
    fn tags(&mut self, p: Packet) -> (Packet, &'static str) {
        let tpids = [ETH_P_8021Q, ETH_P_8021AD, ETH_P_QINQ1];
        match self.rng.random_range(0..100) {
            0..50 => (p, "untagged"),
            50..60 => (p.tag(ETH_P_8021Q, self.rng.random_range(1..4095)), "802.1Q"),
            60..66 => (p.tag(ETH_P_8021AD, 10), "802.1ad"),
            66..72 => (p.tag(ETH_P_QINQ1, 10), "0x9100"),
            72..92 => {
                let (a, b) = (self.pick(&tpids), self.pick(&tpids));
                (p.tag(a, 10).tag(b, 20), "2 tags")
            }
            _ => {
                let (a, b, c) = (self.pick(&tpids), self.pick(&tpids), self.pick(&tpids));
                (p.tag(a, 10).tag(b, 20).tag(c, 30), "3 tags")
            }
        }
    }

    /// The L4 layer: returns the packet, the IP protocol it carries and a label.
    fn l4(&mut self, p: Packet, v6: bool) -> (Packet, u8, &'static str) {
        let (sport, dport) = (self.rng.random_range(1024..65535), self.port());
        match self.rng.random_range(0..100) {
            0..18 => (p.tcp(sport, dport).syn(), 6, "TCP SYN"),
            18..28 => (p.tcp(sport, dport).ack(), 6, "TCP ACK"),
            28..34 => (p.tcp(sport, dport).syn().ack(), 6, "TCP SYN-ACK"),
            34..38 => {
                let flags = self.rng.random::<u8>();
                let opts = self.payload(12);
                (p.tcp(sport, dport).tcp_flags(flags).tcp_options(&opts), 6, "TCP other")
            }
            38..68 => (p.udp(sport, dport), 17, "UDP"),
            68..78 if v6 => (p.icmpv6_echo(1, 1), 58, "ICMPv6"),
            68..78 => (p.icmp_echo(1, 1), 1, "ICMP"),
            78..84 if v6 => (p.protocol(59), 59, "no next header"),
            _ => {
                let proto = self.pick(&[2u8, 47, 50, 132, 253, 255, 1, 58]);
                // ICMP inside IPv6 (or ICMPv6 in IPv4) is just an unknown protocol number.
                (p.protocol(proto), proto, "unknown protocol")
            }
        }
    }

    /// Extension headers for an IPv6 packet: none, a short chain, or a long one.
    fn ext_chain(&mut self, fragment: Option<Ipv6Ext>) -> (Vec<Ipv6Ext>, &'static str) {
        let n = match self.rng.random_range(0..100) {
            0..35 => 0,
            35..80 => self.rng.random_range(1..4),
            80..90 => self.rng.random_range(4..14),
            _ => self.rng.random_range(14..24),
        };
        let mut chain = Vec::new();
        let mut special = false;
        for i in 0..n {
            let len = if self.chance(80) { self.rng.random_range(0..3) } else { self.rng.random_range(3..20) };
            let e = match self.rng.random_range(0..100) {
                // Hop-by-hop belongs first; elsewhere now and then.
                0..15 if i == 0 || self.chance(20) => Ipv6Ext::HopByHop { len },
                0..30 => Ipv6Ext::DestOpts { len },
                30..45 => Ipv6Ext::Routing { len, routing_type: 253, segments_left: 0 },
                45..58 => Ipv6Ext::Auth { len: self.pick(&[1u8, 2, 4, 6]) },
                // Odd lengths: 0 is shorter than the AH's fixed part, 3 is not a multiple of 8 bytes.
                58..64 => Ipv6Ext::Generic { code: 51, len: 0 },
                64..70 => Ipv6Ext::Auth { len: 3 },
                _ => {
                    special = true;
                    Ipv6Ext::Generic { code: self.pick(&[135u8, 139, 140]), len }
                }
            };
            chain.push(e);
        }
        if let Some(f) = fragment {
            let at = self.rng.random_range(0..=chain.len());
            chain.insert(at, f);
        }
        let label = match (n, special) {
            (0, _) => "IPv6",
            (16.., _) => "IPv6 chain >= 16",
            (_, true) => "IPv6 ext with 135/139/140",
            (1..4, false) => "IPv6 ext 1-3",
            _ => "IPv6 ext 4-15",
        };
        (chain, label)
    }

    /// A frame as built, before mutation.
    fn valid(&mut self) -> Frame {
        let (p, link) = self.tags(Packet::eth());
        let kind = self.rng.random_range(0..100);
        if kind < 6 {
            let (et, l3) =
                self.pick(&[(0x0806u16, "ARP"), (0x88cc, "LLDP"), (0x88b5, "experimental"), (0x88e5, "MACsec")]);
            let payload = self.payload(60);
            let bytes = p.ethertype(et).payload(&payload).build();
            return Frame { bytes, shape: Shape { link, l3, fragment: "-", l4: "-", mutation: "none" } };
        }
        if kind < 8 {
            let len = self.rng.random_range(14..120);
            let bytes = (0..len).map(|_| self.rng.random()).collect();
            return Frame {
                bytes,
                shape: Shape { link: "garbage", l3: "-", fragment: "-", l4: "-", mutation: "none" },
            };
        }
        let v6 = kind >= 52;
        let later_of = if self.chance(12) && !self.recent.is_empty() {
            let d = self.recent[self.rng.random_range(0..self.recent.len())];
            (d.v6 == v6).then_some(d)
        } else {
            None
        };
        let frag_kind = match (later_of, self.rng.random_range(0..100)) {
            (Some(_), _) => "later",
            (None, 0..70) => "none",
            (None, 70..80) => "first",
            (None, 80..88) => "tiny first",
            (None, 88..95) => "later",
            _ => "atomic",
        };
        let id = later_of.map_or_else(|| self.rng.random_range(1..8), |d| d.id);
        let frag_offset = self.rng.random_range(1..8191u16);
        let (mut p, l3) = if v6 {
            let (src, mut l3) = match later_of {
                Some(d) => (d.src6, "IPv6"),
                None => self.source6(),
            };
            let frag = match frag_kind {
                "none" => None,
                "first" | "tiny first" => Some(Ipv6Ext::Fragment { offset: 0, more: true, id }),
                "later" => Some(Ipv6Ext::Fragment { offset: frag_offset, more: self.chance(50), id }),
                _ => Some(Ipv6Ext::Fragment { offset: 0, more: false, id }),
            };
            let (chain, chain_label) = self.ext_chain(frag);
            if l3 == "IPv6" {
                l3 = chain_label;
            }
            let mut p = p.ipv6(src, DST6);
            for e in chain {
                p = p.ext(e);
            }
            (p, l3)
        } else {
            let src = later_of.map_or_else(|| self.source4(), |d| d.src4);
            let mut p = p.ipv4(src, DST4).ip_id(id as u16);
            let mut l3 = "IPv4";
            if self.chance(25) {
                let n = self.rng.random_range(1..=40);
                // NOPs, then anything: the parser only needs the length right.
                let mut opts = vec![1u8; n];
                if self.chance(50) {
                    opts = self.payload(40);
                    opts.resize(n, 1);
                }
                p = p.ip_options(&opts);
                l3 = "IPv4 options";
            }
            match frag_kind {
                "first" | "tiny first" => p = p.mf(),
                "later" => {
                    p = p.frag_offset(frag_offset);
                    if self.chance(50) {
                        p = p.mf();
                    }
                }
                "atomic" => p = p.df(),
                _ => {}
            }
            (p, l3)
        };
        let (built, protocol, l4) = if frag_kind == "later" {
            // No transport header: the payload continues the datagram.
            let protocol = later_of.map_or_else(|| self.pick(&[6u8, 17, 1, 58, 47]), |d| d.protocol);
            let payload = self.payload(64);
            let b = p.protocol(protocol).payload(&payload).build_with_offsets();
            (b, protocol, "data")
        } else {
            let (q, protocol, l4) = self.l4(p, v6);
            p = q;
            let payload = self.payload(48);
            (p.payload(&payload).build_with_offsets(), protocol, l4)
        };
        let mut bytes = built.bytes;
        if frag_kind == "tiny first" {
            // RFC 1858: the first fragment holds fewer bytes of the transport header than the
            // filter needs; the IP length says so too (a consistent, valid fragment).
            let keep = self.rng.random_range(0..20).min(bytes.len() - built.l4);
            bytes.truncate(built.l4 + keep);
            set_ip_length(&mut bytes, built.l3, v6);
        }
        if matches!(frag_kind, "first" | "tiny first") && !v6 {
            self.remember(Datagram { v6, src4: src4_of(&bytes, built.l3), src6: Ipv6Addr::UNSPECIFIED, id, protocol });
        } else if matches!(frag_kind, "first" | "tiny first") {
            self.remember(Datagram { v6, src4: Ipv4Addr::UNSPECIFIED, src6: src6_of(&bytes, built.l3), id, protocol });
        }
        // Ethernet pads short frames to 60 bytes; the IP length tells the padding apart.
        if bytes.len() < 60 && self.chance(50) {
            bytes.resize(60, 0);
        }
        Frame { bytes, shape: Shape { link, l3, fragment: frag_kind, l4, mutation: "none" } }
    }

    fn remember(&mut self, d: Datagram) {
        if self.recent.len() >= 32 {
            let i = self.rng.random_range(0..self.recent.len());
            self.recent[i] = d;
        } else {
            self.recent.push(d);
        }
    }

    /// A valid frame, then (half the time) one mutation.
    fn next_frame(&mut self) -> Frame {
        let mut f = self.valid();
        let len = f.bytes.len();
        // The header region, where mutations tell the most.
        let head = len.min(14 + 12 + 60 + 8 * 24);
        let mutation = match self.rng.random_range(0..1000) {
            0..500 => "none",
            500..700 => {
                for _ in 0..self.rng.random_range(1..=4) {
                    let at = self.rng.random_range(0..head);
                    f.bytes[at] ^= 1 << self.rng.random_range(0..8);
                }
                "bit flips"
            }
            700..760 => {
                let at = self.rng.random_range(12..head);
                f.bytes[at] = self.rng.random();
                "byte set"
            }
            760..860 => {
                let cut = self.rng.random_range(14..=len.max(14));
                f.bytes.truncate(cut);
                "truncation"
            }
            860..862 => {
                // Every cut of one frame's headers, from the bare Ethernet header up (rare:
                // one sweep yields hundreds of frames).
                for cut in 14..head.max(14) {
                    let mut g = f.clone();
                    g.bytes.truncate(cut);
                    g.shape.mutation = "truncation sweep";
                    self.queued.push_back(g);
                }
                "truncation sweep"
            }
            862..910 => match ip_at(&f.bytes) {
                Some((l3, 4)) => {
                    let ihl = self.rng.random_range(0..16u8);
                    f.bytes[l3] = 0x40 | ihl;
                    "IPv4 IHL"
                }
                _ => "none",
            },
            910..960 => match ip_at(&f.bytes) {
                Some((l3, v)) => {
                    let at = if v == 4 { l3 + 2 } else { l3 + 4 };
                    if at + 2 <= f.bytes.len() {
                        let cur = u16::from_be_bytes([f.bytes[at], f.bytes[at + 1]]);
                        let new = match self.rng.random_range(0..4) {
                            0 => 0,
                            1 => self.rng.random(),
                            _ => cur.wrapping_add(self.rng.random_range(0..64)).wrapping_sub(32),
                        };
                        f.bytes[at..at + 2].copy_from_slice(&new.to_be_bytes());
                    }
                    "IP length"
                }
                None => "none",
            },
            960..980 => match ip_at(&f.bytes) {
                Some((l3, 4)) if l3 + 8 <= f.bytes.len() => {
                    let v: u16 = self.rng.random();
                    f.bytes[l3 + 6..l3 + 8].copy_from_slice(&v.to_be_bytes());
                    "IPv4 fragment field"
                }
                _ => "none",
            },
            _ => {
                // Insert a VLAN tag after the MACs (or after an existing tag).
                let at = 12 + 4 * self.rng.random_range(0..2);
                if at <= f.bytes.len() {
                    let tpid = self.pick(&[ETH_P_8021Q, ETH_P_8021AD, ETH_P_QINQ1]);
                    let tag = [(tpid >> 8) as u8, tpid as u8, 0, 7];
                    f.bytes.splice(at..at, tag);
                    "VLAN tag inserted"
                } else {
                    "none"
                }
            }
        };
        f.shape.mutation = mutation;
        f
    }
}

impl Iterator for Generator {
    type Item = Frame;

    fn next(&mut self) -> Option<Frame> {
        if let Some(f) = self.queued.pop_front() {
            return Some(f);
        }
        let f = self.next_frame();
        if f.shape.mutation == "truncation sweep" {
            return self.queued.pop_front().or(Some(f));
        }
        Some(f)
    }
}

/// Offset and version of the IP header of a frame the generator built (tags followed).
fn ip_at(bytes: &[u8]) -> Option<(usize, u8)> {
    let mut at = 12;
    loop {
        let et = u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]);
        match et {
            ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ1 => at += 4,
            0x0800 => return Some((at + 2, 4)),
            0x86dd => return Some((at + 2, 6)),
            _ => return None,
        }
    }
}

/// Rewrites the IPv4 total length / IPv6 payload length to the frame's end.
fn set_ip_length(bytes: &mut [u8], l3: usize, v6: bool) {
    let (at, len) = if v6 { (l3 + 4, bytes.len() - l3 - 40) } else { (l3 + 2, bytes.len() - l3) };
    bytes[at..at + 2].copy_from_slice(&(len as u16).to_be_bytes());
}

fn src4_of(bytes: &[u8], l3: usize) -> Ipv4Addr {
    Ipv4Addr::new(bytes[l3 + 12], bytes[l3 + 13], bytes[l3 + 14], bytes[l3 + 15])
}

fn src6_of(bytes: &[u8], l3: usize) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&bytes[l3 + 8..l3 + 24]);
    Ipv6Addr::from(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_frames() {
        let a: Vec<Vec<u8>> = Generator::new(5).take(2000).map(|f| f.bytes).collect();
        let b: Vec<Vec<u8>> = Generator::new(5).take(2000).map(|f| f.bytes).collect();
        assert_eq!(a, b);
        let c: Vec<Vec<u8>> = Generator::new(6).take(2000).map(|f| f.bytes).collect();
        assert_ne!(a, c);
    }

    #[test]
    fn frames_are_at_least_an_ethernet_header() {
        assert!(Generator::new(1).take(20_000).all(|f| f.bytes.len() >= 14));
    }
}
