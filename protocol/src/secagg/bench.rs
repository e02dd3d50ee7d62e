//! The secure-aggregation benchmark behind `fedlora bench secagg`: one whole round of n clients
//! and the coordinator's stage machine in one process (no network), timed by phase.
//!
//! Client phases (medians over the clients that finish):
//! - `keys`: fresh X25519 keys and a nonce, signed ([`ClientRound::advertise`]);
//! - `shares`: checking its roster view (own proof, k neighbours' proofs and signatures) and
//!   Shamir-sharing and sealing its two secrets ([`ClientRound::share_keys`]);
//! - `mask`: the masked input in one pass, bit-packed for the wire;
//! - `unmask`: signing the survivor view, then checking t neighbours' signatures and answering.
//!
//! Coordinator phases (totals):
//! - `setup`: collecting keys, the roster's Merkle tree and graph, each client's roster view,
//!   routing the shares;
//! - `sum`: unpacking each masked input and adding it into the running sum;
//! - `unmask`: the survivor view, the signatures, the answers, rebuilding secrets and removing
//!   every mask (on `coordinator_threads` threads).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use rand::{RngExt, SeedableRng};
use serde::Serialize;

use super::crypto::{EcdsaP256Signer, P256Verifier};
use super::{add_mod, ClientRound, SecAggError, SecAggParams, SecAggPolicy, ServerRound};
use crate::codec::bits;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Clients in the round (n).
    pub clients: usize,
    /// Values per input vector.
    pub params: usize,
    /// Share of clients that drop after sharing keys, before their masked input.
    pub dropout: f64,
    /// Neighbours per client (k; 0: everyone).
    pub neighbours: usize,
    /// Shamir threshold t.
    pub threshold: usize,
    /// Modulus bits m of the inputs.
    pub modulus_bits: u32,
    /// Threads that remove the masks on the coordinator.
    pub coordinator_threads: usize,
    /// Seed of the inputs and the clients' randomness (a benchmark, not a deployment).
    pub seed: u64,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            clients: 100,
            params: 1_000_000,
            dropout: 0.1,
            neighbours: 3,
            threshold: 2,
            modulus_bits: 16,
            coordinator_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            seed: 7,
        }
    }
}

/// Per-client medians, milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct ClientPhases {
    /// Keys made and signed.
    pub keys_ms: f64,
    /// Roster view checked, secrets shared.
    pub shares_ms: f64,
    /// Masked input computed and bit-packed.
    pub mask_ms: f64,
    /// Survivor view signed; unmask request checked and answered.
    pub unmask_ms: f64,
    /// The four phases.
    pub total_ms: f64,
}

/// Coordinator totals, milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct CoordinatorPhases {
    /// Keys, roster, graph, views, share routing.
    pub setup_ms: f64,
    /// Unpacking and summing the masked inputs.
    pub sum_ms: f64,
    /// Survivor view, signatures, secret reconstruction, mask removal.
    pub unmask_ms: f64,
    /// The three phases.
    pub total_ms: f64,
    /// Threads that removed the masks.
    pub threads: usize,
}

/// What one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Clients in the round.
    pub clients: usize,
    /// Values per input.
    pub params: usize,
    /// Share of clients dropped after sharing keys.
    pub dropout: f64,
    /// Effective neighbours per client.
    pub neighbours: usize,
    /// Shamir threshold.
    pub threshold: usize,
    /// Modulus bits.
    pub modulus_bits: u32,
    /// Per-client phases.
    pub client: ClientPhases,
    /// Coordinator phases.
    pub coordinator: CoordinatorPhases,
    /// Median bytes a surviving client sends (keys, shares, packed input, signature, answer).
    pub bytes_per_client: f64,
    /// Clients whose inputs the sum counts.
    pub counted: usize,
    /// Whether the unmasked sum equals the plaintext sum of the counted inputs, bit for bit.
    pub exact: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn config(m: impl Into<String>) -> SecAggError {
    SecAggError::Config(m.into())
}

