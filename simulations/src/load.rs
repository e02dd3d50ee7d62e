//! Load over the real stack: one [`Coordinator`] (QUIC, mutual TLS, sled on disk) and N
//! synthetic SDK clients, each with its own certificate, that skip training and upload a
//! seeded random delta. Behind `fedlora bench load` and the CI test of a round of a few hundred
//! clients.
//!
//! The clients run the SDK's own code ([`FederatedClient`]) with a [`SyntheticLearner`], so
//! every frame, handshake, secure-aggregation stage and acknowledgement is the deployment's.
//! [`expected_global`] recomputes what the committed global must be from the clients' seeds,
//! with the same encoding and aggregation functions, so [`LoadOutcome::exact`] checks the
//! committed aggregate: bit for bit for the modular codec (the sum of integers is exact), within
//! 1e-6 relative of an f64 reference sum for float codecs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedlora_client::sdk::{ClientConfig, ClientReport, FederatedClient};
use fedlora_client::transport::ClientTls;
use fedlora_coordinator::certs::{default_server_names, init_certs};
use fedlora_coordinator::{Coordinator, CoordinatorConfig, Event};
use fedlora_protocol::codec::modular::ModularSum;
use fedlora_protocol::rank::RankCounts;
use fedlora_protocol::secagg::SecAggParams;
use fedlora_protocol::{
    AdapterSpec, Codec, CodecContext, FederationConfig, FlatAdapter, TensorSpec, TrainConfig,
    Weighting,
};
use fedlora_train::dp_sgd::DpSgdConfig;
use fedlora_train::learner::{encode_update, ClientSeeds, Learner};
use fedlora_train::train::{EvalOutcome, TrainOutcome};
use fedlora_train::TrainError;
use rand::rngs::ChaCha20Rng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::SimError;

/// Rank of the synthetic adapter's LoRA factors.
const RANK: usize = 8;

/// Synthetic clients that share one QUIC endpoint (UDP socket).
const CLIENTS_PER_ENDPOINT: usize = 100;

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Synthetic clients (N), all in the one round.
    pub clients: usize,
    /// Adapter values per client (rounded up to a multiple of 2·rank = 16).
    pub params: usize,
    /// Secure aggregation (SecAgg+ with k = 2⌈log₂ N⌉ neighbours, t = k/2 + 1).
    pub secure: bool,
    /// Upload codec; default dense f32, or `modular:8:0.05:1:N` with secure aggregation.
    pub codec: Option<Codec>,
    /// Seed of the deltas, the clients' codec rounding and the coordinator (a benchmark).
    pub seed: u64,
    /// Round deadline, milliseconds.
    pub round_timeout_ms: u64,
    /// The coordinator's PostgreSQL store (a `postgres://` URL; `None`: sled, embedded).
    pub store: Option<String>,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            clients: 100,
            params: 100_000,
            secure: false,
            codec: None,
            seed: 1,
            round_timeout_ms: 600_000,
            store: None,
        }
    }
}

impl LoadConfig {
    /// The synthetic adapter: pairs of rank-8 factors `blocks.i.lora_a` [8, d] and
    /// `blocks.i.lora_b` [d, 8], d ≤ 4,096, holding at least `params` values.
    pub fn spec(&self) -> Result<AdapterSpec, SimError> {
        let mut left = self.params.div_ceil(2 * RANK).max(1);
        let mut tensors = Vec::new();
        let mut i = 0;
        while left > 0 {
            let d = left.min(4096);
            tensors.push(TensorSpec {
                name: format!("blocks.{i}.lora_a"),
                shape: vec![RANK, d],
            });
            tensors.push(TensorSpec {
                name: format!("blocks.{i}.lora_b"),
                shape: vec![d, RANK],
            });
            left -= d;
            i += 1;
        }
        AdapterSpec::new(tensors)
            .map(|s| s.with_base("fedlora-load-synthetic"))
            .map_err(|e| SimError::Config(e.to_string()))
    }

