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

/// One LoRA step of the real LLM `a.model` names, by phase (medians of `a.reps`).
fn llm_step_bench(a: &BenchArgs) -> anyhow::Result<serde_json::Value> {
    use fedlora_client::llm::bench::plain_step_phases;
    use fedlora_client::llm::data::text_examples;
    use fedlora_client::llm::trainer::LlmTrainer;
    let Some(path) = &a.model.model else {
        return Err(super::UsageError("llm-step needs --model PATH".into()).into());
    };
    let context = a.model.context.unwrap_or(128);
    let lora = a.model.lora()?;
    let t0 = Instant::now();
    let trainer = LlmTrainer::load(path, &lora, 0)?;
    let load_s = t0.elapsed().as_secs_f64();
    let role = &fedlora_client::data::split_roles(fedlora_client::data::SHAKESPEARE).clients[0];
    let examples = text_examples(&trainer.llm().tokenizer, &role.text, context)?;
    anyhow::ensure!(examples.len() >= a.batch, "too little text for one batch");
    let batch = &examples[..a.batch];
    let phases = plain_step_phases(
        &trainer,
        &trainer.initial_adapter(),
        batch,
        2,
        a.reps,
        trainer.device(),
    )?;
    Ok(json!({
        "model": path.display().to_string(),
        "shape": {"batch": a.batch, "context": context, "rank": lora.rank, "alpha": lora.alpha,
                  "targets": lora.targets},
        "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "reps": a.reps,
        "load_s": load_s,
        "phases_ms": phases,
        "step_ms": phases.total_ms,
        "tokens_per_s": (a.batch * context) as f64 / (phases.total_ms / 1e3),
        "peak_rss_mib": peak_rss_mib(),
    }))
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

/// Per-phase timers of the secure-aggregation bench, seconds.
#[derive(Default)]
struct SecAggTimes {
    /// Coordinator: collecting keys and shares, closing those stages (roster, graph, routing).
    setup: f64,
    /// Coordinator: unpacking each masked input (m bits per value) and adding it into the
    /// running sum (`receive_input`).
    sum: f64,
    /// Coordinator: survivor view, consistency signatures, unmask responses, mask removal.
    unmask: f64,
}

fn secagg_bench(a: &BenchArgs) -> anyhow::Result<serde_json::Value> {
    use fedlora_protocol::secagg::crypto::{EcdsaP256Signer, P256Verifier};
    use fedlora_protocol::secagg::{add_mod, ClientRound, SecAggParams, SecAggPolicy, ServerRound};
    use rand::RngExt;
    use std::collections::{BTreeMap, BTreeSet};
    let p = SecAggParams {
        threshold: a.threshold,
        neighbours: a.neighbours,
        modulus_bits: a.modulus_bits,
        stage_timeout_ms: 1_000,
    };
    let n = a.clients;
    if n < 2 {
        return Err(super::UsageError(format!(
            "--clients must be at least 2 for secure aggregation, not {n}"
        ))
        .into());
    }
    p.validate(n).map_err(|e| {
        super::UsageError(format!(
            "--clients {n} --neighbours {} --threshold {}: {e}",
            a.neighbours, a.threshold
        ))
    })?;
    let len = a.params;
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(7);
    let sysrng = ring::rand::SystemRandom::new();
    let mut table = BTreeMap::new();
    let mut parties = Vec::new();
    let policy = SecAggPolicy {
        min_neighbours: 0,
        min_survivors: 0,
        required: true,
    };
    for i in 0..n {
        let id = format!("client-{i:03}");
        let pk = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &sysrng,
        )
        .map_err(|_| anyhow::anyhow!("keygen"))?;
        let signer = EcdsaP256Signer::from_pkcs8(pk.as_ref())?;
        table.insert(id.clone(), signer.public_key());
        let round = ClientRound::new(1, &id, p.clone(), policy, &mut rng);
        parties.push((id, round, signer));
    }
    let verifier = P256Verifier(table);
    let ids: BTreeSet<String> = parties.iter().map(|c| c.0.clone()).collect();
    let mut server = ServerRound::new(1, p.clone(), len, ids);
    let mut co = SecAggTimes::default();
    // per client: keys, shares, mask (masked input), unmask (consistency + unmask answer)
    let mut keys_s = vec![0f64; n];
    let mut shares_s = vec![0f64; n];
    let mut mask_s = vec![0f64; n];
    let mut unmask_s = vec![0f64; n];
    let mut bytes = vec![0usize; n];
    for (i, (id, r, s)) in parties.iter_mut().enumerate() {
        let t0 = Instant::now();
        let k = r.advertise(s)?;
        keys_s[i] += t0.elapsed().as_secs_f64();
        bytes[i] += 96 + k.signature.len() + id.len();
        let t0 = Instant::now();
        server.receive_keys(id, k)?;
        co.setup += t0.elapsed().as_secs_f64();
    }
    let t0 = Instant::now();
    let (roster, graph_seed) = server.close_keys()?;
    co.setup += t0.elapsed().as_secs_f64();
    for (i, (id, r, _)) in parties.iter_mut().enumerate() {
        let t0 = Instant::now();
        let shares = r.share_keys(&roster, &graph_seed, &verifier, &mut rng)?;
        shares_s[i] += t0.elapsed().as_secs_f64();
        bytes[i] += shares
            .iter()
            .map(|s| s.ciphertext.len() + 2 * id.len())
            .sum::<usize>();
        let t0 = Instant::now();
        server.receive_shares(id, shares)?;
        co.setup += t0.elapsed().as_secs_f64();
    }
    let t0 = Instant::now();
    let deliveries = server.close_shares()?;
    co.setup += t0.elapsed().as_secs_f64();
    // drop clients after sharing keys, before the masked input, placed (greedily) so that every
    // neighbourhood keeps at least t survivors
    let drop_n = (n as f64 * a.dropout).round() as usize;
    let graph = fedlora_protocol::secagg::neighbour_graph(
        &parties.iter().map(|c| c.0.clone()).collect(),
        &p,
        &graph_seed,
    );
    let index: BTreeMap<&str, usize> = parties
        .iter()
        .enumerate()
        .map(|(i, c)| (c.0.as_str(), i))
        .collect();
    let mut dropped: BTreeSet<usize> = BTreeSet::new();
    for cand in 0..n {
        if dropped.len() == drop_n {
            break;
        }
        let mut trial = dropped.clone();
        trial.insert(cand);
        let ok = graph.values().all(|nb| {
            nb.iter()
                .filter(|v| !trial.contains(&index[v.as_str()]))
                .count()
                >= a.threshold
        });
        if ok {
            dropped = trial;
        }
    }
    anyhow::ensure!(
        dropped.len() == drop_n,
        "cannot place {drop_n} dropouts keeping t survivors"
    );
    let mask = (1u64 << a.modulus_bits) - 1;
    let mut plain = vec![0u64; len];
    for (i, (id, r, _)) in parties.iter_mut().enumerate() {
        if dropped.contains(&i) {
            continue;
        }
        let x: Vec<u64> = (0..len).map(|_| rng.random::<u64>() & mask).collect();
        add_mod(&mut plain, &x, a.modulus_bits);
        let t0 = Instant::now();
        let y = r.masked_input(&deliveries[id.as_str()], &x)?;
        let mut packed = Vec::new();
        fedlora_protocol::codec::bits::pack(y, a.modulus_bits, &mut packed);
        mask_s[i] += t0.elapsed().as_secs_f64();
        bytes[i] += packed.len();
        let t0 = Instant::now();
        let y = fedlora_protocol::codec::bits::unpack(&packed, len, a.modulus_bits)
            .ok_or_else(|| anyhow::anyhow!("masked input of the wrong length"))?;
        server.receive_input(id, y)?;
        co.sum += t0.elapsed().as_secs_f64();
    }
    let t0 = Instant::now();
    let view = server.close_inputs()?;
    co.unmask += t0.elapsed().as_secs_f64();
    for (i, (id, r, s)) in parties.iter_mut().enumerate() {
        if dropped.contains(&i) {
            continue;
        }
        let t0 = Instant::now();
        let sig = r.consistency(&view, s)?;
        unmask_s[i] += t0.elapsed().as_secs_f64();
        bytes[i] += sig.len();
        let t0 = Instant::now();
        server.receive_consistency(id, sig)?;
        co.unmask += t0.elapsed().as_secs_f64();
    }
    let t0 = Instant::now();
    let (req, sigs) = server.close_consistency()?;
    co.unmask += t0.elapsed().as_secs_f64();
    for (i, (_, r, _)) in parties.iter_mut().enumerate() {
        if dropped.contains(&i) {
            continue;
        }
        let t0 = Instant::now();
        let resp = r.unmask(&req, &sigs, &verifier)?;
        unmask_s[i] += t0.elapsed().as_secs_f64();
        bytes[i] += resp
            .seed_shares
            .values()
            .chain(resp.key_shares.values())
            .map(|v| v.len() + 16)
            .sum::<usize>();
        let t0 = Instant::now();
        server.receive_unmask(resp)?;
        co.unmask += t0.elapsed().as_secs_f64();
    }
    let t0 = Instant::now();
    let (sum, counted) = server.finish()?;
    co.unmask += t0.elapsed().as_secs_f64();
    let alive: Vec<usize> = (0..n).filter(|i| !dropped.contains(i)).collect();
    let med = |v: &[f64]| {
        let mut x: Vec<f64> = alive.iter().map(|&i| v[i]).collect();
        median(&mut x) * 1e3
    };
    let total: Vec<f64> = (0..n)
        .map(|i| keys_s[i] + shares_s[i] + mask_s[i] + unmask_s[i])
        .collect();
    let mut b: Vec<f64> = alive.iter().map(|&i| bytes[i] as f64).collect();
    Ok(json!({
        "clients": n,
        "params": len,
        "dropout": a.dropout,
        "neighbours": p.k(n),
        "threshold": a.threshold,
        "modulus_bits": a.modulus_bits,
        "client": {
            "keys_ms": med(&keys_s),
            "shares_ms": med(&shares_s),
            "mask_ms": med(&mask_s),
            "unmask_ms": med(&unmask_s),
            "total_ms": med(&total),
        },
        "coordinator": {
            "setup_ms": co.setup * 1e3,
            "sum_ms": co.sum * 1e3,
            "unmask_ms": co.unmask * 1e3,
            "total_ms": (co.setup + co.sum + co.unmask) * 1e3,
        },
        "bytes_per_client": median(&mut b),
        "counted": counted.len(),
        "exact": sum == plain,
    }))
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
        BenchName::DpStep => dp_step(a.reps)?,
        BenchName::Codec => codec_bench(a.reps)?,
        BenchName::Secagg => secagg_bench(&a)?,
        BenchName::Simulate => simulate_bench(&a)?,
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
