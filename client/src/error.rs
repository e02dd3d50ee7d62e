//! The client crate's one error type, grouped by cause.

use fedlora_protocol::{ProtocolError, Refusal};

/// Errors of the client SDK.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The enrollment service refused the request (nothing was issued).
    #[error("enrollment refused ({0:?}): {1}")]
    Enroll(fedlora_protocol::enroll::EnrollErrorCode, String),
    /// A protocol-level problem (spec mismatch, bad encoding, bad frame).
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The coordinator refused a request.
    #[error("the coordinator refused: {0}")]
    Refused(Refusal),
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
    /// Network failure (unreachable, timed out, connection lost); the SDK retries these with
    /// backoff.
    #[error("transport: {0}")]
    Transport(String),
    /// A TLS failure that waiting cannot heal: the coordinator's certificate is not from the
    /// configured CA or does not name the server, or the coordinator refused this client's
    /// certificate. The SDK stops on it unless told to retry forever.
    #[error("tls: {0}")]
    Tls(String),
    /// Local state storage failed.
    #[error("storage: {0}")]
    Storage(String),
    /// File I/O failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// The training engine's errors keep their kind (and their message) in the SDK.
impl From<fedlora_train::TrainError> for ClientError {
    fn from(e: fedlora_train::TrainError) -> Self {
        use fedlora_train::TrainError as T;
        match e {
            T::Protocol(e) => Self::Protocol(e),
            T::Model(m) => Self::Model(m),
            T::ModelFile(m) => Self::ModelFile(m),
            T::Unsupported(m) => Self::Unsupported(m),
            T::Data(m) => Self::Data(m),
            T::Config(m) => Self::Config(m),
            T::Storage(m) => Self::Storage(m),
            T::Io(e) => Self::Io(e),
            // `TrainError` is non-exhaustive: a kind added later still reads as a model error
            other => Self::Model(other.to_string()),
        }
    }
}
