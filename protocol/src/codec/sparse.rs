//! Sparsification: top-k by magnitude (client-specific support) and a shared random subset
//! (support drawn from the round seed, identical for every client), plus error feedback.

use rand::SeedableRng;

/// Number of coordinates kept for a `fraction` of `n` (at least 1, at most n).
pub fn kept(n: usize, fraction: f64) -> usize {
    ((n as f64 * fraction).ceil() as usize).clamp(1.min(n), n)
}

/// Indices of the `k` largest magnitudes of `x`, ascending.
pub fn top_k(x: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    if k < x.len() {
        idx.select_nth_unstable_by(k, |&a, &b| x[b].abs().total_cmp(&x[a].abs()));
        idx.truncate(k);
    }
    idx.sort_unstable();
    idx
}

/// The shared subset of `k` of `n` coordinates for a round: ChaCha20 seeded by `seed`, ascending.
pub fn shared_subset(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(seed ^ 0x5348_4152_4544_5355);
    let mut idx = rand::seq::index::sample(&mut rng, n, k).into_vec();
    idx.sort_unstable();
    idx
}

/// Error feedback: what a client did not send is added to its next delta.
///
/// It operates on the (already DP-noised) delta, so it is post-processing and costs no privacy.
/// Invariant (tested): Σ sent + residual = Σ true deltas.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ErrorFeedback {
    residual: Vec<f32>,
}

impl ErrorFeedback {
    /// A zero residual of `n` values.
    pub fn new(n: usize) -> Self {
        Self {
            residual: vec![0.0; n],
        }
    }

    /// The residual.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// `delta + residual`: what to encode this round.
    pub fn compensate(&self, delta: &[f32]) -> Vec<f32> {
        delta
            .iter()
            .zip(&self.residual)
            .map(|(d, r)| d + r)
            .collect()
    }

    /// After encoding `compensated` and decoding what was actually sent: keep the difference.
    pub fn update(&mut self, compensated: &[f32], sent: &[f32]) {
        for ((r, c), s) in self.residual.iter_mut().zip(compensated).zip(sent) {
            *r = c - s;
        }
    }
}
