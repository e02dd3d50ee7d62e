//! fedlora client SDK: LoRA layers and a byte-level LM on burn, local training, and the QUIC
//! client that takes part in a federation.

pub mod adapter;
pub mod client_dp;
pub mod data;
pub mod eligibility;
pub mod enroll;
pub mod error;
pub mod fused;
pub mod learner;
pub mod llm;
pub mod lora;
pub mod model;
pub mod train;

pub use error::ClientError;
pub mod dp_sgd;
pub mod privacy;
pub mod proximal;
pub mod quant;
pub mod sdk;
pub mod secure;
pub mod statement;
pub mod step_gate;
pub mod transport;

#[cfg(test)]
mod test_rand;
