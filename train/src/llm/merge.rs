//! Merging an adapter into its base and writing the result as a Hugging Face model directory
//! (`config.json`, `model.safetensors` in f32, `tokenizer.json`, `tokenizer_config.json`),
//! which transformers' `AutoModelForCausalLM.from_pretrained` loads.
//!
//! Each adapted projection becomes `W' = W + (α/r)·B·A` (Hugging Face layout `[d_out, d_in]`);
//! everything else is written as loaded (a GGUF's quantized tensors as their dequantized f32).

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::Tensor;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

use super::config::{Arch, LlmConfig};
use super::Llm;
use crate::error::TrainError;
use crate::lora::LoraLinear;

fn values(t: Tensor<2>) -> Result<(Vec<usize>, Vec<f32>), TrainError> {
    let shape = t.dims().to_vec();
    let v = t
        .into_data()
        .try_into_vec_as::<f32>()
        .map_err(|e| TrainError::Model(format!("{e:?}")))?;
    Ok((shape, v))
}

/// A projection's merged weight in Hugging Face layout `[d_out, d_in]`.
fn merged(l: &LoraLinear) -> Tensor<2> {
    let w = l.dense_weight(); // burn layout [d_in, d_out]
    let w = match (&l.lora_a, &l.lora_b) {
        (Some(a), Some(b)) => {
            // (B·A)ᵀ = Aᵀ·Bᵀ: [d_in, r]·[r, d_out]
            w + a
                .val()
                .transpose()
                .matmul(b.val().transpose())
                .mul_scalar(l.scaling)
        }
        _ => w,
    };
    w.transpose()
}

/// The Hugging Face `config.json` of `cfg` (f32 weights). Refuses GGUF RoPE frequency
/// factors, which Hugging Face configs cannot express.
pub fn hf_config(cfg: &LlmConfig) -> Result<serde_json::Value, TrainError> {
    if cfg.rope_freq_factors.is_some() {
        return Err(TrainError::Unsupported(
            "merging a GGUF with rope_freqs.weight (Llama 3 frequency factors) into a Hugging \
             Face directory: load the model's Hugging Face directory instead"
                .into(),
        ));
    }
    let (arch, model_type) = match cfg.arch {
        Arch::Llama => ("LlamaForCausalLM", "llama"),
        Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
    };
    let mut c = json!({
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": "float32",
    });
    if cfg.arch == Arch::Llama {
        c["attention_bias"] = json!(cfg.qkv_bias);
        c["mlp_bias"] = json!(false);
        if cfg.qkv_bias != cfg.o_bias {
            return Err(TrainError::Unsupported(
                "a Llama with bias on q/k/v but not on o (or the reverse) has no Hugging Face \
                 config"
                    .into(),
            ));
        }
    } else {
        c["use_sliding_window"] = json!(false);
    }
    if let Some(s) = &cfg.rope_scaling {
        c["rope_scaling"] = json!({
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        });
    }
    Ok(c)
}

/// Writes `llm` (with its adapter merged) to `dir` as a Hugging Face model directory.
pub fn write_merged(llm: &Llm, dir: &Path) -> Result<(), TrainError> {
    let mut config = hf_config(&llm.config)?;
    if let [id] = llm.tokenizer.stop_ids() {
        config["eos_token_id"] = json!(id);
    } else if !llm.tokenizer.stop_ids().is_empty() {
        config["eos_token_id"] = json!(llm.tokenizer.stop_ids());
    }
    let io = |e: std::io::Error| TrainError::Storage(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let m = &llm.model;
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut put2 = |name: String, t: Tensor<2>| -> Result<(), TrainError> {
        let (s, v) = values(t)?;
        tensors.push((name, s, v));
        Ok(())
    };
    put2("model.embed_tokens.weight".into(), m.dense_embedding())?;
    let mut vectors: Vec<(String, Tensor<1>)> =
        vec![("model.norm.weight".into(), m.norm.gamma.val())];
    for (i, layer) in m.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let (a, f) = (&layer.self_attn, &layer.mlp);
        for (name, l) in [
            ("self_attn.q_proj", &a.q_proj),
            ("self_attn.k_proj", &a.k_proj),
            ("self_attn.v_proj", &a.v_proj),
            ("self_attn.o_proj", &a.o_proj),
            ("mlp.gate_proj", &f.gate_proj),
            ("mlp.up_proj", &f.up_proj),
            ("mlp.down_proj", &f.down_proj),
        ] {
            put2(format!("{p}.{name}.weight"), merged(l))?;
            if let Some(b) = &l.bias {
                vectors.push((format!("{p}.{name}.bias"), b.val()));
            }
        }
        vectors.push((
            format!("{p}.input_layernorm.weight"),
            layer.input_layernorm.gamma.val(),
        ));
        vectors.push((
            format!("{p}.post_attention_layernorm.weight"),
            layer.post_attention_layernorm.gamma.val(),
        ));
    }
    if let Some(h) = m.dense_lm_head() {
        put2("lm_head.weight".into(), h.transpose())?;
    }
    for (name, t) in vectors {
        let n = t.dims()[0];
        let (_, v) = values(t.reshape([1, n]))?;
        tensors.push((name, vec![n], v));
    }
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| TrainError::Model(format!("{n}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &dir.join("model.safetensors"))
        .map_err(|e| TrainError::Storage(format!("{}: {e}", dir.display())))?;
    let text = serde_json::to_string_pretty(&config).expect("json");
    std::fs::write(dir.join("config.json"), text).map_err(io)?;
    llm.tokenizer.save_hf(dir)?;
    Ok(())
}
