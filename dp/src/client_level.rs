//! Client-level DP-FedAvg (McMahan et al. 2018): the unit of privacy is one **client** — all of
//! its data, i.e. its whole adapter update in every round it takes part in (add/remove one
//! client).
//!
//! # The mechanism, per round
//! - The coordinator samples clients by Poisson sampling at rate q (expected clients per round
//!   ÷ eligible clients).
//! - Each participant clips its whole update Δ (all adapter tensors jointly) to L2 norm S.
//! - **Central** mode: the coordinator sums the clipped updates and adds N(0, σ²S²) to every
//!   coordinate of the sum. Sensitivity of the sum: S. Event: [`ClientNoise::Gaussian`].
//! - **Distributed** mode: each client rotates, scales by s and conditionally rounds its clipped
//!   update to integers of L2 norm ≤ Δ₂ = [`rounded_l2_bound`]`(sS, D, β)` and adds symmetric
//!   Skellam noise of variance μ / (min_clients − c) per coordinate; the coordinator unmasks only
//!   the sum. With at least min_clients − c honest clients in the signed survivor set the sum
//!   carries Skellam noise of variance ≥ μ. Sensitivity: Δ₂ and Δ₁ = [`rounded_l1_bound`]
//!   (integer units). Event: [`ClientNoise::Skellam`].
//! - The noisy sum is divided by the **expected** number of clients per round (public), not by
//!   the number that arrived: post-processing, also when clients drop.
//!
//! # The two ε values
//! - **(a) against observers of the released models**, assuming the coordinator samples
//!   honestly and keeps the sample secret: amplified by sampling, over all T rounds of the
//!   campaign at rate q ([`observer_event`]), whether or not the client was sampled.
//! - **(b) against the coordinator itself**, which knows who was sampled: no amplification;
//!   every round the client took part in counts at q = 1 ([`coordinator_event`]). In central mode
//!   the coordinator sees every update in the clear, so (b) is ∞ (`None`).
//!
//! # What the distributed accountant assumes
//! - At least min_clients − c honest clients' noise shares are in every unmasked sum (the
//!   client checks the signed survivor set before it sends unmask shares).
//! - The shift is all that one client changes. A sampled client's own noise share also adds
//!   variance (μ/(min_clients − c) per coordinate), so an observer who knew every other client's
//!   update could estimate from the sum's D coordinates how many shares it holds (to about
//!   √(2/D) of the variance). Under (a) the sample is secret and that count varies by
//!   √(n·q(1−q)) clients from round to round (n eligible), which hides one participant; the
//!   accountant does not charge for this channel. Papers with a fixed number of clients per
//!   round (Kairouz et al. 2021, Agarwal et al. 2021) do not have it. Under (b) the coordinator
//!   knows who took part, so the unit there is one client's data with its participation known
//!   (zero-out), which the shift covers exactly.
//!
//! [`rounded_l2_bound`]: crate::skellam::rounded_l2_bound
//! [`rounded_l1_bound`]: crate::skellam::rounded_l1_bound

use serde::{Deserialize, Serialize};

use crate::error::DpError;
use crate::event::DpEvent;
use crate::skellam::{rounded_l1_bound, rounded_l2_bound, skellam_variance};

/// The noise of one client-level round, as the accountant sees it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientNoise {
    /// Central mode: N(0, σ²S²) on the sum of updates clipped to S (σ unitless).
    Gaussian {
        /// σ, in units of the clip norm S.
        noise_multiplier: f64,
    },
    /// Distributed mode: symmetric Skellam of variance `variance` (integer units²) on the
    /// integer sum, sensitivities in integer units.
    Skellam {
        /// Δ₂ of one client's rounded update.
        l2_sensitivity: f64,
        /// Δ₁ of one client's rounded update.
        l1_sensitivity: f64,
        /// μ: the least variance per coordinate of the noise in the unmasked sum.
        variance: f64,
    },
}

