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
use fedlora_protocol::{DeclineReason, DpPlan, TrainConfig};
use serde::{Deserialize, Serialize};

use crate::error::ClientError;
use fedlora_train::dp_sgd::DpSgdConfig;

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
    /// `Some(L)`: opt in to releasing the training loss, through the Gaussian mechanism on
    /// per-example losses clipped to [0, L] (nats per byte) with the gradient's σ; each step
    /// then counts as one Gaussian mechanism of multiplier σ/√2, so σ is calibrated √2 times
    /// larger for the same target. `None` (the default): no loss leaves the device.
    #[serde(default)]
    pub loss_clip: Option<f64>,
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
    /// Poisson rate q = expected batch / n, what the ledger records per step.
    pub q: f64,
    /// Noise multiplier σ of the gradient (and, with loss release, of the loss) mechanism.
    pub sigma: f64,
    /// Whether σ was calibrated for steps that also release the loss (then every step is
    /// recorded with multiplier σ/√2).
    #[serde(default)]
    pub releases_loss: bool,
    /// The number of local examples n that q was computed from. A round on fewer examples
    /// would sample at a higher rate than the ledger records, so it is declined.
    #[serde(default)]
    pub n_examples: usize,
}

impl CalibratedPlan {
    /// The noise multiplier one step is recorded with: σ, or σ/√2 when the step releases the
    /// loss too (two Gaussian mechanisms of multiplier σ on the same batch; see
    /// [`fedlora_dp::noisy_clipped_sum`]).
    pub fn event_sigma(&self) -> f64 {
        if self.releases_loss {
            self.sigma / std::f64::consts::SQRT_2
        } else {
            self.sigma
        }
    }
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
    /// Opens the budget stored under `state_dir`: the ledger's entries and the calibrated plan
    /// persist across restarts (flushed before every round trains); `target` is the client's
    /// current target. What a device uses: a ledger that a restart could reset would let it
    /// spend its budget again.
    pub fn open(state_dir: &Path, target: PrivacyTarget) -> Result<Self, ClientError> {
        Self::open_inner(Some(state_dir), target)
    }

    /// A budget that lives in memory only, for one process: the simulation harness's virtual
    /// clients, whose whole campaign runs in one process. Not for devices (see [`Self::open`]).
    pub fn in_memory(target: PrivacyTarget) -> Result<Self, ClientError> {
        Self::open_inner(None, target)
    }

