//! The lab topology: one segment (a Linux bridge in its own namespace), a client, a load
//! balancer and N back-ends, each in its own namespace with an `eth0` veth whose peer is a
//! bridge port.
//!
//! ```text
//!                 bridge ns  {p}-br:  bridge {p}br
//!        ┌──────────────┬─────────────┬──────────────┬─────┐
//!     port {p}cl     port {p}lb    port {p}b1     port {p}b2 ...
//!        │              │             │              │
//!   {p}-client eth0  {p}-lb eth0  {p}-b1 eth0    {p}-b2 eth0     (+ VIP on lo in back-ends)
//! ```
//!
//! Addresses (segment 198.18.0.0/24 and 2001:db8::/64, nothing in the root namespace):
//! client .1 / ::1, LB .2 / ::2, back-end i (1-based) .(10+i) / ::(10+i) as written in text
//! (back-end 1 = 198.18.0.11 and 2001:db8::11), VIP 198.18.0.100 and 2001:db8::100.
//! MACs are fixed: client 02:6d:78:00:00:01, LB 02:6d:78:00:00:02, back-end i 02:6d:78:00:01:i.
//!
//! * **VIP → LB**: the client has permanent neighbour entries mapping both VIPs to the LB's
//!   MAC. In production VRRP makes the LB answer ARP/ND for the VIP; here the static entry
//!   stands in for it. The LB has no VIP address: without an LB program, traffic for the VIP is
//!   not answered by anyone.
//! * **DSR back-ends**: the VIPs sit on each back-end's `lo` (IPv6 with `nodad`), with
//!   `arp_ignore=1`/`arp_announce=2` on `all` and `eth0` so no back-end answers ARP for them;
//!   `rp_filter=0`. They reply to the client directly.
//! * **LB**: IPv4 and IPv6 forwarding on (`all` and `eth0`, needed by `bpf_fib_lookup`),
//!   `send_redirects=0`, `rp_filter=0`.
//! * **Offloads**: `tx` checksum offload (and with it TSO) is off on the client's `eth0` and on
//!   the LB's bridge port: with native XDP on veth, a partial checksum is lost on the rewrite path.
//! * **MTU**: IPIP adds 20 bytes (IPv6-in-IPv6 40). The client keeps MTU 1500 on both ends of its
//!   veth, so its TCP MSS is 1460/1440 and its largest packet is 1500 bytes; every other veth
//!   end (LB, back-ends, their bridge ports, the bridge) gets [`PATH_MTU`] = 1600, so an
//!   encapsulated full-size packet (1540) fits through the LB's XDP_TX (checked against the peer
//!   MTU), the bridge (egress port MTU) and the back-end's veth, where the back-end's BPF
//!   decapsulates it back to ≤ 1500. Back-ends reply with segments sized by the client's MSS, so
//!   nothing above 1500 ever reaches the client. No advmss tricks are needed.
//! * **XDP_TX on veth**: frames an XDP program sends back out of the LB's `eth0` are delivered
//!   only if the peer (the bridge port [`Lab::lb_peer_port`]) has a native XDP program attached;
//!   attach a plain XDP_PASS program there.
//! * **Names**: namespaces are `{prefix}-…` and bridge ports `{prefix}…`, where the prefix is
//!   `mx` + 5 hex digits, unique per lab (pid, time, counter), so parallel labs and parallel
//!   test runs never collide; the `eth0` inside each host namespace is created directly there
//!   (never in the root namespace), so it cannot collide either.

use crate::lab::cmd::Daemon;
use crate::lab::netns::{self, LinkInfo, Netns, mac_to_string};
use crate::lab::smtp::{SinkCounts, SinkOpts, SmtpSink, SourceOpts, SourceResult, smtp_source};
use anyhow::{Context, Result, bail, ensure};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// MTU of every veth end except the client's (see the module docs).
pub const PATH_MTU: u32 = 1600;
/// The client's MTU (both ends of its veth).
pub const CLIENT_MTU: u32 = 1500;
pub const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
/// Largest number of back-ends (addresses .11 to .90 stay below the VIP).
pub const MAX_BACKENDS: usize = 80;
/// The interface name inside every host namespace.
pub const HOST_DEV: &str = "eth0";

