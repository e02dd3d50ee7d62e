//! Heterogeneous LoRA ranks: one global adapter at rank `R`, clients that train rank `rᵢ ≤ R`.
//!
//! A LoRA factor pair is `A` `[R, d_in]` (tensor name ending in `lora_a`) and `B` `[d_out, R]`
//! (name ending in `lora_b`), in the wire layout of [`crate::adapter`]. Rank component `j` of
//! the adapter is row `j` of every `A` and column `j` of every `B`. A client of rank `r` gets
//! the **slice** `A[..r, :]`, `B[:, ..r]` (`ΔW = B[:, ..r]·A[..r, :]`, the global adapter
//! truncated to its first `r` components), trains it, and sends its delta **zero-padded** back
//! to rank `R`. The coordinator averages component `j` over the clients whose rank is above
//! `j` ([`RankCounts`]), as in HeteroFL / FlexLoRA-style aggregation: a component no client of
//! a round trained keeps its value.
//!
//! The LoRA scaling stays `α / R` for every client, so a client's slice computes exactly the
//! global adapter's first `r` components: nothing is rescaled when slices are merged back.
//! Tensors that are neither `A` nor `B` belong to component 0 (every client trains them).

use crate::adapter::{AdapterSpec, FlatAdapter, TensorSpec};
use crate::error::ProtocolError;

/// How a tensor's values map to rank components.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// `[r, d_in]`: row j is component j.
    A,
    /// `[d_out, r]`: column j is component j.
    B,
    /// Not a LoRA factor: component 0.
    Other,
}

fn role(t: &TensorSpec) -> Role {
    let last = t.name.rsplit('.').next().unwrap_or("");
    match (last, t.shape.len()) {
        ("lora_a", 2) => Role::A,
        ("lora_b", 2) => Role::B,
        _ => Role::Other,
    }
}

fn bad(m: String) -> ProtocolError {
    ProtocolError::InvalidSpec(m)
}

/// The rank `R` of `spec`: the rows of every `lora_a` and the columns of every `lora_b`, which
/// must all agree. Fails on a spec without LoRA factors or with mixed ranks.
pub fn spec_rank(spec: &AdapterSpec) -> Result<usize, ProtocolError> {
    let mut rank = None;
    for t in spec.tensors() {
        let r = match role(t) {
            Role::A => t.shape[0],
            Role::B => t.shape[1],
            Role::Other => continue,
        };
        match rank {
            None => rank = Some(r),
            Some(x) if x != r => {
                return Err(bad(format!(
                    "tensor `{}` has rank {r}, others {x}: one rank per adapter",
                    t.name
                )))
            }
            _ => {}
        }
    }
    rank.ok_or_else(|| bad("the adapter has no LoRA factors (lora_a / lora_b)".into()))
}

/// `spec` cut to rank `r` (1 ≤ r ≤ R); the base identity is kept.
pub fn slice_spec(spec: &AdapterSpec, r: usize) -> Result<AdapterSpec, ProtocolError> {
    let full = spec_rank(spec)?;
    if r == 0 || r > full {
        return Err(bad(format!("rank {r} is not in 1..={full}")));
    }
    let tensors = spec
        .tensors()
        .iter()
        .map(|t| {
            let mut t = t.clone();
            match role(&t) {
                Role::A => t.shape[0] = r,
                Role::B => t.shape[1] = r,
                Role::Other => {}
            }
            t
        })
        .collect();
    let out = AdapterSpec::new(tensors)?;
    Ok(match spec.base() {
        Some(b) => out.with_base(b),
        None => out,
    })
}

/// Calls `f(full_offset, sliced_offset, len)` for every contiguous run of values that the slice
/// to rank `r` keeps, in order.
fn for_each_kept_run(
    spec: &AdapterSpec,
    r: usize,
    mut f: impl FnMut(usize, usize, usize),
) -> Result<(), ProtocolError> {
    let full = spec_rank(spec)?;
    if r == 0 || r > full {
        return Err(bad(format!("rank {r} is not in 1..={full}")));
    }
    let mut out = 0;
    for (t, (off, len)) in spec.tensors().iter().zip(spec.offsets()) {
        match role(t) {
            Role::A => {
                // the first r rows are contiguous
                let keep = r * t.shape[1];
                f(off, out, keep);
                out += keep;
            }
            Role::B => {
                for row in 0..t.shape[0] {
                    f(off + row * full, out, r);
                    out += r;
                }
            }
            Role::Other => {
                f(off, out, len);
                out += len;
            }
        }
    }
    Ok(())
}

