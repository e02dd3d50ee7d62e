//! The federation's persisted state and the decisions its machine hands to the driver.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::identity::ClientId;
use crate::message::{AckStatus, DeclineReason};

/// What the coordinator stored for one accepted upload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UploadMeta {
    /// SHA-256 of the upload's payload: a re-send is recognised by it.
    pub digest: [u8; 32],
    /// Aggregation weight.
    pub weight: f64,
    /// Payload size, bytes.
    pub bytes: u64,
    /// The training loss the upload carried (nats per byte): `None` for private uploads
    /// (DP rounds) and masked inputs, which carry none.
    pub train_loss: Option<f64>,
    /// The LoRA rank the client trained (heterogeneous ranks), `None` for the federation's.
    #[serde(default)]
    pub rank: Option<u32>,
    /// Async mode: the round the client trained in (its update's base is that round's
    /// version); `None` in sync mode, where it is the round the upload belongs to.
    #[serde(default)]
    pub base_round: Option<u64>,
}

/// The round being trained.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpenRound {
    /// Round id (every attempt gets a new one).
    pub round: u64,
    /// Global version the participants train from.
    pub base_version: u64,
    /// Participants.
    pub selected: BTreeSet<ClientId>,
    /// When the round stops waiting, ms (driver's clock).
    pub deadline_ms: u64,
    /// Set once the round stopped taking uploads and is being aggregated.
    pub closed: bool,
    /// Participants that declined the round, with their reason.
    #[serde(default)]
    pub declined: BTreeMap<ClientId, DeclineReason>,
    /// Accepted uploads.
    pub uploads: BTreeMap<ClientId, UploadMeta>,
    /// q of a Poisson-sampled round: each connected client was included with this
    /// probability (`None` under fixed-size sampling).
    #[serde(default)]
    pub sampling_rate: Option<f64>,
}

/// Where the federation is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Phase {
    /// Waiting for enough connected clients.
    Waiting {
        /// Since when, ms.
        since_ms: u64,
    },
    /// A round is open.
    Training(OpenRound),
    /// The final global version is being evaluated.
    Evaluating {
        /// Version under evaluation.
        version: u64,
        /// When evaluation stops waiting, ms.
        deadline_ms: u64,
        /// Clients that reported.
        reported: BTreeSet<ClientId>,
    },
    /// Done.
    Finished {
        /// Whether every planned round committed.
        success: bool,
    },
}

/// Everything the coordinator must persist to resume after a crash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FederationState {
    /// Current global version (0 = the initial adapter; +1 per committed round).
    pub global_version: u64,
    /// Id the next round will get.
    pub next_round: u64,
    /// Rounds that failed in a row since the last commit (a commit resets it): the campaign
    /// gives up when it passes `max_failed_rounds`, never on failures spread over a long run.
    pub failed_rounds: u64,
    /// Where the federation is.
    pub phase: Phase,
    /// Each client's last update counted in a committed version (async mode: by the round it
    /// trained in), so a re-send of it is answered `AlreadyAccepted` in any phase. Written with
    /// the state at each commit.
    #[serde(default)]
    pub contributed: BTreeMap<ClientId, super::buffered::Contribution>,
}

/// A decision the driver must carry out after a [`Federation::tick`].
#[derive(Clone, Debug, PartialEq)]
pub enum Transition {
    /// A round opened with these participants.
    RoundStarted {
        /// Round id.
        round: u64,
        /// Participants.
        selected: BTreeSet<ClientId>,
    },
    /// A round has its uploads and is closed to new ones: aggregate them, persist the new
    /// global, then call [`Federation::commit`]. Repeated on every tick until committed (also
    /// after a restart), so a crash during aggregation only redoes it.
    Aggregate {
        /// Round id.
        round: u64,
        /// Uploads to aggregate, by client.
        uploads: BTreeMap<ClientId, UploadMeta>,
        /// Participants that did not upload in time (stragglers).
        missing: BTreeSet<ClientId>,
    },
    /// A round failed; nothing was applied and a new round will start.
    RoundFailed {
        /// Round id.
        round: u64,
        /// Why.
        reason: String,
    },
    /// The final evaluation started.
    EvaluationStarted {
        /// Version evaluated.
        version: u64,
    },
    /// The federation ended.
    Finished {
        /// Whether every planned round committed.
        success: bool,
    },
}

/// What a polling client should do (the driver attaches the adapter bytes).
#[derive(Clone, Debug, PartialEq)]
pub enum Directive {
    /// Poll again later.
    Wait,
    /// Train in `round` from `base_version`; `evaluate` asks for a report on that version too.
    Train {
        /// Round id.
        round: u64,
        /// Global version to send.
        base_version: u64,
        /// Whether the client should report the base version's held-out loss.
        evaluate: bool,
        /// The round's deadline, Unix ms (the coordinator's clock).
        deadline_ms: u64,
    },
    /// Evaluate `version`.
    Evaluate {
        /// Version to send.
        version: u64,
    },
    /// Async mode with secure aggregation: this client is a member of `round`'s cohort and
    /// follows its secure stages (the driver's session says which).
    Cohort {
        /// Round id of the cohort.
        round: u64,
    },
    /// Already uploaded for `round`.
    AlreadyUploaded {
        /// Round id.
        round: u64,
    },
    /// Done.
    Finished {
        /// Final version.
        version: u64,
    },
}

/// Whether an upload is new or a re-send (see [`Federation::check_upload`]).
#[derive(Clone, Debug, PartialEq)]
pub enum UploadVerdict {
    /// Store it, then call [`Federation::accept_upload`], then ack.
    New,
    /// Byte-identical to the stored one: ack without storing.
    AlreadyAccepted,
}

impl UploadVerdict {
    /// The ack status this verdict leads to.
    pub fn ack_status(&self) -> AckStatus {
        match self {
            UploadVerdict::New => AckStatus::Accepted,
            UploadVerdict::AlreadyAccepted => AckStatus::AlreadyAccepted,
        }
    }
}
