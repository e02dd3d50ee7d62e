//! `fedlora eval` and `fedlora generate` on the real binary, with the tiny parity fixtures of
//! `tests/fixtures/llm` (the real SmolLM2 stays out of CI; see examples/smollm2_parity.rs).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_fedlora");

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llm")
}

fn fedlora(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stdout_ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "failed: {err}");
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn text_file(dir: &Path) -> PathBuf {
    let p = dir.join("heldout.txt");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tiny_shakespeare.txt"),
    )
    .unwrap();
    std::fs::write(&p, &text[..20_000]).unwrap();
    p
}

#[test]
fn eval_prints_tokens_nll_and_ppl_and_the_gguf_agrees_with_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let text = text_file(dir.path());
    let mut nll = Vec::new();
    for model in ["llama", "llama.gguf", "qwen2"] {
        let m = fixtures().join(model);
        let out = fedlora(&[
            "eval",
            "--model",
            m.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--context",
            "32",
            "--max-windows",
            "5",
            "--batch",
            "2",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(stdout_ok(&out).trim()).unwrap();
        assert_eq!(v["tokens"], 160, "{model}: 5 windows × 32 targets");
        let n = v["nll_per_token"].as_f64().unwrap();
        let ppl = v["ppl"].as_f64().unwrap();
        assert!(n > 0.0 && (ppl - n.exp()).abs() < 1e-9 * ppl, "{v}");
        nll.push(n);
    }
    // the Q4_1/Q8_0 GGUF of the same weights is close to the f32 directory, not identical
    assert!(
        (nll[0] - nll[1]).abs() < 0.1 * nll[0] && nll[0] != nll[1],
        "{nll:?}"
    );
}

#[test]
fn generate_is_greedy_and_reproducible_and_chat_uses_the_template() {
    let m = fixtures().join("llama");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "Hello",
            "--max-tokens",
            "12",
        ];
        args.extend_from_slice(extra);
        stdout_ok(&fedlora(&args))
    };
    assert_eq!(run(&[]), run(&[]), "greedy is deterministic");
    let sampled = ["--temperature", "1.0", "--top-p", "0.9", "--seed", "3"];
    assert_eq!(run(&sampled), run(&sampled), "a seed fixes sampling");
    assert!(!run(&["--chat"]).is_empty());
    // with an adapter
    let adapter = fixtures().join("llama_adapter");
    assert!(!run(&["--adapter", adapter.to_str().unwrap()]).is_empty());
}

#[test]
fn bad_models_and_flags_exit_2_with_a_message_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let text = text_file(dir.path());
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, b"not a model").unwrap();
    let cut = dir.path().join("cut.gguf");
    let gguf = std::fs::read(fixtures().join("llama.gguf")).unwrap();
    std::fs::write(&cut, &gguf[..gguf.len() / 2]).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![junk.display().to_string()], "neither a GGUF file"),
        (vec![cut.display().to_string()], "truncated"),
        (
            vec![fixtures().join("tok_qwen2.gguf").display().to_string()],
            "lacks `llama.embedding_length`",
        ),
        (vec!["/nonexistent/model.gguf".into()], "cannot open model"),
    ];
    for (model, says) in cases {
        let out = fedlora(&[
            "eval",
            "--model",
            &model[0],
            "--text",
            text.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{model:?}: {err}");
        assert!(err.contains(says), "`{says}` not in: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let m = fixtures().join("llama");
    let out = fedlora(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "x",
        "--top-p",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--top-p"));
}

#[test]
fn demo_with_a_real_llm_then_peft_export_then_eval_with_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("demo");
    let m = fixtures().join("llama");
    let out = fedlora(&[
        "demo",
        "--model",
        m.to_str().unwrap(),
        "--clients",
        "4",
        "--rounds",
        "2",
        "--sampling-seed",
        "1",
        "--dir",
        d.to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(stdout_ok(&out).trim()).unwrap();
    assert_eq!(v["final_version"], 2, "{v}");
    let (base, last) = (
        v["base_eval_loss"].as_f64().unwrap(),
        v["final_eval_loss"].as_f64().unwrap(),
    );
    assert!(last < base, "held-out NLL {base} -> {last}");
    // the committed global adapter as a PEFT directory, then scored with it
    let peft = dir.path().join("peft");
    stdout_ok(&fedlora(&[
        "export",
        "--data-dir",
        d.join("coordinator").to_str().unwrap(),
        "--peft",
        peft.to_str().unwrap(),
        "--model",
        m.to_str().unwrap(),
    ]));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(peft.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    let text = text_file(dir.path());
    let score = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            m.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--context",
            "64",
            "--max-windows",
            "4",
            "--json",
        ];
        args.extend_from_slice(extra);
        let v: serde_json::Value = serde_json::from_str(stdout_ok(&fedlora(&args)).trim()).unwrap();
        v["nll_per_token"].as_f64().unwrap()
    };
    let with = score(&["--adapter", peft.to_str().unwrap()]);
    let without = score(&[]);
    assert!(with != without, "the adapter changes the model");
    // other adapter flags than the federation's: refused, exit 2
    let out = fedlora(&[
        "export",
        "--data-dir",
        d.join("coordinator").to_str().unwrap(),
        "--peft",
        dir.path().join("p2").to_str().unwrap(),
        "--model",
        m.to_str().unwrap(),
        "--rank",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(2));
}
