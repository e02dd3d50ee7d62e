//! Resumable uploads on the coordinator's disk: one upload in progress per client, in
//! `DATA_DIR/partial/` (`ID.part` with the bytes, `ID.meta` with [`PartialUpload`]; ID is the
//! SHA-256 of the client id). Each piece is appended to the file before it is acknowledged,
//! without an fsync: the bytes held are what the file holds (a restart that lost a tail answers
//! the shorter length, and the client goes on from there), and a complete upload is checked
//! against its hash before it is handed over (once; its files are removed), so a crash can cost
//! a re-send of pieces, never a wrong upload. Pieces of different clients are written in
//! parallel (one lock per client, by hash). An upload is at most the payload limit and is dropped
//! when older than its maximum age ([`PartialUploads::sweep`], from the coordinator's clock).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use fedlora_protocol::resumable::{upload_id, PartialUpload, PieceAction, UploadChunk};
use sha2::{Digest, Sha256};

use crate::error::{CoordinatorError, Result};

/// Default age after which a partial upload is dropped: one hour.
pub const DEFAULT_MAX_AGE_MS: u64 = 3_600_000;

/// What appending a piece led to.
#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    /// The upload is not complete: the coordinator holds this many bytes.
    Progress(u64),
    /// Every byte is held: [`PartialUploads::take`] hands it over.
    Complete,
}

/// What a piece led to.
#[derive(Debug, PartialEq, Eq)]
pub enum PieceOutcome {
    /// The upload is not complete: the coordinator holds this many bytes.
    Progress(u64),
    /// The whole frame, its hash checked.
    Complete(Vec<u8>),
    /// The whole frame arrived, but its hash is not its id: dropped.
    HashMismatch,
}

/// The partial uploads of a data directory.
pub struct PartialUploads {
    dir: PathBuf,
    max_age_ms: u64,
    /// One lock per shard of client ids: a client's pieces are applied in order, different
    /// clients' in parallel.
    locks: Vec<Mutex<()>>,
}

/// Lock shards of [`PartialUploads`].
const SHARDS: usize = 64;

fn io(e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Storage(format!("partial upload: {e}"))
}

impl PartialUploads {
    /// The partial uploads in `data_dir/partial`.
    pub fn new(data_dir: &Path, max_age_ms: u64) -> Self {
        Self {
            dir: data_dir.join("partial"),
            max_age_ms,
            locks: (0..SHARDS).map(|_| Mutex::new(())).collect(),
        }
    }

    fn paths(&self, client: &str) -> (PathBuf, PathBuf) {
        let id = hex::encode(Self::id(client));
        (
            self.dir.join(format!("{id}.part")),
            self.dir.join(format!("{id}.meta")),
        )
    }

    fn id(client: &str) -> [u8; 32] {
        Sha256::digest(client.as_bytes()).into()
    }

    fn held(meta: &Path) -> Option<PartialUpload> {
        serde_json::from_slice(&std::fs::read(meta).ok()?).ok()
    }

