//! End-to-end tests over real QUIC + mutual TLS on loopback: exact FedAvg, refusals of bad
//! certificates, replays, duplicates and bad frames, and the SDK training real LoRA adapters.

use std::net::SocketAddr;
use std::time::Duration;

use fedlora_client::transport::{endpoint, ClientTls, Session};
use fedlora_coordinator::certs::{default_server_names, init_certs, revoke};
use fedlora_coordinator::{Coordinator, CoordinatorConfig};
use fedlora_protocol::frame::{self, FrameKind, CONTROL_LIMIT};
use fedlora_protocol::{
    fedavg, AckStatus, AdapterSpec, ClientMsg, Codec, CoordMsg, FederationConfig, FlatAdapter,
    RefusalCode, TensorSpec, Upload, PROTOCOL_VERSION,
};

use crate::common;
use common::{offer, upload};

fn spec() -> AdapterSpec {
    AdapterSpec::new(vec![
        TensorSpec {
            name: "blocks.0.q.lora_a".into(),
            shape: vec![2, 5],
        },
        TensorSpec {
            name: "blocks.0.q.lora_b".into(),
            shape: vec![5, 2],
        },
    ])
    .unwrap()
}

fn delta(seed: u32) -> FlatAdapter {
    common::wave(spec(), |x| {
        (x * 0.37 * seed as f32).sin() / (seed as f32 + 0.5)
    })
}

/// Hello for `spec` through `ep`: the session and the answer.
async fn hello(ep: &quinn::Endpoint, addr: SocketAddr, spec: &AdapterSpec) -> (Session, CoordMsg) {
    common::say_hello(ep, addr, spec.hash()).await
}

/// Connects with client certificate `index` of `certs` and says hello: the open session and the
/// answer, or `None` where the handshake or the request failed (a refused certificate).
async fn try_hello(
    certs: &std::path::Path,
    index: usize,
    addr: SocketAddr,
) -> Option<(Session, CoordMsg)> {
    let ep = endpoint(&ClientTls::from_dir(certs, index)).unwrap();
    let s = Session::connect(&ep, addr, "localhost").await.ok()?;
    let hello = ClientMsg::Hello {
        protocol_version: PROTOCOL_VERSION,
        spec_hash: spec().hash(),
        max_rank: None,
    };
    let (reply, _) = s.request(&hello).await.ok()?;
    Some((s, reply))
}

