//! Kernel-assisted byte relaying for the POP3/IMAP proxy (sockmap splice).
//!
//! Once a plaintext session is logged in, the proxy has nothing left to say: it only copies
//! bytes between the client and the back-end until both are done. Copying through userspace
//! costs two copies and at least two wake-ups per chunk (read on one socket, write on the
//! other). [`Splicer::splice`] instead puts both sockets into a BPF sock hash
//! (`MXLB_SPLICE_SOCKS`) whose sk_skb stream-verdict program (`mxlb_splice`, in `lb-ebpf`)
//! sends every segment received on one socket out of the other, inside the kernel: no copy
//! to userspace, and the proxy task sleeps until an end of stream, a reset, or the idle limit.
//! TLS-terminated sessions cannot use this (the bytes must be decrypted in userspace); they
//! keep copying in userspace.
//!
//! # How the proxy calls it
//!
//! After login, with both sockets connected and **nothing unread**: the proxy must have
//! written any bytes it already read (its own buffers, e.g. a `BufReader`'s) to the other side,
//! and neither socket may have bytes waiting in its receive queue (a pipelined command).
//! `splice` checks the second condition (`FIONREAD`) and refuses with
//! [`SpliceError::Refused`], handing both streams back ([`SpliceError::into_streams`]), so the
//! caller can copy in userspace instead. The call returns when the session is over (both
//! directions closed, a reset, or the idle limit); the sockets are closed and the map entries
//! removed on every path (also when the future is dropped).
//!
//! # Kernel behaviour (6.18; tests in `tests/tests/sockmap_splice.rs`)
//!
//! The first point is read from the kernel source (`sk_psock_verdict_data_ready`,
//! `tcp_read_skb`, `tcp_set_rcvlowat`), not yet reproduced by a test; the others are tested.
//!
//! - **Data queued before insertion is not relayed by itself.** The verdict runs when TCP
//!   signals new data (`sk_data_ready`); bytes already in the receive queue when the socket is
//!   inserted stay there until the next segment arrives, then they go through the verdict
//!   first (`tcp_read_skb` takes the whole queue, in order). So a pipelined command would
//!   stall until the client sent something else. Hence the `FIONREAD` refusal; and for bytes
//!   that arrive between that check and the insertion, `splice` pokes each socket once after
//!   the insertion with `setsockopt(SO_RCVLOWAT, 1)`, which runs `tcp_data_ready` and thereby
//!   the verdict on whatever is queued, in order (the queue then holds whole, unread skbs, so
//!   nothing is duplicated).
//! - **End of stream.** A FIN is not relayed: the verdict sees the segments, the FIN only
//!   shuts the receiving socket's read side (userspace sees `EPOLLRDHUP`, a read would return
//!   0). The redirected bytes are sent asynchronously (the peer's psock backlog worker), so
//!   shutting down the peer at once could put the FIN before data still queued in the kernel,
//!   which the kernel then discards (a send after `SHUT_WR`). `splice` therefore waits until
//!   the peer's send queue has taken every byte the program counted for that direction
//!   (`TCP_INFO` `bytes_acked` + `SIOCOUTQ` against the count at insertion) and only then calls
//!   `shutdown(Write)` on the peer. Half-close works both ways. The bare FIN skb itself (length
//!   0) also runs the verdict; redirected, or passed while redirected bytes are still queued,
//!   it reaches the psock backlog, which treats a 0-byte send as a hard error and sets EPIPE
//!   on the socket (a false "reset"): the program drops empty skbs.
//! - **Reset.** An RST on one socket makes it `EPOLLERR`/`EPOLLHUP`; the kernel removes a
//!   closed socket from the sock hash, so bytes for it are dropped by the verdict. `splice`
//!   flushes what the dead side had sent to the live side (bounded), closes both and returns
//!   [`SessionEnd::Reset`].
//! - **Backpressure.** A redirected skb stays charged to the receiving socket until the peer
//!   has sent it, so a slow reader shrinks the sender's window instead of growing kernel
//!   memory; nothing is dropped (tested with a reader that pauses, then reads megabytes).
//! - **Wake-ups.** `splice` watches the two sockets through its own epoll instance registered
//!   for `EPOLLRDHUP` only (plus the implicit `EPOLLERR`/`EPOLLHUP`), not through tokio's
//!   reactor, so data flowing through the kernel does not wake the proxy at all.
//!
//! # Loading
//!
//! The verdict program lives in the same object as the XDP programs ([`crate::EBPF_OBJECT`]).
//! aya creates every map of an object when it loads it, and pins the pinned-by-name XDP maps
//! (under `/sys/fs/bpf` when no directory is given, *reusing* any map already pinned there).
//! [`Splicer::load`] therefore loads with a private, freshly created pin directory
//! (`/sys/fs/bpf/mxlb-splice-PID-N`) and removes it right after the load, and shrinks the big
//! XDP maps to one entry: nothing a running `mxlb run` pinned is opened or touched, and the
//! unused XDP maps cost almost nothing. The two splice maps are not pinned (one set per
//! process). Needs root or CAP_BPF + CAP_NET_ADMIN, and a mounted bpffs (mounted if missing).
//!
//! # Kernel notes
//!
//! Verdict-only attachment (no stream parser) needs Linux 5.13 (`read_skb` path; older
//! kernels need a parser program that returns the skb length). `bpf_get_socket_cookie` for
//! sk_skb and the counters used here are available on any kernel that has that. TCP only; both
//! sockets must be in the same network namespace as nothing else (sock hashes are not bound to
//! a namespace).
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd, FromRawFd as _, OwnedFd, RawFd},
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, SockHash},
    programs::{ProgramError, SkSkb},
};
use lb_common::{MAP_SPLICE_PEERS, MAP_SPLICE_SOCKS, PROG_SPLICE, SplicePeer};
use tokio::{io::AsyncWriteExt as _, io::unix::AsyncFd, net::TcpStream};

