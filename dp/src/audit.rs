//! The ε lower bound of a one-run privacy audit (Steinke, Nasr and Jagielski 2023, "Privacy
//! Auditing with One (1) Training Run", Theorem 5.2 and its Algorithm in Appendix D).
//!
//! # The experiment
//! `m` canaries are each included in training independently with probability ½. After one
//! training run the auditor scores every canary and guesses "in" for the `k₊` highest scores and
//! "out" for the `k₋` lowest, abstaining on the rest: `r = k₊ + k₋` guesses, `v` of them correct.
//!
//! # The bound
//! If training is (ε, δ)-DP with respect to adding or removing one canary, then
//! `P[v correct] ≤ P[Binomial(r, e^ε / (1 + e^ε)) ≥ v] + 2mδ·α(v)` ([`p_value`]), with `α` the
//! largest average mass of the binomial just below `v`. [`epsilon_lower_bound`] is the largest
//! ε whose p-value for the observed `v` is still below `1 − confidence`: with that confidence,
//! the mechanism is **not** ε-DP for any smaller ε. It can only show leakage, never prove
//! privacy, and it is capped: with all `r` guesses right it is about `ln(r / 3)` at 95 %.
//!
//! Units: ε and δ as in [`crate::DpEvent`] (natural log); counts are canaries.

use crate::error::DpError;

/// ln k! for k = 0..=n.
fn ln_factorials(n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n + 1);
    let mut acc = 0.0f64;
    out.push(0.0);
    for k in 1..=n {
        acc += (k as f64).ln();
        out.push(acc);
    }
    out
}

/// P[Binomial(r, q) = k] for every k = 0..=r (computed in log space).
fn binomial_pmf(r: usize, q: f64) -> Vec<f64> {
    let lf = ln_factorials(r);
    let (lq, l1q) = (q.ln(), (1.0 - q).ln());
    (0..=r)
        .map(|k| {
            let ln_c = lf[r] - lf[k] - lf[r - k];
            let t = |x: f64, n: usize| if n == 0 { 0.0 } else { x * n as f64 };
            (ln_c + t(lq, k) + t(l1q, r - k)).exp()
        })
        .collect()
}

/// The p-value of `v` correct out of `r` guesses among `m` canaries under (ε, δ)-DP: an upper
/// bound on the probability of at least `v` correct guesses if the mechanism were
/// (`epsilon`, `delta`)-DP (Steinke et al. 2023, Algorithm 3).
pub fn p_value(m: usize, r: usize, v: usize, epsilon: f64, delta: f64) -> Result<f64, DpError> {
    if !(v <= r && r <= m) {
        return Err(DpError::InvalidParameter(format!(
            "need correct ≤ guesses ≤ canaries, got {v}, {r}, {m}"
        )));
    }
    if !(epsilon >= 0.0 && epsilon.is_finite() && (0.0..=1.0).contains(&delta)) {
        return Err(DpError::InvalidParameter(format!(
            "ε = {epsilon} must be finite and ≥ 0, δ = {delta} in [0, 1]"
        )));
    }
    let q = 1.0 / (1.0 + (-epsilon).exp());
    let pmf = binomial_pmf(r, q);
    let beta: f64 = pmf[v..].iter().sum();
    let (mut alpha, mut below) = (0.0f64, 0.0f64);
    for i in 1..=v {
        below += pmf[v - i];
        if below > i as f64 * alpha {
            alpha = below / i as f64;
        }
    }
    Ok((beta + alpha * delta * 2.0 * m as f64).min(1.0))
}

/// The ε lower bound at `confidence` (e.g. 0.95) from `v` correct of `r` guesses among `m`
/// canaries, for a claimed δ: the largest ε with [`p_value`] below `1 − confidence`, found by
/// bisection to 1e-6. 0 when even ε = 0 cannot be rejected.
pub fn epsilon_lower_bound(
    m: usize,
    r: usize,
    v: usize,
    delta: f64,
    confidence: f64,
) -> Result<f64, DpError> {
    if !(confidence > 0.0 && confidence < 1.0) {
        return Err(DpError::InvalidParameter(format!(
            "confidence {confidence} must be in (0, 1)"
        )));
    }
    let p = 1.0 - confidence;
    if p_value(m, r, v, 0.0, delta)? >= p {
        return Ok(0.0);
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while p_value(m, r, v, hi, delta)? < p {
        lo = hi;
        hi *= 2.0;
        if hi > 1e4 {
            return Ok(lo);
        }
    }
    while hi - lo > 1e-6 {
        let mid = 0.5 * (lo + hi);
        if p_value(m, r, v, mid, delta)? < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    // from `python3 tools/audit_reference.py`
    const P_1000_100_80_1: f64 = 0.07300911594917775;
    const P_1000_100_60_05: f64 = 0.7175886839094375;
    const P_1000_200_200_5: f64 = 0.2610431139317068;
    const E_1000_100_80: f64 = 0.9553185347467661;
    const E_1000_1000_1000: f64 = 5.782283134758472;
    const E_1000_200_120: f64 = 0.1578795202076435;

    /// Reference values from a direct transcription of the paper's Python (Appendix D) with
    /// `math.comb` binomials (tools/audit_reference.py).
    #[test]
    fn p_values_and_bounds_match_the_papers_algorithm() {
        for (m, r, v, eps, delta, want) in [
            (1000, 100, 80, 1.0, 1e-5, P_1000_100_80_1),
            (1000, 100, 60, 0.5, 1e-5, P_1000_100_60_05),
            (1000, 200, 200, 5.0, 0.0, P_1000_200_200_5),
        ] {
            let got = p_value(m, r, v, eps, delta).unwrap();
            assert!(
                (got - want).abs() <= 1e-9 * want.max(1e-12),
                "p({m},{r},{v},{eps},{delta}) = {got} vs {want}"
            );
        }
        for (m, r, v, delta, want) in [
            (1000, 100, 80, 1e-5, E_1000_100_80),
            (1000, 1000, 1000, 1e-5, E_1000_1000_1000),
            (1000, 200, 120, 1e-5, E_1000_200_120),
        ] {
            let got = epsilon_lower_bound(m, r, v, delta, 0.95).unwrap();
            assert!(
                (got - want).abs() < 1e-4,
                "ε({m},{r},{v}) = {got} vs {want}"
            );
        }
    }

    #[test]
    fn the_bound_grows_with_correct_guesses_is_zero_at_chance_and_is_capped() {
        let b = |v| epsilon_lower_bound(1000, 200, v, 1e-5, 0.95).unwrap();
        assert_eq!(b(100), 0.0, "chance level proves nothing");
        assert!(b(130) > 0.0 && b(150) > b(130) && b(200) > b(150));
        // all guesses right: capped near ln(r / 3) at 95 % (the module's rule of thumb)
        let all = epsilon_lower_bound(1000, 1000, 1000, 0.0, 0.95).unwrap();
        assert!((all - (1000f64 / 3.0).ln()).abs() < 0.5, "{all}");
        assert!(p_value(10, 20, 5, 1.0, 0.0).is_err());
        assert!(epsilon_lower_bound(10, 5, 5, 0.0, 1.0).is_err());
    }
}
