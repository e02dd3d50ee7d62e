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
use crate::eligibility::{Ineligible, SharedEligibility};
use crate::error::ClientError;
use crate::privacy::{decide_round, PrivacyState, PrivacyTarget, RoundDecision};
use crate::transport::{ClientTls, Session, TransportTimers};
use fedlora_protocol::client_dp::{ClientDpPlan, ClientDpPolicy, PlanRefusal};
use fedlora_train::data::ClientData;
use fedlora_train::learner::{
    encode_update, local_update, os_rng, ClientSeeds, Learner, LmLearner,
};
use fedlora_train::step_gate::{Gate, Stop};
use fedlora_train::train::LocalTrainer;

mod config;
mod eval;
mod privacy;
mod round;
mod secure;
mod session;
mod state;

pub use config::*;
pub use secure::secure_policy_decision;
use secure::SecureState;
use session::Backoff;
use state::{load_unmasked, record_unmasked, save_state_file};

/// A federated client: a learner (model and local data) and the connection settings.
pub struct FederatedClient {
    config: ClientConfig,
    /// Which of the coordinator's addresses the next connection tries (see
    /// [`ClientConfig::alternates`]).
    addr_turn: std::sync::atomic::AtomicUsize,
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
    /// Async mode with secure aggregation: a finished update waiting for a cohort (in memory:
    /// it is masked at most once, then dropped whatever the cohort's outcome).
    cohort_update: std::sync::Mutex<Option<CohortUpdate>>,
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

enum Work {
    Upload(ClientMsg),
    Masked(u64, SecAggBody),
    Decline(u64, DeclineReason),
    /// Async mode with secure aggregation: the update is held for a cohort.
    Ready,
}

/// An update trained in async mode, held until a secure cohort masks it.
pub(super) struct CohortUpdate {
    /// The round it trained in.
    pub(super) trained_round: u64,
    /// The trained delta (already DP output under a DP plan).
    pub(super) delta: FlatAdapter,
    /// The offer it trained on (codec and settings; the global's bytes dropped).
    pub(super) offer: RoundOffer,
    /// Under a client-level DP plan: the coordinator's signature of it, checked when the plan
    /// was admitted for training (kept in the record when the update is charged).
    pub(super) plan_signed: Option<crate::client_dp::CoordinatorSignature>,
}

enum Outcome {
    Finished,
    Reconnect,
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
            addr_turn: std::sync::atomic::AtomicUsize::new(0),
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
            cohort_update: std::sync::Mutex::new(None),
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

    /// The coordinator address the next connection tries.
    pub(crate) fn address(&self) -> SocketAddr {
        let n = 1 + self.config.alternates.len();
        match self.addr_turn.load(std::sync::atomic::Ordering::Relaxed) % n {
            0 => self.config.coordinator,
            i => self.config.alternates[i - 1],
        }
    }

    /// Moves on to the next coordinator address (after a failure there).
    fn next_address(&self) {
        if !self.config.alternates.is_empty() {
            self.addr_turn
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn seeds(&self) -> ClientSeeds {
        ClientSeeds {
            sampling: self.config.sampling_seed,
            noise: self.config.noise_seed,
        }
    }

    /// Runs until the coordinator says the federation is finished.
    pub async fn run(&self) -> Result<ClientReport, ClientError> {
        let shared = self.config.endpoint.is_some();
        let ep = match &self.config.endpoint {
            Some(ep) => ep.clone(),
            None => crate::transport::bare_endpoint()?,
        };
        let mut report = ClientReport::default();
        let mut pending = self.load_pending();
        let mut backoff = Backoff::new(&self.config);
        let mut failures = 0u32;
        info!(coordinator = %self.config.coordinator, alternates = ?self.config.alternates,
            "connecting to the coordinator");
        loop {
            let addr = self.address();
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
                    self.next_address();
                    backoff.wait().await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            backoff.reset();
            failures = 0;
            if self.renew(&session, &mut report).await? {
                // reconnect with the new certificate (each connection reads it again)
                session.close();
                continue;
            }
            match self.serve(&session, &mut report, &mut pending).await {
                Ok(Outcome::Finished) => {
                    if let Some(p) = self.privacy.lock().expect("lock").as_ref() {
                        report.eps_spent = p.epsilon_spent().ok();
                    }
                    session.close();
                    if !shared {
                        ep.wait_idle().await;
                    }
                    return Ok(report);
                }
                Ok(Outcome::Reconnect) => {}
                Err(ClientError::Transport(e)) => {
                    warn!(coordinator = %addr, error = %e, "connection lost; reconnecting");
                    self.next_address();
                    report.reconnects += 1;
                    report.last_transport_error = Some(e);
                }
                Err(ClientError::Tls(e)) if self.config.retry_forever => {
                    warn!(coordinator = %addr, error = %e, "TLS failure; retrying (--retry-forever)");
                }
                Err(e) => return Err(e),
            }
        }
    }
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

    #[test]
    fn a_poll_after_an_answer_without_a_wait_keeps_the_coordinators_last_pace() {
        use std::time::Duration;
        let mut pace = super::Pace::default();
        // before the coordinator named a wait: its default poll interval
        assert_eq!(pace.wait(), Duration::from_millis(200));
        // a coordinator of 10,000 clients asks for 5 s between polls: a device that drops
        // out of a secure stage asks again after 5 s, not 200 ms
        pace.heard(5_000);
        assert_eq!(pace.wait(), Duration::from_secs(5));
        pace.heard(u64::MAX);
        assert_eq!(pace.wait(), Duration::from_secs(60));
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
                    collusion: 0,
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
        // a secure federation offering no shares is an async cohort offer: trained, held,
        // and sent only masked (`train` has no plaintext path for a secure federation)
        assert_eq!(secure_policy_decision(&p, &offer(true, false), &none), None);
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
        // no second masked input from a global version already unmasked, in either mode
        let done = [2u64].into();
        for shares in [true, false] {
            assert_eq!(
                secure_policy_decision(&p, &offer(true, shares), &done),
                Some(DeclineReason::SecureAggregationPolicy)
            );
        }
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
        std::fs::write(dir.path().join(state::UNMASKED_FILE), b"\xff\xff\xff").unwrap();
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
