//! Postfix's test programs as lab peers: `smtp-sink` back-ends that count what they receive, and
//! an `smtp-source` load generator with a bounded run time.
//!
//! ## How sessions are counted
//! Each sink runs `smtp-sink -c`, which prints running counters `sess=N quit=N mesg=N` (separated
//! by `\r`) on stdout every time a session ends, a QUIT is executed or a message's final "." is
//! received. The lab reads that stream and keeps the last value, so counts are exact and need no
//! disk I/O. `smtp-sink` binds one address family per socket (`[::]` is IPv6-only), so a sink is
//! two processes, `0.0.0.0:PORT` and `[::]:PORT`; [`SmtpSink::counts`] sums them, and
//! [`SmtpSink::counts_by_family`] keeps them apart. A session is counted when it ENDS on the
//! sink side, which can be slightly after `smtp-source` exits: use [`SmtpSink::wait_sessions`]
//! or [`crate::Lab::wait_sessions`] rather than reading the counters right away.

use crate::lab::cmd::Daemon;
use crate::lab::netns::Netns;
use crate::lab::topology::AddrFamily;
use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What one sink has received.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SinkCounts {
    /// SMTP sessions that ended (any way: QUIT, disconnect, timeout).
    pub sessions: u64,
    /// QUIT commands executed.
    pub quits: u64,
    /// Messages received (final "." of DATA).
    pub messages: u64,
}

impl std::ops::Add for SinkCounts {
    type Output = SinkCounts;
    fn add(self, o: SinkCounts) -> SinkCounts {
        SinkCounts {
            sessions: self.sessions + o.sessions,
            quits: self.quits + o.quits,
            messages: self.messages + o.messages,
        }
    }
}

fn parse_counters(line: &str) -> Option<SinkCounts> {
    let mut c = SinkCounts::default();
    let mut seen = 0;
    for kv in line.split_whitespace() {
        let (k, v) = kv.split_once('=')?;
        let v: u64 = v.parse().ok()?;
        match k {
            "sess" => c.sessions = v,
            "quit" => c.quits = v,
            "mesg" => c.messages = v,
            _ => continue,
        }
        seen += 1;
    }
    (seen == 3).then_some(c)
}

/// Options for [`SmtpSink::start`].
#[derive(Clone, Debug)]
pub struct SinkOpts {
    /// TCP port on 0.0.0.0 and [::].
    pub port: u16,
    /// `listen(2)` backlog and smtp-sink's `-m` concurrency bound.
    pub backlog: u32,
    /// Name in the greeting/EHLO reply (`-h`), e.g. the back-end's name, so a client can tell
    /// which back-end answered.
    pub hostname: Option<String>,
    /// Extra smtp-sink options (e.g. `["-L"]` for LMTP, `["-w", "1"]` to delay DATA replies).
    pub extra: Vec<String>,
}

impl Default for SinkOpts {
    fn default() -> Self {
        SinkOpts {
            port: 25,
            backlog: 1024,
            hostname: None,
            extra: Vec::new(),
        }
    }
}

/// A running `smtp-sink` pair (IPv4 + IPv6) in one namespace, counting sessions and messages.
/// Killed on drop.
pub struct SmtpSink {
    port: u16,
    // (family, counters, process)
    procs: Vec<(AddrFamily, Arc<Mutex<SinkCounts>>, Daemon)>,
}

impl SmtpSink {
    /// Starts smtp-sink on `0.0.0.0:PORT` and `[::]:PORT` inside `ns` and waits (≤ 5 s) until
    /// both listen.
    pub fn start(ns: &Netns, opts: &SinkOpts) -> Result<SmtpSink> {
        let mut procs = Vec::new();
        for fam in AddrFamily::ALL {
            let listen = match fam {
                AddrFamily::V4 => format!("0.0.0.0:{}", opts.port),
                AddrFamily::V6 => format!("[::]:{}", opts.port),
            };
            let m = opts.backlog.to_string();
            let mut args: Vec<&str> = vec!["smtp-sink", "-u", "nobody", "-c", "-m", &m];
            if let Some(h) = &opts.hostname {
                args.extend(["-h", h]);
            }
            args.extend(opts.extra.iter().map(String::as_str));
            args.extend([listen.as_str(), m.as_str()]);
            let counts = Arc::new(Mutex::new(SinkCounts::default()));
            let c2 = counts.clone();
            let label = format!("smtp-sink {listen} in {}", ns.name());
            let d = ns.spawn_with_stdout(
                &label,
                &args,
                Box::new(move |line| {
                    if let Some(c) = parse_counters(line) {
                        *c2.lock().unwrap_or_else(|e| e.into_inner()) = c;
                    }
                }),
            )?;
            procs.push((fam, counts, d));
        }
        let mut sink = SmtpSink {
            port: opts.port,
            procs,
        };
        sink.wait_listening(ns, Duration::from_secs(5))?;
        Ok(sink)
    }

