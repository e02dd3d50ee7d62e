//! Resumable transfers.
//!
//! **Uploads**: an upload frame ([`crate::ClientMsg::Upload`] or
//! [`crate::ClientMsg::PrivateUpload`], encoded) sent in pieces with offsets, so that a link that
//! drops mid-upload costs only the piece in flight. The coordinator keeps the pieces on disk,
//! tells a reconnected client where to go on ([`crate::CoordMsg::UploadProgress`]), checks the
//! whole frame against its SHA-256 (the upload's id) and then takes it as one upload, once.
//!
//! [`PartialUpload`] is the coordinator's bookkeeping for one client, without I/O.
//!
//! **Downloads**: a full global adapter larger than [`INLINE_GLOBAL_MAX`] is not put in the
//! offer; the offer carries its length and SHA-256 ([`GlobalDigest`]) and the client fetches it
//! in pieces ([`crate::ClientMsg::FetchGlobal`]), keeping what it has across reconnects and
//! checking the whole against the digest. Deltas (the f16 downlink) and rank slices stay
//! inline.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ProtocolError;
pub use crate::limits::MAX_UPLOAD_CHUNK;
use crate::limits::PAYLOAD_LIMIT;

/// The largest full global adapter an offer carries inline, bytes; larger ones are fetched in
/// pieces.
pub const INLINE_GLOBAL_MAX: usize = 64 * 1024;

/// The length and SHA-256 of a global adapter fetched in pieces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalDigest {
    /// Its length, bytes.
    pub len: u64,
    /// Its SHA-256.
    pub sha256: [u8; 32],
}

impl GlobalDigest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            len: bytes.len() as u64,
            sha256: upload_id(bytes),
        }
    }
}
/// The default piece size of a device, bytes.
pub const DEFAULT_UPLOAD_CHUNK: usize = 256 * 1024;

/// One piece of a resumable upload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadChunk {
    /// SHA-256 of the whole upload frame.
    pub upload_id: [u8; 32],
    /// Length of the whole frame, bytes.
    pub total_len: u64,
    /// Where these bytes start in the frame.
    pub offset: u64,
    /// The bytes (empty: a question, "how much do you hold?").
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

impl UploadChunk {
    /// Checks the ranges: a piece of at most [`MAX_UPLOAD_CHUNK`] bytes inside a frame of at
    /// most the payload limit.
    pub fn check(&self) -> Result<(), ProtocolError> {
        if self.bytes.len() > MAX_UPLOAD_CHUNK {
            return Err(ProtocolError::TooLarge(format!(
                "upload piece of {} bytes (at most {MAX_UPLOAD_CHUNK})",
                self.bytes.len()
            )));
        }
        if self.total_len == 0 || self.total_len > PAYLOAD_LIMIT as u64 {
            return Err(ProtocolError::TooLarge(format!(
                "upload of {} bytes (1 to {PAYLOAD_LIMIT})",
                self.total_len
            )));
        }
        if self.offset.saturating_add(self.bytes.len() as u64) > self.total_len {
            return Err(ProtocolError::InvalidValue(format!(
                "upload piece {}+{} ends past the upload's {} bytes",
                self.offset,
                self.bytes.len(),
                self.total_len
            )));
        }
        Ok(())
    }
}

/// The id of an upload frame: its SHA-256.
pub fn upload_id(frame: &[u8]) -> [u8; 32] {
    Sha256::digest(frame).into()
}

/// The pieces of `frame` from `offset` on, each at most `piece` bytes.
pub fn pieces(frame: &[u8], offset: usize, piece: usize) -> impl Iterator<Item = (usize, &[u8])> {
    let piece = piece.clamp(1, MAX_UPLOAD_CHUNK);
    (offset.min(frame.len())..frame.len())
        .step_by(piece)
        .map(move |o| (o, &frame[o..(o + piece).min(frame.len())]))
}

/// One client's upload in progress, as the coordinator holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialUpload {
    /// The upload's id.
    pub upload_id: [u8; 32],
    /// Its length, bytes.
    pub total_len: u64,
    /// Bytes held.
    pub have: u64,
    /// When its first piece arrived, Unix ms.
    pub created_ms: u64,
}

/// What to do with a piece.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PieceAction {
    /// Start this upload afresh (another upload, none, or one too old was held): drop what is
    /// held, then decide again.
    Restart,
    /// Append the piece's bytes.
    Append,
    /// Not the next piece (or a question): answer with what is held.
    Answer,
}

impl PartialUpload {
    /// A new, empty upload for `chunk`.
    pub fn start(chunk: &UploadChunk, now_ms: u64) -> Self {
        Self {
            upload_id: chunk.upload_id,
            total_len: chunk.total_len,
            have: 0,
            created_ms: now_ms,
        }
    }

    /// What `chunk` means for the upload `held` (if any), which is dropped after `max_age_ms`.
    pub fn action(
        held: Option<&Self>,
        chunk: &UploadChunk,
        now_ms: u64,
        max_age_ms: u64,
    ) -> PieceAction {
        match held {
            Some(h)
                if h.upload_id == chunk.upload_id
                    && h.total_len == chunk.total_len
                    && now_ms.saturating_sub(h.created_ms) <= max_age_ms =>
            {
                if !chunk.bytes.is_empty() && chunk.offset == h.have {
                    PieceAction::Append
                } else {
                    PieceAction::Answer
                }
            }
            _ => PieceAction::Restart,
        }
    }

    /// Whether every byte is held.
    pub fn complete(&self) -> bool {
        self.have == self.total_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(id: u8, total: u64, offset: u64, n: usize) -> UploadChunk {
        UploadChunk {
            upload_id: [id; 32],
            total_len: total,
            offset,
            bytes: vec![1; n],
        }
    }

    #[test]
    fn pieces_cover_the_frame_once_from_any_offset() {
        let f: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let all: Vec<u8> = pieces(&f, 0, 300).flat_map(|(_, p)| p.to_vec()).collect();
        assert_eq!(all, f);
        let from: Vec<(usize, usize)> = pieces(&f, 700, 300).map(|(o, p)| (o, p.len())).collect();
        assert_eq!(from, vec![(700, 300)]);
        assert_eq!(pieces(&f, 1000, 300).count(), 0);
    }

    #[test]
    fn only_the_next_piece_of_the_same_fresh_upload_is_appended() {
        let h = PartialUpload {
            upload_id: [1; 32],
            total_len: 100,
            have: 40,
            created_ms: 0,
        };
        let act = |c: &UploadChunk, now| PartialUpload::action(Some(&h), c, now, 1_000);
        assert_eq!(act(&chunk(1, 100, 40, 10), 10), PieceAction::Append);
        assert_eq!(act(&chunk(1, 100, 30, 10), 10), PieceAction::Answer);
        assert_eq!(act(&chunk(1, 100, 40, 0), 10), PieceAction::Answer);
        assert_eq!(act(&chunk(2, 100, 0, 10), 10), PieceAction::Restart);
        assert_eq!(act(&chunk(1, 100, 40, 10), 5_000), PieceAction::Restart);
        assert_eq!(
            PartialUpload::action(None, &chunk(1, 100, 0, 10), 0, 1_000),
            PieceAction::Restart
        );
        assert!(chunk(1, 100, 95, 10).check().is_err());
        assert!(chunk(1, 0, 0, 0).check().is_err());
        assert!(chunk(1, 100, 90, 10).check().is_ok());
    }
}
