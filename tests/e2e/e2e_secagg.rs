//! Secure aggregation over real QUIC + mTLS: the coordinator only ever sees masked inputs; one
//! client is killed after sharing its keys, and the round still completes with the survivors,
//! giving exactly the average of their (modular-encoded) deltas; a malicious client whose input
//! makes the sum undecodable fails the round, and a fresh round follows. A device enrolled
//! through the enrollment intermediate is a neighbour like any other: its peers check its
//! relayed chain as TLS would.

use std::time::Duration;

use fedlora_client::secure::{load_signer, verifier_from_certificates};
use fedlora_client::transport::{ClientTls, Session};
use fedlora_coordinator::certs::{default_server_names, init_certs};
use fedlora_coordinator::{Coordinator, CoordinatorConfig};
use fedlora_protocol::codec::bits;
use fedlora_protocol::secagg::{ClientRound, SecAggParams, SecAggPolicy};
use fedlora_protocol::{
    Codec, CodecContext, FederationConfig, FlatAdapter, SecAggBody, SecAggTask, Task, Weighting,
};
use rand::SeedableRng;

use crate::common;
use common::{next_task, secagg_delta as delta, secagg_spec as spec, send_secagg as send};

/// What a scripted client does in its secure round.
#[derive(Clone, Copy, PartialEq)]
enum Script {
    /// Every stage, honestly.
    Honest,
    /// Killed after sharing its keys (its connection and secrets are gone).
    KilledAfterShares,
    /// Adds `offset` to the weight slot of its input before masking (a malicious client).
    WeightOffset(u64),
}

/// A coordinator for one secure round of 4 clients (t = 2 of k = 3) that needs `min_clients`.
async fn coordinator(
    dir: &std::path::Path,
    certs: &std::path::Path,
    min_clients: usize,
) -> (Coordinator, FlatAdapter) {
    let (codec, mp) = common::secagg_modular();
    let mut cfg = CoordinatorConfig::new(dir.join("state"), certs);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.federation = FederationConfig {
        rounds: 1,
        clients_per_round: 4,
        min_clients,
        round_timeout_ms: 3_000,
        eval_timeout_ms: 200,
        ..Default::default()
    };
    cfg.federation.train.codec = codec;
    cfg.federation.train.weighting = Weighting::Uniform;
    cfg.federation.train.secure = Some(SecAggParams {
        threshold: 2,
        neighbours: 0,
        modulus_bits: mp.modulus_bits(),
        collusion: 0,
        stage_timeout_ms: 3_000,
    });
    let initial = delta(50);
    (
        Coordinator::start(cfg, initial.clone()).await.unwrap(),
        initial,
    )
}

