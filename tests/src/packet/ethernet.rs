//! The Ethernet header and VLAN tags of a [`Packet`].

use super::{ETH_P_8021AD, ETH_P_8021Q, Packet};

impl Packet {
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
    /// [`ETH_P_EXPERIMENTAL`](super::ETH_P_EXPERIMENTAL)).
    pub fn ethertype(mut self, ethertype: u16) -> Self {
        self.ethertype = Some(ethertype);
        self
    }
}
