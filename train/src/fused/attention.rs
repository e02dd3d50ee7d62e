//! Causal self-attention, `O = softmax(mask(Q·Kᵀ·s))·V` with `s = 1/√d`, with its own backward
//! pass.
//!
//! Under autodiff, burn composes attention from a matmul, a scale, a causal mask built as a
//! tensor, a five-op softmax and a second matmul, and keeps every intermediate for the backward
//! pass. This op runs the forward pass as the backend's own attention (on `flex` its fused
//! kernel), keeps only `Q`, `K` and `V`, and in the backward pass recomputes
//! `P = softmax(mask(Q·Kᵀ·s))` in one pass over the scores, then
//! - `dV = Pᵀ·dO`, `dP = dO·Vᵀ`,
//! - `dS = s·P ⊙ (dP − rowsum(dP ⊙ P))` (one pass; masked entries have `P = 0`),
//! - `dQ = dS·K`, `dK = dSᵀ·Q`.
//!
//! The softmax passes use the vectorised [`exp`](super::vmath::exp). Inputs are
//! `[batch, heads, seq, head_dim]`, queries and keys of the same length (training, prompts);
//! decoding with a KV cache keeps burn's attention.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex, TensorMetadata};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Scalar, Tensor, TensorData};
use pulp::Arch;

use super::vmath::{exp, max, sum_map};
use super::{f32_kernel, for_rows};

fn causal() -> AttentionModuleOptions {
    AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: true,
    }
}

/// `1/√d` for `[.., d]` queries.
fn scale_of<B: Backend>(q: &FloatTensor<B>) -> f32 {
    let dims = q.shape();
    1.0 / (dims[dims.num_dims() - 1] as f32).sqrt()
}

/// `Q·Kᵀ`, `[b, h, t, t]`.
fn scores<B: Backend>(q: FloatTensor<B>, k: FloatTensor<B>) -> FloatTensor<B> {
    B::float_matmul(q, B::float_transpose(k))
}

/// `softmax(mask(Q·Kᵀ·s))`, composed of elementary ops.
fn probs_composed<B: Backend>(q: FloatTensor<B>, k: FloatTensor<B>) -> FloatTensor<B> {
    let s = scale_of::<B>(&q);
    let device = q.device();
    let sc = B::float_mul_scalar(scores::<B>(q, k), Scalar::Float(s as f64));
    let shape = sc.shape();
    let t = shape[3];
    let future: Vec<bool> = (0..t * t).map(|i| i % t > i / t).collect();
    let mask = B::bool_from_data(TensorData::new(future, [1, 1, t, t]), &device);
    let mask = B::bool_expand(mask, shape);
    B::softmax(
        B::float_mask_fill(sc, mask, Scalar::Float(f64::NEG_INFINITY)),
        3,
    )
}

/// `s·P ⊙ (dP − rowsum(dP ⊙ P))`, composed of elementary ops.
fn scores_grad_composed<B: Backend>(
    p: FloatTensor<B>,
    dp: FloatTensor<B>,
    s: f32,
) -> FloatTensor<B> {
    let row = B::float_sum_dim(B::float_mul(dp.clone(), p.clone()), 3);
    let ds = B::float_mul(p, B::float_sub(dp, row));
    B::float_mul_scalar(ds, Scalar::Float(s as f64))
}

/// Causal self-attention as a backend operation (see the module docs).
#[backend_extension(Flex, Autodiff)]
pub trait FusedAttention: Backend {
    /// `softmax(mask(Q·Kᵀ/√d))·V` for `[b, h, t, d]` inputs.
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::attention(q, k, v, None, None, causal())
    }

    /// The attention weights `P = softmax(mask(Q·Kᵀ/√d))`, `[b, h, t, t]`.
    fn causal_attention_probs(q: FloatTensor<Self>, k: FloatTensor<Self>) -> FloatTensor<Self> {
        probs_composed::<Self>(q, k)
    }

    /// `dS = s·P ⊙ (dP − rowsum(dP ⊙ P))`, the gradient to the unscaled scores `Q·Kᵀ`.
    fn causal_attention_scores_grad(
        p: FloatTensor<Self>,
        dp: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        scores_grad_composed::<Self>(p, dp, scale)
    }
}

