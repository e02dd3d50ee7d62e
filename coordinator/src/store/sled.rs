//! The embedded store (the default): sled for small records and indexes, files for large
//! payloads ([`FilePayloads`]).
//!
//! ```text
//! DATA_DIR/
//!   state/                 sled database
//!     meta:        "config" → federation config (JSON), "spec" → adapter spec (JSON),
//!                  "state" → FederationState (bincode)
//!     uploads:     round (u64 BE) ‖ client → UploadRecord (JSON), one per accepted upload
//!     checkpoints: version (u64 BE) → CheckpointRecord (JSON)
//!     rounds:      round (u64 BE) → RoundRecord (JSON)
//!     evals:       version (u64 BE) ‖ client → EvalRecord (JSON)
//!     clients:     client → ClientRecord (JSON)
//!   uploads/rROUND/DIGEST.bin   upload payloads (the codec bytes as received), named by their
//!                               SHA-256 (hex): content-addressed, never overwritten
//!   checkpoints/vVERSION.bin    global adapters (dense f32 codec bytes)
//! ```
//! Large payloads are written to a temp file and renamed; only once they are durable is the
//! sled record (which points to the file by digest) written and flushed.
//!
//! # Uploads: append-only records, group commit
//! An accepted upload is one O(1) record in `uploads` (client, round, digest, weight, rank);
//! the federation state is **not** rewritten with it. The open round's uploads are the records
//! of that round: on restart [`StateStore::reconcile`] rebuilds the state's upload list from them.
//! The coordinator commits uploads in groups ([`StateStore::record_batch`]), in this order:
//! 1. each payload is written to `uploads/rROUND/DIGEST.bin` (temp file, rename) by the request
//!    that carried it, outside any lock; a name is its content's hash, so a refused re-send can
//!    never overwrite an accepted file, and two writers of one name write the same bytes;
//! 2. the committer takes a batch of such uploads and checks each against the round machine
//!    (under the federation lock, let go again); then it makes every payload file written so
//!    far durable ([`FilePayloads`]: on Linux one `syncfs` of the data directory's file system,
//!    contents, renames and directories together; elsewhere each writer fsynced its file and
//!    the round directories are fsynced here), inserts the batch's records and flushes sled
//!    **once**;
//! 3. only then are the uploads checked again and counted in memory (under the federation
//!    lock), folded into the running sum, and acknowledged. One whose round moved during the
//!    flush (closed at its deadline, failed) is refused and counted nowhere: the round's outcome
//!    lists its participants, so its durable record is dropped with the round's other records.
//!    If the coordinator is killed before that round is committed, the restarted one rebuilds
//!    the round from its records and counts it after all: an upload can be counted that its
//!    client was told came too late, never the other way round. (Its record may also be
//!    inserted after the round's end deleted the round's files and records: such a record
//!    names no file, is never acknowledged or counted, and the next start drops it.)
//!
//! A crash (kill -9) at any point loses no acknowledged upload, and counts none twice:
//! before step 2's flush, no record of the batch is durable (or some are, through sled's own
//! background flush, and their files were made durable before the records were inserted) and no
//! client was acknowledged: a client re-sends, and a record already durable answers
//! `AlreadyAccepted`. After the flush, every record of the batch is durable whether or not its
//! ack left. A file without a record is deleted on open; a record whose file is missing or does
//! not match its digest is reported and dropped (its client was never acknowledged, or the disk
//! lost a fsynced file). Records key on (round, client), so a client is counted once per round.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use fedlora_protocol::strategy::OptimizerState;
use fedlora_protocol::{AdapterSpec, FederationConfig, FederationState, Phase};
use sha2::{Digest, Sha256};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::codec::{
    checkpoint_record, from_json, json, optimizer_bytes, optimizer_from_bytes, state_bytes,
    state_from_bytes, storage, write_file_durably,
};
use super::payloads::{FilePayloads, PayloadStore};
use super::{
    CheckpointRecord, ClientRecord, DeviceRecord, EvalRecord, RoundRecord, RoundStatus, StateStore,
    UploadRecord,
};
use crate::error::{CoordinatorError, Result};

