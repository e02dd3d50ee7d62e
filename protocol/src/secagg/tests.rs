//! Sans-IO tests of secure aggregation with scripted clients and dropouts at every stage.

use std::collections::{BTreeMap, BTreeSet};

use rand::{RngExt, SeedableRng};

use super::crypto::{EcdsaP256Signer, P256Verifier};
use super::*;

struct Party {
    id: String,
    round: ClientRound,
    signer: EcdsaP256Signer,
    x: Vec<u64>,
}

/// A fresh ECDSA P-256 signing key (also used by the plan-signature tests).
pub(crate) fn signer() -> EcdsaP256Signer {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &rng,
    )
    .unwrap();
    EcdsaP256Signer::from_pkcs8(pkcs8.as_ref()).unwrap()
}

/// An unsigned, empty mask statement (for inputs refused before it is looked at).
fn no_statement() -> MaskStatement {
    MaskStatement {
        masked_with: Vec::new(),
        min_survivors: 0,
        signature: Vec::new(),
    }
}

fn params(t: usize, k: usize) -> SecAggParams {
    SecAggParams {
        threshold: t,
        neighbours: k,
        modulus_bits: 20,
        collusion: 0,
        stage_timeout_ms: 1_000,
    }
}

fn parties(n: usize, p: &SecAggParams, len: usize, seed: u64) -> (Vec<Party>, P256Verifier) {
    parties_with(n, p, len, seed, SecAggPolicy::default())
}

fn parties_with(
    n: usize,
    p: &SecAggParams,
    len: usize,
    seed: u64,
    policy: SecAggPolicy,
) -> (Vec<Party>, P256Verifier) {
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(seed);
    let mut table = BTreeMap::new();
    let ps = (0..n)
        .map(|i| {
            let id = format!("client-{i:02}");
            let s = signer();
            table.insert(id.clone(), s.public_key());
            let x = (0..len)
                .map(|_| rng.random::<u64>() & ((1 << p.modulus_bits) - 1))
                .collect();
            Party {
                round: ClientRound::new(7, &id, p.clone(), policy, &mut rng),
                id,
                signer: s,
                x,
            }
        })
        .collect();
    (ps, P256Verifier(table))
}

/// Which clients drop where (and which answer the unmask request with garbage shares).
#[derive(Default)]
struct Drops {
    before_sharing: BTreeSet<String>,
    before_input: BTreeSet<String>,
    before_unmask: BTreeSet<String>,
    /// Sent their input, then went away before signing the survivor view.
    before_signing: BTreeSet<String>,
    garbage_shares: BTreeSet<String>,
}

/// Every share in `r` replaced by a well-formed share of something else (the x coordinate
/// kept, every value byte flipped).
fn garbage(r: &mut UnmaskResponse) {
    for s in r.seed_shares.values_mut().chain(r.key_shares.values_mut()) {
        for b in s.iter_mut().skip(1) {
            *b ^= 0x5a;
        }
    }
}

fn pick(ps: &[Party], frac: f64, offset: usize) -> BTreeSet<String> {
    let n = ps.len();
    let count = (n as f64 * frac).round() as usize;
    // spread over the ring so every neighbourhood keeps survivors
    (0..count)
        .map(|j| ps[(offset + j * n / count.max(1)) % n].id.clone())
        .collect()
}

/// (unmasked sum, counted clients, plaintext sum of the counted inputs).
type Outcome = (Vec<u64>, BTreeSet<String>, Vec<u64>);

/// Runs a whole secure round.
fn run(
    mut ps: Vec<Party>,
    verifier: &P256Verifier,
    p: &SecAggParams,
    drops: &Drops,
) -> Result<Outcome, SecAggError> {
    let len = ps[0].x.len();
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(99);
    let ids: BTreeSet<String> = ps.iter().map(|c| c.id.clone()).collect();
    let mut server = ServerRound::new(7, p.clone(), len, ids);
    for c in ps.iter_mut() {
        let k = c.round.advertise(&c.signer)?;
        server.receive_keys(&c.id, k)?;
    }
    server.close_keys()?;
    for c in ps
        .iter_mut()
        .filter(|c| !drops.before_sharing.contains(&c.id))
    {
        let view = server.roster_view(&c.id).expect("in the roster");
        let shares = c.round.share_keys(&view, verifier, &mut rng)?;
        server.receive_shares(&c.id, shares)?;
    }
    let deliveries = server.close_shares()?;
    let u3: Vec<usize> = (0..ps.len())
        .filter(|&i| {
            !drops.before_sharing.contains(&ps[i].id) && !drops.before_input.contains(&ps[i].id)
        })
        .collect();
    for &i in &u3 {
        let c = &mut ps[i];
        let y = c.round.masked_input(&deliveries[&c.id], &c.x)?;
        let st = c.round.mask_statement(&c.signer)?;
        server.receive_input(&c.id, y, st)?;
    }
    let view = server.close_inputs()?;
    for &i in &u3 {
        let c = &mut ps[i];
        if drops.before_signing.contains(&c.id) {
            continue;
        }
        let sig = c.round.consistency(&view, &c.signer)?;
        server.receive_consistency(&c.id, sig)?;
    }
    let req = server.close_consistency()?;
    for &i in &u3 {
        let c = &mut ps[i];
        if drops.before_unmask.contains(&c.id) || drops.before_signing.contains(&c.id) {
            continue;
        }
        let mut r = c.round.unmask(
            &req,
            &server.signatures_for(&c.id),
            &server.statements_for(&c.id),
            verifier,
        )?;
        if drops.garbage_shares.contains(&c.id) {
            garbage(&mut r);
        }
        server.receive_unmask(r)?;
    }
    let (sum, counted) = server.finish()?;
    let mut plain = vec![0u64; len];
    for &i in &u3 {
        add_mod(&mut plain, &ps[i].x, p.modulus_bits);
    }
    Ok((sum, counted, plain))
}

