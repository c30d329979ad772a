//! A small, dependency-free packet-frame builder for data-plane fixtures and benchmarks.
//!
//! Layers are built inside-out: a transport segment ([`Tcp::segment`], [`udp_segment`],
//! [`icmpv4_error`], [`icmpv6_error`]), wrapped into an IP packet ([`Ipv4::packet`],
//! [`Ipv6::packet`], or [`ip_packet`] for a TCP segment of either family), wrapped into a frame
//! ([`Eth::frame`]). [`ipip_v4`] / [`ipip_v6`] build the outer header that mxlb's dsr-ipip mode
//! prepends, so a test can build the exact frame it expects. All checksums (IPv4 header, TCP,
//! UDP, ICMP, ICMPv6) are computed.
//!
//! Use only documentation/benchmark addresses (198.18.0.0/15, 2001:db8::/32).
//!
//! ```
//! use lab::frames::{Eth, Tcp, ip_packet, tcp_flags};
//! let ip = ip_packet("198.18.1.1".parse().unwrap(), "198.18.0.100".parse().unwrap(),
//!                    &Tcp::new(40000, 25, tcp_flags::SYN), b"");
//! let frame = Eth::new([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).frame_ip(&ip);
//! assert_eq!(frame.len(), 14 + 20 + 20);
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A MAC address.
pub type Mac = [u8; 6];

/// EtherTypes.
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;

/// IP protocol numbers.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_HOPOPTS: u8 = 0;

/// TCP flag bits.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// RFC 1071 one's-complement sum of `data` (odd length padded with zero), not yet inverted.
pub fn ones_sum(data: &[u8], mut sum: u32) -> u32 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    sum
}

/// Folds and inverts a one's-complement sum.
pub fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    fold(ones_sum(data, 0))
}

/// Sum of the TCP/UDP/ICMPv6 pseudo-header.
fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut b = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            b.extend_from_slice(&s.octets());
            b.extend_from_slice(&d.octets());
            b.extend_from_slice(&[0, proto]);
            b.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            b.extend_from_slice(&s.octets());
            b.extend_from_slice(&d.octets());
            b.extend_from_slice(&(len as u32).to_be_bytes());
            b.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => panic!("mixed address families"),
    }
    ones_sum(&b, 0)
}

/// Ethernet header, optionally with one 802.1Q tag.
#[derive(Clone, Copy, Debug)]
pub struct Eth {
    pub dst: Mac,
    pub src: Mac,
    /// 802.1Q TCI (priority, DEI, VLAN id) if tagged.
    pub vlan: Option<u16>,
}

impl Eth {
    pub fn new(dst: Mac, src: Mac) -> Self {
        Self {
            dst,
            src,
            vlan: None,
        }
    }

    /// The same header with a VLAN tag.
    pub fn vlan(mut self, tci: u16) -> Self {
        self.vlan = Some(tci);
        self
    }

    /// Header length (14 or 18).
    pub fn len(&self) -> usize {
        if self.vlan.is_some() { 18 } else { 14 }
    }

    /// A frame carrying `payload` with the given EtherType.
    pub fn frame(&self, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(18 + payload.len());
        f.extend_from_slice(&self.dst);
        f.extend_from_slice(&self.src);
        if let Some(tci) = self.vlan {
            f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A frame carrying an IP packet; the EtherType follows the packet's version nibble.
    pub fn frame_ip(&self, ip: &[u8]) -> Vec<u8> {
        let et = if ip.first().map(|b| b >> 4) == Some(6) {
            ETH_P_IPV6
        } else {
            ETH_P_IP
        };
        self.frame(et, ip)
    }
}

/// IPv4 header parameters.
#[derive(Clone, Debug)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub tos: u8,
    pub id: u16,
    /// Flags and fragment offset word: 0x4000 = DF, 0x2000 = MF, low 13 bits = offset / 8.
    pub frag: u16,
    pub ttl: u8,
    /// Options, padded with zero (end-of-options) to a multiple of 4 bytes; at most 40.
    pub options: Vec<u8>,
    /// Overrides the IHL field (for malformed-header fixtures).
    pub ihl_override: Option<u8>,
    /// Overrides the total-length field (for malformed-header fixtures).
    pub tot_len_override: Option<u16>,
}

impl Ipv4 {
    /// DF set, TTL 64, no options.
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Self {
        Self {
            src,
            dst,
            proto,
            tos: 0,
            id: 0x1234,
            frag: 0x4000,
            ttl: 64,
            options: Vec::new(),
            ihl_override: None,
            tot_len_override: None,
        }
    }

