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

struct Global {
    version: u64,
    adapter: FlatAdapter,
    encoded: Vec<u8>,
}

struct Shared {
    config: CoordinatorConfig,
    spec: AdapterSpec,
    store: Store,
    fed: Mutex<Federation>,
    global: Mutex<Global>,
    /// Task bytes sent per (round, client) for the open round; folded into its record.
    bytes_down: Mutex<BTreeMap<(u64, String), u64>>,
    /// Live connection per client id (the latest one wins).
    live: Mutex<BTreeMap<String, usize>>,
    /// What each client reconstructed of the global adapter (f16-delta downlink), by version.
    recon: Mutex<BTreeMap<String, (u64, FlatAdapter)>>,
    /// The open secure round, if the round is secure.
    secure: Mutex<Option<SecureRound>>,
    /// Secure-aggregation frame bytes received per (round, client); folded into bytes up.
    secure_bytes_up: Mutex<BTreeMap<(u64, String), u64>>,
    /// Client certificates (DER) from their TLS handshakes, relayed for key signatures.
    certs: Mutex<BTreeMap<String, Vec<u8>>>,
    /// Open connections per client id, oldest first (at most [`MAX_CONNECTIONS_PER_CLIENT`]).
    conns: Mutex<BTreeMap<String, Vec<quinn::Connection>>>,
    /// Bytes of payload bodies being read, over all connections (see [`crate::wire`]).
    budget: Arc<tokio::sync::Semaphore>,
    /// The server optimizer's moments that go with the current global version.
    opt: Mutex<fedlora_protocol::strategy::OptimizerState>,
    /// The federation's strategy (built from its config).
    strategy: Box<dyn fedlora_protocol::strategy::Strategy>,
    /// The federation's LoRA rank R.
    full_rank: usize,
    /// Each connected client's declared largest rank, when below R (heterogeneous ranks).
    max_ranks: Mutex<BTreeMap<String, u32>>,
    /// The rank each client was offered for a round: `client → (round, rank)`.
    offered_ranks: Mutex<BTreeMap<String, (u64, u32)>>,
    /// Operator metrics (served when `config.metrics` is set).
    metrics: Arc<crate::metrics::Metrics>,
    events: broadcast::Sender<Event>,
}

/// A running coordinator.
pub struct Coordinator {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn bind_socket(addr: SocketAddr, recv_buffer: usize) -> Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Err(e) = sock.set_recv_buffer_size(recv_buffer) {
        warn!(error = %e, "could not set the UDP receive buffer");
    }
    let got = sock.recv_buffer_size().unwrap_or(0);
    if got < recv_buffer {
        warn!(
            requested = recv_buffer,
            granted = got,
            "UDP receive buffer capped by the kernel (raise net.core.rmem_max)"
        );
    } else {
        info!(bytes = got, "UDP receive buffer");
    }
    sock.bind(&addr.into()).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            " (another coordinator is running there? choose another --listen port)"
        } else {
            ""
        };
        CoordinatorError::Config(format!("cannot listen on {addr}: {e}{hint}"))
    })?;
    Ok(sock.into())
}

impl Coordinator {
    /// Opens the store under `config.data_dir`, resumes the federation found there or starts a
    /// new one from `initial` (global version 0), binds the QUIC endpoint and starts serving.
    pub async fn start(config: CoordinatorConfig, initial: FlatAdapter) -> Result<Self> {
        config.validate()?;
        if initial.spec().numel() == 0 {
            return Err(CoordinatorError::Config(
                "the adapter has no parameters (no LoRA targets?)".into(),
            ));
        }
        // everything that can fail on the user's input fails before anything is created on disk
        let server_config =
            crate::tls::server_config(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
        let socket = bind_socket(config.listen, config.udp_recv_buffer)?;
        let metrics_listener = match config.metrics {
            Some(addr) => Some(crate::metrics::bind(addr).await?),
            None => None,
        };
        info!(
            listen = %config.listen,
            data_dir = %config.data_dir.display(),
            federation = %serde_json::to_string(&config.federation).unwrap_or_default(),
            "effective settings"
        );
        let spec = initial.spec().clone();
        let store = Store::open(&config.data_dir)?;
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
                if let (Some(_), fedlora_protocol::Phase::Training(open)) =
                    (&fed.config().train.secure, &fed.state().phase)
                {
                    // the clients' secrets died with the round: abort it, retry with fresh keys
                    let round = open.round;
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
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            quinn::default_runtime()
                .ok_or_else(|| CoordinatorError::Config("no async runtime".into()))?,
        )?;
        let (events, _) = broadcast::channel(1024);
        let strategy = config.federation.strategy.build();
        let full_rank = crate::aggregate::full_rank(&spec);
        let shared = Arc::new(Shared {
            config,
            spec,
            store,
            fed: Mutex::new(fed),
            global: Mutex::new(Global {
                version,
                adapter,
                encoded,
            }),
            bytes_down: Mutex::new(BTreeMap::new()),
            live: Mutex::new(BTreeMap::new()),
            recon: Mutex::new(BTreeMap::new()),
            secure: Mutex::new(None),
            secure_bytes_up: Mutex::new(BTreeMap::new()),
            certs: Mutex::new(BTreeMap::new()),
            conns: Mutex::new(BTreeMap::new()),
            budget: ReadBudget::global(),
            opt: Mutex::new(opt),
            strategy,
            full_rank,
            max_ranks: Mutex::new(BTreeMap::new()),
            offered_ranks: Mutex::new(BTreeMap::new()),
            metrics: Arc::new(crate::metrics::Metrics::default()),
            events,
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
        info!(addr = %endpoint.local_addr()?, "coordinator listening");
        let accept = tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
        let ticker = tokio::spawn(tick_loop(shared.clone()));
        let snapshots = tokio::spawn(snapshot_loop(shared.clone()));
        let mut tasks = vec![accept, ticker, snapshots];
        if let Some(l) = metrics_listener {
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
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
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

    /// Stops serving and closes the store.
    pub async fn shutdown(self) {
        self.endpoint
            .close(0u32.into(), b"coordinator shutting down");
        for t in &self.tasks {
            t.abort();
        }
        let _ = self.shared.store.flush();
        self.endpoint.wait_idle().await;
    }
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

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve_connection(conn, shared).await,
                Err(e) => warn!(%remote, error = %e, "handshake refused"),
            }
        });
    }
}

fn peer_cert(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let id = conn.peer_identity()?;
    let certs = id
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| c.to_vec())
}

