//! Crash points for the crash-safety tests: `FEDLORA_CRASH_AT=NAME:K` makes the process abort
//! (no destructors, no flush: what kill -9 leaves on disk) the K-th time (from 1) it reaches
//! the point named NAME. Unset (every deployment), each point is one relaxed atomic load.
//!
//! Points: `commit-before-flush` (a group of uploads checked, its files fsynced, its records
//! not yet flushed), `commit-after-flush` (records durable, nothing acknowledged yet),
//! `round-commit` (the new global's file written, the round's commit transaction not yet),
//! `secure-input` (a masked input of a secure round received, in memory only).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable that arms one crash point.
pub const CRASH_AT_ENV: &str = "FEDLORA_CRASH_AT";

fn armed() -> Option<&'static (String, u64)> {
    static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let v = std::env::var(CRASH_AT_ENV).ok()?;
            let (name, k) = v.rsplit_once(':')?;
            Some((name.to_string(), k.parse().ok()?))
        })
        .as_ref()
}

/// Aborts the process here if `FEDLORA_CRASH_AT` names this point and this is its K-th visit.
pub fn crash_point(name: &str) {
    static HITS: AtomicU64 = AtomicU64::new(0);
    if let Some((armed, k)) = armed() {
        if armed == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *k {
            eprintln!("{CRASH_AT_ENV}: aborting at {name} (visit {k})");
            std::process::abort();
        }
    }
}
