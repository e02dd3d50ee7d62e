//! The protocol crate's one error type, grouped by cause.

use serde::{Deserialize, Serialize};

/// Errors of the pure protocol layer.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// An adapter spec is malformed (duplicate names, empty shapes).
    #[error("invalid adapter spec: {0}")]
    InvalidSpec(String),
    /// Two adapters (or an adapter and a peer) do not share a spec.
    #[error("adapter spec mismatch: expected {expected}, got {got}")]
    SpecMismatch {
        /// First 8 bytes of the expected spec hash, hex.
        expected: String,
        /// First 8 bytes of the received spec hash, hex.
        got: String,
    },
    /// A buffer holds the wrong number of values for its spec.
    #[error("adapter has {got} values, spec needs {expected}")]
    ShapeMismatch {
        /// Values the spec needs.
        expected: usize,
        /// Values received.
        got: usize,
    },
    /// An update encoding is malformed.
    #[error("codec: {0}")]
    Codec(String),
    /// A frame is malformed, truncated or of an unexpected kind.
    #[error("frame: {0}")]
    Frame(String),
    /// A frame (or one field of it) is larger than its limit allows.
    #[error("too large: {0}")]
    TooLarge(String),
    /// A decoded message holds a value outside its range: a non-finite float, a negative loss,
    /// a list or string over its bound.
    #[error("invalid value: {0}")]
    InvalidValue(String),
    /// A configuration value is invalid.
    #[error("invalid config: {0}")]
    Config(String),
    /// The peer sent something the protocol forbids; the refusal says what.
    #[error("{0}")]
    Refused(Refusal),
}

/// Why the coordinator (or a client) refused a message. Sent to the peer as is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RefusalCode {
    /// The peer speaks another protocol version.
    VersionMismatch,
    /// The peer's adapter spec hash differs.
    SpecMismatch,
    /// The client's certificate is on the deny-list.
    Revoked,
    /// The client sent a request before a successful hello.
    NotRegistered,
    /// The message names a round that is not the open one (a replay, or a late upload).
    WrongRound,
    /// The client is not a participant of the open round.
    NotSelected,
    /// A second, different upload for a (round, client) that already has one.
    DuplicateUpload,
    /// The frame or its contents could not be decoded.
    Malformed,
    /// The frame is larger than its kind allows.
    TooLarge,
    /// The upload's weight is not allowed by the round's weighting rule.
    BadWeight,
    /// The client declined the round (e.g. its privacy budget is spent).
    Declined,
    /// The coordinator failed internally (storage); the client should retry.
    Internal,
    /// A secure-aggregation stage message was refused (out of order, repeated, malformed).
    StageRefused,
    /// A field is outside its range (a non-finite float, a list or string over its bound).
    InvalidValue,
    /// The message is not allowed in this federation (a plain upload in a DP federation, a
    /// private upload without DP).
    WrongKind,
    /// A plaintext update's decoded L2 norm exceeds the federation's bound `B·(1 + τ)`
    /// (`max_update_norm`).
    UpdateNormExceeded,
    /// The coordinator does not offer this (a certificate renewal without an issuer).
    NotOffered,
    /// Async mode: the update's base version is more than `max_staleness` versions old.
    TooStale,
    /// Not now, but it will be taken: async mode is committing a version and the next buffer
    /// is not open yet. The client keeps the upload and sends it again after a pause.
    RetryLater,
}

impl RefusalCode {
    /// Whether a client should stop for good on this refusal of a request: the federation will
    /// not accept it however long it waits (revoked, another protocol version or adapter spec).
    /// Every other refusal of a poll is retried after a backoff.
    pub fn is_fatal(self) -> bool {
        matches!(
            self,
            Self::Revoked | Self::VersionMismatch | Self::SpecMismatch
        )
    }
}

impl ProtocolError {
    /// The refusal a peer gets for this error of one of its messages.
    pub fn refusal(&self) -> Refusal {
        let code = match self {
            Self::TooLarge(_) => RefusalCode::TooLarge,
            Self::InvalidValue(_) => RefusalCode::InvalidValue,
            Self::SpecMismatch { .. } => RefusalCode::SpecMismatch,
            Self::Refused(r) => return r.clone(),
            _ => RefusalCode::Malformed,
        };
        Refusal::new(code, self.to_string())
    }
}

/// A typed refusal with a human-readable reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// What kind of refusal.
    pub code: RefusalCode,
    /// Details for logs and users.
    pub message: String,
}

impl Refusal {
    /// A refusal of `code` with `message`.
    pub fn new(code: RefusalCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}
