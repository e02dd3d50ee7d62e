//! Secure aggregation (SecAgg+, Bonawitz et al. 2017; Bell et al. 2020) without I/O: the
//! coordinator learns only the sum of the counted clients' inputs (integer vectors mod 2^m, the
//! [`modular`](crate::codec::modular) encoding of their deltas, weight included).
//!
//! # Threat model
//! Clients are authenticated by their certificates (issued by the federation's CA). The
//! coordinator may be **actively malicious**: it may drop, delay, reorder or forge any message it
//! relays, lie about who survived, and choose the round parameters. Up to `c` clients **of the
//! whole round** (Sybils included) may collude with it, where `c` is the round's
//! [`SecAggParams::collusion`]. What each client checks, so that the coordinator learns only the
//! sum of the surviving inputs:
//! - **Checked unmask answers.** Each advertised key set also commits to the self-mask seed
//!   ([`seed_commitment`]); the unmasking party checks every reconstructed seed and mask key
//!   and tries other share subsets past a garbage share, so a lying survivor cannot change the
//!   sum unnoticed: the round fails instead.
//! - **Signed keys.** Every advertised key set (two X25519 keys and a fresh 32-byte nonce) is
//!   signed with the client's certificate key. A client receives the roster's ids, a Merkle
//!   root over every client's keys, and its k neighbours' signed keys with inclusion proofs
//!   ([`RosterView`], see [`roster`]); a neighbour's forged or swapped key, a proof that does
//!   not lead to the root, or its own keys altered refuse the round. It verifies k signatures,
//!   not n, so its cost does not grow with the round.
//! - **The neighbour graph is not the coordinator's choice.** Its seed is
//!   `SHA-256("fedlora-secagg-graph-v2" ‖ round ‖ roster hash)`, where the roster hash covers
//!   every id and, through the Merkle root, every client's keys and nonce; each client
//!   recomputes it and refuses a round whose announced seed differs. The coordinator can only
//!   choose which advertised clients to include, so it (or a colluder choosing its nonce after
//!   seeing the others') **can** grind the seed over many tries. The guarantee below does not
//!   rest on the graph: `c` bounds the colluders in the whole round, so whatever graph a grind
//!   finds puts at most `c` of them next to any client, and `2t > k + c` holds for every client
//!   in every graph. (A bound on a colluding *fraction* γ of the population, as in Bell et
//!   al.'s random-graph analysis, would need an ungrindable seed, e.g. nonce commitments; fedlora
//!   claims no such bound.)
//! - **Client policy** ([`SecAggPolicy`]): the client refuses `2t ≤ k + c`, fewer than
//!   `min_neighbours` neighbours (default 3) and fewer than `max(t, min_survivors)` survivors;
//!   under a client-level DP plan it also refuses a round whose `c` is below the plan's
//!   collusion bound ([`ClientRound::bind`]); a client in a secure federation never sends a
//!   plaintext update.
//! - **Consistency check** (Bell et al. 2020, after Bonawitz et al. 2017): before unmasking,
//!   each survivor signs the hash of `(round, roster hash, graph seed, privacy plan digest,
//!   t, k, c, m, survivors, dropped)` **once** ([`consistency_message`]), so neighbours shown
//!   different parameters or plans sign different views. It answers **one** unmask request per round, for exactly the sets it signed,
//!   and only when at least `t` surviving neighbours signed that same message and **every**
//!   surviving neighbour either signed it or sent, with its input, a signed
//!   [`MaskStatement`] showing it masked with exactly its surviving neighbours (so a survivor
//!   that leaves after its input still counts). A request naming a peer both survivor and
//!   dropped is refused.
//! - **The view matches the masks** (protocol version 11). A client signs a view only if its
//!   surviving neighbours are exactly the neighbours it masked with (those whose shares were
//!   delivered to it) and every neighbour it masked with is a survivor or dropped; and only if
//!   the survivors stay one connected part of the neighbour graph after any `c` of them are
//!   removed ([`roster::survivors_stay_connected`], O(L) positions of the keyed permutation).
//!
//! **Why a sum holds at least `max(t, min_survivors) − c` honest inputs** (what distributed
//! DP's noise floor needs). In the sum over a set T, every pairwise mask of a member must cancel
//! or be removable. A signer masked with each of its surviving neighbours, so that mask cancels
//! only when the neighbour's input is in T too, unless the neighbour is a colluder (it can
//! reveal its mask key) or dropped (its key is rebuilt, but then it is not a survivor). Honest
//! clients reveal a survivor's self-mask only if it signed the view itself (after checking it
//! masked with exactly its surviving neighbours) or its signed mask statement shows that, so
//! every honest member of T masked with all its surviving neighbours: T is closed under the
//! survivor graph minus the colluders W, which is connected, so T holds every survivor outside
//! W. A survivor that never sent an input leaves its neighbours' masks unremovable: no sum at
//! all. Hence every sum the coordinator can unmask is over all listed survivors but the at most
//! `c` colluders, and a client signs only views of at least `max(t, min_survivors)`
//! survivors.
//!
//! That argument is for one view (the signed message covers the roster hash: one roster too). A
//! client checks that t of its surviving neighbours signed the same view as it did and that
//! the others' statements match it, and cannot check beyond them: a coordinator that shows two groups of clients different views or rosters, each
//! group consistent inside, is not covered by it (a client at
//! the edge of its group must still find t − c same-view neighbours to be unmasked, which
//! limits such splits, but fedlora claims no bound). Under client-level distributed DP this is
//! the assumption left against a deviating coordinator: it shows every survivor the same roster
//! and view.
//!
//! **Why that protects one client u.** Learning u's input needs both ≥ t shares of u's
//! self-mask seed (u "survived") and ≥ t shares of u's mask key (u "dropped"). Every honest
//! neighbour of u signs and answers for one view only, so with `c` colluders among u's `k`
//! neighbours (at most `c`, since the round holds at most `c`) the coordinator collects at most
//! `(k − c) + 2c = k + c` share answers over both
//! views: **u is safe when `2t > k + c`.** The default parameters (`k = 3`, `t = 2`) therefore
//! protect against an active coordinator with no colluding neighbour (`c = 0`); `k = 6, t = 5`
//! tolerates `c = 3`; in general choose `t > (k + c) / 2` (the planners pick the smallest such t).
//!
//! **Not protected:**
//! - **Sybils.** A coordinator that also runs the CA (or any CA holder) can enrol fake clients;
//!   they count as colluders, and a round of one real client among fakes reveals that client.
//!   Keep the CA key away from the coordinator host and bound who may enrol. Under client-level
//!   distributed DP ([`crate::client_dp`]) fakes also add no noise: the plan's collusion bound c
//!   counts them, and the honest clients' shares carry the whole noise only while at most c of
//!   the `min_clients` signed survivors are fakes.
//! - **Bad inputs.** A malicious client can send a well-formed but wrong masked input (the sum
//!   is then wrong; nothing about another client leaks). Bounding inputs is a later addition.
//! - **Denial of service.** The coordinator (or enough dropouts) can always make a round fail.
//!   A client that has sent unmask shares for a global version sends no second masked input
//!   for the same version, so a round failed on purpose and retried cannot collect two views
//!   of one delta.
//!
//! # Stages (typed; a message for another stage is refused)
//! 1. **Advertise keys**: each client sends two signed X25519 public keys (`c_pk` encrypts share
//!    messages, `s_pk` agrees pairwise mask seeds) and a nonce; the coordinator relays to
//!    each client the roster's ids, the keys' Merkle root, the graph seed derived from them,
//!    and that client's neighbours' keys.
//! 2. **Share keys**: each client checks its view and the seed, then Shamir-shares (t-of-k)
//!    its self-mask seed `b` and its mask private key `s_sk` among its k neighbours (a seeded
//!    random k-regular graph), each share pair AEAD-encrypted to its recipient; the coordinator
//!    routes them.
//! 3. **Masked input**: `y = x + PRG(b) + Σ_{v ∈ N(u) ∩ U2} ±PRG(s_uv) mod 2^m` (+ if u < v).
//! 4. **Consistency check**: the coordinator names survivors (U3) and dropped clients
//!    (U2 \ U3); each survivor checks and signs that view.
//! 5. **Unmask**: with the signatures relayed, survivors return shares of survivors' `b` and of
//!    dropped clients' `s_sk`; the coordinator removes the masks and gets the exact sum of the
//!    U3 inputs.
//!
//! Keys are fresh every round (reused masks would leak the difference of two rounds' inputs);
//! secrets and shares are zeroized on drop and never logged.