impl ClientNoise {
    /// The mechanism of one round on the participants' updates.
    pub fn event(&self) -> DpEvent {
        match *self {
            ClientNoise::Gaussian { noise_multiplier } => DpEvent::Gaussian { noise_multiplier },
            ClientNoise::Skellam {
                l2_sensitivity,
                l1_sensitivity,
                variance,
            } => DpEvent::Skellam {
                l2_sensitivity,
                l1_sensitivity,
                variance,
            },
        }
    }

    /// The noise standard deviation in units of the sensitivity (σ for the Gaussian, √μ/Δ₂ for
    /// Skellam): comparable across the two modes.
    pub fn effective_multiplier(&self) -> f64 {
        match *self {
            ClientNoise::Gaussian { noise_multiplier } => noise_multiplier,
            ClientNoise::Skellam {
                l2_sensitivity,
                variance,
                ..
            } => variance.sqrt() / l2_sensitivity,
        }
    }
}

/// ε (a): the whole campaign of `rounds` rounds, each the mechanism on a Poisson sample at
/// rate `q` — what observers of the released models can learn about one client.
pub fn observer_event(noise: &ClientNoise, q: f64, rounds: u64) -> DpEvent {
    DpEvent::SelfComposed {
        event: Box::new(DpEvent::PoissonSampled {
            sampling_probability: q,
            event: Box::new(noise.event()),
        }),
        count: rounds,
    }
}

/// ε (b): the `participated` rounds the client took part in, each at q = 1 — what the
/// coordinator, which knows the sample, can learn. `None` in central mode: the coordinator sees
/// the update itself (ε = ∞).
pub fn coordinator_event(noise: &ClientNoise, participated: u64) -> Option<DpEvent> {
    match noise {
        ClientNoise::Gaussian { .. } => None,
        ClientNoise::Skellam { .. } => Some(DpEvent::SelfComposed {
            event: Box::new(noise.event()),
            count: participated,
        }),
    }
}

/// What the distributed-mode calibration needs (all public, part of the privacy plan).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistributedConfig {
    /// Clip norm S of a client's whole update (adapter units, L2).
    pub clip: f64,
    /// Coordinates sent after padding to a power of two (D).
    pub dim: usize,
    /// Bits per coordinate of the modular sum (the secure aggregation modulus is 2^bits).
    pub bits: u32,
    /// Expected clients per round (the public divisor; q × eligible clients).
    pub expected_clients: f64,
    /// Fewest survivors whose noise shares the plan counts on.
    pub min_clients: usize,
    /// Colluding or Sybil clients tolerated (c): their noise is not counted.
    pub collusion: usize,
    /// Poisson sampling rate q.
    pub q: f64,
    /// Rounds of the campaign (T).
    pub rounds: u64,
    /// δ.
    pub delta: f64,
    /// Target client-level ε (a).
    pub target_epsilon: f64,
    /// Failure probability of one conditional rounding attempt (DDGauss's β; e^{−1/2} there).
    pub beta: f64,
    /// Standard deviations of headroom in the modulus against wrap-around (3 by default).
    pub headroom: f64,
}

/// The result of [`calibrate_distributed`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistributedCalibration {
    /// s: integer units per adapter unit (the inverse of DDGauss's γ).
    pub scale: f64,
    /// Δ₂ of one client's rounded update (integer units): the conditional rounding bound.
    pub l2_bound: f64,
    /// Δ₁ (integer units).
    pub l1_bound: f64,
    /// μ: the least total Skellam variance per coordinate of the unmasked sum.
    pub variance: f64,
    /// Each client's share, μ / (min_clients − c).
    pub share: f64,
    /// ε (a) of the plan, as computed.
    pub epsilon: f64,
}

impl DistributedCalibration {
    /// The accountant's view of one round.
    pub fn noise(&self) -> ClientNoise {
        ClientNoise::Skellam {
            l2_sensitivity: self.l2_bound,
            l1_sensitivity: self.l1_bound,
            variance: self.variance,
        }
    }
}

