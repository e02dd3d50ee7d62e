//! From Rényi DP to (ε, δ)-DP: the conversion every RDP accountant here ends with (the
//! Gaussian one in [`crate::rdp`], the Skellam one in [`crate::skellam`]).
//!
//! The conversion is the one dp-accounting and Opacus use (Canonne, Kamath & Steinke 2020,
//! Prop. 12; Asoodeh et al. 2020): `ε = rdp + log1p(−1/α) − log(δ·α)/(α − 1)`, minimised over
//! orders α > 1.01; an order whose RDP satisfies `δ² + expm1(−rdp) > 0` gives ε = 0. It is an
//! upper bound: the ε it reports is never below the true ε of a mechanism with those RDP values.
//! Unit: ε and δ are those of the relation the RDP values were computed for (add/remove one
//! record for DP-SGD, one client for client-level DP).

/// (ε, optimal order) from RDP values at `orders`, for `delta` (see the module docs).
/// `orders` and `rdp` are paired; an order ≤ 1.01 is skipped. Returns (+∞, first order) when
/// no order gives a finite ε.
pub fn rdp_to_epsilon(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    let mut best = (f64::INFINITY, orders.first().copied().unwrap_or(0.0));
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, a);
        }
    }
    (best.0.max(0.0), best.1)
}
