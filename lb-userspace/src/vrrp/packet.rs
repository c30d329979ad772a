//! VRRPv3 advertisements: encoding, and decoding with the receive checks of RFC 5798 §7.1.
//!
//! ```text
//!  0                   1                   2                   3
//! |Version| Type  | Virtual Rtr ID|   Priority    |Count IPvX Addr|
//! |(rsvd) |     Max Adver Int     |          Checksum             |
//! |                 IPvX Address(es) ...                          |
//! ```
//! The checksum covers an IP pseudo-header and the message. RFC 9568 lets IPv4 leave the
//! pseudo-header out and vendors differ (keepalived 2.2.7 includes it), so it is a setting.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol number of VRRP.
pub const IPPROTO_VRRP: u8 = 112;
/// 224.0.0.18.
pub const MULTICAST_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
/// ff02::12.
pub const MULTICAST_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x12);

/// One advertisement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    pub vrid: u8,
    /// 0 = the master is leaving; 255 = the address owner.
    pub priority: u8,
    /// Advertisement interval in centiseconds (12 bits).
    pub max_adver_cs: u16,
    /// The virtual addresses (all of one family).
    pub addrs: Vec<IpAddr>,
}

/// How the IPv4 checksum is computed (IPv6 always includes the pseudo-header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checksum {
    /// RFC 5798 and keepalived: pseudo-header included.
    #[default]
    WithPseudoHeader,
    /// RFC 9568's IPv4 option some vendors use.
    WithoutPseudoHeader,
}

/// Why a received advertisement was dropped (each is counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum DropReason {
    #[error("too short")]
    Short,
    #[error("TTL/hop limit is not 255")]
    Ttl,
    #[error("not VRRP version 3")]
    Version,
    #[error("not an advertisement (type 1)")]
    Type,
    #[error("address count does not match the length")]
    Length,
    #[error("bad checksum")]
    Checksum,
    #[error("not IP protocol 112")]
    Protocol,
    #[error("addresses of the wrong family")]
    Family,
}

impl DropReason {
    /// Stable snake_case name (status, metrics).
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Short => "short",
            DropReason::Ttl => "ttl",
            DropReason::Version => "version",
            DropReason::Type => "type",
            DropReason::Length => "length",
            DropReason::Checksum => "checksum",
            DropReason::Protocol => "protocol",
            DropReason::Family => "family",
        }
    }
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn add(sum: &mut u32, bytes: &[u8]) {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        *sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [b] = chunks.remainder() {
        *sum += (*b as u32) << 8;
    }
}

/// The checksum of `msg` (with its checksum field zeroed) sent from `src` to `dst`.
pub fn checksum(msg: &[u8], src: IpAddr, dst: IpAddr, mode: Checksum) -> u16 {
    let mut sum = 0u32;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            if mode == Checksum::WithPseudoHeader {
                add(&mut sum, &s.octets());
                add(&mut sum, &d.octets());
                add(&mut sum, &[0, IPPROTO_VRRP]);
                add(&mut sum, &(msg.len() as u16).to_be_bytes());
            }
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(v) => v.to_ipv6_mapped(),
                IpAddr::V6(v) => v,
            };
            add(&mut sum, &v6(s).octets());
            add(&mut sum, &v6(d).octets());
            add(&mut sum, &(msg.len() as u32).to_be_bytes());
            add(&mut sum, &[0, 0, 0, IPPROTO_VRRP]);
        }
    }
    let mut zeroed = msg.to_vec();
    zeroed[6] = 0;
    zeroed[7] = 0;
    add(&mut sum, &zeroed);
    fold(sum)
}

