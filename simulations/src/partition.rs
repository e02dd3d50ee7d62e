//! Splitting data among virtual clients: natural (one speaking role each, as LEAF), IID, and
//! Dirichlet(α) label skew for classification. Every split is seeded.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_distr::{Distribution, Gamma};

/// How examples are assigned to clients.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Partition {
    /// Each client keeps its own natural shard (e.g. one speaking role).
    Natural,
    /// Examples shuffled and dealt evenly.
    Iid,
    /// For each label, client shares drawn from Dirichlet(α): small α gives skewed clients.
    Dirichlet {
        /// Concentration α > 0.
        alpha: f64,
    },
}

/// Deals `n` example indices to `clients` clients uniformly at random, as evenly as possible.
pub fn iid(n: usize, clients: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand::rngs::ChaCha20Rng::seed_from_u64(seed));
    let mut out = vec![Vec::new(); clients];
    for (j, i) in idx.into_iter().enumerate() {
        out[j % clients].push(i);
    }
    out
}

/// Label-skewed split: for every label, the examples carrying it are divided among clients in
/// proportions drawn from Dirichlet(α, …, α) (normalised Gamma(α, 1) draws).
pub fn dirichlet(labels: &[usize], clients: usize, alpha: f64, seed: u64) -> Vec<Vec<usize>> {
    assert!(alpha > 0.0 && clients > 0);
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(seed);
    let gamma = Gamma::new(alpha, 1.0).expect("α > 0");
    let n_labels = labels.iter().copied().max().map_or(0, |m| m + 1);
    let mut out = vec![Vec::new(); clients];
    for label in 0..n_labels {
        let mut idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == label).collect();
        idx.shuffle(&mut rng);
        let w: Vec<f64> = (0..clients).map(|_| gamma.sample(&mut rng)).collect();
        let total: f64 = w.iter().sum();
        // cumulative cut points of the shuffled examples
        let mut acc = 0.0;
        let mut start = 0;
        for (c, wi) in w.iter().enumerate() {
            acc += wi / total;
            let end = if c + 1 == clients {
                idx.len()
            } else {
                ((acc * idx.len() as f64).round() as usize).min(idx.len())
            };
            out[c].extend_from_slice(&idx[start..end.max(start)]);
            start = end.max(start);
        }
    }
    out
}

/// [`dirichlet`], redrawn until every client has at least `min_size` examples: draw `t` uses
/// seed `seed` for `t = 0` (so `min_size = 0` is [`dirichlet`] itself) and
/// `seed ⊕ t·φ` after. Returns the last draw if 1,000 draws all fall short (the caller checks).
pub fn dirichlet_min(
    labels: &[usize],
    clients: usize,
    alpha: f64,
    seed: u64,
    min_size: usize,
) -> Vec<Vec<usize>> {
    let mut p = dirichlet(labels, clients, alpha, seed);
    for t in 1..1000u64 {
        if p.iter().all(|c| c.len() >= min_size) {
            break;
        }
        p = dirichlet(
            labels,
            clients,
            alpha,
            seed ^ t.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
    }
    p
}

#[cfg(test)]
mod tests {
    #[test]
    fn dirichlet_min_redraws_until_every_client_has_enough() {
        let labels: Vec<usize> = (0..456).map(|i| usize::from(i % 3 == 0)).collect();
        let first = super::dirichlet(&labels, 8, 0.1, 1);
        assert_eq!(super::dirichlet_min(&labels, 8, 0.1, 1, 0), first);
        assert!(
            first.iter().any(|c| c.len() < 3),
            "the first draw falls short"
        );
        let p = super::dirichlet_min(&labels, 8, 0.1, 1, 3);
        assert!(
            p.iter().all(|c| c.len() >= 3),
            "{:?}",
            p.iter().map(Vec::len).collect::<Vec<_>>()
        );
        let mut all: Vec<usize> = p.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..456).collect::<Vec<_>>());
    }

    use super::*;

    #[test]
    fn iid_deals_everything_once_and_evenly() {
        let p = iid(103, 10, 1);
        let mut all: Vec<usize> = p.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..103).collect::<Vec<_>>());
        assert!(p.iter().all(|c| c.len() == 10 || c.len() == 11));
        assert_eq!(p, iid(103, 10, 1), "seeded");
    }

    #[test]
    fn dirichlet_skew_grows_as_alpha_shrinks() {
        let labels: Vec<usize> = (0..2000).map(|i| i % 2).collect();
        let skew = |alpha: f64| {
            let p = dirichlet(&labels, 10, alpha, 3);
            let mut all: Vec<usize> = p.iter().flatten().copied().collect();
            all.sort();
            assert_eq!(all, (0..2000).collect::<Vec<_>>(), "a partition");
            // mean over clients of |share of label 1 − 0.5|
            p.iter()
                .filter(|c| !c.is_empty())
                .map(|c| {
                    let ones = c.iter().filter(|&&i| labels[i] == 1).count() as f64;
                    (ones / c.len() as f64 - 0.5).abs()
                })
                .sum::<f64>()
                / 10.0
        };
        assert!(
            skew(0.1) > skew(100.0) + 0.1,
            "{} vs {}",
            skew(0.1),
            skew(100.0)
        );
        assert!(skew(100.0) < 0.05);
    }
}
