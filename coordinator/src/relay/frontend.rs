//! A front-end that does not drive: it serves QUIC and TLS for its clients and relays each of
//! their requests through the store to the driving front-end ([`super`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedlora_protocol::{ClientMsg, CoordMsg, Refusal, RefusalCode};
use quinn::SendStream;
use tokio::sync::{mpsc::UnboundedReceiver, oneshot};
use tracing::{error, info, warn};

use super::queue::{heartbeat_loop, new_id, reply_channel, Note, RelayQueue};
use super::{Relayed, RelayedReply, RelayedRequest, RELAY_WAIT_MS};
use crate::config::CoordinatorConfig;
use crate::error::Result;
use crate::revocation::{close_revoked, watch_deny_list, Conns};
use crate::wire::{read_hello, read_request, respond, ReadBudget, MAX_CONNECTIONS_PER_CLIENT};

struct Relay {
    id: String,
    queue: Arc<RelayQueue>,
    next_key: AtomicI64,
    /// Requests waiting for their reply, by key.
    pending: Mutex<BTreeMap<i64, oneshot::Sender<()>>>,
    metrics: Arc<crate::metrics::Metrics>,
    /// This front-end's connection ids: a counter, never reused.
    next_conn: AtomicU64,
    /// Open connections per client id (at most [`MAX_CONNECTIONS_PER_CLIENT`]; the
    /// deny-list closes them).
    conns: Conns,
    /// The federation's CA subject: which issuer signed a client.
    ca_subject: Vec<u8>,
    /// The federation as last read from the store (every [`VIEW_EVERY`]): who may send a
    /// payload now (`None`: not read yet).
    view: Mutex<Option<(bool, fedlora_protocol::FederationState)>>,
    /// Set when the relay's connection ended: this front-end can serve no one.
    lost: AtomicBool,
}

/// How often a front-end reads the federation's state from the store.
const VIEW_EVERY: Duration = Duration::from_millis(250);

impl Relay {
    /// Whether `client` may send a payload now, as the store last said (before its body is
    /// read, as the driver checks a direct client's). A front-end's view may lag the driver's
    /// by [`VIEW_EVERY`]: where it says no, the client is told to retry shortly.
    fn may_send_payload(&self, client: &str) -> std::result::Result<(), Refusal> {
        match &*self.view.lock().expect("lock") {
            Some((is_async, state)) => fedlora_protocol::may_send_payload(state, *is_async, client)
                .map_err(|r| {
                    Refusal::new(
                        RefusalCode::RetryLater,
                        format!(
                            "{} (as this front-end last saw it); retry shortly",
                            r.message
                        ),
                    )
                }),
            None => Err(Refusal::new(
                RefusalCode::RetryLater,
                "this front-end is starting; retry shortly",
            )),
        }
    }
}

impl Relay {
    /// The final global version, once the store says the federation is finished.
    fn finished(&self) -> Option<u64> {
        match &*self.view.lock().expect("lock") {
            Some((_, state)) if matches!(state.phase, fedlora_protocol::Phase::Finished { .. }) => {
                Some(state.global_version)
            }
            _ => None,
        }
    }
}

/// Keeps a front-end's view of the federation current.
async fn view_loop(relay: Arc<Relay>) {
    loop {
        match relay.queue.federation().await {
            Ok(Some((config, state))) => {
                let is_async = config.mode == fedlora_protocol::Mode::Async;
                *relay.view.lock().expect("lock") = Some((is_async, state));
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "reading the federation's state failed"),
        }
        tokio::time::sleep(VIEW_EVERY).await;
    }
}

