//! The mirror: every accepted message is on the peer node's disk before the client hears `250`,
//! and the peer delivers it if this node dies first.
//!
//! Each node runs both halves:
//! - the **client** ([`MirrorClient`]) keeps one connection to the peer and sends it every
//!   message this node accepts (`Store`, answered `Stored` once the copy is fsynced in the
//!   peer's `replica/` area), every delivery-state change (`Update`) and every finished message
//!   (`Done`, the peer drops its copy);
//! - the **server** ([`serve`]) keeps the peer's copies and takes them over (moves them into its
//!   own queue and delivers them) when the peer's connection has been gone for
//!   `takeover_after` while this node serves the relay VIP (VRRP moved it here because the
//!   peer died; a node that merely restarted, or lost the link to a peer that still serves,
//!   does not take over).
//!
//! The channel is mutual TLS with the cluster's CA: only a node holding a certificate from that
//! CA can store, read or delete copies (an attacker on the LAN can neither inject mail nor read
//! it). Frames are length-delimited ([`tokio_util::codec::LengthDelimitedCodec`]): a 4-byte
//! header length, a JSON header, then the raw content of a `Store`.
//!
//! **Re-synchronisation.** Every connection starts with `Hello { node, inventory }`, the ids in
//! the client's queue. The server drops copies not in the inventory (finished while the link
//! was down), asks for the inventory ids it lacks (accepted while the link was down, in
//! `degraded` mode), and names the inventory ids it took over while the client was away; the
//! client drops those from its own queue, so a node that comes back does not deliver them a
//! second time. A node that starts up delivers its queue only after this exchange (or after
//! `takeover_after` without reaching the peer), for the same reason.
//!
//! **What can be duplicated.** A message being delivered at the instant its node dies: the
//! back-end may have taken it while the `Done` never left. The peer then delivers it again.
//! That window is one delivery transaction, as with any store-and-forward MTA.
//!
//! The design serves one peer (the two-node pair VRRP runs); `replica/` holds that peer's copies.
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{SinkExt as _, StreamExt as _};
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::{mpsc, oneshot, watch},
};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tracing::{debug, info, warn};

use super::{
    Envelope, MessageId,
    spool::{Area, Spool},
};

/// What to do when the peer cannot take a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMirrorFailure {
    /// Answer `451 4.3.0`: nothing is accepted without a second copy (senders retry).
    Strict,
    /// Accept on this node's disk alone, raise the alarm (log, metric); the backlog is copied
    /// to the peer as soon as it is back.
    Degraded,
}

/// Settings of both halves.
#[derive(Clone)]
pub struct MirrorSettings {
    /// This node's name (`Hello`, and `accepted_by` in envelopes).
    pub node: String,
    /// Where the server half listens for the peer.
    pub listen: SocketAddr,
    /// The peer's server half.
    pub peer: SocketAddr,
    /// The name the peer's certificate must carry.
    pub peer_name: ServerName<'static>,
    pub client_tls: Arc<rustls::ClientConfig>,
    pub server_tls: Arc<rustls::ServerConfig>,
    pub on_failure: OnMirrorFailure,
    /// How often the client proves it is alive; a link silent for 3 intervals is dropped.
    pub heartbeat: Duration,
    /// The peer's link gone this long: its copies are taken over.
    pub takeover_after: Duration,
    /// Longest wait for `Stored` before a copy counts as failed.
    pub ack_timeout: Duration,
    /// Largest content accepted in a `Store` (the relay's message size limit).
    pub max_message_size: u64,
    /// Where the ids taken over from the peer are remembered until the peer has heard of
    /// them (one empty file per id; survives restarts).
    pub taken_over_dir: PathBuf,
    /// Whether this node serves the relay VIP now (VRRP master, or no VRRP for it). A silent
    /// link alone does not prove the peer dead (this node may be the one that restarted, or
    /// the link may be cut while the peer still serves); the copies are taken over only while
    /// the VIP is here, which VRRP moves only when the peer is gone.
    pub serving: Arc<AtomicBool>,
}

/// Mutual-TLS configs for both halves from this node's certificate and key and the cluster
/// CA: the server demands a client certificate from that CA, the client checks the server's.
pub fn tls_configs(
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> Result<(Arc<rustls::ClientConfig>, Arc<rustls::ServerConfig>), MirrorError> {
    let tls = |e: crate::tls::PemError| MirrorError::Tls(e.to_string());
    let chain = crate::tls::load_chain(cert).map_err(tls)?;
    let roots = Arc::new(crate::tls::load_roots(ca).map_err(tls)?);
    let provider = crate::tls::provider();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| MirrorError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, crate::tls::load_key(key).map_err(tls)?)
        .map_err(|e| MirrorError::Tls(format!("{}: {e}", key.display())))?;
    let server = crate::tls::server_config(cert, key, crate::tls::ClientCerts::Required(ca)).map_err(tls)?;
    Ok((Arc::new(client), server))
}

