//! Secure aggregation's parameters from an operator's few choices (`fedlora coordinator
//! --secure-aggregation [--neighbours K] [--threshold T] [--collusion C]`): a summable codec,
//! uniform weights, k neighbours per client and a Shamir threshold t with `2t > k + c`.

use fedlora_protocol::secagg::SecAggParams;
use fedlora_protocol::{Codec, FederationConfig, Weighting};

use crate::error::{CoordinatorError, Result};

/// What an operator chooses; the rest follows ([`apply_secure`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecureChoice {
    /// Neighbours per client, k (`None`: everyone up to 16 clients per round, else
    /// 2⌈log₂ n⌉ as SecAgg+ suggests; 0 means everyone).
    pub neighbours: Option<usize>,
    /// Shamir threshold, t (`None`: the smallest t with `2t > k + c`).
    pub threshold: Option<usize>,
    /// Colluding clients the round must tolerate, c (default 0).
    pub collusion: usize,
}

/// The default neighbours per client for rounds of `clients_per_round`: everyone (0) up to 16,
/// else 2⌈log₂ n⌉.
pub fn default_neighbours(clients_per_round: usize) -> usize {
    if clients_per_round <= 16 {
        0
    } else {
        2 * (clients_per_round as f64).log2().ceil() as usize
    }
}

/// The smallest Shamir threshold `t` with `2t > k + c` for `k` neighbours and `c` colluding
/// clients: the condition under which a client is safe from a coordinator that shows two
/// views of one round with `c` colluders among its neighbours (the threat model in
/// `fedlora_protocol::secagg`: at most `k + c` share answers over both views). Refused when no
/// `t ≤ k` satisfies it (`c ≥ k`).
pub fn collusion_threshold(k: usize, c: usize) -> Result<usize> {
    let t = (k + c) / 2 + 1;
    if t > k {
        return Err(CoordinatorError::Config(format!(
            "{c} colluding clients cannot be tolerated with {k} neighbours per client: SecAgg+ \
             needs a threshold t ≤ k with 2t > k + c; lower the collusion or raise --neighbours"
        )));
    }
    Ok(t)
}

/// Switches `fed` to secure aggregation as `choice` says. The codec must be summable: the
/// default dense f32 becomes `modular:8:0.25:0.25:N` (N = clients per round, or the buffer in
/// async mode; 8 bits a value);
/// another non-summable codec is refused. Weights become uniform (a masked sum carries no
/// per-client weight). A threshold given by hand must still satisfy `2t > k + c`.
pub fn apply_secure(choice: &SecureChoice, fed: &mut FederationConfig) -> Result<()> {
    if fed.train.codec == Codec::DenseF32 {
        fed.train.codec =
            Codec::from_name(&format!("modular:8:0.25:0.25:{}", fed.sum_size().max(2)))?;
    }
    fed.train.weighting = Weighting::Uniform;
    fed.train.secure = Some(secure_params(choice, fed)?);
    fed.validate()?;
    Ok(())
}

