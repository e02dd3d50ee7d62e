//! What a polling client is told, and the global adapter it is sent: in full, as an f16 delta
//! against its reconstruction, or as its rank slice.

use super::*;

/// The global adapter for `client` as the downlink rule says: `(global_from, payload)`.
pub(super) fn global_payload(
    shared: &Shared,
    global: &Global,
    client: &str,
    held: Option<u64>,
    downlink: Downlink,
) -> (Option<u64>, Vec<u8>) {
    if downlink == Downlink::Full {
        return (None, global.encoded.clone());
    }
    let mut recon = shared.recon.lock().expect("lock");
    if let (Some(h), Some((v, r))) = (held, recon.get(client)) {
        if *v == h {
            if h == global.version {
                return (Some(h), Vec::new());
            }
            if let Some((bytes, next)) = f16_step(&shared.spec, &global.adapter, r) {
                // what the client will hold after applying this delta, exactly
                recon.insert(client.to_string(), (global.version, next));
                return (Some(h), bytes);
            }
            warn!(%client, "the downlink step does not fit in f16; sending the full adapter");
        }
    }
    recon.insert(client.to_string(), (global.version, global.adapter.clone()));
    (None, global.encoded.clone())
}

/// Whether the full global goes by its (cached) digest: the full downlink, and an adapter above
/// [`fedlora_protocol::resumable::INLINE_GLOBAL_MAX`] (what [`by_digest`] decides for it).
fn full_by_digest(global: &Global, downlink: Downlink) -> bool {
    downlink == Downlink::Full
        && global.encoded.len() > fedlora_protocol::resumable::INLINE_GLOBAL_MAX
}

/// A full adapter (not a delta, not a rank slice) above
/// [`fedlora_protocol::resumable::INLINE_GLOBAL_MAX`] goes by its digest: the client fetches it
/// in resumable pieces ([`global_piece`]).
fn by_digest(
    from: Option<u64>,
    rank: Option<u32>,
    payload: Vec<u8>,
) -> (Vec<u8>, Option<fedlora_protocol::resumable::GlobalDigest>) {
    use fedlora_protocol::resumable::{GlobalDigest, INLINE_GLOBAL_MAX};
    if from.is_none() && rank.is_none() && payload.len() > INLINE_GLOBAL_MAX {
        (Vec::new(), Some(GlobalDigest::of(&payload)))
    } else {
        (payload, None)
    }
}

/// A piece of the current global adapter (full, dense f32), or a refusal when `version` is no
/// longer current (the client polls again).
pub(super) fn global_piece(shared: &Shared, version: u64, offset: u64, max_len: u32) -> CoordMsg {
    let global = shared.global.lock().expect("lock");
    if version != global.version {
        return CoordMsg::Refused(Refusal::new(
            RefusalCode::WrongRound,
            format!(
                "global version {version} is gone (now {}); poll again",
                global.version
            ),
        ));
    }
    let start = (offset as usize).min(global.encoded.len());
    let end = start
        .saturating_add(max_len as usize)
        .min(global.encoded.len());
    CoordMsg::GlobalPiece {
        version,
        offset: start as u64,
        bytes: global.encoded[start..end].to_vec(),
    }
}

/// The f16 delta from `held` to `global` and what the client reconstructs from it; `None`
/// when some step is beyond f16's range (|x| > 65504) or the result is not finite.
pub(super) fn f16_step(
    spec: &AdapterSpec,
    global: &FlatAdapter,
    held: &FlatAdapter,
) -> Option<(Vec<u8>, FlatAdapter)> {
    const F16_MAX: f32 = 65504.0;
    let step = global.delta_from(held).ok()?;
    if step
        .values()
        .iter()
        .any(|x| !x.is_finite() || x.abs() > F16_MAX)
    {
        return None;
    }
    let bytes = Codec::F16.encode(step.values());
    let sent = Codec::decode(&bytes, spec, Some(&Codec::F16), &CodecContext::default()).ok()?;
    let mut next = held.clone();
    next.apply_delta(&sent).ok()?;
    next.values()
        .iter()
        .all(|x| x.is_finite())
        .then_some((bytes, next))
}

/// Answers a poll: from the gate, without the federation lock, when the client was told to
/// wait under fingerprints that have not changed since ([`super::poll_gate`]); otherwise from
/// the round machine, and the gate remembers a "wait".
pub(super) fn poll(shared: &Shared, client: &str, held: Option<u64>) -> (CoordMsg, Option<u64>) {
    // read before anything is looked at: a change after this leaves a key that will not match
    let key = super::poll_gate::key_now(shared);
    if shared.gate.still_waiting(client, key) {
        let retry_after_ms = retry_after_ms(shared);
        return (CoordMsg::Task(Task::Wait { retry_after_ms }), None);
    }
    let answer = poll_round(shared, client, held);
    let wait = matches!(answer.0, CoordMsg::Task(Task::Wait { .. }));
    shared.gate.answered(client, key, wait);
    answer
}

