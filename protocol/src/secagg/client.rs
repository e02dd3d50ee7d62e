//! The client side of a secure round: a typed stage machine.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::crypto::{self, KeySigner, PeerVerifier, Purpose};
use super::{
    neighbour_graph, AdvertisedKeys, EncryptedShare, SecAggError, SecAggParams, UnmaskRequest,
    UnmaskResponse,
};
use crate::round::ClientId;

/// Where a client's secure round stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientStage {
    /// Keys made; waiting to advertise them.
    AdvertiseKeys,
    /// Advertised; waiting for the roster to share keys.
    ShareKeys,
    /// Shared; waiting for the shares addressed to it, then sends its masked input.
    MaskedInput,
    /// Input sent; waiting for the unmask request.
    Unmask,
    /// Finished.
    Done,
}

#[derive(Serialize, Deserialize)]
struct SharePlain {
    from: String,
    to: String,
    seed_share: Vec<u8>,
    key_share: Vec<u8>,
}

/// A peer's shares held by this client: (share of its self-mask seed, share of its mask key).
type HeldShares = (Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>);

/// One client's state for one secure round. Fresh keys every round.
pub struct ClientRound {
    round: u64,
    me: ClientId,
    params: SecAggParams,
    c_sk: StaticSecret,
    s_sk: StaticSecret,
    seed: Zeroizing<[u8; 32]>,
    stage: ClientStage,
    roster: BTreeMap<ClientId, AdvertisedKeys>,
    neighbours: BTreeSet<ClientId>,
    /// Decrypted shares received, by owner: (share of b, share of s_sk).
    held: BTreeMap<ClientId, HeldShares>,
}

fn out_of_order(stage: ClientStage, what: &str) -> SecAggError {
    SecAggError::OutOfOrder(format!("{what} in stage {stage:?}"))
}