/// The embedded store: a sled database in `DATA_DIR/state` and files beside it.
pub struct SledStore {
    dir: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    uploads: sled::Tree,
    checkpoints: sled::Tree,
    rounds: sled::Tree,
    evals: sled::Tree,
    clients: sled::Tree,
    devices: sled::Tree,
    tokens_used: sled::Tree,
    payloads: FilePayloads,
}

fn key2(a: u64, b: &str) -> Vec<u8> {
    let mut k = a.to_be_bytes().to_vec();
    k.extend_from_slice(b.as_bytes());
    k
}

impl SledStore {
    /// Opens (or creates) the store under `dir`; [`CoordinatorError::Locked`] when another
    /// process holds it.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let db = sled::Config::new()
            .path(dir.join("state"))
            .open()
            .map_err(|e| match e {
                // sled reports its file lock as an I/O error of kind WouldBlock, or of another
                // kind that wraps it ("could not acquire lock")
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("could not acquire lock") =>
                {
                    CoordinatorError::Locked(dir.to_path_buf())
                }
                other => storage(other),
            })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            meta: db.open_tree("meta")?,
            uploads: db.open_tree("uploads")?,
            checkpoints: db.open_tree("checkpoints")?,
            rounds: db.open_tree("rounds")?,
            evals: db.open_tree("evals")?,
            clients: db.open_tree("clients")?,
            devices: db.open_tree("devices")?,
            tokens_used: db.open_tree("enroll_tokens_used")?,
            payloads: FilePayloads::new(&dir.join("uploads")),
            db,
        })
    }

    fn checkpoint_path(&self, version: u64) -> PathBuf {
        self.dir.join("checkpoints").join(format!("v{version}.bin"))
    }

    fn optimizer_path(&self, version: u64) -> PathBuf {
        self.dir
            .join("checkpoints")
            .join(format!("v{version}.optimizer.bin"))
    }

    /// Writes a checkpoint file and its record (not flushed).
    fn put_checkpoint(&self, version: u64, round: u64, bytes: &[u8], now_ms: u64) -> Result<()> {
        write_file_durably(&self.checkpoint_path(version), bytes)?;
        let rec = checkpoint_record(version, round, bytes, now_ms);
        self.checkpoints.insert(version.to_be_bytes(), json(&rec))?;
        Ok(())
    }

    /// Deletes an ended round's upload records and files. Best effort, after the round's
    /// outcome is durable: a failure is logged and never undoes that outcome (a late upload
    /// may be writing into the directory; whatever is left is deleted at the next open).
    fn drop_round_uploads(&self, round: u64) {
        let cleanup = || -> Result<()> {
            for k in self.uploads.scan_prefix(round.to_be_bytes()).keys() {
                self.uploads.remove(k?)?;
            }
            self.flush()?;
            self.payloads.drop_round(round)
        };
        if let Err(e) = cleanup() {
            tracing::warn!(round, error = %e, "could not delete an ended round's uploads yet");
        }
    }
}

impl StateStore for SledStore {
    fn describe(&self) -> String {
        format!("sled in {}", self.dir.display())
    }

    fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    fn state(&self) -> Result<Option<FederationState>> {
        self.meta
            .get("state")?
            .map(|b| state_from_bytes(&b))
            .transpose()
    }

    fn setup(&self) -> Result<Option<(FederationConfig, AdapterSpec)>> {
        match (self.meta.get("config")?, self.meta.get("spec")?) {
            (Some(c), Some(s)) => Ok(Some((from_json(&c)?, from_json(&s)?))),
            _ => Ok(None),
        }
    }

    fn initialize(
        &self,
        config: &FederationConfig,
        spec: &AdapterSpec,
        initial: &[u8],
        state: &FederationState,
        now_ms: u64,
    ) -> Result<()> {
        self.put_checkpoint(0, 0, initial, now_ms)?;
        self.meta.insert("config", json(config))?;
        self.meta.insert("spec", json(spec))?;
        self.meta.insert("state", state_bytes(state))?;
        self.flush()
    }

