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
    /// A DP-SGD step (per-example gradients, clipping, noise) against a plain step.
    DpStep,
    /// Every update codec on a real adapter delta from training: bytes, ratio, error, speed.
    Codec,
    /// A secure-aggregation round without network: client and coordinator CPU time.
    Secagg,
    /// The simulation harness: virtual clients on the reference LM (startup, round wall time
    /// against summed client training time, peak memory).
    Simulate,
    /// One LoRA step of a real LLM (--model; batch 4, context 128, rank 8 on q_proj, v_proj
    /// by default): forward, backward and optimizer phases, in this process's threads.
    LlmStep,
    /// One round over real QUIC + mTLS: a coordinator (child process, its memory measured)
    /// and --clients synthetic SDK clients uploading seeded random deltas of --params values.
    Load,
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
    /// secagg: clients in the round; simulate: clients in the population.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// simulate: clients per round.
    #[arg(long, default_value_t = 20)]
    per_round: usize,
    /// simulate: rounds.
    #[arg(long, default_value_t = 5)]
    rounds: u64,
    /// secagg: values per input vector.
    #[arg(long, default_value_t = 1_000_000)]
    params: usize,
    /// secagg: share of clients that drop after sharing keys, before the masked input.
    #[arg(long, default_value_t = 0.1)]
    dropout: f64,
    /// secagg: neighbours per client (0: everyone).
    #[arg(long, default_value_t = 3)]
    neighbours: usize,
    /// secagg: Shamir threshold.
    #[arg(long, default_value_t = 2)]
    threshold: usize,
    /// load: secure aggregation (k = 2⌈log₂ N⌉ neighbours, t = k/2 + 1).
    #[arg(long)]
    secure: bool,
    /// load: upload codec (default dense-f32; modular:8:0.05:1:N with --secure).
    #[arg(long)]
    codec: Option<String>,
    /// load: run as the coordinator of a load run prepared in this directory (internal).
    #[arg(long, hide = true)]
    serve: Option<std::path::PathBuf>,
    /// secagg: modulus bits of the inputs.
    #[arg(long, default_value_t = 16)]
    modulus_bits: u32,
    /// llm-step: windows per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// llm-step: the model and its adapter (--model, --context, --rank, --targets …).
    #[command(flatten)]
    model: super::model::ModelArgs,
}

/// One LoRA step of the real LLM `a.model` names, by phase (medians of `a.reps`), and a DP-SGD
/// step beside it; on 1 and 2 threads (child processes) unless `--threads` runs it here.
fn llm_step_bench(a: &BenchArgs) -> anyhow::Result<serde_json::Value> {
    let Some(path) = &a.model.model else {
        return Err(super::UsageError("llm-step needs --model PATH".into()).into());
    };
    if a.threads.is_some() {
        return llm_step_once(a, path);
    }
    let one = spawn_self(1)?;
    let two = spawn_self(2)?;
    let mut out = json!({
        "threads_1": one,
        "threads_2": two,
        "speedup_2_threads": one["step_ms"].as_f64().unwrap_or(f64::NAN)
            / two["step_ms"].as_f64().unwrap_or(f64::NAN),
    });
    for key in [
        "model",
        "base_dtype",
        "batch",
        "context",
        "rank",
        "targets",
        "step_ms",
        "tokens_per_s",
        "peak_rss_mib",
        "dp_step_ms",
    ] {
        out[key] = two[key].clone();
    }
    out["threads"] = json!(2);
    Ok(out)
}

