//! A one-run empirical privacy audit of example-level DP-SGD (Steinke, Nasr and Jagielski
//! 2023), on the simulation harness with the deployment's client code.
//!
//! 1. **Canaries.** `m` canaries are each included with probability ½ by a seeded coin, and the
//!    included ones are dealt round-robin to the clients ([`CanaryKind`]):
//!    - *example* canaries ([`Population::canaries`]: out-of-distribution BCW rows with a random
//!      label, or random byte windows for the LM) go into the clients' training data;
//!    - *Dirac* canaries are examples whose clipped gradient is `C·e_k` at their own adapter
//!      coordinate `k` (white-box; [`fedlora_train::dp_sgd::DpSgdConfig::dirac_canaries`]).
//!      They catch a mechanism with a tenth of its noise, which example canaries do not.
//! 2. **Training.** One federated run, exactly as a sweep point runs it: the clients' ledgers
//!    calibrate σ to the target ε, DP-SGD clips and noises every step.
//! 3. **Scoring.** An example canary's score ([`Score`]) is its loss under the initial adapter
//!    minus its loss under the final global adapter (for BCW the loss is the negated margin
//!    toward its label): an included canary was trained on, so its loss tends to fall further.
//!    A Dirac canary's score is how far its coordinate moved down (initial − final).
//! 4. **Guessing.** The `guesses / 2` highest scores are guessed "in", the `guesses / 2` lowest
//!    "out"; the others are not guessed.
//! 5. **Bound.** [`fedlora_dp::audit::epsilon_lower_bound`] turns the number of correct
//!    guesses into an ε lower bound at the configured confidence.
//!
//! The unit audited is the one the clients claim: one training example, held by one client.
//! The bound can only reveal leakage beyond the reported ε, never certify privacy. It is capped
//! near ln(guesses / 3) at 95 %, about 3.5 with 100 guesses and 5.8 with 1,000. It is also
//! weak unless training can memorise canaries, so a lower bound far below the reported ε is
//! the expected outcome for a correct mechanism on a small task.

use std::time::Instant;

use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::SimError;
use crate::runner::{run_population, RunHooks};
use crate::sweep::{Faults, Grid, Point, SweepConfig, TrainSettings};
use crate::task::{Population, TaskConfig};

/// The audit's own settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    /// Canaries m.
    pub canaries: usize,
    /// Guesses r (half "in" from the top scores, half "out" from the bottom), ≤ m.
    pub guesses: usize,
    /// Confidence of the lower bound, e.g. 0.95.
    #[serde(default = "d_confidence")]
    pub confidence: f64,
    /// Seed of the canaries and of the inclusion coins.
    #[serde(default)]
    pub seed: u64,
    /// How canaries are scored (default `loss`); example canaries only.
    #[serde(default)]
    pub score: Score,
    /// What a canary is (default `example`).
    #[serde(default)]
    pub canary: CanaryKind,
}

/// What a canary is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CanaryKind {
    /// An input example put into a client's training data (an out-of-distribution BCW row with
    /// a random label, or a random byte window), scored by [`Score`]. It only shows leakage
    /// the trained model's behaviour on the canary reveals.
    #[default]
    Example,
    /// A Dirac gradient canary (Steinke, Nasr and Jagielski's white-box setting): an example
    /// whose clipped gradient is `C·e_k` at its own adapter coordinate `k` (distinct per
    /// canary), held by one client and Poisson-sampled at that client's rate q every step like
    /// every example. Its score is how far the final global adapter moved coordinate `k`
    /// against that gradient (initial − final). The ledgers account it as they account any
    /// example, so this tests the clipping, the noise and the accounting directly.
    Dirac,
}

/// How the auditor scores a canary (white-box, after training).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Score {
    /// The drop of the canary's loss from the initial to the final adapter (BCW: of its
    /// negated margin).
    #[default]
    Loss,
    /// The inner product of the adapter's change with the canary's negative loss gradient at
    /// the initial adapter. Weaker than `loss` on both tasks here (the initial `B = 0` makes
    /// the first gradient a poor guide to where training went).
    Gradient,
}

fn d_confidence() -> f64 {
    0.95
}

/// The run being audited: one point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRun {
    /// Target ε of every client (example-level); must be finite.
    pub epsilon: f64,
    /// δ.
    #[serde(default = "d_delta")]
    pub delta: f64,
    /// Per-example clip norm C.
    pub clip: f64,
    /// LoRA rank.
    pub rank: usize,
    /// Clients per round.
    pub clients_per_round: usize,
    /// Rounds.
    pub rounds: u64,
    /// Seed of the run (split, sampling, noise).
    #[serde(default)]
    pub seed: u64,
}

