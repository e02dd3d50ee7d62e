//! Revocation takes effect on live connections: the deny-list is watched, and a connection
//! whose certificate it names (by fingerprint, client id or key, as at hello) is closed within
//! about [`WATCH_INTERVAL`] of the list changing. Its streams end with it; a revoked client is
//! then refused at its next hello.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{error, warn};

use super::connection::peer_cert;
use super::Shared;
use crate::certs;

/// How often the deny-list's size and modification time are looked at.
pub(super) const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// QUIC close code of a connection whose certificate was revoked.
pub(super) const REVOKED_CLOSE_CODE: u32 = 4;

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Closes the live connections `deny` names; returns how many.
fn close_revoked(shared: &Shared, deny: &std::collections::BTreeSet<String>) -> usize {
    let conns: Vec<(String, quinn::Connection)> = shared
        .conns
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

/// Watches the deny-list for the coordinator's lifetime.
pub(super) async fn revocation_loop(shared: Arc<Shared>) {
    let path = shared.config.tls.revoked.clone();
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
            Ok(deny) if !deny.is_empty() => {
                close_revoked(&shared, &deny);
            }
            Ok(_) => {}
            Err(e) => error!(error = %e, "cannot read the deny-list"),
        }
    }
}
