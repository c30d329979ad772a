//! The POP3/IMAP proxy's kernel relay (`mxlb::sockmap`): a client, a "proxy" that accepts,
//! connects to a server and calls `Splicer::splice`, and a server, all on 127.0.0.1 inside a
//! network namespace the test thread creates (unshare), so nothing touches the host's network.
//! Needs root (BPF); with CI=true a non-root run fails instead of skipping.

use std::{
    net::SocketAddr,
    os::fd::AsRawFd as _,
    sync::Arc,
    time::Duration,
};

use mxlb::sockmap::{Refusal, SessionEnd, Side, SpliceError, SpliceOptions, SpliceOutcome, Splicer, socket_cookie};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

/// Upper bound for any one test: a hang fails the test instead of blocking the suite.
const HANG: Duration = Duration::from_secs(60);

/// Held by each test while it loads the splicer.
static LOADS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `f` on a thread in a fresh network namespace (lo up) with a current-thread runtime.
fn isolated<F, Fut>(name: &str, f: F)
where
    F: FnOnce(Arc<Splicer>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    if !lab::require_root(name) {
        return;
    }
    let h = std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread; the namespace dies with it.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare: {}", std::io::Error::last_os_error());
        let st = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status().expect("run ip");
        assert!(st.success(), "ip link set lo up");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        // Loads are serialised so the check below sees only this one's pins.
        let serial = LOADS.lock().unwrap_or_else(|p| p.into_inner());
        let splicer = Arc::new(Splicer::load().expect("load the splice program"));
        // The temporary pin directory of the load is gone: nothing of it is left on bpffs.
        let left: Vec<_> = std::fs::read_dir("/sys/fs/bpf")
            .map(|rd| rd.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        let mine = format!("mxlb-splice-{}-", std::process::id());
        assert!(!left.iter().any(|n| n.starts_with(&mine)), "pins left behind: {left:?}");
        drop(serial);
        rt.block_on(async move {
            tokio::time::timeout(HANG, f(splicer)).await.expect("test hung");
        });
    });
    if let Err(e) = h.join() {
        std::panic::resume_unwind(e);
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so both ends can produce and check them.
fn stream(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// A proxy in front of `server`: accepts one client, connects, splices. Returns its address
/// and the task (splice's result, plus the two sockets' cookies).
async fn proxy(
    splicer: Arc<Splicer>,
    server: SocketAddr,
) -> (SocketAddr, tokio::task::JoinHandle<(Result<SpliceOutcome, SpliceError>, [u64; 2])>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = l.local_addr().expect("proxy addr");
    let task = tokio::spawn(async move {
        let (c, _) = l.accept().await.expect("accept");
        let b = TcpStream::connect(server).await.expect("connect to server");
        let cookies = [socket_cookie(c.as_raw_fd()).expect("cookie"), socket_cookie(b.as_raw_fd()).expect("cookie")];
        (splicer.splice(c, b, SpliceOptions::default()).await, cookies)
    });
    (addr, task)
}

/// Waits until the proxy has spliced its session, so the client's first bytes find the
/// relay in place (bytes sent earlier would be unread at the call: refused, see the last test).
async fn spliced(splicer: &Splicer) {
    while splicer.spliced_sockets() < 2 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn read_all(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).await.expect("read to EOF");
    v
}

const MB: usize = 1 << 20;

#[test]
fn megabytes_both_ways_in_order_through_the_kernel_only() {
    isolated("megabytes_both_ways_in_order_through_the_kernel_only", |splicer| async move {
        let up = stream(1, 6 * MB);
        let down = stream(2, 5 * MB);
        let sl = TcpListener::bind("127.0.0.1:0").await.expect("bind server");
        let saddr = sl.local_addr().expect("addr");
        let (down2, up2) = (down.clone(), up.clone());
        // Server: writes its stream and reads the client's at the same time.
        let server = tokio::spawn(async move {
            let (s, _) = sl.accept().await.expect("accept");
            let (mut r, mut w) = s.into_split();
            let writer = tokio::spawn(async move {
                w.write_all(&down2).await.expect("server write");
                w.shutdown().await.expect("server shutdown");
            });
            let got = read_all(&mut r).await;
            writer.await.expect("writer");
            assert!(got == up2, "server received {} bytes, not the {} the client sent (or out of order)", got.len(), up2.len());
        });
        let (paddr, ptask) = proxy(splicer.clone(), saddr).await;
        let c = TcpStream::connect(paddr).await.expect("connect proxy");
        spliced(&splicer).await;
        let (mut r, mut w) = c.into_split();
        let up3 = up.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&up3).await.expect("client write");
            w.shutdown().await.expect("client shutdown");
        });
        // Mid-transfer: the session's two sockets are in the sock hash.
        let mut first = vec![0u8; MB];
        r.read_exact(&mut first).await.expect("first MB");
        assert_eq!(splicer.spliced_sockets(), 2, "both sockets are in the sock hash during the transfer");
        let mut got = first;
        got.extend(read_all(&mut r).await);
        assert!(got == down, "client received {} bytes, not the server's {} (or out of order)", got.len(), down.len());
        writer.await.expect("client writer");
        server.await.expect("server");
        let (outcome, cookies) = ptask.await.expect("proxy task");
        let outcome = outcome.expect("splice");
        assert_eq!(
            outcome,
            SpliceOutcome {
                client_to_backend: up.len() as u64,
                backend_to_client: down.len() as u64,
                userspace_bytes: 0,
                end: SessionEnd::Closed
            }
        );
        assert_eq!(splicer.spliced_sockets(), 0, "the sockets left the sock hash");
        assert!(cookies.iter().all(|c| splicer.peer_entry(*c).is_none()), "the peer entries are gone");
    });
}

