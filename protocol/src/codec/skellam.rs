//! Distributed-DP encoding (DDGauss's pipeline with Skellam noise): a client's update as
//! integers mod 2^m that already carry the client's share of the noise, so the sum the
//! coordinator unmasks is a Skellam mechanism ([`fedlora_dp::skellam`]).
//!
//! A client, for `n` values:
//! 1. clips its whole update to L2 norm S;
//! 2. pads to D = the next power of two and applies the randomized Hadamard rotation with the
//!    round's public seed (orthonormal: the norm is kept, coordinates are flattened);
//! 3. scales by s and rounds each coordinate up with probability equal to its fractional part,
//!    **re-rounding until the integer vector's L2 norm is ≤ `l2_bound`** (conditional rounding:
//!    the sensitivity then holds with certainty; after [`MAX_ROUNDING_TRIES`] failures it sends
//!    the zero vector, whose norm is 0);
//! 4. adds symmetric Skellam noise of variance `share` per coordinate;
//! 5. reduces mod 2^m and packs at m bits.
//!
//! The coordinator decodes only the sum: centred mod 2^m, divided by s, rotated back, cut to
//! `n`, and reports `expected_clients` as the weight, so the mean is the noisy sum divided by
//! the **expected** number of clients (client-level DP-FedAvg).

use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;

/// Rounding attempts before a client sends the zero vector instead.
pub const MAX_ROUNDING_TRIES: usize = 1000;

/// Public parameters of the distributed-DP encoding (part of the round config, derived from the
/// privacy plan by [`fedlora_dp::client_level::calibrate_distributed`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkellamParams {
    /// m: bits per coordinate; the sum is kept mod 2^m (= the secure aggregation modulus).
    pub bits: u8,
    /// S: the L2 clip norm of a client's whole update (adapter units).
    pub clip: f64,
    /// s: integer units per adapter unit.
    pub scale: f64,
    /// Δ₂: the conditional rounding bound on a client's integer vector (integer units).
    pub l2_bound: f64,
    /// Variance per coordinate of the Skellam noise each client adds (integer units²).
    pub share: f64,
    /// The public divisor of the sum: expected clients per round.
    pub expected_clients: f64,
}

/// What one encoding did (reported locally, never sent).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SkellamStats {
    /// Rounding attempts until the bound held.
    pub rounding_tries: usize,
    /// Whether rounding never met the bound and the zero vector was sent.
    pub sent_zero: bool,
}

impl SkellamParams {
    /// Coordinates sent for `n` values: the next power of two.
    pub fn dim(n: usize) -> usize {
        n.max(1).next_power_of_two()
    }