    fn wait_listening(&mut self, ns: &Netns, timeout: Duration) -> Result<()> {
        let port = self.port;
        let deadline = Instant::now() + timeout;
        loop {
            let (v4, v6) = ns.run(move || (listening("tcp", port), listening("tcp6", port)))?;
            if v4 && v6 {
                return Ok(());
            }
            for (_, _, d) in &mut self.procs {
                if let Some(st) = d.exited() {
                    bail!("{} exited ({st}): {}", d.label(), d.log().trim());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "smtp-sink in {} not listening on port {port} after {timeout:?}",
                    ns.name()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Process ids of the sink processes (IPv4 and IPv6 listener).
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|(_, _, d)| d.pid()).collect()
    }

    /// Counts over both address families.
    pub fn counts(&self) -> SinkCounts {
        self.procs
            .iter()
            .fold(SinkCounts::default(), |acc, (_, c, _)| {
                acc + *c.lock().unwrap_or_else(|e| e.into_inner())
            })
    }

    /// Counts of the listener of one family.
    pub fn counts_by_family(&self, fam: AddrFamily) -> SinkCounts {
        self.procs
            .iter()
            .filter(|(f, _, _)| *f == fam)
            .fold(SinkCounts::default(), |acc, (_, c, _)| {
                acc + *c.lock().unwrap_or_else(|e| e.into_inner())
            })
    }

    /// Waits until at least `n` sessions have ended here (≤ `timeout`); returns the counts.
    pub fn wait_sessions(&self, n: u64, timeout: Duration) -> Result<SinkCounts> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.counts();
            if c.sessions >= n {
                return Ok(c);
            }
            if Instant::now() >= deadline {
                bail!("sink saw {c:?} after {timeout:?}, expected {n} sessions");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The sink processes' output (warnings, errors), for diagnostics.
    pub fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|(_, _, d)| format!("[{}]\n{}", d.label(), d.log()))
            .collect()
    }
}

/// Is something LISTENing on `port` in `/proc/thread-self/net/{tcp,tcp6}` (of the calling
/// thread's namespace)?
/// Whether a TCP socket listens on `port` in the calling thread's namespace (`table` is
/// `tcp` or `tcp6`, as in /proc/net).
pub(crate) fn listening(table: &str, port: u16) -> bool {
    let Ok(s) = std::fs::read_to_string(format!("/proc/thread-self/net/{table}")) else {
        return false;
    };
    let want = format!(":{port:04X}");
    s.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
    })
}

/// Options for [`smtp_source`].
#[derive(Clone, Debug)]
pub struct SourceOpts {
    /// Sessions (= messages, one per session unless `reuse`): smtp-source `-m`.
    pub sessions: u32,
    /// Parallel sessions: smtp-source `-s`.
    pub concurrency: u32,
    /// Message payload size in bytes: `-l`.
    pub msg_size: usize,
    /// Recipients per message: `-r`.
    pub recipients: u32,
    pub from: String,
    pub to: String,
    /// Send all messages over the same connections (`-d`): then `sessions` counts messages.
    pub reuse: bool,
    /// Speak LMTP (`-L`).
    pub lmtp: bool,
    /// Hard limit on the run; smtp-source is killed after it.
    pub timeout: Duration,
    /// Extra smtp-source options.
    pub extra: Vec<String>,
}

