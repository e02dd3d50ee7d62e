//! LoRA adapters in Hugging Face PEFT's format: a directory with `adapter_config.json` and
//! `adapter_model.safetensors`, tensors named
//! `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (`[r, d_in]`) and
//! `….lora_B.weight` (`[d_out, r]`), the update scaled by `lora_alpha / r` (or
//! `lora_alpha / √r` with `use_rslora`). These are the layouts [`LoraLinear`] keeps, so the
//! tensors are used as they are.

use std::collections::HashMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use serde_json::Value;

use super::gguf::HostTensor;
use super::llama::{LlamaLm, LLM_TARGETS};
use crate::error::TrainError;
use crate::lora::{LoraConfig, LoraLinear};

/// What `adapter_config.json` says, reduced to what fedlora applies.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftAdapterConfig {
    /// The LoRA shape, with `alpha` set so that `alpha / rank` is PEFT's scaling.
    pub lora: LoraConfig,
}

fn bad(path: &Path, m: impl std::fmt::Display) -> TrainError {
    TrainError::ModelFile(format!("{}: {m}", path.display()))
}

impl PeftAdapterConfig {
    /// Reads `dir/adapter_config.json`. Refuses what it would silently get wrong: DoRA,
    /// per-module rank or alpha patterns, `fan_in_fan_out`, trained biases, adapters on some
    /// layers only or extra saved modules, targets that are not projections of the
    /// Llama/Qwen2 model, and a PEFT type other than LoRA.
    pub fn read(dir: &Path) -> Result<Self, TrainError> {
        let path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| bad(&path, e))?;
        let c: Value = serde_json::from_str(&text).map_err(|e| bad(&path, e))?;
        let ty = c.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
        if ty != "LORA" {
            return Err(TrainError::Unsupported(format!(
                "{}: peft_type `{ty}`; fedlora applies LORA adapters",
                path.display()
            )));
        }
        for key in [
            "layers_to_transform",
            "modules_to_save",
            "layer_replication",
        ] {
            if c.get(key).is_some_and(|v| !v.is_null()) {
                return Err(TrainError::Unsupported(format!(
                    "{}: `{key}` (fedlora applies LoRA on every layer's projections only)",
                    path.display()
                )));
            }
        }
        if c.get("bias")
            .and_then(Value::as_str)
            .is_some_and(|b| b != "none")
        {
            return Err(TrainError::Unsupported(format!(
                "{}: trained biases (`bias` other than \"none\")",
                path.display()
            )));
        }
        for flag in ["use_dora", "fan_in_fan_out", "lora_bias"] {
            if c.get(flag).and_then(Value::as_bool) == Some(true) {
                return Err(TrainError::Unsupported(format!(
                    "{}: `{flag} = true`",
                    path.display()
                )));
            }
        }
        for pattern in ["rank_pattern", "alpha_pattern"] {
            if c.get(pattern)
                .and_then(Value::as_object)
                .is_some_and(|m| !m.is_empty())
            {
                return Err(TrainError::Unsupported(format!(
                    "{}: a per-module `{pattern}`",
                    path.display()
                )));
            }
        }
        let rank = c
            .get("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(&path, "no rank `r`"))? as usize;
        let alpha = c
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad(&path, "no `lora_alpha`"))?;
        let rslora = c.get("use_rslora").and_then(Value::as_bool) == Some(true);
        let targets: Vec<String> = match c.get("target_modules") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            Some(Value::String(s)) => vec![s.clone()],
            _ => return Err(bad(&path, "no `target_modules` list")),
        };
        let mut targets = targets;
        targets.sort();
        targets.dedup();
        // PEFT scales by alpha/r, or alpha/√r with rsLoRA; LoraConfig scales by alpha/rank.
        let alpha = if rslora {
            alpha * (rank as f64).sqrt()
        } else {
            alpha
        };
        let lora = LoraConfig::new()
            .with_rank(rank)
            .with_alpha(alpha)
            .with_targets(targets);
        lora.validate(LLM_TARGETS).map_err(|e| match e {
            TrainError::Config(m) => TrainError::Unsupported(format!("{}: {m}", path.display())),
            other => other,
        })?;
        Ok(Self { lora })
    }
}

