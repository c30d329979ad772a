//! The whole service (scheduler, pools, client) against real sockets on 127.0.0.1: a scripted
//! in-process server, and Postfix's `smtp-sink`.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpListener,
    sync::watch,
};

use super::*;
use crate::relay::{ClientInfo, RcptState, Recipient};

/// A queue in memory, keeping what delivery recorded.
#[derive(Default)]
struct MemStore {
    queue: Mutex<BTreeMap<MessageId, (Envelope, Vec<u8>)>>,
    /// Envelopes recorded done (removed from the queue), in order.
    done: Mutex<Vec<Envelope>>,
}

impl MemStore {
    fn put(&self, env: Envelope, content: &[u8]) {
        self.queue.lock().unwrap().insert(env.id.clone(), (env, content.to_vec()));
    }
    fn done(&self) -> Vec<Envelope> {
        self.done.lock().unwrap().clone()
    }
    fn queued(&self) -> Vec<Envelope> {
        self.queue.lock().unwrap().values().map(|(e, _)| e.clone()).collect()
    }
}

fn missing(id: &MessageId) -> StoreError {
    StoreError::new(format!("{id}: no such message"))
}

impl QueueStore for MemStore {
    fn ids(&self) -> Result<Vec<MessageId>, StoreError> {
        Ok(self.queue.lock().unwrap().keys().cloned().collect())
    }
    fn envelope(&self, id: &MessageId) -> Result<Envelope, StoreError> {
        self.queue.lock().unwrap().get(id).map(|(e, _)| e.clone()).ok_or_else(|| missing(id))
    }
    fn load(&self, id: &MessageId) -> Result<(Envelope, Vec<u8>), StoreError> {
        self.queue.lock().unwrap().get(id).cloned().ok_or_else(|| missing(id))
    }
    fn record(&self, env: &Envelope) -> Result<(), StoreError> {
        let mut q = self.queue.lock().unwrap();
        if env.is_done() {
            q.remove(&env.id);
            self.done.lock().unwrap().push(env.clone());
        } else if let Some(entry) = q.get_mut(&env.id) {
            entry.0 = env.clone();
        }
        Ok(())
    }
    fn enqueue(&self, env: &Envelope, content: &[u8]) -> Result<(), StoreError> {
        self.put(env.clone(), content);
        Ok(())
    }
}

struct Fixed(Vec<BackendState>);

impl Backends for Fixed {
    fn snapshot(&self) -> Vec<BackendState> {
        self.0.clone()
    }
}

fn one_backend(address: SocketAddr) -> Arc<Fixed> {
    Arc::new(Fixed(vec![BackendState { backend: Backend { name: "mb1".into(), address, weight: 1 }, healthy: true }]))
}

fn envelope(from: &str, rcpts: &[&str], content: &[u8]) -> Envelope {
    Envelope {
        id: MessageId::generate(),
        mail_from: from.into(),
        rcpts: rcpts.iter().map(|r| Recipient::new(r.to_string())).collect(),
        accepted_at: crate::relay::unix_now(),
        accepted_by: "lb1".into(),
        client: ClientInfo {
            addr: "192.0.2.9:40000".parse().unwrap(),
            helo: "client.test".into(),
            tls: false,
            authenticated: false,
        },
        eight_bit: false,
        smtputf8: false,
        size: content.len() as u64,
    }
}

fn settings() -> Settings {
    let short = Duration::from_secs(10);
    let mut s = Settings::new("relay.test");
    s.timeouts = Timeouts {
        connect: short,
        greeting: short,
        mail: short,
        rcpt: short,
        data_start: short,
        data_block: short,
        data_end: short,
    };
    s.retry = RetryPolicy {
        first: Duration::from_secs(600),
        factor: 2.0,
        max: Duration::from_secs(3600),
        lifetime: Duration::from_secs(86_400),
    };
    s.stop_grace = Duration::from_secs(5);
    s
}

/// Polls `cond` until it holds; the generous deadline only turns a hang into a failure.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..600 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("gave up waiting for: {what}");
}

