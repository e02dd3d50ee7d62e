//! LayerNorm, `y = (x − μ)·r·γ + β` with `μ = mean(x)`, `r = 1/√(var(x) + ε)` over the last
//! dimension, fused.
//!
//! Backward, with `n = (x − μ)·r` and `g = dy·γ`: `dx = r·(g − mean(g) − n·mean(g·n))`,
//! `dγ = Σ_rows dy·n`, `dβ = Σ_rows dy`. The backward pass keeps `x`, `γ` and recomputes `μ`
//! and `r` per row.
//!
//! Under autodiff burn composes LayerNorm of eight elementwise and reduction ops and keeps their
//! intermediates; the byte-level model runs nine of them per step.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex, TensorMetadata};
use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{Device, Scalar, Shape, Tensor};

use super::{f32_kernel, for_rows};

/// `[k]` → `[1, k]` for broadcasting.
fn row<B: Backend>(v: FloatTensor<B>) -> FloatTensor<B> {
    let k = v.shape().num_elements();
    B::float_reshape(v, Shape::new([1, k]))
}

/// `n = (x − μ)·r` `[m, k]` and `r` `[m, 1]`, composed of elementary ops.
fn normalized_and_rstd<B: Backend>(
    x: FloatTensor<B>,
    eps: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let c = B::float_sub(x.clone(), B::float_mean_dim(x, 1));
    let var = B::float_mean_dim(B::float_mul(c.clone(), c.clone()), 1);
    let r = B::float_recip(B::float_sqrt(B::float_add_scalar(var, Scalar::Float(eps))));
    (B::float_mul(c, r.clone()), r)
}

/// `n = (x − μ)·r`, `[m, k]`, composed of elementary ops.
fn normalized<B: Backend>(x: FloatTensor<B>, eps: f64) -> FloatTensor<B> {
    normalized_and_rstd::<B>(x, eps).0
}

/// `n·γ + β`, composed of elementary ops.
fn composed<B: Backend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    beta: FloatTensor<B>,
    eps: f64,
) -> FloatTensor<B> {
    let n = normalized::<B>(x, eps);
    B::float_add(B::float_mul(n, row::<B>(gamma)), row::<B>(beta))
}

/// `r·(g − mean(g) − n·mean(g·n))`, composed of elementary ops.
fn input_grad_composed<B: Backend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    eps: f64,
    dy: FloatTensor<B>,
) -> FloatTensor<B> {
    let (n, r) = normalized_and_rstd::<B>(x, eps);
    let g = B::float_mul(dy, row::<B>(gamma));
    let mg = B::float_mean_dim(g.clone(), 1);
    let mgn = B::float_mean_dim(B::float_mul(g.clone(), n.clone()), 1);
    let inner = B::float_sub(B::float_sub(g, mg), B::float_mul(n, mgn));
    B::float_mul(inner, r)
}

/// `μ` and `r` of one row.
fn stats(x: &[f32], eps: f64) -> (f32, f32) {
    let k = x.len() as f32;
    let mu = x.iter().sum::<f32>() / k;
    let var = x.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / k;
    (mu, 1.0 / (var + eps as f32).sqrt())
}

/// The fused LayerNorm as a backend operation (on `[m, k]` rows).
#[backend_extension(Flex, Autodiff)]
pub trait FusedLayerNorm: Backend {
    /// `(x − μ)·r·γ + β`: `x` `[m, k]`, `gamma`, `beta` `[k]`.
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        composed::<Self>(x, gamma, beta, eps)
    }

    /// `dx = r·(g − mean(g) − n·mean(g·n))` with `g = dy·γ`.
    fn fused_layer_norm_input_grad(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f64,
        dy: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        input_grad_composed::<Self>(x, gamma, eps, dy)
    }
}

