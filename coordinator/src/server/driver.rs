//! The clock side: ticks of the round machine and of secure rounds, aggregation with the
//! federation's strategy, commits, and the status snapshot.

use super::*;

/// Keeps `DATA_DIR/status.json` current: written at start and after every event (a burst of
/// events is written once), so `fedlora status` works while this process holds the store.
/// Writes the status snapshot of `store` now (a failure is logged: the snapshot is a convenience
/// for `fedlora status`, never a reason to stop serving).
pub(super) fn write_status_snapshot(store: &crate::store::Store) {
    if let Err(e) =
        crate::status::report(store).and_then(|r| crate::status::write_snapshot(store.dir(), &r))
    {
        warn!(error = %e, "could not write the status snapshot");
    }
}

/// Rewrites the status snapshot after each burst of `events` ([`super::Coordinator::start`]
/// subscribes them, then writes the first snapshot, so no event between the two is missed).
pub(super) async fn snapshot_loop(shared: Arc<Shared>, mut events: broadcast::Receiver<Event>) {
    let mut pause = Duration::from_millis(100);
    loop {
        match events.recv().await {
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
        // coalesce a burst of events into one write, and keep the writes (which read every
        // record: O(clients)) to at most a tenth of one core's time
        tokio::time::sleep(pause).await;
        while events.try_recv().is_ok() {}
        let s = shared.clone();
        let t = std::time::Instant::now();
        let _ = tokio::task::spawn_blocking(move || write_status_snapshot(&s.store)).await;
        pause = (t.elapsed() * 10).max(Duration::from_millis(100));
    }
}

pub(super) async fn tick_loop(shared: Arc<Shared>) {
    let mut interval = tokio::time::interval(Duration::from_millis(shared.config.tick_ms));
    let mut swept = std::time::Instant::now();
    loop {
        interval.tick().await;
        if swept.elapsed() >= Duration::from_secs(60) {
            swept = std::time::Instant::now();
            let s = shared.clone();
            let _ = tokio::task::spawn_blocking(move || s.partial.sweep(now_ms())).await;
        }
        let shared2 = shared.clone();
        // aggregation reads files and does arithmetic: keep it off the async workers
        let r = tokio::task::spawn_blocking(move || tick_once(&shared2)).await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(error = %e, "tick failed"),
            Err(e) => error!(error = %e, "tick panicked"),
        }
    }
}

pub(super) fn secure_tick(shared: &Shared, now: u64) -> Result<()> {
    let outcome = match shared.secure.lock().expect("lock").as_mut() {
        Some(sr) => (sr.round, sr.advance(now)),
        None => return Ok(()),
    };
    let (round, adv) = outcome;
    let failure = match adv {
        Advance::Wait => return Ok(()),
        Advance::Fail(reason) => reason,
        // any failure after unmasking fails the round too: it must never wedge the federation
        Advance::Sum(sum, counted) => match finish_secure(shared, round, sum, &counted, now) {
            Ok(()) => {
                *shared.secure.lock().expect("lock") = None;
                return Ok(());
            }
            Err(e) => e.to_string(),
        },
    };
    *shared.secure.lock().expect("lock") = None;
    warn!(round, reason = %failure, "secure round failed");
    let state = {
        let mut fed = shared.fed.lock().expect("lock");
        fed.fail_round(round, now)?;
        fed.state().clone()
    };
    fail_record(shared, round, failure, &state, now)
}

