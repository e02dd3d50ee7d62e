//! A frozen base kept small: weights as ggml Q8_0 / Q4_1 blocks (as loaded from GGUF, or
//! quantized on load), dequantized one tile at a time inside the matrix multiply, forward and
//! backward, while LoRA adapters, activations and gradients stay f32. This is QLoRA on a CPU.

pub mod blocks;
pub mod op;

pub use blocks::{BaseDtype, QuantKind, QuantMatrix};
pub use op::frozen_linear;
