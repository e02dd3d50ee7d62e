//! Group commit of plain uploads and evaluation reports: one thread takes every one that is
//! waiting, makes the batch durable with one sled flush ([`Store::record_batch`]), then counts,
//! folds and acknowledges each. Acknowledgements per second scale with the batch, not with the latency
//! of a flush; the crash-safety argument is in [`crate::store`]'s docs.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Weak;

use tokio::sync::oneshot;

use super::*;
use crate::running_sum::{Addend, RunningSum};

/// Uploads one flush commits at most.
pub(super) const MAX_BATCH: usize = 4096;

/// What waits for the committer.
pub(super) enum Pending {
    /// An upload whose payload file is written and fsynced.
    Upload(PendingUpload),
    /// An evaluation report.
    Eval {
        record: EvalRecord,
        reply: oneshot::Sender<CoordMsg>,
    },
}

/// An upload whose payload file is written and fsynced, waiting for its record.
pub(super) struct PendingUpload {
    pub(super) record: UploadRecord,
    pub(super) spec_hash: SpecHash,
    /// What it adds to the round's running sum (`None`: the strategy reads each payload).
    pub(super) addend: Option<Addend>,
    /// Where the answer goes.
    pub(super) reply: oneshot::Sender<CoordMsg>,
}

/// The committer's end of the queue; the thread ends once the coordinator is dropped.
pub(super) fn spawn(shared: Weak<Shared>, rx: Receiver<Pending>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("fedlora-commit".into())
        .spawn(move || loop {
            let first = match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(p) => p,
                Err(RecvTimeoutError::Timeout) if shared.strong_count() > 0 => continue,
                Err(_) => return,
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            let Some(shared) = shared.upgrade() else {
                return;
            };
            commit_batch(&shared, batch);
        })
        .map(|_| ())
}

/// A queue and its (not yet started) receiving end.
pub(super) fn channel() -> (Sender<Pending>, Receiver<Pending>) {
    std::sync::mpsc::channel()
}

fn ack(round: u64, status: fedlora_protocol::AckStatus) -> CoordMsg {
    CoordMsg::Ack { round, status }
}