/// Why a copy was not made, or the channel could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MirrorError {
    #[error("the mirror node is not connected")]
    NotConnected,
    #[error("the mirror node did not confirm the copy within {0:?}")]
    Timeout(Duration),
    #[error("the mirror node could not store the copy: {0}")]
    Refused(String),
    #[error("the link to the mirror node broke before it confirmed the copy")]
    LinkLost,
    #[error("mirror TLS: {0}")]
    Tls(String),
    #[error("mirror protocol: {0}")]
    Protocol(String),
}

/// What the mirror tells the relay service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorEvent {
    /// The client half synchronised with the peer; `taken_over` are ids the peer took over
    /// while we were away, already removed from our queue (delivery must forget them).
    Synced { taken_over: Vec<MessageId> },
    /// The server half took these copies over (now in our queue): deliver them.
    TookOver { ids: Vec<MessageId> },
}

/// A frame header. `Store` is followed by the content in the same frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Header {
    Hello { node: String, inventory: Vec<MessageId> },
    HelloAck { node: String, need: Vec<MessageId>, taken_over: Vec<MessageId> },
    Store { envelope: Envelope },
    Stored { id: MessageId },
    StoreFailed { id: MessageId, reason: String },
    Update { envelope: Envelope },
    Done { id: MessageId },
    Ping,
    Pong,
}

/// One frame: its header and, for `Store`, the content.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Frame {
    header: Header,
    content: Bytes,
}

impl Frame {
    fn new(header: Header) -> Frame {
        Frame { header, content: Bytes::new() }
    }

    fn encode(&self) -> Result<Bytes, MirrorError> {
        let header = serde_json::to_vec(&self.header).map_err(|e| MirrorError::Protocol(e.to_string()))?;
        let mut out = BytesMut::with_capacity(4 + header.len() + self.content.len());
        out.put_u32(header.len() as u32);
        out.put_slice(&header);
        out.put_slice(&self.content);
        Ok(out.freeze())
    }

    fn decode(mut frame: BytesMut) -> Result<Frame, MirrorError> {
        if frame.len() < 4 {
            return Err(MirrorError::Protocol("frame shorter than its header length".into()));
        }
        let header_len = frame.get_u32() as usize;
        if header_len > frame.len() {
            return Err(MirrorError::Protocol(format!("header length {header_len} beyond the frame")));
        }
        let header = frame.split_to(header_len);
        let header: Header = serde_json::from_slice(&header).map_err(|e| MirrorError::Protocol(e.to_string()))?;
        Ok(Frame { header, content: frame.freeze() })
    }
}

/// Room for a `Store` of the largest message plus its envelope (1000s of recipients).
fn codec(max_message_size: u64) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(usize::try_from(max_message_size).unwrap_or(usize::MAX).saturating_add(4 << 20))
        .new_codec()
}

async fn send<T: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Framed<T, LengthDelimitedCodec>,
    frame: &Frame,
) -> Result<(), MirrorError> {
    io.send(frame.encode()?).await.map_err(|e| MirrorError::Protocol(e.to_string()))
}

async fn receive<T: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Framed<T, LengthDelimitedCodec>,
) -> Result<Option<Frame>, MirrorError> {
    match io.next().await {
        None => Ok(None),
        Some(Err(e)) => Err(MirrorError::Protocol(e.to_string())),
        Some(Ok(b)) => Frame::decode(b).map(Some),
    }
}

/// Runs blocking spool work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, super::spool::SpoolError> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("spool task failed: {e}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Client half.

/// Counters shown in metrics and `mxlb status`.
#[derive(Debug, Default)]
pub struct MirrorStats {
    pub copies_confirmed: AtomicU64,
    pub copies_failed: AtomicU64,
    /// Messages accepted without a copy (`degraded`): the alarm.
    pub accepted_unmirrored: AtomicU64,
    pub resynced: AtomicU64,
    pub taken_over: AtomicU64,
}

enum Outgoing {
    Store { envelope: Envelope, content: Bytes, ack: oneshot::Sender<Result<(), MirrorError>> },
    Update(Envelope),
    Done(MessageId),
}

