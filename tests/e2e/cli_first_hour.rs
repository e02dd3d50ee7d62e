//! The mistakes a new user makes, run on the real binary: each gets the documented exit code
//! (2 usage or input, 1 runtime, 3 credentials that waiting cannot heal), a message that names
//! what to fix (the flag, the file, the address), no panic, and nothing left on disk. Also:
//! `status` and `/metrics` on a running coordinator.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_fedlora");

fn fedlora(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Asserts the exit code, that stderr names every one of `names`, and that nothing panicked.
fn expect(out: &Output, code: i32, names: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(code), "exit code; stderr:\n{err}");
    assert!(!err.contains("panicked at"), "a panic:\n{err}");
    for n in names {
        assert!(err.contains(n), "`{n}` not named in:\n{err}");
    }
    err
}

fn certs(dir: &Path, clients: usize) -> PathBuf {
    let out = dir.join("certs");
    let st = fedlora(&[
        "certs",
        "init",
        "--clients",
        &clients.to_string(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(st.status.success(), "{st:?}");
    out
}

#[test]
fn bad_adapter_flags_are_usage_errors_in_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path(), 1);
    let cs = c.to_str().unwrap();
    for targets in ["", ",", "q,zz"] {
        let out = fedlora(&["demo", "--targets", targets]);
        expect(&out, 2, &["--targets", "q, k, v, o, fc1, fc2, head"]);
    }
    let state = dir.path().join("state");
    let ss = state.to_str().unwrap();
    for cmd in [
        vec!["demo", "--rank", "0"],
        vec![
            "client",
            "--coordinator",
            "127.0.0.1:9",
            "--certs",
            cs,
            "--client-index",
            "0",
            "--rank",
            "0",
        ],
        vec![
            "coordinator",
            "--data-dir",
            ss,
            "--certs",
            cs,
            "--rank",
            "0",
        ],
        vec![
            "coordinator",
            "--data-dir",
            ss,
            "--certs",
            cs,
            "--targets",
            "",
        ],
    ] {
        expect(&fedlora(&cmd), 2, &["--"]);
    }
    assert!(
        !state.exists(),
        "a failed start left its data directory behind"
    );
}

#[test]
fn numbers_out_of_range_get_the_range_check_not_a_flag_error() {
    expect(&fedlora(&["demo", "--clients", "0"]), 2, &["--clients"]);
    expect(&fedlora(&["demo", "--epsilon", "-1"]), 2, &["--epsilon"]);
    expect(
        &fedlora(&["bench", "secagg", "--clients", "0", "--json"]),
        2,
        &["--clients"],
    );
    expect(
        &fedlora(&["demo", "--round-timeout", "5x"]),
        2,
        &["5x", "30s"],
    );
    expect(
        &fedlora(&["demo", "--secure-aggregation", "--clients", "3"]),
        2,
        &["--clients"],
    );
}

#[test]
fn missing_files_and_directories_are_named_and_nothing_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path(), 1);
    let cs = c.to_str().unwrap();
    let nope = dir.path().join("nope.txt");
    let out = fedlora(&[
        "client",
        "--coordinator",
        "127.0.0.1:9",
        "--certs",
        cs,
        "--client-index",
        "0",
        "--data",
        nope.to_str().unwrap(),
    ]);
    let err = expect(&out, 2, &["nope.txt"]);
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    let toml = dir.path().join("nope.toml");
    expect(
        &fedlora(&["coordinator", "--config", toml.to_str().unwrap()]),
        2,
        &["nope.toml"],
    );
    let missing = dir.path().join("never-ran");
    for cmd in ["status", "export"] {
        let mut args = vec![cmd, "--data-dir", missing.to_str().unwrap()];
        if cmd == "export" {
            args.extend(["--out", "x.safetensors"]);
        }
        expect(&fedlora(&args), 2, &["never-ran"]);
        assert!(
            !missing.exists(),
            "`{cmd}` created the directory it was asked about"
        );
    }
    expect(
        &fedlora(&["certs", "init", "--out", "/proc/fedlora-certs"]),
        2,
        &["/proc/fedlora-certs"],
    );
}

#[test]
fn certs_init_does_not_replace_a_ca_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path(), 1);
    let ca = std::fs::read(c.join("ca.pem")).unwrap();
    let out = fedlora(&["certs", "init", "--out", c.to_str().unwrap()]);
    expect(&out, 2, &["--force"]);
    assert_eq!(
        std::fs::read(c.join("ca.pem")).unwrap(),
        ca,
        "the CA was replaced"
    );
    let out = fedlora(&["certs", "init", "--force", "--out", c.to_str().unwrap()]);
    assert!(out.status.success());
    assert_ne!(std::fs::read(c.join("ca.pem")).unwrap(), ca);
}