/// A small SMTP server: PIPELINING, `bad@` recipients get 550, `later@` get 451; keeps the
/// envelopes it accepted.
async fn scripted_server() -> (SocketAddr, Arc<Mutex<Vec<(String, Vec<String>)>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let log = accepted.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut r = BufReader::new(r);
                let _ = w.write_all(b"220 mb1.test ESMTP\r\n").await;
                let (mut from, mut rcpts) = (String::new(), Vec::new());
                let mut line = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let cmd = line.trim_end().to_string();
                    let upper = cmd.to_ascii_uppercase();
                    let reply: &[u8] = if upper.starts_with("EHLO") {
                        b"250-mb1.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
                    } else if upper.starts_with("MAIL FROM:") {
                        from = cmd[10..].to_string();
                        rcpts.clear();
                        b"250 2.1.0 ok\r\n"
                    } else if upper.starts_with("RCPT TO:<BAD@") {
                        b"550 5.1.1 no such user\r\n"
                    } else if upper.starts_with("RCPT TO:<LATER@") {
                        b"451 4.2.0 mailbox busy\r\n"
                    } else if upper.starts_with("RCPT TO:") {
                        rcpts.push(cmd[8..].to_string());
                        b"250 2.1.5 ok\r\n"
                    } else if upper == "DATA" {
                        if rcpts.is_empty() {
                            b"554 5.5.1 no valid recipients\r\n"
                        } else {
                            let _ = w.write_all(b"354 go\r\n").await;
                            loop {
                                line.clear();
                                if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                                    return;
                                }
                                if line == ".\r\n" {
                                    break;
                                }
                            }
                            log.lock().unwrap().push((from.clone(), rcpts.clone()));
                            b"250 2.0.0 queued\r\n"
                        }
                    } else if upper == "RSET" {
                        b"250 2.0.0 ok\r\n"
                    } else if upper == "QUIT" {
                        let _ = w.write_all(b"221 bye\r\n").await;
                        return;
                    } else {
                        b"502 5.5.2 what\r\n"
                    };
                    if w.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn mixed_outcomes_are_recorded_and_the_sender_gets_a_bounce() {
    let (addr, accepted) = scripted_server().await;
    let store = Arc::new(MemStore::default());
    let content = b"Subject: mixed\r\nMessage-ID: <m@src.test>\r\n\r\nbody\r\n";
    let env = envelope("alice@src.test", &["good@d.test", "bad@d.test", "later@d.test"], content);
    let id = env.id.clone();
    let (stop_tx, stop) = watch::channel(false);
    let handle = Delivery::start(settings(), store.clone(), one_backend(addr), stop);
    store.put(env, content);
    handle.submit(id.clone());

    // The bounce is queued and delivered to the sender, with the null reverse-path.
    until("the bounce delivered", || store.done().iter().any(|e| e.mail_from.is_empty())).await;
    let bounce = store.done().into_iter().find(|e| e.mail_from.is_empty()).unwrap();
    assert_eq!(bounce.rcpts[0].address, "alice@src.test");
    assert!(matches!(bounce.rcpts[0].state, RcptState::Delivered { .. }));
    assert!(accepted.lock().unwrap().contains(&("<>".to_string(), vec!["<alice@src.test>".to_string()])));

    // The original stays queued for `later@`, with its attempt and the reply recorded.
    let queued = store.envelope(&id).unwrap();
    assert!(matches!(&queued.rcpts[0].state, RcptState::Delivered { reply } if reply.starts_with("250 2.0.0")));
    assert!(matches!(&queued.rcpts[1].state, RcptState::Bounced { reply } if reply.contains("5.1.1")));
    let RcptState::Pending { attempts, next_attempt, last_reply } = &queued.rcpts[2].state else {
        panic!("{queued:?}")
    };
    assert_eq!(*attempts, 1);
    assert!(*next_attempt > crate::relay::unix_now() + 60, "backs off by the configured first delay");
    assert!(last_reply.as_deref().is_some_and(|r| r.starts_with("451 4.2.0")));

    stop_tx.send(true).unwrap();
    handle.stopped().await;
    assert_eq!(store.queued().len(), 1, "only the deferred message remains");
}

