//! Operator metrics in the Prometheus text format, and a health check, on a local HTTP port
//! (`--metrics 127.0.0.1:9100`: `GET /metrics`, `GET /healthz`).
//!
//! The encoding is `prometheus-client`'s; the HTTP side is a deliberately tiny GET-only
//! responder on tokio (two fixed paths, bounded request size and time), so the coordinator
//! pulls in no web framework.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

use crate::error::{CoordinatorError, Result};

/// Label set of one metric family: (name, value) pairs.
type Labels = Vec<(String, String)>;

/// The coordinator's metrics.
pub struct Metrics {
    registry: Registry,
    /// Rounds ended, by `outcome` (`committed`, `failed`).
    pub rounds: Family<Labels, Counter>,
    /// Uploads (and masked inputs) stored and acknowledged.
    pub uploads_accepted: Counter,
    /// Requests refused, by `reason` (the refusal code).
    pub refused: Family<Labels, Counter>,
    /// Request frame bytes received.
    pub bytes_up: Counter,
    /// Answer frame bytes sent.
    pub bytes_down: Counter,
    /// Clients connected now.
    pub connected_clients: Gauge,
    /// Current global version.
    pub global_version: Gauge,
    /// Wall time of ended rounds, seconds.
    pub round_seconds: Histogram,
    /// The DP plan's per-example clip norm (0 without DP).
    pub dp_clip_norm: Gauge<f64, AtomicU64>,
    /// Rounds the DP plan covers (0 without DP); clients calibrate σ to their own ε from it.
    pub dp_planned_rounds: Gauge,
    /// 1 while this process drives the rounds, 0 while it is a front-end that relays to the
    /// one that does ([`crate::relay`]).
    pub driving: Gauge,
    /// Requests relayed: by a front-end to the driver (`direction="out"`), or answered by the
    /// driver for another front-end (`direction="in"`).
    pub relayed: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fedlora");
        let m = Self {
            rounds: Family::default(),
            uploads_accepted: Counter::default(),
            refused: Family::default(),
            bytes_up: Counter::default(),
            bytes_down: Counter::default(),
            connected_clients: Gauge::default(),
            global_version: Gauge::default(),
            round_seconds: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            dp_clip_norm: Gauge::default(),
            dp_planned_rounds: Gauge::default(),
            driving: Gauge::default(),
            relayed: Family::default(),
            registry: Registry::default(),
        };
        registry.register("rounds", "Rounds ended, by outcome", m.rounds.clone());
        registry.register(
            "uploads_accepted",
            "Uploads and masked inputs stored and acknowledged",
            m.uploads_accepted.clone(),
        );
        registry.register(
            "requests_refused",
            "Requests refused, by reason",
            m.refused.clone(),
        );
        registry.register(
            "bytes_up",
            "Request frame bytes received",
            m.bytes_up.clone(),
        );
        registry.register(
            "bytes_down",
            "Answer frame bytes sent",
            m.bytes_down.clone(),
        );
        registry.register(
            "connected_clients",
            "Clients connected now",
            m.connected_clients.clone(),
        );
        registry.register(
            "global_version",
            "Current global adapter version",
            m.global_version.clone(),
        );
        registry.register(
            "round_duration_seconds",
            "Wall time of ended rounds",
            m.round_seconds.clone(),
        );
        registry.register(
            "dp_clip_norm",
            "The DP plan's per-example clip norm (0 without DP)",
            m.dp_clip_norm.clone(),
        );
        registry.register(
            "dp_planned_rounds",
            "Rounds the DP plan covers (0 without DP)",
            m.dp_planned_rounds.clone(),
        );
        registry.register(
            "driving",
            "1 while this process drives the rounds, 0 while it relays to the front-end that does",
            m.driving.clone(),
        );
        registry.register(
            "relayed_requests",
            "Requests relayed through the store, by direction (out: to the driver; in: answered for another front-end)",
            m.relayed.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    /// Counts a round that ended.
    pub fn round_ended(&self, outcome: &str, seconds: f64) {
        self.rounds
            .get_or_create(&vec![("outcome".into(), outcome.into())])
            .inc();
        self.round_seconds.observe(seconds);
    }

    /// Counts a relayed request (`direction`: `in` or `out`).
    pub fn relayed(&self, direction: &str) {
        self.relayed
            .get_or_create(&vec![("direction".into(), direction.into())])
            .inc();
    }

    /// Counts a refused request, labelled with its refusal code.
    pub fn refused(&self, code: fedlora_protocol::RefusalCode) {
        self.refused
            .get_or_create(&vec![("reason".into(), format!("{code:?}"))])
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // writing into a String cannot fail
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Binds the metrics port without listening on it yet, so a port in use fails the
/// coordinator's start before anything is created on disk, while no connection is accepted
/// (not even into the kernel's backlog) until [`listen`] is called, once the coordinator is
/// ready to answer: a probe that reaches `/healthz` finds the status snapshot written.
pub fn bind(addr: SocketAddr) -> Result<TcpSocket> {
    let err = |e: std::io::Error| {
        CoordinatorError::Config(format!("cannot serve metrics on {addr}: {e} (--metrics)"))
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    // as `TcpListener::bind` does: a restarted coordinator can take its port back at once
    #[cfg(unix)]
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    Ok(socket)
}

/// Starts accepting connections on a socket from [`bind`].
pub fn listen(socket: TcpSocket) -> Result<TcpListener> {
    let addr = socket.local_addr().ok();
    socket.listen(1024).map_err(|e| {
        CoordinatorError::Config(format!("cannot serve metrics on {addr:?}: {e} (--metrics)"))
    })
}

/// Serves `GET /metrics` and `GET /healthz` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(&mut sock, &m)).await;
        });
    }
}

async fn answer(sock: &mut tokio::net::TcpStream, m: &Metrics) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut chunk).await?;
        if n == 0 || buf.len() > 8 * 1024 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let mut parts = line.split_whitespace();
    let (status, kind, body) = match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            m.encode(),
        ),
        (Some("GET"), Some("/healthz")) => ("200 OK", "text/plain", "ok\n".to_string()),
        (Some("GET"), _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_metric_with_its_labels() {
        let m = Metrics::default();
        m.round_ended("committed", 3.0);
        m.refused(fedlora_protocol::RefusalCode::WrongRound);
        m.uploads_accepted.inc();
        let text = m.encode();
        for needle in [
            "fedlora_rounds_total{outcome=\"committed\"} 1",
            "fedlora_requests_refused_total{reason=\"WrongRound\"} 1",
            "fedlora_uploads_accepted_total 1",
            "fedlora_round_duration_seconds_count 1",
            "fedlora_connected_clients 0",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
