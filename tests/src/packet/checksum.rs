//! The Internet checksum, for the IPv4 header and the L4 layers.

/// Adds `data` as big-endian 16-bit words (odd length padded with a zero byte) to `sum`.
pub(super) fn sum_words(data: &[u8], mut sum: u32) -> u32 {
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

pub(super) fn fold(mut sum: u32) -> u16 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_rfc1071_example() {
        // RFC 1071 section 3 example: sum 0xddf2, checksum !0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&data]), !0xddf2);
    }
}
