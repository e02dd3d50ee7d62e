//! The client's own privacy budget: its target (ε, δ) for the whole campaign, the σ it
//! calibrated from the coordinator's plan, and a ledger that survives restarts.
//!
//! The client, not the coordinator, decides: it calibrates σ once from the first plan it is
//! offered (q = expected batch / its number of examples, steps = local steps × planned rounds)
//! and declines any round whose steps would take it past its target. Spending is recorded (and
//! flushed to the state directory) **before** training starts, and never refunded — also when
//! the round later fails or the client crashes before uploading.

use std::path::Path;

use fedlora_dp::{DpEvent, PrivacyLedger};
use fedlora_protocol::{DpPlan, TrainConfig};
use serde::{Deserialize, Serialize};

use crate::dp_sgd::DpSgdConfig;
use crate::error::ClientError;

/// A client's privacy target for the whole campaign (example-level, add/remove one window).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacyTarget {
    /// Target ε.
    pub epsilon: f64,
    /// δ; keep it well below 1/(number of examples).
    pub delta: f64,
    /// Accountant for calibration and the ledger (RDP by default; PLD is tighter).
    #[serde(default)]
    pub accountant: fedlora_dp::Accountant,
}

/// The σ calibrated from a plan, kept so later rounds use the same noise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibratedPlan {
    /// The plan it was calibrated for.
    pub plan: DpPlan,
    /// Local steps per round.
    pub local_steps: u32,
    /// Expected batch size.
    pub expected_batch: u32,
    /// Poisson rate q.
    pub q: f64,
    /// Noise multiplier σ.
    pub sigma: f64,
}

/// A round the budget allows: what to run and the event to record.
#[derive(Clone, Debug)]
pub struct Approved {
    /// DP-SGD settings for the trainer.
    pub dp: DpSgdConfig,
    /// The event the round's steps amount to.
    pub event: DpEvent,
}

/// The budget of one client, persisted in sled under its state directory.
pub struct PrivacyState {
    target: PrivacyTarget,
    ledger: PrivacyLedger,
    plan: Option<CalibratedPlan>,
    db: Option<sled::Db>,
}

fn storage(e: impl std::fmt::Display) -> ClientError {
    ClientError::Storage(e.to_string())
}

impl PrivacyState {
    /// Opens the budget stored under `state_dir` (or a fresh one in memory when `None`). The
    /// ledger's entries persist across restarts; `target` is the client's current target.
    pub fn open(state_dir: Option<&Path>, target: PrivacyTarget) -> Result<Self, ClientError> {
        let mut ledger = PrivacyLedger::new(target.epsilon, target.delta)
            .map_err(|e| ClientError::Config(e.to_string()))?;
        ledger.accountant = target.accountant;
        let mut plan = None;
        let db = match state_dir {
            Some(d) => {
                let db = sled::open(d.join("privacy")).map_err(storage)?;
                if let Some(b) = db.get("ledger").map_err(storage)? {
                    let stored: PrivacyLedger = serde_json::from_slice(&b).map_err(storage)?;
                    ledger.entries = stored.entries;
                }
                if let Some(b) = db.get("plan").map_err(storage)? {
                    plan = Some(serde_json::from_slice(&b).map_err(storage)?);
                }
                Some(db)
            }
            None => None,
        };
        Ok(Self {
            target,
            ledger,
            plan,
            db,
        })
    }

    fn persist(&self) -> Result<(), ClientError> {
        if let Some(db) = &self.db {
            db.insert("ledger", serde_json::to_vec(&self.ledger).map_err(storage)?)
                .map_err(storage)?;
            if let Some(p) = &self.plan {
                db.insert("plan", serde_json::to_vec(p).map_err(storage)?)
                    .map_err(storage)?;
            }
            db.flush().map_err(storage)?;
        }
        Ok(())
    }

    /// ε spent so far.
    pub fn epsilon_spent(&self) -> Result<f64, ClientError> {
        self.ledger
            .epsilon_spent()
            .map_err(|e| ClientError::Config(e.to_string()))
    }

    /// The calibrated plan, once a round was offered.
    pub fn plan(&self) -> Option<&CalibratedPlan> {
        self.plan.as_ref()
    }

