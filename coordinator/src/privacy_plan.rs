//! Making a client-level DP plan: the coordinator (and the simulation harness, which must plan
//! exactly as a deployment does) turns a request — mode, S, target ε (a), δ, c, the eligible
//! population, and in distributed mode the bits per coordinate — into the
//! [`ClientDpPlan`] every round configuration carries, the codec it dictates, and the secure
//! aggregation parameters.
//!
//! - q = clients per round ÷ eligible clients (the round machine never samples above it);
//! - central: σ for ε (a) under the Poisson-subsampled Gaussian (RDP);
//! - distributed: the scale s and Skellam variance μ for ε (a)
//!   ([`fedlora_dp::client_level::calibrate_distributed`]), each client's share
//!   μ / (`min_clients` − c), and secure aggregation mod 2^bits.

use fedlora_dp::client_level::{calibrate_distributed, ClientNoise, DistributedConfig};
use fedlora_protocol::client_dp::{ClientDpMode, ClientDpPlan};
use fedlora_protocol::codec::SkellamParams;
use fedlora_protocol::{Codec, FederationConfig, Sampling, Weighting};
use serde::{Deserialize, Serialize};

use crate::error::{CoordinatorError, Result};

/// What the operator asks for (CLI flags or `[federation.client_dp]`-style settings).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientDpRequest {
    /// Central or distributed.
    pub mode: ClientDpMode,
    /// S, the L2 clip of a client's whole update (adapter units).
    pub clip: f64,
    /// Target ε (a) over the campaign.
    pub target_epsilon: f64,
    /// δ.
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// c: colluding or Sybil clients tolerated.
    #[serde(default)]
    pub collusion: usize,
    /// Eligible clients (the population sampled from); q = clients per round ÷ this.
    pub eligible: usize,
    /// Distributed mode: bits per coordinate (the secure aggregation modulus 2^bits).
    #[serde(default = "default_bits")]
    pub bits: u8,
    /// Distributed mode: failure probability of one conditional rounding attempt.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Distributed mode: standard deviations of modulus headroom.
    #[serde(default = "default_headroom")]
    pub headroom: f64,
}

fn default_delta() -> f64 {
    1e-5
}
fn default_bits() -> u8 {
    16
}
fn default_beta() -> f64 {
    (-0.5f64).exp()
}
fn default_headroom() -> f64 {
    3.0
}

impl ClientDpRequest {
    /// A request with the defaults (δ 1e-5, 16 bits, β = e^{−1/2}, headroom 3, c = 0).
    pub fn new(mode: ClientDpMode, clip: f64, target_epsilon: f64, eligible: usize) -> Self {
        Self {
            mode,
            clip,
            target_epsilon,
            delta: default_delta(),
            collusion: 0,
            eligible,
            bits: default_bits(),
            beta: default_beta(),
            headroom: default_headroom(),
        }
    }
}

fn cfg_err(m: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Config(format!("client-level DP: {m}"))
}

