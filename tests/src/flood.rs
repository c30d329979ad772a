//! A single-source SYN flood for edge-protection tests and benchmarks (raw IPv4 SYNs to a
//! lab VIP; bounded in count and time).
use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use crate::frames::{Tcp, ip_packet, tcp_flags::SYN};

/// Sends up to `count` raw SYNs from `src` to `dst`:25 (varying source ports) through an
/// IPPROTO_RAW socket; returns (sent, elapsed). Runs in the calling thread's namespace.
pub fn syn_flood(src: Ipv4Addr, dst: Ipv4Addr, count: u32, max: Duration) -> std::io::Result<(u32, Duration)> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as u16;
    sa.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
    let start = Instant::now();
    let mut sent = 0;
    while sent < count && start.elapsed() < max {
        let sport = 1024 + (sent % 60_000) as u16;
        let pkt = ip_packet(src.into(), dst.into(), &Tcp::new(sport, 25, SYN), b"");
        // SAFETY: pkt and sa outlive the call.
        let rc = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                std::thread::sleep(Duration::from_micros(50));
                continue;
            }
            return Err(e);
        }
        sent += 1;
    }
    Ok((sent, start.elapsed()))
}

