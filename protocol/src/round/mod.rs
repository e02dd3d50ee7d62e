//! The federation's round state machine, without I/O.
//!
//! [`Federation`] takes events (a client connected, polled, uploaded, reported an evaluation; the
//! clock ticked) with the current time passed in, and answers with decisions. It never touches a
//! socket, a disk or a clock: the coordinator crate drives it over QUIC and sled, tests drive it
//! with scripted clients and a simulated clock.
//!
//! ```text
//! Waiting ──(enough clients)──▶ Training{round} ──(all in | deadline, ≥ min)──▶ commit ─┐
//!    ▲                               │ (deadline, < min) → round Failed, retried         │
//!    └───────────────────────────────┴───────────────────────────────────────────────────┘
//! after the last commit: Evaluating{final version} ──(all reported | deadline)──▶ Finished
//! ```
//! Persisted state is [`FederationState`]: the driver stores it after every change, and an
//! upload's record together with it **before** it acknowledges the upload.

mod buffered;
mod cohort;
mod config;
mod state;

use std::collections::{BTreeMap, BTreeSet};

use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::adapter::{FlatAdapter, SpecHash};
use crate::error::{ProtocolError, Refusal, RefusalCode};
use crate::message::{DeclineReason, Weighting};

pub use crate::identity::ClientId;
pub use buffered::Contribution;
pub use cohort::{cohort_context, cohort_plan_context, cohort_weight};
pub use config::{FederationConfig, Mode, Sampling, Staleness};
pub use state::{
    Directive, FederationState, OpenRound, Phase, Transition, UploadMeta, UploadVerdict,
};

/// The federation state machine.
#[derive(Clone, Debug)]
pub struct Federation {
    config: FederationConfig,
    spec_hash: SpecHash,
    state: FederationState,
    connected: BTreeSet<ClientId>,
    /// Versions already evaluated by a client (so each client reports a version at most once).
    evaluated: BTreeSet<(u64, ClientId)>,
    /// Async: devices holding an offer they have not answered, with its round and the tick
    /// that first saw it (what `concurrency` limits; in memory only, so a restart starts it
    /// empty).
    offered: BTreeMap<ClientId, (u64, Option<u64>)>,
    /// Secure async mode: devices holding a finished update, with the round it trained in and
    /// the order it was announced in, waiting for a cohort ([`cohort`]; in memory only).
    ready: BTreeMap<ClientId, (u64, u64)>,
    /// Announcements so far (the order of `ready`).
    announced: u64,
    /// Secure async mode: the open cohort's members, with the round each update trained in.
    cohort: BTreeMap<ClientId, u64>,
}

/// The refusal of an upload from a client that declined the round (or buffer) `round`: a
/// client counts once, as an upload or as a decline (counted as both, it made a round close
/// "all in" while a participant was still training).
fn declined_upload(client: &str, round: u64) -> Refusal {
    Refusal::new(
        RefusalCode::Declined,
        format!("client {client} declined round {round}; its upload is not taken"),
    )
}

/// The refusal of an upload to a buffer that holds as many updates as it may
/// ([`Federation::buffer_cap`]): the client sends it again, to the next buffer.
fn buffer_full(round: u64) -> Refusal {
    Refusal::new(
        RefusalCode::RetryLater,
        format!("buffer {round} is full; send the update again for the next one"),
    )
}

/// The refusal of a second report of `version` by `client` ([`Federation::check_eval`]; a
/// coordinator that batches reports refuses a second one in a batch with it too).
pub fn duplicate_eval(client: &str, version: u64) -> Refusal {
    Refusal::new(
        RefusalCode::DuplicateUpload,
        format!("client {client} already reported version {version}"),
    )
}

impl Federation {
    /// A new federation at global version 0.
    pub fn new(
        config: FederationConfig,
        spec_hash: SpecHash,
        now_ms: u64,
    ) -> Result<Self, ProtocolError> {
        config.validate()?;
        Ok(Self::resume(
            config,
            spec_hash,
            FederationState {
                global_version: 0,
                next_round: 1,
                failed_rounds: 0,
                phase: Phase::Waiting { since_ms: now_ms },
                contributed: BTreeMap::new(),
            },
            now_ms,
        ))
    }

    /// Resumes from persisted state. An open round or evaluation gets a fresh deadline
    /// (`now + timeout`), since clients must reconnect first.
    pub fn resume(
        config: FederationConfig,
        spec_hash: SpecHash,
        mut state: FederationState,
        now_ms: u64,
    ) -> Self {
        match &mut state.phase {
            Phase::Training(open) => open.deadline_ms = now_ms + config.round_timeout_ms,
            Phase::Evaluating { deadline_ms, .. } => *deadline_ms = now_ms + config.eval_timeout_ms,
            Phase::Waiting { since_ms } => *since_ms = now_ms,
            Phase::Finished { .. } => {}
        }
        Self {
            config,
            spec_hash,
            state,
            connected: BTreeSet::new(),
            evaluated: BTreeSet::new(),
            offered: BTreeMap::new(),
            ready: BTreeMap::new(),
            announced: 0,
            cohort: BTreeMap::new(),
        }
    }

    /// The persisted part of the state.
    pub fn state(&self) -> &FederationState {
        &self.state
    }

    /// The configuration.
    pub fn config(&self) -> &FederationConfig {
        &self.config
    }

    /// The adapter spec hash every message must carry.
    pub fn spec_hash(&self) -> &SpecHash {
        &self.spec_hash
    }

    /// Clients currently connected.
    pub fn connected(&self) -> &BTreeSet<ClientId> {
        &self.connected
    }

    /// A client finished its hello.
    pub fn connect(&mut self, client: &str) {
        self.connected.insert(client.to_string());
    }

    /// A client's connection closed.
    pub fn disconnect(&mut self, client: &str) {
        self.connected.remove(client);
        self.offered.remove(client);
        // a device that left is not put in a cohort (it announces again when it is back)
        self.ready.remove(client);
    }

    /// Async: devices holding an unanswered offer (at most `concurrency` when it is set).
    pub fn training(&self) -> usize {
        self.offered.len()
    }

    /// Whether the federation has ended.
    pub fn is_finished(&self) -> bool {
        matches!(self.state.phase, Phase::Finished { .. })
    }

    /// Whether the federation runs in buffered asynchronous mode.
    pub fn is_async(&self) -> bool {
        self.config.mode == Mode::Async
    }

    /// What `client` should do now.
    pub fn poll(&mut self, client: &str) -> Directive {
        match &self.state.phase {
            Phase::Waiting { .. } => Directive::Wait,
            // async: any device trains on the newest version, once per version it is not
            // already in the buffer with
            Phase::Training(open) if self.is_secure_async() && open.selected.contains(client) => {
                Directive::Cohort { round: open.round }
            }
            Phase::Training(_) if self.is_secure_async() && self.ready.contains_key(client) => {
                Directive::Wait
            }
            Phase::Training(open) if self.is_async() => {
                let limit = self.config.concurrency;
                let holds = self.offered.contains_key(client);
                if open.closed || open.declined.contains_key(client) {
                    Directive::Wait
                } else if open.uploads.contains_key(client) {
                    Directive::AlreadyUploaded { round: open.round }
                } else if !holds && limit > 0 && self.offered.len() >= limit {
                    Directive::Wait
                } else {
                    // asking again keeps the offer it holds (and its age)
                    self.offered
                        .entry(client.to_string())
                        .or_insert((open.round, None));
                    Directive::Train {
                        round: open.round,
                        base_version: open.base_version,
                        evaluate: !self
                            .evaluated
                            .contains(&(open.base_version, client.to_string())),
                        deadline_ms: open.deadline_ms,
                    }
                }
            }
            Phase::Training(open) => {
                if !open.selected.contains(client) || open.declined.contains_key(client) {
                    Directive::Wait
                } else if open.uploads.contains_key(client) {
                    Directive::AlreadyUploaded { round: open.round }
                } else {
                    let evaluate = !self
                        .evaluated
                        .contains(&(open.base_version, client.to_string()));
                    Directive::Train {
                        round: open.round,
                        base_version: open.base_version,
                        evaluate,
                        deadline_ms: open.deadline_ms,
                    }
                }
            }
            Phase::Evaluating {
                version, reported, ..
            } => {
                if reported.contains(client) {
                    Directive::Wait
                } else {
                    Directive::Evaluate { version: *version }
                }
            }
            Phase::Finished { .. } => Directive::Finished {
                version: self.state.global_version,
            },
        }
    }

