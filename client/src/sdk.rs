//! The device SDK: a client that joins a federation over QUIC, trains its LoRA adapter on local
//! data when offered a round, reports held-out evaluations, and survives flaky links (reconnects
//! with exponential backoff; an upload not yet acknowledged is kept in the state directory and
//! re-sent, which the coordinator acknowledges as `AlreadyAccepted` if it had stored it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fedlora_protocol::secagg::crypto::P256Verifier;
use fedlora_protocol::secagg::{ClientRound, SecAggPolicy};
use fedlora_protocol::{
    AckStatus, ClientMsg, Codec, CodecContext, CoordMsg, DeclineReason, ErrorFeedback, EvalReport,
    FlatAdapter, PrivateUpload, RefusalCode, RoundOffer, SecAggBody, SecAggTask, Task, Upload,
    Weighting, PROTOCOL_VERSION,
};
use tracing::{info, warn};

use crate::client_dp::ClientDpRecord;
use crate::data::ClientData;
use crate::eligibility::{Ineligible, SharedEligibility};
use crate::error::ClientError;
use crate::learner::{encode_update, local_update, os_rng, ClientSeeds, Learner, LmLearner};
use crate::privacy::{decide_round, PrivacyState, PrivacyTarget, RoundDecision};
use crate::step_gate::{Gate, Stop};
use crate::train::LocalTrainer;
use crate::transport::{endpoint, ClientTls, Session};
use fedlora_protocol::client_dp::{ClientDpPlan, ClientDpPolicy, PlanRefusal};

/// Settings of a federated client.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Coordinator address.
    pub coordinator: SocketAddr,
    /// Name the coordinator's certificate must carry.
    pub server_name: String,
    /// TLS material.
    pub tls: ClientTls,
    /// Where unacknowledged uploads are kept across restarts (none: memory only).
    pub state_dir: Option<PathBuf>,
    /// First reconnect delay, milliseconds (doubles per failure).
    pub backoff_initial_ms: u64,
    /// Longest reconnect delay, milliseconds.
    pub backoff_max_ms: u64,
    /// Batch-sampling seed (tests and simulations only). `None`, the default for deployments,
    /// draws each round's sampling RNG from the OS CSPRNG; the coordinator never chooses it.
    pub sampling_seed: Option<u64>,
    /// Give up after this many consecutive failed connection attempts (`None`: never).
    pub max_connect_attempts: Option<u32>,
    /// Keep retrying also after a TLS failure that waiting cannot heal (unknown CA, bad
    /// signature, wrong server name, a refused certificate). Default false: such a failure
    /// ends [`FederatedClient::run`] with [`ClientError::Tls`].
    pub retry_forever: bool,
    /// This client's privacy target. With one, the client trains only under a DP plan and
    /// declines rounds its budget cannot pay for; without one, it declines DP rounds.
    pub privacy: Option<PrivacyTarget>,
    /// Noise seed (tests and simulations only; `None` draws DP noise from the OS CSPRNG).
    pub noise_seed: Option<u64>,
    /// What this client accepts of secure aggregation (checked on the client, whatever the
    /// coordinator says): thresholds above half the neighbours, at least 3 neighbours, enough
    /// survivors, and never a plaintext update in a secure federation.
    pub secagg: SecAggPolicy,
    /// The largest LoRA rank this client trains (heterogeneous ranks; e.g. set from the
    /// device's memory). `None`: the federation's rank. Below it, the coordinator sends this
    /// client the rank slice of the global adapter and it uploads its delta zero-padded.
    pub max_rank: Option<u32>,
    /// What this client requires of a client-level DP plan ([`ClientDpPolicy`]: its ε, by (b)
    /// unless it trusts the coordinator, δ, `min_clients`, collusion bound). `None`: it takes
    /// part in any consistent distributed plan (never a central one, which needs trust), and
    /// still keeps its own record of what it was charged.
    pub client_dp: Option<ClientDpPolicy>,
    /// Caps on local training: threads, seconds per round, the time kept for the upload, and
    /// what to do when training must stop early.
    pub limits: TrainingLimits,
    /// Uploads larger than this go in resumable pieces of this many bytes (default 256 KiB;
    /// at most [`fedlora_protocol::resumable::MAX_UPLOAD_CHUNK`]).
    pub upload_chunk_bytes: usize,
    /// Renew the certificate (same key, over the mTLS connection) when it ends within this
    /// many seconds (default 10 days); `None`: never. A coordinator without an issuer refuses
    /// renewal, and the client then goes on with its certificate.
    pub renew_within_s: Option<u64>,
}

/// What a device does when its local training stops before the planned steps (the round's
/// deadline, its cap on training seconds, or its eligibility).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EarlyStop {
    /// Upload the update of the steps it took (at least one); decline with none.
    #[default]
    Upload,
    /// Decline the round. Before training, a round whose planned steps would not fit (by the
    /// device's measured step time) is declined at no privacy cost.
    Decline,
}

/// Caps on a device's local training.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainingLimits {
    /// Threads training and evaluation may use (`None`: every core).
    pub max_threads: Option<usize>,
    /// The longest local training per round, seconds (`None`: no cap but the deadline).
    pub max_train_secs: Option<f64>,
    /// Milliseconds kept back from the round's deadline for encoding and the upload
    /// (default 5,000).
    pub upload_margin_ms: u64,
    /// What to do when training must stop early.
    pub early_stop: EarlyStop,
}

impl Default for TrainingLimits {
    fn default() -> Self {
        Self {
            max_threads: None,
            max_train_secs: None,
            upload_margin_ms: 5_000,
            early_stop: EarlyStop::Upload,
        }
    }
}

impl ClientConfig {
    /// Defaults: server name `localhost`, backoff 100 ms doubling to 5 s, OS-random sampling.
    pub fn new(coordinator: SocketAddr, tls: ClientTls) -> Self {
        Self {
            coordinator,
            server_name: "localhost".into(),
            tls,
            state_dir: None,
            backoff_initial_ms: 100,
            backoff_max_ms: 5_000,
            sampling_seed: None,
            max_connect_attempts: None,
            retry_forever: false,
            privacy: None,
            noise_seed: None,
            secagg: SecAggPolicy::default(),
            max_rank: None,
            client_dp: None,
            limits: TrainingLimits::default(),
            renew_within_s: Some(10 * 86_400),
            upload_chunk_bytes: fedlora_protocol::resumable::DEFAULT_UPLOAD_CHUNK,
        }
    }

    /// Refuses settings that would break a promise: a privacy target needs a durable state
    /// directory (a ledger kept in memory restarts from zero, and the client could spend its
    /// budget again).
    pub fn validate(&self) -> Result<(), ClientError> {
        if self.privacy.is_some() && self.state_dir.is_none() {
            return Err(ClientError::Config(
                "a privacy target needs a state directory (--state-dir) for its ledger: a ledger \
                 in memory would start from zero after a restart"
                    .into(),
            ));
        }
        if !(1..=fedlora_protocol::resumable::MAX_UPLOAD_CHUNK).contains(&self.upload_chunk_bytes) {
            return Err(ClientError::Config(format!(
                "upload pieces must be 1 to {} bytes",
                fedlora_protocol::resumable::MAX_UPLOAD_CHUNK
            )));
        }
        if self.limits.max_threads == Some(0) {
            return Err(ClientError::Config(
                "the thread cap must be at least 1".into(),
            ));
        }
        if self
            .limits
            .max_train_secs
            .is_some_and(|s| !(s.is_finite() && s > 0.0))
        {
            return Err(ClientError::Config(
                "the cap on training seconds must be a positive number".into(),
            ));
        }
        Ok(())
    }
}

