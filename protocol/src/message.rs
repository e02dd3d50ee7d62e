//! Wire messages. Every request is one client frame on a fresh bidirectional QUIC stream, answered
//! by exactly one coordinator frame. The client's identity is its TLS certificate, never a field.

use serde::{Deserialize, Serialize};

use crate::adapter::SpecHash;
use crate::codec::Codec;
use crate::error::{ProtocolError, Refusal};
use crate::limits::{
    bounded, finite, id, invalid, MAX_CERT_LEN, MAX_CSR_LEN, MAX_NEIGHBOURS, MAX_ROSTER,
    MAX_SIGNATURE_LEN, MAX_UPLOAD_CHUNK,
};
use crate::secagg::check_shares;

/// The protocol version this crate speaks; a hello with another version is refused.
///
/// Version 2: DP rounds upload a [`PrivateUpload`] (no loss, no weight, no ε), a client may
/// withhold an evaluation ([`ClientMsg::EvalWithheld`]), decline reasons are a fixed
/// [`DeclineReason`], and secure aggregation carries client nonces and a consistency check.
/// Version 3: strategies (FedProx's μ and the update norm bound in [`TrainConfig`]) and
/// heterogeneous ranks (`max_rank` in the hello, the client's rank in [`RoundOffer`]).
/// Version 4: secure aggregation at scale: each client receives the roster's ids, a Merkle root
/// over every client's keys and its neighbours' keys with inclusion proofs
/// ([`crate::secagg::RosterView`]), and only its neighbours' certificates and signatures; a
/// client whose upload is stored is told how long to wait (`Task::AlreadyUploaded`).
/// Version 5: client-level DP: the round config carries a [`crate::client_dp::ClientDpPlan`],
/// the Skellam codec, a `ClientDpPlanRefused` decline, and survivors sign the plan's digest
/// with their consistency view.
/// Version 6: the device SDK: deadlines in offers, device decline reasons, certificate renewal,
/// resumable uploads and downloads by digest.
/// Version 7: a [`RoundOffer`] with a client-level DP plan carries the coordinator's signature
/// of it ([`crate::plan_signature`]).
/// Version 8: advertised secure-aggregation keys carry a commitment to the self-mask seed
/// ([`crate::secagg::seed_commitment`]), so the unmasking party checks every reconstructed secret.
/// Version 9: async (buffered) federation: `TooStale` and `RetryLater` refusals.
/// Version 10: secure aggregation in async mode: [`ClientMsg::UpdateReady`] and
/// [`SecAggTask::MaskInput`].
/// Version 11: a secure-aggregation client signs a survivor view only if it masked with exactly
/// its surviving neighbours and the survivors stay connected in the neighbour graph; a masked
/// input carries a signed [`crate::secagg::MaskStatement`]; a client unmasks a surviving
/// neighbour only if it signed the view or its statement matches it (clients of version 10
/// would still unmask a subset the coordinator cut off, so they are refused).
/// Version 12: the survivor view travels as bitmaps over the roster
/// ([`crate::secagg::ViewBits`], ⌈n ÷ 8⌉ bytes per set instead of n ids).
/// Version 13: a client-level DP plan carries its async participation bound
/// ([`crate::client_dp::ClientDpPlan::participation`]).
pub const PROTOCOL_VERSION: u16 = 13;

/// ALPN protocol id of fedlora over QUIC (client and coordinator must agree).
pub const ALPN: &[u8] = b"fedlora/1";

/// Idle timeout of a QUIC connection: a peer silent for this long is dropped, seconds.
pub const IDLE_TIMEOUT_S: u64 = 60;

/// Keep-alive interval, seconds: keeps NAT bindings and idle connections open on flaky links.
pub const KEEP_ALIVE_S: u64 = 10;

/// How the coordinator weighs each client's delta in the average.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Weighting {
    /// wᵢ = number of local training examples (FedAvg). Reveals the count: only without DP.
    #[default]
    ExampleCount,
    /// wᵢ = 1 for every client: no count leaves the device (use with DP).
    Uniform,
}

