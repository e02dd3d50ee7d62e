//! Streaming aggregation: every accepted upload of a round is folded into one running sum as
//! it is accepted, so the coordinator holds `O(params)` for the round, not `O(clients × params)`.
//!
//! It serves the strategies that need only the sum (FedAvg, FedProx, the server optimizers) and
//! client-level DP in central mode. How each sum is kept:
//! - **modular codec**: the integers are added mod 2^m ([`ModularSum`]): exact, so the result
//!   is bit for bit the same in any order of acceptance;
//! - **float codecs**: `Σ wᵢ·Δᵢ` in `f64`, in the order the uploads were accepted (one `f64`
//!   rounding per addition; against a sum in another order the mean differs by at most
//!   `n · 2⁻⁵³` relative per coordinate before it is rounded to `f32`);
//! - **central client-level DP**: each decoded delta clipped again to the plan's S, then summed
//!   in `f64` like the float case (weight 1 whatever the client claimed; in async mode times
//!   its staleness weight s(τ) ≤ 1, so one client still moves the sum by at most S).
//!
//! After a restart the sum is rebuilt by folding the durable payloads one at a time
//! ([`crate::aggregate::aggregate_payloads`] folds the same way), so memory stays `O(params)`.

use std::collections::BTreeSet;

use fedlora_protocol::client_dp::ClientDpPlan;
use fedlora_protocol::rank::RankCounts;
use fedlora_protocol::{AdapterSpec, Codec, CodecContext, FlatAdapter, ModularSum};

use crate::error::{CoordinatorError, Result};

/// What one upload adds to the sum, prepared from its payload outside any lock.
#[derive(Clone, Debug)]
pub struct Addend {
    /// Aggregation weight (1 under client-level DP).
    pub weight: f64,
    /// The rank the client trained (≤ the federation's).
    pub rank: usize,
    /// The values.
    pub part: Part,
}

/// The values an [`Addend`] carries.
#[derive(Clone, Debug)]
pub enum Part {
    /// The modular codec's integers (weight included by the codec).
    Ints(Vec<u64>),
    /// A decoded delta, multiplied by the weight when folded.
    Values(Vec<f32>),
}

/// How a federation's uploads are summed.
#[derive(Clone, Debug)]
pub enum SumKind {
    /// Integers mod 2^`bits`.
    Modular {
        /// Modulus bits.
        bits: u32,
    },
    /// `f64` weighted sum of decoded deltas.
    Weighted,
    /// Client-level DP in central mode: deltas clipped to the plan's S, summed in `f64`.
    CentralDp(ClientDpPlan),
}

impl SumKind {
    /// The kind for a federation: `None` when its strategy needs each update (those read the
    /// payloads back from disk instead).
    pub fn of(codec: &Codec, client_dp: Option<&ClientDpPlan>, individual: bool) -> Option<Self> {
        if let Some(plan) = client_dp {
            return Some(Self::CentralDp(plan.clone()));
        }
        if individual {
            return None;
        }
        Some(match codec.modulus_bits() {
            Some(bits) => Self::Modular { bits },
            None => Self::Weighted,
        })
    }

    /// Bytes of an [`Addend`] of this kind for an adapter of `numel` values: `u64` integers
    /// for the modular codec, `f32` values otherwise.
    pub fn addend_bytes(&self, numel: usize) -> usize {
        let per_value = match self {
            Self::Modular { .. } => std::mem::size_of::<u64>(),
            Self::Weighted | Self::CentralDp(_) => std::mem::size_of::<f32>(),
        };
        numel * per_value
    }

    /// What `bytes` (already decoded by the caller as `decoded`) adds to a sum of this kind.
    pub fn addend(
        &self,
        codec: &Codec,
        spec: &AdapterSpec,
        bytes: &[u8],
        decoded: FlatAdapter,
        weight: f64,
        rank: usize,
    ) -> Result<Addend> {
        let part = match self {
            Self::Modular { .. } => Part::Ints(codec.modular_payload(bytes, spec)?),
            Self::Weighted => Part::Values(decoded.into_values()),
            Self::CentralDp(plan) => {
                let mut d = decoded.into_values();
                fedlora_dp::clip_l2(&mut d, plan.clip);
                return Ok(Addend {
                    weight: 1.0,
                    rank,
                    part: Part::Values(d),
                });
            }
        };
        Ok(Addend { weight, rank, part })
    }
}

