//! Held-out evaluation of a real LM: negative log-likelihood per token over fixed windows.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::Serialize;

use super::llama::LlamaLm;
use crate::error::TrainError;

/// What `fedlora eval` prints.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalReport {
    /// Scored targets (windows × context).
    pub tokens: usize,
    /// Summed negative log-likelihood divided by `tokens`, in nats.
    pub nll_per_token: f64,
    /// `exp(nll_per_token)`.
    pub ppl: f64,
    /// Windows scored.
    pub windows: usize,
}

/// The windows of a token stream: window `i` is `tokens[i·C, i·C + C + 1)`, so neighbours share
/// one token; its input is the first `C` tokens and its targets the last `C`. A partial last
/// window is dropped; at most `max_windows` are returned.
pub fn windows(tokens: &[u32], context: usize, max_windows: usize) -> Vec<&[u32]> {
    if context == 0 || tokens.len() < context + 1 {
        return Vec::new();
    }
    let complete = (tokens.len() - 1) / context;
    (0..complete.min(max_windows))
        .map(|i| &tokens[i * context..i * context + context + 1])
        .collect()
}

/// Scores the first `max_windows` windows of `context` tokens (see [`windows`]), `batch` windows
/// per forward pass. Sums the NLL in f64.
pub fn evaluate(
    model: &LlamaLm,
    tokens: &[u32],
    context: usize,
    max_windows: usize,
    batch: usize,
    device: &Device,
) -> Result<EvalReport, TrainError> {
    if context == 0 || max_windows == 0 {
        return Err(TrainError::Config(
            "context and max windows must be at least 1 (--context, --max-windows)".into(),
        ));
    }
    if context > model.max_positions() {
        return Err(TrainError::Config(format!(
            "context {context} exceeds the model's {} positions (--context)",
            model.max_positions()
        )));
    }
    let ws = windows(tokens, context, max_windows);
    if ws.is_empty() {
        return Err(TrainError::Data(format!(
            "the text has {} tokens; one window of context {context} needs {}",
            tokens.len(),
            context + 1
        )));
    }
    let mut nll = 0f64;
    for chunk in ws.chunks(batch.max(1)) {
        let b = chunk.len();
        let flat: Vec<i64> = chunk
            .iter()
            .flat_map(|w| w.iter().map(|&t| i64::from(t)))
            .collect();
        let all = Tensor::<2, Int>::from_data(TensorData::new(flat, [b, context + 1]), device);
        let inputs = all.clone().slice([0..b, 0..context]);
        let targets = all.slice([0..b, 1..context + 1]);
        let logp = log_softmax(model.forward(inputs), 2);
        let picked: Vec<f32> = logp
            .gather(2, targets.unsqueeze_dim::<3>(2))
            .into_data()
            .try_into_vec_as::<f32>()
            .map_err(|e| TrainError::Model(format!("log-probabilities: {e:?}")))?;
        nll -= picked.iter().map(|&p| f64::from(p)).sum::<f64>();
    }
    let scored = ws.len() * context;
    let per = nll / scored as f64;
    Ok(EvalReport {
        tokens: scored,
        nll_per_token: per,
        ppl: per.exp(),
        windows: ws.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::windows;

    #[test]
    fn neighbouring_windows_share_one_token_and_partial_windows_are_dropped() {
        let t: Vec<u32> = (0..10).collect();
        let w = windows(&t, 3, 100);
        assert_eq!(w, vec![&t[0..4], &t[3..7], &t[6..10]]);
        assert_eq!(windows(&t, 3, 2).len(), 2);
        assert_eq!(windows(&t[..9], 3, 100).len(), 2);
        assert!(windows(&t[..3], 3, 100).is_empty());
    }
}
