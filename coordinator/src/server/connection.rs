//! Connections: accepting them, the hello (revocation, protocol version, adapter spec, the
//! client's largest rank), and serving each request stream.

use super::downlink::poll;
use super::requests::{
    decline, eval_report, eval_withheld, secure_receive, update_ready, upload, Received,
};
use super::*;
use crate::peer::{peer_cert, peer_chain};

pub(super) async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve_connection(conn, shared).await,
                Err(e) => warn!(%remote, error = %e, "handshake refused"),
            }
        });
    }
}

pub(super) async fn serve_connection(conn: quinn::Connection, shared: Arc<Shared>) {
    let remote = conn.remote_address();
    let Some(der) = peer_cert(&conn) else {
        warn!(%remote, "connection without a client certificate");
        conn.close(1u32.into(), b"client certificate required");
        return;
    };
    let (client, fingerprint, key_id, presented) = match identify(shared.as_ref(), &der) {
        Ok(id) => id,
        Err(e) => {
            warn!(%remote, error = %e, "unusable client certificate");
            conn.close(1u32.into(), b"unusable client certificate");
            return;
        }
    };
    let presented = Arc::new(presented);
    let conn_id = conn.stable_id();
    {
        // a client id holds a bounded number of connections: the oldest makes room
        let mut conns = shared.conns.lock().expect("lock");
        let mine = conns.entry(client.clone()).or_default();
        mine.push(conn.clone());
        while mine.len() > MAX_CONNECTIONS_PER_CLIENT {
            let old = mine.remove(0);
            old.close(3u32.into(), b"too many connections for this client");
        }
    }
    let budget = ReadBudget::for_connection(shared.budget.clone(), Some(conn.clone()));
    let mut registered = false;
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                info!(%client, reason = %e, "connection closed");
                break;
            }
        };
        if !registered {
            // the hello is handled inline: nothing else is served before it succeeds
            match handle_hello(&shared, &client, (&fingerprint, &key_id), send, recv).await {
                Ok(true) => {
                    registered = true;
                    let chain = peer_chain(&conn).unwrap_or_else(|| der.clone());
                    register(&shared, &client, chain, conn_id);
                }
                Ok(false) => {}
                Err(HelloEnd::Close(reason)) => {
                    conn.close(2u32.into(), reason.as_bytes());
                    break;
                }
            }
            continue;
        }
        let shared = shared.clone();
        let client = client.clone();
        let budget = budget.clone();
        let presented = presented.clone();
        tokio::spawn(async move {
            serve_stream(&shared, &client, &presented, &budget, send, recv).await
        });
    }
    if let Some(mine) = shared.conns.lock().expect("lock").get_mut(&client) {
        mine.retain(|c| c.stable_id() != conn_id);
    }
    unregister(&shared, &client, conn_id);
}

/// Registers `client`'s connection `conn_id` after its hello was welcomed: its certificate
/// chain (relayed for key signatures), its live connection, and connected in the round machine.
pub(super) fn register(shared: &Shared, client: &str, chain: Vec<u8>, conn_id: usize) {
    shared
        .certs
        .lock()
        .expect("lock")
        .insert(client.to_string(), chain);
    shared
        .live
        .lock()
        .expect("lock")
        .insert(client.to_string(), conn_id);
    let n = {
        let mut fed = shared.fed.lock().expect("lock");
        fed.connect(client);
        fed.connected().len()
    };
    shared.metrics.connected_clients.set(n as i64);
}

/// Ends `client`'s connection `conn_id`: disconnected in the round machine unless a later
/// connection of the client is live.
pub(super) fn unregister(shared: &Shared, client: &str, conn_id: usize) {
    let mut live = shared.live.lock().expect("lock");
    if live.get(client) == Some(&conn_id) {
        live.remove(client);
        shared.gate.forget(client);
        let mut fed = shared.fed.lock().expect("lock");
        fed.disconnect(client);
        shared
            .metrics
            .connected_clients
            .set(fed.connected().len() as i64);
    }
}