pub mod bench;
mod client;
pub mod crypto;
pub mod roster;
mod server;
mod view_bits;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

pub use client::{ClientRound, ClientStage};
pub use server::{ServerRound, ServerStage};
pub use view_bits::ViewBits;

use crate::identity::ClientId;
use crate::limits::{
    bounded, id, MAX_NEIGHBOURS, MAX_PROOF, MAX_ROSTER, MAX_SECRET_SHARE_LEN, MAX_SHARE_CIPHERTEXT,
    MAX_SIGNATURE_LEN,
};

/// Errors of secure aggregation, grouped by whose fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SecAggError {
    /// A peer (client or coordinator) sent something invalid: bad signature, undecryptable share,
    /// a request for both shares of one peer.
    #[error("peer misbehaved: {0}")]
    PeerMisbehaved(String),
    /// A message for another stage, or a second one for the same stage.
    #[error("out of order: {0}")]
    OutOfOrder(String),
    /// Too few survivors to reconstruct (a neighbourhood fell below t).
    #[error("threshold: {0}")]
    Threshold(String),
    /// Invalid parameters.
    #[error("config: {0}")]
    Config(String),
}

/// Parameters of a secure round (part of the round config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecAggParams {
    /// Shares needed to reconstruct a secret (t). Must satisfy `2t > k + c` (see the module's
    /// threat model). 0 means the smallest such t for the round's actual size ([`Self::t`]):
    /// what a complete-graph round whose size varies (Poisson sampling) needs.
    pub threshold: usize,
    /// Neighbours per client (k); 0 means everyone (rounds of at most a few dozen clients).
    pub neighbours: usize,
    /// Colluding clients the round tolerates, c: how many clients **in the whole round**
    /// (anywhere in the neighbour graph, Sybils included) may collude with the coordinator.
    /// Needs `2t > k + c`; every client checks it, and it is in the survivor view each client
    /// signs. Default 0.
    #[serde(default)]
    pub collusion: usize,
    /// Modulus bits m of the inputs (from the modular codec).
    pub modulus_bits: u32,
    /// How long the coordinator waits in the key and unmask stages, milliseconds (the masked
    /// input stage waits for the round deadline, since clients train first).
    #[serde(default = "default_stage_timeout")]
    pub stage_timeout_ms: u64,
}

