//! The relay queue in PostgreSQL: `fedlora_relay` rows (a request, later its reply) and two
//! kinds of notifications, so that nobody polls:
//! - `fedlora_relay_<schema tag>` (payload: nothing): a request is waiting; the driving
//!   front-end of the federation in that schema listens;
//! - `fedlora_reply_<front-end id>` (payload: the request's key): its reply is there; the
//!   front-end that relayed it listens.
//!
//! Times (a request's age, a front-end's last heartbeat) are the database's clock, so the
//! front-ends' clocks need not agree.
//!
//! A [`RelayQueue`] is one connection, driven on a thread of its own that hands every
//! notification to a channel; its queries are awaited from any runtime (tokio-postgres's
//! client futures need none).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_postgres::Client;
use tracing::warn;

use crate::error::{CoordinatorError, Result};
use crate::store::postgres::{pg, redacted};
use crate::store::storage;

/// The database's clock, Unix ms, in SQL.
const DB_NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// The channel on which front-end `frontend` hears of its replies.
pub fn reply_channel(frontend: &str) -> String {
    format!("fedlora_reply_{frontend}")
}

/// A notification: (channel, payload).
pub use crate::store::postgres::Note;

/// One relayed request, as the driving front-end reads it.
pub struct Waiting {
    /// Its row.
    pub id: i64,
    /// The front-end that relayed it.
    pub frontend: String,
    /// Its key at that front-end.
    pub req_key: i64,
    /// The request ([`super::RelayedRequest`], bincode).
    pub request: Vec<u8>,
    /// How long ago it was relayed, ms (the database's clock).
    pub age_ms: u64,
}

