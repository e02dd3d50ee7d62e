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
    // the committed global adapter as a PEFT directory, then scored with it: the data
    // directory records the model and the adapter flags, so none are repeated
    let data = d.join("coordinator");
    let peft = dir.path().join("peft");
    stdout_ok(&fedlora(&[
        "export",
        "--data-dir",
        data.to_str().unwrap(),
        "--peft",
        peft.to_str().unwrap(),
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
    // the global adapter scored straight from the data directory: the PEFT export's score
    let direct = {
        let out = fedlora(&[
            "eval",
            "--data-dir",
            data.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--context",
            "64",
            "--max-windows",
            "4",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(stdout_ok(&out).trim()).unwrap();
        v["nll_per_token"].as_f64().unwrap()
    };
    assert!(
        (direct - with).abs() <= 1e-5 * with.abs(),
        "eval --data-dir {direct} vs the exported PEFT adapter {with}"
    );
    // another model file than the federation's: refused with both identities named
    let other = fixtures().join("qwen2");
    let out = fedlora(&[
        "export",
        "--data-dir",
        data.to_str().unwrap(),
        "--peft",
        dir.path().join("p3").to_str().unwrap(),
        "--model",
        other.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not the model this federation trained on")
            && err.matches("sha256:").count() >= 2,
        "{err}"
    );
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

#[test]
fn coordinator_and_clients_as_processes_federate_a_real_llm_with_chat_data() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    stdout_ok(&fedlora(&[
        "certs",
        "init",
        "--out",
        certs.to_str().unwrap(),
        "--clients",
        "2",
    ]));
    let port = crate::common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let m = fixtures().join("llama");
    let model = ["--model", m.to_str().unwrap(), "--targets", "q_proj,v_proj"];
    let mut coord = Command::new(BIN)
        .args(["coordinator", "--listen", &addr, "--rounds", "1"])
        .args(["--clients-per-round", "2", "--min-clients", "2"])
        .arg("--data-dir")
        .arg(dir.path().join("state"))
        .arg("--certs")
        .arg(&certs)
        .args(model)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // client 0 on chat data, client 1 on a speaking role's text
    let chat = dir.path().join("chat.jsonl");
    let lines: Vec<String> = (0..12)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("What is {i} plus {i}?")},
                {"role": "assistant", "content": format!("{i} plus {i} is {}.", 2 * i)}
            ]})
            .to_string()
        })
        .collect();
    std::fs::write(&chat, lines.join("\n")).unwrap();
    let client = |i: usize, data: Option<&Path>| {
        let mut c = Command::new(BIN);
        c.args([
            "client",
            "--coordinator",
            &addr,
            "--client-index",
            &i.to_string(),
        ])
        .arg("--certs")
        .arg(&certs)
        .arg("--state-dir")
        .arg(dir.path().join(format!("c{i}")))
        .args(model)
        .args(["--context", "160"]);
        if let Some(d) = data {
            c.arg("--data").arg(d);
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut procs = vec![client(0, Some(&chat)), client(1, None)];
    // a client that fails leaves the others waiting for the round: end everything on the
    // first failure or after 5 minutes
    let t0 = std::time::Instant::now();
    loop {
        let states: Vec<Option<std::process::ExitStatus>> =
            procs.iter_mut().map(|p| p.try_wait().unwrap()).collect();
        let failed = states.iter().any(|s| s.is_some_and(|s| !s.success()));
        if states.iter().all(Option::is_some) {
            break;
        }
        if failed || t0.elapsed() > std::time::Duration::from_secs(300) {
            for p in procs.iter_mut() {
                let _ = p.kill();
            }
            let _ = coord.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let outs: Vec<Output> = procs
        .into_iter()
        .map(|p| p.wait_with_output().unwrap())
        .collect();
    let (a, b) = (&outs[0], &outs[1]);
    if !(a.status.success() && b.status.success()) {
        let _ = coord.kill();
    }
    let status = coord.wait().unwrap();
    for out in [a, b] {
        let text = stdout_ok(out);
        assert!(text.contains("uploaded in rounds [1]"), "{text}");
    }
    assert!(
        status.success(),
        "the coordinator ends after its last round"
    );
}