/// Survivors that answer the unmask request with garbage shares (of seeds and of a dropped
/// client's key) are detected against the owners' commitments and other shares are used: the
/// sum stays exact. With too few honest shares left the round fails naming the owner and the
/// answering clients, never with a wrong sum.
#[test]
fn garbage_unmask_shares_are_detected_and_the_sum_stays_exact_or_the_round_fails() {
    let p = params(5, 7);
    let ids = |ps: &[Party], is: &[usize]| -> BTreeSet<String> {
        is.iter().map(|&i| ps[i].id.clone()).collect()
    };
    // one liar with a dropout (a dropped client's key is recovered too), two without
    for (liars, dropped) in [(&[2usize][..], &[4usize][..]), (&[2, 6][..], &[][..])] {
        let (ps, v) = parties(8, &p, 40, 11);
        let drops = Drops {
            before_input: ids(&ps, dropped),
            garbage_shares: ids(&ps, liars),
            ..Default::default()
        };
        let (sum, counted, plain) = run(ps, &v, &p, &drops).unwrap();
        assert_eq!(counted.len(), 8 - dropped.len());
        assert_eq!(sum, plain, "liars {liars:?}: the sum is exact");
    }
    // three liars of seven answers leave four honest shares, below t = 5
    let (ps, v) = parties(8, &p, 40, 12);
    let drops = Drops {
        garbage_shares: ids(&ps, &[1, 3, 5]),
        ..Default::default()
    };
    match run(ps, &v, &p, &drops) {
        Err(SecAggError::PeerMisbehaved(m)) => {
            assert!(
                m.contains("committed to") && m.contains("answered by"),
                "{m}"
            )
        }
        other => panic!(
            "expected a failure naming the owner, got {:?}",
            other.map(|o| o.1)
        ),
    }
}

#[test]
fn exact_sum_with_dropouts_at_every_stage() {
    for (n, t) in [(10usize, 5usize), (50, 25)] {
        let p = params(t, 0);
        for frac in [0.0, 0.1, 0.3] {
            for stage in 0..3 {
                let (ps, v) = parties(n, &p, 16, n as u64 * 7 + stage);
                let set = pick(&ps, frac, stage as usize);
                let mut d = Drops::default();
                match stage {
                    0 => d.before_sharing = set.clone(),
                    1 => d.before_input = set.clone(),
                    _ => d.before_unmask = set.clone(),
                }
                let (sum, counted, plain) = run(ps, &v, &p, &d).unwrap();
                assert_eq!(sum, plain, "n {n}, {frac} dropped at stage {stage}");
                let expect_counted = if stage == 2 { n } else { n - set.len() };
                assert_eq!(counted.len(), expect_counted);
            }
        }
    }
}

#[test]
fn sparse_neighbourhoods_with_dropouts_sum_exactly() {
    let p = params(8, 14);
    let (ps, v) = parties(50, &p, 16, 5);
    let d = Drops {
        before_sharing: pick(&ps, 0.04, 0),
        before_input: pick(&ps, 0.06, 3),
        before_unmask: pick(&ps, 0.04, 7),
        ..Default::default()
    };
    let (sum, counted, plain) = run(ps, &v, &p, &d).unwrap();
    assert_eq!(sum, plain);
    assert_eq!(counted.len(), 50 - 2 - 3);
}

#[test]
fn a_neighbourhood_below_threshold_fails_instead_of_a_wrong_sum() {
    let p = params(8, 0);
    let (ps, v) = parties(10, &p, 8, 1);
    let d = Drops {
        before_input: pick(&ps, 0.3, 0),
        ..Default::default()
    };
    let err = run(ps, &v, &p, &d).unwrap_err();
    assert!(matches!(err, SecAggError::Threshold(_)), "{err}");
    // too many unmask responses missing: the secret cannot be rebuilt
    let p = params(6, 0);
    let (ps, v) = parties(10, &p, 8, 2);
    let d = Drops {
        before_unmask: pick(&ps, 0.5, 0),
        ..Default::default()
    };
    let err = run(ps, &v, &p, &d).unwrap_err();
    assert!(matches!(err, SecAggError::Threshold(_)), "{err}");
}

#[test]
fn out_of_order_and_repeated_messages_are_refused() {
    let p = params(2, 0);
    let (mut ps, v) = parties(4, &p, 4, 3);
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(1);
    // a client cannot send an input before sharing keys
    let x = ps[0].x.clone();
    assert!(matches!(
        ps[0].round.masked_input(&[], &x),
        Err(SecAggError::OutOfOrder(_))
    ));
    let ids = ps.iter().map(|c| c.id.clone()).collect();
    let mut server = ServerRound::new(7, p.clone(), 4, ids);
    let c0 = &mut ps[0];
    let k0 = c0.round.advertise(&c0.signer).unwrap();
    assert!(matches!(
        c0.round.advertise(&c0.signer),
        Err(SecAggError::OutOfOrder(_))
    ));
    server.receive_keys(&ps[0].id, k0.clone()).unwrap();
    assert!(server.receive_keys(&ps[0].id, k0).is_err(), "twice");
    assert!(matches!(
        server.receive_input(&ps[0].id, vec![0; 4], no_statement()),
        Err(SecAggError::OutOfOrder(_))
    ));
    for c in ps.iter_mut().skip(1) {
        let k = c.round.advertise(&c.signer).unwrap();
        server.receive_keys(&c.id, k).unwrap();
    }
    server.close_keys().unwrap();
    let view0 = server.roster_view(&ps[0].id).unwrap();
    let s0 = ps[0].round.share_keys(&view0, &v, &mut rng).unwrap();
    server.receive_shares(&ps[0].id, s0.clone()).unwrap();
    assert!(server.receive_shares(&ps[0].id, s0).is_err(), "twice");
    assert!(matches!(server.finish(), Err(SecAggError::OutOfOrder(_))));
}

