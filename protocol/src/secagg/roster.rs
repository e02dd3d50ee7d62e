//! The roster of a secure round, sized so that a client's work stays flat in the round's size n:
//! every client receives the roster's **ids** (O(n) bytes, nothing to verify but their order),
//! a Merkle root over every client's advertised keys, and the signed keys of its **k
//! neighbours** with their inclusion proofs (k·⌈log₂ n⌉ hashes). It verifies k signatures, not n.
//!
//! - **Leaves** ([`leaf_hash`]): SHA-256 of a domain tag, the round, the id, both public keys,
//!   the nonce and the self-mask seed's commitment, in id order. A client checks its own leaf (its proof) and each neighbour's.
//! - **Roster hash** ([`roster_hash`]): SHA-256 of a domain tag, the round, every id and the
//!   Merkle root. It covers every client's keys and nonce through the root, so the graph seed
//!   derived from it ([`super::graph_seed`]) is still not the coordinator's choice; and the
//!   consistency signatures cover it, so neighbours that sign one view saw one roster.
//! - **Neighbour graph** ([`Graph`]): a ring lattice over a pseudorandom permutation of the
//!   roster's indices, keyed by the graph seed. The permutation is a 4-round Feistel network
//!   (SHA-256 round function) with cycle walking, so a client finds its own position and its k
//!   neighbours' indices with O(k) permutation calls and no pass over the roster.

use sha2::{Digest, Sha256};

use super::{AdvertisedKeys, SecAggParams};
use crate::identity::ClientId;

/// SHA-256 of one client's advertised keys for the Merkle tree (signature excluded: it is
/// randomized, and each client checks its neighbours' signatures).
pub fn leaf_hash(round: u64, keys: &AdvertisedKeys) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(b"fedlora-secagg-leaf-v4");
    h.update(round.to_be_bytes());
    h.update((keys.client.len() as u64).to_be_bytes());
    h.update(keys.client.as_bytes());
    h.update(keys.c_pk);
    h.update(keys.s_pk);
    h.update(keys.nonce);
    h.update(keys.seed_commitment);
    h.finalize().into()
}

fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// A binary Merkle tree over leaf hashes: nodes pair up left to right; the last node of an
/// odd-sized level moves up unchanged. Leaves and inner nodes hash with distinct prefixes.
pub struct MerkleTree {
    /// Level 0 is the leaves; the last level holds the root.
    levels: Vec<Vec<[u8; 32]>>,
}

impl MerkleTree {
    /// The tree over `leaves` (at least one).
    pub fn new(leaves: Vec<[u8; 32]>) -> Self {
        let mut levels = vec![leaves];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let prev = levels.last().expect("a level");
            let next = prev
                .chunks(2)
                .map(|p| match p {
                    [l, r] => node_hash(l, r),
                    [only] => *only,
                    _ => unreachable!("chunks of two"),
                })
                .collect();
            levels.push(next);
        }
        Self { levels }
    }

    /// The root (all zeros for an empty tree).
    pub fn root(&self) -> [u8; 32] {
        self.levels
            .last()
            .and_then(|l| l.first())
            .copied()
            .unwrap_or([0; 32])
    }

    /// The sibling hashes from leaf `index` up to the root (levels where the node moves up
    /// alone contribute none).
    pub fn proof(&self, index: usize) -> Vec<[u8; 32]> {
        let mut out = Vec::new();
        let mut i = index;
        for level in &self.levels[..self.levels.len() - 1] {
            let sibling = i ^ 1;
            if sibling < level.len() {
                out.push(level[sibling]);
            }
            i /= 2;
        }
        out
    }
}

