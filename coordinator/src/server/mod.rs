//! The coordinator service: drives the [`Federation`] state machine from QUIC connections and a
//! clock, persisting to the [`Store`] before anything is acknowledged.
//!
//! Each request is one frame on a fresh bidirectional stream, answered by one frame; the stream
//! is then finished. A malformed, truncated or oversized frame gets a typed `Refused` answer and
//! a closed stream; the connection and every other client carry on.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fedlora_protocol::{
    codec_seed, AdapterSpec, ClientMsg, Codec, CodecContext, CoordMsg, DeclineReason, Directive,
    Downlink, EvalReport, Federation, FederationState, FlatAdapter, ModularSum, Refusal,
    RefusalCode, RoundOffer, SecAggBody, SpecHash, Task, Transition, UploadMeta, UploadVerdict,
    PROTOCOL_VERSION,
};
use quinn::{RecvStream, SendStream};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use tracing::{error, info, warn};

use crate::certs;
use crate::config::CoordinatorConfig;
use crate::error::{CoordinatorError, Result};
use crate::secure::{Advance, SecureRound};
use crate::store::{EvalRecord, RoundRecord, RoundStatus, Store, UploadRecord};
pub use crate::wire::REQUEST_TIMEOUT_S;
use crate::wire::{read_request, respond, ReadBudget, MAX_CONNECTIONS_PER_CLIENT};

mod commit;
mod connection;
mod downlink;
mod driver;
mod poll_gate;
mod relayed;
mod requests;
mod revocation;
mod watched;

use connection::accept_loop;
use driver::{snapshot_loop, tick_loop};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Something that happened, for progress displays and tests.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A round opened.
    RoundStarted {
        /// Round id.
        round: u64,
        /// Participants.
        participants: usize,
    },
    /// An upload was stored and acknowledged.
    UploadAccepted {
        /// Round id.
        round: u64,
        /// Client id.
        client: String,
    },
    /// A round was committed.
    RoundCommitted {
        /// Round id.
        round: u64,
        /// New global version.
        version: u64,
    },
    /// A round failed.
    RoundFailed {
        /// Round id.
        round: u64,
        /// Why.
        reason: String,
    },
    /// The federation ended.
    Finished {
        /// Whether every planned round committed.
        success: bool,
    },
}

/// Bytes of decoded uploads on their way into the running sum, over all requests.
pub const ADDEND_BUDGET: usize = 64 * 1024 * 1024;

struct Global {
    version: u64,
    adapter: FlatAdapter,
    encoded: Vec<u8>,
    /// Length and SHA-256 of `encoded`, computed once per version (offers carry it).
    digest: fedlora_protocol::resumable::GlobalDigest,
}

impl Global {
    fn new(version: u64, adapter: FlatAdapter, encoded: Vec<u8>) -> Self {
        let digest = fedlora_protocol::resumable::GlobalDigest::of(&encoded);
        Self {
            version,
            adapter,
            encoded,
            digest,
        }
    }
}