#[test]
fn a_swapped_unsigned_or_missing_key_and_an_altered_roster_are_refused() {
    let p = params(2, 3);
    let (mut ps, v) = parties(8, &p, 4, 4);
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(1);
    let server = advertised(&mut ps, &p);
    let names: Vec<String> = ps.iter().map(|c| c.id.clone()).collect();
    let honest = |i: usize| server.roster_view(&names[i]).unwrap();
    let mut tampered: Vec<(&str, RosterView)> = Vec::new();
    // the coordinator swaps a neighbour's mask key for one it controls (its proof then fails)
    let mut w = honest(0);
    w.neighbours[0].keys.s_pk = [9; 32];
    tampered.push(("swapped key", w));
    // ... or rebuilds the tree around the swapped key: the signature fails
    let mut w = honest(1);
    w.neighbours[1].keys.signature.clear();
    tampered.push(("unsigned key", w));
    // ... leaves a neighbour out, or relays a stranger in its place
    let mut w = honest(2);
    w.neighbours.pop();
    tampered.push(("missing neighbour", w));
    let mut w = honest(3);
    let stranger = (0..8)
        .flat_map(|i| honest(i).neighbours)
        .find(|nk| nk.keys.client != names[3] && !w.neighbours.contains(nk))
        .unwrap();
    w.neighbours[0] = stranger;
    tampered.push(("stranger", w));
    // ... alters this client's own keys in the tree, or the ids
    let mut w = honest(4);
    w.own_proof[0][0] ^= 1;
    tampered.push(("own keys", w));
    let mut w = honest(5);
    let mut ids = w.ids.to_vec();
    ids.swap(0, 1);
    w.ids = ids.into();
    tampered.push(("unsorted ids", w));
    let mut w = honest(6);
    w.ids = w
        .ids
        .iter()
        .filter(|id| **id != names[6])
        .cloned()
        .collect();
    tampered.push(("left out", w));
    for (i, (what, w)) in tampered.into_iter().enumerate() {
        let err = ps[i].round.share_keys(&w, &v, &mut rng).unwrap_err();
        assert!(
            matches!(err, SecAggError::PeerMisbehaved(_)),
            "{what}: {err}"
        );
    }
    // the honest view works
    assert!(ps[7].round.share_keys(&honest(7), &v, &mut rng).is_ok());
}

/// Every party advertises; the coordinator closes the key stage (views ready).
fn advertised(ps: &mut [Party], p: &SecAggParams) -> ServerRound {
    let ids: BTreeSet<String> = ps.iter().map(|c| c.id.clone()).collect();
    let mut server = ServerRound::new(7, p.clone(), ps[0].x.len(), ids);
    for c in ps.iter_mut() {
        let k = c.round.advertise(&c.signer).unwrap();
        server.receive_keys(&c.id, k).unwrap();
    }
    server.close_keys().unwrap();
    server
}

/// The honest view of `me` built from the advertised keys without a coordinator (which would
/// refuse unsafe parameters before any client sees them).
fn hand_view(keys: &[AdvertisedKeys], me: &str, p: &SecAggParams) -> RosterView {
    let mut keys = keys.to_vec();
    keys.sort_by(|a, b| a.client.cmp(&b.client));
    let ids: Vec<String> = keys.iter().map(|k| k.client.clone()).collect();
    let tree = MerkleTree::new(keys.iter().map(|k| leaf_hash(7, k)).collect());
    let seed = graph_seed(7, &roster_hash(7, &ids, &tree.root()));
    let i = ids.iter().position(|id| id == me).unwrap();
    let g = Graph::new(ids.len(), p, &seed);
    RosterView {
        keys_root: tree.root(),
        graph_seed: seed,
        own_proof: tree.proof(i),
        neighbours: g
            .neighbours(i)
            .into_iter()
            .map(|j| NeighbourKeys {
                keys: keys[j].clone(),
                proof: tree.proof(j),
            })
            .collect(),
        ids: ids.into(),
    }
}

/// Parties that advertised and shared keys, with their masked inputs sent: the state in which
/// a coordinator asks for unmasking.
fn after_inputs(
    n: usize,
    p: &SecAggParams,
    seed: u64,
    policy: SecAggPolicy,
) -> (Vec<Party>, P256Verifier, UnmaskRequest) {
    let (mut ps, v) = parties_with(n, p, 4, seed, policy);
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(1);
    let ids: BTreeSet<String> = ps.iter().map(|c| c.id.clone()).collect();
    let mut server = ServerRound::new(7, p.clone(), 4, ids);
    for c in ps.iter_mut() {
        let k = c.round.advertise(&c.signer).unwrap();
        server.receive_keys(&c.id, k).unwrap();
    }
    server.close_keys().unwrap();
    for c in ps.iter_mut() {
        let view = server.roster_view(&c.id).unwrap();
        let s = c.round.share_keys(&view, &v, &mut rng).unwrap();
        server.receive_shares(&c.id, s).unwrap();
    }
    let del = server.close_shares().unwrap();
    for c in ps.iter_mut() {
        let y = c.round.masked_input(&del[&c.id], &c.x).unwrap();
        let st = c.round.mask_statement(&c.signer).unwrap();
        server.receive_input(&c.id, y, st).unwrap();
    }
    let view = server.close_inputs().unwrap();
    (ps, v, view)
}

#[test]
fn a_request_for_both_shares_of_one_peer_is_refused() {
    let p = params(2, 0);
    let (mut ps, _v, honest) = after_inputs(4, &p, 6, SecAggPolicy::default());
    let evil = UnmaskRequest {
        survivors: honest.survivors.clone(),
        dropped: [ps[1].id.clone()].into(),
    };
    let c = &mut ps[0];
    let err = c.round.consistency(&evil, &c.signer).unwrap_err();
    assert!(matches!(err, SecAggError::PeerMisbehaved(_)), "{err}");
    // a refused view ends the client's round: it signs nothing afterwards either
    assert!(c.round.consistency(&honest, &c.signer).is_err());
}

