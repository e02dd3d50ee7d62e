//! The PostgreSQL store (`--store postgres://user@host:port/database`): the coordinator's
//! state in a database, so that it outlives one machine's disk (a managed PostgreSQL with a
//! replica gives it high availability) and several front-ends can share it.
//!
//! # Layout
//! Versioned migrations in `coordinator/migrations/` (applied at connect, under an advisory
//! lock, recorded in `fedlora_migrations`): one table per sled tree of the embedded store
//! (`fedlora_meta`, `fedlora_uploads`, `fedlora_checkpoints`, `fedlora_rounds`, `fedlora_evals`,
//! `fedlora_clients`, `fedlora_devices`, `fedlora_tokens_used`), records as the same JSON text,
//! plus `fedlora_payloads` (upload payloads, by round and SHA-256) and `fedlora_optimizer`.
//! One federation per database, or per schema with `?options=-csearch_path%3DNAME` in the URL
//! (the schema must exist).
//!
//! # Durability
//! Every write that the [`StateStore`] contract says is durable commits with PostgreSQL's
//! default `synchronous_commit = on`: the commit returns after its WAL is flushed. Two writes
//! commit asynchronously (`SET LOCAL synchronous_commit TO off`), and why that is safe:
//! - an upload's payload ([`StateStore::write_upload_payload`]): the upload is acknowledged only
//!   after its record's batch commits synchronously, and PostgreSQL flushes its WAL in order, so
//!   that commit makes every earlier commit of the cluster durable too, the payload's included;
//! - a client's hello and a round's metrics ([`StateStore::saw_client`],
//!   [`StateStore::update_round`]), which the contract does not require to be durable.
//!
//! A round's outcome, its record, the state and the deletion of its uploads are one transaction.
//!
//! # Connection
//! One connection per store, on its own thread (a current-thread tokio runtime runs
//! tokio-postgres's connection task); calls block on the client's futures with `pollster`, so
//! the store can be called from any thread, in or out of the coordinator's runtime, as sled
//! can. Calls are serialized by a mutex (a transaction needs the connection to itself). A lost
//! connection fails every later call with a storage error; the coordinator stops, and a
//! restart reconnects.

use std::collections::BTreeSet;
use std::sync::Mutex;

use fedlora_protocol::strategy::OptimizerState;
use fedlora_protocol::{AdapterSpec, FederationConfig, FederationState, Phase, UploadMeta};
use sha2::{Digest, Sha256};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

use super::codec::{
    checkpoint_record, from_json, json, optimizer_bytes, optimizer_from_bytes, state_bytes,
    state_from_bytes, storage,
};
use super::payloads::PayloadStore;
use super::{
    CheckpointRecord, ClientRecord, DeviceRecord, EvalRecord, RoundRecord, RoundStatus, StateStore,
    UploadRecord,
};
use crate::error::{CoordinatorError, Result};

/// The schema migrations, in order: (version, SQL).
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../migrations/0001_initial.sql")),
    (2, include_str!("../../migrations/0002_relay.sql")),
];

/// The advisory-lock key under which migrations run (any constant; "fedlora-migrations").
const MIGRATION_LOCK: i64 = 0x6665_646c_6d69_6772;