/// Honest clients whose noise the plan counts on: min_clients − c (at least 1).
pub fn honest_clients(min_clients: usize, collusion: usize) -> Result<usize, DpError> {
    if collusion >= min_clients {
        return Err(DpError::InvalidParameter(format!(
            "collusion c = {collusion} must be below min_clients = {min_clients}"
        )));
    }
    Ok(min_clients - collusion)
}

/// Sensitivities, total variance and share for scale `s`.
fn at_scale(cfg: &DistributedConfig, s: f64) -> Result<DistributedCalibration, DpError> {
    let l2 = rounded_l2_bound(s * cfg.clip, cfg.dim, cfg.beta);
    let l1 = rounded_l1_bound(l2, cfg.dim);
    let mu = skellam_variance(cfg.q, cfg.rounds, l2, l1, cfg.delta, cfg.target_epsilon)?;
    let h = honest_clients(cfg.min_clients, cfg.collusion)? as f64;
    let epsilon = crate::skellam::skellam_epsilon(cfg.q, cfg.rounds, l2, l1, mu, cfg.delta)?;
    Ok(DistributedCalibration {
        scale: s,
        l2_bound: l2,
        l1_bound: l1,
        variance: mu,
        share: mu / h,
        epsilon,
    })
}

/// The largest per-coordinate magnitude the sum is sized for, `headroom` standard deviations of
/// (aligned signal + rounding + noise) over n = expected + 3√expected clients:
/// `k · √(n²(sS)²/D + n/4 + n·share)`.
pub fn sum_range(cfg: &DistributedConfig, c: &DistributedCalibration) -> f64 {
    let n = cfg.expected_clients + 3.0 * cfg.expected_clients.sqrt();
    let sig = c.scale * cfg.clip;
    cfg.headroom * (n * n * sig * sig / cfg.dim as f64 + n / 4.0 + n * c.share).sqrt()
}

