//! The relay inside `mxlb run`: the SMTP listeners on the relay VIP, the spool, the mirror
//! and delivery, started together and stopped by the one shutdown signal; and the queue
//! commands (`mxlb queue ...`) the control socket serves.
//!
//! The order of an acceptance is the relay's promise: the message is written to this node's
//! spool and, at the same time, sent to the mirror; only when both are durable does the
//! client hear `250`. Then it is handed to delivery, which removes it from both nodes when
//! every recipient is delivered or bounced.
use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    sync::{Arc, RwLock},
    time::Duration,
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{Mutex, mpsc, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

use super::{
    ClientInfo, Envelope, MessageId, RcptVerdict,
    delivery::{self, Backend, BackendState, Delivery, DeliveryHandle, QueueStore, StoreError},
    mirror::{self, Copy, MirrorClient, MirrorEvent, MirrorSettings},
    auth::Credentials,
    recipients::RecipientPolicy,
    session::{self, Acceptor, SessionSettings},
    spool::{Area, Spool},
};
use crate::{
    config::{
        Config,
        relay::{DeliveryProtocol, RelayConfig, Routing},
    },
    control::Controller,
    desired::Health,
};

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("relay spool {path}: {message}")]
    Spool { path: String, message: String },
    #[error("relay: {0}")]
    Setup(String),
    #[error("relay listener {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The STARTTLS config: the relay's certificate, and (optionally) client certificates from
/// `tls_client_ca` that make a client authenticated. Clients without a certificate are
/// still served (port 25 must accept mail from anyone).
pub fn starttls_config(r: &RelayConfig) -> Result<Option<Arc<rustls::ServerConfig>>, RelayError> {
    let (Some(cert), Some(key)) = (&r.tls_cert, &r.tls_key) else { return Ok(None) };
    let clients = match &r.tls_client_ca {
        Some(ca) => crate::tls::ClientCerts::Optional(ca),
        None => crate::tls::ClientCerts::Ignored,
    };
    crate::tls::server_config(cert, key, clients).map(Some).map_err(|e| RelayError::Setup(e.to_string()))
}

/// The mirror's settings from `[relay.mirror]`.
pub fn mirror_settings(r: &RelayConfig) -> Result<Option<MirrorSettings>, RelayError> {
    let Some(m) = &r.mirror else { return Ok(None) };
    let (client_tls, server_tls) =
        mirror::tls_configs(&m.tls_cert, &m.tls_key, &m.tls_ca).map_err(|e| RelayError::Setup(e.to_string()))?;
    let peer_name = rustls::pki_types::ServerName::try_from(m.peer_name.clone())
        .map_err(|_| RelayError::Setup(format!("`{}` is not a TLS server name", m.peer_name)))?;
    Ok(Some(MirrorSettings {
        node: r.node_name.clone(),
        listen: m.listen,
        peer: m.peer,
        peer_name,
        client_tls,
        server_tls,
        on_failure: m.on_failure,
        heartbeat: Duration::from_millis(m.heartbeat_ms),
        takeover_after: Duration::from_millis(m.takeover_after_ms),
        ack_timeout: Duration::from_millis(m.ack_timeout_ms),
        max_message_size: r.max_message_size,
        taken_over_dir: r.spool_dir.join("taken-over"),
        serving: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    }))
}

/// A queued message as `mxlb queue` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueEntry {
    /// `queue` (this node delivers it) or `replica` (the peer's copy, held for takeover).
    pub area: String,
    #[serde(flatten)]
    pub envelope: Envelope,
}

/// What `mxlb queue` asks the running agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum QueueAction {
    List,
    Show { id: String },
    Retry { id: String },
    Delete { id: String },
    /// Re-read the valid-mailbox list.
    Reload,
}

/// Reads the queue straight from the spool (the CLI does this when no agent runs).
pub fn list_spool(spool: &Spool) -> Result<Vec<QueueEntry>, String> {
    let mut out = Vec::new();
    for (area, name) in [(Area::Queue, "queue"), (Area::Replica, "replica")] {
        for id in spool.ids(area).map_err(|e| e.to_string())? {
            // A message finished between the listing and the read is simply not shown.
            if let Ok(envelope) = spool.envelope(area, &id) {
                out.push(QueueEntry { area: name.into(), envelope });
            }
        }
    }
    Ok(out)
}

/// One message with its content (`mxlb queue show`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedMessage {
    pub entry: QueueEntry,
    /// The content as stored (our Received header first), lossily decoded for display.
    pub content: String,
}

