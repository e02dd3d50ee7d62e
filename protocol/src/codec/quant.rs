//! Unbiased stochastic quantization with a scale per block, optionally after a randomized
//! Hadamard rotation.
//!
//! Per block of `B` values with scale `s = max |x|`, a value maps to one of `L + 1 = 2^b` levels
//! evenly spaced over `[−s, s]`: `t = (x/s + 1)/2 · L`, rounded up with probability `t − ⌊t⌋`.
//! `E[x̂] = x` (unbiased) and `|x̂ − x| ≤ 2s/L`. The rotation `x ↦ H·D·x/√B` (D random ±1 from a
//! seed sent with the encoding, H the Walsh–Hadamard matrix) is orthonormal, spreads outliers so
//! `s` shrinks, and is undone exactly (up to float rounding) by the decoder; L2 errors are the
//! same in both domains.

use rand::{Rng, RngExt, SeedableRng};

/// In-place unnormalised fast Walsh–Hadamard transform; `x.len()` must be a power of two.
pub fn fwht(x: &mut [f32]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (x[j], x[j + h]);
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
}

fn signs(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 })
        .collect()
}

/// Rotates each block of `x` (length a multiple of `block`, a power of two): `H·D·x/√B`.
pub fn rotate(x: &mut [f32], block: usize, seed: u64) {
    let d = signs(seed, x.len());
    let norm = 1.0 / (block as f32).sqrt();
    for (v, s) in x.iter_mut().zip(&d) {
        *v *= s;
    }
    for b in x.chunks_mut(block) {
        fwht(b);
        for v in b.iter_mut() {
            *v *= norm;
        }
    }
}

/// Undoes [`rotate`]: `D·H·y/√B` per block.
pub fn unrotate(y: &mut [f32], block: usize, seed: u64) {
    let d = signs(seed, y.len());
    let norm = 1.0 / (block as f32).sqrt();
    for b in y.chunks_mut(block) {
        fwht(b);
        for v in b.iter_mut() {
            *v *= norm;
        }
    }
    for (v, s) in y.iter_mut().zip(&d) {
        *v *= s;
    }
}

/// Quantizes `x` block by block; returns the scales and the level of each value (0..=2^bits−1).
pub fn quantize<R: Rng + ?Sized>(
    x: &[f32],
    block: usize,
    bits: u32,
    rng: &mut R,
) -> (Vec<f32>, Vec<u64>) {
    let levels = ((1u64 << bits) - 1) as f64;
    let mut scales = Vec::with_capacity(x.len().div_ceil(block));
    let mut q = Vec::with_capacity(x.len());
    for b in x.chunks(block) {
        let s = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        scales.push(s);
        for &v in b {
            if s == 0.0 {
                q.push(0);
                continue;
            }
            let t = ((f64::from(v) / f64::from(s) + 1.0) / 2.0 * levels).clamp(0.0, levels);
            let lo = t.floor();
            let up = rng.random::<f64>() < t - lo;
            q.push((lo as u64 + u64::from(up)).min(levels as u64));
        }
    }
    (scales, q)
}

/// Maps levels back to values with the block scales.
pub fn dequantize(scales: &[f32], q: &[u64], block: usize, bits: u32) -> Vec<f32> {
    let levels = ((1u64 << bits) - 1) as f64;
    q.chunks(block)
        .zip(scales)
        .flat_map(|(b, &s)| {
            b.iter().map(move |&l| {
                if s == 0.0 {
                    0.0
                } else {
                    ((l as f64 / levels * 2.0 - 1.0) * f64::from(s)) as f32
                }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_is_orthonormal_and_invertible() {
        let x: Vec<f32> = (0..512)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
            .collect();
        let mut y = x.clone();
        rotate(&mut y, 256, 9);
        let n0: f32 = x.iter().map(|v| v * v).sum();
        let n1: f32 = y.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-3 * n0);
        unrotate(&mut y, 256, 9);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
