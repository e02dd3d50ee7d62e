//! `fedlora privacy epsilon|sigma|statement`: the accountants from the command line, and a
//! client's privacy statement from its state directory.

use clap::{Args, Subcommand};
use fedlora_dp::{dp_sgd_epsilon, noise_multiplier, DpError};
use serde_json::json;

use super::UsageError;

#[derive(Args, Debug)]
pub(crate) struct PrivacyArgs {
    #[command(subcommand)]
    cmd: PrivacyCmd,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum, PartialEq, Eq)]
enum Accountant {
    /// Rényi DP (Mironov et al.), as dp-accounting's RdpAccountant.
    Rdp,
    /// Privacy loss distributions (pessimistic, discretisation 1e-4): tighter.
    Pld,
}

#[derive(Subcommand, Debug)]
enum PrivacyCmd {
    /// ε of DP-SGD (Poisson-subsampled Gaussian, add/remove one example) under the RDP accountant.
    Epsilon {
        /// Poisson sampling rate q ∈ (0, 1].
        #[arg(long)]
        sampling_rate: f64,
        /// Noise multiplier σ > 0 (noise std in units of the clip norm).
        #[arg(long)]
        noise_multiplier: f64,
        /// Number of steps T ≥ 1.
        #[arg(long)]
        steps: u64,
        /// δ ∈ (0, 1).
        #[arg(long)]
        delta: f64,
        /// Accountant.
        #[arg(long, value_enum, default_value = "rdp")]
        accountant: Accountant,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// The smallest σ (to 1e-3, rounded up) that keeps DP-SGD within a target ε.
    Sigma {
        /// Poisson sampling rate q ∈ (0, 1].
        #[arg(long)]
        sampling_rate: f64,
        /// Number of steps T ≥ 1.
        #[arg(long)]
        steps: u64,
        /// δ ∈ (0, 1).
        #[arg(long)]
        delta: f64,
        /// Target ε > 0.
        #[arg(long)]
        target_epsilon: f64,
        /// Accountant.
        #[arg(long, value_enum, default_value = "rdp")]
        accountant: Accountant,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// One client's privacy statement for an auditor, from its own state directory: the unit
    /// of privacy, ε and δ spent and targeted under (a) and (b), the accountant, the rounds and
    /// their q, σ or μ, steps and bits, what it released, and the assumptions.
    Statement {
        /// The client's --state-dir (the client must not be running).
        #[arg(long)]
        state_dir: std::path::PathBuf,
        /// Print one JSON object instead of Markdown.
        #[arg(long)]
        json: bool,
    },
}

/// Parses `rdp` or `pld`.
pub(crate) use fedlora_device::parse_accountant;

fn usage(e: DpError) -> anyhow::Error {
    match e {
        DpError::InvalidParameter(m) => UsageError(m).into(),
        other => other.into(),
    }
}

pub(crate) fn run(a: PrivacyArgs) -> anyhow::Result<()> {
    match a.cmd {
        PrivacyCmd::Statement { state_dir, json } => {
            let st = fedlora_client::statement::PrivacyStatement::from_state_dir(&state_dir)
                .map_err(|e| match e {
                    fedlora_client::error::ClientError::Config(m) => UsageError(m).into(),
                    other => anyhow::Error::new(other),
                })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{}", st.to_markdown());
            }
        }
        PrivacyCmd::Epsilon {
            sampling_rate,
            noise_multiplier,
            steps,
            delta,
            accountant,
            json,
        } => {
            let (eps, order) = match accountant {
                Accountant::Rdp => {
                    let (e, o) = dp_sgd_epsilon(sampling_rate, noise_multiplier, steps, delta)
                        .map_err(usage)?;
                    (e, Some(o))
                }
                Accountant::Pld => (
                    fedlora_dp::pld::dp_sgd_epsilon(sampling_rate, noise_multiplier, steps, delta)
                        .map_err(usage)?,
                    None,
                ),
            };
            let name = if accountant == Accountant::Rdp {
                "rdp"
            } else {
                "pld"
            };
            if json {
                println!(
                    "{}",
                    json!({"epsilon": eps, "delta": delta, "accountant": name, "order": order})
                );
            } else {
                println!("ε = {eps:.6} at δ = {delta} ({name} accountant)");
            }
        }
        PrivacyCmd::Sigma {
            sampling_rate,
            steps,
            delta,
            target_epsilon,
            accountant,
            json,
        } => {
            let (sigma, eps) = match accountant {
                Accountant::Rdp => {
                    let s = noise_multiplier(sampling_rate, steps, delta, target_epsilon)
                        .map_err(usage)?;
                    (
                        s,
                        dp_sgd_epsilon(sampling_rate, s, steps, delta)
                            .map_err(usage)?
                            .0,
                    )
                }
                Accountant::Pld => {
                    let s = fedlora_dp::pld::noise_multiplier(
                        sampling_rate,
                        steps,
                        delta,
                        target_epsilon,
                    )
                    .map_err(usage)?;
                    (
                        s,
                        fedlora_dp::pld::dp_sgd_epsilon(sampling_rate, s, steps, delta)
                            .map_err(usage)?,
                    )
                }
            };
            if json {
                println!("{}", json!({"noise_multiplier": sigma, "epsilon": eps}));
            } else {
                println!("σ = {sigma} gives ε = {eps:.6} at δ = {delta} (target {target_epsilon})");
            }
        }
    }
    Ok(())
}
