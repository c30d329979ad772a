//! AF_PACKET sockets bound to one interface: the one place mxlb opens them. The VIP-path probe
//! sends frames to a back-end's MAC and reads the answers; VRRP sends gratuitous ARPs (no socket
//! of the IP stack sends ARP); the lab's captures read frames.
//!
//! By hand because socket2 creates AF_PACKET sockets but has no `sockaddr_ll` to bind them with.
use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// Every protocol (for reading everything an interface receives).
pub const ETH_P_ALL: u16 = 0x0003;

/// A raw AF_PACKET socket bound to `ifindex` (0 = every interface of the namespace) for
/// ethertype `protocol` (host order; 0 = receive nothing, for a socket that only sends).
pub fn open(ifindex: u32, protocol: u16, nonblocking: bool) -> io::Result<OwnedFd> {
    let flags = libc::SOCK_RAW | libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: plain socket(2); the fd is owned right after.
    let fd = unsafe { libc::socket(libc::AF_PACKET, flags, i32::from(protocol.to_be())) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = protocol.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll is a valid sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(fd.as_raw_fd(), (&sll as *const libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Sends one whole Ethernet frame on a socket from [`open`].
pub fn send(fd: &OwnedFd, frame: &[u8]) -> io::Result<()> {
    // SAFETY: frame outlives the call; the socket is bound to its interface.
    let rc = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), libc::MSG_DONTWAIT) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}
