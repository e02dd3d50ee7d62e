//! One connection's life: the hello (and certificate renewal), requests and their frames,
//! delivering an upload until it is acknowledged, and downloads and uploads in pieces.

use super::*;

/// Exponential backoff between retries: `initial_ms`, doubling up to `max_ms`.
pub(super) struct Backoff {
    next_ms: u64,
    initial_ms: u64,
    max_ms: u64,
}

impl Backoff {
    pub(super) fn new(config: &ClientConfig) -> Self {
        Self {
            next_ms: config.backoff_initial_ms,
            initial_ms: config.backoff_initial_ms,
            max_ms: config.backoff_max_ms,
        }
    }

    /// The delay the next [`Backoff::wait`] sleeps, milliseconds.
    pub(super) fn ms(&self) -> u64 {
        self.next_ms
    }

    /// Sleeps the current delay, then doubles it (up to the maximum).
    pub(super) async fn wait(&mut self) {
        tokio::time::sleep(Duration::from_millis(self.next_ms)).await;
        self.next_ms = (self.next_ms * 2).min(self.max_ms);
    }

    pub(super) fn reset(&mut self) {
        self.next_ms = self.initial_ms;
    }
}

impl FederatedClient {
    pub(super) async fn hello(
        &self,
        ep: &quinn::Endpoint,
        report: &mut ClientReport,
    ) -> Result<Session, ClientError> {
        // this client's identity (read again at each connection: a renewal replaces it)
        let tls = crate::transport::client_config_with(&self.config.tls, &self.config.timers)?;
        let s = Session::connect_using(
            ep,
            Some(tls),
            self.address(),
            &self.config.server_name,
            self.config.timers.connect_timeout,
        )
        .await?;
        let msg = ClientMsg::Hello {
            protocol_version: PROTOCOL_VERSION,
            spec_hash: self.learner.spec().hash(),
            max_rank: self.config.max_rank,
        };
        match s.request(&msg).await? {
            (CoordMsg::Welcome { client_id, .. }, _) => {
                info!(%client_id, "joined the federation");
                *self.client_id.lock().expect("lock") = client_id.clone();
                report.client_id = client_id;
                Ok(s)
            }
            (CoordMsg::Refused(r), _) => Err(ClientError::Refused(r)),
            (other, _) => Err(ClientError::Transport(format!(
                "unexpected answer to hello: {other:?}"
            ))),
        }
    }

    /// Renews this device's certificate when it ends within
    /// [`ClientConfig::renew_within_s`]: a request for the same key over the mTLS session, the
    /// new chain written over the old. `true` when it renewed (the caller reconnects with it).
    pub(super) async fn renew(
        &self,
        s: &Session,
        report: &mut ClientReport,
    ) -> Result<bool, ClientError> {
        use std::sync::atomic::Ordering;
        let Some(within) = self.config.renew_within_s else {
            return Ok(false);
        };
        if self.renewal_refused.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let Some(csr_der) = crate::enroll::renewal_request(&self.config.tls, within, now)? else {
            return Ok(false);
        };
        match self.send(s, &ClientMsg::Renew { csr_der }, report).await? {
            CoordMsg::Renewed(cert) => {
                crate::enroll::store_chain(&self.config.tls, &cert.chain_pem)?;
                info!(device = %cert.device_id, not_after = cert.not_after_unix_s,
                    "certificate renewed");
                report.renewals += 1;
                if cert.not_after_unix_s <= now.saturating_add(within) {
                    // certificates shorter than the renewal window would renew at every
                    // connection: once per run is enough
                    warn!(
                        within_s = within,
                        "the coordinator's certificates are shorter than \
                        the renewal window; renewing once per run"
                    );
                    self.renewal_refused.store(true, Ordering::Relaxed);
                }
                Ok(true)
            }
            CoordMsg::Refused(r) if r.code == RefusalCode::Revoked => Err(ClientError::Refused(r)),
            other => {
                warn!(
                    ?other,
                    "certificate renewal refused; going on with the current one"
                );
                self.renewal_refused.store(true, Ordering::Relaxed);
                Ok(false)
            }
        }
    }

