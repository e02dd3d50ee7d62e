//! Bounds on every field a peer sends, and the small checks that apply them. Each message
//! type checks its own fields against these (`ClientMsg::check_bounds` and
//! `CoordMsg::check_bounds` in [`crate::message`], the secure-aggregation bodies in
//! [`crate::secagg`]) when a frame is decoded ([`crate::frame::decode_body`]), so nothing out
//! of range reaches the state machines: no non-finite float (it would become `null` in a JSON
//! record and break the store), no list or string that makes a relayed message larger than its
//! frame (which would refuse every client).
//!
//! This module holds only constants and the checks' building blocks: it imports nothing but
//! the error type, so every message module can use it.

use crate::error::ProtocolError;

/// Size limit of messages that carry an adapter (uploads, tasks), bytes.
pub const PAYLOAD_LIMIT: usize = 64 * 1024 * 1024;
/// The largest piece of a resumable upload or of a global download, bytes.
pub const MAX_UPLOAD_CHUNK: usize = 1 << 20;
/// The largest certificate signing request (DER), bytes.
pub const MAX_CSR_LEN: usize = 8 * 1024;

/// Longest client id (certificate common name), bytes.
pub const MAX_ID_LEN: usize = 128;
/// Longest key signature (a DER ECDSA P-256 signature is at most 72 bytes), bytes.
pub const MAX_SIGNATURE_LEN: usize = 128;
/// Most neighbours (and so shares) of one client in a secure round.
pub const MAX_NEIGHBOURS: usize = 254;
/// Longest encrypted share pair (two 33-byte Shamir shares, two ids, AEAD overhead), bytes.
pub const MAX_SHARE_CIPHERTEXT: usize = 1024;
/// Longest Shamir share of one 32-byte secret, bytes.
pub const MAX_SECRET_SHARE_LEN: usize = 64;
/// Most participants in one secure round (roster, certificates, survivor sets).
pub const MAX_ROSTER: usize = 10_000;
/// Longest Merkle inclusion proof of a roster entry (⌈log₂ MAX_ROSTER⌉ hashes, with room).
pub const MAX_PROOF: usize = 32;
/// Longest client certificate chain relayed for signature checks (DER, leaf and intermediates),
/// bytes.
pub const MAX_CERT_LEN: usize = 8 * 1024;

/// A field out of its range.
pub(crate) fn invalid(m: impl Into<String>) -> ProtocolError {
    ProtocolError::InvalidValue(m.into())
}

/// A list or string longer than its bound.
pub(crate) fn too_large(what: &str, got: usize, max: usize) -> ProtocolError {
    ProtocolError::TooLarge(format!("{what} has {got}, at most {max} allowed"))
}

/// `v` must be a finite number.
pub(crate) fn finite(what: &str, v: f64) -> Result<(), ProtocolError> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(invalid(format!("{what} is {v}, not a finite number")))
    }
}

/// `got` must be at most `max`.
pub(crate) fn bounded(what: &str, got: usize, max: usize) -> Result<(), ProtocolError> {
    if got > max {
        Err(too_large(what, got, max))
    } else {
        Ok(())
    }
}

/// A client id must be at most [`MAX_ID_LEN`] bytes.
pub(crate) fn id(what: &str, id: &str) -> Result<(), ProtocolError> {
    bounded(what, id.len(), MAX_ID_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame;
    use crate::message::{ClientMsg, EvalReport, SecAggBody, Upload};
    use crate::secagg::AdvertisedKeys;

    #[test]
    fn non_finite_floats_are_refused_at_the_frame_boundary() {
        for (weight, loss) in [(1.0, f64::NAN), (f64::INFINITY, 1.0), (1.0, -1.0)] {
            let f = frame::encode(&ClientMsg::Upload(Upload {
                round: 1,
                spec_hash: [0; 32],
                weight,
                train_loss: loss,
                payload: vec![],
            }))
            .unwrap();
            let e = frame::decode::<ClientMsg>(&f).unwrap_err();
            assert!(matches!(e, ProtocolError::InvalidValue(_)), "{e:?}");
            assert_eq!(e.refusal().code, crate::RefusalCode::InvalidValue);
        }
        let f = frame::encode(&ClientMsg::EvalReport(EvalReport {
            version: 1,
            loss: f64::NEG_INFINITY,
            tokens: 3,
        }))
        .unwrap();
        assert!(matches!(
            frame::decode::<ClientMsg>(&f),
            Err(ProtocolError::InvalidValue(_))
        ));
    }

    #[test]
    fn an_oversized_signature_is_refused_before_it_reaches_a_roster() {
        let k = AdvertisedKeys {
            client: "c".into(),
            c_pk: [0; 32],
            s_pk: [0; 32],
            nonce: [0; 32],
            seed_commitment: [0; 32],
            signature: vec![0; MAX_SIGNATURE_LEN + 1],
        };
        let f = frame::encode(&ClientMsg::SecAgg {
            round: 1,
            body: SecAggBody::Keys(k),
        })
        .unwrap();
        let e = frame::decode::<ClientMsg>(&f).unwrap_err();
        assert!(matches!(e, ProtocolError::TooLarge(_)), "{e:?}");
    }
}
