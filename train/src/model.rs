//! A small byte-level causal transformer language model whose projections are [`LoraLinear`].
//!
//! Vocabulary: the 256 byte values, so any user text works without a tokenizer. Pre-norm blocks:
//! `x + attn(ln1(x))`, then `x + fc2(gelu(fc1(ln2(x))))`, learned position embeddings, a final
//! layer norm and a linear head. Projection names usable as LoRA targets: `q`, `k`, `v`, `o`
//! (attention), `fc1`, `fc2` (MLP), `head`.

use std::collections::HashMap;

/// The projections of [`Lm`] that can carry a LoRA adapter.
pub const LM_TARGETS: &[&str] = &["q", "k", "v", "o", "fc1", "fc2", "head"];

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::fused::{
    causal_attention, gelu, token_nll, LayerNormLayer as LayerNorm,
    LayerNormLayerConfig as LayerNormConfig,
};
use crate::lora::{LoraConfig, LoraLinear, LoraLinearConfig};

/// Byte vocabulary size.
pub const VOCAB: usize = 256;

/// Shape of the language model and its adapter.
#[derive(Config, Debug, PartialEq)]
pub struct LmConfig {
    /// Width of the residual stream.
    #[config(default = 128)]
    pub d_model: usize,
    /// Number of transformer blocks.
    #[config(default = 4)]
    pub n_layers: usize,
    /// Attention heads (must divide `d_model`).
    #[config(default = 4)]
    pub n_heads: usize,
    /// Hidden width of the MLP.
    #[config(default = 512)]
    pub d_ff: usize,
    /// Context length in bytes (one training example is one window of this many + 1 bytes).
    #[config(default = 64)]
    pub context: usize,
    /// The adapter; `None` builds the plain base model (all weights, no adapter).
    #[config(default = "Some(LoraConfig::new())")]
    pub lora: Option<LoraConfig>,
    /// Seed of the random init (base weights and the adapter's `A`), so every client builds the
    /// same `A` (needed by FFA-LoRA, where `A` is never sent).
    #[config(default = 7)]
    pub seed: u64,
}

impl LmConfig {
    fn proj(&self, name: &str, layer: usize, d_in: usize, d_out: usize) -> LoraLinearConfig {
        let lora = self.lora.as_ref().filter(|l| l.targets(name)).cloned();
        let which = ["q", "k", "v", "o", "fc1", "fc2", "head"]
            .iter()
            .position(|n| *n == name)
            .unwrap_or(7) as u64;
        LoraLinearConfig::new(d_in, d_out)
            .with_lora(lora)
            .with_a_seed(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (layer as u64 * 8 + which))
    }

    /// Builds the model with seeded weights. With an adapter, every base weight is frozen and only
    /// the adapter's trainable tensors require gradients.
    pub fn init(&self, device: &Device) -> Lm {
        assert!(
            self.d_model.is_multiple_of(self.n_heads),
            "n_heads must divide d_model"
        );
        device.seed(self.seed);
        let blocks = (0..self.n_layers)
            .map(|i| Block {
                ln1: LayerNormConfig::new(self.d_model).init(device),
                q: self.proj("q", i, self.d_model, self.d_model).init(device),
                k: self.proj("k", i, self.d_model, self.d_model).init(device),
                v: self.proj("v", i, self.d_model, self.d_model).init(device),
                o: self.proj("o", i, self.d_model, self.d_model).init(device),
                ln2: LayerNormConfig::new(self.d_model).init(device),
                fc1: self.proj("fc1", i, self.d_model, self.d_ff).init(device),
                fc2: self.proj("fc2", i, self.d_ff, self.d_model).init(device),
                n_heads: self.n_heads,
            })
            .collect();
        let lm = Lm {
            tok: EmbeddingConfig::new(VOCAB, self.d_model).init(device),
            pos: EmbeddingConfig::new(self.context, self.d_model).init(device),
            blocks,
            ln_f: LayerNormConfig::new(self.d_model).init(device),
            head: self
                .proj("head", self.n_layers, self.d_model, VOCAB)
                .init(device),
            context: self.context,
        };
        match &self.lora {
            Some(l) => l.freeze_base(lm),
            None => lm,
        }
    }
}

/// Per-example adapter copies for one forward pass, keyed by projection path
/// (e.g. `blocks.0.q`): `(A [batch, r, d_in], B [batch, d_out, r])`.
pub type ExampleAdapters = HashMap<String, (Tensor<3>, Tensor<3>)>;