#[test]
fn inconsistent_survivor_views_reveal_no_share() {
    // The coordinator tells half of u's neighbours "u survived" and the other half "u dropped",
    // hoping for t shares of u's self-mask seed and t shares of u's mask key. Every client
    // signs its own view; signatures over the other view do not count, so nobody reaches t.
    let p = params(3, 0); // n = 6: k = 5, t = 3
    let (mut ps, v, honest) = after_inputs(6, &p, 11, SecAggPolicy::default());
    let u = ps[0].id.clone();
    let mut dropped_u = honest.clone();
    dropped_u.survivors.remove(&u);
    dropped_u.dropped.insert(u.clone());
    let view_of = |i: usize| {
        if i <= 2 {
            honest.clone()
        } else {
            dropped_u.clone()
        }
    };
    let mut sigs_a = BTreeMap::new();
    let mut sigs_b = BTreeMap::new();
    for (i, c) in ps.iter_mut().enumerate() {
        let sig = c.round.consistency(&view_of(i), &c.signer).unwrap();
        if i <= 2 {
            sigs_a.insert(c.id.clone(), sig)
        } else {
            sigs_b.insert(c.id.clone(), sig)
        };
    }
    // it relays every signature it has, whatever view it was over
    let mut all = sigs_a.clone();
    all.extend(sigs_b.clone());
    for (i, c) in ps.iter_mut().enumerate() {
        let err = c
            .round
            .unmask(&view_of(i), &all, &BTreeMap::new(), &v)
            .unwrap_err();
        assert!(
            matches!(err, SecAggError::Threshold(_)),
            "client {i}: {err}"
        );
    }
    // and a client never answers for a view it did not sign
    let (mut ps, v, honest) = after_inputs(6, &p, 12, SecAggPolicy::default());
    let mut sigs = BTreeMap::new();
    for c in ps.iter_mut() {
        sigs.insert(
            c.id.clone(),
            c.round.consistency(&honest, &c.signer).unwrap(),
        );
    }
    let mut other = honest.clone();
    other.survivors.remove(&ps[5].id);
    other.dropped.insert(ps[5].id.clone());
    let err = ps[1]
        .round
        .unmask(&other, &sigs, &BTreeMap::new(), &v)
        .unwrap_err();
    assert!(matches!(err, SecAggError::PeerMisbehaved(_)), "{err}");
    // one answer per round: the honest request after a refused one gets nothing
    assert!(ps[1]
        .round
        .unmask(&honest, &sigs, &BTreeMap::new(), &v)
        .is_err());
    // the others answer the honest view once, and only once
    assert!(ps[2]
        .round
        .unmask(&honest, &sigs, &BTreeMap::new(), &v)
        .is_ok());
    assert!(matches!(
        ps[2].round.unmask(&honest, &sigs, &BTreeMap::new(), &v),
        Err(SecAggError::OutOfOrder(_))
    ));
}

#[test]
fn a_graph_seed_chosen_by_the_coordinator_is_refused() {
    let p = params(2, 3);
    let (mut ps, v) = parties(6, &p, 4, 13);
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(1);
    let server = advertised(&mut ps, &p);
    for c in ps.iter_mut() {
        let honest = server.roster_view(&c.id).unwrap();
        let mut chosen = honest.clone();
        chosen.graph_seed[0] ^= 1;
        let err = c.round.share_keys(&chosen, &v, &mut rng).unwrap_err();
        assert!(matches!(err, SecAggError::PeerMisbehaved(_)), "{err}");
        // no second chance with the right seed: the round is over for this client
        assert!(c.round.share_keys(&honest, &v, &mut rng).is_err());
    }
}

#[test]
fn thresholds_at_or_below_half_and_small_neighbourhoods_are_refused_by_clients() {
    // t = 1, t = k/2, and k = 2 < the default minimum of 3: no client shares anything
    for (n, t, k) in [(4usize, 1usize, 0usize), (5, 2, 0), (7, 2, 4), (3, 2, 0)] {
        let p = params(t, k);
        let (mut ps, v) = parties(n, &p, 4, 14);
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(1);
        // the coordinator's own checks would refuse these parameters: build the views by hand
        let keys: Vec<AdvertisedKeys> = ps
            .iter_mut()
            .map(|c| c.round.advertise(&c.signer).unwrap())
            .collect();
        for c in ps.iter_mut() {
            let view = hand_view(&keys, &c.id, &p);
            let err = c.round.share_keys(&view, &v, &mut rng).unwrap_err();
            assert!(
                matches!(err, SecAggError::Config(_)),
                "n {n} t {t} k {k}: {err}"
            );
        }
    }
    // k = 3 with t = 2 works
    let p = params(2, 3);
    let (ps, v) = parties(6, &p, 8, 15);
    let (sum, _, plain) = run(ps, &v, &p, &Drops::default()).unwrap();
    assert_eq!(sum, plain);
}

#[test]
fn a_view_with_too_few_survivors_or_strangers_is_not_signed() {
    let p = params(2, 0);
    let policy = SecAggPolicy {
        min_survivors: 5,
        ..Default::default()
    };
    let (mut ps, _v, honest) = after_inputs(4, &p, 16, policy);
    let c = &mut ps[0];
    let err = c.round.consistency(&honest, &c.signer).unwrap_err();
    assert!(matches!(err, SecAggError::Threshold(_)), "{err}");
    // a view naming a client outside the roster is refused
    let (mut ps, _v, honest) = after_inputs(4, &p, 17, SecAggPolicy::default());
    let mut bogus = honest.clone();
    bogus.dropped.insert("mallory".into());
    let c = &mut ps[0];
    let err = c.round.consistency(&bogus, &c.signer).unwrap_err();
    assert!(matches!(err, SecAggError::PeerMisbehaved(_)), "{err}");
}

#[test]
fn masked_values_look_uniform() {
    // a check of the implementation, not a proof: one client's masked input of all zeros,
    // bucketed by its top 4 bits, passes a χ² test against uniform (15 dof, 0.1 % level)
    let p = SecAggParams {
        modulus_bits: 16,
        ..params(2, 0)
    };
    let (mut ps, v) = parties(4, &p, 16_000, 8);
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(1);
    let server = advertised(&mut ps, &p);
    let mut all = Vec::new();
    for c in ps.iter_mut() {
        let view = server.roster_view(&c.id).unwrap();
        all.extend(c.round.share_keys(&view, &v, &mut rng).unwrap());
    }
    let mine: Vec<EncryptedShare> = all.into_iter().filter(|s| s.to == ps[0].id).collect();
    let y = ps[0].round.masked_input(&mine, &vec![0; 16_000]).unwrap();
    let mut buckets = [0f64; 16];
    for v in &y {
        buckets[(v >> 12) as usize] += 1.0;
    }
    let e = 16_000.0 / 16.0;
    let chi2: f64 = buckets.iter().map(|o| (o - e) * (o - e) / e).sum();
    assert!(chi2 < 37.7, "χ² = {chi2}");
}

