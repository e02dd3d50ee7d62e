//! Noise calibration: the smallest noise multiplier σ that keeps DP-SGD within a target ε.

use crate::error::DpError;
use crate::rdp::dp_sgd_epsilon;

/// Largest σ the search tries.
pub const MAX_SIGMA: f64 = 1e4;

/// The smallest σ, to 1e-3 and rounded **up** to a multiple of 1e-3, such that DP-SGD with
/// Poisson rate `q`, `steps` steps and `delta` is (target_epsilon, delta)-DP under the RDP
/// accountant (add/remove one example; σ in units of the clip norm). The returned σ always
/// satisfies the target.
pub fn noise_multiplier(
    q: f64,
    steps: u64,
    delta: f64,
    target_epsilon: f64,
) -> Result<f64, DpError> {
    smallest_sigma(q, steps, delta, target_epsilon, 0.0, |s| {
        dp_sgd_epsilon(q, s, steps, delta).map(|e| e.0)
    })
}

/// The bisection behind every accountant's calibration: the smallest σ ≥ `floor` (to 1e-3,
/// rounded up) with `epsilon(σ) ≤ target`, for an `epsilon` that decreases in σ.
pub(crate) fn smallest_sigma(
    q: f64,
    steps: u64,
    delta: f64,
    target_epsilon: f64,
    floor: f64,
    epsilon: impl Fn(f64) -> Result<f64, DpError>,
) -> Result<f64, DpError> {
    crate::event::validate(q, None, steps, delta)?;
    if !(target_epsilon > 0.0 && target_epsilon.is_finite()) {
        return Err(DpError::InvalidParameter(format!(
            "target ε = {target_epsilon} must be positive and finite"
        )));
    }
    let mut hi = 1.0f64.max(floor);
    while epsilon(hi)? > target_epsilon {
        hi *= 2.0;
        if hi > MAX_SIGMA {
            return Err(DpError::Unreachable {
                target: target_epsilon,
                max_sigma: MAX_SIGMA,
            });
        }
    }
    let mut lo = floor;
    while hi - lo > 1e-3 {
        let mid = 0.5 * (lo + hi);
        if epsilon(mid)? > target_epsilon {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let rounded = (hi * 1e3).ceil() / 1e3;
    debug_assert!(epsilon(rounded)? <= target_epsilon);
    Ok(rounded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_round_trips() {
        for (q, steps, target) in [(0.01, 1000, 1.0), (0.05, 200, 4.0), (0.2, 50, 8.0)] {
            let s = noise_multiplier(q, steps, 1e-5, target).unwrap();
            let e = dp_sgd_epsilon(q, s, steps, 1e-5).unwrap().0;
            assert!(e <= target, "σ {s} gives ε {e} > {target}");
            // 1e-3 less noise would exceed the target (up to the 1e-3 rounding)
            let e_less = dp_sgd_epsilon(q, s - 2e-3, steps, 1e-5).unwrap().0;
            assert!(e_less > target, "σ {s} is not the smallest: {e_less}");
        }
        assert!(noise_multiplier(0.01, 100, 1e-5, 0.0).is_err());
    }
}
