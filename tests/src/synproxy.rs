//! Helpers for the SYN proxy's tests and bench: spoofed SYNs and the client-side XDP programs
//! veth needs to deliver frames sent with `XDP_TX`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result};
use limiter_agent::dataplane::{AttachMode, Dataplane, LoadOptions};
use rand::{Rng, rngs::SmallRng};

use crate::{netns::Topology, packet::Packet};

/// A SYN from a random spoofed source (10.128.0.0/9, or fd00:dead::/32 for IPv6) to `port`,
/// as `hping3 -S --rand-source` sends (no options).
pub fn spoofed_syn(rng: &mut SmallRng, dst_mac: [u8; 6], dst: IpAddr, port: u16) -> Vec<u8> {
    let src: IpAddr = match dst {
        IpAddr::V4(_) => Ipv4Addr::new(10, rng.random_range(128..=255), rng.random(), rng.random_range(1..=254)).into(),
        IpAddr::V6(_) => Ipv6Addr::new(0xfd00, 0xdead, rng.random(), rng.random(), 0, 0, rng.random(), 1).into(),
    };
    Packet::eth()
        .dst_mac(dst_mac)
        .ip(src, dst)
        .tcp(rng.random_range(1024..=65535), port)
        .seq(rng.random())
        .syn()
        .build()
}

/// The limiter with no policy (it passes everything) on the client side of every link: a veth
/// flushes the frames its peer sent with `XDP_TX` only to a peer that runs XDP, so without one
/// the SYN-ACKs would wait in the client's ring for unrelated traffic (a NIC has no such
/// dependency). Detached when the returned data paths drop.
pub fn client_side_xdp(topo: &Topology) -> Result<Vec<Dataplane>> {
    topo.clients
        .iter()
        .map(|c| {
            let mut peer = Dataplane::load(LoadOptions::default()).context("load the client-side program")?;
            c.ns.run(|| peer.attach(&c.client.name, AttachMode::Native))
                .with_context(|| format!("attach XDP to {}", c.client.name))?;
            Ok(peer)
        })
        .collect()
}
