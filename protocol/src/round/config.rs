//! The federation's settings, identical for every round, and their checks.

use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;
use crate::message::{TrainConfig, Weighting};

pub use super::buffered::Mode;
pub use crate::staleness::Staleness;

/// Federation settings, identical for every round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FederationConfig {
    /// Rounds to commit before the federation ends.
    pub rounds: u64,
    /// Clients sampled per round (K).
    pub clients_per_round: usize,
    /// Fewest uploads a round needs to commit.
    pub min_clients: usize,
    /// How long a round waits for uploads, milliseconds.
    pub round_timeout_ms: u64,
    /// How long to wait for `clients_per_round` connections before starting a round with at least
    /// `min_clients`, milliseconds.
    pub start_grace_ms: u64,
    /// How long the final evaluation waits for reports, milliseconds.
    pub eval_timeout_ms: u64,
    /// Connected clients a round waits for before it starts without the grace period (0 or
    /// anything below `clients_per_round` means `clients_per_round`). Set it to the population
    /// to sample every round from all clients (simulations over QUIC do).
    pub wait_for_clients: usize,
    /// Consecutive failed rounds tolerated before the federation gives up (a committed round
    /// resets the count).
    pub max_failed_rounds: u64,
    /// The largest weight one upload may carry (an example count under `ExampleCount`
    /// weighting); a larger one is refused (`BadWeight`), so no single client can make its
    /// delta the global one by claiming a huge dataset. Default 10⁹ examples.
    pub max_upload_weight: f64,
    /// Seed of client sampling (deterministic per round: seed ⊕ round id).
    pub seed: u64,
    /// What every participant trains.
    pub train: TrainConfig,
    /// How the round's mean delta becomes the next global adapter (FedAvg by default).
    pub strategy: crate::strategy::StrategyConfig,
    /// How a round's participants are drawn from the connected clients.
    pub sampling: Sampling,
    /// Synchronous rounds or buffered asynchronous aggregation (FedBuff).
    pub mode: Mode,
    /// Async: accepted updates that commit the next version, K.
    pub buffer: usize,
    /// Async: fewest buffered updates that commit a version once it has waited
    /// `round_timeout_ms` (0: `buffer`, i.e. never fewer).
    pub min_buffer: usize,
    /// Async: the stalest update accepted, versions (τ = versions committed since the update's
    /// base); a staler one is refused (`TooStale`).
    pub max_staleness: u64,
    /// Async: the weight s(τ) of an update τ versions stale (`constant`, `poly:A`, `hinge:A,B`).
    pub staleness: Staleness,
    /// Async: the most devices training at once, C (0: no limit). A device that asks for work
    /// while C others hold an offer they have not answered is told to wait; an offer is
    /// answered by an upload or a decline, and lapses when its device disconnects, when its
    /// round is more than `max_staleness` buffers old, or `round_timeout_ms` after it was
    /// made.
    pub concurrency: usize,
}

/// How a round's participants are drawn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sampling {
    /// `clients_per_round` of the connected clients, shuffled with ChaCha20 seeded by
    /// `seed ⊕ round`.
    #[default]
    Fixed,
    /// Poisson sampling: each connected client independently with probability
    /// q = min(1, `clients_per_round` ÷ connected), drawn from the OS CSPRNG; q is recorded in
    /// the round. What client-level DP's amplification by sampling assumes.
    Poisson,
    /// Poisson sampling from ChaCha20 seeded by `seed ⊕ round`: **tests and simulations only**
    /// (whoever knows the seed knows the sample).
    PoissonSeeded,
}

impl Sampling {
    /// Whether each client is included independently (amplification by Poisson sampling).
    pub fn is_poisson(self) -> bool {
        matches!(self, Sampling::Poisson | Sampling::PoissonSeeded)
    }
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            rounds: 3,
            clients_per_round: 8,
            min_clients: 2,
            round_timeout_ms: 120_000,
            start_grace_ms: 10_000,
            eval_timeout_ms: 60_000,
            wait_for_clients: 0,
            max_failed_rounds: 10,
            max_upload_weight: 1e9,
            seed: 42,
            train: TrainConfig::default(),
            strategy: crate::strategy::StrategyConfig::default(),
            sampling: Sampling::Fixed,
            mode: Mode::Sync,
            buffer: 10,
            min_buffer: 0,
            max_staleness: 20,
            staleness: Staleness::default(),
            concurrency: 0,
        }
    }
}