/// Applies an unmasked sum: needs at least `min_clients` counted clients, a sum that decodes
/// (a positive total weight) and a commit that succeeds.
pub(super) fn finish_secure(
    shared: &Shared,
    round: u64,
    sum: Vec<u64>,
    counted: &std::collections::BTreeSet<String>,
    now: u64,
) -> Result<()> {
    let (codec, seed, uploads, selected, min_clients, staleness) = {
        let fed = shared.fed.lock().expect("lock");
        let fedlora_protocol::Phase::Training(open) = &fed.state().phase else {
            return Err(CoordinatorError::Config(format!(
                "secure round {round} ended, but no round is open"
            )));
        };
        let uploads: BTreeMap<String, UploadMeta> = open
            .uploads
            .iter()
            .filter(|(c, _)| counted.contains(*c))
            .map(|(c, m)| (c.clone(), m.clone()))
            .collect();
        // async cohorts: each counted update's staleness weight (public; the members scaled
        // their updates by it before encoding)
        let staleness = fed.is_async().then(|| {
            uploads
                .iter()
                .map(|(c, m)| (c.clone(), fed.staleness_weight(round, m)))
                .collect::<BTreeMap<String, f64>>()
        });
        (
            fed.config().train.codec.clone(),
            fed.config().seed,
            uploads,
            open.selected.clone(),
            if fed.is_async() {
                fed.config().min_buffer()
            } else {
                fed.config().min_clients
            },
            staleness,
        )
    };
    if counted.len() < min_clients {
        return Err(CoordinatorError::Config(format!(
            "{} masked inputs unmasked, {min_clients} needed",
            counted.len()
        )));
    }
    let Some(modulus) = codec.modulus_bits() else {
        return Err(CoordinatorError::Config(
            "secure rounds need a summable codec (modular or skellam)".into(),
        ));
    };
    let ctx = CodecContext {
        round_seed: codec_seed(seed, round),
    };
    if let Codec::Skellam(p) = &codec {
        let near = p.near_wrap(&sum);
        info!(round, near_wrap = near, "distributed-DP sum unmasked");
    }
    let ms = ModularSum::from_sum(sum, modulus, counted.len());
    let full = shared.full_rank;
    let weight_of = |c: &String| staleness.as_ref().and_then(|w| w.get(c)).copied();
    let counts = fedlora_protocol::rank::RankCounts::new(
        full,
        counted.iter().map(|c| {
            let r = uploads.get(c).and_then(|m| m.rank);
            (
                weight_of(c).unwrap_or(1.0),
                crate::aggregate::rank_of(r, full),
            )
        }),
    );
    let mut delta = crate::aggregate::modular_sum_delta(&codec, &shared.spec, &ctx, &ms, &counts)?;
    // distributed client-level DP (Skellam) divides by the plan's public K whatever the
    // weights: the members' s(τ) ≤ 1 scaled their updates, and a divisor that depended on who
    // took part would be a release the accountant does not cover
    let fixed_divisor = matches!(codec, Codec::Skellam(_));
    if let (Some(w), true, false) = (&staleness, counts.is_uniform(), fixed_divisor) {
        // the decoded mean divides Σ s(τᵢ)·Δᵢ by the count; the staleness-weighted mean
        // divides it by Σ s(τᵢ)
        let total: f64 = counted.iter().filter_map(|c| w.get(c)).sum();
        let scale = (counted.len() as f64 / total) as f32;
        delta.values_mut().iter_mut().for_each(|x| *x *= scale);
    }
    let missing = selected.difference(counted).cloned().collect();
    info!(round, counted = counted.len(), "secure sum unmasked");
    commit(shared, round, delta, &uploads, &missing, now)
}

pub(super) fn tick_once(shared: &Shared) -> Result<()> {
    let now = now_ms();
    secure_tick(shared, now)?;
    // async mode opens the next buffer in the same tick its predecessor commits in (uploads
    // that arrive in between are told to re-send)
    let steps = if shared.fed.lock().expect("lock").is_async() {
        3
    } else {
        1
    };
    for _ in 0..steps {
        if !transition_once(shared, now)? {
            break;
        }
    }
    Ok(())
}

