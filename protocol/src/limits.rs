//! Bounds on every field a peer sends, checked when a frame is decoded
//! ([`crate::frame::decode_body`]), so nothing out of range reaches the state machines: no
//! non-finite float (it would become `null` in a JSON record and break the store), no list or
//! string that makes a relayed message larger than its frame (which would refuse every client).

use crate::error::ProtocolError;
use crate::message::{ClientMsg, CoordMsg, SecAggBody, SecAggTask, Task, TrainConfig};
use crate::secagg::{AdvertisedKeys, EncryptedShare, UnmaskRequest};

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
/// Longest client certificate relayed for signature checks (DER), bytes.
pub const MAX_CERT_LEN: usize = 8 * 1024;

fn invalid(m: impl Into<String>) -> ProtocolError {
    ProtocolError::InvalidValue(m.into())
}

fn too_large(what: &str, got: usize, max: usize) -> ProtocolError {
    ProtocolError::TooLarge(format!("{what} has {got}, at most {max} allowed"))
}

fn finite(what: &str, v: f64) -> Result<(), ProtocolError> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(invalid(format!("{what} is {v}, not a finite number")))
    }
}

fn bounded(what: &str, got: usize, max: usize) -> Result<(), ProtocolError> {
    if got > max {
        Err(too_large(what, got, max))
    } else {
        Ok(())
    }
}

fn id(what: &str, id: &str) -> Result<(), ProtocolError> {
    bounded(what, id.len(), MAX_ID_LEN)
}

fn keys(k: &AdvertisedKeys) -> Result<(), ProtocolError> {
    id("advertised keys' client id", &k.client)?;
    bounded(
        "advertised keys' signature",
        k.signature.len(),
        MAX_SIGNATURE_LEN,
    )
}

fn shares(s: &[EncryptedShare]) -> Result<(), ProtocolError> {
    bounded("share list", s.len(), MAX_NEIGHBOURS)?;
    for e in s {
        id("share sender", &e.from)?;
        id("share recipient", &e.to)?;
        bounded("share ciphertext", e.ciphertext.len(), MAX_SHARE_CIPHERTEXT)?;
    }
    Ok(())
}

fn unmask_request(r: &UnmaskRequest) -> Result<(), ProtocolError> {
    bounded("survivor set", r.survivors.len(), MAX_ROSTER)?;
    bounded("dropped set", r.dropped.len(), MAX_ROSTER)?;
    r.survivors
        .iter()
        .chain(&r.dropped)
        .try_for_each(|c| id("unmask request id", c))
}

fn train_config(c: &TrainConfig) -> Result<(), ProtocolError> {
    finite("learning rate", c.learning_rate)?;
    if let Some(dp) = &c.dp {
        finite("DP clip norm", dp.clip_norm)?;
        if dp.clip_norm <= 0.0 {
            return Err(invalid("DP clip norm must be positive"));
        }
    }
    Ok(())
}

/// Checks a client's message (see the module docs).
pub fn check_client_msg(m: &ClientMsg) -> Result<(), ProtocolError> {
    match m {
        ClientMsg::UploadChunk(c) => c.check(),
        ClientMsg::FetchGlobal { max_len, .. } => bounded(
            "global piece",
            *max_len as usize,
            crate::resumable::MAX_UPLOAD_CHUNK,
        ),
        ClientMsg::Renew { csr_der } => bounded(
            "certificate request",
            csr_der.len(),
            crate::enroll::MAX_CSR_LEN,
        ),
        ClientMsg::Upload(u) => {
            finite("upload weight", u.weight)?;
            finite("upload train_loss", u.train_loss)?;
            if u.train_loss < 0.0 {
                return Err(invalid("upload train_loss is negative"));
            }
            Ok(())
        }
        ClientMsg::EvalReport(r) => {
            finite("evaluation loss", r.loss)?;
            if r.loss < 0.0 || r.tokens == 0 {
                return Err(invalid(
                    "evaluation needs a non-negative loss over at least one token",
                ));
            }
            Ok(())
        }
        ClientMsg::SecAgg { body, .. } => match body {
            SecAggBody::Keys(k) => keys(k),
            SecAggBody::Shares(s) => shares(s),
            SecAggBody::Input(_) => Ok(()),
            SecAggBody::Consistency(sig) => {
                bounded("consistency signature", sig.len(), MAX_SIGNATURE_LEN)
            }
            SecAggBody::Unmask(r) => {
                id("unmask response id", &r.client)?;
                bounded("seed shares", r.seed_shares.len(), MAX_NEIGHBOURS)?;
                bounded("key shares", r.key_shares.len(), MAX_NEIGHBOURS)?;
                for (owner, s) in r.seed_shares.iter().chain(r.key_shares.iter()) {
                    id("share owner", owner)?;
                    bounded("secret share", s.len(), MAX_SECRET_SHARE_LEN)?;
                }
                Ok(())
            }
        },
        ClientMsg::PrivateUpload(u) => match u.noised_train_loss {
            Some(l) => finite("private upload's noised train_loss", l),
            None => Ok(()),
        },
        ClientMsg::Hello { .. }
        | ClientMsg::Poll { .. }
        | ClientMsg::Decline { .. }
        | ClientMsg::EvalWithheld { .. } => Ok(()),
    }
}

/// Checks a coordinator's message (see the module docs).
pub fn check_coord_msg(m: &CoordMsg) -> Result<(), ProtocolError> {
    let task = match m {
        CoordMsg::Task(task) => task,
        CoordMsg::Renewed(c) => return c.check(),
        CoordMsg::GlobalPiece { bytes, .. } => {
            return bounded(
                "global piece",
                bytes.len(),
                crate::resumable::MAX_UPLOAD_CHUNK,
            )
        }
        _ => return Ok(()),
    };
    match task {
        Task::Train(offer) => {
            train_config(&offer.config)?;
            if let Some(s) = &offer.secure_shares {
                shares(s)?;
            }
            if let Some(sig) = &offer.plan_signature {
                bounded("plan signature", sig.signature.len(), MAX_SIGNATURE_LEN)?;
            }
            Ok(())
        }
        Task::SecAgg { task, .. } => match task.as_ref() {
            SecAggTask::AdvertiseKeys { .. } => Ok(()),
            SecAggTask::ShareKeys { view, certificates } => {
                bounded("roster", view.ids.len(), MAX_ROSTER)?;
                view.ids.iter().try_for_each(|c| id("roster id", c))?;
                bounded("neighbours' keys", view.neighbours.len(), MAX_NEIGHBOURS)?;
                bounded("certificates", certificates.len(), MAX_NEIGHBOURS)?;
                bounded("inclusion proof", view.own_proof.len(), MAX_PROOF)?;
                for nk in &view.neighbours {
                    keys(&nk.keys)?;
                    bounded("inclusion proof", nk.proof.len(), MAX_PROOF)?;
                }
                for (c, der) in certificates {
                    id("certificate owner", c)?;
                    bounded("certificate", der.len(), MAX_CERT_LEN)?;
                }
                Ok(())
            }
            SecAggTask::ConsistencyCheck(r) => unmask_request(r),
            SecAggTask::Unmask {
                request,
                signatures,
            } => {
                unmask_request(request)?;
                bounded("consistency signatures", signatures.len(), MAX_ROSTER)?;
                for (c, s) in signatures {
                    id("signer", c)?;
                    bounded("consistency signature", s.len(), MAX_SIGNATURE_LEN)?;
                }
                Ok(())
            }
        },
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame;
    use crate::message::{EvalReport, Upload};

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
