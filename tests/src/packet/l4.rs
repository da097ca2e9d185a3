//! The L4 header of a [`Packet`]: TCP, UDP, ICMP and ICMPv6 echo.

use super::{Packet, tcp_flags};

#[derive(Clone, Debug)]
pub(super) enum L4 {
    None,
    Tcp { sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, window: u16, options: Vec<u8> },
    Udp { sport: u16, dport: u16 },
    Icmp { typ: u8, code: u8, rest: [u8; 4] },
    Icmpv6 { typ: u8, code: u8, rest: [u8; 4] },
}
impl Packet {
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

    pub(super) fn l4_header(&self) -> Vec<u8> {
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
