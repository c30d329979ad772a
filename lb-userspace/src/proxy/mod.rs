//! The POP3/IMAP proxy with mailbox affinity, inside `mxlb run` on a `local` VIP: each login
//! goes to the back-end that holds the user's mailbox (the [`crate::mailbox`] map), so a
//! cluster without shared storage looks like one server, as Dovecot's director and proxy,
//! nginx mail or perdition do.
//!
//! # Layout
//! - [`login`]: credentials, SASL decoding, the actions the dialogues ask for.
//! - [`pop3`], [`imap`]: the pre-login dialogues as pure state machines (Dovecot's
//!   capabilities and wording, STARTTLS/STLS, every login method, bounded input).
//! - [`limiter`]: failed logins per source (slowed, then blocked).
//! - [`backend`]: connect to the owner, pass the client's address (PROXY v2 or IMAP ID),
//!   replay the login, return the back-end's own answer.
//! - [`session`]: one client connection: TLS, the dialogue, the login, then
//!   [`relay_logged_in`].
//!
//! # A session
//! The client talks to the proxy until it has logged in; then the proxy replays that login to
//! the owner (with the client's tag, so the tagged answer fits unchanged), forwards the
//! owner's success reply and from then on only moves bytes, untouched, both ways. Failures
//! are worded as Dovecot words them: a wrong password gets the owner's own refusal, an
//! unknown user the same words after the same delay (no enumeration), an owner that is down
//! `-ERR [SYS/TEMP]` / `NO [UNAVAILABLE]`.
//!
//! # Ending sessions when a mailbox moves
//! A logged-in session of a user whose mailbox moves ([`Directory::moves`]) or who is ended
//! with [`Proxy::end_user`] is closed by shutting down both connections. Nothing is sent to
//! the client first: a `* BYE` can only be sent between responses, and the proxy does not
//! parse the stream after login, so writing one could land in the middle of a FETCH
//! literal. Clients treat the closed connection as a dropped one and reconnect, to the new
//! owner.
pub mod backend;
pub mod imap;
pub mod limiter;
pub mod login;
pub mod pop3;
pub mod session;

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{broadcast, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

use crate::{
    config::{
        Config,
        proxy::{PassClient, ProxyConfig, Relaying},
    },
    mailbox::{Directory, Located, normalize, valid_name},
};
use backend::{ClientAddrs, Outcome, Protocol};
use limiter::{Limiter, Limits, Verdict};
use login::LoginRequest;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("proxy: {0}")]
    Setup(String),
    #[error("proxy listener {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("proxy TLS: {0}")]
    Tls(String),
}

/// One listening service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Service {
    pub protocol: Protocol,
    /// TLS from the first byte (993/995).
    pub implicit_tls: bool,
}

/// The settings sessions run with (from `[proxy]`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub backend_pop3_port: u16,
    pub backend_imap_port: u16,
    pub pass_client: PassClient,
    pub relaying: Relaying,
    pub allow_plaintext_login: bool,
    pub login_timeout: Duration,
    pub connect_timeout: Duration,
    pub backend_timeout: Duration,
    pub auth_failure_delay: Duration,
    pub max_sessions: u32,
    pub max_sessions_per_source: u32,
    pub limits: Limits,
    pub greeting: String,
}

impl Settings {
    pub fn from_config(x: &ProxyConfig) -> Settings {
        Settings {
            backend_pop3_port: x.backend_pop3_port,
            backend_imap_port: x.backend_imap_port,
            pass_client: x.pass_client,
            relaying: x.relaying,
            allow_plaintext_login: x.allow_plaintext_login,
            login_timeout: Duration::from_millis(x.login_timeout_ms),
            connect_timeout: Duration::from_millis(x.connect_timeout_ms),
            backend_timeout: Duration::from_millis(x.backend_timeout_ms),
            auth_failure_delay: Duration::from_millis(x.auth_failure_delay_ms),
            max_sessions: x.max_sessions,
            max_sessions_per_source: x.max_sessions_per_source,
            limits: Limits {
                slow_after: x.slow_after,
                block_after: x.block_after,
                block_for: Duration::from_secs(x.block_for_s),
                window: Duration::from_secs(x.failure_window_s),
                slow_delay: Duration::from_millis(x.slow_delay_ms),
                slow_delay_max: Duration::from_millis(x.slow_delay_max_ms),
                ..Limits::default()
            },
            greeting: x.greeting.clone(),
        }
    }
}