async fn serve_connection(conn: quinn::Connection, shared: Arc<Shared>) {
    let remote = conn.remote_address();
    let Some(der) = peer_cert(&conn) else {
        warn!(%remote, "connection without a client certificate");
        conn.close(1u32.into(), b"client certificate required");
        return;
    };
    let client = match certs::client_id(&der) {
        Ok(c) => c,
        Err(e) => {
            warn!(%remote, error = %e, "unusable client certificate");
            conn.close(1u32.into(), b"unusable client certificate");
            return;
        }
    };
    let fingerprint = certs::fingerprint(&der);
    let conn_id = conn.stable_id();
    {
        // a client id holds a bounded number of connections: the oldest makes room
        let mut conns = shared.conns.lock().expect("lock");
        let mine = conns.entry(client.clone()).or_default();
        mine.push(conn.clone());
        while mine.len() > MAX_CONNECTIONS_PER_CLIENT {
            let old = mine.remove(0);
            old.close(3u32.into(), b"too many connections for this client");
        }
    }
    let budget = ReadBudget::for_connection(shared.budget.clone());
    let mut registered = false;
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                info!(%client, reason = %e, "connection closed");
                break;
            }
        };
        if !registered {
            // the hello is handled inline: nothing else is served before it succeeds
            match handle_hello(&shared, &client, &fingerprint, &budget, send, recv).await {
                Ok(true) => {
                    registered = true;
                    shared
                        .certs
                        .lock()
                        .expect("lock")
                        .insert(client.clone(), der.clone());
                    shared
                        .live
                        .lock()
                        .expect("lock")
                        .insert(client.clone(), conn_id);
                    let n = {
                        let mut fed = shared.fed.lock().expect("lock");
                        fed.connect(&client);
                        fed.connected().len()
                    };
                    shared.metrics.connected_clients.set(n as i64);
                }
                Ok(false) => {}
                Err(HelloEnd::Close(reason)) => {
                    conn.close(2u32.into(), reason.as_bytes());
                    break;
                }
            }
            continue;
        }
        let shared = shared.clone();
        let client = client.clone();
        let budget = budget.clone();
        tokio::spawn(async move { serve_stream(&shared, &client, &budget, send, recv).await });
    }
    if let Some(mine) = shared.conns.lock().expect("lock").get_mut(&client) {
        mine.retain(|c| c.stable_id() != conn_id);
    }
    let mut live = shared.live.lock().expect("lock");
    if live.get(&client) == Some(&conn_id) {
        live.remove(&client);
        let mut fed = shared.fed.lock().expect("lock");
        fed.disconnect(&client);
        shared
            .metrics
            .connected_clients
            .set(fed.connected().len() as i64);
    }
}

enum HelloEnd {
    Close(String),
}

async fn handle_hello(
    shared: &Shared,
    client: &str,
    fingerprint: &str,
    budget: &ReadBudget,
    mut send: SendStream,
    mut recv: RecvStream,
) -> std::result::Result<bool, HelloEnd> {
    let msg = match read_request(&mut recv, budget).await {
        Ok(r) => r.msg,
        Err(r) => {
            let _ = respond(&mut send, &CoordMsg::Refused(r)).await;
            return Ok(false);
        }
    };
    let refusal = match msg {
        ClientMsg::Hello {
            protocol_version,
            spec_hash,
            max_rank,
        } => {
            let mut ranks = shared.max_ranks.lock().expect("lock");
            match max_rank {
                Some(r) if (r as usize) < shared.full_rank => {
                    ranks.insert(client.to_string(), r.max(1));
                }
                _ => {
                    ranks.remove(client);
                }
            }
            drop(ranks);
            let deny = certs::load_deny_list(&shared.config.tls.revoked).unwrap_or_else(|e| {
                error!(error = %e, "cannot read the deny-list; refusing everyone");
                std::iter::once(fingerprint.to_string()).collect()
            });
            if deny.contains(fingerprint) {
                Some((
                    Refusal::new(RefusalCode::Revoked, "this client certificate is revoked"),
                    true,
                ))
            } else if protocol_version != PROTOCOL_VERSION {
                Some((
                    Refusal::new(
                        RefusalCode::VersionMismatch,
                        format!(
                            "coordinator speaks protocol {PROTOCOL_VERSION}, client {protocol_version}"
                        ),
                    ),
                    true,
                ))
            } else if spec_hash != shared.spec.hash() {
                Some((
                    Refusal::new(
                        RefusalCode::SpecMismatch,
                        format!(
                            "the federation's adapter is {}{}, this client's is {}",
                            shared.spec.short_hash(),
                            shared
                                .config
                                .adapter_description
                                .as_deref()
                                .map_or(String::new(), |d| format!(" ({d})")),
                            hex::encode(&spec_hash[..8])
                        ),
                    ),
                    true,
                ))
            } else {
                None
            }
        }
        _ => Some((
            Refusal::new(RefusalCode::NotRegistered, "send a hello first"),
            false,
        )),
    };
    match refusal {
        Some((r, close)) => {
            warn!(%client, code = ?r.code, reason = %r.message, "hello refused");
            shared.metrics.refused(r.code);
            let _ = respond(&mut send, &CoordMsg::Refused(r.clone())).await;
            if close {
                // give the refusal time to reach the peer before closing
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(HelloEnd::Close(format!("{:?}", r.code)))
            } else {
                Ok(false)
            }
        }
        None => {
            if let Err(e) = shared.store.saw_client(client, fingerprint, now_ms()) {
                error!(error = %e, "recording client");
            }
            info!(%client, "client registered");
            let _ = respond(
                &mut send,
                &CoordMsg::Welcome {
                    client_id: client.to_string(),
                    protocol_version: PROTOCOL_VERSION,
                },
            )
            .await;
            Ok(true)
        }
    }
}

