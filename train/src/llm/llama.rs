//! The Llama-family decoder (also Qwen2) on burn, with [`LoraLinear`] projections and a KV
//! cache for generation.
//!
//! Per layer: `h = x + o_proj(attn(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))` with
//! `n1 = rms_norm(x)`, then `h + down_proj(silu(gate_proj(n2)) · up_proj(n2))` with
//! `n2 = rms_norm(h)`. Grouped-query attention repeats each key/value head for
//! `num_heads / num_kv_heads` query heads. RoPE rotates the two halves of each head
//! (`rotate_half`, as transformers). Module paths mirror Hugging Face's
//! (`layers.3.self_attn.q_proj`), and the projection names are the LoRA targets
//! ([`LLM_TARGETS`]).

use crate::fused::rms_norm::RmsNormLayer as RmsNorm;
use crate::fused::{causal_attention, swiglu};
use burn::module::{Module, Param};
use burn::tensor::module::{attention, embedding, linear};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::config::LlmConfig;
use super::gguf::HostTensor;
use super::weights::WeightMap;
use crate::error::TrainError;
use crate::lora::{LoraConfig, LoraLinear, LoraLinearConfig};
use crate::model::ExampleAdapters;
use crate::quant::{frozen_linear, BaseDtype, QuantKind, QuantMatrix};
use std::sync::Arc;

/// The projections of [`LlamaLm`] that can carry a LoRA adapter (PEFT's names).
pub const LLM_TARGETS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Self-attention with grouped-query heads.
#[derive(Module, Debug)]
pub struct Attention {
    /// Query projection.
    pub q_proj: LoraLinear,
    /// Key projection.
    pub k_proj: LoraLinear,
    /// Value projection.
    pub v_proj: LoraLinear,
    /// Output projection.
    pub o_proj: LoraLinear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

/// The SwiGLU MLP.
#[derive(Module, Debug)]
pub struct Mlp {
    /// Gate projection (through SiLU).
    pub gate_proj: LoraLinear,
    /// Up projection.
    pub up_proj: LoraLinear,
    /// Down projection.
    pub down_proj: LoraLinear,
}

/// One decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub(crate) input_layernorm: RmsNorm,
    /// Attention.
    pub self_attn: Attention,
    pub(crate) post_attention_layernorm: RmsNorm,
    /// MLP.
    pub mlp: Mlp,
}

/// A Llama-family / Qwen2 causal LM. Build it with [`LlamaLm::from_weights`].
#[derive(Module, Debug)]
pub struct LlamaLm {
    pub(crate) embed_tokens: Param<Tensor<2>>,
    /// The decoder layers.
    pub layers: Vec<DecoderLayer>,
    pub(crate) norm: RmsNorm,
    /// A separate output head; `None` when it is tied to the token embedding.
    pub(crate) lm_head: Option<Param<Tensor<2>>>,
    /// The token embedding as blocks (`[vocab, hidden]`), used instead of `embed_tokens`
    /// (then empty) when the base is quantized.
    #[module(skip)]
    pub(crate) embed_quant: Option<Arc<QuantMatrix>>,
    /// A separate output head as blocks (`[vocab, hidden]`), used instead of `lm_head`.
    #[module(skip)]
    pub(crate) lm_head_quant: Option<Arc<QuantMatrix>>,
    #[module(skip)]
    inv_freq: Vec<f32>,
    max_positions: usize,
    #[module(skip)]
    base: BaseDtype,
}

/// Keys and values of the positions seen so far, per layer, for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    len: usize,
}

impl KvCache {
    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn transposed(t: &HostTensor) -> Vec<f32> {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let mut out = vec![0f32; t.data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = t.data[r * cols + c];
        }
    }
    out
}

struct Builder<'a> {
    w: &'a mut WeightMap,
    device: &'a Device,
    lora: Option<&'a LoraConfig>,
    seed: u64,
    base: BaseDtype,
    /// Whether a weight was quantized here (not kept as the file's blocks).
    requantized: bool,
}

