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
    /// State directory: the sled database and payload files of the embedded store, and what
    /// stays local to this process whatever the store (partial uploads, status snapshot).
    pub data_dir: PathBuf,
    /// Where the federation's state lives: the embedded sled store in `data_dir` (the
    /// default), or a PostgreSQL database.
    #[serde(skip)]
    pub store: crate::store::StoreLocation,
    /// TLS material.
    pub tls: TlsPaths,
    /// Rounds, cohort, deadlines, seed and what clients train.
    pub federation: FederationConfig,
    /// How often the round state machine is ticked, milliseconds.
    pub tick_ms: u64,
    /// UDP receive buffer to request, bytes (the kernel may cap it at `rmem_max`; the value it
    /// granted is logged). The 208 KiB default drops packets under many parallel uploads.
    pub udp_recv_buffer: usize,
    /// Delay a waiting client is told to poll again after, milliseconds (the least; see
    /// `max_polls_per_s`).
    pub poll_interval_ms: u64,
    /// Polls per second the coordinator invites over all connected clients: a waiting client
    /// is told to come back after max(`poll_interval_ms`, connected clients ÷ this), so ten
    /// thousand waiting devices do not poll ten thousand times per interval and starve the
    /// uploads. Default 2,000.
    #[serde(default = "default_max_polls_per_s")]
    pub max_polls_per_s: u64,
    /// Where to serve Prometheus metrics and `/healthz` over HTTP (e.g. 127.0.0.1:9100);
    /// `None` (the default) serves none.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// How the adapter was chosen, in the user's words (e.g. the CLI flags), for the message a
    /// client with another adapter gets.
    #[serde(default)]
    pub adapter_description: Option<String>,
    /// The enrollment endpoint and issuer (`None`: no enrollment, no renewal).
    #[serde(skip)]
    pub enroll: Option<crate::enroll::EnrollConfig>,
    /// Bytes of payload bodies (uploads, masked inputs) read at once over all connections
    /// (default [`crate::wire::PAYLOAD_BUDGET`], 128 MiB): the term of the memory bound that
    /// uploads hold. At least the protocol's payload limit (64 MiB), so every upload fits.
    #[serde(default = "default_payload_budget")]
    pub payload_budget: usize,
}

fn default_payload_budget() -> usize {
    crate::wire::PAYLOAD_BUDGET
}

fn default_max_polls_per_s() -> u64 {
    2_000
}

/// How long a waiting client should wait before it polls again, milliseconds: at least
/// `poll_interval_ms`, and long enough that `connected` clients together poll at most
/// `max_polls_per_s` times per second.
pub fn poll_delay_ms(poll_interval_ms: u64, connected: usize, max_polls_per_s: u64) -> u64 {
    let spread = (connected as u64)
        .saturating_mul(1000)
        .div_ceil(max_polls_per_s.max(1));
    poll_interval_ms.max(spread)
}

impl CoordinatorConfig {
    /// Defaults for `data_dir` and the certificates in `certs_dir`: listen on 127.0.0.1:4433.
    pub fn new(data_dir: PathBuf, certs_dir: &std::path::Path) -> Self {
        Self {
            listen: "127.0.0.1:4433".parse().expect("valid address"),
            data_dir,
            store: Default::default(),
            tls: TlsPaths::from_dir(certs_dir),
            federation: FederationConfig::default(),
            tick_ms: 100,
            udp_recv_buffer: 4 * 1024 * 1024,
            poll_interval_ms: 200,
            max_polls_per_s: default_max_polls_per_s(),
            metrics: None,
            adapter_description: None,
            enroll: None,
            payload_budget: default_payload_budget(),
        }
    }

    /// Checks the config.
    pub fn validate(&self) -> Result<()> {
        self.federation.validate()?;
        if self.payload_budget < fedlora_protocol::limits::PAYLOAD_LIMIT {
            return Err(CoordinatorError::Config(format!(
                "payload_budget {} B is below the largest upload ({} B): that upload would wait \
                 for ever",
                self.payload_budget,
                fedlora_protocol::limits::PAYLOAD_LIMIT
            )));
        }
        if self.tick_ms == 0 || self.poll_interval_ms == 0 || self.max_polls_per_s == 0 {
            return Err(CoordinatorError::Config(
                "tick_ms, poll_interval_ms and max_polls_per_s must be positive".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::poll_delay_ms;

    #[test]
    fn waiting_clients_are_spread_to_the_poll_budget() {
        // few clients: the configured interval
        assert_eq!(poll_delay_ms(200, 10, 2_000), 200);
        assert_eq!(poll_delay_ms(200, 400, 2_000), 200);
        // many: together they poll at most max_polls_per_s times a second
        assert_eq!(poll_delay_ms(200, 10_000, 2_000), 5_000);
        assert_eq!(poll_delay_ms(100, 5_000, 1_000), 5_000);
        for n in [1usize, 999, 4_000, 100_000] {
            let d = poll_delay_ms(100, n, 2_000);
            assert!(
                n as f64 * 1000.0 / d as f64 <= 2_000.0 + 1e-9,
                "{n} clients, {d} ms"
            );
        }
    }
}
