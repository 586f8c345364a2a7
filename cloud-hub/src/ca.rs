//! The hub's certificate authority: created at first start in
//! `{data_dir}/ca/` (`ca.key` mode 0600, `ca.crt`), it issues the hub's
//! HTTPS server certificate and the client certificates of nodes, hubs and
//! operators.
//!
//! A client certificate names its holder in the subject: `CN` = the name,
//! `OU` = the kind (`node` | `hub` | `operator`, [`IdentityKind`]); that pair
//! is an [`Identity`], and it is what the REST API and the MQTT gate read
//! back ([`identity_of`]). The CA sets both itself: a CSR's requested subject
//! and extensions are ignored, only its public key is used.
//!
//! Keys are ECDSA P-256: rustls with ring verifies it (as it does Ed25519),
//! and unlike Ed25519 certificates it is accepted by every TLS stack an edge
//! gateway may bring (mbedTLS, older OpenSSL, MQTT client libraries).
//!
//! Issued serials and the revocation set live in sled (`ca_issued`,
//! `ca_revoked`); [`Ca::is_revoked`] is the check the gate calls.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SerialNumber,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Validity of the CA certificate itself.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Validity of the hub's HTTPS server certificate (re-issued at every start).
pub const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);

/// Why the CA failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Reading or writing a CA file failed.
    #[error("ca {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A CA file exists but does not parse, or only one of the two exists.
    #[error("ca {path}: {detail}")]
    Malformed {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// Certificate generation or signing failed.
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The CSR did not parse or its signature is wrong.
    #[error("csr_pem: {0}")]
    BadCsr(String),
    /// The issued/revoked store failed.
    #[error("ca store: {0}")]
    Store(#[from] sled::Error),
}

/// What kind of holder a certificate names (its subject `OU`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityKind {
    /// An edge node.
    Node,
    /// A hub (replica, or the hub's own MQTT client).
    Hub,
    /// A human or tool operating the fleet.
    Operator,
}

impl IdentityKind {
    /// The `OU` text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Node => "node",
            Self::Hub => "hub",
            Self::Operator => "operator",
        }
    }

    /// From the `OU` text.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "node" => Some(Self::Node),
            "hub" => Some(Self::Hub),
            "operator" => Some(Self::Operator),
            _ => None,
        }
    }
}

/// Prefix of hub identity names (`hub:cloud-hub`): `:` is not allowed in
/// node names, so no node's `CN` can equal a hub's.
pub const HUB_NAME_PREFIX: &str = "hub:";

/// Who a client certificate names: subject `CN` and `OU`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    /// Kind (`OU`).
    pub kind: IdentityKind,
    /// Name (`CN`).
    pub name: String,
}

impl Identity {
    /// A node's identity.
    pub fn node(name: &str) -> Self {
        Self {
            kind: IdentityKind::Node,
            name: name.to_owned(),
        }
    }

    /// A hub's identity (`OU=hub`). Use a name that is not a valid node
    /// name (e.g. `hub:cloud-hub`, see [`HUB_NAME_PREFIX`]): a broker that
    /// keys its ACL on the `CN` alone (Mosquitto's
    /// `use_identity_as_username`) then cannot mistake a node for a hub.
    pub fn hub(name: &str) -> Self {
        Self {
            kind: IdentityKind::Hub,
            name: name.to_owned(),
        }
    }

    fn key(&self) -> String {
        format!("{}/{}", self.kind.as_str(), self.name)
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.name)
    }
}

/// The identity a DER certificate names (`CN` + `OU`), if it names one.
pub fn identity_of(der: &[u8]) -> Option<Identity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
    let kind = subject
        .iter_organizational_unit()
        .next()?
        .as_str()
        .ok()
        .and_then(IdentityKind::parse)?;
    Some(Identity { kind, name })
}

/// sha256 of DER bytes, lower-case hex (the CA pin of join tokens).
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// A record of one issued certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedRecord {
    /// Who it names.
    pub identity: Identity,
    /// Unix ms it expires at.
    pub not_after_ms: u64,
}

/// A certificate with its private key (PEM), for holders whose key the hub
/// makes (its own server certificate, test rigs).
#[derive(Debug, Clone)]
pub struct KeyedCert {
    /// PEM certificate.
    pub cert_pem: String,
    /// PEM PKCS#8 private key.
    pub key_pem: String,
}

