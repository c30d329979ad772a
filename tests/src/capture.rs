//! Wire capture for timing failover as the segment sees it: VRRP advertisements, ARP (gratuitous
//! and plain) and ICMPv6 neighbour advertisements, with kernel receive timestamps.
//!
//! [`WireCapture::segment`] is the one to use in the lab: an `AF_PACKET` socket in the bridge
//! namespace that takes every frame as it *enters* the bridge through a host's port, so each
//! frame any host puts on the segment is seen exactly once, unicast included (VRRP to unicast
//! peers, ARP replies), tagged with the port it came in on. [`WireCapture::start`] listens on one
//! device instead, e.g. the client's `eth0` to see what the client receives (multicast adverts,
//! gratuitous ARP, unsolicited NA; not unicast between other hosts), or the bridge device itself
//! (only what the bridge floods: broadcast and multicast). Frames a device *sends*
//! (`PACKET_OUTGOING`) are never recorded, so nothing is counted twice.
//!
//! Cost: a classic BPF filter on the socket passes only ARP, IPv4/IPv6 protocol 112 and ICMPv6
//! NAs (without extension headers), so SMTP load through the bridge never reaches userspace. A
//! background thread reads the socket (timeout 50 ms, so it stops within that on drop) and keeps
//! at most [`MAX_EVENTS`] events; later ones are counted in [`WireCapture::overflowed`].
//!
//! Time: each frame carries its kernel receive timestamp (`SO_TIMESTAMPNS`, `CLOCK_REALTIME`),
//! stored as [`WireEvent::at`], the time since the capture started. [`WireCapture::at`] and
//! [`WireCapture::instant_of`] convert between that clock and [`Instant`]s taken by the test
//! (e.g. when it killed a process), assuming the real-time clock is not stepped meanwhile.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let lab = lab::Lab::builder().lbs(2).vip_by_arp().build()?;
//! let cap = lab::capture::WireCapture::segment(&lab)?;
//! // ... kill the master at `t_kill` ...
//! # let t_kill = std::time::Instant::now();
//! let after = cap.at(t_kill);
//! let first = cap.first_advert_from(lab.lb_n(2).mac(), 51, after);
//! let last = cap.last_advert_from(lab.lb_n(1).mac(), 51, first.as_ref().map_or(cap.elapsed(), |e| e.at));
//! # Ok(()) }
//! ```

use crate::{Lab, Netns};
use anyhow::{Context, Result};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Most events kept by one capture.
pub const MAX_EVENTS: usize = 100_000;
/// IP protocol / IPv6 next header of VRRP.
pub const IPPROTO_VRRP: u8 = 112;

/// A VRRP advertisement (v2 or v3, IPv4 or IPv6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advert {
    /// 2 or 3.
    pub version: u8,
    pub vrid: u8,
    pub priority: u8,
    /// Advertisement interval in centiseconds (v2: its seconds × 100).
    pub interval_cs: u16,
    /// The IP source (IPv6: the sender's link-local address).
    pub src_ip: IpAddr,
    /// 224.0.0.18 / ff02::12, or a unicast peer.
    pub dst_ip: IpAddr,
    /// The virtual addresses it carries.
    pub addrs: Vec<IpAddr>,
}

/// What a recorded frame was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireKind {
    /// VRRP advertisement.
    Advert(Advert),
    /// Gratuitous ARP: sender IP = target IP = `ip` (request or reply, `op` 1 or 2), announcing
    /// that `ip` is at `sender_mac`.
    Garp {
        ip: Ipv4Addr,
        op: u16,
        sender_mac: [u8; 6],
    },
    /// Any other ARP request (`op` 1) or reply (2).
    Arp {
        op: u16,
        sender_ip: Ipv4Addr,
        sender_mac: [u8; 6],
        target_ip: Ipv4Addr,
    },
    /// ICMPv6 neighbour advertisement for target `ip`; `solicited` false for an unsolicited
    /// (gratuitous) one; `target_mac` from its target link-layer address option.
    Na {
        ip: Ipv6Addr,
        src_ip: Ipv6Addr,
        solicited: bool,
        override_flag: bool,
        target_mac: Option<[u8; 6]>,
    },
}

