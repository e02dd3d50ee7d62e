//! Sweep files: a task, fixed training settings, and a grid of values whose product is the list
//! of sweep points (runs).
//!
//! ```toml
//! name = "privacy-utility"
//! [task]
//! name = "bcw"
//! partition = "dirichlet"
//! alpha = 1.0
//! clients = 10
//! [train]
//! local_steps = 10
//! batch_size = 16
//! learning_rate = 0.01
//! [grid]
//! epsilon = [1.0, 4.0, inf]      # TOML's inf: no DP
//! seed = [1, 2, 3]
//! ```
//! Grid keys with one value can be omitted (defaults below). Points are enumerated in a fixed
//! order (the grid keys in the order of [`Grid`]'s fields, `seed` innermost), so point `i` is
//! the same on every machine — which is what `--shard i/N` relies on.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::SimError;
use crate::task::TaskConfig;

/// Fixed local-training settings of every run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    /// Local optimizer steps per round.
    #[serde(default = "d_steps")]
    pub local_steps: u32,
    /// Batch size (expected batch size under DP's Poisson sampling).
    #[serde(default = "d_batch")]
    pub batch_size: u32,
    /// Adam learning rate without DP.
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    /// Adam learning rate under DP (default: `learning_rate`).
    #[serde(default)]
    pub dp_learning_rate: Option<f64>,
    /// Privacy accountant for calibration and the reported ε.
    #[serde(default)]
    pub accountant: fedlora_dp::Accountant,
    /// The clients' local optimizer: `adam` (default) or `sgd`.
    #[serde(default, skip_serializing_if = "is_adam")]
    pub optimizer: fedlora_protocol::LocalOptimizer,
    /// Settings of client-level DP points (`grid.privacy = ["central", "distributed:16"]`).
    #[serde(default, skip_serializing_if = "ClientDpSettings::is_default")]
    pub client_dp: ClientDpSettings,
    /// Async runs with example-level DP: each device's participation bound P, the local runs
    /// its DP plan covers (σ is calibrated for P runs; its ledger declines after them), as
    /// `fedlora coordinator --dp-participations`. Default: every version (`rounds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp_participations: Option<u64>,
}

/// Settings shared by every client-level DP point of a sweep.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientDpSettings {
    /// c: colluding or Sybil clients the distributed noise tolerates.
    pub collusion: usize,
    /// `min_clients` as a share of the expected clients per round (rounded up).
    pub min_fraction: f64,
    /// Failure probability of one conditional rounding attempt.
    pub beta: f64,
    /// Standard deviations of modulus headroom against wrap-around.
    pub headroom: f64,
}

impl Default for ClientDpSettings {
    fn default() -> Self {
        Self {
            collusion: 0,
            min_fraction: 0.8,
            beta: (-0.5f64).exp(),
            headroom: 3.0,
        }
    }
}

impl ClientDpSettings {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// What a point's ε protects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privacy {
    /// One training example, DP-SGD on each client (the default).
    Example,
    /// One client, Gaussian noise added by the coordinator.
    ClientCentral,
    /// One client, Skellam noise shares added by the clients inside secure aggregation, with
    /// this many bits per coordinate.
    ClientDistributed(u8),
}

impl Privacy {
    /// Parses `example`, `central` or `distributed:BITS`.
    pub fn parse(s: &str) -> Result<Self, SimError> {
        match s.split_once(':') {
            None if s == "example" => Ok(Privacy::Example),
            None if s == "central" => Ok(Privacy::ClientCentral),
            Some(("distributed", b)) => match b.parse::<u8>() {
                Ok(bits) if (4..=62).contains(&bits) => Ok(Privacy::ClientDistributed(bits)),
                _ => Err(SimError::Config(format!(
                    "privacy `{s}`: bits must be an integer in 4..=62"
                ))),
            },
            _ => Err(SimError::Config(format!(
                "privacy `{s}`: example, central or distributed:BITS"
            ))),
        }
    }

    /// Whether the unit of privacy is the client.
    pub fn client_level(self) -> bool {
        !matches!(self, Privacy::Example)
    }
}

fn is_adam(o: &fedlora_protocol::LocalOptimizer) -> bool {
    *o == fedlora_protocol::LocalOptimizer::Adam
}