/// The longest a client waits between polls, whatever the coordinator asks: 60 s.
pub const MAX_POLL_WAIT_MS: u64 = 60_000;

/// How long to wait before the next poll: the coordinator's `retry_after_ms` (its poll budget,
/// which grows with the number of connected clients), at most [`MAX_POLL_WAIT_MS`].
pub fn poll_wait(retry_after_ms: u64) -> Duration {
    Duration::from_millis(retry_after_ms.min(MAX_POLL_WAIT_MS))
}

/// What a client did during a federation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClientReport {
    /// Client id the coordinator assigned from the certificate.
    pub client_id: String,
    /// Rounds this client uploaded to (acknowledged).
    pub rounds: Vec<u64>,
    /// (version, held-out loss) reported.
    pub evals: Vec<(u64, f64)>,
    /// Request frame bytes sent.
    pub bytes_up: u64,
    /// Response frame bytes received.
    pub bytes_down: u64,
    /// Final global version announced by the coordinator.
    pub final_version: Option<u64>,
    /// Rounds this client declined, with the reason.
    pub declined: Vec<(u64, DeclineReason)>,
    /// ε spent at the end (DP clients).
    pub eps_spent: Option<f64>,
    /// Each acknowledged upload (or masked input): when it was sent and how long until its
    /// acknowledgement (transfer, the coordinator's checks and its write to disk).
    pub uploads: Vec<UploadTiming>,
    /// Rounds whose training stopped early and were uploaded anyway: (round, steps taken).
    pub partial: Vec<(u64, u32)>,
    /// Certificates renewed.
    pub renewals: u32,
    /// Uploads resumed from where the coordinator held them (after a lost connection).
    pub resumed_uploads: u32,
    /// Downloads of the global adapter resumed from the pieces already held.
    pub resumed_downloads: u32,
}

/// One acknowledged upload, timed by the client.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UploadTiming {
    /// When the request frame started to go out.
    pub started: std::time::Instant,
    /// Milliseconds until the acknowledgement arrived.
    pub ms: f64,
    /// Bytes of the request frame.
    pub bytes: u64,
}

/// A federated client: a learner (model and local data) and the connection settings.
pub struct FederatedClient {
    config: ClientConfig,
    learner: std::sync::Arc<dyn Learner>,
    privacy: std::sync::Mutex<Option<PrivacyState>>,
    /// The global adapter this client reconstructed last, by version (for delta downloads).
    held: std::sync::Mutex<Option<(u64, FlatAdapter)>>,
    /// The id the coordinator assigned (from the certificate), known after the hello.
    client_id: std::sync::Mutex<String>,
    /// The certificate key, for signing secure-aggregation keys (None: secure rounds refused).
    signer: Option<fedlora_protocol::secagg::crypto::EcdsaP256Signer>,
    /// The open secure round's client state (secrets live only here, only for one round).
    secure: std::sync::Mutex<Option<SecureState>>,
    /// Global versions this client sent unmask shares for: it sends no second masked input
    /// trained from the same version (a round failed on purpose and retried would otherwise
    /// give the coordinator two views of one delta).
    unmasked: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    /// The client-level DP rounds this client was charged for (its own record).
    client_dp: std::sync::Mutex<ClientDpRecord>,
    /// Whether the device may train now (consulted before a round and before each step).
    eligibility: Option<SharedEligibility>,
    /// The pool training runs in when threads are capped.
    pool: Option<std::sync::Arc<rayon::ThreadPool>>,
    /// Seconds per local step, measured on the last round (plans the next round's time).
    step_secs: std::sync::Mutex<Option<f64>>,
    /// A download in pieces under way (version, digest, bytes so far): kept across
    /// reconnects, so a lost link costs only the piece in flight.
    download: std::sync::Mutex<Option<(u64, fedlora_protocol::resumable::GlobalDigest, Vec<u8>)>>,
    /// The coordinator refused a renewal: not asked again in this run.
    renewal_refused: std::sync::atomic::AtomicBool,
}

/// One secure round on the client: its stage machine, the peers' verifier from the roster's
/// certificates, and the global version its masked input was trained from.
struct SecureState {
    round: u64,
    cr: ClientRound,
    verifier: Option<P256Verifier>,
    masked_version: Option<u64>,
}

enum Work {
    Upload(ClientMsg),
    Masked(u64, Vec<u8>),
    Decline(u64, DeclineReason),
}

/// Replaces a state-directory file with `value` (bincode): temp file, then rename.
fn save_state_file<T: serde::Serialize>(
    path: &std::path::Path,
    value: &T,
) -> Result<(), ClientError> {
    std::fs::create_dir_all(path.parent().expect("state files live in a directory"))?;
    let bytes = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| ClientError::Storage(e.to_string()))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)?;
    Ok(())
}

enum Outcome {
    Finished,
    Reconnect,
}

/// Exponential backoff between retries: `initial_ms`, doubling up to `max_ms`.
struct Backoff {
    next_ms: u64,
    initial_ms: u64,
    max_ms: u64,
}

impl Backoff {
    fn new(config: &ClientConfig) -> Self {
        Self {
            next_ms: config.backoff_initial_ms,
            initial_ms: config.backoff_initial_ms,
            max_ms: config.backoff_max_ms,
        }
    }

    /// The delay the next [`Backoff::wait`] sleeps, milliseconds.
    fn ms(&self) -> u64 {
        self.next_ms
    }

    /// Sleeps the current delay, then doubles it (up to the maximum).
    async fn wait(&mut self) {
        tokio::time::sleep(Duration::from_millis(self.next_ms)).await;
        self.next_ms = (self.next_ms * 2).min(self.max_ms);
    }

    fn reset(&mut self) {
        self.next_ms = self.initial_ms;
    }
}

impl FederatedClient {
    /// A client training `trainer`'s adapter on `data`. Opens its privacy ledger (in the state
    /// directory) when it has a privacy target.
    pub fn new(
        config: ClientConfig,
        trainer: LocalTrainer,
        data: ClientData,
    ) -> Result<Self, ClientError> {
        Self::with_learner(config, std::sync::Arc::new(LmLearner { trainer, data }))
    }

