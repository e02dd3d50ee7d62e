//! `fedlora-device`: the client alone, for devices. It runs one federated client (`run`) and
//! enrolls the device (`enroll`); it carries nothing of the coordinator, the simulations or the plots.

use clap::{Parser, Subcommand};

/// fedlora-device: a federated LoRA client for devices (QUIC with mutual TLS).
#[derive(Parser, Debug)]
#[command(name = "fedlora-device", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Take part in a federation until it finishes.
    Run(Box<fedlora_device::client::ClientArgs>),
    /// Make this device's key and trade a one-time token for its certificate.
    Enroll(fedlora_device::enroll::EnrollArgs),
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Run(a) => fedlora_device::client::run(*a),
        Command::Enroll(a) => fedlora_device::enroll::run(a),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(fedlora_device::exit_code(&e));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
