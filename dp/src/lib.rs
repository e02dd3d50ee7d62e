//! fedlora's differential privacy: mechanisms as events, an RDP accountant for the
//! Poisson-subsampled Gaussian mechanism, noise calibration to a target ε, L2 clipping and
//! Gaussian noise on flat buffers, and the per-client budget ledger. No burn, no I/O.
//!
//! # Unit of privacy
//! One training example: one non-overlapping context window of one client's text
//! (add/remove-one-example neighbours). A record of k windows (a whole speech, a document) is
//! protected with group privacy: for RDP, a group of k examples costs roughly k² times the RDP of
//! one at the same order; in (ε, δ) terms at least kε with δ growing to about k·e^{(k−1)ε}δ. The
//! guarantee covers everything a client sends that depends on its data: the adapter delta is
//! post-processing of DP-SGD outputs (as are compression and masking), and under DP uploads
//! carry a uniform weight instead of an example count.

pub mod analytic;
pub mod calibrate;
pub mod error;
pub mod event;
pub mod ledger;
pub mod mechanism;
pub mod pld;
pub mod rdp;

pub use calibrate::noise_multiplier;
pub use error::DpError;
pub use event::DpEvent;
pub use ledger::{Accountant, PrivacyLedger};
pub use mechanism::{clip_l2, l2_norm, GaussianNoise};
pub use rdp::{dp_sgd_epsilon, RdpAccountant};