/// The hub's CA.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: Vec<u8>,
    issued: sled::Tree,
    revoked: sled::Tree,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Loads `dir/ca.{key,crt}`, creating both (key 0600) if neither exists.
    pub fn open(dir: &Path, db: &sled::Db) -> Result<Self, CaError> {
        let (key_path, cert_path) = (dir.join("ca.key"), dir.join("ca.crt"));
        let (key_pem, cert_pem) = match (read_opt(&key_path)?, read_opt(&cert_path)?) {
            (Some(k), Some(c)) => (k, c),
            (None, None) => create(dir, &key_path, &cert_path)?,
            (Some(_), None) | (None, Some(_)) => {
                return Err(CaError::Malformed {
                    path: dir.display().to_string(),
                    detail: "only one of ca.key and ca.crt exists; restore the other or remove both to make a new CA".into(),
                });
            }
        };
        let malformed = |path: &Path, e: rcgen::Error| CaError::Malformed {
            path: path.display().to_string(),
            detail: e.to_string(),
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| malformed(&key_path, e))?;
        let cert_der = pem_der(&cert_pem).ok_or_else(|| CaError::Malformed {
            path: cert_path.display().to_string(),
            detail: "not a PEM certificate".into(),
        })?;
        let issuer = Issuer::from_ca_cert_der(&cert_der.clone().into(), key)
            .map_err(|e| malformed(&cert_path, e))?;
        Ok(Self {
            issuer,
            cert_pem,
            cert_der,
            issued: db.open_tree("ca_issued")?,
            revoked: db.open_tree("ca_revoked")?,
        })
    }

    /// Opens (creating if need be) the CA of the hub whose data directory
    /// is `data_dir`, with the hub's database, while that hub is *not*
    /// running (sled holds a lock): to issue certificates before a hub's
    /// first start (a broker's server certificate, a hub's client
    /// certificate for an external broker, test rigs). Dropping the CA
    /// closes the database.
    pub fn open_offline(data_dir: &Path) -> Result<Self, CaError> {
        // No background flusher: the lock is gone once the CA is dropped.
        let db = sled::Config::new()
            .path(data_dir.join("db"))
            .flush_every_ms(None)
            .open()?;
        let ca = Self::open(&data_dir.join("ca"), &db)?;
        db.flush()?;
        Ok(ca)
    }

    /// Opens an existing CA's files in `dir` without the hub's database
    /// (which the running hub holds): issued serials go to a temporary
    /// store, and revocations are not seen. For tools that issue
    /// certificates beside a running hub on the same host (the simulator's
    /// hollow nodes); the hub's own revocation list still applies to what
    /// they issue, as it is keyed by identity.
    pub fn open_detached(dir: &Path) -> Result<Self, CaError> {
        if !dir.join("ca.key").exists() {
            return Err(CaError::Malformed {
                path: dir.display().to_string(),
                detail: "no ca.key: start the hub once to create its CA".into(),
            });
        }
        let db = sled::Config::new().temporary(true).open()?;
        Self::open(dir, &db)
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// sha256 of the CA certificate's DER, hex.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    /// A fresh key and a server certificate for `sans` (DNS names or IPs).
    pub fn issue_server(&self, sans: &[String]) -> Result<KeyedCert, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(sans.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "edgefleet hub");
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, "hub");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert_pem = self.sign(params, &key, None, SERVER_CERT_VALIDITY)?;
        Ok(KeyedCert {
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// A fresh key and a client certificate for `identity` (for holders
    /// that cannot make a CSR themselves, and test rigs).
    pub fn issue_keyed(
        &self,
        identity: &Identity,
        validity: Duration,
    ) -> Result<KeyedCert, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert_pem = self.sign(client_params(identity), &key, Some(identity), validity)?;
        Ok(KeyedCert {
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs the public key of `csr_pem` into a client certificate for
    /// `identity`; the CSR's own subject and extensions are ignored.
    pub fn sign_csr(
        &self,
        identity: &Identity,
        csr_pem: &str,
        validity: Duration,
    ) -> Result<String, CaError> {
        self.sign_request(identity, &parse_csr(csr_pem)?, validity)
    }

    /// [`Ca::sign_csr`] for a CSR parsed (and its signature checked) by
    /// [`parse_csr`].
    pub fn sign_request(
        &self,
        identity: &Identity,
        csr: &CertificateSigningRequestParams,
        validity: Duration,
    ) -> Result<String, CaError> {
        self.sign(
            client_params(identity),
            &csr.public_key,
            Some(identity),
            validity,
        )
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        public_key: &impl PublicKeyData,
        identity: Option<&Identity>,
        validity: Duration,
    ) -> Result<String, CaError> {
        let mut serial = [0u8; 16];
        rand::rng().fill_bytes(&mut serial);
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let now = SystemTime::now();
        params.not_before = (now - backdate(validity)).into();
        params.not_after = (now + validity).into();
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer)?;
        if let Some(identity) = identity {
            let rec = IssuedRecord {
                identity: identity.clone(),
                not_after_ms: unix_ms(now + validity),
            };
            let value = serde_json::to_vec(&rec).unwrap_or_default();
            self.issued.insert(hex::encode(serial), value)?;
        }
        Ok(cert.pem())
    }

    /// Certificates issued so far (serial hex, record).
    pub fn issued(&self) -> Vec<(String, IssuedRecord)> {
        self.issued
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, v)| {
                Some((
                    String::from_utf8(k.to_vec()).ok()?,
                    serde_json::from_slice(&v).ok()?,
                ))
            })
            .collect()
    }

    /// Revokes every certificate of `identity` (durably).
    pub fn revoke(&self, identity: &Identity) -> Result<(), CaError> {
        self.revoked
            .insert(identity.key(), &unix_ms(SystemTime::now()).to_be_bytes())?;
        self.revoked.flush()?;
        Ok(())
    }

    /// Whether `identity` is revoked (what the MQTT gate and the API check
    /// on every connection).
    pub fn is_revoked(&self, identity: &Identity) -> bool {
        // A store error counts as revoked: fail closed.
        self.revoked.contains_key(identity.key()).unwrap_or(true)
    }
}