    fn save(meta: &Path, p: &PartialUpload) -> Result<()> {
        let tmp = meta.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(p).map_err(io)?)?;
        std::fs::rename(tmp, meta)?;
        Ok(())
    }

    /// Applies one piece from `client` at `now_ms`: [`PartialUploads::append`], then, once
    /// every byte is held, [`PartialUploads::take`].
    pub fn apply(&self, client: &str, chunk: &UploadChunk, now_ms: u64) -> Result<PieceOutcome> {
        match self.append(client, chunk, now_ms)? {
            Appended::Progress(have) => Ok(PieceOutcome::Progress(have)),
            Appended::Complete => self.take(client, &chunk.upload_id),
        }
    }

    fn lock(&self, client: &str) -> std::sync::MutexGuard<'_, ()> {
        let shard = usize::from(Self::id(client)[0]) % SHARDS;
        self.locks[shard].lock().expect("lock")
    }

    /// Appends one piece from `client` at `now_ms` (a piece at another offset, or a question
    /// with no bytes, changes nothing): what is held now, or that every byte is.
    pub fn append(&self, client: &str, chunk: &UploadChunk, now_ms: u64) -> Result<Appended> {
        let _g = self.lock(client);
        std::fs::create_dir_all(&self.dir)?;
        let (part, meta) = self.paths(client);
        let mut held = Self::held(&meta);
        if let Some(h) = held.as_mut() {
            // what the file holds is what is held: the meta file is written once, at the
            // upload's start, and the bytes held are the file's length
            h.have = match std::fs::metadata(&part) {
                Ok(m) if m.len() > h.total_len => {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&part)?
                        .set_len(h.total_len)?;
                    h.total_len
                }
                Ok(m) => m.len(),
                Err(_) => 0,
            };
        }
        if PartialUpload::action(held.as_ref(), chunk, now_ms, self.max_age_ms)
            == PieceAction::Restart
        {
            let fresh = PartialUpload::start(chunk, now_ms);
            std::fs::write(&part, [])?;
            Self::save(&meta, &fresh)?;
            held = Some(fresh);
        }
        let mut h = held.expect("set above");
        if PartialUpload::action(Some(&h), chunk, now_ms, self.max_age_ms) == PieceAction::Append {
            let mut f = std::fs::OpenOptions::new().append(true).open(&part)?;
            f.write_all(&chunk.bytes)?;
            h.have += chunk.bytes.len() as u64;
        }
        Ok(if h.complete() {
            Appended::Complete
        } else {
            Appended::Progress(h.have)
        })
    }

    /// Hands over `client`'s complete upload `id` once: reads it, removes its files and checks
    /// it against its hash. An upload that is not (or no longer) complete answers what is held.
    pub fn take(&self, client: &str, id: &[u8; 32]) -> Result<PieceOutcome> {
        let _g = self.lock(client);
        let (part, meta) = self.paths(client);
        let Some(mut h) = Self::held(&meta).filter(|h| &h.upload_id == id) else {
            return Ok(PieceOutcome::Progress(0));
        };
        h.have = std::fs::metadata(&part).map_or(0, |m| m.len());
        if !h.complete() {
            return Ok(PieceOutcome::Progress(h.have));
        }
        let frame = std::fs::read(&part)?;
        let _ = std::fs::remove_file(&part);
        let _ = std::fs::remove_file(&meta);
        if frame.len() as u64 != h.total_len || upload_id(&frame) != h.upload_id {
            return Ok(PieceOutcome::HashMismatch);
        }
        Ok(PieceOutcome::Complete(frame))
    }

    /// Drops every partial upload older than the maximum age (the coordinator calls it once a
    /// minute: a scan of the directory, not one per upload).
    pub fn sweep(&self, now_ms: u64) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "meta") {
                let id = p.file_stem().and_then(|s| s.to_str()).unwrap_or("");
                let shard = hex::decode(id)
                    .ok()
                    .and_then(|b| b.first().copied())
                    .map_or(0, |b| usize::from(b) % SHARDS);
                let _g = self.locks[shard].lock().expect("lock");
                let stale = Self::held(&p)
                    .is_none_or(|h| now_ms.saturating_sub(h.created_ms) > self.max_age_ms);
                if stale {
                    let _ = std::fs::remove_file(p.with_extension("part"));
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlora_protocol::resumable::pieces;

    fn chunk(frame: &[u8], offset: usize, bytes: &[u8]) -> UploadChunk {
        UploadChunk {
            upload_id: upload_id(frame),
            total_len: frame.len() as u64,
            offset: offset as u64,
            bytes: bytes.to_vec(),
        }
    }

    #[test]
    fn an_upload_resumes_after_a_restart_and_completes_once_with_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let frame: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let p = PartialUploads::new(dir.path(), DEFAULT_MAX_AGE_MS);
        let mut it = pieces(&frame, 0, 3_000);
        let (o, b) = it.next().unwrap();
        assert_eq!(
            p.apply("c", &chunk(&frame, o, b), 0).unwrap(),
            PieceOutcome::Progress(3_000)
        );
        // a piece at the wrong offset, or a question, gets what is held
        assert_eq!(
            p.apply("c", &chunk(&frame, 6_000, &frame[6_000..7_000]), 1)
                .unwrap(),
            PieceOutcome::Progress(3_000)
        );
        // the coordinator restarts: the pieces are on disk
        let p = PartialUploads::new(dir.path(), DEFAULT_MAX_AGE_MS);
        assert_eq!(
            p.apply("c", &chunk(&frame, 0, &[]), 2).unwrap(),
            PieceOutcome::Progress(3_000)
        );
        let mut last = None;
        for (o, b) in pieces(&frame, 3_000, 3_000) {
            last = Some(p.apply("c", &chunk(&frame, o, b), 3).unwrap());
        }
        assert_eq!(last, Some(PieceOutcome::Complete(frame.clone())));
        // handed over once: the next question starts afresh
        assert_eq!(
            p.apply("c", &chunk(&frame, 0, &[]), 4).unwrap(),
            PieceOutcome::Progress(0)
        );
        // another client's upload is its own
        assert_eq!(
            p.apply("d", &chunk(&frame, 0, &frame[..10]), 5).unwrap(),
            PieceOutcome::Progress(10)
        );
    }

    #[test]
    fn a_frame_that_does_not_match_its_id_is_dropped_and_old_uploads_expire() {
        let dir = tempfile::tempdir().unwrap();
        let p = PartialUploads::new(dir.path(), 1_000);
        let frame = vec![5u8; 100];
        let mut c = chunk(&frame, 0, &frame);
        c.upload_id = [0; 32];
        assert_eq!(p.apply("c", &c, 0).unwrap(), PieceOutcome::HashMismatch);
        assert_eq!(
            p.apply("c", &chunk(&frame, 0, &frame[..50]), 0).unwrap(),
            PieceOutcome::Progress(50)
        );
        // too old: it starts again
        assert_eq!(
            p.apply("c", &chunk(&frame, 50, &frame[50..]), 5_000)
                .unwrap(),
            PieceOutcome::Progress(0)
        );
        p.sweep(100_000);
        assert_eq!(
            std::fs::read_dir(dir.path().join("partial"))
                .unwrap()
                .count(),
            0
        );
    }
}
