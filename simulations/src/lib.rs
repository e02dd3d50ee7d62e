//! fedlora simulation harness: many virtual clients running the deployment's client and
//! coordinator code in one process (or over real QUIC on loopback), privacy-utility sweeps from
//! a TOML grid, and their CSVs, plots and Markdown report.
//!
//! - [`task`]: the Shakespeare LM (natural or IID split) and the Breast Cancer Wisconsin MLP
//!   (IID or Dirichlet label skew); [`partition`] splits, [`tabular`] the MLP with LoRA.
//! - [`sweep`]: sweep files, grid points, shards; [`client_dp`]: client-level DP plans.
//! - [`runner`]: one point in-process; [`quic`]: one point over QUIC; [`timed`]: one point in
//!   simulated wall time with device behaviour ([`fleet`]) under a [`schedule`] (sync,
//!   over-selected sync or FedBuff).
//! - [`load`]: N synthetic SDK clients against a real coordinator (`fedlora bench load`).
//! - [`results`], [`output`], [`plot`], [`report`]: rows, files, figures, the report.

pub mod audit;
pub mod bench;
pub mod client_dp;
pub mod error;
pub mod fleet;
pub mod load;
pub mod output;
pub mod partition;
pub mod plot;
pub mod quic;
pub mod report;
pub mod results;
pub mod runner;
pub mod schedule;
pub mod seed;
pub mod setup;
pub mod sweep;
pub mod tabular;
pub mod task;
pub mod timed;
pub mod timed_cohort;
pub mod timed_report;

pub use error::SimError;

/// Resolves a path given relative to the repository root: as given if it exists, else relative
/// to the workspace root this crate was built in.
pub fn repo_path(given: &std::path::Path) -> std::path::PathBuf {
    if given.exists() || given.is_absolute() {
        return given.to_path_buf();
    }
    let in_repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(given);
    if in_repo.exists() {
        in_repo
    } else {
        given.to_path_buf()
    }
}
