//! Federated LoRA on a real LLM architecture (the tiny Llama fixture: GQA, RoPE, SwiGLU, a real
//! BPE tokenizer) over QUIC + mTLS, with DP-SGD clients and secure aggregation: the round
//! commits, every upload is a masked input, the global adapter moves, and a client holding
//! another base model (same shapes, other weights) is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedlora_client::privacy::PrivacyTarget;
use fedlora_client::sdk::{ClientConfig, FederatedClient};
use fedlora_client::transport::ClientTls;
use fedlora_coordinator::certs::{default_server_names, init_certs};
use fedlora_coordinator::{Coordinator, CoordinatorConfig};
use fedlora_protocol::secagg::SecAggParams;
use fedlora_protocol::{Codec, DpPlan, FederationConfig, ModularParams, Weighting};
use fedlora_train::llm::data::LlmData;
use fedlora_train::llm::trainer::{LlmLearner, LlmTrainer};
use fedlora_train::lora::LoraConfig;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llm")
}

fn lora() -> LoraConfig {
    LoraConfig::new()
        .with_rank(4)
        .with_targets(vec!["q_proj".into(), "v_proj".into()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_clients_federate_a_llama_with_secure_aggregation_over_quic() {
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 4, &default_server_names())
        .unwrap()
        .0;
    // secure aggregation needs at least 3 neighbours per client (SecAggPolicy): 4 clients
    let trainer = Arc::new(LlmTrainer::load(&fixtures().join("llama"), &lora(), 7).unwrap());
    let mp = ModularParams {
        value_bits: 8,
        clamp: 0.25,
        fraction: 0.25,
        max_weight: 4,
    };
    let mut fed = FederationConfig {
        rounds: 2,
        clients_per_round: 4,
        min_clients: 4,
        round_timeout_ms: 120_000,
        eval_timeout_ms: 30_000,
        ..Default::default()
    };
    fed.train.local_steps = 2;
    fed.train.batch_size = 4;
    fed.train.learning_rate = 1e-2;
    fed.train.weighting = Weighting::Uniform;
    fed.train.codec = Codec::Modular(mp.clone());
    fed.train.dp = Some(DpPlan {
        clip_norm: 1.0,
        planned_rounds: 2,
    });
    fed.train.secure = Some(SecAggParams {
        threshold: 2,
        neighbours: 0,
        modulus_bits: mp.modulus_bits(),
        collusion: 0,
        stage_timeout_ms: 30_000,
    });
    let mut cfg = CoordinatorConfig::new(dir.path().join("state"), &certs);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.federation = fed;
    let initial = trainer.initial_adapter();
    let coord = Coordinator::start(cfg, initial.clone()).await.unwrap();
    let addr = coord.local_addr().unwrap();
    let mut handles = Vec::new();
    for i in 0..4 {
        let mut cc = ClientConfig::new(addr, ClientTls::from_dir(&certs, i));
        cc.sampling_seed = Some(i as u64);
        cc.noise_seed = Some(50 + i as u64);
        cc.state_dir = Some(dir.path().join(format!("client-{i}")));
        cc.secagg.required = true;
        cc.privacy = Some(PrivacyTarget {
            epsilon: 8.0,
            delta: 1e-5,
            accountant: Default::default(),
            loss_clip: None,
        });
        let data = LlmData::demo_client(i, &trainer.llm().tokenizer, 16).unwrap();
        let learner = Arc::new(LlmLearner {
            trainer: trainer.clone(),
            data,
        });
        let client = FederatedClient::with_learner(cc, learner).unwrap();
        handles.push(tokio::spawn(async move { client.run().await }));
    }
    let ok = tokio::time::timeout(
        Duration::from_secs(90),
        coord.wait_finished(Duration::from_millis(300)),
    )
    .await;
    if ok.is_err() {
        let report = coord.report().unwrap();
        for h in handles {
            h.abort();
        }
        panic!("federation did not finish: {report:#?}");
    }
    let ok = ok.unwrap();
    assert!(ok);
    for h in handles {
        let r = h.await.unwrap().unwrap();
        assert_eq!(r.rounds.len(), 2, "{r:?}");
        let eps = r.eps_spent.unwrap();
        assert!(eps > 0.0 && eps <= 8.0, "{eps}");
    }
    let report = coord.report().unwrap();
    assert_eq!(report.global_version, 2);
    for round in &report.rounds {
        assert_eq!(round.record.participants.len(), 4);
        assert_eq!(
            round.record.train_loss, None,
            "masked DP inputs carry no loss"
        );
    }
    let (_, global) = coord.global();
    assert_eq!(global.spec().hash(), trainer.spec().hash());
    assert_ne!(global.values(), initial.values(), "the adapter moved");
    coord.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_another_base_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 2, &default_server_names())
        .unwrap()
        .0;
    let ours = LlmTrainer::load(&fixtures().join("llama"), &lora(), 7).unwrap();
    // the GGUF copy: the same architecture and adapter shapes, quantized weights
    let theirs = Arc::new(LlmTrainer::load(&fixtures().join("llama.gguf"), &lora(), 7).unwrap());
    let mut cfg = CoordinatorConfig::new(dir.path().join("state"), &certs);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.federation = FederationConfig {
        rounds: 1,
        clients_per_round: 1,
        min_clients: 1,
        ..Default::default()
    };
    let coord = Coordinator::start(cfg, ours.initial_adapter())
        .await
        .unwrap();
    let mut cc = ClientConfig::new(coord.local_addr().unwrap(), ClientTls::from_dir(&certs, 0));
    cc.sampling_seed = Some(0);
    cc.state_dir = Some(dir.path().join("c0"));
    let data = LlmData::demo_client(0, &theirs.llm().tokenizer, 16).unwrap();
    let client = FederatedClient::with_learner(
        cc,
        Arc::new(LlmLearner {
            trainer: theirs,
            data,
        }),
    )
    .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(60), client.run())
        .await
        .expect("the client stops")
        .unwrap_err();
    assert!(
        matches!(&err, fedlora_client::ClientError::Refused(r)
            if r.code == fedlora_protocol::RefusalCode::SpecMismatch),
        "{err}"
    );
    coord.shutdown().await;
}
