//! SwiGLU's gate, `y = silu(g) · u = g·σ(g)·u`, fused.
//!
//! Backward, with `s = σ(g)`: `dg = dy·u·s·(1 + g·(1 − s))`, `du = dy·g·s`. The backward pass
//! keeps `g` and `u` and recomputes `s`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{binary, Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex};
use burn::tensor::{Scalar, Tensor};

use super::f32_kernel;
use super::vmath::{exp, map2, map3};

/// `σ(x) = 1/(1 + e^−x)` with the vectorised [`exp`](super::vmath::exp) (saturating, so no
/// overflow: `σ(−100)` is about 6e−39 instead of 0).
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `f(a, b)` elementwise over two same-shape f32 flex tensors (`None`: not f32 or not the same
/// length).
fn zip2(
    a: &FloatTensor<Flex>,
    b: &FloatTensor<Flex>,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Option<FloatTensor<Flex>> {
    f32_kernel([a, b], |[a, b], shape| {
        (a.len() == b.len()).then(|| {
            let mut out = vec![0f32; a.len()];
            map2(a, b, &mut out, f);
            (out, shape.clone())
        })
    })
}

/// `silu(g)·u`, composed of elementary ops.
fn composed<B: Backend>(g: FloatTensor<B>, u: FloatTensor<B>) -> FloatTensor<B> {
    B::float_mul(B::float_mul(g.clone(), B::sigmoid(g)), u)
}

/// `dy·u·s·(1 + g·(1 − s))`, composed of elementary ops.
fn gate_grad_composed<B: Backend>(
    g: FloatTensor<B>,
    u: FloatTensor<B>,
    dy: FloatTensor<B>,
) -> FloatTensor<B> {
    let s = B::sigmoid(g.clone());
    let one_minus = B::float_add_scalar(B::float_neg(s.clone()), Scalar::Float(1.0));
    let inner = B::float_add_scalar(B::float_mul(g, one_minus), Scalar::Float(1.0));
    B::float_mul(B::float_mul(B::float_mul(dy, u), s), inner)
}

/// `dy·g·s`, composed of elementary ops.
fn up_grad_composed<B: Backend>(g: FloatTensor<B>, dy: FloatTensor<B>) -> FloatTensor<B> {
    B::float_mul(dy, B::float_mul(g.clone(), B::sigmoid(g)))
}

/// The fused SwiGLU gate as a backend operation.
#[backend_extension(Flex, Autodiff)]
pub trait FusedSwiglu: Backend {
    /// `silu(g)·u` (same shapes).
    fn swiglu(g: FloatTensor<Self>, u: FloatTensor<Self>) -> FloatTensor<Self> {
        composed::<Self>(g, u)
    }

    /// `dy·u·s·(1 + g·(1 − s))`, the gradient to `g`.
    fn swiglu_gate_grad(
        g: FloatTensor<Self>,
        u: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        gate_grad_composed::<Self>(g, u, dy)
    }

    /// `dy·g·s`, the gradient to `u`.
    fn swiglu_up_grad(g: FloatTensor<Self>, dy: FloatTensor<Self>) -> FloatTensor<Self> {
        up_grad_composed::<Self>(g, dy)
    }
}

impl FusedSwiglu for Flex {
    fn swiglu(g: FloatTensor<Self>, u: FloatTensor<Self>) -> FloatTensor<Self> {
        zip2(&g, &u, |g, u| g * sigmoid(g) * u).unwrap_or_else(|| composed::<Self>(g, u))
    }

    fn swiglu_gate_grad(
        g: FloatTensor<Self>,
        u: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        f32_kernel([&g, &u, &dy], |[gs, us, ds], shape| {
            (gs.len() == us.len() && gs.len() == ds.len()).then(|| {
                let mut out = vec![0f32; gs.len()];
                map3(gs, us, ds, &mut out, |g, u, d| {
                    let s = sigmoid(g);
                    d * u * s * (1.0 + g * (1.0 - s))
                });
                (out, shape.clone())
            })
        })
        .unwrap_or_else(|| gate_grad_composed::<Self>(g, u, dy))
    }

    fn swiglu_up_grad(g: FloatTensor<Self>, dy: FloatTensor<Self>) -> FloatTensor<Self> {
        zip2(&g, &dy, |g, d| d * g * sigmoid(g)).unwrap_or_else(|| up_grad_composed::<Self>(g, dy))
    }
}

#[derive(Debug)]
struct SwigluBackward;

impl<B: Backend + FusedSwiglu> Backward<B, 2> for SwigluBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (g, u) = ops.state;
        let g2 = g.clone();
        binary::<B, _, _>(
            ops.parents,
            ops.node,
            grads,
            |dy| B::swiglu_gate_grad(g, u, dy),
            |dy| B::swiglu_up_grad(g2, dy),
        );
    }
}

impl<B: Backend + FusedSwiglu, C: CheckpointStrategy> FusedSwiglu for Autodiff<B, C> {
    fn swiglu(g: FloatTensor<Self>, u: FloatTensor<Self>) -> FloatTensor<Self> {
        let prep = SwigluBackward
            .prepare::<C>([g.node(), u.node()])
            .compute_bound()
            .stateful();
        let (gp, up) = (g.into_primitive(), u.into_primitive());
        match prep {
            OpsKind::Tracked(prep) => {
                let y = B::swiglu(gp.clone(), up.clone());
                prep.finish((gp, up), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::swiglu(gp, up)),
        }
    }
}

/// `silu(gate) · up`, fused (same shapes).
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    assert_eq!(
        gate.dims(),
        up.dims(),
        "SwiGLU's gate and up projections differ in shape"
    );
    let y = <Dispatch as FusedSwiglu>::swiglu(gate.into_dispatch(), up.into_dispatch());
    Tensor::<D>::from_dispatch(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::silu;
    use burn::tensor::{Device, Tolerance};

    #[test]
    fn forward_and_gradients_match_the_unfused_ops() {
        let device = Device::flex().autodiff();
        let tol = Tolerance::rel_abs(1e-5, 1e-6);
        for shape in [[2usize, 5, 48], [1, 3, 70_000]] {
            let g = crate::test_rand::uniform(shape, -8.0, 8.0, 1, &device).require_grad();
            let u = crate::test_rand::uniform(shape, 0.0, 1.0, 2, &device).require_grad();
            let probe = crate::test_rand::uniform(shape, 0.0, 1.0, 3, &device);
            let y = swiglu(g.clone(), u.clone());
            let gr = (y.clone() * probe.clone()).sum().backward();
            let (g2, u2) = (
                g.clone().detach().require_grad(),
                u.clone().detach().require_grad(),
            );
            let y2 = silu(g2.clone()) * u2.clone();
            let gr2 = (y2.clone() * probe).sum().backward();
            y.into_data().assert_approx_eq::<f32>(&y2.into_data(), tol);
            crate::test_rand::assert_same_grad(&g, &gr, &g2, &gr2, tol);
            crate::test_rand::assert_same_grad(&u, &gr, &u2, &gr2, tol);
        }
    }

    #[test]
    fn without_autodiff_it_is_the_same_map() {
        let d = Device::flex();
        let g = crate::test_rand::uniform([3, 40], 0.0, 1.0, 4, &d);
        let u = crate::test_rand::uniform([3, 40], 0.0, 1.0, 5, &d);
        swiglu(g.clone(), u.clone())
            .into_data()
            .assert_approx_eq::<f32>(&(silu(g) * u).into_data(), Tolerance::rel_abs(1e-6, 1e-7));
    }
}
