//! Upload payloads, behind their own small interface so that object storage can follow:
//! [`FilePayloads`] (content-addressed files in the data directory, for the sled store) and
//! the PostgreSQL store's table ([`super::postgres`]).
//!
//! A payload is named by (round, SHA-256 of its bytes): a second write of a name is a no-op
//! (the bytes are the same), so a refused re-send can never overwrite an accepted payload.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::codec::{storage, write_file_synced};
use crate::error::Result;

/// Where upload payloads live.
pub trait PayloadStore: Send + Sync {
    /// Writes `bytes` under (round, digest) unless that name is there; durable after
    /// [`PayloadStore::sync`] of its round.
    fn put(&self, round: u64, digest: &[u8; 32], bytes: &[u8]) -> Result<()>;

    /// Makes every payload written so far for `rounds` durable.
    fn sync(&self, rounds: &BTreeSet<u64>) -> Result<()>;

    /// A payload's bytes, checked against its digest (`None`: none of that name).
    fn get(&self, round: u64, digest: &[u8; 32]) -> Result<Option<Vec<u8>>>;

    /// Whether a payload of that name is there and matches its digest.
    fn verify(&self, round: u64, digest: &[u8; 32]) -> Result<bool>;

    /// Deletes every payload of `round`.
    fn drop_round(&self, round: u64) -> Result<()>;

    /// Deletes every payload except `keep`'s, which are of round `open` (`None`: delete all).
    fn retain(&self, open: Option<u64>, keep: &BTreeSet<[u8; 32]>) -> Result<()>;
}

/// Payload files: `DIR/rROUND/DIGEST.bin` (hex digest), written to a temp file, fsynced and
/// renamed; [`PayloadStore::sync`] fsyncs the round directories, so the renames are durable.
pub struct FilePayloads {
    dir: PathBuf,
}

impl FilePayloads {
    /// Payloads under `dir` (created on first write).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, round: u64, digest: &[u8; 32]) -> PathBuf {
        // named by the content's hash: nothing a peer chooses names a file
        self.dir
            .join(format!("r{round}"))
            .join(format!("{}.bin", hex::encode(digest)))
    }
}

impl PayloadStore for FilePayloads {
    fn put(&self, round: u64, digest: &[u8; 32], bytes: &[u8]) -> Result<()> {
        let path = self.path(round, digest);
        if path.exists() {
            return Ok(());
        }
        write_file_synced(&path, bytes)
    }

    fn sync(&self, rounds: &BTreeSet<u64>) -> Result<()> {
        for r in rounds {
            std::fs::File::open(self.dir.join(format!("r{r}")))?.sync_all()?;
        }
        if !rounds.is_empty() {
            std::fs::File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    fn get(&self, round: u64, digest: &[u8; 32]) -> Result<Option<Vec<u8>>> {
        let p = self.path(round, digest);
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(storage(format!("upload {}: {e}", p.display()))),
        };
        if Sha256::digest(&bytes).as_slice() != digest {
            return Err(storage(format!(
                "upload {} does not match its digest",
                p.display()
            )));
        }
        Ok(Some(bytes))
    }

    fn verify(&self, round: u64, digest: &[u8; 32]) -> Result<bool> {
        Ok(matches!(self.get(round, digest), Ok(Some(_))))
    }

    fn drop_round(&self, round: u64) -> Result<()> {
        let d = self.dir.join(format!("r{round}"));
        if d.exists() {
            std::fs::remove_dir_all(d)?;
        }
        Ok(())
    }

    fn retain(&self, open: Option<u64>, keep: &BTreeSet<[u8; 32]>) -> Result<()> {
        if !self.dir.exists() {
            return Ok(());
        }
        let named: BTreeSet<String> = keep
            .iter()
            .map(|d| format!("{}.bin", hex::encode(d)))
            .collect();
        for d in std::fs::read_dir(&self.dir)? {
            let d = d?;
            let name = d.file_name().to_string_lossy().to_string();
            let round = name.strip_prefix('r').and_then(|r| r.parse::<u64>().ok());
            if !d.file_type()?.is_dir() {
                std::fs::remove_file(d.path())?;
                continue;
            }
            if round.is_none() || round != open {
                std::fs::remove_dir_all(d.path())?;
                continue;
            }
            for f in std::fs::read_dir(d.path())? {
                let f = f?;
                if !named.contains(f.file_name().to_string_lossy().as_ref()) {
                    std::fs::remove_file(f.path())?;
                }
            }
        }
        Ok(())
    }
}