    /// The upload codec.
    pub fn codec(&self) -> Result<Codec, SimError> {
        if let Some(c) = &self.codec {
            return Ok(c.clone());
        }
        let text = if self.secure {
            format!("modular:8:0.05:1:{}", self.clients.max(2))
        } else {
            "dense-f32".to_string()
        };
        Codec::from_name(&text).map_err(|e| SimError::Config(e.to_string()))
    }

    /// One round of all N clients: the round waits for everyone, samples everyone and needs
    /// everyone's upload; no evaluation.
    pub fn federation(&self) -> Result<FederationConfig, SimError> {
        let n = self.clients;
        let codec = self.codec()?;
        let secure = if self.secure {
            let Codec::Modular(p) = &codec else {
                return Err(SimError::Config(
                    "secure aggregation needs the modular codec".into(),
                ));
            };
            let k = 2 * (usize::BITS - n.saturating_sub(1).leading_zeros()) as usize;
            Some(SecAggParams {
                threshold: k.min(n - 1) / 2 + 1,
                neighbours: k,
                modulus_bits: p.modulus_bits(),
                collusion: 0,
                stage_timeout_ms: self.round_timeout_ms,
            })
        } else {
            None
        };
        let f = FederationConfig {
            rounds: 1,
            clients_per_round: n,
            min_clients: n,
            wait_for_clients: n,
            round_timeout_ms: self.round_timeout_ms,
            start_grace_ms: self.round_timeout_ms,
            eval_timeout_ms: 0,
            seed: self.seed,
            train: TrainConfig {
                local_steps: 1,
                batch_size: 1,
                weighting: if secure.is_some() {
                    Weighting::Uniform
                } else {
                    Weighting::ExampleCount
                },
                codec,
                secure,
                ..TrainConfig::default()
            },
            ..FederationConfig::default()
        };
        f.validate().map_err(|e| SimError::Config(e.to_string()))?;
        Ok(f)
    }

    /// The coordinator's settings for a state directory and a certificate directory.
    pub fn coordinator(&self, state: &Path, certs: &Path) -> Result<CoordinatorConfig, SimError> {
        let mut cfg = CoordinatorConfig::new(state.to_path_buf(), certs);
        cfg.listen = "127.0.0.1:0".parse().expect("valid address");
        if let Some(url) = &self.store {
            cfg.store = fedlora_coordinator::store::StoreLocation::Postgres(url.clone());
        }
        cfg.federation = self.federation()?;
        cfg.tick_ms = 20;
        cfg.poll_interval_ms = 100;
        Ok(cfg)
    }

    /// The sampling seed of client `i` (its codec rounding).
    fn client_seed(&self, i: usize) -> u64 {
        self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64 + 1)
    }
}

/// A client that does not train: its "update" is a seeded random delta, uniform in
/// [−0.01, 0.01] per value, the same for a given (seed, client, round).
pub struct SyntheticLearner {
    spec: AdapterSpec,
    seed: u64,
}

impl SyntheticLearner {
    /// Client `index`'s learner under `cfg`.
    pub fn new(cfg: &LoadConfig, index: usize) -> Result<Self, SimError> {
        Ok(Self {
            spec: cfg.spec()?,
            seed: cfg.seed ^ ((index as u64 + 1) << 20),
        })
    }

    /// The delta it uploads in `round`.
    pub fn delta(&self, round: u64) -> FlatAdapter {
        let mut rng = ChaCha20Rng::seed_from_u64(self.seed ^ round.rotate_left(40));
        let values = (0..self.spec.numel())
            .map(|_| rng.random_range(-0.01f32..=0.01))
            .collect();
        FlatAdapter::new(self.spec.clone(), values).expect("values fit the spec")
    }
}

impl Learner for SyntheticLearner {
    fn spec(&self) -> &AdapterSpec {
        &self.spec
    }

    fn train_examples(&self) -> usize {
        1
    }

