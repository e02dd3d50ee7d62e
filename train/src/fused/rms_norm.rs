//! RMSNorm, `y = x · r · γ` with `r = 1/√(mean(x²) + ε)` over the last dimension, fused.
//!
//! Backward, with `n = x·r` and `g = dy·γ`: `dx = r·(g − n·mean(g·n))` and `dγ = Σ_rows dy·n`.
//! The backward pass keeps `x`, `γ` and `r` (one value per row).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{binary, Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex, TensorMetadata};
use burn::module::{Module, Param};
use burn::tensor::{Scalar, Shape, Tensor};

use super::{f32_kernel, for_rows};

/// `[m, k]`, `[k]` → `[1, k]` for broadcasting.
fn row<B: Backend>(gamma: FloatTensor<B>) -> FloatTensor<B> {
    let k = gamma.shape().num_elements();
    B::float_reshape(gamma, Shape::new([1, k]))
}

/// `r = 1/√(mean(x²) + ε)`, `[m, 1]`, composed of elementary ops.
fn inv_rms<B: Backend>(x: FloatTensor<B>, eps: f64) -> FloatTensor<B> {
    let ms = B::float_mean_dim(B::float_mul(x.clone(), x), 1);
    B::float_recip(B::float_sqrt(B::float_add_scalar(ms, Scalar::Float(eps))))
}

/// `x · r · γ`, composed of elementary ops.
fn composed<B: Backend>(x: FloatTensor<B>, gamma: FloatTensor<B>, eps: f64) -> FloatTensor<B> {
    let r = inv_rms::<B>(x.clone(), eps);
    B::float_mul(B::float_mul(x, r), row::<B>(gamma))
}

/// `r·(g − n·mean(g·n))`, composed of elementary ops.
fn input_grad_composed<B: Backend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    eps: f64,
    dy: FloatTensor<B>,
) -> FloatTensor<B> {
    let r = inv_rms::<B>(x.clone(), eps);
    let n = B::float_mul(x, r.clone());
    let g = B::float_mul(dy, row::<B>(gamma));
    let c = B::float_mean_dim(B::float_mul(g.clone(), n.clone()), 1);
    B::float_mul(B::float_sub(g, B::float_mul(n, c)), r)
}

/// The fused RMSNorm as a backend operation (on `[m, k]` rows).
#[backend_extension(Flex, Autodiff)]
pub trait FusedRmsNorm: Backend {
    /// `x · r · γ`: `x` `[m, k]`, `gamma` `[k]`.
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        composed::<Self>(x, gamma, eps)
    }

    /// `dx = r·(g − n·mean(g·n))` with `g = dy·γ`, `n = x·r`.
    fn rms_norm_input_grad(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f64,
        dy: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        input_grad_composed::<Self>(x, gamma, eps, dy)
    }
}

impl FusedRmsNorm for Flex {
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        f32_kernel([&x, &gamma], |[xs, gs], shape| {
            let k = gs.len();
            if k == 0 || xs.len() % k != 0 {
                return None;
            }
            let mut out = vec![0f32; xs.len()];
            for_rows(&mut out, k, |o, i| {
                let xr = &xs[i * k..(i + 1) * k];
                let r = inv_rms_row(xr, eps);
                for ((o, &x), &g) in o.iter_mut().zip(xr).zip(gs) {
                    *o = x * r * g;
                }
            });
            Some((out, shape.clone()))
        })
        .unwrap_or_else(|| composed::<Self>(x, gamma, eps))
    }

    fn rms_norm_input_grad(
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
            let mut out = vec![0f32; xs.len()];
            for_rows(&mut out, k, |o, i| {
                let (xr, dr) = (&xs[i * k..(i + 1) * k], &ds[i * k..(i + 1) * k]);
                let r = inv_rms_row(xr, eps);
                // mean(g·n) = r·mean(dy·γ·x)
                let dot: f32 = xr.iter().zip(dr).zip(gs).map(|((x, d), g)| d * g * x).sum();
                let c = r * dot / k as f32;
                for (((o, &x), &d), &g) in o.iter_mut().zip(xr).zip(dr).zip(gs) {
                    *o = r * (d * g - x * r * c);
                }
            });
            Some((out, shape.clone()))
        })
        .unwrap_or_else(|| input_grad_composed::<Self>(x, gamma, eps, dy))
    }
}

fn inv_rms_row(x: &[f32], eps: f64) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (ss / x.len() as f32 + eps as f32).sqrt()
}

#[derive(Debug)]
struct RmsNormBackward;

