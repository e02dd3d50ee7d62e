//! Enrollment flags (`fedlora coordinator --enroll-listen`, `fedlora enroll-service`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use fedlora_coordinator::enroll::{EnrollConfig, EnrollService, Enrollment};
use fedlora_coordinator::store::Store;

use super::logging::{self, LogFormat};
use super::UsageError;

/// How the enrollment endpoint signs device certificates.
#[derive(Args, Debug, Clone)]
pub(crate) struct IssuerArgs {
    /// Lifetime of the device certificates it signs (devices renew before it ends).
    #[arg(long, value_parser = fedlora_device::parse_duration, default_value = "30d")]
    cert_validity: Duration,
    /// Sign with this issuing CA (an intermediate the federation CA signed) instead of the
    /// federation CA; its certificate goes into each device's chain. Needs --issuer-key.
    #[arg(long, requires = "issuer_key", value_name = "PEM")]
    issuer_cert: Option<PathBuf>,
    /// The issuing CA's key (PEM).
    #[arg(long, requires = "issuer_cert", value_name = "PEM")]
    issuer_key: Option<PathBuf>,
}

impl IssuerArgs {
    /// The enrollment settings for the certificate directory `certs`.
    pub(crate) fn config(&self, certs: &Path, listen: SocketAddr) -> anyhow::Result<EnrollConfig> {
        let mut c = EnrollConfig::from_certs_dir(certs, listen);
        for p in [&c.issuer_cert, &c.server_cert] {
            if !p.exists() {
                return Err(UsageError(format!(
                    "{} not found (make certificates with `fedlora certs init`)",
                    p.display()
                ))
                .into());
            }
        }
        c.validity_s = self.cert_validity.as_secs().max(60);
        if let (Some(cert), Some(key)) = (&self.issuer_cert, &self.issuer_key) {
            c.issuer_cert = cert.clone();
            c.issuer_key = key.clone();
            c.intermediate = true;
        } else if !c.issuer_key.exists() {
            return Err(UsageError(format!(
                "{} not found: enrollment signs with the CA key, or give --issuer-cert and \
                 --issuer-key",
                c.issuer_key.display()
            ))
            .into());
        }
        Ok(c)
    }
}

/// `fedlora enroll-service`: the enrollment endpoint as its own process, with its own store.
#[derive(Args, Debug)]
pub(crate) struct EnrollServiceArgs {
    /// UDP address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Certificate directory (its enroll-tokens.txt, server certificate and deny-list).
    #[arg(long)]
    certs: PathBuf,
    /// This service's own state directory (devices enrolled, tokens used).
    #[arg(long)]
    data_dir: PathBuf,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(flatten)]
    issuer: IssuerArgs,
}

pub(crate) fn run_service(a: EnrollServiceArgs) -> anyhow::Result<()> {
    logging::init(a.log_format, "info");
    let cfg = a.issuer.config(&a.certs, a.listen)?;
    let store = Store::open(&a.data_dir)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let e = std::sync::Arc::new(Enrollment::new(cfg, store.registry()?)?);
        let service = EnrollService::start(e)?;
        println!("enrollment endpoint on {}", service.local_addr()?);
        tokio::signal::ctrl_c().await?;
        service.shutdown();
        anyhow::Ok(())
    })
}
