//! Async (buffered) federation with secure aggregation, over real QUIC + mutual TLS: devices of
//! different speeds train whenever they ask and announce a finished update; the coordinator
//! opens a SecAgg+ cohort among the devices holding one, each member masks its update scaled
//! by its public staleness weight, and every committed version must be the previous one plus
//! Σ s(τᵢ)·Δᵢ ÷ Σ s(τᵢ) over exactly the updates the devices masked.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use fedlora_client::secure::{load_signer, verifier_from_certificates};
use fedlora_client::transport::ClientTls;
use fedlora_coordinator::certs::{default_server_names, init_certs};
use fedlora_coordinator::{Coordinator, CoordinatorConfig, Event};
use fedlora_protocol::codec::bits;
use fedlora_protocol::round::{cohort_context, cohort_weight};
use fedlora_protocol::secagg::{ClientRound, SecAggParams, SecAggPolicy};
use fedlora_protocol::{
    ClientMsg, Codec, CodecContext, CoordMsg, FederationConfig, FlatAdapter, Mode, RefusalCode,
    SecAggBody, SecAggTask, Staleness, Task, TrainConfig, Weighting,
};
use rand::SeedableRng;

use crate::common;
use common::{async_delta, poll, secagg_spec as spec, send_secagg as send, wave, Committed};

/// One masked update: the cohort (round) it was masked in, the round it trained in, its
/// staleness weight, and the scaled delta as the coordinator decodes it.
struct Masked {
    cohort: u64,
    trained: u64,
    weight: f64,
    decoded: FlatAdapter,
}

