//! Running one sweep point in-process: virtual clients and the coordinator's round machine in
//! one process, no network.
//!
//! The code paths are the deployment's: the sans-IO [`Federation`] samples clients, opens and
//! closes rounds and refuses late or duplicate uploads; clients approve and record DP spending
//! with the SDK's [`PrivacyState`], train with [`local_update`] and encode with
//! [`encode_update`] (error feedback included); the coordinator aggregates with
//! [`aggregate_payloads`] / [`apply_modular_sum`]; secure rounds run the typed
//! [`ClientRound`] / [`ServerRound`] stages with real keys, shares and masks. Only the
//! transport differs: messages are handed over in memory, and their wire size is counted with
//! the real frame encoding. Time is simulated (a round's deadline passes when the driver says
//! so), so stragglers are exact and nothing sleeps.
//!
//! Clients of a round train in parallel on a rayon pool; each client's randomness comes from
//! its own seeds, and uploads are aggregated in client-id order, so results do not depend on
//! the number of threads or on scheduling.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use fedlora_client::privacy::{decide_round, PrivacyState, RoundDecision};
use fedlora_coordinator::aggregate::{aggregate_payloads, modular_sum_delta, Payload};
use fedlora_protocol::rank::RankCounts;
use fedlora_protocol::secagg::crypto::{EcdsaP256Signer, P256Verifier};
use fedlora_protocol::secagg::{ClientRound, SecAggParams, SecAggPolicy, ServerRound};
use fedlora_protocol::strategy::OptimizerState;
use fedlora_protocol::{
    codec_seed, frame, ClientMsg, Codec, CodecContext, CoordMsg, ErrorFeedback, Federation,
    FederationConfig, FlatAdapter, ModularSum, RoundOffer, SecAggBody, Task, TrainConfig,
    Transition, UploadMeta,
};
use fedlora_train::learner::{encode_update, local_update, ClientSeeds, Learner};
use fedlora_train::train::TrainOutcome;
use rand::rngs::ChaCha20Rng;
use rand::{RngExt, SeedableRng};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::SimError;
use crate::results::{RoundRow, RunColumns, RunOutput, RunSummary};
use crate::sweep::{Point, SweepConfig};
use crate::task::Population;

pub use crate::setup::{
    client_id, client_seeds, federation_config, mix_seed, privacy_target, RunHooks,
};

use crate::setup::ROUND_TIMEOUT_MS;

struct VirtualClient {
    id: String,
    /// The rank this client trains, when below the global rank (heterogeneous ranks).
    rank: Option<usize>,
    learner: Arc<dyn Learner>,
    seeds: ClientSeeds,
    privacy: Option<PrivacyState>,
    residual: Option<ErrorFeedback>,
    signer: Option<EcdsaP256Signer>,
    dp_steps: u64,
    /// ε spent so far (as the ledger returned it at the last spend).
    eps: Option<f64>,
    /// Client-level DP rounds this client was charged for (uploaded in central mode, sent its
    /// masked input in distributed mode): what ε (b) counts.
    participated: u64,
}

/// What a client does in a round, decided before training.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    OnTime,
    Dropped,
    Late,
}

struct Job {
    client: usize,
    dp: Option<fedlora_train::dp_sgd::DpSgdConfig>,
    fate: Fate,
    residual: Option<ErrorFeedback>,
}

struct Trained {
    client: usize,
    fate: Fate,
    out: TrainOutcome,
    payload: Vec<u8>,
    residual: Option<ErrorFeedback>,
    /// Bytes of the payload that zero padding to the global rank cost.
    pad_bytes: u64,
}

/// Runs `point` of `sweep` in-process on `pool`. `on_round(round)` is called after each round.
pub fn run_in_process(
    sweep: &SweepConfig,
    point: &Point,
    pool: &rayon::ThreadPool,
    on_round: impl FnMut(u64),
) -> Result<RunOutput, SimError> {
    let t0 = Instant::now();
    let pop = Population::build(&sweep.task, point.rank, point.seed)?;
    let (out, _) = run_population(sweep, point, &pop, pool, RunHooks::default(), t0, on_round)?;
    Ok(out)
}