async fn serve_stream(
    shared: &Shared,
    client: &str,
    budget: &ReadBudget,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let req = match read_request(&mut recv, budget).await {
        Ok(r) => r,
        Err(r) => {
            warn!(%client, code = ?r.code, reason = %r.message, "bad frame");
            shared.metrics.refused(r.code);
            let _ = respond(&mut send, &CoordMsg::Refused(r)).await;
            return;
        }
    };
    let wire = req.wire_bytes;
    shared.metrics.bytes_up.inc_by(wire);
    let (reply, round_down) = match req.msg {
        ClientMsg::Hello { .. } => (
            CoordMsg::Refused(Refusal::new(
                RefusalCode::Malformed,
                "hello already done on this connection",
            )),
            None,
        ),
        ClientMsg::Poll { held_version } => poll(shared, client, held_version),
        ClientMsg::Upload(u) => {
            let got = Received {
                round: u.round,
                spec_hash: u.spec_hash,
                weight: u.weight,
                train_loss: Some(u.train_loss),
                private: false,
                wire_bytes: wire,
            };
            (upload(shared, client, got, &u.payload), None)
        }
        ClientMsg::PrivateUpload(u) => {
            let got = Received {
                round: u.round,
                spec_hash: u.spec_hash,
                weight: 1.0,
                train_loss: u.noised_train_loss,
                private: true,
                wire_bytes: wire,
            };
            (upload(shared, client, got, &u.payload), None)
        }
        ClientMsg::EvalReport(r) => (eval_report(shared, client, r), None),
        ClientMsg::EvalWithheld { version } => (eval_withheld(shared, client, version), None),
        ClientMsg::Decline { round, reason } => (decline(shared, client, round, reason), None),
        ClientMsg::SecAgg { round, body } => {
            (secure_receive(shared, client, round, body, wire), None)
        }
    };
    if let CoordMsg::Refused(r) = &reply {
        shared.metrics.refused(r.code);
        if r.code != RefusalCode::Malformed {
            warn!(%client, code = ?r.code, reason = %r.message, "request refused");
        }
    }
    if let Ok(n) = respond(&mut send, &reply).await {
        shared.metrics.bytes_down.inc_by(n);
        if let Some(round) = round_down {
            *shared
                .bytes_down
                .lock()
                .expect("lock")
                .entry((round, client.to_string()))
                .or_default() += n;
        }
    }
}

/// The global adapter for `client` as the downlink rule says: `(global_from, payload)`.
fn global_payload(
    shared: &Shared,
    global: &Global,
    client: &str,
    held: Option<u64>,
    downlink: Downlink,
) -> (Option<u64>, Vec<u8>) {
    if downlink == Downlink::Full {
        return (None, global.encoded.clone());
    }
    let mut recon = shared.recon.lock().expect("lock");
    if let (Some(h), Some((v, r))) = (held, recon.get(client)) {
        if *v == h {
            if h == global.version {
                return (Some(h), Vec::new());
            }
            if let Some((bytes, next)) = f16_step(&shared.spec, &global.adapter, r) {
                // what the client will hold after applying this delta, exactly
                recon.insert(client.to_string(), (global.version, next));
                return (Some(h), bytes);
            }
            warn!(%client, "the downlink step does not fit in f16; sending the full adapter");
        }
    }
    recon.insert(client.to_string(), (global.version, global.adapter.clone()));
    (None, global.encoded.clone())
}

/// The f16 delta from `held` to `global` and what the client reconstructs from it; `None`
/// when some step is beyond f16's range (|x| > 65504) or the result is not finite.
fn f16_step(
    spec: &AdapterSpec,
    global: &FlatAdapter,
    held: &FlatAdapter,
) -> Option<(Vec<u8>, FlatAdapter)> {
    const F16_MAX: f32 = 65504.0;
    let step = global.delta_from(held).ok()?;
    if step
        .values()
        .iter()
        .any(|x| !x.is_finite() || x.abs() > F16_MAX)
    {
        return None;
    }
    let bytes = Codec::F16.encode(step.values());
    let sent = Codec::decode(&bytes, spec, Some(&Codec::F16), &CodecContext::default()).ok()?;
    let mut next = held.clone();
    next.apply_delta(&sent).ok()?;
    next.values()
        .iter()
        .all(|x| x.is_finite())
        .then_some((bytes, next))
}

