//! `fedlora audit`: a one-run empirical privacy audit of example-level DP-SGD (see the
//! simulations crate's `audit` module).

use std::path::PathBuf;

use clap::Args;
use fedlora_simulations::audit::{markdown, run_audit, AuditConfig};

use super::UsageError;

/// Check the reported ε empirically with canaries in one federated training run.
#[derive(Args, Debug)]
pub(crate) struct AuditArgs {
    /// Audit file (TOML; every key in examples/configs/audit.toml; see also
    /// simulations/configs/audit_*.toml).
    #[arg(long)]
    config: PathBuf,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
    /// Also write `audit.json` and `report.md` into this directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Threads training clients in parallel (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Checks the audit itself, not a deployment: the clients add this multiple of their
    /// calibrated noise while their ledgers still claim the target ε (0 = no noise). The
    /// result records it as `noise_scale`. Hidden: never a setting of a real run.
    #[arg(long, hide = true, default_value_t = 1.0)]
    broken_noise_scale: f64,
}

pub(crate) fn run(a: AuditArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.config)
        .map_err(|e| UsageError(format!("{}: {e}", a.config.display())))?;
    let config = AuditConfig::from_toml(&text).map_err(|e| UsageError(e.to_string()))?;
    let pool = fedlora_simulations::output::thread_pool(a.threads)?;
    if !(a.broken_noise_scale.is_finite() && a.broken_noise_scale >= 0.0) {
        return Err(UsageError("--broken-noise-scale must be finite and at least 0".into()).into());
    }
    let report = run_audit(&config, &pool, a.broken_noise_scale)?;
    let json = serde_json::to_string(&report)?;
    if let Some(out) = &a.out {
        std::fs::create_dir_all(out)?;
        std::fs::write(out.join("audit.json"), format!("{json}\n"))?;
        std::fs::write(out.join("report.md"), markdown(&config, &report))?;
        std::fs::write(out.join("audit.toml"), &text)?;
    }
    if a.json {
        println!("{json}");
    } else {
        println!(
            "ε lower bound {:.4} at {:.0} % confidence against ε reported {:.4} ({} of {} \
             guesses correct, {} canaries)",
            report.epsilon_lower_bound,
            100.0 * report.confidence,
            report.epsilon_reported,
            report.correct,
            report.guesses,
            report.m
        );
    }
    Ok(())
}
