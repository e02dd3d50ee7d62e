//! Server-side aggregation strategies: how the aggregated delta of a round becomes the next
//! global adapter.
//!
//! Every strategy here needs only the **weighted mean delta** of a round — what a secure round
//! reveals (the unmasked sum ÷ the summed weights) and what client-level DP would noise — so
//! each works unchanged under secure aggregation and DP. Strategies that need individual
//! updates (coordinate-wise median, trimmed mean, Krum) would say so through
//! [`Strategy::needs_individual_updates`] and be refused with secure aggregation.
//!
//! The server optimizers are Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2,
//! with `Δₜ` the round's mean delta (no bias correction, `v₋₁ = τ²`):
//! ```text
//! mₜ = β₁·mₜ₋₁ + (1 − β₁)·Δₜ
//! vₜ = vₜ₋₁ + Δₜ²                              (FedAdagrad)
//! vₜ = β₂·vₜ₋₁ + (1 − β₂)·Δₜ²                  (FedAdam)
//! vₜ = vₜ₋₁ − (1 − β₂)·Δₜ²·sign(vₜ₋₁ − Δₜ²)    (FedYogi)
//! xₜ₊₁ = xₜ + η·mₜ / (√vₜ + τ)
//! ```
//! The moments are state that must survive a restart exactly ([`OptimizerState`]); the
//! coordinator persists them beside each checkpoint.

use serde::{Deserialize, Serialize};

use crate::adapter::FlatAdapter;
use crate::error::ProtocolError;

/// How the coordinator turns a round's mean delta into the next global adapter.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Strategy {
    /// `x + Δ` (McMahan et al. 2017).
    #[default]
    FedAvg,
    /// Adam on the server over the mean delta.
    FedAdam(ServerOptimizer),
    /// Yogi on the server over the mean delta (additive, sign-controlled second moment).
    FedYogi(ServerOptimizer),
    /// Adagrad on the server over the mean delta (β₂ unused).
    FedAdagrad(ServerOptimizer),
}

/// Hyper-parameters of a server optimizer.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerOptimizer {
    /// Server learning rate η. Default 0.01.
    pub server_lr: f64,
    /// First-moment decay β₁ in [0, 1). Default 0.9.
    pub beta1: f64,
    /// Second-moment decay β₂ in [0, 1). Default 0.99.
    pub beta2: f64,
    /// Adaptivity τ > 0 (also `√v₋₁`). Default 0.001.
    pub tau: f64,
}

impl Default for ServerOptimizer {
    fn default() -> Self {
        Self {
            server_lr: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        }
    }
}

/// A server optimizer's moments (empty until its first round, and always for FedAvg).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OptimizerState {
    /// First moment m, one value per adapter parameter.
    pub m: Vec<f64>,
    /// Second moment v, one value per adapter parameter.
    pub v: Vec<f64>,
}

impl Strategy {
    /// The name used on the command line, in the TOML and in round records.
    pub fn name(&self) -> &'static str {
        match self {
            Self::FedAvg => "fed-avg",
            Self::FedAdam(_) => "fed-adam",
            Self::FedYogi(_) => "fed-yogi",
            Self::FedAdagrad(_) => "fed-adagrad",
        }
    }

    /// The strategy called `name` (`fed-avg`, `fed-adam`, `fed-yogi`, `fed-adagrad`; `fedavg`
    /// and the like are accepted too) with default hyper-parameters.
    pub fn from_name(name: &str) -> Result<Self, ProtocolError> {
        Ok(match name.replace('-', "").to_ascii_lowercase().as_str() {
            "fedavg" => Self::FedAvg,
            "fedadam" => Self::FedAdam(ServerOptimizer::default()),
            "fedyogi" => Self::FedYogi(ServerOptimizer::default()),
            "fedadagrad" => Self::FedAdagrad(ServerOptimizer::default()),
            _ => {
                return Err(ProtocolError::Config(format!(
                    "unknown strategy `{name}` (fed-avg, fed-adam, fed-yogi, fed-adagrad)"
                )))
            }
        })
    }

    /// The server optimizer's hyper-parameters, if it is one.
    pub fn optimizer_mut(&mut self) -> Option<&mut ServerOptimizer> {
        match self {
            Self::FedAvg => None,
            Self::FedAdam(o) | Self::FedYogi(o) | Self::FedAdagrad(o) => Some(o),
        }
    }

    /// Whether it needs each client's update (then it cannot run under secure aggregation or
    /// client-level DP, which reveal only a sum). None of these does.
    pub fn needs_individual_updates(&self) -> bool {
        false
    }

    /// Refuses hyper-parameters out of range.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let mut s = self.clone();
        let Some(o) = s.optimizer_mut() else {
            return Ok(());
        };
        let bad = |m: &str| {
            Err(ProtocolError::Config(format!(
                "strategy {}: {m}",
                self.name()
            )))
        };
        if !(o.server_lr.is_finite() && o.server_lr > 0.0) {
            return bad("server_lr must be positive");
        }
        if !((0.0..1.0).contains(&o.beta1) && (0.0..1.0).contains(&o.beta2)) {
            return bad("beta1 and beta2 must be in [0, 1)");
        }
        if !(o.tau.is_finite() && o.tau > 0.0) {
            return bad("tau must be positive");
        }
        Ok(())
    }

    /// The next global adapter from `global` and `averaged` (the FedAvg result `global + Δ`,
    /// Δ the round's weighted mean delta), updating `state`. FedAvg returns `averaged` as is.
    pub fn step(
        &self,
        state: &mut OptimizerState,
        global: &FlatAdapter,
        averaged: FlatAdapter,
    ) -> Result<FlatAdapter, ProtocolError> {
        let (o, rule) = match self {
            Self::FedAvg => return Ok(averaged),
            Self::FedAdam(o) => (o, Rule::Adam),
            Self::FedYogi(o) => (o, Rule::Yogi),
            Self::FedAdagrad(o) => (o, Rule::Adagrad),
        };
        let delta = averaged.delta_from(global)?;
        let n = delta.values().len();
        if state.m.len() != n || state.v.len() != n {
            if !state.m.is_empty() {
                return Err(ProtocolError::ShapeMismatch {
                    expected: n,
                    got: state.m.len(),
                });
            }
            state.m = vec![0.0; n];
            state.v = vec![o.tau * o.tau; n];
        }
        let mut next = Vec::with_capacity(n);
        for (i, (&x, &d)) in global.values().iter().zip(delta.values()).enumerate() {
            let d = f64::from(d);
            let m = o.beta1 * state.m[i] + (1.0 - o.beta1) * d;
            let v_prev = state.v[i];
            let v = match rule {
                Rule::Adagrad => v_prev + d * d,
                Rule::Adam => o.beta2 * v_prev + (1.0 - o.beta2) * d * d,
                Rule::Yogi => v_prev - (1.0 - o.beta2) * d * d * (v_prev - d * d).signum(),
            };
            state.m[i] = m;
            state.v[i] = v;
            next.push((f64::from(x) + o.server_lr * m / (v.sqrt() + o.tau)) as f32);
        }
        FlatAdapter::new(global.spec().clone(), next)
    }
}