fn poll(shared: &Shared, client: &str, held: Option<u64>) -> (CoordMsg, Option<u64>) {
    let (directive, train, seed) = {
        let mut fed = shared.fed.lock().expect("lock");
        (
            fed.poll(client),
            shared.strategy.configure_round(&fed.config().train),
            fed.config().seed,
        )
    };
    let wait = Task::Wait {
        retry_after_ms: shared.config.poll_interval_ms,
    };
    let mut secure_shares = None;
    if let (Some(_), Directive::Train { round, .. } | Directive::AlreadyUploaded { round }) =
        (&train.secure, &directive)
    {
        // a secure round: its stages decide; until its state exists, wait
        let sec = shared.secure.lock().expect("lock");
        let Some(sr) = sec.as_ref().filter(|s| s.round == *round) else {
            return (CoordMsg::Task(wait), None);
        };
        let certs = shared.certs.lock().expect("lock");
        if let Some(task) = sr.task(client, &certs) {
            return (
                CoordMsg::Task(Task::SecAgg {
                    round: *round,
                    task: Box::new(task),
                }),
                None,
            );
        }
        match sr.wants_input(client) {
            Some(shares) => secure_shares = Some(shares),
            None => return (CoordMsg::Task(wait), None),
        }
    }
    let global = shared.global.lock().expect("lock");
    let task = match directive {
        Directive::Wait => wait,
        Directive::Train {
            round,
            base_version,
            evaluate,
        } => {
            if base_version != global.version {
                wait
            } else {
                let rank = shared.max_ranks.lock().expect("lock").get(client).copied();
                let (global_from, payload) = match rank {
                    // a lower-rank client: its slice, in full
                    Some(r) => match fedlora_protocol::rank::slice(&global.adapter, r as usize) {
                        Ok(sliced) => {
                            shared
                                .offered_ranks
                                .lock()
                                .expect("lock")
                                .insert(client.to_string(), (round, r));
                            (None, Codec::DenseF32.encode(sliced.values()))
                        }
                        Err(e) => {
                            error!(%client, error = %e, "cannot slice the global adapter");
                            return (CoordMsg::Task(wait), None);
                        }
                    },
                    None => global_payload(shared, &global, client, held, train.downlink),
                };
                return (
                    CoordMsg::Task(Task::Train(RoundOffer {
                        round,
                        global_version: base_version,
                        spec_hash: shared.spec.hash(),
                        config: train,
                        evaluate,
                        codec_seed: codec_seed(seed, round),
                        global_from,
                        global: payload,
                        secure_shares,
                        rank,
                    })),
                    Some(round),
                );
            }
        }
        Directive::Evaluate { version } if version == global.version => {
            let (global_from, payload) =
                global_payload(shared, &global, client, held, train.downlink);
            Task::Evaluate {
                version,
                global_from,
                global: payload,
            }
        }
        Directive::Evaluate { .. } => wait,
        Directive::AlreadyUploaded { round } => Task::AlreadyUploaded { round },
        Directive::Finished { version } => Task::Finished { version },
    };
    (CoordMsg::Task(task), None)
}

/// What an upload carried besides its payload, as received.
struct Received {
    round: u64,
    spec_hash: SpecHash,
    weight: f64,
    /// The training loss the upload carried: raw (non-DP), noised (a DP client that opted
    /// in), or none.
    train_loss: Option<f64>,
    /// A [`ClientMsg::PrivateUpload`].
    private: bool,
    /// Frame bytes on the wire.
    wire_bytes: u64,
}

/// Refuses an upload of the wrong kind for this federation: a plain upload (with a loss and a
/// weight) in a DP federation, a private one without DP, and any unmasked upload in a secure
/// federation.
fn check_kind(train: &fedlora_protocol::TrainConfig, private: bool) -> Result<(), Refusal> {
    let wrong = |m: &str| Err(Refusal::new(RefusalCode::WrongKind, m));
    if train.secure.is_some() {
        return wrong("this federation aggregates securely: send a masked input, not an upload");
    }
    match (train.dp.is_some(), private) {
        (true, false) => wrong("this federation trains under DP: send a private upload"),
        (false, true) => wrong("this federation trains without DP: send a plain upload"),
        _ => Ok(()),
    }
}

