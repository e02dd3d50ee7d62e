//! What `fedlora bench` measures of the training engine: a plain and a DP-SGD step of the
//! byte-level model, and the update codecs on a real delta (the CLI parses the flags, runs these
//! in child processes with 1 and 2 threads, and prints the JSON). Times are wall-clock medians;
//! memory is the process's peak RSS.

use std::time::Instant;

use burn::tensor::Device;
use fedlora_dp::GaussianNoise;
use fedlora_protocol::TrainConfig;
use rand::SeedableRng;
use serde_json::{json, Value};

use crate::adapter::{collect_named, NamedFilter};
use crate::data::ClientData;
use crate::dp_sgd::DpSgdConfig;
use crate::error::TrainError;
use crate::model::LmConfig;
use crate::train::LocalTrainer;

/// Median of `v` (sorted in place); NaN when empty.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The DP-SGD setting a bench times a step with: clip 1, σ = 1, the whole `batch` expected and
/// in one chunk, no loss release, and noise from the OS CSPRNG. The timing is of the step, not
/// of a private run.
pub fn timing_dp(batch: usize) -> Result<(DpSgdConfig, GaussianNoise), TrainError> {
    let dp = DpSgdConfig {
        clip_norm: 1.0,
        noise_multiplier: 1.0,
        expected_batch: batch,
        max_chunk: batch,
        loss_clip: None,
        dirac_canaries: Vec::new(),
    };
    let noise =
        GaussianNoise::from_os(1.0).map_err(|e| TrainError::Config(format!("noise: {e}")))?;
    Ok((dp, noise))
}

