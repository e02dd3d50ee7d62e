//! FedProx's proximal term on the adapter: the client minimises `loss + μ/2·‖w − w_global‖²`
//! over its trainable adapter tensors `w` (Li et al. 2020), so every step's gradient gets
//! `μ·(w − w_global)`.
//!
//! The term does not depend on the client's data, so under DP-SGD it is added **after**
//! clipping and noise: it is post-processing of the noised gradient and costs no privacy.

use burn::tensor::Tensor;

use crate::trainable::{adapter_params, DpModel};

/// The anchor `w_global`: the trainable adapter tensors of `model` as it starts the round (in
/// [`adapter_params`] order, on the inner backend). `None` when `mu` is 0.
pub fn anchor<M: DpModel>(model: &M, mu: f64) -> Option<Vec<Tensor<2>>> {
    (mu > 0.0).then(|| {
        adapter_params(model)
            .into_iter()
            .map(|p| p.value.inner())
            .collect()
    })
}

/// `grads + μ·(w − anchor)` for the trainable adapter tensors `w` of `model` (all in
/// [`adapter_params`] order, inner backend).
pub fn add_proximal<M: DpModel>(
    grads: Vec<Tensor<2>>,
    model: &M,
    anchor: &[Tensor<2>],
    mu: f64,
) -> Vec<Tensor<2>> {
    grads
        .into_iter()
        .zip(adapter_params(model))
        .zip(anchor)
        .map(|((g, p), a)| g + (p.value.inner() - a.clone()).mul_scalar(mu))
        .collect()
}
