//! What the data path needs from the kernel's view of the network: back-ends' MAC addresses
//! (dsr-l2 rewrites the destination MAC to the back-end's) and this node's own addresses (the
//! default dsr-ipip outer source). Read over rtnetlink.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use futures::TryStreamExt as _;
use netlink_packet_route::{
    address::{AddressAttribute, AddressScope},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
};

/// Errors talking to the kernel over netlink.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink: {0}")]
    Io(#[from] std::io::Error),
    #[error("netlink: {0}")]
    Request(#[from] rtnetlink::Error),
}

fn connect() -> Result<rtnetlink::Handle, NetlinkError> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    Ok(handle)
}

/// The neighbour table: address → MAC, for entries that hold a usable MAC.
pub async fn neighbour_table() -> Result<BTreeMap<IpAddr, [u8; 6]>, NetlinkError> {
    let handle = connect()?;
    let mut out = BTreeMap::new();
    let mut stream = handle.neighbours().get().execute();
    while let Some(msg) = stream.try_next().await? {
        if matches!(msg.header.state, NeighbourState::Failed | NeighbourState::Incomplete | NeighbourState::None) {
            continue;
        }
        let mut dest = None;
        let mut mac = None;
        for attr in &msg.attributes {
            match attr {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => dest = Some(IpAddr::V4(*a)),
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => dest = Some(IpAddr::V6(*a)),
                NeighbourAttribute::LinkLocalAddress(l) if l.len() == 6 => {
                    mac = Some([l[0], l[1], l[2], l[3], l[4], l[5]]);
                }
                _ => {}
            }
        }
        if let (Some(d), Some(m)) = (dest, mac) {
            if m != [0; 6] {
                out.insert(d, m);
            }
        }
    }
    Ok(out)
}

/// Resolves the MACs of `addrs`: reads the neighbour table, and for addresses not in it sends
/// one UDP datagram to the discard port (the kernel resolves the neighbour to send it) and
/// waits up to `wait` for the entries to appear. Returns what it found.
pub async fn resolve_macs(addrs: &[IpAddr], wait: Duration) -> Result<BTreeMap<IpAddr, [u8; 6]>, NetlinkError> {
    let mut table = neighbour_table().await?;
    let missing: Vec<IpAddr> = addrs.iter().copied().filter(|a| !table.contains_key(a)).collect();
    if missing.is_empty() {
        return Ok(table);
    }
    for a in &missing {
        let bind: SocketAddr = if a.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
        if let Ok(s) = UdpSocket::bind(bind) {
            // Errors (no route yet) just mean no MAC: the caller reports the back-end.
            let _ = s.send_to(b"mxlb neighbour probe", (*a, 9));
        }
    }
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        table = neighbour_table().await?;
        if missing.iter().all(|a| table.contains_key(a)) {
            break;
        }
    }
    Ok(table)
}

/// The first IPv4 address and the first global IPv6 address of `iface`.
pub async fn interface_addresses(iface: &str) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), NetlinkError> {
    let c = std::ffi::CString::new(iface).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: valid C string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Ok((None, None));
    }
    let handle = connect()?;
    let mut stream = handle.address().get().set_link_index_filter(index).execute();
    let (mut v4, mut v6) = (None, None);
    while let Some(msg) = stream.try_next().await? {
        for attr in &msg.attributes {
            match attr {
                AddressAttribute::Address(IpAddr::V4(a)) if v4.is_none() => v4 = Some(*a),
                AddressAttribute::Address(IpAddr::V6(a))
                    if v6.is_none() && msg.header.scope == AddressScope::Universe =>
                {
                    v6 = Some(*a)
                }
                _ => {}
            }
        }
    }
    Ok((v4, v6))
}
