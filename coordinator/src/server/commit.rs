//! Group commit of plain uploads and evaluation reports: one thread takes every one that is
//! waiting, makes the batch durable with one sync of the payload files and one sled flush
//! ([`Store::record_batch`]), then counts,
//! folds and acknowledges each. Acknowledgements per second scale with the batch, not with the latency
//! of a flush; the crash-safety argument is in [`crate::store`]'s docs.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Weak;

use tokio::sync::oneshot;

use super::*;
use crate::running_sum::{Addend, RunningSum};

/// Uploads one flush commits at most.
pub(super) const MAX_BATCH: usize = 4096;

/// What waits for the committer.
pub(super) enum Pending {
    /// An upload whose payload file is written.
    Upload(PendingUpload),
    /// An evaluation report.
    Eval {
        record: EvalRecord,
        reply: oneshot::Sender<CoordMsg>,
    },
}

/// An upload whose payload file is written (durable at its batch's sync), waiting for its
/// record.
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

/// What the first check of an upload says (under the federation lock, before the flush).
fn first_check(fed: &Federation, shared: &Shared, p: &PendingUpload) -> Option<CoordMsg> {
    let r = &p.record;
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
        return Some(CoordMsg::Refused(Refusal::new(
            code,
            format!("round {} is not stored yet; retry", r.round),
        )));
    }
    recheck(fed, p)
}

/// `None` when the round machine takes `p` now, else its answer: the check an upload passes
/// before its batch is flushed, and again, under the lock it is counted under, after.
fn recheck(fed: &Federation, p: &PendingUpload) -> Option<CoordMsg> {
    let r = &p.record;
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
            Some(CoordMsg::Refused(Refusal::new(
                RefusalCode::RetryLater,
                format!(
                    "buffer {} closed while the upload was stored; re-send",
                    r.round
                ),
            )))
        }
        Ok(UploadVerdict::New) => None,
        Ok(UploadVerdict::AlreadyAccepted) => {
            Some(ack(r.round, fedlora_protocol::AckStatus::AlreadyAccepted))
        }
        Err(refusal) => Some(CoordMsg::Refused(refusal)),
    }
}

/// A second upload of one client in a batch, answered after the batch as the first one ends.
struct Repeat {
    client: String,
    /// Byte-identical to the first (else it is refused as a different upload).
    same: bool,
    round: u64,
    reply: oneshot::Sender<CoordMsg>,
}

