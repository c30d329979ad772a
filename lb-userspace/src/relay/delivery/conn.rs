//! The I/O edge: TCP connections running a [`Client`], and a small pool of idle sessions per
//! back-end so consecutive messages skip the connect, greeting and EHLO.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::Semaphore,
    time::{Instant, timeout},
};

use super::{
    client::{Client, Finished, Outcome, Protocol, Step, Timeouts, Transaction},
    reply::Reply,
    route::Backend,
};

/// Writes of the content are cut in pieces of this size, each under the data-block timeout.
const WRITE_CHUNK: usize = 64 * 1024;

/// How a pool opens and keeps sessions.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub protocol: Protocol,
    /// Our EHLO/LHLO name.
    pub helo_name: String,
    /// Pass the original client with XCLIENT when the back-end offers it.
    pub xclient: bool,
    pub timeouts: Timeouts,
    /// Sessions open at once to one back-end.
    pub max_connections: usize,
    /// Messages sent over one session before it is closed (bounds a server's per-session
    /// state, and spreads load again after a back-end comes back).
    pub max_messages: u32,
    /// An idle session older than this is closed rather than reused.
    pub idle_timeout: Duration,
}

/// One open session with a back-end.
pub struct Connection {
    stream: TcpStream,
    client: Client,
    timeouts: Timeouts,
    messages: u32,
}

impl Connection {
    /// Connects and runs the greeting and EHLO/LHLO.
    pub async fn open(address: SocketAddr, s: &PoolSettings) -> Result<Connection, String> {
        let stream = match timeout(s.timeouts.connect, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(format!("connect to {address}: {e}")),
            Err(_) => return Err(format!("connect to {address}: timed out")),
        };
        let _ = stream.set_nodelay(true);
        let mut conn = Connection {
            stream,
            client: Client::new(s.protocol, &s.helo_name, s.xclient),
            timeouts: s.timeouts,
            messages: 0,
        };
        match conn.drive().await {
            Step::Idle => Ok(conn),
            Step::Broken(reason) => Err(format!("{address}: {reason}")),
            other => Err(format!("{address}: unexpected state {other:?} after the greeting")),
        }
    }

    /// Runs one transaction. The session is reusable when it comes back idle.
    pub async fn deliver(&mut self, t: Transaction, content: &[u8]) -> (Finished, bool) {
        let n = t.rcpts.len();
        if self.client.begin(t, content).is_err() {
            return (all(n, Outcome::Deferred(Reply::local(451, "4.3.0 internal: session not idle"))), false);
        }
        self.messages += 1;
        let finished = match self.drive().await {
            Step::Done(f) => f,
            other => {
                return (
                    all(n, Outcome::Deferred(Reply::local(451, format!("4.3.0 internal: unexpected state {other:?}")))),
                    false,
                );
            }
        };
        let reusable = self.client.poll() == Step::Idle && self.client.reusable();
        (finished, reusable)
    }

    /// Says goodbye without waiting for the reply; the session is over either way.
    pub async fn quit(mut self) {
        let _ = timeout(Duration::from_secs(1), self.stream.write_all(b"QUIT\r\n")).await;
        let _ = timeout(Duration::from_secs(1), self.stream.shutdown()).await;
    }

    /// Moves bytes between the socket and the client until it is idle, done or broken.
    async fn drive(&mut self) -> Step {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match self.client.poll() {
                Step::Send(bytes) => {
                    for chunk in bytes.chunks(WRITE_CHUNK) {
                        match timeout(self.timeouts.data_block, self.stream.write_all(chunk)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => {
                                self.client.abort(&format!("write: {e}"));
                                break;
                            }
                            Err(_) => {
                                self.client.abort("timed out writing to the back-end");
                                break;
                            }
                        }
                    }
                }
                Step::Receive(wait) => match timeout(self.timeouts.reply(wait), self.stream.read(&mut buf)).await {
                    Ok(Ok(0)) => {
                        self.client.abort(&format!("connection closed by the back-end while waiting for {wait:?}"))
                    }
                    Ok(Ok(n)) => self.client.receive(buf.get(..n).unwrap_or_default()),
                    Ok(Err(e)) => self.client.abort(&format!("read: {e}")),
                    Err(_) => self.client.abort(&format!("timed out waiting for the {wait:?} reply")),
                },
                other => return other,
            }
        }
    }
}