/// The sending half: used by the relay for every accepted message.
pub struct MirrorClient {
    tx: mpsc::Sender<Outgoing>,
    connected: Arc<AtomicBool>,
    synced: watch::Receiver<bool>,
    settings: MirrorSettings,
    pub stats: Arc<MirrorStats>,
}

/// How a copy went, for a message the relay is about to acknowledge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Copy {
    /// On the peer's disk.
    Mirrored,
    /// `degraded` mode and the peer could not take it: on this node only (alarm raised).
    Unmirrored(MirrorError),
}

impl MirrorClient {
    /// Starts the connection task. `spool` is read on (re)connection to resend what the peer
    /// lacks; `events` receives [`MirrorEvent::Synced`].
    pub fn start(
        settings: MirrorSettings,
        spool: Arc<Spool>,
        events: mpsc::Sender<MirrorEvent>,
        stop: watch::Receiver<bool>,
    ) -> (Arc<MirrorClient>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(4096);
        let connected = Arc::new(AtomicBool::new(false));
        let (synced_tx, synced) = watch::channel(false);
        let stats = Arc::new(MirrorStats::default());
        let client = Arc::new(MirrorClient { tx, connected: connected.clone(), synced, settings: settings.clone(), stats: stats.clone() });
        let task = tokio::spawn(client_loop(settings, spool, events, rx, connected, synced_tx, stats, stop));
        (client, task)
    }

    /// Whether the link is up now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Resolves once the first exchange with the peer completed, or after `takeover_after`
    /// without reaching it: the moment this node may start delivering its own queue.
    pub async fn wait_first_sync(&self) {
        let mut synced = self.synced.clone();
        let _ = tokio::time::timeout(self.settings.takeover_after, synced.wait_for(|s| *s)).await;
    }

    /// Puts a copy of an accepted message on the peer's disk and waits for its confirmation.
    /// `Err` only in `strict` mode (answer 451); `degraded` mode returns `Unmirrored` instead.
    pub async fn replicate(&self, envelope: &Envelope, content: Bytes) -> Result<Copy, MirrorError> {
        let outcome = self.try_replicate(envelope, content).await;
        match outcome {
            Ok(()) => {
                self.stats.copies_confirmed.fetch_add(1, Ordering::Relaxed);
                Ok(Copy::Mirrored)
            }
            Err(e) => {
                self.stats.copies_failed.fetch_add(1, Ordering::Relaxed);
                match self.settings.on_failure {
                    OnMirrorFailure::Strict => Err(e),
                    OnMirrorFailure::Degraded => {
                        self.stats.accepted_unmirrored.fetch_add(1, Ordering::Relaxed);
                        warn!(id = %envelope.id, error = %e, "accepted WITHOUT a mirror copy (degraded mode); it is copied when the peer is back");
                        Ok(Copy::Unmirrored(e))
                    }
                }
            }
        }
    }