    fn save_state(&self, state: &FederationState) -> Result<()> {
        self.meta.insert("state", state_bytes(state))?;
        self.flush()
    }

    fn write_upload_payload(&self, round: u64, digest: &[u8; 32], bytes: &[u8]) -> Result<()> {
        self.payloads.put(round, digest, bytes)
    }

    fn record_batch(&self, uploads: &[UploadRecord], evals: &[EvalRecord]) -> Result<()> {
        // the payload files' directory entries first: a durable record always names a durable
        // file
        let rounds: BTreeSet<u64> = uploads.iter().map(|r| r.round).collect();
        self.payloads.sync(&rounds)?;
        if !evals.is_empty() {
            let mut batch = sled::Batch::default();
            for e in evals {
                batch.insert(key2(e.version, &e.client), json(e));
            }
            self.evals.apply_batch(batch)?;
        }
        let mut batch = sled::Batch::default();
        for r in uploads {
            batch.insert(key2(r.round, &r.client), json(r));
        }
        self.uploads.apply_batch(batch)?;
        self.flush()
    }

    fn upload_payload(&self, round: u64, digest: &[u8; 32]) -> Result<Vec<u8>> {
        self.payloads.get(round, digest)?.ok_or_else(|| {
            storage(format!(
                "upload {} of round {round} is missing",
                hex::encode(digest)
            ))
        })
    }

    fn round_uploads(&self, round: u64) -> Result<Vec<UploadRecord>> {
        self.uploads
            .scan_prefix(round.to_be_bytes())
            .values()
            .map(|v| from_json(&v?))
            .collect()
    }

    fn uploads(&self) -> Result<Vec<UploadRecord>> {
        self.uploads
            .iter()
            .values()
            .map(|v| from_json(&v?))
            .collect()
    }