use crate::EBPF_OBJECT;

/// Errors of [`Splicer`].
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    /// The bpffs needed for the (temporary) pins is missing and cannot be mounted.
    #[error("bpffs: {0}")]
    Bpffs(String),
    /// The kernel refused the object (no BPF permission, unsupported kernel).
    #[error("loading the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    /// The verdict program failed to load or attach.
    #[error("program {PROG_SPLICE}: {0}")]
    Program(#[source] ProgramError),
    /// A splice map is missing from the object or has the wrong type.
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    /// Nothing was done: the caller keeps the session and copies in userspace.
    #[error("not spliced: {reason}")]
    Refused {
        reason: Refusal,
        /// The two streams, unchanged, as passed (client side, back-end side).
        streams: Box<(TcpStream, TcpStream)>,
    },
    /// A socket call failed after the sockets were handed over; the session is closed.
    #[error("spliced session: {0}")]
    Io(#[source] io::Error),
}

impl SpliceError {
    /// The streams back, for [`SpliceError::Refused`] (the caller then copies in userspace).
    pub fn into_streams(self) -> Option<(TcpStream, TcpStream)> {
        match self {
            SpliceError::Refused { streams, .. } => Some(*streams),
            _ => None,
        }
    }
}

/// Which socket of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The first stream passed to [`Splicer::splice`] (the client's connection).
    Client,
    /// The second stream (the connection to the back-end).
    Backend,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Backend => "back-end",
        })
    }
}

/// Why [`Splicer::splice`] handed the streams back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Bytes are waiting in this side's receive queue: the verdict would not see them until
    /// more arrive, so the caller must forward them (and may call `splice` again later).
    #[error("{side} socket has {bytes} unread bytes")]
    Unread { side: Side, bytes: usize },
    /// The socket could not be put into the sock hash (not an established TCP socket, the map
    /// is full, ...).
    #[error("{side} socket cannot be spliced: {message}")]
    Insert { side: Side, message: String },
}

/// How the session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// Both sides sent FIN (each one was forwarded once its bytes were through).
    Closed,
    /// This side reset the connection (or failed with another socket error).
    Reset(Side),
    /// No byte moved in either direction for [`SpliceOptions::idle_timeout`].
    Idle,
}