/// Runs `point` of `sweep` on the prebuilt population `pop` (e.g. with audit canaries in its
/// clients' data) and returns the run's rows and the final global adapter.
pub fn run_population(
    sweep: &SweepConfig,
    point: &Point,
    pop: &Population,
    pool: &rayon::ThreadPool,
    hooks: RunHooks,
    t0: Instant,
    mut on_round: impl FnMut(u64),
) -> Result<(RunOutput, FlatAdapter), SimError> {
    // a point with a schedule runs in simulated wall time, with device behaviour
    if point.schedule.is_some() {
        return crate::timed::run(sweep, point, pop, pool, hooks, t0, on_round);
    }
    let n = pop.learners.len();
    let fcfg = federation_config(sweep, point, n, pop.initial.spec().numel())?;
    let target = privacy_target(sweep, point);
    let secure = fcfg.train.secure.clone();
    let strategy = fcfg.strategy.build();
    // what every participant receives (FedProx's μ among others)
    let round_train = strategy.configure_round(&fcfg.train);
    let mut opt = OptimizerState::default();
    let full_rank = fedlora_coordinator::aggregate::full_rank(pop.initial.spec());
    let ranks = crate::sweep::parse_client_ranks(&point.client_ranks, n)?;
    let mut clients: Vec<VirtualClient> = pop
        .learners
        .iter()
        .enumerate()
        .map(|(i, l)| -> Result<VirtualClient, SimError> {
            Ok(VirtualClient {
                id: client_id(i),
                rank: ranks.as_ref().map(|r| r[i]).filter(|&r| r < full_rank),
                learner: l.clone(),
                seeds: client_seeds(point.seed, i),
                privacy: target.map(PrivacyState::in_memory).transpose()?,
                residual: None,
                signer: match secure {
                    Some(_) => Some(crate::setup::new_signer()?),
                    None => None,
                },
                dp_steps: 0,
                eps: None,
                participated: 0,
            })
        })
        .collect::<Result<_, _>>()?;
    let verifier = P256Verifier(
        clients
            .iter()
            .filter_map(|c| c.signer.as_ref().map(|s| (c.id.clone(), s.public_key())))
            .collect(),
    );
    let index: BTreeMap<String, usize> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.clone(), i))
        .collect();
    let spec = pop.initial.spec().clone();
    let mut fed = Federation::new(fcfg.clone(), spec.hash(), 0)?;
    for c in &clients {
        fed.connect(&c.id);
    }
    let cols = RunColumns::new(sweep, point, "in-process");
    let mut global = pop.initial.clone();
    let mut rows = Vec::new();
    let mut row0 = RoundRow::new(&cols, 0);
    row0.status = "initial".into();
    let te = Instant::now();
    let u = pop.evaluate(&global)?;
    row0.loss = Some(u.loss);
    row0.accuracy = u.accuracy;
    row0.eval_s = te.elapsed().as_secs_f64();
    rows.push(row0);
    let startup_s = t0.elapsed().as_secs_f64() - rows[0].eval_s;
    let mut now = 0u64;
    while !matches!(
        fed.state().phase,
        fedlora_protocol::Phase::Evaluating { .. } | fedlora_protocol::Phase::Finished { .. }
    ) {
        let tr = Instant::now();
        let Some(Transition::RoundStarted { round, selected }) = fed.tick(now) else {
            return Err(SimError::Config(format!(
                "the round machine did not start a round (phase {:?})",
                fed.state().phase
            )));
        };
        let mut row = RoundRow::new(&cols, round);
        row.selected = selected.len();
        let mut fate_rng = ChaCha20Rng::seed_from_u64(mix_seed(point.seed, round, 3));
        let ctx = CodecContext {
            round_seed: codec_seed(fcfg.seed, round),
        };
        // every selected client polls, gets the offer (its rank's slice), and its budget decides
        let mut offer_bytes: BTreeMap<Option<usize>, u64> = BTreeMap::new();
        let mut jobs = Vec::new();
        for id in &selected {
            let ci = index[id];
            let u: f64 = fate_rng.random();
            let fate = if u < sweep.faults.dropout {
                Fate::Dropped
            } else if u < sweep.faults.dropout + sweep.faults.straggler {
                Fate::Late
            } else {
                Fate::OnTime
            };
            match fed.poll(id) {
                fedlora_protocol::Directive::Train { round: r, .. } if r == round => {}
                other => {
                    return Err(SimError::Config(format!(
                        "{id} was selected for round {round} but told {other:?}"
                    )))
                }
            }
            let rank = clients[ci].rank;
            row.bytes_down += match offer_bytes.entry(rank) {
                std::collections::btree_map::Entry::Occupied(e) => *e.get(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    *e.insert(offer_frame_len(&fed, &round_train, round, &global, rank)?)
                }
            };
            let c = &mut clients[ci];
            let (dp, eps) = match decide_round(
                c.privacy.as_mut(),
                &fcfg.train,
                c.learner.train_examples(),
                round,
            )? {
                RoundDecision::Train { mut dp, eps } => {
                    if let Some(d) = dp.as_mut() {
                        hooks.apply(ci, d);
                    }
                    (dp, eps)
                }
                RoundDecision::Decline(reason) => {
                    let msg = ClientMsg::Decline { round, reason };
                    row.bytes_up += frame::encode(&msg)?.len() as u64;
                    fed.decline(id, round, reason)
                        .map_err(|e| SimError::Config(e.to_string()))?;
                    row.declined += 1;
                    continue;
                }
            };
            if eps.is_some() {
                c.eps = eps;
                c.dp_steps += u64::from(fcfg.train.local_steps);
            }
            jobs.push(Job {
                client: ci,
                dp,
                fate,
                residual: c.residual.take(),
            });
        }
        let env = RoundEnv {
            fcfg: &fcfg,
            strategy: strategy.as_ref(),
            train: &round_train,
            full_rank,
            spec: &spec,
            global: &global,
            round,
            ctx: &ctx,
            pool,
        };
        let outcome = if let Some(params) = &secure {
            secure_round(
                &mut fed,
                &mut clients,
                &verifier,
                params,
                jobs,
                &env,
                &mut row,
            )?
        } else {
            plain_round(&mut fed, &mut clients, jobs, &env, &mut row, &mut now)?
        };
        match outcome {
            Some(delta) => {
                global = strategy.next_global(&mut opt, &global, &delta)?;
                let v = fed.commit(round, now)?;
                row.version = v;
                row.status = "committed".into();
            }
            None => {
                if matches!(fed.state().phase, fedlora_protocol::Phase::Training(_)) {
                    fed.fail_round(round, now)?;
                }
                row.version = fed.state().global_version;
                row.status = "failed".into();
            }
        }
        row.wall_s = tr.elapsed().as_secs_f64();
        // the client with the largest ε so far, and its accounting inputs
        if let Some((eps, c)) = clients
            .iter()
            .filter_map(|c| Some((c.eps?, c)))
            .max_by(|a, b| a.0.total_cmp(&b.0))
        {
            let plan = c.privacy.as_ref().and_then(|p| p.plan());
            row.eps_spent = Some(eps);
            row.q = plan.map(|p| p.q);
            row.sigma = plan.map(|p| p.sigma);
            row.dp_steps = Some(c.dp_steps);
        }
        if let Some(plan) = &fcfg.train.client_dp {
            let most = clients.iter().map(|c| c.participated).max().unwrap_or(0);
            row.eps_spent = Some(crate::client_dp::observer_epsilon_so_far(
                plan,
                fed.state().global_version,
            )?);
            row.eps_coordinator = Some(
                plan.coordinator_epsilon(most)
                    .map_err(|e| SimError::Config(e.to_string()))?,
            );
            row.q = Some(plan.sampling_rate);
            row.sigma = Some(plan.noise.effective_multiplier());
        }
        let last = row.version >= point.rounds;
        if row.status == "committed" && (row.version.is_multiple_of(sweep.eval_every) || last) {
            let te = Instant::now();
            let u = pop.evaluate(&global)?;
            row.loss = Some(u.loss);
            row.accuracy = u.accuracy;
            row.eval_s = te.elapsed().as_secs_f64();
        }
        on_round(round);
        rows.push(row);
        now += ROUND_TIMEOUT_MS + 1;
        if matches!(fed.state().phase, fedlora_protocol::Phase::Waiting { .. }) {
            now += fcfg.start_grace_ms;
        }
    }
    let summary = RunSummary::from_rows(&cols, &rows, startup_s, pool.current_num_threads());
    Ok((RunOutput { rows, summary }, global))
}