    pub(super) async fn send(
        &self,
        s: &Session,
        msg: &ClientMsg,
        report: &mut ClientReport,
    ) -> Result<CoordMsg, ClientError> {
        self.send_frame(s, &fedlora_protocol::frame::encode(msg)?, report)
            .await
    }

    /// Sends an encoded frame and counts its bytes both ways in `report`.
    pub(super) async fn send_frame(
        &self,
        s: &Session,
        frame: &[u8],
        report: &mut ClientReport,
    ) -> Result<CoordMsg, ClientError> {
        let (reply, down) = s.request_raw(frame).await?;
        report.bytes_up += frame.len() as u64;
        report.bytes_down += down;
        Ok(reply)
    }

    pub(super) async fn deliver(
        &self,
        s: &Session,
        upload: ClientMsg,
        report: &mut ClientReport,
        pending: &mut Option<ClientMsg>,
    ) -> Result<(), ClientError> {
        let round = match &upload {
            ClientMsg::Upload(u) => u.round,
            ClientMsg::PrivateUpload(u) => u.round,
            other => {
                return Err(ClientError::Config(format!(
                    "{:?} is not an upload",
                    fedlora_protocol::frame::FrameMessage::kind(other)
                )))
            }
        };
        self.save_pending(&upload)?;
        let frame = fedlora_protocol::frame::encode(&upload)?;
        // kept (not copied) until acknowledged: a lost connection sends it again
        *pending = Some(upload);
        let (t0, sent) = (std::time::Instant::now(), report.bytes_up);
        let id = fedlora_protocol::resumable::upload_id(&frame);
        if !report.upload_frames.iter().any(|(i, _)| *i == id) {
            report.upload_frames.push((id, frame.len() as u64));
        }
        // an async coordinator committing a version asks for the upload again shortly
        let mut later = Backoff::new(&self.config);
        let reply = loop {
            let reply = if frame.len() > self.config.upload_chunk_bytes {
                self.send_in_pieces(s, &frame, report).await?
            } else {
                report.upload_bytes_sent += frame.len() as u64;
                self.send_frame(s, &frame, report).await?
            };
            match reply {
                CoordMsg::Refused(r) if r.code == RefusalCode::RetryLater => {
                    info!(round, reason = %r, backoff_ms = later.ms(), "upload deferred; sending it again");
                    later.wait().await;
                }
                other => break other,
            }
        };
        match reply {
            CoordMsg::Ack { status, .. } => {
                report.uploads.push(UploadTiming {
                    started: t0,
                    ms: t0.elapsed().as_secs_f64() * 1e3,
                    bytes: report.bytes_up - sent,
                });
                info!(round, ?status, "upload acknowledged");
                if status == AckStatus::Accepted || !report.rounds.contains(&round) {
                    report.rounds.push(round);
                }
            }
            CoordMsg::Refused(r) if r.code == RefusalCode::Internal => {
                return Err(ClientError::Transport(format!(
                    "coordinator: {}",
                    r.message
                )));
            }
            CoordMsg::Refused(r) => warn!(round, reason = %r, "upload refused"),
            other => warn!(round, ?other, "unexpected answer to an upload"),
        }
        *pending = None;
        self.clear_pending();
        Ok(())
    }