/// The coordinator's proposed DP-SGD plan. Each client calibrates its own noise multiplier σ
/// from it and its own target (ε, δ), and declines a round its budget cannot pay for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpPlan {
    /// Per-example L2 clip norm C over all adapter tensors jointly.
    pub clip_norm: f64,
    /// Local runs each device's σ is calibrated for; with `local_steps` per run this fixes the
    /// number of DP-SGD steps. Sync mode: the campaign's rounds (at least `rounds`). Async mode:
    /// each device's participation bound P (at most `rounds`, at most one run per version): the
    /// device's ledger is spent after P runs and declines every later one.
    pub planned_rounds: u64,
}

/// What a client does in a round, chosen by the coordinator and identical for all participants.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps per round.
    pub local_steps: u32,
    /// Expected batch size (examples per step).
    pub batch_size: u32,
    /// Learning rate of the local optimizer (Adam).
    pub learning_rate: f64,
    /// Codec the upload must use.
    pub codec: Codec,
    /// Weighting rule for the average.
    pub weighting: Weighting,
    /// DP-SGD plan; `None` trains without differential privacy.
    #[serde(default)]
    pub dp: Option<DpPlan>,
    /// How the global adapter is sent down.
    #[serde(default)]
    pub downlink: Downlink,
    /// Secure aggregation: the coordinator sees only the masked sum (needs the modular codec).
    #[serde(default)]
    pub secure: Option<crate::secagg::SecAggParams>,
    /// FedProx's proximal weight μ ≥ 0: the client minimises `loss + μ/2·‖w − w_global‖²` over
    /// the adapter parameters (0: plain local training). Set by the strategy.
    #[serde(default)]
    pub proximal_mu: f64,
    /// Norm-bounded updates: each client scales its whole encoded update to L2 norm ≤ B before
    /// encoding, and the coordinator refuses a plaintext update whose decoded norm exceeds
    /// `B·(1 + τ)` (τ the codec's stated error, [`Codec::norm_tolerance`]). Needs uniform
    /// weighting. Under masking nothing bounds a dishonest client's input: this bounds honest
    /// clients only.
    #[serde(default)]
    pub max_update_norm: Option<f64>,
    /// The clients' local optimizer (Adam by default).
    #[serde(default)]
    pub optimizer: LocalOptimizer,
    /// Client-level DP plan (`None`: none). Each participant clips its whole update to the
    /// plan's S; the noise is added centrally or, with the Skellam codec, by the clients.
    #[serde(default)]
    pub client_dp: Option<crate::client_dp::ClientDpPlan>,
    /// Async mode: the staleness weighting every device computes for itself before it masks
    /// an update in a secure cohort (set in each offer by the coordinator; `None` in sync mode).
    #[serde(default)]
    pub staleness: Option<StalenessPlan>,
}

pub use crate::staleness::StalenessPlan;

/// The optimizer a client trains its adapter with, at [`TrainConfig::learning_rate`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LocalOptimizer {
    /// Adam (β₁ 0.9, β₂ 0.999, ε 1e-5), burn's defaults.
    #[default]
    Adam,
    /// Plain stochastic gradient descent (no momentum): under DP-SGD each step moves the
    /// adapter by exactly lr × the noised gradient, so the noise is not rescaled per coordinate.
    Sgd,
}

impl TrainConfig {
    /// The L2 bound a client scales its whole update to before encoding: the smaller of
    /// `max_update_norm` and the client-level DP plan's clip S (`None`: neither is set).
    pub fn update_clip(&self) -> Option<f64> {
        let plan = self.client_dp.as_ref().map(|p| p.clip);
        match (self.max_update_norm, plan) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            local_steps: 20,
            batch_size: 16,
            learning_rate: 3e-3,
            codec: Codec::DenseF32,
            weighting: Weighting::ExampleCount,
            dp: None,
            downlink: Downlink::Full,
            secure: None,
            proximal_mu: 0.0,
            max_update_norm: None,
            optimizer: LocalOptimizer::Adam,
            client_dp: None,
            staleness: None,
        }
    }
}