/// `adapter` cut to rank `r`: what a client of rank `r` trains from.
pub fn slice(adapter: &FlatAdapter, r: usize) -> Result<FlatAdapter, ProtocolError> {
    let spec = slice_spec(adapter.spec(), r)?;
    let mut values = vec![0.0f32; spec.numel()];
    for_each_kept_run(adapter.spec(), r, |full, sliced, len| {
        values[sliced..sliced + len].copy_from_slice(&adapter.values()[full..full + len]);
    })?;
    FlatAdapter::new(spec, values)
}

/// `sliced` (a rank-`r` adapter or delta of `full`) zero-padded back to `full`'s rank `R`.
/// Fails unless `sliced`'s spec is exactly `full` cut to some rank.
pub fn pad(sliced: &FlatAdapter, full: &AdapterSpec) -> Result<FlatAdapter, ProtocolError> {
    let r = spec_rank(sliced.spec())?;
    let want = slice_spec(full, r)?;
    sliced.check_same_spec(&want)?;
    let mut values = vec![0.0f32; full.numel()];
    for_each_kept_run(full, r, |f, s, len| {
        values[f..f + len].copy_from_slice(&sliced.values()[s..s + len]);
    })?;
    FlatAdapter::new(full.clone(), values)
}

/// The rank component of every value of `spec`, in flat order.
pub fn components(spec: &AdapterSpec) -> Result<Vec<u32>, ProtocolError> {
    let full = spec_rank(spec)?;
    let mut out = Vec::with_capacity(spec.numel());
    for t in spec.tensors() {
        match role(t) {
            Role::A => {
                for j in 0..t.shape[0] {
                    out.extend(std::iter::repeat_n(j as u32, t.shape[1]));
                }
            }
            Role::B => {
                for _ in 0..t.shape[0] {
                    out.extend(0..full as u32);
                }
            }
            Role::Other => out.extend(std::iter::repeat_n(0, t.numel())),
        }
    }
    Ok(out)
}

/// The aggregation weight behind each rank component of a round: `weight[j]` = the summed
/// weight of the counted clients whose rank is above `j`.
#[derive(Clone, Debug, PartialEq)]
pub struct RankCounts {
    weight: Vec<f64>,
}

impl RankCounts {
    /// From the counted clients' `(weight, rank)`; `rank` is capped at `full`.
    pub fn new(full: usize, clients: impl IntoIterator<Item = (f64, usize)>) -> Self {
        let mut weight = vec![0.0; full];
        for (w, r) in clients {
            for x in weight.iter_mut().take(r.min(full)) {
                *x += w;
            }
        }
        Self { weight }
    }

    /// The weight behind component `j`.
    pub fn weight(&self, j: usize) -> f64 {
        self.weight.get(j).copied().unwrap_or(0.0)
    }

    /// Whether every component has the same weight (all clients at full rank): then the plain
    /// weighted mean applies.
    pub fn is_uniform(&self) -> bool {
        self.weight.windows(2).all(|w| w[0] == w[1])
    }

    /// The per-component mean of `sum` (a sum of zero-padded weighted deltas): each value is
    /// divided by its component's weight; a component with no weight becomes 0 (no client
    /// trained it, so the global keeps its value).
    pub fn mean(&self, sum: &FlatAdapter) -> Result<FlatAdapter, ProtocolError> {
        let sums: Vec<f64> = sum.values().iter().map(|&v| f64::from(v)).collect();
        self.mean_of(sum.spec(), &sums)
    }