struct Shared {
    config: CoordinatorConfig,
    spec: AdapterSpec,
    store: Store,
    /// The round machine; its fingerprint lets a waiting client's poll be answered without
    /// this lock ([`poll_gate`]).
    fed: watched::Watched<Federation>,
    global: Mutex<Global>,
    /// Task bytes sent per (round, client) for the open round; folded into its record.
    bytes_down: Mutex<BTreeMap<(u64, String), u64>>,
    /// Live connection per client id (the latest one wins).
    live: Mutex<BTreeMap<String, usize>>,
    /// What each client reconstructed of the global adapter (f16-delta downlink), by version.
    recon: Mutex<BTreeMap<String, (u64, FlatAdapter)>>,
    /// The open secure round, if the round is secure.
    secure: watched::Watched<Option<SecureRound>>,
    /// Who was told to wait, and under which fingerprints ([`poll_gate`]).
    gate: poll_gate::PollGate,
    /// Secure-aggregation frame bytes received per (round, client); folded into bytes up.
    secure_bytes_up: Mutex<BTreeMap<(u64, String), u64>>,
    /// Client certificate chains (DER certificates concatenated, leaf first) from their TLS
    /// handshakes, relayed for key signatures.
    certs: Mutex<BTreeMap<String, Vec<u8>>>,
    /// The federation CA's subject (DER): tells which issuer signed a client
    /// ([`crate::certs::client_identity`]).
    ca_subject: Vec<u8>,
    /// Open connections per client id, oldest first (at most [`MAX_CONNECTIONS_PER_CLIENT`]).
    conns: Mutex<BTreeMap<String, Vec<quinn::Connection>>>,
    /// Bytes of payload bodies being read, over all connections (see [`crate::wire`]).
    budget: Arc<tokio::sync::Semaphore>,
    /// Bytes of global-adapter pieces sent and not yet acknowledged, over all connections
    /// ([`crate::wire::DOWNLOAD_BUDGET`]).
    downloads: Arc<tokio::sync::Semaphore>,
    /// Bytes of decoded uploads waiting to be folded into the running sum (a small upload in a
    /// compressing codec decodes to a dense addend many times its size), within
    /// [`ADDEND_BUDGET`]; taken after a body's read budget, never before it.
    addends: Arc<tokio::sync::Semaphore>,
    /// One permit per core for the blocking work of requests (decoding and writing uploads and
    /// their pieces): more at once would not go faster, and each thread of the blocking pool
    /// keeps its own allocator heap, which grew the coordinator by about 80 KB per upload at
    /// 10,000 clients when every upload had a thread of its own.
    cpu: Arc<tokio::sync::Semaphore>,
    /// The server optimizer's moments that go with the current global version.
    opt: Mutex<fedlora_protocol::strategy::OptimizerState>,
    /// The federation's strategy (built from its config).
    strategy: Box<dyn fedlora_protocol::strategy::Strategy>,
    /// How uploads are summed as they are accepted (`None`: the strategy needs each update).
    sum_kind: Option<crate::running_sum::SumKind>,
    /// The open round's running sum of accepted plain uploads ([`crate::running_sum`]).
    sum: Mutex<Option<crate::running_sum::RunningSum>>,
    /// The latest round whose start is stored: no upload of a later round is taken (an offer
    /// goes out once the round is open in memory, before its record is written).
    durable_round: std::sync::atomic::AtomicU64,
    /// The group committer's queue ([`commit`]).
    commits: Mutex<std::sync::mpsc::Sender<commit::Pending>>,
    /// The federation's LoRA rank R.
    full_rank: usize,
    /// Each connected client's declared largest rank, when below R (heterogeneous ranks).
    max_ranks: Mutex<BTreeMap<String, u32>>,
    /// The rank each client was offered for a round: `client → (round, rank)`.
    offered_ranks: Mutex<BTreeMap<String, (u64, u32)>>,
    /// Resumable uploads in progress (on disk).
    partial: Arc<crate::partial::PartialUploads>,
    /// Enrollment and renewal (when configured).
    enrollment: Option<Arc<crate::enroll::Enrollment>>,
    /// Operator metrics (served when `config.metrics` is set).
    metrics: Arc<crate::metrics::Metrics>,
    /// The server certificate's key, signing client-level DP plans in offers (when the
    /// federation has one).
    plan_signer: Option<fedlora_protocol::secagg::crypto::EcdsaP256Signer>,
    events: broadcast::Sender<Event>,
    /// Why this process can no longer drive (its store's connection, and the lease with it,
    /// or the relay's connection ended): it must stop ([`Coordinator::lost`]).
    lost: Mutex<Option<String>>,
}

impl Shared {
    /// Records that this process can no longer drive, and why.
    fn lose(&self, why: &str) {
        self.lost
            .lock()
            .expect("lock")
            .get_or_insert_with(|| why.to_string());
    }
}

/// A running coordinator.
pub struct Coordinator {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    enroll: Option<crate::enroll::EnrollService>,
}

impl Coordinator {
    /// Opens the store under `config.data_dir`, resumes the federation found there or starts a
    /// new one from `initial` (global version 0), binds the QUIC endpoint and starts serving.
    pub async fn start(config: CoordinatorConfig, initial: FlatAdapter) -> Result<Self> {
        Self::start_with(config, initial, None).await
    }

