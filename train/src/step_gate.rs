//! The gate every local training loop passes before each step: it stops training when the
//! device becomes ineligible ([`crate::eligibility`]), when the round's deadline would pass, or
//! when the device's cap on training seconds is reached.
//!
//! The SDK opens a gate around one round's training ([`run`]) on the thread that trains; the
//! shared loops ([`crate::train::plain_train_steps`], [`crate::dp_sgd::dp_train_steps`]) ask
//! [`proceed`] before each step. A loop outside a gate (tests, simulations, benches) always
//! proceeds. Your own [`crate::learner::Learner`] can call [`proceed`] in its loop the same way.
//!
//! Stopping early is safe for privacy: DP-SGD's accountant was charged for every planned step
//! before training started, and a run of fewer steps releases less.

use std::cell::RefCell;
use std::time::Instant;

use crate::eligibility::{Ineligible, SharedEligibility};

/// Why training stopped before its planned steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The device became ineligible.
    Ineligible(Ineligible),
    /// The next step would end after the time allowed (the round's deadline less the upload's
    /// margin, or the cap on training seconds).
    OutOfTime,
}

/// What one gate allows.
#[derive(Clone, Default)]
pub struct Gate {
    /// Checked before each step (`None`: always eligible).
    pub eligibility: Option<SharedEligibility>,
    /// No step may end after this instant (`None`: no limit).
    pub until: Option<Instant>,
}

/// What happened at a gate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GateOutcome {
    /// Steps the gate let start.
    pub steps: u32,
    /// Why it closed early, if it did.
    pub stopped: Option<Stop>,
}

struct Open {
    gate: Gate,
    started: Instant,
    outcome: GateOutcome,
}

thread_local! {
    static GATE: RefCell<Option<Open>> = const { RefCell::new(None) };
}

/// Runs `f` (one round's training, on this thread) behind `gate`.
pub fn run<T>(gate: Gate, f: impl FnOnce() -> T) -> (T, GateOutcome) {
    GATE.with(|g| {
        *g.borrow_mut() = Some(Open {
            gate,
            started: Instant::now(),
            outcome: GateOutcome::default(),
        })
    });
    let out = f();
    let outcome = GATE.with(|g| g.borrow_mut().take().map(|o| o.outcome).unwrap_or_default());
    (out, outcome)
}

/// Whether the next step may start: `false` once the device is ineligible or the step would
/// end past the time allowed (its length estimated as the mean of the steps so far). Always
/// `true` outside a gate. Once it says `false`, it keeps saying so.
pub fn proceed() -> bool {
    GATE.with(|g| {
        let mut g = g.borrow_mut();
        let Some(open) = g.as_mut() else {
            return true;
        };
        if open.outcome.stopped.is_some() {
            return false;
        }
        if let Some(until) = open.gate.until {
            let now = Instant::now();
            let steps = open.outcome.steps;
            let mean = (steps > 0).then(|| (now - open.started) / steps);
            if now >= until || mean.is_some_and(|m| now + m > until) {
                open.outcome.stopped = Some(Stop::OutOfTime);
                return false;
            }
        }
        if let Some(e) = &open.gate.eligibility {
            if let Err(why) = e.check() {
                open.outcome.stopped = Some(Stop::Ineligible(why));
                return false;
            }
        }
        open.outcome.steps += 1;
        true
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    fn steps(n: u32) -> u32 {
        let mut done = 0;
        for _ in 0..n {
            if !proceed() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
            done += 1;
        }
        done
    }

    #[test]
    fn outside_a_gate_every_step_proceeds() {
        assert_eq!(steps(5), 5);
    }

    #[test]
    fn a_gate_stops_when_the_device_becomes_ineligible() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let e: SharedEligibility = Arc::new(move || {
            if c.fetch_add(1, Ordering::SeqCst) >= 3 {
                Err(Ineligible::OnBattery)
            } else {
                Ok(())
            }
        });
        let gate = Gate {
            eligibility: Some(e),
            until: None,
        };
        let (done, out) = run(gate, || steps(10));
        assert_eq!(done, 3);
        assert_eq!(
            out,
            GateOutcome {
                steps: 3,
                stopped: Some(Stop::Ineligible(Ineligible::OnBattery))
            }
        );
        // the gate is gone after the run
        assert_eq!(steps(2), 2);
    }

    #[test]
    fn a_gate_does_not_start_a_step_that_would_end_past_its_time() {
        let gate = Gate {
            eligibility: None,
            until: Some(Instant::now() + Duration::from_millis(55)),
        };
        let (done, out) = run(gate, || steps(100));
        // ~10 ms steps: at most 5 fit in 55 ms, and the estimate stops it before the deadline
        assert!((1..=5).contains(&done), "{done}");
        assert_eq!(out.steps, done);
        assert_eq!(out.stopped, Some(Stop::OutOfTime));
        let (done, out) = run(
            Gate {
                eligibility: None,
                until: Some(Instant::now()),
            },
            || steps(3),
        );
        assert_eq!(
            (done, out.steps, out.stopped),
            (0, 0, Some(Stop::OutOfTime))
        );
    }
}
