//! Next-token cross-entropy per row, `ℓ_r = logsumexp(x_r) − x_r[t_r]`, fused.
//!
//! Backward: `dx_r = dℓ_r·(softmax(x_r) − onehot(t_r))`. The backward pass keeps the logits,
//! the targets and one log-sum-exp per row.
//!
//! Composed, `log_softmax(x).gather(t)` keeps the shifted logits, their exponentials and the
//! log-probabilities, each as large as the logits: for SmolLM2 at batch 4, context 128 that is
//! 100 MB apiece (49,152-wide vocabulary). Fused, the forward pass is one walk over each row
//! (max, then the sum of `exp` with the vectorised [`exp`](super::vmath::exp)) and the backward
//! pass one more.
//!
//! A target outside `0..vocab` gives a NaN loss for its row (and NaN gradients) instead of a
//! panic. Token ids are not checked against the model's vocabulary when examples are built, so a
//! tokenizer that does not match its model shows up here.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex, TensorMetadata};
use burn::tensor::{DType, IndexingUpdateOp, Int, Shape, Tensor};
use pulp::Arch;
use rayon::prelude::*;

use super::vmath::{exp, max, sum_map};
use super::{f32_kernel, for_rows};

/// `[m]` → `[m, 1]`.
fn column<B: Backend>(t: IntTensor<B>) -> IntTensor<B> {
    let m = t.shape().num_elements();
    B::int_reshape(t, Shape::new([m, 1]))
}

/// `−log_softmax(x)[t]`, composed of elementary ops.
fn nll_composed<B: Backend>(x: FloatTensor<B>, t: IntTensor<B>) -> FloatTensor<B> {
    let m = x.shape()[0];
    let picked = B::float_gather(1, B::log_softmax(x, 1), column::<B>(t));
    B::float_neg(B::float_reshape(picked, Shape::new([m])))
}

/// `dℓ·(softmax(x) − onehot(t))`, composed of elementary ops.
fn nll_grad_composed<B: Backend>(
    x: FloatTensor<B>,
    t: IntTensor<B>,
    dl: FloatTensor<B>,
) -> FloatTensor<B> {
    let m = x.shape()[0];
    let dl = B::float_reshape(dl, Shape::new([m, 1]));
    let soft = B::float_mul(B::softmax(x, 1), dl.clone());
    B::float_scatter(
        1,
        soft,
        column::<B>(t),
        B::float_neg(dl),
        IndexingUpdateOp::Add,
    )
}

/// The targets as `usize` (`None` when they are not i64/i32 on this backend).
fn targets(t: &IntTensor<Flex>) -> Option<Vec<usize>> {
    let c = t.to_contiguous();
    // a negative target becomes usize::MAX: out of range, so NaN
    match c.dtype() {
        DType::I64 => Some(c.as_slice::<i64>()?.iter().map(|&v| v as usize).collect()),
        DType::I32 => Some(c.as_slice::<i32>()?.iter().map(|&v| v as usize).collect()),
        _ => None,
    }
}

/// `max` and `Σ exp(x − max)` of one row, vectorised.
#[inline(always)]
fn max_and_sum(x: &[f32]) -> (f32, f32) {
    let m = max(x);
    (m, sum_map(x, |v| exp(v - m)))
}

/// Per-row cross-entropy as a backend operation: `logits` `[m, vocab]`, `targets` `[m]`.
#[backend_extension(Flex, Autodiff)]
pub trait FusedCrossEntropy: Backend {
    /// `logsumexp(x_r) − x_r[t_r]` per row, `[m]`.
    fn row_nll(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        nll_composed::<Self>(logits, targets)
    }

    /// `dℓ_r·(softmax(x_r) − onehot(t_r))`, `[m, vocab]`.
    fn row_nll_grad(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        dl: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        nll_grad_composed::<Self>(logits, targets, dl)
    }
}

impl FusedCrossEntropy for Flex {
    fn row_nll(logits: FloatTensor<Self>, t: IntTensor<Self>) -> FloatTensor<Self> {
        f32_kernel([&logits], |[xs], shape| {
            let ts = targets(&t)?;
            let v = shape[1];
            let arch = Arch::new();
            let out: Vec<f32> = ts
                .par_iter()
                .enumerate()
                .map(|(r, &t)| {
                    let row = &xs[r * v..(r + 1) * v];
                    let (max, sum) = arch.dispatch(|| max_and_sum(row));
                    row.get(t).map_or(f32::NAN, |&xt| max + sum.ln() - xt)
                })
                .collect();
            Some((out, Shape::new([shape[0]])))
        })
        .unwrap_or_else(|| nll_composed::<Self>(logits, t))
    }

