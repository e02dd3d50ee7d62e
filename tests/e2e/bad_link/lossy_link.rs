//! Devices on a bad link: an in-process UDP proxy between the clients and the coordinator drops
//! 10 % of the datagrams each way and delays each by 50 ms; the global adapter goes down in
//! pieces, and the link is cut for longer than the QUIC idle timeout in the middle of an
//! upload. The upload resumes from the pieces the coordinator holds, the federation completes,
//! each client reports what it sent, and no upload is counted twice.

use crate::common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burn::tensor::Device;
use fedlora_client::sdk::{ClientConfig, FederatedClient};
use fedlora_client::transport::ClientTls;
use fedlora_coordinator::certs::{default_server_names, init_certs};
use fedlora_coordinator::store::RoundStatus;
use fedlora_coordinator::{Coordinator, CoordinatorConfig, Event};
use fedlora_train::adapter::{collect_named, NamedFilter};
use fedlora_train::data::ClientData;
use fedlora_train::lora::LoraConfig;
use fedlora_train::train::{initial_adapter, LocalTrainer};
use rand::{RngExt, SeedableRng};
use tokio::net::UdpSocket;

/// The clients' QUIC idle timeout in this test (the default is 60 s): the connection's
/// effective one, as it is the smaller of the two peers'.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the link is cut: past the idle timeout, so the connection is lost.
const LINK_DOWN: Duration = Duration::from_secs(10);

/// What the proxy does to the datagrams it relays.
struct Link {
    loss: f64,
    delay: Duration,
    rng: Mutex<rand::rngs::ChaCha20Rng>,
    /// While set, every datagram is dropped.
    cut: AtomicBool,
    dropped: AtomicU64,
    cuts: AtomicU64,
    /// Bytes relayed to the clients.
    down_bytes: AtomicU64,
}

impl Link {
    /// Whether to drop a datagram.
    fn drop_it(&self) -> bool {
        let lost =
            self.cut.load(Ordering::SeqCst) || self.rng.lock().unwrap().random::<f64>() < self.loss;
        if lost {
            self.dropped.fetch_add(1, Ordering::SeqCst);
        }
        lost
    }
}

