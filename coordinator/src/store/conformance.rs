//! The store conformance suite: one set of tests of the [`StateStore`] contract, run against
//! every implementation (`sled_store::…` and `postgres_store::…`).
//!
//! The PostgreSQL cases read the server's URL from `FEDLORA_TEST_POSTGRES_URL` (`.ci/run` starts
//! a throwaway cluster with `tools/pg-throwaway` and sets it) and run each case in a schema of
//! its own ([`ScratchSchema::for_test`]). Under CI (`CI` set) a missing URL fails the case;
//! elsewhere the case prints one `SKIPPED:` line and returns.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fedlora_protocol::strategy::OptimizerState;
use fedlora_protocol::{
    AdapterSpec, FederationConfig, FederationState, OpenRound, Phase, TensorSpec, UploadMeta,
};
use sha2::{Digest, Sha256};

use super::scratch::ScratchSchema;
use super::{
    ClientRecord, DeviceRecord, EvalRecord, RoundRecord, RoundStatus, Store, StoreLocation,
    UploadRecord,
};
use crate::error::Result;

/// Opens the same store again and again (as a restarted coordinator would).
trait Harness {
    fn open(&self) -> Result<Store>;
}

struct SledHarness {
    dir: tempfile::TempDir,
}

impl SledHarness {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

impl Harness for SledHarness {
    fn open(&self) -> Result<Store> {
        Store::open(self.dir.path())
    }
}

/// A schema of its own in the test server ([`ScratchSchema`]).
struct PgHarness {
    dir: tempfile::TempDir,
    schema: ScratchSchema,
}

impl PgHarness {
    fn new(case: &str) -> Option<Self> {
        Some(Self {
            dir: tempfile::tempdir().unwrap(),
            schema: ScratchSchema::for_test(&format!("store conformance on PostgreSQL ({case})"))?,
        })
    }
}

impl Harness for PgHarness {
    fn open(&self) -> Result<Store> {
        Store::open_at(self.dir.path(), &StoreLocation::Postgres(self.schema.url()))
    }
}

fn spec() -> AdapterSpec {
    AdapterSpec::new(vec![TensorSpec {
        name: "t".into(),
        shape: vec![1],
    }])
    .unwrap()
}

fn meta(payload: &[u8]) -> UploadMeta {
    UploadMeta {
        digest: Sha256::digest(payload).into(),
        weight: 2.0,
        bytes: payload.len() as u64,
        train_loss: Some(0.5),
        rank: None,
        base_round: None,
    }
}

fn upload(round: u64, client: &str, payload: &[u8]) -> UploadRecord {
    UploadRecord {
        round,
        client: client.into(),
        meta: meta(payload),
        wire_bytes: payload.len() as u64 + 10,
        accepted_ms: 7,
    }
}

fn state(round: u64, uploads: &[(&str, &[u8])]) -> FederationState {
    FederationState {
        global_version: 0,
        next_round: round + 1,
        failed_rounds: 0,
        phase: Phase::Training(OpenRound {
            round,
            base_version: 0,
            selected: ["a", "b", "c"].iter().map(|s| s.to_string()).collect(),
            deadline_ms: 10,
            closed: false,
            declined: Default::default(),
            sampling_rate: None,
            uploads: uploads
                .iter()
                .map(|(c, p)| (c.to_string(), meta(p)))
                .collect(),
        }),
        contributed: Default::default(),
    }
}

fn round_record(round: u64, status: RoundStatus) -> RoundRecord {
    RoundRecord {
        round,
        base_version: 0,
        status,
        selected: vec!["a".into(), "b".into()],
        participants: vec!["a".into()],
        stragglers: vec![],
        declined: Default::default(),
        bytes_up: BTreeMap::from([("a".to_string(), 12)]),
        bytes_down: BTreeMap::new(),
        train_loss: Some(0.25),
        strategy: "fed-avg".into(),
        started_ms: 1,
        ended_ms: None,
        staleness: vec![],
    }
}

fn initialized(h: &dyn Harness) -> Store {
    let s = h.open().unwrap();
    s.initialize(
        &FederationConfig::default(),
        &spec(),
        b"initial",
        &state(1, &[]),
        3,
    )
    .unwrap();
    s
}

fn clients_of(records: &[UploadRecord]) -> Vec<(u64, &str)> {
    records
        .iter()
        .map(|r| (r.round, r.client.as_str()))
        .collect()
}

fn a_new_store_is_empty_and_initialize_stores_everything(h: &dyn Harness) {
    let s = h.open().unwrap();
    assert!(s.state().unwrap().is_none());
    assert!(s.setup().unwrap().is_none());
    assert!(s.checkpoints().unwrap().is_empty());
    assert!(s.checkpoint(0).is_err());
    drop(s);
    drop(initialized(h));
    // everything survives a reopen
    let s = h.open().unwrap();
    let (cfg, sp) = s.setup().unwrap().unwrap();
    assert_eq!(cfg, FederationConfig::default());
    assert_eq!(sp.hash(), spec().hash());
    assert_eq!(s.state().unwrap().unwrap(), state(1, &[]));
    assert_eq!(s.checkpoint(0).unwrap(), b"initial");
    let cks = s.checkpoints().unwrap();
    assert_eq!(cks.len(), 1);
    assert_eq!(cks[0].sha256, hex::encode(Sha256::digest(b"initial")));
    assert_eq!(cks[0].created_ms, 3);
}

fn recorded_uploads_survive_a_reopen_in_round_and_byte_order(h: &dyn Harness) {
    let s = initialized(h);
    // byte order: "B" < "Z" < "a" (a collation that sorts "a" first would break it)
    for (round, _client, p) in [
        (1, "a", &b"pa"[..]),
        (1, "Z", b"pz"),
        (1, "B", b"pb"),
        (2, "A", b"p2"),
    ] {
        s.write_upload_payload(round, &Sha256::digest(p).into(), p)
            .unwrap();
    }
    s.record_batch(
        &[upload(1, "a", b"pa"), upload(1, "Z", b"pz")],
        &[EvalRecord {
            version: 0,
            client: "a".into(),
            loss: 1.5,
            tokens: 10,
        }],
    )
    .unwrap();
    s.put_upload(&upload(1, "B", b"pb"), b"pb").unwrap();
    s.record_uploads(&[upload(2, "A", b"p2")]).unwrap();
    drop(s);
    let s = h.open().unwrap();
    assert_eq!(
        clients_of(&s.round_uploads(1).unwrap()),
        [(1, "B"), (1, "Z"), (1, "a")]
    );
    assert_eq!(
        clients_of(&s.uploads().unwrap()),
        [(1, "B"), (1, "Z"), (1, "a"), (2, "A")]
    );
    assert_eq!(s.round_uploads(1).unwrap()[2], upload(1, "a", b"pa"));
    assert_eq!(
        s.upload_payload(1, &Sha256::digest(b"pz").into()).unwrap(),
        b"pz"
    );
    assert_eq!(s.evals().unwrap().len(), 1);
    assert!(s.round_uploads(3).unwrap().is_empty());
}

fn payloads_are_content_addressed_and_checked(h: &dyn Harness) {
    let s = initialized(h);
    let d: [u8; 32] = Sha256::digest(b"accepted").into();
    s.write_upload_payload(1, &d, b"accepted").unwrap();
    // a second write of the same name never replaces the first
    s.write_upload_payload(1, &d, b"a refused re-send").unwrap();
    s.record_uploads(&[upload(1, "a", b"accepted")]).unwrap();
    assert_eq!(s.upload_payload(1, &d).unwrap(), b"accepted");
    // the same bytes in another round are another payload
    assert!(s.upload_payload(2, &d).is_err());
    // a payload that was never written is an error, not empty bytes
    assert!(s.upload_payload(1, &[9; 32]).is_err());
}

fn a_client_has_one_record_per_round(h: &dyn Harness) {
    let s = initialized(h);
    for p in [&b"one"[..], b"two"] {
        s.put_upload(&upload(1, "a", p), p).unwrap();
    }
    let ups = s.round_uploads(1).unwrap();
    assert_eq!(ups.len(), 1);
    assert_eq!(ups[0].meta.digest, meta(b"two").digest);
}

fn commit_round_stores_the_outcome_and_drops_the_round(h: &dyn Harness) {
    let s = initialized(h);
    s.put_upload(&upload(1, "a", b"pa"), b"pa").unwrap();
    s.put_upload(&upload(2, "b", b"pb"), b"pb").unwrap();
    let mut st = state(2, &[]);
    st.global_version = 1;
    let rec = round_record(1, RoundStatus::Committed { version: 1 });
    s.commit_round(1, b"global-1", &rec, &st, 9).unwrap();
    drop(s);
    let s = h.open().unwrap();
    assert_eq!(s.checkpoint(1).unwrap(), b"global-1");
    assert_eq!(s.checkpoint(0).unwrap(), b"initial");
    assert_eq!(
        s.checkpoints()
            .unwrap()
            .iter()
            .map(|c| (c.version, c.round))
            .collect::<Vec<_>>(),
        [(0, 0), (1, 1)]
    );
    assert_eq!(s.round(1).unwrap().unwrap(), rec);
    assert_eq!(s.state().unwrap().unwrap(), st);
    // the committed round's uploads are gone, the next round's stay
    assert!(s.round_uploads(1).unwrap().is_empty());
    assert!(s.upload_payload(1, &meta(b"pa").digest).is_err());
    assert_eq!(clients_of(&s.uploads().unwrap()), [(2, "b")]);
}

fn a_failed_round_drops_its_uploads_an_open_one_keeps_them(h: &dyn Harness) {
    let s = initialized(h);
    s.put_upload(&upload(1, "a", b"pa"), b"pa").unwrap();
    let st = state(1, &[("a", b"pa")]);
    s.put_round(&round_record(1, RoundStatus::Open), &st)
        .unwrap();
    assert_eq!(s.round_uploads(1).unwrap().len(), 1);
    assert_eq!(s.state().unwrap().unwrap(), st);
    let failed = round_record(
        1,
        RoundStatus::Failed {
            reason: "too few".into(),
        },
    );
    s.put_round(&failed, &state(2, &[])).unwrap();
    assert!(s.round_uploads(1).unwrap().is_empty());
    assert_eq!(s.round(1).unwrap().unwrap(), failed);
    // metrics update the record and leave the state alone
    let mut more = failed.clone();
    more.bytes_down.insert("b".into(), 99);
    s.update_round(&more).unwrap();
    s.flush().unwrap();
    drop(s);
    let s = h.open().unwrap();
    assert_eq!(s.round(1).unwrap().unwrap(), more);
    assert_eq!(s.state().unwrap().unwrap(), state(2, &[]));
    assert_eq!(s.rounds().unwrap().len(), 1);
    assert!(s.round(7).unwrap().is_none());
}

fn reconcile_rebuilds_the_open_round_and_deletes_the_rest(h: &dyn Harness) {
    let s = initialized(h);
    // the open round 3: `a` valid, `b` recorded without its payload, an orphan payload
    s.put_upload(&upload(3, "a", b"pa"), b"pa").unwrap();
    s.record_uploads(&[upload(3, "b", b"pb")]).unwrap();
    s.write_upload_payload(3, &meta(b"orphan").digest, b"orphan")
        .unwrap();
    // an ended round's leftovers
    s.put_upload(&upload(2, "c", b"pc"), b"pc").unwrap();
    s.flush().unwrap();
    drop(s);
    let s = h.open().unwrap();
    // the stored state lists no uploads: reconcile rebuilds the list from the records
    let (st, problems) = s.reconcile(state(3, &[])).unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains('b'), "{problems:?}");
    let Phase::Training(o) = &st.phase else {
        panic!("{st:?}")
    };
    assert_eq!(o.uploads.keys().collect::<Vec<_>>(), ["a"]);
    assert_eq!(o.uploads["a"], meta(b"pa"));
    assert_eq!(s.state().unwrap().unwrap(), st);
    assert_eq!(clients_of(&s.uploads().unwrap()), [(3, "a")]);
    assert_eq!(s.upload_payload(3, &meta(b"pa").digest).unwrap(), b"pa");
    assert!(s.upload_payload(3, &meta(b"orphan").digest).is_err());
    assert!(s.upload_payload(2, &meta(b"pc").digest).is_err());
    // with no round open, everything goes
    let mut idle = st.clone();
    idle.phase = Phase::Waiting { since_ms: 1 };
    let (_, problems) = s.reconcile(idle).unwrap();
    assert!(problems.is_empty());
    assert!(s.uploads().unwrap().is_empty());
    assert!(s.upload_payload(3, &meta(b"pa").digest).is_err());
}

