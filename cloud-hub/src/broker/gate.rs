//! The identity gate in front of the embedded rumqttd.
//!
//! Every client connection goes through it:
//! 1. TLS with a client certificate that chains to the hub CA (rustls
//!    [`WebPkiClientVerifier`]); the identity is the certificate's subject:
//!    `CN` = name, `OU` = role (`node` | `hub`, [`IdentityKind`]). A revoked
//!    identity ([`crate::ca::Ca::is_revoked`]) is refused. In lab mode
//!    (`embedded_broker.tls = false`) the connection is plain TCP and the
//!    identity is the node named by the CONNECT's client id, unauthenticated.
//! 2. The first packet, read with rumqttc's MQTT 3.1.1 codec within
//!    [`CONNECT_TIMEOUT`] of the TCP accept, must be a CONNECT; a node's
//!    client id must be its name, and its last will (if any) must be its own
//!    `status` topic. The credentials are replaced with rumqttd's internal
//!    ones ([`super::Internal`]) and the CONNECT is sent on to rumqttd.
//! 3. Then bytes flow both ways. Broker → client passes through unparsed.
//!    Client → broker is framed and checked packet by packet ([`Acl`]): a
//!    node `X` may publish only on `…/nodes/X/{telemetry,reported,status,
//!    events}` and subscribe only to `…/nodes/X/{desired,ack}`. A hub
//!    identity may do everything (its bytes are not parsed).
//!
//! A node revoked while connected is cut off at the next bytes it sends
//! (at the latest its next keep-alive ping); nothing it sends after the
//! revocation is forwarded.
//!
//! Any violation closes the connection before the offending packet reaches
//! rumqttd, is counted by reason ([`BrokerRefusal`], hub metrics
//! `edgefleet_hub_broker_refused_total{reason=…}`) and logged with the
//! client's name (escaped: `?name`). Refusals at CONNECT are answered with a
//! CONNACK that says why (`NotAuthorized`, `BadClientId`) before the close.
//!
//! Limits: at most `embedded_broker.max_connections` gate connections at
//! once (more are refused and counted as `capacity`; the hub's own session
//! does not go through the gate), and no packet larger than
//! [`MAX_SYNC_PACKET_BYTES`].
//!
//! # Invariants
//! - Nothing a node sends reaches rumqttd before its CONNECT passed every
//!   check; after that, only packets that passed [`Acl::check`] do, in the
//!   order sent.
//! - rumqttd sees only the internal credentials, never the client's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use protocols::limits::MAX_SYNC_PACKET_BYTES;
use protocols::{TopicKind, Topics};
use rumqttc::mqttbytes::{self, FixedHeader, PacketType, Protocol};
use rumqttc::{ConnAck, Connect, ConnectReturnCode, Login, Publish, Subscribe};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Internal;
use crate::ca::{Identity, IdentityKind, identity_of};
use crate::hub::Hub;
use crate::metrics::{BrokerRefusal, Metrics};

/// How long a client has from the TCP accept to a complete CONNECT (TLS
/// handshake included).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;

/// What the gate needs to run.
#[derive(Debug)]
pub struct GateSettings {
    /// TLS (the default); `None` is lab mode (plain TCP, client id as
    /// identity).
    pub tls: Option<Arc<ServerConfig>>,
    /// Most gate connections at once.
    pub max_connections: usize,
    /// Where rumqttd is and how to log in.
    pub internal: Internal,
    /// The hub session's own client id: no node may use it (session
    /// takeover).
    pub reserved_client_id: String,
}

/// A running gate; it stops when [`Gate::stop`] is called (open connections
/// are closed).
#[derive(Debug)]
pub struct Gate {
    local: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    /// Starts accepting on `listener`.
    pub fn spawn(
        listener: TcpListener,
        hub: Arc<Hub>,
        settings: GateSettings,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            tls: settings.tls.map(TlsAcceptor::from),
            permits: Arc::new(Semaphore::new(settings.max_connections)),
            internal: settings.internal,
            reserved_client_id: settings.reserved_client_id,
            hub,
        });
        let task = tokio::spawn(accept_loop(listener, shared, stop.clone()));
        Ok(Self { local, stop, task })
    }

    /// The address the gate listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stops accepting, closes every connection, and waits for that.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

