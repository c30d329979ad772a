//! `mxlb agent`: runs on each mail server and tells load balancers how loaded it is.
//!
//! It answers in HAProxy's agent-check format, so HAProxy can use it as well as mxlb: a client
//! that connects and sends nothing (HAProxy's agent check) gets one line and the connection is
//! closed, e.g. `up ready 75% maxconn:300`, `drain`, or `down #disk 97% >= 95%`. A client that
//! sends `detail` (one line) or `GET /detail` (HTTP) gets the raw figures as JSON.
//!
//! The figures: mail queue length (files in Postfix's queue directories, or the number a
//! configured command prints, e.g. `exim -bpc`), utilisation of the spool file system, the
//! 1-minute load average and the run queue. The policy turning them into a verdict
//! ([`verdict`]) is pure and unit-tested: at or over the queue or disk limit the server asks to
//! be drained (no new sessions, established ones finish); below, its weight falls with load
//! and queue, so it is steered around before it is full.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::{info, warn};

/// What the agent measures and where its limits are.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub listen: SocketAddr,
    /// Postfix queue directory (`incoming`, `active`, `deferred`, `hold`, `maildrop` below it).
    pub spool: PathBuf,
    /// Instead of counting files: a shell command printing the queue length.
    pub queue_command: Option<String>,
    /// File system whose utilisation counts (default: the spool's).
    pub disk: Option<PathBuf>,
    /// Queue length at which the server asks to be drained.
    pub max_queue: u64,
    /// Disk utilisation (percent) at which the server asks to be drained.
    pub max_disk_pct: f64,
    /// Load average per CPU at which the weight reaches its floor.
    pub max_load_per_cpu: f64,
    /// Passed on as `maxconn:N` when set.
    pub maxconn: Option<u32>,
    /// Where this server's mailbox list comes from (`mailboxes` requests); `None`: not exported.
    pub mailboxes: Option<crate::mailbox::learn::MailboxSource>,
}

/// The raw figures (`detail`): also what load balancers read back ([`crate::policy`]).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Figures {
    pub queue: u64,
    pub disk_used_pct: f64,
    pub load1: f64,
    pub run_queue: u32,
    pub cpus: u32,
    /// The agent-check line these figures produce.
    pub reply: String,
}

/// What the server asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Take sessions, at this share of the configured weight (1..=100).
    Up { percent: u32 },
    /// No new sessions; established ones finish.
    Drain { reason: String },
    /// Cannot serve.
    Down { reason: String },
}

impl Verdict {
    /// The agent-check line (with trailing newline). `ready` cancels an earlier `drain` in
    /// HAProxy, which otherwise keeps a drained server at weight 0 whatever the percentage.
    pub fn agent_line(&self, maxconn: Option<u32>) -> String {
        let maxconn = maxconn.map(|m| format!(" maxconn:{m}")).unwrap_or_default();
        match self {
            Verdict::Up { percent } => format!("up ready {percent}%{maxconn}\n"),
            Verdict::Drain { .. } => "drain\n".to_string(),
            Verdict::Down { reason } => format!("down #{}\n", reason.replace(['\r', '\n'], " ")),
        }
    }
}

/// The policy: drain at the queue or disk limit; otherwise a weight share that falls linearly
/// with load per CPU and with queue length (the worse of the two), never below 1%.
pub fn verdict(queue: u64, disk_used_pct: f64, load1: f64, cpus: u32, s: &AgentSettings) -> Verdict {
    if disk_used_pct >= s.max_disk_pct {
        return Verdict::Drain { reason: format!("disk {disk_used_pct:.0}% >= {:.0}%", s.max_disk_pct) };
    }
    if queue >= s.max_queue {
        return Verdict::Drain { reason: format!("queue {queue} >= {}", s.max_queue) };
    }
    let load_factor = 1.0 - (load1 / cpus.max(1) as f64) / s.max_load_per_cpu;
    let queue_factor = 1.0 - queue as f64 / s.max_queue as f64;
    let share = load_factor.min(queue_factor).clamp(0.01, 1.0);
    Verdict::Up { percent: (share * 100.0).round() as u32 }
}

