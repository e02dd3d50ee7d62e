//! The simulation crate's one error type.

/// Errors of the simulation harness.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The sweep file or a sweep point is invalid.
    #[error("config: {0}")]
    Config(String),
    /// Task data is unusable.
    #[error("data: {0}")]
    Data(String),
    /// A client-side failure (model, training, DP).
    #[error(transparent)]
    Client(#[from] fedlora_client::ClientError),
    /// The training engine failed (model, adapter, data).
    #[error(transparent)]
    Train(#[from] fedlora_train::TrainError),
    /// A protocol failure (codec, round machine, secure aggregation).
    #[error(transparent)]
    Protocol(#[from] fedlora_protocol::ProtocolError),
    /// A coordinator failure (aggregation, QUIC server).
    #[error(transparent)]
    Coordinator(#[from] fedlora_coordinator::CoordinatorError),
    /// Secure aggregation failed.
    #[error("secure aggregation: {0}")]
    SecAgg(String),
    /// Writing results or plots failed.
    #[error("output: {0}")]
    Output(String),
    /// An audited model ended no better than it started: its canary scores measure noise, so
    /// the audit is not a result.
    #[error(
        "audit: the audited model did not train (held-out loss {initial:.4} at the start, \
         {final_loss:.4} at the end); lower the learning rate or the noise"
    )]
    AuditDidNotTrain {
        /// Held-out loss of the initial adapter.
        initial: f64,
        /// Held-out loss of the final global adapter.
        final_loss: f64,
    },
    /// File I/O failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl From<fedlora_dp::DpError> for SimError {
    fn from(e: fedlora_dp::DpError) -> Self {
        SimError::Config(format!("privacy: {e}"))
    }
}
