//! Durable coordinator state: sled for small records and indexes, files for large payloads.
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
//! Large payloads are written to a temp file, fsynced and renamed; only then is the sled record
//! (which points to the file by digest) written and flushed, after the directory is fsynced.
//!
//! # Uploads: append-only records, group commit
//! An accepted upload is one O(1) record in `uploads` (client, round, digest, weight, rank);
//! the federation state is **not** rewritten with it. The open round's uploads are the records
//! of that round: on restart [`Store::reconcile`] rebuilds the state's upload list from them.
//! The coordinator commits uploads in groups ([`Store::record_uploads`]), in this order:
//! 1. each payload is written to `uploads/rROUND/DIGEST.bin` (temp file, fsync, rename) by the
//!    request that carried it, outside any lock; a name is its content's hash, so a refused
//!    re-send can never overwrite an accepted file, and two writers of one name write the same
//!    bytes;
//! 2. the committer takes a batch of such uploads, fsyncs their round directories (so every
//!    renamed file of the batch is durable), checks each against the round machine under the
//!    federation lock, inserts the batch's records and flushes sled **once**;
//! 3. only then are the uploads counted in memory, folded into the running sum and acknowledged.
//!
//! A crash (kill -9) at any point loses no acknowledged upload, and counts none twice:
//! before step 2's flush, no record of the batch is durable (or some are, through sled's own
//! background flush, and their files were fsynced before the records were inserted) and no
//! client was acknowledged: a client re-sends, and a record already durable answers
//! `AlreadyAccepted`. After the flush, every record of the batch is durable whether or not its
//! ack left. A file without a record is deleted on open; a record whose file is missing or does
//! not match its digest is reported and dropped (its client was never acknowledged, or the disk
//! lost a fsynced file). Records key on (round, client), so a client is counted once per round.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use fedlora_protocol::{AdapterSpec, FederationConfig, FederationState, Phase, UploadMeta};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::error::{CoordinatorError, Result};

/// One stored upload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UploadRecord {
    /// Round id.
    pub round: u64,
    /// Client id.
    pub client: String,
    /// What the state machine knows of it.
    pub meta: UploadMeta,
    /// Bytes of the upload frame as received on the wire.
    pub wire_bytes: u64,
    /// When it was accepted, Unix ms.
    pub accepted_ms: u64,
}

/// One stored global adapter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// Global version.
    pub version: u64,
    /// Round that produced it (0 for the initial adapter).
    pub round: u64,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// When it was written, Unix ms.
    pub created_ms: u64,
}

/// How a round ended (or that it is still open).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum RoundStatus {
    /// Collecting uploads.
    Open,
    /// Aggregated into a new global version.
    Committed {
        /// The version it produced.
        version: u64,
    },
    /// Ended without changing the global adapter.
    Failed {
        /// Why.
        reason: String,
    },
}

/// One round's record, for `status` and reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// Round id.
    pub round: u64,
    /// Version the participants trained from.
    pub base_version: u64,
    /// Where it stands.
    #[serde(flatten)]
    pub status: RoundStatus,
    /// Sampled participants.
    pub selected: Vec<String>,
    /// Clients whose uploads were aggregated.
    pub participants: Vec<String>,
    /// Participants that did not upload in time (and did not decline).
    pub stragglers: Vec<String>,
    /// Participants that declined the round, with their reason (a fixed list: budget, plan,
    /// policy, or the device's eligibility and deadline).
    #[serde(default)]
    pub declined: BTreeMap<String, fedlora_protocol::DeclineReason>,
    /// Upload frame bytes per client, as received on the wire.
    pub bytes_up: BTreeMap<String, u64>,
    /// Task frame bytes per client (global adapter sent), as sent on the wire.
    pub bytes_down: BTreeMap<String, u64>,
    /// Weighted mean of the training losses the aggregated uploads carried, nats/byte: `None`
    /// when they carried none (DP rounds send private uploads, secure rounds masked inputs).
    pub train_loss: Option<f64>,
    /// The aggregation strategy the round ran with (`fed-avg`, `fed-adam`, …).
    #[serde(default)]
    pub strategy: String,
    /// Started, Unix ms.
    pub started_ms: u64,
    /// Ended, Unix ms.
    pub ended_ms: Option<u64>,
    /// Async mode: the version's contributors by staleness, entry τ counting those τ buffers
    /// stale (between the round an update trained in and the one it was counted in); empty in
    /// sync mode.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub staleness: Vec<usize>,
}