    /// Validates an upload without changing state.
    ///
    /// Refuses: another round than the open one (`WrongRound`), a non-participant
    /// (`NotSelected`), another spec (`SpecMismatch`), a weight the weighting rule forbids or
    /// above `max_upload_weight` (`BadWeight`), and a different payload for a (round, client)
    /// that has one (`DuplicateUpload`). A byte-identical re-send is [`UploadVerdict::AlreadyAccepted`].
    pub fn check_upload(
        &self,
        client: &str,
        round: u64,
        spec_hash: &SpecHash,
        digest: &[u8; 32],
        weight: f64,
    ) -> Result<UploadVerdict, Refusal> {
        if self.is_async() {
            if let Some(v) = self.check_buffered(client, round, digest)? {
                return Ok(v);
            }
            return self.check_contents(spec_hash, weight);
        }
        if self.counted(client, round, digest) {
            return Ok(UploadVerdict::AlreadyAccepted);
        }
        let Phase::Training(open) = &self.state.phase else {
            return Err(Refusal::new(
                RefusalCode::WrongRound,
                format!("no round is open; upload for round {round} refused"),
            ));
        };
        if round != open.round {
            return Err(Refusal::new(
                RefusalCode::WrongRound,
                format!("upload for round {round}, but round {} is open", open.round),
            ));
        }
        if open.closed && !open.uploads.contains_key(client) {
            return Err(Refusal::new(
                RefusalCode::WrongRound,
                format!("round {round} is closed and being aggregated"),
            ));
        }
        if !open.selected.contains(client) {
            return Err(Refusal::new(
                RefusalCode::NotSelected,
                format!("client {client} is not a participant of round {round}"),
            ));
        }
        if open.declined.contains_key(client) {
            return Err(declined_upload(client, round));
        }
        if spec_hash != &self.spec_hash {
            return self.check_contents(spec_hash, weight);
        }
        if let Some(prev) = open.uploads.get(client) {
            return if &prev.digest == digest {
                Ok(UploadVerdict::AlreadyAccepted)
            } else {
                Err(Refusal::new(
                    RefusalCode::DuplicateUpload,
                    format!("client {client} already uploaded a different delta for round {round}"),
                ))
            };
        }
        self.check_contents(spec_hash, weight)
    }

    /// Whether `client`'s last counted update is the one trained in `round` with this digest.
    fn counted(&self, client: &str, round: u64, digest: &[u8; 32]) -> bool {
        self.state
            .contributed
            .get(client)
            .is_some_and(|c| c.trained_round == round && &c.digest == digest)
    }

    /// Async mode's checks of an upload trained in `round`: `Some` answers a re-send, `None`
    /// lets the contents be checked. Refused: a round not offered yet (`WrongRound`), one more
    /// than `max_staleness` buffers old (`TooStale`), a second update of a client in one
    /// buffer or a second one trained in a round already counted (`DuplicateUpload`). While
    /// no buffer takes uploads (one is being committed) the refusal is `Internal`: the client
    /// re-sends after reconnecting, and the next buffer takes it.
    fn check_buffered(
        &self,
        client: &str,
        round: u64,
        digest: &[u8; 32],
    ) -> Result<Option<UploadVerdict>, Refusal> {
        // a re-send of an update already counted is answered in any phase (its acknowledgement
        // may have been lost in a crash while the version it went into committed)
        if self.counted(client, round, digest) {
            return Ok(Some(UploadVerdict::AlreadyAccepted));
        }
        let open = match &self.state.phase {
            Phase::Training(open) if !open.closed => open,
            _ if self.may_upload(client).is_err() => {
                return Err(self.may_upload(client).expect_err("checked"))
            }
            _ => {
                return Err(Refusal::new(
                    RefusalCode::WrongRound,
                    "the campaign has committed its last version",
                ))
            }
        };
        self.check_trained_round(client, round, open.round)?;
        if open.declined.contains_key(client) {
            return Err(declined_upload(client, open.round));
        }
        if self
            .buffer_cap()
            .is_some_and(|k| open.uploads.len() >= k && !open.uploads.contains_key(client))
        {
            return Err(buffer_full(open.round));
        }
        if let Some(prev) = open.uploads.get(client) {
            return if &prev.digest == digest && prev.base_round == Some(round) {
                Ok(Some(UploadVerdict::AlreadyAccepted))
            } else {
                Err(Refusal::new(
                    RefusalCode::DuplicateUpload,
                    format!(
                        "client {client} already has an update in buffer {}; one per version",
                        open.round
                    ),
                ))
            };
        }
        Ok(None)
    }

    /// The most updates an async buffer takes, where it is bounded: under a client-level DP
    /// plan a version's noisy sum is divided by the plan's public K, so a buffer holds at most
    /// K updates (one that arrives while K are buffered is told `RetryLater` and goes into
    /// the next buffer). `None`: no bound (a buffer that fills past K while its commit is
    /// being decided divides by the sum of its weights).
    fn buffer_cap(&self) -> Option<usize> {
        (self.is_async() && self.config.train.client_dp.is_some()).then_some(self.config.buffer)
    }