/// The advisory-lock key of the lease on driving one federation's rounds: from its schema's
/// name (advisory locks are database-wide, and a database may hold one federation per schema).
fn lead_lock(schema: &str) -> i64 {
    let d = Sha256::digest(format!("fedlora-lead:{schema}"));
    i64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// A name derived from the federation's schema, safe as a PostgreSQL channel name: `prefix`
/// and 16 hex digits.
pub fn schema_tag(prefix: &str, schema: &str) -> String {
    let d = Sha256::digest(format!("fedlora-channel:{schema}"));
    format!("{prefix}_{}", hex::encode(&d[..8]))
}

/// Connection settings every store and relay connection uses: TCP keepalives on both ends, so
/// a lease held by a host that died is released within about a minute, not the kernel's two
/// hours.
pub(crate) fn tuned(mut config: tokio_postgres::Config) -> tokio_postgres::Config {
    config
        .keepalives(true)
        .keepalives_idle(std::time::Duration::from_secs(10))
        .keepalives_interval(std::time::Duration::from_secs(5))
        .keepalives_retries(3);
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    // the server's side of the keepalives (it is the server that must notice a dead holder)
    let opts = config.get_options().unwrap_or("").to_string();
    config.options(format!(
        "{opts} -c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3"
    ));
    config
}

/// `url` with any password replaced by `***`, for logs and errors.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(an unparsable URL)".to_string();
    };
    // the user information runs to the first `@` (as the driver reads it), whatever it holds
    let (authority, tail) = match rest.split_once('@') {
        Some((user, after)) => {
            let user = match user.split_once(':') {
                Some((name, _)) => format!("{name}:***"),
                None => user.to_string(),
            };
            let (host, tail) = match after.find(['/', '?']) {
                Some(i) => after.split_at(i),
                None => (after, ""),
            };
            (format!("{user}@{host}"), tail)
        }
        None => match rest.find(['/', '?']) {
            Some(i) => {
                let (a, t) = rest.split_at(i);
                (a.to_string(), t)
            }
            None => (rest.to_string(), ""),
        },
    };
    // libpq's `password=` parameter in the query string too
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some(("password", _)) => "password=***".to_string(),
                    _ => kv.to_string(),
                })
                .collect::<Vec<_>>()
                .join("&");
            format!("{path}?{query}")
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// A record as JSON text (the `record` columns).
fn json_text<T: serde::Serialize>(v: &T) -> Result<String> {
    String::from_utf8(json(v)).map_err(storage)
}

pub(crate) fn pg(e: tokio_postgres::Error) -> CoordinatorError {
    // the server's own message (e.g. "relation … does not exist"), not only "db error"
    match e.as_db_error() {
        Some(db) => storage(format!("postgres: {}: {}", db.code().code(), db.message())),
        None => storage(format!("postgres: {e}")),
    }
}

fn id(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A notification on a connection: (channel, payload).
pub type Note = (String, String);

/// Connects to `config` on a thread of its own, whose current-thread runtime drives the
/// connection until the client is dropped or the server goes away; then `alive` turns false.
/// `deliver` receives the client (or why there is none); notifications go to `notes` (if
/// given).
pub(crate) fn connect_on_thread(
    config: tokio_postgres::Config,
    name: &str,
    notes: Option<tokio::sync::mpsc::UnboundedSender<Note>>,
    alive: std::sync::Arc<std::sync::atomic::AtomicBool>,
    deliver: impl FnOnce(Result<Client>) + Send + 'static,
) -> Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    deliver(Err(storage(e)));
                    return;
                }
            };
            rt.block_on(async move {
                let (client, mut conn) = match config.connect(NoTls).await {
                    Ok(c) => c,
                    Err(e) => {
                        deliver(Err(pg(e)));
                        return;
                    }
                };
                deliver(Ok(client));
                loop {
                    match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                        Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                            if let Some(tx) = &notes {
                                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            tracing::error!(error = %e, "a PostgreSQL connection failed");
                            break;
                        }
                        None => break,
                    }
                }
                alive.store(false, std::sync::atomic::Ordering::SeqCst);
            });
        })?;
    Ok(())
}

