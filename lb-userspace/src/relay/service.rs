//! The relay inside `mxlb run`: the SMTP listeners on the relay VIP, the spool, the mirror
//! and delivery, started together and stopped by the one shutdown signal; and the queue
//! commands (`mxlb queue ...`) the control socket serves.
//!
//! The order of an acceptance is the relay's promise: the message is written to this node's
//! spool and, at the same time, sent to the mirror; only when both are durable does the
//! client hear `250`. Then it is handed to delivery, which removes it from both nodes when
//! every recipient is delivered or bounced.
use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::{
    ClientInfo, Envelope, MessageId, RcptVerdict,
    mirror::{self, Copy, MirrorClient, MirrorEvent, MirrorSettings, MirrorStats},
    recipients::RecipientPolicy,
    spool::{Area, Spool},
};
use crate::config::{Config, relay::RelayConfig};

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
    let setup = |e: String| RelayError::Setup(e);
    let chain = crate::tls::load_chain(cert).map_err(|e| setup(e.to_string()))?;
    let key_der = crate::tls::load_key(key).map_err(|e| setup(e.to_string()))?;
    let provider = crate::tls::provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| setup(e.to_string()))?;
    let builder = match &r.tls_client_ca {
        Some(ca) => {
            let roots = Arc::new(crate::tls::load_roots(ca).map_err(|e| setup(e.to_string()))?);
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| setup(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(chain, key_der).map_err(|e| setup(format!("{}: {e}", key.display())))?;
    Ok(Some(Arc::new(config)))
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
                let _ = self.submit.send(id);
                Ok(())
            }
            (Err(e), copy) => {
                warn!(%id, error = %e, "spool write failed: the message is refused with 451");
                if let (Ok(Some(Copy::Mirrored)), Some(m)) = (copy, &self.mirror) {
                    m.done(&id);
                }
                Err("Error: queue file write error".into())
            }
            (Ok(()), Err(e)) => {
                warn!(%id, error = %e, "no mirror copy (strict mode): the message is refused with 451");
                let spool = self.spool.clone();
                let gone = id.clone();
                let _ = tokio::task::spawn_blocking(move || spool.remove(Area::Queue, &gone)).await;
                Err("Error: no second copy possible right now, try again later".into())
            }
        }
    }
}

/// Counters of the relay for metrics and status.
pub fn mirror_stats(mirror: &Option<Arc<MirrorClient>>) -> Option<Arc<MirrorStats>> {
    mirror.as_ref().map(|m| m.stats.clone())
}

/// Handles the mirror's events until `events` closes: drops what the peer took over, queues
/// what we took over.
async fn mirror_events(
    mut events: mpsc::Receiver<MirrorEvent>,
    spool: Arc<Spool>,
    submit: mpsc::UnboundedSender<MessageId>,
    forget: mpsc::UnboundedSender<MessageId>,
) {
    while let Some(event) = events.recv().await {
        match event {
            MirrorEvent::Synced { taken_over } => {
                for id in taken_over {
                    info!(%id, "the peer delivered this message while we were away: dropped here");
                    let _ = forget.send(id.clone());
                    let spool = spool.clone();
                    let _ = tokio::task::spawn_blocking(move || spool.remove(Area::Queue, &id)).await;
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

#[allow(dead_code)]
fn _unused(_: watch::Receiver<bool>) {}