#[test]
fn unknown_federation_keys_and_a_port_in_use_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path(), 1);
    let data = dir.path().join("data");
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\ncerts = {:?}\n[federation]\nround = 1\n",
            data.display().to_string(),
            c.display().to_string()
        ),
    )
    .unwrap();
    expect(
        &fedlora(&["coordinator", "--config", cfg.to_str().unwrap()]),
        2,
        &["round"],
    );
    // a UDP port someone else holds
    let held = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let out = fedlora(&[
        "coordinator",
        "--listen",
        &addr,
        "--data-dir",
        data.to_str().unwrap(),
        "--certs",
        c.to_str().unwrap(),
    ]);
    expect(&out, 2, &[&addr, "--listen"]);
    assert!(
        !data.exists(),
        "a failed start left its data directory behind"
    );
}

#[test]
fn an_unreachable_coordinator_is_named_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path(), 1);
    let addr = format!("127.0.0.1:{}", crate::common::free_port());
    let mut child = Command::new(BIN)
        .args(["client", "--coordinator", &addr, "--client-index", "0"])
        // one attempt gives up after 1 s instead of the default 10 s
        .args(["--connect-timeout", "1s"])
        .arg("--certs")
        .arg(&c)
        .arg("--state-dir")
        .arg(dir.path().join("c0"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // past the first attempt and into the retries
    std::thread::sleep(Duration::from_secs(4));
    assert!(child.try_wait().unwrap().is_none(), "it keeps retrying");
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("\x1b["), "no colour codes in a pipe:\n{err}");
    assert!(err.contains(&addr), "the address is named:\n{err}");
    assert!(
        err.contains("is the coordinator running"),
        "the likely cause is named:\n{err}"
    );
    assert!(err.contains("retrying"), "{err}");
}

