//! The network edges of VRRP (`mxlb::vrrp::socket`, `mxlb::vrrp::announce`) against the real
//! kernel, in the lab's namespaces: advertisements between the LB and the client (multicast and
//! unicast, IPv4 and IPv6, checked on the wire too), no loop-back of our own adverts, taking and
//! releasing addresses, gratuitous ARP / unsolicited NA moving a neighbour entry, and link state.
//!
//! Every test runs one current-thread tokio runtime on its own test thread and opens each socket
//! (or netlink connection) while that thread is inside the namespace it belongs to
//! ([`lab::Netns::enter`] around the future): a socket stays in the namespace it was created in,
//! so the LB's and the client's sockets can then be driven side by side from the one thread.
//! Needs root (skips without it unless CI=true).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use lab::{Lab, Netns};
use mxlb::vrrp::announce::{self, AnnounceError};
use mxlb::vrrp::packet::{Advert, Checksum, MULTICAST_V4, MULTICAST_V6};
use mxlb::vrrp::socket::{Received, SocketError, VrrpSocket, link_local_v6};

const DEV: &str = "eth0";
const LB4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
const LB_MAC: &str = "02:6d:78:00:00:02";
const OTHER_MAC: &str = "02:00:00:00:00:99";

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn lab() -> Result<Lab> {
    Lab::builder().backends(1).no_sinks().build()
}

/// Runs `fut` with the current thread inside `ns` (sockets and netlink connections it opens
/// belong to `ns`). Only one such future at a time: the thread can be in one namespace.
async fn within<T>(ns: &Netns, fut: impl Future<Output = T>) -> Result<T> {
    let _guard = ns.enter()?;
    Ok(fut.await)
}

fn advert(addrs: Vec<IpAddr>) -> Advert {
    Advert { vrid: 51, priority: 150, max_adver_cs: 100, addrs }
}

/// The next message on `sock` within `wait`, or None.
async fn recv_within(sock: &VrrpSocket, wait: Duration) -> Result<Option<Received>> {
    match tokio::time::timeout(wait, sock.recv()).await {
        Ok(r) => Ok(Some(r?)),
        Err(_) => Ok(None),
    }
}

/// Every frame entering a namespace's `eth0`, read from an AF_PACKET socket (to check what the
/// adverts look like on the wire: IPv4 header, IPv6 traffic class and hop limit).
struct Capture(OwnedFd);

impl Capture {
    /// Opens it; call with the thread inside the namespace.
    fn open(dev: &str) -> Result<Capture> {
        let c = std::ffi::CString::new(dev)?;
        // SAFETY: valid C string.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
        ensure!(ifindex != 0, "no interface {dev}");
        let fd = mxlb::afpacket::open(ifindex, mxlb::afpacket::ETH_P_ALL, false).context("AF_PACKET socket")?;
        let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
        // SAFETY: tv outlives the call; its size is passed.
        let rc = unsafe {
            libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), std::mem::size_of::<libc::timeval>() as u32)
        };
        ensure!(rc == 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
        Ok(Capture(fd))
    }

    /// The first frame captured so far (or within `wait`) that `want` accepts.
    fn find(&self, wait: Duration, want: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut buf = vec![0u8; 2048];
        while Instant::now() < deadline {
            // SAFETY: buf is writable for its length.
            let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 && want(&buf[..n as usize]) {
                return Some(buf[..n as usize].to_vec());
            }
        }
        None
    }
}

/// An IPv4 frame carrying protocol 112 from `src`.
fn is_vrrp4_from(f: &[u8], src: Ipv4Addr) -> bool {
    f.len() >= 34 && f[12..14] == [0x08, 0x00] && f[23] == 112 && f[26..30] == src.octets()
}

/// An IPv6 frame whose (first) next header is 112, from `src`.
fn is_vrrp6_from(f: &[u8], src: Ipv6Addr) -> bool {
    f.len() >= 54 && f[12..14] == [0x86, 0xdd] && f[20] == 112 && f[22..38] == src.octets()
}

