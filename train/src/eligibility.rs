//! Whether a device may train now: the answer ([`Ineligible`]) and the check ([`Eligibility`])
//! that the step gate ([`crate::step_gate`]) asks before each local step. The device SDK
//! (`fedlora_client::eligibility`) re-exports these beside its Linux check.
//!
//! A check answers from a fixed list ([`Ineligible`]), and the decline the coordinator records
//! carries only that ([`DeclineReason`]): nothing about the device's data.

use std::sync::Arc;

use fedlora_protocol::DeclineReason;

/// Why a device may not train now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ineligible {
    /// On battery, and the check requires mains power.
    OnBattery,
    /// The battery is below the threshold.
    BatteryLow,
    /// The load average is above the limit.
    Busy,
    /// Outside the daily training window.
    OutsideWindow,
    /// The app's own check said no.
    App,
}

impl Ineligible {
    /// The decline reason the coordinator records.
    pub fn decline_reason(self) -> DeclineReason {
        match self {
            Self::OnBattery => DeclineReason::DeviceOnBattery,
            Self::BatteryLow => DeclineReason::DeviceBatteryLow,
            Self::Busy => DeclineReason::DeviceBusy,
            Self::OutsideWindow => DeclineReason::OutsideTrainingWindow,
            Self::App => DeclineReason::DeviceNotEligible,
        }
    }
}

/// Whether the device may train now. The SDK asks before it accepts a round (a decline then
/// costs no privacy budget) and before each local step (training stops; whatever the round
/// already spent stands). Implement it for your device, or use [`LinuxEligibility`].
pub trait Eligibility: Send + Sync {
    /// `Ok(())` when the device may train now, else why not. Called once per local step, so it
    /// should take microseconds, not seconds.
    fn check(&self) -> Result<(), Ineligible>;
}

/// Always eligible (the default: a developer's machine, a test).
#[derive(Clone, Copy, Debug, Default)]
pub struct Always;

impl Eligibility for Always {
    fn check(&self) -> Result<(), Ineligible> {
        Ok(())
    }
}

impl<F: Fn() -> Result<(), Ineligible> + Send + Sync> Eligibility for F {
    fn check(&self) -> Result<(), Ineligible> {
        self()
    }
}

/// A shared eligibility check.
pub type SharedEligibility = Arc<dyn Eligibility>;
