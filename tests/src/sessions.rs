//! A per-session SMTP client for tests that must attribute each failure: every session records
//! which back-end answered (the host name in its `220` greeting; the lab's sinks greet with their
//! back-end's name) and how it ended. smtp-source cannot do this: it reports totals, and gives up
//! on its first fatal error, tearing down the sessions it has open to healthy back-ends too.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::Netns;

/// How one session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// When the session's connect() was issued.
    pub started: Instant,
    /// Back-end name from the greeting (None when no greeting arrived).
    pub backend: Option<String>,
    /// None when the message was accepted and QUIT answered.
    pub error: Option<String>,
}

/// Options for [`run_sessions`].
#[derive(Debug, Clone)]
pub struct SessionOpts {
    pub sessions: u32,
    pub concurrency: u32,
    pub body_size: usize,
    /// Per-operation timeout (connect, each reply).
    pub timeout: Duration,
    /// Upper bound on the whole run.
    pub deadline: Duration,
}

impl Default for SessionOpts {
    fn default() -> Self {
        SessionOpts {
            sessions: 100,
            concurrency: 10,
            body_size: 1024,
            timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(120),
        }
    }
}

/// Lets another thread follow a run and end it: tests act mid-run after N sessions, then keep
/// the load going for M more, whatever the machine's speed.
#[derive(Debug, Default)]
pub struct Progress {
    /// Sessions finished so far.
    pub done: AtomicU32,
    /// Set to end the run (sessions in flight finish).
    pub stop: AtomicBool,
}

impl Progress {
    /// Waits (at most `max`) until `n` sessions have finished; returns the count reached.
    pub fn wait_done(&self, n: u32, max: Duration) -> u32 {
        let deadline = Instant::now() + max;
        while self.done.load(Ordering::Relaxed) < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.done.load(Ordering::Relaxed)
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs up to `opts.sessions` full SMTP transactions (EHLO, MAIL, RCPT, DATA, QUIT) against
/// `target` from namespace `ns`, `opts.concurrency` at a time, until `progress.stop` is set;
/// returns one outcome per session started.
pub fn run_sessions(ns: &Netns, target: SocketAddr, opts: &SessionOpts, progress: &Progress) -> Result<Vec<Outcome>> {
    let next = AtomicU32::new(0);
    let stop_at = Instant::now() + opts.deadline;
    let body: String = "x".repeat(opts.body_size.max(1));
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..opts.concurrency.max(1) {
            s.spawn(|| {
                // Each worker joins the namespace once; its sockets live there.
                let Ok(_guard) = ns.enter() else { return };
                while !progress.stop.load(Ordering::Relaxed)
                    && next.fetch_add(1, Ordering::Relaxed) < opts.sessions
                    && Instant::now() < stop_at
                {
                    let outcome = one_session(target, opts.timeout, &body);
                    results.lock().unwrap_or_else(|e| e.into_inner()).push(outcome);
                    progress.done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    Ok(results.into_inner().unwrap_or_else(|e| e.into_inner()))
}

fn one_session(target: SocketAddr, timeout: Duration, body: &str) -> Outcome {
    let started = Instant::now();
    let mut backend = None;
    let result = (|| -> std::result::Result<(), String> {
        let stream = TcpStream::connect_timeout(&target, timeout).map_err(|e| format!("connect: {e}"))?;
        stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        stream.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        let mut w = stream.try_clone().map_err(|e| e.to_string())?;
        let mut r = BufReader::new(stream);
        let greeting = reply(&mut r)?;
        if !greeting.starts_with("220") {
            return Err(format!("greeting: {greeting}"));
        }
        backend = greeting.get(4..).and_then(|g| g.split_whitespace().next()).map(str::to_string);
        for (cmd, want) in [
            ("EHLO client.example.com".to_string(), "250"),
            ("MAIL FROM:<sender@example.com>".to_string(), "250"),
            ("RCPT TO:<rcpt@example.net>".to_string(), "250"),
            ("DATA".to_string(), "354"),
            (format!("Subject: test\r\n\r\n{body}\r\n."), "250"),
            ("QUIT".to_string(), "221"),
        ] {
            w.write_all(format!("{cmd}\r\n").as_bytes()).map_err(|e| format!("send: {e}"))?;
            let r = reply(&mut r)?;
            if !r.starts_with(want) {
                return Err(format!("{}: {r}", cmd.split_whitespace().next().unwrap_or("")));
            }
        }
        Ok(())
    })();
    Outcome { started, backend, error: result.err() }
}

/// Reads one reply (possibly multi-line); returns its last line.
fn reply(r: &mut BufReader<TcpStream>) -> std::result::Result<String, String> {
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => return Err("connection closed".into()),
            Ok(_) if line.len() >= 4 && line.as_bytes()[3] == b' ' => return Ok(line.trim_end().to_string()),
            Ok(_) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}