/// Files in Postfix's queues (hashed subdirectories included).
pub fn count_postfix_queue(spool: &Path) -> std::io::Result<u64> {
    fn files(dir: &Path, depth: u32) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
        entries
            .flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_file() => 1,
                Ok(t) if t.is_dir() && depth < 4 => files(&e.path(), depth + 1),
                _ => 0,
            })
            .sum()
    }
    if !spool.is_dir() {
        return Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("{}: no such queue directory", spool.display())));
    }
    Ok(["maildrop", "incoming", "active", "deferred", "hold"].iter().map(|q| files(&spool.join(q), 0)).sum())
}

/// Used share of a file system, in percent (as `df` computes it: used / (used + available)).
pub fn disk_used_pct(path: &Path) -> std::io::Result<f64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs writes into the zeroed struct; c is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let used = (st.f_blocks - st.f_bfree) as f64;
    let avail = st.f_bavail as f64;
    Ok(if used + avail > 0.0 { 100.0 * used / (used + avail) } else { 0.0 })
}

/// `/proc/loadavg` → (1-minute load, runnable tasks).
pub fn parse_loadavg(text: &str) -> Option<(f64, u32)> {
    let mut f = text.split_whitespace();
    let load1 = f.next()?.parse().ok()?;
    let running = f.nth(2)?.split('/').next()?.parse().ok()?;
    Some((load1, running))
}

/// Asks the agent at `addr` for its figures (`detail`), bounded by `timeout`.
pub async fn fetch(addr: SocketAddr, timeout: Duration) -> Result<Figures, String> {
    let ask = async {
        let mut c = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        c.write_all(b"detail\n").await.map_err(|e| format!("send: {e}"))?;
        let mut out = Vec::new();
        (&mut c).take(64 * 1024).read_to_end(&mut out).await.map_err(|e| format!("read: {e}"))?;
        serde_json::from_slice(&out).map_err(|e| format!("not an mxlb agent reply: {e}"))
    };
    tokio::time::timeout(timeout, ask).await.map_err(|_| "timed out".to_string())?
}

/// Measures everything now (blocking file-system work: call from a blocking context).
pub fn measure(s: &AgentSettings) -> Figures {
    let queue = match &s.queue_command {
        Some(cmd) => std::process::Command::new("sh")
            .args(["-c", cmd])
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()),
        None => count_postfix_queue(&s.spool).ok(),
    };
    let disk = disk_used_pct(s.disk.as_deref().unwrap_or(&s.spool)).ok();
    let (load1, run_queue) = std::fs::read_to_string("/proc/loadavg").ok().and_then(|t| parse_loadavg(&t)).unwrap_or((0.0, 0));
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let v = match (queue, disk) {
        (Some(q), Some(d)) => verdict(q, d, load1, cpus, s),
        (None, _) => Verdict::Down { reason: "cannot measure the mail queue".into() },
        (_, None) => Verdict::Down { reason: "cannot measure the spool file system".into() },
    };
    Figures {
        queue: queue.unwrap_or(0),
        disk_used_pct: disk.unwrap_or(0.0),
        load1,
        run_queue,
        cpus,
        reply: v.agent_line(s.maxconn),
    }
}

/// How long a client has to send a request before it is taken for HAProxy's agent check,
/// which sends nothing and waits for the line.
const REQUEST_WAIT: Duration = Duration::from_millis(30);

/// Serves until `stop` resolves.
pub async fn serve(s: AgentSettings, stop: impl std::future::Future<Output = ()>) -> std::io::Result<()> {
    let listener = TcpListener::bind(s.listen).await?;
    info!(listen = %s.listen, spool = %s.spool.display(), "mxlb agent listening");
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let s = s.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &s).await {
                        warn!(%peer, error = %e, "agent connection");
                    }
                });
            }
        }
    }
}

async fn answer(mut stream: TcpStream, s: &AgentSettings) -> std::io::Result<()> {
    let mut buf = [0u8; 256];
    let n = match tokio::time::timeout(REQUEST_WAIT, stream.read(&mut buf)).await {
        Ok(r) => r?,
        Err(_) => 0,
    };
    let request = String::from_utf8_lossy(&buf[..n]);
    if request.trim() == "mailboxes" || request.starts_with("GET /mailboxes") {
        return answer_mailboxes(stream, s, request.starts_with("GET ")).await;
    }
    let settings = s.clone();
    let figures = tokio::task::spawn_blocking(move || measure(&settings)).await.map_err(std::io::Error::other)?;
    let out = if request.starts_with("GET /detail") {
        let body = serde_json::to_string(&figures).map_err(std::io::Error::other)?;
        format!("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
    } else if request.trim() == "detail" {
        serde_json::to_string(&figures).map_err(std::io::Error::other)? + "\n"
    } else {
        figures.reply
    };
    tokio::time::timeout(Duration::from_secs(5), stream.write_all(out.as_bytes()))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "client does not read"))??;
    stream.shutdown().await
}