/// IPv4 or IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddrFamily {
    V4,
    V6,
}

impl AddrFamily {
    pub const ALL: [AddrFamily; 2] = [AddrFamily::V4, AddrFamily::V6];

    pub fn of(ip: IpAddr) -> AddrFamily {
        if ip.is_ipv4() {
            AddrFamily::V4
        } else {
            AddrFamily::V6
        }
    }
}

impl std::fmt::Display for AddrFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AddrFamily::V4 => "ipv4",
            AddrFamily::V6 => "ipv6",
        })
    }
}

/// What a host is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Lb,
    /// Back-end, 1-based.
    Backend(usize),
}

/// One host: a namespace with `eth0` on the segment.
#[derive(Clone, Debug)]
pub struct Host {
    role: Role,
    ns: Netns,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    mac: [u8; 6],
    port: String,
}

impl Host {
    pub fn role(&self) -> Role {
        self.role
    }
    /// Short name: "client", "lb", "b1", "b2", ...
    pub fn name(&self) -> String {
        match self.role {
            Role::Client => "client".into(),
            Role::Lb => "lb".into(),
            Role::Backend(i) => format!("b{i}"),
        }
    }
    pub fn ns(&self) -> &Netns {
        &self.ns
    }
    /// The host's interface on the segment ("eth0").
    pub fn dev(&self) -> &'static str {
        HOST_DEV
    }
    /// The host's own address on the segment.
    pub fn addr(&self, fam: AddrFamily) -> IpAddr {
        match fam {
            AddrFamily::V4 => self.v4.into(),
            AddrFamily::V6 => self.v6.into(),
        }
    }
    pub fn v4(&self) -> Ipv4Addr {
        self.v4
    }
    pub fn v6(&self) -> Ipv6Addr {
        self.v6
    }
    /// MAC of `eth0` (fixed by the lab).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }
    /// ifindex, MAC and MTU of `eth0`, read from the namespace.
    pub fn link(&self) -> Result<LinkInfo> {
        self.ns.link(HOST_DEV)
    }
    pub fn ifindex(&self) -> Result<u32> {
        Ok(self.link()?.ifindex)
    }
    /// Name of this host's port on the bridge (in [`Lab::bridge_ns`]).
    pub fn bridge_port(&self) -> &str {
        &self.port
    }
}

/// The bridge port facing the LB's `eth0`, where the PASS program goes for native XDP_TX.
#[derive(Clone, Debug)]
pub struct PeerPort {
    pub ns: Netns,
    pub name: String,
    pub ifindex: u32,
}

/// Configures a [`Lab`].
#[derive(Clone, Debug)]
pub struct LabBuilder {
    backends: usize,
    sinks: Option<SinkOpts>,
}

impl LabBuilder {
    /// Number of back-ends (1..=80; default 3).
    pub fn backends(mut self, n: usize) -> Self {
        self.backends = n;
        self
    }
    /// Start smtp-sink on every back-end with these options (default: port 25).
    pub fn sinks(mut self, opts: SinkOpts) -> Self {
        self.sinks = Some(opts);
        self
    }
    /// Start no smtp-sink (for labs with other back-end daemons).
    pub fn no_sinks(mut self) -> Self {
        self.sinks = None;
        self
    }

