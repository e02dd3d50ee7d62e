//! One sweep point in **simulated** wall time: devices with their own compute speed,
//! availability windows and transfer times ([`crate::fleet`]) under a [`Schedule`]: synchronous
//! rounds (optionally over-selected) or buffered asynchronous aggregation (FedBuff).
//!
//! An event queue orders what happens; nothing sleeps, so a day of a 1,000-device fleet runs in
//! the time its training takes. The decisions are the deployment's: the sans-IO
//! [`Federation`] samples (sync) or offers work and buffers (async), checks every upload and
//! closes rounds; devices approve DP spending with the SDK's [`decide_round`], train with
//! [`local_update`] and encode with [`encode_update`]; versions are aggregated with the
//! coordinator's [`aggregate_payloads`] (async: each update weighted by its staleness weight and
//! decoded with its own round's codec seed, as the coordinator does).
//!
//! - **Sync:** at the round's start the online devices are the connected ones; the machine
//!   samples `⌈o·K⌉` of them (o = over-selection). A sampled device whose work (download,
//!   training, upload) does not fit in its availability window drops out; the round ends when
//!   every remaining one has uploaded (o = 1) or when the first K have (o > 1), or at
//!   `round_timeout_s` if a dropout left it short.
//! - **Async:** every device asks for work when it comes online and right after each upload;
//!   a device told to wait asks again after `poll_s`; work that would not fit in its window is
//!   declined. An update arrives when its work is done and is accepted into the open buffer
//!   unless too stale.
//!
//! Training is deterministic per (device, round): an in-flight update is computed when the
//! first one is needed, together with every other in flight (in parallel on the pool), so
//! results do not depend on the number of threads.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;
use std::time::Instant;

use fedlora_client::privacy::{decide_round, PrivacyState, RoundDecision};
use fedlora_coordinator::aggregate::{aggregate_payloads, Payload};
use fedlora_protocol::secagg::crypto::P256Verifier;
use fedlora_protocol::strategy::OptimizerState;
use fedlora_protocol::{
    codec_seed, CodecContext, DeclineReason, Directive, ErrorFeedback, Federation, FlatAdapter,
    Mode, Phase, Transition, UploadMeta, UploadVerdict,
};
use fedlora_train::dp_sgd::DpSgdConfig;
use fedlora_train::learner::{encode_update, local_update, ClientSeeds};
use fedlora_train::train::TrainOutcome;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::SimError;
use crate::fleet::Fleet;
use crate::results::{RoundRow, RunColumns, RunOutput, RunSummary};
use crate::schedule::Schedule;
use crate::setup::{client_id, client_seeds, RunHooks};
use crate::sweep::{Point, SweepConfig};
use crate::task::Population;

/// One device's state across the run.
struct Device {
    id: String,
    seeds: ClientSeeds,
    privacy: Option<PrivacyState>,
    residual: Option<ErrorFeedback>,
    eps: Option<f64>,
    dp_steps: u64,
    /// Its ECDSA P-256 key, in runs with secure cohorts.
    signer: Option<fedlora_protocol::secagg::crypto::EcdsaP256Signer>,
}

/// Work a device started: the round it trained in and on which version.
struct Job {
    round: u64,
    version: u64,
    dp: Option<DpSgdConfig>,
    residual: Option<ErrorFeedback>,
}

/// A trained and encoded update.
struct Done {
    out: TrainOutcome,
    payload: Vec<u8>,
    residual: Option<ErrorFeedback>,
}

/// What every run of the point shares.
struct Env<'a> {
    sweep: &'a SweepConfig,
    point: &'a Point,
    pop: &'a Population,
    pool: &'a rayon::ThreadPool,
    fleet: Fleet,
    fed: Federation,
    strategy: Box<dyn fedlora_protocol::strategy::Strategy>,
    train: fedlora_protocol::TrainConfig,
    devices: Vec<Device>,
    index: BTreeMap<String, usize>,
    cols: RunColumns,
    rows: Vec<RoundRow>,
    global: FlatAdapter,
    opt: OptimizerState,
    hooks: RunHooks,
    /// Bytes of one offer (the dense adapter) and of one upload, for transfer times.
    down_bytes: u64,
    up_bytes: u64,
    /// Every device's key, for secure cohorts' roster checks.
    verifier: P256Verifier,
}

