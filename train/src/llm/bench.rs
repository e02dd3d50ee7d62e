//! Timing of one LoRA training step on a real LLM, by phase: what `fedlora bench llm-step`
//! reports.

use std::time::Instant;

use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::Device;
use fedlora_protocol::FlatAdapter;
use serde::Serialize;

use super::data::TokenExample;
use super::trainer::LlmTrainer;
use crate::bench::median;
use crate::error::TrainError;

/// Median milliseconds of each phase of a plain LoRA step (Adam), over the measured reps.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StepPhases {
    /// Forward pass and the masked mean loss (logits and log-softmax included).
    pub forward_ms: f64,
    /// Backward pass and collecting the adapter's gradients.
    pub backward_ms: f64,
    /// The Adam update of the adapter.
    pub optimizer_ms: f64,
    /// The whole step.
    pub total_ms: f64,
}

/// Runs `warmup + reps` plain Adam steps from `global` on `batch` (the same examples every
/// step) and returns the median time of each phase over the last `reps`.
pub fn plain_step_phases(
    trainer: &LlmTrainer,
    global: &FlatAdapter,
    batch: &[TokenExample],
    warmup: usize,
    reps: usize,
    device: &Device,
) -> Result<StepPhases, TrainError> {
    let mut model = trainer.model_with(global)?;
    let mut opt = AdamConfig::new().init();
    let refs: Vec<&TokenExample> = batch.iter().collect();
    let (mut f, mut b, mut o, mut t) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..warmup + reps {
        let t0 = Instant::now();
        let (nll, count) = model.example_nll(&refs, None, device);
        let loss = nll.sum() / count.sum().clamp_min(1.0);
        let _ = loss.clone().into_scalar::<f32>();
        let t1 = Instant::now();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let t2 = Instant::now();
        model = opt.step(1e-4, model, grads);
        let t3 = Instant::now();
        if i >= warmup {
            f.push((t1 - t0).as_secs_f64() * 1e3);
            b.push((t2 - t1).as_secs_f64() * 1e3);
            o.push((t3 - t2).as_secs_f64() * 1e3);
            t.push((t3 - t0).as_secs_f64() * 1e3);
        }
    }
    Ok(StepPhases {
        forward_ms: median(&mut f),
        backward_ms: median(&mut b),
        optimizer_ms: median(&mut o),
        total_ms: median(&mut t),
    })
}

/// Runs `warmup + reps` DP-SGD Adam steps from `global` on `batch` (every example in every
/// step: the sampling rate is 1 here, as the timing is of the step, not of a private run):
/// per-example gradients, clipping to `dp.clip_norm`, Gaussian noise σ·C from `noise`, Adam.
/// Returns the median milliseconds of the whole step over the last `reps`.
pub fn dp_step_ms(
    trainer: &LlmTrainer,
    global: &FlatAdapter,
    batch: &[TokenExample],
    dp: &crate::dp_sgd::DpSgdConfig,
    noise: &mut fedlora_dp::GaussianNoise,
    warmup: usize,
    reps: usize,
) -> Result<f64, TrainError> {
    use crate::dp_sgd::{dp_gradient, to_gradients_params};
    let device = trainer.device();
    let mut model = trainer.model_with(global)?;
    let mut opt = AdamConfig::new().init();
    let refs: Vec<&TokenExample> = batch.iter().collect();
    let mut t = Vec::new();
    for i in 0..warmup + reps {
        let t0 = Instant::now();
        let (grads, _, _) = dp_gradient(&model, &refs, dp, noise, device);
        let gp = to_gradients_params(&model, grads);
        model = opt.step(1e-4, model, gp);
        if i >= warmup {
            t.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(median(&mut t))
}

/// `fedlora bench llm-step`: loads the LLM at `path` with `lora` and `base_dtype`, then times
/// one plain LoRA step by phase (medians of `reps`, on `batch` windows of `context` tokens of
/// the first Shakespeare role) and a DP-SGD step beside it; peak RSS after loading and while
/// training, in this process's rayon threads.
pub fn llm_step(
    path: &std::path::Path,
    lora: &crate::lora::LoraConfig,
    base_dtype: crate::quant::BaseDtype,
    context: usize,
    batch: usize,
    reps: usize,
) -> Result<serde_json::Value, TrainError> {
    use super::data::text_examples;
    use crate::bench::{peak_rss_mib, rayon_threads, reset_peak_rss};
    use serde_json::json;
    let t0 = Instant::now();
    let trainer = LlmTrainer::load_as(path, lora, 0, base_dtype)?;
    let load_s = t0.elapsed().as_secs_f64();
    let load_peak = peak_rss_mib();
    let role = &crate::data::split_roles(crate::data::SHAKESPEARE).clients[0];
    let examples = text_examples(&trainer.llm().tokenizer, &role.text, context)?;
    if examples.len() < batch {
        return Err(TrainError::Data("too little text for one batch".into()));
    }
    let windows = &examples[..batch];
    // What training costs, without the loader's transient copies: the peak restarts here.
    let reset = reset_peak_rss();
    let global = trainer.initial_adapter();
    let phases = plain_step_phases(&trainer, &global, windows, 2, reps, trainer.device())?;
    let train_peak = peak_rss_mib();
    let (dp, mut noise) = crate::bench::timing_dp(batch)?;
    let dp_ms = dp_step_ms(&trainer, &global, windows, &dp, &mut noise, 1, reps.min(5))?;
    let model = &trainer.llm().model;
    Ok(json!({
        "model": path.display().to_string(),
        "base_dtype": model.base_dtype().name(),
        "base_matrices_mib": model.base_matrix_bytes() as f64 / (1 << 20) as f64,
        "batch": batch, "context": context, "rank": lora.rank, "alpha": lora.alpha,
        "targets": lora.targets,
        "threads": rayon_threads(),
        "reps": reps,
        "load_s": load_s,
        "phases_ms": phases,
        "step_ms": phases.total_ms,
        "tokens_per_s": (batch * context) as f64 / (phases.total_ms / 1e3),
        "dp_step_ms": dp_ms,
        "dp_over_plain": dp_ms / phases.total_ms,
        "peak_rss_mib": if reset { train_peak } else { f64::NAN },
        "peak_rss_phase": if reset { "plain training steps (reset after loading)" } else { "whole process (VmHWM could not be reset)" },
        "load_peak_rss_mib": load_peak,
        "peak_rss_with_dp_mib": peak_rss_mib(),
    }))
}