/// Tunables of [`Splicer::splice`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpliceOptions {
    /// End the session when no byte moved either way for this long (None: never; a peer
    /// that vanishes without FIN or RST is then detected only by TCP keepalive, which the
    /// caller may enable on the streams before the call).
    pub idle_timeout: Option<Duration>,
    /// How long an end of stream may wait for the kernel to hand the last relayed bytes to
    /// the other socket *without progress* before the FIN is sent anyway (data then lost).
    pub flush_timeout: Duration,
    /// Written to the client once both sockets are in the map (the proxy's login reply). A
    /// client that waits for it (every POP3/IMAP client after its login) then sends nothing
    /// before the relay is in place, so there is no window in which its next command lands
    /// in a receive queue the verdict does not see. Not written when the splice is refused.
    pub reply_to_client: Vec<u8>,
}

impl Default for SpliceOptions {
    fn default() -> Self {
        SpliceOptions { idle_timeout: None, flush_timeout: Duration::from_secs(30), reply_to_client: Vec::new() }
    }
}

/// What a finished splice did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpliceOutcome {
    /// Bytes the kernel relayed from the client to the back-end.
    pub client_to_backend: u64,
    /// Bytes the kernel relayed from the back-end to the client.
    pub backend_to_client: u64,
    /// Bytes that went through userspace: always 0 (the splice never reads the sockets);
    /// reported so callers and tests can state it.
    pub userspace_bytes: u64,
    /// How the session ended.
    pub end: SessionEnd,
}

/// The loaded and attached verdict program with its two maps; one per process, shared (e.g.
/// in an `Arc`) by all sessions.
pub struct Splicer {
    maps: Mutex<Maps>,
    /// Owns the program and its attachment to the sock hash (detached on drop), and the
    /// (shrunken, unpinned-after-load) XDP maps aya created with it.
    _ebpf: Ebpf,
}

struct Maps {
    socks: SockHash<MapData, u64>,
    peers: HashMap<MapData, u64, SplicePeer>,
}

/// XDP maps shrunk to one entry when the object is loaded only for the splice program.
const UNUSED_XDP_MAPS: [&str; 14] = [
    lb_common::MAP_VIPS,
    lb_common::MAP_VIP_SLOTS,
    lb_common::MAP_VIP_FILTER,
    lb_common::MAP_BACKENDS,
    lb_common::MAP_RINGS,
    lb_common::MAP_CONNTRACK,
    lb_common::MAP_VIP_STATS,
    lb_common::MAP_BACKEND_STATS,
    lb_common::MAP_REASON_STATS,
    lb_common::MAP_BLOCK,
    lb_common::MAP_ALLOW,
    lb_common::MAP_GROUPS,
    lb_common::MAP_SYN_BUCKETS,
    lb_common::MAP_EDGE_CONFIG,
];

/// Distinguishes the temporary pin directories of several loads in one process.
static LOADS: AtomicU64 = AtomicU64::new(0);