/// What the proxy counts for `/metrics` and `mxlb status`.
#[derive(Debug, Default)]
pub struct Counters {
    pub sessions: AtomicU64,
    /// Refused at connect: too many sessions in all or from the source.
    pub sessions_refused: AtomicU64,
    pub logins_ok: AtomicU64,
    /// Wrong password or unknown user.
    pub logins_failed: AtomicU64,
    /// Answered "try later" because the source is blocked.
    pub logins_blocked: AtomicU64,
    /// Failure answers delayed by the limiter.
    pub logins_slowed: AtomicU64,
    /// Answered "try later" because the owner was down or unreachable.
    pub logins_unavailable: AtomicU64,
    pub relayed_copy: AtomicU64,
    pub relayed_sockmap: AtomicU64,
    /// Sessions ended because their mailbox moved (or `end_user`).
    pub ended_by_move: AtomicU64,
}

/// The proxy's figures at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub sessions: u64,
    pub sessions_refused: u64,
    pub active: u64,
    pub logins_ok: u64,
    pub logins_failed: u64,
    pub logins_blocked: u64,
    pub logins_slowed: u64,
    pub logins_unavailable: u64,
    pub relayed_copy: u64,
    pub relayed_sockmap: u64,
    pub ended_by_move: u64,
}

/// How a login attempt ends, for the session.
#[derive(Debug)]
pub enum LoginResult {
    LoggedIn { backend: TcpStream, reply: Vec<u8>, leftover: Vec<u8>, owner: String },
    /// Answer the client with `reply` after `delay`; the dialogue goes on.
    Answer { reply: Vec<u8>, delay: Duration },
}

/// The running proxy.
pub struct Proxy {
    settings: Settings,
    directory: Arc<Directory>,
    tls: Option<Arc<rustls::ServerConfig>>,
    limiter: Mutex<Limiter>,
    pub counters: Counters,
    /// Open sessions by source address.
    per_source: Mutex<HashMap<IpAddr, u32>>,
    active: AtomicU64,
    /// Logged-in sessions by normalised user (for [`Proxy::end_user`]).
    logged_in: Mutex<HashMap<String, usize>>,
    ends: broadcast::Sender<String>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The kernel splice for logged-in plaintext sessions (`relaying = "sockmap"` and the
    /// program loaded); `None`: every session is copied in userspace.
    splicer: Option<Arc<crate::sockmap::Splicer>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("settings", &self.settings).finish_non_exhaustive()
    }
}

/// A session slot; released on drop.
pub struct Slot {
    proxy: Arc<Proxy>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.proxy.active.fetch_sub(1, Ordering::Relaxed);
        let mut m = lock(&self.proxy.per_source);
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// A logged-in session's registration; removed on drop.
pub struct Registration {
    proxy: Arc<Proxy>,
    user: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut m = lock(&self.proxy.logged_in);
        if let Some(n) = m.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.user);
            }
        }
    }
}

