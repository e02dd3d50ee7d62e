//! Fused operations with their own backward passes: causal attention and the per-token
//! cross-entropy (both models), RMSNorm, RoPE and SwiGLU (the real-LLM path), LayerNorm and the erf
//! GELU (the byte-level model), and the vectorised `exp`/`erf` they share.
//!
//! Composed of burn's elementary ops, each of these keeps every intermediate alive for the
//! backward pass (RMSNorm: `x²`, the mean, the root, two products; SwiGLU: the sigmoid, SiLU and
//! the product's inputs) and walks memory once per elementary op. Fused, the forward pass is one
//! walk over the rows, and the backward pass keeps only the inputs (RMSNorm also one scale per
//! row) and recomputes the rest. On the `flex` CPU backend both passes are single-pass kernels on
//! all cores; other backends get the same maths composed of their own ops.
//!
//! Each op is checked against the unfused burn ops, forward and gradient, on random inputs.

pub mod attention;
pub mod cross_entropy;
pub mod gelu;
pub mod layer_norm;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;
pub mod vmath;

pub use attention::causal_attention;
pub use cross_entropy::token_nll;
pub use gelu::gelu;
pub use layer_norm::{LayerNormLayer, LayerNormLayerConfig};
pub use rms_norm::{rms_norm, FusedRmsNorm};
pub use rope::rope;
pub use swiglu::swiglu;

use burn::backend::Flex;
use burn::tensor::{DType, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// A contiguous f32 flex tensor's values, or `None` for any other dtype (the caller then
/// composes the op from elementary ones).
fn f32_values(t: &FlexTensor) -> Option<(FlexTensor, burn::tensor::Shape)> {
    (t.dtype() == DType::F32).then(|| {
        let c = t.to_contiguous();
        let shape = c.layout().shape().clone();
        (c, shape)
    })
}

/// Runs a kernel on the f32 values of `inputs` (made contiguous), given the first input's
/// shape; its output values and shape become a flex tensor. `None` when an input is not f32 or
/// the kernel refuses the shapes (`None` from `f`): the caller then composes the op from
/// elementary ones.
fn f32_kernel<const N: usize>(
    inputs: [&FlexTensor; N],
    f: impl FnOnce([&[f32]; N], &burn::tensor::Shape) -> Option<(Vec<f32>, burn::tensor::Shape)>,
) -> Option<<Flex as burn::backend::BackendTypes>::FloatTensorPrimitive> {
    let owned = inputs
        .iter()
        .map(|t| f32_values(t))
        .collect::<Option<Vec<_>>>()?;
    let slices = owned
        .iter()
        .map(|(t, _)| t.as_slice::<f32>())
        .collect::<Option<Vec<_>>>()?;
    let slices: [&[f32]; N] = slices.try_into().ok()?;
    let (out, shape) = f(slices, &owned.first()?.1)?;
    Some(flex_f32(out, shape))
}

fn flex_f32(
    values: Vec<f32>,
    shape: burn::tensor::Shape,
) -> <Flex as burn::backend::BackendTypes>::FloatTensorPrimitive {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// Rows per rayon task: at least ~16 Ki values, so small tensors stay on one thread.
fn rows_per_task(cols: usize) -> usize {
    (16_384 / cols.max(1)).max(1)
}

/// Applies `f(out_row, row_index)` to every `cols`-wide row of `out`, in parallel.
fn for_rows(out: &mut [f32], cols: usize, f: impl Fn(&mut [f32], usize) + Sync) {
    let per = rows_per_task(cols);
    out.par_chunks_mut(per * cols)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (i, row) in chunk.chunks_exact_mut(cols).enumerate() {
                f(row, task * per + i);
            }
        });
}
