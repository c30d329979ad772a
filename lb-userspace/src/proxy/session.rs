//! One client connection: the session limits, implicit TLS or STARTTLS, the pre-login
//! dialogue under the login timeout, the login through [`Proxy::login`], then
//! [`relay_logged_in`] until the end. Every wait is bounded; no error is fatal to the proxy.
use std::{collections::VecDeque, sync::Arc, sync::atomic::Ordering};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
    time::Instant,
};
use tracing::{debug, warn};

use super::{
    ClientStream, LoginResult, Proxy, RelayPath, Service, stopping,
    backend::{ClientAddrs, Protocol},
    imap::{self, Imap},
    login::Action,
    pop3::{self, Pop3},
    relay_logged_in,
};

/// Accepts connections on `listener` until `stop`; each runs as its own task.
pub(super) async fn accept_loop(proxy: Arc<Proxy>, listener: TcpListener, service: Service, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stopping(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let proxy = proxy.clone();
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        let local = match stream.local_addr() {
                            Ok(a) => a,
                            Err(_) => return,
                        };
                        serve(proxy, stream, ClientAddrs { peer, local }, service, stop).await;
                    });
                }
                Err(e) => {
                    // Out of descriptors and the like: wait a little instead of spinning.
                    warn!(error = %e, "proxy accept");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// The pre-login dialogue of either protocol.
enum Dialogue {
    Pop3(Pop3),
    Imap(Imap),
}

impl Dialogue {
    fn feed(&mut self, data: &[u8]) -> Vec<Action> {
        match self {
            Dialogue::Pop3(d) => d.feed(data),
            Dialogue::Imap(d) => d.feed(data),
        }
    }
    fn resume(&mut self) -> Vec<Action> {
        match self {
            Dialogue::Pop3(d) => d.resume(),
            Dialogue::Imap(d) => d.resume(),
        }
    }
    fn tls_started(&mut self) -> Vec<Action> {
        match self {
            Dialogue::Pop3(d) => d.tls_started(),
            Dialogue::Imap(d) => d.tls_started(),
        }
    }
    fn take_leftover(&mut self) -> Vec<u8> {
        match self {
            Dialogue::Pop3(d) => d.take_leftover(),
            Dialogue::Imap(d) => d.take_leftover(),
        }
    }
}

/// One connection, start to end.
pub(super) async fn serve(proxy: Arc<Proxy>, stream: TcpStream, client: ClientAddrs, service: Service, mut stop: watch::Receiver<bool>) {
    proxy.counters.sessions.fetch_add(1, Ordering::Relaxed);
    let _ = stream.set_nodelay(true);
    let settings = proxy.settings().clone();
    let deadline = Instant::now() + settings.login_timeout;
    let Some(_slot) = proxy.admit(client.peer.ip()) else {
        proxy.counters.sessions_refused.fetch_add(1, Ordering::Relaxed);
        if !service.implicit_tls {
            let mut stream = stream;
            let msg = match service.protocol {
                Protocol::Pop3 => pop3::TOO_MANY,
                Protocol::Imap => imap::TOO_MANY,
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), stream.write_all(msg)).await;
        }
        return;
    };
    let mut stream = if service.implicit_tls {
        let Some(tls) = proxy.tls.clone() else { return };
        match tokio::time::timeout_at(deadline, tokio_rustls::TlsAcceptor::from(tls).accept(stream)).await {
            Ok(Ok(s)) => ClientStream::Tls(Box::new(s)),
            Ok(Err(e)) => {
                debug!(client = %client.peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => return,
        }
    } else {
        ClientStream::Plain(stream)
    };
    let tls_available = proxy.tls.is_some() && !service.implicit_tls;
    let secure = service.implicit_tls;
    let (mut dialogue, greeting) = match service.protocol {
        Protocol::Pop3 => (Dialogue::Pop3(Pop3::new(tls_available, settings.allow_plaintext_login, secure)), Pop3::greeting(&settings.greeting)),
        Protocol::Imap => {
            let d = Imap::new(tls_available, settings.allow_plaintext_login, secure);
            let g = d.greeting(&settings.greeting);
            (Dialogue::Imap(d), g)
        }
    };
    if write(&mut stream, &greeting, deadline).await.is_err() {
        return;
    }
    let mut pending: VecDeque<Action> = VecDeque::new();
    let mut chunk = vec![0u8; 4096];
    loop {
        while let Some(action) = pending.pop_front() {
            match action {
                Action::Send(bytes) => {
                    if write(&mut stream, &bytes, deadline).await.is_err() {
                        return;
                    }
                }
                Action::Close => {
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), stream.shutdown()).await;
                    return;
                }
                Action::StartTls => {
                    let (ClientStream::Plain(tcp), Some(tls)) = (stream, proxy.tls.clone()) else { return };
                    stream = match tokio::time::timeout_at(deadline, tokio_rustls::TlsAcceptor::from(tls).accept(tcp)).await {
                        Ok(Ok(s)) => ClientStream::Tls(Box::new(s)),
                        _ => return,
                    };
                    pending.extend(dialogue.tls_started());
                }
                Action::Login(req) => match proxy.login(&req, service.protocol, client, spliced_mss(&stream, &proxy)).await {
                    LoginResult::Answer { reply, delay } => {
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        if write(&mut stream, &reply, deadline).await.is_err() {
                            return;
                        }
                        pending.extend(dialogue.resume());
                    }
                    LoginResult::LoggedIn { backend, reply, leftover, owner } => {
                        // The owner's own success reply goes out from the relaying (with no
                        // deadline: the client is in), once the splice is in place.
                        let client_leftover = dialogue.take_leftover();
                        let user = crate::mailbox::normalize(&req.credentials.user);
                        let _registration = proxy.register(&user);
                        let end = proxy.end_signal(user, owner, stop.clone());
                        let (path, _) = relay_logged_in(stream, backend, reply, client_leftover, leftover, proxy.splicer(), end).await;
                        match path {
                            RelayPath::Copy => proxy.counters.relayed_copy.fetch_add(1, Ordering::Relaxed),
                            RelayPath::Sockmap => proxy.counters.relayed_sockmap.fetch_add(1, Ordering::Relaxed),
                        };
                        return;
                    }
                },
            }
        }
        let read = tokio::select! {
            r = tokio::time::timeout_at(deadline, stream.read(&mut chunk)) => r,
            _ = stopping(&mut stop) => return,
        };
        match read {
            Err(_) => {
                let msg = match service.protocol {
                    Protocol::Pop3 => pop3::TIMEOUT,
                    Protocol::Imap => imap::TIMEOUT,
                };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                    let _ = stream.write_all(msg).await;
                    let _ = stream.shutdown().await;
                })
                .await;
                return;
            }
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => pending.extend(dialogue.feed(&chunk[..n])),
        }
    }
}

/// For a session the kernel will splice (plaintext client, sockmap relaying), the client
/// connection's MSS, which the back-end connection then asks for
/// ([`super::backend::splice_segment_size`]).
fn spliced_mss(stream: &ClientStream, proxy: &Proxy) -> Option<u32> {
    match (stream, proxy.splicer()) {
        (ClientStream::Plain(tcp), Some(_)) => super::backend::splice_segment_size(tcp),
        _ => None,
    }
}

/// Writes to the client, bounded by the login deadline (a client that does not read cannot
/// hold a session forever).
async fn write(stream: &mut ClientStream, bytes: &[u8], deadline: Instant) -> Result<(), ()> {
    match tokio::time::timeout_at(deadline, async {
        stream.write_all(bytes).await?;
        stream.flush().await
    })
    .await
    {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}