/// One recorded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireEvent {
    /// Kernel receive time, since the capture started.
    pub at: Duration,
    /// Ethernet source.
    pub src_mac: [u8; 6],
    /// Interface it was received on (in the capture's namespace).
    pub ifindex: u32,
    pub kind: WireKind,
}

impl WireEvent {
    /// The advertisement, if this is one.
    pub fn advert(&self) -> Option<&Advert> {
        match &self.kind {
            WireKind::Advert(a) => Some(a),
            _ => None,
        }
    }
    /// Is this an advertisement for `vrid` from `from`?
    pub fn is_advert_from(&self, from: &Sender, vrid: u8) -> bool {
        self.advert()
            .is_some_and(|a| a.vrid == vrid && from.matches(self.src_mac, a.src_ip))
    }
    /// Is this an announcement that `ip` is at `mac`: a gratuitous ARP (IPv4) or an unsolicited
    /// NA (IPv6) for `ip`, sent from `mac`?
    pub fn is_announcement(&self, mac: [u8; 6], ip: IpAddr) -> bool {
        if self.src_mac != mac {
            return false;
        }
        match (&self.kind, ip) {
            (WireKind::Garp { ip: g, .. }, IpAddr::V4(v4)) => *g == v4,
            (
                WireKind::Na {
                    ip: t,
                    solicited: false,
                    ..
                },
                IpAddr::V6(v6),
            ) => *t == v6,
            _ => false,
        }
    }
}

/// Who sent an advertisement: by Ethernet source (either family) or by IP source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    Mac([u8; 6]),
    Ip(IpAddr),
}

impl Sender {
    fn matches(&self, mac: [u8; 6], ip: IpAddr) -> bool {
        match self {
            Sender::Mac(m) => *m == mac,
            Sender::Ip(i) => *i == ip,
        }
    }
}