/// Who a client certificate (leaf, DER) names: its client id, SHA-256 fingerprint, key id
/// (revocation also goes by device id and by key, so a renewed certificate is revoked too),
/// and what a renewal on its connection is checked against.
pub(super) fn identify(
    shared: &Shared,
    der: &[u8],
) -> std::result::Result<(String, String, String, crate::enroll::Presented), String> {
    let client = certs::client_identity(der, &shared.ca_subject).map_err(|e| e.to_string())?;
    let fingerprint = certs::fingerprint(der);
    let (key_id, not_after) = crate::enroll::issuer::cert_key_and_name(der)
        .map(|(k, _, t)| (k, t))
        .unwrap_or_default();
    let presented = crate::enroll::Presented {
        device_id: client.clone(),
        fingerprint: fingerprint.clone(),
        key_id: key_id.clone(),
        not_after_unix_s: not_after,
    };
    Ok((client, fingerprint, key_id, presented))
}

/// Whether `client` is a participant of the open round: who may send payloads (uploads,
/// masked inputs, upload pieces).
fn selected_now(shared: &Shared, client: &str) -> std::result::Result<(), Refusal> {
    shared.fed.lock().expect("lock").may_upload(client)
}

/// Why an enrolled device's hello must be refused because its key is not the one its id is
/// bound to: a `device-…` id is bound to its key at its first hello, and a different key is
/// accepted only when this coordinator's own enrollment registry records it (a renewal issued
/// here). So an enrollment service that mints a certificate for another device's id (same name,
/// its own key) cannot take that device's place. `certs init` ids (`client-…`) are bound by the
/// CA alone. Store errors refuse nothing (logged): the certificate chain was checked already.
fn key_conflict(shared: &Shared, client: &str, key_id: &str) -> Option<String> {
    if !client.starts_with(certs::DEVICE_ID_PREFIX) {
        return None;
    }
    // the key this coordinator's own enrollment certified (at enrollment or renewal)
    let registered = || {
        shared
            .enrollment
            .as_ref()
            .and_then(|e| e.registry().device(client).ok().flatten())
            .map(|d| d.key_id)
            .filter(|k| !k.is_empty())
    };
    let bound = match shared.store.client(client) {
        Ok(Some(r)) if !r.key_id.is_empty() => r.key_id,
        // never seen: enrolled here, it must come with the key this coordinator certified
        Ok(_) => {
            return registered().filter(|k| k != key_id).map(|_| {
                format!(
                    "{client} was enrolled here for another key; a device gets a new key only \
                     by enrolling again"
                )
            })
        }
        Err(e) => {
            error!(%client, error = %e, "cannot read the client record");
            return None;
        }
    };
    if bound == key_id || registered().as_deref() == Some(key_id) {
        return None;
    }
    Some(format!(
        "{client} is bound to another key (key {}…); a device gets a new key only by renewing \
         at this coordinator",
        &bound[..16.min(bound.len())]
    ))
}

/// What a hello decides for `client` (whose certificate has this fingerprint and key): `None`
/// welcomes it, else the refusal and whether the connection closes. Records the client's
/// declared largest rank.
pub(super) fn check_hello(
    shared: &Shared,
    client: &str,
    (fingerprint, key_id): (&str, &str),
    msg: &ClientMsg,
) -> Option<(Refusal, bool)> {
    match *msg {
        ClientMsg::Hello {
            protocol_version,
            spec_hash,
            max_rank,
        } => {
            let mut ranks = shared.max_ranks.lock().expect("lock");
            match max_rank {
                Some(r) if (r as usize) < shared.full_rank => {
                    ranks.insert(client.to_string(), r.max(1));
                }
                _ => {
                    ranks.remove(client);
                }
            }
            drop(ranks);
            let deny = certs::load_deny_list(&shared.config.tls.revoked).unwrap_or_else(|e| {
                error!(error = %e, "cannot read the deny-list; refusing everyone");
                std::iter::once(fingerprint.to_string()).collect()
            });
            if certs::is_denied(&deny, fingerprint, client, key_id) {
                Some((
                    Refusal::new(RefusalCode::Revoked, "this client certificate is revoked"),
                    true,
                ))
            } else if protocol_version != PROTOCOL_VERSION {
                Some((
                    Refusal::new(
                        RefusalCode::VersionMismatch,
                        format!(
                            "coordinator speaks protocol {PROTOCOL_VERSION}, client {protocol_version}"
                        ),
                    ),
                    true,
                ))
            } else if let Some(why) = key_conflict(shared, client, key_id) {
                Some((Refusal::new(RefusalCode::Revoked, why), true))
            } else if spec_hash != shared.spec.hash() {
                Some((
                    Refusal::new(
                        RefusalCode::SpecMismatch,
                        format!(
                            "the federation's adapter is {}{}, this client's is {}",
                            shared.spec.short_hash(),
                            shared
                                .config
                                .adapter_description
                                .as_deref()
                                .map_or(String::new(), |d| format!(" ({d})")),
                            hex::encode(&spec_hash[..8])
                        ),
                    ),
                    true,
                ))
            } else {
                None
            }
        }
        _ => Some((
            Refusal::new(RefusalCode::NotRegistered, "send a hello first"),
            false,
        )),
    }
}

