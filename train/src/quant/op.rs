//! `y = x·Wᵀ` with a frozen `W` kept as [`QuantMatrix`] blocks: a burn backend extension with its
//! own backward pass.
//!
//! burn's own route (a quantized tensor in `matmul`) dequantizes `W` into a float tensor that
//! autodiff then keeps until the backward pass, so a quantized base would cost as much memory as
//! an f32 one while training. Here the backward pass holds only the blocks (an `Arc`), and both
//! passes dequantize `W` one tile of rows at a time (at most [`TILE_BYTES`] of f32 alive):
//! - forward: `y[:, tile] = x · W[tile]ᵀ`;
//! - backward: `dx = Σ_tile dy[:, tile] · W[tile]`. `W` is frozen, so it gets no gradient.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex, TensorMetadata};
use burn::tensor::{Slice, Tensor, TensorData};

use super::blocks::QuantMatrix;

/// The most f32 bytes of `W` dequantized at once (16 MiB: all of a SmolLM2 projection, a
/// seventh of its 49,152-row output head).
pub const TILE_BYTES: usize = 16 << 20;

fn tiles(w: &QuantMatrix) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let per = (TILE_BYTES / 4 / w.cols().max(1)).max(1);
    (0..w.rows())
        .step_by(per)
        .map(move |r| r..(r + per).min(w.rows()))
}

fn dequantized<B: Backend>(
    w: &QuantMatrix,
    rows: std::ops::Range<usize>,
    device: &burn::backend::tensor::Device<B>,
) -> FloatTensor<B> {
    let mut buf = vec![0f32; rows.len() * w.cols()];
    let n = rows.len();
    w.dequantize_rows(rows, &mut buf);
    B::float_from_data(TensorData::new(buf, [n, w.cols()]), device)
}

/// The frozen quantized linear map as a backend operation.
#[backend_extension(Flex, Autodiff)]
pub trait FrozenLinearBackend: Backend {
    /// `x · Wᵀ`: `x` is `[m, w.cols()]`, the result `[m, w.rows()]`.
    fn frozen_linear(x: FloatTensor<Self>, w: Arc<QuantMatrix>) -> FloatTensor<Self> {
        let device = x.device();
        let mut parts: Vec<FloatTensor<Self>> = tiles(&w)
            .map(|rows| {
                let wt = dequantized::<Self>(&w, rows, &device);
                Self::float_matmul(x.clone(), Self::float_transpose(wt))
            })
            .collect();
        if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            Self::float_cat(parts, 1)
        }
    }

    /// `dy · W`, the input gradient: `dy` is `[m, w.rows()]`, the result `[m, w.cols()]`.
    fn frozen_linear_input_grad(dy: FloatTensor<Self>, w: Arc<QuantMatrix>) -> FloatTensor<Self> {
        let device = dy.device();
        let mut sum: Option<FloatTensor<Self>> = None;
        for rows in tiles(&w) {
            let part = if rows.len() == w.rows() {
                dy.clone()
            } else {
                let s = [
                    Slice::from(..),
                    Slice::new(rows.start as isize, Some(rows.end as isize), 1),
                ];
                Self::float_slice(dy.clone(), &s)
            };
            let prod = Self::float_matmul(part, dequantized::<Self>(&w, rows, &device));
            sum = Some(match sum {
                None => prod,
                Some(acc) => Self::float_add(acc, prod),
            });
        }
        sum.expect("a matrix has at least one row")
    }
}

impl FrozenLinearBackend for Flex {}

#[derive(Debug)]
struct FrozenLinearBackward;

impl<B: Backend + FrozenLinearBackend> Backward<B, 1> for FrozenLinearBackward {
    type State = Arc<QuantMatrix>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let w = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |dy| {
            B::frozen_linear_input_grad(dy, w)
        });
    }
}

