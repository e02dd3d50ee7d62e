//! `fedlora coordinator`: runs the federation service until its rounds are done.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use fedlora_coordinator::privacy_plan::ClientDpRequest;
use fedlora_coordinator::store::StoreLocation;
use fedlora_coordinator::{Coordinator, CoordinatorConfig, TlsPaths};
use fedlora_protocol::client_dp::ClientDpMode;
use fedlora_protocol::{Codec, FederationConfig, TrainConfig, Weighting};
use serde::{Deserialize, Serialize};

use super::logging::{self, LogFormat};
use super::model::ModelArgs;
use super::UsageError;

/// Round and training flags shared by `coordinator` and `demo`.
#[derive(Args, Debug, Clone)]
pub(crate) struct FederationArgs {
    /// Rounds to commit.
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Clients sampled per round.
    #[arg(long)]
    pub clients_per_round: Option<usize>,
    /// Fewest uploads a round needs.
    #[arg(long)]
    pub min_clients: Option<usize>,
    /// Round deadline: seconds, or a duration with units (30s, 5m, 1h). In async mode: how
    /// long a buffer waits before it commits with --min-buffer updates.
    #[arg(long, value_parser = parse_duration)]
    pub round_timeout: Option<Duration>,
    /// "sync" (sampled rounds) or "async" (buffered asynchronous aggregation, FedBuff: any
    /// connected device trains on the newest version; --buffer updates commit the next one).
    #[arg(long)]
    pub mode: Option<String>,
    /// Async: accepted updates that commit a version, K.
    #[arg(long)]
    pub buffer: Option<usize>,
    /// Async: fewest updates that commit a version once it has waited --round-timeout
    /// (default: --buffer).
    #[arg(long)]
    pub min_buffer: Option<usize>,
    /// Async: the stalest update accepted, in versions committed since it was offered.
    #[arg(long)]
    pub max_staleness: Option<u64>,
    /// Async: staleness weight s(τ): constant, poly:A ((1+τ)^-A, default poly:0.5) or
    /// hinge:A,B (1 up to B, then 1/(A(τ-B)+1)).
    #[arg(long)]
    pub staleness: Option<String>,
    /// Async: the most devices training at once (0: no limit); others are told to wait.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Local optimizer steps per round.
    #[arg(long)]
    pub local_steps: Option<u32>,
    /// Windows per local step.
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Local learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Clients' local optimizer: adam (default) or sgd.
    #[arg(long)]
    pub local_optimizer: Option<String>,
    /// Upload codec: dense-f32, f16, q8, q4, q2, q1, topk:F, subset:F, or modular:B:C:F:W
    /// (the one secure aggregation needs; see docs/src/strategies.md).
    #[arg(long)]
    pub codec: Option<String>,
    /// Aggregation weights: example-count or uniform.
    #[arg(long)]
    pub weighting: Option<String>,
    /// Seed of client sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// How the global adapter goes down: full (dense f32, exact) or f16-delta (against what
    /// each client reconstructed).
    #[arg(long)]
    pub downlink: Option<String>,
    /// Run DP-SGD rounds: the per-example clip norm C the plan proposes (clients calibrate σ
    /// to their own ε). Implies uniform weighting.
    #[arg(long)]
    pub dp_clip_norm: Option<f64>,
    /// Async mode with DP: each device's participation bound P. With DP-SGD the most local
    /// runs its plan covers (σ is calibrated for P runs); with --client-dp the most updates it
    /// contributes (the plan's σ covers P participations at q = 1). Devices decline past it.
    /// Default: --rounds (one per version). Sync mode plans every round.
    #[arg(long, value_name = "P")]
    pub dp_participations: Option<u64>,
    /// Aggregation strategy: fed-avg, fed-prox, fed-adam, fed-yogi, fed-adagrad (these need
    /// only the sum: fine under DP and secure aggregation), median, trimmed-mean or het-lora
    /// (need each update: plaintext only). See docs/src/strategies.md.
    #[arg(long)]
    pub strategy: Option<String>,
    /// Server learning rate η of a server-optimizer strategy (default 0.01).
    #[arg(long)]
    pub server_lr: Option<f64>,
    /// FedProx's proximal weight μ (default 0.01); needs --strategy fed-prox.
    #[arg(long)]
    pub proximal_mu: Option<f64>,
    /// The trimmed mean's share β trimmed at each end (default 0.2); needs --strategy
    /// trimmed-mean.
    #[arg(long)]
    pub trim: Option<f64>,
    /// Norm-bounded updates: clients scale their whole update to L2 norm ≤ B before encoding;
    /// a plaintext update whose decoded norm exceeds B·(1 + the codec's error bound) is
    /// refused. Implies uniform weighting. Bounds honest clients only under masking.
    #[arg(long)]
    pub max_update_norm: Option<f64>,
}

