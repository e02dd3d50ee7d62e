//! A client's own record of its client-level DP rounds: the plans it took part under and the
//! rounds it took part in, kept in its state directory and written **before** anything that
//! the round charges leaves the device: a central-mode upload, or a distributed-mode masked
//! input (the coordinator can unmask it with the neighbours' shares alone, so the client is
//! charged whether or not it answers the unmask stage; a round that aborts before any unmask
//! share was sent releases nothing, but the client cannot verify that, so it never refunds).
//! ε (a) and (b) are computed from this record, never from the coordinator's word.

use std::path::{Path, PathBuf};

use fedlora_dp::client_level::{coordinator_event, observer_event};
use fedlora_dp::ledger::Accountant;
use fedlora_dp::DpEvent;
use fedlora_protocol::client_dp::{plan_digest, ClientDpPlan, PlanRefusal};
use fedlora_protocol::plan_signature::{self, PlanSignature};
use fedlora_protocol::Codec;
use serde::{Deserialize, Serialize};

use crate::error::ClientError;

/// File name of the record in the state directory.
pub const RECORD_FILE: &str = "client_dp.json";

/// One plan and the rounds this client was charged for under it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanParticipation {
    /// Hex SHA-256 of the plan and its codec ([`plan_digest`]).
    pub digest: String,
    /// The plan as the coordinator announced it.
    pub plan: ClientDpPlan,
    /// The codec's name (bits, scale and noise share in distributed mode).
    pub codec: String,
    /// Rounds this client was charged for (uploaded, or sent its masked input), ascending.
    pub rounds: Vec<u64>,
    /// The coordinator's signature of the plan, checked when the plan was admitted (records
    /// written before plans were signed have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<CoordinatorSignature>,
}

/// The coordinator's signature of a plan and what an auditor needs to check it again: the
/// codec it was signed with and the coordinator's certificate (the one the client's TLS
/// handshake verified against the federation CA).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoordinatorSignature {
    /// The codec signed together with the plan.
    pub codec: Codec,
    /// Hex of the ECDSA P-256 / SHA-256 signature ([`plan_signature::signed_bytes`]).
    pub signature: String,
    /// Hex of the coordinator's certificate (DER).
    pub certificate: String,
}

impl CoordinatorSignature {
    /// Checks the coordinator's `signature` of `plan` (with `codec`) against the key of
    /// `certificate` (DER, the end-entity certificate the TLS handshake verified). A missing or
    /// wrong signature, or a certificate without a P-256 key, is [`PlanRefusal::Unsigned`].
    pub fn check(
        certificate: Option<&[u8]>,
        plan: &ClientDpPlan,
        codec: &Codec,
        signature: Option<&PlanSignature>,
    ) -> Result<Self, PlanRefusal> {
        let der = certificate.ok_or_else(|| {
            PlanRefusal::Unsigned("no coordinator certificate on this connection".into())
        })?;
        plan_signature::verify(&certificate_key(der)?, plan, codec, signature)?;
        let sig = signature.expect("verified above");
        Ok(Self {
            codec: codec.clone(),
            signature: hex::encode(&sig.signature),
            certificate: hex::encode(der),
        })
    }

    /// Checks this stored signature again against `plan` (for an auditor, from the record).
    pub fn verify(&self, plan: &ClientDpPlan) -> Result<(), PlanRefusal> {
        let bad = |what: &str| PlanRefusal::Unsigned(format!("stored {what} is not hex"));
        let der = hex::decode(&self.certificate).map_err(|_| bad("certificate"))?;
        let signature = PlanSignature {
            signature: hex::decode(&self.signature).map_err(|_| bad("signature"))?,
        };
        plan_signature::verify(&certificate_key(&der)?, plan, &self.codec, Some(&signature))
    }
}

/// The uncompressed SEC1 public key of a DER certificate.
fn certificate_key(der: &[u8]) -> Result<Vec<u8>, PlanRefusal> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PlanRefusal::Unsigned(format!("coordinator certificate: {e}")))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

/// Everything a client has been charged for at the client level.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientDpRecord {
    /// By plan, in the order first seen.
    pub plans: Vec<PlanParticipation>,
}