/// Checks that `leaf` sits at `index` of a tree of `n` leaves whose root is `root`.
pub fn verify_proof(
    root: &[u8; 32],
    leaf: &[u8; 32],
    index: usize,
    n: usize,
    proof: &[[u8; 32]],
) -> bool {
    if index >= n {
        return false;
    }
    let (mut acc, mut i, mut len) = (*leaf, index, n);
    let mut siblings = proof.iter();
    while len > 1 {
        let sibling = i ^ 1;
        if sibling < len {
            let Some(s) = siblings.next() else {
                return false;
            };
            acc = if i % 2 == 0 {
                node_hash(&acc, s)
            } else {
                node_hash(s, &acc)
            };
        }
        i /= 2;
        len = len.div_ceil(2);
    }
    siblings.next().is_none() && acc == *root
}

/// SHA-256 of a roster: a domain tag, the round, every id (length-prefixed, in order) and the
/// Merkle root over the advertised keys.
pub fn roster_hash(round: u64, ids: &[ClientId], keys_root: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"fedlora-secagg-roster-v3");
    h.update(round.to_be_bytes());
    h.update((ids.len() as u64).to_be_bytes());
    for id in ids {
        h.update((id.len() as u64).to_be_bytes());
        h.update(id.as_bytes());
    }
    h.update(keys_root);
    h.finalize().into()
}

/// The neighbour graph of a roster of `n` clients (by index in id order) under a seed: a ring
/// lattice over a keyed pseudorandom permutation. Each client is linked to the ⌊k/2⌋ clients on
/// each side of its position, plus the client opposite when k is odd (n is then even, see
/// [`SecAggParams::k`]); with `k ≥ n − 1`, to everyone. Symmetric and k-regular.
pub struct Graph {
    n: usize,
    k: usize,
    seed: [u8; 32],
    /// Bits of each Feistel half; the permuted domain is [0, 4^half) ⊇ [0, n).
    half: u32,
}

impl Graph {
    /// The graph of `n` clients under `params` and `seed`.
    pub fn new(n: usize, params: &SecAggParams, seed: &[u8; 32]) -> Self {
        let bits = (usize::BITS - n.saturating_sub(1).leading_zeros()).max(2);
        Self {
            n,
            k: params.k(n),
            seed: *seed,
            half: bits.div_ceil(2),
        }
    }

    /// Neighbours per client.
    pub fn k(&self) -> usize {
        self.k
    }

    fn round_fn(&self, round: u8, x: u64) -> u64 {
        let mut h = Sha256::new();
        h.update(b"fedlora-secagg-prp-v3");
        h.update(self.seed);
        h.update([round]);
        h.update(x.to_be_bytes());
        let d: [u8; 32] = h.finalize().into();
        u64::from_le_bytes(d[..8].try_into().expect("8 bytes")) & ((1u64 << self.half) - 1)
    }

    fn feistel(&self, x: u64, forward: bool) -> u64 {
        let mask = (1u64 << self.half) - 1;
        let (mut l, mut r) = (x >> self.half, x & mask);
        if forward {
            for round in 0..4u8 {
                (l, r) = (r, l ^ self.round_fn(round, r));
            }
        } else {
            for round in (0..4u8).rev() {
                (l, r) = (r ^ self.round_fn(round, l), l);
            }
        }
        (l << self.half) | r
    }

    /// Cycle walking: apply the Feistel permutation until the value falls back into [0, n).
    fn walk(&self, i: usize, forward: bool) -> usize {
        let mut x = i as u64;
        loop {
            x = self.feistel(x, forward);
            if (x as usize) < self.n {
                return x as usize;
            }
        }
    }

    /// The ring position of client `index`.
    pub fn position(&self, index: usize) -> usize {
        self.walk(index, true)
    }

    /// The client at ring position `pos`.
    pub fn at(&self, pos: usize) -> usize {
        self.walk(pos, false)
    }