/// Reads `dir/adapter_model.safetensors` and sets every adapted projection's `A` and `B`.
/// `model` must have been built with [`PeftAdapterConfig::lora`]; every adapted projection
/// must get both tensors, and no tensor may be left over.
pub fn apply(model: LlamaLm, dir: &Path, device: &Device) -> Result<LlamaLm, TrainError> {
    let path = dir.join("adapter_model.safetensors");
    let mut tensors = read_all(&path)?;
    let mut model = model;
    for (i, layer) in model.layers.iter_mut().enumerate() {
        let attn = &mut layer.self_attn;
        let mlp = &mut layer.mlp;
        let projections: [(&str, &mut LoraLinear); 7] = [
            ("self_attn.q_proj", &mut attn.q_proj),
            ("self_attn.k_proj", &mut attn.k_proj),
            ("self_attn.v_proj", &mut attn.v_proj),
            ("self_attn.o_proj", &mut attn.o_proj),
            ("mlp.gate_proj", &mut mlp.gate_proj),
            ("mlp.up_proj", &mut mlp.up_proj),
            ("mlp.down_proj", &mut mlp.down_proj),
        ];
        for (name, proj) in projections {
            let (Some(a), Some(b)) = (&proj.lora_a, &proj.lora_b) else {
                continue;
            };
            let prefix = format!("base_model.model.model.layers.{i}.{name}");
            let mut take = |which: &str, shape: [usize; 2]| -> Result<Tensor<2>, TrainError> {
                let key = format!("{prefix}.{which}.weight");
                let t = tensors
                    .remove(&key)
                    .ok_or_else(|| bad(&path, format!("missing `{key}`")))?;
                if t.shape != shape {
                    return Err(bad(
                        &path,
                        format!("`{key}` has shape {:?}, expected {shape:?}", t.shape),
                    ));
                }
                Ok(Tensor::from_data(TensorData::new(t.data, shape), device))
            };
            let a_shape = a.shape().dims::<2>();
            let b_shape = b.shape().dims::<2>();
            let a = take("lora_A", a_shape)?;
            let b = take("lora_B", b_shape)?;
            proj.lora_a = Some(Param::from_tensor(a));
            proj.lora_b = Some(Param::from_tensor(b));
        }
    }
    if let Some(extra) = tensors.keys().next() {
        return Err(TrainError::Unsupported(format!(
            "{}: tensor `{extra}` is not a LoRA A/B of a projection fedlora adapts \
             ({} left over)",
            path.display(),
            tensors.len()
        )));
    }
    Ok(model)
}

fn read_all(path: &Path) -> Result<HashMap<String, HostTensor>, TrainError> {
    let mut out = HashMap::new();
    super::weights::read_safetensors(path, &mut out)?;
    // some PEFT versions save `…lora_A.default.weight`; use the unnamed form
    Ok(out
        .into_iter()
        .map(|(k, v)| (k.replace(".default.weight", ".weight"), v))
        .collect())
}

/// PEFT's name of a projection's adapter tensor: `layers.3.self_attn.q_proj` and `lora_A` →
/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`.
pub fn peft_key(layer_path: &str, which: &str) -> String {
    format!("base_model.model.model.{layer_path}.{which}.weight")
}

/// Writes `model`'s adapter (every adapted projection's `A` `[r, d_in]` and `B` `[d_out, r]`,
/// f32) as a PEFT adapter directory: `adapter_model.safetensors` under PEFT's key names and
/// `adapter_config.json` with `r`, `lora_alpha` (scaling `alpha / r`, as [`LoraConfig`]),
/// `target_modules` and `base_model_name_or_path`. `PeftModel.from_pretrained` loads it onto
/// the Hugging Face model. FFA-LoRA's frozen `A` is written too (PEFT needs both).
pub fn export(
    model: &LlamaLm,
    lora: &LoraConfig,
    base_model_name: &str,
    dir: &Path,
) -> Result<(), TrainError> {
    use safetensors::tensor::{Dtype, TensorView};
    let io = |e: std::io::Error| TrainError::Storage(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (path, layer) in model.lora_layers() {
        for (which, p) in [("lora_A", &layer.lora_a), ("lora_B", &layer.lora_b)] {
            let t = p.as_ref().expect("an adapted layer has A and B").val();
            let shape = t.dims().to_vec();
            let values = t
                .into_data()
                .try_into_vec_as::<f32>()
                .map_err(|e| TrainError::Model(format!("{path}: {e:?}")))?;
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            named.push((peft_key(&path, which), shape, bytes));
        }
    }
    let views = named
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| TrainError::Model(format!("{n}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &dir.join("adapter_model.safetensors"))
        .map_err(|e| TrainError::Storage(format!("{}: {e}", dir.display())))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": lora.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    });
    let text = serde_json::to_string_pretty(&config).expect("json");
    std::fs::write(dir.join("adapter_config.json"), text).map_err(io)?;
    Ok(())
}
