//! Secure aggregation in cohorts for async runs in simulated time: the SecAgg+ session that a
//! coordinator runs among the devices holding a finished update ([`fedlora_protocol::round`]'s
//! cohorts), here in one process with the real stage machines ([`ClientRound`],
//! [`ServerRound`]), real keys and real masks.
//!
//! Each member does what the SDK does when its cohort asks for its input: it scales its
//! update by its own staleness weight s(τ) (τ = the cohort's round − the round it trained in),
//! encodes it with the modular codec under the cohort's codec seed, binds the cohort's context
//! into its consistency message, and masks it. The unmasked sum divided by Σ s(τ) over the
//! counted members is the buffered update, as the coordinator's `finish_secure` computes it.
//! No member drops out inside a session (the fleet model has no mid-session failures), so the
//! session's only effects on utility are the modular codec's rounding and the time devices wait
//! for a cohort to fill; its duration is four round trips of the fleet's latency.

use std::collections::{BTreeMap, BTreeSet};

use fedlora_coordinator::aggregate::modular_sum_delta;
use fedlora_protocol::rank::RankCounts;
use fedlora_protocol::secagg::crypto::{EcdsaP256Signer, P256Verifier};
use fedlora_protocol::secagg::{ClientRound, SecAggError, SecAggParams, SecAggPolicy, ServerRound};
use fedlora_protocol::{
    codec_seed, CodecContext, Federation, FlatAdapter, ModularSum, StalenessPlan, UploadMeta,
};
use fedlora_train::learner::{encode_update, ClientSeeds};
use rand::rngs::ChaCha20Rng;
use rand::SeedableRng;
use sha2::{Digest, Sha256};

use crate::error::SimError;
use crate::seed::mix_seed;

/// One cohort member: its id, its stage-machine seed and key, the round its update trained in
/// and the update itself (the trained delta, before scaling and encoding).
pub struct Member<'a> {
    /// Client id.
    pub id: &'a str,
    /// The device's seeds (its codec noise and its stage randomness).
    pub seeds: &'a ClientSeeds,
    /// Its ECDSA P-256 key (the roster's signatures).
    pub signer: &'a EcdsaP256Signer,
    /// The round its update trained in.
    pub trained: u64,
    /// The trained delta.
    pub delta: &'a FlatAdapter,
}

/// What a cohort's session produced.
pub struct CohortSum {
    /// Σ s(τᵢ)·Δᵢ ÷ Σ s(τᵢ) over the counted members.
    pub delta: FlatAdapter,
    /// Each counted member's upload record (digest of its masked input, its base round).
    pub uploads: Vec<(String, UploadMeta)>,
    /// Bytes of the masked inputs.
    pub masked_bytes: u64,
}

