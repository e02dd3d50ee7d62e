//! A client's privacy statement: what it can hand to an auditor, from its own state directory
//! only (its example-level ledger and its client-level record), never from the coordinator.
//! What `fedlora privacy statement --state-dir DIR` prints.

use std::path::Path;

use fedlora_dp::{DpEvent, PrivacyLedger};
use fedlora_protocol::client_dp::ClientDpMode;
use serde::Serialize;
use sha2::Digest;

use crate::client_dp::ClientDpRecord;
use crate::error::ClientError;
use crate::privacy::CalibratedPlan;

/// Example-level DP-SGD: one training example is protected.
#[derive(Clone, Debug, Serialize)]
pub struct ExampleLevel {
    /// Target ε over the campaign.
    pub target_epsilon: f64,
    /// δ.
    pub delta: f64,
    /// ε spent so far. The client samples its own examples, so the coordinator learns no more
    /// than any observer: (a) and (b) are the same.
    pub epsilon_spent: f64,
    /// `rdp` or `pld`.
    pub accountant: String,
    /// Rounds the DP-SGD plan was calibrated for.
    pub planned_rounds: Option<u64>,
    /// Poisson rate of examples per step, q = B / n.
    pub q: Option<f64>,
    /// σ, in units of the per-example clip norm C.
    pub noise_multiplier: Option<f64>,
    /// C.
    pub clip_norm: Option<f64>,
    /// Local steps per round.
    pub steps_per_round: Option<u32>,
    /// Rounds it trained in, from the ledger.
    pub rounds_taken_part: Vec<u64>,
    /// DP-SGD steps recorded.
    pub steps: u64,
    /// What left the device in those rounds.
    pub released: Vec<String>,
}

/// One client-level plan this client took part under.
#[derive(Clone, Debug, Serialize)]
pub struct ClientPlan {
    /// `central` or `distributed`.
    pub mode: String,
    /// Target ε (a) the coordinator calibrated for.
    pub target_epsilon: f64,
    /// ε (a) of the whole campaign under this plan alone (RDP).
    pub epsilon_observers: f64,
    /// The same under the tighter PLD accountant (central mode's Gaussian only).
    pub epsilon_observers_pld: Option<f64>,
    /// Rounds of the campaign (T).
    pub campaign_rounds: u64,
    /// Poisson sampling rate of clients (q).
    pub q: f64,
    /// S, the clip of a whole update.
    pub clip: f64,
    /// The noise: central σ (units of S) or distributed μ (integer units²), and the
    /// effective multiplier √μ/Δ₂.
    pub noise: String,
    /// The codec (distributed: bits per coordinate, scale and noise share).
    pub codec: String,
    /// Fewest signed survivors for which it sends unmask shares.
    pub min_clients: usize,
    /// c: colluding clients tolerated.
    pub collusion: usize,
    /// Secure aggregation on (distributed mode).
    pub secure_aggregation: bool,
    /// Rounds it was charged for.
    pub rounds_taken_part: Vec<u64>,
    /// An async plan's M, the fewest versions between two of this client's updates (`None`:
    /// a sync plan). In an async plan T is each client's participation bound P and q is 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub async_min_gap: Option<u64>,
    /// The coordinator's signature of the plan, checked again from the record: the SHA-256 of
    /// the signing certificate (DER) and whether the signature verifies (`None`: a record made
    /// before plans were signed).
    pub coordinator_signature: Option<SignatureCheck>,
}

/// The coordinator's plan signature, as checked again for the statement.
#[derive(Clone, Debug, Serialize)]
pub struct SignatureCheck {
    /// Hex SHA-256 of the coordinator's certificate (DER) that signed the plan.
    pub certificate_sha256: String,
    /// Hex of the signature (ECDSA P-256, SHA-256, fixed encoding).
    pub signature: String,
    /// Whether it verifies against the recorded plan and certificate now.
    pub verifies: bool,
}

