//! `exp` and `erf` on f32 written so that the compiler vectorises them, and elementwise maps
//! that run them on the widest vector unit the CPU has.
//!
//! libm's `erff` and `expf` are scalar calls: in the byte-level model's training step they took
//! 8.7 % and 5.5 % of the time (perf, 2-core AMD EPYC). These are branch-free polynomials, so a
//! loop over them becomes AVX2/FMA (or AVX-512, or NEON) code. [`map1`] and [`map2`] compile the
//! loop once per instruction set through `pulp`'s runtime dispatch (already in the build through
//! `gemm`) and pick the best one the CPU reports: safe code, no `unsafe`, no build flags.
//!
//! Accuracy (tested below against libm over the whole useful range):
//! - [`exp`]: relative error ≤ 4e-7 (a few ulp) for `x ∈ [−87.3, 88]`. Inputs above 88
//!   saturate at `e^88 ≈ 1.7e38` instead of overflowing; inputs below −87.3 give `e^−87.3
//!   ≈ 1.2e−38` instead of a subnormal (absolute error < 1.2e−38).
//! - [`erf`]: Abramowitz & Stegun 7.1.26 (the formula PyTorch's vectorised CPU `erf` uses):
//!   absolute error ≤ 1.5e−7 in exact arithmetic, ≤ 1e−6 as evaluated in f32 (measured 7.4e−7).