/// The longest a poll is held ([`held_poll`]), ms: well inside the clients' request timeout and
/// their connections' keep-alive.
pub(super) const MAX_HOLD_MS: u64 = 20_000;

/// [`poll`] for a client connected to this process: an answer "wait" is held until a
/// fingerprint of its key changes (then the poll is answered again: the task, or a wait held
/// on) or until the client would have polled again anyway (`retry_after_ms`, at most
/// [`MAX_HOLD_MS`]); a wait that ran its hold out tells the client to poll again after the rest
/// of `retry_after_ms`, and at least `poll_interval_ms` ([`super::poll_gate`], "held polls").
pub(super) async fn held_poll(
    shared: &Shared,
    client: &str,
    held: Option<u64>,
) -> (CoordMsg, Option<u64>) {
    if !shared.gate.enabled() {
        return poll(shared, client, held);
    }
    let spacing = retry_after_ms(shared);
    let hold = spacing.min(MAX_HOLD_MS);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(hold);
    loop {
        // registered before the key is read: a change after that read wakes this wait
        let changed = shared.gate.changed().notified();
        let mut changed = std::pin::pin!(changed);
        changed.as_mut().enable();
        let answer = poll(shared, client, held);
        if !matches!(answer.0, CoordMsg::Task(Task::Wait { .. })) {
            return answer;
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            // the rest of the spacing that keeps all clients within `max_polls_per_s` (a hold
            // is at most MAX_HOLD_MS), and at least `poll_interval_ms`
            let retry_after_ms = spacing
                .saturating_sub(hold)
                .max(shared.config.poll_interval_ms);
            return (CoordMsg::Task(Task::Wait { retry_after_ms }), None);
        }
    }
}

/// How long a waiting client should wait: `poll_interval_ms`, or longer so that every connected
/// client (those other front-ends relay included: `live` holds both) polls at most
/// `max_polls_per_s` times a second together.
fn retry_after_ms(shared: &Shared) -> u64 {
    let connected = shared.live.lock().expect("lock").len();
    crate::config::poll_delay_ms(
        shared.config.poll_interval_ms,
        connected,
        shared.config.max_polls_per_s,
    )
}

fn poll_round(shared: &Shared, client: &str, held: Option<u64>) -> (CoordMsg, Option<u64>) {
    let (directive, train, seed, buffered) = {
        let mut fed = shared.fed.lock().expect("lock");
        let mut train = shared.strategy.configure_round(&fed.config().train);
        if fed.is_async() {
            // every device computes its own staleness weight from this (secure cohorts)
            train.staleness = Some(fedlora_protocol::StalenessPlan {
                weight: fed.config().staleness,
                max_staleness: fed.config().max_staleness,
            });
        }
        (fed.poll(client), train, fed.config().seed, fed.is_async())
    };
    let retry_after_ms = retry_after_ms(shared);
    let wait = Task::Wait { retry_after_ms };
    if let Directive::Cohort { round } = directive {
        return (
            CoordMsg::Task(cohort_task(shared, client, round, seed, wait)),
            None,
        );
    }
    let mut secure_shares = None;
    if let (Some(_), Directive::Train { round, .. } | Directive::AlreadyUploaded { round }, false) =
        (&train.secure, &directive, buffered)
    {
        // a secure round: its stages decide; until its state exists, wait
        match secure_stage(shared, client, *round) {
            SecureStage::Wait => return (CoordMsg::Task(wait), None),
            SecureStage::Task(t) => return (CoordMsg::Task(*t), None),
            SecureStage::Input(shares) => secure_shares = Some(shares),
        }
    }
    let global = shared.global.lock().expect("lock");
    let task = match directive {
        Directive::Wait => wait,
        Directive::Train {
            round,
            base_version,
            evaluate,
            deadline_ms,
        } => {
            // offered once its start is stored (its uploads are taken from then on)
            let stored = round
                <= shared
                    .durable_round
                    .load(std::sync::atomic::Ordering::Acquire);
            if base_version != global.version || !stored {
                wait
            } else {
                let rank = shared.max_ranks.lock().expect("lock").get(client).copied();
                // the full global goes by its digest, computed once per version
                let cached = rank.is_none() && full_by_digest(&global, train.downlink);
                let (global_from, payload) = match rank {
                    // a lower-rank client: its slice, in full
                    Some(r) => match fedlora_protocol::rank::slice(&global.adapter, r as usize) {
                        Ok(sliced) => {
                            shared
                                .offered_ranks
                                .lock()
                                .expect("lock")
                                .insert(client.to_string(), (round, r));
                            (None, Codec::DenseF32.encode(sliced.values()))
                        }
                        Err(e) => {
                            error!(%client, error = %e, "cannot slice the global adapter");
                            return (CoordMsg::Task(wait), None);
                        }
                    },
                    None if cached => (None, Vec::new()),
                    None => global_payload(shared, &global, client, held, train.downlink),
                };
                let (payload, global_digest) = if cached {
                    (payload, Some(global.digest))
                } else {
                    by_digest(global_from, rank, payload)
                };
                let plan_signature = match sign_plan(shared, &train) {
                    Ok(s) => s,
                    Err(e) => {
                        error!(%client, error = %e, "cannot sign the client-level DP plan");
                        return (CoordMsg::Task(wait), None);
                    }
                };
                return (
                    CoordMsg::Task(Task::Train(RoundOffer {
                        round,
                        global_version: base_version,
                        spec_hash: shared.spec.hash(),
                        config: train,
                        evaluate,
                        codec_seed: codec_seed(seed, round),
                        global_from,
                        global: payload,
                        secure_shares,
                        rank,
                        // async mode has no round deadline: an update is taken until it is
                        // max_staleness versions old
                        time_left_ms: (!buffered).then(|| deadline_ms.saturating_sub(now_ms())),
                        global_digest,
                        plan_signature,
                    })),
                    Some(round),
                );
            }
        }
        Directive::Evaluate { version } if version == global.version => {
            let (global_from, payload, global_digest) = if full_by_digest(&global, train.downlink) {
                (None, Vec::new(), Some(global.digest))
            } else {
                let (from, payload) = global_payload(shared, &global, client, held, train.downlink);
                let (payload, digest) = by_digest(from, None, payload);
                (from, payload, digest)
            };
            Task::Evaluate {
                version,
                global_from,
                global: payload,
                global_digest,
            }
        }
        Directive::Evaluate { .. } => wait,
        Directive::AlreadyUploaded { round } => Task::AlreadyUploaded {
            round,
            retry_after_ms,
        },
        Directive::Finished { version } => Task::Finished { version },
        Directive::Cohort { .. } => wait,
    };
    (CoordMsg::Task(task), None)
}

