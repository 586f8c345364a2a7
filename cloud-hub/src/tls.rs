//! HTTPS for the REST API: the rustls [`ServerConfig`] (hub server
//! certificate from [`crate::ca::Ca`], client certificates optional at the
//! TLS layer so bearer-token clients work, verified against the hub CA when
//! presented), and the listeners `axum::serve` runs on. Each accepted
//! connection carries a [`Peer`] (address + the client certificate's
//! [`Identity`]) that handlers read as `ConnectInfo<Peer>`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::ca::{Ca, CaError, Identity, identity_of};

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Issuing the server certificate failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(String),
}

/// The rustls provider every TLS config of the hub uses (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The CA as a rustls root store.
pub fn roots(ca: &Ca) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.cert_der().to_vec()))
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    Ok(roots)
}

/// The API's server config: a server certificate for `sans` from `slot`
/// (renewed in place, see [`ServerCertSlot`]), client certificates
/// optional (verified against the CA when sent).
pub fn server_config(ca: &Ca, slot: Arc<ServerCertSlot>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = server_config_with(ca, slot)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The MQTT gate's server config ([`crate::broker::gate`]): the server
/// certificate from `slot`; a client certificate, when sent, must chain to
/// the CA (the gate refuses clients that send none, and counts them).
pub fn mqtt_server_config(
    ca: &Ca,
    slot: Arc<ServerCertSlot>,
) -> Result<Arc<ServerConfig>, TlsError> {
    Ok(Arc::new(server_config_with(ca, slot)?))
}

fn server_config_with(ca: &Ca, slot: Arc<ServerCertSlot>) -> Result<ServerConfig, TlsError> {
    let rustls_err = |e: &dyn std::fmt::Display| TlsError::Rustls(e.to_string());
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| rustls_err(&e))?;
    Ok(ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| rustls_err(&e))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(slot))
}

/// The hub's server certificate for one listener, issued by the hub CA and
/// renewed in place: rustls asks the slot at every handshake, so
/// [`ServerCertSlot::renew`] takes effect at the next connection while
/// connections already up keep theirs. The hub's `server-certs` task renews
/// every slot once [`ServerCertSlot::renewal_due`] says so (two thirds of
/// [`crate::ca::SERVER_CERT_VALIDITY`]), so a hub that runs for months never
/// serves an expired certificate.
#[derive(Debug)]
pub struct ServerCertSlot {
    sans: Vec<String>,
    current: RwLock<(Arc<CertifiedKey>, SystemTime)>,
}

impl ServerCertSlot {
    /// A slot with a fresh certificate for `sans` (DNS names or IPs).
    pub fn new(ca: &Ca, sans: &[String]) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            sans: sans.to_vec(),
            current: RwLock::new((certified_server_key(ca, sans)?, SystemTime::now())),
        }))
    }

    /// Issues a fresh key and certificate for the same names and swaps
    /// them in; on an error the current ones stay.
    pub fn renew(&self, ca: &Ca) -> Result<(), TlsError> {
        let fresh = certified_server_key(ca, &self.sans)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = (fresh, SystemTime::now());
        Ok(())
    }

    /// Whether the current certificate, at `now`, is older than
    /// `renew_after` (a clock that went backwards counts as not due).
    pub fn renewal_due(&self, now: SystemTime, renew_after: Duration) -> bool {
        let issued = self
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .1;
        now.duration_since(issued)
            .is_ok_and(|age| age >= renew_after)
    }

    /// The names the certificate is for.
    pub fn names(&self) -> &[String] {
        &self.sans
    }

    fn get(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .clone()
    }
}

