//! Running a sweep into an output directory, resuming it, sharding it, and merging shards.
//!
//! ```text
//! OUT/sweep.toml                  the sweep file as run (merge and resume check it)
//! OUT/runs/<key>.rounds.csv       one finished run's rows
//! OUT/runs/<key>.summary.csv      its summary, written last: its presence marks the run done
//! OUT/rounds.csv, OUT/summary.csv every finished run of the sweep, in point order
//! OUT/plots/*.svg, *.png          figures;  OUT/report.md  the report
//! ```
//! A run is the unit of resumption: an interrupted sweep redoes only the run that was cut off.
//! Run keys hash the point and the sweep's fingerprint, so a changed sweep file never picks up
//! stale results.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::SimError;
use crate::results::{RoundRow, RunOutput, RunSummary};
use crate::sweep::{Point, Shard, SweepConfig};

/// How points are run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// Virtual clients in this process (default).
    #[default]
    InProcess,
    /// Coordinator and SDK clients over QUIC + mTLS on loopback.
    Quic,
}

/// Options of [`run_sweep`].
#[derive(Clone, Debug, Default)]
pub struct SweepOptions {
    /// Run only this shard's points.
    pub shard: Option<Shard>,
    /// Transport.
    pub transport: Transport,
    /// Worker threads for client training (default: available parallelism).
    pub threads: Option<usize>,
    /// Show a progress bar (when stderr is a terminal).
    pub progress: bool,
}

/// What [`run_sweep`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SweepOutcome {
    /// Points of this shard.
    pub points: usize,
    /// Runs executed now.
    pub ran: usize,
    /// Runs found finished and not redone.
    pub resumed: usize,
    /// Where the report is.
    pub report: PathBuf,
}

fn runs_dir(out: &Path) -> PathBuf {
    out.join("runs")
}

fn rounds_file(out: &Path, key: &str) -> PathBuf {
    runs_dir(out).join(format!("{key}.rounds.csv"))
}

fn summary_file(out: &Path, key: &str) -> PathBuf {
    runs_dir(out).join(format!("{key}.summary.csv"))
}

fn out_err(path: &Path, e: impl std::fmt::Display) -> SimError {
    SimError::Output(format!("{}: {e}", path.display()))
}