#[test]
fn half_close_reaches_the_server_and_the_reply_still_arrives() {
    isolated("half_close_reaches_the_server_and_the_reply_still_arrives", |splicer| async move {
        let request = stream(3, 300_000);
        let reply = stream(4, 3 * MB);
        let sl = TcpListener::bind("127.0.0.1:0").await.expect("bind server");
        let saddr = sl.local_addr().expect("addr");
        let (request2, reply2) = (request.clone(), reply.clone());
        let server = tokio::spawn(async move {
            let (mut s, _) = sl.accept().await.expect("accept");
            // EOF first (the client's shutdown), only then the reply.
            let got = read_all(&mut s).await;
            assert!(got == request2, "server got {} bytes before EOF, expected {}", got.len(), request2.len());
            s.write_all(&reply2).await.expect("reply");
            s.shutdown().await.expect("server shutdown");
        });
        let (paddr, ptask) = proxy(splicer.clone(), saddr).await;
        let mut c = TcpStream::connect(paddr).await.expect("connect proxy");
        spliced(&splicer).await;
        c.write_all(&request).await.expect("request");
        c.shutdown().await.expect("client shutdown (half-close)");
        let got = read_all(&mut c).await;
        assert!(got == reply, "client got {} bytes of the {}-byte reply", got.len(), reply.len());
        server.await.expect("server");
        let (outcome, cookies) = ptask.await.expect("proxy task");
        let outcome = outcome.expect("splice");
        assert_eq!(outcome.end, SessionEnd::Closed);
        assert_eq!((outcome.client_to_backend, outcome.backend_to_client), (request.len() as u64, reply.len() as u64));
        assert_eq!(splicer.spliced_sockets(), 0);
        assert!(cookies.iter().all(|c| splicer.peer_entry(*c).is_none()));
    });
}

#[test]
fn a_reset_ends_the_splice() {
    isolated("a_reset_ends_the_splice", |splicer| async move {
        let sl = TcpListener::bind("127.0.0.1:0").await.expect("bind server");
        let saddr = sl.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = sl.accept().await.expect("accept");
            let mut hello = [0u8; 5];
            s.read_exact(&mut hello).await.expect("hello");
            assert_eq!(&hello, b"hello");
            // Abort: SO_LINGER 0 makes close send RST.
            s.set_zero_linger().expect("linger 0");
            drop(s);
        });
        let (paddr, ptask) = proxy(splicer.clone(), saddr).await;
        let mut c = TcpStream::connect(paddr).await.expect("connect proxy");
        spliced(&splicer).await;
        c.write_all(b"hello").await.expect("hello");
        server.await.expect("server");
        let (outcome, cookies) = ptask.await.expect("proxy task");
        assert_eq!(outcome.expect("splice").end, SessionEnd::Reset(Side::Backend));
        // The client is not left hanging: it sees the end of the connection.
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest).await;
        assert!(rest.is_empty());
        assert_eq!(splicer.spliced_sockets(), 0);
        assert!(cookies.iter().all(|c| splicer.peer_entry(*c).is_none()));
    });
}

