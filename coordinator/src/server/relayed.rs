//! The driver's side of the relay ([`crate::relay`]): requests that other front-ends relay
//! through the PostgreSQL store, answered by the same code as a direct client's
//! ([`super::connection::dispatch`]), with each relayed connection registered (hello checked,
//! connected in the round machine) as a direct one is.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use tokio::sync::mpsc::UnboundedReceiver;

use super::connection::{
    check_hello, count_sent, dispatch, identify, note_refusal, register, unregister, welcome,
};
use super::*;
use crate::relay::queue::{Note, RelayQueue, Waiting, REQUEST_CHANNEL};
use crate::relay::{Relayed, RelayedReply, RelayedRequest, RELAY_WAIT_MS};

/// A relayed connection the driver knows: whose it is, and its key among live connections.
#[derive(Clone)]
struct Known {
    client: String,
    conn_id: usize,
    presented: Arc<crate::enroll::Presented>,
}

type Sessions = Arc<Mutex<BTreeMap<(String, u64), Known>>>;

/// Requests claimed per query.
const CLAIM: i64 = 512;

/// Answers relayed requests until the relay's connection ends: claims what waits, then sleeps
/// until the next `fedlora_relay` notification (or a second, in case one was missed).
pub(super) async fn relay_loop(
    shared: Arc<Shared>,
    queue: Arc<RelayQueue>,
    mut notes: UnboundedReceiver<Note>,
) {
    if let Err(e) = queue.listen(REQUEST_CHANNEL).await {
        error!(error = %e, "cannot listen for relayed requests");
        return;
    }
    let sessions: Sessions = Arc::default();
    loop {
        match queue.claim(CLAIM).await {
            Ok(waiting) => {
                let full = waiting.len() as i64 == CLAIM;
                for w in waiting {
                    let (shared, queue, sessions) =
                        (shared.clone(), queue.clone(), sessions.clone());
                    tokio::spawn(async move { answer(&shared, &queue, &sessions, w).await });
                }
                if full {
                    continue;
                }
            }
            Err(e) => error!(error = %e, "reading relayed requests failed"),
        }
        tokio::select! {
            note = notes.recv() => if note.is_none() {
                error!("the relay's connection ended; relayed clients are not served");
                return;
            },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

fn conn_key(frontend: &str, conn: u64) -> usize {
    let mut h = DefaultHasher::new();
    ("relayed", frontend, conn).hash(&mut h);
    h.finish() as usize
}

fn refused(r: Refusal) -> Vec<u8> {
    fedlora_protocol::frame::encode(&CoordMsg::Refused(r)).unwrap_or_default()
}

/// Answers one relayed request (or discards it: a closed connection, or one too old).
async fn answer(shared: &Arc<Shared>, queue: &RelayQueue, sessions: &Sessions, w: Waiting) {
    let old = now_ms().saturating_sub(w.created_ms) > RELAY_WAIT_MS;
    let req = crate::relay::decode::<RelayedRequest>(&w.request);
    let reply = match req {
        _ if old => None,
        None => {
            warn!(frontend = %w.frontend, "undecodable relayed request dropped");
            None
        }
        Some(req) => handle(shared, sessions, &w.frontend, req).await,
    };
    let done = match reply {
        Some(r) => {
            shared.metrics.relayed("in");
            queue.answer(&w, &crate::relay::encode(&r)).await
        }
        None => queue.discard(w.id).await,
    };
    if let Err(e) = done {
        error!(error = %e, "answering a relayed request failed");
    }
}

/// The reply to a relayed request (`None`: it needs none).
async fn handle(
    shared: &Arc<Shared>,
    sessions: &Sessions,
    frontend: &str,
    req: RelayedRequest,
) -> Option<RelayedReply> {
    let key = (frontend.to_string(), req.conn);
    if let Relayed::Closed = req.what {
        if let Some(k) = sessions.lock().expect("lock").remove(&key) {
            unregister(shared, &k.client, k.conn_id);
        }
        return None;
    }
    let known = sessions.lock().expect("lock").get(&key).cloned();
    let (known, welcomed) = match known {
        Some(k) => (k, None),
        None => match admit(shared, frontend, &req) {
            Ok((k, w)) => {
                sessions.lock().expect("lock").insert(key, k.clone());
                (k, Some(w))
            }
            Err(reply) => return Some(reply),
        },
    };
    match req.what {
        Relayed::Hello => {
            let frame = fedlora_protocol::frame::encode(&welcomed.unwrap_or(CoordMsg::Welcome {
                client_id: known.client.clone(),
                protocol_version: PROTOCOL_VERSION,
            }))
            .unwrap_or_default();
            Some(RelayedReply { frame, close: None })
        }
        Relayed::Request { frame, wire } => {
            let msg = match fedlora_protocol::frame::decode::<ClientMsg>(&frame) {
                Ok(ClientMsg::Hello { .. }) => {
                    return Some(RelayedReply {
                        frame: refused(Refusal::new(
                            RefusalCode::Malformed,
                            "hello already done on this connection",
                        )),
                        close: None,
                    })
                }
                Ok(m) => m,
                Err(e) => {
                    return Some(RelayedReply {
                        frame: refused(e.refusal()),
                        close: None,
                    })
                }
            };
            drop(frame);
            let (reply, round_down, download) = dispatch(
                shared,
                &known.client,
                &known.presented,
                msg,
                wire,
                crate::wire::BodyPermit::none(),
            )
            .await;
            note_refusal(shared, &known.client, &reply);
            let frame = fedlora_protocol::frame::encode(&reply)
                .unwrap_or_else(|e| refused(Refusal::new(RefusalCode::Internal, e.to_string())));
            count_sent(shared, &known.client, round_down, frame.len() as u64);
            drop(download);
            Some(RelayedReply { frame, close: None })
        }
        Relayed::Closed => None,
    }
}

/// Checks a relayed connection's certificate and hello as a direct connection's are; registers
/// it. Returns it and the welcome, or the refusal to relay back.
fn admit(
    shared: &Shared,
    frontend: &str,
    req: &RelayedRequest,
) -> std::result::Result<(Known, CoordMsg), RelayedReply> {
    let close = |r: Refusal, why: &str| RelayedReply {
        frame: refused(r),
        close: Some(why.to_string()),
    };
    let Some(leaf) = req.chain.first() else {
        return Err(close(
            Refusal::new(RefusalCode::NotRegistered, "client certificate required"),
            "client certificate required",
        ));
    };
    let (client, fingerprint, key_id, presented) = identify(shared, leaf).map_err(|e| {
        warn!(%frontend, error = %e, "unusable relayed client certificate");
        close(
            Refusal::new(RefusalCode::Revoked, "unusable client certificate"),
            "unusable client certificate",
        )
    })?;
    let hello =
        fedlora_protocol::frame::decode::<ClientMsg>(&req.hello).map_err(|e| RelayedReply {
            frame: refused(e.refusal()),
            close: Some("hello first".into()),
        })?;
    if let Some((r, closes)) = check_hello(shared, &client, (&fingerprint, &key_id), &hello) {
        warn!(%client, %frontend, code = ?r.code, reason = %r.message, "relayed hello refused");
        shared.metrics.refused(r.code);
        return Err(RelayedReply {
            frame: refused(r.clone()),
            close: closes.then(|| format!("{:?}", r.code)),
        });
    }
    let w = welcome(shared, &client, (&fingerprint, &key_id));
    let conn_id = conn_key(frontend, req.conn);
    register(shared, &client, req.chain.concat(), conn_id);
    Ok((
        Known {
            client,
            conn_id,
            presented: Arc::new(presented),
        },
        w,
    ))
}
