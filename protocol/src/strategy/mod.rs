//! Aggregation strategies: what clients are told to train with, and how a round's updates
//! become the next global adapter.
//!
//! A [`Strategy`]:
//! - configures a round ([`Strategy::configure_round`]: what clients receive, e.g. FedProx's
//!   proximal μ);
//! - combines the round's client deltas into one aggregated delta ([`Strategy::combine`]) —
//!   only possible in the clear; a secure round reveals the **sum** alone, and strategies that
//!   work from the sum take the per-rank weighted mean of it instead;
//! - turns the aggregated delta into the next global adapter ([`Strategy::next_global`]);
//! - says whether it needs individual updates ([`Strategy::needs_individual_updates`]):
//!   coordinate-wise median and trimmed mean do, and are refused when secure aggregation is on
//!   (or client-level DP, whose noise is calibrated to the sensitivity of a sum, not of a
//!   median).
//!
//! | strategy | needs | client side | server side |
//! |---|---|---|---|
//! | `fed-avg` | the sum | local Adam | `x + Δ̄` |
//! | `fed-prox` | the sum | local Adam on loss + μ/2·‖w − w_global‖² | `x + Δ̄` |
//! | `fed-adam`, `fed-yogi`, `fed-adagrad` | the sum | local Adam | server optimizer on `Δ̄` |
//! | `median` | each update | local Adam | `x + median(Δᵢ)` per coordinate |
//! | `trimmed-mean` | each update | local Adam | `x + mean of Δᵢ without the ⌊β·k⌋ largest and smallest` per coordinate |
//! | `het-lora` | each update | local Adam | `x +` per-rank-component mean of the Δᵢ weighted by ‖Δᵢ‖ ([`NormWeighted`]) |
//!
//! [`StrategyConfig`] is the serialisable choice (`--strategy NAME`, `[federation.strategy]`
//! in the coordinator's TOML); [`StrategyConfig::build`] gives the [`Strategy`].

mod norm_weighted;
mod robust;
mod server_opt;

use serde::{Deserialize, Serialize};

use crate::adapter::FlatAdapter;
use crate::error::ProtocolError;
use crate::message::TrainConfig;
use crate::rank::RankCounts;

pub use norm_weighted::NormWeighted;
pub use robust::{Median, TrimmedMean};
pub use server_opt::{OptimizerState, Rule, ServerOpt, ServerOptimizer};

/// One client's decoded delta in a round, with its aggregation weight and the rank it trained
/// (its delta is zero-padded to the global rank).
#[derive(Clone, Copy, Debug)]
pub struct Contribution<'a> {
    /// Aggregation weight (see [`crate::Weighting`]).
    pub weight: f64,
    /// The LoRA rank the client trained (the global rank for a full-rank client).
    pub rank: usize,
    /// The delta, at the global rank.
    pub delta: &'a FlatAdapter,
}

/// How the coordinator aggregates a round.
pub trait Strategy: Send + Sync + std::fmt::Debug {
    /// The name used on the command line, in the TOML and in round records.
    fn name(&self) -> &'static str;

    /// What the round's participants receive: the federation's `train` settings with this
    /// strategy's own (FedProx sets the proximal μ).
    fn configure_round(&self, train: &TrainConfig) -> TrainConfig {
        train.clone()
    }

    /// Whether it needs each client's update (then it cannot run under secure aggregation or
    /// client-level DP, which reveal only a sum).
    fn needs_individual_updates(&self) -> bool {
        false
    }

    /// The round's aggregated delta from the decoded client deltas (at least one), all at rank
    /// `full_rank`. Strategies that work from the sum return the per-rank weighted mean
    /// ([`weighted_mean`]), which is also what a secure round's unmasked sum gives.
    fn combine(
        &self,
        full_rank: usize,
        updates: &[Contribution<'_>],
    ) -> Result<FlatAdapter, ProtocolError>;

    /// The next global adapter from `global` and the round's aggregated delta, updating the
    /// strategy's persistent `state` (server optimizers' moments).
    fn next_global(
        &self,
        state: &mut OptimizerState,
        global: &FlatAdapter,
        delta: &FlatAdapter,
    ) -> Result<FlatAdapter, ProtocolError> {
        let _ = state;
        let mut next = global.clone();
        next.apply_delta(delta)?;
        Ok(next)
    }
}

/// The per-rank weighted mean of `updates`: component `j` of the result is
/// `Σᵢ wᵢ·Δᵢ ÷ Σ_{i: rᵢ > j} wᵢ` (FedAvg when every client has the full rank).
pub fn weighted_mean(
    full_rank: usize,
    updates: &[Contribution<'_>],
) -> Result<FlatAdapter, ProtocolError> {
    let first = updates
        .first()
        .ok_or_else(|| ProtocolError::InvalidValue("no updates to aggregate".into()))?;
    let mut sum = vec![0.0f64; first.delta.values().len()];
    for u in updates {
        first.delta.check_same_spec(u.delta.spec())?;
        if !(u.weight.is_finite() && u.weight > 0.0) {
            return Err(ProtocolError::InvalidValue(format!(
                "weight {} must be positive",
                u.weight
            )));
        }
        for (s, &d) in sum.iter_mut().zip(u.delta.values()) {
            *s += u.weight * f64::from(d);
        }
    }
    RankCounts::new(full_rank, updates.iter().map(|u| (u.weight, u.rank)))
        .mean_of(first.delta.spec(), &sum)
}

/// FedAvg (McMahan et al. 2017): `x + Δ̄`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FedAvg;

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        "fed-avg"
    }