fn optimizer_state_is_kept_per_version(h: &dyn Harness) {
    let s = initialized(h);
    assert!(s.optimizer_state(1).unwrap().is_none());
    let opt = OptimizerState {
        m: vec![0.5, -1.0],
        v: vec![0.25, 2.0],
    };
    s.put_optimizer_state(1, &opt).unwrap();
    drop(s);
    let s = h.open().unwrap();
    assert_eq!(s.optimizer_state(1).unwrap(), Some(opt));
    assert!(s.optimizer_state(2).unwrap().is_none());
}

fn evals_and_clients_are_kept_in_order(h: &dyn Harness) {
    let s = initialized(h);
    for (v, c) in [(1, "b"), (0, "z"), (1, "A")] {
        s.put_eval(&EvalRecord {
            version: v,
            client: c.into(),
            loss: 0.5,
            tokens: 3,
        })
        .unwrap();
    }
    s.saw_client("dev-b", "fp1", "k1", 10).unwrap();
    s.saw_client("dev-B", "fp9", "k9", 11).unwrap();
    s.saw_client("dev-b", "fp2", "k2", 20).unwrap();
    s.flush().unwrap();
    drop(s);
    let s = h.open().unwrap();
    let evals: Vec<_> = s
        .evals()
        .unwrap()
        .into_iter()
        .map(|e| (e.version, e.client))
        .collect();
    assert_eq!(
        evals,
        [(0, "z".into()), (1, "A".into()), (1, "b".to_string())]
    );
    assert_eq!(
        s.client("dev-b").unwrap().unwrap(),
        ClientRecord {
            client: "dev-b".into(),
            fingerprint: "fp2".into(),
            first_seen_ms: 10,
            last_seen_ms: 20,
            key_id: "k2".into(),
        }
    );
    assert_eq!(
        s.clients()
            .unwrap()
            .iter()
            .map(|c| c.client.as_str())
            .collect::<Vec<_>>(),
        ["dev-B", "dev-b"]
    );
    assert!(s.client("nobody").unwrap().is_none());
}