fn default_stage_timeout() -> u64 {
    30_000
}

impl SecAggParams {
    /// The effective neighbour count for `n` participants: everyone when `neighbours` is 0 or
    /// at least n − 1; an odd k needs an even n (it is rounded up to even otherwise).
    pub fn k(&self, n: usize) -> usize {
        if self.neighbours == 0 || self.neighbours >= n.saturating_sub(1) {
            n.saturating_sub(1)
        } else if self.neighbours % 2 == 1 && n % 2 == 1 {
            self.neighbours + 1
        } else {
            self.neighbours
        }
    }

    /// The threshold for `n` participants: `threshold`, or when it is 0 the smallest t with
    /// `2t > k + c` for this round's k (everyone and every client compute the same).
    pub fn t(&self, n: usize) -> usize {
        if self.threshold == 0 {
            (self.k(n) + self.collusion) / 2 + 1
        } else {
            self.threshold
        }
    }

    /// Refuses parameters that cannot work, or are not safe, for `n` participants: k ≤ 254,
    /// `(k + c)/2 < t ≤ k`.
    pub fn validate(&self, n: usize) -> Result<(), SecAggError> {
        let k = self.k(n);
        if k > MAX_NEIGHBOURS {
            return Err(SecAggError::Config(format!("k = {k} exceeds 254 shares")));
        }
        let t = self.t(n);
        if t > k || 2 * t <= k + self.collusion {
            return Err(SecAggError::Config(format!(
                "threshold {t} with {k} neighbours ({n} participants) and {} colluders: it must \
                 satisfy 2t > k + c and be at most k",
                self.collusion
            )));
        }
        if !(1..=62).contains(&self.modulus_bits) {
            return Err(SecAggError::Config("modulus_bits must be in 1..=62".into()));
        }
        Ok(())
    }
}