use fedlora_device::parse_duration;

/// The TOML config file of `fedlora coordinator --config FILE`; flags override it. Every key,
/// with its default and unit, is in `examples/configs/coordinator.toml` (a test checks that it
/// names them all; `Serialize` is for that test, which lists the keys).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CoordinatorToml {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    /// `sled` (the default) or a `postgres://` URL.
    store: Option<String>,
    certs: Option<PathBuf>,
    log_format: Option<String>,
    metrics: Option<SocketAddr>,
    /// MiB of upload bodies read at once over all connections (default 256; at least 64): the
    /// uploads' term of the memory bound (docs/src/coordinator.md).
    payload_budget_mib: Option<usize>,
    /// Polls per second invited over all connected clients, every front-end's included
    /// (default 2,000): a waiting client is told to poll again after max(`poll_interval_ms`,
    /// connected clients ÷ this).
    max_polls_per_s: Option<u64>,
    /// The least delay a waiting client is told to poll again after, ms (default 200).
    poll_interval_ms: Option<u64>,
    federation: Option<FederationConfig>,
    /// Client-level DP (`[client_dp]`: mode, clip, target_epsilon, delta, collusion,
    /// eligible, bits, beta, headroom).
    client_dp: Option<ClientDpRequest>,
}

/// Client-level DP flags of `coordinator` (override the config file's `[client_dp]`).
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct ClientDpArgs {
    /// Client-level DP-FedAvg (the unit is a whole client): `central` (this coordinator adds
    /// Gaussian noise to the plaintext sum; clients must trust it) or `distributed` (each client
    /// adds a share of Skellam noise inside secure aggregation; this coordinator learns only the
    /// noisy sum). Needs --client-clip and --target-epsilon. See docs/src/privacy.md.
    #[arg(long, value_name = "MODE")]
    pub client_dp: Option<String>,
    /// S: each client clips its whole update to this L2 norm.
    #[arg(long, value_name = "S")]
    pub client_clip: Option<f64>,
    /// Target client-level ε (a), against observers of the released models, over the campaign.
    #[arg(long, value_name = "E")]
    pub target_epsilon: Option<f64>,
    /// δ of the client-level guarantee (default 1e-5).
    #[arg(long, value_name = "D")]
    pub delta: Option<f64>,
    /// c: colluding or Sybil clients the distributed noise, and secure aggregation's threshold
    /// (2t > k + c), tolerate (default 0).
    #[arg(long, value_name = "C")]
    pub collusion: Option<usize>,
    /// Eligible clients sampled from (q = clients per round ÷ this; default: the config file's
    /// `[federation] wait_for_clients`).
    #[arg(long, value_name = "N")]
    pub eligible: Option<usize>,
    /// Distributed mode: bits per coordinate of the masked sum (default 16).
    #[arg(long, value_name = "B")]
    pub client_dp_bits: Option<u8>,
    /// Async mode: M, the fewest versions between two updates of one device (default 1). Each
    /// device's participation bound P is --dp-participations (default --rounds).
    #[arg(long, value_name = "M")]
    pub client_dp_min_gap: Option<u64>,
}

impl ClientDpArgs {
    /// The request from the config file's `[client_dp]` and these flags (`None`: none).
    pub(crate) fn request(
        &self,
        file: Option<ClientDpRequest>,
        fed: &FederationConfig,
        participations: Option<u64>,
    ) -> anyhow::Result<Option<ClientDpRequest>> {
        let mode = match self.client_dp.as_deref() {
            Some(m) => Some(
                m.parse::<ClientDpMode>()
                    .map_err(|e| UsageError(format!("--client-dp: {e}")))?,
            ),
            None => None,
        };
        let mut req = match (file, mode) {
            (None, None) => {
                let stray = self.client_clip.is_some()
                    || self.target_epsilon.is_some()
                    || self.collusion.is_some()
                    || self.eligible.is_some()
                    || self.client_dp_bits.is_some()
                    || self.client_dp_min_gap.is_some();
                if stray {
                    return Err(UsageError(
                        "--client-clip, --target-epsilon, --collusion, --eligible, \
                         --client-dp-bits and --client-dp-min-gap need --client-dp \
                         central|distributed (--collusion also goes with --secure-aggregation)"
                            .into(),
                    )
                    .into());
                }
                return Ok(None);
            }
            (Some(mut r), m) => {
                if let Some(m) = m {
                    r.mode = m;
                }
                r
            }
            (None, Some(m)) => {
                let (Some(clip), Some(eps)) = (self.client_clip, self.target_epsilon) else {
                    return Err(UsageError(
                        "--client-dp needs --client-clip S and --target-epsilon E".into(),
                    )
                    .into());
                };
                ClientDpRequest::new(m, clip, eps, fed.wait_for_clients)
            }
        };
        if let Some(v) = self.client_clip {
            req.clip = v;
        }
        if let Some(v) = self.target_epsilon {
            req.target_epsilon = v;
        }
        if let Some(v) = self.delta {
            req.delta = v;
        }
        if let Some(v) = self.collusion {
            req.collusion = v;
        }
        if let Some(v) = self.eligible {
            req.eligible = v;
        }
        if let Some(v) = self.client_dp_bits {
            req.bits = v;
        }
        if let Some(v) = self.client_dp_min_gap {
            req.min_gap = v;
        }
        if participations.is_some() {
            if fed.mode != fedlora_protocol::Mode::Async {
                return Err(UsageError(
                    "--dp-participations bounds each device's updates in async mode; a sync \
                     campaign's client-level plan covers every round"
                        .into(),
                )
                .into());
            }
            req.participations = participations;
        }
        Ok(Some(req))
    }
}