    async fn try_replicate(&self, envelope: &Envelope, content: Bytes) -> Result<(), MirrorError> {
        if !self.is_connected() {
            return Err(MirrorError::NotConnected);
        }
        let (ack, wait) = oneshot::channel();
        let out = Outgoing::Store { envelope: envelope.clone(), content, ack };
        let timeout = self.settings.ack_timeout;
        let sent = tokio::time::timeout(timeout, self.tx.send(out)).await;
        if !matches!(sent, Ok(Ok(()))) {
            return Err(MirrorError::Timeout(timeout));
        }
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(MirrorError::LinkLost),
            Err(_) => Err(MirrorError::Timeout(timeout)),
        }
    }

    /// Tells the peer a message's new delivery state (deferred attempts), so a takeover
    /// continues its retry schedule and expiry. Best effort: a lost update only means the
    /// peer's copy is a little older.
    pub fn update(&self, envelope: &Envelope) {
        if self.is_connected() {
            let _ = self.tx.try_send(Outgoing::Update(envelope.clone()));
        }
    }

    /// Tells the peer a message is finished (delivered or bounced). If the link is down the
    /// next `Hello` inventory says the same.
    pub fn done(&self, id: &MessageId) {
        if self.is_connected() {
            let _ = self.tx.try_send(Outgoing::Done(id.clone()));
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn client_loop(
    settings: MirrorSettings,
    spool: Arc<Spool>,
    events: mpsc::Sender<MirrorEvent>,
    mut rx: mpsc::Receiver<Outgoing>,
    connected: Arc<AtomicBool>,
    synced: watch::Sender<bool>,
    stats: Arc<MirrorStats>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if *stop.borrow() {
            break;
        }
        let session_stop = stop.clone();
        let session = tokio::select! {
            _ = stop.changed() => break,
            r = client_session(&settings, &spool, &events, &mut rx, &connected, &synced, &stats, session_stop) => r,
        };
        connected.store(false, Ordering::Relaxed);
        // Stores queued while the link went down fail now (strict: 451) rather than at
        // their timeout.
        while let Ok(out) = rx.try_recv() {
            if let Outgoing::Store { ack, .. } = out {
                let _ = ack.send(Err(MirrorError::LinkLost));
            }
        }
        match session {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                debug!(peer = %settings.peer, error = %e, "mirror link down");
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
    }
    connected.store(false, Ordering::Relaxed);
}

#[allow(clippy::too_many_arguments)]
async fn client_session(
    settings: &MirrorSettings,
    spool: &Arc<Spool>,
    events: &mpsc::Sender<MirrorEvent>,
    rx: &mut mpsc::Receiver<Outgoing>,
    connected: &AtomicBool,
    synced: &watch::Sender<bool>,
    stats: &MirrorStats,
    mut stop: watch::Receiver<bool>,
) -> Result<(), MirrorError> {
    let io_timeout = settings.ack_timeout;
    let tcp = tokio::time::timeout(io_timeout, TcpStream::connect(settings.peer))
        .await
        .map_err(|_| MirrorError::Timeout(io_timeout))?
        .map_err(|e| MirrorError::Protocol(format!("connect {}: {e}", settings.peer)))?;
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(settings.client_tls.clone());
    let tls = tokio::time::timeout(io_timeout, connector.connect(settings.peer_name.clone(), tcp))
        .await
        .map_err(|_| MirrorError::Timeout(io_timeout))?
        .map_err(|e| MirrorError::Tls(e.to_string()))?;
    let mut io = Framed::new(tls, codec(settings.max_message_size));

    let inventory = {
        let spool = spool.clone();
        blocking(move || spool.ids(Area::Queue)).await.map_err(MirrorError::Protocol)?
    };
    send(&mut io, &Frame::new(Header::Hello { node: settings.node.clone(), inventory })).await?;
    let (need, taken_over) = match tokio::time::timeout(io_timeout, receive(&mut io)).await {
        Ok(Ok(Some(Frame { header: Header::HelloAck { need, taken_over, node }, .. }))) => {
            info!(peer = %node, need = need.len(), taken_over = taken_over.len(), "mirror link up");
            (need, taken_over)
        }
        Ok(Ok(other)) => return Err(MirrorError::Protocol(format!("expected hello_ack, got {other:?}"))),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(MirrorError::Timeout(io_timeout)),
    };
    // The peer delivers these: drop them from our queue before delivery (which starts on
    // `synced`) can see them.
    if !taken_over.is_empty() {
        let (spool, ids) = (spool.clone(), taken_over.clone());
        let dropped = blocking(move || {
            for id in &ids {
                spool.remove(Area::Queue, id)?;
            }
            Ok(())
        })
        .await;
        if let Err(e) = dropped {
            return Err(MirrorError::Protocol(format!("dropping what the peer took over: {e}")));
        }
        info!(count = taken_over.len(), "the peer took these messages over while we were away: dropped here");
    }
    let _ = events.send(MirrorEvent::Synced { taken_over }).await;
    synced.send_replace(true);

    // Copies the peer lacks (accepted while it was away) go first, before new traffic.
    for id in need {
        let loaded = {
            let (spool, id) = (spool.clone(), id.clone());
            blocking(move || spool.load(Area::Queue, &id)).await
        };
        let Ok((envelope, content)) = loaded else { continue };
        send(&mut io, &Frame { header: Header::Store { envelope }, content: Bytes::from(content) }).await?;
        match tokio::time::timeout(io_timeout, receive(&mut io)).await {
            Ok(Ok(Some(Frame { header: Header::Stored { .. }, .. }))) => {
                stats.resynced.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(Some(Frame { header: Header::StoreFailed { id, reason }, .. }))) => {
                warn!(%id, %reason, "the peer could not store a resent copy");
            }
            Ok(Ok(other)) => return Err(MirrorError::Protocol(format!("expected stored, got {other:?}"))),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(MirrorError::Timeout(io_timeout)),
        }
    }
    connected.store(true, Ordering::Relaxed);

    let mut pending: HashMap<MessageId, oneshot::Sender<Result<(), MirrorError>>> = HashMap::new();
    let mut heartbeat = tokio::time::interval(settings.heartbeat);
    let mut last_heard = Instant::now();
    let result = loop {
        tokio::select! {
            _ = stop.changed() => break Ok(()),
            out = rx.recv() => {
                let Some(out) = out else { break Ok(()) };
                let frame = match out {
                    Outgoing::Store { envelope, content, ack } => {
                        pending.insert(envelope.id.clone(), ack);
                        Frame { header: Header::Store { envelope }, content }
                    }
                    Outgoing::Update(envelope) => Frame::new(Header::Update { envelope }),
                    Outgoing::Done(id) => Frame::new(Header::Done { id }),
                };
                if let Err(e) = send(&mut io, &frame).await {
                    break Err(e);
                }
            }
            frame = receive(&mut io) => {
                last_heard = Instant::now();
                match frame {
                    Ok(Some(Frame { header: Header::Stored { id }, .. })) => {
                        if let Some(ack) = pending.remove(&id) {
                            let _ = ack.send(Ok(()));
                        }
                    }
                    Ok(Some(Frame { header: Header::StoreFailed { id, reason }, .. })) => {
                        if let Some(ack) = pending.remove(&id) {
                            let _ = ack.send(Err(MirrorError::Refused(reason)));
                        }
                    }
                    Ok(Some(Frame { header: Header::Pong, .. })) => {}
                    Ok(Some(other)) => break Err(MirrorError::Protocol(format!("unexpected {:?}", other.header))),
                    Ok(None) => break Err(MirrorError::LinkLost),
                    Err(e) => break Err(e),
                }
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > settings.heartbeat * 3 {
                    break Err(MirrorError::Timeout(settings.heartbeat * 3));
                }
                if let Err(e) = send(&mut io, &Frame::new(Header::Ping)).await {
                    break Err(e);
                }
            }
        }
    };
    connected.store(false, Ordering::Relaxed);
    for (_, ack) in pending.drain() {
        let _ = ack.send(Err(MirrorError::LinkLost));
    }
    result
}

// ---------------------------------------------------------------------------------------------
// Server half.

/// Runs the server half until `stop`: keeps the peer's copies, and takes them over when the
/// peer's link has been gone for `takeover_after` (also counting from start-up, so copies left
/// by a peer that died while this node was down are delivered too).
pub async fn serve(
    settings: MirrorSettings,
    spool: Arc<Spool>,
    events: mpsc::Sender<MirrorEvent>,
    stats: Arc<MirrorStats>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), MirrorError> {
    let listener = crate::shed::freebind_listener(settings.listen).map_err(|e| MirrorError::Protocol(format!("listen on {}: {e}", settings.listen)))?;
    std::fs::create_dir_all(&settings.taken_over_dir)
        .map_err(|e| MirrorError::Protocol(format!("{}: {e}", settings.taken_over_dir.display())))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(settings.server_tls.clone());
    let link = Arc::new(PeerLink::default());
    let mut check = tokio::time::interval(settings.heartbeat);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            conn = listener.accept() => {
                let Ok((tcp, from)) = conn else { continue };
                let _ = tcp.set_nodelay(true);
                let (acceptor, settings, spool, link, stop) = (acceptor.clone(), settings.clone(), spool.clone(), link.clone(), stop.clone());
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(settings.ack_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            warn!(%from, error = %e, "mirror: TLS handshake refused (not a cluster node?)");
                            return;
                        }
                        Err(_) => return,
                    };
                    link.connected();
                    if let Err(e) = peer_session(tls, &settings, &spool, stop).await {
                        debug!(%from, error = %e, "mirror: peer link ended");
                    }
                    link.disconnected();
                });
            }
            _ = check.tick() => {
                if settings.serving.load(Ordering::Relaxed) && link.takeover_due(settings.takeover_after) {
                    match take_over(&settings, &spool).await {
                        Ok(ids) => {
                            if !ids.is_empty() {
                                stats.taken_over.fetch_add(ids.len() as u64, Ordering::Relaxed);
                                warn!(count = ids.len(), "mirror: the peer is gone; its messages were taken over and are delivered from here");
                                let _ = events.send(MirrorEvent::TookOver { ids }).await;
                            }
                        }
                        Err(e) => warn!(error = %e, "mirror: takeover failed; retrying"),
                    }
                }
            }
        }
    }
    Ok(())
}