#[tokio::test]
async fn no_healthy_back_end_defers_without_bouncing() {
    let store = Arc::new(MemStore::default());
    let env = envelope("alice@src.test", &["x@d.test"], b"S: x\r\n\r\nx\r\n");
    let id = env.id.clone();
    store.put(env, b"S: x\r\n\r\nx\r\n");
    let down = Arc::new(Fixed(vec![BackendState {
        backend: Backend { name: "mb1".into(), address: "127.0.0.1:9".parse().unwrap(), weight: 1 },
        healthy: false,
    }]));
    let (stop_tx, stop) = watch::channel(false);
    // Loaded from the store at start, not submitted.
    let handle = Delivery::start(settings(), store.clone(), down, stop);
    until("the attempt recorded", || {
        matches!(store.envelope(&id).unwrap().rcpts[0].state, RcptState::Pending { attempts: 1, .. })
    })
    .await;
    stop_tx.send(true).unwrap();
    handle.stopped().await;
    assert!(store.done().is_empty(), "no bounce, nothing done");
}

/// Kills `smtp-sink` and removes its directory however the test ends.
struct Sink {
    child: std::process::Child,
    dir: PathBuf,
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn delivers_exact_content_to_a_real_smtp_sink() {
    let sink_bin = Path::new("/usr/sbin/smtp-sink");
    if !sink_bin.exists() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "/usr/sbin/smtp-sink is required in CI (Debian package postfix)"
        );
        eprintln!("skipped: /usr/sbin/smtp-sink is not installed (Debian package postfix)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("mxlb-delivery-sink-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cmd = std::process::Command::new(sink_bin);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // smtp-sink refuses to run as root; the unprivileged user must write the dumps.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        cmd.args(["-u", "nobody"]);
    }
    cmd.arg("-d").arg(dir.join("%Y%m%d%H%M%S.")).arg(format!("127.0.0.1:{port}")).arg("100");
    let sink = Sink { child: cmd.spawn().expect("start smtp-sink"), dir: dir.clone() };
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    until("smtp-sink listening", || std::net::TcpStream::connect(addr).is_ok()).await;

    let contents: Vec<Vec<u8>> = (0..3)
        .map(|n| {
            format!("Subject: sink test {n}\r\nX-N: {n}\r\n\r\n.\r\n..\r\n.leading dot {n}\r\nmiddle . dot\r\n...\r\nend\r\n").into_bytes()
        })
        .collect();
    let store = Arc::new(MemStore::default());
    let mut ids = Vec::new();
    for (n, c) in contents.iter().enumerate() {
        let env = envelope("sender@src.test", &[&format!("r{n}a@d.test"), &format!("r{n}b@e.test")], c);
        ids.push(env.id.clone());
        store.put(env, c);
    }
    let (stop_tx, stop) = watch::channel(false);
    let handle = Delivery::start(settings(), store.clone(), one_backend(addr), stop);
    until("all delivered", || store.done().len() == 3).await;
    for env in store.done() {
        assert!(env.rcpts.iter().all(|r| matches!(r.state, RcptState::Delivered { .. })), "{env:?}");
    }

    // Each message arrives once per recipient domain (two transactions), dots as they were.
    let expected: Vec<String> = contents.iter().map(|c| String::from_utf8_lossy(c).replace("\r\n", "\n")).collect();
    let mut found = vec![0; 3];
    until("dumps written", || std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0) >= 6).await;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let dump = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let n = (0..3)
            .find(|&n| dump.contains(&format!("Subject: sink test {n}\n")))
            .expect("a dump of one of our messages");
        let body = &dump[dump.find("Subject: sink test").unwrap()..];
        assert!(
            body == expected[n] || body.strip_suffix('\n') == Some(expected[n].as_str()),
            "dump differs:\n{body:?}\nexpected:\n{:?}",
            expected[n]
        );
        assert!(dump.contains("X-Mail-Args: <sender@src.test>"), "{dump}");
        found[n] += 1;
    }
    assert_eq!(found, [2, 2, 2]);

    stop_tx.send(true).unwrap();
    handle.stopped().await;
    drop(sink);
}
