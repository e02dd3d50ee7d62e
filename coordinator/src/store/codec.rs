//! How records become bytes (JSON records, the bincode federation state), shared by every
//! store, and durable file writes.

use std::io::Write;
use std::path::Path;

use fedlora_protocol::FederationState;
use serde::{Deserialize, Serialize};

use crate::error::{CoordinatorError, Result};

/// A storage error with `e`'s text.
pub(crate) fn storage(e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Storage(e.to_string())
}

/// A record as JSON.
pub(super) fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

/// A record from JSON.
pub(super) fn from_json<T: for<'a> Deserialize<'a>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(storage)
}

/// The record of global `version`'s checkpoint `bytes`, made by `round` at `now_ms`.
pub(super) fn checkpoint_record(
    version: u64,
    round: u64,
    bytes: &[u8],
    now_ms: u64,
) -> super::CheckpointRecord {
    use sha2::Digest;
    super::CheckpointRecord {
        version,
        round,
        sha256: hex::encode(sha2::Sha256::digest(bytes)),
        created_ms: now_ms,
    }
}

/// The federation state's bytes (bincode).
pub(super) fn state_bytes(s: &FederationState) -> Vec<u8> {
    bincode::serde::encode_to_vec(s, bincode::config::standard()).expect("state encodes")
}

/// The federation state from its bytes.
pub(crate) fn state_from_bytes(b: &[u8]) -> Result<FederationState> {
    let (s, _) =
        bincode::serde::decode_from_slice(b, bincode::config::standard()).map_err(storage)?;
    Ok(s)
}

/// The server optimizer's moments as bytes (bincode).
pub(super) fn optimizer_bytes(
    state: &fedlora_protocol::strategy::OptimizerState,
) -> Result<Vec<u8>> {
    bincode::serde::encode_to_vec(state, bincode::config::standard()).map_err(storage)
}

/// The server optimizer's moments from their bytes; `what` names them in an error.
pub(super) fn optimizer_from_bytes(
    b: &[u8],
    what: &str,
) -> Result<fedlora_protocol::strategy::OptimizerState> {
    let (s, _) = bincode::serde::decode_from_slice(b, bincode::config::standard())
        .map_err(|e| storage(format!("{what}: {e}")))?;
    Ok(s)
}

/// Writes `bytes` to `path` atomically and durably: temp file, fsync, rename, fsync directory.
pub fn write_file_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file_synced(path, bytes)?;
    let dir = path.parent().expect("file has a parent");
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Writes `bytes` to `path` atomically with its contents fsynced (temp file, fsync, rename);
/// the directory entry is durable once the caller fsyncs the directory.
pub(super) fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file_atomically(path, bytes, true)
}

/// Writes `bytes` to `path` atomically (temp file, rename), its contents fsynced first when
/// `sync` (else they are durable once the caller syncs the file system).
pub(super) fn write_file_atomically(path: &Path, bytes: &[u8], sync: bool) -> Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = path.parent().expect("file has a parent");
    std::fs::create_dir_all(dir)?;
    // unique per writer: concurrent writers of one name each rename their own complete file
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("f"),
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if sync {
            f.sync_all()?;
        }
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}
