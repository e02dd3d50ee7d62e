//! End-to-end properties of the harness: replayable CSVs, resume, shards and merge, ε from the
//! accountant, QUIC against in-process, secure against plain aggregation under dropout.

use std::path::Path;

use fedlora_simulations::output::{merge, run_sweep, SweepOptions, Transport};
use fedlora_simulations::sweep::{Shard, SweepConfig};

const SWEEP: &str = r#"
name = "test"
[task]
name = "bcw"
partition = "dirichlet"
alpha = 2.0
clients = 6
hidden = 16
[train]
local_steps = 3
batch_size = 16
learning_rate = 0.02
[faults]
dropout = 0.15
straggler = 0.15
[grid]
epsilon = [2.0, inf]
clients_per_round = [4]
rounds = [4]
codec = ["dense", "topk:0.25"]
seed = [1, 2]
"#;

fn opts(threads: usize) -> SweepOptions {
    SweepOptions {
        threads: Some(threads),
        ..Default::default()
    }
}

/// A CSV file without its timing columns (names ending in `_s`) and the thread count.
fn without_timings(path: &Path) -> String {
    fedlora_simulations::results::csv_without_timings(&std::fs::read_to_string(path).unwrap())
}

#[test]
fn same_seed_gives_byte_identical_csvs_whatever_the_thread_count() {
    let sweep = SweepConfig::from_toml(SWEEP).unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run_sweep(&sweep, SWEEP, a.path(), &opts(1)).unwrap();
    run_sweep(&sweep, SWEEP, b.path(), &opts(2)).unwrap();
    for f in ["rounds.csv", "summary.csv"] {
        let (x, y) = (
            without_timings(&a.path().join(f)),
            without_timings(&b.path().join(f)),
        );
        assert_eq!(x, y, "{f}");
        assert!(x.lines().count() > 8, "{f} has the runs' rows");
    }
    // the faults happened and were handled by the round machine
    let rounds = std::fs::read_to_string(a.path().join("rounds.csv")).unwrap();
    let header: Vec<&str> = rounds.lines().next().unwrap().split(',').collect();
    let col = |n: &str| header.iter().position(|h| *h == n).unwrap();
    let sum = |n: &str| -> u64 {
        rounds
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(col(n)).unwrap().parse::<u64>().unwrap())
            .sum()
    };
    assert!(sum("dropped") > 0 && sum("late") > 0);
    for f in [
        "report.md",
        "plots/privacy_utility.svg",
        "plots/privacy_utility.png",
    ] {
        assert!(a.path().join(f).exists(), "{f}");
    }
    let png = std::fs::read(a.path().join("plots/utility_by_round.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
}

#[test]
fn an_interrupted_sweep_resumes_without_redoing_finished_runs() {
    let sweep = SweepConfig::from_toml(SWEEP).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let first = run_sweep(&sweep, SWEEP, dir.path(), &opts(2)).unwrap();
    assert_eq!((first.ran, first.resumed), (8, 0));
    let before = without_timings(&dir.path().join("rounds.csv"));
    // "interrupt" two runs: their result files never got written
    let runs = dir.path().join("runs");
    let mut summaries: Vec<_> = std::fs::read_dir(&runs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".summary.csv"))
        .collect();
    summaries.sort();
    for p in &summaries[3..5] {
        std::fs::remove_file(p).unwrap();
    }
    let again = run_sweep(&sweep, SWEEP, dir.path(), &opts(2)).unwrap();
    assert_eq!((again.ran, again.resumed), (2, 6));
    assert_eq!(without_timings(&dir.path().join("rounds.csv")), before);
    // a changed sweep does not reuse results of the old one
    let changed = SWEEP.replace("local_steps = 3", "local_steps = 2");
    let c = SweepConfig::from_toml(&changed).unwrap();
    let third = run_sweep(&c, &changed, dir.path(), &opts(2)).unwrap();
    assert_eq!(third.resumed, 0);
}