impl Builder<'_> {
    /// The Hugging Face matrix `name` (`[rows, cols]`) as `kind` blocks: the file's own when it
    /// stores them so, else quantized from its dense values.
    fn blocks(
        &mut self,
        name: &str,
        kind: QuantKind,
        rows: usize,
        cols: usize,
    ) -> Result<Arc<QuantMatrix>, TrainError> {
        if let Some(q) = self.w.take_blocks(name, [rows, cols])? {
            if self.base.keeps().contains(&q.kind()) {
                return Ok(Arc::new(q));
            }
            let dense = q.to_f32();
            self.requantized = true;
            return Ok(Arc::new(QuantMatrix::quantize(kind, &dense, rows, cols)?));
        }
        let t = self.w.take(name, &[rows, cols])?;
        self.requantized = true;
        Ok(Arc::new(QuantMatrix::quantize(kind, &t.data, rows, cols)?))
    }

    fn tensor1(&mut self, name: &str, n: usize) -> Result<Tensor<1>, TrainError> {
        let t = self.w.take(name, &[n])?;
        Ok(Tensor::from_data(TensorData::new(t.data, [n]), self.device))
    }

    fn tensor2(&mut self, name: &str, rows: usize, cols: usize) -> Result<Tensor<2>, TrainError> {
        let t = self.w.take(name, &[rows, cols])?;
        Ok(Tensor::from_data(
            TensorData::new(t.data, [rows, cols]),
            self.device,
        ))
    }

    fn norm(&mut self, name: &str, d: usize, eps: f64) -> Result<RmsNorm, TrainError> {
        Ok(RmsNorm {
            gamma: Param::from_tensor(self.tensor1(&format!("{name}.weight"), d)?),
            epsilon: eps,
        })
    }

    /// A projection `prefix.{weight,bias}` with HF weight `[d_out, d_in]`.
    fn linear(
        &mut self,
        prefix: &str,
        target: &str,
        layer: usize,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> Result<LoraLinear, TrainError> {
        let name = format!("{prefix}.weight");
        let (weight, quant) = match self.base.kind() {
            Some(kind) => (
                Tensor::<2>::zeros([0, d_out], self.device),
                Some(self.blocks(&name, kind, d_out, d_in)?),
            ),
            None => {
                let w = self.w.take(&name, &[d_out, d_in])?;
                let t = TensorData::new(transposed(&w), [d_in, d_out]);
                (Tensor::<2>::from_data(t, self.device), None)
            }
        };
        let bias = if bias {
            Some(Param::from_tensor(
                self.tensor1(&format!("{prefix}.bias"), d_out)?,
            ))
        } else {
            None
        };
        let which = LLM_TARGETS.iter().position(|t| *t == target).unwrap_or(7) as u64;
        let lora = self.lora.filter(|l| l.targets(target)).cloned();
        let layer = LoraLinearConfig::new(d_in, d_out)
            .with_bias(bias.is_some())
            .with_lora(lora)
            .with_a_seed(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (layer as u64 * 8 + which))
            .with_base(Param::from_tensor(weight), bias, self.device);
        Ok(match quant {
            Some(q) => layer.with_quant_base(q),
            None => layer,
        })
    }
}

impl LlamaLm {
    /// Builds the model from Hugging Face-named weights, consuming them. With `lora`, the
    /// targeted projections get an adapter (`A` seeded by `seed`, `B` zero) and every base
    /// weight is frozen.
    pub fn from_weights(
        cfg: &LlmConfig,
        weights: &mut WeightMap,
        lora: Option<&LoraConfig>,
        seed: u64,
        device: &Device,
    ) -> Result<Self, TrainError> {
        Self::from_weights_as(cfg, weights, lora, seed, BaseDtype::F32, device).map(|(m, _)| m)
    }