/// What a client accepts of a secure round, checked on the client whatever the coordinator
/// says (see the threat model).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SecAggPolicy {
    /// Fewest neighbours (k) a client shares its secrets among. Default 3.
    pub min_neighbours: usize,
    /// Fewest survivors an unmask request may name (the client also requires at least t).
    /// Default 2, the coordinator's default `min_clients`.
    pub min_survivors: usize,
    /// Refuse rounds without secure aggregation (never send a plaintext update). Default false:
    /// a client follows the federation, but in a secure federation it never sends plaintext.
    pub required: bool,
    /// Fewest colluders (c) a round must tolerate for this client to take part: a coordinator
    /// announcing a smaller c is refused. Default 0.
    pub min_collusion: usize,
}

impl Default for SecAggPolicy {
    fn default() -> Self {
        Self {
            min_neighbours: 3,
            min_survivors: 2,
            required: false,
            min_collusion: 0,
        }
    }
}

impl SecAggPolicy {
    /// Checks a round's parameters for `n` participants against this policy.
    pub fn check(&self, params: &SecAggParams, n: usize) -> Result<(), SecAggError> {
        params.validate(n)?;
        let k = params.k(n);
        if params.collusion < self.min_collusion {
            return Err(SecAggError::Config(format!(
                "the round tolerates {} colluders, this client requires at least {}",
                params.collusion, self.min_collusion
            )));
        }
        if k < self.min_neighbours {
            return Err(SecAggError::Config(format!(
                "{k} neighbours, this client requires at least {}",
                self.min_neighbours
            )));
        }
        Ok(())
    }
}

pub use roster::{leaf_hash, roster_hash, verify_proof, Graph, MerkleTree};

/// The neighbour graph's seed: `SHA-256("fedlora-secagg-graph-v2" ‖ round ‖ roster hash)`.
/// Every client's nonce is in the roster hash (through the keys' Merkle root), so no party
/// picks the seed alone.
pub fn graph_seed(round: u64, roster_hash: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"fedlora-secagg-graph-v2");
    h.update(round.to_be_bytes());
    h.update(roster_hash);
    h.finalize().into()
}

/// What each survivor signs in the consistency check: the SHA-256 of a domain tag, the round,
/// the roster hash, the graph seed, the round's context (the digest of its privacy plan and
/// codec, [`crate::client_dp::plan_digest`], so survivors that were shown different plans sign
/// different messages), and the survivor and dropped sets (length-prefixed ids, in order). Hashed in one streaming pass, so a client hashes the O(n) view once and signs and
/// checks its neighbours' signatures over 32 bytes.
pub fn consistency_message(
    round: u64,
    roster_hash: &[u8; 32],
    graph_seed: &[u8; 32],
    context: &[u8; 32],
    shape: &RoundShape,
    req: &UnmaskRequest,
) -> [u8; 32] {
    let mut h = session_hasher(
        b"fedlora-secagg-consistency-v5",
        round,
        roster_hash,
        graph_seed,
        context,
        shape,
    );
    for set in [&req.survivors, &req.dropped] {
        hash_ids(&mut h, set.len(), set);
    }
    h.finalize().into()
}

/// A SHA-256 fed with a domain tag and what identifies a secure session: the round, the roster
/// hash, the graph seed, the round's context and t, k, c, m.
fn session_hasher(
    tag: &[u8],
    round: u64,
    roster_hash: &[u8; 32],
    graph_seed: &[u8; 32],
    context: &[u8; 32],
    shape: &RoundShape,
) -> Sha256 {
    let mut h = Sha256::new();
    h.update(tag);
    h.update(round.to_be_bytes());
    h.update(roster_hash);
    h.update(graph_seed);
    h.update(context);
    for v in [shape.threshold, shape.neighbours, shape.collusion] {
        h.update((v as u64).to_be_bytes());
    }
    h.update(shape.modulus_bits.to_be_bytes());
    h
}

/// Feeds `len` ids to `h`: the count, then each id length-prefixed.
fn hash_ids<'a>(h: &mut Sha256, len: usize, ids: impl IntoIterator<Item = &'a ClientId>) {
    h.update((len as u64).to_be_bytes());
    for id in ids {
        h.update((id.len() as u64).to_be_bytes());
        h.update(id.as_bytes());
    }
}