/// Client-level DP: all of the client's data is protected.
#[derive(Clone, Debug, Serialize)]
pub struct ClientLevel {
    /// δ (the largest of its plans).
    pub delta: f64,
    /// ε (a) against observers of the released models, assuming the coordinator samples
    /// honestly and keeps the sample secret (every plan's whole campaign).
    pub epsilon_observers: f64,
    /// ε (b) against the coordinator, which knows the sample (rounds taken part in, at q = 1;
    /// `inf` after any central-mode round).
    pub epsilon_coordinator: f64,
    /// The plans, in the order first seen.
    pub plans: Vec<ClientPlan>,
    /// What left the device in those rounds.
    pub released: Vec<String>,
    /// What the guarantees assume.
    pub assumptions: Vec<String>,
}

/// The statement.
#[derive(Clone, Debug, Serialize)]
pub struct PrivacyStatement {
    /// The state directory it was read from.
    pub state_dir: String,
    /// The units of privacy the client's records cover.
    pub units: Vec<String>,
    /// Example-level DP-SGD (`None`: no example-level ledger).
    pub example_level: Option<ExampleLevel>,
    /// Client-level DP (`None`: never took part in a client-level round).
    pub client_level: Option<ClientLevel>,
}

fn storage(e: impl std::fmt::Display) -> ClientError {
    ClientError::Storage(e.to_string())
}

fn example_level(dir: &Path) -> Result<Option<ExampleLevel>, ClientError> {
    let path = dir.join("privacy");
    if !path.exists() {
        return Ok(None);
    }
    let db = sled::open(&path).map_err(|e| {
        storage(format!(
            "{}: {e} (is the client still running?)",
            path.display()
        ))
    })?;
    let Some(b) = db.get("ledger").map_err(storage)? else {
        return Ok(None);
    };
    let ledger: PrivacyLedger = serde_json::from_slice(&b).map_err(storage)?;
    let plan: Option<CalibratedPlan> = match db.get("plan").map_err(storage)? {
        Some(b) => Some(serde_json::from_slice(&b).map_err(storage)?),
        None => None,
    };
    let steps = ledger
        .entries
        .iter()
        .map(|e| match &e.event {
            DpEvent::SelfComposed { count, .. } => *count,
            _ => 1,
        })
        .sum();
    let mut rounds: Vec<u64> = ledger.entries.iter().map(|e| e.round).collect();
    rounds.dedup();
    let mut released = vec![
        "the adapter delta after DP-SGD (clipped per example, Gaussian noise per step), through \
         the round's codec (and masking when secure)"
            .to_string(),
    ];
    if plan.as_ref().is_some_and(|p| p.releases_loss) {
        released.push(
            "the training loss through the Gaussian mechanism, accounted with each step".into(),
        );
    }
    released.push("decline reasons from a fixed list; nothing else depends on the data".into());
    Ok(Some(ExampleLevel {
        target_epsilon: ledger.target_epsilon,
        delta: ledger.delta,
        epsilon_spent: ledger.epsilon_spent().map_err(storage)?,
        accountant: format!("{:?}", ledger.accountant).to_lowercase(),
        planned_rounds: plan.as_ref().map(|p| p.plan.planned_rounds),
        q: plan.as_ref().map(|p| p.q),
        noise_multiplier: plan.as_ref().map(|p| p.sigma),
        clip_norm: plan.as_ref().map(|p| p.plan.clip_norm),
        steps_per_round: plan.as_ref().map(|p| p.local_steps),
        rounds_taken_part: rounds,
        steps,
        released,
    }))
}