fn upload(shared: &Shared, client: &str, u: Received, payload: &[u8]) -> CoordMsg {
    let (expected, seed) = {
        let fed = shared.fed.lock().expect("lock");
        if let Err(r) = check_kind(&fed.config().train, u.private) {
            return CoordMsg::Refused(r);
        }
        (fed.config().train.codec.clone(), fed.config().seed)
    };
    let max_norm = shared
        .fed
        .lock()
        .expect("lock")
        .config()
        .train
        .max_update_norm;
    let ctx = CodecContext {
        round_seed: codec_seed(seed, u.round),
    };
    // the payload must decode to the federation's spec before anything is stored
    if let Err(e) = Codec::decode(payload, &shared.spec, Some(&expected), &ctx) {
        return CoordMsg::Refused(Refusal::new(RefusalCode::Malformed, e.to_string()));
    }
    if let Some(bound) = max_norm {
        if let Err(m) =
            crate::aggregate::check_update_norm(&expected, &shared.spec, &ctx, payload, bound)
        {
            warn!(round = u.round, %client, reason = %m, "update refused: norm bound");
            shared.metrics.refused(RefusalCode::UpdateNormExceeded);
            return CoordMsg::Refused(Refusal::new(RefusalCode::UpdateNormExceeded, m));
        }
    }
    let digest: [u8; 32] = Sha256::digest(payload).into();
    let meta = UploadMeta {
        digest,
        weight: u.weight,
        bytes: payload.len() as u64,
        train_loss: u.train_loss,
        rank: trained_rank(shared, client, u.round),
    };
    let record = UploadRecord {
        round: u.round,
        client: client.to_string(),
        meta: meta.clone(),
        wire_bytes: u.wire_bytes,
        accepted_ms: now_ms(),
    };
    // Check and accept under the lock, persist, and roll back if persisting fails: an ack is
    // sent only for an upload that is on disk.
    let mut fed = shared.fed.lock().expect("lock");
    match fed.check_upload(client, u.round, &u.spec_hash, &digest, u.weight) {
        Ok(UploadVerdict::New) => {}
        Ok(UploadVerdict::AlreadyAccepted) => {
            info!(round = u.round, %client, "upload already accepted (re-send)");
            return CoordMsg::Ack {
                round: u.round,
                status: fedlora_protocol::AckStatus::AlreadyAccepted,
            };
        }
        Err(r) => return CoordMsg::Refused(r),
    }
    let before = fed.clone();
    let state = match fed.accept_upload(client, u.round, meta) {
        Ok(s) => s.clone(),
        Err(r) => return CoordMsg::Refused(r),
    };
    if let Err(e) = shared.store.put_upload(&record, payload, &state) {
        *fed = before;
        error!(error = %e, %client, "storing an upload failed");
        return CoordMsg::Refused(Refusal::new(
            RefusalCode::Internal,
            "could not store the upload; retry",
        ));
    }
    drop(fed);
    info!(
        round = u.round,
        client = %client,
        bytes = u.wire_bytes,
        weight = u.weight,
        "upload accepted"
    );
    shared.metrics.uploads_accepted.inc();
    let _ = shared.events.send(Event::UploadAccepted {
        round: u.round,
        client: client.to_string(),
    });
    CoordMsg::Ack {
        round: u.round,
        status: fedlora_protocol::AckStatus::Accepted,
    }
}

fn secure_receive(
    shared: &Shared,
    client: &str,
    round: u64,
    body: SecAggBody,
    wire: u64,
) -> CoordMsg {
    let mut sec = shared.secure.lock().expect("lock");
    let Some(sr) = sec.as_mut().filter(|s| s.round == round) else {
        return CoordMsg::Refused(Refusal::new(
            RefusalCode::WrongRound,
            format!("no secure round {round} is open"),
        ));
    };
    if !sr.selected.contains(client) {
        return CoordMsg::Refused(Refusal::new(
            RefusalCode::NotSelected,
            format!("client {client} is not a participant of round {round}"),
        ));
    }
    // counted only for the open round's participants: the map cannot grow with made-up rounds
    *shared
        .secure_bytes_up
        .lock()
        .expect("lock")
        .entry((round, client.to_string()))
        .or_default() += wire;
    let input = match &body {
        SecAggBody::Input(b) => Some((Sha256::digest(b).into(), b.len() as u64)),
        _ => None,
    };
    if let Err(e) = sr.receive(client, body) {
        return CoordMsg::Refused(Refusal::new(RefusalCode::StageRefused, e.to_string()));
    }
    if let Some((digest, bytes)) = input {
        // bookkeeping: the round's participants (the masked input itself stays in the sum)
        let meta = UploadMeta {
            digest,
            weight: 1.0,
            bytes,
            train_loss: None,
            rank: trained_rank(shared, client, round),
        };
        let _ = shared
            .fed
            .lock()
            .expect("lock")
            .accept_upload(client, round, meta);
        info!(round, client = %client, bytes, "masked input accepted");
        shared.metrics.uploads_accepted.inc();
        let _ = shared.events.send(Event::UploadAccepted {
            round,
            client: client.to_string(),
        });
    }
    CoordMsg::Ack {
        round,
        status: fedlora_protocol::AckStatus::Accepted,
    }
}

/// The rank `client` trained for `round`: the rank it was offered, else its declared one
/// (after a restart), `None` for the federation's rank.
fn trained_rank(shared: &Shared, client: &str, round: u64) -> Option<u32> {
    if let Some((r, rank)) = shared.offered_ranks.lock().expect("lock").get(client) {
        if *r == round {
            return Some(*rank);
        }
    }
    shared.max_ranks.lock().expect("lock").get(client).copied()
}

fn decline(shared: &Shared, client: &str, round: u64, reason: DeclineReason) -> CoordMsg {
    let mut fed = shared.fed.lock().expect("lock");
    let before = fed.clone();
    if let Err(r) = fed.decline(client, round, reason) {
        return CoordMsg::Refused(r);
    }
    if let Err(e) = shared.store.save_state(fed.state()) {
        *fed = before;
        error!(error = %e, "storing a decline failed");
        return CoordMsg::Refused(Refusal::new(RefusalCode::Internal, "retry"));
    }
    warn!(round, %client, reason = reason.describe(), "client declined the round");
    CoordMsg::DeclineRecorded { round }
}