impl FusedAttention for Flex {
    fn causal_attention_probs(q: FloatTensor<Self>, k: FloatTensor<Self>) -> FloatTensor<Self> {
        let s = scale_of::<Self>(&q);
        let sc = scores::<Self>(q.clone(), k.clone());
        f32_kernel([&sc], |[xs], shape| {
            let t = shape[3];
            let mut out = vec![0f32; xs.len()];
            let arch = Arch::new();
            for_rows(&mut out, t, |o, r| {
                let i = r % t; // query position: keys 0..=i are visible
                let x = &xs[r * t..r * t + i + 1];
                arch.dispatch(|| {
                    let m = max(x);
                    let o = &mut o[..=i];
                    for (o, &v) in o.iter_mut().zip(x) {
                        *o = exp((v - m) * s);
                    }
                    let inv = 1.0 / sum_map(o, |p| p);
                    for o in o.iter_mut() {
                        *o *= inv;
                    }
                });
            });
            Some((out, shape.clone()))
        })
        .unwrap_or_else(|| probs_composed::<Self>(q, k))
    }

    fn causal_attention_scores_grad(
        p: FloatTensor<Self>,
        dp: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        f32_kernel([&p, &dp], |[ps, ds], shape| {
            if ps.len() != ds.len() {
                return None;
            }
            let t = shape[3];
            let mut out = vec![0f32; ps.len()];
            let arch = Arch::new();
            for_rows(&mut out, t, |o, r| {
                let n = r % t + 1; // entries past the diagonal have P = 0, so dS = 0 there
                let (pr, dr) = (&ps[r * t..r * t + n], &ds[r * t..r * t + n]);
                arch.dispatch(|| {
                    let mut acc = [0f32; 8];
                    let (mut pc, mut dc) = (pr.chunks_exact(8), dr.chunks_exact(8));
                    for (p8, d8) in (&mut pc).zip(&mut dc) {
                        for ((a, p), d) in acc.iter_mut().zip(p8).zip(d8) {
                            *a += p * d;
                        }
                    }
                    let tail: f32 = pc
                        .remainder()
                        .iter()
                        .zip(dc.remainder())
                        .map(|(p, d)| p * d)
                        .sum();
                    let dot = acc.iter().sum::<f32>() + tail;
                    for ((o, &p), &d) in o.iter_mut().zip(pr).zip(dr) {
                        *o = scale * p * (d - dot);
                    }
                });
            });
            Some((out, shape.clone()))
        })
        .unwrap_or_else(|| scores_grad_composed::<Self>(p, dp, scale))
    }
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: Backend + FusedAttention> Backward<B, 3> for AttentionBackward {
    /// `Q`, `K`, `V`.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (q, k, v) = ops.state;
        let [pq, pk, pv] = ops.parents;
        let d_o = grads.consume::<B>(&ops.node);
        let s = scale_of::<B>(&q);
        let p = B::causal_attention_probs(q.clone(), k.clone());
        if let Some(node) = pv {
            grads.register::<B>(
                node.id,
                B::float_matmul(B::float_transpose(p.clone()), d_o.clone()),
            );
        }
        if pq.is_none() && pk.is_none() {
            return;
        }
        let dp = B::float_matmul(d_o, B::float_transpose(v));
        let ds = B::causal_attention_scores_grad(p, dp, s);
        if let Some(node) = pq {
            grads.register::<B>(node.id, B::float_matmul(ds.clone(), k));
        }
        if let Some(node) = pk {
            grads.register::<B>(node.id, B::float_matmul(B::float_transpose(ds), q));
        }
    }
}

