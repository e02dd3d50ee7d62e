//! A client's privacy budget across a federation campaign.
//!
//! The ledger holds the client's target (ε, δ), the DP-SGD plan it calibrated σ for, and every
//! step it has taken. ε spent is never refunded — also when a round it trained for later fails.
//! It is plain serde data: the client persists it in its state directory and flushes it before an
//! upload leaves the device.

use serde::{Deserialize, Serialize};

use crate::error::DpError;
use crate::event::DpEvent;
use crate::rdp::RdpAccountant;

/// One recorded use of the data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Round the steps belonged to.
    pub round: u64,
    /// What ran (example-level events; a client-level event can be recorded the same way).
    pub event: DpEvent,
}

/// Which accountant turns the ledger's events into ε.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accountant {
    /// Rényi DP ([`crate::rdp`]).
    #[default]
    Rdp,
    /// Privacy loss distributions ([`crate::pld`], discretisation 1e-4): tighter, slower.
    Pld,
}

impl Accountant {
    /// ε at `delta` of `event` under this accountant.
    pub fn epsilon(self, event: &DpEvent, delta: f64) -> Result<f64, DpError> {
        match self {
            Accountant::Rdp => {
                let mut acc = RdpAccountant::default();
                acc.compose(event)?;
                Ok(acc.epsilon(delta).0)
            }
            Accountant::Pld => crate::pld::epsilon(event, delta, crate::pld::DEFAULT_INTERVAL),
        }
    }

    /// The smallest σ (1e-3, rounded up) for DP-SGD within `target` under this accountant.
    pub fn noise_multiplier(
        self,
        q: f64,
        steps: u64,
        delta: f64,
        target: f64,
    ) -> Result<f64, DpError> {
        match self {
            Accountant::Rdp => crate::calibrate::noise_multiplier(q, steps, delta, target),
            Accountant::Pld => crate::pld::noise_multiplier(q, steps, delta, target),
        }
    }
}

/// The budget of one client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacyLedger {
    /// Target ε for the whole campaign.
    pub target_epsilon: f64,
    /// δ of the guarantee.
    pub delta: f64,
    /// The accountant that computes ε spent.
    #[serde(default)]
    pub accountant: Accountant,
    /// Everything spent, in order.
    pub entries: Vec<LedgerEntry>,
}

impl PrivacyLedger {
    /// An empty ledger for (target_epsilon, delta).
    pub fn new(target_epsilon: f64, delta: f64) -> Result<Self, DpError> {
        let valid = target_epsilon > 0.0 && delta > 0.0 && delta < 1.0;
        if !valid {
            return Err(DpError::InvalidParameter(format!(
                "target ε = {target_epsilon} must be > 0 and δ = {delta} in (0, 1)"
            )));
        }
        Ok(Self {
            target_epsilon,
            delta,
            accountant: Accountant::Rdp,
            entries: Vec::new(),
        })
    }

    fn epsilon_with(&self, extra: Option<&DpEvent>) -> Result<f64, DpError> {
        let events = merge_repeats(self.entries.iter().map(|e| &e.event).chain(extra));
        if events.is_empty() {
            return Ok(0.0);
        }
        self.accountant
            .epsilon(&DpEvent::Composed(events), self.delta)
    }

    /// ε spent so far at the ledger's δ.
    pub fn epsilon_spent(&self) -> Result<f64, DpError> {
        self.epsilon_with(None)
    }

    /// Whether running `next` would take the campaign past the target ε.
    pub fn would_exceed(&self, next: &DpEvent) -> Result<bool, DpError> {
        Ok(self.epsilon_with(Some(next))? > self.target_epsilon)
    }

    /// Records `event` for `round`, refusing it if it would exceed the target.
    pub fn spend(&mut self, round: u64, event: DpEvent) -> Result<f64, DpError> {
        let after = self.epsilon_with(Some(&event))?;
        if after > self.target_epsilon {
            return Err(DpError::BudgetExceeded {
                spent: self.epsilon_spent()?,
                would_be: after,
                target: self.target_epsilon,
            });
        }
        self.entries.push(LedgerEntry { round, event });
        Ok(after)
    }
}

/// The same composition with repeats of one mechanism merged: `SelfComposed(e, a)` and
/// `SelfComposed(e, b)` become `SelfComposed(e, a + b)` (exact: both are e run a + b times, and
/// composition does not depend on order). A campaign of rounds with the same (q, σ) is then one
/// event, so a ledger query costs the same after 1 round as after 1000.
fn merge_repeats<'a>(events: impl Iterator<Item = &'a DpEvent>) -> Vec<DpEvent> {
    let mut out: Vec<DpEvent> = Vec::new();
    for e in events {
        if let DpEvent::SelfComposed { event, count } = e {
            let same = out.iter_mut().find_map(|o| match o {
                DpEvent::SelfComposed {
                    event: inner,
                    count: c,
                } if inner == event => Some(c),
                _ => None,
            });
            if let Some(c) = same {
                *c += count;
                continue;
            }
        }
        out.push(e.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_repeated_rounds_does_not_change_epsilon() {
        let round = DpEvent::dp_sgd(0.05, 1.1, 20);
        let other = DpEvent::dp_sgd(0.1, 1.1, 5);
        let events = [round.clone(), other.clone(), round.clone(), round];
        let merged = merge_repeats(events.iter());
        assert_eq!(merged.len(), 2);
        for acc in [Accountant::Rdp, Accountant::Pld] {
            let a = acc
                .epsilon(&DpEvent::Composed(events.to_vec()), 1e-5)
                .unwrap();
            let b = acc
                .epsilon(&DpEvent::Composed(merged.clone()), 1e-5)
                .unwrap();
            assert!((a - b).abs() <= 1e-9 * a, "{acc:?}: {a} vs {b}");
        }
        let by_steps = Accountant::Rdp
            .epsilon(&DpEvent::dp_sgd(0.05, 1.1, 60), 1e-5)
            .unwrap();
        let merged_rdp = Accountant::Rdp
            .epsilon(
                &DpEvent::Composed(merge_repeats(
                    vec![DpEvent::dp_sgd(0.05, 1.1, 20); 3].iter(),
                )),
                1e-5,
            )
            .unwrap();
        assert_eq!(by_steps, merged_rdp);
    }

    #[test]
    fn refuses_the_round_that_would_exceed_and_survives_serialisation() {
        let sigma = crate::calibrate::noise_multiplier(0.05, 3 * 20, 1e-5, 2.0).unwrap();
        let round = DpEvent::dp_sgd(0.05, sigma, 20);
        let mut l = PrivacyLedger::new(2.0, 1e-5).unwrap();
        for r in 1..=3 {
            assert!(!l.would_exceed(&round).unwrap());
            l.spend(r, round.clone()).unwrap();
        }
        assert!(l.epsilon_spent().unwrap() <= 2.0);
        assert!(l.would_exceed(&round).unwrap());
        let json = serde_json::to_string(&l).unwrap();
        let mut back: PrivacyLedger = serde_json::from_str(&json).unwrap();
        assert!(matches!(
            back.spend(4, round),
            Err(DpError::BudgetExceeded { .. })
        ));
        assert_eq!(back.entries.len(), 3);
    }
}
