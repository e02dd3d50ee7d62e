//! The reference model shape shared by the demo, the bench and the base checkpoint.

use std::path::{Path, PathBuf};

use fedlora_client::lora::LoraConfig;
use fedlora_client::model::LmConfig;

/// Where the committed base checkpoint lives (relative to the repository root).
pub const DEFAULT_BASE: &str = "models/base.bpk";

/// The reference LM: d_model 128, 4 layers, 4 heads, MLP 512, context 64, rank 8 (α 16) on q, v.
pub fn reference_config(lora: Option<LoraConfig>) -> LmConfig {
    LmConfig::new().with_lora(lora)
}

/// Resolves the base checkpoint path: as given if it exists, else relative to the crate root
/// (so `cargo run` works from any directory of the checkout).
pub fn base_path(given: &Path) -> PathBuf {
    if given.exists() || given.is_absolute() {
        return given.to_path_buf();
    }
    let in_repo = Path::new(env!("CARGO_MANIFEST_DIR")).join(given);
    if in_repo.exists() {
        in_repo
    } else {
        given.to_path_buf()
    }
}