/// Resolves once the shutdown signal is given (the watch guard is not held across awaits).
pub(crate) async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Proxy {
    pub fn new(settings: Settings, directory: Arc<Directory>, tls: Option<Arc<rustls::ServerConfig>>) -> Arc<Proxy> {
        let (ends, _) = broadcast::channel(64);
        Arc::new(Proxy {
            limiter: Mutex::new(Limiter::new(settings.limits.clone())),
            settings,
            directory,
            tls,
            counters: Counters::default(),
            per_source: Mutex::new(HashMap::new()),
            active: AtomicU64::new(0),
            logged_in: Mutex::new(HashMap::new()),
            ends,
            tasks: Mutex::new(Vec::new()),
            splicer: None,
        })
    }

    /// Uses `splicer` for logged-in plaintext sessions (before the proxy serves).
    pub fn with_splicer(mut self: Arc<Self>, splicer: Arc<crate::sockmap::Splicer>) -> Arc<Proxy> {
        if let Some(p) = Arc::get_mut(&mut self) {
            p.splicer = Some(splicer);
        }
        self
    }

    pub fn splicer(&self) -> Option<&crate::sockmap::Splicer> {
        self.splicer.as_deref()
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Serves `listener` until `stop` (spawned; awaited by [`Proxy::stopped`]).
    pub fn serve(self: &Arc<Self>, listener: TcpListener, service: Service, stop: watch::Receiver<bool>) {
        let task = tokio::spawn(session::accept_loop(self.clone(), listener, service, stop));
        lock(&self.tasks).push(task);
    }

    /// Waits until the listeners stopped (after the shutdown signal).
    pub async fn stopped(&self) {
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Takes a session slot for a client from `ip`, unless a limit is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut m = lock(&self.per_source);
        if self.active.load(Ordering::Relaxed) >= u64::from(self.settings.max_sessions) {
            return None;
        }
        let n = m.entry(ip).or_insert(0);
        if *n >= self.settings.max_sessions_per_source {
            return None;
        }
        *n += 1;
        self.active.fetch_add(1, Ordering::Relaxed);
        Some(Slot { proxy: self.clone(), ip })
    }

    /// Ends every logged-in session of `user` (as a mailbox move does); how many there were.
    pub fn end_user(&self, user: &str) -> usize {
        let key = normalize(user);
        let n = lock(&self.logged_in).get(&key).copied().unwrap_or(0);
        let _ = self.ends.send(key);
        n
    }

    /// Logged-in sessions of `user` now.
    pub fn sessions_of(&self, user: &str) -> usize {
        lock(&self.logged_in).get(&normalize(user)).copied().unwrap_or(0)
    }

    fn register(self: &Arc<Self>, user: &str) -> Registration {
        let key = normalize(user);
        *lock(&self.logged_in).entry(key.clone()).or_insert(0) += 1;
        Registration { proxy: self.clone(), user: key }
    }

    /// Resolves when `user`'s session must end: its mailbox moved, `end_user`, or shutdown.
    async fn end_signal(&self, user: String, owner: String, mut stop: watch::Receiver<bool>) {
        let mut moves = self.directory.moves();
        let mut ends = self.ends.subscribe();
        loop {
            tokio::select! {
                m = moves.recv() => match m {
                    Ok(u) if u == user => break,
                    Ok(_) => {}
                    // Missed some moves: ours may be among them if the owner changed.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if !matches!(self.directory.locate(&user), Located::Owner(o) if o.backend == owner) {
                            break;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                },
                e = ends.recv() => match e {
                    Ok(u) if u == user => break,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                },
                _ = stopping(&mut stop) => return,
            }
        }
        self.counters.ended_by_move.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes a login to the owner of the mailbox, through the limiter.
    /// `max_segment`: the MSS to ask of the owner ([`backend::Dial::max_segment`]).
    pub async fn login(&self, req: &LoginRequest, protocol: Protocol, client: ClientAddrs, max_segment: Option<u32>) -> LoginResult {
        let ip = client.peer.ip();
        let temp = |req: &LoginRequest| match protocol {
            Protocol::Pop3 => pop3::TEMP_FAILURE.to_vec(),
            Protocol::Imap => imap::temp_failure(req.tag.as_deref().unwrap_or("*")),
        };
        if lock(&self.limiter).check(ip, Instant::now()) == Verdict::Blocked {
            self.counters.logins_blocked.fetch_add(1, Ordering::Relaxed);
            return LoginResult::Answer { reply: temp(req), delay: Duration::ZERO };
        }
        let user = &req.credentials.user;
        let located = match valid_name(&normalize(user)) {
            true => self.directory.locate(user),
            false => Located::NoSuchUser,
        };
        let owner = match located {
            Located::NoSuchUser => {
                // The back-ends' own failure, after their delay: indistinguishable.
                let reply = match protocol {
                    Protocol::Pop3 => pop3::AUTH_FAILED.to_vec(),
                    Protocol::Imap => imap::auth_failed(req.tag.as_deref().unwrap_or("*")),
                };
                let delay = self.settings.auth_failure_delay + self.failure(ip);
                return LoginResult::Answer { reply, delay };
            }
            Located::Owner(o) if !o.healthy => {
                self.counters.logins_unavailable.fetch_add(1, Ordering::Relaxed);
                info!(user = %user, backend = %o.backend, "owner is down: try later");
                return LoginResult::Answer { reply: temp(req), delay: Duration::ZERO };
            }
            Located::Owner(o) => o,
        };
        let port = match protocol {
            Protocol::Pop3 => self.settings.backend_pop3_port,
            Protocol::Imap => self.settings.backend_imap_port,
        };
        let s = &self.settings;
        let dial = backend::Dial { addr: SocketAddr::new(owner.address, port), timeout: s.connect_timeout, max_segment };
        match backend::login(dial, protocol, s.pass_client, client, req, s.backend_timeout).await {
            Outcome::LoggedIn { stream, reply, leftover } => {
                self.counters.logins_ok.fetch_add(1, Ordering::Relaxed);
                info!(user = %user, backend = %owner.backend, client = %client.peer, "logged in");
                LoginResult::LoggedIn { backend: stream, reply, leftover, owner: owner.backend }
            }
            Outcome::Refused { reply, auth_failure: true } => {
                let delay = self.failure(ip);
                LoginResult::Answer { reply, delay }
            }
            Outcome::Refused { reply, auth_failure: false } => LoginResult::Answer { reply, delay: Duration::ZERO },
            Outcome::Unavailable(reason) => {
                self.counters.logins_unavailable.fetch_add(1, Ordering::Relaxed);
                warn!(user = %user, backend = %owner.backend, %reason, "owner unavailable: try later");
                LoginResult::Answer { reply: temp(req), delay: Duration::ZERO }
            }
        }
    }

    /// Counts a failed login from `ip`; the extra delay of its answer.
    fn failure(&self, ip: IpAddr) -> Duration {
        self.counters.logins_failed.fetch_add(1, Ordering::Relaxed);
        let answer = lock(&self.limiter).failure(ip, Instant::now());
        if answer.now_blocked {
            warn!(source = %limiter::source_key(ip), "too many failed logins: source blocked");
        }
        if !answer.delay.is_zero() {
            self.counters.logins_slowed.fetch_add(1, Ordering::Relaxed);
        }
        answer.delay
    }

    pub fn snapshot(&self) -> Snapshot {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            sessions: g(&c.sessions),
            sessions_refused: g(&c.sessions_refused),
            active: g(&self.active),
            logins_ok: g(&c.logins_ok),
            logins_failed: g(&c.logins_failed),
            logins_blocked: g(&c.logins_blocked),
            logins_slowed: g(&c.logins_slowed),
            logins_unavailable: g(&c.logins_unavailable),
            relayed_copy: g(&c.relayed_copy),
            relayed_sockmap: g(&c.relayed_sockmap),
            ended_by_move: g(&c.ended_by_move),
        }
    }
}

/// The client's connection: plain TCP (possibly to be upgraded) or TLS.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Which path carried a logged-in session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayPath {
    Copy,
    Sockmap,
}