/// Runs the SecAgg+ session of `round`'s cohort `members` (as `fed`'s open cohort has them)
/// under `params`, and returns the staleness-weighted mean of their updates.
pub fn run(
    fed: &Federation,
    round: u64,
    params: &SecAggParams,
    members: &[Member<'_>],
    verifier: &P256Verifier,
) -> Result<CohortSum, SimError> {
    let sa = |e: SecAggError| SimError::SecAgg(format!("cohort {round}: {e}"));
    let cfg = fed.config();
    let codec = &cfg.train.codec;
    let spec = members
        .first()
        .map(|m| m.delta.spec().clone())
        .ok_or_else(|| SimError::Config(format!("cohort {round} has no members")))?;
    let (Some(len), Some(modulus)) = (codec.summed_len(spec.numel()), codec.modulus_bits()) else {
        return Err(SimError::Config(
            "secure cohorts need the modular codec".into(),
        ));
    };
    let plan = StalenessPlan {
        weight: cfg.staleness,
        max_staleness: cfg.max_staleness,
    };
    let seed = codec_seed(cfg.seed, round);
    let context = fedlora_protocol::round::cohort_context(codec, &plan, seed);
    let ctx = CodecContext { round_seed: seed };
    let ids: BTreeSet<String> = members.iter().map(|m| m.id.to_string()).collect();
    let mut server = ServerRound::new(round, params.clone(), len, ids);
    let stage_rng = |m: &Member<'_>, purpose: u64| {
        ChaCha20Rng::seed_from_u64(mix_seed(
            m.seeds.sampling.unwrap_or_default(),
            round,
            purpose,
        ))
    };
    let mut machines = Vec::with_capacity(members.len());
    for m in members {
        let mut cr = ClientRound::new(
            round,
            m.id,
            params.clone(),
            SecAggPolicy::default(),
            &mut stage_rng(m, 21),
        );
        cr.bind(context, 0, 0).map_err(sa)?;
        let keys = cr.advertise(m.signer).map_err(sa)?;
        server.receive_keys(m.id, keys).map_err(sa)?;
        machines.push(cr);
    }
    server.close_keys().map_err(sa)?;
    for (m, cr) in members.iter().zip(&mut machines) {
        let view = server
            .roster_view(m.id)
            .ok_or_else(|| SimError::Config(format!("{} left out of the roster", m.id)))?;
        let shares = cr
            .share_keys(&view, verifier, &mut stage_rng(m, 22))
            .map_err(sa)?;
        server.receive_shares(m.id, shares).map_err(sa)?;
    }
    let deliveries = server.close_shares().map_err(sa)?;
    let mut uploads = Vec::with_capacity(members.len());
    let mut weights = BTreeMap::new();
    let mut masked_bytes = 0u64;
    for (m, cr) in members.iter().zip(&mut machines) {
        // its own s(τ), from the weighting its offer carried (as `cohort_weight` computes it)
        let w = fedlora_protocol::round::cohort_weight(
            &plan,
            round,
            m.trained,
            plan.weight.weight(round.saturating_sub(m.trained)),
            0.0,
        )
        .map_err(|e| SimError::Config(format!("{}: {e}", m.id)))?;
        let mut scaled = m.delta.clone();
        scaled.values_mut().iter_mut().for_each(|x| *x *= w as f32);
        let enc = encode_update(
            codec,
            &spec,
            &scaled,
            &ctx,
            1,
            &mut m.seeds.codec_rng(round)?,
            &mut None::<fedlora_protocol::ErrorFeedback>,
            cfg.train.update_clip(),
        )?;
        let ints = codec.modular_payload(&enc.bytes, &spec)?;
        let mine = deliveries.get(m.id).cloned().unwrap_or_default();
        let y = cr.masked_input(&mine, &ints).map_err(sa)?;
        let mut packed = Vec::new();
        fedlora_protocol::codec::bits::pack(y.iter().copied(), modulus, &mut packed);
        masked_bytes += packed.len() as u64;
        let statement = cr.mask_statement(m.signer).map_err(sa)?;
        server.receive_input(m.id, y, statement).map_err(sa)?;
        weights.insert(m.id.to_string(), w);
        uploads.push((
            m.id.to_string(),
            UploadMeta {
                digest: Sha256::digest(&packed).into(),
                weight: 1.0,
                bytes: packed.len() as u64,
                train_loss: None,
                rank: None,
                base_round: Some(m.trained),
            },
        ));
    }
    let view = server.close_inputs().map_err(sa)?;
    for (m, cr) in members.iter().zip(&mut machines) {
        let sig = cr.consistency(&view, m.signer).map_err(sa)?;
        server.receive_consistency(m.id, sig).map_err(sa)?;
    }
    let request = server.close_consistency().map_err(sa)?;
    for (m, cr) in members.iter().zip(&mut machines) {
        let sigs = server.signatures_for(m.id);
        let statements = server.statements_for(m.id);
        let resp = cr
            .unmask(&request, &sigs, &statements, verifier)
            .map_err(sa)?;
        server.receive_unmask(resp).map_err(sa)?;
    }
    let (sum, counted) = server.finish().map_err(sa)?;
    let ms = ModularSum::from_sum(sum, modulus, counted.len());
    let full = fedlora_coordinator::aggregate::full_rank(&spec);
    let counts = RankCounts::new(full, counted.iter().map(|_| (1.0, full)));
    let mut delta = modular_sum_delta(codec, &spec, &ctx, &ms, &counts)?;
    // the decoded mean divides Σ s(τᵢ)·Δᵢ by the count; the staleness-weighted mean divides it
    // by Σ s(τᵢ) (the coordinator's `finish_secure`)
    let total: f64 = counted.iter().filter_map(|c| weights.get(c)).sum();
    let scale = (counted.len() as f64 / total) as f32;
    delta.values_mut().iter_mut().for_each(|x| *x *= scale);
    uploads.retain(|(id, _)| counted.contains(id));
    Ok(CohortSum {
        delta,
        uploads,
        masked_bytes,
    })
}

