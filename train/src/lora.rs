//! `LoraLinear`: a frozen linear layer plus a trainable low-rank update, in burn's layer style.
//!
//! `y = x·Wᵀ + b + (α/r)·x·Aᵀ·Bᵀ`, with `W` frozen, `A` `[r, d_in]` (small random init) and `B`
//! `[d_out, r]` (zeros), so a fresh adapter leaves the base model's output unchanged. burn stores
//! `W` as `[d_in, d_out]`; `A` and `B` are stored in the wire layout of
//! [`fedlora_protocol::adapter`] so that no conversion is needed when adapters travel.

use burn::config::Config;
use burn::module::{Module, Param, ParamGroup};
use burn::nn::{Dropout, DropoutConfig, Initializer};
use burn::tensor::module::linear;
use burn::tensor::{Device, Tensor};
use std::sync::Arc;

use crate::error::TrainError;
use crate::quant::{frozen_linear, BaseDtype, QuantKind, QuantMatrix};

/// Adapter-wide LoRA settings.
#[derive(Config, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank r of the update (`A` is `[r, d_in]`, `B` is `[d_out, r]`).
    #[config(default = 8)]
    pub rank: usize,
    /// Scale numerator α: the update is multiplied by α/r.
    #[config(default = 16.0)]
    pub alpha: f64,
    /// Dropout probability on the LoRA branch's input (0 disables it).
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Names of the projections that get an adapter (e.g. `q`, `v`; see the model's docs).
    #[config(default = "vec![\"q\".to_string(), \"v\".to_string()]")]
    pub targets: Vec<String>,
    /// FFA-LoRA: freeze `A` at its random init and train only `B`. Halves what is uploaded and
    /// makes averaging exact (the mean of `B·A` is `mean(B)·A`).
    #[config(default = false)]
    pub freeze_a: bool,
}

impl LoraConfig {
    /// Refuses settings that cannot make an adapter: rank 0, a non-positive or non-finite α,
    /// dropout outside [0, 1), no targets, a target the model does not have (`valid` lists the
    /// model's projection names), or the same target twice.
    pub fn validate(&self, valid: &[&str]) -> Result<(), crate::error::TrainError> {
        let bad = |m: String| Err(crate::error::TrainError::Config(m));
        if self.rank == 0 {
            return bad("LoRA rank must be at least 1 (--rank)".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!(
                "LoRA alpha must be positive, not {} (--alpha)",
                self.alpha
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!(
                "LoRA dropout must be in [0, 1), not {}",
                self.dropout
            ));
        }
        if self.targets.is_empty() {
            return bad(format!(
                "no LoRA targets: name at least one of {} (--targets)",
                valid.join(", ")
            ));
        }
        for (i, t) in self.targets.iter().enumerate() {
            if !valid.contains(&t.as_str()) {
                return bad(format!(
                    "unknown LoRA target `{t}`: valid targets are {} (--targets)",
                    valid.join(", ")
                ));
            }
            if self.targets[..i].contains(t) {
                return bad(format!("LoRA target `{t}` is listed twice (--targets)"));
            }
        }
        Ok(())
    }

    /// Whether the projection called `name` gets an adapter.
    pub fn targets(&self, name: &str) -> bool {
        self.targets.iter().any(|t| t == name)
    }

    /// The scale α/r.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Names of the trainable adapter tensors (`lora_b`, plus `lora_a` unless [`freeze_a`]).
    ///
    /// [`freeze_a`]: LoraConfig::freeze_a
    pub fn trainable_suffixes(&self) -> Vec<&'static str> {
        if self.freeze_a {
            vec!["lora_b"]
        } else {
            vec!["lora_a", "lora_b"]
        }
    }

    /// Freezes every parameter of `module`, then unfreezes its trainable adapter tensors.
    pub fn freeze_base<M: Module>(&self, module: M) -> M {
        module.no_grad().set_require_grad_group(
            ParamGroup::from_any_predicates(self.trainable_suffixes()),
            true,
        )
    }
}

/// Configuration of one [`LoraLinear`] layer.
#[derive(Config, Debug)]
pub struct LoraLinearConfig {
    /// Input features.
    pub d_input: usize,
    /// Output features.
    pub d_output: usize,
    /// Whether the frozen base has a bias.
    #[config(default = true)]
    pub bias: bool,
    /// Adapter settings; `None` makes a plain (frozen) linear layer.
    #[config(default = "None")]
    pub lora: Option<LoraConfig>,
    /// Seed of `A`'s init (ChaCha20, independent of the device's global RNG, so every client
    /// and thread builds the same `A`).
    #[config(default = 0)]
    pub a_seed: u64,
}

