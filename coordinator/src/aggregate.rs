//! Turning a round's uploads into its aggregated delta, which the federation's strategy
//! ([`fedlora_protocol::strategy`]) then turns into the next global adapter.
//!
//! - Strategies that work from the sum, with the modular codec: the integer payloads are
//!   summed mod 2^m and only the sum is decoded (what secure masking reveals).
//! - Otherwise every upload is decoded and the strategy combines the deltas (weighted mean,
//!   coordinate-wise median, trimmed mean).
//!
//! With heterogeneous ranks each rank component is averaged over the clients whose rank covers
//! it ([`RankCounts`]). The QUIC server and the simulation harness both call these, so a
//! simulated round aggregates exactly as a deployed one.

use fedlora_protocol::client_dp::ClientDpPlan;
use fedlora_protocol::strategy::{Contribution, Strategy};
use fedlora_protocol::{AdapterSpec, Codec, CodecContext, FlatAdapter};

use crate::error::{CoordinatorError, Result};
pub use crate::running_sum::{modular_sum_delta, release_central};
use crate::running_sum::{RunningSum, SumKind};

/// One stored upload of a round.
#[derive(Clone, Copy, Debug)]
pub struct Payload<'a> {
    /// Aggregation weight.
    pub weight: f64,
    /// The rank the client trained (`None`: the federation's).
    pub rank: Option<u32>,
    /// The encoded delta (at the federation's rank).
    pub bytes: &'a [u8],
    /// The codec seed it was encoded with when that is not the round's (an async update,
    /// encoded in the round it trained in); `None`: the round's.
    pub round_seed: Option<u64>,
}

impl Payload<'_> {
    /// The codec context this payload decodes with: its own seed, else the round's.
    pub fn ctx(&self, round: &CodecContext) -> CodecContext {
        CodecContext {
            round_seed: self.round_seed.unwrap_or(round.round_seed),
        }
    }
}

/// The federation's LoRA rank (1 for a spec without LoRA factors, which has one component).
pub fn full_rank(spec: &AdapterSpec) -> usize {
    fedlora_protocol::rank::spec_rank(spec).unwrap_or(1)
}

/// The rank a client trained: its declared `rank` capped at the federation's `full` rank (`None`:
/// the full rank).
pub fn rank_of(rank: Option<u32>, full: usize) -> usize {
    rank.map_or(full, |r| (r as usize).min(full))
}

/// The round's aggregated delta from its payloads, in the order given (the coordinator passes
/// them by client id).
pub fn aggregate_payloads<'a>(
    strategy: &dyn Strategy,
    codec: &Codec,
    spec: &AdapterSpec,
    ctx: &CodecContext,
    payloads: impl IntoIterator<Item = Payload<'a>>,
) -> Result<FlatAdapter> {
    let full = full_rank(spec);
    let payloads: Vec<Payload<'a>> = payloads.into_iter().collect();
    if payloads.is_empty() {
        return Err(CoordinatorError::Storage("no uploads".into()));
    }
    if let Some(kind) = SumKind::of(codec, None, strategy.needs_individual_updates()) {
        // the strategies that need only the sum fold the uploads one at a time, with the code
        // that folds them as they are accepted by a running coordinator
        let mut sum = RunningSum::new(0, kind.clone());
        for (i, u) in payloads.iter().enumerate() {
            let decoded = Codec::decode(u.bytes, spec, Some(codec), &u.ctx(ctx))?;
            let a = kind.addend(
                codec,
                spec,
                u.bytes,
                decoded,
                u.weight,
                rank_of(u.rank, full),
            )?;
            sum.add(&i.to_string(), &a)?;
        }
        return sum.finish(codec, spec, ctx, full, None);
    }
    let mut deltas = Vec::with_capacity(payloads.len());
    for u in &payloads {
        deltas.push(Codec::decode(u.bytes, spec, Some(codec), &u.ctx(ctx))?);
    }
    let ups: Vec<Contribution<'_>> = payloads
        .iter()
        .zip(&deltas)
        .map(|(u, d)| Contribution {
            weight: u.weight,
            rank: rank_of(u.rank, full),
            delta: d,
        })
        .collect();
    Ok(strategy.combine(full, &ups)?)
}

/// Client-level DP in central mode: every upload decoded and clipped again to the plan's S
/// (the coordinator enforces the sensitivity whatever a client sent), summed, N(0, σ²S²) added
/// to every coordinate of the sum, and the noisy sum divided by the plan's **expected** clients
/// per round (not by the number that arrived). `noise` must have standard deviation σ·S and
/// come from the OS CSPRNG in deployments.
pub fn central_dp_delta<'a>(
    plan: &ClientDpPlan,
    codec: &Codec,
    spec: &AdapterSpec,
    ctx: &CodecContext,
    payloads: impl IntoIterator<Item = Payload<'a>>,
    noise: &mut fedlora_dp::GaussianNoise,
) -> Result<FlatAdapter> {
    let kind = SumKind::CentralDp(plan.clone());
    let mut sum = RunningSum::new(0, kind.clone());
    for (i, u) in payloads.into_iter().enumerate() {
        let decoded = Codec::decode(u.bytes, spec, Some(codec), ctx)?;
        let a = kind.addend(codec, spec, u.bytes, decoded, 1.0, 1)?;
        sum.add(&i.to_string(), &a)?;
    }
    sum.finish(codec, spec, ctx, 1, Some(noise))
}

