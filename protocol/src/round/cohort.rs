//! Async mode with secure aggregation: devices train on their own schedule, announce a
//! finished update, and secure cohorts are opened among the devices holding one.
//!
//! A device that trained in round r announces it ([`Federation::mark_ready`]). While the open
//! buffer has no cohort and at least `buffer` devices are ready (or `min_buffer` once the
//! buffer has waited `round_timeout_ms`), a tick opens a cohort of up to `buffer` of them,
//! stalest first: the buffer's `selected` set, among which the driver runs one SecAgg+
//! session. Each member masks its update scaled by its public staleness weight s(τ)
//! (τ = the buffer's round − r); the unmasked sum divided by Σ s(τ) over the counted members
//! is the buffered update. Devices that become ready during a session wait for the next
//! cohort. Readiness and membership live in memory only: after a restart the open cohort
//! fails (as every secure round does) and devices announce again.

use std::collections::BTreeSet;

use super::{Federation, Phase, Transition};
use crate::error::{Refusal, RefusalCode};
use crate::identity::ClientId;

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
            || self.ready.get(client) == Some(&trained_round)
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
        if trained_round == 0 || trained_round > open.round {
            return Err(Refusal::new(
                RefusalCode::WrongRound,
                format!(
                    "round {trained_round} was not offered (the open buffer is round {})",
                    open.round
                ),
            ));
        }
        let tau = open.round - trained_round;
        if tau > self.config.max_staleness {
            return Err(Refusal::new(
                RefusalCode::TooStale,
                format!(
                    "an update trained in round {trained_round} is {tau} buffers stale; at \
                     most {} are accepted",
                    self.config.max_staleness
                ),
            ));
        }
        if let Some(c) = self.state.contributed.get(client) {
            if trained_round <= c.trained_round {
                return Err(Refusal::new(
                    RefusalCode::DuplicateUpload,
                    format!(
                        "client {client} already has an update trained in round {} counted",
                        c.trained_round
                    ),
                ));
            }
        }
        self.ready.insert(client.to_string(), trained_round);
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
        self.ready.retain(|_, r| *r >= horizon);
        let n = self.ready.len();
        let full = n >= self.config.buffer
            || (now_ms >= open.deadline_ms && n >= self.config.min_buffer());
        if !full {
            return None;
        }
        let mut by_age: Vec<(u64, ClientId)> =
            self.ready.iter().map(|(c, r)| (*r, c.clone())).collect();
        by_age.sort();
        by_age.truncate(self.config.buffer);
        let mut selected = BTreeSet::new();
        for (r, c) in by_age {
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
                self.ready.append(&mut self.cohort);
            }
        }
    }
}
