//! The lab topology: one segment (a Linux bridge in its own namespace), a client, one or more
//! load balancers and N back-ends, each in its own namespace with an `eth0` veth whose peer is
//! a bridge port.
//!
//! ```text
//!                 bridge ns  {p}-br:  bridge {p}br
//!        ┌──────────────┬─────────────┬─────────────┬──────────────┬─────┐
//!     port {p}cl     port {p}lb    port {p}lb2   port {p}b1     port {p}b2 ...
//!        │              │             │             │              │
//!   {p}-client eth0  {p}-lb eth0  {p}-lb2 eth0  {p}-b1 eth0    {p}-b2 eth0  (+ VIP on lo in back-ends)
//! ```
//!
//! Addresses (segment 198.18.0.0/24 and 2001:db8::/64, nothing in the root namespace):
//! client .1 / ::1, LB k (1-based, [`LabBuilder::lbs`], default one) .(1+k) / ::(1+k) (LB 1 =
//! .2, LB 2 = .3, ... LB 8 = .9), back-end i (1-based) .(10+i) / ::(10+i) as written in text
//! (back-end 1 = 198.18.0.11 and 2001:db8::11), VIP 198.18.0.100 and 2001:db8::100.
//! MACs are fixed: client 02:6d:78:00:00:01, LB k 02:6d:78:00:00:(1+k) (LB 1 = …:02),
//! back-end i 02:6d:78:00:01:i. LB 1 keeps the names it had when the lab had one LB
//! (namespace `{p}-lb`, port `{p}lb`); LB k ≥ 2 is `{p}-lb{k}`, port `{p}lb{k}`.
//!
//! * **VIP → LB**: by default the client has permanent neighbour entries mapping both VIPs to
//!   LB 1's MAC. In production VRRP makes the master LB answer ARP/ND for the VIP; the static
//!   entry stands in for it. The LBs have no VIP address: without an LB program, traffic for
//!   the VIP is not answered by anyone. With [`LabBuilder::vip_by_arp`] the client has no
//!   static entry and learns the VIP's MAC by ARP/ND from whichever LB holds the VIP (VRRP:
//!   keepalived or `mxlb run`); it also accepts gratuitous ARP (`arp_accept=1`) and unsolicited
//!   NA (`accept_untracked_na=1`), so a new master's announcements move its cache.
//!   [`Lab::client_neighbour`] shows which MAC it uses.
//! * **DSR back-ends**: the VIPs sit on each back-end's `lo` (IPv6 with `nodad`), with
//!   `arp_ignore=1`/`arp_announce=2` on `all` and `eth0` so no back-end answers ARP for them;
//!   `rp_filter=0`. They reply to the client directly.
//! * **LBs** (each of them): IPv4 and IPv6 forwarding on (`all` and `eth0`, needed by
//!   `bpf_fib_lookup`), `send_redirects=0`, `rp_filter=0`.
//! * **Offloads**: `tx` checksum offload (and with it TSO) is off on the client's `eth0` and on
//!   every LB's bridge port: with native XDP on veth, a partial checksum is lost on the rewrite
//!   path.
//! * **MTU**: IPIP adds 20 bytes (IPv6-in-IPv6 40). The client keeps MTU 1500 on both ends of its
//!   veth, so its TCP MSS is 1460/1440 and its largest packet is 1500 bytes; every other veth
//!   end (LB, back-ends, their bridge ports, the bridge) gets [`PATH_MTU`] = 1600, so an
//!   encapsulated full-size packet (1540) fits through the LB's XDP_TX (checked against the peer
//!   MTU), the bridge (egress port MTU) and the back-end's veth, where the back-end's BPF
//!   decapsulates it back to ≤ 1500. Back-ends reply with segments sized by the client's MSS, so
//!   nothing above 1500 ever reaches the client. No advmss tricks are needed.
//! * **XDP_TX on veth**: frames an XDP program sends back out of an LB's `eth0` are delivered
//!   only if the peer (the bridge port [`Lab::lb_peer_port_of`]) has a native XDP program
//!   attached; attach a plain XDP_PASS program there.
//! * **Names**: namespaces are `{prefix}-…` and bridge ports `{prefix}…`, where the prefix is
//!   `mx` + 5 hex digits, unique per lab (pid, time, counter), so parallel labs and parallel
//!   test runs never collide; the `eth0` inside each host namespace is created directly there
//!   (never in the root namespace), so it cannot collide either.
//! * **Owners**: each lab writes its builder's pid to `/run/mxlb-lab/{prefix}`. Every new lab
//!   first removes the labs whose owner process is gone (a run killed before its drop guards
//!   could run): [`sweep_dead_labs`].

