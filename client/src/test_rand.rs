//! Seeded random tensors for unit tests (burn's `Tensor::random` draws from a global RNG, so
//! a failure could not be replayed).

use burn::tensor::{Device, Tensor, TensorData};
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