    fn train(
        &self,
        _global: &FlatAdapter,
        cfg: &TrainConfig,
        rng: &mut ChaCha20Rng,
    ) -> Result<TrainOutcome, TrainError> {
        // the round id is not passed to learners: take it from the round's sampling stream,
        // which the SDK seeds per round, so the delta differs per round yet is reproducible
        let round_tag = rng.random::<u64>();
        Ok(TrainOutcome {
            delta: self.delta(round_tag),
            train_loss: 0.0,
            examples: 1,
            steps: cfg.local_steps as usize,
            secs: 0.0,
            released_loss: None,
        })
    }

    fn train_dp(
        &self,
        _global: &FlatAdapter,
        _cfg: &TrainConfig,
        _dp: &DpSgdConfig,
        _rng: &mut ChaCha20Rng,
        _noise: &mut fedlora_dp::GaussianNoise,
    ) -> Result<TrainOutcome, TrainError> {
        Err(TrainError::Config(
            "synthetic load clients do not train under DP".into(),
        ))
    }

    fn evaluate(&self, _adapter: &FlatAdapter) -> Result<EvalOutcome, TrainError> {
        Ok(EvalOutcome {
            loss: 0.0,
            tokens: 1,
            accuracy: None,
        })
    }
}

/// The certificates of a load run (CA, server, one per client) in `dir`.
pub fn make_certs(cfg: &LoadConfig, dir: &Path) -> Result<PathBuf, SimError> {
    let certs = dir.join("certs");
    init_certs(&certs, cfg.clients, &default_server_names())?;
    Ok(certs)
}

/// Runs the N clients against the coordinator at `addrs` (its front-ends: client i connects
/// to front-end i mod F first, the others as alternates) until the federation finishes; their
/// reports, in client order.
pub async fn run_clients(
    cfg: &LoadConfig,
    addrs: &[SocketAddr],
    certs: &Path,
) -> Result<Vec<ClientReport>, SimError> {
    if addrs.is_empty() {
        return Err(SimError::Config("no coordinator address".into()));
    }
    let mut handles = Vec::with_capacity(cfg.clients);
    // one UDP socket per CLIENTS_PER_ENDPOINT clients (each connection with its own
    // certificate): 10,000 clients are not 10,000 sockets and receive buffers
    let mut endpoints = Vec::new();
    for _ in 0..cfg.clients.div_ceil(CLIENTS_PER_ENDPOINT) {
        endpoints.push(fedlora_client::transport::shared_endpoint(
            fedlora_client::transport::SHARED_RECV_BUFFER,
        )?);
    }
    for i in 0..cfg.clients {
        let f = addrs.len();
        let mut cc = ClientConfig::new(addrs[i % f], ClientTls::from_dir(certs, i));
        cc.alternates = (1..f).map(|k| addrs[(i + k) % f]).collect();
        cc.endpoint = Some(endpoints[i / CLIENTS_PER_ENDPOINT].clone());
        cc.sampling_seed = Some(cfg.client_seed(i));
        cc.max_connect_attempts = Some(50);
        cc.backoff_max_ms = 2_000;
        let learner: Arc<dyn Learner> = Arc::new(SyntheticLearner::new(cfg, i)?);
        let client = FederatedClient::with_learner(cc, learner)?;
        handles.push(tokio::spawn(async move { client.run().await }));
    }
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        let r = h
            .await
            .map_err(|e| SimError::Config(format!("client task: {e}")))??;
        out.push(r);
    }
    Ok(out)
}

