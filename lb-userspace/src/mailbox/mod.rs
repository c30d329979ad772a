//! The mailbox map: which back-end holds each mailbox, for a cluster of mail servers with
//! separate mailbox stores (no NFS, no SAN). One piece of code answers for the POP3/IMAP proxy
//! (where a login goes), the relay's `partitioned` delivery (where mail goes) and the relay's
//! RCPT check (whether the mailbox exists anywhere).
//!
//! The owner of a mailbox comes from, in order:
//! 1. the **table**: an explicit `user backend` file, reloadable, and rewritten by
//!    `mxlb mailbox move` ([`table`]);
//! 2. what the back-ends **report**: each back-end's `mxlb agent` exports its mailbox list and
//!    the LB nodes fetch it periodically and on demand ([`learn`]);
//! 3. **consistent hashing** over the configured back-ends' weights, as Dovecot's director
//!    does, so a mailbox nobody knows yet (a new user) has a stable home that does not move
//!    when some other back-end fails ([`rendezvous`]).
//!
//! Mailbox names are compared case-insensitively (lower-cased, as Dovecot's `%Lu`).
pub mod learn;
pub mod service;
pub mod table;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::RwLock,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use xxhash_rust::xxh64::xxh64;

pub use table::{Table, TableError};

/// A back-end that holds mailboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxBackend {
    /// The `[[backend]]` name: the identity that owns mailboxes (renumbering a server does not
    /// move its mailboxes).
    pub name: String,
    pub address: IpAddr,
    /// The *configured* weight: ownership must not move with load.
    pub weight: u32,
    /// Its `mxlb agent`, which reports its mailboxes; `None`: nothing is learned from it.
    pub agent: Option<SocketAddr>,
}

/// Where an owner came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The explicit table (pinned or moved by the operator).
    Table,
    /// Reported by the back-end's agent.
    Learned,
    /// Nobody knows the mailbox: its consistent-hash home.
    Hashed,
}

/// The back-end that holds a mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub backend: String,
    pub address: IpAddr,
    pub source: Source,
    /// Passing health checks now (the proxy answers "try later" when not).
    pub healthy: bool,
}

/// What a login or a recipient finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    Owner(Owner),
    /// Every back-end reported its list and none has this mailbox (and the table does not
    /// name it): the user exists nowhere.
    NoSuchUser,
}

/// Whether a mailbox exists somewhere in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Existence {
    Exists,
    Nowhere,
    /// Not known now (a back-end's list has never been fetched, or learning is off); the
    /// reason says which.
    Unknown(String),
}

/// One row of `mxlb mailbox list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxEntry {
    pub mailbox: String,
    pub backend: String,
    pub source: Source,
    /// Back-ends reporting the mailbox (more than one during a migration).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reported_by: Vec<String>,
}

/// `mxlb mailbox where` (and the per-back-end state in `list`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Whereabouts {
    pub mailbox: String,
    /// `None`: the mailbox exists nowhere.
    pub owner: Option<Owner>,
    pub reported_by: Vec<String>,
}

/// The learned state of one back-end.
#[derive(Debug, Clone, Default)]
struct Reported {
    mailboxes: std::collections::HashSet<String>,
    /// When its list was last fetched successfully (`None`: never).
    fetched: Option<SystemTime>,
    last_error: Option<String>,
}

/// The refresh state of one back-end, for `mxlb mailbox list` and the metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendReport {
    pub backend: String,
    pub mailboxes: usize,
    /// Seconds since the Unix epoch of the last successful fetch.
    pub fetched_at: Option<u64>,
    pub last_error: Option<String>,
}

/// Errors of the map's operations.
#[derive(Debug, thiserror::Error)]
pub enum MailboxError {
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("no mailbox back-end is named `{0}`")]
    NoSuchBackend(String),
    #[error("`{0}` is not a mailbox name")]
    BadName(String),
    #[error("no mailbox table is configured ([mailbox] table): `move` has nowhere to record the owner")]
    NoTable,
}

/// The mailbox map shared by the proxy, the relay and the control socket.
pub struct Directory {
    backends: Vec<MailboxBackend>,
    table_path: Option<PathBuf>,
    table: RwLock<Table>,
    reported: RwLock<HashMap<String, Reported>>,
    /// Health verdicts by back-end name (absent: assumed up, as before the first probe).
    health: RwLock<HashMap<String, bool>>,
    /// Mailboxes whose owner changed by `move`: open proxied sessions of that user end.
    moves: broadcast::Sender<String>,
    /// How often the lists are fetched, and how long one fetch may take.
    pub refresh_interval: Duration,
    pub fetch_timeout: Duration,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory")
            .field("backends", &self.backends)
            .field("table_path", &self.table_path)
            .field("table_entries", &read(&self.table).len())
            .finish_non_exhaustive()
    }
}

/// Lower-cased, trimmed: the key every lookup uses.
pub fn normalize(mailbox: &str) -> String {
    mailbox.trim().to_lowercase()
}

/// A name the map can hold: not empty, no whitespace or control characters, at most 255 bytes.
pub fn valid_name(mailbox: &str) -> bool {
    !mailbox.is_empty() && mailbox.len() <= 255 && !mailbox.chars().any(|c| c.is_whitespace() || c.is_control())
}