    fn open_inner(state_dir: Option<&Path>, target: PrivacyTarget) -> Result<Self, ClientError> {
        if let Some(l) = target.loss_clip {
            if !(l.is_finite() && l > 0.0) {
                return Err(ClientError::Config(format!(
                    "the loss clip bound must be positive and finite, not {l}"
                )));
            }
        }
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
    ///
    /// The trainer samples each example with probability `expected_batch / n_examples`. The
    /// ledger records the plan's q, so a round on fewer examples than the plan was calibrated
    /// for (a higher real rate) is declined ([`DeclineReason::DataShrank`]); more examples
    /// mean a lower real rate, which the recorded q over-covers.
    pub fn approve(
        &mut self,
        plan: &DpPlan,
        cfg: &TrainConfig,
        n_examples: usize,
    ) -> Result<Approved, DeclineReason> {
        if self.plan.is_none() {
            let q = (f64::from(cfg.batch_size) / n_examples.max(1) as f64).min(1.0);
            let steps = u64::from(cfg.local_steps) * plan.planned_rounds;
            let event_sigma = self
                .target
                .accountant
                .noise_multiplier(q, steps, self.target.delta, self.target.epsilon)
                .map_err(|e| {
                    tracing::warn!(error = %e, "cannot calibrate noise for this plan");
                    DeclineReason::CannotCalibrate
                })?;
            let releases_loss = self.target.loss_clip.is_some();
            self.plan = Some(CalibratedPlan {
                plan: plan.clone(),
                local_steps: cfg.local_steps,
                expected_batch: cfg.batch_size,
                q,
                sigma: if releases_loss {
                    event_sigma * std::f64::consts::SQRT_2
                } else {
                    event_sigma
                },
                releases_loss,
                n_examples,
            });
        }
        let p = self.plan.as_ref().ok_or(DeclineReason::CannotCalibrate)?;
        if &p.plan != plan
            || p.local_steps != cfg.local_steps
            || p.expected_batch != cfg.batch_size
            || p.releases_loss != self.target.loss_clip.is_some()
        {
            return Err(DeclineReason::PlanChanged);
        }
        let real_q = (f64::from(cfg.batch_size) / n_examples.max(1) as f64).min(1.0);
        if n_examples < p.n_examples || real_q > p.q {
            tracing::warn!(
                calibrated_for = p.n_examples,
                now = n_examples,
                "fewer local examples than the DP plan was calibrated for; declining"
            );
            return Err(DeclineReason::DataShrank);
        }
        let event = DpEvent::dp_sgd(p.q, p.event_sigma(), u64::from(cfg.local_steps));
        match self.ledger.would_exceed(&event) {
            Ok(false) => {}
            Ok(true) | Err(_) => return Err(DeclineReason::Budget),
        }
        Ok(Approved {
            dp: DpSgdConfig {
                clip_norm: plan.clip_norm,
                noise_multiplier: p.sigma,
                expected_batch: cfg.batch_size as usize,
                max_chunk: 64,
                loss_clip: self.target.loss_clip,
                dirac_canaries: Vec::new(),
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
    Decline(DeclineReason),
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
    let decline = |r: DeclineReason| Ok(RoundDecision::Decline(r));
    match (&cfg.dp, privacy) {
        (None, None) => Ok(RoundDecision::Train {
            dp: None,
            eps: None,
        }),
        (Some(_), None) => decline(DeclineReason::NoPrivacyTarget),
        (None, Some(_)) => decline(DeclineReason::DpRequired),
        // an example count would leak n: a DP client never uses it as its weight
        (Some(_), Some(_)) if cfg.weighting != fedlora_protocol::Weighting::Uniform => {
            decline(DeclineReason::WeightingNotPrivate)
        }
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

    /// An RDP target of `epsilon` at δ = 1e-5.
    fn target(epsilon: f64, loss_clip: Option<f64>) -> PrivacyTarget {
        PrivacyTarget {
            epsilon,
            delta: 1e-5,
            accountant: Default::default(),
            loss_clip,
        }
    }

    /// A DP round config of `local_steps` steps of 16 under clip 1 for `planned_rounds`.
    fn dp_round(local_steps: u32, planned_rounds: u64) -> (DpPlan, TrainConfig) {
        let plan = DpPlan {
            clip_norm: 1.0,
            planned_rounds,
        };
        let cfg = TrainConfig {
            local_steps,
            batch_size: 16,
            weighting: fedlora_protocol::Weighting::Uniform,
            dp: Some(plan.clone()),
            ..Default::default()
        };
        (plan, cfg)
    }

    #[test]
    fn refuses_the_round_past_the_target_also_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let target = target(1.0, None);
        let (plan, cfg) = dp_round(10, 2);
        {
            let mut s = PrivacyState::open(dir.path(), target).unwrap();
            for round in 1..=2 {
                let a = s.approve(&plan, &cfg, 400).unwrap();
                let eps = s.spend(round, &a).unwrap();
                assert!(eps <= 1.0);
            }
            assert!(s.approve(&plan, &cfg, 400).is_err());
        }
        let mut s = PrivacyState::open(dir.path(), target).unwrap();
        let spent = s.epsilon_spent().unwrap();
        assert!(spent > 0.9 && spent <= 1.0, "{spent}");
        let reason = s.approve(&plan, &cfg, 400).unwrap_err();
        assert_eq!(reason, DeclineReason::Budget);
    }

    #[test]
    fn a_client_restarted_with_fewer_examples_declines_instead_of_under_recording_q() {
        let dir = tempfile::tempdir().unwrap();
        let target = target(4.0, None);
        let (plan, cfg) = dp_round(5, 4);
        {
            let mut s = PrivacyState::open(dir.path(), target).unwrap();
            let a = s.approve(&plan, &cfg, 400).unwrap();
            s.spend(1, &a).unwrap();
            assert!((s.plan().unwrap().q - 16.0 / 400.0).abs() < 1e-15);
        }
        // restarted on a smaller data file: 200 examples would be sampled at q = 0.08 > 0.04
        let mut s = PrivacyState::open(dir.path(), target).unwrap();
        assert_eq!(
            s.approve(&plan, &cfg, 200).unwrap_err(),
            DeclineReason::DataShrank
        );
        let mut p = Some(&mut s);
        let d = decide_round(p.take(), &cfg, 200, 2).unwrap();
        assert!(matches!(
            d,
            RoundDecision::Decline(DeclineReason::DataShrank)
        ));
        // nothing was spent for the declined round
        let spent_before = s.epsilon_spent().unwrap();
        // more examples: the recorded q (0.04) is above the real rate, and the round trains
        let a = s.approve(&plan, &cfg, 800).unwrap();
        assert!((s.plan().unwrap().q - 0.04).abs() < 1e-15);
        assert!(s.spend(2, &a).unwrap() > spent_before);
    }

    #[test]
    fn a_dp_client_refuses_example_count_weighting() {
        let mut s = PrivacyState::in_memory(target(4.0, None)).unwrap();
        let (_, mut cfg) = dp_round(5, 4);
        cfg.weighting = fedlora_protocol::Weighting::ExampleCount;
        let d = decide_round(Some(&mut s), &cfg, 400, 1).unwrap();
        assert!(matches!(
            d,
            RoundDecision::Decline(DeclineReason::WeightingNotPrivate)
        ));
        assert_eq!(s.epsilon_spent().unwrap(), 0.0);
    }

    #[test]
    fn releasing_the_loss_is_charged_as_a_second_gaussian_on_each_step() {
        let (plan, cfg) = dp_round(5, 4);
        let target = |loss_clip| target(2.0, loss_clip);
        let mut quiet = PrivacyState::in_memory(target(None)).unwrap();
        let a = quiet.approve(&plan, &cfg, 400).unwrap();
        assert_eq!(a.dp.loss_clip, None);
        let mut loud = PrivacyState::in_memory(target(Some(4.0))).unwrap();
        let b = loud.approve(&plan, &cfg, 400).unwrap();
        assert_eq!(b.dp.loss_clip, Some(4.0));
        // σ is √2 larger, and the ledger records the joint mechanism, multiplier σ/√2
        let (sq, sl) = (quiet.plan().unwrap().sigma, loud.plan().unwrap().sigma);
        assert!(
            (sl / sq - std::f64::consts::SQRT_2).abs() < 1e-9,
            "{sq} {sl}"
        );
        assert_eq!(b.event, DpEvent::dp_sgd(16.0 / 400.0, sq, 5));
        // every planned round fits the target, exactly as without the release
        for round in 1..=4 {
            let b = loud.approve(&plan, &cfg, 400).unwrap();
            assert!(loud.spend(round, &b).unwrap() <= 2.0 + 1e-9);
        }
        assert_eq!(
            loud.approve(&plan, &cfg, 400).unwrap_err(),
            DeclineReason::Budget
        );
        // a bad bound is refused
        assert!(PrivacyState::in_memory(target(Some(f64::NAN))).is_err());
    }
}
