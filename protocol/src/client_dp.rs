//! Client-level DP plans: what the coordinator announces in every round configuration, and what
//! a client checks before it takes part.
//!
//! The unit of privacy is one client (all of its data); see [`fedlora_dp::client_level`] for the
//! mechanism, the sensitivities and the two ε values:
//! - (a) against observers of the released models, amplified by the coordinator's secret
//!   Poisson sample over all T rounds;
//! - (b) against the coordinator, which knows the sample: each round the client took part in
//!   counts at q = 1. In central mode (b) is ∞.
//!
//! The plan travels inside [`TrainConfig`](crate::TrainConfig), signed by the coordinator's
//! certificate key ([`crate::plan_signature`]), and it is covered by the round
//! configuration's digest that every secure-aggregation participant signs in its consistency
//! check ([`plan_digest`]): a coordinator cannot show different clients different plans
//! without the signatures failing.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use fedlora_dp::client_level::{coordinator_event, observer_event, ClientNoise};
use fedlora_dp::ledger::Accountant;

use crate::codec::Codec;
use crate::error::ProtocolError;

/// Who adds the noise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientDpMode {
    /// A trusted coordinator adds N(0, σ²S²) to the plaintext sum.
    Central,
    /// Each client adds its share of Skellam noise inside secure aggregation
    /// ([`Codec::Skellam`]); the coordinator unmasks only the noisy sum.
    Distributed,
}

impl std::fmt::Display for ClientDpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClientDpMode::Central => "central",
            ClientDpMode::Distributed => "distributed",
        })
    }
}

impl std::str::FromStr for ClientDpMode {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self, ProtocolError> {
        match s {
            "central" => Ok(ClientDpMode::Central),
            "distributed" => Ok(ClientDpMode::Distributed),
            other => Err(ProtocolError::Config(format!(
                "client DP mode `{other}` (central or distributed)"
            ))),
        }
    }
}

/// The coordinator's client-level privacy plan (public; part of every round configuration).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientDpPlan {
    /// Central or distributed noise.
    pub mode: ClientDpMode,
    /// S: each participant clips its whole update to this L2 norm (adapter units).
    pub clip: f64,
    /// Expected clients per round: the public divisor of the noisy sum, and q × eligible.
    pub expected_clients: f64,
    /// q: the Poisson sampling rate, expected clients ÷ eligible clients when the plan was made.
    pub sampling_rate: f64,
    /// T: rounds of the campaign.
    pub rounds: u64,
    /// δ of both ε values.
    pub delta: f64,
    /// Target ε (a) the noise was calibrated for.
    pub target_epsilon: f64,
    /// Fewest signed survivors for which a client sends its unmask shares (distributed mode),
    /// and fewest uploads a round commits with.
    pub min_clients: usize,
    /// c: colluding or Sybil clients tolerated; their noise is not counted.
    pub collusion: usize,
    /// The noise of one round as the accountant sees it (central: Gaussian σ in units of S;
    /// distributed: Skellam variance and sensitivities in integer units).
    pub noise: ClientNoise,
    /// Distributed mode: the secure-aggregation parameters (t, k, c, m) the noise sizing and
    /// the collusion bound rely on. Signed with the plan ([`crate::plan_signature`]), so a
    /// device refuses a round whose secure stages run with other ones
    /// ([`crate::secagg::ClientRound::require_params`]).
    #[serde(default)]
    pub secure: Option<crate::secagg::SecAggParams>,
    /// Async mode (`Some`): how each device's participation is bounded. Devices self-select
    /// when they are eligible, so there is no secret sample to amplify by: `sampling_rate` is
    /// 1, `rounds` is each device's participation bound P (updates it contributes over the
    /// campaign), and every participation is one mechanism at q = 1 in both ε (a) and (b).
    /// `None`: a synchronous plan (Poisson sampling over `rounds` rounds).
    #[serde(default)]
    pub participation: Option<AsyncParticipation>,
}

