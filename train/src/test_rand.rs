//! Seeded random tensors for unit tests (burn's `Tensor::random` draws from a global RNG, so
//! a failure could not be replayed).

use burn::tensor::{Device, Tensor, TensorData, Tolerance};
use rand::{RngExt, SeedableRng};

/// Values uniform in `[lo, hi)` from ChaCha20 seeded with `seed`.
pub(crate) fn uniform<const D: usize>(
    dims: [usize; D],
    lo: f32,
    hi: f32,
    seed: u64,
    device: &Device,
) -> Tensor<D> {
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(seed);
    let n = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    Tensor::from_data(TensorData::new(v, dims), device)
}

/// Asserts that `x` got the same gradient in `g` as `reference` in `g_ref`, within `tol`.
pub(crate) fn assert_same_grad<const D: usize>(
    x: &Tensor<D>,
    g: &burn::tensor::Gradients,
    reference: &Tensor<D>,
    g_ref: &burn::tensor::Gradients,
    tol: Tolerance<f32>,
) {
    let (a, b) = (x.grad(g), reference.grad(g_ref));
    let (Some(a), Some(b)) = (a, b) else {
        panic!("a gradient is missing");
    };
    a.into_data().assert_approx_eq::<f32>(&b.into_data(), tol);
}