/// The global adapter the coordinator must commit after round `round` when every client in
/// `counted` (indices) uploaded: each client's delta made from its seeds as its SDK did. With
/// the modular codec the deltas are encoded as the SDK does and their integer sum decoded (bit
/// for bit what the coordinator must get). Otherwise the FedAvg mean (weight 1 each) is summed
/// here in f64 from the deltas themselves (dense f32 is lossless) or from each payload decoded
/// alone: none of the coordinator's aggregation code is used, so a wrong average is caught,
/// not only a lost upload.
pub fn expected_global(
    cfg: &LoadConfig,
    initial: &FlatAdapter,
    round: u64,
    counted: &[usize],
) -> Result<FlatAdapter, SimError> {
    let fed = cfg.federation()?;
    let codec = &fed.train.codec;
    let spec = cfg.spec()?;
    let ctx = CodecContext {
        round_seed: fedlora_protocol::round::codec_seed(fed.seed, round),
    };
    if !matches!(codec, Codec::Modular(_)) && fed.strategy.name() != "fed-avg" {
        return Err(SimError::Config(format!(
            "the load run's check recomputes FedAvg, not {}",
            fed.strategy.name()
        )));
    }
    // one client at a time: memory O(params), whatever the number of clients
    let mut modular: Option<ModularSum> = None;
    let mut float = vec![0f64; spec.numel()];
    for &i in counted {
        let learner = SyntheticLearner::new(cfg, i)?;
        let seeds = ClientSeeds {
            sampling: Some(cfg.client_seed(i)),
            noise: None,
        };
        let mut rng = seeds.sampling_rng(round)?;
        let delta = learner.delta(rng.random::<u64>());
        let mut codec_rng = seeds.codec_rng(round)?;
        let enc = encode_update(
            codec,
            &spec,
            &delta,
            &ctx,
            1,
            &mut codec_rng,
            &mut None,
            None,
        )?;
        if let Codec::Modular(p) = codec {
            let ints = codec
                .modular_payload(&enc.bytes, &spec)
                .map_err(|e| SimError::Config(e.to_string()))?;
            modular
                .get_or_insert_with(|| ModularSum::new(ints.len(), p.modulus_bits()))
                .add(&ints)
                .map_err(|e| SimError::Config(e.to_string()))?;
            continue;
        }
        let values = match codec {
            Codec::DenseF32 => delta.into_values(),
            _ => Codec::decode(&enc.bytes, &spec, Some(codec), &ctx)
                .map_err(|e| SimError::Config(e.to_string()))?
                .into_values(),
        };
        for (s, v) in float.iter_mut().zip(&values) {
            *s += f64::from(*v);
        }
    }
    let delta = if matches!(codec, Codec::Modular(_)) {
        let sum = modular.ok_or_else(|| SimError::Config("no client counted".into()))?;
        let full = fedlora_coordinator::aggregate::full_rank(&spec);
        let counts = RankCounts::new(full, counted.iter().map(|_| (1.0, full)));
        fedlora_coordinator::aggregate::modular_sum_delta(codec, &spec, &ctx, &sum, &counts)?
    } else {
        let k = counted.len().max(1) as f64;
        FlatAdapter::new(spec.clone(), float.iter().map(|s| (s / k) as f32).collect())
            .map_err(|e| SimError::Config(e.to_string()))?
    };
    let mut global = initial.clone();
    global
        .apply_delta(&delta)
        .map_err(|e| SimError::Config(e.to_string()))?;
    Ok(global)
}

/// Whether `got` is the committed global `cfg` must produce: bit for bit with the modular
/// codec, within 1e-6 relative (L2) of `expected` otherwise.
pub fn matches(cfg: &LoadConfig, expected: &FlatAdapter, got: &FlatAdapter) -> bool {
    if expected.spec().hash() != got.spec().hash() {
        return false;
    }
    let modular = matches!(cfg.codec(), Ok(Codec::Modular(_)));
    if modular {
        return expected
            .values()
            .iter()
            .zip(got.values())
            .all(|(a, b)| a.to_bits() == b.to_bits());
    }
    let (mut diff, mut norm) = (0f64, 0f64);
    for (a, b) in expected.values().iter().zip(got.values()) {
        diff += (f64::from(*a) - f64::from(*b)).powi(2);
        norm += f64::from(*a).powi(2);
    }
    diff.sqrt() <= 1e-6 * norm.sqrt().max(f64::MIN_POSITIVE)
}

/// What the coordinator side of a load run ends with.
#[derive(Clone, Debug)]
pub struct ServeOutcome {
    /// The round's id.
    pub round: u64,
    /// Whether it committed.
    pub committed: bool,
    /// The committed global adapter.
    pub global: FlatAdapter,
    /// Seconds from the round's start to its commit (the coordinator's record).
    pub round_s: f64,
    /// Clients the round counted.
    pub participants: Vec<String>,
}

