//! The client side of the wire: a QUIC connection with mutual TLS to the coordinator, one
//! request/response exchange per bidirectional stream.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedlora_protocol::frame::{self, HEADER_LEN};
use fedlora_protocol::{ClientMsg, CoordMsg, ALPN, IDLE_TIMEOUT_S, KEEP_ALIVE_S};
use quinn::crypto::rustls::QuicClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::ClientError;
use tracing::warn;

/// How long one request/response exchange may take, seconds. Long on purpose: a coordinator
/// under load keeps an upload waiting in QUIC flow control (backpressure) rather than refusing
/// it, and a request given up is a request sent twice; a coordinator that is gone is noticed
/// sooner, by the connection's idle timeout.
pub const REQUEST_TIMEOUT_S: u64 = 600;

/// The client's TLS material.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClientTls {
    /// The federation CA (PEM) that the coordinator's certificate must chain to.
    pub ca: PathBuf,
    /// This client's certificate (PEM), issued by the federation CA.
    pub cert: PathBuf,
    /// This client's private key (PEM).
    pub key: PathBuf,
}

impl ClientTls {
    /// The files `fedlora-device enroll` writes in a device's state directory: `ca.pem`,
    /// `device.pem` (its chain) and `device.key` (made on the device, mode 0600).
    pub fn from_state_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("device.pem"),
            key: dir.join("device.key"),
        }
    }

    /// The `index`-th client of a directory made by `fedlora certs init`.
    pub fn from_dir(dir: &Path, index: usize) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("client-{index}.pem")),
            key: dir.join(format!("client-{index}.key")),
        }
    }
}

fn tls_err(path: &Path, e: impl std::fmt::Display) -> ClientError {
    ClientError::Config(format!("{}: {e}", path.display()))
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| tls_err(ca, e))? {
        roots
            .add(c.map_err(|e| tls_err(ca, e))?)
            .map_err(|e| tls_err(ca, e))?;
    }
    Ok(roots)
}

/// How a client's QUIC connections notice a dead link and how long a handshake may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransportTimers {
    /// A connection silent this long is dropped (the QUIC idle timeout; a connection's
    /// effective one is the smaller of the client's and the coordinator's). Default
    /// [`IDLE_TIMEOUT_S`] (60 s).
    pub idle_timeout: Duration,
    /// How long a QUIC + TLS handshake may take before the coordinator counts as unreachable.
    /// Default [`CONNECT_TIMEOUT_S`] (10 s).
    pub connect_timeout: Duration,
}

impl Default for TransportTimers {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(IDLE_TIMEOUT_S),
            connect_timeout: Duration::from_secs(CONNECT_TIMEOUT_S),
        }
    }
}

impl TransportTimers {
    /// The keep-alive interval: [`KEEP_ALIVE_S`] (10 s), or a third of a shorter idle timeout,
    /// so a live but quiet connection is never dropped.
    pub fn keep_alive(&self) -> Duration {
        Duration::from_secs(KEEP_ALIVE_S).min(self.idle_timeout / 3)
    }

    /// Refuses timers QUIC cannot use (zero, or an idle timeout past QUIC's 2⁶² ms).
    pub fn validate(&self) -> Result<(), ClientError> {
        if self.idle_timeout < Duration::from_millis(300) {
            return Err(ClientError::Config(format!(
                "idle timeout {:?} is too short (at least 300 ms)",
                self.idle_timeout
            )));
        }
        if self.connect_timeout.is_zero() {
            return Err(ClientError::Config(
                "connect timeout must be positive".into(),
            ));
        }
        quinn::IdleTimeout::try_from(self.idle_timeout)
            .map_err(|e| ClientError::Config(format!("idle timeout: {e}")))?;
        Ok(())
    }
}

fn quic(
    cfg: rustls::ClientConfig,
    timers: &TransportTimers,
) -> Result<quinn::ClientConfig, ClientError> {
    timers.validate()?;
    let q = QuicClientConfig::try_from(cfg).map_err(|e| ClientError::Config(e.to_string()))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(q));
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(timers.idle_timeout)
            .map_err(|e| ClientError::Config(format!("idle timeout: {e}")))?,
    ));
    t.keep_alive_interval(Some(timers.keep_alive()));
    cc.transport_config(Arc::new(t));
    Ok(cc)
}

