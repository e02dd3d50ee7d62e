//! LoRA training of a real LLM (the tiny Llama fixture): plain and DP-SGD steps, per-example
//! gradients, chat examples scored on the assistant's tokens only, and the adapter spec bound
//! to the model's identity.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use fedlora_protocol::TrainConfig;
use fedlora_train::adapter::{collect_named, NamedFilter};
use fedlora_train::dp_sgd::{per_example_grads, plain_gradient, DpSgdConfig};
use fedlora_train::llm::data::{chat_example, parse_chat_line, text_examples, TokenExample};
use fedlora_train::llm::tokenizer::LlmTokenizer;
use fedlora_train::llm::trainer::LlmTrainer;
use fedlora_train::lora::LoraConfig;
use rand::SeedableRng;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llm")
}

fn lora() -> LoraConfig {
    LoraConfig::new().with_rank(4).with_targets(vec![
        "q_proj".into(),
        "v_proj".into(),
        "down_proj".into(),
    ])
}

fn shakespeare(trainer: &LlmTrainer) -> Vec<TokenExample> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/tiny_shakespeare.txt"),
    )
    .unwrap();
    text_examples(&trainer.llm().tokenizer, &text[..6000], 16).unwrap()
}

#[test]
fn local_lora_training_lowers_the_loss_and_leaves_the_base_untouched() {
    let trainer = LlmTrainer::load(&fixtures().join("llama"), &lora(), 1).unwrap();
    let data = shakespeare(&trainer);
    assert!(data.len() > 50);
    let g = trainer.initial_adapter();
    let before = trainer.evaluate(&g, &data).unwrap().loss;
    let cfg = TrainConfig {
        local_steps: 30,
        batch_size: 8,
        learning_rate: 1e-2,
        ..Default::default()
    };
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(3);
    let out = trainer.train(&g, &data, &cfg, &mut rng).unwrap();
    assert_eq!(out.delta.spec().hash(), trainer.spec().hash());
    let mut local = g.clone();
    local.apply_delta(&out.delta).unwrap();
    let after = trainer.evaluate(&local, &data).unwrap().loss;
    assert!(after < before - 0.05, "loss {before} -> {after}");
    let base0 = collect_named(&trainer.model_with(&g).unwrap(), NamedFilter::Base);
    let base1 = collect_named(&trainer.model_with(&local).unwrap(), NamedFilter::Base);
    assert_eq!(base0, base1, "only the adapter moves");
}

#[test]
fn per_example_gradients_equal_single_example_backward_passes() {
    let trainer = LlmTrainer::load(&fixtures().join("llama"), &lora(), 1).unwrap();
    let data = shakespeare(&trainer);
    // give B values so A's gradient is not zero, then compare
    let mut g = trainer.initial_adapter();
    let noise: Vec<f32> = (0..g.values().len())
        .map(|i| ((i * 7919 % 97) as f32 - 48.0) * 1e-3)
        .collect();
    g = fedlora_protocol::FlatAdapter::new(g.spec().clone(), noise).unwrap();
    let model = trainer.model_with(&g).unwrap();
    let device = Device::flex().autodiff();
    // a chat-style mask on one example: only some targets scored
    let mut masked = data[2].clone();
    for s in masked.scored.iter_mut().step_by(3) {
        *s = false;
    }
    let batch: Vec<&TokenExample> = vec![&data[0], &data[1], &masked];
    let (per, _) = per_example_grads(&model, &batch, &device);
    for (i, ex) in batch.iter().enumerate() {
        let single = plain_gradient(&model, &[*ex], &device);
        for (p, s) in per.iter().zip(&single) {
            let [_, r, c] = p.dims();
            let row = p.clone().slice([i..i + 1, 0..r, 0..c]).reshape([r, c]);
            let err = (row - s.clone().inner()).abs().max().into_scalar::<f32>();
            // relative to the gradient's own size (small gradients included), with a floor
            // far below any gradient entry that matters
            let scale = s.clone().abs().max().into_scalar::<f32>();
            assert!(
                err <= 1e-4 * scale + 1e-9,
                "example {i}: {err} (scale {scale}, relative {})",
                err / scale.max(f32::MIN_POSITIVE)
            );
        }
    }
}

