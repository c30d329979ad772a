//! What a VRRP master does with its virtual addresses: puts them on the interface (and takes
//! them off again), tells the segment where they now live, and watches the interface.
//!
//! * Addresses go on as /32 or /128 over rtnetlink. IPv4 without a broadcast address (the
//!   builder of rtnetlink would set broadcast = the address itself for a /32, and the kernel
//!   would then add a broadcast route for the VIP); IPv6 with `IFA_F_NODAD`, so it is usable at
//!   once instead of tentative for a second of duplicate address detection, which on a VRRP
//!   failover would also find the old master's copy if it is still around, and deprecated
//!   (preferred lifetime 0) so it is never the source of the node's own connections. Only such host
//!   entries are taken off again: the same address with another prefix length was configured
//!   by someone else (see [`remove_address`]).
//! * Announcing is one gratuitous ARP or one unsolicited Neighbour Advertisement; the caller
//!   repeats it (keepalived sends 5, and 5 more after 5 s). The ARP frame is built by hand and
//!   sent through AF_PACKET, as no socket of the IP stack sends ARP. A gratuitous ARP is a
//!   broadcast *request* with sender IP = target IP = the VIP: Linux updates an existing
//!   neighbour entry from it (overriding the lock time) but, with the default `arp_accept=0`,
//!   does not create one; hosts that have no entry learn the new MAC on their next ARP. The
//!   NA goes through an ICMPv6 raw socket bound to the interface, from its link-local address,
//!   to ff02::1 with hop limit 255 (receivers drop NDP with any other) and the Override flag,
//!   so receivers replace the MAC they have (again only an existing entry by default:
//!   `accept_untracked_na=0`); the kernel fills in the ICMPv6 checksum.
//! * [`link_is_up`] is what interface tracking reads: administratively up and running (carrier,
//!   operational state up).
//!
//! Everything acts on the network namespace of the thread that first polls the future (where
//! the interface name is looked up and the netlink or packet socket is opened).
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV6},
};

use futures::TryStreamExt as _;
use netlink_packet_route::{
    address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, CacheInfo},
    link::{LinkAttribute, LinkFlags},
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::socket::{SocketError, ifindex, link_local_v6};

/// What went wrong taking, releasing or announcing an address on an interface.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("{ifname}: no such interface")]
    NoInterface { ifname: String },
    #[error("{ifname}: no Ethernet address to announce {addr} with")]
    NoMac { ifname: String, addr: IpAddr },
    #[error("{ifname}: {op}: {source}")]
    Netlink {
        ifname: String,
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{ifname}: {op}: {source}")]
    Io {
        ifname: String,
        op: String,
        #[source]
        source: io::Error,
    },
    /// Looking up the link-local source of a Neighbour Advertisement.
    #[error(transparent)]
    LinkLocal(#[from] SocketError),
}

const ETH_P_ARP: u16 = 0x0806;

/// The gratuitous ARP for `addr` from `mac`: an Ethernet broadcast ARP request whose sender and
/// target IP are both `addr`, sender MAC `mac`, target MAC zero (RFC 5227 §3's ARP
/// announcement, what keepalived sends).
pub fn garp_frame(mac: [u8; 6], addr: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    // ARP: Ethernet (1), IPv4 (0x0800), lengths 6 and 4, request (1).
    f[14..22].copy_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]);
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&addr.octets());
    // f[32..38]: target MAC zero.
    f[38..42].copy_from_slice(&addr.octets());
    f
}

/// The ICMPv6 message of an unsolicited Neighbour Advertisement for `addr` from `mac` (RFC 4861
/// §4.4, §7.2.6): type 136, code 0, flags Override only (not Router, not Solicited: a
/// solicited NA to a multicast address is dropped), target `addr`, and a target link-layer
/// address option with `mac`. The checksum is left 0 for the kernel to fill in.
pub fn unsolicited_na(mac: [u8; 6], addr: Ipv6Addr) -> [u8; 32] {
    let mut m = [0u8; 32];
    m[0] = 136;
    // m[1] code 0, m[2..4] checksum (kernel).
    m[4] = 0x20; // R=0 S=0 O=1
    m[8..24].copy_from_slice(&addr.octets());
    m[24] = 2; // option: target link-layer address
    m[25] = 1; // length in units of 8 bytes
    m[26..32].copy_from_slice(&mac);
    m
}

/// ff02::1.
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

fn no_interface(ifname: &str) -> AnnounceError {
    AnnounceError::NoInterface { ifname: ifname.to_string() }
}

fn io_err(ifname: &str, op: impl Into<String>) -> impl FnOnce(io::Error) -> AnnounceError {
    let (ifname, op) = (ifname.to_string(), op.into());
    move |source| AnnounceError::Io { ifname, op, source }
}