impl Relay {
    /// Relays `req` and waits for the driver's reply (a refusal to retry when none comes).
    async fn call(&self, req: &RelayedRequest) -> RelayedReply {
        let retry = |m: &str| RelayedReply {
            frame: fedlora_protocol::frame::encode(&CoordMsg::Refused(Refusal::new(
                RefusalCode::Internal,
                m,
            )))
            .unwrap_or_default(),
            close: None,
        };
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = oneshot::channel();
        self.pending.lock().expect("lock").insert(key, tx);
        self.metrics.relayed("out");
        let bytes = super::encode(req);
        if let Err(e) = self.queue.submit(&self.id, key, &bytes).await {
            self.pending.lock().expect("lock").remove(&key);
            error!(error = %e, "relaying a request failed");
            return retry("the coordinator's store is unavailable; retry");
        }
        drop(bytes);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(RELAY_WAIT_MS);
        let mut woken = false;
        loop {
            // woken by the reply's notification; a look every second in case one was missed
            if woken {
                tokio::time::sleep(Duration::from_millis(200)).await;
            } else if tokio::time::timeout(Duration::from_secs(1), &mut rx)
                .await
                .is_ok()
            {
                woken = true;
            }
            match self.queue.take_reply(&self.id, key).await {
                Ok(Some(bytes)) => {
                    self.pending.lock().expect("lock").remove(&key);
                    return super::decode(&bytes)
                        .unwrap_or_else(|| retry("undecodable reply from the driver; retry"));
                }
                Ok(None) => {}
                Err(e) => warn!(error = %e, "reading a relayed reply failed"),
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        self.pending.lock().expect("lock").remove(&key);
        let _ = self.queue.withdraw(&self.id, key).await;
        retry("no coordinator drives the rounds right now (a failover?); retry")
    }

    /// Relays that connection `conn` closed (no reply).
    async fn closed(&self, conn: u64, chain: Vec<Vec<u8>>, hello: Vec<u8>) {
        let req = RelayedRequest {
            conn,
            chain,
            hello,
            what: Relayed::Closed,
        };
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let _ = self.queue.submit(&self.id, key, &super::encode(&req)).await;
    }
}

/// Wakes the requests whose replies were announced.
async fn reply_loop(relay: Arc<Relay>, mut notes: UnboundedReceiver<Note>) {
    while let Some((_, payload)) = notes.recv().await {
        if let Ok(key) = payload.parse::<i64>() {
            if let Some(tx) = relay.pending.lock().expect("lock").remove(&key) {
                let _ = tx.send(());
            }
        }
    }
    error!("the relay's connection ended; this front-end cannot serve its clients");
    relay.lost.store(true, Ordering::SeqCst);
}

/// A running front-end that relays to the driver.
pub struct FrontEnd {
    endpoint: quinn::Endpoint,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    id: String,
    relay: Arc<Relay>,
}

impl FrontEnd {
    /// Binds `config.listen` and relays every request of the clients that connect through the
    /// PostgreSQL store at `url`.
    pub async fn start(config: &CoordinatorConfig, url: &str) -> Result<Self> {
        let server_config =
            crate::tls::server_config(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
        let socket = crate::socket::bind_socket(config.listen, config.udp_recv_buffer)?;
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let metrics_listener = match config.metrics {
            Some(addr) => Some(crate::metrics::bind(addr)?),
            None => None,
        };
        let ca_subject = crate::certs::ca_subject(&config.tls.ca)?;
        let (queue, notes) = RelayQueue::connect(url).await?;
        let queue = Arc::new(queue);
        let id = new_id();
        queue.listen(&reply_channel(&id)).await?;
        let endpoint = crate::socket::serve_endpoint(server_config, socket)?;
        let listen = endpoint.local_addr()?;
        let relay = Arc::new(Relay {
            id: id.clone(),
            queue: queue.clone(),
            next_key: AtomicI64::new(1),
            pending: Mutex::new(BTreeMap::new()),
            metrics: metrics.clone(),
            next_conn: AtomicU64::new(1),
            conns: Mutex::new(BTreeMap::new()),
            ca_subject,
            view: Mutex::new(None),
            lost: AtomicBool::new(false),
        });
        let budget = ReadBudget::global(config.payload_budget);
        let revoked = {
            let relay = relay.clone();
            watch_deny_list(config.tls.revoked.clone(), move |deny| {
                if !deny.is_empty() {
                    close_revoked(&relay.conns, deny);
                }
            })
        };
        let mut tasks = vec![
            tokio::spawn(reply_loop(relay.clone(), notes)),
            tokio::spawn(view_loop(relay.clone())),
            tokio::spawn(revoked),
            tokio::spawn(heartbeat_loop(queue, id.clone(), listen.to_string(), false)),
            tokio::spawn(accept_loop(endpoint.clone(), relay.clone(), budget)),
        ];
        metrics.driving.set(0);
        if let Some(socket) = metrics_listener {
            let l = crate::metrics::listen(socket)?;
            tasks.push(tokio::spawn(crate::metrics::serve(l, metrics)));
        }
        info!(frontend = %id, addr = %listen, "front-end listening; relaying to the driving one");
        Ok(Self {
            endpoint,
            tasks,
            id,
            relay,
        })
    }

    /// Resolves when this front-end can no longer serve (its connection to the store ended):
    /// its process should stop, so its clients move to another front-end.
    pub async fn lost(&self) {
        while !self.relay.lost.load(Ordering::SeqCst) && self.relay.queue.healthy() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// This front-end's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Stops serving (its clients reconnect, here or to another front-end), and returns once
    /// its UDP port is free again (a front-end that takes over binds it next).
    pub async fn shutdown(self) {
        let addr = self.endpoint.local_addr().ok();
        self.endpoint.close(0u32.into(), b"front-end stopping");
        // every connection's task (and its streams' tasks) ends with the accept loop's
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        // the connections' handles (kept for the per-client cap and revocation) hold the
        // endpoint's socket too
        self.relay.conns.lock().expect("lock").clear();
        self.endpoint.wait_idle().await;
        drop(self.endpoint);
        drop(self.relay);
        // quinn's driver lets the socket go on its next turn
        if let Some(addr) = addr {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while std::net::UdpSocket::bind(addr).is_err() && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Accepts connections; each one's task lives in this loop's set, so aborting the loop ends
/// them all.
async fn accept_loop(
    endpoint: quinn::Endpoint,
    relay: Arc<Relay>,
    budget: Arc<tokio::sync::Semaphore>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
            // reap the tasks of closed connections
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (relay, budget) = (relay.clone(), budget.clone());
        conns.spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve(conn, relay, budget).await,
                Err(e) => warn!(%remote, error = %e, "handshake refused"),
            }
        });
    }
}

async fn send_frame(send: &mut SendStream, frame: &[u8]) {
    if send.write_all(frame).await.is_ok() {
        let _ = send.finish();
    }
}

/// Serves one connection: its hello, then each request, all relayed.
async fn serve(conn: quinn::Connection, relay: Arc<Relay>, budget: Arc<tokio::sync::Semaphore>) {
    let chain = crate::peer::presented_chain(&conn);
    let Some(client) = chain
        .first()
        .and_then(|leaf| crate::certs::client_identity(leaf, &relay.ca_subject).ok())
    else {
        conn.close(1u32.into(), b"unusable client certificate");
        return;
    };
    let id = relay.next_conn.fetch_add(1, Ordering::Relaxed);
    {
        // a client id holds a bounded number of connections: the oldest makes room
        let mut conns = relay.conns.lock().expect("lock");
        let mine = conns.entry(client.clone()).or_default();
        mine.push(conn.clone());
        while mine.len() > MAX_CONNECTIONS_PER_CLIENT {
            let old = mine.remove(0);
            old.close(3u32.into(), b"too many connections for this client");
        }
    }
    serve_registered(&conn, &relay, budget, &client, id, &chain).await;
    if let Some(mine) = relay.conns.lock().expect("lock").get_mut(&client) {
        mine.retain(|c| c.stable_id() != conn.stable_id());
    }
}

/// [`serve`] once the connection is counted under its client id.
async fn serve_registered(
    conn: &quinn::Connection,
    relay: &Arc<Relay>,
    budget: Arc<tokio::sync::Semaphore>,
    client: &str,
    id: u64,
    chain: &[Vec<u8>],
) {
    let chain = chain.to_vec();
    // the hello, relayed until the driver welcomes it
    let hello = loop {
        let Ok((mut send, mut recv)) = conn.accept_bi().await else {
            return;
        };
        let msg = match read_hello(&mut recv).await {
            Ok(r) => r.msg,
            Err(r) => {
                let _ = respond(&mut send, &CoordMsg::Refused(r.clone())).await;
                if r.code == RefusalCode::NotRegistered {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    conn.close(2u32.into(), b"hello first");
                    return;
                }
                continue;
            }
        };
        let hello = fedlora_protocol::frame::encode(&msg).unwrap_or_default();
        let reply = relay
            .call(&RelayedRequest {
                conn: id,
                chain: chain.clone(),
                hello: hello.clone(),
                what: Relayed::Hello,
            })
            .await;
        send_frame(&mut send, &reply.frame).await;
        if let Some(why) = reply.close {
            tokio::time::sleep(Duration::from_millis(50)).await;
            conn.close(2u32.into(), why.as_bytes());
            return;
        }
        if matches!(
            fedlora_protocol::frame::decode::<CoordMsg>(&reply.frame),
            Ok(CoordMsg::Welcome { .. })
        ) {
            break hello;
        }
    };
    let budget = ReadBudget::for_connection(budget, Some(conn.clone()));
    // the streams' tasks live in this set: they end with the connection's task
    let mut streams = tokio::task::JoinSet::new();
    loop {
        let (mut send, mut recv) = tokio::select! {
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => continue,
        };
        let (relay, budget, chain, hello, client) = (
            relay.clone(),
            budget.clone(),
            chain.clone(),
            hello.clone(),
            client.to_string(),
        );
        streams.spawn(async move {
            // a payload's body is read only from a client the store says may send one now
            let may = || relay.may_send_payload(&client);
            let req = match read_request(&mut recv, &budget, &may).await {
                Ok(r) => r,
                Err(r) => {
                    let _ = respond(&mut send, &CoordMsg::Refused(r)).await;
                    return;
                }
            };
            let (msg, wire, permit) = req.into_parts();
            // once the federation is over, a poll's answer is the same for everyone, and the
            // driver may be gone: this front-end gives it
            if let ClientMsg::Poll { .. } = msg {
                if let Some(version) = relay.finished() {
                    let done = CoordMsg::Task(fedlora_protocol::Task::Finished { version });
                    let _ = respond(&mut send, &done).await;
                    return;
                }
            }
            let frame = match fedlora_protocol::frame::encode::<ClientMsg>(&msg) {
                Ok(f) => f,
                Err(e) => {
                    let _ = respond(&mut send, &CoordMsg::Refused(e.refusal())).await;
                    return;
                }
            };
            drop(msg);
            let reply = relay
                .call(&RelayedRequest {
                    conn: id,
                    chain,
                    hello,
                    what: Relayed::Request { frame, wire },
                })
                .await;
            drop(permit);
            send_frame(&mut send, &reply.frame).await;
        });
    }
    relay.closed(id, chain, hello).await;
}