/// SecAgg+ parameters for cohorts of up to `fed`'s buffer (the coordinator's planner: every
/// member a neighbour up to 16, else 2⌈log₂ n⌉, and the smallest t with 2t > k).
pub fn params(fed: &fedlora_protocol::FederationConfig) -> Result<SecAggParams, SimError> {
    fedlora_coordinator::secure_plan::secure_params(
        &fedlora_coordinator::secure_plan::SecureChoice {
            neighbours: None,
            threshold: None,
            collusion: 0,
        },
        fed,
    )
    .map_err(|e| SimError::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlora_protocol::{AdapterSpec, Codec, FederationConfig, Mode, TensorSpec, Weighting};

    /// A cohort's session gives the staleness-weighted mean of what its members trained, up to
    /// the modular codec's rounding: two members one buffer stale (s = 1/√2) and two fresh
    /// ones, whose unweighted mean would be 0.
    #[test]
    fn a_cohort_sums_the_staleness_weighted_mean_through_real_masks() {
        let spec = AdapterSpec::new(vec![TensorSpec {
            name: "a".into(),
            shape: vec![4, 8],
        }])
        .unwrap();
        let mut cfg = FederationConfig {
            mode: Mode::Async,
            buffer: 4,
            rounds: 5,
            max_staleness: 3,
            ..FederationConfig::default()
        };
        // every coordinate sent (the default sends a shared eighth of them)
        cfg.train.codec = Codec::Modular(fedlora_protocol::codec::ModularParams {
            fraction: 1.0,
            ..Default::default()
        });
        cfg.train.weighting = Weighting::Uniform;
        cfg.train.secure = Some(params(&cfg).unwrap());
        let mut fed = Federation::new(cfg, spec.hash(), 0).unwrap();
        let ids = ["a", "b", "c", "d", "e", "f"];
        let seeds: Vec<ClientSeeds> = (0..6)
            .map(|i| ClientSeeds {
                sampling: Some(i),
                noise: Some(100 + i),
            })
            .collect();
        let signers: Vec<EcdsaP256Signer> = (0..6)
            .map(|_| crate::setup::new_signer().unwrap())
            .collect();
        let verifier = P256Verifier(
            ids.iter()
                .zip(&signers)
                .map(|(id, s)| (id.to_string(), s.public_key()))
                .collect(),
        );
        let delta = |v: f32| FlatAdapter::new(spec.clone(), vec![v; 32]).unwrap();
        let cohort = |fed: &mut Federation, members: &[(usize, u64, f32)]| {
            for &(i, trained, _) in members {
                fed.mark_ready(ids[i], trained).unwrap();
            }
            let Some(fedlora_protocol::Transition::RoundStarted { round, selected }) = fed.tick(10)
            else {
                panic!("no cohort")
            };
            assert_eq!(selected.len(), 4);
            let deltas: Vec<FlatAdapter> = members.iter().map(|m| delta(m.2)).collect();
            let ms: Vec<Member<'_>> = members
                .iter()
                .zip(&deltas)
                .map(|(&(i, trained, _), d)| Member {
                    id: ids[i],
                    seeds: &seeds[i],
                    signer: &signers[i],
                    trained,
                    delta: d,
                })
                .collect();
            let sum = run(
                fed,
                round,
                fed.config().train.secure.as_ref().unwrap(),
                &ms,
                &verifier,
            )
            .unwrap();
            for (id, meta) in &sum.uploads {
                fed.accept_upload(id, round, meta.clone()).unwrap();
            }
            fed.commit(round, 11).unwrap();
            assert!(matches!(
                fed.tick(12),
                Some(fedlora_protocol::Transition::RoundStarted { .. })
            ));
            sum
        };
        assert!(fed.tick(0).is_some(), "buffer 1 opens");
        // cohort 1: four fresh updates
        let first = cohort(
            &mut fed,
            &[(0, 1, 0.01), (1, 1, 0.01), (2, 1, 0.03), (3, 1, 0.03)],
        );
        for x in first.delta.values() {
            assert!((x - 0.02).abs() < 1e-3, "{x}");
        }
        // cohort 2 (round 2): e and f trained in round 1 (τ = 1), a and b in round 2
        let second = cohort(
            &mut fed,
            &[(4, 1, 0.04), (5, 1, 0.04), (0, 2, -0.04), (1, 2, -0.04)],
        );
        let s = 0.5f64.sqrt();
        let want = ((2.0 * 0.04 * s - 2.0 * 0.04) / (2.0 * s + 2.0)) as f32;
        assert!(want < -0.006);
        for x in second.delta.values() {
            assert!((x - want).abs() < 1e-3, "{x} vs {want}");
        }
        assert_eq!(second.uploads.len(), 4);
        assert!(second.uploads.iter().any(|(_, m)| m.base_round == Some(1)));
    }
}
