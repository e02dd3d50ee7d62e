//! A client's settings ([`ClientConfig`]) and what a run reports ([`ClientReport`]).

use super::*;

/// Settings of a federated client.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Coordinator address.
    pub coordinator: SocketAddr,
    /// Other front-ends of the same federation (a coordinator on PostgreSQL runs several):
    /// after a failed connection attempt or a lost connection the client tries the next
    /// address, in turn, `coordinator` first. Empty (the default): only `coordinator`.
    pub alternates: Vec<SocketAddr>,
    /// Name the coordinator's certificate must carry.
    pub server_name: String,
    /// TLS material.
    pub tls: ClientTls,
    /// QUIC idle timeout and handshake timeout (defaults 60 s and 10 s).
    pub timers: TransportTimers,
    /// A QUIC endpoint (UDP socket) to share with other clients of this process, e.g. a
    /// gateway's devices or a load generator's ([`crate::transport::bare_endpoint`]); each
    /// connection still presents this client's own certificate. `None` (default): the client
    /// opens its own.
    pub endpoint: Option<quinn::Endpoint>,
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
    /// Async secure cohorts: the smallest staleness weight s(τ) this client masks its update
    /// with (default 0.1). A weight is this client's own s(τ) from the offer's weighting; the
    /// floor bounds how far a staleness form can scale one member's update against another's
    /// (at most 1 ÷ the floor).
    pub min_staleness_weight: f64,
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
            alternates: Vec::new(),
            server_name: "localhost".into(),
            tls,
            timers: TransportTimers::default(),
            endpoint: None,
            state_dir: None,
            backoff_initial_ms: 100,
            backoff_max_ms: 5_000,
            sampling_seed: None,
            max_connect_attempts: None,
            retry_forever: false,
            privacy: None,
            noise_seed: None,
            secagg: SecAggPolicy::default(),
            min_staleness_weight: 0.1,
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
        self.timers.validate()?;
        if self.privacy.is_some() && self.state_dir.is_none() {
            return Err(ClientError::Config(
                "a privacy target needs a state directory (--state-dir) for its ledger: a ledger \
                 in memory would start from zero after a restart"
                    .into(),
            ));
        }
        if self.client_dp.is_some() && self.state_dir.is_none() {
            return Err(ClientError::Config(
                "a client-level DP policy needs a state directory (--state-dir) for its record: \
                 a record in memory would forget the rounds and participations already charged \
                 after a restart"
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

/// How long a client waits before it polls again after an answer that carried no wait of its
/// own (a secure stage it dropped out of, a held update the coordinator had lost track of): the
/// last `retry_after_ms` the coordinator gave ([`poll_wait`]), so that those polls stay within
/// the coordinator's poll budget too; [`Pace::FIRST_MS`] before it gave any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pace {
    last_ms: u64,
}

impl Pace {
    /// The wait before the coordinator has named one, milliseconds (its default poll interval).
    pub const FIRST_MS: u64 = 200;

    /// Remembers the coordinator's latest `retry_after_ms`.
    pub fn heard(&mut self, retry_after_ms: u64) {
        self.last_ms = retry_after_ms;
    }

    /// How long to wait now.
    pub fn wait(&self) -> Duration {
        poll_wait(self.last_ms)
    }
}

impl Default for Pace {
    fn default() -> Self {
        Self {
            last_ms: Self::FIRST_MS,
        }
    }
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
    /// Each distinct upload frame this client delivered: its resumable id (SHA-256) and its
    /// length, bytes.
    pub upload_frames: Vec<([u8; 32], u64)>,
    /// Upload bytes sent over every attempt: whole upload frames, and the bytes of upload
    /// pieces. Above the sum of `upload_frames`' lengths only when something was sent again.
    pub upload_bytes_sent: u64,
    /// Connections lost during the run (each followed by a reconnect).
    pub reconnects: u32,
    /// Why the last connection was lost.
    pub last_transport_error: Option<String>,
}

impl ClientReport {
    /// Upload bytes sent beyond one copy of each upload (re-sends after a refusal, a timeout
    /// or a lost connection).
    pub fn resent_bytes(&self) -> u64 {
        let once: u64 = self.upload_frames.iter().map(|(_, n)| n).sum();
        self.upload_bytes_sent.saturating_sub(once)
    }
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