#[test]
fn shards_merge_into_the_unsharded_result() {
    let sweep = SweepConfig::from_toml(SWEEP).unwrap();
    let whole = tempfile::tempdir().unwrap();
    run_sweep(&sweep, SWEEP, whole.path(), &opts(2)).unwrap();
    let shards: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    for (i, d) in shards.iter().enumerate() {
        let o = SweepOptions {
            shard: Some(Shard { index: i, count: 3 }),
            ..opts(1)
        };
        let out = run_sweep(&sweep, SWEEP, d.path(), &o).unwrap();
        assert_eq!(out.points, [3, 3, 2][i]);
    }
    let merged = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = shards.iter().map(|d| d.path().to_path_buf()).collect();
    let (_, report) = merge(&dirs, merged.path()).unwrap();
    assert!(report.exists());
    for f in ["rounds.csv", "summary.csv"] {
        assert_eq!(
            without_timings(&merged.path().join(f)),
            without_timings(&whole.path().join(f)),
            "{f}"
        );
    }
    // shards of another sweep are refused
    let other = tempfile::tempdir().unwrap();
    let text = SWEEP.replace("alpha = 2.0", "alpha = 3.0");
    let o = SweepConfig::from_toml(&text).unwrap();
    run_sweep(
        &o,
        &text,
        other.path(),
        &SweepOptions {
            shard: Some(Shard { index: 0, count: 3 }),
            ..opts(1)
        },
    )
    .unwrap();
    let bad = vec![dirs[0].clone(), other.path().to_path_buf()];
    let e = merge(&bad, tempfile::tempdir().unwrap().path()).unwrap_err();
    assert!(e.to_string().contains("different sweep"), "{e}");
}

#[test]
fn reported_epsilon_is_the_accountants_epsilon_for_q_sigma_steps_and_delta() {
    let text = SWEEP
        .replace("epsilon = [2.0, inf]", "epsilon = [1.0, 3.0]")
        .replace("dropout = 0.15", "dropout = 0.0");
    let sweep = SweepConfig::from_toml(&text).unwrap();
    let pool = fedlora_simulations::output::thread_pool(Some(2)).unwrap();
    for p in sweep.points().0 {
        let out = fedlora_simulations::runner::run_in_process(&sweep, &p, &pool, |_| {}).unwrap();
        let mut checked = 0;
        for r in &out.rows[1..] {
            let (Some(eps), Some(q), Some(sigma), Some(steps)) =
                (r.eps_spent, r.q, r.sigma, r.dp_steps)
            else {
                continue;
            };
            let event = fedlora_dp::DpEvent::dp_sgd(q, sigma, steps);
            let reference = fedlora_dp::Accountant::Rdp
                .epsilon(&event, r.delta)
                .unwrap();
            assert!(
                (eps - reference).abs() <= 1e-9 * reference,
                "row ε {eps} vs accountant {reference}"
            );
            assert!(
                eps <= p.epsilon * (1.0 + 1e-9),
                "{eps} over target {}",
                p.epsilon
            );
            checked += 1;
        }
        assert!(checked > 0);
    }
}

#[test]
fn secure_aggregation_gives_the_plain_modular_result_under_dropout() {
    let base = SWEEP
        .replace(
            "codec = [\"dense\", \"topk:0.25\"]",
            "codec = [\"modular:8:0.25:1:64\"]\nsecure_aggregation = [false, true]",
        )
        .replace("straggler = 0.15", "straggler = 0.0")
        .replace("dropout = 0.15", "dropout = 0.1")
        .replace("clients = 6", "clients = 10")
        .replace("clients_per_round = [4]", "clients_per_round = [8]");
    // also with heterogeneous ranks: every client masks its zero-padded delta, and the
    // coordinator divides each rank component by the survivors whose rank covers it
    let hetero = base.replace(
        "seed = [1, 2]",
        "seed = [1, 2]\nrank = [4]\nclient_ranks = [\"1,2,4\"]",
    );
    for text in [base, hetero] {
        let sweep = SweepConfig::from_toml(&text).unwrap();
        let pool = fedlora_simulations::output::thread_pool(Some(2)).unwrap();
        let (points, _) = sweep.points();
        let mut compared = 0;
        let mut dropped = 0;
        for plain in points.iter().filter(|p| !p.secure_aggregation) {
            let secure = points
                .iter()
                .find(|q| {
                    q.secure_aggregation && q.epsilon == plain.epsilon && q.seed == plain.seed
                })
                .unwrap();
            let a =
                fedlora_simulations::runner::run_in_process(&sweep, plain, &pool, |_| {}).unwrap();
            let b =
                fedlora_simulations::runner::run_in_process(&sweep, secure, &pool, |_| {}).unwrap();
            dropped += b.rows.iter().map(|r| r.dropped).sum::<usize>();
            assert!(b.rows.iter().all(|r| r.status != "failed"));
            for (x, y) in a.rows.iter().zip(&b.rows) {
                assert_eq!(
                    (x.loss, x.accuracy),
                    (y.loss, y.accuracy),
                    "round {}",
                    x.round
                );
                assert_eq!(x.aggregated, y.aggregated);
                assert_eq!(x.pad_bytes_up, y.pad_bytes_up);
            }
            if plain.client_ranks != "uniform" {
                assert!(
                    a.rows.iter().any(|r| r.pad_bytes_up > 0),
                    "padding is counted"
                );
            }
            // masking costs upload bytes, not utility
            assert!(b.summary.bytes_up > a.summary.bytes_up);
            compared += 1;
        }
        assert_eq!(compared, 4);
        assert!(dropped > 0, "dropouts happened after key sharing");
    }
}

