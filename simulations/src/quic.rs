//! Running one sweep point over the real stack: a [`Coordinator`] (QUIC, mutual TLS, sled) and
//! one SDK [`FederatedClient`] per virtual client, all on loopback in this process.
//!
//! Clients get the same learners, seeds and privacy targets as in-process runs, and the round
//! machine waits for the whole population before sampling, so for the same seed both transports
//! train the same clients on the same batches and aggregate in the same order. Differences left:
//! per-round compute time is not measured (only round wall time, from the coordinator's
//! records), and fault injection is in-process only.

use std::collections::BTreeMap;
use std::time::Duration;

use fedlora_client::privacy::PrivacyState;
use fedlora_client::sdk::{ClientConfig, FederatedClient};
use fedlora_client::transport::ClientTls;
use fedlora_coordinator::certs::{default_server_names, init_certs};
use fedlora_coordinator::store::RoundStatus;
use fedlora_coordinator::{Coordinator, CoordinatorConfig, Event};
use fedlora_protocol::FlatAdapter;

use crate::error::SimError;
use crate::results::{RoundRow, RunColumns, RunOutput, RunSummary};
use crate::runner::{client_seeds, federation_config, privacy_target};
use crate::sweep::{Point, SweepConfig};
use crate::task::Population;

/// Runs `point` over QUIC on loopback. `on_round(round)` is called as rounds commit or fail.
pub fn run_over_quic(
    sweep: &SweepConfig,
    point: &Point,
    mut on_round: impl FnMut(u64),
) -> Result<RunOutput, SimError> {
    if sweep.faults.dropout > 0.0 || sweep.faults.straggler > 0.0 {
        return Err(SimError::Config(
            "fault injection (faults.dropout, faults.straggler) runs in-process only".into(),
        ));
    }
    let t0 = std::time::Instant::now();
    let pop = Population::build(&sweep.task, point.rank, point.seed)?;
    let n = pop.learners.len();
    if point.privacy().client_level() {
        return Err(SimError::Config(
            "client-level DP points run in-process (transport = in-process)".into(),
        ));
    }
    let fcfg = federation_config(sweep, point, n, pop.initial.spec().numel())?;
    let target = privacy_target(sweep, point);
    let ranks = crate::sweep::parse_client_ranks(&point.client_ranks, n)?;
    let tmp = tempfile::tempdir()?;
    let certs = tmp.path().join("certs");
    init_certs(&certs, n, &default_server_names())?;
    let mut cfg = CoordinatorConfig::new(tmp.path().join("coordinator"), &certs);
    cfg.listen = "127.0.0.1:0".parse().expect("valid address");
    cfg.federation = fcfg.clone();
    cfg.tick_ms = 20;
    cfg.poll_interval_ms = 50;
    let startup_s = t0.elapsed().as_secs_f64();
    let rt = tokio::runtime::Runtime::new()?;
    let (globals, report) = rt.block_on(async {
        let coord = Coordinator::start(cfg, pop.initial.clone()).await?;
        let addr = coord
            .local_addr()
            .map_err(|e| SimError::Config(e.to_string()))?;
        let mut events = coord.events();
        let mut handles = Vec::new();
        for (i, learner) in pop.learners.iter().enumerate() {
            let mut cc = ClientConfig::new(addr, ClientTls::from_dir(&certs, i));
            cc.state_dir = Some(tmp.path().join(format!("client-{i}")));
            let seeds = client_seeds(point.seed, i);
            cc.sampling_seed = seeds.sampling;
            cc.noise_seed = seeds.noise;
            cc.privacy = target;
            cc.max_connect_attempts = Some(20);
            cc.max_rank = ranks.as_ref().map(|r| r[i] as u32);
            let client = FederatedClient::with_learner(cc, learner.clone())?;
            handles.push(tokio::spawn(async move { client.run().await }));
        }
        let mut globals: BTreeMap<u64, FlatAdapter> = BTreeMap::new();
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(600), events.recv())
                .await
                .map_err(|_| SimError::Config("no progress over QUIC for 10 minutes".into()))?;
            match ev {
                Ok(Event::RoundCommitted { round, version }) => {
                    let (v, g) = coord.global();
                    if v != version {
                        return Err(SimError::Config(format!(
                            "global moved on to version {v} before version {version} was read"
                        )));
                    }
                    globals.insert(version, g);
                    on_round(round);
                }
                Ok(Event::RoundFailed { round, .. }) => on_round(round),
                Ok(Event::Finished { .. }) => break,
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => return Err(SimError::Config(format!("coordinator events: {e}"))),
            }
        }
        coord.wait_finished(Duration::from_millis(200)).await;
        let report = coord.report()?;
        coord.shutdown().await;
        for h in handles {
            match h.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "a client ended with an error"),
                Err(e) => tracing::warn!(error = %e, "a client task failed"),
            }
        }
        Ok::<_, SimError>((globals, report))
    })?;

    let cols = RunColumns::new(sweep, point, "quic");
    let mut rows = Vec::new();
    let mut row0 = RoundRow::new(&cols, 0);
    row0.status = "initial".into();
    let u = pop.evaluate(&pop.initial)?;
    row0.loss = Some(u.loss);
    row0.accuracy = u.accuracy;
    rows.push(row0);
    // σ and q the clients calibrated (the coordinator never learns them, nor ε: DP uploads
    // carry none): the same calibration, once per client; ε so far per client from its
    // (q, σ) and the DP-SGD steps of the rounds it took part in, in order
    let mut dp_steps: BTreeMap<String, u64> = BTreeMap::new();
    let mut eps_so_far: BTreeMap<String, f64> = BTreeMap::new();
    let mut calibrated: BTreeMap<usize, Option<(f64, f64)>> = BTreeMap::new();
    let client_index = |who: &str| -> usize {
        who.strip_prefix("client-")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    for rr in &report.rounds {
        let rec = &rr.record;
        let mut row = RoundRow::new(&cols, rec.round);
        row.selected = rec.selected.len();
        row.aggregated = rec.participants.len();
        row.bytes_up = rec.bytes_up.values().sum();
        row.bytes_down = rec.bytes_down.values().sum();
        row.train_loss = rec.train_loss;
        if let Some(end) = rec.ended_ms {
            row.wall_s = end.saturating_sub(rec.started_ms) as f64 / 1e3;
        }
        for c in &rec.participants {
            *dp_steps.entry(c.clone()).or_default() += u64::from(fcfg.train.local_steps);
        }
        match rec.status {
            RoundStatus::Committed { version } => {
                row.version = version;
                row.status = "committed".into();
                if let Some(g) = globals.get(&version) {
                    let last = version >= point.rounds;
                    if version.is_multiple_of(sweep.eval_every) || last {
                        let u = pop.evaluate(g)?;
                        row.loss = Some(u.loss);
                        row.accuracy = u.accuracy;
                    }
                }
            }
            _ => {
                row.version = rec.base_version;
                row.status = "failed".into();
            }
        }
        if let (Some(t), Some(plan)) = (target, &fcfg.train.dp) {
            let mut calibration = |i: usize| -> Result<Option<(f64, f64)>, SimError> {
                if let Some(qs) = calibrated.get(&i) {
                    return Ok(*qs);
                }
                let mut ps = PrivacyState::in_memory(t)?;
                let examples = pop.learners[i].train_examples();
                let qs = ps
                    .approve(plan, &fcfg.train, examples)
                    .ok()
                    .and_then(|_| ps.plan().map(|p| (p.q, p.sigma)));
                calibrated.insert(i, qs);
                Ok(qs)
            };
            for c in &rec.participants {
                if let Some((q, sigma)) = calibration(client_index(c))? {
                    let steps = dp_steps.get(c).copied().unwrap_or(0);
                    let ev = fedlora_dp::DpEvent::dp_sgd(q, sigma, steps);
                    if let Ok(e) = t.accountant.epsilon(&ev, t.delta) {
                        eps_so_far.insert(c.clone(), e);
                    }
                }
            }
            if let Some((who, eps)) = eps_so_far.iter().max_by(|a, b| a.1.total_cmp(b.1)) {
                let qs = calibration(client_index(who))?;
                row.q = qs.map(|p| p.0);
                row.sigma = qs.map(|p| p.1);
                row.eps_spent = Some(*eps);
                row.dp_steps = dp_steps.get(who).copied();
            }
        }
        rows.push(row);
    }
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let summary = RunSummary::from_rows(&cols, &rows, startup_s, threads);
    Ok(RunOutput { rows, summary })
}
