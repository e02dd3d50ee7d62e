//! Signs device certificates from certificate signing requests: the federation CA (the
//! default), or an issuing CA of the enrollment service's own (an intermediate signed by the
//! federation CA), whose certificate then travels in the device's chain.

use std::path::Path;

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, Issuer,
    KeyPair,
};
use rustls_pki_types::CertificateSigningRequestDer;
use sha2::{Digest, Sha256};

use crate::error::{CoordinatorError, Result};
use fedlora_protocol::enroll::IssuedCert;

/// Default certificate lifetime: 30 days.
pub const DEFAULT_VALIDITY_S: u64 = 30 * 86_400;

/// What signs device certificates.
pub struct DeviceIssuer {
    issuer: Issuer<'static, KeyPair>,
    /// The issuer's own certificate when it is not the federation CA (sent in the chain).
    intermediate_pem: Option<String>,
    /// Lifetime of a device certificate, seconds.
    pub validity_s: u64,
}

/// The SHA-256 (hex) of a public key's bits: how revocation names a key, whichever
/// certificate carries it.
pub fn key_id(public_key_bits: &[u8]) -> String {
    hex::encode(Sha256::digest(public_key_bits))
}

/// The key id and common name of a certificate (DER).
pub fn cert_key_and_name(der: &[u8]) -> Result<(String, String, u64)> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| CoordinatorError::Tls(format!("certificate: {e}")))?;
    let key = key_id(&cert.tbs_certificate.subject_pki.subject_public_key.data);
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or_default()
        .to_string();
    let not_after = cert.validity().not_after.timestamp().max(0) as u64;
    Ok((key, cn, not_after))
}

/// Why a request cannot be signed.
#[derive(Debug)]
pub struct BadRequest(pub String);

impl DeviceIssuer {
    /// The issuer from its certificate and key (PEM files). `intermediate`: the certificate is
    /// not the federation CA, so it goes into every device's chain.
    pub fn load(cert: &Path, key: &Path, intermediate: bool, validity_s: u64) -> Result<Self> {
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .map_err(|e| CoordinatorError::Config(format!("{}: {e}", p.display())))
        };
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        let kp = KeyPair::from_pem(&key_pem)
            .map_err(|e| CoordinatorError::Tls(format!("{}: {e}", key.display())))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, kp)
            .map_err(|e| CoordinatorError::Tls(format!("{}: {e}", cert.display())))?;
        Ok(Self {
            issuer,
            intermediate_pem: intermediate.then_some(cert_pem),
            validity_s,
        })
    }

    /// Signs a client certificate for the key of `csr_der` (whose signature must verify) with
    /// common name `device_id`, valid from `now_s` for [`DeviceIssuer::validity_s`]. Whatever
    /// else the request asks (names, usages, CA) is ignored. Returns it with its key id.
    pub fn issue(
        &self,
        csr_der: &[u8],
        device_id: &str,
        now_s: u64,
    ) -> std::result::Result<(IssuedCert, String), BadRequest> {
        let der = CertificateSigningRequestDer::from(csr_der.to_vec());
        let mut csr = CertificateSigningRequestParams::from_der(&der)
            .map_err(|e| BadRequest(format!("certificate request: {e}")))?;
        let key = key_id(rcgen::PublicKeyData::der_bytes(&csr.public_key));
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, device_id);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        let t = |s: u64| time::OffsetDateTime::from_unix_timestamp(s as i64).expect("time");
        // a few minutes of slack for a device clock behind the coordinator's
        p.not_before = t(now_s.saturating_sub(300));
        let not_after = now_s + self.validity_s;
        p.not_after = t(not_after);
        let mut serial = [0u8; 16];
        serial.copy_from_slice(&Sha256::digest(format!("{device_id}/{key}/{now_s}"))[..16]);
        serial[0] &= 0x7f;
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        csr.params = p;
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(|e| BadRequest(format!("signing: {e}")))?;
        let mut chain_pem = cert.pem();
        if let Some(i) = &self.intermediate_pem {
            chain_pem.push_str(i);
        }
        Ok((
            IssuedCert {
                device_id: device_id.to_string(),
                chain_pem,
                not_after_unix_s: not_after,
            },
            key,
        ))
    }
}
