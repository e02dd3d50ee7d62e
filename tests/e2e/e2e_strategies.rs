//! Aggregation strategies end to end over real QUIC + mutual TLS on loopback: heterogeneous
//! LoRA ranks (slices down, zero-padded deltas up, per-component averaging), norm-bounded
//! updates (a scaled-up update is refused in the clear), FedProx's μ in the round offer, and a
//! coordinate-wise median that one garbage client cannot move out of the honest range.

use std::net::SocketAddr;
use std::time::Duration;

use fedlora_client::transport::{endpoint, ClientTls, Session};
use fedlora_coordinator::certs::{default_server_names, init_certs};
use fedlora_coordinator::{Coordinator, CoordinatorConfig, Event};
use fedlora_protocol::strategy::{FedProx, StrategyConfig};
use fedlora_protocol::{
    AdapterSpec, ClientMsg, Codec, CodecContext, CoordMsg, FederationConfig, FlatAdapter,
    RefusalCode, TensorSpec, TrainConfig, Weighting, PROTOCOL_VERSION,
};

use crate::common;
use common::{offer, upload, wave};

/// Rank 4: `A` [4, 5], `B` [5, 4].
fn spec() -> AdapterSpec {
    AdapterSpec::new(vec![
        TensorSpec {
            name: "blocks.0.q.lora_a".into(),
            shape: vec![4, 5],
        },
        TensorSpec {
            name: "blocks.0.q.lora_b".into(),
            shape: vec![5, 4],
        },
    ])
    .unwrap()
}

async fn hello(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    max_rank: Option<u32>,
) -> (Session, CoordMsg) {
    let s = Session::connect(ep, addr, "localhost").await.unwrap();
    let (reply, _) = s
        .request(&ClientMsg::Hello {
            protocol_version: PROTOCOL_VERSION,
            spec_hash: spec().hash(),
            max_rank,
        })
        .await
        .unwrap();
    (s, reply)
}

async fn start(
    dir: &std::path::Path,
    clients: usize,
    federation: FederationConfig,
    initial: FlatAdapter,
) -> (Coordinator, SocketAddr, std::path::PathBuf) {
    let certs = init_certs(&dir.join("certs"), clients, &default_server_names()).unwrap();
    let mut cfg = CoordinatorConfig::new(dir.join("state"), &certs.0);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.federation = federation;
    let coord = Coordinator::start(cfg, initial).await.unwrap();
    let addr = coord.local_addr().unwrap();
    (coord, addr, certs.0)
}

async fn committed(events: &mut tokio::sync::broadcast::Receiver<Event>) {
    loop {
        if let Ok(Event::RoundCommitted { .. }) =
            tokio::time::timeout(Duration::from_secs(30), events.recv())
                .await
                .expect("the round commits")
        {
            return;
        }
    }
}

