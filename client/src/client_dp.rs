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
    /// Whether a client-level plan was ever offered to this client (it then reports no
    /// held-out evaluation, across restarts too).
    #[serde(default)]
    pub offered: bool,
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

    /// Writes the record durably ([`crate::durable::replace_file`]: temp file fsynced,
    /// renamed, directory fsynced).
    pub fn save(&self, state_dir: Option<&Path>) -> Result<(), ClientError> {
        let Some(dir) = state_dir else {
            return Ok(());
        };
        let bytes =
            serde_json::to_vec_pretty(self).map_err(|e| ClientError::Storage(e.to_string()))?;
        crate::durable::replace_file(&Self::path(dir), &bytes)
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

    /// Whether this client may take part in `round` under `plan` (with `codec`), judged on its
    /// whole record, never on the plan alone:
    /// - a round id it was already charged for, under any plan, is refused (a coordinator that
    ///   offers round r again, or replays its secure stages under a new global version, gets no
    ///   second noised input for r);
    /// - a plan whose T rounds it already took part in is refused (no round past T); for an
    ///   async plan T is the participation bound P, and a round closer than the plan's
    ///   `min_gap` to one it took part in under the plan is refused too;
    /// - with a `policy`: the plan's own checks ([`ClientDpPlan::admit`]: δ, min_clients, c,
    ///   trust), then ε composed over **every** plan it was charged under plus this round
    ///   (RDP, at the largest δ among them): (a), every plan's whole campaign, when the client
    ///   trusts the coordinator's sampling, else (b), every round taken part in at q = 1. So a
    ///   coordinator that rotates the plan (one digit of δ, T + 1, a restart with a larger
    ///   `--rounds`) gets no fresh budget: each new plan adds its whole campaign to (a), and
    ///   every round adds to (b) whatever plan it ran under.
    ///
    /// Returns the ε the policy is held to after this round (0 without a policy).
    pub fn admit(
        &self,
        policy: Option<&fedlora_protocol::client_dp::ClientDpPolicy>,
        plan: &ClientDpPlan,
        codec: &Codec,
        secure_modulus: Option<u32>,
        round: u64,
    ) -> Result<f64, PlanRefusal> {
        if let Some(p) = self.plans.iter().find(|p| p.rounds.contains(&round)) {
            return Err(PlanRefusal::Inconsistent(format!(
                "round {round} was already taken part in (under plan {}): a device sends at \
                 most one noised input per round",
                &p.digest[..12.min(p.digest.len())]
            )));
        }
        let d = hex::encode(plan_digest(Some(plan), codec));
        let taken: &[u64] = self
            .plans
            .iter()
            .find(|p| p.digest == d)
            .map_or(&[], |p| p.rounds.as_slice());
        let done = taken.len() as u64;
        if done >= plan.rounds {
            return Err(PlanRefusal::TooWeak(format!(
                "all {} {} of this plan were taken part in already",
                plan.rounds,
                if plan.participation.is_some() {
                    "participations"
                } else {
                    "rounds"
                }
            )));
        }
        if let Some(p) = &plan.participation {
            // async: at most one update in any min_gap consecutive versions of this plan
            if let Some(r) = taken.iter().find(|r| r.abs_diff(round) < p.min_gap) {
                return Err(PlanRefusal::TooWeak(format!(
                    "this client took part in round {r}; the plan allows one update in any {} \
                     consecutive versions",
                    p.min_gap
                )));
            }
        }
        let Some(policy) = policy else {
            return Ok(0.0);
        };
        plan.admit(policy, codec, secure_modulus, done)?;
        let mut after = self.clone();
        after.record(plan, codec, round, None);
        let delta = after.max_delta();
        let (which, eps) = if policy.trust_coordinator {
            ("(a)", after.observer_epsilon(delta))
        } else {
            ("(b)", after.coordinator_epsilon(delta))
        };
        let eps = eps.map_err(|e| PlanRefusal::Inconsistent(e.to_string()))?;
        if eps > policy.max_epsilon {
            return Err(PlanRefusal::TooWeak(format!(
                "ε {which} over every plan taken part in would be {eps:.3} > the client's {} \
                 (δ = {delta})",
                policy.max_epsilon
            )));
        }
        Ok(eps)
    }

    /// The largest δ among the plans (0 with none): the δ at which ε over the whole record is
    /// stated.
    pub fn max_delta(&self) -> f64 {
        self.plans.iter().map(|p| p.plan.delta).fold(0.0, f64::max)
    }

    /// ε (a) at `delta` over every plan's whole campaign (observers of the released models;
    /// amplified by the coordinator's secret sample; an async plan counts its P participations
    /// at q = 1), RDP accountant. 0 with no plans.
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
            secure: None,
            participation: None,
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

    /// Central plans (the coordinator adds Gaussian noise): the client trusts it, so the
    /// policy holds ε (a), every plan's whole campaign.
    fn central(rounds: u64, delta: f64) -> ClientDpPlan {
        ClientDpPlan {
            rounds,
            delta,
            ..plan(
                ClientDpMode::Central,
                ClientNoise::Gaussian {
                    noise_multiplier: 1.0,
                },
            )
        }
    }

    fn trusting(max_epsilon: f64) -> fedlora_protocol::client_dp::ClientDpPolicy {
        fedlora_protocol::client_dp::ClientDpPolicy {
            max_epsilon,
            max_delta: 1e-4,
            trust_coordinator: true,
            ..Default::default()
        }
    }

    /// A coordinator that changes one digit of the plan (δ), or restarts with a larger
    /// `--rounds`, offers a plan the device has no rounds under. Judged on that plan alone
    /// (the check before this fix) it is admitted as a first round; judged on the record, the
    /// first plan's campaign still counts, and the policy refuses.
    #[test]
    fn plan_rotation_and_a_larger_rounds_spend_no_fresh_budget() {
        let codec = Codec::DenseF32;
        let a = central(20, 1e-5);
        let one = a.observer_epsilon().unwrap();
        for b in [central(20, 1.1e-5), central(21, 1e-5)] {
            // a budget that one campaign fits and two do not
            let policy = trusting(one * 1.2);
            let mut rec = ClientDpRecord::default();
            assert!(rec.admit(Some(&policy), &a, &codec, None, 1).is_ok());
            rec.record(&a, &codec, 1, None);
            // the hole: plan b alone looks fresh
            assert!(b
                .admit(&policy, &codec, None, rec.participated(&b, &codec))
                .is_ok());
            // the record composes both campaigns
            let e = rec.admit(Some(&policy), &b, &codec, None, 2).unwrap_err();
            assert!(
                matches!(&e, PlanRefusal::TooWeak(m) if m.contains("every plan")),
                "{e}"
            );
            // and a budget for both admits it, at the composed ε
            let both = rec
                .admit(Some(&trusting(100.0)), &b, &codec, None, 2)
                .unwrap();
            assert!(both > one * 1.2, "{both} vs {one}");
        }
    }

    /// A round id this device was charged for is never admitted again, under any plan and with
    /// or without a policy (a replayed offer, or secure stages replayed under a new global
    /// version, get no second noised input); nor is a round past the plan's T.
    #[test]
    fn a_round_is_taken_part_in_once_and_never_past_the_plans_t() {
        let codec = Codec::DenseF32;
        let a = central(2, 1e-5);
        let policy = trusting(1e6);
        let mut rec = ClientDpRecord::default();
        rec.record(&a, &codec, 7, None);
        for p in [Some(&policy), None] {
            let e = rec.admit(p, &a, &codec, None, 7).unwrap_err();
            assert!(
                matches!(&e, PlanRefusal::Inconsistent(m) if m.contains("round 7")),
                "{e}"
            );
            let other = central(2, 2e-5);
            assert!(rec.admit(p, &other, &codec, None, 7).is_err());
        }
        rec.record(&a, &codec, 8, None);
        let e = rec.admit(Some(&policy), &a, &codec, None, 9).unwrap_err();
        assert!(
            matches!(&e, PlanRefusal::TooWeak(m) if m.contains("all 2 rounds")),
            "{e}"
        );
    }

    /// An async plan: q = 1, `rounds` = the participation bound P, one update in any
    /// `min_gap` versions.
    fn async_plan(participations: u64, min_gap: u64) -> ClientDpPlan {
        ClientDpPlan {
            sampling_rate: 1.0,
            participation: Some(fedlora_protocol::client_dp::AsyncParticipation { min_gap }),
            ..central(participations, 1e-5)
        }
    }

    /// Async client-level DP: a device takes part at most P times (then declines, with or
    /// without a policy), never twice within `min_gap` versions, and every participation is
    /// one more mechanism at q = 1 in ε (a) and (b): nothing is amplified by a sample the
    /// devices chose themselves.
    #[test]
    fn an_async_device_stops_at_its_participation_bound_and_each_participation_composes() {
        let codec = Codec::DenseF32;
        let plan = async_plan(2, 3);
        plan.check_consistent(&codec, None).unwrap();
        let policy = trusting(1e6);
        let mut rec = ClientDpRecord::default();
        rec.admit(Some(&policy), &plan, &codec, None, 4).unwrap();
        rec.record(&plan, &codec, 4, None);
        // versions 5 and 6 are within the gap of 3 (either side), 7 is not
        for r in [2, 5, 6] {
            let e = rec
                .admit(Some(&policy), &plan, &codec, None, r)
                .unwrap_err();
            assert!(
                matches!(&e, PlanRefusal::TooWeak(m) if m.contains("round 4")),
                "{r}: {e}"
            );
        }
        rec.admit(Some(&policy), &plan, &codec, None, 7).unwrap();
        rec.record(&plan, &codec, 7, None);
        // P = 2 reached: refused with and without a policy
        for p in [Some(&policy), None] {
            let e = rec.admit(p, &plan, &codec, None, 20).unwrap_err();
            assert!(
                matches!(&e, PlanRefusal::TooWeak(m) if m.contains("all 2 participations")),
                "{e}"
            );
        }
        // ε (a) is the P participations at q = 1: exactly the composition of two Gaussian
        // mechanisms, and more than a sampled plan of the same σ and count would claim
        let delta = rec.max_delta();
        let composed = compose(
            vec![DpEvent::SelfComposed {
                event: Box::new(DpEvent::Gaussian {
                    noise_multiplier: 1.0,
                }),
                count: 2,
            }],
            delta,
        )
        .unwrap();
        let a = rec.observer_epsilon(delta).unwrap();
        assert!((a - composed).abs() <= 1e-9 * composed, "{a} vs {composed}");
        let sampled = ClientDpPlan {
            sampling_rate: 0.1,
            participation: None,
            ..plan.clone()
        };
        assert!(sampled.observer_epsilon().unwrap() < a);
        // and a plan claiming amplification in async mode is inconsistent
        let lying = ClientDpPlan {
            participation: Some(fedlora_protocol::client_dp::AsyncParticipation { min_gap: 1 }),
            ..sampled
        };
        assert!(matches!(
            lying.check_consistent(&codec, None),
            Err(PlanRefusal::Inconsistent(m)) if m.contains("q must be 1")
        ));
        // each participation adds to ε (b) too (distributed noise; central is ∞)
        let noise = ClientNoise::Skellam {
            l2_sensitivity: 1.0,
            l1_sensitivity: 30.0,
            variance: 4.0,
        };
        let dist = ClientDpPlan {
            noise,
            ..plan.clone()
        };
        let mut d = ClientDpRecord::default();
        d.record(&dist, &codec, 1, None);
        let one = d.coordinator_epsilon(delta).unwrap();
        d.record(&dist, &codec, 5, None);
        let two = d.coordinator_epsilon(delta).unwrap();
        assert!(one > 0.0 && two > one, "{one} {two}");
    }
}
