//! Packet fixtures for the XDP data plane (Katran style): load `mxlb::EBPF_OBJECT`, fill the
//! maps with `lb-common` types, run frames through `BPF_PROG_TEST_RUN`, and check the action,
//! the exact output frame and the counters.
//!
//! Every test runs in its own thread that first unshares a network namespace (so
//! `bpf_fib_lookup` on the test-run device, the new namespace's `lo`, fails deterministically and
//! dsr-ipip takes the back-end-MAC fallback) and a mount namespace with a private bpffs on
//! /sys/fs/bpf (the maps are pinned by name; pins land there and vanish with the thread). Nothing
//! outlives a test. The expected back-end of every flow is predicted from
//! `lb_common::flow_hash` and the ring the test wrote.

use std::{
    collections::HashMap as StdHashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key as LpmKey},
    programs::{ProgramError, TestRun, TestRunOptions, Xdp},
};
use lab::frames::{
    self, ETH_P_IP, ETH_P_IPV6, Eth, IPPROTO_FRAGMENT, IPPROTO_HOPOPTS, IPPROTO_ICMP,
    IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Ipv4, Ipv6, Tcp, ip_packet, tcp_flags::*,
};
use lb_common::{
    EdgeLimits, MAP_ALLOW, MAP_BLOCK, MAP_EDGE_CONFIG, MAP_SYN_BUCKETS, SynBucket,
};
use lb_common::{
    Backend, Counters, FlowKey, FlowState, LbConfig, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_CONFIG,
    MAP_CONNTRACK, MAP_REASON_STATS, MAP_RINGS, MAP_VIP_FILTER, MAP_VIP_SLOTS, MAP_VIP_STATS, MAP_VIPS, PROG_BALANCER, PROG_DECAP,
    RING_SIZE, Reason, VipKey, VipMeta, VipSlot, addr_to_key, flow_hash, mode, port_to_key, state,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// The LB's own MAC (destination of every client frame) and the client-side router's.
const LB_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const ROUTER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xfe];

const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
const LB_SRC4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const LB_SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const SMTP: u16 = 25;
const SUBMISSION: u16 = 587;

fn be_mac(id: u32) -> [u8; 6] {
    [0x02, 0x00, 0x00, 0x00, 0x01, id as u8]
}
fn be4(id: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 10 + id as u8)
}
fn be6(id: u32) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10 + id as u16)
}

// ---------------------------------------------------------------------------------------------
// Isolation: one thread, one network namespace, one mount namespace with its own bpffs.

/// Runs `f` in a fresh thread with its own network and mount namespaces; propagates panics.
fn isolated(name: &str, f: impl FnOnce() + Send + 'static) {
    if !lab::require_root(name) {
        return;
    }
    let h = std::thread::spawn(move || {
        // SAFETY: plain syscalls on the current thread; the namespaces die with the thread.
        unsafe {
            assert_eq!(
                libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS),
                0,
                "unshare: {}",
                std::io::Error::last_os_error()
            );
            let root = c"/";
            assert_eq!(
                libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null()
                ),
                0,
                "make / private: {}",
                std::io::Error::last_os_error()
            );
            let bpffs = c"/sys/fs/bpf";
            assert_eq!(
                libc::mount(
                    c"bpf".as_ptr(),
                    bpffs.as_ptr(),
                    c"bpf".as_ptr(),
                    0,
                    std::ptr::null()
                ),
                0,
                "mount bpffs: {}",
                std::io::Error::last_os_error()
            );
        }
        f()
    });
    if let Err(e) = h.join() {
        std::panic::resume_unwind(e);
    }
}

// ---------------------------------------------------------------------------------------------
// The loaded object and its maps.

struct Dp {
    ebpf: Ebpf,
    /// Mirror of what the test wrote into each ring, to predict back-ends.
    rings: StdHashMap<u32, Vec<u32>>,
    /// VIP (addr key, port key) → meta, mirror of MXLB_VIPS.
    vips: StdHashMap<([u8; 16], u16), VipMeta>,
}

#[derive(Debug)]
struct Out {
    action: u32,
    frame: Vec<u8>,
}

impl Dp {
    fn new() -> Self {
        let mut ebpf = EbpfLoader::new()
            // Smaller LRU: same semantics, less preallocated memory per test.
            .map_max_entries(MAP_CONNTRACK, 4096)
            .load(mxlb::EBPF_OBJECT)
            .expect("load EBPF_OBJECT");
        for name in [PROG_BALANCER, PROG_DECAP] {
            let p: &mut Xdp = ebpf.program_mut(name).unwrap().try_into().unwrap();
            p.load()
                .unwrap_or_else(|e| panic!("verifier rejected {name}: {e:?}"));
        }
        let mut dp = Self {
            ebpf,
            rings: StdHashMap::new(),
            vips: StdHashMap::new(),
        };
        dp.config(LB_SRC4.octets(), LB_SRC6.octets());
        dp
    }

    fn config(&mut self, src_v4: [u8; 4], src_v6: [u8; 16]) {
        let mut m: Array<_, LbConfig> =
            Array::try_from(self.ebpf.map_mut(MAP_CONFIG).unwrap()).unwrap();
        m.set(0, LbConfig { src_v4, src_v6 }, 0).unwrap();
    }

    /// Sets [`VipMeta::flags`] of an existing VIP:port entry.
    fn vip_flags(&mut self, addr: IpAddr, port: u16, flags: u8) {
        let key = VipKey { addr: addr_to_key(addr), port: port_to_key(port), proto: 6, _pad: 0 };
        let m: HashMap<_, VipKey, VipMeta> = HashMap::try_from(self.ebpf.map(MAP_VIPS).unwrap()).unwrap();
        let mut meta = m.get(&key, 0).expect("VIP entry");
        meta.flags = flags;
        self.put_vip(key, meta);
    }

    /// Writes a VIP:port entry as userspace does (`maps::apply`): into `MXLB_VIPS` and, under
    /// its id, into `MXLB_VIP_SLOTS` (the established fast path).
    fn put_vip(&mut self, key: VipKey, meta: VipMeta) {
        let mut m: HashMap<_, VipKey, VipMeta> = HashMap::try_from(self.ebpf.map_mut(MAP_VIPS).unwrap()).unwrap();
        m.insert(key, meta, 0).unwrap();
        self.vip_slot(meta.id, VipSlot { key, meta });
        self.vips.insert((key.addr, key.port), meta);
        self.filter(key.addr, true);
    }

    /// Sets or clears the `MXLB_VIP_FILTER` bit of `addr` (a map-encoded address).
    fn filter(&mut self, addr: [u8; 16], set: bool) {
        let bit = lb_common::vip_filter_bit_of(&addr);
        let mut f: Array<_, u64> = Array::try_from(self.ebpf.map_mut(MAP_VIP_FILTER).unwrap()).unwrap();
        let word = f.get(&(bit >> 6), 0).unwrap();
        let mask = 1u64 << (bit & 63);
        f.set(bit >> 6, if set { word | mask } else { word & !mask }, 0).unwrap();
    }

    /// Overwrites slot `id` of `MXLB_VIP_SLOTS` alone.
    fn vip_slot(&mut self, id: u32, slot: VipSlot) {
        let mut s: Array<_, VipSlot> = Array::try_from(self.ebpf.map_mut(MAP_VIP_SLOTS).unwrap()).unwrap();
        s.set(id, slot, 0).unwrap();
    }

    fn vip(&mut self, addr: IpAddr, port: u16, id: u32, ring: u32, mode: u8) {
        let key = VipKey {
            addr: addr_to_key(addr),
            port: port_to_key(port),
            proto: 6,
            _pad: 0,
        };
        let meta = VipMeta {
            id,
            ring,
            mode,
            flags: 0,
            capacity: 100,
            _pad: 0,
        };
        self.put_vip(key, meta);
        let mut m: HashMap<_, VipKey, VipMeta> =
            HashMap::try_from(self.ebpf.map_mut(MAP_VIPS).unwrap()).unwrap();
        // The address-level marker (no slot: only VIP:port entries have one).
        let marker = VipKey {
            addr: key.addr,
            port: 0,
            proto: 6,
            _pad: 0,
        };
        m.insert(
            marker,
            VipMeta {
                id,
                ring: 0,
                mode,
                flags: 0,
                capacity: 100,
                _pad: 0,
            },
            0,
        )
        .unwrap();
    }

    fn backend(&mut self, id: u32, addr: IpAddr, mac: [u8; 6], st: u8) {
        let mut m: Array<_, Backend> =
            Array::try_from(self.ebpf.map_mut(MAP_BACKENDS).unwrap()).unwrap();
        m.set(
            id,
            Backend {
                addr: addr_to_key(addr),
                mac,
                state: st,
                _pad: 0,
            },
            0,
        )
        .unwrap();
    }

    fn backend_state(&mut self, id: u32, st: u8) {
        let mut m: Array<_, Backend> =
            Array::try_from(self.ebpf.map_mut(MAP_BACKENDS).unwrap()).unwrap();
        let mut b = m.get(&id, 0).unwrap();
        b.state = st;
        m.set(id, b, 0).unwrap();
    }

    /// Fills ring `ring` with `pattern` repeated (a stand-in for a Maglev table with those
    /// weights; `[]` = empty ring).
    fn ring(&mut self, ring: u32, pattern: &[u32]) {
        let table: Vec<u32> = (0..RING_SIZE as usize)
            .map(|i| {
                if pattern.is_empty() {
                    0
                } else {
                    pattern[i % pattern.len()]
                }
            })
            .collect();
        let mut m: Array<_, u32> = Array::try_from(self.ebpf.map_mut(MAP_RINGS).unwrap()).unwrap();
        let old = self.rings.get(&ring);
        for (i, id) in table.iter().enumerate() {
            if old.map(|o| o[i]).unwrap_or(0) != *id {
                m.set(ring * RING_SIZE + i as u32, *id, 0).unwrap();
            }
        }
        self.rings.insert(ring, table);
    }

    /// Switches a VIP to another ring (what userspace does after writing the idle one).
    fn flip(&mut self, vip: IpAddr, port: u16, ring: u32) {
        let k = (addr_to_key(vip), port_to_key(port));
        let mut meta = self.vips[&k];
        meta.ring = ring;
        let key = VipKey {
            addr: k.0,
            port: k.1,
            proto: 6,
            _pad: 0,
        };
        self.put_vip(key, meta);
    }

    /// The back-end the ring of `vip:port` gives to `key`.
    fn predict(&self, key: &FlowKey) -> u32 {
        let meta = self.vips[&(key.dst, key.dport)];
        self.rings[&meta.ring][(flow_hash(key) % RING_SIZE) as usize]
    }

    fn conntrack(&self, key: &FlowKey) -> Option<FlowState> {
        let m: HashMap<_, FlowKey, FlowState> =
            HashMap::try_from(self.ebpf.map(MAP_CONNTRACK).unwrap()).unwrap();
        m.get(key, 0).ok()
    }

    fn set_conntrack(&mut self, key: &FlowKey, backend: u32, vip: u32) {
        let mut m: HashMap<_, FlowKey, FlowState> =
            HashMap::try_from(self.ebpf.map_mut(MAP_CONNTRACK).unwrap()).unwrap();
        m.insert(key, FlowState { backend, vip }, 0).unwrap();
    }

    /// Sets the SYN limit per source (`MXLB_EDGE_CFG`).
    fn edge_limits(&mut self, syn_rate: u32, syn_burst: u32) {
        let mut m: Array<_, EdgeLimits> =
            Array::try_from(self.ebpf.map_mut(MAP_EDGE_CONFIG).unwrap()).unwrap();
        m.set(0, EdgeLimits { syn_rate, syn_burst }, 0).unwrap();
    }

