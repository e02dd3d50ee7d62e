//! The report's section for runs in simulated time: each schedule's final loss, the simulated
//! time it took, its mean staleness, and how soon it reached the synchronous baseline's final
//! loss.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::results::{RoundRow, RunSummary};
use crate::sweep::SweepConfig;

/// [`crate::plot::pm`], with "—" for no values.
fn pm(v: &[f64], digits: usize) -> String {
    if v.is_empty() {
        return "—".into();
    }
    crate::plot::pm(v, digits)
}

/// Every setting of a run but its schedule and seed: the runs one table row (and one
/// reference) stands for.
fn settings(x: &RunSummary) -> String {
    format!(
        "{} {} {} {} {} {} {} {} {} {} {} {} {} {} {} {} {} {}",
        x.task,
        x.partition,
        x.clients,
        x.epsilon,
        x.delta,
        x.clip,
        x.codec,
        x.rank,
        x.clients_per_round,
        x.rounds,
        x.secure_aggregation,
        x.strategy,
        x.client_ranks,
        x.local_steps,
        x.batch_size,
        x.learning_rate,
        x.privacy,
        x.transport
    )
}

/// From when on a curve stays at or below `target`: the time of the first evaluation after its
/// last one above it (`None`: it ends above). A first dip below the target on a noisy curve
/// does not count, so a densely evaluated run gains no head start from its noise.
fn reached(curve: &[(f64, f64)], target: f64) -> Option<f64> {
    let last_above = curve.iter().rposition(|(_, l)| *l > target);
    match last_above {
        None => curve.first().map(|c| c.0),
        Some(i) => curve.get(i + 1).map(|c| c.0),
    }
}

/// One run's curve: (simulated seconds, held-out loss) at every evaluated version.
fn curve(rows: &[RoundRow], run: &str) -> Vec<(f64, f64)> {
    rows.iter()
        .filter(|r| r.run == run)
        .filter_map(|r| Some((r.sim_seconds?, r.loss?)))
        .collect()
}

/// The Markdown section (empty when no run has a schedule). The reference of a seed is its
/// run of the schedule named `sync` with the same other settings: its final loss and the
/// simulated time it ended at. "Time to sync's final loss" is when a run's held-out loss first
/// reached that loss, as a fraction of the reference's time.
pub fn section(sweep: &SweepConfig, rows: &[RoundRow], sums: &[RunSummary]) -> String {
    let mut s = String::new();
    if sweep.fleet.is_none() || sums.iter().all(|x| x.schedule.is_empty()) {
        return s;
    }
    let f = sweep.fleet.clone().unwrap_or_default();
    let _ = writeln!(
        s,
        "## Simulated time\n\nDevices: lognormal compute speeds (σ = {}, median {} s per \
         local step), {} % online at a time in a daily window each, uplink {} kB/s, downlink \
         {} kB/s, {} s latency; sync rounds wait at most {} s; runs stop after {} simulated \
         seconds. Loss is held-out (nats per byte; per token for an LLM task). *Time to sync's final loss*: from when on \
         the run's held-out loss stayed at or below the final loss of the same seed's `sync` \
         run with the same settings, as a fraction of that run's time (never: it ended \
         above it).\n",
        f.speed_sigma,
        f.step_s,
        f.online * 100.0,
        f.uplink_bytes_per_s / 1e3,
        f.downlink_bytes_per_s / 1e3,
        f.latency_s,
        f.round_timeout_s,
        f.max_sim_s,
    );
    // the reference of each (settings but the schedule, seed)
    let key = |x: &RunSummary| format!("{} seed={}", settings(x), x.seed);
    let mut reference: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for x in sums.iter().filter(|x| x.schedule == "sync") {
        if let Some(&(t, l)) = curve(rows, &x.run).last() {
            reference.insert(key(x), (t, l));
        }
    }
    let _ = writeln!(
        s,
        "| schedule | ε | seeds | versions | final loss | simulated hours | mean staleness | \
         time to sync's final loss |\n|---|---|---|---|---|---|---|---|"
    );
    let mut by: BTreeMap<(String, String), Vec<&RunSummary>> = BTreeMap::new();
    for x in sums {
        by.entry((settings(x), x.schedule.clone()))
            .or_default()
            .push(x);
    }
    for ((_, schedule), runs) in by {
        let eps = runs[0].epsilon.clone();
        let mut finals = Vec::new();
        let mut hours = Vec::new();
        let mut stale = Vec::new();
        let mut reach = Vec::new();
        let mut never = 0;
        for x in &runs {
            let c = curve(rows, &x.run);
            if let Some(&(t, l)) = c.last() {
                finals.push(l);
                hours.push(t / 3600.0);
            }
            let st: Vec<f64> = rows
                .iter()
                .filter(|r| r.run == x.run)
                .filter_map(|r| r.staleness)
                .collect();
            if !st.is_empty() {
                stale.push(st.iter().sum::<f64>() / st.len() as f64);
            }
            if let Some(&(t_ref, l_ref)) = reference.get(&key(x)) {
                match reached(&c, l_ref) {
                    Some(t) => reach.push(t / t_ref),
                    None => never += 1,
                }
            }
        }
        let reach_s = match (reach.is_empty(), never) {
            (true, 0) => "—".to_string(),
            (true, _) => "never".to_string(),
            (false, 0) => format!("{}×", pm(&reach, 2)),
            (false, n) => format!("{}× ({n} never)", pm(&reach, 2)),
        };
        let _ = writeln!(
            s,
            "| {schedule} | {eps} | {} | {} | {} | {} | {} | {reach_s} |",
            runs.len(),
            pm(
                &runs.iter().map(|x| x.committed as f64).collect::<Vec<_>>(),
                0
            ),
            pm(&finals, 4),
            pm(&hours, 2),
            pm(&stale, 2),
        );
    }
    s.push('\n');
    s
}
