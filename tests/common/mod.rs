//! Helpers shared by the end-to-end tests: polling a coordinator, synthetic deltas, dense
//! uploads. (Each test binary uses a subset.)
#![allow(dead_code)]

use std::time::Duration;

use fedlora_client::transport::Session;
use fedlora_protocol::{
    AdapterSpec, ClientMsg, Codec, CoordMsg, FlatAdapter, RoundOffer, Task, Upload,
};

/// Connects through `ep` to `addr` (server name `localhost`) and says hello for an adapter of
/// `spec_hash`: the session and the coordinator's answer, whatever it is.
pub(crate) async fn say_hello(
    ep: &quinn::Endpoint,
    addr: std::net::SocketAddr,
    spec_hash: fedlora_protocol::SpecHash,
) -> (Session, CoordMsg) {
    let s = Session::connect(ep, addr, "localhost").await.unwrap();
    let (reply, _) = s
        .request(&ClientMsg::Hello {
            protocol_version: fedlora_protocol::PROTOCOL_VERSION,
            spec_hash,
            max_rank: None,
        })
        .await
        .unwrap();
    (s, reply)
}

/// One poll: the coordinator's task for this client.
pub(crate) async fn poll(s: &Session) -> Task {
    match s
        .request(&ClientMsg::Poll { held_version: None })
        .await
        .unwrap()
        .0
    {
        CoordMsg::Task(t) => t,
        other => panic!("unexpected answer to a poll: {other:?}"),
    }
}

/// Polls (every 10 ms, for up to about 30 s) until a task other than `Wait` arrives.
pub(crate) async fn next_task(s: &Session) -> Task {
    for _ in 0..3000 {
        match poll(s).await {
            Task::Wait { .. } => tokio::time::sleep(Duration::from_millis(10)).await,
            t => return t,
        }
    }
    panic!("no task")
}

/// Polls until a round offer arrives (waiting out `Wait` and `AlreadyUploaded`).
pub(crate) async fn offer(s: &Session) -> RoundOffer {
    for _ in 0..3000 {
        match poll(s).await {
            Task::Train(o) => return o,
            Task::Wait { .. } | Task::AlreadyUploaded { .. } => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            other => panic!("unexpected task {other:?}"),
        }
    }
    panic!("no offer")
}

/// A deterministic delta of `spec`: value `i` is `f(i + 1)`.
pub(crate) fn wave(spec: AdapterSpec, f: impl Fn(f32) -> f32) -> FlatAdapter {
    let v = (0..spec.numel()).map(|i| f(i as f32 + 1.0)).collect();
    FlatAdapter::new(spec, v).unwrap()
}

/// A dense f32 upload of `d` for `round`.
pub(crate) fn upload(round: u64, d: &FlatAdapter, weight: f64) -> ClientMsg {
    ClientMsg::Upload(Upload {
        round,
        spec_hash: d.spec().hash(),
        weight,
        train_loss: 1.0,
        payload: Codec::DenseF32.encode(d.values()),
    })
}

/// The one-tensor spec of the secure-aggregation tests: a 40 × 8 LoRA `B`.
pub(crate) fn secagg_spec() -> AdapterSpec {
    AdapterSpec::new(vec![fedlora_protocol::TensorSpec {
        name: "blocks.0.q.lora_b".into(),
        shape: vec![40, 8],
    }])
    .unwrap()
}

/// A deterministic delta of [`secagg_spec`], different for each `seed`.
pub(crate) fn secagg_delta(seed: u32) -> FlatAdapter {
    wave(secagg_spec(), |x| (x * 0.013 * seed as f32).sin() * 0.1)
}

/// The modular codec of the secure-aggregation tests (12-bit values, clamp 0.2, sums of up to
/// 4 inputs), with its parameters.
pub(crate) fn secagg_modular() -> (Codec, fedlora_protocol::ModularParams) {
    let mp = fedlora_protocol::ModularParams {
        value_bits: 12,
        clamp: 0.2,
        fraction: 0.5,
        max_weight: 4,
    };
    (Codec::Modular(mp.clone()), mp)
}

