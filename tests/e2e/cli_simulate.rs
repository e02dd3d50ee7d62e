//! `fedlora simulate` from the command line: a sharded sweep, its merge, and bad input; and the
//! cluster recipes in `examples/cluster/` run as a scheduler would run them: each shard's script
//! with only its index variable set (Kubernetes' `JOB_COMPLETION_INDEX`, Slurm's
//! `SLURM_ARRAY_TASK_ID`), then the merge script; the merged sweep equals the unsharded one.

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_fedlora");

const SWEEP: &str = r#"
name = "cli"
[task]
name = "bcw"
partition = "iid"
clients = 4
hidden = 16
[train]
local_steps = 2
batch_size = 16
[grid]
epsilon = [2.0, inf]
clients_per_round = [3]
rounds = [2]
seed = [1, 2]
"#;

fn simulate(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("simulate")
        .args(args)
        .output()
        .expect("run fedlora")
}

#[test]
fn sharded_sweep_merges_into_one_report_and_bad_input_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sweep.toml");
    std::fs::write(&cfg, SWEEP).unwrap();
    let cfg = cfg.to_str().unwrap();
    let mut shards = Vec::new();
    for i in 0..2 {
        let out = dir.path().join(format!("shard{i}"));
        let o = simulate(&[
            "--config",
            cfg,
            "--out",
            out.to_str().unwrap(),
            "--shard",
            &format!("{i}/2"),
            "--threads",
            "1",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).contains("2 points: 2 run now"));
        shards.push(out);
    }
    let merged = dir.path().join("merged");
    let mut args = vec!["merge", "--out", merged.to_str().unwrap()];
    args.extend(shards.iter().map(|p| p.to_str().unwrap()));
    let o = simulate(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary = std::fs::read_to_string(merged.join("summary.csv")).unwrap();
    assert_eq!(summary.lines().count(), 1 + 4, "{summary}");
    let report = std::fs::read_to_string(merged.join("report.md")).unwrap();
    assert!(report.contains("4 of 4 runs finished"), "{report}");
    assert!(report.contains("plots/privacy_utility.svg"));

    // a second run of a shard resumes: nothing is redone
    let o = simulate(&[
        "--config",
        cfg,
        "--out",
        shards[0].to_str().unwrap(),
        "--shard",
        "0/2",
    ]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("0 run now, 2 already finished"));

    // bad input: exit code 2 and a message naming the problem
    std::fs::write(
        dir.path().join("bad.toml"),
        SWEEP.replace("seed = [1, 2]", "seed = []"),
    )
    .unwrap();
    let bad = dir.path().join("bad.toml");
    for (args, needle) in [
        (
            vec!["--config", bad.to_str().unwrap(), "--out", "x"],
            "grid.seed",
        ),
        (
            vec!["--config", cfg, "--out", "x", "--shard", "2/2"],
            "shard",
        ),
        (vec!["--config", cfg], "--out"),
    ] {
        let o = simulate(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(needle),
            "{args:?}"
        );
    }
}