/// Whether the peer is connected, and since when it is not.
#[derive(Debug)]
struct PeerLink {
    state: Mutex<LinkState>,
}

#[derive(Debug)]
struct LinkState {
    /// Connections open now (a reconnect may overlap the old one's end).
    open: u32,
    /// When the last connection ended (or the server started).
    gone_since: Instant,
    /// Copies were already taken over for this absence.
    taken: bool,
}

impl Default for PeerLink {
    fn default() -> Self {
        PeerLink { state: Mutex::new(LinkState { open: 0, gone_since: Instant::now(), taken: false }) }
    }
}

impl PeerLink {
    fn lock(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn connected(&self) {
        self.lock().open += 1;
    }

    fn disconnected(&self) {
        let mut s = self.lock();
        s.open = s.open.saturating_sub(1);
        if s.open == 0 {
            s.gone_since = Instant::now();
            s.taken = false;
        }
    }

    /// True once per absence longer than `after`.
    fn takeover_due(&self, after: Duration) -> bool {
        let mut s = self.lock();
        if s.open == 0 && !s.taken && s.gone_since.elapsed() >= after {
            s.taken = true;
            true
        } else {
            false
        }
    }
}

/// Moves every copy into our own queue, remembering each id so the peer drops its own copy
/// when it returns. The marker is written first: a crash between the two steps leaves a
/// marker for a copy still in `replica/`, which the next takeover completes.
async fn take_over(settings: &MirrorSettings, spool: &Arc<Spool>) -> Result<Vec<MessageId>, String> {
    let (spool, dir) = (spool.clone(), settings.taken_over_dir.clone());
    match tokio::task::spawn_blocking(move || -> Result<Vec<MessageId>, String> {
        let ids = spool.ids(Area::Replica).map_err(|e| e.to_string())?;
        for id in &ids {
            crate::statefile::save(&dir, id.as_str(), &()).map_err(|e| e.to_string())?;
            spool.promote(id).map_err(|e| e.to_string())?;
        }
        Ok(ids)
    })
    .await
    {
        Ok(r) => r,
        Err(e) => Err(e.to_string()),
    }
}

/// The ids remembered as taken over.
fn taken_over_ids(dir: &Path) -> HashSet<MessageId> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

async fn peer_session<T: AsyncRead + AsyncWrite + Unpin>(
    tls: T,
    settings: &MirrorSettings,
    spool: &Arc<Spool>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), MirrorError> {
    let mut io = Framed::new(tls, codec(settings.max_message_size));
    let silence = settings.heartbeat * 3;
    let (node, inventory) = match tokio::time::timeout(settings.ack_timeout, receive(&mut io)).await {
        Ok(Ok(Some(Frame { header: Header::Hello { node, inventory }, .. }))) => (node, inventory),
        Ok(Ok(other)) => return Err(MirrorError::Protocol(format!("expected hello, got {other:?}"))),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(MirrorError::Timeout(settings.ack_timeout)),
    };
    let (need, taken_over) = {
        let (spool, dir) = (spool.clone(), settings.taken_over_dir.clone());
        tokio::task::spawn_blocking(move || reconcile(&spool, &dir, inventory))
            .await
            .map_err(|e| MirrorError::Protocol(e.to_string()))?
            .map_err(MirrorError::Protocol)?
    };
    info!(peer = %node, need = need.len(), taken_over = taken_over.len(), "mirror: peer connected");
    send(&mut io, &Frame::new(Header::HelloAck { node: settings.node.clone(), need, taken_over })).await?;

    // Stores run concurrently (each is an fsync); their confirmations come back in any order.
    let (done_tx, mut done_rx) = mpsc::channel::<Frame>(1024);
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            reply = done_rx.recv() => {
                if let Some(reply) = reply {
                    send(&mut io, &reply).await?;
                }
            }
            frame = tokio::time::timeout(silence, receive(&mut io)) => {
                let frame = match frame {
                    Err(_) => return Err(MirrorError::Timeout(silence)),
                    Ok(Ok(Some(frame))) => frame,
                    Ok(Ok(None)) => return Ok(()),
                    Ok(Err(e)) => return Err(e),
                };
                match frame.header {
                    Header::Store { envelope } => {
                        let (spool, done_tx) = (spool.clone(), done_tx.clone());
                        tokio::spawn(async move {
                            let id = envelope.id.clone();
                            let content = frame.content;
                            let stored = blocking(move || spool.store(Area::Replica, &envelope, &content)).await;
                            let reply = match stored {
                                Ok(()) => Header::Stored { id },
                                Err(reason) => Header::StoreFailed { id, reason },
                            };
                            let _ = done_tx.send(Frame::new(reply)).await;
                        });
                    }
                    // Not waited for: each is an fsync, and a Done held up behind others is a
                    // copy a takeover would deliver twice. They concern messages whose Store
                    // was confirmed before, so they never overtake it.
                    Header::Update { envelope } => {
                        let spool = spool.clone();
                        tokio::spawn(blocking(move || spool.update(Area::Replica, &envelope)));
                    }
                    Header::Done { id } => {
                        let spool = spool.clone();
                        tokio::spawn(blocking(move || spool.remove(Area::Replica, &id)));
                    }
                    Header::Ping => send(&mut io, &Frame::new(Header::Pong)).await?,
                    other => return Err(MirrorError::Protocol(format!("unexpected {other:?}"))),
                }
            }
        }
    }
}

