//! One SMTP client connection on a socket: the I/O around the pure [`SmtpServer`] machine.
//!
//! This is where time and the network enter: timeouts, STARTTLS (rustls), the per-source and
//! total connection limits, shutdown, the Received header, and handing a finished message to an
//! [`Acceptor`], which answers only once the message is stored durably.
//!
//! # Timeouts
//! RFC 5321 §4.5.3.2 timeouts bound each wait for input: `command_timeout` (5 min) while a
//! command is expected, `data_block_timeout` (3 min) while content arrives. They alone do not
//! stop a slowloris client that trickles one byte just inside each timeout, so two deadlines
//! bound whole phases: a complete command line must arrive within `command_deadline` of our
//! previous reply, and the content of a message (from the `354`, or from a `BDAT` command, to
//! its end) within `data_deadline`. On expiry the client gets
//! `421 4.4.2 <hostname> Error: timeout exceeded` and the connection is closed.
//! `data_termination_timeout` (10 min, the time a client waits for the reply to the final
//! `.`) bounds the acceptor: if it has not answered by then the client gets `451` (the accept
//! still runs to its end, so a late success means a duplicate later, never a loss).
use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
    time::{Instant, timeout},
};
use tracing::{debug, info, warn};

use super::{
    ClientInfo, Envelope, MessageId, RcptVerdict, Recipient,
    smtp::{Action, Draft, Phase, SmtpServer, SmtpSettings},
    unix_now,
};

/// Where finished messages go, and who decides about recipients.
pub trait Acceptor: Send + Sync + 'static {
    /// The answer to one `RCPT TO` (the address without brackets, or `postmaster`).
    fn check_rcpt(&self, rcpt: &str, client: &ClientInfo) -> RcptVerdict;
    /// Stores the message durably (and mirrors it); `Ok` means it may be acknowledged with
    /// `250`. `content` starts with our Received header. `Err(text)` becomes `451 4.3.0 text`.
    /// The future runs in its own task to its end, even if the client is gone or the session's
    /// `data_termination_timeout` answered the client first.
    fn accept(&self, envelope: Envelope, content: Vec<u8>) -> impl Future<Output = Result<(), String>> + Send;
}

/// Everything a session needs to know; shared by all sessions of one listener.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Protocol limits; `hostname` is also the greeting's and the Received header's name.
    /// `starttls` is set from `tls` by the session.
    pub smtp: SmtpSettings,
    /// This node's name, recorded as `Envelope::accepted_by`.
    pub node_name: String,
    /// Longest wait for any input while a command is expected (RFC 5321: 5 min).
    pub command_timeout: Duration,
    /// Longest time from our reply to the end of the next command line (slowloris bound).
    pub command_deadline: Duration,
    /// Longest wait for any input while content arrives (RFC 5321 "data block": 3 min).
    pub data_block_timeout: Duration,
    /// Longest time for a whole message content (slowloris bound).
    pub data_deadline: Duration,
    /// Longest wait for the acceptor after the end of a message (RFC 5321: 10 min).
    pub data_termination_timeout: Duration,
    /// Sessions at once on this listener.
    pub max_sessions: usize,
    /// Sessions at once from one IP address.
    pub max_sessions_per_source: usize,
    /// STARTTLS is offered when set. A client certificate the config's verifier accepts marks
    /// the client authenticated (it may relay and pipeline freely).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// After stop, how long sessions may take to finish before they are cut off.
    pub shutdown_grace: Duration,
}

impl SessionSettings {
    /// RFC 5321 timeouts; deadlines of 5 min per command and 30 min per message content
    /// (the default size limit then needs about 6 KB/s).
    pub fn new(hostname: impl Into<String>, node_name: impl Into<String>) -> SessionSettings {
        SessionSettings {
            smtp: SmtpSettings::new(hostname),
            node_name: node_name.into(),
            command_timeout: Duration::from_secs(300),
            command_deadline: Duration::from_secs(300),
            data_block_timeout: Duration::from_secs(180),
            data_deadline: Duration::from_secs(1800),
            data_termination_timeout: Duration::from_secs(600),
            max_sessions: 500,
            max_sessions_per_source: 50,
            tls: None,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Why a session ended early; only logged (the client is gone or was told).
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("timeout")]
    Timeout,
    #[error("client closed the connection")]
    ClientGone,
    #[error("TLS handshake failed: {0}")]
    Handshake(io::Error),
}

/// How big one read is; also what the machine may hold while a message is being queued.
const READ_BUFFER: usize = 16 * 1024;

/// Sessions at once, in total and per source address.
#[derive(Debug, Default)]
struct Load {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// Gives a session's slot back when the session ends, however it ends (also on abort).
struct Slot {
    load: Arc<Mutex<Load>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut load = self.load.lock().unwrap_or_else(|e| e.into_inner());
        load.total = load.total.saturating_sub(1);
        if let Some(n) = load.per_source.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                load.per_source.remove(&self.ip);
            }
        }
    }
}