impl Directory {
    /// A map over `backends`, with the table at `table_path` (read now; a missing file is an
    /// empty table, so `move` can create it).
    pub fn new(backends: Vec<MailboxBackend>, table_path: Option<PathBuf>) -> Result<Directory, MailboxError> {
        let names: Vec<&str> = backends.iter().map(|b| b.name.as_str()).collect();
        let table = match &table_path {
            Some(p) => Table::load_or_empty(p, &names)?,
            None => Table::default(),
        };
        let (moves, _) = broadcast::channel(64);
        Ok(Directory {
            reported: RwLock::new(HashMap::new()),
            health: RwLock::new(HashMap::new()),
            backends,
            table_path,
            table: RwLock::new(table),
            moves,
            refresh_interval: Duration::from_secs(60),
            fetch_timeout: Duration::from_secs(10),
        })
    }

    pub fn backends(&self) -> &[MailboxBackend] {
        &self.backends
    }

    /// Whether any back-end reports its mailboxes (only then can a mailbox be "nowhere").
    pub fn learning(&self) -> bool {
        self.backends.iter().any(|b| b.agent.is_some())
    }

    fn backend(&self, name: &str) -> Option<&MailboxBackend> {
        self.backends.iter().find(|b| b.name == name)
    }

    fn healthy(&self, name: &str) -> bool {
        read(&self.health).get(name).copied().unwrap_or(true)
    }

    /// Records the prober's verdict for a back-end.
    pub fn set_health(&self, backend: &str, healthy: bool) {
        write(&self.health).insert(backend.to_string(), healthy);
    }

    /// The back-ends that report `key` (normalised), sorted.
    fn reporters(&self, key: &str) -> Vec<String> {
        let reported = read(&self.reported);
        let mut v: Vec<String> = self
            .backends
            .iter()
            .filter(|b| reported.get(&b.name).is_some_and(|r| r.mailboxes.contains(key)))
            .map(|b| b.name.clone())
            .collect();
        v.sort();
        v
    }

    /// The owner by table, then reports, then hash; and who reports it.
    fn resolve(&self, key: &str) -> (String, Source, Vec<String>) {
        let reporters = self.reporters(key);
        if let Some(name) = read(&self.table).owner(key) {
            return (name.to_string(), Source::Table, reporters);
        }
        if !reporters.is_empty() {
            // Reported by more than one (a copy left behind by a migration): the hash picks
            // among the reporters, the same on every LB node.
            let candidates = self.backends.iter().filter(|b| reporters.contains(&b.name));
            let name = rendezvous(candidates.map(|b| (b.name.as_str(), b.weight.max(1))), key)
                .unwrap_or(&reporters[0])
                .to_string();
            return (name, Source::Learned, reporters);
        }
        let name = rendezvous(self.backends.iter().map(|b| (b.name.as_str(), b.weight)), key)
            .or_else(|| self.backends.first().map(|b| b.name.as_str()))
            .unwrap_or_default()
            .to_string();
        (name, Source::Hashed, reporters)
    }

    fn owner_named(&self, name: String, source: Source) -> Owner {
        let address = self.backend(&name).map(|b| b.address).unwrap_or(IpAddr::from([0, 0, 0, 0]));
        Owner { healthy: self.healthy(&name), backend: name, address, source }
    }

    /// The owner of `mailbox`, whether or not it exists (delivery routing: mail for a mailbox
    /// nobody knows still has one home).
    pub fn owner(&self, mailbox: &str) -> Owner {
        let (name, source, _) = self.resolve(&normalize(mailbox));
        self.owner_named(name, source)
    }

    /// Where a login for `user` goes, or that the user exists nowhere.
    pub fn locate(&self, user: &str) -> Located {
        match self.whereabouts(user).owner {
            Some(owner) => Located::Owner(owner),
            None => Located::NoSuchUser,
        }
    }

    /// `mxlb mailbox where`: the owner (`None`: the mailbox exists nowhere) and who reports it.
    /// Only a hashed owner can be "nowhere": a table entry or a report means the mailbox exists.
    pub fn whereabouts(&self, mailbox: &str) -> Whereabouts {
        let key = normalize(mailbox);
        let (name, source, reported_by) = self.resolve(&key);
        let nowhere = source == Source::Hashed && self.existence_of(&key) == Existence::Nowhere;
        let owner = (!nowhere).then(|| self.owner_named(name, source));
        Whereabouts { mailbox: key, owner, reported_by }
    }

    /// Whether `mailbox` exists on some back-end (the relay's RCPT check).
    pub fn exists(&self, mailbox: &str) -> Existence {
        self.existence_of(&normalize(mailbox))
    }