pub fn show_spool(spool: &Spool, id: &str) -> Result<QueuedMessage, String> {
    let id: MessageId = id.parse().map_err(|e: super::BadMessageId| e.to_string())?;
    for (area, name) in [(Area::Queue, "queue"), (Area::Replica, "replica")] {
        if let Ok((envelope, content)) = spool.load(area, &id) {
            return Ok(QueuedMessage {
                entry: QueueEntry { area: name.into(), envelope },
                content: String::from_utf8_lossy(&content).into_owned(),
            });
        }
    }
    Err(format!("no message {id} in the queue"))
}

/// Opens the spool of `[relay]` (the CLI's read-only view uses the same).
pub fn open_spool(dir: &Path) -> Result<Spool, RelayError> {
    Spool::open(dir).map_err(|e| RelayError::Spool { path: dir.display().to_string(), message: e.to_string() })
}

/// Whether `config` runs a relay.
pub fn configured(config: &Config) -> Option<&RelayConfig> {
    config.relay.as_ref()
}

/// Shared by the SMTP sessions: accepts a message durably on both nodes.
pub struct Acceptance {
    spool: Arc<Spool>,
    mirror: Option<Arc<MirrorClient>>,
    policy: Arc<RecipientPolicy>,
    /// Accepted messages go to delivery through this.
    submit: mpsc::UnboundedSender<MessageId>,
    counters: Arc<RelayCounters>,
    credentials: Option<Arc<Credentials>>,
}

/// What the relay counts for `/metrics`.
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// Messages answered 250.
    pub accepted: std::sync::atomic::AtomicU64,
    /// Messages answered 451 because they could not be stored on both nodes (or this one).
    pub refused_unstored: std::sync::atomic::AtomicU64,
}

/// The relay's figures at one instant (`/metrics`, `mxlb status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelaySnapshot {
    pub accepted: u64,
    pub refused_unstored: u64,
    /// Messages in this node's queue, and copies held for the peer.
    pub queued: u64,
    pub replicas: u64,
    /// None without `[relay.mirror]`.
    pub mirror_connected: Option<bool>,
    pub copies_confirmed: u64,
    pub copies_failed: u64,
    /// Accepted on this node's disk only (`degraded` mode): the alarm.
    pub accepted_unmirrored: u64,
    pub resynced: u64,
    pub taken_over: u64,
}

impl Acceptance {
    fn check(&self, rcpt: &str, client: &ClientInfo) -> RcptVerdict {
        self.policy.check(rcpt, client.addr.ip(), client.authenticated)
    }

    /// Stores on this node and on the mirror at the same time; `Err` is the text of the
    /// `451 4.3.0` reply, and then nothing stays queued anywhere.
    async fn store(&self, envelope: Envelope, content: Vec<u8>) -> Result<(), String> {
        let content = Bytes::from(content);
        let id = envelope.id.clone();
        let local = {
            let (spool, envelope, content) = (self.spool.clone(), envelope.clone(), content.clone());
            async move {
                match tokio::task::spawn_blocking(move || spool.store(Area::Queue, &envelope, &content)).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            }
        };
        let copy = async {
            match &self.mirror {
                Some(m) => m.replicate(&envelope, content.clone()).await.map(Some),
                None => Ok(None),
            }
        };
        let (local, copy) = tokio::join!(local, copy);
        match (local, copy) {
            (Ok(()), Ok(_)) => {
                self.counters.accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = self.submit.send(id);
                Ok(())
            }
            (Err(e), copy) => {
                warn!(%id, error = %e, "spool write failed: the message is refused with 451");
                self.counters.refused_unstored.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let (Ok(Some(Copy::Mirrored)), Some(m)) = (copy, &self.mirror) {
                    m.done(&id);
                }
                Err("Error: queue file write error".into())
            }
            (Ok(()), Err(e)) => {
                warn!(%id, error = %e, "no mirror copy (strict mode): the message is refused with 451");
                self.counters.refused_unstored.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let spool = self.spool.clone();
                let gone = id.clone();
                let _ = tokio::task::spawn_blocking(move || spool.remove(Area::Queue, &gone)).await;
                Err("Error: no second copy possible right now, try again later".into())
            }
        }
    }
}

impl Acceptor for Acceptance {
    fn check_rcpt(&self, rcpt: &str, client: &ClientInfo) -> RcptVerdict {
        self.check(rcpt, client)
    }

