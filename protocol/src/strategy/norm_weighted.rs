//! HetLoRA-style norm weighting for heterogeneous ranks (after Cho et al. 2024, "Heterogeneous
//! LoRA for Federated Fine-tuning of On-Device Foundation Models", sparsity-weighted
//! aggregation): each client's zero-padded delta is weighted by its own L2 norm over the whole
//! adapter, times its aggregation weight, and rank component `j` is divided by the summed
//! weights of the clients whose rank is above `j`. A client whose update barely moved (often a
//! low-rank one on data the others cover) counts less.
//!
//! The paper weighs each layer by the Frobenius norm of its `B·A`; this uses the norm of the
//! uploaded delta over all adapter tensors, which the coordinator can compute from the upload
//! alone. It needs each client's update, so it runs in the clear only (refused with secure
//! aggregation): the weights are functions of individual updates.

use super::{Contribution, Strategy};
use crate::adapter::FlatAdapter;
use crate::error::ProtocolError;

/// Norm-weighted per-component averaging of zero-padded deltas (plaintext only).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NormWeighted;

impl Strategy for NormWeighted {
    fn name(&self) -> &'static str {
        "het-lora"
    }

    fn needs_individual_updates(&self) -> bool {
        true
    }

    fn combine(
        &self,
        full_rank: usize,
        updates: &[Contribution<'_>],
    ) -> Result<FlatAdapter, ProtocolError> {
        let norms: Vec<f64> = updates
            .iter()
            .map(|u| {
                u.delta
                    .values()
                    .iter()
                    .map(|&v| f64::from(v) * f64::from(v))
                    .sum::<f64>()
                    .sqrt()
            })
            .collect();
        if norms.iter().any(|n| !n.is_finite()) {
            return Err(ProtocolError::InvalidValue(
                "a decoded update has a non-finite norm".into(),
            ));
        }
        // every update zero: nothing moves (and no weight is positive)
        if norms.iter().all(|&n| n == 0.0) {
            let first = updates
                .first()
                .ok_or_else(|| ProtocolError::InvalidValue("no updates to aggregate".into()))?;
            return Ok(FlatAdapter::zeros(first.delta.spec().clone()));
        }
        let weighted: Vec<Contribution<'_>> = updates
            .iter()
            .zip(&norms)
            .filter(|(_, &n)| n > 0.0)
            .map(|(u, &n)| Contribution {
                weight: u.weight * n,
                ..*u
            })
            .collect();
        super::weighted_mean(full_rank, &weighted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{AdapterSpec, TensorSpec};

    #[test]
    fn updates_are_weighted_by_their_norm_per_rank_component() {
        let spec = AdapterSpec::new(vec![TensorSpec {
            name: "l.lora_a".into(),
            shape: vec![2, 1],
        }])
        .unwrap();
        // rank 2 with norm 5 (3, 4); rank 1 with norm 1 (1, 0 padded)
        let a = FlatAdapter::new(spec.clone(), vec![3.0, 4.0]).unwrap();
        let b = FlatAdapter::new(spec.clone(), vec![1.0, 0.0]).unwrap();
        let ups = [
            Contribution {
                weight: 1.0,
                rank: 2,
                delta: &a,
            },
            Contribution {
                weight: 1.0,
                rank: 1,
                delta: &b,
            },
        ];
        let s = NormWeighted;
        assert!(s.needs_individual_updates());
        let got = s.combine(2, &ups).unwrap();
        // component 0: (5·3 + 1·1) / (5 + 1); component 1: only the rank-2 client, 4
        assert!(
            (got.values()[0] - 16.0 / 6.0).abs() < 1e-6,
            "{:?}",
            got.values()
        );
        assert_eq!(got.values()[1], 4.0);
        let zero = FlatAdapter::zeros(spec);
        let z = [Contribution {
            weight: 1.0,
            rank: 2,
            delta: &zero,
        }];
        assert_eq!(s.combine(2, &z).unwrap().values(), &[0.0, 0.0]);
    }
}
