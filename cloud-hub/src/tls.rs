//! HTTPS for the REST API: the rustls [`ServerConfig`] (hub server
//! certificate from [`crate::ca::Ca`], client certificates optional at the
//! TLS layer so bearer-token clients work, verified against the hub CA when
//! presented), and the listeners `axum::serve` runs on. Each accepted
//! connection carries a [`Peer`] (address + the client certificate's
//! [`Identity`]) that handlers read as `ConnectInfo<Peer>`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
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

/// The API's server config: a fresh server certificate for `sans`, client
/// certificates optional (verified against the CA when sent).
pub fn server_config(ca: &Ca, sans: &[String]) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = server_config_with(ca, sans)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The MQTT gate's server config ([`crate::broker::gate`]): a fresh server
/// certificate for `sans`; a client certificate, when sent, must chain to
/// the CA (the gate refuses clients that send none, and counts them).
pub fn mqtt_server_config(ca: &Ca, sans: &[String]) -> Result<Arc<ServerConfig>, TlsError> {
    Ok(Arc::new(server_config_with(ca, sans)?))
}

fn server_config_with(ca: &Ca, sans: &[String]) -> Result<ServerConfig, TlsError> {
    let keyed = ca.issue_server(sans)?;
    let rustls_err = |e: &dyn std::fmt::Display| TlsError::Rustls(e.to_string());
    // The CA goes along so a joining edge can check it against its pin.
    let chain = vec![
        CertificateDer::from_pem_slice(keyed.cert_pem.as_bytes()).map_err(|e| rustls_err(&e))?,
        CertificateDer::from(ca.cert_der().to_vec()),
    ];
    let key =
        PrivateKeyDer::from_pem_slice(keyed.key_pem.as_bytes()).map_err(|e| rustls_err(&e))?;
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| rustls_err(&e))?;
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| rustls_err(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| rustls_err(&e))
}

/// A rustls client config for MQTT (no ALPN) from PEM text: trusting the
/// CA certificates in `ca_pem`, presenting `cert_pem` + `key_pem` when
/// given. Errors name the part (`ca`, `cert`, `key`).
pub fn mqtt_client_config(
    ca_pem: &str,
    client: Option<(&str, &str)>,
) -> Result<rustls::ClientConfig, (&'static str, String)> {
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
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("ca", e.to_string()))?
        .with_root_certificates(roots);
    match client {
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ("cert", e.to_string()))?;
            if chain.is_empty() {
                return Err(("cert", "no PEM certificate in it".into()));
            }
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                .map_err(|e| ("key", e.to_string()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ("key", e.to_string()))
        }
        None => Ok(builder.with_no_client_auth()),
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