/// Whether client certificate `index` of `certs` gets a welcome.
async fn is_welcomed(certs: &std::path::Path, index: usize, addr: SocketAddr) -> bool {
    matches!(
        try_hello(certs, index, addr).await,
        Some((_, CoordMsg::Welcome { .. }))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedavg_over_quic_is_exact_and_bad_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 4, &default_server_names()).unwrap();
    let rogue = init_certs(&dir.path().join("rogue"), 1, &default_server_names()).unwrap();
    revoke(&certs, &certs.client_cert(3)).unwrap();

    let mut cfg = CoordinatorConfig::new(dir.path().join("state"), &certs.0);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.federation = FederationConfig {
        rounds: 2,
        clients_per_round: 3,
        min_clients: 3,
        round_timeout_ms: 60_000,
        eval_timeout_ms: 300,
        ..Default::default()
    };
    let initial = delta(99);
    let coord = Coordinator::start(cfg, initial.clone()).await.unwrap();
    let addr = coord.local_addr().unwrap();

    // a client whose certificate is not from the federation CA is refused at the handshake
    let ep_rogue = endpoint(&ClientTls::from_dir(&rogue.0, 0)).unwrap();
    let refused = match Session::connect(&ep_rogue, addr, "localhost").await {
        Err(_) => true,
        Ok(s) => s
            .request(&ClientMsg::Hello {
                protocol_version: PROTOCOL_VERSION,
                spec_hash: spec().hash(),
                max_rank: None,
            })
            .await
            .is_err(),
    };
    assert!(
        refused,
        "a certificate from another CA must not get through"
    );

    // a revoked client is refused at the hello
    let ep3 = endpoint(&ClientTls::from_dir(&certs.0, 3)).unwrap();
    let (_, reply) = hello(&ep3, addr, &spec()).await;
    assert!(
        matches!(&reply, CoordMsg::Refused(r) if r.code == RefusalCode::Revoked),
        "{reply:?}"
    );

    // a wrong adapter spec is refused at the hello
    let ep0 = endpoint(&ClientTls::from_dir(&certs.0, 0)).unwrap();
    let other = AdapterSpec::new(vec![TensorSpec {
        name: "x".into(),
        shape: vec![3],
    }])
    .unwrap();
    let (_, reply) = hello(&ep0, addr, &other).await;
    assert!(matches!(&reply, CoordMsg::Refused(r) if r.code == RefusalCode::SpecMismatch));

    let mut sessions = Vec::new();
    for i in 0..3 {
        let ep = endpoint(&ClientTls::from_dir(&certs.0, i)).unwrap();
        let (s, reply) = hello(&ep, addr, &spec()).await;
        assert_eq!(
            reply,
            CoordMsg::Welcome {
                client_id: format!("client-{i}"),
                protocol_version: PROTOCOL_VERSION
            }
        );
        sessions.push((ep, s));
    }

    // garbage, truncated and oversized frames: typed refusals, the connection keeps working
    let s0 = &sessions[0].1;
    let (r, _) = s0.request_raw(b"this is not a frame at all").await.unwrap();
    assert!(
        matches!(&r, CoordMsg::Refused(x) if x.code == RefusalCode::Malformed),
        "{r:?}"
    );
    let mut big = frame::encode(&ClientMsg::Poll { held_version: None }).unwrap();
    big[4..8].copy_from_slice(&((CONTROL_LIMIT as u32) + 1).to_be_bytes());
    let (r, _) = s0.request_raw(&big).await.unwrap();
    assert!(
        matches!(&r, CoordMsg::Refused(x) if x.code == RefusalCode::TooLarge),
        "{r:?}"
    );
    let up = frame::encode(&upload(1, &delta(1), 1.0)).unwrap();
    let (r, _) = s0.request_raw(&up[..up.len() / 2]).await.unwrap();
    assert!(
        matches!(&r, CoordMsg::Refused(x) if x.code == RefusalCode::Malformed),
        "{r:?}"
    );
    let mut wrong_kind = frame::encode(&ClientMsg::Poll { held_version: None }).unwrap();
    wrong_kind[3] = FrameKind::Task as u8;
    let (r, _) = s0.request_raw(&wrong_kind).await.unwrap();
    assert!(
        matches!(&r, CoordMsg::Refused(x) if x.code == RefusalCode::Malformed),
        "{r:?}"
    );

    // round 1
    let weights = [3.0, 5.0, 11.0];
    let mut expected = initial.clone();
    for round_ix in 0..2u32 {
        let mut offers = Vec::new();
        for (_, s) in &sessions {
            offers.push(offer(s).await);
        }
        let round = offers[0].round;
        assert!(offers.iter().all(|o| o.round == round));
        let global = Codec::decode(
            &offers[0].global,
            &spec(),
            Some(&Codec::DenseF32),
            &Default::default(),
        )
        .unwrap();
        assert_eq!(
            global, expected,
            "offer carries the committed global exactly"
        );
        let deltas: Vec<FlatAdapter> = (0..3).map(|i| delta(10 * round_ix + i + 1)).collect();
        for (i, (_, s)) in sessions.iter().enumerate() {
            let (r, _) = s
                .request(&upload(round, &deltas[i], weights[i]))
                .await
                .unwrap();
            assert_eq!(
                r,
                CoordMsg::Ack {
                    round,
                    status: AckStatus::Accepted
                }
            );
            if i == 0 {
                // byte-identical re-send: acknowledged as already accepted
                let (r, _) = s
                    .request(&upload(round, &deltas[i], weights[i]))
                    .await
                    .unwrap();
                assert_eq!(
                    r,
                    CoordMsg::Ack {
                        round,
                        status: AckStatus::AlreadyAccepted
                    }
                );
                // a different upload for the same round: refused
                let (r, _) = s
                    .request(&upload(round, &deltas[2], weights[i]))
                    .await
                    .unwrap();
                assert!(
                    matches!(&r, CoordMsg::Refused(x) if x.code == RefusalCode::DuplicateUpload),
                    "{r:?}"
                );
            }
        }
        let pairs: Vec<(f64, FlatAdapter)> = weights.iter().cloned().zip(deltas).collect();
        expected = fedavg(&expected, &pairs).unwrap();
        if round_ix == 1 {
            break;
        }
        // wait for round 2's offer, then replay an upload of round 1
        let o = offer(&sessions[1].1).await;
        assert_eq!(o.round, round + 1);
        let (r, _) = sessions[1]
            .1
            .request(&upload(round, &delta(7), 1.0))
            .await
            .unwrap();
        assert!(
            matches!(&r, CoordMsg::Refused(x) if x.code == RefusalCode::WrongRound),
            "{r:?}"
        );
        let got = Codec::decode(&o.global, &spec(), None, &Default::default()).unwrap();
        // the new global equals old + Σ wᵢΔᵢ / Σ wᵢ, element for element
        assert_eq!(got.values(), expected.values());
    }
    assert!(coord.wait_finished(Duration::from_millis(10)).await);
    let report = coord.report().unwrap();
    assert_eq!(report.global_version, 2);
    let committed = report
        .rounds
        .iter()
        .filter(|r| r.record.participants.len() == 3)
        .count();
    assert_eq!(committed, 2);
    let final_global = {
        let store_dir = dir.path().join("state");
        coord.shutdown().await;
        let store = fedlora_coordinator::store::Store::open(&store_dir).unwrap();
        Codec::decode(
            &store.checkpoint(2).unwrap(),
            &spec(),
            None,
            &Default::default(),
        )
        .unwrap()
    };
    assert_eq!(final_global.values(), expected.values());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modular_uploads_are_aggregated_by_decoding_only_their_sum() {
    use fedlora_protocol::{codec_seed, CodecContext, ModularParams, Weighting};
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 3, &default_server_names()).unwrap();
    let codec = Codec::Modular(ModularParams {
        value_bits: 12,
        clamp: 2.0,
        fraction: 0.5,
        max_weight: 8,
    });
    let mut cfg = CoordinatorConfig::new(dir.path().join("state"), &certs.0);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.federation = FederationConfig {
        rounds: 1,
        clients_per_round: 3,
        min_clients: 3,
        round_timeout_ms: 60_000,
        eval_timeout_ms: 200,
        ..Default::default()
    };
    cfg.federation.train.codec = codec.clone();
    cfg.federation.train.weighting = Weighting::Uniform;
    let seed = cfg.federation.seed;
    let initial = delta(99);
    let coord = Coordinator::start(cfg, initial.clone()).await.unwrap();
    let addr = coord.local_addr().unwrap();
    let mut sessions = Vec::new();
    for i in 0..3 {
        let ep = endpoint(&ClientTls::from_dir(&certs.0, i)).unwrap();
        sessions.push((ep.clone(), hello(&ep, addr, &spec()).await.0));
    }
    let mut expected = vec![0f64; spec().numel()];
    for (i, (_, s)) in sessions.iter().enumerate() {
        let o = offer(s).await;
        assert_eq!(o.config.codec, codec);
        assert_eq!(o.codec_seed, codec_seed(seed, o.round));
        let ctx = CodecContext {
            round_seed: o.codec_seed,
        };
        let d = delta(i as u32 + 1);
        let mut rng = <rand::rngs::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(i as u64);
        let (payload, _) = codec.encode_with(d.values(), &ctx, 1, &mut rng);
        let decoded = Codec::decode(&payload, &spec(), Some(&codec), &ctx).unwrap();
        for (e, v) in expected.iter_mut().zip(decoded.values()) {
            *e += f64::from(*v);
        }
        let up = ClientMsg::Upload(Upload {
            round: o.round,
            spec_hash: spec().hash(),
            weight: 1.0,
            train_loss: 1.0,
            payload,
        });
        let (r, _) = s.request(&up).await.unwrap();
        assert!(matches!(r, CoordMsg::Ack { .. }), "{r:?}");
    }
    assert!(coord.wait_finished(Duration::from_millis(10)).await);
    let store_dir = dir.path().join("state");
    coord.shutdown().await;
    let store = fedlora_coordinator::store::Store::open(&store_dir).unwrap();
    let got = Codec::decode(
        &store.checkpoint(1).unwrap(),
        &spec(),
        None,
        &Default::default(),
    )
    .unwrap();
    for ((g, i), e) in got.values().iter().zip(initial.values()).zip(&expected) {
        let want = f64::from(*i) + e / 3.0;
        assert!((f64::from(*g) - want).abs() < 1e-6, "{g} vs {want}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_optimizer_continues_its_moments_exactly_after_a_restart() {
    use fedlora_protocol::strategy::{
        Contribution, OptimizerState, ServerOptimizer, StrategyConfig,
    };
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 2, &default_server_names()).unwrap();
    let strategy = StrategyConfig::FedAdam(ServerOptimizer {
        server_lr: 0.1,
        ..Default::default()
    });
    let config = || {
        let mut cfg = CoordinatorConfig::new(dir.path().join("state"), &certs.0);
        cfg.listen = "127.0.0.1:0".parse().unwrap();
        cfg.federation = FederationConfig {
            rounds: 2,
            clients_per_round: 2,
            min_clients: 2,
            round_timeout_ms: 60_000,
            eval_timeout_ms: 100,
            strategy: strategy.clone(),
            ..Default::default()
        };
        cfg
    };
    let initial = delta(9);
    let mut expected = initial.clone();
    let mut moments = OptimizerState::default();
    for round_ix in 0..2u32 {
        // a fresh coordinator process state for each round: round 2 runs after a restart
        let coord = Coordinator::start(config(), initial.clone()).await.unwrap();
        let addr = coord.local_addr().unwrap();
        let mut events = coord.events();
        let deltas = [delta(2 * round_ix + 1), delta(2 * round_ix + 2)];
        let mut sessions = Vec::new();
        for i in 0..2 {
            let ep = endpoint(&ClientTls::from_dir(&certs.0, i)).unwrap();
            let (s, w) = hello(&ep, addr, &spec()).await;
            assert!(matches!(w, CoordMsg::Welcome { .. }), "{w:?}");
            sessions.push((ep, s));
        }
        for ((_, s), d) in sessions.iter().zip(&deltas) {
            let o = offer(s).await;
            let (r, _) = s.request(&upload(o.round, d, 1.0)).await.unwrap();
            assert!(matches!(r, CoordMsg::Ack { .. }), "{r:?}");
        }
        loop {
            if let Ok(fedlora_coordinator::Event::RoundCommitted { .. }) =
                tokio::time::timeout(Duration::from_secs(30), events.recv())
                    .await
                    .expect("the round commits")
            {
                break;
            }
        }
        let ups: Vec<Contribution<'_>> = deltas
            .iter()
            .map(|d| Contribution {
                weight: 1.0,
                rank: 1,
                delta: d,
            })
            .collect();
        let s = strategy.build();
        let mean = s.combine(1, &ups).unwrap();
        expected = s.next_global(&mut moments, &expected, &mean).unwrap();
        let (version, got) = coord.global();
        assert_eq!(version, u64::from(round_ix) + 1);
        // bit-exact: the restarted coordinator continued the moments of round 1
        assert_eq!(got.values(), expected.values(), "round {}", round_ix + 1);
        let report = coord.report().unwrap();
        assert!(report
            .rounds
            .iter()
            .all(|r| r.record.strategy == "fed-adam"));
        coord.shutdown().await;
    }
}

/// The metrics port accepts a connection only once the first status snapshot is on disk, so an
/// operator's probe that waits for the port (as `cli_first_hour` does) can run `fedlora status`
/// at once. Before the fix the port listened from the start of `Coordinator::start`, before the
/// store was even opened, and `fedlora status` raced the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_port_accepts_only_after_the_first_status_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 1, &default_server_names()).unwrap();
    let metrics: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let data = dir.path().join("state");
    let mut cfg = CoordinatorConfig::new(data.clone(), &certs.0);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.metrics = Some(metrics);
    // a probe that connects as fast as it can, and looks for the snapshot the moment it gets in
    let snapshot = fedlora_coordinator::status::snapshot_path(&data);
    let probe = std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        loop {
            if std::net::TcpStream::connect(metrics).is_ok() {
                return snapshot.exists();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "metrics never came up"
            );
            std::thread::yield_now();
        }
    });
    let coord = Coordinator::start(cfg, delta(1)).await.unwrap();
    assert!(
        tokio::task::spawn_blocking(move || probe.join().unwrap())
            .await
            .unwrap(),
        "the metrics port accepted before the status snapshot was written"
    );
    coord.shutdown().await;
}

