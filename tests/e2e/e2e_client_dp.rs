//! Client-level distributed DP over real QUIC + mTLS: four clients each clip, rotate, round and
//! noise their update with the Skellam codec, mask it, and the coordinator commits exactly the
//! decoded noisy sum divided by the expected clients (5, one more than came): bit for bit the
//! sum, mod 2^m, of what the clients encoded, while no client's un-noised update leaves it.

use std::time::Duration;

use fedlora_client::secure::{load_signer, verifier_from_certificates};
use fedlora_client::transport::ClientTls;
use fedlora_coordinator::certs::{default_server_names, init_certs};
use fedlora_coordinator::privacy_plan::{apply, ClientDpRequest};
use fedlora_coordinator::{Coordinator, CoordinatorConfig};
use fedlora_protocol::client_dp::{plan_digest, ClientDpMode, ClientDpPlan};
use fedlora_protocol::codec::bits;
use fedlora_protocol::rank::RankCounts;
use fedlora_protocol::secagg::{ClientRound, SecAggPolicy};
use fedlora_protocol::{
    Codec, CodecContext, FederationConfig, ModularSum, SecAggBody, SecAggTask, Task,
};
use rand::SeedableRng;

use crate::common;
use common::{next_task, secagg_delta as delta, secagg_spec as spec, send_secagg as send};

