//! The coordinator side of a secure round: a typed stage machine that relays keys and shares
//! and, at the end, removes the masks from the sum.

use std::collections::{BTreeMap, BTreeSet};

use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::crypto::{self, Purpose};
use super::{
    add_mod_threads, graph_seed, leaf_hash, neighbour_graph, roster_hash, AdvertisedKeys,
    EncryptedShare, MaskStatement, MerkleTree, NeighbourKeys, RosterView, SecAggError,
    SecAggParams, UnmaskRequest, UnmaskResponse,
};
use crate::identity::ClientId;

/// Where the coordinator's secure round stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerStage {
    /// Collecting advertised keys.
    CollectKeys,
    /// Collecting encrypted shares.
    CollectShares,
    /// Collecting masked inputs.
    CollectInputs,
    /// Collecting survivors' signatures of the survivor view.
    CollectConsistency,
    /// Collecting unmask responses.
    CollectUnmask,
    /// Finished (summed or failed).
    Done,
}

/// The coordinator's state of one secure round.
pub struct ServerRound {
    round: u64,
    params: SecAggParams,
    len: usize,
    expected: BTreeSet<ClientId>,
    stage: ServerStage,
    keys: BTreeMap<ClientId, AdvertisedKeys>,
    /// The fixed roster's ids, ascending, and the Merkle tree over their keys.
    ids: std::sync::Arc<[ClientId]>,
    tree: Option<MerkleTree>,
    graph_seed: [u8; 32],
    graph: BTreeMap<ClientId, BTreeSet<ClientId>>,
    shares: BTreeMap<ClientId, Vec<EncryptedShare>>,
    /// Clients whose masked input arrived (their inputs are added to `sum` on arrival).
    inputs: BTreeSet<ClientId>,
    sum: Vec<u64>,
    request: Option<UnmaskRequest>,
    /// Each input's [`MaskStatement`] (checked when it arrived).
    statements: BTreeMap<ClientId, MaskStatement>,
    signatures: BTreeMap<ClientId, Vec<u8>>,
    responses: BTreeMap<ClientId, UnmaskResponse>,
    /// Threads that sum the inputs and remove the masks (see [`ServerRound::with_threads`]).
    threads: usize,
}

/// Most subsets of t shares tried before a secret is declared unrecoverable: every subset when
/// there are at most this many, else each leave-one-out of the first t + 1 (which always finds a
/// single liar) and seeded random subsets.
const MAX_RECOVERY_TRIES: usize = 64;

/// C(n, k), saturating.
fn binomial(n: usize, k: usize) -> u128 {
    if k > n {
        return 0;
    }
    let k = k.min(n - k);
    (0..k).fold(1u128, |acc, i| {
        acc.saturating_mul((n - i) as u128) / (i as u128 + 1)
    })
}

/// Recovers an owner's secret from `(responder, share)` pairs with threshold `t`, accepting only
/// a secret that `fits` (its commitment or public key): a garbage share is detected and other
/// shares are used, never a wrong secret. `None` when no tried subset of t shares fits.
///
/// Liars are not named on success: with exactly t honest shares, coordinated garbage can make
/// another t-subset reconstruct the right secret too, so which shares are garbage is not always
/// decidable, and a wrong accusation is worse than none. The sum is exact either way.
fn recover_checked(
    shares: &[(ClientId, Zeroizing<Vec<u8>>)],
    t: usize,
    fits: &dyn Fn(&[u8]) -> bool,
) -> Option<Zeroizing<Vec<u8>>> {
    let n = shares.len();
    let attempt = |idx: &[usize]| -> Option<Zeroizing<Vec<u8>>> {
        let pick: Vec<&[u8]> = idx.iter().map(|&i| shares[i].1.as_slice()).collect();
        crypto::shamir_recover(&pick, t)
            .ok()
            .map(Zeroizing::new)
            .filter(|s| fits(s))
    };
    let first: Vec<usize> = (0..t).collect();
    if let Some(s) = attempt(&first) {
        return Some(s);
    }
    let mut tries: Vec<Vec<usize>> = Vec::new();
    if binomial(n, t) <= MAX_RECOVERY_TRIES as u128 {
        // few enough subsets to try them all: any t honest answers are found
        let mut idx: Vec<usize> = (0..t).collect();
        loop {
            tries.push(idx.clone());
            let Some(i) = (0..t).rev().find(|&i| idx[i] < n - t + i) else {
                break;
            };
            idx[i] += 1;
            for j in i + 1..t {
                idx[j] = idx[j - 1] + 1;
            }
        }
    } else {
        for skip in 0..=t {
            tries.push((0..=t).filter(|&i| i != skip).collect());
        }
    }
    let mut rng = <rand::rngs::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(n as u64);
    while n > t && tries.len() < MAX_RECOVERY_TRIES {
        let mut idx: Vec<usize> = (0..n).collect();
        rand::seq::SliceRandom::shuffle(idx.as_mut_slice(), &mut rng);
        idx.truncate(t);
        idx.sort_unstable();
        tries.push(idx);
    }
    tries
        .iter()
        .filter(|idx| **idx != first)
        .find_map(|idx| attempt(idx))
}

