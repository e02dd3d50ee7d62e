//! Making a client-level DP plan: the coordinator (and the simulation harness, which must plan
//! exactly as a deployment does) turns a request — mode, S, target ε (a), δ, c, the eligible
//! population, and in distributed mode the bits per coordinate — into the
//! [`ClientDpPlan`] every round configuration carries, the codec it dictates, and the secure
//! aggregation parameters.
//!
//! - q = clients per round ÷ eligible clients (the round machine never samples above it); in
//!   async mode devices self-select, so q = 1, each device takes part at most P times (the
//!   plan's `rounds`, [`ClientDpRequest::participations`]) and once in any M versions, and the
//!   expected count (the public divisor) is the buffer K;
//! - central: σ for ε (a) under the Poisson-subsampled Gaussian (RDP);
//! - distributed: the scale s and Skellam variance μ for ε (a)
//!   ([`fedlora_dp::client_level::calibrate_distributed`]), each client's share
//!   μ / (`min_clients` − c), and secure aggregation mod 2^bits.

use fedlora_dp::client_level::{calibrate_distributed, ClientNoise, DistributedConfig};
use fedlora_protocol::client_dp::{AsyncParticipation, ClientDpMode, ClientDpPlan};
use fedlora_protocol::codec::SkellamParams;
use fedlora_protocol::{Codec, FederationConfig, Mode, Sampling, Weighting};
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
    /// Required in sync mode (0 is refused there); async mode does not sample.
    #[serde(default)]
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
    /// Async mode: P, the most updates one device contributes over the campaign (each one
    /// mechanism at q = 1; devices decline past it). Default: the campaign's versions
    /// (`rounds`), the most a device can take part in. Ignored in sync mode.
    #[serde(default)]
    pub participations: Option<u64>,
    /// Async mode: M, versions between two updates of one device (default 1: any version).
    #[serde(default = "default_min_gap")]
    pub min_gap: u64,
}

fn default_min_gap() -> u64 {
    1
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
            participations: None,
            min_gap: default_min_gap(),
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
    let is_async = fed.mode == Mode::Async;
    // sync: Poisson sampling at q over T rounds, divided by the expected clients per round;
    // async: devices self-select (q = 1), each at most P times, and a version's noisy sum is
    // divided by the buffer K; the fewest updates an aggregate commits with is K_MIN
    let (expected, q, rounds, fewest, participation) = if is_async {
        let p = req.participations.unwrap_or(fed.rounds);
        if p == 0 || p > fed.rounds {
            return Err(cfg_err(format!(
                "the participation bound {p} must be in 1 ..= the campaign's {} versions",
                fed.rounds
            )));
        }
        (
            fed.buffer as f64,
            1.0,
            p,
            fed.min_buffer(),
            Some(AsyncParticipation {
                min_gap: req.min_gap,
            }),
        )
    } else {
        if req.eligible < fed.clients_per_round || req.eligible == 0 {
            return Err(cfg_err(format!(
                "eligible clients {} must be at least clients per round {}",
                req.eligible, fed.clients_per_round
            )));
        }
        let expected = fed.clients_per_round as f64;
        (
            expected,
            expected / req.eligible as f64,
            fed.rounds,
            fed.min_clients,
            None,
        )
    };
    let plan = |noise| ClientDpPlan {
        mode: req.mode,
        clip: req.clip,
        expected_clients: expected,
        sampling_rate: q,
        rounds,
        delta: req.delta,
        target_epsilon: req.target_epsilon,
        min_clients: fewest,
        collusion: req.collusion,
        noise,
        secure: None,
        participation,
    };
    match req.mode {
        ClientDpMode::Central => {
            let sigma = fedlora_dp::noise_multiplier(q, rounds, req.delta, req.target_epsilon)
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
                min_clients: fewest,
                collusion: req.collusion,
                q,
                rounds,
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
    if !is_async {
        fed.sampling = if seeded {
            Sampling::PoissonSeeded
        } else {
            Sampling::Poisson
        };
    }
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

    /// Async mode: devices self-select, so the planner calibrates σ for P participations at
    /// q = 1 (not for a Poisson sample), divides by the buffer K, counts on K_MIN updates, and
    /// signs the participation bound; the federation accepts only such a plan in async mode
    /// (and refuses it in sync mode).
    #[test]
    fn an_async_plan_has_no_amplification_a_participation_bound_and_the_buffer_as_divisor() {
        let fed = FederationConfig {
            mode: Mode::Async,
            rounds: 10,
            buffer: 8,
            min_buffer: 6,
            ..FederationConfig::default()
        };
        for mode in [ClientDpMode::Central, ClientDpMode::Distributed] {
            let mut f = fed.clone();
            if mode == ClientDpMode::Distributed {
                f.train.secure = Some(SecAggParams {
                    threshold: 1,
                    neighbours: 6,
                    modulus_bits: 16,
                    collusion: 0,
                    stage_timeout_ms: 30_000,
                });
            }
            let mut req = ClientDpRequest::new(mode, 0.5, 8.0, 1);
            req.participations = Some(3);
            req.min_gap = 2;
            req.bits = 20;
            apply(&req, &mut f, 10_000, false).unwrap();
            let plan = f.train.client_dp.clone().unwrap();
            assert_eq!(plan.sampling_rate, 1.0);
            assert_eq!(plan.rounds, 3);
            assert_eq!(plan.expected_clients, 8.0);
            assert_eq!(plan.min_clients, 6);
            assert_eq!(plan.participation, Some(AsyncParticipation { min_gap: 2 }));
            let eps = plan.observer_epsilon().unwrap();
            assert!(eps <= 8.0 && eps > 7.5, "{mode}: {eps}");
            // no Poisson sampling is switched on: async mode does not sample
            assert_eq!(f.sampling, fed.sampling);
            // the same plan in sync mode, or a sync plan in async mode, is refused
            let mut sync = f.clone();
            sync.mode = Mode::Sync;
            assert!(sync.validate().is_err());
            let mut unbounded = f.clone();
            unbounded.train.client_dp.as_mut().unwrap().participation = None;
            let e = unbounded.validate().unwrap_err().to_string();
            assert!(e.contains("participation-bounded"), "{e}");
            // a bound past the campaign's versions
            let mut r = req.clone();
            r.participations = Some(11);
            assert!(apply(&r, &mut fed.clone(), 10_000, false).is_err());
        }
    }
}