#[test]
fn slow_reader_loses_nothing() {
    isolated("slow_reader_loses_nothing", |splicer| async move {
        let up = stream(5, 24 * MB);
        let sl = TcpListener::bind("127.0.0.1:0").await.expect("bind server");
        let saddr = sl.local_addr().expect("addr");
        let up2 = up.clone();
        let server = tokio::spawn(async move {
            let (mut s, _) = sl.accept().await.expect("accept");
            // Not reading for a while fills every buffer on the way (backpressure).
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut got = Vec::with_capacity(up2.len());
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = s.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                if got.len() % (4 * MB) < n {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            assert!(got == up2, "server got {} of {} bytes (or out of order)", got.len(), up2.len());
        });
        let (paddr, ptask) = proxy(splicer.clone(), saddr).await;
        let mut c = TcpStream::connect(paddr).await.expect("connect proxy");
        spliced(&splicer).await;
        c.write_all(&up).await.expect("client write");
        c.shutdown().await.expect("client shutdown");
        server.await.expect("server");
        assert!(read_all(&mut c).await.is_empty());
        let (outcome, _) = ptask.await.expect("proxy task");
        let outcome = outcome.expect("splice");
        assert_eq!(outcome.client_to_backend, up.len() as u64);
        assert_eq!(outcome.end, SessionEnd::Closed);
    });
}

#[test]
fn unread_bytes_are_refused_and_handed_back() {
    isolated("unread_bytes_are_refused_and_handed_back", |splicer| async move {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let sl = TcpListener::bind("127.0.0.1:0").await.expect("bind server");
        let saddr = sl.local_addr().expect("addr");
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let (pc, _) = l.accept().await.expect("accept");
        let pb = TcpStream::connect(saddr).await.expect("connect server");
        let (_s, _) = sl.accept().await.expect("server accept");
        // A pipelined command the proxy has not read yet.
        c.write_all(b"a2 NOOP\r\n").await.expect("pipelined");
        pc.readable().await.expect("readable");
        let err = splicer.splice(pc, pb, SpliceOptions::default()).await.expect_err("must refuse");
        let SpliceError::Refused { reason, .. } = &err else { panic!("unexpected error {err}") };
        assert_eq!(*reason, Refusal::Unread { side: Side::Client, bytes: 9 });
        let (mut pc, _pb) = err.into_streams().expect("streams back");
        let mut buf = [0u8; 9];
        pc.read_exact(&mut buf).await.expect("the bytes are still there");
        assert_eq!(&buf, b"a2 NOOP\r\n");
        assert_eq!(splicer.spliced_sockets(), 0, "nothing was inserted");
    });
}

#[test]
fn an_idle_session_ends_at_the_idle_limit() {
    isolated("an_idle_session_ends_at_the_idle_limit", |splicer| async move {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let sl = TcpListener::bind("127.0.0.1:0").await.expect("bind server");
        let mut c = TcpStream::connect(l.local_addr().expect("addr")).await.expect("connect");
        let (pc, _) = l.accept().await.expect("accept");
        let pb = TcpStream::connect(sl.local_addr().expect("addr")).await.expect("connect server");
        let (mut s, _) = sl.accept().await.expect("server accept");
        let options = SpliceOptions { idle_timeout: Some(Duration::from_millis(300)), ..SpliceOptions::default() };
        let outcome = splicer.splice(pc, pb, options).await.expect("splice");
        assert_eq!(outcome.end, SessionEnd::Idle);
        assert_eq!(splicer.spliced_sockets(), 0);
        // Both ends see the connection end.
        assert!(read_all(&mut c).await.is_empty());
        assert!(read_all(&mut s).await.is_empty());
    });
}

/// The proxy's hand-over: the login reply goes out only once both sockets are in the map, so
/// a client that answers it at once (every POP3/IMAP client after its login) always has its
/// next command relayed by the kernel. With the reply written before the splice, a command
/// landing between the unread check and the insertion could sit unseen. Repeated, because
/// that window is narrow.
#[test]
fn a_command_sent_right_after_the_login_reply_is_relayed_every_time() {
    isolated("a_command_sent_right_after_the_login_reply_is_relayed_every_time", |splicer| async move {
        const ROUNDS: usize = 100;
        let sl = TcpListener::bind("127.0.0.1:0").await.expect("bind server");
        let saddr = sl.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let (mut s, _) = sl.accept().await.expect("accept");
                let mut cmd = [0u8; 6];
                s.read_exact(&mut cmd).await.expect("server reads the command");
                assert_eq!(&cmd, b"STAT\r\n");
                s.write_all(b"+OK 0 0\r\n").await.expect("server answers");
                s.shutdown().await.expect("server shutdown");
            }
        });
        let pl = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let paddr = pl.local_addr().expect("proxy addr");
        let proxy_splicer = splicer.clone();
        let proxy = tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for _ in 0..ROUNDS {
                let (c, _) = pl.accept().await.expect("accept");
                let b = TcpStream::connect(saddr).await.expect("connect to server");
                let options = SpliceOptions { reply_to_client: b"+OK Logged in.\r\n".to_vec(), ..Default::default() };
                outcomes.push(proxy_splicer.splice(c, b, options).await.expect("spliced"));
            }
            outcomes
        });
        for round in 0..ROUNDS {
            let mut c = TcpStream::connect(paddr).await.expect("connect to proxy");
            let mut reply = [0u8; 16];
            c.read_exact(&mut reply).await.expect("login reply");
            assert_eq!(&reply, b"+OK Logged in.\r\n", "round {round}");
            c.write_all(b"STAT\r\n").await.expect("client sends at once");
            assert_eq!(read_all(&mut c).await, b"+OK 0 0\r\n", "round {round}: the command went through");
        }
        server.await.expect("server");
        for o in proxy.await.expect("proxy") {
            assert_eq!((o.client_to_backend, o.backend_to_client, o.userspace_bytes), (6, 9, 0), "{o:?}");
        }
        assert_eq!(splicer.spliced_sockets(), 0, "every entry removed");
    });
}
