//! The model shape and base checkpoint shared by the demo, the bench, the client and the
//! coordinator commands.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use clap::Args;
use fedlora_client::lora::LoraConfig;
use fedlora_client::model::LmConfig;
use fedlora_client::train::{load_base, LocalTrainer};
use serde::{Deserialize, Serialize};

/// Where the committed base checkpoint lives (relative to the repository root).
pub(crate) const DEFAULT_BASE: &str = "models/base.bpk";

/// The reference LM: d_model 128, 4 layers, 4 heads, MLP 512, context 64; with an adapter,
/// rank 8 (α 16) on q, v by default.
pub(crate) fn reference_config(lora: Option<LoraConfig>) -> LmConfig {
    LmConfig::new().with_lora(lora)
}

/// Adapter flags shared by `coordinator`, `client` and `demo` (all parties must agree; the
/// adapter spec hash is checked at every hello).
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ModelArgs {
    /// Base checkpoint (made by `fedlora pretrain`).
    #[arg(long, default_value = DEFAULT_BASE)]
    pub base: PathBuf,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA α (the update is scaled by α/rank).
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    /// Projections with an adapter, comma-separated (q, k, v, o, fc1, fc2, head).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q,v",
        allow_hyphen_values = false
    )]
    pub targets: Vec<String>,
    /// FFA-LoRA: freeze A, train and upload B only.
    #[arg(long)]
    pub ffa: bool,
}

impl ModelArgs {
    /// The LM config these flags describe; a usage error (exit 2) when they cannot make an
    /// adapter (rank 0, an empty or unknown target, …).
    pub(crate) fn lm_config(&self) -> Result<LmConfig, super::UsageError> {
        let lora = LoraConfig::new()
            .with_rank(self.rank)
            .with_alpha(self.alpha)
            .with_targets(
                self.targets
                    .iter()
                    .filter(|t| !t.is_empty())
                    .cloned()
                    .collect(),
            )
            .with_freeze_a(self.ffa);
        lora.validate(fedlora_client::model::LM_TARGETS)
            .map_err(|e| super::UsageError(e.to_string().replace("config: ", "")))?;
        Ok(reference_config(Some(lora)))
    }

    /// The flags as the user would type them (for messages about mismatched adapters).
    pub(crate) fn describe(&self) -> String {
        format!(
            "--rank {} --alpha {} --targets {}{}",
            self.rank,
            self.alpha,
            self.targets.join(","),
            if self.ffa { " --ffa" } else { "" }
        )
    }

    /// A trainer over the base checkpoint.
    pub(crate) fn trainer(&self) -> anyhow::Result<LocalTrainer> {
        let cfg = self.lm_config()?;
        let path = base_path(&self.base);
        anyhow::ensure!(
            path.exists(),
            "base checkpoint {} not found: run `fedlora pretrain --out {}`",
            path.display(),
            path.display()
        );
        let base = load_base(&cfg, &path)?;
        Ok(LocalTrainer::new(cfg, &base, Device::flex().autodiff())?)
    }
}

/// Resolves the base checkpoint path: as given if it exists, else relative to the crate root
/// (so `cargo run` works from any directory of the checkout).
pub(crate) fn base_path(given: &Path) -> PathBuf {
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