/// The L2 norm of a plaintext upload (`bytes`, already decoded by the caller as `delta`), and
/// whether it is within `bound·(1 + τ)` (τ = [`Codec::norm_tolerance`]). A modular upload must
/// also carry weight 1 (norm bounds need uniform weighting).
pub fn check_update_norm(
    codec: &Codec,
    spec: &AdapterSpec,
    bytes: &[u8],
    delta: &FlatAdapter,
    bound: f64,
) -> std::result::Result<f64, String> {
    if let Codec::Modular(p) = codec {
        let ints = codec
            .modular_payload(bytes, spec)
            .map_err(|e| e.to_string())?;
        let (_, w) = p.from_ints(&ints);
        if w != 1.0 {
            return Err(format!(
                "a norm-bounded modular upload carries weight 1, not {w}"
            ));
        }
    }
    let norm = delta
        .values()
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    let tau = codec
        .norm_tolerance(spec.numel(), bound)
        .ok_or_else(|| format!("codec {} has no stated norm error bound", codec.name()))?;
    if norm > bound * (1.0 + tau) {
        return Err(format!(
            "update norm {norm:.6} exceeds the bound {bound} × (1 + {tau:.2e})"
        ));
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlora_protocol::codec::SkellamParams;
    use fedlora_protocol::rank::RankCounts;
    use fedlora_protocol::ModularSum;
    use fedlora_protocol::TensorSpec;
    use rand::SeedableRng;

    /// A rank-2 adapter: one `A` `[2, 4]` and one `B` `[4, 2]`.
    fn lora_spec() -> AdapterSpec {
        AdapterSpec::new(vec![
            TensorSpec {
                name: "l.lora_a".into(),
                shape: vec![2, 4],
            },
            TensorSpec {
                name: "l.lora_b".into(),
                shape: vec![4, 2],
            },
        ])
        .unwrap()
    }

    /// Async updates of one buffer were encoded in different rounds: each decodes with its own
    /// round's codec seed (a shared-subset codec keeps a different subset per seed), and the
    /// buffer's mean is the weighted mean of those decodings.
    #[test]
    fn each_payload_decodes_with_its_own_round_seed() {
        let spec = lora_spec();
        let codec = Codec::from_name("subset:0.5").unwrap();
        let seed = |round| fedlora_protocol::codec_seed(42, round);
        let enc = |values: Vec<f32>, round: u64| {
            let ctx = CodecContext {
                round_seed: seed(round),
            };
            let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(round);
            codec.encode_with(&values, &ctx, 1, &mut rng).0
        };
        let dec = |bytes: &[u8], round: u64| {
            let ctx = CodecContext {
                round_seed: seed(round),
            };
            Codec::decode(bytes, &spec, Some(&codec), &ctx).unwrap()
        };
        let (a, b) = (
            enc((1..=16).map(|i| i as f32 * 0.1).collect(), 1),
            enc((1..=16).map(|i| -(i as f32) * 0.05).collect(), 2),
        );
        let strategy = fedlora_protocol::strategy::StrategyConfig::default().build();
        let buffer = CodecContext {
            round_seed: seed(2),
        };
        let run = |own: bool| {
            aggregate_payloads(
                strategy.as_ref(),
                &codec,
                &spec,
                &buffer,
                [(&a, 1u64, 0.5), (&b, 2, 1.0)].map(|(bytes, round, weight)| Payload {
                    weight,
                    rank: None,
                    bytes,
                    round_seed: own.then(|| seed(round)),
                }),
            )
            .unwrap()
        };
        let (da, db) = (dec(&a, 1), dec(&b, 2));
        let want: Vec<f32> = da
            .values()
            .iter()
            .zip(db.values())
            .map(|(x, y)| ((0.5 * f64::from(*x) + f64::from(*y)) / 1.5) as f32)
            .collect();
        assert_eq!(run(true).values(), &want[..]);
        // decoded with the buffer's seed instead, the older update lands on other coordinates
        assert_ne!(run(false).values(), &want[..]);
    }

    #[test]
    fn a_distributed_dp_sum_is_divided_by_the_public_expected_count_whatever_the_ranks() {
        let spec = lora_spec();
        let p = SkellamParams {
            bits: 20,
            clip: 1.0,
            scale: 1000.0,
            l2_bound: fedlora_dp::skellam::rounded_l2_bound(1000.0, 16, (-0.5f64).exp()),
            share: 0.0,
            expected_clients: 5.0,
        };
        let codec = Codec::Skellam(p.clone());
        let ctx = CodecContext { round_seed: 3 };
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(1);
        let mut sum = ModularSum::new(SkellamParams::dim(spec.numel()), 20);
        for c in 0..3 {
            let v: Vec<f32> = (0..spec.numel())
                .map(|i| ((i + c) as f32 * 0.3).sin() * 0.05)
                .collect();
            sum.add(&p.to_ints(&v, 3, &mut rng).unwrap().0).unwrap();
        }
        let (total, _) = codec.decode_modular_sum(&sum, &spec, &ctx).unwrap();
        // one client at full rank, two at rank 1: observed per-component counts 3 and 1
        let counts = RankCounts::new(2, [(1.0, 2), (1.0, 1), (1.0, 1)]);
        assert!(!counts.is_uniform());
        let mean = modular_sum_delta(&codec, &spec, &ctx, &sum, &counts).unwrap();
        for (m, t) in mean.values().iter().zip(total.values()) {
            assert_eq!(*m, (f64::from(*t) / 5.0) as f32);
        }
    }
}
