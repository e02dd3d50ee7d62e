//! `fedlora`: federated LoRA fine-tuning — coordinator, client, demo, simulations and tools.
//!
//! This binary only parses arguments and calls the library crates; see `src/cmd/`.

mod cmd;

use clap::{CommandFactory, FromArgMatches};

/// mimalloc instead of glibc's malloc: see the dependency's note in `Cargo.toml`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Lets every (sub)command take negative numbers as values (`--epsilon -1`), so that the value's
/// own range check answers instead of clap taking it for a flag.
fn negative_numbers(c: clap::Command) -> clap::Command {
    c.allow_negative_numbers(true)
        .mut_subcommands(negative_numbers)
}

fn main() {
    let matches = negative_numbers(cmd::Cli::command()).get_matches();
    let cli = cmd::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cmd::run(cli) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(cmd::exit_code(&e));
        }
    }
}
