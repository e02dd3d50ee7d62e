//! What a run produces: one row per (run, round) and one summary per run, as flat records that
//! are written to CSV. Columns ending in `_s` are wall-clock timings; everything else is a
//! deterministic function of the sweep file and the seed.

use serde::{Deserialize, Serialize};

use crate::sweep::{fmt_eps, Point, SweepConfig};

/// Declares a record struct that starts with the run's configuration columns (the csv crate
/// cannot flatten a nested struct, so the columns are spelled out once here and pasted into
/// [`RunColumns`], [`RoundRow`] and [`RunSummary`]), with `set_columns` to fill them.
macro_rules! with_run_columns {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        pub struct $name {
            /// Run key (index and hash; the result file's name).
            pub run: String,
            /// Task.
            pub task: String,
            /// Data split.
            pub partition: String,
            /// Population size.
            pub clients: usize,
            /// Target ε (`inf`: no DP).
            pub epsilon: String,
            /// δ.
            pub delta: f64,
            /// Clip norm.
            pub clip: f64,
            /// Codec.
            pub codec: String,
            /// LoRA rank.
            pub rank: usize,
            /// Clients per round.
            pub clients_per_round: usize,
            /// Planned rounds.
            pub rounds: u64,
            /// Secure aggregation.
            pub secure_aggregation: bool,
            /// Seed.
            pub seed: u64,
            /// `in-process` or `quic`.
            pub transport: String,
            /// Aggregation strategy (grid syntax).
            #[serde(default)]
            pub strategy: String,
            /// Clients' largest ranks (`uniform` or a list).
            #[serde(default)]
            pub client_ranks: String,
            /// Local steps per round.
            #[serde(default)]
            pub local_steps: u32,
            /// Batch size (expected under DP).
            #[serde(default)]
            pub batch_size: u32,
            /// Learning rate the clients trained with.
            #[serde(default)]
            pub learning_rate: f64,
            /// What ε protects: `example`, `central` or `distributed:BITS` (client-level).
            #[serde(default)]
            pub privacy: String,
            /// The schedule of a run in simulated time (empty: round by round).
            #[serde(default)]
            pub schedule: String,
            $($(#[$fm])* pub $field: $ty,)*
        }

        impl $name {
            /// Copies the configuration columns from `c`.
            pub fn set_columns(&mut self, c: &RunColumns) {
                self.run.clone_from(&c.run);
                self.task.clone_from(&c.task);
                self.partition.clone_from(&c.partition);
                self.clients = c.clients;
                self.epsilon.clone_from(&c.epsilon);
                self.delta = c.delta;
                self.clip = c.clip;
                self.codec.clone_from(&c.codec);
                self.rank = c.rank;
                self.clients_per_round = c.clients_per_round;
                self.rounds = c.rounds;
                self.secure_aggregation = c.secure_aggregation;
                self.seed = c.seed;
                self.transport.clone_from(&c.transport);
                self.strategy.clone_from(&c.strategy);
                self.client_ranks.clone_from(&c.client_ranks);
                self.local_steps = c.local_steps;
                self.batch_size = c.batch_size;
                self.learning_rate = c.learning_rate;
                self.privacy.clone_from(&c.privacy);
                self.schedule.clone_from(&c.schedule);
            }
        }
    };
}

with_run_columns! {
    /// The configuration columns shared by round rows and summaries.
    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    pub struct RunColumns {}
}

impl RunColumns {
    /// The columns of `point` in `sweep`.
    pub fn new(sweep: &SweepConfig, point: &Point, transport: &str) -> Self {
        Self {
            run: sweep.run_key(point),
            task: serde_name(&sweep.task.name),
            partition: serde_name(&sweep.task.partition),
            clients: sweep.task.clients,
            epsilon: fmt_eps(point.epsilon),
            delta: point.delta,
            clip: point.clip,
            codec: point.codec.clone(),
            rank: point.rank,
            clients_per_round: point.clients_per_round,
            rounds: point.rounds,
            secure_aggregation: point.secure_aggregation,
            seed: point.seed,
            transport: transport.to_string(),
            strategy: point.strategy.clone(),
            client_ranks: point.client_ranks.clone(),
            local_steps: point.local_steps.unwrap_or(sweep.train.local_steps),
            batch_size: point.batch_size.unwrap_or(sweep.train.batch_size),
            learning_rate: if point.dp() {
                point
                    .dp_learning_rate
                    .or(sweep.train.dp_learning_rate)
                    .unwrap_or(sweep.train.learning_rate)
            } else {
                sweep.train.learning_rate
            },
            privacy: point.privacy.clone().unwrap_or_else(|| "example".into()),
            schedule: point
                .schedule
                .as_ref()
                .map_or_else(String::new, |s| s.label()),
        }
    }
}

/// The serde (kebab-case) name of a unit enum value.
fn serde_name<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

with_run_columns! {
/// One round of one run (round 0 is the initial adapter).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundRow {
    /// Round id (0: before the first round).
    pub round: u64,
    /// Global version after the round.
    pub version: u64,
    /// `initial`, `committed` or `failed`.
    pub status: String,
    /// Clients selected.
    pub selected: usize,
    /// Uploads aggregated.
    pub aggregated: usize,
    /// Selected clients that dropped out (injected).
    pub dropped: usize,
    /// Uploads refused as late (injected stragglers).
    pub late: usize,
    /// Clients that declined (privacy budget).
    pub declined: usize,
    /// Held-out loss of the global after the round (empty when not evaluated).
    pub loss: Option<f64>,
    /// Held-out accuracy (classification tasks).
    pub accuracy: Option<f64>,
    /// Mean training loss of the round's participants.
    pub train_loss: Option<f64>,
    /// Largest ε any client has spent so far (empty without DP).
    pub eps_spent: Option<f64>,
    /// Client-level DP: the largest ε (b) of any client (against the coordinator; inf in
    /// central mode). `eps_spent` is then ε (a) of the models released so far.
    #[serde(default)]
    pub eps_coordinator: Option<f64>,
    /// That client's Poisson rate q.
    pub q: Option<f64>,
    /// That client's noise multiplier σ.
    pub sigma: Option<f64>,
    /// That client's DP-SGD steps so far.
    pub dp_steps: Option<u64>,
    /// Wire bytes sent by clients this round (upload frames, secure-aggregation messages).
    pub bytes_up: u64,
    /// Wire bytes sent to clients this round (round offers with the global adapter).
    pub bytes_down: u64,
    /// Of `bytes_up`: what lower-rank clients' zero padding to the global rank cost (their
    /// encoded padded delta minus the same codec's encoding of their rank slice).
    #[serde(default)]
    pub pad_bytes_up: u64,
    /// Distributed DP: coordinates of the unmasked sum within 1 % of the modulus' half range
    /// (where wrap-around may have happened; post-processing, so utility only).
    #[serde(default)]
    pub near_wrap: Option<u64>,
    /// Round wall time (training, encoding, aggregation; not evaluation), seconds.
    pub wall_s: f64,
    /// Summed client training time of the round, seconds.
    pub compute_s: f64,
    /// Simulated wall time at the end of this round or version, seconds (runs in simulated
    /// time only).
    #[serde(default)]
    pub sim_seconds: Option<f64>,
    /// Mean staleness of the updates a version counted, versions (async runs only).
    #[serde(default)]
    pub staleness: Option<f64>,
    /// Evaluation time, seconds.
    pub eval_s: f64,
}
}

