//! Enrollment on the device: it makes its key pair itself (the private key never leaves it,
//! written with mode 0600), sends a certificate signing request with a one-time token to the
//! coordinator's enrollment endpoint (server-authenticated TLS: the device has no certificate
//! yet), and keeps the certificate it gets. Renewal ([`renewal_request`]) sends a new request
//! for the same key over the device's existing mTLS connection.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedlora_protocol::enroll::{self as msg, EnrollRequest, EnrollResponse};
use fedlora_protocol::PROTOCOL_VERSION;
use rcgen::{CertificateParams, KeyPair};

use crate::error::ClientError;
use crate::transport::ClientTls;

/// What `enroll` needs.
#[derive(Clone, Debug)]
pub struct EnrollOptions {
    /// The enrollment endpoint.
    pub endpoint: SocketAddr,
    /// The name on the coordinator's certificate.
    pub server_name: String,
    /// The federation CA (PEM), obtained out of band (it is public).
    pub ca: PathBuf,
    /// The one-time token.
    pub token: String,
    /// Where the key, the certificate and a copy of the CA are written.
    pub state_dir: PathBuf,
}

/// A device's new identity.
#[derive(Clone, Debug)]
pub struct Enrolled {
    /// The id the coordinator assigned.
    pub device_id: String,
    /// The end of the certificate's validity, Unix seconds.
    pub not_after_unix_s: u64,
    /// The files to connect with.
    pub tls: ClientTls,
}

/// The device's key: the one in `path`, or a new P-256 key written there with mode 0600.
pub fn device_key(path: &Path) -> Result<KeyPair, ClientError> {
    if path.exists() {
        let pem = std::fs::read_to_string(path)?;
        return KeyPair::from_pem(&pem)
            .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())));
    }
    let key = KeyPair::generate().map_err(|e| ClientError::Config(e.to_string()))?;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    use std::io::Write;
    let mut f = opts.open(path)?;
    f.write_all(key.serialize_pem().as_bytes())?;
    f.sync_all()?;
    Ok(key)
}

/// A certificate signing request (DER) for `key`, signed by it.
pub fn csr(key: &KeyPair) -> Result<Vec<u8>, ClientError> {
    let req = CertificateParams::default()
        .serialize_request(key)
        .map_err(|e| ClientError::Config(format!("certificate request: {e}")))?;
    Ok(req.der().to_vec())
}

/// Stores a certificate chain the coordinator issued as `tls.cert`.
pub fn store_chain(tls: &ClientTls, chain_pem: &str) -> Result<(), ClientError> {
    crate::durable::replace_file(&tls.cert, chain_pem.as_bytes())
}

/// Enrolls this device: key (made here if missing), request, certificate. A refusal (unknown,
/// used or expired token, a request the service cannot verify) is
/// [`ClientError::Enroll`] and writes no certificate.
pub async fn enroll(opts: &EnrollOptions) -> Result<Enrolled, ClientError> {
    let tls = ClientTls::from_state_dir(&opts.state_dir);
    std::fs::create_dir_all(&opts.state_dir)?;
    let key = device_key(&tls.key)?;
    let req = EnrollRequest {
        protocol_version: PROTOCOL_VERSION,
        token: opts.token.trim().to_string(),
        csr_der: csr(&key)?,
    };
    match exchange(opts, &req).await? {
        EnrollResponse::Issued(cert) => {
            store_chain(&tls, &cert.chain_pem)?;
            if std::fs::canonicalize(&opts.ca).ok() != std::fs::canonicalize(&tls.ca).ok() {
                std::fs::copy(&opts.ca, &tls.ca)?;
            }
            Ok(Enrolled {
                device_id: cert.device_id,
                not_after_unix_s: cert.not_after_unix_s,
                tls,
            })
        }
        EnrollResponse::Refused { code, message } => Err(ClientError::Enroll(code, message)),
    }
}

/// Sends one enrollment request to `opts.endpoint` and returns the answer (what [`enroll`]
/// does on the wire; tests use it to send requests a device would not).
pub async fn exchange(
    opts: &EnrollOptions,
    req: &EnrollRequest,
) -> Result<EnrollResponse, ClientError> {
    req.check()?;
    let cfg = crate::transport::enroll_client_config(&opts.ca)?;
    let bind: SocketAddr = if opts.endpoint.is_ipv6() {
        "[::]:0".parse().expect("valid")
    } else {
        "0.0.0.0:0".parse().expect("valid")
    };
    let mut ep = quinn::Endpoint::client(bind)?;
    ep.set_default_client_config(cfg);
    let transport = |e: &dyn std::fmt::Display| {
        ClientError::Transport(format!("enrollment endpoint {}: {e}", opts.endpoint))
    };
    let conn = tokio::time::timeout(
        Duration::from_secs(20),
        ep.connect(opts.endpoint, &opts.server_name)
            .map_err(|e| transport(&e))?,
    )
    .await
    .map_err(|_| transport(&"no answer within 20 s"))?
    .map_err(|e| transport(&e))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| transport(&e))?;
    send.write_all(&msg::encode(req)?)
        .await
        .map_err(|e| transport(&e))?;
    send.finish().map_err(|e| transport(&e))?;
    let bytes = recv
        .read_to_end(msg::MAX_ENROLL_MESSAGE)
        .await
        .map_err(|e| transport(&e))?;
    conn.close(0u32.into(), b"done");
    ep.wait_idle().await;
    Ok(msg::decode_response(&bytes)?)
}

/// The end of validity (Unix seconds) of the first certificate in a PEM file.
pub fn cert_not_after(path: &Path) -> Result<u64, ClientError> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_file(path)
        .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
    Ok(cert.validity().not_after.timestamp().max(0) as u64)
}

/// A renewal request for the device's current key, when its certificate ends within
/// `renew_within_s` of `now_s`; `None` when it need not renew yet.
pub fn renewal_request(
    tls: &ClientTls,
    renew_within_s: u64,
    now_s: u64,
) -> Result<Option<Vec<u8>>, ClientError> {
    let not_after = cert_not_after(&tls.cert)?;
    if not_after > now_s.saturating_add(renew_within_s) {
        return Ok(None);
    }
    Ok(Some(csr(&device_key(&tls.key)?)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_made_once_with_mode_0600_and_signs_its_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k/device.key");
        let k1 = device_key(&path).unwrap();
        let k2 = device_key(&path).unwrap();
        assert_eq!(k1.public_key_pem(), k2.public_key_pem());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let der = csr(&k1).unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_der(&der.clone().into());
        assert!(parsed.is_ok());
        // a flipped bit in the signature does not verify
        let mut bad = der.clone();
        let n = bad.len();
        bad[n - 3] ^= 1;
        assert!(rcgen::CertificateSigningRequestParams::from_der(&bad.into()).is_err());
    }
}
