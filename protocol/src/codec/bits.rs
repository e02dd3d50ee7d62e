//! Bit packing of unsigned integers at a fixed width, and LEB128 varints.

/// Packs each value's low `width` bits (1 ≤ width ≤ 64), LSB first.
pub fn pack(values: impl IntoIterator<Item = u64>, width: u32, out: &mut Vec<u8>) {
    debug_assert!((1..=64).contains(&width));
    let mut acc: u128 = 0;
    let mut nbits = 0u32;
    let mask: u128 = if width == 64 {
        u64::MAX as u128
    } else {
        (1u128 << width) - 1
    };
    for v in values {
        acc |= (u128::from(v) & mask) << nbits;
        nbits += width;
        while nbits >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            nbits -= 8;
        }
    }
    if nbits > 0 {
        out.push(acc as u8);
    }
}

/// Bytes that [`pack`] writes for `n` values of `width` bits.
pub fn packed_len(n: usize, width: u32) -> usize {
    (n * width as usize).div_ceil(8)
}

/// Unpacks `n` values of `width` bits; `None` if `bytes` has the wrong length.
pub fn unpack(bytes: &[u8], n: usize, width: u32) -> Option<Vec<u64>> {
    if bytes.len() != packed_len(n, width) {
        return None;
    }
    let mask: u128 = if width == 64 {
        u64::MAX as u128
    } else {
        (1u128 << width) - 1
    };
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