/// The participation bound of an async client-level DP plan: P (the plan's `rounds`) updates
/// per device over the campaign, and at most one in any `min_gap` consecutive rounds (the
/// round ids the coordinator names for the rounds a device trained in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AsyncParticipation {
    /// M: versions (rounds) between two updates of one device, at least 1. A device that took
    /// part with an update trained in round r takes no part in rounds r + 1 … r + M − 1.
    pub min_gap: u64,
}

/// What a client requires before it takes part in a client-level DP round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientDpPolicy {
    /// The most ε this client accepts, as (b) (against the coordinator) unless it trusts the
    /// coordinator's sampling, then as (a).
    pub max_epsilon: f64,
    /// The largest δ it accepts.
    pub max_delta: f64,
    /// The fewest `min_clients` it accepts.
    pub min_clients: usize,
    /// The fewest colluding clients the plan must tolerate.
    pub min_collusion: usize,
    /// Whether it trusts the coordinator to sample honestly and keep the sample secret (needed
    /// for central mode and for spending by (a)).
    pub trust_coordinator: bool,
}

impl Default for ClientDpPolicy {
    fn default() -> Self {
        Self {
            max_epsilon: 8.0,
            max_delta: 1e-5,
            min_clients: 2,
            min_collusion: 0,
            trust_coordinator: false,
        }
    }
}

/// Why a client refuses a plan (each maps to a decline the coordinator records).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PlanRefusal {
    /// The plan's parameters do not hang together (codec, mode, counts).
    #[error("inconsistent client-level DP plan: {0}")]
    Inconsistent(String),
    /// The plan's privacy is weaker than the client requires.
    #[error("client-level DP plan too weak: {0}")]
    TooWeak(String),
    /// Central mode, or spending by (a), needs a client that trusts the coordinator.
    #[error("the plan needs a trusted coordinator: {0}")]
    NeedsTrust(String),
    /// The plan is not signed by the coordinator the client is connected to
    /// ([`crate::plan_signature`]).
    #[error("client-level DP plan not signed by the coordinator: {0}")]
    Unsigned(String),
}

impl ClientDpPlan {
    /// Checks the plan against the round's codec and secure aggregation.
    pub fn check_consistent(
        &self,
        codec: &Codec,
        secure_modulus: Option<u32>,
    ) -> Result<(), PlanRefusal> {
        let bad = |m: String| Err(PlanRefusal::Inconsistent(m));
        if !(self.clip > 0.0 && self.clip.is_finite()) {
            return bad(format!("clip {} must be positive", self.clip));
        }
        if !(self.sampling_rate > 0.0 && self.sampling_rate <= 1.0) {
            return bad(format!("q = {} must be in (0, 1]", self.sampling_rate));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) || self.rounds == 0 {
            return bad("δ must be in (0, 1) and rounds ≥ 1".into());
        }
        if !(self.expected_clients >= 1.0 && self.expected_clients.is_finite()) {
            return bad(format!(
                "expected clients {} must be ≥ 1",
                self.expected_clients
            ));
        }
        if self.collusion >= self.min_clients {
            return bad(format!(
                "collusion {} must be below min_clients {}",
                self.collusion, self.min_clients
            ));
        }
        if let Some(p) = &self.participation {
            // no amplification by sampling: devices choose when they take part
            if self.sampling_rate != 1.0 {
                return bad(format!(
                    "an async plan has no secret sample to amplify by: q must be 1, not {}",
                    self.sampling_rate
                ));
            }
            if p.min_gap == 0 {
                return bad("an async plan's min_gap must be at least 1 version".into());
            }
        }
        match (self.mode, codec, &self.noise) {
            (ClientDpMode::Central, Codec::Skellam(_), _) => {
                bad("central mode adds Gaussian noise to a plaintext sum, not Skellam".into())
            }
            (ClientDpMode::Central, _, ClientNoise::Gaussian { noise_multiplier }) => {
                if !(*noise_multiplier > 0.0 && noise_multiplier.is_finite()) {
                    return bad("σ must be positive".into());
                }
                Ok(())
            }
            (
                ClientDpMode::Distributed,
                Codec::Skellam(p),
                ClientNoise::Skellam {
                    l2_sensitivity,
                    variance,
                    ..
                },
            ) => {
                if secure_modulus != Some(u32::from(p.bits)) {
                    return bad(format!(
                        "distributed mode needs secure aggregation mod 2^{} (the codec's)",
                        p.bits
                    ));
                }
                if p.clip != self.clip || p.expected_clients != self.expected_clients {
                    return bad("the codec's clip or divisor differs from the plan's".into());
                }
                if p.l2_bound > *l2_sensitivity {
                    return bad(format!(
                        "the codec rounds to norm {} but the plan accounts for {}",
                        p.l2_bound, l2_sensitivity
                    ));
                }
                let honest = (self.min_clients - self.collusion) as f64;
                if p.share * honest < variance * (1.0 - 1e-9) {
                    return bad(format!(
                        "{} honest clients × share {} < the planned variance {}",
                        honest, p.share, variance
                    ));
                }
                Ok(())
            }
            (mode, codec, noise) => bad(format!(
                "mode {mode} with codec {} and noise {noise:?}",
                codec.name()
            )),
        }
    }