/// Records a welcomed client and says welcome.
pub(super) fn welcome(
    shared: &Shared,
    client: &str,
    (fingerprint, key_id): (&str, &str),
) -> CoordMsg {
    if let Err(e) = shared
        .store
        .saw_client(client, fingerprint, key_id, now_ms())
    {
        error!(error = %e, "recording client");
    }
    info!(%client, "client registered");
    CoordMsg::Welcome {
        client_id: client.to_string(),
        protocol_version: PROTOCOL_VERSION,
    }
}

pub(super) enum HelloEnd {
    Close(String),
}

pub(super) async fn handle_hello(
    shared: &Shared,
    client: &str,
    (fingerprint, key_id): (&str, &str),
    mut send: SendStream,
    mut recv: RecvStream,
) -> std::result::Result<bool, HelloEnd> {
    // before the hello, only a hello is read: another kind of frame is refused from its header
    // (no body read, no payload budget drawn) and ends the connection
    let msg = match crate::wire::read_hello(&mut recv).await {
        Ok(r) => r.msg,
        Err(r) => {
            shared.metrics.refused(r.code);
            let _ = respond(&mut send, &CoordMsg::Refused(r.clone())).await;
            if r.code == RefusalCode::NotRegistered {
                warn!(%client, reason = %r.message, "request before the hello; closing");
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Err(HelloEnd::Close("hello first".into()));
            }
            return Ok(false);
        }
    };
    let refusal = check_hello(shared, client, (fingerprint, key_id), &msg);
    match refusal {
        Some((r, close)) => {
            warn!(%client, code = ?r.code, reason = %r.message, "hello refused");
            shared.metrics.refused(r.code);
            let _ = respond(&mut send, &CoordMsg::Refused(r.clone())).await;
            if close {
                // give the refusal time to reach the peer before closing
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(HelloEnd::Close(format!("{:?}", r.code)))
            } else {
                Ok(false)
            }
        }
        None => {
            let _ = respond(&mut send, &welcome(shared, client, (fingerprint, key_id))).await;
            Ok(true)
        }
    }
}

pub(super) async fn serve_stream(
    shared: &Arc<Shared>,
    client: &str,
    presented: &crate::enroll::Presented,
    budget: &ReadBudget,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let may_send_payload = || selected_now(shared, client);
    let req = match read_request(&mut recv, budget, &may_send_payload).await {
        Ok(r) => r,
        Err(r) => {
            warn!(%client, code = ?r.code, reason = %r.message, "bad frame");
            shared.metrics.refused(r.code);
            let _ = respond(&mut send, &CoordMsg::Refused(r)).await;
            return;
        }
    };
    let (msg, wire, body_permit) = req.into_parts();
    let (reply, round_down, download) =
        dispatch(shared, client, presented, msg, wire, body_permit, true).await;
    note_refusal(shared, client, &reply);
    let sent = respond(&mut send, &reply).await;
    drop(reply);
    if download.is_some() {
        // held until the client acknowledged the piece (or a while, for a silent one)
        let _ = tokio::time::timeout(Duration::from_secs(30), send.stopped()).await;
        drop(download);
    }
    if let Ok(n) = sent {
        count_sent(shared, client, round_down, n);
    }
}

/// Counts a refusal in the metrics (and logs it, but for malformed frames).
pub(super) fn note_refusal(shared: &Shared, client: &str, reply: &CoordMsg) {
    if let CoordMsg::Refused(r) = reply {
        shared.metrics.refused(r.code);
        if r.code != RefusalCode::Malformed {
            warn!(%client, code = ?r.code, reason = %r.message, "request refused");
        }
    }
}

