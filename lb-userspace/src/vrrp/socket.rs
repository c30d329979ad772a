//! Sending and receiving VRRP advertisements (IP protocol 112) on one interface.
//!
//! One [`VrrpSocket`] per (interface, family), shared by every virtual router on that interface:
//! a raw IPv4 or IPv6 socket for protocol 112, tied to the interface with `SO_BINDTODEVICE`, in
//! the group 224.0.0.18 / ff02::12 there, with multicast loop off so a node does not hear its own
//! advertisements. It is not bound to an address, so adverts sent to a unicast peer address (for
//! networks without multicast) arrive on the same socket.
//!
//! Why the details are as they are:
//! * **IPv4 source: `IP_HDRINCL`.** RFC 5798 §5.1.1.1 wants the advert sent from the interface's
//!   primary address, and peers compare that address to break priority ties. Once a node is
//!   master the interface also holds the VIP, and for a multicast packet the kernel takes the
//!   first address in the interface's list: the VIP whenever it was added before the real one
//!   (after the real address was re-added, say; `vrrp_io` shows it). Binding the socket to the
//!   real address would fix the source but also make the kernel deliver only packets addressed
//!   to it, losing the multicast adverts. So the IPv4
//!   header is built here ([`ipv4_header`]): source exactly as given, TTL 255, TOS 0xc0 (as
//!   keepalived), DF clear. The kernel still honours `IP_MULTICAST_LOOP` and the bound device
//!   for such packets (`ip_mc_output` checks the socket's loop flag either way).
//! * **IPv6 source: `IPV6_PKTINFO`.** Per packet, names the source (the link-local address,
//!   RFC 5798 §5.1.2.1) and the interface; hop limit 255 and traffic class 0xc0 are socket
//!   options. The kernel neither computes nor checks the checksum of a raw IPv6 socket unless
//!   `IPV6_CHECKSUM` is set, so the message goes out as encoded by [`super::packet`].
//! * **Receiving IPv4**: a raw IPv4 socket returns the IP header, so TTL, source and destination
//!   are read from it and the payload is cut to the IP total length (Ethernet padding).
//! * **Receiving IPv6**: the kernel strips the header; `IPV6_RECVHOPLIMIT` and
//!   `IPV6_RECVPKTINFO` return the hop limit and destination as control messages. They are
//!   parsed by hand with libc's `CMSG_*` helpers: socket2 sends and receives control data but
//!   has no parser for it, and no dependency here has one.
//!
//! The receive checks themselves (TTL 255, version, checksum, …) are
//! [`super::packet::Advert::decode`]'s. Our own adverts never come back on this socket; those
//! of another VRRP daemon on the same node that sends with multicast loop on would (the caller
//! can tell them by `src` being one of the node's addresses).
use std::{
    ffi::CString,
    io,
    mem::{self, MaybeUninit},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    os::fd::AsRawFd as _,
    sync::atomic::{AtomicU16, Ordering},
};

use futures::TryStreamExt as _;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressScope};
use socket2::{Domain, InterfaceIndexOrAddress, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;

use super::packet::{IPPROTO_VRRP, MULTICAST_V4, MULTICAST_V6};

/// TTL / hop limit of every advertisement (RFC 5798 §5.1.1.3: receivers drop anything else).
pub const TTL: u8 = 255;
/// TOS / traffic class: precedence 6 (network control), as keepalived sends.
pub const TOS: u8 = 0xc0;
/// Largest datagram read: an IP packet cannot be longer, so nothing is ever truncated.
const RECV_BUF: usize = 65_536;

/// What went wrong with the VRRP socket of an interface.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{ifname}: no such interface")]
    NoInterface { ifname: String },
    #[error("{ifname}: {op}: {source}")]
    Io {
        ifname: String,
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("{ifname}: netlink: {source}")]
    Netlink {
        ifname: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// A request that cannot be sent as asked (wrong address family, message too long).
    #[error("{ifname}: {what}")]
    Invalid { ifname: String, what: String },
}

/// One received VRRP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPv4 TTL or IPv6 hop limit as received.
    pub ttl: u8,
    /// The VRRP message only: the IP payload, cut to the IP length.
    pub msg: Vec<u8>,
}