fn d_steps() -> u32 {
    10
}
fn d_batch() -> u32 {
    16
}
fn d_lr() -> f64 {
    0.01
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            local_steps: d_steps(),
            batch_size: d_batch(),
            learning_rate: d_lr(),
            dp_learning_rate: None,
            accountant: Default::default(),
            optimizer: Default::default(),
            client_dp: ClientDpSettings::default(),
            dp_participations: None,
        }
    }
}

/// Injected failures (in-process runs only), each an independent per-(round, client) draw from
/// the run's seed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Probability that a selected client drops out of a round (in a secure round: after it
    /// shared its keys, the case the masking protocol must recover from).
    #[serde(default)]
    pub dropout: f64,
    /// Probability that a selected client's upload arrives after the round's deadline (it is
    /// refused as late, like on a real coordinator).
    #[serde(default)]
    pub straggler: f64,
}

/// The grid: every combination of these values is one sweep point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    /// Target ε per client (example-level); `inf` trains without DP.
    #[serde(default = "d_eps")]
    pub epsilon: Vec<f64>,
    /// δ of the DP guarantee.
    #[serde(default = "d_delta")]
    pub delta: Vec<f64>,
    /// Per-example L2 clip norm C.
    #[serde(default = "d_clip")]
    pub clip: Vec<f64>,
    /// Upload codecs by name (`dense`, `f16`, `q4`, `topk:0.05`, `subset:0.125`,
    /// `modular:8:0.25:0.125:64`, …).
    #[serde(default = "d_codec")]
    pub codec: Vec<String>,
    /// LoRA rank.
    #[serde(default = "d_rank")]
    pub rank: Vec<usize>,
    /// Clients sampled per round.
    #[serde(default = "d_cpr")]
    pub clients_per_round: Vec<usize>,
    /// Rounds.
    #[serde(default = "d_rounds")]
    pub rounds: Vec<u64>,
    /// Secure aggregation (needs a modular codec; other combinations are skipped, and so are
    /// strategies that need individual updates).
    #[serde(default = "d_secure")]
    pub secure_aggregation: Vec<bool>,
    /// Seeds (repetitions): client sampling, data split, batch sampling, noise.
    #[serde(default = "d_seed")]
    pub seed: Vec<u64>,
    /// Aggregation strategies, as `name` or `name:value` (`fed-avg`, `fed-prox:0.01`,
    /// `fed-adam:0.03`, `median`, `trimmed-mean:0.2`; see
    /// [`fedlora_protocol::strategy::StrategyConfig::parse`]).
    #[serde(default = "d_strategy")]
    pub strategy: Vec<String>,
    /// Clients' largest LoRA ranks: `uniform` (everyone trains `rank`), or a list such as
    /// `2,4,8,16` that client i takes entry i mod len of (capped at `rank`, the global rank).
    #[serde(default = "d_client_ranks")]
    pub client_ranks: Vec<String>,
    /// Local steps per round, overriding `train.local_steps` (hyper-parameter searches).
    #[serde(default)]
    pub local_steps: Vec<u32>,
    /// Batch size, overriding `train.batch_size`.
    #[serde(default)]
    pub batch_size: Vec<u32>,
    /// Learning rate under DP, overriding `train.dp_learning_rate`.
    #[serde(default)]
    pub dp_learning_rate: Vec<f64>,
    /// What ε protects: `example` (DP-SGD, the default), `central` or `distributed:BITS`
    /// (client-level DP-FedAvg; see [`Privacy`]). Client-level points sample clients by Poisson
    /// sampling, clip whole updates to `clip`, and are skipped at ε = inf (the non-private run
    /// is the baseline); distributed points run secure aggregation with the Skellam codec
    /// whatever `codec` and `secure_aggregation` say.
    #[serde(default)]
    pub privacy: Vec<String>,
    /// Runs in simulated time only (a `[fleet]` table): "sync" and/or "async" (FedBuff).
    #[serde(default = "d_mode")]
    pub mode: Vec<String>,
    /// Sync in simulated time: devices sampled per round as a multiple of clients_per_round,
    /// the round keeping the first clients_per_round to finish (1: none).
    #[serde(default = "d_over")]
    pub over_selection: Vec<f64>,
    /// Async: updates per version, K.
    #[serde(default = "d_buffer")]
    pub buffer: Vec<usize>,
    /// Async: staleness weights (`constant`, `poly:A`, `hinge:A,B`).
    #[serde(default = "d_staleness")]
    pub staleness: Vec<String>,
    /// Async: the most devices training at once (0: no limit).
    #[serde(default = "d_concurrency")]
    pub concurrency: Vec<usize>,
}