    /// [`from_weights`](Self::from_weights) with every frozen matrix (projections, token
    /// embedding, output head) kept as `base` (norms and biases stay f32). Also says whether a
    /// matrix was quantized here rather than kept as the file's blocks (then the base's values
    /// differ from the file's).
    pub fn from_weights_as(
        cfg: &LlmConfig,
        weights: &mut WeightMap,
        lora: Option<&LoraConfig>,
        seed: u64,
        base: BaseDtype,
        device: &Device,
    ) -> Result<(Self, bool), TrainError> {
        if let Some(l) = lora {
            l.validate(LLM_TARGETS)?;
        }
        let mut b = Builder {
            w: weights,
            device,
            lora,
            seed,
            base,
            requantized: false,
        };
        let (d, hd) = (cfg.hidden_size, cfg.head_dim);
        let q_out = cfg.num_heads * hd;
        let kv_out = cfg.num_kv_heads * hd;
        let (embed_tokens, embed_quant) = match base.kind() {
            Some(kind) => (
                Param::from_tensor(Tensor::<2>::zeros([0, d], device)),
                Some(b.blocks("model.embed_tokens.weight", kind, cfg.vocab_size, d)?),
            ),
            None => (
                Param::from_tensor(b.tensor2("model.embed_tokens.weight", cfg.vocab_size, d)?),
                None,
            ),
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let attn = format!("{p}.self_attn");
            let mlp = format!("{p}.mlp");
            layers.push(DecoderLayer {
                input_layernorm: b.norm(&format!("{p}.input_layernorm"), d, cfg.rms_norm_eps)?,
                self_attn: Attention {
                    q_proj: b.linear(
                        &format!("{attn}.q_proj"),
                        "q_proj",
                        i,
                        d,
                        q_out,
                        cfg.qkv_bias,
                    )?,
                    k_proj: b.linear(
                        &format!("{attn}.k_proj"),
                        "k_proj",
                        i,
                        d,
                        kv_out,
                        cfg.qkv_bias,
                    )?,
                    v_proj: b.linear(
                        &format!("{attn}.v_proj"),
                        "v_proj",
                        i,
                        d,
                        kv_out,
                        cfg.qkv_bias,
                    )?,
                    o_proj: b.linear(
                        &format!("{attn}.o_proj"),
                        "o_proj",
                        i,
                        q_out,
                        d,
                        cfg.o_bias,
                    )?,
                    n_heads: cfg.num_heads,
                    n_kv_heads: cfg.num_kv_heads,
                    head_dim: hd,
                },
                post_attention_layernorm: b.norm(
                    &format!("{p}.post_attention_layernorm"),
                    d,
                    cfg.rms_norm_eps,
                )?,
                mlp: Mlp {
                    gate_proj: b.linear(
                        &format!("{mlp}.gate_proj"),
                        "gate_proj",
                        i,
                        d,
                        cfg.intermediate_size,
                        false,
                    )?,
                    up_proj: b.linear(
                        &format!("{mlp}.up_proj"),
                        "up_proj",
                        i,
                        d,
                        cfg.intermediate_size,
                        false,
                    )?,
                    down_proj: b.linear(
                        &format!("{mlp}.down_proj"),
                        "down_proj",
                        i,
                        cfg.intermediate_size,
                        d,
                        false,
                    )?,
                },
            });
        }
        let norm = b.norm("model.norm", d, cfg.rms_norm_eps)?;
        let tied = cfg.tie_word_embeddings && !b.w.contains("lm_head.weight");
        let (lm_head, lm_head_quant) = match (tied, base.kind()) {
            (true, _) => (None, None),
            (false, Some(kind)) => (
                None,
                Some(b.blocks("lm_head.weight", kind, cfg.vocab_size, d)?),
            ),
            (false, None) => {
                let head = b.w.take("lm_head.weight", &[cfg.vocab_size, d])?;
                let t = TensorData::new(transposed(&head), [d, cfg.vocab_size]);
                (
                    Some(Param::from_tensor(Tensor::<2>::from_data(t, device))),
                    None,
                )
            }
        };
        let requantized = b.requantized;
        let lm = LlamaLm {
            embed_tokens,
            layers,
            norm,
            lm_head,
            embed_quant,
            lm_head_quant,
            inv_freq: cfg.inv_freq(),
            max_positions: cfg.max_position_embeddings,
            base,
        };
        let lm = match lora {
            Some(l) => l.freeze_base(lm),
            None => lm.no_grad(),
        };
        Ok((lm, requantized))
    }

    /// Every projection with an adapter, keyed `layers.{i}.self_attn.q_proj` … (the keys of
    /// [`ExampleAdapters`]), in layer order.
    pub fn lora_layers(&self) -> Vec<(String, &LoraLinear)> {
        let mut all = self.projections();
        all.retain(|(_, p)| p.has_adapter());
        all
    }