/// Runs one secure round as configured.
pub fn run(cfg: &BenchConfig) -> Result<BenchReport, SecAggError> {
    let p = SecAggParams {
        threshold: cfg.threshold,
        neighbours: cfg.neighbours,
        modulus_bits: cfg.modulus_bits,
        collusion: 0,
        stage_timeout_ms: 1_000,
    };
    let n = cfg.clients;
    if n < 2 {
        return Err(config(format!("at least 2 clients, not {n}")));
    }
    p.validate(n)?;
    let len = cfg.params;
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(cfg.seed);
    let sysrng = ring::rand::SystemRandom::new();
    let policy = SecAggPolicy {
        min_neighbours: 0,
        min_survivors: 0,
        required: true,
        min_collusion: 0,
    };
    let mut table = BTreeMap::new();
    let mut parties = Vec::with_capacity(n);
    let width = (n - 1).to_string().len();
    for i in 0..n {
        let id = format!("client-{i:0width$}");
        let pk = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &sysrng,
        )
        .map_err(|_| config("key generation failed"))?;
        let signer = EcdsaP256Signer::from_pkcs8(pk.as_ref())?;
        table.insert(id.clone(), signer.public_key());
        let round = ClientRound::new(1, &id, p.clone(), policy, &mut rng);
        parties.push((id, round, signer));
    }
    let verifier = P256Verifier(table);
    let ids: BTreeSet<String> = parties.iter().map(|c| c.0.clone()).collect();
    let mut server = ServerRound::new(1, p.clone(), len, ids).with_threads(cfg.coordinator_threads);
    let (mut setup, mut sum_t, mut unmask_t) = (0f64, 0f64, 0f64);
    let mut keys_s = vec![0f64; n];
    let mut shares_s = vec![0f64; n];
    let mut mask_s = vec![0f64; n];
    let mut unmask_s = vec![0f64; n];
    let mut bytes = vec![0usize; n];
    for (i, (id, r, s)) in parties.iter_mut().enumerate() {
        let t0 = Instant::now();
        let k = r.advertise(s)?;
        keys_s[i] += t0.elapsed().as_secs_f64();
        bytes[i] += 96 + k.signature.len() + id.len();
        let t0 = Instant::now();
        server.receive_keys(id, k)?;
        setup += t0.elapsed().as_secs_f64();
    }
    let t0 = Instant::now();
    server.close_keys()?;
    setup += t0.elapsed().as_secs_f64();
    for (i, (id, r, _)) in parties.iter_mut().enumerate() {
        let t0 = Instant::now();
        let view = server
            .roster_view(id)
            .ok_or_else(|| config("client left out of the roster"))?;
        setup += t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let shares = r.share_keys(&view, &verifier, &mut rng)?;
        shares_s[i] += t0.elapsed().as_secs_f64();
        bytes[i] += shares
            .iter()
            .map(|s| s.ciphertext.len() + 2 * id.len())
            .sum::<usize>();
        let t0 = Instant::now();
        server.receive_shares(id, shares)?;
        setup += t0.elapsed().as_secs_f64();
    }
    let t0 = Instant::now();
    let deliveries = server.close_shares()?;
    setup += t0.elapsed().as_secs_f64();
    let dropped = place_dropouts(&server, &parties, cfg)?;
    let mask = super::modulus_mask(cfg.modulus_bits);
    let mut plain = vec![0u64; len];
    for (i, (id, r, s)) in parties.iter_mut().enumerate() {
        if dropped.contains(&i) {
            continue;
        }
        let x: Vec<u64> = (0..len).map(|_| rng.random::<u64>() & mask).collect();
        add_mod(&mut plain, &x, cfg.modulus_bits);
        let t0 = Instant::now();
        let y = r.masked_input(&deliveries[id.as_str()], &x)?;
        let mut packed = Vec::new();
        bits::pack(y, cfg.modulus_bits, &mut packed);
        let statement = r.mask_statement(s)?;
        mask_s[i] += t0.elapsed().as_secs_f64();
        bytes[i] += packed.len() + statement.signature.len() + 16 * statement.masked_with.len();
        let t0 = Instant::now();
        let y = bits::unpack(&packed, len, cfg.modulus_bits)
            .ok_or_else(|| config("masked input of the wrong length"))?;
        server.receive_input(id, y, statement)?;
        sum_t += t0.elapsed().as_secs_f64();
    }
    let t0 = Instant::now();
    let view = server.close_inputs()?;
    unmask_t += t0.elapsed().as_secs_f64();
    for (i, (id, r, s)) in parties.iter_mut().enumerate() {
        if dropped.contains(&i) {
            continue;
        }
        let t0 = Instant::now();
        let sig = r.consistency(&view, s)?;
        unmask_s[i] += t0.elapsed().as_secs_f64();
        bytes[i] += sig.len();
        let t0 = Instant::now();
        server.receive_consistency(id, sig)?;
        unmask_t += t0.elapsed().as_secs_f64();
    }
    let t0 = Instant::now();
    let req = server.close_consistency()?;
    unmask_t += t0.elapsed().as_secs_f64();
    for (i, (id, r, _)) in parties.iter_mut().enumerate() {
        if dropped.contains(&i) {
            continue;
        }
        let t0 = Instant::now();
        let sigs = server.signatures_for(id);
        unmask_t += t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let statements = server.statements_for(id);
        let resp = r.unmask(&req, &sigs, &statements, &verifier)?;
        unmask_s[i] += t0.elapsed().as_secs_f64();
        bytes[i] += resp
            .seed_shares
            .values()
            .chain(resp.key_shares.values())
            .map(|v| v.len() + 16)
            .sum::<usize>();
        let t0 = Instant::now();
        server.receive_unmask(resp)?;
        unmask_t += t0.elapsed().as_secs_f64();
    }
    let t0 = Instant::now();
    let (sum, counted) = server.finish()?;
    unmask_t += t0.elapsed().as_secs_f64();
    let alive: Vec<usize> = (0..n).filter(|i| !dropped.contains(i)).collect();
    let med = |v: &[f64]| median(alive.iter().map(|&i| v[i] * 1e3).collect());
    let total: Vec<f64> = (0..n)
        .map(|i| keys_s[i] + shares_s[i] + mask_s[i] + unmask_s[i])
        .collect();
    Ok(BenchReport {
        clients: n,
        params: len,
        dropout: cfg.dropout,
        neighbours: p.k(n),
        threshold: cfg.threshold,
        modulus_bits: cfg.modulus_bits,
        client: ClientPhases {
            keys_ms: med(&keys_s),
            shares_ms: med(&shares_s),
            mask_ms: med(&mask_s),
            unmask_ms: med(&unmask_s),
            total_ms: med(&total),
        },
        coordinator: CoordinatorPhases {
            setup_ms: setup * 1e3,
            sum_ms: sum_t * 1e3,
            unmask_ms: unmask_t * 1e3,
            total_ms: (setup + sum_t + unmask_t) * 1e3,
            threads: cfg.coordinator_threads,
        },
        bytes_per_client: median(alive.iter().map(|&i| bytes[i] as f64).collect()),
        counted: counted.len(),
        exact: sum == plain,
    })
}

