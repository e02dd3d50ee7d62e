//! Subcommands.

mod bench;
mod model;
mod pretrain;

use clap::{Parser, Subcommand};

/// An error in the user's input: reported with exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// fedlora: federated LoRA fine-tuning over QUIC with mutual TLS.
#[derive(Parser, Debug)]
#[command(name = "fedlora", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Pretrain the public base model and save its checkpoint.
    Pretrain(pretrain::PretrainArgs),
    /// Measure speed and memory (prints JSON with --json).
    Bench(bench::BenchArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Pretrain(a) => pretrain::run(a),
        Command::Bench(a) => bench::run(a),
    }
}
