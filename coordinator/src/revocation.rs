//! Revocation takes effect on live connections: the deny-list is watched, and a connection
//! whose certificate it names (by fingerprint, client id or key, as at hello) is closed within
//! about [`WATCH_INTERVAL`] of the list changing. Its streams end with it; a revoked client is
//! then refused at its next hello. The driver ([`crate::server`]) and every front-end that
//! relays to it ([`crate::relay`]) watch the same list for their own connections, and the
//! driver refuses relayed requests of revoked clients.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tracing::{error, warn};

use crate::certs;
use crate::peer::peer_cert;

/// How often the deny-list's size and modification time are looked at.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// QUIC close code of a connection whose certificate was revoked.
pub const REVOKED_CLOSE_CODE: u32 = 4;

/// Live connections by client id.
pub type Conns = Mutex<BTreeMap<String, Vec<quinn::Connection>>>;

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Closes the live connections `deny` names; returns how many.
pub fn close_revoked(conns: &Conns, deny: &BTreeSet<String>) -> usize {
    let conns: Vec<(String, quinn::Connection)> = conns
        .lock()
        .expect("lock")
        .iter()
        .flat_map(|(c, v)| v.iter().map(move |x| (c.clone(), x.clone())))
        .collect();
    let mut closed = 0;
    for (client, conn) in conns {
        let Some(der) = peer_cert(&conn) else {
            continue;
        };
        let key = crate::enroll::issuer::cert_key_and_name(&der)
            .map(|(k, _, _)| k)
            .unwrap_or_default();
        if certs::is_denied(deny, &certs::fingerprint(&der), &client, &key) {
            warn!(%client, "certificate revoked: closing its live connection");
            conn.close(REVOKED_CLOSE_CODE.into(), b"certificate revoked");
            closed += 1;
        }
    }
    closed
}

/// Calls `on_change` with the deny-list at `path` each time it changes (and once at start).
pub async fn watch_deny_list(path: PathBuf, mut on_change: impl FnMut(&BTreeSet<String>)) {
    let mut seen = None;
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    loop {
        tick.tick().await;
        let now = stamp(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match certs::load_deny_list(&path) {
            Ok(deny) => on_change(&deny),
            Err(e) => error!(error = %e, "cannot read the deny-list"),
        }
    }
}