    fn accept(&self, envelope: Envelope, content: Vec<u8>) -> impl std::future::Future<Output = Result<(), String>> + Send {
        self.store(envelope, content)
    }

    fn authenticate(&self, user: &str, password: &str) -> impl std::future::Future<Output = bool> + Send {
        let (credentials, user, password) = (self.credentials.clone(), user.to_string(), password.to_string());
        async move {
            let Some(c) = credentials else { return false };
            // A crypt check takes milliseconds by design: off the async threads.
            tokio::task::spawn_blocking(move || c.verify(&user, &password)).await.unwrap_or(false)
        }
    }
}

/// The queue as delivery sees it: this node's spool, with every change copied to the mirror.
struct MirroredQueue {
    spool: Arc<Spool>,
    mirror: Option<Arc<MirrorClient>>,
}

fn store_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::new(e.to_string())
}

impl QueueStore for MirroredQueue {
    fn ids(&self) -> Result<Vec<MessageId>, StoreError> {
        self.spool.ids(Area::Queue).map_err(store_error)
    }

    fn envelope(&self, id: &MessageId) -> Result<Envelope, StoreError> {
        self.spool.envelope(Area::Queue, id).map_err(store_error)
    }

    fn load(&self, id: &MessageId) -> Result<(Envelope, Vec<u8>), StoreError> {
        self.spool.load(Area::Queue, id).map_err(store_error)
    }

    fn record(&self, env: &Envelope) -> Result<(), StoreError> {
        if env.is_done() {
            self.spool.remove(Area::Queue, &env.id).map_err(store_error)?;
            if let Some(m) = &self.mirror {
                m.done(&env.id);
            }
        } else {
            self.spool.update(Area::Queue, env).map_err(store_error)?;
            if let Some(m) = &self.mirror {
                m.update(env);
            }
        }
        Ok(())
    }

    /// A bounce we generated: queued here and copied like an accepted message (in strict mode
    /// a missing copy cannot refuse it: nobody is waiting for a reply, so it stays queued here
    /// and the next resync copies it).
    fn enqueue(&self, env: &Envelope, content: &[u8]) -> Result<(), StoreError> {
        self.spool.store(Area::Queue, env, content).map_err(store_error)?;
        if let Some(m) = &self.mirror {
            let (m, env, content) = (m.clone(), env.clone(), Bytes::copy_from_slice(content));
            // Delivery calls this on the blocking pool, where waiting on the runtime is allowed.
            if let Ok(handle) = tokio::runtime::Handle::try_current()
                && let Err(e) = handle.block_on(async move { m.replicate(&env, content).await })
            {
                warn!(error = %e, "a bounce was queued without a mirror copy; the next resync copies it");
            }
        }
        Ok(())
    }
}

/// The relay's back-ends with the prober's verdicts (refreshed every second).
struct ProbedBackends {
    backends: Vec<Backend>,
    healthy: RwLock<HashMap<String, bool>>,
}

impl delivery::Backends for ProbedBackends {
    fn snapshot(&self) -> Vec<BackendState> {
        let healthy = self.healthy.read().unwrap_or_else(|p| p.into_inner());
        self.backends
            .iter()
            .map(|b| BackendState { backend: b.clone(), healthy: healthy.get(&b.name).copied().unwrap_or(true) })
            .collect()
    }
}