    /// Decides whether the client can train a round of `cfg` under `plan` on `n_examples`
    /// windows. `Err(reason)` means decline.
    pub fn approve(
        &mut self,
        plan: &DpPlan,
        cfg: &TrainConfig,
        n_examples: usize,
    ) -> Result<Approved, String> {
        if self.plan.is_none() {
            let q = (f64::from(cfg.batch_size) / n_examples.max(1) as f64).min(1.0);
            let steps = u64::from(cfg.local_steps) * plan.planned_rounds;
            let sigma = self
                .target
                .accountant
                .noise_multiplier(q, steps, self.target.delta, self.target.epsilon)
                .map_err(|e| format!("cannot calibrate noise for this plan: {e}"))?;
            self.plan = Some(CalibratedPlan {
                plan: plan.clone(),
                local_steps: cfg.local_steps,
                expected_batch: cfg.batch_size,
                q,
                sigma,
            });
        }
        let p = self.plan.as_ref().expect("set above");
        if &p.plan != plan || p.local_steps != cfg.local_steps || p.expected_batch != cfg.batch_size
        {
            return Err("the coordinator changed the DP plan this client calibrated for".into());
        }
        let event = DpEvent::dp_sgd(p.q, p.sigma, u64::from(cfg.local_steps));
        match self.ledger.would_exceed(&event) {
            Ok(false) => {}
            Ok(true) => {
                return Err(format!(
                    "privacy budget: this round would exceed ε = {} (spent {:.4})",
                    self.target.epsilon,
                    self.ledger.epsilon_spent().unwrap_or(f64::NAN)
                ))
            }
            Err(e) => return Err(e.to_string()),
        }
        Ok(Approved {
            dp: DpSgdConfig {
                clip_norm: plan.clip_norm,
                noise_multiplier: p.sigma,
                expected_batch: cfg.batch_size as usize,
                max_chunk: 64,
            },
            event,
        })
    }

    /// Records the approved round's spending and flushes it; returns ε spent after it.
    pub fn spend(&mut self, round: u64, approved: &Approved) -> Result<f64, ClientError> {
        let eps = self
            .ledger
            .spend(round, approved.event.clone())
            .map_err(|e| ClientError::Config(e.to_string()))?;
        self.persist()?;
        Ok(eps)
    }
}

/// What a client's budget decides for an offered round.
#[derive(Clone, Debug)]
pub enum RoundDecision {
    /// Train: under DP-SGD with these settings (the round's spending is already recorded and
    /// flushed, `eps` is ε spent after it), or without DP.
    Train {
        /// DP-SGD settings; `None` for a round without a DP plan.
        dp: Option<DpSgdConfig>,
        /// ε spent including this round (DP rounds).
        eps: Option<f64>,
    },
    /// Decline the round, with the reason.
    Decline(String),
}

/// Decides whether a client with `privacy` (its budget, or `None` without a privacy target)
/// trains a round of `cfg` on `n_examples` examples. A client with a target joins only DP
/// rounds, a client without one only non-DP rounds; a DP round is approved only within the
/// target and its spending is recorded (and flushed) **before** this returns. The device SDK
/// and the simulation harness both decide through this.
pub fn decide_round(
    privacy: Option<&mut PrivacyState>,
    cfg: &TrainConfig,
    n_examples: usize,
    round: u64,
) -> Result<RoundDecision, ClientError> {
    let decline = |m: &str| Ok(RoundDecision::Decline(m.to_string()));
    match (&cfg.dp, privacy) {
        (None, None) => Ok(RoundDecision::Train {
            dp: None,
            eps: None,
        }),
        (Some(_), None) => decline("this client has no privacy target and does not join DP rounds"),
        (None, Some(_)) => decline("this client trains only under DP and the round has no DP plan"),
        (Some(plan), Some(p)) => match p.approve(plan, cfg, n_examples) {
            Ok(a) => {
                let eps = p.spend(round, &a)?;
                Ok(RoundDecision::Train {
                    dp: Some(a.dp),
                    eps: Some(eps),
                })
            }
            Err(reason) => Ok(RoundDecision::Decline(reason)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_the_round_past_the_target_also_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let target = PrivacyTarget {
            epsilon: 1.0,
            delta: 1e-5,
            accountant: Default::default(),
        };
        let plan = DpPlan {
            clip_norm: 1.0,
            planned_rounds: 2,
        };
        let cfg = TrainConfig {
            local_steps: 10,
            batch_size: 16,
            ..Default::default()
        };
        {
            let mut s = PrivacyState::open(Some(dir.path()), target).unwrap();
            for round in 1..=2 {
                let a = s.approve(&plan, &cfg, 400).unwrap();
                let eps = s.spend(round, &a).unwrap();
                assert!(eps <= 1.0);
            }
            assert!(s.approve(&plan, &cfg, 400).is_err());
        }
        let mut s = PrivacyState::open(Some(dir.path()), target).unwrap();
        let spent = s.epsilon_spent().unwrap();
        assert!(spent > 0.9 && spent <= 1.0, "{spent}");
        let reason = s.approve(&plan, &cfg, 400).unwrap_err();
        assert!(reason.contains("privacy budget"), "{reason}");
    }
}