/// A client certificate with common name `cn`, signed by the federation CA in `certs` (as a
/// compromised or careless issuer could), written beside the others as index `index`.
fn issue_named(certs: &std::path::Path, cn: &str, index: usize) {
    let d = fedlora_coordinator::certs::CertDir(certs.to_path_buf());
    issue_by(certs, cn, index, (&d.ca(), &d.ca_key()), true, false);
}

/// A leaf certificate named `cn` signed by the CA whose certificate and key are `by` (with that
/// CA's certificate after it in the chain file when `chain`), with clientAuth or with no
/// extended key usage, written as client certificate `index` of `certs`.
fn issue_by(
    certs: &std::path::Path,
    cn: &str,
    index: usize,
    by: (&std::path::Path, &std::path::Path),
    client_auth: bool,
    chain: bool,
) {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
    let d = fedlora_coordinator::certs::CertDir(certs.to_path_buf());
    let issuer_pem = std::fs::read_to_string(by.0).unwrap();
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(by.1).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&issuer_pem, ca_key).unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    // without clientAuth: no extended key usage at all, which TLS lets through
    p.extended_key_usages = if client_auth {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    } else {
        vec![]
    };
    let k = KeyPair::generate().unwrap();
    let c = p.signed_by(&k, &issuer).unwrap();
    let mut pem = c.pem();
    if chain {
        pem.push_str(&issuer_pem);
    }
    std::fs::write(d.client_cert(index), pem).unwrap();
    std::fs::write(d.client_key(index), k.serialize_pem()).unwrap();
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A certificate from the federation's own CA whose common name is a path (`../../../x`, an
/// absolute path) is refused at the connection, before a hello, and an upload under it never
/// writes a file anywhere: ids name files, so they are checked before they name one. Before the
/// fix the hello was welcomed and the upload went to `uploads/r1/../../../escaped.bin`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_whose_name_is_a_path_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let data = root.join("a").join("b").join("state");
    let certs = init_certs(&root.join("certs"), 1, &default_server_names()).unwrap();
    let abs = root.join("absolute");
    let hostile = [
        "../../../escaped".to_string(),
        abs.display().to_string(),
        "client-0\nforged log line".to_string(),
    ];
    for (i, cn) in hostile.iter().enumerate() {
        issue_named(&certs.0, cn, 1 + i);
    }
    let mut cfg = CoordinatorConfig::new(data.clone(), &certs.0);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.federation = FederationConfig {
        rounds: 1,
        clients_per_round: 1,
        min_clients: 1,
        round_timeout_ms: 60_000,
        ..Default::default()
    };
    let coord = Coordinator::start(cfg, delta(3)).await.unwrap();
    let addr = coord.local_addr().unwrap();
    for (i, cn) in hostile.iter().enumerate() {
        let welcomed = match try_hello(&certs.0, 1 + i, addr).await {
            Some((s, CoordMsg::Welcome { .. })) => {
                // what a hostile client does next: an upload for round 1
                let _ = s.request(&upload(1, &delta(5), 1.0)).await;
                true
            }
            _ => false,
        };
        assert!(!welcomed, "a certificate named {cn:?} was welcomed");
    }
    // nothing landed outside the data directory, and no upload inside it
    let outside: Vec<_> = files_under(&root)
        .into_iter()
        .filter(|p| !p.starts_with(&data) && !p.starts_with(&certs.0))
        .collect();
    assert!(
        outside.is_empty(),
        "written outside the data directory: {outside:?}"
    );
    assert!(files_under(&data.join("uploads")).is_empty());
    coord.shutdown().await;
}

