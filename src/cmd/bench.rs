//! `fedlora bench NAME [--json]`: speed and memory measurements (medians, ratios in one run).

use std::time::Instant;

use burn::tensor::Device;
use clap::{Args, ValueEnum};
use fedlora_client::adapter::{collect_named, NamedFilter};
use fedlora_client::data::ClientData;
use fedlora_client::lora::LoraConfig;
use fedlora_client::train::LocalTrainer;
use fedlora_protocol::TrainConfig;
use rand::SeedableRng;
use serde_json::json;

use super::model::reference_config;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BenchName {
    /// One LoRA training step on the reference shape (batch 32, context 64, rank 8 on q, v).
    TrainStep,
}

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// What to measure.
    name: BenchName,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Measured repetitions (the median is reported).
    #[arg(long, default_value_t = 15)]
    reps: usize,
    /// Run in this process with this many threads instead of spawning 1- and 2-thread runs.
    #[arg(long, hide = true)]
    threads: Option<usize>,
}

/// Peak resident set size of this process, MiB (Linux `VmHWM`; 0 where unavailable).
pub(crate) fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Median of `v` (sorted in place).
pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn train_step_once(reps: usize) -> anyhow::Result<serde_json::Value> {
    let batch = 32u32;
    let cfg = reference_config(Some(LoraConfig::new()));
    let device = Device::flex().autodiff();
    let base_cfg = reference_config(None);
    let base = collect_named(&base_cfg.init(&device), NamedFilter::All);
    let trainer = LocalTrainer::new(cfg.clone(), &base, device)?;
    let data = ClientData::demo_client(0, cfg.context)?;
    let mut g = trainer.initial_adapter();
    let tc = TrainConfig {
        local_steps: 1,
        batch_size: batch,
        learning_rate: 1e-3,
        ..Default::default()
    };
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(0);
    let mut times = Vec::new();
    for i in 0..reps + 3 {
        let t0 = Instant::now();
        let out = trainer.train(&g, &data.train, &tc, &mut rng)?;
        let dt = t0.elapsed().as_secs_f64();
        g.apply_delta(&out.delta)?;
        if i >= 3 {
            times.push(dt);
        }
    }
    let step_s = median(&mut times);
    Ok(json!({
        "threads": rayon_threads(),
        "step_ms": step_s * 1e3,
        "tokens_per_s": (batch as usize * cfg.context) as f64 / step_s,
        "peak_rss_mib": peak_rss_mib(),
    }))
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Runs this bench in a child process with `threads` rayon threads and parses its JSON.
fn spawn_child(name: &str, threads: usize, reps: usize) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["bench", name, "--json", "--reps", &reps.to_string()])
        .args(["--threads", &threads.to_string()])
        .env("RAYON_NUM_THREADS", threads.to_string())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "bench child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

pub(crate) fn run(a: BenchArgs) -> anyhow::Result<()> {
    let value = match a.name {
        BenchName::TrainStep => {
            if a.threads.is_some() {
                train_step_once(a.reps)?
            } else {
                let one = spawn_child("train-step", 1, a.reps)?;
                let two = spawn_child("train-step", 2, a.reps)?;
                json!({
                    "shape": {"d_model": 128, "layers": 4, "heads": 4, "mlp": 512, "context": 64,
                              "batch": 32, "rank": 8, "alpha": 16, "targets": ["q", "v"]},
                    "step_ms": two["step_ms"],
                    "tokens_per_s": two["tokens_per_s"],
                    "peak_rss_mib": two["peak_rss_mib"],
                    "threads_1": one,
                    "threads_2": two,
                })
            }
        }
    };
    if a.json {
        println!("{value}");
    } else {
        println!("{}", serde_json::to_string_pretty(&value)?);
    }
    Ok(())
}