/// Writes `records` as CSV to `path` (via a temporary file and a rename).
pub fn write_csv<T: Serialize>(path: &Path, records: &[T]) -> Result<(), SimError> {
    let tmp = path.with_extension("csv.tmp");
    {
        let mut w = csv::Writer::from_path(&tmp).map_err(|e| out_err(&tmp, e))?;
        for r in records {
            w.serialize(r).map_err(|e| out_err(&tmp, e))?;
        }
        w.flush().map_err(|e| out_err(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| out_err(path, e))
}

/// Reads CSV records written by [`write_csv`].
pub fn read_csv<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, SimError> {
    let mut r = csv::Reader::from_path(path).map_err(|e| out_err(path, e))?;
    r.deserialize()
        .collect::<Result<Vec<T>, _>>()
        .map_err(|e| out_err(path, e))
}

/// The pool virtual clients train on: `threads` workers (default: available parallelism).
pub fn thread_pool(threads: Option<usize>) -> Result<rayon::ThreadPool, SimError> {
    let threads = threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| SimError::Config(format!("thread pool: {e}")))
}

/// Runs every point of `sweep` (of this shard) that `out` has no result for, then writes the
/// joined CSVs, plots and report of all finished points.
pub fn run_sweep(
    sweep: &SweepConfig,
    sweep_text: &str,
    out: &Path,
    opts: &SweepOptions,
) -> Result<SweepOutcome, SimError> {
    std::fs::create_dir_all(runs_dir(out))?;
    std::fs::write(out.join("sweep.toml"), sweep_text)?;
    let (points, _) = sweep.points();
    let mine: Vec<&Point> = points
        .iter()
        .filter(|p| opts.shard.is_none_or(|s| s.runs(p)))
        .collect();
    let todo: Vec<&Point> = mine
        .iter()
        .copied()
        .filter(|p| !summary_file(out, &sweep.run_key(p)).exists())
        .collect();
    let resumed = mine.len() - todo.len();
    let pool = thread_pool(opts.threads)?;
    let total_rounds: u64 = todo.iter().map(|p| p.rounds).sum();
    let bar = if opts.progress {
        indicatif::ProgressBar::new(total_rounds)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} rounds · run {msg} · eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    if resumed > 0 {
        tracing::info!(resumed, "runs already finished are kept");
    }
    for (i, p) in todo.iter().enumerate() {
        let key = sweep.run_key(p);
        bar.set_message(format!("{}/{} ({key})", i + 1, todo.len()));
        let t0 = Instant::now();
        let result = match opts.transport {
            Transport::InProcess => crate::runner::run_in_process(sweep, p, &pool, |_| bar.inc(1)),
            Transport::Quic => crate::quic::run_over_quic(sweep, p, |_| bar.inc(1)),
        }?;
        save_run(out, &key, &result)?;
        let line = format!(
            "{key}: {} → loss {:.4}{}{} in {:.1} s",
            p.setting(),
            result.summary.final_loss,
            result
                .summary
                .final_accuracy
                .map(|a| format!(", accuracy {a:.3}"))
                .unwrap_or_default(),
            result
                .summary
                .eps_spent
                .map(|e| format!(", ε spent {e:.3}"))
                .unwrap_or_default(),
            t0.elapsed().as_secs_f64()
        );
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    }
    bar.finish_and_clear();
    let report = finalize(sweep, out)?;
    Ok(SweepOutcome {
        points: mine.len(),
        ran: todo.len(),
        resumed,
        report,
    })
}

fn save_run(out: &Path, key: &str, r: &RunOutput) -> Result<(), SimError> {
    write_csv(&rounds_file(out, key), &r.rows)?;
    write_csv(&summary_file(out, key), std::slice::from_ref(&r.summary))
}

/// Every finished run of `sweep` found in `out`, in point order.
pub fn load_runs(
    sweep: &SweepConfig,
    out: &Path,
) -> Result<(Vec<RoundRow>, Vec<RunSummary>), SimError> {
    let (points, _) = sweep.points();
    let mut rows = Vec::new();
    let mut sums = Vec::new();
    for p in &points {
        let key = sweep.run_key(p);
        let s = summary_file(out, &key);
        if !s.exists() {
            continue;
        }
        // the point decides the configuration columns (results written before a column
        // existed get it filled in)
        let cols = crate::results::RunColumns::new(sweep, p, "");
        let fill = |privacy: &mut String| {
            if privacy.is_empty() {
                privacy.clone_from(&cols.privacy);
            }
        };
        for mut r in read_csv::<RoundRow>(&rounds_file(out, &key))? {
            fill(&mut r.privacy);
            rows.push(r);
        }
        for mut r in read_csv::<RunSummary>(&s)? {
            fill(&mut r.privacy);
            sums.push(r);
        }
    }
    Ok((rows, sums))
}

/// Writes `rounds.csv`, `summary.csv`, the plots and `report.md` from the finished runs in
/// `out`. Returns the report's path.
pub fn finalize(sweep: &SweepConfig, out: &Path) -> Result<PathBuf, SimError> {
    let (rows, sums) = load_runs(sweep, out)?;
    write_csv(&out.join("rounds.csv"), &rows)?;
    write_csv(&out.join("summary.csv"), &sums)?;
    let plots = crate::plot::write_plots(sweep, &rows, &sums, &out.join("plots"))?;
    let report = out.join("report.md");
    std::fs::write(
        &report,
        crate::report::markdown(sweep, &rows, &sums, &plots, out),
    )?;
    Ok(report)
}

/// Joins the outputs of shard directories into `out`: every shard must have run the same sweep
/// file. Returns the sweep and the report's path.
pub fn merge(shards: &[PathBuf], out: &Path) -> Result<(SweepConfig, PathBuf), SimError> {
    let first = shards
        .first()
        .ok_or_else(|| SimError::Config("merge needs at least one shard directory".into()))?;
    let read = |dir: &Path| -> Result<(String, SweepConfig), SimError> {
        let path = dir.join("sweep.toml");
        let text = std::fs::read_to_string(&path).map_err(|e| out_err(&path, e))?;
        let sweep = SweepConfig::from_toml(&text)?;
        Ok((text, sweep))
    };
    let (text, sweep) = read(first)?;
    for dir in &shards[1..] {
        if read(dir)?.1 != sweep {
            return Err(SimError::Config(format!(
                "{} ran a different sweep than {}",
                dir.display(),
                first.display()
            )));
        }
    }
    std::fs::create_dir_all(runs_dir(out))?;
    for dir in shards {
        for e in std::fs::read_dir(runs_dir(dir))? {
            let e = e?;
            let name = e.file_name();
            if name.to_string_lossy().ends_with(".csv") {
                std::fs::copy(e.path(), runs_dir(out).join(&name))?;
            }
        }
    }
    std::fs::write(out.join("sweep.toml"), &text)?;
    let report = finalize(&sweep, out)?;
    Ok((sweep, report))
}