/// Values that are finite alone can overflow once summed into the global adapter: before the
/// fix such a global was committed, and every client then refused it. Now the round fails with
/// its reason, the global stays at its last finite version, and a fresh round follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_that_would_overflow_is_never_committed() {
    use fedlora_coordinator::store::RoundStatus;
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 1, &default_server_names()).unwrap();
    let mut cfg = CoordinatorConfig::new(dir.path().join("state"), &certs.0);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.federation = FederationConfig {
        rounds: 3,
        clients_per_round: 1,
        min_clients: 1,
        round_timeout_ms: 60_000,
        eval_timeout_ms: 300,
        ..Default::default()
    };
    let coord = Coordinator::start(cfg, delta(99)).await.unwrap();
    let addr = coord.local_addr().unwrap();
    let ep = endpoint(&ClientTls::from_dir(&certs.0, 0)).unwrap();
    let (s, welcome) = hello(&ep, addr, &spec()).await;
    assert!(matches!(welcome, CoordMsg::Welcome { .. }), "{welcome:?}");
    // 3e38 is a finite f32; twice it is not
    let huge = common::wave(spec(), |_| 3e38);
    let mut rounds = Vec::new();
    for _ in 0..2 {
        let o = offer(&s).await;
        rounds.push(o.round);
        let (reply, _) = s.request(&upload(o.round, &huge, 1.0)).await.unwrap();
        assert!(matches!(reply, CoordMsg::Ack { .. }), "{reply:?}");
    }
    // the third offer comes from a fresh round after the failed one
    let third = offer(&s).await;
    let report = coord.report().unwrap();
    assert_eq!(
        report.global_version, 1,
        "the overflowing global was not committed"
    );
    let failed = report
        .rounds
        .iter()
        .find(|r| r.record.round == rounds[1])
        .expect("a record of the second round");
    match &failed.record.status {
        RoundStatus::Failed { reason } => {
            assert!(reason.contains("not finite"), "{reason}")
        }
        other => panic!("round {} is {other:?}", rounds[1]),
    }
    assert!(third.round > rounds[1]);
    assert_eq!(third.global_version, 1);
    coord.shutdown().await;
}

