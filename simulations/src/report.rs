//! The sweep's Markdown report: settings, the privacy-utility table (mean ± sd over seeds), the
//! answer to the sweep's question where it has one (the cost of the smallest ε against no DP),
//! the figures, and the cost of every run.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use crate::plot::{mean_sd, pm, series_label, uses_accuracy, utility_of};
use crate::results::{RoundRow, RunSummary};
use crate::sweep::SweepConfig;

/// The report's Markdown; `plots` are SVG paths, linked relative to `out`.
pub fn markdown(
    sweep: &SweepConfig,
    rows: &[RoundRow],
    sums: &[RunSummary],
    plots: &[PathBuf],
    out: &Path,
) -> String {
    let mut s = String::new();
    let (points, skipped) = sweep.points();
    let _ = writeln!(s, "# Sweep report: {}\n", sweep.name);
    if !sweep.question.is_empty() {
        let _ = writeln!(s, "**Question.** {}\n", sweep.question);
    }
    let t = &sweep.task;
    let _ = writeln!(
        s,
        "Task `{}`, partition `{}`{}, {} clients. Local training: {} steps of batch {} \
         (Poisson-expected under DP), Adam lr {}{}, accountant {}. Faults: dropout {}, \
         stragglers {}. {} of {} runs finished{}.\n",
        config_name(&t.name),
        config_name(&t.partition),
        if t.partition == crate::task::PartitionName::Dirichlet {
            format!(" (α = {})", t.alpha)
        } else {
            String::new()
        },
        t.clients,
        sweep.train.local_steps,
        sweep.train.batch_size,
        sweep.train.learning_rate,
        sweep
            .train
            .dp_learning_rate
            .map(|l| format!(" (under DP {l})"))
            .unwrap_or_default(),
        config_name(&sweep.train.accountant),
        sweep.faults.dropout,
        sweep.faults.straggler,
        sums.len(),
        points.len(),
        if skipped.is_empty() {
            String::new()
        } else {
            format!(
                "; {} settings skipped (secure aggregation needs a modular codec)",
                skipped.len()
            )
        }
    );
    if sums.is_empty() {
        return s;
    }
    let acc = uses_accuracy(sums);
    let has_acc = sums.iter().any(|r| r.final_accuracy.is_some());
    // privacy-utility table: by (setting, ε)
    let mut groups: BTreeMap<(String, u64), Vec<&RunSummary>> = BTreeMap::new();
    for r in sums {
        let e: f64 = r.epsilon.parse().unwrap_or(f64::INFINITY);
        groups
            .entry((series_label(sweep, r), e.to_bits()))
            .or_default()
            .push(r);
    }
    s.push_str(&crate::timed_report::section(sweep, rows, sums));
    let _ = writeln!(s, "## Privacy-utility table\n");
    if sweep.grid.privacy.iter().any(|p| p != "example") {
        let _ = writeln!(
            s,
            "ε is each client's target for the setting's unit: one example for `example` \
             (DP-SGD; *ε spent* is the largest any client spent, σ per step), one whole client \
             for `central` and `distributed:BITS` (*ε spent* is ε (a) against observers of the \
             released models, σ the noise in units of the sensitivity; ε (b), against the \
             coordinator, is the `eps_coordinator` column of `rounds.csv`). Mean ± sd over \
             seeds.\n"
        );
    } else {
        let _ = writeln!(
            s,
            "ε is each client's example-level target; *ε spent* is the largest any client spent \
             (the accountant's ε for that client's q, σ and steps at the run's δ). Mean ± sd \
             over seeds.\n"
        );
    }
    let _ = writeln!(
        s,
        "| setting | target ε | seeds | initial {} | {}final loss | ε spent | σ of that client | upload MB/run |",
        if acc { "accuracy" } else { "loss" },
        if has_acc { "final accuracy | " } else { "" }
    );
    let _ = writeln!(
        s,
        "|---|---|---|---|{}---|---|---|---|",
        if has_acc { "---|" } else { "" }
    );
    let mut sorted: Vec<_> = groups.iter().collect();
    sorted.sort_by(|a, b| {
        a.0 .0
            .cmp(&b.0 .0)
            .then(f64::from_bits(a.0 .1).total_cmp(&f64::from_bits(b.0 .1)))
    });
    for ((label, e), runs) in &sorted {
        let e = f64::from_bits(*e);
        let losses: Vec<f64> = runs.iter().map(|r| r.final_loss).collect();
        let accs: Vec<f64> = runs.iter().filter_map(|r| r.final_accuracy).collect();
        let eps: Vec<f64> = runs.iter().filter_map(|r| r.eps_spent).collect();
        let sig: Vec<f64> = runs.iter().filter_map(|r| r.sigma).collect();
        let mb: Vec<f64> = runs.iter().map(|r| r.bytes_up as f64 / 1e6).collect();
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {} | {}{} | {} | {} | {} |",
            if e.is_finite() {
                format!("{e}")
            } else {
                "∞ (no DP)".into()
            },
            runs.len(),
            {
                let v: Vec<f64> = runs
                    .iter()
                    .map(|r| utility_of(r.initial_accuracy, r.initial_loss, acc))
                    .collect();
                pm(&v, if acc { 3 } else { 4 })
            },
            if has_acc {
                format!("{} | ", pm(&accs, 3))
            } else {
                String::new()
            },
            pm(&losses, 4),
            if eps.is_empty() {
                "—".into()
            } else {
                pm(&eps, 3)
            },
            if sig.is_empty() {
                "—".into()
            } else {
                pm(&sig, 3)
            },
            pm(&mb, 3),
        );
    }
    let _ = writeln!(s);
    by_round_table(&mut s, sweep, rows, &groups, acc);
    // the headline: smallest ε against ∞, per setting
    let _ = writeln!(s);
    let mut by_label: BTreeMap<&str, Vec<(f64, &Vec<&RunSummary>)>> = BTreeMap::new();
    for ((label, e), runs) in &groups {
        by_label
            .entry(label.as_str())
            .or_default()
            .push((f64::from_bits(*e), runs));
    }
    for (label, mut v) in by_label {
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        // ε = 1 where swept (the default question), else the smallest ε
        let lo = v.iter().find(|x| x.0 == 1.0).or(v.first());
        let (Some(lo), Some(hi)) = (lo, v.last()) else {
            continue;
        };
        if !(lo.0.is_finite() && hi.0.is_infinite()) {
            continue;
        }
        let metric = |runs: &Vec<&RunSummary>| -> f64 {
            let v: Vec<f64> = runs
                .iter()
                .map(|r| utility_of(r.final_accuracy, r.final_loss, acc))
                .collect();
            mean_sd(&v).0
        };
        let (a, b) = (metric(lo.1), metric(hi.1));
        let _ = writeln!(
            s,
            "**{label}: ε = {} against ε = ∞.** {} {:.4} against {:.4} ({:+.4}{}).\n",
            lo.0,
            if acc {
                "Test accuracy"
            } else {
                "Held-out loss"
            },
            a,
            b,
            a - b,
            if acc {
                format!(", {:+.1} percentage points", 100.0 * (a - b))
            } else {
                String::new()
            }
        );
    }
    if !plots.is_empty() {
        let _ = writeln!(s, "## Figures\n");
        for p in plots {
            let rel = p.strip_prefix(out).unwrap_or(p);
            let name = p.file_stem().map(|n| n.to_string_lossy().into_owned());
            let _ = writeln!(s, "![{}]({})\n", name.unwrap_or_default(), rel.display());
        }
        let _ = writeln!(s, "(PNG versions beside the SVGs.)\n");
    }
    let _ = writeln!(s, "## Cost of each run\n");
    let _ = writeln!(
        s,
        "*wall*: the rounds' wall time; *compute*: summed client training time (in-process \
         runs); overhead = wall / (compute / threads), 1.0 being perfect scaling. Evaluation is \
         excluded from all three.\n"
    );
    let _ = writeln!(
        s,
        "| run | setting | seed | transport | rounds ok | startup s | wall s | compute s | threads | overhead | upload MB |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    for r in sums {
        let _ = writeln!(
            s,
            "| {} | ε={} {} | {} | {} | {}/{} | {:.2} | {:.2} | {:.2} | {} | {} | {:.3} |",
            r.run,
            r.epsilon,
            series_label(sweep, r),
            r.seed,
            r.transport,
            r.committed,
            r.rounds,
            r.startup_s,
            r.wall_s,
            r.compute_s,
            r.threads,
            r.overhead()
                .map_or_else(|| "—".to_string(), |o| format!("{o:.3}")),
            r.bytes_up as f64 / 1e6
        );
    }
    let _ = writeln!(
        s,
        "\nFiles: `rounds.csv` ({} rows, one per run and round), `summary.csv` (one per run), \
         `plots/`, `sweep.toml`.",
        rows.len()
    );
    s
}

