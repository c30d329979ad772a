//! Probing the path real traffic takes in DSR modes: does the back-end answer *on the VIP*?
//!
//! A probe to the back-end's own address does not notice a back-end that lost the VIP from its
//! loopback, or (dsr-ipip) whose decapsulation is gone: it would keep getting traffic it drops.
//! So for dsr VIPs the prober also sends a TCP SYN addressed to VIP:port, built the way the
//! data path forwards client packets (dsr-l2: to the back-end's MAC; dsr-ipip: inside an
//! IPIP/IP6IP6 header to the back-end's address), out of the LB's interface, and waits for the
//! back-end's SYN-ACK *from the VIP*. Then it resets the half-open connection.
//!
//! Written by hand (AF_PACKET, header checksums) because no crate crafts and matches raw TCP
//! handshakes, and a normal connect() cannot be used: on a VRRP master the VIP is a local
//! address, so connecting to it would never leave the node. The answer is read from an
//! AF_PACKET socket for the same reason (the kernel drops a packet from a local address).
use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use tokio::io::unix::AsyncFd;

use crate::config::ForwardingMode;

/// Why a VIP-path probe failed.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("no answer on the VIP within the timeout (is the VIP on the back-end's loopback{}?)", if *.ipip { ", and `mxlb decap` attached" } else { "" })]
    Timeout { ipip: bool },
    #[error("the back-end refused the connection on the VIP (nothing listens on it)")]
    Refused,
    #[error("no MAC address known for the back-end")]
    NoMac,
    #[error("no {0} address on the LB's interface to send from")]
    NoSource(&'static str),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Where probes leave from: the LB's VIP-facing interface.
#[derive(Debug, Clone)]
pub struct Origin {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub v4: Option<std::net::Ipv4Addr>,
    pub v6: Option<std::net::Ipv6Addr>,
}

/// One's-complement sum over `data` (RFC 1071), folded.
fn csum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u16::from_be_bytes([c[0], c[1]]) as u32;
        }
        if let [b] = chunks.remainder() {
            sum += (*b as u32) << 8;
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ip_header(src: IpAddr, dst: IpAddr, proto: u8, payload_len: usize) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
            h[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            let c = csum(&[&h]);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h
        }
        (s, d) => {
            let (s, d) = (to_v6(s), to_v6(d));
            let mut h = vec![0x60, 0, 0, 0, 0, 0, proto, 64];
            h[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h
        }
    }
}

fn to_v6(a: IpAddr) -> std::net::Ipv6Addr {
    match a {
        IpAddr::V4(v) => v.to_ipv6_mapped(),
        IpAddr::V6(v) => v,
    }
}

/// A TCP segment (no options) with its checksum.
fn tcp_segment(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, seq: u32, ack: u32, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let pseudo = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => [&s.octets()[..], &d.octets()[..], &[0, 6, 0, 20]].concat(),
        (s, d) => [&to_v6(s).octets()[..], &to_v6(d).octets()[..], &[0, 0, 0, 20, 0, 0, 0, 6]].concat(),
    };
    let c = csum(&[&pseudo, &t]);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// The frame the data path would send for a client packet `ip` to the back-end.
fn frame(origin: &Origin, mode: ForwardingMode, backend: IpAddr, backend_mac: [u8; 6], src: IpAddr, ip: Vec<u8>) -> Vec<u8> {
    let (ethertype, l3) = if mode == ForwardingMode::DsrIpip {
        let inner_proto = if ip[0] >> 4 == 4 { 4 } else { 41 };
        let outer_src = match backend {
            IpAddr::V4(_) => origin.v4.map(IpAddr::V4).unwrap_or(src),
            IpAddr::V6(_) => origin.v6.map(IpAddr::V6).unwrap_or(src),
        };
        let mut outer = ip_header(outer_src, backend, inner_proto, ip.len());
        outer.extend_from_slice(&ip);
        (if backend.is_ipv4() { 0x0800u16 } else { 0x86dd }, outer)
    } else {
        (if ip[0] >> 4 == 4 { 0x0800u16 } else { 0x86dd }, ip)
    };
    let mut f = Vec::with_capacity(14 + l3.len());
    f.extend_from_slice(&backend_mac);
    f.extend_from_slice(&origin.mac);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(&l3);
    f
}