/// Wire size of the round offer a participant of `rank` (`None`: the global rank) receives:
/// its slice of the global adapter, dense.
fn offer_frame_len(
    fed: &Federation,
    train: &TrainConfig,
    round: u64,
    global: &FlatAdapter,
    rank: Option<usize>,
) -> Result<u64, SimError> {
    let sent = match rank {
        Some(r) => fedlora_protocol::rank::slice(global, r)?,
        None => global.clone(),
    };
    let offer = RoundOffer {
        round,
        global_version: fed.state().global_version,
        spec_hash: global.spec().hash(),
        config: train.clone(),
        evaluate: false,
        codec_seed: codec_seed(fed.config().seed, round),
        global_from: None,
        global: Codec::DenseF32.encode(sent.values()),
        secure_shares: None,
        rank: rank.map(|r| r as u32),
        // the bytes of the deployed offer, which carries the time left
        time_left_ms: Some(fed.config().round_timeout_ms),
        global_digest: None,
        // the deployed offer's signature, when it carries a client-level plan
        plan_signature: train.client_dp.as_ref().map(|_| {
            fedlora_protocol::plan_signature::PlanSignature {
                signature: vec![0; fedlora_protocol::plan_signature::PLAN_SIGNATURE_LEN],
            }
        }),
    };
    Ok(frame::encode(&CoordMsg::Task(Task::Train(offer)))?.len() as u64)
}

