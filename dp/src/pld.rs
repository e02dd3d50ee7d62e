//! Privacy loss distributions (PLD): the tighter accountant, as dp-accounting's PLDAccountant.
//!
//! # Guarantee
//! For a pair of output distributions (P, Q) of neighbouring inputs, the privacy loss
//! `L = log(p(o)/q(o))`, `o ~ P`, determines the hockey-stick divergence
//! `δ(ε) = P[L = ∞] + E[(1 − e^{ε−L})₊]`, and the losses of composed mechanisms add, so the PLD of
//! T steps is the T-fold convolution of one step's. This module discretises one step's loss on a
//! grid of width `h` **rounding every loss up** (and putting the far upper tail at +∞, the far
//! lower tail in the lowest kept bin), which can only increase δ(ε): the result is an upper
//! bound ("pessimistic estimate"). Compositions are FFT convolutions by binary exponentiation,
//! with tails below 1e-15 moved the same pessimistic way.
//!
//! The add/remove-one neighbouring relation is covered by analysing both directions of the
//! Poisson-subsampled Gaussian (remove: P = (1−q)N(0,σ²) + qN(1,σ²), Q = N(0,σ²); add: the
//! reverse) and reporting the larger ε. Sensitivity 1 (the clip norm C), noise std σ.

use rustfft::num_complex::Complex64;
use rustfft::FftPlanner;

use crate::error::DpError;
use crate::event::DpEvent;

/// Default loss discretisation, nats (dp-accounting's PLDAccountant default).
pub const DEFAULT_INTERVAL: f64 = 1e-4;
/// Tail mass moved into the boundary bins (pessimistically) after each convolution.
const TAIL: f64 = 1e-15;