/// The `llm` task on the tiny Llama fixture: every codec, DP, and secure aggregation run, the
/// summary has one row per point, and DP runs record their ε.
#[test]
fn the_llm_task_runs_every_codec_dp_and_secure_aggregation() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llm/llama");
    let sweep = format!(
        r#"
name = "llm-cli"
[task]
name = "llm"
partition = "natural"
clients = 4
model_path = "{}"
context = 32
max_eval_examples = 16
[train]
local_steps = 2
batch_size = 4
learning_rate = 0.002
[grid]
epsilon = [8.0, inf]
codec = ["dense", "f16", "q4", "topk:0.05", "subset:0.1", "modular:8:0.05:0.125:64"]
clients_per_round = [4]
rounds = [2]
secure_aggregation = [false, true]
"#,
        fixture.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("llm.toml");
    std::fs::write(&cfg, sweep).unwrap();
    let out_dir = dir.path().join("out");
    let out = simulate(&[
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 6 codecs × 2 ε in the clear, and the modular codec × 2 ε under secure aggregation
    let summary = std::fs::read_to_string(out_dir.join("summary.csv")).unwrap();
    let rows: Vec<&str> = summary.lines().skip(1).collect();
    assert_eq!(rows.len(), 14, "{summary}");
    let report = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert!(report.contains("14 of 14 runs finished"), "{report}");
}

/// `fedlora audit` prints the audit's JSON, writes its report, and refuses a claim without DP.
#[test]
fn audit_prints_the_bound_and_refuses_a_run_without_dp() {
    let dir = tempfile::tempdir().unwrap();
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/simulations/configs/audit_bcw.toml"
    );
    let out = Command::new(BIN)
        .args(["audit", "--json", "--config", config, "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in [
        "epsilon_lower_bound",
        "epsilon_reported",
        "m",
        "guesses",
        "correct",
        "noise",
    ] {
        assert!(v.get(k).is_some(), "{k} missing from {v}");
    }
    assert_eq!(v["m"], 1000);
    let lb = v["epsilon_lower_bound"].as_f64().unwrap();
    assert!(lb <= v["epsilon_reported"].as_f64().unwrap());
    assert!(dir.path().join("report.md").exists() && dir.path().join("audit.json").exists());
    // ε = ∞ is no claim to audit: a typed usage error (exit code 2)
    let text = std::fs::read_to_string(config)
        .unwrap()
        .replace("epsilon = 1.0", "epsilon = inf");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, text).unwrap();
    let out = Command::new(BIN)
        .args(["audit", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("run.epsilon"));
}

fn cluster_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/cluster")
}

/// The CSV without wall-clock columns (they differ between runs).
fn without_timings(path: &Path) -> String {
    fedlora_simulations::results::csv_without_timings(&std::fs::read_to_string(path).unwrap())
}

fn run(cmd: &mut Command) {
    let o = cmd.output().expect("runs");
    assert!(
        o.status.success(),
        "{:?}: {}{}",
        cmd,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A scheduler's environment: the sweep, the shared output root, the shard count, the binary;
/// nothing inherited that names a shard.
fn scheduler_env(cmd: &mut Command, cfg: &Path, out: &Path, shards: usize) {
    cmd.env_remove("JOB_COMPLETION_INDEX")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("SHARD_INDEX")
        .env("SWEEP_CONFIG", cfg)
        .env("SWEEP_OUT", out)
        .env("SHARD_COUNT", shards.to_string())
        .env("SWEEP_THREADS", "1")
        .env("FEDLORA", BIN)
        .env("CLUSTER_DIR", cluster_dir());
}

#[test]
fn kubernetes_and_slurm_shards_merge_into_the_unsharded_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sweep.toml");
    std::fs::write(&cfg, SWEEP).unwrap();
    let whole = dir.path().join("whole");
    run(Command::new(BIN).args([
        "simulate",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        whole.to_str().unwrap(),
        "--threads",
        "1",
    ]));
    let shards = 2;
    // Kubernetes runs shard.sh with JOB_COMPLETION_INDEX; Slurm runs sweep.sbatch with
    // SLURM_ARRAY_TASK_ID (and merge.sbatch after the array)
    for (scheduler, var, shard_script, merge_script) in [
        ("k8s", "JOB_COMPLETION_INDEX", "shard.sh", "merge.sh"),
        (
            "slurm",
            "SLURM_ARRAY_TASK_ID",
            "sweep.sbatch",
            "merge.sbatch",
        ),
    ] {
        let out = dir.path().join(scheduler);
        for i in 0..shards {
            let mut cmd = Command::new(cluster_dir().join(shard_script));
            scheduler_env(&mut cmd, &cfg, &out, shards);
            run(cmd.env(var, i.to_string()));
        }
        let mut cmd = Command::new(cluster_dir().join(merge_script));
        scheduler_env(&mut cmd, &cfg, &out, shards);
        run(&mut cmd);
        for f in ["rounds.csv", "summary.csv"] {
            assert_eq!(
                without_timings(&out.join("merged").join(f)),
                without_timings(&whole.join(f)),
                "{scheduler}: {f}"
            );
        }
        assert!(out.join("merged/report.md").exists());
    }
    // without an index the shard script refuses to guess
    let mut cmd = Command::new(cluster_dir().join("shard.sh"));
    scheduler_env(&mut cmd, &cfg, &dir.path().join("none"), shards);
    let o = cmd.output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no shard index"));
}

#[test]
fn the_manifests_run_the_tested_scripts_with_matching_shard_counts() {
    let read = |f: &str| std::fs::read_to_string(cluster_dir().join(f)).unwrap();
    let job = read("sweep-job.yaml");
    assert!(job.contains("completionMode: Indexed"));
    assert!(job.contains("/opt/fedlora/cluster/shard.sh"));
    let completions = job
        .lines()
        .find_map(|l| l.trim().strip_prefix("completions: "))
        .unwrap();
    assert!(
        job.contains(&format!("name: SHARD_COUNT, value: \"{completions}\"")),
        "SHARD_COUNT must equal completions"
    );
    assert!(read("merge-job.yaml").contains("/opt/fedlora/cluster/merge.sh"));
    assert!(read("sweep.sbatch").contains("shard.sh"));
    assert!(read("merge.sbatch").contains("merge.sh"));
    assert!(read("submit-slurm.sh").contains("--dependency=\"afterok:$array\""));
}