impl FederationArgs {
    /// Applies the flags that are set over `f`.
    pub(crate) fn apply(&self, f: &mut FederationConfig) -> anyhow::Result<()> {
        if let Some(v) = self.rounds {
            f.rounds = v;
        }
        if let Some(v) = self.clients_per_round {
            f.clients_per_round = v;
        }
        if let Some(v) = self.min_clients {
            f.min_clients = v;
        }
        if let Some(v) = self.round_timeout {
            f.round_timeout_ms = v.as_millis() as u64;
        }
        if let Some(v) = &self.mode {
            f.mode = v.parse().map_err(|e| UsageError(format!("--mode: {e}")))?;
        }
        if let Some(v) = self.buffer {
            f.buffer = v;
        }
        if let Some(v) = self.min_buffer {
            f.min_buffer = v;
        }
        if let Some(v) = self.max_staleness {
            f.max_staleness = v;
        }
        if let Some(v) = self.concurrency {
            f.concurrency = v;
        }
        if let Some(v) = &self.staleness {
            f.staleness = v
                .parse()
                .map_err(|e| UsageError(format!("--staleness: {e}")))?;
        }
        let t: &mut TrainConfig = &mut f.train;
        if let Some(v) = self.local_steps {
            t.local_steps = v;
        }
        if let Some(v) = self.batch_size {
            t.batch_size = v;
        }
        if let Some(v) = self.lr {
            t.learning_rate = v;
        }
        if let Some(v) = &self.local_optimizer {
            t.optimizer = match v.as_str() {
                "adam" => fedlora_protocol::LocalOptimizer::Adam,
                "sgd" => fedlora_protocol::LocalOptimizer::Sgd,
                other => {
                    return Err(UsageError(format!(
                        "unknown --local-optimizer `{other}` (adam, sgd)"
                    ))
                    .into())
                }
            };
        }
        if let Some(v) = &self.codec {
            t.codec = Codec::from_name(v).map_err(|e| UsageError(e.to_string()))?;
        }
        if let Some(v) = &self.weighting {
            t.weighting = match v.as_str() {
                "example-count" => Weighting::ExampleCount,
                "uniform" => Weighting::Uniform,
                other => {
                    return Err(UsageError(format!(
                        "unknown weighting `{other}` (example-count, uniform)"
                    ))
                    .into())
                }
            };
        }
        if let Some(v) = self.seed {
            f.seed = v;
        }
        if let Some(d) = &self.downlink {
            f.train.downlink = match d.as_str() {
                "full" => fedlora_protocol::Downlink::Full,
                "f16-delta" => fedlora_protocol::Downlink::F16Delta,
                other => {
                    return Err(
                        UsageError(format!("unknown downlink `{other}` (full, f16-delta)")).into(),
                    )
                }
            };
        }
        if let Some(c) = self.dp_clip_norm {
            f.train.dp = Some(fedlora_protocol::DpPlan {
                clip_norm: c,
                planned_rounds: f.rounds,
            });
            f.train.weighting = Weighting::Uniform;
        }
        if let Some(dp) = f.train.dp.as_mut() {
            dp.planned_rounds = match self.dp_participations {
                Some(p) if f.mode == fedlora_protocol::Mode::Async => p,
                Some(_) => {
                    return Err(UsageError(
                        "--dp-participations bounds each device's runs in async mode; a sync \
                         campaign's DP plan covers every round"
                            .into(),
                    )
                    .into())
                }
                // async: a file's bound stays (each device's runs); sync: every round
                None if f.mode == fedlora_protocol::Mode::Async => dp.planned_rounds,
                None => dp.planned_rounds.max(f.rounds),
            };
        }
        if let Some(s) = &self.strategy {
            f.strategy = fedlora_protocol::strategy::StrategyConfig::from_name(s)
                .map_err(|e| UsageError(e.to_string().replace("invalid config: ", "")))?;
        }
        use fedlora_protocol::strategy::StrategyConfig;
        if let Some(mu) = self.proximal_mu {
            match &mut f.strategy {
                StrategyConfig::FedProx(p) => p.mu = mu,
                _ => {
                    return Err(UsageError("--proximal-mu needs --strategy fed-prox".into()).into())
                }
            }
        }
        if let Some(trim) = self.trim {
            match &mut f.strategy {
                StrategyConfig::TrimmedMean(t) => t.trim = trim,
                _ => return Err(UsageError("--trim needs --strategy trimmed-mean".into()).into()),
            }
        }
        if let Some(b) = self.max_update_norm {
            f.train.max_update_norm = Some(b);
            f.train.weighting = Weighting::Uniform;
        }
        if let Some(lr) = self.server_lr {
            match f.strategy.optimizer_mut() {
                Some(o) => o.server_lr = lr,
                None => {
                    return Err(UsageError(
                        "--server-lr needs a server-optimizer --strategy (fed-adam, fed-yogi, \
                         fed-adagrad)"
                            .into(),
                    )
                    .into())
                }
            }
        }
        f.validate().map_err(|e| UsageError(e.to_string()))?;
        Ok(())
    }
}