    /// [`RankCounts::mean`] of sums kept in `f64` (one per value of `spec`). With every
    /// component at the same weight this is the plain weighted mean, for any spec.
    pub fn mean_of(&self, spec: &AdapterSpec, sums: &[f64]) -> Result<FlatAdapter, ProtocolError> {
        if self.is_uniform() {
            let w = self.weight(0);
            return FlatAdapter::new(spec.clone(), sums.iter().map(|s| (s / w) as f32).collect());
        }
        let values = sums
            .iter()
            .zip(components(spec)?)
            .map(|(s, j)| {
                let w = self.weight(j as usize);
                if w > 0.0 {
                    (s / w) as f32
                } else {
                    0.0
                }
            })
            .collect();
        FlatAdapter::new(spec.clone(), values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AdapterSpec {
        AdapterSpec::new(vec![
            TensorSpec {
                name: "l.q.lora_a".into(),
                shape: vec![4, 3],
            },
            TensorSpec {
                name: "l.q.lora_b".into(),
                shape: vec![2, 4],
            },
        ])
        .unwrap()
        .with_base("base")
    }

    fn counting() -> FlatAdapter {
        let s = spec();
        let n = s.numel();
        FlatAdapter::new(s, (0..n).map(|i| i as f32).collect()).unwrap()
    }

    #[test]
    fn slicing_keeps_rows_of_a_and_columns_of_b_and_padding_inverts_it() {
        let full = counting();
        assert_eq!(spec_rank(full.spec()).unwrap(), 4);
        let s = slice(&full, 2).unwrap();
        assert_eq!(s.spec().tensors()[0].shape, vec![2, 3]);
        assert_eq!(s.spec().tensors()[1].shape, vec![2, 2]);
        assert_eq!(s.spec().base(), Some("base"));
        // A rows 0..2 = values 0..6; B [2,4] starts at 12: row 0 cols 0,1 = 12,13; row 1 = 16,17
        assert_eq!(
            s.values(),
            &[0., 1., 2., 3., 4., 5., 12., 13., 16., 17.][..]
        );
        let p = pad(&s, full.spec()).unwrap();
        let want: Vec<f32> = (0..full.values().len())
            .map(|i| {
                let keep = i < 6 || [12, 13, 16, 17].contains(&i);
                if keep {
                    i as f32
                } else {
                    0.0
                }
            })
            .collect();
        assert_eq!(p.values(), &want[..]);
        assert_eq!(slice(&full, 4).unwrap(), full);
        assert!(slice(&full, 5).is_err() && slice(&full, 0).is_err());
        // a slice of another spec cannot be padded into this one
        let other = AdapterSpec::new(vec![TensorSpec {
            name: "x.lora_a".into(),
            shape: vec![2, 3],
        }])
        .unwrap();
        assert!(pad(&FlatAdapter::zeros(other), full.spec()).is_err());
    }

    #[test]
    fn components_and_per_rank_means() {
        let comp = components(&spec()).unwrap();
        assert_eq!(&comp[..6], &[0, 0, 0, 1, 1, 1]);
        assert_eq!(&comp[12..], &[0, 1, 2, 3, 0, 1, 2, 3]);
        // clients of rank 4 (weight 1), 2 (weight 1) and 1 (weight 2)
        let counts = RankCounts::new(4, [(1.0, 4), (1.0, 2), (2.0, 1)]);
        assert_eq!(
            (0..5).map(|j| counts.weight(j)).collect::<Vec<_>>(),
            vec![4.0, 2.0, 1.0, 1.0, 0.0]
        );
        assert!(!counts.is_uniform());
        let sum = FlatAdapter::new(spec(), vec![8.0; 20]).unwrap();
        let mean = counts.mean(&sum).unwrap();
        assert_eq!(
            &mean.values()[..12],
            &[2., 2., 2., 4., 4., 4., 8., 8., 8., 8., 8., 8.]
        );
        assert_eq!(&mean.values()[12..16], &[2., 4., 8., 8.]);
        let none = RankCounts::new(4, [(1.0, 2)]);
        assert_eq!(none.mean(&sum).unwrap().values()[9], 0.0);
        assert!(RankCounts::new(4, [(1.0, 4), (3.0, 4)]).is_uniform());
    }

    #[test]
    fn mixed_ranks_and_specs_without_lora_are_refused() {
        let mixed = AdapterSpec::new(vec![
            TensorSpec {
                name: "a.lora_a".into(),
                shape: vec![4, 3],
            },
            TensorSpec {
                name: "b.lora_a".into(),
                shape: vec![2, 3],
            },
        ])
        .unwrap();
        assert!(spec_rank(&mixed).is_err());
        let plain = AdapterSpec::new(vec![TensorSpec {
            name: "w".into(),
            shape: vec![3],
        }])
        .unwrap();
        assert!(spec_rank(&plain).is_err());
    }
}