fn out_of_order(stage: ServerStage, what: &str, from: &str) -> SecAggError {
    SecAggError::OutOfOrder(format!("{what} from {from} in stage {stage:?}"))
}

impl ServerRound {
    /// A round for `expected` participants summing vectors of `len` integers mod 2^m.
    pub fn new(round: u64, params: SecAggParams, len: usize, expected: BTreeSet<ClientId>) -> Self {
        Self {
            round,
            params,
            len,
            expected,
            stage: ServerStage::CollectKeys,
            keys: BTreeMap::new(),
            ids: std::sync::Arc::from(Vec::new()),
            tree: None,
            graph_seed: [0; 32],
            graph: BTreeMap::new(),
            shares: BTreeMap::new(),
            inputs: BTreeSet::new(),
            sum: vec![0; len],
            request: None,
            statements: BTreeMap::new(),
            signatures: BTreeMap::new(),
            responses: BTreeMap::new(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// Sums the masked inputs (vectors of at least [`super::SUM_PARALLEL_MIN`] values) and
    /// removes the masks with `threads` threads (default: every core). The sum is the same for
    /// any count.
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// The current stage.
    pub fn stage(&self) -> ServerStage {
        self.stage
    }

    /// Stage 1 message from `from`.
    pub fn receive_keys(&mut self, from: &str, keys: AdvertisedKeys) -> Result<(), SecAggError> {
        if self.stage != ServerStage::CollectKeys {
            return Err(out_of_order(self.stage, "keys", from));
        }
        if keys.client != from || !self.expected.contains(from) {
            return Err(SecAggError::PeerMisbehaved(format!(
                "keys from {from} for {}",
                keys.client
            )));
        }
        if self.keys.contains_key(from) {
            return Err(SecAggError::OutOfOrder(format!(
                "second set of keys from {from}"
            )));
        }
        self.keys.insert(from.to_string(), keys);
        Ok(())
    }

    /// Ends stage 1 (all keys in, or the deadline): fixes the roster (every client that
    /// advertised keys, in id order), the Merkle tree over their keys and the graph seed derived
    /// from both (which every client recomputes), and returns the seed. Each client's part of the
    /// roster is then [`ServerRound::roster_view`].
    pub fn close_keys(&mut self) -> Result<[u8; 32], SecAggError> {
        if self.stage != ServerStage::CollectKeys {
            return Err(out_of_order(self.stage, "close of keys", "driver"));
        }
        let ids: BTreeSet<ClientId> = self.keys.keys().cloned().collect();
        self.params
            .validate(ids.len())
            .inspect_err(|_| self.stage = ServerStage::Done)?;
        let tree = MerkleTree::new(
            self.keys
                .values()
                .map(|k| leaf_hash(self.round, k))
                .collect(),
        );
        self.ids = ids.iter().cloned().collect();
        let seed = graph_seed(
            self.round,
            &roster_hash(self.round, &self.ids, &tree.root()),
        );
        self.graph = neighbour_graph(&ids, &self.params, &seed);
        self.tree = Some(tree);
        self.graph_seed = seed;
        self.stage = ServerStage::CollectShares;
        Ok(seed)
    }

    /// `req` as it travels to the clients: bitmaps over this round's roster ([`ViewBits`]).
    /// Fails if `req` names someone outside the roster.
    pub fn view_bits(&self, req: &UnmaskRequest) -> Result<super::ViewBits, SecAggError> {
        super::ViewBits::of(&self.ids, req)
    }

    /// What `client` receives in stage 2 (once the roster is fixed): the ids, the keys' root,
    /// the graph seed, its own inclusion proof, and its neighbours' keys with their proofs.
    /// `None` for a client not in the roster.
    pub fn roster_view(&self, client: &str) -> Option<RosterView> {
        let tree = self.tree.as_ref()?;
        let me = self
            .ids
            .binary_search_by(|id| id.as_str().cmp(client))
            .ok()?;
        let neighbours = self.graph[client]
            .iter()
            .map(|v| {
                let at = self
                    .ids
                    .binary_search(v)
                    .expect("neighbours are in the roster");
                NeighbourKeys {
                    keys: self.keys[v].clone(),
                    proof: tree.proof(at),
                }
            })
            .collect();
        Some(RosterView {
            ids: self.ids.clone(),
            keys_root: tree.root(),
            graph_seed: self.graph_seed,
            own_proof: tree.proof(me),
            neighbours,
        })
    }

    /// `client`'s neighbours, once the roster is fixed.
    pub fn neighbours(&self, client: &str) -> Option<&BTreeSet<ClientId>> {
        self.graph.get(client)
    }

    /// Clients in the fixed roster.
    pub fn roster_len(&self) -> usize {
        self.ids.len()
    }

    /// Whether `client` is in the fixed roster.
    pub fn in_roster(&self, client: &str) -> bool {
        self.graph.contains_key(client)
    }

    /// Stage 2 message: `from`'s encrypted shares, exactly one for each of its neighbours.
    pub fn receive_shares(
        &mut self,
        from: &str,
        shares: Vec<EncryptedShare>,
    ) -> Result<(), SecAggError> {
        if self.stage != ServerStage::CollectShares {
            return Err(out_of_order(self.stage, "shares", from));
        }
        let Some(nb) = self.graph.get(from) else {
            return Err(SecAggError::PeerMisbehaved(format!(
                "{from} advertised no keys"
            )));
        };
        if self.shares.contains_key(from) {
            return Err(SecAggError::OutOfOrder(format!(
                "second set of shares from {from}"
            )));
        }
        let to: BTreeSet<&ClientId> = shares.iter().map(|s| &s.to).collect();
        if shares.iter().any(|s| s.from != from)
            || to.len() != shares.len()
            || to != nb.iter().collect()
        {
            return Err(SecAggError::PeerMisbehaved(format!(
                "{from} sent shares that do not match its neighbours"
            )));
        }
        self.shares.insert(from.to_string(), shares);
        Ok(())
    }

    /// Ends stage 2: the shares to deliver, by recipient (only senders that completed it).
    pub fn close_shares(&mut self) -> Result<BTreeMap<ClientId, Vec<EncryptedShare>>, SecAggError> {
        if self.stage != ServerStage::CollectShares {
            return Err(out_of_order(self.stage, "close of shares", "driver"));
        }
        let mut out: BTreeMap<ClientId, Vec<EncryptedShare>> = BTreeMap::new();
        for s in self.shares.values().flatten() {
            if self.shares.contains_key(&s.to) {
                out.entry(s.to.clone()).or_default().push(s.clone());
            }
        }
        for u in self.shares.keys() {
            out.entry(u.clone()).or_default();
        }
        self.stage = ServerStage::CollectInputs;
        Ok(out)
    }

    /// Stage 3 message: `from`'s masked input and its [`MaskStatement`], which must name
    /// neighbours of `from` that shared keys, ascending (its signature covers the round's
    /// context, which only the clients check).
    pub fn receive_input(
        &mut self,
        from: &str,
        y: Vec<u64>,
        statement: MaskStatement,
    ) -> Result<(), SecAggError> {
        if self.stage != ServerStage::CollectInputs {
            return Err(out_of_order(self.stage, "masked input", from));
        }
        if !self.shares.contains_key(from) {
            return Err(SecAggError::PeerMisbehaved(format!(
                "{from} did not share keys"
            )));
        }
        if self.inputs.contains(from) {
            return Err(SecAggError::OutOfOrder(format!("second input from {from}")));
        }
        let mask = super::modulus_mask(self.params.modulus_bits);
        if y.len() != self.len || y.iter().any(|v| v & !mask != 0) {
            return Err(SecAggError::PeerMisbehaved(format!(
                "{from}'s input has the wrong shape"
            )));
        }
        let around = &self.graph[from];
        if statement.masked_with.windows(2).any(|w| w[0] >= w[1])
            || statement
                .masked_with
                .iter()
                .any(|v| !around.contains(v) || !self.shares.contains_key(v))
        {
            return Err(SecAggError::PeerMisbehaved(format!(
                "{from}'s mask statement names others than its neighbours that shared keys"
            )));
        }
        add_mod_threads(&mut self.sum, &y, self.params.modulus_bits, self.threads);
        self.inputs.insert(from.to_string());
        self.statements.insert(from.to_string(), statement);
        Ok(())
    }

    /// The mask statements of `client`'s neighbours that sent inputs: relayed with the unmask
    /// request, for the neighbours that did not sign the view.
    pub fn statements_for(&self, client: &str) -> BTreeMap<ClientId, MaskStatement> {
        self.graph.get(client).map_or_else(BTreeMap::new, |nb| {
            nb.iter()
                .filter(|v| !self.signatures.contains_key(*v))
                .filter_map(|v| self.statements.get(v).map(|s| (v.clone(), s.clone())))
                .collect()
        })
    }

    /// Fails the round when some client of `owners` has fewer than t neighbours in `live`:
    /// its secret could not be rebuilt.
    fn require_live(
        &mut self,
        owners: &BTreeSet<ClientId>,
        live: &BTreeSet<ClientId>,
        what: &str,
    ) -> Result<(), SecAggError> {
        for u in owners {
            let n = self.graph[u].iter().filter(|v| live.contains(*v)).count();
            if n < self.params.t(self.ids.len()) {
                self.stage = ServerStage::Done;
                return Err(SecAggError::Threshold(format!(
                    "{u} has {n} {what} neighbours, threshold {}",
                    self.params.t(self.ids.len())
                )));
            }
        }
        Ok(())
    }

    /// Ends stage 3: the survivor view for the consistency check (survivors = inputs received,
    /// dropped = shared keys but sent no input). Fails when some survivor or dropped client has
    /// fewer than t surviving neighbours — its mask could not be removed.
    pub fn close_inputs(&mut self) -> Result<UnmaskRequest, SecAggError> {
        if self.stage != ServerStage::CollectInputs {
            return Err(out_of_order(self.stage, "close of inputs", "driver"));
        }
        let survivors: BTreeSet<ClientId> = self.inputs.clone();
        let dropped: BTreeSet<ClientId> = self
            .shares
            .keys()
            .filter(|u| !survivors.contains(*u))
            .cloned()
            .collect();
        let owners = survivors.union(&dropped).cloned().collect();
        self.require_live(&owners, &survivors, "surviving")?;
        // clients refuse a view whose survivors c removals could cut in two: fail now, with
        // the reason, rather than after waiting for signatures that will not come
        if !super::roster::view_stays_connected(
            &self.ids,
            &survivors,
            &self.params,
            &self.graph_seed,
        ) {
            self.stage = ServerStage::Done;
            return Err(SecAggError::Threshold(format!(
                "the {} survivors do not stay connected in the neighbour graph with {} of them \
                 removed (clients would refuse to unmask)",
                survivors.len(),
                self.params.collusion
            )));
        }
        let req = UnmaskRequest { survivors, dropped };
        self.request = Some(req.clone());
        self.stage = ServerStage::CollectConsistency;
        Ok(req)
    }

    /// Stage 4 message: `from`'s signature of the survivor view (checked by its neighbours, who
    /// hold the certificates; the coordinator only relays it).
    pub fn receive_consistency(&mut self, from: &str, sig: Vec<u8>) -> Result<(), SecAggError> {
        if self.stage != ServerStage::CollectConsistency {
            return Err(out_of_order(self.stage, "consistency signature", from));
        }
        let req = self.request.as_ref().ok_or_else(|| {
            SecAggError::OutOfOrder("consistency stage without a survivor view".into())
        })?;
        if !req.survivors.contains(from) {
            return Err(SecAggError::PeerMisbehaved(format!(
                "{from} is not a survivor"
            )));
        }
        if self.signatures.contains_key(from) {
            return Err(SecAggError::OutOfOrder(format!(
                "second signature from {from}"
            )));
        }
        self.signatures.insert(from.to_string(), sig);
        Ok(())
    }

    /// Ends stage 4: the unmask request (relayed with each signer's [`ServerRound::signatures_for`]
    /// and [`ServerRound::statements_for`]). Fails when a secret's owner has fewer than t
    /// neighbours that signed (they are the only ones that will answer).
    pub fn close_consistency(&mut self) -> Result<UnmaskRequest, SecAggError> {
        if self.stage != ServerStage::CollectConsistency {
            return Err(out_of_order(self.stage, "close of consistency", "driver"));
        }
        let req = self.request.clone().ok_or_else(|| {
            SecAggError::OutOfOrder("consistency stage without a survivor view".into())
        })?;
        let signed: BTreeSet<ClientId> = self.signatures.keys().cloned().collect();
        let owners = req.survivors.union(&req.dropped).cloned().collect();
        self.require_live(&owners, &signed, "signing")?;
        self.stage = ServerStage::CollectUnmask;
        Ok(req)
    }

    /// The signatures of the view by `client`'s neighbours: what `client` needs to check before
    /// it unmasks (only its neighbours' count).
    pub fn signatures_for(&self, client: &str) -> BTreeMap<ClientId, Vec<u8>> {
        self.graph.get(client).map_or_else(BTreeMap::new, |nb| {
            nb.iter()
                .filter_map(|v| self.signatures.get(v).map(|s| (v.clone(), s.clone())))
                .collect()
        })
    }

    /// Whether `client` signed the survivor view (it is then asked to unmask).
    pub fn has_signed(&self, client: &str) -> bool {
        self.signatures.contains_key(client)
    }

    /// How many survivors signed the view.
    pub fn signer_count(&self) -> usize {
        self.signatures.len()
    }

    /// The survivors that signed the view (the clients asked to unmask).
    pub fn signers(&self) -> BTreeSet<ClientId> {
        self.signatures.keys().cloned().collect()
    }

    /// Stage 5 message.
    pub fn receive_unmask(&mut self, resp: UnmaskResponse) -> Result<(), SecAggError> {
        if self.stage != ServerStage::CollectUnmask {
            return Err(out_of_order(self.stage, "unmask response", &resp.client));
        }
        if !self.signatures.contains_key(&resp.client) {
            return Err(SecAggError::PeerMisbehaved(format!(
                "{} did not sign the survivor view",
                resp.client
            )));
        }
        if self.responses.contains_key(&resp.client) {
            return Err(SecAggError::OutOfOrder(format!(
                "second response from {}",
                resp.client
            )));
        }
        self.responses.insert(resp.client.clone(), resp);
        Ok(())
    }

    /// Ends stage 4: removes every mask and returns the sum of the survivors' inputs mod 2^m and
    /// the clients it counts. Fails (nothing to apply) if a secret has fewer than t shares.
    pub fn finish(&mut self) -> Result<(Vec<u64>, BTreeSet<ClientId>), SecAggError> {
        if self.stage != ServerStage::CollectUnmask {
            return Err(out_of_order(self.stage, "finish", "driver"));
        }
        self.stage = ServerStage::Done;
        let req = self.request.take().ok_or_else(|| {
            SecAggError::OutOfOrder("unmask stage without a survivor view".into())
        })?;
        let m = self.params.modulus_bits;
        let t = self.params.t(self.ids.len());
        let round = self.round;
        let mut sum = std::mem::take(&mut self.sum);
        // an owner's shares from the survivors that answered, checked against what the owner
        // committed to (its seed commitment, or its advertised mask key)
        let gather = |owner: &ClientId,
                      what: &str,
                      pick: &dyn Fn(&UnmaskResponse) -> Option<Vec<u8>>,
                      fits: &dyn Fn(&[u8]) -> bool|
         -> Result<[u8; 32], SecAggError> {
            let shares: Vec<(ClientId, Zeroizing<Vec<u8>>)> = self.graph[owner]
                .iter()
                .filter_map(|v| {
                    self.responses
                        .get(v)
                        .and_then(pick)
                        .map(|s| (v.clone(), Zeroizing::new(s)))
                })
                .collect();
            if shares.len() < t {
                return Err(SecAggError::Threshold(format!(
                    "{} shares of {owner}'s secret, threshold {t}",
                    shares.len()
                )));
            }
            match recover_checked(&shares, t, fits) {
                Some(secret) => secret.as_slice().try_into().map_err(|_| {
                    SecAggError::PeerMisbehaved(format!("{owner}'s {what} has the wrong length"))
                }),
                None => Err(SecAggError::PeerMisbehaved(format!(
                    "no {t} of the {} answered shares of {owner}'s {what} reconstruct what \
                     {owner} committed to: some answerers sent garbage, or {owner} committed to \
                     another secret; answered by {}",
                    shares.len(),
                    shares
                        .iter()
                        .map(|(c, _)| c.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            }
        };
        let mut masks = Vec::with_capacity(req.survivors.len() + req.dropped.len() * 4);
        for u in &req.survivors {
            let commitment = self.keys[u].seed_commitment;
            let fits = |b: &[u8]| {
                <&[u8; 32]>::try_from(b)
                    .is_ok_and(|s| super::seed_commitment(round, u, s) == commitment)
            };
            let seed = gather(
                u,
                "self-mask seed",
                &|r: &UnmaskResponse| r.seed_shares.get(u).cloned(),
                &fits,
            )?;
            masks.push(crypto::Mask { seed, add: false });
        }
        for d in &req.dropped {
            let s_pk = self.keys[d].s_pk;
            let fits = |b: &[u8]| {
                <[u8; 32]>::try_from(b)
                    .is_ok_and(|k| PublicKey::from(&StaticSecret::from(k)).to_bytes() == s_pk)
            };
            let sk = gather(
                d,
                "mask key",
                &|r: &UnmaskResponse| r.key_shares.get(d).cloned(),
                &fits,
            )?;
            let sk = StaticSecret::from(sk);
            for v in self.graph[d].iter().filter(|v| req.survivors.contains(*v)) {
                let dh = sk.diffie_hellman(&PublicKey::from(self.keys[v].s_pk));
                // v added +mask if v < d, −mask otherwise: undo it
                masks.push(crypto::Mask {
                    seed: crypto::derive(dh.as_bytes(), Purpose::PairwiseMask, self.round),
                    add: *v > *d,
                });
            }
        }
        crypto::apply_masks(&mut sum, &masks, m, self.threads);
        Ok((sum, req.survivors))
    }
}

#[cfg(test)]
mod recovery_tests {
    use super::*;

    #[test]
    fn a_checked_recovery_skips_garbage_shares() {
        let secret = [7u8; 32];
        let mut rng = <rand::rngs::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(3);
        let shares = crypto::shamir_split(&secret, 5, 7, &mut rng);
        let mut named: Vec<(ClientId, Zeroizing<Vec<u8>>)> = shares
            .into_iter()
            .enumerate()
            .map(|(i, s)| (format!("c{i}"), Zeroizing::new(s)))
            .collect();
        for b in named[1].1.iter_mut().skip(1) {
            *b ^= 0x5a;
        }
        let fits = |s: &[u8]| s == secret;
        let got = recover_checked(&named, 5, &fits).unwrap();
        assert_eq!(got.as_slice(), secret);
        // three garbage shares of seven leave four, below t = 5
        for i in [3, 5] {
            for b in named[i].1.iter_mut().skip(1) {
                *b ^= 0x5a;
            }
        }
        assert!(recover_checked(&named, 5, &fits).is_none());
    }

    /// Past 64 subsets the leave-one-outs of the first t + 1 are tried: a single liar at the
    /// first position (the subset without it is the first leave-one-out) is skipped too.
    #[test]
    fn a_single_liar_in_first_place_is_skipped_when_the_subsets_are_too_many_to_try() {
        let secret = [9u8; 32];
        let mut rng = <rand::rngs::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(4);
        let (t, n) = (64, 70);
        let mut named: Vec<(ClientId, Zeroizing<Vec<u8>>)> =
            crypto::shamir_split(&secret, t, n, &mut rng)
                .into_iter()
                .enumerate()
                .map(|(i, s)| (format!("c{i:02}"), Zeroizing::new(s)))
                .collect();
        for b in named[0].1.iter_mut().skip(1) {
            *b ^= 0x33;
        }
        let fits = |s: &[u8]| s == secret;
        assert_eq!(
            recover_checked(&named, t, &fits).unwrap().as_slice(),
            secret
        );
    }
}