    /// Every projection, keyed `layers.{i}.self_attn.q_proj` …, in layer order.
    fn projections(&self) -> Vec<(String, &LoraLinear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let (a, m) = (&l.self_attn, &l.mlp);
            for (name, p) in [
                ("self_attn.q_proj", &a.q_proj),
                ("self_attn.k_proj", &a.k_proj),
                ("self_attn.v_proj", &a.v_proj),
                ("self_attn.o_proj", &a.o_proj),
                ("mlp.gate_proj", &m.gate_proj),
                ("mlp.up_proj", &m.up_proj),
                ("mlp.down_proj", &m.down_proj),
            ] {
                out.push((format!("layers.{i}.{name}"), p));
            }
        }
        out
    }

    /// The longest sequence (prompt plus generated tokens) the model accepts.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Vocabulary size (width of the logits).
    pub fn vocab_size(&self) -> usize {
        match &self.embed_quant {
            Some(q) => q.rows(),
            None => self.embed_tokens.shape().dims::<2>()[0],
        }
    }

    /// How the frozen matrices are kept.
    pub fn base_dtype(&self) -> BaseDtype {
        self.base
    }

    /// Bytes the frozen base's matrices take in memory (projections, embedding, head; norms
    /// and biases left out).
    pub fn base_matrix_bytes(&self) -> usize {
        let dense = |t: &Tensor<2>| t.shape().num_elements() * 4;
        let mut n = self.embed_quant.as_ref().map_or(0, |q| q.bytes())
            + self.lm_head_quant.as_ref().map_or(0, |q| q.bytes())
            + dense(&self.embed_tokens.val())
            + self.lm_head.as_ref().map_or(0, |h| dense(&h.val()));
        for (_, p) in self.projections() {
            n += p.quant_base.as_ref().map_or(0, |q| q.bytes()) + dense(&p.weight.val());
        }
        n
    }

    /// The token embedding's blocks `[vocab, hidden]`, when it is kept quantized.
    pub fn embedding_blocks(&self) -> Option<&QuantMatrix> {
        self.embed_quant.as_deref()
    }

    /// The token embedding, dense `[vocab, hidden]` (dequantized when kept as blocks).
    pub fn dense_embedding(&self) -> Tensor<2> {
        match &self.embed_quant {
            Some(q) => q.to_tensor(&self.embed_tokens.device()),
            None => self.embed_tokens.val(),
        }
    }

    /// A separate output head, dense in burn layout `[hidden, vocab]`; `None` when tied.
    pub fn dense_lm_head(&self) -> Option<Tensor<2>> {
        match (&self.lm_head_quant, &self.lm_head) {
            (Some(q), _) => Some(q.to_tensor(&self.embed_tokens.device()).transpose()),
            (None, Some(h)) => Some(h.val()),
            (None, None) => None,
        }
    }

    /// Token embeddings of `tokens` looked up in the blocks (frozen, so no gradient).
    fn embed_blocks(q: &QuantMatrix, tokens: Tensor<2, Int>) -> Tensor<3> {
        let [b, t] = tokens.dims();
        let device = tokens.device();
        let ids: Vec<usize> = tokens
            .into_data()
            .iter::<i64>()
            .map(|i| usize::try_from(i).expect("token ids are non-negative"))
            .collect();
        let rows = q.gather_rows(&ids);
        Tensor::from_data(TensorData::new(rows, [b, t, q.cols()]), &device)
    }

    /// Next-token logits of every position.
    ///
    /// # Shapes
    /// - tokens: `[batch, seq]`
    /// - output: `[batch, seq, vocab]`
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.forward_cached(tokens, None)
    }

    /// [`forward`](Self::forward) that continues from (and extends) `cache`: the tokens are
    /// positions `cache.len()..cache.len() + seq`. With a non-empty cache `seq` must be 1
    /// (decode one token at a time after the prompt).
    pub fn forward_cached(&self, tokens: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.forward_full(tokens, cache, None)
    }

    /// [`forward`](Self::forward) with per-example adapter copies (see [`ExampleAdapters`],
    /// keyed `layers.{i}.self_attn.q_proj` …) for per-example gradients under DP.
    pub fn forward_with(&self, tokens: Tensor<2, Int>, per: Option<&ExampleAdapters>) -> Tensor<3> {
        self.forward_full(tokens, None, per)
    }

    fn forward_full(
        &self,
        tokens: Tensor<2, Int>,
        mut cache: Option<&mut KvCache>,
        per: Option<&ExampleAdapters>,
    ) -> Tensor<3> {
        let [_, t] = tokens.dims();
        let offset = cache.as_ref().map_or(0, |c| c.len);
        assert!(
            offset == 0 || t == 1,
            "after the prompt, decode one token at a time"
        );
        let device = tokens.device();
        let (cos, sin) = self.rope_tables(offset, t, &device);
        let mut x = match &self.embed_quant {
            Some(q) => Self::embed_blocks(q, tokens),
            None => embedding(self.embed_tokens.val(), tokens),
        };
        if let Some(c) = cache.as_deref_mut() {
            if c.layers.len() != self.layers.len() {
                c.layers = vec![None; self.layers.len()];
            }
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(x, &cos, &sin, slot, Proj { per, layer: i });
        }
        if let Some(c) = cache {
            c.len += t;
        }
        let x = self.norm.forward(x);
        match (&self.lm_head_quant, &self.lm_head, &self.embed_quant) {
            (Some(q), _, _) => frozen_linear(x, q),
            (None, Some(w), _) => linear(x, w.val(), None),
            (None, None, Some(q)) => frozen_linear(x, q),
            (None, None, None) => linear(x, self.embed_tokens.val().transpose(), None),
        }
    }

    /// cos and sin of the rotation angles of positions `offset..offset + t`, `[t, head_dim]`
    /// (each frequency twice: first half and second half of the head).
    fn rope_tables(&self, offset: usize, t: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let inv = &self.inv_freq;
        let d = inv.len() * 2;
        let mut cos = Vec::with_capacity(t * d);
        let mut sin = Vec::with_capacity(t * d);
        for p in offset..offset + t {
            for _half in 0..2 {
                for &f in inv {
                    let angle = p as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        (
            Tensor::from_data(TensorData::new(cos, [t, d]), device),
            Tensor::from_data(TensorData::new(sin, [t, d]), device),
        )
    }
}

/// Applies a projection with the per-example adapter copy of `layers.{layer}.{path}`, if any.
#[derive(Clone, Copy)]
struct Proj<'a> {
    per: Option<&'a ExampleAdapters>,
    layer: usize,
}

impl Proj<'_> {
    fn apply(&self, path: &str, l: &LoraLinear, x: Tensor<3>) -> Tensor<3> {
        let adapter = self
            .per
            .and_then(|m| m.get(&format!("layers.{}.{path}", self.layer)).cloned());
        l.forward_per_example(x, adapter)
    }
}