impl ClientDpRecord {
    /// The record's path under `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(RECORD_FILE)
    }

    /// Reads the record (empty if there is none yet; an unreadable one is an error, never a
    /// reset).
    pub fn load(state_dir: Option<&Path>) -> Result<Self, ClientError> {
        let Some(dir) = state_dir else {
            return Ok(Self::default());
        };
        match std::fs::read(Self::path(dir)) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| ClientError::Storage(format!("{}: {e}", Self::path(dir).display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the record durably (temp file, fsync, rename).
    pub fn save(&self, state_dir: Option<&Path>) -> Result<(), ClientError> {
        let Some(dir) = state_dir else {
            return Ok(());
        };
        std::fs::create_dir_all(dir)?;
        let path = Self::path(dir);
        let tmp = path.with_extension("tmp");
        let bytes =
            serde_json::to_vec_pretty(self).map_err(|e| ClientError::Storage(e.to_string()))?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(tmp, path)?;
        Ok(())
    }

    /// Rounds taken part in under `plan` (with `codec`).
    pub fn participated(&self, plan: &ClientDpPlan, codec: &Codec) -> u64 {
        let d = hex::encode(plan_digest(Some(plan), codec));
        self.plans
            .iter()
            .find(|p| p.digest == d)
            .map_or(0, |p| p.rounds.len() as u64)
    }

    /// Records that this client is charged for `round` under `plan` (idempotent per round),
    /// keeping the first coordinator signature seen for the plan.
    pub fn record(
        &mut self,
        plan: &ClientDpPlan,
        codec: &Codec,
        round: u64,
        signed: Option<&CoordinatorSignature>,
    ) {
        let d = hex::encode(plan_digest(Some(plan), codec));
        let entry = match self.plans.iter_mut().position(|p| p.digest == d) {
            Some(i) => &mut self.plans[i],
            None => {
                self.plans.push(PlanParticipation {
                    digest: d,
                    plan: plan.clone(),
                    codec: codec.name(),
                    rounds: Vec::new(),
                    signed: None,
                });
                self.plans.last_mut().expect("just pushed")
            }
        };
        if entry.signed.is_none() {
            entry.signed = signed.cloned();
        }
        if let Err(i) = entry.rounds.binary_search(&round) {
            entry.rounds.insert(i, round);
        }
    }

    /// ε (a) at `delta` over every plan's whole campaign (observers of the released models;
    /// amplified by the coordinator's secret sample), RDP accountant. 0 with no plans.
    pub fn observer_epsilon(&self, delta: f64) -> Result<f64, ClientError> {
        let events: Vec<DpEvent> = self
            .plans
            .iter()
            .map(|p| observer_event(&p.plan.noise, p.plan.sampling_rate, p.plan.rounds))
            .collect();
        compose(events, delta)
    }

    /// ε (b) at `delta` against the coordinator: every round taken part in at q = 1; ∞ if any
    /// was in central mode.
    pub fn coordinator_epsilon(&self, delta: f64) -> Result<f64, ClientError> {
        let mut events = Vec::new();
        for p in self.plans.iter().filter(|p| !p.rounds.is_empty()) {
            match coordinator_event(&p.plan.noise, p.rounds.len() as u64) {
                Some(e) => events.push(e),
                None => return Ok(f64::INFINITY),
            }
        }
        compose(events, delta)
    }
}

fn compose(events: Vec<DpEvent>, delta: f64) -> Result<f64, ClientError> {
    if events.is_empty() {
        return Ok(0.0);
    }
    Accountant::Rdp
        .epsilon(&DpEvent::Composed(events), delta)
        .map_err(|e| ClientError::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlora_dp::client_level::ClientNoise;
    use fedlora_protocol::client_dp::ClientDpMode;

    fn plan(mode: ClientDpMode, noise: ClientNoise) -> ClientDpPlan {
        ClientDpPlan {
            mode,
            clip: 0.5,
            expected_clients: 10.0,
            sampling_rate: 0.1,
            rounds: 20,
            delta: 1e-5,
            target_epsilon: 4.0,
            min_clients: 8,
            collusion: 1,
            noise,
        }
    }

    #[test]
    fn the_record_survives_a_restart_and_counts_each_round_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(
            ClientDpMode::Distributed,
            ClientNoise::Skellam {
                l2_sensitivity: 100.0,
                l1_sensitivity: 1000.0,
                variance: 40_000.0,
            },
        );
        let codec = Codec::DenseF32;
        let mut r = ClientDpRecord::load(Some(dir.path())).unwrap();
        r.record(&p, &codec, 3, None);
        r.record(&p, &codec, 3, None);
        r.record(&p, &codec, 1, None);
        r.save(Some(dir.path())).unwrap();
        let back = ClientDpRecord::load(Some(dir.path())).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.participated(&p, &codec), 2);
        assert_eq!(back.plans[0].rounds, vec![1, 3]);
        let b = back.coordinator_epsilon(1e-5).unwrap();
        let a = back.observer_epsilon(1e-5).unwrap();
        assert!(a.is_finite() && b.is_finite() && a > 0.0 && b > 0.0);
        // a central round makes (b) infinite
        let mut c = back.clone();
        c.record(
            &plan(
                ClientDpMode::Central,
                ClientNoise::Gaussian {
                    noise_multiplier: 1.0,
                },
            ),
            &codec,
            5,
            None,
        );
        assert_eq!(c.coordinator_epsilon(1e-5).unwrap(), f64::INFINITY);
        // a damaged record is an error, not a reset
        std::fs::write(ClientDpRecord::path(dir.path()), b"{").unwrap();
        assert!(ClientDpRecord::load(Some(dir.path())).is_err());
    }

    /// A self-signed P-256 certificate (DER) and its key as a plan signer.
    fn coordinator() -> (Vec<u8>, fedlora_protocol::secagg::crypto::EcdsaP256Signer) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["coordinator".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let signer =
            fedlora_protocol::secagg::crypto::EcdsaP256Signer::from_pkcs8(&key.serialize_der())
                .unwrap();
        (cert.der().to_vec(), signer)
    }

    #[test]
    fn a_plan_is_admitted_only_with_the_connected_coordinators_signature_and_an_auditor_can_recheck_it(
    ) {
        let (cert, key) = coordinator();
        let (other_cert, _) = coordinator();
        let p = plan(
            ClientDpMode::Central,
            ClientNoise::Gaussian {
                noise_multiplier: 0.7,
            },
        );
        let codec = Codec::DenseF32;
        let sig = plan_signature::sign(&key, &p, &codec).unwrap();
        let unsigned = |r: Result<CoordinatorSignature, PlanRefusal>| {
            matches!(r, Err(PlanRefusal::Unsigned(_)))
        };
        // missing signature, missing certificate, another coordinator's certificate
        assert!(unsigned(CoordinatorSignature::check(
            Some(&cert),
            &p,
            &codec,
            None
        )));
        assert!(unsigned(CoordinatorSignature::check(
            None,
            &p,
            &codec,
            Some(&sig)
        )));
        assert!(unsigned(CoordinatorSignature::check(
            Some(&other_cert),
            &p,
            &codec,
            Some(&sig)
        )));
        let signed = CoordinatorSignature::check(Some(&cert), &p, &codec, Some(&sig)).unwrap();

        // kept in the record across a restart, and still verifiable from it alone
        let dir = tempfile::tempdir().unwrap();
        let mut r = ClientDpRecord::default();
        r.record(&p, &codec, 1, Some(&signed));
        r.save(Some(dir.path())).unwrap();
        let back = ClientDpRecord::load(Some(dir.path())).unwrap();
        let entry = &back.plans[0];
        let stored = entry.signed.as_ref().unwrap();
        assert_eq!(stored.verify(&entry.plan), Ok(()));
        // a record whose plan was edited afterwards (less noise) no longer verifies
        let mut edited = entry.plan.clone();
        edited.noise = ClientNoise::Gaussian {
            noise_multiplier: 0.3,
        };
        assert!(matches!(
            stored.verify(&edited),
            Err(PlanRefusal::Unsigned(_))
        ));
    }
}