/// The rank component of flat value `i` of [`spec`], computed from the layout by hand: `A`
/// row-major [4, 5] (row j is component j), then `B` row-major [5, 4] (column j).
fn component(i: usize) -> usize {
    if i < 20 {
        i / 5
    } else {
        (i - 20) % 4
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heterogeneous_ranks_get_their_slice_and_each_component_is_averaged_over_its_clients() {
    let dir = tempfile::tempdir().unwrap();
    let initial = wave(spec(), |x| (x * 0.11).cos());
    let fed = FederationConfig {
        rounds: 1,
        clients_per_round: 3,
        min_clients: 3,
        round_timeout_ms: 60_000,
        eval_timeout_ms: 100,
        ..Default::default()
    };
    let (coord, addr, certs) = start(dir.path(), 3, fed, initial.clone()).await;
    let mut events = coord.events();
    // client 0 trains rank 2, client 1 the full rank 4, client 2 rank 1
    let max_ranks = [Some(2u32), None, Some(1)];
    let trained = [2usize, 4, 1];
    let mut sessions = Vec::new();
    for (i, r) in max_ranks.iter().enumerate() {
        let ep = endpoint(&ClientTls::from_dir(&certs, i)).unwrap();
        let (s, w) = hello(&ep, addr, *r).await;
        assert!(matches!(w, CoordMsg::Welcome { .. }), "{w:?}");
        sessions.push((ep, s));
    }
    let mut deltas = Vec::new();
    for (i, (_, s)) in sessions.iter().enumerate() {
        let o = offer(s).await;
        let r = trained[i];
        assert_eq!(o.rank, max_ranks[i], "client {i}");
        // the offer is the slice: A's first r rows, B's first r columns, exactly
        let slice_spec = fedlora_protocol::rank::slice_spec(&spec(), r).unwrap();
        let got = Codec::decode(
            &o.global,
            &slice_spec,
            Some(&Codec::DenseF32),
            &CodecContext::default(),
        )
        .unwrap();
        let want: Vec<f32> = (0..spec().numel())
            .filter(|&k| component(k) < r)
            .map(|k| initial.values()[k])
            .collect();
        assert_eq!(got.values(), &want[..], "client {i}'s slice");
        // its delta, zero-padded to rank 4 (what the SDK's local_update returns)
        let sliced = wave(slice_spec, |x| ((i + 1) as f32 * 0.3 * x).sin());
        let padded = fedlora_protocol::rank::pad(&sliced, &spec()).unwrap();
        for (k, v) in padded.values().iter().enumerate() {
            if component(k) >= r {
                assert_eq!(*v, 0.0);
            }
        }
        let (reply, _) = s.request(&upload(o.round, &padded, 1.0)).await.unwrap();
        assert!(matches!(reply, CoordMsg::Ack { .. }), "{reply:?}");
        deltas.push(padded);
    }
    committed(&mut events).await;
    let (version, got) = coord.global();
    assert_eq!(version, 1);
    for k in 0..spec().numel() {
        let j = component(k);
        let over: Vec<usize> = (0..3).filter(|&i| trained[i] > j).collect();
        let sum: f64 = over.iter().map(|&i| f64::from(deltas[i].values()[k])).sum();
        let want = initial.values()[k] + (sum / over.len() as f64) as f32;
        assert_eq!(got.values()[k], want, "value {k} (component {j})");
    }
    coord.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scaled_up_update_is_refused_in_the_clear_and_the_clipped_one_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let bound = 1.0;
    let fed = FederationConfig {
        rounds: 1,
        clients_per_round: 2,
        min_clients: 2,
        round_timeout_ms: 60_000,
        eval_timeout_ms: 100,
        strategy: StrategyConfig::FedProx(FedProx { mu: 0.25 }),
        train: TrainConfig {
            codec: Codec::F16,
            weighting: Weighting::Uniform,
            max_update_norm: Some(bound),
            ..Default::default()
        },
        ..Default::default()
    };
    let initial = wave(spec(), |x| (x * 0.2).sin());
    let (coord, addr, certs) = start(dir.path(), 2, fed, initial.clone()).await;
    let mut events = coord.events();
    let mut sessions = Vec::new();
    for i in 0..2 {
        let ep = endpoint(&ClientTls::from_dir(&certs, i)).unwrap();
        let (s, w) = hello(&ep, addr, None).await;
        assert!(matches!(w, CoordMsg::Welcome { .. }), "{w:?}");
        sessions.push((ep, s));
    }
    let norm = |d: &FlatAdapter| {
        d.values()
            .iter()
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let f16 = |d: &FlatAdapter| {
        ClientMsg::Upload(fedlora_protocol::Upload {
            round: 0,
            spec_hash: spec().hash(),
            weight: 1.0,
            train_loss: 0.5,
            payload: Codec::F16.encode(d.values()),
        })
    };
    let with_round = |m: ClientMsg, round: u64| match m {
        ClientMsg::Upload(mut u) => {
            u.round = round;
            ClientMsg::Upload(u)
        }
        other => other,
    };
    // an honest update inside the bound
    let honest = wave(spec(), |x| (x * 0.7).cos() * 0.1);
    assert!(norm(&honest) < bound);
    let o0 = offer(&sessions[0].1).await;
    // FedProx's μ reaches the client with the round, and so does the bound
    assert_eq!(o0.config.proximal_mu, 0.25);
    assert_eq!(o0.config.max_update_norm, Some(bound));
    let (r, _) = sessions[0]
        .1
        .request(&with_round(f16(&honest), o0.round))
        .await
        .unwrap();
    assert!(matches!(r, CoordMsg::Ack { .. }), "{r:?}");
    // a poisoning client scales its update up 50×: refused with a typed refusal
    let o1 = offer(&sessions[1].1).await;
    let big = FlatAdapter::new(spec(), honest.values().iter().map(|v| v * 50.0).collect()).unwrap();
    assert!(norm(&big) > 2.0 * bound);
    let (r, _) = sessions[1]
        .1
        .request(&with_round(f16(&big), o1.round))
        .await
        .unwrap();
    match &r {
        CoordMsg::Refused(x) => {
            assert_eq!(x.code, RefusalCode::UpdateNormExceeded);
            assert!(x.message.contains("exceeds the bound"), "{}", x.message);
        }
        other => panic!("a scaled-up update was not refused: {other:?}"),
    }
    // just over B·(1 + τ) is refused too; the client SDK's clipping makes it acceptable
    let edge = FlatAdapter::new(
        spec(),
        honest
            .values()
            .iter()
            .map(|v| (f64::from(*v) * 1.01 * bound / norm(&honest)) as f32)
            .collect(),
    )
    .unwrap();
    let (r, _) = sessions[1]
        .1
        .request(&with_round(f16(&edge), o1.round))
        .await
        .unwrap();
    assert!(
        matches!(&r, CoordMsg::Refused(x) if x.code == RefusalCode::UpdateNormExceeded),
        "{r:?}"
    );
    let clipped = FlatAdapter::new(
        spec(),
        fedlora_train::learner::clip_update(big.values(), bound),
    )
    .unwrap();
    let (r, _) = sessions[1]
        .1
        .request(&with_round(f16(&clipped), o1.round))
        .await
        .unwrap();
    assert!(matches!(r, CoordMsg::Ack { .. }), "{r:?}");
    committed(&mut events).await;
    let report = coord.report().unwrap();
    assert_eq!(report.rounds[0].record.strategy, "fed-prox");
    coord.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_median_round_keeps_one_garbage_client_of_five_inside_the_honest_range() {
    let dir = tempfile::tempdir().unwrap();
    let fed = FederationConfig {
        rounds: 1,
        clients_per_round: 5,
        min_clients: 5,
        round_timeout_ms: 60_000,
        eval_timeout_ms: 100,
        strategy: StrategyConfig::Median,
        ..Default::default()
    };
    let initial = wave(spec(), |x| (x * 0.05).sin());
    let (coord, addr, certs) = start(dir.path(), 5, fed, initial.clone()).await;
    let mut events = coord.events();
    let mut deltas = Vec::new();
    let mut sessions = Vec::new();
    for i in 0..5 {
        let ep = endpoint(&ClientTls::from_dir(&certs, i)).unwrap();
        let (s, w) = hello(&ep, addr, None).await;
        assert!(matches!(w, CoordMsg::Welcome { .. }), "{w:?}");
        sessions.push((ep, s));
        deltas.push(if i == 4 {
            // garbage: huge values of alternating sign
            wave(spec(), |x| {
                if (x as u32).is_multiple_of(2) {
                    1e4
                } else {
                    -3e3
                }
            })
        } else {
            wave(spec(), |x| 0.01 * (x * 0.3 + i as f32).sin())
        });
    }
    for ((_, s), d) in sessions.iter().zip(&deltas) {
        let o = offer(s).await;
        let (r, _) = s.request(&upload(o.round, d, 1.0)).await.unwrap();
        assert!(matches!(r, CoordMsg::Ack { .. }), "{r:?}");
    }
    committed(&mut events).await;
    let (_, got) = coord.global();
    for k in 0..spec().numel() {
        let honest: Vec<f32> = deltas[..4].iter().map(|d| d.values()[k]).collect();
        let lo = honest.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = honest.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let moved = got.values()[k] - initial.values()[k];
        // within the honest range, up to the f32 rounding of the addition
        assert!(
            moved >= lo - 1e-6 && moved <= hi + 1e-6,
            "value {k}: moved {moved}, honest range [{lo}, {hi}]"
        );
    }
    assert_eq!(coord.report().unwrap().rounds[0].record.strategy, "median");
    coord.shutdown().await;
}
