//! Text generation: greedy by default, or nucleus (top-p) sampling with a temperature and a
//! seed; each new token costs one position thanks to the KV cache.

use burn::tensor::activation::softmax;
use burn::tensor::{Int, Tensor, TensorData};
use rand::{RngExt, SeedableRng};

use super::llama::{KvCache, LlamaLm};
use crate::error::TrainError;

/// How to pick each next token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`
    /// (1 keeps all). Ignored when greedy.
    pub top_p: f64,
    /// Seed of the sampler (ChaCha20).
    pub seed: u64,
    /// Decode with the KV cache (one position per token) or recompute the whole sequence at
    /// every step (slow; the reference the cache is tested against).
    pub use_cache: bool,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            use_cache: true,
        }
    }
}

impl SamplingConfig {
    /// Refuses a negative or non-finite temperature and a top-p outside (0, 1].
    pub fn validate(&self) -> Result<(), TrainError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(TrainError::Config(format!(
                "temperature must be ≥ 0, not {} (--temperature)",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(TrainError::Config(format!(
                "top-p must be in (0, 1], not {} (--top-p)",
                self.top_p
            )));
        }
        Ok(())
    }
}

fn pick(logits: &[f32], cfg: &SamplingConfig, rng: &mut rand::rngs::ChaCha20Rng) -> u32 {
    if cfg.temperature == 0.0 {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let t = cfg.temperature as f32;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, f64::from(((l - max) / t).exp())))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let mut n = 0;
    for (_, p) in &probs {
        kept += p / total;
        n += 1;
        if kept >= cfg.top_p {
            break;
        }
    }
    let mass: f64 = probs[..n].iter().map(|p| p.1).sum();
    let mut u = rng.random_range(0.0..mass);
    for (i, p) in &probs[..n] {
        if u < *p {
            return *i as u32;
        }
        u -= p;
    }
    probs[n - 1].0 as u32
}

/// Continues `prompt` (token ids) by up to `cfg.max_tokens` tokens, stopping early at any of
/// `stop_ids` (which is not returned) or at the model's position limit. `on_token` sees each
/// new token as it is chosen.
pub fn generate(
    model: &LlamaLm,
    prompt: &[u32],
    stop_ids: &[u32],
    cfg: &SamplingConfig,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>, TrainError> {
    cfg.validate()?;
    if prompt.is_empty() {
        return Err(TrainError::Data("the prompt has no tokens".into()));
    }
    if prompt.len() >= model.max_positions() {
        return Err(TrainError::Data(format!(
            "the prompt has {} tokens; the model takes at most {}",
            prompt.len(),
            model.max_positions()
        )));
    }
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= model.vocab_size()) {
        return Err(TrainError::Data(format!(
            "token id {bad} is outside the model's vocabulary of {}",
            model.vocab_size()
        )));
    }
    let device = burn::tensor::Device::flex();
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(cfg.seed);
    let mut cache = KvCache::default();
    let mut seq: Vec<u32> = prompt.to_vec();
    let mut out = Vec::new();
    let ids = |s: &[u32]| {
        let v: Vec<i64> = s.iter().map(|&t| i64::from(t)).collect();
        Tensor::<2, Int>::from_data(TensorData::new(v, [1, s.len()]), &device)
    };
    let mut next_input = seq.clone();
    while out.len() < cfg.max_tokens && seq.len() < model.max_positions() {
        let logits = if cfg.use_cache {
            model.forward_cached(ids(&next_input), Some(&mut cache))
        } else {
            model.forward(ids(&seq))
        };
        let [_, t, v] = logits.dims();
        let last: Vec<f32> = logits
            .slice([0..1, t - 1..t, 0..v])
            .into_data()
            .try_into_vec_as::<f32>()
            .map_err(|e| TrainError::Model(format!("logits: {e:?}")))?;
        let token = pick(&last, cfg, &mut rng);
        if stop_ids.contains(&token) {
            break;
        }
        on_token(token);
        out.push(token);
        seq.push(token);
        next_input = vec![token];
    }
    Ok(out)
}

/// Softmax of one logit row (for tests and callers that want probabilities).
pub fn probabilities(logits: Tensor<1>) -> Tensor<1> {
    softmax(logits, 0)
}
