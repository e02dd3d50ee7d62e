//! Held-out evaluation of a global version, and what of it may be reported.

use super::*;

impl FederatedClient {
    pub(super) async fn evaluate_and_report(
        &self,
        s: &Session,
        version: u64,
        adapter: FlatAdapter,
        report: &mut ClientReport,
    ) -> Result<(), ClientError> {
        if self.config.privacy.is_some() || self.config.client_dp.is_some() {
            // a held-out loss and its token count are covered by neither accountant (the
            // example-level one nor the client-level one): the coordinator picks the adapter,
            // so the loss is a membership oracle, and the count gives away n. A private client,
            // at either level, reports nothing
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