use crate::lab::cmd::Daemon;
use crate::lab::netns::{self, LinkInfo, Netns, mac_to_string};
use crate::lab::smtp::{SinkCounts, SinkOpts, SmtpSink, SourceOpts, SourceResult, smtp_source};
use anyhow::{Context, Result, bail, ensure};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
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
/// Largest number of LB nodes (addresses .2 to .9 stay below the back-ends).
pub const MAX_LBS: usize = 8;
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
    /// LB node, 1-based (`Lb(1)` is [`Lab::lb`]).
    Lb(usize),
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
    /// Short name: "client", "lb", "lb2", ..., "b1", "b2", ... (the namespace is
    /// `{prefix}-{name}`).
    pub fn name(&self) -> String {
        match self.role {
            Role::Client => "client".into(),
            Role::Lb(1) => "lb".into(),
            Role::Lb(k) => format!("lb{k}"),
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
    /// The MAC this host's neighbour table has for `ip` on `eth0` (`ip neigh show`), or `None`
    /// when there is no entry or it has no link-layer address (`FAILED`, `INCOMPLETE`). `STALE`,
    /// `DELAY` and `PROBE` entries count: the host still sends to that MAC.
    pub fn neighbour(&self, ip: IpAddr) -> Result<Option<[u8; 6]>> {
        let out = self.ns.ip(&[
            "-j",
            "neigh",
            "show",
            "to",
            &ip.to_string(),
            "dev",
            HOST_DEV,
        ])?;
        parse_neigh_json(&out, ip)
    }
    /// Sends one ICMP echo request from this host to `dst` and waits up to `timeout` for the
    /// reply; `Ok(Some(rtt))` if it came. Raw socket inside the namespace (needs root).
    pub fn ping(&self, dst: IpAddr, timeout: Duration) -> Result<Option<Duration>> {
        self.ns.run(move || ping_here(dst, timeout))?
    }
}

/// The link-layer address of `ip` in `ip -j neigh show` output (see [`Host::neighbour`]).
pub fn parse_neigh_json(json: &str, ip: IpAddr) -> Result<Option<[u8; 6]>> {
    let json = json.trim();
    if json.is_empty() {
        return Ok(None);
    }
    let v: serde_json::Value = serde_json::from_str(json).context("ip -j neigh output")?;
    let Some(entries) = v.as_array() else {
        bail!("ip -j neigh: not a list: {json}");
    };
    for e in entries {
        let dst = e["dst"].as_str().and_then(|d| d.parse::<IpAddr>().ok());
        if dst != Some(ip) {
            continue;
        }
        if let Some(l) = e["lladdr"].as_str() {
            return parse_mac_text(l).map(Some);
        }
    }
    Ok(None)
}

/// `aa:bb:cc:dd:ee:ff` → bytes.
pub fn parse_mac_text(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    ensure!(parts.len() == 6, "bad MAC {s:?}");
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).with_context(|| format!("bad MAC {s:?}"))?;
    }
    Ok(mac)
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from(c[0]) << 8
        };
        sum += u32::from(w);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP(v6) echo request with `id`, `seq` and a 16-byte payload (IPv4: checksum filled in;
/// IPv6: the kernel fills it in for raw ICMPv6 sockets).
fn echo_request(v6: bool, id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"mxlb-lab-ping-16");
    if !v6 {
        let c = inet_checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
    }
    p
}

