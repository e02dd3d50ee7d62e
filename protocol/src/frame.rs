//! Length-prefixed frames with a per-kind size limit.
//!
//! ```text
//! +------+------+---------+------+----------------+------------------------+
//! | 'F'  | 'L'  | version | kind | body length u32 BE | bincode 2 body       |
//! +------+------+---------+------+----------------+------------------------+
//! ```
//! The reader checks the header (magic, [`FRAME_VERSION`], a known kind, the kind's limit) before
//! it reads the body, so an oversized frame is refused without buffering it. The body must decode
//! to exactly the kind the header names, with no trailing bytes. bincode's own limit only applies
//! when decoding, so [`encode`] checks the size itself.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ProtocolError;
use crate::message::{ClientMsg, CoordMsg};

/// Frame format version.
pub const FRAME_VERSION: u8 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 8;
/// Size limit of control messages (hello, poll, acks, reports), bytes.
pub const CONTROL_LIMIT: usize = 64 * 1024;
/// Size limit of messages that carry an adapter (uploads, tasks), bytes.
pub use crate::limits::PAYLOAD_LIMIT;

const MAGIC: [u8; 2] = *b"FL";

/// The kind of a frame, written in its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// [`ClientMsg::Hello`].
    Hello = 1,
    /// [`ClientMsg::Poll { held_version: None }`].
    Poll = 2,
    /// [`ClientMsg::Upload`].
    Upload = 3,
    /// [`ClientMsg::EvalReport`].
    EvalReport = 4,
    /// [`ClientMsg::Decline`].
    Decline = 5,
    /// [`ClientMsg::SecAgg`].
    SecAgg = 6,
    /// [`ClientMsg::PrivateUpload`].
    PrivateUpload = 7,
    /// [`ClientMsg::EvalWithheld`].
    EvalWithheld = 8,
    /// [`ClientMsg::Renew`].
    Renew = 9,
    /// [`ClientMsg::UploadChunk`].
    UploadChunk = 10,
    /// [`ClientMsg::FetchGlobal`].
    FetchGlobal = 11,
    /// [`ClientMsg::UpdateReady`].
    UpdateReady = 12,
    /// [`CoordMsg::Welcome`].
    Welcome = 16,
    /// [`CoordMsg::Task`].
    Task = 17,
    /// [`CoordMsg::Ack`].
    Ack = 18,
    /// [`CoordMsg::EvalRecorded`].
    EvalRecorded = 19,
    /// [`CoordMsg::Refused`].
    Refused = 20,
    /// [`CoordMsg::DeclineRecorded`].
    DeclineRecorded = 21,
    /// [`CoordMsg::Renewed`].
    Renewed = 22,
    /// [`CoordMsg::UploadProgress`].
    UploadProgress = 23,
    /// [`CoordMsg::GlobalPiece`].
    GlobalPiece = 24,
}

impl FrameKind {
    fn from_u8(v: u8) -> Result<Self, ProtocolError> {
        Ok(match v {
            1 => Self::Hello,
            2 => Self::Poll,
            3 => Self::Upload,
            4 => Self::EvalReport,
            5 => Self::Decline,
            6 => Self::SecAgg,
            7 => Self::PrivateUpload,
            8 => Self::EvalWithheld,
            9 => Self::Renew,
            10 => Self::UploadChunk,
            11 => Self::FetchGlobal,
            12 => Self::UpdateReady,
            16 => Self::Welcome,
            17 => Self::Task,
            18 => Self::Ack,
            19 => Self::EvalRecorded,
            20 => Self::Refused,
            21 => Self::DeclineRecorded,
            22 => Self::Renewed,
            23 => Self::UploadProgress,
            24 => Self::GlobalPiece,
            other => return Err(ProtocolError::Frame(format!("unknown frame kind {other}"))),
        })
    }

    /// The largest body this kind may carry, bytes.
    pub fn limit(self) -> usize {
        match self {
            Self::Upload | Self::PrivateUpload | Self::Task | Self::SecAgg => PAYLOAD_LIMIT,
            Self::UploadChunk | Self::GlobalPiece => crate::limits::MAX_UPLOAD_CHUNK + 1024,
            _ => CONTROL_LIMIT,
        }
    }
}

