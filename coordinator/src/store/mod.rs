//! Durable coordinator state behind one interface, [`StateStore`], with two implementations
//! that pass the same conformance suite (`store::conformance`, run against both):
//! - [`sled`](self::sled) — embedded, the default: one data directory, no server;
//! - [`postgres`](self::postgres) — a PostgreSQL database (`--store postgres://…`), so that the
//!   state outlives one machine's disk and several front-ends can share it.
//!
//! Upload payloads sit behind their own small interface, [`payloads::PayloadStore`] (files in
//! the data directory for sled, a table for PostgreSQL), so that object storage can follow.
//!
//! # The contract every implementation keeps
//! - **Persist before ack.** [`StateStore::record_batch`] returns only when every record of the
//!   batch, and the payload each names (written before by
//!   [`StateStore::write_upload_payload`]), is durable: after a crash at any later point they are
//!   there. The coordinator acknowledges an upload only after that return.
//! - **Content-addressed payloads.** A payload is named by (round, SHA-256 of its bytes); a
//!   second write of a name is a no-op, so a refused re-send can never overwrite an accepted
//!   payload, and reads are checked against the digest.
//! - **Atomic round outcomes.** [`StateStore::commit_round`] makes the checkpoint, the round's
//!   record and the federation state durable together (all or none);
//!   [`StateStore::put_round`] the round record and the state together.
//! - **O(1) per upload.** Recording an upload writes one record; the federation state is not
//!   rewritten with it. [`StateStore::reconcile`] rebuilds the open round's upload list from
//!   the records after a restart.
//! - **Upload records key on (round, client)**: a client is counted at most once per round.

mod codec;
pub mod payloads;
pub mod postgres;
mod records;
pub mod scratch;
pub mod sled;

#[cfg(test)]
mod conformance;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedlora_protocol::strategy::OptimizerState;
use fedlora_protocol::{AdapterSpec, FederationConfig, FederationState};

pub use codec::write_file_durably;
pub(crate) use codec::{state_from_bytes, storage};
pub use records::*;

use crate::error::{CoordinatorError, Result};

/// Where the coordinator's state lives (its `Debug` and `Display` never show a password).
#[derive(Clone, Default, PartialEq, Eq)]
pub enum StoreLocation {
    /// sled in the data directory (`DATA_DIR/state`, payloads in `DATA_DIR/uploads`).
    #[default]
    Embedded,
    /// A PostgreSQL database, by its connection URL (`postgres://user@host:port/db`, with
    /// libpq's parameters; `?options=-csearch_path%3DNAME` keeps one federation per schema).
    Postgres(String),
}

impl std::str::FromStr for StoreLocation {
    type Err = CoordinatorError;
    fn from_str(s: &str) -> Result<Self> {
        if s == "sled" || s == "embedded" {
            Ok(Self::Embedded)
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(Self::Postgres(s.to_string()))
        } else {
            Err(CoordinatorError::Config(format!(
                "store {}: give `sled` (the default, in the data directory) or a \
                 postgres://user@host:port/database URL",
                postgres::redacted(s)
            )))
        }
    }
}

impl std::fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreLocation({self})")
    }
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Embedded => f.write_str("sled"),
            // never the password
            Self::Postgres(url) => f.write_str(&postgres::redacted(url)),
        }
    }
}

/// The coordinator's durable state. Every method blocks (call it from a blocking task);
/// every write method returns only when what it wrote is durable, unless its doc says not.
pub trait StateStore: Send + Sync {
    /// Where this store keeps its state, for logs (no secrets).
    fn describe(&self) -> String;

    /// Makes every write so far durable.
    fn flush(&self) -> Result<()>;

    /// The stored federation state, if any.
    fn state(&self) -> Result<Option<FederationState>>;

    /// The stored config and spec, if the store was initialized.
    fn setup(&self) -> Result<Option<(FederationConfig, AdapterSpec)>>;

    /// Stores the config, spec, initial checkpoint (version 0) and initial state, durably.
    fn initialize(
        &self,
        config: &FederationConfig,
        spec: &AdapterSpec,
        initial: &[u8],
        state: &FederationState,
        now_ms: u64,
    ) -> Result<()>;

    /// Stores the federation state, durably.
    fn save_state(&self, state: &FederationState) -> Result<()>;

    /// Writes an upload's payload under (round, digest), unless one of that name is there
    /// already. Durable once a later [`StateStore::record_batch`] returns.
    fn write_upload_payload(&self, round: u64, digest: &[u8; 32], bytes: &[u8]) -> Result<()>;