fn llm_step_once(a: &BenchArgs, path: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    use fedlora_client::dp_sgd::DpSgdConfig;
    use fedlora_client::llm::bench::{dp_step_ms, plain_step_phases};
    use fedlora_client::llm::data::text_examples;
    use fedlora_client::llm::trainer::LlmTrainer;
    let context = a.model.context.unwrap_or(128);
    let lora = a.model.lora()?;
    let t0 = Instant::now();
    let trainer = LlmTrainer::load_as(path, &lora, 0, a.model.base_dtype)?;
    let load_s = t0.elapsed().as_secs_f64();
    let load_peak = peak_rss_mib();
    let role = &fedlora_client::data::split_roles(fedlora_client::data::SHAKESPEARE).clients[0];
    let examples = text_examples(&trainer.llm().tokenizer, &role.text, context)?;
    anyhow::ensure!(examples.len() >= a.batch, "too little text for one batch");
    let batch = &examples[..a.batch];
    // What training costs, without the loader's transient copies: the peak restarts here.
    let reset = reset_peak_rss();
    let global = trainer.initial_adapter();
    let phases = plain_step_phases(&trainer, &global, batch, 2, a.reps, trainer.device())?;
    let train_peak = peak_rss_mib();
    let dp = DpSgdConfig {
        clip_norm: 1.0,
        noise_multiplier: 1.0,
        expected_batch: a.batch,
        max_chunk: a.batch,
        loss_clip: None,
    };
    let mut noise = fedlora_dp::GaussianNoise::from_os(1.0)?;
    let dp_ms = dp_step_ms(&trainer, &global, batch, &dp, &mut noise, 1, a.reps.min(5))?;
    let model = &trainer.llm().model;
    Ok(json!({
        "model": path.display().to_string(),
        "base_dtype": model.base_dtype().name(),
        "base_matrices_mib": model.base_matrix_bytes() as f64 / (1 << 20) as f64,
        "batch": a.batch, "context": context, "rank": lora.rank, "alpha": lora.alpha,
        "targets": lora.targets,
        "threads": rayon_threads(),
        "reps": a.reps,
        "load_s": load_s,
        "phases_ms": phases,
        "step_ms": phases.total_ms,
        "tokens_per_s": (a.batch * context) as f64 / (phases.total_ms / 1e3),
        "dp_step_ms": dp_ms,
        "dp_over_plain": dp_ms / phases.total_ms,
        "peak_rss_mib": if reset { train_peak } else { f64::NAN },
        "peak_rss_phase": if reset { "plain training steps (reset after loading)" } else { "whole process (VmHWM could not be reset)" },
        "load_peak_rss_mib": load_peak,
        "peak_rss_with_dp_mib": peak_rss_mib(),
    }))
}

/// Restarts this process's peak RSS (`VmHWM`) at its current RSS (Linux's `clear_refs` 5);
/// false where that is not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Runs this same command line in a child process with `threads` rayon threads and parses
/// its JSON.
fn spawn_self(threads: usize) -> anyhow::Result<serde_json::Value> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--json").collect();
    run_child(&args, threads)
}

/// Runs this program with `args` and `--json --threads N` in a child process with `threads`
/// rayon threads, and parses its JSON.
fn run_child(args: &[String], threads: usize) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(args)
        .args(["--json", "--threads", &threads.to_string()])
        .env("RAYON_NUM_THREADS", threads.to_string())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "bench child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

pub(crate) use fedlora_device::peak_rss_mib;

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

