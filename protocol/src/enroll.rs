//! Enrollment: a device that holds a one-time token gets a certificate for a key it made
//! itself. The messages of the enrollment endpoint (server-authenticated TLS only, ALPN
//! [`ENROLL_ALPN`]), and the renewal messages of the main endpoint ([`crate::ClientMsg::Renew`],
//! [`crate::CoordMsg::Renewed`]), with their size limits. Pure: no I/O, no clock.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ProtocolError;

/// ALPN of the enrollment endpoint (a different protocol from the federation's).
pub const ENROLL_ALPN: &[u8] = b"fedlora-enroll/1";
/// The longest token, bytes.
pub const MAX_TOKEN_LEN: usize = 128;
/// The largest certificate signing request (DER), bytes.
pub use crate::limits::MAX_CSR_LEN;
/// The largest certificate chain (PEM), bytes.
pub const MAX_CHAIN_LEN: usize = 32 * 1024;
/// The largest enrollment message, bytes.
pub const MAX_ENROLL_MESSAGE: usize = 48 * 1024;

/// A device asks for its first certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// [`crate::PROTOCOL_VERSION`] of the device.
    pub protocol_version: u16,
    /// The one-time enrollment token.
    pub token: String,
    /// A PKCS#10 request for the device's own key (DER), signed by that key.
    #[serde(with = "serde_bytes")]
    pub csr_der: Vec<u8>,
}

/// A certificate the federation's issuer signed for a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCert {
    /// The device id the coordinator assigned (the certificate's common name).
    pub device_id: String,
    /// The certificate, then any intermediate up to (not including) the federation CA, PEM.
    pub chain_pem: String,
    /// The end of the certificate's validity, Unix seconds.
    pub not_after_unix_s: u64,
}

/// Why enrollment refused a request; nothing was issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollErrorCode {
    /// No such token was issued.
    UnknownToken,
    /// The token was used already.
    TokenUsed,
    /// The token expired.
    TokenExpired,
    /// The request cannot be parsed, or its signature does not match its key.
    BadRequest,
    /// The device or its key is revoked.
    Revoked,
    /// Another protocol version.
    VersionMismatch,
    /// The service failed (storage); retry.
    Internal,
}

/// The enrollment endpoint's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollResponse {
    /// The certificate.
    Issued(IssuedCert),
    /// Refused, with a typed reason and a message.
    Refused {
        /// Why.
        code: EnrollErrorCode,
        /// In words.
        message: String,
    },
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_ENROLL_MESSAGE>()
}

fn too_long(what: &str, len: usize, max: usize) -> Result<(), ProtocolError> {
    if len > max {
        return Err(ProtocolError::TooLarge(format!(
            "{what} is {len} bytes (at most {max})"
        )));
    }
    Ok(())
}

impl EnrollRequest {
    /// Checks the fields' sizes.
    pub fn check(&self) -> Result<(), ProtocolError> {
        too_long("token", self.token.len(), MAX_TOKEN_LEN)?;
        too_long("certificate request", self.csr_der.len(), MAX_CSR_LEN)
    }
}

impl IssuedCert {
    /// Checks the fields' sizes.
    pub fn check(&self) -> Result<(), ProtocolError> {
        too_long("device id", self.device_id.len(), crate::limits::MAX_ID_LEN)?;
        too_long("certificate chain", self.chain_pem.len(), MAX_CHAIN_LEN)
    }
}

/// Encodes an enrollment message (one per stream).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    bincode::serde::encode_to_vec(msg, config()).map_err(|e| ProtocolError::Frame(e.to_string()))
}

/// Decodes a request, refusing trailing bytes and fields out of range.
pub fn decode_request(bytes: &[u8]) -> Result<EnrollRequest, ProtocolError> {
    let r: EnrollRequest = decode(bytes)?;
    r.check()?;
    Ok(r)
}

/// Decodes a response, refusing trailing bytes and fields out of range.
pub fn decode_response(bytes: &[u8]) -> Result<EnrollResponse, ProtocolError> {
    let r: EnrollResponse = decode(bytes)?;
    match &r {
        EnrollResponse::Issued(c) => c.check()?,
        EnrollResponse::Refused { message, .. } => too_long("message", message.len(), 4096)?,
    }
    Ok(r)
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ProtocolError> {
    too_long("enrollment message", bytes.len(), MAX_ENROLL_MESSAGE)?;
    let (v, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| ProtocolError::Frame(e.to_string()))?;
    if used != bytes.len() {
        return Err(ProtocolError::Frame(format!(
            "{} trailing bytes after an enrollment message",
            bytes.len() - used
        )));
    }
    Ok(v)
}

/// The SHA-256 of a token, hex: what the issuer stores instead of the token.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_oversized_fields_are_refused() {
        let r = EnrollRequest {
            protocol_version: 6,
            token: "fl-abc".into(),
            csr_der: vec![1; 300],
        };
        assert_eq!(decode_request(&encode(&r).unwrap()).unwrap(), r);
        let mut bad = encode(&r).unwrap();
        bad.push(0);
        assert!(decode_request(&bad).is_err());
        let long = EnrollRequest {
            token: "x".repeat(MAX_TOKEN_LEN + 1),
            ..r.clone()
        };
        assert!(decode_request(&encode(&long).unwrap()).is_err());
        let resp = EnrollResponse::Refused {
            code: EnrollErrorCode::TokenUsed,
            message: "used".into(),
        };
        assert_eq!(decode_response(&encode(&resp).unwrap()).unwrap(), resp);
        // random bytes never panic the decoders
        for n in 0..200u32 {
            let junk: Vec<u8> = (0..n)
                .map(|i| (i.wrapping_mul(2654435761) >> 3) as u8)
                .collect();
            let _ = decode_request(&junk);
            let _ = decode_response(&junk);
        }
        assert_eq!(token_hash("a").len(), 64);
    }
}