/// The PostgreSQL store.
pub struct PgStore {
    client: Mutex<Client>,
    desc: String,
    /// The federation's schema (the first on the search path).
    schema: String,
    /// Whether the connection is up (false once it ended: the lease with it).
    alive: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl PgStore {
    /// Connects to the database at `url` and brings its schema up to date.
    pub fn connect(url: &str) -> Result<Self> {
        let desc = format!("postgres at {}", redacted(url));
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| CoordinatorError::Config(format!("{}: {e}", redacted(url))))?;
        let config = tuned(config);
        let alive = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        connect_on_thread(config, "fedlora-postgres", None, alive.clone(), move |c| {
            let _ = tx.send(c);
        })?;
        let client = rx
            .recv()
            .map_err(|_| storage("the PostgreSQL connection thread ended"))?
            .map_err(|e| storage(format!("{desc}: {e}")))?;
        let mut store = Self {
            client: Mutex::new(client),
            desc,
            schema: String::new(),
            alive,
        };
        store.schema = store
            .rows("SELECT current_schema()", &[])?
            .first()
            .and_then(|r| r.get::<_, Option<String>>(0))
            .ok_or_else(|| {
                storage(format!(
                    "{}: no schema to keep the federation in (does the search path's schema exist?)",
                    store.desc
                ))
            })?;
        store.migrate()?;
        Ok(store)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Client) -> Result<T>) -> Result<T> {
        let mut c = self
            .client
            .lock()
            .map_err(|_| storage("the PostgreSQL store's connection lock is poisoned"))?;
        f(&mut c)
    }

    fn migrate(&self) -> Result<()> {
        self.with(|c| {
            let tx = pollster::block_on(c.transaction()).map_err(pg)?;
            pollster::block_on(tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]))
                .map_err(pg)?;
            // (not CREATE … IF NOT EXISTS: its notice would be logged at every start)
            let exists = pollster::block_on(
                tx.query_one("SELECT to_regclass('fedlora_migrations') IS NOT NULL", &[]),
            )
            .map_err(pg)?;
            if !exists.get::<_, bool>(0) {
                pollster::block_on(tx.batch_execute(
                    "CREATE TABLE fedlora_migrations \
                     (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
                ))
                .map_err(pg)?;
            }
            let row = pollster::block_on(tx.query_one(
                "SELECT coalesce(max(version), 0) FROM fedlora_migrations",
                &[],
            ))
            .map_err(pg)?;
            let have: i32 = row.get(0);
            for (v, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > have) {
                pollster::block_on(tx.batch_execute(sql)).map_err(pg)?;
                pollster::block_on(
                    tx.execute("INSERT INTO fedlora_migrations (version) VALUES ($1)", &[v]),
                )
                .map_err(pg)?;
            }
            let newest = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
            if have > newest {
                return Err(storage(format!(
                    "the database's schema is version {have}, newer than this build's \
                     {newest}: run a newer fedlora"
                )));
            }
            pollster::block_on(tx.commit()).map_err(pg)
        })
    }

    fn exec(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        self.with(|c| pollster::block_on(c.execute(sql, params)).map_err(pg))
    }

    fn rows(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<tokio_postgres::Row>> {
        self.with(|c| pollster::block_on(c.query(sql, params)).map_err(pg))
    }

    /// The JSON records in column 0 of `sql`'s rows.
    fn records<T: for<'a> serde::Deserialize<'a>>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<T>> {
        self.rows(sql, params)?
            .iter()
            .map(|r| from_json(r.get::<_, &str>(0).as_bytes()))
            .collect()
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .rows("SELECT value FROM fedlora_meta WHERE key = $1", &[&key])?
            .first()
            .map(|r| r.get(0)))
    }

    /// Runs `f` in one transaction (committed synchronously unless `durable` is false).
    fn transaction<T>(
        &self,
        durable: bool,
        f: impl FnOnce(&tokio_postgres::Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        self.with(|c| {
            let tx = pollster::block_on(c.transaction()).map_err(pg)?;
            if !durable {
                pollster::block_on(tx.batch_execute("SET LOCAL synchronous_commit TO off"))
                    .map_err(pg)?;
            }
            let out = f(&tx)?;
            pollster::block_on(tx.commit()).map_err(pg)?;
            Ok(out)
        })
    }
}