    /// [`Coordinator::start`] on a store opened already (`None`: open `config.store`), e.g.
    /// one whose connection holds the lease on driving the rounds (a front-end that took over).
    pub async fn start_with(
        config: CoordinatorConfig,
        initial: FlatAdapter,
        store: Option<Store>,
    ) -> Result<Self> {
        config.validate()?;
        if initial.spec().numel() == 0 {
            return Err(CoordinatorError::Config(
                "the adapter has no parameters (no LoRA targets?)".into(),
            ));
        }
        // everything that can fail on the user's input fails before anything is created on disk
        let server_config =
            crate::tls::server_config(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
        let ca_subject = crate::certs::ca_subject(&config.tls.ca)?;
        let plan_signer = match &config.federation.train.client_dp {
            Some(_) => Some(crate::tls::load_plan_signer(&config.tls.key)?),
            None => None,
        };
        let socket = crate::socket::bind_socket(config.listen, config.udp_recv_buffer)?;
        let metrics_listener = match config.metrics {
            Some(addr) => Some(crate::metrics::bind(addr)?),
            None => None,
        };
        info!(
            listen = %config.listen,
            data_dir = %config.data_dir.display(),
            store = %config.store,
            federation = %serde_json::to_string(&config.federation).unwrap_or_default(),
            "effective settings"
        );
        let spec = initial.spec().clone();
        let store = match store {
            Some(s) => s,
            None => Store::open_at(&config.data_dir, &config.store)?,
        };
        if !store.try_lead()? {
            return Err(CoordinatorError::Config(format!(
                "{} is driven by another running coordinator",
                store.describe()
            )));
        }
        let now = now_ms();
        let fed = match (store.setup()?, store.state()?) {
            (Some((stored_cfg, stored_spec)), Some(state)) => {
                if stored_spec.hash() != spec.hash() {
                    return Err(CoordinatorError::Config(format!(
                        "{} holds a federation for adapter spec {}, this coordinator serves {}",
                        config.data_dir.display(),
                        stored_spec.short_hash(),
                        spec.short_hash()
                    )));
                }
                if stored_cfg != config.federation {
                    warn!("federation config differs from the stored one; the stored one is used");
                }
                let (state, problems) = store.reconcile(state)?;
                for p in &problems {
                    error!(problem = %p, "store reconciliation");
                }
                info!(
                    version = state.global_version,
                    phase = ?phase_name(&state),
                    "resuming federation"
                );
                let mut fed = Federation::resume(stored_cfg, spec.hash(), state, now);
                for e in store.evals()? {
                    fed.restore_eval(&e.client, e.version);
                }
                // an async buffer without an open cohort holds no secrets: it stays open
                let abort = match (&fed.config().train.secure, &fed.state().phase) {
                    (Some(_), fedlora_protocol::Phase::Training(open))
                        if !(fed.is_async() && open.selected.is_empty()) =>
                    {
                        Some(open.round)
                    }
                    _ => None,
                };
                if let Some(round) = abort {
                    // the clients' secrets died with the round: abort it, retry with fresh keys
                    fed.fail_round(round, now)?;
                    if let Some(mut rec) = store.round(round)? {
                        rec.status = RoundStatus::Failed {
                            reason: "coordinator restarted during a secure round".into(),
                        };
                        rec.ended_ms = Some(now);
                        store.put_round(&rec, fed.state())?;
                    }
                    warn!(round, "aborted the secure round open at the restart");
                }
                fed
            }
            _ => {
                let fed = Federation::new(config.federation.clone(), spec.hash(), now)?;
                store.initialize(
                    &config.federation,
                    &spec,
                    &Codec::DenseF32.encode(initial.values()),
                    fed.state(),
                    now,
                )?;
                info!(spec = %spec.short_hash(), params = spec.numel(), "new federation");
                fed
            }
        };
        let version = fed.state().global_version;
        let encoded = store.checkpoint(version)?;
        // the moments of a server optimizer continue exactly from the current version
        let opt = store.optimizer_state(version)?.unwrap_or_default();
        let adapter = Codec::decode(
            &encoded,
            &spec,
            Some(&Codec::DenseF32),
            &CodecContext::default(),
        )?;
        let endpoint = crate::socket::serve_endpoint(server_config, socket)?;
        let (enrollment, enroll) = match &config.enroll {
            Some(ec) => {
                let e = Arc::new(crate::enroll::Enrollment::new(
                    ec.clone(),
                    store.registry()?,
                )?);
                let service = crate::enroll::EnrollService::start(e.clone())?;
                (Some(e), Some(service))
            }
            None => (None, None),
        };
        let data_dir = config.data_dir.clone();
        let (events, _) = broadcast::channel(1024);
        let strategy = config.federation.strategy.build();
        let full_rank = crate::aggregate::full_rank(&spec);
        let budget = ReadBudget::global(config.payload_budget);
        let sum_kind = {
            let train = &config.federation.train;
            let central = train
                .client_dp
                .as_ref()
                .filter(|p| train.secure.is_none() && p.central_noise_std().is_some());
            crate::running_sum::SumKind::of(
                &train.codec,
                central,
                strategy.needs_individual_updates(),
            )
        };
        let (commits, commit_queue) = commit::channel();
        // a round open at start was stored before (it is read back from the store)
        let fed_phase_round = match &fed.state().phase {
            fedlora_protocol::Phase::Training(o) => Some(o.round),
            _ => None,
        };
        let gate = poll_gate::PollGate::new(!fed.is_async());
        let shared = Arc::new(Shared {
            config,
            spec,
            store,
            fed: watched::Watched::new(fed, gate.changed().clone()),
            global: Mutex::new(Global::new(version, adapter, encoded)),
            bytes_down: Mutex::new(BTreeMap::new()),
            live: Mutex::new(BTreeMap::new()),
            recon: Mutex::new(BTreeMap::new()),
            secure: watched::Watched::new(None, gate.changed().clone()),
            gate,
            secure_bytes_up: Mutex::new(BTreeMap::new()),
            certs: Mutex::new(BTreeMap::new()),
            ca_subject,
            conns: Mutex::new(BTreeMap::new()),
            budget,
            downloads: ReadBudget::global(crate::wire::DOWNLOAD_BUDGET),
            addends: ReadBudget::global(ADDEND_BUDGET),
            cpu: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
            opt: Mutex::new(opt),
            strategy,
            sum_kind,
            sum: Mutex::new(None),
            commits: Mutex::new(commits),
            durable_round: std::sync::atomic::AtomicU64::new(match &fed_phase_round {
                Some(r) => *r,
                None => 0,
            }),
            full_rank,
            max_ranks: Mutex::new(BTreeMap::new()),
            offered_ranks: Mutex::new(BTreeMap::new()),
            partial: Arc::new(crate::partial::PartialUploads::new(
                &data_dir,
                crate::partial::DEFAULT_MAX_AGE_MS,
            )),
            enrollment,
            metrics: Arc::new(crate::metrics::Metrics::default()),
            plan_signer,
            events,
            lost: Mutex::new(None),
        });
        {
            let m = &shared.metrics;
            let fed = shared.fed.lock().expect("lock");
            m.global_version.set(fed.state().global_version as i64);
            if let Some(dp) = &fed.config().train.dp {
                m.dp_clip_norm.set(dp.clip_norm);
                m.dp_planned_rounds.set(dp.planned_rounds as i64);
            }
        }
        // the first status snapshot is on disk before the coordinator says it listens, so
        // `fedlora status` works on its data directory from then on (the loop keeps it fresh
        // from the events after this subscription)
        commit::spawn(Arc::downgrade(&shared), commit_queue)?;
        let snapshot_events = shared.events.subscribe();
        driver::write_status_snapshot(&shared.store);
        info!(addr = %endpoint.local_addr()?, "coordinator listening");
        let accept = tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
        let ticker = tokio::spawn(tick_loop(shared.clone()));
        let snapshots = tokio::spawn(snapshot_loop(shared.clone(), snapshot_events));
        let revocations = tokio::spawn(revocation::revocation_loop(shared.clone()));
        let mut tasks = vec![accept, ticker, snapshots, revocations];
        shared.metrics.driving.set(1);
        if let crate::store::StoreLocation::Postgres(url) = &shared.config.store {
            // other front-ends relay their clients' requests through the store to this one
            let (queue, notes) = crate::relay::queue::RelayQueue::connect(url).await?;
            let queue = Arc::new(queue);
            let id = crate::relay::queue::new_id();
            info!(frontend = %id, "driving the rounds; answering relayed requests");
            tasks.push(tokio::spawn(relayed::relay_loop(
                shared.clone(),
                queue.clone(),
                notes,
            )));
            tasks.push(tokio::spawn(crate::relay::queue::heartbeat_loop(
                queue,
                id,
                endpoint.local_addr()?.to_string(),
                true,
            )));
        }
        // the metrics port accepts only now, after the first status snapshot: a probe that
        // waits for `/healthz` (or for the port) may run `fedlora status` at once
        if let Some(socket) = metrics_listener {
            let l = crate::metrics::listen(socket)?;
            info!(addr = %l.local_addr()?, "serving metrics (/metrics, /healthz)");
            tasks.push(tokio::spawn(crate::metrics::serve(
                l,
                shared.metrics.clone(),
            )));
        }
        Ok(Self {
            endpoint,
            shared,
            tasks,
            enroll,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// The enrollment endpoint's bound address (`None` without enrollment).
    pub fn enroll_addr(&self) -> Option<SocketAddr> {
        self.enroll.as_ref().and_then(|e| e.local_addr().ok())
    }

    /// The metrics in the Prometheus text format (what `/metrics` serves).
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.encode()
    }

    /// Subscribes to events.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    /// The status report of the running federation (what `fedlora status` prints).
    pub fn report(&self) -> Result<crate::status::StatusReport> {
        crate::status::report(&self.shared.store)
    }

    /// The current global adapter and its version.
    pub fn global(&self) -> (u64, FlatAdapter) {
        let g = self.shared.global.lock().expect("lock");
        (g.version, g.adapter.clone())
    }

    /// A copy of the federation state.
    pub fn state(&self) -> FederationState {
        self.shared.fed.lock().expect("lock").state().clone()
    }

    /// Waits until the federation ends (the final evaluation is done); returns whether every
    /// planned round committed. Keeps serving `Finished` to clients for `linger`.
    pub async fn wait_finished(&self, linger: Duration) -> bool {
        let success = loop {
            if let fedlora_protocol::Phase::Finished { success } =
                self.shared.fed.lock().expect("lock").state().phase
            {
                break success;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        tokio::time::sleep(linger).await;
        success
    }

    /// Resolves, with the reason, when this process can no longer drive the rounds: its
    /// PostgreSQL store's connection ended (and the lease with it: another front-end may
    /// drive now), or the relay's did. Never, with the embedded store. The caller should stop.
    pub async fn lost(&self) -> String {
        loop {
            if let Some(why) = self.shared.lost.lock().expect("lock").clone() {
                return why;
            }
            if !self.shared.store.healthy() {
                return format!(
                    "lost the connection to {} (and the lease on driving with it)",
                    self.shared.store.describe()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Stops serving and closes the store.
    pub async fn shutdown(self) {
        self.endpoint
            .close(0u32.into(), b"coordinator shutting down");
        for t in &self.tasks {
            t.abort();
        }
        if let Some(e) = &self.enroll {
            e.shutdown();
        }
        let _ = self.shared.store.flush();
        self.endpoint.wait_idle().await;
    }
}

/// Runs `f` on the blocking pool once one of the coordinator's per-core permits is free.
async fn blocking<T: Send + 'static>(
    shared: &Shared,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::result::Result<T, tokio::task::JoinError> {
    let _permit = shared.cpu.acquire().await;
    tokio::task::spawn_blocking(f).await
}

fn phase_name(s: &FederationState) -> &'static str {
    use fedlora_protocol::Phase::*;
    match s.phase {
        Waiting { .. } => "waiting",
        Training(_) => "training",
        Evaluating { .. } => "evaluating",
        Finished { .. } => "finished",
    }
}
