//! QUIC + TLS 1.3 server configuration with mutual TLS: only clients whose certificate chains to
//! the federation CA complete the handshake.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{CoordinatorError, Result};

use fedlora_protocol::{ALPN, IDLE_TIMEOUT_S, KEEP_ALIVE_S};

fn err(what: &Path, e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Tls(format!("{}: {e}", what.display()))
}

/// Loads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(path, e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| err(path, e))?;
    if certs.is_empty() {
        return Err(err(path, "no certificate in file"));
    }
    Ok(certs)
}

/// Loads a private key from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| err(path, e))
}

/// The server certificate's key as the signer of client-level DP plans
/// ([`fedlora_protocol::plan_signature`]): it must be an ECDSA P-256 key in PKCS#8, as
/// `fedlora certs init` makes it, so that clients can check plan signatures against the
/// certificate their TLS handshake verified.
pub fn load_plan_signer(path: &Path) -> Result<fedlora_protocol::secagg::crypto::EcdsaP256Signer> {
    match load_key(path)? {
        PrivateKeyDer::Pkcs8(k) => {
            fedlora_protocol::secagg::crypto::EcdsaP256Signer::from_pkcs8(k.secret_pkcs8_der())
                .map_err(|e| err(path, format!("{e} (client-level DP plans are signed with the server key, which must be ECDSA P-256)")))
        }
        _ => Err(err(
            path,
            "client-level DP plans are signed with the server key, which must be an ECDSA P-256 key in PKCS#8",
        )),
    }
}

/// The transport settings shared by server and client: idle timeout and keep-alives.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(IDLE_TIMEOUT_S)).expect("valid timeout"),
    ));
    t.keep_alive_interval(Some(Duration::from_secs(KEEP_ALIVE_S)));
    crate::wire::apply_limits(&mut t);
    t
}

/// A QUIC server config: TLS 1.3 only, ring provider, client certificates required and verified
/// against `ca`.
pub fn server_config(ca: &Path, cert: &Path, key: &Path) -> Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| err(ca, e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| err(ca, e))?;
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CoordinatorError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| err(cert, e))?;
    quic(tls, ALPN)
}

/// The enrollment endpoint's QUIC server config: TLS 1.3, the server authenticated, no client
/// certificate asked for (a device enrolling has none yet; its token authorises it), ALPN
/// [`fedlora_protocol::enroll::ENROLL_ALPN`].
pub fn enroll_server_config(cert: &Path, key: &Path) -> Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CoordinatorError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| err(cert, e))?;
    quic(tls, fedlora_protocol::enroll::ENROLL_ALPN)
}

fn quic(mut tls: rustls::ServerConfig, alpn: &[u8]) -> Result<quinn::ServerConfig> {
    tls.alpn_protocols = vec![alpn.to_vec()];
    let q = QuicServerConfig::try_from(tls).map_err(|e| CoordinatorError::Tls(e.to_string()))?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(q));
    sc.transport_config(Arc::new(transport_config()));
    Ok(sc)
}
