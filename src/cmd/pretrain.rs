//! `fedlora pretrain`: trains the base model on the public roles and saves it.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::Device;
use clap::Args;
use fedlora_train::data::{split_roles, SHAKESPEARE};
use fedlora_train::train::{pretrain, save_base, PretrainConfig};
use indicatif::{ProgressBar, ProgressStyle};

use super::model::{reference_config, DEFAULT_BASE};

#[derive(Args, Debug)]
pub(crate) struct PretrainArgs {
    /// Output checkpoint (burnpack).
    #[arg(long, default_value = DEFAULT_BASE)]
    out: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = PretrainConfig::default().steps)]
    steps: usize,
    /// Windows per step.
    #[arg(long, default_value_t = PretrainConfig::default().batch_size)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = PretrainConfig::default().learning_rate)]
    lr: f64,
    /// Seed of batch sampling.
    #[arg(long, default_value_t = PretrainConfig::default().seed)]
    seed: u64,
}

/// Pretrains and saves; shared with `demo`, which calls it when the checkpoint is missing.
pub(crate) fn pretrain_to(out: &std::path::Path, cfg: &PretrainConfig) -> anyhow::Result<()> {
    let split = split_roles(SHAKESPEARE);
    let lm_cfg = reference_config(None);
    let device = Device::flex().autodiff();
    let bar = ProgressBar::new(cfg.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "pretrain [{bar:30}] {pos}/{len} {msg} ({elapsed_precise}, eta {eta})",
        )?
        .progress_chars("=> "),
    );
    let t0 = Instant::now();
    let mut ema = None::<f64>;
    let lm = pretrain(
        &lm_cfg,
        split.public_text.as_bytes(),
        cfg,
        &device,
        |step, loss, tps| {
            let e = ema.map_or(loss, |e| 0.95 * e + 0.05 * loss);
            ema = Some(e);
            bar.set_message(format!("loss {e:.3} nats/byte, {tps:.0} tokens/s"));
            bar.inc(1);
            if bar.is_hidden() && (step + 1) % 100 == 0 {
                // no terminal (CI, logs): a plain line every 100 steps instead of the bar
                eprintln!(
                    "pretrain step {}/{}: loss {e:.3} nats/byte, {tps:.0} tokens/s",
                    step + 1,
                    cfg.steps
                );
            }
        },
    )?;
    bar.finish();
    save_base(lm, out)?;
    eprintln!(
        "saved base model to {} ({} public bytes, {:.0} s)",
        out.display(),
        split.public_text.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

pub(crate) fn run(a: PretrainArgs) -> anyhow::Result<()> {
    let cfg = PretrainConfig {
        steps: a.steps,
        batch_size: a.batch_size,
        learning_rate: a.lr,
        seed: a.seed,
    };
    pretrain_to(&a.out, &cfg)
}
