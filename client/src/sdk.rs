//! The device SDK: a client that joins a federation over QUIC, trains its LoRA adapter on local
//! data when offered a round, reports held-out evaluations, and survives flaky links (reconnects
//! with exponential backoff; an upload not yet acknowledged is kept in the state directory and
//! re-sent, which the coordinator acknowledges as `AlreadyAccepted` if it had stored it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fedlora_protocol::{
    AckStatus, ClientMsg, Codec, CodecContext, CoordMsg, ErrorFeedback, EvalReport, FlatAdapter,
    RefusalCode, RoundOffer, SecAggBody, SecAggTask, Task, Upload, Weighting, PROTOCOL_VERSION,
};
use tracing::{info, warn};

use crate::data::ClientData;
use crate::error::ClientError;
use crate::learner::{encode_update, local_update, os_rng, ClientSeeds, Learner, LmLearner};
use crate::privacy::{decide_round, PrivacyState, PrivacyTarget, RoundDecision};
use crate::train::LocalTrainer;
use crate::transport::{endpoint, ClientTls, Session};

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
    /// This client's privacy target. With one, the client trains only under a DP plan and
    /// declines rounds its budget cannot pay for; without one, it declines DP rounds.
    pub privacy: Option<PrivacyTarget>,
    /// Noise seed (tests and simulations only; `None` draws DP noise from the OS CSPRNG).
    pub noise_seed: Option<u64>,
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
            privacy: None,
            noise_seed: None,
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
    pub declined: Vec<(u64, String)>,
    /// ε spent at the end (DP clients).
    pub eps_spent: Option<f64>,
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
    secure: std::sync::Mutex<Option<(u64, fedlora_protocol::secagg::ClientRound)>>,
}

enum Work {
    Upload(Upload),
    Masked(u64, Vec<u8>),
    Decline(u64, String),
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
        let privacy = match config.privacy {
            Some(t) => Some(PrivacyState::open(config.state_dir.as_deref(), t)?),
            None => None,
        };
        Ok(Self {
            learner,
            privacy: std::sync::Mutex::new(privacy),
            held: std::sync::Mutex::new(None),
            signer: crate::secure::load_signer(&config.tls.key).ok(),
            client_id: std::sync::Mutex::new(String::new()),
            secure: std::sync::Mutex::new(None),
            config,
        })
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

    fn save_pending(&self, u: &Upload) -> Result<(), ClientError> {
        match self.pending_path() {
            Some(p) => save_state_file(&p, u),
            None => Ok(()),
        }
    }