/// The first request of a connection must be a hello: an upload sent first is refused from its
/// frame header (its body never read, no payload budget drawn) and the connection is closed.
/// Before the fix the body was read through the shared payload budget and the connection stayed
/// open, so a few certificates could hold the budget every upload waits on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_request_that_is_not_a_hello_ends_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 1, &default_server_names()).unwrap();
    let mut cfg = CoordinatorConfig::new(dir.path().join("state"), &certs.0);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    let coord = Coordinator::start(cfg, delta(1)).await.unwrap();
    let addr = coord.local_addr().unwrap();
    let ep = endpoint(&ClientTls::from_dir(&certs.0, 0)).unwrap();
    let s = Session::connect(&ep, addr, "localhost").await.unwrap();
    let (reply, _) = s.request(&upload(1, &delta(5), 1.0)).await.unwrap();
    assert!(
        matches!(&reply, CoordMsg::Refused(r) if r.code == RefusalCode::NotRegistered),
        "{reply:?}"
    );
    let hello_msg = ClientMsg::Hello {
        protocol_version: PROTOCOL_VERSION,
        spec_hash: spec().hash(),
        max_rank: None,
    };
    let after = tokio::time::timeout(Duration::from_secs(10), s.request(&hello_msg)).await;
    assert!(
        !matches!(after, Ok(Ok((CoordMsg::Welcome { .. }, _)))),
        "the connection stayed open after a request before the hello: {after:?}"
    );
    // a fresh connection that says hello first is served
    let (_, welcome) = hello(&ep, addr, &spec()).await;
    assert!(matches!(welcome, CoordMsg::Welcome { .. }), "{welcome:?}");
    coord.shutdown().await;
}