impl Splicer {
    /// Loads the object, loads `mxlb_splice` and attaches it to the sock hash as stream
    /// verdict. Once per process.
    pub fn load() -> Result<Splicer, SpliceError> {
        let n = LOADS.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(format!("/sys/fs/bpf/mxlb-splice-{}-{n}", std::process::id()));
        crate::dataplane::ensure_bpffs(&dir).map_err(|e| SpliceError::Bpffs(e.to_string()))?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&dir);
        for name in UNUSED_XDP_MAPS {
            loader.map_max_entries(name, 1);
        }
        let loaded = loader.load(EBPF_OBJECT);
        // The pins were only a means to create the maps; the fds keep them alive.
        let _ = std::fs::remove_dir_all(&dir);
        let mut ebpf = loaded.map_err(SpliceError::Load)?;
        let map_err = |name: &'static str| move |source| SpliceError::Map { name, source };
        let socks = ebpf
            .take_map(MAP_SPLICE_SOCKS)
            .ok_or(SpliceError::Map { name: MAP_SPLICE_SOCKS, source: MapError::InvalidName { name: MAP_SPLICE_SOCKS.into() } })?;
        let socks: SockHash<MapData, u64> = socks.try_into().map_err(map_err(MAP_SPLICE_SOCKS))?;
        let peers = ebpf
            .take_map(MAP_SPLICE_PEERS)
            .ok_or(SpliceError::Map { name: MAP_SPLICE_PEERS, source: MapError::InvalidName { name: MAP_SPLICE_PEERS.into() } })?;
        let peers: HashMap<MapData, u64, SplicePeer> = peers.try_into().map_err(map_err(MAP_SPLICE_PEERS))?;
        let prog: &mut SkSkb = ebpf
            .program_mut(PROG_SPLICE)
            .ok_or(SpliceError::Program(ProgramError::NotLoaded))?
            .try_into()
            .map_err(SpliceError::Program)?;
        prog.load().map_err(SpliceError::Program)?;
        let map_fd = socks.fd().try_clone().map_err(|e| SpliceError::Map { name: MAP_SPLICE_SOCKS, source: MapError::SyscallError(aya::sys::SyscallError { call: "dup", io_error: e }) })?;
        prog.attach(&map_fd).map_err(SpliceError::Program)?;
        Ok(Splicer { maps: Mutex::new(Maps { socks, peers }), _ebpf: ebpf })
    }

    /// The counters of one socket's direction, if it is spliced now (socket cookie from
    /// [`socket_cookie`]). For tests and diagnostics.
    pub fn peer_entry(&self, cookie: u64) -> Option<SplicePeer> {
        self.lock().peers.get(&cookie, 0).ok()
    }

    /// Number of sockets in the sock hash now (both sides of every spliced session).
    pub fn spliced_sockets(&self) -> usize {
        self.lock().socks.keys().filter(|k| k.is_ok()).count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        // A panic while holding the lock cannot leave the maps inconsistent (each call is one
        // syscall), so a poisoned lock is still usable.
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Relays `client` ⇄ `backend` in the kernel until the session is over, then closes both.
    ///
    /// Preconditions (see the module doc): both connected, the caller's own buffers already
    /// forwarded, no unread bytes in either receive queue (else [`SpliceError::Refused`] with
    /// the streams).
    pub async fn splice(
        &self,
        mut client: TcpStream,
        backend: TcpStream,
        options: SpliceOptions,
    ) -> Result<SpliceOutcome, SpliceError> {
        let refuse = |reason, client, backend| SpliceError::Refused { reason, streams: Box::new((client, backend)) };
        let fds = [client.as_raw_fd(), backend.as_raw_fd()];
        for (side, fd) in [(Side::Client, fds[0]), (Side::Backend, fds[1])] {
            match unread(fd) {
                Ok(0) => {}
                Ok(bytes) => return Err(refuse(Refusal::Unread { side, bytes }, client, backend)),
                Err(e) => return Err(refuse(Refusal::Insert { side, message: e.to_string() }, client, backend)),
            }
        }
        let cookies = match (socket_cookie(client.as_raw_fd()), socket_cookie(backend.as_raw_fd())) {
            (Ok(c), Ok(b)) => [c, b],
            (Err(e), _) => return Err(refuse(Refusal::Insert { side: Side::Client, message: e.to_string() }, client, backend)),
            (_, Err(e)) => return Err(refuse(Refusal::Insert { side: Side::Backend, message: e.to_string() }, client, backend)),
        };
        // What each socket had queued for sending before the kernel starts adding to it.
        let mut base = match (write_offset(fds[0]), write_offset(fds[1])) {
            (Ok(c), Ok(b)) => [c, b],
            (Err(e), _) => return Err(refuse(Refusal::Insert { side: Side::Client, message: e.to_string() }, client, backend)),
            (_, Err(e)) => return Err(refuse(Refusal::Insert { side: Side::Backend, message: e.to_string() }, client, backend)),
        };
        let entries = match self.insert(cookies, fds) {
            Ok(e) => e,
            Err(reason) => return Err(refuse(reason, client, backend)),
        };
        // From here on the sockets are the kernel's (a failed write drops `entries`: out again).
        client.write_all(&options.reply_to_client).await.map_err(SpliceError::Io)?;
        // Queued by us, not relayed: the flush before a forwarded FIN must not count it.
        base[0] = base[0].wrapping_add(options.reply_to_client.len() as u64);
        // Bytes that arrived between the FIONREAD check and the insertion sit in a receive
        // queue the verdict has not seen: poke it.
        let owned = match (client.into_std(), backend.into_std()) {
            (Ok(c), Ok(b)) => [OwnedFd::from(c), OwnedFd::from(b)],
            (Err(e), _) | (_, Err(e)) => return Err(SpliceError::Io(e)),
        };
        for fd in &owned {
            kick(fd.as_raw_fd()).map_err(SpliceError::Io)?;
        }
        let end = Session { splicer: self, fds: &owned, cookies, base, options }.run().await;
        let counts = [0, 1].map(|i| self.peer_entry(cookies[i]).map(|p| p.bytes).unwrap_or(0));
        drop(entries);
        drop(owned);
        Ok(SpliceOutcome {
            client_to_backend: counts[0],
            backend_to_client: counts[1],
            userspace_bytes: 0,
            end: end.map_err(SpliceError::Io)?,
        })
    }

    /// Puts both sockets into the sock hash, then the peer entries that turn the relay on.
    fn insert(&self, cookies: [u64; 2], fds: [RawFd; 2]) -> Result<Entries<'_>, Refusal> {
        let mut maps = self.lock();
        let entries = Entries { splicer: self, cookies };
        for (i, side) in [Side::Client, Side::Backend].into_iter().enumerate() {
            // SAFETY: the fd belongs to a stream the caller handed us, open for this call.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fds[i]) };
            maps.socks
                .insert(cookies[i], fd.as_fd().as_raw_fd(), 0)
                .map_err(|e| Refusal::Insert { side, message: error_chain(&e) })?;
        }
        for (i, side) in [Side::Client, Side::Backend].into_iter().enumerate() {
            let peer = SplicePeer { peer: cookies[1 - i], bytes: 0, segments: 0 };
            maps.peers
                .insert(cookies[i], peer, 0)
                .map_err(|e| Refusal::Insert { side, message: error_chain(&e) })?;
        }
        Ok(entries)
    }
}

