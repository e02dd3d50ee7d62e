//! The client side of secure aggregation over the wire: signing with the client certificate's
//! key, checking peers' certificates against the federation CA, and the stage machine.

use std::collections::BTreeMap;
use std::path::Path;

use fedlora_protocol::secagg::crypto::{EcdsaP256Signer, P256Verifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::ClientError;

/// The client certificate's ECDSA P-256 key (rcgen's default), for signing advertised keys.
pub fn load_signer(key: &Path) -> Result<EcdsaP256Signer, ClientError> {
    let k = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| ClientError::Config(format!("{}: {e}", key.display())))?;
    match k {
        PrivateKeyDer::Pkcs8(p) => EcdsaP256Signer::from_pkcs8(p.secret_pkcs8_der())
            .map_err(|e| ClientError::Config(e.to_string())),
        _ => Err(ClientError::Config(
            "secure aggregation needs a PKCS#8 ECDSA P-256 client key".into(),
        )),
    }
}

/// Builds a verifier from peers' certificates: each must be signed by the federation CA and
/// name the client it is listed for; its P-256 key then checks that client's signatures.
pub fn verifier_from_certificates(
    ca_pem: &Path,
    certificates: &BTreeMap<String, Vec<u8>>,
) -> Result<P256Verifier, ClientError> {
    let ca = CertificateDer::from_pem_file(ca_pem)
        .map_err(|e| ClientError::Config(format!("{}: {e}", ca_pem.display())))?;
    let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca)
        .map_err(|e| ClientError::Config(format!("CA certificate: {e}")))?;
    let mut table = BTreeMap::new();
    for (client, der) in certificates {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| ClientError::Transport(format!("certificate of {client}: {e}")))?;
        if cert.verify_signature(Some(ca_cert.public_key())).is_err() {
            // not from our CA: this peer's keys will not verify, so the roster is refused
            continue;
        }
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok());
        if cn != Some(client.as_str()) {
            continue;
        }
        table.insert(
            client.clone(),
            cert.public_key().subject_public_key.data.to_vec(),
        );
    }
    Ok(P256Verifier(table))
}
