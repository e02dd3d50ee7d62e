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
use crate::relay::queue::{Note, RelayQueue, Waiting};
use crate::relay::{Relayed, RelayedReply, RelayedRequest, RELAY_WAIT_MS};

/// A relayed connection the driver knows: whose it is, and its key among live connections.
#[derive(Clone)]
struct Known {
    client: String,
    conn_id: usize,
    presented: Arc<crate::enroll::Presented>,
}

/// The relayed connections the driver knows, by (front-end, connection id); and those that
/// closed (front-ends number connections with a counter, so an id is never reused), with when,
/// so that a request that overtook its connection's close does not register it again.
#[derive(Default)]
struct Sessions {
    known: BTreeMap<(String, u64), Known>,
    closed: BTreeMap<(String, u64), u64>,
    /// The deny-list as last read.
    deny: Arc<std::collections::BTreeSet<String>>,
}

type SharedSessions = Arc<Mutex<Sessions>>;

/// Relayed requests answered at once, at most (each also holds its bytes of the payload
/// budget while it is handled).
const IN_FLIGHT: usize = 256;

/// A front-end not heard from for this long is gone: its connections are closed (ms).
const SILENT_MS: u64 = 10_000;

/// Answers relayed requests until the relay's connection ends: claims what waits, then sleeps
/// until the next `fedlora_relay` notification (or a second, in case one was missed).
pub(super) async fn relay_loop(
    shared: Arc<Shared>,
    queue: Arc<RelayQueue>,
    mut notes: UnboundedReceiver<Note>,
) {
    if let Err(e) = queue.listen(queue.request_channel()).await {
        error!(error = %e, "cannot listen for relayed requests");
        shared.lose("cannot listen for relayed requests");
        return;
    }
    // this process holds the lease: what a driver before it claimed and left unanswered is
    // answered here
    match queue.unclaim().await {
        Ok(0) => {}
        Ok(n) => info!(requests = n, "answering requests the previous driver left"),
        Err(e) => error!(error = %e, "cannot take over the previous driver's requests"),
    }
    let sessions: SharedSessions = Arc::default();
    tokio::spawn(housekeeping(
        shared.clone(),
        queue.clone(),
        sessions.clone(),
    ));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    loop {
        let free = in_flight.available_permits() as i64;
        if free > 0 {
            match queue.claim(free).await {
                Ok(waiting) => {
                    let more = waiting.len() as i64 == free;
                    for w in waiting {
                        let permit = in_flight.clone().acquire_owned().await.expect("open");
                        let (shared, queue, sessions) =
                            (shared.clone(), queue.clone(), sessions.clone());
                        tokio::spawn(async move {
                            answer(&shared, &queue, &sessions, w).await;
                            drop(permit);
                        });
                    }
                    if more {
                        continue;
                    }
                }
                Err(e) => error!(error = %e, "reading relayed requests failed"),
            }
        }
        tokio::select! {
            note = notes.recv() => if note.is_none() {
                error!("the relay's connection ended; relayed clients are not served");
                shared.lose("the relay's connection to the store ended");
                return;
            },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Every few seconds: closes the sessions of front-ends that went silent (killed: their
/// clients are not connected any more), forgets old closes, deletes old relay rows, and keeps
/// the deny-list current.
async fn housekeeping(shared: Arc<Shared>, queue: Arc<RelayQueue>, sessions: SharedSessions) {
    let path = shared.config.tls.revoked.clone();
    let s2 = sessions.clone();
    tokio::spawn(crate::revocation::watch_deny_list(path, move |deny| {
        s2.lock().expect("lock").deny = Arc::new(deny.clone());
    }));
    let mut tick = 0u64;
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        tick += 1;
        if let Ok(silent) = queue.silent_frontends(SILENT_MS).await {
            let keys: Vec<(String, u64)> = sessions
                .lock()
                .expect("lock")
                .known
                .keys()
                .filter(|(f, _)| silent.contains(f))
                .cloned()
                .collect();
            for k in keys {
                close_session(&shared, &sessions, &k);
            }
        }
        {
            let cutoff = now_ms().saturating_sub(4 * RELAY_WAIT_MS);
            sessions
                .lock()
                .expect("lock")
                .closed
                .retain(|_, at| *at >= cutoff);
        }
        if tick.is_multiple_of(6) {
            if let Err(e) = queue.collect_garbage(3 * RELAY_WAIT_MS).await {
                warn!(error = %e, "deleting old relayed requests failed");
            }
        }
    }
}

/// Ends a relayed connection: closed for good (a late request of it is refused), and
/// disconnected in the round machine if the driver knew it.
fn close_session(shared: &Shared, sessions: &SharedSessions, key: &(String, u64)) {
    let gone = {
        let mut s = sessions.lock().expect("lock");
        s.closed.insert(key.clone(), now_ms());
        s.known.remove(key)
    };
    if let Some(k) = gone {
        unregister(shared, &k.client, k.conn_id);
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
async fn answer(shared: &Arc<Shared>, queue: &RelayQueue, sessions: &SharedSessions, w: Waiting) {
    let old = w.age_ms > RELAY_WAIT_MS;
    // the request's bytes count against the payload budget while it is handled
    let _bytes = crate::wire::acquire_bytes(&shared.budget, w.request.len() as u64).await;
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
    sessions: &SharedSessions,
    frontend: &str,
    req: RelayedRequest,
) -> Option<RelayedReply> {
    let key = (frontend.to_string(), req.conn);
    if let Relayed::Closed = req.what {
        close_session(shared, sessions, &key);
        return None;
    }
    let closing = |why: &str| {
        Some(RelayedReply {
            frame: refused(Refusal::new(RefusalCode::NotRegistered, why)),
            close: Some(why.to_string()),
        })
    };
    let leaf_fp = req.chain.first().map(|d| certs::fingerprint(d));
    let (known, deny) = {
        let s = sessions.lock().expect("lock");
        if s.closed.contains_key(&key) {
            return closing("this connection closed");
        }
        (s.known.get(&key).cloned(), s.deny.clone())
    };
    let (known, welcomed) = match known {
        // the same connection, the same certificate, not revoked since
        Some(k) => {
            if leaf_fp.as_deref() != Some(k.presented.fingerprint.as_str()) {
                warn!(%frontend, client = %k.client, "a relayed connection changed certificate");
                return closing("this connection's certificate changed");
            }
            let p = &k.presented;
            if certs::is_denied(&deny, &p.fingerprint, &k.client, &p.key_id) {
                close_session(shared, sessions, &key);
                return Some(RelayedReply {
                    frame: refused(Refusal::new(
                        RefusalCode::Revoked,
                        "this client certificate is revoked",
                    )),
                    close: Some("certificate revoked".into()),
                });
            }
            (k, None)
        }
        None => match admit(shared, frontend, &req) {
            Ok((k, w)) => {
                let mut s = sessions.lock().expect("lock");
                if s.closed.contains_key(&key) {
                    // closed while it was admitted
                    drop(s);
                    unregister(shared, &k.client, k.conn_id);
                    return closing("this connection closed");
                }
                s.known.insert(key, k.clone());
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
                false,
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