/// One client's held-out evaluation of one version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Version evaluated.
    pub version: u64,
    /// Client id.
    pub client: String,
    /// Mean loss, nats/byte.
    pub loss: f64,
    /// Predicted bytes behind the mean.
    pub tokens: u64,
}

/// A client the coordinator has seen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientRecord {
    /// Client id (certificate common name).
    pub client: String,
    /// SHA-256 fingerprint of its certificate.
    pub fingerprint: String,
    /// First hello, Unix ms.
    pub first_seen_ms: u64,
    /// Latest hello, Unix ms.
    pub last_seen_ms: u64,
    /// The key an enrolled device (`device-…`) is bound to: its key at first hello, replaced
    /// only by a renewal this coordinator issued ([`crate::enroll::issuer::key_id`]).
    #[serde(default)]
    pub key_id: String,
}

/// A device enrolled with a token ([`crate::enroll`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The device id the coordinator assigned (its certificates' common name).
    pub device_id: String,
    /// SHA-256 (hex) of the public key of its latest certificate.
    pub key_id: String,
    /// The end of its latest certificate's validity, Unix seconds.
    pub not_after_unix_s: u64,
    /// Enrolled, Unix ms.
    pub enrolled_ms: u64,
    /// Certificates issued after the first (renewals).
    pub renewals: u32,
}

/// The enrolled devices and the tokens used, in the coordinator's sled (or the enrollment
/// service's own, when it runs as its own process).
#[derive(Clone)]
pub struct DeviceRegistry {
    db: sled::Db,
    devices: sled::Tree,
    tokens_used: sled::Tree,
}

impl DeviceRegistry {
    /// Marks the token with hash `hash` used by `device_id`, atomically and durably: `false`
    /// when it was used already (by anyone).
    pub fn claim_token(&self, hash: &str, device_id: &str) -> Result<bool> {
        let swapped = self
            .tokens_used
            .compare_and_swap(hash, None as Option<&[u8]>, Some(device_id.as_bytes()))
            .map_err(storage)?;
        self.db.flush().map_err(storage)?;
        Ok(swapped.is_ok())
    }

    /// Whether the token with hash `hash` was used.
    pub fn token_used(&self, hash: &str) -> Result<bool> {
        Ok(self.tokens_used.contains_key(hash)?)
    }

    /// Stores (replaces) a device's record; flushes.
    pub fn put_device(&self, rec: &DeviceRecord) -> Result<()> {
        self.devices.insert(rec.device_id.as_bytes(), json(rec))?;
        self.db.flush().map_err(storage)?;
        Ok(())
    }

    /// One device's record.
    pub fn device(&self, id: &str) -> Result<Option<DeviceRecord>> {
        self.devices
            .get(id.as_bytes())?
            .map(|b| from_json(&b))
            .transpose()
    }

    /// Every enrolled device, by id.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>> {
        self.devices.iter().map(|kv| from_json(&kv?.1)).collect()
    }
}

/// The coordinator's store.
pub struct Store {
    dir: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    uploads: sled::Tree,
    checkpoints: sled::Tree,
    rounds: sled::Tree,
    evals: sled::Tree,
    clients: sled::Tree,
}

fn storage(e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Storage(e.to_string())
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

fn from_json<T: for<'a> Deserialize<'a>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(storage)
}

fn key2(a: u64, b: &str) -> Vec<u8> {
    let mut k = a.to_be_bytes().to_vec();
    k.extend_from_slice(b.as_bytes());
    k
}

fn state_bytes(s: &FederationState) -> Vec<u8> {
    bincode::serde::encode_to_vec(s, bincode::config::standard()).expect("state encodes")
}

/// Writes `bytes` to `path` atomically and durably: temp file, fsync, rename, fsync directory.
pub fn write_file_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file_synced(path, bytes)?;
    let dir = path.parent().expect("file has a parent");
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Writes `bytes` to `path` atomically with its contents fsynced (temp file, fsync, rename);
/// the directory entry is durable once the caller fsyncs the directory.
fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = path.parent().expect("file has a parent");
    std::fs::create_dir_all(dir)?;
    // unique per writer: concurrent writers of one name each rename their own complete file
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("f"),
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