/// Parses a PEM CSR and checks its self-signature.
pub fn parse_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams, CaError> {
    CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CaError::BadCsr(e.to_string()))
}

fn client_params(identity: &Identity) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, identity.name.as_str());
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, identity.kind.as_str());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}

fn create(dir: &Path, key_path: &Path, cert_path: &Path) -> Result<(String, String), CaError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| CaError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "edgefleet hub CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(300)).into();
    params.not_after = (now + CA_VALIDITY).into();
    let cert = params.self_signed(&key)?;
    let (key_pem, cert_pem) = (key.serialize_pem(), cert.pem());
    write_atomic(key_path, &key_pem, true).map_err(io(key_path))?;
    write_atomic(cert_path, &cert_pem, false).map_err(io(cert_path))?;
    tracing::info!(dir = %dir.display(), fingerprint = %fingerprint(cert.der()), "created the hub CA");
    Ok((key_pem, cert_pem))
}

fn read_opt(path: &Path) -> Result<Option<String>, CaError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CaError::Io {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// The DER of the first certificate in `pem`.
pub fn pem_der(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()
        .map(|c| c.to_vec())
}

/// Writes `text` to `path` through `path.tmp` + fsync + rename (+ fsync of
/// the directory); mode 0600 when `private`.
pub fn write_atomic(path: &Path, text: &str, private: bool) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(".tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = opts.open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent()
        && let Ok(d) = std::fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// How far before "now" an issued certificate becomes valid: 5 minutes of
/// clock skew between hub and holder, but never more than a quarter of the
/// validity, so the fraction of the validity after which a holder renews
/// (the edge's `[identity] renew_after`) keeps its meaning for short
/// certificates too.
pub fn backdate(validity: Duration) -> Duration {
    Duration::from_secs(300).min(validity / 4)
}

/// Unix milliseconds of `t`.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    #[test]
    fn a_ca_survives_a_restart_and_names_identities_in_cn_and_ou() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let ca = Ca::open(&dir.path().join("ca"), &db).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join("ca/ca.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = Ca::open(&dir.path().join("ca"), &db).unwrap();
        assert_eq!(ca.fingerprint(), again.fingerprint());

        // A CSR asking for another name gets the name the CA sets.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut asked = CertificateParams::default();
        asked.distinguished_name.push(DnType::CommonName, "admin");
        asked
            .distinguished_name
            .push(DnType::OrganizationalUnitName, "operator");
        let csr = asked.serialize_request(&key).unwrap().pem().unwrap();
        let pem = again
            .sign_csr(&Identity::node("n1"), &csr, Duration::from_secs(60))
            .unwrap();
        let id = identity_of(&pem_der(&pem).unwrap()).unwrap();
        assert_eq!(id, Identity::node("n1"));
        assert_eq!(again.issued().len(), 1);
        assert!(!again.is_revoked(&id));
        again.revoke(&id).unwrap();
        assert!(again.is_revoked(&id));
        assert!(
            again
                .sign_csr(&id, "not a csr", Duration::from_secs(60))
                .unwrap_err()
                .to_string()
                .starts_with("csr_pem:")
        );

        std::fs::remove_file(dir.path().join("ca/ca.crt")).unwrap();
        let e = Ca::open(&dir.path().join("ca"), &db)
            .unwrap_err()
            .to_string();
        assert!(e.contains("only one of ca.key and ca.crt"), "{e}");
    }
}