/// What TLS does not check, the coordinator does: a certificate the federation CA signed without
/// clientAuth is refused, and an enrollment issuer (an intermediate) cannot mint a `certs init`
/// id such as `client-0`, while the `device-…` id it exists for is welcomed. Before, all three
/// were welcomed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_cannot_cross_issuers_and_client_certificates_need_client_auth() {
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 1, &default_server_names()).unwrap();
    let (icert, ikey) = (dir.path().join("issuer.pem"), dir.path().join("issuer.key"));
    fedlora_coordinator::certs::make_issuer(&certs, &icert, &ikey).unwrap();
    let d = &certs;
    issue_by(
        &certs.0,
        "client-7",
        1,
        (&d.ca(), &d.ca_key()),
        false,
        false,
    );
    issue_by(&certs.0, "client-0", 2, (&icert, &ikey), true, true);
    issue_by(
        &certs.0,
        "device-00aa11bb22cc",
        3,
        (&icert, &ikey),
        true,
        true,
    );
    let mut cfg = CoordinatorConfig::new(dir.path().join("state"), &certs.0);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    let coord = Coordinator::start(cfg, delta(1)).await.unwrap();
    let addr = coord.local_addr().unwrap();
    let welcomed = |i| is_welcomed(&certs.0, i, addr);
    assert!(
        !welcomed(1).await,
        "a certificate without clientAuth was welcomed"
    );
    assert!(
        !welcomed(2).await,
        "the enrollment issuer minted a certs-init id that was welcomed"
    );
    assert!(welcomed(3).await, "an enrolled device id is welcomed");
    assert!(welcomed(0).await, "a certs-init client is welcomed");
    coord.shutdown().await;
}

