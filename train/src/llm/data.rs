//! Training examples for a real LLM: token windows of plain text, and chat conversations
//! (JSONL) rendered with the model's chat template, scored on the assistant's tokens only.
//!
//! One [`TokenExample`] is the DP unit: one window, or one conversation.

use crate::fused::token_nll;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde_json::Value;

use super::eval::windows;
use super::llama::LlamaLm;
use super::tokenizer::{ChatMessage, LlmTokenizer};
use crate::dp_sgd::DpModel;
use crate::error::TrainError;
use crate::lora::LoraLinear;
use crate::model::ExampleAdapters;

/// One training or evaluation example: token ids, and which targets count. Target `t` (the
/// prediction of `ids[t + 1]` from `ids[..=t]`) counts when `scored[t]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenExample {
    /// Token ids, `n + 1` of them for `n` targets.
    pub ids: Vec<u32>,
    /// `n` flags: which targets the loss includes.
    pub scored: Vec<bool>,
}

impl TokenExample {
    /// Number of targets the loss includes.
    pub fn scored_targets(&self) -> usize {
        self.scored.iter().filter(|&&s| s).count()
    }
}

/// Plain text in windows as [`eval`](super::eval) cuts them (window i is tokens
/// `[i·C, i·C + C + 1)`), every target scored. The whole text is tokenized as one string.
pub fn text_examples(
    tok: &LlmTokenizer,
    text: &str,
    context: usize,
) -> Result<Vec<TokenExample>, TrainError> {
    let ids = tok.encode(text, true)?;
    Ok(windows(&ids, context, usize::MAX)
        .into_iter()
        .map(|w| TokenExample {
            ids: w.to_vec(),
            scored: vec![true; w.len() - 1],
        })
        .collect())
}

/// The messages of one JSONL line: `{"messages": [{"role", "content"}, …]}` or
/// `{"prompt", "response"}` (a user turn and an assistant turn).
pub fn parse_chat_line(line: &str) -> Result<Vec<ChatMessage>, TrainError> {
    let bad = |m: &str| TrainError::Data(format!("chat line: {m}"));
    let v: Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
    if let Some(list) = v.get("messages").and_then(Value::as_array) {
        return list
            .iter()
            .map(|m| {
                let role = m.get("role").and_then(Value::as_str);
                let content = m.get("content").and_then(Value::as_str);
                match (role, content) {
                    (Some(r), Some(c)) => Ok(ChatMessage {
                        role: r.to_string(),
                        content: c.to_string(),
                    }),
                    _ => Err(bad("a message needs string `role` and `content`")),
                }
            })
            .collect();
    }
    match (
        v.get("prompt").and_then(Value::as_str),
        v.get("response").and_then(Value::as_str),
    ) {
        (Some(p), Some(r)) => Ok(vec![
            ChatMessage {
                role: "user".into(),
                content: p.into(),
            },
            ChatMessage {
                role: "assistant".into(),
                content: r.into(),
            },
        ]),
        _ => Err(bad(
            "expected {\"messages\": [...]} or {\"prompt\": ..., \"response\": ...}",
        )),
    }
}

/// One conversation as an example: rendered with the chat template, truncated to
/// `context + 1` tokens, with only the assistant turns' tokens scored (each turn from the end
/// of the generation prompt before it to the end of the turn as the template writes it, its
/// end-of-turn token included). `None` when no assistant token survives the truncation.
pub fn chat_example(
    tok: &LlmTokenizer,
    messages: &[ChatMessage],
    context: usize,
) -> Result<Option<TokenExample>, TrainError> {
    let full = tok.render_chat(messages, false)?;
    let (ids, offsets) = tok.encode_with_offsets(&full)?;
    // byte spans of the assistant turns in the rendered text
    let mut spans = Vec::new();
    for (k, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let start = tok.render_chat(&messages[..k], true)?;
        let end = tok.render_chat(&messages[..=k], false)?;
        if !full.starts_with(&start) || !full.starts_with(&end) || end.len() < start.len() {
            return Err(TrainError::Unsupported(
                "this chat template does not render conversations as prefixes of each other, \
                 so assistant turns cannot be located"
                    .into(),
            ));
        }
        spans.push(start.len()..end.len());
    }
    let n = ids.len().min(context + 1);
    let ids = ids[..n].to_vec();
    let scored: Vec<bool> = (1..n)
        .map(|t| {
            let (s, e) = offsets[t];
            spans.iter().any(|r| s >= r.start && e <= r.end && e > s)
        })
        .collect();
    let ex = TokenExample { ids, scored };
    Ok((ex.scored_targets() > 0).then_some(ex))
}

/// Every conversation of a JSONL file (one per line; blank lines skipped) as an example; a
/// conversation with no assistant token within the context is dropped.
pub fn chat_examples(
    tok: &LlmTokenizer,
    jsonl: &str,
    context: usize,
) -> Result<Vec<TokenExample>, TrainError> {
    let mut out = Vec::new();
    for (i, line) in jsonl.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let messages =
            parse_chat_line(line).map_err(|e| TrainError::Data(format!("line {}: {e}", i + 1)))?;
        if let Some(ex) = chat_example(tok, &messages, context)? {
            out.push(ex);
        }
    }
    Ok(out)
}