/// `x·cos + rotate_half(x)·sin` with `rotate_half([a, b]) = [-b, a]` over the head's halves
/// (fused, with its own backward pass).
fn apply_rope(x: Tensor<4>, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<4> {
    crate::fused::rope(x, cos, sin)
}

impl Attention {
    fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<2>,
        sin: &Tensor<2>,
        cache: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
        p: Proj<'_>,
    ) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let (h, kv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let split = |z: Tensor<3>, n: usize| z.reshape([b, t, n, hd]).swap_dims(1, 2);
        let q = apply_rope(
            split(p.apply("self_attn.q_proj", &self.q_proj, x.clone()), h),
            cos,
            sin,
        );
        let mut k = apply_rope(
            split(p.apply("self_attn.k_proj", &self.k_proj, x.clone()), kv),
            cos,
            sin,
        );
        let mut v = split(p.apply("self_attn.v_proj", &self.v_proj, x), kv);
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.take() {
                k = Tensor::cat(vec![pk, k], 2);
                v = Tensor::cat(vec![pv, v], 2);
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let rep = h / kv;
        let repeat = |z: Tensor<4>| {
            if rep == 1 {
                return z;
            }
            let [b, kv, s, hd] = z.dims();
            z.unsqueeze_dim::<5>(2)
                .repeat_dim(2, rep)
                .reshape([b, kv * rep, s, hd])
        };
        let ctx = if k.dims()[2] == t {
            // training and uncached prompts: fused, with its own backward pass
            causal_attention(q, repeat(k), repeat(v))
        } else {
            // one new query attends to every cached key; a prompt is causal within itself
            let opts = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: t > 1,
            };
            attention(q, repeat(k), repeat(v), None, None, opts)
        }
        .swap_dims(1, 2)
        .reshape([b, t, h * hd]);
        p.apply("self_attn.o_proj", &self.o_proj, ctx)
    }
}

impl DecoderLayer {
    fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<2>,
        sin: &Tensor<2>,
        cache: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
        p: Proj<'_>,
    ) -> Tensor<3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), cos, sin, cache, p);
        let n = self.post_attention_layernorm.forward(h.clone());
        let m = &self.mlp;
        let gate = p.apply("mlp.gate_proj", &m.gate_proj, n.clone());
        let up = p.apply("mlp.up_proj", &m.up_proj, n);
        h + p.apply("mlp.down_proj", &m.down_proj, swiglu(gate, up))
    }
}