/// Chooses the scale s (the largest, to 0.1 %, whose [`sum_range`] fits in ±2^(bits−1)) and
/// the Skellam variance for the target ε (a), as DDGauss and Skellam do.
pub fn calibrate_distributed(cfg: &DistributedConfig) -> Result<DistributedCalibration, DpError> {
    let bad = |m: String| Err(DpError::InvalidParameter(m));
    if !(cfg.clip > 0.0 && cfg.clip.is_finite()) {
        return bad(format!("clip S = {} must be positive", cfg.clip));
    }
    if cfg.dim == 0 || !(2..=62).contains(&cfg.bits) {
        return bad(format!("dim {} / bits {} out of range", cfg.dim, cfg.bits));
    }
    if !(cfg.expected_clients >= 1.0 && cfg.headroom > 0.0) {
        return bad("expected clients must be ≥ 1 and headroom positive".into());
    }
    let limit = 2f64.powi(cfg.bits as i32 - 1);
    let fits = |s: f64| -> Result<(bool, DistributedCalibration), DpError> {
        let c = at_scale(cfg, s)?;
        Ok((sum_range(cfg, &c) <= limit, c))
    };
    // s so small that rounding dominates: if even that does not fit, the bits are too few
    let mut lo = 1e-6 / cfg.clip;
    let (ok, mut best) = fits(lo)?;
    if !ok {
        return bad(format!(
            "{} bits cannot hold the noisy sum of {} clients at ε = {} (rounding and noise \
             alone exceed ±2^{})",
            cfg.bits,
            cfg.expected_clients,
            cfg.target_epsilon,
            cfg.bits - 1
        ));
    }
    let mut hi = lo;
    loop {
        hi *= 4.0;
        let (ok, c) = fits(hi)?;
        if !ok {
            break;
        }
        lo = hi;
        best = c;
        if hi > 1e15 {
            return Ok(best);
        }
    }
    while hi / lo > 1.001 {
        let mid = (lo * hi).sqrt();
        let (ok, c) = fits(mid)?;
        if ok {
            lo = mid;
            best = c;
        } else {
            hi = mid;
        }
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Accountant;

    fn cfg(bits: u32, eps: f64) -> DistributedConfig {
        DistributedConfig {
            clip: 0.5,
            dim: 1 << 14,
            bits,
            expected_clients: 100.0,
            min_clients: 80,
            collusion: 10,
            q: 0.1,
            rounds: 20,
            delta: 1e-5,
            target_epsilon: eps,
            beta: (-0.5f64).exp(),
            headroom: 3.0,
        }
    }

    #[test]
    fn distributed_calibration_fits_the_modulus_and_meets_the_target() {
        for bits in [12, 16, 20] {
            for eps in [1.0, 8.0] {
                let c = cfg(bits, eps);
                let cal = calibrate_distributed(&c).unwrap();
                assert!(sum_range(&c, &cal) <= 2f64.powi(bits as i32 - 1));
                assert!(cal.epsilon <= eps);
                let acc = Accountant::Rdp
                    .epsilon(&observer_event(&cal.noise(), c.q, c.rounds), c.delta)
                    .unwrap();
                assert!(
                    (acc - cal.epsilon).abs() < 1e-9 * acc.max(1.0),
                    "{acc} {cal:?}"
                );
                assert!((cal.share * 70.0 - cal.variance).abs() < 1e-6 * cal.variance);
            }
        }
        // more bits: a larger scale, so rounding costs less of the noise budget
        let s12 = calibrate_distributed(&cfg(12, 4.0)).unwrap();
        let s20 = calibrate_distributed(&cfg(20, 4.0)).unwrap();
        assert!(s20.scale > 10.0 * s12.scale);
        // the noise in the sum, in units of S: √μ / (s·S)
        let in_clips = |c: &DistributedCalibration| c.variance.sqrt() / (c.scale * 0.5);
        assert!(in_clips(&s20) < in_clips(&s12), "{s20:?} {s12:?}");
        // too few bits for 100 clients: a typed error, not a silent wrap
        assert!(calibrate_distributed(&cfg(4, 1.0)).is_err());
    }

    #[test]
    fn the_coordinator_sees_no_amplification_and_central_mode_is_infinite_to_it() {
        let g = ClientNoise::Gaussian {
            noise_multiplier: 1.0,
        };
        assert!(coordinator_event(&g, 3).is_none());
        let cal = calibrate_distributed(&cfg(16, 4.0)).unwrap();
        let a = Accountant::Rdp
            .epsilon(&observer_event(&cal.noise(), 0.1, 20), 1e-5)
            .unwrap();
        let b = Accountant::Rdp
            .epsilon(&coordinator_event(&cal.noise(), 2).unwrap(), 1e-5)
            .unwrap();
        // two rounds at q = 1 cost more than twenty at q = 0.1 here
        assert!(b > a, "(b) {b} ≤ (a) {a}");
        assert!(honest_clients(10, 10).is_err());
    }

    #[test]
    fn distributed_noise_costs_what_central_noise_does_at_the_sweeps_plans() {
        // client_dp_lm_s06.toml: S = 0.6, 8,192 adapter values, q = 0.1, 10 rounds, δ = 1e-5
        for eps in [1.0, 2.0, 4.0, 8.0] {
            let c = DistributedConfig {
                clip: 0.6,
                dim: 8192,
                rounds: 10,
                ..cfg(16, eps)
            };
            let cal = calibrate_distributed(&c).unwrap();
            let sigma = crate::calibrate::noise_multiplier(c.q, c.rounds, c.delta, eps).unwrap();
            let ratio = cal.noise().effective_multiplier() / sigma;
            eprintln!("ε {eps}: distributed σ_eff / central σ = {ratio:.4} (σ {sigma})");
            assert!(ratio <= 1.03, "ε {eps}: {ratio}");
        }
    }
}