    /// Checks, for an adapter of `numel` values, that the sensitivities the plan accounts for
    /// cover what the Skellam codec can send: Δ₂ ≥ the rounding bound and Δ₁ ≥ its L1 bound
    /// over the D = next power of two coordinates (a coordinator understating them would
    /// understate ε). Central mode: nothing to check (S is the sensitivity).
    pub fn check_sensitivities(&self, codec: &Codec, numel: usize) -> Result<(), PlanRefusal> {
        let (
            Codec::Skellam(p),
            ClientNoise::Skellam {
                l2_sensitivity,
                l1_sensitivity,
                ..
            },
        ) = (codec, &self.noise)
        else {
            return Ok(());
        };
        let d = crate::codec::SkellamParams::dim(numel);
        let l1 = fedlora_dp::skellam::rounded_l1_bound(p.l2_bound, d);
        if *l2_sensitivity < p.l2_bound || *l1_sensitivity < l1 * (1.0 - 1e-12) {
            return Err(PlanRefusal::Inconsistent(format!(
                "the plan accounts for Δ₂ = {l2_sensitivity}, Δ₁ = {l1_sensitivity}; the codec \
                 can send Δ₂ = {}, Δ₁ = {l1} over {d} coordinates",
                p.l2_bound
            )));
        }
        Ok(())
    }

    /// Central mode's noise standard deviation on the sum, σ·S (adapter units); `None` for
    /// distributed plans.
    pub fn central_noise_std(&self) -> Option<f64> {
        match self.noise {
            ClientNoise::Gaussian { noise_multiplier } => Some(noise_multiplier * self.clip),
            ClientNoise::Skellam { .. } => None,
        }
    }

    /// ε (a) of the whole campaign (RDP accountant).
    pub fn observer_epsilon(&self) -> Result<f64, fedlora_dp::DpError> {
        Accountant::Rdp.epsilon(
            &observer_event(&self.noise, self.sampling_rate, self.rounds),
            self.delta,
        )
    }

    /// ε (a) under the privacy-loss-distribution accountant (tighter), for central mode's
    /// Poisson-subsampled Gaussian; `None` for Skellam, which only the RDP accountant covers.
    pub fn observer_epsilon_pld(&self) -> Option<Result<f64, fedlora_dp::DpError>> {
        matches!(self.noise, ClientNoise::Gaussian { .. }).then(|| {
            Accountant::Pld.epsilon(
                &observer_event(&self.noise, self.sampling_rate, self.rounds),
                self.delta,
            )
        })
    }

