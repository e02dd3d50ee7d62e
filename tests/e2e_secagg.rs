//! Secure aggregation over real QUIC + mTLS: the coordinator only ever sees masked inputs; one
//! client is killed after sharing its keys, and the round still completes with the survivors,
//! giving exactly the average of their (modular-encoded) deltas.

use std::time::Duration;

use fedlora_client::secure::{load_signer, verifier_from_certificates};
use fedlora_client::transport::{endpoint, ClientTls, Session};
use fedlora_coordinator::certs::{default_server_names, init_certs};
use fedlora_coordinator::{Coordinator, CoordinatorConfig};
use fedlora_protocol::codec::bits;
use fedlora_protocol::secagg::{ClientRound, SecAggParams, SecAggPolicy};
use fedlora_protocol::{
    AdapterSpec, ClientMsg, Codec, CodecContext, CoordMsg, FederationConfig, FlatAdapter,
    ModularParams, SecAggBody, SecAggTask, Task, TensorSpec, Weighting, PROTOCOL_VERSION,
};
use rand::SeedableRng;

mod common;
use common::next_task;

fn spec() -> AdapterSpec {
    AdapterSpec::new(vec![TensorSpec {
        name: "blocks.0.q.lora_b".into(),
        shape: vec![40, 8],
    }])
    .unwrap()
}

fn delta(seed: u32) -> FlatAdapter {
    common::wave(spec(), |x| (x * 0.013 * seed as f32).sin() * 0.1)
}

async fn send(s: &Session, round: u64, body: SecAggBody) {
    let (r, _) = s.request(&ClientMsg::SecAgg { round, body }).await.unwrap();
    assert!(matches!(r, CoordMsg::Ack { .. }), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_after_sharing_keys_leaves_an_exact_sum_of_the_survivors() {
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 4, &default_server_names()).unwrap();
    let mp = ModularParams {
        value_bits: 12,
        clamp: 0.2,
        fraction: 0.5,
        max_weight: 4,
    };
    let codec = Codec::Modular(mp.clone());
    let mut cfg = CoordinatorConfig::new(dir.path().join("state"), &certs.0);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.federation = FederationConfig {
        rounds: 1,
        clients_per_round: 4,
        min_clients: 2,
        round_timeout_ms: 3_000,
        eval_timeout_ms: 200,
        ..Default::default()
    };
    cfg.federation.train.codec = codec.clone();
    cfg.federation.train.weighting = Weighting::Uniform;
    cfg.federation.train.secure = Some(SecAggParams {
        threshold: 2,
        neighbours: 0,
        modulus_bits: mp.modulus_bits(),
        stage_timeout_ms: 3_000,
    });
    let initial = delta(50);
    let coord = Coordinator::start(cfg, initial.clone()).await.unwrap();
    let addr = coord.local_addr().unwrap();

    let mut handles = Vec::new();
    for i in 0..4usize {
        let certs = certs.0.clone();
        let (codec, mp) = (codec.clone(), mp.clone());
        handles.push(tokio::spawn(async move {
            let tls = ClientTls::from_dir(&certs, i);
            let ep = endpoint(&tls).unwrap();
            let s = Session::connect(&ep, addr, "localhost").await.unwrap();
            let (w, _) = s
                .request(&ClientMsg::Hello {
                    protocol_version: PROTOCOL_VERSION,
                    spec_hash: spec().hash(),
                })
                .await
                .unwrap();
            let CoordMsg::Welcome { client_id, .. } = w else {
                panic!("{w:?}")
            };
            let signer = load_signer(&tls.key).unwrap();
            let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(i as u64);
            // stage 1
            let Task::SecAgg { round, task } = next_task(&s).await else {
                panic!("expected keys")
            };
            let SecAggTask::AdvertiseKeys { params } = *task else {
                panic!("expected keys")
            };
            let mut cr =
                ClientRound::new(round, &client_id, params, SecAggPolicy::default(), &mut rng);
            send(&s, round, SecAggBody::Keys(cr.advertise(&signer).unwrap())).await;
            // stage 2
            let Task::SecAgg { task, .. } = next_task(&s).await else {
                panic!("expected roster")
            };
            let SecAggTask::ShareKeys {
                roster,
                certificates,
                graph_seed,
            } = *task
            else {
                panic!("expected roster")
            };
            assert_eq!(certificates.len(), 4);
            let v = verifier_from_certificates(&tls.ca, &certificates).unwrap();
            let shares = cr.share_keys(&roster, &graph_seed, &v, &mut rng).unwrap();
            send(&s, round, SecAggBody::Shares(shares)).await;
            if i == 3 {
                // killed: the connection and the client's secrets are gone
                s.close();
                return None;
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
            let ints = codec.modular_payload(&bytes, &spec()).unwrap();
            let masked = cr
                .masked_input(offer.secure_shares.as_ref().unwrap(), &ints)
                .unwrap();
            assert_ne!(masked, ints, "what leaves the client is masked");
            let mut packed = Vec::new();
            bits::pack(masked, mp.modulus_bits(), &mut packed);
            send(&s, round, SecAggBody::Input(packed)).await;
            // stage 4: sign the survivor view
            let Task::SecAgg { task, .. } = next_task(&s).await else {
                panic!("expected the consistency check")
            };
            let SecAggTask::ConsistencyCheck(view) = *task else {
                panic!("expected the consistency check")
            };
            assert_eq!(view.survivors.len(), 3);
            assert!(view.dropped.contains("client-3"));
            let sig = cr.consistency(&view, &signer).unwrap();
            send(&s, round, SecAggBody::Consistency(sig)).await;
            // stage 5: unmask, with the neighbours' signatures of the same view
            let Task::SecAgg { task, .. } = next_task(&s).await else {
                panic!("expected unmask")
            };
            let SecAggTask::Unmask {
                request,
                signatures,
            } = *task
            else {
                panic!("expected unmask")
            };
            assert_eq!(request, view);
            assert_eq!(signatures.len(), 3);
            let resp = cr.unmask(&request, &signatures, &v).unwrap();
            send(&s, round, SecAggBody::Unmask(resp)).await;
            Some(decoded)
        }));
    }
    let mut survivors = Vec::new();
    for h in handles {
        if let Some(d) = h.await.unwrap() {
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