/// The `Hello` exchange on the server side: drops copies the peer finished, lists the ones it
/// must resend, and the ones we took over (forgetting markers the peer no longer holds).
fn reconcile(spool: &Spool, taken_dir: &Path, inventory: Vec<MessageId>) -> Result<(Vec<MessageId>, Vec<MessageId>), String> {
    let inventory: HashSet<MessageId> = inventory.into_iter().collect();
    let replicas: HashSet<MessageId> = spool.ids(Area::Replica).map_err(|e| e.to_string())?.into_iter().collect();
    for gone in replicas.difference(&inventory) {
        spool.remove(Area::Replica, gone).map_err(|e| e.to_string())?;
    }
    let taken = taken_over_ids(taken_dir);
    let taken_over: Vec<MessageId> = taken.intersection(&inventory).cloned().collect();
    for stale in taken.difference(&inventory) {
        let _ = std::fs::remove_file(taken_dir.join(stale.as_str()));
    }
    let mut need: Vec<MessageId> =
        inventory.iter().filter(|id| !replicas.contains(*id) && !taken.contains(*id)).cloned().collect();
    need.sort();
    Ok((need, taken_over))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::{ClientInfo, Recipient};

    struct Node {
        dir: PathBuf,
        spool: Arc<Spool>,
        settings: MirrorSettings,
    }

    /// A CA and one certificate per name (PEM files in `dir`).
    fn pki(dir: &Path, names: &[&str]) -> Vec<(PathBuf, PathBuf)> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        names
            .iter()
            .map(|name| {
                let key = KeyPair::generate().unwrap();
                let cert = CertificateParams::new(vec![name.to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
                let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
                std::fs::write(&c, cert.pem()).unwrap();
                std::fs::write(&k, key.serialize_pem()).unwrap();
                (c, k)
            })
            .collect()
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn node(root: &Path, name: &str, peer_name: &str, ca: &Path, id: &(PathBuf, PathBuf), listen: u16, peer: u16) -> Node {
        let dir = root.join(name);
        let spool = Arc::new(Spool::open(&dir.join("spool")).unwrap());
        let (client_tls, server_tls) = tls_configs(&id.0, &id.1, ca).unwrap();
        let settings = MirrorSettings {
            node: name.into(),
            listen: format!("127.0.0.1:{listen}").parse().unwrap(),
            peer: format!("127.0.0.1:{peer}").parse().unwrap(),
            peer_name: ServerName::try_from(peer_name.to_string()).unwrap(),
            client_tls,
            server_tls,
            on_failure: OnMirrorFailure::Strict,
            heartbeat: Duration::from_millis(50),
            takeover_after: Duration::from_millis(300),
            ack_timeout: Duration::from_secs(2),
            max_message_size: 1 << 20,
            taken_over_dir: dir.join("taken-over"),
            serving: Arc::new(AtomicBool::new(false)),
        };
        Node { dir, spool, settings }
    }

    fn envelope(n: u64) -> Envelope {
        Envelope {
            id: format!("{n:024x}").parse().unwrap(),
            mail_from: "a@example.com".into(),
            rcpts: vec![Recipient::new("b@example.net".into())],
            accepted_at: 1,
            accepted_by: "a".into(),
            client: ClientInfo { addr: "192.0.2.1:1000".parse().unwrap(), helo: "h".into(), tls: false, authenticated: false },
            eight_bit: false,
            smtputf8: false,
            size: 5,
        }
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn copies_resync_done_and_takeover_only_while_serving() {
        struct Scratch(PathBuf);
        impl Drop for Scratch {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let root = std::env::temp_dir().join(format!("mxlb-mirror-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let _scratch = Scratch(root.clone());
        let ids = pki(&root, &["a.test", "b.test"]);
        let ca = root.join("ca.pem");
        let (pa, pb) = (free_port(), free_port());
        let a = node(&root, "a", "b.test", &ca, &ids[0], pa, pb);
        let b = node(&root, "b", "a.test", &ca, &ids[1], pb, pa);
        let (stop_tx, stop) = watch::channel(false);

        // A message queued at A while B is not running yet ("degraded" backlog).
        let early = envelope(1);
        a.spool.store(Area::Queue, &early, b"early").unwrap();
        let (events_a, _events_a_rx) = mpsc::channel(16);
        let (client, _task) = MirrorClient::start(a.settings.clone(), a.spool.clone(), events_a, stop.clone());
        assert_eq!(client.replicate(&envelope(2), Bytes::from_static(b"x")).await, Err(MirrorError::NotConnected));

        let (events_b, mut events_b_rx) = mpsc::channel(16);
        let stats = Arc::new(MirrorStats::default());
        tokio::spawn(serve(b.settings.clone(), b.spool.clone(), events_b, stats, stop.clone()));
        until("the link", || client.is_connected()).await;
        // The backlog was copied on connection.
        assert_eq!(b.spool.load(Area::Replica, &early.id).unwrap().1, b"early");

        // A new message: confirmed only once on B's disk.
        let msg = envelope(3);
        a.spool.store(Area::Queue, &msg, b"hello").unwrap();
        assert_eq!(client.replicate(&msg, Bytes::from_static(b"hello")).await, Ok(Copy::Mirrored));
        assert_eq!(b.spool.load(Area::Replica, &msg.id).unwrap().1, b"hello");
        // Done drops the copy.
        a.spool.remove(Area::Queue, &early.id).unwrap();
        client.done(&early.id);
        until("the copy to go", || !b.spool.contains(Area::Replica, &early.id)).await;

        // A stranger (certificate from another CA) is refused by B's server.
        let stranger_dir = root.join("stranger");
        std::fs::create_dir_all(&stranger_dir).unwrap();
        let strange = pki(&stranger_dir, &["evil.test"]);
        let (evil_tls, _) = tls_configs(&strange[0].0, &strange[0].1, &ca).unwrap();
        let tcp = TcpStream::connect(b.settings.listen).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(evil_tls);
        let attempt = async {
            let tls = connector.connect(ServerName::try_from("b.test").unwrap(), tcp).await?;
            let mut io = Framed::new(tls, codec(1 << 20));
            io.send(Frame::new(Header::Hello { node: "evil".into(), inventory: vec![] }).encode().unwrap()).await?;
            match io.next().await {
                Some(Ok(_)) => Ok(()),
                Some(Err(e)) => Err(e),
                None => Err(std::io::Error::other("closed")),
            }
        };
        assert!(attempt.await.is_err(), "a node without a cluster certificate got an answer");

        // A's link dies (A stops): B does not take over while it does not serve the VIP...
        stop_tx.send_replace(true);
        let (stop2_tx, stop2) = watch::channel(false);
        let (events_b2, mut events_b2_rx) = mpsc::channel(16);
        drop(events_b_rx.try_recv());
        // (B's server stopped with the same signal; run it again alone.)
        tokio::time::sleep(Duration::from_millis(100)).await;
        tokio::spawn(serve(b.settings.clone(), b.spool.clone(), events_b2, Arc::new(MirrorStats::default()), stop2.clone()));
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(events_b2_rx.try_recv().is_err(), "took over without serving the VIP");
        assert!(b.spool.contains(Area::Replica, &msg.id));
        // ...and does once VRRP gives it the VIP.
        b.settings.serving.store(true, Ordering::Relaxed);
        let event = tokio::time::timeout(Duration::from_secs(3), events_b2_rx.recv()).await.unwrap().unwrap();
        assert_eq!(event, MirrorEvent::TookOver { ids: vec![msg.id.clone()] });
        assert!(b.spool.contains(Area::Queue, &msg.id));

        // A comes back: it learns B took the message over, drops it, and does not get it back.
        let (events_a2, mut events_a2_rx) = mpsc::channel(16);
        let (client2, _task) = MirrorClient::start(a.settings.clone(), a.spool.clone(), events_a2, stop2.clone());
        let synced = tokio::time::timeout(Duration::from_secs(3), events_a2_rx.recv()).await.unwrap().unwrap();
        assert_eq!(synced, MirrorEvent::Synced { taken_over: vec![msg.id.clone()] });
        assert!(!a.spool.contains(Area::Queue, &msg.id), "A still queues what B took over");
        until("the link", || client2.is_connected()).await;
        stop2_tx.send_replace(true);
        drop((a.dir, b.dir));
    }
}
