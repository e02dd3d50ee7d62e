//! A device on a real bad link: the `fedlora client` process runs in a network namespace the
//! test creates, joined to the coordinator's by a veth pair with `tc netem` (10 % loss and
//! 200 ms delay each way). During round 1's upload the link goes down for longer than the QUIC
//! idle timeout, then up again. The federation completes, the client reports the bytes it sent
//! and a resumed upload, and no upload is counted twice.
//!
//! Needs root, `ip` and `tc` (iproute2; `.ci/run` installs it). Where network namespaces are not
//! available it skips; where the netem qdisc is not (a kernel without `sch_netem`), it runs the
//! link-down part only. Either way it prints a `SKIPPED:` line on stderr, which `.ci/run` counts
//! and reports as skipped (not passed); with `FEDLORA_REQUIRE_NETEM=1` it fails instead.
//!
//! The client's QUIC idle timeout is lowered to [`IDLE_TIMEOUT`] (`--idle-timeout`), so the link
//! stays down for [`LINK_DOWN`], past it, without waiting out the default 60 s.

/// The client's idle timeout in this test.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the link stays down: past the idle timeout, so the connection is lost.
const LINK_DOWN: Duration = Duration::from_secs(10);

use crate::common;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fedlora_coordinator::certs::{default_server_names, init_certs};
use fedlora_coordinator::store::RoundStatus;
use fedlora_coordinator::{Coordinator, CoordinatorConfig};
use fedlora_device::model_args::{ModelArgs, DEFAULT_BASE};
use fedlora_device::workload::Workload;

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A namespace and a veth pair with netem on both ends; removed on drop.
struct Net {
    ns: String,
    host_if: String,
}

impl Net {
    fn create(tag: u32) -> Result<Self, String> {
        let ns = format!("flnetem{tag}");
        let (host_if, dev_if) = (format!("flh{tag}"), format!("fld{tag}"));
        let net = Net {
            ns: ns.clone(),
            host_if: host_if.clone(),
        };
        sh(&["ip", "netns", "add", &ns])?;
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &dev_if,
        ])?;
        sh(&["ip", "link", "set", &dev_if, "netns", &ns])?;
        sh(&["ip", "addr", "add", "10.77.0.1/24", "dev", &host_if])?;
        sh(&["ip", "link", "set", &host_if, "up"])?;
        let inside = |cmd: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", &ns];
            v.extend_from_slice(cmd);
            sh(&v)
        };
        inside(&["ip", "addr", "add", "10.77.0.2/24", "dev", &dev_if])?;
        inside(&["ip", "link", "set", &dev_if, "up"])?;
        inside(&["ip", "link", "set", "lo", "up"])?;
        for (dev, in_ns) in [(host_if.as_str(), false), (dev_if.as_str(), true)] {
            let q = [
                "tc", "qdisc", "add", "dev", dev, "root", "netem", "loss", "10%", "delay", "200ms",
            ];
            let r = if in_ns { inside(&q) } else { sh(&q) };
            if let Err(e) = r {
                // a kernel without sch_netem: the link-down part still runs, but the loss and
                // delay part is reported as skipped (tests/e2e/bad_link/lossy_link.rs covers loss and delay
                // with its in-process proxy)
                skip(&format!(
                    "loss and delay part: no netem qdisc ({e}); the link-down part still runs"
                ));
                break;
            }
        }
        Ok(net)
    }

    fn link(&self, up: bool) {
        sh(&[
            "ip",
            "link",
            "set",
            &self.host_if,
            if up { "up" } else { "down" },
        ])
        .unwrap();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = sh(&["ip", "link", "del", &self.host_if]);
        let _ = sh(&["ip", "netns", "del", &self.ns]);
    }
}