fn a_token_is_claimed_once_and_devices_are_kept(h: &dyn Harness) {
    let s = h.open().unwrap();
    let reg = s.registry().unwrap();
    assert!(!reg.token_used("h1").unwrap());
    assert!(reg.claim_token("h1", "device-1").unwrap());
    assert!(!reg.claim_token("h1", "device-2").unwrap());
    assert!(reg.token_used("h1").unwrap());
    let dev = |id: &str, renewals| DeviceRecord {
        device_id: id.into(),
        key_id: "k".into(),
        not_after_unix_s: 100,
        enrolled_ms: 5,
        renewals,
    };
    reg.put_device(&dev("device-2", 0)).unwrap();
    reg.put_device(&dev("device-1", 0)).unwrap();
    reg.put_device(&dev("device-1", 1)).unwrap();
    drop((reg, s));
    let reg = h.open().unwrap().registry().unwrap();
    assert!(!reg.claim_token("h1", "device-3").unwrap());
    assert_eq!(reg.device("device-1").unwrap().unwrap(), dev("device-1", 1));
    assert!(reg.device("device-9").unwrap().is_none());
    assert_eq!(
        reg.devices()
            .unwrap()
            .iter()
            .map(|d| d.device_id.as_str())
            .collect::<Vec<_>>(),
        ["device-1", "device-2"]
    );
}

