//! The client SDK end to end: three clients train real LoRA adapters with burn on their own
//! speaking roles and federate over QUIC + mTLS for two rounds.

use std::time::Duration;

use burn::tensor::Device;
use fedlora_client::sdk::{ClientConfig, ClientReport, FederatedClient};
use fedlora_client::transport::ClientTls;
use fedlora_client::ClientError;
use fedlora_coordinator::certs::{default_server_names, init_certs};
use fedlora_coordinator::store::RoundStatus;
use fedlora_coordinator::{Coordinator, CoordinatorConfig};
use fedlora_protocol::FederationConfig;
use fedlora_train::adapter::{collect_named, NamedFilter};
use fedlora_train::data::ClientData;
use fedlora_train::lora::LoraConfig;
use fedlora_train::model::LmConfig;
use fedlora_train::train::{initial_adapter, LocalTrainer};

fn tiny(lora: Option<LoraConfig>) -> LmConfig {
    LmConfig::new()
        .with_d_model(32)
        .with_n_layers(1)
        .with_n_heads(2)
        .with_d_ff(64)
        .with_context(16)
        .with_lora(lora)
}

/// Certificates, a tiny model with a random base, and the trainer every client shares.
struct Fixture {
    dir: tempfile::TempDir,
    certs: std::path::PathBuf,
    cfg_lm: LmConfig,
    trainer: LocalTrainer,
}

use crate::common;

/// `rounds` rounds of `k` clients (at least `min` uploads), `steps` local steps each, with
/// generous deadlines.
fn federation(rounds: u64, k: usize, min: usize, steps: u32) -> FederationConfig {
    common::federation(rounds, k, min, steps, 120)
}

impl Fixture {
    fn new(clients: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let certs = init_certs(&dir.path().join("certs"), clients, &default_server_names())
            .unwrap()
            .0;
        let cfg_lm = tiny(Some(LoraConfig::new().with_rank(4)));
        let device = Device::flex().autodiff();
        let base = collect_named(&tiny(None).init(&device), NamedFilter::All);
        let trainer = LocalTrainer::new(cfg_lm.clone(), &base, device).unwrap();
        Self {
            dir,
            certs,
            cfg_lm,
            trainer,
        }
    }

    /// Starts a coordinator on an ephemeral loopback port running `federation`.
    async fn coordinator(&self, federation: FederationConfig) -> Coordinator {
        let mut cfg = CoordinatorConfig::new(self.dir.path().join("state"), &self.certs);
        cfg.listen = "127.0.0.1:0".parse().unwrap();
        cfg.federation = federation;
        Coordinator::start(cfg, initial_adapter(&self.cfg_lm).unwrap())
            .await
            .unwrap()
    }

    /// Runs clients 0..n (demo data, seeded sampling), each configured further by `tweak`.
    fn clients(
        &self,
        coord: &Coordinator,
        n: usize,
        tweak: impl Fn(usize, &mut ClientConfig),
    ) -> Vec<tokio::task::JoinHandle<Result<ClientReport, ClientError>>> {
        self.gated_clients(coord, n, tweak, |_| None)
    }

    /// [`Fixture::clients`], each with the eligibility check `gate` gives it (if any).
    fn gated_clients(
        &self,
        coord: &Coordinator,
        n: usize,
        tweak: impl Fn(usize, &mut ClientConfig),
        gate: impl Fn(usize) -> Option<fedlora_client::eligibility::SharedEligibility>,
    ) -> Vec<tokio::task::JoinHandle<Result<ClientReport, ClientError>>> {
        let addr = coord.local_addr().unwrap();
        (0..n)
            .map(|i| {
                let mut cc = ClientConfig::new(addr, ClientTls::from_dir(&self.certs, i));
                cc.sampling_seed = Some(i as u64);
                cc.state_dir = Some(self.dir.path().join(format!("client-{i}")));
                tweak(i, &mut cc);
                let data = ClientData::demo_client(i, 16).unwrap();
                let mut client = FederatedClient::new(cc, self.trainer.clone(), data).unwrap();
                if let Some(g) = gate(i) {
                    client = client.with_eligibility(g);
                }
                tokio::spawn(async move { client.run().await })
            })
            .collect()
    }
}