fn d_delta() -> f64 {
    1e-5
}

/// An audit file: the task, the local training, the run, and the audit settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Name used in the report.
    pub name: String,
    /// Task and data split.
    pub task: TaskConfig,
    /// Local training.
    #[serde(default)]
    pub train: TrainSettings,
    /// The audited run.
    pub run: AuditRun,
    /// The audit.
    pub audit: AuditSettings,
}

/// What an audit found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditReport {
    /// The audit's name.
    pub name: String,
    /// The ε lower bound at `confidence`.
    pub epsilon_lower_bound: f64,
    /// The largest ε any client's ledger reported spending (the claim audited).
    pub epsilon_reported: f64,
    /// The clients' target ε.
    pub epsilon_target: f64,
    /// δ of the claim.
    pub delta: f64,
    /// Confidence of the bound.
    pub confidence: f64,
    /// Canaries m.
    pub m: usize,
    /// Canaries included by the coins.
    pub included: usize,
    /// Guesses r.
    pub guesses: usize,
    /// What the canaries were.
    #[serde(default)]
    pub canary: CanaryKind,
    /// Correct guesses v.
    pub correct: usize,
    /// The noise multiplier σ the clients' ledgers recorded (largest over clients).
    pub noise: f64,
    /// The noise multiplier actually applied ÷ the recorded one: 1 in a real audit, 0 only in
    /// the test of a broken mechanism.
    pub noise_scale: f64,
    /// Mean score of included and of excluded canaries (example canaries: loss reduction,
    /// nats; Dirac canaries: the coordinate's decrease, adapter units).
    pub mean_score_in: f64,
    /// See `mean_score_in`.
    pub mean_score_out: f64,
    /// Held-out loss of the initial adapter (before any training); the audit refuses a run
    /// whose `final_loss` is not below it.
    pub initial_loss: f64,
    /// Held-out utility of the final global adapter (loss; accuracy for BCW).
    pub final_loss: f64,
    /// Held-out accuracy, for classification.
    pub final_accuracy: Option<f64>,
    /// Wall time, seconds.
    pub wall_s: f64,
}

