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

/// The Gaussian mechanism on a sum of scalars clipped to `[0, bound]`: returns
/// `Σ clamp(xᵢ, 0, bound) + N(0, (σ·bound)²)`, the noise drawn from `noise`.
///
/// - **Unit and neighbours:** one example (one `xᵢ`), add/remove.
/// - **Sensitivity:** `bound` (one example moves the clipped sum by at most `bound`).
/// - **Noise:** standard deviation `σ·bound`, so the noise multiplier is σ.
/// - **Privacy:** alone, the Gaussian mechanism with multiplier σ. Released on the same Poisson
///   batch as a DP-SGD gradient step with clip norm C and multiplier σ, the pair is one
///   Gaussian mechanism on the vector (gradient sum, loss sum · C/bound) with sensitivity √2·C
///   and noise σ·C: **multiplier σ/√2**, which is how the client's ledger records such a step.
/// - **Assumes:** non-finite inputs count as `bound` (a NaN loss is clipped, never dropped,
///   so it cannot change who is in the sum).
pub fn noisy_clipped_sum(
    values: impl IntoIterator<Item = f64>,
    bound: f64,
    sigma: f64,
    noise: &mut GaussianNoise,
) -> f64 {
    let sum: f64 = values
        .into_iter()
        .map(|x| {
            if x.is_finite() {
                x.clamp(0.0, bound)
            } else {
                bound
            }
        })
        .sum();
    sum + noise.draw_with_std(sigma * bound)
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

    /// One N(0, std²) draw of another standard deviation from the same stream (a second
    /// Gaussian mechanism on the same step, e.g. [`noisy_clipped_sum`]).
    pub fn draw_with_std(&mut self, std: f64) -> f64 {
        let z: f64 = StandardNormal.sample(&mut self.rng);
        z * std
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
    fn noisy_clipped_sum_clips_to_the_bound_and_adds_noise_of_sigma_times_bound() {
        let mut quiet = GaussianNoise::seeded(0.0, 1);
        let xs = [-1.0, 0.5, 7.0, f64::NAN, f64::INFINITY];
        // −1 → 0, 0.5, 7 → 2, NaN → 2, ∞ → 2
        assert_eq!(noisy_clipped_sum(xs, 2.0, 0.0, &mut quiet), 6.5);
        // mean 1.5 (three values 0.5), std σ·bound = 1.2: sample mean and variance
        let mut noise = GaussianNoise::seeded(0.0, 7);
        let n = 20_000;
        let draws: Vec<f64> = (0..n)
            .map(|_| noisy_clipped_sum([0.5, 0.5, 0.5], 2.0, 0.6, &mut noise))
            .collect();
        let mean = draws.iter().sum::<f64>() / n as f64;
        let var = draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / n as f64;
        assert!((mean - 1.5).abs() < 0.03, "{mean}");
        assert!((var.sqrt() - 1.2).abs() < 0.03, "{}", var.sqrt());
    }

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
