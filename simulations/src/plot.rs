//! The sweep's figures, each as SVG and PNG (plotters, with an embedded DejaVu Sans font so
//! that no system font is needed):
//!
//! - `privacy_utility`: final utility against ε (∞ drawn at the right edge), mean ± one
//!   standard deviation over seeds, one line per setting;
//! - `utility_by_round`: utility after each round, mean over seeds, one line per setting;
//! - `utility_by_bytes`: utility against cumulative upload bytes, mean over seeds.
//!
//! Utility is test accuracy for classification (BCW) and held-out loss for the LM.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::SimError;
use crate::results::{RoundRow, RunSummary};
use crate::sweep::SweepConfig;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

fn register_font() {
    REGISTER.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Mean and sample standard deviation (0 for one value).
pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (m, 0.0);
    }
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0);
    (m, var.sqrt())
}

/// Mean ± sample sd of `v` at `digits` decimals (the mean alone for one value).
pub(crate) fn pm(v: &[f64], digits: usize) -> String {
    let (m, sd) = mean_sd(v);
    if v.len() > 1 {
        format!("{m:.digits$} ± {sd:.digits$}")
    } else {
        format!("{m:.digits$}")
    }
}

/// The label of a run's setting apart from ε and the seed: only the grid keys that vary.
pub fn series_label(sweep: &SweepConfig, s: &RunSummary) -> String {
    let g = &sweep.grid;
    let mut parts = Vec::new();
    if sweep.fleet.is_some() && g.schedules().expand().is_ok_and(|s| s.len() > 1) {
        parts.push(s.schedule.clone());
    }
    if g.privacy.len() > 1 {
        parts.push(s.privacy.clone());
    }
    if g.strategy.len() > 1 {
        parts.push(s.strategy.clone());
    }
    if g.client_ranks.len() > 1 {
        parts.push(if s.client_ranks == crate::sweep::UNIFORM_RANKS {
            "uniform ranks".to_string()
        } else {
            format!("ranks {}", s.client_ranks)
        });
    }
    if g.local_steps.len() > 1 {
        parts.push(format!("steps={}", s.local_steps));
    }
    if g.batch_size.len() > 1 {
        parts.push(format!("B={}", s.batch_size));
    }
    if g.dp_learning_rate.len() > 1 {
        parts.push(format!("dp_lr={}", s.learning_rate));
    }
    if g.delta.len() > 1 {
        parts.push(format!("δ={}", s.delta));
    }
    if g.clip.len() > 1 {
        parts.push(format!("C={}", s.clip));
    }
    if g.codec.len() > 1 {
        parts.push(s.codec.clone());
    }
    if g.rank.len() > 1 {
        parts.push(format!("r={}", s.rank));
    }
    if g.clients_per_round.len() > 1 {
        parts.push(format!("K={}", s.clients_per_round));
    }
    if g.rounds.len() > 1 {
        parts.push(format!("R={}", s.rounds));
    }
    if g.secure_aggregation.len() > 1 {
        parts.push(if s.secure_aggregation {
            "secagg".into()
        } else {
            "plain".into()
        });
    }
    if parts.is_empty() {
        "all runs".into()
    } else {
        parts.join(" ")
    }
}

/// Whether accuracy is the utility (classification); the LM's utility is its held-out loss.
pub fn uses_accuracy(sums: &[RunSummary]) -> bool {
    sums.iter().any(|s| s.task == "bcw")
}

/// The utility of a result: its accuracy when `accuracy` is the utility, else its loss.
pub(crate) fn utility_of(acc: Option<f64>, loss: f64, accuracy: bool) -> f64 {
    if accuracy {
        acc.unwrap_or(f64::NAN)
    } else {
        loss
    }
}

fn eps_value(e: &str) -> f64 {
    e.parse().unwrap_or(f64::INFINITY)
}

/// A run's utility, cumulative upload (MB) and simulated time (s) at one round.
type Point3 = (f64, f64, Option<f64>);

/// One line of a figure: label and points `(x, mean, sd)`.
type Series = (String, Vec<(f64, f64, f64)>);

