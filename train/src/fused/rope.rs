//! Rotary position embedding in Hugging Face's rotate-half layout, fused:
//! `y = x·cos + rotate_half(x)·sin` with `rotate_half([x₁, x₂]) = [−x₂, x₁]` over the two halves
//! of each head.
//!
//! The map is linear in `x`, so the backward pass keeps nothing but the tables:
//! `dx₁ = dy₁·cos₁ + dy₂·sin₂`, `dx₂ = dy₂·cos₂ − dy₁·sin₁`.
//!
//! Composed, burn slices `x` twice, negates, concatenates, multiplies twice and adds, and keeps
//! the pieces for the backward pass; fused it is one pass each way. The tables (`cos`, `sin`,
//! `[seq, head_dim]`) are constants: they get no gradient.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex, TensorMetadata};
use burn::tensor::{Shape, Tensor, TensorData};

use super::{f32_kernel, for_rows};

/// `[t, d]` → `[1, 1, t, d]` for broadcasting.
fn table<B: Backend>(t: FloatTensor<B>) -> FloatTensor<B> {
    let s = t.shape();
    B::float_reshape(t, Shape::new([1, 1, s[0], s[1]]))
}

/// The `[d, d]` matrix `R` with `x·R = rotate_half(x)` (or, `transposed`, `x·Rᵀ`).
fn rotation<B: Backend>(d: usize, transposed: bool, like: &FloatTensor<B>) -> FloatTensor<B> {
    let h = d / 2;
    let mut r = vec![0f32; d * d];
    for j in 0..h {
        // rotate_half(x)[j] = −x[j + h], rotate_half(x)[j + h] = x[j]
        let (a, b) = if transposed { (j, j + h) } else { (j + h, j) };
        r[a * d + b] = -1.0;
        r[b * d + a] = 1.0;
    }
    B::float_from_data(TensorData::new(r, [d, d]), &like.device())
}

/// `x·cos + rotate_half(x)·sin`, composed of elementary ops.
fn composed<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
) -> FloatTensor<B> {
    let d = x.shape()[3];
    let rot = B::float_matmul(x.clone(), rotation::<B>(d, false, &x));
    B::float_add(
        B::float_mul(x, table::<B>(cos)),
        B::float_mul(rot, table::<B>(sin)),
    )
}

/// `dy·cos + rotate_halfᵀ(dy·sin)`, composed of elementary ops.
fn grad_composed<B: Backend>(
    dy: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
) -> FloatTensor<B> {
    let d = dy.shape()[3];
    let ds = B::float_mul(dy.clone(), table::<B>(sin));
    let r = rotation::<B>(d, true, &dy);
    B::float_add(B::float_mul(dy, table::<B>(cos)), B::float_matmul(ds, r))
}

/// RoPE as a backend operation: `x` `[b, h, t, d]`, `cos`, `sin` `[t, d]`.
#[backend_extension(Flex, Autodiff)]
pub trait FusedRope: Backend {
    /// `x·cos + rotate_half(x)·sin`.
    fn fused_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        composed::<Self>(x, cos, sin)
    }

    /// The gradient to `x`: `dy·cos + rotate_halfᵀ(dy·sin)`.
    fn fused_rope_grad(
        dy: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        grad_composed::<Self>(dy, cos, sin)
    }
}

/// One pass over `[.., t, d]` rows: `forward` rotates, otherwise applies the transpose.
fn rope_rows(x: &[f32], c: &[f32], s: &[f32], t: usize, d: usize, forward: bool) -> Vec<f32> {
    let h = d / 2;
    let mut out = vec![0f32; x.len()];
    for_rows(&mut out, d, |o, r| {
        let p = r % t;
        let (xr, cr, sr) = (
            &x[r * d..(r + 1) * d],
            &c[p * d..(p + 1) * d],
            &s[p * d..(p + 1) * d],
        );
        let (x1, x2) = xr.split_at(h);
        let (o1, o2) = o.split_at_mut(h);
        for j in 0..h {
            if forward {
                o1[j] = x1[j] * cr[j] - x2[j] * sr[j];
                o2[j] = x2[j] * cr[j + h] + x1[j] * sr[j + h];
            } else {
                o1[j] = x1[j] * cr[j] + x2[j] * sr[j + h];
                o2[j] = x2[j] * cr[j + h] - x1[j] * sr[j];
            }
        }
    });
    out
}

/// The flex kernel, or `None` for shapes or dtypes it does not take.
fn flex_rope(
    x: &FloatTensor<Flex>,
    cos: &FloatTensor<Flex>,
    sin: &FloatTensor<Flex>,
    forward: bool,
) -> Option<FloatTensor<Flex>> {
    f32_kernel([x, cos, sin], |[xs, c, s], shape| {
        if shape.num_dims() != 4 {
            return None;
        }
        let (t, d) = (shape[2], shape[3]);
        let ok = d % 2 == 0 && c.len() == t * d && s.len() == t * d;
        ok.then(|| (rope_rows(xs, c, s, t, d, forward), shape.clone()))
    })
}

