//! kill -9 of a real `fedlora coordinator` process mid-round: after a restart on the same data
//! directory the round completes with the upload that was acknowledged before the kill, nothing
//! is lost or counted twice.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fedlora_client::transport::{endpoint, ClientTls, Session};
use fedlora_coordinator::store::scratch::ScratchSchema;
use fedlora_protocol::{
    fedavg, AckStatus, ClientMsg, CoordMsg, FlatAdapter, Task, PROTOCOL_VERSION,
};
use fedlora_train::model::LmConfig;
use fedlora_train::train::initial_adapter;

use crate::common;
use common::{next_task, offer, poll, upload};

const BIN: &str = env!("CARGO_BIN_EXE_fedlora");

fn start(config: &Path, log: &Path) -> Child {
    start_crashing(config, log, None)
}

/// [`start`], aborting at the crash point `crash` (`NAME:K`, see `fedlora_coordinator::faults`).
fn start_crashing(config: &Path, log: &Path, crash: Option<&str>) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["coordinator", "--config"])
        .arg(config)
        .env_remove(fedlora_coordinator::faults::CRASH_AT_ENV)
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(c) = crash {
        cmd.env(fedlora_coordinator::faults::CRASH_AT_ENV, c);
    }
    cmd.spawn().unwrap()
}