impl ResolvesServerCert for ServerCertSlot {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// A fresh server key and certificate for `sans`, with the CA in the chain
/// (so a joining edge can check it against its pin).
fn certified_server_key(ca: &Ca, sans: &[String]) -> Result<Arc<CertifiedKey>, TlsError> {
    let keyed = ca.issue_server(sans)?;
    let rustls_err = |(part, detail): (&str, String)| TlsError::Rustls(format!("{part}: {detail}"));
    let (mut chain, key) = parse_keyed(&keyed.cert_pem, &keyed.key_pem).map_err(rustls_err)?;
    chain.push(CertificateDer::from(ca.cert_der().to_vec()));
    certified(chain, key).map_err(rustls_err)
}

/// A rustls client config for MQTT (no ALPN) from PEM text: trusting the
/// CA certificates in `ca_pem`, presenting `cert_pem` + `key_pem` when
/// given. Errors name the part (`ca`, `cert`, `key`).
pub fn mqtt_client_config(
    ca_pem: &str,
    client: Option<(&str, &str)>,
) -> Result<rustls::ClientConfig, (&'static str, String)> {
    let builder = mqtt_client_builder(ca_pem)?;
    match client {
        Some((cert_pem, key_pem)) => {
            let (chain, key) = parse_keyed(cert_pem, key_pem)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ("key", e.to_string()))
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// [`mqtt_client_config`] presenting the key and certificate that `files`
/// holds, re-read when the files change (see [`FileClientCert`]).
pub fn mqtt_client_config_with_files(
    ca_pem: &str,
    files: Arc<FileClientCert>,
) -> Result<rustls::ClientConfig, (&'static str, String)> {
    Ok(mqtt_client_builder(ca_pem)?.with_client_cert_resolver(files))
}

type ClientBuilder = rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>;

fn mqtt_client_builder(ca_pem: &str) -> Result<ClientBuilder, (&'static str, String)> {
    let mut roots = RootCertStore::empty();
    let mut any = false;
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let c = c.map_err(|e| ("ca", e.to_string()))?;
        roots.add(c).map_err(|e| ("ca", e.to_string()))?;
        any = true;
    }
    if !any {
        return Err(("ca", "no PEM certificate in it".into()));
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("ca", e.to_string()))?
        .with_root_certificates(roots))
}

/// A certificate chain and its key from PEM text; errors name the part.
fn parse_keyed(
    cert_pem: &str,
    key_pem: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), (&'static str, String)> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ("cert", e.to_string()))?;
    if chain.is_empty() {
        return Err(("cert", "no PEM certificate in it".into()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| ("key", e.to_string()))?;
    Ok((chain, key))
}

/// A client key and certificate kept in two files that something else
/// rotates (cert-manager, a renewal script): rustls asks at every
/// handshake, and when either file's modification time changed since the
/// last load, both are read again. A pair that does not load (half
/// written, key and certificate not matching yet) keeps the previous one
/// and logs a warning; the next handshake tries again. So the hub's link to
/// an external broker picks up rotated material at its next reconnect,
/// without a restart.
#[derive(Debug)]
pub struct FileClientCert {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, Stamp)>,
}

/// Modification times of (cert, key) when they were loaded.
type Stamp = (Option<SystemTime>, Option<SystemTime>);

impl FileClientCert {
    /// Loads `cert` and `key`; errors name the part (`cert`, `key`).
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, (&'static str, String)> {
        let stamp = stamp(cert, key);
        let ck = load_pair(cert, key)?;
        Ok(Arc::new(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new((ck, stamp)),
        }))
    }

    /// The current pair, reloaded first if the files changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let now = stamp(&self.cert, &self.key);
        let (ck, loaded) = self
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if now == loaded {
            return ck;
        }
        match load_pair(&self.cert, &self.key) {
            Ok(fresh) => {
                tracing::info!(cert = %self.cert.display(), "client certificate files changed: reloaded");
                *self.current.write().unwrap_or_else(PoisonError::into_inner) =
                    (fresh.clone(), now);
                fresh
            }
            Err((part, detail)) => {
                tracing::warn!(cert = %self.cert.display(), key = %self.key.display(), part, %detail, "client certificate files changed but do not load; keeping the previous pair");
                ck
            }
        }
    }
}

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (m(cert), m(key))
}

fn load_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, (&'static str, String)> {
    let read = |part, p: &Path| std::fs::read_to_string(p).map_err(|e| (part, e.to_string()));
    let (chain, key) = parse_keyed(&read("cert", cert)?, &read("key", key)?)?;
    certified(chain, key)
}

/// A chain and its key as rustls signs with them; refused (part `key`)
/// when the key is not the certificate's.
fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, (&'static str, String)> {
    CertifiedKey::from_der(chain, key, &provider())
        .map(Arc::new)
        .map_err(|e| ("key", e.to_string()))
}

impl ResolvesClientCert for FileClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Remote address.
    pub addr: SocketAddr,
    /// The identity its (CA-verified) client certificate names, if it sent one.
    pub identity: Option<Identity>,
}

/// A TLS listener: a task accepts and handshakes (each handshake bounded by
/// [`HANDSHAKE_TIMEOUT`], so a slow client does not hold up others), and
/// `axum::serve` takes the finished connections.
#[derive(Debug)]
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, Peer)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `listener` until `stop` is cancelled.
    pub fn spawn(
        listener: TcpListener,
        config: Arc<ServerConfig>,
        stop: CancellationToken,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = stop.cancelled() => return,
                    a = listener.accept() => a,
                };
                let (tcp, addr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let identity = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(|c| identity_of(c));
                            let _ = tx.send((tls, Peer { addr, identity })).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { ready, local })
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task ended (stopping): wait for the graceful shutdown.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.local,
            identity: None,
        })
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// Plain HTTP (only with `http.tls = false`): the same [`Peer`], never
/// with an identity.
#[derive(Debug)]
pub struct PlainListener(pub TcpListener);