    /// ε (b) after taking part in `participated` rounds (∞ in central mode).
    pub fn coordinator_epsilon(&self, participated: u64) -> Result<f64, fedlora_dp::DpError> {
        if participated == 0 {
            return Ok(0.0);
        }
        match coordinator_event(&self.noise, participated) {
            None => Ok(f64::INFINITY),
            Some(e) => Accountant::Rdp.epsilon(&e, self.delta),
        }
    }

    /// Whether `policy` lets this client take part in one more round, having taken part in
    /// `participated` rounds of this plan already. Checks the unit, δ, `min_clients`, c, trust,
    /// and the ε the client would then have spent by its own accounting.
    pub fn admit(
        &self,
        policy: &ClientDpPolicy,
        codec: &Codec,
        secure_modulus: Option<u32>,
        participated: u64,
    ) -> Result<f64, PlanRefusal> {
        self.check_consistent(codec, secure_modulus)?;
        let weak = |m: String| Err(PlanRefusal::TooWeak(m));
        if self.delta > policy.max_delta {
            return weak(format!("δ {} > {}", self.delta, policy.max_delta));
        }
        if self.min_clients < policy.min_clients {
            return weak(format!(
                "min_clients {} < {}",
                self.min_clients, policy.min_clients
            ));
        }
        if self.collusion < policy.min_collusion {
            return weak(format!(
                "tolerates {} colluding clients, {} required",
                self.collusion, policy.min_collusion
            ));
        }
        if self.mode == ClientDpMode::Central && !policy.trust_coordinator {
            return Err(PlanRefusal::NeedsTrust(
                "in central mode the coordinator sees every update (ε against it is ∞)".into(),
            ));
        }
        let eps = if policy.trust_coordinator {
            self.observer_epsilon()
        } else {
            self.coordinator_epsilon(participated + 1)
        }
        .map_err(|e| PlanRefusal::Inconsistent(e.to_string()))?;
        if eps > policy.max_epsilon {
            return weak(format!(
                "ε {} would be {eps:.3} > the client's {}",
                if policy.trust_coordinator {
                    "(a)"
                } else {
                    "(b)"
                },
                policy.max_epsilon
            ));
        }
        Ok(eps)
    }
}

/// SHA-256 of the bincode encoding of a round configuration's client-level plan together with
/// the codec that implements it: what survivors sign, so all of them saw the same plan.
///
/// A sync plan (no [`ClientDpPlan::participation`]) is hashed in the layout it had before async
/// plans existed, so the digests and the coordinator signatures that devices' records hold from
/// then still match; an async plan is hashed whole, under its own domain tag.
pub fn plan_digest(plan: Option<&ClientDpPlan>, codec: &Codec) -> [u8; 32] {
    let cfg = bincode::config::standard();
    let mut h = Sha256::new();
    match plan.filter(|p| p.participation.is_some()) {
        Some(p) => {
            h.update(b"fedlora client-dp async plan v1");
            h.update(bincode::serde::encode_to_vec((p, codec), cfg).unwrap_or_default());
        }
        None => {
            h.update(b"fedlora client-dp plan v1");
            let view = plan.map(SyncPlanView::of);
            h.update(bincode::serde::encode_to_vec((view, codec), cfg).unwrap_or_default());
        }
    }
    h.finalize().into()
}

/// A sync plan's fields in the order they had before `participation` was added (what
/// [`plan_digest`] hashes for it).
#[derive(Serialize)]
struct SyncPlanView<'a> {
    mode: &'a ClientDpMode,
    clip: &'a f64,
    expected_clients: &'a f64,
    sampling_rate: &'a f64,
    rounds: &'a u64,
    delta: &'a f64,
    target_epsilon: &'a f64,
    min_clients: &'a usize,
    collusion: &'a usize,
    noise: &'a ClientNoise,
    secure: &'a Option<crate::secagg::SecAggParams>,
}

