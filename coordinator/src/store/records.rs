//! The records the coordinator stores, the same in every store implementation.

use std::collections::BTreeMap;

use fedlora_protocol::UploadMeta;
use serde::{Deserialize, Serialize};

/// One stored upload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UploadRecord {
    /// Round id.
    pub round: u64,
    /// Client id.
    pub client: String,
    /// What the state machine knows of it.
    pub meta: UploadMeta,
    /// Bytes of the upload frame as received on the wire.
    pub wire_bytes: u64,
    /// When it was accepted, Unix ms.
    pub accepted_ms: u64,
}

/// One stored global adapter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// Global version.
    pub version: u64,
    /// Round that produced it (0 for the initial adapter).
    pub round: u64,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// When it was written, Unix ms.
    pub created_ms: u64,
}

/// How a round ended (or that it is still open).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum RoundStatus {
    /// Collecting uploads.
    Open,
    /// Aggregated into a new global version.
    Committed {
        /// The version it produced.
        version: u64,
    },
    /// Ended without changing the global adapter.
    Failed {
        /// Why.
        reason: String,
    },
}

/// One round's record, for `status` and reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// Round id.
    pub round: u64,
    /// Version the participants trained from.
    pub base_version: u64,
    /// Where it stands.
    #[serde(flatten)]
    pub status: RoundStatus,
    /// Sampled participants.
    pub selected: Vec<String>,
    /// Clients whose uploads were aggregated.
    pub participants: Vec<String>,
    /// Participants that did not upload in time (and did not decline).
    pub stragglers: Vec<String>,
    /// Participants that declined the round, with their reason (a fixed list: budget, plan,
    /// policy, or the device's eligibility and deadline).
    #[serde(default)]
    pub declined: BTreeMap<String, fedlora_protocol::DeclineReason>,
    /// Upload frame bytes per client, as received on the wire.
    pub bytes_up: BTreeMap<String, u64>,
    /// Task frame bytes per client (global adapter sent), as sent on the wire.
    pub bytes_down: BTreeMap<String, u64>,
    /// Weighted mean of the training losses the aggregated uploads carried, nats/byte: `None`
    /// when they carried none (DP rounds send private uploads, secure rounds masked inputs).
    pub train_loss: Option<f64>,
    /// The aggregation strategy the round ran with (`fed-avg`, `fed-adam`, …).
    #[serde(default)]
    pub strategy: String,
    /// Started, Unix ms.
    pub started_ms: u64,
    /// Ended, Unix ms.
    pub ended_ms: Option<u64>,
    /// Async mode: the version's contributors by staleness, entry τ counting those τ buffers
    /// stale (between the round an update trained in and the one it was counted in); empty in
    /// sync mode.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub staleness: Vec<usize>,
}

/// One client's held-out evaluation of one version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Version evaluated.
    pub version: u64,
    /// Client id.
    pub client: String,
    /// Mean loss, nats/byte.
    pub loss: f64,
    /// Predicted bytes behind the mean.
    pub tokens: u64,
}

/// A client the coordinator has seen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientRecord {
    /// Client id (certificate common name).
    pub client: String,
    /// SHA-256 fingerprint of its certificate.
    pub fingerprint: String,
    /// First hello, Unix ms.
    pub first_seen_ms: u64,
    /// Latest hello, Unix ms.
    pub last_seen_ms: u64,
    /// The key an enrolled device (`device-…`) is bound to: its key at first hello, replaced
    /// only by a renewal this coordinator issued ([`crate::enroll::issuer::key_id`]).
    #[serde(default)]
    pub key_id: String,
}

/// A device enrolled with a token ([`crate::enroll`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The device id the coordinator assigned (its certificates' common name).
    pub device_id: String,
    /// SHA-256 (hex) of the public key of its latest certificate.
    pub key_id: String,
    /// The end of its latest certificate's validity, Unix seconds.
    pub not_after_unix_s: u64,
    /// Enrolled, Unix ms.
    pub enrolled_ms: u64,
    /// Certificates issued after the first (renewals).
    pub renewals: u32,
}

/// A coordinator front-end of a federation on PostgreSQL ([`crate::relay`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FrontendRecord {
    /// Its id (`f` and 16 hex digits, new at each start).
    pub id: String,
    /// Where it listens (UDP).
    pub listen: String,
    /// When it started, Unix ms (the database's clock).
    pub started_ms: u64,
    /// When it was last heard from, Unix ms (every 2 s while it runs).
    pub seen_ms: u64,
    /// Whether it drives the rounds (holds the lease).
    pub driving: bool,
}