/// A request from a client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// First message on a connection: versions and the adapter spec the client was built for.
    Hello {
        /// [`PROTOCOL_VERSION`] of the client.
        protocol_version: u16,
        /// Hash of the client's adapter spec (at the federation's rank).
        spec_hash: SpecHash,
        /// The largest LoRA rank the client can train (e.g. set from its memory); `None`: the
        /// federation's rank. The coordinator sends it the slice of the global adapter up to
        /// `min(max_rank, R)` ([`crate::rank`]).
        max_rank: Option<u32>,
    },
    /// Asks what to do next.
    Poll {
        /// Global version the client holds (reconstructed from earlier downloads), so the
        /// coordinator can send a delta against it; `None` asks for the full adapter.
        held_version: Option<u64>,
    },
    /// A trained delta for the open round of a federation **without** DP.
    Upload(Upload),
    /// The held-out loss of a global version on the client's local test split (clients without
    /// a privacy target only).
    EvalReport(EvalReport),
    /// The client will not train in `round` (e.g. its privacy budget would be exceeded).
    Decline {
        /// Round declined.
        round: u64,
        /// Why, from a fixed list (no free text: a reason with numbers in it could depend on
        /// the client's data).
        reason: DeclineReason,
    },
    /// A secure-aggregation stage message for `round`.
    SecAgg {
        /// Round id.
        round: u64,
        /// The stage's content.
        body: SecAggBody,
    },
    /// A trained delta for the open round of a federation **with** DP: the type has no field
    /// for raw statistics (no loss, no example count, no ε), so a DP client cannot send one.
    PrivateUpload(PrivateUpload),
    /// The client does not report an evaluation of `version` (a client under a privacy target:
    /// its held-out loss and token count are not covered by its accountant). The coordinator
    /// stops waiting for its report.
    EvalWithheld {
        /// Version not reported.
        version: u64,
    },
    /// One piece of a resumable upload ([`crate::resumable`]); with no bytes, asks how much of
    /// the upload the coordinator holds.
    UploadChunk(crate::resumable::UploadChunk),
    /// Asks for a piece of the global adapter `version` (offered with a
    /// [`crate::resumable::GlobalDigest`] instead of inline).
    FetchGlobal {
        /// The global version.
        version: u64,
        /// Where the piece starts, bytes.
        offset: u64,
        /// The longest piece wanted, bytes (at most [`crate::resumable::MAX_UPLOAD_CHUNK`]).
        max_len: u32,
    },
    /// Async mode with secure aggregation: the client holds a finished update trained in
    /// `round` (the offer's round) and asks to join the next secure cohort. Answered `Ack`, or
    /// refused (`TooStale`, `DuplicateUpload`, `WrongRound`): then it drops the update.
    UpdateReady {
        /// The round the update was trained in.
        round: u64,
    },
    /// Asks for a new certificate before the current one expires, for the key in `csr_der`
    /// (the same key or a new one); the device id stays the one this connection proved.
    Renew {
        /// A PKCS#10 request (DER), signed by the key to certify.
        #[serde(with = "serde_bytes")]
        csr_der: Vec<u8>,
    },
}

/// Why a client declines a round: a fixed list, so the reason carries nothing about the
/// client's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum DeclineReason {
    /// The round would take the client past its privacy target.
    Budget,
    /// The coordinator changed the DP plan the client calibrated its noise for.
    PlanChanged,
    /// The plan cannot be calibrated to the client's target (e.g. σ out of range).
    CannotCalibrate,
    /// The client has fewer examples than when it calibrated: it would sample at a higher rate
    /// than its ledger records.
    DataShrank,
    /// The round has a DP plan and the client has no privacy target.
    NoPrivacyTarget,
    /// The client has a privacy target and the round has no DP plan.
    DpRequired,
    /// The round asks for example-count weighting from a client under DP.
    WeightingNotPrivate,
    /// The client's secure-aggregation policy refuses the round (plaintext upload in a secure
    /// federation, threshold or neighbourhood below the client's minimum).
    SecureAggregationPolicy,
    /// The client could not take part in this round's secure aggregation (state lost).
    SecureStateLost,
    /// The offered LoRA rank is above the client's `max_rank`, or not a slice of its adapter.
    RankNotSupported,
    /// The client-level DP plan is inconsistent or weaker than the client requires (too
    /// little noise for its ε, too small `min_clients` or collusion bound, or central mode
    /// for a client that does not trust the coordinator).
    ClientDpPlanRefused,
    /// The device runs on battery and its eligibility requires mains power.
    DeviceOnBattery,
    /// The device's battery is below its eligibility threshold.
    DeviceBatteryLow,
    /// The device is busy (its load average is above its eligibility limit).
    DeviceBusy,
    /// The device trains only in a time window, and this is outside it.
    OutsideTrainingWindow,
    /// The device's own eligibility check (the app's) says no.
    DeviceNotEligible,
    /// The round's deadline (or the device's cap on training seconds) leaves too little time:
    /// declined before training, or training stopped before its first step.
    NotEnoughTime,
}