/// How a relayed session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides finished (or one failed).
    Closed,
    /// `end` fired (mailbox moved, `end_user`, shutdown): both connections were dropped.
    Ended,
}

/// After a successful login: writes the owner's success `reply` to the client, then moves
/// bytes between client and back-end, untouched, until both sides are done or `end` resolves.
///
/// This is the one hand-over point to the kernel splice: with a `splicer` (`relaying =
/// "sockmap"`), a plaintext client (no TLS to terminate) and nothing buffered on either side
/// (`client_leftover` is what the client pipelined after its login, `backend_leftover` what
/// the back-end sent after its success line), both raw `TcpStream`s go to the sockmap and the
/// bytes flow in the kernel. The reply is written only once the sockets are in the map, so
/// the client's next command cannot arrive before the relay is in place. The splice refuses
/// sockets with unread bytes: those sessions, TLS sessions and sessions with buffered bytes
/// are copied in userspace.
pub async fn relay_logged_in(
    client: ClientStream,
    backend: TcpStream,
    reply: Vec<u8>,
    client_leftover: Vec<u8>,
    backend_leftover: Vec<u8>,
    splicer: Option<&crate::sockmap::Splicer>,
    end: impl std::future::Future<Output = ()>,
) -> (RelayPath, RelayEnd) {
    tokio::pin!(end);
    let (client, backend, reply) = match (splicer, client) {
        (Some(splicer), ClientStream::Plain(c)) if client_leftover.is_empty() && backend_leftover.is_empty() => {
            let options = crate::sockmap::SpliceOptions { reply_to_client: reply.clone(), ..Default::default() };
            tokio::select! {
                spliced = splicer.splice(c, backend, options) => match spliced {
                    Ok(_) => return (RelayPath::Sockmap, RelayEnd::Closed),
                    Err(e) => {
                        let what = e.to_string();
                        match e.into_streams() {
                            // Refused before anything was written: copy, reply first.
                            Some((c, b)) => (ClientStream::Plain(c), b, reply),
                            None => {
                                warn!(error = %what, "kernel splice failed; session closed");
                                return (RelayPath::Sockmap, RelayEnd::Closed);
                            }
                        }
                    }
                },
                // Dropping the splice removes the sockets from the map and closes them.
                _ = &mut end => return (RelayPath::Sockmap, RelayEnd::Ended),
            }
        }
        (_, client) => (client, backend, reply),
    };
    let ended = copy_both(client, backend, reply, client_leftover, backend_leftover, end).await;
    (RelayPath::Copy, ended)
}