    fn load_pending(&self) -> Option<Upload> {
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
        let ep = endpoint(&self.config.tls)?;
        let mut report = ClientReport::default();
        let mut pending = self.load_pending();
        let mut backoff = self.config.backoff_initial_ms;
        let mut failures = 0u32;
        loop {
            let session = match self.hello(&ep, &mut report).await {
                Ok(s) => s,
                Err(ClientError::Transport(e)) => {
                    failures += 1;
                    if self
                        .config
                        .max_connect_attempts
                        .is_some_and(|m| failures >= m)
                    {
                        return Err(ClientError::Transport(e));
                    }
                    warn!(error = %e, backoff_ms = backoff, "connecting failed; retrying");
                    tokio::time::sleep(Duration::from_millis(backoff)).await;
                    backoff = (backoff * 2).min(self.config.backoff_max_ms);
                    continue;
                }
                Err(e) => return Err(e),
            };
            backoff = self.config.backoff_initial_ms;
            failures = 0;
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
                    warn!(error = %e, "connection lost; reconnecting");
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

    async fn send(
        &self,
        s: &Session,
        msg: &ClientMsg,
        report: &mut ClientReport,
    ) -> Result<CoordMsg, ClientError> {
        let up = fedlora_protocol::frame::encode(msg)?;
        let (reply, down) = s.request_raw(&up).await?;
        report.bytes_up += up.len() as u64;
        report.bytes_down += down;
        Ok(reply)
    }

    async fn deliver(
        &self,
        s: &Session,
        upload: Upload,
        report: &mut ClientReport,
        pending: &mut Option<Upload>,
    ) -> Result<(), ClientError> {
        let round = upload.round;
        *pending = Some(upload.clone());
        self.save_pending(&upload)?;
        match self.send(s, &ClientMsg::Upload(upload), report).await? {
            CoordMsg::Ack { status, .. } => {
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

    async fn serve(
        &self,
        s: &Session,
        report: &mut ClientReport,
        pending: &mut Option<Upload>,
    ) -> Result<Outcome, ClientError> {
        if let Some(u) = pending.clone() {
            info!(round = u.round, "re-sending an unacknowledged upload");
            self.deliver(s, u, report, pending).await?;
        }
        loop {
            let held_version = self.held.lock().expect("lock").as_ref().map(|h| h.0);
            let reply = self
                .send(s, &ClientMsg::Poll { held_version }, report)
                .await?;
            match reply {
                CoordMsg::Task(Task::Wait { retry_after_ms }) => {
                    tokio::time::sleep(Duration::from_millis(retry_after_ms)).await;
                }
                CoordMsg::Task(Task::AlreadyUploaded { .. }) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                CoordMsg::Task(Task::Finished { version }) => {
                    report.final_version = Some(version);
                    return Ok(Outcome::Finished);
                }
                CoordMsg::Task(Task::Evaluate {
                    version,
                    global_from,
                    global,
                }) => {
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
                        match self.send(s, &msg, report).await? {
                            CoordMsg::Ack { .. } => report.rounds.push(round),
                            other => warn!(round, ?other, "masked input not accepted"),
                        }
                    }
                    Work::Decline(round, reason) => {
                        warn!(round, %reason, "declining the round");
                        let msg = ClientMsg::Decline {
                            round,
                            reason: reason.clone(),
                        };
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
                CoordMsg::Refused(r) => return Err(ClientError::Refused(r)),
                other => {
                    return Err(ClientError::Transport(format!(
                        "unexpected answer to a poll: {other:?}"
                    )))
                }
            }
        }
    }

    /// Performs one secure-aggregation stage; `None` when the client cannot (it then drops out
    /// of the round, which the protocol tolerates).
    fn secure_stage(&self, round: u64, task: SecAggTask) -> Option<SecAggBody> {
        use fedlora_protocol::secagg::ClientRound;
        let mut guard = self.secure.lock().expect("lock");
        let r = (|| -> Result<SecAggBody, String> {
            match task {
                SecAggTask::AdvertiseKeys { params } => {
                    let signer = self
                        .signer
                        .as_ref()
                        .ok_or("no ECDSA P-256 certificate key")?;
                    let id = self.client_id.lock().expect("lock").clone();
                    let mut rng = os_rng().map_err(|e| e.to_string())?;
                    let mut cr = ClientRound::new(round, &id, params, &mut rng);
                    let keys = cr.advertise(signer).map_err(|e| e.to_string())?;
                    *guard = Some((round, cr));
                    Ok(SecAggBody::Keys(keys))
                }
                SecAggTask::ShareKeys {
                    roster,
                    certificates,
                } => {
                    let (_, cr) = guard
                        .as_mut()
                        .filter(|g| g.0 == round)
                        .ok_or("no keys for this round")?;
                    let v = crate::secure::verifier_from_certificates(
                        &self.config.tls.ca,
                        &certificates,
                    )
                    .map_err(|e| e.to_string())?;
                    let mut rng = os_rng().map_err(|e| e.to_string())?;
                    let shares = cr
                        .share_keys(&roster, &v, &mut rng)
                        .map_err(|e| e.to_string())?;
                    Ok(SecAggBody::Shares(shares))
                }
                SecAggTask::Unmask(req) => {
                    let (_, cr) = guard
                        .as_mut()
                        .filter(|g| g.0 == round)
                        .ok_or("no secure state for this round")?;
                    let resp = cr.unmask(&req).map_err(|e| e.to_string())?;
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
        let learner = self.learner.clone();
        let ev = tokio::task::spawn_blocking(move || learner.evaluate(&adapter))
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
        let global = match self.reconstruct(offer.global_version, offer.global_from, &offer.global)
        {
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
        // the budget decides before any data is touched; spending is flushed before training
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
        let out = tokio::task::spawn_blocking(move || {
            local_update(&*learner, &global, &cfg, dp.as_ref(), &seeds, round)
        })
        .await
        .map_err(|e| ClientError::Model(e.to_string()))??;
        info!(
            round = offer.round,
            loss = out.train_loss,
            secs = out.secs,
            "trained locally"
        );
        let weight = match offer.config.weighting {
            Weighting::ExampleCount => out.examples as f64,
            Weighting::Uniform => 1.0,
        };
        if let Some(shares) = &offer.secure_shares {
            let codec = &offer.config.codec;
            let bytes = self.encode_delta(&out.delta, &offer, 1)?;
            let ints = codec.modular_payload(&bytes, self.learner.spec())?;
            let Codec::Modular(p) = codec else {
                return Ok(Work::Decline(
                    offer.round,
                    "secure round without the modular codec".into(),
                ));
            };
            let mut guard = self.secure.lock().expect("lock");
            let Some((_, cr)) = guard.as_mut().filter(|g| g.0 == offer.round) else {
                return Ok(Work::Decline(
                    offer.round,
                    "no secure state for this round".into(),
                ));
            };
            let masked = match cr.masked_input(shares, &ints) {
                Ok(m) => m,
                Err(e) => return Ok(Work::Decline(offer.round, format!("masking failed: {e}"))),
            };
            let mut packed = Vec::new();
            fedlora_protocol::codec::bits::pack(masked, p.modulus_bits(), &mut packed);
            return Ok(Work::Masked(offer.round, packed));
        }
        Ok(Work::Upload(Upload {
            round: offer.round,
            spec_hash: self.learner.spec().hash(),
            weight,
            train_loss: out.train_loss,
            eps_spent: eps,
            payload: self.encode_delta(&out.delta, &offer, weight as u64)?,
        }))
    }
}