impl RoundRow {
    /// A row of `cols` for `round`, with zeroed round values.
    pub fn new(cols: &RunColumns, round: u64) -> Self {
        let mut r = Self {
            round,
            ..Default::default()
        };
        r.set_columns(cols);
        r
    }
}

with_run_columns! {
/// One run's outcome.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Rounds committed.
    pub committed: u64,
    /// Rounds failed.
    pub failed: u64,
    /// Held-out loss of the initial adapter.
    pub initial_loss: f64,
    /// Held-out loss of the final global.
    pub final_loss: f64,
    /// Held-out accuracy of the initial adapter.
    pub initial_accuracy: Option<f64>,
    /// Held-out accuracy of the final global.
    pub final_accuracy: Option<f64>,
    /// Largest ε spent by any client (empty without DP).
    pub eps_spent: Option<f64>,
    /// Noise multiplier of that client.
    pub sigma: Option<f64>,
    /// Total upload bytes.
    pub bytes_up: u64,
    /// Total download bytes.
    pub bytes_down: u64,
    /// Setup time (data, model, clients) before the first round, seconds.
    pub startup_s: f64,
    /// Total round wall time, seconds.
    pub wall_s: f64,
    /// Total client training time, seconds (in-process runs).
    pub compute_s: f64,
    /// Worker threads that trained clients (an execution setting, not part of the results).
    pub threads: usize,
}
}