    /// Adds a CIDR to the block list (or the allow list), encoded as userspace does.
    fn edge_list(&mut self, cidr: &str, allow: bool) {
        let k = cidr.parse::<mxlb::edge::Cidr>().unwrap().key();
        let name = if allow { MAP_ALLOW } else { MAP_BLOCK };
        let mut m: LpmTrie<_, [u8; 16], u32> =
            LpmTrie::try_from(self.ebpf.map_mut(name).unwrap()).unwrap();
        m.insert(&LpmKey::new(k.prefix_len, k.addr), 1, 0).unwrap();
    }

    fn bucket(&self, src: IpAddr) -> Option<SynBucket> {
        let m: HashMap<_, [u8; 16], SynBucket> =
            HashMap::try_from(self.ebpf.map(MAP_SYN_BUCKETS).unwrap()).unwrap();
        m.get(&mxlb::edge::bucket_key(src), 0).ok()
    }

    /// Moves a bucket's last refill `secs` into the past (instead of sleeping). Wrapping, as
    /// the data path computes: on a machine up for less than `secs` (a fresh CI machine) the
    /// timestamp wraps, and the data path must treat that as long idle too.
    fn age_bucket(&mut self, src: IpAddr, secs: u64) {
        let mut b = self.bucket(src).expect("bucket exists");
        b.last_ns = b.last_ns.wrapping_sub(secs * 1_000_000_000);
        let mut m: HashMap<_, [u8; 16], SynBucket> =
            HashMap::try_from(self.ebpf.map_mut(MAP_SYN_BUCKETS).unwrap()).unwrap();
        m.insert(mxlb::edge::bucket_key(src), b, 0).unwrap();
    }

    fn counters(&self, map: &str, idx: u32) -> Counters {
        let m: PerCpuArray<_, Counters> =
            PerCpuArray::try_from(self.ebpf.map(map).unwrap()).unwrap();
        let mut total = Counters::default();
        for c in m.get(&idx, 0).unwrap().iter() {
            total += *c;
        }
        total
    }
    fn reason(&self, r: Reason) -> Counters {
        self.counters(MAP_REASON_STATS, r as u32)
    }
    fn vip_stats(&self, id: u32) -> Counters {
        self.counters(MAP_VIP_STATS, id)
    }
    fn be_stats(&self, id: u32) -> Counters {
        self.counters(MAP_BACKEND_STATS, id)
    }

    fn try_run(&self, prog: &str, frame: &[u8]) -> Result<Out, ProgramError> {
        let p: &Xdp = self.ebpf.program(prog).unwrap().try_into().unwrap();
        let mut out = vec![0u8; 4096];
        let r = p.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok(Out {
            action: r.return_value,
            frame: out,
        })
    }

    /// Runs one fixture: checks the action, the exact output frame and that exactly one
    /// decision of `reason` (with the input frame's length) was counted.
    #[track_caller]
    fn fixture(
        &self,
        prog: &str,
        name: &str,
        input: &[u8],
        action: u32,
        reason: Reason,
        expected: &[u8],
    ) -> Out {
        let before = self.reason(reason);
        let out = self
            .try_run(prog, input)
            .unwrap_or_else(|e| panic!("{name}: test run failed: {e:?}"));
        assert_eq!(
            out.action,
            action,
            "{name}: action (reason counters: {:?})",
            self.all_reasons()
        );
        if out.frame != expected {
            panic!(
                "{name}: output frame differs\n got:      {}\n expected: {}",
                hex(&out.frame),
                hex(expected)
            );
        }
        let after = self.reason(reason);
        assert_eq!(
            after.packets,
            before.packets + 1,
            "{name}: reason {} not counted once",
            reason.name()
        );
        assert_eq!(
            after.bytes,
            before.bytes + input.len() as u64,
            "{name}: reason bytes"
        );
        out
    }