/// The running relay: what the control socket's queue commands act on.
pub struct Relay {
    spool: Arc<Spool>,
    mirror: Option<Arc<MirrorClient>>,
    counters: Arc<RelayCounters>,
    policy: Arc<RecipientPolicy>,
    credentials: Option<Arc<Credentials>>,
    /// Set once delivery has started (after the first exchange with the mirror).
    delivery: Arc<Mutex<Option<DeliveryHandle>>>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Relay {
    /// The relay's counters and queue sizes now (reads the spool directories: blocking).
    pub fn snapshot(&self) -> RelaySnapshot {
        use std::sync::atomic::Ordering::Relaxed;
        let count = |area| self.spool.ids(area).map(|ids| ids.len() as u64).unwrap_or(0);
        let mut s = RelaySnapshot {
            accepted: self.counters.accepted.load(Relaxed),
            refused_unstored: self.counters.refused_unstored.load(Relaxed),
            queued: count(Area::Queue),
            replicas: count(Area::Replica),
            ..Default::default()
        };
        if let Some(m) = &self.mirror {
            s.mirror_connected = Some(m.is_connected());
            s.copies_confirmed = m.stats.copies_confirmed.load(Relaxed);
            s.copies_failed = m.stats.copies_failed.load(Relaxed);
            s.accepted_unmirrored = m.stats.accepted_unmirrored.load(Relaxed);
            s.resynced = m.stats.resynced.load(Relaxed);
            s.taken_over = m.stats.taken_over.load(Relaxed);
        }
        s
    }

    /// Every queued message (own queue and the peer's copies).
    pub async fn list(&self) -> Result<Vec<QueueEntry>, String> {
        let spool = self.spool.clone();
        tokio::task::spawn_blocking(move || list_spool(&spool)).await.map_err(|e| e.to_string())?
    }

    pub async fn show(&self, id: &str) -> Result<QueuedMessage, String> {
        let (spool, id) = (self.spool.clone(), id.to_string());
        tokio::task::spawn_blocking(move || show_spool(&spool, &id)).await.map_err(|e| e.to_string())?
    }

    /// Tries a deferred message now.
    pub async fn retry(&self, id: &str) -> Result<String, String> {
        let id = self.own(id).await?;
        match &*self.delivery.lock().await {
            Some(d) => {
                d.retry_now(id.clone());
                Ok(format!("{id}: delivery attempt started"))
            }
            None => Err("delivery has not started yet (waiting for the mirror node)".into()),
        }
    }

    /// Removes a message from the queue here and on the mirror, without delivering it.
    pub async fn delete(&self, id: &str) -> Result<String, String> {
        let id = self.own(id).await?;
        if let Some(d) = &*self.delivery.lock().await {
            d.forget(id.clone());
        }
        let (spool, gone) = (self.spool.clone(), id.clone());
        tokio::task::spawn_blocking(move || spool.remove(Area::Queue, &gone))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if let Some(m) = &self.mirror {
            m.done(&id);
        }
        info!(%id, "deleted from the queue by the operator");
        Ok(format!("{id}: deleted"))
    }

    /// `id` parsed and present in this node's own queue.
    async fn own(&self, id: &str) -> Result<MessageId, String> {
        let id: MessageId = id.parse().map_err(|e: super::BadMessageId| e.to_string())?;
        let (spool, probe) = (self.spool.clone(), id.clone());
        let present = tokio::task::spawn_blocking(move || spool.contains(Area::Queue, &probe)).await.map_err(|e| e.to_string())?;
        if present { Ok(id) } else { Err(format!("no message {id} in this node's queue")) }
    }

    /// Re-reads the valid-mailbox list and the AUTH users (each keeps its old contents if its
    /// file is broken).
    pub fn reload(&self) -> Result<String, String> {
        let mailboxes = self.policy.reload().map(|n| format!("{n} mailboxes")).map_err(|e| e.to_string());
        let users = self.credentials.as_ref().map(|c| c.reload().map(|n| format!("{n} AUTH users")).map_err(|e| e.to_string()));
        match (mailboxes, users) {
            (Ok(m), None) => Ok(m),
            (Ok(m), Some(Ok(u))) => Ok(format!("{m}, {u}")),
            (Err(e), _) | (_, Some(Err(e))) => Err(e),
        }
    }

    /// Waits for every relay task (after the stop signal): sessions finish, delivery stops.
    pub async fn stopped(&self) {
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
        if let Some(d) = self.delivery.lock().await.take() {
            d.stopped().await;
        }
    }

    /// Answers a control-socket request.
    pub async fn handle(&self, action: QueueAction) -> Result<String, String> {
        let json = |v: Result<String, serde_json::Error>| v.map_err(|e| e.to_string());
        match action {
            QueueAction::List => json(serde_json::to_string(&self.list().await?)),
            QueueAction::Show { id } => json(serde_json::to_string(&self.show(&id).await?)),
            QueueAction::Retry { id } => self.retry(&id).await,
            QueueAction::Delete { id } => self.delete(&id).await,
            QueueAction::Reload => self.reload(),
        }
    }
}

fn delivery_settings(
    r: &RelayConfig,
    config: &Config,
    directory: Option<Arc<crate::mailbox::Directory>>,
) -> Result<(delivery::Settings, Vec<Backend>), RelayError> {
    let d = &r.delivery;
    let backends: Vec<Backend> = d
        .backends
        .iter()
        .filter_map(|name| config.backend(name))
        .map(|b| Backend { name: b.name.clone(), address: SocketAddr::new(b.address, d.port()), weight: b.weight })
        .collect();
    let mut s = delivery::Settings::new(&r.hostname);
    s.protocol = match d.protocol {
        DeliveryProtocol::Smtp => delivery::Protocol::Smtp,
        DeliveryProtocol::Lmtp => delivery::Protocol::Lmtp,
    };
    s.xclient = d.xclient;
    s.routing = match d.routing {
        Routing::Shared => delivery::Routing::Shared,
        Routing::Partitioned => delivery::Routing::Partitioned {
            directory: directory
                .ok_or_else(|| RelayError::Setup("partitioned routing needs the mailbox map ([mailbox])".into()))?,
        },
    };
    let step = Duration::from_millis(d.timeout_ms);
    let t = &mut s.timeouts;
    for slot in [&mut t.connect, &mut t.greeting, &mut t.mail, &mut t.rcpt, &mut t.data_start, &mut t.data_block] {
        *slot = (*slot).min(step);
    }
    t.data_end = t.data_end.min(step * 2);
    s.connections_per_backend = d.connections_per_backend as usize;
    s.domain_concurrency = d.per_domain_concurrency as usize;
    s.retry.first = Duration::from_millis(d.retry_first_ms);
    s.retry.max = Duration::from_millis(d.retry_max_ms);
    s.retry.lifetime = Duration::from_secs(d.max_queue_lifetime_s);
    Ok((s, backends))
}

fn session_settings(r: &RelayConfig, tls: Option<Arc<rustls::ServerConfig>>) -> SessionSettings {
    let mut s = SessionSettings::new(&r.hostname, &r.node_name);
    s.smtp.auth = r.auth_users.is_some() && tls.is_some();
    s.smtp.max_message_size = r.max_message_size;
    s.smtp.max_recipients = r.max_recipients as usize;
    s.smtp.max_messages = r.max_messages_per_session;
    s.smtp.starttls = tls.is_some();
    s.max_sessions = r.max_sessions as usize;
    s.max_sessions_per_source = r.max_sessions_per_source as usize;
    // The RFC timeouts bound each read; the deadlines bound a whole command line or message
    // (so a client trickling one byte at a time cannot hold a session).
    s.command_timeout = Duration::from_millis(r.command_timeout_ms);
    s.command_deadline = Duration::from_millis(r.command_timeout_ms);
    s.data_block_timeout = Duration::from_millis(r.data_timeout_ms);
    s.data_deadline = s.data_deadline.max(Duration::from_millis(r.data_timeout_ms));
    s.tls = tls;
    s
}

/// Starts the relay of `config` (if any) inside `mxlb run`: listeners on the relay VIP's ports
/// (bound freely: the VIP arrives with VRRP), the mirror, and delivery once the first exchange
/// with the mirror told us what the peer took over while we were away. `directory` is the
/// mailbox map (`[mailbox]`): partitioned delivery routes by it, and the RCPT check refuses
/// mailboxes that exist on no back-end once the back-ends report their lists.
pub async fn start(
    config: &Config,
    controller: Arc<Mutex<Controller>>,
    directory: Option<Arc<crate::mailbox::Directory>>,
    stop: watch::Receiver<bool>,
) -> Result<Option<Arc<Relay>>, RelayError> {
    let Some(r) = configured(config) else { return Ok(None) };
    let vip = config.vip(&r.vip).ok_or_else(|| RelayError::Setup(format!("no VIP `{}`", r.vip)))?;
    let spool = Arc::new(open_spool(&r.spool_dir)?);
    let trusted = r
        .trusted_networks
        .iter()
        .map(|c| c.parse::<crate::edge::Cidr>().map_err(|e| RelayError::Setup(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let mut policy =
        RecipientPolicy::new(r.domains.clone(), trusted, r.mailboxes.clone()).map_err(|e| RelayError::Setup(e.to_string()))?;
    if let Some(d) = &directory {
        policy = policy.with_directory(d.clone());
    }
    let policy = Arc::new(policy);
    let tls = starttls_config(r)?;
    let credentials = match &r.auth_users {
        Some(path) => Some(Arc::new(Credentials::load(path).map_err(|e| RelayError::Setup(e.to_string()))?)),
        None => None,
    };
    let (events_tx, events_rx) = mpsc::channel(64);
    let mut tasks = Vec::new();
    let settings = mirror_settings(r)?;
    let serving = settings.as_ref().map(|s| s.serving.clone());
    let mirror = match settings {
        Some(settings) => {
            let (client, task) = MirrorClient::start(settings.clone(), spool.clone(), events_tx.clone(), stop.clone());
            tasks.push(task);
            let (spool, stats, stop) = (spool.clone(), client.stats.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = mirror::serve(settings, spool, events_tx, stats, stop).await {
                    warn!(error = %e, "mirror server stopped: this node keeps no copies for its peer");
                }
            }));
            Some(client)
        }
        None => {
            warn!("no [relay.mirror]: accepted messages are on this node's disk only");
            None
        }
    };

    let (submit_tx, mut submit_rx) = mpsc::unbounded_channel::<MessageId>();
    let (forget_tx, mut forget_rx) = mpsc::unbounded_channel::<MessageId>();
    let (dsettings, backends) = delivery_settings(r, config, directory)?;
    let probed = Arc::new(ProbedBackends { backends, healthy: RwLock::new(HashMap::new()) });
    let counters = Arc::new(RelayCounters::default());
    let relay = Arc::new(Relay {
        spool: spool.clone(),
        mirror: mirror.clone(),
        counters: counters.clone(),
        credentials: credentials.clone(),
        policy: policy.clone(),
        delivery: Arc::new(Mutex::new(None)),
        tasks: std::sync::Mutex::new(Vec::new()),
    });

    tasks.push(tokio::spawn(mirror_events(events_rx, submit_tx.clone(), forget_tx)));
    // The prober's verdicts, for routing around down back-ends; and whether this node serves
    // the relay VIP (the mirror takes over only then).
    {
        let (probed, vip_name) = (probed.clone(), r.vip.clone());
        tasks.push(crate::control::follow(controller.clone(), stop.clone(), move |c| {
            let verdicts: HashMap<String, bool> =
                probed.backends.iter().map(|b| (b.name.clone(), c.probed_health(&b.name) == Health::Up)).collect();
            if let Some(s) = &serving {
                s.store(c.vip_active(&vip_name), std::sync::atomic::Ordering::Relaxed);
            }
            *probed.healthy.write().unwrap_or_else(|p| p.into_inner()) = verdicts;
        }));
    }
    // Delivery starts after the first mirror exchange (or `takeover_after` without one), so
    // messages the peer delivered for us while we were down are not delivered again.
    {
        let (relay, mirror, spool, stop) = (relay.clone(), mirror.clone(), spool.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            if let Some(m) = &mirror {
                m.wait_first_sync().await;
            }
            if *stop.borrow() {
                return;
            }
            let store = Arc::new(MirroredQueue { spool, mirror });
            let handle = Delivery::start(dsettings, store, probed, stop.clone());
            info!("relay delivery started");
            *relay.delivery.lock().await = Some(handle);
            let mut stop = stop;
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    Some(id) = submit_rx.recv() => {
                        if let Some(d) = &*relay.delivery.lock().await {
                            d.submit(id);
                        }
                    }
                    Some(id) = forget_rx.recv() => {
                        if let Some(d) = &*relay.delivery.lock().await {
                            d.forget(id);
                        }
                    }
                }
            }
        }));
    }

    let acceptance = Arc::new(Acceptance { spool, mirror, policy, submit: submit_tx, counters, credentials });
    let settings = Arc::new(session_settings(r, tls));
    // Ports the POP3/IMAP proxy takes on a shared VIP are the proxy's.
    let proxied = crate::config::proxy::taken_ports(config, &vip.name);
    for port in vip.ports.iter().filter(|p| !proxied.contains(p)) {
        let addr = SocketAddr::new(vip.address, *port);
        let listener = crate::shed::freebind_listener(addr).map_err(|source| RelayError::Listen { addr, source })?;
        info!(%addr, "relay listening");
        tasks.push(tokio::spawn(session::serve(listener, settings.clone(), acceptance.clone(), stop.clone())));
    }
    *relay.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
    Ok(Some(relay))
}

/// Handles the mirror's events until they stop: drops what the peer took over (it delivers
/// them), queues what we took over.
async fn mirror_events(
    mut events: mpsc::Receiver<MirrorEvent>,
    submit: mpsc::UnboundedSender<MessageId>,
    forget: mpsc::UnboundedSender<MessageId>,
) {
    while let Some(event) = events.recv().await {
        match event {
            MirrorEvent::Synced { taken_over } => {
                // Already gone from the spool (the mirror removed them before reporting).
                for id in taken_over {
                    let _ = forget.send(id);
                }
            }
            MirrorEvent::TookOver { ids } => {
                for id in ids {
                    let _ = submit.send(id);
                }
            }
        }
    }
}