    fn combine(
        &self,
        full_rank: usize,
        updates: &[Contribution<'_>],
    ) -> Result<FlatAdapter, ProtocolError> {
        weighted_mean(full_rank, updates)
    }
}

/// FedProx (Li et al. 2020): clients minimise `loss + μ/2·‖w − w_global‖²` over the adapter
/// parameters; the server averages as FedAvg. The proximal gradient `μ(w − w_global)` does not
/// depend on data, so under DP-SGD the client adds it after clipping and noise (it costs no
/// privacy).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FedProx {
    /// Proximal weight μ ≥ 0 (1 / learning-rate units of the adapter's loss). Default 0.01.
    pub mu: f64,
}

impl Default for FedProx {
    fn default() -> Self {
        Self { mu: 0.01 }
    }
}

impl Strategy for FedProx {
    fn name(&self) -> &'static str {
        "fed-prox"
    }

    fn configure_round(&self, train: &TrainConfig) -> TrainConfig {
        TrainConfig {
            proximal_mu: self.mu,
            ..train.clone()
        }
    }

    fn combine(
        &self,
        full_rank: usize,
        updates: &[Contribution<'_>],
    ) -> Result<FlatAdapter, ProtocolError> {
        weighted_mean(full_rank, updates)
    }
}

/// The federation's choice of strategy and its parameters, as configured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case", deny_unknown_fields)]
pub enum StrategyConfig {
    /// [`FedAvg`].
    #[default]
    FedAvg,
    /// [`FedProx`] with its μ.
    FedProx(FedProx),
    /// Adam on the server over the mean delta.
    FedAdam(ServerOptimizer),
    /// Yogi on the server over the mean delta (additive, sign-controlled second moment).
    FedYogi(ServerOptimizer),
    /// Adagrad on the server over the mean delta (β₂ unused).
    FedAdagrad(ServerOptimizer),
    /// Coordinate-wise [`Median`] (plaintext only).
    Median,
    /// Coordinate-wise [`TrimmedMean`] (plaintext only).
    TrimmedMean(TrimmedMean),
    /// HetLoRA-style [`NormWeighted`] averaging for heterogeneous ranks (plaintext only).
    HetLora,
}

/// Every strategy name [`StrategyConfig::from_name`] accepts.
pub const STRATEGY_NAMES: &str =
    "fed-avg, fed-prox, fed-adam, fed-yogi, fed-adagrad, median, trimmed-mean, het-lora";

impl StrategyConfig {
    /// The strategy called `name` (one of [`STRATEGY_NAMES`]; `fedavg`, `FedProx` and the like
    /// are accepted too) with default parameters.
    pub fn from_name(name: &str) -> Result<Self, ProtocolError> {
        Ok(
            match name.replace(['-', '_'], "").to_ascii_lowercase().as_str() {
                "fedavg" => Self::FedAvg,
                "fedprox" => Self::FedProx(FedProx::default()),
                "fedadam" => Self::FedAdam(ServerOptimizer::default()),
                "fedyogi" => Self::FedYogi(ServerOptimizer::default()),
                "fedadagrad" => Self::FedAdagrad(ServerOptimizer::default()),
                "median" => Self::Median,
                "trimmedmean" => Self::TrimmedMean(TrimmedMean::default()),
                "hetlora" => Self::HetLora,
                _ => {
                    return Err(ProtocolError::Config(format!(
                        "unknown strategy `{name}` ({STRATEGY_NAMES})"
                    )))
                }
            },
        )
    }

