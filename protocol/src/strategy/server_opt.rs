//! Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2),
//! with `Δₜ` the round's aggregated delta (no bias correction, `v₋₁ = τ²`):
//! ```text
//! mₜ = β₁·mₜ₋₁ + (1 − β₁)·Δₜ
//! vₜ = vₜ₋₁ + Δₜ²                              (FedAdagrad)
//! vₜ = β₂·vₜ₋₁ + (1 − β₂)·Δₜ²                  (FedAdam)
//! vₜ = vₜ₋₁ − (1 − β₂)·Δₜ²·sign(vₜ₋₁ − Δₜ²)    (FedYogi)
//! xₜ₊₁ = xₜ + η·mₜ / (√vₜ + τ)
//! ```
//! They see only the round's mean delta, so they work unchanged under secure aggregation and
//! DP. The moments are state that must survive a restart exactly ([`OptimizerState`]); the
//! coordinator persists them beside each checkpoint.

use serde::{Deserialize, Serialize};

use super::{Contribution, Strategy};
use crate::adapter::FlatAdapter;
use crate::error::ProtocolError;

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

impl ServerOptimizer {
    /// Refuses hyper-parameters out of range.
    pub fn validate(&self, name: &str) -> Result<(), ProtocolError> {
        let bad = |m: &str| Err(ProtocolError::Config(format!("strategy {name}: {m}")));
        if !(self.server_lr.is_finite() && self.server_lr > 0.0) {
            return bad("server_lr must be positive");
        }
        if !((0.0..1.0).contains(&self.beta1) && (0.0..1.0).contains(&self.beta2)) {
            return bad("beta1 and beta2 must be in [0, 1)");
        }
        if !(self.tau.is_finite() && self.tau > 0.0) {
            return bad("tau must be positive");
        }
        Ok(())
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

/// Which second-moment rule a server optimizer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// FedAdam.
    Adam,
    /// FedYogi.
    Yogi,
    /// FedAdagrad (β₂ unused).
    Adagrad,
}

/// FedAdam, FedYogi or FedAdagrad: FedAvg's aggregate, then the optimizer step on the server.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ServerOpt {
    /// The second-moment rule.
    pub rule: Rule,
    /// Its hyper-parameters.
    pub params: ServerOptimizer,
}

impl Strategy for ServerOpt {
    fn name(&self) -> &'static str {
        match self.rule {
            Rule::Adam => "fed-adam",
            Rule::Yogi => "fed-yogi",
            Rule::Adagrad => "fed-adagrad",
        }
    }

    fn combine(
        &self,
        full_rank: usize,
        updates: &[Contribution<'_>],
    ) -> Result<FlatAdapter, ProtocolError> {
        super::weighted_mean(full_rank, updates)
    }

    fn next_global(
        &self,
        state: &mut OptimizerState,
        global: &FlatAdapter,
        delta: &FlatAdapter,
    ) -> Result<FlatAdapter, ProtocolError> {
        global.check_same_spec(delta.spec())?;
        let o = &self.params;
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
            let v = match self.rule {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{AdapterSpec, TensorSpec};
    use crate::strategy::StrategyConfig;

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
                StrategyConfig::FedAdam(o),
                [0.210_052_361_369_672_87, 0.818_849_809_654_537_6],
                [0.000_999_980_1, 0.000_396_980_1],
            ),
            (
                StrategyConfig::FedYogi(o),
                [0.209_989_233_963_748_52, 0.819_262_648_252_242_6],
                [0.001_001, 0.000_401],
            ),
            (
                StrategyConfig::FedAdagrad(o),
                [0.022_194_444_526_417_51, 0.981_094_762_501_484_3],
                [0.100_001, 0.040_001],
            ),
        ];
        for (cfg, want_x, want_v) in cases {
            cfg.validate().unwrap();
            let s = cfg.build();
            let mut state = OptimizerState::default();
            let mut x = adapter([0.0, 1.0]);
            for d in [[0.1f32, -0.2], [0.3, 0.0]] {
                x = s.next_global(&mut state, &x, &adapter(d)).unwrap();
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
}