/// What a coordinator child process hands back besides the global adapter (`served.json`).
#[derive(Serialize, Deserialize)]
struct ServedSummary {
    round: u64,
    committed: bool,
    round_s: f64,
    participants: Vec<String>,
    peak_rss_mib: f64,
}

/// Writes `out` into `dir` for the process that started this coordinator: `served.json`, and
/// the committed global as little-endian f32 (`global.f32`, so it comes back bit for bit),
/// with the coordinator process's peak RSS.
pub fn write_served(dir: &Path, out: &ServeOutcome, peak_rss_mib: f64) -> Result<(), SimError> {
    let bytes: Vec<u8> = out
        .global
        .values()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(dir.join("global.f32"), bytes)?;
    let summary = ServedSummary {
        round: out.round,
        committed: out.committed,
        round_s: out.round_s,
        participants: out.participants.clone(),
        peak_rss_mib,
    };
    let json = serde_json::to_vec(&summary).map_err(|e| SimError::Config(e.to_string()))?;
    std::fs::write(dir.join("served.json"), json)?;
    Ok(())
}

/// Reads what [`write_served`] wrote: the outcome and the coordinator's peak RSS, MiB.
pub fn read_served(dir: &Path, cfg: &LoadConfig) -> Result<(ServeOutcome, f64), SimError> {
    let s: ServedSummary = serde_json::from_slice(&std::fs::read(dir.join("served.json"))?)
        .map_err(|e| SimError::Config(format!("served.json: {e}")))?;
    let values: Vec<f32> = std::fs::read(dir.join("global.f32"))?
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    let global =
        FlatAdapter::new(cfg.spec()?, values).map_err(|e| SimError::Config(e.to_string()))?;
    Ok((
        ServeOutcome {
            round: s.round,
            committed: s.committed,
            global,
            round_s: s.round_s,
            participants: s.participants,
        },
        s.peak_rss_mib,
    ))
}

/// Runs the coordinator until its one round ends; `on_listen` receives its address.
pub async fn serve(
    cfg: &LoadConfig,
    state: &Path,
    certs: &Path,
    on_listen: impl FnOnce(SocketAddr),
) -> Result<ServeOutcome, SimError> {
    let spec = cfg.spec()?;
    let coord =
        Coordinator::start(cfg.coordinator(state, certs)?, FlatAdapter::zeros(spec)).await?;
    let addr = coord
        .local_addr()
        .map_err(|e| SimError::Config(e.to_string()))?;
    let mut events = coord.events();
    on_listen(addr);
    let timeout = Duration::from_millis(cfg.round_timeout_ms * 3 + 60_000);
    loop {
        let ev = tokio::time::timeout(timeout, events.recv())
            .await
            .map_err(|_| SimError::Config("the load round made no progress".into()))?;
        match ev {
            Ok(Event::Finished { .. }) => break,
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(e) => return Err(SimError::Config(format!("coordinator events: {e}"))),
        }
    }
    // let clients collect their Finished task before the endpoint closes: a waiting client
    // polls again after up to N ÷ max_polls_per_s seconds
    let cc = cfg.coordinator(state, certs)?;
    let poll_ms = fedlora_coordinator::config::poll_delay_ms(
        cc.poll_interval_ms,
        cfg.clients,
        cc.max_polls_per_s,
    );
    coord
        .wait_finished(Duration::from_millis(2_000 + 2 * poll_ms))
        .await;
    let report = coord.report()?;
    let (_, global) = coord.global();
    coord.shutdown().await;
    let rec = report
        .rounds
        .first()
        .map(|r| r.record.clone())
        .ok_or_else(|| SimError::Config("the coordinator recorded no round".into()))?;
    let committed = matches!(
        rec.status,
        fedlora_coordinator::store::RoundStatus::Committed { .. }
    );
    Ok(ServeOutcome {
        round: rec.round,
        committed,
        global,
        round_s: rec
            .ended_ms
            .unwrap_or(rec.started_ms)
            .saturating_sub(rec.started_ms) as f64
            / 1e3,
        participants: rec.participants.clone(),
    })
}