/// What every step of one round shares.
struct RoundEnv<'a> {
    fcfg: &'a FederationConfig,
    /// The federation's strategy (built once per run).
    strategy: &'a dyn fedlora_protocol::strategy::Strategy,
    /// What participants train with (the strategy's round configuration).
    train: &'a TrainConfig,
    /// The global LoRA rank.
    full_rank: usize,
    spec: &'a fedlora_protocol::AdapterSpec,
    global: &'a FlatAdapter,
    round: u64,
    ctx: &'a CodecContext,
    pool: &'a rayon::ThreadPool,
}

/// Trains `jobs` (clients that will deliver, i.e. not dropped) in parallel and encodes their
/// updates. Results are in job order.
fn train_jobs(
    clients: &[VirtualClient],
    jobs: Vec<Job>,
    env: &RoundEnv<'_>,
) -> Result<Vec<Trained>, SimError> {
    let RoundEnv {
        train: cfg,
        spec,
        global,
        round,
        ctx,
        pool,
        ..
    } = *env;
    pool.install(|| {
        jobs.into_par_iter()
            .map(|mut job| -> Result<Trained, SimError> {
                let c = &clients[job.client];
                let sliced = match c.rank {
                    Some(r) => Some(fedlora_protocol::rank::slice(global, r)?),
                    None => None,
                };
                let out = local_update(
                    c.learner.as_ref(),
                    sliced.as_ref().unwrap_or(global),
                    cfg,
                    job.dp.as_ref(),
                    &c.seeds,
                    round,
                )?;
                let mut rng = c.seeds.codec_rng(round)?;
                let enc = encode_update(
                    &cfg.codec,
                    spec,
                    &out.delta,
                    ctx,
                    1,
                    &mut rng,
                    &mut job.residual,
                    cfg.update_clip(),
                )?;
                // what the slice alone would have cost with the same codec
                let pad_bytes = match c.rank {
                    Some(r) => {
                        let own = fedlora_protocol::rank::slice(&out.delta, r)?;
                        let mut rng = c.seeds.codec_rng(round)?;
                        let (b, _) = cfg.codec.encode_with(own.values(), ctx, 1, &mut rng);
                        (enc.bytes.len() as u64).saturating_sub(b.len() as u64)
                    }
                    None => 0,
                };
                Ok(Trained {
                    client: job.client,
                    fate: job.fate,
                    out,
                    payload: enc.bytes,
                    residual: job.residual,
                    pad_bytes,
                })
            })
            .collect()
    })
}

/// Takes the injected dropouts out of `jobs` (they keep their error-feedback residual) and
/// counts them.
fn leave_dropped(clients: &mut [VirtualClient], jobs: Vec<Job>, row: &mut RoundRow) -> Vec<Job> {
    let (jobs, dropped): (Vec<Job>, Vec<Job>) =
        jobs.into_iter().partition(|j| j.fate != Fate::Dropped);
    row.dropped = dropped.len();
    for j in dropped {
        clients[j.client].residual = j.residual;
    }
    jobs
}