/// The secure parameters a survivor signs with its view: t, the effective k of the roster, c
/// and the modulus, so that neighbours shown different thresholds, graphs or collusion bounds
/// sign different messages and never unmask for each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundShape {
    /// Threshold t.
    pub threshold: usize,
    /// Effective neighbours per client, k, for the roster's size.
    pub neighbours: usize,
    /// Colluding clients tolerated, c.
    pub collusion: usize,
    /// Modulus bits m.
    pub modulus_bits: u32,
}

impl RoundShape {
    /// The shape of a round of `n` participants under `params`.
    pub fn of(params: &SecAggParams, n: usize) -> Self {
        Self {
            threshold: params.t(n),
            neighbours: params.k(n),
            collusion: params.collusion,
            modulus_bits: params.modulus_bits,
        }
    }
}

/// The neighbours of every client of `roster` under `params` (the [`Graph`] of the roster's
/// indices in id order), by id: the coordinator's whole view, O(n·k).
pub fn neighbour_graph(
    roster: &BTreeSet<ClientId>,
    params: &SecAggParams,
    seed: &[u8; 32],
) -> BTreeMap<ClientId, BTreeSet<ClientId>> {
    let ids: Vec<&ClientId> = roster.iter().collect();
    let g = Graph::new(ids.len(), params, seed);
    g.all()
        .into_iter()
        .enumerate()
        .map(|(i, nb)| {
            (
                ids[i].clone(),
                nb.into_iter().map(|v| ids[v].clone()).collect(),
            )
        })
        .collect()
}

/// Stage 2 message to one client: the roster's ids, the Merkle root over every client's keys,
/// the graph seed, this client's own inclusion proof, and its neighbours' signed keys with
/// theirs. O(n) bytes of ids and O(k log n) of keys and proofs; see [`roster`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RosterView {
    /// Every participant's id, strictly ascending (shared, not copied, between the views of one
    /// round).
    pub ids: std::sync::Arc<[ClientId]>,
    /// Merkle root over [`leaf_hash`] of every participant's keys, in id order.
    pub keys_root: [u8; 32],
    /// The graph seed as the coordinator derived it; the client recomputes it
    /// ([`graph_seed`] of [`roster_hash`]) and refuses a mismatch.
    pub graph_seed: [u8; 32],
    /// The inclusion proof of this client's own keys.
    pub own_proof: Vec<[u8; 32]>,
    /// The neighbours' signed keys, each with its inclusion proof.
    pub neighbours: Vec<NeighbourKeys>,
}

/// One neighbour's signed keys and their Merkle inclusion proof.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NeighbourKeys {
    /// The neighbour's advertised keys, signed with its certificate key.
    pub keys: AdvertisedKeys,
    /// Sibling hashes from its leaf to the root.
    pub proof: Vec<[u8; 32]>,
}

/// Stage 1 message: a client's signed public keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdvertisedKeys {
    /// Client id (the certificate's).
    pub client: ClientId,
    /// X25519 key for share encryption.
    pub c_pk: [u8; 32],
    /// X25519 key for pairwise masks.
    pub s_pk: [u8; 32],
    /// Fresh random bytes: the client's contribution to the graph seed.
    pub nonce: [u8; 32],
    /// [`seed_commitment`] of the client's self-mask seed: what a seed the survivors'
    /// shares reconstruct must match, so a garbage share is detected, never summed.
    pub seed_commitment: [u8; 32],
    /// Signature of [`AdvertisedKeys::signed_bytes`] with the client's certificate key.
    pub signature: Vec<u8>,
}

/// The commitment to a self-mask seed in a client's advertised keys: SHA-256 of a domain tag,
/// the round, the client id and the 32-byte seed. Hiding (the seed is 256 random bits and
/// SHA-256 is modelled as a random oracle) and binding (collision resistance): the unmasking
/// party checks a reconstructed seed against it, so one wrong Shamir share cannot change the
/// sum without being noticed.
pub fn seed_commitment(round: u64, client: &str, seed: &[u8; 32]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"fedlora-secagg-seed-commitment-v1");
    h.update(round.to_be_bytes());
    h.update((client.len() as u64).to_be_bytes());
    h.update(client.as_bytes());
    h.update(seed);
    h.finalize().into()
}