fn nl_err(ifname: &str, op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> AnnounceError {
    let (ifname, op) = (ifname.to_string(), op.into());
    move |source| AnnounceError::Netlink { ifname, op, source }
}

/// The errno of a netlink error answer, if it is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

fn connect(ifname: &str) -> Result<rtnetlink::Handle, AnnounceError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(io_err(ifname, "netlink socket"))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// The interface's address entries whose local address is `addr` (any prefix length).
async fn entries(handle: &rtnetlink::Handle, ifname: &str, index: u32, addr: IpAddr) -> Result<Vec<AddressMessage>, AnnounceError> {
    let mut stream = handle.address().get().set_link_index_filter(index).execute();
    let mut out = Vec::new();
    while let Some(msg) = stream.try_next().await.map_err(nl_err(ifname, "list addresses"))? {
        // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on point-to-point
        // IPv4 links and the only one IPv6 usually sends.
        let local = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(l) => Some(*l),
            _ => None,
        });
        let address = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(l) => Some(*l),
            _ => None,
        });
        if local.or(address) == Some(addr) {
            out.push(msg);
        }
    }
    Ok(out)
}

/// Whether `ifname` holds `addr` now (with any prefix length).
pub async fn has_address(ifname: &str, addr: IpAddr) -> Result<bool, AnnounceError> {
    let index = ifindex(ifname).ok_or_else(|| no_interface(ifname))?;
    let handle = connect(ifname)?;
    Ok(!entries(&handle, ifname, index, addr).await?.is_empty())
}

/// Puts `addr` on `ifname` as a /32 or /128 (IPv6 with `IFA_F_NODAD`, usable at once). Ok if
/// the interface already holds it, with whatever prefix length.
pub async fn add_address(ifname: &str, addr: IpAddr) -> Result<(), AnnounceError> {
    let index = ifindex(ifname).ok_or_else(|| no_interface(ifname))?;
    let handle = connect(ifname)?;
    if !entries(&handle, ifname, index, addr).await?.is_empty() {
        return Ok(());
    }
    let prefix = if addr.is_ipv4() { 32 } else { 128 };
    let mut req = handle.address().add(index, addr, prefix);
    let msg = req.message_mut();
    match addr {
        // As `ip addr add VIP/32`: no broadcast address (see the module docs).
        IpAddr::V4(_) => msg.attributes.retain(|a| !matches!(a, AddressAttribute::Broadcast(_))),
        IpAddr::V6(_) => {
            msg.header.flags = AddressHeaderFlags::Nodad;
            msg.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
            // Preferred lifetime 0 ("deprecated"): still a local address for the VIP's
            // traffic, but never picked as the source of this node's own connections. Without
            // it, IPv6 source selection may pick the VIP for health probes to back-ends, whose
            // replies then go to the back-end's own copy of the VIP on its loopback.
            let mut lifetimes = CacheInfo::default();
            lifetimes.ifa_preferred = 0;
            lifetimes.ifa_valid = u32::MAX;
            msg.attributes.push(AddressAttribute::CacheInfo(lifetimes));
        }
    }
    match req.execute().await {
        Ok(()) => Ok(()),
        // Added by someone else since we looked.
        Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(nl_err(ifname, format!("add {addr}/{prefix}"))(e)),
    }
}

/// Takes `addr` off `ifname`: the /32 or /128 entry, as [`add_address`] puts it on. Ok if it
/// is absent.
///
/// An entry with another prefix length is left alone (and [`has_address`] still says true):
/// it was configured by someone else, typically the interface's own address on an address
/// owner (priority 255), and taking it away could cut the node off. The caller can tell such a
/// foreign copy by [`has_address`] after this.
pub async fn remove_address(ifname: &str, addr: IpAddr) -> Result<(), AnnounceError> {
    let index = ifindex(ifname).ok_or_else(|| no_interface(ifname))?;
    let handle = connect(ifname)?;
    let host = if addr.is_ipv4() { 32 } else { 128 };
    for msg in entries(&handle, ifname, index, addr).await? {
        if msg.header.prefix_len != host {
            continue;
        }
        let prefix = msg.header.prefix_len;
        match handle.address().del(msg).execute().await {
            Ok(()) => {}
            // Removed by someone else since we looked.
            Err(e) if matches!(errno(&e), Some(libc::EADDRNOTAVAIL | libc::ENOENT | libc::ESRCH)) => {}
            Err(e) => return Err(nl_err(ifname, format!("remove {addr}/{prefix}"))(e)),
        }
    }
    Ok(())
}

/// Index, flags and MAC (if it has a 6-byte, non-zero one) of an interface.
async fn link(ifname: &str) -> Result<(u32, LinkFlags, Option<[u8; 6]>), AnnounceError> {
    let index = ifindex(ifname).ok_or_else(|| no_interface(ifname))?;
    let handle = connect(ifname)?;
    let mut stream = handle.link().get().match_index(index).execute();
    let msg = match stream.try_next().await {
        Ok(Some(msg)) => msg,
        // Gone between the name lookup and the request.
        Ok(None) => return Err(no_interface(ifname)),
        Err(e) if errno(&e) == Some(libc::ENODEV) => return Err(no_interface(ifname)),
        Err(e) => return Err(nl_err(ifname, "get link")(e)),
    };
    let mac = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => <[u8; 6]>::try_from(m.as_slice()).ok().filter(|m| *m != [0; 6]),
        _ => None,
    });
    Ok((index, msg.header.flags, mac))
}