fn eval_report(shared: &Shared, client: &str, r: EvalReport) -> CoordMsg {
    // (the frame decoder already refused non-finite or negative losses and empty reports)
    let mut fed = shared.fed.lock().expect("lock");
    let before = fed.clone();
    if let Err(refusal) = fed.record_eval(client, r.version) {
        return CoordMsg::Refused(refusal);
    }
    let rec = EvalRecord {
        version: r.version,
        client: client.to_string(),
        loss: r.loss,
        tokens: r.tokens,
    };
    // acknowledged only once stored; otherwise the client is asked again
    if let Err(e) = shared.store.put_eval(&rec) {
        *fed = before;
        error!(error = %e, "storing an evaluation failed");
        return CoordMsg::Refused(Refusal::new(
            RefusalCode::Internal,
            "could not store the evaluation; retry",
        ));
    }
    drop(fed);
    info!(version = r.version, %client, loss = r.loss, "evaluation recorded");
    CoordMsg::EvalRecorded { version: r.version }
}

/// A client withholds its evaluation (it trains under DP): nothing is stored, and the
/// federation stops waiting for its report of `version`.
fn eval_withheld(shared: &Shared, client: &str, version: u64) -> CoordMsg {
    if let Err(refusal) = shared
        .fed
        .lock()
        .expect("lock")
        .record_eval(client, version)
    {
        return CoordMsg::Refused(refusal);
    }
    info!(version, %client, "evaluation withheld (private client)");
    CoordMsg::EvalRecorded { version }
}

/// Keeps `DATA_DIR/status.json` current: written at start and after every event (a burst of
/// events is written once), so `fedlora status` works while this process holds the store.
async fn snapshot_loop(shared: Arc<Shared>) {
    let mut events = shared.events.subscribe();
    loop {
        let s = shared.clone();
        let written = tokio::task::spawn_blocking(move || {
            crate::status::report(&s.store)
                .and_then(|r| crate::status::write_snapshot(s.store.dir(), &r))
        })
        .await;
        if let Ok(Err(e)) = written {
            warn!(error = %e, "could not write the status snapshot");
        }
        match events.recv().await {
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
        // coalesce a burst of events into one write
        tokio::time::sleep(Duration::from_millis(100)).await;
        while events.try_recv().is_ok() {}
    }
}

async fn tick_loop(shared: Arc<Shared>) {
    let mut interval = tokio::time::interval(Duration::from_millis(shared.config.tick_ms));
    loop {
        interval.tick().await;
        let shared2 = shared.clone();
        // aggregation reads files and does arithmetic: keep it off the async workers
        let r = tokio::task::spawn_blocking(move || tick_once(&shared2)).await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(error = %e, "tick failed"),
            Err(e) => error!(error = %e, "tick panicked"),
        }
    }
}

fn secure_tick(shared: &Shared, now: u64) -> Result<()> {
    let outcome = match shared.secure.lock().expect("lock").as_mut() {
        Some(sr) => (sr.round, sr.advance(now)),
        None => return Ok(()),
    };
    let (round, adv) = outcome;
    let failure = match adv {
        Advance::Wait => return Ok(()),
        Advance::Fail(reason) => reason,
        // any failure after unmasking fails the round too: it must never wedge the federation
        Advance::Sum(sum, counted) => match finish_secure(shared, round, sum, &counted, now) {
            Ok(()) => {
                *shared.secure.lock().expect("lock") = None;
                return Ok(());
            }
            Err(e) => e.to_string(),
        },
    };
    *shared.secure.lock().expect("lock") = None;
    warn!(round, reason = %failure, "secure round failed");
    let state = {
        let mut fed = shared.fed.lock().expect("lock");
        fed.fail_round(round, now)?;
        fed.state().clone()
    };
    fail_record(shared, round, failure, &state, now)
}

/// Applies an unmasked sum: needs at least `min_clients` counted clients, a sum that decodes
/// (a positive total weight) and a commit that succeeds.
fn finish_secure(
    shared: &Shared,
    round: u64,
    sum: Vec<u64>,
    counted: &std::collections::BTreeSet<String>,
    now: u64,
) -> Result<()> {
    let (codec, seed, uploads, selected, min_clients) = {
        let fed = shared.fed.lock().expect("lock");
        let fedlora_protocol::Phase::Training(open) = &fed.state().phase else {
            return Err(CoordinatorError::Config(format!(
                "secure round {round} ended, but no round is open"
            )));
        };
        let uploads: BTreeMap<String, UploadMeta> = open
            .uploads
            .iter()
            .filter(|(c, _)| counted.contains(*c))
            .map(|(c, m)| (c.clone(), m.clone()))
            .collect();
        (
            fed.config().train.codec.clone(),
            fed.config().seed,
            uploads,
            open.selected.clone(),
            fed.config().min_clients,
        )
    };
    if counted.len() < min_clients {
        return Err(CoordinatorError::Config(format!(
            "{} masked inputs unmasked, {min_clients} needed",
            counted.len()
        )));
    }
    let Codec::Modular(p) = &codec else {
        return Err(CoordinatorError::Config(
            "secure rounds need the modular codec".into(),
        ));
    };
    let ctx = CodecContext {
        round_seed: codec_seed(seed, round),
    };
    let ms = ModularSum::from_sum(sum, p.modulus_bits(), counted.len());
    let full = shared.full_rank;
    let counts = fedlora_protocol::rank::RankCounts::new(
        full,
        counted.iter().map(|c| {
            let r = uploads.get(c).and_then(|m| m.rank);
            (1.0, r.map_or(full, |r| (r as usize).min(full)))
        }),
    );
    let delta = crate::aggregate::modular_sum_delta(&codec, &shared.spec, &ctx, &ms, &counts)?;
    let missing = selected.difference(counted).cloned().collect();
    info!(round, counted = counted.len(), "secure sum unmasked");
    commit(shared, round, delta, &uploads, &missing, now)
}