    /// Makes a group of accepted uploads (whose payloads were written) and evaluation reports
    /// durable, with one flush. Only after this returns may any of them be acknowledged.
    fn record_batch(&self, uploads: &[UploadRecord], evals: &[EvalRecord]) -> Result<()>;

    /// The payload of a stored upload, checked against its digest.
    fn upload_payload(&self, round: u64, digest: &[u8; 32]) -> Result<Vec<u8>>;

    /// The upload records of `round`, by client.
    fn round_uploads(&self, round: u64) -> Result<Vec<UploadRecord>>;

    /// Every upload record, in (round, client) order.
    fn uploads(&self) -> Result<Vec<UploadRecord>>;

    /// Commits a round: the new global checkpoint, its record, the round's record and the
    /// state, all durable together; then the round's uploads are deleted (best effort: a
    /// failure is logged, and whatever is left goes at the next [`StateStore::reconcile`]).
    fn commit_round(
        &self,
        version: u64,
        global: &[u8],
        round: &RoundRecord,
        state: &FederationState,
        now_ms: u64,
    ) -> Result<()>;

    /// Stores the server optimizer's moments that go with global `version`, durably, before
    /// the round that makes `version` commits.
    fn put_optimizer_state(&self, version: u64, state: &OptimizerState) -> Result<()>;

    /// The server optimizer's moments of global `version` (`None`: none were stored, as for
    /// FedAvg or version 0).
    fn optimizer_state(&self, version: u64) -> Result<Option<OptimizerState>>;

    /// Stores a round record and the state together (round opened or failed), durably. A
    /// failed round's uploads are deleted.
    fn put_round(&self, round: &RoundRecord, state: &FederationState) -> Result<()>;

    /// Updates a round record without touching the state (metrics such as bytes sent); not
    /// necessarily durable before the next flush.
    fn update_round(&self, round: &RoundRecord) -> Result<()>;

    /// A global checkpoint's bytes, checked against its record.
    fn checkpoint(&self, version: u64) -> Result<Vec<u8>>;

    /// Every checkpoint record, by version.
    fn checkpoints(&self) -> Result<Vec<CheckpointRecord>>;

    /// A round's record.
    fn round(&self, round: u64) -> Result<Option<RoundRecord>>;

    /// Every round record, by round id.
    fn rounds(&self) -> Result<Vec<RoundRecord>>;

    /// Stores an evaluation report, durably.
    fn put_eval(&self, rec: &EvalRecord) -> Result<()>;

    /// Every evaluation report, in (version, client) order.
    fn evals(&self) -> Result<Vec<EvalRecord>>;

    /// Records a hello from `client` (not necessarily durable: losing it loses a timestamp, or
    /// a first key binding, never an acknowledged upload).
    fn saw_client(&self, client: &str, fingerprint: &str, key_id: &str, now_ms: u64) -> Result<()>;

    /// One client's record.
    fn client(&self, client: &str) -> Result<Option<ClientRecord>>;

    /// Every client seen, by id.
    fn clients(&self) -> Result<Vec<ClientRecord>>;

    /// Reconciles payloads with records after a restart. The open round's upload list is
    /// rebuilt from its records whose payload is there and matches its digest; a record of the
    /// open round without a valid payload is reported and dropped (its client uploads again).
    /// Records and payloads of rounds that are not open, and payloads no record names, are
    /// deleted. Returns the corrected state (stored) and the problems.
    fn reconcile(&self, state: FederationState) -> Result<(FederationState, Vec<String>)>;

    /// Marks the enrollment token with hash `hash` used by `device_id`, atomically and
    /// durably: `false` when it was used already (by anyone).
    fn claim_token(&self, hash: &str, device_id: &str) -> Result<bool>;

    /// Whether the token with hash `hash` was used.
    fn token_used(&self, hash: &str) -> Result<bool>;

    /// Stores (replaces) an enrolled device's record, durably.
    fn put_device(&self, rec: &DeviceRecord) -> Result<()>;

    /// One enrolled device's record.
    fn device(&self, id: &str) -> Result<Option<DeviceRecord>>;

    /// Every enrolled device, by id.
    fn devices(&self) -> Result<Vec<DeviceRecord>>;

    /// Tries to take the lease on driving this federation's rounds, held while this store is
    /// open: `false` when another process holds it. The embedded store holds its directory's
    /// file lock from the moment it opens, so it always leads once open.
    fn try_lead(&self) -> Result<bool> {
        Ok(true)
    }

    /// Waits until the lease on driving the rounds is free, and takes it (blocks). The
    /// embedded store leads from the moment it opens.
    fn wait_lead(&self) -> Result<()> {
        Ok(())
    }

    /// Whether the store is still reachable. A PostgreSQL store whose connection ended has
    /// lost the lease with it: its process must stop driving.
    fn healthy(&self) -> bool {
        true
    }