enum Acc {
    Modular(ModularSum),
    Float(Vec<f64>),
}

/// One round's running sum and who is in it.
pub struct RunningSum {
    round: u64,
    kind: SumKind,
    clients: BTreeSet<String>,
    weights: Vec<(f64, usize)>,
    acc: Option<Acc>,
}

impl RunningSum {
    /// An empty sum for `round`.
    pub fn new(round: u64, kind: SumKind) -> Self {
        Self {
            round,
            kind,
            clients: BTreeSet::new(),
            weights: Vec::new(),
            acc: None,
        }
    }

    /// The round it sums.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The clients folded in so far.
    pub fn clients(&self) -> &BTreeSet<String> {
        &self.clients
    }

    /// Folds `client`'s addend in; a client already in the sum is an error (nothing changes).
    pub fn add(&mut self, client: &str, a: &Addend) -> Result<()> {
        if self.clients.contains(client) {
            return Err(CoordinatorError::Storage(format!(
                "{client} is already in round {}'s sum",
                self.round
            )));
        }
        if !(a.weight.is_finite() && a.weight > 0.0) {
            return Err(CoordinatorError::Storage(format!(
                "weight {} must be positive",
                a.weight
            )));
        }
        match (&self.kind, &a.part) {
            (SumKind::Modular { bits }, Part::Ints(ints)) => {
                let bits = *bits;
                let acc = self
                    .acc
                    .get_or_insert_with(|| Acc::Modular(ModularSum::new(ints.len(), bits)));
                let Acc::Modular(sum) = acc else {
                    unreachable!("a modular sum holds integers")
                };
                sum.add(ints)?;
            }
            (SumKind::Weighted | SumKind::CentralDp(_), Part::Values(v)) => {
                let acc = self
                    .acc
                    .get_or_insert_with(|| Acc::Float(vec![0.0; v.len()]));
                let Acc::Float(sum) = acc else {
                    unreachable!("a float sum holds values")
                };
                if sum.len() != v.len() {
                    return Err(CoordinatorError::Storage(format!(
                        "an upload of {} values into a sum of {}",
                        v.len(),
                        sum.len()
                    )));
                }
                // the same arithmetic as `strategy::weighted_mean` (w·Δ added in f64)
                for (s, &d) in sum.iter_mut().zip(v) {
                    *s += a.weight * f64::from(d);
                }
            }
            _ => {
                return Err(CoordinatorError::Storage(
                    "an upload of another kind than the round's sum".into(),
                ))
            }
        }
        self.clients.insert(client.to_string());
        self.weights.push((a.weight, a.rank));
        Ok(())
    }

    /// The round's aggregated delta. `noise` is needed (and used) only under central
    /// client-level DP; it must have standard deviation σ·S and come from the OS CSPRNG in
    /// deployments.
    pub fn finish(
        &self,
        codec: &Codec,
        spec: &AdapterSpec,
        ctx: &CodecContext,
        full_rank: usize,
        noise: Option<&mut fedlora_dp::GaussianNoise>,
    ) -> Result<FlatAdapter> {
        let Some(acc) = &self.acc else {
            return Err(CoordinatorError::Storage("no uploads".into()));
        };
        let counts = RankCounts::new(full_rank, self.weights.iter().copied());
        match (&self.kind, acc) {
            (SumKind::Modular { .. }, Acc::Modular(sum)) => {
                modular_sum_delta(codec, spec, ctx, sum, &counts)
            }
            (SumKind::Weighted, Acc::Float(sum)) => Ok(counts.mean_of(spec, sum)?),
            (SumKind::CentralDp(plan), Acc::Float(sum)) => {
                let noise = noise.ok_or_else(|| {
                    CoordinatorError::Config("central client-level DP needs its noise".into())
                })?;
                release_central(plan, spec, sum, noise)
            }
            _ => unreachable!("the accumulator matches its kind"),
        }
    }
}

