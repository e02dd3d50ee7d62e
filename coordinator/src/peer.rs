//! What a client presented in its TLS handshake: its certificate chain, as the coordinator
//! and the front-ends that relay to it read it.

/// `f` of the certificates a client presented in its TLS handshake, leaf first.
fn with_peer_certs<T>(
    conn: &quinn::Connection,
    f: impl FnOnce(&[rustls_pki_types::CertificateDer<'static>]) -> Option<T>,
) -> Option<T> {
    let id = conn.peer_identity()?;
    let certs = id
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .ok()?;
    f(&certs)
}

/// The chain a client presented, DER certificates concatenated, leaf first: what secure
/// aggregation relays to its peers, which check it as TLS would.
pub fn peer_chain(conn: &quinn::Connection) -> Option<Vec<u8>> {
    with_peer_certs(conn, |c| {
        Some(c.iter().flat_map(|d| d.iter().copied()).collect())
    })
}

/// The client's own (leaf) certificate, DER.
pub fn peer_cert(conn: &quinn::Connection) -> Option<Vec<u8>> {
    with_peer_certs(conn, |c| c.first().map(|d| d.to_vec()))
}

/// The certificates a client presented, DER, leaf first (empty: none).
pub fn presented_chain(conn: &quinn::Connection) -> Vec<Vec<u8>> {
    with_peer_certs(conn, |c| Some(c.iter().map(|d| d.to_vec()).collect())).unwrap_or_default()
}
