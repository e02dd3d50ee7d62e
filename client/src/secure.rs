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

/// The certificates of a relayed chain: DER certificates concatenated, leaf first (what the
/// coordinator relays: the chain the peer presented in its TLS handshake).
fn split_chain(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut rest = bytes;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (after, _) = x509_parser::parse_x509_certificate(rest).map_err(|e| e.to_string())?;
        let used = rest.len() - after.len();
        out.push(CertificateDer::from(rest[..used].to_vec()));
        rest = after;
        if out.len() > 4 {
            return Err("a chain of more than 4 certificates".into());
        }
    }
    if out.is_empty() {
        return Err("no certificate".into());
    }
    Ok(out)
}

/// Why a peer's certificate is not admitted as `client`'s, or its P-256 key when it is.
///
/// The chain is checked as a TLS server checks a client (rustls' webpki client verifier over
/// the federation CA as the only root): it chains to the CA (through the enrollment
/// intermediate when there is one), is within its validity dates now, carries the clientAuth
/// extended key usage, and is not a CA certificate. Then: its common name is `client`, and a
/// certificate issued by anything other than the root names a `device-…` id (as the
/// coordinator requires), so an intermediate cannot mint a `certs init` client's id.
fn admit(
    verifier: &dyn rustls::server::danger::ClientCertVerifier,
    client: &str,
    chain: &[u8],
) -> Result<Vec<u8>, String> {
    let certs = split_chain(chain)?;
    let (leaf, intermediates) = certs.split_first().ok_or("no certificate")?;
    verifier
        .verify_client_cert(leaf, intermediates, rustls_pki_types::UnixTime::now())
        .map_err(|e| e.to_string())?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok());
    if cn != Some(client) {
        return Err(format!("its common name is {cn:?}, not {client}"));
    }
    if !intermediates.is_empty() && !client.starts_with("device-") {
        return Err(format!(
            "{client} is issued by an intermediate, which may only issue device-… ids"
        ));
    }
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

