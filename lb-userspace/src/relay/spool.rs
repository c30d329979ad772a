//! The durable on-disk queue: every message answered `250` is here (and in the peer's
//! `replica/`) before the answer goes out.
//!
//! # Why plain files and not an embedded database
//! - Operators can inspect, copy and back up the queue with ordinary tools, as they do with
//!   Postfix's queue: one file per message, named by its queue id, readable with `less`.
//! - The commit point is a single `rename(2)` of a fully written and `fsync`'d file, followed by
//!   an `fsync` of the directory. There is no log to replay and nothing to compact: a removed
//!   message is a file moved out of its area, so the queue never grows from churn.
//! - It is fast enough: one fsync'd write + rename + directory fsync measured ≈0.5 ms on the
//!   development VM, and concurrent sessions overlap their fsyncs, so well over 1000 msg/s.
//!
//! # Layout under the root directory
//! - `tmp/`: files being written. Anything here at [`Spool::open`] is a write a crash
//!   interrupted (it was never acknowledged) and is deleted.
//! - `queue/`: messages this node delivers.
//! - `replica/`: copies held for the peer node; this node delivers them only after a takeover
//!   ([`Spool::promote`]).
//! - `corrupt/`: files [`Spool::open`] could not parse, moved aside (never deleted) so an
//!   operator can look at them.
//! - `free/`: finished message files kept for reuse (up to 4096 of at most 256 KiB): a store
//!   overwrites one instead of creating a file, because creating and deleting a file per
//!   message makes ext4's inode allocator the relay's bottleneck (see [`Spool::recycle`]).
//!   Their content is garbage from delivered messages, never read.
//! - `lock`: held (`flock`) by the process that opened the spool, so two agents never clean up
//!   under each other's feet.
//!
//! # Message file format (`queue/<id>`, `replica/<id>`)
//! ```text
//! mxlb-spool 1 gen=<16 hex> envelope=<bytes> content=<bytes> xxh64=<16 hex>\n
//! <envelope as one line of JSON>\n
//! <content bytes>
//! ```
//! The lengths let a reader find the parts without scanning the content and detect a short
//! file; `xxh64` is the checksum of the content, verified by [`Spool::load`]. `gen` is random
//! per [`Spool::store`]: it ties a state file to the exact version of the message it was
//! written for (see below).
//!
//! # State file (`<area>/<id>.state`)
//! Delivery progress changes recipient states many times; rewriting the content each time
//! would cost a copy of the whole message. [`Spool::update`] instead writes the new envelope
//! to `<id>.state` (JSON `{"generation": .., "envelope": ..}`, via [`crate::statefile::save`]:
//! temp file, fsync, rename, directory fsync). It supersedes the embedded envelope only if its
//! generation matches the message file's `gen`, so a state left over from an older copy of
//! the same id (the mirror resent it, or a crash interrupted a removal) can never be applied
//! to a newer message.
//!
//! # Concurrency
//! All methods take `&self`, block on std fs calls (call them from `spawn_blocking`), and may
//! run concurrently from many threads for *different* ids. Calls for the *same* id (store vs.
//! update vs. remove vs. promote) must be serialised by the caller: the spool keeps no
//! per-id locks.
//!
//! # What a crash can and cannot do
//! - A `store` that did not return leaves either the old file or nothing (plus junk in
//!   `tmp/`); one that returned survives SIGKILL and power loss (file and directory fsync'd).
//! - An `update` that did not return leaves the old state or the new one.
//! - A crash inside `remove` can leave the message's state file alone; [`Spool::open`] deletes
//!   such orphans.
//! - A crash inside `promote` between moving the message and moving its state leaves the
//!   state in `replica/`; [`Spool::open`] finishes the move. If the crash comes before the
//!   directory fsyncs, the message may be found in both areas; the caller repeats the
//!   takeover (promoting again replaces the `queue/` copy).
use std::{
    collections::HashMap,
    fs::{self, DirBuilder, File, OpenOptions},
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{Envelope, MessageId, unix_now};
use crate::statefile::{self, StateError};

const MAGIC: &str = "mxlb-spool";
const VERSION: u32 = 1;
/// The header line is about 100 bytes; anything longer is not ours.
const MAX_HEADER_LINE: u64 = 256;
/// An envelope with thousands of recipients is a few hundred KiB; refusing absurd lengths keeps
/// a corrupt header from making us allocate gigabytes.
const MAX_ENVELOPE: u64 = 16 << 20;
const STATE_SUFFIX: &str = ".state";

/// Which part of the spool a message is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Area {
    /// Messages this node accepted (or took over) and delivers.
    Queue,
    /// Copies of the peer's messages, delivered only after a takeover.
    Replica,
}

impl Area {
    /// The directory name under the spool root.
    pub fn dir_name(self) -> &'static str {
        match self {
            Area::Queue => "queue",
            Area::Replica => "replica",
        }
    }
}

/// Errors from the spool; each names the file (or directory) involved.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The message is not in that area.
    #[error("{path}: no such message")]
    NotFound { path: PathBuf },
    /// The file exists but is not a valid spool file (truncated, garbage, wrong checksum).
    #[error("{path}: corrupt spool file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// Another process has this spool open.
    #[error("{path}: the spool is in use by another process")]
    Locked { path: PathBuf },
    /// Writing or reading a state file.
    #[error(transparent)]
    State(#[from] StateError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| {
        if source.kind() == io::ErrorKind::NotFound {
            SpoolError::NotFound { path: path.to_path_buf() }
        } else {
            SpoolError::Io { path: path.to_path_buf(), source }
        }
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> SpoolError {
    SpoolError::Corrupt { path: path.to_path_buf(), reason: reason.into() }
}

/// What `<id>.state` holds.
#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    /// The `gen` of the message file this state belongs to.
    generation: String,
    envelope: Envelope,
}

