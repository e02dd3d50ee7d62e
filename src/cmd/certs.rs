//! `fedlora certs init|revoke`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use fedlora_coordinator::certs::{default_server_names, init_certs, revoke, CertDir};

use super::UsageError;

#[derive(Args, Debug)]
pub(crate) struct CertsArgs {
    #[command(subcommand)]
    cmd: CertsCmd,
}

#[derive(Subcommand, Debug)]
enum CertsCmd {
    /// Make a CA, the coordinator's certificate and N client certificates.
    Init {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Number of client certificates (client-0 … client-N-1).
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// DNS names or IP addresses of the coordinator (repeatable).
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        /// Replace an existing CA in --out. Every certificate it issued (the coordinator's and
        /// every client's) stops working: all parties need the new files.
        #[arg(long)]
        force: bool,
    },
    /// Put a client certificate on the coordinator's deny-list (takes effect at its next hello).
    Revoke {
        /// Certificate directory (its revoked.txt is updated).
        #[arg(long)]
        certs: PathBuf,
        /// Revoke the I-th client certificate of the directory.
        #[arg(long, conflicts_with = "cert")]
        client_index: Option<usize>,
        /// Revoke this certificate file.
        #[arg(long)]
        cert: Option<PathBuf>,
    },
}

pub(crate) fn run(a: CertsArgs) -> anyhow::Result<()> {
    match a.cmd {
        CertsCmd::Init {
            out,
            clients,
            server_names,
            force,
        } => {
            let names = if server_names.is_empty() {
                default_server_names()
            } else {
                server_names
            };
            let ca = CertDir(out.clone()).ca();
            if ca.exists() && !force {
                return Err(UsageError(format!(
                    "{} already holds a CA ({}): replacing it would invalidate every \
                     certificate it issued; pass --force to make a new CA anyway",
                    out.display(),
                    ca.display()
                ))
                .into());
            }
            if clients == 0 {
                return Err(UsageError("--clients must be at least 1".into()).into());
            }
            init_certs(&out, clients, &names).map_err(|e| {
                UsageError(format!(
                    "cannot write certificates to {}: {e}",
                    out.display()
                ))
            })?;
            println!(
                "wrote CA, server certificate ({}) and {clients} client certificates to {}",
                names.join(", "),
                out.display()
            );
            Ok(())
        }
        CertsCmd::Revoke {
            certs,
            client_index,
            cert,
        } => {
            let dir = CertDir(certs);
            let path = match (client_index, cert) {
                (Some(i), None) => dir.client_cert(i),
                (None, Some(p)) => p,
                _ => return Err(UsageError("give --client-index I or --cert FILE".into()).into()),
            };
            let fp = revoke(&dir, &path)?;
            println!("revoked {} (sha256 {fp})", path.display());
            Ok(())
        }
    }
}
