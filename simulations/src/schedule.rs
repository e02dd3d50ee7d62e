//! How a run in simulated time turns updates into versions: synchronous rounds (optionally
//! over-selected) or buffered asynchronous aggregation (FedBuff). The grid keys `mode`,
//! `over_selection`, `buffer`, `staleness` and `concurrency` expand into one [`Schedule`] per
//! meaningful combination.

use serde::{Deserialize, Serialize};

use crate::error::SimError;

/// One schedule of a sweep point (only in sweeps with a `[fleet]` table).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// "sync" or "async".
    pub mode: String,
    /// Sync: devices sampled per round as a multiple of `clients_per_round` K; the round keeps
    /// the first K to finish (1: no over-selection, the round waits for every sampled device
    /// that stays online, or its timeout).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub over_selection: f64,
    /// Async: updates per version, K.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer: Option<usize>,
    /// Async: staleness weight (`constant`, `poly:A`, `hinge:A,B`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staleness: Option<String>,
    /// Async: most devices training at once (0: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
}

fn one() -> f64 {
    1.0
}

fn is_one(x: &f64) -> bool {
    *x == 1.0
}

impl Schedule {
    /// Whether it is FedBuff.
    pub fn is_async(&self) -> bool {
        self.mode == "async"
    }

    /// A short label: `sync`, `sync ×1.3`, `fedbuff K=10 poly:0.5 C=20`.
    pub fn label(&self) -> String {
        if self.is_async() {
            let mut s = format!(
                "fedbuff K={} {}",
                self.buffer.unwrap_or(0),
                self.staleness.as_deref().unwrap_or("poly:0.5")
            );
            if let Some(c) = self.concurrency.filter(|&c| c > 0) {
                s.push_str(&format!(" C={c}"));
            }
            s
        } else if self.over_selection != 1.0 {
            format!("sync ×{}", self.over_selection)
        } else {
            "sync".into()
        }
    }
}

/// The grid's schedule keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleGrid {
    /// "sync" and/or "async".
    pub mode: Vec<String>,
    /// Sync: over-selection factors (≥ 1).
    pub over_selection: Vec<f64>,
    /// Async: buffer sizes K.
    pub buffer: Vec<usize>,
    /// Async: staleness weights.
    pub staleness: Vec<String>,
    /// Async: concurrency limits (0: none).
    pub concurrency: Vec<usize>,
}

impl ScheduleGrid {
    /// Every meaningful combination: sync × over-selection, then async × buffer × staleness ×
    /// concurrency (sync ignores the async keys and async the sync one).
    pub fn expand(&self) -> Result<Vec<Schedule>, SimError> {
        let mut out = Vec::new();
        for m in &self.mode {
            match m.as_str() {
                "sync" => {
                    for &o in &self.over_selection {
                        if !(o.is_finite() && o >= 1.0) {
                            return Err(SimError::Config(format!(
                                "grid.over_selection {o} must be at least 1"
                            )));
                        }
                        out.push(Schedule {
                            mode: "sync".into(),
                            over_selection: o,
                            buffer: None,
                            staleness: None,
                            concurrency: None,
                        });
                    }
                }
                "async" => {
                    for &b in &self.buffer {
                        for st in &self.staleness {
                            st.parse::<fedlora_protocol::Staleness>()
                                .map_err(|e| SimError::Config(format!("grid.staleness: {e}")))?;
                            for &c in &self.concurrency {
                                if b == 0 {
                                    return Err(SimError::Config(
                                        "grid.buffer must be at least 1".into(),
                                    ));
                                }
                                out.push(Schedule {
                                    mode: "async".into(),
                                    over_selection: 1.0,
                                    buffer: Some(b),
                                    staleness: Some(st.clone()),
                                    concurrency: Some(c),
                                });
                            }
                        }
                    }
                }
                other => {
                    return Err(SimError::Config(format!(
                        "grid.mode {other:?}: expected \"sync\" or \"async\""
                    )))
                }
            }
        }
        Ok(out)
    }
}