impl Store {
    /// Opens (or creates) the store under `dir`.
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
            db,
        })
    }

    /// Opens the store of an existing data directory, read and write, creating nothing: a
    /// directory without a coordinator's state is an error that names it.
    pub fn open_existing(dir: &Path) -> Result<Self> {
        if !dir.join("state").is_dir() {
            return Err(CoordinatorError::Config(format!(
                "{} holds no coordinator state (give the --data-dir a coordinator ran with)",
                dir.display()
            )));
        }
        Self::open(dir)
    }

    /// The enrolled devices and used tokens.
    pub fn registry(&self) -> Result<DeviceRegistry> {
        Ok(DeviceRegistry {
            devices: self.db.open_tree("devices")?,
            tokens_used: self.db.open_tree("enroll_tokens_used")?,
            db: self.db.clone(),
        })
    }

    /// Whether `e` says the store is held by a running coordinator (sled's lock).
    pub fn is_locked(e: &CoordinatorError) -> bool {
        matches!(e, CoordinatorError::Locked(_))
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn upload_path(&self, round: u64, digest: &[u8; 32]) -> PathBuf {
        // named by the content's hash: nothing a peer chooses names a file
        self.dir
            .join("uploads")
            .join(format!("r{round}"))
            .join(format!("{}.bin", hex::encode(digest)))
    }

    fn checkpoint_path(&self, version: u64) -> PathBuf {
        self.dir.join("checkpoints").join(format!("v{version}.bin"))
    }

    /// Flushes sled to disk.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    /// The stored federation state, if any.
    pub fn state(&self) -> Result<Option<FederationState>> {
        match self.meta.get("state")? {
            Some(b) => {
                let (s, _) = bincode::serde::decode_from_slice(&b, bincode::config::standard())
                    .map_err(storage)?;
                Ok(Some(s))
            }
            None => Ok(None),
        }
    }

    /// The stored config and spec, if the store was initialized.
    pub fn setup(&self) -> Result<Option<(FederationConfig, AdapterSpec)>> {
        match (self.meta.get("config")?, self.meta.get("spec")?) {
            (Some(c), Some(s)) => Ok(Some((from_json(&c)?, from_json(&s)?))),
            _ => Ok(None),
        }
    }

    /// Stores the config, spec, initial checkpoint (version 0) and initial state; flushes.
    pub fn initialize(
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

    /// Stores the federation state and flushes.
    pub fn save_state(&self, state: &FederationState) -> Result<()> {
        self.meta.insert("state", state_bytes(state))?;
        self.flush()
    }

    /// Writes an upload's payload to its content-addressed file (temp file, fsync, rename),
    /// unless a file of that digest is there already (written and fsynced before its rename).
    /// The directory entry is made durable by [`Store::record_uploads`].
    pub fn write_upload_payload(&self, round: u64, digest: &[u8; 32], bytes: &[u8]) -> Result<()> {
        let path = self.upload_path(round, digest);
        if path.exists() {
            return Ok(());
        }
        write_file_synced(&path, bytes)
    }

    /// Makes a batch of accepted uploads durable: fsyncs the round directories their payload
    /// files were renamed into, inserts every record and flushes sled once. Only after this
    /// returns may any of them be acknowledged.
    pub fn record_uploads(&self, records: &[UploadRecord]) -> Result<()> {
        let rounds: std::collections::BTreeSet<u64> = records.iter().map(|r| r.round).collect();
        let up = self.dir.join("uploads");
        for r in &rounds {
            std::fs::File::open(up.join(format!("r{r}")))?.sync_all()?;
        }
        if !rounds.is_empty() {
            std::fs::File::open(&up)?.sync_all()?;
        }
        let mut batch = sled::Batch::default();
        for r in records {
            batch.insert(key2(r.round, &r.client), json(r));
        }
        self.uploads.apply_batch(batch)?;
        self.flush()
    }

    /// Stores one accepted upload durably ([`Store::write_upload_payload`], then
    /// [`Store::record_uploads`]).
    pub fn put_upload(&self, record: &UploadRecord, payload: &[u8]) -> Result<()> {
        self.write_upload_payload(record.round, &record.meta.digest, payload)?;
        self.record_uploads(std::slice::from_ref(record))
    }

    /// The payload of a stored upload, checked against its digest.
    pub fn upload_payload(&self, round: u64, digest: &[u8; 32]) -> Result<Vec<u8>> {
        let p = self.upload_path(round, digest);
        let bytes =
            std::fs::read(&p).map_err(|e| storage(format!("upload {}: {e}", p.display())))?;
        if Sha256::digest(&bytes).as_slice() != digest {
            return Err(storage(format!(
                "upload {} does not match its digest",
                p.display()
            )));
        }
        Ok(bytes)
    }

    /// The upload records of `round`, by client.
    pub fn round_uploads(&self, round: u64) -> Result<Vec<UploadRecord>> {
        self.uploads
            .scan_prefix(round.to_be_bytes())
            .values()
            .map(|v| from_json(&v?))
            .collect()
    }

    /// Every upload record, in (round, client) order.
    pub fn uploads(&self) -> Result<Vec<UploadRecord>> {
        self.uploads
            .iter()
            .values()
            .map(|v| from_json(&v?))
            .collect()
    }

    /// Writes a checkpoint file and its record (not flushed; see [`commit_round`]).
    ///
    /// [`commit_round`]: Store::commit_round
    fn put_checkpoint(&self, version: u64, round: u64, bytes: &[u8], now_ms: u64) -> Result<()> {
        write_file_durably(&self.checkpoint_path(version), bytes)?;
        let rec = CheckpointRecord {
            version,
            round,
            sha256: hex::encode(Sha256::digest(bytes)),
            created_ms: now_ms,
        };
        self.checkpoints.insert(version.to_be_bytes(), json(&rec))?;
        Ok(())
    }

    /// Writes the new global checkpoint file, then in one transaction its record, the round's
    /// record and the state that commits it; flushes; then deletes the round's upload files.
    pub fn commit_round(
        &self,
        version: u64,
        global: &[u8],
        round: &RoundRecord,
        state: &FederationState,
        now_ms: u64,
    ) -> Result<()> {
        write_file_durably(&self.checkpoint_path(version), global)?;
        crate::faults::crash_point("round-commit");
        let ck = json(&CheckpointRecord {
            version,
            round: round.round,
            sha256: hex::encode(Sha256::digest(global)),
            created_ms: now_ms,
        });
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

    fn optimizer_path(&self, version: u64) -> PathBuf {
        self.dir
            .join("checkpoints")
            .join(format!("v{version}.optimizer.bin"))
    }

    /// Stores the server optimizer's moments that go with global `version` (a file beside its
    /// checkpoint, written durably **before** the round commits, so a restart at `version`
    /// continues from exactly these moments).
    pub fn put_optimizer_state(
        &self,
        version: u64,
        state: &fedlora_protocol::strategy::OptimizerState,
    ) -> Result<()> {
        let bytes =
            bincode::serde::encode_to_vec(state, bincode::config::standard()).map_err(storage)?;
        write_file_durably(&self.optimizer_path(version), &bytes)
    }

    /// The server optimizer's moments of global `version` (`None`: none were stored, as for
    /// FedAvg or version 0).
    pub fn optimizer_state(
        &self,
        version: u64,
    ) -> Result<Option<fedlora_protocol::strategy::OptimizerState>> {
        let path = self.optimizer_path(version);
        if !path.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(&path)?;
        let (s, _) = bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
            .map_err(|e| storage(format!("{}: {e}", path.display())))?;
        Ok(Some(s))
    }

    /// Stores a round record and the state together (round opened or failed); flushes. A failed
    /// round's uploads are deleted.
    pub fn put_round(&self, round: &RoundRecord, state: &FederationState) -> Result<()> {
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

    /// Updates a round record without touching the state (metrics such as bytes sent).
    pub fn update_round(&self, round: &RoundRecord) -> Result<()> {
        self.rounds.insert(round.round.to_be_bytes(), json(round))?;
        Ok(())
    }

    /// Deletes an ended round's upload records and files. Best effort, after the round's
    /// outcome is durable: a failure is logged and never undoes that outcome (a late upload
    /// may be writing into the directory; whatever is left is deleted at the next open).
    fn drop_round_uploads(&self, round: u64) {
        let cleanup = || -> Result<()> {
            let prefix = round.to_be_bytes();
            for k in self.uploads.scan_prefix(prefix).keys() {
                self.uploads.remove(k?)?;
            }
            self.flush()?;
            let d = self.dir.join("uploads").join(format!("r{round}"));
            if d.exists() {
                std::fs::remove_dir_all(d)?;
            }
            Ok(())
        };
        if let Err(e) = cleanup() {
            tracing::warn!(round, error = %e, "could not delete an ended round's uploads yet");
        }
    }

    /// A global checkpoint's bytes, checked against its record.
    pub fn checkpoint(&self, version: u64) -> Result<Vec<u8>> {
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

    /// Every checkpoint record.
    pub fn checkpoints(&self) -> Result<Vec<CheckpointRecord>> {
        self.checkpoints
            .iter()
            .values()
            .map(|v| from_json(&v?))
            .collect()
    }

    /// A round's record.
    pub fn round(&self, round: u64) -> Result<Option<RoundRecord>> {
        self.rounds
            .get(round.to_be_bytes())?
            .map(|v| from_json(&v))
            .transpose()
    }

    /// Every round record, by round id.
    pub fn rounds(&self) -> Result<Vec<RoundRecord>> {
        self.rounds
            .iter()
            .values()
            .map(|v| from_json(&v?))
            .collect()
    }

    /// Makes a group of uploads and evaluation reports durable with one flush ([`Store::record_uploads`]
    /// for the uploads, whose files must be written already).
    pub fn record_batch(&self, uploads: &[UploadRecord], evals: &[EvalRecord]) -> Result<()> {
        if !evals.is_empty() {
            let mut batch = sled::Batch::default();
            for e in evals {
                batch.insert(key2(e.version, &e.client), json(e));
            }
            self.evals.apply_batch(batch)?;
        }
        self.record_uploads(uploads)
    }

    /// Stores an evaluation report; flushes.
    pub fn put_eval(&self, rec: &EvalRecord) -> Result<()> {
        self.evals
            .insert(key2(rec.version, &rec.client), json(rec))?;
        self.flush()
    }

    /// Every evaluation report.
    pub fn evals(&self) -> Result<Vec<EvalRecord>> {
        self.evals.iter().values().map(|v| from_json(&v?)).collect()
    }

    /// Records a hello from `client` (not flushed: losing it loses only a timestamp).
    pub fn saw_client(
        &self,
        client: &str,
        fingerprint: &str,
        key_id: &str,
        now_ms: u64,
    ) -> Result<()> {
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

    /// One client's record.
    pub fn client(&self, client: &str) -> Result<Option<ClientRecord>> {
        self.clients.get(client)?.map(|b| from_json(&b)).transpose()
    }

    /// Every client seen.
    pub fn clients(&self) -> Result<Vec<ClientRecord>> {
        self.clients
            .iter()
            .values()
            .map(|v| from_json(&v?))
            .collect()
    }

    /// Reconciles files with records after a restart. The open round's uploads are its
    /// records (the state is not rewritten per upload): the state's list is rebuilt from the
    /// records whose file is there and matches its digest. A record of the open round whose
    /// file is missing or corrupt is reported and dropped (its client uploads again). Records
    /// and files of rounds that are not open, and files no record names, are deleted. Returns
    /// the corrected state (stored) and the problems.
    pub fn reconcile(&self, mut state: FederationState) -> Result<(FederationState, Vec<String>)> {
        let mut problems = Vec::new();
        let open_round = match &state.phase {
            Phase::Training(o) => Some(o.round),
            _ => None,
        };
        let mut kept: BTreeMap<String, fedlora_protocol::UploadMeta> = BTreeMap::new();
        for rec in self.uploads()? {
            let open = Some(rec.round) == open_round;
            let valid = open && self.upload_payload(rec.round, &rec.meta.digest).is_ok();
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
        if let Phase::Training(o) = &mut state.phase {
            o.uploads = kept;
        }
        // files without records, and leftovers of other rounds
        let up = self.dir.join("uploads");
        if up.exists() {
            let named: std::collections::BTreeSet<String> = match &state.phase {
                Phase::Training(o) => o
                    .uploads
                    .values()
                    .map(|m| format!("{}.bin", hex::encode(m.digest)))
                    .collect(),
                _ => Default::default(),
            };
            for d in std::fs::read_dir(&up)? {
                let d = d?;
                let name = d.file_name().to_string_lossy().to_string();
                let round = name.strip_prefix('r').and_then(|r| r.parse::<u64>().ok());
                if round.is_none() || round != open_round {
                    std::fs::remove_dir_all(d.path())?;
                    continue;
                }
                for f in std::fs::read_dir(d.path())? {
                    let f = f?;
                    if !named.contains(f.file_name().to_string_lossy().as_ref()) {
                        std::fs::remove_file(f.path())?;
                    }
                }
            }
        }
        self.save_state(&state)?;
        Ok((state, problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