impl FusedLayerNorm for Flex {
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        f32_kernel([&x, &gamma, &beta], |[xs, gs, bs], shape| {
            let k = gs.len();
            if bs.len() != k || k == 0 || xs.len() % k != 0 {
                return None;
            }
            let mut out = vec![0f32; xs.len()];
            for_rows(&mut out, k, |o, i| {
                let xr = &xs[i * k..(i + 1) * k];
                let (mu, r) = stats(xr, eps);
                for (((o, &x), &g), &b) in o.iter_mut().zip(xr).zip(gs).zip(bs) {
                    *o = (x - mu) * r * g + b;
                }
            });
            Some((out, shape.clone()))
        })
        .unwrap_or_else(|| composed::<Self>(x, gamma, beta, eps))
    }

    fn fused_layer_norm_input_grad(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f64,
        dy: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        f32_kernel([&x, &gamma, &dy], |[xs, gs, ds], shape| {
            let k = gs.len();
            if ds.len() != xs.len() || k == 0 || xs.len() % k != 0 {
                return None;
            }
            let kf = k as f32;
            let mut out = vec![0f32; xs.len()];
            for_rows(&mut out, k, |o, i| {
                let (xr, dr) = (&xs[i * k..(i + 1) * k], &ds[i * k..(i + 1) * k]);
                let (mu, r) = stats(xr, eps);
                let (mut sg, mut sgn) = (0f32, 0f32);
                for ((&x, &d), &g) in xr.iter().zip(dr).zip(gs) {
                    let gv = d * g;
                    sg += gv;
                    sgn += gv * (x - mu) * r;
                }
                let (mg, mgn) = (sg / kf, sgn / kf);
                for (((o, &x), &d), &g) in o.iter_mut().zip(xr).zip(dr).zip(gs) {
                    *o = r * (d * g - mg - (x - mu) * r * mgn);
                }
            });
            Some((out, shape.clone()))
        })
        .unwrap_or_else(|| input_grad_composed::<Self>(x, gamma, eps, dy))
    }
}

#[derive(Debug)]
struct LayerNormBackward;

impl<B: Backend + FusedLayerNorm> Backward<B, 3> for LayerNormBackward {
    /// `x`, `γ`, ε.
    type State = (FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, gamma, eps) = ops.state;
        let [px, pg, pb] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let k = gamma.shape().num_elements();
        if let Some(node) = pb {
            let s = B::float_sum_dim(dy.clone(), 0);
            grads.register::<B>(node.id, B::float_reshape(s, Shape::new([k])));
        }
        if let Some(node) = pg {
            let s = B::float_sum_dim(B::float_mul(dy.clone(), normalized::<B>(x.clone(), eps)), 0);
            grads.register::<B>(node.id, B::float_reshape(s, Shape::new([k])));
        }
        if let Some(node) = px {
            grads.register::<B>(node.id, B::fused_layer_norm_input_grad(x, gamma, eps, dy));
        }
    }
}

impl<B: Backend + FusedLayerNorm, C: CheckpointStrategy> FusedLayerNorm for Autodiff<B, C> {
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        let prep = LayerNormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful();
        let (xp, gp, bp) = (
            x.into_primitive(),
            gamma.into_primitive(),
            beta.into_primitive(),
        );
        match prep {
            OpsKind::Tracked(prep) => {
                let y = B::fused_layer_norm(xp.clone(), gp.clone(), bp, eps);
                prep.finish((xp, gp, eps), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_layer_norm(xp, gp, bp, eps)),
        }
    }
}

/// LayerNorm over the last dimension of `x` (`[.., k]`; `gamma`, `beta` `[k]`), fused.
pub fn layer_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
) -> Tensor<D> {
    let dims = x.dims();
    let k = dims[D - 1];
    let m: usize = dims[..D - 1].iter().product();
    let y = <Dispatch as FusedLayerNorm>::fused_layer_norm(
        x.reshape([m, k]).into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        eps,
    );
    Tensor::<2>::from_dispatch(y).reshape(dims)
}

