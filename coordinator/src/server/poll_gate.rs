//! Answers a waiting client's poll without the federation lock.
//!
//! A synchronous federation tells most clients to wait most of the time (those not sampled,
//! those that already sent a secure stage's message, every client while a round is stored), and
//! while an upload batch is being flushed or a round committed, the federation lock is held
//! across an fsync. A poll that took that lock only to answer "wait" would stall a runtime
//! thread for the length of the fsync, and 10,000 waiting clients would queue behind it.
//!
//! The gate remembers, per client, the [`GateKey`] under which its last answer was "wait": the
//! published fingerprints ([`super::watched`]) of the federation (phase, round, whether it is
//! closed, versions) and of the secure round (round, stage, whether its survivor view and unmask
//! request are set), and the latest stored round. While that key is unchanged, the answer is
//! still "wait", for these reasons (synchronous mode only):
//! - within one phase of one round, the clients sampled are fixed, and being declined, having
//!   reported, or having sent a stage's message only ever turn an answer into "wait";
//! - a secure round's task for a client depends on its stage, its survivor view and request
//!   (set once per stage) and on monotone sets of who has answered;
//! - an offer waits for the round's start to be stored or the global version to move, and both
//!   are in the key.
//!
//! Asynchronous mode is never gated: whether a device may train there depends on how many
//! others hold offers, which changes without a phase change.
//!
//! **Held polls.** A direct client's poll whose answer is "wait" is not answered at once: it is
//! held ([`super::downlink::held_poll`]) until one of the key's fingerprints changes (every
//! change wakes the holders through [`PollGate::changed`]) or for as long as the client would
//! otherwise have waited before its next poll. A client therefore learns of a new round or a
//! secure stage as soon as it opens, instead of up to `connected ÷ max_polls_per_s` seconds
//! later (5 s at 10,000 clients and the default 2,000 polls a second), and the polls a second
//! stay within `max_polls_per_s`: each client polls at most once per hold.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use fedlora_protocol::{Federation, Phase};

use super::watched::{print_of, Fingerprint};
use super::Shared;
use crate::secure::SecureRound;

/// What of the round machine a waiting client's answer depends on: the phase, its round and
/// base version, whether it is closed, the version under evaluation, and the global version.
impl Fingerprint for Federation {
    fn fingerprint(&self) -> u64 {
        let s = self.state();
        let phase = match &s.phase {
            Phase::Waiting { .. } => (0u8, 0, 0, false),
            Phase::Training(o) => (1, o.round, o.base_version, o.closed),
            Phase::Evaluating { version, .. } => (2, *version, 0, false),
            Phase::Finished { success } => (3, 0, 0, *success),
        };
        print_of(&(phase, s.global_version, s.next_round))
    }
}

/// What of a secure round a waiting client's answer depends on: which round, its stage, and
/// what each stage sets when it opens (the roster, the deliveries, the view, the request).
impl Fingerprint for Option<SecureRound> {
    fn fingerprint(&self) -> u64 {
        match self {
            None => print_of(&0u8),
            Some(s) => print_of(&(
                1u8,
                s.round,
                std::mem::discriminant(&s.server.stage()),
                s.roster_len,
                s.deliveries.len(),
                s.view.is_some(),
                s.request.is_some(),
            )),
        }
    }
}

/// Records that `round`'s start is stored (the latest stored round only grows), and wakes the
/// held polls when that moved it.
pub(super) fn store_durable_round(shared: &Shared, round: u64) {
    if shared.durable_round.fetch_max(round, Ordering::AcqRel) < round {
        shared.gate.changed.notify_waiters();
    }
}

/// The key of an answer computed now; read before the answer is computed.
pub(super) fn key_now(shared: &Shared) -> GateKey {
    GateKey {
        federation: shared.fed.fingerprint(),
        secure: shared.secure.fingerprint(),
        durable_round: shared.durable_round.load(Ordering::Acquire),
    }
}

/// What a "wait" answer was computed from (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct GateKey {
    pub(super) federation: u64,
    pub(super) secure: u64,
    pub(super) durable_round: u64,
}

/// The last "wait" key per client (see the module docs).
pub(super) struct PollGate {
    enabled: bool,
    waiting: Mutex<HashMap<String, GateKey>>,
    changed: Arc<Notify>,
}

impl PollGate {
    /// A gate; `enabled` is false for asynchronous federations (their polls are neither gated
    /// nor held).
    pub(super) fn new(enabled: bool) -> Self {
        Self {
            enabled,
            waiting: Mutex::new(HashMap::new()),
            changed: Arc::new(Notify::new()),
        }
    }

    /// Whether polls are gated (and may be held).
    pub(super) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Notified whenever a fingerprint of the [`GateKey`] changes: the federation's and the
    /// secure round's (their [`super::watched::Watched`] locks are built with it) and the latest
    /// stored round ([`store_durable_round`]).
    pub(super) fn changed(&self) -> &Arc<Notify> {
        &self.changed
    }

