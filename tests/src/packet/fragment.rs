//! Splitting a built frame into IP fragments, as a sending stack would (or an attacker who
//! wants the transport header cut short: any multiple of 8 bytes is allowed).

use super::{L3, Packet, checksum};

/// The IPv6 fragment header's next-header value.
const NEXTHDR_FRAGMENT: u8 = 44;

impl Packet {
    /// The frame split into fragments carrying `size` bytes of the IP payload each (the last
    /// one the rest). IPv4 keeps the header (options included) and its identification on every
    /// fragment; IPv6 gets a fragment header with identification `id` right after the fixed
    /// header, so every extension header of the packet is in the fragmentable part. Panics
    /// unless `size` is a positive multiple of 8.
    pub fn fragments(&self, size: usize, id: u32) -> Vec<Vec<u8>> {
        assert!(size > 0 && size.is_multiple_of(8), "fragment size {size} is not a positive multiple of 8");
        let built = self.build_with_offsets();
        let bytes = built.bytes;
        let l3 = built.l3;
        let (head, payload) = match self.l3 {
            L3::V4(_) => bytes.split_at(l3 + usize::from(bytes[l3] & 0x0f) * 4),
            L3::V6(_) => bytes.split_at(l3 + 40),
            L3::None => panic!("fragments() needs ipv4() or ipv6()"),
        };
        let chunks: Vec<&[u8]> = payload.chunks(size).collect();
        let last = chunks.len().saturating_sub(1);
        chunks
            .iter()
            .enumerate()
            .map(|(i, chunk)| {
                let offset = i * size;
                let more = i != last;
                let mut out = head.to_vec();
                match self.l3 {
                    L3::V4(_) => {
                        let hlen = head.len() - l3;
                        let total = (hlen + chunk.len()) as u16;
                        out[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
                        let flags = (u16::from(more) << 13) | (offset / 8) as u16;
                        out[l3 + 6..l3 + 8].copy_from_slice(&flags.to_be_bytes());
                        out[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
                        let csum = checksum(&[&out[l3..]]);
                        out[l3 + 10..l3 + 12].copy_from_slice(&csum.to_be_bytes());
                    }
                    _ => {
                        let next = out[l3 + 6];
                        out[l3 + 6] = NEXTHDR_FRAGMENT;
                        let plen = (8 + chunk.len()) as u16;
                        out[l3 + 4..l3 + 6].copy_from_slice(&plen.to_be_bytes());
                        out.extend_from_slice(&[next, 0]);
                        out.extend_from_slice(&(((offset / 8) as u16) << 3 | u16::from(more)).to_be_bytes());
                        out.extend_from_slice(&id.to_be_bytes());
                    }
                }
                out.extend_from_slice(chunk);
                out
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn ipv4_fragments_reassemble_to_the_packet() {
        let p = Packet::eth().ipv4(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)).ip_id(7).tcp(1, 9100).syn();
        let whole = p.build();
        let frags = p.fragments(8, 0);
        assert_eq!(frags.len(), 3, "20 bytes of TCP in 8-byte fragments");
        let mut payload = Vec::new();
        for (i, f) in frags.iter().enumerate() {
            assert_eq!(checksum(&[&f[14..34]]), 0, "fragment {i}: header checksum");
            let flags = u16::from_be_bytes([f[20], f[21]]);
            assert_eq!(flags & 0x1fff, i as u16, "offset in 8-byte units");
            assert_eq!(flags & 0x2000 != 0, i < 2);
            assert_eq!(u16::from_be_bytes([f[16], f[17]]) as usize, f.len() - 14);
            assert_eq!(u16::from_be_bytes([f[18], f[19]]), 7);
            payload.extend_from_slice(&f[34..]);
        }
        assert_eq!(payload, whole[34..]);
    }

    #[test]
    fn ipv6_fragments_carry_a_fragment_header() {
        let p = Packet::eth().ipv6(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST).dest_opts(0).udp(1, 53).payload(&[1; 20]);
        let whole = p.build();
        let frags = p.fragments(16, 0xabcd);
        assert_eq!(frags.len(), 3, "8 + 8 + 20 bytes in 16-byte fragments");
        let mut payload = Vec::new();
        for (i, f) in frags.iter().enumerate() {
            assert_eq!(f[20], NEXTHDR_FRAGMENT);
            assert_eq!(f[54], 60, "the fragment header names the original first header");
            let off = u16::from_be_bytes([f[56], f[57]]);
            assert_eq!((off >> 3) as usize, i * 2);
            assert_eq!(off & 1 != 0, i < 2);
            assert_eq!(u32::from_be_bytes([f[58], f[59], f[60], f[61]]), 0xabcd);
            assert_eq!(u16::from_be_bytes([f[18], f[19]]) as usize, f.len() - 54);
            payload.extend_from_slice(&f[62..]);
        }
        assert_eq!(payload, whole[54..]);
    }
}
