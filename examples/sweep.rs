//! A privacy-utility sweep from code: the simulation harness's public API.
//!
//! Builds a small sweep over ε on the Breast Cancer Wisconsin task (6 clients with label-skewed
//! data), runs it with virtual clients in this process, and prints the final test accuracy of
//! each run. The same sweep as a file runs with `fedlora simulate --config FILE --out DIR`.
//!
//! Run: `cargo run --release --example sweep`

use fedlora_simulations::output::{run_sweep, SweepOptions};
use fedlora_simulations::sweep::SweepConfig;

const SWEEP: &str = r#"
name = "example"
question = "How much accuracy does each ε cost?"
[task]
name = "bcw"
partition = "dirichlet"
alpha = 1.0
clients = 6
[train]
local_steps = 5
batch_size = 16
learning_rate = 0.02
[grid]
epsilon = [1.0, 4.0, inf]
clients_per_round = [6]
rounds = [10]
seed = [1, 2]
"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sweep = SweepConfig::from_toml(SWEEP)?;
    let out = tempfile::tempdir()?;
    let done = run_sweep(&sweep, SWEEP, out.path(), &SweepOptions::default())?;
    let (_, summaries) = fedlora_simulations::output::load_runs(&sweep, out.path())?;
    for s in &summaries {
        println!(
            "ε = {:>4}, seed {}: accuracy {:.3} → {:.3}, ε spent {}",
            s.epsilon,
            s.seed,
            s.initial_accuracy.unwrap_or(f64::NAN),
            s.final_accuracy.unwrap_or(f64::NAN),
            s.eps_spent.map_or("—".into(), |e| format!("{e:.3}")),
        );
    }
    println!(
        "{} runs; report written to {} (deleted on exit)",
        done.ran,
        done.report.display()
    );
    Ok(())
}
