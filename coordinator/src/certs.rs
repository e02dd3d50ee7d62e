//! The federation's certificates: a CA, the coordinator's server certificate and one certificate
//! per client, made with rcgen; the deny-list of revoked client certificates.
//!
//! Layout of a certificate directory (`fedlora certs init --out DIR`):
//! `ca.pem`, `ca.key` (keep it offline in production), `server.pem`, `server.key`,
//! `client-I.pem`, `client-I.key` for I in 0..N, and `revoked.txt` (one SHA-256 fingerprint per
//! line, hex, of a revoked client certificate).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};

use crate::error::{CoordinatorError, Result};

/// Paths inside a certificate directory.
#[derive(Clone, Debug)]
pub struct CertDir(pub PathBuf);

impl CertDir {
    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.0.join("ca.pem")
    }
    /// The CA key.
    pub fn ca_key(&self) -> PathBuf {
        self.0.join("ca.key")
    }
    /// The server certificate.
    pub fn server_cert(&self) -> PathBuf {
        self.0.join("server.pem")
    }
    /// The server key.
    pub fn server_key(&self) -> PathBuf {
        self.0.join("server.key")
    }
    /// The `i`-th client certificate.
    pub fn client_cert(&self, i: usize) -> PathBuf {
        self.0.join(format!("client-{i}.pem"))
    }
    /// The `i`-th client key.
    pub fn client_key(&self, i: usize) -> PathBuf {
        self.0.join(format!("client-{i}.key"))
    }
    /// The deny-list.
    pub fn revoked(&self) -> PathBuf {
        self.0.join("revoked.txt")
    }
}

fn tls_err(e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Tls(e.to_string())
}

/// The default server names: `localhost` and `127.0.0.1`.
pub fn default_server_names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into()]
}

/// Makes a CA, a server certificate for `server_names` (DNS names or IP addresses) and
/// `clients` client certificates (common names `client-0` …) in `dir`.
pub fn init_certs(dir: &Path, clients: usize, server_names: &[String]) -> Result<CertDir> {
    std::fs::create_dir_all(dir)?;
    let d = CertDir(dir.to_path_buf());
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fedlora federation CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().map_err(tls_err)?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(tls_err)?;
    write_secret(&d.ca_key(), &ca_key.serialize_pem())?;
    std::fs::write(d.ca(), ca_cert.pem())?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut sp = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
    for n in server_names {
        match n.parse::<IpAddr>() {
            Ok(ip) => sp.subject_alt_names.push(SanType::IpAddress(ip)),
            Err(_) => sp
                .subject_alt_names
                .push(SanType::DnsName(n.clone().try_into().map_err(tls_err)?)),
        }
    }
    sp.distinguished_name
        .push(DnType::CommonName, "fedlora coordinator");
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    sp.use_authority_key_identifier_extension = true;
    let sk = KeyPair::generate().map_err(tls_err)?;
    let sc = sp.signed_by(&sk, &issuer).map_err(tls_err)?;
    std::fs::write(d.server_cert(), sc.pem())?;
    write_secret(&d.server_key(), &sk.serialize_pem())?;

    for i in 0..clients {
        issue_client(&d, &issuer, i)?;
    }
    if !d.revoked().exists() {
        std::fs::write(d.revoked(), "")?;
    }
    Ok(d)
}

fn issue_client(d: &CertDir, issuer: &Issuer<'_, KeyPair>, i: usize) -> Result<()> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
    p.distinguished_name
        .push(DnType::CommonName, format!("client-{i}"));
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    let k = KeyPair::generate().map_err(tls_err)?;
    let c = p.signed_by(&k, issuer).map_err(tls_err)?;
    std::fs::write(d.client_cert(i), c.pem())?;
    write_secret(&d.client_key(i), &k.serialize_pem())
}

/// Makes an issuing CA for the enrollment service (an intermediate the federation CA in `dir`
/// signs, allowed to sign device certificates only: path length 0), written as `cert` and
/// `key` (mode 0600). The federation CA's key is needed once, here; the enrollment service then
/// runs with the intermediate's key alone.
pub fn make_issuer(dir: &CertDir, cert: &Path, key: &Path) -> Result<()> {
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p)
            .map_err(|e| CoordinatorError::Config(format!("{}: {e}", p.display())))
    };
    let ca_key = KeyPair::from_pem(&read(dir.ca_key())?).map_err(tls_err)?;
    let root = Issuer::from_ca_cert_pem(&read(dir.ca())?, ca_key).map_err(tls_err)?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    // an issuer's extended key usage limits what chains through it (TLS checks it at every
    // certificate of the path): device certificates for clients, never a server certificate
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.distinguished_name
        .push(DnType::CommonName, "fedlora enrollment issuer");
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.use_authority_key_identifier_extension = true;
    let k = KeyPair::generate().map_err(tls_err)?;
    let c = p.signed_by(&k, &root).map_err(tls_err)?;
    std::fs::write(cert, c.pem())?;
    write_secret(key, &k.serialize_pem())
}

fn write_secret(path: &Path, pem: &str) -> Result<()> {
    #[cfg(unix)]
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(pem.as_bytes())?;
        Ok(())
    }
    #[cfg(not(unix))]
    {
        std::fs::write(path, pem)?;
        Ok(())
    }
}

/// SHA-256 fingerprint of a DER certificate, lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The first certificate of a PEM file, DER.
pub fn read_cert_der(path: &Path) -> Result<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    let c = rustls_pki_types::CertificateDer::from_pem_file(path)
        .map_err(|e| CoordinatorError::Tls(format!("{}: {e}", path.display())))?;
    Ok(c.to_vec())
}