/// Connects with `tls` and says hello for an adapter of `spec_hash`: the session and the
/// client id the coordinator assigned (panics on anything but a welcome).
pub(crate) async fn hello(
    tls: &fedlora_client::transport::ClientTls,
    addr: std::net::SocketAddr,
    spec_hash: fedlora_protocol::SpecHash,
) -> (Session, String) {
    let ep = fedlora_client::transport::endpoint(tls).unwrap();
    let (s, w) = say_hello(&ep, addr, spec_hash).await;
    let CoordMsg::Welcome { client_id, .. } = w else {
        panic!("{w:?}")
    };
    (s, client_id)
}

/// The newest version a device has seen committed, from the coordinator's events.
pub(crate) struct Committed {
    events: tokio::sync::broadcast::Receiver<fedlora_coordinator::Event>,
    /// The newest committed version seen so far.
    pub(crate) version: u64,
}

impl Committed {
    /// Follows `events` from now on.
    pub(crate) fn new(
        events: tokio::sync::broadcast::Receiver<fedlora_coordinator::Event>,
    ) -> Self {
        Self { events, version: 0 }
    }

    /// Takes in the commits announced so far, without waiting.
    pub(crate) fn drain(&mut self) {
        while let Ok(e) = self.events.try_recv() {
            if let fedlora_coordinator::Event::RoundCommitted { version, .. } = e {
                self.version = self.version.max(version);
            }
        }
    }

    /// Waits (up to 30 s per event) until version `v` has committed.
    pub(crate) async fn wait_for(&mut self, v: u64) {
        while self.version < v {
            if let Ok(fedlora_coordinator::Event::RoundCommitted { version, .. }) =
                tokio::time::timeout(Duration::from_secs(30), self.events.recv())
                    .await
                    .expect("versions commit")
            {
                self.version = self.version.max(version);
            }
        }
    }
}

/// The update scripted async device `i` sends for an offer of `round` (different for each
/// device and round).
pub(crate) fn async_delta(i: usize, round: u64) -> FlatAdapter {
    wave(secagg_spec(), |x| {
        ((x * 0.01 * (i + 1) as f32) + round as f32).sin() * 0.1
    })
}

/// Sends one secure-aggregation stage's message and expects an acknowledgement.
pub(crate) async fn send_secagg(s: &Session, round: u64, body: fedlora_protocol::SecAggBody) {
    let (r, _) = s.request(&ClientMsg::SecAgg { round, body }).await.unwrap();
    assert!(matches!(r, CoordMsg::Ack { .. }), "{r:?}");
}

/// A small byte-level LM config: `d_model` wide, `layers` deep, 2 heads, context 16.
pub(crate) fn tiny_lm(
    d_model: usize,
    layers: usize,
    lora: Option<fedlora_train::lora::LoraConfig>,
) -> fedlora_train::model::LmConfig {
    fedlora_train::model::LmConfig::new()
        .with_d_model(d_model)
        .with_n_layers(layers)
        .with_n_heads(2)
        .with_d_ff(2 * d_model)
        .with_context(16)
        .with_lora(lora)
}