/// The enrollment endpoint's client config: TLS 1.3, the federation CA as the only root, no
/// client certificate (the device has none yet), ALPN
/// [`fedlora_protocol::enroll::ENROLL_ALPN`].
pub fn enroll_client_config(ca: &Path) -> Result<quinn::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config(e.to_string()))?
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![fedlora_protocol::enroll::ENROLL_ALPN.to_vec()];
    quic(cfg, &TransportTimers::default())
}

/// A QUIC client config: TLS 1.3 only, ring provider, the federation CA as the only root, this
/// client's certificate for mutual TLS, the protocol's idle timeout and keep-alive interval.
pub fn client_config(tls: &ClientTls) -> Result<quinn::ClientConfig, ClientError> {
    client_config_with(tls, &TransportTimers::default())
}

/// [`client_config`] with other idle-timeout and keep-alive settings.
pub fn client_config_with(
    tls: &ClientTls,
    timers: &TransportTimers,
) -> Result<quinn::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = roots(&tls.ca)?;
    let chain = CertificateDer::pem_file_iter(&tls.cert)
        .map_err(|e| tls_err(&tls.cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(&tls.cert, e))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| tls_err(&tls.key, e))?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| tls_err(&tls.cert, e))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    quic(cfg, timers)
}

/// A client endpoint on an ephemeral local port.
pub fn endpoint(tls: &ClientTls) -> Result<quinn::Endpoint, ClientError> {
    endpoint_with(tls, &TransportTimers::default())
}

/// [`endpoint`] with other idle-timeout and keep-alive settings.
pub fn endpoint_with(
    tls: &ClientTls,
    timers: &TransportTimers,
) -> Result<quinn::Endpoint, ClientError> {
    let mut ep = bare_endpoint()?;
    ep.set_default_client_config(client_config_with(tls, timers)?);
    Ok(ep)
}

/// The largest UDP payload a client endpoint receives, bytes: QUIC's packets stay below it
/// (quinn's path-MTU discovery stops at 1,452), and the endpoint's receive buffer is sized
/// from it (quinn's default, 64 KiB, makes that buffer 128 MiB of address space per endpoint).
pub const CLIENT_MAX_UDP_PAYLOAD: u16 = 1_472;

/// A client endpoint on an ephemeral local port with no default TLS identity: connections
/// name theirs ([`Session::connect_using`]). Several clients (a gateway's devices, a load
/// generator's) can share one, and so one UDP socket.
pub fn bare_endpoint() -> Result<quinn::Endpoint, ClientError> {
    endpoint_on(std::net::UdpSocket::bind("0.0.0.0:0").map_err(transport)?)
}

/// The receive buffer a socket shared by many clients asks for, bytes (the kernel grants at
/// most `net.core.rmem_max`). With the default (about 208 KiB on Linux), 500 clients that
/// download at once overflow it: a 1,000-client load run lost 50,000 datagrams, and each loss
/// costs a QUIC retransmission and a smaller congestion window.
pub const SHARED_RECV_BUFFER: usize = 4 * 1024 * 1024;

/// [`bare_endpoint`] for many clients at once (a gateway's devices, a load generator's): its
/// socket asks for a receive buffer of `recv_buffer` bytes ([`SHARED_RECV_BUFFER`]).
pub fn shared_endpoint(recv_buffer: usize) -> Result<quinn::Endpoint, ClientError> {
    endpoint_on(udp_socket(recv_buffer)?)
}