/// Carries out the federation's next transition, if any; whether there was one.
fn transition_once(shared: &Shared, now: u64) -> Result<bool> {
    // the state is copied only when something happened (it lists the round's participants)
    let transition = {
        let mut fed = shared.fed.lock().expect("lock");
        fed.tick(now).map(|t| (t, fed.state().clone()))
    };
    let Some((t, state)) = transition else {
        return Ok(false);
    };
    match t {
        Transition::RoundStarted { round, selected } => {
            let rec = RoundRecord {
                round,
                base_version: state.global_version,
                status: RoundStatus::Open,
                selected: selected.iter().cloned().collect(),
                participants: vec![],
                stragglers: vec![],
                declined: BTreeMap::new(),
                bytes_up: BTreeMap::new(),
                bytes_down: BTreeMap::new(),
                train_loss: None,
                strategy: shared
                    .fed
                    .lock()
                    .expect("lock")
                    .config()
                    .strategy
                    .name()
                    .to_string(),
                started_ms: now,
                ended_ms: None,
                staleness: Vec::new(),
            };
            if let Err(e) = shared.store.put_round(&rec, &state) {
                // async: the buffer (or the cohort) is opened again at the next tick (sync: at
                // its deadline)
                let mut fed = shared.fed.lock().expect("lock");
                fed.retract_cohort(round);
                fed.retract_round(round);
                return Err(e);
            }
            super::poll_gate::store_durable_round(shared, round);
            let (train, timeout) = {
                let fed = shared.fed.lock().expect("lock");
                (fed.config().train.clone(), fed.config().round_timeout_ms)
            };
            // (an async buffer's secure session starts with its cohort, not with the buffer)
            let session = !selected.is_empty() || !shared.fed.lock().expect("lock").is_async();
            if let (Some(params), Some(len), true) = (
                &train.secure,
                train.codec.summed_len(shared.spec.numel()),
                session,
            ) {
                *shared.secure.lock().expect("lock") = Some(SecureRound::new(
                    round,
                    params.clone(),
                    len,
                    selected.clone(),
                    now,
                    timeout,
                ));
            }
            info!(round, participants = selected.len(), "round started");
            let _ = shared.events.send(Event::RoundStarted {
                round,
                participants: selected.len(),
            });
        }
        Transition::Aggregate {
            round,
            uploads,
            missing,
        } => {
            // persist `closed` first, so a restart does not reopen the round to uploads
            shared.store.save_state(&state)?;
            for c in &missing {
                warn!(round, client = %c, "straggler dropped from the round");
            }
            // an aggregation that fails, or a next global that is not finite (`commit` checks
            // it before anything is written), fails the round with its reason, and a fresh
            // round follows
            let fail = |e: CoordinatorError| -> Result<()> {
                error!(round, error = %e, "aggregation failed; failing the round");
                let state = {
                    let mut fed = shared.fed.lock().expect("lock");
                    fed.fail_round(round, now)?;
                    fed.state().clone()
                };
                fail_record(shared, round, e.to_string(), &state, now)
            };
            match aggregate(shared, round, &uploads) {
                Ok(delta) => match commit(shared, round, delta, &uploads, &missing, now) {
                    Err(e @ CoordinatorError::NotFinite(_)) => fail(e)?,
                    other => other?,
                },
                Err(e) => fail(e)?,
            }
        }
        Transition::RoundFailed { round, reason } => {
            warn!(round, %reason, "round failed");
            fail_record(shared, round, reason, &state, now)?;
        }
        Transition::EvaluationStarted { version } => {
            info!(version, "final evaluation started");
        }
        Transition::Finished { success } => {
            shared.store.save_state(&state)?;
            info!(success, "federation finished");
            let _ = shared.events.send(Event::Finished { success });
        }
    }
    Ok(true)
}

pub(super) fn fail_record(
    shared: &Shared,
    round: u64,
    reason: String,
    state: &FederationState,
    now: u64,
) -> Result<()> {
    let mut rec = shared
        .store
        .round(round)?
        .ok_or_else(|| CoordinatorError::Storage(format!("no record for round {round}")))?;
    rec.status = RoundStatus::Failed {
        reason: reason.clone(),
    };
    rec.ended_ms = Some(now);
    shared
        .metrics
        .round_ended("failed", now.saturating_sub(rec.started_ms) as f64 / 1e3);
    rec.bytes_down = take_round(&shared.bytes_down, round);
    // per-round counters of a round that is over are dropped
    take_round(&shared.secure_bytes_up, round);
    shared.store.put_round(&rec, state)?;
    let _ = shared.events.send(Event::RoundFailed { round, reason });
    Ok(())
}

