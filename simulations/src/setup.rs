//! What every way of running a sweep point shares: the seeds and ids of its clients, the
//! federation settings and privacy target it runs with, and the test hooks.

use fedlora_client::privacy::PrivacyTarget;
use fedlora_protocol::secagg::SecAggParams;
use fedlora_protocol::strategy::StrategyConfig;
use fedlora_protocol::{Codec, DpPlan, FederationConfig, Sampling, TrainConfig, Weighting};
use fedlora_train::learner::ClientSeeds;

use crate::error::SimError;
pub use crate::seed::mix_seed;
use crate::sweep::{Point, SweepConfig};

/// Simulated round deadline, milliseconds (only its order relative to uploads matters).
pub const ROUND_TIMEOUT_MS: u64 = 60_000;

/// The seeds of client `i` in a run with `seed` (the QUIC transport gives its SDK clients the
/// same ones, so both transports train identically).
pub fn client_seeds(seed: u64, i: usize) -> ClientSeeds {
    ClientSeeds {
        sampling: Some(mix_seed(seed, i as u64, 1)),
        noise: Some(mix_seed(seed, i as u64, 2)),
    }
}

/// The id of client `i` (the common name the certificate tool gives client `i`).
pub fn client_id(i: usize) -> String {
    format!("client-{i}")
}

/// The federation settings of `point` for a population of `clients`.
pub fn federation_config(
    sweep: &SweepConfig,
    point: &Point,
    clients: usize,
    numel: usize,
) -> Result<FederationConfig, SimError> {
    let cdp = crate::client_dp::request(sweep, point, clients);
    // a distributed point's codec is planned below (its name is only a label)
    let codec = if point.codec.starts_with("skellam-") {
        Codec::DenseF32
    } else {
        Codec::from_name(&point.codec)?
    };
    let dp = point.dp().then_some(DpPlan {
        clip_norm: point.clip,
        planned_rounds: point.rounds,
    });
    let secure = match (
        codec.modulus_bits(),
        point.secure_aggregation && cdp.is_none(),
    ) {
        (Some(modulus_bits), true) => {
            let k = point.clients_per_round;
            let neighbours = if k <= 16 { 0 } else { 14 };
            let probe = SecAggParams {
                threshold: 1,
                neighbours,
                modulus_bits,
                collusion: 0,
                stage_timeout_ms: ROUND_TIMEOUT_MS,
            };
            let kk = probe.k(k);
            Some(SecAggParams {
                threshold: (kk / 2 + 1).min(kk).max(1),
                ..probe
            })
        }
        (_, true) => {
            return Err(SimError::Config(
                "secure aggregation needs a modular codec".into(),
            ))
        }
        _ => None,
    };
    let t = &sweep.train;
    let mut cfg = FederationConfig {
        rounds: point.rounds,
        clients_per_round: point.clients_per_round,
        min_clients: if cdp.is_some() {
            crate::client_dp::min_clients(sweep, point)
        } else {
            1
        },
        round_timeout_ms: ROUND_TIMEOUT_MS,
        start_grace_ms: ROUND_TIMEOUT_MS,
        eval_timeout_ms: 1_000,
        wait_for_clients: clients,
        max_failed_rounds: point.rounds,
        max_upload_weight: FederationConfig::default().max_upload_weight,
        seed: point.seed,
        strategy: StrategyConfig::parse(&point.strategy)?,
        train: TrainConfig {
            local_steps: point.local_steps.unwrap_or(t.local_steps),
            batch_size: point.batch_size.unwrap_or(t.batch_size),
            learning_rate: if point.dp() {
                point
                    .dp_learning_rate
                    .or(t.dp_learning_rate)
                    .unwrap_or(t.learning_rate)
            } else {
                t.learning_rate
            },
            codec,
            weighting: Weighting::Uniform,
            dp,
            downlink: Default::default(),
            secure,
            proximal_mu: 0.0,
            max_update_norm: None,
            optimizer: t.optimizer,
            client_dp: None,
            staleness: None,
        },
        sampling: Sampling::Fixed,
        ..FederationConfig::default()
    };
    if let Some(req) = &cdp {
        // the deployment's planner, with seeded Poisson sampling for reproducible sweeps
        fedlora_coordinator::privacy_plan::apply(req, &mut cfg, numel, true)
            .map_err(|e| SimError::Config(e.to_string()))?;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The client's privacy target at `point` (none without DP).
pub fn privacy_target(sweep: &SweepConfig, point: &Point) -> Option<PrivacyTarget> {
    point.dp().then_some(PrivacyTarget {
        epsilon: point.epsilon,
        delta: point.delta,
        accountant: sweep.train.accountant,
        loss_clip: None,
    })
}

/// Test and audit hooks of [`crate::runner::run_population`].
#[derive(Clone, Debug)]
pub struct RunHooks {
    /// Scales every DP-SGD noise multiplier the clients train with, while their ledgers still
    /// record (and the run still reports) the calibrated σ. 1 in every real run; below 1 only
    /// in the audit's checks that a broken mechanism is caught.
    pub noise_scale: f64,
    /// The audit's Dirac gradient canaries held by each client (by client index; flat adapter
    /// indexes, see [`fedlora_train::dp_sgd::DpSgdConfig::dirac_canaries`]). Empty in every
    /// real run.
    pub dirac: std::sync::Arc<Vec<Vec<usize>>>,
}

impl Default for RunHooks {
    fn default() -> Self {
        Self {
            noise_scale: 1.0,
            dirac: Default::default(),
        }
    }
}

impl RunHooks {
    /// Applies the hooks to client `client`'s DP-SGD settings for one round.
    pub fn apply(&self, client: usize, dp: &mut fedlora_train::dp_sgd::DpSgdConfig) {
        dp.noise_multiplier *= self.noise_scale;
        if let Some(c) = self.dirac.get(client) {
            dp.dirac_canaries = c.clone();
        }
    }
}

/// A fresh ECDSA P-256 key for a virtual client's secure-aggregation signatures.
pub(crate) fn new_signer() -> Result<fedlora_protocol::secagg::crypto::EcdsaP256Signer, SimError> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &rng,
    )
    .map_err(|e| SimError::SecAgg(format!("key generation: {e}")))?;
    fedlora_protocol::secagg::crypto::EcdsaP256Signer::from_pkcs8(pkcs8.as_ref())
        .map_err(|e| SimError::SecAgg(e.to_string()))
}
