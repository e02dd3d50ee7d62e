//! What a client keeps in its state directory: the upload not yet acknowledged, the codec's
//! error-feedback residual, and the global versions it sent unmask shares for.

use super::*;

/// Replaces a state-directory file with `value` (bincode), durably ([`crate::durable`]: temp
/// file fsynced, renamed, directory fsynced) before it returns.
pub(super) fn save_state_file<T: serde::Serialize>(
    path: &std::path::Path,
    value: &T,
) -> Result<(), ClientError> {
    let bytes = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| ClientError::Storage(e.to_string()))?;
    crate::durable::replace_file(path, &bytes)
}

impl FederatedClient {
    pub(super) fn pending_path(&self) -> Option<PathBuf> {
        self.config
            .state_dir
            .as_ref()
            .map(|d| d.join("pending_upload.bin"))
    }

    pub(super) fn save_pending(&self, u: &ClientMsg) -> Result<(), ClientError> {
        match self.pending_path() {
            Some(p) => save_state_file(&p, u),
            None => Ok(()),
        }
    }

    pub(super) fn load_pending(&self) -> Option<ClientMsg> {
        let bytes = std::fs::read(self.pending_path()?).ok()?;
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
            .ok()
            .map(|(u, _)| u)
    }

    pub(super) fn clear_pending(&self) {
        if let Some(p) = self.pending_path() {
            let _ = std::fs::remove_file(p);
        }
    }

    pub(super) fn residual_path(&self) -> Option<PathBuf> {
        self.config
            .state_dir
            .as_ref()
            .map(|d| d.join("error_feedback.bin"))
    }
}

/// Where a client records the global versions it sent unmask shares for.
pub(super) const UNMASKED_FILE: &str = "unmasked_versions.bin";

/// The global versions this client already sent unmask shares for, from its state directory
/// (empty without one). A file that cannot be read is an error: forgetting it would let a
/// coordinator collect a second masked view of the same delta.
pub(super) fn load_unmasked(
    state_dir: Option<&std::path::Path>,
) -> Result<std::collections::BTreeSet<u64>, ClientError> {
    let Some(path) = state_dir.map(|d| d.join(UNMASKED_FILE)) else {
        return Ok(Default::default());
    };
    match std::fs::read(&path) {
        Ok(bytes) => bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
            .map(|(s, _)| s)
            .map_err(|e| ClientError::Storage(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(e) => Err(ClientError::Storage(format!("{}: {e}", path.display()))),
    }
}

/// Saves the set of unmasked global versions in the state directory, durably, before the
/// unmask shares it guards are sent.
pub(super) fn record_unmasked(
    state_dir: Option<&std::path::Path>,
    versions: &std::collections::BTreeSet<u64>,
) -> Result<(), ClientError> {
    match state_dir {
        Some(d) => save_state_file(&d.join(UNMASKED_FILE), versions),
        None => Ok(()),
    }
}