    /// Header length including (padded) options.
    pub fn header_len(&self) -> usize {
        20 + self.options.len().div_ceil(4) * 4
    }

    /// The IP packet (header with correct checksum, then `payload`).
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        let hlen = self.header_len();
        assert!(hlen <= 60, "IPv4 options longer than 40 bytes");
        let ihl = self.ihl_override.unwrap_or((hlen / 4) as u8);
        let tot = self
            .tot_len_override
            .unwrap_or((hlen + payload.len()) as u16);
        let mut h = Vec::with_capacity(hlen + payload.len());
        h.push(0x40 | (ihl & 0x0f));
        h.push(self.tos);
        h.extend_from_slice(&tot.to_be_bytes());
        h.extend_from_slice(&self.id.to_be_bytes());
        h.extend_from_slice(&self.frag.to_be_bytes());
        h.push(self.ttl);
        h.push(self.proto);
        h.extend_from_slice(&[0, 0]);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h.extend_from_slice(&self.options);
        h.resize(hlen, 0);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(payload);
        h
    }
}

/// IPv6 fixed-header parameters.
#[derive(Clone, Debug)]
pub struct Ipv6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub next_header: u8,
    pub hop_limit: u8,
    pub traffic_class: u8,
    /// 20 bits.
    pub flow_label: u32,
    /// Overrides the payload-length field (for malformed-header fixtures).
    pub payload_len_override: Option<u16>,
}

impl Ipv6 {
    /// Hop limit 64, traffic class and flow label 0.
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8) -> Self {
        Self {
            src,
            dst,
            next_header,
            hop_limit: 64,
            traffic_class: 0,
            flow_label: 0,
            payload_len_override: None,
        }
    }

    /// The IP packet (fixed header, then `payload`, which includes any extension headers).
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        let vcf = (6u32 << 28) | ((self.traffic_class as u32) << 20) | (self.flow_label & 0xf_ffff);
        let plen = self.payload_len_override.unwrap_or(payload.len() as u16);
        let mut h = Vec::with_capacity(40 + payload.len());
        h.extend_from_slice(&vcf.to_be_bytes());
        h.extend_from_slice(&plen.to_be_bytes());
        h.push(self.next_header);
        h.push(self.hop_limit);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h.extend_from_slice(payload);
        h
    }
}

/// TCP header parameters (no options).
#[derive(Clone, Copy, Debug)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    /// See [`tcp_flags`].
    pub flags: u8,
    pub window: u16,
}

impl Tcp {
    pub fn new(sport: u16, dport: u16, flags: u8) -> Self {
        let ack = if flags & tcp_flags::ACK != 0 {
            0x0bad_cafe
        } else {
            0
        };
        Self {
            sport,
            dport,
            seq: 0x1000_0000,
            ack,
            flags,
            window: 64240,
        }
    }

    /// The TCP segment with its checksum for the given addresses.
    pub fn segment(&self, src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
        let mut t = Vec::with_capacity(20 + payload.len());
        t.extend_from_slice(&self.sport.to_be_bytes());
        t.extend_from_slice(&self.dport.to_be_bytes());
        t.extend_from_slice(&self.seq.to_be_bytes());
        t.extend_from_slice(&self.ack.to_be_bytes());
        t.push(5 << 4);
        t.push(self.flags);
        t.extend_from_slice(&self.window.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0, 0]);
        t.extend_from_slice(payload);
        let c = fold(ones_sum(&t, pseudo_sum(src, dst, IPPROTO_TCP, t.len())));
        t[16..18].copy_from_slice(&c.to_be_bytes());
        t
    }
}