fn tick_once(shared: &Shared) -> Result<()> {
    let now = now_ms();
    secure_tick(shared, now)?;
    let transition = {
        let mut fed = shared.fed.lock().expect("lock");
        let t = fed.tick(now);
        (t, fed.state().clone())
    };
    let (Some(t), state) = transition else {
        return Ok(());
    };
    match t {
        Transition::RoundStarted { round, selected } => {
            let rec = RoundRecord {
                round,
                base_version: state.global_version,
                status: RoundStatus::Open,
                selected: selected.iter().cloned().collect(),
                participants: vec![],
                stragglers: vec![],
                bytes_up: BTreeMap::new(),
                bytes_down: BTreeMap::new(),
                train_loss: None,
                strategy: shared
                    .fed
                    .lock()
                    .expect("lock")
                    .config()
                    .strategy
                    .name()
                    .to_string(),
                started_ms: now,
                ended_ms: None,
            };
            shared.store.put_round(&rec, &state)?;
            let (train, timeout) = {
                let fed = shared.fed.lock().expect("lock");
                (fed.config().train.clone(), fed.config().round_timeout_ms)
            };
            if let (Some(params), Codec::Modular(p)) = (&train.secure, &train.codec) {
                let k = fedlora_protocol::codec::sparse::kept(shared.spec.numel(), p.fraction);
                *shared.secure.lock().expect("lock") = Some(SecureRound::new(
                    round,
                    params.clone(),
                    k + 1,
                    selected.clone(),
                    now,
                    timeout,
                ));
            }
            info!(round, participants = selected.len(), "round started");
            let _ = shared.events.send(Event::RoundStarted {
                round,
                participants: selected.len(),
            });
        }
        Transition::Aggregate {
            round,
            uploads,
            missing,
        } => {
            // persist `closed` first, so a restart does not reopen the round to uploads
            shared.store.save_state(&state)?;
            for c in &missing {
                warn!(round, client = %c, "straggler dropped from the round");
            }
            match aggregate(shared, round, &uploads) {
                Ok(new_global) => commit(shared, round, new_global, &uploads, &missing, now)?,
                Err(e) => {
                    error!(round, error = %e, "aggregation failed; failing the round");
                    let state = {
                        let mut fed = shared.fed.lock().expect("lock");
                        fed.fail_round(round, now)?;
                        fed.state().clone()
                    };
                    fail_record(shared, round, e.to_string(), &state, now)?;
                }
            }
        }
        Transition::RoundFailed { round, reason } => {
            warn!(round, %reason, "round failed");
            fail_record(shared, round, reason, &state, now)?;
        }
        Transition::EvaluationStarted { version } => {
            info!(version, "final evaluation started");
        }
        Transition::Finished { success } => {
            shared.store.save_state(&state)?;
            info!(success, "federation finished");
            let _ = shared.events.send(Event::Finished { success });
        }
    }
    Ok(())
}

fn fail_record(
    shared: &Shared,
    round: u64,
    reason: String,
    state: &FederationState,
    now: u64,
) -> Result<()> {
    let mut rec = shared
        .store
        .round(round)?
        .ok_or_else(|| CoordinatorError::Storage(format!("no record for round {round}")))?;
    rec.status = RoundStatus::Failed {
        reason: reason.clone(),
    };
    rec.ended_ms = Some(now);
    shared
        .metrics
        .round_ended("failed", now.saturating_sub(rec.started_ms) as f64 / 1e3);
    rec.bytes_down = take_round(&shared.bytes_down, round);
    // per-round counters of a round that is over are dropped
    take_round(&shared.secure_bytes_up, round);
    shared.store.put_round(&rec, state)?;
    let _ = shared.events.send(Event::RoundFailed { round, reason });
    Ok(())
}

/// Removes and returns `round`'s per-client byte counts from a (round, client) counter.
fn take_round(counter: &Mutex<BTreeMap<(u64, String), u64>>, round: u64) -> BTreeMap<String, u64> {
    let mut all = counter.lock().expect("lock");
    let keys: Vec<_> = all.keys().filter(|(r, _)| *r == round).cloned().collect();
    keys.into_iter()
        .filter_map(|k| all.remove(&k).map(|v| (k.1, v)))
        .collect()
}

/// Loads every upload of `round` and aggregates them into the next global.
fn aggregate(
    shared: &Shared,
    round: u64,
    uploads: &BTreeMap<String, UploadMeta>,
) -> Result<FlatAdapter> {
    let (codec, seed) = {
        let fed = shared.fed.lock().expect("lock");
        (fed.config().train.codec.clone(), fed.config().seed)
    };
    let ctx = CodecContext {
        round_seed: codec_seed(seed, round),
    };
    let mut payloads = Vec::with_capacity(uploads.len());
    for (client, meta) in uploads {
        let bytes = shared.store.upload_payload(round, client, &meta.digest)?;
        payloads.push((meta.weight, meta.rank, bytes));
    }
    crate::aggregate::aggregate_payloads(
        shared.strategy.as_ref(),
        &codec,
        &shared.spec,
        &ctx,
        payloads
            .iter()
            .map(|(weight, rank, b)| crate::aggregate::Payload {
                weight: *weight,
                rank: *rank,
                bytes: b.as_slice(),
            }),
    )
}