/// Is `pkt` (ICMP message; for IPv4 the raw socket hands over the IP header too) the echo reply
/// to (`id`, `seq`)?
fn is_echo_reply(v6: bool, pkt: &[u8], id: u16, seq: u16) -> bool {
    let icmp = if v6 {
        pkt
    } else {
        let Some(&b0) = pkt.first() else { return false };
        let ihl = usize::from(b0 & 0x0f) * 4;
        if b0 >> 4 != 4 || pkt.len() < ihl {
            return false;
        }
        &pkt[ihl..]
    };
    icmp.len() >= 8
        && icmp[0] == if v6 { 129 } else { 0 }
        && icmp[4..6] == id.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
}

/// One echo request to `dst` from the current thread's namespace (see [`Host::ping`]).
fn ping_here(dst: IpAddr, timeout: Duration) -> Result<Option<Duration>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let v6 = dst.is_ipv6();
    let (domain, proto) = if v6 {
        (Domain::IPV6, Protocol::ICMPV6)
    } else {
        (Domain::IPV4, Protocol::ICMPV4)
    };
    let sock = Socket::new(domain, Type::RAW, Some(proto)).context("raw ICMP socket")?;
    static SEQ: AtomicU32 = AtomicU32::new(1);
    let id = (std::process::id() & 0xffff) as u16;
    let seq = (SEQ.fetch_add(1, Ordering::Relaxed) & 0xffff) as u16;
    let t0 = Instant::now();
    let to = SocketAddr::new(dst, 0);
    sock.send_to(&echo_request(v6, id, seq), &to.into())
        .with_context(|| format!("ping {dst}"))?;
    let deadline = t0 + timeout;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("ping: recv"),
        };
        // SAFETY: recv_from initialised the first n bytes.
        let pkt: Vec<u8> = buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        if from.as_socket().map(|a| a.ip()) == Some(dst) && is_echo_reply(v6, &pkt, id, seq) {
            return Ok(Some(t0.elapsed()));
        }
    }
}

/// The bridge port facing an LB's `eth0`, where the PASS program goes for native XDP_TX.
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
    lbs: usize,
    vip_by_arp: bool,
    sinks: Option<SinkOpts>,
}