#[derive(Args, Debug)]
pub(crate) struct CoordinatorArgs {
    /// TOML config file (keys: listen, data_dir, store, certs, log_format, metrics, [federation],
    /// [client_dp]; every key with its default in examples/configs/coordinator.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// UDP address to listen on.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// State directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where the federation's state lives: `sled` (the default, embedded in --data-dir) or a
    /// PostgreSQL URL, postgres://user@host:5432/database (then --data-dir keeps only what
    /// is local to this process).
    #[arg(long)]
    store: Option<StoreLocation>,
    /// Certificate directory made by `fedlora certs init`.
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Serve Prometheus metrics (`/metrics`) and a health check (`/healthz`) over HTTP here,
    /// e.g. 127.0.0.1:9100.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Serve device enrollment (a token for a certificate) on this UDP address, and renew
    /// enrolled devices' certificates over the main endpoint. Signs with the CA key.
    #[arg(long)]
    enroll_listen: Option<SocketAddr>,
    #[command(flatten)]
    issuer: super::enroll::IssuerArgs,
    #[command(flatten)]
    fed: FederationArgs,
    #[command(flatten)]
    secure: SecureArgs,
    #[command(flatten)]
    client_dp: ClientDpArgs,
    #[command(flatten)]
    model: ModelArgs,
}

/// Secure aggregation flags of `coordinator` (SecAgg+: the coordinator learns only the sum).
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct SecureArgs {
    /// Secure aggregation (SecAgg+): clients mask their updates so that this coordinator
    /// learns only their sum. Needs a summable codec (a dense f32 default becomes
    /// modular:8:0.25:0.25:N) and uniform weights; the threshold t is the smallest with
    /// 2t > k + c (c = --collusion). See docs/src/secure-aggregation.md.
    #[arg(long)]
    pub secure_aggregation: bool,
    /// Neighbours per client, k (default: everyone up to 16 clients per round, else
    /// 2⌈log₂ n⌉).
    #[arg(long, value_name = "K", requires = "secure_aggregation")]
    pub neighbours: Option<usize>,
    /// Shamir threshold, t (default: the smallest t with 2t > k + c).
    #[arg(long, value_name = "T", requires = "secure_aggregation")]
    pub threshold: Option<usize>,
}

/// The coordinator's settings from its flags and config file, as far as they go before the
/// model is loaded ([`coordinator_config`]).
#[derive(Debug)]
struct Settings {
    /// The service settings, without enrollment; the federation has the flags and
    /// `--secure-aggregation` applied and is validated, but has no client-level DP plan yet.
    service: CoordinatorConfig,
    /// The certificate directory (enrollment reads the CA key from it).
    certs: PathBuf,
    /// How log lines are written.
    log_format: LogFormat,
    /// The client-level DP request (`[client_dp]` and the `--client-dp` flags), which
    /// [`plan_client_dp`] applies once the adapter's size is known.
    client_dp: Option<ClientDpRequest>,
}

