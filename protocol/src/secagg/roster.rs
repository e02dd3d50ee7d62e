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
//!   roster's indices, keyed by the graph seed. The permutation is a 4-round Feistel network with
//!   cycle walking, so a client finds its own position and its k neighbours' indices with O(k)
//!   permutation calls. Each round function is a 64-bit mix (SplitMix64's finalizer) of the
//!   input and a round key (SHA-256 of the seed and the round): the graph is public once the
//!   keys are in, so it needs to look random, not to be unpredictable, and a client can place
//!   every survivor (the connectivity check of a survivor view) in well under a millisecond per
//!   thousand.

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
    /// The Feistel round keys, from the seed.
    keys: [u64; 4],
    /// Bits of each Feistel half; the permuted domain is [0, 4^half) ⊇ [0, n).
    half: u32,
}

impl Graph {
    /// The graph of `n` clients under `params` and `seed`.
    pub fn new(n: usize, params: &SecAggParams, seed: &[u8; 32]) -> Self {
        let bits = (usize::BITS - n.saturating_sub(1).leading_zeros()).max(2);
        let keys = std::array::from_fn(|round| {
            let mut h = Sha256::new();
            h.update(b"fedlora-secagg-prp-v4");
            h.update(seed);
            h.update([round as u8]);
            let d: [u8; 32] = h.finalize().into();
            u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
        });
        Self {
            n,
            k: params.k(n),
            keys,
            half: bits.div_ceil(2),
        }
    }

    /// Neighbours per client.
    pub fn k(&self) -> usize {
        self.k
    }

