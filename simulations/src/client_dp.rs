//! Client-level DP points of a sweep (`grid.privacy = ["central", "distributed:16"]`): the plan
//! the simulated coordinator announces, calibrated exactly as a deployment calibrates it, and
//! the ε values each run reports.

use fedlora_dp::client_level::{calibrate_distributed, ClientNoise, DistributedConfig};
use fedlora_protocol::client_dp::{ClientDpMode, ClientDpPlan};
use fedlora_protocol::codec::SkellamParams;
use fedlora_protocol::Codec;

use crate::error::SimError;
use crate::sweep::{Point, Privacy, SweepConfig};

/// The plan of a client-level point, and the codec it dictates (distributed mode).
#[derive(Clone, Debug)]
pub struct ClientDpSetup {
    /// What every round configuration carries.
    pub plan: ClientDpPlan,
    /// The Skellam codec of distributed mode (`None`: central mode keeps the grid's codec).
    pub codec: Option<Codec>,
}

fn dp_err(e: fedlora_dp::DpError) -> SimError {
    SimError::Config(format!("client-level DP: {e}"))
}

/// The plan for `point` over a population of `clients` clients and an adapter of `numel`
/// values (`None` for example-level and non-private points). q = clients per round ÷
/// population; `min_clients` = ⌈min_fraction × clients per round⌉; central σ and distributed
/// (scale, variance, share) are calibrated for ε (a) = the point's ε with the RDP accountant.
pub fn setup(
    sweep: &SweepConfig,
    point: &Point,
    clients: usize,
    numel: usize,
) -> Result<Option<ClientDpSetup>, SimError> {
    let privacy = point.privacy();
    if !privacy.client_level() || !point.epsilon.is_finite() {
        return Ok(None);
    }
    let s = &sweep.train.client_dp;
    let expected = point.clients_per_round as f64;
    let q = expected / clients as f64;
    let min_clients = (s.min_fraction * expected).ceil() as usize;
    let base = |mode, noise| ClientDpPlan {
        mode,
        clip: point.clip,
        expected_clients: expected,
        sampling_rate: q,
        rounds: point.rounds,
        delta: point.delta,
        target_epsilon: point.epsilon,
        min_clients,
        collusion: s.collusion,
        noise,
    };
    Ok(Some(match privacy {
        Privacy::Example => return Ok(None),
        Privacy::ClientCentral => {
            let sigma = fedlora_dp::noise_multiplier(q, point.rounds, point.delta, point.epsilon)
                .map_err(dp_err)?;
            ClientDpSetup {
                plan: base(
                    ClientDpMode::Central,
                    ClientNoise::Gaussian {
                        noise_multiplier: sigma,
                    },
                ),
                codec: None,
            }
        }
        Privacy::ClientDistributed(bits) => {
            let cal = calibrate_distributed(&DistributedConfig {
                clip: point.clip,
                dim: SkellamParams::dim(numel),
                bits: u32::from(bits),
                expected_clients: expected,
                min_clients,
                collusion: s.collusion,
                q,
                rounds: point.rounds,
                delta: point.delta,
                target_epsilon: point.epsilon,
                beta: s.beta,
                headroom: s.headroom,
            })
            .map_err(dp_err)?;
            ClientDpSetup {
                plan: base(ClientDpMode::Distributed, cal.noise()),
                codec: Some(Codec::Skellam(SkellamParams {
                    bits,
                    clip: point.clip,
                    scale: cal.scale,
                    l2_bound: cal.l2_bound,
                    share: cal.share,
                    expected_clients: expected,
                })),
            }
        }
    }))
}

/// ε (a) after `rounds_done` rounds of the plan (what observers of the models released so far
/// can learn about any one client), RDP accountant.
pub fn observer_epsilon_so_far(plan: &ClientDpPlan, rounds_done: u64) -> Result<f64, SimError> {
    if rounds_done == 0 {
        return Ok(0.0);
    }
    let partial = ClientDpPlan {
        rounds: rounds_done,
        ..plan.clone()
    };
    partial.observer_epsilon().map_err(dp_err)
}