    fn row_nll_grad(
        logits: FloatTensor<Self>,
        t: IntTensor<Self>,
        dl: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        f32_kernel([&logits, &dl], |[xs, ds], shape| {
            let ts = targets(&t)?;
            let v = shape[1];
            if ds.len() != ts.len() || ts.len() != shape[0] {
                return None;
            }
            let mut out = vec![0f32; xs.len()];
            let arch = Arch::new();
            for_rows(&mut out, v, |o, r| {
                let row = &xs[r * v..(r + 1) * v];
                let d = ds[r];
                arch.dispatch(|| {
                    let (max, sum) = max_and_sum(row);
                    let scale = d / sum;
                    for (o, &x) in o.iter_mut().zip(row) {
                        *o = exp(x - max) * scale;
                    }
                });
                match o.get_mut(ts[r]) {
                    Some(o) => *o -= d,
                    None => o.fill(f32::NAN),
                }
            });
            Some((out, shape.clone()))
        })
        .unwrap_or_else(|| nll_grad_composed::<Self>(logits, t, dl))
    }
}

#[derive(Debug)]
struct NllBackward;

impl<B: Backend + FusedCrossEntropy> Backward<B, 1> for NllBackward {
    /// The logits and the targets.
    type State = (FloatTensor<B>, IntTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, t) = ops.state;
        let [parent] = ops.parents;
        let dl = grads.consume::<B>(&ops.node);
        if let Some(node) = parent {
            grads.register::<B>(node.id, B::row_nll_grad(x, t, dl));
        }
    }
}

impl<B: Backend + FusedCrossEntropy, C: CheckpointStrategy> FusedCrossEntropy for Autodiff<B, C> {
    fn row_nll(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        let prep = NllBackward
            .prepare::<C>([logits.node()])
            .compute_bound()
            .stateful();
        let xp = logits.into_primitive();
        match prep {
            OpsKind::Tracked(prep) => {
                let l = B::row_nll(xp.clone(), targets.clone());
                prep.finish((xp, targets), l)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::row_nll(xp, targets)),
        }
    }
}

/// Next-token negative log-likelihood of each position, nats: `logits` `[batch, seq, vocab]`,
/// `targets` `[batch, seq]` (token ids in `0..vocab`). Output `[batch, seq]`.
pub fn token_nll(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    let [b, s, v] = logits.dims();
    assert_eq!(
        targets.dims(),
        [b, s],
        "token_nll: targets must be [batch, seq] of the logits"
    );
    let l = <Dispatch as FusedCrossEntropy>::row_nll(
        logits.reshape([b * s, v]).into_dispatch(),
        targets.reshape([b * s]).into_dispatch(),
    );
    Tensor::<1>::from_dispatch(l).reshape([b, s])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::log_softmax;
    use burn::tensor::{Device, TensorData, Tolerance};

    fn reference(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
        let [b, s, _] = logits.dims();
        log_softmax(logits, 2)
            .gather(2, targets.unsqueeze_dim::<3>(2))
            .reshape([b, s])
            .neg()
    }

    #[test]
    fn loss_and_gradient_match_log_softmax_and_gather() {
        let device = Device::flex().autodiff();
        let tol = Tolerance::rel_abs(1e-5, 1e-6);
        for (b, s, v) in [(2usize, 5usize, 13usize), (3, 4, 49_152), (1, 1, 1)] {
            let x = crate::test_rand::uniform([b, s, v], -12.0, 12.0, 1, &device).require_grad();
            let ids: Vec<i64> = (0..b * s).map(|i| ((i * 7919) % v) as i64).collect();
            let t = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, s]), &device);
            let probe = crate::test_rand::uniform([b, s], 0.0, 1.0, 2, &device);
            let l = token_nll(x.clone(), t.clone());
            let g = (l.clone() * probe.clone()).sum().backward();
            let x2 = x.clone().detach().require_grad();
            let l2 = reference(x2.clone(), t);
            let g2 = (l2.clone() * probe).sum().backward();
            l.into_data().assert_approx_eq::<f32>(&l2.into_data(), tol);
            crate::test_rand::assert_same_grad(&x, &g, &x2, &g2, tol);
        }
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_nan_not_a_panic() {
        let device = Device::flex();
        let x = crate::test_rand::uniform([1, 2, 5], -1.0, 1.0, 3, &device);
        let t = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 5], [1, 2]), &device);
        let l: Vec<f32> = token_nll(x, t).into_data().try_to_vec().unwrap();
        assert!(l[0].is_finite() && l[0] > 0.0);
        assert!(l[1].is_nan());
    }
}