impl<B: Backend + FrozenLinearBackend, C: CheckpointStrategy> FrozenLinearBackend
    for Autodiff<B, C>
{
    fn frozen_linear(x: FloatTensor<Self>, w: Arc<QuantMatrix>) -> FloatTensor<Self> {
        let prep = FrozenLinearBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful();
        match prep {
            OpsKind::Tracked(prep) => {
                let y = B::frozen_linear(x.into_primitive(), w.clone());
                prep.finish(w, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::frozen_linear(x.into_primitive(), w)),
        }
    }
}

/// `x · Wᵀ` over the last dimension of `x`, with `W` frozen as blocks (`[.., w.cols()]` →
/// `[.., w.rows()]`). Gradients flow to `x` only.
///
/// # Panics
/// If the last dimension of `x` is not `w.cols()` (the model's shapes fix both).
pub fn frozen_linear<const D: usize>(x: Tensor<D>, w: &Arc<QuantMatrix>) -> Tensor<D> {
    let dims = x.dims();
    let k = dims[D - 1];
    assert_eq!(k, w.cols(), "input features do not match the frozen weight");
    let m: usize = dims[..D - 1].iter().product();
    let x2 = x.reshape([m, k]);
    let y = <Dispatch as FrozenLinearBackend>::frozen_linear(x2.into_dispatch(), w.clone());
    let mut out = dims;
    out[D - 1] = w.rows();
    Tensor::<2>::from_dispatch(y).reshape(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::blocks::QuantKind;
    use burn::tensor::module::linear;
    use burn::tensor::{Device, Tolerance};

    fn weight(rows: usize, cols: usize, kind: QuantKind) -> Arc<QuantMatrix> {
        let d = Device::flex();
        let w = crate::test_rand::uniform([rows, cols], -0.5, 0.5, 1, &d);
        let v = w.into_data().try_into_vec::<f32>().unwrap();
        Arc::new(QuantMatrix::quantize(kind, &v, rows, cols).unwrap())
    }

    /// The unfused reference: the dequantized weight as a dense burn tensor in `linear`.
    fn dense(w: &QuantMatrix, device: &Device) -> Tensor<2> {
        Tensor::<2>::from_data(TensorData::new(w.to_f32(), [w.rows(), w.cols()]), device)
            .transpose()
    }

    fn check(rows: usize, cols: usize, kind: QuantKind, abs: f64) {
        let device = Device::flex().autodiff();
        let w = weight(rows, cols, kind);
        let x = crate::test_rand::uniform([2, 5, cols], 0.0, 1.0, 2, &device).require_grad();
        let probe = crate::test_rand::uniform([2, 5, rows], 0.0, 1.0, 3, &device);

        let y = frozen_linear(x.clone(), &w);
        let grads = (y.clone() * probe.clone()).sum().backward();
        let gx = x.grad(&grads).expect("x has a gradient");

        let x2 = x.clone().detach().require_grad();
        let y_ref = linear(x2.clone(), dense(&w, &device), None);
        let grads_ref = (y_ref.clone() * probe).sum().backward();
        let gx_ref = x2.grad(&grads_ref).unwrap();

        // f32 sums in another order (the tiled input gradient sums `rows` products per value,
        // in tiles): 10⁻⁵ relative, or `abs`.
        let tol = Tolerance::rel_abs(1e-5, abs);
        y.into_data()
            .assert_approx_eq::<f32>(&y_ref.into_data(), tol);
        gx.into_data()
            .assert_approx_eq::<f32>(&gx_ref.into_data(), tol);
    }

    #[test]
    fn forward_and_input_gradient_match_the_dense_linear() {
        check(48, 64, QuantKind::Q8_0, 1e-4);
        check(40, 96, QuantKind::Q4_1, 1e-4);
    }

    #[test]
    fn a_weight_wider_than_one_tile_matches_too() {
        // TILE_BYTES / 4 / 32 rows per tile: 3 tiles and a short one.
        let rows = TILE_BYTES / 4 / 32 * 3 + 7;
        // ~4·10⁵ products per input-gradient value, of magnitude ~0.25: their f32 sums in two
        // orders differ by up to ~10⁻³ where they cancel to a small value.
        check(rows, 32, QuantKind::Q4_1, 2e-3);
    }

    #[test]
    fn without_autodiff_it_is_the_same_map() {
        let d = Device::flex();
        let w = weight(24, 32, QuantKind::Q8_0);
        let x = crate::test_rand::uniform([3, 32], 0.0, 1.0, 4, &d);
        frozen_linear(x.clone(), &w)
            .into_data()
            .assert_approx_eq::<f32>(
                &linear(x, dense(&w, &d), None).into_data(),
                Tolerance::absolute(1e-4),
            );
    }
}