/// Checks, records (one flush), counts, folds and answers one batch.
///
/// The federation lock is held twice, briefly, and **not across the flush**: for the first
/// check of every upload and report, and, after the flush, for counting them. Between the two
/// the round can move (a deadline closes it, a client declines); so each upload is checked
/// again under the lock it is counted under, and only one that is counted is acknowledged. One
/// that the second check refuses (its round closed while it was flushed) is answered with that
/// refusal; its record is durable but counts nowhere (the round's outcome lists its
/// participants; see [`crate::store`]'s docs for a crash in between). Reports are checked, stored,
/// and recorded after their flush the same way. The committer is the only thread that counts
/// uploads and reports, so nothing is counted twice meanwhile.
fn commit_batch(shared: &Shared, batch: Vec<Pending>) {
    let mut accepted: Vec<PendingUpload> = Vec::with_capacity(batch.len());
    let mut evals: Vec<(EvalRecord, oneshot::Sender<CoordMsg>)> = Vec::new();
    let mut repeats: Vec<Repeat> = Vec::new();
    {
        let fed = shared.fed.lock().expect("lock");
        let mut batch_evals = std::collections::BTreeSet::new();
        // each accepted upload's place in `accepted`, by client (a batch holds up to MAX_BATCH)
        let mut first_of: HashMap<String, usize> = HashMap::new();
        for p in batch {
            let p = match p {
                Pending::Upload(p) => p,
                Pending::Eval { record, reply } => {
                    // checked now, counted once stored (below); a second report of the batch
                    // is refused here
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
            // a second upload of one client in the same batch: the first one decides
            if let Some(first) = first_of.get(&p.record.client).map(|&i| &accepted[i]) {
                repeats.push(Repeat {
                    client: p.record.client.clone(),
                    same: first.record.meta.digest == p.record.meta.digest,
                    round: p.record.round,
                    reply: p.reply,
                });
                continue;
            }
            match first_check(&fed, shared, &p) {
                None => {
                    first_of.insert(p.record.client.clone(), accepted.len());
                    accepted.push(p);
                }
                Some(answer) => {
                    let _ = p.reply.send(answer);
                }
            }
        }
    }
    if accepted.is_empty() && evals.is_empty() {
        answer_repeats(repeats, &HashMap::new());
        return;
    }
    if !accepted.is_empty() {
        crate::faults::crash_point("commit-before-flush");
    }
    let records: Vec<UploadRecord> = accepted.iter().map(|p| p.record.clone()).collect();
    let eval_records: Vec<EvalRecord> = evals.iter().map(|(r, _)| r.clone()).collect();
    #[cfg(test)]
    tests::between_check_and_flush(shared);
    if let Err(e) = shared.store.record_batch(&records, &eval_records) {
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
        for r in repeats {
            let _ = r.reply.send(retry());
        }
        return;
    }
    if !accepted.is_empty() {
        crate::faults::crash_point("commit-after-flush");
    }
    // counted under the lock, each checked again under it
    let mut fed = shared.fed.lock().expect("lock");
    let mut counted: Vec<PendingUpload> = Vec::with_capacity(accepted.len());
    // each upload's end (`None`: counted), for the repeats of the batch
    let mut outcomes: HashMap<String, Option<CoordMsg>> = HashMap::new();
    for mut p in accepted {
        let refused = recheck(&fed, &p).or_else(|| {
            fed.accept_upload(&p.record.client, p.record.round, p.record.meta.clone())
                .err()
                .map(CoordMsg::Refused)
        });
        match refused {
            None => {
                // the staleness weight s(τ) multiplies the upload's weight in the sum
                let s = fed.staleness_weight(p.record.round, &p.record.meta);
                if let Some(a) = p.addend.as_mut() {
                    a.weight *= s;
                }
                outcomes.insert(p.record.client.clone(), None);
                counted.push(p);
            }
            Some(answer) => {
                warn!(
                    round = p.record.round,
                    client = %p.record.client,
                    "an upload stored while its round moved is not counted"
                );
                outcomes.insert(p.record.client.clone(), Some(answer.clone()));
                let _ = p.reply.send(answer);
            }
        }
    }
    let eval_verdicts: Vec<_> = evals
        .iter()
        .map(|(r, _)| fed.record_eval(&r.client, r.version))
        .collect();
    // the running sum is taken before the federation lock is let go: an aggregation (which
    // closes the round under the federation lock, then reads the sum) waits for these folds
    if counted.iter().any(|p| p.addend.is_some()) {
        let mut sum = shared.sum.lock().expect("lock");
        drop(fed);
        for p in &counted {
            if let Some(a) = &p.addend {
                fold(&mut sum, &p.record, a, shared);
            }
        }
    } else {
        drop(fed);
    }
    answer_evals(evals, eval_verdicts);
    for p in counted {
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
    answer_repeats(repeats, &outcomes);
}

/// Answers the repeats of a batch's uploads: a byte-identical one as its first ended (counted:
/// `AlreadyAccepted`; not: the same answer), a different one as a duplicate.
fn answer_repeats(repeats: Vec<Repeat>, outcomes: &HashMap<String, Option<CoordMsg>>) {
    for r in repeats {
        let first = outcomes.get(&r.client);
        let msg = match first {
            _ if !r.same => CoordMsg::Refused(Refusal::new(
                RefusalCode::DuplicateUpload,
                format!(
                    "client {} already uploaded a different delta for round {}",
                    r.client, r.round
                ),
            )),
            Some(None) => ack(r.round, fedlora_protocol::AckStatus::AlreadyAccepted),
            Some(Some(answer)) => answer.clone(),
            // (a repeat is only ever of an upload that passed its first check)
            None => CoordMsg::Refused(Refusal::new(
                RefusalCode::RetryLater,
                "its first copy in the same batch was not stored; retry",
            )),
        };
        let _ = r.reply.send(msg);
    }
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

#[cfg(test)]
pub(super) mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};

    use fedlora_protocol::Phase;

    use super::*;

    type Hook = Arc<dyn Fn(&Shared) + Send + Sync>;

    /// Hooks run by the committer of one coordinator (by its `Shared`'s address) between the
    /// first check of a batch and its flush (tests run side by side: one hook each).
    static HOOKS: Mutex<Vec<(usize, Hook)>> = Mutex::new(Vec::new());

    pub(in super::super) fn between_check_and_flush(shared: &Shared) {
        let at = shared as *const Shared as usize;
        let hook = HOOKS
            .lock()
            .unwrap()
            .iter()
            .find(|(a, _)| *a == at)
            .map(|(_, h)| h.clone());
        if let Some(hook) = hook {
            hook(shared);
        }
    }

    /// Locks the federation within a second (the driver's tick holds it for moments), or
    /// `None`: someone holds it all along.
    fn lock_soon(shared: &Shared) -> Option<super::super::watched::WatchedGuard<'_, Federation>> {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(1) {
            if let Some(g) = shared.fed.try_lock() {
                return Some(g);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// A coordinator whose round 1 (clients `c1` and `c2`: it stays open after `c1` uploads)
    /// is open and stored.
    async fn open_round(dir: &std::path::Path) -> crate::Coordinator {
        let certs = dir.join("certs");
        crate::certs::init_certs(&certs, 1, &crate::certs::default_server_names()).unwrap();
        let mut config = crate::config::CoordinatorConfig::new(dir.join("data"), &certs);
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.federation = fedlora_protocol::FederationConfig {
            rounds: 1,
            clients_per_round: 2,
            min_clients: 2,
            round_timeout_ms: 60_000,
            ..Default::default()
        };
        let spec = AdapterSpec::new(vec![fedlora_protocol::TensorSpec {
            name: "a".into(),
            shape: vec![2, 2],
        }])
        .unwrap();
        let coord = crate::Coordinator::start(config, FlatAdapter::zeros(spec))
            .await
            .unwrap();
        {
            let mut fed = coord.shared.fed.lock().unwrap();
            fed.connect("c1");
            fed.connect("c2");
        }
        let t0 = std::time::Instant::now();
        while coord.shared.durable_round.load(Ordering::Acquire) < 1 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "round 1 never opened"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        coord
    }

    /// `client`'s upload of `payload` for round 1, its file written, and where its answer goes.
    fn pending(
        shared: &Shared,
        client: &str,
        payload: &[u8],
    ) -> (Pending, oneshot::Receiver<CoordMsg>) {
        let digest: [u8; 32] = sha2::Sha256::digest(payload).into();
        shared
            .store
            .write_upload_payload(1, &digest, payload)
            .unwrap();
        let (tx, rx) = oneshot::channel();
        let record = UploadRecord {
            round: 1,
            client: client.into(),
            meta: fedlora_protocol::UploadMeta {
                digest,
                weight: 1.0,
                bytes: payload.len() as u64,
                train_loss: None,
                rank: None,
                base_round: None,
            },
            wire_bytes: payload.len() as u64,
            accepted_ms: 0,
        };
        let p = Pending::Upload(PendingUpload {
            record,
            spec_hash: shared.spec.hash(),
            addend: None,
            reply: tx,
        });
        (p, rx)
    }

    /// Copies of one client's upload in one batch: the first is counted, a byte-identical
    /// repeat is answered as its first ended, a different one is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn repeats_in_one_batch_are_answered_as_their_first_ended() {
        let dir = tempfile::tempdir().unwrap();
        let coord = open_round(dir.path()).await;
        let shared = coord.shared.clone();
        let (a, ra) = pending(&shared, "c1", b"first");
        let (b, rb) = pending(&shared, "c1", b"first");
        let (c, rc) = pending(&shared, "c1", b"other");
        let s = shared.clone();
        tokio::task::spawn_blocking(move || commit_batch(&s, vec![a, b, c]))
            .await
            .unwrap();
        let status = |m: CoordMsg| match m {
            CoordMsg::Ack { status, .. } => Ok(status),
            CoordMsg::Refused(r) => Err(r.code),
            other => panic!("{other:?}"),
        };
        use fedlora_protocol::AckStatus;
        assert_eq!(status(ra.await.unwrap()), Ok(AckStatus::Accepted));
        assert_eq!(status(rb.await.unwrap()), Ok(AckStatus::AlreadyAccepted));
        assert_eq!(status(rc.await.unwrap()), Err(RefusalCode::DuplicateUpload));
        coord.shutdown().await;
    }

    /// `c1`'s upload for round 1 through the committer, with `hook` between its first check and
    /// its flush: the answer.
    async fn upload_with(shared: &Arc<Shared>, hook: Hook) -> CoordMsg {
        let at = Arc::as_ptr(shared) as usize;
        HOOKS.lock().unwrap().push((at, hook));
        let (p, rx) = pending(shared, "c1", b"an upload");
        shared.commits.lock().unwrap().send(p).unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .expect("the committer never answered")
            .unwrap();
        HOOKS.lock().unwrap().retain(|(a, _)| *a != at);
        answer
    }

    /// Polls, downloads and the preparation of uploads take the federation lock: a batch's
    /// flush (an fsync) must not hold it. Before, it was held from the first check to the
    /// counting, and every other upload's preparation queued behind each flush (batches of
    /// about one upload, 650 to 1,200 acknowledgements a second at 4,000 clients).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_is_flushed_without_the_federation_lock() {
        let dir = tempfile::tempdir().unwrap();
        let coord = open_round(dir.path()).await;
        let free = Arc::new(Mutex::new(None));
        let seen = free.clone();
        let answer = upload_with(
            &coord.shared,
            Arc::new(move |shared| {
                *seen.lock().unwrap() = Some(lock_soon(shared).is_some());
            }),
        )
        .await;
        assert_eq!(*free.lock().unwrap(), Some(true), "the flush held the lock");
        assert!(
            matches!(
                answer,
                CoordMsg::Ack {
                    round: 1,
                    status: fedlora_protocol::AckStatus::Accepted
                }
            ),
            "{answer:?}"
        );
        let fed = coord.shared.fed.lock().unwrap();
        let Phase::Training(open) = &fed.state().phase else {
            panic!("{:?}", fed.state().phase)
        };
        assert!(open.uploads.contains_key("c1"), "acknowledged, so counted");
        drop(fed);
        coord.shutdown().await;
    }

    /// The round can move while a batch is flushed: an upload whose round failed meanwhile is
    /// refused, not acknowledged, and counted nowhere.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upload_whose_round_ends_during_its_flush_is_refused_and_not_counted() {
        let dir = tempfile::tempdir().unwrap();
        let coord = open_round(dir.path()).await;
        let answer = upload_with(
            &coord.shared,
            Arc::new(|shared| {
                if let Some(mut fed) = lock_soon(shared) {
                    fed.fail_round(1, now_ms()).unwrap();
                }
            }),
        )
        .await;
        assert!(
            matches!(&answer, CoordMsg::Refused(r) if r.code == RefusalCode::WrongRound),
            "{answer:?}"
        );
        let fed = coord.shared.fed.lock().unwrap();
        if let Phase::Training(open) = &fed.state().phase {
            assert!(
                !open.uploads.contains_key("c1"),
                "counted after its round failed"
            );
        }
        assert!(
            !fed.state().contributed.contains_key("c1"),
            "{:?}",
            fed.state()
        );
        drop(fed);
        coord.shutdown().await;
    }
}
