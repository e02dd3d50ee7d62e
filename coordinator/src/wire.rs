//! Reading requests and writing answers on QUIC streams, within fixed memory limits.
//!
//! # Memory bound
//! What one peer can make the coordinator hold is bounded by construction:
//! - quinn buffers at most [`IDLE_RECEIVE_WINDOW`] of unread data per connection, raised to
//!   that plus a payload body's length (at most [`CONNECTION_RECEIVE_WINDOW`]) only while
//!   that body, whose length is reserved in the budget, is read; and at most [`SEND_WINDOW`]
//!   of unacknowledged answers per connection, on at most [`MAX_STREAMS_PER_CONNECTION`]
//!   concurrent request streams;
//! - a client id holds at most [`MAX_CONNECTIONS_PER_CLIENT`] connections (the oldest is closed);
//! - a request body is read incrementally: control frames (≤ [`CONTROL_LIMIT`]) as they
//!   arrive, payload frames (uploads, secure-aggregation messages) only after reserving their
//!   declared length from a global budget of [`PAYLOAD_BUDGET`] bytes, one payload at a time per
//!   connection.
//!
//! # Backpressure
//! A payload waits for its share of the budget for as long as its connection lives, never
//! refused as busy: until it is granted, its bytes stay in QUIC flow control **on the client**
//! (the coordinator has opened only [`IDLE_RECEIVE_WINDOW`] of credit), so a client sends an
//! upload once however long it waits.
//!
//! So, with `C` open connections,
//! `RSS ≲ base + PAYLOAD_BUDGET + C · (IDLE_RECEIVE_WINDOW + SEND_WINDOW +
//! MAX_STREAMS_PER_CONNECTION · CONTROL_LIMIT)` (a body being read is in quinn's buffers or in
//! its reserved buffer, and the window above the idle one is its reserved length), where `base` is the process, the federation
//! state and a few copies of the global adapter (≈ 4 × its dense f32 size during aggregation),
//! plus one copy per client under the f16-delta downlink (each client's reconstruction).

use std::sync::Arc;
use std::time::Duration;

