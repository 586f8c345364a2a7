//! The node's identity from the hub CA: `{data_dir}/identity/` holds
//! `node.key` (0600, made here, never sent), `node.crt` (issued by the hub
//! CA, `CN` = node, `OU` = node), `ca.crt` (the hub CA) and `hub.pub` (the
//! hub's desired-state key, hex).
//!
//! [`join`] gets them (what `edge-node join` runs): it makes the key, sends
//! a CSR with the one-time join token, and trusts the hub's HTTPS
//! certificate only if it chains to a CA whose DER sha256 is the pin in
//! the token (`<secret>.<pin>`), so nothing else needs to be trusted first.
//! The agent uses these files as its anchors when `hub.public_key` is
//! unset: the CA for HTTPS to the hub, the certificate as its client
//! identity, `hub.pub` as the pinned desired-state key.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest as _, Sha256};

/// Why the identity could not be read, written or obtained.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file could not be read or written.
    #[error("identity {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file or the key does not parse, or TLS refused it.
    #[error("identity {what}: {detail}")]
    Bad {
        /// Which part.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// The join token is not `<secret>.<ca sha256 hex>`.
    #[error("token: expected <secret>.<sha256 of the hub CA, 64 hex characters>")]
    BadToken,
    /// The hub answered a CA that is not the one the token pins.
    #[error("ca_pem: the hub's CA does not match the token's pin {0}")]
    WrongCa(String),
    /// The request failed or the hub refused it.
    #[error("join {url}: {detail}")]
    Join {
        /// The URL.
        url: String,
        /// What went wrong (the hub's message when it answered).
        detail: String,
    },
}

/// The identity files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// PKCS#8 private key (PEM).
    pub key_pem: String,
    /// Node certificate (PEM).
    pub cert_pem: String,
    /// Hub CA certificate (PEM).
    pub ca_pem: String,
    /// Hub desired-state key (hex Ed25519).
    pub hub_public_key: String,
}