impl FederationConfig {
    /// Checks the settings before a federation starts.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |m: &str| Err(ProtocolError::Config(m.to_string()));
        if self.rounds == 0 {
            return bad("rounds must be at least 1");
        }
        if self.min_clients == 0 {
            return bad("min_clients must be at least 1");
        }
        if self.clients_per_round < self.min_clients {
            return bad("clients_per_round must be at least min_clients");
        }
        if self.round_timeout_ms == 0 {
            return bad("round_timeout_ms must be positive");
        }
        if !(self.max_upload_weight.is_finite() && self.max_upload_weight >= 1.0) {
            return bad("max_upload_weight must be finite and at least 1");
        }
        if self.train.local_steps == 0 || self.train.batch_size == 0 {
            return bad("local_steps and batch_size must be positive");
        }
        if !(self.train.learning_rate.is_finite() && self.train.learning_rate > 0.0) {
            return bad("learning_rate must be positive");
        }
        self.train.codec.validate()?;
        self.strategy.validate()?;
        if self.strategy.needs_individual_updates() && self.train.secure.is_some() {
            return Err(ProtocolError::Config(format!(
                "strategy {} needs each client's update, and secure aggregation reveals only \
                 their sum",
                self.strategy.name()
            )));
        }
        if let Some(b) = self.train.max_update_norm {
            if !(b.is_finite() && b > 0.0) {
                return bad("max_update_norm must be positive and finite");
            }
            if self.train.weighting != Weighting::Uniform {
                return bad(
                    "max_update_norm bounds each client's influence only with uniform weighting",
                );
            }
            if self.train.codec.norm_tolerance(1, b).is_none() {
                return Err(ProtocolError::Config(format!(
                    "max_update_norm needs a codec with a stated norm error bound; {} has none \
                     (use dense-f32, f16, top-k, shared-subset or modular)",
                    self.train.codec.name()
                )));
            }
        }
        if self.train.proximal_mu != 0.0 {
            return bad(
                "proximal_mu is set by the strategy (fed-prox with its mu), not in [train]",
            );
        }
        if self.train.codec.is_summable() && self.train.weighting != Weighting::Uniform {
            return bad("the modular codec sums unit weights: use uniform weighting");
        }
        let summed = self.sum_size();
        if let crate::codec::Codec::Modular(p) = &self.train.codec {
            if (summed as u64) > p.max_weight {
                return bad(if self.mode == Mode::Async {
                    "buffer (the largest secure cohort) exceeds the modular codec's max_weight headroom"
                } else {
                    "clients_per_round exceeds the modular codec's max_weight headroom"
                });
            }
        }
        if let Some(sec) = &self.train.secure {
            let Some(m) = self.train.codec.modulus_bits() else {
                return bad(
                    "secure aggregation needs a summable codec, modular or skellam (its sum is \
                     what is unmasked)",
                );
            };
            if sec.modulus_bits != m {
                return Err(ProtocolError::Config(format!(
                    "secure aggregation's modulus_bits is {}; it must equal the codec's m, {m}",
                    sec.modulus_bits
                )));
            }
            sec.validate(summed)
                .map_err(|e| ProtocolError::Config(e.to_string()))?;
        }
        if let Some(plan) = &self.train.client_dp {
            self.validate_client_dp(plan)?;
        }
        if self.mode == Mode::Async {
            self.validate_async()?;
        }
        if let Some(dp) = &self.train.dp {
            if !(dp.clip_norm > 0.0 && dp.clip_norm.is_finite()) {
                return bad("the DP clip norm must be positive and finite");
            }
            if self.mode == Mode::Async {
                // each device's participation bound: its ledger declines past it
                if dp.planned_rounds == 0 {
                    return bad("async mode: the DP plan's participation bound (planned_rounds) must be at least 1");
                }
            } else if dp.planned_rounds < self.rounds {
                return bad("the DP plan must cover every round (planned_rounds ≥ rounds)");
            }
            if self.train.weighting != Weighting::Uniform {
                return bad("under DP an exact example count is private: use uniform weighting");
            }
        }
        Ok(())
    }

    /// Async mode's own checks. Secure aggregation runs in cohorts (each device scales its
    /// update by its staleness weight before encoding) and needs the modular codec (or, under
    /// distributed client-level DP, the Skellam codec); without it the codec must be a float
    /// one (the coordinator weighs each update). A client-level DP plan must be an async one
    /// (participation-bounded, q = 1; checked in `validate_client_dp`).
    fn validate_async(&self) -> Result<(), ProtocolError> {
        let bad = |m: &str| Err(ProtocolError::Config(format!("async mode: {m}")));
        if self.buffer == 0 {
            return bad("buffer must be at least 1");
        }
        if self.min_buffer > self.buffer {
            return bad("min_buffer must not exceed buffer");
        }
        match (&self.train.secure, &self.train.codec) {
            (Some(_), crate::codec::Codec::Modular(_) | crate::codec::Codec::Skellam(_)) => {
                if self.min_buffer() < 2 {
                    return bad("a secure cohort needs at least 2 members (min_buffer ≥ 2)");
                }
            }
            (Some(_), _) => {
                return bad("secure aggregation in async mode needs the modular codec");
            }
            (None, c) if c.is_summable() => {
                return bad(
                    "without secure aggregation the coordinator weighs each update by its \
                     staleness, which a modular payload does not allow: use a float codec",
                );
            }
            (None, _) => {}
        }
        if self.strategy.needs_individual_updates() {
            return Err(ProtocolError::Config(format!(
                "async mode: strategy {} does not weigh updates, so staleness weights would \
                 have no effect (use fed-avg, fed-prox or a server optimizer)",
                self.strategy.name()
            )));
        }
        let w = self.staleness.weight(self.max_staleness);
        if !(w.is_normal() && w > 0.0) {
            return Err(ProtocolError::Config(format!(
                "async mode: staleness {} weighs an update {} buffers stale {w}: it must stay \
                 a positive number up to max_staleness",
                self.staleness, self.max_staleness
            )));
        }
        Ok(())
    }

    /// The most updates one aggregate sums (what a modular codec's weight headroom and a
    /// secure session are sized for): a round's `clients_per_round`, or in async mode the
    /// `buffer` (the largest secure cohort).
    pub fn sum_size(&self) -> usize {
        if self.mode == Mode::Async {
            self.buffer
        } else {
            self.clients_per_round
        }
    }

    /// K_MIN: the fewest buffered updates that commit a version after the timeout.
    pub fn min_buffer(&self) -> usize {
        if self.min_buffer == 0 {
            self.buffer
        } else {
            self.min_buffer
        }
    }

    fn validate_client_dp(
        &self,
        plan: &crate::client_dp::ClientDpPlan,
    ) -> Result<(), ProtocolError> {
        use crate::client_dp::ClientDpMode;
        let bad = |m: String| Err(ProtocolError::Config(format!("client-level DP: {m}")));
        plan.check_consistent(
            &self.train.codec,
            self.train.secure.as_ref().map(|s| s.modulus_bits),
        )
        .map_err(|e| ProtocolError::Config(e.to_string()))?;
        let is_async = self.mode == Mode::Async;
        if is_async != plan.participation.is_some() {
            return bad(if is_async {
                "async mode needs a participation-bounded plan (devices self-select: q = 1, \
                 `rounds` = each device's participation bound)"
                    .into()
            } else {
                "a participation-bounded (async) plan in sync mode".into()
            });
        }
        if !is_async && !self.sampling.is_poisson() {
            return bad("needs Poisson sampling (sampling = \"poisson\")".into());
        }
        if self.train.dp.is_some() {
            return bad("example-level DP-SGD and client-level DP are separate plans".into());
        }
        if self.train.weighting != Weighting::Uniform {
            return bad("needs uniform weighting".into());
        }
        if self.strategy.needs_individual_updates() {
            return bad(format!(
                "strategy {} needs each client's update, not the noisy sum",
                self.strategy.name()
            ));
        }
        // the fewest updates an aggregate commits with: a round's min_clients, or in async
        // mode the buffer's K_MIN
        let fewest = if is_async {
            self.min_buffer()
        } else {
            self.min_clients
        };
        if plan.min_clients != fewest {
            return bad(format!(
                "the plan's min_clients {} differs from the federation's {}{fewest}",
                plan.min_clients,
                if is_async { "min_buffer " } else { "" }
            ));
        }
        if is_async {
            // the release divides by the plan's public expected count, K
            if plan.expected_clients != self.buffer as f64 {
                return bad(format!(
                    "an async plan's expected clients {} must be the buffer K = {}",
                    plan.expected_clients, self.buffer
                ));
            }
            if plan.rounds > self.rounds {
                return bad(format!(
                    "the participation bound {} exceeds the campaign's {} versions (a device \
                     takes part at most once per version)",
                    plan.rounds, self.rounds
                ));
            }
        } else if plan.rounds < self.rounds {
            return bad("the plan must cover every round (plan rounds ≥ rounds)".into());
        }
        if plan.mode == ClientDpMode::Central && self.train.codec.is_summable() {
            return bad("central mode adds noise to a plaintext sum: use a plaintext codec".into());
        }
        if plan.secure.is_some() && plan.secure != self.train.secure {
            return bad(
                "the plan's secure parameters differ from the federation's [train.secure]".into(),
            );
        }
        Ok(())
    }
}
