//! The secure-aggregation stages on the device: each stage of the SecAgg+ client machine, the
//! policy that decides whether a secure offer is acceptable, and rebuilding a global version
//! from what was downloaded.

use super::*;

/// One secure round on the client: its stage machine, the peers' verifier from the roster's
/// certificates, and the global version its masked input was trained from.
pub(super) struct SecureState {
    pub(super) round: u64,
    pub(super) cr: ClientRound,
    pub(super) verifier: Option<P256Verifier>,
    pub(super) masked_version: Option<u64>,
}

impl FederatedClient {
    /// Performs one secure-aggregation stage; `None` when the client cannot or will not (it
    /// then drops out of the round, which the protocol tolerates, and its state is wiped).
    pub(super) fn secure_stage(&self, round: u64, task: SecAggTask) -> Option<SecAggBody> {
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
                SecAggTask::MaskInput {
                    shares,
                    trained_round,
                    staleness_weight,
                    codec_seed,
                } => {
                    // masked at most once: taken now, whatever the cohort's outcome (a second
                    // masked copy in another cohort would let the two sums be differenced)
                    let held = self
                        .cohort_update
                        .lock()
                        .expect("lock")
                        .take()
                        .ok_or("no update held for a cohort")?;
                    if held.trained_round != trained_round {
                        return Err(format!(
                            "the cohort asks for an update trained in round {trained_round}; \
                             this client holds one from round {}",
                            held.trained_round
                        ));
                    }
                    // the weight is this client's own s(τ), from the weighting its offer
                    // carried, never the coordinator's number (which could push every other
                    // member's update to zero); at least this client's floor
                    let plan = held
                        .offer
                        .config
                        .staleness
                        .ok_or("an async offer without its staleness weighting")?;
                    let w = fedlora_protocol::round::cohort_weight(
                        &plan,
                        round,
                        trained_round,
                        staleness_weight,
                        self.config.min_staleness_weight,
                    )?;
                    // every member signs the same codec, codec seed and weighting with its
                    // survivor view: a coordinator that showed members different ones gets no
                    // unmask shares
                    let context = fedlora_protocol::round::cohort_context(
                        &held.offer.config.codec,
                        &plan,
                        codec_seed,
                    );
                    match &held.offer.config.client_dp {
                        None => st.cr.bind(context, 0, 0).map_err(|e| e.to_string())?,
                        Some(dp) => {
                            // distributed client-level DP: the members also sign the plan,
                            // fewer than its min_clients survivors get no shares, and the
                            // stages run with the secure parameters it signed
                            let codec = &held.offer.config.codec;
                            if let Some(p) = &dp.secure {
                                st.cr.require_params(p).map_err(|e| e.to_string())?;
                            }
                            let bound = fedlora_protocol::round::cohort_plan_context(
                                &context,
                                &fedlora_protocol::client_dp::plan_digest(Some(dp), codec),
                            );
                            st.cr
                                .bind(bound, dp.min_clients, dp.collusion)
                                .map_err(|e| e.to_string())?;
                            // judged again on the whole record (nothing else may have been
                            // charged since training), then charged, durably, before the
                            // masked input leaves: the coordinator can unmask it with the
                            // neighbours' shares alone
                            self.check_client_dp_policy(dp, &held.offer.config, trained_round)
                                .map_err(|e| e.to_string())?;
                            self.charge_client_dp(
                                dp,
                                codec,
                                trained_round,
                                held.plan_signed.as_ref(),
                            )
                            .map_err(|e| e.to_string())?;
                        }
                    }
                    let mut offer = held.offer;
                    offer.round = round;
                    offer.codec_seed = codec_seed;
                    let mut scaled = held.delta;
                    if let Some(dp) = &offer.config.client_dp {
                        // s·clip_S(Δ), as the central mode's sum weighs it: the down-weighting
                        // of a stale update holds whatever its norm
                        fedlora_dp::clip_l2(scaled.values_mut(), dp.clip);
                    }
                    let w = w as f32;
                    scaled.values_mut().iter_mut().for_each(|x| *x *= w);
                    let codec = offer.config.codec.clone();
                    let modulus = codec.modulus_bits().ok_or("not a modular codec")?;
                    let bytes = self
                        .encode_delta(&scaled, &offer, 1)
                        .map_err(|e| e.to_string())?;
                    let ints = codec
                        .modular_payload(&bytes, self.learner.spec())
                        .map_err(|e| e.to_string())?;
                    let masked = st
                        .cr
                        .masked_input(&shares, &ints)
                        .map_err(|e| e.to_string())?;
                    let statement = st.cr.mask_statement(signer).map_err(|e| e.to_string())?;
                    st.masked_version = Some(offer.global_version);
                    let mut packed = Vec::new();
                    fedlora_protocol::codec::bits::pack(masked, modulus, &mut packed);
                    Ok(SecAggBody::Input { packed, statement })
                }
                SecAggTask::ConsistencyCheck(bits) => {
                    let view = st.cr.expand_view(&bits).map_err(|e| e.to_string())?;
                    let sig = st
                        .cr
                        .consistency(&view, signer)
                        .map_err(|e| e.to_string())?;
                    Ok(SecAggBody::Consistency(sig))
                }
                SecAggTask::Unmask {
                    request,
                    signatures,
                    statements,
                } => {
                    let v = st.verifier.as_ref().ok_or("no roster verifier")?;
                    let request = st.cr.expand_view(&request).map_err(|e| e.to_string())?;
                    let resp = st
                        .cr
                        .unmask(&request, &signatures, &statements, v)
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
    pub(super) fn reconstruct(
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

    /// Why this client must not train `offer` under its secure-aggregation policy, if it must
    /// not: a secure federation's offer without the shares to mask with (the coordinator wants
    /// a plaintext update), a round without secure aggregation when the policy requires it, or
    /// a second masked input from a global version it already sent unmask shares for.
    pub(super) fn secure_policy(&self, offer: &RoundOffer) -> Option<DeclineReason> {
        secure_policy_decision(
            &self.config.secagg,
            offer,
            &self.unmasked.lock().expect("lock"),
        )
    }
}

/// The secure-aggregation policy's verdict on an offer (see [`FederatedClient`]); `None`
/// means the client may train it.
///
/// An offer of a secure federation without shares is an async-mode offer: the update is held
/// for a cohort and only ever leaves masked ([`SecAggTask::MaskInput`]), so it is trained.
pub fn secure_policy_decision(
    policy: &SecAggPolicy,
    offer: &RoundOffer,
    unmasked_versions: &std::collections::BTreeSet<u64>,
) -> Option<DeclineReason> {
    let secure = offer.config.secure.is_some() || offer.secure_shares.is_some();
    if policy.required && !secure {
        return Some(DeclineReason::SecureAggregationPolicy);
    }
    if secure && !offer.config.codec.is_summable() {
        return Some(DeclineReason::SecureAggregationPolicy);
    }
    if secure && unmasked_versions.contains(&offer.global_version) {
        return Some(DeclineReason::SecureAggregationPolicy);
    }
    None
}