impl DeclineReason {
    /// A short, fixed description for logs and `status`.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Budget => "privacy budget would be exceeded",
            Self::PlanChanged => "the DP plan changed after calibration",
            Self::CannotCalibrate => "the DP plan cannot be calibrated to the target",
            Self::DataShrank => "fewer local examples than at calibration",
            Self::NoPrivacyTarget => "no privacy target for a DP round",
            Self::DpRequired => "a privacy target and a round without DP",
            Self::WeightingNotPrivate => "example-count weighting under DP",
            Self::ClientDpPlanRefused => "the client-level DP plan is below the client's minimums",
            Self::SecureAggregationPolicy => "secure-aggregation policy",
            Self::SecureStateLost => "secure-aggregation state lost",
            Self::RankNotSupported => "the offered LoRA rank is not supported",
            Self::DeviceOnBattery => "the device runs on battery",
            Self::DeviceBatteryLow => "the device's battery is low",
            Self::DeviceBusy => "the device is busy",
            Self::OutsideTrainingWindow => "outside the device's training window",
            Self::DeviceNotEligible => "the device's own eligibility check said no",
            Self::NotEnoughTime => "not enough time before the round's deadline",
        }
    }
}

impl std::fmt::Display for DeclineReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// What a client sends in each secure-aggregation stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SecAggBody {
    /// Stage 1: signed public keys.
    Keys(crate::secagg::AdvertisedKeys),
    /// Stage 2: encrypted shares for the neighbours.
    Shares(Vec<crate::secagg::EncryptedShare>),
    /// Stage 3: the masked input, bit-packed at m bits per value, with what it masked with.
    Input {
        /// The masked input, m bits per value.
        #[serde(with = "serde_bytes")]
        packed: Vec<u8>,
        /// The neighbours the input is masked with, signed.
        statement: crate::secagg::MaskStatement,
    },
    /// Stage 4: the client's signature of the survivor view (see
    /// [`crate::secagg::consistency_message`]).
    Consistency(Vec<u8>),
    /// Stage 5: shares for unmasking.
    Unmask(crate::secagg::UnmaskResponse),
}

/// A secure-aggregation stage the coordinator asks a client to perform.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SecAggTask {
    /// Make fresh keys and advertise them.
    AdvertiseKeys {
        /// The round's secure-aggregation parameters.
        params: crate::secagg::SecAggParams,
    },
    /// Check this client's view of the roster and share keys with the neighbours.
    ShareKeys {
        /// The roster's ids, the keys' Merkle root, the graph seed, and this client's
        /// neighbours' signed keys with inclusion proofs.
        view: crate::secagg::RosterView,
        /// The neighbours' certificate chains as they presented them in TLS (DER certificates
        /// concatenated, leaf first), which each client checks as TLS would (chain to the
        /// federation CA, dates, clientAuth, not a CA) before it trusts their signatures.
        certificates: std::collections::BTreeMap<String, Vec<u8>>,
    },
    /// Check and sign the coordinator's view of who survived (bitmaps over the roster: the
    /// client expands them with [`crate::secagg::ClientRound::expand_view`]).
    ConsistencyCheck(crate::secagg::ViewBits),
    /// Async mode: mask the finished update this client announced ([`ClientMsg::UpdateReady`])
    /// for this cohort, scaled by its public staleness weight, and send it as the input.
    MaskInput {
        /// The pairwise-mask shares for this client (as in a synchronous round's offer).
        shares: Vec<crate::secagg::EncryptedShare>,
        /// The round the update was trained in (the client checks it is the one it holds).
        trained_round: u64,
        /// The staleness weight s(τ) the update is scaled by before encoding, in (0, 1].
        staleness_weight: f64,
        /// The codec seed of this cohort's round (every member encodes with it).
        codec_seed: u64,
    },
    /// Return shares so the coordinator can unmask the sum.
    Unmask {
        /// The view the client signed in the consistency check (bitmaps over the roster).
        request: crate::secagg::ViewBits,
        /// This client's surviving neighbours' signatures of that view, by signer.
        signatures: std::collections::BTreeMap<String, Vec<u8>>,
        /// The mask statements of its neighbours that sent an input and did not sign the view.
        statements: std::collections::BTreeMap<String, crate::secagg::MaskStatement>,
    },
}