#[test]
fn prg_is_the_chacha20_keystream() {
    // RFC 8439 §2.4.2-style check: the keystream of key 0, nonce 0 starts 76 b8 e0 ad …
    let v = crypto::prg(&[0; 32], 2, 64);
    assert_eq!(v[0].to_le_bytes()[..4], [0x76, 0xb8, 0xe0, 0xad]);
}

#[test]
fn neighbour_graphs_are_k_regular_and_symmetric() {
    for (n, k) in [(100usize, 3usize), (100, 14), (51, 3), (10, 0)] {
        let p = params(2, k);
        let ids: BTreeSet<String> = (0..n).map(|i| format!("c{i}")).collect();
        let g = neighbour_graph(&ids, &p, &[3; 32]);
        let kk = p.k(n);
        for (u, nb) in &g {
            assert_eq!(nb.len(), kk, "n {n} k {k}");
            assert!(!nb.contains(u));
            for v in nb {
                assert!(g[v].contains(u), "symmetric");
            }
        }
    }
    let mut y = vec![5u64; 10];
    crypto::prg_apply(&[1; 32], &mut y, 12, true);
    let mut expect = vec![5u64; 10];
    add_mod(&mut expect, &crypto::prg(&[1; 32], 10, 12), 12);
    assert_eq!(y, expect);
}

#[test]
fn one_pass_masking_equals_applying_each_mask_alone_at_every_width_and_thread_count() {
    // lengths around the chunk (4,096) and the parallel threshold (65,536)
    for bits in [1u32, 8, 12, 16, 19, 20, 24, 32, 40, 48, 55, 62, 64] {
        let m = modulus_mask(bits);
        for len in [1usize, 4095, 4097, 70_001] {
            let x: Vec<u64> = (0..len as u64)
                .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) & m)
                .collect();
            let masks: Vec<crypto::Mask> = (0..4u8)
                .map(|i| crypto::Mask {
                    seed: [i + 1; 32],
                    add: i % 2 == 0,
                })
                .collect();
            let mut expect = x.clone();
            for k in &masks {
                let r = crypto::prg(&k.seed, len, bits);
                if k.add {
                    add_mod(&mut expect, &r, bits);
                } else {
                    crate::secagg::sub_mod(&mut expect, &r, bits);
                }
            }
            for threads in [1, 2, 3] {
                let mut y = x.clone();
                crypto::apply_masks(&mut y, &masks, bits, threads);
                assert_eq!(y, expect, "bits {bits}, len {len}, threads {threads}");
            }
        }
    }
}

#[test]
fn clients_shown_different_plans_reveal_no_share_and_a_raised_minimum_refuses_small_views() {
    // n = 6, k = 5, t = 3: half the clients are shown one privacy plan, half another (say, a
    // plan with less noise). Each signs the view bound to the plan it saw; the other half's
    // signatures do not verify, so nobody reaches t and no share leaves.
    let p = params(3, 0);
    let (mut ps, _, _) = after_inputs(6, &p, 21, SecAggPolicy::default());
    for (i, c) in ps.iter_mut().enumerate() {
        // binding is refused once the masked input is out
        assert!(matches!(
            c.round.bind([i as u8; 32], 1, 0),
            Err(SecAggError::OutOfOrder(_))
        ));
    }
    // bind before the masked input: parties made afresh
    let (mut ps, v2) = parties(6, &p, 4, 22);
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(2);
    let ids: BTreeSet<String> = ps.iter().map(|c| c.id.clone()).collect();
    let mut server = ServerRound::new(7, p.clone(), 4, ids);
    for c in ps.iter_mut() {
        let k = c.round.advertise(&c.signer).unwrap();
        server.receive_keys(&c.id, k).unwrap();
    }
    server.close_keys().unwrap();
    for c in ps.iter_mut() {
        let view = server.roster_view(&c.id).unwrap();
        let s = c.round.share_keys(&view, &v2, &mut rng).unwrap();
        server.receive_shares(&c.id, s).unwrap();
    }
    let del = server.close_shares().unwrap();
    for (i, c) in ps.iter_mut().enumerate() {
        let plan = if i < 3 { [1u8; 32] } else { [2u8; 32] };
        c.round.bind(plan, 6, 0).unwrap();
        let y = c.round.masked_input(&del[&c.id], &c.x).unwrap();
        let st = c.round.mask_statement(&c.signer).unwrap();
        server.receive_input(&c.id, y, st).unwrap();
    }
    let view = server.close_inputs().unwrap();
    let mut sigs = BTreeMap::new();
    for c in ps.iter_mut() {
        sigs.insert(c.id.clone(), c.round.consistency(&view, &c.signer).unwrap());
    }
    for (i, c) in ps.iter_mut().enumerate() {
        let err = c
            .round
            .unmask(&view, &sigs, &BTreeMap::new(), &v2)
            .unwrap_err();
        assert!(
            matches!(err, SecAggError::Threshold(_)),
            "client {i}: {err}"
        );
    }
    // a client that requires 6 survivors (a plan's min_clients) does not sign a view of 5
    let (mut fresh, v3) = parties(6, &p, 4, 24);
    let ids: BTreeSet<String> = fresh.iter().map(|c| c.id.clone()).collect();
    let mut server = ServerRound::new(7, p.clone(), 4, ids);
    for c in fresh.iter_mut() {
        let k = c.round.advertise(&c.signer).unwrap();
        server.receive_keys(&c.id, k).unwrap();
    }
    server.close_keys().unwrap();
    for c in fresh.iter_mut() {
        let view = server.roster_view(&c.id).unwrap();
        let s = c.round.share_keys(&view, &v3, &mut rng).unwrap();
        server.receive_shares(&c.id, s).unwrap();
    }
    let del = server.close_shares().unwrap();
    for c in fresh.iter_mut().take(5) {
        c.round.bind([3u8; 32], 6, 0).unwrap();
        let y = c.round.masked_input(&del[&c.id], &c.x).unwrap();
        let st = c.round.mask_statement(&c.signer).unwrap();
        server.receive_input(&c.id, y, st).unwrap();
    }
    let view = server.close_inputs().unwrap();
    assert_eq!(view.survivors.len(), 5);
    let c = &mut fresh[0];
    let err = c.round.consistency(&view, &c.signer).unwrap_err();
    assert!(matches!(err, SecAggError::Threshold(_)), "{err}");
}