/// `{data_dir}/identity`.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join(crate::datadir::IDENTITY)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Identity {
    /// Reads the identity of the node with data in `data_dir`; `None` when
    /// the directory does not exist.
    pub fn load(data_dir: &Path) -> Result<Option<Self>, IdentityError> {
        let d = dir(data_dir);
        if !d.exists() {
            return Ok(None);
        }
        finish_rotation(&d)?;
        let read = |name: &str| {
            let p = d.join(name);
            std::fs::read_to_string(&p).map_err(io(&p))
        };
        Ok(Some(Self {
            key_pem: read("node.key")?,
            cert_pem: read("node.crt")?,
            ca_pem: read("ca.crt")?,
            hub_public_key: read("hub.pub")?.trim().to_owned(),
        }))
    }

    /// Writes the files (key 0600; each through tmp + fsync + rename) into
    /// a directory created owner-only (0700, [`crate::datadir`]).
    pub fn write(&self, data_dir: &Path) -> Result<(), IdentityError> {
        let d = dir(data_dir);
        crate::datadir::create_private(&d).map_err(io(&d))?;
        for (name, text, private) in [
            ("node.key", self.key_pem.as_str(), true),
            ("node.crt", self.cert_pem.as_str(), false),
            ("ca.crt", self.ca_pem.as_str(), false),
            ("hub.pub", self.hub_public_key.as_str(), false),
        ] {
            let p = d.join(name);
            write_atomic(&p, text, private).map_err(io(&p))?;
        }
        Ok(())
    }

    /// Writes a renewed key and certificate (the CA and the hub key stay):
    /// `node.key.new` and `node.crt.new` are each written through tmp +
    /// fsync + rename (0600 for the key), then renamed over `node.key` and
    /// `node.crt`. A crash between the two renames leaves `node.crt.new`
    /// behind, which [`Identity::load`] finishes, so the key and the
    /// certificate on disk always belong together.
    pub fn write_rotated(&self, data_dir: &Path) -> Result<(), IdentityError> {
        let d = dir(data_dir);
        let (key_new, crt_new) = (d.join("node.key.new"), d.join("node.crt.new"));
        write_atomic(&key_new, &self.key_pem, true).map_err(io(&key_new))?;
        write_atomic(&crt_new, &self.cert_pem, false).map_err(io(&crt_new))?;
        finish_rotation(&d)
    }

    /// The key and certificate as rustls uses them; fails when the key does
    /// not belong to the certificate.
    pub fn certified_key(&self) -> Result<CertifiedKey, IdentityError> {
        let bad = |what, e: &dyn std::fmt::Display| IdentityError::Bad {
            what,
            detail: e.to_string(),
        };
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("node.crt", &e))?;
        if chain.is_empty() {
            return Err(bad("node.crt", &"no PEM certificate in it"));
        }
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| bad("node.key", &e))?;
        let ck =
            CertifiedKey::from_der(chain, key, &provider()).map_err(|e| bad("node.key", &e))?;
        ck.keys_match().map_err(|e| bad("node.key", &e))?;
        Ok(ck)
    }

    /// The certificate's validity: `(not_before, not_after)`.
    pub fn validity(&self) -> Result<(SystemTime, SystemTime), IdentityError> {
        let bad = |e: &dyn std::fmt::Display| IdentityError::Bad {
            what: "node.crt",
            detail: e.to_string(),
        };
        let der = CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).map_err(|e| bad(&e))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| bad(&e))?;
        let at = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
        let v = cert.validity();
        Ok((at(v.not_before.timestamp()), at(v.not_after.timestamp())))
    }

    /// A rustls client config for HTTPS to the hub: trusting only the hub
    /// CA, presenting the node certificate, ALPN `http/1.1`.
    pub fn tls_config(&self) -> Result<rustls::ClientConfig, IdentityError> {
        self.tls_config_with(ClientCertSlot::new(self)?)
    }

    /// [`Identity::tls_config`] presenting whatever `slot` holds at each
    /// handshake (so a renewed certificate is used without a new config).
    pub fn tls_config_with(
        &self,
        slot: Arc<ClientCertSlot>,
    ) -> Result<rustls::ClientConfig, IdentityError> {
        let mut cfg = self.mqtt_tls_config_with(slot)?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(cfg)
    }

    /// The same for MQTT (no ALPN): what the agent's link uses by default
    /// once the node has joined.
    pub fn mqtt_tls_config(&self) -> Result<rustls::ClientConfig, IdentityError> {
        self.mqtt_tls_config_with(ClientCertSlot::new(self)?)
    }

    /// [`Identity::mqtt_tls_config`] presenting whatever `slot` holds.
    pub fn mqtt_tls_config_with(
        &self,
        slot: Arc<ClientCertSlot>,
    ) -> Result<rustls::ClientConfig, IdentityError> {
        let bad = |what, e: &dyn std::fmt::Display| IdentityError::Bad {
            what,
            detail: e.to_string(),
        };
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots
                .add(c.map_err(|e| bad("ca.crt", &e))?)
                .map_err(|e| bad("ca.crt", &e))?;
        }
        Ok(rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("tls", &e))?
            .with_root_certificates(roots)
            .with_client_cert_resolver(slot))
    }
}

/// The node's current key and certificate, shared by every TLS config of
/// the agent (MQTT link, artifact fetcher, renewal): rustls asks it at each
/// handshake, so [`ClientCertSlot::replace`] takes effect at the next
/// connection without rebuilding anything.
#[derive(Debug)]
pub struct ClientCertSlot {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ClientCertSlot {
    /// A slot holding `identity`'s key and certificate.
    pub fn new(identity: &Identity) -> Result<Arc<Self>, IdentityError> {
        Ok(Arc::new(Self {
            current: RwLock::new(Arc::new(identity.certified_key()?)),
        }))
    }

