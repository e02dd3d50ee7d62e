//! Driving secure-aggregation rounds: the typed [`ServerRound`] stages over QUIC requests.
//!
//! A secure round's state lives in memory only. A coordinator restarted during one aborts it
//! cleanly (the round fails, nothing is applied, a new round with fresh keys follows): the
//! clients' secrets die with their round, and a partial or wrong sum is never applied.

use std::collections::{BTreeMap, BTreeSet};

use fedlora_protocol::secagg::crypto::{P256Verifier, PeerVerifier};
use fedlora_protocol::secagg::{
    EncryptedShare, SecAggError, SecAggParams, ServerRound, ServerStage, UnmaskRequest, ViewBits,
};
use fedlora_protocol::{ClientId, SecAggBody, SecAggTask};

/// The coordinator's side of one secure round.
pub(crate) struct SecureRound {
    pub(crate) round: u64,
    pub(crate) params: SecAggParams,
    pub(crate) server: ServerRound,
    pub(crate) selected: BTreeSet<ClientId>,
    pub(crate) deadline_ms: u64,
    pub(crate) round_timeout_ms: u64,
    /// Clients in the fixed roster (0 until the key stage closes).
    pub(crate) roster_len: usize,
    pub(crate) deliveries: BTreeMap<ClientId, Vec<EncryptedShare>>,
    /// The survivor view sent for signing, and as it travels (bitmaps over the roster).
    pub(crate) view: Option<(UnmaskRequest, ViewBits)>,
    /// The unmask request as it travels (relayed with each signer's neighbours' signatures).
    pub(crate) request: Option<ViewBits>,
    /// Who answered each stage: keys, shares, input, consistency signature, unmask.
    pub(crate) sent: [BTreeSet<ClientId>; 5],
    pub(crate) len: usize,
    /// Roster members that declined the round (e.g. its privacy plan) after sharing keys: they
    /// send no input, so the input stage need not wait for them until the deadline.
    pub(crate) declined: BTreeSet<ClientId>,
}

/// What the driver must do after [`SecureRound::advance`].
pub(crate) enum Advance {
    /// Nothing yet.
    Wait,
    /// The unmasked sum of the counted clients' inputs.
    Sum(Vec<u64>, BTreeSet<ClientId>),
    /// The round cannot finish.
    Fail(String),
}

impl SecureRound {
    pub(crate) fn new(
        round: u64,
        params: SecAggParams,
        len: usize,
        selected: BTreeSet<ClientId>,
        now_ms: u64,
        round_timeout_ms: u64,
    ) -> Self {
        Self {
            round,
            server: ServerRound::new(round, params.clone(), len, selected.clone()),
            deadline_ms: now_ms + params.stage_timeout_ms,
            params,
            selected,
            round_timeout_ms,
            roster_len: 0,
            deliveries: BTreeMap::new(),
            view: None,
            request: None,
            sent: Default::default(),
            len,
            declined: BTreeSet::new(),
        }
    }

    /// Notes that `client` declined this round: the input stage stops waiting for it.
    pub(crate) fn note_decline(&mut self, client: &str) {
        if !self.sent[2].contains(client) {
            self.declined.insert(client.to_string());
        }
    }

