//! Bit packing of unsigned integers at a fixed width, and LEB128 varints.

/// Packs each value's low `width` bits (1 ≤ width ≤ 64), LSB first. Whole bytes (8, 16, 32, 64)
/// are copied directly; other widths go through a 64-bit accumulator flushed a word at a time.
pub fn pack(values: impl IntoIterator<Item = u64>, width: u32, out: &mut Vec<u8>) {
    debug_assert!((1..=64).contains(&width));
    let values = values.into_iter();
    out.reserve(values.size_hint().0 * width as usize / 8 + 8);
    match width {
        8 => out.extend(values.map(|v| v as u8)),
        16 => values.for_each(|v| out.extend_from_slice(&(v as u16).to_le_bytes())),
        32 => values.for_each(|v| out.extend_from_slice(&(v as u32).to_le_bytes())),
        64 => values.for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        _ => {
            let mask = (1u64 << width) - 1;
            let mut acc: u64 = 0;
            let mut nbits = 0u32;
            for v in values {
                let v = v & mask;
                acc |= v << nbits;
                if nbits + width >= 64 {
                    out.extend_from_slice(&acc.to_le_bytes());
                    // the bits of v that did not fit (none when it ended exactly on the word)
                    let used = 64 - nbits;
                    acc = if used == 64 { 0 } else { v >> used };
                    nbits = nbits + width - 64;
                } else {
                    nbits += width;
                }
            }
            out.extend_from_slice(&acc.to_le_bytes()[..nbits.div_ceil(8) as usize]);
        }
    }
}

/// Bytes that [`pack`] writes for `n` values of `width` bits.
pub fn packed_len(n: usize, width: u32) -> usize {
    (n * width as usize).div_ceil(8)
}

/// Unpacks `n` values of `width` bits; `None` if `bytes` has the wrong length. Whole-byte
/// widths are read directly; widths up to 56 bits read each value from one unaligned 64-bit
/// word.
pub fn unpack(bytes: &[u8], n: usize, width: u32) -> Option<Vec<u64>> {
    if bytes.len() != packed_len(n, width) || !(1..=64).contains(&width) {
        return None;
    }
    let out = match width {
        8 => bytes.iter().map(|&b| u64::from(b)).collect(),
        16 => {
            let (w, _) = bytes.as_chunks::<2>();
            w.iter()
                .map(|c| u64::from(u16::from_le_bytes(*c)))
                .collect()
        }
        32 => {
            let (w, _) = bytes.as_chunks::<4>();
            w.iter()
                .map(|c| u64::from(u32::from_le_bytes(*c)))
                .collect()
        }
        64 => {
            let (w, _) = bytes.as_chunks::<8>();
            w.iter().map(|c| u64::from_le_bytes(*c)).collect()
        }
        w if w <= 56 => {
            let mask = (1u64 << w) - 1;
            let w = w as usize;
            // values whose 8-byte window lies inside `bytes`; the rest read a padded copy
            let fast = if bytes.len() >= 8 {
                ((bytes.len() - 8) * 8 / w + 1).min(n)
            } else {
                0
            };
            let read = |buf: &[u8], bit: usize| -> u64 {
                let at = bit / 8;
                let word: [u8; 8] = buf[at..at + 8].try_into().expect("8 bytes");
                (u64::from_le_bytes(word) >> (bit % 8)) & mask
            };
            let mut out: Vec<u64> = (0..fast).map(|i| read(bytes, i * w)).collect();
            if fast < n {
                let from = fast * w / 8;
                let mut tail = bytes[from..].to_vec();
                tail.resize(tail.len() + 8, 0);
                out.extend((fast..n).map(|i| read(&tail, i * w - from * 8)));
            }
            out
        }
        _ => {
            let mask: u128 = (1u128 << width) - 1;
            let mut out = Vec::with_capacity(n);
            let mut acc: u128 = 0;
            let mut nbits = 0u32;
            let mut it = bytes.iter();
            for _ in 0..n {
                while nbits < width {
                    acc |= u128::from(*it.next()?) << nbits;
                    nbits += 8;
                }
                out.push((acc & mask) as u64);
                acc >>= width;
                nbits -= width;
            }
            out
        }
    };
    Some(out)
}

/// Appends `v` as an unsigned LEB128 varint.
pub fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Reads a LEB128 varint at `*pos`, advancing it.
pub fn get_varint(bytes: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trips_every_width() {
        for w in [1u32, 2, 3, 4, 7, 8, 13, 17, 32, 33, 64] {
            let vals: Vec<u64> = (0..37u64)
                .map(|i| {
                    i.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                        & if w == 64 { u64::MAX } else { (1 << w) - 1 }
                })
                .collect();
            let mut b = Vec::new();
            pack(vals.iter().copied(), w, &mut b);
            assert_eq!(b.len(), packed_len(37, w));
            assert_eq!(unpack(&b, 37, w).unwrap(), vals);
            assert!(unpack(&b[1..], 37, w).is_none());
        }
    }

    /// The plain bit-at-a-time packing the fast paths must reproduce byte for byte.
    fn reference_pack(values: &[u64], width: u32) -> Vec<u8> {
        let mut out = vec![0u8; packed_len(values.len(), width)];
        for (i, v) in values.iter().enumerate() {
            for b in 0..width as usize {
                if v >> b & 1 == 1 {
                    let bit = i * width as usize + b;
                    out[bit / 8] |= 1 << (bit % 8);
                }
            }
        }
        out
    }

    #[test]
    fn fast_paths_match_the_reference_layout_at_every_width_and_length() {
        for w in 1u32..=64 {
            let mask = if w == 64 { u64::MAX } else { (1 << w) - 1 };
            for n in [0usize, 1, 2, 7, 8, 9, 63, 64, 65, 130] {
                let vals: Vec<u64> = (0..n as u64)
                    .map(|i| (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(w) & mask)
                    .collect();
                let mut b = Vec::new();
                pack(vals.iter().copied(), w, &mut b);
                assert_eq!(b, reference_pack(&vals, w), "width {w}, {n} values");
                assert_eq!(unpack(&b, n, w).unwrap(), vals, "width {w}, {n} values");
            }
        }
    }

    #[test]
    fn varints() {
        let mut b = Vec::new();
        for v in [0u64, 1, 127, 128, 300, u64::MAX] {
            put_varint(v, &mut b);
        }
        let mut p = 0;
        for v in [0u64, 1, 127, 128, 300, u64::MAX] {
            assert_eq!(get_varint(&b, &mut p), Some(v));
        }
        assert_eq!(get_varint(&b, &mut p), None);
    }
}