/// The TCP header of a frame that comes from `from` to `to` (port `dport`), if it is one.
fn tcp_from(frame: &[u8], from: SocketAddr, to: IpAddr, dport: u16) -> Option<(u8, u32)> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (src, dst, proto, tcp) = match ethertype {
        0x0800 => {
            let ihl = ((ip.first()? & 0x0f) as usize) * 4;
            let src = IpAddr::from(<[u8; 4]>::try_from(ip.get(12..16)?).ok()?);
            let dst = IpAddr::from(<[u8; 4]>::try_from(ip.get(16..20)?).ok()?);
            (src, dst, *ip.get(9)?, ip.get(ihl..)?)
        }
        0x86dd => {
            let src = IpAddr::from(<[u8; 16]>::try_from(ip.get(8..24)?).ok()?);
            let dst = IpAddr::from(<[u8; 16]>::try_from(ip.get(24..40)?).ok()?);
            (src, dst, *ip.get(6)?, ip.get(40..)?)
        }
        _ => return None,
    };
    let sport = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dp = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    if proto != 6 || src != from.ip() || dst != to || sport != from.port() || dp != dport {
        return None;
    }
    let seq = u32::from_be_bytes(tcp.get(4..8)?.try_into().ok()?);
    Some((*tcp.get(13)?, seq))
}

/// Sends one probe packet the way `mode` forwards: dsr-l2 as a frame on the LB's interface
/// (AF_PACKET, to the back-end's MAC); dsr-ipip through a raw IP socket of the outer family with
/// protocol 4 or 41, which adds the outer header and routes it to the back-end like any packet
/// of this node (no next-hop MAC needed, as the data path's FIB lookup).
fn send_probe(packet_fd: &OwnedFd, origin: &Origin, mode: ForwardingMode, backend: IpAddr, mac: [u8; 6], src: IpAddr, ip: Vec<u8>) -> Result<(), PathError> {
    if mode != ForwardingMode::DsrIpip {
        return Ok(crate::afpacket::send(packet_fd, &frame(origin, mode, backend, mac, src, ip))?);
    }
    let inner_proto = if ip[0] >> 4 == 4 { 4 } else { 41 };
    let domain = if backend.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2); owned right after.
    let raw = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, inner_proto) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: valid fresh fd.
    let raw = unsafe { OwnedFd::from_raw_fd(raw) };
    let sa: socket2::SockAddr = SocketAddr::new(backend, 0).into();
    // SAFETY: ip and sa outlive the call.
    let rc = unsafe { libc::sendto(raw.as_raw_fd(), ip.as_ptr().cast(), ip.len(), 0, sa.as_ptr().cast(), sa.len()) };
    if rc < 0 { Err(std::io::Error::last_os_error().into()) } else { Ok(()) }
}

/// Sends a SYN to `vip` through back-end `backend` the way `mode` forwards, and waits for its
/// SYN-ACK from the VIP; resets the connection after. Returns the handshake time.
pub async fn probe(
    origin: &Origin,
    mode: ForwardingMode,
    backend: IpAddr,
    backend_mac: Option<[u8; 6]>,
    vip: SocketAddr,
    timeout: Duration,
) -> Result<Duration, PathError> {
    let mac = match mode {
        // IPIP goes out through the kernel's routing (as the data path's FIB lookup does).
        ForwardingMode::DsrIpip => [0; 6],
        _ => backend_mac.filter(|m| *m != [0; 6]).ok_or(PathError::NoMac)?,
    };
    let src = match vip.ip() {
        IpAddr::V4(_) => IpAddr::V4(origin.v4.ok_or(PathError::NoSource("IPv4"))?),
        IpAddr::V6(_) => IpAddr::V6(origin.v6.ok_or(PathError::NoSource("IPv6"))?),
    };
    // SAFETY: the fd is owned by the AsyncFd for its whole life and closed only when dropped.
    let fd = unsafe { AsyncFd::register(crate::afpacket::open(origin.ifindex, crate::afpacket::ETH_P_ALL, true)?) }.map_err(|e| PathError::Io(e.into()))?;
    let start = Instant::now();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    // An ephemeral-range port the LB's own stack is unlikely to be using at this instant.
    let sport = 40000 + (nanos % 20000) as u16;
    let isn = nanos.rotate_left(13);
    let syn = tcp_segment(src, vip.ip(), sport, vip.port(), isn, 0, SYN);
    let ip = [ip_header(src, vip.ip(), 6, syn.len()), syn].concat();
    send_probe(fd.get_ref(), origin, mode, backend, mac, src, ip)?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 2048];
    loop {
        let ready = tokio::time::timeout_at(deadline, fd.readable()).await;
        let Ok(guard) = ready else { return Err(PathError::Timeout { ipip: mode == ForwardingMode::DsrIpip }) };
        let mut guard = guard?;
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::recv(fd.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                guard.clear_ready();
                continue;
            }
            return Err(e.into());
        }
        let Some((flags, seq)) = tcp_from(&buf[..n as usize], vip, src, sport) else { continue };
        if flags & RST != 0 {
            return Err(PathError::Refused);
        }
        if flags & (SYN | ACK) == SYN | ACK {
            let elapsed = start.elapsed();
            // Tidy up: reset the half-open connection on the back-end.
            let rst = tcp_segment(src, vip.ip(), sport, vip.port(), isn.wrapping_add(1), seq.wrapping_add(1), RST | ACK);
            let ip = [ip_header(src, vip.ip(), 6, rst.len()), rst].concat();
            let _ = send_probe(fd.get_ref(), origin, mode, backend, mac, src, ip);
            return Ok(elapsed);
        }
    }
}