/// Resolves once `stop` is true, or once its sender is gone (nobody could stop us any more).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Accepts SMTP clients on `listener` until `stop` becomes true, then lets the sessions finish
/// (idle ones are told `421 4.3.2`; a message in progress completes) for at most
/// `shutdown_grace`, and returns.
pub async fn serve<A: Acceptor>(
    listener: TcpListener,
    settings: Arc<SessionSettings>,
    acceptor: Arc<A>,
    mut stop: watch::Receiver<bool>,
) {
    let load = Arc::new(Mutex::new(Load::default()));
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = stopped(&mut stop) => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let ip = peer.ip().to_canonical();
                    let refusal = {
                        let mut l = load.lock().unwrap_or_else(|e| e.into_inner());
                        let from_source = l.per_source.get(&ip).copied().unwrap_or(0);
                        if l.total >= settings.max_sessions {
                            Some(format!("421 4.3.2 {} Error: too many sessions, try again later\r\n", settings.smtp.hostname))
                        } else if from_source >= settings.max_sessions_per_source {
                            Some("421 4.7.0 Too many connections from your address\r\n".to_string())
                        } else {
                            l.total += 1;
                            l.per_source.insert(ip, from_source + 1);
                            None
                        }
                    };
                    if let Some(text) = refusal {
                        debug!(%peer, "SMTP connection refused: {}", text.trim_end());
                        // A fresh socket's send buffer takes this at once; never block the loop.
                        let _ = stream.try_write(text.as_bytes());
                        continue;
                    }
                    let slot = Slot { load: load.clone(), ip };
                    let (settings, acceptor, stop) = (settings.clone(), acceptor.clone(), stop.clone());
                    sessions.spawn(async move {
                        let _slot = slot;
                        session(stream, peer, settings, acceptor, stop).await;
                    });
                }
                Err(e) => {
                    // Typically out of file descriptors: do not spin.
                    warn!("SMTP accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    let drain = async { while sessions.join_next().await.is_some() {} };
    if timeout(settings.shutdown_grace, drain).await.is_err() {
        info!(left = sessions.len(), "SMTP sessions cut off at shutdown");
        sessions.shutdown().await;
    }
}

/// The socket before and after STARTTLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Conn {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf).await,
            Conn::Tls(s) => s.read(buf).await,
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        async fn write<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) -> io::Result<()> {
            s.write_all(bytes).await?;
            s.flush().await
        }
        match self {
            Conn::Plain(s) => write(s, bytes).await,
            Conn::Tls(s) => write(s.as_mut(), bytes).await,
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            Conn::Plain(s) => s.shutdown().await,
            Conn::Tls(s) => s.shutdown().await,
        };
    }
}

/// One connection from greeting to close; errors are only logged.
async fn session<A: Acceptor>(
    stream: TcpStream,
    peer: SocketAddr,
    settings: Arc<SessionSettings>,
    acceptor: Arc<A>,
    stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    match dialogue(Conn::Plain(stream), peer, &settings, &acceptor, stop).await {
        Ok(()) => debug!(%peer, "SMTP session ended"),
        Err(e) => debug!(%peer, "SMTP session ended: {e}"),
    }
}

async fn dialogue<A: Acceptor>(
    mut conn: Conn,
    peer: SocketAddr,
    settings: &SessionSettings,
    acceptor: &Arc<A>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let mut smtp_settings = settings.smtp.clone();
    smtp_settings.starttls = settings.tls.is_some();
    let mut server = SmtpServer::new(smtp_settings, false);
    let mut client = ClientInfo { addr: peer, helo: String::new(), tls: false, authenticated: false };
    let host = &settings.smtp.hostname;

    let mut out = server.greeting();
    let mut actions: VecDeque<Action> = VecDeque::new();
    let mut buf = vec![0u8; READ_BUFFER];
    let mut phase = Phase::Command;
    let mut deadline = Instant::now() + settings.command_deadline;
    loop {
        while let Some(action) = actions.pop_front() {
            match action {
                Action::Reply(bytes) => out.extend_from_slice(&bytes),
                Action::Close => {
                    send(&mut conn, &mut out, settings).await?;
                    conn.shutdown().await;
                    return Ok(());
                }
                Action::StartTls => {
                    send(&mut conn, &mut out, settings).await?;
                    let Some(config) = settings.tls.clone() else {
                        return Ok(());
                    };
                    conn = match conn {
                        Conn::Plain(tcp) => {
                            let handshake = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
                            let tls = timeout(settings.command_timeout, handshake)
                                .await
                                .map_err(|_| SessionError::Timeout)?
                                .map_err(SessionError::Handshake)?;
                            Conn::Tls(Box::new(tls))
                        }
                        tls @ Conn::Tls(_) => tls,
                    };
                    let authenticated = match &conn {
                        Conn::Tls(s) => s.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty()),
                        Conn::Plain(_) => false,
                    };
                    server.tls_established(authenticated);
                    client = ClientInfo { addr: peer, helo: String::new(), tls: true, authenticated };
                }
                Action::Message(draft) => {
                    let result = queue(draft, &client, settings, acceptor).await;
                    client.helo = server.helo().unwrap_or_default().to_string();
                    let more = server
                        .message_result(result.as_ref().map_err(String::as_str), &|r| acceptor.check_rcpt(r, &client));
                    actions.extend(more);
                }
            }
        }
        let replied = !out.is_empty();
        send(&mut conn, &mut out, settings).await?;

        let now_phase = server.phase();
        if now_phase != phase || (replied && now_phase == Phase::Command) {
            let span = if now_phase == Phase::Content { settings.data_deadline } else { settings.command_deadline };
            deadline = Instant::now() + span;
            phase = now_phase;
        }
        let idle = if phase == Phase::Content { settings.data_block_timeout } else { settings.command_timeout };
        let wait = idle.min(deadline.saturating_duration_since(Instant::now()));
        tokio::select! {
            biased;
            () = stopped(&mut stop), if phase == Phase::Command => {
                out.extend_from_slice(format!("421 4.3.2 {host} Service shutting down\r\n").as_bytes());
                send(&mut conn, &mut out, settings).await?;
                conn.shutdown().await;
                return Ok(());
            }
            read = timeout(wait, conn.read(&mut buf)) => match read {
                Err(_) => {
                    out.extend_from_slice(format!("421 4.4.2 {host} Error: timeout exceeded\r\n").as_bytes());
                    send(&mut conn, &mut out, settings).await?;
                    conn.shutdown().await;
                    return Err(SessionError::Timeout);
                }
                Ok(Ok(0)) => return Err(SessionError::ClientGone),
                Ok(Ok(n)) => {
                    client.helo = server.helo().unwrap_or_default().to_string();
                    let input = buf.get(..n).unwrap_or_default();
                    actions.extend(server.feed(input, &|r| acceptor.check_rcpt(r, &client)));
                }
                Ok(Err(e)) => return Err(e.into()),
            },
        }
    }
}