    /// Whether `client` was told to wait under `key` (then it still must wait).
    pub(super) fn still_waiting(&self, client: &str, key: GateKey) -> bool {
        self.enabled && self.waiting.lock().expect("lock").get(client) == Some(&key)
    }

    /// Records the answer given to `client` under `key` (a key read before the answer was
    /// computed: a change in between leaves a key that no longer matches).
    pub(super) fn answered(&self, client: &str, key: GateKey, wait: bool) {
        if !self.enabled {
            return;
        }
        let mut waiting = self.waiting.lock().expect("lock");
        if wait {
            waiting.insert(client.to_string(), key);
        } else {
            waiting.remove(client);
        }
    }

    /// Forgets a client (its connection closed).
    pub(super) fn forget(&self, client: &str) {
        self.waiting.lock().expect("lock").remove(client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(f: u64) -> GateKey {
        GateKey {
            federation: f,
            secure: 0,
            durable_round: 1,
        }
    }

    #[test]
    fn only_the_key_a_wait_was_given_under_lets_a_poll_through() {
        let gate = PollGate::new(true);
        assert!(!gate.still_waiting("a", key(1)), "no answer yet");
        gate.answered("a", key(1), true);
        assert!(gate.still_waiting("a", key(1)));
        assert!(!gate.still_waiting("a", key(2)), "the federation moved");
        assert!(!gate.still_waiting("b", key(1)), "another client");
        let stored = GateKey {
            durable_round: 2,
            ..key(1)
        };
        assert!(!gate.still_waiting("a", stored), "a round was stored");
        // an answer other than wait clears it
        gate.answered("a", key(1), false);
        assert!(!gate.still_waiting("a", key(1)));
        gate.answered("a", key(1), true);
        gate.forget("a");
        assert!(!gate.still_waiting("a", key(1)));
    }

    /// A poll on another thread, answered within `within`, or `None` (it is blocked).
    fn poll_within(
        shared: &std::sync::Arc<Shared>,
        client: &str,
        within: std::time::Duration,
    ) -> (
        Option<fedlora_protocol::CoordMsg>,
        std::thread::JoinHandle<()>,
    ) {
        let (tx, rx) = std::sync::mpsc::channel();
        let (shared, client) = (shared.clone(), client.to_string());
        let t = std::thread::spawn(move || {
            let _ = tx.send(super::super::downlink::poll(&shared, &client, None).0);
        });
        (rx.recv_timeout(within).ok(), t)
    }

    fn is_wait(m: &Option<fedlora_protocol::CoordMsg>) -> bool {
        matches!(
            m,
            Some(fedlora_protocol::CoordMsg::Task(
                fedlora_protocol::Task::Wait { .. }
            ))
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_client_is_answered_while_the_federation_lock_is_held() {
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        crate::certs::init_certs(&certs, 1, &crate::certs::default_server_names()).unwrap();
        let mut config = crate::config::CoordinatorConfig::new(dir.path().join("data"), &certs);
        config.listen = "127.0.0.1:0".parse().unwrap();
        let spec = fedlora_protocol::AdapterSpec::new(vec![fedlora_protocol::TensorSpec {
            name: "a".into(),
            shape: vec![2, 2],
        }])
        .unwrap();
        let initial = fedlora_protocol::FlatAdapter::zeros(spec);
        let coord = super::super::Coordinator::start(config, initial)
            .await
            .unwrap();
        let shared = coord.shared.clone();
        // no round is open (no client connected): the first answer, from the round machine,
        // is wait
        let (first, t) = poll_within(&shared, "dev-1", Duration::from_secs(10));
        t.join().unwrap();
        assert!(is_wait(&first), "{first:?}");
        // the federation lock is held (as a group commit holds it across its fsync)
        let held = shared.fed.lock().unwrap();
        // the client told to wait is answered at once, without it
        let (gated, t1) = poll_within(&shared, "dev-1", Duration::from_secs(5));
        // one never answered must ask the round machine, and waits for the lock
        let (fresh, t2) = poll_within(&shared, "dev-2", Duration::from_millis(300));
        // and so must the first one once a round's start is stored (the key moved)
        let next = shared.durable_round.load(Ordering::Acquire) + 1;
        store_durable_round(&shared, next);
        let (moved, t3) = poll_within(&shared, "dev-1", Duration::from_millis(300));
        drop(held);
        for t in [t1, t2, t3] {
            t.join().unwrap();
        }
        assert!(is_wait(&gated), "{gated:?}");
        assert!(
            fresh.is_none(),
            "a client never told to wait skipped the round machine"
        );
        assert!(moved.is_none(), "a stale wait was answered from the gate");
        coord.shutdown().await;
    }

    #[test]
    fn an_async_federation_is_never_gated() {
        let gate = PollGate::new(false);
        gate.answered("a", key(1), true);
        assert!(!gate.still_waiting("a", key(1)));
    }
}