impl<'a> SyncPlanView<'a> {
    fn of(p: &'a ClientDpPlan) -> Self {
        // every field named, none skipped with `..`: a field added to the plan fails to compile
        // here until the digest covers it
        let ClientDpPlan {
            mode,
            clip,
            expected_clients,
            sampling_rate,
            rounds,
            delta,
            target_epsilon,
            min_clients,
            collusion,
            noise,
            secure,
            participation: _,
        } = p;
        Self {
            mode,
            clip,
            expected_clients,
            sampling_rate,
            rounds,
            delta,
            target_epsilon,
            min_clients,
            collusion,
            noise,
            secure,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::SkellamParams;
    use fedlora_dp::client_level::{calibrate_distributed, DistributedConfig};

    fn distributed(eps: f64) -> (ClientDpPlan, Codec) {
        let cfg = DistributedConfig {
            clip: 0.5,
            dim: 1 << 12,
            bits: 16,
            expected_clients: 20.0,
            min_clients: 16,
            collusion: 2,
            q: 0.1,
            rounds: 10,
            delta: 1e-5,
            target_epsilon: eps,
            beta: (-0.5f64).exp(),
            headroom: 3.0,
        };
        let cal = calibrate_distributed(&cfg).unwrap();
        let codec = Codec::Skellam(SkellamParams {
            bits: 16,
            clip: 0.5,
            scale: cal.scale,
            l2_bound: cal.l2_bound,
            share: cal.share,
            expected_clients: 20.0,
        });
        let plan = ClientDpPlan {
            mode: ClientDpMode::Distributed,
            clip: 0.5,
            expected_clients: 20.0,
            sampling_rate: 0.1,
            rounds: 10,
            delta: 1e-5,
            target_epsilon: eps,
            min_clients: 16,
            collusion: 2,
            noise: cal.noise(),
            secure: None,
            participation: None,
        };
        (plan, codec)
    }

    /// A sync plan's digest (what records keep and coordinators sign) is the one it had before
    /// plans gained `participation`: the pre-async layout, rebuilt here field by field; an
    /// async plan's digest differs from the same plan's without the bound.
    #[test]
    fn a_sync_plans_digest_is_unchanged_by_the_async_field() {
        #[derive(Serialize)]
        struct Before {
            mode: ClientDpMode,
            clip: f64,
            expected_clients: f64,
            sampling_rate: f64,
            rounds: u64,
            delta: f64,
            target_epsilon: f64,
            min_clients: usize,
            collusion: usize,
            noise: ClientNoise,
            secure: Option<crate::secagg::SecAggParams>,
        }
        let (p, codec) = distributed(4.0);
        let before = Before {
            mode: p.mode,
            clip: p.clip,
            expected_clients: p.expected_clients,
            sampling_rate: p.sampling_rate,
            rounds: p.rounds,
            delta: p.delta,
            target_epsilon: p.target_epsilon,
            min_clients: p.min_clients,
            collusion: p.collusion,
            noise: p.noise,
            secure: p.secure.clone(),
        };
        let mut h = Sha256::new();
        h.update(b"fedlora client-dp plan v1");
        h.update(
            bincode::serde::encode_to_vec((Some(&before), &codec), bincode::config::standard())
                .unwrap(),
        );
        let old: [u8; 32] = h.finalize().into();
        assert_eq!(plan_digest(Some(&p), &codec), old);
        let with_bound = ClientDpPlan {
            participation: Some(AsyncParticipation { min_gap: 1 }),
            ..p.clone()
        };
        assert_ne!(plan_digest(Some(&with_bound), &codec), old);
    }

    #[test]
    fn a_client_refuses_too_little_noise_too_few_clients_or_a_central_plan_it_does_not_trust() {
        let (plan, codec) = distributed(4.0);
        let trusting = ClientDpPolicy {
            max_epsilon: 4.0,
            trust_coordinator: true,
            ..ClientDpPolicy::default()
        };
        let eps = plan.admit(&trusting, &codec, Some(16), 0).unwrap();
        assert!(eps <= 4.0);
        // a plan calibrated for ε = 8 is too weak for a client that wants 4
        let (weak_plan, weak_codec) = distributed(8.0);
        assert!(matches!(
            weak_plan.admit(&trusting, &weak_codec, Some(16), 0),
            Err(PlanRefusal::TooWeak(_))
        ));
        // the codec's share does not add up to the planned variance
        let Codec::Skellam(mut p) = codec.clone() else {
            unreachable!()
        };
        p.share /= 2.0;
        assert!(matches!(
            plan.admit(&trusting, &Codec::Skellam(p), Some(16), 0),
            Err(PlanRefusal::Inconsistent(_))
        ));
        // the sensitivities cover the codec's at the adapter's size, and an understated Δ₁
        // is refused
        plan.check_sensitivities(&codec, 1 << 12).unwrap();
        let mut understated = plan.clone();
        if let ClientNoise::Skellam { l1_sensitivity, .. } = &mut understated.noise {
            *l1_sensitivity /= 2.0;
        }
        assert!(understated.check_sensitivities(&codec, 1 << 12).is_err());
        // no secure aggregation, or another modulus
        assert!(plan.admit(&trusting, &codec, None, 0).is_err());
        assert!(plan.admit(&trusting, &codec, Some(20), 0).is_err());
        // min_clients below the client's floor
        let strict = ClientDpPolicy {
            min_clients: 50,
            ..trusting.clone()
        };
        assert!(matches!(
            plan.admit(&strict, &codec, Some(16), 0),
            Err(PlanRefusal::TooWeak(_))
        ));
        // fewer colluders tolerated than required
        let strict = ClientDpPolicy {
            min_collusion: 5,
            ..trusting.clone()
        };
        assert!(plan.admit(&strict, &codec, Some(16), 0).is_err());
        // a client that does not trust the coordinator counts (b), and refuses central mode
        let untrusting = ClientDpPolicy {
            max_epsilon: 1e6,
            ..ClientDpPolicy::default()
        };
        let b1 = plan.admit(&untrusting, &codec, Some(16), 0).unwrap();
        let b3 = plan.admit(&untrusting, &codec, Some(16), 2).unwrap();
        assert!(b3 > b1 && b1 > eps);
        let central = ClientDpPlan {
            mode: ClientDpMode::Central,
            noise: ClientNoise::Gaussian {
                noise_multiplier: 0.3,
            },
            ..plan.clone()
        };
        assert!(matches!(
            central.admit(&untrusting, &Codec::DenseF32, None, 0),
            Err(PlanRefusal::NeedsTrust(_))
        ));
        assert_eq!(central.coordinator_epsilon(1).unwrap(), f64::INFINITY);
        // the PLD accountant is tighter than RDP for the Gaussian, and has no Skellam
        let moderate = ClientDpPlan {
            noise: ClientNoise::Gaussian {
                noise_multiplier: 1.0,
            },
            ..central.clone()
        };
        let (pld, rdp) = (
            moderate.observer_epsilon_pld().unwrap().unwrap(),
            moderate.observer_epsilon().unwrap(),
        );
        assert!(pld < rdp, "PLD {pld} vs RDP {rdp}");
        assert!(plan.observer_epsilon_pld().is_none());
        assert!(central.admit(&trusting, &Codec::DenseF32, None, 0).is_err()); // σ = 0.3 is ε > 4
    }

    #[test]
    fn the_digest_changes_with_any_field_of_the_plan() {
        let (plan, codec) = distributed(4.0);
        let d = plan_digest(Some(&plan), &codec);
        let mut other = plan.clone();
        other.min_clients -= 1;
        assert_ne!(d, plan_digest(Some(&other), &codec));
        assert_ne!(d, plan_digest(None, &codec));
        assert_eq!(d, plan_digest(Some(&plan.clone()), &codec));
    }
}
