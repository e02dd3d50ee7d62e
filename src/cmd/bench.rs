//! `fedlora bench NAME [--json]`: speed and memory measurements (medians, ratios in one run).

use std::time::Instant;

use clap::{Args, ValueEnum};
use fedlora_train::bench::{self, peak_rss_mib, rayon_threads};
use fedlora_train::lora::LoraConfig;
use fedlora_train::train::LocalTrainer;
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
    /// load: as front-end I of a load run prepared in --serve's directory (internal).
    #[arg(long, hide = true, requires = "serve")]
    frontend_index: Option<usize>,
    /// load: the coordinator's store: a postgres:// URL (each run in a fresh schema of its
    /// own, dropped after); default sled in a temporary directory.
    #[arg(long)]
    store: Option<String>,
    /// load: coordinator front-ends (processes) the clients spread over; more than 1 needs
    /// --store postgres://… (one drives, the others relay to it).
    #[arg(long, default_value_t = 1)]
    frontends: usize,
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
        let lora = a.model.lora()?;
        let context = a.model.context.unwrap_or(128);
        let (batch, reps, dtype) = (a.batch, a.reps, a.model.base_dtype);
        return Ok(fedlora_train::llm::bench::llm_step(
            path, &lora, dtype, context, batch, reps,
        )?);
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

/// The trainer of `bench codec`: the committed base model, rank 8 on q, v.
fn codec_trainer() -> anyhow::Result<LocalTrainer> {
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
    model.trainer()
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
    if a.frontends == 0 || (a.frontends > 1 && a.store.is_none()) {
        return Err(super::UsageError(
            "--frontends: at least 1, and more than 1 needs --store postgres://…".into(),
        )
        .into());
    }
    if let Some(s) = &a.store {
        if !s.starts_with("postgres://") && !s.starts_with("postgresql://") {
            return Err(super::UsageError("--store: a postgres:// URL".into()).into());
        }
    }
    Ok(fedlora_simulations::load::LoadConfig {
        clients: a.clients,
        params: a.params,
        secure: a.secure,
        codec,
        store: a.store.clone(),
        ..Default::default()
    })
}