/// Commits `round`: `delta` is the round's aggregated delta, which the federation's strategy
/// turns into the next global adapter; a server optimizer's moments are stored with it before
/// the round commits.
fn commit(
    shared: &Shared,
    round: u64,
    delta: FlatAdapter,
    uploads: &BTreeMap<String, UploadMeta>,
    missing: &std::collections::BTreeSet<String>,
    now: u64,
) -> Result<()> {
    let mut opt = shared.opt.lock().expect("lock").clone();
    let new_global = {
        let global = shared.global.lock().expect("lock");
        shared
            .strategy
            .next_global(&mut opt, &global.adapter, &delta)?
    };
    let next_version = shared.fed.lock().expect("lock").state().global_version + 1;
    if !opt.m.is_empty() {
        shared.store.put_optimizer_state(next_version, &opt)?;
    }
    let encoded = Codec::DenseF32.encode(new_global.values());
    let mut records: BTreeMap<String, u64> = shared
        .store
        .uploads()?
        .into_iter()
        .filter(|r| r.round == round)
        .map(|r| (r.client, r.wire_bytes))
        .collect();
    for (client, b) in take_round(&shared.secure_bytes_up, round) {
        *records.entry(client).or_default() += b;
    }
    // the weighted mean of the losses the uploads carried (none under DP or masking)
    let with_loss: Vec<(f64, f64)> = uploads
        .values()
        .filter_map(|m| m.train_loss.map(|l| (m.weight, l)))
        .collect();
    let total_w: f64 = with_loss.iter().map(|(w, _)| w).sum();
    let train_loss =
        (total_w > 0.0).then(|| with_loss.iter().map(|(w, l)| w * l).sum::<f64>() / total_w);
    let mut fed = shared.fed.lock().expect("lock");
    let before = fed.clone();
    let version = fed.commit(round, now)?;
    let state = fed.state().clone();
    let mut rec = shared
        .store
        .round(round)?
        .ok_or_else(|| CoordinatorError::Storage(format!("no record for round {round}")))?;
    rec.status = RoundStatus::Committed { version };
    rec.participants = uploads.keys().cloned().collect();
    rec.stragglers = missing.iter().cloned().collect();
    rec.bytes_up = records;
    rec.bytes_down = take_round(&shared.bytes_down, round);
    rec.train_loss = train_loss;
    rec.ended_ms = Some(now);
    if let Err(e) = shared
        .store
        .commit_round(version, &encoded, &rec, &state, now)
    {
        *fed = before;
        return Err(e);
    }
    *shared.global.lock().expect("lock") = Global {
        version,
        adapter: new_global,
        encoded,
    };
    *shared.opt.lock().expect("lock") = opt;
    shared
        .metrics
        .round_ended("committed", now.saturating_sub(rec.started_ms) as f64 / 1e3);
    shared.metrics.global_version.set(version as i64);
    drop(fed);
    info!(
        round,
        version,
        participants = uploads.len(),
        "round committed"
    );
    let _ = shared.events.send(Event::RoundCommitted { round, version });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlora_protocol::TensorSpec;

    fn spec() -> AdapterSpec {
        AdapterSpec::new(vec![TensorSpec {
            name: "a".into(),
            shape: vec![2, 2],
        }])
        .unwrap()
    }

    #[test]
    fn a_downlink_step_beyond_f16_falls_back_instead_of_panicking() {
        let held = FlatAdapter::new(spec(), vec![0.0; 4]).unwrap();
        let near = FlatAdapter::new(spec(), vec![1.0, -2.0, 0.5, 3.0]).unwrap();
        let (bytes, next) = f16_step(&spec(), &near, &held).expect("fits in f16");
        assert!(!bytes.is_empty());
        assert_eq!(next.values(), near.values());
        // a step above 65504 (f16's largest finite value) has no f16 encoding
        let far = FlatAdapter::new(spec(), vec![1e6, 0.0, 0.0, 0.0]).unwrap();
        assert!(f16_step(&spec(), &far, &held).is_none());
    }

    #[test]
    fn unmasked_uploads_are_refused_in_dp_and_secure_federations() {
        use fedlora_protocol::{DpPlan, TrainConfig};
        let plain = TrainConfig::default();
        assert!(check_kind(&plain, false).is_ok());
        assert_eq!(
            check_kind(&plain, true).unwrap_err().code,
            RefusalCode::WrongKind
        );
        let dp = TrainConfig {
            dp: Some(DpPlan {
                clip_norm: 1.0,
                planned_rounds: 3,
            }),
            ..Default::default()
        };
        assert!(check_kind(&dp, true).is_ok());
        assert_eq!(
            check_kind(&dp, false).unwrap_err().code,
            RefusalCode::WrongKind
        );
        let secure = TrainConfig {
            secure: Some(fedlora_protocol::secagg::SecAggParams {
                threshold: 2,
                neighbours: 3,
                modulus_bits: 10,
                stage_timeout_ms: 1_000,
            }),
            ..dp
        };
        assert!(check_kind(&secure, true).is_err());
    }
}
