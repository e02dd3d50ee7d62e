//! Secure aggregation (SecAgg+, Bonawitz et al. 2017; Bell et al. 2020) without I/O: the
//! coordinator learns only the sum of the counted clients' inputs (integer vectors mod 2^m, the
//! [`modular`](crate::codec::modular) encoding of their deltas, weight included).
//!
//! # Threat model
//! Clients are authenticated by their certificates. The coordinator is honest-but-curious: it
//! follows the protocol but tries to learn individual inputs from what it sees; within that
//! model it learns only the sum of at least `t` inputs per neighbourhood. Beyond it: every
//! advertised key is signed with the client's certificate key, so a relaying coordinator cannot
//! swap keys; and a client never reveals, for one peer, both the share of its self-mask seed and
//! the share of its mask key (it refuses an unmask request naming a peer both survivor and
//! dropped). **Not protected:** a coordinator that also runs the CA can enrol fake clients (and
//! so make a "sum" of one real input); a malicious client can send a well-formed but bad input
//! (bounding inputs is a later addition).
//!
//! # Stages (typed; a message for another stage is refused)
//! 1. **Advertise keys**: each client sends two signed X25519 public keys (`c_pk` encrypts share
//!    messages, `s_pk` agrees pairwise mask seeds); the coordinator relays the roster.
//! 2. **Share keys**: each client Shamir-shares (t-of-k) its self-mask seed `b` and its mask
//!    private key `s_sk` among its k neighbours (a seeded random k-regular graph), each share
//!    pair AEAD-encrypted to its recipient; the coordinator routes them.
//! 3. **Masked input**: `y = x + PRG(b) + Σ_{v ∈ N(u) ∩ U2} ±PRG(s_uv) mod 2^m` (+ if u < v).
//! 4. **Unmask**: the coordinator names survivors (U3) and dropped clients (U2 \ U3); survivors
//!    return shares of survivors' `b` and of dropped clients' `s_sk`; the coordinator removes the
//!    masks and gets the exact sum of the U3 inputs.
//!
//! Keys are fresh every round (reused masks would leak the difference of two rounds' inputs);
//! secrets are zeroized on drop and never logged.

mod client;
pub mod crypto;
mod server;

use std::collections::{BTreeMap, BTreeSet};

use rand::SeedableRng;
use serde::{Deserialize, Serialize};

pub use client::{ClientRound, ClientStage};
pub use server::{ServerRound, ServerStage};

use crate::round::ClientId;

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
pub struct SecAggParams {
    /// Shares needed to reconstruct a secret (t). Security: the coordinator must not obtain t
    /// shares of both secrets of one client; with honest clients t > k/2 keeps a colluding
    /// minority of neighbours from reconstructing.
    pub threshold: usize,
    /// Neighbours per client (k); 0 means everyone (rounds of at most a few dozen clients).
    pub neighbours: usize,
    /// Modulus bits m of the inputs (from the modular codec).
    pub modulus_bits: u32,
    /// Seed of the neighbour graph (public).
    pub graph_seed: u64,
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

    /// Refuses parameters that cannot work for `n` participants.
    pub fn validate(&self, n: usize) -> Result<(), SecAggError> {
        let k = self.k(n);
        if k > 254 {
            return Err(SecAggError::Config(format!("k = {k} exceeds 254 shares")));
        }
        if self.threshold < 1 || self.threshold > k {
            return Err(SecAggError::Config(format!(
                "threshold {} must be in 1..={k}",
                self.threshold
            )));
        }
        if !(1..=62).contains(&self.modulus_bits) {
            return Err(SecAggError::Config("modulus_bits must be in 1..=62".into()));
        }
        Ok(())
    }
}

/// The neighbours of every client of `roster` under `params`: a ring lattice (each client
/// linked to ⌊k/2⌋ on each side, plus the client opposite on the ring when k is odd) over a
/// seeded permutation, or everyone.
pub fn neighbour_graph(
    roster: &BTreeSet<ClientId>,
    params: &SecAggParams,
) -> BTreeMap<ClientId, BTreeSet<ClientId>> {
    use rand::seq::SliceRandom;
    let mut ids: Vec<ClientId> = roster.iter().cloned().collect();
    let n = ids.len();
    let k = params.k(n);
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(params.graph_seed);
    ids.shuffle(&mut rng);
    let mut g: BTreeMap<ClientId, BTreeSet<ClientId>> = BTreeMap::new();
    for (i, u) in ids.iter().enumerate() {
        let mut set = BTreeSet::new();
        if k + 1 >= n {
            set.extend(ids.iter().filter(|v| *v != u).cloned());
        } else {
            for d in 1..=k / 2 {
                set.insert(ids[(i + d) % n].clone());
                set.insert(ids[(i + n - d) % n].clone());
            }
            if k % 2 == 1 {
                set.insert(ids[(i + n / 2) % n].clone());
            }
        }
        g.insert(u.clone(), set);
    }
    g
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
    /// Signature of [`AdvertisedKeys::signed_bytes`] with the client's certificate key.
    pub signature: Vec<u8>,
}

impl AdvertisedKeys {
    /// What is signed: a domain tag, the round, the client id and both keys.
    pub fn signed_bytes(round: u64, client: &str, c_pk: &[u8; 32], s_pk: &[u8; 32]) -> Vec<u8> {
        let mut m = b"fedlora-secagg-keys-v1".to_vec();
        m.extend_from_slice(&round.to_be_bytes());
        m.extend_from_slice(&(client.len() as u32).to_be_bytes());
        m.extend_from_slice(client.as_bytes());
        m.extend_from_slice(c_pk);
        m.extend_from_slice(s_pk);
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

/// Stage 4 request: who survived and who dropped after sharing keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnmaskRequest {
    /// Clients whose masked input counts (their self-mask seeds are asked for).
    pub survivors: BTreeSet<ClientId>,
    /// Clients that shared keys but sent no input (their mask keys are asked for).
    pub dropped: BTreeSet<ClientId>,
}

/// Stage 4 answer: decrypted shares held by one survivor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnmaskResponse {
    /// Responding client.
    pub client: ClientId,
    /// Shares of survivors' self-mask seeds, by owner.
    pub seed_shares: BTreeMap<ClientId, Vec<u8>>,
    /// Shares of dropped clients' mask keys, by owner.
    pub key_shares: BTreeMap<ClientId, Vec<u8>>,
}

/// `a + b mod 2^m` element-wise into `a`.
pub fn add_mod(a: &mut [u64], b: &[u64], bits: u32) {
    let mask = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    for (x, y) in a.iter_mut().zip(b) {
        *x = x.wrapping_add(*y) & mask;
    }
}

/// `a − b mod 2^m` element-wise into `a`.
pub fn sub_mod(a: &mut [u64], b: &[u64], bits: u32) {
    let mask = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    for (x, y) in a.iter_mut().zip(b) {
        *x = x.wrapping_sub(*y) & mask;
    }
}

#[cfg(test)]
mod tests;