fn all(n: usize, o: Outcome) -> Finished {
    Finished { outcomes: vec![o; n], sent_mail: false }
}

struct Pool {
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<(Connection, Instant)>>,
}

/// Pools of sessions, one per back-end (by name and address: a back-end moved to a new
/// address gets a new pool).
pub struct Pools {
    settings: PoolSettings,
    pools: Mutex<HashMap<(String, SocketAddr), Arc<Pool>>>,
}

impl Pools {
    pub fn new(settings: PoolSettings) -> Pools {
        Pools { settings, pools: Mutex::new(HashMap::new()) }
    }

    fn pool(&self, b: &Backend) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools
            .entry((b.name.clone(), b.address))
            .or_insert_with(|| {
                Arc::new(Pool {
                    permits: Arc::new(Semaphore::new(self.settings.max_connections.max(1))),
                    idle: Mutex::new(Vec::new()),
                })
            })
            .clone()
    }

    /// Delivers one transaction to `backend`, waiting for a free session slot. A reused
    /// session that turns out dead before `MAIL` was sent is replaced by a fresh one once,
    /// so a server's idle disconnect costs no attempt.
    pub async fn deliver(&self, backend: &Backend, t: Transaction, content: &[u8]) -> Finished {
        let pool = self.pool(backend);
        let Ok(_permit) = pool.permits.clone().acquire_owned().await else {
            return all(t.rcpts.len(), Outcome::Deferred(Reply::local(451, "4.3.0 delivery is shutting down")));
        };
        for _ in 0..2 {
            let reused = take_idle(&pool, self.settings.idle_timeout);
            let was_reused = reused.is_some();
            let mut conn = match reused {
                Some(c) => c,
                None => match Connection::open(backend.address, &self.settings).await {
                    Ok(c) => c,
                    Err(reason) => {
                        return all(
                            t.rcpts.len(),
                            Outcome::Deferred(Reply::local(451, format!("4.4.1 back-end {}: {reason}", backend.name))),
                        );
                    }
                },
            };
            let (finished, reusable) = conn.deliver(t.clone(), content).await;
            if reusable && conn.messages < self.settings.max_messages {
                pool.idle.lock().unwrap_or_else(|p| p.into_inner()).push((conn, Instant::now()));
            } else {
                conn.quit().await;
            }
            if was_reused && !finished.sent_mail && !reusable {
                continue;
            }
            return finished;
        }
        all(
            t.rcpts.len(),
            Outcome::Deferred(Reply::local(451, format!("4.4.2 back-end {}: sessions keep failing", backend.name))),
        )
    }

    /// Closes idle sessions past the idle timeout (called periodically).
    pub async fn close_idle(&self) {
        let pools: Vec<Arc<Pool>> = self.pools.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for pool in pools {
            let stale: Vec<Connection> = {
                let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
                let (old, keep): (Vec<_>, Vec<_>) =
                    idle.drain(..).partition(|(_, since)| since.elapsed() >= self.settings.idle_timeout);
                *idle = keep;
                old.into_iter().map(|(c, _)| c).collect()
            };
            for c in stale {
                c.quit().await;
            }
        }
    }

    /// Closes every idle session (at shutdown).
    pub async fn close_all(&self) {
        let pools: Vec<Arc<Pool>> = self.pools.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for pool in pools {
            let conns: Vec<Connection> =
                pool.idle.lock().unwrap_or_else(|p| p.into_inner()).drain(..).map(|(c, _)| c).collect();
            for c in conns {
                c.quit().await;
            }
        }
    }
}

/// The most recently used idle session still within the idle timeout; older ones are dropped
/// (closed without QUIT: the server has likely closed them already).
fn take_idle(pool: &Pool, idle_timeout: Duration) -> Option<Connection> {
    let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
    while let Some((conn, since)) = idle.pop() {
        if since.elapsed() < idle_timeout {
            return Some(conn);
        }
    }
    None
}