/// Sends `n` multicast adverts for `vip` from the LB and checks what the client receives.
async fn send_and_receive(lab: &Lab, v6: bool, dst: Option<IpAddr>) -> Result<(Received, Vec<u8>, IpAddr)> {
    let client = lab.client().ns();
    let lb = lab.lb().ns();
    let (rx, cap) = within(client, async { Ok::<_, anyhow::Error>((VrrpSocket::open(DEV, v6)?, Capture::open(DEV)?)) }).await??;
    let (tx, src) = within(lb, async {
        let tx = VrrpSocket::open(DEV, v6)?;
        let src: IpAddr = if v6 {
            link_local_v6(DEV).await?.ok_or_else(|| anyhow!("the LB's eth0 has no link-local address"))?.into()
        } else {
            LB4.into()
        };
        Ok::<_, anyhow::Error>((tx, src))
    })
    .await??;
    let dst = dst.unwrap_or(if v6 { MULTICAST_V6.into() } else { MULTICAST_V4.into() });
    let vip: IpAddr = if v6 { VIP6.into() } else { VIP4.into() };
    let msg = advert(vec![vip]).encode(src, dst, Checksum::WithPseudoHeader);
    tx.send(src, dst, &msg).await?;
    let got = recv_within(&rx, Duration::from_secs(2)).await?.context("the client received no advert within 2 s")?;
    let frame = if v6 {
        let IpAddr::V6(s) = src else { bail!("family") };
        cap.find(Duration::from_secs(1), |f| is_vrrp6_from(f, s))
    } else {
        cap.find(Duration::from_secs(1), |f| is_vrrp4_from(f, LB4))
    };
    let frame = frame.context("the advert was not captured on the client's eth0")?;
    ensure!(got.msg == msg, "message changed on the way: sent {msg:02x?}, got {:02x?}", got.msg);
    Ok((got, frame, src))
}

fn check_ipv4_wire(frame: &[u8], dst: Ipv4Addr) {
    let ip = &frame[14..];
    assert_eq!(ip[0], 0x45, "IPv4, no options");
    assert_eq!(ip[1], 0xc0, "TOS 0xc0");
    assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 20 + 12, "total length");
    assert_eq!(ip[6..8], [0, 0], "DF clear, not fragmented");
    assert_eq!(ip[8], 255, "TTL");
    assert_eq!(ip[9], 112, "protocol");
    assert_eq!(ip[12..16], LB4.octets(), "source is the LB's own address");
    assert_eq!(ip[16..20], dst.octets());
    let mut sum: u32 = ip[..20].chunks_exact(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    assert_eq!(sum, 0xffff, "header checksum verifies");
}

#[test]
fn multicast_advert_v4_reaches_the_peer_with_ttl_255() -> Result<()> {
    if !lab::require_root("multicast_advert_v4_reaches_the_peer_with_ttl_255") {
        return Ok(());
    }
    let lab = lab()?;
    runtime()?.block_on(async {
        let (got, frame, src) = send_and_receive(&lab, false, None).await?;
        assert_eq!((got.src, got.dst, got.ttl), (src, IpAddr::from(MULTICAST_V4), 255));
        let a = Advert::decode(&got.msg, got.src, got.dst, got.ttl, Checksum::WithPseudoHeader);
        assert_eq!(a, Ok(advert(vec![VIP4.into()])));
        check_ipv4_wire(&frame, MULTICAST_V4);
        assert_eq!(frame[0..6], [0x01, 0x00, 0x5e, 0x00, 0x00, 0x12], "multicast MAC");
        Ok(())
    })
}