/// A UDP socket on an ephemeral local port whose receive buffer asks for `recv_buffer` bytes;
/// what the kernel grants is capped by `net.core.rmem_max` (a smaller grant is logged).
pub fn udp_socket(recv_buffer: usize) -> Result<std::net::UdpSocket, ClientError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(transport)?;
    if let Err(e) = sock.set_recv_buffer_size(recv_buffer) {
        warn!(error = %e, "could not set the UDP receive buffer");
    }
    let granted = sock.recv_buffer_size().unwrap_or(0);
    if granted < recv_buffer {
        warn!(
            requested = recv_buffer,
            granted, "UDP receive buffer capped by the kernel (raise net.core.rmem_max)"
        );
    }
    let any: std::net::SocketAddr = "0.0.0.0:0".parse().expect("valid address");
    sock.bind(&any.into()).map_err(transport)?;
    Ok(sock.into())
}

fn endpoint_on(socket: std::net::UdpSocket) -> Result<quinn::Endpoint, ClientError> {
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(CLIENT_MAX_UDP_PAYLOAD)
        .map_err(|e| ClientError::Config(e.to_string()))?;
    quinn::Endpoint::new(
        config,
        None,
        socket,
        quinn::default_runtime().ok_or_else(|| ClientError::Config("no async runtime".into()))?,
    )
    .map_err(transport)
}

fn transport(e: impl std::fmt::Display) -> ClientError {
    ClientError::Transport(e.to_string())
}

/// How long a QUIC + TLS handshake may take before the coordinator counts as unreachable,
/// seconds.
pub const CONNECT_TIMEOUT_S: u64 = 10;

/// Sorts a connection failure: TLS alerts (ours about the coordinator's certificate, or the
/// coordinator's about ours) are [`ClientError::Tls`], the rest [`ClientError::Transport`].
fn connection_error(
    e: &quinn::ConnectionError,
    addr: SocketAddr,
    server_name: &str,
) -> ClientError {
    use quinn::ConnectionError as E;
    let tls_alert = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    match e {
        E::TransportError(t) if tls_alert(t.code) => ClientError::Tls(format!(
            "the coordinator at {addr} failed this client's TLS checks ({t}): is --ca the \
             federation's CA (from the same `fedlora certs init`), and does the coordinator's \
             certificate name `{server_name}` (else pass --server-name)?"
        )),
        E::ConnectionClosed(c) if tls_alert(c.error_code) => ClientError::Tls(format!(
            "the coordinator at {addr} refused this client's certificate ({c}): is it from the \
             federation's current CA, and not revoked?"
        )),
        E::TimedOut => ClientError::Transport(format!(
            "no answer from {addr}: is the coordinator running and reachable on that UDP \
             address (--coordinator)?"
        )),
        other => ClientError::Transport(format!(
            "connection to {addr}: {other} (is the coordinator running and reachable there?)"
        )),
    }
}

/// One connection to the coordinator.
#[derive(Clone, Debug)]
pub struct Session {
    conn: quinn::Connection,
    addr: SocketAddr,
    server_name: String,
}

impl Session {
    /// Connects (QUIC handshake with mutual TLS) to `addr`, checking the server certificate for
    /// `server_name`.
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<Self, ClientError> {
        Self::connect_within(
            endpoint,
            addr,
            server_name,
            Duration::from_secs(CONNECT_TIMEOUT_S),
        )
        .await
    }

    /// [`Session::connect`], giving the handshake `timeout` instead of [`CONNECT_TIMEOUT_S`].
    pub async fn connect_within(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        Self::connect_using(endpoint, None, addr, server_name, timeout).await
    }

    /// [`Session::connect_within`] with this connection's own QUIC and TLS settings
    /// (`None`: the endpoint's default), so that one endpoint serves several identities.
    pub async fn connect_using(
        endpoint: &quinn::Endpoint,
        config: Option<quinn::ClientConfig>,
        addr: SocketAddr,
        server_name: &str,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let connecting = match config {
            Some(c) => endpoint.connect_with(c, addr, server_name),
            None => endpoint.connect(addr, server_name),
        }
        .map_err(|e| ClientError::Config(format!("connecting to {addr}: {e}")))?;
        match tokio::time::timeout(timeout, connecting).await {
            Err(_) => Err(ClientError::Transport(format!(
                "no answer from {addr} within {}: is the coordinator running \
                 and reachable on that UDP address (--coordinator)?",
                humantime_secs(timeout)
            ))),
            Ok(Err(e)) => Err(connection_error(&e, addr, server_name)),
            Ok(Ok(conn)) => Ok(Self {
                conn,
                addr,
                server_name: server_name.to_string(),
            }),
        }
    }