/// Client `i` through one distributed-DP round over QUIC: it checks the plan, encodes its
/// delta with the round's Skellam codec (its noise share included), binds the plan into its
/// secure round and masks. Returns the integers it encoded (noise included).
async fn client(i: usize, certs: std::path::PathBuf, addr: std::net::SocketAddr) -> Vec<u64> {
    let tls = ClientTls::from_dir(&certs, i);
    let (s, client_id) = common::hello(&tls, addr, spec().hash()).await;
    let signer = load_signer(&tls.key).unwrap();
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(100 + i as u64);
    let Task::SecAgg { round, task } = next_task(&s).await else {
        panic!("expected keys")
    };
    let SecAggTask::AdvertiseKeys { params } = *task else {
        panic!("expected keys")
    };
    let mut cr = ClientRound::new(round, &client_id, params, SecAggPolicy::default(), &mut rng);
    send(&s, round, SecAggBody::Keys(cr.advertise(&signer).unwrap())).await;
    let Task::SecAgg { task, .. } = next_task(&s).await else {
        panic!("expected roster")
    };
    let SecAggTask::ShareKeys { view, certificates } = *task else {
        panic!("expected roster")
    };
    let v = verifier_from_certificates(&tls.ca, &certificates).unwrap();
    let shares = cr.share_keys(&view, &v, &mut rng).unwrap();
    send(&s, round, SecAggBody::Shares(shares)).await;
    let Task::Train(offer) = next_task(&s).await else {
        panic!("expected the offer")
    };
    let plan: ClientDpPlan = offer.config.client_dp.clone().expect("a client-level plan");
    let codec = offer.config.codec.clone();
    let Codec::Skellam(p) = &codec else {
        panic!(
            "distributed mode uses the Skellam codec, not {}",
            codec.name()
        )
    };
    plan.check_consistent(&codec, offer.config.secure.as_ref().map(|s| s.modulus_bits))
        .unwrap();
    let ctx = CodecContext {
        round_seed: offer.codec_seed,
    };
    let d = delta(i as u32 + 1);
    let (bytes, stats) = codec.encode_with(d.values(), &ctx, 1, &mut rng);
    assert!(!stats.sent_zero);
    let ints = codec.modular_payload(&bytes, &spec()).unwrap();
    // what the integers carry is the clipped update plus noise of the client's share: the
    // decoded single upload is off the clipped update by about √share / s per coordinate
    let alone = Codec::decode(&bytes, &spec(), Some(&codec), &ctx).unwrap();
    let mut clipped = d.values().to_vec();
    fedlora_dp::clip_l2(&mut clipped, plan.clip);
    let err: f64 = alone
        .values()
        .iter()
        .zip(&clipped)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum::<f64>()
        / clipped.len() as f64;
    let noise_var = p.share / (p.scale * p.scale);
    assert!(
        err > 0.5 * noise_var && err < 2.0 * noise_var,
        "client {i}: error variance {err:.3e}, the noise share is {noise_var:.3e}"
    );
    cr.bind(
        plan_digest(Some(&plan), &codec),
        plan.min_clients,
        plan.collusion,
    )
    .unwrap();
    let masked = cr
        .masked_input(offer.secure_shares.as_ref().unwrap(), &ints)
        .unwrap();
    assert_ne!(masked, ints, "what leaves the client is masked");
    let mut packed = Vec::new();
    bits::pack(masked, u32::from(p.bits), &mut packed);
    let statement = cr.mask_statement(&signer).unwrap();
    send(&s, round, SecAggBody::Input { packed, statement }).await;
    let Task::SecAgg { task, .. } = next_task(&s).await else {
        panic!("expected the consistency check")
    };
    let SecAggTask::ConsistencyCheck(bits) = *task else {
        panic!("expected the consistency check")
    };
    let view = cr.expand_view(&bits).unwrap();
    let sig = cr.consistency(&view, &signer).unwrap();
    send(&s, round, SecAggBody::Consistency(sig)).await;
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
    let request = cr.expand_view(&request).unwrap();
    let resp = cr.unmask(&request, &signatures, &statements, &v).unwrap();
    send(&s, round, SecAggBody::Unmask(resp)).await;
    // keep the connection until the coordinator is done with the round
    tokio::time::sleep(Duration::from_millis(500)).await;
    ints
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_committed_aggregate_is_exactly_the_decoded_noisy_sum_of_the_clients() {
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 4, &default_server_names()).unwrap();
    // 5 clients expected per round, 4 come: the sum is divided by 5, the public constant
    let mut fed = FederationConfig {
        rounds: 1,
        clients_per_round: 5,
        min_clients: 3,
        round_timeout_ms: 10_000,
        start_grace_ms: 300,
        eval_timeout_ms: 200,
        ..Default::default()
    };
    let mut req = ClientDpRequest::new(ClientDpMode::Distributed, 0.5, 8.0, 5);
    req.collusion = 1;
    req.bits = 20;
    apply(&req, &mut fed, spec().numel(), true).unwrap();
    let codec = fed.train.codec.clone();
    let mut cfg = CoordinatorConfig::new(dir.path().join("state"), &certs.0);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.federation = fed.clone();
    let initial = delta(50);
    let coord = Coordinator::start(cfg, initial.clone()).await.unwrap();
    let addr = coord.local_addr().unwrap();
    let handles: Vec<_> = (0..4)
        .map(|i| tokio::spawn(client(i, certs.0.clone(), addr)))
        .collect();
    let mut encoded = Vec::new();
    for h in handles {
        encoded.push(h.await.unwrap());
    }
    assert!(tokio::time::timeout(
        Duration::from_secs(60),
        coord.wait_finished(Duration::from_millis(10))
    )
    .await
    .unwrap());
    let (version, got) = coord.global();
    assert_eq!(version, 1);
    let report = coord.report().unwrap();
    coord.shutdown().await;
    assert_eq!(report.rounds[0].record.participants.len(), 4);
    // the clients' noisy integers summed mod 2^m, decoded as the coordinator decodes a sum
    let m = codec.modulus_bits().unwrap();
    let mut sum = ModularSum::new(encoded[0].len(), m);
    for e in &encoded {
        sum.add(e).unwrap();
    }
    let ctx = CodecContext {
        round_seed: fedlora_protocol::codec_seed(fed.seed, report.rounds[0].record.round),
    };
    let mean = fedlora_coordinator::aggregate::modular_sum_delta(
        &codec,
        &spec(),
        &ctx,
        &sum,
        &RankCounts::new(1, (0..4).map(|_| (1.0, 1))),
    )
    .unwrap();
    for (j, ((g, i0), d)) in got
        .values()
        .iter()
        .zip(initial.values())
        .zip(mean.values())
        .enumerate()
    {
        assert_eq!(g.to_bits(), (i0 + d).to_bits(), "coordinate {j}");
    }
}
