//! `fedlora demo`: certificates, a coordinator on loopback and N clients over real QUIC + mTLS,
//! R rounds of federated LoRA on the pretrained base, and a closing table.

use std::time::{Duration, Instant};

use clap::Args;
use fedlora_client::sdk::{ClientConfig, FederatedClient};
use fedlora_client::transport::ClientTls;
use fedlora_coordinator::certs::{default_server_names, init_certs};
use fedlora_coordinator::store::RoundStatus;
use fedlora_coordinator::{Coordinator, CoordinatorConfig, Event};
use fedlora_protocol::FederationConfig;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::coordinator::FederationArgs;
use super::model::{base_path, ModelArgs};
use super::pretrain::pretrain_to;

#[derive(Args, Debug)]
pub(crate) struct DemoArgs {
    /// Number of clients (each one speaking role of the corpus).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Keep the demo's certificates and state here (default: a temporary directory).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Seed clients' batch sampling and DP noise (default: OS randomness, as a deployment).
    #[arg(long)]
    sampling_seed: Option<u64>,
    /// Train under DP-SGD with this ε per client for the whole run (defaults from the DP
    /// search: clip norm 0.1, expected batch 128, 15 local steps, learning rate 0.01 for the
    /// byte-level model; clip 0.1 and learning rate 0.003 with --model; uniform weighting).
    #[arg(long)]
    epsilon: Option<f64>,
    /// δ of the privacy target.
    #[arg(long, default_value_t = 1e-5)]
    delta: f64,
    /// Secure aggregation: the coordinator sees only the masked sum (DP noise, then the modular
    /// codec, then masking). Uses `--codec modular:…` if given, else modular:8:0.25:0.25:N.
    #[arg(long)]
    secure_aggregation: bool,
    /// Accountant for the clients' calibration and ledgers: rdp or pld.
    #[arg(long, default_value = "rdp")]
    accountant: String,
    #[command(flatten)]
    fed: FederationArgs,
    #[command(flatten)]
    model: ModelArgs,
}

/// The demo's federation defaults with a real LLM (`--model`): 2 rounds, every client each
/// round, 5 local Adam steps of 4 windows (128 tokens) at learning rate 0.002.
fn llm_demo_federation(clients: usize) -> FederationConfig {
    let mut f = demo_federation(clients);
    f.rounds = 2;
    f.train.local_steps = 5;
    f.train.batch_size = 4;
    f.train.learning_rate = 2e-3;
    f.round_timeout_ms = 1_800_000;
    f.eval_timeout_ms = 600_000;
    f
}

/// The demo's federation defaults: 3 rounds, every client each round, 30 local Adam steps of 16
/// windows at learning rate 0.01.
fn demo_federation(clients: usize) -> FederationConfig {
    let mut f = FederationConfig {
        rounds: 3,
        clients_per_round: clients,
        min_clients: clients.div_ceil(2).max(1),
        round_timeout_ms: 600_000,
        start_grace_ms: 30_000,
        eval_timeout_ms: 120_000,
        ..Default::default()
    };
    f.train.local_steps = 30;
    f.train.batch_size = 16;
    f.train.learning_rate = 1e-2;
    f
}