struct Shared {
    hub: Arc<Hub>,
    tls: Option<TlsAcceptor>,
    permits: Arc<Semaphore>,
    internal: Internal,
    reserved_client_id: String,
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            a = listener.accept() => a,
        };
        let (tcp, addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                debug!(error = %e, "broker gate: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = shared.permits.clone().try_acquire_owned() else {
            refuse(&shared.hub.metrics, BrokerRefusal::Capacity, None, addr);
            drop(tcp);
            continue;
        };
        let (shared, stop) = (shared.clone(), stop.clone());
        conns.spawn(async move {
            let _ = tcp.set_nodelay(true);
            let m = &shared.hub.metrics;
            m.broker_connections.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                () = stop.cancelled() => {}
                () = serve(tcp, addr, &shared) => {}
            }
            m.broker_connections.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    conns.shutdown().await;
}

/// Counts and logs a refusal.
fn refuse(metrics: &Metrics, why: BrokerRefusal, name: Option<&str>, addr: SocketAddr) {
    metrics.broker_refused(why);
    warn!(
        reason = why.as_str(),
        client = ?name.unwrap_or("?"),
        %addr,
        "broker gate refused a client"
    );
}

/// One connection, TLS or plain.
async fn serve(tcp: TcpStream, addr: SocketAddr, shared: &Shared) {
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let m = &shared.hub.metrics;
    match &shared.tls {
        Some(acceptor) => {
            let tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    let why = if is_certificate_error(&e) {
                        BrokerRefusal::BadCert
                    } else {
                        BrokerRefusal::Tls
                    };
                    refuse(m, why, None, addr);
                    debug!(%addr, error = %e, "broker gate: TLS handshake failed");
                    return;
                }
                Err(_) => return refuse(m, BrokerRefusal::Timeout, None, addr),
            };
            let cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec());
            session(tls, addr, shared, deadline, Peer::Tls(cert)).await;
        }
        None => session(tcp, addr, shared, deadline, Peer::Plain).await,
    }
}

/// What the transport says about the client.
enum Peer {
    /// TLS: the client's certificate (DER), if it sent one (it was verified
    /// against the hub CA during the handshake).
    Tls(Option<Vec<u8>>),
    /// Lab mode: nothing.
    Plain,
}

fn is_certificate_error(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| {
            matches!(
                r,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
        })
}

/// A refusal, and the CONNACK code to answer it with (when the CONNECT was
/// read).
struct Refused {
    why: BrokerRefusal,
    code: Option<ConnectReturnCode>,
    name: Option<String>,
}

impl Refused {
    fn new(why: BrokerRefusal) -> Self {
        Self {
            why,
            code: None,
            name: None,
        }
    }

    fn answer(mut self, code: ConnectReturnCode, name: &str) -> Self {
        self.code = Some(code);
        self.name = Some(name.to_owned());
        self
    }
}