/// Writes and empties `out`, bounded by the command timeout (a client that does not read
/// must not hold the session).
async fn send(conn: &mut Conn, out: &mut Vec<u8>, settings: &SessionSettings) -> Result<(), SessionError> {
    if out.is_empty() {
        return Ok(());
    }
    timeout(settings.command_timeout, conn.write_all(out)).await.map_err(|_| SessionError::Timeout)??;
    out.clear();
    Ok(())
}

/// Builds the envelope and Received header and runs the acceptor in its own task (so neither
/// a timeout nor a cut-off session stops an acknowledgement half-way).
async fn queue<A: Acceptor>(
    draft: Draft,
    client: &ClientInfo,
    settings: &SessionSettings,
    acceptor: &Arc<A>,
) -> Result<MessageId, String> {
    let id = MessageId::generate();
    let client = ClientInfo { helo: draft.helo.clone(), ..client.clone() };
    let date = chrono::Utc::now().to_rfc2822();
    let mut content = received_header(&draft, &client, &settings.smtp.hostname, &id, &date).into_bytes();
    content.extend_from_slice(&draft.content);
    let envelope = Envelope {
        id: id.clone(),
        mail_from: draft.mail_from,
        rcpts: draft.rcpts.into_iter().map(Recipient::new).collect(),
        accepted_at: unix_now(),
        accepted_by: settings.node_name.clone(),
        client,
        eight_bit: draft.eight_bit,
        smtputf8: draft.smtputf8,
        size: content.len() as u64,
    };
    let acceptor = acceptor.clone();
    let task = tokio::spawn(async move { acceptor.accept(envelope, content).await });
    match timeout(settings.data_termination_timeout, task).await {
        Ok(Ok(Ok(()))) => Ok(id),
        Ok(Ok(Err(text))) => {
            warn!(%id, "message not queued: {text}");
            Err(text)
        }
        Ok(Err(e)) => {
            warn!(%id, "message acceptor failed: {e}");
            Err("Error: internal error while queueing".to_string())
        }
        Err(_) => {
            warn!(%id, "message acceptor did not answer in time");
            Err("Error: timeout while queueing, try again later".to_string())
        }
    }
}

/// Our trace field (RFC 5321 §4.4), protocol name per RFC 3848 (`A`: a verified client
/// certificate); the `for` clause only for a single recipient, so a message to many does not
/// tell each recipient about the others.
fn received_header(draft: &Draft, client: &ClientInfo, hostname: &str, id: &MessageId, date: &str) -> String {
    let protocol = match (draft.esmtp, client.tls, client.authenticated) {
        (false, _, _) => "SMTP",
        (true, false, false) => "ESMTP",
        (true, false, true) => "ESMTPA",
        (true, true, false) => "ESMTPS",
        (true, true, true) => "ESMTPSA",
    };
    let ip = match client.addr.ip().to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("IPv6:{v6}"),
    };
    let mut header = format!("Received: from {} ([{ip}])\r\n\tby {hostname} (mxlb) with {protocol} id {id}", draft.helo);
    if let [only] = draft.rcpts.as_slice() {
        header.push_str(&format!("\r\n\tfor <{only}>"));
    }
    header.push_str(&format!("; {date}\r\n"));
    header
}
