//! `fedlora certs init|token|issuer|revoke`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use fedlora_coordinator::certs::{
    default_server_names, init_certs, revoke, revoke_device, revoke_key, CertDir,
};

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
    /// Issue one-time enrollment tokens: printed once; only their SHA-256 hashes are kept, in
    /// DIR/enroll-tokens.txt (the coordinator records each token's use in its own store).
    Token {
        /// Certificate directory.
        #[arg(long)]
        certs: PathBuf,
        /// How many tokens.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// How long each token stays valid (e.g. 24h, 7d).
        #[arg(long, default_value = "24h", value_parser = fedlora_device::parse_duration)]
        ttl: std::time::Duration,
    },
    /// Make an issuing CA for `fedlora enroll-service` (an intermediate the federation CA
    /// signs), so that the enrollment service runs without the federation CA's key.
    Issuer {
        /// Certificate directory (its CA signs the issuer).
        #[arg(long)]
        certs: PathBuf,
        /// Where to write the issuer's certificate (PEM).
        #[arg(long)]
        out_cert: PathBuf,
        /// Where to write the issuer's key (PEM, mode 0600).
        #[arg(long)]
        out_key: PathBuf,
    },
    /// Put a client on the coordinator's deny-list (takes effect at its next hello): a
    /// certificate, every certificate of a device id (renewals too), or every certificate of
    /// a key.
    Revoke {
        /// Certificate directory (its revoked.txt is updated).
        #[arg(long)]
        certs: PathBuf,
        /// Revoke the I-th client certificate of the directory.
        #[arg(long, conflicts_with_all = ["cert", "device", "key_of"])]
        client_index: Option<usize>,
        /// Revoke this certificate file.
        #[arg(long, conflicts_with_all = ["device", "key_of"])]
        cert: Option<PathBuf>,
        /// Revoke an enrolled device by id: all its certificates, renewed ones included.
        #[arg(long, conflicts_with = "key_of")]
        device: Option<String>,
        /// Revoke the key of this certificate file: every certificate for that key.
        #[arg(long, value_name = "CERT")]
        key_of: Option<PathBuf>,
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
        CertsCmd::Token { certs, count, ttl } => {
            if !CertDir(certs.clone()).ca().exists() {
                return Err(UsageError(format!(
                    "{} holds no CA: run `fedlora certs init --out {}` first",
                    certs.display(),
                    certs.display()
                ))
                .into());
            }
            if count == 0 || count > 100_000 {
                return Err(UsageError("--count must be in 1..=100000".into()).into());
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            let file = certs.join(fedlora_coordinator::enroll::tokens::TOKEN_FILE);
            let tokens = fedlora_coordinator::enroll::tokens::issue_tokens(
                &file,
                count,
                ttl.as_secs(),
                now,
            )?;
            for t in &tokens {
                println!("{t}");
            }
            eprintln!(
                "{count} token(s), each valid once for {}; hashes in {}",
                humantime::format_duration(ttl),
                file.display()
            );
            Ok(())
        }
        CertsCmd::Issuer {
            certs,
            out_cert,
            out_key,
        } => {
            fedlora_coordinator::certs::make_issuer(&CertDir(certs), &out_cert, &out_key)?;
            println!(
                "wrote the enrollment issuer {} and its key {}",
                out_cert.display(),
                out_key.display()
            );
            Ok(())
        }
        CertsCmd::Revoke {
            certs,
            client_index,
            cert,
            device,
            key_of,
        } => {
            let dir = CertDir(certs);
            let entry = match (client_index, cert, device, key_of) {
                (Some(i), None, None, None) => revoke(&dir, &dir.client_cert(i))?,
                (None, Some(p), None, None) => revoke(&dir, &p)?,
                (None, None, Some(d), None) => revoke_device(&dir, &d)?,
                (None, None, None, Some(p)) => revoke_key(&dir, &p)?,
                _ => {
                    return Err(UsageError(
                        "give --client-index I, --cert FILE, --device ID or --key-of FILE".into(),
                    )
                    .into())
                }
            };
            println!("revoked: {entry}");
            Ok(())
        }
    }
}