    pub fn build(self) -> Result<Lab> {
        ensure!(
            (1..=MAX_BACKENDS).contains(&self.backends),
            "backends must be 1..={MAX_BACKENDS}, got {}",
            self.backends
        );
        let prefix = new_prefix();
        // Leftovers with this prefix can only come from an earlier run that crashed with the
        // same pid and clock value; other runs' namespaces are never touched.
        for stale in netns::namespaces_with_prefix(&prefix) {
            netns::delete(&stale);
        }
        let mut lab = Lab {
            daemons: Vec::new(),
            sinks: Vec::new(),
            client: None,
            lb: None,
            backends: Vec::new(),
            bridge: Netns::from_name(format!("{prefix}-br")),
            owned: Owned(Vec::new()),
            prefix,
        };
        // On any error below, dropping `lab` removes what was created so far.
        lab.create(self.backends)
            .with_context(|| format!("building lab {}", lab.prefix))?;
        if let Some(opts) = &self.sinks {
            for b in &lab.backends {
                let mut o = opts.clone();
                o.hostname.get_or_insert_with(|| b.name());
                let sink = SmtpSink::start(&b.ns, &o)?;
                lab.sinks.push(sink);
            }
        }
        Ok(lab)
    }
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// `mx` + 5 hex digits from pid, time and a per-process counter.
fn new_prefix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed) as u64;
    // splitmix64 over the inputs
    let mut x = nanos ^ ((std::process::id() as u64) << 32) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    format!("mx{:05x}", x & 0xF_FFFF)
}

/// Namespaces created by a lab, deleted on drop.
struct Owned(Vec<String>);

impl Drop for Owned {
    fn drop(&mut self) {
        for name in self.0.iter().rev() {
            netns::delete(name);
        }
    }
}

/// A running lab. Dropping it stops every process it started and deletes every namespace
/// (also while unwinding from a panic).
pub struct Lab {
    // Field order = drop order: processes first, then namespaces.
    daemons: Vec<Daemon>,
    sinks: Vec<SmtpSink>,
    client: Option<Host>,
    lb: Option<Host>,
    backends: Vec<Host>,
    bridge: Netns,
    owned: Owned,
    prefix: String,
}

impl Lab {
    pub fn builder() -> LabBuilder {
        LabBuilder {
            backends: 3,
            sinks: Some(SinkOpts::default()),
        }
    }

    fn new_ns(&mut self, suffix: &str) -> Result<Netns> {
        let name = format!("{}-{suffix}", self.prefix);
        let ns = Netns::create(&name);
        // Record it even if configuring it failed half-way.
        if std::path::Path::new("/run/netns").join(&name).exists() {
            self.owned.0.push(name);
        }
        ns
    }

    fn create(&mut self, n: usize) -> Result<()> {
        let bridge = self.new_ns("br")?;
        let br = format!("{}br", self.prefix);
        let mtu = PATH_MTU.to_string();
        bridge.ip(&[
            "link",
            "add",
            &br,
            "mtu",
            &mtu,
            "type",
            "bridge",
            "stp_state",
            "0",
            "mcast_snooping",
            "0",
        ])?;
        bridge.ip(&["link", "set", &br, "up"])?;
        // The bridge ns is a plain switch: nothing in it should route or talk IPv6.
        bridge.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        self.bridge = bridge;

        let client = self.add_host(Role::Client, &br)?;
        let lb = self.add_host(Role::Lb, &br)?;
        for i in 1..=n {
            let b = self.add_host(Role::Backend(i), &br)?;
            self.backends.push(b);
        }

        // Client: VIP → LB's MAC (stands in for VRRP), no redirects, no tx checksum offload.
        let lb_mac = mac_to_string(&lb.mac);
        for vip in [VIP4.to_string(), VIP6.to_string()] {
            client.ns.ip(&[
                "neigh",
                "replace",
                &vip,
                "lladdr",
                &lb_mac,
                "dev",
                HOST_DEV,
                "nud",
                "permanent",
            ])?;
        }
        for k in [
            "net.ipv4.conf.all.accept_redirects",
            "net.ipv4.conf.eth0.accept_redirects",
        ] {
            client.ns.sysctl(k, "0")?;
        }
        client
            .ns
            .sysctl("net.ipv6.conf.all.accept_redirects", "0")?;
        client
            .ns
            .sysctl("net.ipv6.conf.eth0.accept_redirects", "0")?;
        client.ns.ethtool_k(HOST_DEV, &["tx", "off"])?;

        // LB: forwarding on (bpf_fib_lookup needs it), no redirects; its bridge port without
        // tx checksum offload.
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.forwarding", "1"),
            ("net.ipv4.conf.eth0.forwarding", "1"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.eth0.send_redirects", "0"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv6.conf.eth0.forwarding", "1"),
        ] {
            lb.ns.sysctl(k, v)?;
        }
        self.bridge.ethtool_k(&lb.port, &["tx", "off"])?;