#[derive(Clone, Copy)]
enum Rule {
    Adam,
    Yogi,
    Adagrad,
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

    /// Two rounds from x₀ = (0, 1) with mean deltas (0.1, −0.2) then (0.3, 0), η = 0.1,
    /// β₁ = 0.9, β₂ = 0.99, τ = 0.001; expected values computed by hand from Algorithm 2.
    #[test]
    fn two_rounds_of_each_server_optimizer_match_the_hand_computed_values() {
        let o = ServerOptimizer {
            server_lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        };
        let cases = [
            (
                Strategy::FedAdam(o),
                [0.210_052_361_369_672_87, 0.818_849_809_654_537_6],
                [0.000_999_980_1, 0.000_396_980_1],
            ),
            (
                Strategy::FedYogi(o),
                [0.209_989_233_963_748_52, 0.819_262_648_252_242_6],
                [0.001_001, 0.000_401],
            ),
            (
                Strategy::FedAdagrad(o),
                [0.022_194_444_526_417_51, 0.981_094_762_501_484_3],
                [0.100_001, 0.040_001],
            ),
        ];
        for (s, want_x, want_v) in cases {
            s.validate().unwrap();
            let mut state = OptimizerState::default();
            let mut x = adapter([0.0, 1.0]);
            for d in [[0.1f32, -0.2], [0.3, 0.0]] {
                let avg = adapter([x.values()[0] + d[0], x.values()[1] + d[1]]);
                x = s.step(&mut state, &x, avg).unwrap();
            }
            for i in 0..2 {
                assert!(
                    (f64::from(x.values()[i]) - want_x[i]).abs() < 1e-6,
                    "{}: x[{i}] = {} vs {}",
                    s.name(),
                    x.values()[i],
                    want_x[i]
                );
                assert!(
                    (state.v[i] - want_v[i]).abs() < 1e-7,
                    "{}: v {:?}",
                    s.name(),
                    state.v
                );
            }
            assert!((state.m[0] - 0.039).abs() < 1e-7 && (state.m[1] + 0.018).abs() < 1e-7);
        }
    }

    #[test]
    fn fed_avg_is_the_average_and_names_parse() {
        let avg = adapter([0.5, 0.25]);
        let mut st = OptimizerState::default();
        let got = Strategy::FedAvg
            .step(&mut st, &adapter([0.0, 0.0]), avg.clone())
            .unwrap();
        assert_eq!(got, avg);
        assert!(st.m.is_empty());
        for (n, want) in [
            ("fed-avg", "fed-avg"),
            ("fedadam", "fed-adam"),
            ("FedYogi", "fed-yogi"),
            ("fed-adagrad", "fed-adagrad"),
        ] {
            assert_eq!(Strategy::from_name(n).unwrap().name(), want);
        }
        assert!(Strategy::from_name("krum").is_err());
        let bad = Strategy::FedAdam(ServerOptimizer {
            beta1: 1.0,
            ..Default::default()
        });
        assert!(bad.validate().is_err());
        // TOML spelling: a table with the name and the parameters
        let s: Strategy = serde_json::from_str(r#"{"name":"fed-adam","server_lr":0.05}"#).unwrap();
        assert_eq!(
            s,
            Strategy::FedAdam(ServerOptimizer {
                server_lr: 0.05,
                ..Default::default()
            })
        );
    }
}