/// Says why the test cannot run, where CI's log shows it (not through the test's captured
/// output): one `SKIPPED:` line that `.ci/run` counts. With `FEDLORA_REQUIRE_NETEM=1` a skip
/// is a failure.
fn skip(why: &str) {
    let why = format!("{why} (needs root with network namespaces, ip, tc and sch_netem)");
    if std::env::var("FEDLORA_REQUIRE_NETEM").is_ok_and(|v| v == "1") {
        panic!("FEDLORA_REQUIRE_NETEM=1 but the netem test cannot run: {why}");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED: netem test: {why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_survives_netem_loss_delay_and_a_link_down_past_the_idle_timeout() {
    let tag = std::process::id() % 100_000;
    let net = match Net::create(tag) {
        Ok(n) => n,
        Err(e) => return skip(&e),
    };
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 1, &default_server_names())
        .unwrap()
        .0;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let base = root.join(DEFAULT_BASE);
    let model = ModelArgs::byte_level(base.clone());
    let mut cfg = CoordinatorConfig::new(dir.path().join("state"), &certs);
    cfg.listen = "10.77.0.1:0".parse().unwrap();
    cfg.federation = common::federation(2, 1, 1, 5, 300);
    cfg.federation.train.batch_size = 8;
    let coord = Coordinator::start(cfg, Workload::load(&model).unwrap().initial_adapter())
        .await
        .unwrap();
    let addr = coord.local_addr().unwrap();

    let client = tokio::process::Command::new("ip")
        .args(["netns", "exec", &net.ns])
        .arg(env!("CARGO_BIN_EXE_fedlora"))
        .args([
            "client",
            "--coordinator",
            &addr.to_string(),
            "--server-name",
            "localhost",
        ])
        .arg("--certs")
        .arg(&certs)
        .args(["--client-index", "0", "--upload-chunk", "1024"])
        .args(["--idle-timeout", &format!("{}s", IDLE_TIMEOUT.as_secs())])
        .arg("--base")
        .arg(&base)
        .arg("--state-dir")
        .arg(dir.path().join("device"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // the link goes down once the coordinator holds a piece of round 1's upload (the delta is
    // 64 KB in 1 KB pieces), for longer than the idle timeout. The client is frozen
    // (SIGSTOP) the moment a piece shows up, before the link goes down, so the cut always
    // falls inside the upload however fast the pieces go; it is thawed once the link is down,
    // and finds its connection gone.
    let watcher = {
        let (host_if, ns) = (net.host_if.clone(), net.ns.clone());
        let state = dir.path().join("state");
        let pid = client.id().expect("the client runs").to_string();
        tokio::spawn(async move {
            let probe = Net { ns, host_if };
            let signal = |sig: &str| {
                let _ = std::process::Command::new("kill")
                    .args([sig, &pid])
                    .status();
            };
            // gives up (false) if no upload piece shows up in time
            let held = tokio::time::timeout(
                Duration::from_secs(300),
                common::wait_for_partial_upload(&state, 1_024),
            )
            .await
            .is_ok();
            if held {
                signal("-STOP");
                probe.link(false);
                signal("-CONT");
                tokio::time::sleep(LINK_DOWN).await;
                probe.link(true);
            }
            // the probe must not tear the namespace down
            std::mem::forget(probe);
            held
        })
    };
    let finished = tokio::time::timeout(
        Duration::from_secs(480),
        coord.wait_finished(Duration::from_millis(300)),
    )
    .await
    .expect("the federation finishes over the bad link");
    assert!(finished);
    assert!(
        watcher.await.unwrap(),
        "the link went down during an upload"
    );
    let out = tokio::time::timeout(Duration::from_secs(120), client.wait_with_output())
        .await
        .expect("the client exits")
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("uploaded in rounds [1, 2]"),
        "{stdout}\n{stderr}"
    );
    assert!(!stdout.contains(", 0 upload(s) and"), "{stdout}");
    let _ = writeln!(std::io::stderr(), "netem: {}", stdout.trim());
    let report = coord.report().unwrap();
    for round in &report.rounds {
        assert!(matches!(round.record.status, RoundStatus::Committed { .. }));
        assert_eq!(round.record.participants, vec!["client-0".to_string()]);
        assert_eq!(round.record.bytes_up.len(), 1);
    }
    coord.shutdown().await;
    drop(net);
}
