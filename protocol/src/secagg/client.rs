//! The client side of a secure round: a typed stage machine.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::crypto::{self, KeySigner, PeerVerifier, Purpose};
use super::{
    consistency_message, graph_seed, leaf_hash, mask_statement_message, roster_hash, verify_proof,
    AdvertisedKeys, EncryptedShare, Graph, MaskStatement, RosterView, SecAggError, SecAggParams,
    SecAggPolicy, UnmaskRequest, UnmaskResponse,
};
use crate::identity::ClientId;

/// Where a client's secure round stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientStage {
    /// Keys made; waiting to advertise them.
    AdvertiseKeys,
    /// Advertised; waiting for the roster to share keys.
    ShareKeys,
    /// Shared; waiting for the shares addressed to it, then sends its masked input.
    MaskedInput,
    /// Input sent; waiting for the coordinator's view of the survivors to sign.
    ConsistencyCheck,
    /// View signed; waiting for the unmask request with the neighbours' signatures.
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

impl Drop for SharePlain {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.seed_share.zeroize();
        self.key_share.zeroize();
    }
}

/// A peer's shares held by this client: (share of its self-mask seed, share of its mask key).
type HeldShares = (Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>);

/// One client's state for one secure round. Fresh keys every round.
pub struct ClientRound {
    round: u64,
    me: ClientId,
    params: SecAggParams,
    policy: SecAggPolicy,
    c_sk: StaticSecret,
    s_sk: StaticSecret,
    seed: Zeroizing<[u8; 32]>,
    nonce: [u8; 32],
    stage: ClientStage,
    roster_hash: [u8; 32],
    graph_seed: [u8; 32],
    /// The round configuration's digest, bound into the consistency message.
    context: [u8; 32],
    /// The consistency message (a SHA-256) this client signed: it answers an unmask request
    /// for that view only, and keeps O(1) of it however large the round.
    signed: Option<[u8; 32]>,
    /// The roster's ids, ascending.
    ids: std::sync::Arc<[ClientId]>,
    /// The neighbours' advertised keys.
    peers: BTreeMap<ClientId, AdvertisedKeys>,
    neighbours: BTreeSet<ClientId>,
    /// Decrypted shares received, by owner: (share of b, share of s_sk).
    held: BTreeMap<ClientId, HeldShares>,
}

/// The first id of `names` (ascending) missing from `ids` (ascending): one merge pass, O(n).
fn first_stranger<'a>(ids: &[ClientId], names: &'a BTreeSet<ClientId>) -> Option<&'a ClientId> {
    let mut it = ids.iter().peekable();
    for name in names {
        while it.peek().is_some_and(|id| *id < name) {
            it.next();
        }
        if it.peek() != Some(&name) {
            return Some(name);
        }
    }
    None
}

/// How a client's masks disagree with a survivor view.
enum MaskMismatch<'a> {
    /// A neighbour named a survivor that the client did not mask with.
    Unmasked(&'a ClientId),
    /// A neighbour the client masked with, named neither survivor nor dropped.
    Unaccounted(&'a ClientId),
}

/// The first neighbour in `around` (a client's neighbours) whose mask with that client
/// (`masked`) disagrees with the view `req`: the client must have masked with every surviving
/// neighbour, and every neighbour it masked with must be a survivor or dropped. The rule a
/// client checks before it signs a view, and a neighbour checks of a client's mask statement.
fn mask_mismatch<'a>(
    around: impl IntoIterator<Item = &'a ClientId>,
    masked: impl Fn(&ClientId) -> bool,
    req: &UnmaskRequest,
) -> Option<MaskMismatch<'a>> {
    around.into_iter().find_map(|v| {
        let listed = req.survivors.contains(v);
        if listed && !masked(v) {
            Some(MaskMismatch::Unmasked(v))
        } else if masked(v) && !listed && !req.dropped.contains(v) {
            Some(MaskMismatch::Unaccounted(v))
        } else {
            None
        }
    })
}

fn out_of_order(stage: ClientStage, what: &str) -> SecAggError {
    SecAggError::OutOfOrder(format!("{what} in stage {stage:?}"))
}