/// A front-end that relays to the load run's coordinator (`bench load --frontends F`, a
/// PostgreSQL store), until the federation in the store finishes; `on_listen` receives its
/// address.
pub async fn serve_frontend(
    cfg: &LoadConfig,
    state: &Path,
    certs: &Path,
    on_listen: impl FnOnce(SocketAddr),
) -> Result<(), SimError> {
    use fedlora_coordinator::store::{Store, StoreLocation};
    let url = cfg
        .store
        .clone()
        .ok_or_else(|| SimError::Config("front-ends need a PostgreSQL store".into()))?;
    let cc = cfg.coordinator(state, certs)?;
    let fe = fedlora_coordinator::relay::frontend::FrontEnd::start(&cc, &url).await?;
    on_listen(
        fe.local_addr()
            .map_err(|e| SimError::Config(e.to_string()))?,
    );
    let location = StoreLocation::Postgres(url);
    let dir = state.to_path_buf();
    let store = tokio::task::spawn_blocking(move || Store::open_existing_at(&dir, &location))
        .await
        .map_err(|e| SimError::Config(e.to_string()))??;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s = store.clone();
        let state = tokio::task::spawn_blocking(move || s.state())
            .await
            .map_err(|e| SimError::Config(e.to_string()))??;
        if matches!(
            state.map(|s| s.phase),
            Some(fedlora_protocol::Phase::Finished { .. })
        ) {
            break;
        }
    }
    // the clients collect their Finished task first (as the coordinator lingers)
    let poll_ms = fedlora_coordinator::config::poll_delay_ms(
        cc.poll_interval_ms,
        cfg.clients,
        cc.max_polls_per_s,
    );
    tokio::time::sleep(Duration::from_millis(2_000 + 2 * poll_ms)).await;
    fe.shutdown().await;
    Ok(())
}

/// One load run's results (`fedlora bench load --json`).
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    /// Synthetic clients.
    pub clients: usize,
    /// Adapter values per client.
    pub params: usize,
    /// Secure aggregation on.
    pub secure: bool,
    /// The upload codec.
    pub codec: String,
    /// The round's wall time from its start to its commit, seconds (coordinator's record).
    pub round_s: f64,
    /// Uploads acknowledged per second of the round.
    pub uploads_per_s: f64,
    /// Median milliseconds from sending an upload to its acknowledgement.
    pub p50_upload_ms: f64,
    /// 99th percentile of the same.
    pub p99_upload_ms: f64,
    /// Peak resident memory of the coordinator's process, MiB (`None` where not measured).
    pub coordinator_peak_rss_mib: Option<f64>,
    /// Request bytes all clients sent (frames, whole run).
    pub bytes_up: u64,
    /// Bytes of the upload (or masked input) frames alone.
    pub upload_bytes: u64,
    /// Seconds from the first upload's start to the last acknowledgement.
    pub upload_window_s: f64,
    /// `upload_bytes` over `upload_window_s`, MiB/s: throughput through TLS, acknowledged
    /// (checked and written to disk).
    pub upload_mib_s: f64,
    /// Acknowledged uploads per second of the upload window (durable acks per second).
    pub acks_per_s: f64,
    /// Upload bytes the clients sent beyond one copy of each upload (re-sends after a
    /// refusal, a timeout or a lost link): 0 in a run without faults.
    pub resent_bytes: u64,
    /// Connections the clients lost and reopened (0 in a run without faults).
    pub reconnects: u64,
    /// One of the clients' reasons for a lost connection, if any.
    pub reconnect_reason: Option<String>,
    /// Whether the committed aggregate equals what the clients sent (see [`matches`]).
    pub exact: bool,
    /// Clients the round counted.
    pub counted: usize,
    /// Setup before the round: certificates and the coordinator start, seconds.
    pub setup_s: f64,
    /// The whole run, seconds.
    pub total_s: f64,
}