fn d_mode() -> Vec<String> {
    vec!["sync".into()]
}
fn d_over() -> Vec<f64> {
    vec![1.0]
}
fn d_buffer() -> Vec<usize> {
    vec![10]
}
fn d_staleness() -> Vec<String> {
    vec!["poly:0.5".into()]
}
fn d_concurrency() -> Vec<usize> {
    vec![0]
}

impl Grid {
    /// A grid of one default point for every key: what struct literals fill the keys they do
    /// not set from.
    pub fn default_keys() -> Self {
        Self {
            epsilon: d_eps(),
            delta: d_delta(),
            clip: d_clip(),
            codec: d_codec(),
            rank: d_rank(),
            clients_per_round: d_cpr(),
            rounds: d_rounds(),
            secure_aggregation: d_secure(),
            seed: d_seed(),
            strategy: d_strategy(),
            client_ranks: d_client_ranks(),
            local_steps: Vec::new(),
            batch_size: Vec::new(),
            dp_learning_rate: Vec::new(),
            privacy: Vec::new(),
            mode: d_mode(),
            over_selection: d_over(),
            buffer: d_buffer(),
            staleness: d_staleness(),
            concurrency: d_concurrency(),
        }
    }

    /// The schedule keys' defaults (sync, no over-selection).
    pub fn default_schedules() -> crate::schedule::ScheduleGrid {
        crate::schedule::ScheduleGrid {
            mode: d_mode(),
            over_selection: d_over(),
            buffer: d_buffer(),
            staleness: d_staleness(),
            concurrency: d_concurrency(),
        }
    }

    /// The schedule keys.
    pub fn schedules(&self) -> crate::schedule::ScheduleGrid {
        crate::schedule::ScheduleGrid {
            mode: self.mode.clone(),
            over_selection: self.over_selection.clone(),
            buffer: self.buffer.clone(),
            staleness: self.staleness.clone(),
            concurrency: self.concurrency.clone(),
        }
    }
}

fn d_eps() -> Vec<f64> {
    vec![f64::INFINITY]
}
fn d_delta() -> Vec<f64> {
    vec![1e-5]
}
fn d_clip() -> Vec<f64> {
    vec![1.0]
}
fn d_codec() -> Vec<String> {
    vec!["dense".into()]
}
fn d_rank() -> Vec<usize> {
    vec![4]
}
fn d_cpr() -> Vec<usize> {
    vec![5]
}
fn d_rounds() -> Vec<u64> {
    vec![10]
}
fn d_secure() -> Vec<bool> {
    vec![false]
}
fn d_seed() -> Vec<u64> {
    vec![1]
}
fn d_strategy() -> Vec<String> {
    vec![DEFAULT_STRATEGY.into()]
}
fn d_client_ranks() -> Vec<String> {
    vec![UNIFORM_RANKS.into()]
}

/// The default strategy's grid value.
pub const DEFAULT_STRATEGY: &str = "fed-avg";
/// The grid value of uniform client ranks.
pub const UNIFORM_RANKS: &str = "uniform";

/// `list` as overrides, or one "no override" when it is empty.
fn opt_list<T: Copy>(list: &[T]) -> Vec<Option<T>> {
    if list.is_empty() {
        vec![None]
    } else {
        list.iter().copied().map(Some).collect()
    }
}

fn is_default_strategy(s: &str) -> bool {
    s == DEFAULT_STRATEGY
}
fn is_uniform_ranks(s: &str) -> bool {
    s == UNIFORM_RANKS
}

/// The largest rank of each client of a population of `clients` under `client_ranks` (`None`:
/// the global rank for everyone).
pub fn parse_client_ranks(text: &str, clients: usize) -> Result<Option<Vec<usize>>, SimError> {
    if text == UNIFORM_RANKS {
        return Ok(None);
    }
    let list: Vec<usize> = text
        .split(',')
        .map(|r| r.trim().parse::<usize>().ok().filter(|r| *r > 0))
        .collect::<Option<_>>()
        .ok_or_else(|| {
            SimError::Config(format!(
                "grid.client_ranks `{text}`: `uniform` or a list of positive ranks like `2,4,8`"
            ))
        })?;
    if list.is_empty() {
        return Err(SimError::Config("grid.client_ranks: empty list".into()));
    }
    Ok(Some((0..clients).map(|i| list[i % list.len()]).collect()))
}