async fn join(certs: &Path, i: usize, addr: SocketAddr, spec_hash: [u8; 32]) -> Session {
    let ep = endpoint(&ClientTls::from_dir(certs, i)).unwrap();
    let t0 = Instant::now();
    loop {
        if let Ok(s) = Session::connect(&ep, addr, "localhost").await {
            let hello = ClientMsg::Hello {
                protocol_version: PROTOCOL_VERSION,
                spec_hash,
                max_rank: None,
            };
            if let Ok((CoordMsg::Welcome { .. }, _)) = s.request(&hello).await {
                return s;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "coordinator never came up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What `fedlora status --json` says of `data`: `None` when it failed or printed no JSON.
fn status_json(data: &Path) -> Option<serde_json::Value> {
    status_json_of(&["--data-dir", data.to_str().unwrap()])
}

/// What `fedlora status --json ARGS` says.
fn status_json_of(args: &[&str]) -> Option<serde_json::Value> {
    let out = Command::new(BIN)
        .args(["status", "--json"])
        .args(args)
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// A temporary directory with certificates for 2 clients (made by the CLI), a free port, and a
/// coordinator config file: `top` lines, then `[federation]` with 1 round of 2 clients and
/// `federation` lines after it.
struct Setup {
    dir: tempfile::TempDir,
    certs: PathBuf,
    data: PathBuf,
    addr: SocketAddr,
    config: PathBuf,
    log: PathBuf,
}

fn setup(top: &str, federation: &str) -> Setup {
    setup_n(2, top, federation)
}

/// [`setup`] with `n` clients, all in the one round.
fn setup_n(n: usize, top: &str, federation: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let data = dir.path().join("data");
    let st = Command::new(BIN)
        .args(["certs", "init", "--clients", &n.to_string(), "--out"])
        .arg(&certs)
        .status()
        .unwrap();
    assert!(st.success());
    let addr: SocketAddr = format!("127.0.0.1:{}", crate::common::free_port())
        .parse()
        .unwrap();
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{addr}\"\ndata_dir = {:?}\ncerts = {:?}\n{top}\
             [federation]\nrounds = 1\nclients_per_round = {n}\nmin_clients = {n}\n\
             round_timeout_ms = 120000\n{federation}",
            data.display().to_string(),
            certs.display().to_string()
        ),
    )
    .unwrap();
    let log = dir.path().join("coordinator.log");
    Setup {
        dir,
        certs,
        data,
        addr,
        config,
        log,
    }
}

/// The round of a secure-aggregation stage task (panics on any other task).
fn secure_round_of(t: Task) -> u64 {
    match t {
        Task::SecAgg { round, .. } => round,
        other => panic!("expected a secure stage task, got {other:?}"),
    }
}

/// A synthetic delta in `like`'s spec.
fn delta(like: &FlatAdapter, k: f32) -> FlatAdapter {
    common::wave(like.spec().clone(), |x| ((x - 1.0) * 0.01 * k).sin() * 1e-2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_survives_kill_9_without_losing_an_acked_upload() {
    kill_9_keeps_an_acked_upload(None).await;
}

/// The same on the PostgreSQL store: the state lives in the database, and a restarted
/// coordinator (here on the same host; any host would do) resumes the round from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_on_postgres_survives_kill_9_without_losing_an_acked_upload() {
    if let Some(schema) = ScratchSchema::for_test("kill -9 of a coordinator on PostgreSQL") {
        kill_9_keeps_an_acked_upload(Some(&schema.url())).await;
    }
}

/// A 2-client round on the store `store` (`None`: sled in the data directory): client 0's
/// acknowledged upload survives kill -9 of the coordinator; the round commits exactly.
async fn kill_9_keeps_an_acked_upload(store: Option<&str>) {
    let top = match store {
        Some(url) => format!("log_format = \"json\"\nstore = {url:?}\n"),
        None => "log_format = \"json\"\n".to_string(),
    };
    let Setup {
        dir,
        certs,
        data,
        addr,
        config,
        log,
    } = setup(&top, "eval_timeout_ms = 300\n");
    // status and export read the store the coordinator ran on
    let store_args: Vec<String> = match store {
        Some(url) => vec!["--store".into(), url.into()],
        None => vec!["--data-dir".into(), data.display().to_string()],
    };
    let store_args: Vec<&str> = store_args.iter().map(String::as_str).collect();

    // the reference model's adapter, as the coordinator computes it by default
    let initial = initial_adapter(&LmConfig::new()).unwrap();
    let spec_hash = initial.spec().hash();
    let d0 = delta(&initial, 1.0);
    let d1 = delta(&initial, 2.0);

    let mut child = start(&config, &log);
    let s0 = join(&certs, 0, addr, spec_hash).await;
    let s1 = join(&certs, 1, addr, spec_hash).await;
    let o0 = offer(&s0).await;
    let _ = offer(&s1).await;
    let (r, _) = s0.request(&upload(o0.round, &d0, 10.0)).await.unwrap();
    assert_eq!(
        r,
        CoordMsg::Ack {
            round: o0.round,
            status: AckStatus::Accepted
        }
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    let line = logged
        .lines()
        .find(|l| l.contains("\"message\":\"upload accepted\""))
        .expect("json log line for the accepted upload");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["round"], o0.round);
    assert_eq!(v["client"], "client-0");

    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    drop((s0, s1));

    let mut child = start(&config, &log);
    let s0 = join(&certs, 0, addr, spec_hash).await;
    // client 0 is told it already uploaded, and a re-send is acknowledged as such
    assert!(matches!(
        poll(&s0).await,
        Task::AlreadyUploaded { round, .. } if round == o0.round
    ));
    let (r, _) = s0.request(&upload(o0.round, &d0, 10.0)).await.unwrap();
    assert_eq!(
        r,
        CoordMsg::Ack {
            round: o0.round,
            status: AckStatus::AlreadyAccepted
        }
    );
    let s1 = join(&certs, 1, addr, spec_hash).await;
    let o1 = offer(&s1).await;
    assert_eq!(o1.round, o0.round, "the open round resumed");
    let (r, _) = s1.request(&upload(o1.round, &d1, 30.0)).await.unwrap();
    assert!(matches!(r, CoordMsg::Ack { .. }), "{r:?}");

    // the coordinator finishes on its own (final evaluation times out) and exits
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success());
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "coordinator did not finish"
        );
        let _ = s0.request(&ClientMsg::Poll { held_version: None }).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let status = status_json_of(&store_args).expect("fedlora status --json");
    assert_eq!(status["global_version"], 1);
    let rounds = status["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 1);
    assert_eq!(rounds[0]["status"], "committed");
    assert_eq!(
        rounds[0]["participants"],
        serde_json::json!(["client-0", "client-1"])
    );
    if store.is_some() {
        // nothing of the federation's state was kept in the data directory
        assert!(!data.join("state").exists());
        assert!(!data.join("checkpoints").exists());
    }

    // the exported global is exactly old + (10·d0 + 30·d1) / 40
    let file = dir.path().join("global.safetensors");
    let out = Command::new(BIN)
        .args(["export", "--round", "1"])
        .args(&store_args)
        .arg("--out")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = fedavg(&initial, &[(10.0, d0), (30.0, d1)]).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (t, (off, len)) in expected
        .spec()
        .tensors()
        .iter()
        .zip(expected.spec().offsets())
    {
        let view = st.tensor(&t.name).unwrap();
        assert_eq!(view.shape(), t.shape.as_slice());
        let got: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, expected.values()[off..off + len]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_a_secure_round_aborts_it_and_a_fresh_round_follows() {
    // `_dir` keeps the temporary directory alive until the end of the test
    let Setup {
        dir: _dir,
        certs,
        data,
        addr,
        config,
        log,
    } = setup(
        "",
        "[federation.train]\nweighting = \"uniform\"\n\
         [federation.train.codec.modular]\nvalue_bits = 8\nclamp = 0.25\nfraction = 0.25\nmax_weight = 2\n\
         [federation.train.secure]\nthreshold = 1\nneighbours = 0\nmodulus_bits = 10\n",
    );
    let initial = initial_adapter(&LmConfig::new()).unwrap();
    let spec_hash = initial.spec().hash();
    let mut child = start(&config, &log);
    let s0 = join(&certs, 0, addr, spec_hash).await;
    let _s1 = join(&certs, 1, addr, spec_hash).await;
    // the secure round opens with its first stage
    let first = secure_round_of(next_task(&s0).await);
    child.kill().unwrap();
    child.wait().unwrap();

    let mut child = start(&config, &log);
    let s0 = join(&certs, 0, addr, spec_hash).await;
    let _s1 = join(&certs, 1, addr, spec_hash).await;
    let next = secure_round_of(next_task(&s0).await);
    assert!(next > first, "a new round id, fresh keys");
    child.kill().unwrap();
    child.wait().unwrap();
    let status = status_json(&data).expect("fedlora status --json");
    let r0 = &status["rounds"][0];
    assert_eq!(r0["round"], first);
    assert_eq!(r0["status"], "failed");
    assert_eq!(r0["reason"], "coordinator restarted during a secure round");
    assert_eq!(status["global_version"], 0, "nothing was applied");
}

/// Async mode with secure aggregation under kill -9 during a cohort: the restart fails the
/// cohort (nothing of it is applied), the buffer that follows takes the same held updates
/// again when the devices announce them, and a new cohort with a new round id and fresh keys
/// opens among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_an_async_secure_cohort_fails_it_and_the_held_updates_join_the_next() {
    let Setup {
        dir: _dir,
        certs,
        data,
        addr,
        config,
        log,
    } = setup_n(
        4,
        "",
        "mode = \"async\"\nbuffer = 4\nmax_staleness = 2\n\
         [federation.train]\nweighting = \"uniform\"\n\
         [federation.train.codec.modular]\nvalue_bits = 8\nclamp = 0.25\nfraction = 0.25\nmax_weight = 4\n\
         [federation.train.secure]\nthreshold = 0\nneighbours = 0\nmodulus_bits = 11\n",
    );
    let initial = initial_adapter(&LmConfig::new()).unwrap();
    let spec_hash = initial.spec().hash();
    // every device trains in round 1 and announces its update; the fourth opens the cohort
    let ready = |s: Session, trained: u64| async move {
        let (r, _) = s
            .request(&ClientMsg::UpdateReady { round: trained })
            .await
            .unwrap();
        assert!(matches!(r, CoordMsg::Ack { .. }), "{r:?}");
        s
    };
    let mut child = start(&config, &log);
    let mut s = Vec::new();
    for i in 0..4 {
        let x = join(&certs, i, addr, spec_hash).await;
        let o = offer(&x).await;
        assert!(o.secure_shares.is_none() && o.config.secure.is_some());
        s.push(ready(x, o.round).await);
    }
    let first = secure_round_of(next_task(&s[0]).await);
    assert_eq!(first, 1, "the cohort runs in the buffer's round");
    child.kill().unwrap();
    child.wait().unwrap();
    drop(s);

    let mut child = start(&config, &log);
    let mut s = Vec::new();
    for i in 0..4 {
        let x = join(&certs, i, addr, spec_hash).await;
        // the restarted coordinator does not know the device holds an update: it offers work,
        // and the device announces the update it trained in round 1 instead (one buffer stale)
        let o = offer(&x).await;
        assert_eq!((o.round, o.global_version), (2, 0));
        s.push(ready(x, 1).await);
    }
    let next = secure_round_of(next_task(&s[0]).await);
    assert_eq!(next, 2, "a new round id, fresh keys");
    child.kill().unwrap();
    child.wait().unwrap();
    let status = status_json(&data).expect("fedlora status --json");
    let r0 = &status["rounds"][0];
    assert_eq!(r0["round"], 1);
    assert_eq!(r0["status"], "failed");
    assert_eq!(r0["reason"], "coordinator restarted during a secure round");
    assert_eq!(status["global_version"], 0, "nothing was applied");
}

/// Clients of the group-commit test.
const GROUP: usize = 6;

/// One round of [`GROUP`] clients with plain modular uploads (exact integer sums): client 0
/// uploads alone (a batch of its own, acknowledged), then the others at once. With `crash`,
/// the coordinator aborts at that point (kill -9's effect: nothing flushed, no destructor), is
/// restarted, and every client whose upload was not acknowledged sends it again, as the SDK
/// does. Returns the committed global's checkpoint bytes and, per
/// client, the answer to its upload before the crash (`None`: no answer) and to its re-send
/// after the restart (`None`: not sent again).
async fn group_round(
    crash: Option<&str>,
) -> (Vec<u8>, Vec<(Option<AckStatus>, Option<AckStatus>)>) {
    let Setup {
        dir: _dir,
        certs,
        data,
        addr,
        config,
        log,
    } = setup_n(
        GROUP,
        "",
        "eval_timeout_ms = 300\n[federation.train]\nweighting = \"uniform\"\n\
         [federation.train.codec.modular]\nvalue_bits = 8\nclamp = 0.25\nfraction = 0.25\nmax_weight = 8\n",
    );
    let initial = initial_adapter(&LmConfig::new()).unwrap();
    let spec_hash = initial.spec().hash();
    let mut child = start_crashing(&config, &log, crash);
    let mut sessions = Vec::new();
    for i in 0..GROUP {
        sessions.push(join(&certs, i, addr, spec_hash).await);
    }
    let mut offers = Vec::new();
    for s in &sessions {
        offers.push(offer(s).await);
    }
    let uploads: Vec<ClientMsg> = offers
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let d = delta(&initial, i as f32 + 1.0);
            let ctx = fedlora_protocol::CodecContext {
                round_seed: o.codec_seed,
            };
            let mut rng = <rand::rngs::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(i as u64);
            let (payload, _) = o.config.codec.encode_with(d.values(), &ctx, 1, &mut rng);
            ClientMsg::Upload(fedlora_protocol::Upload {
                round: o.round,
                spec_hash,
                weight: 1.0,
                train_loss: 1.0,
                payload,
            })
        })
        .collect();
    let ack = |r: Result<(CoordMsg, u64), fedlora_client::ClientError>| match r {
        Ok((CoordMsg::Ack { status, .. }, _)) => Some(status),
        Ok((other, _)) => panic!("an upload was answered {other:?}"),
        Err(_) => None,
    };
    let mut answers = vec![(None, None); GROUP];
    answers[0].0 = ack(sessions[0].request(&uploads[0]).await);
    let mut at_once = Vec::new();
    for (s, u) in sessions.iter().zip(&uploads).skip(1) {
        let (s, u) = (s.clone(), u.clone());
        at_once.push(tokio::spawn(async move { s.request(&u).await }));
    }
    if crash.is_some() {
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no crash at {crash:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(!status.success(), "the coordinator aborted at {crash:?}");
        // an answer sent before the abort has arrived by now; the others never will (their
        // requests would wait out the connection's idle timeout)
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (i, h) in at_once.into_iter().enumerate() {
            if h.is_finished() {
                answers[i + 1].0 = ack(h.await.unwrap());
            } else {
                h.abort();
            }
        }
        drop(sessions);
        child = start(&config, &log);
        sessions = Vec::new();
        for i in 0..GROUP {
            sessions.push(join(&certs, i, addr, spec_hash).await);
        }
        // the SDK sends again what was not acknowledged
        for (i, (s, u)) in sessions.iter().zip(&uploads).enumerate() {
            if answers[i].0.is_none() {
                answers[i].1 = ack(s.request(u).await);
            }
        }
    } else {
        for (i, h) in at_once.into_iter().enumerate() {
            answers[i + 1].0 = ack(h.await.unwrap());
        }
    }
    // committed (the status the running coordinator keeps on disk says so); the process
    // would linger a few seconds more to tell clients the federation is over
    let t0 = Instant::now();
    let status = loop {
        let status = status_json(&data).unwrap_or_default();
        if status["rounds"][0]["status"] == "committed" {
            break status;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the round did not commit: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        status["rounds"][0]["participants"]
            .as_array()
            .unwrap()
            .len(),
        GROUP,
        "every client counted once"
    );
    (
        std::fs::read(data.join("checkpoints/v1.bin")).unwrap(),
        answers,
    )
}

/// Group commit under kill -9: the coordinator aborts before a batch's flush, between the
/// flush and its acknowledgements, and inside a round's commit. Every acknowledged upload
/// is in the committed global, none is counted twice (a re-sent upload whose record survived
/// is answered `AlreadyAccepted`), the round commits after the restart, and the committed
/// global is bit for bit the one of a run without the crash (modular codec).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_inside_a_group_commit_loses_no_acked_upload_and_counts_none_twice() {
    use AckStatus::{Accepted, AlreadyAccepted};
    let t0 = Instant::now();
    let (clean, answers) = group_round(None).await;
    eprintln!("clean run: {:.1} s", t0.elapsed().as_secs_f64());
    assert!(answers.iter().all(|a| a.0 == Some(Accepted)), "{answers:?}");
    for point in [
        "commit-before-flush:2",
        "commit-after-flush:2",
        "round-commit:1",
    ] {
        let (global, answers) = group_round(Some(point)).await;
        eprintln!("{point}: {answers:?}");
        // every acknowledged upload is in the global (the round counts all six, once each,
        // and its sum is the clean run's), and every one not acknowledged is taken on re-send
        assert_eq!(global, clean, "{point}: the committed global differs");
        assert_eq!(answers[0], (Some(Accepted), None), "{point}");
        for (i, a) in answers.iter().enumerate() {
            assert!(a.0.is_some() || a.1.is_some(), "{point}: client {i} {a:?}");
        }
        match point {
            // nothing of the second batch was stored: its clients' re-sends are new
            "commit-before-flush:2" => assert!(
                answers.iter().skip(1).any(|a| a == &(None, Some(Accepted))),
                "{point}: {answers:?}"
            ),
            // the second batch was stored, never acknowledged: its re-sends are known
            "commit-after-flush:2" => assert!(
                answers
                    .iter()
                    .skip(1)
                    .any(|a| a == &(None, Some(AlreadyAccepted))),
                "{point}: {answers:?}"
            ),
            // every upload was acknowledged before the commit crashed
            _ => assert!(answers.iter().all(|a| a == &(Some(Accepted), None))),
        }
    }
}

/// Sends an upload as the SDK does: again after a pause while the coordinator answers
/// `RetryLater` (a version being committed); `None` when the connection failed.
async fn acked(s: &Session, msg: &ClientMsg) -> Option<AckStatus> {
    for _ in 0..600 {
        match s.request(msg).await {
            Ok((CoordMsg::Ack { status, .. }, _)) => return Some(status),
            Ok((CoordMsg::Refused(r), _))
                if r.code == fedlora_protocol::RefusalCode::RetryLater =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Ok((other, _)) => panic!("an upload was answered {other:?}"),
            Err(_) => return None,
        }
    }
    panic!("the upload was deferred for 30 s")
}

/// What one scripted async campaign saw: the committed global of version 2, and the answers
/// to (client 2's stale upload after the restart, client 0's re-send of its counted upload).
struct AsyncRun {
    v2: Vec<u8>,
    resend_stale: Option<AckStatus>,
    resend_counted: Option<AckStatus>,
}

/// An async (FedBuff) campaign of 2 versions, buffer 2, 3 clients, scripted so that client
/// 2's update, trained on version 0, is counted one version stale in buffer 2. With `crash`,
/// the coordinator is killed with SIGKILL right after that stale upload is acknowledged
/// (`"kill"`), or aborts at a crash point (`NAME:K`); then it restarts on the same directory
/// and every client sends again what it sent last.
async fn async_campaign(crash: Option<&str>) -> AsyncRun {
    let Setup {
        dir: _dir,
        certs,
        data,
        addr,
        config,
        log,
    } = setup_n(
        3,
        "",
        "eval_timeout_ms = 20000\nmode = \"async\"\nbuffer = 2\nmax_staleness = 2\n\
         [federation.train]\nweighting = \"uniform\"\ncodec = \"dense-f32\"\n",
    );
    let toml = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, toml.replace("rounds = 1\n", "rounds = 2\n")).unwrap();
    let initial = initial_adapter(&LmConfig::new()).unwrap();
    let spec_hash = initial.spec().hash();
    let point = crash.filter(|c| *c != "kill");
    let mut child = start_crashing(&config, &log, point);
    let mut s: Vec<Session> = Vec::new();
    for i in 0..3 {
        s.push(join(&certs, i, addr, spec_hash).await);
    }
    let committed = |v: u64| {
        let t0 = Instant::now();
        loop {
            let st = status_json(&data).unwrap_or_default();
            if st["global_version"].as_u64() >= Some(v) {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "version {v} did not commit: {st}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // all three train on version 0 (round 1)
    let mut offers = Vec::new();
    for x in &s {
        offers.push(offer(x).await);
    }
    assert!(offers.iter().all(|o| o.round == 1 && o.global_version == 0));
    let up =
        |i: usize, round: u64| upload(round, &delta(&initial, i as f32 + 1.0 + round as f32), 1.0);
    assert_eq!(acked(&s[0], &up(0, 1)).await, Some(AckStatus::Accepted));
    assert_eq!(acked(&s[1], &up(1, 1)).await, Some(AckStatus::Accepted));
    committed(1);
    // client 2's update of round 1 arrives after version 1: it goes to buffer 2, one stale
    let (reply, _) = s[2].request(&up(2, 1)).await.unwrap();
    assert!(
        matches!(
            reply,
            CoordMsg::Ack {
                round: 2,
                status: AckStatus::Accepted
            }
        ),
        "{reply:?}"
    );
    let mut run = AsyncRun {
        v2: Vec::new(),
        resend_stale: None,
        resend_counted: None,
    };
    if crash == Some("kill") {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    if crash.is_some() {
        if point.is_some() {
            // client 0 trains on version 1 and uploads: buffer 2 fills and its commit aborts
            let o = offer(&s[0]).await;
            assert_eq!(o.round, 2);
            // (its answer may never come: it is not awaited past the abort)
            let (s0, u) = (s[0].clone(), up(0, 2));
            let sent = tokio::spawn(async move { s0.request(&u).await });
            let t0 = Instant::now();
            while child.try_wait().unwrap().is_none() {
                assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "no crash at {point:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            sent.abort();
        }
        drop(s);
        child = start(&config, &log);
        s = Vec::new();
        for i in 0..3 {
            s.push(join(&certs, i, addr, spec_hash).await);
        }
        // an upload is sent again after the restart (the SDK re-sends the last one it did not
        // see acknowledged): the stale one in the buffer, and client 0's last one, counted in
        // version 1 (SIGKILL) or in the buffer of version 2 (crash points)
        run.resend_stale = acked(&s[2], &up(2, 1)).await;
        let last = if point.is_some() { 2 } else { 1 };
        run.resend_counted = acked(&s[0], &up(0, last)).await;
    }
    // client 0 trains on version 1 (or its update of it is already in the buffer)
    match poll(&s[0]).await {
        Task::Train(o) => {
            assert_eq!((o.round, o.global_version), (2, 1));
            let a = acked(&s[0], &up(0, 2)).await;
            assert!(
                matches!(a, Some(AckStatus::Accepted | AckStatus::AlreadyAccepted)),
                "{a:?}"
            );
        }
        Task::AlreadyUploaded { round: 2, .. } | Task::Wait { .. } | Task::Evaluate { .. } => {}
        other => panic!("unexpected task {other:?}"),
    }
    committed(2);
    let st = status_json(&data).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let rounds = st["rounds"].as_array().unwrap();
    let v2 = rounds
        .iter()
        .find(|r| r["version"] == 2)
        .expect("a round made version 2");
    assert_eq!(v2["participants"].as_array().unwrap().len(), 2, "{v2}");
    assert_eq!(st["buffer"]["staleness_histogram"][1], 1, "{st}");
    run.v2 = std::fs::read(data.join("checkpoints/v2.bin")).unwrap();
    run
}

/// Async mode under kill -9: SIGKILL with a stale update acknowledged in the open buffer,
/// and aborts between a batch's flush and its acknowledgement and inside a version's commit.
/// After the restart the buffer still holds what was acknowledged (its re-send is
/// `AlreadyAccepted`), an update already counted in a committed version is recognised, and
/// version 2 is bit for bit the one of a run without the crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_buffers_survive_kill_9_and_count_each_update_once() {
    use AckStatus::AlreadyAccepted;
    let clean = async_campaign(None).await;
    for crash in ["kill", "commit-after-flush:4", "round-commit:2"] {
        let t0 = Instant::now();
        let run = async_campaign(Some(crash)).await;
        eprintln!("{crash}: {:.1} s", t0.elapsed().as_secs_f64());
        assert_eq!(run.v2, clean.v2, "{crash}: version 2 differs");
        assert_eq!(run.resend_counted, Some(AlreadyAccepted), "{crash}");
        assert_eq!(run.resend_stale, Some(AlreadyAccepted), "{crash}");
    }
}
