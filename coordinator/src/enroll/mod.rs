//! Enrollment: a device proves a one-time token and gets a certificate for a key it made on
//! itself, so no private key is ever copied onto a device.
//!
//! - [`tokens`]: tokens are made offline and stored as hashes in the certificate directory.
//! - [`issuer`]: certificates are signed from the device's CSR, whose signature must verify.
//! - [`Enrollment`]: the checks, in order: protocol version, token known, not expired, the CSR
//!   signed by its key, the key not revoked, then the token claimed atomically in sled (a
//!   token works once, even under concurrent requests) and the device recorded. A refused
//!   request issues nothing and uses no token.
//! - [`EnrollService`]: a QUIC endpoint of its own (server-authenticated TLS only: a device
//!   has no certificate yet), inside the coordinator (`--enroll-listen`) or as its own
//!   process (`fedlora enroll-service`) with its own issuing key.
//!
//! Renewal goes over the main endpoint, under the device's current mTLS identity
//! ([`Enrollment::renew`]): the id stays the one the connection proved.

pub mod issuer;
pub mod tokens;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedlora_protocol::enroll::{
    self as msg, token_hash, EnrollErrorCode, EnrollRequest, EnrollResponse, IssuedCert,
};
use fedlora_protocol::PROTOCOL_VERSION;
use rand::{RngExt, SeedableRng};
use tracing::{info, warn};

use crate::certs::CertDir;
use crate::error::{CoordinatorError, Result};
use crate::store::{DeviceRecord, DeviceRegistry};
use issuer::DeviceIssuer;

/// Settings of the enrollment service.
#[derive(Clone, Debug, PartialEq)]
pub struct EnrollConfig {
    /// UDP address of the enrollment endpoint (port 0: an ephemeral port).
    pub listen: SocketAddr,
    /// The token file (hashes and expiry; see [`tokens`]).
    pub tokens: PathBuf,
    /// The issuer's certificate (PEM): the federation CA, or an intermediate it signed.
    pub issuer_cert: PathBuf,
    /// The issuer's private key (PEM).
    pub issuer_key: PathBuf,
    /// The issuer is an intermediate: its certificate goes into every device's chain.
    pub intermediate: bool,
    /// Lifetime of a device certificate, seconds (default 30 days).
    pub validity_s: u64,
    /// The endpoint's own TLS certificate chain and key (PEM).
    pub server_cert: PathBuf,
    /// The endpoint's TLS key.
    pub server_key: PathBuf,
    /// The deny-list (devices and keys refused enrollment and renewal).
    pub revoked: PathBuf,
    /// Renewal opens this many seconds before the presented certificate expires (default 14
    /// days; devices renew 10 days before by default): a stolen certificate cannot be renewed
    /// into a fresh 30 days whenever its holder likes.
    pub renew_window_s: u64,
    /// Most enrollment connections served at once (default 64); more are refused at once, after
    /// a stateless retry has validated the peer's address. The endpoint is unauthenticated, so
    /// this bounds what strangers can hold: `max_connections ×` quinn's connection receive
    /// window (2 MiB), for at most twice `connection_timeout_ms` each.
    pub max_connections: usize,
    /// How long one connection may take for its requests, milliseconds (default 10 s): a peer
    /// that opens a stream and sends nothing is closed then.
    pub connection_timeout_ms: u64,
}

/// The default cap on concurrent enrollment connections.
pub const DEFAULT_MAX_ENROLL_CONNECTIONS: usize = 64;
/// The default time one enrollment connection may take, milliseconds.
pub const DEFAULT_ENROLL_CONNECTION_TIMEOUT_MS: u64 = 10_000;

/// The default renewal window: 14 days before expiry.
pub const DEFAULT_RENEW_WINDOW_S: u64 = 14 * 86_400;

/// The certificate a renewing connection presented: what renewal checks against revocation
/// and its window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presented {
    /// The id the connection proved (its certificate's common name).
    pub device_id: String,
    /// SHA-256 fingerprint of the certificate (as the deny-list writes it).
    pub fingerprint: String,
    /// Its key's id ([`issuer::key_id`]).
    pub key_id: String,
    /// Its expiry, Unix seconds.
    pub not_after_unix_s: u64,
}