    fn all_reasons(&self) -> Vec<(&'static str, u64)> {
        Reason::ALL
            .iter()
            .map(|r| (r.name(), self.reason(*r).packets))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Balancer fixture expecting XDP_PASS with the frame untouched.
    #[track_caller]
    fn pass(&self, name: &str, input: &[u8], reason: Reason) {
        self.fixture(PROG_BALANCER, name, input, XDP_PASS, reason, input);
    }

    /// Balancer fixture expecting XDP_DROP.
    #[track_caller]
    fn drop(&self, name: &str, input: &[u8], reason: Reason) {
        self.fixture(PROG_BALANCER, name, input, XDP_DROP, reason, input);
    }

    /// Balancer fixture expecting dsr-l2 to back-end `id`.
    #[track_caller]
    fn l2(&self, name: &str, input: &[u8], id: u32, reason: Reason) {
        self.fixture(
            PROG_BALANCER,
            name,
            input,
            XDP_TX,
            reason,
            &l2_rewritten(input, be_mac(id)),
        );
    }

    /// Balancer fixture expecting dsr-ipip to back-end `id` at `addr` (fib fallback path).
    #[track_caller]
    fn ipip(&self, name: &str, input: &[u8], id: u32, addr: IpAddr, key: &FlowKey, reason: Reason) {
        let expected = ipip_expected(input, be_mac(id), addr, key);
        self.fixture(PROG_BALANCER, name, input, XDP_TX, reason, &expected);
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The dsr-l2 rewrite: destination = back-end MAC, source = the LB's (old destination).
fn l2_rewritten(input: &[u8], mac: [u8; 6]) -> Vec<u8> {
    let mut e = input.to_vec();
    e[..6].copy_from_slice(&mac);
    e[6..12].copy_from_slice(&input[..6]);
    e
}

/// Offset of the IP header in a frame (14, or 18 with a VLAN tag).
fn l3_offset(frame: &[u8]) -> usize {
    if frame[12..14] == [0x81, 0x00] {
        18
    } else {
        14
    }
}

/// The exact frame dsr-ipip must produce (fib lookup failing → back-end MAC as next hop).
fn ipip_expected(input: &[u8], mac: [u8; 6], backend: IpAddr, key: &FlowKey) -> Vec<u8> {
    let l3 = l3_offset(input);
    let inner = &input[l3..];
    let mut eth = Eth::new(mac, input[..6].try_into().unwrap());
    if l3 == 18 {
        eth = eth.vlan(u16::from_be_bytes([input[14], input[15]]));
    }
    match backend {
        IpAddr::V4(b) => eth.frame(ETH_P_IP, &frames::ipip_v4(LB_SRC4, b, inner)),
        IpAddr::V6(b) => eth.frame(
            ETH_P_IPV6,
            &frames::ipip_v6(LB_SRC6, b, flow_hash(key) & 0xf_ffff, inner),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Flows and frames.

fn key(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> FlowKey {
    FlowKey {
        src: addr_to_key(src),
        dst: addr_to_key(dst),
        sport: port_to_key(sport),
        dport: port_to_key(dport),
        proto: 6,
        _pad: [0; 3],
    }
}

fn client_eth() -> Eth {
    Eth::new(LB_MAC, ROUTER_MAC)
}

/// A client → VIP TCP frame.
fn tcp_frame(
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    client_eth().frame_ip(&ip_packet(
        src,
        dst,
        &Tcp::new(sport, dport, flags),
        payload,
    ))
}

/// The first client port from `start` whose flow to `vip:port` the current ring maps to `want`.
fn port_for(
    dp: &Dp,
    src: IpAddr,
    vip: IpAddr,
    port: u16,
    start: u16,
    want: impl Fn(u32) -> bool,
) -> u16 {
    (start..u16::MAX)
        .find(|p| want(dp.predict(&key(src, *p, vip, port))))
        .expect("no port found")
}

/// A standard lab: VIP4:25 (id 1, dsr-l2), VIP4:587 (id 2, dsr-ipip), VIP6:25 (id 3, dsr-l2),
/// VIP6:587 (id 4, dsr-ipip); back-ends 1..3 IPv4 and 4..6 IPv6, all UP. Ring 0 = [1,2,3]
/// (IPv4 VIPs), ring 2 = [4,5,6] (IPv6 VIPs).
fn standard() -> Dp {
    let mut dp = Dp::new();
    for id in 1..=3 {
        dp.backend(id, be4(id).into(), be_mac(id), state::UP);
    }
    for id in 4..=6 {
        dp.backend(id, be6(id).into(), be_mac(id), state::UP);
    }
    dp.ring(0, &[1, 2, 3]);
    dp.ring(2, &[4, 5, 6]);
    dp.vip(VIP4.into(), SMTP, 1, 0, mode::DSR_L2);
    dp.vip(VIP4.into(), SUBMISSION, 2, 0, mode::DSR_IPIP);
    dp.vip(VIP6.into(), SMTP, 3, 2, mode::DSR_L2);
    dp.vip(VIP6.into(), SUBMISSION, 4, 2, mode::DSR_IPIP);
    dp
}

fn c4() -> IpAddr {
    CLIENT4.into()
}
fn c6() -> IpAddr {
    CLIENT6.into()
}
fn v4() -> IpAddr {
    VIP4.into()
}
fn v6() -> IpAddr {
    VIP6.into()
}

// ---------------------------------------------------------------------------------------------
// Pass-through.

#[test]
fn non_ip_and_non_vip_traffic_passes_untouched() {
    isolated("non_ip_and_non_vip_traffic_passes_untouched", || {
        let dp = standard();
        dp.pass(
            "arp",
            &frames::arp_request(ROUTER_MAC, CLIENT4, VIP4),
            Reason::PassNonIp,
        );
        dp.pass(
            "vlan arp",
            &client_eth().vlan(7).frame(0x0806, &[0u8; 28]),
            Reason::PassNonIp,
        );
        let other4: IpAddr = "198.18.0.200".parse().unwrap();
        dp.pass(
            "ipv4 tcp to non-vip",
            &tcp_frame(c4(), 40000, other4, SMTP, SYN, b""),
            Reason::PassNonVip,
        );
        dp.pass(
            "ipv4 vip wrong port",
            &tcp_frame(c4(), 40000, v4(), 80, SYN, b""),
            Reason::PassNonVip,
        );
        let udp = frames::udp_segment(c4(), v4(), 40000, SMTP, b"hello");
        let udp = client_eth().frame_ip(&Ipv4::new(CLIENT4, VIP4, IPPROTO_UDP).packet(&udp));
        dp.pass("ipv4 udp to vip:port", &udp, Reason::PassNonVip);
        let other6: IpAddr = "2001:db8::200".parse().unwrap();
        dp.pass(
            "ipv6 tcp to non-vip",
            &tcp_frame(c6(), 40000, other6, SMTP, SYN, b""),
            Reason::PassNonVip,
        );
        dp.pass(
            "ipv6 vip wrong port",
            &tcp_frame(c6(), 40000, v6(), 143, ACK, b"x"),
            Reason::PassNonVip,
        );
        let udp = frames::udp_segment(c6(), v6(), 40000, SMTP, b"hello");
        let udp = client_eth().frame_ip(&Ipv6::new(CLIENT6, VIP6, IPPROTO_UDP).packet(&udp));
        dp.pass("ipv6 udp to vip:port", &udp, Reason::PassNonVip);
        // The address marker alone (port 0) is not a VIP:port.
        dp.pass(
            "ipv4 vip port 0",
            &tcp_frame(c4(), 40000, v4(), 0, SYN, b""),
            Reason::PassNonVip,
        );
        // ICMP that is not an error, or is about a non-VIP flow.
        let echo = frames::icmpv4(8, 0, [0, 1, 0, 1], b"ping");
        dp.pass(
            "icmp echo to vip",
            &client_eth().frame_ip(&Ipv4::new(CLIENT4, VIP4, IPPROTO_ICMP).packet(&echo)),
            Reason::PassNonVip,
        );
        let quoted = ip_packet(other4, c4(), &Tcp::new(SMTP, 40000, ACK), b"");
        let err = frames::icmpv4_error(4, 1400, &quoted[..28]);
        let f = client_eth().frame_ip(
            &Ipv4::new(CLIENT4, "198.18.0.200".parse().unwrap(), IPPROTO_ICMP).packet(&err),
        );
        dp.pass(
            "icmp frag-needed about non-vip flow",
            &f,
            Reason::PassNonVip,
        );
        let quoted = ip_packet(v6(), c6(), &Tcp::new(80, 40000, ACK), b"");
        let err = frames::icmpv6_error(CLIENT6, VIP6, 2, 0, 1280, &quoted);
        let f = client_eth().frame_ip(&Ipv6::new(CLIENT6, VIP6, IPPROTO_ICMPV6).packet(&err));
        dp.pass(
            "icmpv6 too-big about vip wrong port",
            &f,
            Reason::PassNonVip,
        );
        let echo6 = frames::icmpv6(CLIENT6, VIP6, 128, 0, 0x0001_0001, b"ping");
        dp.pass(
            "icmpv6 echo to vip",
            &client_eth().frame_ip(&Ipv6::new(CLIENT6, VIP6, IPPROTO_ICMPV6).packet(&echo6)),
            Reason::PassNonVip,
        );
    });
}

#[test]
fn local_mode_passes() {
    isolated("local_mode_passes", || {
        let mut dp = standard();
        dp.vip(v4(), 465, 7, 0, mode::LOCAL);
        dp.vip(v6(), 465, 8, 2, mode::LOCAL);
        let f = tcp_frame(c4(), 40000, v4(), 465, SYN, b"");
        dp.pass("ipv4 local", &f, Reason::PassLocal);
        dp.pass(
            "ipv6 local",
            &tcp_frame(c6(), 40000, v6(), 465, ACK, b"data"),
            Reason::PassLocal,
        );
        assert_eq!(
            dp.vip_stats(7),
            Counters {
                packets: 1,
                bytes: f.len() as u64,
                new_flows: 0
            }
        );
        assert!(dp.conntrack(&key(c4(), 40000, v4(), 465)).is_none());
    });
}

// ---------------------------------------------------------------------------------------------
// dsr-l2.

#[test]
fn l2_ipv4_syn_and_established() {
    isolated("l2_ipv4_syn_and_established", || {
        let dp = standard();
        let k = key(c4(), 40001, v4(), SMTP);
        let id = dp.predict(&k);
        let syn = tcp_frame(c4(), 40001, v4(), SMTP, SYN, b"");
        dp.l2("ipv4 syn", &syn, id, Reason::Forwarded);
        assert_eq!(
            dp.conntrack(&k),
            Some(FlowState {
                backend: id,
                vip: 1
            })
        );
        let data = tcp_frame(
            c4(),
            40001,
            v4(),
            SMTP,
            ACK | PSH,
            b"EHLO client.example\r\n",
        );
        dp.l2("ipv4 established", &data, id, Reason::Forwarded);
        let fin = tcp_frame(c4(), 40001, v4(), SMTP, FIN | ACK, b"");
        dp.l2("ipv4 fin", &fin, id, Reason::Forwarded);
        let bytes = (syn.len() + data.len() + fin.len()) as u64;
        assert_eq!(
            dp.vip_stats(1),
            Counters {
                packets: 3,
                bytes,
                new_flows: 1
            }
        );
        assert_eq!(
            dp.be_stats(id),
            Counters {
                packets: 3,
                bytes,
                new_flows: 1
            }
        );
    });
}

#[test]
fn l2_ipv6_syn_and_established() {
    isolated("l2_ipv6_syn_and_established", || {
        let dp = standard();
        let k = key(c6(), 40001, v6(), SMTP);
        let id = dp.predict(&k);
        assert!((4..=6).contains(&id));
        dp.l2(
            "ipv6 syn",
            &tcp_frame(c6(), 40001, v6(), SMTP, SYN, b""),
            id,
            Reason::Forwarded,
        );
        assert_eq!(
            dp.conntrack(&k),
            Some(FlowState {
                backend: id,
                vip: 3
            })
        );
        dp.l2(
            "ipv6 established",
            &tcp_frame(c6(), 40001, v6(), SMTP, ACK, b"QUIT\r\n"),
            id,
            Reason::Forwarded,
        );
        assert_eq!(dp.vip_stats(3).packets, 2);
        assert_eq!(dp.vip_stats(3).new_flows, 1);
    });
}

#[test]
fn established_without_conntrack_uses_ring_and_inserts() {
    isolated(
        "established_without_conntrack_uses_ring_and_inserts",
        || {
            let dp = standard();
            // E.g. after an agent restart or a VRRP fail-over: the ring gives the same back-end.
            let k = key(c4(), 40002, v4(), SMTP);
            let id = dp.predict(&k);
            dp.l2(
                "ack without entry",
                &tcp_frame(c4(), 40002, v4(), SMTP, ACK, b"x"),
                id,
                Reason::Forwarded,
            );
            assert_eq!(
                dp.conntrack(&k),
                Some(FlowState {
                    backend: id,
                    vip: 1
                })
            );
            assert_eq!(dp.vip_stats(1).new_flows, 1);
        },
    );
}

#[test]
fn many_flows_spread_over_all_backends() {
    isolated("many_flows_spread_over_all_backends", || {
        let dp = standard();
        let mut seen = [0u32; 4];
        for p in 0..60u16 {
            let k = key(c4(), 41000 + p, v4(), SMTP);
            let id = dp.predict(&k);
            dp.l2(
                "syn",
                &tcp_frame(c4(), 41000 + p, v4(), SMTP, SYN, b""),
                id,
                Reason::Forwarded,
            );
            seen[id as usize] += 1;
        }
        assert!(seen[1] > 0 && seen[2] > 0 && seen[3] > 0, "{seen:?}");
        for id in 1..=3 {
            assert_eq!(dp.be_stats(id).new_flows, seen[id as usize] as u64);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// dsr-ipip.

#[test]
fn ipip_ipv4_in_ipv4_syn_and_established() {
    isolated("ipip_ipv4_in_ipv4_syn_and_established", || {
        let dp = standard();
        let k = key(c4(), 40010, v4(), SUBMISSION);
        let id = dp.predict(&k);
        let syn = tcp_frame(c4(), 40010, v4(), SUBMISSION, SYN, b"");
        dp.ipip("4in4 syn", &syn, id, be4(id).into(), &k, Reason::Forwarded);
        assert_eq!(
            dp.conntrack(&k),
            Some(FlowState {
                backend: id,
                vip: 2
            })
        );
        let data = tcp_frame(
            c4(),
            40010,
            v4(),
            SUBMISSION,
            ACK | PSH,
            b"MAIL FROM:<a@example.org>\r\n",
        );
        dp.ipip(
            "4in4 established",
            &data,
            id,
            be4(id).into(),
            &k,
            Reason::Forwarded,
        );
        assert_eq!(
            dp.be_stats(id),
            Counters {
                packets: 2,
                bytes: (syn.len() + data.len()) as u64,
                new_flows: 1
            }
        );
    });
}

#[test]
fn ipip_ipv6_in_ipv6_syn_and_established() {
    isolated("ipip_ipv6_in_ipv6_syn_and_established", || {
        let dp = standard();
        let k = key(c6(), 40010, v6(), SUBMISSION);
        let id = dp.predict(&k);
        let syn = tcp_frame(c6(), 40010, v6(), SUBMISSION, SYN, b"");
        dp.ipip("6in6 syn", &syn, id, be6(id).into(), &k, Reason::Forwarded);
        let data = tcp_frame(c6(), 40010, v6(), SUBMISSION, ACK, b"DATA\r\n");
        dp.ipip(
            "6in6 established",
            &data,
            id,
            be6(id).into(),
            &k,
            Reason::Forwarded,
        );
        assert_eq!(dp.vip_stats(4).packets, 2);
    });
}

#[test]
fn ipip_mixed_families_and_tos() {
    isolated("ipip_mixed_families_and_tos", || {
        let mut dp = standard();
        // VIP4:2525 balanced over IPv6 back-ends (4in6), VIP6:2525 over IPv4 ones (6in4).
        dp.vip(v4(), 2525, 5, 2, mode::DSR_IPIP);
        dp.vip(v6(), 2525, 6, 0, mode::DSR_IPIP);
        let k = key(c4(), 40020, v4(), 2525);
        let id = dp.predict(&k);
        assert!((4..=6).contains(&id));
        // A TOS value, copied to the outer header.
        let mut ip = Ipv4::new(CLIENT4, VIP4, IPPROTO_TCP);
        ip.tos = 0xb8;
        let f =
            client_eth().frame_ip(&ip.packet(&Tcp::new(40020, 2525, SYN).segment(c4(), v4(), b"")));
        dp.ipip("4in6 syn", &f, id, be6(id).into(), &k, Reason::Forwarded);
        let k = key(c6(), 40020, v6(), 2525);
        let id = dp.predict(&k);
        assert!((1..=3).contains(&id));
        let mut ip = Ipv6::new(CLIENT6, VIP6, IPPROTO_TCP);
        ip.traffic_class = 0x28;
        ip.flow_label = 0x12345;
        let f = client_eth().frame_ip(&ip.packet(&Tcp::new(40020, 2525, ACK).segment(
            c6(),
            v6(),
            b"x",
        )));
        let out = dp.try_run(PROG_BALANCER, &f).unwrap();
        assert_eq!(
            out.frame[14 + 1],
            0x28,
            "outer TOS copied from the inner traffic class"
        );
        dp.ipip(
            "6in4 established",
            &f,
            id,
            be4(id).into(),
            &k,
            Reason::Forwarded,
        );
        // Outer IPv4 checksum verifies.
        assert_eq!(frames::checksum(&out.frame[14..34]), 0);
    });
}

#[test]
fn ipip_outer_source_missing_and_no_route() {
    isolated("ipip_outer_source_missing_and_no_route", || {
        let mut dp = standard();
        let f = tcp_frame(c4(), 40030, v4(), SUBMISSION, SYN, b"");
        let f6 = tcp_frame(c6(), 40030, v6(), SUBMISSION, SYN, b"");
        dp.config([0; 4], LB_SRC6.octets());
        dp.drop("no ipv4 outer source", &f, Reason::DropEncap);
        dp.config(LB_SRC4.octets(), [0; 16]);
        dp.drop("no ipv6 outer source", &f6, Reason::DropEncap);
        dp.config(LB_SRC4.octets(), LB_SRC6.octets());
        // No route (fib lookup fails here) and no fallback MAC.
        for id in 1..=3 {
            dp.backend(id, be4(id).into(), [0; 6], state::UP);
        }
        dp.drop("no next hop", &f, Reason::DropNoRoute);
        // dsr-l2 with a zero MAC is a configuration error, not a frame to 00:00:00:00:00:00.
        dp.drop(
            "l2 zero mac",
            &tcp_frame(c4(), 40030, v4(), SMTP, SYN, b""),
            Reason::DropNoRoute,
        );
        assert_eq!(dp.vip_stats(2).packets, 2);
        assert_eq!(dp.vip_stats(2).new_flows, 0);
    });
}

// ---------------------------------------------------------------------------------------------
// IPv4 options, VLAN.

#[test]
fn ipv4_options_are_forwarded_untouched() {
    isolated("ipv4_options_are_forwarded_untouched", || {
        let dp = standard();
        for ihl in 6u8..=15 {
            let sport = 42000 + ihl as u16;
            let mut ip = Ipv4::new(CLIENT4, VIP4, IPPROTO_TCP);
            // NOPs then a timestamp-ish option body; padded to IHL.
            ip.options = vec![1; (ihl as usize - 5) * 4];
            let seg = Tcp::new(sport, SMTP, SYN).segment(c4(), v4(), b"");
            let f = client_eth().frame_ip(&ip.packet(&seg));
            assert_eq!(f[14] & 0x0f, ihl);
            let k = key(c4(), sport, v4(), SMTP);
            dp.l2(
                &format!("ihl {ihl} l2"),
                &f,
                dp.predict(&k),
                Reason::Forwarded,
            );
        }
        let mut ip = Ipv4::new(CLIENT4, VIP4, IPPROTO_TCP);
        ip.options = vec![0x94, 0x04, 0, 0]; // router alert
        let f = client_eth().frame_ip(&ip.packet(&Tcp::new(42100, SUBMISSION, SYN).segment(
            c4(),
            v4(),
            b"",
        )));
        let k = key(c4(), 42100, v4(), SUBMISSION);
        let id = dp.predict(&k);
        dp.ipip("ihl 6 ipip", &f, id, be4(id).into(), &k, Reason::Forwarded);
    });
}

#[test]
fn vlan_tag_is_kept() {
    isolated("vlan_tag_is_kept", || {
        let dp = standard();
        let eth = client_eth().vlan(0x2064);
        let f = eth.frame_ip(&ip_packet(c4(), v4(), &Tcp::new(40040, SMTP, SYN), b""));
        let k = key(c4(), 40040, v4(), SMTP);
        dp.l2("vlan l2 ipv4", &f, dp.predict(&k), Reason::Forwarded);
        let f = eth.frame_ip(&ip_packet(c6(), v6(), &Tcp::new(40040, SMTP, ACK), b"x"));
        let k = key(c6(), 40040, v6(), SMTP);
        dp.l2("vlan l2 ipv6", &f, dp.predict(&k), Reason::Forwarded);
        let f = eth.frame_ip(&ip_packet(
            c4(),
            v4(),
            &Tcp::new(40040, SUBMISSION, SYN),
            b"",
        ));
        let k = key(c4(), 40040, v4(), SUBMISSION);
        let id = dp.predict(&k);
        dp.ipip(
            "vlan ipip 4in4",
            &f,
            id,
            be4(id).into(),
            &k,
            Reason::Forwarded,
        );
        let f = eth.frame_ip(&ip_packet(
            c6(),
            v6(),
            &Tcp::new(40040, SUBMISSION, SYN),
            b"",
        ));
        let k = key(c6(), 40040, v6(), SUBMISSION);
        let id = dp.predict(&k);
        dp.ipip(
            "vlan ipip 6in6",
            &f,
            id,
            be6(id).into(),
            &k,
            Reason::Forwarded,
        );
    });
}

// ---------------------------------------------------------------------------------------------
// Fragments and IPv6 extension headers.

#[test]
fn fragments_to_vip_address_are_dropped() {
    isolated("fragments_to_vip_address_are_dropped", || {
        let dp = standard();
        let seg = Tcp::new(40050, SMTP, ACK).segment(c4(), v4(), &[0x55; 64]);
        let mut ip = Ipv4::new(CLIENT4, VIP4, IPPROTO_TCP);
        ip.frag = 0x2000; // MF, offset 0: first fragment
        dp.drop(
            "ipv4 first fragment",
            &client_eth().frame_ip(&ip.packet(&seg[..48])),
            Reason::DropFragment,
        );
        ip.frag = 6; // offset 48, last fragment
        dp.drop(
            "ipv4 non-first fragment",
            &client_eth().frame_ip(&ip.packet(&seg[48..])),
            Reason::DropFragment,
        );
        ip.frag = 0x2000 | 3; // middle fragment
        dp.drop(
            "ipv4 middle fragment",
            &client_eth().frame_ip(&ip.packet(&seg[24..48])),
            Reason::DropFragment,
        );
        // To another address: the kernel reassembles.
        let mut other = Ipv4::new(CLIENT4, "198.18.0.200".parse().unwrap(), IPPROTO_TCP);
        other.frag = 0x2000;
        dp.pass(
            "ipv4 fragment to non-vip",
            &client_eth().frame_ip(&other.packet(&seg[..48])),
            Reason::PassNonVip,
        );
        // IPv6 Fragment header.
        let mut fh = vec![IPPROTO_TCP, 0, 0, 1, 0, 0, 0, 42];
        fh.extend_from_slice(&Tcp::new(40050, SMTP, ACK).segment(c6(), v6(), &[0x55; 32])[..40]);
        let f = client_eth().frame_ip(&Ipv6::new(CLIENT6, VIP6, IPPROTO_FRAGMENT).packet(&fh));
        dp.drop("ipv6 fragment", &f, Reason::DropFragment);
        let f = client_eth().frame_ip(
            &Ipv6::new(CLIENT6, "2001:db8::200".parse().unwrap(), IPPROTO_FRAGMENT).packet(&fh),
        );
        dp.pass("ipv6 fragment to non-vip", &f, Reason::PassNonVip);
    });
}

#[test]
fn ipv6_extension_headers_pass() {
    isolated("ipv6_extension_headers_pass", || {
        let dp = standard();
        let mut hbh = vec![IPPROTO_TCP, 0, 1, 4, 0, 0, 0, 0];
        hbh.extend_from_slice(&Tcp::new(40060, SMTP, SYN).segment(c6(), v6(), b""));
        let f = client_eth().frame_ip(&Ipv6::new(CLIENT6, VIP6, IPPROTO_HOPOPTS).packet(&hbh));
        dp.pass("ipv6 hop-by-hop to vip", &f, Reason::PassIpv6Ext);
        let f = client_eth().frame_ip(&Ipv6::new(CLIENT6, VIP6, 60).packet(&hbh));
        dp.pass("ipv6 destination options to vip", &f, Reason::PassIpv6Ext);
        let f = client_eth().frame_ip(
            &Ipv6::new(CLIENT6, "2001:db8::200".parse().unwrap(), IPPROTO_HOPOPTS).packet(&hbh),
        );
        dp.pass("ipv6 hop-by-hop to non-vip", &f, Reason::PassNonVip);
        assert!(dp.conntrack(&key(c6(), 40060, v6(), SMTP)).is_none());
    });
}

// ---------------------------------------------------------------------------------------------
// ICMP errors about VIP flows.

/// ICMPv4 "fragmentation needed" from a router towards the VIP, quoting a back-end → client
/// segment of the flow `client:cport → vip:vport`.
fn icmp4_frag_needed(cport: u16, vport: u16, eth: Eth) -> Vec<u8> {
    let quoted = ip_packet(v4(), c4(), &Tcp::new(vport, cport, ACK), &[0xaa; 100]);
    let err = frames::icmpv4_error(4, 1400, &quoted[..28]);
    let router: Ipv4Addr = "198.19.0.1".parse().unwrap();
    eth.frame_ip(&Ipv4::new(router, VIP4, IPPROTO_ICMP).packet(&err))
}

fn icmp6_error(ty: u8, cport: u16, vport: u16) -> Vec<u8> {
    let quoted = ip_packet(v6(), c6(), &Tcp::new(vport, cport, ACK), &[0xaa; 100]);
    let router: Ipv6Addr = "2001:db8:ffff::1".parse().unwrap();
    let err = frames::icmpv6_error(router, VIP6, ty, 0, if ty == 2 { 1280 } else { 0 }, &quoted);
    client_eth().frame_ip(&Ipv6::new(router, VIP6, IPPROTO_ICMPV6).packet(&err))
}

#[test]
fn icmp_errors_follow_their_flow() {
    isolated("icmp_errors_follow_their_flow", || {
        let mut dp = standard();
        // An established flow pinned (by conntrack) to a back-end the ring would not choose.
        let k = key(c4(), 40070, v4(), SMTP);
        let ring_id = dp.predict(&k);
        let pinned = if ring_id == 1 { 2 } else { 1 };
        dp.set_conntrack(&k, pinned, 1);
        let f = icmp4_frag_needed(40070, SMTP, client_eth());
        dp.l2("icmp frag-needed l2", &f, pinned, Reason::IcmpForwarded);
        let f = icmp4_frag_needed(40070, SMTP, client_eth().vlan(5));
        dp.l2(
            "icmp frag-needed l2 vlan",
            &f,
            pinned,
            Reason::IcmpForwarded,
        );
        // Without conntrack: the ring, and nothing inserted.
        let k2 = key(c4(), 40071, v4(), SUBMISSION);
        let id2 = dp.predict(&k2);
        let f = icmp4_frag_needed(40071, SUBMISSION, client_eth());
        dp.ipip(
            "icmp frag-needed ipip",
            &f,
            id2,
            be4(id2).into(),
            &k2,
            Reason::IcmpForwarded,
        );
        assert!(dp.conntrack(&k2).is_none(), "ICMP must not insert");
        // Other type-3 codes too (port unreachable).
        let quoted = ip_packet(v4(), c4(), &Tcp::new(SMTP, 40070, ACK), b"");
        let err = frames::icmpv4_error(3, 0, &quoted);
        let f = client_eth()
            .frame_ip(&Ipv4::new("198.19.0.1".parse().unwrap(), VIP4, IPPROTO_ICMP).packet(&err));
        dp.l2(
            "icmp port-unreachable l2",
            &f,
            pinned,
            Reason::IcmpForwarded,
        );

        let k6 = key(c6(), 40072, v6(), SMTP);
        let ring6 = dp.predict(&k6);
        let pinned6 = if ring6 == 4 { 5 } else { 4 };
        dp.set_conntrack(&k6, pinned6, 3);
        dp.l2(
            "icmpv6 too-big l2",
            &icmp6_error(2, 40072, SMTP),
            pinned6,
            Reason::IcmpForwarded,
        );
        dp.l2(
            "icmpv6 unreachable l2",
            &icmp6_error(1, 40072, SMTP),
            pinned6,
            Reason::IcmpForwarded,
        );
        let k7 = key(c6(), 40073, v6(), SUBMISSION);
        let id7 = dp.predict(&k7);
        dp.ipip(
            "icmpv6 too-big ipip",
            &icmp6_error(2, 40073, SUBMISSION),
            id7,
            be6(id7).into(),
            &k7,
            Reason::IcmpForwarded,
        );
        assert!(dp.conntrack(&k7).is_none());
        // Counted on the VIP and back-end, never as a new flow.
        assert_eq!(dp.be_stats(pinned).new_flows, 0);
        assert_eq!(dp.be_stats(pinned).packets, 3);
        assert_eq!(dp.vip_stats(2).new_flows, 0);
        // An ICMPv6 type that is not an error we handle (time exceeded).
        dp.pass(
            "icmpv6 time exceeded",
            &icmp6_error(3, 40072, SMTP),
            Reason::PassNonVip,
        );
        // A back-end that went DOWN: the ICMP error falls back to the ring.
        dp.backend_state(pinned, state::DOWN);
        let f = icmp4_frag_needed(40070, SMTP, client_eth());
        if ring_id != pinned {
            dp.l2(
                "icmp after backend down",
                &f,
                ring_id,
                Reason::IcmpForwarded,
            );
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Truncated and malformed headers.

/// Every prefix of `frame` from 14 bytes up to (not including) `full_from` must pass untouched
/// as malformed (`PassMalformed`); shorter than the Ethernet header the kernel refuses the run.
fn sweep_truncations(dp: &Dp, name: &str, frame: &[u8], full_from: usize) {
    for len in 14..full_from {
        dp.pass(
            &format!("{name} truncated to {len}"),
            &frame[..len],
            Reason::PassMalformed,
        );
    }
}

#[test]
fn truncated_frames_pass_untouched() {
    isolated("truncated_frames_pass_untouched", || {
        let dp = standard();
        // Frames shorter than an Ethernet header never reach the program.
        assert!(
            dp.try_run(PROG_BALANCER, &[0u8; 13]).is_err(),
            "kernel accepted a 13-byte frame"
        );
        // Ethernet, IPv4, TCP boundaries (the IP lengths then exceed the frame).
        let f = tcp_frame(c4(), 40080, v4(), SMTP, SYN, b"");
        sweep_truncations(&dp, "ipv4 syn", &f, f.len());
        // VLAN tag, IPv6, TCP.
        let f =
            client_eth()
                .vlan(9)
                .frame_ip(&ip_packet(c6(), v6(), &Tcp::new(40080, SMTP, SYN), b""));
        sweep_truncations(&dp, "vlan ipv6 syn", &f, f.len());
        // IPv4 with options (IHL 15): a frame that ends inside the options.
        let mut ip = Ipv4::new(CLIENT4, VIP4, IPPROTO_TCP);
        ip.options = vec![1; 40];
        let f =
            client_eth().frame_ip(&ip.packet(&Tcp::new(40080, SMTP, SYN).segment(c4(), v4(), b"")));
        sweep_truncations(&dp, "ipv4 ihl 15", &f, f.len());
        // ICMP errors: ICMP header, inner IP header, inner ports.
        let f = icmp4_frag_needed(40080, SMTP, client_eth());
        let cut: Vec<u8> = f[..14 + 20 + 8 + 24].to_vec();
        let fixed = fix_ipv4_len(&cut);
        for len in [
            14 + 20,
            14 + 20 + 4,
            14 + 20 + 8,
            14 + 20 + 8 + 19,
            14 + 20 + 8 + 20,
            14 + 20 + 8 + 23,
        ] {
            dp.pass(
                &format!("icmp inner truncated to {len}"),
                &fix_ipv4_len(&fixed[..len]),
                Reason::PassMalformed,
            );
        }
        let f = icmp6_error(2, 40080, SMTP);
        for len in [
            14 + 40,
            14 + 40 + 7,
            14 + 40 + 8,
            14 + 40 + 8 + 39,
            14 + 40 + 8 + 40,
            14 + 40 + 8 + 43,
        ] {
            dp.pass(
                &format!("icmpv6 inner truncated to {len}"),
                &fix_ipv6_len(&f[..len]),
                Reason::PassMalformed,
            );
        }
        // TCP header cut short but IP length consistent with the frame.
        let f = tcp_frame(c4(), 40080, v4(), SMTP, SYN, b"");
        dp.pass(
            "ipv4 tcp header 19 bytes",
            &fix_ipv4_len(&f[..14 + 20 + 19]),
            Reason::PassMalformed,
        );
        let f = tcp_frame(c6(), 40080, v6(), SMTP, SYN, b"");
        dp.pass(
            "ipv6 tcp header 19 bytes",
            &fix_ipv6_len(&f[..14 + 40 + 19]),
            Reason::PassMalformed,
        );
        assert!(dp.conntrack(&key(c4(), 40080, v4(), SMTP)).is_none());
        assert_eq!(dp.reason(Reason::Forwarded).packets, 0);
    });
}

/// Rewrites the IPv4 total length (and checksum) of a frame to match its size.
fn fix_ipv4_len(f: &[u8]) -> Vec<u8> {
    let mut f = f.to_vec();
    let tot = (f.len() - 14) as u16;
    f[16..18].copy_from_slice(&tot.to_be_bytes());
    f[24..26].copy_from_slice(&[0, 0]);
    let c = frames::checksum(&f[14..14 + ((f[14] & 0xf) as usize * 4).min(f.len() - 14)]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

/// Rewrites the IPv6 payload length of a frame to match its size.
fn fix_ipv6_len(f: &[u8]) -> Vec<u8> {
    let mut f = f.to_vec();
    let plen = (f.len() - 54) as u16;
    f[18..20].copy_from_slice(&plen.to_be_bytes());
    f
}

#[test]
fn malformed_ip_headers_pass_untouched() {
    isolated("malformed_ip_headers_pass_untouched", || {
        let dp = standard();
        let seg = Tcp::new(40090, SMTP, SYN).segment(c4(), v4(), b"");
        for ihl in 0u8..5 {
            let mut ip = Ipv4::new(CLIENT4, VIP4, IPPROTO_TCP);
            ip.ihl_override = Some(ihl);
            dp.pass(
                &format!("ihl {ihl}"),
                &client_eth().frame_ip(&ip.packet(&seg)),
                Reason::PassMalformed,
            );
        }
        let mut ip = Ipv4::new(CLIENT4, VIP4, IPPROTO_TCP);
        ip.tot_len_override = Some(200);
        dp.pass(
            "tot_len beyond frame",
            &client_eth().frame_ip(&ip.packet(&seg)),
            Reason::PassMalformed,
        );
        ip.tot_len_override = Some(16);
        dp.pass(
            "tot_len below ihl",
            &client_eth().frame_ip(&ip.packet(&seg)),
            Reason::PassMalformed,
        );
        ip.tot_len_override = Some(30);
        dp.pass(
            "tot_len cuts tcp",
            &client_eth().frame_ip(&ip.packet(&seg)),
            Reason::PassMalformed,
        );
        // Version nibble not matching the EtherType.
        let v6pkt = ip_packet(c6(), v6(), &Tcp::new(40090, SMTP, SYN), b"");
        dp.pass(
            "ipv6 packet with ipv4 ethertype",
            &client_eth().frame(ETH_P_IP, &v6pkt),
            Reason::PassMalformed,
        );
        let mut ip6 = Ipv6::new(CLIENT6, VIP6, IPPROTO_TCP);
        ip6.payload_len_override = Some(100);
        let seg6 = Tcp::new(40090, SMTP, SYN).segment(c6(), v6(), b"");
        dp.pass(
            "ipv6 payload_len beyond frame",
            &client_eth().frame_ip(&ip6.packet(&seg6)),
            Reason::PassMalformed,
        );
        ip6.payload_len_override = Some(10);
        dp.pass(
            "ipv6 payload_len cuts tcp",
            &client_eth().frame_ip(&ip6.packet(&seg6)),
            Reason::PassMalformed,
        );
        // Ethernet padding after a short packet is fine (frame longer than the IP length).
        let mut f = tcp_frame(c4(), 40091, v4(), SMTP, SYN, b"");
        f.resize(60, 0);
        dp.l2(
            "ethernet padding",
            &f,
            dp.predict(&key(c4(), 40091, v4(), SMTP)),
            Reason::Forwarded,
        );
    });
}

// ---------------------------------------------------------------------------------------------
// Back-end states, conntrack, RST, ring changes.

#[test]
fn draining_backend_keeps_established_flows_only() {
    isolated("draining_backend_keeps_established_flows_only", || {
        let mut dp = standard();
        let p = port_for(&dp, c4(), v4(), SMTP, 43000, |id| id == 2);
        dp.l2(
            "syn to 2",
            &tcp_frame(c4(), p, v4(), SMTP, SYN, b""),
            2,
            Reason::Forwarded,
        );
        // Back-end 2 drains: userspace marks it and rewrites the ring without it.
        dp.backend_state(2, state::DRAINING);
        dp.ring(1, &[1, 3]);
        dp.flip(v4(), SMTP, 1);
        dp.l2(
            "established stays on draining",
            &tcp_frame(c4(), p, v4(), SMTP, ACK, b"x"),
            2,
            Reason::Forwarded,
        );
        // A new connection (new port) that hashed to 2 in the old ring now goes elsewhere.
        let p2 = port_for(&dp, c4(), v4(), SMTP, p + 1, |_| true);
        let id2 = dp.predict(&key(c4(), p2, v4(), SMTP));
        assert_ne!(id2, 2);
        dp.l2(
            "new syn avoids draining",
            &tcp_frame(c4(), p2, v4(), SMTP, SYN, b""),
            id2,
            Reason::Forwarded,
        );
        // A SYN reusing the old 4-tuple selects afresh too.
        let id3 = dp.predict(&key(c4(), p, v4(), SMTP));
        dp.l2(
            "syn on reused tuple",
            &tcp_frame(c4(), p, v4(), SMTP, SYN, b""),
            id3,
            Reason::Forwarded,
        );
        assert_eq!(
            dp.conntrack(&key(c4(), p, v4(), SMTP)).unwrap().backend,
            id3
        );
    });
}

#[test]
fn down_backend_entry_is_replaced() {
    isolated("down_backend_entry_is_replaced", || {
        let mut dp = standard();
        let p = port_for(&dp, c4(), v4(), SMTP, 43100, |id| id == 3);
        let k = key(c4(), p, v4(), SMTP);
        dp.l2(
            "syn to 3",
            &tcp_frame(c4(), p, v4(), SMTP, SYN, b""),
            3,
            Reason::Forwarded,
        );
        dp.backend_state(3, state::DOWN);
        dp.ring(0, &[1, 2]);
        let id = dp.predict(&k);
        dp.l2(
            "established after down",
            &tcp_frame(c4(), p, v4(), SMTP, ACK, b"x"),
            id,
            Reason::Forwarded,
        );
        assert_eq!(
            dp.conntrack(&k),
            Some(FlowState {
                backend: id,
                vip: 1
            })
        );
        assert_eq!(dp.be_stats(id).new_flows, 1);
        // UNUSED slot: same.
        let k2 = key(c4(), p + 1, v4(), SMTP);
        dp.set_conntrack(&k2, 9, 1);
        let id2 = dp.predict(&k2);
        dp.l2(
            "entry to unused slot",
            &tcp_frame(c4(), p + 1, v4(), SMTP, ACK, b"x"),
            id2,
            Reason::Forwarded,
        );
        assert_eq!(dp.conntrack(&k2).unwrap().backend, id2);
    });
}

#[test]
fn rst_is_never_inserted() {
    isolated("rst_is_never_inserted", || {
        let dp = standard();
        let k = key(c4(), 43200, v4(), SMTP);
        let id = dp.predict(&k);
        dp.l2(
            "rst without entry",
            &tcp_frame(c4(), 43200, v4(), SMTP, RST, b""),
            id,
            Reason::Forwarded,
        );
        dp.l2(
            "rst+ack without entry",
            &tcp_frame(c4(), 43200, v4(), SMTP, RST | ACK, b""),
            id,
            Reason::Forwarded,
        );
        assert!(dp.conntrack(&k).is_none(), "RST inserted a conntrack entry");
        let k6 = key(c6(), 43200, v6(), SUBMISSION);
        let id6 = dp.predict(&k6);
        dp.ipip(
            "ipv6 rst without entry",
            &tcp_frame(c6(), 43200, v6(), SUBMISSION, RST, b""),
            id6,
            be6(id6).into(),
            &k6,
            Reason::Forwarded,
        );
        assert!(dp.conntrack(&k6).is_none());
    });
}

#[test]
fn rst_uses_existing_entry() {
    isolated("rst_uses_existing_entry", || {
        let mut dp = standard();
        let k = key(c4(), 43300, v4(), SMTP);
        let other = if dp.predict(&k) == 1 { 2 } else { 1 };
        dp.set_conntrack(&k, other, 1);
        dp.l2(
            "rst with entry",
            &tcp_frame(c4(), 43300, v4(), SMTP, RST | ACK, b""),
            other,
            Reason::Forwarded,
        );
        assert_eq!(dp.conntrack(&k).unwrap().backend, other);
    });
}

#[test]
fn conntrack_survives_weight_change() {
    isolated("conntrack_survives_weight_change", || {
        let mut dp = standard();
        // Find a flow whose back-end differs between the old ring and the new one.
        let new_ring = [1u32, 1, 1, 2, 3];
        let mut scratch = standard_rings_only();
        scratch.ring(1, &new_ring);
        let p = (44000..u16::MAX)
            .find(|p| {
                let k = key(c4(), *p, v4(), SUBMISSION);
                dp.predict(&k) != scratch.rings[&1][(flow_hash(&k) % RING_SIZE) as usize]
            })
            .unwrap();
        let k = key(c4(), p, v4(), SUBMISSION);
        let old = dp.predict(&k);
        dp.ipip(
            "syn before change",
            &tcp_frame(c4(), p, v4(), SUBMISSION, SYN, b""),
            old,
            be4(old).into(),
            &k,
            Reason::Forwarded,
        );
        // Weights change: userspace writes the idle ring and flips the VIP to it.
        dp.ring(1, &new_ring);
        dp.flip(v4(), SUBMISSION, 1);
        let new = dp.predict(&k);
        assert_ne!(old, new);
        dp.ipip(
            "established keeps backend",
            &tcp_frame(c4(), p, v4(), SUBMISSION, ACK, b"x"),
            old,
            be4(old).into(),
            &k,
            Reason::Forwarded,
        );
        dp.ipip(
            "new syn follows new ring",
            &tcp_frame(c4(), p, v4(), SUBMISSION, SYN, b""),
            new,
            be4(new).into(),
            &k,
            Reason::Forwarded,
        );
        assert_eq!(dp.conntrack(&k).unwrap().backend, new);
    });
}

/// Only used to compute a ring's table without touching the map under test.
fn standard_rings_only() -> RingsOnly {
    RingsOnly {
        rings: StdHashMap::new(),
    }
}
struct RingsOnly {
    rings: StdHashMap<u32, Vec<u32>>,
}
impl RingsOnly {
    fn ring(&mut self, ring: u32, pattern: &[u32]) {
        self.rings.insert(
            ring,
            (0..RING_SIZE as usize)
                .map(|i| pattern[i % pattern.len()])
                .collect(),
        );
    }
}

#[test]
fn empty_ring_or_dead_backend_drops() {
    isolated("empty_ring_or_dead_backend_drops", || {
        let mut dp = standard();
        dp.vip(v4(), 2526, 9, 3, mode::DSR_L2); // ring 3 never written: empty
        dp.drop(
            "empty ring syn",
            &tcp_frame(c4(), 45000, v4(), 2526, SYN, b""),
            Reason::DropNoBackend,
        );
        dp.drop(
            "empty ring established",
            &tcp_frame(c4(), 45000, v4(), 2526, ACK, b"x"),
            Reason::DropNoBackend,
        );
        assert!(dp.conntrack(&key(c4(), 45000, v4(), 2526)).is_none());
        // Ring entries pointing at a back-end that is not UP.
        dp.backend(7, be4(7).into(), be_mac(7), state::DOWN);
        dp.ring(4, &[7]);
        dp.vip(v4(), 2527, 10, 4, mode::DSR_IPIP);
        dp.drop(
            "ring to down backend",
            &tcp_frame(c4(), 45000, v4(), 2527, SYN, b""),
            Reason::DropNoBackend,
        );
        // An out-of-range ring index.
        dp.vip(v4(), 2528, 11, 999, mode::DSR_L2);
        dp.drop(
            "bad ring index",
            &tcp_frame(c4(), 45000, v4(), 2528, SYN, b""),
            Reason::DropNoBackend,
        );
        assert_eq!(
            dp.vip_stats(9),
            Counters {
                packets: 2,
                bytes: 2 * 54 + 1,
                new_flows: 0
            }
        );
    });
}

#[test]
fn shedding_vip_passes_flows_no_backend_can_take() {
    isolated("shedding_vip_passes_flows_no_backend_can_take", || {
        let mut dp = standard();
        dp.vip(v4(), 2529, 12, 3, mode::DSR_L2); // ring 3 never written: empty
        dp.vip_flags(v4(), 2529, lb_common::vip_flags::SHED);
        dp.pass("shed syn", &tcp_frame(c4(), 45001, v4(), 2529, SYN, b""), Reason::PassShed);
        dp.pass("shed established", &tcp_frame(c4(), 45001, v4(), 2529, ACK, b"x"), Reason::PassShed);
        assert!(dp.conntrack(&key(c4(), 45001, v4(), 2529)).is_none(), "shed flows are not tracked");
        // A shedding VIP whose back-ends can take flows forwards as usual.
        dp.vip_flags(v4(), SMTP, lb_common::vip_flags::SHED);
        let out = dp.try_run(PROG_BALANCER, &tcp_frame(c4(), 45002, v4(), SMTP, SYN, b"")).unwrap();
        assert_eq!(out.action, XDP_TX, "shedding only applies when no back-end can take the flow");
        // Without the flag an empty ring drops (empty_ring_or_dead_backend_drops).
    });
}

#[test]
fn standby_vip_passes_everything_untouched() {
    isolated("standby_vip_passes_everything_untouched", || {
        let mut dp = standard();
        // An established flow through this node while it was master.
        let syn = tcp_frame(c4(), 45100, v4(), SMTP, SYN, b"");
        assert_eq!(dp.try_run(PROG_BALANCER, &syn).unwrap().action, XDP_TX);
        // Another node became master: every packet to the VIP is passed unmodified, SYN or
        // not, conntrack entry or not, and nothing new is tracked.
        dp.vip_flags(v4(), SMTP, lb_common::vip_flags::STANDBY);
        dp.pass("standby syn", &tcp_frame(c4(), 45101, v4(), SMTP, SYN, b""), Reason::PassStandby);
        dp.pass("standby established", &tcp_frame(c4(), 45100, v4(), SMTP, ACK, b"x"), Reason::PassStandby);
        dp.pass("standby rst", &tcp_frame(c4(), 45102, v4(), SMTP, RST, b""), Reason::PassStandby);
        assert!(dp.conntrack(&key4(c4(), 45101)).is_none(), "standby SYN tracked");
        // Becoming master again: the old flow resumes from its entry, new ones are balanced.
        dp.vip_flags(v4(), SMTP, 0);
        assert_eq!(dp.try_run(PROG_BALANCER, &tcp_frame(c4(), 45100, v4(), SMTP, ACK, b"x")).unwrap().action, XDP_TX);
        assert_eq!(dp.try_run(PROG_BALANCER, &tcp_frame(c4(), 45103, v4(), SMTP, SYN, b"")).unwrap().action, XDP_TX);
        // Standby wins over shedding.
        dp.vip_flags(v4(), SMTP, lb_common::vip_flags::STANDBY | lb_common::vip_flags::SHED);
        dp.pass("standby over shed", &tcp_frame(c4(), 45104, v4(), SMTP, SYN, b""), Reason::PassStandby);
    });
}

/// The established fast path (conntrack hit → the VIP's slot by id, no `MXLB_VIPS` lookup)
/// decides exactly as the full path would, whatever state the slot is in.
#[test]
fn tracked_flows_trust_only_their_own_vip_slot() {
    isolated("tracked_flows_trust_only_their_own_vip_slot", || {
        let mut dp = standard();
        let smtp4 = VipKey { addr: addr_to_key(v4()), port: port_to_key(SMTP), proto: 6, _pad: 0 };
        let k = key(c4(), 47000, v4(), SMTP);
        let id = dp.predict(&k);
        dp.l2("syn", &tcp_frame(c4(), 47000, v4(), SMTP, SYN, b""), id, Reason::Forwarded);
        dp.l2("tracked", &tcp_frame(c4(), 47000, v4(), SMTP, ACK, b"x"), id, Reason::Forwarded);
        // The fast path does not consult MXLB_VIPS at all: with the entry gone but the slot
        // still there (an order `maps::apply` never leaves behind: slots are emptied first),
        // the tracked flow is still forwarded, a new one is not.
        let mut vips: HashMap<_, VipKey, VipMeta> = HashMap::try_from(dp.ebpf.map_mut(MAP_VIPS).unwrap()).unwrap();
        let entry = vips.get(&smtp4, 0).unwrap();
        vips.remove(&smtp4).unwrap();
        dp.l2("tracked, no lookup", &tcp_frame(c4(), 47000, v4(), SMTP, ACK, b"f"), id, Reason::Forwarded);
        dp.pass("untracked, no entry", &tcp_frame(c4(), 47001, v4(), SMTP, ACK, b"f"), Reason::PassNonVip);
        let mut vips: HashMap<_, VipKey, VipMeta> = HashMap::try_from(dp.ebpf.map_mut(MAP_VIPS).unwrap()).unwrap();
        vips.insert(smtp4, entry, 0).unwrap();

        // A slot that belongs to another VIP (the flow's id was reused by VIP4:587, dsr-ipip):
        // the packet is still VIP4:25's, balanced in its own mode and counted against its own
        // id, from its conntrack entry.
        let other = dp.vips[&(addr_to_key(v4()), port_to_key(SUBMISSION))];
        let ipip_key = VipKey { port: port_to_key(SUBMISSION), ..smtp4 };
        dp.vip_slot(1, VipSlot { key: ipip_key, meta: VipMeta { id: 1, ..other } });
        let before = (dp.vip_stats(1).packets, dp.vip_stats(2).packets);
        dp.l2("slot of another VIP", &tcp_frame(c4(), 47000, v4(), SMTP, ACK, b"y"), id, Reason::Forwarded);
        assert_eq!((dp.vip_stats(1).packets, dp.vip_stats(2).packets), (before.0 + 1, before.1));

        // No slot at all (an agent that never wrote one): the full path, same back-end.
        dp.vip_slot(1, VipSlot::EMPTY);
        dp.l2("no slot", &tcp_frame(c4(), 47000, v4(), SMTP, ACK, b"z"), id, Reason::Forwarded);

        // A slot can only make the fast path give up; the entry in MXLB_VIPS decides. So a
        // slot that says standby while the entry does not (between the two writes) forwards,
        // and standby written to both passes.
        let meta = dp.vips[&(smtp4.addr, smtp4.port)];
        dp.vip_slot(1, VipSlot { key: smtp4, meta: VipMeta { flags: lb_common::vip_flags::STANDBY, ..meta } });
        dp.l2("slot standby only", &tcp_frame(c4(), 47000, v4(), SMTP, ACK, b"s"), id, Reason::Forwarded);
        dp.put_vip(smtp4, VipMeta { flags: lb_common::vip_flags::STANDBY, ..meta });
        dp.pass("standby", &tcp_frame(c4(), 47000, v4(), SMTP, ACK, b"s"), Reason::PassStandby);
        dp.put_vip(smtp4, meta);
        dp.l2("master again", &tcp_frame(c4(), 47000, v4(), SMTP, ACK, b"m"), id, Reason::Forwarded);

        // A slot in local mode cannot steer a tracked flow either (the entry says dsr-l2).
        dp.vip_slot(1, VipSlot { key: smtp4, meta: VipMeta { mode: mode::LOCAL, ..meta } });
        dp.l2("slot local", &tcp_frame(c4(), 47000, v4(), SMTP, ACK, b"l"), id, Reason::Forwarded);
        dp.put_vip(smtp4, meta);

        // The VIP removed (entry and slot gone, as `maps::apply` does): its tracked flows are
        // no longer balanced; the kernel gets them untouched.
        let mut vips: HashMap<_, VipKey, VipMeta> = HashMap::try_from(dp.ebpf.map_mut(MAP_VIPS).unwrap()).unwrap();
        vips.remove(&smtp4).unwrap();
        dp.vip_slot(1, VipSlot::EMPTY);
        assert!(dp.conntrack(&k).is_some());
        dp.pass("VIP removed", &tcp_frame(c4(), 47000, v4(), SMTP, ACK, b"r"), Reason::PassNonVip);
    });
}

/// Transit traffic is decided by `MXLB_VIP_FILTER` alone: an address whose bit is clear is
/// passed without any hash lookup, even if (against `maps::apply`'s order) it had entries.
#[test]
fn vip_filter_passes_transit_traffic_first() {
    isolated("vip_filter_passes_transit_traffic_first", || {
        let mut dp = standard();
        let k = key(c4(), 48000, v4(), SMTP);
        let id = dp.predict(&k);
        dp.l2("syn", &tcp_frame(c4(), 48000, v4(), SMTP, SYN, b""), id, Reason::Forwarded);
        dp.filter(addr_to_key(v4()), false);
        dp.pass("tracked, bit clear", &tcp_frame(c4(), 48000, v4(), SMTP, ACK, b"x"), Reason::PassNonVip);
        dp.pass("syn, bit clear", &tcp_frame(c4(), 48001, v4(), SMTP, SYN, b""), Reason::PassNonVip);
        // IPv6 and the other VIP address have bits of their own.
        let k6 = key(c6(), 48000, v6(), SMTP);
        dp.l2("v6 syn", &tcp_frame(c6(), 48000, v6(), SMTP, SYN, b""), dp.predict(&k6), Reason::Forwarded);
        dp.filter(addr_to_key(v4()), true);
        dp.l2("tracked, bit set", &tcp_frame(c4(), 48000, v4(), SMTP, ACK, b"x"), id, Reason::Forwarded);
    });
}

#[test]
fn client_groups_are_shed_by_capacity() {
    isolated("client_groups_are_shed_by_capacity", || {
        let mut dp = standard();
        // VIP4:25 sheds and runs at 40% capacity; everyone needs 50%, 198.18.0.4/32 needs 0%.
        let key = VipKey { addr: addr_to_key(v4()), port: port_to_key(SMTP), proto: 6, _pad: 0 };
        let mut meta = dp.vips[&(key.addr, key.port)];
        meta.flags = lb_common::vip_flags::SHED;
        meta.capacity = 40;
        dp.put_vip(key, meta);
        {
            let mut g: aya::maps::LpmTrie<_, [u8; 16], u32> =
                aya::maps::LpmTrie::try_from(dp.ebpf.map_mut(lb_common::MAP_GROUPS).unwrap()).unwrap();
            g.insert(&aya::maps::lpm_trie::Key::new(96, addr_to_key("0.0.0.0".parse().unwrap())), 50, 0).unwrap();
            g.insert(&aya::maps::lpm_trie::Key::new(128, addr_to_key("198.18.0.4".parse().unwrap())), 0, 0).unwrap();
        }
        // A standard client's new flow, and its next packets, stay on this node.
        dp.pass("standard syn shed", &tcp_frame(c4(), 46000, v4(), SMTP, SYN, b""), Reason::PassShed);
        dp.pass("standard ack shed", &tcp_frame(c4(), 46000, v4(), SMTP, ACK, b"x"), Reason::PassShed);
        assert!(dp.conntrack(&key4(c4(), 46000)).is_none());
        // The premium source is still balanced.
        let premium: IpAddr = "198.18.0.4".parse().unwrap();
        let out = dp.try_run(PROG_BALANCER, &tcp_frame(premium, 46001, v4(), SMTP, SYN, b"")).unwrap();
        assert_eq!(out.action, XDP_TX, "premium client shed");
        // Back at full capacity nobody is shed.
        meta.capacity = 100;
        dp.put_vip(key, meta);
        let out = dp.try_run(PROG_BALANCER, &tcp_frame(c4(), 46002, v4(), SMTP, SYN, b"")).unwrap();
        assert_eq!(out.action, XDP_TX, "shed at full capacity");
    });
}

fn key4(src: IpAddr, sport: u16) -> FlowKey {
    key(src, sport, v4(), SMTP)
}

// ---------------------------------------------------------------------------------------------
// dsr-ipip with a working fib lookup (veth pairs and static neighbours in the test namespace).

fn sh(cmd: &str) {
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .expect("spawn sh");
    assert!(st.success(), "`{cmd}` failed");
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no interface {name}");
    i
}

#[test]
fn ipip_next_hop_from_fib_lookup() {
    isolated("ipip_next_hop_from_fib_lookup", || {
        let mut dp = standard();
        // Child processes inherit this thread's network namespace.
        sh(
            "ip link add lb0 address 02:00:00:00:00:01 type veth peer name nh0 \
            && ip link add lb1 address 02:00:00:00:00:11 type veth peer name nh1 \
            && ip link set lb0 up && ip link set nh0 up && ip link set lb1 up && ip link set nh1 up \
            && ip addr add 198.18.0.2/24 dev lb0 \
            && ip -6 addr add 2001:db8::2/64 dev lb0 nodad \
            && ip route add 198.18.0.13/32 dev lb1 \
            && ip neigh add 198.18.0.11 lladdr 02:00:00:00:02:01 dev lb0 nud permanent \
            && ip neigh add 198.18.0.12 lladdr 02:00:00:00:02:02 dev lb0 nud permanent \
            && ip neigh add 198.18.0.13 lladdr 02:00:00:00:02:03 dev lb1 nud permanent \
            && for id in 4 5 6; do ip -6 neigh add 2001:db8::1$id lladdr 02:00:00:00:02:0$id dev lb0 nud permanent; done",
        );
        std::fs::write("/proc/sys/net/ipv4/conf/lb0/forwarding", "1").unwrap();
        std::fs::write("/proc/sys/net/ipv6/conf/lb0/forwarding", "1").unwrap();
        // BPF_PROG_TEST_RUN only accepts an ingress device with a registered XDP rx queue:
        // attach the trivial program to lb0 (native XDP on veth).
        {
            let p: &mut Xdp = dp
                .ebpf
                .program_mut(lb_common::PROG_PASS)
                .unwrap()
                .try_into()
                .unwrap();
            p.load().unwrap();
            p.attach("lb0", aya::programs::XdpMode::Driver)
                .expect("attach mxlb_pass to lb0");
        }
        let lb0 = ifindex("lb0");
        let run = |f: &[u8]| -> Out {
            let p: &Xdp = dp.ebpf.program(PROG_BALANCER).unwrap().try_into().unwrap();
            let ctx: Vec<u8> = [0u32, f.len() as u32, 0, lb0, 0, 0]
                .iter()
                .flat_map(|w| w.to_ne_bytes())
                .collect();
            let mut out = vec![0u8; 4096];
            let r = p
                .test_run(TestRunOptions {
                    data_in: Some(f),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    ..Default::default()
                })
                .expect("test run with ingress ifindex");
            out.truncate(r.data_size_out as usize);
            Out {
                action: r.return_value,
                frame: out,
            }
        };
        let nh_mac = |id: u32| [0x02, 0, 0, 0, 0x02, id as u8];
        let mut seen_tx = false;
        let mut seen_redirect = false;
        for p in 46000..46040u16 {
            for (src, dst) in [(c4(), v4()), (c6(), v6())] {
                let f = tcp_frame(src, p, dst, SUBMISSION, SYN, b"");
                let k = key(src, p, dst, SUBMISSION);
                let id = dp.predict(&k);
                let addr: IpAddr = if id <= 3 {
                    be4(id).into()
                } else {
                    be6(id).into()
                };
                let out = run(&f);
                // Next hop from the neighbour table, not the back-end's configured MAC.
                let mut expected = ipip_expected(&f, nh_mac(id), addr, &k);
                if id == 3 {
                    // Routed out of lb1: bpf_redirect, source MAC = lb1's.
                    expected[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x11]);
                    assert_eq!(
                        out.action, 4, /* XDP_REDIRECT */
                        "flow {p} to backend 3"
                    );
                    seen_redirect = true;
                } else {
                    assert_eq!(out.action, XDP_TX, "flow {p} to backend {id}");
                    seen_tx = true;
                }
                assert_eq!(hex(&out.frame), hex(&expected), "flow {p} to backend {id}");
            }
        }
        assert!(seen_tx && seen_redirect);
    });
}

// ---------------------------------------------------------------------------------------------
// Decapsulation.

#[test]
fn decap_all_four_combinations() {
    isolated("decap_all_four_combinations", || {
        let dp = Dp::new();
        let be_eth = Eth::new(be_mac(1), LB_MAC);
        let in4 = ip_packet(c4(), v4(), &Tcp::new(40100, SMTP, SYN), b"");
        let in6 = ip_packet(c6(), v6(), &Tcp::new(40100, SMTP, ACK), b"hello");
        let cases = [
            ("4in4", frames::ipip_v4(LB_SRC4, be4(1), &in4), &in4),
            ("6in4", frames::ipip_v4(LB_SRC4, be4(1), &in6), &in6),
            ("4in6", frames::ipip_v6(LB_SRC6, be6(4), 7, &in4), &in4),
            ("6in6", frames::ipip_v6(LB_SRC6, be6(4), 7, &in6), &in6),
        ];
        for (name, outer, inner) in &cases {
            for eth in [be_eth, be_eth.vlan(0x0042)] {
                let f = eth.frame_ip(outer);
                let expected = eth.frame_ip(inner);
                dp.fixture(
                    PROG_DECAP,
                    &format!("decap {name} vlan={:?}", eth.vlan),
                    &f,
                    XDP_PASS,
                    Reason::Decapsulated,
                    &expected,
                );
            }
        }
        // Outer IPv4 with options (IHL 7).
        let mut o = Ipv4::new(LB_SRC4, be4(1), frames::IPPROTO_IPIP);
        o.options = vec![1; 8];
        let f = be_eth.frame_ip(&o.packet(&in4));
        dp.fixture(
            PROG_DECAP,
            "decap 4in4 outer ihl 7",
            &f,
            XDP_PASS,
            Reason::Decapsulated,
            &be_eth.frame_ip(&in4),
        );
        assert_eq!(dp.reason(Reason::Decapsulated).packets, 9);
    });
}

#[test]
fn decap_passes_everything_else_untouched() {
    isolated("decap_passes_everything_else_untouched", || {
        let dp = Dp::new();
        let be_eth = Eth::new(be_mac(1), LB_MAC);
        let in4 = ip_packet(c4(), v4(), &Tcp::new(40100, SMTP, SYN), b"");
        let in6 = ip_packet(c6(), v6(), &Tcp::new(40100, SMTP, SYN), b"");
        let mut frames_: Vec<(&str, Vec<u8>)> = vec![
            ("plain ipv4 tcp", be_eth.frame_ip(&in4)),
            ("plain ipv6 tcp", be_eth.frame_ip(&in6)),
            ("arp", frames::arp_request(ROUTER_MAC, CLIENT4, VIP4)),
        ];
        // Proto 4 but the inner header is IPv6 (and vice versa).
        frames_.push((
            "4 carrying ipv6",
            be_eth.frame_ip(&Ipv4::new(LB_SRC4, be4(1), 4).packet(&in6)),
        ));
        frames_.push((
            "41 carrying ipv4",
            be_eth.frame_ip(&Ipv6::new(LB_SRC6, be6(4), 41).packet(&in4)),
        ));
        // Outer fragment.
        let mut o = Ipv4::new(LB_SRC4, be4(1), 4);
        o.frag = 0x2000;
        frames_.push(("outer fragment", be_eth.frame_ip(&o.packet(&in4))));
        // Truncated inner header and bad outer lengths.
        let full = be_eth.frame_ip(&frames::ipip_v4(LB_SRC4, be4(1), &in4));
        frames_.push(("inner truncated", fix_ipv4_len(&full[..14 + 20 + 10])));
        frames_.push((
            "outer tot_len beyond frame",
            full[..full.len() - 1].to_vec(),
        ));
        let full6 = be_eth.frame_ip(&frames::ipip_v6(LB_SRC6, be6(4), 0, &in6));
        frames_.push(("ipv6 outer truncated", full6[..14 + 30].to_vec()));
        frames_.push(("ipv6 inner truncated", fix_ipv6_len(&full6[..14 + 40 + 30])));
        // IPv6 with an extension header before the tunnel.
        let mut hbh = vec![41, 0, 1, 4, 0, 0, 0, 0];
        hbh.extend_from_slice(&in6);
        frames_.push((
            "ipv6 ext before tunnel",
            be_eth.frame_ip(&Ipv6::new(LB_SRC6, be6(4), 0).packet(&hbh)),
        ));
        for (name, f) in &frames_ {
            let out = dp.try_run(PROG_DECAP, f).unwrap();
            assert_eq!(out.action, XDP_PASS, "{name}");
            assert_eq!(&out.frame, f, "{name}: modified");
        }
        assert_eq!(dp.reason(Reason::Decapsulated).packets, 0);
    });
}

#[test]
fn balancer_then_decap_round_trip() {
    isolated("balancer_then_decap_round_trip", || {
        let dp = standard();
        for (src, dst) in [(c4(), v4()), (c6(), v6())] {
            let f = tcp_frame(
                src,
                40200,
                dst,
                SUBMISSION,
                ACK | PSH,
                b"RCPT TO:<b@example.org>\r\n",
            );
            let out = dp.try_run(PROG_BALANCER, &f).unwrap();
            assert_eq!(out.action, XDP_TX);
            let back = dp.try_run(PROG_DECAP, &out.frame).unwrap();
            assert_eq!(back.action, XDP_PASS);
            let k = key(src, 40200, dst, SUBMISSION);
            // The back-end sees the client's original packet, addressed to its MAC.
            assert_eq!(back.frame, l2_rewritten(&f, be_mac(dp.predict(&k))));
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Edge protection: block list, allow list, per-source SYN token buckets.

fn src4(last: u8) -> IpAddr {
    Ipv4Addr::new(198, 19, 1, last).into()
}

#[test]
fn syn_rate_limit_per_source() {
    isolated("syn_rate_limit_per_source", || {
        let mut dp = standard();
        // Off by default: SYNs pass and no bucket is created.
        let syn = |src: IpAddr, port: u16| tcp_frame(src, port, v4(), SMTP, SYN, b"");
        let fwd = |dp: &Dp, name: &str, src: IpAddr, port: u16| {
            let id = dp.predict(&key(src, port, v4(), SMTP));
            dp.l2(name, &syn(src, port), id, Reason::Forwarded);
        };
        fwd(&dp, "limit off", c4(), 41000);
        assert!(dp.bucket(c4()).is_none(), "no bucket while limiting is off");

        dp.edge_limits(1, 3);
        for p in 41001..41004 {
            fwd(&dp, "within burst", c4(), p);
        }
        let b = dp.bucket(c4()).expect("bucket");
        assert!(b.tokens < 1_000_000_000, "burst used up: {b:?}");
        let vip_before = dp.vip_stats(1).packets;
        dp.drop("burst exhausted", &syn(c4(), 41004), Reason::DropRateLimited);
        dp.drop("still exhausted", &syn(c4(), 41005), Reason::DropRateLimited);
        assert_eq!(dp.vip_stats(1).packets, vip_before + 2, "drops count on the VIP");
        assert!(dp.conntrack(&key(c4(), 41004, v4(), SMTP)).is_none());
        // Another source has its own bucket.
        fwd(&dp, "other source", src4(2), 41004);
        // Established flows of the limited source are not touched: conntrack hit ...
        let id = dp.predict(&key(c4(), 41001, v4(), SMTP));
        dp.l2("established of limited source", &tcp_frame(c4(), 41001, v4(), SMTP, ACK | PSH, b"EHLO x\r\n"), id, Reason::Forwarded);
        // ... and a non-SYN without entry (agent restart) is not rate limited either.
        let id = dp.predict(&key(c4(), 41100, v4(), SMTP));
        dp.l2("ack without entry", &tcp_frame(c4(), 41100, v4(), SMTP, ACK, b"x"), id, Reason::Forwarded);
        // SYN-ACK-like (SYN|ACK) is not a SYN: not limited.
        let id = dp.predict(&key(c4(), 41101, v4(), SMTP));
        dp.l2("syn|ack is not counted", &tcp_frame(c4(), 41101, v4(), SMTP, SYN | ACK, b""), id, Reason::Forwarded);
        // Tokens come back with time: 2 s at 1/s = 2 SYNs, then empty again.
        dp.age_bucket(c4(), 2);
        fwd(&dp, "refilled 1", c4(), 41006);
        fwd(&dp, "refilled 2", c4(), 41007);
        dp.drop("empty again", &syn(c4(), 41008), Reason::DropRateLimited);
        // Long idle: full bucket again (capped at burst 3).
        dp.age_bucket(c4(), 3600);
        for p in 41009..41012 {
            fwd(&dp, "full after idle", c4(), p);
        }
        dp.drop("capped at burst", &syn(c4(), 41012), Reason::DropRateLimited);
        // Limiting off again: everything passes.
        dp.edge_limits(0, 0);
        fwd(&dp, "off again", c4(), 41013);
        // The same over IPv6 and dsr-ipip.
        dp.edge_limits(1, 1);
        let k = key(c6(), 41000, v6(), SUBMISSION);
        let id = dp.predict(&k);
        dp.ipip("ipv6 first", &tcp_frame(c6(), 41000, v6(), SUBMISSION, SYN, b""), id, be6(id).into(), &k, Reason::Forwarded);
        dp.drop("ipv6 limited", &tcp_frame(c6(), 41001, v6(), SUBMISSION, SYN, b""), Reason::DropRateLimited);
    });
}

#[test]
fn ipv6_sources_share_a_bucket_per_64() {
    isolated("ipv6_sources_share_a_bucket_per_64", || {
        let mut dp = standard();
        dp.edge_limits(1, 2);
        let a: IpAddr = "2001:db8:1::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1::ffff:2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:0:8000::3".parse().unwrap();
        let other: IpAddr = "2001:db8:1:1::1".parse().unwrap();
        for (name, src) in [("first of the /64", a), ("second of the /64", b)] {
            let id = dp.predict(&key(src, 42000, v6(), SMTP));
            dp.l2(name, &tcp_frame(src, 42000, v6(), SMTP, SYN, b""), id, Reason::Forwarded);
        }
        dp.drop("third of the /64", &tcp_frame(c, 42000, v6(), SMTP, SYN, b""), Reason::DropRateLimited);
        assert_eq!(dp.bucket(a), dp.bucket(c), "one bucket for the /64");
        let id = dp.predict(&key(other, 42000, v6(), SMTP));
        dp.l2("next /64", &tcp_frame(other, 42000, v6(), SMTP, SYN, b""), id, Reason::Forwarded);
        // IPv4 sources are per address.
        dp.edge_limits(1, 1);
        let id = dp.predict(&key(src4(1), 42000, v4(), SMTP));
        dp.l2("v4 .1", &tcp_frame(src4(1), 42000, v4(), SMTP, SYN, b""), id, Reason::Forwarded);
        let id = dp.predict(&key(src4(2), 42000, v4(), SMTP));
        dp.l2("v4 .2 own bucket", &tcp_frame(src4(2), 42000, v4(), SMTP, SYN, b""), id, Reason::Forwarded);
    });
}

#[test]
fn block_list_drops_new_flows_and_allow_list_bypasses() {
    isolated("block_list_drops_new_flows_and_allow_list_bypasses", || {
        let mut dp = standard();
        dp.vip(v4(), 465, 7, 0, mode::LOCAL);
        // An established flow from before the block.
        let est = key(src4(1), 43000, v4(), SMTP);
        let est_id = dp.predict(&est);
        dp.l2("syn before block", &tcp_frame(src4(1), 43000, v4(), SMTP, SYN, b""), est_id, Reason::Forwarded);

        dp.edge_list("198.19.1.0/24", false);
        dp.edge_list("2001:db8:1::/48", false);
        let vip_before = dp.vip_stats(1).packets;
        dp.drop("blocked syn", &tcp_frame(src4(1), 43001, v4(), SMTP, SYN, b""), Reason::DropBlocked);
        assert_eq!(dp.vip_stats(1).packets, vip_before + 1);
        dp.drop("blocked syn, other host of the /24", &tcp_frame(src4(77), 43001, v4(), SMTP, SYN, b""), Reason::DropBlocked);
        dp.drop("blocked ack without entry", &tcp_frame(src4(1), 43002, v4(), SMTP, ACK, b"x"), Reason::DropBlocked);
        assert!(dp.conntrack(&key(src4(1), 43002, v4(), SMTP)).is_none());
        dp.drop("blocked ipv6 syn", &tcp_frame(c6(), 43001, v6(), SMTP, SYN, b""), Reason::DropBlocked);
        dp.drop("blocked to a local VIP", &tcp_frame(src4(1), 43003, v4(), 465, SYN, b""), Reason::DropBlocked);
        // Established flows finish.
        dp.l2("established flow of a blocked source", &tcp_frame(src4(1), 43000, v4(), SMTP, ACK | PSH, b"DATA\r\n"), est_id, Reason::Forwarded);
        // Non-VIP traffic from a blocked source is untouched.
        dp.pass("blocked source, non-VIP port", &tcp_frame(src4(1), 43004, v4(), 2525, SYN, b""), Reason::PassNonVip);
        dp.pass("blocked source, other host", &tcp_frame(src4(1), 43004, be4(1).into(), SMTP, SYN, b""), Reason::PassNonVip);
        // Outside the prefix: not blocked.
        let outside: IpAddr = "198.19.2.1".parse().unwrap();
        let id = dp.predict(&key(outside, 43001, v4(), SMTP));
        dp.l2("outside the block", &tcp_frame(outside, 43001, v4(), SMTP, SYN, b""), id, Reason::Forwarded);
        // The allow list wins over the block list (whatever the prefix lengths) ...
        dp.edge_list("198.19.1.5/32", true);
        let id = dp.predict(&key(src4(5), 43001, v4(), SMTP));
        dp.l2("allowed inside a blocked /24", &tcp_frame(src4(5), 43001, v4(), SMTP, SYN, b""), id, Reason::Forwarded);
        dp.drop("its neighbour still blocked", &tcp_frame(src4(6), 43001, v4(), SMTP, SYN, b""), Reason::DropBlocked);
        // ... and over the rate limit.
        dp.edge_limits(1, 1);
        for p in 43010..43015 {
            let id = dp.predict(&key(src4(5), p, v4(), SMTP));
            dp.l2("allowed: not rate limited", &tcp_frame(src4(5), p, v4(), SMTP, SYN, b""), id, Reason::Forwarded);
        }
        assert!(dp.bucket(src4(5)).is_none(), "allowed sources get no bucket");
        // An IPv4 /0 does not match IPv6 sources.
        dp.edge_list("0.0.0.0/0", false);
        let other6: IpAddr = "2001:db8:2::1".parse().unwrap();
        let id = dp.predict(&key(other6, 43001, v6(), SMTP));
        dp.l2("v4 /0 leaves IPv6 alone", &tcp_frame(other6, 43001, v6(), SMTP, SYN, b""), id, Reason::Forwarded);
        dp.drop("v4 /0 blocks any IPv4", &tcp_frame("198.18.5.5".parse().unwrap(), 43001, v4(), SMTP, SYN, b""), Reason::DropBlocked);
    });
}

// ---------------------------------------------------------------------------------------------
// Object shape.

#[test]
fn object_declares_the_contract() {
    isolated("object_declares_the_contract", || {
        let dp = Dp::new();
        for name in [
            MAP_VIPS,
            MAP_VIP_SLOTS,
            MAP_VIP_FILTER,
            MAP_BACKENDS,
            MAP_RINGS,
            MAP_CONNTRACK,
            MAP_VIP_STATS,
            MAP_BACKEND_STATS,
            MAP_REASON_STATS,
            MAP_CONFIG,
            MAP_BLOCK,
            MAP_ALLOW,
            MAP_SYN_BUCKETS,
            MAP_EDGE_CONFIG,
        ] {
            assert!(dp.ebpf.map(name).is_some(), "map {name} missing");
            // Pinned by name (into this test's private bpffs).
            assert!(
                std::path::Path::new("/sys/fs/bpf").join(name).exists(),
                "{name} not pinned by name"
            );
        }
        for name in [lb_common::PROG_PASS, PROG_BALANCER, PROG_DECAP] {
            assert!(dp.ebpf.program(name).is_some(), "program {name} missing");
        }
    });
}