/// A client's delta for one round of a federation without DP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Upload {
    /// Round id the delta was trained for.
    pub round: u64,
    /// Spec hash of the delta.
    pub spec_hash: SpecHash,
    /// Aggregation weight (see [`Weighting`]); finite and positive.
    pub weight: f64,
    /// Mean training loss over the local steps, nats per byte; finite.
    pub train_loss: f64,
    /// The delta `local − global`, encoded with the round's codec.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// A client's delta for one round of a federation with DP.
///
/// Everything in it is a function of DP outputs (post-processing): the payload is the encoded
/// delta of the noised steps. It carries no raw statistic: no weight (the weight is 1: an
/// example count would leak), no ε (ε depends on q = B/n, so it leaks n), and a training loss
/// only as released by the Gaussian mechanism when the client opted in; the device's ledger is
/// the record of what was spent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivateUpload {
    /// Round id the delta was trained for.
    pub round: u64,
    /// Spec hash of the delta.
    pub spec_hash: SpecHash,
    /// The delta `local − global`, encoded with the round's codec.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// The noised training loss (nats per byte; it can be negative), when the client opted in:
    /// mean over steps of (Σ per-example losses clipped to [0, L] + N(0, σ²L²)) ÷ expected
    /// batch, accounted by the client with each step. `None` by default.
    pub noised_train_loss: Option<f64>,
}

/// A held-out evaluation of one global version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Global version evaluated.
    pub version: u64,
    /// Mean next-byte cross-entropy on the local test split, nats per byte; finite, ≥ 0.
    pub loss: f64,
    /// Number of predicted bytes the mean is over (its weight in the federation mean).
    pub tokens: u64,
}

/// A coordinator's answer.
// one message per request, moved once: the size of the largest variant does not matter
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CoordMsg {
    /// Hello accepted.
    Welcome {
        /// The client id taken from the certificate.
        client_id: String,
        /// The coordinator's protocol version.
        protocol_version: u16,
    },
    /// What to do next.
    Task(Task),
    /// An upload is stored durably.
    Ack {
        /// Round of the upload.
        round: u64,
        /// Whether this was new or a re-send.
        status: AckStatus,
    },
    /// A decline was recorded; the round does not wait for this client.
    DeclineRecorded {
        /// Round declined.
        round: u64,
    },
    /// An evaluation report was recorded.
    EvalRecorded {
        /// Version the report was for.
        version: u64,
    },
    /// The request was refused.
    Refused(Refusal),
    /// A renewed certificate ([`ClientMsg::Renew`]).
    Renewed(crate::enroll::IssuedCert),
    /// A piece of the global adapter ([`ClientMsg::FetchGlobal`]).
    GlobalPiece {
        /// The global version.
        version: u64,
        /// Where the piece starts, bytes.
        offset: u64,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// How much of a resumable upload the coordinator holds: the client goes on from `have`.
    /// (The piece that completes an upload gets the upload's own answer instead.)
    UploadProgress {
        /// SHA-256 of the whole upload frame.
        upload_id: [u8; 32],
        /// Bytes held, from the start.
        have: u64,
    },
}

/// Whether an acknowledged upload was new.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckStatus {
    /// Stored now.
    Accepted,
    /// A byte-identical copy was stored before (a re-send after a lost ack or a restart).
    AlreadyAccepted,
}