impl EnrollConfig {
    /// Everything from a certificate directory made by `fedlora certs init`: the CA signs.
    pub fn from_certs_dir(dir: &Path, listen: SocketAddr) -> Self {
        let d = CertDir(dir.to_path_buf());
        Self {
            listen,
            tokens: dir.join(tokens::TOKEN_FILE),
            issuer_cert: d.ca(),
            issuer_key: d.ca_key(),
            intermediate: false,
            validity_s: issuer::DEFAULT_VALIDITY_S,
            server_cert: d.server_cert(),
            server_key: d.server_key(),
            revoked: d.revoked(),
            renew_window_s: DEFAULT_RENEW_WINDOW_S,
            max_connections: DEFAULT_MAX_ENROLL_CONNECTIONS,
            connection_timeout_ms: DEFAULT_ENROLL_CONNECTION_TIMEOUT_MS,
        }
    }
}

/// A refusal: its code and its message.
pub type Refused = (EnrollErrorCode, String);

/// The enrollment and renewal checks, with the issuer and the device registry.
pub struct Enrollment {
    config: EnrollConfig,
    issuer: DeviceIssuer,
    registry: DeviceRegistry,
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Enrollment {
    /// Loads the issuer.
    pub fn new(config: EnrollConfig, registry: DeviceRegistry) -> Result<Self> {
        let issuer = DeviceIssuer::load(
            &config.issuer_cert,
            &config.issuer_key,
            config.intermediate,
            config.validity_s,
        )?;
        Ok(Self {
            config,
            issuer,
            registry,
        })
    }

    /// The device registry.
    pub fn registry(&self) -> &DeviceRegistry {
        &self.registry
    }

    fn revoked(&self, device_id: Option<&str>, key: &str) -> Result<bool> {
        let deny = crate::certs::load_deny_list(&self.config.revoked)?;
        Ok(crate::certs::is_denied_id_or_key(&deny, device_id, key))
    }

    /// Answers an enrollment request at `now_s` (Unix seconds).
    pub fn enroll(&self, req: &EnrollRequest, now_s: u64) -> EnrollResponse {
        match self.try_enroll(req, now_s) {
            Ok(cert) => EnrollResponse::Issued(cert),
            Err((code, message)) => {
                warn!(?code, %message, "enrollment refused");
                EnrollResponse::Refused { code, message }
            }
        }
    }

    fn try_enroll(
        &self,
        req: &EnrollRequest,
        now_s: u64,
    ) -> std::result::Result<IssuedCert, Refused> {
        let internal = |e: CoordinatorError| (EnrollErrorCode::Internal, e.to_string());
        if req.protocol_version != PROTOCOL_VERSION {
            return Err((
                EnrollErrorCode::VersionMismatch,
                format!(
                    "the service speaks protocol {PROTOCOL_VERSION}, the device {}",
                    req.protocol_version
                ),
            ));
        }
        let hash = token_hash(&req.token);
        let known = tokens::load_tokens(&self.config.tokens).map_err(internal)?;
        let Some(&expires) = known.get(&hash) else {
            return Err((EnrollErrorCode::UnknownToken, "unknown token".into()));
        };
        if self.registry.token_used(&hash).map_err(internal)? {
            return Err((
                EnrollErrorCode::TokenUsed,
                "the token was used already".into(),
            ));
        }
        if now_s >= expires {
            return Err((EnrollErrorCode::TokenExpired, "the token expired".into()));
        }
        let device_id = new_device_id().map_err(internal)?;
        let (cert, key) = self
            .issuer
            .issue(&req.csr_der, &device_id, now_s)
            .map_err(|e| (EnrollErrorCode::BadRequest, e.0))?;
        if self.revoked(None, &key).map_err(internal)? {
            return Err((EnrollErrorCode::Revoked, "this key is revoked".into()));
        }
        // the claim is the commit point: a second request with the same token, even one racing
        // this one, finds it taken
        if !self
            .registry
            .claim_token(&hash, &device_id)
            .map_err(internal)?
        {
            return Err((
                EnrollErrorCode::TokenUsed,
                "the token was used already".into(),
            ));
        }
        self.registry
            .put_device(&DeviceRecord {
                device_id: device_id.clone(),
                key_id: key,
                not_after_unix_s: cert.not_after_unix_s,
                enrolled_ms: now_s * 1000,
                renewals: 0,
            })
            .map_err(internal)?;
        info!(device = %device_id, not_after = cert.not_after_unix_s, "device enrolled");
        Ok(cert)
    }

    /// A new certificate for the device whose current mTLS certificate is `presented`, for
    /// the key of `csr_der`. Refused when:
    /// - the id is not an enrolled device's (`device-…`; `certs init` clients do not renew);
    /// - the presented certificate is revoked (by fingerprint, key or device id), or the new
    ///   key or the device's recorded key is;
    /// - the presented certificate expires later than [`EnrollConfig::renew_window_s`] from
    ///   now (renewal opens only near expiry);
    /// - the presented certificate has expired, or the request is for another key than the
    ///   presented certificate's (a renewal keeps the key);
    /// - the request is bad.
    pub fn renew(
        &self,
        presented: &Presented,
        csr_der: &[u8],
        now_s: u64,
    ) -> std::result::Result<IssuedCert, Refused> {
        let internal = |e: CoordinatorError| (EnrollErrorCode::Internal, e.to_string());
        let device_id = presented.device_id.as_str();
        if !device_id.starts_with(crate::certs::DEVICE_ID_PREFIX) {
            return Err((
                EnrollErrorCode::BadRequest,
                format!("{device_id} is not an enrolled device: only enrolled devices renew"),
            ));
        }
        let deny = crate::certs::load_deny_list(&self.config.revoked).map_err(internal)?;
        if crate::certs::is_denied(&deny, &presented.fingerprint, device_id, &presented.key_id) {
            return Err((
                EnrollErrorCode::Revoked,
                "the certificate this connection presented is revoked".into(),
            ));
        }
        if now_s > presented.not_after_unix_s {
            return Err((
                EnrollErrorCode::BadRequest,
                "the presented certificate has expired: enroll again".into(),
            ));
        }
        let opens = presented
            .not_after_unix_s
            .saturating_sub(self.config.renew_window_s);
        if now_s < opens {
            return Err((
                EnrollErrorCode::BadRequest,
                format!(
                    "renewal opens {} s before expiry: this certificate can renew from Unix \
                     time {opens}",
                    self.config.renew_window_s
                ),
            ));
        }
        // a device enrolled by a separate enrollment service is not in this registry yet:
        // its connection proved its id with a certificate from the federation's CA
        let mut rec = self
            .registry
            .device(device_id)
            .map_err(internal)?
            .unwrap_or_else(|| DeviceRecord {
                device_id: device_id.to_string(),
                key_id: String::new(),
                not_after_unix_s: 0,
                enrolled_ms: now_s * 1000,
                renewals: 0,
            });
        let (cert, key) = self
            .issuer
            .issue(csr_der, device_id, now_s)
            .map_err(|e| (EnrollErrorCode::BadRequest, e.0))?;
        let denied = |k: &str| crate::certs::is_denied_id_or_key(&deny, Some(device_id), k);
        if denied(&key) || denied(&rec.key_id) {
            return Err((
                EnrollErrorCode::Revoked,
                "this device or key is revoked".into(),
            ));
        }
        // a renewal keeps the device's key: whoever holds a stolen key and connection cannot
        // renew the id onto a key of their own (a new key means a new enrollment)
        if key != presented.key_id {
            return Err((
                EnrollErrorCode::BadRequest,
                "a renewal keeps the certificate's key; a new key needs a new enrollment".into(),
            ));
        }
        rec.key_id = key;
        rec.not_after_unix_s = cert.not_after_unix_s;
        rec.renewals += 1;
        self.registry.put_device(&rec).map_err(internal)?;
        info!(device = %device_id, not_after = cert.not_after_unix_s, "certificate renewed");
        Ok(cert)
    }
}

/// A fresh device id from the OS CSPRNG: `device-` and 12 hex digits.
fn new_device_id() -> Result<String> {
    let mut rng = rand::rngs::ChaCha20Rng::try_from_rng(&mut rand::rngs::SysRng)
        .map_err(|e| CoordinatorError::Config(format!("the OS random source: {e}")))?;
    let b: [u8; 6] = rng.random();
    Ok(format!(
        "{}{}",
        crate::certs::DEVICE_ID_PREFIX,
        hex::encode(b)
    ))
}

/// A running enrollment endpoint.
pub struct EnrollService {
    endpoint: quinn::Endpoint,
    task: tokio::task::JoinHandle<()>,
    enrollment: Arc<Enrollment>,
}

impl EnrollService {
    /// Binds the endpoint and serves enrollment requests.
    pub fn start(enrollment: Arc<Enrollment>) -> Result<Self> {
        let c = &enrollment.config;
        let sc = crate::tls::enroll_server_config(&c.server_cert, &c.server_key)?;
        let endpoint = quinn::Endpoint::server(sc, c.listen)?;
        info!(addr = %endpoint.local_addr()?, "enrollment endpoint listening");
        let task = tokio::spawn(accept(endpoint.clone(), enrollment.clone()));
        Ok(Self {
            endpoint,
            task,
            enrollment,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// The checks behind the endpoint (renewals use them too).
    pub fn enrollment(&self) -> &Arc<Enrollment> {
        &self.enrollment
    }

    /// Stops serving.
    pub fn shutdown(&self) {
        self.endpoint.close(0u32.into(), b"bye");
        self.task.abort();
    }
}

async fn accept(endpoint: quinn::Endpoint, e: Arc<Enrollment>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(e.config.max_connections.max(1)));
    let limit = std::time::Duration::from_millis(e.config.connection_timeout_ms.max(1));
    while let Some(incoming) = endpoint.accept().await {
        // a stateless retry first proves the peer owns its address (spoofed sources cannot
        // take slots), then past the cap a connection is refused before its handshake
        if !incoming.remote_address_validated() {
            let _ = incoming.retry();
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn!(remote = %incoming.remote_address(), "enrollment connections at their cap");
            incoming.refuse();
            continue;
        };
        let e = e.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let Ok(Ok(conn)) = tokio::time::timeout(limit, incoming).await else {
                return;
            };
            // the whole connection (handshake done, its requests) within the limit
            if tokio::time::timeout(limit, serve(&conn, &e)).await.is_err() {
                conn.close(1u32.into(), b"enrollment takes too long");
            }
        });
    }
}

/// Up to 4 requests of one enrollment connection, one per stream.
async fn serve(conn: &quinn::Connection, e: &Arc<Enrollment>) {
    for _ in 0..4 {
        let Ok((mut send, mut recv)) = conn.accept_bi().await else {
            return;
        };
        let answer = match recv.read_to_end(msg::MAX_ENROLL_MESSAGE).await {
            Ok(bytes) => match msg::decode_request(&bytes) {
                Ok(req) => {
                    let e = e.clone();
                    // signing and the sled flush block: off the async threads
                    tokio::task::spawn_blocking(move || e.enroll(&req, now_s()))
                        .await
                        .unwrap_or(EnrollResponse::Refused {
                            code: EnrollErrorCode::Internal,
                            message: "the service failed; retry".into(),
                        })
                }
                Err(err) => EnrollResponse::Refused {
                    code: EnrollErrorCode::BadRequest,
                    message: err.to_string(),
                },
            },
            Err(err) => EnrollResponse::Refused {
                code: EnrollErrorCode::BadRequest,
                message: format!("reading the request: {err}"),
            },
        };
        if let Ok(b) = msg::encode(&answer) {
            let _ = send.write_all(&b).await;
            let _ = send.finish();
        }
    }
}
