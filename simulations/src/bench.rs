//! What `fedlora bench simulate` measures of the simulation harness (the CLI parses the flags
//! and prints the JSON).

use std::time::Instant;

use fedlora_train::bench::{median, peak_rss_mib, rayon_threads};
use serde_json::{json, Value};

use crate::error::SimError;
use crate::output::thread_pool;
use crate::runner::run_in_process;
use crate::sweep::SweepConfig;

/// `fedlora bench simulate`: `clients` virtual clients (IID shards of the Shakespeare client
/// text), `per_round` per round for `rounds` rounds, 5 local steps of batch 32 on the reference
/// LM (rank 8 on q, v), in-process on all cores: startup, round wall time against the summed
/// client training time (medians over the rounds after the first), peak RSS.
pub fn simulate(clients: usize, per_round: usize, rounds: u64) -> Result<Value, SimError> {
    let t0 = Instant::now();
    let sweep = SweepConfig::from_toml(&format!(
        r#"
name = "bench"
eval_every = 1000
[task]
name = "shakespeare"
partition = "iid"
clients = {clients}
model = "reference"
max_eval_examples = 32
[train]
local_steps = 5
batch_size = 32
learning_rate = 0.001
[grid]
rank = [8]
clients_per_round = [{per_round}]
rounds = [{rounds}]
codec = ["dense"]
seed = [1]
"#,
        clients = clients,
        per_round = per_round,
        rounds = rounds
    ))?;
    let point = sweep.points().0.remove(0);
    let cores = rayon_threads();
    let pool = thread_pool(Some(cores))?;
    let out = run_in_process(&sweep, &point, &pool, |_| {})?;
    let total_s = t0.elapsed().as_secs_f64();
    let rounds = &out.rows[1..];
    let mut wall: Vec<f64> = rounds.iter().map(|r| r.wall_s).collect();
    let mut compute: Vec<f64> = rounds.iter().map(|r| r.compute_s).collect();
    let mut overhead: Vec<f64> = rounds
        .iter()
        .map(|r| r.wall_s / (r.compute_s / cores as f64))
        .collect();
    Ok(json!({
        "clients": clients,
        "clients_per_round": per_round,
        "local_steps": 5,
        "batch_size": 32,
        "rounds": rounds.len(),
        "cores": cores,
        "startup_s": out.summary.startup_s,
        "first_round_after_s": out.summary.startup_s + out.rows[0].eval_s,
        "round_wall_s": median(&mut wall),
        "round_compute_s": median(&mut compute),
        "overhead": median(&mut overhead),
        "peak_rss_mib": peak_rss_mib(),
        "total_s": total_s,
        "final_loss": out.summary.final_loss,
        "initial_loss": out.summary.initial_loss,
    }))
}