impl From<[u8; 6]> for Sender {
    fn from(m: [u8; 6]) -> Sender {
        Sender::Mac(m)
    }
}
impl From<IpAddr> for Sender {
    fn from(i: IpAddr) -> Sender {
        Sender::Ip(i)
    }
}
impl From<Ipv4Addr> for Sender {
    fn from(i: Ipv4Addr) -> Sender {
        Sender::Ip(i.into())
    }
}
impl From<Ipv6Addr> for Sender {
    fn from(i: Ipv6Addr) -> Sender {
        Sender::Ip(i.into())
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing (pure).

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn v4_at(b: &[u8], at: usize) -> Option<Ipv4Addr> {
    let s: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(s))
}

fn v6_at(b: &[u8], at: usize) -> Option<Ipv6Addr> {
    let s: [u8; 16] = b.get(at..at + 16)?.try_into().ok()?;
    Some(Ipv6Addr::from(s))
}

fn mac_at(b: &[u8], at: usize) -> Option<[u8; 6]> {
    b.get(at..at + 6)?.try_into().ok()
}

/// Parses an Ethernet frame (one 802.1Q tag allowed; trailing padding ignored) into its source
/// MAC and what it is, if it is something a capture records.
pub fn parse_frame(frame: &[u8]) -> Option<([u8; 6], WireKind)> {
    let src = mac_at(frame, 6)?;
    let mut off = 12;
    let mut ethertype = be16(frame, off)?;
    if ethertype == 0x8100 {
        off += 4;
        ethertype = be16(frame, off)?;
    }
    let l3 = frame.get(off + 2..)?;
    let kind = match ethertype {
        0x0806 => parse_arp(l3)?,
        0x0800 => parse_ipv4(l3)?,
        0x86dd => parse_ipv6(l3)?,
        _ => return None,
    };
    Some((src, kind))
}

/// An Ethernet/IPv4 ARP packet.
pub fn parse_arp(p: &[u8]) -> Option<WireKind> {
    if be16(p, 0)? != 1 || be16(p, 2)? != 0x0800 || *p.get(4)? != 6 || *p.get(5)? != 4 {
        return None;
    }
    let op = be16(p, 6)?;
    let sender_mac = mac_at(p, 8)?;
    let sender_ip = v4_at(p, 14)?;
    let target_ip = v4_at(p, 24)?;
    Some(if sender_ip == target_ip && !sender_ip.is_unspecified() {
        WireKind::Garp {
            ip: sender_ip,
            op,
            sender_mac,
        }
    } else {
        WireKind::Arp {
            op,
            sender_ip,
            sender_mac,
            target_ip,
        }
    })
}

/// An IPv4 packet carrying VRRP.
pub fn parse_ipv4(p: &[u8]) -> Option<WireKind> {
    let b0 = *p.first()?;
    let ihl = usize::from(b0 & 0x0f) * 4;
    if b0 >> 4 != 4 || ihl < 20 {
        return None;
    }
    let total = usize::from(be16(p, 2)?);
    if *p.get(9)? != IPPROTO_VRRP || total < ihl {
        return None;
    }
    let (src, dst) = (v4_at(p, 12)?, v4_at(p, 16)?);
    let payload = p.get(ihl..total)?;
    parse_vrrp(payload, src.into(), dst.into()).map(WireKind::Advert)
}

/// An IPv6 packet carrying VRRP or an ICMPv6 NA (no extension headers).
pub fn parse_ipv6(p: &[u8]) -> Option<WireKind> {
    if *p.first()? >> 4 != 6 {
        return None;
    }
    let len = usize::from(be16(p, 4)?);
    let nh = *p.get(6)?;
    let (src, dst) = (v6_at(p, 8)?, v6_at(p, 24)?);
    let payload = p.get(40..40 + len)?;
    match nh {
        IPPROTO_VRRP => parse_vrrp(payload, src.into(), dst.into()).map(WireKind::Advert),
        58 => parse_na(payload, src),
        _ => None,
    }
}

/// An ICMPv6 neighbour advertisement (type 136).
pub fn parse_na(icmp: &[u8], src_ip: Ipv6Addr) -> Option<WireKind> {
    if *icmp.first()? != 136 || icmp.len() < 24 {
        return None;
    }
    let flags = icmp[4];
    let ip = v6_at(icmp, 8)?;
    let mut target_mac = None;
    let mut opts = &icmp[24..];
    while opts.len() >= 8 {
        let (t, l) = (opts[0], usize::from(opts[1]) * 8);
        if l == 0 || l > opts.len() {
            break;
        }
        if t == 2 {
            target_mac = mac_at(opts, 2);
        }
        opts = &opts[l..];
    }
    Some(WireKind::Na {
        ip,
        src_ip,
        solicited: flags & 0x40 != 0,
        override_flag: flags & 0x20 != 0,
        target_mac,
    })
}

/// A VRRP v2/v3 advertisement (type 1). Checksums are not verified: the capture reports what
/// was on the wire; the receive checks belong to the VRRP implementation.
pub fn parse_vrrp(v: &[u8], src_ip: IpAddr, dst_ip: IpAddr) -> Option<Advert> {
    let b0 = *v.first()?;
    let (version, typ) = (b0 >> 4, b0 & 0x0f);
    if typ != 1 || !(version == 2 || version == 3) || v.len() < 8 {
        return None;
    }
    let (vrid, priority, count) = (v[1], v[2], usize::from(v[3]));
    let interval_cs = if version == 3 {
        be16(v, 4)? & 0x0fff
    } else {
        u16::from(v[5]) * 100
    };
    let width = if src_ip.is_ipv4() { 4 } else { 16 };
    let addrs = (0..count)
        .map_while(|i| {
            let at = 8 + i * width;
            if width == 4 {
                v4_at(v, at).map(IpAddr::from)
            } else {
                v6_at(v, at).map(IpAddr::from)
            }
        })
        .collect();
    Some(Advert {
        version,
        vrid,
        priority,
        interval_cs,
        src_ip,
        dst_ip,
        addrs,
    })
}

// ---------------------------------------------------------------------------------------------
// The socket.

/// Classic BPF: accept ARP, IPv4 proto 112, IPv6 next header 112, and ICMPv6 type 136 directly
/// after the IPv6 header; drop everything else in the kernel.
fn filter() -> Vec<libc::sock_filter> {
    let f = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    const LDH_ABS: u16 = 0x28; // BPF_LD | BPF_H | BPF_ABS
    const LDB_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    vec![
        f(LDH_ABS, 0, 0, 12),        // 0: ethertype
        f(JEQ_K, 9, 0, 0x0806),      // 1: ARP -> 11
        f(JEQ_K, 1, 0, 0x0800),      // 2: IPv4 -> 4
        f(JEQ_K, 2, 8, 0x86dd),      // 3: IPv6 -> 6, else -> 12
        f(LDB_ABS, 0, 0, 23),        // 4: IPv4 protocol
        f(JEQ_K, 5, 6, 112),         // 5: VRRP -> 11, else -> 12
        f(LDB_ABS, 0, 0, 20),        // 6: IPv6 next header
        f(JEQ_K, 3, 0, 112),         // 7: VRRP -> 11
        f(JEQ_K, 0, 3, 58),          // 8: ICMPv6 -> 9, else -> 12
        f(LDB_ABS, 0, 0, 54),        // 9: ICMPv6 type
        f(JEQ_K, 0, 1, 136),         // 10: NA -> 11, else -> 12
        f(RET_K, 0, 0, 0x0004_0000), // 11: accept
        f(RET_K, 0, 0, 0),           // 12: drop
    ]
}

fn setsockopt<T>(fd: i32, level: i32, name: i32, val: &T) -> std::io::Result<()> {
    // SAFETY: val points to a live T of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (val as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Opens the packet socket in the current thread's namespace, bound to `bind_ifindex` (0 = all).
/// Not `mxlb::afpacket::open`: the filter must be attached before the bind, or frames it would
/// refuse are queued in between.
fn open_socket(bind_ifindex: u32) -> Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("AF_PACKET socket (needs root)");
    }
    // SAFETY: fd is a fresh, owned descriptor.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let fd = sock.as_raw_fd();
    let prog = filter();
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut _,
    };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog).context("SO_ATTACH_FILTER")?;
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, &1i32).context("SO_TIMESTAMPNS")?;
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv).context("SO_RCVTIMEO")?;
    // Bursts of adverts and GARPs must not be lost while the reader sleeps; root may force it.
    let _ = setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &(4i32 << 20));
    // SAFETY: zeroed sockaddr_ll is valid; the fields set are the documented ones.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = bind_ifindex as i32;
    // SAFETY: bind with a properly sized sockaddr_ll.
    let rc = unsafe {
        libc::bind(
            fd,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("bind AF_PACKET socket");
    }
    Ok(sock)
}

