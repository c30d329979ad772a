//! Bounded command execution and guarded background processes.
//!
//! Every external command the lab runs has a time limit, and every background process is owned
//! by a [`Daemon`] that kills its whole process group on drop (also while unwinding from a panic).

use anyhow::{Context, Result, bail};
use std::io::Read;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Default limit for short configuration commands (`ip`, `ethtool`, ...).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(20);
/// How much of a daemon's output is kept (the tail), for error messages.
const LOG_TAIL: usize = 64 * 1024;

fn drain<R: Read + Send + 'static>(mut r: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Waits for `child` up to `timeout`; kills it (and its process group if it leads one) on
/// expiry. Returns `None` on timeout.
fn wait_bounded(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut nap = Duration::from_millis(1);
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(20));
    }
}

/// Runs `cmd` to completion with captured stdout/stderr, killing it after `timeout`.
/// Does not check the exit status (see [`run_checked`]).
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<(Output, bool)> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    let out = drain(child.stdout.take().expect("piped"));
    let err = drain(child.stderr.take().expect("piped"));
    let status = wait_bounded(&mut child, timeout)?;
    let timed_out = status.is_none();
    let status = match status {
        Some(s) => s,
        None => child.wait()?,
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ok((
        Output {
            status,
            stdout,
            stderr,
        },
        timed_out,
    ))
}

/// Runs `cmd` (bounded by `timeout`), failing unless it exits 0; returns its stdout.
pub fn run_checked(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let shown = format!("{cmd:?}");
    let (out, timed_out) = run_bounded(cmd, timeout)?;
    if timed_out {
        bail!("{shown} timed out after {timeout:?}");
    }
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Something that consumes a daemon's stdout line by line (lines end with `\n` or `\r`).
pub type LineSink = Box<dyn FnMut(&str) + Send + 'static>;

/// A background process, killed with its whole process group when dropped.
///
/// Its stdout and stderr are collected (the last 64 KiB) for [`Daemon::log`], unless stdout is
/// handed to a [`LineSink`].
pub struct Daemon {
    label: String,
    child: Option<Child>,
    log: Arc<Mutex<Vec<u8>>>,
    readers: Vec<thread::JoinHandle<()>>,
}

fn collect<R: Read + Send + 'static>(
    mut r: R,
    log: Arc<Mutex<Vec<u8>>>,
    mut lines: Option<LineSink>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut pending = Vec::new();
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            if let Some(f) = lines.as_mut() {
                for &b in chunk {
                    if b == b'\n' || b == b'\r' {
                        if !pending.is_empty() {
                            f(&String::from_utf8_lossy(&pending));
                            pending.clear();
                        }
                    } else {
                        pending.push(b);
                    }
                }
            } else {
                let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                log.extend_from_slice(chunk);
                if log.len() > LOG_TAIL {
                    let cut = log.len() - LOG_TAIL;
                    log.drain(..cut);
                }
            }
        }
        if let Some(f) = lines.as_mut()
            && !pending.is_empty()
        {
            f(&String::from_utf8_lossy(&pending));
        }
    })
}

impl Daemon {
    /// Spawns `cmd` in its own process group. With `stdout_lines`, stdout goes to that sink
    /// instead of the log.
    pub fn spawn(label: &str, mut cmd: Command, stdout_lines: Option<LineSink>) -> Result<Daemon> {
        use std::os::unix::process::CommandExt;
        let shown = format!("{cmd:?}");
        let mut child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {label}: {shown}"))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(
                child.stdout.take().expect("piped"),
                log.clone(),
                stdout_lines,
            ),
            collect(child.stderr.take().expect("piped"), log.clone(), None),
        ];
        Ok(Daemon {
            label: label.to_string(),
            child: Some(child),
            log,
            readers,
        })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Process id (also its process-group id).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// The collected output so far (tail), lossily decoded.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends `sig` to the daemon's process group.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: plain kill(2) on a process group we created.
            unsafe {
                libc::kill(-(c.id() as i32), sig);
            }
        }
    }

    /// SIGTERM to the process group, wait up to `grace`, then SIGKILL. Returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let st = match child.try_wait() {
            Ok(Some(st)) => Some(st),
            _ => {
                // SAFETY: kill(2) on our own process group.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGTERM) };
                let st = wait_bounded(&mut child, grace).ok().flatten();
                // Whatever is left of the group (children of a shell, say) goes too.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                st.or_else(|| child.wait().ok())
            }
        };
        // The reader threads end when the pipes close; they are not joined, so a process that
        // escaped the group and keeps a pipe open cannot hang the caller.
        self.readers.clear();
        st
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
    }
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("label", &self.label)
            .field("pid", &self.pid())
            .finish()
    }
}
