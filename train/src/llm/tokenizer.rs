//! Tokenizers of real models (Hugging Face `tokenizers`) and their chat templates (`minijinja`,
//! configured as transformers configures Jinja).
//!
//! From a Hugging Face directory: `tokenizer.json` as is, the chat template from
//! `chat_template.jinja` or `tokenizer_config.json`. From GGUF metadata (`tokenizer.ggml.model =
//! gpt2`, byte-level BPE): the vocabulary, merges and token types are turned into the same
//! `tokenizer.json` structure, with the pre-tokenizer that `tokenizer.ggml.pre` names (see
//! [`pre_tokenizer_for`]); tokens of type 3 (control) or 4 (user-defined) become special
//! added tokens; `tokenizer.ggml.add_bos_token` adds the BOS token in front of every encoding.

use std::path::Path;

use minijinja::{Environment, ErrorKind};
use serde::Serialize;
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use super::gguf::GgufFile;
use crate::error::TrainError;

/// Llama 3's split regex (`llama-bpe` in llama.cpp).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex: as Llama 3's, but one digit at a time.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The GGUF pre-tokenizer names fedlora maps.
pub const GGUF_PRE_TOKENIZERS: &[&str] = &["smollm", "llama-bpe", "qwen2"];

/// A token's `(start, end)` byte offsets in the text it came from.
pub type ByteSpan = (usize, usize);

/// One chat message.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A model's tokenizer, chat template and stop tokens.
pub struct LlmTokenizer {
    inner: Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    stop_ids: Vec<u32>,
}

impl std::fmt::Debug for LlmTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmTokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("stop_ids", &self.stop_ids)
            .finish()
    }
}

/// The normalizer, pre-tokenizer and `ignore_merges` flag of a GGUF `tokenizer.ggml.pre` name,
/// as in the Hugging Face `tokenizer.json` of the model family it names:
/// - `smollm`: `Sequence[Digits(individual_digits), ByteLevel(add_prefix_space = false)]`;
/// - `llama-bpe`: Llama 3's split regex, then `ByteLevel(use_regex = false)`; BPE with
///   `ignore_merges` (a word that is a token is not split);
/// - `qwen2`: NFC, Qwen2's split regex, then `ByteLevel(use_regex = false)`.
pub fn pre_tokenizer_for(name: &str) -> Result<(Value, Value, bool), TrainError> {
    let split = |pattern: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
        ]})
    };
    Ok(match name {
        "smollm" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
            ]}),
            false,
        ),
        "llama-bpe" => (Value::Null, split(LLAMA3_SPLIT), true),
        "qwen2" => (json!({"type": "NFC"}), split(QWEN2_SPLIT), false),
        other => {
            return Err(TrainError::Unsupported(format!(
                "GGUF pre-tokenizer `{other}`: fedlora maps {}; load this model from its \
                 Hugging Face directory (tokenizer.json) instead",
                GGUF_PRE_TOKENIZERS.join(", ")
            )))
        }
    })
}

fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|i| i as u32).into_iter().collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|i| i as u32)
            .collect(),
        _ => Vec::new(),
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, TrainError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| TrainError::ModelFile(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TrainError::ModelFile(format!("{}: not valid JSON: {e}", path.display())))
}