fn client_level(dir: &Path) -> Result<Option<ClientLevel>, ClientError> {
    let rec = ClientDpRecord::load(Some(dir))?;
    if rec.plans.is_empty() {
        return Ok(None);
    }
    let delta = rec.max_delta();
    let distributed = rec
        .plans
        .iter()
        .any(|p| p.plan.mode == ClientDpMode::Distributed);
    let central = rec
        .plans
        .iter()
        .any(|p| p.plan.mode == ClientDpMode::Central);
    let plans = rec
        .plans
        .iter()
        .map(|p| {
            let noise = match p.plan.noise {
                fedlora_dp::client_level::ClientNoise::Gaussian { noise_multiplier } => {
                    format!("Gaussian, σ = {noise_multiplier} × S, added by the coordinator")
                }
                fedlora_dp::client_level::ClientNoise::Skellam {
                    l2_sensitivity,
                    l1_sensitivity,
                    variance,
                } => format!(
                    "Skellam, μ = {variance:.4e} per coordinate over ≥ {} honest clients \
                     (Δ₂ = {l2_sensitivity:.1}, Δ₁ = {l1_sensitivity:.1}; effective σ = {:.4})",
                    p.plan.min_clients - p.plan.collusion,
                    p.plan.noise.effective_multiplier()
                ),
            };
            ClientPlan {
                mode: p.plan.mode.to_string(),
                target_epsilon: p.plan.target_epsilon,
                epsilon_observers: p.plan.observer_epsilon().unwrap_or(f64::INFINITY),
                epsilon_observers_pld: p.plan.observer_epsilon_pld().and_then(Result::ok),
                campaign_rounds: p.plan.rounds,
                q: p.plan.sampling_rate,
                clip: p.plan.clip,
                noise,
                codec: p.codec.clone(),
                min_clients: p.plan.min_clients,
                collusion: p.plan.collusion,
                secure_aggregation: p.plan.mode == ClientDpMode::Distributed,
                rounds_taken_part: p.rounds.clone(),
                async_min_gap: p.plan.participation.map(|a| a.min_gap),
                coordinator_signature: p.signed.as_ref().map(|sig| SignatureCheck {
                    certificate_sha256: hex::encode(sha2::Sha256::digest(
                        hex::decode(&sig.certificate).unwrap_or_default(),
                    )),
                    signature: sig.signature.clone(),
                    verifies: sig.verify(&p.plan).is_ok(),
                }),
            }
        })
        .collect();
    let mut assumptions = vec![
        "(a) assumes the coordinator samples clients by Poisson sampling at rate q from a \
         secret source and keeps the sample secret; (b) assumes nothing of the coordinator"
            .to_string(),
    ];
    if rec.plans.iter().any(|p| p.plan.participation.is_some()) {
        assumptions.push(
            "async plans: devices choose when they take part, so there is no sample to amplify \
             by: (a) counts the plan's P participations (its T) at q = 1, each device takes \
             part at most P times per signed plan, and trains at most once in any M rounds (round \
             ids the coordinator names); ε is for this client's data with its participation \
             pattern public; whether and when this client \
             took part, and its update's staleness, are visible to the coordinator and not \
             covered by ε"
                .into(),
        );
    }
    if central {
        assumptions.push(
            "central mode: the coordinator is trusted to add the noise; it sees each update in \
             the clear, so (b) is infinite"
                .into(),
        );
    }
    if distributed {
        assumptions.push(
            "distributed mode: at most c devices collude with the coordinator (Sybils \
             included); this client sent unmask shares only for a survivor view of at least \
             min_clients that it signed, that matched whom it masked with, whose survivors stay \
             connected in the neighbour graph, and that every surviving neighbour signed too or \
             matched with its signed mask statement, \
             so every sum of that view holds at least min_clients − c honest noise shares; the \
             coordinator showed every survivor the same roster and view (checked among \
             neighbours only); \
             it learned only the noisy sum (secure aggregation)"
                .into(),
        );
    }
    Ok(Some(ClientLevel {
        delta,
        epsilon_observers: rec.observer_epsilon(delta)?,
        epsilon_coordinator: rec.coordinator_epsilon(delta)?,
        plans,
        released: vec![
            "its whole update clipped to S: in central mode in the clear to the coordinator, in \
             distributed mode rotated, rounded and with its Skellam share, masked"
                .into(),
            "decline reasons from a fixed list; no loss, count or ε".into(),
        ],
        assumptions,
    }))
}

impl PrivacyStatement {
    /// Reads the statement from `state_dir` (the client must not be running: its ledger is
    /// locked while it runs).
    pub fn from_state_dir(state_dir: &Path) -> Result<Self, ClientError> {
        if !state_dir.is_dir() {
            return Err(ClientError::Config(format!(
                "{} is not a client state directory",
                state_dir.display()
            )));
        }
        let example_level = example_level(state_dir)?;
        let client_level = client_level(state_dir)?;
        let mut units = Vec::new();
        if example_level.is_some() {
            units.push("one training example (one context window of the client's data)".into());
        }
        if client_level.is_some() {
            units.push("one client (all of its data, every round it takes part in)".into());
        }
        if units.is_empty() {
            units.push("none: no DP round recorded in this state directory".into());
        }
        Ok(Self {
            state_dir: state_dir.display().to_string(),
            units,
            example_level,
            client_level,
        })
    }