fn note_training(row: &mut RoundRow, trained: &[Trained]) {
    row.compute_s = trained.iter().map(|t| t.out.secs).sum();
    if !trained.is_empty() {
        row.train_loss =
            Some(trained.iter().map(|t| t.out.train_loss).sum::<f64>() / trained.len() as f64);
    }
}

/// A round without secure aggregation. Returns the next global, or `None` if it failed.
fn plain_round(
    fed: &mut Federation,
    clients: &mut [VirtualClient],
    jobs: Vec<Job>,
    env: &RoundEnv<'_>,
    row: &mut RoundRow,
    now: &mut u64,
) -> Result<Option<FlatAdapter>, SimError> {
    let (fcfg, spec, round, ctx) = (env.fcfg, env.spec, env.round, env.ctx);
    let jobs = leave_dropped(clients, jobs, row);
    let trained = train_jobs(clients, jobs, env)?;
    note_training(row, &trained);
    let mut payloads: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut late = Vec::new();
    for t in trained {
        let c = &mut clients[t.client];
        c.residual = t.residual;
        // what the device would send: a private upload (no loss, no weight) under DP
        let up = fedlora_protocol::Upload {
            round,
            spec_hash: spec.hash(),
            weight: 1.0,
            train_loss: t.out.train_loss,
            payload: t.payload,
        };
        let msg = if fcfg.train.dp.is_some() {
            ClientMsg::PrivateUpload(fedlora_protocol::PrivateUpload {
                round,
                spec_hash: up.spec_hash,
                payload: up.payload.clone(),
                noised_train_loss: t.out.released_loss,
            })
        } else {
            ClientMsg::Upload(up.clone())
        };
        row.bytes_up += frame::encode(&msg)?.len() as u64;
        row.pad_bytes_up += t.pad_bytes;
        if t.fate == Fate::Late {
            late.push((c.id.clone(), up));
            continue;
        }
        submit(fed, &c.id, &up, spec, fcfg.train.dp.is_none(), c.rank)?;
        payloads.insert(c.id.clone(), up.payload);
    }
    let mut tr = fed.tick(*now);
    if tr.is_none() {
        *now += fcfg.round_timeout_ms;
        tr = fed.tick(*now);
    }
    // stragglers arrive after the deadline: the round machine refuses them
    for (id, up) in &late {
        if submit(fed, id, up, spec, fcfg.train.dp.is_none(), None).is_ok() {
            return Err(SimError::Config(format!(
                "late upload of {id} was accepted after the deadline"
            )));
        }
        row.late += 1;
    }
    match tr {
        Some(Transition::Aggregate { uploads, .. }) => {
            row.aggregated = uploads.len();
            if let Some(plan) = &fcfg.train.client_dp {
                for id in uploads.keys() {
                    if let Some(c) = clients.iter_mut().find(|c| &c.id == id) {
                        c.participated += 1;
                    }
                }
                // not central: central_dp_delta refuses the plan before using the noise
                let std = plan.central_noise_std().unwrap_or(0.0);
                // the simulated coordinator's noise: seeded for reproducible sweeps
                let mut noise =
                    fedlora_dp::GaussianNoise::seeded(std, mix_seed(env.fcfg.seed, round, 7));
                let delta = fedlora_coordinator::aggregate::central_dp_delta(
                    plan,
                    &fcfg.train.codec,
                    spec,
                    ctx,
                    uploads.keys().map(|id| Payload {
                        weight: 1.0,
                        rank: None,
                        bytes: payloads[id].as_slice(),
                        round_seed: None,
                    }),
                    &mut noise,
                )?;
                return Ok(Some(delta));
            }
            let delta = aggregate_payloads(
                env.strategy,
                &fcfg.train.codec,
                spec,
                ctx,
                uploads.iter().map(|(id, m)| Payload {
                    weight: m.weight,
                    rank: m.rank,
                    bytes: payloads[id].as_slice(),
                    round_seed: None,
                }),
            )?;
            Ok(Some(delta))
        }
        Some(Transition::RoundFailed { .. }) => Ok(None),
        other => Err(SimError::Config(format!(
            "unexpected transition closing round {round}: {other:?}"
        ))),
    }
}