impl ClientRound {
    /// Fresh keys and self-mask seed for `round`, from a CSPRNG.
    pub fn new<R: rand::CryptoRng>(
        round: u64,
        me: &str,
        params: SecAggParams,
        rng: &mut R,
    ) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        Self {
            round,
            me: me.to_string(),
            params,
            c_sk: StaticSecret::random_from_rng(rng),
            s_sk: StaticSecret::random_from_rng(rng),
            seed,
            stage: ClientStage::AdvertiseKeys,
            roster: BTreeMap::new(),
            neighbours: BTreeSet::new(),
            held: BTreeMap::new(),
        }
    }

    /// The current stage.
    pub fn stage(&self) -> ClientStage {
        self.stage
    }

    /// Stage 1: the signed public keys to advertise.
    pub fn advertise(&mut self, signer: &dyn KeySigner) -> Result<AdvertisedKeys, SecAggError> {
        if self.stage != ClientStage::AdvertiseKeys {
            return Err(out_of_order(self.stage, "advertise"));
        }
        let c_pk = PublicKey::from(&self.c_sk).to_bytes();
        let s_pk = PublicKey::from(&self.s_sk).to_bytes();
        let signature = signer.sign(&AdvertisedKeys::signed_bytes(
            self.round, &self.me, &c_pk, &s_pk,
        ))?;
        self.stage = ClientStage::ShareKeys;
        Ok(AdvertisedKeys {
            client: self.me.clone(),
            c_pk,
            s_pk,
            signature,
        })
    }

    /// Stage 2: checks every advertised key's signature (a swapped or unsigned key refuses the
    /// whole roster), then Shamir-shares the self-mask seed and the mask key among the
    /// neighbours, each pair encrypted to its recipient.
    pub fn share_keys<R: rand::CryptoRng>(
        &mut self,
        roster: &[AdvertisedKeys],
        verifier: &dyn PeerVerifier,
        rng: &mut R,
    ) -> Result<Vec<EncryptedShare>, SecAggError> {
        if self.stage != ClientStage::ShareKeys {
            return Err(out_of_order(self.stage, "roster"));
        }
        let mut keys = BTreeMap::new();
        for k in roster {
            let msg = AdvertisedKeys::signed_bytes(self.round, &k.client, &k.c_pk, &k.s_pk);
            if !verifier.verify(&k.client, &msg, &k.signature) {
                return Err(SecAggError::PeerMisbehaved(format!(
                    "the key advertised for {} is not signed by its certificate",
                    k.client
                )));
            }
            if keys.insert(k.client.clone(), k.clone()).is_some() {
                return Err(SecAggError::PeerMisbehaved(format!(
                    "{} listed twice",
                    k.client
                )));
            }
        }
        let mine = keys.get(&self.me).ok_or_else(|| {
            SecAggError::PeerMisbehaved("the roster leaves this client out".into())
        })?;
        if mine.c_pk != PublicKey::from(&self.c_sk).to_bytes()
            || mine.s_pk != PublicKey::from(&self.s_sk).to_bytes()
        {
            return Err(SecAggError::PeerMisbehaved(
                "the roster altered this client's keys".into(),
            ));
        }
        let ids = keys.keys().cloned().collect();
        self.params
            .validate(keys.len())
            .map_err(|e| SecAggError::Config(e.to_string()))?;
        let graph = neighbour_graph(&ids, &self.params);
        self.neighbours = graph.get(&self.me).cloned().unwrap_or_default();
        let k = self.neighbours.len();
        let t = self.params.threshold;
        if k < t {
            return Err(SecAggError::Threshold(format!(
                "{k} neighbours, threshold {t}"
            )));
        }
        let seed_shares = crypto::shamir_split(self.seed.as_ref(), t, k, rng);
        let key_bytes = Zeroizing::new(self.s_sk.to_bytes());
        let key_shares = crypto::shamir_split(key_bytes.as_ref(), t, k, rng);
        let mut out = Vec::with_capacity(k);
        for ((v, sb), ss) in self.neighbours.iter().zip(seed_shares).zip(key_shares) {
            let plain = Zeroizing::new(
                bincode::serde::encode_to_vec(
                    SharePlain {
                        from: self.me.clone(),
                        to: v.clone(),
                        seed_share: sb,
                        key_share: ss,
                    },
                    bincode::config::standard(),
                )
                .expect("encodes"),
            );
            let key = self.share_key(&keys[v].c_pk);
            out.push(EncryptedShare {
                from: self.me.clone(),
                to: v.clone(),
                ciphertext: crypto::seal(&key, &self.me, v, &plain),
            });
        }
        self.roster = keys;
        self.stage = ClientStage::MaskedInput;
        Ok(out)
    }

    fn share_key(&self, their_c_pk: &[u8; 32]) -> Zeroizing<[u8; 32]> {
        let dh = self.c_sk.diffie_hellman(&PublicKey::from(*their_c_pk));
        Zeroizing::new(crypto::derive(
            dh.as_bytes(),
            Purpose::ShareEncryption,
            self.round,
        ))
    }

    fn mask_seed(&self, their_s_pk: &[u8; 32]) -> Zeroizing<[u8; 32]> {
        let dh = self.s_sk.diffie_hellman(&PublicKey::from(*their_s_pk));
        Zeroizing::new(crypto::derive(
            dh.as_bytes(),
            Purpose::PairwiseMask,
            self.round,
        ))
    }

    /// Stage 3: takes the shares addressed to this client (from neighbours that completed stage
    /// 2) and returns `y = x + PRG(b) + Σ ±PRG(s_uv) mod 2^m` over those neighbours.
    pub fn masked_input(
        &mut self,
        shares: &[EncryptedShare],
        x: &[u64],
    ) -> Result<Vec<u64>, SecAggError> {
        if self.stage != ClientStage::MaskedInput {
            return Err(out_of_order(self.stage, "shares"));
        }
        let mut held = BTreeMap::new();
        for s in shares {
            if s.to != self.me || !self.neighbours.contains(&s.from) {
                return Err(SecAggError::PeerMisbehaved(format!(
                    "share from {} to {} routed to {}",
                    s.from, s.to, self.me
                )));
            }
            let key = self.share_key(&self.roster[&s.from].c_pk);
            let plain = Zeroizing::new(crypto::open(&key, &s.from, &s.to, &s.ciphertext)?);
            let (p, _): (SharePlain, usize) =
                bincode::serde::decode_from_slice(&plain, bincode::config::standard()).map_err(
                    |e| SecAggError::PeerMisbehaved(format!("share from {}: {e}", s.from)),
                )?;
            if p.from != s.from || p.to != self.me {
                return Err(SecAggError::PeerMisbehaved(
                    "share names other parties".into(),
                ));
            }
            if held
                .insert(
                    s.from.clone(),
                    (Zeroizing::new(p.seed_share), Zeroizing::new(p.key_share)),
                )
                .is_some()
            {
                return Err(SecAggError::PeerMisbehaved(format!(
                    "two shares from {}",
                    s.from
                )));
            }
        }
        if held.len() < self.params.threshold {
            return Err(SecAggError::Threshold(format!(
                "{} neighbours shared keys, threshold {}",
                held.len(),
                self.params.threshold
            )));
        }
        let m = self.params.modulus_bits;
        let mut y = x.to_vec();
        crypto::prg_apply(&self.seed, &mut y, m, true);
        for v in held.keys() {
            let seed = self.mask_seed(&self.roster[v].s_pk);
            crypto::prg_apply(&seed, &mut y, m, self.me < *v);
        }
        self.held = held;
        self.stage = ClientStage::Unmask;
        Ok(y)
    }

    /// Stage 4: shares of survivors' seeds and of dropped clients' mask keys. Refuses a request
    /// that names a peer both survivor and dropped (that would reveal both its secrets), one
    /// that does not count this client, or one with fewer than t survivors around it.
    pub fn unmask(&mut self, req: &UnmaskRequest) -> Result<UnmaskResponse, SecAggError> {
        if self.stage != ClientStage::Unmask {
            return Err(out_of_order(self.stage, "unmask request"));
        }
        if let Some(both) = req.survivors.intersection(&req.dropped).next() {
            return Err(SecAggError::PeerMisbehaved(format!(
                "unmask request asks for both shares of {both}"
            )));
        }
        if !req.survivors.contains(&self.me) {
            return Err(SecAggError::PeerMisbehaved(
                "request does not count this client".into(),
            ));
        }
        let around = self
            .neighbours
            .iter()
            .filter(|v| req.survivors.contains(*v))
            .count();
        if around < self.params.threshold {
            return Err(SecAggError::Threshold(format!(
                "{around} survivors around {}, threshold {}",
                self.me, self.params.threshold
            )));
        }
        let mut resp = UnmaskResponse {
            client: self.me.clone(),
            seed_shares: BTreeMap::new(),
            key_shares: BTreeMap::new(),
        };
        for (v, (sb, ss)) in &self.held {
            if req.survivors.contains(v) {
                resp.seed_shares.insert(v.clone(), sb.to_vec());
            } else if req.dropped.contains(v) {
                resp.key_shares.insert(v.clone(), ss.to_vec());
            }
        }
        self.stage = ClientStage::Done;
        Ok(resp)
    }
}