/// A client refuses a round whose secure parameters do not cover the collusion they state
/// (2t ≤ k + c), and one whose collusion bound is below what the privacy plan assumed; and
/// neighbours shown different thresholds sign different views, so none unmasks for another.
#[test]
fn a_round_that_does_not_cover_its_collusion_is_refused_and_t_k_c_are_in_the_signed_view() {
    // the case the review found: k = 10, t = 6, c = 2 (2t = 12 = k + c)
    let weak = SecAggParams {
        collusion: 2,
        ..params(6, 10)
    };
    assert!(SecAggPolicy::default().check(&weak, 20).is_err());
    assert!(SecAggPolicy::default()
        .check(
            &SecAggParams {
                threshold: 7,
                ..weak.clone()
            },
            20
        )
        .is_ok());
    // a plan sized for 3 colluders over a round that tolerates 2
    let covered = SecAggParams {
        threshold: 7,
        ..weak.clone()
    };
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(5);
    let mut cr = ClientRound::new(7, "client-00", covered, SecAggPolicy::default(), &mut rng);
    assert!(matches!(
        cr.bind([0; 32], 2, 3),
        Err(SecAggError::Config(_))
    ));
    cr.bind([0; 32], 2, 2).unwrap();
    // the signed view covers t, k and c
    let req = UnmaskRequest {
        survivors: ["a".to_string(), "b".to_string()].into(),
        dropped: BTreeSet::new(),
    };
    let msg =
        |shape: RoundShape| consistency_message(7, &[1; 32], &[2; 32], &[3; 32], &shape, &req);
    let base = RoundShape::of(&params(3, 4), 5);
    assert_ne!(
        msg(base),
        msg(RoundShape {
            threshold: 4,
            ..base
        })
    );
    assert_ne!(
        msg(base),
        msg(RoundShape {
            neighbours: 2,
            ..base
        })
    );
    assert_ne!(
        msg(base),
        msg(RoundShape {
            collusion: 1,
            ..base
        })
    );
}

/// A complete-graph round with t = 0 takes the smallest t with 2t > k + c for its actual
/// size, so rounds larger or smaller than planned (Poisson sampling) sum exactly.
#[test]
fn an_automatic_threshold_follows_the_rounds_actual_size() {
    let p = SecAggParams {
        collusion: 1,
        ..params(0, 0)
    };
    for n in [5usize, 9, 13] {
        let (ps, v) = parties(n, &p, 30, n as u64);
        let drops = Drops {
            before_input: std::iter::once(ps[1].id.clone()).collect(),
            ..Default::default()
        };
        let (sum, counted, plain) = run(ps, &v, &p, &drops).unwrap();
        assert_eq!(counted.len(), n - 1);
        assert_eq!(sum, plain, "n {n}");
        assert_eq!(p.t(n), n / 2 + 1);
    }
}

/// The secure parameters a client-level DP plan signs are the ones the round must run with: a
/// client refuses keys advertised under other ones (say, a lower threshold).
#[test]
fn a_round_run_with_other_parameters_than_the_signed_plans_is_refused() {
    let signed = SecAggParams {
        collusion: 1,
        ..params(4, 6)
    };
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(9);
    let same = ClientRound::new(
        7,
        "client-00",
        signed.clone(),
        SecAggPolicy::default(),
        &mut rng,
    );
    same.require_params(&signed).unwrap();
    let lower = SecAggParams {
        threshold: 3,
        collusion: 0,
        ..signed.clone()
    };
    let other = ClientRound::new(7, "client-00", lower, SecAggPolicy::default(), &mut rng);
    assert!(matches!(
        other.require_params(&signed),
        Err(SecAggError::PeerMisbehaved(_))
    ));
}

/// A shortest-walk cycle of the neighbour graph through `ids[0]`'s walk: every member has two
/// neighbours inside it.
fn a_cycle(server: &ServerRound, ids: &[String]) -> Vec<String> {
    let mut path: Vec<String> = vec![ids[0].clone()];
    loop {
        let here = path.last().unwrap();
        let prev = path.len().checked_sub(2).map(|i| path[i].clone());
        let next = server
            .neighbours(here)
            .unwrap()
            .iter()
            .find(|v| Some(*v) != prev.as_ref())
            .unwrap()
            .clone();
        if let Some(at) = path.iter().position(|v| *v == next) {
            return path.split_off(at);
        }
        path.push(next);
    }
}

/// `set`'s neighbours outside it.
fn rim(server: &ServerRound, set: &[String]) -> BTreeSet<String> {
    set.iter()
        .flat_map(|u| server.neighbours(u).unwrap().iter().cloned())
        .filter(|v| !set.contains(v))
        .collect()
}

/// After the key stage (`advertised`): the parties in `sharing` check their roster views and
/// share keys, each receives the shares `deliver` keeps, and those in `sends` mask their input.
fn share_and_mask(
    server: &mut ServerRound,
    ps: &mut [Party],
    v: &P256Verifier,
    sharing: &dyn Fn(&str) -> bool,
    deliver: &dyn Fn(&str, &EncryptedShare) -> bool,
    sends: &dyn Fn(&str) -> bool,
) {
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(5);
    for c in ps.iter_mut().filter(|c| sharing(&c.id)) {
        let view = server.roster_view(&c.id).unwrap();
        let s = c.round.share_keys(&view, v, &mut rng).unwrap();
        server.receive_shares(&c.id, s).unwrap();
    }
    let mut del = server.close_shares().unwrap();
    for (to, list) in del.iter_mut() {
        list.retain(|s| deliver(to, s));
    }
    for c in ps.iter_mut().filter(|c| sharing(&c.id) && sends(&c.id)) {
        let y = c.round.masked_input(&del[&c.id], &c.x).unwrap();
        let st = c.round.mask_statement(&c.signer).unwrap();
        server.receive_input(&c.id, y, st).unwrap();
    }
}