/// Runs `point` (which has a schedule) of `sweep` (which has a fleet) on `pop`.
pub fn run(
    sweep: &SweepConfig,
    point: &Point,
    pop: &Population,
    pool: &rayon::ThreadPool,
    hooks: RunHooks,
    t0: Instant,
    mut on_round: impl FnMut(u64),
) -> Result<(RunOutput, FlatAdapter), SimError> {
    let schedule = point
        .schedule
        .clone()
        .ok_or_else(|| SimError::Config("a run in simulated time needs a schedule".into()))?;
    let fleet_cfg = sweep
        .fleet
        .clone()
        .ok_or_else(|| SimError::Config("a run in simulated time needs [fleet]".into()))?;
    let n = pop.learners.len();
    let spec = pop.initial.spec().clone();
    let mut fcfg = crate::setup::federation_config(sweep, point, n, spec.numel())?;
    if fcfg.train.client_dp.is_some() {
        return Err(SimError::Config(
            "runs in simulated time support example-level DP, not client-level DP yet".into(),
        ));
    }
    if fcfg.train.secure.is_some() && !schedule.is_async() {
        return Err(SimError::Config(
            "runs in simulated time run secure aggregation in async cohorts only (sync secure \
             rounds run in-process, without a schedule)"
                .into(),
        ));
    }
    let k = point.clients_per_round;
    let timeout_ms = (fleet_cfg.round_timeout_s * 1e3) as u64;
    fcfg.round_timeout_ms = timeout_ms;
    if schedule.is_async() {
        fcfg.mode = Mode::Async;
        fcfg.buffer = schedule.buffer.unwrap_or(k);
        fcfg.min_buffer = 0;
        fcfg.staleness = schedule
            .staleness
            .as_deref()
            .unwrap_or("poly:0.5")
            .parse()?;
        fcfg.concurrency = schedule.concurrency.unwrap_or(0);
        if let Some(p) = sweep.train.dp_participations {
            // each device's participation bound: its DP plan covers P runs, not every version
            if let Some(dp) = fcfg.train.dp.as_mut() {
                dp.planned_rounds = p;
            }
        }
        if fcfg.train.secure.is_some() {
            // cohorts of up to the buffer, planned as the coordinator plans them
            fcfg.train.secure = Some(crate::timed_cohort::params(&fcfg)?);
        }
    } else {
        // (a hair below, so 10 × 1.1 samples 11, not 12)
        fcfg.clients_per_round = ((k as f64) * schedule.over_selection - 1e-9).ceil() as usize;
        fcfg.min_clients = 1;
        fcfg.start_grace_ms = 0;
        fcfg.wait_for_clients = 0;
    }
    fcfg.validate()?;
    let strategy = fcfg.strategy.build();
    let train = strategy.configure_round(&fcfg.train);
    let target = crate::setup::privacy_target(sweep, point);
    let devices = (0..n)
        .map(|i| -> Result<Device, SimError> {
            Ok(Device {
                id: client_id(i),
                seeds: client_seeds(point.seed, i),
                privacy: target.map(PrivacyState::in_memory).transpose()?,
                residual: None,
                eps: None,
                dp_steps: 0,
                signer: match fcfg.train.secure {
                    Some(_) => Some(crate::setup::new_signer()?),
                    None => None,
                },
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let verifier = P256Verifier(
        devices
            .iter()
            .filter_map(|d| d.signer.as_ref().map(|s| (d.id.clone(), s.public_key())))
            .collect(),
    );
    let index = devices
        .iter()
        .enumerate()
        .map(|(i, d)| (d.id.clone(), i))
        .collect();
    let zeros = vec![0.0f32; spec.numel()];
    let mut rng = client_seeds(point.seed, 0).codec_rng(0)?;
    let (probe, _) = train
        .codec
        .encode_with(&zeros, &CodecContext::default(), 1, &mut rng);
    let cols = RunColumns::new(sweep, point, "simulated-time");
    let mut env = Env {
        sweep,
        point,
        pop,
        pool,
        fleet: crate::fleet::Fleet::new(fleet_cfg, n, point.seed),
        fed: Federation::new(fcfg, spec.hash(), 0)?,
        strategy,
        train,
        devices,
        index,
        cols,
        rows: Vec::new(),
        global: pop.initial.clone(),
        opt: OptimizerState::default(),
        hooks,
        down_bytes: 4 * spec.numel() as u64 + 64,
        up_bytes: probe.len() as u64 + 64,
        verifier,
    };
    let mut row0 = RoundRow::new(&env.cols, 0);
    row0.status = "initial".into();
    row0.sim_seconds = Some(0.0);
    evaluate(pop, &env.global, &mut row0)?;
    env.rows.push(row0);
    let startup_s = t0.elapsed().as_secs_f64() - env.rows[0].eval_s;
    if schedule.is_async() {
        run_async(&mut env, &mut on_round)?;
    } else {
        run_sync(&mut env, &schedule, &mut on_round)?;
    }
    // the last state is always evaluated
    if let Some(last) = env.rows.last_mut() {
        if last.loss.is_none() {
            evaluate(pop, &env.global, last)?;
        }
    }
    let summary =
        RunSummary::from_rows(&env.cols, &env.rows, startup_s, pool.current_num_threads());
    Ok((
        RunOutput {
            rows: env.rows,
            summary,
        },
        env.global,
    ))
}

impl Env<'_> {
    fn max_sim_s(&self) -> f64 {
        match self.fleet.config().max_sim_s {
            m if m > 0.0 => m,
            _ => f64::INFINITY,
        }
    }

    fn done(&self) -> bool {
        matches!(
            self.fed.state().phase,
            Phase::Evaluating { .. } | Phase::Finished { .. }
        )
    }

    /// Device `i` is offered `round`: its ledger decides (and spends) before any work.
    fn approve(&mut self, i: usize, round: u64) -> Result<Result<Job, DeclineReason>, SimError> {
        let examples = self.pop.learners[i].train_examples();
        let d = &mut self.devices[i];
        match decide_round(
            d.privacy.as_mut(),
            &self.fed.config().train,
            examples,
            round,
        )? {
            RoundDecision::Train { mut dp, eps } => {
                if let Some(x) = dp.as_mut() {
                    self.hooks.apply(i, x);
                }
                if eps.is_some() {
                    d.eps = eps;
                    d.dp_steps += u64::from(self.train.local_steps);
                }
                Ok(Ok(Job {
                    round,
                    version: self.fed.state().global_version,
                    dp,
                    residual: d.residual.take(),
                }))
            }
            RoundDecision::Decline(reason) => Ok(Err(reason)),
        }
    }

    /// Trains and encodes `jobs` in parallel, each on the global of its version.
    fn train(
        &self,
        jobs: Vec<(usize, Job)>,
        globals: &BTreeMap<u64, Arc<FlatAdapter>>,
    ) -> Result<Vec<(usize, Job, Done)>, SimError> {
        let spec = self.global.spec();
        let seed = self.fed.config().seed;
        self.pool.install(|| {
            jobs.into_par_iter()
                .map(|(i, mut job)| -> Result<(usize, Job, Done), SimError> {
                    let global = globals.get(&job.version).ok_or_else(|| {
                        SimError::Config(format!("version {} is not kept", job.version))
                    })?;
                    let d = &self.devices[i];
                    let out = local_update(
                        self.pop.learners[i].as_ref(),
                        global,
                        &self.train,
                        job.dp.as_ref(),
                        &d.seeds,
                        job.round,
                    )?;
                    let ctx = CodecContext {
                        round_seed: codec_seed(seed, job.round),
                    };
                    let mut rng = d.seeds.codec_rng(job.round)?;
                    let mut residual = job.residual.take();
                    let enc = encode_update(
                        &self.train.codec,
                        spec,
                        &out.delta,
                        &ctx,
                        1,
                        &mut rng,
                        &mut residual,
                        self.train.update_clip(),
                    )?;
                    Ok((
                        i,
                        job,
                        Done {
                            out,
                            payload: enc.bytes,
                            residual,
                        },
                    ))
                })
                .collect()
        })
    }

    /// Hands `payload` (trained in `trained`) to the round machine as the coordinator does.
    /// `Ok(false)`: refused as too stale.
    fn submit(&mut self, i: usize, trained: u64, payload: &[u8]) -> Result<bool, SimError> {
        let id = self.devices[i].id.clone();
        let spec_hash = self.global.spec().hash();
        let digest: [u8; 32] = Sha256::digest(payload).into();
        let verdict = match self
            .fed
            .check_upload(&id, trained, &spec_hash, &digest, 1.0)
        {
            Ok(v) => v,
            Err(r) if r.code == fedlora_protocol::RefusalCode::TooStale => return Ok(false),
            Err(r) => return Err(SimError::Config(format!("{id}'s upload refused: {r}"))),
        };
        if verdict == UploadVerdict::New {
            let buffered = self.fed.is_async();
            let meta = UploadMeta {
                digest,
                weight: 1.0,
                bytes: payload.len() as u64,
                train_loss: None,
                rank: None,
                base_round: buffered.then_some(trained),
            };
            let round = self.fed.upload_round(trained);
            self.fed
                .accept_upload(&id, round, meta)
                .map_err(|r| SimError::Config(r.to_string()))?;
        }
        Ok(true)
    }

    /// Aggregates `uploads` of `round` (payloads by client, with the round each trained in),
    /// commits the next version and records its row.
    fn commit(
        &mut self,
        round: u64,
        uploads: &BTreeMap<String, UploadMeta>,
        payloads: &BTreeMap<String, Vec<u8>>,
        mut row: RoundRow,
        now_ms: u64,
        on_round: &mut dyn FnMut(u64),
    ) -> Result<(), SimError> {
        let tw = Instant::now();
        let seed = self.fed.config().seed;
        let ctx = CodecContext {
            round_seed: codec_seed(seed, round),
        };
        let fed = &self.fed;
        let delta = aggregate_payloads(
            self.strategy.as_ref(),
            &self.train.codec,
            self.global.spec(),
            &ctx,
            uploads.iter().map(|(id, m)| Payload {
                weight: m.weight * fed.staleness_weight(round, m),
                rank: m.rank,
                bytes: payloads[id].as_slice(),
                round_seed: m.base_round.map(|r| codec_seed(seed, r)),
            }),
        )?;
        row.wall_s += tw.elapsed().as_secs_f64();
        self.commit_delta(round, delta, uploads, row, now_ms, on_round)
    }

    /// Commits `round` with its aggregated `delta` (the server step of the strategy, then the
    /// round machine's commit) and records its row.
    fn commit_delta(
        &mut self,
        round: u64,
        delta: FlatAdapter,
        uploads: &BTreeMap<String, UploadMeta>,
        mut row: RoundRow,
        now_ms: u64,
        on_round: &mut dyn FnMut(u64),
    ) -> Result<(), SimError> {
        let tw = Instant::now();
        self.global = self
            .strategy
            .next_global(&mut self.opt, &self.global, &delta)?;
        let taus: Vec<f64> = uploads
            .values()
            .filter_map(|m| m.base_round.map(|b| (round - b) as f64))
            .collect();
        if !taus.is_empty() {
            row.staleness = Some(taus.iter().sum::<f64>() / taus.len() as f64);
        }
        row.version = self.fed.commit(round, now_ms)?;
        row.status = "committed".into();
        row.aggregated = uploads.len();
        row.wall_s += tw.elapsed().as_secs_f64();
        if let Some((eps, d)) = self
            .devices
            .iter()
            .filter_map(|d| Some((d.eps?, d)))
            .max_by(|a, b| a.0.total_cmp(&b.0))
        {
            let plan = d.privacy.as_ref().and_then(|p| p.plan());
            row.eps_spent = Some(eps);
            row.q = plan.map(|p| p.q);
            row.sigma = plan.map(|p| p.sigma);
            row.dp_steps = Some(d.dp_steps);
        }
        let last = row.version >= self.point.rounds;
        if row.version.is_multiple_of(self.sweep.eval_every) || last {
            evaluate(self.pop, &self.global, &mut row)?;
        }
        on_round(round);
        self.rows.push(row);
        Ok(())
    }
}

/// Evaluates `global` into `row` (held-out loss, accuracy, and the time it took).
fn evaluate(pop: &Population, global: &FlatAdapter, row: &mut RoundRow) -> Result<(), SimError> {
    let te = Instant::now();
    let u = pop.evaluate(global)?;
    row.loss = Some(u.loss);
    row.accuracy = u.accuracy;
    row.eval_s = te.elapsed().as_secs_f64();
    Ok(())
}

/// Notes a trained update's training in `row`.
fn note(row: &mut RoundRow, done: &Done) {
    row.compute_s += done.out.secs;
    let n = row.aggregated as f64;
    row.train_loss = Some((row.train_loss.unwrap_or(0.0) * n + done.out.train_loss) / (n + 1.0));
    row.aggregated += 1;
}

fn run_sync(
    env: &mut Env<'_>,
    schedule: &Schedule,
    on_round: &mut dyn FnMut(u64),
) -> Result<(), SimError> {
    let k = env.point.clients_per_round;
    let n = env.devices.len();
    let steps = env.train.local_steps;
    let timeout_s = env.fleet.config().round_timeout_s;
    let poll_s = env.fleet.config().poll_s;
    let (mut t, mut fed_now) = (0.0f64, 0u64);
    // a device cut from an over-selected round is still busy with that work until then
    let mut busy_until = vec![0.0f64; n];
    while !env.done() && t < env.max_sim_s() {
        let tr = Instant::now();
        for (i, &busy) in busy_until.iter().enumerate() {
            let id = env.devices[i].id.clone();
            if env.fleet.online(i, t) && busy <= t {
                env.fed.connect(&id);
            } else {
                env.fed.disconnect(&id);
            }
        }
        if env.fed.connected().is_empty() {
            t = (0..n)
                .map(|i| env.fleet.next_online(i, t))
                .fold(f64::INFINITY, f64::min)
                + 1e-3;
            continue;
        }
        fed_now += 1;
        let Some(Transition::RoundStarted { round, selected }) = env.fed.tick(fed_now) else {
            return Err(SimError::Config(format!(
                "the round machine did not start a round (phase {:?})",
                env.fed.state().phase
            )));
        };
        let mut row = RoundRow::new(&env.cols, round);
        row.selected = selected.len();
        // each sampled device: its own check first (the work must fit in what is left of its
        // window and the round's deadline, as in async mode), then its ledger
        let mut arrivals: Vec<(f64, usize, Job)> = Vec::new();
        for id in &selected {
            let i = env.index[id];
            match env.fed.poll(id) {
                Directive::Train { round: r, .. } if r == round => {}
                other => return Err(SimError::Config(format!("{id} sampled but told {other:?}"))),
            }
            let w = env.fleet.work_s(i, steps, env.down_bytes, env.up_bytes);
            let job = if w > env.fleet.left(i, t) || w > timeout_s {
                Err(DeclineReason::NotEnoughTime)
            } else {
                row.bytes_down += env.down_bytes;
                env.approve(i, round)?
            };
            match job {
                Ok(job) => arrivals.push((t + w, i, job)),
                Err(reason) => {
                    env.fed
                        .decline(id, round, reason)
                        .map_err(|e| SimError::Config(e.to_string()))?;
                    row.declined += 1;
                }
            }
        }
        arrivals.sort_by(|a, b| a.0.total_cmp(&b.0));
        // the round ends with its last upload, or (over-selected) with its K-th: the harness
        // closes it there (the coordinator itself waits for all or its deadline)
        let over = schedule.over_selection > 1.0;
        let kept = if over {
            k.min(arrivals.len())
        } else {
            arrivals.len()
        };
        let end = match kept {
            // everyone declined: the machine fails the round at once; ask again later
            0 => t + poll_s,
            _ => arrivals[kept - 1].0,
        };
        if end > env.max_sim_s() {
            // a version that would end past the horizon is not committed
            break;
        }
        let cut = arrivals.split_off(kept);
        row.late = cut.len();
        for (arrive, i, job) in cut {
            env.devices[i].residual = job.residual;
            busy_until[i] = arrive;
        }
        let globals =
            BTreeMap::from([(env.fed.state().global_version, Arc::new(env.global.clone()))]);
        let jobs = arrivals.into_iter().map(|(_, i, j)| (i, j)).collect();
        let trained = env.train(jobs, &globals)?;
        let mut payloads = BTreeMap::new();
        for (i, job, done) in trained {
            note(&mut row, &done);
            env.devices[i].residual = done.residual.clone();
            row.bytes_up += done.payload.len() as u64;
            if !env.submit(i, job.round, &done.payload)? {
                return Err(SimError::Config(
                    "a sync upload was refused as stale".into(),
                ));
            }
            payloads.insert(env.devices[i].id.clone(), done.payload);
        }
        row.aggregated = 0;
        row.wall_s = tr.elapsed().as_secs_f64();
        let mut tr = env.fed.tick(fed_now);
        if tr.is_none() {
            fed_now += env.fed.config().round_timeout_ms;
            tr = env.fed.tick(fed_now);
        }
        t = end;
        row.sim_seconds = Some(t);
        match tr {
            Some(Transition::Aggregate { round, uploads, .. }) => {
                env.commit(round, &uploads, &payloads, row, fed_now, on_round)?;
            }
            Some(Transition::RoundFailed { .. }) => {
                row.status = "failed".into();
                row.version = env.fed.state().global_version;
                on_round(round);
                env.rows.push(row);
            }
            other => {
                return Err(SimError::Config(format!(
                    "unexpected transition closing round {round}: {other:?}"
                )))
            }
        }
    }
    Ok(())
}

/// An event: device `.2` wakes (asks for work) or its update arrives (`.3`), at `.0` ms.
type Event = Reverse<(u64, u64, usize, bool)>;

fn run_async(env: &mut Env<'_>, on_round: &mut dyn FnMut(u64)) -> Result<(), SimError> {
    let n = env.devices.len();
    let steps = env.train.local_steps;
    let poll_s = env.fleet.config().poll_s;
    let mut queue: BinaryHeap<Event> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |q: &mut BinaryHeap<Event>, t: f64, i: usize, arrive: bool| {
        seq += 1;
        q.push(Reverse(((t * 1e3).round() as u64, seq, i, arrive)));
    };
    for i in 0..n {
        push(&mut queue, env.fleet.next_online(i, 0.0), i, false);
    }
    match env.fed.tick(0) {
        Some(Transition::RoundStarted { .. }) => {}
        other => {
            return Err(SimError::Config(format!(
                "the first buffer did not open: {other:?}"
            )))
        }
    }
    let mut globals: BTreeMap<u64, Arc<FlatAdapter>> =
        BTreeMap::from([(0, Arc::new(env.global.clone()))]);
    let mut jobs: BTreeMap<usize, Job> = BTreeMap::new();
    let mut done: BTreeMap<usize, (Job, Done)> = BTreeMap::new();
    let mut payloads: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let open_round = |fed: &Federation| match &fed.state().phase {
        Phase::Training(o) => o.round,
        _ => 0,
    };
    let mut row = RoundRow::new(&env.cols, open_round(&env.fed));
    let mut tr = Instant::now();
    // secure cohorts: trained updates waiting for one, and the open session (its result,
    // computed when it opened, committed when its event comes)
    let secure = env.fed.is_secure_async();
    let session_event = n;
    let session_s = 8.0 * env.fleet.config().latency_s;
    let mut held: BTreeMap<usize, Done> = BTreeMap::new();
    let mut session: Option<(u64, crate::timed_cohort::CohortSum)> = None;
    while let Some(Reverse((ms, _, i, arrive))) = queue.pop() {
        let t = ms as f64 / 1e3;
        if t >= env.max_sim_s() || env.done() {
            break;
        }
        if i == session_event {
            // the cohort's session ends: its members' masked inputs count, the version commits
            let (round, sum) = session
                .take()
                .ok_or_else(|| SimError::Config("a session event without a session".into()))?;
            let mut uploads = BTreeMap::new();
            for (id, meta) in sum.uploads {
                env.fed
                    .accept_upload(&id, round, meta.clone())
                    .map_err(|r| SimError::Config(r.to_string()))?;
                uploads.insert(id, meta);
            }
            row.bytes_up += sum.masked_bytes;
            row.wall_s = tr.elapsed().as_secs_f64();
            row.sim_seconds = Some(t);
            row.selected = uploads.len();
            let now_ms = ms + 1;
            let next = RoundRow::new(&env.cols, round + 1);
            let this = std::mem::replace(&mut row, next);
            env.commit_delta(round, sum.delta, &uploads, this, now_ms, on_round)?;
            keep_versions(env, &mut globals, &jobs, &done);
            // the next buffer opens, and a cohort at once if enough devices are ready
            session = open_cohort(env, &mut held, now_ms)?;
            if session.is_some() {
                push(&mut queue, t + session_s, session_event, false);
            }
            tr = Instant::now();
            continue;
        }
        let id = env.devices[i].id.clone();
        if !arrive {
            if !env.fleet.online(i, t) {
                env.fed.disconnect(&id);
                push(&mut queue, env.fleet.next_online(i, t) + 1e-3, i, false);
                continue;
            }
            env.fed.connect(&id);
            match env.fed.poll(&id) {
                Directive::Train { round, .. } => {
                    let w = env.fleet.work_s(i, steps, env.down_bytes, env.up_bytes);
                    let left = env.fleet.left(i, t);
                    if w > left {
                        // the device's own check: the work would not fit in its window
                        let _ = env.fed.decline(&id, round, DeclineReason::NotEnoughTime);
                        push(&mut queue, t + left + 1e-3, i, false);
                        continue;
                    }
                    match env.approve(i, round)? {
                        Ok(job) => {
                            row.bytes_down += env.down_bytes;
                            jobs.insert(i, job);
                            push(&mut queue, t + w, i, true);
                        }
                        // its budget is spent: it takes no more work
                        Err(reason) => {
                            let _ = env.fed.decline(&id, round, reason);
                            row.declined += 1;
                        }
                    }
                }
                // (a cohort member is told about its cohort: the session runs without it here)
                Directive::Wait | Directive::AlreadyUploaded { .. } | Directive::Cohort { .. } => {
                    push(&mut queue, t + poll_s, i, false)
                }
                Directive::Evaluate { .. } | Directive::Finished { .. } => {}
            }
            continue;
        }
        // an update arrives: what is in flight is trained now, together
        if !done.contains_key(&i) {
            let batch: Vec<(usize, Job)> = std::mem::take(&mut jobs).into_iter().collect();
            for (j, job, d) in env.train(batch, &globals)? {
                done.insert(j, (job, d));
            }
        }
        let (job, d) = done
            .remove(&i)
            .ok_or_else(|| SimError::Config(format!("{id}'s update was not trained")))?;
        env.devices[i].residual = d.residual.clone();
        row.compute_s += d.out.secs;
        if secure {
            // it announces its finished update; a cohort opens once enough are ready
            match env.fed.mark_ready(&id, job.round) {
                Ok(()) => {
                    held.insert(i, d);
                }
                Err(r) if r.code == fedlora_protocol::RefusalCode::TooStale => row.late += 1,
                Err(r) => return Err(SimError::Config(format!("{id}'s announcement: {r}"))),
            }
            push(&mut queue, t, i, false);
            if session.is_none() {
                session = open_cohort(env, &mut held, ms + 1)?;
                if session.is_some() {
                    push(&mut queue, t + session_s, session_event, false);
                }
            }
            continue;
        }
        row.bytes_up += d.payload.len() as u64;
        if env.submit(i, job.round, &d.payload)? {
            payloads.insert(id.clone(), d.payload);
        } else {
            row.late += 1;
        }
        // it asks for work again at once (and is told to wait while its update is buffered)
        push(&mut queue, t, i, false);
        let now_ms = ms + 1;
        let Some(Transition::Aggregate { round, uploads, .. }) = env.fed.tick(now_ms) else {
            continue;
        };
        row.wall_s = tr.elapsed().as_secs_f64();
        row.sim_seconds = Some(t);
        row.selected = uploads.len();
        let next = RoundRow::new(&env.cols, round + 1);
        let this = std::mem::replace(&mut row, next);
        env.commit(round, &uploads, &payloads, this, now_ms, on_round)?;
        payloads.clear();
        keep_versions(env, &mut globals, &jobs, &done);
        let _ = env.fed.tick(now_ms);
        tr = Instant::now();
    }
    Ok(())
}

/// After a commit: keeps the new global and the versions in-flight work trained on.
fn keep_versions(
    env: &Env<'_>,
    globals: &mut BTreeMap<u64, Arc<FlatAdapter>>,
    jobs: &BTreeMap<usize, Job>,
    done: &BTreeMap<usize, (Job, Done)>,
) {
    let v = env.fed.state().global_version;
    globals.insert(v, Arc::new(env.global.clone()));
    let oldest = jobs
        .values()
        .map(|j| j.version)
        .chain(done.values().map(|(j, _)| j.version))
        .min()
        .unwrap_or(v);
    globals.retain(|&k, _| k >= oldest.min(v));
}

/// Secure async mode: ticks the round machine (opening the next buffer if none is open) and,
/// if it opens a cohort among the ready devices, runs the cohort's SecAgg+ session on their
/// held updates. `None`: no cohort opened.
fn open_cohort(
    env: &mut Env<'_>,
    held: &mut BTreeMap<usize, Done>,
    now_ms: u64,
) -> Result<Option<(u64, crate::timed_cohort::CohortSum)>, SimError> {
    // a closed buffer's successor opens first (with no one selected), then the cohort
    for _ in 0..2 {
        let Some(Transition::RoundStarted { round, selected }) = env.fed.tick(now_ms) else {
            return Ok(None);
        };
        if selected.is_empty() {
            continue;
        }
        let mut owned = Vec::with_capacity(selected.len());
        for id in &selected {
            let i = env.index[id];
            let (trained, _) = env
                .fed
                .cohort_member(id)
                .ok_or_else(|| SimError::Config(format!("{id} is not in cohort {round}")))?;
            let d = held
                .remove(&i)
                .ok_or_else(|| SimError::Config(format!("{id} holds no update")))?;
            owned.push((i, trained, d));
        }
        let members: Vec<crate::timed_cohort::Member<'_>> = owned
            .iter()
            .map(|(i, trained, d)| {
                let dev = &env.devices[*i];
                Ok(crate::timed_cohort::Member {
                    id: &dev.id,
                    seeds: &dev.seeds,
                    signer: dev
                        .signer
                        .as_ref()
                        .ok_or_else(|| SimError::Config("a secure run without keys".into()))?,
                    trained: *trained,
                    delta: &d.out.delta,
                })
            })
            .collect::<Result<_, SimError>>()?;
        let params = env
            .fed
            .config()
            .train
            .secure
            .clone()
            .ok_or_else(|| SimError::Config("cohorts without secure parameters".into()))?;
        let sum = crate::timed_cohort::run(&env.fed, round, &params, &members, &env.verifier)?;
        return Ok(Some((round, sum)));
    }
    Ok(None)
}