/// The config file at `path` (`--config`), or an empty one without it.
fn read_config(path: Option<&Path>) -> anyhow::Result<CoordinatorToml> {
    let Some(p) = path else {
        return Ok(CoordinatorToml::default());
    };
    let text = std::fs::read_to_string(p)
        .map_err(|e| UsageError(format!("cannot read the config file {}: {e}", p.display())))?;
    Ok(toml::from_str(&text).map_err(|e| UsageError(format!("{}: {e}", p.display())))?)
}

/// The coordinator's settings from the flags `a` over the config `file`, up to what needs the
/// model: the listen, metrics, state and TLS settings, the log format, and the federation with
/// the flags and `--secure-aggregation` applied and validated; the client-level DP request is
/// returned for [`plan_client_dp`]. Reads no file and opens nothing. `run` is this, the
/// workload, [`plan_client_dp`] and the server; the examples under `examples/configs/` are
/// tested through the same steps.
fn coordinator_config(a: &CoordinatorArgs, file: CoordinatorToml) -> anyhow::Result<Settings> {
    let log_format = match (a.log_format, file.log_format.as_deref()) {
        (Some(f), _) => f,
        (None, Some("json")) => LogFormat::Json,
        (None, Some("text") | None) => LogFormat::Text,
        (None, Some(other)) => return Err(UsageError(format!("log_format `{other}`")).into()),
    };
    let data_dir = a
        .data_dir
        .clone()
        .or(file.data_dir)
        .ok_or_else(|| UsageError("--data-dir is required".into()))?;
    let certs = a
        .certs
        .clone()
        .or(file.certs)
        .ok_or_else(|| UsageError("--certs is required".into()))?;
    let mut service = CoordinatorConfig::new(data_dir, &certs);
    service.tls = TlsPaths::from_dir(&certs);
    service.store = match (&a.store, &file.store) {
        (Some(s), _) => s.clone(),
        (None, Some(s)) => s
            .parse()
            .map_err(|e: fedlora_coordinator::CoordinatorError| UsageError(e.to_string()))?,
        (None, None) => StoreLocation::Embedded,
    };
    if let Some(l) = a.listen.or(file.listen) {
        service.listen = l;
    }
    service.metrics = a.metrics.or(file.metrics);
    if let Some(mib) = file.payload_budget_mib {
        service.payload_budget = mib.saturating_mul(1 << 20);
    }
    if let Some(n) = file.max_polls_per_s {
        service.max_polls_per_s = n;
    }
    if let Some(ms) = file.poll_interval_ms {
        service.poll_interval_ms = ms;
    }
    service.adapter_description = Some(a.model.describe());
    let mut fed = file.federation.unwrap_or_default();
    a.fed.apply(&mut fed)?;
    if a.secure.secure_aggregation {
        if a.client_dp.client_dp.as_deref() == Some("central") {
            return Err(UsageError(
                "--secure-aggregation with --client-dp central: the coordinator adds central \
                 noise to the plaintext sum (distributed mode is the secure one)"
                    .into(),
            )
            .into());
        }
        let choice = fedlora_coordinator::secure_plan::SecureChoice {
            neighbours: a.secure.neighbours,
            threshold: a.secure.threshold,
            collusion: a.client_dp.collusion.unwrap_or(0),
        };
        fedlora_coordinator::secure_plan::apply_secure(&choice, &mut fed)
            .map_err(|e| UsageError(format!("--secure-aggregation: {e}")))?;
    }
    // --collusion also sets secure aggregation's c; only with --client-dp is it a DP setting
    let mut dp_args = a.client_dp.clone();
    if a.secure.secure_aggregation && dp_args.client_dp.is_none() {
        dp_args.collusion = None;
    }
    let client_dp = dp_args.request(file.client_dp, &fed, a.fed.dp_participations)?;
    if a.fed.dp_participations.is_some() && fed.train.dp.is_none() && client_dp.is_none() {
        return Err(UsageError(
            "--dp-participations needs a DP plan (--dp-clip-norm or --client-dp)".into(),
        )
        .into());
    }
    service.federation = fed;
    Ok(Settings {
        service,
        certs,
        log_format,
        client_dp,
    })
}

/// Applies the client-level DP request `req` to `fed` for an adapter of `numel` values: the
/// plan, the codec it dictates, secure aggregation in distributed mode, Poisson sampling and
/// uniform weights, validated ([`fedlora_coordinator::privacy_plan::apply`]); logs the plan.
fn plan_client_dp(
    req: &ClientDpRequest,
    fed: &mut FederationConfig,
    numel: usize,
) -> anyhow::Result<()> {
    fedlora_coordinator::privacy_plan::apply(req, fed, numel, false)
        .map_err(|e| UsageError(e.to_string()))?;
    if let Some(plan) = &fed.train.client_dp {
        tracing::info!(
            mode = %plan.mode,
            q = plan.sampling_rate,
            noise_multiplier = plan.noise.effective_multiplier(),
            epsilon_a = plan.observer_epsilon().unwrap_or(f64::NAN),
            min_clients = plan.min_clients,
            collusion = plan.collusion,
            codec = %fed.train.codec.name(),
            "client-level DP plan"
        );
    }
    Ok(())
}

