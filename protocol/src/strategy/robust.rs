//! Robust aggregation that needs each client's update: coordinate-wise median and trimmed
//! mean (Yin et al. 2018). Plaintext only: a secure round reveals only the sum, and
//! client-level DP noise is calibrated to a sum's sensitivity.
//!
//! Both are unweighted. With heterogeneous ranks, the coordinate of rank component `j` is
//! taken over the clients whose rank is above `j` only (the others' zero padding is not a
//! vote).
//!
//! **Bound.** If at most `f` of the `k` updates of a coordinate are arbitrary (`f < k/2` for
//! the median, `f ≤ ⌊β·k⌋` for the trimmed mean), the result lies between the smallest and
//! the largest honest value of that coordinate, so it differs from the honest mean by at most
//! the honest values' spread `max − min`.

use serde::{Deserialize, Serialize};

use super::{Contribution, Strategy};
use crate::adapter::FlatAdapter;
use crate::error::ProtocolError;

/// Coordinate-wise median of the client deltas (the mean of the two middle values for an even
/// count).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Median;

/// Coordinate-wise trimmed mean: per coordinate, the ⌊trim·k⌋ largest and smallest of the k
/// values are dropped and the rest averaged.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrimmedMean {
    /// Share β ∈ [0, 0.5) trimmed at each end. Default 0.2.
    pub trim: f64,
}

impl Default for TrimmedMean {
    fn default() -> Self {
        Self { trim: 0.2 }
    }
}