/// The p-quantile (0..=1) of `v` (nearest rank).
pub fn quantile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// Joins the two sides' outcomes into the report.
pub fn report(
    cfg: &LoadConfig,
    serve: &ServeOutcome,
    clients: &[ClientReport],
    coordinator_peak_rss_mib: Option<f64>,
    setup_s: f64,
    started: Instant,
) -> Result<LoadReport, SimError> {
    let index: std::collections::BTreeMap<&str, usize> = clients
        .iter()
        .enumerate()
        .map(|(i, r)| (r.client_id.as_str(), i))
        .collect();
    let mut counted: Vec<usize> = serve
        .participants
        .iter()
        .filter_map(|id| index.get(id.as_str()).copied())
        .collect();
    counted.sort_unstable();
    let exact = serve.committed
        && counted.len() == serve.participants.len()
        && matches(
            cfg,
            &expected_global(cfg, &FlatAdapter::zeros(cfg.spec()?), serve.round, &counted)?,
            &serve.global,
        );
    let uploads: Vec<_> = clients.iter().flat_map(|r| r.uploads.clone()).collect();
    let mut ms: Vec<f64> = uploads.iter().map(|u| u.ms).collect();
    let upload_bytes: u64 = uploads.iter().map(|u| u.bytes).sum();
    let window_s = match (
        uploads.iter().map(|u| u.started).min(),
        uploads
            .iter()
            .map(|u| u.started + Duration::from_secs_f64(u.ms / 1e3))
            .max(),
    ) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    Ok(LoadReport {
        clients: cfg.clients,
        params: cfg.spec()?.numel(),
        secure: cfg.secure,
        codec: cfg.codec()?.name(),
        round_s: serve.round_s,
        uploads_per_s: serve.participants.len() as f64 / serve.round_s.max(1e-9),
        p50_upload_ms: quantile(&mut ms, 0.5),
        p99_upload_ms: quantile(&mut ms, 0.99),
        coordinator_peak_rss_mib,
        bytes_up: clients.iter().map(|r| r.bytes_up).sum(),
        upload_bytes,
        upload_window_s: window_s,
        upload_mib_s: upload_bytes as f64 / (1 << 20) as f64 / window_s.max(1e-9),
        acks_per_s: uploads.len() as f64 / window_s.max(1e-9),
        resent_bytes: clients.iter().map(ClientReport::resent_bytes).sum(),
        reconnects: clients.iter().map(|c| u64::from(c.reconnects)).sum(),
        reconnect_reason: clients.iter().find_map(|c| c.last_transport_error.clone()),
        exact,
        counted: serve.participants.len(),
        setup_s,
        total_s: started.elapsed().as_secs_f64(),
    })
}

/// The coordinator and the clients in this process (tests; `fedlora bench load` runs the
/// coordinator in a child process so that its memory is measured alone).
pub fn run_in_process(cfg: &LoadConfig) -> Result<LoadReport, SimError> {
    let started = Instant::now();
    let tmp = tempfile::tempdir()?;
    let certs = make_certs(cfg, tmp.path())?;
    let rt = tokio::runtime::Runtime::new()?;
    let setup_s = started.elapsed().as_secs_f64();
    let (served, clients) = rt.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let state = tmp.path().join("coordinator");
        let c2 = cfg.clone();
        let certs2 = certs.clone();
        let server = tokio::spawn(async move {
            serve(&c2, &state, &certs2, |a| {
                let _ = tx.send(a);
            })
            .await
        });
        let addr = rx
            .await
            .map_err(|_| SimError::Config("the coordinator did not start".into()))?;
        let clients = run_clients(cfg, &[addr], &certs).await?;
        let served = server
            .await
            .map_err(|e| SimError::Config(format!("coordinator task: {e}")))??;
        Ok::<_, SimError>((served, clients))
    })?;
    report(cfg, &served, &clients, None, setup_s, started)
}