pub(crate) fn run(a: DemoArgs) -> anyhow::Result<()> {
    use super::UsageError;
    super::logging::init(super::logging::LogFormat::Text, "warn");
    if a.clients == 0 {
        return Err(UsageError("--clients must be at least 1".into()).into());
    }
    if a.secure_aggregation && a.clients < 4 {
        return Err(UsageError(format!(
            "--secure-aggregation needs at least 4 --clients (each client shares its secrets \
             among at least 3 others), not {}",
            a.clients
        ))
        .into());
    }
    if let Some(e) = a.epsilon {
        if !(e.is_finite() && e > 0.0) {
            return Err(UsageError(format!("--epsilon must be positive, not {e}")).into());
        }
    }
    a.model.lora()?;
    let llm = a.model.model.is_some();
    let t0 = Instant::now();
    let base = base_path(&a.model.base);
    if !llm && !base.exists() {
        eprintln!(
            "base checkpoint {} missing: pretraining it once (cached for later runs)",
            base.display()
        );
        pretrain_to(&base, &Default::default())?;
    }
    let model = ModelArgs {
        base,
        ..a.model.clone()
    };
    let mut fed = if llm {
        llm_demo_federation(a.clients)
    } else {
        demo_federation(a.clients)
    };
    let mut fed_args = a.fed.clone();
    if a.epsilon.is_some() && !llm {
        // from the DP search on validation text (simulations/configs/tuning_lm_dp*.toml):
        // per-example gradient norms of this model are ~0.1, so clip there; an 8× larger
        // expected batch divides the noise per coordinate by 8 at almost the same σ, and half
        // the steps keep the run's cost (and σ) in check
        fed_args.dp_clip_norm.get_or_insert(0.1);
        fed_args.batch_size.get_or_insert(128);
        fed_args.local_steps.get_or_insert(15);
        fed_args.lr.get_or_insert(1e-2);
    } else if a.epsilon.is_some() {
        fed_args.dp_clip_norm.get_or_insert(0.1);
        fed_args.lr.get_or_insert(3e-3);
    }
    if a.secure_aggregation {
        if !fed_args
            .codec
            .as_deref()
            .unwrap_or("")
            .starts_with("modular")
        {
            fed_args.codec = Some(format!("modular:8:0.25:0.25:{}", a.clients.max(2)));
        }
        fed_args.weighting = Some("uniform".into());
    }
    fed_args.apply(&mut fed)?;
    if a.secure_aggregation {
        let fedlora_protocol::Codec::Modular(p) = &fed.train.codec else {
            unreachable!("set above")
        };
        fed.train.secure = Some(fedlora_protocol::secagg::SecAggParams {
            // more than half the neighbours (everyone else here): safe against an active
            // coordinator without colluding clients (2t > k)
            threshold: fed.clients_per_round / 2 + 1,
            neighbours: 0,
            modulus_bits: p.modulus_bits(),
            collusion: 0,
            stage_timeout_ms: 60_000,
        });
        fed.validate()?;
    }
    let accountant = super::privacy::parse_accountant(&a.accountant)?;
    let privacy = a
        .epsilon
        .map(|epsilon| fedlora_client::privacy::PrivacyTarget {
            epsilon,
            delta: a.delta,
            accountant,
            loss_clip: None,
        });
    let tmp = tempfile::tempdir()?;
    let root = a.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let certs = root.join("certs");
    init_certs(&certs, a.clients, &default_server_names())?;
    let mut cfg = CoordinatorConfig::new(root.join("coordinator"), &certs);
    cfg.listen = "127.0.0.1:0".parse()?;
    cfg.federation = fed.clone();
    let workload = super::workload::Workload::load(&model)?;
    let unit = workload.unit();
    let initial = workload.initial_adapter();
    // the demo holds every client's data, so it measures each global version itself on the
    // pooled held-out windows (token-weighted, as the clients' reports are); DP clients report
    // no evaluation
    let (learners, held_out) = workload.demo(a.clients)?;
    let mut losses = std::collections::BTreeMap::new();
    losses.insert(0u64, held_out(&initial)?);

    let record = super::adapter_record::AdapterRecord::new(&model, initial.spec());
    let record_dir = cfg.data_dir.clone();
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt.block_on(async {
        let coord = Coordinator::start(cfg, initial).await?;
        // what `export --peft` and `eval --data-dir` read back
        super::adapter_record::write(&record_dir, &record)?;
        let addr = coord.local_addr()?;
        let mut events = coord.events();
        let mut clients = tokio::task::JoinSet::new();
        for (i, learner) in learners.into_iter().enumerate() {
            let mut cc = ClientConfig::new(addr, ClientTls::from_dir(&certs, i));
            cc.state_dir = Some(root.join(format!("client-{i}")));
            cc.sampling_seed = a.sampling_seed.map(|s| s + i as u64);
            cc.noise_seed = a.sampling_seed.map(|s| s + 1000 + i as u64);
            cc.privacy = privacy;
            let client = FederatedClient::with_learner(cc, learner)?;
            clients.spawn(async move { (i, client.run().await) });
        }
        let show = !a.json;
        let mut bar: Option<ProgressBar> = None;
        let mut eps = std::collections::BTreeMap::new();
        let started = Instant::now();
        // one loop over the coordinator's events and the clients: a client that fails or
        // panics ends the demo with its error instead of leaving the coordinator waiting
        let mut finished = false;
        while !finished || !clients.is_empty() {
            tokio::select! {
                ev = events.recv(), if !finished => match ev {
                    Ok(Event::RoundStarted { round, participants }) if show => {
                        let b = ProgressBar::new(participants as u64);
                        b.set_style(
                            ProgressStyle::with_template(
                                "round {msg} [{bar:30}] {pos}/{len} uploads ({elapsed})",
                            )
                            .expect("template")
                            .progress_chars("=> "),
                        );
                        b.set_message(round.to_string());
                        bar = Some(b);
                    }
                    Ok(Event::UploadAccepted { .. }) => {
                        if let Some(b) = &bar {
                            b.inc(1);
                        }
                    }
                    Ok(Event::RoundCommitted { round, version }) => {
                        if let Some(b) = bar.take() {
                            b.finish_and_clear();
                        }
                        let (v, g) = coord.global();
                        if v == version {
                            let loss = held_out(&g)?;
                            losses.insert(version, loss);
                            if show {
                                eprintln!(
                                    "round {round} committed: version {version}, held-out loss \
                                     {loss:.4} {unit} (base {:.4}), {:.1} s",
                                    losses[&0],
                                    started.elapsed().as_secs_f64()
                                );
                            }
                        }
                    }
                    Ok(Event::RoundFailed { round, reason }) => {
                        if let Some(b) = bar.take() {
                            b.finish_and_clear();
                        }
                        if show {
                            eprintln!("round {round} failed: {reason}");
                        }
                    }
                    Ok(Event::Finished { .. }) => finished = true,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(e) => anyhow::bail!("coordinator events: {e}"),
                },
                Some(done) = clients.join_next() => match done {
                    Ok((_, Ok(r))) => {
                        if let Some(e) = r.eps_spent {
                            eps.insert(r.client_id, e);
                        }
                    }
                    Ok((i, Err(e))) => anyhow::bail!("client {i} failed: {e}"),
                    Err(e) => anyhow::bail!("a client task panicked: {e}"),
                },
            }
        }
        let success = coord.wait_finished(Duration::from_millis(100)).await;
        let report = coord.report()?;
        coord.shutdown().await;
        anyhow::ensure!(success, "the federation did not complete every round");
        anyhow::Ok((report, eps))
    })?;
    let (report, eps) = report;
    let eval = |v: u64| losses.get(&v).copied();
    let base_loss = eval(0);
    let rounds: Vec<_> = report
        .rounds
        .iter()
        .map(|r| {
            let rec = &r.record;
            let secs = rec
                .ended_ms
                .map(|e| (e.saturating_sub(rec.started_ms)) as f64 / 1e3);
            let status = match &rec.status {
                RoundStatus::Committed { .. } => "committed".to_string(),
                RoundStatus::Failed { reason } => format!("failed: {reason}"),
                RoundStatus::Open => "open".to_string(),
            };
            json!({
                "round": rec.round,
                "status": status,
                "participants": rec.participants.len(),
                "eval_loss": match rec.status {
                    RoundStatus::Committed { version } => eval(version),
                    _ => None,
                },
                "train_loss": rec.train_loss,
                "bytes_up": rec.bytes_up.values().sum::<u64>(),
                "bytes_down": rec.bytes_down.values().sum::<u64>(),
                "secs": secs,
            })
        })
        .collect();
    let final_loss = eval(report.global_version);
    let wall = t0.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            json!({
                "clients": a.clients,
                "codec": fed.train.codec.name(),
                "secure_aggregation": a.secure_aggregation,
                "base_eval_loss": base_loss,
                "final_eval_loss": final_loss,
                "final_version": report.global_version,
                "epsilon_target": a.epsilon,
                "accountant": a.epsilon.map(|_| a.accountant.clone()),
                "delta": a.epsilon.map(|_| a.delta),
                "eps_spent": eps,
                "wall_secs": wall,
                "rounds": rounds,
            })
        );
    } else {
        println!(
            "\n{:>5} {:>12} {:>10} {:>10} {:>12} {:>12} {:>7}",
            "round", "participants", "train", "held-out", "bytes up", "bytes down", "secs"
        );
        let f = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |x| format!("{x:.4}"));
        println!(
            "{:>5} {:>12} {:>10} {:>10} {:>12} {:>12} {:>7}",
            "base",
            "-",
            "-",
            base_loss.map_or("-".into(), |x| format!("{x:.4}")),
            "-",
            "-",
            "-"
        );
        for r in &rounds {
            println!(
                "{:>5} {:>12} {:>10} {:>10} {:>12} {:>12} {:>7}",
                r["round"].to_string(),
                r["participants"].to_string(),
                f(&r["train_loss"]),
                f(&r["eval_loss"]),
                r["bytes_up"].to_string(),
                r["bytes_down"].to_string(),
                r["secs"].as_f64().map_or("-".into(), |x| format!("{x:.1}"))
            );
        }
        if !eps.is_empty() {
            let spent: Vec<String> = eps.iter().map(|(c, e)| format!("{c} {e:.3}")).collect();
            println!(
                "\nε spent per client (target {}, δ {}): {}",
                a.epsilon.unwrap_or(f64::INFINITY),
                a.delta,
                spent.join(", ")
            );
        }
        println!(
            "\nheld-out loss ({unit}): base {} -> final {}; wall time {wall:.1} s",
            base_loss.map_or("-".into(), |x| format!("{x:.4}")),
            final_loss.map_or("-".into(), |x| format!("{x:.4}"))
        );
    }
    Ok(())
}