/// Peak resident set size of this process, MiB (Linux `VmHWM`; 0 where unavailable).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Restarts this process's peak RSS (`VmHWM`) at its current RSS (Linux's `clear_refs` 5);
/// false where that is not possible.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The rayon threads this process trains with (`RAYON_NUM_THREADS`, else every core).
pub fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// `fedlora bench train-step`: the median wall time of one plain LoRA step (batch 32) of the
/// byte-level model `cfg` (with its adapter; the base is `cfg` without one, at its random
/// init) over `reps` steps after 3 warm-up steps, in this process's rayon threads.
pub fn train_step(cfg: LmConfig, reps: usize) -> Result<Value, TrainError> {
    let batch = 32u32;
    let device = Device::flex().autodiff();
    let base_cfg = cfg.clone().with_lora(None);
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

/// `fedlora bench dp-step`: a DP-SGD step (per-example gradients, clipping, noise) against a
/// plain step on the same 32 windows of the byte-level model `cfg`, medians over `reps`, and
/// the largest difference between the per-example gradients and one-example backward passes.
pub fn dp_step(cfg: LmConfig, reps: usize) -> Result<Value, TrainError> {
    use crate::dp_sgd::{dp_gradient, per_example_grads, plain_gradient, to_gradients_params};
    use crate::model::windows_tensor;
    use burn::optim::{AdamConfig, GradientsParams};
    let batch = 32usize;
    let device = Device::flex().autodiff();
    let base_cfg = cfg.clone().with_lora(None);
    let base = collect_named(&base_cfg.init(&device), NamedFilter::All);
    let trainer = LocalTrainer::new(cfg.clone(), &base, device.clone())?;
    let data = ClientData::demo_client(0, cfg.context)?;
    let mut g = trainer.initial_adapter();
    for (i, v) in g.values_mut().iter_mut().enumerate() {
        *v += ((i as f32) * 0.37).sin() * 0.01; // B ≠ 0, so every adapter tensor has a gradient
    }
    let windows: Vec<&[u8]> = data.train[..batch].iter().map(Vec::as_slice).collect();
    let (dpc, mut noise) = timing_dp(batch)?;
    let mut model = trainer.model_with(&g)?;
    let mut opt = AdamConfig::new().init();
    let (mut plain, mut dp) = (Vec::new(), Vec::new());
    let mut norms = Vec::new();
    for i in 0..reps + 2 {
        let t0 = Instant::now();
        let loss = model.loss(windows_tensor(&windows, &device));
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = opt.step(1e-4, model, grads);
        let t_plain = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let (grads, n, _) = dp_gradient(&model, &windows, &dpc, &mut noise, &device);
        norms.extend(n);
        let gp = to_gradients_params(&model, grads);
        model = opt.step(1e-4, model, gp);
        let t_dp = t0.elapsed().as_secs_f64();
        if i >= 2 {
            plain.push(t_plain);
            dp.push(t_dp);
        }
    }
    // per-example gradients against one-example backward passes, on 4 examples
    let few = &windows[..4];
    let (per, _) = per_example_grads(&model, few, &device);
    let mut err = 0f32;
    for (i, w) in few.iter().enumerate() {
        for (all, one) in per.iter().zip(plain_gradient(&model, &[*w], &device)) {
            let [_, r, c] = all.dims();
            let gi = all.clone().slice([i..i + 1, 0..r, 0..c]).reshape([r, c]);
            err = err.max((gi - one).abs().max().into_scalar::<f32>());
        }
    }
    let (p, d) = (median(&mut plain), median(&mut dp));
    Ok(json!({
        "threads": rayon_threads(),
        "batch": batch,
        "plain_step_ms": p * 1e3,
        "dp_step_ms": d * 1e3,
        "ratio": d / p,
        "per_example_grad_max_abs_err": err,
        "per_example_grad_norm_median": median(&mut norms),
        "peak_rss_mib": peak_rss_mib(),
    }))
}

/// `fedlora bench codec`: every update codec on a real adapter delta (30 local Adam steps,
/// batch 16, lr 0.01, of demo client 0 with `trainer`): bytes, ratio to dense f32, relative L2
/// error, encode and decode speed (medians over `reps`), and the share of clamped values.
pub fn codec(trainer: &LocalTrainer, reps: usize) -> Result<Value, TrainError> {
    use fedlora_protocol::{Codec, CodecContext};
    let data = ClientData::demo_client(0, trainer.config().context)?;
    let tc = TrainConfig {
        local_steps: 30,
        batch_size: 16,
        learning_rate: 1e-2,
        ..Default::default()
    };
    let g = trainer.initial_adapter();
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(1);
    let delta = trainer.train(&g, &data.train, &tc, &mut rng)?.delta;
    let x = delta.values();
    let norm = fedlora_dp::l2_norm(x);
    let max_abs = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let ctx = CodecContext { round_seed: 42 };
    let dense_bytes = Codec::DenseF32.encode(x).len() as f64;
    let names = [
        "dense-f32",
        "f16",
        "q8",
        "q4",
        "q2",
        "q1",
        "q4-norot",
        "topk:0.1",
        "topk:0.05",
        "topk:0.03",
        "subset:0.25",
        "subset:0.125",
        "modular:8:0.25:0.125:64",
        "modular:8:0.25:0.25:64",
        "modular:8:0.25:1:64",
    ];
    let mb = (x.len() * 4) as f64 / 1e6;
    let mut rows = Vec::new();
    for name in names {
        let c = Codec::from_name(name)?;
        let (mut enc_t, mut dec_t) = (Vec::new(), Vec::new());
        let mut bytes = Vec::new();
        let mut clamped = 0;
        for _ in 0..reps {
            let t0 = Instant::now();
            let (b, st) = c.encode_with(x, &ctx, 1, &mut rng);
            enc_t.push(t0.elapsed().as_secs_f64());
            clamped = st.clamped;
            let t0 = Instant::now();
            let _ = Codec::decode(&b, delta.spec(), Some(&c), &ctx)?;
            dec_t.push(t0.elapsed().as_secs_f64());
            bytes = b;
        }
        let d = Codec::decode(&bytes, delta.spec(), Some(&c), &ctx)?;
        let err: f64 = x
            .iter()
            .zip(d.values())
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        rows.push(json!({
            "name": c.name(),
            "bytes": bytes.len(),
            "ratio": dense_bytes / bytes.len() as f64,
            "rel_l2_error": err / norm,
            "encode_mb_s": mb / median(&mut enc_t),
            "decode_mb_s": mb / median(&mut dec_t),
            "clamped_fraction": clamped as f64 / x.len() as f64,
        }));
    }
    Ok(json!({
        "delta": {"values": x.len(), "l2_norm": norm, "max_abs": max_abs,
                  "source": "30 local Adam steps (batch 16, lr 0.01) of demo client 0 from models/base.bpk"},
        "codecs": rows,
    }))
}