/// A UDP datagram with its checksum.
pub fn udp_segment(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut u = Vec::with_capacity(len);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&(len as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut c = fold(ones_sum(&u, pseudo_sum(src, dst, IPPROTO_UDP, len)));
    if c == 0 {
        c = 0xffff;
    }
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// An IP packet (IPv4 with DF, or IPv6, by the addresses' family) carrying a TCP segment.
pub fn ip_packet(src: IpAddr, dst: IpAddr, tcp: &Tcp, payload: &[u8]) -> Vec<u8> {
    let seg = tcp.segment(src, dst, payload);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ipv4::new(s, d, IPPROTO_TCP).packet(&seg),
        (IpAddr::V6(s), IpAddr::V6(d)) => Ipv6::new(s, d, IPPROTO_TCP).packet(&seg),
        _ => panic!("mixed address families"),
    }
}

/// ICMPv4 message: `ty`, `code`, the 4 rest-of-header bytes, then `body` (for errors: the
/// quoted IP header and at least 8 bytes of its payload). Checksum computed.
pub fn icmpv4(ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// ICMPv4 destination unreachable / fragmentation needed (type 3 code 4) with next-hop MTU,
/// quoting `quoted`.
pub fn icmpv4_error(code: u8, mtu: u16, quoted: &[u8]) -> Vec<u8> {
    let m = mtu.to_be_bytes();
    icmpv4(3, code, [0, 0, m[0], m[1]], quoted)
}

/// ICMPv6 message with pseudo-header checksum for `src` → `dst`.
pub fn icmpv6(src: Ipv6Addr, dst: Ipv6Addr, ty: u8, code: u8, rest: u32, body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest.to_be_bytes());
    m.extend_from_slice(body);
    let c = fold(ones_sum(
        &m,
        pseudo_sum(src.into(), dst.into(), IPPROTO_ICMPV6, m.len()),
    ));
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// ICMPv6 error (1 = unreachable, 2 = packet too big with `rest` = MTU) quoting `quoted`.
pub fn icmpv6_error(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    ty: u8,
    code: u8,
    rest: u32,
    quoted: &[u8],
) -> Vec<u8> {
    icmpv6(src, dst, ty, code, rest, quoted)
}

/// DSCP/ECN byte of an IP packet (IPv4 TOS or IPv6 traffic class).
pub fn ip_tos(ip: &[u8]) -> u8 {
    if ip[0] >> 4 == 6 {
        (ip[0] << 4) | (ip[1] >> 4)
    } else {
        ip[1]
    }
}

/// The IPv4 outer header mxlb's dsr-ipip prepends to `inner` (an IP packet): TOS copied from
/// the inner packet, id 0, DF, TTL 64, protocol 4 or 41, checksum; followed by `inner`.
pub fn ipip_v4(src: Ipv4Addr, dst: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    let proto = if inner[0] >> 4 == 6 {
        IPPROTO_IPV6
    } else {
        IPPROTO_IPIP
    };
    let mut o = Ipv4::new(src, dst, proto);
    o.tos = ip_tos(inner);
    o.id = 0;
    o.frag = 0x4000;
    o.ttl = 64;
    o.packet(inner)
}

/// The IPv6 outer header mxlb's dsr-ipip prepends to `inner`: traffic class copied, hop limit
/// 64, the given flow label, next header 4 or 41; followed by `inner`.
pub fn ipip_v6(src: Ipv6Addr, dst: Ipv6Addr, flow_label: u32, inner: &[u8]) -> Vec<u8> {
    let nh = if inner[0] >> 4 == 6 {
        IPPROTO_IPV6
    } else {
        IPPROTO_IPIP
    };
    let mut o = Ipv6::new(src, dst, nh);
    o.traffic_class = ip_tos(inner);
    o.flow_label = flow_label;
    o.packet(inner)
}

/// An ARP request frame (who-has `target` tell `sender`), for non-IP fixtures.
pub fn arp_request(src_mac: Mac, sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&src_mac);
    a.extend_from_slice(&sender.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    Eth::new([0xff; 6], src_mac).frame(ETH_P_ARP, &a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_verifies() {
        let mut ip = Ipv4::new(
            "198.18.0.1".parse().unwrap(),
            "198.18.0.2".parse().unwrap(),
            6,
        );
        ip.options = vec![1, 1, 1];
        let p = ip.packet(&[0; 8]);
        assert_eq!(p[0], 0x46);
        assert_eq!(checksum(&p[..24]), 0);
    }

    #[test]
    fn tcp_checksum_verifies() {
        let s: IpAddr = "2001:db8::1".parse().unwrap();
        let d: IpAddr = "2001:db8::2".parse().unwrap();
        let seg = Tcp::new(1, 2, tcp_flags::SYN).segment(s, d, b"abc");
        assert_eq!(
            fold(ones_sum(&seg, pseudo_sum(s, d, IPPROTO_TCP, seg.len()))),
            0
        );
    }
}