/// One pre-norm transformer block.
#[derive(Module, Debug)]
pub struct Block {
    ln1: LayerNorm,
    /// Query projection.
    pub q: LoraLinear,
    /// Key projection.
    pub k: LoraLinear,
    /// Value projection.
    pub v: LoraLinear,
    /// Output projection.
    pub o: LoraLinear,
    ln2: LayerNorm,
    /// MLP up-projection.
    pub fc1: LoraLinear,
    /// MLP down-projection.
    pub fc2: LoraLinear,
    n_heads: usize,
}

impl Block {
    fn forward(&self, x: Tensor<3>, i: usize, per: Option<&ExampleAdapters>) -> Tensor<3> {
        let p = |name: &str, layer: &LoraLinear, x: Tensor<3>| {
            let adapter = per.and_then(|m| m.get(&format!("blocks.{i}.{name}")).cloned());
            layer.forward_per_example(x, adapter)
        };
        let [b, t, d] = x.dims();
        let h = self.n_heads;
        let dk = d / h;
        let y = self.ln1.forward(x.clone());
        let heads = |z: Tensor<3>| z.reshape([b, t, h, dk]).swap_dims(1, 2);
        let q = heads(p("q", &self.q, y.clone()));
        let k = heads(p("k", &self.k, y.clone()));
        let v = heads(p("v", &self.v, y));
        let ctx = causal_attention(q, k, v).swap_dims(1, 2).reshape([b, t, d]);
        let x = x + p("o", &self.o, ctx);
        let y = self.ln2.forward(x.clone());
        let y = p("fc2", &self.fc2, gelu(p("fc1", &self.fc1, y)));
        x + y
    }
}

/// The byte-level causal LM. Build it with [`LmConfig::init`].
#[derive(Module, Debug)]
pub struct Lm {
    tok: Embedding,
    pos: Embedding,
    /// The transformer blocks.
    pub blocks: Vec<Block>,
    ln_f: LayerNorm,
    /// Output projection to byte logits.
    pub head: LoraLinear,
    context: usize,
}

impl Lm {
    /// Next-byte logits.
    ///
    /// # Shapes
    /// - tokens: `[batch, seq]` with `seq ≤ context`
    /// - output: `[batch, seq, 256]`
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.forward_with(tokens, None)
    }

    /// [`forward`](Self::forward) with optional per-example adapter copies (see
    /// [`ExampleAdapters`]); projections not in the map use the shared adapter.
    pub fn forward_with(&self, tokens: Tensor<2, Int>, per: Option<&ExampleAdapters>) -> Tensor<3> {
        let [_, t] = tokens.dims();
        assert!(
            t <= self.context,
            "sequence of {t} exceeds context {}",
            self.context
        );
        let device = tokens.device();
        let pos = Tensor::<1, Int>::arange(0..t as i64, &device).unsqueeze_dim::<2>(0);
        let mut x = self.tok.forward(tokens) + self.pos.forward(pos);
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(x, i, per);
        }
        let x = self.ln_f.forward(x);
        let adapter = per.and_then(|m| m.get("head").cloned());
        self.head.forward_per_example(x, adapter)
    }

    /// Mean next-byte cross-entropy of each example, nats per byte.
    ///
    /// # Shapes
    /// - windows: `[batch, seq + 1]` (inputs are the first `seq` bytes, targets the last `seq`)
    /// - output: `[batch]`
    pub fn per_example_loss(
        &self,
        windows: Tensor<2, Int>,
        per: Option<&ExampleAdapters>,
    ) -> Tensor<1> {
        let [b, n] = windows.dims();
        let inputs = windows.clone().slice([0..b, 0..n - 1]);
        let targets = windows.slice([0..b, 1..n]);
        let logits = self.forward_with(inputs, per);
        token_nll(logits, targets).mean_dim(1).reshape([b])
    }

    /// Per-example mean next-byte cross-entropy (nats per byte) and share of bytes whose most
    /// likely prediction is right, from one forward pass (evaluation).
    ///
    /// # Shapes
    /// - windows: `[batch, seq + 1]`
    /// - outputs: `[batch]`, `[batch]`
    pub fn loss_and_accuracy(&self, windows: Tensor<2, Int>) -> (Tensor<1>, Tensor<1>) {
        let [b, n] = windows.dims();
        let inputs = windows.clone().slice([0..b, 0..n - 1]);
        let targets = windows.slice([0..b, 1..n]).unsqueeze_dim::<3>(2);
        let logits = self.forward_with(inputs, None);
        let hits = logits
            .clone()
            .argmax(2)
            .equal(targets.clone())
            .float()
            .reshape([b, n - 1])
            .mean_dim(1)
            .reshape([b]);
        let loss = token_nll(logits, targets.reshape([b, n - 1]))
            .mean_dim(1)
            .reshape([b]);
        (loss, hits)
    }

    /// Mean next-byte cross-entropy over the batch, nats per byte.
    pub fn loss(&self, windows: Tensor<2, Int>) -> Tensor<1> {
        self.per_example_loss(windows, None).mean()
    }

    /// Context length in bytes.
    pub fn context(&self) -> usize {
        self.context
    }
}