impl FrameKind {
    /// Whether clients send this kind (the others are the coordinator's answers).
    pub fn from_client(self) -> bool {
        (self as u8) < 16
    }
}

/// A message that can travel in a frame.
pub trait FrameMessage: Serialize + DeserializeOwned {
    /// The kind this message's variant is framed as.
    fn kind(&self) -> FrameKind;

    /// Checks every field against its range (finite floats, bounded lists and strings; see
    /// [`crate::limits`]). [`decode_body`] runs it, so nothing out of range leaves the decoder.
    fn check(&self) -> Result<(), ProtocolError>;
}

impl FrameMessage for ClientMsg {
    fn kind(&self) -> FrameKind {
        match self {
            ClientMsg::Hello { .. } => FrameKind::Hello,
            ClientMsg::Poll { .. } => FrameKind::Poll,
            ClientMsg::Upload(_) => FrameKind::Upload,
            ClientMsg::EvalReport(_) => FrameKind::EvalReport,
            ClientMsg::Decline { .. } => FrameKind::Decline,
            ClientMsg::SecAgg { .. } => FrameKind::SecAgg,
            ClientMsg::PrivateUpload(_) => FrameKind::PrivateUpload,
            ClientMsg::EvalWithheld { .. } => FrameKind::EvalWithheld,
            ClientMsg::Renew { .. } => FrameKind::Renew,
            ClientMsg::UploadChunk(_) => FrameKind::UploadChunk,
            ClientMsg::FetchGlobal { .. } => FrameKind::FetchGlobal,
            ClientMsg::UpdateReady { .. } => FrameKind::UpdateReady,
        }
    }

    fn check(&self) -> Result<(), ProtocolError> {
        self.check_bounds()
    }
}

impl FrameMessage for CoordMsg {
    fn kind(&self) -> FrameKind {
        match self {
            CoordMsg::Welcome { .. } => FrameKind::Welcome,
            CoordMsg::Task(_) => FrameKind::Task,
            CoordMsg::Ack { .. } => FrameKind::Ack,
            CoordMsg::EvalRecorded { .. } => FrameKind::EvalRecorded,
            CoordMsg::Refused(_) => FrameKind::Refused,
            CoordMsg::DeclineRecorded { .. } => FrameKind::DeclineRecorded,
            CoordMsg::Renewed(_) => FrameKind::Renewed,
            CoordMsg::UploadProgress { .. } => FrameKind::UploadProgress,
            CoordMsg::GlobalPiece { .. } => FrameKind::GlobalPiece,
        }
    }

    fn check(&self) -> Result<(), ProtocolError> {
        self.check_bounds()
    }
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<PAYLOAD_LIMIT>()
}