/// A raw socket for IP protocol 112 on one interface and family. See the module docs.
#[derive(Debug)]
pub struct VrrpSocket {
    fd: AsyncFd<Socket>,
    ifname: String,
    ifindex: u32,
    v6: bool,
    /// IPv4 identification of the next packet (the kernel fills in one if it is 0).
    ip_id: AtomicU16,
}

/// The index of `ifname` in the calling thread's network namespace.
pub(crate) fn ifindex(ifname: &str) -> Option<u32> {
    let c = CString::new(ifname).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

/// The 20-byte IPv4 header of an advertisement of `payload_len` bytes: TOS 0xc0, TTL 255,
/// protocol 112, no options, DF clear, header checksum filled in.
pub fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, id: u16, payload_len: u16) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[1] = TOS;
    h[2..4].copy_from_slice(&(20u16.saturating_add(payload_len)).to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    // h[6..8]: flags and fragment offset 0 (DF clear, as keepalived).
    h[8] = TTL;
    h[9] = IPPROTO_VRRP;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let mut sum: u32 = h.chunks_exact(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    h[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    h
}

/// Splits an IPv4 packet read from a raw socket into what [`Received`] holds; `None` if it is
/// not a complete IPv4 packet carrying protocol 112.
pub fn parse_ipv4(packet: &[u8]) -> Option<Received> {
    let first = *packet.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(first & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
    if ihl < 20 || total < ihl || total > packet.len() || *packet.get(9)? != IPPROTO_VRRP {
        return None;
    }
    let src: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
    let dst: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
    Some(Received {
        src: IpAddr::from(src),
        dst: IpAddr::from(dst),
        ttl: *packet.get(8)?,
        msg: packet.get(ihl..total)?.to_vec(),
    })
}

/// A control-message buffer aligned for `cmsghdr`, big enough for the two we receive
/// (hop limit: an int; packet info: an `in6_pktinfo`) or the one we send.
#[repr(C, align(8))]
struct CmsgBuf([u8; 128]);

impl VrrpSocket {
    /// Opens the raw IPv4 (`v6 == false`) or IPv6 socket for protocol 112 on `ifname`, joins
    /// 224.0.0.18 / ff02::12 there, turns multicast loop off and registers it with tokio.
    /// Needs CAP_NET_RAW, and a tokio runtime.
    pub fn open(ifname: &str, v6: bool) -> Result<VrrpSocket, SocketError> {
        let err = |op: &str| {
            let ifname = ifname.to_string();
            let op = op.to_string();
            move |source| SocketError::Io { ifname, op, source }
        };
        let ifindex = ifindex(ifname).ok_or_else(|| SocketError::NoInterface { ifname: ifname.to_string() })?;
        let proto = Some(Protocol::from(i32::from(IPPROTO_VRRP)));
        let sock = if v6 {
            Socket::new(Domain::IPV6, Type::RAW.cloexec(), proto).map_err(err("raw IPv6 socket"))?
        } else {
            Socket::new(Domain::IPV4, Type::RAW.cloexec(), proto).map_err(err("raw IPv4 socket"))?
        };
        sock.bind_device(Some(ifname.as_bytes())).map_err(err("SO_BINDTODEVICE"))?;
        if v6 {
            sock.join_multicast_v6(&MULTICAST_V6, ifindex).map_err(err("join ff02::12"))?;
            sock.set_multicast_if_v6(ifindex).map_err(err("IPV6_MULTICAST_IF"))?;
            sock.set_multicast_loop_v6(false).map_err(err("IPV6_MULTICAST_LOOP"))?;
            sock.set_multicast_hops_v6(u32::from(TTL)).map_err(err("IPV6_MULTICAST_HOPS"))?;
            sock.set_unicast_hops_v6(u32::from(TTL)).map_err(err("IPV6_UNICAST_HOPS"))?;
            sock.set_tclass_v6(u32::from(TOS)).map_err(err("IPV6_TCLASS"))?;
            sock.set_recv_hoplimit_v6(true).map_err(err("IPV6_RECVHOPLIMIT"))?;
            set_int(&sock, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1).map_err(err("IPV6_RECVPKTINFO"))?;
        } else {
            sock.join_multicast_v4_n(&MULTICAST_V4, &InterfaceIndexOrAddress::Index(ifindex))
                .map_err(err("join 224.0.0.18"))?;
            sock.set_multicast_loop_v4(false).map_err(err("IP_MULTICAST_LOOP"))?;
            sock.set_header_included_v4(true).map_err(err("IP_HDRINCL"))?;
        }
        sock.set_nonblocking(true).map_err(err("O_NONBLOCK"))?;
        if tokio::runtime::Handle::try_current().is_err() {
            // AsyncFd would panic.
            return Err(err("register with tokio")(io::Error::other("not called within a tokio runtime")));
        }
        // SAFETY: the Socket owns its fd, which stays open and the same until the AsyncFd
        // (which owns the Socket) is dropped.
        let fd = unsafe { AsyncFd::register(sock) }.map_err(|e| err("register with tokio")(e.into_parts().1))?;
        Ok(VrrpSocket { fd, ifname: ifname.to_string(), ifindex, v6, ip_id: AtomicU16::new(1) })
    }

    /// The interface this socket is on.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Whether this is the IPv6 socket.
    pub fn is_v6(&self) -> bool {
        self.v6
    }

    fn io_err(&self, op: impl Into<String>) -> impl FnOnce(io::Error) -> SocketError + '_ {
        let op = op.into();
        move |source| SocketError::Io { ifname: self.ifname.clone(), op, source }
    }

    /// The next VRRP message received on the interface (multicast or unicast to any local
    /// address), with the TTL / hop limit as received. Packets the kernel hands over
    /// incomplete (cannot happen with a sane kernel) are skipped and logged at debug level.
    ///
    /// Cancel-safe (for `tokio::select!` against timers): a message is only taken off the
    /// socket synchronously, after the wait, so dropping the future loses nothing.
    pub async fn recv(&self) -> Result<Received, SocketError> {
        let mut buf = Vec::new();
        loop {
            let mut guard = self.fd.readable().await.map_err(self.io_err("wait for readable"))?;
            // Allocated only once something is there: a select! loop re-creates this future at
            // every timer tick.
            buf.resize(RECV_BUF, 0);
            let got = guard.try_io(|fd| if self.v6 { recv_v6(fd.get_ref(), &mut buf) } else { recv_v4(fd.get_ref(), &mut buf) });
            match got {
                Err(_would_block) => continue,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(self.io_err("recvmsg")(e)),
                Ok(Ok(Some(r))) => return Ok(r),
                Ok(Ok(None)) => {
                    tracing::debug!(ifname = %self.ifname, "VRRP socket: skipped a malformed packet");
                }
            }
        }
    }

    /// Sends one VRRP message `msg` (encoded, checksum included) from `src` to `dst` (the
    /// multicast group or a unicast peer) with TTL/hop limit 255 and TOS/traffic class 0xc0.
    /// IPv4: the header is built here, so the source is exactly `src`. IPv6: `src` must be an
    /// address of the interface (normally its link-local one, see [`link_local_v6`]).
    /// Cancel-safe: the packet is handed to the kernel in one call after the wait.
    pub async fn send(&self, src: IpAddr, dst: IpAddr, msg: &[u8]) -> Result<(), SocketError> {
        let invalid = |what: String| SocketError::Invalid { ifname: self.ifname.clone(), what };
        let (packet, to, pktinfo) = match (src, dst, self.v6) {
            (IpAddr::V4(s), IpAddr::V4(d), false) => {
                let len = u16::try_from(msg.len()).ok().filter(|l| *l <= u16::MAX - 20);
                let len = len.ok_or_else(|| invalid(format!("VRRP message of {} bytes is too long", msg.len())))?;
                let id = self.ip_id.fetch_add(1, Ordering::Relaxed);
                let mut p = ipv4_header(s, d, id, len).to_vec();
                p.extend_from_slice(msg);
                (p, SockAddr::from(SocketAddrV4::new(d, 0)), None)
            }
            (IpAddr::V6(s), IpAddr::V6(d), true) => {
                // The scope id is what routes link-scoped destinations (ff02::12, fe80::…);
                // the kernel ignores it for global ones.
                let to = SockAddr::from(SocketAddrV6::new(d, 0, 0, self.ifindex));
                (msg.to_vec(), to, Some(pktinfo_cmsg(s, self.ifindex)))
            }
            _ => {
                let fam = if self.v6 { "IPv6" } else { "IPv4" };
                return Err(invalid(format!("cannot send from {src} to {dst} on the {fam} VRRP socket")));
            }
        };
        loop {
            let mut guard = self.fd.writable().await.map_err(self.io_err("wait for writable"))?;
            let sent = guard.try_io(|fd| send_msg(fd.get_ref(), &packet, &to, pktinfo.as_ref()));
            match sent {
                Err(_would_block) => continue,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(self.io_err(format!("send to {dst} from {src}"))(e)),
                Ok(Ok(n)) if n == packet.len() => return Ok(()),
                Ok(Ok(n)) => {
                    let e = io::Error::new(io::ErrorKind::WriteZero, format!("sent {n} of {} bytes", packet.len()));
                    return Err(self.io_err(format!("send to {dst} from {src}"))(e));
                }
            }
        }
    }
}

fn set_int(sock: &Socket, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` outlives the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(sock.as_raw_fd(), level, name, (&value as *const libc::c_int).cast(), mem::size_of::<libc::c_int>() as libc::socklen_t)
    };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// An `IPV6_PKTINFO` control message: send from `src` on interface `ifindex`.
fn pktinfo_cmsg(src: Ipv6Addr, ifindex: u32) -> (CmsgBuf, usize) {
    let mut buf = CmsgBuf([0; 128]);
    let info = libc::in6_pktinfo { ipi6_addr: libc::in6_addr { s6_addr: src.octets() }, ipi6_ifindex: ifindex };
    let data_len = mem::size_of::<libc::in6_pktinfo>() as u32;
    // SAFETY: the buffer is aligned for cmsghdr and CMSG_SPACE(data_len) (40) fits in its 128
    // bytes; CMSG_FIRSTHDR of a msghdr over it is its start; writes stay inside.
    let space = unsafe {
        let mut mh: libc::msghdr = mem::zeroed();
        mh.msg_control = buf.0.as_mut_ptr().cast();
        mh.msg_controllen = libc::CMSG_SPACE(data_len) as _;
        let c = libc::CMSG_FIRSTHDR(&mh);
        (*c).cmsg_level = libc::IPPROTO_IPV6;
        (*c).cmsg_type = libc::IPV6_PKTINFO;
        (*c).cmsg_len = libc::CMSG_LEN(data_len) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::in6_pktinfo>(), info);
        libc::CMSG_SPACE(data_len) as usize
    };
    (buf, space)
}

/// sendmsg(2) of one datagram, with an optional control message.
fn send_msg(sock: &Socket, packet: &[u8], to: &SockAddr, cmsg: Option<&(CmsgBuf, usize)>) -> io::Result<usize> {
    let mut iov = libc::iovec { iov_base: packet.as_ptr() as *mut libc::c_void, iov_len: packet.len() };
    // SAFETY: every pointer in the msghdr (address, iovec, control) refers to memory that
    // outlives the call; sendmsg only reads through them.
    let n = unsafe {
        let mut mh: libc::msghdr = mem::zeroed();
        mh.msg_name = to.as_ptr() as *mut libc::c_void;
        mh.msg_namelen = to.len();
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        if let Some((buf, len)) = cmsg {
            mh.msg_control = buf.0.as_ptr() as *mut libc::c_void;
            mh.msg_controllen = *len as _;
        }
        libc::sendmsg(sock.as_raw_fd(), &mh, libc::MSG_DONTWAIT)
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// One IPv4 packet; `Ok(None)` if it is not a complete VRRP packet.
fn recv_v4(sock: &Socket, buf: &mut [u8]) -> io::Result<Option<Received>> {
    // SAFETY: `buf` is writable for its whole length.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(buf.get(..n as usize).and_then(parse_ipv4))
}

/// One IPv6 message with its source, destination (`IPV6_PKTINFO`) and hop limit
/// (`IPV6_HOPLIMIT`); `Ok(None)` if either control message is missing or it was truncated.
fn recv_v6(sock: &Socket, buf: &mut [u8]) -> io::Result<Option<Received>> {
    let mut from = MaybeUninit::<libc::sockaddr_in6>::zeroed();
    let mut cbuf = CmsgBuf([0; 128]);
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: a zeroed msghdr is valid; every pointer refers to a live local of the right
    // size; recvmsg writes at most the lengths given.
    let mut mh: libc::msghdr = unsafe { mem::zeroed() };
    mh.msg_name = from.as_mut_ptr().cast();
    mh.msg_namelen = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf.0.as_mut_ptr().cast();
    mh.msg_controllen = cbuf.0.len() as _;
    // SAFETY: see above.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut mh, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if mh.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0
        || (mh.msg_namelen as usize) < mem::size_of::<libc::sockaddr_in6>()
    {
        return Ok(None);
    }
    // SAFETY: the kernel filled in a whole sockaddr_in6 (checked just above; zeroed before).
    let from = unsafe { from.assume_init() };
    let src = Ipv6Addr::from(from.sin6_addr.s6_addr);
    let (mut dst, mut ttl) = (None, None);
    // SAFETY: walking the control messages the kernel wrote into `cbuf` with libc's CMSG_*
    // helpers, which stay within msg_controllen; payloads are read unaligned after their
    // length is checked.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            let len = (*c).cmsg_len as usize;
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO)
                    if len >= libc::CMSG_LEN(mem::size_of::<libc::in6_pktinfo>() as u32) as usize =>
                {
                    let info = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                    dst = Some(Ipv6Addr::from(info.ipi6_addr.s6_addr));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT)
                    if len >= libc::CMSG_LEN(mem::size_of::<libc::c_int>() as u32) as usize =>
                {
                    let h = std::ptr::read_unaligned(data.cast::<libc::c_int>());
                    ttl = u8::try_from(h).ok();
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
    }
    let (Some(dst), Some(ttl)) = (dst, ttl) else { return Ok(None) };
    let Some(msg) = buf.get(..n as usize) else { return Ok(None) };
    Ok(Some(Received { src: src.into(), dst: dst.into(), ttl, msg: msg.to_vec() }))
}

/// The first usable link-local IPv6 address of `ifname` (VRRPv3 over IPv6 is sent from it),
/// read over rtnetlink. Addresses still tentative (duplicate address detection running) or
/// that failed DAD are skipped, since the kernel refuses them as a source; `None` if there is
/// none (yet).
pub async fn link_local_v6(ifname: &str) -> Result<Option<Ipv6Addr>, SocketError> {
    let index = ifindex(ifname).ok_or_else(|| SocketError::NoInterface { ifname: ifname.to_string() })?;
    let nl = |source| SocketError::Netlink { ifname: ifname.to_string(), source };
    let io = |source| SocketError::Io { ifname: ifname.to_string(), op: "netlink socket".into(), source };
    let (conn, handle, _) = rtnetlink::new_connection().map_err(io)?;
    tokio::spawn(conn);
    let mut stream = handle.address().get().set_link_index_filter(index).execute();
    while let Some(msg) = stream.try_next().await.map_err(nl)? {
        if msg.header.scope != AddressScope::Link {
            continue;
        }
        let header_bad = msg.header.flags.intersects(AddressHeaderFlags::Tentative | AddressHeaderFlags::Dadfailed);
        let mut addr = None;
        let mut bad = header_bad;
        for attr in &msg.attributes {
            match attr {
                AddressAttribute::Address(IpAddr::V6(a)) if is_link_local(a) => addr = Some(*a),
                AddressAttribute::Flags(f) => bad = f.intersects(AddressFlags::Tentative | AddressFlags::Dadfailed),
                _ => {}
            }
        }
        if let (Some(a), false) = (addr, bad) {
            return Ok(Some(a));
        }
    }
    Ok(None)
}

fn is_link_local(a: &Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The IPv4 header of the keepalived capture in vrrp-reference.md (id 1).
    const CAPTURE_IP: [u8; 20] =
        [0x45, 0xc0, 0x00, 0x20, 0x00, 0x01, 0x00, 0x00, 0xff, 0x70, 0x14, 0x7d, 0xc6, 0x12, 0x00, 0x0b, 0xe0, 0x00, 0x00, 0x12];
    const CAPTURE_VRRP: [u8; 12] = [0x31, 0x33, 0x96, 0x01, 0x00, 0x64, 0xcb, 0x9d, 0xc6, 0x12, 0x00, 0x0a];

    #[test]
    fn ipv4_header_is_byte_identical_to_keepalived() {
        let h = ipv4_header(Ipv4Addr::new(198, 18, 0, 11), MULTICAST_V4, 1, 12);
        assert_eq!(h, CAPTURE_IP);
    }

    #[test]
    fn received_ipv4_is_cut_to_the_ip_length() {
        let mut p = [&CAPTURE_IP[..], &CAPTURE_VRRP].concat();
        p.resize(46, 0); // Ethernet padding to 60 bytes
        let r = parse_ipv4(&p).unwrap();
        assert_eq!(r.src, IpAddr::from([198, 18, 0, 11]));
        assert_eq!(r.dst, IpAddr::from(MULTICAST_V4));
        assert_eq!(r.ttl, 255);
        assert_eq!(r.msg, CAPTURE_VRRP);
    }

    #[test]
    fn malformed_ipv4_is_refused_without_panicking() {
        let p = [&CAPTURE_IP[..], &CAPTURE_VRRP].concat();
        assert_eq!(parse_ipv4(&[]), None);
        for n in 0..p.len() {
            assert_eq!(parse_ipv4(&p[..n]), None, "cut to {n} bytes");
        }
        let mut v = p.clone();
        v[0] = 0x65; // version 6
        assert_eq!(parse_ipv4(&v), None);
        let mut ihl = p.clone();
        ihl[0] = 0x44; // header of 16 bytes
        assert_eq!(parse_ipv4(&ihl), None);
        let mut big_ihl = p.clone();
        big_ihl[0] = 0x4f; // 60-byte header, longer than the packet's length
        assert_eq!(parse_ipv4(&big_ihl), None);
        let mut proto = p.clone();
        proto[9] = 17;
        assert_eq!(parse_ipv4(&proto), None);
        // A length shorter than the header.
        let mut short = p.clone();
        short[3] = 19;
        assert_eq!(parse_ipv4(&short), None);
        // Header only: an empty VRRP message (Advert::decode refuses it as short).
        let mut empty = p.clone();
        empty[3] = 20;
        assert_eq!(parse_ipv4(&empty).map(|r| r.msg.len()), Some(0));
    }

    #[test]
    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    fn pktinfo_control_message_layout() {
        let src: Ipv6Addr = "fe80::6d:78ff:fe00:2".parse().unwrap();
        let (buf, len) = pktinfo_cmsg(src, 7);
        assert_eq!(len, 40, "CMSG_SPACE(20) on 64-bit Linux");
        let cmsg_len = usize::from_ne_bytes(buf.0[0..8].try_into().unwrap());
        assert_eq!(cmsg_len, 36);
        assert_eq!(i32::from_ne_bytes(buf.0[8..12].try_into().unwrap()), libc::IPPROTO_IPV6);
        assert_eq!(i32::from_ne_bytes(buf.0[12..16].try_into().unwrap()), libc::IPV6_PKTINFO);
        assert_eq!(buf.0[16..32], src.octets());
        assert_eq!(u32::from_ne_bytes(buf.0[32..36].try_into().unwrap()), 7);
    }

    #[test]
    fn link_local_prefix() {
        assert!(is_link_local(&"fe80::1".parse().unwrap()));
        assert!(is_link_local(&"febf::1".parse().unwrap()));
        assert!(!is_link_local(&"fec0::1".parse().unwrap()));
        assert!(!is_link_local(&"2001:db8::1".parse().unwrap()));
    }
}
