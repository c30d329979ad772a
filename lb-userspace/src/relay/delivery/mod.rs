//! Delivery: queued messages to the cluster's back-end mail servers over SMTP or LMTP.
//!
//! - [`client`]: the client dialogue as a pure state machine (replies in, commands out, one
//!   outcome per recipient), with [`reply`] its reply parser. Hand-written because no client
//!   crate gives what a relay in front of a cluster needs: lettre has no LMTP per-recipient
//!   replies, no control over pipelining and no XCLIENT.
//! - [`conn`]: the TCP edge and a small pool of reusable sessions per back-end.
//! - [`route`]: which back-end gets a recipient (`shared` or `partitioned` with owner mapping).
//! - [`policy`]: outcomes to recipient states, exponential backoff, expiry.
//! - [`dsn`]: the RFC 3464 bounce to the sender.
//! - [`scheduler`]: per-destination-domain queues with their own concurrency, so one slow or
//!   dead domain cannot hold up others; persistence of every attempt through [`QueueStore`].
//!
//! Delivery does not touch the spool or the health checks directly: it sees them through the
//! [`QueueStore`] and [`Backends`] traits, which the relay service implements with the spool
//! plus mirror and with the prober's state.
use std::{sync::Arc, time::Duration};

use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::relay::{Envelope, MessageId};

pub mod client;
pub mod conn;
pub mod dsn;
pub mod policy;
pub mod reply;
pub mod route;
mod scheduler;

pub use client::{Protocol, Timeouts};
pub use policy::RetryPolicy;
pub use route::{Backend, BackendState, Routing};

/// A queue store failure, as the implementation describes it.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct StoreError(pub Box<dyn std::error::Error + Send + Sync>);

impl StoreError {
    pub fn new(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StoreError {
        StoreError(e.into())
    }
}

/// What delivery needs from the queue. Blocking calls (delivery runs them on the blocking
/// pool); every one must be durable when it returns.
pub trait QueueStore: Send + Sync + 'static {
    /// Every message in this node's own queue, at start.
    fn ids(&self) -> Result<Vec<MessageId>, StoreError>;
    /// One envelope (a newly submitted message, or at start).
    fn envelope(&self, id: &MessageId) -> Result<Envelope, StoreError>;
    /// Envelope and content for an attempt or for quoting headers in a bounce.
    fn load(&self, id: &MessageId) -> Result<(Envelope, Vec<u8>), StoreError>;
    /// Persists the recipient states of `env` after an attempt. When [`Envelope::is_done`],
    /// the implementation removes the message and tells the mirror it is gone.
    fn record(&self, env: &Envelope) -> Result<(), StoreError>;
    /// Queues a new message (a bounce) made by delivery; it is then delivered like any other.
    fn enqueue(&self, env: &Envelope, content: &[u8]) -> Result<(), StoreError>;
}

/// The back-ends as health checking sees them now.
pub trait Backends: Send + Sync + 'static {
    /// Every configured back-end with its configured weight, healthy or not (partitioned
    /// routing needs the down ones too, so ownership does not move when one fails).
    fn snapshot(&self) -> Vec<BackendState>;
}

/// How delivery behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Our name in EHLO/LHLO and in DSNs (`Reporting-MTA`).
    pub helo_name: String,
    pub protocol: Protocol,
    /// Pass the original client to back-ends that offer XCLIENT.
    pub xclient: bool,
    pub routing: Routing,
    pub timeouts: Timeouts,
    /// Sessions open at once to one back-end.
    pub connections_per_backend: usize,
    /// Messages over one session before it is closed.
    pub messages_per_connection: u32,
    /// Idle sessions are closed after this.
    pub idle_timeout: Duration,
    /// Deliveries in progress at once for one recipient domain.
    pub domain_concurrency: usize,
    pub retry: RetryPolicy,
    /// After the stop signal, how long transactions in progress may still finish; then they
    /// are abandoned and their recipients stay as they were (delivered again later, never
    /// recorded as delivered or bounced without a reply saying so).
    pub stop_grace: Duration,
}

impl Settings {
    /// Defaults for everything but our name.
    pub fn new(helo_name: &str) -> Settings {
        Settings {
            helo_name: helo_name.to_string(),
            protocol: Protocol::Smtp,
            xclient: false,
            routing: Routing::Shared,
            timeouts: Timeouts::default(),
            connections_per_backend: 10,
            messages_per_connection: 100,
            idle_timeout: Duration::from_secs(30),
            domain_concurrency: 10,
            retry: RetryPolicy::default(),
            stop_grace: Duration::from_secs(10),
        }
    }
}

enum Command {
    Submit(MessageId),
    RetryNow(MessageId),
    Forget(MessageId),
}

/// The delivery service.
pub struct Delivery;

impl Delivery {
    /// Starts delivering: loads the store's queue, then takes messages from the handle.
    /// Stops when `stop` becomes true (see [`Settings::stop_grace`]).
    pub fn start(
        settings: Settings,
        store: Arc<dyn QueueStore>,
        backends: Arc<dyn Backends>,
        stop: watch::Receiver<bool>,
    ) -> DeliveryHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(scheduler::run(settings, store, backends, rx, stop));
        DeliveryHandle { tx, task }
    }
}

/// Talks to the running delivery service.
pub struct DeliveryHandle {
    tx: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
}

impl DeliveryHandle {
    /// A message was just accepted and stored: deliver it.
    pub fn submit(&self, id: MessageId) {
        let _ = self.tx.send(Command::Submit(id));
    }

    /// Try the pending recipients of `id` now, regardless of backoff (operator's flush).
    pub fn retry_now(&self, id: MessageId) {
        let _ = self.tx.send(Command::RetryNow(id));
    }

    /// The operator deleted `id`: drop it from the schedule (an attempt in progress finishes
    /// but its result is not recorded).
    pub fn forget(&self, id: MessageId) {
        let _ = self.tx.send(Command::Forget(id));
    }

    /// Waits until delivery has stopped (after the stop signal) and recorded what finished.
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests;
