//! Requests that change the round: uploads (checked, persisted before the ack), masked-input
//! stages, declines and evaluation reports.

use super::*;

/// What an upload carried besides its payload, as received.
pub(super) struct Received {
    pub(super) round: u64,
    pub(super) spec_hash: SpecHash,
    pub(super) weight: f64,
    /// The training loss the upload carried: raw (non-DP), noised (a DP client that opted
    /// in), or none.
    pub(super) train_loss: Option<f64>,
    /// A [`ClientMsg::PrivateUpload`].
    pub(super) private: bool,
    /// Frame bytes on the wire.
    pub(super) wire_bytes: u64,
}

/// Refuses an upload of the wrong kind for this federation: a plain upload (with a loss and a
/// weight) in a DP federation (example- or client-level), a private one without DP, and any unmasked upload in a secure
/// federation.
pub(super) fn check_kind(
    train: &fedlora_protocol::TrainConfig,
    private: bool,
) -> Result<(), Refusal> {
    let wrong = |m: &str| Err(Refusal::new(RefusalCode::WrongKind, m));
    if train.secure.is_some() {
        return wrong("this federation aggregates securely: send a masked input, not an upload");
    }
    match (train.dp.is_some() || train.client_dp.is_some(), private) {
        (true, false) => wrong("this federation trains under DP: send a private upload"),
        (false, true) => wrong("this federation trains without DP: send a plain upload"),
        _ => Ok(()),
    }
}

