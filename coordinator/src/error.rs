//! The coordinator crate's one error type, grouped by cause.

use fedlora_protocol::ProtocolError;

/// Errors of the coordinator service.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordinatorError {
    /// A protocol-level problem (bad config, spec mismatch, bad encoding).
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The state store failed or holds inconsistent data.
    #[error("storage: {0}")]
    Storage(String),
    /// The data directory's store is held by another process (a running coordinator).
    #[error("{} is in use by another process (a running coordinator?)", .0.display())]
    Locked(std::path::PathBuf),
    /// Certificates or TLS setup failed.
    #[error("tls: {0}")]
    Tls(String),
    /// A configuration value is invalid.
    #[error("config: {0}")]
    Config(String),
    /// Network I/O failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A round's aggregate, or the global adapter it would make, holds a value that is not a
    /// finite number (an overflow): the round fails with this reason and is never committed.
    #[error("not finite: {0}")]
    NotFinite(String),
}

impl From<sled::Error> for CoordinatorError {
    fn from(e: sled::Error) -> Self {
        CoordinatorError::Storage(e.to_string())
    }
}

/// Result alias of this crate.
pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;
