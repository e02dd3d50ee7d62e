//! The UDP socket a QUIC endpoint serves on (the driver's and each front-end's).

use std::net::SocketAddr;

use tracing::{info, warn};

use crate::error::{CoordinatorError, Result};

/// Binds `addr` with a receive buffer of `recv_buffer` bytes (logs what the kernel granted).
pub fn bind_socket(addr: SocketAddr, recv_buffer: usize) -> Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Err(e) = sock.set_recv_buffer_size(recv_buffer) {
        warn!(error = %e, "could not set the UDP receive buffer");
    }
    let got = sock.recv_buffer_size().unwrap_or(0);
    if got < recv_buffer {
        warn!(
            requested = recv_buffer,
            granted = got,
            "UDP receive buffer capped by the kernel (raise net.core.rmem_max)"
        );
    } else {
        info!(bytes = got, "UDP receive buffer");
    }
    sock.bind(&addr.into()).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            " (another coordinator is running there? choose another --listen port)"
        } else {
            ""
        };
        CoordinatorError::Config(format!("cannot listen on {addr}: {e}{hint}"))
    })?;
    Ok(sock.into())
}

/// A QUIC server endpoint on `socket` (the driver's and each front-end's).
pub fn serve_endpoint(
    server_config: quinn::ServerConfig,
    socket: std::net::UdpSocket,
) -> Result<quinn::Endpoint> {
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        socket,
        quinn::default_runtime()
            .ok_or_else(|| CoordinatorError::Config("no async runtime".into()))?,
    )?)
}