impl LoraLinearConfig {
    /// Initializes the layer: `W` and `b` Kaiming-uniform as burn's `Linear`, `A` uniform in
    /// ±1/√d_in, `B` zeros.
    pub fn init(&self, device: &Device) -> LoraLinear {
        let init = Initializer::KaimingUniform {
            gain: 1.0 / 3f64.sqrt(),
            fan_out_only: false,
        };
        let weight = init.init_with(
            [self.d_input, self.d_output],
            Some(self.d_input),
            Some(self.d_output),
            device,
        );
        let bias = self.bias.then(|| {
            init.init_with(
                [self.d_output],
                Some(self.d_input),
                Some(self.d_output),
                device,
            )
        });
        self.with_base(weight, bias, device)
    }

    /// Builds the layer around a given frozen base (`weight` in burn layout `[d_in, d_out]`,
    /// `bias` `[d_out]`, e.g. a pretrained model's), with the adapter initialised as in
    /// [`init`](Self::init).
    pub fn with_base(
        &self,
        weight: Param<Tensor<2>>,
        bias: Option<Param<Tensor<1>>>,
        device: &Device,
    ) -> LoraLinear {
        let (lora_a, lora_b, scaling, dropout) = match &self.lora {
            Some(cfg) => {
                use rand::{RngExt, SeedableRng};
                let bound = 1.0 / (self.d_input as f64).sqrt();
                let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(self.a_seed);
                let values: Vec<f32> = (0..cfg.rank * self.d_input)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                let a = Tensor::<2>::from_data(
                    burn::tensor::TensorData::new(values, [cfg.rank, self.d_input]),
                    device,
                );
                let b = Tensor::<2>::zeros([self.d_output, cfg.rank], device);
                (
                    Some(Param::from_tensor(a)),
                    Some(Param::from_tensor(b)),
                    cfg.scaling(),
                    (cfg.dropout > 0.0).then(|| DropoutConfig::new(cfg.dropout).init()),
                )
            }
            None => (None, None, 0.0, None),
        };
        LoraLinear {
            weight,
            quant_base: None,
            bias,
            lora_a,
            lora_b,
            scaling,
            dropout,
        }
    }
}

/// A frozen linear layer with an optional low-rank adapter. Create it with [`LoraLinearConfig`].
#[derive(Module, Debug)]
pub struct LoraLinear {
    /// Frozen base weight, burn layout `[d_in, d_out]`; empty (`[0, d_out]`) when the base is
    /// kept as blocks in [`quant_base`](Self::quant_base).
    pub weight: Param<Tensor<2>>,
    /// The frozen base as Q8_0 / Q4_1 blocks, Hugging Face layout `[d_out, d_in]`, used instead
    /// of `weight` when set (see [`crate::quant`]). Not part of the module's record: the base
    /// comes from the model file, never from a checkpoint.
    #[module(skip)]
    pub quant_base: Option<Arc<QuantMatrix>>,
    /// Frozen base bias `[d_out]`.
    pub bias: Option<Param<Tensor<1>>>,
    /// Adapter down-projection `A`, `[r, d_in]`.
    pub lora_a: Option<Param<Tensor<2>>>,
    /// Adapter up-projection `B`, `[d_out, r]`.
    pub lora_b: Option<Param<Tensor<2>>>,
    /// α/r.
    pub scaling: f64,
    /// Dropout on the adapter branch's input.
    pub dropout: Option<Dropout>,
}