use fedlora_protocol::frame::{self, CONTROL_LIMIT, HEADER_LEN};
use fedlora_protocol::{ClientMsg, CoordMsg, Refusal, RefusalCode};
use quinn::{RecvStream, SendStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::error;

/// How long a peer may take to send one request frame, seconds.
pub const REQUEST_TIMEOUT_S: u64 = 30;
/// Concurrent bidirectional request streams a client may open on one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 4;
/// Flow-control window of one stream, bytes.
pub const STREAM_RECEIVE_WINDOW: u32 = 1024 * 1024;
/// Flow-control window of one connection (all its streams) while it sends a payload body whose
/// length is reserved in the budget, bytes.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 2 * 1024 * 1024;
/// Flow-control window of one connection otherwise, bytes: what a waiting upload can have sent
/// before the coordinator reads it.
pub const IDLE_RECEIVE_WINDOW: u32 = 16 * 1024;
/// Unacknowledged bytes the coordinator sends on one connection.
pub const SEND_WINDOW: u64 = 4 * 1024 * 1024;
/// Connections one client id may hold open at once (a reconnecting device's new connection
/// replaces its oldest).
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 2;
/// Bytes of payload-frame bodies being read at once, over all connections.
pub const PAYLOAD_BUDGET: usize = 128 * 1024 * 1024;
/// Bytes of global-adapter pieces sent and not yet acknowledged by their clients, over all
/// connections: when a round opens, every participant fetches the global at once, and each
/// piece would otherwise sit in quinn's send buffer until its client acknowledges it.
pub const DOWNLOAD_BUDGET: usize = 32 * 1024 * 1024;

/// The quinn limits above, plus idle timeout and keep-alive.
pub fn apply_limits(t: &mut quinn::TransportConfig) {
    t.max_concurrent_bidi_streams(MAX_STREAMS_PER_CONNECTION.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window(STREAM_RECEIVE_WINDOW.into());
    t.receive_window(IDLE_RECEIVE_WINDOW.into());
    t.send_window(SEND_WINDOW);
}

/// The global budget for payload bodies, each connection's one-at-a-time gate, and the
/// connection whose flow-control window opens while a body is read.
#[derive(Clone)]
pub struct ReadBudget {
    global: Arc<Semaphore>,
    connection: Arc<Semaphore>,
    conn: Option<quinn::Connection>,
}

impl ReadBudget {
    /// A budget of `bytes` shared by every connection of a coordinator.
    pub fn global(bytes: usize) -> Arc<Semaphore> {
        Arc::new(Semaphore::new((bytes / 1024).min(Semaphore::MAX_PERMITS)))
    }

    /// One connection's view of the global budget (`conn`: whose window to open while a body
    /// is read; `None` leaves the window as it is).
    pub fn for_connection(global: Arc<Semaphore>, conn: Option<quinn::Connection>) -> Self {
        Self {
            global,
            connection: Arc::new(Semaphore::new(1)),
            conn,
        }
    }

    fn open_window(&self, len: usize) {
        if let Some(c) = &self.conn {
            let w = (IDLE_RECEIVE_WINDOW as usize + len).min(CONNECTION_RECEIVE_WINDOW as usize);
            c.set_receive_window(quinn::VarInt::from_u32(w as u32));
        }
    }

    fn close_window(&self) {
        if let Some(c) = &self.conn {
            c.set_receive_window(IDLE_RECEIVE_WINDOW.into());
        }
    }
}

/// A request as read: the message and the bytes its frame took on the wire.
pub struct Request {
    /// The decoded, range-checked message.
    pub msg: ClientMsg,
    /// Header plus body, bytes.
    pub wire_bytes: u64,
    /// A payload body's share of the budget, held until the request is dropped: the decoded
    /// message (a copy of the body) and its handling stay inside the budget too.
    _permits: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

/// A payload body's share of the read budget, taken out of its [`Request`]: the budget is
/// given back when it is dropped.
pub struct BodyPermit(#[allow(dead_code)] Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>);

impl BodyPermit {
    /// No share of the budget (a request whose body was read elsewhere, e.g. by another
    /// front-end that relayed it).
    pub(crate) fn none() -> Self {
        Self(None)
    }
}

impl Request {
    /// The message, its wire size and its share of the budget, to be let go separately (an
    /// upload piece gives its share back once it is on disk, before its upload is assembled).
    pub fn into_parts(self) -> (ClientMsg, u64, BodyPermit) {
        (self.msg, self.wire_bytes, BodyPermit(self._permits))
    }
}

fn malformed(m: String) -> Refusal {
    Refusal::new(RefusalCode::Malformed, m)
}

/// Reads one request frame: header, then the body incrementally (payload bodies within the
/// budget), then decodes and range-checks it. Refusals say what was wrong.
///
/// `may_send_payload` is asked before a payload body reserves any budget: a peer that may not
/// send one now (not a participant of the open round) is refused from the header, so it cannot
/// hold the budget by declaring large bodies and trickling them.
pub async fn read_request(
    recv: &mut RecvStream,
    budget: &ReadBudget,
    may_send_payload: &(dyn Fn() -> Result<(), Refusal> + Sync),
) -> Result<Request, Refusal> {
    let (kind, len) = read_header(recv).await?;
    if !kind.from_client() {
        return Err(malformed(format!("{kind:?} is not a client message")));
    }
    // payload bodies wait for their share of the budget (as long as it takes: the body waits
    // in flow control on the client meanwhile); control bodies are small
    if len <= CONTROL_LIMIT {
        return read_message(recv, kind, len).await;
    }
    may_send_payload()?;
    let c = budget
        .connection
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| busy())?;
    let g = acquire_bytes(&budget.global, len as u64)
        .await
        .ok_or_else(busy)?;
    budget.open_window(len);
    let read = read_message(recv, kind, len).await;
    budget.close_window();
    let mut req = read?;
    req._permits = Some((c, g));
    Ok(req)
}

/// Reads the first request of a connection, which must be a hello: the header is checked
/// before any body byte is read, and a frame of any other kind is refused (`NotRegistered`)
/// without reading its body or drawing on the payload budget, so a peer that has not said hello
/// holds no more than one header's worth of the coordinator's memory.
pub async fn read_hello(recv: &mut RecvStream) -> Result<Request, Refusal> {
    let (kind, len) = read_header(recv).await?;
    if kind != frame::FrameKind::Hello {
        return Err(Refusal::new(
            RefusalCode::NotRegistered,
            format!("the first request of a connection must be a hello, not {kind:?}"),
        ));
    }
    // a hello is a control frame: `parse_header` bounds its length by the control limit
    read_message(recv, kind, len).await
}

fn request_timeout() -> Duration {
    Duration::from_secs(REQUEST_TIMEOUT_S)
}

fn busy() -> Refusal {
    Refusal::new(RefusalCode::Internal, "coordinator busy; retry")
}

/// `len` bytes of the global payload budget (a permit per KiB), when they come.
pub(crate) async fn acquire_bytes(
    global: &Arc<Semaphore>,
    len: u64,
) -> Option<OwnedSemaphorePermit> {
    let kib = u32::try_from(len.div_ceil(1024)).unwrap_or(u32::MAX);
    global.clone().acquire_many_owned(kib).await.ok()
}

/// Reserves `len` bytes of the global payload budget for work outside a frame read (a
/// resumable upload's assembled frame), waiting as long as it takes (the client waits for
/// the answer; nothing is sent again).
pub(crate) async fn reserve_bytes(
    global: &Arc<Semaphore>,
    len: u64,
) -> Result<OwnedSemaphorePermit, Refusal> {
    acquire_bytes(global, len).await.ok_or_else(busy)
}

/// Reads and parses a frame header (kind and body length, bounded by the kind's limit).
async fn read_header(recv: &mut RecvStream) -> Result<(frame::FrameKind, usize), Refusal> {
    let mut header = [0u8; HEADER_LEN];
    match tokio::time::timeout(request_timeout(), recv.read_exact(&mut header)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(malformed(format!("truncated frame header: {e}"))),
        Err(_) => return Err(malformed("timed out reading the frame header".into())),
    }
    frame::parse_header(&header).map_err(|e| e.refusal())
}

/// The slowest a body may arrive on average, bytes per second, beyond [`REQUEST_TIMEOUT_S`]: a
/// body of `len` bytes has at most `REQUEST_TIMEOUT_S + len / MIN_BODY_RATE` seconds in all, and
/// at most [`REQUEST_TIMEOUT_S`] without a byte. A loaded coordinator's peers can be slow (a lost
/// datagram backs a connection off), and a body cut short is a body sent again; a peer slower
/// than this holds its reservation no longer (the largest body, 64 MiB, at most 30 s + 68 min).
pub const MIN_BODY_RATE: u64 = 16 * 1024;

/// Reads a `len`-byte body of a frame of `kind`, then decodes and range-checks the message.
async fn read_message(
    recv: &mut RecvStream,
    kind: frame::FrameKind,
    len: usize,
) -> Result<Request, Refusal> {
    let limit = request_timeout() + Duration::from_secs(len as u64 / MIN_BODY_RATE);
    let body = tokio::time::timeout(limit, read_body(recv, len))
        .await
        .map_err(|_| malformed("timed out reading the frame body".into()))??;
    let msg = frame::decode_body::<ClientMsg>(kind, &body).map_err(|e| e.refusal())?;
    Ok(Request {
        msg,
        wire_bytes: (HEADER_LEN + len) as u64,
        _permits: None,
    })
}

/// Reads exactly `len` bytes into one buffer of that capacity. Its pages are touched only as
/// data arrives, and a payload body's `len` is already reserved in the budget, so the buffer
/// never grows by doubling (which held up to twice a body during each reallocation and broke
/// the memory bound: `tests/memory_bound.rs` measured 551 MiB against a 472 MiB bound).
async fn read_body(recv: &mut RecvStream, len: usize) -> Result<Vec<u8>, Refusal> {
    let mut body = Vec::with_capacity(len);
    while body.len() < len {
        let chunk =
            tokio::time::timeout(request_timeout(), recv.read_chunk(len - body.len(), true))
                .await
                .map_err(|_| malformed("no byte of the frame body for 30 s".into()))?;
        match chunk {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(malformed(format!(
                    "truncated frame body: {} of {len} bytes",
                    body.len()
                )))
            }
            Err(e) => return Err(malformed(format!("truncated frame body: {e}"))),
        }
    }
    Ok(body)
}

/// Writes one answer frame and finishes the stream; returns the frame's size. An answer that
/// cannot be encoded becomes an `Internal` refusal.
pub async fn respond(send: &mut SendStream, msg: &CoordMsg) -> Result<u64, ()> {
    let bytes = match frame::encode(msg) {
        Ok(b) => b,
        Err(e) => {
            error!(error = %e, "cannot encode a response");
            frame::encode(&CoordMsg::Refused(Refusal::new(
                RefusalCode::Internal,
                "response too large",
            )))
            .map_err(|_| ())?
        }
    };
    send.write_all(&bytes).await.map_err(|_| ())?;
    send.finish().map_err(|_| ())?;
    Ok(bytes.len() as u64)
}