impl RunSummary {
    /// Overhead: round wall time over the ideal, summed client training time / threads (1.0 is
    /// perfect scaling; `None` where training time was not measured).
    pub fn overhead(&self) -> Option<f64> {
        (self.compute_s > 0.0 && self.threads > 0)
            .then(|| self.wall_s / (self.compute_s / self.threads as f64))
    }

    /// The summary of `rows` (round 0 first, evaluated at least at the start and the end).
    pub fn from_rows(cols: &RunColumns, rows: &[RoundRow], startup_s: f64, threads: usize) -> Self {
        let first = rows.first();
        let last_eval = rows.iter().rev().find(|r| r.loss.is_some());
        let last_eps = rows.iter().rev().find(|r| r.eps_spent.is_some());
        let mut s = Self {
            committed: rows.iter().filter(|r| r.status == "committed").count() as u64,
            failed: rows.iter().filter(|r| r.status == "failed").count() as u64,
            initial_loss: first.and_then(|r| r.loss).unwrap_or(f64::NAN),
            final_loss: last_eval.and_then(|r| r.loss).unwrap_or(f64::NAN),
            initial_accuracy: first.and_then(|r| r.accuracy),
            final_accuracy: last_eval.and_then(|r| r.accuracy),
            eps_spent: last_eps.and_then(|r| r.eps_spent),
            sigma: last_eps.and_then(|r| r.sigma),
            bytes_up: rows.iter().map(|r| r.bytes_up).sum(),
            bytes_down: rows.iter().map(|r| r.bytes_down).sum(),
            startup_s,
            wall_s: rows.iter().map(|r| r.wall_s).sum(),
            compute_s: rows.iter().map(|r| r.compute_s).sum(),
            threads,
            ..Default::default()
        };
        s.set_columns(cols);
        s
    }
}

/// What one run produced.
#[derive(Clone, Debug, PartialEq)]
pub struct RunOutput {
    /// One row per round (round 0 first).
    pub rows: Vec<RoundRow>,
    /// The summary.
    pub summary: RunSummary,
}

/// A results CSV (`rounds.csv`, `summary.csv`) without its wall-clock columns (names ending in
/// `_s`, and `threads`): what must be identical between two runs of the same points, whatever
/// the machine, the thread count or the sharding.
pub fn csv_without_timings(text: &str) -> String {
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return String::new();
    };
    let header: Vec<&str> = header.split(',').collect();
    let keep: Vec<usize> = (0..header.len())
        .filter(|&i| !header[i].ends_with("_s") && header[i] != "threads")
        .collect();
    std::iter::once(
        keep.iter()
            .map(|&i| header[i])
            .collect::<Vec<_>>()
            .join(","),
    )
    .chain(lines.map(|l| {
        let f: Vec<&str> = l.split(',').collect();
        keep.iter()
            .map(|&i| f.get(i).copied().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(",")
    }))
    .collect::<Vec<_>>()
    .join("\n")
}
