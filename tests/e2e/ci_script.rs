//! `.ci/slowest`, the report `.ci/run` prints after the tests: on a log as long as a real run's
//! (and longer) it exits 0 and lists the slowest tests and binaries in order. With `head -N` in
//! its pipelines it died of SIGPIPE on such a log, and pipefail made a fully passing CI run
//! exit 141.

use std::fmt::Write as _;
use std::process::Command;

/// A `cargo test` log with `binaries` binaries of `per_binary` tests each, test `i` of binary
/// `b` taking `(b * per_binary + i) / 1000` seconds, so the slowest are the last binary's last.
fn long_log(binaries: usize, per_binary: usize) -> String {
    let mut log = String::new();
    for b in 0..binaries {
        writeln!(
            log,
            "     Running tests/bin{b}/main.rs (target/release/deps/bin{b}-0123456789abcdef)"
        )
        .unwrap();
        writeln!(log, "\nrunning {per_binary} tests").unwrap();
        for i in 0..per_binary {
            let secs = (b * per_binary + i) as f64 / 1000.0;
            writeln!(
                log,
                "test module::a_test_with_a_name_as_long_as_the_real_ones_number_{b}_{i} ... ok <{secs:.3}s>"
            )
            .unwrap();
        }
        writeln!(
            log,
            "\ntest result: ok. {per_binary} passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in {b}.50s\n"
        )
        .unwrap();
    }
    log
}

#[test]
fn the_slowest_tests_report_exits_zero_on_a_long_log_and_lists_them_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("test.log");
    // 4 × 5,000 lines of ~100 bytes: far past a pipe's 64 KiB buffer
    std::fs::write(&path, long_log(4, 5_000)).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/slowest");
    let out = Command::new("bash")
        .arg(script)
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "slowest tests (seconds):");
    assert_eq!(lines[11], "slowest test binaries (wall seconds):");
    assert_eq!(lines.len(), 1 + 10 + 1 + 4, "{stdout}");
    // the slowest test first, then in descending order
    assert!(
        lines[1].contains("19.999 ") || lines[1].contains("   20.00 "),
        "{}",
        lines[1]
    );
    assert!(
        lines[1]
            .ends_with("bin3: module::a_test_with_a_name_as_long_as_the_real_ones_number_3_4999"),
        "{}",
        lines[1]
    );
    assert!(lines[10].ends_with("number_3_4990"), "{}", lines[10]);
    assert!(
        lines[12].contains("3.50  bin3 (tests/bin3/main.rs)"),
        "{}",
        lines[12]
    );
    assert!(
        lines[15].contains("0.50  bin0 (tests/bin0/main.rs)"),
        "{}",
        lines[15]
    );
}