impl<B: Backend + FusedRmsNorm> Backward<B, 2> for RmsNormBackward {
    /// `x`, `γ`, ε, and whether each needs a gradient.
    type State = (FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, gamma, eps) = ops.state;
        let (x2, eps2) = (x.clone(), eps);
        binary::<B, _, _>(
            ops.parents,
            ops.node,
            grads,
            |dy| B::rms_norm_input_grad(x, gamma, eps, dy),
            |dy| {
                // dγ = Σ_rows dy·x·r
                let r = inv_rms::<B>(x2.clone(), eps2);
                let n = B::float_mul(x2, r);
                let s = B::float_sum_dim(B::float_mul(dy, n), 0);
                let k = s.shape().num_elements();
                B::float_reshape(s, Shape::new([k]))
            },
        );
    }
}

impl<B: Backend + FusedRmsNorm, C: CheckpointStrategy> FusedRmsNorm for Autodiff<B, C> {
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let prep = RmsNormBackward
            .prepare::<C>([x.node(), gamma.node()])
            .compute_bound()
            .stateful();
        let (xp, gp) = (x.into_primitive(), gamma.into_primitive());
        match prep {
            OpsKind::Tracked(prep) => {
                let y = B::rms_norm(xp.clone(), gp.clone(), eps);
                prep.finish((xp, gp, eps), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rms_norm(xp, gp, eps)),
        }
    }
}

/// RMSNorm over the last dimension of `x` (`[.., k]`, `gamma` `[k]`), fused.
pub fn rms_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, eps: f64) -> Tensor<D> {
    let dims = x.dims();
    let k = dims[D - 1];
    let m: usize = dims[..D - 1].iter().product();
    let y = <Dispatch as FusedRmsNorm>::rms_norm(
        x.reshape([m, k]).into_dispatch(),
        gamma.into_dispatch(),
        eps,
    );
    Tensor::<2>::from_dispatch(y).reshape(dims)
}

/// RMSNorm with a learned (here: frozen) scale, as burn's `RmsNorm` but fused.
#[derive(Module, Debug)]
pub struct RmsNormLayer {
    /// The scale γ, `[k]`.
    pub gamma: Param<Tensor<1>>,
    /// ε added to the mean square.
    pub epsilon: f64,
}

impl RmsNormLayer {
    /// Applies the norm over the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        rms_norm(x, self.gamma.val(), self.epsilon)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Tolerance};

    /// The unfused reference, as burn's `RmsNorm` computes it.
    fn reference<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, eps: f64) -> Tensor<D> {
        let rms = (x.clone().powi_scalar(2).mean_dim(D - 1) + eps).sqrt();
        (x / rms) * gamma.unsqueeze()
    }

    #[test]
    fn forward_and_gradients_match_the_unfused_ops() {
        let device = Device::flex().autodiff();
        let tol = Tolerance::rel_abs(1e-5, 1e-5);
        for (shape, eps) in [([2usize, 7, 64], 1e-5), ([3, 1, 10], 1e-6)] {
            let x = crate::test_rand::uniform(shape, 0.0, 1.0, 1, &device).require_grad();
            let gamma = crate::test_rand::uniform([shape[2]], 0.0, 1.0, 2, &device).require_grad();
            let probe = crate::test_rand::uniform(shape, 0.0, 1.0, 3, &device);
            let y = rms_norm(x.clone(), gamma.clone(), eps);
            let g = (y.clone() * probe.clone()).sum().backward();
            let (x2, gamma2) = (
                x.clone().detach().require_grad(),
                gamma.clone().detach().require_grad(),
            );
            let y2 = reference(x2.clone(), gamma2.clone(), eps);
            let g2 = (y2.clone() * probe).sum().backward();
            y.into_data().assert_approx_eq::<f32>(&y2.into_data(), tol);
            crate::test_rand::assert_same_grad(&x, &g, &x2, &g2, tol);
            gamma
                .grad(&g)
                .unwrap()
                .into_data()
                .assert_approx_eq::<f32>(&gamma2.grad(&g2).unwrap().into_data(), tol);
        }
    }

    #[test]
    fn a_frozen_scale_gets_no_gradient_and_inference_needs_no_autodiff() {
        let device = Device::flex().autodiff();
        let x = crate::test_rand::uniform([4, 32], 0.0, 1.0, 4, &device).require_grad();
        let gamma = crate::test_rand::uniform([32], 0.0, 1.0, 5, &device);
        let g = rms_norm(x.clone(), gamma.clone(), 1e-5).sum().backward();
        assert!(x.grad(&g).is_some());
        assert!(gamma.grad(&g).is_none());
        let d = Device::flex();
        let (x, gamma) = (
            crate::test_rand::uniform([4, 32], 0.0, 1.0, 6, &d),
            Tensor::<1>::ones([32], &d),
        );
        rms_norm(x.clone(), gamma.clone(), 1e-5)
            .into_data()
            .assert_approx_eq::<f32>(
                &reference(x, gamma, 1e-5).into_data(),
                Tolerance::rel_abs(1e-5, 1e-6),
            );
    }
}