/// A secure async cohort member's task: the session's stage for it, or, in the input stage,
/// its shares with the staleness weight and codec seed its masked update takes.
fn cohort_task(shared: &Shared, client: &str, round: u64, seed: u64, wait: Task) -> Task {
    let shares = match secure_stage(shared, client, round) {
        SecureStage::Wait => return wait,
        SecureStage::Task(t) => return *t,
        SecureStage::Input(shares) => shares,
    };
    let Some((trained_round, staleness_weight)) =
        shared.fed.lock().expect("lock").cohort_member(client)
    else {
        return wait;
    };
    Task::SecAgg {
        round,
        task: Box::new(fedlora_protocol::SecAggTask::MaskInput {
            shares,
            trained_round,
            staleness_weight,
            codec_seed: codec_seed(seed, round),
        }),
    }
}

/// Where `client` stands in the open secure session of `round`.
enum SecureStage {
    /// No session for `round` yet, or nothing to do now.
    Wait,
    /// A stage's task (keys, shares, consistency, unmask).
    Task(Box<Task>),
    /// The input stage: its shares, to mask the update with.
    Input(Vec<fedlora_protocol::secagg::EncryptedShare>),
}

/// The session's stage for `client` (shared by synchronous rounds and async cohorts).
fn secure_stage(shared: &Shared, client: &str, round: u64) -> SecureStage {
    let sec = shared.secure.lock().expect("lock");
    let Some(sr) = sec.as_ref().filter(|s| s.round == round) else {
        return SecureStage::Wait;
    };
    let certs = shared.certs.lock().expect("lock");
    if let Some(task) = sr.task(client, &certs) {
        return SecureStage::Task(Box::new(Task::SecAgg {
            round,
            task: Box::new(task),
        }));
    }
    match sr.wants_input(client) {
        Some(shares) => SecureStage::Input(shares),
        None => SecureStage::Wait,
    }
}

/// The coordinator's signature of the round's client-level DP plan (`None` without one).
fn sign_plan(
    shared: &Shared,
    train: &fedlora_protocol::TrainConfig,
) -> std::result::Result<Option<fedlora_protocol::plan_signature::PlanSignature>, String> {
    let Some(plan) = &train.client_dp else {
        return Ok(None);
    };
    let signer = shared
        .plan_signer
        .as_ref()
        .ok_or("no signing key loaded for the plan")?;
    fedlora_protocol::plan_signature::sign(signer, plan, &train.codec)
        .map(Some)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlora_protocol::TensorSpec;

    fn spec() -> AdapterSpec {
        AdapterSpec::new(vec![TensorSpec {
            name: "a".into(),
            shape: vec![2, 2],
        }])
        .unwrap()
    }

    #[test]
    fn a_downlink_step_beyond_f16_falls_back_instead_of_panicking() {
        let held = FlatAdapter::new(spec(), vec![0.0; 4]).unwrap();
        let near = FlatAdapter::new(spec(), vec![1.0, -2.0, 0.5, 3.0]).unwrap();
        let (bytes, next) = f16_step(&spec(), &near, &held).expect("fits in f16");
        assert!(!bytes.is_empty());
        assert_eq!(next.values(), near.values());
        // a step above 65504 (f16's largest finite value) has no f16 encoding
        let far = FlatAdapter::new(spec(), vec![1e6, 0.0, 0.0, 0.0]).unwrap();
        assert!(f16_step(&spec(), &far, &held).is_none());
    }
}
