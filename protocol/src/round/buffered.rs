//! Buffered asynchronous federation (FedBuff, Nguyen et al., AISTATS 2022): the mode setting
//! and what a device contributed (the staleness weight is [`crate::staleness`]).
//!
//! In async mode a device trains whenever it asks for work, on the newest global version, and
//! its delta goes into a buffer; when `buffer` updates are buffered the coordinator commits
//! the next version with
//!
//! ```text
//! x ← x + η · Σ wᵢ·s(τᵢ)·Δᵢ / Σ wᵢ·s(τᵢ),   τᵢ = (version being built) − 1 − (base version of i)
//! ```
//!
//! where wᵢ is the upload's weight (1 under uniform weighting, which gives FedBuff's
//! Σ s(τᵢ)·Δᵢ / Σ s(τᵢ)) and η comes from the strategy's server optimizer. Every s(τ) is in
//! (0, 1], so a stale update never counts more than a fresh one.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;

/// How the federation turns uploads into versions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Synchronous rounds: `clients_per_round` devices are sampled, each round waits for them
    /// (or its deadline) and commits one version.
    #[default]
    Sync,
    /// Buffered asynchronous (FedBuff): any connected device trains on the newest version when
    /// it asks; `buffer` accepted updates commit the next version, weighted by staleness.
    Async,
}

impl Mode {
    /// The mode's name as written in configs ("sync" or "async").
    pub fn name(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
        }
    }
}

impl FromStr for Mode {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self, ProtocolError> {
        match s {
            "sync" => Ok(Mode::Sync),
            "async" => Ok(Mode::Async),
            other => Err(ProtocolError::Config(format!(
                "mode {other:?}: expected \"sync\" or \"async\""
            ))),
        }
    }
}

/// What a device has contributed in async mode, persisted so a re-send of an update whose
/// version already committed is recognised and none is counted twice.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Contribution {
    /// The round (version + 1) the device trained in, i.e. its update's base.
    pub trained_round: u64,
    /// SHA-256 of that update's payload.
    pub digest: [u8; 32],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_parses() {
        assert_eq!("async".parse::<Mode>().unwrap(), Mode::Async);
        assert!("buffered".parse::<Mode>().is_err());
    }
}