/// Removes a session's map entries when dropped: peers first (the verdict then passes
/// instead of redirecting to a socket that is about to leave), then the sockets.
struct Entries<'a> {
    splicer: &'a Splicer,
    cookies: [u64; 2],
}

impl Drop for Entries<'_> {
    fn drop(&mut self) {
        let mut maps = self.splicer.lock();
        for c in self.cookies {
            // NotFound is fine: never inserted, or already gone.
            let _ = maps.peers.remove(&c);
        }
        for c in self.cookies {
            // The kernel also drops a socket from the hash when it closes.
            let _ = maps.socks.remove(&c);
        }
    }
}

/// One spliced session's wait loop.
struct Session<'a> {
    splicer: &'a Splicer,
    fds: &'a [OwnedFd; 2],
    cookies: [u64; 2],
    base: [u64; 2],
    options: SpliceOptions,
}

/// Longest sleep between two checks while waiting for a flush or the idle limit.
const MAX_POLL: Duration = Duration::from_millis(50);

impl Session<'_> {
    async fn run(&self) -> io::Result<SessionEnd> {
        let ep = Epoll::new()?;
        for (i, fd) in self.fds.iter().enumerate() {
            ep.add(fd.as_raw_fd(), libc::EPOLLRDHUP as u32, i as u64)?;
        }
        // SAFETY: the epoll fd is owned by the Epoll inside the AsyncFd and closed only when
        // the AsyncFd (which deregisters first) drops.
        let afd = unsafe { AsyncFd::register_with_interest(ep, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        // Direction i (from socket i to socket 1-i) still open.
        let mut open = [true, true];
        let mut last_bytes = self.moved();
        let mut last_move = Instant::now();
        let idle_tick = self.options.idle_timeout.map(|t| (t / 4).clamp(Duration::from_millis(10), Duration::from_secs(5)));
        loop {
            let ready = match idle_tick {
                Some(t) => tokio::time::timeout(t, afd.readable()).await.ok(),
                None => Some(afd.readable().await),
            };
            if let Some(guard) = ready {
                let mut guard = guard?;
                let events = afd.get_ref().wait()?;
                guard.clear_ready();
                for (events, i) in events {
                    let i = i as usize;
                    // An RST sets the socket error (EPOLLERR); a FIN only RDHUP, plus HUP once
                    // our own write side is shut too, which is a normal end.
                    let err = take_error(self.fds[i].as_raw_fd());
                    let error = err.map(|e| e != 0).unwrap_or(true);
                    if events & (libc::EPOLLERR as u32) != 0 || error {
                        // RST (or an error): relay what the dead side sent, then close.
                        let side = if i == 0 { Side::Client } else { Side::Backend };
                        if open[i] {
                            self.flush(i).await;
                        }
                        let _ = shutdown(self.fds[1 - i].as_raw_fd(), libc::SHUT_RDWR);
                        return Ok(SessionEnd::Reset(side));
                    }
                    if events & ((libc::EPOLLRDHUP | libc::EPOLLHUP) as u32) != 0 && open[i] {
                        // FIN on socket i: forward it once its bytes are through.
                        open[i] = false;
                        self.flush(i).await;
                        shutdown(self.fds[1 - i].as_raw_fd(), libc::SHUT_WR)?;
                        // Only errors and hang-ups from now on (RDHUP stays set).
                        afd.get_ref().modify(self.fds[i].as_raw_fd(), 0, i as u64)?;
                    }
                }
                if open == [false, false] {
                    return Ok(SessionEnd::Closed);
                }
            }
            if let Some(limit) = self.options.idle_timeout {
                let now = self.moved();
                if now != last_bytes {
                    last_bytes = now;
                    last_move = Instant::now();
                } else if last_move.elapsed() >= limit {
                    for fd in self.fds {
                        let _ = shutdown(fd.as_raw_fd(), libc::SHUT_RDWR);
                    }
                    return Ok(SessionEnd::Idle);
                }
            }
        }
    }

    /// Bytes relayed so far, both directions.
    fn moved(&self) -> u64 {
        self.cookies.iter().map(|c| self.splicer.peer_entry(*c).map(|p| p.bytes).unwrap_or(0)).sum()
    }

    /// Waits until socket `1 - from` has queued every byte the verdict relayed from socket
    /// `from` (bounded: gives up after `flush_timeout` without progress, or when the target
    /// socket is no longer able to send).
    async fn flush(&self, from: usize) {
        let to = 1 - from;
        // Serialise with the softirq that delivered the FIN: the setsockopt takes the socket
        // lock, so when it returns the verdict has run on every queued segment (and a segment
        // left in the queue is pushed through it) and the counter is final.
        let _ = kick(self.fds[from].as_raw_fd());
        let relayed = self.splicer.peer_entry(self.cookies[from]).map(|p| p.bytes).unwrap_or(0);
        let target = self.base[to].wrapping_add(relayed);
        let mut sleep = Duration::from_micros(200);
        let mut best = 0u64;
        let mut since = Instant::now();
        loop {
            let Ok(now) = write_offset(self.fds[to].as_raw_fd()) else { return };
            if now.wrapping_sub(target) as i64 >= 0 {
                return;
            }
            if !can_send(self.fds[to].as_raw_fd()) {
                return;
            }
            if now != best {
                best = now;
                since = Instant::now();
            } else if since.elapsed() >= self.options.flush_timeout {
                tracing::warn!(missing = target.wrapping_sub(now), "splice: end of stream forwarded before the last relayed bytes");
                return;
            }
            tokio::time::sleep(sleep).await;
            sleep = (sleep * 2).min(MAX_POLL);
        }
    }
}

/// A private epoll instance watching the two sockets for end of stream and errors only, so
/// data the kernel relays never wakes the proxy.
struct Epoll(OwnedFd);

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Epoll {
    fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall; the fd is owned from here on.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: data };
        // SAFETY: valid fds and a valid event struct.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn add(&self, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, data)
    }

    fn modify(&self, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, data)
    }

    /// The pending events, without blocking: (events, data) pairs.
    fn wait(&self) -> io::Result<Vec<(u32, u64)>> {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 4];
        // SAFETY: the buffer holds 4 events.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), evs.as_mut_ptr(), evs.len() as i32, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(Vec::new()) } else { Err(e) };
        }
        Ok(evs[..n as usize].iter().map(|e| ({ e.events }, { e.u64 })).collect())
    }
}

