//! When a device may train: an [`Eligibility`] check the SDK consults before it accepts a round
//! and before each local step, and the default Linux check ([`LinuxEligibility`]: mains power
//! or a charged battery, a load average under a limit, a daily time window).
//!
//! A check answers from a fixed list ([`Ineligible`]), and the decline the coordinator records
//! carries only that ([`fedlora_protocol::DeclineReason`]): nothing about the device's data.

use std::path::{Path, PathBuf};

pub use fedlora_train::eligibility::{Always, Eligibility, Ineligible, SharedEligibility};

/// A daily window of UTC time, minutes after midnight; it may wrap past midnight
/// (`22:00-06:00`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeWindow {
    /// First minute of the window (0..1440), UTC.
    pub start_min: u16,
    /// First minute after the window (0..1440), UTC; equal to `start_min` means all day.
    pub end_min: u16,
}

impl TimeWindow {
    /// Parses `HH:MM-HH:MM` (UTC).
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("time window `{s}`: expected HH:MM-HH:MM (UTC)");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let minute = |t: &str| -> Result<u16, String> {
            let (h, m) = t.trim().split_once(':').ok_or_else(bad)?;
            let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
            if h > 23 || m > 59 {
                return Err(bad());
            }
            Ok(h * 60 + m)
        };
        Ok(Self {
            start_min: minute(a)?,
            end_min: minute(b)?,
        })
    }

    /// Whether `minute` (after UTC midnight) lies in the window.
    pub fn contains(&self, minute: u16) -> bool {
        let (s, e) = (self.start_min, self.end_min);
        match s.cmp(&e) {
            std::cmp::Ordering::Equal => true,
            std::cmp::Ordering::Less => (s..e).contains(&minute),
            std::cmp::Ordering::Greater => minute >= s || minute < e,
        }
    }
}

/// Settings of [`LinuxEligibility`].
#[derive(Clone, Debug, PartialEq)]
pub struct LinuxEligibilityConfig {
    /// Where the kernel lists power supplies (default `/sys/class/power_supply`).
    pub power_supply_dir: PathBuf,
    /// Where the kernel reports the load average (default `/proc/loadavg`).
    pub loadavg_path: PathBuf,
    /// Train only on mains power (an online `Mains` or `USB` supply, or no battery at all).
    /// Default true.
    pub require_mains: bool,
    /// The least battery charge, percent, when a battery is present (default 50).
    pub min_battery_percent: u8,
    /// The highest 1-minute load average per CPU core (default 0.8). `None`: no limit.
    pub max_load_per_core: Option<f64>,
    /// Train only within this daily window (UTC). `None`: any time.
    pub window: Option<TimeWindow>,
}

impl Default for LinuxEligibilityConfig {
    fn default() -> Self {
        Self {
            power_supply_dir: "/sys/class/power_supply".into(),
            loadavg_path: "/proc/loadavg".into(),
            require_mains: true,
            min_battery_percent: 50,
            max_load_per_core: Some(0.8),
            window: None,
        }
    }
}

/// The default check on Linux: power from `/sys/class/power_supply`, load from
/// `/proc/loadavg`, the clock for the window. A device with no power-supply entries (a board
/// on a wall adapter) counts as on mains; an unreadable load average counts as idle.
#[derive(Clone, Debug, Default)]
pub struct LinuxEligibility {
    /// Its settings.
    pub config: LinuxEligibilityConfig,
}

/// What the power-supply directory says.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PowerState {
    /// An online mains or USB supply.
    pub mains_online: bool,
    /// Batteries present.
    pub batteries: usize,
    /// The lowest charge of the batteries present, percent.
    pub min_battery_percent: Option<u8>,
}

/// Reads `dir` (a `/sys/class/power_supply` layout: one directory per supply with `type`,
/// `online`, `capacity`).
pub fn read_power(dir: &Path) -> PowerState {
    let mut p = PowerState::default();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return p;
    };
    let read = |d: &Path, f: &str| {
        std::fs::read_to_string(d.join(f))
            .ok()
            .map(|s| s.trim().to_string())
    };
    for e in entries.flatten() {
        let d = e.path();
        match read(&d, "type").as_deref() {
            Some("Mains") | Some("USB") if read(&d, "online").as_deref() == Some("1") => {
                p.mains_online = true;
            }
            Some("Battery") => {
                // a battery that says it is absent does not count
                if read(&d, "present").as_deref() == Some("0") {
                    continue;
                }
                p.batteries += 1;
                if let Some(c) = read(&d, "capacity").and_then(|c| c.parse::<u8>().ok()) {
                    p.min_battery_percent = Some(p.min_battery_percent.map_or(c, |m| m.min(c)));
                }
            }
            _ => {}
        }
    }
    p
}

impl LinuxEligibility {
    /// The check with `config`.
    pub fn new(config: LinuxEligibilityConfig) -> Self {
        Self { config }
    }

