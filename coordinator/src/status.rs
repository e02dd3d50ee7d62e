//! A report of a coordinator's data directory (`fedlora status`), running or stopped.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::store::{ClientRecord, DeviceRecord, FrontendRecord, RoundRecord, RoundStatus, Store};

/// The federation-wide held-out loss of one global version: the token-weighted mean of the
/// clients' reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VersionEval {
    /// Global version.
    pub version: u64,
    /// Weighted mean loss, nats/byte.
    pub loss: f64,
    /// Tokens behind the mean.
    pub tokens: u64,
    /// Clients that reported.
    pub reports: usize,
}

/// One round in the report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    /// The stored record.
    #[serde(flatten)]
    pub record: RoundRecord,
    /// Uploads accepted and not yet aggregated (open round only).
    pub accepted_uploads: Vec<String>,
    /// Held-out loss of the version this round produced, if evaluated.
    pub eval_loss: Option<f64>,
}

/// What `fedlora status` prints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// `waiting`, `training`, `evaluating` or `finished`.
    pub phase: String,
    /// Current global version.
    pub global_version: u64,
    /// Rounds, by id.
    pub rounds: Vec<RoundReport>,
    /// Held-out loss per evaluated version.
    pub evals: Vec<VersionEval>,
    /// Clients seen.
    pub clients: Vec<ClientRecord>,
    /// Devices enrolled with a token, with their certificates' expiry.
    #[serde(default)]
    pub devices: Vec<DeviceRecord>,
    /// Async mode's buffer (`None` in sync mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer: Option<BufferReport>,
    /// The front-ends of a federation on PostgreSQL, the driving one first (empty with sled).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frontends: Vec<FrontendRecord>,
}

/// The async buffer: its settings, how full it is, and the staleness of what was counted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BufferReport {
    /// Updates that commit a version, K.
    pub size: usize,
    /// Fewest that commit one after the timeout, K_MIN.
    pub min: usize,
    /// Stalest update accepted, buffers.
    pub max_staleness: u64,
    /// The staleness weight s(τ), as configured (`poly:0.5`, …).
    pub staleness: String,
    /// Updates in the open buffer now.
    pub filled: usize,
    /// Updates counted in committed versions over the whole campaign by staleness: entry τ
    /// counts those τ buffers stale.
    pub staleness_histogram: Vec<usize>,
}

/// Where a running coordinator keeps its latest report: `DATA_DIR/status.json`, replaced
/// atomically (temp file, rename) after every event, so `fedlora status` can read it while the
/// coordinator holds the store's lock.
pub fn snapshot_path(data_dir: &Path) -> PathBuf {
    data_dir.join("status.json")
}

/// Writes `report` as the data directory's snapshot (temp file, then rename).
pub fn write_snapshot(data_dir: &Path, report: &StatusReport) -> Result<()> {
    let path = snapshot_path(data_dir);
    let tmp = data_dir.join(".status.json.tmp");
    let bytes = serde_json::to_vec(report)
        .map_err(|e| crate::error::CoordinatorError::Storage(e.to_string()))?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// Reads the snapshot a running coordinator wrote.
pub fn read_snapshot(data_dir: &Path) -> Result<StatusReport> {
    let path = snapshot_path(data_dir);
    let bytes = std::fs::read(&path)
        .map_err(|e| crate::error::CoordinatorError::Storage(format!("{}: {e}", path.display())))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| crate::error::CoordinatorError::Storage(format!("{}: {e}", path.display())))
}

/// Builds the report from an open store.
pub fn report(store: &Store) -> Result<StatusReport> {
    use fedlora_protocol::Phase;
    let state = store.state()?;
    let (phase, version) = match &state {
        Some(s) => (
            match &s.phase {
                Phase::Waiting { .. } => "waiting",
                Phase::Training(_) => "training",
                Phase::Evaluating { .. } => "evaluating",
                Phase::Finished { success: true } => "finished",
                Phase::Finished { success: false } => "failed",
            },
            s.global_version,
        ),
        None => ("empty", 0),
    };
    let mut evals: Vec<VersionEval> = Vec::new();
    for e in store.evals()? {
        match evals.last_mut() {
            Some(v) if v.version == e.version => {
                let t = v.tokens + e.tokens;
                v.loss = (v.loss * v.tokens as f64 + e.loss * e.tokens as f64) / t as f64;
                v.tokens = t;
                v.reports += 1;
            }
            _ => evals.push(VersionEval {
                version: e.version,
                loss: e.loss,
                tokens: e.tokens,
                reports: 1,
            }),
        }
    }
    let uploads = store.uploads()?;
    let rounds: Vec<RoundReport> = store
        .rounds()?
        .into_iter()
        .map(|record| {
            let eval_loss = match record.status {
                RoundStatus::Committed { version } => {
                    evals.iter().find(|e| e.version == version).map(|e| e.loss)
                }
                _ => None,
            };
            let accepted_uploads = uploads
                .iter()
                .filter(|u| u.round == record.round)
                .map(|u| u.client.clone())
                .collect();
            RoundReport {
                record,
                accepted_uploads,
                eval_loss,
            }
        })
        .collect();
    let buffer = match store.setup()? {
        Some((cfg, _)) if cfg.mode == fedlora_protocol::Mode::Async => {
            let mut staleness_histogram: Vec<usize> = Vec::new();
            for rr in &rounds {
                let h = &rr.record.staleness;
                if staleness_histogram.len() < h.len() {
                    staleness_histogram.resize(h.len(), 0);
                }
                for (tau, n) in h.iter().enumerate() {
                    staleness_histogram[tau] += n;
                }
            }
            let filled = rounds
                .iter()
                .rev()
                .find(|rr| rr.record.status == RoundStatus::Open)
                .map_or(0, |rr| rr.accepted_uploads.len());
            Some(BufferReport {
                size: cfg.buffer,
                min: cfg.min_buffer(),
                max_staleness: cfg.max_staleness,
                staleness: cfg.staleness.to_string(),
                filled,
                staleness_histogram,
            })
        }
        _ => None,
    };
    Ok(StatusReport {
        buffer,
        phase: phase.to_string(),
        global_version: version,
        rounds,
        evals,
        clients: store.clients()?,
        devices: store.registry()?.devices()?,
        frontends: store.frontends()?,
    })
}