    /// Async mode's checks of an update trained in `round`, taken into buffer `open_round`
    /// (an upload, or a secure cohort's announcement): refused if `round` was not offered yet
    /// (`WrongRound`), is more than `max_staleness` buffers old (`TooStale`), or is at or before
    /// the round of the client's last counted update (`DuplicateUpload`).
    fn check_trained_round(
        &self,
        client: &str,
        round: u64,
        open_round: u64,
    ) -> Result<(), Refusal> {
        if round == 0 || round > open_round {
            return Err(Refusal::new(
                RefusalCode::WrongRound,
                format!("round {round} was not offered (the open buffer is round {open_round})"),
            ));
        }
        let tau = open_round - round;
        if tau > self.config.max_staleness {
            return Err(Refusal::new(
                RefusalCode::TooStale,
                format!(
                    "an update trained in round {round} is {tau} buffers stale; at most {} are \
                     accepted",
                    self.config.max_staleness
                ),
            ));
        }
        if let Some(c) = self.state.contributed.get(client) {
            if round <= c.trained_round {
                return Err(Refusal::new(
                    RefusalCode::DuplicateUpload,
                    format!(
                        "client {client} already has an update trained in round {} counted",
                        c.trained_round
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The checks of an upload's spec and weight, the same in both modes.
    fn check_contents(&self, spec_hash: &SpecHash, weight: f64) -> Result<UploadVerdict, Refusal> {
        if spec_hash != &self.spec_hash {
            return Err(Refusal::new(
                RefusalCode::SpecMismatch,
                "upload's adapter spec differs from the federation's",
            ));
        }
        if weight.is_finite() && weight > self.config.max_upload_weight {
            return Err(Refusal::new(
                RefusalCode::BadWeight,
                format!(
                    "weight {weight} is above the federation's maximum of {}",
                    self.config.max_upload_weight
                ),
            ));
        }
        let ok = weight.is_finite()
            && weight > 0.0
            && match self.config.train.weighting {
                Weighting::ExampleCount => weight.fract() == 0.0,
                Weighting::Uniform => weight == 1.0,
            };
        if !ok {
            return Err(Refusal::new(
                RefusalCode::BadWeight,
                format!(
                    "weight {weight} not allowed under {:?} weighting",
                    self.config.train.weighting
                ),
            ));
        }
        Ok(UploadVerdict::New)
    }

    /// Records an upload that [`check_upload`](Self::check_upload) called new and the driver has
    /// stored. Returns the state to persist together with the upload record.
    pub fn accept_upload(
        &mut self,
        client: &str,
        round: u64,
        meta: UploadMeta,
    ) -> Result<&FederationState, Refusal> {
        let buffered = self.is_async();
        let mut meta = meta;
        if self.is_secure_async() {
            // a masked input counts for a member of the open cohort only, with the round its
            // update trained in (its staleness)
            match self.cohort.get(client) {
                Some(&trained) => meta.base_round = Some(trained),
                None => {
                    return Err(Refusal::new(
                        RefusalCode::NotSelected,
                        format!("client {client} is not in the cohort of round {round}"),
                    ))
                }
            }
        }
        let capped = self.buffer_cap();
        match &mut self.state.phase {
            // (a round counts a client once: as an upload or as a decline)
            Phase::Training(open) if open.declined.contains_key(client) => {
                Err(declined_upload(client, round))
            }
            Phase::Training(open)
                if buffered
                    && open.round == round
                    && !open.closed
                    && capped.is_some_and(|k| open.uploads.len() >= k) =>
            {
                Err(buffer_full(open.round))
            }
            Phase::Training(open) if buffered && open.round == round && !open.closed => {
                open.uploads.insert(client.to_string(), meta);
                self.offered.remove(client);
                Ok(&self.state)
            }
            Phase::Training(open)
                if open.round == round && open.selected.contains(client) && !open.closed =>
            {
                open.uploads.insert(client.to_string(), meta);
                Ok(&self.state)
            }
            _ => Err(Refusal::new(
                RefusalCode::WrongRound,
                format!("round {round} is no longer open"),
            )),
        }
    }

    /// Records that `client` declines the open round `round`: the round stops waiting for it.
    /// Refused for another round, a non-participant, or a client that already uploaded.
    pub fn decline(
        &mut self,
        client: &str,
        round: u64,
        reason: DeclineReason,
    ) -> Result<(), Refusal> {
        let buffered = self.is_async();
        match &mut self.state.phase {
            Phase::Training(open)
                if open.round == round
                    && (buffered || open.selected.contains(client))
                    && !open.closed =>
            {
                if open.uploads.contains_key(client) {
                    return Err(Refusal::new(
                        RefusalCode::DuplicateUpload,
                        format!("client {client} already uploaded for round {round}"),
                    ));
                }
                if buffered && open.declined.contains_key(client) {
                    return Err(Refusal::new(
                        RefusalCode::DuplicateUpload,
                        format!("client {client} already declined buffer {round}"),
                    ));
                }
                open.declined.insert(client.to_string(), reason);
                self.offered.remove(client);
                Ok(())
            }
            _ => Err(Refusal::new(
                RefusalCode::WrongRound,
                format!("round {round} is not open for {client}"),
            )),
        }
    }

    /// Whether [`record_eval`](Self::record_eval) would take `client`'s report of `version`
    /// now, without recording it (a report checked, stored, and only then recorded).
    pub fn check_eval(&self, client: &str, version: u64) -> Result<(), Refusal> {
        let current = match &self.state.phase {
            Phase::Training(open) => open.base_version,
            Phase::Evaluating { version, .. } => *version,
            _ => self.state.global_version,
        };
        if version != current {
            return Err(Refusal::new(
                RefusalCode::WrongRound,
                format!("evaluation of version {version}, current is {current}"),
            ));
        }
        if self.evaluated.contains(&(version, client.to_string())) {
            return Err(duplicate_eval(client, version));
        }
        Ok(())
    }

    /// Records that `client` evaluated `version`. A report for a version that is not the current
    /// global or the one under final evaluation is refused; a second report from the same client
    /// for the same version is refused.
    pub fn record_eval(&mut self, client: &str, version: u64) -> Result<(), Refusal> {
        self.check_eval(client, version)?;
        self.evaluated.insert((version, client.to_string()));
        if let Phase::Evaluating { reported, .. } = &mut self.state.phase {
            reported.insert(client.to_string());
        }
        Ok(())
    }

    /// Undoes [`record_eval`](Self::record_eval) of `client`'s report of `version` (its record
    /// could not be stored: the client is asked again).
    pub fn forget_eval(&mut self, client: &str, version: u64) {
        self.evaluated.remove(&(version, client.to_string()));
        if let Phase::Evaluating {
            version: v,
            reported,
            ..
        } = &mut self.state.phase
        {
            if *v == version {
                reported.remove(client);
            }
        }
    }

    /// Marks that `client` reported `version` before a restart (rebuilt from the store).
    pub fn restore_eval(&mut self, client: &str, version: u64) {
        self.evaluated.insert((version, client.to_string()));
    }

    /// Advances time. Returns the transition, if any; the driver persists [`state`](Self::state)
    /// after each.
    pub fn tick(&mut self, now_ms: u64) -> Option<Transition> {
        if self.is_async() {
            // an offer not answered within round_timeout_ms lapses (its slot frees)
            let timeout = self.config.round_timeout_ms;
            self.offered.retain(|_, (_, seen)| {
                now_ms.saturating_sub(*seen.get_or_insert(now_ms)) <= timeout
            });
            if let Some(t) = self.tick_buffered(now_ms) {
                return t;
            }
        }
        match &self.state.phase {
            Phase::Waiting { since_ms } => {
                let n = self.connected.len();
                let full = self
                    .config
                    .clients_per_round
                    .max(self.config.wait_for_clients);
                let enough = n >= full
                    || (n >= self.config.min_clients
                        && now_ms.saturating_sub(*since_ms) >= self.config.start_grace_ms);
                if !enough {
                    return None;
                }
                let round = self.state.next_round;
                let (selected, sampling_rate) = self.sample(round);
                self.state.next_round += 1;
                self.state.phase = Phase::Training(OpenRound {
                    round,
                    base_version: self.state.global_version,
                    selected: selected.clone(),
                    deadline_ms: now_ms + self.config.round_timeout_ms,
                    closed: false,
                    declined: BTreeMap::new(),
                    uploads: BTreeMap::new(),
                    sampling_rate,
                });
                Some(Transition::RoundStarted { round, selected })
            }
            Phase::Training(_) if self.config.train.secure.is_some() => None,
            Phase::Training(open) => {
                let all_in = open.uploads.len() + open.declined.len() == open.selected.len();
                if !open.closed && !all_in && now_ms < open.deadline_ms {
                    return None;
                }
                let round = open.round;
                if open.uploads.len() >= self.config.min_clients {
                    let missing = open
                        .selected
                        .iter()
                        .filter(|c| {
                            !open.uploads.contains_key(*c) && !open.declined.contains_key(*c)
                        })
                        .cloned()
                        .collect();
                    let uploads = open.uploads.clone();
                    if let Phase::Training(open) = &mut self.state.phase {
                        open.closed = true;
                    }
                    Some(Transition::Aggregate {
                        round,
                        uploads,
                        missing,
                    })
                } else {
                    let reason = format!(
                        "{} of {} uploads by the deadline, {} needed",
                        open.uploads.len(),
                        open.selected.len(),
                        self.config.min_clients
                    );
                    self.state.failed_rounds += 1;
                    self.state.phase = if self.state.failed_rounds > self.config.max_failed_rounds {
                        Phase::Finished { success: false }
                    } else {
                        Phase::Waiting { since_ms: now_ms }
                    };
                    Some(Transition::RoundFailed { round, reason })
                }
            }
            Phase::Evaluating {
                deadline_ms,
                reported,
                ..
            } => {
                let all = !self.connected.is_empty() && self.connected.is_subset(reported);
                if all || now_ms >= *deadline_ms {
                    self.state.phase = Phase::Finished { success: true };
                    Some(Transition::Finished { success: true })
                } else {
                    None
                }
            }
            Phase::Finished { .. } => None,
        }
    }

    /// Commits the round the last [`Transition::Aggregate`] named, after the driver stored the
    /// new global adapter. Returns the new version.
    pub fn commit(&mut self, round: u64, now_ms: u64) -> Result<u64, ProtocolError> {
        let open = match &self.state.phase {
            Phase::Training(open) if open.round == round => open,
            _ => {
                return Err(ProtocolError::Config(format!(
                    "commit of round {round}, which is not open"
                )))
            }
        };
        if self.is_async() {
            // offers that can no longer be answered (too stale once this commits) lapse
            let horizon = (round + 1).saturating_sub(self.config.max_staleness);
            self.offered.retain(|_, (r, _)| *r >= horizon);
        }
        // each client's last counted update: a re-send of it is answered `AlreadyAccepted`
        // whatever the phase (its acknowledgement may have been lost in a crash after which the
        // restarted coordinator committed the round at once)
        let counted: Vec<(ClientId, Contribution)> = open
            .uploads
            .iter()
            .map(|(c, m)| {
                (
                    c.clone(),
                    Contribution {
                        trained_round: m.base_round.unwrap_or(round),
                        digest: m.digest,
                    },
                )
            })
            .collect();
        self.state.contributed.extend(counted);
        self.cohort.clear();
        self.state.global_version += 1;
        // the give-up count is of failures in a row
        self.state.failed_rounds = 0;
        self.state.phase = if self.state.global_version >= self.config.rounds {
            Phase::Evaluating {
                version: self.state.global_version,
                deadline_ms: now_ms + self.config.eval_timeout_ms,
                reported: BTreeSet::new(),
            }
        } else {
            Phase::Waiting { since_ms: now_ms }
        };
        Ok(self.state.global_version)
    }

    /// Fails the open round `round` (e.g. its uploads could not be aggregated): nothing is
    /// applied and a new round will start.
    pub fn fail_round(&mut self, round: u64, now_ms: u64) -> Result<(), ProtocolError> {
        match &self.state.phase {
            Phase::Training(open) if open.round == round => {}
            _ => {
                return Err(ProtocolError::Config(format!(
                    "failing round {round}, which is not open"
                )))
            }
        }
        // a failed cohort's members announce their updates again; in async mode with secure
        // cohorts a failure (members that dropped out) does not count toward giving up: the
        // campaign waits for the next cohort, as a buffer waits for updates
        self.cohort.clear();
        if !self.is_secure_async() {
            self.state.failed_rounds += 1;
        }
        self.state.phase = if self.state.failed_rounds > self.config.max_failed_rounds {
            Phase::Finished { success: false }
        } else {
            Phase::Waiting { since_ms: now_ms }
        };
        Ok(())
    }

    /// The participants of `round` and, under Poisson sampling, q. Fixed: sort, shuffle with
    /// ChaCha20 seeded by `seed ⊕ round`, take K. Poisson: each connected client with
    /// probability q = min(1, K ÷ connected, the client-level plan's q), from the OS CSPRNG (or the seeded ChaCha20 under
    /// [`Sampling::PoissonSeeded`]); if the OS generator fails nobody is sampled and the round
    /// fails like an empty one.
    /// Async mode's tick for the phases it handles differently: `Some(t)` is the answer,
    /// `None` leaves the phase to the synchronous rules (evaluation, finish).
    ///
    /// A buffer opens at once (no one is sampled) and closes when it holds `buffer` updates,
    /// or `min_buffer` once it has waited `round_timeout_ms`; it never fails for want of
    /// uploads, it waits.
    fn tick_buffered(&mut self, now_ms: u64) -> Option<Option<Transition>> {
        match &mut self.state.phase {
            Phase::Waiting { .. } => {
                let round = self.state.next_round;
                self.state.next_round += 1;
                self.state.phase = Phase::Training(OpenRound {
                    round,
                    base_version: self.state.global_version,
                    selected: BTreeSet::new(),
                    deadline_ms: now_ms + self.config.round_timeout_ms,
                    closed: false,
                    declined: BTreeMap::new(),
                    uploads: BTreeMap::new(),
                    sampling_rate: None,
                });
                Some(Some(Transition::RoundStarted {
                    round,
                    selected: BTreeSet::new(),
                }))
            }
            Phase::Training(_) if self.config.train.secure.is_some() => {
                Some(self.tick_cohort(now_ms))
            }
            Phase::Training(open) => {
                let n = open.uploads.len();
                let full = n >= self.config.buffer
                    || (now_ms >= open.deadline_ms && n >= self.config.min_buffer());
                if !open.closed && !full {
                    return Some(None);
                }
                open.closed = true;
                Some(Some(Transition::Aggregate {
                    round: open.round,
                    uploads: open.uploads.clone(),
                    missing: BTreeSet::new(),
                }))
            }
            _ => None,
        }
    }

    /// Whether `client` may send an upload's payload now (asked before its body is read): a
    /// participant of the open round in sync mode (else `NotSelected`); in async mode any
    /// client while a buffer takes uploads, `RetryLater` while a version is being committed
    /// and the next buffer is not open yet, and during the final evaluation (a re-send of an
    /// update counted in the last version is answered `AlreadyAccepted`).
    pub fn may_upload(&self, client: &str) -> Result<(), Refusal> {
        may_send_payload(&self.state, self.is_async(), client)
    }

    /// Async: takes back a buffer that was opened but whose start could not be stored (no
    /// upload can be in it: none is taken before its start is stored), so the next tick opens
    /// it again.
    pub fn retract_round(&mut self, round: u64) {
        if let Phase::Training(open) = &self.state.phase {
            if self.is_async() && open.round == round && open.uploads.is_empty() {
                self.state.next_round = round;
                self.state.phase = Phase::Waiting { since_ms: 0 };
            }
        }
    }

    /// The buffer (round) an update trained in `trained_round` is counted in if accepted now:
    /// the open one in async mode, `trained_round` itself in sync mode.
    pub fn upload_round(&self, trained_round: u64) -> u64 {
        match &self.state.phase {
            Phase::Training(open) if self.is_async() => open.round,
            _ => trained_round,
        }
    }

    /// The factor s(τ) an upload of buffer `round` is weighted by on top of its weight: its
    /// staleness weight in async mode (τ = `round` − the round it trained in), 1 in sync mode.
    pub fn staleness_weight(&self, round: u64, meta: &UploadMeta) -> f64 {
        match meta.base_round {
            Some(base) if self.is_async() => {
                self.config.staleness.weight(round.saturating_sub(base))
            }
            _ => 1.0,
        }
    }

    fn sample(&self, round: u64) -> (BTreeSet<ClientId>, Option<f64>) {
        let seeded = || rand::rngs::ChaCha20Rng::seed_from_u64(self.config.seed ^ round);
        let ids: Vec<ClientId> = self.connected.iter().cloned().collect();
        let mut rng = match self.config.sampling {
            Sampling::Fixed => {
                let mut ids = ids;
                ids.shuffle(&mut seeded());
                return (
                    ids.into_iter()
                        .take(self.config.clients_per_round)
                        .collect(),
                    None,
                );
            }
            Sampling::PoissonSeeded => seeded(),
            Sampling::Poisson => {
                match rand::rngs::ChaCha20Rng::try_from_rng(&mut rand::rngs::SysRng) {
                    Ok(r) => r,
                    Err(_) => return (BTreeSet::new(), Some(0.0)),
                }
            }
        };
        let mut q = (self.config.clients_per_round as f64 / ids.len().max(1) as f64).min(1.0);
        // under client-level DP never sample above the rate the plan was calibrated for
        if let Some(plan) = &self.config.train.client_dp {
            q = q.min(plan.sampling_rate);
        }
        let picked = ids
            .into_iter()
            .filter(|_| rand::RngExt::random::<f64>(&mut rng) < q)
            .collect();
        (picked, Some(q))
    }
}

/// The public codec seed of `round` (shared subsets): `seed ⊕ (round · φ)`, φ the 64-bit golden
/// ratio constant.
pub fn codec_seed(seed: u64, round: u64) -> u64 {
    seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// FedAvg: `global + Σ wᵢ·Δᵢ / Σ wᵢ`, exactly as the coordinator commits it: the weighted mean
/// delta accumulated in `f64` in the order given and rounded to `f32` once per value
/// ([`crate::strategy::weighted_mean`]), then added to `global` in `f32`. Fails on an empty
/// list, a non-positive weight or a spec mismatch.
pub fn fedavg(
    global: &FlatAdapter,
    deltas: &[(f64, FlatAdapter)],
) -> Result<FlatAdapter, ProtocolError> {
    if deltas.is_empty() {
        return Err(ProtocolError::Config("nothing to aggregate".into()));
    }
    let ups: Vec<crate::strategy::Contribution<'_>> = deltas
        .iter()
        .map(|(w, d)| crate::strategy::Contribution {
            weight: *w,
            rank: 1,
            delta: d,
        })
        .collect();
    let mean = crate::strategy::weighted_mean(1, &ups)?;
    let mut next = global.clone();
    next.apply_delta(&mean)?;
    Ok(next)
}

/// [`Federation::may_upload`] of a federation in `state` (`is_async`: its mode is async), for
/// a front-end that knows the federation only from the store.
pub fn may_send_payload(
    state: &FederationState,
    is_async: bool,
    client: &str,
) -> Result<(), Refusal> {
    let not_selected = || {
        Err(Refusal::new(
            RefusalCode::NotSelected,
            "payloads are taken from participants of the open round only",
        ))
    };
    match &state.phase {
        Phase::Training(open) if !is_async => {
            if open.selected.contains(client) {
                Ok(())
            } else {
                not_selected()
            }
        }
        _ if !is_async => not_selected(),
        Phase::Training(open) if !open.closed => Ok(()),
        Phase::Training(open) => Err(Refusal::new(
            RefusalCode::RetryLater,
            format!(
                "version {} is being committed; send it again shortly",
                open.base_version + 1
            ),
        )),
        Phase::Waiting { .. } => Err(Refusal::new(
            RefusalCode::RetryLater,
            "the next buffer is opening; send it again shortly",
        )),
        Phase::Evaluating { .. } => Ok(()),
        Phase::Finished { .. } => Err(Refusal::new(
            RefusalCode::WrongRound,
            "the campaign is over",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{AdapterSpec, TensorSpec};
    use crate::message::{AckStatus, TrainConfig};

    const SPEC: SpecHash = [9; 32];

    fn cfg() -> FederationConfig {
        FederationConfig {
            rounds: 2,
            clients_per_round: 3,
            min_clients: 2,
            round_timeout_ms: 1_000,
            start_grace_ms: 500,
            eval_timeout_ms: 300,
            ..Default::default()
        }
    }

    fn meta(b: u8) -> UploadMeta {
        UploadMeta {
            digest: [b; 32],
            weight: 10.0,
            bytes: 4,
            train_loss: Some(1.0),
            rank: None,
            base_round: None,
        }
    }

    fn upload(f: &mut Federation, c: &str, round: u64, b: u8) -> Result<AckStatus, Refusal> {
        let v = f.check_upload(c, round, &SPEC, &[b; 32], 10.0)?;
        if v == UploadVerdict::New {
            f.accept_upload(c, round, meta(b))?;
        }
        Ok(v.ack_status())
    }

    #[test]
    fn strategy_and_norm_bound_settings_are_checked_at_configuration() {
        use crate::codec::{Codec, ModularParams};
        use crate::strategy::StrategyConfig;
        let modular = ModularParams::default();
        let secure = FederationConfig {
            train: TrainConfig {
                codec: Codec::Modular(modular.clone()),
                weighting: Weighting::Uniform,
                secure: Some(crate::secagg::SecAggParams {
                    threshold: 2,
                    neighbours: 0,
                    modulus_bits: modular.modulus_bits(),
                    collusion: 0,
                    stage_timeout_ms: 1_000,
                }),
                ..Default::default()
            },
            ..cfg()
        };
        secure.validate().unwrap();
        for s in ["median", "trimmed-mean"] {
            let c = FederationConfig {
                strategy: StrategyConfig::from_name(s).unwrap(),
                ..secure.clone()
            };
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("needs each client's update"), "{e}");
            // in the clear they are fine
            FederationConfig {
                strategy: StrategyConfig::from_name(s).unwrap(),
                ..cfg()
            }
            .validate()
            .unwrap();
        }
        let prox = FederationConfig {
            strategy: StrategyConfig::from_name("fed-prox").unwrap(),
            ..secure.clone()
        };
        prox.validate().unwrap();
        // a norm bound needs uniform weighting and a codec with a stated error bound
        let mut c = cfg();
        c.train.max_update_norm = Some(1.0);
        assert!(c.validate().unwrap_err().to_string().contains("uniform"));
        c.train.weighting = Weighting::Uniform;
        c.validate().unwrap();
        c.train.codec = Codec::Quantized {
            bits: 4,
            block: 64,
            rotate: false,
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("norm error bound"));
        c.train.codec = Codec::F16;
        c.train.max_update_norm = Some(-1.0);
        assert!(c.validate().is_err());
        // μ comes from the strategy, not from [train]
        let mut c = cfg();
        c.train.proximal_mu = 0.1;
        assert!(c.validate().is_err());
    }

    #[test]
    fn wait_for_clients_holds_the_first_round_until_the_population_is_connected() {
        let mut c = cfg();
        c.wait_for_clients = 4;
        c.start_grace_ms = 10_000;
        let mut f = Federation::new(c, SPEC, 0).unwrap();
        for cl in ["a", "b", "c"] {
            f.connect(cl);
        }
        // 3 connected = clients_per_round, but the population of 4 is not there yet
        assert_eq!(f.tick(1), None);
        f.connect("d");
        assert!(matches!(f.tick(2), Some(Transition::RoundStarted { .. })));
    }

    fn async_cfg(buffer: usize) -> FederationConfig {
        FederationConfig {
            mode: Mode::Async,
            buffer,
            max_staleness: 1,
            rounds: 3,
            ..cfg()
        }
    }

    /// An async upload as the coordinator makes it: checked for the round it trained in,
    /// counted in the open buffer with that round as its base.
    fn upload_async(
        f: &mut Federation,
        c: &str,
        trained: u64,
        b: u8,
    ) -> Result<AckStatus, Refusal> {
        let v = f.check_upload(c, trained, &SPEC, &[b; 32], 10.0)?;
        if v == UploadVerdict::New {
            let buffer = f.upload_round(trained);
            let m = UploadMeta {
                base_round: Some(trained),
                ..meta(b)
            };
            f.accept_upload(c, buffer, m)?;
        }
        Ok(v.ack_status())
    }

    #[test]
    fn async_buffers_commit_every_k_updates_and_refuse_stale_and_repeated_ones() {
        let mut f = Federation::new(async_cfg(2), SPEC, 0).unwrap();
        // a buffer opens at once, with no one sampled: every connected client may train
        let Some(Transition::RoundStarted { round: 1, selected }) = f.tick(1) else {
            panic!()
        };
        assert!(selected.is_empty());
        for c in ["a", "b", "c"] {
            f.connect(c);
            assert!(matches!(
                f.poll(c),
                Directive::Train {
                    round: 1,
                    base_version: 0,
                    ..
                }
            ));
        }
        assert_eq!(upload_async(&mut f, "a", 1, 1), Ok(AckStatus::Accepted));
        assert_eq!(f.poll("a"), Directive::AlreadyUploaded { round: 1 });
        assert_eq!(
            upload_async(&mut f, "a", 1, 9).unwrap_err().code,
            RefusalCode::DuplicateUpload
        );
        assert_eq!(f.tick(2), None, "one of two buffered");
        assert_eq!(upload_async(&mut f, "b", 1, 2), Ok(AckStatus::Accepted));
        let Some(Transition::Aggregate {
            round: 1, uploads, ..
        }) = f.tick(3)
        else {
            panic!()
        };
        assert_eq!(uploads.len(), 2);
        // while the buffer is committed, an upload is told to re-send (not dropped)
        assert_eq!(
            upload_async(&mut f, "c", 1, 3).unwrap_err().code,
            RefusalCode::RetryLater
        );
        assert_eq!(f.commit(1, 4).unwrap(), 1);
        assert_eq!(
            upload_async(&mut f, "c", 1, 3).unwrap_err().code,
            RefusalCode::RetryLater
        );
        let Some(Transition::RoundStarted { round: 2, .. }) = f.tick(5) else {
            panic!()
        };
        // c's update trained on version 0 lands in buffer 2, one buffer stale
        assert_eq!(f.upload_round(1), 2);
        assert_eq!(upload_async(&mut f, "c", 1, 3), Ok(AckStatus::Accepted));
        let Phase::Training(open) = &f.state().phase else {
            panic!()
        };
        let w = f.staleness_weight(2, &open.uploads["c"]);
        assert!((w - 0.5f64.sqrt()).abs() < 1e-12, "{w}");
        // a's update of buffer 1 is counted: its re-send is recognised, another one refused
        assert_eq!(
            upload_async(&mut f, "a", 1, 1),
            Ok(AckStatus::AlreadyAccepted)
        );
        assert_eq!(
            upload_async(&mut f, "a", 1, 7).unwrap_err().code,
            RefusalCode::DuplicateUpload
        );
        assert!(matches!(
            f.poll("a"),
            Directive::Train {
                round: 2,
                base_version: 1,
                ..
            }
        ));
        assert_eq!(upload_async(&mut f, "a", 2, 4), Ok(AckStatus::Accepted));
        assert!(matches!(
            f.tick(6),
            Some(Transition::Aggregate { round: 2, .. })
        ));
        assert_eq!(f.commit(2, 7).unwrap(), 2);
        assert!(matches!(
            f.tick(8),
            Some(Transition::RoundStarted { round: 3, .. })
        ));
        // two buffers stale is past max_staleness 1; a round not offered yet is refused
        f.connect("d");
        assert_eq!(
            upload_async(&mut f, "d", 1, 5).unwrap_err().code,
            RefusalCode::TooStale
        );
        assert_eq!(
            upload_async(&mut f, "d", 4, 5).unwrap_err().code,
            RefusalCode::WrongRound
        );
        assert_eq!(upload_async(&mut f, "d", 2, 5), Ok(AckStatus::Accepted));
        assert_eq!(upload_async(&mut f, "b", 3, 6), Ok(AckStatus::Accepted));
        assert!(matches!(
            f.tick(9),
            Some(Transition::Aggregate { round: 3, .. })
        ));
        assert_eq!(f.commit(3, 10).unwrap(), 3);
        // the last version is evaluated as in sync mode
        assert!(matches!(f.poll("a"), Directive::Evaluate { version: 3 }));
    }

    fn secure_async_cfg() -> FederationConfig {
        let mut c = async_cfg(3);
        c.max_staleness = 2;
        c.rounds = 5;
        c.min_buffer = 2;
        c.round_timeout_ms = 1_000;
        c.train.weighting = Weighting::Uniform;
        c.train.codec = crate::codec::Codec::Modular(crate::codec::ModularParams::default());
        c.train.secure = Some(crate::secagg::SecAggParams {
            threshold: 2,
            neighbours: 0,
            modulus_bits: crate::codec::ModularParams::default().modulus_bits(),
            collusion: 0,
            stage_timeout_ms: 1_000,
        });
        c
    }

    /// Secure async mode: devices announce finished updates, a cohort of `buffer` opens among
    /// them (stalest first), only its members' masked inputs count (with the round each
    /// trained in), later announcements wait for the next cohort, and stale, repeated or
    /// unoffered announcements are refused.
    #[test]
    fn secure_async_cohorts_open_among_devices_holding_an_update() {
        let mut f = Federation::new(secure_async_cfg(), SPEC, 0).unwrap();
        assert!(f.is_secure_async());
        for c in ["a", "b", "c", "d"] {
            f.connect(c);
        }
        // the buffer opens with no cohort: no session yet
        match f.tick(1) {
            Some(Transition::RoundStarted { round: 1, selected }) => assert!(selected.is_empty()),
            other => panic!("{other:?}"),
        }
        assert!(matches!(f.poll("a"), Directive::Train { round: 1, .. }));
        f.mark_ready("a", 1).unwrap();
        f.mark_ready("a", 1).unwrap();
        assert_eq!(f.poll("a"), Directive::Wait);
        assert_eq!(
            f.mark_ready("a", 2).unwrap_err().code,
            RefusalCode::WrongRound
        );
        f.mark_ready("b", 1).unwrap();
        // two of three before the timeout: no cohort
        assert_eq!(f.tick(2), None);
        f.mark_ready("c", 1).unwrap();
        let members = match f.tick(3) {
            Some(Transition::RoundStarted { round: 1, selected }) => selected,
            other => panic!("{other:?}"),
        };
        assert_eq!(members.len(), 3);
        assert_eq!(f.poll("a"), Directive::Cohort { round: 1 });
        assert_eq!(f.cohort_member("a"), Some((1, 1.0)));
        // a device that finishes during the session waits for the next cohort
        assert!(matches!(f.poll("d"), Directive::Train { round: 1, .. }));
        f.mark_ready("d", 1).unwrap();
        assert_eq!(f.poll("d"), Directive::Wait);
        assert_eq!(f.tick(4), None, "one session at a time");
        let refused = f.accept_upload("d", 1, meta(4)).unwrap_err();
        assert_eq!(refused.code, RefusalCode::NotSelected);
        for (c, b) in [("a", 1u8), ("b", 2), ("c", 3)] {
            f.accept_upload(c, 1, meta(b)).unwrap();
        }
        let Phase::Training(open) = &f.state().phase else {
            panic!()
        };
        assert!(open.uploads.values().all(|m| m.base_round == Some(1)));
        assert_eq!(f.commit(1, 5).unwrap(), 1);
        // a counted update is not announced again
        assert_eq!(
            f.tick(6),
            Some(Transition::RoundStarted {
                round: 2,
                selected: BTreeSet::new()
            })
        );
        assert_eq!(
            f.mark_ready("a", 1).unwrap_err().code,
            RefusalCode::DuplicateUpload
        );
        // after the timeout, min_buffer (2) ready devices open a cohort: d (stale, τ = 1) and a
        assert!(matches!(f.poll("a"), Directive::Train { round: 2, .. }));
        f.mark_ready("a", 2).unwrap();
        assert_eq!(f.tick(7), None);
        let members = match f.tick(7 + 1_000) {
            Some(Transition::RoundStarted { round: 2, selected }) => selected,
            other => panic!("{other:?}"),
        };
        assert_eq!(members, ["a", "d"].iter().map(|s| s.to_string()).collect());
        let s1 = f.config().staleness.weight(1);
        assert_eq!(f.cohort_member("d"), Some((1, s1)));
        assert!(s1 < 1.0);
        // a failed cohort: its members announce again
        f.fail_round(2, 2_000).unwrap();
        assert_eq!(f.cohort_member("a"), None);
        assert!(matches!(
            f.tick(2_001),
            Some(Transition::RoundStarted { round: 3, .. })
        ));
        f.mark_ready("a", 2).unwrap();
        assert_eq!(f.ready(), 1);
        // an update more than max_staleness (2) buffers old is refused, and a stale entry
        // leaves the waiting list
        f.fail_round(3, 2_002).unwrap();
        assert!(matches!(
            f.tick(2_003),
            Some(Transition::RoundStarted { round: 4, .. })
        ));
        assert_eq!(
            f.mark_ready("d", 1).unwrap_err().code,
            RefusalCode::TooStale
        );
        assert_eq!(
            f.mark_ready("b", 5).unwrap_err().code,
            RefusalCode::WrongRound
        );
        assert_eq!(
            f.ready(),
            1,
            "a's update from round 2 is 2 buffers old: still taken"
        );
    }

    #[test]
    fn secure_async_mode_needs_the_modular_codec_and_cohorts_of_two() {
        let mut c = secure_async_cfg();
        c.validate().unwrap();
        c.min_buffer = 1;
        assert!(c.validate().unwrap_err().to_string().contains("at least 2"));
        let mut c = secure_async_cfg();
        c.train.codec = crate::codec::Codec::F16;
        assert!(c.validate().unwrap_err().to_string().contains("modular"));
    }

    /// Under a client-level DP plan a version's noisy sum is divided by the public K, so a
    /// buffer takes at most K updates: one more, arriving before the tick closes the buffer,
    /// is told to send again (`RetryLater`, before and after it is stored) and counts in the
    /// next buffer. Without such a plan the buffer takes it (the divisor is Σ weights).
    #[test]
    fn an_async_buffer_under_client_level_dp_takes_at_most_k_updates() {
        use crate::client_dp::{AsyncParticipation, ClientDpMode, ClientDpPlan};
        let plan = ClientDpPlan {
            mode: ClientDpMode::Central,
            clip: 1.0,
            expected_clients: 2.0,
            sampling_rate: 1.0,
            rounds: 2,
            delta: 1e-5,
            target_epsilon: 8.0,
            min_clients: 2,
            collusion: 0,
            noise: fedlora_dp::client_level::ClientNoise::Gaussian {
                noise_multiplier: 1.0,
            },
            secure: None,
            participation: Some(AsyncParticipation { min_gap: 1 }),
        };
        for dp in [true, false] {
            let mut c = async_cfg(2);
            c.train.weighting = Weighting::Uniform;
            if dp {
                c.train.client_dp = Some(plan.clone());
            }
            let mut f = Federation::new(c, SPEC, 0).unwrap();
            f.tick(0);
            let up = |f: &mut Federation, c: &str, b: u8| -> Result<(), Refusal> {
                f.check_upload(c, 1, &SPEC, &[b; 32], 1.0)?;
                let m = UploadMeta {
                    base_round: Some(1),
                    weight: 1.0,
                    ..meta(b)
                };
                f.accept_upload(c, 1, m).map(|_| ())
            };
            up(&mut f, "a", 1).unwrap();
            up(&mut f, "b", 2).unwrap();
            // the third: refused at the first check, and at the count after its flush
            let third = up(&mut f, "c", 3);
            let late = f.accept_upload(
                "c",
                1,
                UploadMeta {
                    base_round: Some(1),
                    weight: 1.0,
                    ..meta(3)
                },
            );
            if dp {
                assert_eq!(third.unwrap_err().code, RefusalCode::RetryLater);
                assert_eq!(late.unwrap_err().code, RefusalCode::RetryLater);
                let Some(Transition::Aggregate { uploads, .. }) = f.tick(1) else {
                    panic!()
                };
                assert_eq!(uploads.len(), 2);
            } else {
                third.unwrap();
                let Some(Transition::Aggregate { uploads, .. }) = f.tick(1) else {
                    panic!()
                };
                assert_eq!(uploads.len(), 3);
            }
        }
    }

    #[test]
    fn async_buffer_commits_min_buffer_after_the_timeout_and_never_fails() {
        let c = FederationConfig {
            min_buffer: 2,
            ..async_cfg(3)
        };
        let mut f = Federation::new(c, SPEC, 0).unwrap();
        f.tick(0);
        upload_async(&mut f, "a", 1, 1).unwrap();
        // past the deadline with one of min_buffer 2: it waits, it does not fail
        assert_eq!(f.tick(5_000), None);
        assert!(matches!(f.state().phase, Phase::Training(_)));
        upload_async(&mut f, "b", 1, 2).unwrap();
        assert!(matches!(
            f.tick(5_001),
            Some(Transition::Aggregate { round: 1, .. })
        ));
        // a state written at the commit carries what was counted, so a restart still knows
        f.commit(1, 5_002).unwrap();
        let again = Federation::resume(f.config().clone(), SPEC, f.state().clone(), 6_000);
        assert_eq!(again.state().contributed["a"].trained_round, 1);
        let mut again = again;
        again.tick(6_001);
        assert_eq!(
            upload_async(&mut again, "a", 1, 1),
            Ok(AckStatus::AlreadyAccepted)
        );
    }

    #[test]
    fn async_concurrency_bounds_the_devices_holding_an_offer() {
        let c = FederationConfig {
            concurrency: 2,
            ..async_cfg(2)
        };
        let mut f = Federation::new(c, SPEC, 0).unwrap();
        f.tick(0);
        for c in ["a", "b", "c"] {
            f.connect(c);
        }
        assert!(matches!(f.poll("a"), Directive::Train { .. }));
        assert!(matches!(f.poll("b"), Directive::Train { .. }));
        assert_eq!(f.poll("c"), Directive::Wait, "two hold offers");
        // asking again keeps one's own offer
        assert!(matches!(f.poll("a"), Directive::Train { .. }));
        assert_eq!(f.training(), 2);
        // an upload, a decline or a disconnect answers an offer
        upload_async(&mut f, "a", 1, 1).unwrap();
        assert!(matches!(f.poll("c"), Directive::Train { .. }));
        f.decline("c", 1, DeclineReason::NotEnoughTime).unwrap();
        // a second decline of one buffer is refused (each one rewrites the round's record)
        assert!(f.decline("c", 1, DeclineReason::NotEnoughTime).is_err());
        f.disconnect("b");
        assert_eq!(f.training(), 0);
        // an offer not answered within round_timeout_ms lapses, however often its holder asks
        f.connect("b");
        assert!(matches!(f.poll("b"), Directive::Train { .. }));
        f.tick(10);
        assert!(matches!(f.poll("b"), Directive::Train { .. }));
        assert_eq!(f.tick(500), None);
        assert_eq!(f.training(), 1);
        f.tick(1_011);
        assert_eq!(f.training(), 0);
    }

    #[test]
    fn async_mode_refuses_what_it_cannot_weigh() {
        let mut c = async_cfg(2);
        c.validate().unwrap();
        c.min_buffer = 3;
        assert!(c.validate().unwrap_err().to_string().contains("min_buffer"));
        let mut c = async_cfg(2);
        c.train.codec = crate::codec::Codec::Modular(Default::default());
        c.train.weighting = Weighting::Uniform;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("float codec"));
        let mut c = async_cfg(2);
        c.strategy = crate::strategy::StrategyConfig::from_name("median").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("does not weigh"));
        let mut c = async_cfg(2);
        c.staleness = "poly:1100".parse().unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("positive number"));
    }

    #[test]
    fn full_federation_with_straggler_and_eval() {
        let mut f = Federation::new(cfg(), SPEC, 0).unwrap();
        for c in ["a", "b", "c", "d"] {
            f.connect(c);
        }
        let Some(Transition::RoundStarted { round, selected }) = f.tick(1) else {
            panic!()
        };
        assert_eq!(round, 1);
        assert_eq!(selected.len(), 3);
        let outsider = ["a", "b", "c", "d"]
            .into_iter()
            .find(|c| !selected.contains(*c))
            .unwrap();
        assert_eq!(f.poll(outsider), Directive::Wait);
        let sel: Vec<_> = selected.iter().cloned().collect();
        assert!(matches!(
            f.poll(&sel[0]),
            Directive::Train {
                round: 1,
                base_version: 0,
                evaluate: true,
                ..
            }
        ));
        assert_eq!(upload(&mut f, &sel[0], 1, 1), Ok(AckStatus::Accepted));
        assert_eq!(
            upload(&mut f, &sel[0], 1, 1),
            Ok(AckStatus::AlreadyAccepted)
        );
        assert_eq!(
            upload(&mut f, &sel[0], 1, 2).unwrap_err().code,
            RefusalCode::DuplicateUpload
        );
        assert_eq!(f.poll(&sel[0]), Directive::AlreadyUploaded { round: 1 });
        assert_eq!(
            upload(&mut f, outsider, 1, 3).unwrap_err().code,
            RefusalCode::NotSelected
        );
        assert_eq!(
            upload(&mut f, &sel[1], 7, 3).unwrap_err().code,
            RefusalCode::WrongRound
        );
        upload(&mut f, &sel[1], 1, 4).unwrap();
        // third participant straggles: nothing happens before the deadline
        assert_eq!(f.tick(500), None);
        let Some(Transition::Aggregate {
            round: 1,
            uploads,
            missing,
        }) = f.tick(1_001)
        else {
            panic!()
        };
        assert_eq!(uploads.len(), 2);
        assert!(missing.contains(&sel[2]));
        assert_eq!(f.commit(1, 1_002).unwrap(), 1);
        // an upload for the committed round is now a replay
        assert_eq!(
            upload(&mut f, &sel[2], 1, 5).unwrap_err().code,
            RefusalCode::WrongRound
        );
        let Some(Transition::RoundStarted { round: 2, selected }) = f.tick(1_003) else {
            panic!()
        };
        for (i, c) in selected.iter().enumerate() {
            upload(&mut f, c, 2, 10 + i as u8).unwrap();
        }
        assert!(matches!(f.tick(1_004), Some(Transition::Aggregate { .. })));
        assert_eq!(f.commit(2, 1_005).unwrap(), 2);
        assert!(f.tick(1_006).is_none());
        assert_eq!(f.poll("a"), Directive::Evaluate { version: 2 });
        // checking a report records nothing: the final evaluation cannot end on a report that
        // is checked but not yet stored
        for c in ["a", "b", "c", "d"] {
            f.check_eval(c, 2).unwrap();
        }
        assert!(f.tick(1_006).is_none());
        assert_eq!(f.poll("a"), Directive::Evaluate { version: 2 });
        assert_eq!(
            f.check_eval("a", 1).unwrap_err().code,
            RefusalCode::WrongRound
        );
        for c in ["a", "b", "c", "d"] {
            f.record_eval(c, 2).unwrap();
        }
        assert_eq!(
            f.check_eval("a", 2).unwrap_err().code,
            RefusalCode::DuplicateUpload
        );
        assert_eq!(
            f.record_eval("a", 2).unwrap_err().code,
            RefusalCode::DuplicateUpload
        );
        assert_eq!(f.tick(1_007), Some(Transition::Finished { success: true }));
        assert_eq!(f.poll("a"), Directive::Finished { version: 2 });
    }

    /// One client claiming a huge dataset would make its delta the global one (1e300 was
    /// accepted before the bound): a weight above `max_upload_weight` is refused, one at the
    /// bound is accepted, and a bound that could not bound anything is refused at configuration.
    #[test]
    fn an_upload_weight_above_the_maximum_is_refused() {
        let mut c = cfg();
        c.max_upload_weight = 1_000.0;
        let mut f = Federation::new(c, SPEC, 0).unwrap();
        for c in ["a", "b", "c"] {
            f.connect(c);
        }
        let Some(Transition::RoundStarted { round, selected }) = f.tick(1) else {
            panic!()
        };
        let who = selected.iter().next().unwrap().clone();
        for w in [1_001.0, 1e300, f64::MAX] {
            let e = f.check_upload(&who, round, &SPEC, &[1; 32], w).unwrap_err();
            assert_eq!(e.code, RefusalCode::BadWeight, "{w}");
        }
        assert_eq!(
            f.check_upload(&who, round, &SPEC, &[1; 32], 1_000.0),
            Ok(UploadVerdict::New)
        );
        for bad in [0.5, f64::INFINITY, f64::NAN] {
            let mut c = cfg();
            c.max_upload_weight = bad;
            assert!(c.validate().is_err(), "{bad}");
        }
    }

    /// A campaign gives up after `max_failed_rounds` failures in a row, not after that many
    /// failures spread between commits (before, the count never reset, and a long campaign at
    /// a failure rate of a few percent ended early).
    #[test]
    fn only_consecutive_failures_end_the_campaign() {
        let mut c = cfg();
        c.rounds = 10;
        c.max_failed_rounds = 1;
        let mut f = Federation::new(c, SPEC, 0).unwrap();
        for c in ["a", "b", "c"] {
            f.connect(c);
        }
        let mut now = 1;
        let open = |f: &mut Federation, now: &mut u64| loop {
            *now += 1;
            if let Some(Transition::RoundStarted { round, .. }) = f.tick(*now) {
                return round;
            }
            assert!(*now < 1_000_000, "no round opened");
        };
        for _ in 0..3 {
            // one failure, then a commit: never two in a row
            let r = open(&mut f, &mut now);
            f.fail_round(r, now).unwrap();
            assert!(!f.is_finished(), "one failure after a commit ends nothing");
            let r = open(&mut f, &mut now);
            f.commit(r, now).unwrap();
        }
        assert_eq!(f.state().global_version, 3);
        // two in a row pass the limit of 1
        let r = open(&mut f, &mut now);
        f.fail_round(r, now).unwrap();
        let r = open(&mut f, &mut now);
        f.fail_round(r, now).unwrap();
        assert!(f.is_finished());
    }

    #[test]
    fn round_below_min_fails_and_is_retried_with_new_id() {
        let mut f = Federation::new(cfg(), SPEC, 0).unwrap();
        f.connect("a");
        assert_eq!(f.tick(100), None, "one client is below min_clients");
        f.connect("b");
        assert_eq!(f.tick(200), None, "grace period not over");
        assert!(matches!(
            f.tick(600),
            Some(Transition::RoundStarted { round: 1, .. })
        ));
        upload(&mut f, "a", 1, 1).unwrap();
        let Some(Transition::RoundFailed { round: 1, .. }) = f.tick(1_700) else {
            panic!()
        };
        assert_eq!(f.state().global_version, 0);
        let Some(Transition::RoundStarted { round: 2, .. }) = f.tick(2_300) else {
            panic!()
        };
        assert_eq!(
            upload(&mut f, "a", 1, 1).unwrap_err().code,
            RefusalCode::WrongRound
        );
    }

    #[test]
    fn resume_keeps_accepted_uploads() {
        let mut f = Federation::new(cfg(), SPEC, 0).unwrap();
        for c in ["a", "b", "c"] {
            f.connect(c);
        }
        f.tick(1);
        upload(&mut f, "a", 1, 1).unwrap();
        let saved = f.state().clone();
        let bytes = bincode::serde::encode_to_vec(&saved, bincode::config::standard()).unwrap();
        let (state, _): (FederationState, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        let mut g = Federation::resume(cfg(), SPEC, state, 50_000);
        assert_eq!(g.poll("a"), Directive::AlreadyUploaded { round: 1 });
        assert_eq!(upload(&mut g, "a", 1, 1), Ok(AckStatus::AlreadyAccepted));
        // deadline was refreshed: no failure right after restart
        assert_eq!(g.tick(50_001), None);
        upload(&mut g, "b", 1, 2).unwrap();
        upload(&mut g, "c", 1, 3).unwrap();
        let Some(Transition::Aggregate { uploads, .. }) = g.tick(50_002) else {
            panic!()
        };
        assert_eq!(uploads.len(), 3);
    }

    /// A re-send of an upload whose acknowledgement was lost is `AlreadyAccepted` after its
    /// round committed too (a restarted coordinator can commit a round whose uploads were all
    /// stored before the client re-sends); another payload for that round stays refused.
    #[test]
    fn a_counted_upload_sent_again_after_its_round_committed_is_already_accepted() {
        let mut f = Federation::new(cfg(), SPEC, 0).unwrap();
        for c in ["a", "b", "c"] {
            f.connect(c);
        }
        f.tick(1);
        for (c, b) in [("a", 1), ("b", 2), ("c", 3)] {
            upload(&mut f, c, 1, b).unwrap();
        }
        let Some(Transition::Aggregate { round, .. }) = f.tick(2) else {
            panic!()
        };
        f.commit(round, 3).unwrap();
        let bytes = bincode::serde::encode_to_vec(f.state(), bincode::config::standard()).unwrap();
        let (state, _): (FederationState, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        let g = Federation::resume(cfg(), SPEC, state, 10);
        assert_eq!(
            g.check_upload("b", 1, &SPEC, &[2; 32], 10.0),
            Ok(UploadVerdict::AlreadyAccepted)
        );
        assert_eq!(
            g.check_upload("b", 1, &SPEC, &[9; 32], 10.0)
                .unwrap_err()
                .code,
            RefusalCode::WrongRound
        );
    }

    /// A client that declined cannot upload as well (before, it was counted twice towards
    /// "all in", and the round closed while another participant was still training).
    #[test]
    fn a_client_that_declined_cannot_also_upload() {
        let mut f = Federation::new(cfg(), SPEC, 0).unwrap();
        for c in ["a", "b", "c"] {
            f.connect(c);
        }
        f.tick(0);
        f.decline("c", 1, DeclineReason::Budget).unwrap();
        assert_eq!(
            f.check_upload("c", 1, &SPEC, &[3; 32], 10.0)
                .unwrap_err()
                .code,
            RefusalCode::Declined
        );
        assert_eq!(
            f.accept_upload("c", 1, meta(3)).unwrap_err().code,
            RefusalCode::Declined,
            "counting refuses it too (the committer counts what it checked a moment before)"
        );
        upload(&mut f, "a", 1, 1).unwrap();
        // b is still training: the round is not all in
        assert_eq!(f.tick(10), None);
    }

    #[test]
    fn a_declined_participant_is_not_waited_for() {
        let mut f = Federation::new(cfg(), SPEC, 0).unwrap();
        for c in ["a", "b", "c"] {
            f.connect(c);
        }
        f.tick(0);
        upload(&mut f, "a", 1, 1).unwrap();
        upload(&mut f, "b", 1, 2).unwrap();
        assert_eq!(f.tick(10), None);
        assert_eq!(
            f.decline("c", 2, DeclineReason::Budget).unwrap_err().code,
            RefusalCode::WrongRound
        );
        f.decline("c", 1, DeclineReason::Budget).unwrap();
        assert_eq!(f.poll("c"), Directive::Wait);
        let Some(Transition::Aggregate {
            uploads, missing, ..
        }) = f.tick(11)
        else {
            panic!()
        };
        assert_eq!(uploads.len(), 2);
        assert!(missing.is_empty());
        assert_eq!(
            f.decline("a", 1, DeclineReason::Budget).unwrap_err().code,
            RefusalCode::WrongRound
        );
    }

    #[test]
    fn dp_plans_need_uniform_weights() {
        let mut c = cfg();
        c.train.dp = Some(crate::message::DpPlan {
            clip_norm: 1.0,
            planned_rounds: 2,
        });
        assert!(c.validate().is_err());
        c.train.weighting = Weighting::Uniform;
        assert!(c.validate().is_ok());
        c.train.dp.as_mut().unwrap().planned_rounds = 1;
        assert!(c.validate().is_err());
    }

    #[test]
    fn sampling_is_seeded() {
        let pick = |seed| {
            let mut c = cfg();
            c.seed = seed;
            let mut f = Federation::new(c, SPEC, 0).unwrap();
            for i in 0..20 {
                f.connect(&format!("c{i}"));
            }
            match f.tick(0) {
                Some(Transition::RoundStarted { selected, .. }) => selected,
                _ => panic!(),
            }
        };
        assert_eq!(pick(1), pick(1));
        assert_ne!(pick(1), pick(2));
    }

    #[test]
    fn weights_follow_the_rule() {
        let mut c = cfg();
        c.train.weighting = Weighting::Uniform;
        let mut f = Federation::new(c, SPEC, 0).unwrap();
        for x in ["a", "b", "c"] {
            f.connect(x);
        }
        f.tick(0);
        let e = f.check_upload("a", 1, &SPEC, &[0; 32], 12.0).unwrap_err();
        assert_eq!(e.code, RefusalCode::BadWeight);
        assert!(f.check_upload("a", 1, &SPEC, &[0; 32], 1.0).is_ok());
        let e = f.check_upload("a", 1, &[0; 32], &[0; 32], 1.0).unwrap_err();
        assert_eq!(e.code, RefusalCode::SpecMismatch);
    }

    #[test]
    fn fedavg_is_the_weighted_mean() {
        let spec = AdapterSpec::new(vec![TensorSpec {
            name: "t".into(),
            shape: vec![3],
        }])
        .unwrap();
        let g = FlatAdapter::new(spec.clone(), vec![1.0, 2.0, 3.0]).unwrap();
        let d1 = FlatAdapter::new(spec.clone(), vec![1.0, 0.0, -1.0]).unwrap();
        let d2 = FlatAdapter::new(spec, vec![4.0, 3.0, 2.0]).unwrap();
        let out = fedavg(&g, &[(1.0, d1), (2.0, d2)]).unwrap();
        assert_eq!(out.values(), &[4.0, 4.0, 4.0]);
        assert!(fedavg(&g, &[]).is_err());
    }
}