/// A sweep file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    /// Name used in the report.
    pub name: String,
    /// The question the sweep answers (shown in the report).
    #[serde(default)]
    pub question: String,
    /// Task and data split.
    pub task: TaskConfig,
    /// Local training.
    #[serde(default)]
    pub train: TrainSettings,
    /// Injected failures.
    #[serde(default)]
    pub faults: Faults,
    /// The grid.
    pub grid: Grid,
    /// Evaluate the global adapter every this many rounds (and always after the last), ≥ 1.
    #[serde(default = "d_eval_every")]
    pub eval_every: u64,
    /// Device behaviour: with it, every point runs in simulated wall time (see
    /// [`crate::timed`]) under each of the grid's schedules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<crate::fleet::FleetConfig>,
}

fn d_eval_every() -> u64 {
    1
}

/// One sweep point: a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Position in the sweep's enumeration.
    pub index: usize,
    /// Target ε (`inf`: no DP).
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
    /// Clip norm.
    pub clip: f64,
    /// Codec name.
    pub codec: String,
    /// LoRA rank.
    pub rank: usize,
    /// Clients per round.
    pub clients_per_round: usize,
    /// Rounds.
    pub rounds: u64,
    /// Secure aggregation on.
    pub secure_aggregation: bool,
    /// Seed.
    pub seed: u64,
    /// Aggregation strategy (grid syntax); left out of the run key when it is the default.
    #[serde(
        default = "default_strategy",
        skip_serializing_if = "is_default_strategy"
    )]
    pub strategy: String,
    /// Clients' largest ranks (grid syntax); left out of the run key when uniform.
    #[serde(default = "default_uniform", skip_serializing_if = "is_uniform_ranks")]
    pub client_ranks: String,
    /// Local steps override (`None`: the sweep's `train.local_steps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_steps: Option<u32>,
    /// Batch size override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    /// DP learning rate override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp_learning_rate: Option<f64>,
    /// What ε protects (grid syntax; `None`: one example).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<String>,
    /// The schedule of a run in simulated time (`None`: round by round, no fleet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<crate::schedule::Schedule>,
}

fn default_strategy() -> String {
    DEFAULT_STRATEGY.into()
}
fn default_uniform() -> String {
    UNIFORM_RANKS.into()
}

impl Point {
    /// Whether this point trains with example-level DP (DP-SGD).
    pub fn dp(&self) -> bool {
        self.epsilon.is_finite() && !self.privacy().client_level()
    }

    /// What this point's ε protects.
    pub fn privacy(&self) -> Privacy {
        self.privacy
            .as_deref()
            .and_then(|p| Privacy::parse(p).ok())
            .unwrap_or(Privacy::Example)
    }

    /// The setting without the seed (points that differ only in seed are repetitions).
    pub fn setting(&self) -> String {
        let mut extra = String::new();
        if !is_default_strategy(&self.strategy) {
            extra.push_str(&format!(" strategy={}", self.strategy));
        }
        if !is_uniform_ranks(&self.client_ranks) {
            extra.push_str(&format!(" client_ranks={}", self.client_ranks));
        }
        if let Some(v) = self.local_steps {
            extra.push_str(&format!(" steps={v}"));
        }
        if let Some(v) = self.batch_size {
            extra.push_str(&format!(" batch={v}"));
        }
        if let Some(v) = self.dp_learning_rate {
            extra.push_str(&format!(" dp_lr={v}"));
        }
        if let Some(v) = &self.privacy {
            extra.push_str(&format!(" privacy={v}"));
        }
        if let Some(s) = &self.schedule {
            extra.push_str(&format!(" schedule={}", s.label()));
        }
        format!(
            "eps={} delta={} clip={} codec={} rank={} k={} rounds={} secagg={}{extra}",
            fmt_eps(self.epsilon),
            self.delta,
            self.clip,
            self.codec,
            self.rank,
            self.clients_per_round,
            self.rounds,
            self.secure_aggregation
        )
    }
}

