//! The proxy with real sockets on loopback: a real [`Directory`] (with a table file, so
//! `move_mailbox` works) and fake POP3 back-ends that read the PROXY v2 header and say who
//! they are. The lab tests (`tests/tests/proxy_e2e.rs`) do the same against Dovecot.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use super::*;
use crate::mailbox::{Directory, MailboxBackend};

/// A POP3 back-end named `name` on `ip:port`: password `pw` for every user; after login,
/// `WHO` answers `+OK name client=<address from the PROXY header>`.
async fn fake_pop3(ip: &str, port: u16, name: &'static str) -> u16 {
    let listener = TcpListener::bind((ip, port).to_socket_addrs_one()).await.expect("bind fake back-end");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = [0u8; 16];
                if s.read_exact(&mut head).await.is_err() {
                    return;
                }
                let len = u16::from_be_bytes([head[14], head[15]]) as usize;
                let mut rest = vec![0u8; len];
                let _ = s.read_exact(&mut rest).await;
                let mut all = head.to_vec();
                all.extend_from_slice(&rest);
                let client = match ppp::v2::Header::try_from(all.as_slice()).map(|h| h.addresses) {
                    Ok(ppp::v2::Addresses::IPv4(a)) => a.source_address.to_string(),
                    other => format!("{other:?}"),
                };
                let (r, mut w) = s.into_split();
                let mut lines = BufReader::new(r).lines();
                let _ = w.write_all(format!("+OK {name} ready.\r\n").as_bytes()).await;
                while let Ok(Some(l)) = lines.next_line().await {
                    let reply = if l.starts_with("USER ") {
                        "+OK\r\n".to_string()
                    } else if l == "PASS pw" {
                        "+OK Logged in.\r\n".to_string()
                    } else if l.starts_with("PASS ") {
                        "-ERR [AUTH] Authentication failed.\r\n".to_string()
                    } else if l == "WHO" {
                        format!("+OK {name} client={client}\r\n")
                    } else {
                        "-ERR Unknown command.\r\n".to_string()
                    };
                    if w.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

trait OneAddr {
    fn to_socket_addrs_one(&self) -> SocketAddr;
}
impl OneAddr for (&str, u16) {
    fn to_socket_addrs_one(&self) -> SocketAddr {
        SocketAddr::new(self.0.parse().expect("ip"), self.1)
    }
}

struct Setup {
    proxy: Arc<Proxy>,
    directory: Arc<Directory>,
    addr: SocketAddr,
    _stop: watch::Sender<bool>,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Back-ends b1 (127.0.0.1) and b2 (127.0.0.2) hold alice and bob; b3 (127.0.0.3) has
/// nothing listening (down). `learned`: every back-end reported its list (so unknown users
/// are known to be unknown).
async fn setup(tweak: impl FnOnce(&mut Settings)) -> Setup {
    let port = fake_pop3("127.0.0.1", 0, "b1").await;
    fake_pop3("127.0.0.2", port, "b2").await;
    let dir = std::env::temp_dir().join(format!("mxlb-proxy-test-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let table = dir.join("mailboxes");
    std::fs::write(&table, "alice b1\nbob b2\ncarol b3\n").expect("table");
    let agent = Some("127.0.0.9:1".parse().expect("addr"));
    let backends = ["b1", "b2", "b3"]
        .iter()
        .enumerate()
        .map(|(i, n)| MailboxBackend { name: n.to_string(), address: format!("127.0.0.{}", i + 1).parse().expect("ip"), weight: 100, agent })
        .collect();
    let directory = Arc::new(Directory::new(backends, Some(table)).expect("directory"));
    directory.set_reported("b1", vec!["alice".to_string()]);
    directory.set_reported("b2", vec!["bob".to_string()]);
    directory.set_reported("b3", vec!["carol".to_string()]);
    let mut settings = Settings::from_config(&crate::config::proxy::ProxyConfig {
        vip: "x".into(),
        pop3: None,
        imap: None,
        pop3s: None,
        imaps: None,
        backend_pop3_port: port,
        backend_imap_port: port,
        tls_cert: None,
        tls_key: None,
        pass_client: PassClient::ProxyV2,
        relaying: Relaying::Sockmap,
        allow_plaintext_login: true,
        login_timeout_ms: 10_000,
        connect_timeout_ms: 2_000,
        backend_timeout_ms: 5_000,
        auth_failure_delay_ms: 0,
        max_sessions: 100,
        max_sessions_per_source: 100,
        slow_after: 3,
        block_after: 10,
        block_for_s: 300,
        failure_window_s: 600,
        slow_delay_ms: 1,
        slow_delay_max_ms: 5,
        greeting: "Mail ready.".into(),
    });
    tweak(&mut settings);
    let proxy = Proxy::new(settings, directory.clone(), None);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("addr");
    let (stop_tx, stop) = watch::channel(false);
    proxy.serve(listener, Service { protocol: Protocol::Pop3, implicit_tls: false }, stop);
    Setup { proxy, directory, addr, _stop: stop_tx, _dir: TempDir(dir) }
}

struct Client {
    lines: tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Client {
    async fn connect(addr: SocketAddr) -> (Client, String) {
        let s = TcpStream::connect(addr).await.expect("connect");
        let (r, w) = s.into_split();
        let mut c = Client { lines: BufReader::new(r).lines(), w };
        let g = c.line().await.expect("greeting");
        (c, g)
    }
    async fn line(&mut self) -> Option<String> {
        tokio::time::timeout(Duration::from_secs(10), self.lines.next_line()).await.expect("bounded").ok().flatten()
    }
    async fn cmd(&mut self, l: &str) -> String {
        self.w.write_all(format!("{l}\r\n").as_bytes()).await.expect("write");
        self.line().await.unwrap_or_default()
    }
}

#[tokio::test]
async fn logins_reach_the_owner_with_the_client_address_and_bytes_flow() {
    let s = setup(|_| {}).await;
    let (mut c, greeting) = Client::connect(s.addr).await;
    assert_eq!(greeting, "+OK Mail ready.");
    assert_eq!(c.cmd("USER Alice").await, "+OK");
    assert_eq!(c.cmd("PASS pw").await, "+OK Logged in.");
    assert_eq!(c.cmd("WHO").await, "+OK b1 client=127.0.0.1");
    let (mut c, _) = Client::connect(s.addr).await;
    // Pipelined after the login: forwarded to the owner once logged in.
    c.w.write_all(b"USER bob\r\nPASS pw\r\nWHO\r\n").await.expect("write");
    assert_eq!(c.line().await.as_deref(), Some("+OK"));
    assert_eq!(c.line().await.as_deref(), Some("+OK Logged in."));
    assert_eq!(c.line().await.as_deref(), Some("+OK b2 client=127.0.0.1"));
    assert_eq!(s.proxy.snapshot().logins_ok, 2);
}

#[tokio::test]
async fn unknown_users_get_the_wrong_password_answer() {
    let s = setup(|_| {}).await;
    let (mut c, _) = Client::connect(s.addr).await;
    c.cmd("USER alice").await;
    let wrong = c.cmd("PASS nope").await;
    assert_eq!(wrong, "-ERR [AUTH] Authentication failed.");
    c.cmd("USER nobody-here").await;
    assert_eq!(c.cmd("PASS pw").await, wrong);
    // The session goes on after failures.
    c.cmd("USER alice").await;
    assert_eq!(c.cmd("PASS pw").await, "+OK Logged in.");
}

#[tokio::test]
async fn an_owner_that_is_down_gets_the_temporary_answer() {
    let s = setup(|_| {}).await;
    let (mut c, _) = Client::connect(s.addr).await;
    c.cmd("USER carol").await;
    assert_eq!(c.cmd("PASS pw").await, "-ERR [SYS/TEMP] Account is temporarily unavailable.");
    s.directory.set_health("b1", false);
    c.cmd("USER alice").await;
    assert_eq!(c.cmd("PASS pw").await, "-ERR [SYS/TEMP] Account is temporarily unavailable.");
}

#[tokio::test]
async fn repeated_failures_block_the_source() {
    let s = setup(|_| {}).await;
    let (mut c, _) = Client::connect(s.addr).await;
    let mut answers = Vec::new();
    for _ in 0..12 {
        c.cmd("USER alice").await;
        answers.push(c.cmd("PASS wrong").await);
    }
    assert!(answers[..10].iter().all(|a| a == "-ERR [AUTH] Authentication failed."), "{answers:?}");
    assert!(answers[10..].iter().all(|a| a == "-ERR [SYS/TEMP] Account is temporarily unavailable."), "{answers:?}");
    // Blocked even with the right password: no back-end is asked.
    c.cmd("USER alice").await;
    assert_eq!(c.cmd("PASS pw").await, "-ERR [SYS/TEMP] Account is temporarily unavailable.");
    let snap = s.proxy.snapshot();
    assert_eq!((snap.logins_failed, snap.logins_blocked, snap.logins_slowed), (10, 3, 7));
}

#[tokio::test]
async fn a_mailbox_move_ends_the_users_sessions_only() {
    let s = setup(|_| {}).await;
    let (mut a, _) = Client::connect(s.addr).await;
    a.cmd("USER alice").await;
    assert_eq!(a.cmd("PASS pw").await, "+OK Logged in.");
    let (mut b, _) = Client::connect(s.addr).await;
    b.cmd("USER bob").await;
    assert_eq!(b.cmd("PASS pw").await, "+OK Logged in.");
    s.directory.move_mailbox("alice", "b2").expect("move");
    assert_eq!(a.line().await, None, "alice's session is closed");
    assert_eq!(b.cmd("WHO").await, "+OK b2 client=127.0.0.1");
    // She reconnects to the new owner.
    let (mut a, _) = Client::connect(s.addr).await;
    a.cmd("USER alice").await;
    a.cmd("PASS pw").await;
    assert_eq!(a.cmd("WHO").await, "+OK b2 client=127.0.0.1");
    assert_eq!(s.proxy.end_user("BOB"), 1);
    assert_eq!(b.line().await, None);
}

#[tokio::test]
async fn session_limits_and_the_login_timeout() {
    let s = setup(|s| {
        s.max_sessions_per_source = 1;
        s.login_timeout = Duration::from_millis(300);
    })
    .await;
    let (mut first, _) = Client::connect(s.addr).await;
    let (_, refused) = Client::connect(s.addr).await;
    assert_eq!(refused, "-ERR [SYS/TEMP] Too many connections, try again later.");
    assert_eq!(first.line().await.as_deref(), Some("-ERR Disconnected for inactivity."));
    assert_eq!(first.line().await, None);
}

/// A session that will be spliced asks the owner for the client's segment size, so each
/// segment the owner sends fits one segment to the client (no runts; see
/// `backend::splice_segment_size`). Loopback's own MSS is about 65 000: without the hint the
/// back-end connection would keep it.
#[tokio::test]
async fn the_backend_connection_of_a_spliced_session_takes_the_clients_segment_size() {
    use socket2::SockRef;
    let front = TcpListener::bind("127.0.0.1:0").await.expect("bind front");
    let owner = TcpListener::bind("127.0.0.1:0").await.expect("bind owner");
    // A client on a small-MTU path: it advertises an MSS of 1200.
    let client = tokio::net::TcpSocket::new_v4().expect("socket");
    SockRef::from(&client).set_tcp_mss(1200).expect("TCP_MAXSEG");
    let (client, accepted) = tokio::join!(client.connect(front.local_addr().expect("addr")), front.accept());
    let (_client, (from_client, _)) = (client.expect("connect"), accepted.expect("accept"));
    let mss = backend::splice_segment_size(&from_client).expect("the client connection's MSS");
    assert!(mss <= 1200, "client-side MSS {mss}");

    let owner_addr = owner.local_addr().expect("addr");
    let dial = |max_segment| backend::Dial { addr: owner_addr, timeout: Duration::from_secs(2), max_segment };
    let (to_owner, accepted) = tokio::join!(backend::connect(dial(Some(mss))), owner.accept());
    let (_to_owner, (at_owner, _)) = (to_owner.expect("connect"), accepted.expect("accept"));
    let owner_mss = SockRef::from(&at_owner).tcp_mss().expect("owner's MSS");
    assert!(owner_mss <= mss, "the owner may send segments of {owner_mss} bytes, the client takes {mss}");

    // Without the hint (copied sessions), the connection keeps the path's own MSS.
    let (plain, accepted) = tokio::join!(backend::connect(dial(None)), owner.accept());
    let (_plain, (at_owner, _)) = (plain.expect("connect"), accepted.expect("accept"));
    assert!(SockRef::from(&at_owner).tcp_mss().expect("MSS") > 1200);
}