impl Advert {
    /// The VRRP message (no IP header) as sent from `src` to `dst`.
    pub fn encode(&self, src: IpAddr, dst: IpAddr, mode: Checksum) -> Vec<u8> {
        let interval = self.max_adver_cs & 0x0fff;
        let mut m = vec![0x31, self.vrid, self.priority, self.addrs.len() as u8];
        m.extend_from_slice(&interval.to_be_bytes());
        m.extend_from_slice(&[0, 0]);
        for a in &self.addrs {
            match a {
                IpAddr::V4(v) => m.extend_from_slice(&v.octets()),
                IpAddr::V6(v) => m.extend_from_slice(&v.octets()),
            }
        }
        let c = checksum(&m, src, dst, mode);
        m[6..8].copy_from_slice(&c.to_be_bytes());
        m
    }

    /// Checks and decodes a VRRP message received from `src` to `dst` with `ttl` (IPv4 TTL or
    /// IPv6 hop limit). `msg` is the IP payload only (Ethernet padding already cut by the IP
    /// length).
    pub fn decode(msg: &[u8], src: IpAddr, dst: IpAddr, ttl: u8, mode: Checksum) -> Result<Advert, DropReason> {
        if ttl != 255 {
            return Err(DropReason::Ttl);
        }
        if msg.len() < 8 {
            return Err(DropReason::Short);
        }
        if msg[0] >> 4 != 3 {
            return Err(DropReason::Version);
        }
        if msg[0] & 0x0f != 1 {
            return Err(DropReason::Type);
        }
        let v4 = src.is_ipv4();
        let width = if v4 { 4 } else { 16 };
        let count = msg[3] as usize;
        if count == 0 || msg.len() != 8 + count * width {
            return Err(DropReason::Length);
        }
        let got = u16::from_be_bytes([msg[6], msg[7]]);
        if checksum(msg, src, dst, mode) != got {
            return Err(DropReason::Checksum);
        }
        let addrs = msg[8..]
            .chunks_exact(width)
            .map(|c| match <[u8; 4]>::try_from(c) {
                Ok(b) => IpAddr::from(b),
                Err(_) => IpAddr::from(<[u8; 16]>::try_from(c).unwrap_or([0; 16])),
            })
            .collect();
        Ok(Advert {
            vrid: msg[1],
            priority: msg[2],
            max_adver_cs: u16::from_be_bytes([msg[4], msg[5]]) & 0x0fff,
            addrs,
        })
    }
}

