//! Async mode with secure aggregation: devices train on their own schedule, announce a
//! finished update, and secure cohorts are opened among the devices holding one.
//!
//! A device that trained in round r announces it ([`Federation::mark_ready`]). While the open
//! buffer has no cohort and at least `buffer` devices are ready (or `min_buffer` once the
//! buffer has waited `round_timeout_ms`), a tick opens a cohort of up to `buffer` of them, in
//! the order they announced: the buffer's `selected` set, among which the driver runs one
//! SecAgg+ session. Each member masks its update scaled by its staleness weight s(τ)
//! (τ = the buffer's round − r), which it computes itself from the weighting its offer carried;
//! the unmasked sum divided by Σ s(τ) over the counted members is the buffered update. Devices
//! that become ready during a session wait for the next cohort; a device that disconnects
//! leaves the queue. Readiness and membership live in memory only: after a restart the open
//! cohort fails (as every secure round does) and devices announce again. A failed cohort does
//! not count toward `max_failed_rounds`.

use std::collections::BTreeSet;

use sha2::Digest;

use super::{Federation, Phase, Transition};
use crate::codec::Codec;
use crate::error::{Refusal, RefusalCode};
use crate::identity::ClientId;
use crate::staleness::StalenessPlan;

/// The staleness weight a cohort member masks its update with: its own s(τ) from `plan`
/// (τ = `cohort_round` − `trained_round`), checked against the weight the coordinator named
/// (`told`) and against the member's floor. Refused: τ past the plan's S, a weight below
/// `floor`, or a `told` weight that is not s(τ) (a coordinator weighing members as it likes
/// could scale every other member's update to nothing).
pub fn cohort_weight(
    plan: &StalenessPlan,
    cohort_round: u64,
    trained_round: u64,
    told: f64,
    floor: f64,
) -> Result<f64, String> {
    let tau = cohort_round
        .checked_sub(trained_round)
        .ok_or("a cohort before the round the update trained in")?;
    if tau > plan.max_staleness {
        return Err(format!(
            "the update is {tau} buffers stale; the plan takes at most {}",
            plan.max_staleness
        ));
    }
    let w = plan.weight.weight(tau);
    if !(w >= floor && w <= 1.0) {
        return Err(format!(
            "staleness weight {w} is below this client's floor {floor}"
        ));
    }
    if !(told.is_finite() && (w - told).abs() <= 1e-12) {
        return Err(format!(
            "the coordinator weighs this update {told}; s({tau}) is {w}"
        ));
    }
    Ok(w)
}

/// What every member of a secure cohort binds into the consistency message it signs
/// ([`crate::secagg::ClientRound::bind`]): SHA-256 over the codec, the cohort's codec seed and
/// the staleness weighting. Members shown different ones get no unmask shares from each other.
pub fn cohort_context(codec: &Codec, plan: &StalenessPlan, codec_seed: u64) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    h.update(b"fedlora async cohort v1\0");
    h.update(codec.name().as_bytes());
    h.update(b"\0");
    h.update(codec_seed.to_le_bytes());
    h.update(plan.weight.to_string().as_bytes());
    h.update(b"\0");
    h.update(plan.max_staleness.to_le_bytes());
    h.finalize().into()
}

/// A cohort's context together with its client-level DP plan's digest
/// ([`crate::client_dp::plan_digest`]): what members of a distributed-DP cohort bind, so all of
/// them saw the same plan as well as the same codec, seed and weighting.
pub fn cohort_plan_context(context: &[u8; 32], plan_digest: &[u8; 32]) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    h.update(b"fedlora async cohort with client-dp plan v1\0");
    h.update(context);
    h.update(plan_digest);
    h.finalize().into()
}

impl Federation {
    /// Async mode with secure aggregation (updates are summed in cohorts).
    pub fn is_secure_async(&self) -> bool {
        self.is_async() && self.config.train.secure.is_some()
    }

    /// Records that `client` holds a finished update trained in `trained_round` and may join
    /// the next cohort. Idempotent for a device already ready or in the open cohort.
    ///
    /// Refused: outside secure async mode or a round not offered (`WrongRound`), an update more
    /// than `max_staleness` buffers old (`TooStale`), one trained at or before the device's
    /// last counted round (`DuplicateUpload`), and while a version is being committed or the
    /// next buffer opens (`RetryLater`).
    pub fn mark_ready(&mut self, client: &str, trained_round: u64) -> Result<(), Refusal> {
        if !self.is_secure_async() {
            return Err(Refusal::new(
                RefusalCode::WrongRound,
                "this federation has no secure cohorts: upload the update",
            ));
        }
        if self.cohort.get(client) == Some(&trained_round)
            || self.ready.get(client).map(|r| r.0) == Some(trained_round)
        {
            return Ok(());
        }
        let open = match &self.state.phase {
            Phase::Training(open) => open,
            Phase::Waiting { .. } => {
                return Err(Refusal::new(
                    RefusalCode::RetryLater,
                    "the next buffer is opening; announce it again shortly",
                ))
            }
            _ => {
                return Err(Refusal::new(
                    RefusalCode::WrongRound,
                    "the campaign has committed its last version",
                ))
            }
        };
        if self.cohort.contains_key(client) {
            return Err(Refusal::new(
                RefusalCode::DuplicateUpload,
                format!("client {client} is in the cohort of round {}", open.round),
            ));
        }
        self.check_trained_round(client, trained_round, open.round)?;
        self.announced += 1;
        self.ready
            .insert(client.to_string(), (trained_round, self.announced));
        self.offered.remove(client);
        Ok(())
    }