/// Checks, records (one flush), counts, folds and answers one batch.
fn commit_batch(shared: &Shared, batch: Vec<Pending>) {
    let fed = shared.fed.lock().expect("lock");
    let mut accepted: Vec<PendingUpload> = Vec::with_capacity(batch.len());
    let mut evals: Vec<(EvalRecord, oneshot::Sender<CoordMsg>)> = Vec::new();
    let mut answers: Vec<(oneshot::Sender<CoordMsg>, CoordMsg)> = Vec::new();
    let mut batch_evals = std::collections::BTreeSet::new();
    for p in batch {
        let p = match p {
            Pending::Upload(p) => p,
            Pending::Eval { record, reply } => {
                // checked now, counted once stored (below); a second report of the batch is
                // refused here
                let verdict = if batch_evals.insert((record.client.clone(), record.version)) {
                    fed.check_eval(&record.client, record.version)
                } else {
                    Err(fedlora_protocol::round::duplicate_eval(
                        &record.client,
                        record.version,
                    ))
                };
                match verdict {
                    Ok(()) => evals.push((record, reply)),
                    Err(refusal) => {
                        let _ = reply.send(CoordMsg::Refused(refusal));
                    }
                }
                continue;
            }
        };
        let r = &p.record;
        // a second upload of one client in the same batch: the first one decides
        if let Some(first) = accepted.iter().find(|a| a.record.client == r.client) {
            let same = first.record.meta.digest == r.meta.digest;
            let msg = if same {
                ack(r.round, fedlora_protocol::AckStatus::AlreadyAccepted)
            } else {
                CoordMsg::Refused(Refusal::new(
                    RefusalCode::DuplicateUpload,
                    format!(
                        "client {} already uploaded a different delta for round {}",
                        r.client, r.round
                    ),
                ))
            };
            // answered after the flush, like the upload it repeats
            answers.push((p.reply, msg));
            continue;
        }
        if r.round
            > shared
                .durable_round
                .load(std::sync::atomic::Ordering::Acquire)
        {
            // async: the buffer it was placed in opened a moment ago; sync: a round not stored
            // yet cannot take it
            let code = if fed.is_async() {
                RefusalCode::RetryLater
            } else {
                RefusalCode::WrongRound
            };
            let _ = p.reply.send(CoordMsg::Refused(Refusal::new(
                code,
                format!("round {} is not stored yet; retry", r.round),
            )));
            continue;
        }
        // the round the client trained in (async: the record's round is the buffer)
        let trained = r.meta.base_round.unwrap_or(r.round);
        match fed.check_upload(
            &r.client,
            trained,
            &p.spec_hash,
            &r.meta.digest,
            r.meta.weight,
        ) {
            // async: the buffer it was stored for closed meanwhile; a re-send goes to the next
            Ok(UploadVerdict::New) if fed.upload_round(trained) != r.round => {
                let _ = p.reply.send(CoordMsg::Refused(Refusal::new(
                    RefusalCode::RetryLater,
                    format!(
                        "buffer {} closed while the upload was stored; re-send",
                        r.round
                    ),
                )));
            }
            Ok(UploadVerdict::New) => {
                let mut p = p;
                // the staleness weight s(τ) multiplies the upload's weight in the sum
                let s = fed.staleness_weight(p.record.round, &p.record.meta);
                if let Some(a) = p.addend.as_mut() {
                    a.weight *= s;
                }
                accepted.push(p)
            }
            Ok(UploadVerdict::AlreadyAccepted) => {
                let _ = p
                    .reply
                    .send(ack(r.round, fedlora_protocol::AckStatus::AlreadyAccepted));
            }
            Err(refusal) => {
                let _ = p.reply.send(CoordMsg::Refused(refusal));
            }
        }
    }
    if accepted.is_empty() && evals.is_empty() {
        drop(fed);
        answer(answers);
        return;
    }
    if !accepted.is_empty() {
        crate::faults::crash_point("commit-before-flush");
    }
    let records: Vec<UploadRecord> = accepted.iter().map(|p| p.record.clone()).collect();
    let eval_records: Vec<EvalRecord> = evals.iter().map(|(r, _)| r.clone()).collect();
    // A batch of evaluation reports alone is flushed without the federation lock: the reports
    // are counted only once they are stored (below), so no answer and no end of the final
    // evaluation ever rests on a report that is not; the committer is the only one that counts
    // reports, so none is counted twice meanwhile. Uploads keep the lock from their checks to
    // their counting, so a round cannot close between the two; their batch's reports are
    // counted under it before the flush and forgotten again if it fails.
    let (fed, counted) = if accepted.is_empty() {
        drop(fed);
        (None, Vec::new())
    } else {
        let mut fed = fed;
        // checked under this same lock a moment ago
        let counted: Vec<_> = eval_records
            .iter()
            .map(|r| fed.record_eval(&r.client, r.version))
            .collect();
        (Some(fed), counted)
    };
    if let Err(e) = shared.store.record_batch(&records, &eval_records) {
        if let Some(mut fed) = fed {
            for (r, _) in eval_records.iter().zip(&counted).filter(|(_, c)| c.is_ok()) {
                fed.forget_eval(&r.client, r.version);
            }
        }
        error!(error = %e, uploads = records.len(), evals = eval_records.len(), "storing a group failed");
        let retry = || {
            CoordMsg::Refused(Refusal::new(
                RefusalCode::Internal,
                "could not store it; retry",
            ))
        };
        for p in accepted {
            let _ = p.reply.send(retry());
        }
        for (_, reply) in evals {
            let _ = reply.send(retry());
        }
        // a repeat of an upload of this batch is not acknowledged either: nothing was stored
        answer(answers.into_iter().map(|(tx, _)| (tx, retry())).collect());
        return;
    }
    if !accepted.is_empty() {
        crate::faults::crash_point("commit-after-flush");
    }
    let Some(mut fed) = fed else {
        // evaluation reports only: stored, now counted (a report whose evaluation ended while
        // it was stored is refused; its stored record is a late report, which nothing counts)
        let verdicts: Vec<_> = {
            let mut fed = shared.fed.lock().expect("lock");
            evals
                .iter()
                .map(|(r, _)| fed.record_eval(&r.client, r.version))
                .collect()
        };
        answer_evals(evals, verdicts);
        answer(answers);
        return;
    };
    for p in &accepted {
        // checked above under this same lock: the round is open and the client new
        if let Err(r) = fed.accept_upload(&p.record.client, p.record.round, p.record.meta.clone()) {
            error!(client = %p.record.client, reason = %r, "a checked upload was not counted");
        }
    }
    // the running sum is taken before the federation lock is let go: an aggregation (which
    // closes the round under the federation lock, then reads the sum) waits for these folds
    if accepted.iter().any(|p| p.addend.is_some()) {
        let mut sum = shared.sum.lock().expect("lock");
        drop(fed);
        for p in &accepted {
            if let Some(a) = &p.addend {
                fold(&mut sum, &p.record, a, shared);
            }
        }
    } else {
        drop(fed);
    }
    // counted under the lock before the flush
    answer_evals(evals, counted);
    for p in accepted {
        let r = p.record;
        info!(
            round = r.round,
            client = %r.client,
            bytes = r.wire_bytes,
            weight = r.meta.weight,
            "upload accepted"
        );
        shared.metrics.uploads_accepted.inc();
        let _ = shared.events.send(Event::UploadAccepted {
            round: r.round,
            client: r.client.clone(),
        });
        let _ = p
            .reply
            .send(ack(r.round, fedlora_protocol::AckStatus::Accepted));
    }
    answer(answers);
}

/// Answers each stored evaluation report: recorded, or the refusal its counting met.
fn answer_evals(
    evals: Vec<(EvalRecord, oneshot::Sender<CoordMsg>)>,
    verdicts: Vec<std::result::Result<(), Refusal>>,
) {
    for ((r, reply), verdict) in evals.into_iter().zip(verdicts) {
        let msg = match verdict {
            Ok(()) => {
                info!(version = r.version, client = %r.client, loss = r.loss, "evaluation recorded");
                CoordMsg::EvalRecorded { version: r.version }
            }
            Err(refusal) => CoordMsg::Refused(refusal),
        };
        let _ = reply.send(msg);
    }
}

fn answer(answers: Vec<(oneshot::Sender<CoordMsg>, CoordMsg)>) {
    for (tx, msg) in answers {
        let _ = tx.send(msg);
    }
}

/// Folds one accepted upload into `round`'s running sum (started here for a new round). A
/// fold that fails leaves the sum incomplete, and the aggregation rebuilds it from disk.
fn fold(sum: &mut Option<RunningSum>, rec: &UploadRecord, a: &Addend, shared: &Shared) {
    let Some(kind) = shared.sum_kind.clone() else {
        return;
    };
    if sum.as_ref().is_none_or(|s| s.round() != rec.round) {
        *sum = Some(RunningSum::new(rec.round, kind));
    }
    if let Some(s) = sum.as_mut() {
        if let Err(e) = s.add(&rec.client, a) {
            warn!(round = rec.round, client = %rec.client, error = %e, "not folded; the round will sum from disk");
        }
    }
}
