//! `fedlora-device enroll`: make this device's key here and trade a one-time token for its
//! certificate.

use std::path::PathBuf;

use clap::Args;
use fedlora_client::enroll::{enroll, EnrollOptions};

use crate::UsageError;

/// Flags of `fedlora-device enroll`.
#[derive(Args, Debug)]
pub struct EnrollArgs {
    /// The coordinator's enrollment endpoint, HOST:PORT (its --enroll-listen).
    #[arg(long)]
    coordinator: String,
    /// The federation CA (PEM; public, handed out with the token).
    #[arg(long)]
    ca: PathBuf,
    /// The one-time token (`fedlora certs token`).
    #[arg(long)]
    token: String,
    /// Where the key (mode 0600), the certificate and the CA are kept; `fedlora-device run
    /// --state-dir` uses them.
    #[arg(long)]
    state_dir: PathBuf,
    /// Name on the coordinator's certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
}

/// Enrolls this device and prints its id.
pub fn run(a: EnrollArgs) -> anyhow::Result<()> {
    crate::logging::init(crate::logging::LogFormat::Text, "warn");
    let endpoint = crate::resolve("--coordinator", &a.coordinator)?;
    if !a.ca.exists() {
        return Err(UsageError(format!("--ca {} not found", a.ca.display())).into());
    }
    let opts = EnrollOptions {
        endpoint,
        server_name: a.server_name,
        ca: a.ca,
        token: a.token,
        state_dir: a.state_dir.clone(),
    };
    let rt = tokio::runtime::Runtime::new()?;
    let e = rt.block_on(enroll(&opts))?;
    println!(
        "enrolled as {} (certificate until Unix {}); run with --state-dir {}",
        e.device_id,
        e.not_after_unix_s,
        a.state_dir.display()
    );
    Ok(())
}