    /// Refuses parameters that cannot work.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |m: String| Err(ProtocolError::Config(m));
        if !(2..=62).contains(&self.bits) {
            return bad(format!("skellam bits {} must be in 2..=62", self.bits));
        }
        for (name, v) in [
            ("clip", self.clip),
            ("scale", self.scale),
            ("l2_bound", self.l2_bound),
            ("expected_clients", self.expected_clients),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return bad(format!("skellam {name} = {v} must be positive and finite"));
            }
        }
        if !(self.share >= 0.0 && self.share <= 1e15) {
            return bad(format!("skellam share {} must be in [0, 1e15]", self.share));
        }
        Ok(())
    }

    fn rotation_seed(round_seed: u64) -> u64 {
        round_seed ^ 0x736b_656c_6c61_6d00 // "skellam\0"
    }

    /// Integers mod 2^m for `values` (see the module docs), with the noise drawn from `rng`
    /// (the OS CSPRNG in deployments).
    pub fn to_ints<R: Rng + ?Sized>(
        &self,
        values: &[f32],
        round_seed: u64,
        rng: &mut R,
    ) -> Result<(Vec<u64>, SkellamStats), ProtocolError> {
        let noise = fedlora_dp::skellam::SkellamNoise::new(self.share)
            .map_err(|e| ProtocolError::Config(e.to_string()))?;
        let d = Self::dim(values.len());
        let mut x = values.to_vec();
        fedlora_dp::clip_l2(&mut x, self.clip);
        x.resize(d, 0.0);
        super::quant::rotate(&mut x, d, Self::rotation_seed(round_seed));
        let y: Vec<f64> = x.iter().map(|&v| f64::from(v) * self.scale).collect();
        let bound_sq = self.l2_bound * self.l2_bound;
        let mut stats = SkellamStats::default();
        let mut rounded = vec![0i64; d];
        loop {
            stats.rounding_tries += 1;
            let mut sq = 0.0;
            for (r, &v) in rounded.iter_mut().zip(&y) {
                let lo = v.floor();
                *r = lo as i64 + i64::from(rng.random::<f64>() < v - lo);
                sq += (*r as f64) * (*r as f64);
            }
            if sq <= bound_sq {
                break;
            }
            if stats.rounding_tries >= MAX_ROUNDING_TRIES {
                rounded.iter_mut().for_each(|r| *r = 0);
                stats.sent_zero = true;
                break;
            }
        }
        let mask = (1u64 << self.bits) - 1;
        let ints = rounded
            .into_iter()
            .map(|r| (r.wrapping_add(noise.sample(rng)) as u64) & mask)
            .collect();
        Ok((ints, stats))
    }

    /// Decodes integers (one client's, or the sum mod 2^m of several) into `n` values: the
    /// (noisy) **sum** in adapter units.
    pub fn from_ints(&self, ints: &[u64], n: usize, round_seed: u64) -> Vec<f32> {
        let m = u32::from(self.bits);
        let half = 1u64 << (m - 1);
        let mut y: Vec<f32> = ints
            .iter()
            .map(|&u| {
                let s = if u >= half {
                    u as i64 - (1i64 << m)
                } else {
                    u as i64
                };
                (s as f64 / self.scale) as f32
            })
            .collect();
        let d = y.len();
        super::quant::unrotate(&mut y, d, Self::rotation_seed(round_seed));
        y.truncate(n);
        y
    }

    /// Coordinates of the sum whose magnitude is within 1 % of the modulus' half range: where
    /// wrap-around may have happened (post-processing: utility, not privacy). Counted on the
    /// decoded sum by the coordinator.
    pub fn near_wrap(&self, ints: &[u64]) -> usize {
        let m = u32::from(self.bits);
        let half = 1u64 << (m - 1);
        let edge = half - half / 100;
        ints.iter()
            .filter(|&&u| {
                let mag = if u >= half { (1u64 << m) - u } else { u };
                mag >= edge
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn params(share: f64) -> SkellamParams {
        SkellamParams {
            bits: 20,
            clip: 1.0,
            scale: 1000.0,
            l2_bound: fedlora_dp::skellam::rounded_l2_bound(1000.0, 64, (-0.5f64).exp()),
            share,
            expected_clients: 3.0,
        }
    }

    #[test]
    fn the_sum_of_encodings_decodes_to_the_sum_of_clipped_updates() {
        let p = params(0.0);
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(1);
        let a: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 0.1).collect();
        let b: Vec<f32> = (0..50).map(|i| (i as f32 * 0.11).cos() * 0.1).collect();
        let big: Vec<f32> = a.iter().map(|v| v * 100.0).collect(); // clipped to norm 1
        let mut sum = vec![0u64; 64];
        for v in [&a, &b, &big] {
            let (ints, st) = p.to_ints(v, 9, &mut rng).unwrap();
            assert_eq!(ints.len(), 64);
            assert!(!st.sent_zero);
            for (s, i) in sum.iter_mut().zip(&ints) {
                *s = s.wrapping_add(*i) & ((1 << 20) - 1);
            }
        }
        let dec = p.from_ints(&sum, 50, 9);
        let norm = a.iter().map(|v| v * v * 1e4).sum::<f32>().sqrt();
        for i in 0..50 {
            let want = a[i] + b[i] + big[i] / norm;
            // rounding error ≤ 1/s per coordinate before the rotation, per client
            assert!((dec[i] - want).abs() < 4e-3, "{i}: {} vs {want}", dec[i]);
        }
    }

    #[test]
    fn the_rounded_vector_never_exceeds_the_bound_and_noise_has_the_share() {
        // a bound below what rounding can reach: zero vector, counted
        let mut p = params(0.0);
        p.l2_bound = 10.0;
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(2);
        let v = vec![0.1f32; 64];
        let (ints, st) = p.to_ints(&v, 1, &mut rng).unwrap();
        assert!(st.sent_zero && ints.iter().all(|&i| i == 0));
        // noise of variance 50 around zero
        let p = params(50.0);
        let (ints, _) = p.to_ints(&vec![0.0; 1 << 12], 1, &mut rng).unwrap();
        let m = 1i64 << 20;
        let vals: Vec<f64> = ints
            .iter()
            .map(|&u| if u as i64 >= m / 2 { u as i64 - m } else { u as i64 } as f64)
            .collect();
        let var = vals.iter().map(|x| x * x).sum::<f64>() / vals.len() as f64;
        assert!((var - 50.0).abs() < 5.0, "{var}");
        assert_eq!(p.near_wrap(&[0, (1 << 19) - 1, 1 << 19, (1 << 20) - 1]), 2);
    }

    #[test]
    fn bad_parameters_are_refused() {
        let mut p = params(1.0);
        assert!(p.validate().is_ok());
        p.bits = 63;
        assert!(p.validate().is_err());
        let mut p = params(-1.0);
        assert!(p.validate().is_err());
        p.share = 1.0;
        p.scale = f64::NAN;
        assert!(p.validate().is_err());
    }
}