    /// A strategy written as `name` or `name:value`, the value being its main parameter:
    /// FedProx's μ (`fed-prox:0.01`), a server optimizer's η (`fed-adam:0.03`), the trimmed
    /// mean's β (`trimmed-mean:0.2`). Used by sweep grids.
    pub fn parse(text: &str) -> Result<Self, ProtocolError> {
        let (name, value) = match text.split_once(':') {
            Some((n, v)) => {
                let v: f64 = v.trim().parse().map_err(|_| {
                    ProtocolError::Config(format!("strategy `{text}`: `{v}` is not a number"))
                })?;
                (n, Some(v))
            }
            None => (text, None),
        };
        let mut s = Self::from_name(name.trim())?;
        if let Some(v) = value {
            match &mut s {
                Self::FedProx(p) => p.mu = v,
                Self::TrimmedMean(t) => t.trim = v,
                Self::FedAdam(o) | Self::FedYogi(o) | Self::FedAdagrad(o) => o.server_lr = v,
                Self::FedAvg | Self::Median | Self::HetLora => {
                    return Err(ProtocolError::Config(format!(
                        "strategy `{text}`: {} takes no parameter",
                        s.name()
                    )))
                }
            }
        }
        s.validate()?;
        Ok(s)
    }

    /// The strategy itself.
    pub fn build(&self) -> Box<dyn Strategy> {
        match self {
            Self::FedAvg => Box::new(FedAvg),
            Self::FedProx(p) => Box::new(*p),
            Self::FedAdam(o) => Box::new(ServerOpt {
                rule: Rule::Adam,
                params: *o,
            }),
            Self::FedYogi(o) => Box::new(ServerOpt {
                rule: Rule::Yogi,
                params: *o,
            }),
            Self::FedAdagrad(o) => Box::new(ServerOpt {
                rule: Rule::Adagrad,
                params: *o,
            }),
            Self::Median => Box::new(Median),
            Self::TrimmedMean(t) => Box::new(*t),
            Self::HetLora => Box::new(NormWeighted),
        }
    }

