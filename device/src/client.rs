//! `fedlora client`: one device taking part in a federation.

use std::path::PathBuf;

use clap::Args;
use fedlora_client::eligibility::{
    LinuxEligibility, LinuxEligibilityConfig, SharedEligibility, TimeWindow,
};
use fedlora_client::sdk::{ClientConfig, EarlyStop, FederatedClient, TrainingLimits};
use fedlora_client::transport::ClientTls;

use crate::logging::{self, LogFormat};
use crate::model_args::ModelArgs;
use crate::UsageError;

/// Flags of one federated client (`fedlora client`, `fedlora-device run`).
#[derive(Args, Debug)]
pub struct ClientArgs {
    /// Coordinator HOST:PORT; with several front-ends (a coordinator on PostgreSQL), a
    /// comma-separated list, or a name that resolves to several addresses: after a failure
    /// the client tries the next one.
    #[arg(long)]
    coordinator: String,
    /// Certificate directory made by `fedlora certs init` (with --client-index).
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Use the I-th client certificate of --certs; also picks the I-th demo data shard.
    #[arg(long)]
    client_index: Option<usize>,
    /// This client's certificate (PEM), instead of --certs/--client-index.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// This client's key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// The federation CA (PEM).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Name on the coordinator's certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// The client's own text file (default: the I-th demo client's speaking role); with
    /// --model, a `.jsonl` file is chat data ({"messages": [...]} or {"prompt", "response"}
    /// per line, scored on the assistant's tokens).
    #[arg(long)]
    data: Option<PathBuf>,
    /// State directory (unacknowledged uploads survive restarts here; an enrolled device's key
    /// and certificate live here too).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// This client's privacy target ε for the whole campaign (then it trains only under DP).
    #[arg(long)]
    epsilon: Option<f64>,
    /// δ of the privacy target.
    #[arg(long, default_value_t = 1e-5)]
    delta: f64,
    /// Accountant for calibration and the budget ledger: rdp or pld.
    #[arg(long, default_value = "rdp")]
    accountant: String,
    /// Under --epsilon, also send each round's training loss, released through the Gaussian
    /// mechanism on per-example losses clipped to [0, L] nats/byte (accounted with every step;
    /// σ grows by √2 for the same ε). Off by default: no loss leaves the device.
    #[arg(long, value_name = "L", requires = "epsilon")]
    release_train_loss: Option<f64>,
    /// Keep retrying after failures that waiting cannot heal (unknown CA, bad signature, wrong
    /// --server-name, a revoked certificate); by default they end the client with exit code 3.
    #[arg(long)]
    retry_forever: bool,
    /// The largest LoRA rank this device trains (e.g. chosen from its memory). Below the
    /// federation's rank it receives the rank slice of the global adapter and uploads its delta
    /// zero-padded (heterogeneous ranks).
    #[arg(long)]
    max_rank: Option<u32>,
    /// Client-level DP: the most ε this client accepts from a plan, counted against the
    /// coordinator, ε (b), unless --trust-coordinator (then ε (a)). Without it the client
    /// takes part in any consistent distributed plan, never a central one (and still records
    /// what it is charged).
    #[arg(long, value_name = "E")]
    client_dp_epsilon: Option<f64>,
    /// Client-level DP: trust the coordinator to sample honestly and keep the sample secret
    /// (needed for central mode; spends by ε (a)).
    #[arg(long, requires = "client_dp_epsilon")]
    trust_coordinator: bool,
    /// Client-level DP: the fewest min_clients (signed survivors) a plan may have.
    #[arg(long, value_name = "N", requires = "client_dp_epsilon")]
    client_dp_min_clients: Option<usize>,
    /// Client-level DP: the fewest colluding clients a plan must tolerate.
    #[arg(long, value_name = "C", requires = "client_dp_epsilon")]
    client_dp_min_collusion: Option<usize>,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

/// What the device allows: threads, time, and when it may train at all.
#[derive(Args, Debug)]
pub struct DeviceArgs {
    /// Threads for training and evaluation (default: every core).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Uploads larger than this go in resumable pieces of this many bytes (a lost link costs
    /// only the piece in flight).
    #[arg(long, value_name = "BYTES", default_value_t = fedlora_protocol::resumable::DEFAULT_UPLOAD_CHUNK)]
    upload_chunk: usize,
    /// The longest local training per round (e.g. 90s, 5m); training stops there.
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
    max_train_time: Option<std::time::Duration>,
    /// A connection silent this long counts as lost and is reopened (the QUIC idle timeout; a
    /// connection's is the smaller of the client's and the coordinator's 60 s).
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration, default_value = "60s")]
    idle_timeout: std::time::Duration,
    /// How long one connection attempt (QUIC + TLS handshake) may take before the coordinator
    /// counts as unreachable and the next attempt waits out the backoff.
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration, default_value = "10s")]
    connect_timeout: std::time::Duration,
    /// Time kept back from the round's deadline for encoding and the upload.
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration, default_value = "5s")]
    upload_margin: std::time::Duration,
    /// When training must stop early (deadline, --max-train-time, eligibility lost): upload
    /// what it has, or decline the round.
    #[arg(long, value_enum, default_value = "upload")]
    early_stop: EarlyStopArg,
    /// When the device may train: `always`, or `linux` (mains power or a charged battery from
    /// /sys/class/power_supply, the load average from /proc/loadavg, --train-window), checked
    /// before each round and each local step.
    #[arg(long, value_enum, default_value = "always")]
    eligibility: EligibilityArg,
    /// With --eligibility linux: train on battery too (above --min-battery).
    #[arg(long)]
    allow_battery: bool,
    /// With --eligibility linux: the least battery charge, percent.
    #[arg(long, value_name = "PCT", default_value_t = 50)]
    min_battery: u8,
    /// With --eligibility linux: the highest 1-minute load average per core (0: no limit).
    #[arg(long, value_name = "LOAD", default_value_t = 0.8)]
    max_load: f64,
    /// With --eligibility linux: train only between these UTC times, e.g. 22:00-06:00.
    #[arg(long, value_name = "HH:MM-HH:MM")]
    train_window: Option<String>,
    /// With --eligibility linux: where the kernel lists power supplies.
    #[arg(long, value_name = "DIR", default_value = "/sys/class/power_supply")]
    power_supply_dir: PathBuf,
}