    /// The indices of client `index`'s neighbours, ascending: O(k) permutation calls.
    pub fn neighbours(&self, index: usize) -> Vec<usize> {
        let n = self.n;
        let mut out: Vec<usize> = if self.k + 1 >= n {
            (0..n).filter(|&v| v != index).collect()
        } else {
            let p = self.position(index);
            let mut v = Vec::with_capacity(self.k);
            for d in 1..=self.k / 2 {
                v.push(self.at((p + d) % n));
                v.push(self.at((p + n - d) % n));
            }
            if self.k % 2 == 1 {
                v.push(self.at((p + n / 2) % n));
            }
            v
        };
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Every client's neighbours (the coordinator's view): O(n·k).
    pub fn all(&self) -> Vec<Vec<usize>> {
        let n = self.n;
        if self.k + 1 >= n {
            return (0..n).map(|i| self.neighbours(i)).collect();
        }
        let pos: Vec<usize> = (0..n).map(|i| self.position(i)).collect();
        let mut at = vec![0usize; n];
        for (i, &p) in pos.iter().enumerate() {
            at[p] = i;
        }
        pos.iter()
            .map(|&p| {
                let mut v = Vec::with_capacity(self.k);
                for d in 1..=self.k / 2 {
                    v.push(at[(p + d) % n]);
                    v.push(at[(p + n - d) % n]);
                }
                if self.k % 2 == 1 {
                    v.push(at[(p + n / 2) % n]);
                }
                v.sort_unstable();
                v.dedup();
                v
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(k: usize) -> SecAggParams {
        SecAggParams {
            threshold: 2,
            neighbours: k,
            modulus_bits: 16,
            collusion: 0,
            stage_timeout_ms: 1000,
        }
    }

    #[test]
    fn merkle_proofs_verify_at_their_index_only() {
        for n in 1..=33usize {
            let leaves: Vec<[u8; 32]> = (0..n).map(|i| [i as u8; 32]).collect();
            let t = MerkleTree::new(leaves.clone());
            for (i, leaf) in leaves.iter().enumerate() {
                let p = t.proof(i);
                assert!(p.len() <= (usize::BITS - n.leading_zeros()) as usize);
                assert!(verify_proof(&t.root(), leaf, i, n, &p), "n {n} i {i}");
                // another index, a tampered sibling, a truncated proof (the tree size is fixed
                // by the roster's ids, which the roster hash covers)
                assert!(n == 1 || !verify_proof(&t.root(), leaf, (i + 1) % n, n, &p));
                if let Some(first) = p.first() {
                    let mut bad = p.clone();
                    bad[0] = [first[0] ^ 1; 32];
                    assert!(!verify_proof(&t.root(), leaf, i, n, &bad));
                    assert!(!verify_proof(&t.root(), leaf, i, n, &p[1..]));
                }
            }
            assert!(!verify_proof(&t.root(), &[0xEE; 32], 0, n, &t.proof(0)));
        }
    }

    #[test]
    fn the_permutation_is_a_bijection_and_inverts() {
        for n in [2usize, 3, 5, 17, 100, 1000, 1025] {
            let g = Graph::new(n, &params(3), &[9; 32]);
            let mut seen = vec![false; n];
            for i in 0..n {
                let p = g.position(i);
                assert!(p < n);
                assert!(!seen[p], "n {n}: position {p} twice");
                seen[p] = true;
                assert_eq!(g.at(p), i);
            }
        }
    }

    #[test]
    fn each_clients_neighbours_match_the_whole_graph_which_is_symmetric_and_k_regular() {
        for (n, k) in [
            (100usize, 3usize),
            (100, 14),
            (51, 3),
            (10, 0),
            (1000, 20),
            (7, 6),
        ] {
            let p = params(k);
            let g = Graph::new(n, &p, &[5; 32]);
            let all = g.all();
            for (i, nb) in all.iter().enumerate() {
                assert_eq!(nb, &g.neighbours(i), "n {n} k {k} client {i}");
                assert_eq!(nb.len(), p.k(n), "n {n} k {k}");
                assert!(!nb.contains(&i));
                for &v in nb {
                    assert!(all[v].contains(&i), "symmetric");
                }
            }
        }
    }

    #[test]
    fn another_seed_gives_another_graph() {
        let p = params(4);
        let a = Graph::new(200, &p, &[1; 32]).all();
        let b = Graph::new(200, &p, &[2; 32]).all();
        assert_ne!(a, b);
    }
}