/// The mailbox list (JSON, [`crate::mailbox::learn::MailboxList`]), plain or as an HTTP reply.
/// A failed listing closes the connection without a list, so load balancers keep the last one.
async fn answer_mailboxes(mut stream: TcpStream, s: &AgentSettings, http: bool) -> std::io::Result<()> {
    let Some(source) = s.mailboxes.clone() else {
        let msg = "this agent exports no mailbox list (start it with --mailboxes)";
        let out = match http {
            true => format!("HTTP/1.0 404 Not Found\r\nContent-Length: {}\r\n\r\n{msg}", msg.len()),
            false => format!("{msg}\n"),
        };
        stream.write_all(out.as_bytes()).await?;
        return stream.shutdown().await;
    };
    let listed = tokio::task::spawn_blocking(move || source.list()).await.map_err(std::io::Error::other)?;
    let out = match listed {
        Ok(mailboxes) => {
            let body = serde_json::to_vec(&crate::mailbox::learn::MailboxList { mailboxes }).map_err(std::io::Error::other)?;
            let mut out = match http {
                true => format!("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes(),
                false => Vec::new(),
            };
            out.extend_from_slice(&body);
            out
        }
        Err(e) => {
            warn!(error = %e, "mailbox list");
            match http {
                true => format!("HTTP/1.0 500 Internal Server Error\r\nContent-Length: {}\r\n\r\n{e}", e.len()).into_bytes(),
                false => format!("cannot list mailboxes: {e}\n").into_bytes(),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), stream.write_all(&out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "client does not read"))??;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AgentSettings {
        AgentSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            spool: PathBuf::from("/nonexistent"),
            queue_command: None,
            disk: None,
            max_queue: 1000,
            max_disk_pct: 95.0,
            max_load_per_cpu: 2.0,
            maxconn: Some(300),
            mailboxes: None,
        }
    }

    #[test]
    fn policy_drains_at_limits_and_scales_below() {
        let s = settings();
        assert_eq!(verdict(0, 10.0, 0.0, 2, &s), Verdict::Up { percent: 100 });
        assert_eq!(verdict(250, 10.0, 0.0, 2, &s), Verdict::Up { percent: 75 });
        // load 2 on 2 CPUs = 1 per CPU, half of the 2-per-CPU ceiling.
        assert_eq!(verdict(0, 10.0, 2.0, 2, &s), Verdict::Up { percent: 50 });
        // The worse factor wins; the floor is 1%.
        assert_eq!(verdict(900, 10.0, 2.0, 2, &s), Verdict::Up { percent: 10 });
        assert_eq!(verdict(0, 10.0, 40.0, 2, &s), Verdict::Up { percent: 1 });
        assert!(matches!(verdict(1000, 10.0, 0.0, 2, &s), Verdict::Drain { reason } if reason == "queue 1000 >= 1000"));
        assert!(matches!(verdict(0, 97.0, 0.0, 2, &s), Verdict::Drain { reason } if reason == "disk 97% >= 95%"));
    }

    #[test]
    fn agent_lines_follow_haproxy_format() {
        assert_eq!(Verdict::Up { percent: 75 }.agent_line(Some(300)), "up ready 75% maxconn:300\n");
        assert_eq!(Verdict::Up { percent: 100 }.agent_line(None), "up ready 100%\n");
        assert_eq!(Verdict::Drain { reason: "x".into() }.agent_line(Some(3)), "drain\n");
        assert_eq!(Verdict::Down { reason: "no\nspool".into() }.agent_line(None), "down #no spool\n");
    }

    #[test]
    fn counts_postfix_queues_including_hashed_dirs() {
        let dir = std::env::temp_dir().join(format!("mxlb-agent-q-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (sub, n) in [("incoming", 2), ("active", 3), ("deferred/A/B", 4), ("hold", 1), ("corrupt", 9)] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
            for i in 0..n {
                std::fs::write(dir.join(sub).join(format!("m{i}")), b"x").unwrap();
            }
        }
        assert_eq!(count_postfix_queue(&dir).unwrap(), 10, "corrupt/ is not a queue");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(count_postfix_queue(&dir).is_err());
    }

    #[test]
    fn parses_loadavg_and_measures_disk() {
        assert_eq!(parse_loadavg("0.52 0.58 0.59 3/345 12345\n"), Some((0.52, 3)));
        assert_eq!(parse_loadavg("garbage"), None);
        let pct = disk_used_pct(Path::new("/")).unwrap();
        assert!((0.0..=100.0).contains(&pct));
    }

    #[test]
    fn an_unmeasurable_queue_reports_down() {
        let f = measure(&settings());
        assert!(f.reply.starts_with("down #cannot measure the mail queue"), "{}", f.reply);
    }

    #[tokio::test]
    async fn answers_agent_check_detail_and_http() {
        let dir = std::env::temp_dir().join(format!("mxlb-agent-s-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("active")).unwrap();
        for i in 0..250 {
            std::fs::write(dir.join("active").join(format!("m{i}")), b"x").unwrap();
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        // The build machine's own disk and load must not decide the verdict under test.
        let s = AgentSettings { listen: addr, spool: dir.clone(), max_load_per_cpu: 1e9, max_disk_pct: 100.0, ..settings() };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(s, async move {
            let _ = rx.await;
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ask = |req: &'static [u8]| async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(req).await.unwrap();
            let mut out = String::new();
            tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut out)).await.unwrap().unwrap();
            out
        };
        assert_eq!(ask(b"").await, "up ready 75% maxconn:300\n", "agent check: nothing sent, one line back");
        let detail: serde_json::Value = serde_json::from_str(&ask(b"detail\n").await).unwrap();
        assert_eq!(detail["queue"], 250);
        let http = ask(b"GET /detail HTTP/1.0\r\n\r\n").await;
        assert!(http.starts_with("HTTP/1.0 200 OK\r\n") && http.contains("\"queue\":250"), "{http}");
        let _ = tx.send(());
        server.await.unwrap().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn exports_its_mailboxes_and_load_balancers_learn_them() {
        use crate::mailbox::{Directory, Existence, MailboxBackend, learn};
        let dir = std::env::temp_dir().join(format!("mxlb-agent-mb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let users = dir.join("users");
        std::fs::write(&users, "alice@example.org:{PLAIN}x:65534:65534::/m/a::\nBob@example.org:{PLAIN}y::\n").unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let s = AgentSettings {
            listen: addr,
            mailboxes: Some(learn::MailboxSource::PasswdFile(users.clone())),
            ..settings()
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(s, async move {
            let _ = rx.await;
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let timeout = Duration::from_secs(5);
        assert_eq!(learn::fetch(addr, timeout).await.unwrap(), vec!["alice@example.org", "Bob@example.org"]);
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /mailboxes HTTP/1.0\r\n\r\n").await.unwrap();
        let mut http = String::new();
        c.read_to_string(&mut http).await.unwrap();
        assert!(http.starts_with("HTTP/1.0 200 OK\r\n") && http.ends_with(r#"{"mailboxes":["alice@example.org","Bob@example.org"]}"#), "{http}");

        // An LB node's map learns them, and a user added to the file after the next refresh.
        let backend = MailboxBackend { name: "a".into(), address: addr.ip(), weight: 1, agent: Some(addr) };
        let d = Directory::new(vec![backend], None).unwrap();
        assert!(learn::refresh(&d).await.is_empty());
        assert_eq!(d.exists("bob@example.org"), Existence::Exists);
        assert_eq!(d.exists("carol@example.org"), Existence::Nowhere);
        std::fs::write(&users, "alice@example.org:x\nbob@example.org:y\ncarol@example.org:z\n").unwrap();
        learn::refresh(&d).await;
        assert_eq!(d.exists("carol@example.org"), Existence::Exists);
        // The list source breaks: the fetch fails, the last list stays.
        std::fs::remove_file(&users).unwrap();
        let errors = learn::refresh(&d).await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(d.exists("carol@example.org"), Existence::Exists);
        let _ = tx.send(());
        server.await.unwrap().unwrap();
        // A dead agent: a clear error, not a hang.
        let err = learn::fetch(addr, timeout).await.unwrap_err();
        assert!(err.starts_with("connect: "), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
