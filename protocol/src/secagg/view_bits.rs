//! A survivor view on the wire: who survived and who dropped, as two bitmaps over the round's
//! roster in its order (ascending ids), instead of the ids themselves.
//!
//! Every client of a secure round receives the survivor view twice (to sign it, then with its
//! unmask task). As sets of ids that is O(n) ids per message: about 120 KB at n = 10,000, which
//! each client also had to parse into ordered sets. As bitmaps it is ⌈n ÷ 8⌉ bytes per set
//! (1,250 B at n = 10,000). Both ends hold the roster already (the client checked it against the
//! Merkle root when it shared keys), so the view means exactly what the ids meant: a client
//! expands it against the roster it checked, and a bitmap that does not fit that roster is
//! refused as the coordinator's misbehaviour. What the client signs is unchanged (the expanded
//! [`UnmaskRequest`]).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::{SecAggError, UnmaskRequest};
use crate::identity::ClientId;
use crate::limits::MAX_ROSTER;

/// A survivor view as bitmaps over the roster: bit `i` (byte `i ÷ 8`, bit `i mod 8`, least
/// significant first) stands for the roster's `i`-th id in ascending order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewBits {
    /// Roster members the bitmaps cover (the roster's length).
    pub n: u32,
    /// Survivors: clients whose masked input counts.
    pub survivors: Vec<u8>,
    /// Dropped: clients that shared keys but sent no input.
    pub dropped: Vec<u8>,
}

impl ViewBits {
    /// `req` over `roster` (ascending ids). Fails if `req` names someone outside the roster.
    pub fn of(roster: &[ClientId], req: &UnmaskRequest) -> Result<Self, SecAggError> {
        let bytes = roster.len().div_ceil(8);
        let set = |members: &BTreeSet<ClientId>| -> Result<Vec<u8>, SecAggError> {
            let mut bits = vec![0u8; bytes];
            for c in members {
                let i = roster.binary_search(c).map_err(|_| {
                    SecAggError::PeerMisbehaved(format!("{c} is not in this round's roster"))
                })?;
                bits[i / 8] |= 1 << (i % 8);
            }
            Ok(bits)
        };
        Ok(Self {
            n: u32::try_from(roster.len())
                .map_err(|_| SecAggError::Threshold("roster too large".into()))?,
            survivors: set(&req.survivors)?,
            dropped: set(&req.dropped)?,
        })
    }

    /// The view over `roster` (ascending ids, the one this client checked). A view for another
    /// roster length, a bitmap of the wrong length or with bits past the roster is refused.
    pub fn expand(&self, roster: &[ClientId]) -> Result<UnmaskRequest, SecAggError> {
        let n = roster.len();
        if self.n as usize != n {
            return Err(SecAggError::PeerMisbehaved(format!(
                "survivor view over {} roster members; this round's roster has {n}",
                self.n
            )));
        }
        let set = |bits: &[u8], what: &str| -> Result<BTreeSet<ClientId>, SecAggError> {
            if bits.len() != n.div_ceil(8) || (!n.is_multiple_of(8) && bits[n / 8] >> (n % 8) != 0)
            {
                return Err(SecAggError::PeerMisbehaved(format!(
                    "the {what} bitmap does not fit a roster of {n}"
                )));
            }
            // ascending ids in, so the set is built in one pass
            Ok(roster
                .iter()
                .enumerate()
                .filter(|(i, _)| bits[i / 8] >> (i % 8) & 1 == 1)
                .map(|(_, c)| c.clone())
                .collect())
        };
        Ok(UnmaskRequest {
            survivors: set(&self.survivors, "survivor")?,
            dropped: set(&self.dropped, "dropped")?,
        })
    }

    pub(crate) fn check_bounds(&self) -> Result<(), crate::ProtocolError> {
        let n = self.n as usize;
        if n > MAX_ROSTER
            || self.survivors.len() != n.div_ceil(8)
            || self.dropped.len() != n.div_ceil(8)
        {
            return Err(crate::limits::invalid(format!(
                "a survivor view's bitmaps must hold {n} bits (at most {MAX_ROSTER})"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roster(n: usize) -> Vec<ClientId> {
        let mut r: Vec<ClientId> = (0..n).map(|i| format!("client-{i}")).collect();
        r.sort();
        r
    }

    #[test]
    fn a_view_survives_the_round_trip_at_every_roster_length() {
        for n in [1usize, 7, 8, 9, 64, 1000] {
            let r = roster(n);
            let req = UnmaskRequest {
                survivors: r.iter().step_by(2).cloned().collect(),
                dropped: r.iter().skip(1).step_by(3).cloned().collect(),
            };
            let bits = ViewBits::of(&r, &req).unwrap();
            assert_eq!(bits.survivors.len(), n.div_ceil(8));
            assert!(bits.check_bounds().is_ok());
            assert_eq!(bits.expand(&r).unwrap(), req, "n = {n}");
        }
    }

    #[test]
    fn a_view_that_does_not_fit_the_roster_is_refused() {
        let r = roster(10);
        let req = UnmaskRequest {
            survivors: r.iter().take(6).cloned().collect(),
            dropped: BTreeSet::new(),
        };
        let good = ViewBits::of(&r, &req).unwrap();
        // another roster length
        let mut other = good.clone();
        other.n = 11;
        assert!(matches!(
            other.expand(&r),
            Err(SecAggError::PeerMisbehaved(_))
        ));
        // a bit past the roster's end (bit 10 of 16)
        let mut stray = good.clone();
        stray.survivors[1] |= 1 << 2;
        assert!(matches!(
            stray.expand(&r),
            Err(SecAggError::PeerMisbehaved(_))
        ));
        // a bitmap of the wrong length
        let mut short = good.clone();
        short.dropped.pop();
        assert!(matches!(
            short.expand(&r),
            Err(SecAggError::PeerMisbehaved(_))
        ));
        assert!(short.check_bounds().is_err());
        // an id outside the roster cannot be encoded
        let outsider = UnmaskRequest {
            survivors: ["client-99".to_string()].into(),
            dropped: BTreeSet::new(),
        };
        assert!(ViewBits::of(&r, &outsider).is_err());
        // a roster past the protocol's limit is refused at decoding
        let huge = ViewBits {
            n: (MAX_ROSTER + 1) as u32,
            survivors: vec![0; (MAX_ROSTER + 1).div_ceil(8)],
            dropped: vec![0; (MAX_ROSTER + 1).div_ceil(8)],
        };
        assert!(huge.check_bounds().is_err());
    }
}