#[test]
fn multicast_advert_v6_comes_from_the_link_local_address_with_hop_limit_255() -> Result<()> {
    if !lab::require_root("multicast_advert_v6_comes_from_the_link_local_address_with_hop_limit_255") {
        return Ok(());
    }
    let lab = lab()?;
    runtime()?.block_on(async {
        let (got, frame, src) = send_and_receive(&lab, true, None).await?;
        let IpAddr::V6(s) = src else { bail!("family") };
        assert_eq!(s.segments()[0], 0xfe80, "link-local source {s}");
        assert_eq!((got.src, got.dst, got.ttl), (src, IpAddr::from(MULTICAST_V6), 255));
        let a = Advert::decode(&got.msg, got.src, got.dst, got.ttl, Checksum::WithPseudoHeader);
        assert_eq!(a, Ok(advert(vec![VIP6.into()])));
        let ip = &frame[14..];
        assert_eq!(ip[0] >> 4, 6);
        assert_eq!(((ip[0] & 0x0f) << 4) | (ip[1] >> 4), 0xc0, "traffic class 0xc0");
        assert_eq!(ip[7], 255, "hop limit");
        assert_eq!(ip[24..40], MULTICAST_V6.octets());
        assert_eq!(frame[0..6], [0x33, 0x33, 0x00, 0x00, 0x00, 0x12], "multicast MAC");
        Ok(())
    })
}

#[test]
fn unicast_adverts_to_a_peer_address_are_received() -> Result<()> {
    if !lab::require_root("unicast_adverts_to_a_peer_address_are_received") {
        return Ok(());
    }
    let lab = lab()?;
    runtime()?.block_on(async {
        let (got, frame, src) = send_and_receive(&lab, false, Some(CLIENT4.into())).await?;
        assert_eq!((got.src, got.dst, got.ttl), (src, IpAddr::from(CLIENT4), 255));
        // The pseudo-header holds the real destination, so this also checks `dst`.
        let a = Advert::decode(&got.msg, got.src, got.dst, got.ttl, Checksum::WithPseudoHeader);
        assert_eq!(a, Ok(advert(vec![VIP4.into()])));
        check_ipv4_wire(&frame, CLIENT4);
        assert_eq!(frame[0..6], lab.client().mac(), "to the peer's MAC");

        let (got, _, src) = send_and_receive(&lab, true, Some(CLIENT6.into())).await?;
        assert_eq!((got.src, got.dst, got.ttl), (src, IpAddr::from(CLIENT6), 255));
        let a = Advert::decode(&got.msg, got.src, got.dst, got.ttl, Checksum::WithPseudoHeader);
        assert_eq!(a, Ok(advert(vec![VIP6.into()])));
        Ok(())
    })
}

/// The LB holds the VIP on eth0 (as a master does) and sends: the client sees the LB's own
/// address as the source, and the LB's socket does not hear its own adverts.
///
/// The VIP is put on eth0 *before* the LB's own IPv4 address, so it is first in the interface's
/// address list: the source the kernel would choose for a multicast packet is then the VIP,
/// which is what building the IPv4 header ourselves avoids.
#[test]
fn own_adverts_are_not_looped_back_and_the_source_stays_exact() -> Result<()> {
    if !lab::require_root("own_adverts_are_not_looped_back_and_the_source_stays_exact") {
        return Ok(());
    }
    let lab = lab()?;
    let (client, lb) = (lab.client().ns(), lab.lb().ns());
    let own = format!("{LB4}/24");
    lb.ip(&["addr", "del", &own, "dev", DEV])?;
    runtime()?.block_on(within(lb, announce::add_address(DEV, VIP4.into())))??;
    lb.ip(&["addr", "add", &own, "dev", DEV])?;
    runtime()?.block_on(async {
        for v6 in [false, true] {
            let rx = within(client, async { VrrpSocket::open(DEV, v6) }).await??;
            let (tx, src) = within(lb, async {
                announce::add_address(DEV, VIP6.into()).await?;
                let src: IpAddr = if v6 { link_local_v6(DEV).await?.context("no link-local")?.into() } else { LB4.into() };
                Ok::<_, anyhow::Error>((VrrpSocket::open(DEV, v6)?, src))
            })
            .await??;
            let dst: IpAddr = if v6 { MULTICAST_V6.into() } else { MULTICAST_V4.into() };
            let vip: IpAddr = if v6 { VIP6.into() } else { VIP4.into() };
            let msg = advert(vec![vip]).encode(src, dst, Checksum::WithPseudoHeader);
            for _ in 0..3 {
                tx.send(src, dst, &msg).await?;
            }
            for i in 0..3 {
                let got = recv_within(&rx, Duration::from_secs(2)).await?.with_context(|| format!("advert {i} not received"))?;
                assert_eq!(got.src, src, "source with the VIP on the interface");
            }
            let own = recv_within(&tx, Duration::from_millis(500)).await?;
            assert_eq!(own, None, "the sender heard its own advert (v6: {v6})");
        }
        Ok(())
    })
}