/// Warns when secure rounds give each client fewer neighbours than SDK clients accept with
/// their default policy (3): such a round can only time out with nothing to unmask.
fn warn_if_clients_decline(fed: &FederationConfig) {
    let Some(sec) = &fed.train.secure else {
        return;
    };
    // async: the smallest cohort (min_buffer) is the one that can fall short
    let size = if fed.mode == fedlora_protocol::Mode::Async {
        fed.min_buffer()
    } else {
        fed.clients_per_round
    };
    let k = sec.k(size);
    let min = fedlora_protocol::secagg::SecAggPolicy::default().min_neighbours;
    if k < min {
        tracing::warn!(
            size,
            neighbours = k,
            "secure rounds give each client {k} neighbours; clients with the default \
             secure-aggregation policy decline fewer than {min}: use at least {} clients \
             per round (async mode: a min-buffer of at least {}) unless every client lowers \
             its policy",
            min + 1,
            min + 1
        );
    }
}

/// Runs the coordinator: [`coordinator_config`], the workload, [`plan_client_dp`], then the
/// server until its last round.
pub(crate) fn run(a: CoordinatorArgs) -> anyhow::Result<()> {
    let file = read_config(a.config.as_deref())?;
    let Settings {
        service: mut cfg,
        certs,
        log_format,
        client_dp,
    } = coordinator_config(&a, file)?;
    logging::init(log_format, "info");
    if let Some(l) = a.enroll_listen {
        cfg.enroll = Some(a.issuer.config(&certs, l)?);
    }
    let workload = super::workload::Workload::load(&a.model)?;
    let initial = workload.initial_adapter();
    if let Some(req) = &client_dp {
        plan_client_dp(req, &mut cfg.federation, initial.spec().numel())?;
    }
    warn_if_clients_decline(&cfg.federation);
    if cfg.enroll.is_some() && cfg.federation.train.secure.is_some() {
        // an issuing key in this process can mint a certificate for any device id with a key of
        // this process's choosing: secure aggregation then counts such ids as colluders
        tracing::warn!(
            "secure aggregation with enrollment inside the coordinator: this process holds an \
             issuing key, so a coordinator that deviates can mint certificates for device ids \
             and stand in for them (they count as colluders, c). Run enrollment as its own \
             service (fedlora enroll-service) for the guarantee against the coordinator"
        );
    }
    let record = super::adapter_record::AdapterRecord::new(&a.model, initial.spec());
    let record_dir = cfg.data_dir.clone();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let started = match cfg.store.clone() {
            StoreLocation::Postgres(url) => match relay_until_lead(&cfg, &url).await? {
                Some(store) => Coordinator::start_with(cfg, initial, Some(store)).await,
                // the federation ended while this front-end relayed to the driver
                None => return anyhow::Ok(()),
            },
            StoreLocation::Embedded => Coordinator::start(cfg, initial).await,
        };
        let c = started.map_err(|e| match e {
            // a file, a port or a setting to fix
            fedlora_coordinator::CoordinatorError::Config(_)
            | fedlora_coordinator::CoordinatorError::Tls(_)
            | fedlora_coordinator::CoordinatorError::Protocol(_) => {
                anyhow::Error::new(UsageError(e.to_string()))
            }
            other => other.into(),
        })?;
        // the store accepted this adapter (a directory of another adapter fails the start):
        // record what `export --peft` and `eval --data-dir` need to rebuild it
        super::adapter_record::write(&record_dir, &record)?;
        let success = tokio::select! {
            ok = c.wait_finished(Duration::from_secs(5)) => {
                tracing::info!(success = ok, "done: the coordinator exits after its last round");
                ok
            }
            why = c.lost() => {
                // another front-end may be driving already: stop at once
                tracing::error!(reason = %why, "cannot drive any more; stopping");
                c.shutdown().await;
                anyhow::bail!("{why}");
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted; state is on disk, restart to resume");
                true
            }
        };
        c.shutdown().await;
        anyhow::ensure!(
            success,
            "the federation gave up after too many failed rounds (see `fedlora status`)"
        );
        anyhow::Ok(())
    })
}

