//! fedlora's protocol core: adapter layout, update codecs, wire messages and framing, and the
//! federation's round state machine.
//!
//! No I/O, no clock, no burn: every function is deterministic given its inputs (time is passed
//! in as milliseconds), so the coordinator, the client and the simulations share one tested core.

pub mod adapter;
pub mod client_dp;
pub mod codec;
pub mod enroll;
pub mod error;
pub mod frame;
pub mod identity;
pub mod limits;
pub mod message;
pub mod plan_signature;
pub mod rank;
pub mod resumable;
pub mod round;
pub mod secagg;
pub mod staleness;
pub mod strategy;

pub use adapter::{check_spec, AdapterSpec, FlatAdapter, SpecHash, TensorSpec};
pub use codec::{Codec, CodecContext, ErrorFeedback, ModularParams, ModularSum};
pub use error::{ProtocolError, Refusal, RefusalCode};
pub use message::{
    AckStatus, ClientMsg, CoordMsg, DeclineReason, Downlink, DpPlan, EvalReport, LocalOptimizer,
    PrivateUpload, RoundOffer, SecAggBody, SecAggTask, StalenessPlan, Task, TrainConfig, Upload,
    Weighting, ALPN, IDLE_TIMEOUT_S, KEEP_ALIVE_S, PROTOCOL_VERSION,
};
pub use round::{
    codec_seed, fedavg, may_send_payload, ClientId, Contribution, Directive, Federation,
    FederationConfig, FederationState, Mode, OpenRound, Phase, Sampling, Staleness, Transition,
    UploadMeta, UploadVerdict,
};