impl FusedRope for Flex {
    fn fused_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        flex_rope(&x, &cos, &sin, true).unwrap_or_else(|| composed::<Self>(x, cos, sin))
    }

    fn fused_rope_grad(
        dy: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        flex_rope(&dy, &cos, &sin, false).unwrap_or_else(|| grad_composed::<Self>(dy, cos, sin))
    }
}

#[derive(Debug)]
struct RopeBackward;

impl<B: Backend + FusedRope> Backward<B, 1> for RopeBackward {
    /// The tables `cos`, `sin`.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (cos, sin) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |dy| {
            B::fused_rope_grad(dy, cos, sin)
        });
    }
}

impl<B: Backend + FusedRope, C: CheckpointStrategy> FusedRope for Autodiff<B, C> {
    fn fused_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let prep = RopeBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful();
        let (xp, cp, sp) = (
            x.into_primitive(),
            cos.into_primitive(),
            sin.into_primitive(),
        );
        match prep {
            OpsKind::Tracked(prep) => {
                let y = B::fused_rope(xp, cp.clone(), sp.clone());
                prep.finish((cp, sp), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_rope(xp, cp, sp)),
        }
    }
}

/// RoPE on `x` `[batch, heads, seq, head_dim]` with tables `cos`, `sin` `[seq, head_dim]`
/// (each frequency in both halves, as Hugging Face's Llama builds them).
pub fn rope(x: Tensor<4>, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<4> {
    let [_, _, t, d] = x.dims();
    assert!(
        cos.dims() == [t, d] && sin.dims() == [t, d] && d % 2 == 0,
        "rope: tables must be [seq, head_dim] of the input, head_dim even"
    );
    let y = <Dispatch as FusedRope>::fused_rope(
        x.into_dispatch(),
        cos.clone().into_dispatch(),
        sin.clone().into_dispatch(),
    );
    Tensor::<4>::from_dispatch(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Tolerance};

    /// The unfused reference, as the model composed it before.
    fn reference(x: Tensor<4>, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<4> {
        let [b, h, t, d] = x.dims();
        let half = d / 2;
        let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..half]);
        let x2 = x.clone().slice([0..b, 0..h, 0..t, half..d]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        let cos = cos.clone().unsqueeze_dims::<4>(&[0, 1]);
        let sin = sin.clone().unsqueeze_dims::<4>(&[0, 1]);
        x * cos + rotated * sin
    }

    #[test]
    fn forward_and_gradient_match_the_composed_rotation() {
        let device = Device::flex().autodiff();
        let tol = Tolerance::rel_abs(1e-5, 1e-6);
        let (b, h, t, d) = (2, 3, 5, 8);
        let x = crate::test_rand::uniform([b, h, t, d], -2.0, 2.0, 1, &device).require_grad();
        let angles = crate::test_rand::uniform([t, d], -3.0, 3.0, 2, &device);
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        let probe = crate::test_rand::uniform([b, h, t, d], -1.0, 1.0, 3, &device);
        let y = rope(x.clone(), &cos, &sin);
        let g = (y.clone() * probe.clone()).sum().backward();
        let x2 = x.clone().detach().require_grad();
        let y2 = reference(x2.clone(), &cos, &sin);
        let g2 = (y2.clone() * probe).sum().backward();
        y.into_data().assert_approx_eq::<f32>(&y2.into_data(), tol);
        crate::test_rand::assert_same_grad(&x, &g, &x2, &g2, tol);
        // a non-contiguous input (heads split by a swap of dims, as the model does)
        let flex = Device::flex();
        let angles = crate::test_rand::uniform([t, d], -3.0, 3.0, 2, &flex);
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        let zs = crate::test_rand::uniform([b, t, h, d], -2.0, 2.0, 4, &flex).swap_dims(1, 2);
        rope(zs.clone(), &cos, &sin)
            .into_data()
            .assert_approx_eq::<f32>(&reference(zs, &cos, &sin).into_data(), tol);
    }

    #[test]
    fn the_composed_fallback_is_the_same_rotation() {
        let device = Device::flex();
        let x = crate::test_rand::uniform([1, 2, 3, 6], -2.0, 2.0, 5, &device);
        let angles = crate::test_rand::uniform([3, 6], -3.0, 3.0, 6, &device);
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        let y = Tensor::<4>::from_dispatch(composed::<Dispatch>(
            x.clone().into_dispatch(),
            cos.clone().into_dispatch(),
            sin.clone().into_dispatch(),
        ));
        y.into_data().assert_approx_eq::<f32>(
            &reference(x.clone(), &cos, &sin).into_data(),
            Tolerance::rel_abs(1e-5, 1e-6),
        );
        let dy = Tensor::<4>::from_dispatch(grad_composed::<Dispatch>(
            x.clone().into_dispatch(),
            cos.clone().into_dispatch(),
            sin.clone().into_dispatch(),
        ));
        let fused = Tensor::<4>::from_dispatch(<Dispatch as FusedRope>::fused_rope_grad(
            x.into_dispatch(),
            cos.into_dispatch(),
            sin.into_dispatch(),
        ));
        dy.into_data()
            .assert_approx_eq::<f32>(&fused.into_data(), Tolerance::rel_abs(1e-5, 1e-6));
    }
}