/// Picks `dropout · n` clients to drop after sharing keys so that every client keeps at least
/// t live neighbours (its secret can then be rebuilt): greedy, O(k) per candidate.
fn place_dropouts(
    server: &ServerRound,
    parties: &[(String, ClientRound, EcdsaP256Signer)],
    cfg: &BenchConfig,
) -> Result<BTreeSet<usize>, SecAggError> {
    let n = parties.len();
    let want = (n as f64 * cfg.dropout).round() as usize;
    let index: BTreeMap<&str, usize> = parties
        .iter()
        .enumerate()
        .map(|(i, c)| (c.0.as_str(), i))
        .collect();
    let nb: Vec<Vec<usize>> = parties
        .iter()
        .map(|c| {
            server
                .neighbours(&c.0)
                .map(|s| s.iter().map(|v| index[v.as_str()]).collect())
                .unwrap_or_default()
        })
        .collect();
    let mut live: Vec<usize> = nb.iter().map(Vec::len).collect();
    let mut dropped = BTreeSet::new();
    for c in 0..n {
        if dropped.len() == want {
            break;
        }
        if live[c] >= cfg.threshold && nb[c].iter().all(|&v| live[v] > cfg.threshold) {
            dropped.insert(c);
            for &v in &nb[c] {
                live[v] -= 1;
            }
        }
    }
    if dropped.len() < want {
        return Err(config(format!(
            "cannot place {want} dropouts keeping {} live neighbours around everyone",
            cfg.threshold
        )));
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_bench_round_sums_exactly_with_dropouts() {
        let r = run(&BenchConfig {
            clients: 40,
            params: 1000,
            neighbours: 8,
            threshold: 5,
            dropout: 0.1,
            coordinator_threads: 2,
            ..Default::default()
        })
        .unwrap();
        assert!(r.exact);
        assert_eq!(r.counted, 36);
        assert_eq!(r.neighbours, 8);
    }
}