/// The enrollment issuer is limited to client certificates: a server certificate it signs for
/// the coordinator's own name (what a compromised enrollment service would mint to stand in for
/// the coordinator) fails the devices' TLS checks. Before, the issuer had no extended key usage
/// and such a certificate was accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_enrollment_issuer_cannot_mint_a_server_certificate() {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 1, &default_server_names()).unwrap();
    let (icert, ikey) = (dir.path().join("issuer.pem"), dir.path().join("issuer.key"));
    fedlora_coordinator::certs::make_issuer(&certs, &icert, &ikey).unwrap();
    let issuer_pem = std::fs::read_to_string(&icert).unwrap();
    let issuer = Issuer::from_ca_cert_pem(
        &issuer_pem,
        KeyPair::from_pem(&std::fs::read_to_string(&ikey).unwrap()).unwrap(),
    )
    .unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name
        .push(DnType::CommonName, "rogue coordinator");
    p.subject_alt_names = vec![SanType::DnsName("localhost".try_into().unwrap())];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let k = KeyPair::generate().unwrap();
    let leaf = p.signed_by(&k, &issuer).unwrap();
    // the rogue server presents its leaf and the issuer, as a real chain
    std::fs::write(certs.server_cert(), leaf.pem() + &issuer_pem).unwrap();
    std::fs::write(certs.server_key(), k.serialize_pem()).unwrap();
    let mut cfg = CoordinatorConfig::new(dir.path().join("state"), &certs.0);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    let coord = Coordinator::start(cfg, delta(1)).await.unwrap();
    let addr = coord.local_addr().unwrap();
    let accepted = try_hello(&certs.0, 0, addr).await.is_some();
    assert!(
        !accepted,
        "a device accepted a server certificate from the enrollment issuer"
    );
    coord.shutdown().await;
}

/// An enrolled device's id is bound to the key it first said hello with: a second certificate
/// for the same `device-…` id with another key (what a compromised enrollment service, or a
/// careless CA holder, could mint to take a device's place) is refused as revoked, while the
/// device's own certificate keeps working. Before, the second key was welcomed as the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_id_is_bound_to_its_first_key() {
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 1, &default_server_names()).unwrap();
    let (icert, ikey) = (dir.path().join("issuer.pem"), dir.path().join("issuer.key"));
    fedlora_coordinator::certs::make_issuer(&certs, &icert, &ikey).unwrap();
    let id = "device-0123456789ab";
    issue_by(&certs.0, id, 1, (&icert, &ikey), true, true);
    issue_by(&certs.0, id, 2, (&icert, &ikey), true, true);
    issue_by(&certs.0, id, 3, (&certs.ca(), &certs.ca_key()), true, false);
    let mut cfg = CoordinatorConfig::new(dir.path().join("state"), &certs.0);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    let coord = Coordinator::start(cfg, delta(1)).await.unwrap();
    let addr = coord.local_addr().unwrap();
    assert!(
        is_welcomed(&certs.0, 1, addr).await,
        "the device's first key"
    );
    for other in [2, 3] {
        match try_hello(&certs.0, other, addr).await {
            Some((_, CoordMsg::Refused(r))) => {
                assert_eq!(r.code, RefusalCode::Revoked, "{}", r.message);
                assert!(r.message.contains("bound to another key"), "{}", r.message);
            }
            other => panic!("a second key for {id} was not refused: {other:?}"),
        }
    }
    assert!(
        is_welcomed(&certs.0, 1, addr).await,
        "the device still works"
    );
    assert!(
        is_welcomed(&certs.0, 0, addr).await,
        "certs-init clients are unaffected"
    );
    coord.shutdown().await;
}