    /// A client training any [`Learner`] (your own model and data).
    pub fn with_learner(
        config: ClientConfig,
        learner: std::sync::Arc<dyn Learner>,
    ) -> Result<Self, ClientError> {
        config.validate()?;
        let unmasked = load_unmasked(config.state_dir.as_deref())?;
        let client_dp = ClientDpRecord::load(config.state_dir.as_deref())?;
        let privacy = match (config.privacy, &config.state_dir) {
            (Some(t), Some(dir)) => Some(PrivacyState::open(dir, t)?),
            _ => None,
        };
        let pool = match config.limits.max_threads {
            None => None,
            Some(n) => Some(std::sync::Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("fedlora-train-{i}"))
                    .build()
                    .map_err(|e| ClientError::Config(format!("training threads: {e}")))?,
            )),
        };
        Ok(Self {
            learner,
            eligibility: None,
            pool,
            step_secs: std::sync::Mutex::new(None),
            renewal_refused: std::sync::atomic::AtomicBool::new(false),
            download: std::sync::Mutex::new(None),
            privacy: std::sync::Mutex::new(privacy),
            held: std::sync::Mutex::new(None),
            signer: crate::secure::load_signer(&config.tls.key).ok(),
            client_id: std::sync::Mutex::new(String::new()),
            secure: std::sync::Mutex::new(None),
            unmasked: std::sync::Mutex::new(unmasked),
            client_dp: std::sync::Mutex::new(client_dp),
            config,
        })
    }

    /// Consults `check` before accepting each round and before each local step (see
    /// [`crate::eligibility`]); without one the device is always eligible.
    pub fn with_eligibility(mut self, check: SharedEligibility) -> Self {
        self.eligibility = Some(check);
        self
    }

    /// Why the device may not train now, as a decline reason.
    fn ineligible(&self) -> Option<DeclineReason> {
        let e = self.eligibility.as_ref()?;
        e.check().err().map(Ineligible::decline_reason)
    }

    fn seeds(&self) -> ClientSeeds {
        ClientSeeds {
            sampling: self.config.sampling_seed,
            noise: self.config.noise_seed,
        }
    }

    fn pending_path(&self) -> Option<PathBuf> {
        self.config
            .state_dir
            .as_ref()
            .map(|d| d.join("pending_upload.bin"))
    }

    fn save_pending(&self, u: &ClientMsg) -> Result<(), ClientError> {
        match self.pending_path() {
            Some(p) => save_state_file(&p, u),
            None => Ok(()),
        }
    }

    fn load_pending(&self) -> Option<ClientMsg> {
        let bytes = std::fs::read(self.pending_path()?).ok()?;
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
            .ok()
            .map(|(u, _)| u)
    }

    fn clear_pending(&self) {
        if let Some(p) = self.pending_path() {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Runs until the coordinator says the federation is finished.
    pub async fn run(&self) -> Result<ClientReport, ClientError> {
        let mut ep = endpoint(&self.config.tls)?;
        let mut report = ClientReport::default();
        let mut pending = self.load_pending();
        let mut backoff = Backoff::new(&self.config);
        let mut failures = 0u32;
        let addr = self.config.coordinator;
        info!(coordinator = %addr, "connecting to the coordinator");
        loop {
            let session = match self.hello(&ep, &mut report).await {
                Ok(s) => s,
                // a refusal that can heal, or any with --retry-forever
                Err(ClientError::Refused(r)) if !r.code.is_fatal() || self.config.retry_forever => {
                    warn!(coordinator = %addr, code = ?r.code, reason = %r.message,
                        backoff_ms = backoff.ms(), "hello refused; retrying");
                    backoff.wait().await;
                    continue;
                }
                Err(ClientError::Tls(e)) if !self.config.retry_forever => {
                    return Err(ClientError::Tls(e))
                }
                Err(e @ (ClientError::Transport(_) | ClientError::Tls(_))) => {
                    failures += 1;
                    if self
                        .config
                        .max_connect_attempts
                        .is_some_and(|m| failures >= m)
                    {
                        return Err(e);
                    }
                    warn!(coordinator = %addr, error = %e, backoff_ms = backoff.ms(),
                        "cannot reach the coordinator; retrying");
                    backoff.wait().await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            backoff.reset();
            failures = 0;
            if self.renew(&session, &mut report).await? {
                // reconnect with the new certificate
                session.close();
                ep = endpoint(&self.config.tls)?;
                continue;
            }
            match self.serve(&session, &mut report, &mut pending).await {
                Ok(Outcome::Finished) => {
                    if let Some(p) = self.privacy.lock().expect("lock").as_ref() {
                        report.eps_spent = p.epsilon_spent().ok();
                    }
                    session.close();
                    ep.wait_idle().await;
                    return Ok(report);
                }
                Ok(Outcome::Reconnect) => {}
                Err(ClientError::Transport(e)) => {
                    warn!(coordinator = %addr, error = %e, "connection lost; reconnecting");
                }
                Err(ClientError::Tls(e)) if self.config.retry_forever => {
                    warn!(coordinator = %addr, error = %e, "TLS failure; retrying (--retry-forever)");
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn hello(
        &self,
        ep: &quinn::Endpoint,
        report: &mut ClientReport,
    ) -> Result<Session, ClientError> {
        let s = Session::connect(ep, self.config.coordinator, &self.config.server_name).await?;
        let msg = ClientMsg::Hello {
            protocol_version: PROTOCOL_VERSION,
            spec_hash: self.learner.spec().hash(),
            max_rank: self.config.max_rank,
        };
        match s.request(&msg).await? {
            (CoordMsg::Welcome { client_id, .. }, _) => {
                info!(%client_id, "joined the federation");
                *self.client_id.lock().expect("lock") = client_id.clone();
                report.client_id = client_id;
                Ok(s)
            }
            (CoordMsg::Refused(r), _) => Err(ClientError::Refused(r)),
            (other, _) => Err(ClientError::Transport(format!(
                "unexpected answer to hello: {other:?}"
            ))),
        }
    }

    /// Renews this device's certificate when it ends within
    /// [`ClientConfig::renew_within_s`]: a request for the same key over the mTLS session, the
    /// new chain written over the old. `true` when it renewed (the caller reconnects with it).
    async fn renew(&self, s: &Session, report: &mut ClientReport) -> Result<bool, ClientError> {
        use std::sync::atomic::Ordering;
        let Some(within) = self.config.renew_within_s else {
            return Ok(false);
        };
        if self.renewal_refused.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let Some(csr_der) = crate::enroll::renewal_request(&self.config.tls, within, now)? else {
            return Ok(false);
        };
        match self.send(s, &ClientMsg::Renew { csr_der }, report).await? {
            CoordMsg::Renewed(cert) => {
                crate::enroll::store_chain(&self.config.tls, &cert.chain_pem)?;
                info!(device = %cert.device_id, not_after = cert.not_after_unix_s,
                    "certificate renewed");
                report.renewals += 1;
                if cert.not_after_unix_s <= now.saturating_add(within) {
                    // certificates shorter than the renewal window would renew at every
                    // connection: once per run is enough
                    warn!(
                        within_s = within,
                        "the coordinator's certificates are shorter than \
                        the renewal window; renewing once per run"
                    );
                    self.renewal_refused.store(true, Ordering::Relaxed);
                }
                Ok(true)
            }
            CoordMsg::Refused(r) if r.code == RefusalCode::Revoked => Err(ClientError::Refused(r)),
            other => {
                warn!(
                    ?other,
                    "certificate renewal refused; going on with the current one"
                );
                self.renewal_refused.store(true, Ordering::Relaxed);
                Ok(false)
            }
        }
    }

    async fn send(
        &self,
        s: &Session,
        msg: &ClientMsg,
        report: &mut ClientReport,
    ) -> Result<CoordMsg, ClientError> {
        self.send_frame(s, &fedlora_protocol::frame::encode(msg)?, report)
            .await
    }

    /// Sends an encoded frame and counts its bytes both ways in `report`.
    async fn send_frame(
        &self,
        s: &Session,
        frame: &[u8],
        report: &mut ClientReport,
    ) -> Result<CoordMsg, ClientError> {
        let (reply, down) = s.request_raw(frame).await?;
        report.bytes_up += frame.len() as u64;
        report.bytes_down += down;
        Ok(reply)
    }

    async fn deliver(
        &self,
        s: &Session,
        upload: ClientMsg,
        report: &mut ClientReport,
        pending: &mut Option<ClientMsg>,
    ) -> Result<(), ClientError> {
        let round = match &upload {
            ClientMsg::Upload(u) => u.round,
            ClientMsg::PrivateUpload(u) => u.round,
            other => {
                return Err(ClientError::Config(format!(
                    "{:?} is not an upload",
                    fedlora_protocol::frame::FrameMessage::kind(other)
                )))
            }
        };
        *pending = Some(upload.clone());
        self.save_pending(&upload)?;
        let (t0, sent) = (std::time::Instant::now(), report.bytes_up);
        let frame = fedlora_protocol::frame::encode(&upload)?;
        let reply = if frame.len() > self.config.upload_chunk_bytes {
            self.send_in_pieces(s, &frame, report).await?
        } else {
            self.send_frame(s, &frame, report).await?
        };
        match reply {
            CoordMsg::Ack { status, .. } => {
                report.uploads.push(UploadTiming {
                    started: t0,
                    ms: t0.elapsed().as_secs_f64() * 1e3,
                    bytes: report.bytes_up - sent,
                });
                info!(round, ?status, "upload acknowledged");
                if status == AckStatus::Accepted || !report.rounds.contains(&round) {
                    report.rounds.push(round);
                }
            }
            CoordMsg::Refused(r) if r.code == RefusalCode::Internal => {
                return Err(ClientError::Transport(format!(
                    "coordinator: {}",
                    r.message
                )));
            }
            CoordMsg::Refused(r) => warn!(round, reason = %r, "upload refused"),
            other => warn!(round, ?other, "unexpected answer to an upload"),
        }
        *pending = None;
        self.clear_pending();
        Ok(())
    }

    /// Fetches the global adapter `version` in pieces, going on from what an interrupted fetch
    /// of the same version and digest already holds, and checks it against `digest`. A lost
    /// link surfaces as a transport error (the caller reconnects; the pieces stay).
    async fn fetch_global(
        &self,
        s: &Session,
        version: u64,
        digest: fedlora_protocol::resumable::GlobalDigest,
        report: &mut ClientReport,
    ) -> Result<Vec<u8>, ClientError> {
        use fedlora_protocol::resumable::GlobalDigest;
        let mut buf = match self.download.lock().expect("lock").take() {
            Some((v, d, b)) if v == version && d == digest => b,
            _ => Vec::new(),
        };
        if !buf.is_empty() {
            info!(
                version,
                have = buf.len(),
                of = digest.len,
                "resuming a download"
            );
            report.resumed_downloads += 1;
        }
        while (buf.len() as u64) < digest.len {
            let msg = ClientMsg::FetchGlobal {
                version,
                offset: buf.len() as u64,
                max_len: self.config.upload_chunk_bytes as u32,
            };
            let reply = match self.send(s, &msg, report).await {
                Ok(r) => r,
                Err(e) => {
                    *self.download.lock().expect("lock") = Some((version, digest, buf));
                    return Err(e);
                }
            };
            match reply {
                CoordMsg::GlobalPiece {
                    version: v,
                    offset,
                    bytes,
                } if v == version
                    && offset == buf.len() as u64
                    && !bytes.is_empty()
                    && buf.len() as u64 + bytes.len() as u64 <= digest.len =>
                {
                    buf.extend_from_slice(&bytes)
                }
                // the version is gone, or an answer out of step: poll again afresh
                other => {
                    return Err(ClientError::Transport(format!(
                        "downloading global version {version}: the coordinator answered {:?}",
                        fedlora_protocol::frame::FrameMessage::kind(&other)
                    )))
                }
            }
        }
        if GlobalDigest::of(&buf) != digest {
            return Err(ClientError::Transport(format!(
                "global version {version} does not match its digest"
            )));
        }
        Ok(buf)
    }

    /// Sends an upload frame as a resumable upload: asks how much the coordinator holds (of
    /// this frame, by its hash), then sends the rest in pieces of
    /// [`ClientConfig::upload_chunk_bytes`]. Returns the answer to the piece that completed it.
    /// A lost connection surfaces as a transport error; the re-sent upload resumes.
    async fn send_in_pieces(
        &self,
        s: &Session,
        frame: &[u8],
        report: &mut ClientReport,
    ) -> Result<CoordMsg, ClientError> {
        use fedlora_protocol::resumable::{upload_id, UploadChunk};
        let id = upload_id(frame);
        let piece = |offset: usize, len: usize| {
            ClientMsg::UploadChunk(UploadChunk {
                upload_id: id,
                total_len: frame.len() as u64,
                offset: offset as u64,
                bytes: frame[offset..offset + len].to_vec(),
            })
        };
        let mut offset = match self.send(s, &piece(0, 0), report).await? {
            CoordMsg::UploadProgress { upload_id, have } if upload_id == id => have as usize,
            other => return Ok(other),
        };
        if offset > 0 {
            info!(offset, of = frame.len(), "resuming an upload");
            report.resumed_uploads += 1;
        }
        // each answer says where to go on; one that does not advance twice in a row is a
        // coordinator out of step, and the upload is retried from the top by the caller
        let mut stalled = 0;
        loop {
            let len = self
                .config
                .upload_chunk_bytes
                .min(frame.len().saturating_sub(offset));
            match self.send(s, &piece(offset, len), report).await? {
                CoordMsg::UploadProgress { upload_id, have } if upload_id == id => {
                    let have = have as usize;
                    stalled = if have > offset { 0 } else { stalled + 1 };
                    if stalled > 2 || have >= frame.len() {
                        return Err(ClientError::Transport(format!(
                            "the coordinator holds {have} of {} bytes and does not advance",
                            frame.len()
                        )));
                    }
                    offset = have;
                }
                other => return Ok(other),
            }
        }
    }

    async fn serve(
        &self,
        s: &Session,
        report: &mut ClientReport,
        pending: &mut Option<ClientMsg>,
    ) -> Result<Outcome, ClientError> {
        if let Some(u) = pending.clone() {
            info!("re-sending an unacknowledged upload");
            self.deliver(s, u, report, pending).await?;
        }
        let mut refused = Backoff::new(&self.config);
        loop {
            let held_version = self.held.lock().expect("lock").as_ref().map(|h| h.0);
            let reply = self
                .send(s, &ClientMsg::Poll { held_version }, report)
                .await?;
            match reply {
                CoordMsg::Task(Task::Wait { retry_after_ms })
                | CoordMsg::Task(Task::AlreadyUploaded { retry_after_ms, .. }) => {
                    tokio::time::sleep(poll_wait(retry_after_ms)).await;
                }
                CoordMsg::Task(Task::Finished { version }) => {
                    report.final_version = Some(version);
                    return Ok(Outcome::Finished);
                }
                CoordMsg::Task(Task::Evaluate {
                    version,
                    global_from,
                    mut global,
                    global_digest,
                }) => {
                    if let Some(d) = global_digest {
                        global = self.fetch_global(s, version, d, report).await?;
                    }
                    let adapter = self.reconstruct(version, global_from, &global)?;
                    self.evaluate_and_report(s, version, adapter, report)
                        .await?;
                }
                CoordMsg::Task(Task::Train(offer)) => match self.train(s, offer, report).await? {
                    Work::Upload(upload) => self.deliver(s, upload, report, pending).await?,
                    Work::Masked(round, bytes) => {
                        let msg = ClientMsg::SecAgg {
                            round,
                            body: SecAggBody::Input(bytes),
                        };
                        let (t0, sent) = (std::time::Instant::now(), report.bytes_up);
                        match self.send(s, &msg, report).await? {
                            CoordMsg::Ack { .. } => {
                                report.uploads.push(UploadTiming {
                                    started: t0,
                                    ms: t0.elapsed().as_secs_f64() * 1e3,
                                    bytes: report.bytes_up - sent,
                                });
                                report.rounds.push(round);
                            }
                            other => warn!(round, ?other, "masked input not accepted"),
                        }
                    }
                    Work::Decline(round, reason) => {
                        warn!(round, %reason, "declining the round");
                        let msg = ClientMsg::Decline { round, reason };
                        match self.send(s, &msg, report).await? {
                            CoordMsg::DeclineRecorded { .. } => {}
                            other => warn!(?other, "unexpected answer to a decline"),
                        }
                        report.declined.push((round, reason));
                    }
                },
                CoordMsg::Task(Task::SecAgg { round, task }) => {
                    if let Some(body) = self.secure_stage(round, *task) {
                        let msg = ClientMsg::SecAgg { round, body };
                        match self.send(s, &msg, report).await? {
                            CoordMsg::Ack { .. } => {}
                            other => warn!(round, ?other, "secure-aggregation message refused"),
                        }
                    } else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                CoordMsg::Refused(r) if r.code == RefusalCode::NotRegistered => {
                    return Ok(Outcome::Reconnect)
                }
                // only a short list of refusals cannot heal (revoked, another version or spec);
                // anything else (busy, a refused stage message, a passing storage error) is
                // retried after a backoff
                CoordMsg::Refused(r) if r.code.is_fatal() => return Err(ClientError::Refused(r)),
                CoordMsg::Refused(r) => {
                    warn!(code = ?r.code, reason = %r.message, backoff_ms = refused.ms(),
                        "poll refused; retrying");
                    refused.wait().await;
                    continue;
                }
                other => {
                    return Err(ClientError::Transport(format!(
                        "unexpected answer to a poll: {other:?}"
                    )))
                }
            }
        }
    }

    /// Performs one secure-aggregation stage; `None` when the client cannot or will not (it
    /// then drops out of the round, which the protocol tolerates, and its state is wiped).
    fn secure_stage(&self, round: u64, task: SecAggTask) -> Option<SecAggBody> {
        let mut guard = self.secure.lock().expect("lock");
        let r = (|| -> Result<SecAggBody, String> {
            let signer = self
                .signer
                .as_ref()
                .ok_or("no ECDSA P-256 certificate key")?;
            if let SecAggTask::AdvertiseKeys { params } = task {
                // a device that may not train now does not join the round's key exchange
                if let Some(why) = self.ineligible() {
                    return Err(format!("not joining: {why}"));
                }
                let id = self.client_id.lock().expect("lock").clone();
                let mut rng = os_rng().map_err(|e| e.to_string())?;
                let mut cr = ClientRound::new(round, &id, params, self.config.secagg, &mut rng);
                let keys = cr.advertise(signer).map_err(|e| e.to_string())?;
                *guard = Some(SecureState {
                    round,
                    cr,
                    verifier: None,
                    masked_version: None,
                });
                return Ok(SecAggBody::Keys(keys));
            }
            let st = guard
                .as_mut()
                .filter(|g| g.round == round)
                .ok_or("no secure state for this round")?;
            match task {
                SecAggTask::AdvertiseKeys { .. } => Err("keys already advertised".into()),
                SecAggTask::ShareKeys { view, certificates } => {
                    let v = crate::secure::verifier_from_certificates(
                        &self.config.tls.ca,
                        &certificates,
                    )
                    .map_err(|e| e.to_string())?;
                    let mut rng = os_rng().map_err(|e| e.to_string())?;
                    let shares = st
                        .cr
                        .share_keys(&view, &v, &mut rng)
                        .map_err(|e| e.to_string())?;
                    st.verifier = Some(v);
                    Ok(SecAggBody::Shares(shares))
                }
                SecAggTask::ConsistencyCheck(view) => {
                    let sig = st
                        .cr
                        .consistency(&view, signer)
                        .map_err(|e| e.to_string())?;
                    Ok(SecAggBody::Consistency(sig))
                }
                SecAggTask::Unmask {
                    request,
                    signatures,
                } => {
                    let v = st.verifier.as_ref().ok_or("no roster verifier")?;
                    let resp = st
                        .cr
                        .unmask(&request, &signatures, v)
                        .map_err(|e| e.to_string())?;
                    if let Some(version) = st.masked_version {
                        // recorded (durably, with a state directory) before any share leaves
                        let mut done = self.unmasked.lock().expect("lock");
                        done.insert(version);
                        record_unmasked(self.config.state_dir.as_deref(), &done)
                            .map_err(|e| e.to_string())?;
                    }
                    *guard = None;
                    Ok(SecAggBody::Unmask(resp))
                }
            }
        })();
        match r {
            Ok(b) => Some(b),
            Err(e) => {
                warn!(round, error = %e, "leaving the secure round");
                *guard = None;
                None
            }
        }
    }

    /// The global adapter of `version` from a download: the full adapter (`from = None`) or an
    /// f16 delta against the version this client holds.
    fn reconstruct(
        &self,
        version: u64,
        from: Option<u64>,
        bytes: &[u8],
    ) -> Result<FlatAdapter, ClientError> {
        let ctx = CodecContext::default();
        let spec = self.learner.spec();
        let mut held = self.held.lock().expect("lock");
        let global = match from {
            None => Codec::decode(bytes, spec, Some(&Codec::DenseF32), &ctx)?,
            Some(v) => {
                let (hv, base) = held.as_ref().filter(|h| h.0 == v).ok_or_else(|| {
                    ClientError::Transport(format!("delta from version {v}, which is not held"))
                })?;
                debug_assert_eq!(*hv, v);
                let mut g = base.clone();
                if !bytes.is_empty() {
                    g.apply_delta(&Codec::decode(bytes, spec, Some(&Codec::F16), &ctx)?)?;
                }
                g
            }
        };
        *held = Some((version, global.clone()));
        Ok(global)
    }

    fn residual_path(&self) -> Option<PathBuf> {
        self.config
            .state_dir
            .as_ref()
            .map(|d| d.join("error_feedback.bin"))
    }

    /// Encodes a delta with the round's codec, with error feedback for sparsifying codecs (the
    /// residual lives in the state directory; it is computed from the already-noised delta, so
    /// it is post-processing).
    fn encode_delta(
        &self,
        delta: &FlatAdapter,
        offer: &RoundOffer,
        weight: u64,
    ) -> Result<Vec<u8>, ClientError> {
        let codec = &offer.config.codec;
        let ctx = CodecContext {
            round_seed: offer.codec_seed,
        };
        let mut rng = self.seeds().codec_rng(offer.round)?;
        let mut residual = if codec.wants_error_feedback() {
            self.residual_path()
                .and_then(|p| std::fs::read(p).ok())
                .and_then(|b| {
                    bincode::serde::decode_from_slice::<ErrorFeedback, _>(
                        &b,
                        bincode::config::standard(),
                    )
                    .ok()
                })
                .map(|(e, _)| e)
        } else {
            None
        };
        let enc = encode_update(
            codec,
            self.learner.spec(),
            delta,
            &ctx,
            weight,
            &mut rng,
            &mut residual,
            offer.config.update_clip(),
        )?;
        if enc.clamped > 0 {
            info!(
                clamped = enc.clamped,
                of = delta.values().len(),
                "values clamped by the codec"
            );
        }
        if let (Some(p), Some(ef)) = (self.residual_path(), &residual) {
            save_state_file(&p, ef)?;
        }
        Ok(enc.bytes)
    }

    async fn evaluate_and_report(
        &self,
        s: &Session,
        version: u64,
        adapter: FlatAdapter,
        report: &mut ClientReport,
    ) -> Result<(), ClientError> {
        if self.config.privacy.is_some() {
            // a held-out loss and its token count are not covered by this client's accountant
            // (the count gives away n): a private client reports nothing
            let msg = ClientMsg::EvalWithheld { version };
            match self.send(s, &msg, report).await? {
                CoordMsg::EvalRecorded { .. } => {}
                CoordMsg::Refused(r) => warn!(version, reason = %r, "withheld evaluation refused"),
                other => warn!(?other, "unexpected answer to a withheld evaluation"),
            }
            return Ok(());
        }
        let learner = self.learner.clone();
        let pool = self.pool.clone();
        let ev = tokio::task::spawn_blocking(move || match pool {
            Some(p) => p.install(|| learner.evaluate(&adapter)),
            None => learner.evaluate(&adapter),
        })
        .await
        .map_err(|e| ClientError::Model(e.to_string()))??;
        let msg = ClientMsg::EvalReport(EvalReport {
            version,
            loss: ev.loss,
            tokens: ev.tokens,
        });
        match self.send(s, &msg, report).await? {
            CoordMsg::EvalRecorded { .. } => report.evals.push((version, ev.loss)),
            CoordMsg::Refused(r) => warn!(version, reason = %r, "evaluation refused"),
            other => warn!(?other, "unexpected answer to an evaluation"),
        }
        Ok(())
    }

    async fn train(
        &self,
        s: &Session,
        offer: RoundOffer,
        report: &mut ClientReport,
    ) -> Result<Work, ClientError> {
        if offer.spec_hash != self.learner.spec().hash() {
            return Err(ClientError::Protocol(
                fedlora_protocol::ProtocolError::SpecMismatch {
                    expected: self.learner.spec().short_hash(),
                    got: hex::encode(&offer.spec_hash[..8]),
                },
            ));
        }
        let received = std::time::Instant::now();
        // the device's own verdict comes first: a round declined here costs nothing
        if let Some(reason) = self.ineligible() {
            return Ok(Work::Decline(offer.round, reason));
        }
        let mut offer = offer;
        if let Some(d) = offer.global_digest {
            offer.global = self
                .fetch_global(s, offer.global_version, d, report)
                .await?;
        }
        let sliced = match self.offered_rank(&offer) {
            Ok(s) => s,
            Err(reason) => return Ok(Work::Decline(offer.round, reason)),
        };
        let global = match &sliced {
            Some(spec) => {
                // a rank slice, always sent in full; it replaces nothing this client holds
                *self.held.lock().expect("lock") = None;
                Codec::decode(
                    &offer.global,
                    spec,
                    Some(&Codec::DenseF32),
                    &CodecContext::default(),
                )
                .map_err(ClientError::from)
            }
            None => self.reconstruct(offer.global_version, offer.global_from, &offer.global),
        };
        let global = match global {
            Ok(g) => g,
            Err(e) => {
                // out of sync (e.g. a lost download): forget what we hold, get the full adapter
                *self.held.lock().expect("lock") = None;
                return Err(e);
            }
        };
        if offer.evaluate {
            self.evaluate_and_report(s, offer.global_version, global.clone(), report)
                .await?;
        }
        // the secure-aggregation policy decides before the budget is spent
        if let Some(reason) = self.secure_policy(&offer) {
            return Ok(Work::Decline(offer.round, reason));
        }
        // a client-level DP plan is checked against this client's minimums before training
        let mut plan_signed = None;
        if let Some(plan) = &offer.config.client_dp {
            match self.admit_client_dp(plan, &offer, s) {
                Ok(signed) => plan_signed = Some(signed),
                Err(reason) => {
                    warn!(round = offer.round, %reason, "client-level DP plan refused");
                    return Ok(Work::Decline(
                        offer.round,
                        DeclineReason::ClientDpPlanRefused,
                    ));
                }
            }
        }
        // a round whose time cannot fit a step (or, with EarlyStop::Decline, every step) is
        // declined before the budget is spent
        let until = self.training_until(&offer, received);
        if !self.time_fits(until, offer.config.local_steps) {
            return Ok(Work::Decline(offer.round, DeclineReason::NotEnoughTime));
        }
        // the budget decides before any data is touched; spending is flushed before training
        let dp_round = offer.config.dp.is_some() || offer.config.client_dp.is_some();
        let (dp, eps) = {
            let mut guard = self.privacy.lock().expect("lock");
            match decide_round(
                guard.as_mut(),
                &offer.config,
                self.learner.train_examples(),
                offer.round,
            )? {
                RoundDecision::Train { dp, eps } => (dp, eps),
                RoundDecision::Decline(reason) => return Ok(Work::Decline(offer.round, reason)),
            }
        };
        if let (Some(dp), Some(eps)) = (&dp, eps) {
            info!(
                round = offer.round,
                eps,
                sigma = dp.noise_multiplier,
                "DP round approved"
            );
        }
        let learner = self.learner.clone();
        let cfg = offer.config.clone();
        let seeds = self.seeds();
        let round = offer.round;
        let gate = Gate {
            eligibility: self.eligibility.clone(),
            until,
        };
        let pool = self.pool.clone();
        let (out, gated) = tokio::task::spawn_blocking(move || {
            let work = || {
                crate::step_gate::run(gate, || {
                    local_update(&*learner, &global, &cfg, dp.as_ref(), &seeds, round)
                })
            };
            match pool {
                Some(p) => p.install(work),
                None => work(),
            }
        })
        .await
        .map_err(|e| ClientError::Model(e.to_string()))?;
        let out = out?;
        if out.steps > 0 {
            *self.step_secs.lock().expect("lock") = Some(out.secs / out.steps as f64);
        }
        info!(
            round = offer.round,
            loss = out.train_loss,
            secs = out.secs,
            steps = out.steps,
            "trained locally"
        );
        if let Some(stop) = gated.stopped {
            let reason = match stop {
                Stop::Ineligible(why) => why.decline_reason(),
                Stop::OutOfTime => DeclineReason::NotEnoughTime,
            };
            // whatever the round spent stands; an update of no steps is not sent
            if out.steps == 0 || self.config.limits.early_stop == EarlyStop::Decline {
                return Ok(Work::Decline(offer.round, reason));
            }
            warn!(round = offer.round, steps = out.steps, of = offer.config.local_steps,
                %reason, "training stopped early; uploading what it has");
            report.partial.push((offer.round, out.steps as u32));
        }
        if let Some(shares) = &offer.secure_shares {
            let codec = &offer.config.codec;
            let bytes = self.encode_delta(&out.delta, &offer, 1)?;
            let ints = codec.modular_payload(&bytes, self.learner.spec())?;
            let Some(modulus) = codec.modulus_bits() else {
                return Ok(Work::Decline(
                    offer.round,
                    DeclineReason::SecureAggregationPolicy,
                ));
            };
            let mut guard = self.secure.lock().expect("lock");
            let Some(st) = guard.as_mut().filter(|g| g.round == offer.round) else {
                return Ok(Work::Decline(offer.round, DeclineReason::SecureStateLost));
            };
            if let Some(plan) = &offer.config.client_dp {
                // survivors sign the plan with their view; fewer than min_clients get no shares
                let digest = fedlora_protocol::client_dp::plan_digest(Some(plan), codec);
                if st.cr.bind(digest, plan.min_clients).is_err() {
                    *guard = None;
                    return Ok(Work::Decline(offer.round, DeclineReason::SecureStateLost));
                }
                // charged before the masked input leaves: the coordinator can unmask it with
                // the neighbours' shares alone, whether or not this client answers
                self.charge_client_dp(plan, codec, offer.round, plan_signed.as_ref())?;
            }
            let masked = match st.cr.masked_input(shares, &ints) {
                Ok(m) => m,
                Err(e) => {
                    warn!(round = offer.round, error = %e, "masking failed");
                    *guard = None;
                    return Ok(Work::Decline(offer.round, DeclineReason::SecureStateLost));
                }
            };
            st.masked_version = Some(offer.global_version);
            let mut packed = Vec::new();
            fedlora_protocol::codec::bits::pack(masked, modulus, &mut packed);
            return Ok(Work::Masked(offer.round, packed));
        }
        if let Some(plan) = &offer.config.client_dp {
            // central mode: charged before the update leaves
            self.charge_client_dp(plan, &offer.config.codec, offer.round, plan_signed.as_ref())?;
        }
        if dp_round {
            // post-processing of DP outputs only: the type has no room for a loss, a count or ε
            // (a client-level round has no noised loss to send)
            return Ok(Work::Upload(ClientMsg::PrivateUpload(PrivateUpload {
                round: offer.round,
                spec_hash: self.learner.spec().hash(),
                payload: self.encode_delta(&out.delta, &offer, 1)?,
                noised_train_loss: out.released_loss,
            })));
        }
        let weight = match offer.config.weighting {
            Weighting::ExampleCount => out.examples as f64,
            Weighting::Uniform => 1.0,
        };
        Ok(Work::Upload(ClientMsg::Upload(Upload {
            round: offer.round,
            spec_hash: self.learner.spec().hash(),
            weight,
            train_loss: out.train_loss,
            payload: self.encode_delta(&out.delta, &offer, weight as u64)?,
        })))
    }

    /// The instant local training must end by: the round's deadline less the upload margin,
    /// or the cap on training seconds, whichever comes first (`None`: no limit).
    fn training_until(
        &self,
        offer: &RoundOffer,
        received: std::time::Instant,
    ) -> Option<std::time::Instant> {
        let limits = &self.config.limits;
        let by_deadline = offer
            .time_left_ms
            .map(|t| received + Duration::from_millis(t.saturating_sub(limits.upload_margin_ms)));
        let by_cap = limits
            .max_train_secs
            .map(|s| std::time::Instant::now() + Duration::from_secs_f64(s));
        match (by_deadline, by_cap) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether training may start before `until`: some time is left, and by the step time
    /// measured last round it fits one step (or all `steps`, with [`EarlyStop::Decline`]).
    fn time_fits(&self, until: Option<std::time::Instant>, steps: u32) -> bool {
        let Some(until) = until else {
            return true;
        };
        let left = until
            .saturating_duration_since(std::time::Instant::now())
            .as_secs_f64();
        let per_step = self.step_secs.lock().expect("lock").unwrap_or(0.0);
        let need = match self.config.limits.early_stop {
            EarlyStop::Upload => per_step,
            EarlyStop::Decline => per_step * steps as f64,
        };
        left > 0.0 && left >= need
    }

    /// Records, durably, that this client is charged for `round` under `plan` (called before
    /// whatever the round charges leaves the device).
    fn charge_client_dp(
        &self,
        plan: &ClientDpPlan,
        codec: &Codec,
        round: u64,
        signed: Option<&crate::client_dp::CoordinatorSignature>,
    ) -> Result<(), ClientError> {
        let mut rec = self.client_dp.lock().expect("lock");
        rec.record(plan, codec, round, signed);
        rec.save(self.config.state_dir.as_deref())
    }

    /// Checks a client-level DP plan: signed by the coordinator this session's TLS handshake
    /// verified, consistent with the round's codec and secure aggregation, and within this
    /// client's policy given the rounds it already took part in. Returns the checked signature
    /// (kept in the client's record).
    fn admit_client_dp(
        &self,
        plan: &ClientDpPlan,
        offer: &RoundOffer,
        s: &Session,
    ) -> Result<crate::client_dp::CoordinatorSignature, PlanRefusal> {
        let cfg = &offer.config;
        let signed = crate::client_dp::CoordinatorSignature::check(
            s.peer_certificate().as_deref(),
            plan,
            &cfg.codec,
            offer.plan_signature.as_ref(),
        )?;
        self.check_client_dp_policy(plan, cfg)?;
        Ok(signed)
    }

    /// The policy half of [`Self::admit_client_dp`].
    fn check_client_dp_policy(
        &self,
        plan: &ClientDpPlan,
        cfg: &fedlora_protocol::TrainConfig,
    ) -> Result<(), PlanRefusal> {
        let modulus = cfg.secure.as_ref().map(|s| s.modulus_bits);
        plan.check_sensitivities(&cfg.codec, self.learner.spec().numel())?;
        match &self.config.client_dp {
            // without a policy: any consistent plan, but never central mode, where the
            // coordinator sees the update in the clear (only a client configured to trust it)
            None => {
                plan.check_consistent(&cfg.codec, modulus)?;
                if plan.mode == fedlora_protocol::client_dp::ClientDpMode::Central {
                    return Err(PlanRefusal::NeedsTrust(
                        "central mode needs a client configured to trust the coordinator".into(),
                    ));
                }
                Ok(())
            }
            Some(policy) => {
                let done = self
                    .client_dp
                    .lock()
                    .expect("lock")
                    .participated(plan, &cfg.codec);
                let eps = plan.admit(policy, &cfg.codec, modulus, done)?;
                info!(eps, taken_part = done, "client-level DP plan admitted");
                Ok(())
            }
        }
    }

    /// The spec of the rank slice `offer` asks this client to train (`None`: the full rank), or
    /// why it declines: a rank above its `max_rank`, or a slice not of this client's adapter.
    fn offered_rank(
        &self,
        offer: &RoundOffer,
    ) -> Result<Option<fedlora_protocol::AdapterSpec>, DeclineReason> {
        let Some(r) = offer.rank else {
            return Ok(None);
        };
        if self.config.max_rank.is_some_and(|m| r > m) || offer.global_from.is_some() {
            return Err(DeclineReason::RankNotSupported);
        }
        fedlora_protocol::rank::slice_spec(self.learner.spec(), r as usize)
            .map(Some)
            .map_err(|_| DeclineReason::RankNotSupported)
    }

    /// Why this client must not train `offer` under its secure-aggregation policy, if it must
    /// not: a secure federation's offer without the shares to mask with (the coordinator wants
    /// a plaintext update), a round without secure aggregation when the policy requires it, or
    /// a second masked input from a global version it already sent unmask shares for.
    fn secure_policy(&self, offer: &RoundOffer) -> Option<DeclineReason> {
        secure_policy_decision(
            &self.config.secagg,
            offer,
            &self.unmasked.lock().expect("lock"),
        )
    }
}

/// Where a client records the global versions it sent unmask shares for.
const UNMASKED_FILE: &str = "unmasked_versions.bin";

/// The global versions this client already sent unmask shares for, from its state directory
/// (empty without one). A file that cannot be read is an error: forgetting it would let a
/// coordinator collect a second masked view of the same delta.
fn load_unmasked(
    state_dir: Option<&std::path::Path>,
) -> Result<std::collections::BTreeSet<u64>, ClientError> {
    let Some(path) = state_dir.map(|d| d.join(UNMASKED_FILE)) else {
        return Ok(Default::default());
    };
    match std::fs::read(&path) {
        Ok(bytes) => bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
            .map(|(s, _)| s)
            .map_err(|e| ClientError::Storage(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(e) => Err(ClientError::Storage(format!("{}: {e}", path.display()))),
    }
}

/// Saves the set of unmasked global versions in the state directory (temp file, rename).
fn record_unmasked(
    state_dir: Option<&std::path::Path>,
    versions: &std::collections::BTreeSet<u64>,
) -> Result<(), ClientError> {
    match state_dir {
        Some(d) => save_state_file(&d.join(UNMASKED_FILE), versions),
        None => Ok(()),
    }
}

/// The secure-aggregation policy's verdict on an offer (see [`FederatedClient`]); `None`
/// means the client may train it.
pub fn secure_policy_decision(
    policy: &SecAggPolicy,
    offer: &RoundOffer,
    unmasked_versions: &std::collections::BTreeSet<u64>,
) -> Option<DeclineReason> {
    let secure = offer.config.secure.is_some() || offer.secure_shares.is_some();
    let plaintext = offer.secure_shares.is_none();
    if (secure || policy.required) && plaintext {
        return Some(DeclineReason::SecureAggregationPolicy);
    }
    if secure && !offer.config.codec.is_summable() {
        return Some(DeclineReason::SecureAggregationPolicy);
    }
    if !plaintext && unmasked_versions.contains(&offer.global_version) {
        return Some(DeclineReason::SecureAggregationPolicy);
    }
    None
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_poll_wait_follows_the_coordinator_up_to_a_minute() {
        use std::time::Duration;
        assert_eq!(super::poll_wait(200), Duration::from_millis(200));
        assert_eq!(super::poll_wait(5_000), Duration::from_secs(5));
        assert_eq!(super::poll_wait(u64::MAX), Duration::from_secs(60));
    }

    use super::*;
    use fedlora_protocol::secagg::SecAggParams;
    use fedlora_protocol::{ModularParams, TrainConfig};

    fn offer(secure: bool, shares: bool) -> RoundOffer {
        RoundOffer {
            round: 3,
            global_version: 2,
            spec_hash: [0; 32],
            config: TrainConfig {
                codec: Codec::Modular(ModularParams::default()),
                weighting: Weighting::Uniform,
                secure: secure.then_some(SecAggParams {
                    threshold: 2,
                    neighbours: 3,
                    modulus_bits: 10,
                    stage_timeout_ms: 1_000,
                }),
                ..Default::default()
            },
            evaluate: false,
            codec_seed: 0,
            global_from: None,
            global: vec![],
            secure_shares: shares.then(Vec::new),
            rank: None,
            time_left_ms: None,
            global_digest: None,
            plan_signature: None,
        }
    }

    #[test]
    fn a_secure_client_never_sends_a_plaintext_update() {
        let none = Default::default();
        let p = SecAggPolicy::default();
        // a secure federation offering no shares: the coordinator asks for plaintext
        assert_eq!(
            secure_policy_decision(&p, &offer(true, false), &none),
            Some(DeclineReason::SecureAggregationPolicy)
        );
        assert_eq!(secure_policy_decision(&p, &offer(true, true), &none), None);
        // a plain federation is fine unless the client requires secure aggregation
        assert_eq!(
            secure_policy_decision(&p, &offer(false, false), &none),
            None
        );
        let required = SecAggPolicy {
            required: true,
            ..p
        };
        assert_eq!(
            secure_policy_decision(&required, &offer(false, false), &none),
            Some(DeclineReason::SecureAggregationPolicy)
        );
        // no second masked input from a global version already unmasked
        let done = [2u64].into();
        assert_eq!(
            secure_policy_decision(&p, &offer(true, true), &done),
            Some(DeclineReason::SecureAggregationPolicy)
        );
    }

    #[test]
    fn the_unmasked_versions_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_unmasked(Some(dir.path())).unwrap().is_empty());
        record_unmasked(Some(dir.path()), &[2u64].into()).unwrap();
        // a restarted client still refuses a second masked input from version 2
        let reloaded = load_unmasked(Some(dir.path())).unwrap();
        assert_eq!(
            secure_policy_decision(&SecAggPolicy::default(), &offer(true, true), &reloaded),
            Some(DeclineReason::SecureAggregationPolicy)
        );
        // a damaged record is an error, not a silent reset
        std::fs::write(dir.path().join(UNMASKED_FILE), b"\xff\xff\xff").unwrap();
        assert!(load_unmasked(Some(dir.path())).is_err());
    }

    #[test]
    fn a_privacy_target_without_a_state_dir_is_refused() {
        let tls = ClientTls {
            ca: "ca.pem".into(),
            cert: "c.pem".into(),
            key: "c.key".into(),
        };
        let mut c = ClientConfig::new("127.0.0.1:1".parse().unwrap(), tls);
        c.privacy = Some(crate::privacy::PrivacyTarget {
            epsilon: 1.0,
            delta: 1e-5,
            accountant: Default::default(),
            loss_clip: None,
        });
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("state directory"), "{e}");
        c.state_dir = Some("somewhere".into());
        c.validate().unwrap();
    }
}