    fn round_fn(&self, round: u8, x: u64) -> u64 {
        // SplitMix64's finalizer of the keyed input
        let mut z = x ^ self.keys[round as usize];
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        z & ((1u64 << self.half) - 1)
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

/// Whether the `survivors` of a roster (`ids`, ascending) stay one connected part of its
/// neighbour graph under `params` and `seed` after any `params.collusion` of them are removed
/// ([`survivors_stay_connected`] of their ring positions; always, when everyone is a
/// neighbour). What a client checks before it signs a survivor view, and the coordinator
/// before it sends one. O(n).
pub fn view_stays_connected(
    ids: &[ClientId],
    survivors: &std::collections::BTreeSet<ClientId>,
    params: &SecAggParams,
    seed: &[u8; 32],
) -> bool {
    let n = ids.len();
    let graph = Graph::new(n, params, seed);
    if graph.k() + 1 >= n {
        return true;
    }
    // the survivors' roster indices: one merge pass over both ascending lists
    let mut at = 0;
    let positions: Vec<usize> = survivors
        .iter()
        .filter_map(|name| {
            while at < n && ids[at] < *name {
                at += 1;
            }
            (at < n && ids[at] == *name).then(|| graph.position(at))
        })
        .collect();
    survivors_stay_connected(&positions, n, graph.k(), params.collusion)
}

/// Whether the survivors at ring positions `positions` (distinct, any order) of a ring of `n`
/// stay one connected part of the neighbour graph after any `c` of them are removed (the
/// colluders, whose masks the coordinator can remove): then the only sum of honest inputs the
/// coordinator can unmask is the sum over all of them. A sparse [`Graph`] links positions at
/// ring distance up to `⌊k/2⌋` (and opposite positions when k is odd).
///
/// Exact for `c = 0` (a search over the survivors' edges, O(L·k)). For `c > 0` it is
/// sufficient, not necessary: it ignores the opposite edges of an odd k, and checks that no `c`
/// removals open two gaps wider than `⌊k/2⌋` between consecutive survivors (O(L + c²)): with at
/// most one such gap the survivors form one arc of the ring lattice.
///
/// `positions` must be distinct and below `n` (a roster's positions are).
pub fn survivors_stay_connected(positions: &[usize], n: usize, k: usize, c: usize) -> bool {
    debug_assert!(
        positions.iter().all(|&p| p < n),
        "a position outside the ring"
    );
    let l = positions.len();
    if l <= 1 || k + 1 >= n {
        return true;
    }
    let w = k / 2;
    if c == 0 {
        let mut at = vec![usize::MAX; n];
        for (i, &p) in positions.iter().enumerate() {
            at[p] = i;
        }
        let mut seen = vec![false; l];
        let mut stack = vec![0usize];
        seen[0] = true;
        let mut reached = 1;
        while let Some(i) = stack.pop() {
            let p = positions[i];
            let opposite = (k % 2 == 1).then_some((p + n / 2) % n);
            let near = (1..=w)
                .flat_map(|d| [(p + d) % n, (p + n - d) % n])
                .chain(opposite);
            for q in near {
                let j = at[q];
                if j != usize::MAX && !seen[j] {
                    seen[j] = true;
                    reached += 1;
                    stack.push(j);
                }
            }
        }
        return reached == l;
    }
    let mut p: Vec<usize> = positions.to_vec();
    p.sort_unstable();
    // P(j): the j-th survivor's position unrolled around the ring
    let at = |j: usize| p[j % l] + n * (j / l);
    // r(i): survivors to remove right after survivor i to open a gap wider than w there
    let mut r = Vec::with_capacity(l);
    let mut j = 1;
    for i in 0..l {
        j = j.max(i + 1);
        while at(j) - at(i) <= w {
            j += 1;
        }
        r.push(j - i - 1);
    }
    // two disjoint gaps costing at most c together split the survivors; the cheapest pair is
    // among the 2c + 4 cheapest gaps (each gap conflicts with at most 2c + 1 others)
    let mut cheap: Vec<usize> = (0..l).filter(|&i| r[i] <= c).collect();
    cheap.sort_by_key(|&i| r[i]);
    cheap.truncate(2 * c + 4);
    for &a in &cheap {
        for &b in &cheap {
            let d = (b + l - a) % l;
            if d != 0 && r[a] < d && d + r[b] < l && r[a] + r[b] <= c {
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod connectivity_tests {
    use super::*;

    /// Every way of removing up to c of the survivors, by brute force: the graph's own edges.
    fn brute(positions: &[usize], n: usize, k: usize, c: usize, odd_edges: bool) -> bool {
        let l = positions.len();
        let w = k / 2;
        let adj = |a: usize, b: usize| {
            let d = (a + n - b) % n;
            let d = d.min(n - d);
            (d >= 1 && d <= w) || (odd_edges && k % 2 == 1 && d == n / 2)
        };
        let connected = |keep: &[usize]| -> bool {
            if keep.len() <= 1 {
                return true;
            }
            let mut seen = vec![false; keep.len()];
            let mut stack = vec![0];
            seen[0] = true;
            while let Some(i) = stack.pop() {
                for j in 0..keep.len() {
                    if !seen[j] && adj(keep[i], keep[j]) {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
            seen.iter().all(|&s| s)
        };
        // subsets of at most c removals
        let mut ok = true;
        let mut idx: Vec<usize> = Vec::new();
        fn rec(
            start: usize,
            left: usize,
            idx: &mut Vec<usize>,
            positions: &[usize],
            ok: &mut bool,
            connected: &dyn Fn(&[usize]) -> bool,
        ) {
            let keep: Vec<usize> = positions
                .iter()
                .enumerate()
                .filter(|(i, _)| !idx.contains(i))
                .map(|(_, &p)| p)
                .collect();
            if !connected(&keep) {
                *ok = false;
                return;
            }
            if left == 0 {
                return;
            }
            for i in start..positions.len() {
                idx.push(i);
                rec(i + 1, left - 1, idx, positions, ok, connected);
                idx.pop();
                if !*ok {
                    return;
                }
            }
        }
        rec(0, c.min(l), &mut idx, positions, &mut ok, &connected);
        ok
    }

    #[test]
    fn the_check_agrees_with_brute_force_and_never_passes_a_split() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(4);
        let mut splits = 0;
        for case in 0..3000 {
            // small rings against every removal set; larger ones with c up to k − 1 (the
            // brute force grows as L^c, so those keep few survivors)
            let n = if case % 3 == 0 {
                rng.random_range(30..120usize)
            } else {
                rng.random_range(6..40usize)
            };
            let mut k = rng.random_range(2..(n - 2).min(12));
            if k % 2 == 1 && n % 2 == 1 {
                // as `SecAggParams::k`: an odd k needs an even n
                k += 1;
            }
            let c = if case % 3 == 0 {
                rng.random_range(0..k.clamp(1, 4))
            } else {
                rng.random_range(0..3usize)
            };
            let keep = if case % 3 == 0 {
                rng.random_range(0.05..0.25f64)
            } else {
                rng.random_range(0.3..1.0f64)
            };
            let positions: Vec<usize> = (0..n).filter(|_| rng.random::<f64>() < keep).collect();
            let got = survivors_stay_connected(&positions, n, k, c);
            if c == 0 {
                assert_eq!(
                    got,
                    brute(&positions, n, k, 0, true),
                    "{positions:?} n {n} k {k}"
                );
            } else if got {
                // sufficient: whatever it passes stays connected
                assert!(
                    brute(&positions, n, k, c, true),
                    "{positions:?} n {n} k {k} c {c}"
                );
            }
            if k % 2 == 0 && c > 0 {
                // exact for even k
                assert_eq!(
                    got,
                    brute(&positions, n, k, c, false),
                    "{positions:?} n {n} k {k} c {c}"
                );
            }
            splits += usize::from(!got);
        }
        assert!(splits > 300, "{splits}");
    }
}