/// One received frame: its length, ifindex, packet type and kernel timestamp.
struct Rx {
    len: usize,
    ifindex: u32,
    pkttype: u8,
    stamp: Option<Duration>,
}

/// recvmsg with the timestamp control message; `Ok(None)` on the receive timeout.
fn recv(fd: i32, buf: &mut [u8]) -> std::io::Result<Option<Rx>> {
    // SAFETY: all structures are zeroed and sized; recvmsg fills them.
    unsafe {
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut cbuf = [0u64; 16];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&mut sll as *mut libc::sockaddr_ll).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf);
        let n = libc::recvmsg(fd, &mut msg, 0);
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        let mut stamp = None;
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                stamp = Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        Ok(Some(Rx {
            len: n as usize,
            ifindex: sll.sll_ifindex as u32,
            pkttype: sll.sll_pkttype,
            stamp,
        }))
    }
}

struct Shared {
    events: Mutex<Vec<WireEvent>>,
    arrived: Condvar,
    overflowed: AtomicU64,
    stop: AtomicBool,
    error: Mutex<Option<String>>,
}

/// A running capture (see the module docs). Stops its thread on drop.
pub struct WireCapture {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// CLOCK_REALTIME and Instant at the start: the capture's zero.
    start_real: Duration,
    start_instant: Instant,
    label: String,
}

fn realtime_now() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

impl WireCapture {
    /// Captures frames received on `dev` in `ns` (see the module docs for which device sees
    /// what).
    pub fn start(ns: &Netns, dev: &str) -> Result<WireCapture> {
        let ifindex = ns.link(dev)?.ifindex;
        Self::start_on(ns, ifindex, vec![ifindex], format!("{}:{dev}", ns.name()))
    }

