//! What a local training loop needs of a model ([`DpModel`]: its adapted projections and each
//! example's own loss), and its trainable adapter tensors in a fixed order. The plain loop
//! ([`crate::train`]), DP-SGD ([`crate::dp_sgd`]) and FedProx's term ([`crate::proximal`])
//! all build on this.

use burn::module::ParamId;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};

use crate::lora::LoraLinear;
use crate::model::{windows_tensor, ExampleAdapters, Lm};

/// What DP-SGD needs of a model: its adapted projections, and each example's own loss with
/// per-example adapter copies.
///
/// The DP unit is one `Example` (one window of the byte-level LM; one window or one chat
/// conversation of a real LLM).
pub trait DpModel {
    /// One training example.
    type Example: ?Sized;

    /// Every projection with an adapter, keyed by the path [`ExampleAdapters`] uses, in a
    /// fixed order.
    fn lora_layers(&self) -> Vec<(String, &LoraLinear)>;

    /// The loss of each example (its mean over the example's scored tokens), with the
    /// adapters of `per` where given.
    ///
    /// # Shapes
    /// - output: `[examples.len()]`
    fn example_losses(
        &self,
        examples: &[&Self::Example],
        per: Option<&ExampleAdapters>,
        device: &Device,
    ) -> Tensor<1>;
}

impl DpModel for Lm {
    type Example = [u8];

    fn lora_layers(&self) -> Vec<(String, &LoraLinear)> {
        layers(self)
    }

    fn example_losses(
        &self,
        examples: &[&[u8]],
        per: Option<&ExampleAdapters>,
        device: &Device,
    ) -> Tensor<1> {
        self.per_example_loss(windows_tensor(examples, device), per)
    }
}

/// One trainable adapter tensor of the model.
#[derive(Clone, Debug)]
pub struct AdapterParam {
    /// Projection path, e.g. `blocks.0.q`.
    pub layer: String,
    /// `lora_a` or `lora_b`.
    pub name: &'static str,
    /// The parameter's id (gradients are registered under it).
    pub id: ParamId,
    /// Current value (autodiff device).
    pub value: Tensor<2>,
}

/// Every LoRA layer of `lm`: (path, layer).
fn layers(lm: &Lm) -> Vec<(String, &LoraLinear)> {
    let mut out = Vec::new();
    for (i, b) in lm.blocks.iter().enumerate() {
        for (n, l) in [
            ("q", &b.q),
            ("k", &b.k),
            ("v", &b.v),
            ("o", &b.o),
            ("fc1", &b.fc1),
            ("fc2", &b.fc2),
        ] {
            if l.has_adapter() {
                out.push((format!("blocks.{i}.{n}"), l));
            }
        }
    }
    if lm.head.has_adapter() {
        out.push(("head".to_string(), &lm.head));
    }
    out
}

/// The trainable adapter tensors of `lm`, in a fixed order.
pub fn adapter_params<M: DpModel>(lm: &M) -> Vec<AdapterParam> {
    let mut out = Vec::new();
    for (path, l) in lm.lora_layers() {
        for (name, p) in [("lora_a", &l.lora_a), ("lora_b", &l.lora_b)] {
            let p = p.as_ref().expect("layer has an adapter");
            let v = p.val();
            if v.is_require_grad() {
                out.push(AdapterParam {
                    layer: path.clone(),
                    name,
                    id: p.id,
                    value: v,
                });
            }
        }
    }
    out
}

/// Every float parameter's id, in the module's visiting order.
struct VisitOrder(Vec<ParamId>);

impl burn::module::ModuleVisitor for VisitOrder {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        self.0.push(param.id);
    }
}

/// Where each index of the flat adapter ([`crate::adapter::extract_adapter`]'s layout: the
/// trainable adapter tensors in the module's visiting order, each row-major) lies among
/// [`adapter_params`]: (tensor index, row-major offset). Indexes past the adapter are dropped.
pub fn flat_positions<M: DpModel + burn::module::Module>(
    lm: &M,
    flat: &[usize],
) -> Vec<(usize, usize)> {
    if flat.is_empty() {
        return Vec::new();
    }
    let params = adapter_params(lm);
    let index: std::collections::HashMap<ParamId, usize> =
        params.iter().enumerate().map(|(j, p)| (p.id, j)).collect();
    let mut order = VisitOrder(Vec::new());
    lm.visit(&mut order);
    // (flat start, tensor index, length) in flat order
    let mut spans = Vec::new();
    let mut start = 0;
    for id in order.0 {
        if let Some(&j) = index.get(&id) {
            let len = params[j].value.dims().iter().product::<usize>();
            spans.push((start, j, len));
            start += len;
        }
    }
    flat.iter()
        .filter_map(|&k| {
            spans
                .iter()
                .find(|(s, _, len)| k >= *s && k < s + len)
                .map(|&(s, j, _)| (j, k - s))
        })
        .collect()
}

/// Registers `grads` (in [`adapter_params`] order) for an optimizer step.
pub fn to_gradients_params<M: DpModel>(lm: &M, grads: Vec<Tensor<2>>) -> GradientsParams {
    let mut gp = GradientsParams::new();
    for (p, g) in adapter_params(lm).into_iter().zip(grads) {
        gp.register(p.id, g);
    }
    gp
}