#[test]
fn dp_training_runs_and_its_delta_is_in_the_spec() {
    let trainer = LlmTrainer::load(&fixtures().join("llama"), &lora(), 1).unwrap();
    let data = shakespeare(&trainer);
    let g = trainer.initial_adapter();
    let dp = DpSgdConfig {
        clip_norm: 1.0,
        noise_multiplier: 1.0,
        expected_batch: 8,
        max_chunk: 8,
        loss_clip: None,
        dirac_canaries: Vec::new(),
    };
    let cfg = TrainConfig {
        local_steps: 3,
        batch_size: 8,
        learning_rate: 1e-2,
        ..Default::default()
    };
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(4);
    let mut noise = fedlora_dp::GaussianNoise::seeded(1.0, 9);
    let out = trainer
        .train_dp(&g, &data, &cfg, &dp, &mut rng, &mut noise)
        .unwrap();
    assert_eq!(out.delta.spec().hash(), trainer.spec().hash());
    assert!(out.delta.values().iter().any(|v| *v != 0.0));
    assert_eq!(out.released_loss, None, "no loss released unless asked");
}

#[test]
fn chat_examples_score_only_the_assistant_turns() {
    let tok = LlmTokenizer::from_hf_dir(&fixtures().join("llama")).unwrap();
    let line = r#"{"messages": [{"role": "user", "content": "Who wrote Hamlet?"},
        {"role": "assistant", "content": "Shakespeare did."},
        {"role": "user", "content": "When?"},
        {"role": "assistant", "content": "Around 1600."}]}"#;
    let messages = parse_chat_line(&line.replace('\n', " ")).unwrap();
    let ex = chat_example(&tok, &messages, 512).unwrap().unwrap();
    let scored: Vec<u32> = ex
        .ids
        .iter()
        .skip(1)
        .zip(&ex.scored)
        .filter(|(_, s)| **s)
        .map(|(t, _)| *t)
        .collect();
    // the scored tokens are exactly the two assistant turns as the template writes them
    let (ids, _) = tok
        .encode_with_offsets("Shakespeare did.<|im_end|>\n")
        .unwrap();
    let (ids2, _) = tok.encode_with_offsets("Around 1600.<|im_end|>\n").unwrap();
    let want: Vec<u32> = ids.into_iter().chain(ids2).collect();
    assert_eq!(scored, want);
    // {"prompt", "response"} is a user turn and an assistant turn
    let pr = parse_chat_line(r#"{"prompt": "Hi", "response": "Hello."}"#).unwrap();
    assert_eq!(pr.len(), 2);
    assert_eq!(pr[1].role, "assistant");
    // truncation that cuts every assistant token drops the example
    assert!(chat_example(&tok, &messages, 8).unwrap().is_none());
    assert!(parse_chat_line(r#"{"text": "x"}"#).is_err());
}

#[test]
fn the_adapter_spec_names_the_base_model() {
    let a = LlmTrainer::load(&fixtures().join("llama"), &lora(), 1).unwrap();
    let b = LlmTrainer::load(&fixtures().join("llama.gguf"), &lora(), 1).unwrap();
    // same shapes, other weights (quantized): different specs
    assert_eq!(a.spec().tensors(), b.spec().tensors());
    assert_ne!(a.spec().hash(), b.spec().hash());
    assert!(a.spec().base().unwrap().starts_with("sha256:"));
    assert!(a.model_with(&b.initial_adapter()).is_err());
}

#[test]
fn examples_from_a_tokenizer_that_does_not_match_the_model_are_refused_with_a_typed_error() {
    let trainer = LlmTrainer::load(&fixtures().join("llama"), &lora(), 1).unwrap();
    let vocab = trainer.llm().model.vocab_size() as u32;
    let mut data = shakespeare(&trainer)[..4].to_vec();
    data[2].ids[5] = vocab; // one id past the embedding table
    let g = trainer.initial_adapter();
    let cfg = TrainConfig {
        local_steps: 1,
        batch_size: 2,
        ..Default::default()
    };
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(3);
    for r in [
        trainer.train(&g, &data, &cfg, &mut rng).map(|_| ()),
        trainer.evaluate(&g, &data).map(|_| ()),
    ] {
        match r {
            Err(fedlora_train::error::TrainError::Data(m)) => {
                assert!(m.contains(&format!("token id {vocab}")), "{m}")
            }
            other => panic!("expected a data error, got {other:?}"),
        }
    }
    // the last id of the vocabulary is fine
    data[2].ids[5] = vocab - 1;
    assert!(trainer.evaluate(&g, &data).unwrap().loss.is_finite());
}