/// Decodes an IPv4 packet carrying VRRP (as read from a raw socket or a frame past Ethernet):
/// the IP total length bounds the message, so Ethernet padding to 60 bytes is ignored.
pub fn decode_ipv4(packet: &[u8], mode: Checksum) -> Result<(Ipv4Addr, Advert), DropReason> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return Err(DropReason::Short);
    }
    let ihl = (packet[0] & 0x0f) as usize * 4;
    let total = u16::from_be_bytes([packet[2], packet[3]]) as usize;
    if ihl < 20 || total < ihl || total > packet.len() {
        return Err(DropReason::Short);
    }
    if packet[9] != IPPROTO_VRRP {
        return Err(DropReason::Protocol);
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let advert = Advert::decode(&packet[ihl..total], src.into(), dst.into(), packet[8], mode)?;
    Ok((src, advert))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The advertisement captured from keepalived (vrrp-reference.md): VRID 51, priority 150,
    /// advert 1 s, VIP 198.18.0.10, sender 198.18.0.11, to 224.0.0.18.
    const CAPTURE: [u8; 46] = [
        0x01, 0x00, 0x5e, 0x00, 0x00, 0x12, 0x6a, 0x07, 0x09, 0x96, 0xe9, 0x9c, 0x08, 0x00, // Ethernet
        0x45, 0xc0, 0x00, 0x20, 0x00, 0x01, 0x00, 0x00, 0xff, 0x70, 0x14, 0x7d, 0xc6, 0x12, 0x00, 0x0b, 0xe0, 0x00,
        0x00, 0x12, // IPv4
        0x31, 0x33, 0x96, 0x01, 0x00, 0x64, 0xcb, 0x9d, 0xc6, 0x12, 0x00, 0x0a, // VRRP
    ];

    fn advert(cs: u16) -> Advert {
        Advert { vrid: 51, priority: 150, max_adver_cs: cs, addrs: vec!["198.18.0.10".parse().unwrap()] }
    }

    fn sender() -> IpAddr {
        "198.18.0.11".parse().unwrap()
    }

    #[test]
    fn encodes_byte_identical_to_keepalived() {
        let ours = advert(100).encode(sender(), MULTICAST_V4.into(), Checksum::WithPseudoHeader);
        assert_eq!(ours, CAPTURE[34..]);
        // The other vectors of the reference.
        let c = |a: &Advert, dst: &str, mode| {
            let m = a.encode(sender(), dst.parse().unwrap(), mode);
            u16::from_be_bytes([m[6], m[7]])
        };
        assert_eq!(c(&advert(100), "224.0.0.18", Checksum::WithoutPseudoHeader), 0x724a);
        assert_eq!(c(&advert(10), "224.0.0.18", Checksum::WithPseudoHeader), 0xcbf7);
        assert_eq!(c(&advert(100), "198.18.0.12", Checksum::WithPseudoHeader), 0xe591, "unicast uses the real destination");
    }

    #[test]
    fn decodes_the_capture_with_ethernet_padding() {
        let mut frame = CAPTURE.to_vec();
        frame.resize(60, 0); // padded to the Ethernet minimum on the wire
        let (src, a) = decode_ipv4(&frame[14..], Checksum::WithPseudoHeader).unwrap();
        assert_eq!((src, a), ("198.18.0.11".parse().unwrap(), advert(100)));
        // The same bytes under the other checksum convention are rejected.
        assert_eq!(decode_ipv4(&frame[14..], Checksum::WithoutPseudoHeader), Err(DropReason::Checksum));
    }

    #[test]
    fn malformed_advertisements_are_dropped_with_their_reason() {
        let ip = CAPTURE[14..].to_vec();
        let mutate = |i: usize, v: u8| {
            let mut p = ip.clone();
            p[i] = v;
            decode_ipv4(&p, Checksum::WithPseudoHeader)
        };
        assert_eq!(mutate(8, 254), Err(DropReason::Ttl));
        assert_eq!(mutate(20, 0x21), Err(DropReason::Version));
        assert_eq!(mutate(20, 0x32), Err(DropReason::Type));
        assert_eq!(mutate(23, 2), Err(DropReason::Length));
        assert_eq!(mutate(27, 0x9e), Err(DropReason::Checksum));
        assert_eq!(mutate(9, 17), Err(DropReason::Protocol));
        assert_eq!(decode_ipv4(&ip[..25], Checksum::WithPseudoHeader), Err(DropReason::Short));
        let mut short = ip.clone();
        short[3] = 0x1c; // IP length 28: the VRRP message is cut to 8 bytes
        assert_eq!(decode_ipv4(&short, Checksum::WithPseudoHeader), Err(DropReason::Length));
        assert_eq!(Advert::decode(&ip[20..26], sender(), MULTICAST_V4.into(), 255, Checksum::WithPseudoHeader), Err(DropReason::Short));
    }

    #[test]
    fn ipv6_round_trips_and_always_uses_the_pseudo_header() {
        let a = Advert { vrid: 7, priority: 255, max_adver_cs: 10, addrs: vec!["2001:db8::100".parse().unwrap(), "2001:db8::101".parse().unwrap()] };
        let src: IpAddr = "fe80::1".parse().unwrap();
        let m = a.encode(src, MULTICAST_V6.into(), Checksum::WithoutPseudoHeader);
        assert_eq!(m.len(), 8 + 32);
        assert_eq!(Advert::decode(&m, src, MULTICAST_V6.into(), 255, Checksum::WithPseudoHeader), Ok(a.clone()));
        assert_eq!(Advert::decode(&m, "fe80::2".parse().unwrap(), MULTICAST_V6.into(), 255, Checksum::WithPseudoHeader), Err(DropReason::Checksum), "the pseudo-header binds the sender");
        assert_eq!(Advert::decode(&m, src, MULTICAST_V6.into(), 64, Checksum::WithPseudoHeader), Err(DropReason::Ttl));
    }
}