    /// Its name (as [`Strategy::name`]).
    pub fn name(&self) -> &'static str {
        self.build().name()
    }

    /// Whether it needs individual updates (as [`Strategy::needs_individual_updates`]).
    pub fn needs_individual_updates(&self) -> bool {
        self.build().needs_individual_updates()
    }

    /// The server optimizer's hyper-parameters, if it is one.
    pub fn optimizer_mut(&mut self) -> Option<&mut ServerOptimizer> {
        match self {
            Self::FedAdam(o) | Self::FedYogi(o) | Self::FedAdagrad(o) => Some(o),
            _ => None,
        }
    }

    /// Refuses parameters out of range.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let name = self.name();
        match self {
            Self::FedAdam(o) | Self::FedYogi(o) | Self::FedAdagrad(o) => o.validate(name),
            Self::FedProx(p) if !(p.mu.is_finite() && p.mu >= 0.0) => Err(ProtocolError::Config(
                format!("strategy {name}: mu must be finite and ≥ 0, not {}", p.mu),
            )),
            Self::TrimmedMean(t) if !(0.0..0.5).contains(&t.trim) => Err(ProtocolError::Config(
                format!("strategy {name}: trim must be in [0, 0.5), not {}", t.trim),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{AdapterSpec, TensorSpec};

    fn spec() -> AdapterSpec {
        AdapterSpec::new(vec![TensorSpec {
            name: "a".into(),
            shape: vec![2],
        }])
        .unwrap()
    }

    fn adapter(v: [f32; 2]) -> FlatAdapter {
        FlatAdapter::new(spec(), v.to_vec()).unwrap()
    }

    #[test]
    fn fed_avg_and_fed_prox_average_and_prox_sets_mu() {
        let (a, b) = (adapter([1.0, 0.0]), adapter([0.0, 4.0]));
        let ups = [
            Contribution {
                weight: 1.0,
                rank: 1,
                delta: &a,
            },
            Contribution {
                weight: 3.0,
                rank: 1,
                delta: &b,
            },
        ];
        for cfg in [
            StrategyConfig::FedAvg,
            StrategyConfig::from_name("fedprox").unwrap(),
        ] {
            let s = cfg.build();
            let d = s.combine(1, &ups).unwrap();
            assert_eq!(d.values(), &[0.25, 3.0]);
            let mut st = OptimizerState::default();
            let x = s.next_global(&mut st, &adapter([1.0, 1.0]), &d).unwrap();
            assert_eq!(x.values(), &[1.25, 4.0]);
            assert!(st.m.is_empty());
        }
        let prox = StrategyConfig::FedProx(FedProx { mu: 0.5 }).build();
        assert_eq!(
            prox.configure_round(&TrainConfig::default()).proximal_mu,
            0.5
        );
        assert_eq!(
            StrategyConfig::FedAvg
                .build()
                .configure_round(&TrainConfig::default())
                .proximal_mu,
            0.0
        );
    }

    /// FedProx on a quadratic client loss, two rounds, checked against values computed by hand:
    /// client i minimises ½(w − cᵢ)² + μ/2·(w − x)² by two gradient steps of size η from
    /// w = x, the server averages. This checks the **server side** only (the strategy's
    /// aggregation and its μ in the round config): the client step is written out here, since
    /// this crate has no training engine. The client's own proximal term
    /// (`fedlora_train::proximal::add_proximal`) is checked in `train/src/train.rs`'s tests.
    #[test]
    fn fed_prox_two_rounds_match_the_hand_computed_global() {
        let (eta, mu) = (0.5f64, 1.0f64);
        let centres = [0.0f64, 4.0];
        let strategy = StrategyConfig::FedProx(FedProx { mu }).build();
        let mut x = 1.0f64;
        for _round in 0..2 {
            let deltas: Vec<FlatAdapter> = centres
                .iter()
                .map(|&c| {
                    let mut w = x;
                    for _ in 0..2 {
                        // ∇ = (w − c) + μ(w − x), the proximal part added as the client does
                        w -= eta * ((w - c) + mu * (w - x));
                    }
                    adapter([(w - x) as f32, 0.0])
                })
                .collect();
            let ups: Vec<Contribution<'_>> = deltas
                .iter()
                .map(|d| Contribution {
                    weight: 1.0,
                    rank: 1,
                    delta: d,
                })
                .collect();
            let d = strategy.combine(1, &ups).unwrap();
            let next = strategy
                .next_global(
                    &mut OptimizerState::default(),
                    &adapter([x as f32, 0.0]),
                    &d,
                )
                .unwrap();
            x = f64::from(next.values()[0]);
        }
        // round 1 from x = 1: client 0: w = 1 − 0.5·1 = 0.5, then 0.5 − 0.5(0.5 + 1·(−0.5)) = 0.5
        //   client 4: w = 1 − 0.5(−3) = 2.5, then 2.5 − 0.5(−1.5 + 1.5) = 2.5; mean 1.5
        // round 2 from x = 1.5: client 0: 0.75, then 0.75 − 0.5(0.75 − 0.75) = 0.75;
        //   client 4: 2.75, then 2.75 − 0.5(−1.25 + 1.25) = 2.75; mean 1.75
        assert!((x - 1.75).abs() < 1e-6, "{x}");
    }

    #[test]
    fn names_parse_validate_and_toml_spelling() {
        for (n, want) in [
            ("fed-avg", "fed-avg"),
            ("fedadam", "fed-adam"),
            ("FedYogi", "fed-yogi"),
            ("fed-adagrad", "fed-adagrad"),
            ("FedProx", "fed-prox"),
            ("median", "median"),
            ("trimmed_mean", "trimmed-mean"),
            ("het-lora", "het-lora"),
        ] {
            assert_eq!(StrategyConfig::from_name(n).unwrap().name(), want);
        }
        assert!(StrategyConfig::from_name("krum").is_err());
        let bad = StrategyConfig::FedAdam(ServerOptimizer {
            beta1: 1.0,
            ..Default::default()
        });
        assert!(bad.validate().is_err());
        assert!(StrategyConfig::FedProx(FedProx { mu: -1.0 })
            .validate()
            .is_err());
        assert!(StrategyConfig::TrimmedMean(TrimmedMean { trim: 0.5 })
            .validate()
            .is_err());
        assert!(StrategyConfig::Median.needs_individual_updates());
        assert!(!StrategyConfig::FedAvg.needs_individual_updates());
        let s: StrategyConfig =
            serde_json::from_str(r#"{"name":"fed-adam","server_lr":0.05}"#).unwrap();
        assert_eq!(
            s,
            StrategyConfig::FedAdam(ServerOptimizer {
                server_lr: 0.05,
                ..Default::default()
            })
        );
        let p: StrategyConfig = serde_json::from_str(r#"{"name":"fed-prox","mu":0.1}"#).unwrap();
        assert_eq!(p, StrategyConfig::FedProx(FedProx { mu: 0.1 }));
        assert_eq!(
            StrategyConfig::parse("fed-prox:0.1").unwrap(),
            StrategyConfig::FedProx(FedProx { mu: 0.1 })
        );
        assert_eq!(
            StrategyConfig::parse("fed-adam:0.03").unwrap(),
            StrategyConfig::FedAdam(ServerOptimizer {
                server_lr: 0.03,
                ..Default::default()
            })
        );
        assert!(StrategyConfig::parse("median:1").is_err());
        assert!(StrategyConfig::parse("trimmed-mean:0.7").is_err());
        assert!(StrategyConfig::parse("fed-prox:x").is_err());
        let t: StrategyConfig = serde_json::from_str(r#"{"name":"trimmed-mean"}"#).unwrap();
        assert_eq!(t, StrategyConfig::TrimmedMean(TrimmedMean::default()));
    }
}
