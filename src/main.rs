//! `fedlora`: federated LoRA fine-tuning — coordinator, client, demo, simulations and tools.
//!
//! This binary only parses arguments and calls the library crates; see `src/cmd/`.

mod cmd;

use clap::Parser;

fn main() {
    let cli = cmd::Cli::parse();
    match cmd::run(cli) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("error: {e:#}");
            let code = if e.downcast_ref::<cmd::UsageError>().is_some() {
                2
            } else {
                1
            };
            std::process::exit(code);
        }
    }
}