    /// The verdict for a given power state, 1-minute load per core and UTC minute of the day.
    pub fn decide(
        &self,
        power: PowerState,
        load_per_core: Option<f64>,
        minute: u16,
    ) -> Result<(), Ineligible> {
        let c = &self.config;
        if let Some(w) = c.window {
            if !w.contains(minute) {
                return Err(Ineligible::OutsideWindow);
            }
        }
        let on_mains = power.mains_online || power.batteries == 0;
        if c.require_mains && !on_mains {
            return Err(Ineligible::OnBattery);
        }
        if power.batteries > 0
            && power
                .min_battery_percent
                .is_some_and(|b| b < c.min_battery_percent)
        {
            return Err(Ineligible::BatteryLow);
        }
        if let (Some(max), Some(load)) = (c.max_load_per_core, load_per_core) {
            if load > max {
                return Err(Ineligible::Busy);
            }
        }
        Ok(())
    }
}

/// The 1-minute load average per core from a `/proc/loadavg` file.
pub fn read_load_per_core(path: &Path) -> Option<f64> {
    let s = std::fs::read_to_string(path).ok()?;
    let load: f64 = s.split_whitespace().next()?.parse().ok()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some(load / cores as f64)
}

/// Minutes since UTC midnight, now.
pub fn utc_minute_now() -> u16 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    ((secs % 86_400) / 60) as u16
}

impl Eligibility for LinuxEligibility {
    fn check(&self) -> Result<(), Ineligible> {
        let c = &self.config;
        // the load average is skipped when no limit is set (one file read fewer per step)
        let load = c
            .max_load_per_core
            .and_then(|_| read_load_per_core(&c.loadavg_path));
        self.decide(read_power(&c.power_supply_dir), load, utc_minute_now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supply(dir: &Path, name: &str, files: &[(&str, &str)]) {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for (f, v) in files {
            std::fs::write(d.join(f), format!("{v}\n")).unwrap();
        }
    }

    #[test]
    fn power_is_read_from_a_sysfs_layout() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_power(dir.path()), PowerState::default());
        supply(dir.path(), "AC", &[("type", "Mains"), ("online", "0")]);
        supply(
            dir.path(),
            "BAT0",
            &[("type", "Battery"), ("capacity", "35")],
        );
        supply(
            dir.path(),
            "BAT1",
            &[("type", "Battery"), ("capacity", "90")],
        );
        supply(dir.path(), "BAT2", &[("type", "Battery"), ("present", "0")]);
        let p = read_power(dir.path());
        assert_eq!(
            p,
            PowerState {
                mains_online: false,
                batteries: 2,
                min_battery_percent: Some(35)
            }
        );
        let check = LinuxEligibility::new(LinuxEligibilityConfig {
            power_supply_dir: dir.path().into(),
            max_load_per_core: None,
            ..Default::default()
        });
        assert_eq!(check.check(), Err(Ineligible::OnBattery));
        supply(dir.path(), "AC", &[("type", "Mains"), ("online", "1")]);
        // on mains, but the battery is below 50 %
        assert_eq!(check.check(), Err(Ineligible::BatteryLow));
        supply(
            dir.path(),
            "BAT0",
            &[("type", "Battery"), ("capacity", "60")],
        );
        assert_eq!(check.check(), Ok(()));
    }

    #[test]
    fn load_window_and_battery_decide_in_a_fixed_order() {
        let c = LinuxEligibility::new(LinuxEligibilityConfig {
            window: Some(TimeWindow::parse("22:00-06:00").unwrap()),
            ..Default::default()
        });
        let mains = PowerState {
            mains_online: true,
            batteries: 0,
            min_battery_percent: None,
        };
        assert_eq!(c.decide(mains, Some(0.1), 23 * 60), Ok(()));
        assert_eq!(c.decide(mains, Some(0.1), 5 * 60 + 59), Ok(()));
        assert_eq!(
            c.decide(mains, Some(0.1), 12 * 60),
            Err(Ineligible::OutsideWindow)
        );
        assert_eq!(c.decide(mains, Some(0.9), 23 * 60), Err(Ineligible::Busy));
        // no battery at all (a board on a wall adapter) counts as mains
        assert_eq!(c.decide(PowerState::default(), None, 23 * 60), Ok(()));
        let on_battery = PowerState {
            mains_online: false,
            batteries: 1,
            min_battery_percent: Some(80),
        };
        assert_eq!(
            c.decide(on_battery, None, 23 * 60),
            Err(Ineligible::OnBattery)
        );
        let lenient = LinuxEligibility::new(LinuxEligibilityConfig {
            require_mains: false,
            ..Default::default()
        });
        assert_eq!(lenient.decide(on_battery, None, 0), Ok(()));
    }

    #[test]
    fn windows_parse_and_wrap() {
        let w = TimeWindow::parse("08:30-17:00").unwrap();
        assert!(w.contains(8 * 60 + 30) && !w.contains(17 * 60) && !w.contains(0));
        assert!(TimeWindow::parse("00:00-00:00").unwrap().contains(777));
        for bad in ["8-17", "24:00-01:00", "10:60-11:00", "x"] {
            assert!(TimeWindow::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_load_average_is_read_per_core() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("loadavg");
        std::fs::write(&p, "64.00 1.0 1.0 1/100 123\n").unwrap();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        assert_eq!(read_load_per_core(&p), Some(64.0 / cores));
        assert_eq!(read_load_per_core(&dir.path().join("none")), None);
    }
}
