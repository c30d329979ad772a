//! Mailboxes learned from the back-ends, so that adding a user or a domain on any back-end
//! updates every LB node with no manual step.
//!
//! Back-end side: `mxlb agent --mailboxes SOURCE` lists the server's mailboxes from Dovecot
//! (`doveadm user '*'`), a Dovecot/Postfix-style passwd-file, or any command printing one
//! name per line ([`MailboxSource`]), and answers the request line `mailboxes` (or
//! `GET /mailboxes`) with them as JSON ([`MailboxList`]).
//!
//! LB side: [`refresh`] asks every back-end's agent; [`run`] does so every
//! `refresh_interval` and whenever [`Refresher::now`] is asked (`mxlb mailbox refresh`). A
//! failed fetch keeps the last good list: a back-end that is briefly unreachable does not make
//! its users unknown.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::{Notify, watch},
};
use tracing::{debug, warn};

use super::{Directory, valid_name};

/// Largest list an LB node accepts from one agent (about a million addresses).
pub const MAX_LIST_BYTES: u64 = 64 << 20;

/// Where an agent reads its server's mailboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailboxSource {
    /// `doveadm user '*'`: every user Dovecot's userdb can iterate.
    Doveadm,
    /// A passwd-file (`user:password:uid:gid:...`, Dovecot's format): the first field of each
    /// line that is not empty or a comment.
    PasswdFile(PathBuf),
    /// A shell command printing one mailbox per line.
    Command(String),
}

impl std::str::FromStr for MailboxSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            _ if s == "doveadm" => Ok(MailboxSource::Doveadm),
            Some(("passwd-file", p)) if !p.is_empty() => Ok(MailboxSource::PasswdFile(PathBuf::from(p))),
            Some(("command", c)) if !c.trim().is_empty() => Ok(MailboxSource::Command(c.to_string())),
            _ => Err(format!("`{s}`: expected `doveadm`, `passwd-file:PATH` or `command:CMD`")),
        }
    }
}

/// What an agent answers to `mailboxes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxList {
    pub mailboxes: Vec<String>,
}

/// Mailbox names in a passwd-file's text.
pub fn passwd_file_users(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(':').next())
        .filter(|u| valid_name(u))
        .map(str::to_string)
        .collect()
}

/// One name per line (doveadm's and a command's output); lines that are not names are skipped.
pub fn line_users(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|u| valid_name(u)).map(str::to_string).collect()
}

impl MailboxSource {
    /// Lists the mailboxes now (blocking: runs a command or reads a file).
    pub fn list(&self) -> Result<Vec<String>, String> {
        let run = |program: &str, args: &[&str]| -> Result<String, String> {
            let out = std::process::Command::new(program).args(args).output().map_err(|e| format!("{program}: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "{program} {}: {}: {}",
                    args.join(" "),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        match self {
            MailboxSource::Doveadm => run("doveadm", &["user", "*"]).map(|t| line_users(&t)),
            MailboxSource::Command(cmd) => run("sh", &["-c", cmd]).map(|t| line_users(&t)),
            MailboxSource::PasswdFile(p) => std::fs::read_to_string(p)
                .map(|t| passwd_file_users(&t))
                .map_err(|e| format!("{}: {e}", p.display())),
        }
    }
}

/// Asks the agent at `addr` for its mailbox list, bounded by `timeout` and [`MAX_LIST_BYTES`].
pub async fn fetch(addr: SocketAddr, timeout: Duration) -> Result<Vec<String>, String> {
    let ask = async {
        let mut c = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        c.write_all(b"mailboxes\n").await.map_err(|e| format!("send: {e}"))?;
        let mut out = Vec::new();
        (&mut c).take(MAX_LIST_BYTES + 1).read_to_end(&mut out).await.map_err(|e| format!("read: {e}"))?;
        if out.len() as u64 > MAX_LIST_BYTES {
            return Err(format!("list longer than {MAX_LIST_BYTES} bytes"));
        }
        let list: MailboxList =
            serde_json::from_slice(&out).map_err(|e| format!("not an mxlb agent mailbox list: {e}"))?;
        Ok(list.mailboxes)
    };
    tokio::time::timeout(timeout, ask).await.map_err(|_| "timed out".to_string())?
}

/// Fetches every reporting back-end's list once (concurrently) into `dir`; returns the errors
/// by back-end name.
pub async fn refresh(dir: &Directory) -> Vec<(String, String)> {
    let asks = dir.backends().iter().filter_map(|b| b.agent.map(|a| (b.name.clone(), a))).map(|(name, addr)| async move {
        (name, fetch(addr, dir.fetch_timeout).await)
    });
    let mut errors = Vec::new();
    for (name, result) in futures::future::join_all(asks).await {
        match result {
            Ok(list) => {
                debug!(backend = %name, mailboxes = list.len(), "mailbox list fetched");
                dir.set_reported(&name, list);
            }
            Err(e) => {
                warn!(backend = %name, error = %e, "mailbox list not fetched; the last one stays in use");
                dir.set_fetch_error(&name, e.clone());
                errors.push((name, e));
            }
        }
    }
    errors
}

/// Asks the refresher for a fetch now.
#[derive(Clone, Default)]
pub struct Refresher {
    wake: Arc<Notify>,
    done: Arc<watch::Sender<u64>>,
}

impl Refresher {
    /// Requests a refresh and waits (≤ `timeout`) until one has completed.
    pub async fn now(&self, timeout: Duration) -> bool {
        let mut done = self.done.subscribe();
        let before = *done.borrow_and_update();
        self.wake.notify_one();
        tokio::time::timeout(timeout, async {
            while *done.borrow_and_update() == before {
                if done.changed().await.is_err() {
                    return false;
                }
            }
            true
        })
        .await
        .unwrap_or(false)
    }
}

/// Refreshes `dir` every `refresh_interval` and on request until `stop` changes.
pub async fn run(dir: Arc<Directory>, refresher: Refresher, mut stop: watch::Receiver<bool>) {
    if !dir.learning() {
        return;
    }
    let mut tick = tokio::time::interval(dir.refresh_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
            _ = refresher.wake.notified() => {}
        }
        refresh(&dir).await;
        refresher.done.send_modify(|n| *n += 1);
    }
}
