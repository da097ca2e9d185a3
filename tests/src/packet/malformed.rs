//! Deterministic malformed frames, for tests that throw noise at the parser.

use std::net::Ipv6Addr;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{ETH_P_IPV4, ETH_P_IPV6, Packet};

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