/// Encodes `msg` as one frame (header + body). Fails if the body exceeds the kind's limit.
pub fn encode<M: FrameMessage>(msg: &M) -> Result<Vec<u8>, ProtocolError> {
    let kind = msg.kind();
    let body = bincode::serde::encode_to_vec(msg, config())
        .map_err(|e| ProtocolError::Frame(format!("encode: {e}")))?;
    if body.len() > kind.limit() {
        return Err(ProtocolError::TooLarge(format!(
            "{kind:?} body of {} bytes exceeds its limit of {} bytes",
            body.len(),
            kind.limit()
        )));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.push(FRAME_VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Parses and checks a frame header; returns the kind and the body length to read next.
pub fn parse_header(header: &[u8; HEADER_LEN]) -> Result<(FrameKind, usize), ProtocolError> {
    if header[..2] != MAGIC {
        return Err(ProtocolError::Frame(
            "bad magic: not a fedlora frame".into(),
        ));
    }
    if header[2] != FRAME_VERSION {
        return Err(ProtocolError::Frame(format!(
            "unsupported frame version {}",
            header[2]
        )));
    }
    let kind = FrameKind::from_u8(header[3])?;
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if len > kind.limit() {
        return Err(ProtocolError::TooLarge(format!(
            "{kind:?} frame of {len} bytes exceeds its limit of {} bytes",
            kind.limit()
        )));
    }
    Ok((kind, len))
}

/// Decodes a body whose header said `kind`. Refuses trailing bytes and a variant of another kind.
pub fn decode_body<M: FrameMessage>(kind: FrameKind, body: &[u8]) -> Result<M, ProtocolError> {
    let (msg, used): (M, usize) = bincode::serde::decode_from_slice(body, config())
        .map_err(|e| ProtocolError::Frame(format!("decode {kind:?}: {e}")))?;
    if used != body.len() {
        return Err(ProtocolError::Frame(format!(
            "{} trailing bytes after {kind:?} body",
            body.len() - used
        )));
    }
    if msg.kind() != kind {
        return Err(ProtocolError::Frame(format!(
            "header says {kind:?}, body is {:?}",
            msg.kind()
        )));
    }
    msg.check()?;
    Ok(msg)
}

/// Decodes one whole frame (header + body) from `bytes`, which must hold exactly one frame.
pub fn decode<M: FrameMessage>(bytes: &[u8]) -> Result<M, ProtocolError> {
    if bytes.len() < HEADER_LEN {
        return Err(ProtocolError::Frame(format!(
            "truncated header: {} of {HEADER_LEN} bytes",
            bytes.len()
        )));
    }
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(&bytes[..HEADER_LEN]);
    let (kind, len) = parse_header(&header)?;
    let body = &bytes[HEADER_LEN..];
    if body.len() != len {
        return Err(ProtocolError::Frame(format!(
            "body is {} bytes, header says {len}",
            body.len()
        )));
    }
    decode_body(kind, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Task, Upload, PROTOCOL_VERSION};

    #[test]
    fn round_trip_every_client_kind() {
        let msgs = vec![
            ClientMsg::Hello {
                protocol_version: PROTOCOL_VERSION,
                spec_hash: [7; 32],
                max_rank: None,
            },
            ClientMsg::Poll { held_version: None },
            ClientMsg::Upload(Upload {
                round: 3,
                spec_hash: [1; 32],
                weight: 12.0,
                train_loss: 1.5,
                payload: vec![1, 2, 3],
            }),
            ClientMsg::PrivateUpload(crate::message::PrivateUpload {
                round: 3,
                spec_hash: [1; 32],
                payload: vec![4, 5],
                noised_train_loss: None,
            }),
            ClientMsg::EvalWithheld { version: 4 },
            ClientMsg::Decline {
                round: 2,
                reason: crate::message::DeclineReason::Budget,
            },
        ];
        for m in msgs {
            let f = encode(&m).unwrap();
            assert_eq!(decode::<ClientMsg>(&f).unwrap(), m);
        }
        let t = CoordMsg::Task(Task::Wait { retry_after_ms: 5 });
        assert_eq!(decode::<CoordMsg>(&encode(&t).unwrap()).unwrap(), t);
    }

    #[test]
    fn garbage_truncated_and_oversized_refused() {
        let f = encode(&ClientMsg::Poll { held_version: None }).unwrap();
        assert!(decode::<ClientMsg>(&f[..4]).is_err());
        let mut bad = f.clone();
        bad[0] = b'X';
        assert!(decode::<ClientMsg>(&bad).is_err());
        let mut trailing = f.clone();
        trailing.push(9);
        trailing[7] += 1;
        assert!(decode::<ClientMsg>(&trailing).is_err());
        // header claims an oversized control frame
        let mut big = f.clone();
        big[4..8].copy_from_slice(&((CONTROL_LIMIT + 1) as u32).to_be_bytes());
        let hdr: [u8; 8] = big[..8].try_into().unwrap();
        assert!(parse_header(&hdr).is_err());
        // header and body disagree on the kind
        let mut wrong = encode(&ClientMsg::Hello {
            protocol_version: 1,
            spec_hash: [0; 32],
            max_rank: None,
        })
        .unwrap();
        wrong[3] = FrameKind::Poll as u8;
        assert!(decode::<ClientMsg>(&wrong).is_err());
        // random garbage never panics
        let mut x: u64 = 0x9E3779B97F4A7C15;
        for len in 0..300 {
            let mut g = vec![0u8; len];
            for b in g.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            if len >= 4 {
                g[..4].copy_from_slice(&[b'F', b'L', 1, 3]);
            }
            let _ = decode::<ClientMsg>(&g);
        }
    }

    #[test]
    fn encode_refuses_oversized_control_body() {
        let r = CoordMsg::Refused(crate::error::Refusal::new(
            crate::error::RefusalCode::Internal,
            "x".repeat(CONTROL_LIMIT + 10),
        ));
        assert!(encode(&r).is_err());
    }
}