    /// Fetches the global adapter `version` in pieces, going on from what an interrupted fetch
    /// of the same version and digest already holds, and checks it against `digest`. A lost
    /// link surfaces as a transport error (the caller reconnects; the pieces stay).
    pub(super) async fn fetch_global(
        &self,
        s: &Session,
        version: u64,
        digest: fedlora_protocol::resumable::GlobalDigest,
        report: &mut ClientReport,
    ) -> Result<Vec<u8>, ClientError> {
        use fedlora_protocol::resumable::GlobalDigest;
        let mut buf = match self.download.lock().expect("lock").take() {
            Some((v, d, b)) if v == version && d == digest => b,
            _ => Vec::new(),
        };
        if !buf.is_empty() {
            info!(
                version,
                have = buf.len(),
                of = digest.len,
                "resuming a download"
            );
            report.resumed_downloads += 1;
        }
        while (buf.len() as u64) < digest.len {
            let msg = ClientMsg::FetchGlobal {
                version,
                offset: buf.len() as u64,
                max_len: self.config.upload_chunk_bytes as u32,
            };
            let reply = match self.send(s, &msg, report).await {
                Ok(r) => r,
                Err(e) => {
                    *self.download.lock().expect("lock") = Some((version, digest, buf));
                    return Err(e);
                }
            };
            match reply {
                CoordMsg::GlobalPiece {
                    version: v,
                    offset,
                    bytes,
                } if v == version
                    && offset == buf.len() as u64
                    && !bytes.is_empty()
                    && buf.len() as u64 + bytes.len() as u64 <= digest.len =>
                {
                    buf.extend_from_slice(&bytes)
                }
                // the version is gone, or an answer out of step: poll again afresh
                other => {
                    return Err(ClientError::Transport(format!(
                        "downloading global version {version}: the coordinator answered {:?}",
                        fedlora_protocol::frame::FrameMessage::kind(&other)
                    )))
                }
            }
        }
        if GlobalDigest::of(&buf) != digest {
            return Err(ClientError::Transport(format!(
                "global version {version} does not match its digest"
            )));
        }
        Ok(buf)
    }

    /// Sends an upload frame as a resumable upload: asks how much the coordinator holds (of
    /// this frame, by its hash), then sends the rest in pieces of
    /// [`ClientConfig::upload_chunk_bytes`]. Returns the answer to the piece that completed it.
    /// A lost connection surfaces as a transport error; the re-sent upload resumes.
    pub(super) async fn send_in_pieces(
        &self,
        s: &Session,
        frame: &[u8],
        report: &mut ClientReport,
    ) -> Result<CoordMsg, ClientError> {
        use fedlora_protocol::resumable::{upload_id, UploadChunk};
        let id = upload_id(frame);
        let piece = |offset: usize, len: usize| {
            ClientMsg::UploadChunk(UploadChunk {
                upload_id: id,
                total_len: frame.len() as u64,
                offset: offset as u64,
                bytes: frame[offset..offset + len].to_vec(),
            })
        };
        let mut offset = match self.send(s, &piece(0, 0), report).await? {
            CoordMsg::UploadProgress { upload_id, have } if upload_id == id => have as usize,
            other => return Ok(other),
        };
        if offset > 0 {
            info!(offset, of = frame.len(), "resuming an upload");
            report.resumed_uploads += 1;
        }
        // each answer says where to go on; one that does not advance twice in a row is a
        // coordinator out of step, and the upload is retried from the top by the caller
        let mut stalled = 0;
        loop {
            let len = self
                .config
                .upload_chunk_bytes
                .min(frame.len().saturating_sub(offset));
            report.upload_bytes_sent += len as u64;
            // the piece's message is dropped once encoded: one copy of its bytes in flight
            let f = fedlora_protocol::frame::encode(&piece(offset, len))?;
            match self.send_frame(s, &f, report).await? {
                CoordMsg::UploadProgress { upload_id, have } if upload_id == id => {
                    let have = have as usize;
                    stalled = if have > offset { 0 } else { stalled + 1 };
                    if stalled > 2 || have >= frame.len() {
                        return Err(ClientError::Transport(format!(
                            "the coordinator holds {have} of {} bytes and does not advance",
                            frame.len()
                        )));
                    }
                    offset = have;
                }
                other => return Ok(other),
            }
        }
    }
}