/// The MQTT session of one client: CONNECT, checks, then forwarding.
async fn session<S>(
    mut client: S,
    addr: SocketAddr,
    shared: &Shared,
    deadline: tokio::time::Instant,
    peer: Peer,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let m = &shared.hub.metrics;
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let connect = match tokio::time::timeout_at(deadline, read_connect(&mut client, &mut buf)).await
    {
        Ok(Ok(c)) => c,
        Ok(Err(Some(why))) => return refuse(m, why, None, addr),
        // The client closed before sending a CONNECT.
        Ok(Err(None)) => return,
        Err(_) => return refuse(m, BrokerRefusal::Timeout, None, addr),
    };
    let acl = match admit(&connect, peer, shared) {
        Ok(acl) => acl,
        Err(r) => {
            if let Some(code) = r.code {
                let mut out = BytesMut::new();
                if ConnAck::new(code, false).write(&mut out).is_ok() {
                    let _ = client.write_all(&out).await;
                    let _ = client.flush().await;
                }
            }
            let name = r.name.as_deref().or(Some(connect.client_id.as_str()));
            return refuse(m, r.why, name, addr);
        }
    };
    let mut upstream = match connect_upstream(&shared.internal, connect).await {
        Ok(u) => u,
        Err(e) => {
            warn!(client = ?acl.name(), error = %e, "broker gate: cannot reach the embedded broker");
            return;
        }
    };
    debug!(client = ?acl.name(), %addr, "broker gate: client connected");
    let outcome = match acl {
        Acl::Hub { .. } => {
            // Trusted: bytes both ways, unparsed (what was read past the
            // CONNECT goes first).
            if upstream.write_all(&buf).await.is_ok() {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
            Ok(())
        }
        Acl::Node(ref node) => {
            let identity = Identity::node(&node.name);
            let revoked = || shared.hub.ca.is_revoked(&identity);
            // Not a violation: the message goes on, only the broker does
            // not keep it; counted under `retain`.
            let unretained = || m.broker_refused(BrokerRefusal::Retain);
            forward_checked(client, upstream, buf, node, revoked, unretained).await
        }
    };
    if let Err(why) = outcome {
        refuse(m, why, Some(acl.name()), addr);
    }
}

/// Reads until one whole packet is buffered; it must be a v3.1.1 CONNECT.
/// `Err(None)`: the client closed first.
async fn read_connect<S>(
    client: &mut S,
    buf: &mut BytesMut,
) -> Result<Connect, Option<BrokerRefusal>>
where
    S: AsyncRead + Unpin,
{
    loop {
        match next_frame(buf) {
            Ok(Some((header, frame))) => {
                if !matches!(header.packet_type(), Ok(PacketType::Connect)) {
                    return Err(Some(BrokerRefusal::BadPacket));
                }
                let c = Connect::read(header, frame).map_err(|_| Some(BrokerRefusal::BadPacket))?;
                if c.protocol != Protocol::V4 {
                    return Err(Some(BrokerRefusal::BadPacket));
                }
                return Ok(c);
            }
            Ok(None) => {}
            Err(_) => return Err(Some(BrokerRefusal::BadPacket)),
        }
        buf.reserve(READ_CHUNK);
        match client.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(_) => {}
        }
    }
}