/// Adds the certificate at `cert` to the deny-list of `dir`; returns its fingerprint.
pub fn revoke(dir: &CertDir, cert: &Path) -> Result<String> {
    deny(dir, fingerprint(&read_cert_der(cert)?))
}

/// Adds a deny-list entry (a fingerprint, `device:ID` or `key:KEY_ID`) to `dir`'s deny-list.
fn deny(dir: &CertDir, entry: String) -> Result<String> {
    let mut set = load_deny_list(&dir.revoked())?;
    if set.insert(entry.clone()) {
        let body: String = set.iter().map(|f| format!("{f}\n")).collect();
        let tmp = dir.revoked().with_extension("tmp");
        std::fs::write(&tmp, body)?;
        std::fs::rename(tmp, dir.revoked())?;
    }
    Ok(entry)
}

/// Revokes a device by id: every certificate with that common name, renewed ones included.
pub fn revoke_device(dir: &CertDir, device_id: &str) -> Result<String> {
    deny(dir, format!("device:{device_id}"))
}

/// Revokes the key of the certificate at `cert`: every certificate for that key.
pub fn revoke_key(dir: &CertDir, cert: &Path) -> Result<String> {
    let (key, _, _) = crate::enroll::issuer::cert_key_and_name(&read_cert_der(cert)?)?;
    deny(dir, format!("key:{key}"))
}

/// Whether a deny-list names this certificate: by fingerprint, by its device id or by its key.
pub fn is_denied(
    deny: &BTreeSet<String>,
    fingerprint: &str,
    client_id: &str,
    key_id: &str,
) -> bool {
    // the list is lowercased when read: so are the names looked up in it
    deny.contains(&fingerprint.to_lowercase()) || is_denied_id_or_key(deny, Some(client_id), key_id)
}

/// Whether a deny-list names this device id (when given) or this key.
pub fn is_denied_id_or_key(deny: &BTreeSet<String>, client_id: Option<&str>, key_id: &str) -> bool {
    deny.contains(&format!("key:{}", key_id.to_lowercase()))
        || client_id.is_some_and(|c| deny.contains(&format!("device:{}", c.to_lowercase())))
}

/// Reads a deny-list file (missing file: empty list). Blank lines and `#` comments are ignored.
pub fn load_deny_list(path: &Path) -> Result<BTreeSet<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_lowercase)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(e.into()),
    }
}

/// A certificate's subject common name, refused unless it is a valid client id
/// ([`fedlora_protocol::identity::validate_client_id`]: it names files, so no path, no hidden
/// name, no control character).
fn common_name(cert: &x509_parser::certificate::X509Certificate<'_>) -> Result<String> {
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| CoordinatorError::Tls("client certificate has no common name".into()))?;
    fedlora_protocol::identity::validate_client_id(cn)
        .map_err(|e| CoordinatorError::Tls(format!("client certificate: {e}")))?;
    Ok(cn.to_string())
}

/// The prefix of every device id the enrollment service assigns (`device-<hex>`).
pub const DEVICE_ID_PREFIX: &str = "device-";

/// The client id of a certificate the TLS handshake verified against the federation CA, with
/// the checks TLS does not make: the id is a valid client id (it names files); the certificate is for
/// clients (extended key usage clientAuth, not a CA); and ids cannot cross issuers, so an
/// enrollment service's intermediate (any issuer other than the root, whose subject is
/// `root_subject`, DER) can only have issued `device-…` ids, never a `certs init` id such as
/// `client-3`.
pub fn client_identity(der: &[u8], root_subject: &[u8]) -> Result<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(tls_err)?;
    let id = common_name(&cert)?;
    let client_auth = cert
        .extended_key_usage()
        .ok()
        .flatten()
        .is_some_and(|e| e.value.client_auth || e.value.any);
    if !client_auth {
        return Err(CoordinatorError::Tls(format!(
            "client certificate `{id}` is not for clients (no clientAuth extended key usage)"
        )));
    }
    if cert.is_ca() {
        return Err(CoordinatorError::Tls(format!(
            "client certificate `{id}` is a CA certificate"
        )));
    }
    let by_root = cert.issuer().as_raw() == root_subject;
    if !by_root && !id.starts_with(DEVICE_ID_PREFIX) {
        return Err(CoordinatorError::Tls(format!(
            "client certificate `{id}` comes from an issuing CA other than the federation's \
             root, which may only issue `{DEVICE_ID_PREFIX}…` ids"
        )));
    }
    Ok(id)
}

/// The subject (DER) of the federation CA's certificate in `ca` (PEM), for
/// [`client_identity`].
pub fn ca_subject(ca: &Path) -> Result<Vec<u8>> {
    let der = read_cert_der(ca)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(tls_err)?;
    Ok(cert.subject().as_raw().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_revoke_and_identity() {
        let dir = tempfile::tempdir().unwrap();
        let d = init_certs(dir.path(), 2, &default_server_names()).unwrap();
        let der = read_cert_der(&d.client_cert(1)).unwrap();
        let root = ca_subject(&d.ca()).unwrap();
        assert_eq!(client_identity(&der, &root).unwrap(), "client-1");
        assert!(load_deny_list(&d.revoked()).unwrap().is_empty());
        let fp = revoke(&d, &d.client_cert(1)).unwrap();
        assert_eq!(fp, fingerprint(&der));
        let list = load_deny_list(&d.revoked()).unwrap();
        assert!(list.contains(&fp) && list.len() == 1);
        revoke(&d, &d.client_cert(1)).unwrap();
        assert_eq!(load_deny_list(&d.revoked()).unwrap().len(), 1);
    }
}