/// The utility of each setting after selected rounds (mean ± sd over seeds), with the upload
/// per round and, with heterogeneous ranks, what zero padding cost.
fn by_round_table(
    s: &mut String,
    sweep: &SweepConfig,
    rows: &[RoundRow],
    groups: &BTreeMap<(String, u64), Vec<&RunSummary>>,
    acc: bool,
) {
    let max_round = rows.iter().map(|r| r.version).max().unwrap_or(0);
    if max_round == 0 {
        return;
    }
    let mut shown: Vec<u64> = [1, 2, 3, 5, 10, 15, 20, 30, 50, 100]
        .into_iter()
        .filter(|&r| r < max_round)
        .collect();
    shown.push(max_round);
    let by_run: BTreeMap<&str, Vec<&RoundRow>> = rows.iter().fold(BTreeMap::new(), |mut m, r| {
        m.entry(r.run.as_str()).or_insert_with(Vec::new).push(r);
        m
    });
    let padded = rows.iter().any(|r| r.pad_bytes_up > 0);
    let _ = writeln!(
        s,
        "## Utility by round
"
    );
    let _ = writeln!(
        s,
        "{} of the global adapter after each round (its global version), mean ± sd over seeds; \
         upload: all clients' wire bytes per round{}.\n",
        if acc {
            "Held-out accuracy"
        } else {
            "Held-out loss (nats per token)"
        },
        if padded {
            "; padding: the part of it that lower-rank clients spent on zero padding to the \
             global rank"
        } else {
            ""
        }
    );
    let head: Vec<String> = shown.iter().map(|r| format!("round {r}")).collect();
    let _ = writeln!(
        s,
        "| setting | target ε | {} | upload MB/round |{}",
        head.join(" | "),
        if padded { " padding MB/round |" } else { "" }
    );
    let _ = writeln!(
        s,
        "|---|---|{}---|{}",
        "---|".repeat(shown.len()),
        if padded { "---|" } else { "" }
    );
    for ((label, e), runs) in groups {
        let e = f64::from_bits(*e);
        let mut cells = Vec::new();
        for &v in &shown {
            let vals: Vec<f64> = runs
                .iter()
                .filter_map(|r| by_run.get(r.run.as_str()))
                .filter_map(|rr| {
                    rr.iter()
                        .find(|x| x.version == v && x.status == "committed")
                        .and_then(|x| {
                            let u = utility_of(x.accuracy, x.loss.unwrap_or(f64::NAN), acc);
                            u.is_finite().then_some(u)
                        })
                })
                .collect();
            cells.push(if vals.is_empty() {
                "—".to_string()
            } else {
                pm(&vals, if acc { 3 } else { 4 })
            });
        }
        let per_round = |f: &dyn Fn(&RoundRow) -> u64| -> Vec<f64> {
            runs.iter()
                .filter_map(|r| by_run.get(r.run.as_str()))
                .map(|rr| {
                    let trained: Vec<_> = rr.iter().filter(|x| x.round > 0).collect();
                    let total: u64 = trained.iter().map(|x| f(x)).sum();
                    total as f64 / 1e6 / trained.len().max(1) as f64
                })
                .collect()
        };
        let up = per_round(&|x| x.bytes_up);
        let pad = per_round(&|x| x.pad_bytes_up);
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {} |{}",
            if e.is_finite() {
                format!("{e}")
            } else {
                "∞".into()
            },
            cells.join(" | "),
            pm(&up, 4),
            if padded {
                format!(" {} |", pm(&pad, 4))
            } else {
                String::new()
            }
        );
    }
    let _ = sweep;
    let _ = writeln!(s);
}

/// A config value as the sweep file spells it (its serde name, e.g. `bcw`, `dirichlet`, `rdp`).
fn config_name<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}
