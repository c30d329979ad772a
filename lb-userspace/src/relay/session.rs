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

/// The wait before answering a failed AUTH, like Postfix's `smtpd_error_sleep_time`.
const AUTH_FAILURE_DELAY: Duration = Duration::from_millis(500);

/// Where finished messages go, and who decides about recipients.
pub trait Acceptor: Send + Sync + 'static {
    /// The answer to one `RCPT TO` (the address without brackets, or `postmaster`).
    fn check_rcpt(&self, rcpt: &str, client: &ClientInfo) -> RcptVerdict;
    /// Stores the message durably (and mirrors it); `Ok` means it may be acknowledged with
    /// `250`. `content` starts with our Received header. `Err(text)` becomes `451 4.3.0 text`.
    /// The future runs in its own task to its end, even if the client is gone or the session's
    /// `data_termination_timeout` answered the client first.
    fn accept(&self, envelope: Envelope, content: Vec<u8>) -> impl Future<Output = Result<(), String>> + Send;
    /// Checks SMTP AUTH credentials (offered only when `SmtpSettings::auth` is set).
    fn authenticate(&self, _user: &str, _password: &str) -> impl Future<Output = bool> + Send {
        std::future::ready(false)
    }
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
                Action::Authenticate { user, password } => {
                    let ok = acceptor.authenticate(&user, &password).await;
                    if ok {
                        client.authenticated = true;
                    } else {
                        // Slows password guessing (the error limit ends the session).
                        tokio::time::sleep(AUTH_FAILURE_DELAY).await;
                    }
                    let more = server.auth_result(ok, &|r| acceptor.check_rcpt(r, &client));
                    actions.extend(more);
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
    let date = super::rfc5322_date(unix_now());
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
    let mut header =
        format!("Received: from {} ([{ip}])\r\n\tby {hostname} (mxlb) with {protocol} id {id}", draft.helo);
    if let [only] = draft.rcpts.as_slice() {
        header.push_str(&format!("\r\n\tfor <{only}>"));
    }
    header.push_str(&format!("; {date}\r\n"));
    header
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::{
        io::{AsyncBufReadExt, AsyncRead, BufReader},
        sync::Semaphore,
        task::JoinHandle,
    };

    use super::*;

    /// Records what it is given; `gate` (if set) holds each accept until the test opens it.
    #[derive(Default)]
    struct Recorder {
        messages: StdMutex<Vec<(Envelope, Vec<u8>)>>,
        gate: Option<Arc<Semaphore>>,
        entered: tokio::sync::Notify,
    }

    impl Acceptor for Recorder {
        fn check_rcpt(&self, rcpt: &str, _client: &ClientInfo) -> RcptVerdict {
            if rcpt.ends_with("@example.net") { RcptVerdict::Accept } else { RcptVerdict::RelayDenied }
        }

        async fn accept(&self, envelope: Envelope, content: Vec<u8>) -> Result<(), String> {
            self.entered.notify_one();
            if let Some(gate) = &self.gate {
                let _permit = gate.acquire().await.map_err(|e| e.to_string())?;
            }
            self.messages.lock().unwrap().push((envelope, content));
            Ok(())
        }
    }

    impl Recorder {
        fn taken(&self) -> Vec<(Envelope, Vec<u8>)> {
            self.messages.lock().unwrap().clone()
        }
    }

    struct Server {
        addr: SocketAddr,
        acceptor: Arc<Recorder>,
        stop: watch::Sender<bool>,
        task: JoinHandle<()>,
    }

    impl Server {
        /// Stops and waits for `serve` to return.
        async fn stop(self) -> Arc<Recorder> {
            self.stop.send_replace(true);
            self.task.await.unwrap();
            self.acceptor
        }
    }

    fn settings() -> SessionSettings {
        let mut s = SessionSettings::new("mx.test", "node-a");
        s.shutdown_grace = Duration::from_secs(5);
        s
    }

    async fn start(settings: SessionSettings, acceptor: Recorder) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = Arc::new(acceptor);
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, Arc::new(settings), acceptor.clone(), rx));
        Server { addr, acceptor, stop, task }
    }

    /// A line-oriented SMTP client over any stream.
    struct Client<S> {
        io: BufReader<S>,
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
        /// One whole reply (all lines of a multi-line one); "" at end of stream.
        async fn reply(&mut self) -> String {
            let mut all = String::new();
            loop {
                let mut line = String::new();
                match self.io.read_line(&mut line).await {
                    Ok(0) | Err(_) => return all,
                    Ok(_) => {}
                }
                all.push_str(&line);
                if line.as_bytes().get(3) != Some(&b'-') {
                    return all;
                }
            }
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.io.get_mut().write_all(bytes).await.unwrap();
        }

        async fn cmd(&mut self, line: &str) -> String {
            self.send(line.as_bytes()).await;
            self.reply().await
        }

        /// The server closed the connection.
        async fn closed(&mut self) -> bool {
            let mut rest = Vec::new();
            matches!(self.io.read_to_end(&mut rest).await, Ok(0) | Err(_)) && rest.is_empty()
        }
    }

    async fn connect(addr: SocketAddr) -> Client<TcpStream> {
        Client { io: BufReader::new(TcpStream::connect(addr).await.unwrap()) }
    }

    /// Bounds every test: a hang is a failure, not a stuck CI run.
    async fn within<F: Future>(f: F) -> F::Output {
        timeout(Duration::from_secs(30), f).await.expect("test took too long")
    }

    #[tokio::test]
    async fn a_full_session_queues_the_message_with_our_received_header() {
        within(async {
            let server = start(settings(), Recorder::default()).await;
            let mut c = connect(server.addr).await;
            assert_eq!(c.reply().await, "220 mx.test ESMTP mxlb\r\n");
            let ehlo = c.cmd("EHLO client.test\r\n").await;
            assert!(ehlo.starts_with("250-mx.test\r\n") && !ehlo.contains("STARTTLS"), "{ehlo}");
            assert_eq!(c.cmd("MAIL FROM:<a@example.org> BODY=8BITMIME\r\n").await, "250 2.1.0 Ok\r\n");
            assert_eq!(
                c.cmd("RCPT TO:<x@elsewhere.test>\r\n").await,
                "554 5.7.1 <x@elsewhere.test>: Relay access denied\r\n"
            );
            assert_eq!(c.cmd("RCPT TO:<b@example.net>\r\n").await, "250 2.1.5 Ok\r\n");
            assert!(c.cmd("DATA\r\n").await.starts_with("354 "));
            let reply = c.cmd("Subject: hi\r\n\r\n..body\r\n.\r\n").await;
            let id = reply.strip_prefix("250 2.0.0 Ok: queued as ").unwrap().trim_end().to_string();
            assert_eq!(c.cmd("QUIT\r\n").await, "221 2.0.0 Bye\r\n");
            assert!(c.closed().await);

            let got = server.stop().await.taken();
            assert_eq!(got.len(), 1);
            let (env, content) = &got[0];
            assert_eq!(env.id.as_str(), id);
            assert_eq!(env.mail_from, "a@example.org");
            assert_eq!(env.rcpts, vec![Recipient::new("b@example.net".into())]);
            assert_eq!(env.accepted_by, "node-a");
            assert!(env.eight_bit && !env.smtputf8);
            assert_eq!(env.client.addr.ip(), IpAddr::from([127, 0, 0, 1]));
            assert_eq!(env.client.helo, "client.test");
            assert!(!env.client.tls && !env.client.authenticated);
            assert_eq!(env.size, content.len() as u64);
            let text = String::from_utf8(content.clone()).unwrap();
            let head = format!(
                "Received: from client.test ([127.0.0.1])\r\n\tby mx.test (mxlb) with ESMTP id {id}\r\n\tfor <b@example.net>; "
            );
            assert!(text.starts_with(&head), "{text}");
            assert!(text.ends_with(" +0000\r\nSubject: hi\r\n\r\n.body\r\n"), "{text}");
        })
        .await;
    }

    #[test]
    fn received_header_for_several_recipients_and_protocols() {
        let draft = |esmtp, rcpts: &[&str]| Draft {
            helo: "h.test".into(),
            esmtp,
            mail_from: String::new(),
            rcpts: rcpts.iter().map(|r| r.to_string()).collect(),
            eight_bit: false,
            smtputf8: false,
            content: Vec::new(),
        };
        let id: MessageId = "0123456789abcdef01234567".parse().unwrap();
        let mut client = ClientInfo {
            addr: "[2001:db8::1]:25".parse().unwrap(),
            helo: String::new(),
            tls: true,
            authenticated: true,
        };
        let d = "Mon, 1 Jan 2024 00:00:00 +0000";
        assert_eq!(
            received_header(&draft(true, &["a@x", "b@x"]), &client, "mx", &id, d),
            format!("Received: from h.test ([IPv6:2001:db8::1])\r\n\tby mx (mxlb) with ESMTPSA id {id}; {d}\r\n")
        );
        client.authenticated = false;
        assert!(received_header(&draft(true, &["a@x"]), &client, "mx", &id, d).contains(" with ESMTPS id "));
        client.tls = false;
        assert!(received_header(&draft(false, &["a@x"]), &client, "mx", &id, d).contains(" with SMTP id "));
    }

    #[tokio::test]
    async fn a_client_vanishing_mid_data_queues_nothing() {
        within(async {
            let server = start(settings(), Recorder::default()).await;
            let mut c = connect(server.addr).await;
            c.reply().await;
            c.cmd("EHLO client.test\r\n").await;
            c.cmd("MAIL FROM:<a@example.org>\r\n").await;
            c.cmd("RCPT TO:<b@example.net>\r\n").await;
            assert!(c.cmd("DATA\r\n").await.starts_with("354 "));
            c.send(b"Subject: half\r\n\r\nonly half of it\r\n").await;
            drop(c);
            assert!(server.stop().await.taken().is_empty());
        })
        .await;
    }

    /// Writes one byte at a time until the server stops reading (bounded).
    fn trickle(mut w: tokio::net::tcp::OwnedWriteHalf) -> JoinHandle<()> {
        tokio::spawn(async move {
            for _ in 0..400 {
                if w.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    }

    #[tokio::test]
    async fn a_slowloris_command_line_is_cut_off() {
        within(async {
            let mut s = settings();
            s.command_deadline = Duration::from_millis(300);
            let server = start(s, Recorder::default()).await;
            let (r, w) = TcpStream::connect(server.addr).await.unwrap().into_split();
            let mut c = Client { io: BufReader::new(tokio::io::join(r, tokio::io::sink())) };
            assert!(c.reply().await.starts_with("220 "));
            let writer = trickle(w);
            // Each byte comes well within command_timeout (300 s); the line deadline ends it.
            assert_eq!(c.reply().await, "421 4.4.2 mx.test Error: timeout exceeded\r\n");
            assert!(c.closed().await);
            writer.abort();
            server.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_slowloris_message_is_cut_off_and_not_queued() {
        within(async {
            let mut s = settings();
            s.data_deadline = Duration::from_millis(300);
            let server = start(s, Recorder::default()).await;
            let (r, w) = TcpStream::connect(server.addr).await.unwrap().into_split();
            let mut c = Client { io: BufReader::new(tokio::io::join(r, w)) };
            c.reply().await;
            c.cmd("EHLO client.test\r\n").await;
            c.cmd("MAIL FROM:<a@example.org>\r\n").await;
            c.cmd("RCPT TO:<b@example.net>\r\n").await;
            assert!(c.cmd("DATA\r\n").await.starts_with("354 "));
            let (r, w) = c.io.into_inner().into_inner();
            let mut c = Client { io: BufReader::new(tokio::io::join(r, tokio::io::sink())) };
            let writer = trickle(w);
            assert_eq!(c.reply().await, "421 4.4.2 mx.test Error: timeout exceeded\r\n");
            assert!(c.closed().await);
            writer.abort();
            assert!(server.stop().await.taken().is_empty());
        })
        .await;
    }

    #[tokio::test]
    async fn connections_per_source_are_limited() {
        within(async {
            let mut s = settings();
            s.max_sessions_per_source = 2;
            let server = start(s, Recorder::default()).await;
            let mut first = connect(server.addr).await;
            let mut second = connect(server.addr).await;
            assert!(first.reply().await.starts_with("220 "));
            assert!(second.reply().await.starts_with("220 "));
            let mut third = connect(server.addr).await;
            assert_eq!(third.reply().await, "421 4.7.0 Too many connections from your address\r\n");
            assert!(third.closed().await);
            // A slot comes back when a session ends.
            assert_eq!(first.cmd("QUIT\r\n").await, "221 2.0.0 Bye\r\n");
            assert!(first.closed().await);
            let mut greeted = false;
            for _ in 0..100 {
                let mut again = connect(server.addr).await;
                if again.reply().await.starts_with("220 ") {
                    greeted = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(greeted, "the slot of the ended session was not given back");
            drop(second);
            server.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn total_sessions_are_limited() {
        within(async {
            let mut s = settings();
            s.max_sessions = 1;
            let server = start(s, Recorder::default()).await;
            let mut first = connect(server.addr).await;
            assert!(first.reply().await.starts_with("220 "));
            let mut second = connect(server.addr).await;
            assert_eq!(second.reply().await, "421 4.3.2 mx.test Error: too many sessions, try again later\r\n");
            assert!(second.closed().await);
            drop(first);
            server.stop().await;
        })
        .await;
    }

    /// A CA, a server certificate for mx.test and a client certificate, all signed by the CA.
    struct Pki {
        server: Arc<rustls::ServerConfig>,
        roots: rustls::RootCertStore,
        client_chain: Vec<CertificateDer<'static>>,
        client_key: PrivateKeyDer<'static>,
    }

    fn pki() -> Pki {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |name: &str, usage| {
            let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert.der().clone(), PrivateKeyDer::from(PrivatePkcs8KeyDer::from(key.serialize_der())))
        };
        let (server_cert, server_key) = leaf("mx.test", ExtendedKeyUsagePurpose::ServerAuth);
        let (client_cert, client_key) = leaf("client.test", ExtendedKeyUsagePurpose::ClientAuth);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots.clone()), provider.clone())
                .allow_unauthenticated()
                .build()
                .unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![server_cert], server_key)
            .unwrap();
        Pki { server: Arc::new(server), roots, client_chain: vec![client_cert], client_key }
    }

    /// STARTTLS, then a message; returns what the acceptor got.
    async fn tls_session(with_client_cert: bool) -> (Envelope, String) {
        let pki = pki();
        let mut s = settings();
        s.tls = Some(pki.server.clone());
        let server = start(s, Recorder::default()).await;
        let mut c = connect(server.addr).await;
        c.reply().await;
        assert!(c.cmd("EHLO client.test\r\n").await.contains("250-STARTTLS\r\n"));
        assert_eq!(c.cmd("STARTTLS\r\n").await, "220 2.0.0 Ready to start TLS\r\n");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(pki.roots.clone());
        let config = if with_client_cert {
            builder.with_client_auth_cert(pki.client_chain.clone(), pki.client_key.clone_key()).unwrap()
        } else {
            builder.with_no_client_auth()
        };
        let tcp = c.io.into_inner();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("mx.test").unwrap(), tcp)
            .await
            .unwrap();
        let mut c = Client { io: BufReader::new(tls) };
        // The session starts over: EHLO again, no STARTTLS offered now.
        assert_eq!(c.cmd("MAIL FROM:<a@example.org>\r\n").await, "503 5.5.1 Error: send HELO/EHLO first\r\n");
        assert!(!c.cmd("EHLO client.test\r\n").await.contains("STARTTLS"));
        c.cmd("MAIL FROM:<a@example.org>\r\n").await;
        c.cmd("RCPT TO:<b@example.net>\r\n").await;
        c.cmd("DATA\r\n").await;
        assert!(c.cmd("x\r\n.\r\n").await.starts_with("250 2.0.0 Ok: queued as "));
        assert_eq!(c.cmd("QUIT\r\n").await, "221 2.0.0 Bye\r\n");
        let mut got = server.stop().await.taken();
        assert_eq!(got.len(), 1);
        let (env, content) = got.remove(0);
        (env, String::from_utf8(content).unwrap())
    }

    #[tokio::test]
    async fn starttls_without_a_client_certificate() {
        within(async {
            let (env, content) = tls_session(false).await;
            assert!(env.client.tls);
            assert!(!env.client.authenticated);
            assert!(content.contains(" with ESMTPS id "), "{content}");
        })
        .await;
    }

    #[tokio::test]
    async fn starttls_with_a_client_certificate_authenticates() {
        within(async {
            let (env, content) = tls_session(true).await;
            assert!(env.client.tls);
            assert!(env.client.authenticated);
            assert!(content.contains(" with ESMTPSA id "), "{content}");
        })
        .await;
    }

    #[tokio::test]
    async fn stop_tells_idle_sessions_and_lets_a_message_finish() {
        within(async {
            let gate = Arc::new(Semaphore::new(0));
            let server = start(settings(), Recorder { gate: Some(gate.clone()), ..Recorder::default() }).await;
            let mut idle = connect(server.addr).await;
            idle.reply().await;
            let mut busy = connect(server.addr).await;
            busy.reply().await;
            busy.cmd("EHLO client.test\r\n").await;
            busy.cmd("MAIL FROM:<a@example.org>\r\n").await;
            busy.cmd("RCPT TO:<b@example.net>\r\n").await;
            busy.cmd("DATA\r\n").await;
            busy.send(b"x\r\n.\r\n").await;
            server.acceptor.entered.notified().await;

            server.stop.send_replace(true);
            assert_eq!(idle.reply().await, "421 4.3.2 mx.test Service shutting down\r\n");
            assert!(idle.closed().await);
            // The message being queued is answered before the session is told to go.
            gate.add_permits(1);
            assert!(busy.reply().await.starts_with("250 2.0.0 Ok: queued as "));
            assert_eq!(busy.reply().await, "421 4.3.2 mx.test Service shutting down\r\n");
            assert!(busy.closed().await);
            server.task.await.unwrap();
            assert_eq!(server.acceptor.taken().len(), 1);
        })
        .await;
    }
}