impl Default for SourceOpts {
    fn default() -> Self {
        SourceOpts {
            sessions: 100,
            concurrency: 10,
            msg_size: 1024,
            recipients: 1,
            from: "sender@example.com".into(),
            to: "rcpt@example.net".into(),
            reuse: false,
            lmtp: false,
            timeout: Duration::from_secs(20),
            extra: Vec::new(),
        }
    }
}

/// What an smtp-source run did.
#[derive(Clone, Debug)]
pub struct SourceResult {
    pub target: SocketAddr,
    /// Sessions asked for (`-m`).
    pub sessions: u32,
    /// DATA transactions completed, from smtp-source's `-c` running counter.
    pub completed: u64,
    /// Exit code (`None` if killed).
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    /// `smtp-source: warning: ...` lines (one per failed session or protocol error).
    pub warnings: Vec<String>,
    /// The `smtp-source: fatal: ...` line, if it gave up.
    pub fatal: Option<String>,
    pub elapsed: Duration,
    /// Full stderr, for diagnostics.
    pub stderr: String,
}

impl SourceResult {
    /// Exited 0, in time, with no warning.
    pub fn ok(&self) -> bool {
        self.exit_code == Some(0)
            && !self.timed_out
            && self.warnings.is_empty()
            && self.fatal.is_none()
    }

    /// Number of problems detected: warnings, plus one for a fatal error, a timeout or a
    /// non-zero exit.
    pub fn failures(&self) -> usize {
        self.warnings.len()
            + usize::from(self.fatal.is_some() || self.timed_out || self.exit_code != Some(0))
    }

    /// Panics with the details unless [`SourceResult::ok`].
    #[track_caller]
    pub fn assert_ok(&self) {
        assert!(
            self.ok(),
            "smtp-source to {} failed: {self:#?}",
            self.target
        );
    }
}

/// Formats `addr` as smtp-source/smtp-sink want it: `1.2.3.4:25` or `[2001:db8::1]:25`.
pub fn postfix_endpoint(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    }
}

/// Runs `smtp-source` inside `ns` against `target`, killed after `opts.timeout`.
pub fn smtp_source(ns: &Netns, target: SocketAddr, opts: &SourceOpts) -> Result<SourceResult> {
    let (m, s, l, r) = (
        opts.sessions.to_string(),
        opts.concurrency.max(1).to_string(),
        opts.msg_size.to_string(),
        opts.recipients.max(1).to_string(),
    );
    let endpoint = postfix_endpoint(target);
    let mut args: Vec<&str> = vec![
        "smtp-source",
        "-c",
        "-m",
        &m,
        "-s",
        &s,
        "-l",
        &l,
        "-r",
        &r,
        "-f",
        &opts.from,
        "-t",
        &opts.to,
    ];
    args.push(if target.is_ipv4() { "-4" } else { "-6" });
    if opts.reuse {
        args.push("-d");
    }
    if opts.lmtp {
        args.push("-L");
    }
    args.extend(opts.extra.iter().map(String::as_str));
    args.push(&endpoint);
    let start = Instant::now();
    let (out, timed_out) = ns
        .exec_output(&args, opts.timeout)
        .with_context(|| format!("smtp-source in {}", ns.name()))?;
    let elapsed = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // `-c` prints the running counter, one number per completed DATA, separated by \r.
    let completed = stdout
        .split(['\r', '\n'])
        .filter_map(|t| t.trim().parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let warnings = stderr
        .lines()
        .filter(|l| l.contains("warning:"))
        .map(str::to_string)
        .collect();
    let fatal = stderr
        .lines()
        .find(|l| l.contains("fatal:"))
        .map(str::to_string);
    Ok(SourceResult {
        target,
        sessions: opts.sessions,
        completed,
        exit_code: out.status.code(),
        timed_out,
        warnings,
        fatal,
        elapsed,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse() {
        assert_eq!(
            parse_counters("sess=12 quit=11 mesg=10"),
            Some(SinkCounts {
                sessions: 12,
                quits: 11,
                messages: 10
            })
        );
        assert_eq!(parse_counters("smtp-sink: warning: x"), None);
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            postfix_endpoint("198.18.0.11:25".parse().unwrap()),
            "198.18.0.11:25"
        );
        assert_eq!(
            postfix_endpoint("[2001:db8::11]:25".parse().unwrap()),
            "[2001:db8::11]:25"
        );
    }
}