        // Back-ends: DSR, VIP on lo.
        for b in &self.backends {
            for (k, v) in [
                ("net.ipv4.conf.all.arp_ignore", "1"),
                ("net.ipv4.conf.eth0.arp_ignore", "1"),
                ("net.ipv4.conf.all.arp_announce", "2"),
                ("net.ipv4.conf.eth0.arp_announce", "2"),
                ("net.ipv4.conf.lo.rp_filter", "0"),
            ] {
                b.ns.sysctl(k, v)?;
            }
            b.ns.ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"])?;
            b.ns.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo", "nodad"])?;
        }
        self.client = Some(client);
        self.lb = Some(lb);
        Ok(())
    }

    fn add_host(&mut self, role: Role, br: &str) -> Result<Host> {
        let (suffix, port_suffix, last, mac, mtu) = match role {
            Role::Client => (
                "client".to_string(),
                "cl".to_string(),
                1u8,
                [2, 0x6d, 0x78, 0, 0, 1],
                CLIENT_MTU,
            ),
            Role::Lb => (
                "lb".to_string(),
                "lb".to_string(),
                2,
                [2, 0x6d, 0x78, 0, 0, 2],
                PATH_MTU,
            ),
            Role::Backend(i) => (
                format!("b{i}"),
                format!("b{i}"),
                10 + i as u8,
                [2, 0x6d, 0x78, 0, 1, i as u8],
                PATH_MTU,
            ),
        };
        let ns = self.new_ns(&suffix)?;
        let port = format!("{}{port_suffix}", self.prefix);
        debug_assert!(port.len() <= 15);
        let mtu = mtu.to_string();
        let mac_s = mac_to_string(&mac);
        // Both ends are created directly in their namespaces, never in the root namespace.
        netns::run_ip(&[
            "link",
            "add",
            "name",
            HOST_DEV,
            "netns",
            ns.name(),
            "address",
            &mac_s,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            self.bridge.name(),
            "mtu",
            &mtu,
        ])?;
        self.bridge
            .ip(&["link", "set", &port, "master", br, "up"])?;
        for (k, v) in [
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.eth0.rp_filter", "0"),
        ] {
            ns.sysctl(k, v)?;
        }
        // Text form: back-end 1 is 198.18.0.11 and 2001:db8::11.
        let v4 = Ipv4Addr::new(198, 18, 0, last);
        let v6: Ipv6Addr = format!("2001:db8::{last}").parse().context("v6 address")?;
        ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", HOST_DEV])?;
        ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", HOST_DEV, "nodad"])?;
        ns.ip(&["link", "set", HOST_DEV, "up"])?;
        Ok(Host {
            role,
            ns,
            v4,
            v6,
            mac,
            port,
        })
    }

    /// This lab's name prefix (`mx` + 5 hex digits); every namespace it made starts with it.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// Names of the namespaces this lab created.
    pub fn namespaces(&self) -> &[String] {
        &self.owned.0
    }
    pub fn client(&self) -> &Host {
        self.client.as_ref().expect("lab built")
    }
    pub fn lb(&self) -> &Host {
        self.lb.as_ref().expect("lab built")
    }
    pub fn backends(&self) -> &[Host] {
        &self.backends
    }
    /// Back-end `i`, 1-based (the one at 198.18.0.(10+i)).
    pub fn backend(&self, i: usize) -> &Host {
        assert!(
            i >= 1 && i <= self.backends.len(),
            "back-end {i} of {}",
            self.backends.len()
        );
        &self.backends[i - 1]
    }
    /// The namespace holding the bridge and its ports.
    pub fn bridge_ns(&self) -> &Netns {
        &self.bridge
    }
    /// The VIP of a family (198.18.0.100 / 2001:db8::100).
    pub fn vip(&self, fam: AddrFamily) -> IpAddr {
        match fam {
            AddrFamily::V4 => VIP4.into(),
            AddrFamily::V6 => VIP6.into(),
        }
    }
    /// VIP and port as a socket address.
    pub fn vip_addr(&self, fam: AddrFamily, port: u16) -> SocketAddr {
        SocketAddr::new(self.vip(fam), port)
    }
    /// The bridge port facing the LB's `eth0`: attach a native XDP_PASS program to it (inside
    /// [`Lab::bridge_ns`]) so the LB's XDP_TX frames are delivered.
    pub fn lb_peer_port(&self) -> Result<PeerPort> {
        let name = self.lb().port.clone();
        let ifindex = self.bridge.link(&name)?.ifindex;
        Ok(PeerPort {
            ns: self.bridge.clone(),
            name,
            ifindex,
        })
    }

    /// Installs permanent neighbour entries for every back-end (both families) in the LB's
    /// namespace: `bpf_fib_lookup` does not resolve neighbours itself. An agent that keeps them
    /// resolved makes this unnecessary; tests of the data plane alone can use it.
    pub fn pin_backend_neighbours_on_lb(&self) -> Result<()> {
        for b in &self.backends {
            let mac = mac_to_string(&b.mac);
            for ip in [b.v4.to_string(), b.v6.to_string()] {
                self.lb().ns.ip(&[
                    "neigh",
                    "replace",
                    &ip,
                    "lladdr",
                    &mac,
                    "dev",
                    HOST_DEV,
                    "nud",
                    "permanent",
                ])?;
            }
        }
        Ok(())
    }

    /// Keeps `daemon` running for the life of the lab (stopped before the namespaces go).
    pub fn adopt(&mut self, daemon: Daemon) {
        self.daemons.push(daemon);
    }

    /// The sink of back-end `i` (1-based). Panics if the lab was built without sinks.
    pub fn sink(&self, i: usize) -> &SmtpSink {
        assert!(
            i >= 1 && i <= self.sinks.len(),
            "sink {i} of {}",
            self.sinks.len()
        );
        &self.sinks[i - 1]
    }
    /// Counts of every back-end's sink, in back-end order.
    pub fn sink_counts(&self) -> Vec<SinkCounts> {
        self.sinks.iter().map(SmtpSink::counts).collect()
    }

    /// Waits (≤ `timeout`) until the sinks together have seen at least `total` sessions end,
    /// then until the counts have not changed for 200 ms (so late or extra sessions show up),
    /// and returns the per-back-end counts. Errors on timeout, with the counts.
    pub fn wait_sessions(&self, total: u64, timeout: Duration) -> Result<Vec<SinkCounts>> {
        let deadline = Instant::now() + timeout;
        let sum = |v: &[SinkCounts]| v.iter().map(|c| c.sessions).sum::<u64>();
        let mut last = self.sink_counts();
        let mut stable_since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let now = self.sink_counts();
            if now != last {
                last = now;
                stable_since = Instant::now();
                continue;
            }
            if sum(&now) >= total && stable_since.elapsed() >= Duration::from_millis(200) {
                return Ok(now);
            }
            if Instant::now() >= deadline {
                bail!(
                    "sinks saw {now:?} (total {}) after {timeout:?}, expected {total} sessions",
                    sum(&now)
                );
            }
        }
    }

    /// Runs smtp-source from the client's namespace against `target` (a back-end address or a
    /// VIP), bounded by `opts.timeout`.
    pub fn smtp_source(&self, target: SocketAddr, opts: &SourceOpts) -> Result<SourceResult> {
        smtp_source(&self.client().ns, target, opts)
    }

    /// From the client, tries a TCP connection to `target` with a `timeout`; `Ok(true)` if it
    /// was established. Does not send anything.
    pub fn client_can_connect(&self, target: SocketAddr, timeout: Duration) -> Result<bool> {
        self.client()
            .ns
            .run(move || std::net::TcpStream::connect_timeout(&target, timeout).is_ok())
    }
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("prefix", &self.prefix)
            .field("namespaces", &self.owned.0)
            .finish()
    }
}
