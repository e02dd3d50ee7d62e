//! The exact (ε, δ) of the Gaussian mechanism without subsampling (Balle & Wang 2018, Thm. 8).
//!
//! For sensitivity Δ and noise std s (here Δ = 1, s = σ/√T for T composed steps, since T
//! Gaussian steps on the same data compose to one Gaussian with σ/√T):
//! `δ(ε) = Φ(Δ/(2s) − εs/Δ) − e^ε Φ(−Δ/(2s) − εs/Δ)`. This is the tight curve: used by the tests
//! as the floor no accountant may go below.

use crate::error::DpError;
use crate::rdp::log_erfc;

/// log Φ(x), the log of the standard normal CDF.
fn log_phi(x: f64) -> f64 {
    // Φ(x) = erfc(−x/√2)/2
    log_erfc(-x / std::f64::consts::SQRT_2) - std::f64::consts::LN_2
}

/// δ(ε) of the Gaussian mechanism with sensitivity 1 and noise std `s`.
pub fn gaussian_delta(s: f64, eps: f64) -> f64 {
    let a = 1.0 / (2.0 * s);
    let b = eps * s;
    let t1 = log_phi(a - b).exp();
    let t2 = (eps + log_phi(-a - b)).exp();
    (t1 - t2).max(0.0)
}

/// The smallest ε with `δ(ε) ≤ delta` for `steps` composed Gaussian steps of noise multiplier
/// `sigma` (no subsampling), to 1e-9.
pub fn gaussian_epsilon(sigma: f64, steps: u64, delta: f64) -> Result<f64, DpError> {
    crate::event::validate(1.0, Some(sigma), steps, delta)?;
    let s = sigma / (steps as f64).sqrt();
    if gaussian_delta(s, 0.0) <= delta {
        return Ok(0.0);
    }
    let (mut lo, mut hi) = (0.0, 1.0);
    while gaussian_delta(s, hi) > delta {
        hi *= 2.0;
        if hi > 1e6 {
            return Ok(f64::INFINITY);
        }
    }
    while hi - lo > 1e-9 {
        let mid = 0.5 * (lo + hi);
        if gaussian_delta(s, mid) > delta {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_value() {
        // σ = 1, δ = 1e-5: the analytic Gaussian gives ε ≈ 4.4 (Balle & Wang, Fig. 1 region)
        let e = gaussian_epsilon(1.0, 1, 1e-5).unwrap();
        assert!(e > 4.0 && e < 5.0, "{e}");
        assert!((gaussian_delta(1.0 / 1.0, e) - 1e-5).abs() < 1e-9);
    }
}