/// A connection to the relay queue.
pub struct RelayQueue {
    client: Client,
    /// The channel the federation's waiting requests are announced on.
    request_channel: String,
    /// Whether the connection is up.
    alive: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl RelayQueue {
    /// Connects to the database at `url`; the notifications of the channels this queue
    /// [`RelayQueue::listen`]s to arrive on the receiver, which ends when the connection does.
    pub async fn connect(url: &str) -> Result<(Self, UnboundedReceiver<Note>)> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| CoordinatorError::Config(format!("{}: {e}", redacted(url))))?;
        let config = crate::store::postgres::tuned(config);
        let alive = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (notes_tx, notes) = unbounded_channel();
        let (tx, rx) = tokio::sync::oneshot::channel();
        crate::store::postgres::connect_on_thread(
            config,
            "fedlora-relay-pg",
            Some(notes_tx),
            alive.clone(),
            move |c| {
                let _ = tx.send(c);
            },
        )?;
        let client = rx
            .await
            .map_err(|_| storage("the relay connection thread ended"))??;
        // Relay rows are messages in flight, not state: this connection's commits return
        // without waiting for their WAL flush. Each relayed request takes three commits (the
        // request, its reply, taking the reply), and one connection waiting for a flush per
        // commit capped a front-end at a few hundred requests per second on one disk. What a
        // crash of PostgreSQL may lose here is a request or a reply; the front-end then gives
        // up waiting ([`super::RELAY_WAIT_MS`]) and its client retries. Nothing acknowledged
        // rests on it: the driver answers an upload only after the store (its own
        // connection, synchronous commits) holds it, so a lost reply is answered again as
        // `AlreadyUploaded`.
        client
            .batch_execute("SET synchronous_commit TO off")
            .await
            .map_err(pg)?;
        let schema: Option<String> = client
            .query_one("SELECT current_schema()", &[])
            .await
            .map_err(pg)?
            .get(0);
        let schema = schema.ok_or_else(|| storage("no schema on the search path"))?;
        let request_channel = crate::store::postgres::schema_tag("fedlora_relay", &schema);
        Ok((
            Self {
                client,
                request_channel,
                alive,
            },
            notes,
        ))
    }

    /// Whether the connection is up.
    pub fn healthy(&self) -> bool {
        self.alive.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The channel the federation's waiting requests are announced on.
    pub fn request_channel(&self) -> &str {
        &self.request_channel
    }

    /// Listens to `channel` on this connection.
    pub async fn listen(&self, channel: &str) -> Result<()> {
        let quoted = channel.replace('"', "\"\"");
        self.client
            .batch_execute(&format!("LISTEN \"{quoted}\""))
            .await
            .map_err(pg)
    }

    /// Relays a request (front-end side): stored, then announced.
    pub async fn submit(&self, frontend: &str, req_key: i64, request: &[u8]) -> Result<()> {
        self.client
            .execute(
                &format!(
                    "WITH r AS (INSERT INTO fedlora_relay (frontend, req_key, request, created_ms) \
                     VALUES ($1, $2, $3, {DB_NOW_MS}) RETURNING id) \
                     SELECT pg_notify($4, '') FROM r"
                ),
                &[&frontend, &req_key, &request, &self.request_channel],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    /// Takes the reply to a relayed request, if it is there (front-end side): the row goes.
    pub async fn take_reply(&self, frontend: &str, req_key: i64) -> Result<Option<Vec<u8>>> {
        let rows = self
            .client
            .query(
                "DELETE FROM fedlora_relay WHERE frontend = $1 AND req_key = $2 \
                 AND reply IS NOT NULL RETURNING reply",
                &[&frontend, &req_key],
            )
            .await
            .map_err(pg)?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    /// Withdraws a request nobody answered in time (front-end side).
    pub async fn withdraw(&self, frontend: &str, req_key: i64) -> Result<()> {
        self.client
            .execute(
                "DELETE FROM fedlora_relay WHERE frontend = $1 AND req_key = $2",
                &[&frontend, &req_key],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    /// Claims up to `limit` requests nobody claimed yet, oldest first (driver side). Requests
    /// a driver claimed and did not answer before it died are claimed again by the next
    /// ([`RelayQueue::unclaim`]).
    pub async fn claim(&self, limit: i64) -> Result<Vec<Waiting>> {
        let rows = self
            .client
            .query(
                &format!(
                    "UPDATE fedlora_relay SET claimed = true WHERE id IN \
                     (SELECT id FROM fedlora_relay WHERE NOT claimed ORDER BY id LIMIT $1 \
                     FOR UPDATE SKIP LOCKED) \
                     RETURNING id, frontend, req_key, request, {DB_NOW_MS} - created_ms"
                ),
                &[&limit],
            )
            .await
            .map_err(pg)?;
        let mut out: Vec<Waiting> = rows
            .iter()
            .map(|r| Waiting {
                id: r.get(0),
                frontend: r.get(1),
                req_key: r.get(2),
                request: r.get(3),
                age_ms: u64::try_from(r.get::<_, i64>(4)).unwrap_or(0),
            })
            .collect();
        out.sort_by_key(|w| w.id);
        Ok(out)
    }

    /// Makes every unanswered request claimable again (driver side, when it takes the lease:
    /// the driver that claimed them is gone, and answering a request twice is safe, as its
    /// client may send it twice anyway: a stored upload is answered as already accepted).
    pub async fn unclaim(&self) -> Result<u64> {
        self.client
            .execute(
                "UPDATE fedlora_relay SET claimed = false WHERE claimed AND reply IS NULL",
                &[],
            )
            .await
            .map_err(pg)
    }

    /// Answers a relayed request (driver side): the reply is stored, then announced to its
    /// front-end.
    pub async fn answer(&self, w: &Waiting, reply: &[u8]) -> Result<()> {
        self.client
            .execute(
                "WITH r AS (UPDATE fedlora_relay SET reply = $2 WHERE id = $1 RETURNING id) \
                 SELECT pg_notify($3, $4) FROM r",
                &[
                    &w.id,
                    &reply,
                    &reply_channel(&w.frontend),
                    &w.req_key.to_string(),
                ],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    /// Deletes a request that needs no reply, or that is too old to matter (driver side).
    pub async fn discard(&self, id: i64) -> Result<()> {
        self.client
            .execute("DELETE FROM fedlora_relay WHERE id = $1", &[&id])
            .await
            .map_err(pg)?;
        Ok(())
    }

    /// Records front-end `id` (listening on `listen`) as alive, and whether it drives.
    pub async fn heartbeat(&self, id: &str, listen: &str, driving: bool) -> Result<()> {
        self.client
            .execute(
                &format!(
                    "INSERT INTO fedlora_frontends (id, listen, started_ms, seen_ms, driving) \
                     VALUES ($1, $2, {DB_NOW_MS}, {DB_NOW_MS}, $3) ON CONFLICT (id) DO UPDATE \
                     SET seen_ms = EXCLUDED.seen_ms, driving = EXCLUDED.driving, \
                     listen = EXCLUDED.listen"
                ),
                &[&id, &listen, &driving],
            )
            .await
            .map_err(pg)?;
        if driving {
            // one driver at a time: whoever drove before does not any more
            self.client
                .execute(
                    "UPDATE fedlora_frontends SET driving = false WHERE id <> $1",
                    &[&id],
                )
                .await
                .map_err(pg)?;
        }
        Ok(())
    }

    /// The front-ends not heard from for `silent_ms` (the database's clock): gone.
    pub async fn silent_frontends(&self, silent_ms: u64) -> Result<Vec<String>> {
        let rows = self
            .client
            .query(
                &format!("SELECT id FROM fedlora_frontends WHERE seen_ms < {DB_NOW_MS} - $1"),
                &[&(silent_ms as i64)],
            )
            .await
            .map_err(pg)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Deletes requests older than `max_age_ms` (answered or not: whoever waited for them gave
    /// up), and front-ends silent for an hour. Returns the requests deleted.
    pub async fn collect_garbage(&self, max_age_ms: u64) -> Result<u64> {
        let n = self
            .client
            .execute(
                &format!("DELETE FROM fedlora_relay WHERE created_ms < {DB_NOW_MS} - $1"),
                &[&(max_age_ms as i64)],
            )
            .await
            .map_err(pg)?;
        self.client
            .execute(
                &format!(
                    "DELETE FROM fedlora_frontends WHERE seen_ms < {DB_NOW_MS} - 3600000 \
                     AND NOT driving"
                ),
                &[],
            )
            .await
            .map_err(pg)?;
        Ok(n)
    }

    /// The federation's stored state and config (what a front-end checks payloads against).
    pub async fn federation(
        &self,
    ) -> Result<
        Option<(
            fedlora_protocol::FederationConfig,
            fedlora_protocol::FederationState,
        )>,
    > {
        let rows = self
            .client
            .query(
                "SELECT key, value FROM fedlora_meta WHERE key IN ('config', 'state')",
                &[],
            )
            .await
            .map_err(pg)?;
        let get = |k: &str| {
            rows.iter()
                .find(|r| r.get::<_, &str>(0) == k)
                .map(|r| r.get::<_, Vec<u8>>(1))
        };
        match (get("config"), get("state")) {
            (Some(c), Some(st)) => Ok(Some((
                serde_json::from_slice(&c).map_err(storage)?,
                crate::store::state_from_bytes(&st)?,
            ))),
            _ => Ok(None),
        }
    }
}

/// A fresh front-end id: `f` and 16 hex digits (a PostgreSQL channel name's safe part).
pub fn new_id() -> String {
    format!("f{:016x}", rand::random::<u64>())
}

/// Records this front-end as alive every two seconds (`fedlora status` lists the front-ends
/// and which one drives).
pub async fn heartbeat_loop(queue: Arc<RelayQueue>, id: String, listen: String, driving: bool) {
    loop {
        if let Err(e) = queue.heartbeat(&id, &listen, driving).await {
            warn!(error = %e, "front-end heartbeat failed");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::scratch::ScratchSchema;

    /// The relay's commits do not wait for the WAL (the store's do): see [`RelayQueue::connect`].
    #[tokio::test]
    async fn the_relay_commits_without_waiting_for_the_wal_and_still_delivers() {
        let Some(schema) = ScratchSchema::for_test("relay queue commit mode") else {
            return;
        };
        // the store creates the schema's tables (the relay's among them)
        let dir = tempfile::tempdir().unwrap();
        let (path, url) = (dir.path().to_path_buf(), schema.url());
        tokio::task::spawn_blocking(move || {
            crate::store::Store::open_at(&path, &crate::store::StoreLocation::Postgres(url))
                .map(drop)
        })
        .await
        .unwrap()
        .unwrap();
        let (queue, _notes) = RelayQueue::connect(&schema.url()).await.unwrap();
        let mode: String = queue
            .client
            .query_one("SHOW synchronous_commit", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(mode, "off");
        // and a request still goes through: submitted, claimed, answered, taken
        queue.submit("fa", 7, b"request").await.unwrap();
        let waiting = queue.claim(10).await.unwrap();
        assert_eq!(waiting.len(), 1);
        assert_eq!(waiting[0].request, b"request");
        queue.answer(&waiting[0], b"reply").await.unwrap();
        assert_eq!(
            queue.take_reply("fa", 7).await.unwrap().as_deref(),
            Some(&b"reply"[..])
        );
        assert_eq!(queue.take_reply("fa", 7).await.unwrap(), None);
    }
}
