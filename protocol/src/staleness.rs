//! The staleness weight s(τ) of async (buffered) federation and the plan offers carry: an
//! update τ versions staler than the version it is aggregated into weighs s(τ) ∈ (0, 1].
//! A module of its own, below both the wire messages and the round machine that use it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;

/// The weight s(τ) of an update τ versions staler than the version it is aggregated into.
/// Written `constant`, `poly:A` or `hinge:A,B` in configs and flags.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Staleness {
    /// s(τ) = 1.
    Constant,
    /// s(τ) = (1 + τ)^(−a), a ≥ 0 (FedBuff's default is a = 0.5).
    Polynomial {
        /// The exponent a.
        a: f64,
    },
    /// s(τ) = 1 for τ ≤ b, else 1 / (a·(τ − b) + 1), a ≥ 0, b ≥ 0.
    Hinge {
        /// The slope a.
        a: f64,
        /// The knee b, versions.
        b: f64,
    },
}

impl Default for Staleness {
    fn default() -> Self {
        Staleness::Polynomial { a: 0.5 }
    }
}

impl Staleness {
    /// s(τ) for an update `tau` versions stale: in (0, 1], non-increasing in τ.
    pub fn weight(&self, tau: u64) -> f64 {
        let t = tau as f64;
        match *self {
            Staleness::Constant => 1.0,
            Staleness::Polynomial { a } => (1.0 + t).powf(-a),
            Staleness::Hinge { a, b } => {
                if t <= b {
                    1.0
                } else {
                    1.0 / (a * (t - b) + 1.0)
                }
            }
        }
    }

    fn check(self) -> Result<Self, ProtocolError> {
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        let valid = match self {
            Staleness::Constant => true,
            Staleness::Polynomial { a } => ok(a),
            Staleness::Hinge { a, b } => ok(a) && ok(b),
        };
        if valid {
            Ok(self)
        } else {
            Err(ProtocolError::Config(format!(
                "staleness {self}: its parameters must be finite and ≥ 0"
            )))
        }
    }
}

impl fmt::Display for Staleness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Staleness::Constant => write!(f, "constant"),
            Staleness::Polynomial { a } => write!(f, "poly:{a}"),
            Staleness::Hinge { a, b } => write!(f, "hinge:{a},{b}"),
        }
    }
}

impl FromStr for Staleness {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self, ProtocolError> {
        let bad = || {
            ProtocolError::Config(format!(
                "staleness {s:?}: expected constant, poly:A or hinge:A,B"
            ))
        };
        let num = |x: &str| x.trim().parse::<f64>().map_err(|_| bad());
        let parsed = match s.split_once(':') {
            None if s == "constant" => Staleness::Constant,
            Some(("poly", a)) => Staleness::Polynomial { a: num(a)? },
            Some(("hinge", ab)) => {
                let (a, b) = ab.split_once(',').ok_or_else(bad)?;
                Staleness::Hinge {
                    a: num(a)?,
                    b: num(b)?,
                }
            }
            _ => return Err(bad()),
        };
        parsed.check()
    }
}

impl TryFrom<String> for Staleness {
    type Error = ProtocolError;
    fn try_from(s: String) -> Result<Self, ProtocolError> {
        s.parse()
    }
}

impl From<Staleness> for String {
    fn from(s: Staleness) -> String {
        s.to_string()
    }
}

/// Async mode's staleness weighting, as offers carry it: a device in a secure cohort computes
/// its own weight s(τ) from it (τ = the cohort's round − the round it trained in) instead of
/// taking one from the coordinator, and binds it into what its cohort signs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StalenessPlan {
    /// s(τ).
    pub weight: Staleness,
    /// S: the stalest update (in buffers) that is taken.
    pub max_staleness: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staleness_parses_round_trips_and_weighs_in_unit_interval() {
        for s in ["constant", "poly:0.5", "hinge:10,4"] {
            let p: Staleness = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
        }
        let poly: Staleness = "poly:0.5".parse().unwrap();
        assert_eq!(poly.weight(0), 1.0);
        assert!((poly.weight(3) - 0.5).abs() < 1e-12);
        let hinge: Staleness = "hinge:1,2".parse().unwrap();
        assert_eq!(hinge.weight(2), 1.0);
        assert!((hinge.weight(4) - 1.0 / 3.0).abs() < 1e-12);
        for s in [poly, hinge, Staleness::Constant] {
            let mut last = 1.0;
            for t in 0..200 {
                let w = s.weight(t);
                assert!(w > 0.0 && w <= last, "{s} at {t}: {w}");
                last = w;
            }
        }
        for bad in [
            "poly",
            "poly:-1",
            "hinge:1",
            "poly:nan",
            "linear:1",
            "hinge:1,inf",
        ] {
            assert!(bad.parse::<Staleness>().is_err(), "{bad}");
        }
    }
}
