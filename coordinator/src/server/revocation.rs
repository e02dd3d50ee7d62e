//! The driver's side of [`crate::revocation`]: its direct connections.

use std::sync::Arc;

use super::Shared;
use crate::revocation::{close_revoked, watch_deny_list};

pub(super) async fn revocation_loop(shared: Arc<Shared>) {
    let path = shared.config.tls.revoked.clone();
    let s = shared.clone();
    watch_deny_list(path, move |deny| {
        if !deny.is_empty() {
            close_revoked(&s.conns, deny);
        }
    })
    .await
}
