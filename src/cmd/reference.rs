//! `fedlora reference`: the utility yardsticks federated runs are compared against — the base
//! model, each client fine-tuning alone (local-only), and one LoRA fine-tune on the pooled data
//! of all clients (centralised, the upper reference) — on the same held-out client text.

use std::time::Instant;

use clap::Args;
use fedlora_protocol::TrainConfig;
use rand::SeedableRng;
use serde_json::json;

use super::model::ModelArgs;

#[derive(Args, Debug)]
pub(crate) struct ReferenceArgs {
    /// Number of demo clients (speaking roles).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Adam steps of each local-only fine-tune (the demo's 3 rounds × 30 local steps).
    #[arg(long, default_value_t = 90)]
    steps: u32,
    /// Adam steps of the pooled fine-tune (default: all clients' steps of the demo, 8 × 90).
    #[arg(long, default_value_t = 720)]
    pooled_steps: u32,
    /// Windows per step.
    #[arg(long, default_value_t = 16)]
    batch_size: u32,
    /// Learning rate (0.001 gave both references their best held-out loss).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Seed of batch sampling.
    #[arg(long, default_value_t = 5)]
    seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    model: ModelArgs,
}

pub(crate) fn run(a: ReferenceArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let workload = super::workload::Workload::load(&a.model)?;
    let (learners, _) = workload.demo(a.clients)?;
    let g = workload.initial_adapter();
    let tc = TrainConfig {
        local_steps: a.steps,
        batch_size: a.batch_size,
        learning_rate: a.lr,
        ..Default::default()
    };
    // token-weighted mean over clients of each one's held-out loss
    let pooled_eval = |adapters: &[fedlora_protocol::FlatAdapter]| -> anyhow::Result<f64> {
        let (mut sum, mut tokens) = (0.0, 0u64);
        for (l, ad) in learners.iter().zip(adapters) {
            let e = l.evaluate(ad)?;
            sum += e.loss * e.tokens as f64;
            tokens += e.tokens;
        }
        Ok(sum / tokens as f64)
    };
    let base = pooled_eval(&vec![g.clone(); a.clients])?;
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(a.seed);
    let mut local = Vec::new();
    for l in &learners {
        let mut ad = g.clone();
        ad.apply_delta(&l.train(&g, &tc, &mut rng)?.delta)?;
        local.push(ad);
    }
    let local_only = pooled_eval(&local)?;
    let mut pooled = g.clone();
    let ptc = TrainConfig {
        local_steps: a.pooled_steps,
        ..tc.clone()
    };
    pooled.apply_delta(&workload.pooled(a.clients)?.train(&g, &ptc, &mut rng)?.delta)?;
    let pooled_loss = pooled_eval(&vec![pooled; a.clients])?;
    let out = json!({
        "clients": a.clients,
        "steps": a.steps,
        "pooled_steps": a.pooled_steps,
        "batch_size": a.batch_size,
        "lr": a.lr,
        "base_eval_loss": base,
        "local_only_eval_loss": local_only,
        "pooled_eval_loss": pooled_loss,
        "base_perplexity": base.exp(),
        "local_only_perplexity": local_only.exp(),
        "pooled_perplexity": pooled_loss.exp(),
        "wall_secs": t0.elapsed().as_secs_f64(),
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "held-out loss over {} clients' test text ({}):",
            a.clients,
            workload.unit()
        );
        println!(
            "  base model                        {base:.4} (perplexity {:.3})",
            base.exp()
        );
        println!(
            "  local-only LoRA (each on its own) {local_only:.4} (perplexity {:.3})",
            local_only.exp()
        );
        println!(
            "  pooled, centralised LoRA          {pooled_loss:.4} (perplexity {:.3})",
            pooled_loss.exp()
        );
    }
    Ok(())
}
