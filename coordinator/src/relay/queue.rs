//! The relay queue in PostgreSQL: `fedlora_relay` rows (a request, later its reply) and two
//! kinds of notifications, so that nobody polls:
//! - `fedlora_relay` (payload: nothing): a request is waiting; the driving front-end listens;
//! - `fedlora_reply_<front-end id>` (payload: the request's key): its reply is there; the
//!   front-end that relayed it listens.
//!
//! A [`RelayQueue`] is one connection, driven on a thread of its own that hands every
//! notification to a channel; its queries are awaited from any runtime (tokio-postgres's
//! client futures need none).

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::error::{CoordinatorError, Result};
use crate::store::postgres::{pg, redacted};

/// The channel a waiting request is announced on.
pub const REQUEST_CHANNEL: &str = "fedlora_relay";

/// The channel on which front-end `frontend` hears of its replies.
pub fn reply_channel(frontend: &str) -> String {
    format!("fedlora_reply_{frontend}")
}

/// A notification: (channel, payload).
pub type Note = (String, String);

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
    /// When it was relayed, Unix ms.
    pub created_ms: u64,
}

/// A connection to the relay queue.
pub struct RelayQueue {
    client: Client,
}

fn storage(e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Storage(e.to_string())
}

impl RelayQueue {
    /// Connects to the database at `url`; the notifications of the channels this queue
    /// [`RelayQueue::listen`]s to arrive on the receiver, which ends when the connection does.
    pub async fn connect(url: &str) -> Result<(Self, UnboundedReceiver<Note>)> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| CoordinatorError::Config(format!("{}: {e}", redacted(url))))?;
        let (notes_tx, notes) = unbounded_channel();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("fedlora-relay-pg".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(storage(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let (client, mut conn) = match config.connect(NoTls).await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = tx.send(Err(pg(e)));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(client));
                    loop {
                        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                            Some(Ok(AsyncMessage::Notification(n))) => {
                                let note = (n.channel().to_string(), n.payload().to_string());
                                if notes_tx.send(note).is_err() {
                                    return;
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                tracing::error!(error = %e, "the relay's PostgreSQL connection failed");
                                return;
                            }
                            None => return,
                        }
                    }
                });
            })?;
        let client = rx
            .await
            .map_err(|_| storage("the relay connection thread ended"))??;
        Ok((Self { client }, notes))
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
    pub async fn submit(
        &self,
        frontend: &str,
        req_key: i64,
        request: &[u8],
        now_ms: u64,
    ) -> Result<()> {
        self.client
            .execute(
                "WITH r AS (INSERT INTO fedlora_relay (frontend, req_key, request, created_ms) \
                 VALUES ($1, $2, $3, $4) RETURNING id) \
                 SELECT pg_notify($5, '') FROM r",
                &[
                    &frontend,
                    &req_key,
                    &request,
                    &(now_ms as i64),
                    &REQUEST_CHANNEL,
                ],
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

    /// Claims up to `limit` requests nobody claimed yet, oldest first (driver side). A
    /// request claimed by a driver that died unanswered is never answered: its front-end gives
    /// up waiting and its client sends it again.
    pub async fn claim(&self, limit: i64) -> Result<Vec<Waiting>> {
        let rows = self
            .client
            .query(
                "UPDATE fedlora_relay SET claimed = true WHERE id IN \
                 (SELECT id FROM fedlora_relay WHERE NOT claimed ORDER BY id LIMIT $1 \
                 FOR UPDATE SKIP LOCKED) \
                 RETURNING id, frontend, req_key, request, created_ms",
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
                created_ms: u64::try_from(r.get::<_, i64>(4)).unwrap_or(0),
            })
            .collect();
        out.sort_by_key(|w| w.id);
        Ok(out)
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
    pub async fn heartbeat(
        &self,
        id: &str,
        listen: &str,
        driving: bool,
        now_ms: u64,
    ) -> Result<()> {
        self.client
            .execute(
                "INSERT INTO fedlora_frontends (id, listen, started_ms, seen_ms, driving) \
                 VALUES ($1, $2, $3, $3, $4) ON CONFLICT (id) DO UPDATE \
                 SET seen_ms = EXCLUDED.seen_ms, driving = EXCLUDED.driving, \
                 listen = EXCLUDED.listen",
                &[&id, &listen, &(now_ms as i64), &driving],
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
}
