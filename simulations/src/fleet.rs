//! Device behaviour for runs in simulated wall time: how fast each device computes, when it
//! is online, and how long its transfers take. Everything is a deterministic function of the
//! run seed and the device index.
//!
//! - **Compute speed:** device i's seconds per local step are `step_s · exp(σ·zᵢ)`, zᵢ ~ N(0, 1)
//!   (a lognormal spread of speeds, `speed_sigma` = σ).
//! - **Availability:** a diurnal pattern: device i is online while
//!   `frac(t / day_s + φᵢ) < online`, φᵢ ~ U(0, 1), so a share `online` of the fleet is online at
//!   any time, each device for one window of `online · day_s` seconds a day. The model assumes
//!   a device knows when its window ends (its charging or idle schedule) and declines work
//!   whose download, training and upload would not fit in what is left of it, in both modes
//!   (the SDK's `--max-train-secs` is how a device states such a limit).
//! - **Network:** a transfer of b bytes takes `b / uplink_bytes_per_s` up and
//!   `b / downlink_bytes_per_s` down, plus `latency_s` each way.

use rand::rngs::ChaCha20Rng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::error::SimError;

/// The `[fleet]` table of a sweep file: device behaviour. A sweep with it runs in simulated
/// wall time (see [`crate::timed`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// σ of the lognormal spread of compute speeds (1 in FedBuff's setting).
    pub speed_sigma: f64,
    /// Median seconds per local step on a device.
    pub step_s: f64,
    /// Share of the fleet online at once, in (0, 1].
    pub online: f64,
    /// Length of the availability cycle, seconds (a day).
    pub day_s: f64,
    /// Uplink, bytes per second.
    pub uplink_bytes_per_s: f64,
    /// Downlink, bytes per second.
    pub downlink_bytes_per_s: f64,
    /// One-way latency per transfer, seconds.
    pub latency_s: f64,
    /// Sync mode: how long a round waits for its sampled devices, seconds.
    pub round_timeout_s: f64,
    /// Async mode: how long a device that was told to wait (all offers taken) waits before it
    /// asks again, seconds.
    pub poll_s: f64,
    /// Every run stops at this simulated time, seconds (a version that would end later is not
    /// committed), or earlier after `rounds` versions.
    pub max_sim_s: f64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            speed_sigma: 1.0,
            step_s: 2.0,
            online: 0.2,
            day_s: 86_400.0,
            uplink_bytes_per_s: 125_000.0,
            downlink_bytes_per_s: 1_250_000.0,
            latency_s: 0.1,
            round_timeout_s: 1_800.0,
            poll_s: 60.0,
            max_sim_s: 3_600.0,
        }
    }
}

impl FleetConfig {
    /// Checks every value's range.
    pub fn validate(&self) -> Result<(), SimError> {
        let pos = |x: f64| x.is_finite() && x > 0.0;
        let ok = self.speed_sigma.is_finite()
            && self.speed_sigma >= 0.0
            && pos(self.step_s)
            && pos(self.online)
            && self.online <= 1.0
            && pos(self.day_s)
            && pos(self.uplink_bytes_per_s)
            && pos(self.downlink_bytes_per_s)
            && self.latency_s.is_finite()
            && self.latency_s >= 0.0
            && pos(self.round_timeout_s)
            && self.poll_s.is_finite()
            && self.poll_s >= 1e-3
            && self.max_sim_s.is_finite()
            && self.max_sim_s > 0.0;
        if ok {
            Ok(())
        } else {
            Err(SimError::Config(format!(
                "[fleet]: every value must be finite, times and rates positive (poll_s at \
                 least 1 ms, max_sim_s set: every run stops there), online in (0, 1]: {self:?}"
            )))
        }
    }
}

/// One device's fixed traits.
#[derive(Clone, Copy, Debug)]
pub struct Device {
    /// Seconds per local step.
    pub step_s: f64,
    /// Phase of its availability window in the cycle, in [0, 1).
    pub phase: f64,
}

/// The fleet: every device's traits.
#[derive(Clone, Debug)]
pub struct Fleet {
    cfg: FleetConfig,
    devices: Vec<Device>,
}

impl Fleet {
    /// `n` devices drawn from `seed`.
    pub fn new(cfg: FleetConfig, n: usize, seed: u64) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(crate::seed::mix_seed(seed, 0, 11));
        let devices = (0..n)
            .map(|_| {
                let z: f64 = StandardNormal.sample(&mut rng);
                Device {
                    step_s: cfg.step_s * (cfg.speed_sigma * z).exp(),
                    phase: rng.random(),
                }
            })
            .collect();
        Self { cfg, devices }
    }

    /// The settings.
    pub fn config(&self) -> &FleetConfig {
        &self.cfg
    }

    /// Device `i`'s traits.
    pub fn device(&self, i: usize) -> Device {
        self.devices[i]
    }

    /// Where device `i` is in its cycle at `t`, in [0, 1).
    fn position(&self, i: usize, t: f64) -> f64 {
        (t / self.cfg.day_s + self.devices[i].phase).rem_euclid(1.0)
    }

    /// Whether device `i` is online at `t` (seconds).
    pub fn online(&self, i: usize, t: f64) -> bool {
        self.position(i, t) < self.cfg.online
    }

    /// Seconds of device `i`'s window left at `t` (0 when it is offline; infinite when the
    /// whole fleet is always online).
    pub fn left(&self, i: usize, t: f64) -> f64 {
        if self.cfg.online >= 1.0 {
            return f64::INFINITY;
        }
        let p = self.position(i, t);
        if p < self.cfg.online {
            (self.cfg.online - p) * self.cfg.day_s
        } else {
            0.0
        }
    }

    /// When device `i` next comes online at or after `t`.
    pub fn next_online(&self, i: usize, t: f64) -> f64 {
        let p = self.position(i, t);
        if p < self.cfg.online {
            t
        } else {
            t + (1.0 - p) * self.cfg.day_s
        }
    }

    /// Seconds device `i` needs for one unit of work: downloading `down` bytes, `steps` local
    /// steps and uploading `up` bytes.
    pub fn work_s(&self, i: usize, steps: u32, down: u64, up: u64) -> f64 {
        let c = &self.cfg;
        2.0 * c.latency_s
            + down as f64 / c.downlink_bytes_per_s
            + f64::from(steps) * self.devices[i].step_s
            + up as f64 / c.uplink_bytes_per_s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_online_of_the_fleet_is_online_and_windows_are_consistent() {
        let f = Fleet::new(FleetConfig::default(), 2_000, 7);
        for t in [0.0, 10_000.0, 50_000.0] {
            let on = (0..2_000).filter(|&i| f.online(i, t)).count() as f64 / 2_000.0;
            assert!((on - 0.2).abs() < 0.04, "{on} online at {t}");
        }
        for i in 0..50 {
            let t = 12_345.0;
            let n = f.next_online(i, t);
            assert!(n >= t && f.online(i, n + 1e-6));
            if f.online(i, t) {
                assert!(f.left(i, t) > 0.0 && !f.online(i, t + f.left(i, t) + 1e-3));
            }
        }
        // a lognormal spread of speeds around the median
        let mut s: Vec<f64> = (0..2_000).map(|i| f.device(i).step_s).collect();
        s.sort_by(f64::total_cmp);
        assert!((s[1_000] / 2.0 - 1.0).abs() < 0.15, "median {}", s[1_000]);
        assert!(
            s[1_900] / s[1_000] > 3.5,
            "σ = 1: the 95th percentile is 5.2× the median"
        );
    }
}