/// `--early-stop`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum EarlyStopArg {
    Upload,
    Decline,
}

/// `--eligibility`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum EligibilityArg {
    Always,
    Linux,
}

impl DeviceArgs {
    /// The SDK's training limits.
    pub fn limits(&self) -> Result<TrainingLimits, UsageError> {
        if self.threads == Some(0) {
            return Err(UsageError("--threads must be at least 1".into()));
        }
        Ok(TrainingLimits {
            max_threads: self.threads,
            max_train_secs: self.max_train_time.map(|d| d.as_secs_f64()),
            upload_margin_ms: self.upload_margin.as_millis() as u64,
            early_stop: match self.early_stop {
                EarlyStopArg::Upload => EarlyStop::Upload,
                EarlyStopArg::Decline => EarlyStop::Decline,
            },
        })
    }

    /// The eligibility check the flags describe (`None`: always eligible).
    pub fn eligibility(&self) -> Result<Option<SharedEligibility>, UsageError> {
        if self.eligibility == EligibilityArg::Always {
            return Ok(None);
        }
        if !(self.max_load.is_finite() && self.max_load >= 0.0) || self.min_battery > 100 {
            return Err(UsageError(
                "--max-load must be ≥ 0 and --min-battery a percentage".into(),
            ));
        }
        let window = self
            .train_window
            .as_deref()
            .map(TimeWindow::parse)
            .transpose()
            .map_err(UsageError)?;
        Ok(Some(std::sync::Arc::new(LinuxEligibility::new(
            LinuxEligibilityConfig {
                power_supply_dir: self.power_supply_dir.clone(),
                require_mains: !self.allow_battery,
                min_battery_percent: self.min_battery,
                max_load_per_core: (self.max_load > 0.0).then_some(self.max_load),
                window,
                ..Default::default()
            },
        ))))
    }
}