use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` split in two (Cody–Waite) so that `x − k·ln 2` stays exact for the `k` that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding and subtracting 1.5·2²³ rounds an f32 of magnitude < 2²² to the nearest integer.
const ROUND: f32 = 12_582_912.0;

/// `e^x`, vectorisable; see the module docs for its range and error.
#[inline(always)]
#[allow(clippy::excessive_precision)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.336_54, 88.0);
    let k = (x * LOG2_E + ROUND) - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    // Cephes' expf polynomial for e^r on [−ln2/2, ln2/2]
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let er = p * r * r + r + 1.0;
    er * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

/// The error function, vectorisable (Abramowitz & Stegun 7.1.26; absolute error ≤ 1e−6 in f32).
#[inline(always)]
#[allow(clippy::excessive_precision)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_7) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    (1.0 - poly * exp(-a * a)).copysign(x)
}

/// The largest value of `x` (−∞ for an empty slice; NaN-free inputs), in eight lanes so that it
/// vectorises.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let m = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    acc.iter().fold(m, |m, &v| m.max(v))
}

/// `Σ f(x_i)`, in eight partial sums so that it vectorises (the order of the additions differs
/// from a left-to-right sum by rounding only).
#[inline(always)]
pub fn sum_map(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    acc.iter().sum::<f32>() + tail
}

struct Map1<'a, F> {
    src: &'a [f32],
    dst: &'a mut [f32],
    f: &'a F,
}

impl<F: Fn(f32) -> f32> WithSimd for Map1<'_, F> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) {
        for (d, &s) in self.dst.iter_mut().zip(self.src) {
            *d = (self.f)(s);
        }
    }
}

struct Map2<'a, F> {
    a: &'a [f32],
    b: &'a [f32],
    dst: &'a mut [f32],
    f: &'a F,
}

impl<F: Fn(f32, f32) -> f32> WithSimd for Map2<'_, F> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) {
        for ((d, &a), &b) in self.dst.iter_mut().zip(self.a).zip(self.b) {
            *d = (self.f)(a, b);
        }
    }
}

struct Map3<'a, F> {
    a: &'a [f32],
    b: &'a [f32],
    c: &'a [f32],
    dst: &'a mut [f32],
    f: &'a F,
}

impl<F: Fn(f32, f32, f32) -> f32> WithSimd for Map3<'_, F> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) {
        let abc = self.a.iter().zip(self.b).zip(self.c);
        for (d, ((&a, &b), &c)) in self.dst.iter_mut().zip(abc) {
            *d = (self.f)(a, b, c);
        }
    }
}

/// Values per rayon task: small tensors stay on one thread.
const PER_TASK: usize = 16_384;

/// `dst[i] = f(src[i])`, vectorised for this CPU, on all cores for large slices.
///
/// # Panics
/// If the slices differ in length (a caller's bug, not an input error).
pub fn map1(src: &[f32], dst: &mut [f32], f: impl Fn(f32) -> f32 + Sync) {
    assert_eq!(
        src.len(),
        dst.len(),
        "map1 over slices of different lengths"
    );
    let arch = Arch::new();
    dst.par_chunks_mut(PER_TASK)
        .zip(src.par_chunks(PER_TASK))
        .for_each(|(dst, src)| arch.dispatch(Map1 { src, dst, f: &f }));
}

/// `dst[i] = f(a[i], b[i])`, vectorised for this CPU, on all cores for large slices.
///
/// # Panics
/// If the slices differ in length (a caller's bug, not an input error).
pub fn map2(a: &[f32], b: &[f32], dst: &mut [f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    assert!(
        a.len() == dst.len() && b.len() == dst.len(),
        "map2 over slices of different lengths"
    );
    let arch = Arch::new();
    dst.par_chunks_mut(PER_TASK)
        .zip(a.par_chunks(PER_TASK).zip(b.par_chunks(PER_TASK)))
        .for_each(|(dst, (a, b))| arch.dispatch(Map2 { a, b, dst, f: &f }));
}

/// `dst[i] = f(a[i], b[i], c[i])`, vectorised for this CPU, on all cores for large slices.
///
/// # Panics
/// If the slices differ in length (a caller's bug, not an input error).
pub fn map3(
    a: &[f32],
    b: &[f32],
    c: &[f32],
    dst: &mut [f32],
    f: impl Fn(f32, f32, f32) -> f32 + Sync,
) {
    assert!(
        a.len() == dst.len() && b.len() == dst.len() && c.len() == dst.len(),
        "map3 over slices of different lengths"
    );
    let arch = Arch::new();
    let abc = a
        .par_chunks(PER_TASK)
        .zip(b.par_chunks(PER_TASK))
        .zip(c.par_chunks(PER_TASK));
    dst.par_chunks_mut(PER_TASK)
        .zip(abc)
        .for_each(|(dst, ((a, b), c))| {
            arch.dispatch(Map3 {
                a,
                b,
                c,
                dst,
                f: &f,
            })
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 97th f32 bit pattern in `[lo, hi]`, plus the ends.
    fn grid(lo: f32, hi: f32) -> Vec<f32> {
        let mut v: Vec<f32> = (0..200_000)
            .map(|i| lo + (hi - lo) * i as f32 / 200_000.0)
            .collect();
        v.extend([lo, hi, 0.0, -0.0, 1e-30, -1e-30]);
        v
    }

    #[test]
    fn exp_is_within_a_few_ulp_of_libm() {
        let xs = grid(-87.3, 88.0);
        let mut out = vec![0f32; xs.len()];
        map1(&xs, &mut out, exp);
        let worst = xs
            .iter()
            .zip(&out)
            .map(|(&x, &y)| {
                let r = (x as f64).exp();
                ((y as f64 - r) / r).abs()
            })
            .fold(0f64, f64::max);
        assert!(worst <= 4e-7, "worst relative error {worst}");
        // saturation instead of inf or a subnormal
        assert_eq!(exp(1000.0), exp(88.0));
        assert!(exp(88.0).is_finite());
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1.2e-38);
    }

    #[test]
    fn erf_is_within_1e_6_of_libm() {
        let xs = grid(-10.0, 10.0);
        let mut out = vec![0f32; xs.len()];
        map1(&xs, &mut out, erf);
        let worst = xs
            .iter()
            .zip(&out)
            .map(|(&x, &y)| (y as f64 - libm::erf(x as f64)).abs())
            .fold(0f64, f64::max);
        assert!(worst <= 1e-6, "worst absolute error {worst}");
        assert!(erf(0.0).abs() <= 2e-7);
        assert_eq!(erf(-3.0), -erf(3.0));
    }

    #[test]
    fn the_dispatched_map_is_the_scalar_map() {
        let a = grid(-5.0, 5.0);
        let b: Vec<f32> = a.iter().map(|x| x * 0.5 + 1.0).collect();
        let mut out = vec![0f32; a.len()];
        map2(&a, &b, &mut out, |a, b| erf(a) * b);
        // Rust never contracts a·b + c into an FMA on its own, so the vector code computes
        // the same IEEE operations as the scalar code, bit for bit
        for ((&a, &b), &o) in a.iter().zip(&b).zip(&out) {
            assert_eq!(o.to_bits(), (erf(a) * b).to_bits(), "{a} {b}");
        }
    }
}