/// A UDP proxy in front of `upstream`: one upstream socket per client address.
async fn proxy(upstream: SocketAddr, link: Arc<Link>) -> SocketAddr {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        let mut peers: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((n, from)) = front.recv_from(&mut buf).await else {
                return;
            };
            let up = match peers.get(&from) {
                Some(s) => s.clone(),
                None => {
                    let s = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                    s.connect(upstream).await.unwrap();
                    peers.insert(from, s.clone());
                    // the coordinator's answers back to this client
                    let (s2, front2, link2) = (s.clone(), front.clone(), link.clone());
                    tokio::spawn(async move {
                        let mut b = vec![0u8; 65_536];
                        while let Ok(n) = s2.recv(&mut b).await {
                            if link2.drop_it() {
                                continue;
                            }
                            link2.down_bytes.fetch_add(n as u64, Ordering::SeqCst);
                            let (d, f, pkt) = (link2.delay, front2.clone(), b[..n].to_vec());
                            tokio::spawn(async move {
                                tokio::time::sleep(d).await;
                                let _ = f.send_to(&pkt, from).await;
                            });
                        }
                    });
                    s
                }
            };
            if link.drop_it() {
                continue;
            }
            let (d, pkt) = (link.delay, buf[..n].to_vec());
            tokio::spawn(async move {
                tokio::time::sleep(d).await;
                let _ = up.send(&pkt).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_resume_over_a_lossy_slow_link_cut_for_longer_than_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 2, &default_server_names())
        .unwrap()
        .0;
    // an adapter just above the 64 KiB inline limit (2 layers × q, v × rank 18 × 128 × 2 × 4
    // bytes = 72 KiB), so that downloads go in pieces too
    let lm = common::tiny_lm(128, 2, Some(LoraConfig::new().with_rank(18)));
    let device = Device::flex().autodiff();
    let base = collect_named(
        &common::tiny_lm(128, 2, None).init(&device),
        NamedFilter::All,
    );
    let trainer = LocalTrainer::new(lm.clone(), &base, device).unwrap();
    let mut cfg = CoordinatorConfig::new(dir.path().join("state"), &certs);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.federation = common::federation(2, 2, 2, 3, 480);
    cfg.federation.train.batch_size = 4;
    let coord = Coordinator::start(cfg, initial_adapter(&lm).unwrap())
        .await
        .unwrap();
    let link = Arc::new(Link {
        loss: 0.10,
        delay: Duration::from_millis(50),
        rng: Mutex::new(rand::rngs::ChaCha20Rng::seed_from_u64(7)),
        cut: AtomicBool::new(false),
        dropped: AtomicU64::new(0),
        cuts: AtomicU64::new(0),
        down_bytes: AtomicU64::new(0),
    });
    let front = proxy(coord.local_addr().unwrap(), link.clone()).await;

    // the link is cut, past the idle timeout, once the coordinator holds a piece of a round-2
    // upload (16 KiB pieces); downloads of the 72 KiB global go in pieces through the lossy link
    // (a cut timed by bytes relayed did not land inside a download reliably, so none is asserted)
    let (l, state, mut events) = (link.clone(), dir.path().join("state"), coord.events());
    tokio::spawn(async move {
        while let Ok(e) = events.recv().await {
            if let Event::RoundStarted { round: 2, .. } = e {
                common::wait_for_partial_upload(&state, 16_384).await;
                l.cut.store(true, Ordering::SeqCst);
                l.cuts.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(LINK_DOWN).await;
                l.cut.store(false, Ordering::SeqCst);
                return;
            }
        }
    });
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let mut cc = ClientConfig::new(front, ClientTls::from_dir(&certs, i));
            cc.sampling_seed = Some(i as u64);
            cc.state_dir = Some(dir.path().join(format!("client-{i}")));
            // resumable transfers in pieces, so that a cut falls between pieces
            cc.upload_chunk_bytes = 16_384;
            // a short idle timeout, so the cut outlasts it quickly
            cc.timers.idle_timeout = IDLE_TIMEOUT;
            let data = ClientData::demo_client(i, 16).unwrap();
            let client = FederatedClient::new(cc, trainer.clone(), data).unwrap();
            tokio::spawn(async move { client.run().await })
        })
        .collect();
    let finished = tokio::time::timeout(
        Duration::from_secs(420),
        coord.wait_finished(Duration::from_millis(300)),
    )
    .await
    .expect("the federation finishes over the bad link");
    assert!(finished);
    assert_eq!(link.cuts.load(Ordering::SeqCst), 1, "the link was cut once");
    assert!(link.dropped.load(Ordering::SeqCst) > 0);
    let (mut total_up, mut resumed_up) = (0, 0);
    for h in handles {
        let r = h.await.unwrap().unwrap();
        // each round once, whatever was re-sent
        assert_eq!(r.rounds, vec![1, 2], "{r:?}");
        assert!(r.bytes_up > 0);
        total_up += r.bytes_up;
        resumed_up += r.resumed_uploads;
    }
    // the upload cut mid-way went on from the pieces the coordinator held
    assert!(resumed_up >= 1, "no upload resumed");
    let report = coord.report().unwrap();
    for round in &report.rounds {
        assert!(matches!(round.record.status, RoundStatus::Committed { .. }));
        // one aggregated upload per client, and their bytes counted once each
        assert_eq!(round.record.participants.len(), 2, "{:?}", round.record);
        assert_eq!(round.record.bytes_up.len(), 2);
    }
    println!(
        "bytes sent by the clients: {total_up}; datagrams dropped: {}",
        link.dropped.load(Ordering::SeqCst)
    );
    coord.shutdown().await;
}
