//! The cluster recipes in `examples/cluster/` run as a scheduler would run them: each shard's
//! script with only its index variable set (Kubernetes' `JOB_COMPLETION_INDEX`, Slurm's
//! `SLURM_ARRAY_TASK_ID`), then the merge script; the merged sweep equals the unsharded one.

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_fedlora");

const SWEEP: &str = r#"
name = "cluster"
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

fn cluster_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/cluster")
}

/// The CSV without wall-clock columns (they differ between runs).
fn without_timings(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let keep: Vec<usize> = (0..header.len())
        .filter(|&i| !header[i].ends_with("_s") && header[i] != "threads")
        .collect();
    std::iter::once(header.join(","))
        .chain(lines.map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            keep.iter().map(|&i| f[i]).collect::<Vec<_>>().join(",")
        }))
        .collect::<Vec<_>>()
        .join("\n")
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
