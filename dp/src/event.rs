//! Mechanisms described as events, as Google's dp-accounting does; accountants compose them.

use serde::{Deserialize, Serialize};

use crate::error::DpError;

/// A differentially private mechanism, described for an accountant.
///
/// Neighbouring relation for every event here: add/remove one record (one training example —
/// one non-overlapping context window of one client's text).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DpEvent {
    /// The Gaussian mechanism on a function of L2 sensitivity C with noise N(0, σ²C²):
    /// `noise_multiplier` is σ, the noise standard deviation in units of the sensitivity.
    Gaussian {
        /// σ (unitless: a multiple of the clip norm C).
        noise_multiplier: f64,
    },
    /// Symmetric Skellam noise of variance `variance` per coordinate (integer units²) on an
    /// integer-valued function of L2 sensitivity `l2_sensitivity` and L1 sensitivity
    /// `l1_sensitivity` (integer units): distributed DP inside secure aggregation
    /// ([`crate::skellam`]). Only the RDP accountant analyses it, at integer orders.
    Skellam {
        /// Δ₂ in integer units.
        l2_sensitivity: f64,
        /// Δ₁ in integer units.
        l1_sensitivity: f64,
        /// μ, the variance per coordinate of the noise in the released sum.
        variance: f64,
    },
    /// `event` run on a Poisson sample: every record is included independently with
    /// probability `sampling_probability`.
    PoissonSampled {
        /// q ∈ [0, 1].
        sampling_probability: f64,
        /// The mechanism run on the sample.
        event: Box<DpEvent>,
    },
    /// `event` run `count` times (adaptive composition).
    SelfComposed {
        /// The repeated event.
        event: Box<DpEvent>,
        /// Number of runs.
        count: u64,
    },
    /// Several events run in sequence.
    Composed(Vec<DpEvent>),
}

impl DpEvent {
    /// DP-SGD: `steps` steps, each a Gaussian on a Poisson sample with rate `q`.
    pub fn dp_sgd(q: f64, noise_multiplier: f64, steps: u64) -> Self {
        DpEvent::SelfComposed {
            event: Box::new(DpEvent::PoissonSampled {
                sampling_probability: q,
                event: Box::new(DpEvent::Gaussian { noise_multiplier }),
            }),
            count: steps,
        }
    }
}

/// Validates the inputs of a DP-SGD analysis: q ∈ (0, 1], σ > 0, steps ≥ 1, δ ∈ (0, 1).
pub fn validate(q: f64, sigma: Option<f64>, steps: u64, delta: f64) -> Result<(), DpError> {
    if !(q > 0.0 && q <= 1.0) {
        return Err(DpError::InvalidParameter(format!(
            "sampling rate q = {q} must be in (0, 1]"
        )));
    }
    if let Some(s) = sigma {
        if !(s > 0.0 && s.is_finite()) {
            return Err(DpError::InvalidParameter(format!(
                "noise multiplier σ = {s} must be positive"
            )));
        }
    }
    if steps == 0 {
        return Err(DpError::InvalidParameter("steps must be at least 1".into()));
    }
    if !(delta > 0.0 && delta < 1.0) {
        return Err(DpError::InvalidParameter(format!(
            "δ = {delta} must be in (0, 1)"
        )));
    }
    Ok(())
}