/// Counts `n` bytes sent to `client`, in `round`'s bytes down when it is one.
pub(super) fn count_sent(shared: &Shared, client: &str, round: Option<u64>, n: u64) {
    shared.metrics.bytes_down.inc_by(n);
    if let Some(round) = round {
        *shared
            .bytes_down
            .lock()
            .expect("lock")
            .entry((round, client.to_string()))
            .or_default() += n;
    }
}

/// Answers one request of a registered client: the reply, the round whose bytes down it
/// counts in, and the download budget it holds until the client has the bytes. With
/// `hold_polls`, a poll answered "wait" is held until its answer may change
/// ([`super::downlink::held_poll`]); relayed requests are not held (each holds a place in the
/// store's queue).
pub(super) async fn dispatch(
    shared: &Arc<Shared>,
    client: &str,
    presented: &crate::enroll::Presented,
    msg: ClientMsg,
    wire: u64,
    body_permit: crate::wire::BodyPermit,
    hold_polls: bool,
) -> (
    CoordMsg,
    Option<u64>,
    Option<tokio::sync::OwnedSemaphorePermit>,
) {
    shared.metrics.bytes_up.inc_by(wire);
    let mut download = None;
    let (reply, round_down) = match msg {
        ClientMsg::Hello { .. } => (
            CoordMsg::Refused(Refusal::new(
                RefusalCode::Malformed,
                "hello already done on this connection",
            )),
            None,
        ),
        ClientMsg::Poll { held_version } if hold_polls => {
            super::downlink::held_poll(shared, client, held_version).await
        }
        ClientMsg::Poll { held_version } => poll(shared, client, held_version),
        m @ (ClientMsg::Upload(_) | ClientMsg::PrivateUpload(_)) => {
            (handle_upload(shared, client, m, wire).await, None)
        }
        ClientMsg::UploadChunk(c) => (upload_piece(shared, client, c, body_permit).await, None),
        ClientMsg::FetchGlobal {
            version,
            offset,
            max_len,
        } => {
            // the piece's bytes count against the download budget until the client has
            // acknowledged them (below, after the answer)
            let len = {
                let g = shared.global.lock().expect("lock");
                (max_len as usize).min(g.encoded.len())
            }
            .min(crate::wire::DOWNLOAD_BUDGET);
            download = crate::wire::acquire_bytes(&shared.downloads, len as u64).await;
            // the pieces of an offer's global adapter count in that round's bytes down
            let round = match &shared.fed.lock().expect("lock").state().phase {
                fedlora_protocol::Phase::Training(open) if open.base_version == version => {
                    Some(open.round)
                }
                _ => None,
            };
            (
                super::downlink::global_piece(shared, version, offset, max_len),
                round,
            )
        }
        ClientMsg::EvalReport(r) => (eval_report(shared, client, r).await, None),
        ClientMsg::EvalWithheld { version } => (eval_withheld(shared, client, version), None),
        ClientMsg::Decline { round, reason } => (decline(shared, client, round, reason), None),
        ClientMsg::UpdateReady { round } => (update_ready(shared, client, round), None),
        ClientMsg::SecAgg { round, body } => {
            (secure_receive(shared, client, round, body, wire), None)
        }
        ClientMsg::Renew { csr_der } => (renew(shared, presented, csr_der).await, None),
    };
    (reply, round_down, download)
}

/// A renewed certificate for the device whose connection presented `presented`, or why not.
async fn renew(
    shared: &Shared,
    presented: &crate::enroll::Presented,
    csr_der: Vec<u8>,
) -> CoordMsg {
    use fedlora_protocol::enroll::EnrollErrorCode;
    let Some(e) = shared.enrollment.clone() else {
        return CoordMsg::Refused(Refusal::new(
            RefusalCode::NotOffered,
            "this coordinator issues no certificates (start it with enrollment)",
        ));
    };
    let presented = presented.clone();
    let now = now_ms() / 1000;
    match tokio::task::spawn_blocking(move || e.renew(&presented, &csr_der, now)).await {
        Ok(Ok(cert)) => CoordMsg::Renewed(cert),
        Ok(Err((code, message))) => {
            let code = match code {
                EnrollErrorCode::Revoked => RefusalCode::Revoked,
                EnrollErrorCode::Internal => RefusalCode::Internal,
                _ => RefusalCode::InvalidValue,
            };
            CoordMsg::Refused(Refusal::new(code, message))
        }
        Err(_) => CoordMsg::Refused(Refusal::new(RefusalCode::Internal, "retry")),
    }
}

