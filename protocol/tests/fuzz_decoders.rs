//! Seeded fuzzing of every decoder of bytes that come from the network: frames (client and
//! coordinator messages, with their range checks), every update codec, the bit-packed masked
//! inputs, and Shamir shares. An input passes when the decoder returns a value or a typed error;
//! a panic fails the test with the case number and seed, so it can be replayed.
//!
//! `FEDLORA_FUZZ_CASES` sets the number of inputs per decoder family (default 20,000, what CI
//! runs; run `FEDLORA_FUZZ_CASES=100000` by hand for the full count: no script does),
//! `FEDLORA_FUZZ_SEED` the seed.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use fedlora_protocol::codec::bits;
use fedlora_protocol::frame;
use fedlora_protocol::secagg::{
    crypto, AdvertisedKeys, EncryptedShare, SecAggParams, UnmaskResponse,
};
use fedlora_protocol::{
    AdapterSpec, ClientMsg, Codec, CodecContext, CoordMsg, DeclineReason, EvalReport,
    ModularParams, PrivateUpload, Refusal, RefusalCode, RoundOffer, SecAggBody, SecAggTask, Task,
    TensorSpec, TrainConfig, Upload, PROTOCOL_VERSION,
};
use rand::rngs::ChaCha20Rng;
use rand::{RngExt, SeedableRng};