fn one_process_leads_at_a_time(h: &dyn Harness) {
    let first = initialized(h);
    assert!(first.try_lead().unwrap());
    match h.open() {
        // sled: the directory's lock
        Err(e) => assert!(Store::is_locked(&e), "{e}"),
        // a shared store: open, but not leading
        Ok(second) => assert!(!second.try_lead().unwrap()),
    }
    drop(first);
    // the lease is free once its holder is gone (a server sees the connection end soon after)
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match h.open().and_then(|s| s.try_lead()) {
            Ok(true) => break,
            other if Instant::now() > deadline => panic!("lease never freed: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sled_store {
            $(
                #[test]
                fn $case() {
                    super::$case(&super::SledHarness::new());
                }
            )*
        }
        mod postgres_store {
            $(
                #[test]
                fn $case() {
                    if let Some(h) = super::PgHarness::new(stringify!($case)) {
                        super::$case(&h);
                    }
                }
            )*
        }
    };
}

conformance!(
    a_new_store_is_empty_and_initialize_stores_everything,
    recorded_uploads_survive_a_reopen_in_round_and_byte_order,
    payloads_are_content_addressed_and_checked,
    a_client_has_one_record_per_round,
    commit_round_stores_the_outcome_and_drops_the_round,
    a_failed_round_drops_its_uploads_an_open_one_keeps_them,
    reconcile_rebuilds_the_open_round_and_deletes_the_rest,
    optimizer_state_is_kept_per_version,
    evals_and_clients_are_kept_in_order,
    a_token_is_claimed_once_and_devices_are_kept,
    one_process_leads_at_a_time,
);
