//! A model's weights in host memory under Hugging Face names and layouts, read from
//! safetensors (with burn-store) or from GGUF (renamed, dequantized, q/k un-permuted).

use std::collections::HashMap;
use std::path::Path;

use burn::store::{ModuleStore, SafetensorsStore};

use super::config::LlmConfig;
use super::gguf::{unpermute_order, unpermute_rows, GgufFile, HostTensor};
use crate::error::TrainError;
use crate::quant::{QuantKind, QuantMatrix};

/// Tensors by Hugging Face name (`model.layers.0.self_attn.q_proj.weight`), f32, HF layout
/// (linear weights `[d_out, d_in]`).
#[derive(Debug, Default)]
pub struct WeightMap {
    tensors: HashMap<String, HostTensor>,
    /// 2-D tensors kept as the file's blocks (see [`WeightMap::from_gguf_keeping`]).
    blocks: HashMap<String, QuantMatrix>,
    origin: String,
    files: Vec<std::path::PathBuf>,
}

impl WeightMap {
    /// Removes and returns the tensor `name`, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor, TrainError> {
        let t = self.tensors.remove(name).ok_or_else(|| {
            TrainError::ModelFile(format!("{}: missing tensor `{name}`", self.origin))
        })?;
        if t.shape != shape {
            return Err(TrainError::ModelFile(format!(
                "{}: tensor `{name}` has shape {:?}, the config implies {shape:?}",
                self.origin, t.shape
            )));
        }
        Ok(t)
    }

    /// Removes and returns the tensor `name` if it was kept as blocks, checking its shape
    /// (`[rows, cols]`, Hugging Face layout).
    pub fn take_blocks(
        &mut self,
        name: &str,
        shape: [usize; 2],
    ) -> Result<Option<QuantMatrix>, TrainError> {
        let Some(q) = self.blocks.remove(name) else {
            return Ok(None);
        };
        if [q.rows(), q.cols()] != shape {
            return Err(TrainError::ModelFile(format!(
                "{}: tensor `{name}` has shape [{}, {}], the config implies {shape:?}",
                self.origin,
                q.rows(),
                q.cols()
            )));
        }
        Ok(Some(q))
    }

    /// The safetensors files the weights came from, in the order read (none for GGUF).
    pub fn files(&self) -> &[std::path::PathBuf] {
        &self.files
    }

    /// Whether a tensor of this name is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.blocks.contains_key(name)
    }

    /// Reads a Hugging Face directory's `model.safetensors`, or every shard its
    /// `model.safetensors.index.json` names, converting any float dtype to f32.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, TrainError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            shards(&index)?.into_iter().map(|f| dir.join(f)).collect()
        } else {
            return Err(TrainError::ModelFile(format!(
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            )));
        };
        let mut map = WeightMap {
            tensors: HashMap::new(),
            blocks: HashMap::new(),
            origin: dir.display().to_string(),
            files: files.clone(),
        };
        for file in files {
            read_safetensors(&file, &mut map.tensors)?;
        }
        Ok(map)
    }

    /// Reads every tensor a Llama GGUF holds, under Hugging Face names: dequantized to f32, and
    /// with llama.cpp's q/k row permutation undone. `rope_freqs.weight` is not a weight: it
    /// becomes [`LlmConfig::rope_freq_factors`].
    pub fn from_gguf(g: &mut GgufFile, cfg: &mut LlmConfig) -> Result<Self, TrainError> {
        Self::from_gguf_keeping(g, cfg, &[])
    }

    /// [`from_gguf`](Self::from_gguf), except that 2-D tensors the file stores as blocks of a
    /// kind in `keep` stay blocks, bytes unchanged (q/k rows reordered whole): no
    /// dequantization, and no requantization error.
    pub fn from_gguf_keeping(
        g: &mut GgufFile,
        cfg: &mut LlmConfig,
        keep: &[QuantKind],
    ) -> Result<Self, TrainError> {
        let mut tensors = HashMap::new();
        let mut blocks = HashMap::new();
        for name in g.tensor_names() {
            if name == "rope_freqs.weight" {
                let t = g.tensor(&name)?;
                if t.data.len() != cfg.head_dim / 2 {
                    return Err(TrainError::ModelFile(format!(
                        "{}: rope_freqs.weight has {} values, not head_dim/2 = {}",
                        g.origin(),
                        t.data.len(),
                        cfg.head_dim / 2
                    )));
                }
                cfg.rope_freq_factors = Some(t.data);
                continue;
            }
            let Some(hf) = hf_name(&name) else {
                tracing::debug!(tensor = %name, "GGUF tensor not used by the model");
                continue;
            };
            let heads = if name.contains(".attn_q.") {
                Some(cfg.num_heads)
            } else if name.contains(".attn_k.") {
                Some(cfg.num_kv_heads)
            } else {
                None
            };
            if !keep.is_empty() {
                if let Some(mut q) = g.tensor_blocks(&name, keep)? {
                    if let Some(n) = heads {
                        q = q.reorder_rows(&unpermute_order(q.rows(), n)?);
                    }
                    blocks.insert(hf, q);
                    continue;
                }
            }
            let mut t = g.tensor(&name)?;
            if name.contains(".attn_q.") {
                t = unpermute_rows(&t, cfg.num_heads)?;
            } else if name.contains(".attn_k.") {
                t = unpermute_rows(&t, cfg.num_kv_heads)?;
            }
            tensors.insert(hf, t);
        }
        Ok(WeightMap {
            tensors,
            blocks,
            origin: g.origin().to_string(),
            files: Vec::new(),
        })
    }
}