impl AdvertisedKeys {
    /// What is signed: a domain tag, the round, the client id, both keys, the nonce and the
    /// seed commitment.
    pub fn signed_bytes(&self, round: u64) -> Vec<u8> {
        let mut m = b"fedlora-secagg-keys-v3".to_vec();
        m.extend_from_slice(&round.to_be_bytes());
        m.extend_from_slice(&(self.client.len() as u32).to_be_bytes());
        m.extend_from_slice(self.client.as_bytes());
        m.extend_from_slice(&self.c_pk);
        m.extend_from_slice(&self.s_pk);
        m.extend_from_slice(&self.nonce);
        m.extend_from_slice(&self.seed_commitment);
        m
    }
}

/// Stage 2 message: one encrypted share pair from `from` to `to`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EncryptedShare {
    /// Sender.
    pub from: ClientId,
    /// Recipient.
    pub to: ClientId,
    /// AEAD ciphertext of (from, to, share of b, share of s_sk).
    pub ciphertext: Vec<u8>,
}

/// What a client says it masked with, sent with its masked input: the neighbours whose shares
/// reached it (so whose pairwise masks are in its input), ascending, signed with its
/// certificate key over [`mask_statement_message`]. A neighbour that holds the client's shares
/// reveals its self-mask seed only if the client signed the survivor view or this statement
/// shows it masked with exactly its surviving neighbours ([`ClientRound::unmask`]), so a client
/// that goes away after its input can still be counted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskStatement {
    /// The neighbours masked with, ascending.
    pub masked_with: Vec<ClientId>,
    /// The fewest survivors its owner accepts (`max(t, min_survivors)` of its policy): a view
    /// with fewer does not count it, as it would not have signed one.
    pub min_survivors: u32,
    /// Signature of [`mask_statement_message`].
    pub signature: Vec<u8>,
}

/// What a [`MaskStatement`] signs: SHA-256 of a domain tag, the round, the roster hash, the
/// graph seed, the round's context (its privacy plan and codec, as in
/// [`consistency_message`]), t, k, c and m, the fewest survivors its owner accepts and the ids
/// masked with (length-prefixed, in order). A neighbour checks it with its own round, roster,
/// context and shape, so a statement made under another plan or threshold does not verify.
pub fn mask_statement_message(
    round: u64,
    roster_hash: &[u8; 32],
    graph_seed: &[u8; 32],
    context: &[u8; 32],
    shape: &RoundShape,
    min_survivors: u32,
    masked_with: &[ClientId],
) -> [u8; 32] {
    let mut h = session_hasher(
        b"fedlora-secagg-mask-statement-v1",
        round,
        roster_hash,
        graph_seed,
        context,
        shape,
    );
    h.update(min_survivors.to_be_bytes());
    hash_ids(&mut h, masked_with.len(), masked_with);
    h.finalize().into()
}

impl MaskStatement {
    pub(crate) fn check_bounds(&self) -> Result<(), crate::ProtocolError> {
        bounded("mask statement", self.masked_with.len(), MAX_NEIGHBOURS)?;
        self.masked_with
            .iter()
            .try_for_each(|c| id("masked-with id", c))?;
        bounded(
            "mask statement signature",
            self.signature.len(),
            MAX_SIGNATURE_LEN,
        )
    }
}

/// Stage 4 request: who survived and who dropped after sharing keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnmaskRequest {
    /// Clients whose masked input counts (their self-mask seeds are asked for).
    pub survivors: BTreeSet<ClientId>,
    /// Clients that shared keys but sent no input (their mask keys are asked for).
    pub dropped: BTreeSet<ClientId>,
}

/// Stage 5 answer: decrypted shares held by one survivor. Its share bytes are wiped when it is
/// dropped (every copy: the client's, the frame decoder's, the coordinator's).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnmaskResponse {
    /// Responding client.
    pub client: ClientId,
    /// Shares of survivors' self-mask seeds, by owner.
    pub seed_shares: BTreeMap<ClientId, Vec<u8>>,
    /// Shares of dropped clients' mask keys, by owner.
    pub key_shares: BTreeMap<ClientId, Vec<u8>>,
}

