//! Rényi-DP accountant for (compositions of) the Poisson-subsampled Gaussian mechanism.
//!
//! # Guarantee
//! For the add/remove-one-record relation, Poisson sampling with rate q and Gaussian noise of
//! standard deviation σ·C on a sum of per-record contributions clipped to L2 norm C, the RDP of
//! order α of one step is `log(A_α)/(α − 1)` (Mironov, Talwar & Zhang 2019):
//! - integer α: the exact binomial expansion (`A_α = Σ_k C(α,k) (1−q)^{α−k} q^k e^{(k²−k)/(2σ²)}`);
//! - fractional α: the series of Sec. 3.3 of that paper, summing the **absolute values** of its
//!   terms (as dp-accounting does), which can only overestimate A_α; an order whose series does
//!   not converge within 1000 terms is dropped (its ε is +∞), which can only raise ε.
//!
//! RDP composes additively over steps. The conversion to (ε, δ) is the one dp-accounting and
//! Opacus use (Canonne, Kamath & Steinke 2020, Prop. 12; Asoodeh et al. 2020):
//! `ε = rdp + log1p(−1/α) − log(δ·α)/(α − 1)`, minimised over orders α > 1.01; an order whose
//! RDP satisfies `δ² + expm1(−rdp) > 0` gives ε = 0. Every step is an upper bound, so the
//! reported ε is never below the true ε of the mechanism (checked in the tests against the exact
//! ε at q = 1 and against dp-accounting's PLD accountant).

use serde::{Deserialize, Serialize};

pub use crate::rdp_conversion::rdp_to_epsilon;

use crate::error::DpError;
use crate::event::DpEvent;

/// dp-accounting's default order grid: 1.1, 1.2, …, 10.9, 11, 12, …, 63, 128, 256, 512, 1024.
pub fn default_orders() -> Vec<f64> {
    let mut o: Vec<f64> = (1..100).map(|x| 1.0 + x as f64 / 10.0).collect();
    o.extend((11..64).map(f64::from));
    o.extend([128.0, 256.0, 512.0, 1024.0]);
    o
}

fn log_add(a: f64, b: f64) -> f64 {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    (lo - hi).exp().ln_1p() + hi
}

fn lgamma(x: f64) -> f64 {
    libm::lgamma(x)
}

/// log |C(n, k)| for real n (generalised binomial coefficient).
fn log_comb(n: f64, k: f64) -> f64 {
    lgamma(n + 1.0) - lgamma(k + 1.0) - lgamma(n - k + 1.0)
}

/// log(erfc(x)), accurate also where erfc underflows.
pub fn log_erfc(x: f64) -> f64 {
    let r = libm::erfc(x);
    if r > 1e-300 {
        r.ln()
    } else {
        // Laurent series at infinity: erfc(x) ~ exp(−x² − ½x⁻² + ⅝x⁻⁴ …)/(x√π)
        -std::f64::consts::PI.ln() / 2.0 - x.ln() - x * x - 0.5 * x.powi(-2) + 0.625 * x.powi(-4)
            - 37.0 / 24.0 * x.powi(-6)
            + 353.0 / 64.0 * x.powi(-8)
    }
}

fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let log1mq = (-q).ln_1p();
    let lq = q.ln();
    let mut log_a = f64::NEG_INFINITY;
    for i in 0..=alpha {
        let fi = i as f64;
        let coef = log_comb(alpha as f64, fi) + fi * lq + (alpha as f64 - fi) * log1mq;
        log_a = log_add(log_a, coef + (fi * fi - fi) / (2.0 * sigma * sigma));
    }
    log_a
}

const MAX_FRAC_TERMS: usize = 1000;

fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let mut log_a0 = f64::NEG_INFINITY;
    let mut log_a1 = f64::NEG_INFINITY;
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log1mq = (-q).ln_1p();
    let lq = q.ln();
    let (mut last0, mut last1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let s2 = std::f64::consts::SQRT_2 * sigma;
    for i in 0..MAX_FRAC_TERMS {
        let fi = i as f64;
        let coef = log_comb(alpha, fi);
        let j = alpha - fi;
        let t0 = coef + fi * lq + j * log1mq;
        let t1 = coef + j * lq + fi * log1mq;
        let e0 = 0.5f64.ln() + log_erfc((fi - z0) / s2);
        let e1 = 0.5f64.ln() + log_erfc((z0 - j) / s2);
        let s0 = t0 + (fi * fi - fi) / (2.0 * sigma * sigma) + e0;
        let s1 = t1 + (j * j - j) / (2.0 * sigma * sigma) + e1;
        log_a0 = log_add(log_a0, s0);
        log_a1 = log_add(log_a1, s1);
        let total = log_add(log_a0, log_a1);
        if s0 < last0 && s1 < last1 && s0.max(s1) < total - 30.0 {
            return total;
        }
        last0 = s0;
        last1 = s1;
    }
    f64::INFINITY
}

/// RDP of order `alpha` of one step of the Poisson-subsampled Gaussian mechanism with rate `q`
/// and noise multiplier `sigma` (see the module docs for the guarantee).
pub fn rdp_poisson_gaussian(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if sigma == 0.0 || alpha.is_infinite() {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return alpha / (2.0 * sigma * sigma);
    }
    let log_a = if alpha.fract() == 0.0 {
        log_a_int(q, sigma, alpha as u64)
    } else {
        log_a_frac(q, sigma, alpha)
    };
    log_a / (alpha - 1.0)
}