/// The SecAgg+ parameters `choice` gives for `fed`'s summable codec and round size: k as
/// chosen (or [`default_neighbours`]), t as chosen if it covers the collusion, else the
/// smallest that does ([`collusion_threshold`]; with everyone as a neighbour, t = 0: the
/// smallest for each round's actual size, [`SecAggParams::t`]), c as chosen, the codec's modulus, and the stage timeout
/// `fed` already has (30 s by default). Client-level DP's planner uses it too.
pub fn secure_params(choice: &SecureChoice, fed: &FederationConfig) -> Result<SecAggParams> {
    let cfg = |m: String| CoordinatorError::Config(m);
    let Some(modulus_bits) = fed.train.codec.modulus_bits() else {
        return Err(cfg(format!(
            "secure aggregation sums masked integers: codec {} cannot be summed (use \
             --codec modular:B:C:F:W)",
            fed.train.codec.name()
        )));
    };
    let mut params = SecAggParams {
        threshold: 1,
        neighbours: choice
            .neighbours
            .unwrap_or_else(|| default_neighbours(fed.sum_size())),
        modulus_bits,
        collusion: choice.collusion,
        stage_timeout_ms: fed
            .train
            .secure
            .as_ref()
            .map_or(30_000, |s| s.stage_timeout_ms),
    };
    let k = params.k(fed.sum_size());
    let least = collusion_threshold(k, choice.collusion)?;
    if k + 1 < fed.sum_size() && 4 * choice.collusion > k {
        // clients refuse a view whose survivors some c removals could cut in two
        // (`survivors_stay_connected`); with c near k a few honest dropouts already can
        tracing::warn!(
            k,
            c = choice.collusion,
            "more than k/4 colluders with a sparse neighbour graph: honest dropouts will often \
             leave survivors that c removals could cut in two, and clients then refuse the \
             round; raise --neighbours to at least 4c"
        );
    }
    params.threshold = match choice.threshold {
        // everyone is a neighbour: k is the round's actual size less one, which varies under
        // Poisson sampling, so t follows it (the smallest with 2t > k + c in every round)
        None if params.neighbours == 0 => 0,
        None => least,
        Some(t) if (least..=k).contains(&t) => t,
        Some(t) => {
            return Err(cfg(format!(
                "--threshold {t} with k = {k} neighbours and c = {} colluders: SecAgg+ needs \
                 2t > k + c and t ≤ k (the smallest such t is {least})",
                choice.collusion
            )))
        }
    };
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threshold_is_the_smallest_t_with_2t_above_k_plus_c() {
        assert_eq!(collusion_threshold(10, 2).unwrap(), 7);
        for k in 1..40 {
            for c in 0..k {
                let t = collusion_threshold(k, c).unwrap();
                assert!(2 * t > k + c && t <= k, "k {k} c {c} t {t}");
                assert!(t == 1 || 2 * (t - 1) <= k + c, "t {t} is the smallest");
            }
            assert!(collusion_threshold(k, k).is_err());
        }
    }

    /// Issue 34, item 13: 10 clients per round under Poisson sampling; rounds of 4 to 20
    /// (a sample larger than clients_per_round included) all validate, with 2t > k + c.
    #[test]
    fn small_complete_graph_rounds_of_any_sampled_size_validate() {
        let mut fed = FederationConfig {
            clients_per_round: 10,
            min_clients: 4,
            ..FederationConfig::default()
        };
        let c1 = SecureChoice {
            collusion: 1,
            ..Default::default()
        };
        apply_secure(&c1, &mut fed).unwrap();
        let s = fed.train.secure.clone().unwrap();
        for n in 4..=20 {
            s.validate(n).unwrap();
            let (k, t) = (s.k(n), s.t(n));
            assert!(2 * t > k + 1 && t <= k, "n {n}: k {k} t {t}");
        }
    }

    #[test]
    fn secure_rounds_from_one_flag_with_a_threshold_that_covers_the_collusion() {
        let mut fed = FederationConfig {
            clients_per_round: 8,
            min_clients: 6,
            ..FederationConfig::default()
        };
        apply_secure(&SecureChoice::default(), &mut fed).unwrap();
        let s = fed.train.secure.clone().unwrap();
        // 8 clients: everyone is a neighbour (k = 7), t = 4 > 7/2, and t follows the round's
        // actual size
        assert_eq!((s.neighbours, s.threshold), (0, 0));
        assert_eq!((s.k(8), s.t(8)), (7, 4));
        assert_eq!((s.k(11), s.t(11)), (10, 6));
        assert_eq!(Some(s.modulus_bits), fed.train.codec.modulus_bits());
        assert!(fed.train.codec.is_summable());
        assert_eq!(fed.train.weighting, Weighting::Uniform);
        // 100 clients: k = 14 by default; c = 2 gives t = 9
        let mut big = FederationConfig {
            clients_per_round: 100,
            min_clients: 80,
            ..FederationConfig::default()
        };
        let c2 = SecureChoice {
            collusion: 2,
            ..Default::default()
        };
        apply_secure(&c2, &mut big).unwrap();
        let s = big.train.secure.clone().unwrap();
        assert_eq!((s.neighbours, s.threshold), (14, 9));
        // a hand-picked threshold that does not cover c, a c no t can cover, a codec that
        // cannot be summed
        let mut f = big.clone();
        let bad_t = SecureChoice {
            threshold: Some(8),
            collusion: 2,
            neighbours: Some(14),
        };
        assert!(apply_secure(&bad_t, &mut f).is_err());
        let too_many = SecureChoice {
            neighbours: Some(6),
            collusion: 6,
            ..Default::default()
        };
        assert!(apply_secure(&too_many, &mut big.clone()).is_err());
        let mut q8 = FederationConfig::default();
        q8.train.codec = Codec::from_name("q8").unwrap();
        assert!(apply_secure(&SecureChoice::default(), &mut q8).is_err());
    }
}
