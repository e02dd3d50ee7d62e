//! Several front-ends, one driver (with the PostgreSQL store).
//!
//! Every `fedlora coordinator --store postgres://…` process is a **front-end**: it terminates
//! QUIC and TLS for the clients that connect to it. Exactly one of them **drives** the round
//! machine at a time: the one holding the lease, a PostgreSQL session advisory lock
//! ([`crate::store::StateStore::try_lead`]), which the server releases when the holder's
//! connection ends (a killed process's, too). The driver is a whole coordinator
//! ([`crate::Coordinator`]) and serves its own clients directly; every other front-end
//! ([`frontend::FrontEnd`]) relays each request of its clients through the store to the driver
//! and the reply back ([`queue`]): hellos, polls, uploads, downloads, evaluation reports and
//! every secure-aggregation stage alike, so each is checked, persisted and answered by the one
//! round machine, exactly as if the client were connected to the driver. A relayed request
//! carries the client's certificate chain and its connection's hello, so a driver that takes
//! over after a failover knows the relayed clients without their reconnecting.
//!
//! A front-end without the lease waits for it on a blocking `pg_advisory_lock` (no polling);
//! when it gets it, it stops relaying (its clients reconnect) and starts driving, from the
//! state in the store.
//!
//! What stays single-leader: the round machine, aggregation and every decision of a round run
//! on the driver; the other front-ends add connection, TLS and transfer capacity, and a place
//! for clients to go when one front-end dies.

pub mod frontend;
pub mod queue;

use serde::{Deserialize, Serialize};

/// How long a front-end waits for the driver's reply to a relayed request, and how old a
/// request the driver still answers, milliseconds. Past it the front-end answers "retry" and
/// withdraws the request; its client sends it again (an upload that was stored meanwhile is
/// then acknowledged as already accepted).
pub const RELAY_WAIT_MS: u64 = 20_000;

/// A request a front-end relays to the driver.
#[derive(Debug, Serialize, Deserialize)]
pub struct RelayedRequest {
    /// The front-end's id for the client's connection.
    pub conn: u64,
    /// The certificates the client presented in its TLS handshake (DER, leaf first).
    pub chain: Vec<Vec<u8>>,
    /// The connection's hello (its frame): the driver checks it before anything else of a
    /// connection it does not know yet.
    pub hello: Vec<u8>,
    /// What happened.
    pub what: Relayed,
}

/// What a relayed request carries.
#[derive(Debug, Serialize, Deserialize)]
pub enum Relayed {
    /// The connection's hello itself.
    Hello,
    /// A request frame, and its size on the wire.
    Request {
        /// The frame.
        frame: Vec<u8>,
        /// Bytes on the wire.
        wire: u64,
    },
    /// The connection closed (no reply).
    Closed,
}

/// The driver's reply to a relayed request.
#[derive(Debug, Serialize, Deserialize)]
pub struct RelayedReply {
    /// The reply's frame, to send as it is.
    pub frame: Vec<u8>,
    /// Close the connection after the reply, with this reason (a refused hello).
    pub close: Option<String>,
}

/// bincode bytes of a relayed message.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).expect("relayed messages encode")
}

/// A relayed message from its bytes (`None`: not one).
pub fn decode<T: for<'a> Deserialize<'a>>(b: &[u8]) -> Option<T> {
    bincode::serde::decode_from_slice(b, bincode::config::standard())
        .ok()
        .map(|(v, _)| v)
}