/// Issue 34's attack on the noise floor (k = 3, t = 2, a floor of 16 survivors): the
/// coordinator runs the key exchange with a small set A only (a cycle of the graph, so each
/// member has t neighbours inside A) and asks A to sign a view that names the other advertised
/// clients survivors. Naming A's outside neighbours survivors is refused (A did not mask with
/// them); naming them dropped cuts A off from the other "survivors" in the neighbour graph, and
/// is refused too. Either way no signature, so no share, leaves A. The honest view of A alone
/// is signed and unmasked when the clients' floor allows so few survivors.
#[test]
fn a_coordinator_that_runs_the_round_with_a_subset_gets_no_share_for_a_larger_view() {
    let p = params(2, 3);
    for (n, floor) in [(24usize, 16usize), (300, 16), (24, 2)] {
        let policy = SecAggPolicy {
            min_survivors: floor,
            ..SecAggPolicy::default()
        };
        let (mut ps, v) = parties_with(n, &p, 4, 40 + n as u64, policy);
        let mut server = advertised(&mut ps, &p);
        let ids: Vec<String> = ps.iter().map(|c| c.id.clone()).collect();
        let a = a_cycle(&server, &ids);
        assert!(a.len() < 16, "cycle of {}", a.len());
        let outside = rim(&server, &a);
        let in_a = |id: &str| a.iter().any(|m| m == id);
        share_and_mask(&mut server, &mut ps, &v, &in_a, &|_, _| true, &|_| true);
        let honest = server.close_inputs().unwrap();
        assert_eq!(honest.survivors.len(), a.len());
        if floor == 2 {
            // the honest view of the subset: signed and unmasked, the sum exact
            for c in ps.iter_mut().filter(|c| in_a(&c.id)) {
                let sig = c.round.consistency(&honest, &c.signer).unwrap();
                server.receive_consistency(&c.id, sig).unwrap();
            }
            let req = server.close_consistency().unwrap();
            for c in ps.iter_mut().filter(|c| in_a(&c.id)) {
                let sigs = server.signatures_for(&c.id);
                let r = c.round.unmask(&req, &sigs, &BTreeMap::new(), &v).unwrap();
                server.receive_unmask(r).unwrap();
            }
            let (sum, counted) = server.finish().unwrap();
            let mut plain = vec![0u64; 4];
            for c in ps.iter().filter(|c| in_a(&c.id)) {
                add_mod(&mut plain, &c.x, p.modulus_bits);
            }
            assert_eq!((sum, counted.len()), (plain, a.len()));
            continue;
        }
        let everyone = UnmaskRequest {
            survivors: ids.iter().cloned().collect(),
            dropped: BTreeSet::new(),
        };
        let rim_dropped = UnmaskRequest {
            survivors: ids
                .iter()
                .filter(|v| !outside.contains(*v))
                .cloned()
                .collect(),
            dropped: outside.clone(),
        };
        for (i, c) in ps.iter_mut().filter(|c| in_a(&c.id)).enumerate() {
            // a client signs once: the members are asked one lie or the other
            let lie = if i % 2 == 0 { &everyone } else { &rim_dropped };
            let err = c.round.consistency(lie, &c.signer).unwrap_err();
            let m = err.to_string();
            assert!(
                m.contains("did not mask with") || m.contains("connected part"),
                "n {n}: {m}"
            );
        }
    }
}

/// The review's first route: everyone shares keys and sends an input, but the coordinator
/// delivers to the members of a cycle C only their cycle neighbours' shares, so they mask with
/// each other alone, and lists everyone as a survivor: C's pairwise masks would cancel within
/// C, and C's sum be unmasked on its own. A member refuses a view that counts a surviving
/// neighbour it did not mask with; the others sign, but a client unmasks only when every
/// surviving neighbour signed the same view or sent a mask statement matching it, so C's
/// neighbours outside C send nothing either, and the coordinator gives up before asking.
#[test]
fn a_survivor_that_masked_with_a_subset_of_its_neighbours_is_never_unmasked() {
    let p = params(2, 3);
    let (mut ps, v) = parties(24, &p, 4, 77);
    let mut server = advertised(&mut ps, &p);
    let ids: Vec<String> = ps.iter().map(|c| c.id.clone()).collect();
    let cycle = a_cycle(&server, &ids);
    let in_c = |id: &str| cycle.iter().any(|m| m == id);
    let deliver = |to: &str, s: &EncryptedShare| !in_c(to) || in_c(&s.from);
    share_and_mask(&mut server, &mut ps, &v, &|_| true, &deliver, &|_| true);
    let view = server.close_inputs().unwrap();
    assert_eq!(view.survivors.len(), 24);
    let mut sigs = BTreeMap::new();
    let mut refused = 0;
    for c in ps.iter_mut() {
        let got = c.round.consistency(&view, &c.signer);
        // a member whose every neighbour is in C did mask with all of them
        let cut_off = server.neighbours(&c.id).unwrap().iter().any(|u| !in_c(u));
        if in_c(&c.id) && cut_off {
            refused += 1;
            let err = got.unwrap_err();
            assert!(err.to_string().contains("did not mask with"), "{err}");
        } else {
            let sig = got.unwrap();
            sigs.insert(c.id.clone(), sig.clone());
            server.receive_consistency(&c.id, sig).unwrap();
        }
    }
    assert!(refused >= 1);
    // a neighbour of C, shown every signature there is, still sends no share
    let next_to_c = ps
        .iter_mut()
        .find(|c| {
            !in_c(&c.id)
                && server
                    .neighbours(&c.id)
                    .unwrap()
                    .iter()
                    .any(|u| in_c(u) && !sigs.contains_key(u))
        })
        .unwrap();
    // (the cut-off members' own mask statements name only C: they do not vouch for them)
    let statements = server.statements_for(&next_to_c.id);
    assert!(!statements.is_empty());
    let err = next_to_c
        .round
        .unmask(&view, &sigs, &statements, &v)
        .unwrap_err();
    assert!(err.to_string().contains("neither signed"), "{err}");
    assert!(server.close_consistency().is_err());
}