/// Waits until the coordinator with data directory `data_dir` holds at least `bytes` of some
/// client's resumable upload on disk (`DATA_DIR/partial/*.part`).
pub(crate) async fn wait_for_partial_upload(data_dir: &std::path::Path, bytes: u64) {
    loop {
        let held = std::fs::read_dir(data_dir.join("partial"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "part"))
            .any(|e| e.metadata().is_ok_and(|m| m.len() >= bytes));
        if held {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `rounds` rounds of `k` clients (at least `min` uploads), `steps` local steps each, with
/// deadlines of `timeout_s` for a round and a quarter of it for an evaluation.
pub(crate) fn federation(
    rounds: u64,
    k: usize,
    min: usize,
    steps: u32,
    timeout_s: u64,
) -> fedlora_protocol::FederationConfig {
    let mut f = fedlora_protocol::FederationConfig {
        rounds,
        clients_per_round: k,
        min_clients: min,
        round_timeout_ms: timeout_s * 1000,
        eval_timeout_ms: timeout_s * 250,
        ..Default::default()
    };
    f.train.local_steps = steps;
    f
}

/// One device enrolled through a separate enrollment service that signs with an intermediate
/// the federation CA in `certs` issued (`fedlora certs issuer`), its files under
/// `dir/device`; returns it and the service's store (its device registry).
pub(crate) async fn enroll_through_intermediate(
    dir: &std::path::Path,
    certs: &std::path::Path,
) -> (
    fedlora_client::enroll::Enrolled,
    fedlora_coordinator::store::Store,
) {
    use fedlora_coordinator::certs::{make_issuer, CertDir};
    use fedlora_coordinator::enroll::tokens::{issue_tokens, TOKEN_FILE};
    use fedlora_coordinator::enroll::{EnrollConfig, EnrollService, Enrollment};
    let (icert, ikey) = (dir.join("issuer.pem"), dir.join("issuer.key"));
    make_issuer(&CertDir(certs.to_path_buf()), &icert, &ikey).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = issue_tokens(&certs.join(TOKEN_FILE), 1, 3600, now).unwrap();
    // the service: its own process in deployments (`fedlora enroll-service`), its own store,
    // the intermediate's key and not the federation CA's
    let mut ec = EnrollConfig::from_certs_dir(certs, "127.0.0.1:0".parse().unwrap());
    ec.issuer_cert = icert;
    ec.issuer_key = ikey;
    ec.intermediate = true;
    let store = fedlora_coordinator::store::Store::open(&dir.join("enroll-state")).unwrap();
    let service = EnrollService::start(std::sync::Arc::new(
        Enrollment::new(ec, store.registry().unwrap()).unwrap(),
    ))
    .unwrap();
    let device = fedlora_client::enroll::enroll(&fedlora_client::enroll::EnrollOptions {
        endpoint: service.local_addr().unwrap(),
        server_name: "localhost".into(),
        ca: CertDir(certs.to_path_buf()).ca(),
        token: token[0].clone(),
        state_dir: dir.join("device"),
    })
    .await
    .unwrap();
    service.shutdown();
    (device, store)
}

/// A UDP port on 127.0.0.1 for a coordinator to listen on: free now, never handed out twice
/// in this process, and below the kernel's ephemeral range, so that no client's socket (bound
/// to port 0: the kernel picks from that range) can take it before the coordinator binds it.
/// A port from the ephemeral range lost that race in CI: a front-end started seconds after
/// its port was chosen found it taken by a client of a test beside it.
pub(crate) fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let (low, high) = below_ephemeral();
    let mut given = GIVEN.lock().unwrap();
    for _ in 0..10_000 {
        let p = rand::random_range(low..high);
        if given.contains(&p) {
            continue;
        }
        if std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok() {
            given.insert(p);
            return p;
        }
    }
    panic!("no free UDP port in {low}..{high}");
}

/// Ports `[low, high)` below the ephemeral range of `/proc/sys/net/ipv4/ip_local_port_range`
/// (32768 when unreadable), at most 16,384 of them and none below 1024.
pub(crate) fn below_ephemeral() -> (u16, u16) {
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    assert!(
        start > 2048,
        "the ephemeral port range starts at {start}: no room below it for test ports"
    );
    (start.saturating_sub(16_384).max(1024), start)
}

#[test]
fn test_ports_are_below_the_ephemeral_range_and_never_given_twice() {
    let (_, start) = below_ephemeral();
    let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
    assert!(ports.iter().all(|&p| p < start), "{ports:?}");
    let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
}