/// Builds a verifier from peers' certificate chains (see [`admit`] for what each must pass);
/// an admitted certificate's P-256 key then checks that client's signatures. A peer that is
/// not admitted is left out, so a roster or view that names it is refused.
pub fn verifier_from_certificates(
    ca_pem: &Path,
    certificates: &BTreeMap<String, Vec<u8>>,
) -> Result<P256Verifier, ClientError> {
    let ca = CertificateDer::from_pem_file(ca_pem)
        .map_err(|e| ClientError::Config(format!("{}: {e}", ca_pem.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca)
        .map_err(|e| ClientError::Config(format!("CA certificate: {e}")))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| ClientError::Config(format!("certificate verifier: {e}")))?;
    let mut table = BTreeMap::new();
    for (client, chain) in certificates {
        match admit(verifier.as_ref(), client, chain) {
            Ok(key) => {
                table.insert(client.clone(), key);
            }
            Err(why) => {
                tracing::warn!(%client, %why, "a peer's certificate is not admitted");
            }
        }
    }
    Ok(P256Verifier(table))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };

    fn params(cn: &str, eku: Vec<ExtendedKeyUsagePurpose>) -> CertificateParams {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = eku;
        p.use_authority_key_identifier_extension = true;
        p
    }

    fn ca_params(cn: &str, constraint: BasicConstraints) -> CertificateParams {
        let mut p = params(cn, vec![]);
        p.is_ca = IsCa::Ca(constraint);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p
    }

    struct Federation {
        ca_pem: std::path::PathBuf,
        root: Issuer<'static, KeyPair>,
        intermediate: Issuer<'static, KeyPair>,
        intermediate_der: Vec<u8>,
        _dir: tempfile::TempDir,
    }

    fn federation() -> Federation {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let cap = ca_params("fedlora federation CA", BasicConstraints::Unconstrained);
        let ca = cap.self_signed(&ca_key).unwrap();
        let ca_pem = dir.path().join("ca.pem");
        std::fs::write(&ca_pem, ca.pem()).unwrap();
        let root = Issuer::new(cap, ca_key);
        let mut ip = ca_params(
            "fedlora enrollment issuer",
            BasicConstraints::Constrained(0),
        );
        ip.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let ik = KeyPair::generate().unwrap();
        let ic = ip.signed_by(&ik, &root).unwrap();
        Federation {
            ca_pem,
            root,
            intermediate: Issuer::new(ip, ik),
            intermediate_der: ic.der().to_vec(),
            _dir: dir,
        }
    }

    fn leaf(p: CertificateParams, issuer: &Issuer<'_, KeyPair>) -> Vec<u8> {
        p.signed_by(&KeyPair::generate().unwrap(), issuer)
            .unwrap()
            .der()
            .to_vec()
    }

    fn admitted(f: &Federation, certs: &[(&str, Vec<u8>)]) -> Vec<String> {
        let map: BTreeMap<String, Vec<u8>> = certs
            .iter()
            .map(|(c, d)| (c.to_string(), d.clone()))
            .collect();
        let v = verifier_from_certificates(&f.ca_pem, &map).unwrap();
        v.0.keys().cloned().collect()
    }

    #[test]
    fn peers_are_admitted_only_with_what_tls_would_accept() {
        let f = federation();
        let client = ExtendedKeyUsagePurpose::ClientAuth;
        let good = leaf(params("client-0", vec![client.clone()]), &f.root);
        // an enrolled device: its chain goes through the intermediate
        let mut device = leaf(
            params("device-0a1b2c", vec![client.clone()]),
            &f.intermediate,
        );
        device.extend_from_slice(&f.intermediate_der);
        // a server-only certificate (as the coordinator's own) under a client's name
        let server = leaf(
            params("client-1", vec![ExtendedKeyUsagePurpose::ServerAuth]),
            &f.root,
        );
        // expired
        let mut old = params("client-2", vec![client.clone()]);
        old.not_before = rcgen::date_time_ymd(2020, 1, 1);
        old.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let expired = leaf(old, &f.root);
        // a CA certificate as a peer
        let mut cap = ca_params("client-3", BasicConstraints::Unconstrained);
        cap.extended_key_usages = vec![client.clone()];
        let ca_leaf = leaf(cap, &f.root);
        // another CA's client
        let other = federation();
        let foreign = leaf(params("client-4", vec![client.clone()]), &other.root);
        // the intermediate minting a `certs init` id
        let mut minted = leaf(params("client-5", vec![client.clone()]), &f.intermediate);
        minted.extend_from_slice(&f.intermediate_der);
        // a device certificate relayed without its intermediate
        let bare = leaf(params("device-77", vec![client.clone()]), &f.intermediate);
        // listed under another client's id
        let stolen = leaf(params("client-6", vec![client]), &f.root);
        let got = admitted(
            &f,
            &[
                ("client-0", good),
                ("device-0a1b2c", device),
                ("client-1", server),
                ("client-2", expired),
                ("client-3", ca_leaf),
                ("client-4", foreign),
                ("client-5", minted),
                ("device-77", bare),
                ("client-7", stolen),
            ],
        );
        assert_eq!(
            got,
            vec!["client-0".to_string(), "device-0a1b2c".to_string()]
        );
    }

    #[test]
    fn a_chain_is_split_into_its_certificates_and_garbage_is_an_error() {
        let f = federation();
        let mut chain = leaf(
            params("device-1", vec![ExtendedKeyUsagePurpose::ClientAuth]),
            &f.intermediate,
        );
        chain.extend_from_slice(&f.intermediate_der);
        assert_eq!(split_chain(&chain).unwrap().len(), 2);
        assert!(split_chain(&[]).is_err());
        assert!(split_chain(&[0x30, 0x03, 1]).is_err());
    }
}