/// Client `i` through one secure round as `script` says, over real QUIC. Returns the delta it
/// contributed (as the coordinator will decode it) unless it was killed, and its session.
async fn scripted(
    i: usize,
    tls: ClientTls,
    addr: std::net::SocketAddr,
    script: Script,
    survivors: usize,
) -> (Option<FlatAdapter>, Session) {
    let (codec, mp) = common::secagg_modular();
    let (s, client_id) = common::hello(&tls, addr, spec().hash()).await;
    let signer = load_signer(&tls.key).unwrap();
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(i as u64);
    // stage 1
    let Task::SecAgg { round, task } = next_task(&s).await else {
        panic!("expected keys")
    };
    let SecAggTask::AdvertiseKeys { params } = *task else {
        panic!("expected keys")
    };
    let mut cr = ClientRound::new(round, &client_id, params, SecAggPolicy::default(), &mut rng);
    send(&s, round, SecAggBody::Keys(cr.advertise(&signer).unwrap())).await;
    // stage 2
    let Task::SecAgg { task, .. } = next_task(&s).await else {
        panic!("expected roster")
    };
    let SecAggTask::ShareKeys { view, certificates } = *task else {
        panic!("expected roster")
    };
    // the roster's ids, and only the neighbours' keys and certificates (everyone else here)
    assert_eq!(view.ids.len(), 4);
    assert_eq!(view.neighbours.len(), 3);
    assert_eq!(certificates.len(), 3);
    assert!(!certificates.contains_key(&client_id));
    let v = verifier_from_certificates(&tls.ca, &certificates).unwrap();
    let shares = cr.share_keys(&view, &v, &mut rng).unwrap();
    send(&s, round, SecAggBody::Shares(shares)).await;
    if script == Script::KilledAfterShares {
        s.close();
        return (None, s);
    }
    // stage 3: train (here: a known delta), encode, mask
    let Task::Train(offer) = next_task(&s).await else {
        panic!("expected the offer")
    };
    let ctx = CodecContext {
        round_seed: offer.codec_seed,
    };
    let d = delta(i as u32 + 1);
    let (bytes, _) = codec.encode_with(d.values(), &ctx, 1, &mut rng);
    let decoded = Codec::decode(&bytes, &spec(), Some(&codec), &ctx).unwrap();
    let mut ints = codec.modular_payload(&bytes, &spec()).unwrap();
    if let Script::WeightOffset(off) = script {
        let m = (1u64 << mp.modulus_bits()) - 1;
        let last = ints.last_mut().unwrap();
        *last = last.wrapping_add(off) & m;
    }
    let masked = cr
        .masked_input(offer.secure_shares.as_ref().unwrap(), &ints)
        .unwrap();
    assert_ne!(masked, ints, "what leaves the client is masked");
    let mut packed = Vec::new();
    bits::pack(masked, mp.modulus_bits(), &mut packed);
    let statement = cr.mask_statement(&signer).unwrap();
    send(&s, round, SecAggBody::Input { packed, statement }).await;
    // stage 4: sign the survivor view
    let Task::SecAgg { task, .. } = next_task(&s).await else {
        panic!("expected the consistency check")
    };
    let SecAggTask::ConsistencyCheck(bits) = *task else {
        panic!("expected the consistency check")
    };
    let view = cr.expand_view(&bits).unwrap();
    assert_eq!(view.survivors.len(), survivors);
    let sig = cr.consistency(&view, &signer).unwrap();
    send(&s, round, SecAggBody::Consistency(sig)).await;
    // stage 5: unmask, with the neighbours' signatures of the same view
    let Task::SecAgg { task, .. } = next_task(&s).await else {
        panic!("expected unmask")
    };
    let SecAggTask::Unmask {
        request,
        signatures,
        statements,
    } = *task
    else {
        panic!("expected unmask")
    };
    assert_eq!(request, bits);
    let request = cr.expand_view(&request).unwrap();
    // the surviving neighbours' signatures only
    assert_eq!(signatures.len(), survivors - 1);
    let resp = cr.unmask(&request, &signatures, &statements, &v).unwrap();
    send(&s, round, SecAggBody::Unmask(resp)).await;
    (Some(decoded), s)
}

/// Runs clients 0..4 as `script_of` says; `survivors` is how many reach the masked input.
fn launch(
    certs: &std::path::Path,
    addr: std::net::SocketAddr,
    script_of: impl Fn(usize) -> Script,
    survivors: usize,
) -> Vec<tokio::task::JoinHandle<(Option<FlatAdapter>, Session)>> {
    let tls: Vec<ClientTls> = (0..4).map(|i| ClientTls::from_dir(certs, i)).collect();
    launch_with(tls, addr, script_of, survivors)
}