impl LabBuilder {
    /// Number of LB nodes (1..=8; default 1). LB k is at 198.18.0.(1+k) (see the module docs).
    pub fn lbs(mut self, n: usize) -> Self {
        self.lbs = n;
        self
    }
    /// The client learns the VIPs' MAC by ARP/ND from whichever LB holds them (VRRP), instead
    /// of the default permanent neighbour entries pointing at LB 1; it accepts gratuitous ARP
    /// and unsolicited NA. Nothing answers for the VIPs until some LB adds them.
    pub fn vip_by_arp(mut self) -> Self {
        self.vip_by_arp = true;
        self
    }
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
        ensure!(
            (1..=MAX_LBS).contains(&self.lbs),
            "lbs must be 1..={MAX_LBS}, got {}",
            self.lbs
        );
        for dead in sweep_dead_labs() {
            eprintln!("lab: removed lab {dead}, left behind by a run that no longer exists");
        }
        let prefix = new_prefix();
        // Leftovers with this prefix can only come from an earlier run that crashed with the
        // same pid and clock value; other runs' namespaces are never touched.
        for stale in netns::namespaces_with_prefix(&prefix) {
            netns::delete(&stale);
        }
        let marker = OwnerMarker::write(&prefix);
        let mut lab = Lab {
            daemons: Vec::new(),
            sinks: Vec::new(),
            client: None,
            lbs: Vec::new(),
            backends: Vec::new(),
            bridge: Netns::from_name(format!("{prefix}-br")),
            owned: Owned(Vec::new()),
            prefix,
            vip_by_arp: self.vip_by_arp,
            decap_users: Mutex::new(0),
            _marker: marker,
        };
        // On any error below, dropping `lab` removes what was created so far.
        lab.create(self.backends, self.lbs)
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

/// Where every live lab records who owns it: `{OWNERS_DIR}/{prefix}` holds the pid of the
/// process that built it. Only a marker lets [`sweep_dead_labs`] know a lab's namespaces
/// (the bridge namespace never holds a process, so "no process inside" proves nothing).
pub const OWNERS_DIR: &str = "/run/mxlb-lab";

/// The owner file of one lab, removed when the lab is dropped.
struct OwnerMarker(Option<std::path::PathBuf>);

impl OwnerMarker {
    /// Best effort: without the file the lab still works, it just cannot be swept if killed.
    fn write(prefix: &str) -> OwnerMarker {
        let path = std::path::Path::new(OWNERS_DIR).join(prefix);
        let ok = std::fs::create_dir_all(OWNERS_DIR).and_then(|()| std::fs::write(&path, std::process::id().to_string()));
        OwnerMarker(ok.is_ok().then_some(path))
    }
}

impl Drop for OwnerMarker {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Removes the labs of runs that died without cleaning up (SIGKILL, a CI timeout, a killed
/// session): labs whose owner file names a process that no longer exists. Their processes
/// are killed and their namespaces deleted; returns their prefixes. Drop guards cannot run in
/// a killed process, and its leftovers (daemons bound to lab addresses, namespaces, pinned
/// links keyed by namespace) would otherwise stay until reboot. Namespaces without an owner
/// file (another tool's, or a lab of an older version) are never touched, and neither is a
/// lab whose owner pid has been reused by a live process.
pub fn sweep_dead_labs() -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(OWNERS_DIR) else {
        return Vec::new();
    };
    let mut swept = Vec::new();
    for entry in rd.flatten() {
        let Ok(prefix) = entry.file_name().into_string() else { continue };
        let is_lab_prefix = prefix.len() == 7 && prefix.starts_with("mx") && prefix[2..].chars().all(|c| c.is_ascii_hexdigit());
        let Some(pid) = std::fs::read_to_string(entry.path()).ok().and_then(|t| t.trim().parse::<u32>().ok()) else { continue };
        if !is_lab_prefix || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        for name in netns::namespaces_with_prefix(&format!("{prefix}-")) {
            if let Ok(pids) = netns::run_ip(&["netns", "pids", &name]) {
                for p in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                    // SAFETY: kill(2) with a pid read from `ip netns pids`; no memory involved.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
            netns::delete(&name);
        }
        let _ = std::fs::remove_file(entry.path());
        swept.push(prefix);
    }
    swept
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
    /// LB k at index k-1; never empty once built.
    lbs: Vec<Host>,
    backends: Vec<Host>,
    bridge: Netns,
    owned: Owned,
    prefix: String,
    vip_by_arp: bool,
    /// How many [`MxlbNode`](crate::node::MxlbNode)s currently need the decap helper on the
    /// back-ends (it is per back-end, not per LB: the first attaches, the last detaches).
    decap_users: Mutex<usize>,
    /// Dropped last: the namespaces are gone by then.
    _marker: OwnerMarker,
}

impl Lab {
    pub fn builder() -> LabBuilder {
        LabBuilder {
            backends: 3,
            lbs: 1,
            vip_by_arp: false,
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

    fn create(&mut self, n: usize, lbs: usize) -> Result<()> {
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
        // Nor filter: where the host has br_netfilter loaded (Docker and Kubernetes load it),
        // every frame a bridge forwards also runs the iptables, ip6tables and arptables
        // hooks, per namespace and on by default. A switch does none of that, and on this
        // lab's veths it was a quarter of the cost of each hop (perf, bench proxy), which
        // inflates every proxy's extra hop. The keys exist only while the module is loaded.
        for family in ["iptables", "ip6tables", "arptables"] {
            let key = format!("net.bridge.bridge-nf-call-{family}");
            if bridge.sysctl_get(&key).is_ok() {
                bridge.sysctl(&key, "0")?;
            }
        }
        self.bridge = bridge;

        let client = self.add_host(Role::Client, &br)?;
        let mut lb_hosts = Vec::with_capacity(lbs);
        for k in 1..=lbs {
            lb_hosts.push(self.add_host(Role::Lb(k), &br)?);
        }
        for i in 1..=n {
            let b = self.add_host(Role::Backend(i), &br)?;
            self.backends.push(b);
        }

        if self.vip_by_arp {
            // Client: learns the VIP's MAC by ARP/ND from the VRRP master, and lets a new
            // master's gratuitous ARP / unsolicited NA create or move the entry.
            for k in [
                "net.ipv4.conf.all.arp_accept",
                "net.ipv4.conf.eth0.arp_accept",
            ] {
                client.ns.sysctl(k, "1")?;
            }
            // accept_untracked_na exists since Linux 5.19; older kernels skip it (an existing
            // entry is still updated by an NA with the override flag).
            if client
                .ns
                .sysctl_get("net.ipv6.conf.all.accept_untracked_na")
                .is_ok()
            {
                for k in [
                    "net.ipv6.conf.all.accept_untracked_na",
                    "net.ipv6.conf.eth0.accept_untracked_na",
                ] {
                    client.ns.sysctl(k, "1")?;
                }
            }
        } else {
            // Client: VIP → LB 1's MAC (stands in for VRRP).
            let lb_mac = mac_to_string(&lb_hosts[0].mac);
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
        }
        // Client: no redirects, no tx checksum offload.
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

        // LBs: forwarding on (bpf_fib_lookup needs it), no redirects; their bridge ports
        // without tx checksum offload.
        for lb in &lb_hosts {
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
        }

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
        self.lbs = lb_hosts;
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
            Role::Lb(k) => {
                let name = if k == 1 {
                    "lb".to_string()
                } else {
                    format!("lb{k}")
                };
                (
                    name.clone(),
                    name,
                    1 + k as u8,
                    [2, 0x6d, 0x78, 0, 0, 1 + k as u8],
                    PATH_MTU,
                )
            }
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
    /// LB 1 (the only one unless built with [`LabBuilder::lbs`]).
    pub fn lb(&self) -> &Host {
        self.lbs.first().expect("lab built")
    }
    /// Every LB node, LB 1 first.
    pub fn lbs(&self) -> &[Host] {
        &self.lbs
    }
    /// LB `k`, 1-based (the one at 198.18.0.(1+k)).
    pub fn lb_n(&self, k: usize) -> &Host {
        assert!(
            k >= 1 && k <= self.lbs.len(),
            "LB {k} of {}",
            self.lbs.len()
        );
        &self.lbs[k - 1]
    }
    /// The host (client, LB or back-end) whose `eth0` has `mac`.
    pub fn host_by_mac(&self, mac: [u8; 6]) -> Option<&Host> {
        self.client
            .iter()
            .chain(&self.lbs)
            .chain(&self.backends)
            .find(|h| h.mac == mac)
    }
    /// Whether the lab was built with [`LabBuilder::vip_by_arp`].
    pub fn vip_by_arp(&self) -> bool {
        self.vip_by_arp
    }
    /// The MAC the client currently sends `vip` (or any address) to, from its neighbour table;
    /// `None` while unresolved. See [`Host::neighbour`].
    pub fn client_neighbour(&self, vip: IpAddr) -> Result<Option<[u8; 6]>> {
        self.client().neighbour(vip)
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
    /// The bridge port facing LB 1's `eth0`: attach a native XDP_PASS program to it (inside
    /// [`Lab::bridge_ns`]) so the LB's XDP_TX frames are delivered.
    pub fn lb_peer_port(&self) -> Result<PeerPort> {
        self.lb_peer_port_of(1)
    }
    /// The bridge port facing LB `k`'s `eth0` (1-based); see [`Lab::lb_peer_port`].
    pub fn lb_peer_port_of(&self, k: usize) -> Result<PeerPort> {
        ensure!(
            k >= 1 && k <= self.lbs.len(),
            "LB {k} of {}",
            self.lbs.len()
        );
        let name = self.lbs[k - 1].port.clone();
        let ifindex = self.bridge.link(&name)?.ifindex;
        Ok(PeerPort {
            ns: self.bridge.clone(),
            name,
            ifindex,
        })
    }

    /// Installs permanent neighbour entries for every back-end (both families) in every LB's
    /// namespace: `bpf_fib_lookup` does not resolve neighbours itself. An agent that keeps them
    /// resolved makes this unnecessary; tests of the data plane alone can use it.
    pub fn pin_backend_neighbours_on_lb(&self) -> Result<()> {
        for (b, lb) in self
            .backends
            .iter()
            .flat_map(|b| self.lbs.iter().map(move |lb| (b, lb)))
        {
            let mac = mac_to_string(&b.mac);
            for ip in [b.v4.to_string(), b.v6.to_string()] {
                lb.ns.ip(&[
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

    /// Counts a user of the back-ends' decap helper; true for the first (who attaches it).
    pub(crate) fn decap_acquire(&self) -> bool {
        let mut n = self.decap_users.lock().unwrap_or_else(|e| e.into_inner());
        *n += 1;
        *n == 1
    }
    /// Releases a user of the decap helper; true for the last (who detaches it).
    pub(crate) fn decap_release(&self) -> bool {
        let mut n = self.decap_users.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        *n == 0
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neigh_json_is_parsed() {
        let vip: IpAddr = "198.18.0.100".parse().unwrap();
        let j = r#"[{"dst":"198.18.0.100","dev":"eth0","lladdr":"02:6d:78:00:00:03","state":["STALE"]}]"#;
        assert_eq!(
            parse_neigh_json(j, vip).unwrap(),
            Some([2, 0x6d, 0x78, 0, 0, 3])
        );
        let failed = r#"[{"dst":"198.18.0.100","dev":"eth0","state":["FAILED"]}]"#;
        assert_eq!(parse_neigh_json(failed, vip).unwrap(), None);
        assert_eq!(parse_neigh_json("[]", vip).unwrap(), None);
        assert_eq!(parse_neigh_json("", vip).unwrap(), None);
        let other = r#"[{"dst":"198.18.0.1","dev":"eth0","lladdr":"02:6d:78:00:00:01","state":["REACHABLE"]}]"#;
        assert_eq!(parse_neigh_json(other, vip).unwrap(), None);
        let v6: IpAddr = "2001:db8::100".parse().unwrap();
        let j6 = r#"[{"dst":"2001:db8::100","dev":"eth0","lladdr":"02:6d:78:00:00:02","router":null,"state":["REACHABLE"]}]"#;
        assert_eq!(
            parse_neigh_json(j6, v6).unwrap(),
            Some([2, 0x6d, 0x78, 0, 0, 2])
        );
        assert!(parse_neigh_json("{", vip).is_err());
    }

    #[test]
    fn icmp_echo_checksum_and_reply_match() {
        // RFC 1071 example words.
        assert_eq!(
            inet_checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
        let req = echo_request(false, 0x1234, 7);
        assert_eq!(
            inet_checksum(&req),
            0,
            "a packet with its checksum sums to zero"
        );
        let mut reply = req.clone();
        reply[0] = 0;
        let mut ip = vec![0x45u8; 1];
        ip.extend_from_slice(&[0; 19]);
        ip.extend_from_slice(&reply);
        assert!(is_echo_reply(false, &ip, 0x1234, 7));
        assert!(!is_echo_reply(false, &ip, 0x1234, 8));
        let mut r6 = echo_request(true, 1, 2);
        assert!(!is_echo_reply(true, &r6, 1, 2), "a request is no reply");
        r6[0] = 129;
        assert!(is_echo_reply(true, &r6, 1, 2));
    }
}