impl AuditConfig {
    /// Parses an audit file.
    pub fn from_toml(text: &str) -> Result<Self, SimError> {
        let c: AuditConfig =
            toml::from_str(text).map_err(|e| SimError::Config(format!("audit file: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    /// Checks what no audit could run with.
    pub fn validate(&self) -> Result<(), SimError> {
        let bad = |m: &str| Err(SimError::Config(m.to_string()));
        if !(self.run.epsilon.is_finite() && self.run.epsilon > 0.0) {
            return bad("run.epsilon must be finite and positive: the audit checks a DP claim");
        }
        if self.audit.canaries == 0 || self.audit.guesses == 0 {
            return bad("audit.canaries and audit.guesses must be positive");
        }
        if self.audit.guesses > self.audit.canaries {
            return bad("audit.guesses cannot exceed audit.canaries");
        }
        if !(self.audit.confidence > 0.0 && self.audit.confidence < 1.0) {
            return bad("audit.confidence must be in (0, 1)");
        }
        if self.audit.canary == CanaryKind::Dirac && self.audit.score != Score::Loss {
            return bad("audit.score applies to example canaries: a Dirac canary's score is its coordinate's move");
        }
        self.sweep().validate()
    }

    /// The one-point sweep the audited run is.
    pub fn sweep(&self) -> SweepConfig {
        let r = &self.run;
        SweepConfig {
            name: self.name.clone(),
            question: String::new(),
            task: self.task.clone(),
            train: self.train.clone(),
            faults: Faults::default(),
            grid: Grid {
                epsilon: vec![r.epsilon],
                delta: vec![r.delta],
                clip: vec![r.clip],
                codec: vec!["dense".into()],
                rank: vec![r.rank],
                clients_per_round: vec![r.clients_per_round],
                rounds: vec![r.rounds],
                secure_aggregation: vec![false],
                seed: vec![r.seed],
                strategy: vec![crate::sweep::DEFAULT_STRATEGY.into()],
                client_ranks: vec![crate::sweep::UNIFORM_RANKS.into()],
                local_steps: Vec::new(),
                batch_size: Vec::new(),
                dp_learning_rate: Vec::new(),
                privacy: Vec::new(),
                ..Grid::default_keys()
            },
            eval_every: r.rounds.max(1),
            fleet: None,
        }
    }
}

/// Runs the audit of `config` on `pool`. `noise_scale` multiplies the noise the clients
/// actually add (their ledgers still record the calibrated σ): 1 for a real audit; the test
/// that shows a broken mechanism is caught sets 0 (no noise).
///
/// A run whose final global adapter has a held-out loss no lower than the initial adapter's is
/// refused ([`SimError::AuditDidNotTrain`]): canary scores of a model that did not learn
/// measure the noise, not memorisation, and a low bound from them would prove nothing.
pub fn run_audit(
    config: &AuditConfig,
    pool: &rayon::ThreadPool,
    noise_scale: f64,
) -> Result<AuditReport, SimError> {
    config.validate()?;
    let t0 = Instant::now();
    let sweep = config.sweep();
    let point: Point = sweep
        .points()
        .0
        .into_iter()
        .next()
        .ok_or_else(|| SimError::Config("the audited run has no point".into()))?;
    let a = &config.audit;
    let pop = Population::build(&sweep.task, point.rank, point.seed)?;
    // the coins: each canary is included with probability ½
    let mut coins = rand::rngs::ChaCha20Rng::seed_from_u64(a.seed ^ 0xC0_1A5);
    let included: Vec<bool> = (0..a.canaries).map(|_| coins.random::<bool>()).collect();
    let n = pop.learners.len();
    // the included canaries, dealt round-robin over the clients
    let deal = |k: usize| (included[k]).then_some(k % n);
    let initial_loss = pop.evaluate(&pop.initial)?.loss;
    let (out, scores) = match a.canary {
        CanaryKind::Example => {
            let canaries = pop.canaries(a.canaries, a.seed)?;
            let mut added = vec![Vec::new(); n];
            for (k, c) in canaries.iter().enumerate() {
                if let Some(i) = deal(k) {
                    added[i].push(c.clone());
                }
            }
            let audited = pop.with_canaries(&added)?;
            let hooks = RunHooks {
                noise_scale,
                ..RunHooks::default()
            };
            let (out, global) = run_population(&sweep, &point, &audited, pool, hooks, t0, |_| {})?;
            let scores = match a.score {
                Score::Loss => {
                    let before = pop.canary_losses(&pop.initial, &canaries)?;
                    let after = pop.canary_losses(&global, &canaries)?;
                    before.iter().zip(&after).map(|(b, f)| b - f).collect()
                }
                Score::Gradient => pop.canary_gradient_scores(&pop.initial, &global, &canaries)?,
            };
            (out, scores)
        }
        CanaryKind::Dirac => {
            let len = pop.initial.values().len();
            if a.canaries > len {
                return Err(SimError::Config(format!(
                    "audit.canaries = {} Dirac canaries need as many adapter coordinates; this adapter has {len}",
                    a.canaries
                )));
            }
            let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(a.seed);
            let coords = rand::seq::index::sample(&mut rng, len, a.canaries).into_vec();
            let mut dirac = vec![Vec::new(); n];
            for (k, &c) in coords.iter().enumerate() {
                if let Some(i) = deal(k) {
                    dirac[i].push(c);
                }
            }
            let hooks = RunHooks {
                noise_scale,
                dirac: std::sync::Arc::new(dirac),
            };
            let (out, global) = run_population(&sweep, &point, &pop, pool, hooks, t0, |_| {})?;
            // each canary's gradient is +C at its coordinate, so descent moves it down
            let (v0, v1) = (pop.initial.values(), global.values());
            let scores = coords
                .iter()
                .map(|&c| f64::from(v0[c]) - f64::from(v1[c]))
                .collect();
            (out, scores)
        }
    };
    let (correct, guesses) = guess(&scores, &included, a.guesses);
    let bound = fedlora_dp::audit::epsilon_lower_bound(
        a.canaries,
        guesses,
        correct,
        point.delta,
        a.confidence,
    )?;
    let mean = |inc: bool| {
        let v: Vec<f64> = scores
            .iter()
            .zip(&included)
            .filter(|(_, &i)| i == inc)
            .map(|(s, _)| *s)
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let last = out
        .rows
        .iter()
        .rev()
        .find(|r| r.loss.is_some())
        .ok_or_else(|| SimError::Config("the audited run committed no round".into()))?;
    let final_loss = last.loss.unwrap_or(f64::NAN);
    // a NaN loss compares as `None`: refused too
    if final_loss.partial_cmp(&initial_loss) != Some(std::cmp::Ordering::Less) {
        return Err(SimError::AuditDidNotTrain {
            initial: initial_loss,
            final_loss,
        });
    }
    let reported = out
        .rows
        .iter()
        .filter_map(|r| r.eps_spent)
        .fold(0.0f64, f64::max);
    let noise = out
        .rows
        .iter()
        .filter_map(|r| r.sigma)
        .fold(0.0f64, f64::max);
    Ok(AuditReport {
        name: config.name.clone(),
        epsilon_lower_bound: bound,
        epsilon_reported: reported,
        epsilon_target: point.epsilon,
        delta: point.delta,
        confidence: a.confidence,
        m: a.canaries,
        included: included.iter().filter(|&&i| i).count(),
        guesses,
        canary: a.canary,
        correct,
        noise,
        noise_scale,
        mean_score_in: mean(true),
        mean_score_out: mean(false),
        initial_loss,
        final_loss,
        final_accuracy: last.accuracy,
        wall_s: t0.elapsed().as_secs_f64(),
    })
}

/// Guesses "in" for the `r / 2` highest scores and "out" for the `r − r / 2` lowest (ties
/// broken by index); returns (correct, guesses).
pub fn guess(scores: &[f64], included: &[bool], r: usize) -> (usize, usize) {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&i, &j| scores[j].total_cmp(&scores[i]).then(i.cmp(&j)));
    let r = r.min(scores.len());
    let top = r / 2;
    let bottom = r - top;
    let mut correct = order[..top].iter().filter(|&&i| included[i]).count();
    correct += order[scores.len() - bottom..]
        .iter()
        .filter(|&&i| !included[i])
        .count();
    (correct, r)
}

/// The audit report as Markdown.
pub fn markdown(config: &AuditConfig, r: &AuditReport) -> String {
    format!(
        "# Privacy audit: {name}\n\n\
         One-run audit (Steinke, Nasr and Jagielski 2023) of example-level DP-SGD on the \
         `{task}` task, with the deployment's client code in the simulation harness.\n\n\
         | | |\n|---|---|\n\
         | ε reported (largest client ledger) | {rep:.4} |\n\
         | ε target | {tgt} |\n\
         | δ | {delta} |\n\
         | **ε lower bound ({conf:.0} % confidence)** | **{lb:.4}** |\n\
         | canaries m / included | {m} / {inc} |\n\
         | guesses r / correct v | {g} / {v} ({pct:.1} %) |\n\
         | noise multiplier σ (ledger) | {sigma:.4} |\n\
         | noise actually added ÷ the ledger's (1 unless the mechanism is broken on purpose) | {scale} |\n\
         | mean score, included / excluded canaries | {sin:.5} / {sout:.5} {unit} |\n\
         | held-out loss, initial → final{acc_h} | {loss0:.4} → {loss:.4}{acc} |\n\
         | wall time | {wall:.1} s |\n\n\
         Clients: {clients}, {k} per round, {rounds} rounds of {steps} local steps (expected \
         batch {batch}), clip {clip}, rank {rank}; {what} The bound must not exceed the reported ε for a correct mechanism; it \
         is capped near ln(r / 3) ≈ {cap:.2} at 95 %.\n",
        name = r.name,
        task = serde_json::to_value(config.task.name)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        rep = r.epsilon_reported,
        tgt = r.epsilon_target,
        delta = r.delta,
        conf = 100.0 * r.confidence,
        lb = r.epsilon_lower_bound,
        m = r.m,
        inc = r.included,
        g = r.guesses,
        v = r.correct,
        pct = 100.0 * r.correct as f64 / r.guesses.max(1) as f64,
        sigma = r.noise,
        scale = r.noise_scale,
        unit = match r.canary {
            CanaryKind::Example => "(loss drop, nats)",
            CanaryKind::Dirac => "(the coordinate's decrease)",
        },
        what = match r.canary {
            CanaryKind::Example => "example canaries dealt round-robin into the clients' training data.",
            CanaryKind::Dirac => "Dirac gradient canaries (each an example whose clipped gradient is C on its own adapter coordinate, sampled like every example) dealt round-robin to the clients.",
        },
        sin = r.mean_score_in,
        sout = r.mean_score_out,
        acc_h = if r.final_accuracy.is_some() {
            " / accuracy"
        } else {
            ""
        },
        loss0 = r.initial_loss,
        loss = r.final_loss,
        acc = r
            .final_accuracy
            .map(|a| format!(" / {a:.3}"))
            .unwrap_or_default(),
        wall = r.wall_s,
        clients = config.task.clients,
        k = config.run.clients_per_round,
        rounds = config.run.rounds,
        steps = config.train.local_steps,
        batch = config.train.batch_size,
        clip = config.run.clip,
        rank = config.run.rank,
        cap = (r.guesses as f64 / 3.0).ln(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guesses_take_the_top_as_in_and_the_bottom_as_out() {
        let scores = [0.9, 0.1, 0.5, -0.2, 0.8, 0.0];
        let inc = [true, false, true, false, false, true];
        // top 2: indices 0 (in ✓), 4 (out ✗); bottom 2: 3 (out ✓), 5 (in ✗)
        assert_eq!(guess(&scores, &inc, 4), (2, 4));
        assert_eq!(guess(&scores, &inc, 100), (4, 6));
    }
}