    /// The open cohort's member `client`: the round its update trained in and its staleness
    /// weight s(τ) in the cohort's round.
    pub fn cohort_member(&self, client: &str) -> Option<(u64, f64)> {
        let trained = *self.cohort.get(client)?;
        let Phase::Training(open) = &self.state.phase else {
            return None;
        };
        let w = self
            .config
            .staleness
            .weight(open.round.saturating_sub(trained));
        Some((trained, w))
    }

    /// Devices waiting for a cohort.
    pub fn ready(&self) -> usize {
        self.ready.len()
    }

    /// Secure async mode's tick of an open buffer: opens a cohort when enough devices are
    /// ready (see the module docs); `None` while a session runs or too few are ready.
    pub(super) fn tick_cohort(&mut self, now_ms: u64) -> Option<Transition> {
        let Phase::Training(open) = &mut self.state.phase else {
            return None;
        };
        if !open.selected.is_empty() {
            return None;
        }
        // devices whose update is now too stale drop out (they are refused when they ask)
        let horizon = open.round.saturating_sub(self.config.max_staleness);
        self.ready.retain(|_, r| r.0 >= horizon);
        let n = self.ready.len();
        let full = n >= self.config.buffer
            || (now_ms >= open.deadline_ms && n >= self.config.min_buffer());
        if !full {
            return None;
        }
        // first announced, first in (a device cannot jump the queue by claiming an older
        // round)
        let mut queue: Vec<(u64, u64, ClientId)> = self
            .ready
            .iter()
            .map(|(c, (r, order))| (*order, *r, c.clone()))
            .collect();
        queue.sort();
        queue.truncate(self.config.buffer);
        let mut selected = BTreeSet::new();
        for (_, r, c) in queue {
            self.ready.remove(&c);
            self.cohort.insert(c.clone(), r);
            selected.insert(c);
        }
        open.selected = selected.clone();
        Some(Transition::RoundStarted {
            round: open.round,
            selected,
        })
    }

    /// Takes back a cohort whose start could not be stored: its members are ready again.
    pub fn retract_cohort(&mut self, round: u64) {
        if let Phase::Training(open) = &mut self.state.phase {
            if open.round == round && open.uploads.is_empty() {
                open.selected.clear();
                for (c, r) in std::mem::take(&mut self.cohort) {
                    self.announced += 1;
                    self.ready.insert(c, (r, self.announced));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> StalenessPlan {
        StalenessPlan {
            weight: "poly:0.5".parse().unwrap(),
            max_staleness: 3,
        }
    }

    /// A member masks with its own s(τ): the coordinator's number must match it, τ must be
    /// within S, and the weight at least the member's floor.
    #[test]
    fn a_member_computes_its_own_weight_and_refuses_the_coordinators_if_it_differs() {
        let p = plan();
        let s1 = p.weight.weight(1);
        assert_eq!(cohort_weight(&p, 5, 4, s1, 0.1), Ok(s1));
        // the attack: every other member told a weight near 0
        assert!(cohort_weight(&p, 5, 4, 1e-300, 0.1).is_err());
        // a weight that is not a number is not s(τ) either
        assert!(cohort_weight(&p, 5, 4, f64::NAN, 0.1).is_err());
        assert!(cohort_weight(&p, 5, 5, 0.5, 0.1).is_err());
        // past S, and a cohort before the training round
        assert!(cohort_weight(&p, 9, 4, p.weight.weight(5), 0.0).is_err());
        assert!(cohort_weight(&p, 3, 4, 1.0, 0.1).is_err());
        // a floor above s(τ)
        assert!(cohort_weight(&p, 7, 4, p.weight.weight(3), 0.6).is_err());
    }

    #[test]
    fn the_cohort_context_changes_with_the_codec_the_seed_and_the_weighting() {
        let p = plan();
        let codec = Codec::Modular(crate::codec::ModularParams::default());
        let base = cohort_context(&codec, &p, 7);
        assert_eq!(base, cohort_context(&codec, &p, 7));
        assert_ne!(base, cohort_context(&codec, &p, 8));
        assert_ne!(
            base,
            cohort_context(
                &Codec::Modular(crate::codec::ModularParams {
                    clamp: 1e30,
                    ..Default::default()
                }),
                &p,
                7
            )
        );
        let q = StalenessPlan {
            weight: "constant".parse().unwrap(),
            ..p
        };
        assert_ne!(base, cohort_context(&codec, &q, 7));
        let r = StalenessPlan {
            max_staleness: 4,
            ..p
        };
        assert_ne!(base, cohort_context(&codec, &r, 7));
    }
}
