//! One authenticated client tries to exhaust a real `fedlora coordinator` process's memory:
//! many connections with its one certificate, as many streams as it may open on each, every
//! stream announcing a 60 MiB upload and pushing data as fast as flow control lets it. The
//! coordinator's peak RSS must stay under the bound docs/src/coordinator.md states
//! (`base + PAYLOAD_BUDGET + C × (receive window + send window + streams × control limit)`, with
//! C the connections one client id may hold), and another client is still served.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fedlora_client::transport::{endpoint, ClientTls, Session};
use fedlora_coordinator::wire::{
    CONNECTION_RECEIVE_WINDOW, MAX_CONNECTIONS_PER_CLIENT, MAX_STREAMS_PER_CONNECTION,
    PAYLOAD_BUDGET, SEND_WINDOW,
};
use fedlora_protocol::frame::CONTROL_LIMIT;
use fedlora_protocol::{ClientMsg, CoordMsg, PROTOCOL_VERSION};

const BIN: &str = env!("CARGO_BIN_EXE_fedlora");
const MIB: u64 = 1024 * 1024;

/// (current, peak) resident set of `pid`, bytes.
fn rss(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap()
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn hello(ep: &quinn::Endpoint, addr: SocketAddr, spec_hash: [u8; 32]) -> Option<Session> {
    let s = Session::connect(ep, addr, "localhost").await.ok()?;
    let msg = ClientMsg::Hello {
        protocol_version: PROTOCOL_VERSION,
        spec_hash,
        max_rank: None,
    };
    match s.request(&msg).await {
        Ok((CoordMsg::Welcome { .. }, _)) => Some(s),
        _ => None,
    }
}

/// One connection of the attacker: hello, then streams that each announce a 60 MiB upload and
/// push up to `per_stream` bytes.
async fn flood(ep: quinn::Endpoint, addr: SocketAddr, spec_hash: [u8; 32], per_stream: usize) {
    let Some(s) = hello(&ep, addr, spec_hash).await else {
        return;
    };
    let conn = s.connection().clone();
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let Ok(Ok((mut send, _recv))) =
            tokio::time::timeout(Duration::from_millis(500), conn.open_bi()).await
        else {
            break;
        };
        tasks.push(tokio::spawn(async move {
            let mut header = vec![b'F', b'L', 1, 3];
            header.extend_from_slice(&(60 * MIB as u32).to_be_bytes());
            if send.write_all(&header).await.is_err() {
                return;
            }
            let chunk = vec![0x5a_u8; 64 * 1024];
            let mut sent = 0;
            while sent < per_stream {
                if send.write_all(&chunk).await.is_err() {
                    return;
                }
                sent += chunk.len();
            }
            let _recv = _recv;
            tokio::time::sleep(Duration::from_secs(30)).await;
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_grow_the_coordinator_past_its_memory_bound() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let st = Command::new(BIN)
        .args(["certs", "init", "--clients", "2", "--out"])
        .arg(&certs)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{addr}\"\ndata_dir = {:?}\ncerts = {:?}\n\
             [federation]\nrounds = 1\nclients_per_round = 2\nmin_clients = 2\n",
            dir.path().join("data").display().to_string(),
            certs.display().to_string()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["coordinator", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let spec_hash = spec_hash();
    // wait until it serves
    let ep0 = endpoint(&ClientTls::from_dir(&certs, 0)).unwrap();
    let t0 = Instant::now();
    while hello(&ep0, addr, spec_hash).await.is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "coordinator never came up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (base, _) = rss(pid);

    // the attack: 8 connections of client 0, each as many streams as allowed, 8 MiB each
    let mut attack = Vec::new();
    for _ in 0..8 {
        let ep = endpoint(&ClientTls::from_dir(&certs, 0)).unwrap();
        attack.push(tokio::spawn(flood(ep, addr, spec_hash, 8 * MIB as usize)));
    }
    let mut peak = 0;
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak = peak.max(rss(pid).1);
    }
    // another client is still served while the attack goes on
    let ep1 = endpoint(&ClientTls::from_dir(&certs, 1)).unwrap();
    let s1 = tokio::time::timeout(Duration::from_secs(20), hello(&ep1, addr, spec_hash))
        .await
        .expect("another client is still served")
        .expect("welcome");
    let (poll, _) = s1
        .request(&ClientMsg::Poll { held_version: None })
        .await
        .unwrap();
    assert!(matches!(poll, CoordMsg::Task(_)), "{poll:?}");
    peak = peak.max(rss(pid).1);
    for a in attack {
        a.abort();
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let per_conn = u64::from(CONNECTION_RECEIVE_WINDOW)
        + SEND_WINDOW
        + u64::from(MAX_STREAMS_PER_CONNECTION) * CONTROL_LIMIT as u64;
    let conns = MAX_CONNECTIONS_PER_CLIENT as u64 + 1; // + the other client
                                                       // the formula, plus 64 MiB for allocator slack and the tasks' own buffers
    let bound = base + PAYLOAD_BUDGET as u64 + conns * per_conn + 64 * MIB;
    eprintln!(
        "coordinator RSS: base {} MiB, peak {} MiB, bound {} MiB",
        base / MIB,
        peak / MIB,
        bound / MIB
    );
    assert!(
        peak < bound,
        "peak RSS {} MiB over the bound {} MiB",
        peak / MIB,
        bound / MIB
    );
}

/// The spec hash the `fedlora coordinator` serves (the demo model's default adapter).
fn spec_hash() -> [u8; 32] {
    use fedlora_train::model::LmConfig;
    use fedlora_train::train::initial_adapter;
    initial_adapter(&LmConfig::new()).unwrap().spec().hash()
}
