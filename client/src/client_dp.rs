//! A client's own record of its client-level DP rounds: the plans it took part under and the
//! rounds it took part in, kept in its state directory and written **before** anything that
//! the round charges leaves the device: a central-mode upload, or a distributed-mode masked
//! input (the coordinator can unmask it with the neighbours' shares alone, so the client is
//! charged whether or not it answers the unmask stage; a round that aborts before any unmask
//! share was sent releases nothing, but the client cannot verify that, so it never refunds).
//! ε (a) and (b) are computed from this record, never from the coordinator's word.

use std::path::{Path, PathBuf};

use fedlora_dp::client_level::{coordinator_event, observer_event};
use fedlora_dp::ledger::Accountant;
use fedlora_dp::DpEvent;
use fedlora_protocol::client_dp::{plan_digest, ClientDpPlan};
use fedlora_protocol::Codec;
use serde::{Deserialize, Serialize};

use crate::error::ClientError;

/// File name of the record in the state directory.
pub const RECORD_FILE: &str = "client_dp.json";

/// One plan and the rounds this client was charged for under it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanParticipation {
    /// Hex SHA-256 of the plan and its codec ([`plan_digest`]).
    pub digest: String,
    /// The plan as the coordinator announced it.
    pub plan: ClientDpPlan,
    /// The codec's name (bits, scale and noise share in distributed mode).
    pub codec: String,
    /// Rounds this client was charged for (uploaded, or sent its masked input), ascending.
    pub rounds: Vec<u64>,
}

/// Everything a client has been charged for at the client level.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientDpRecord {
    /// By plan, in the order first seen.
    pub plans: Vec<PlanParticipation>,
}

impl ClientDpRecord {
    /// The record's path under `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(RECORD_FILE)
    }

    /// Reads the record (empty if there is none yet; an unreadable one is an error, never a
    /// reset).
    pub fn load(state_dir: Option<&Path>) -> Result<Self, ClientError> {
        let Some(dir) = state_dir else {
            return Ok(Self::default());
        };
        match std::fs::read(Self::path(dir)) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| ClientError::Storage(format!("{}: {e}", Self::path(dir).display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the record durably (temp file, fsync, rename).
    pub fn save(&self, state_dir: Option<&Path>) -> Result<(), ClientError> {
        let Some(dir) = state_dir else {
            return Ok(());
        };
        std::fs::create_dir_all(dir)?;
        let path = Self::path(dir);
        let tmp = path.with_extension("tmp");
        let bytes =
            serde_json::to_vec_pretty(self).map_err(|e| ClientError::Storage(e.to_string()))?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(tmp, path)?;
        Ok(())
    }

    /// Rounds taken part in under `plan` (with `codec`).
    pub fn participated(&self, plan: &ClientDpPlan, codec: &Codec) -> u64 {
        let d = hex::encode(plan_digest(Some(plan), codec));
        self.plans
            .iter()
            .find(|p| p.digest == d)
            .map_or(0, |p| p.rounds.len() as u64)
    }

    /// Records that this client is charged for `round` under `plan` (idempotent per round).
    pub fn record(&mut self, plan: &ClientDpPlan, codec: &Codec, round: u64) {
        let d = hex::encode(plan_digest(Some(plan), codec));
        let entry = match self.plans.iter_mut().position(|p| p.digest == d) {
            Some(i) => &mut self.plans[i],
            None => {
                self.plans.push(PlanParticipation {
                    digest: d,
                    plan: plan.clone(),
                    codec: codec.name(),
                    rounds: Vec::new(),
                });
                self.plans.last_mut().expect("just pushed")
            }
        };
        if let Err(i) = entry.rounds.binary_search(&round) {
            entry.rounds.insert(i, round);
        }
    }

    /// ε (a) at `delta` over every plan's whole campaign (observers of the released models;
    /// amplified by the coordinator's secret sample), RDP accountant. 0 with no plans.
    pub fn observer_epsilon(&self, delta: f64) -> Result<f64, ClientError> {
        let events: Vec<DpEvent> = self
            .plans
            .iter()
            .map(|p| observer_event(&p.plan.noise, p.plan.sampling_rate, p.plan.rounds))
            .collect();
        compose(events, delta)
    }

    /// ε (b) at `delta` against the coordinator: every round taken part in at q = 1; ∞ if any
    /// was in central mode.
    pub fn coordinator_epsilon(&self, delta: f64) -> Result<f64, ClientError> {
        let mut events = Vec::new();
        for p in self.plans.iter().filter(|p| !p.rounds.is_empty()) {
            match coordinator_event(&p.plan.noise, p.rounds.len() as u64) {
                Some(e) => events.push(e),
                None => return Ok(f64::INFINITY),
            }
        }
        compose(events, delta)
    }
}

fn compose(events: Vec<DpEvent>, delta: f64) -> Result<f64, ClientError> {
    if events.is_empty() {
        return Ok(0.0);
    }
    Accountant::Rdp
        .epsilon(&DpEvent::Composed(events), delta)
        .map_err(|e| ClientError::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlora_dp::client_level::ClientNoise;
    use fedlora_protocol::client_dp::ClientDpMode;

    fn plan(mode: ClientDpMode, noise: ClientNoise) -> ClientDpPlan {
        ClientDpPlan {
            mode,
            clip: 0.5,
            expected_clients: 10.0,
            sampling_rate: 0.1,
            rounds: 20,
            delta: 1e-5,
            target_epsilon: 4.0,
            min_clients: 8,
            collusion: 1,
            noise,
        }
    }

    #[test]
    fn the_record_survives_a_restart_and_counts_each_round_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(
            ClientDpMode::Distributed,
            ClientNoise::Skellam {
                l2_sensitivity: 100.0,
                l1_sensitivity: 1000.0,
                variance: 40_000.0,
            },
        );
        let codec = Codec::DenseF32;
        let mut r = ClientDpRecord::load(Some(dir.path())).unwrap();
        r.record(&p, &codec, 3);
        r.record(&p, &codec, 3);
        r.record(&p, &codec, 1);
        r.save(Some(dir.path())).unwrap();
        let back = ClientDpRecord::load(Some(dir.path())).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.participated(&p, &codec), 2);
        assert_eq!(back.plans[0].rounds, vec![1, 3]);
        let b = back.coordinator_epsilon(1e-5).unwrap();
        let a = back.observer_epsilon(1e-5).unwrap();
        assert!(a.is_finite() && b.is_finite() && a > 0.0 && b > 0.0);
        // a central round makes (b) infinite
        let mut c = back.clone();
        c.record(
            &plan(
                ClientDpMode::Central,
                ClientNoise::Gaussian {
                    noise_multiplier: 1.0,
                },
            ),
            &codec,
            5,
        );
        assert_eq!(c.coordinator_epsilon(1e-5).unwrap(), f64::INFINITY);
        // a damaged record is an error, not a reset
        std::fs::write(ClientDpRecord::path(dir.path()), b"{").unwrap();
        assert!(ClientDpRecord::load(Some(dir.path())).is_err());
    }
}