    /// The stage task for `client`, if it has one now; `None` means wait (or train, in the
    /// input stage, see [`SecureRound::wants_input`]).
    pub(crate) fn task(
        &self,
        client: &str,
        certs: &BTreeMap<ClientId, Vec<u8>>,
    ) -> Option<SecAggTask> {
        match self.server.stage() {
            ServerStage::CollectKeys
                if self.selected.contains(client) && !self.sent[0].contains(client) =>
            {
                Some(SecAggTask::AdvertiseKeys {
                    params: self.params.clone(),
                })
            }
            ServerStage::CollectShares
                if self.server.in_roster(client) && !self.sent[1].contains(client) =>
            {
                let view = self.server.roster_view(client)?;
                // only the neighbours' certificates: a client checks k signatures, not n
                let certificates = view
                    .neighbours
                    .iter()
                    .filter_map(|nk| {
                        let c = &nk.keys.client;
                        certs.get(c).map(|der| (c.clone(), der.clone()))
                    })
                    .collect();
                Some(SecAggTask::ShareKeys { view, certificates })
            }
            ServerStage::CollectConsistency => {
                let (view, bits) = self.view.as_ref()?;
                (view.survivors.contains(client) && !self.sent[3].contains(client))
                    .then(|| SecAggTask::ConsistencyCheck(bits.clone()))
            }
            ServerStage::CollectUnmask => {
                let req = self.request.as_ref()?;
                (self.server.has_signed(client) && !self.sent[4].contains(client)).then(|| {
                    SecAggTask::Unmask {
                        request: req.clone(),
                        signatures: self.server.signatures_for(client),
                        statements: self.server.statements_for(client),
                    }
                })
            }
            _ => None,
        }
    }

    /// The shares to send with `client`'s training offer, when it is due a masked input.
    pub(crate) fn wants_input(&self, client: &str) -> Option<Vec<EncryptedShare>> {
        (self.server.stage() == ServerStage::CollectInputs && !self.sent[2].contains(client))
            .then(|| self.deliveries.get(client).cloned())
            .flatten()
    }

    /// A stage message from `client`; `chain` is the certificate chain it presented in TLS
    /// (its leaf's key checks the signature of its advertised keys).
    pub(crate) fn receive(
        &mut self,
        client: &str,
        body: SecAggBody,
        chain: Option<&[u8]>,
    ) -> Result<(), SecAggError> {
        match body {
            SecAggBody::Keys(k) => {
                // checked here too, so one client's unsigned keys are refused before they reach
                // its neighbours (who would refuse the whole round for them)
                let verifier = leaf_verifier(client, chain);
                if !verifier.verify(client, &k.signed_bytes(self.round), &k.signature) {
                    return Err(SecAggError::PeerMisbehaved(format!(
                        "{client}'s advertised keys are not signed by its certificate"
                    )));
                }
                self.server.receive_keys(client, k)?;
                self.sent[0].insert(client.to_string());
            }
            SecAggBody::Shares(s) => {
                self.server.receive_shares(client, s)?;
                self.sent[1].insert(client.to_string());
            }
            SecAggBody::Input { packed, statement } => {
                let ints = fedlora_protocol::codec::bits::unpack(
                    &packed,
                    self.len,
                    self.params.modulus_bits,
                )
                .ok_or_else(|| {
                    SecAggError::PeerMisbehaved("masked input of the wrong size".into())
                })?;
                self.server.receive_input(client, ints, statement)?;
                self.sent[2].insert(client.to_string());
            }
            SecAggBody::Consistency(sig) => {
                self.server.receive_consistency(client, sig)?;
                self.sent[3].insert(client.to_string());
            }
            SecAggBody::Unmask(r) => {
                if r.client != client {
                    return Err(SecAggError::PeerMisbehaved(
                        "unmask response for another client".into(),
                    ));
                }
                self.server.receive_unmask(r)?;
                self.sent[4].insert(client.to_string());
            }
        }
        Ok(())
    }