/// [`launch`] with each client's own TLS identity.
fn launch_with(
    tls: Vec<ClientTls>,
    addr: std::net::SocketAddr,
    script_of: impl Fn(usize) -> Script,
    survivors: usize,
) -> Vec<tokio::task::JoinHandle<(Option<FlatAdapter>, Session)>> {
    tls.into_iter()
        .enumerate()
        .map(|(i, t)| tokio::spawn(scripted(i, t, addr, script_of(i), survivors)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_after_sharing_keys_leaves_an_exact_sum_of_the_survivors() {
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 4, &default_server_names()).unwrap();
    let (coord, initial) = coordinator(dir.path(), &certs.0, 2).await;
    let addr = coord.local_addr().unwrap();
    let handles = launch(
        &certs.0,
        addr,
        |i| {
            if i == 3 {
                Script::KilledAfterShares
            } else {
                Script::Honest
            }
        },
        3,
    );
    let mut survivors = Vec::new();
    for h in handles {
        if let (Some(d), _) = h.await.unwrap() {
            survivors.push(d);
        }
    }
    assert!(tokio::time::timeout(
        Duration::from_secs(60),
        coord.wait_finished(Duration::from_millis(10))
    )
    .await
    .unwrap());
    let report = coord.report().unwrap();
    assert_eq!(report.rounds[0].record.participants.len(), 3);
    assert_eq!(
        report.rounds[0].record.train_loss, None,
        "masked inputs carry no loss"
    );
    let (version, got) = coord.global();
    assert_eq!(version, 1);
    coord.shutdown().await;
    for (j, (g, i0)) in got.values().iter().zip(initial.values()).enumerate() {
        let mean: f64 = survivors
            .iter()
            .map(|d| f64::from(d.values()[j]))
            .sum::<f64>()
            / 3.0;
        let want = f64::from(*i0) + mean;
        assert!((f64::from(*g) - want).abs() < 1e-6, "{j}: {g} vs {want}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sum_that_does_not_decode_fails_the_round_and_a_fresh_round_follows() {
    // one client offsets its weight slot so that the unmasked weights sum to 0 mod 2^m: the sum
    // cannot be applied, and the round must fail as a round instead of wedging the federation
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 4, &default_server_names()).unwrap();
    let (coord, _) = coordinator(dir.path(), &certs.0, 2).await;
    let addr = coord.local_addr().unwrap();
    let mut events = coord.events();
    let m = common::secagg_modular().1.modulus_bits();
    // 1 + 1 + 1 + (2^m − 3) ≡ 0 (mod 2^m)
    let handles = launch(
        &certs.0,
        addr,
        |i| {
            if i == 0 {
                Script::WeightOffset((1u64 << m) - 4)
            } else {
                Script::Honest
            }
        },
        4,
    );
    let mut sessions = Vec::new();
    for h in handles {
        sessions.push(h.await.unwrap().1);
    }
    let (mut failed, mut restarted) = (None, None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while restarted.is_none() {
        let ev = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("the failed secure round is followed by a fresh one")
            .unwrap();
        match ev {
            fedlora_coordinator::Event::RoundFailed { round, reason } => {
                failed = Some((round, reason))
            }
            fedlora_coordinator::Event::RoundStarted { round, .. } if failed.is_some() => {
                restarted = Some(round)
            }
            _ => {}
        }
    }
    let (first, reason) = failed.unwrap();
    assert!(reason.contains("weight"), "{reason}");
    assert!(restarted.unwrap() > first);
    let report = coord.report().unwrap();
    assert_eq!(report.global_version, 0, "nothing was applied");
    let rec = &report.rounds[0].record;
    assert!(
        matches!(&rec.status, fedlora_coordinator::store::RoundStatus::Failed { reason } if reason.contains("weight")),
        "{:?}",
        rec.status
    );
    drop(sessions);
    coord.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_round_below_min_clients_fails_instead_of_committing() {
    // min_clients = 4 and one client is killed after sharing keys: the 3 survivors unmask
    // exactly, but a round needs 4 uploads, so nothing is applied
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 4, &default_server_names()).unwrap();
    let (coord, _) = coordinator(dir.path(), &certs.0, 4).await;
    let addr = coord.local_addr().unwrap();
    let mut events = coord.events();
    let handles = launch(
        &certs.0,
        addr,
        |i| {
            if i == 3 {
                Script::KilledAfterShares
            } else {
                Script::Honest
            }
        },
        3,
    );
    let mut sessions = Vec::new();
    for h in handles {
        sessions.push(h.await.unwrap().1);
    }
    let reason = loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .expect("the round ends")
            .unwrap();
        match ev {
            fedlora_coordinator::Event::RoundFailed { reason, .. } => break reason,
            fedlora_coordinator::Event::RoundCommitted { .. } => {
                panic!("a round of 3 committed with min_clients = 4")
            }
            _ => {}
        }
    };
    assert!(reason.contains("4 needed"), "{reason}");
    assert_eq!(coord.report().unwrap().global_version, 0);
    drop(sessions);
    coord.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_enrolled_through_the_intermediate_is_a_neighbour_in_a_secure_round() {
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 3, &default_server_names())
        .unwrap()
        .0;
    let (device, _) = common::enroll_through_intermediate(dir.path(), &certs).await;
    let (coord, initial) = coordinator(dir.path(), &certs, 4).await;
    let mut tls: Vec<ClientTls> = (0..3).map(|i| ClientTls::from_dir(&certs, i)).collect();
    tls.push(device.tls.clone());
    let handles = launch_with(tls, coord.local_addr().unwrap(), |_| Script::Honest, 4);
    let mut inputs = Vec::new();
    for h in handles {
        inputs.push(h.await.unwrap().0.expect("every client finishes the round"));
    }
    assert!(tokio::time::timeout(
        Duration::from_secs(60),
        coord.wait_finished(Duration::from_millis(10))
    )
    .await
    .unwrap());
    let report = coord.report().unwrap();
    assert!(report.rounds[0]
        .record
        .participants
        .contains(&device.device_id));
    let (_, got) = coord.global();
    coord.shutdown().await;
    for (j, (g, i0)) in got.values().iter().zip(initial.values()).enumerate() {
        let mean = inputs.iter().map(|d| f64::from(d.values()[j])).sum::<f64>() / 4.0;
        assert!(
            (f64::from(*g) - (f64::from(*i0) + mean)).abs() < 1e-6,
            "{j}"
        );
    }
}