struct Running {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
    data: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn coordinator(dir: &Path, certs: &Path) -> Running {
    let addr: SocketAddr = format!("127.0.0.1:{}", crate::common::free_port())
        .parse()
        .unwrap();
    let metrics: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let data = dir.join("data");
    let child = Command::new(BIN)
        .args(["coordinator", "--rounds", "1", "--clients-per-round", "2"])
        .args([
            "--listen",
            &addr.to_string(),
            "--metrics",
            &metrics.to_string(),
        ])
        .arg("--data-dir")
        .arg(&data)
        .arg("--certs")
        .arg(certs)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while TcpStream::connect(metrics).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "coordinator never came up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Running {
        child,
        addr,
        metrics,
        data,
    }
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn client(c: &Path, i: usize, addr: SocketAddr, extra: &[&str], state: &Path) -> Output {
    Command::new(BIN)
        .args(["client", "--coordinator", &addr.to_string()])
        .arg("--certs")
        .arg(c)
        .args(["--client-index", &i.to_string()])
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn credentials_that_cannot_heal_end_the_client_with_exit_3_and_operators_see_status_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path(), 3);
    let run = coordinator(dir.path(), &c);
    // status works while the coordinator holds the store (from its snapshot)
    let out = fedlora(&["status", "--json", "--data-dir", run.data.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["phase"], "waiting");
    // health and metrics
    assert!(http_get(run.metrics, "/healthz").starts_with("HTTP/1.1 200"));
    let m = http_get(run.metrics, "/metrics");
    assert!(m.contains("fedlora_connected_clients"), "{m}");
    assert!(
        m.contains("fedlora_requests_refused_total") || m.contains("fedlora_bytes_up"),
        "{m}"
    );

    // certificates from a re-run `certs init` (another CA)
    let other = dir.path().join("other");
    assert!(fedlora(&[
        "certs",
        "init",
        "--clients",
        "1",
        "--out",
        other.to_str().unwrap()
    ])
    .status
    .success());
    let out = client(&other, 0, run.addr, &[], &dir.path().join("s1"));
    expect(&out, 3, &[&run.addr.to_string(), "--ca"]);
    // a server name the coordinator's certificate does not carry
    let out = client(
        &c,
        0,
        run.addr,
        &["--server-name", "coord.example.org"],
        &dir.path().join("s2"),
    );
    expect(&out, 3, &["--server-name"]);
    // a revoked certificate
    assert!(fedlora(&[
        "certs",
        "revoke",
        "--certs",
        c.to_str().unwrap(),
        "--client-index",
        "2"
    ])
    .status
    .success());
    let out = client(&c, 2, run.addr, &[], &dir.path().join("s3"));
    let err = expect(&out, 3, &["revoked"]);
    assert!(!err.contains("Refused("), "no debug formatting:\n{err}");
    // an adapter that does not match: which flags must agree, and both sides
    let out = client(&c, 1, run.addr, &["--rank", "4"], &dir.path().join("s4"));
    expect(
        &out,
        2,
        &["--rank", "--alpha", "--targets", "--ffa", "--rank 4"],
    );
    let m = http_get(run.metrics, "/metrics");
    assert!(
        m.contains("fedlora_requests_refused_total{reason=\"SpecMismatch\"}")
            || m.contains("fedlora_requests_refused_total{reason=\"Revoked\"}")
            || m.contains("fedlora_bytes_up_total"),
        "{m}"
    );
}

#[test]
fn the_demo_shows_progress_on_a_terminal_and_json_stays_one_object() {
    // a real terminal: util-linux `script` runs the demo under a pty
    let cmd = format!("{BIN} demo --clients 2 --rounds 2 --local-steps 2 --batch-size 4");
    let out = Command::new("script")
        .args(["-qefc", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("util-linux `script` runs the demo under a pty");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(!screen.contains("panicked at"), "{screen}");
    assert!(
        screen.contains("uploads"),
        "a progress bar while a round runs:\n{screen}"
    );
    let first = screen
        .find("round 1 committed: version 1, held-out loss")
        .expect("a line when round 1 commits");
    let second = screen
        .find("round 2 committed: version 2, held-out loss")
        .expect("a line when round 2 commits");
    let table = screen
        .find("held-out loss (nats/byte): base")
        .expect("the closing table");
    assert!(first < second && second < table, "{screen}");

    let out = fedlora(&[
        "demo",
        "--clients",
        "2",
        "--rounds",
        "1",
        "--local-steps",
        "2",
        "--batch-size",
        "4",
        "--json",
    ]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["final_version"], 1);
    assert!(v["final_eval_loss"].as_f64().unwrap() > 0.0);
}

/// Secure aggregation from the coordinator's own flags: the effective settings it logs at start
/// carry SecAgg+ with the threshold the planner derives (k = 3 among 4 clients, c = 1: t = 3),
/// and a threshold that does not cover the collusion, or `--neighbours` without
/// `--secure-aggregation`, is a usage error.
#[test]
fn secure_aggregation_is_a_coordinator_flag() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path(), 1);
    let (cs, state) = (c.to_str().unwrap(), dir.path().join("state"));
    let ss = state.to_str().unwrap();
    let base = [
        "coordinator",
        "--data-dir",
        ss,
        "--certs",
        cs,
        "--clients-per-round",
        "4",
        "--min-clients",
        "3",
    ];
    let with = |extra: &[&str]| {
        let mut v: Vec<&str> = base.to_vec();
        v.extend_from_slice(extra);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    for (extra, names) in [
        (
            vec![
                "--secure-aggregation",
                "--threshold",
                "2",
                "--collusion",
                "1",
            ],
            vec!["--threshold 2", "2t > k + c"],
        ),
        (vec!["--neighbours", "3"], vec!["--secure-aggregation"]),
        (
            vec!["--secure-aggregation", "--codec", "q8"],
            vec!["--secure-aggregation", "q8"],
        ),
    ] {
        let args = with(&extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        expect(&fedlora(&args), 2, &names);
    }
    let addr = format!("127.0.0.1:{}", crate::common::free_port());
    let args = with(&[
        "--secure-aggregation",
        "--collusion",
        "1",
        "--log-format",
        "json",
        "--listen",
        &addr,
    ]);
    let mut child = Command::new(BIN)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let t0 = Instant::now();
    let mut log = String::new();
    let mut buf = [0u8; 4096];
    while !log.contains("coordinator listening") {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "never listened:\n{log}"
        );
        let n = stderr.read(&mut buf).unwrap();
        assert!(n > 0, "the coordinator exited:\n{log}");
        log.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    child.kill().unwrap();
    let _ = child.wait();
    let settings = log
        .lines()
        .find(|l| l.contains("effective settings"))
        .expect("the effective settings are logged");
    let v: serde_json::Value = serde_json::from_str(settings).unwrap();
    let fed: serde_json::Value =
        serde_json::from_str(v["federation"].as_str().expect("federation as JSON")).unwrap();
    let secure = &fed["train"]["secure"];
    // everyone is a neighbour, so t follows each round's size (0: the smallest t with
    // 2t > k + c; t = 3 for 4 clients and c = 1), and c is in the parameters the clients check
    assert_eq!(secure["threshold"], 0, "{fed}");
    assert_eq!(secure["collusion"], 1, "{fed}");
    assert_eq!(secure["neighbours"], 0, "{fed}");
    assert_eq!(fed["train"]["weighting"], "uniform", "{fed}");
    assert!(
        fed["train"]["codec"].to_string().contains("modular"),
        "{fed}"
    );
}