/// Writes the figures into `dir`; returns the SVG paths (the PNGs sit beside them).
pub fn write_plots(
    sweep: &SweepConfig,
    rows: &[RoundRow],
    sums: &[RunSummary],
    dir: &Path,
) -> Result<Vec<PathBuf>, SimError> {
    std::fs::create_dir_all(dir)?;
    if sums.is_empty() {
        return Ok(Vec::new());
    }
    register_font();
    let acc = uses_accuracy(sums);
    let ylabel = if acc {
        "test accuracy"
    } else if sums.iter().any(|s| s.task == "llm") {
        "held-out NLL (nats/token)"
    } else {
        "held-out loss (nats/byte)"
    };
    let label_of: BTreeMap<&str, String> = sums
        .iter()
        .map(|s| (s.run.as_str(), series_label(sweep, s)))
        .collect();

    // privacy-utility: final utility by (series, ε)
    let finite: Vec<f64> = sums
        .iter()
        .map(|s| eps_value(&s.epsilon))
        .filter(|e| e.is_finite())
        .collect();
    // ε on a log2 axis; ∞ one step right of the largest finite ε
    let max_finite = finite.iter().copied().fold(1.0f64, f64::max);
    let inf_x = max_finite.log2().ceil() + 1.0;
    let mut by: BTreeMap<String, BTreeMap<u64, Vec<f64>>> = BTreeMap::new();
    for s in sums {
        let e = eps_value(&s.epsilon);
        let x = if e.is_finite() { e.log2() } else { inf_x };
        by.entry(label_of[s.run.as_str()].clone())
            .or_default()
            .entry(x.to_bits())
            .or_default()
            .push(utility_of(s.final_accuracy, s.final_loss, acc));
    }
    let pu: Vec<Series> = by
        .into_iter()
        .map(|(l, m)| {
            let mut pts: Vec<(f64, f64, f64)> = m
                .into_iter()
                .map(|(x, v)| {
                    let (mu, sd) = mean_sd(&v);
                    (f64::from_bits(x), mu, sd)
                })
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            (l, pts)
        })
        .collect();

    // by round and by bytes: per (series + ε), mean over seeds
    // per label and round: (utility, cumulative MB up, simulated seconds) of each run
    let mut per_round: BTreeMap<String, BTreeMap<u64, Vec<Point3>>> = BTreeMap::new();
    let mut cum: BTreeMap<&str, f64> = BTreeMap::new();
    for r in rows {
        let c = cum.entry(r.run.as_str()).or_default();
        *c += r.bytes_up as f64;
        let Some(loss) = r.loss else { continue };
        let label = format!("ε={} {}", r.epsilon, label_of[r.run.as_str()]);
        per_round
            .entry(label)
            .or_default()
            .entry(r.round)
            .or_default()
            .push((utility_of(r.accuracy, loss, acc), *c / 1e6, r.sim_seconds));
    }
    let mut by_round: Vec<Series> = Vec::new();
    let mut by_bytes: Vec<Series> = Vec::new();
    // runs in simulated time: utility against the simulated wall time (hours), the mean time
    // and utility over seeds at each version
    let mut by_time: Vec<Series> = Vec::new();
    for (l, m) in per_round {
        let mut a = Vec::new();
        let mut b = Vec::new();
        let mut t = Vec::new();
        for (round, v) in m {
            let u: Vec<f64> = v.iter().map(|x| x.0).collect();
            let bytes: Vec<f64> = v.iter().map(|x| x.1).collect();
            let (mu, sd) = mean_sd(&u);
            a.push((round as f64, mu, sd));
            b.push((mean_sd(&bytes).0, mu, sd));
            let hours: Vec<f64> = v.iter().filter_map(|x| x.2).map(|s| s / 3600.0).collect();
            if hours.len() == v.len() {
                t.push((mean_sd(&hours).0, mu, sd));
            }
        }
        by_round.push((l.clone(), a));
        if !t.is_empty() {
            by_time.push((l.clone(), t));
        }
        by_bytes.push((l, b));
    }
    let timed = !by_time.is_empty();
    let mut out = Vec::new();
    for (name, title, xlabel, series, inf) in [
        (
            "privacy_utility",
            format!("{}: utility vs ε (mean ± sd over seeds)", sweep.name),
            "target ε per client (log scale; ∞: no DP)",
            &pu,
            Some(inf_x),
        ),
        (
            "utility_by_round",
            format!("{}: utility by round", sweep.name),
            "round",
            &by_round,
            None,
        ),
        (
            "utility_by_bytes",
            format!("{}: utility vs upload bytes", sweep.name),
            "cumulative upload (MB, all clients)",
            &by_bytes,
            None,
        ),
        (
            "utility_by_time",
            format!("{}: utility against simulated wall time", sweep.name),
            "simulated wall time (hours; mean over seeds at each version)",
            &by_time,
            None,
        ),
    ] {
        if name == "utility_by_time" && !timed {
            continue;
        }
        let svg = dir.join(format!("{name}.svg"));
        let png = dir.join(format!("{name}.png"));
        {
            let root = SVGBackend::new(&svg, (900, 560)).into_drawing_area();
            draw(&root, &title, xlabel, ylabel, series, inf)
                .map_err(|e| SimError::Output(format!("{}: {e}", svg.display())))?;
        }
        {
            let root = BitMapBackend::new(&png, (900, 560)).into_drawing_area();
            draw(&root, &title, xlabel, ylabel, series, inf)
                .map_err(|e| SimError::Output(format!("{}: {e}", png.display())))?;
        }
        out.push(svg);
    }
    Ok(out)
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[Series],
    inf_x: Option<f64>,
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let pts = series.iter().flat_map(|s| s.1.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, m, sd) in pts {
        if !m.is_finite() {
            continue;
        }
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(m - sd);
        y1 = y1.max(m + sd);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let xpad = ((x1 - x0) * 0.05).max(1e-3);
    let ypad = ((y1 - y0) * 0.08).max(1e-3);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(64)
        .build_cartesian_2d(x0 - xpad..x1 + xpad, y0 - ypad..y1 + ypad)?;
    let fmt_x = |x: &f64| match inf_x {
        Some(i) if (*x - i).abs() < 1e-9 => "∞".to_string(),
        Some(_) => {
            let v = x.exp2();
            let r = (v * 1000.0).round() / 1000.0;
            format!("{r}")
        }
        None => {
            let r = (x * 1e6).round() / 1e6;
            format!("{r}")
        }
    };
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(xlabel)
        .y_desc(ylabel)
        .label_style(("sans-serif", 13))
        .x_label_formatter(&fmt_x);
    if inf_x.is_some() {
        // whole powers of two only
        mesh.x_labels(((x1 - x0).round() as usize + 1).max(2));
    }
    mesh.draw()?;
    for (k, (label, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        // series that coincide (e.g. identical utility at every ε) stay distinguishable: each
        // has its own dash pattern and marker, and earlier series are drawn wider underneath
        let style = k % 4;
        let width = 1 + (3 - style as u32);
        let line = pts.iter().map(|p| (p.0, p.1));
        let drawn = match style {
            0 => chart.draw_series(LineSeries::new(line, color.stroke_width(width)))?,
            1 => chart.draw_series(DashedLineSeries::new(
                line,
                10,
                5,
                color.stroke_width(width),
            ))?,
            2 => chart.draw_series(DashedLineSeries::new(line, 2, 5, color.stroke_width(width)))?,
            _ => chart.draw_series(DashedLineSeries::new(
                line,
                16,
                4,
                color.stroke_width(width),
            ))?,
        };
        drawn.label(label.clone()).legend(move |(x, y)| {
            EmptyElement::at((x, y))
                + PathElement::new(vec![(0, 0), (18, 0)], color.stroke_width(width))
                + marker(style, (9, 0), color)
        });
        chart.draw_series(
            pts.iter()
                .map(|p| EmptyElement::at((p.0, p.1)) + marker(style, (0, 0), color)),
        )?;
        chart.draw_series(pts.iter().filter(|p| p.2 > 0.0).map(|p| {
            PathElement::new(
                vec![(p.0, p.1 - p.2), (p.0, p.1 + p.2)],
                color.stroke_width(1),
            )
        }))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The marker of series style `style` (0–3): filled circle, triangle, cross, hollow circle.
fn marker<DB: DrawingBackend>(
    style: usize,
    at: (i32, i32),
    color: RGBAColor,
) -> DynElement<'static, DB, (i32, i32)> {
    match style {
        0 => Circle::new(at, 4, color.filled()).into_dyn(),
        1 => TriangleMarker::new(at, 5, color.filled()).into_dyn(),
        2 => Cross::new(at, 4, color.stroke_width(2)).into_dyn(),
        _ => Circle::new(at, 5, color.stroke_width(2)).into_dyn(),
    }
}