impl<B: Backend + FusedAttention, C: CheckpointStrategy> FusedAttention for Autodiff<B, C> {
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let prep = AttentionBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful();
        let (qp, kp, vp) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
        match prep {
            OpsKind::Tracked(prep) => {
                let o = B::causal_attention(qp.clone(), kp.clone(), vp.clone());
                prep.finish((qp, kp, vp), o)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::causal_attention(qp, kp, vp)),
        }
    }
}

/// Causal self-attention with scale `1/√d`: `q`, `k`, `v` `[batch, heads, seq, head_dim]` (the
/// same `seq`; repeat grouped key/value heads first). Output `[batch, heads, seq, head_dim]`.
pub fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
    assert!(
        qd == kd && kd[..3] == vd[..3],
        "causal_attention needs q, k of one shape and v of the same batch, heads and length: {qd:?} {kd:?} {vd:?}"
    );
    let o = <Dispatch as FusedAttention>::causal_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
    );
    Tensor::<4>::from_dispatch(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::module::attention;
    use burn::tensor::{Device, Tolerance};

    #[test]
    fn forward_and_gradients_match_burns_attention() {
        let device = Device::flex().autodiff();
        let tol = Tolerance::rel_abs(1e-4, 1e-5);
        for (shape, dv) in [
            ([2usize, 3, 17, 8], 8usize),
            ([1, 2, 1, 4], 4),
            ([2, 4, 64, 32], 16),
        ] {
            let [b, h, t, _] = shape;
            let q = crate::test_rand::uniform(shape, -2.0, 2.0, 1, &device).require_grad();
            let k = crate::test_rand::uniform(shape, -2.0, 2.0, 2, &device).require_grad();
            let v = crate::test_rand::uniform([b, h, t, dv], -1.0, 1.0, 3, &device).require_grad();
            let probe = crate::test_rand::uniform([b, h, t, dv], -1.0, 1.0, 4, &device);
            let o = causal_attention(q.clone(), k.clone(), v.clone());
            let g = (o.clone() * probe.clone()).sum().backward();
            let (q2, k2, v2) = (
                q.clone().detach().require_grad(),
                k.clone().detach().require_grad(),
                v.clone().detach().require_grad(),
            );
            let o2 = attention(q2.clone(), k2.clone(), v2.clone(), None, None, causal());
            let g2 = (o2.clone() * probe).sum().backward();
            o.into_data().assert_approx_eq::<f32>(&o2.into_data(), tol);
            for (a, b) in [(&q, &q2), (&k, &k2), (&v, &v2)] {
                crate::test_rand::assert_same_grad(a, &g, b, &g2, tol);
            }
        }
    }

    #[test]
    fn the_flex_kernel_matches_the_composed_weights() {
        let t = 9;
        let flex = |seed: usize| {
            let v: Vec<f32> = (0..2 * 2 * t * 4)
                .map(|i| ((i * 7 + seed * 13) % 23) as f32 / 4.0 - 2.5)
                .collect();
            burn_flex::FlexTensor::from_data(TensorData::new(v, [2, 2, t, 4]))
        };
        let (q, k) = (flex(1), flex(2));
        let fused = <Flex as FusedAttention>::causal_attention_probs(q.clone(), k.clone());
        let composed = probs_composed::<Flex>(q, k);
        let fc = fused.to_contiguous();
        let rows = fc.as_slice::<f32>().unwrap();
        // each row sums to 1 over the visible keys and is 0 past the diagonal
        for (r, row) in rows.chunks(t).enumerate() {
            let i = r % t;
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            assert!(row[i + 1..].iter().all(|&p| p == 0.0));
        }
        let cc = composed.to_contiguous();
        for (a, b) in rows.iter().zip(cc.as_slice::<f32>().unwrap()) {
            assert!((a - b).abs() <= 1e-6 + 1e-5 * b.abs(), "{a} {b}");
        }
    }
}