impl ClientRound {
    /// Fresh keys, nonce and self-mask seed for `round`, from a CSPRNG. The client checks the
    /// round against `policy` as the roster and the survivor view arrive.
    pub fn new<R: rand::CryptoRng>(
        round: u64,
        me: &str,
        params: SecAggParams,
        policy: SecAggPolicy,
        rng: &mut R,
    ) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        Self {
            round,
            me: me.to_string(),
            params,
            policy,
            c_sk: StaticSecret::random_from_rng(rng),
            s_sk: StaticSecret::random_from_rng(rng),
            seed,
            nonce,
            stage: ClientStage::AdvertiseKeys,
            roster_hash: [0; 32],
            graph_seed: [0; 32],
            context: [0; 32],
            signed: None,
            ids: std::sync::Arc::from(Vec::new()),
            peers: BTreeMap::new(),
            neighbours: BTreeSet::new(),
            held: BTreeMap::new(),
        }
    }

    /// Binds the round's context (e.g. [`crate::client_dp::plan_digest`] of the offer) into
    /// the consistency message this client signs and checks its neighbours' signatures over,
    /// and raises the fewest survivors it accepts to `min_survivors` (a client-level DP plan's
    /// `min_clients`). A coordinator that showed clients different contexts gets no unmask
    /// shares. Only before the masked input is sent.
    ///
    /// `min_collusion` is the colluders the round's privacy plan sized its noise for: a round
    /// whose secure parameters tolerate fewer (`c` below it) is refused, since the plan's
    /// guarantee assumes secure aggregation holds against that many.
    pub fn bind(
        &mut self,
        context: [u8; 32],
        min_survivors: usize,
        min_collusion: usize,
    ) -> Result<(), SecAggError> {
        if matches!(
            self.stage,
            ClientStage::ConsistencyCheck | ClientStage::Unmask | ClientStage::Done
        ) {
            return Err(out_of_order(self.stage, "binding the round context"));
        }
        if self.params.collusion < min_collusion {
            return Err(SecAggError::Config(format!(
                "the secure round tolerates {} colluders, the privacy plan assumes {min_collusion}",
                self.params.collusion
            )));
        }
        self.context = context;
        self.policy.min_survivors = self.policy.min_survivors.max(min_survivors);
        Ok(())
    }

    /// Refuses a round whose secure parameters are not `signed`, the ones the coordinator
    /// signed in the round's privacy plan ([`crate::client_dp::ClientDpPlan::secure`]): a
    /// coordinator cannot sign a plan for one threshold and run the stages with another.
    pub fn require_params(&self, signed: &SecAggParams) -> Result<(), SecAggError> {
        if *signed != self.params {
            return Err(SecAggError::PeerMisbehaved(format!(
                "the round runs with {:?}, the signed plan says {signed:?}",
                self.params
            )));
        }
        Ok(())
    }

    /// What this client signs (and checks signatures over) for the survivor view `req`.
    fn view_message(&self, req: &UnmaskRequest) -> [u8; 32] {
        consistency_message(
            self.round,
            &self.roster_hash,
            &self.graph_seed,
            &self.context,
            &super::RoundShape::of(&self.params, self.ids.len()),
            req,
        )
    }

    /// A survivor view received as bitmaps ([`super::ViewBits`]), expanded over the roster this
    /// client checked when it shared keys; a view that does not fit that roster is refused.
    /// Pass the result to [`ClientRound::consistency`] and [`ClientRound::unmask`].
    pub fn expand_view(&self, bits: &super::ViewBits) -> Result<UnmaskRequest, SecAggError> {
        super::ViewBits::expand(bits, &self.ids)
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
        let mut keys = AdvertisedKeys {
            client: self.me.clone(),
            c_pk: PublicKey::from(&self.c_sk).to_bytes(),
            s_pk: PublicKey::from(&self.s_sk).to_bytes(),
            nonce: self.nonce,
            seed_commitment: super::seed_commitment(self.round, &self.me, &self.seed),
            signature: Vec::new(),
        };
        keys.signature = signer.sign(&keys.signed_bytes(self.round))?;
        self.stage = ClientStage::ShareKeys;
        Ok(keys)
    }

    /// Stage 2: checks this client's view of the roster ([`RosterView`]): the ids strictly
    /// ascending and naming this client, its own keys in the Merkle root unaltered, the round
    /// against the policy, the announced graph seed against the one derived from the ids and
    /// the root, and each neighbour the graph names present once, in the root at its index and
    /// signed by its certificate (any failure refuses the round). Then Shamir-shares the
    /// self-mask seed and the mask key among the neighbours, each pair encrypted to its
    /// recipient. Work: O(n) to hash the ids, O(k log n) for the rest.
    pub fn share_keys<R: rand::CryptoRng>(
        &mut self,
        view: &RosterView,
        verifier: &dyn PeerVerifier,
        rng: &mut R,
    ) -> Result<Vec<EncryptedShare>, SecAggError> {
        if self.stage != ClientStage::ShareKeys {
            return Err(out_of_order(self.stage, "roster"));
        }
        // whatever happens below, this client shares at most once per round
        self.stage = ClientStage::Done;
        let ids = &view.ids;
        if ids.windows(2).any(|w| w[0] >= w[1]) {
            return Err(SecAggError::PeerMisbehaved(
                "the roster's ids are not strictly ascending".into(),
            ));
        }
        let n = ids.len();
        let me = ids
            .binary_search(&self.me)
            .map_err(|_| SecAggError::PeerMisbehaved("the roster leaves this client out".into()))?;
        let mine = AdvertisedKeys {
            client: self.me.clone(),
            c_pk: PublicKey::from(&self.c_sk).to_bytes(),
            s_pk: PublicKey::from(&self.s_sk).to_bytes(),
            nonce: self.nonce,
            seed_commitment: super::seed_commitment(self.round, &self.me, &self.seed),
            signature: Vec::new(),
        };
        if !verify_proof(
            &view.keys_root,
            &leaf_hash(self.round, &mine),
            me,
            n,
            &view.own_proof,
        ) {
            return Err(SecAggError::PeerMisbehaved(
                "the roster altered this client's keys".into(),
            ));
        }
        self.policy.check(&self.params, n)?;
        let rh = roster_hash(self.round, ids, &view.keys_root);
        let seed = graph_seed(self.round, &rh);
        if seed != view.graph_seed {
            return Err(SecAggError::PeerMisbehaved(
                "the announced graph seed is not the one derived from the roster".into(),
            ));
        }
        let graph = Graph::new(n, &self.params, &seed);
        let expected: Vec<usize> = graph.neighbours(me);
        if view.neighbours.len() != expected.len() {
            return Err(SecAggError::PeerMisbehaved(format!(
                "{} neighbours' keys relayed, the graph names {}",
                view.neighbours.len(),
                expected.len()
            )));
        }
        let mut keys = BTreeMap::new();
        for nk in &view.neighbours {
            let k = &nk.keys;
            let at = ids
                .binary_search(&k.client)
                .ok()
                .filter(|i| expected.contains(i));
            let Some(at) = at else {
                return Err(SecAggError::PeerMisbehaved(format!(
                    "keys relayed for {}, not a neighbour of this client",
                    k.client
                )));
            };
            if !verify_proof(&view.keys_root, &leaf_hash(self.round, k), at, n, &nk.proof) {
                return Err(SecAggError::PeerMisbehaved(format!(
                    "the keys of {} are not the roster's",
                    k.client
                )));
            }
            if !verifier.verify(&k.client, &k.signed_bytes(self.round), &k.signature) {
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
        self.neighbours = keys.keys().cloned().collect();
        let k = self.neighbours.len();
        let t = self.params.t(n);
        if k < t {
            return Err(SecAggError::Threshold(format!(
                "{k} neighbours, threshold {t}"
            )));
        }
        let seed_shares = crypto::shamir_split(self.seed.as_ref(), t, k, rng);
        let key_bytes = Zeroizing::new(self.s_sk.to_bytes());
        let key_shares = crypto::shamir_split(key_bytes.as_ref(), t, k, rng);
        self.roster_hash = rh;
        self.graph_seed = seed;
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
        self.peers = keys;
        self.ids = view.ids.clone();
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
            let key = self.share_key(&self.peers[&s.from].c_pk);
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
            let mut p = p;
            let pair = (
                Zeroizing::new(std::mem::take(&mut p.seed_share)),
                Zeroizing::new(std::mem::take(&mut p.key_share)),
            );
            if held.insert(s.from.clone(), pair).is_some() {
                return Err(SecAggError::PeerMisbehaved(format!(
                    "two shares from {}",
                    s.from
                )));
            }
        }
        if held.len() < self.params.t(self.ids.len()) {
            return Err(SecAggError::Threshold(format!(
                "{} neighbours shared keys, threshold {}",
                held.len(),
                self.params.t(self.ids.len())
            )));
        }
        let m = self.params.modulus_bits;
        let mut masks = Vec::with_capacity(held.len() + 1);
        masks.push(crypto::Mask {
            seed: *self.seed,
            add: true,
        });
        for v in held.keys() {
            masks.push(crypto::Mask {
                seed: *self.mask_seed(&self.peers[v].s_pk),
                add: self.me < *v,
            });
        }
        let mut y = x.to_vec();
        crypto::apply_masks(&mut y, &masks, m, 1);
        self.held = held;
        self.stage = ClientStage::ConsistencyCheck;
        Ok(y)
    }

    /// [`mask_statement_message`] under this client's round, roster, context and shape.
    fn statement_message(&self, min_survivors: u32, masked_with: &[ClientId]) -> [u8; 32] {
        mask_statement_message(
            self.round,
            &self.roster_hash,
            &self.graph_seed,
            &self.context,
            &super::RoundShape::of(&self.params, self.ids.len()),
            min_survivors,
            masked_with,
        )
    }

    /// What this client masked with, signed ([`MaskStatement`]): sent with its masked input,
    /// after [`ClientRound::masked_input`].
    pub fn mask_statement(&self, signer: &dyn KeySigner) -> Result<MaskStatement, SecAggError> {
        if self.stage != ClientStage::ConsistencyCheck {
            return Err(out_of_order(self.stage, "mask statement"));
        }
        let masked_with: Vec<ClientId> = self.held.keys().cloned().collect();
        let n = self.ids.len();
        let min_survivors = self.params.t(n).max(self.policy.min_survivors) as u32;
        let signature = signer.sign(&self.statement_message(min_survivors, &masked_with))?;
        Ok(MaskStatement {
            masked_with,
            min_survivors,
            signature,
        })
    }

    /// Whether `statement` shows that neighbour `v` masked with exactly its surviving
    /// neighbours of `req`, with no neighbour left that is neither a survivor nor dropped, in
    /// a view of at least the survivors `v` accepts (what `v` would have checked had it signed
    /// the view), signed by `v` for this roster.
    fn masked_as_viewed(
        &self,
        v: &str,
        statement: &MaskStatement,
        req: &UnmaskRequest,
        verifier: &dyn PeerVerifier,
    ) -> bool {
        let msg = self.statement_message(statement.min_survivors, &statement.masked_with);
        if !verifier.verify(v, &msg, &statement.signature)
            || req.survivors.len() < statement.min_survivors as usize
        {
            return false;
        }
        let Ok(at) = self.ids.binary_search_by(|id| id.as_str().cmp(v)) else {
            return false;
        };
        let graph = Graph::new(self.ids.len(), &self.params, &self.graph_seed);
        let around: BTreeSet<&ClientId> = graph
            .neighbours(at)
            .into_iter()
            .map(|j| &self.ids[j])
            .collect();
        let masked: BTreeSet<&ClientId> = statement.masked_with.iter().collect();
        masked.len() == statement.masked_with.len()
            && masked.iter().all(|u| around.contains(*u))
            && mask_mismatch(around.iter().copied(), |u| masked.contains(u), req).is_none()
    }

    /// Checks a survivor view against this client's own knowledge and policy: no peer both
    /// survivor and dropped, this client counted, every named client in the roster, at least
    /// `max(t, min_survivors)` survivors, every surviving neighbour one it masked with and every
    /// neighbour it masked with counted or dropped, at least t surviving neighbours.
    fn check_view(&self, req: &UnmaskRequest) -> Result<(), SecAggError> {
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
        for set in [&req.survivors, &req.dropped] {
            if let Some(u) = first_stranger(&self.ids, set) {
                return Err(SecAggError::PeerMisbehaved(format!(
                    "{u} is not in this round's roster"
                )));
            }
        }
        let t = self.params.t(self.ids.len());
        let need = t.max(self.policy.min_survivors);
        if req.survivors.len() < need {
            return Err(SecAggError::Threshold(format!(
                "{} survivors, this client requires at least {need}",
                req.survivors.len()
            )));
        }
        // the view must match whom this client masked with: a surviving neighbour whose share
        // the coordinator withheld (so no mask with it exists) would let the coordinator unmask
        // a subset of the survivors on its own; a neighbour it masked with must be either
        // counted or dropped, or its mask could never be removed
        match mask_mismatch(&self.neighbours, |v| self.held.contains_key(v), req) {
            Some(MaskMismatch::Unmasked(v)) => {
                return Err(SecAggError::PeerMisbehaved(format!(
                    "survivor {v} is a neighbour this client did not mask with (its share was \
                     not delivered)"
                )))
            }
            Some(MaskMismatch::Unaccounted(v)) => {
                return Err(SecAggError::PeerMisbehaved(format!(
                    "neighbour {v}, which this client masked with, is neither a survivor nor \
                     dropped"
                )))
            }
            None => {}
        }
        let around = self
            .neighbours
            .iter()
            .filter(|v| req.survivors.contains(*v))
            .count();
        // the coordinator could otherwise name some survivors that sent inputs "dropped" so
        // that they cut the others into parts, and unmask each part's sum on its own
        if !super::roster::view_stays_connected(
            &self.ids,
            &req.survivors,
            &self.params,
            &self.graph_seed,
        ) {
            return Err(SecAggError::Threshold(format!(
                "the {} survivors do not stay one connected part of the neighbour graph with {} \
                 of them removed: their sum could be unmasked in parts",
                req.survivors.len(),
                self.params.collusion
            )));
        }
        if around < t {
            return Err(SecAggError::Threshold(format!(
                "{around} survivors around {}, threshold {t}",
                self.me
            )));
        }
        Ok(())
    }

    /// Stage 4: checks the coordinator's survivor view and signs it, once per round. The
    /// client will answer an unmask request for this view only.
    pub fn consistency(
        &mut self,
        req: &UnmaskRequest,
        signer: &dyn KeySigner,
    ) -> Result<Vec<u8>, SecAggError> {
        if self.stage != ClientStage::ConsistencyCheck {
            return Err(out_of_order(self.stage, "survivor view"));
        }
        self.stage = ClientStage::Done;
        self.check_view(req)?;
        let msg = self.view_message(req);
        let sig = signer.sign(&msg)?;
        self.signed = Some(msg);
        self.stage = ClientStage::Unmask;
        Ok(sig)
    }

    /// Stage 5: shares of survivors' seeds and of dropped clients' mask keys, answered once per
    /// round. Refuses a request for another view than the one this client signed, one with
    /// fewer than t valid signatures of surviving neighbours over that same view, and one with
    /// a surviving neighbour that neither signed it nor sent a [`MaskStatement`] showing it
    /// masked with exactly its surviving neighbours: every survivor whose self-mask this client
    /// helps reveal masked with all of them (see [`ClientRound::consistency`]).
    pub fn unmask(
        &mut self,
        req: &UnmaskRequest,
        signatures: &BTreeMap<ClientId, Vec<u8>>,
        statements: &BTreeMap<ClientId, MaskStatement>,
        verifier: &dyn PeerVerifier,
    ) -> Result<UnmaskResponse, SecAggError> {
        if self.stage != ClientStage::Unmask {
            return Err(out_of_order(self.stage, "unmask request"));
        }
        self.stage = ClientStage::Done;
        // the view this client signed (and checked when it signed it), or nothing
        let msg = self.view_message(req);
        if self.signed != Some(msg) {
            return Err(SecAggError::PeerMisbehaved(
                "unmask request for another survivor view than the one signed".into(),
            ));
        }
        let surviving = self
            .neighbours
            .iter()
            .filter(|v| req.survivors.contains(*v));
        let mut valid = 0;
        for v in surviving {
            if signatures
                .get(v)
                .is_some_and(|sig| verifier.verify(v, &msg, sig))
            {
                valid += 1;
            } else if !statements
                .get(v)
                .is_some_and(|st| self.masked_as_viewed(v, st, req, verifier))
            {
                return Err(SecAggError::Threshold(format!(
                    "surviving neighbour {v} neither signed this survivor view nor showed that \
                     it masked with exactly its surviving neighbours: it is not unmasked"
                )));
            }
        }
        if valid < self.params.t(self.ids.len()) {
            return Err(SecAggError::Threshold(format!(
                "{valid} valid neighbour signatures of the survivor view, threshold {}",
                self.params.t(self.ids.len())
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
        self.held.clear();
        Ok(resp)
    }
}
