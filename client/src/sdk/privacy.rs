//! Client-level DP on the device: the plan's policy check, admission against the device's own
//! record, and charging a round before anything of it leaves.

use super::*;

impl FederatedClient {
    /// Records, durably, that this client is charged for `round` under `plan` (called before
    /// whatever the round charges leaves the device).
    pub(super) fn charge_client_dp(
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

    /// Whether this client takes part only under a client-level DP plan: it has a policy of
    /// its own, or its record says it was charged under one (its data was promised client-level
    /// protection, so a round without a plan, which would send its update un-noised, is
    /// declined).
    pub(super) fn requires_client_dp(&self) -> bool {
        self.config.client_dp.is_some() || !self.client_dp.lock().expect("lock").plans.is_empty()
    }

    /// Checks a client-level DP plan: signed by the coordinator this session's TLS handshake
    /// verified, consistent with the round's codec and secure aggregation, and within this
    /// client's policy given the rounds it already took part in. Returns the checked signature
    /// (kept in the client's record).
    pub(super) fn admit_client_dp(
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
        self.check_client_dp_policy(plan, cfg, offer.round)?;
        Ok(signed)
    }

    /// The policy half of [`Self::admit_client_dp`]: the plan against the round's codec, then
    /// against this client's whole record ([`crate::client_dp::ClientDpRecord::admit`]: no
    /// round id twice, no round past the plan's T, ε composed over every plan).
    pub(super) fn check_client_dp_policy(
        &self,
        plan: &ClientDpPlan,
        cfg: &fedlora_protocol::TrainConfig,
        round: u64,
    ) -> Result<(), PlanRefusal> {
        let modulus = cfg.secure.as_ref().map(|s| s.modulus_bits);
        // the record of rounds and participations charged must outlive a restart
        if self.config.state_dir.is_none() {
            return Err(PlanRefusal::Inconsistent(
                "no state directory: a record of what was charged kept in memory would be \
                 forgotten at a restart"
                    .into(),
            ));
        }
        cfg.codec
            .validate()
            .map_err(|e| PlanRefusal::Inconsistent(format!("the round's codec: {e}")))?;
        plan.check_sensitivities(&cfg.codec, self.learner.spec().numel())?;
        // an async offer (it carries the staleness weighting) needs an async plan: devices
        // self-select there, so a plan amplified by a sample (q < 1) would overstate privacy
        if cfg.staleness.is_some() != plan.participation.is_some() {
            return Err(PlanRefusal::Inconsistent(format!(
                "a {} offer with a {} plan",
                if cfg.staleness.is_some() {
                    "async"
                } else {
                    "sync"
                },
                if plan.participation.is_some() {
                    "async (participation-bounded)"
                } else {
                    "sync (sampled)"
                }
            )));
        }
        let policy = self.config.client_dp.as_ref();
        if policy.is_none() {
            // without a policy: any consistent plan, but never central mode, where the
            // coordinator sees the update in the clear (only a client configured to trust it)
            plan.check_consistent(&cfg.codec, modulus)?;
            if plan.mode == fedlora_protocol::client_dp::ClientDpMode::Central {
                return Err(PlanRefusal::NeedsTrust(
                    "central mode needs a client configured to trust the coordinator".into(),
                ));
            }
        }
        let eps = self
            .client_dp
            .lock()
            .expect("lock")
            .admit(policy, plan, &cfg.codec, modulus, round)?;
        info!(eps, round, "client-level DP plan admitted");
        Ok(())
    }
}