    /// The front-ends serving the federation, as last heard from (PostgreSQL; the embedded
    /// store has one process and lists none).
    fn frontends(&self) -> Result<Vec<FrontendRecord>> {
        Ok(Vec::new())
    }

    /// The schema a PostgreSQL store keeps the federation in (`None`: embedded).
    fn schema(&self) -> Option<String> {
        None
    }

    /// Makes a batch of accepted uploads durable ([`StateStore::record_batch`] without evals).
    fn record_uploads(&self, records: &[UploadRecord]) -> Result<()> {
        self.record_batch(records, &[])
    }

    /// Stores one accepted upload durably ([`StateStore::write_upload_payload`], then
    /// [`StateStore::record_uploads`]).
    fn put_upload(&self, record: &UploadRecord, payload: &[u8]) -> Result<()> {
        self.write_upload_payload(record.round, &record.meta.digest, payload)?;
        self.record_uploads(std::slice::from_ref(record))
    }
}

/// A handle on the coordinator's store (cheap to clone): the [`StateStore`] plus the data
/// directory, which holds what stays local to one process whatever the store (certificates,
/// partial uploads, the status snapshot).
#[derive(Clone)]
pub struct Store {
    dir: PathBuf,
    inner: Arc<dyn StateStore>,
}

impl std::ops::Deref for Store {
    type Target = dyn StateStore;
    fn deref(&self) -> &Self::Target {
        &*self.inner
    }
}

impl Store {
    /// Opens (or creates) the embedded sled store under `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_at(dir, &StoreLocation::Embedded)
    }

    /// Opens (or creates) the store at `location`, with `dir` as the local data directory.
    pub fn open_at(dir: &Path, location: &StoreLocation) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let inner: Arc<dyn StateStore> = match location {
            StoreLocation::Embedded => Arc::new(sled::SledStore::open(dir)?),
            StoreLocation::Postgres(url) => Arc::new(postgres::PgStore::connect(url)?),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            inner,
        })
    }

    /// Opens the store of an existing federation, read and write, creating nothing: a data
    /// directory (or database) without a coordinator's state is an error that names it.
    pub fn open_existing(dir: &Path) -> Result<Self> {
        Self::open_existing_at(dir, &StoreLocation::Embedded)
    }

    /// [`Store::open_existing`] at `location`.
    pub fn open_existing_at(dir: &Path, location: &StoreLocation) -> Result<Self> {
        match location {
            StoreLocation::Embedded => {
                if !dir.join("state").is_dir() {
                    return Err(CoordinatorError::Config(format!(
                        "{} holds no coordinator state (give the --data-dir a coordinator ran with)",
                        dir.display()
                    )));
                }
                Self::open(dir)
            }
            StoreLocation::Postgres(url) => {
                let pg = postgres::PgStore::connect(url)?;
                if pg.setup()?.is_none() {
                    return Err(CoordinatorError::Config(format!(
                        "{} holds no coordinator state (give the --store a coordinator ran with)",
                        postgres::redacted(url)
                    )));
                }
                Ok(Self {
                    dir: dir.to_path_buf(),
                    inner: Arc::new(pg),
                })
            }
        }
    }

    /// The enrolled devices and used tokens.
    pub fn registry(&self) -> Result<DeviceRegistry> {
        Ok(DeviceRegistry(self.inner.clone()))
    }

    /// Whether `e` says the store is held by a running coordinator (sled's lock).
    pub fn is_locked(e: &CoordinatorError) -> bool {
        matches!(e, CoordinatorError::Locked(_))
    }

    /// The local data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The enrolled devices and the tokens used, in the coordinator's store (or the enrollment
/// service's own, when it runs as its own process).
#[derive(Clone)]
pub struct DeviceRegistry(Arc<dyn StateStore>);

impl DeviceRegistry {
    /// Marks the token with hash `hash` used by `device_id`, atomically and durably: `false`
    /// when it was used already (by anyone).
    pub fn claim_token(&self, hash: &str, device_id: &str) -> Result<bool> {
        self.0.claim_token(hash, device_id)
    }

    /// Whether the token with hash `hash` was used.
    pub fn token_used(&self, hash: &str) -> Result<bool> {
        self.0.token_used(hash)
    }

    /// Stores (replaces) a device's record, durably.
    pub fn put_device(&self, rec: &DeviceRecord) -> Result<()> {
        self.0.put_device(rec)
    }

    /// One device's record.
    pub fn device(&self, id: &str) -> Result<Option<DeviceRecord>> {
        self.0.device(id)
    }

    /// Every enrolled device, by id.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>> {
        self.0.devices()
    }
}