impl LlmTokenizer {
    /// Loads `tokenizer.json` of a Hugging Face directory, with the chat template and the
    /// BOS/EOS tokens from `chat_template.jinja`, `tokenizer_config.json`, `config.json` and
    /// `generation_config.json` (stop on every EOS id they list).
    pub fn from_hf_dir(dir: &Path) -> Result<Self, TrainError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(TrainError::ModelFile(format!(
                "{}: no tokenizer.json (fedlora needs the fast-tokenizer file)",
                dir.display()
            )));
        }
        let inner = Tokenizer::from_file(&path).map_err(|e| {
            TrainError::ModelFile(format!("{}: not a readable tokenizer: {e}", path.display()))
        })?;
        let tc = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let mut chat_template = match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            chat_template = Some(
                std::fs::read_to_string(&jinja)
                    .map_err(|e| TrainError::ModelFile(format!("{}: {e}", jinja.display())))?,
            );
        }
        let bos_token = tc.get("bos_token").and_then(token_text);
        let eos_token = tc.get("eos_token").and_then(token_text);
        let mut stop_ids = Vec::new();
        for file in ["config.json", "generation_config.json"] {
            let v = read_json(&dir.join(file))?.unwrap_or(Value::Null);
            stop_ids.extend(ids_of(v.get("eos_token_id")));
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            stop_ids.push(id);
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Self {
            inner,
            chat_template,
            bos_token,
            eos_token,
            stop_ids,
        })
    }

    /// Builds the tokenizer from GGUF metadata (`tokenizer.ggml.*`); see the module docs.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, TrainError> {
        let origin = g.origin().to_string();
        let missing =
            |k: &str| TrainError::ModelFile(format!("{origin}: GGUF metadata lacks `{k}`"));
        let model = g
            .str("tokenizer.ggml.model")?
            .ok_or_else(|| missing("tokenizer.ggml.model"))?;
        if model != "gpt2" {
            return Err(TrainError::Unsupported(format!(
                "{origin}: GGUF tokenizer model `{model}`: fedlora builds byte-level BPE (`gpt2`) \
                 tokenizers from GGUF; load SentencePiece models (such as TinyLlama) from their \
                 Hugging Face directory"
            )));
        }
        let pre = g.str("tokenizer.ggml.pre")?.unwrap_or("default");
        let (normalizer, pre_tokenizer, ignore_merges) = pre_tokenizer_for(pre)?;
        let tokens = g
            .str_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| missing("tokenizer.ggml.tokens"))?;
        let merges = g
            .str_array("tokenizer.ggml.merges")?
            .ok_or_else(|| missing("tokenizer.ggml.merges"))?;
        let types = g
            .int_array("tokenizer.ggml.token_type")?
            .unwrap_or_default();
        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        for (id, tok) in tokens.iter().enumerate() {
            if vocab.insert(tok.to_string(), json!(id)).is_some() {
                return Err(TrainError::ModelFile(format!(
                    "{origin}: token `{tok}` appears twice"
                )));
            }
            if matches!(types.get(id), Some(3 | 4)) {
                added.push(
                    json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true}),
                );
            }
        }
        let merges: Vec<Value> = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| json!([a, b]))
                    .ok_or_else(|| {
                        TrainError::ModelFile(format!("{origin}: merge `{m}` is not two tokens"))
                    })
            })
            .collect::<Result<_, _>>()?;
        let token_at = |key: &str| -> Result<Option<String>, TrainError> {
            Ok(g.uint(key)?
                .and_then(|id| tokens.get(id as usize))
                .map(|t| t.to_string()))
        };
        let bos_token = token_at("tokenizer.ggml.bos_token_id")?;
        let eos_token = token_at("tokenizer.ggml.eos_token_id")?;
        let add_bos = g.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
        let post_processor = match (&bos_token, add_bos) {
            (Some(bos), true) => {
                let id = vocab[bos.as_str()].clone();
                json!({"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
                    "special_tokens": {bos.as_str(): {"id": bos, "ids": [id], "tokens": [bos]}}})
            }
            (None, true) => return Err(missing("tokenizer.ggml.bos_token_id")),
            (_, false) => Value::Null,
        };
        let spec = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges}
        });
        let inner: Tokenizer = spec.to_string().parse().map_err(|e| {
            TrainError::ModelFile(format!("{origin}: the GGUF tokenizer does not build: {e}"))
        })?;
        let mut stop_ids = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Some(id) = g.uint(key)? {
                stop_ids.push(id as u32);
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Self {
            inner,
            chat_template: g.str("tokenizer.chat_template")?.map(str::to_string),
            bos_token,
            eos_token,
            stop_ids,
        })
    }

    /// Token ids of `text`. With `add_special_tokens`, the tokenizer's post-processor runs (it
    /// adds BOS where the model's tokenizer does); special tokens written in the text are
    /// always recognised.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TrainError> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TrainError::Data(format!("cannot tokenize: {e}")))
    }

    /// Token ids of `text` without the post-processor (no BOS added), with each token's byte
    /// span in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<ByteSpan>), TrainError> {
        let e = self
            .inner
            .encode(text, false)
            .map_err(|e| TrainError::Data(format!("cannot tokenize: {e}")))?;
        Ok((e.get_ids().to_vec(), e.get_offsets().to_vec()))
    }

    /// Text of `ids` (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TrainError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TrainError::Data(format!("cannot decode tokens: {e}")))
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (chat template, BOS and EOS tokens)
    /// into a Hugging Face model directory.
    pub fn save_hf(&self, dir: &Path) -> Result<(), TrainError> {
        let io = |e: std::io::Error| TrainError::Storage(format!("{}: {e}", dir.display()));
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| TrainError::Model(format!("tokenizer: {e}")))?;
        std::fs::write(dir.join("tokenizer.json"), json).map_err(io)?;
        let mut config = json!({"tokenizer_class": "PreTrainedTokenizerFast"});
        if let Some(t) = &self.chat_template {
            config["chat_template"] = json!(t);
        }
        if let Some(t) = &self.bos_token {
            config["bos_token"] = json!(t);
        }
        if let Some(t) = &self.eos_token {
            config["eos_token"] = json!(t);
        }
        let text = serde_json::to_string_pretty(&config).expect("json");
        std::fs::write(dir.join("tokenizer_config.json"), text).map_err(io)
    }

    /// Token ids that end generation (EOS / end-of-turn).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders `messages` with the model's chat template, as transformers'
    /// `apply_chat_template(tokenize=False)` does: Jinja with `trim_blocks` and `lstrip_blocks`,
    /// Python string methods, `raise_exception`, and `bos_token` / `eos_token` defined.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TrainError> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            TrainError::Unsupported("this model has no chat template; leave out --chat".into())
        })?;
        let bad = |e: minijinja::Error| TrainError::ModelFile(format!("chat template: {e:#}"));
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(bad)?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", template.to_string())
            .map_err(bad)?;
        let messages_value: Vec<minijinja::Value> = messages
            .iter()
            .map(|m| {
                let mut map = std::collections::BTreeMap::new();
                map.insert("role", m.role.clone());
                map.insert("content", m.content.clone());
                minijinja::Value::from(map)
            })
            .collect();
        let ctx = minijinja::context! {
            messages => messages_value,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        env.get_template("chat")
            .map_err(bad)?
            .render(ctx)
            .map_err(bad)
    }
}