#[test]
fn sockets_report_bad_requests_naming_the_interface() -> Result<()> {
    if !lab::require_root("sockets_report_bad_requests_naming_the_interface") {
        return Ok(());
    }
    let lab = lab()?;
    runtime()?.block_on(async {
        within(lab.lb().ns(), async {
            let e = VrrpSocket::open("nosuch0", false).expect_err("no such interface");
            assert!(matches!(e, SocketError::NoInterface { .. }), "{e}");
            assert!(e.to_string().contains("nosuch0"), "{e}");
            let s = VrrpSocket::open(DEV, false)?;
            let e = s.send(LB4.into(), MULTICAST_V6.into(), &[0; 12]).await.expect_err("family mismatch");
            assert!(matches!(e, SocketError::Invalid { .. }) && e.to_string().contains(DEV), "{e}");
            assert!(matches!(link_local_v6("nosuch0").await, Err(SocketError::NoInterface { .. })));
            Ok::<_, anyhow::Error>(())
        })
        .await?
    })
}

fn addr_line(lab: &Lab, addr: IpAddr) -> Result<Option<String>> {
    let fam = if addr.is_ipv4() { "-4" } else { "-6" };
    let out = lab.lb().ns().ip(&[fam, "-o", "addr", "show", "dev", DEV])?;
    let needle = format!(" {addr}/");
    Ok(out.lines().find(|l| l.contains(&needle)).map(str::to_string))
}

#[test]
fn addresses_are_added_and_removed_idempotently() -> Result<()> {
    if !lab::require_root("addresses_are_added_and_removed_idempotently") {
        return Ok(());
    }
    let lab = lab()?;
    let lb = lab.lb().ns();
    // Duplicate address detection on: without IFA_F_NODAD the VIP would be tentative for a while.
    lb.sysctl("net.ipv6.conf.all.accept_dad", "1")?;
    lb.sysctl("net.ipv6.conf.eth0.accept_dad", "1")?;
    runtime()?.block_on(async {
        within(lb, async {
            for vip in [IpAddr::from(VIP4), VIP6.into()] {
                assert!(!announce::has_address(DEV, vip).await?, "{vip} present before");
                announce::add_address(DEV, vip).await?;
                assert!(announce::has_address(DEV, vip).await?, "{vip} absent after add");
                announce::add_address(DEV, vip).await.with_context(|| format!("adding {vip} twice"))?;
                let line = addr_line(&lab, vip)?.with_context(|| format!("{vip} not in `ip addr`"))?;
                let prefix = if vip.is_ipv4() { 32 } else { 128 };
                assert!(line.contains(&format!(" {vip}/{prefix} ")), "{line}");
                assert!(!line.contains(" brd "), "no broadcast address: {line}");
                assert!(!line.contains("tentative"), "usable at once: {line}");
                if vip.is_ipv6() {
                    assert!(line.contains("nodad"), "{line}");
                    // Never the source of the node's own connections (health probes).
                    assert!(line.contains("deprecated"), "preferred lifetime 0: {line}");
                }
                // Usable as a local address right away (a tentative one is not).
                std::net::UdpSocket::bind((vip, 0)).with_context(|| format!("bind to {vip} right after adding it"))?;
                // The interface's own addresses are untouched.
                assert!(announce::has_address(DEV, LB4.into()).await?);
                announce::remove_address(DEV, vip).await?;
                assert!(!announce::has_address(DEV, vip).await?, "{vip} present after remove");
                assert_eq!(addr_line(&lab, vip)?, None);
                announce::remove_address(DEV, vip).await.with_context(|| format!("removing {vip} twice"))?;
                assert!(announce::has_address(DEV, LB4.into()).await?);
            }
            // An address the interface already has with another prefix (configured by someone
            // else) counts as present, and is not removed: only the /32 or /128 is ours.
            let other: IpAddr = "198.18.0.101".parse()?;
            lb.ip(&["addr", "add", "198.18.0.101/24", "dev", DEV])?;
            announce::add_address(DEV, other).await?;
            let lines = lb.ip(&["-4", "-o", "addr", "show", "dev", DEV])?;
            assert_eq!(lines.matches(" 198.18.0.101/").count(), 1, "{lines}");
            announce::remove_address(DEV, other).await?;
            assert_eq!(addr_line(&lab, other)?.map(|l| l.contains("/24")), Some(true));
            assert!(announce::has_address(DEV, other).await?);
            // Both: only the /32 goes.
            lb.ip(&["addr", "add", "198.18.0.101/32", "dev", DEV])?;
            announce::remove_address(DEV, other).await?;
            let lines = lb.ip(&["-4", "-o", "addr", "show", "dev", DEV])?;
            assert!(lines.contains(" 198.18.0.101/24 ") && !lines.contains(" 198.18.0.101/32 "), "{lines}");

            for e in [
                announce::add_address("nosuch0", VIP4.into()).await,
                announce::remove_address("nosuch0", VIP4.into()).await,
                announce::has_address("nosuch0", VIP4.into()).await.map(|_| ()),
            ] {
                assert!(matches!(e, Err(AnnounceError::NoInterface { .. })), "{e:?}");
            }
            Ok::<_, anyhow::Error>(())
        })
        .await?
    })
}