/// `getsockopt(SO_COOKIE)`: the socket's 64-bit id, the key of both splice maps.
pub fn socket_cookie(fd: RawFd) -> io::Result<u64> {
    let mut v = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: v and len are valid for the duration of the call.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE, (&raw mut v).cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// `ioctl(FIONREAD)`: bytes in the receive queue that userspace has not read.
pub fn unread(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// `setsockopt(SO_RCVLOWAT, 1)` (the default value): TCP re-evaluates readiness and calls
/// `sk_data_ready`, which for a spliced socket runs the verdict on whatever is queued. Also
/// waits for the socket lock, i.e. for any softirq processing the socket right now.
fn kick(fd: RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: one int option.
    let rc = unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, (&raw const one).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn tcp_info(fd: RawFd) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain integers; the kernel fills at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// Bytes ever queued for sending on `fd` (plus a constant): `bytes_acked` + `SIOCOUTQ`
/// (= `write_seq` - `snd_una`). Read in that order, a concurrent ACK can only make the sum
/// smaller than the truth, so a flush never ends early.
fn write_offset(fd: RawFd) -> io::Result<u64> {
    let acked = tcp_info(fd)?.tcpi_bytes_acked;
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut outq) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(acked.wrapping_add(outq.max(0) as u64))
}

/// Whether `fd` can still send (established or half-closed by the peer).
fn can_send(fd: RawFd) -> bool {
    /// `TCP_ESTABLISHED` and `TCP_CLOSE_WAIT` of the kernel's `tcp_states.h` (not in libc).
    const ESTABLISHED: u8 = 1;
    const CLOSE_WAIT: u8 = 8;
    matches!(tcp_info(fd).map(|i| i.tcpi_state), Ok(ESTABLISHED | CLOSE_WAIT))
}

/// Reads and clears `SO_ERROR`.
fn take_error(fd: RawFd) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: one int.
    if unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, (&raw mut v).cast(), &mut len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

fn shutdown(fd: RawFd, how: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we own.
    if unsafe { libc::shutdown(fd, how) } != 0 {
        let e = io::Error::last_os_error();
        // Already disconnected: nothing left to shut down.
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_hands_the_streams_back_and_others_do_not() {
        assert!(SpliceError::Bpffs("x".into()).into_streams().is_none());
        assert!(SpliceError::Io(io::Error::other("x")).into_streams().is_none());
    }

    #[test]
    fn refusal_messages_name_the_side() {
        let r = Refusal::Unread { side: Side::Backend, bytes: 7 };
        assert_eq!(r.to_string(), "back-end socket has 7 unread bytes");
    }

    #[test]
    fn socket_helpers_on_a_plain_pair() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (s, _) = l.accept().expect("accept");
        let (cc, sc) = (socket_cookie(c.as_raw_fd()).expect("cookie"), socket_cookie(s.as_raw_fd()).expect("cookie"));
        assert_ne!(cc, sc, "each socket has its own cookie");
        assert_eq!(unread(s.as_raw_fd()).expect("fionread"), 0);
        let before = write_offset(c.as_raw_fd()).expect("offset");
        use std::io::{Read as _, Write as _};
        (&c).write_all(b"hello").expect("write");
        // An ACK landing between the two reads of write_offset undercounts; the next read is exact.
        let grown = (0..1000).map(|_| write_offset(c.as_raw_fd()).expect("offset") - before).find(|&d| d == 5);
        assert_eq!(grown, Some(5), "the write offset counts queued bytes");
        let mut buf = [0u8; 5];
        (&s).read_exact(&mut buf).expect("read");
        assert_eq!(unread(s.as_raw_fd()).expect("fionread"), 0);
        assert!(can_send(s.as_raw_fd()));
    }
}