async fn reports(
    hs: Vec<tokio::task::JoinHandle<Result<ClientReport, ClientError>>>,
) -> Vec<ClientReport> {
    let mut out = Vec::new();
    for h in hs {
        out.push(h.await.unwrap().unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_train_two_rounds_over_quic() {
    let fx = Fixture::new(3);
    let mut fed = federation(2, 3, 3, 5);
    fed.train.batch_size = 8;
    fed.train.learning_rate = 1e-2;
    let coord = fx.coordinator(fed).await;
    let handles = fx.clients(&coord, 3, |_, _| {});
    let ok = tokio::time::timeout(
        Duration::from_secs(120),
        coord.wait_finished(Duration::from_millis(300)),
    )
    .await
    .expect("federation finishes");
    assert!(ok);
    for r in reports(handles).await {
        assert_eq!(r.rounds.len(), 2, "{r:?}");
        assert_eq!(r.final_version, Some(2));
        assert!(r.bytes_up > 0 && r.bytes_down > 0);
        // evaluated the base (v0), v1 (at round 2's offer) and the final version v2
        let versions: Vec<u64> = r.evals.iter().map(|e| e.0).collect();
        assert_eq!(versions, vec![0, 1, 2]);
    }
    let report = coord.report().unwrap();
    assert!(report
        .rounds
        .iter()
        .all(|r| matches!(r.record.status, RoundStatus::Committed { .. })));
    assert_eq!(report.evals.len(), 3);
    assert!(report.evals.iter().all(|e| e.reports == 3));
    coord.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_clients_send_only_what_their_accountant_covers_and_a_client_without_a_target_declines()
{
    use fedlora_client::privacy::PrivacyTarget;
    use fedlora_protocol::{DpPlan, Weighting};
    let fx = Fixture::new(3);
    let mut fed = federation(2, 3, 2, 4);
    fed.train.batch_size = 8;
    fed.train.weighting = Weighting::Uniform;
    fed.train.dp = Some(DpPlan {
        clip_norm: 1.0,
        planned_rounds: 2,
    });
    let coord = fx.coordinator(fed).await;
    let handles = fx.clients(&coord, 3, |i, cc| {
        cc.noise_seed = Some(100 + i as u64);
        if i < 2 {
            cc.privacy = Some(PrivacyTarget {
                epsilon: 8.0,
                delta: 1e-5,
                accountant: Default::default(),
                loss_clip: None,
            });
        }
    });
    let ok = tokio::time::timeout(
        Duration::from_secs(120),
        coord.wait_finished(Duration::from_millis(300)),
    )
    .await
    .expect("federation finishes");
    assert!(ok);
    for (i, r) in reports(handles).await.iter().enumerate() {
        if i < 2 {
            assert_eq!(r.rounds.len(), 2, "{r:?}");
            // ε is the device's own record (its ledger), never sent
            let eps = r.eps_spent.unwrap();
            assert!(eps > 0.0 && eps <= 8.0, "{eps}");
            assert!(r.evals.is_empty(), "a private client reports no evaluation");
        } else {
            assert!(r.rounds.is_empty());
            assert_eq!(r.declined.len(), 2, "{r:?}");
            assert!(r
                .declined
                .iter()
                .all(|(_, why)| *why == fedlora_protocol::DeclineReason::NoPrivacyTarget));
        }
    }
    let report = coord.report().unwrap();
    for round in &report.rounds {
        assert_eq!(round.record.participants.len(), 2);
        assert_eq!(
            round.record.train_loss, None,
            "no training loss leaves a DP client"
        );
    }
    // only the client without a target reported held-out losses (and token counts)
    assert!(!report.evals.is_empty());
    assert!(
        report.evals.iter().all(|e| e.reports == 1),
        "{:?}",
        report.evals
    );
    coord.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_decline_when_ineligible_and_stop_training_at_their_time_cap() {
    use fedlora_client::eligibility::{Ineligible, SharedEligibility};
    use fedlora_client::privacy::PrivacyTarget;
    use fedlora_client::sdk::EarlyStop;
    use fedlora_protocol::{DeclineReason, DpPlan, Weighting};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    // ~2 ms a step here: 1,000 steps take seconds, far past the capped device's 150 ms, which
    // leaves room for a loaded machine to start training late (the cap counts from the offer)
    const STEPS: u32 = 1000;
    let fx = Fixture::new(4);
    let mut fed = federation(2, 4, 2, STEPS);
    fed.train.batch_size = 4;
    fed.train.weighting = Weighting::Uniform;
    fed.train.dp = Some(DpPlan {
        clip_norm: 1.0,
        planned_rounds: 2,
    });
    let coord = fx.coordinator(fed).await;
    // 0: plain; 1: always on battery; 2: at most 150 ms of training per round (uploads what it
    // has); 3: unplugged after two steps of round 1 (declines; the spend stands), then never
    // eligible again
    let checks = Arc::new(AtomicU32::new(0));
    let handles = fx.gated_clients(
        &coord,
        4,
        |i, cc| {
            cc.noise_seed = Some(100 + i as u64);
            cc.privacy = Some(PrivacyTarget {
                epsilon: 8.0,
                delta: 1e-5,
                accountant: Default::default(),
                loss_clip: None,
            });
            if i == 2 {
                cc.limits.max_train_secs = Some(0.15);
            }
            if i == 3 {
                cc.limits.early_stop = EarlyStop::Decline;
            }
        },
        |i| -> Option<SharedEligibility> {
            match i {
                1 => Some(Arc::new(|| Err(Ineligible::OnBattery))),
                3 => {
                    let c = checks.clone();
                    Some(Arc::new(move || {
                        // the check before the round, then one per step
                        if c.fetch_add(1, Ordering::SeqCst) < 3 {
                            Ok(())
                        } else {
                            Err(Ineligible::OnBattery)
                        }
                    }))
                }
                _ => None,
            }
        },
    );
    let ok = tokio::time::timeout(
        Duration::from_secs(180),
        coord.wait_finished(Duration::from_millis(300)),
    )
    .await
    .expect("federation finishes");
    let r = reports(handles).await;
    assert!(ok, "the federation failed; the clients saw: {r:#?}");
    let on_battery = |rep: &ClientReport| {
        rep.declined.len() == 2
            && rep
                .declined
                .iter()
                .all(|(_, why)| *why == DeclineReason::DeviceOnBattery)
    };
    assert_eq!(r[0].rounds.len(), 2, "{:?}", r[0]);
    // declined before training: no privacy budget spent
    assert!(r[1].rounds.is_empty() && on_battery(&r[1]), "{:?}", r[1]);
    assert_eq!(r[1].eps_spent.unwrap_or(0.0), 0.0);
    // the capped device uploaded both rounds, each with fewer steps than planned
    assert_eq!(r[2].rounds.len(), 2, "{:?}", r[2]);
    assert_eq!(r[2].partial.len(), 2, "{:?}", r[2]);
    assert!(r[2]
        .partial
        .iter()
        .all(|(_, steps)| (1..STEPS).contains(steps)));
    // unplugged mid-training: declined, and round 1's spend stands
    assert!(r[3].rounds.is_empty() && on_battery(&r[3]), "{:?}", r[3]);
    assert!(r[3].eps_spent.unwrap() > 0.0, "{:?}", r[3]);
    // the coordinator's round records carry the reasons, and no decliner is a straggler
    let report = coord.report().unwrap();
    assert_eq!(report.rounds.len(), 2);
    for round in &report.rounds {
        let rec = &round.record;
        assert_eq!(
            rec.participants,
            vec![r[0].client_id.clone(), r[2].client_id.clone()]
        );
        assert_eq!(
            rec.declined,
            [
                (r[1].client_id.clone(), DeclineReason::DeviceOnBattery),
                (r[3].client_id.clone(), DeclineReason::DeviceOnBattery)
            ]
            .into()
        );
        assert!(rec.stragglers.is_empty(), "{rec:?}");
    }
    coord.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f16_delta_downlink_halves_bytes_down_after_the_first_round() {
    use fedlora_protocol::Downlink;
    let fx = Fixture::new(2);
    let mut fed = federation(3, 2, 2, 3);
    fed.train.batch_size = 8;
    fed.train.downlink = Downlink::F16Delta;
    let coord = fx.coordinator(fed).await;
    let handles = fx.clients(&coord, 2, |_, cc| cc.state_dir = None);
    assert!(coord.wait_finished(Duration::from_millis(300)).await);
    for r in reports(handles).await {
        assert_eq!(r.rounds.len(), 3, "{r:?}");
        assert_eq!(
            r.evals.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
    }
    let report = coord.report().unwrap();
    let down: Vec<u64> = report
        .rounds
        .iter()
        .map(|r| r.record.bytes_down.values().sum())
        .collect();
    let n = fx.trainer.spec().numel() as u64;
    // round 1: full dense f32 (4 bytes a value); later rounds: f16 deltas (2 bytes a value)
    assert!(down[0] >= 2 * 4 * n, "{down:?}");
    for d in &down[1..] {
        assert!(*d < 2 * 2 * n + 2 * 1024, "{down:?}");
    }
    coord.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_clients_complete_secure_rounds_with_the_consistency_check() {
    use fedlora_protocol::secagg::SecAggParams;
    use fedlora_protocol::{Codec, ModularParams, Weighting};
    let fx = Fixture::new(4);
    let mut fed = federation(2, 4, 4, 3);
    fed.train.batch_size = 8;
    let mp = ModularParams {
        value_bits: 8,
        clamp: 0.25,
        fraction: 0.25,
        max_weight: 4,
    };
    fed.train.codec = Codec::Modular(mp.clone());
    fed.train.weighting = Weighting::Uniform;
    fed.train.secure = Some(SecAggParams {
        threshold: 2,
        neighbours: 0,
        modulus_bits: mp.modulus_bits(),
        collusion: 0,
        stage_timeout_ms: 30_000,
    });
    let coord = fx.coordinator(fed).await;
    let handles = fx.clients(&coord, 4, |_, cc| {
        cc.secagg.required = true;
    });
    let ok = tokio::time::timeout(
        Duration::from_secs(120),
        coord.wait_finished(Duration::from_millis(300)),
    )
    .await
    .expect("federation finishes");
    assert!(ok);
    for r in reports(handles).await {
        assert_eq!(r.rounds.len(), 2, "{r:?}");
        assert!(r.declined.is_empty(), "{r:?}");
    }
    let report = coord.report().unwrap();
    assert_eq!(report.global_version, 2);
    for round in &report.rounds {
        assert_eq!(round.record.participants.len(), 4);
        assert_eq!(round.record.train_loss, None, "masked inputs carry no loss");
    }
    coord.shutdown().await;
}

/// Client-level DP over QUIC with SDK clients: every client checks the coordinator's plan
/// against its own policy; a client whose minimums the plan does not meet declines with the
/// fixed reason, the others add their noise (distributed) or clip and send no loss (central),
/// record the round before anything leaves, and their privacy statement reads it back.
async fn client_level_round(mode: fedlora_protocol::client_dp::ClientDpMode) {
    use fedlora_coordinator::privacy_plan::{apply, ClientDpRequest};
    use fedlora_protocol::client_dp::{ClientDpMode, ClientDpPolicy};
    use fedlora_protocol::DeclineReason;
    // five clients, four of which accept: with c = 1 and the complete graph (k = 4) the
    // planner's threshold is t = 3 (2t > k + c), so the round tolerates the one that refuses
    let fx = Fixture::new(5);
    let mut fed = federation(1, 5, 4, 2);
    fed.train.batch_size = 8;
    let mut req = ClientDpRequest::new(mode, 0.5, 8.0, 5);
    req.collusion = 1;
    req.bits = 20;
    let numel = initial_adapter(&fx.cfg_lm).unwrap().spec().numel();
    apply(&req, &mut fed, numel, true).unwrap();
    let coord = fx.coordinator(fed).await;
    let handles = fx.clients(&coord, 5, |i, cc| {
        // distributed mode: client 3 runs without a policy (it admits any consistent
        // distributed plan) and, having been offered one, still reports no evaluation
        if i == 3 && mode == ClientDpMode::Distributed {
            cc.client_dp = None;
            return;
        }
        cc.client_dp = Some(if i < 4 {
            ClientDpPolicy {
                max_epsilon: 1e6,
                trust_coordinator: mode == ClientDpMode::Central,
                ..ClientDpPolicy::default()
            }
        } else {
            // distributed: ε (b) of one round at q = 1 is far above 1; central: no trust
            ClientDpPolicy {
                max_epsilon: 1.0,
                ..ClientDpPolicy::default()
            }
        });
    });
    let ok = tokio::time::timeout(
        Duration::from_secs(120),
        coord.wait_finished(Duration::from_millis(300)),
    )
    .await
    .expect("federation finishes");
    assert!(ok);
    let reports = reports(handles).await;
    let server_der = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_file(fx.certs.join("server.pem")).unwrap()
    };
    for (i, r) in reports.iter().enumerate() {
        // a held-out loss or token count is covered by no accountant: never sent
        assert!(
            r.evals.is_empty(),
            "client {i} reported an evaluation: {r:?}"
        );
        let rec = fedlora_client::client_dp::ClientDpRecord::load(Some(
            &fx.dir.path().join(format!("client-{i}")),
        ))
        .unwrap();
        if i < 4 {
            assert_eq!(r.rounds.len(), 1, "{r:?}");
            assert_eq!(rec.plans.len(), 1);
            assert_eq!(rec.plans[0].rounds, r.rounds);
            // the plan was admitted with the coordinator's signature, made with the key of the
            // certificate its TLS handshake presented, and it verifies again from the record
            let signed = rec.plans[0].signed.as_ref().expect("a signed plan");
            assert_eq!(signed.certificate, hex::encode(&server_der));
            assert_eq!(signed.verify(&rec.plans[0].plan), Ok(()));
        } else {
            assert!(r.rounds.is_empty(), "{r:?}");
            assert!(
                r.declined
                    .iter()
                    .any(|(_, why)| *why == DeclineReason::ClientDpPlanRefused),
                "{r:?}"
            );
            assert!(rec.plans.is_empty(), "a declined round is not charged");
        }
    }
    let report = coord.report().unwrap();
    assert_eq!(report.global_version, 1);
    assert!(
        report.evals.is_empty(),
        "no client-level DP client reports a held-out loss or token count: {:?}",
        report.evals
    );
    let record = &report.rounds[0].record;
    assert_eq!(record.participants.len(), 4);
    assert_eq!(
        record.train_loss, None,
        "no loss leaves a client-level DP client"
    );
    coord.shutdown().await;
    let st = fedlora_client::statement::PrivacyStatement::from_state_dir(
        &fx.dir.path().join("client-0"),
    )
    .unwrap();
    let c = st.client_level.clone().expect("a client-level section");
    assert!(c.epsilon_observers > 0.0 && c.epsilon_observers <= 8.0);
    match mode {
        ClientDpMode::Central => assert_eq!(c.epsilon_coordinator, f64::INFINITY),
        ClientDpMode::Distributed => {
            assert!(c.epsilon_coordinator.is_finite() && c.epsilon_coordinator > 1.0)
        }
    }
    assert!(st.to_markdown().contains("ε (b), against the coordinator"));
    let sig = c.plans[0]
        .coordinator_signature
        .as_ref()
        .expect("signature");
    assert!(sig.verifies);
    assert!(st.to_markdown().contains("verified (certificate SHA-256"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_level_distributed_dp_round_with_a_client_that_refuses_the_plan() {
    client_level_round(fedlora_protocol::client_dp::ClientDpMode::Distributed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_level_central_dp_round_with_a_client_that_does_not_trust_the_coordinator() {
    client_level_round(fedlora_protocol::client_dp::ClientDpMode::Central).await;
}

/// Central client-level DP in async mode with SDK clients and a participation bound that
/// binds: P = 1 for a campaign of two versions of two updates each, among five devices. Every
/// device was charged at most once (its record, written before its upload left) and counted
/// at most as often as it was charged, no buffer took more than K = 2, a device offered a
/// round past its bound declines with the plan refused, and no device reports a held-out
/// evaluation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_central_client_dp_devices_take_part_at_most_p_times() {
    use fedlora_coordinator::privacy_plan::{apply, ClientDpRequest};
    use fedlora_protocol::client_dp::{ClientDpMode, ClientDpPolicy};
    use fedlora_protocol::DeclineReason;
    let fx = Fixture::new(5);
    let mut fed = federation(2, 5, 2, 2);
    fed.mode = fedlora_protocol::Mode::Async;
    fed.buffer = 2;
    fed.train.batch_size = 8;
    let mut req = ClientDpRequest::new(ClientDpMode::Central, 0.5, 8.0, 5);
    req.participations = Some(1);
    let numel = initial_adapter(&fx.cfg_lm).unwrap().spec().numel();
    apply(&req, &mut fed, numel, true).unwrap();
    let plan = fed.train.client_dp.clone().unwrap();
    assert_eq!((plan.sampling_rate, plan.rounds), (1.0, 1));
    let coord = fx.coordinator(fed).await;
    let handles = fx.clients(&coord, 5, |_, cc| {
        cc.client_dp = Some(ClientDpPolicy {
            max_epsilon: 1e6,
            trust_coordinator: true,
            ..ClientDpPolicy::default()
        });
    });
    let ok = tokio::time::timeout(
        Duration::from_secs(120),
        coord.wait_finished(Duration::from_millis(300)),
    )
    .await
    .unwrap_or_else(|_| panic!("the campaign did not finish: {:?}", coord.report()));
    assert!(ok);
    let reports = reports(handles).await;
    let report = coord.report().unwrap();
    assert_eq!(report.global_version, 2);
    assert!(report.evals.is_empty(), "{:?}", report.evals);
    let mut counted = std::collections::BTreeMap::new();
    for round in &report.rounds {
        for c in &round.record.participants {
            *counted.entry(c.clone()).or_insert(0) += 1;
        }
    }
    assert_eq!(counted.values().sum::<usize>(), 4, "{counted:?}");
    for round in &report.rounds {
        assert!(round.record.participants.len() <= 2, "{round:?}");
    }
    for (i, r) in reports.iter().enumerate() {
        assert!(r.evals.is_empty(), "client {i}: {r:?}");
        let rec = fedlora_client::client_dp::ClientDpRecord::load(Some(
            &fx.dir.path().join(format!("client-{i}")),
        ))
        .unwrap();
        let charged: usize = rec.plans.iter().map(|p| p.rounds.len()).sum();
        let id = format!("client-{i}");
        let times = counted.get(&id).copied().unwrap_or(0);
        // charged before the upload left, whether or not a buffer still took it (one that
        // arrives after the last version is charged and not counted)
        assert!(charged <= 1, "{id} charged {charged} times past P = 1");
        assert!(times <= charged, "{id}: counted {times}, charged {charged}");
        if charged == 1 {
            // ε (a) of the one participation, at q = 1, within the plan's target
            let a = rec.observer_epsilon(rec.max_delta()).unwrap();
            assert!(a > 7.0 && a <= 8.0 + 1e-9, "{id}: {a}");
            // and the device's statement says what the async plan assumes
            let md = fedlora_client::statement::PrivacyStatement::from_state_dir(
                &fx.dir.path().join(&id),
            )
            .unwrap()
            .to_markdown();
            assert!(md.contains("P = 1 (async, one per 1 rounds)"), "{md}");
            assert!(md.contains("no sample to amplify"), "{md}");
        }
        for (_, why) in &r.declined {
            assert_eq!(*why, DeclineReason::ClientDpPlanRefused, "{id}: {r:?}");
        }
    }
}

/// A device under client-level DP (a policy of its own) offered rounds that carry no
/// client-level plan declines them: training and uploading would send its update un-noised.
/// The devices without a policy take part; the one with a policy uploads nothing. A policy
/// without a state directory is refused at configuration (its record would be forgotten at a
/// restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_level_dp_device_declines_a_round_without_a_plan() {
    use fedlora_protocol::client_dp::ClientDpPolicy;
    use fedlora_protocol::DeclineReason;
    let fx = Fixture::new(3);
    let mut fed = federation(1, 3, 2, 2);
    fed.train.batch_size = 8;
    let coord = fx.coordinator(fed).await;
    let handles = fx.clients(&coord, 3, |i, cc| {
        if i == 2 {
            cc.client_dp = Some(ClientDpPolicy {
                max_epsilon: 1e6,
                trust_coordinator: true,
                ..ClientDpPolicy::default()
            });
        }
    });
    let ok = tokio::time::timeout(
        Duration::from_secs(120),
        coord.wait_finished(Duration::from_millis(300)),
    )
    .await
    .unwrap_or_else(|_| panic!("the campaign did not finish: {:?}", coord.report()));
    assert!(ok);
    let reports = reports(handles).await;
    for r in &reports[..2] {
        assert_eq!(r.rounds.len(), 1, "{r:?}");
    }
    let r = &reports[2];
    assert!(r.rounds.is_empty(), "{r:?}");
    assert!(r.evals.is_empty(), "{r:?}");
    assert!(
        r.declined
            .iter()
            .any(|(_, why)| *why == DeclineReason::ClientDpPlanRefused),
        "{r:?}"
    );
    let report = coord.report().unwrap();
    assert_eq!(report.rounds[0].record.participants.len(), 2);
    coord.shutdown().await;
    let mut cc = ClientConfig::new(
        "127.0.0.1:1".parse().unwrap(),
        ClientTls::from_dir(&fx.certs, 0),
    );
    cc.client_dp = Some(ClientDpPolicy::default());
    cc.state_dir = None;
    let e = cc.validate().unwrap_err().to_string();
    assert!(e.contains("state directory"), "{e}");
}
