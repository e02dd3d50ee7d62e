//! L2 clipping and the Gaussian mechanism on flat `f32` buffers.
//!
//! # Guarantee
//! Clipping each record's contribution to L2 norm ≤ C bounds the L2 sensitivity of their sum by
//! C under add/remove-one-record. Adding independent N(0, σ²C²) noise to every coordinate of the
//! sum is then the Gaussian mechanism with noise multiplier σ; its privacy is accounted by
//! [`crate::rdp`]. The noise must come from a cryptographically secure generator seeded by the
//! OS ([`GaussianNoise::from_os`]); [`GaussianNoise::seeded`] exists for tests and simulations
//! only, where a reproducible run matters more than secrecy.

use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use crate::error::DpError;

/// The L2 norm of `values`, accumulated in f64.
pub fn l2_norm(values: &[f32]) -> f64 {
    values
        .iter()
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum::<f64>()
        .sqrt()
}

/// The factor that scales a vector of norm `norm` to norm ≤ `clip`: `min(1, clip/norm)`.
pub fn clip_factor(norm: f64, clip: f64) -> f64 {
    if norm > clip {
        clip / norm
    } else {
        1.0
    }
}

/// Scales `values` in place to L2 norm ≤ `clip`; returns the norm before clipping.
pub fn clip_l2(values: &mut [f32], clip: f64) -> f64 {
    let n = l2_norm(values);
    let f = clip_factor(n, clip);
    if f < 1.0 {
        for v in values.iter_mut() {
            *v = (f64::from(*v) * f) as f32;
        }
    }
    n
}

/// Gaussian noise of a fixed standard deviation from ChaCha20.
pub struct GaussianNoise {
    std: f64,
    rng: rand::rngs::ChaCha20Rng,
}

impl GaussianNoise {
    /// Noise of standard deviation `std` (= σ·C), ChaCha20 seeded from the OS CSPRNG.
    pub fn from_os(std: f64) -> Result<Self, DpError> {
        let rng = rand::rngs::ChaCha20Rng::try_from_rng(&mut rand::rngs::SysRng)
            .map_err(|e| DpError::Rng(e.to_string()))?;
        Ok(Self { std, rng })
    }

    /// Noise from a fixed seed — **tests and simulations only**: anyone who knows the seed can
    /// subtract the noise.
    pub fn seeded(std: f64, seed: u64) -> Self {
        Self {
            std,
            rng: rand::rngs::ChaCha20Rng::seed_from_u64(seed),
        }
    }

    /// The standard deviation.
    pub fn std(&self) -> f64 {
        self.std
    }

    /// `n` independent N(0, std²) samples.
    pub fn sample(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.draw() as f32).collect()
    }

    fn draw(&mut self) -> f64 {
        let z: f64 = StandardNormal.sample(&mut self.rng);
        z * self.std
    }

    /// Adds independent N(0, std²) noise to every value.
    pub fn add_to(&mut self, values: &mut [f32]) {
        for v in values.iter_mut() {
            *v = (f64::from(*v) + self.draw()) as f32;
        }
    }

    /// A uniform draw in [0, 1), for Poisson sampling decisions.
    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipped_norm_is_at_most_c() {
        let mut v: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let before = clip_l2(&mut v, 3.0);
        assert!(before > 3.0);
        assert!(l2_norm(&v) <= 3.0 + 1e-5);
        let mut small = vec![0.1f32, 0.2];
        clip_l2(&mut small, 3.0);
        assert_eq!(small, vec![0.1, 0.2]);
    }

    #[test]
    fn noise_std_matches_sigma_c() {
        // 200k samples: the sample std has relative standard error ≈ 1/√(2n) ≈ 0.16 %;
        // a 1 % tolerance fails only if the generator is wrong.
        let (sigma, c) = (1.7, 0.5);
        let mut g = GaussianNoise::seeded(sigma * c, 11);
        let s = g.sample(200_000);
        let mean = s.iter().map(|v| f64::from(*v)).sum::<f64>() / s.len() as f64;
        let var = s
            .iter()
            .map(|v| (f64::from(*v) - mean).powi(2))
            .sum::<f64>()
            / (s.len() - 1) as f64;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!(
            (var.sqrt() / (sigma * c) - 1.0).abs() < 0.01,
            "{}",
            var.sqrt()
        );
        // Kolmogorov–Smirnov against N(0, (σC)²): D < 1.36/√n at the 5 % level
        let mut z: Vec<f64> = s.iter().map(|v| f64::from(*v) / (sigma * c)).collect();
        z.sort_by(f64::total_cmp);
        let n = z.len() as f64;
        let d = z
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let cdf = 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
                (cdf - i as f64 / n)
                    .abs()
                    .max(((i + 1) as f64 / n - cdf).abs())
            })
            .fold(0.0, f64::max);
        assert!(d < 1.36 / n.sqrt(), "KS D = {d}");
    }

    #[test]
    fn os_noise_differs_between_instances() {
        let a = GaussianNoise::from_os(1.0).unwrap().sample(4);
        let b = GaussianNoise::from_os(1.0).unwrap().sample(4);
        assert_ne!(a, b);
    }
}