    /// Closes a stage when everyone expected answered or its deadline passed.
    pub(crate) fn advance(&mut self, now_ms: u64) -> Advance {
        let r = (|| -> Result<Advance, SecAggError> {
            match self.server.stage() {
                ServerStage::CollectKeys => {
                    if self.sent[0].len() == self.selected.len() || now_ms >= self.deadline_ms {
                        self.server.close_keys()?;
                        self.roster_len = self.server.roster_len();
                        self.deadline_ms = now_ms + self.params.stage_timeout_ms;
                    }
                }
                ServerStage::CollectShares => {
                    if self.sent[1].len() == self.roster_len || now_ms >= self.deadline_ms {
                        self.deliveries = self.server.close_shares()?;
                        // clients train before they send their input: the round's deadline
                        self.deadline_ms = now_ms + self.round_timeout_ms;
                    }
                }
                ServerStage::CollectInputs => {
                    let waiting = self
                        .deliveries
                        .keys()
                        .filter(|c| !self.sent[2].contains(*c) && !self.declined.contains(*c))
                        .count();
                    if waiting == 0 || now_ms >= self.deadline_ms {
                        let view = self.server.close_inputs()?;
                        let bits = self.server.view_bits(&view)?;
                        self.view = Some((view, bits));
                        self.deadline_ms = now_ms + self.params.stage_timeout_ms;
                    }
                }
                ServerStage::CollectConsistency => {
                    let n = self.view.as_ref().map_or(0, |(r, _)| r.survivors.len());
                    if self.sent[3].len() == n || now_ms >= self.deadline_ms {
                        let request = self.server.close_consistency()?;
                        self.request = Some(self.server.view_bits(&request)?);
                        self.deadline_ms = now_ms + self.params.stage_timeout_ms;
                    }
                }
                ServerStage::CollectUnmask => {
                    let n = self.server.signer_count();
                    if self.sent[4].len() == n || now_ms >= self.deadline_ms {
                        let (sum, counted) = self.server.finish()?;
                        return Ok(Advance::Sum(sum, counted));
                    }
                }
                ServerStage::Done => return Ok(Advance::Fail("secure round already ended".into())),
            }
            Ok(Advance::Wait)
        })();
        r.unwrap_or_else(|e| Advance::Fail(e.to_string()))
    }
}

/// A verifier of `client`'s signatures with the P-256 key of the leaf of the chain it presented
/// in TLS (which the handshake checked against the federation CA); one that accepts nothing
/// when there is no such key.
fn leaf_verifier(client: &str, chain: Option<&[u8]>) -> P256Verifier {
    let key = chain
        .and_then(|der| x509_parser::parse_x509_certificate(der).ok())
        .map(|(_, cert)| cert.public_key().subject_public_key.data.to_vec());
    P256Verifier(key.map(|k| (client.to_string(), k)).into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlora_protocol::secagg::crypto::EcdsaP256Signer;
    use fedlora_protocol::secagg::{ClientRound, SecAggPolicy};
    use rand::SeedableRng;

    fn identity(cn: &str) -> (Vec<u8>, EcdsaP256Signer) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let cert = p.self_signed(&key).unwrap();
        let signer = EcdsaP256Signer::from_pkcs8(&key.serialize_der()).unwrap();
        (cert.der().to_vec(), signer)
    }

    /// Advertised keys are checked against the key of the certificate the client presented in
    /// TLS before they reach its neighbours: keys signed by another key, or from a client whose
    /// certificate is unknown, are refused; the client's own are taken.
    #[test]
    fn advertised_keys_must_be_signed_by_the_presented_certificate() {
        let params = SecAggParams {
            threshold: 2,
            neighbours: 3,
            collusion: 0,
            modulus_bits: 16,
            stage_timeout_ms: 1_000,
        };
        let selected: BTreeSet<ClientId> = ["client-0".to_string()].into();
        let mut sr = SecureRound::new(3, params.clone(), 8, selected, 0, 10_000);
        let (chain, signer) = identity("client-0");
        let (_, other) = identity("client-0");
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(1);
        let mut keys = |s: &EcdsaP256Signer| {
            let mut cr = ClientRound::new(
                3,
                "client-0",
                params.clone(),
                SecAggPolicy::default(),
                &mut rng,
            );
            cr.advertise(s).unwrap()
        };
        let forged = keys(&other);
        let err = sr
            .receive("client-0", SecAggBody::Keys(forged.clone()), Some(&chain))
            .unwrap_err();
        assert!(
            err.to_string().contains("not signed by its certificate"),
            "{err}"
        );
        assert!(sr
            .receive("client-0", SecAggBody::Keys(forged), None)
            .is_err());
        let own = keys(&signer);
        sr.receive("client-0", SecAggBody::Keys(own), Some(&chain))
            .unwrap();
        assert!(sr.sent[0].contains("client-0"));
    }
}
