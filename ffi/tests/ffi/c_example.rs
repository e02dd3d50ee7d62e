//! The C example (`ffi/examples/client.c`) compiled with the system's C compiler against the
//! generated header and this crate's shared library, run as its own process against a
//! coordinator on loopback: one federated round over QUIC + mTLS, uploaded from C.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fedlora_coordinator::certs::{default_server_names, init_certs};
use fedlora_coordinator::store::RoundStatus;
use fedlora_coordinator::{Coordinator, CoordinatorConfig};
use fedlora_device::model_args::{ModelArgs, DEFAULT_BASE};
use fedlora_device::workload::Workload;
use fedlora_protocol::FederationConfig;

/// Where cargo put this crate's shared library: beside this test's executable (`deps/`).
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap().to_path_buf();
    assert!(
        deps.join("libfedlora_ffi.so").exists() || deps.join("libfedlora_ffi.dylib").exists(),
        "no libfedlora_ffi shared library in {}",
        deps.display()
    );
    deps
}

fn compile(out: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = library_dir();
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .arg("-std=c11")
        .arg("-Wall")
        .arg("-Werror")
        .arg(root.join("examples/client.c"))
        .arg("-I")
        .arg(root.join("include"))
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lfedlora_ffi")
        .arg("-o")
        .arg(out)
        .status()
        .expect("a C compiler (cc) is installed");
    assert!(status.success(), "compiling the C example failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_c_example_takes_part_in_a_round() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("client");
    compile(&exe);

    let certs = init_certs(&dir.path().join("certs"), 1, &default_server_names())
        .unwrap()
        .0;
    // the coordinator serves the same adapter the C client builds by default (rank 8 on q, v
    // of the byte-level model)
    let base = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(DEFAULT_BASE);
    let model = ModelArgs::byte_level(base.clone());
    let initial = Workload::load(&model).unwrap().initial_adapter();
    let mut cfg = CoordinatorConfig::new(dir.path().join("state"), &certs);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.federation = FederationConfig {
        rounds: 1,
        clients_per_round: 1,
        min_clients: 1,
        round_timeout_ms: 120_000,
        eval_timeout_ms: 30_000,
        ..Default::default()
    };
    cfg.federation.train.local_steps = 3;
    cfg.federation.train.batch_size = 8;
    let coord = Coordinator::start(cfg, initial).await.unwrap();
    let addr = coord.local_addr().unwrap();

    let text =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/tiny_shakespeare.txt"))
            .unwrap();
    let data = dir.path().join("data.txt");
    std::fs::write(&data, &text[..20_000]).unwrap();
    let c = |name: &str| certs.join(name);
    let child = tokio::process::Command::new(&exe)
        .arg(addr.to_string())
        .arg(c("ca.pem"))
        .arg(c("client-0.pem"))
        .arg(c("client-0.key"))
        .arg(dir.path().join("device-state"))
        .arg(&base)
        .arg(&data)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // the federation finishes, or the C client exits first (then its output says why)
    let mut client = tokio::spawn(child.wait_with_output());
    let early = tokio::time::timeout(Duration::from_secs(180), async {
        tokio::select! {
            f = coord.wait_finished(Duration::from_millis(200)) => { assert!(f); None }
            o = &mut client => Some(o.unwrap().unwrap()),
        }
    })
    .await
    .expect("the federation finishes or the C client exits");
    let out = match early {
        Some(o) => o,
        None => tokio::time::timeout(Duration::from_secs(60), client)
            .await
            .expect("the C client exits")
            .unwrap()
            .unwrap(),
    };
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.contains("uploaded 1 rounds, declined 0, final version 1"),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    // the eligibility callback ran before the round and before each of the 3 steps
    assert!(stdout.contains("4 eligibility checks"), "{stdout}");
    // the log callback received the SDK's lines
    assert!(
        stderr.contains("[fedlora 3]") && stderr.contains("joined the federation"),
        "{stderr}"
    );
    let report = coord.report().unwrap();
    assert!(matches!(
        report.rounds[0].record.status,
        RoundStatus::Committed { version: 1 }
    ));
    assert_eq!(report.rounds[0].record.participants.len(), 1);
    // the global adapter (64 KiB of f32 and its header) went in pieces, and they count in the
    // round's bytes down
    let down: u64 = report.rounds[0].record.bytes_down.values().sum();
    assert!(down > 65_536, "bytes down {down}");
    coord.shutdown().await;
}
