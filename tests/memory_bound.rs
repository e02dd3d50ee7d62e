//! Authenticated clients try to exhaust a real `fedlora coordinator` process's memory: six
//! participants of the open round (only participants may send payloads), each with the most
//! connections an id may hold, every connection announcing a 60 MiB upload and pushing all of
//! it. The coordinator's
//! peak RSS must stay under the bound docs/src/coordinator.md states (`base + payload budget +
//! C × (receive window + send window + streams × control limit)`, C the open connections), the
//! attack must really send at least the budget, and another client is still served. The same
//! attack against a coordinator whose budget is lifted (`payload_budget_mib`) passes the bound:
//! the test can fail.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fedlora_client::transport::{endpoint, ClientTls, Session};
use fedlora_coordinator::wire::{
    IDLE_RECEIVE_WINDOW, MAX_CONNECTIONS_PER_CLIENT, MAX_STREAMS_PER_CONNECTION, PAYLOAD_BUDGET,
    SEND_WINDOW,
};
use fedlora_protocol::frame::CONTROL_LIMIT;
use fedlora_protocol::{ClientMsg, CoordMsg, Task, PROTOCOL_VERSION};

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

/// One connection of an attacker: hello, then one stream announcing a 60 MiB upload and
/// pushing all of it as fast as flow control lets it; every byte written is counted in `sent`.
/// (More large streams on one connection only stall that connection: the coordinator reads one
/// payload at a time per connection, and the unread streams fill the connection's receive
/// window; the attack gains more from more connections, which it takes from more client ids.)
async fn flood(
    ep: quinn::Endpoint,
    addr: SocketAddr,
    spec_hash: [u8; 32],
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    let s = hello(&ep, addr, spec_hash)
        .await
        .expect("the attacker's certificate is welcomed");
    // payloads are taken from participants only: the attackers are (every connected client is
    // sampled), once the round is open
    let t0 = Instant::now();
    loop {
        if let Ok((CoordMsg::Task(Task::Train(_)), _)) =
            s.request(&ClientMsg::Poll { held_version: None }).await
        {
            break;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Ok(Ok((mut send, _recv))) =
        tokio::time::timeout(Duration::from_millis(500), s.connection().open_bi()).await
    else {
        return;
    };
    let declared = 60 * MIB as usize;
    let mut header = vec![b'F', b'L', 1, 3];
    header.extend_from_slice(&(declared as u32).to_be_bytes());
    if send.write_all(&header).await.is_err() {
        return;
    }
    let chunk = vec![0x5a_u8; 64 * 1024];
    let mut pushed = 0;
    while pushed < declared {
        if send.write_all(&chunk).await.is_err() {
            return;
        }
        pushed += chunk.len();
        sent.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
}

/// What one attack did to a fresh `fedlora coordinator` process.
struct Outcome {
    /// Resident set before the attack, bytes.
    base: u64,
    /// Peak resident set during the attack, bytes.
    peak: u64,
    /// Bytes the attackers wrote.
    sent: u64,
    /// Whether another client was served during the attack.
    other_served: bool,
}

/// Attacks a coordinator whose payload budget is `budget_mib`: `ATTACKERS` client ids, each
/// with the most connections a client id may hold, each connection pushing a whole declared
/// 60 MiB upload, for `window`.
async fn attack(budget_mib: usize, window: Duration) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let st = Command::new(BIN)
        .args([
            "certs",
            "init",
            "--clients",
            &(ATTACKERS + 1).to_string(),
            "--out",
        ])
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
            "listen = \"{addr}\"\ndata_dir = {:?}\ncerts = {:?}\npayload_budget_mib = {budget_mib}\n\
             [federation]\nrounds = 1\nclients_per_round = {n}\nmin_clients = {n}\n",
            dir.path().join("data").display().to_string(),
            certs.display().to_string(),
            n = ATTACKERS,
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
    // wait until it serves (with the honest client, index ATTACKERS)
    let honest = endpoint(&ClientTls::from_dir(&certs, ATTACKERS)).unwrap();
    let t0 = Instant::now();
    while hello(&honest, addr, spec_hash).await.is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "coordinator never came up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (base, _) = rss(pid);
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut flood_tasks = Vec::new();
    for id in 0..ATTACKERS {
        for _ in 0..MAX_CONNECTIONS_PER_CLIENT {
            let ep = endpoint(&ClientTls::from_dir(&certs, id)).unwrap();
            flood_tasks.push(tokio::spawn(flood(ep, addr, spec_hash, sent.clone())));
        }
    }
    let mut peak = 0;
    let until = Instant::now() + window;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss(pid).1);
    }
    // another client is still served while the attack goes on
    let other = endpoint(&ClientTls::from_dir(&certs, ATTACKERS)).unwrap();
    let other_served =
        match tokio::time::timeout(Duration::from_secs(20), hello(&other, addr, spec_hash)).await {
            Ok(Some(s)) => matches!(
                s.request(&ClientMsg::Poll { held_version: None }).await,
                Ok((CoordMsg::Task(_), _))
            ),
            _ => false,
        };
    peak = peak.max(rss(pid).1);
    for t in flood_tasks {
        t.abort();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    Outcome {
        base,
        peak,
        sent: sent.load(std::sync::atomic::Ordering::Relaxed),
        other_served,
    }
}

/// Attacking client ids.
const ATTACKERS: usize = 6;

/// The bound docs/src/coordinator.md states for the default budget, with `conns` connections,
/// plus 64 MiB for allocator slack and the tasks' own buffers.
fn bound(base: u64, conns: u64) -> u64 {
    let per_conn = u64::from(IDLE_RECEIVE_WINDOW)
        + SEND_WINDOW
        + u64::from(MAX_STREAMS_PER_CONNECTION) * CONTROL_LIMIT as u64;
    base + PAYLOAD_BUDGET as u64 + conns * per_conn + 64 * MIB
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_clients_cannot_grow_the_coordinator_past_its_memory_bound() {
    let conns = (ATTACKERS * MAX_CONNECTIONS_PER_CLIENT + 1) as u64;
    let window = Duration::from_secs(6);
    // with the default budget: the attack fills it (at least the budget sent), stays under the
    // bound, and another client is served
    let on = attack(PAYLOAD_BUDGET / MIB as usize, window).await;
    let b = bound(on.base, conns);
    eprintln!(
        "budget on: base {} MiB, peak {} MiB, bound {} MiB, sent {} MiB",
        on.base / MIB,
        on.peak / MIB,
        b / MIB,
        on.sent / MIB
    );
    assert!(
        on.sent >= PAYLOAD_BUDGET as u64,
        "the attack sent only {} MiB",
        on.sent / MIB
    );
    assert!(
        on.peak < b,
        "peak RSS {} MiB over the bound {} MiB",
        on.peak / MIB,
        b / MIB
    );
    assert!(
        on.other_served,
        "another client is served during the attack"
    );
    // the same attack with the budget lifted (what the bound rests on): the coordinator holds
    // many whole uploads at once and passes the bound, so the check above can fail
    let off = attack(100 * 1024, window).await;
    let b = bound(off.base, conns);
    eprintln!(
        "budget off: base {} MiB, peak {} MiB, bound {} MiB, sent {} MiB",
        off.base / MIB,
        off.peak / MIB,
        b / MIB,
        off.sent / MIB
    );
    assert!(
        off.peak > b,
        "without the budget the attack stayed under the bound: {} MiB",
        off.peak / MIB
    );
}

/// The spec hash the `fedlora coordinator` serves (the demo model's default adapter).
fn spec_hash() -> [u8; 32] {
    use fedlora_train::model::LmConfig;
    use fedlora_train::train::initial_adapter;
    initial_adapter(&LmConfig::new()).unwrap().spec().hash()
}