    fn existence_of(&self, key: &str) -> Existence {
        if read(&self.table).owner(key).is_some() {
            return Existence::Exists;
        }
        if !self.learning() {
            return Existence::Unknown("no back-end reports its mailboxes".into());
        }
        let reported = read(&self.reported);
        let mut unfetched = Vec::new();
        for b in self.backends.iter().filter(|b| b.agent.is_some()) {
            match reported.get(&b.name) {
                Some(r) if r.mailboxes.contains(key) => return Existence::Exists,
                Some(r) if r.fetched.is_some() => {}
                _ => unfetched.push(b.name.as_str()),
            }
        }
        if unfetched.is_empty() {
            Existence::Nowhere
        } else {
            Existence::Unknown(format!("mailbox list of {} not fetched yet", unfetched.join(", ")))
        }
    }

    /// Replaces what `backend` reports (a successful fetch).
    pub fn set_reported(&self, backend: &str, mailboxes: impl IntoIterator<Item = String>) {
        let set = mailboxes.into_iter().map(|m| normalize(&m)).filter(|m| valid_name(m)).collect();
        let mut reported = write(&self.reported);
        let r = reported.entry(backend.to_string()).or_default();
        r.mailboxes = set;
        r.fetched = Some(SystemTime::now());
        r.last_error = None;
    }

    /// Records a failed fetch; the last good list stays in use.
    pub fn set_fetch_error(&self, backend: &str, error: String) {
        write(&self.reported).entry(backend.to_string()).or_default().last_error = Some(error);
    }

    /// The refresh state of every back-end.
    pub fn reports(&self) -> Vec<BackendReport> {
        let reported = read(&self.reported);
        self.backends
            .iter()
            .map(|b| {
                let r = reported.get(&b.name);
                BackendReport {
                    backend: b.name.clone(),
                    mailboxes: r.map_or(0, |r| r.mailboxes.len()),
                    fetched_at: r
                        .and_then(|r| r.fetched)
                        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs()),
                    last_error: r.and_then(|r| r.last_error.clone()),
                }
            })
            .collect()
    }

    /// Every mailbox the map knows (table and reports), sorted, with its owner.
    pub fn list(&self) -> Vec<MailboxEntry> {
        let mut keys: BTreeMap<String, ()> = BTreeMap::new();
        for m in read(&self.table).mailboxes() {
            keys.insert(m.to_string(), ());
        }
        for r in read(&self.reported).values() {
            for m in &r.mailboxes {
                keys.insert(m.clone(), ());
            }
        }
        keys.into_keys()
            .map(|key| {
                let (backend, source, reported_by) = self.resolve(&key);
                MailboxEntry { mailbox: key, backend, source, reported_by }
            })
            .collect()
    }

    /// `mxlb mailbox move`: records `backend` as the owner of `mailbox` in the table file
    /// (durably) and tells open proxied sessions of that user to end, so they reconnect to
    /// the new owner. Moving the data itself (`doveadm sync`/`dsync`) is the operator's part.
    pub fn move_mailbox(&self, mailbox: &str, backend: &str) -> Result<Owner, MailboxError> {
        let key = normalize(mailbox);
        if !valid_name(&key) {
            return Err(MailboxError::BadName(mailbox.to_string()));
        }
        if self.backend(backend).is_none() {
            return Err(MailboxError::NoSuchBackend(backend.to_string()));
        }
        let path = self.table_path.as_ref().ok_or(MailboxError::NoTable)?;
        {
            let mut table = write(&self.table);
            table.set_in_file(path, &key, backend)?;
        }
        let _ = self.moves.send(key.clone());
        Ok(self.owner(&key))
    }

    /// Re-reads the table file; a broken file keeps the old table (the error says why).
    pub fn reload(&self) -> Result<usize, MailboxError> {
        let Some(path) = &self.table_path else { return Ok(0) };
        let names: Vec<&str> = self.backends.iter().map(|b| b.name.as_str()).collect();
        let table = Table::load_or_empty(path, &names)?;
        let n = table.len();
        *write(&self.table) = table;
        Ok(n)
    }

    /// Mailboxes moved from now on (normalised names).
    pub fn moves(&self) -> broadcast::Receiver<String> {
        self.moves.subscribe()
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// Weighted rendezvous hashing (HRW): each candidate scores `weight / -ln(u)` with `u` in
/// (0, 1] from a hash of (name, key); the highest wins. A candidate wins a share of keys
/// proportional to its weight, and its score for a key does not depend on the others, so
/// adding a back-end moves keys only to it and removing one moves only its own keys.
///
/// Why not [`crate::maglev`]: Maglev identifies back-ends by address and is built for a
/// per-packet table lookup; mailbox ownership follows the back-end's *name*, and HRW gives
/// the minimal movement above with no table to rebuild.
pub fn rendezvous<'a>(candidates: impl Iterator<Item = (&'a str, u32)>, key: &str) -> Option<&'a str> {
    let mut best: Option<(f64, &str)> = None;
    for (name, weight) in candidates.filter(|&(_, w)| w > 0) {
        let h = xxh64(key.as_bytes(), xxh64(name.as_bytes(), 0x6d78_6c62_7274));
        let u = ((h >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let score = f64::from(weight) / -u.ln();
        let better = match best {
            None => true,
            Some((s, prev)) => score > s || (score == s && name < prev),
        };
        if better {
            best = Some((score, name));
        }
    }
    best.map(|(_, n)| n)
}

#[cfg(test)]
mod tests;
