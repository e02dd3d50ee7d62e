//! The coordinator's signature of a round's client-level DP plan.
//!
//! Every [`RoundOffer`](crate::RoundOffer) that carries a [`ClientDpPlan`] also carries the
//! coordinator's signature of that plan together with the codec that implements it
//! ([`plan_digest`]), made with the private key of the coordinator's TLS certificate (ECDSA
//! P-256, SHA-256, the fixed 64-byte `r‖s` encoding; `fedlora certs init` makes that key).
//!
//! Why: TLS already tells a client which coordinator it talks to, but a TLS session proves
//! nothing to a third party afterwards. A signature does. The client checks it against the
//! certificate the TLS handshake verified, refuses a plan without a valid one, and keeps the
//! signature and the certificate in its own record, so an auditor can later check, from the
//! device alone, that this coordinator committed to exactly this plan (noise, clip, q, T, δ,
//! `min_clients`, c). The bytes signed are [`signed_bytes`]: a domain-separation tag and the
//! 32-byte plan digest.

use serde::{Deserialize, Serialize};

use crate::client_dp::{plan_digest, ClientDpPlan, PlanRefusal};
use crate::codec::Codec;
use crate::secagg::crypto::KeySigner;
use crate::secagg::SecAggError;

/// Domain-separation tag in front of the plan digest.
pub const PLAN_SIGNATURE_TAG: &[u8] = b"fedlora client-dp plan signature v1";

/// Length of an ECDSA P-256 fixed-encoding signature, bytes.
pub const PLAN_SIGNATURE_LEN: usize = 64;

/// The coordinator's signature of a plan and its codec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSignature {
    /// ECDSA P-256 / SHA-256 signature of [`signed_bytes`], fixed `r‖s` encoding (64 bytes).
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// What the coordinator signs: [`PLAN_SIGNATURE_TAG`] followed by [`plan_digest`].
pub fn signed_bytes(plan: &ClientDpPlan, codec: &Codec) -> Vec<u8> {
    let mut m = PLAN_SIGNATURE_TAG.to_vec();
    m.extend_from_slice(&plan_digest(Some(plan), codec));
    m
}

/// Signs `plan` (with `codec`) with the coordinator's certificate key.
pub fn sign(
    signer: &dyn KeySigner,
    plan: &ClientDpPlan,
    codec: &Codec,
) -> Result<PlanSignature, SecAggError> {
    Ok(PlanSignature {
        signature: signer.sign(&signed_bytes(plan, codec))?,
    })
}

/// Checks the coordinator's signature of `plan` (with `codec`) against `public_key`, the
/// uncompressed SEC1 P-256 key of the certificate the client's TLS handshake verified.
/// A missing, malformed or wrong signature is [`PlanRefusal::Unsigned`].
pub fn verify(
    public_key: &[u8],
    plan: &ClientDpPlan,
    codec: &Codec,
    signature: Option<&PlanSignature>,
) -> Result<(), PlanRefusal> {
    let Some(sig) = signature else {
        return Err(PlanRefusal::Unsigned(
            "the round offer carries no coordinator signature of the plan".into(),
        ));
    };
    if sig.signature.len() != PLAN_SIGNATURE_LEN {
        return Err(PlanRefusal::Unsigned(format!(
            "the plan signature is {} bytes, not {PLAN_SIGNATURE_LEN}",
            sig.signature.len()
        )));
    }
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, public_key)
        .verify(&signed_bytes(plan, codec), &sig.signature)
        .map_err(|_| {
            PlanRefusal::Unsigned(
                "the plan signature does not verify against the coordinator's certificate key"
                    .into(),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client_dp::ClientDpMode;
    use fedlora_dp::client_level::ClientNoise;

    use crate::secagg::tests::signer as key;

    fn plan() -> ClientDpPlan {
        ClientDpPlan {
            mode: ClientDpMode::Central,
            clip: 0.3,
            expected_clients: 100.0,
            sampling_rate: 0.1,
            rounds: 10,
            delta: 1e-5,
            target_epsilon: 8.0,
            min_clients: 80,
            collusion: 10,
            noise: ClientNoise::Gaussian {
                noise_multiplier: 0.67,
            },
            secure: None,
            participation: None,
        }
    }

    #[test]
    fn a_signed_plan_verifies_and_any_change_or_other_key_or_no_signature_is_refused() {
        let (k, other) = (key(), key());
        let (p, codec) = (plan(), Codec::DenseF32);
        let sig = sign(&k, &p, &codec).unwrap();
        assert_eq!(sig.signature.len(), PLAN_SIGNATURE_LEN);
        assert_eq!(verify(&k.public_key(), &p, &codec, Some(&sig)), Ok(()));

        let unsigned = |r: Result<(), PlanRefusal>| matches!(r, Err(PlanRefusal::Unsigned(_)));
        // no signature
        assert!(unsigned(verify(&k.public_key(), &p, &codec, None)));
        // another key (a coordinator other than the one the TLS handshake verified)
        assert!(unsigned(verify(
            &other.public_key(),
            &p,
            &codec,
            Some(&sig)
        )));
        // a plan with less noise than the one signed
        let mut weaker = p.clone();
        weaker.noise = ClientNoise::Gaussian {
            noise_multiplier: 0.3,
        };
        assert!(unsigned(verify(
            &k.public_key(),
            &weaker,
            &codec,
            Some(&sig)
        )));
        // another codec under the same plan
        assert!(unsigned(verify(
            &k.public_key(),
            &p,
            &Codec::F16,
            Some(&sig)
        )));
        // one flipped bit, and a truncated signature
        let mut flipped = sig.clone();
        flipped.signature[7] ^= 1;
        assert!(unsigned(verify(
            &k.public_key(),
            &p,
            &codec,
            Some(&flipped)
        )));
        let short = PlanSignature {
            signature: sig.signature[..63].to_vec(),
        };
        assert!(unsigned(verify(&k.public_key(), &p, &codec, Some(&short))));
    }
}