/// Device `i`: trains (a known delta) whenever it is offered work, after `pause` or once
/// `wait_for` versions committed, announces it, and follows its cohort's secure stages.
async fn device(
    i: usize,
    tls: ClientTls,
    addr: SocketAddr,
    pause: Duration,
    wait_for: Option<u64>,
    events: tokio::sync::broadcast::Receiver<Event>,
) -> Vec<Masked> {
    let (codec, mp) = common::secagg_modular();
    let (s, client_id) = common::hello(&tls, addr, spec().hash()).await;
    let signer = load_signer(&tls.key).unwrap();
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(i as u64);
    let mut held: Option<(u64, FlatAdapter)> = None;
    let mut plan = None;
    let mut cr: Option<ClientRound> = None;
    let mut verifier = None;
    let mut masked = Vec::new();
    let mut committed = Committed::new(events);
    for _ in 0..20_000 {
        committed.drain();
        match poll(&s).await {
            Task::Train(o) => {
                assert!(
                    o.secure_shares.is_none(),
                    "an async offer carries no shares"
                );
                plan = Some(
                    o.config
                        .staleness
                        .expect("an async offer names its weighting"),
                );
                if held.is_none() {
                    // a slow device: its update is announced after `wait_for` versions
                    if let Some(v) = wait_for.filter(|_| masked.is_empty()) {
                        committed.wait_for(v).await;
                    }
                    tokio::time::sleep(pause).await;
                    held = Some((o.round, async_delta(i, o.round)));
                }
                let round = held.as_ref().unwrap().0;
                let (reply, _) = s.request(&ClientMsg::UpdateReady { round }).await.unwrap();
                match reply {
                    CoordMsg::Ack { .. } => {}
                    CoordMsg::Refused(r) if r.code == RefusalCode::RetryLater => {}
                    // the campaign ended meanwhile
                    CoordMsg::Refused(r) if r.code == RefusalCode::WrongRound => return masked,
                    other => panic!("device {i}: unexpected answer {other:?}"),
                }
            }
            Task::SecAgg { round, task } => match *task {
                SecAggTask::AdvertiseKeys { params } => {
                    let mut c = ClientRound::new(
                        round,
                        &client_id,
                        params,
                        SecAggPolicy::default(),
                        &mut rng,
                    );
                    send(&s, round, SecAggBody::Keys(c.advertise(&signer).unwrap())).await;
                    cr = Some(c);
                }
                SecAggTask::ShareKeys { view, certificates } => {
                    let v = verifier_from_certificates(&tls.ca, &certificates).unwrap();
                    let shares = cr
                        .as_mut()
                        .unwrap()
                        .share_keys(&view, &v, &mut rng)
                        .unwrap();
                    verifier = Some(v);
                    send(&s, round, SecAggBody::Shares(shares)).await;
                }
                SecAggTask::MaskInput {
                    shares,
                    trained_round,
                    staleness_weight,
                    codec_seed,
                } => {
                    let (trained, d) = held.take().expect("a member holds an update");
                    assert_eq!(trained, trained_round);
                    // the member's own s(τ), which the coordinator's number must match, and
                    // the context every member signs (as the SDK does)
                    let plan = plan.expect("trained on an offer");
                    let w = cohort_weight(&plan, round, trained, staleness_weight, 0.1).unwrap();
                    assert_eq!(w, staleness_weight);
                    cr.as_mut()
                        .unwrap()
                        .bind(cohort_context(&codec, &plan, codec_seed), 0, 0)
                        .unwrap();
                    let scaled: Vec<f32> = d
                        .values()
                        .iter()
                        .map(|v| v * staleness_weight as f32)
                        .collect();
                    let ctx = CodecContext {
                        round_seed: codec_seed,
                    };
                    let (bytes, _) = codec.encode_with(&scaled, &ctx, 1, &mut rng);
                    let decoded = Codec::decode(&bytes, &spec(), Some(&codec), &ctx).unwrap();
                    let ints = codec.modular_payload(&bytes, &spec()).unwrap();
                    let m = cr.as_mut().unwrap().masked_input(&shares, &ints).unwrap();
                    assert_ne!(m, ints, "what leaves the device is masked");
                    let mut packed = Vec::new();
                    bits::pack(m, mp.modulus_bits(), &mut packed);
                    let statement = cr.as_ref().unwrap().mask_statement(&signer).unwrap();
                    send(&s, round, SecAggBody::Input { packed, statement }).await;
                    masked.push(Masked {
                        cohort: round,
                        trained,
                        weight: staleness_weight,
                        decoded,
                    });
                }
                SecAggTask::ConsistencyCheck(bits) => {
                    let cr = cr.as_mut().unwrap();
                    let view = cr.expand_view(&bits).unwrap();
                    let sig = cr.consistency(&view, &signer).unwrap();
                    send(&s, round, SecAggBody::Consistency(sig)).await;
                }
                SecAggTask::Unmask {
                    request,
                    signatures,
                    statements,
                } => {
                    let mut cr = cr.take().unwrap();
                    let request = cr.expand_view(&request).unwrap();
                    let resp = cr
                        .unmask(
                            &request,
                            &signatures,
                            &statements,
                            verifier.as_ref().unwrap(),
                        )
                        .unwrap();
                    send(&s, round, SecAggBody::Unmask(resp)).await;
                }
            },
            Task::Wait { .. } | Task::AlreadyUploaded { .. } => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Task::Evaluate { .. } | Task::Finished { .. } => return masked,
        }
    }
    panic!("device {i} never saw the campaign end")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_cohorts_commit_the_staleness_weighted_mean_of_what_the_devices_masked() {
    let dir = tempfile::tempdir().unwrap();
    let (codec, mp) = common::secagg_modular();
    let staleness: Staleness = "poly:0.5".parse().unwrap();
    let fed = FederationConfig {
        mode: Mode::Async,
        // cohorts of 4 give each member the 3 neighbours the default client policy asks for
        buffer: 4,
        max_staleness: 4,
        staleness,
        rounds: 4,
        round_timeout_ms: 60_000,
        eval_timeout_ms: 100,
        train: TrainConfig {
            codec,
            weighting: Weighting::Uniform,
            secure: Some(SecAggParams {
                threshold: 2,
                neighbours: 0,
                modulus_bits: mp.modulus_bits(),
                collusion: 0,
                stage_timeout_ms: 10_000,
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let initial = wave(spec(), |x| (x * 0.07).cos() * 0.5);
    let certs = init_certs(&dir.path().join("certs"), 6, &default_server_names())
        .unwrap()
        .0;
    let mut cfg = CoordinatorConfig::new(dir.path().join("state"), &certs);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.federation = fed;
    let coord = Coordinator::start(cfg, initial.clone()).await.unwrap();
    let addr = coord.local_addr().unwrap();
    // four devices of different speeds, and two whose first update is announced only after
    // one and two versions committed (so it is masked with a staleness weight below 1)
    let pauses = [0u64, 10, 40, 80, 0, 0];
    let waits = [None, None, None, None, Some(1), Some(2)];
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            tokio::spawn(device(
                i,
                ClientTls::from_dir(&certs, i),
                addr,
                Duration::from_millis(pauses[i]),
                waits[i],
                coord.events(),
            ))
        })
        .collect();
    let mut all: Vec<Masked> = Vec::new();
    for t in tasks {
        all.extend(
            tokio::time::timeout(Duration::from_secs(120), t)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let (version, got) = coord.global();
    assert_eq!(version, 4, "four versions committed");
    // replay the campaign from what the devices masked, cohort by cohort
    let mut cohorts: BTreeMap<u64, Vec<&Masked>> = BTreeMap::new();
    for m in &all {
        cohorts.entry(m.cohort).or_default().push(m);
    }
    assert_eq!(cohorts.len(), 4, "one cohort per version, none failed");
    let mut x: Vec<f64> = initial.values().iter().map(|&v| f64::from(v)).collect();
    let mut stale = 0;
    for (round, members) in &cohorts {
        assert_eq!(members.len(), 4, "cohort {round}");
        for m in members {
            // the weight the device was told is s(τ) of its update's staleness
            assert_eq!(m.weight, staleness.weight(round - m.trained));
        }
        stale += members.iter().filter(|m| m.trained < *round).count();
        let total: f64 = members.iter().map(|m| m.weight).sum();
        for (k, xk) in x.iter_mut().enumerate() {
            let s: f64 = members
                .iter()
                .map(|m| f64::from(m.decoded.values()[k]))
                .sum();
            *xk = f64::from((*xk as f32) + (s / total) as f32);
        }
    }
    assert!(stale >= 2, "the slow devices' updates were masked stale");
    for (k, (g, want)) in got.values().iter().zip(&x).enumerate() {
        assert!(
            (f64::from(*g) - want).abs() <= 1e-5 * want.abs().max(1.0),
            "value {k}: {g} vs {want}"
        );
    }
    coord.shutdown().await;
    let store = fedlora_coordinator::store::Store::open(&dir.path().join("state")).unwrap();
    let report = fedlora_coordinator::status::report(&store).unwrap();
    let b = report.buffer.expect("async status");
    assert_eq!(b.staleness_histogram.iter().sum::<usize>(), all.len());
}