/// Bounds of the secure-aggregation bodies a peer sends ([`crate::limits`]), checked when a
/// frame is decoded.
impl AdvertisedKeys {
    pub(crate) fn check_bounds(&self) -> Result<(), crate::ProtocolError> {
        id("advertised keys' client id", &self.client)?;
        bounded(
            "advertised keys' signature",
            self.signature.len(),
            MAX_SIGNATURE_LEN,
        )
    }
}

/// Checks a list of encrypted shares against [`crate::limits`].
pub(crate) fn check_shares(s: &[EncryptedShare]) -> Result<(), crate::ProtocolError> {
    bounded("share list", s.len(), MAX_NEIGHBOURS)?;
    for e in s {
        id("share sender", &e.from)?;
        id("share recipient", &e.to)?;
        bounded("share ciphertext", e.ciphertext.len(), MAX_SHARE_CIPHERTEXT)?;
    }
    Ok(())
}

impl UnmaskResponse {
    pub(crate) fn check_bounds(&self) -> Result<(), crate::ProtocolError> {
        id("unmask response id", &self.client)?;
        bounded("seed shares", self.seed_shares.len(), MAX_NEIGHBOURS)?;
        bounded("key shares", self.key_shares.len(), MAX_NEIGHBOURS)?;
        for (owner, s) in self.seed_shares.iter().chain(self.key_shares.iter()) {
            id("share owner", owner)?;
            bounded("secret share", s.len(), MAX_SECRET_SHARE_LEN)?;
        }
        Ok(())
    }
}

impl RosterView {
    pub(crate) fn check_bounds(&self) -> Result<(), crate::ProtocolError> {
        bounded("roster", self.ids.len(), MAX_ROSTER)?;
        self.ids.iter().try_for_each(|c| id("roster id", c))?;
        bounded("neighbours' keys", self.neighbours.len(), MAX_NEIGHBOURS)?;
        bounded("inclusion proof", self.own_proof.len(), MAX_PROOF)?;
        for nk in &self.neighbours {
            nk.keys.check_bounds()?;
            bounded("inclusion proof", nk.proof.len(), MAX_PROOF)?;
        }
        Ok(())
    }
}

impl Drop for UnmaskResponse {
    fn drop(&mut self) {
        for v in self
            .seed_shares
            .values_mut()
            .chain(self.key_shares.values_mut())
        {
            v.zeroize();
        }
    }
}

/// 2^bits − 1: the mask that reduces a value mod 2^bits (`u64::MAX` at 64 bits).
pub(crate) fn modulus_mask(bits: u32) -> u64 {
    if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// `a + b mod 2^m` element-wise into `a`.
pub fn add_mod(a: &mut [u64], b: &[u64], bits: u32) {
    let mask = modulus_mask(bits);
    for (x, y) in a.iter_mut().zip(b) {
        *x = x.wrapping_add(*y) & mask;
    }
}

/// Below this many values [`add_mod_threads`] stays on the calling thread: the add reads and
/// writes about 1 ns per value, so under 2^18 values (a quarter of a millisecond) starting a
/// thread costs more than it saves.
pub const SUM_PARALLEL_MIN: usize = 1 << 18;

/// [`add_mod`] on up to `threads` scoped threads, each on a contiguous range of coordinates
/// (vectors of at least [`SUM_PARALLEL_MIN`] values; shorter ones on the calling thread). The
/// sum is exact mod 2^m coordinate by coordinate, so the result is bit-identical for any
/// thread count.
pub fn add_mod_threads(a: &mut [u64], b: &[u64], bits: u32, threads: usize) {
    let threads = threads.clamp(1, a.len().div_ceil(SUM_PARALLEL_MIN).max(1));
    if threads == 1 {
        add_mod(a, b, bits);
        return;
    }
    let part = a.len().div_ceil(threads);
    std::thread::scope(|s| {
        for (x, y) in a.chunks_mut(part).zip(b.chunks(part)) {
            s.spawn(move || add_mod(x, y, bits));
        }
    });
}

/// `a − b mod 2^m` element-wise into `a`.
pub fn sub_mod(a: &mut [u64], b: &[u64], bits: u32) {
    let mask = modulus_mask(bits);
    for (x, y) in a.iter_mut().zip(b) {
        *x = x.wrapping_sub(*y) & mask;
    }
}

#[cfg(test)]
pub(crate) mod tests;