/// Applies `req` to `fed` for an adapter of `numel` values: the plan, the codec (distributed:
/// Skellam; central: the federation's, which must be plaintext), secure aggregation
/// (distributed: mod 2^bits, neighbours as configured or 2⌈log₂ n⌉, the smallest t with
/// 2t > k + c, [`crate::secure_plan::secure_params`]),
/// Poisson sampling (`seeded`: [`Sampling::PoissonSeeded`], tests and simulations only) and
/// uniform weighting; then validates the federation.
pub fn apply(
    req: &ClientDpRequest,
    fed: &mut FederationConfig,
    numel: usize,
    seeded: bool,
) -> Result<()> {
    if req.eligible < fed.clients_per_round || req.eligible == 0 {
        return Err(cfg_err(format!(
            "eligible clients {} must be at least clients per round {}",
            req.eligible, fed.clients_per_round
        )));
    }
    let expected = fed.clients_per_round as f64;
    let q = expected / req.eligible as f64;
    let plan = |noise| ClientDpPlan {
        mode: req.mode,
        clip: req.clip,
        expected_clients: expected,
        sampling_rate: q,
        rounds: fed.rounds,
        delta: req.delta,
        target_epsilon: req.target_epsilon,
        min_clients: fed.min_clients,
        collusion: req.collusion,
        noise,
        secure: None,
    };
    match req.mode {
        ClientDpMode::Central => {
            let sigma = fedlora_dp::noise_multiplier(q, fed.rounds, req.delta, req.target_epsilon)
                .map_err(cfg_err)?;
            fed.train.client_dp = Some(plan(ClientNoise::Gaussian {
                noise_multiplier: sigma,
            }));
            fed.train.secure = None;
        }
        ClientDpMode::Distributed => {
            let cal = calibrate_distributed(&DistributedConfig {
                clip: req.clip,
                dim: SkellamParams::dim(numel),
                bits: u32::from(req.bits),
                expected_clients: expected,
                min_clients: fed.min_clients,
                collusion: req.collusion,
                q,
                rounds: fed.rounds,
                delta: req.delta,
                target_epsilon: req.target_epsilon,
                beta: req.beta,
                headroom: req.headroom,
            })
            .map_err(cfg_err)?;
            fed.train.codec = Codec::Skellam(SkellamParams {
                bits: req.bits,
                clip: req.clip,
                scale: cal.scale,
                l2_bound: cal.l2_bound,
                share: cal.share,
                expected_clients: expected,
            });
            // SecAgg+ among the round's clients, with the plan's collusion bound in its threshold
            let choice = crate::secure_plan::SecureChoice {
                neighbours: fed.train.secure.as_ref().map(|s| s.neighbours),
                threshold: None,
                collusion: req.collusion,
            };
            fed.train.secure = Some(crate::secure_plan::secure_params(&choice, fed)?);
            // the secure parameters are part of what the coordinator signs
            fed.train.client_dp = Some(ClientDpPlan {
                secure: fed.train.secure.clone(),
                ..plan(cal.noise())
            });
        }
    }
    fed.train.weighting = Weighting::Uniform;
    fed.sampling = if seeded {
        Sampling::PoissonSeeded
    } else {
        Sampling::Poisson
    };
    fed.validate().map_err(cfg_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlora_protocol::secagg::SecAggParams;

    /// The review's case: k = 10 neighbours and c = 2 colluders got t = ⌊k/2⌋ + 1 = 6, and
    /// 2t = 12 is not above k + c = 12. Now t = 7; and a c that no t ≤ k can cover is refused
    /// (the threshold rule itself is tested in `secure_plan`).
    #[test]
    fn the_threshold_covers_the_planned_collusion() {
        let mut fed = FederationConfig {
            rounds: 10,
            clients_per_round: 40,
            min_clients: 30,
            ..FederationConfig::default()
        };
        fed.train.secure = Some(SecAggParams {
            threshold: 1,
            neighbours: 10,
            modulus_bits: 16,
            collusion: 0,
            stage_timeout_ms: 30_000,
        });
        let mut req = ClientDpRequest::new(ClientDpMode::Distributed, 0.5, 8.0, 400);
        req.collusion = 2;
        apply(&req, &mut fed, 10_000, false).unwrap();
        let s = fed.train.secure.clone().unwrap();
        assert_eq!((s.neighbours, s.threshold, s.collusion), (10, 7, 2));
        req.collusion = 10;
        let mut f = fed.clone();
        assert!(apply(&req, &mut f, 10_000, false).is_err());
    }

    #[test]
    fn plans_meet_their_target_and_refuse_what_cannot_work() {
        let mut fed = FederationConfig {
            rounds: 10,
            clients_per_round: 20,
            min_clients: 16,
            ..FederationConfig::default()
        };
        let mut req = ClientDpRequest::new(ClientDpMode::Distributed, 0.5, 4.0, 200);
        req.collusion = 2;
        apply(&req, &mut fed, 10_000, false).unwrap();
        let plan = fed.train.client_dp.clone().unwrap();
        assert!(plan.observer_epsilon().unwrap() <= 4.0);
        assert_eq!(plan.sampling_rate, 0.1);
        assert_eq!(fed.train.secure.as_ref().unwrap().modulus_bits, 16);
        assert!(matches!(fed.train.codec, Codec::Skellam(_)));
        assert_eq!(fed.sampling, Sampling::Poisson);
        // central
        let mut fed2 = FederationConfig {
            rounds: 10,
            clients_per_round: 20,
            min_clients: 16,
            ..FederationConfig::default()
        };
        apply(
            &ClientDpRequest::new(ClientDpMode::Central, 0.5, 4.0, 200),
            &mut fed2,
            10_000,
            true,
        )
        .unwrap();
        assert!(
            fed2.train
                .client_dp
                .as_ref()
                .unwrap()
                .observer_epsilon()
                .unwrap()
                <= 4.0
        );
        // fewer eligible than per round, collusion ≥ min_clients, too few bits
        let mut f = fed2.clone();
        assert!(apply(
            &ClientDpRequest::new(ClientDpMode::Central, 0.5, 4.0, 10),
            &mut f,
            100,
            true
        )
        .is_err());
        let mut r = ClientDpRequest::new(ClientDpMode::Distributed, 0.5, 4.0, 200);
        r.collusion = 16;
        assert!(apply(&r, &mut f, 100, true).is_err());
        r.collusion = 0;
        r.bits = 4;
        assert!(apply(&r, &mut f, 100, true).is_err());
    }
}