/// The RDP curve of a Skellam event at integer orders ([`crate::skellam::skellam_rdp`]);
/// +∞ at every order for any other event (never reached: callers match Skellam first).
fn skellam_curve(e: &DpEvent) -> impl Fn(f64) -> f64 {
    let p = match *e {
        DpEvent::Skellam {
            l2_sensitivity,
            l1_sensitivity,
            variance,
        } => Some((l2_sensitivity, l1_sensitivity, variance)),
        _ => None,
    };
    move |a| match p {
        Some((l2, l1, mu)) => crate::skellam::skellam_rdp(a, l2, l1, mu),
        None => f64::INFINITY,
    }
}

/// An RDP accountant: composes [`DpEvent`]s and answers ε for a δ.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new(default_orders())
    }
}

impl RdpAccountant {
    /// An empty accountant over `orders` (each > 1).
    pub fn new(orders: Vec<f64>) -> Self {
        let n = orders.len();
        Self {
            orders,
            rdp: vec![0.0; n],
        }
    }

    fn event_rdp(&self, e: &DpEvent, scale: f64, out: &mut [f64]) -> Result<(), DpError> {
        match e {
            DpEvent::Gaussian { noise_multiplier } => {
                for (o, a) in out.iter_mut().zip(&self.orders) {
                    *o += scale * rdp_poisson_gaussian(1.0, *noise_multiplier, *a);
                }
            }
            DpEvent::Skellam { .. } => {
                let curve = skellam_curve(e);
                for (o, a) in out.iter_mut().zip(&self.orders) {
                    *o += scale * curve(*a);
                }
            }
            DpEvent::PoissonSampled {
                sampling_probability,
                event,
            } => match event.as_ref() {
                DpEvent::Skellam { .. } => {
                    let curve = skellam_curve(event);
                    for (o, a) in out.iter_mut().zip(&self.orders) {
                        *o += scale
                            * crate::skellam::subsampled_rdp(*a, *sampling_probability, &curve);
                    }
                }
                DpEvent::Gaussian { noise_multiplier } => {
                    for (o, a) in out.iter_mut().zip(&self.orders) {
                        *o += scale
                            * rdp_poisson_gaussian(*sampling_probability, *noise_multiplier, *a);
                    }
                }
                other => {
                    return Err(DpError::Unsupported(format!(
                        "Poisson sampling of {other:?}"
                    )))
                }
            },
            DpEvent::SelfComposed { event, count } => {
                self.event_rdp(event, scale * *count as f64, out)?
            }
            DpEvent::Composed(events) => {
                for ev in events {
                    self.event_rdp(ev, scale, out)?;
                }
            }
        }
        Ok(())
    }

    /// Adds `event` to what has been spent.
    pub fn compose(&mut self, event: &DpEvent) -> Result<(), DpError> {
        let mut add = vec![0.0; self.orders.len()];
        self.event_rdp(event, 1.0, &mut add)?;
        for (r, a) in self.rdp.iter_mut().zip(add) {
            *r += a;
        }
        Ok(())
    }

    /// ε at `delta` of everything composed so far, and the order that gave it.
    pub fn epsilon(&self, delta: f64) -> (f64, f64) {
        rdp_to_epsilon(&self.orders, &self.rdp, delta)
    }
}

/// ε of DP-SGD with Poisson rate `q`, noise multiplier `sigma` and `steps` steps at `delta`
/// (RDP accountant, default orders). Returns (ε, optimal order).
pub fn dp_sgd_epsilon(q: f64, sigma: f64, steps: u64, delta: f64) -> Result<(f64, f64), DpError> {
    crate::event::validate(q, Some(sigma), steps, delta)?;
    let mut acc = RdpAccountant::default();
    acc.compose(&DpEvent::dp_sgd(q, sigma, steps))?;
    Ok(acc.epsilon(delta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_subsampling_is_the_gaussian_rdp() {
        assert_eq!(rdp_poisson_gaussian(1.0, 2.0, 3.0), 3.0 / 8.0);
        assert_eq!(rdp_poisson_gaussian(0.0, 2.0, 3.0), 0.0);
    }

    #[test]
    fn integer_orders_match_the_direct_sum() {
        // α = 2: A_2 = (1−q)² + 2q(1−q) + q² e^{1/σ²}
        let (q, s) = (0.1f64, 1.3f64);
        let a2 = (1.0 - q).powi(2) + 2.0 * q * (1.0 - q) + q * q * (1.0 / (s * s)).exp();
        assert!((rdp_poisson_gaussian(q, s, 2.0) - a2.ln()).abs() < 1e-12);
    }

    #[test]
    fn log_erfc_is_continuous_at_the_switch() {
        for x in [1.0, 5.0, 20.0, 26.0, 26.5, 27.0, 40.0] {
            let v = log_erfc(x);
            assert!(v.is_finite());
        }
        let a = log_erfc(26.0);
        let b = -std::f64::consts::PI.ln() / 2.0 - 26f64.ln() - 676.0;
        assert!((a - b).abs() < 1e-3);
    }

    #[test]
    fn epsilon_grows_with_steps_and_shrinks_with_noise() {
        let e1 = dp_sgd_epsilon(0.01, 1.0, 100, 1e-5).unwrap().0;
        let e2 = dp_sgd_epsilon(0.01, 1.0, 1000, 1e-5).unwrap().0;
        let e3 = dp_sgd_epsilon(0.01, 2.0, 1000, 1e-5).unwrap().0;
        assert!(e1 < e2 && e3 < e2);
        assert!(dp_sgd_epsilon(0.0, 1.0, 1, 1e-5).is_err());
        assert!(dp_sgd_epsilon(0.5, 0.0, 1, 1e-5).is_err());
        assert!(dp_sgd_epsilon(0.5, 1.0, 0, 1e-5).is_err());
        assert!(dp_sgd_epsilon(0.5, 1.0, 1, 1.0).is_err());
    }
}