/// The release of central client-level DP from the sum of the clipped deltas (`f64`, one per
/// value of `spec`): N(0, σ²S²) added to every coordinate, then divided by the plan's
/// **expected** clients per round. `noise` must have standard deviation σ·S.
pub fn release_central(
    plan: &ClientDpPlan,
    spec: &AdapterSpec,
    sum: &[f64],
    noise: &mut fedlora_dp::GaussianNoise,
) -> Result<FlatAdapter> {
    let Some(want) = plan.central_noise_std() else {
        return Err(CoordinatorError::Config(
            "central client-level DP needs Gaussian noise".into(),
        ));
    };
    if (noise.std() - want).abs() > 1e-12 * want.max(1.0) {
        return Err(CoordinatorError::Config(format!(
            "central noise has std {}, the plan needs σ·S = {want}",
            noise.std()
        )));
    }
    let noisy: Vec<f32> = sum
        .iter()
        .map(|s| ((s + noise.draw_with_std(want)) / plan.expected_clients) as f32)
        .collect();
    Ok(FlatAdapter::new(spec.clone(), noisy)?)
}

/// The mean delta decoded from a modular sum (of plain modular uploads, or unmasked by secure
/// aggregation). `counts` gives the weight behind each rank component: with every client at
/// full rank the decoded weight sum is used (and must be positive); with heterogeneous ranks
/// component `j` is divided by the weight of the counted clients whose rank is above `j`.
///
/// Client-level DP in distributed mode (the Skellam codec) is the exception: its sum is always
/// divided by the plan's public expected clients per round, whatever ranks took part, so the
/// release never depends on who participated (a lower-rank client's missing components count
/// as zeros; dividing by the observed per-component count would make the divisor, and so the
/// release, a function of the participants that the accountant does not cover).
pub fn modular_sum_delta(
    codec: &Codec,
    spec: &AdapterSpec,
    ctx: &CodecContext,
    sum: &ModularSum,
    counts: &RankCounts,
) -> Result<FlatAdapter> {
    let (total, weight) = codec.decode_modular_sum(sum, spec, ctx)?;
    if !(weight > 0.0 && weight.is_finite()) {
        return Err(CoordinatorError::Storage(format!(
            "decoded weight sum {weight} is not positive"
        )));
    }
    if !counts.is_uniform() && !matches!(codec, Codec::Skellam(_)) {
        return Ok(counts.mean(&total)?);
    }
    let spec = total.spec().clone();
    let mean: Vec<f32> = total
        .into_values()
        .into_iter()
        .map(|x| (f64::from(x) / weight) as f32)
        .collect();
    Ok(FlatAdapter::new(spec, mean)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlora_protocol::TensorSpec;

    fn spec() -> AdapterSpec {
        AdapterSpec::new(vec![TensorSpec {
            name: "t".into(),
            shape: vec![3],
        }])
        .unwrap()
    }

    #[test]
    fn a_weighted_sum_is_the_weighted_mean_and_refuses_a_client_twice() {
        let spec = spec();
        let mut s = RunningSum::new(4, SumKind::Weighted);
        let add = |v: [f32; 3], w: f64| Addend {
            weight: w,
            rank: 1,
            part: Part::Values(v.to_vec()),
        };
        s.add("a", &add([1.0, 2.0, 3.0], 1.0)).unwrap();
        s.add("b", &add([3.0, 0.0, -3.0], 3.0)).unwrap();
        assert!(s.add("a", &add([9.0; 3], 1.0)).is_err());
        let d = s
            .finish(&Codec::DenseF32, &spec, &CodecContext::default(), 1, None)
            .unwrap();
        assert_eq!(d.values(), &[2.5, 0.5, -1.5]);
        assert_eq!(s.clients().len(), 2);
    }
}
