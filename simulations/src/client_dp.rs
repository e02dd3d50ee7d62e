//! Client-level DP points of a sweep (`grid.privacy = ["central", "distributed:16"]`): the
//! request the simulated coordinator plans from, with the deployment's planner
//! ([`fedlora_coordinator::privacy_plan`]), and the ε values each run reports.

use fedlora_coordinator::privacy_plan::ClientDpRequest;
use fedlora_protocol::client_dp::{ClientDpMode, ClientDpPlan};

use crate::error::SimError;
use crate::sweep::{Point, Privacy, SweepConfig};

/// The client-level DP request of `point` over a population of `clients` (`None` for
/// example-level and non-private points): S = the point's clip, ε (a) = its ε, q = clients per
/// round ÷ population, c and the rounding settings from `train.client_dp`.
pub fn request(sweep: &SweepConfig, point: &Point, clients: usize) -> Option<ClientDpRequest> {
    if !point.epsilon.is_finite() {
        return None;
    }
    let (mode, bits) = match point.privacy() {
        Privacy::Example => return None,
        Privacy::ClientCentral => (ClientDpMode::Central, 16),
        Privacy::ClientDistributed(b) => (ClientDpMode::Distributed, b),
    };
    let s = &sweep.train.client_dp;
    Some(ClientDpRequest {
        mode,
        clip: point.clip,
        target_epsilon: point.epsilon,
        delta: point.delta,
        collusion: s.collusion,
        eligible: clients,
        bits,
        beta: s.beta,
        headroom: s.headroom,
        ..ClientDpRequest::new(mode, point.clip, point.epsilon, clients)
    })
}

/// `min_clients` of a client-level point: ⌈min_fraction × clients per round⌉.
pub fn min_clients(sweep: &SweepConfig, point: &Point) -> usize {
    (sweep.train.client_dp.min_fraction * point.clients_per_round as f64).ceil() as usize
}

/// ε (a) after `rounds_done` released models of the plan (what observers of the models
/// released so far can learn about any one client), RDP accountant.
pub fn observer_epsilon_so_far(plan: &ClientDpPlan, rounds_done: u64) -> Result<f64, SimError> {
    if rounds_done == 0 {
        return Ok(0.0);
    }
    let partial = ClientDpPlan {
        rounds: rounds_done,
        ..plan.clone()
    };
    partial
        .observer_epsilon()
        .map_err(|e| SimError::Config(format!("client-level DP: {e}")))
}