impl Listener for PlainListener {
    type Io = TcpStream;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = Listener::accept(&mut self.0).await;
        (
            io,
            Peer {
                addr,
                identity: None,
            },
        )
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.0.local_addr()?,
            identity: None,
        })
    }
}

impl Connected<IncomingStream<'_, PlainListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, PlainListener>) -> Self {
        stream.remote_addr().clone()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]
    use super::*;
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn ca() -> (tempfile::TempDir, Ca) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let ca = Ca::open(&dir.path().join("ca"), &db).unwrap();
        (dir, ca)
    }

    /// A TLS connection over an in-memory pipe; returns the client stream
    /// and the server certificate it was shown.
    async fn connect(
        server: &Arc<ServerConfig>,
        ca: &Ca,
    ) -> (
        tokio_rustls::client::TlsStream<tokio::io::DuplexStream>,
        tokio_rustls::server::TlsStream<tokio::io::DuplexStream>,
        Vec<u8>,
    ) {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let client = mqtt_client_config(ca.cert_pem(), None).unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let acceptor = TlsAcceptor::from(server.clone());
        let name = ServerName::try_from("localhost").unwrap();
        let (c, s) = tokio::join!(connector.connect(name, c), acceptor.accept(s));
        let (c, s) = (c.unwrap(), s.unwrap());
        let shown = c.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        (c, s, shown)
    }

    #[tokio::test]
    async fn a_renewed_server_certificate_serves_new_connections_and_old_ones_keep_working() {
        let (_dir, ca) = ca();
        let slot = ServerCertSlot::new(&ca, &["localhost".to_owned()]).unwrap();
        let server = mqtt_server_config(&ca, slot.clone()).unwrap();
        let (mut old_c, mut old_s, first) = connect(&server, &ca).await;

        assert!(!slot.renewal_due(SystemTime::now(), Duration::from_secs(3600)));
        assert!(slot.renewal_due(
            SystemTime::now() + Duration::from_secs(3601),
            Duration::from_secs(3600)
        ));
        slot.renew(&ca).unwrap();
        assert!(!slot.renewal_due(SystemTime::now(), Duration::from_secs(3600)));

        let (_c, _s, second) = connect(&server, &ca).await;
        assert_ne!(
            first, second,
            "a new connection still got the old certificate"
        );
        // The connection made before the renewal still carries data.
        old_c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        old_s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }

    fn write_pair(dir: &Path, keyed: &crate::ca::KeyedCert) {
        std::fs::write(dir.join("c.crt"), &keyed.cert_pem).unwrap();
        std::fs::write(dir.join("c.key"), &keyed.key_pem).unwrap();
    }

    #[test]
    fn rotated_client_certificate_files_are_reloaded_and_a_broken_pair_keeps_the_old_one() {
        let (dir, ca) = ca();
        let id = crate::ca::Identity::hub("hub-a");
        let (cert, key) = (dir.path().join("c.crt"), dir.path().join("c.key"));
        write_pair(
            dir.path(),
            &ca.issue_keyed(&id, Duration::from_secs(3600)).unwrap(),
        );
        let files = FileClientCert::load(&cert, &key).unwrap();
        let first = files.current().cert[0].to_vec();
        assert_eq!(
            files.current().cert[0].to_vec(),
            first,
            "unchanged files reload"
        );

        // Rotated: both files rewritten (mtime moves even on coarse clocks).
        std::thread::sleep(Duration::from_millis(20));
        write_pair(
            dir.path(),
            &ca.issue_keyed(&id, Duration::from_secs(3600)).unwrap(),
        );
        let bump = |p: &Path| {
            let f = std::fs::File::options().append(true).open(p).unwrap();
            f.set_modified(SystemTime::now() + Duration::from_secs(5))
                .unwrap();
        };
        bump(&cert);
        let second = files.current().cert[0].to_vec();
        assert_ne!(first, second, "rotated files were not picked up");

        // Half written: a key that is not the certificate's.
        let other = ca.issue_keyed(&id, Duration::from_secs(3600)).unwrap();
        std::fs::write(&key, &other.key_pem).unwrap();
        bump(&key);
        assert_eq!(files.current().cert[0].to_vec(), second);
        // Missing files at load are an error naming the part.
        let err = FileClientCert::load(&dir.path().join("nope.crt"), &key).unwrap_err();
        assert_eq!(err.0, "cert");
    }
}
