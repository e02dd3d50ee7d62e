//! One round on the device: the poll loop that takes tasks, the decision to train or decline,
//! local training behind the step gate, and encoding the update.

use super::*;

impl FederatedClient {
    pub(super) async fn serve(
        &self,
        s: &Session,
        report: &mut ClientReport,
        pending: &mut Option<ClientMsg>,
    ) -> Result<Outcome, ClientError> {
        // taken, not copied: `deliver` holds it as pending again until it is acknowledged
        if let Some(u) = pending.take() {
            info!("re-sending an unacknowledged upload");
            self.deliver(s, u, report, pending).await?;
        }
        let mut refused = Backoff::new(&self.config);
        let mut pace = Pace::default();
        loop {
            let held_version = self.held.lock().expect("lock").as_ref().map(|h| h.0);
            let reply = self
                .send(s, &ClientMsg::Poll { held_version }, report)
                .await?;
            match reply {
                CoordMsg::Task(Task::Wait { retry_after_ms })
                | CoordMsg::Task(Task::AlreadyUploaded { retry_after_ms, .. }) => {
                    pace.heard(retry_after_ms);
                    tokio::time::sleep(pace.wait()).await;
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
                CoordMsg::Task(Task::Train(_)) if self.announce_held(s, report).await? => {
                    // the coordinator had lost track of the held update (a restart): it waits
                    // for a cohort again, at the coordinator's pace
                    tokio::time::sleep(pace.wait()).await;
                }
                CoordMsg::Task(Task::Train(offer)) => match self.train(s, offer, report).await? {
                    Work::Ready => {
                        self.announce_held(s, report).await?;
                    }
                    Work::Upload(upload) => self.deliver(s, upload, report, pending).await?,
                    Work::Masked(round, body) => {
                        let msg = ClientMsg::SecAgg { round, body };
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
                        let input = matches!(body, SecAggBody::Input { .. });
                        let msg = ClientMsg::SecAgg { round, body };
                        match self.send(s, &msg, report).await? {
                            // an async cohort's masked input: this client took part in `round`
                            CoordMsg::Ack { .. } if input => report.rounds.push(round),
                            CoordMsg::Ack { .. } => {}
                            other => warn!(round, ?other, "secure-aggregation message refused"),
                        }
                    } else {
                        // dropped out of the stage: asks again at the coordinator's pace
                        tokio::time::sleep(pace.wait()).await;
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

    pub(super) async fn train(
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
        self.note_offer(&offer.config);
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
        // a client under client-level DP takes no round without a plan (its update would leave
        // un-noised)
        if offer.config.client_dp.is_none() && self.requires_client_dp() {
            warn!(
                round = offer.round,
                "a round without a client-level DP plan refused"
            );
            return Ok(Work::Decline(
                offer.round,
                DeclineReason::ClientDpPlanRefused,
            ));
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
                fedlora_train::step_gate::run(gate, || {
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
        if offer.config.secure.is_some() && offer.secure_shares.is_none() {
            // a synchronous secure round sends its shares with the offer; only async mode
            // trains before its cohort exists
            if offer.config.staleness.is_none() {
                return Ok(Work::Decline(
                    offer.round,
                    DeclineReason::SecureAggregationPolicy,
                ));
            }
            // async mode: the update waits, never in the clear, until a secure cohort masks it
            // (under a client-level DP plan it is charged there, before its masked input leaves)
            let mut held = offer;
            held.global = Vec::new();
            *self.cohort_update.lock().expect("lock") = Some(CohortUpdate {
                trained_round: held.round,
                delta: out.delta,
                offer: held,
                plan_signed,
            });
            return Ok(Work::Ready);
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
            // taken out while it masks (off the async runtime, below) and put back after: the
            // serve loop is this client's only user of it meanwhile
            let taken = self
                .secure
                .lock()
                .expect("lock")
                .take_if(|g| g.round == offer.round);
            let Some(mut st) = taken else {
                return Ok(Work::Decline(offer.round, DeclineReason::SecureStateLost));
            };
            if let Some(plan) = &offer.config.client_dp {
                // survivors sign the plan with their view; fewer than min_clients get no shares
                let digest = fedlora_protocol::client_dp::plan_digest(Some(plan), codec);
                // and the secure parameters it runs with are the ones the plan signed
                let signed_params = plan
                    .secure
                    .as_ref()
                    .map_or(Ok(()), |p| st.cr.require_params(p));
                if signed_params.is_err()
                    || st
                        .cr
                        .bind(digest, plan.min_clients, plan.collusion)
                        .is_err()
                {
                    return Ok(Work::Decline(offer.round, DeclineReason::SecureStateLost));
                }
                // charged before the masked input leaves: the coordinator can unmask it with
                // the neighbours' shares alone, whether or not this client answers
                self.charge_client_dp(plan, codec, offer.round, plan_signed.as_ref())?;
            }
            // masking is milliseconds to seconds of CPU (one keystream per neighbour over every
            // value): on the blocking pool, so this client's connection (and, in a gateway or a
            // load generator, every other client's) keeps being served meanwhile
            let shares = shares.clone();
            let (st, masked) = tokio::task::spawn_blocking(move || {
                let masked = st.cr.masked_input(&shares, &ints);
                (st, masked)
            })
            .await
            .map_err(|e| ClientError::Model(e.to_string()))?;
            let mut st = st;
            let masked = match masked {
                Ok(m) => m,
                Err(e) => {
                    warn!(round = offer.round, error = %e, "masking failed");
                    return Ok(Work::Decline(offer.round, DeclineReason::SecureStateLost));
                }
            };
            let statement = match self.signer.as_ref().map(|s| st.cr.mask_statement(s)) {
                Some(Ok(s)) => s,
                _ => {
                    warn!(
                        round = offer.round,
                        "no mask statement for the masked input"
                    );
                    return Ok(Work::Decline(offer.round, DeclineReason::SecureStateLost));
                }
            };
            st.masked_version = Some(offer.global_version);
            *self.secure.lock().expect("lock") = Some(st);
            let mut packed = Vec::new();
            fedlora_protocol::codec::bits::pack(masked, modulus, &mut packed);
            return Ok(Work::Masked(
                offer.round,
                SecAggBody::Input { packed, statement },
            ));
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

    /// Async mode with secure aggregation: tells the coordinator this client holds a finished
    /// update. Whether it now waits for a cohort; a refusal (too stale, already counted, the
    /// campaign over) drops the update, and `false` when none is held.
    pub(super) async fn announce_held(
        &self,
        s: &Session,
        report: &mut ClientReport,
    ) -> Result<bool, ClientError> {
        let Some(round) = self
            .cohort_update
            .lock()
            .expect("lock")
            .as_ref()
            .map(|u| u.trained_round)
        else {
            return Ok(false);
        };
        match self
            .send(s, &ClientMsg::UpdateReady { round }, report)
            .await?
        {
            CoordMsg::Ack { .. } => Ok(true),
            CoordMsg::Refused(r) if r.code == RefusalCode::RetryLater => Ok(true),
            other => {
                warn!(round, ?other, "held update not taken; dropping it");
                *self.cohort_update.lock().expect("lock") = None;
                Ok(false)
            }
        }
    }

    /// The instant local training must end by: the round's deadline less the upload margin,
    /// or the cap on training seconds, whichever comes first (`None`: no limit).
    pub(super) fn training_until(
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
    pub(super) fn time_fits(&self, until: Option<std::time::Instant>, steps: u32) -> bool {
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

    /// Encodes a delta with the round's codec, with error feedback for sparsifying codecs (the
    /// residual lives in the state directory; it is computed from the already-noised delta, so
    /// it is post-processing).
    pub(super) fn encode_delta(
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

    /// The spec of the rank slice `offer` asks this client to train (`None`: the full rank), or
    /// why it declines: a rank above its `max_rank`, or a slice not of this client's adapter.
    pub(super) fn offered_rank(
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
}