/// Applies `reduce` to the sorted values of every coordinate (over the clients whose rank
/// covers it).
fn coordinate_wise(
    full_rank: usize,
    updates: &[Contribution<'_>],
    reduce: impl Fn(&[f32]) -> f32,
) -> Result<FlatAdapter, ProtocolError> {
    let first = updates
        .first()
        .ok_or_else(|| ProtocolError::InvalidValue("no updates to aggregate".into()))?;
    let spec = first.delta.spec();
    for u in updates {
        first.delta.check_same_spec(u.delta.spec())?;
    }
    let hetero = updates.iter().any(|u| u.rank < full_rank);
    let comp = if hetero {
        Some(crate::rank::components(spec)?)
    } else {
        None
    };
    let mut column = Vec::with_capacity(updates.len());
    let mut out = Vec::with_capacity(spec.numel());
    for i in 0..spec.numel() {
        column.clear();
        let j = comp.as_ref().map_or(0, |c| c[i] as usize);
        column.extend(
            updates
                .iter()
                .filter(|u| u.rank > j)
                .map(|u| u.delta.values()[i]),
        );
        if column.is_empty() {
            out.push(0.0);
            continue;
        }
        if column.iter().any(|v| !v.is_finite()) {
            return Err(ProtocolError::InvalidValue(
                "a decoded update has a non-finite value".into(),
            ));
        }
        column.sort_unstable_by(f32::total_cmp);
        out.push(reduce(&column));
    }
    FlatAdapter::new(spec.clone(), out)
}

fn median(sorted: &[f32]) -> f32 {
    let k = sorted.len();
    if k % 2 == 1 {
        sorted[k / 2]
    } else {
        ((f64::from(sorted[k / 2 - 1]) + f64::from(sorted[k / 2])) / 2.0) as f32
    }
}

impl Strategy for Median {
    fn name(&self) -> &'static str {
        "median"
    }

    fn needs_individual_updates(&self) -> bool {
        true
    }

    fn combine(
        &self,
        full_rank: usize,
        updates: &[Contribution<'_>],
    ) -> Result<FlatAdapter, ProtocolError> {
        coordinate_wise(full_rank, updates, median)
    }
}

impl Strategy for TrimmedMean {
    fn name(&self) -> &'static str {
        "trimmed-mean"
    }

    fn needs_individual_updates(&self) -> bool {
        true
    }

    fn combine(
        &self,
        full_rank: usize,
        updates: &[Contribution<'_>],
    ) -> Result<FlatAdapter, ProtocolError> {
        let trim = self.trim;
        coordinate_wise(full_rank, updates, |s| {
            let cut = ((trim * s.len() as f64).floor() as usize).min((s.len() - 1) / 2);
            let kept = &s[cut..s.len() - cut];
            (kept.iter().map(|&v| f64::from(v)).sum::<f64>() / kept.len() as f64) as f32
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{AdapterSpec, TensorSpec};
    use rand::{RngExt, SeedableRng};

    fn spec(n: usize) -> AdapterSpec {
        AdapterSpec::new(vec![TensorSpec {
            name: "w".into(),
            shape: vec![n],
        }])
        .unwrap()
    }

    /// 1 of 5 clients sends garbage (huge values of either sign); the median and the 20 %
    /// trimmed mean stay within the honest values' range of every coordinate, so within its
    /// spread of the honest mean, while the plain mean is dragged away by the garbage.
    #[test]
    fn one_garbage_client_of_five_moves_median_and_trimmed_mean_by_at_most_the_honest_spread() {
        let n = 1000;
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(7);
        let mut deltas: Vec<FlatAdapter> = (0..4)
            .map(|_| {
                let v = (0..n)
                    .map(|i| 0.01 * (i as f32).sin() + rng.random_range(-0.001..0.001))
                    .collect();
                FlatAdapter::new(spec(n), v).unwrap()
            })
            .collect();
        let garbage = (0..n)
            .map(|i| if i % 2 == 0 { 1e6 } else { -3e5 })
            .collect();
        deltas.push(FlatAdapter::new(spec(n), garbage).unwrap());
        let ups: Vec<Contribution<'_>> = deltas
            .iter()
            .map(|d| Contribution {
                weight: 1.0,
                rank: 1,
                delta: d,
            })
            .collect();
        let honest = &deltas[..4];
        for s in [
            Box::new(Median) as Box<dyn Strategy>,
            Box::new(TrimmedMean::default()),
        ] {
            assert!(s.needs_individual_updates());
            let agg = s.combine(1, &ups).unwrap();
            for i in 0..n {
                let col: Vec<f32> = honest.iter().map(|d| d.values()[i]).collect();
                let lo = col.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = col.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mean = col.iter().sum::<f32>() / 4.0;
                let v = agg.values()[i];
                assert!(v >= lo && v <= hi, "{}: {v} outside [{lo}, {hi}]", s.name());
                assert!((v - mean).abs() <= hi - lo + 1e-7);
            }
        }
        let plain = super::super::weighted_mean(1, &ups).unwrap();
        assert!(plain.values()[0] > 1e5);
    }

    #[test]
    fn exact_small_cases_and_rank_aware_columns() {
        let d = |v: Vec<f32>| FlatAdapter::new(spec(1), v).unwrap();
        let xs = [d(vec![1.0]), d(vec![5.0]), d(vec![2.0]), d(vec![100.0])];
        let ups: Vec<Contribution<'_>> = xs
            .iter()
            .map(|d| Contribution {
                weight: 1.0,
                rank: 1,
                delta: d,
            })
            .collect();
        assert_eq!(Median.combine(1, &ups).unwrap().values(), &[3.5]);
        // 4 values, trim 0.25: drop 1 and 100, mean of 2 and 5
        let t = TrimmedMean { trim: 0.25 };
        assert_eq!(t.combine(1, &ups).unwrap().values(), &[3.5]);
        assert_eq!(
            TrimmedMean { trim: 0.0 }.combine(1, &ups).unwrap().values(),
            &[27.0]
        );
        // heterogeneous ranks: component 1 only counts the rank-2 clients
        let s2 = AdapterSpec::new(vec![TensorSpec {
            name: "l.lora_a".into(),
            shape: vec![2, 1],
        }])
        .unwrap();
        let a = FlatAdapter::new(s2.clone(), vec![1.0, 10.0]).unwrap();
        let b = FlatAdapter::new(s2.clone(), vec![3.0, 20.0]).unwrap();
        let c = FlatAdapter::new(s2, vec![5.0, 0.0]).unwrap();
        let ups = [(2, &a), (2, &b), (1, &c)].map(|(rank, delta)| Contribution {
            weight: 1.0,
            rank,
            delta,
        });
        assert_eq!(Median.combine(2, &ups).unwrap().values(), &[3.0, 15.0]);
    }
}