/// The review's second route: everyone sends an input, and the coordinator names the
/// neighbours of a cycle C dropped (they sent inputs, but their mask keys would be rebuilt),
/// cutting C off from the other survivors: C's sum could then be unmasked on its own. Every
/// survivor refuses to sign a view whose survivors do not stay connected in the neighbour
/// graph (with c of them removed).
#[test]
fn survivors_named_dropped_to_cut_the_graph_are_refused() {
    let p = params(2, 3);
    let (mut ps, v) = parties(24, &p, 4, 78);
    let mut server = advertised(&mut ps, &p);
    let ids: Vec<String> = ps.iter().map(|c| c.id.clone()).collect();
    let cycle = a_cycle(&server, &ids);
    let cut = rim(&server, &cycle);
    share_and_mask(&mut server, &mut ps, &v, &|_| true, &|_, _| true, &|_| true);
    let view = UnmaskRequest {
        survivors: ids.iter().filter(|v| !cut.contains(*v)).cloned().collect(),
        dropped: cut.clone(),
    };
    for c in ps.iter_mut().filter(|c| !cut.contains(&c.id)) {
        let err = c.round.consistency(&view, &c.signer).unwrap_err();
        assert!(
            err.to_string().contains("connected part"),
            "{}: {err}",
            c.id
        );
    }
}

/// Survivors that send their input and go away before the survivor view arrives are still
/// counted: their signed mask statements show their neighbours that they masked with exactly
/// their surviving neighbours, which is what they would have checked. The sum stays exact.
#[test]
fn survivors_that_leave_after_their_input_are_counted_by_their_mask_statements() {
    for (n, t, k) in [(10usize, 6usize, 0usize), (50, 8, 14)] {
        let p = params(t, k);
        let (ps, v) = parties(n, &p, 16, 90 + n as u64);
        let d = Drops {
            before_signing: pick(&ps, 0.1, 1),
            ..Default::default()
        };
        let (sum, counted, plain) = run(ps, &v, &p, &d).unwrap();
        assert_eq!(sum, plain, "n {n}");
        assert_eq!(counted.len(), n);
    }
}

/// A mask statement carries its owner's floor: a survivor that accepts only views of at least
/// 10 survivors and leaves after its input is not counted in a view of 9 (its neighbours
/// refuse to unmask), as it would not have signed one; with its floor met it is counted.
#[test]
fn a_mask_statement_does_not_count_its_owner_below_its_own_floor() {
    let p = params(6, 0);
    for (floor, ok) in [(10usize, false), (9, true)] {
        let (mut ps, v) = parties(10, &p, 8, 95);
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(95);
        let strict = SecAggPolicy {
            min_survivors: floor,
            ..SecAggPolicy::default()
        };
        ps[3].round = ClientRound::new(7, &ps[3].id.clone(), p.clone(), strict, &mut rng);
        let d = Drops {
            before_input: [ps[0].id.clone()].into(),
            before_signing: [ps[3].id.clone()].into(),
            ..Default::default()
        };
        match run(ps, &v, &p, &d) {
            Ok((sum, counted, plain)) => {
                assert!(ok, "floor {floor}: counted {}", counted.len());
                assert_eq!((sum, counted.len()), (plain, 9));
            }
            Err(e) => {
                assert!(!ok, "floor {floor}: {e}");
                assert!(e.to_string().contains("neither signed"), "{e}");
            }
        }
    }
}

#[test]
fn the_sum_on_several_threads_is_bit_identical_to_one_threads() {
    use crate::secagg::{add_mod_threads, SUM_PARALLEL_MIN};
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(5);
    for bits in [1u32, 19, 32, 63, 64] {
        let m = modulus_mask(bits);
        // below the threshold, just above it, and several parts with a ragged last one
        for len in [
            1usize,
            SUM_PARALLEL_MIN - 1,
            SUM_PARALLEL_MIN + 1,
            3 * SUM_PARALLEL_MIN + 7,
        ] {
            let a: Vec<u64> = (0..len).map(|_| rng.random::<u64>() & m).collect();
            let b: Vec<u64> = (0..len).map(|_| rng.random::<u64>() & m).collect();
            let mut expect = a.clone();
            add_mod(&mut expect, &b, bits);
            for threads in [1, 2, 3, 5] {
                let mut got = a.clone();
                add_mod_threads(&mut got, &b, bits, threads);
                assert!(got == expect, "bits {bits}, len {len}, threads {threads}");
            }
        }
    }
}

#[test]
fn a_client_expands_only_views_over_the_roster_it_checked() {
    let p = params(2, 0);
    // before the roster is known: a view over 4 members does not fit
    let (fresh, _) = parties(4, &p, 4, 3);
    let bits = ViewBits {
        n: 4,
        survivors: vec![0b1111],
        dropped: vec![0],
    };
    assert!(matches!(
        fresh[0].round.expand_view(&bits),
        Err(SecAggError::PeerMisbehaved(_))
    ));
    // after the inputs: the honest view comes back whole, and is signed as before
    let (mut ps, _v, honest) = after_inputs(4, &p, 6, SecAggPolicy::default());
    let roster: Vec<String> = ps
        .iter()
        .map(|c| c.id.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let bits = ViewBits::of(&roster, &honest).unwrap();
    let c = &mut ps[0];
    let view = c.round.expand_view(&bits).unwrap();
    assert_eq!(view, honest);
    // the same members over a longer roster (one unknown member more) are refused
    let mut longer = roster.clone();
    longer.push("client-99".into());
    let other = ViewBits::of(&longer, &honest).unwrap();
    assert!(matches!(
        c.round.expand_view(&other),
        Err(SecAggError::PeerMisbehaved(_))
    ));
    assert!(c.round.consistency(&view, &c.signer).is_ok());
}