/// The parsed first line of a message file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    generation: String,
    envelope_len: u64,
    content_len: u64,
    checksum: u64,
    /// Length of the header line including its `\n`.
    line_len: u64,
}

impl Header {
    fn total_len(&self) -> u64 {
        self.line_len + self.envelope_len + 1 + self.content_len
    }

    fn parse(line: &[u8], path: &Path) -> Result<Header, SpoolError> {
        let Some(text) = line.strip_suffix(b"\n") else {
            return Err(corrupt(path, "header line is cut short"));
        };
        let text = std::str::from_utf8(text).map_err(|_| corrupt(path, "header is not text"))?;
        let mut words = text.split(' ');
        if words.next() != Some(MAGIC) {
            return Err(corrupt(path, format!("does not start with `{MAGIC}`")));
        }
        let version = words.next().unwrap_or_default();
        if version != VERSION.to_string() {
            return Err(corrupt(path, format!("unsupported version `{version}` (this build reads {VERSION})")));
        }
        let (mut generation, mut envelope_len, mut content_len, mut checksum) = (None, None, None, None);
        for word in words {
            let (key, value) = word.split_once('=').ok_or_else(|| corrupt(path, format!("bad header field `{word}`")))?;
            let num = |v: &str| v.parse::<u64>().map_err(|_| corrupt(path, format!("bad `{key}` value `{v}`")));
            match key {
                "gen" if is_hex16(value) => generation = Some(value.to_string()),
                "envelope" => envelope_len = Some(num(value)?),
                "content" => content_len = Some(num(value)?),
                "xxh64" if is_hex16(value) => {
                    checksum = Some(u64::from_str_radix(value, 16).map_err(|_| corrupt(path, "bad checksum"))?)
                }
                _ => return Err(corrupt(path, format!("bad header field `{word}`"))),
            }
        }
        match (generation, envelope_len, content_len, checksum) {
            (Some(generation), Some(envelope_len), Some(content_len), Some(checksum)) => {
                if envelope_len > MAX_ENVELOPE {
                    return Err(corrupt(path, format!("envelope length {envelope_len} is absurd")));
                }
                Ok(Header { generation, envelope_len, content_len, checksum, line_len: line.len() as u64 })
            }
            _ => Err(corrupt(path, "header lacks a field")),
        }
    }
}