/// The next thing a polling client should do.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Task {
    /// Nothing now; poll again after the given delay. A coordinator may hold a poll whose
    /// answer is this (up to the delay it would have given, at most 20 s) and answer it as soon
    /// as something the answer depends on changes: a client keeps one poll outstanding and
    /// needs no timer of its own shorter than that.
    Wait {
        /// Suggested delay, milliseconds.
        retry_after_ms: u64,
    },
    /// Train on the given global adapter and upload a delta.
    Train(RoundOffer),
    /// Evaluate a global version on the local test split and report it.
    Evaluate {
        /// Version to evaluate.
        version: u64,
        /// How `global` is encoded (full, or a delta against the version the client holds).
        global_from: Option<u64>,
        /// The global adapter (see [`RoundOffer::global`]).
        #[serde(with = "serde_bytes")]
        global: Vec<u8>,
        /// Set when `global` is empty and the full adapter is fetched in pieces.
        #[serde(default)]
        global_digest: Option<crate::resumable::GlobalDigest>,
    },
    /// This client's upload for `round` is already stored: do not train again.
    AlreadyUploaded {
        /// The open round.
        round: u64,
        /// Milliseconds to wait before polling again (the coordinator's poll budget).
        retry_after_ms: u64,
    },
    /// The federation is over.
    Finished {
        /// The final global version.
        version: u64,
    },
    /// A secure-aggregation stage of `round`.
    SecAgg {
        /// Round id.
        round: u64,
        /// What to do.
        task: Box<SecAggTask>,
    },
}

/// An invitation to train in a round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundOffer {
    /// Round id; the upload must carry it.
    pub round: u64,
    /// Version of the global adapter sent.
    pub global_version: u64,
    /// Spec hash of the federation's adapter.
    pub spec_hash: SpecHash,
    /// What to train.
    pub config: TrainConfig,
    /// Whether the client should also evaluate the received global and send an [`EvalReport`].
    pub evaluate: bool,
    /// Public per-round seed of the codec (shared subsets); see [`crate::round::codec_seed`].
    pub codec_seed: u64,
    /// `None`: `global` is the full adapter, [`Codec::DenseF32`]. `Some(v)`: `global` is the
    /// [`Codec::F16`] delta from the client's held version `v` to `global_version` (empty when
    /// `v` already is `global_version`).
    pub global_from: Option<u64>,
    /// The global adapter, as `global_from` says.
    #[serde(with = "serde_bytes")]
    pub global: Vec<u8>,
    /// Secure rounds: the encrypted shares addressed to this client (stage 3 masks with their
    /// senders); the client sends a masked input instead of an upload.
    #[serde(default)]
    pub secure_shares: Option<Vec<crate::secagg::EncryptedShare>>,
    /// The LoRA rank this client trains, below the federation's rank: `global` is then the
    /// rank slice ([`crate::rank::slice`], sent in full, `global_from` is `None`) and the
    /// upload is the delta zero-padded to the federation's rank ([`crate::rank::pad`]).
    /// `None`: the full rank.
    #[serde(default)]
    pub rank: Option<u32>,
    /// Milliseconds from this offer to the round's deadline, by the coordinator's clock (an
    /// upload after it is a straggler's). The client plans its training and upload within it.
    #[serde(default)]
    pub time_left_ms: Option<u64>,
    /// Set when `global` is empty and the full adapter is fetched in pieces
    /// ([`ClientMsg::FetchGlobal`]).
    #[serde(default)]
    pub global_digest: Option<crate::resumable::GlobalDigest>,
    /// The coordinator's signature of `config.client_dp` with `config.codec`, made with its TLS
    /// certificate's key ([`crate::plan_signature`]); `None` without a client-level plan.
    #[serde(default)]
    pub plan_signature: Option<crate::plan_signature::PlanSignature>,
}

/// How the coordinator sends the global adapter down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Downlink {
    /// The full adapter in dense f32, every time (exact).
    #[default]
    Full,
    /// An f16 delta against exactly what the client reconstructed before (the coordinator keeps
    /// each client's reconstruction, so rounding errors do not accumulate); the full adapter for
    /// a client it has no reconstruction for (new, or after a restart).
    F16Delta,
}

impl TrainConfig {
    /// Checks the fields a peer sends against [`crate::limits`].
    pub(crate) fn check_bounds(&self) -> Result<(), ProtocolError> {
        let c = self;
        finite("learning rate", c.learning_rate)?;
        if let Some(dp) = &c.dp {
            finite("DP clip norm", dp.clip_norm)?;
            if dp.clip_norm <= 0.0 {
                return Err(invalid("DP clip norm must be positive"));
            }
        }
        Ok(())
    }
}