fn phi(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// A discrete privacy loss distribution: mass `pmf[i]` at loss `(offset + i)·h`, plus mass at
/// +∞.
#[derive(Clone, Debug)]
pub struct Pld {
    h: f64,
    offset: i64,
    pmf: Vec<f64>,
    inf_mass: f64,
}

#[derive(Clone, Copy, PartialEq)]
enum Direction {
    Remove,
    Add,
}

impl Pld {
    /// The identity (no privacy loss).
    pub fn identity(h: f64) -> Self {
        Self {
            h,
            offset: 0,
            pmf: vec![1.0],
            inf_mass: 0.0,
        }
    }

    /// One step of the Poisson-subsampled Gaussian (`q = 1`: plain Gaussian) in one direction.
    fn subsampled_gaussian(q: f64, sigma: f64, dir: Direction, h: f64) -> Self {
        let s2 = sigma * sigma;
        // P's CDF and the loss → x map (losses are monotone in x)
        let mix_cdf = |x: f64| (1.0 - q) * phi(x / sigma) + q * phi((x - 1.0) / sigma);
        let n_cdf = |x: f64| phi(x / sigma);
        // l(x) = log((1−q) + q·exp((2x−1)/(2σ²))) for remove; the negative for add
        let lx = |x: f64| ((1.0 - q) + q * ((2.0 * x - 1.0) / (2.0 * s2)).exp()).ln();
        let z = 9.0; // tails beyond 9σ have mass < 1e-19
        let (xlo, xhi) = (-z * sigma, 1.0 + z * sigma);
        let (llo, lhi) = match dir {
            Direction::Remove => (lx(xlo), lx(xhi)),
            Direction::Add => (-lx(xhi), -lx(xlo)),
        };
        let kmin = (llo / h).floor() as i64;
        let kmax = (lhi / h).ceil() as i64;
        // x where the loss equals t
        let x_of = |t: f64| -> f64 {
            let u = match dir {
                Direction::Remove => t.exp(),
                Direction::Add => (-t).exp(),
            } - (1.0 - q);
            if u <= 0.0 {
                return match dir {
                    Direction::Remove => f64::NEG_INFINITY,
                    Direction::Add => f64::INFINITY,
                };
            }
            s2 * (u / q).ln() + 0.5
        };
        // P[L ≤ t]
        let cdf_loss = |t: f64| -> f64 {
            match dir {
                Direction::Remove => mix_cdf(x_of(t)),
                Direction::Add => 1.0 - n_cdf(x_of(t)),
            }
        };
        let mut pmf = Vec::with_capacity((kmax - kmin + 1) as usize);
        let mut prev = 0.0; // everything at or below kmin·h goes to bin kmin (rounded up)
        for k in kmin..=kmax {
            let c = if k == kmax {
                cdf_loss(lhi)
            } else {
                cdf_loss(k as f64 * h)
            };
            pmf.push((c - prev).max(0.0));
            prev = c;
        }
        let total: f64 = pmf.iter().sum();
        Self {
            h,
            offset: kmin,
            pmf,
            inf_mass: (1.0 - total).max(0.0),
        }
    }

    fn convolve(&self, other: &Pld) -> Pld {
        let n = self.pmf.len() + other.pmf.len() - 1;
        let size = n.next_power_of_two();
        let mut planner = FftPlanner::<f64>::new();
        let fft = planner.plan_fft_forward(size);
        let ifft = planner.plan_fft_inverse(size);
        let padded = |pmf: &[f64]| -> Vec<Complex64> {
            pmf.iter()
                .map(|&v| Complex64::new(v, 0.0))
                .chain(std::iter::repeat(Complex64::new(0.0, 0.0)))
                .take(size)
                .collect()
        };
        let mut a = padded(&self.pmf);
        let mut b = padded(&other.pmf);
        fft.process(&mut a);
        fft.process(&mut b);
        for (x, y) in a.iter_mut().zip(&b) {
            *x *= y;
        }
        ifft.process(&mut a);
        let pmf: Vec<f64> = a[..n]
            .iter()
            .map(|c| (c.re / size as f64).max(0.0))
            .collect();
        let inf_mass = 1.0 - (1.0 - self.inf_mass) * (1.0 - other.inf_mass);
        let mut out = Pld {
            h: self.h,
            offset: self.offset + other.offset,
            pmf,
            inf_mass,
        };
        out.truncate();
        out
    }

    /// Moves negligible tails pessimistically: the lower tail into the lowest kept bin, the
    /// upper tail to +∞.
    fn truncate(&mut self) {
        let mut lo = 0;
        let mut acc = 0.0;
        while lo + 1 < self.pmf.len() && acc + self.pmf[lo] < TAIL {
            acc += self.pmf[lo];
            lo += 1;
        }
        let mut hi = self.pmf.len();
        let mut up = 0.0;
        while hi > lo + 1 && up + self.pmf[hi - 1] < TAIL {
            up += self.pmf[hi - 1];
            hi -= 1;
        }
        let mut pmf = self.pmf[lo..hi].to_vec();
        pmf[0] += acc;
        self.offset += lo as i64;
        self.inf_mass += up;
        self.pmf = pmf;
    }

    /// This PLD composed with itself `count` times.
    pub fn self_compose(&self, mut count: u64) -> Pld {
        let mut result = Pld::identity(self.h);
        let mut base = self.clone();
        while count > 0 {
            if count & 1 == 1 {
                result = result.convolve(&base);
            }
            count >>= 1;
            if count > 0 {
                base = base.convolve(&base);
            }
        }
        result
    }

    /// δ(ε) of this distribution.
    pub fn delta(&self, eps: f64) -> f64 {
        let mut d = self.inf_mass;
        for (i, &m) in self.pmf.iter().enumerate() {
            let l = (self.offset + i as i64) as f64 * self.h;
            if l > eps {
                d += m * (1.0 - (eps - l).exp());
            }
        }
        d
    }

    /// The smallest ε ≥ 0 with δ(ε) ≤ `delta` (to 1e-9); +∞ if the mass at +∞ exceeds δ.
    pub fn epsilon(&self, delta: f64) -> f64 {
        if self.inf_mass > delta {
            return f64::INFINITY;
        }
        if self.delta(0.0) <= delta {
            return 0.0;
        }
        let mut hi = (self.offset + self.pmf.len() as i64) as f64 * self.h;
        let mut lo = 0.0;
        while hi - lo > 1e-9 {
            let mid = 0.5 * (lo + hi);
            if self.delta(mid) > delta {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi
    }
}

fn event_pld(e: &DpEvent, dir: Direction, h: f64) -> Result<Pld, DpError> {
    Ok(match e {
        DpEvent::Gaussian { noise_multiplier } => {
            Pld::subsampled_gaussian(1.0 - 1e-12, *noise_multiplier, dir, h)
        }
        DpEvent::PoissonSampled {
            sampling_probability,
            event,
        } => match event.as_ref() {
            DpEvent::Gaussian { noise_multiplier } => Pld::subsampled_gaussian(
                sampling_probability.min(1.0 - 1e-12),
                *noise_multiplier,
                dir,
                h,
            ),
            other => {
                return Err(DpError::Unsupported(format!(
                    "Poisson sampling of {other:?}"
                )))
            }
        },
        DpEvent::Skellam { .. } => {
            return Err(DpError::Unsupported(
                "the PLD accountant has no Skellam mechanism: use the RDP accountant".into(),
            ))
        }
        DpEvent::SelfComposed { event, count } => event_pld(event, dir, h)?.self_compose(*count),
        DpEvent::Composed(events) => {
            let mut acc = Pld::identity(h);
            for ev in events {
                acc = acc.convolve(&event_pld(ev, dir, h)?);
            }
            acc
        }
    })
}

/// ε at `delta` of `event` under add/remove-one neighbours (the larger of both directions), PLD
/// accountant with loss discretisation `interval`.
pub fn epsilon(event: &DpEvent, delta: f64, interval: f64) -> Result<f64, DpError> {
    let r = event_pld(event, Direction::Remove, interval)?.epsilon(delta);
    let a = event_pld(event, Direction::Add, interval)?.epsilon(delta);
    Ok(r.max(a))
}

/// ε of DP-SGD (Poisson rate `q`, noise multiplier `sigma`, `steps` steps) at `delta`, PLD
/// accountant with the default discretisation.
pub fn dp_sgd_epsilon(q: f64, sigma: f64, steps: u64, delta: f64) -> Result<f64, DpError> {
    crate::event::validate(q, Some(sigma), steps, delta)?;
    epsilon(&DpEvent::dp_sgd(q, sigma, steps), delta, DEFAULT_INTERVAL)
}

/// The smallest σ (to 1e-3, rounded up) keeping DP-SGD within `target_epsilon` under the PLD
/// accountant. The search starts at σ = 0.05 (below it the loss grid explodes); a smaller true
/// answer is returned as 0.05, i.e. with more noise than needed.
pub fn noise_multiplier(
    q: f64,
    steps: u64,
    delta: f64,
    target_epsilon: f64,
) -> Result<f64, DpError> {
    crate::calibrate::smallest_sigma(q, steps, delta, target_epsilon, 0.05, |s| {
        dp_sgd_epsilon(q, s, steps, delta)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_matches_the_exact_curve() {
        // q = 1: the PLD of one Gaussian step is exact up to discretisation
        for (sigma, steps) in [(1.0, 1u64), (2.0, 10), (4.0, 100)] {
            let exact = crate::analytic::gaussian_epsilon(sigma, steps, 1e-5).unwrap();
            let ev = DpEvent::SelfComposed {
                event: Box::new(DpEvent::Gaussian {
                    noise_multiplier: sigma,
                }),
                count: steps,
            };
            let got = epsilon(&ev, 1e-5, 1e-4).unwrap();
            assert!(got >= exact - 1e-9, "pessimistic: {got} < {exact}");
            assert!(got <= exact + 2e-3 * steps as f64, "{got} vs {exact}");
        }
    }
}