impl LoraLinear {
    /// Applies the layer.
    ///
    /// # Shapes
    /// - input: `[..., d_in]`
    /// - output: `[..., d_out]`
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        if D > 2 {
            // One [batch·seq, d_in] matrix multiply instead of a batched one per example:
            // larger GEMMs, and the frozen weight packed once.
            let dims = input.dims();
            let rows = dims[..D - 1].iter().product();
            let y = self.forward(input.reshape([rows, dims[D - 1]]));
            let mut out = dims;
            out[D - 1] = y.dims()[1];
            return y.reshape(out);
        }
        let base = self.base_forward(input.clone());
        match (&self.lora_a, &self.lora_b) {
            (Some(a), Some(b)) => {
                let x = match &self.dropout {
                    Some(d) => d.forward(input),
                    None => input,
                };
                // x·Aᵀ·Bᵀ as two thin linear maps (no bias): [.., d_in] → [.., r] → [.., d_out].
                let h = linear(x, a.val().transpose(), None);
                let up = linear(h, b.val().transpose(), None);
                base + up.mul_scalar(self.scaling)
            }
            _ => base,
        }
    }

    /// Applies the layer with one adapter per example (for per-example gradients under DP).
    ///
    /// `a` is `[batch, r, d_in]` and `b` is `[batch, d_out, r]`: example `i` of the batch uses
    /// `a[i]`, `b[i]`. Without an adapter this is [`forward`](Self::forward).
    ///
    /// # Shapes
    /// - input: `[batch, seq, d_in]`
    /// - output: `[batch, seq, d_out]`
    pub fn forward_per_example(
        &self,
        input: Tensor<3>,
        adapter: Option<(Tensor<3>, Tensor<3>)>,
    ) -> Tensor<3> {
        let Some((a, b)) = adapter else {
            return self.forward(input);
        };
        let base = self.base_forward(input.clone());
        let x = match &self.dropout {
            Some(d) => d.forward(input),
            None => input,
        };
        let h = x.matmul(a.swap_dims(1, 2));
        let up = h.matmul(b.swap_dims(1, 2));
        base + up.mul_scalar(self.scaling)
    }

    /// The frozen base alone: `x·W + b`.
    fn base_forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let bias = self.bias.as_ref().map(|b| b.val());
        match &self.quant_base {
            Some(q) => {
                let y = frozen_linear(input, q);
                match bias {
                    Some(b) => y + b.unsqueeze(),
                    None => y,
                }
            }
            None => linear(input, self.weight.val(), bias),
        }
    }

    /// Keeps the frozen base as `kind` blocks: quantizes the dense weight and frees it (a
    /// no-op when the base is already blocks).
    pub fn quantize_base(self, kind: QuantKind) -> Result<Self, TrainError> {
        if self.quant_base.is_some() {
            return Ok(self);
        }
        let [d_in, d_out] = self.weight.dims();
        let values = self
            .weight
            .val()
            .transpose()
            .into_data()
            .try_into_vec::<f32>()
            .map_err(|e| TrainError::ModelFile(format!("base weight: {e:?}")))?;
        let q = QuantMatrix::quantize(kind, &values, d_out, d_in)?;
        Ok(self.with_quant_base(Arc::new(q)))
    }

    /// Uses `q` (`[d_out, d_in]` blocks) as the frozen base, replacing the dense weight.
    pub fn with_quant_base(self, q: Arc<QuantMatrix>) -> Self {
        let device = self.weight.device();
        let empty = Tensor::<2>::zeros([0, q.rows()], &device);
        Self {
            weight: Param::from_tensor(empty).set_require_grad(false),
            quant_base: Some(q),
            ..self
        }
    }

    /// The frozen base weight as a dense f32 tensor, burn layout `[d_in, d_out]` (dequantized
    /// when it is kept as blocks).
    pub fn dense_weight(&self) -> Tensor<2> {
        match &self.quant_base {
            Some(q) => q.to_tensor(&self.weight.device()).transpose(),
            None => self.weight.val(),
        }
    }

    /// How the frozen base is kept.
    pub fn base_dtype(&self) -> BaseDtype {
        match self.quant_base.as_ref().map(|q| q.kind()) {
            None => BaseDtype::F32,
            Some(QuantKind::Q8_0) => BaseDtype::Q8_0,
            Some(QuantKind::Q4_1) => BaseDtype::Q4_1,
        }
    }

    /// Whether this layer carries an adapter.
    pub fn has_adapter(&self) -> bool {
        self.lora_a.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::optim::{AdamConfig, GradientsParams};
    use burn::tensor::Distribution;
    use burn::tensor::TensorData;

    fn device() -> Device {
        Device::flex().autodiff()
    }

    fn layer(freeze_a: bool) -> LoraLinear {
        let cfg = LoraConfig::new().with_rank(4).with_freeze_a(freeze_a);
        let l = LoraLinearConfig::new(6, 5)
            .with_lora(Some(cfg.clone()))
            .init(&device());
        cfg.freeze_base(l)
    }

    fn input() -> Tensor<3> {
        Tensor::<3>::random([2, 3, 6], Distribution::Default, &device())
    }

    #[test]
    fn zero_b_gives_the_base_output_exactly() {
        let l = layer(false);
        let x = input();
        let plain = linear(x.clone(), l.weight.val(), l.bias.as_ref().map(|b| b.val()));
        let got = l.forward(x);
        assert_eq!(got.into_data(), plain.into_data());
    }

    #[test]
    fn a_quantized_base_trains_the_adapter_as_its_dequantized_dense_base_does() {
        let cfg = LoraConfig::new().with_rank(4);
        let dense = cfg.freeze_base(
            LoraLinearConfig::new(64, 5)
                .with_lora(Some(cfg.clone()))
                .init(&device()),
        );
        // B nonzero, so that both adapter factors get gradients.
        let b = Tensor::<2>::random([5, 4], Distribution::Default, &device());
        let dense = LoraLinear {
            lora_b: Some(Param::from_tensor(b).set_require_grad(true)),
            ..dense
        };
        for kind in [QuantKind::Q8_0, QuantKind::Q4_1] {
            let q = dense.clone().quantize_base(kind).unwrap();
            assert_eq!(q.weight.val().dims(), [0, 5], "the dense copy is freed");
            // The reference: the same (dequantized) base as a dense weight.
            let reference = LoraLinear {
                weight: Param::from_tensor(q.dense_weight()).set_require_grad(false),
                quant_base: None,
                ..dense.clone()
            };
            let x = Tensor::<3>::random([2, 3, 64], Distribution::Default, &device());
            let (yq, yr) = (q.forward(x.clone()), reference.forward(x));
            let tol = burn::tensor::Tolerance::absolute(1e-5);
            yq.clone()
                .into_data()
                .assert_approx_eq::<f32>(&yr.clone().into_data(), tol);
            let (gq, gr) = (
                yq.powf_scalar(2.0).sum().backward(),
                yr.powf_scalar(2.0).sum().backward(),
            );
            for (pq, pr) in [
                (
                    q.lora_a.as_ref().unwrap(),
                    reference.lora_a.as_ref().unwrap(),
                ),
                (
                    q.lora_b.as_ref().unwrap(),
                    reference.lora_b.as_ref().unwrap(),
                ),
            ] {
                pq.val()
                    .grad(&gq)
                    .unwrap()
                    .into_data()
                    .assert_approx_eq::<f32>(&pr.val().grad(&gr).unwrap().into_data(), tol);
            }
            assert_eq!(q.base_dtype(), kind_dtype(kind));
        }
    }

    fn kind_dtype(kind: QuantKind) -> BaseDtype {
        match kind {
            QuantKind::Q8_0 => BaseDtype::Q8_0,
            QuantKind::Q4_1 => BaseDtype::Q4_1,
        }
    }

    #[test]
    fn only_adapter_gets_gradients_and_base_is_bit_identical_after_a_step() {
        for freeze_a in [false, true] {
            let l = layer(freeze_a);
            let w0 = l.weight.val().into_data();
            let b0 = l.bias.as_ref().unwrap().val().into_data();
            let a0 = l.lora_a.as_ref().unwrap().val().into_data();
            let loss = l.forward(input()).powf_scalar(2.0).sum();
            let grads = loss.backward();
            assert!(l.weight.val().grad(&grads).is_none());
            assert!(l.bias.as_ref().unwrap().val().grad(&grads).is_none());
            assert_eq!(
                l.lora_a.as_ref().unwrap().val().grad(&grads).is_some(),
                !freeze_a
            );
            assert!(l.lora_b.as_ref().unwrap().val().grad(&grads).is_some());
            let gp = GradientsParams::from_grads(grads, &l);
            let mut opt = AdamConfig::new().init();
            let mut l = opt.step(0.1, l, gp);
            // B starts at zero, so A's first gradient is zero: take a second step.
            let grads = l.forward(input()).powf_scalar(2.0).sum().backward();
            let gp = GradientsParams::from_grads(grads, &l);
            l = opt.step(0.1, l, gp);
            assert_eq!(l.weight.val().into_data(), w0);
            assert_eq!(l.bias.as_ref().unwrap().val().into_data(), b0);
            let a1 = l.lora_a.as_ref().unwrap().val().into_data();
            assert_eq!(a1 == a0, freeze_a, "A moves only when trained");
            let b1 = l.lora_b.as_ref().unwrap().val().into_data();
            assert_ne!(b1, TensorData::zeros::<f32, _>([5, 4]));
        }
    }

    #[test]
    fn per_example_forward_matches_shared_adapter() {
        let mut l = layer(false);
        // give B some values so the adapter matters
        let b = Tensor::<2>::random([5, 4], Distribution::Default, &device());
        l.lora_b = Some(Param::from_tensor(b));
        let x = input();
        let shared = l.forward(x.clone());
        let a = l
            .lora_a
            .as_ref()
            .unwrap()
            .val()
            .unsqueeze_dim::<3>(0)
            .repeat_dim(0, 2);
        let b = l
            .lora_b
            .as_ref()
            .unwrap()
            .val()
            .unsqueeze_dim::<3>(0)
            .repeat_dim(0, 2);
        let per = l.forward_per_example(x, Some((a, b)));
        let diff = (shared - per).abs().max().into_scalar::<f32>();
        assert!(diff < 1e-5, "{diff}");
    }
}