/// Removes and returns `round`'s per-client byte counts from a (round, client) counter.
pub(super) fn take_round(
    counter: &Mutex<BTreeMap<(u64, String), u64>>,
    round: u64,
) -> BTreeMap<String, u64> {
    let mut all = counter.lock().expect("lock");
    let keys: Vec<_> = all.keys().filter(|(r, _)| *r == round).cloned().collect();
    keys.into_iter()
        .filter_map(|k| all.remove(&k).map(|v| (k.1, v)))
        .collect()
}

/// The round's aggregated delta. Strategies that need only the sum take the running sum the
/// committer folded each upload into as it was accepted; when it does not hold exactly these
/// uploads (after a restart) it is rebuilt by folding the durable payloads one at a time.
/// Strategies that need each update read every payload back from disk.
pub(super) fn aggregate(
    shared: &Shared,
    round: u64,
    uploads: &BTreeMap<String, UploadMeta>,
) -> Result<FlatAdapter> {
    // each upload's staleness weight (1 in sync mode), and the codec seed of the round it was
    // encoded in
    let (codec, seed, client_dp, stale) = {
        let fed = shared.fed.lock().expect("lock");
        let train = &fed.config().train;
        let stale: BTreeMap<&str, f64> = uploads
            .iter()
            .map(|(c, m)| (c.as_str(), fed.staleness_weight(round, m)))
            .collect();
        (
            train.codec.clone(),
            fed.config().seed,
            train.client_dp.clone(),
            stale,
        )
    };
    let seed_of = |m: &UploadMeta| m.base_round.map(|r| codec_seed(seed, r));
    let ctx = CodecContext {
        round_seed: codec_seed(seed, round),
    };
    if let Some(plan) = client_dp.as_ref() {
        if plan.central_noise_std().is_none() {
            return Err(CoordinatorError::Config(
                "plaintext client-level DP rounds are central (Gaussian noise)".into(),
            ));
        }
    }
    let Some(kind) = shared.sum_kind.clone() else {
        let mut payloads = Vec::with_capacity(uploads.len());
        for (client, meta) in uploads {
            let bytes = shared.store.upload_payload(round, &meta.digest)?;
            let weight = meta.weight * stale[client.as_str()];
            payloads.push((weight, meta.rank, bytes, seed_of(meta)));
        }
        return crate::aggregate::aggregate_payloads(
            shared.strategy.as_ref(),
            &codec,
            &shared.spec,
            &ctx,
            payloads
                .iter()
                .map(|(weight, rank, b, s)| crate::aggregate::Payload {
                    weight: *weight,
                    rank: *rank,
                    bytes: b.as_slice(),
                    round_seed: *s,
                }),
        );
    };
    let mut held = shared.sum.lock().expect("lock");
    let current = held
        .as_ref()
        .is_some_and(|s| s.round() == round && s.clients().iter().eq(uploads.keys()));
    if !current {
        info!(
            round,
            uploads = uploads.len(),
            "summing the round's uploads from disk"
        );
        let mut sum = crate::running_sum::RunningSum::new(round, kind.clone());
        for (client, meta) in uploads {
            let bytes = shared.store.upload_payload(round, &meta.digest)?;
            let own = CodecContext {
                round_seed: seed_of(meta).unwrap_or(ctx.round_seed),
            };
            let decoded = Codec::decode(&bytes, &shared.spec, Some(&codec), &own)?;
            let rank = crate::aggregate::rank_of(meta.rank, shared.full_rank);
            // as the committer folds it: the addend of the upload's own weight (1 under
            // client-level DP, whatever was claimed), times the staleness weight s(τ) ≤ 1
            let mut a = kind.addend(&codec, &shared.spec, &bytes, decoded, meta.weight, rank)?;
            a.weight *= stale[client.as_str()];
            sum.add(client, &a)?;
        }
        *held = Some(sum);
    }
    let sum = held.take().expect("set above");
    drop(held);
    let mut noise = match client_dp.as_ref().and_then(|p| p.central_noise_std()) {
        // central mode: the coordinator's noise, from the OS CSPRNG
        Some(std) => Some(
            fedlora_dp::GaussianNoise::from_os(std)
                .map_err(|e| CoordinatorError::Config(e.to_string()))?,
        ),
        None => None,
    };
    sum.finish(&codec, &shared.spec, &ctx, shared.full_rank, noise.as_mut())
}

