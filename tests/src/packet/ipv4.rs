//! The IPv4 header of a [`Packet`]: options, header length, flags and fragment offset.

use std::net::Ipv4Addr;

use super::{L3, Packet};

#[derive(Clone, Debug)]
pub(super) struct V4 {
    pub(super) src: Ipv4Addr,
    pub(super) dst: Ipv4Addr,
    pub(super) tos: u8,
    pub(super) id: u16,
    pub(super) df: bool,
    pub(super) mf: bool,
    pub(super) frag_offset: u16,
    pub(super) ttl: u8,
    pub(super) options: Vec<u8>,
    pub(super) ihl: Option<u8>,
}

impl Packet {
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
    fn v4(&mut self, what: &str) -> &mut V4 {
        match &mut self.l3 {
            L3::V4(v4) => v4,
            _ => panic!("{what} needs ipv4() first"),
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
}
