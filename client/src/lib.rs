//! fedlora's federated client SDK: sessions over QUIC ([`transport`], [`sdk`]), the secure
//! aggregation stages ([`secure`]), client-level DP ([`client_dp`]), the privacy ledgers and
//! statements ([`privacy`], [`statement`]), eligibility ([`eligibility`]) and enrollment
//! ([`enroll`]). Local training runs on the engine in `fedlora-train`.

pub mod client_dp;
pub mod durable;
pub mod eligibility;
pub mod enroll;
pub mod error;
pub mod privacy;
pub mod sdk;
pub mod secure;
pub mod statement;
pub mod transport;

pub use error::ClientError;