/// Commits `round`: `delta` is the round's aggregated delta, which the federation's strategy
/// turns into the next global adapter; a server optimizer's moments are stored with it before
/// the round commits.
pub(super) fn commit(
    shared: &Shared,
    round: u64,
    delta: FlatAdapter,
    uploads: &BTreeMap<String, UploadMeta>,
    missing: &std::collections::BTreeSet<String>,
    now: u64,
) -> Result<()> {
    let mut opt = shared.opt.lock().expect("lock").clone();
    let new_global = {
        let global = shared.global.lock().expect("lock");
        shared
            .strategy
            .next_global(&mut opt, &global.adapter, &delta)?
    };
    // checked before anything is written: a global every client would refuse is never stored
    check_finite("the next global adapter", &new_global)?;
    let next_version = shared.fed.lock().expect("lock").state().global_version + 1;
    if !opt.m.is_empty() {
        shared.store.put_optimizer_state(next_version, &opt)?;
    }
    let encoded = Codec::DenseF32.encode(new_global.values());
    let mut records: BTreeMap<String, u64> = shared
        .store
        .uploads()?
        .into_iter()
        .filter(|r| r.round == round)
        .map(|r| (r.client, r.wire_bytes))
        .collect();
    for (client, b) in take_round(&shared.secure_bytes_up, round) {
        *records.entry(client).or_default() += b;
    }
    // the weighted mean of the losses the uploads carried (none under DP or masking)
    let with_loss: Vec<(f64, f64)> = uploads
        .values()
        .filter_map(|m| m.train_loss.map(|l| (m.weight, l)))
        .collect();
    let total_w: f64 = with_loss.iter().map(|(w, _)| w).sum();
    let train_loss =
        (total_w > 0.0).then(|| with_loss.iter().map(|(w, l)| w * l).sum::<f64>() / total_w);
    let mut fed = shared.fed.lock().expect("lock");
    let before = fed.clone();
    let version = fed.commit(round, now)?;
    let state = fed.state().clone();
    let mut rec = shared
        .store
        .round(round)?
        .ok_or_else(|| CoordinatorError::Storage(format!("no record for round {round}")))?;
    rec.status = RoundStatus::Committed { version };
    rec.participants = uploads.keys().cloned().collect();
    rec.stragglers = missing
        .iter()
        .filter(|c| !rec.declined.contains_key(*c))
        .cloned()
        .collect();
    rec.bytes_up = records;
    rec.bytes_down = take_round(&shared.bytes_down, round);
    rec.train_loss = train_loss;
    rec.ended_ms = Some(now);
    for m in uploads.values() {
        if let Some(base) = m.base_round {
            let tau = round.saturating_sub(base) as usize;
            if rec.staleness.len() <= tau {
                rec.staleness.resize(tau + 1, 0);
            }
            rec.staleness[tau] += 1;
        }
    }
    if let Err(e) = shared
        .store
        .commit_round(version, &encoded, &rec, &state, now)
    {
        *fed = before;
        return Err(e);
    }
    *shared.global.lock().expect("lock") = Global::new(version, new_global, encoded);
    *shared.opt.lock().expect("lock") = opt;
    shared
        .metrics
        .round_ended("committed", now.saturating_sub(rec.started_ms) as f64 / 1e3);
    shared.metrics.global_version.set(version as i64);
    drop(fed);
    info!(
        round,
        version,
        participants = uploads.len(),
        "round committed"
    );
    let _ = shared.events.send(Event::RoundCommitted { round, version });
    Ok(())
}

/// `Err(NotFinite)` naming `what` and the first offending coordinate when `a` holds a value
/// that is not a finite number (a non-finite aggregate always makes a non-finite global, so
/// checking the global is enough).
fn check_finite(what: &str, a: &FlatAdapter) -> Result<()> {
    match a.values().iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(CoordinatorError::NotFinite(format!(
            "{what} is {} at coordinate {i} (of {}): an upload's values or weights overflowed",
            a.values()[i],
            a.values().len()
        ))),
    }
}