    fn commit_round(
        &self,
        version: u64,
        global: &[u8],
        round: &RoundRecord,
        state: &FederationState,
        now_ms: u64,
    ) -> Result<()> {
        write_file_durably(&self.checkpoint_path(version), global)?;
        crate::faults::crash_point("round-commit");
        let ck = json(&checkpoint_record(version, round.round, global, now_ms));
        let rr = json(round);
        let st = state_bytes(state);
        (&self.checkpoints, &self.rounds, &self.meta)
            .transaction(|(c, r, m)| {
                c.insert(&version.to_be_bytes(), ck.as_slice())?;
                r.insert(&round.round.to_be_bytes(), rr.as_slice())?;
                m.insert("state", st.as_slice())?;
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e: TransactionError<()>| storage(format!("{e:?}")))?;
        self.flush()?;
        self.drop_round_uploads(round.round);
        Ok(())
    }

    fn put_optimizer_state(&self, version: u64, state: &OptimizerState) -> Result<()> {
        write_file_durably(&self.optimizer_path(version), &optimizer_bytes(state)?)
    }

    fn optimizer_state(&self, version: u64) -> Result<Option<OptimizerState>> {
        let path = self.optimizer_path(version);
        if !path.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(&path)?;
        optimizer_from_bytes(&bytes, &path.display().to_string()).map(Some)
    }

    fn put_round(&self, round: &RoundRecord, state: &FederationState) -> Result<()> {
        let rr = json(round);
        let st = state_bytes(state);
        (&self.rounds, &self.meta)
            .transaction(|(r, m)| {
                r.insert(&round.round.to_be_bytes(), rr.as_slice())?;
                m.insert("state", st.as_slice())?;
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e: TransactionError<()>| storage(format!("{e:?}")))?;
        self.flush()?;
        if matches!(round.status, RoundStatus::Failed { .. }) {
            self.drop_round_uploads(round.round);
        }
        Ok(())
    }

    fn update_round(&self, round: &RoundRecord) -> Result<()> {
        self.rounds.insert(round.round.to_be_bytes(), json(round))?;
        Ok(())
    }

    fn checkpoint(&self, version: u64) -> Result<Vec<u8>> {
        let rec: CheckpointRecord = from_json(
            &self
                .checkpoints
                .get(version.to_be_bytes())?
                .ok_or_else(|| storage(format!("no checkpoint for version {version}")))?,
        )?;
        let bytes = std::fs::read(self.checkpoint_path(version))?;
        if hex::encode(Sha256::digest(&bytes)) != rec.sha256 {
            return Err(storage(format!("checkpoint v{version} is corrupt")));
        }
        Ok(bytes)
    }

    fn checkpoints(&self) -> Result<Vec<CheckpointRecord>> {
        self.checkpoints
            .iter()
            .values()
            .map(|v| from_json(&v?))
            .collect()
    }

    fn round(&self, round: u64) -> Result<Option<RoundRecord>> {
        self.rounds
            .get(round.to_be_bytes())?
            .map(|v| from_json(&v))
            .transpose()
    }

    fn rounds(&self) -> Result<Vec<RoundRecord>> {
        self.rounds
            .iter()
            .values()
            .map(|v| from_json(&v?))
            .collect()
    }

    fn put_eval(&self, rec: &EvalRecord) -> Result<()> {
        self.evals
            .insert(key2(rec.version, &rec.client), json(rec))?;
        self.flush()
    }

    fn evals(&self) -> Result<Vec<EvalRecord>> {
        self.evals.iter().values().map(|v| from_json(&v?)).collect()
    }

    fn saw_client(&self, client: &str, fingerprint: &str, key_id: &str, now_ms: u64) -> Result<()> {
        let rec = match self.clients.get(client)? {
            Some(b) => {
                let mut r: ClientRecord = from_json(&b)?;
                r.last_seen_ms = now_ms;
                r.fingerprint = fingerprint.to_string();
                r.key_id = key_id.to_string();
                r
            }
            None => ClientRecord {
                client: client.to_string(),
                fingerprint: fingerprint.to_string(),
                first_seen_ms: now_ms,
                last_seen_ms: now_ms,
                key_id: key_id.to_string(),
            },
        };
        // not flushed per hello (sled flushes within its flush interval): a crash in that window
        // forgets a first binding, never breaks an acknowledged upload
        self.clients.insert(client, json(&rec))?;
        Ok(())
    }

    fn client(&self, client: &str) -> Result<Option<ClientRecord>> {
        self.clients.get(client)?.map(|b| from_json(&b)).transpose()
    }

    fn clients(&self) -> Result<Vec<ClientRecord>> {
        self.clients
            .iter()
            .values()
            .map(|v| from_json(&v?))
            .collect()
    }

    fn reconcile(&self, mut state: FederationState) -> Result<(FederationState, Vec<String>)> {
        let mut problems = Vec::new();
        let open_round = match &state.phase {
            Phase::Training(o) => Some(o.round),
            _ => None,
        };
        let mut kept: BTreeMap<String, fedlora_protocol::UploadMeta> = BTreeMap::new();
        for rec in self.uploads()? {
            let open = Some(rec.round) == open_round;
            let valid = open && self.payloads.verify(rec.round, &rec.meta.digest)?;
            if open && !valid {
                problems.push(format!(
                    "upload of {} for round {} has no valid file; dropped",
                    rec.client, rec.round
                ));
            }
            if valid {
                kept.insert(rec.client.clone(), rec.meta.clone());
            } else {
                self.uploads.remove(key2(rec.round, &rec.client))?;
            }
        }
        let keep: BTreeSet<[u8; 32]> = kept.values().map(|m| m.digest).collect();
        if let Phase::Training(o) = &mut state.phase {
            o.uploads = kept;
        }
        // files without records, and leftovers of other rounds
        self.payloads.retain(open_round, &keep)?;
        self.save_state(&state)?;
        Ok((state, problems))
    }

    fn claim_token(&self, hash: &str, device_id: &str) -> Result<bool> {
        let swapped = self
            .tokens_used
            .compare_and_swap(hash, None as Option<&[u8]>, Some(device_id.as_bytes()))
            .map_err(storage)?;
        self.db.flush().map_err(storage)?;
        Ok(swapped.is_ok())
    }

    fn token_used(&self, hash: &str) -> Result<bool> {
        Ok(self.tokens_used.contains_key(hash)?)
    }

    fn put_device(&self, rec: &DeviceRecord) -> Result<()> {
        self.devices.insert(rec.device_id.as_bytes(), json(rec))?;
        self.db.flush().map_err(storage)?;
        Ok(())
    }

    fn device(&self, id: &str) -> Result<Option<DeviceRecord>> {
        self.devices
            .get(id.as_bytes())?
            .map(|b| from_json(&b))
            .transpose()
    }

    fn devices(&self) -> Result<Vec<DeviceRecord>> {
        self.devices.iter().map(|kv| from_json(&kv?.1)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, UploadRecord};
    use fedlora_protocol::UploadMeta;
    use fedlora_protocol::{OpenRound, TensorSpec};

    /// Stores client `a`'s upload (payload `[1; 4]`) in an open round 1; returns the state.
    fn put_upload_of_a(s: &Store) -> FederationState {
        let st = open_state(&[("a", 1)]);
        let Phase::Training(o) = &st.phase else {
            unreachable!()
        };
        let rec = UploadRecord {
            round: 1,
            client: "a".into(),
            meta: o.uploads["a"].clone(),
            wire_bytes: 20,
            accepted_ms: 5,
        };
        s.put_upload(&rec, &[1; 4]).unwrap();
        st
    }

    fn open_state(uploads: &[(&str, u8)]) -> FederationState {
        FederationState {
            global_version: 0,
            next_round: 2,
            failed_rounds: 0,
            phase: Phase::Training(OpenRound {
                round: 1,
                base_version: 0,
                selected: ["a", "b"].iter().map(|s| s.to_string()).collect(),
                deadline_ms: 10,
                closed: false,
                declined: Default::default(),
                sampling_rate: None,
                uploads: uploads
                    .iter()
                    .map(|(c, b)| {
                        (
                            c.to_string(),
                            UploadMeta {
                                digest: Sha256::digest([*b; 4]).into(),
                                weight: 1.0,
                                bytes: 4,
                                train_loss: Some(0.0),
                                rank: None,
                                base_round: None,
                            },
                        )
                    })
                    .collect(),
            }),
            contributed: Default::default(),
        }
    }

    #[test]
    fn upload_survives_reopen_and_orphans_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            let spec = AdapterSpec::new(vec![TensorSpec {
                name: "t".into(),
                shape: vec![1],
            }])
            .unwrap();
            s.initialize(
                &FederationConfig::default(),
                &spec,
                b"init",
                &open_state(&[]),
                0,
            )
            .unwrap();
            put_upload_of_a(&s);
            // an orphan file (crash between file write and record)
            s.write_upload_payload(1, &Sha256::digest([2u8; 4]).into(), &[2; 4])
                .unwrap();
            // a stale round's leftovers
            write_file_durably(&dir.path().join("uploads/r0/x.bin"), &[3; 4]).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let st = s.state().unwrap().unwrap();
        let (st, problems) = s.reconcile(st).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        let Phase::Training(o) = &st.phase else {
            panic!()
        };
        assert!(o.uploads.contains_key("a"));
        assert_eq!(
            s.upload_payload(1, &o.uploads["a"].digest).unwrap(),
            vec![1; 4]
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("uploads/r1"))
                .unwrap()
                .count(),
            1
        );
        assert!(!dir.path().join("uploads/r0").exists());
        assert_eq!(s.checkpoint(0).unwrap(), b"init");
    }

    #[test]
    fn record_without_file_is_reported_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let st = put_upload_of_a(&s);
        let a = format!("uploads/r1/{}.bin", hex::encode(Sha256::digest([1u8; 4])));
        std::fs::remove_file(dir.path().join(a)).unwrap();
        let (st, problems) = s.reconcile(st).unwrap();
        assert_eq!(problems.len(), 1);
        let Phase::Training(o) = &st.phase else {
            panic!()
        };
        assert!(o.uploads.is_empty());
        assert!(s.uploads().unwrap().is_empty());
    }
}
