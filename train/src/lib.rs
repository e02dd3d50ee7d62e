//! fedlora's training engine on burn: LoRA layers ([`lora`]), the byte-level causal LM
//! ([`model`]), real small LLMs from GGUF or Hugging Face ([`llm`]), fused kernels ([`fused`]),
//! quantized bases ([`quant`]), the local training loops (plain [`train`], DP-SGD [`dp_sgd`],
//! FedProx's [`proximal`] term) behind the [`step_gate`], the learners the device SDK and the
//! simulations drive ([`learner`]), and adapters as flat buffers ([`adapter`]).
//!
//! No network, no device state: the federated client SDK (`fedlora-client`) runs this engine
//! inside a round.

pub mod adapter;
pub mod bench;
pub mod data;
pub mod dp_sgd;
pub mod eligibility;
pub mod error;
pub mod fused;
pub mod learner;
pub mod llm;
pub mod local_run;
pub mod lora;
pub mod model;
pub mod proximal;
pub mod quant;
pub mod step_gate;
pub mod train;
pub mod trainable;

pub use error::TrainError;

#[cfg(test)]
mod test_rand;