/// llama.cpp's tensor names → Hugging Face's (`blk.N.attn_q.weight` →
/// `model.layers.N.self_attn.q_proj.weight`).
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

fn shards(index: &Path) -> Result<Vec<String>, TrainError> {
    let bad = |m: String| TrainError::ModelFile(format!("{}: {m}", index.display()));
    let text = std::fs::read_to_string(index).map_err(|e| bad(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut files: Vec<String> = Vec::new();
    for f in map.values() {
        let f = f
            .as_str()
            .ok_or_else(|| bad("a `weight_map` value is not a file name".into()))?;
        if f.contains('/') || f.contains('\\') || f.starts_with('.') {
            return Err(bad(format!("shard `{f}` is not a plain file name")));
        }
        if !files.iter().any(|g| g == f) {
            files.push(f.to_string());
        }
    }
    files.sort();
    Ok(files)
}

/// Reads every tensor of one safetensors file into `out` as f32 (any float dtype converted).
pub(crate) fn read_safetensors(
    path: &Path,
    out: &mut HashMap<String, HostTensor>,
) -> Result<(), TrainError> {
    let bad = |m: String| TrainError::ModelFile(format!("{}: {m}", path.display()));
    if !path.is_file() {
        return Err(bad("file not found".into()));
    }
    let mut store = SafetensorsStore::from_file(path);
    let all = store
        .get_all_tensors()
        .map_err(|e| bad(format!("not a readable safetensors file: {e}")))?;
    for (name, t) in all {
        let data = burn::store::bridge::to_data(t)
            .map_err(|e| bad(format!("tensor `{name}` cannot be read: {e}")))?;
        let shape = data.shape().to_vec();
        let values = data
            .try_into_vec_as::<f32>()
            .map_err(|e| bad(format!("tensor `{name}` is not a float tensor: {e:?}")))?;
        if out.contains_key(name) {
            return Err(bad(format!("tensor `{name}` appears in two shards")));
        }
        out.insert(
            name.clone(),
            HostTensor {
                data: values,
                shape,
            },
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::hf_name;

    #[test]
    fn gguf_names_map_to_hugging_face_names() {
        assert_eq!(
            hf_name("blk.12.attn_k.weight").as_deref(),
            Some("model.layers.12.self_attn.k_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(hf_name("blk.x.attn_k.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