fn is_hex16(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn new_generation() -> String {
    let mut random = [0u8; 8];
    // Only uniqueness against older copies of the same id matters; if the OS random source
    // failed, the clock still differs between two stores of one id.
    if getrandom::getrandom(&mut random).is_err() {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        random = (nanos as u64).to_be_bytes();
    }
    format!("{:016x}", u64::from_be_bytes(random))
}

/// The durable message store of one node. See the module documentation.
#[derive(Debug)]
pub struct Spool {
    root: PathBuf,
    tmp: PathBuf,
    queue: PathBuf,
    replica: PathBuf,
    corrupt: PathBuf,
    /// Kept open so each commit fsyncs the directory without an extra `open(2)`.
    queue_dir: File,
    replica_dir: File,
    /// Finished message files kept for reuse (see [`Spool::recycle`]), by name in `free/`.
    free: PathBuf,
    pool: std::sync::Mutex<Vec<PathBuf>>,
    free_seq: std::sync::atomic::AtomicU64,
    /// The `flock` on `root/lock`, released when the spool is dropped (or the process dies).
    _lock: File,
}

/// Finished files kept in `free/` for reuse, at most (each at most [`RECYCLE_MAX_BYTES`]).
const RECYCLE_POOL: usize = 4096;
/// Larger finished files are deleted rather than kept (they would hold their blocks).
const RECYCLE_MAX_BYTES: u64 = 256 * 1024;

impl Spool {
    /// Opens (creating if needed) the spool at `root`, takes its lock, deletes interrupted
    /// writes from `tmp/`, and moves unparseable message or state files to `corrupt/` with a
    /// warning. Fails with [`SpoolError::Locked`] if another process has it open.
    pub fn open(root: &Path) -> Result<Spool, SpoolError> {
        let (tmp, queue, replica, corrupt) =
            (root.join("tmp"), root.join(Area::Queue.dir_name()), root.join(Area::Replica.dir_name()), root.join("corrupt"));
        let free = root.join("free");
        let mut builder = DirBuilder::new();
        builder.recursive(true).mode(0o700);
        for dir in [root, &tmp, &queue, &replica, &corrupt, &free] {
            builder.create(dir).map_err(io_err(dir))?;
        }
        // std's File::try_lock rather than statefile::lock, which waits: a second agent on the
        // same spool is a configuration error to report, not something to queue behind.
        let lock_path = root.join("lock");
        let lock = OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&lock_path).map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(SpoolError::Locked { path: lock_path }),
            Err(fs::TryLockError::Error(source)) => return Err(SpoolError::Io { path: lock_path, source }),
        }
        let open_dir = |p: &Path| File::open(p).map_err(io_err(p));
        let spool = Spool {
            root: root.to_path_buf(),
            queue_dir: open_dir(&queue)?,
            replica_dir: open_dir(&replica)?,
            tmp,
            queue,
            replica,
            corrupt,
            pool: std::sync::Mutex::new(Vec::new()),
            free_seq: std::sync::atomic::AtomicU64::new(0),
            free,
            _lock: lock,
        };
        spool.recover()?;
        spool.fill_pool()?;
        Ok(spool)
    }

    /// The spool's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a message's file is (for operators and `mxlb queue` commands).
    pub fn message_path(&self, area: Area, id: &MessageId) -> PathBuf {
        self.area_path(area).join(id.as_str())
    }

    fn area_path(&self, area: Area) -> &Path {
        match area {
            Area::Queue => &self.queue,
            Area::Replica => &self.replica,
        }
    }

    fn area_dir(&self, area: Area) -> &File {
        match area {
            Area::Queue => &self.queue_dir,
            Area::Replica => &self.replica_dir,
        }
    }

    fn sync_area(&self, area: Area) -> Result<(), SpoolError> {
        self.area_dir(area).sync_all().map_err(io_err(self.area_path(area)))
    }

    fn state_path(&self, area: Area, id: &MessageId) -> PathBuf {
        self.area_path(area).join(format!("{id}{STATE_SUFFIX}"))
    }

    /// Stores a message durably: when this returns `Ok`, the message survives a crash or power
    /// loss. Replaces an existing message with the same id (a resend from the peer), including
    /// any recorded recipient states.
    pub fn store(&self, area: Area, env: &Envelope, content: &[u8]) -> Result<(), SpoolError> {
        let generation = new_generation();
        let json = serde_json::to_vec(env).map_err(|e| corrupt(&self.message_path(area, &env.id), format!("cannot encode the envelope: {e}")))?;
        let mut head = format!(
            "{MAGIC} {VERSION} gen={generation} envelope={} content={} xxh64={:016x}\n",
            json.len(),
            content.len(),
            xxhash_rust::xxh64::xxh64(content, 0)
        )
        .into_bytes();
        head.extend_from_slice(&json);
        head.push(b'\n');
        // A per-write temp name: two writers of one id (which the caller should not allow)
        // still each produce a whole file, and the last rename wins.
        let tmp = self.tmp.join(format!("{}.{generation}", env.id));
        // A recycled file if there is one (overwritten from the start: truncated on open).
        let reused = self.take_free(&tmp);
        let result = (|| {
            let mut f = if reused {
                OpenOptions::new().write(true).truncate(true).open(&tmp).map_err(io_err(&tmp))?
            } else {
                OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io_err(&tmp))?
            };
            f.write_all(&head).map_err(io_err(&tmp))?;
            f.write_all(content).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let dest = self.message_path(area, &env.id);
        if let Err(source) = fs::rename(&tmp, &dest) {
            let _ = fs::remove_file(&tmp);
            return Err(SpoolError::Io { path: dest, source });
        }
        self.sync_area(area)?;
        // Tidiness only: a stale state has another generation and is ignored anyway, and
        // Spool::open deletes it if this unlink is lost in a crash.
        let _ = fs::remove_file(self.state_path(area, &env.id));
        Ok(())
    }

    /// Reads the header line and the embedded envelope, checking the file's length.
    fn read_head(&self, path: &Path) -> Result<(Header, Envelope), SpoolError> {
        let file = File::open(path).map_err(io_err(path))?;
        let file_len = file.metadata().map_err(io_err(path))?.len();
        let mut reader = BufReader::new(file);
        let mut line = Vec::with_capacity(128);
        (&mut reader).take(MAX_HEADER_LINE).read_until(b'\n', &mut line).map_err(io_err(path))?;
        let header = Header::parse(&line, path)?;
        if header.total_len() != file_len {
            return Err(corrupt(path, format!("{file_len} bytes long, the header says {}", header.total_len())));
        }
        let mut json = vec![0; header.envelope_len as usize];
        reader.read_exact(&mut json).map_err(io_err(path))?;
        let env = parse_envelope(&json, path)?;
        Ok((header, env))
    }

    /// The newest envelope of a message whose file header is `header`: its state file if that
    /// belongs to this version of the message, else the embedded one.
    fn current(&self, area: Area, id: &MessageId, header: &Header, embedded: Envelope) -> Result<Envelope, SpoolError> {
        let path = self.state_path(area, id);
        match statefile::load::<Option<StateFile>>(&path, "spool state file")? {
            Some(state) if state.generation == header.generation => {
                if state.envelope.id != *id {
                    return Err(corrupt(&path, format!("holds the state of {}", state.envelope.id)));
                }
                Ok(state.envelope)
            }
            _ => Ok(embedded),
        }
    }

    /// A message's envelope with its latest recipient states, without reading the content.
    pub fn envelope(&self, area: Area, id: &MessageId) -> Result<Envelope, SpoolError> {
        let path = self.message_path(area, id);
        let (header, env) = self.read_head(&path)?;
        check_id(&env, id, &path)?;
        self.current(area, id, &header, env)
    }

    /// A message's envelope (latest recipient states) and content, checksum verified.
    pub fn load(&self, area: Area, id: &MessageId) -> Result<(Envelope, Vec<u8>), SpoolError> {
        let path = self.message_path(area, id);
        let mut bytes = fs::read(&path).map_err(io_err(&path))?;
        let line_end = bytes.iter().take(MAX_HEADER_LINE as usize).position(|&b| b == b'\n').map(|i| i + 1).unwrap_or(0);
        let header = Header::parse(&bytes[..line_end], &path)?;
        if header.total_len() != bytes.len() as u64 {
            return Err(corrupt(&path, format!("{} bytes long, the header says {}", bytes.len(), header.total_len())));
        }
        let json_end = line_end + header.envelope_len as usize;
        let env = parse_envelope(&bytes[line_end..json_end], &path)?;
        check_id(&env, id, &path)?;
        bytes.drain(..json_end + 1);
        if xxhash_rust::xxh64::xxh64(&bytes, 0) != header.checksum {
            return Err(corrupt(&path, "content checksum mismatch"));
        }
        let env = self.current(area, id, &header, env)?;
        Ok((env, bytes))
    }

    /// The ids of the messages in an area, oldest first (ids sort by accept time). Names that
    /// are not queue ids (state files, an operator's notes) are skipped.
    pub fn ids(&self, area: Area) -> Result<Vec<MessageId>, SpoolError> {
        let dir = self.area_path(area);
        let mut ids = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            if let Some(id) = entry.file_name().to_str().and_then(|n| n.parse::<MessageId>().ok()) {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Whether the area holds a message with this id.
    pub fn contains(&self, area: Area, id: &MessageId) -> bool {
        self.message_path(area, id).is_file()
    }

    /// Records `env` (new recipient states) durably as the message's current envelope, without
    /// rewriting the content. The message must exist in `area`.
    pub fn update(&self, area: Area, env: &Envelope) -> Result<(), SpoolError> {
        let path = self.message_path(area, &env.id);
        let (header, _) = self.read_head(&path)?;
        let state = StateFile { generation: header.generation, envelope: env.clone() };
        statefile::save(self.area_path(area), &format!("{}{STATE_SUFFIX}", env.id), &state)?;
        Ok(())
    }

    /// Removes a message and its state durably. Returns whether the message was there.
    pub fn remove(&self, area: Area, id: &MessageId) -> Result<bool, SpoolError> {
        let path = self.message_path(area, id);
        let existed = match self.recycle(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(source) => return Err(SpoolError::Io { path, source }),
        };
        let state = self.state_path(area, id);
        let had_state = match fs::remove_file(&state) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(source) => return Err(SpoolError::Io { path: state, source }),
        };
        if existed || had_state {
            self.sync_area(area)?;
        }
        Ok(existed)
    }

    /// Takes a file out of the spool: into `free/` for reuse by the next [`Spool::store`], or
    /// deleted when the pool is full or the file large.
    ///
    /// Why: every message is a file created and soon deleted, and ext4's inode allocator skips
    /// inodes freed in the last seconds (`recently_deleted`), scanning further for each new
    /// one; at a thousand messages a second that scan took most of the relay's CPU (measured
    /// with perf: 2.5x the throughput on tmpfs). A reused file needs no new inode.
    fn recycle(&self, path: &Path) -> io::Result<()> {
        let small = fs::symlink_metadata(path)?.len() <= RECYCLE_MAX_BYTES;
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if !small || pool.len() >= RECYCLE_POOL {
            drop(pool);
            return fs::remove_file(path);
        }
        let n = self.free_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let to = self.free.join(format!("f{n}"));
        fs::rename(path, &to)?;
        pool.push(to);
        Ok(())
    }

    /// Moves a recycled file to `to` (in `tmp/`); false if there is none.
    fn take_free(&self, to: &Path) -> bool {
        loop {
            let Some(from) = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop() else { return false };
            // Only a missing file fails here (e.g. removed by an operator): try the next one.
            if fs::rename(&from, to).is_ok() {
                return true;
            }
        }
    }

    /// The recycled files left from the last run (anything else in `free/` is removed).
    fn fill_pool(&self) -> Result<(), SpoolError> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0u64;
        for entry in fs::read_dir(&self.free).map_err(io_err(&self.free))? {
            let path = entry.map_err(io_err(&self.free))?.path();
            let ok = path.is_file() && pool.len() < RECYCLE_POOL;
            if !ok {
                let _ = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
                continue;
            }
            // Renamed to fresh names so the sequence below never meets an old one.
            let to = self.free.join(format!("f{n}"));
            if path != to && fs::rename(&path, &to).is_err() {
                continue;
            }
            pool.push(to);
            n += 1;
        }
        self.free_seq.store(n, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Moves a replica (and its state) into `queue/` durably: this node now delivers it.
    /// Replaces a `queue/` message with the same id.
    pub fn promote(&self, id: &MessageId) -> Result<(), SpoolError> {
        let from = self.message_path(Area::Replica, id);
        let to = self.message_path(Area::Queue, id);
        fs::rename(&from, &to).map_err(io_err(&from))?;
        let (state_from, state_to) = (self.state_path(Area::Replica, id), self.state_path(Area::Queue, id));
        match fs::rename(&state_from, &state_to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(SpoolError::Io { path: state_from, source }),
        }
        self.sync_area(Area::Queue)?;
        self.sync_area(Area::Replica)
    }

    /// Startup clean-up; see [`Spool::open`] and the module documentation.
    fn recover(&self) -> Result<(), SpoolError> {
        for entry in fs::read_dir(&self.tmp).map_err(io_err(&self.tmp))? {
            let path = entry.map_err(io_err(&self.tmp))?.path();
            let removed = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
            removed.map_err(io_err(&path))?;
            tracing::info!(path = %path.display(), "spool: removed an interrupted write");
        }
        // Messages first (their generations decide which state files are current).
        let mut messages: HashMap<Area, HashMap<MessageId, String>> = HashMap::new();
        let mut states: HashMap<Area, Vec<(MessageId, PathBuf)>> = HashMap::new();
        for area in [Area::Queue, Area::Replica] {
            let dir = self.area_path(area);
            let (msgs, sts) = (messages.entry(area).or_default(), states.entry(area).or_default());
            for entry in fs::read_dir(dir).map_err(io_err(dir))? {
                let entry = entry.map_err(io_err(dir))?;
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Ok(id) = name.parse::<MessageId>() {
                    match self.read_head(&path).and_then(|(h, env)| check_id(&env, &id, &path).map(|()| h)) {
                        Ok(header) => {
                            msgs.insert(id, header.generation);
                        }
                        Err(e @ SpoolError::Corrupt { .. }) => self.quarantine(area, &path, &name, &e)?,
                        Err(e) => return Err(e),
                    }
                } else if let Some(id) = name.strip_suffix(STATE_SUFFIX).and_then(|n| n.parse::<MessageId>().ok()) {
                    sts.push((id, path));
                } else if name.ends_with(".tmp") {
                    // An interrupted statefile::save of a state file.
                    fs::remove_file(&path).map_err(io_err(&path))?;
                } else {
                    tracing::warn!(path = %path.display(), "spool: ignoring a file that is not a queue file");
                }
            }
        }
        // Then state files: queue/ first, so an interrupted promote is only finished when
        // queue/ has no current state of its own.
        let mut queue_states: HashMap<MessageId, String> = HashMap::new();
        for area in [Area::Queue, Area::Replica] {
            for (id, path) in states.remove(&area).unwrap_or_default() {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let state = match statefile::load::<Option<StateFile>>(&path, "spool state file") {
                    Ok(Some(state)) if state.envelope.id == id => state,
                    Ok(None) => continue,
                    Ok(Some(_)) => {
                        let e = corrupt(&path, "holds another message's state");
                        self.quarantine(area, &path, &name, &e)?;
                        continue;
                    }
                    Err(StateError::Parse { path, source, .. }) => {
                        let e = corrupt(&path, source.to_string());
                        self.quarantine(area, &path, &name, &e)?;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                let own = messages.get(&area).and_then(|m| m.get(&id));
                if own == Some(&state.generation) {
                    if area == Area::Queue {
                        queue_states.insert(id, state.generation);
                    }
                    continue;
                }
                let queued = messages.get(&Area::Queue).and_then(|m| m.get(&id));
                if area == Area::Replica && own.is_none() && queued == Some(&state.generation) && queue_states.get(&id) != Some(&state.generation) {
                    let to = self.state_path(Area::Queue, &id);
                    fs::rename(&path, &to).map_err(io_err(&path))?;
                    tracing::info!(id = %id, "spool: finished an interrupted promote (moved the state file)");
                    continue;
                }
                fs::remove_file(&path).map_err(io_err(&path))?;
                tracing::info!(path = %path.display(), "spool: removed a state file of a removed or replaced message");
            }
        }
        self.sync_area(Area::Queue)?;
        self.sync_area(Area::Replica)
    }

    /// Moves an unreadable file to `corrupt/<area>-<name>-<unix time>` and warns.
    fn quarantine(&self, area: Area, path: &Path, name: &str, why: &SpoolError) -> Result<(), SpoolError> {
        let to = self.corrupt.join(format!("{}-{name}-{}", area.dir_name(), unix_now()));
        tracing::warn!(error = %why, moved_to = %to.display(), "spool: quarantined a corrupt file");
        fs::rename(path, &to).map_err(io_err(path))
    }
}

fn parse_envelope(json: &[u8], path: &Path) -> Result<Envelope, SpoolError> {
    serde_json::from_slice(json).map_err(|e| corrupt(path, format!("bad envelope: {e}")))
}

fn check_id(env: &Envelope, id: &MessageId, path: &Path) -> Result<(), SpoolError> {
    if env.id == *id { Ok(()) } else { Err(corrupt(path, format!("holds message {}", env.id))) }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashSet,
        io::BufRead as _,
        os::unix::process::ExitStatusExt as _,
        process::{Command, Stdio},
        sync::mpsc,
        time::{Duration, Instant},
    };

    use super::*;
    use crate::relay::{ClientInfo, RcptState, Recipient};

    /// A scratch directory removed when the test ends.
    struct TestDir(PathBuf);

    impl TestDir {
        fn new(name: &str) -> TestDir {
            let dir = std::env::temp_dir().join(format!("mxlb-spool-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            TestDir(dir)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn id(n: u64) -> MessageId {
        format!("{n:024x}").parse().unwrap()
    }

    fn envelope(id: &MessageId, content_len: usize) -> Envelope {
        Envelope {
            id: id.clone(),
            mail_from: "sender@example.org".into(),
            rcpts: vec![Recipient::new("a@example.net".into()), Recipient::new("b@example.net".into())],
            accepted_at: 1_700_000_000,
            accepted_by: "mx1".into(),
            client: ClientInfo { addr: "192.0.2.7:40000".parse().unwrap(), helo: "client.example.org".into(), tls: true, authenticated: false },
            eight_bit: false,
            smtputf8: false,
            size: content_len as u64,
        }
    }

    /// Content derived from the id alone, so a crashed writer's output can be checked byte for
    /// byte: a slice of a fixed pseudo-random buffer (bytes of all values, CR, LF and dots
    /// included), mostly under 40 KB but one in eight of 256 KiB to 1 MiB so that a crash
    /// test's kill can land while content is being written. Cheap to make, so the crash
    /// child spends its time in the spool and not here.
    fn content_for(id: &MessageId) -> Vec<u8> {
        static POOL: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        const POOL_LEN: usize = 2 << 20;
        let pool = POOL.get_or_init(|| {
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            (0..POOL_LEN)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        });
        let h = xxhash_rust::xxh64::xxh64(id.as_str().as_bytes(), 7);
        let len = if (h >> 8).is_multiple_of(8) { (256 << 10) + (h % (768 << 10)) } else { h % 40_000 } as usize;
        let start = ((h >> 20) as usize) % (POOL_LEN - len);
        pool[start..start + len].to_vec()
    }

    fn delivered(mut env: Envelope, reply: &str) -> Envelope {
        env.rcpts[0].state = RcptState::Delivered { reply: reply.into() };
        env
    }

    #[test]
    fn finished_files_are_reused_and_never_leak_old_bytes() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = TestDir::new("recycle");
        let spool = Spool::open(dir.path()).unwrap();
        let long = vec![b'x'; 10_000];
        let first = id(1);
        spool.store(Area::Queue, &envelope(&first, long.len()), &long).unwrap();
        let inode = fs::metadata(spool.message_path(Area::Queue, &first)).unwrap().ino();
        assert!(spool.remove(Area::Queue, &first).unwrap());
        assert_eq!(fs::read_dir(dir.path().join("free")).unwrap().count(), 1, "kept for reuse");
        // A shorter message in the recycled file: exactly its own bytes, nothing of the old.
        let second = id(2);
        spool.store(Area::Replica, &envelope(&second, 3), b"abc").unwrap();
        let path = spool.message_path(Area::Replica, &second);
        assert_eq!(fs::metadata(&path).unwrap().ino(), inode, "the finished file was reused");
        assert_eq!(spool.load(Area::Replica, &second).unwrap().1, b"abc");
        assert_eq!(fs::read_dir(dir.path().join("free")).unwrap().count(), 0);
        // Large files are not kept; pooled files survive a restart and are used again.
        let big = vec![b'y'; (RECYCLE_MAX_BYTES + 1) as usize];
        spool.store(Area::Queue, &envelope(&id(3), big.len()), &big).unwrap();
        spool.remove(Area::Queue, &id(3)).unwrap();
        spool.remove(Area::Replica, &second).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("free")).unwrap().count(), 1);
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        spool.store(Area::Queue, &envelope(&id(4), 2), b"hi").unwrap();
        assert_eq!(fs::metadata(spool.message_path(Area::Queue, &id(4))).unwrap().ino(), inode);
        assert_eq!(spool.ids(Area::Queue).unwrap(), vec![id(4)]);
    }

    #[test]
    fn stored_messages_load_back_and_list_in_id_order() {
        let dir = TestDir::new("roundtrip");
        let spool = Spool::open(dir.path()).unwrap();
        let (a, b) = (id(2), id(1));
        let content = b"Received: from x\r\nSubject: hi\r\n\r\nbody\r\n.\r\n".to_vec();
        spool.store(Area::Queue, &envelope(&a, content.len()), &content).unwrap();
        spool.store(Area::Queue, &envelope(&b, 0), b"").unwrap();
        assert_eq!(spool.load(Area::Queue, &a).unwrap(), (envelope(&a, content.len()), content.clone()));
        assert_eq!(spool.load(Area::Queue, &b).unwrap(), (envelope(&b, 0), Vec::new()));
        assert_eq!(spool.envelope(Area::Queue, &a).unwrap(), envelope(&a, content.len()));
        assert_eq!(spool.ids(Area::Queue).unwrap(), vec![b.clone(), a.clone()]);
        assert!(spool.ids(Area::Replica).unwrap().is_empty());
        assert!(spool.contains(Area::Queue, &a) && !spool.contains(Area::Replica, &a));
        assert!(matches!(spool.load(Area::Replica, &a), Err(SpoolError::NotFound { .. })));
        // An operator can recognise the file.
        let raw = fs::read(spool.message_path(Area::Queue, &a)).unwrap();
        assert!(raw.starts_with(b"mxlb-spool 1 "), "{}", String::from_utf8_lossy(&raw));
        assert!(raw.ends_with(&content));
        // Nothing is left in tmp/, and it all survives a reopen.
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.load(Area::Queue, &a).unwrap().1, content);
    }

    #[test]
    fn update_changes_states_without_touching_content_and_survives_reopen() {
        let dir = TestDir::new("update");
        let spool = Spool::open(dir.path()).unwrap();
        let m = id(10);
        let content = content_for(&m);
        spool.store(Area::Queue, &envelope(&m, content.len()), &content).unwrap();
        let before = fs::read(spool.message_path(Area::Queue, &m)).unwrap();
        let env = delivered(envelope(&m, content.len()), "250 2.0.0 queued as X");
        spool.update(Area::Queue, &env).unwrap();
        assert_eq!(fs::read(spool.message_path(Area::Queue, &m)).unwrap(), before, "the message file is not rewritten");
        assert_eq!(spool.envelope(Area::Queue, &m).unwrap(), env);
        assert_eq!(spool.load(Area::Queue, &m).unwrap(), (env.clone(), content));
        let again = delivered(env, "250 second");
        spool.update(Area::Queue, &again).unwrap();
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.envelope(Area::Queue, &m).unwrap(), again);
        assert_eq!(spool.ids(Area::Queue).unwrap(), vec![m.clone()], "the state file is not listed as a message");
        assert!(matches!(spool.update(Area::Queue, &envelope(&id(11), 0)), Err(SpoolError::NotFound { .. })));
        assert!(!spool.contains(Area::Queue, &id(11)), "updating a missing message does not create it");
    }

    #[test]
    fn storing_an_id_again_replaces_message_and_forgets_old_states() {
        let dir = TestDir::new("replace");
        let spool = Spool::open(dir.path()).unwrap();
        let m = id(20);
        spool.store(Area::Replica, &envelope(&m, 3), b"old").unwrap();
        spool.update(Area::Replica, &delivered(envelope(&m, 3), "250 old")).unwrap();
        // Keep the old state file around as if the tidy-up unlink had been lost in a crash.
        let stale = fs::read(spool.state_path(Area::Replica, &m)).unwrap();
        spool.store(Area::Replica, &envelope(&m, 3), b"new").unwrap();
        fs::write(spool.state_path(Area::Replica, &m), stale).unwrap();
        assert_eq!(spool.load(Area::Replica, &m).unwrap(), (envelope(&m, 3), b"new".to_vec()), "a stale state must not apply to the resent copy");
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        assert!(!spool.state_path(Area::Replica, &m).exists(), "open deletes the stale state");
        assert_eq!(spool.envelope(Area::Replica, &m).unwrap(), envelope(&m, 3));
    }

    #[test]
    fn remove_deletes_message_and_state() {
        let dir = TestDir::new("remove");
        let spool = Spool::open(dir.path()).unwrap();
        let (m, other) = (id(30), id(31));
        spool.store(Area::Queue, &envelope(&m, 1), b"x").unwrap();
        spool.store(Area::Queue, &envelope(&other, 1), b"y").unwrap();
        spool.update(Area::Queue, &delivered(envelope(&m, 1), "250")).unwrap();
        assert!(spool.remove(Area::Queue, &m).unwrap());
        assert!(!spool.remove(Area::Queue, &m).unwrap(), "a second remove reports nothing was there");
        assert!(!spool.contains(Area::Queue, &m));
        assert!(!spool.state_path(Area::Queue, &m).exists());
        assert!(matches!(spool.load(Area::Queue, &m), Err(SpoolError::NotFound { .. })));
        assert_eq!(spool.ids(Area::Queue).unwrap(), vec![other]);
    }

    #[test]
    fn promote_moves_a_replica_with_its_states_into_the_queue() {
        let dir = TestDir::new("promote");
        let spool = Spool::open(dir.path()).unwrap();
        let m = id(40);
        let content = content_for(&m);
        spool.store(Area::Replica, &envelope(&m, content.len()), &content).unwrap();
        let env = delivered(envelope(&m, content.len()), "250 delivered by the peer");
        spool.update(Area::Replica, &env).unwrap();
        spool.promote(&m).unwrap();
        assert!(!spool.contains(Area::Replica, &m) && spool.ids(Area::Replica).unwrap().is_empty());
        assert_eq!(spool.load(Area::Queue, &m).unwrap(), (env.clone(), content));
        assert!(matches!(spool.promote(&id(41)), Err(SpoolError::NotFound { .. })));
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.envelope(Area::Queue, &m).unwrap(), env);
    }

    #[test]
    fn open_finishes_a_promote_interrupted_between_message_and_state() {
        let dir = TestDir::new("halfpromote");
        let spool = Spool::open(dir.path()).unwrap();
        let m = id(50);
        spool.store(Area::Replica, &envelope(&m, 2), b"hi").unwrap();
        let env = delivered(envelope(&m, 2), "250 done by the peer");
        spool.update(Area::Replica, &env).unwrap();
        drop(spool);
        // The crash: the message moved, its state did not.
        fs::rename(dir.path().join("replica").join(m.as_str()), dir.path().join("queue").join(m.as_str())).unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.envelope(Area::Queue, &m).unwrap(), env, "the delivered recipient must not be delivered again");
        assert!(!spool.state_path(Area::Replica, &m).exists());
    }

    #[test]
    fn open_removes_interrupted_writes_and_quarantines_garbage() {
        let dir = TestDir::new("garbage");
        let spool = Spool::open(dir.path()).unwrap();
        let good = id(60);
        let content = content_for(&good);
        spool.store(Area::Queue, &envelope(&good, content.len()), &content).unwrap();
        let good_file = fs::read(spool.message_path(Area::Queue, &good)).unwrap();
        drop(spool);
        let (queue, replica, tmp) = (dir.path().join("queue"), dir.path().join("replica"), dir.path().join("tmp"));
        fs::write(tmp.join(format!("{}.0123456789abcdef", id(61))), &good_file[..good_file.len() / 2]).unwrap();
        fs::write(tmp.join("junk"), b"\0\0\0").unwrap();
        // Truncated copy, plain garbage, an empty file, a copy of another message, a future version.
        fs::write(queue.join(id(62).as_str()), &good_file[..good_file.len() - 1]).unwrap();
        fs::write(queue.join(id(63).as_str()), b"hello world\n").unwrap();
        fs::write(replica.join(id(64).as_str()), b"").unwrap();
        fs::write(replica.join(id(65).as_str()), &good_file).unwrap();
        let mut future = good_file.clone();
        future[11] = b'9';
        fs::write(queue.join(id(66).as_str()), &future).unwrap();
        // A garbage state beside the good message, an orphan state, a half-written state temp.
        fs::write(queue.join(format!("{good}.state")), b"{not json").unwrap();
        let orphan = StateFile { generation: "0123456789abcdef".into(), envelope: envelope(&id(67), 0) };
        fs::write(queue.join(format!("{}.state", id(67))), serde_json::to_vec(&orphan).unwrap()).unwrap();
        fs::write(queue.join(format!("{good}.state.tmp")), b"{").unwrap();
        fs::write(queue.join("NOTES"), b"operator's file").unwrap();

        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0, "tmp/ is emptied");
        assert_eq!(spool.ids(Area::Queue).unwrap(), vec![good.clone()]);
        assert!(spool.ids(Area::Replica).unwrap().is_empty());
        assert_eq!(spool.load(Area::Queue, &good).unwrap(), (envelope(&good, content.len()), content));
        let mut quarantined: Vec<String> = fs::read_dir(dir.path().join("corrupt")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        quarantined.sort();
        let expected = [
            format!("queue-{good}.state-"),
            format!("queue-{}-", id(62)),
            format!("queue-{}-", id(63)),
            format!("queue-{}-", id(66)),
            format!("replica-{}-", id(64)),
            format!("replica-{}-", id(65)),
        ];
        assert_eq!(quarantined.len(), expected.len(), "{quarantined:?}");
        for prefix in expected {
            assert!(quarantined.iter().any(|q| q.starts_with(&prefix)), "{prefix} not in {quarantined:?}");
        }
        assert!(!queue.join(format!("{}.state", id(67))).exists(), "orphan state removed");
        assert!(!queue.join(format!("{good}.state.tmp")).exists());
        assert!(queue.join("NOTES").exists(), "files that are not ours are left alone");
    }

    #[test]
    fn load_detects_damaged_content() {
        let dir = TestDir::new("checksum");
        let spool = Spool::open(dir.path()).unwrap();
        let m = id(70);
        spool.store(Area::Queue, &envelope(&m, 5), b"hello").unwrap();
        let path = spool.message_path(Area::Queue, &m);
        let mut raw = fs::read(&path).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 0x20;
        fs::write(&path, raw).unwrap();
        let err = spool.load(Area::Queue, &m).unwrap_err();
        assert!(matches!(err, SpoolError::Corrupt { .. }) && err.to_string().contains(path.to_str().unwrap()), "{err}");
    }

    #[test]
    fn a_second_open_of_the_same_spool_is_refused() {
        let dir = TestDir::new("lock");
        let first = Spool::open(dir.path()).unwrap();
        assert!(matches!(Spool::open(dir.path()), Err(SpoolError::Locked { .. })));
        drop(first);
        Spool::open(dir.path()).unwrap();
    }

    #[test]
    fn concurrent_stores_of_different_ids_all_land() {
        let dir = TestDir::new("concurrent");
        let spool = Spool::open(dir.path()).unwrap();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let spool = &spool;
                s.spawn(move || {
                    for n in 0..25 {
                        let m = id(1000 + t * 100 + n);
                        let c = content_for(&m);
                        spool.store(Area::Queue, &envelope(&m, c.len()), &c).unwrap();
                    }
                });
            }
        });
        let ids = spool.ids(Area::Queue).unwrap();
        assert_eq!(ids.len(), 100);
        for m in ids {
            assert_eq!(spool.load(Area::Queue, &m).unwrap().1, content_for(&m));
        }
    }

    const CRASH_DIR_ENV: &str = "MXLB_SPOOL_CRASH_DIR";
    const CHILD_TEST: &str = "relay::spool::tests::crash_child";
    const STORED_TAG: &str = "mxlb-spool-stored ";
    const UPDATED_TAG: &str = "mxlb-spool-updated ";

    /// Run by [`sigkill_never_loses_an_acknowledged_message`] in a child process: stores (and
    /// updates every third) message as fast as it can, printing each id only once the call
    /// returned, i.e. once it would have been acknowledged. Does nothing when run by hand.
    #[test]
    #[ignore = "the child process of sigkill_never_loses_an_acknowledged_message"]
    fn crash_child() {
        let Some(dir) = std::env::var_os(CRASH_DIR_ENV) else { return };
        let spool = Spool::open(Path::new(&dir)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut out = io::stdout().lock();
        for n in 0..100_000u32 {
            if Instant::now() > deadline {
                break;
            }
            let m = MessageId::generate();
            let content = content_for(&m);
            let env = envelope(&m, content.len());
            spool.store(Area::Queue, &env, &content).unwrap();
            writeln!(out, "{STORED_TAG}{m}").unwrap();
            out.flush().unwrap();
            if n % 3 == 0 {
                spool.update(Area::Queue, &delivered(env, &format!("250 {m}"))).unwrap();
                writeln!(out, "{UPDATED_TAG}{m}").unwrap();
                out.flush().unwrap();
            }
        }
    }

    #[test]
    fn sigkill_never_loses_an_acknowledged_message() {
        let exe = std::env::current_exe().unwrap();
        let mut rng = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
        let seed = rng;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for round in 0..5 {
            let dir = TestDir::new(&format!("crash{round}"));
            let kill_after = 10 + (next() % 400) as usize;
            // A fraction of the mean time between two stores, measured below, so the kill can
            // land anywhere in a store (build profile and disk speed change that time a lot).
            let phase = next() % 1000;
            let mut ctx = format!("seed {seed} round {round}: kill after {kill_after} stores");
            let mut child = Command::new(&exe)
                .args(["--exact", CHILD_TEST, "--ignored", "--nocapture", "--test-threads=1"])
                .env(CRASH_DIR_ENV, dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            let (tx, rx) = mpsc::channel::<String>();
            let reader = std::thread::spawn(move || {
                for line in io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            let (mut stored, mut updated) = (HashSet::new(), HashSet::new());
            // Searched for anywhere in the line: libtest prints `test <name> ... ` without a
            // newline before the child test runs, so the first report shares its line.
            let mut record = |line: String| {
                if let Some((_, m)) = line.split_once(STORED_TAG) {
                    stored.insert(m.parse::<MessageId>().unwrap());
                } else if let Some((_, m)) = line.split_once(UPDATED_TAG) {
                    updated.insert(m.parse::<MessageId>().unwrap());
                }
            };
            let started = Instant::now();
            let mut seen = 0;
            while seen < kill_after {
                match rx.recv_timeout(Duration::from_secs(20)) {
                    Ok(line) => {
                        seen += usize::from(line.contains(STORED_TAG));
                        record(line);
                    }
                    Err(e) => {
                        // SAFETY: kill(2) on our own child, which has not been reaped.
                        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
                        let _ = child.wait();
                        panic!("{ctx}: the child stopped after {seen} stores ({e:?}, {:?})", started.elapsed());
                    }
                }
            }
            let per_store = started.elapsed() / kill_after as u32;
            let extra_delay = (per_store * 2 * phase as u32 / 1000).min(Duration::from_millis(100));
            ctx = format!("{ctx} + {extra_delay:?} (a store takes {per_store:?})");
            std::thread::sleep(extra_delay);
            // SAFETY: as above.
            assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGKILL) }, 0);
            let status = child.wait().unwrap();
            assert_eq!(status.signal(), Some(libc::SIGKILL), "{ctx}: the child must die mid-run, not finish");
            reader.join().unwrap();
            rx.try_iter().for_each(&mut record);

            let spool = Spool::open(dir.path()).unwrap();
            let ids = spool.ids(Area::Queue).unwrap();
            let on_disk: HashSet<_> = ids.iter().cloned().collect();
            assert!(stored.is_subset(&on_disk), "{ctx}: acknowledged messages missing: {:?}", stored.difference(&on_disk).collect::<Vec<_>>());
            assert!(on_disk.len() <= stored.len() + 1, "{ctx}: at most the message in flight is stored but unacknowledged: {} acknowledged, on disk only: {:?}", stored.len(), on_disk.difference(&stored).collect::<Vec<_>>());
            for m in &ids {
                let (env, content) = spool.load(Area::Queue, m).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                assert_eq!(content, content_for(m), "{ctx}: {m} content differs");
                let plain = envelope(m, content.len());
                let done = delivered(plain.clone(), &format!("250 {m}"));
                if updated.contains(m) {
                    assert_eq!(env, done, "{ctx}: {m} lost an acknowledged update");
                } else {
                    assert!(env == plain || env == done, "{ctx}: {m} has a state nobody wrote: {env:?}");
                }
            }
            assert_eq!(fs::read_dir(dir.path().join("corrupt")).unwrap().count(), 0, "{ctx}: nothing should be corrupt");
            assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "{ctx}");
            eprintln!("{ctx}: {} acknowledged, {} on disk", stored.len(), on_disk.len());
        }
    }
}