/// Settings of a [`LayerNormLayer`].
#[derive(Config, Debug)]
pub struct LayerNormLayerConfig {
    /// Width `k` of the normalised dimension.
    pub d_model: usize,
    /// ε added to the variance.
    #[config(default = 1e-5)]
    pub epsilon: f64,
}

impl LayerNormLayerConfig {
    /// `γ = 1`, `β = 0`, as burn's `LayerNormConfig::init`.
    pub fn init(&self, device: &Device) -> LayerNormLayer {
        LayerNormLayer {
            gamma: Param::from_tensor(Tensor::ones([self.d_model], device)),
            beta: Param::from_tensor(Tensor::zeros([self.d_model], device)),
            epsilon: self.epsilon,
        }
    }
}

/// LayerNorm with a learned scale and shift, as burn's `LayerNorm` (same parameter names,
/// `gamma` and `beta`, so saved models load unchanged) but fused.
#[derive(Module, Debug)]
pub struct LayerNormLayer {
    /// The scale γ, `[k]`.
    pub gamma: Param<Tensor<1>>,
    /// The shift β, `[k]`.
    pub beta: Param<Tensor<1>>,
    /// ε added to the variance.
    pub epsilon: f64,
}

impl LayerNormLayer {
    /// Applies the norm over the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        layer_norm(x, self.gamma.val(), self.beta.val(), self.epsilon)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LayerNormConfig;
    use burn::tensor::Tolerance;

    #[test]
    fn forward_and_gradients_match_burns_layer_norm() {
        let device = Device::flex().autodiff();
        let tol = Tolerance::rel_abs(1e-4, 1e-5);
        for shape in [[2usize, 7, 64], [3, 1, 10]] {
            let k = shape[2];
            let x = crate::test_rand::uniform(shape, -3.0, 3.0, 1, &device).require_grad();
            let gamma = crate::test_rand::uniform([k], 0.5, 1.5, 2, &device).require_grad();
            let beta = crate::test_rand::uniform([k], -1.0, 1.0, 3, &device).require_grad();
            let probe = crate::test_rand::uniform(shape, -1.0, 1.0, 4, &device);
            let y = layer_norm(x.clone(), gamma.clone(), beta.clone(), 1e-5);
            let g = (y.clone() * probe.clone()).sum().backward();
            let mut reference = LayerNormConfig::new(k).init(&device);
            let (x2, gamma2, beta2) = (
                x.clone().detach().require_grad(),
                gamma.clone().detach().require_grad(),
                beta.clone().detach().require_grad(),
            );
            reference.gamma = Param::from_tensor(gamma2.clone());
            reference.beta = Some(Param::from_tensor(beta2.clone()));
            let y2 = reference.forward(x2.clone());
            let g2 = (y2.clone() * probe).sum().backward();
            y.into_data().assert_approx_eq::<f32>(&y2.into_data(), tol);
            let gamma_grad = gamma2.grad(&g2).unwrap();
            let beta_grad = beta2.grad(&g2).unwrap();
            crate::test_rand::assert_same_grad(&x, &g, &x2, &g2, tol);
            for (a, b) in [
                (gamma.grad(&g).unwrap(), gamma_grad),
                (beta.grad(&g).unwrap(), beta_grad),
            ] {
                a.into_data().assert_approx_eq::<f32>(&b.into_data(), tol);
            }
        }
    }

    #[test]
    fn frozen_parameters_get_no_gradient() {
        let device = Device::flex().autodiff();
        let ln = LayerNormLayerConfig::new(16).init(&device).no_grad();
        let x = crate::test_rand::uniform([4, 16], 0.0, 1.0, 5, &device).require_grad();
        let g = ln.forward(x.clone()).sum().backward();
        assert!(x.grad(&g).is_some());
        assert!(ln.gamma.val().grad(&g).is_none());
        assert!(ln.beta.val().grad(&g).is_none());
    }
}
