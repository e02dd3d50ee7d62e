//! Several front-ends over one PostgreSQL (`fedlora coordinator --store postgres://…`, real
//! processes): 30 clients spread over 3 front-ends, one of which drives the rounds; the driver
//! is killed (a crash point: abort, as kill -9) in the middle of a plain round and of a secure
//! round, and in the plain round a front-end that relays is killed (SIGKILL) as well. Another
//! front-end takes the lease and the federation goes on; the clients move to the front-ends
//! that are left. The committed global adapter is compared bit for bit with a
//! run without the failover (modular codec: the sum is exact, whatever the order).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedlora_client::sdk::{ClientConfig, FederatedClient};
use fedlora_client::transport::{ClientTls, TransportTimers};
use fedlora_coordinator::store::scratch::ScratchSchema;
use fedlora_coordinator::store::{RoundStatus, Store, StoreLocation};
use fedlora_protocol::{AdapterSpec, FlatAdapter, ModularParams, TrainConfig};
use fedlora_train::dp_sgd::DpSgdConfig;
use fedlora_train::learner::Learner;
use fedlora_train::model::LmConfig;
use fedlora_train::train::{initial_adapter, EvalOutcome, TrainOutcome};
use fedlora_train::TrainError;
use rand::rngs::ChaCha20Rng;
use rand::{RngExt, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_fedlora");
const CLIENTS: usize = 30;

/// A client whose update depends only on who it is and the global it trained from: a run
/// that trains from the same global gives the same updates, whatever its round ids.
struct Fixed {
    spec: AdapterSpec,
    index: u64,
}

impl Learner for Fixed {
    fn spec(&self) -> &AdapterSpec {
        &self.spec
    }

    fn train_examples(&self) -> usize {
        1
    }

    fn train(
        &self,
        global: &FlatAdapter,
        cfg: &TrainConfig,
        _rng: &mut ChaCha20Rng,
    ) -> Result<TrainOutcome, TrainError> {
        let tag = global
            .values()
            .iter()
            .fold(0u64, |h, v| h.rotate_left(7) ^ u64::from(v.to_bits()));
        let mut rng = ChaCha20Rng::seed_from_u64(tag ^ (self.index + 1).wrapping_mul(0x9E37));
        let values = (0..self.spec.numel())
            .map(|_| rng.random_range(-0.01f32..=0.01))
            .collect();
        Ok(TrainOutcome {
            delta: FlatAdapter::new(self.spec.clone(), values).unwrap(),
            train_loss: 0.0,
            examples: 1,
            steps: cfg.local_steps as usize,
            secs: 0.0,
            released_loss: None,
        })
    }

    fn train_dp(
        &self,
        _global: &FlatAdapter,
        _cfg: &TrainConfig,
        _dp: &DpSgdConfig,
        _rng: &mut ChaCha20Rng,
        _noise: &mut fedlora_dp::GaussianNoise,
    ) -> Result<TrainOutcome, TrainError> {
        Err(TrainError::Config("no DP here".into()))
    }

    fn evaluate(&self, _adapter: &FlatAdapter) -> Result<EvalOutcome, TrainError> {
        Ok(EvalOutcome {
            loss: 0.0,
            tokens: 1,
            accuracy: None,
        })
    }
}

/// One federation's files: certificates, a config file, and `n` front-ends' addresses.
struct Fleet {
    dir: PathBuf,
    certs: PathBuf,
    config: PathBuf,
    addrs: Vec<SocketAddr>,
    url: String,
}

impl Fleet {
    fn new(dir: &Path, certs: &Path, url: &str, secure: bool, frontends: usize) -> Self {
        let mp = ModularParams {
            value_bits: 10,
            clamp: 0.02,
            fraction: 1.0,
            max_weight: CLIENTS as u64,
        };
        let secure = if secure {
            format!(
                "[federation.train.secure]\nthreshold = 6\nneighbours = 10\nmodulus_bits = {}\n\
                 stage_timeout_ms = 20000\n",
                mp.modulus_bits()
            )
        } else {
            String::new()
        };
        let config = dir.join("coordinator.toml");
        std::fs::write(
            &config,
            format!(
                "certs = {:?}\nstore = {url:?}\n\
                 [federation]\nrounds = 1\nclients_per_round = {CLIENTS}\n\
                 min_clients = {CLIENTS}\nround_timeout_ms = 60000\neval_timeout_ms = 300\n\
                 [federation.train]\nweighting = \"uniform\"\n\
                 [federation.train.codec.modular]\nvalue_bits = {}\nclamp = {}\n\
                 fraction = {}\nmax_weight = {}\n{secure}",
                certs.display().to_string(),
                mp.value_bits,
                mp.clamp,
                mp.fraction,
                mp.max_weight
            ),
        )
        .unwrap();
        Self {
            dir: dir.to_path_buf(),
            certs: certs.to_path_buf(),
            config,
            addrs: (0..frontends)
                .map(|_| {
                    format!("127.0.0.1:{}", crate::common::free_port())
                        .parse()
                        .unwrap()
                })
                .collect(),
            url: url.to_string(),
        }
    }

    /// Starts front-end `i` (aborting at `crash`, `NAME:K`, when given); its log goes to
    /// `fe{i}.log`.
    fn start(&self, i: usize, crash: Option<&str>) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(i))
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["coordinator", "--config"])
            .arg(&self.config)
            .arg("--listen")
            .arg(self.addrs[i].to_string())
            .arg("--data-dir")
            .arg(self.dir.join(format!("fe{i}")))
            .env_remove(fedlora_coordinator::faults::CRASH_AT_ENV)
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(c) = crash {
            cmd.env(fedlora_coordinator::faults::CRASH_AT_ENV, c);
        }
        cmd.spawn().unwrap()
    }

    fn log(&self, i: usize) -> PathBuf {
        self.dir.join(format!("fe{i}.log"))
    }

    /// Waits until front-end `i` (the process `child`) logs `what`; fails at once, with its
    /// log, if it exits first.
    async fn wait_log(&self, i: usize, child: &mut Child, what: &str) {
        let t0 = Instant::now();
        loop {
            let log = std::fs::read_to_string(self.log(i)).unwrap_or_default();
            if log.contains(what) {
                return;
            }
            if let Some(st) = child.try_wait().unwrap() {
                panic!("front-end {i} exited ({st}) before it logged {what:?}:\n{log}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "front-end {i} never logged {what:?}:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The 30 clients, client `i` trying the front-ends from `i mod n` on, until the
    /// federation finishes.
    async fn run_clients(&self) {
        let spec = initial_adapter(&LmConfig::new()).unwrap().spec().clone();
        let ep = fedlora_client::transport::bare_endpoint().unwrap();
        let n = self.addrs.len();
        let mut handles = Vec::new();
        for i in 0..CLIENTS {
            let order: Vec<SocketAddr> = (0..n).map(|k| self.addrs[(i + k) % n]).collect();
            let mut cc = ClientConfig::new(order[0], ClientTls::from_dir(&self.certs, i));
            cc.alternates = order[1..].to_vec();
            cc.endpoint = Some(ep.clone());
            cc.sampling_seed = Some(1000 + i as u64);
            // a lost front-end is noticed within a second or two
            cc.timers = TransportTimers {
                idle_timeout: Duration::from_secs(2),
                connect_timeout: Duration::from_secs(2),
            };
            cc.backoff_initial_ms = 100;
            cc.backoff_max_ms = 500;
            cc.max_connect_attempts = Some(200);
            let learner: Arc<dyn Learner> = Arc::new(Fixed {
                spec: spec.clone(),
                index: i as u64,
            });
            let client = FederatedClient::with_learner(cc, learner).unwrap();
            handles.push(tokio::spawn(async move { client.run().await }));
        }
        for (i, h) in handles.into_iter().enumerate() {
            let r = tokio::time::timeout(Duration::from_secs(120), h)
                .await
                .unwrap_or_else(|_| panic!("client {i} never finished"))
                .unwrap();
            assert!(r.is_ok(), "client {i}: {r:?}");
        }
    }

    /// The store's committed global of version 1 and its round records.
    fn committed(&self) -> (Vec<u8>, Vec<fedlora_coordinator::store::RoundRecord>) {
        let s =
            Store::open_existing_at(&self.dir, &StoreLocation::Postgres(self.url.clone())).unwrap();
        (s.checkpoint(1).unwrap(), s.rounds().unwrap())
    }
}

/// Waits (without blocking the runtime) until `c` exits; its status.
async fn exit_of(c: &mut Child, what: &str) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{what} did not exit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_exit(c: &mut Child, what: &str) {
    let st = exit_of(c, what).await;
    assert!(st.success(), "{what} exited with {st}");
}

/// A federation on 3 front-ends whose driver (front-end 0) aborts at `crash`, and, with
/// `kill_follower`, whose front-end 2 is killed (SIGKILL) 1.5 s into the clients' run; returns
/// the committed global (version 1) and the round records.
async fn failover_run(
    schema: &ScratchSchema,
    certs: &Path,
    secure: bool,
    crash: &str,
    kill_follower: bool,
) -> (Vec<u8>, Vec<fedlora_coordinator::store::RoundRecord>) {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::new(dir.path(), certs, &schema.url(), secure, 3);
    let mut driver = fleet.start(0, Some(crash));
    fleet.wait_log(0, &mut driver, "driving the rounds").await;
    let mut others = [fleet.start(1, None), fleet.start(2, None)];
    let [one, two] = &mut others;
    fleet.wait_log(1, one, "front-end listening").await;
    fleet.wait_log(2, two, "front-end listening").await;
    tokio::join!(fleet.run_clients(), async {
        if kill_follower {
            // a front-end that relays (or, if it took the lease already, the new driver)
            tokio::time::sleep(Duration::from_millis(1500)).await;
            two.kill().unwrap();
        }
    });
    // the driver died at its crash point (abort: not a success)
    let st = exit_of(&mut driver, "the driver").await;
    assert!(!st.success(), "the driver was meant to abort at {crash}");
    let logs: String = (1..3)
        .map(|i| std::fs::read_to_string(fleet.log(i)).unwrap())
        .collect();
    assert!(
        logs.contains("this front-end takes over driving"),
        "no front-end took over:\n{logs}"
    );
    wait_exit(one, "front-end 1").await;
    if kill_follower {
        let _ = exit_of(two, "front-end 2").await;
    } else {
        wait_exit(two, "front-end 2").await;
    }
    fleet.committed()
}

/// The same federation on one front-end: without a fault, or (`crash`) restarted after it
/// aborts there, as a single coordinator would be.
async fn single_run(
    schema: &ScratchSchema,
    certs: &Path,
    secure: bool,
    crash: Option<&'static str>,
) -> (Vec<u8>, Vec<fedlora_coordinator::store::RoundRecord>) {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::new(dir.path(), certs, &schema.url(), secure, 1);
    let mut fe = fleet.start(0, crash);
    fleet.wait_log(0, &mut fe, "driving the rounds").await;
    // with a crash: restarted as soon as it aborts
    let fleet_cfg = (fleet.config.clone(), fleet.addrs[0], fleet.dir.clone());
    let last = tokio::task::spawn_blocking(move || {
        let mut fe = fe;
        if crash.is_none() {
            return fe;
        }
        let st = fe.wait().unwrap();
        assert!(!st.success());
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(fleet_cfg.2.join("fe0.log"))
            .unwrap();
        Command::new(BIN)
            .args(["coordinator", "--config"])
            .arg(&fleet_cfg.0)
            .arg("--listen")
            .arg(fleet_cfg.1.to_string())
            .arg("--data-dir")
            .arg(fleet_cfg.2.join("fe0"))
            .env_remove(fedlora_coordinator::faults::CRASH_AT_ENV)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    });
    fleet.run_clients().await;
    let mut last = last.await.unwrap();
    wait_exit(&mut last, "the coordinator").await;
    fleet.committed()
}

fn certs_for(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    let st = Command::new(BIN)
        .args(["certs", "init", "--clients", &CLIENTS.to_string(), "--out"])
        .arg(&certs)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    certs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_round_survives_kill_9_of_its_driver_and_of_a_front_end_and_commits_the_same_bits()
{
    let (Some(faulty), Some(clean)) = (
        ScratchSchema::for_test("failover on PostgreSQL (plain)"),
        ScratchSchema::for_test("failover on PostgreSQL (plain, reference)"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let certs = certs_for(dir.path());
    // the driver dies after its second group of uploads is durable, before it acknowledges
    // any of them: their clients send them again to another front-end; and a front-end that
    // relays is killed too: its clients move
    // (the two runs are independent: side by side)
    let ((global, rounds), (want, want_rounds)) = tokio::join!(
        failover_run(&faulty, &certs, false, "commit-after-flush:2", true),
        single_run(&clean, &certs, false, None)
    );
    assert_eq!(rounds.len(), 1, "{rounds:?}");
    assert_eq!(rounds[0].status, RoundStatus::Committed { version: 1 });
    assert_eq!(
        rounds[0].participants.len(),
        CLIENTS,
        "none lost, none twice"
    );
    assert_eq!(rounds[0].participants, want_rounds[0].participants);
    assert!(
        global == want,
        "the committed global differs from the run without a failover"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_round_whose_driver_dies_is_retried_by_the_next_and_commits_the_same_bits() {
    let (Some(faulty), Some(clean)) = (
        ScratchSchema::for_test("failover on PostgreSQL (secure)"),
        ScratchSchema::for_test("failover on PostgreSQL (secure, reference)"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let certs = certs_for(dir.path());
    // the driver dies with half the masked inputs in: the round's secrets die with it, so the
    // next driver fails the round and opens a fresh one, exactly as a restarted coordinator
    // does (the reference run)
    let crash = "secure-input:15";
    let ((global, rounds), (want, want_rounds)) = tokio::join!(
        failover_run(&faulty, &certs, true, crash, false),
        single_run(&clean, &certs, true, Some(crash))
    );
    assert_eq!(rounds.len(), 2, "{rounds:?}");
    assert!(
        matches!(rounds[0].status, RoundStatus::Failed { .. }),
        "{rounds:?}"
    );
    assert_eq!(rounds[1].status, RoundStatus::Committed { version: 1 });
    assert_eq!(rounds[1].participants.len(), CLIENTS);
    assert_eq!(
        rounds.iter().map(|r| &r.status).collect::<Vec<_>>(),
        want_rounds.iter().map(|r| &r.status).collect::<Vec<_>>()
    );
    assert!(
        global == want,
        "the committed global differs from the restarted run's"
    );
}

/// Clients of a front-end that relays count in the coordinator's poll budget as its own do:
/// with `max_polls_per_s = 1` and 3 clients connected through a relaying front-end (none to the
/// driver), a waiting client is told to poll again after 3 s. The driver once counted only its
/// own connections, so relayed clients were told `poll_interval_ms` (here 100 ms) and, at
/// N = 10,000 over 2 front-ends, polled twice as often as the budget allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_relaying_front_end_count_in_the_poll_budget() {
    use fedlora_client::transport::endpoint;
    use fedlora_protocol::{ClientMsg, CoordMsg, Task};
    let Some(schema) = ScratchSchema::for_test("poll budget over front-ends") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let certs = certs_for(dir.path());
    let fleet = Fleet::new(dir.path(), &certs, &schema.url(), false, 2);
    let config = std::fs::read_to_string(&fleet.config).unwrap();
    std::fs::write(
        &fleet.config,
        format!("max_polls_per_s = 1\npoll_interval_ms = 100\n{config}"),
    )
    .unwrap();
    let mut driver = fleet.start(0, None);
    fleet.wait_log(0, &mut driver, "driving the rounds").await;
    let mut relaying = fleet.start(1, None);
    fleet
        .wait_log(1, &mut relaying, "front-end listening")
        .await;
    let spec = initial_adapter(&LmConfig::new()).unwrap().spec().clone();
    let mut sessions = Vec::new();
    for i in 0..3 {
        let ep = endpoint(&ClientTls::from_dir(&certs, i)).unwrap();
        // the front-end may still be reading the federation from the store: retry briefly
        let t0 = Instant::now();
        let session = loop {
            let (s, reply) = crate::common::say_hello(&ep, fleet.addrs[1], spec.hash()).await;
            if matches!(reply, CoordMsg::Welcome { .. }) {
                break s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "client {i}: {reply:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        sessions.push((ep, session));
    }
    // 30 clients are awaited: the round waits, and the 3 connected clients share 1 poll/s
    let (reply, _) = sessions[0]
        .1
        .request(&ClientMsg::Poll { held_version: None })
        .await
        .unwrap();
    for p in [&mut driver, &mut relaying] {
        let _ = p.kill();
        let _ = p.wait();
    }
    match reply {
        CoordMsg::Task(Task::Wait { retry_after_ms }) => assert_eq!(
            retry_after_ms, 3_000,
            "3 relayed clients at 1 poll/s should wait 3 s"
        ),
        other => panic!("expected a wait, got {other:?}"),
    }
}