/// Packs byte windows (each `seq + 1` long) into an int tensor `[batch, seq + 1]`.
pub fn windows_tensor(windows: &[&[u8]], device: &Device) -> Tensor<2, Int> {
    let n = windows.first().map_or(0, |w| w.len());
    let flat: Vec<i64> = windows
        .iter()
        .flat_map(|w| {
            assert_eq!(w.len(), n, "windows must have equal length");
            w.iter().map(|&b| i64::from(b))
        })
        .collect();
    Tensor::<2, Int>::from_data(TensorData::new(flat, [windows.len(), n]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{collect_named, NamedFilter};

    fn tiny(lora: Option<LoraConfig>) -> LmConfig {
        LmConfig::new()
            .with_d_model(16)
            .with_n_layers(2)
            .with_n_heads(2)
            .with_d_ff(32)
            .with_context(8)
            .with_lora(lora)
    }

    fn batch(device: &Device) -> Tensor<2, Int> {
        let text = b"to be or not to be, that is the question";
        let w: Vec<&[u8]> = vec![&text[0..9], &text[9..18], &text[18..27]];
        windows_tensor(&w, device)
    }

    #[test]
    fn evaluation_loss_matches_the_training_loss_and_accuracy_counts_argmax_hits() {
        let device = Device::flex();
        let lm = tiny(None).init(&device);
        let (loss, acc) = lm.loss_and_accuracy(batch(&device));
        let reference = lm.per_example_loss(batch(&device), None);
        let d = (loss - reference).abs().max().into_scalar::<f32>();
        assert!(d <= 1e-6, "{d}");
        // accuracy by hand: argmax of each position's logits against the next byte
        let w = batch(&device);
        let [b, n] = w.dims();
        let logits = lm.forward(w.clone().slice([0..b, 0..n - 1]));
        let pred: Vec<i64> = logits
            .argmax(2)
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .unwrap();
        let tgt: Vec<i64> = w
            .slice([0..b, 1..n])
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .unwrap();
        let hits = pred.iter().zip(&tgt).filter(|(p, t)| p == t).count() as f32;
        let mean = acc.mean().into_scalar::<f32>();
        assert!((mean - hits / (b * (n - 1)) as f32).abs() < 1e-6);
    }

    #[test]
    fn adapter_with_zero_b_equals_base_model_exactly() {
        let device = Device::flex().autodiff();
        let base = tiny(None).init(&device);
        let lora = tiny(Some(LoraConfig::new().with_rank(2))).init(&device);
        // copy the base weights into the LoRA model (same seed makes them equal already; check)
        let bw = collect_named(&base, NamedFilter::All);
        let lw = collect_named(&lora, NamedFilter::Base);
        assert_eq!(bw.len(), lw.len());
        for (a, b) in bw.iter().zip(&lw) {
            assert_eq!(a.0, b.0);
        }
        let lora = crate::adapter::assign_named(lora, &bw).unwrap();
        let x = batch(&device).slice([0..3, 0..8]);
        let y0 = base.forward(x.clone()).into_data();
        let y1 = lora.forward(x).into_data();
        assert_eq!(y0, y1);
    }

    #[test]
    fn loss_is_near_log_256_at_init_and_per_example_matches_mean() {
        let device = Device::flex();
        let lm = tiny(None).init(&device);
        let w = batch(&device);
        let per = lm.per_example_loss(w.clone(), None);
        let mean = lm.loss(w).into_scalar::<f32>();
        let per_mean = per.mean().into_scalar::<f32>();
        assert!((mean - per_mean).abs() < 1e-6);
        assert!((mean - (256f32).ln()).abs() < 1.0, "{mean}");
    }
}