fn cases() -> usize {
    std::env::var("FEDLORA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn seed() -> u64 {
    std::env::var("FEDLORA_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5EED_F022)
}

fn spec() -> AdapterSpec {
    AdapterSpec::new(vec![
        TensorSpec {
            name: "a".into(),
            shape: vec![4, 16],
        },
        TensorSpec {
            name: "b".into(),
            shape: vec![16, 4],
        },
    ])
    .unwrap()
}

fn keys(i: u8) -> AdvertisedKeys {
    AdvertisedKeys {
        client: format!("client-{i}"),
        c_pk: [i; 32],
        s_pk: [i + 1; 32],
        nonce: [i + 2; 32],
        seed_commitment: [i + 3; 32],
        signature: vec![i; 70],
    }
}

fn share(i: u8) -> EncryptedShare {
    EncryptedShare {
        from: format!("client-{i}"),
        to: format!("client-{}", i + 1),
        ciphertext: vec![i; 120],
    }
}

/// A survivor view as it travels, over a roster of 4 (client-0 … client-3): client-1 and
/// client-2 survived, client-3 dropped.
fn view_bits() -> fedlora_protocol::secagg::ViewBits {
    fedlora_protocol::secagg::ViewBits {
        n: 4,
        survivors: vec![0b0110],
        dropped: vec![0b1000],
    }
}

/// One valid frame of every client message kind.
fn client_seeds() -> Vec<Vec<u8>> {
    let msgs = vec![
        ClientMsg::Hello {
            protocol_version: PROTOCOL_VERSION,
            spec_hash: [3; 32],
            max_rank: None,
        },
        ClientMsg::Poll {
            held_version: Some(4),
        },
        ClientMsg::Upload(Upload {
            round: 2,
            spec_hash: [1; 32],
            weight: 3.0,
            train_loss: 1.25,
            payload: vec![7; 40],
        }),
        ClientMsg::PrivateUpload(PrivateUpload {
            round: 2,
            spec_hash: [1; 32],
            payload: vec![8; 40],
            noised_train_loss: Some(-0.25),
        }),
        ClientMsg::EvalReport(EvalReport {
            version: 1,
            loss: 2.5,
            tokens: 100,
        }),
        ClientMsg::EvalWithheld { version: 1 },
        ClientMsg::Renew {
            csr_der: vec![7; 200],
        },
        ClientMsg::FetchGlobal {
            version: 3,
            offset: 100,
            max_len: 4096,
        },
        ClientMsg::Decline {
            round: 5,
            reason: DeclineReason::Budget,
        },
        ClientMsg::SecAgg {
            round: 5,
            body: SecAggBody::Keys(keys(1)),
        },
        ClientMsg::SecAgg {
            round: 5,
            body: SecAggBody::Shares(vec![share(1), share(2)]),
        },
        ClientMsg::SecAgg {
            round: 5,
            body: SecAggBody::Input {
                packed: vec![9; 33],
                statement: fedlora_protocol::secagg::MaskStatement {
                    masked_with: vec!["client-2".into(), "client-3".into()],
                    min_survivors: 4,
                    signature: vec![3; 64],
                },
            },
        },
        ClientMsg::SecAgg {
            round: 5,
            body: SecAggBody::Consistency(vec![4; 71]),
        },
        ClientMsg::SecAgg {
            round: 5,
            body: SecAggBody::Unmask(UnmaskResponse {
                client: "client-1".into(),
                seed_shares: BTreeMap::from([("client-2".to_string(), vec![1; 33])]),
                key_shares: BTreeMap::from([("client-3".to_string(), vec![2; 33])]),
            }),
        },
    ];
    msgs.iter().map(|m| frame::encode(m).unwrap()).collect()
}

/// One valid frame of every coordinator message kind.
fn coord_seeds() -> Vec<Vec<u8>> {
    let params = SecAggParams {
        threshold: 2,
        neighbours: 3,
        modulus_bits: 12,
        collusion: 0,
        stage_timeout_ms: 100,
    };
    let msgs = vec![
        CoordMsg::Welcome {
            client_id: "client-1".into(),
            protocol_version: PROTOCOL_VERSION,
        },
        CoordMsg::Task(Task::Wait { retry_after_ms: 10 }),
        CoordMsg::Task(Task::Train(RoundOffer {
            round: 1,
            global_version: 0,
            spec_hash: [2; 32],
            config: TrainConfig::default(),
            evaluate: true,
            codec_seed: 9,
            global_from: Some(0),
            global: vec![1; 50],
            secure_shares: Some(vec![share(3)]),
            rank: None,
            time_left_ms: Some(60_000),
            global_digest: None,
            plan_signature: Some(fedlora_protocol::plan_signature::PlanSignature {
                signature: vec![5; 64],
            }),
        })),
        CoordMsg::Task(Task::Evaluate {
            version: 2,
            global_from: None,
            global: vec![3; 20],
            global_digest: None,
        }),
        CoordMsg::Task(Task::SecAgg {
            round: 1,
            task: Box::new(SecAggTask::AdvertiseKeys { params }),
        }),
        CoordMsg::Task(Task::SecAgg {
            round: 1,
            task: Box::new(SecAggTask::ShareKeys {
                view: fedlora_protocol::secagg::RosterView {
                    ids: vec!["client-1".into(), "client-2".into(), "client-3".into()].into(),
                    keys_root: [4; 32],
                    graph_seed: [6; 32],
                    own_proof: vec![[7; 32], [8; 32]],
                    neighbours: vec![
                        fedlora_protocol::secagg::NeighbourKeys {
                            keys: keys(1),
                            proof: vec![[1; 32], [2; 32]],
                        },
                        fedlora_protocol::secagg::NeighbourKeys {
                            keys: keys(2),
                            proof: vec![[3; 32]],
                        },
                    ],
                },
                certificates: BTreeMap::from([("client-1".to_string(), vec![5; 300])]),
            }),
        }),
        CoordMsg::Task(Task::SecAgg {
            round: 1,
            task: Box::new(SecAggTask::ConsistencyCheck(view_bits())),
        }),
        CoordMsg::Task(Task::SecAgg {
            round: 1,
            task: Box::new(SecAggTask::Unmask {
                request: view_bits(),
                signatures: BTreeMap::from([("client-2".to_string(), vec![7; 70])]),
                statements: BTreeMap::from([(
                    "client-3".to_string(),
                    fedlora_protocol::secagg::MaskStatement {
                        masked_with: vec!["client-1".into()],
                        min_survivors: 2,
                        signature: vec![6; 64],
                    },
                )]),
            }),
        }),
        CoordMsg::Task(Task::Finished { version: 3 }),
        CoordMsg::Ack {
            round: 1,
            status: fedlora_protocol::AckStatus::Accepted,
        },
        CoordMsg::EvalRecorded { version: 1 },
        CoordMsg::DeclineRecorded { round: 1 },
        CoordMsg::GlobalPiece {
            version: 3,
            offset: 100,
            bytes: vec![9; 64],
        },
        CoordMsg::Renewed(fedlora_protocol::enroll::IssuedCert {
            device_id: "device-1".into(),
            chain_pem: "-----BEGIN CERTIFICATE-----".into(),
            not_after_unix_s: 1,
        }),
        CoordMsg::Refused(Refusal::new(RefusalCode::WrongRound, "no")),
    ];
    msgs.iter().map(|m| frame::encode(m).unwrap()).collect()
}

/// Every codec the federation can be configured with, and a valid encoding by each.
fn codecs() -> Vec<Codec> {
    vec![
        Codec::DenseF32,
        Codec::F16,
        Codec::Quantized {
            bits: 8,
            block: 32,
            rotate: true,
        },
        Codec::Quantized {
            bits: 1,
            block: 16,
            rotate: false,
        },
        Codec::TopK { fraction: 0.25 },
        Codec::SharedSubset { fraction: 0.5 },
        Codec::Modular(ModularParams::default()),
    ]
}

/// A random or mutated input: pure noise, or a valid seed with flipped bytes, a truncation, an
/// extension, a spliced run, or a rewritten frame length.
fn mutate(rng: &mut ChaCha20Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let pick = rng.random_range(0..10u32);
    if pick == 0 || seeds.is_empty() {
        let n = rng.random_range(0..300usize);
        return (0..n).map(|_| rng.random()).collect();
    }
    let mut b = seeds[rng.random_range(0..seeds.len())].clone();
    let edits = rng.random_range(1..4u32);
    for _ in 0..edits {
        match rng.random_range(0..6u32) {
            0 | 1 if !b.is_empty() => {
                let i = rng.random_range(0..b.len());
                b[i] ^= 1 << rng.random_range(0..8u32);
            }
            2 if !b.is_empty() => {
                let i = rng.random_range(0..b.len());
                b[i] = rng.random();
            }
            3 => {
                let keep = rng.random_range(0..=b.len());
                b.truncate(keep);
            }
            4 => {
                let n = rng.random_range(1..40usize);
                let at = rng.random_range(0..=b.len());
                let run: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                b.splice(at..at, run);
            }
            _ if b.len() >= 8 => {
                // keep the header's claim in step with the body (or make it lie)
                let len = if rng.random_bool(0.5) {
                    (b.len() - 8) as u32
                } else {
                    rng.random()
                };
                b[4..8].copy_from_slice(&len.to_be_bytes());
            }
            _ => {}
        }
    }
    b
}

/// Runs `check` on `cases()` inputs from `gen`; a panic fails with the case to replay.
/// `check` says whether the input decoded to a value; some must and some must not, so the
/// inputs reach past the first check of each decoder.
fn fuzz(
    name: &str,
    salt: u64,
    mut gen: impl FnMut(&mut ChaCha20Rng) -> Vec<u8>,
    check: impl Fn(&[u8]) -> bool,
) {
    let s = seed() ^ salt;
    let mut rng = ChaCha20Rng::seed_from_u64(s);
    let mut decoded = 0usize;
    for case in 0..cases() {
        let input = gen(&mut rng);
        match catch_unwind(AssertUnwindSafe(|| check(&input))) {
            Ok(ok) => decoded += usize::from(ok),
            Err(_) => panic!(
                "{name}: decoder panicked on case {case} (FEDLORA_FUZZ_SEED={}), input {}",
                seed(),
                hex(&input)
            ),
        }
    }
    assert!(
        decoded > 0 && decoded < cases(),
        "{name}: {decoded} of {} inputs decoded; the mutations do not exercise the decoder",
        cases()
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn client_frames_decode_or_fail_typed() {
    let seeds = client_seeds();
    fuzz(
        "client frames",
        1,
        |r| mutate(r, &seeds),
        |b| frame::decode::<ClientMsg>(b).is_ok(),
    );
}

#[test]
fn coordinator_frames_decode_or_fail_typed() {
    let seeds = coord_seeds();
    fuzz(
        "coordinator frames",
        2,
        |r| mutate(r, &seeds),
        |b| frame::decode::<CoordMsg>(b).is_ok(),
    );
}

#[test]
fn every_codec_decodes_or_fails_typed() {
    let spec = spec();
    let ctx = CodecContext { round_seed: 3 };
    let mut rng = ChaCha20Rng::seed_from_u64(seed());
    let values: Vec<f32> = (0..spec.numel())
        .map(|_| rng.random::<f32>() - 0.5)
        .collect();
    let seeds: Vec<Vec<u8>> = codecs()
        .iter()
        .map(|c| c.encode_with(&values, &ctx, 1, &mut rng).0)
        .collect();
    let all = codecs();
    fuzz(
        "codecs",
        3,
        |r| mutate(r, &seeds),
        |b| {
            let any = Codec::decode(b, &spec, None, &ctx).is_ok();
            for c in &all {
                if let Ok(a) = Codec::decode(b, &spec, Some(c), &ctx) {
                    assert!(a.values().iter().all(|v| v.is_finite()));
                }
                let _ = c.modular_payload(b, &spec);
            }
            any
        },
    );
}

#[test]
fn masked_inputs_and_shares_decode_or_fail_typed() {
    let mut rng = ChaCha20Rng::seed_from_u64(seed());
    let packed: Vec<Vec<u8>> = [5u32, 12, 33]
        .iter()
        .map(|&w| {
            let mut out = Vec::new();
            let mask = (1u64 << w) - 1;
            bits::pack((0..40).map(|_| rng.random::<u64>() & mask), w, &mut out);
            out
        })
        .collect();
    let shares: Vec<Vec<u8>> = crypto::shamir_split(&[7u8; 32], 2, 3, &mut rng);
    let mut seeds = packed;
    seeds.extend(shares.iter().cloned());
    fuzz(
        "masked inputs and shares",
        4,
        |r| mutate(r, &seeds),
        |b| {
            let mut any = false;
            for w in [1u32, 5, 12, 33, 62] {
                any |= bits::unpack(b, 40, w).is_some();
            }
            let half = b.len() / 2;
            let _ = crypto::shamir_recover(&[&b[..half], &b[half..]], 2);
            any |= crypto::shamir_recover(&[b, &shares[0][..]], 2).is_ok();
            let _ = crypto::open(&[1; 32], "a", "b", b);
            any
        },
    );
}