/// With the PostgreSQL store: the store, once this process holds the lease on driving the
/// rounds. Until then (another process drives) it serves as a front-end that relays its
/// clients' requests to the driver, and takes over when the driver's lease ends. `None`: the
/// federation finished, or the user interrupted, first.
async fn relay_until_lead(
    cfg: &CoordinatorConfig,
    url: &str,
) -> anyhow::Result<Option<fedlora_coordinator::store::Store>> {
    use fedlora_coordinator::store::Store;
    let open = |cfg: &CoordinatorConfig| {
        let (dir, loc) = (cfg.data_dir.clone(), cfg.store.clone());
        tokio::task::spawn_blocking(move || Store::open_at(&dir, &loc))
    };
    let store = open(cfg).await??;
    if store.try_lead()? {
        return Ok(Some(store));
    }
    let fe = fedlora_coordinator::relay::frontend::FrontEnd::start(cfg, url)
        .await
        .map_err(|e| UsageError(e.to_string()))?;
    // the lease is waited for on a thread of its own: it blocks until the driver's session
    // ends, and an interrupted front-end must not wait for it
    let (lease_tx, lease) = tokio::sync::oneshot::channel();
    {
        let s = store.clone();
        std::thread::Builder::new()
            .name("fedlora-lease".into())
            .spawn(move || {
                let _ = lease_tx.send(s.wait_lead());
            })?;
    }
    // a second connection watches for the end of the federation (the first waits for the lease)
    let watch = open(cfg).await??;
    let finished = async move {
        loop {
            let w = watch.clone();
            let done = tokio::task::spawn_blocking(move || w.state())
                .await
                .ok()
                .and_then(|s| s.ok().flatten())
                .is_some_and(|s| matches!(s.phase, fedlora_protocol::Phase::Finished { .. }));
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let outcome = tokio::select! {
        r = lease => {
            r.map_err(|_| anyhow::anyhow!("the lease's thread ended"))??;
            tracing::info!("the driver's lease ended: this front-end takes over driving");
            Some(store)
        }
        _ = finished => {
            // as the driver does: a while longer, so that every client hears it is over
            tokio::time::sleep(Duration::from_secs(5)).await;
            tracing::info!("done: the federation finished");
            None
        }
        _ = fe.lost() => {
            fe.shutdown().await;
            anyhow::bail!("this front-end lost its connection to the store; stopping");
        }
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupted");
            None
        }
    };
    fe.shutdown().await;
    Ok(outcome)
}

#[cfg(test)]
#[path = "../../tests/support/example_keys.rs"]
mod example_keys;

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use fedlora_protocol::secagg::{SecAggParams, SecAggPolicy};
    use fedlora_protocol::strategy::{StrategyConfig, STRATEGY_NAMES};
    use fedlora_protocol::{DpPlan, Sampling};

    use super::*;

    #[test]
    fn durations_take_seconds_or_units() {
        assert_eq!(parse_duration("600").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        for bad in ["5x", "-1", "0", "inf", ""] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    /// `fedlora coordinator ARGS…` as clap parses it.
    fn coordinator_args(args: &[&str]) -> CoordinatorArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: CoordinatorArgs,
        }
        let argv = std::iter::once("coordinator").chain(args.iter().copied());
        <Cli as clap::Parser>::try_parse_from(argv)
            .unwrap_or_else(|e| panic!("{e}"))
            .args
    }

    /// The repository's `examples/configs/`.
    fn examples() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join("configs")
    }

    /// The federation `fedlora coordinator --config path` starts: the file read and the
    /// settings made as `run` makes them, the client-level DP plan applied for the default
    /// model's adapter, and the whole service config validated as the server does first.
    /// Panics with the file's name.
    fn started_federation(path: &Path) -> FederationConfig {
        let a = coordinator_args(&["--config", path.to_str().unwrap()]);
        let file = read_config(a.config.as_deref())
            .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        let Settings {
            mut service,
            client_dp,
            ..
        } = coordinator_config(&a, file).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        if let Some(req) = &client_dp {
            let numel = fedlora_device::workload::Workload::load(&a.model)
                .unwrap_or_else(|e| panic!("the default model: {e:#}"))
                .initial_adapter()
                .spec()
                .numel();
            plan_client_dp(req, &mut service.federation, numel)
                .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        }
        service
            .validate()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        service.federation
    }

    /// Every `examples/configs/coordinator*.toml` is a federation `run` would start, through
    /// the same steps (the flags, secure aggregation and the client-level DP plan, validated),
    /// with the settings its comments describe; a secure one gives each client at least the
    /// neighbours clients with the default policy ask for.
    #[test]
    fn every_coordinator_example_is_a_federation_run_would_start() {
        let mut seen = BTreeSet::new();
        for entry in std::fs::read_dir(examples()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !(name.starts_with("coordinator") && name.ends_with(".toml")) {
                continue;
            }
            let fed = started_federation(&path);
            if let Some(sec) = &fed.train.secure {
                let k = sec.k(fed.sum_size());
                let min = SecAggPolicy::default().min_neighbours;
                assert!(
                    k >= min,
                    "{name}: {k} neighbours, clients decline fewer than {min}"
                );
            }
            match name.as_str() {
                // the complete example shows the defaults
                "coordinator.toml" => assert_eq!(fed, FederationConfig::default(), "{name}"),
                "coordinator_secure.toml" => {
                    // k = 6 of 10 clients, t = 4 (2t > k + c for c = 1), m = 8 + 1 + ⌈log₂ 16⌉
                    let s = fed.train.secure.clone().expect("secure aggregation");
                    assert_eq!((s.neighbours, s.threshold, s.modulus_bits), (6, 4, 13));
                    assert!(matches!(fed.train.codec, Codec::Modular(_)), "{name}");
                    assert_eq!(fed.train.weighting, Weighting::Uniform, "{name}");
                    assert!(fed.train.client_dp.is_none(), "{name}");
                }
                "coordinator_client_dp.toml" => {
                    let plan = fed.train.client_dp.clone().expect("a client-level DP plan");
                    assert_eq!(plan.mode, ClientDpMode::Distributed, "{name}");
                    let eps = plan.observer_epsilon().unwrap();
                    assert!(
                        eps <= plan.target_epsilon,
                        "{name}: ε (a) {eps} above the target"
                    );
                    assert_eq!(
                        (plan.sampling_rate, plan.min_clients, plan.collusion),
                        (0.1, 30, 2),
                        "{name}"
                    );
                    assert!(matches!(fed.train.codec, Codec::Skellam(_)), "{name}");
                    assert_eq!(fed.sampling, Sampling::Poisson, "{name}");
                    assert_eq!(fed.train.weighting, Weighting::Uniform, "{name}");
                    // the file's k; the planner's t (the smallest with 2t > k + c) and m (bits)
                    let s = fed.train.secure.clone().expect("secure aggregation");
                    assert_eq!((s.neighbours, s.threshold, s.modulus_bits), (10, 7, 16));
                }
                _ => {}
            }
            seen.insert(name);
        }
        for want in [
            "coordinator.toml",
            "coordinator_secure.toml",
            "coordinator_client_dp.toml",
        ] {
            assert!(
                seen.contains(want),
                "{want} not in {}",
                examples().display()
            );
        }
    }

    /// Adds the key paths of `value`, serialised, under `prefix` to `out`.
    fn keys<T: Serialize>(prefix: &str, value: &T, out: &mut BTreeSet<String>) {
        super::example_keys::key_paths(prefix, &serde_json::to_value(value).unwrap(), out);
    }

    /// `examples/configs/coordinator.toml` names every key of the config file, set or
    /// commented out, and no key that is gone: the file's own keys, the federation's (with
    /// every `Option` set, every strategy and every codec that has parameters) and
    /// `[client_dp]`'s. A field added without its line there fails this test.
    #[test]
    fn the_complete_coordinator_example_names_every_key() {
        let path = examples().join("coordinator.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let file: CoordinatorToml =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut required = BTreeSet::new();
        keys("", &file, &mut required);
        // what the example leaves unset, or set to one choice of several
        let mut fed = FederationConfig::default();
        fed.train.dp = Some(DpPlan {
            clip_norm: 1.0,
            planned_rounds: 3,
        });
        fed.train.secure = Some(SecAggParams {
            threshold: 4,
            neighbours: 0,
            modulus_bits: 19,
            collusion: 0,
            stage_timeout_ms: 30_000,
        });
        fed.train.max_update_norm = Some(1.0);
        keys("federation", &fed, &mut required);
        for name in STRATEGY_NAMES.split(", ") {
            let s = StrategyConfig::from_name(name).unwrap();
            keys("federation.strategy", &s, &mut required);
        }
        for name in ["q8", "topk:0.1", "subset:0.125", "modular"] {
            let c = Codec::from_name(name).unwrap();
            keys("federation.train.codec", &c, &mut required);
        }
        let req = ClientDpRequest::new(ClientDpMode::Distributed, 0.5, 8.0, 400);
        keys("client_dp", &req, &mut required);
        // the plan the coordinator computes from [client_dp] (with its Skellam codec): never
        // written by hand
        required.remove("federation.train.client_dp");
        // async offers' staleness weighting, filled in from [federation] for every offer
        required.remove("federation.train.staleness");
        super::example_keys::check_complete(&text, &required)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}