fn submit(
    fed: &mut Federation,
    id: &str,
    up: &fedlora_protocol::Upload,
    spec: &fedlora_protocol::AdapterSpec,
    carries_loss: bool,
    rank: Option<usize>,
) -> Result<(), SimError> {
    let digest: [u8; 32] = Sha256::digest(&up.payload).into();
    let refused = |e: fedlora_protocol::Refusal| SimError::Config(e.to_string());
    let verdict = fed
        .check_upload(id, up.round, &spec.hash(), &digest, up.weight)
        .map_err(refused)?;
    if verdict == fedlora_protocol::UploadVerdict::New {
        let meta = UploadMeta {
            digest,
            weight: up.weight,
            bytes: up.payload.len() as u64,
            train_loss: carries_loss.then_some(up.train_loss),
            rank: rank.map(|r| r as u32),
            base_round: None,
        };
        fed.accept_upload(id, up.round, meta).map_err(refused)?;
    }
    Ok(())
}

fn wire(round: u64, body: SecAggBody) -> Result<u64, SimError> {
    Ok(frame::encode(&ClientMsg::SecAgg { round, body })?.len() as u64)
}

/// A secure round: keys, shares, training, masked inputs, unmasking. Injected dropouts leave
/// after sharing their keys (the case the protocol must recover from); stragglers miss the
/// masked-input stage.
fn secure_round(
    fed: &mut Federation,
    clients: &mut [VirtualClient],
    verifier: &P256Verifier,
    params: &SecAggParams,
    jobs: Vec<Job>,
    env: &RoundEnv<'_>,
    row: &mut RoundRow,
) -> Result<Option<FlatAdapter>, SimError> {
    let (fcfg, spec, round, ctx) = (env.fcfg, env.spec, env.round, env.ctx);
    let sa = |e: fedlora_protocol::secagg::SecAggError| SimError::SecAgg(e.to_string());
    let codec = &fcfg.train.codec;
    let (Some(len), Some(modulus)) = (codec.summed_len(spec.numel()), codec.modulus_bits()) else {
        return Err(SimError::Config(
            "secure rounds need a summable codec (modular or skellam)".into(),
        ));
    };
    // under client-level DP a client sends unmask shares only for a survivor set of at least
    // the plan's min_clients, and signs the plan's digest with the survivor view
    let plan = fcfg.train.client_dp.as_ref();
    let policy = SecAggPolicy::default();
    let min_survivors = plan.map_or(0, |p| p.min_clients);
    let min_collusion = plan.map_or(0, |p| p.collusion);
    let context = fedlora_protocol::client_dp::plan_digest(plan, codec);
    let participants: BTreeSet<String> =
        jobs.iter().map(|j| clients[j.client].id.clone()).collect();
    if participants.is_empty() {
        return Ok(None);
    }
    let mut server = ServerRound::new(round, params.clone(), len, participants);
    let mut rounds: BTreeMap<usize, ClientRound> = BTreeMap::new();
    for j in &jobs {
        let c = &clients[j.client];
        let mut rng =
            ChaCha20Rng::seed_from_u64(mix_seed(c.seeds.sampling.unwrap_or_default(), round, 4));
        let mut cr = ClientRound::new(round, &c.id, params.clone(), policy, &mut rng);
        if let Some(signed) = plan.and_then(|p| p.secure.as_ref()) {
            cr.require_params(signed).map_err(sa)?;
        }
        cr.bind(context, min_survivors, min_collusion).map_err(sa)?;
        let keys = cr
            .advertise(c.signer.as_ref().expect("secure runs have signers"))
            .map_err(sa)?;
        row.bytes_up += wire(round, SecAggBody::Keys(keys.clone()))?;
        server.receive_keys(&c.id, keys).map_err(sa)?;
        rounds.insert(j.client, cr);
    }
    let fail = |server_err: SecAggError| -> Result<Option<FlatAdapter>, SimError> {
        tracing::warn!(round, error = %server_err, "secure round failed");
        Ok(None)
    };
    use fedlora_protocol::secagg::SecAggError;
    if let Err(e) = server.close_keys() {
        return fail(e);
    }
    for j in &jobs {
        let c = &clients[j.client];
        let mut rng =
            ChaCha20Rng::seed_from_u64(mix_seed(c.seeds.sampling.unwrap_or_default(), round, 5));
        let cr = rounds.get_mut(&j.client).expect("advertised");
        let view = server
            .roster_view(&c.id)
            .ok_or_else(|| SimError::Config(format!("{} left out of the roster", c.id)))?;
        let shares = cr.share_keys(&view, verifier, &mut rng).map_err(sa)?;
        row.bytes_up += wire(round, SecAggBody::Shares(shares.clone()))?;
        server.receive_shares(&c.id, shares).map_err(sa)?;
    }
    let deliveries = match server.close_shares() {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    // dropouts leave now, after sharing keys
    let jobs = leave_dropped(clients, jobs, row);
    let trained = train_jobs(clients, jobs, env)?;
    note_training(row, &trained);
    let mut survivors = Vec::new();
    for t in trained {
        let c = &mut clients[t.client];
        c.residual = t.residual;
        if t.fate == Fate::Late {
            row.late += 1;
            continue;
        }
        let ints = fcfg.train.codec.modular_payload(&t.payload, spec)?;
        let cr = rounds.get_mut(&t.client).expect("advertised");
        let mine = deliveries.get(&c.id).cloned().unwrap_or_default();
        let y = cr.masked_input(&mine, &ints).map_err(sa)?;
        let mut packed = Vec::new();
        fedlora_protocol::codec::bits::pack(y.iter().copied(), modulus, &mut packed);
        let digest: [u8; 32] = Sha256::digest(&packed).into();
        let statement = cr
            .mask_statement(c.signer.as_ref().expect("secure runs have signers"))
            .map_err(sa)?;
        let plen = packed.len() as u64;
        row.bytes_up += wire(
            round,
            SecAggBody::Input {
                packed,
                statement: statement.clone(),
            },
        )?;
        row.pad_bytes_up += t.pad_bytes;
        server.receive_input(&c.id, y, statement).map_err(sa)?;
        if plan.is_some() {
            // charged when its masked input leaves: the neighbours' shares alone unmask it
            c.participated += 1;
        }
        let meta = UploadMeta {
            digest,
            weight: 1.0,
            bytes: plen,
            train_loss: None,
            rank: c.rank.map(|r| r as u32),
            base_round: None,
        };
        fed.accept_upload(&c.id, round, meta)
            .map_err(|e| SimError::Config(e.to_string()))?;
        survivors.push(t.client);
    }
    let view = match server.close_inputs() {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    for ci in &survivors {
        let c = &clients[*ci];
        let cr = rounds.get_mut(ci).expect("advertised");
        let sig = match cr.consistency(&view, c.signer.as_ref().expect("secure runs have signers"))
        {
            Ok(sig) => sig,
            // the client's policy refuses this view (too few survivors): it withholds
            Err(SecAggError::Threshold(_)) if plan.is_some() => continue,
            Err(e) => return Err(sa(e)),
        };
        row.bytes_up += wire(round, SecAggBody::Consistency(sig.clone()))?;
        server.receive_consistency(&c.id, sig).map_err(sa)?;
    }
    let req = match server.close_consistency() {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    for ci in &survivors {
        let cr = rounds.get_mut(ci).expect("advertised");
        let sigs = server.signatures_for(&clients[*ci].id);
        let statements = server.statements_for(&clients[*ci].id);
        let resp = match cr.unmask(&req, &sigs, &statements, verifier) {
            Ok(r) => r,
            Err(e) if plan.is_some() => {
                tracing::debug!(round, error = %e, "client withholds its unmask shares");
                continue;
            }
            Err(e) => return Err(sa(e)),
        };
        row.bytes_up += wire(round, SecAggBody::Unmask(resp.clone()))?;
        server.receive_unmask(resp).map_err(sa)?;
    }
    let (sum, counted) = match server.finish() {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    row.aggregated = counted.len();
    if let Codec::Skellam(p) = codec {
        row.near_wrap = Some(p.near_wrap(&sum) as u64);
    }
    let ms = ModularSum::from_sum(sum, modulus, counted.len());
    // every counted client masked its full padded delta; component j is over ranks above j
    let counts = RankCounts::new(
        env.full_rank,
        counted.iter().map(|id| {
            let rank = clients.iter().find(|c| &c.id == id).and_then(|c| c.rank);
            (1.0, rank.unwrap_or(env.full_rank))
        }),
    );
    Ok(Some(modular_sum_delta(
        &fcfg.train.codec,
        spec,
        ctx,
        &ms,
        &counts,
    )?))
}