/// An upload or a private upload (whole, or assembled from resumable pieces).
async fn handle_upload(shared: &Arc<Shared>, client: &str, msg: ClientMsg, wire: u64) -> CoordMsg {
    match msg {
        ClientMsg::Upload(u) => {
            let got = Received {
                round: u.round,
                spec_hash: u.spec_hash,
                weight: u.weight,
                train_loss: Some(u.train_loss),
                private: false,
                wire_bytes: wire,
            };
            upload(shared, client, got, u.payload).await
        }
        ClientMsg::PrivateUpload(u) => {
            let got = Received {
                round: u.round,
                spec_hash: u.spec_hash,
                weight: 1.0,
                train_loss: u.noised_train_loss,
                private: true,
                wire_bytes: wire,
            };
            upload(shared, client, got, u.payload).await
        }
        other => CoordMsg::Refused(Refusal::new(
            RefusalCode::WrongKind,
            format!(
                "a resumable upload must hold an upload, not {:?}",
                fedlora_protocol::frame::FrameMessage::kind(&other)
            ),
        )),
    }
}

/// One piece of a resumable upload: appended to its file before it is acknowledged; the piece
/// that completes it gives its read budget back (its bytes are on disk), then reserves the whole
/// upload's length, and the upload is read back, checked against its hash, decoded and taken
/// as one upload. Giving the piece's share back first means no piece holds budget while it
/// waits for more, so pieces cannot deadlock the budget among themselves.
async fn upload_piece(
    shared: &Arc<Shared>,
    client: &str,
    chunk: fedlora_protocol::resumable::UploadChunk,
    body_permit: crate::wire::BodyPermit,
) -> CoordMsg {
    use crate::partial::{Appended, PieceOutcome};
    // only a participant of the open round parks pieces on disk: at most clients_per_round ×
    // the payload limit of partial uploads, whoever else is registered
    if let Err(r) = selected_now(shared, client) {
        return CoordMsg::Refused(r);
    }
    let (id, total_len) = (chunk.upload_id, chunk.total_len);
    let appended = {
        let partial = shared.partial.clone();
        let who = client.to_string();
        super::blocking(shared, move || partial.append(&who, &chunk, now_ms())).await
    };
    match appended {
        Ok(Ok(Appended::Progress(have))) => {
            return CoordMsg::UploadProgress {
                upload_id: id,
                have,
            }
        }
        Ok(Ok(Appended::Complete)) => {}
        Ok(Err(e)) => {
            error!(error = %e, "storing an upload piece failed");
            return CoordMsg::Refused(Refusal::new(RefusalCode::Internal, "retry"));
        }
        Err(e) => {
            error!(error = %e, "storing an upload piece failed");
            return CoordMsg::Refused(Refusal::new(RefusalCode::Internal, "retry"));
        }
    }
    drop(body_permit);
    // the assembled frame is read into memory: it draws on the payload budget like a whole
    // upload does
    let _permit = match crate::wire::reserve_bytes(&shared.budget, total_len).await {
        Ok(p) => p,
        Err(r) => return CoordMsg::Refused(r),
    };
    let applied = {
        let partial = shared.partial.clone();
        let who = client.to_string();
        super::blocking(shared, move || partial.take(&who, &id)).await
    };
    match applied {
        Ok(Ok(PieceOutcome::Progress(have))) => CoordMsg::UploadProgress {
            upload_id: id,
            have,
        },
        Ok(Ok(PieceOutcome::HashMismatch)) => CoordMsg::Refused(Refusal::new(
            RefusalCode::InvalidValue,
            "the assembled upload does not match its hash; send it again",
        )),
        Ok(Ok(PieceOutcome::Complete(frame))) => {
            let (decoded, len) = (
                fedlora_protocol::frame::decode::<ClientMsg>(&frame),
                frame.len() as u64,
            );
            // the frame is let go before its upload is handled: one copy of the payload
            drop(frame);
            match decoded {
                Ok(m) => handle_upload(shared, client, m, len).await,
                Err(e) => CoordMsg::Refused(e.refusal()),
            }
        }
        Ok(Err(e)) => {
            error!(%client, error = %e, "storing an upload piece failed");
            CoordMsg::Refused(Refusal::new(RefusalCode::Internal, "retry"))
        }
        Err(_) => CoordMsg::Refused(Refusal::new(RefusalCode::Internal, "retry")),
    }
}
