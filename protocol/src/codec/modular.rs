//! Masking-compatible encoding: a delta as integers modulo 2^m whose **sum** over a round's
//! clients the coordinator can decode, masked or not.
//!
//! Everything that shapes the integers is public and identical for every client of a round: the
//! clamp range `[−c, c]`, the value bits `b`, the shared subset (from the round seed) and the
//! largest total weight `W`. A value `x` is clamped, scaled to `[−L, L]` with `L = 2^(b−1) − 1`
//! and stochastically rounded (unbiased inside the clamp range). One more integer carries the
//! client's weight (1 under uniform weighting), so the decoded sum also gives Σ w. With
//! `m = b + 1 + ⌈log₂ W⌉` the sum of at most `W` vectors never wraps, so reduction mod 2^m is
//! exact; values are bit-packed at m bits each.

use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;

/// Public parameters of the modular encoding (part of the round config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModularParams {
    /// Value bits b (2..=24): levels per value are 2^(b−1) − 1 on each side of zero.
    pub value_bits: u8,
    /// Clamp c: values outside [−c, c] are clamped (and counted).
    pub clamp: f64,
    /// Share of coordinates sent (shared subset from the round seed); 1 sends all.
    pub fraction: f64,
    /// Largest total weight of a round (uniform weighting: the most clients a round can count).
    pub max_weight: u64,
}

impl Default for ModularParams {
    fn default() -> Self {
        Self {
            value_bits: 8,
            clamp: 0.05,
            fraction: 1.0 / 8.0,
            max_weight: 1024,
        }
    }
}

impl ModularParams {
    /// m = value bits + sign + ⌈log₂ max_weight⌉.
    pub fn modulus_bits(&self) -> u32 {
        u32::from(self.value_bits) + 1 + (self.max_weight.max(1) as f64).log2().ceil() as u32
    }

    /// Levels on each side of zero, L = 2^(b−1) − 1.
    pub fn levels(&self) -> i64 {
        (1i64 << (self.value_bits - 1)) - 1
    }

    /// Refuses parameters that could overflow or make no sense.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |m: String| Err(ProtocolError::Config(m));
        if !(2..=24).contains(&self.value_bits) {
            return bad(format!("value_bits {} must be in 2..=24", self.value_bits));
        }
        if !(self.clamp > 0.0 && self.clamp.is_finite()) {
            return bad("clamp must be positive".into());
        }
        if !(self.fraction > 0.0 && self.fraction <= 1.0) {
            return bad("fraction must be in (0, 1]".into());
        }
        if self.max_weight == 0 {
            return bad("max_weight must be at least 1".into());
        }
        if self.modulus_bits() > 62 {
            return bad(format!(
                "modulus of {} bits could overflow (at most 62)",
                self.modulus_bits()
            ));
        }
        Ok(())
    }

    /// Integers for `values` (already restricted to the subset) plus the weight; returns them
    /// reduced mod 2^m and the number of clamped values.
    pub fn to_ints<R: Rng + ?Sized>(
        &self,
        values: &[f32],
        weight: u64,
        rng: &mut R,
    ) -> (Vec<u64>, usize) {
        let l = self.levels() as f64;
        let mask = (1u64 << self.modulus_bits()) - 1;
        let mut clamped = 0;
        let mut out: Vec<u64> = values
            .iter()
            .map(|&v| {
                let v = f64::from(v);
                if v.abs() > self.clamp {
                    clamped += 1;
                }
                let t = v.clamp(-self.clamp, self.clamp) / self.clamp * l;
                let lo = t.floor();
                let q = lo as i64 + i64::from(rng.random::<f64>() < t - lo);
                (q as u64) & mask
            })
            .collect();
        out.push(weight & mask);
        (out, clamped)
    }

    /// Decodes integers (one client's, or a sum mod 2^m of several) into values and the weight.
    pub fn from_ints(&self, ints: &[u64]) -> (Vec<f32>, f64) {
        let m = self.modulus_bits();
        let signed = |u: u64| -> i64 {
            if u >> (m - 1) & 1 == 1 {
                (u as i64) - (1i64 << m)
            } else {
                u as i64
            }
        };
        let scale = self.clamp / self.levels() as f64;
        let (vals, w) = ints.split_at(ints.len() - 1);
        (
            vals.iter()
                .map(|&u| (signed(u) as f64 * scale) as f32)
                .collect(),
            signed(w[0]) as f64,
        )
    }
}

/// Sums modular integer vectors of one round (masked or not) mod 2^m.
#[derive(Clone, Debug)]
pub struct ModularSum {
    mask: u64,
    acc: Vec<u64>,
    count: usize,
}

impl ModularSum {
    /// An empty sum for vectors of `len` integers at `m` bits.
    pub fn new(len: usize, m: u32) -> Self {
        Self {
            mask: (1u64 << m) - 1,
            acc: vec![0; len],
            count: 0,
        }
    }

    /// A sum computed elsewhere (e.g. unmasked by secure aggregation) of `count` vectors.
    pub fn from_sum(ints: Vec<u64>, m: u32, count: usize) -> Self {
        Self {
            mask: (1u64 << m) - 1,
            acc: ints,
            count,
        }
    }

    /// Adds one vector (mod 2^m).
    pub fn add(&mut self, ints: &[u64]) -> Result<(), ProtocolError> {
        if ints.len() != self.acc.len() {
            return Err(ProtocolError::ShapeMismatch {
                expected: self.acc.len(),
                got: ints.len(),
            });
        }
        for (a, v) in self.acc.iter_mut().zip(ints) {
            *a = a.wrapping_add(*v) & self.mask;
        }
        self.count += 1;
        Ok(())
    }

    /// Subtracts a vector (mod 2^m), e.g. a mask.
    pub fn sub(&mut self, ints: &[u64]) {
        for (a, v) in self.acc.iter_mut().zip(ints) {
            *a = a.wrapping_sub(*v) & self.mask;
        }
    }

    /// The sum so far.
    pub fn ints(&self) -> &[u64] {
        &self.acc
    }

    /// Vectors added.
    pub fn count(&self) -> usize {
        self.count
    }
}
