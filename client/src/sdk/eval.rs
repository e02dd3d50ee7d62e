//! Held-out evaluation of a global version, and what of it may be reported.

use super::*;

impl FederatedClient {
    /// Whether a held-out loss and its token count may leave this client: never once it is
    /// private at either level, by its own configuration (an example-level budget or a
    /// client-level policy), by having been charged under a client-level plan (its record,
    /// kept across restarts), or by having been offered a client-level plan (noted in its
    /// record, in memory at once and on disk).
    /// Neither accountant covers an evaluation (the coordinator picks the adapter, so the loss
    /// is a membership oracle, and the count gives away n), and client-level DP's unit is all
    /// of a client's data, so a device that runs without a policy (it admits any consistent
    /// distributed plan) reports nothing from the first such offer on, its first round
    /// included. A device without an example-level budget declines DP-SGD rounds and takes no
    /// part in them: it may still report.
    pub(super) fn reports_evaluations(&self) -> bool {
        let rec = self.client_dp.lock().expect("lock");
        self.config.privacy.is_none()
            && self.config.client_dp.is_none()
            && !rec.offered
            && rec.plans.is_empty()
    }

    /// Marks that this client was offered a round under a client-level DP plan (see
    /// [`Self::reports_evaluations`]), in its record too (written durably the first time), so
    /// a restart does not make it report again.
    pub(super) fn note_offer(&self, config: &fedlora_protocol::TrainConfig) {
        if config.client_dp.is_none() {
            return;
        }
        // set in memory first: the flag holds for this session even if the save fails
        let mut rec = self.client_dp.lock().expect("lock");
        if !rec.offered {
            rec.offered = true;
            if let Err(e) = rec.save(self.config.state_dir.as_deref()) {
                warn!(error = %e, "the record of a client-level DP offer was not saved");
            }
        }
    }

    pub(super) async fn evaluate_and_report(
        &self,
        s: &Session,
        version: u64,
        adapter: FlatAdapter,
        report: &mut ClientReport,
    ) -> Result<(), ClientError> {
        if !self.reports_evaluations() {
            // a private client, at either level, reports nothing ([`Self::reports_evaluations`])
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
}