/// The LB interface's index, MAC and first addresses.
pub async fn origin(iface: &str) -> Result<Origin, PathError> {
    let c = std::ffi::CString::new(iface).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: valid C string.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("no interface {iface}")).into());
    }
    // SIOCGIFHWADDR on a socket of this namespace (sysfs may show another namespace).
    // SAFETY: plain socket(2) and ioctl(2) on a zeroed ifreq.
    let mac = unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let s = OwnedFd::from_raw_fd(s);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in iface.bytes().take(15).enumerate() {
            req.ifr_name[i] = b as libc::c_char;
        }
        if libc::ioctl(s.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let d = req.ifr_ifru.ifru_hwaddr.sa_data;
        [d[0] as u8, d[1] as u8, d[2] as u8, d[3] as u8, d[4] as u8, d[5] as u8]
    };
    let (v4, v6) = crate::neighbours::interface_addresses(iface)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(Origin { ifindex, mac, v4, v6 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify() {
        let (s, d): (IpAddr, IpAddr) = ("198.18.0.2".parse().unwrap(), "198.18.0.100".parse().unwrap());
        let t = tcp_segment(s, d, 40000, 25, 1, 0, SYN);
        let h = ip_header(s, d, 6, t.len());
        assert_eq!(csum(&[&h]), 0, "IPv4 header checksum verifies");
        let pseudo = [&[198, 18, 0, 2][..], &[198, 18, 0, 100], &[0, 6, 0, 20]].concat();
        assert_eq!(csum(&[&pseudo, &t]), 0, "TCP checksum verifies");
        let (s6, d6): (IpAddr, IpAddr) = ("2001:db8::2".parse().unwrap(), "2001:db8::100".parse().unwrap());
        let t6 = tcp_segment(s6, d6, 40000, 25, 1, 0, SYN);
        let pseudo6 = [&to_v6(s6).octets()[..], &to_v6(d6).octets()[..], &[0, 0, 0, 20, 0, 0, 0, 6]].concat();
        assert_eq!(csum(&[&pseudo6, &t6]), 0);
    }

    #[test]
    fn frames_follow_the_forwarding_mode_and_answers_are_matched() {
        let origin = Origin { ifindex: 1, mac: [2, 0, 0, 0, 0, 1], v4: Some("198.18.0.2".parse().unwrap()), v6: None };
        let (src, vip, be): (IpAddr, IpAddr, IpAddr) = ("198.18.0.2".parse().unwrap(), "198.18.0.100".parse().unwrap(), "198.18.0.11".parse().unwrap());
        let seg = tcp_segment(src, vip, 40000, 25, 1, 0, SYN);
        let ip = [ip_header(src, vip, 6, seg.len()), seg].concat();
        let l2 = frame(&origin, ForwardingMode::DsrL2, be, [2, 0, 0, 0, 0, 0x11], src, ip.clone());
        assert_eq!((&l2[0..6], &l2[12..14], &l2[30..34]), (&[2, 0, 0, 0, 0, 0x11][..], &[8, 0][..], &[198, 18, 0, 100][..]));
        let ipip = frame(&origin, ForwardingMode::DsrIpip, be, [2, 0, 0, 0, 0, 0x11], src, ip);
        assert_eq!((ipip[14 + 9], &ipip[14 + 16..14 + 20]), (4, &[198, 18, 0, 11][..]), "IPIP to the back-end");
        // An answer from VIP:25 to our port is matched; anything else is not.
        let synack = tcp_segment(vip, src, 25, 40000, 77, 2, SYN | ACK);
        let reply = [&[0u8; 12][..], &[8, 0], &ip_header(vip, src, 6, 20), &synack].concat();
        assert_eq!(tcp_from(&reply, SocketAddr::new(vip, 25), src, 40000), Some((SYN | ACK, 77)));
        assert_eq!(tcp_from(&reply, SocketAddr::new(vip, 25), src, 40001), None);
        assert_eq!(tcp_from(&reply[..30], SocketAddr::new(vip, 25), src, 40000), None, "truncated");
    }
}
