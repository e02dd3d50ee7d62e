//! The shape of a Llama-family or Qwen2 model, read from a Hugging Face `config.json` or from
//! GGUF metadata, and its rotary position frequencies.

use serde_json::Value;

use super::gguf::GgufFile;
use crate::error::TrainError;

/// The architectures fedlora runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama family (SmolLM2, TinyLlama, Llama 3.2): RMSNorm, RoPE, GQA, SwiGLU.
    Llama,
    /// Qwen2 / Qwen2.5: a Llama with bias on the q, k and v projections.
    Qwen2,
}

/// Llama 3.x RoPE frequency scaling (`rope_type = "llama3"`), as transformers'
/// `_compute_llama3_parameters`.
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3Scaling {
    /// Divisor of the low frequencies.
    pub factor: f64,
    /// Wavelengths above `original / low_freq_factor` are fully scaled.
    pub low_freq_factor: f64,
    /// Wavelengths below `original / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// The context length the model was pretrained with, in tokens.
    pub original_max_position_embeddings: f64,
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmConfig {
    /// Architecture.
    pub arch: Arch,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Hidden width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention; divides `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm ε.
    pub rms_norm_eps: f64,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// Llama 3 frequency scaling, if the config asks for it.
    pub rope_scaling: Option<Llama3Scaling>,
    /// Per-frequency divisors from a GGUF `rope_freqs.weight` tensor (llama.cpp's way of
    /// storing Llama 3 scaling), `head_dim / 2` of them.
    pub rope_freq_factors: Option<Vec<f32>>,
    /// The output head shares the token embedding.
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Longest context the model was trained for, in tokens.
    pub max_position_embeddings: usize,
}

fn unsupported(what: String) -> TrainError {
    TrainError::Unsupported(what)
}

fn field<'a>(c: &'a Value, key: &str) -> Result<&'a Value, TrainError> {
    c.get(key)
        .filter(|v| !v.is_null())
        .ok_or_else(|| TrainError::ModelFile(format!("config.json has no `{key}`")))
}

fn usize_field(c: &Value, key: &str) -> Result<usize, TrainError> {
    field(c, key)?
        .as_u64()
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| TrainError::ModelFile(format!("config.json: `{key}` is not a count")))
}

fn f64_field(c: &Value, key: &str) -> Result<f64, TrainError> {
    field(c, key)?
        .as_f64()
        .ok_or_else(|| TrainError::ModelFile(format!("config.json: `{key}` is not a number")))
}

impl LlmConfig {
    /// Reads a Hugging Face `config.json` (`model_type` `llama` or `qwen2`). RoPE settings are
    /// read from transformers 5's `rope_parameters` or from the Hub's classic top-level
    /// `rope_theta` / `rope_scaling`.
    pub fn from_hf_json(text: &str) -> Result<Self, TrainError> {
        let c: Value = serde_json::from_str(text)
            .map_err(|e| TrainError::ModelFile(format!("config.json is not valid JSON: {e}")))?;
        let model_type = field(&c, "model_type")?.as_str().unwrap_or("");
        let arch = match model_type {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(unsupported(format!(
                    "model_type `{other}`: fedlora runs `llama` (SmolLM2, TinyLlama, Llama 3.2) \
                     and `qwen2` (Qwen2, Qwen2.5)"
                )))
            }
        };
        let act = c
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if act != "silu" {
            return Err(unsupported(format!(
                "hidden_act `{act}`: only SwiGLU (`silu`) is implemented"
            )));
        }
        if c.get("mlp_bias").and_then(Value::as_bool) == Some(true) {
            return Err(unsupported("`mlp_bias = true`".into()));
        }
        if c.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
            return Err(unsupported(
                "`use_sliding_window = true`: sliding-window attention is not implemented".into(),
            ));
        }
        let hidden_size = usize_field(&c, "hidden_size")?;
        let num_heads = usize_field(&c, "num_attention_heads")?;
        let num_kv_heads = match c.get("num_key_value_heads").filter(|v| !v.is_null()) {
            Some(_) => usize_field(&c, "num_key_value_heads")?,
            None => num_heads,
        };
        let head_dim = match c.get("head_dim").filter(|v| !v.is_null()) {
            Some(_) => usize_field(&c, "head_dim")?,
            None => hidden_size / num_heads.max(1),
        };
        let attention_bias = c
            .get("attention_bias")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let (rope_theta, scaling) = match c.get("rope_parameters").filter(|v| v.is_object()) {
            Some(p) => (
                p.get("rope_theta")
                    .and_then(Value::as_f64)
                    .unwrap_or(10_000.0),
                Some(p),
            ),
            None => (
                c.get("rope_theta")
                    .and_then(Value::as_f64)
                    .unwrap_or(10_000.0),
                c.get("rope_scaling").filter(|v| v.is_object()),
            ),
        };
        let rope_scaling = match scaling {
            None => None,
            Some(s) => {
                let ty = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                match ty {
                    "default" => None,
                    "llama3" => Some(Llama3Scaling {
                        factor: f64_field(s, "factor")?,
                        low_freq_factor: f64_field(s, "low_freq_factor")?,
                        high_freq_factor: f64_field(s, "high_freq_factor")?,
                        original_max_position_embeddings: f64_field(
                            s,
                            "original_max_position_embeddings",
                        )?,
                    }),
                    other => {
                        return Err(unsupported(format!(
                            "rope_type `{other}`: fedlora implements `default` and `llama3`"
                        )))
                    }
                }
            }
        };
        let cfg = Self {
            arch,
            vocab_size: usize_field(&c, "vocab_size")?,
            hidden_size,
            intermediate_size: usize_field(&c, "intermediate_size")?,
            num_layers: usize_field(&c, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f64_field(&c, "rms_norm_eps")?,
            rope_theta,
            rope_scaling,
            rope_freq_factors: None,
            tie_word_embeddings: c
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch == Arch::Llama && attention_bias,
            max_position_embeddings: c
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .map_or(2048, |v| v as usize),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads the model shape from GGUF metadata (`general.architecture = llama`).
    pub fn from_gguf(g: &GgufFile) -> Result<Self, TrainError> {
        let arch = g.str("general.architecture")?.unwrap_or("");
        if arch != "llama" {
            let hint = if arch == "qwen2" {
                "; load Qwen2 models from their Hugging Face directory"
            } else {
                ""
            };
            return Err(unsupported(format!(
                "{}: GGUF architecture `{arch}`: fedlora loads GGUF architecture `llama`{hint}",
                g.origin()
            )));
        }
        let need = |key: &str| -> Result<usize, TrainError> {
            g.uint(key)?
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| {
                    TrainError::ModelFile(format!("{}: GGUF metadata lacks `{key}`", g.origin()))
                })
        };
        let hidden_size = need("llama.embedding_length")?;
        let num_heads = need("llama.attention.head_count")?;
        let num_kv_heads = match g.uint("llama.attention.head_count_kv")? {
            Some(v) => usize::try_from(v).unwrap_or(0),
            None => num_heads,
        };
        let head_dim = match g.uint("llama.attention.key_length")? {
            Some(v) => usize::try_from(v).unwrap_or(0),
            None => hidden_size / num_heads.max(1),
        };
        if let Some(rot) = g.uint("llama.rope.dimension_count")? {
            if rot as usize != head_dim {
                return Err(unsupported(format!(
                    "{}: partial rotary embedding ({rot} of {head_dim} dimensions)",
                    g.origin()
                )));
            }
        }
        if let Some(t) = g.str("llama.rope.scaling.type")? {
            if t != "none" {
                return Err(unsupported(format!(
                    "{}: GGUF RoPE scaling `{t}`",
                    g.origin()
                )));
            }
        }
        let vocab_size = match g.uint("llama.vocab_size")? {
            Some(v) => v as usize,
            None => g
                .str_array("tokenizer.ggml.tokens")?
                .map(|t| t.len())
                .unwrap_or(0),
        };
        let cfg = Self {
            arch: Arch::Llama,
            vocab_size,
            hidden_size,
            intermediate_size: need("llama.feed_forward_length")?,
            num_layers: need("llama.block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: g
                .float("llama.attention.layer_norm_rms_epsilon")?
                .unwrap_or(1e-5),
            rope_theta: g.float("llama.rope.freq_base")?.unwrap_or(10_000.0),
            rope_scaling: None,
            rope_freq_factors: None,
            tie_word_embeddings: !g.has_tensor("output.weight"),
            qkv_bias: g.has_tensor("blk.0.attn_q.bias"),
            o_bias: g.has_tensor("blk.0.attn_output.bias"),
            max_position_embeddings: g.uint("llama.context_length")?.map_or(2048, |v| v as usize),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Refuses shapes the forward pass cannot run.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::ModelFile(m));
        if [
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_layers,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        ]
        .contains(&0)
        {
            return bad(format!("a model dimension is zero: {self:?}"));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "{} key/value heads do not divide {} query heads",
                self.num_kv_heads, self.num_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head width {} is odd; RoPE needs pairs",
                self.head_dim
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!(
                "rms_norm_eps {} is not positive",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return bad(format!("rope theta {} is not above 1", self.rope_theta));
        }
        Ok(())
    }

    /// RoPE inverse frequencies, `head_dim / 2` of them: `θ^(-2i/d)` in f32 as transformers
    /// computes them, then Llama 3 scaling or GGUF frequency factors if present.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let mut inv: Vec<f32> = (0..d / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / d as f32;
                1.0 / (self.rope_theta as f32).powf(exponent)
            })
            .collect();
        if let Some(s) = &self.rope_scaling {
            let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
            for f in inv.iter_mut() {
                let freq = f64::from(*f);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let scaled = if wavelen > low_wavelen {
                    freq / s.factor
                } else if wavelen < high_wavelen {
                    freq
                } else {
                    let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * freq / s.factor + smooth * freq
                };
                *f = scaled as f32;
            }
        }
        if let Some(factors) = &self.rope_freq_factors {
            for (f, k) in inv.iter_mut().zip(factors) {
                *f /= *k;
            }
        }
        inv
    }
}