/// A plain or private upload: checked and decoded, its payload written to its content-addressed
/// file, then handed to the group committer ([`super::commit`]), which acknowledges it once its
/// record is flushed. Decoding and the file write run on the blocking pool, outside every lock.
pub(super) async fn upload(
    shared: &Arc<Shared>,
    client: &str,
    u: Received,
    payload: Vec<u8>,
) -> CoordMsg {
    // the decoded addend's size, reserved until it is folded in (the reply below): a small
    // compressed upload cannot make the coordinator hold dense copies past this budget
    let _addend = match &shared.sum_kind {
        Some(kind) => {
            let bytes = kind
                .addend_bytes(shared.spec.numel())
                .min(super::ADDEND_BUDGET);
            match crate::wire::reserve_bytes(&shared.addends, bytes as u64).await {
                Ok(p) => Some(p),
                Err(r) => return CoordMsg::Refused(r),
            }
        }
        None => None,
    };
    let prepared = {
        let shared = shared.clone();
        let client = client.to_string();
        let s2 = shared.clone();
        super::blocking(&s2, move || prepare_upload(&shared, &client, u, &payload)).await
    };
    let pending = match prepared {
        Ok(Ok(p)) => p,
        Ok(Err(answer)) => return *answer,
        Err(e) => {
            error!(error = %e, %client, "preparing an upload failed");
            return CoordMsg::Refused(Refusal::new(RefusalCode::Internal, "retry"));
        }
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (round, spec_hash, record, addend) = pending;
    let sent = shared
        .commits
        .lock()
        .expect("lock")
        .send(super::commit::Pending::Upload(
            super::commit::PendingUpload {
                record,
                spec_hash,
                addend,
                reply: tx,
            },
        ));
    if sent.is_err() {
        return CoordMsg::Refused(Refusal::new(
            RefusalCode::Internal,
            "the coordinator is shutting down; retry",
        ));
    }
    rx.await.unwrap_or_else(|_| {
        CoordMsg::Refused(Refusal::new(
            RefusalCode::Internal,
            format!("upload for round {round} not committed; retry"),
        ))
    })
}

type Prepared = (
    u64,
    SpecHash,
    UploadRecord,
    Option<crate::running_sum::Addend>,
);

/// Everything about an upload that needs no lock held long: kind, decoding, norm bound, a
/// first check against the round (a refusal or a re-send answers at once), the running sum's
/// addend and the payload's file (written; durable once its batch is synced, see [`crate::store`]).
fn prepare_upload(
    shared: &Shared,
    client: &str,
    u: Received,
    payload: &[u8],
) -> Result<Prepared, Box<CoordMsg>> {
    let (expected, seed, max_norm) = {
        let fed = shared.fed.lock().expect("lock");
        // async: nothing is decoded while no buffer takes uploads (the client sends it again)
        if fed.is_async() {
            if let Err(r) = fed.may_upload(client) {
                return Err(CoordMsg::Refused(r).into());
            }
        }
        if let Err(r) = check_kind(&fed.config().train, u.private) {
            return Err(CoordMsg::Refused(r).into());
        }
        let train = &fed.config().train;
        (
            train.codec.clone(),
            fed.config().seed,
            train.max_update_norm,
        )
    };
    let ctx = CodecContext {
        round_seed: codec_seed(seed, u.round),
    };
    // the payload must decode to the federation's spec before anything is stored
    let decoded = match Codec::decode(payload, &shared.spec, Some(&expected), &ctx) {
        Ok(d) => d,
        Err(e) => {
            return Err(
                CoordMsg::Refused(Refusal::new(RefusalCode::Malformed, e.to_string())).into(),
            );
        }
    };
    if let Some(bound) = max_norm {
        if let Err(m) =
            crate::aggregate::check_update_norm(&expected, &shared.spec, payload, &decoded, bound)
        {
            warn!(round = u.round, %client, reason = %m, "update refused: norm bound");
            shared.metrics.refused(RefusalCode::UpdateNormExceeded);
            return Err(CoordMsg::Refused(Refusal::new(RefusalCode::UpdateNormExceeded, m)).into());
        }
    }
    let digest: [u8; 32] = Sha256::digest(payload).into();
    // a first check (the committer checks again under the lock it counts under); in async
    // mode the upload goes to the open buffer, with the round it trained in as its base
    let (verdict, buffer, base_round) = {
        let fed = shared.fed.lock().expect("lock");
        let v = fed.check_upload(client, u.round, &u.spec_hash, &digest, u.weight);
        (
            v,
            fed.upload_round(u.round),
            fed.is_async().then_some(u.round),
        )
    };
    match verdict {
        Ok(UploadVerdict::New) => {}
        Ok(UploadVerdict::AlreadyAccepted) => {
            info!(round = u.round, %client, "upload already accepted (re-send)");
            return Err(CoordMsg::Ack {
                round: u.round,
                status: fedlora_protocol::AckStatus::AlreadyAccepted,
            }
            .into());
        }
        Err(r) => return Err(CoordMsg::Refused(r).into()),
    }
    let rank = trained_rank(shared, client, u.round);
    let addend = match &shared.sum_kind {
        Some(kind) => {
            let r = crate::aggregate::rank_of(rank, shared.full_rank);
            match kind.addend(&expected, &shared.spec, payload, decoded, u.weight, r) {
                Ok(a) => Some(a),
                Err(e) => {
                    return Err(CoordMsg::Refused(Refusal::new(
                        RefusalCode::Malformed,
                        e.to_string(),
                    ))
                    .into())
                }
            }
        }
        None => None,
    };
    if let Err(e) = shared.store.write_upload_payload(buffer, &digest, payload) {
        error!(error = %e, %client, "storing an upload failed");
        return Err(CoordMsg::Refused(Refusal::new(
            RefusalCode::Internal,
            "could not store the upload; retry",
        ))
        .into());
    }
    let meta = UploadMeta {
        digest,
        weight: u.weight,
        bytes: payload.len() as u64,
        train_loss: u.train_loss,
        rank,
        base_round,
    };
    let record = UploadRecord {
        round: buffer,
        client: client.to_string(),
        meta,
        wire_bytes: u.wire_bytes,
        accepted_ms: now_ms(),
    };
    Ok((u.round, u.spec_hash, record, addend))
}

pub(super) fn secure_receive(
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
        SecAggBody::Input { packed, .. } => {
            Some((Sha256::digest(packed).into(), packed.len() as u64))
        }
        _ => None,
    };
    let chain = shared.certs.lock().expect("lock").get(client).cloned();
    if let Err(e) = sr.receive(client, body, chain.as_deref()) {
        return CoordMsg::Refused(Refusal::new(RefusalCode::StageRefused, e.to_string()));
    }
    if let Some((digest, bytes)) = input {
        crate::faults::crash_point("secure-input");
        // bookkeeping: the round's participants (the masked input itself stays in the sum)
        let meta = UploadMeta {
            digest,
            weight: 1.0,
            bytes,
            train_loss: None,
            rank: trained_rank(shared, client, round),
            base_round: None,
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

/// Secure async mode: `client` holds a finished update trained in `round` and waits for a
/// cohort (in memory: after a restart the device announces it again).
pub(super) fn update_ready(shared: &Shared, client: &str, round: u64) -> CoordMsg {
    match shared.fed.lock().expect("lock").mark_ready(client, round) {
        Ok(()) => {
            info!(round, %client, "update ready for a secure cohort");
            CoordMsg::Ack {
                round,
                status: fedlora_protocol::AckStatus::Accepted,
            }
        }
        Err(r) => CoordMsg::Refused(r),
    }
}

/// The rank `client` trained for `round`: the rank it was offered, else its declared one
/// (after a restart), `None` for the federation's rank.
pub(super) fn trained_rank(shared: &Shared, client: &str, round: u64) -> Option<u32> {
    if let Some((r, rank)) = shared.offered_ranks.lock().expect("lock").get(client) {
        if *r == round {
            return Some(*rank);
        }
    }
    shared.max_ranks.lock().expect("lock").get(client).copied()
}

pub(super) fn decline(
    shared: &Shared,
    client: &str,
    round: u64,
    reason: DeclineReason,
) -> CoordMsg {
    let mut fed = shared.fed.lock().expect("lock");
    let before = fed.clone();
    if let Err(r) = fed.decline(client, round, reason) {
        return CoordMsg::Refused(r);
    }
    // the reason goes into the round's record with the state, in one write
    let stored = match shared.store.round(round) {
        Ok(Some(mut rec)) => {
            rec.declined.insert(client.to_string(), reason);
            shared.store.put_round(&rec, fed.state())
        }
        Ok(None) => shared.store.save_state(fed.state()),
        Err(e) => Err(e),
    };
    if let Err(e) = stored {
        *fed = before;
        error!(error = %e, "storing a decline failed");
        return CoordMsg::Refused(Refusal::new(RefusalCode::Internal, "retry"));
    }
    drop(fed);
    if let Some(sec) = shared
        .secure
        .lock()
        .expect("lock")
        .as_mut()
        .filter(|s| s.round == round)
    {
        sec.note_decline(client);
    }
    warn!(round, %client, reason = reason.describe(), "client declined the round");
    CoordMsg::DeclineRecorded { round }
}

/// An evaluation report: counted and stored by the group committer ([`super::commit`]) and
/// acknowledged once stored; otherwise the client is asked again.
pub(super) async fn eval_report(shared: &Shared, client: &str, r: EvalReport) -> CoordMsg {
    // (the frame decoder already refused non-finite or negative losses and empty reports)
    let record = EvalRecord {
        version: r.version,
        client: client.to_string(),
        loss: r.loss,
        tokens: r.tokens,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let sent = shared
        .commits
        .lock()
        .expect("lock")
        .send(super::commit::Pending::Eval { record, reply: tx });
    if sent.is_err() {
        return CoordMsg::Refused(Refusal::new(RefusalCode::Internal, "shutting down; retry"));
    }
    rx.await
        .unwrap_or_else(|_| CoordMsg::Refused(Refusal::new(RefusalCode::Internal, "retry")))
}

/// A client withholds its evaluation (it trains under DP): nothing is stored, and the
/// federation stops waiting for its report of `version`.
pub(super) fn eval_withheld(shared: &Shared, client: &str, version: u64) -> CoordMsg {
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

#[cfg(test)]
mod tests {
    use super::*;

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
                collusion: 0,
                stage_timeout_ms: 1_000,
            }),
            ..dp
        };
        assert!(check_kind(&secure, true).is_err());
    }
}
