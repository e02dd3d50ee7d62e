//! The training engine's one error type, grouped by cause.

use fedlora_protocol::ProtocolError;

/// Errors of the training engine: models, adapters, data and local training.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// A protocol-level problem (adapter spec mismatch, bad encoding).
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A model or adapter does not fit (missing tensor, wrong shape).
    #[error("model: {0}")]
    Model(String),
    /// A model file that cannot be read: truncated, corrupt, or missing a tensor or a setting
    /// the format requires. Names the file and what is wrong.
    #[error("model file: {0}")]
    ModelFile(String),
    /// A model this version cannot run: an architecture, tensor type, pre-tokenizer or
    /// setting it does not implement. Names what is missing and what is supported.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// Training data is unusable (too short for one window, unreadable).
    #[error("data: {0}")]
    Data(String),
    /// A configuration value is invalid.
    #[error("config: {0}")]
    Config(String),
    /// Writing or reading a model, adapter or tokenizer directory failed.
    #[error("storage: {0}")]
    Storage(String),
    /// File I/O failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