#[test]
fn strategy_and_rank_grids_expand_and_median_is_never_run_securely() {
    let text = SWEEP.replace(
        "seed = [1, 2]",
        "seed = [1]\nstrategy = [\"fed-avg\", \"median\"]\nclient_ranks = [\"uniform\", \"2,4\"]\n\
         secure_aggregation = [false, true]",
    ).replace("codec = [\"dense\", \"topk:0.25\"]", "codec = [\"modular:8:0.25:1:64\"]");
    let sweep = SweepConfig::from_toml(&text).unwrap();
    let (points, skipped) = sweep.points();
    // 2 strategies × 2 rank mixes × 2 ε × 2 secure, less median × secure (2 × 2)
    assert_eq!(points.len(), 12);
    assert_eq!(skipped.len(), 4);
    assert!(points
        .iter()
        .all(|p| !(p.secure_aggregation && p.strategy == "median")));
    // the default strategy and uniform ranks leave run keys as they were
    let plain = SweepConfig::from_toml(SWEEP).unwrap();
    let p0 = &plain.points().0[0];
    let json = serde_json::to_string(p0).unwrap();
    assert!(
        !json.contains("strategy") && !json.contains("client_ranks"),
        "{json}"
    );
    let bad = SWEEP.replace("seed = [1, 2]", "seed = [1]\nstrategy = [\"krum\"]");
    assert!(SweepConfig::from_toml(&bad)
        .unwrap_err()
        .to_string()
        .contains("grid.strategy"));
    let bad = SWEEP.replace("seed = [1, 2]", "seed = [1]\nclient_ranks = [\"2,x\"]");
    assert!(SweepConfig::from_toml(&bad)
        .unwrap_err()
        .to_string()
        .contains("client_ranks"));
}

#[test]
fn quic_transport_gives_the_in_process_utility() {
    let text = r#"
name = "quic"
[task]
name = "bcw"
partition = "iid"
clients = 4
hidden = 16
[train]
local_steps = 3
batch_size = 16
learning_rate = 0.02
[grid]
epsilon = [2.0]
clients_per_round = [3]
rounds = [2]
codec = ["q8"]
seed = [5]
"#;
    // and the SDK's path for heterogeneous ranks and FedProx: sliced offers, zero-padded uploads
    let hetero = text.replace(
        "seed = [5]",
        "seed = [5]\nrank = [4]\nclient_ranks = [\"1,2,4\"]\nstrategy = [\"fed-prox:0.5\"]",
    );
    for text in [text.to_string(), hetero] {
        quic_matches_in_process(&text);
    }
}

fn quic_matches_in_process(text: &str) {
    let sweep = SweepConfig::from_toml(text).unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run_sweep(&sweep, text, a.path(), &opts(2)).unwrap();
    let q = SweepOptions {
        transport: Transport::Quic,
        ..opts(2)
    };
    run_sweep(&sweep, text, b.path(), &q).unwrap();
    let read = |d: &Path| {
        fedlora_simulations::output::read_csv::<fedlora_simulations::results::RoundRow>(
            &d.join("rounds.csv"),
        )
        .unwrap()
    };
    let (x, y) = (read(a.path()), read(b.path()));
    assert_eq!(x.len(), 3);
    assert_eq!(x.len(), y.len());
    for (r, s) in x.iter().zip(&y) {
        assert_eq!(s.transport, "quic");
        assert_eq!(r.status, s.status);
        let (l1, l2) = (r.loss.unwrap(), s.loss.unwrap());
        assert!((l1 - l2).abs() <= 1e-6 * l1.abs().max(1.0), "{l1} vs {l2}");
        assert_eq!(r.accuracy, s.accuracy);
        assert_eq!(r.eps_spent, s.eps_spent);
        assert_eq!(r.sigma, s.sigma);
    }
}
