//! `fedlora simulate`: privacy-utility sweeps with virtual clients (see the simulations crate).

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use fedlora_simulations::output::{merge, run_sweep, SweepOptions, Transport};
use fedlora_simulations::sweep::{Shard, SweepConfig};

use super::UsageError;

/// Run a sweep file's grid with virtual clients and write CSVs, plots and a report.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct SimulateArgs {
    #[command(subcommand)]
    merge: Option<SimulateCommand>,
    /// Sweep file (TOML; every key in examples/configs/sweep.toml; see also
    /// simulations/configs/).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output directory (re-running with the same directory resumes the sweep).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run only the points with index ≡ i (mod N), e.g. `--shard 0/4`.
    #[arg(long)]
    shard: Option<String>,
    /// How clients talk to the coordinator.
    #[arg(long, value_enum, default_value_t = TransportArg::InProcess)]
    transport: TransportArg,
    /// Threads training clients in parallel (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Subcommand, Debug)]
enum SimulateCommand {
    /// Join shard output directories into one report.
    Merge {
        /// Output directory of the merged sweep.
        #[arg(long)]
        out: PathBuf,
        /// Shard output directories.
        #[arg(required = true)]
        shards: Vec<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum TransportArg {
    /// Virtual clients and the round machine in this process, no network.
    InProcess,
    /// The coordinator and SDK clients over QUIC + mutual TLS on loopback.
    Quic,
}

pub(crate) fn run(a: SimulateArgs) -> anyhow::Result<()> {
    if let Some(SimulateCommand::Merge { out, shards }) = a.merge {
        let (_, report) = merge(&shards, &out)?;
        println!("merged {} shards: {}", shards.len(), report.display());
        return Ok(());
    }
    let (Some(config), Some(out)) = (a.config, a.out) else {
        return Err(UsageError("simulate needs --config FILE and --out DIR".into()).into());
    };
    let text = std::fs::read_to_string(&config)
        .map_err(|e| UsageError(format!("{}: {e}", config.display())))?;
    let sweep = SweepConfig::from_toml(&text).map_err(|e| UsageError(e.to_string()))?;
    let shard = a
        .shard
        .map(|s| s.parse::<Shard>())
        .transpose()
        .map_err(|e| UsageError(e.to_string()))?;
    let opts = SweepOptions {
        shard,
        transport: match a.transport {
            TransportArg::InProcess => Transport::InProcess,
            TransportArg::Quic => Transport::Quic,
        },
        threads: a.threads,
        progress: true,
    };
    let o = run_sweep(&sweep, &text, &out, &opts)?;
    println!(
        "{} points: {} run now, {} already finished; report: {}",
        o.points,
        o.ran,
        o.resumed,
        o.report.display()
    );
    Ok(())
}