    /// Swaps in `identity`'s key and certificate (checked to belong together).
    pub fn replace(&self, identity: &Identity) -> Result<(), IdentityError> {
        let ck = Arc::new(identity.certified_key()?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = ck;
        Ok(())
    }

    fn get(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ResolvesClientCert for ClientCertSlot {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Completes a rotation [`Identity::write_rotated`] began: both `.new`
/// files were complete and fsynced before the first rename, so renaming
/// what is left is always right. A `node.key.new` without `node.crt.new`
/// is a rotation that never finished writing: removed.
fn finish_rotation(d: &Path) -> Result<(), IdentityError> {
    let (key_new, crt_new) = (d.join("node.key.new"), d.join("node.crt.new"));
    if crt_new.exists() {
        if key_new.exists() {
            std::fs::rename(&key_new, d.join("node.key")).map_err(io(&key_new))?;
        }
        std::fs::rename(&crt_new, d.join("node.crt")).map_err(io(&crt_new))?;
        if let Ok(f) = std::fs::File::open(d) {
            let _ = f.sync_all();
        }
    } else if key_new.exists() {
        std::fs::remove_file(&key_new).map_err(io(&key_new))?;
    }
    Ok(())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Trusts a server certificate only if it chains to the certificate (sent
/// by the server along with its own) whose sha256 is `pin`.
#[derive(Debug)]
struct PinnedCa {
    pin: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| sha256_hex(c) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General("the hub sent no CA matching the join token's pin".into())
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What the hub answers a join (`protocols::api::JoinAnswer`, read loosely
/// so the edge does not depend on the hub crate).
#[derive(Debug, serde::Deserialize)]
struct JoinAnswer {
    node: String,
    cert_pem: String,
    ca_pem: String,
    hub_public_key: String,
    #[serde(default)]
    min_revision: u64,
}

/// `identity/revision.floor`: the node's desired revision at the hub when
/// it joined ([`revision_floor`]).
const REVISION_FLOOR: &str = "revision.floor";

/// The desired revision the node had at the hub when it joined (0 when
/// the join answer named none or the file is absent): the session refuses
/// anything older, so an old signed document replayed to a node whose
/// store was wiped is not applied (security review L7). A file that does
/// not hold a number is an error naming it.
pub fn revision_floor(data_dir: &Path) -> Result<u64, IdentityError> {
    let p = dir(data_dir).join(REVISION_FLOOR);
    match std::fs::read_to_string(&p) {
        Ok(text) => text.trim().parse().map_err(|e| IdentityError::Bad {
            what: "revision.floor",
            detail: format!("{e}: {:?}", text.trim()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io(&p)(e)),
    }
}

/// A new node key (ECDSA P-256, made here, never sent) and a CSR for it
/// (PEM); the hub sets the subject itself. Used by [`join`] and by renewal.
pub(crate) fn new_key_and_csr() -> Result<(rcgen::KeyPair, String), IdentityError> {
    let bad = |what, e: &dyn std::fmt::Display| IdentityError::Bad {
        what,
        detail: e.to_string(),
    };
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| bad("node.key", &e))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| bad("csr", &e))?;
    Ok((key, csr))
}

/// Joins the hub at `hub_url` with the one-time `token`: makes the key,
/// sends the CSR, checks the CA against the token's pin, writes the
/// identity files under `data_dir`. Returns the node name the hub set.
pub async fn join(hub_url: &str, token: &str, data_dir: &Path) -> Result<String, IdentityError> {
    let (_, pin) = token
        .trim()
        .split_once('.')
        .ok_or(IdentityError::BadToken)?;
    if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(IdentityError::BadToken);
    }
    let pin = pin.to_ascii_lowercase();
    let bad = |what, e: &dyn std::fmt::Display| IdentityError::Bad {
        what,
        detail: e.to_string(),
    };
    let (key, csr) = new_key_and_csr()?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("tls", &e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            pin: pin.clone(),
            provider: provider(),
        }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let url = format!("{}/v1/join", hub_url.trim_end_matches('/'));
    let join_err = |detail: String| IdentityError::Join {
        url: url.clone(),
        detail,
    };
    if !url.starts_with("https://") {
        return Err(join_err("the hub URL must be https://".into()));
    }
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| join_err(e.to_string()))?;
    let resp = http
        .post(&url)
        .json(&serde_json::json!({"token": token.trim(), "csr_pem": csr}))
        .send()
        .await
        .map_err(|e| join_err(chain(&e)))?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| join_err(e.to_string()))?;
    if !status.is_success() {
        return Err(join_err(format!("{status}: {body}")));
    }
    let answer: JoinAnswer =
        serde_json::from_str(&body).map_err(|e| join_err(format!("unexpected answer: {e}")))?;
    let ca_der =
        CertificateDer::from_pem_slice(answer.ca_pem.as_bytes()).map_err(|e| bad("ca_pem", &e))?;
    if sha256_hex(&ca_der) != pin {
        return Err(IdentityError::WrongCa(pin));
    }
    Identity {
        key_pem: key.serialize_pem(),
        cert_pem: answer.cert_pem,
        ca_pem: answer.ca_pem,
        hub_public_key: answer.hub_public_key,
    }
    .write(data_dir)?;
    let floor = dir(data_dir).join(REVISION_FLOOR);
    write_atomic(&floor, &answer.min_revision.to_string(), false).map_err(io(&floor))?;
    Ok(answer.node)
}

/// An error with its sources (reqwest hides the TLS reason in them).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// tmp + fsync + rename (+ directory fsync); mode 0600 when `private`.
fn write_atomic(path: &Path, text: &str, private: bool) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut tmp = path.to_path_buf();
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