/// Whether `ifname` is up for interface tracking: administratively up (`IFF_UP`) and running
/// (`IFF_RUNNING`: carrier and operational state up). Err if there is no such interface.
pub async fn link_is_up(ifname: &str) -> Result<bool, AnnounceError> {
    let (_, flags, _) = link(ifname).await?;
    Ok(flags.contains(LinkFlags::Up | LinkFlags::Running))
}

/// Sends one gratuitous ARP (IPv4) or one unsolicited Neighbour Advertisement (IPv6) for `addr`
/// out of `ifname`, with the interface's MAC. See the module docs.
pub async fn announce(ifname: &str, addr: IpAddr) -> Result<(), AnnounceError> {
    let (index, _, mac) = link(ifname).await?;
    let mac = mac.ok_or_else(|| AnnounceError::NoMac { ifname: ifname.to_string(), addr })?;
    match addr {
        IpAddr::V4(a) => send_garp(ifname, index, &garp_frame(mac, a)),
        IpAddr::V6(a) => {
            let src = link_local_v6(ifname).await?;
            send_na(ifname, index, src, &unsolicited_na(mac, a))
        }
    }
}

fn send_garp(ifname: &str, index: u32, frame: &[u8; 42]) -> Result<(), AnnounceError> {
    // Protocol 0: this socket only sends, so the kernel queues nothing received on it.
    let fd = crate::afpacket::open(index, 0, true).map_err(io_err(ifname, "AF_PACKET socket"))?;
    crate::afpacket::send(&fd, frame).map_err(io_err(ifname, "send gratuitous ARP"))
}

fn send_na(ifname: &str, index: u32, src: Option<Ipv6Addr>, msg: &[u8; 32]) -> Result<(), AnnounceError> {
    let sock = Socket::new(Domain::IPV6, Type::RAW.cloexec(), Some(Protocol::ICMPV6))
        .map_err(io_err(ifname, "ICMPv6 socket"))?;
    sock.bind_device(Some(ifname.as_bytes())).map_err(io_err(ifname, "SO_BINDTODEVICE"))?;
    sock.set_multicast_if_v6(index).map_err(io_err(ifname, "IPV6_MULTICAST_IF"))?;
    sock.set_multicast_hops_v6(255).map_err(io_err(ifname, "IPV6_MULTICAST_HOPS"))?;
    sock.set_multicast_loop_v6(false).map_err(io_err(ifname, "IPV6_MULTICAST_LOOP"))?;
    // Bound to the link-local address, which the kernel uses as the source. Without one
    // (an interface with IPv6 link-local addresses turned off) the kernel picks a source.
    if let Some(src) = src {
        sock.bind(&SockAddr::from(SocketAddrV6::new(src, 0, 0, index)))
            .map_err(io_err(ifname, format!("bind to {src}")))?;
    }
    let to = SockAddr::from(SocketAddrV6::new(ALL_NODES, 0, 0, index));
    let n = sock.send_to(msg, &to).map_err(io_err(ifname, "send Neighbour Advertisement"))?;
    if n != msg.len() {
        let e = io::Error::new(io::ErrorKind::WriteZero, format!("sent {n} of {} bytes", msg.len()));
        return Err(io_err(ifname, "send Neighbour Advertisement")(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x6d, 0x78, 0x00, 0x00, 0x02];

    #[test]
    fn gratuitous_arp_bytes() {
        let f = garp_frame(MAC, Ipv4Addr::new(198, 18, 0, 100));
        #[rustfmt::skip]
        let want: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x6d, 0x78, 0x00, 0x00, 0x02, 0x08, 0x06, // Ethernet
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01,                                     // ARP request
            0x02, 0x6d, 0x78, 0x00, 0x00, 0x02, 0xc6, 0x12, 0x00, 0x64,                         // sender
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc6, 0x12, 0x00, 0x64,                         // target
        ];
        assert_eq!(f, want);
    }

    #[test]
    fn unsolicited_neighbour_advertisement_bytes() {
        let m = unsolicited_na(MAC, "2001:db8::100".parse().unwrap());
        #[rustfmt::skip]
        let want: [u8; 32] = [
            136, 0, 0x00, 0x00,            // type, code, checksum (kernel)
            0x20, 0x00, 0x00, 0x00,        // R=0 S=0 O=1
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x00, // target
            0x02, 0x01, 0x02, 0x6d, 0x78, 0x00, 0x00, 0x02, // target link-layer address
        ];
        assert_eq!(m, want);
    }
}