/// The next whole packet in `buf` (split off), `None` when more bytes are
/// needed.
fn next_frame(buf: &mut BytesMut) -> Result<Option<(FixedHeader, Bytes)>, mqttbytes::Error> {
    match mqttbytes::check(buf.iter(), MAX_SYNC_PACKET_BYTES) {
        Ok(header) => Ok(Some((header, buf.split_to(header.frame_length()).freeze()))),
        Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Decides who the client is and what it may do, from the transport and its
/// CONNECT.
fn admit(connect: &Connect, peer: Peer, shared: &Shared) -> Result<Acl, Refused> {
    let topics = &shared.hub.topics;
    let client_id = connect.client_id.as_str();
    let identity = match peer {
        Peer::Tls(None) => {
            return Err(Refused::new(BrokerRefusal::NoCert)
                .answer(ConnectReturnCode::NotAuthorized, client_id));
        }
        Peer::Tls(Some(der)) => match identity_of(&der) {
            Some(id) if id.kind != IdentityKind::Operator => id,
            _ => {
                return Err(Refused::new(BrokerRefusal::Identity)
                    .answer(ConnectReturnCode::NotAuthorized, client_id));
            }
        },
        Peer::Plain => {
            if !protocols::validate::is_valid_name(client_id) {
                return Err(Refused::new(BrokerRefusal::ClientId)
                    .answer(ConnectReturnCode::BadClientId, client_id));
            }
            Identity::node(client_id)
        }
    };
    if shared.hub.ca.is_revoked(&identity) {
        return Err(Refused::new(BrokerRefusal::Revoked)
            .answer(ConnectReturnCode::NotAuthorized, &identity.name));
    }
    let acl = match identity.kind {
        IdentityKind::Hub => Acl::Hub {
            name: identity.name,
        },
        _ => Acl::Node(
            NodeAcl::new(topics, &identity.name)
                .with_max_retained_reported(shared.hub.limits.max_reported_bytes),
        ),
    };
    if let Acl::Node(node) = &acl {
        if client_id != node.name || client_id == shared.reserved_client_id {
            return Err(Refused::new(BrokerRefusal::ClientId)
                .answer(ConnectReturnCode::BadClientId, &node.name));
        }
        if let Some(will) = &connect.last_will
            && will.topic != node.status
        {
            return Err(Refused::new(BrokerRefusal::WillAcl)
                .answer(ConnectReturnCode::NotAuthorized, &node.name));
        }
    }
    debug!(client = ?acl.name(), hub = matches!(acl, Acl::Hub { .. }), "broker gate: admitted");
    Ok(acl)
}

/// Opens rumqttd's internal port and sends the client's CONNECT with the
/// internal credentials.
async fn connect_upstream(internal: &Internal, mut connect: Connect) -> std::io::Result<TcpStream> {
    connect.login = Some(Login::new(
        internal.username.clone(),
        internal.password.clone(),
    ));
    let mut out = BytesMut::with_capacity(connect.size() + 8);
    connect
        .write(&mut out)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut upstream = TcpStream::connect(internal.addr).await?;
    upstream.set_nodelay(true)?;
    upstream.write_all(&out).await?;
    Ok(upstream)
}

/// Client → broker checked packet by packet, broker → client copied, until
/// either side closes (`Ok`) or the client breaks a rule (`Err`).
async fn forward_checked<S>(
    client: S,
    upstream: TcpStream,
    mut buf: BytesMut,
    acl: &NodeAcl,
    revoked: impl Fn() -> bool,
    unretained: impl Fn(),
) -> Result<(), BrokerRefusal>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut up_rx, up_tx) = upstream.into_split();
    let mut up_tx = BufWriter::with_capacity(READ_CHUNK, up_tx);
    let up = async {
        loop {
            // A node revoked while connected: nothing more of it goes
            // through (checked per read, so at the latest at its next
            // keep-alive ping).
            if !buf.is_empty() && revoked() {
                return Err(BrokerRefusal::Revoked);
            }
            // Forward every whole packet buffered, checked, then read more.
            let mut violation = None;
            loop {
                match next_frame(&mut buf) {
                    Ok(Some((header, frame))) => match acl.filter(header, &frame) {
                        Ok(fwd) => {
                            let out = match &fwd {
                                Forward::AsIs => &frame,
                                Forward::Unretained(f) => {
                                    unretained();
                                    f
                                }
                            };
                            if up_tx.write_all(out).await.is_err() {
                                return Ok(());
                            }
                        }
                        Err(why) => {
                            violation = Some(why);
                            break;
                        }
                    },
                    Ok(None) => break,
                    Err(_) => {
                        violation = Some(BrokerRefusal::BadPacket);
                        break;
                    }
                }
            }
            if up_tx.flush().await.is_err() {
                return Ok(());
            }
            if let Some(why) = violation {
                return Err(why);
            }
            buf.reserve(READ_CHUNK);
            match client_rx.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            }
        }
    };
    let down = async {
        let _ = tokio::io::copy(&mut up_rx, &mut client_tx).await;
        let _ = client_tx.shutdown().await;
    };
    tokio::select! {
        r = up => r,
        () = down => Ok(()),
    }
}

/// What a connected client may do.
#[derive(Debug)]
enum Acl {
    /// A hub identity: everything.
    Hub {
        /// Its certificate's name.
        name: String,
    },
    /// A node: its own topics.
    Node(NodeAcl),
}

impl Acl {
    fn name(&self) -> &str {
        match self {
            Self::Hub { name } => name,
            Self::Node(n) => &n.name,
        }
    }
}