/// Runs one client until the federation finishes, then prints what it did.
pub fn run(a: ClientArgs) -> anyhow::Result<()> {
    logging::init(a.log_format, "info");
    let addrs = crate::resolve_all("--coordinator", &a.coordinator)?;
    let addr = addrs[0];
    let tls = match (&a.certs, a.client_index, &a.cert, &a.key, &a.ca) {
        (Some(dir), Some(i), None, None, None) => ClientTls::from_dir(dir, i),
        (None, _, Some(cert), Some(key), Some(ca)) => ClientTls {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        },
        (None, _, None, None, None)
            if a.state_dir
                .as_ref()
                .is_some_and(|d| ClientTls::from_state_dir(d).cert.exists()) =>
        {
            // enrolled with `fedlora-device enroll --state-dir`
            ClientTls::from_state_dir(a.state_dir.as_ref().expect("checked"))
        }
        _ => {
            return Err(UsageError(
                "give --certs DIR --client-index I, or --cert, --key and --ca, or the \
                 --state-dir of an enrolled device"
                    .into(),
            )
            .into())
        }
    };
    if a.data.is_none() && a.client_index.is_none() {
        return Err(UsageError("give --data FILE or --client-index I".into()).into());
    }
    // a data or config error exits with 2 (see `exit_code`)
    let workload = crate::workload::Workload::load(&a.model)?;
    let learner = workload.learner(a.data.as_deref(), a.client_index)?;
    let mut cfg = ClientConfig::new(addr, tls);
    cfg.alternates = addrs[1..].to_vec();
    cfg.server_name = a.server_name;
    let state_dir = a.state_dir.clone();
    cfg.state_dir = a.state_dir;
    cfg.retry_forever = a.retry_forever;
    cfg.timers = fedlora_client::transport::TransportTimers {
        idle_timeout: a.device.idle_timeout,
        connect_timeout: a.device.connect_timeout,
    };
    cfg.timers
        .validate()
        .map_err(|e| UsageError(format!("--idle-timeout / --connect-timeout: {e}")))?;
    if a.max_rank == Some(0) {
        return Err(UsageError("--max-rank must be at least 1".into()).into());
    }
    cfg.max_rank = a.max_rank;
    let accountant = crate::parse_accountant(&a.accountant)?;
    cfg.privacy = a
        .epsilon
        .map(|epsilon| fedlora_client::privacy::PrivacyTarget {
            epsilon,
            delta: a.delta,
            accountant,
            loss_clip: a.release_train_loss,
        });
    cfg.client_dp = a.client_dp_epsilon.map(|max_epsilon| {
        let d = fedlora_protocol::client_dp::ClientDpPolicy::default();
        fedlora_protocol::client_dp::ClientDpPolicy {
            max_epsilon,
            max_delta: a.delta,
            min_clients: a.client_dp_min_clients.unwrap_or(d.min_clients),
            min_collusion: a.client_dp_min_collusion.unwrap_or(d.min_collusion),
            trust_coordinator: a.trust_coordinator,
        }
    });
    for p in [&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key] {
        if !p.exists() {
            return Err(UsageError(format!(
                "{} not found (make certificates with `fedlora certs init`)",
                p.display()
            ))
            .into());
        }
    }
    cfg.limits = a.device.limits()?;
    if !(1024..=fedlora_protocol::resumable::MAX_UPLOAD_CHUNK).contains(&a.device.upload_chunk) {
        return Err(UsageError(format!(
            "--upload-chunk must be 1024 to {} bytes",
            fedlora_protocol::resumable::MAX_UPLOAD_CHUNK
        ))
        .into());
    }
    cfg.upload_chunk_bytes = a.device.upload_chunk;
    let mut client = FederatedClient::with_learner(cfg, learner)?;
    if let Some(check) = a.device.eligibility()? {
        client = client.with_eligibility(check);
    }
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt
        .block_on(client.run())
        .map_err(|e| explain(e, &a.model))?;
    let eps = spent(report.eps_spent, state_dir.as_deref())?;
    let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
    let declined: Vec<String> = report
        .declined
        .iter()
        .map(|(r, why)| format!("{r} ({why})"))
        .collect();
    println!(
        "{}: uploaded in rounds [{}], declined [{}], final version {}, ε spent {}, sent {} \
         bytes, received {}, {} upload(s) and {} download(s) resumed, peak RSS {:.1} MiB",
        report.client_id,
        list(&report.rounds),
        declined.join(", "),
        report
            .final_version
            .map_or("none".into(), |v| v.to_string()),
        eps,
        report.bytes_up,
        report.bytes_down,
        report.resumed_uploads,
        report.resumed_downloads,
        crate::peak_rss_mib(),
    );
    Ok(())
}

/// What the closing line says of ε: the example-level ledger's ε, or the client-level ε (a)
/// and (b) from the device's own record (composed over every plan it took part under), or
/// that there was no privacy target.
fn spent(
    example_level: Option<f64>,
    state_dir: Option<&std::path::Path>,
) -> anyhow::Result<String> {
    if let Some(e) = example_level {
        return Ok(format!("{e:.4}"));
    }
    let rec = fedlora_client::client_dp::ClientDpRecord::load(state_dir)?;
    if rec.plans.iter().all(|p| p.rounds.is_empty()) {
        return Ok("none (no privacy target)".into());
    }
    let delta = rec.max_delta();
    Ok(format!(
        "client-level (a) {:.4}, (b) {:.4} at δ = {delta}",
        rec.observer_epsilon(delta)?,
        rec.coordinator_epsilon(delta)?
    ))
}

/// A client failure in the user's words: which flags must agree on a spec mismatch.
fn explain(e: fedlora_client::error::ClientError, model: &ModelArgs) -> anyhow::Error {
    use fedlora_client::error::ClientError;
    use fedlora_protocol::RefusalCode;
    match e {
        ClientError::Refused(r) if r.code == RefusalCode::SpecMismatch => {
            anyhow::Error::new(UsageError(format!(
                "the coordinator serves another adapter ({}). The coordinator and every client \
                 must use the same --rank, --alpha, --targets and --ffa; this client has {}",
                r.message,
                model.describe()
            )))
        }
        ClientError::Refused(r) if r.code == RefusalCode::VersionMismatch => {
            anyhow::Error::new(UsageError(format!(
                "{}: install the same fedlora version as the coordinator",
                r.message
            )))
        }
        other => other.into(),
    }
}