/// Only a participant of the open round parks upload pieces on disk: a registered client with
/// no open round to take part in (here the round waits for a second client) is refused, and
/// nothing is written under the data directory's `partial/`. Before, any registered client
/// could park up to the payload limit there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_pieces_are_taken_from_participants_of_the_open_round_only() {
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 2, &default_server_names()).unwrap();
    let mut cfg = CoordinatorConfig::new(dir.path().join("state"), &certs.0);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.federation.clients_per_round = 2;
    cfg.federation.min_clients = 2;
    let coord = Coordinator::start(cfg, delta(1)).await.unwrap();
    let addr = coord.local_addr().unwrap();
    let Some((s, CoordMsg::Welcome { .. })) = try_hello(&certs.0, 0, addr).await else {
        panic!("not welcomed")
    };
    let piece = fedlora_protocol::resumable::UploadChunk {
        upload_id: [7; 32],
        total_len: 1 << 20,
        offset: 0,
        bytes: vec![0x5a; 64 * 1024],
    };
    let (reply, _) = s.request(&ClientMsg::UploadChunk(piece)).await.unwrap();
    match reply {
        CoordMsg::Refused(r) => assert_eq!(r.code, RefusalCode::NotSelected, "{}", r.message),
        other => panic!("a piece was taken from a client outside any round: {other:?}"),
    }
    let parked = files_under(&dir.path().join("state/partial"));
    assert!(parked.is_empty(), "{parked:?}");
    // a declared 60 MiB upload body from a non-participant is refused from its header, before
    // it reserves any of the payload budget (before: the budget was held while the body
    // trickled in, and here the empty body ended as a truncated frame)
    let mut header = vec![b'F', b'L', 1, 3];
    header.extend_from_slice(&(60u32 << 20).to_be_bytes());
    let (reply, _) = s.request_raw(&header).await.unwrap();
    match reply {
        CoordMsg::Refused(r) => assert_eq!(r.code, RefusalCode::NotSelected, "{}", r.message),
        other => panic!("{other:?}"),
    }
    coord.shutdown().await;
}

/// A poll answered "wait" is held until the round machine moves: a client waiting for a second
/// client learns of the round as it opens, not at its next poll (here 8 s away). Before, the
/// answer was at once "wait 8 s", and the round started a poll interval late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_poll_is_answered_as_the_round_opens() {
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 2, &default_server_names()).unwrap();
    let mut cfg = CoordinatorConfig::new(dir.path().join("state"), &certs.0);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.poll_interval_ms = 8_000;
    cfg.federation = common::federation(1, 2, 2, 1, 60);
    let coord = Coordinator::start(cfg, delta(1)).await.unwrap();
    let addr = coord.local_addr().unwrap();
    let (first, _) = common::hello(&ClientTls::from_dir(&certs.0, 0), addr, spec().hash()).await;
    let waiting = tokio::spawn(async move {
        let task = common::poll(&first).await;
        (task, std::time::Instant::now(), first)
    });
    // the only client: nothing can start, and its poll is held, not answered
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(
        !waiting.is_finished(),
        "a poll with nothing to do was answered at once"
    );
    let (_second, _) = common::hello(&ClientTls::from_dir(&certs.0, 1), addr, spec().hash()).await;
    let joined = std::time::Instant::now();
    let (task, answered, _first) = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the held poll was never answered")
        .unwrap();
    assert!(
        matches!(task, fedlora_protocol::Task::Train(_)),
        "the round opened and the held poll got: {task:?}"
    );
    let after = answered.saturating_duration_since(joined);
    assert!(
        after < Duration::from_secs(5),
        "the offer came {after:?} after the second client joined: not as the round opened"
    );
    coord.shutdown().await;
}