    /// The statement as Markdown.
    pub fn to_markdown(&self) -> String {
        let eps = |e: f64| {
            if e.is_finite() {
                format!("{e:.4}")
            } else {
                "∞".into()
            }
        };
        let list = |v: &[u64]| {
            if v.is_empty() {
                "none".into()
            } else {
                v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
            }
        };
        let mut s = format!(
            "# Privacy statement\n\nState directory: `{}`\n\n",
            self.state_dir
        );
        s += "Unit of privacy:\n";
        for u in &self.units {
            s += &format!("- {u}\n");
        }
        if let Some(e) = &self.example_level {
            s += &format!(
                "\n## Example-level DP-SGD\n\n| | value |\n|---|---|\n\
                 | ε spent (a) = (b) | {} of target {} at δ = {} |\n| accountant | {} |\n\
                 | q (examples per step) | {} |\n| σ (× C) | {} |\n| C | {} |\n\
                 | steps per round | {} |\n| planned rounds | {} |\n\
                 | rounds taken part in | {} |\n| DP-SGD steps | {} |\n",
                eps(e.epsilon_spent),
                e.target_epsilon,
                e.delta,
                e.accountant,
                e.q.map_or("-".into(), |v| format!("{v:.5}")),
                e.noise_multiplier.map_or("-".into(), |v| v.to_string()),
                e.clip_norm.map_or("-".into(), |v| v.to_string()),
                e.steps_per_round.map_or("-".into(), |v| v.to_string()),
                e.planned_rounds.map_or("-".into(), |v| v.to_string()),
                list(&e.rounds_taken_part),
                e.steps
            );
            s += "\nReleased:\n";
            for r in &e.released {
                s += &format!("- {r}\n");
            }
        }
        if let Some(c) = &self.client_level {
            s += &format!(
                "\n## Client-level DP\n\n- ε (a), against observers of the released models: \
                 **{}** at δ = {}\n- ε (b), against the coordinator: **{}** at δ = {}\n\
                 - accountant: RDP (Skellam: Agarwal et al. 2021, Poisson-subsampled with each \
                 direction bounded on its own; Gaussian: Mironov et al. 2019)\n\n",
                eps(c.epsilon_observers),
                c.delta,
                eps(c.epsilon_coordinator),
                c.delta
            );
            s += "| mode | target ε (a) | ε (a), RDP (PLD) | T | q | S | noise | codec | \
                  min_clients | c | secure | rounds taken part in | signed by the coordinator |\n\
                  |---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
            for p in &c.plans {
                s += &format!(
                    "| {} | {} | {} | {} | {:.5} | {} | {} | `{}` | {} | {} | {} | {} | {} |\n",
                    p.mode,
                    p.target_epsilon,
                    match p.epsilon_observers_pld {
                        Some(pld) => format!("{} ({})", eps(p.epsilon_observers), eps(pld)),
                        None => eps(p.epsilon_observers),
                    },
                    match p.async_min_gap {
                        Some(m) => format!("P = {} (async, one per {m} rounds)", p.campaign_rounds),
                        None => p.campaign_rounds.to_string(),
                    },
                    p.q,
                    p.clip,
                    p.noise,
                    p.codec,
                    p.min_clients,
                    p.collusion,
                    p.secure_aggregation,
                    list(&p.rounds_taken_part),
                    match &p.coordinator_signature {
                        None => "not recorded".to_string(),
                        Some(c) if c.verifies => format!(
                            "verified (certificate SHA-256 {}…)",
                            &c.certificate_sha256[..16]
                        ),
                        Some(_) => "**does not verify**".to_string(),
                    }
                );
            }
            s += "\nReleased:\n";
            for r in &c.released {
                s += &format!("- {r}\n");
            }
            s += "\nAssumptions:\n";
            for a in &c.assumptions {
                s += &format!("- {a}\n");
            }
        }
        s
    }
}