/// ε as written in CSVs and reports (`inf` without DP).
pub fn fmt_eps(e: f64) -> String {
    if e.is_finite() {
        format!("{e}")
    } else {
        "inf".into()
    }
}

impl SweepConfig {
    /// Parses a sweep file.
    pub fn from_toml(text: &str) -> Result<Self, SimError> {
        let c: SweepConfig =
            toml::from_str(text).map_err(|e| SimError::Config(format!("sweep file: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    /// Reads a sweep file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, SimError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SimError::Config(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text)
    }

    /// Checks values that no point could run with.
    pub fn validate(&self) -> Result<(), SimError> {
        let bad = |m: String| Err(SimError::Config(m));
        let g = &self.grid;
        let lists = [
            ("epsilon", g.epsilon.len()),
            ("delta", g.delta.len()),
            ("clip", g.clip.len()),
            ("codec", g.codec.len()),
            ("rank", g.rank.len()),
            ("clients_per_round", g.clients_per_round.len()),
            ("rounds", g.rounds.len()),
            ("secure_aggregation", g.secure_aggregation.len()),
            ("seed", g.seed.len()),
            ("strategy", g.strategy.len()),
            ("client_ranks", g.client_ranks.len()),
        ];
        if let Some((k, _)) = lists.iter().find(|(_, n)| *n == 0) {
            return bad(format!("grid.{k} is empty"));
        }
        if g.epsilon.iter().any(|e| e.is_nan() || *e <= 0.0) {
            return bad("grid.epsilon: every ε must be positive (inf for no DP)".into());
        }
        if g.delta.iter().any(|d| !(*d > 0.0 && *d < 1.0)) {
            return bad("grid.delta: every δ must be in (0, 1)".into());
        }
        if g.clip.iter().any(|c| !(*c > 0.0 && c.is_finite())) {
            return bad("grid.clip: every clip norm must be positive and finite".into());
        }
        for c in &g.codec {
            fedlora_protocol::Codec::from_name(c)
                .and_then(|c| c.validate())
                .map_err(|e| SimError::Config(format!("grid.codec `{c}`: {e}")))?;
        }
        for st in &g.strategy {
            fedlora_protocol::strategy::StrategyConfig::parse(st)
                .map_err(|e| SimError::Config(format!("grid.strategy `{st}`: {e}")))?;
        }
        for cr in &g.client_ranks {
            parse_client_ranks(cr, self.task.clients)?;
        }
        for p in &g.privacy {
            Privacy::parse(p)?;
        }
        let c = &self.train.client_dp;
        if !(c.min_fraction > 0.0 && c.min_fraction <= 1.0) {
            return bad("train.client_dp.min_fraction must be in (0, 1]".into());
        }
        if !(c.beta > 0.0 && c.beta < 1.0 && c.headroom > 0.0) {
            return bad("train.client_dp: beta in (0, 1) and headroom > 0".into());
        }
        if g.local_steps.contains(&0) || g.batch_size.contains(&0) {
            return bad("grid.local_steps and grid.batch_size must be positive".into());
        }
        if g.dp_learning_rate
            .iter()
            .any(|l| !(*l > 0.0 && l.is_finite()))
        {
            return bad("grid.dp_learning_rate must be positive".into());
        }
        if g.rank.contains(&0) || g.rounds.contains(&0) {
            return bad("grid.rank and grid.rounds must be at least 1".into());
        }
        for &k in &g.clients_per_round {
            if k == 0 || k > self.task.clients {
                return bad(format!(
                    "grid.clients_per_round {k} must be in 1..={} (task.clients)",
                    self.task.clients
                ));
            }
        }
        if self.eval_every == 0 {
            return bad("eval_every must be at least 1".into());
        }
        match &self.fleet {
            Some(f) => {
                f.validate()?;
                if self.faults.dropout != 0.0 || self.faults.straggler != 0.0 {
                    return bad(
                        "[faults] does not apply to runs in simulated time: [fleet] decides who \
                         is online and how long work takes"
                            .into(),
                    );
                }
                if g.client_ranks.iter().any(|c| !is_uniform_ranks(c)) {
                    return bad("runs in simulated time train the uniform rank".into());
                }
                if g.schedules().expand()?.is_empty() {
                    return bad("grid.mode is empty".into());
                }
            }
            None if g.schedules() != Grid::default_schedules() => {
                return bad(
                    "grid.mode, over_selection, buffer, staleness and concurrency need a \
                     [fleet] table (runs in simulated time)"
                        .into(),
                )
            }
            None => {}
        }
        for (name, p) in [
            ("dropout", self.faults.dropout),
            ("straggler", self.faults.straggler),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("faults.{name} must be in [0, 1)"));
            }
        }
        if self.points().0.is_empty() {
            return bad("no runnable point: secure aggregation needs a modular codec".into());
        }
        Ok(())
    }

    /// Every runnable point in enumeration order, and the combinations skipped (secure
    /// aggregation with a codec whose sum cannot be unmasked, or with a strategy that needs
    /// individual updates). The order is the grid keys' in [`Grid`]'s field order, the first
    /// outermost, then `strategy` and `client_ranks` outside them all (so sweeps without those
    /// keys keep their numbering), `seed` innermost.
    pub fn points(&self) -> (Vec<Point>, Vec<String>) {
        let g = &self.grid;
        // one index per grid key, odometer style, the last key fastest
        // optional keys: an empty list is one "no override"
        let steps: Vec<Option<u32>> = opt_list(&g.local_steps);
        let batches: Vec<Option<u32>> = opt_list(&g.batch_size);
        let lrs: Vec<Option<f64>> = opt_list(&g.dp_learning_rate);
        let privacies: Vec<Option<String>> = if g.privacy.is_empty() {
            vec![None]
        } else {
            g.privacy.iter().cloned().map(Some).collect()
        };
        let sizes = [
            privacies.len(),
            steps.len(),
            batches.len(),
            lrs.len(),
            g.strategy.len(),
            g.client_ranks.len(),
            g.epsilon.len(),
            g.delta.len(),
            g.clip.len(),
            g.codec.len(),
            g.rank.len(),
            g.clients_per_round.len(),
            g.rounds.len(),
            g.secure_aggregation.len(),
            g.seed.len(),
        ];
        let total: usize = sizes.iter().product();
        let mut out = Vec::new();
        let mut skipped = Vec::new();
        for flat in 0..total {
            let mut ii = [0usize; 15];
            let mut rest = flat;
            for k in (0..sizes.len()).rev() {
                ii[k] = rest % sizes[k];
                rest /= sizes[k];
            }
            let privacy = privacies[ii[0]].clone();
            let i = &ii[1..];
            let mut p = Point {
                privacy,
                index: out.len(),
                local_steps: steps[i[0]],
                batch_size: batches[i[1]],
                dp_learning_rate: lrs[i[2]],
                strategy: g.strategy[i[3]].clone(),
                client_ranks: g.client_ranks[i[4]].clone(),
                epsilon: g.epsilon[i[5]],
                delta: g.delta[i[6]],
                clip: g.clip[i[7]],
                codec: g.codec[i[8]].clone(),
                rank: g.rank[i[9]],
                clients_per_round: g.clients_per_round[i[10]],
                rounds: g.rounds[i[11]],
                secure_aggregation: g.secure_aggregation[i[12]],
                seed: g.seed[i[13]],
                schedule: None,
            };
            match p.privacy() {
                Privacy::ClientDistributed(bits) => {
                    p.codec = format!("skellam-{bits}");
                    p.secure_aggregation = true;
                }
                Privacy::ClientCentral => p.secure_aggregation = false,
                Privacy::Example => {}
            }
            if p.privacy().client_level() && !p.epsilon.is_finite() {
                continue; // the non-private baseline runs once, as `example` at ε = inf
            }
            if out
                .iter()
                .any(|o: &Point| o.setting() == p.setting() && o.seed == p.seed)
            {
                continue; // forced codec or secure flag made it a repeat
            }
            let summable = p.codec.starts_with("skellam-")
                || fedlora_protocol::Codec::from_name(&p.codec).is_ok_and(|c| c.is_summable());
            let individual = fedlora_protocol::strategy::StrategyConfig::parse(&p.strategy)
                .is_ok_and(|s| s.needs_individual_updates());
            // central mode adds its noise to a plaintext sum
            let central_summable = p.privacy() == Privacy::ClientCentral && summable;
            if (p.secure_aggregation && (!summable || individual))
                || (p.privacy().client_level() && individual)
                || central_summable
            {
                skipped.push(p.setting());
            } else {
                out.push(p);
            }
        }
        skipped.dedup();
        // in simulated time, each point under every schedule (checked in validate)
        if self.fleet.is_some() {
            let schedules = g.schedules().expand().unwrap_or_default();
            let mut timed = Vec::new();
            for p in out {
                // async mode weighs plaintext updates by staleness, which an integer
                // (summable) payload does not allow: only inside secure cohorts
                let summable =
                    fedlora_protocol::Codec::from_name(&p.codec).is_ok_and(|c| c.is_summable());
                for s in &schedules {
                    if s.is_async() && summable && !p.secure_aggregation {
                        skipped.push(format!("{} under {}", p.setting(), s.label()));
                        continue;
                    }
                    timed.push(Point {
                        schedule: Some(s.clone()),
                        ..p.clone()
                    });
                }
            }
            out = timed
                .into_iter()
                .enumerate()
                .map(|(i, p)| Point { index: i, ..p })
                .collect();
            // (one entry per setting, not per seed)
            let mut seen = std::collections::BTreeSet::new();
            skipped.retain(|s| seen.insert(s.clone()));
        }
        (out, skipped)
    }

    /// A hash of everything that decides results (the task, training, faults, evaluation
    /// cadence, the fleet): shards and resumed runs must agree on it.
    pub fn fingerprint(&self) -> String {
        let mut json =
            serde_json::to_vec(&(&self.task, &self.train, &self.faults, self.eval_every))
                .expect("serializable");
        // device behaviour decides a run in simulated time (absent: the fingerprint of before)
        if let Some(f) = &self.fleet {
            json.extend(serde_json::to_vec(f).expect("serializable"));
        }
        hex::encode(&Sha256::digest(json)[..8])
    }

    /// The key of `point`'s result file: its index and a hash of its values and the sweep's
    /// fingerprint (so a changed sweep never reuses a stale result).
    pub fn run_key(&self, point: &Point) -> String {
        let json = serde_json::to_vec(point).expect("serializable");
        let mut h = Sha256::new();
        h.update(self.fingerprint());
        h.update(json);
        format!("run{:04}-{}", point.index, hex::encode(&h.finalize()[..6]))
    }
}

/// `i/N`: run the points whose index is `i` mod `N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// This shard, `0 ≤ index < count`.
    pub index: usize,
    /// Number of shards.
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = SimError;
    fn from_str(s: &str) -> Result<Self, SimError> {
        let bad = || SimError::Config(format!("shard `{s}`: expected i/N with 0 ≤ i < N"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

impl Shard {
    /// Whether this shard runs `point`.
    pub fn runs(&self, point: &Point) -> bool {
        point.index % self.count == self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SWEEP: &str = r#"
name = "t"
[task]
name = "bcw"
partition = "iid"
clients = 6
[grid]
epsilon = [1.0, inf]
codec = ["dense", "modular:8:0.25:0.125:64"]
secure_aggregation = [false, true]
seed = [1, 2]
"#;

    #[test]
    fn client_level_points_run_once_at_each_finite_epsilon_and_distributed_ones_securely() {
        let text = SWEEP.replace(
            "[grid]",
            "[grid]\nprivacy = [\"example\", \"central\", \"distributed:16\"]",
        );
        let c = SweepConfig::from_toml(&text).unwrap();
        let (points, _) = c.points();
        let client: Vec<&Point> = points
            .iter()
            .filter(|p| p.privacy().client_level())
            .collect();
        // ε = inf is the example-level baseline only; codec and secure flag are forced, so the
        // grid's 3 codec × secure combinations collapse to one point per (mode, ε, seed)
        assert!(client.iter().all(|p| p.epsilon == 1.0));
        assert_eq!(client.len(), 2 * 2);
        for p in &client {
            match p.privacy() {
                Privacy::ClientDistributed(16) => {
                    assert!(p.secure_aggregation && p.codec == "skellam-16")
                }
                Privacy::ClientCentral => assert!(!p.secure_aggregation),
                other => panic!("{other:?}"),
            }
            assert!(!p.dp(), "client-level points train without DP-SGD");
        }
        // the example-level points are the ones a grid without `privacy` has, keys unchanged
        let plain = SweepConfig::from_toml(SWEEP).unwrap();
        let (before, _) = plain.points();
        let example: Vec<&Point> = points
            .iter()
            .filter(|p| !p.privacy().client_level())
            .collect();
        assert_eq!(example.len(), before.len());
        assert!(Privacy::parse("distributed:2").is_err() && Privacy::parse("local").is_err());
        let bad = SWEEP.replace("[grid]", "[grid]\nprivacy = [\"distributed\"]");
        assert!(SweepConfig::from_toml(&bad).is_err());
    }

    #[test]
    fn grid_expands_in_order_and_skips_secure_without_a_summable_codec() {
        let c = SweepConfig::from_toml(SWEEP).unwrap();
        let (points, skipped) = c.points();
        // 2 ε × (dense: secure off only; modular: on and off) × 2 seeds
        assert_eq!(points.len(), 2 * 3 * 2);
        assert_eq!(skipped.len(), 2);
        assert!(points.iter().enumerate().all(|(i, p)| p.index == i));
        assert_eq!(points[0].epsilon, 1.0);
        assert!(points.last().unwrap().epsilon.is_infinite());
        assert_eq!((points[0].seed, points[1].seed), (1, 2));
        let keys: std::collections::BTreeSet<_> = points.iter().map(|p| c.run_key(p)).collect();
        assert_eq!(keys.len(), points.len());
    }

    /// In simulated time an async schedule runs a summable (integer) codec only inside secure
    /// cohorts: the coordinator refuses a modular payload it would have to weigh itself, so
    /// the sweep skips that combination instead of failing on it.
    #[test]
    fn async_schedules_skip_a_summable_codec_without_secure_aggregation() {
        let toml = r#"
name = "s"
[task]
name = "bcw"
partition = "iid"
clients = 20
[fleet]
online = 0.5
[grid]
epsilon = [inf]
codec = ["dense", "modular"]
secure_aggregation = [false, true]
clients_per_round = [4]
seed = [1, 2]
mode = ["async"]
buffer = [4]
"#;
        let c = SweepConfig::from_toml(toml).unwrap();
        let (points, skipped) = c.points();
        let kinds: std::collections::BTreeSet<_> = points
            .iter()
            .map(|p| (p.codec.clone(), p.secure_aggregation))
            .collect();
        assert_eq!(
            kinds,
            [("dense".to_string(), false), ("modular".to_string(), true)].into()
        );
        assert_eq!(points.len(), 4);
        assert!(
            skipped
                .iter()
                .any(|s| s.contains("modular") && s.contains("fedbuff")),
            "{skipped:?}"
        );
    }

    #[test]
    fn shards_partition_the_points() {
        let c = SweepConfig::from_toml(SWEEP).unwrap();
        let (points, _) = c.points();
        let shards: Vec<Shard> = (0..3).map(|i| format!("{i}/3").parse().unwrap()).collect();
        for p in &points {
            assert_eq!(shards.iter().filter(|s| s.runs(p)).count(), 1);
        }
        assert!("3/3".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
    }

    /// Every committed config parses and validates, and each sweep file has a point to run:
    /// the configs that README and the result summaries tell users to rerun. A file with an
    /// `[audit]` table is an audit file (`fedlora audit`).
    #[test]
    fn every_committed_config_parses_and_each_sweep_has_points() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let (mut sweeps, mut audits) = (0, 0);
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let table: toml::Table =
                toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if table.contains_key("audit") {
                crate::audit::AuditConfig::from_toml(&text)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                audits += 1;
            } else {
                let c = SweepConfig::from_toml(&text)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(!c.points().0.is_empty(), "{}: no points", path.display());
                sweeps += 1;
            }
        }
        assert!(
            sweeps >= 19 && audits >= 2,
            "{sweeps} sweep and {audits} audit files under {}",
            dir.display()
        );
    }

    #[test]
    fn bad_values_are_refused_with_the_key() {
        for (from, to, key) in [
            ("seed = [1, 2]", "seed = []", "grid.seed"),
            ("epsilon = [1.0, inf]", "epsilon = [0.0]", "grid.epsilon"),
            ("codec = [\"dense\",", "codec = [\"nope\",", "grid.codec"),
            ("clients = 6", "clients = 6\nfoo = 1", "unknown field"),
        ] {
            let e = SweepConfig::from_toml(&SWEEP.replace(from, to))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{e}");
        }
    }
}
