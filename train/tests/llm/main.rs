//! Real-LLM checks of the training engine, in one test binary: parity with the PyTorch
//! reference on the tiny fixtures, the quantized GGUF base, and LoRA training on it.
//!
//! Run one file's tests with a filter, e.g. `cargo test --release -p fedlora-train --test llm
//! llm_parity::`.

mod llm_parity;
mod llm_quant_base;
mod llm_train;