/// Node `name`'s topics (exact strings: a filter with wildcards never
/// matches one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAcl {
    name: String,
    status: String,
    publish: [String; 4],
    subscribe: [String; 2],
    max_retained_reported: usize,
}

/// Largest retained `status` message the broker keeps (a node's status is
/// well under 1 KiB).
pub const MAX_RETAINED_STATUS_BYTES: usize = 4096;

/// What the gate sends on for a packet it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forward {
    /// The packet as it came.
    AsIs,
    /// The same PUBLISH without its retain flag (re-encoded): a retained
    /// message the broker must not keep, because only `status` and
    /// `reported` are retained topics and each has a size bound
    /// ([`MAX_RETAINED_STATUS_BYTES`], the hub's `limits.max_reported_bytes`).
    /// The message still reaches the hub; the broker's retained store
    /// stays bounded per identity (security review M4).
    Unretained(Bytes),
}

impl NodeAcl {
    /// The rules for node `name` under `topics`.
    pub fn new(topics: &Topics, name: &str) -> Self {
        let t = |k| topics.node(name, k);
        Self {
            name: name.to_owned(),
            status: t(TopicKind::Status),
            publish: [
                t(TopicKind::Telemetry),
                t(TopicKind::Reported),
                t(TopicKind::Status),
                t(TopicKind::Events),
            ],
            subscribe: [t(TopicKind::Desired), t(TopicKind::Ack)],
            max_retained_reported: crate::config::LimitsConfig::default().max_reported_bytes,
        }
    }

    /// Retained `reported` messages above `bytes` are passed on unretained.
    #[must_use]
    pub fn with_max_retained_reported(mut self, bytes: usize) -> Self {
        self.max_retained_reported = bytes;
        self
    }

    /// Whether the broker may keep a retained message of `len` bytes on
    /// `topic` for this node.
    pub fn may_retain(&self, topic: &str, len: usize) -> bool {
        (topic == self.status && len <= MAX_RETAINED_STATUS_BYTES)
            || (topic == self.publish[1] && len <= self.max_retained_reported)
    }

    /// Whether the node may publish on `topic`.
    pub fn may_publish(&self, topic: &str) -> bool {
        self.publish.iter().any(|t| t == topic)
    }

