//! fedlora's differential privacy: mechanisms as events, an RDP accountant for the
//! Poisson-subsampled Gaussian mechanism, noise calibration to a target ε, L2 clipping and
//! Gaussian noise on flat buffers, and the per-client budget ledger. No burn, no I/O.
//!
//! # Unit of privacy
//! One training example: one non-overlapping context window of one client's text
//! (add/remove-one-example neighbours). A record of k windows (a whole speech, a document) is
//! protected with group privacy: for RDP, a group of k examples costs roughly k² times the RDP of
//! one at the same order; in (ε, δ) terms at least kε with δ growing to about k·e^{(k−1)ε}δ.
//!
//! # What a client under a privacy target releases (the whole list)
//! The guarantee covers everything such a client sends that depends on its data. The wire type
//! of a DP round's upload (`PrivateUpload` in `fedlora-protocol`) has no field for anything
//! else, and the client refuses example-count weighting.
//!
//! | released | sensitivity (add/remove one example) | noise | accounted as |
//! |---|---|---|---|
//! | the adapter delta (`PrivateUpload.payload`), after any codec and secure masking | per step: C (each example's gradient is clipped to L2 norm C over all adapter tensors jointly) | per step: N(0, σ²C²) on the clipped sum over the Poisson batch, then ÷ expected batch B | `DpEvent::dp_sgd(q = B/n, σ, local_steps)` per round, in the ledger before training starts; compression, masking and the optimizer are post-processing |
//! | opt-in only (`PrivacyTarget::loss_clip = Some(L)`): the training loss, `PrivateUpload.noised_train_loss` | per step: L (per-example losses clipped to [0, L], summed over the same Poisson batch) | per step: N(0, σ²L²) ([`noisy_clipped_sum`]), then ÷ B, averaged over steps | with the step: gradient and loss together are one Gaussian mechanism of multiplier σ/√2, so the ledger records `dp_sgd(q, σ/√2, steps)` and σ is calibrated √2 larger |
//! | the round id, the spec hash, the frame's length | 0: fixed by the coordinator and the codec, not by the data | none | nothing |
//! | `Decline { reason }`: one of a fixed list (`DeclineReason`) | depends on the ledger and the plan, not on the examples, except `DataShrank` (n fell below the n the plan was calibrated for; a device whose data shrinks reveals that it did) | none | nothing |
//! | `EvalWithheld { version }` | 0 | none | nothing |
//!
//! Not released: the raw training loss, held-out losses and token counts (a DP client withholds
//! its evaluations), the number of examples n, and ε spent (it depends on q = B/n); the
//! device's ledger is the record of ε. The weight of every DP upload is 1. The sampling rate
//! the trainer uses, B/n with the current n, is never above the q the ledger records: a round
//! on fewer examples than at calibration is declined.

pub mod analytic;
pub mod audit;
pub mod calibrate;
pub mod client_level;
pub mod error;
pub mod event;
pub mod ledger;
pub mod mechanism;
pub mod pld;
pub mod rdp;
pub mod rdp_conversion;
pub mod skellam;

pub use calibrate::noise_multiplier;
pub use error::DpError;
pub use event::DpEvent;
pub use ledger::{Accountant, PrivacyLedger};
pub use mechanism::{clip_l2, l2_norm, noisy_clipped_sum, GaussianNoise};
pub use rdp::{dp_sgd_epsilon, RdpAccountant};