    /// Captures every frame any lab host sends onto the segment, once, as it enters the bridge
    /// through the host's port (also unicast). [`WireEvent::ifindex`] is the port's.
    pub fn segment(lab: &Lab) -> Result<WireCapture> {
        let ns = lab.bridge_ns();
        let mut ports = Vec::new();
        for h in std::iter::once(lab.client())
            .chain(lab.lbs())
            .chain(lab.backends())
        {
            ports.push(ns.link(h.bridge_port())?.ifindex);
        }
        Self::start_on(ns, 0, ports, format!("{} (segment)", ns.name()))
    }

    fn start_on(ns: &Netns, bind: u32, ifindexes: Vec<u32>, label: String) -> Result<WireCapture> {
        let sock = ns.run(move || open_socket(bind))??;
        let shared = Arc::new(Shared {
            events: Mutex::new(Vec::new()),
            arrived: Condvar::new(),
            overflowed: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
        });
        let start_instant = Instant::now();
        let start_real = realtime_now();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("wire-capture".into())
            .spawn(move || reader(sock, ifindexes, start_real, sh))
            .context("capture thread")?;
        Ok(WireCapture {
            shared,
            thread: Some(thread),
            start_real,
            start_instant,
            label,
        })
    }

    /// Everything recorded so far, in arrival order.
    pub fn events(&self) -> Vec<WireEvent> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<WireEvent>> {
        self.shared.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Events dropped because [`MAX_EVENTS`] were already kept.
    pub fn overflowed(&self) -> u64 {
        self.shared.overflowed.load(Ordering::Relaxed)
    }

    /// A read error that ended the capture thread, if any.
    pub fn error(&self) -> Option<String> {
        self.shared
            .error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Now, on the capture's clock.
    pub fn elapsed(&self) -> Duration {
        realtime_now().saturating_sub(self.start_real)
    }

    /// `t` on the capture's clock (zero if before the start).
    pub fn at(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.start_instant)
    }

    /// The [`Instant`] of a time on the capture's clock.
    pub fn instant_of(&self, at: Duration) -> Instant {
        self.start_instant + at
    }

    /// Advertisements for `vrid` (any sender), in order.
    pub fn adverts(&self, vrid: u8) -> Vec<WireEvent> {
        self.lock()
            .iter()
            .filter(|e| e.advert().is_some_and(|a| a.vrid == vrid))
            .cloned()
            .collect()
    }

    /// The first advertisement for `vrid` from `from` at or after `after`.
    pub fn first_advert_from(
        &self,
        from: impl Into<Sender>,
        vrid: u8,
        after: Duration,
    ) -> Option<WireEvent> {
        first_advert_in(&self.lock(), from.into(), vrid, after).cloned()
    }

    /// The last advertisement for `vrid` from `from` strictly before `before`.
    pub fn last_advert_from(
        &self,
        from: impl Into<Sender>,
        vrid: u8,
        before: Duration,
    ) -> Option<WireEvent> {
        last_advert_in(&self.lock(), from.into(), vrid, before).cloned()
    }

    /// The first announcement that `ip` is at `mac` (gratuitous ARP for IPv4, unsolicited NA
    /// for IPv6; see [`WireEvent::is_announcement`]) at or after `after`.
    pub fn first_garp_from(&self, mac: [u8; 6], ip: IpAddr, after: Duration) -> Option<WireEvent> {
        first_garp_in(&self.lock(), mac, ip, after).cloned()
    }

    /// Waits (at most `timeout`) for an event matching `pred`, also among those already
    /// recorded; returns the first match.
    pub fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&WireEvent) -> bool,
    ) -> Option<WireEvent> {
        let deadline = Instant::now() + timeout;
        let mut ev = self.lock();
        let mut seen = 0;
        loop {
            if let Some(e) = ev[seen..].iter().find(|e| pred(e)) {
                return Some(e.clone());
            }
            seen = ev.len();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                return None;
            }
            ev = self
                .shared
                .arrived
                .wait_timeout(ev, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Stops the capture thread (bounded by the socket's 50 ms receive timeout); the events
    /// stay readable.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// A readable summary of the events (for logs and failure messages).
    pub fn dump(&self) -> String {
        let mut s = format!("capture {} ({} events):\n", self.label, self.lock().len());
        for e in self.lock().iter() {
            s += &format!(
                "{:>10.3} ms {} if{} {:?}\n",
                e.at.as_secs_f64() * 1e3,
                crate::mac_to_string(&e.src_mac),
                e.ifindex,
                e.kind
            );
        }
        s
    }
}

fn reader(sock: OwnedFd, ifindexes: Vec<u32>, start_real: Duration, sh: Arc<Shared>) {
    let mut buf = vec![0u8; 2048];
    while !sh.stop.load(Ordering::SeqCst) {
        let rx = match recv(sock.as_raw_fd(), &mut buf) {
            Ok(Some(rx)) => rx,
            Ok(None) => continue,
            Err(e) => {
                *sh.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                break;
            }
        };
        if rx.pkttype == libc::PACKET_OUTGOING || !ifindexes.contains(&rx.ifindex) {
            continue;
        }
        let Some((src_mac, kind)) = parse_frame(&buf[..rx.len.min(buf.len())]) else {
            continue;
        };
        let at = rx
            .stamp
            .unwrap_or_else(realtime_now)
            .saturating_sub(start_real);
        let mut ev = sh.events.lock().unwrap_or_else(|e| e.into_inner());
        if ev.len() >= MAX_EVENTS {
            sh.overflowed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        ev.push(WireEvent {
            at,
            src_mac,
            ifindex: rx.ifindex,
            kind,
        });
        drop(ev);
        sh.arrived.notify_all();
    }
}

impl Drop for WireCapture {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for WireCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireCapture")
            .field("label", &self.label)
            .field("events", &self.lock().len())
            .finish()
    }
}

/// The first advertisement for `vrid` from `from` at or after `after` (see
/// [`WireCapture::first_advert_from`]).
pub fn first_advert_in(
    evs: &[WireEvent],
    from: Sender,
    vrid: u8,
    after: Duration,
) -> Option<&WireEvent> {
    evs.iter()
        .find(|e| e.at >= after && e.is_advert_from(&from, vrid))
}

/// The last advertisement for `vrid` from `from` strictly before `before`.
pub fn last_advert_in(
    evs: &[WireEvent],
    from: Sender,
    vrid: u8,
    before: Duration,
) -> Option<&WireEvent> {
    evs.iter()
        .rev()
        .find(|e| e.at < before && e.is_advert_from(&from, vrid))
}

/// The first announcement that `ip` is at `mac` at or after `after`.
pub fn first_garp_in(
    evs: &[WireEvent],
    mac: [u8; 6],
    ip: IpAddr,
    after: Duration,
) -> Option<&WireEvent> {
    evs.iter()
        .find(|e| e.at >= after && e.is_announcement(mac, ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The advertisement captured from keepalived in vrrp-reference.md, padded to 60 bytes.
    #[test]
    fn keepalived_v4_advert() {
        let mut f = hex("0100 5e00 0012 6a07 0996 e99c 0800
             45c0 0020 0001 0000 ff70 147d c612 000b e000 0012
             3133 9601 0064 cb9d c612 000a");
        f.resize(60, 0);
        let (src, kind) = parse_frame(&f).unwrap();
        assert_eq!(src, [0x6a, 0x07, 0x09, 0x96, 0xe9, 0x9c]);
        assert_eq!(
            kind,
            WireKind::Advert(Advert {
                version: 3,
                vrid: 51,
                priority: 150,
                interval_cs: 100,
                src_ip: "198.18.0.11".parse().unwrap(),
                dst_ip: "224.0.0.18".parse().unwrap(),
                addrs: vec!["198.18.0.10".parse().unwrap()],
            })
        );
        // Truncated in the VRRP header: nothing.
        assert_eq!(parse_frame(&f[..14 + 20 + 6]), None);
        // Same with an 802.1Q tag.
        let mut tagged = f[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0, 0, 5]);
        tagged.extend_from_slice(&f[12..]);
        assert!(matches!(parse_frame(&tagged), Some((_, WireKind::Advert(a))) if a.vrid == 51));
    }

    fn eth(src: [u8; 6], ethertype: u16) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    fn arp(op: u16, sha: [u8; 6], spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
        let mut f = eth(sha, 0x0806);
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
        f.extend_from_slice(&op.to_be_bytes());
        f.extend_from_slice(&sha);
        f.extend_from_slice(&spa);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&tpa);
        f.resize(60, 0);
        f
    }

    #[test]
    fn arp_gratuitous_and_plain() {
        let mac = [2, 0x6d, 0x78, 0, 0, 3];
        let (src, k) = parse_frame(&arp(1, mac, [198, 18, 0, 100], [198, 18, 0, 100])).unwrap();
        assert_eq!(src, mac);
        assert_eq!(
            k,
            WireKind::Garp {
                ip: Ipv4Addr::new(198, 18, 0, 100),
                op: 1,
                sender_mac: mac
            }
        );
        let ev = WireEvent {
            at: Duration::ZERO,
            src_mac: mac,
            ifindex: 1,
            kind: k,
        };
        assert!(ev.is_announcement(mac, "198.18.0.100".parse().unwrap()));
        assert!(!ev.is_announcement([0; 6], "198.18.0.100".parse().unwrap()));
        assert!(!ev.is_announcement(mac, "198.18.0.101".parse().unwrap()));
        let (_, k) = parse_frame(&arp(2, mac, [198, 18, 0, 100], [198, 18, 0, 1])).unwrap();
        assert_eq!(
            k,
            WireKind::Arp {
                op: 2,
                sender_ip: Ipv4Addr::new(198, 18, 0, 100),
                sender_mac: mac,
                target_ip: Ipv4Addr::new(198, 18, 0, 1)
            }
        );
        // An ARP probe (sender 0.0.0.0) is no announcement.
        let (_, k) = parse_frame(&arp(1, mac, [0; 4], [0; 4])).unwrap();
        assert!(matches!(k, WireKind::Arp { .. }));
        // Not Ethernet/IPv4 ARP.
        let mut bad = arp(1, mac, [1; 4], [1; 4]);
        bad[14 + 4] = 8;
        assert_eq!(parse_frame(&bad), None);
    }

    fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, nh: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = eth([2, 0, 0, 0, 0, 9], 0x86dd);
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        f.extend_from_slice(&[nh, 255]);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&dst.octets());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn ipv6_advert_and_na() {
        let ll: Ipv6Addr = "fe80::6d:78ff:fe00:3".parse().unwrap();
        let vip: Ipv6Addr = "2001:db8::100".parse().unwrap();
        let mut vrrp = vec![0x31, 7, 100, 1, 0x00, 0x0a, 0, 0];
        vrrp.extend_from_slice(&vip.octets());
        let f = ipv6(ll, "ff02::12".parse().unwrap(), 112, &vrrp);
        let (_, k) = parse_frame(&f).unwrap();
        assert_eq!(
            k,
            WireKind::Advert(Advert {
                version: 3,
                vrid: 7,
                priority: 100,
                interval_cs: 10,
                src_ip: ll.into(),
                dst_ip: "ff02::12".parse().unwrap(),
                addrs: vec![vip.into()],
            })
        );
        // Unsolicited NA with override and a target link-layer address option.
        let mut na = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
        na.extend_from_slice(&vip.octets());
        na.extend_from_slice(&[2, 1, 2, 0x6d, 0x78, 0, 0, 3]);
        let f = ipv6(ll, "ff02::1".parse().unwrap(), 58, &na);
        let (src, k) = parse_frame(&f).unwrap();
        assert_eq!(
            k,
            WireKind::Na {
                ip: vip,
                src_ip: ll,
                solicited: false,
                override_flag: true,
                target_mac: Some([2, 0x6d, 0x78, 0, 0, 3])
            }
        );
        let ev = WireEvent {
            at: Duration::ZERO,
            src_mac: src,
            ifindex: 1,
            kind: k,
        };
        assert!(ev.is_announcement(src, vip.into()));
        // A solicited NA is no announcement.
        na[4] = 0x60;
        let (src, k) = parse_frame(&ipv6(ll, ll, 58, &na)).unwrap();
        let ev = WireEvent {
            at: Duration::ZERO,
            src_mac: src,
            ifindex: 1,
            kind: k,
        };
        assert!(!ev.is_announcement(src, vip.into()));
        // A neighbour solicitation (135) is not recorded; nor is a truncated packet.
        na[0] = 135;
        assert_eq!(parse_frame(&ipv6(ll, ll, 58, &na)), None);
        let mut short = ipv6(ll, ll, 112, &vrrp);
        short.truncate(short.len() - 1);
        assert_eq!(parse_frame(&short), None);
    }

    #[test]
    fn vrrp_v2_and_non_adverts() {
        // v2: auth type 0, interval 1 s.
        let v = [
            0x21, 1, 255, 1, 0, 1, 0, 0, 198, 18, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let a = parse_vrrp(
            &v,
            "198.18.0.2".parse().unwrap(),
            "224.0.0.18".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(
            (a.version, a.vrid, a.priority, a.interval_cs),
            (2, 1, 255, 100)
        );
        assert_eq!(a.addrs, vec!["198.18.0.100".parse::<IpAddr>().unwrap()]);
        // Type 2 or version 4: not an advertisement.
        let mut w = v;
        w[0] = 0x32;
        assert!(parse_vrrp(&w, a.src_ip, a.dst_ip).is_none());
        w[0] = 0x41;
        assert!(parse_vrrp(&w, a.src_ip, a.dst_ip).is_none());
        // A count larger than the packet: only the addresses present.
        let mut w = v;
        w[3] = 9;
        assert_eq!(
            parse_vrrp(&w[..12], a.src_ip, a.dst_ip)
                .unwrap()
                .addrs
                .len(),
            1
        );
    }

    #[test]
    fn queries_pick_by_sender_and_time() {
        let m1 = [2, 0x6d, 0x78, 0, 0, 2];
        let m2 = [2, 0x6d, 0x78, 0, 0, 3];
        let adv = |ms: u64, mac: [u8; 6], last: u8, prio: u8| WireEvent {
            at: Duration::from_millis(ms),
            src_mac: mac,
            ifindex: 3,
            kind: WireKind::Advert(Advert {
                version: 3,
                vrid: 51,
                priority: prio,
                interval_cs: 10,
                src_ip: IpAddr::V4(Ipv4Addr::new(198, 18, 0, last)),
                dst_ip: "224.0.0.18".parse().unwrap(),
                addrs: vec![],
            }),
        };
        let garp = WireEvent {
            at: Duration::from_millis(562),
            src_mac: m2,
            ifindex: 3,
            kind: WireKind::Garp {
                ip: Ipv4Addr::new(198, 18, 0, 100),
                op: 1,
                sender_mac: m2,
            },
        };
        let evs = [
            adv(0, m1, 2, 150),
            adv(100, m1, 2, 150),
            adv(200, m1, 2, 150),
            adv(561, m2, 3, 100),
            garp,
        ];
        let ms = Duration::from_millis;
        let first2 = first_advert_in(&evs, m2.into(), 51, ms(150)).unwrap();
        assert_eq!(first2.at, ms(561));
        let last1 = last_advert_in(&evs, m1.into(), 51, first2.at).unwrap();
        assert_eq!(last1.at, ms(200));
        assert_eq!(
            last_advert_in(&evs, m1.into(), 51, ms(200)).unwrap().at,
            ms(100),
            "strictly before"
        );
        assert_eq!(first_advert_in(&evs, m1.into(), 51, ms(201)), None);
        assert_eq!(first_advert_in(&evs, m2.into(), 52, ms(0)), None);
        let vip: IpAddr = "198.18.0.100".parse().unwrap();
        assert_eq!(first_garp_in(&evs, m2, vip, ms(561)).unwrap().at, ms(562));
        assert_eq!(first_garp_in(&evs, m1, vip, ms(0)), None);
        let by_ip = Sender::from(Ipv4Addr::new(198, 18, 0, 3));
        assert!(evs[3].is_advert_from(&by_ip, 51));
        assert!(!evs[3].is_advert_from(&by_ip, 52));
        assert!(!evs[0].is_advert_from(&by_ip, 51));
    }

    #[test]
    fn filter_jumps_stay_in_program() {
        let p = filter();
        for (i, ins) in p.iter().enumerate() {
            if ins.code == 0x15 {
                assert!(
                    i + 1 + usize::from(ins.jt) < p.len() && i + 1 + usize::from(ins.jf) < p.len(),
                    "{i}"
                );
            }
        }
        assert_eq!(p[11].code, 0x06);
        assert_eq!(p[12].k, 0);
    }
}