    /// Whether the node may subscribe to `filter`.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        self.subscribe.iter().any(|t| t == filter)
    }

    /// Whether `topic` may be the node's last will.
    pub fn may_will(&self, topic: &str) -> bool {
        topic == self.status
    }

    /// Checks one packet the node sent (after its CONNECT): `Ok` when it
    /// may pass (see [`NodeAcl::filter`] for what passes).
    pub fn check(&self, header: FixedHeader, frame: &Bytes) -> Result<(), BrokerRefusal> {
        self.filter(header, frame).map(|_| ())
    }

    /// Checks one packet the node sent and says what to send on: a
    /// publish outside the node's topics, a subscription outside its own,
    /// or a packet only a broker sends is refused; a retained publish the
    /// broker must not keep goes on without its retain flag.
    pub fn filter(&self, header: FixedHeader, frame: &Bytes) -> Result<Forward, BrokerRefusal> {
        match header.packet_type() {
            Ok(PacketType::Publish) => {
                let mut p =
                    Publish::read(header, frame.clone()).map_err(|_| BrokerRefusal::BadPacket)?;
                if !self.may_publish(&p.topic) {
                    return Err(BrokerRefusal::PublishAcl);
                }
                if p.retain && !self.may_retain(&p.topic, p.payload.len()) {
                    p.retain = false;
                    let mut out = BytesMut::with_capacity(frame.len());
                    p.write(&mut out).map_err(|_| BrokerRefusal::BadPacket)?;
                    return Ok(Forward::Unretained(out.freeze()));
                }
                Ok(Forward::AsIs)
            }
            Ok(PacketType::Subscribe) => {
                let s =
                    Subscribe::read(header, frame.clone()).map_err(|_| BrokerRefusal::BadPacket)?;
                if s.filters.iter().all(|f| self.may_subscribe(&f.path)) {
                    Ok(Forward::AsIs)
                } else {
                    Err(BrokerRefusal::SubscribeAcl)
                }
            }
            Ok(
                PacketType::Unsubscribe
                | PacketType::PubAck
                | PacketType::PubRec
                | PacketType::PubRel
                | PacketType::PubComp
                | PacketType::PingReq
                | PacketType::Disconnect,
            ) => Ok(Forward::AsIs),
            // A second CONNECT, or packets only a broker sends.
            Ok(
                PacketType::Connect
                | PacketType::ConnAck
                | PacketType::SubAck
                | PacketType::UnsubAck
                | PacketType::PingResp,
            )
            | Err(_) => Err(BrokerRefusal::BadPacket),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, reason = "test code")]
    use super::*;
    use rumqttc::{QoS, SubscribeFilter, Unsubscribe};

    fn frame(write: impl FnOnce(&mut BytesMut)) -> (FixedHeader, Bytes) {
        let mut b = BytesMut::new();
        write(&mut b);
        next_frame(&mut b).unwrap().unwrap()
    }

    fn retained(topic: &str, len: usize) -> (FixedHeader, Bytes) {
        frame(|b| {
            let mut p = Publish::new(topic, QoS::AtLeastOnce, vec![7; len]);
            p.pkid = 9;
            p.retain = true;
            p.write(b).unwrap();
        })
    }

    #[test]
    fn only_status_and_reported_are_retained_and_each_within_its_bound() {
        let topics = Topics::default();
        let a = NodeAcl::new(&topics, "a").with_max_retained_reported(1000);
        let t = |k| topics.node("a", k);
        let keep = [
            (t(TopicKind::Status), MAX_RETAINED_STATUS_BYTES),
            (t(TopicKind::Reported), 1000),
            (t(TopicKind::Reported), 0), // clearing a retained message
        ];
        for (topic, len) in keep {
            let (h, f) = retained(&topic, len);
            assert_eq!(a.filter(h, &f), Ok(Forward::AsIs), "{topic} {len}");
        }
        let strip = [
            (t(TopicKind::Status), MAX_RETAINED_STATUS_BYTES + 1),
            (t(TopicKind::Reported), 1001),
            (t(TopicKind::Telemetry), 10),
            (t(TopicKind::Events), 10),
        ];
        for (topic, len) in strip {
            let (h, f) = retained(&topic, len);
            let Ok(Forward::Unretained(out)) = a.filter(h, &f) else {
                panic!("{topic} {len}: kept retained");
            };
            // The same message, QoS and packet id, only not retained.
            let (h2, f2) = frame(|b| b.extend_from_slice(&out));
            let p = Publish::read(h2, f2).unwrap();
            assert!(!p.retain, "{topic}");
            assert_eq!(
                (p.topic.as_str(), p.pkid, p.qos),
                (topic.as_str(), 9, QoS::AtLeastOnce)
            );
            assert_eq!(p.payload.len(), len);
        }
    }

    fn publish(topic: &str) -> (FixedHeader, Bytes) {
        frame(|b| {
            let mut p = Publish::new(topic, QoS::AtLeastOnce, vec![1, 2, 3]);
            p.pkid = 7;
            p.write(b).unwrap();
        })
    }

    fn subscribe(filters: &[&str]) -> (FixedHeader, Bytes) {
        frame(|b| {
            let mut s = Subscribe::new_many(
                filters
                    .iter()
                    .map(|f| SubscribeFilter::new((*f).to_owned(), QoS::AtLeastOnce)),
            );
            s.pkid = 3;
            s.write(b).unwrap();
        })
    }

    #[test]
    fn a_node_publishes_and_subscribes_only_on_its_own_topics() {
        let topics = Topics::default();
        let a = NodeAcl::new(&topics, "a");
        for kind in [
            TopicKind::Telemetry,
            TopicKind::Reported,
            TopicKind::Status,
            TopicKind::Events,
        ] {
            let (h, f) = publish(&topics.node("a", kind));
            assert_eq!(a.check(h, &f), Ok(()), "{kind:?}");
            let (h, f) = publish(&topics.node("b", kind));
            assert_eq!(a.check(h, &f), Err(BrokerRefusal::PublishAcl), "{kind:?}");
        }
        for kind in [TopicKind::Desired, TopicKind::Ack] {
            let (h, f) = publish(&topics.node("a", kind));
            assert_eq!(a.check(h, &f), Err(BrokerRefusal::PublishAcl), "{kind:?}");
        }
        let own = [
            topics.node("a", TopicKind::Desired),
            topics.node("a", TopicKind::Ack),
        ];
        let (h, f) = subscribe(&[&own[0], &own[1]]);
        assert_eq!(a.check(h, &f), Ok(()));
        for bad in [
            "#".to_owned(),
            topics.all_nodes(TopicKind::Telemetry),
            topics.node("b", TopicKind::Desired),
            topics.node("a", TopicKind::Telemetry),
            format!("{}/nodes/a/+", topics.root()),
        ] {
            let (h, f) = subscribe(&[&own[0], &bad]);
            assert_eq!(a.check(h, &f), Err(BrokerRefusal::SubscribeAcl), "{bad}");
        }
        assert!(a.may_will(&topics.node("a", TopicKind::Status)));
        assert!(!a.may_will(&topics.node("b", TopicKind::Status)));
        assert!(!a.may_will(&topics.node("a", TopicKind::Reported)));
    }

    #[test]
    fn control_packets_pass_and_broker_packets_or_garbage_do_not() {
        let a = NodeAcl::new(&Topics::default(), "a");
        let (h, f) = frame(|b| {
            rumqttc::PingReq.write(b).unwrap();
        });
        assert_eq!(a.check(h, &f), Ok(()));
        let (h, f) = frame(|b| {
            rumqttc::PubAck::new(9).write(b).unwrap();
        });
        assert_eq!(a.check(h, &f), Ok(()));
        let (h, f) = frame(|b| {
            Unsubscribe::new("x").write(b).unwrap();
        });
        assert_eq!(a.check(h, &f), Ok(()));
        let (h, f) = frame(|b| {
            Connect::new("a").write(b).unwrap();
        });
        assert_eq!(a.check(h, &f), Err(BrokerRefusal::BadPacket));
        let (h, f) = frame(|b| {
            ConnAck::new(ConnectReturnCode::Success, false)
                .write(b)
                .unwrap();
        });
        assert_eq!(a.check(h, &f), Err(BrokerRefusal::BadPacket));
        // A PUBLISH whose topic length runs past the packet.
        let mut b = BytesMut::from(&[0x32u8, 4, 0, 200, b'a', b'b'][..]);
        let (h, f) = next_frame(&mut b).unwrap().unwrap();
        assert_eq!(a.check(h, &f), Err(BrokerRefusal::BadPacket));
    }

    #[test]
    fn frames_are_split_whole_and_oversized_ones_refused() {
        let mut b = BytesMut::new();
        let mut p = Publish::new("t", QoS::AtMostOnce, vec![0; 10]);
        p.write(&mut b).unwrap();
        p.payload = Bytes::from_static(b"xy");
        p.write(&mut b).unwrap();
        let whole = b.len();
        let mut part = b.split_to(whole - 1);
        let (h, first) = next_frame(&mut part).unwrap().unwrap();
        assert_eq!(Publish::read(h, first).unwrap().payload.len(), 10);
        assert!(
            next_frame(&mut part).unwrap().is_none(),
            "half a packet waits"
        );
        // Remaining length 16 MiB + 1: refused before it is read.
        let too_big = MAX_SYNC_PACKET_BYTES + 1;
        let mut len = Vec::new();
        let mut n = too_big;
        loop {
            let mut byte = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                byte |= 0x80;
            }
            len.push(byte);
            if n == 0 {
                break;
            }
        }
        let mut b = BytesMut::from(&[0x30u8][..]);
        b.extend_from_slice(&len);
        assert!(next_frame(&mut b).is_err());
    }
}