/// `bench load`: certificates, a coordinator in a child process (`--serve`), the synthetic
/// clients in this one; the report joins both sides.
fn load_bench(a: &BenchArgs) -> anyhow::Result<serde_json::Value> {
    use fedlora_simulations::load;
    let started = Instant::now();
    let mut cfg = load_config(a)?;
    cfg.federation()?;
    // a PostgreSQL run starts from a fresh schema of its own
    let schema = match &cfg.store {
        Some(url) => Some(
            fedlora_coordinator::store::scratch::ScratchSchema::create(url)
                .map_err(|e| super::UsageError(format!("--store: {e}")))?,
        ),
        None => None,
    };
    if let Some(s) = &schema {
        cfg.store = Some(s.url());
    }
    let tmp = tempfile::tempdir()?;
    let certs = load::make_certs(&cfg, tmp.path())?;
    let child_cmd = |frontend: Option<usize>| -> anyhow::Result<std::process::Child> {
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
        if let Some(url) = &cfg.store {
            cmd.args(["--store", url]);
        }
        if let Some(i) = frontend {
            cmd.args(["--frontend-index", &i.to_string()]);
        }
        Ok(cmd.stdout(std::process::Stdio::null()).spawn()?)
    };
    let wait_addr = |file: &std::path::Path,
                     child: &mut std::process::Child|
     -> anyhow::Result<std::net::SocketAddr> {
        loop {
            if let Some(addr) = std::fs::read_to_string(file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return Ok(addr);
            }
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("a load coordinator process exited early: {status}");
            }
            anyhow::ensure!(
                started.elapsed().as_secs() < 120,
                "a load coordinator process did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    // the driver first (it takes the lease), then the front-ends that relay to it
    let mut children = vec![child_cmd(None)?];
    let mut addrs = vec![wait_addr(&tmp.path().join("addr"), &mut children[0])?];
    for i in 1..a.frontends {
        let mut c = child_cmd(Some(i))?;
        addrs.push(wait_addr(&tmp.path().join(format!("addr-{i}")), &mut c)?);
        children.push(c);
    }
    let setup_s = started.elapsed().as_secs_f64();
    // the clients' log lines, when asked for (RUST_LOG); none by default
    if std::env::var_os("RUST_LOG").is_some() {
        super::logging::init(super::logging::LogFormat::Text, "warn");
    }
    let rt = tokio::runtime::Runtime::new()?;
    let clients = rt.block_on(load::run_clients(&cfg, &addrs, &certs))?;
    for c in &mut children {
        let status = c.wait()?;
        anyhow::ensure!(
            status.success(),
            "a load coordinator process failed: {status}"
        );
    }
    let (outcome, rss) = load::read_served(tmp.path(), &cfg)?;
    let report = load::report(&cfg, &outcome, &clients, Some(rss), setup_s, started)?;
    let mut v = serde_json::to_value(&report)?;
    let mut frontend_rss = vec![json!(rss)];
    for i in 1..a.frontends {
        let f: serde_json::Value = serde_json::from_slice(&std::fs::read(
            tmp.path().join(format!("frontend-{i}.json")),
        )?)?;
        frontend_rss.push(f["peak_rss_mib"].clone());
    }
    v["store"] = json!(if a.store.is_some() {
        "postgres"
    } else {
        "sled"
    });
    v["frontends"] = json!(a.frontends);
    v["frontend_peak_rss_mib"] = json!(frontend_rss);
    v["client_process_peak_rss_mib"] = json!(peak_rss_mib());
    v["coordinator_kib_per_client"] = json!(rss * 1024.0 / a.clients as f64);
    drop(schema);
    Ok(v)
}

/// The child side of `bench load`: the coordinator, until its round ends; writes its address,
/// then its outcome and its own peak RSS ([`fedlora_simulations::load::write_served`]).
fn serve_load(a: &BenchArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    use fedlora_simulations::load;
    // warnings only, on stderr (RUST_LOG raises it), so a stalled run says why
    super::logging::init(super::logging::LogFormat::Text, "warn");
    let cfg = load_config(a)?;
    let rt = tokio::runtime::Runtime::new()?;
    if let Some(i) = a.frontend_index {
        // a front-end that relays to the driver, with a data directory of its own
        let addr_file = dir.join(format!("addr-{i}"));
        rt.block_on(load::serve_frontend(
            &cfg,
            &dir.join(format!("frontend-{i}")),
            &dir.join("certs"),
            |addr| {
                let tmp = dir.join(format!("addr-{i}.tmp"));
                if std::fs::write(&tmp, addr.to_string()).is_ok() {
                    let _ = std::fs::rename(&tmp, &addr_file);
                }
            },
        ))?;
        std::fs::write(
            dir.join(format!("frontend-{i}.json")),
            serde_json::to_vec(&json!({ "peak_rss_mib": peak_rss_mib() }))?,
        )?;
        return Ok(());
    }
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

/// Runs this bench in a child process with `threads` rayon threads and parses its JSON.
fn spawn_child(name: &str, threads: usize, reps: usize) -> anyhow::Result<serde_json::Value> {
    let args = ["bench", name, "--reps", &reps.to_string()].map(String::from);
    run_child(&args, threads)
}

pub(crate) fn run(a: BenchArgs) -> anyhow::Result<()> {
    let value = match a.name {
        BenchName::DpStep => bench::dp_step(reference_config(Some(LoraConfig::new())), a.reps)?,
        BenchName::Codec => bench::codec(&codec_trainer()?, a.reps)?,
        BenchName::Secagg => secagg_bench(&a)?,
        BenchName::Simulate => {
            fedlora_simulations::bench::simulate(a.clients, a.per_round, a.rounds)?
        }
        BenchName::Load => match &a.serve {
            Some(dir) => return serve_load(&a, dir),
            None => load_bench(&a)?,
        },
        BenchName::LlmStep => llm_step_bench(&a)?,
        BenchName::TrainStep => {
            if a.threads.is_some() {
                bench::train_step(reference_config(Some(LoraConfig::new())), a.reps)?
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
