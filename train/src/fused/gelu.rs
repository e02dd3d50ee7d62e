//! The exact (erf) GELU, `y = x·Φ(x) = ½·x·(1 + erf(x/√2))`, with a vectorised `erf`.
//!
//! Backward: `dx = dy·(Φ(x) + x·φ(x))` with `φ(x) = e^(−x²/2)/√(2π)`; it keeps `x` only.
//!
//! burn's own GELU on `flex` is already one elementwise pass each way, but it calls libm's
//! scalar `erff` and `expf` per value (8.7 % and 5.5 % of the byte-level training step). This op
//! computes the same function with [`vmath`](super::vmath)'s vectorised `erf` and `exp`
//! (absolute error of `erf` ≤ 1e−6 in f32, so `|y − gelu(x)| ≤ 5e−7·|x|`). Other
//! backends keep their own `gelu` and `gelu_backward`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex};
use burn::tensor::Tensor;

use super::f32_kernel;
use super::vmath::{erf, exp, map1, map2};

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1/√(2π)`.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `x·Φ(x)` for one value.
#[inline(always)]
fn gelu_value(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
}

/// `dy·(Φ(x) + x·φ(x))` for one value.
#[inline(always)]
fn gelu_grad_value(x: f32, dy: f32) -> f32 {
    let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
    let pdf = FRAC_1_SQRT_2PI * exp(-0.5 * x * x);
    dy * (cdf + x * pdf)
}

/// The backend's own GELU (generic, so its `ActivationOps` methods are in reach).
fn own_gelu<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    B::gelu(x)
}

/// The backend's own GELU gradient.
fn own_gelu_grad<B: Backend>(x: FloatTensor<B>, dy: FloatTensor<B>) -> FloatTensor<B> {
    B::gelu_backward(x, dy)
}

/// The erf GELU as a backend operation.
#[backend_extension(Flex, Autodiff)]
pub trait FusedGelu: Backend {
    /// `x·Φ(x)`, elementwise.
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        own_gelu::<Self>(x)
    }

    /// `dy·(Φ(x) + x·φ(x))`, the gradient to `x` (same shapes).
    fn fused_gelu_grad(x: FloatTensor<Self>, dy: FloatTensor<Self>) -> FloatTensor<Self> {
        own_gelu_grad::<Self>(x, dy)
    }
}

impl FusedGelu for Flex {
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        f32_kernel([&x], |[xs], shape| {
            let mut out = vec![0f32; xs.len()];
            map1(xs, &mut out, gelu_value);
            Some((out, shape.clone()))
        })
        .unwrap_or_else(|| own_gelu::<Self>(x))
    }

    fn fused_gelu_grad(x: FloatTensor<Self>, dy: FloatTensor<Self>) -> FloatTensor<Self> {
        f32_kernel([&x, &dy], |[xs, ds], shape| {
            (xs.len() == ds.len()).then(|| {
                let mut out = vec![0f32; xs.len()];
                map2(xs, ds, &mut out, gelu_grad_value);
                (out, shape.clone())
            })
        })
        .unwrap_or_else(|| own_gelu_grad::<Self>(x, dy))
    }
}

#[derive(Debug)]
struct GeluBackward;

impl<B: Backend + FusedGelu> Backward<B, 1> for GeluBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let x = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |dy| B::fused_gelu_grad(x, dy));
    }
}

impl<B: Backend + FusedGelu, C: CheckpointStrategy> FusedGelu for Autodiff<B, C> {
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let prep = GeluBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful();
        let xp = x.into_primitive();
        match prep {
            OpsKind::Tracked(prep) => {
                let y = B::fused_gelu(xp.clone());
                prep.finish(xp, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_gelu(xp)),
        }
    }
}

/// The exact GELU, `x·Φ(x)`, elementwise, with a vectorised `erf`.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let y = <Dispatch as FusedGelu>::fused_gelu(x.into_dispatch());
    Tensor::<D>::from_dispatch(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Tolerance};

    #[test]
    fn forward_and_gradient_match_burns_gelu() {
        let device = Device::flex().autodiff();
        // erf's 1e−6 absolute error, times |x|/2 ≤ 4
        let tol = Tolerance::rel_abs(1e-5, 4e-6);
        for shape in [[2usize, 5, 48], [1, 3, 70_000]] {
            let x = crate::test_rand::uniform(shape, -8.0, 8.0, 1, &device).require_grad();
            let probe = crate::test_rand::uniform(shape, -1.0, 1.0, 3, &device);
            let y = gelu(x.clone());
            let g = (y.clone() * probe.clone()).sum().backward();
            let x2 = x.clone().detach().require_grad();
            let y2 = burn::tensor::activation::gelu(x2.clone());
            let g2 = (y2.clone() * probe).sum().backward();
            y.into_data().assert_approx_eq::<f32>(&y2.into_data(), tol);
            crate::test_rand::assert_same_grad(&x, &g, &x2, &g2, tol);
        }
    }

    #[test]
    fn without_autodiff_it_is_the_same_map() {
        let d = Device::flex();
        let x = crate::test_rand::uniform([3, 40], -4.0, 4.0, 4, &d);
        gelu(x.clone()).into_data().assert_approx_eq::<f32>(
            &burn::tensor::activation::gelu(x).into_data(),
            Tolerance::rel_abs(1e-6, 1e-6),
        );
    }
}