fn exec_in(
    tx: &tokio_postgres::Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64> {
    pollster::block_on(tx.execute(sql, params)).map_err(pg)
}

const UPSERT_META: &str = "INSERT INTO fedlora_meta (key, value) VALUES ($1, $2) \
     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value";
const UPSERT_ROUND: &str = "INSERT INTO fedlora_rounds (round, record) VALUES ($1, $2) \
     ON CONFLICT (round) DO UPDATE SET record = EXCLUDED.record";
const UPSERT_CHECKPOINT: &str =
    "INSERT INTO fedlora_checkpoints (version, record, bytes) VALUES ($1, $2, $3) \
     ON CONFLICT (version) DO UPDATE SET record = EXCLUDED.record, bytes = EXCLUDED.bytes";
const UPSERT_EVAL: &str =
    "INSERT INTO fedlora_evals (version, client, record) VALUES ($1, $2, $3) \
     ON CONFLICT (version, client) DO UPDATE SET record = EXCLUDED.record";

/// Deletes a round's upload records and payloads, inside `tx`.
fn drop_round_in(tx: &tokio_postgres::Transaction<'_>, round: u64) -> Result<()> {
    exec_in(
        tx,
        "DELETE FROM fedlora_uploads WHERE round = $1",
        &[&id(round)],
    )?;
    exec_in(
        tx,
        "DELETE FROM fedlora_payloads WHERE round = $1",
        &[&id(round)],
    )?;
    Ok(())
}

impl StateStore for PgStore {
    fn describe(&self) -> String {
        self.desc.clone()
    }

    fn flush(&self) -> Result<()> {
        // every durable write committed synchronously; a synchronous commit that writes (only
        // one that writes WAL waits for its flush) also flushes the asynchronous ones before it
        self.exec(
            "INSERT INTO fedlora_meta (key, value) VALUES ('flushed', '') \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[],
        )
        .map(drop)
    }

    fn healthy(&self) -> bool {
        self.alive.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn frontends(&self) -> Result<Vec<super::FrontendRecord>> {
        Ok(self
            .rows(
                "SELECT id, listen, started_ms, seen_ms, driving FROM fedlora_frontends \
                 ORDER BY driving DESC, id",
                &[],
            )?
            .iter()
            .map(|r| super::FrontendRecord {
                id: r.get(0),
                listen: r.get(1),
                started_ms: u64::try_from(r.get::<_, i64>(2)).unwrap_or(0),
                seen_ms: u64::try_from(r.get::<_, i64>(3)).unwrap_or(0),
                driving: r.get(4),
            })
            .collect())
    }

    fn schema(&self) -> Option<String> {
        Some(self.schema.clone())
    }

    fn state(&self) -> Result<Option<FederationState>> {
        self.meta("state")?
            .map(|b| state_from_bytes(&b))
            .transpose()
    }

    fn setup(&self) -> Result<Option<(FederationConfig, AdapterSpec)>> {
        match (self.meta("config")?, self.meta("spec")?) {
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
        let ck = json_text(&checkpoint_record(0, 0, initial, now_ms))?;
        self.transaction(true, |tx| {
            exec_in(tx, UPSERT_CHECKPOINT, &[&0i64, &ck, &initial])?;
            exec_in(tx, UPSERT_META, &[&"config", &json(config)])?;
            exec_in(tx, UPSERT_META, &[&"spec", &json(spec)])?;
            exec_in(tx, UPSERT_META, &[&"state", &state_bytes(state)])?;
            Ok(())
        })
    }

    fn save_state(&self, state: &FederationState) -> Result<()> {
        self.exec(UPSERT_META, &[&"state", &state_bytes(state)])?;
        Ok(())
    }

    fn write_upload_payload(&self, round: u64, digest: &[u8; 32], bytes: &[u8]) -> Result<()> {
        self.put(round, digest, bytes)
    }

    fn record_batch(&self, uploads: &[UploadRecord], evals: &[EvalRecord]) -> Result<()> {
        if uploads.is_empty() && evals.is_empty() {
            return Ok(());
        }
        self.transaction(true, |tx| {
            for r in uploads {
                let rec = json_text(r)?;
                exec_in(
                    tx,
                    "INSERT INTO fedlora_uploads (round, client, digest, record) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (round, client) DO UPDATE \
                     SET digest = EXCLUDED.digest, record = EXCLUDED.record",
                    &[&id(r.round), &r.client, &r.meta.digest.as_slice(), &rec],
                )?;
            }
            for e in evals {
                let rec = json_text(e)?;
                exec_in(tx, UPSERT_EVAL, &[&id(e.version), &e.client, &rec])?;
            }
            Ok(())
        })
    }

    fn upload_payload(&self, round: u64, digest: &[u8; 32]) -> Result<Vec<u8>> {
        self.get(round, digest)?.ok_or_else(|| {
            storage(format!(
                "upload {} of round {round} is missing",
                hex::encode(digest)
            ))
        })
    }

    fn round_uploads(&self, round: u64) -> Result<Vec<UploadRecord>> {
        self.records(
            "SELECT record FROM fedlora_uploads WHERE round = $1 ORDER BY client COLLATE \"C\"",
            &[&id(round)],
        )
    }

    fn uploads(&self) -> Result<Vec<UploadRecord>> {
        self.records(
            "SELECT record FROM fedlora_uploads ORDER BY round, client COLLATE \"C\"",
            &[],
        )
    }

    fn commit_round(
        &self,
        version: u64,
        global: &[u8],
        round: &RoundRecord,
        state: &FederationState,
        now_ms: u64,
    ) -> Result<()> {
        crate::faults::crash_point("round-commit");
        let ck = json_text(&checkpoint_record(version, round.round, global, now_ms))?;
        let rr = json_text(round)?;
        self.transaction(true, |tx| {
            exec_in(tx, UPSERT_CHECKPOINT, &[&id(version), &ck, &global])?;
            exec_in(tx, UPSERT_ROUND, &[&id(round.round), &rr])?;
            exec_in(tx, UPSERT_META, &[&"state", &state_bytes(state)])?;
            drop_round_in(tx, round.round)
        })
    }

    fn put_optimizer_state(&self, version: u64, state: &OptimizerState) -> Result<()> {
        self.exec(
            "INSERT INTO fedlora_optimizer (version, bytes) VALUES ($1, $2) \
             ON CONFLICT (version) DO UPDATE SET bytes = EXCLUDED.bytes",
            &[&id(version), &optimizer_bytes(state)?],
        )?;
        Ok(())
    }

    fn optimizer_state(&self, version: u64) -> Result<Option<OptimizerState>> {
        self.rows(
            "SELECT bytes FROM fedlora_optimizer WHERE version = $1",
            &[&id(version)],
        )?
        .first()
        .map(|r| optimizer_from_bytes(r.get(0), &format!("optimizer state of v{version}")))
        .transpose()
    }

    fn put_round(&self, round: &RoundRecord, state: &FederationState) -> Result<()> {
        let rr = json_text(round)?;
        self.transaction(true, |tx| {
            exec_in(tx, UPSERT_ROUND, &[&id(round.round), &rr])?;
            exec_in(tx, UPSERT_META, &[&"state", &state_bytes(state)])?;
            if matches!(round.status, RoundStatus::Failed { .. }) {
                drop_round_in(tx, round.round)?;
            }
            Ok(())
        })
    }

    fn update_round(&self, round: &RoundRecord) -> Result<()> {
        let rr = json_text(round)?;
        self.transaction(false, |tx| {
            exec_in(tx, UPSERT_ROUND, &[&id(round.round), &rr]).map(drop)
        })
    }

    fn checkpoint(&self, version: u64) -> Result<Vec<u8>> {
        let rows = self.rows(
            "SELECT record, bytes FROM fedlora_checkpoints WHERE version = $1",
            &[&id(version)],
        )?;
        let row = rows
            .first()
            .ok_or_else(|| storage(format!("no checkpoint for version {version}")))?;
        let rec: CheckpointRecord = from_json(row.get::<_, &str>(0).as_bytes())?;
        let bytes: Vec<u8> = row.get(1);
        if hex::encode(Sha256::digest(&bytes)) != rec.sha256 {
            return Err(storage(format!("checkpoint v{version} is corrupt")));
        }
        Ok(bytes)
    }

    fn checkpoints(&self) -> Result<Vec<CheckpointRecord>> {
        self.records(
            "SELECT record FROM fedlora_checkpoints ORDER BY version",
            &[],
        )
    }

    fn round(&self, round: u64) -> Result<Option<RoundRecord>> {
        Ok(self
            .records(
                "SELECT record FROM fedlora_rounds WHERE round = $1",
                &[&id(round)],
            )?
            .pop())
    }

    fn rounds(&self) -> Result<Vec<RoundRecord>> {
        self.records("SELECT record FROM fedlora_rounds ORDER BY round", &[])
    }

    fn put_eval(&self, rec: &EvalRecord) -> Result<()> {
        let r = json_text(rec)?;
        self.exec(UPSERT_EVAL, &[&id(rec.version), &rec.client, &r])?;
        Ok(())
    }

    fn evals(&self) -> Result<Vec<EvalRecord>> {
        self.records(
            "SELECT record FROM fedlora_evals ORDER BY version, client COLLATE \"C\"",
            &[],
        )
    }

    fn saw_client(&self, client: &str, fingerprint: &str, key_id: &str, now_ms: u64) -> Result<()> {
        self.transaction(false, |tx| {
            let old = pollster::block_on(tx.query(
                "SELECT record FROM fedlora_clients WHERE client = $1 FOR UPDATE",
                &[&client],
            ))
            .map_err(pg)?;
            let rec = match old.first() {
                Some(row) => {
                    let mut r: ClientRecord = from_json(row.get::<_, &str>(0).as_bytes())?;
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
            let r = json_text(&rec)?;
            exec_in(
                tx,
                "INSERT INTO fedlora_clients (client, record) VALUES ($1, $2) \
                 ON CONFLICT (client) DO UPDATE SET record = EXCLUDED.record",
                &[&client, &r],
            )
            .map(drop)
        })
    }

    fn client(&self, client: &str) -> Result<Option<ClientRecord>> {
        Ok(self
            .records(
                "SELECT record FROM fedlora_clients WHERE client = $1",
                &[&client],
            )?
            .pop())
    }

    fn clients(&self) -> Result<Vec<ClientRecord>> {
        self.records(
            "SELECT record FROM fedlora_clients ORDER BY client COLLATE \"C\"",
            &[],
        )
    }

    fn reconcile(&self, mut state: FederationState) -> Result<(FederationState, Vec<String>)> {
        let open_round = match &state.phase {
            Phase::Training(o) => Some(o.round),
            _ => None,
        };
        let mut problems = Vec::new();
        let mut kept = std::collections::BTreeMap::<String, UploadMeta>::new();
        if let Some(open) = open_round {
            // the open round's records, each with whether its payload is there and matches
            // its digest (hashed by the server: the payloads do not cross the network)
            let rows = self.rows(
                "SELECT u.record, p.digest IS NOT NULL AND sha256(p.bytes) = u.digest \
                 FROM fedlora_uploads u LEFT JOIN fedlora_payloads p \
                 ON p.round = u.round AND p.digest = u.digest \
                 WHERE u.round = $1 ORDER BY u.client COLLATE \"C\"",
                &[&id(open)],
            )?;
            let mut dropped = Vec::new();
            for row in &rows {
                let rec: UploadRecord = from_json(row.get::<_, &str>(0).as_bytes())?;
                if row.get::<_, bool>(1) {
                    kept.insert(rec.client, rec.meta);
                } else {
                    problems.push(format!(
                        "upload of {} for round {} has no valid payload; dropped",
                        rec.client, rec.round
                    ));
                    dropped.push(rec.client);
                }
            }
            self.exec(
                "DELETE FROM fedlora_uploads WHERE round = $1 AND client = ANY($2)",
                &[&id(open), &dropped],
            )?;
        }
        self.exec(
            "DELETE FROM fedlora_uploads WHERE round IS DISTINCT FROM $1",
            &[&open_round.map(id)],
        )?;
        let keep: BTreeSet<[u8; 32]> = kept.values().map(|m| m.digest).collect();
        if let Phase::Training(o) = &mut state.phase {
            o.uploads = kept;
        }
        self.retain(open_round, &keep)?;
        self.save_state(&state)?;
        Ok((state, problems))
    }

    fn claim_token(&self, hash: &str, device_id: &str) -> Result<bool> {
        Ok(self.exec(
            "INSERT INTO fedlora_tokens_used (hash, device_id) VALUES ($1, $2) \
             ON CONFLICT (hash) DO NOTHING",
            &[&hash, &device_id],
        )? == 1)
    }

    fn token_used(&self, hash: &str) -> Result<bool> {
        Ok(!self
            .rows(
                "SELECT 1 FROM fedlora_tokens_used WHERE hash = $1",
                &[&hash],
            )?
            .is_empty())
    }

    fn put_device(&self, rec: &DeviceRecord) -> Result<()> {
        let r = json_text(rec)?;
        self.exec(
            "INSERT INTO fedlora_devices (device_id, record) VALUES ($1, $2) \
             ON CONFLICT (device_id) DO UPDATE SET record = EXCLUDED.record",
            &[&rec.device_id, &r],
        )?;
        Ok(())
    }

    fn device(&self, id: &str) -> Result<Option<DeviceRecord>> {
        Ok(self
            .records(
                "SELECT record FROM fedlora_devices WHERE device_id = $1",
                &[&id],
            )?
            .pop())
    }

    fn devices(&self) -> Result<Vec<DeviceRecord>> {
        self.records(
            "SELECT record FROM fedlora_devices ORDER BY device_id COLLATE \"C\"",
            &[],
        )
    }

    /// The lease is a session advisory lock (one per federation schema), held until this
    /// store's connection closes: a killed process's lock is released when PostgreSQL sees
    /// its connection end.
    fn try_lead(&self) -> Result<bool> {
        let rows = self.rows(
            "SELECT pg_try_advisory_lock($1)",
            &[&lead_lock(&self.schema)],
        )?;
        Ok(rows.first().map(|r| r.get::<_, bool>(0)).unwrap_or(false))
    }

    fn wait_lead(&self) -> Result<()> {
        // blocks in the server until the holder's session ends: nobody polls
        self.exec("SELECT pg_advisory_lock($1)", &[&lead_lock(&self.schema)])
            .map(drop)
    }
}

/// The payload table, `fedlora_payloads` (round, digest, bytes): a payload's insert commits
/// asynchronously, and is durable once a later synchronous commit of the same cluster returns
/// (its upload's record batch, in [`StateStore::record_batch`]): the module docs say why.
impl PayloadStore for PgStore {
    fn put(&self, round: u64, digest: &[u8; 32], bytes: &[u8]) -> Result<()> {
        self.transaction(false, |tx| {
            exec_in(
                tx,
                "INSERT INTO fedlora_payloads (round, digest, bytes) VALUES ($1, $2, $3) \
                 ON CONFLICT (round, digest) DO NOTHING",
                &[&id(round), &digest.as_slice(), &bytes],
            )
            .map(drop)
        })
    }

    fn sync(&self, _rounds: &BTreeSet<u64>) -> Result<()> {
        self.flush()
    }

    fn get(&self, round: u64, digest: &[u8; 32]) -> Result<Option<Vec<u8>>> {
        let rows = self.rows(
            "SELECT bytes FROM fedlora_payloads WHERE round = $1 AND digest = $2",
            &[&id(round), &digest.as_slice()],
        )?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let bytes: Vec<u8> = row.get(0);
        if Sha256::digest(&bytes).as_slice() != digest {
            return Err(storage(format!(
                "upload {} of round {round} does not match its digest",
                hex::encode(digest)
            )));
        }
        Ok(Some(bytes))
    }

    fn verify(&self, round: u64, digest: &[u8; 32]) -> Result<bool> {
        Ok(!self
            .rows(
                "SELECT 1 FROM fedlora_payloads WHERE round = $1 AND digest = $2 \
                 AND sha256(bytes) = digest",
                &[&id(round), &digest.as_slice()],
            )?
            .is_empty())
    }

    fn drop_round(&self, round: u64) -> Result<()> {
        self.exec(
            "DELETE FROM fedlora_payloads WHERE round = $1",
            &[&id(round)],
        )?;
        Ok(())
    }

    fn retain(&self, open: Option<u64>, keep: &BTreeSet<[u8; 32]>) -> Result<()> {
        let keep: Vec<&[u8]> = keep.iter().map(|d| d.as_slice()).collect();
        self.exec(
            "DELETE FROM fedlora_payloads WHERE round IS DISTINCT FROM $1 \
             OR NOT (digest = ANY($2))",
            &[&open.map(id), &keep],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_a_log_line() {
        assert_eq!(
            redacted("postgres://fed:s3cret@db.example:5432/fl?sslmode=disable"),
            "postgres://fed:***@db.example:5432/fl?sslmode=disable"
        );
        assert_eq!(
            redacted("postgres://fed@127.0.0.1/fl?password=s3cret&application_name=x"),
            "postgres://fed@127.0.0.1/fl?password=***&application_name=x"
        );
        assert_eq!(
            redacted("postgres://127.0.0.1:5432/fl"),
            "postgres://127.0.0.1:5432/fl"
        );
        // a password with the characters that end a host elsewhere
        assert_eq!(
            redacted("postgres://fed:pa/ss?w@db:5432/fl"),
            "postgres://fed:***@db:5432/fl"
        );
        assert!(!redacted("not a url s3cret").contains("s3cret"));
    }
}
