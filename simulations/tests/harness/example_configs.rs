//! The sweep and audit examples under `examples/configs/` load and validate as `fedlora
//! simulate` and `fedlora audit` load them, and name every key their files have, set or
//! commented out (the coordinator's examples are checked in `src/cmd/coordinator.rs`).

#[path = "../../../tests/support/example_keys.rs"]
mod example_keys;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use fedlora_simulations::audit::AuditConfig;
use fedlora_simulations::sweep::{SweepConfig, TrainSettings};
use fedlora_simulations::task::TaskConfig;

/// The example `name` under the repository's `examples/configs/`: its path and text.
fn example(name: &str) -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("examples")
        .join("configs")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (path, text)
}

/// Sets the task keys that are left out of the serialised form at their defaults
/// (`skip_serializing_if`), so that the key walk sees them too.
fn show_task_keys(task: &mut TaskConfig) {
    task.min_client_examples = 1;
    task.max_client_examples = 1;
    task.validation = true;
    task.freeze_a = true;
}

/// Sets the `[train]` keys that are left out of the serialised form at their defaults.
fn show_train_keys(train: &mut TrainSettings) {
    train.optimizer = fedlora_protocol::LocalOptimizer::Sgd;
    train.client_dp.collusion = 1;
}

/// The dotted path of every key of `config`, serialised.
fn keys<T: serde::Serialize>(config: &T) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    example_keys::key_paths("", &serde_json::to_value(config).unwrap(), &mut out);
    out
}

/// `examples/configs/sweep.toml` is a sweep `fedlora simulate` accepts (it validates and has
/// points), and it names every key of a sweep file and no key that is gone: a field added to
/// the sweep file without its line there fails this test.
#[test]
fn the_sweep_example_has_points_and_names_every_key() {
    let (path, text) = example("sweep.toml");
    let mut c = SweepConfig::from_toml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (points, _) = c.points();
    // 2 ε × 3 upload paths (dense, modular, modular with secure aggregation) × 2 seeds, as its
    // comment says
    assert_eq!(points.len(), 12, "{}", path.display());
    // the [fleet] table is shown commented out: its keys are named too
    c.fleet = Some(Default::default());
    show_task_keys(&mut c.task);
    show_train_keys(&mut c.train);
    example_keys::check_complete(&text, &keys(&c))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// `examples/configs/audit.toml` is an audit `fedlora audit` runs (it validates), and it names
/// every key of an audit file and no key that is gone.
#[test]
fn the_audit_example_loads_and_names_every_key() {
    let (path, text) = example("audit.toml");
    let mut c = AuditConfig::from_toml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    show_task_keys(&mut c.task);
    show_train_keys(&mut c.train);
    example_keys::check_complete(&text, &keys(&c))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}