/// A client's examples for a real LLM: training and held-out.
#[derive(Clone, Debug, Default)]
pub struct LlmData {
    /// Name of the data source (role or file).
    pub name: String,
    /// Training examples.
    pub train: Vec<TokenExample>,
    /// Held-out examples.
    pub test: Vec<TokenExample>,
}

impl LlmData {
    /// Holds out the last [`TEST_FRACTION`](crate::data::TEST_FRACTION) of `examples` (at least
    /// one, at most [`MAX_TEST_WINDOWS`](crate::data::MAX_TEST_WINDOWS)).
    pub fn split(name: &str, mut examples: Vec<TokenExample>) -> Result<Self, TrainError> {
        if examples.len() < 2 {
            return Err(TrainError::Data(format!(
                "{name}: {} example(s) is too few to train and hold one out",
                examples.len()
            )));
        }
        let n_test = ((examples.len() as f64 * crate::data::TEST_FRACTION).ceil() as usize)
            .clamp(1, crate::data::MAX_TEST_WINDOWS);
        let test = examples.split_off(examples.len() - n_test);
        Ok(Self {
            name: name.to_string(),
            train: examples,
            test,
        })
    }

    /// Plain text in windows of `context` targets ([`text_examples`]), the last ones held out.
    pub fn from_text(
        name: &str,
        tok: &LlmTokenizer,
        text: &str,
        context: usize,
    ) -> Result<Self, TrainError> {
        Self::split(name, text_examples(tok, text, context)?)
    }

    /// A data file: `.jsonl` is chat data ([`chat_examples`]), anything else plain UTF-8 text.
    pub fn from_file(
        path: &std::path::Path,
        tok: &LlmTokenizer,
        context: usize,
    ) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            TrainError::Data(format!("cannot read the data file {}: {e}", path.display()))
        })?;
        let name = path.display().to_string();
        if path.extension().is_some_and(|e| e == "jsonl") {
            let examples = chat_examples(tok, &text, context)?;
            if examples.is_empty() {
                return Err(TrainError::Data(format!(
                    "{name}: no conversation has an assistant token within the first {context} \
                     tokens (raise --context)"
                )));
            }
            Self::split(&name, examples)
        } else {
            Self::from_text(&name, tok, &text, context)
        }
    }

    /// The `i`-th demo client: the `i`-th largest speaking role of the shipped corpus.
    pub fn demo_client(i: usize, tok: &LlmTokenizer, context: usize) -> Result<Self, TrainError> {
        let split = crate::data::split_roles(crate::data::SHAKESPEARE);
        let n = split.clients.len();
        let role = split.clients.get(i).ok_or_else(|| {
            TrainError::Data(format!("demo client index {i} out of range (0..{n})"))
        })?;
        Self::from_text(&role.name, tok, &role.text, context)
    }
}

/// Examples padded to one length: tokens `[b, n + 1]` (padding id 0) and the target weights
/// `[b, n]` (1 scored, 0 not scored or padding).
pub fn batch_tensors(examples: &[&TokenExample], device: &Device) -> (Tensor<2, Int>, Tensor<2>) {
    let len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let b = examples.len();
    let mut ids = vec![0i64; b * len];
    let mut w = vec![0f32; b * (len - 1)];
    for (i, e) in examples.iter().enumerate() {
        for (j, &t) in e.ids.iter().enumerate() {
            ids[i * len + j] = i64::from(t);
        }
        for (j, &s) in e.scored.iter().enumerate() {
            w[i * (len - 1) + j] = if s { 1.0 } else { 0.0 };
        }
    }
    (
        Tensor::from_data(TensorData::new(ids, [b, len]), device),
        Tensor::from_data(TensorData::new(w, [b, len - 1]), device),
    )
}

impl LlamaLm {
    /// Summed negative log-likelihood of each example's scored targets, and their number.
    ///
    /// # Shapes
    /// - outputs: `[batch]`, `[batch]`
    pub fn example_nll(
        &self,
        examples: &[&TokenExample],
        per: Option<&ExampleAdapters>,
        device: &Device,
    ) -> (Tensor<1>, Tensor<1>) {
        let (tokens, weights) = batch_tensors(examples, device);
        let [b, n1] = tokens.dims();
        let inputs = tokens.clone().slice([0..b, 0..n1 - 1]);
        let targets = tokens.slice([0..b, 1..n1]);
        let per_token = token_nll(self.forward_with(inputs, per), targets);
        let nll = (per_token * weights.clone()).sum_dim(1).reshape([b]);
        (nll, weights.sum_dim(1).reshape([b]))
    }
}

impl DpModel for LlamaLm {
    type Example = TokenExample;

    fn lora_layers(&self) -> Vec<(String, &LoraLinear)> {
        LlamaLm::lora_layers(self)
    }

    /// Mean NLL over each example's scored targets (nats per token).
    fn example_losses(
        &self,
        examples: &[&TokenExample],
        per: Option<&ExampleAdapters>,
        device: &Device,
    ) -> Tensor<1> {
        let (nll, count) = self.example_nll(examples, per, device);
        nll / count.clamp_min(1.0)
    }
}