async fn copy_both(
    mut client: ClientStream,
    mut backend: TcpStream,
    reply: Vec<u8>,
    client_leftover: Vec<u8>,
    backend_leftover: Vec<u8>,
    end: impl std::future::Future<Output = ()>,
) -> RelayEnd {
    let work = async {
        client.write_all(&reply).await?;
        if !client_leftover.is_empty() {
            backend.write_all(&client_leftover).await?;
        }
        if !backend_leftover.is_empty() {
            client.write_all(&backend_leftover).await?;
        }
        // Half-closes are passed on: each direction ends with a shutdown of the other side.
        tokio::io::copy_bidirectional(&mut client, &mut backend).await.map(|_| ())
    };
    tokio::select! {
        _ = work => RelayEnd::Closed,
        _ = end => RelayEnd::Ended,
    }
    // Both connections are dropped (closed) here.
}

/// The TLS config for 993/995 and STARTTLS, from `tls_cert`/`tls_key`.
pub fn tls_config(x: &ProxyConfig) -> Result<Option<Arc<rustls::ServerConfig>>, ProxyError> {
    let (Some(cert), Some(key)) = (&x.tls_cert, &x.tls_key) else { return Ok(None) };
    crate::tls::server_config(cert, key, crate::tls::ClientCerts::Ignored).map(Some).map_err(|e| ProxyError::Tls(e.to_string()))
}

/// Starts the proxy of `[proxy]` (if any): listeners on the VIP's proxied ports, until `stop`.
/// Must run inside the tokio runtime.
pub fn start(config: &Config, directory: Arc<Directory>, stop: watch::Receiver<bool>) -> Result<Option<Arc<Proxy>>, ProxyError> {
    let Some(x) = &config.proxy else { return Ok(None) };
    let tls = tls_config(x)?;
    let mut proxy = Proxy::new(Settings::from_config(x), directory, tls);
    if x.relaying == Relaying::Sockmap {
        match crate::sockmap::Splicer::load() {
            Ok(s) => proxy = proxy.with_splicer(Arc::new(s)),
            Err(e) => warn!(error = %e, "the kernel splice cannot be loaded; logged-in sessions are copied in userspace"),
        }
    }
    for name in x.vip.names() {
        let vip = config.vip(name).ok_or_else(|| ProxyError::Setup(format!("no VIP `{name}`")))?;
        let ports = x.ports(vip);
        let services = [
            (&ports.pop3, Service { protocol: Protocol::Pop3, implicit_tls: false }),
            (&ports.imap, Service { protocol: Protocol::Imap, implicit_tls: false }),
            (&ports.pop3s, Service { protocol: Protocol::Pop3, implicit_tls: true }),
            (&ports.imaps, Service { protocol: Protocol::Imap, implicit_tls: true }),
        ];
        for (list, service) in services {
            for port in list {
                let addr = SocketAddr::new(vip.address, *port);
                let listener = crate::shed::freebind_listener(addr).map_err(|source| ProxyError::Listen { addr, source })?;
                info!(%addr, ?service, "proxy listening");
                proxy.serve(listener, service, stop.clone());
            }
        }
    }
    Ok(Some(proxy))
}

#[cfg(test)]
mod tests;
