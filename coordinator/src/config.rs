//! Coordinator configuration (flags and/or a TOML file).

use std::net::SocketAddr;
use std::path::PathBuf;

use fedlora_protocol::FederationConfig;
use serde::{Deserialize, Serialize};

use crate::error::{CoordinatorError, Result};

/// Where the coordinator's TLS material is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TlsPaths {
    /// CA certificate that client certificates must chain to (PEM).
    pub ca: PathBuf,
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// Deny-list of revoked client certificate fingerprints; re-read at every hello.
    pub revoked: PathBuf,
}

impl TlsPaths {
    /// The files `fedlora certs init --out DIR` writes.
    pub fn from_dir(dir: &std::path::Path) -> Self {
        let d = crate::certs::CertDir(dir.to_path_buf());
        Self {
            ca: d.ca(),
            cert: d.server_cert(),
            key: d.server_key(),
            revoked: d.revoked(),
        }
    }
}

/// Everything the coordinator service needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoordinatorConfig {
    /// UDP address to listen on (port 0: an ephemeral port).
    pub listen: SocketAddr,
    /// State directory (sled database and payload files).
    pub data_dir: PathBuf,
    /// TLS material.
    pub tls: TlsPaths,
    /// Rounds, cohort, deadlines, seed and what clients train.
    pub federation: FederationConfig,
    /// How often the round state machine is ticked, milliseconds.
    pub tick_ms: u64,
    /// UDP receive buffer to request, bytes (the kernel may cap it at `rmem_max`; the value it
    /// granted is logged). The 208 KiB default drops packets under many parallel uploads.
    pub udp_recv_buffer: usize,
    /// Delay a waiting client is told to poll again after, milliseconds.
    pub poll_interval_ms: u64,
    /// Where to serve Prometheus metrics and `/healthz` over HTTP (e.g. 127.0.0.1:9100);
    /// `None` (the default) serves none.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// How the adapter was chosen, in the user's words (e.g. the CLI flags), for the message a
    /// client with another adapter gets.
    #[serde(default)]
    pub adapter_description: Option<String>,
}

impl CoordinatorConfig {
    /// Defaults for `data_dir` and the certificates in `certs_dir`: listen on 127.0.0.1:4433.
    pub fn new(data_dir: PathBuf, certs_dir: &std::path::Path) -> Self {
        Self {
            listen: "127.0.0.1:4433".parse().expect("valid address"),
            data_dir,
            tls: TlsPaths::from_dir(certs_dir),
            federation: FederationConfig::default(),
            tick_ms: 100,
            udp_recv_buffer: 4 * 1024 * 1024,
            poll_interval_ms: 200,
            metrics: None,
            adapter_description: None,
        }
    }

    /// Checks the config.
    pub fn validate(&self) -> Result<()> {
        self.federation.validate()?;
        if self.tick_ms == 0 || self.poll_interval_ms == 0 {
            return Err(CoordinatorError::Config(
                "tick_ms and poll_interval_ms must be positive".into(),
            ));
        }
        Ok(())
    }
}