/// The client's neighbour entry for `addr`: (MAC, state), if there is one.
fn neighbour(lab: &Lab, addr: IpAddr) -> Result<Option<(String, String)>> {
    let fam = if addr.is_ipv4() { "-4" } else { "-6" };
    let out = lab.client().ns().ip(&[fam, "neigh", "show", &addr.to_string(), "dev", DEV])?;
    let Some(line) = out.lines().next() else { return Ok(None) };
    let words: Vec<&str> = line.split_whitespace().collect();
    let mac = words.iter().position(|w| *w == "lladdr").and_then(|i| words.get(i + 1)).unwrap_or(&"");
    Ok(Some((mac.to_string(), words.last().unwrap_or(&"").to_string())))
}

fn announce_moves_the_neighbour_entry(vip: IpAddr, test: &str) -> Result<()> {
    if !lab::require_root(test) {
        return Ok(());
    }
    let lab = lab()?;
    let fam = if vip.is_ipv4() { "-4" } else { "-6" };
    // A stale entry pointing elsewhere (the old master), replacing the lab's permanent one.
    lab.client().ns().ip(&[fam, "neigh", "replace", &vip.to_string(), "lladdr", OTHER_MAC, "dev", DEV, "nud", "stale"])?;
    assert_eq!(neighbour(&lab, vip)?.map(|n| n.0), Some(OTHER_MAC.to_string()));
    runtime()?.block_on(async {
        within(lab.lb().ns(), async {
            announce::add_address(DEV, vip).await?;
            announce::announce(DEV, vip).await?;
            Ok::<_, anyhow::Error>(())
        })
        .await??;
        let t0 = Instant::now();
        loop {
            let n = neighbour(&lab, vip)?;
            if n.as_ref().map(|n| n.0.as_str()) == Some(LB_MAC) {
                eprintln!("{test}: client's entry {n:?} after {:?}", t0.elapsed());
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(1) {
                bail!("the client's entry for {vip} is still {n:?} 1 s after the announcement");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

#[test]
fn gratuitous_arp_moves_the_clients_entry_to_the_lb() -> Result<()> {
    announce_moves_the_neighbour_entry(VIP4.into(), "gratuitous_arp_moves_the_clients_entry_to_the_lb")
}

#[test]
fn unsolicited_na_moves_the_clients_entry_to_the_lb() -> Result<()> {
    announce_moves_the_neighbour_entry(VIP6.into(), "unsolicited_na_moves_the_clients_entry_to_the_lb")
}

#[test]
fn link_state_follows_admin_state_and_carrier() -> Result<()> {
    if !lab::require_root("link_state_follows_admin_state_and_carrier") {
        return Ok(());
    }
    let lab = lab()?;
    let lb = lab.lb().ns();
    let port = lab.lb().bridge_port().to_string();
    let rt = runtime()?;
    // The kernel updates the operational state (and with it IFF_RUNNING) from a work queue, a
    // moment after `ip link set`: poll, as interface tracking does.
    let expect = |want: bool, what: &str| -> Result<()> {
        let t0 = Instant::now();
        loop {
            let up = rt.block_on(within(lb, announce::link_is_up(DEV)))??;
            if up == want {
                eprintln!("link_is_up = {up} ({what}) after {:?}", t0.elapsed());
                return Ok(());
            }
            ensure!(t0.elapsed() < Duration::from_secs(3), "{what}: link_is_up still {up} after 3 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    expect(true, "eth0 up at the start")?;
    lb.ip(&["link", "set", DEV, "down"])?;
    expect(false, "eth0 set down")?;
    lb.ip(&["link", "set", DEV, "up"])?;
    expect(true, "eth0 up again")?;
    // Carrier: the veth's peer (the bridge port) goes down; eth0 stays administratively up.
    lab.bridge_ns().ip(&["link", "set", &port, "down"])?;
    expect(false, "eth0 without carrier")?;
    lab.bridge_ns().ip(&["link", "set", &port, "up"])?;
    expect(true, "carrier back")?;
    let e = rt.block_on(within(lb, announce::link_is_up("nosuch0")))?;
    assert!(matches!(e, Err(AnnounceError::NoInterface { .. })), "{e:?}");
    Ok(())
}

/// Interface tracking takes links down and up: sockets opened before keep their group
/// membership and work again once the link is back; sending while it is down fails cleanly.
#[test]
fn sockets_keep_working_across_a_link_flap() -> Result<()> {
    if !lab::require_root("sockets_keep_working_across_a_link_flap") {
        return Ok(());
    }
    let lab = lab()?;
    let (client, lb) = (lab.client().ns(), lab.lb().ns());
    runtime()?.block_on(async {
        for v6 in [false, true] {
            let rx = within(client, async { VrrpSocket::open(DEV, v6) }).await??;
            let tx = within(lb, async { VrrpSocket::open(DEV, v6) }).await??;
            for ns in [client, lb] {
                ns.ip(&["link", "set", DEV, "down"])?;
            }
            let (src, dst): (IpAddr, IpAddr) = if v6 {
                // The link-local address goes with the link: use the one it will have again.
                ("fe80::6d:78ff:fe00:2".parse()?, MULTICAST_V6.into())
            } else {
                (LB4.into(), MULTICAST_V4.into())
            };
            let msg = advert(vec![if v6 { VIP6.into() } else { VIP4.into() }]).encode(src, dst, Checksum::WithPseudoHeader);
            let down = tx.send(src, dst, &msg).await;
            eprintln!("send with the link down (v6: {v6}): {down:?}");
            assert!(down.is_err(), "sending with the link down succeeded (v6: {v6})");
            for ns in [client, lb] {
                ns.ip(&["link", "set", DEV, "up"])?;
            }
            let ll = within(lb, link_local_v6(DEV)).await??;
            if v6 {
                assert_eq!(ll.map(IpAddr::from), Some(src), "the link-local address is back");
            }
            // Carrier and addresses come back a moment after `ip link set up`.
            let t0 = Instant::now();
            let got = loop {
                match tx.send(src, dst, &msg).await {
                    Ok(()) => {
                        if let Some(r) = recv_within(&rx, Duration::from_millis(200)).await? {
                            break r;
                        }
                    }
                    Err(e) => eprintln!("send right after link up: {e}"),
                }
                ensure!(t0.elapsed() < Duration::from_secs(5), "no advert through 5 s after the flap (v6: {v6})");
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            eprintln!("advert through {:?} after the flap (v6: {v6})", t0.elapsed());
            assert_eq!((got.src, got.dst, got.ttl, &got.msg), (src, dst, 255, &msg));
        }
        Ok(())
    })
}