    /// The error of a request that failed because the connection ended (sorted as
    /// [`connection_error`] does), or a transport error.
    fn lost(&self, e: impl std::fmt::Display) -> ClientError {
        match self.conn.close_reason() {
            Some(reason) => connection_error(&reason, self.addr, &self.server_name),
            None => transport(e),
        }
    }

    /// Sends raw bytes as one request and reads one response (tests use it for bad frames).
    /// The answer is read while the request is still being written: a coordinator may answer
    /// from a frame's header (a refusal) without taking its body, which then never leaves
    /// flow control.
    pub async fn request_raw(&self, bytes: &[u8]) -> Result<(CoordMsg, u64), ClientError> {
        let fut = async {
            let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| self.lost(e))?;
            let write = async {
                send.write_all(bytes).await.map_err(|e| self.lost(e))?;
                send.finish().map_err(|e| self.lost(e))
            };
            let read = async {
                let mut header = [0u8; HEADER_LEN];
                recv.read_exact(&mut header)
                    .await
                    .map_err(|e| self.lost(e))?;
                let (kind, len) = frame::parse_header(&header)?;
                if kind.from_client() {
                    return Err(ClientError::Transport(format!(
                        "coordinator sent a client frame kind {kind:?}"
                    )));
                }
                // grows as data arrives (the coordinator finishes the stream after one frame)
                let body = recv.read_to_end(len).await.map_err(|e| self.lost(e))?;
                if body.len() != len {
                    return Err(ClientError::Transport(format!(
                        "answer body is {} bytes, its header says {len}",
                        body.len()
                    )));
                }
                let msg = frame::decode_body::<CoordMsg>(kind, &body)?;
                Ok((msg, (HEADER_LEN + len) as u64))
            };
            tokio::pin!(write, read);
            let mut writing = true;
            loop {
                tokio::select! {
                    w = &mut write, if writing => {
                        writing = false;
                        // a write cut short by an answer from the header is not an error: the
                        // answer says why
                        if w.is_err() {
                            continue;
                        }
                    }
                    r = &mut read => return r,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(REQUEST_TIMEOUT_S), fut)
            .await
            .map_err(|_| ClientError::Transport("request timed out".into()))?
    }

    /// Sends one request and returns the response and its size on the wire (bytes).
    pub async fn request(&self, msg: &ClientMsg) -> Result<(CoordMsg, u64), ClientError> {
        self.request_raw(&frame::encode(msg)?).await
    }

    /// The coordinator's end-entity certificate (DER), as the TLS handshake verified it
    /// against the federation CA and the server name.
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        let id = self.conn.peer_identity()?;
        let certs = id
            .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
            .ok()?;
        certs.first().map(|c| c.to_vec())
    }

    /// The QUIC connection (for tests that open their own streams).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.conn.close(0u32.into(), b"bye");
    }
}

/// `10 s`, `1.5 s`: a timeout as people read it.
fn humantime_secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_socket_gets_the_receive_buffer_the_kernel_allows() {
        // Linux grants twice the request (its bookkeeping), capped at twice net.core.rmem_max
        let max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let shared = udp_socket(SHARED_RECV_BUFFER).unwrap();
        let got = socket2::SockRef::from(&shared).recv_buffer_size().unwrap();
        assert!(
            got >= SHARED_RECV_BUFFER.min(max),
            "asked for {SHARED_RECV_BUFFER} B (rmem_max {max} B), got {got} B"
        );
        // and more than a single device's socket gets, wherever the kernel allows more
        let single = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let default = socket2::SockRef::from(&single).recv_buffer_size().unwrap();
        if max * 2 > default {
            assert!(
                got > default,
                "{got} B is not above the default {default} B"
            );
        }
    }
}
