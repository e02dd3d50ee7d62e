//! Async (buffered, FedBuff) federation end to end over real QUIC + mutual TLS on loopback:
//! devices of different speeds train whenever they ask, and every committed version must be
//! the previous one plus the staleness-weighted mean of exactly the updates the devices sent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use fedlora_client::transport::ClientTls;
use fedlora_coordinator::certs::{default_server_names, init_certs};
use fedlora_coordinator::{Coordinator, CoordinatorConfig, Event};
use fedlora_protocol::{
    AckStatus, Codec, CoordMsg, FederationConfig, FlatAdapter, Mode, RefusalCode, Staleness, Task,
    TrainConfig, Weighting,
};

use crate::common;
use common::{async_delta, poll, secagg_spec, upload, wave, Committed};

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

/// One accepted update: the buffer (round) it was counted in, the round it trained in, and
/// the delta sent.
type Sent = (u64, u64, FlatAdapter);

/// Device `i`: trains whenever it is offered work, waits `wait_for` committed versions (or
/// `pause`) before each upload, and keeps what the coordinator acknowledged.
async fn device(
    i: usize,
    tls: ClientTls,
    addr: SocketAddr,
    pause: Duration,
    wait_for: Option<u64>,
    events: tokio::sync::broadcast::Receiver<Event>,
) -> Vec<Sent> {
    let (s, _) = common::hello(&tls, addr, secagg_spec().hash()).await;
    let mut sent = Vec::new();
    let mut committed = Committed::new(events);
    for _ in 0..20_000 {
        committed.drain();
        match poll(&s).await {
            Task::Train(o) => {
                // a slow device: its update arrives after `wait_for` versions committed
                if let Some(v) = wait_for.filter(|_| sent.is_empty()) {
                    committed.wait_for(v).await;
                }
                tokio::time::sleep(pause).await;
                let d = async_delta(i, o.round);
                loop {
                    let (reply, _) = s.request(&upload(o.round, &d, 1.0)).await.unwrap();
                    match reply {
                        CoordMsg::Ack {
                            round,
                            status: AckStatus::Accepted,
                        } => {
                            sent.push((round, o.round, d.clone()));
                            break;
                        }
                        // a buffer was being committed: the next one takes it
                        CoordMsg::Refused(r) if r.code == RefusalCode::RetryLater => {
                            tokio::time::sleep(Duration::from_millis(20)).await
                        }
                        // the campaign ended meanwhile
                        CoordMsg::Refused(r) if r.code == RefusalCode::WrongRound => break,
                        other => panic!("device {i}: unexpected answer {other:?}"),
                    }
                }
            }
            Task::Wait { .. } | Task::AlreadyUploaded { .. } => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Task::Evaluate { .. } | Task::Finished { .. } => return sent,
            other => panic!("device {i}: unexpected task {other:?}"),
        }
    }
    panic!("device {i} never saw the campaign end")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_of_different_speeds_commit_the_staleness_weighted_mean_of_what_they_sent() {
    let dir = tempfile::tempdir().unwrap();
    let staleness: Staleness = "poly:0.5".parse().unwrap();
    let fed = FederationConfig {
        mode: Mode::Async,
        buffer: 3,
        max_staleness: 4,
        staleness,
        rounds: 5,
        round_timeout_ms: 60_000,
        eval_timeout_ms: 100,
        train: TrainConfig {
            codec: Codec::DenseF32,
            weighting: Weighting::Uniform,
            ..Default::default()
        },
        ..Default::default()
    };
    let initial = wave(secagg_spec(), |x| (x * 0.07).cos());
    let (coord, addr, certs) = start(dir.path(), 6, fed, initial.clone()).await;
    // four fast devices of different speeds, and two whose first update arrives only after
    // one and two versions committed (so it is counted stale)
    let pauses = [0u64, 5, 15, 30, 0, 0];
    let waits = [None, None, None, None, Some(1), Some(2)];
    let mut tasks = Vec::new();
    for i in 0..6 {
        tasks.push(tokio::spawn(device(
            i,
            ClientTls::from_dir(&certs, i),
            addr,
            Duration::from_millis(pauses[i]),
            waits[i],
            coord.events(),
        )));
    }
    let mut all: Vec<Sent> = Vec::new();
    for t in tasks {
        all.extend(
            tokio::time::timeout(Duration::from_secs(120), t)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let (version, got) = coord.global();
    assert_eq!(version, 5, "five versions committed");
    // replay the campaign from what the devices sent: buffer by buffer, in order
    let mut buffers: BTreeMap<u64, Vec<&Sent>> = BTreeMap::new();
    for s in &all {
        buffers.entry(s.0).or_default().push(s);
    }
    let mut x: Vec<f64> = initial.values().iter().map(|&v| f64::from(v)).collect();
    let mut stale = 0;
    let mut committed = 0;
    for (round, ups) in &buffers {
        // the last buffer may have taken updates the campaign's end left uncounted
        if committed == 5 {
            break;
        }
        assert!(
            ups.len() >= 3,
            "buffer {round} committed with {}",
            ups.len()
        );
        let w: Vec<f64> = ups.iter().map(|u| staleness.weight(round - u.1)).collect();
        stale += ups.iter().filter(|u| u.1 < *round).count();
        let total: f64 = w.iter().sum();
        for (k, xk) in x.iter_mut().enumerate() {
            let s: f64 = ups
                .iter()
                .zip(&w)
                .map(|(u, w)| w * f64::from(u.2.values()[k]))
                .sum();
            // the coordinator adds the f32 mean to the f32 global
            *xk = f64::from((*xk as f32) + (s / total) as f32);
        }
        committed += 1;
    }
    assert_eq!(committed, 5);
    assert!(
        stale >= 2,
        "the two slow devices' updates were counted stale"
    );
    for (k, (g, want)) in got.values().iter().zip(&x).enumerate() {
        assert!(
            (f64::from(*g) - want).abs() <= 1e-6 * want.abs().max(1.0),
            "value {k}: {g} vs {want}"
        );
    }
    coord.shutdown().await;
    // status shows the buffer and the staleness histogram
    let store = fedlora_coordinator::store::Store::open(&dir.path().join("state")).unwrap();
    let report = fedlora_coordinator::status::report(&store).unwrap();
    let b = report.buffer.expect("async status");
    assert_eq!((b.size, b.staleness.as_str()), (3, "poly:0.5"));
    assert_eq!(b.staleness_histogram.iter().sum::<usize>(), all.len());
    assert!(b.staleness_histogram.len() >= 2, "{b:?}");
}

const BIN: &str = env!("CARGO_BIN_EXE_fedlora");

/// `fedlora coordinator --mode async` with unchanged `fedlora client` processes training the
/// byte-level model: the campaign commits its versions, every client exits 0, and `fedlora
/// status` shows the buffer and the staleness of what it counted.
#[test]
fn fedlora_coordinator_in_async_mode_serves_plain_fedlora_clients() {
    let (st, _) = run_cli_campaign(3, 3, &["--buffer", "2"], &[]);
    assert!(
        st["evals"].as_array().is_some_and(|e| !e.is_empty()),
        "{st}"
    );
    assert_eq!(st["buffer"]["size"], 2, "{st}");
    let counted = counted_updates(&st);
    assert!(counted >= 6, "three versions of two updates each: {st}");
}

/// The same with `--secure-aggregation`: each version is the unmasked sum of a SecAgg+ cohort
/// of the four unchanged clients, and every one of its updates is counted.
#[test]
fn fedlora_coordinator_in_async_mode_with_secure_aggregation_serves_plain_fedlora_clients() {
    // cohorts of 4 give each member the 3 neighbours the clients' default policy asks for
    let (st, _) = run_cli_campaign(4, 3, &["--buffer", "4", "--secure-aggregation"], &[]);
    assert_eq!(st["buffer"]["size"], 4, "{st}");
    let counted = counted_updates(&st);
    assert_eq!(counted, 12, "three cohorts of four masked updates: {st}");
}

/// Example-level DP-SGD in async mode with a participation bound: `--dp-participations 1`
/// calibrates each device's σ for one local run of a two-version campaign, so every device
/// that took part spent its whole ε = 8 on that one run (a plan for both versions would have
/// spent less) and none is counted twice. (Five devices, at most two training at once, and a
/// buffer that commits one update after 3 s: the campaign cannot run out of runs.)
#[test]
fn async_dp_devices_stop_at_their_participation_bound() {
    let (st, outs) = run_cli_campaign(
        5,
        2,
        &[
            "--buffer",
            "2",
            "--min-buffer",
            "1",
            "--round-timeout",
            "3s",
            "--concurrency",
            "2",
            "--dp-clip-norm",
            "1",
            "--dp-participations",
            "1",
        ],
        &["--epsilon", "8"],
    );
    assert_eq!(st["buffer"]["size"], 2, "{st}");
    let mut took_part = 0;
    for out in &outs {
        // "client-N: uploaded in rounds [a, b], declined [...], final version 2, ε spent E, ..."
        let rounds = out
            .split("uploaded in rounds [")
            .nth(1)
            .and_then(|r| r.split(']').next())
            .unwrap_or_else(|| panic!("no summary: {out}"));
        let n = rounds.split(',').filter(|x| !x.trim().is_empty()).count();
        assert!(
            n <= 1,
            "a device counted {n} times past its bound of 1: {out}"
        );
        if n == 0 {
            continue;
        }
        took_part += 1;
        let eps: f64 = out
            .split("ε spent ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|e| e.trim().parse().ok())
            .unwrap_or_else(|| panic!("no ε: {out}"));
        assert!(
            eps > 0.99 * 8.0 && eps <= 8.0 + 1e-9,
            "one run spends the whole target: {out}"
        );
    }
    assert!(took_part >= 2, "{outs:?}");
}

/// Distributed client-level DP in async mode from the command line: the coordinator plans σ
/// for each device's P = 2 participations at q = 1 (no amplification: devices self-select),
/// each cohort member adds its Skellam share inside secure aggregation, and unchanged
/// `fedlora client`s charge every update to their own record before its masked input leaves.
/// Two versions of four masked updates each commit; no held-out loss leaves a device; a
/// device's ε (a) and (b) are the composition of exactly the updates it sent, so after its P
/// updates they are equal and within the target.
#[test]
fn async_distributed_client_dp_charges_every_update_at_q_1_within_the_participation_bound() {
    let (st, outs) = run_cli_campaign(
        4,
        2,
        &[
            "--buffer",
            "4",
            "--client-dp",
            "distributed",
            "--client-clip",
            "0.5",
            "--target-epsilon",
            "8",
            "--client-dp-bits",
            "20",
            "--dp-participations",
            "2",
        ],
        &[],
    );
    let counted = counted_updates(&st);
    assert_eq!(counted, 8, "two cohorts of four masked updates: {st}");
    assert!(
        st["evals"].as_array().is_none_or(|e| e.is_empty()),
        "a client-level DP device sends no held-out loss: {st}"
    );
    let field = |out: &str, key: &str| -> f64 {
        out.split(key)
            .nth(1)
            .and_then(|r| r.split([',', ' ']).next())
            .and_then(|e| e.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{key}`: {out}"))
    };
    for out in &outs {
        // "…, ε spent client-level (a) A, (b) B at δ = D, …"
        let (a, b) = (field(out, "client-level (a) "), field(out, "(b) "));
        assert!(
            (a - b).abs() <= 1e-9 * a && a > 7.0 && a <= 8.0 + 1e-9,
            "two updates at q = 1 spend the whole target, as (a) and as (b): {out}"
        );
    }
}

/// Updates counted over the whole campaign, from `fedlora status --json`'s staleness histogram.
fn counted_updates(st: &serde_json::Value) -> u64 {
    st["buffer"]["staleness_histogram"]
        .as_array()
        .unwrap_or_else(|| panic!("no staleness histogram: {st}"))
        .iter()
        .map(|n| n.as_u64().unwrap())
        .sum()
}

/// Runs `fedlora coordinator --mode async --rounds ROUNDS ARGS` with `n` `fedlora client
/// CLIENT_ARGS` processes, checks that all exit 0 and that `rounds` versions committed, and
/// returns `fedlora status --json` and each client's standard output.
fn run_cli_campaign(
    n: usize,
    rounds: u64,
    args: &[&str],
    client_args: &[&str],
) -> (serde_json::Value, Vec<String>) {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let st = Command::new(BIN)
        .args(["certs", "init", "--clients", &n.to_string(), "--out"])
        .arg(&certs)
        .status()
        .unwrap();
    assert!(st.success());
    let port = crate::common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let data = dir.path().join("data");
    let coord = Command::new(BIN)
        .args([
            "coordinator",
            "--mode",
            "async",
            "--rounds",
            &rounds.to_string(),
        ])
        .args(args)
        .args(["--local-steps", "2", "--batch-size", "4", "--listen", &addr])
        .arg("--data-dir")
        .arg(&data)
        .arg("--certs")
        .arg(&certs)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let clients: Vec<_> = (0..n)
        .map(|i| {
            Command::new(BIN)
                .args([
                    "client",
                    "--coordinator",
                    &addr,
                    "--client-index",
                    &i.to_string(),
                ])
                .arg("--certs")
                .arg(&certs)
                .arg("--state-dir")
                .arg(dir.path().join(format!("c{i}")))
                .args(client_args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut outs = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "client {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        outs.push(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let out = coord.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "coordinator: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN)
        .args(["status", "--json", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["phase"], "finished", "{st}");
    assert_eq!(st["global_version"], rounds, "{st}");
    (st, outs)
}