impl ClientMsg {
    /// Checks every field against its range ([`crate::limits`]); frame decoding runs it.
    pub fn check_bounds(&self) -> Result<(), ProtocolError> {
        let m = self;
        match m {
            ClientMsg::UploadChunk(c) => c.check(),
            ClientMsg::FetchGlobal { max_len, .. } => {
                bounded("global piece", *max_len as usize, MAX_UPLOAD_CHUNK)
            }
            ClientMsg::Renew { csr_der } => {
                bounded("certificate request", csr_der.len(), MAX_CSR_LEN)
            }
            ClientMsg::Upload(u) => {
                finite("upload weight", u.weight)?;
                finite("upload train_loss", u.train_loss)?;
                if u.train_loss < 0.0 {
                    return Err(invalid("upload train_loss is negative"));
                }
                Ok(())
            }
            ClientMsg::EvalReport(r) => {
                finite("evaluation loss", r.loss)?;
                if r.loss < 0.0 || r.tokens == 0 {
                    return Err(invalid(
                        "evaluation needs a non-negative loss over at least one token",
                    ));
                }
                Ok(())
            }
            ClientMsg::SecAgg { body, .. } => match body {
                SecAggBody::Keys(k) => k.check_bounds(),
                SecAggBody::Shares(s) => check_shares(s),
                SecAggBody::Input { statement, .. } => statement.check_bounds(),
                SecAggBody::Consistency(sig) => {
                    bounded("consistency signature", sig.len(), MAX_SIGNATURE_LEN)
                }
                SecAggBody::Unmask(r) => r.check_bounds(),
            },
            ClientMsg::PrivateUpload(u) => match u.noised_train_loss {
                Some(l) => finite("private upload's noised train_loss", l),
                None => Ok(()),
            },
            ClientMsg::Hello { .. }
            | ClientMsg::Poll { .. }
            | ClientMsg::Decline { .. }
            | ClientMsg::UpdateReady { .. }
            | ClientMsg::EvalWithheld { .. } => Ok(()),
        }
    }
}

impl CoordMsg {
    /// Checks every field against its range ([`crate::limits`]); frame decoding runs it.
    pub fn check_bounds(&self) -> Result<(), ProtocolError> {
        let m = self;
        let task = match m {
            CoordMsg::Task(task) => task,
            CoordMsg::Renewed(c) => return c.check(),
            CoordMsg::GlobalPiece { bytes, .. } => {
                return bounded("global piece", bytes.len(), MAX_UPLOAD_CHUNK)
            }
            _ => return Ok(()),
        };
        match task {
            Task::Train(offer) => {
                offer.config.check_bounds()?;
                if let Some(s) = &offer.secure_shares {
                    check_shares(s)?;
                }
                if let Some(sig) = &offer.plan_signature {
                    bounded("plan signature", sig.signature.len(), MAX_SIGNATURE_LEN)?;
                }
                Ok(())
            }
            Task::SecAgg { task, .. } => match task.as_ref() {
                SecAggTask::AdvertiseKeys { .. } => Ok(()),
                SecAggTask::ShareKeys { view, certificates } => {
                    view.check_bounds()?;
                    bounded("certificates", certificates.len(), MAX_NEIGHBOURS)?;
                    for (c, der) in certificates {
                        id("certificate owner", c)?;
                        bounded("certificate", der.len(), MAX_CERT_LEN)?;
                    }
                    Ok(())
                }
                SecAggTask::ConsistencyCheck(r) => r.check_bounds(),
                SecAggTask::MaskInput {
                    shares,
                    staleness_weight,
                    ..
                } => {
                    check_shares(shares)?;
                    if !(*staleness_weight > 0.0 && *staleness_weight <= 1.0) {
                        return Err(invalid("a staleness weight must be in (0, 1]"));
                    }
                    Ok(())
                }
                SecAggTask::Unmask {
                    request,
                    signatures,
                    statements,
                } => {
                    request.check_bounds()?;
                    bounded("consistency signatures", signatures.len(), MAX_ROSTER)?;
                    for (c, s) in signatures {
                        id("signer", c)?;
                        bounded("consistency signature", s.len(), MAX_SIGNATURE_LEN)?;
                    }
                    bounded("mask statements", statements.len(), MAX_NEIGHBOURS)?;
                    for (c, s) in statements {
                        id("mask statement owner", c)?;
                        s.check_bounds()?;
                    }
                    Ok(())
                }
            },
            _ => Ok(()),
        }
    }
}