fn dp_step(reps: usize) -> anyhow::Result<serde_json::Value> {
    use burn::optim::{AdamConfig, GradientsParams};
    use fedlora_client::dp_sgd::{
        dp_gradient, per_example_grads, plain_gradient, to_gradients_params, DpSgdConfig,
    };
    use fedlora_client::model::windows_tensor;
    let batch = 32usize;
    let cfg = reference_config(Some(LoraConfig::new()));
    let device = Device::flex().autodiff();
    let base_cfg = reference_config(None);
    let base = collect_named(&base_cfg.init(&device), NamedFilter::All);
    let trainer = LocalTrainer::new(cfg.clone(), &base, device.clone())?;
    let data = ClientData::demo_client(0, cfg.context)?;
    let mut g = trainer.initial_adapter();
    for (i, v) in g.values_mut().iter_mut().enumerate() {
        *v += ((i as f32) * 0.37).sin() * 0.01; // B ≠ 0, so every adapter tensor has a gradient
    }
    let windows: Vec<&[u8]> = data.train[..batch].iter().map(Vec::as_slice).collect();
    let dpc = DpSgdConfig {
        clip_norm: 1.0,
        noise_multiplier: 1.0,
        expected_batch: batch,
        max_chunk: batch,
        loss_clip: None,
    };
    let mut noise = fedlora_dp::GaussianNoise::from_os(1.0)?;
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

fn codec_bench(reps: usize) -> anyhow::Result<serde_json::Value> {
    use fedlora_protocol::{Codec, CodecContext};
    // a real delta: 30 Adam steps of the demo setting on client 0, from the committed base
    let model = super::model::ModelArgs {
        base: super::model::DEFAULT_BASE.into(),
        model: None,
        context: None,
        rank: 8,
        alpha: 16.0,
        targets: vec!["q".into(), "v".into()],
        ffa: false,
        base_dtype: Default::default(),
    };
    let trainer = model.trainer()?;
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

/// `bench secagg`: one whole secure round in this process, timed by phase (see
/// [`fedlora_protocol::secagg::bench`]).
fn secagg_bench(a: &BenchArgs) -> anyhow::Result<serde_json::Value> {
    use fedlora_protocol::secagg::bench::{run, BenchConfig};
    let cfg = BenchConfig {
        clients: a.clients,
        params: a.params,
        dropout: a.dropout,
        neighbours: a.neighbours,
        threshold: a.threshold,
        modulus_bits: a.modulus_bits,
        coordinator_threads: a.threads.unwrap_or_else(rayon_threads),
        ..Default::default()
    };
    let report = run(&cfg).map_err(|e| {
        super::UsageError(format!(
            "--clients {} --neighbours {} --threshold {}: {e}",
            a.clients, a.neighbours, a.threshold
        ))
    })?;
    Ok(serde_json::to_value(report)?)
}

fn load_config(a: &BenchArgs) -> anyhow::Result<fedlora_simulations::load::LoadConfig> {
    let codec = a
        .codec
        .as_deref()
        .map(fedlora_protocol::Codec::from_name)
        .transpose()
        .map_err(|e| super::UsageError(format!("--codec: {e}")))?;
    if a.clients == 0 || a.params == 0 {
        return Err(super::UsageError("--clients and --params must be positive".into()).into());
    }
    Ok(fedlora_simulations::load::LoadConfig {
        clients: a.clients,
        params: a.params,
        secure: a.secure,
        codec,
        ..Default::default()
    })
}

/// `bench load`: certificates, a coordinator in a child process (`--serve`), the synthetic
/// clients in this one; the report joins both sides.
fn load_bench(a: &BenchArgs) -> anyhow::Result<serde_json::Value> {
    use fedlora_simulations::load;
    let started = Instant::now();
    let cfg = load_config(a)?;
    cfg.federation()?;
    let tmp = tempfile::tempdir()?;
    let certs = load::make_certs(&cfg, tmp.path())?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["bench", "load", "--clients", &a.clients.to_string()])
        .args(["--params", &a.params.to_string()])
        .arg("--serve")
        .arg(tmp.path());
    if a.secure {
        cmd.arg("--secure");
    }
    if let Some(c) = &a.codec {
        cmd.args(["--codec", c]);
    }
    let mut child = cmd.stdout(std::process::Stdio::null()).spawn()?;
    let addr_file = tmp.path().join("addr");
    let addr = loop {
        if let Some(addr) = std::fs::read_to_string(&addr_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break addr;
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the load coordinator exited early: {status}");
        }
        anyhow::ensure!(
            started.elapsed().as_secs() < 120,
            "the load coordinator did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let setup_s = started.elapsed().as_secs_f64();
    let rt = tokio::runtime::Runtime::new()?;
    let clients = rt.block_on(load::run_clients(&cfg, addr, &certs))?;
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "the load coordinator failed: {status}");
    let (outcome, rss) = load::read_served(tmp.path(), &cfg)?;
    let report = load::report(&cfg, &outcome, &clients, Some(rss), setup_s, started)?;
    let mut v = serde_json::to_value(&report)?;
    v["client_process_peak_rss_mib"] = json!(peak_rss_mib());
    v["coordinator_kib_per_client"] = json!(rss * 1024.0 / a.clients as f64);
    Ok(v)
}

/// The child side of `bench load`: the coordinator, until its round ends; writes its address,
/// then its outcome and its own peak RSS ([`fedlora_simulations::load::write_served`]).
fn serve_load(a: &BenchArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    use fedlora_simulations::load;
    let cfg = load_config(a)?;
    let rt = tokio::runtime::Runtime::new()?;
    let addr_file = dir.join("addr");
    let out = rt.block_on(load::serve(
        &cfg,
        &dir.join("coordinator"),
        &dir.join("certs"),
        |addr| {
            let tmp = dir.join("addr.tmp");
            if std::fs::write(&tmp, addr.to_string()).is_ok() {
                let _ = std::fs::rename(&tmp, &addr_file);
            }
        },
    ))?;
    load::write_served(dir, &out, peak_rss_mib())?;
    Ok(())
}

/// 100 virtual clients (IID shards of the Shakespeare client text), 20 per round, 5 local steps
/// of batch 32 on the reference LM (rank 8 on q, v), in-process on all cores.
fn simulate_bench(a: &BenchArgs) -> anyhow::Result<serde_json::Value> {
    use fedlora_simulations::output::thread_pool;
    use fedlora_simulations::runner::run_in_process;
    use fedlora_simulations::sweep::SweepConfig;
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
        clients = a.clients,
        per_round = a.per_round,
        rounds = a.rounds
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
        "clients": a.clients,
        "clients_per_round": a.per_round,
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

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Runs this bench in a child process with `threads` rayon threads and parses its JSON.
fn spawn_child(name: &str, threads: usize, reps: usize) -> anyhow::Result<serde_json::Value> {
    let args = ["bench", name, "--reps", &reps.to_string()].map(String::from);
    run_child(&args, threads)
}

pub(crate) fn run(a: BenchArgs) -> anyhow::Result<()> {
    let value = match a.name {
        BenchName::DpStep => dp_step(a.reps)?,
        BenchName::Codec => codec_bench(a.reps)?,
        BenchName::Secagg => secagg_bench(&a)?,
        BenchName::Simulate => simulate_bench(&a)?,
        BenchName::Load => match &a.serve {
            Some(dir) => return serve_load(&a, dir),
            None => load_bench(&a)?,
        },
        BenchName::LlmStep => llm_step_bench(&a)?,
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
