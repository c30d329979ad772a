//! Types and constants shared by the XDP data plane (`lb-ebpf`) and the userspace agent
//! (`lb-userspace`).
//!
//! Everything that crosses the kernel/userspace boundary lives here, so both sides agree on
//! layout (`#[repr(C)]`, explicit padding) and on map and program names. The `user` feature adds
//! `aya::Pod` impls and address helpers for the userspace side.
//!
//! Conventions:
//! - Addresses are 16 bytes; IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`), so one key type
//!   serves both families and the two can never collide.
//! - Ports are stored in network byte order, exactly as they appear in the packet, so the data
//!   path never swaps bytes. Use [`port_to_key`]/[`port_from_key`] in userspace.
#![cfg_attr(target_arch = "bpf", no_std)]

/// Size of one Maglev lookup table (a prime, as Maglev requires; Katran uses the same).
pub const RING_SIZE: u32 = 65537;
/// Number of Maglev tables in [`MAP_RINGS`]. Each VIP address (its backend pool) owns two:
/// userspace fills the idle one, then flips [`VipMeta::ring`], so the data path never sees a
/// half-written table.
pub const MAX_RINGS: u32 = 64;
/// VIP entries (address, port, protocol) in [`MAP_VIPS`]; also the size of [`MAP_VIP_STATS`].
pub const MAX_VIPS: u32 = 512;
/// Back-end slots in [`MAP_BACKENDS`]. Slot 0 is never used: a ring entry of 0 means "empty".
pub const MAX_BACKENDS: u32 = 4096;
/// Default number of tracked flows in [`MAP_CONNTRACK`] (userspace may override at load time).
pub const CONNTRACK_DEFAULT_SIZE: u32 = 262_144;

/// Hash map [`VipKey`] → [`VipMeta`]: which (address, port, protocol) the data path balances.
/// An entry with port 0 marks the address itself as a VIP (used to drop fragments sent to it).
pub const MAP_VIPS: &str = "MXLB_VIPS";
/// Array [`VipMeta::id`] → [`VipSlot`]: the [`MAP_VIPS`] entry that owns each id, so a packet
/// whose flow is in [`MAP_CONNTRACK`] finds its VIP's mode and flags with an array lookup
/// instead of a second hash lookup (the established fast path costs one hash lookup). Id 0
/// (the address markers) and unused ids are all zero.
pub const MAP_VIP_SLOTS: &str = "MXLB_VIP_SLOTS";
/// Array of [`VIP_FILTER_BITS`]` / 64` `u64` words: bit [`vip_filter_bit`] of every VIP
/// address is set. A clear bit means "certainly not a VIP", so transit traffic through the
/// node costs one array lookup instead of a conntrack and a VIP hash lookup; a set bit may be
/// a collision, and the hash maps decide.
pub const MAP_VIP_FILTER: &str = "MXLB_VIP_FILTER";
/// Bits in [`MAP_VIP_FILTER`] (a power of two: 8 KiB, so a few hundred VIP addresses leave
/// it almost empty).
pub const VIP_FILTER_BITS: u32 = 65_536;
/// Array `u32` id → [`Backend`].
pub const MAP_BACKENDS: &str = "MXLB_BACKENDS";
/// Array of `MAX_RINGS * RING_SIZE` back-end ids: ring `r` occupies `[r*RING_SIZE, (r+1)*RING_SIZE)`.
pub const MAP_RINGS: &str = "MXLB_RINGS";
/// LRU hash [`FlowKey`] → [`FlowState`]: connection tracking, so established flows keep their
/// back-end when weights or membership change.
pub const MAP_CONNTRACK: &str = "MXLB_CONNTRACK";
/// Per-CPU array indexed by [`VipMeta::id`] → [`Counters`].
pub const MAP_VIP_STATS: &str = "MXLB_VIP_STATS";
/// Per-CPU array indexed by back-end id → [`Counters`].
pub const MAP_BACKEND_STATS: &str = "MXLB_BE_STATS";
/// Per-CPU array indexed by [`Reason`] → [`Counters`]: why packets were passed, dropped or sent.
pub const MAP_REASON_STATS: &str = "MXLB_REASONS";
/// Array with one [`LbConfig`] (index 0): node-wide settings such as the IPIP outer source.
pub const MAP_CONFIG: &str = "MXLB_CONFIG";
/// LPM trie [`PrefixKey`] → `u32` (1): sources whose SYNs (and conntrack-less packets) to a
/// VIP are dropped (`drop_blocked`). Written by `mxlb block add|remove|load`.
pub const MAP_BLOCK: &str = "MXLB_BLOCK";
/// LPM trie [`PrefixKey`] → `u32` (1): sources exempt from the block list and the SYN rate
/// limit (`mxlb block add --allow`). An allow entry wins over any block entry.
pub const MAP_ALLOW: &str = "MXLB_ALLOW";
/// LRU hash of 16-byte source keys (IPv4-mapped address, or IPv6 /64 with the low 64 bits
/// zero) → [`SynBucket`]: the per-source SYN token buckets.
pub const MAP_SYN_BUCKETS: &str = "MXLB_SYN_BUCKET";
/// LPM trie [`PrefixKey`] → `u32`: the minimum VIP capacity (percent) below which new sessions
/// from that source prefix are shed (client groups; the longest prefix wins; no match = 0,
/// shed only when no back-end is left).
pub const MAP_GROUPS: &str = "MXLB_GROUPS";
/// Array with one [`EdgeLimits`] (index 0): SYN rate and burst per source.
pub const MAP_EDGE_CONFIG: &str = "MXLB_EDGE_CFG";

/// Entries in each of [`MAP_BLOCK`] and [`MAP_ALLOW`] (LPM tries allocate per entry, so a
/// large limit costs nothing until used).
pub const MAX_PREFIXES: u32 = 262_144;
/// Sources tracked in [`MAP_SYN_BUCKETS`] (LRU: the least recently seen source is forgotten,
/// and starts again with a full bucket).
pub const SYN_BUCKETS_SIZE: u32 = 65_536;
/// [`SynBucket::tokens`] counts in units of 1/TOKEN_SCALE of a SYN, so a refill is
/// `elapsed_ns * rate` with no division in the data path.
pub const TOKEN_SCALE: u64 = 1_000_000_000;
/// Highest [`EdgeLimits::syn_rate`] and [`EdgeLimits::syn_burst`] (keeps the token arithmetic
/// far from u64 overflow: burst × scale ≤ 1e15, 2^40 ns × rate ≤ 1.1e18).
pub const MAX_SYN_LIMIT: u32 = 1_000_000;
/// A source idle for longer than this (ns, ~18 min) gets a full bucket without computing the
/// refill (which could overflow).
pub const SYN_IDLE_FULL_NS: u64 = 1 << 40;

/// The load balancer XDP program (attached to the LB node's interfaces).
pub const PROG_BALANCER: &str = "mxlb_balancer";
/// The IPIP/IP6IP6 decapsulation XDP program (attached on back-ends by `mxlb decap attach`).
pub const PROG_DECAP: &str = "mxlb_decap";
/// A trivial XDP_PASS program: the benchmark baseline, and what the lab attaches to the peer of
/// a veth that uses XDP_TX (veth drops XDP_TX frames unless its peer runs native XDP).
pub const PROG_PASS: &str = "mxlb_pass";

/// The sk_skb stream-verdict program of the POP3/IMAP proxy's kernel relay (`mxlb::sockmap`):
/// redirects each segment received on a spliced socket to its peer's send side.
pub const PROG_SPLICE: &str = "mxlb_splice";
/// Sock hash `u64` socket cookie → socket: the sockets of spliced sessions, both sides. The
/// [`PROG_SPLICE`] verdict program is attached to it, so inserting a socket is what turns the
/// kernel relay on for it. Not pinned: each proxy process owns its own.
pub const MAP_SPLICE_SOCKS: &str = "MXLB_SPLICE_SOCKS";
/// Hash `u64` socket cookie → [`SplicePeer`]: where a spliced socket's bytes go, and how many
/// went. A socket in [`MAP_SPLICE_SOCKS`] without an entry here is passed to userspace
/// (SK_PASS). Not pinned, like [`MAP_SPLICE_SOCKS`].
pub const MAP_SPLICE_PEERS: &str = "MXLB_SPLICE_PEERS";
/// Entries in [`MAP_SPLICE_SOCKS`] and [`MAP_SPLICE_PEERS`]: two per spliced session, so this
/// many sockets is 32768 concurrent sessions per proxy process. Both maps are allocated when
/// the proxy loads them (a few MiB).
pub const MAX_SPLICE_SOCKETS: u32 = 65_536;

/// Value of [`MAP_SPLICE_PEERS`], keyed by the receiving socket's cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SplicePeer {
    /// Cookie of the socket the received bytes are sent out of (its [`MAP_SPLICE_SOCKS`] key).
    pub peer: u64,
    /// Bytes the verdict program redirected from this socket to the peer (added by the
    /// program under the socket's lock): the proxy's proof that the kernel, not userspace, relayed them, and what it
    /// waits for the peer to have queued before it forwards an end of stream.
    pub bytes: u64,
    /// Segments (skbs) redirected, for the same accounting.
    pub segments: u64,
}

/// Forwarding mode of a VIP ([`VipMeta::mode`]).
pub mod mode {
    /// Rewrite MACs (destination = back-end, source = LB) and XDP_TX. Back-ends hold the VIP on
    /// loopback and answer the client directly.
    pub const DSR_L2: u8 = 1;
    /// Prepend an outer IPv4/IPv6 header addressed to the back-end (IPIP / IP6IP6 / 4in6 / 6in4),
    /// next hop from `bpf_fib_lookup`. Back-ends strip it with `mxlb decap`.
    pub const DSR_IPIP: u8 = 2;
    /// XDP_PASS: the VIP is served by a process on this node (the relay, the proxies).
    pub const LOCAL: u8 = 3;
}

/// Bits of [`VipMeta::flags`].
pub mod vip_flags {
    /// When no back-end can take a new flow (empty ring), pass it to this node's stack, where
    /// `mxlb run` answers with the protocol's "try again later", instead of dropping it.
    pub const SHED: u8 = 1;
    /// This node is not the VRRP master for the VIP: its packets are passed untouched
    /// (`pass_standby`) to the kernel, which does not hold the address either. Userspace sets it
    /// while the VIP's VRRP instance is BACKUP, FAULT or stopped, and also leaves out the
    /// address-level marker, so nothing about the address is decided here.
    pub const STANDBY: u8 = 2;
}

/// Back-end states ([`Backend::state`]).
pub mod state {
    /// Slot unused.
    pub const UNUSED: u8 = 0;
    /// Takes new and established flows.
    pub const UP: u8 = 1;
    /// Keeps its established flows, receives no new ones (it is absent from the rings).
    pub const DRAINING: u8 = 2;
    /// Receives nothing; conntrack entries pointing at it are replaced on the next packet.
    pub const DOWN: u8 = 3;
}

/// Key of [`MAP_VIPS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// VIP address (IPv4-mapped for IPv4).
    pub addr: [u8; 16],
    /// Destination port, network byte order; 0 = the address-level marker entry.
    pub port: u16,
    /// IP protocol number (6 = TCP).
    pub proto: u8,
    pub _pad: u8,
}

/// Value of [`MAP_VIPS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipMeta {
    /// Index into [`MAP_VIP_STATS`]; stable for the VIP's lifetime.
    pub id: u32,
    /// Which Maglev ring (0..MAX_RINGS) the data path uses now.
    pub ring: u32,
    /// One of [`mode`].
    pub mode: u8,
    /// Bits of [`vip_flags`].
    pub flags: u8,
    /// Share of the VIP's admin weight its back-ends can take now, in percent (100 = all
    /// there). A shedding VIP sheds a client group's new sessions while this is below the
    /// group's minimum ([`MAP_GROUPS`]), so a premium group keeps service longest.
    pub capacity: u8,
    pub _pad: u8,
}

/// Value of [`MAP_VIP_SLOTS`]: a [`MAP_VIPS`] entry stored under its id.
///
/// The data path uses a slot only when `key` is the packet's own VIP address and port, so a
/// conntrack entry left over from a removed VIP whose id went to another VIP never borrows
/// that VIP's mode or flags.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipSlot {
    pub key: VipKey,
    pub meta: VipMeta,
}

impl VipSlot {
    /// The slot of an id no VIP owns: all zero (mode 0 matches no packet's VIP).
    pub const EMPTY: VipSlot = VipSlot {
        key: VipKey { addr: [0; 16], port: 0, proto: 0, _pad: 0 },
        meta: VipMeta { id: 0, ring: 0, mode: 0, flags: 0, capacity: 0, _pad: 0 },
    };
}

/// Value of [`MAP_BACKENDS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Back-end address (IPv4-mapped for IPv4); the IPIP outer destination.
    pub addr: [u8; 16],
    /// dsr-l2: the back-end's MAC. dsr-ipip: next-hop MAC used when `bpf_fib_lookup` has no
    /// neighbour entry (all zero = none).
    pub mac: [u8; 6],
    /// One of [`state`].
    pub state: u8,
    pub _pad: u8,
}

/// Key of [`MAP_CONNTRACK`]: the client → VIP direction of a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of [`MAP_CONNTRACK`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowState {
    /// Back-end id the flow is pinned to.
    pub backend: u32,
    /// [`VipMeta::id`] of the VIP the flow belongs to.
    pub vip: u32,
}

/// Value of the per-CPU statistics maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    /// Flows for which a back-end was newly selected (SYN, or first packet without conntrack).
    pub new_flows: u64,
}

/// Value of [`MAP_CONFIG`] (single entry, index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConfig {
    /// IPv4 source of IPIP outer headers (network order bytes); all zero = IPv4 encap disabled.
    pub src_v4: [u8; 4],
    /// IPv6 source of IP6IP6 outer headers; all zero = IPv6 encap disabled.
    pub src_v6: [u8; 16],
}

/// Key of [`MAP_BLOCK`] and [`MAP_ALLOW`]: the kernel's `bpf_lpm_trie_key` with a 16-byte
/// address. IPv4 prefixes are stored IPv4-mapped, so `a.b.c.d/n` is `::ffff:a.b.c.d/(96+n)`;
/// lookups use `prefix_len` 128.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PrefixKey {
    pub prefix_len: u32,
    pub addr: [u8; 16],
}

/// Value of [`MAP_EDGE_CONFIG`] (single entry, index 0). Limiting is off when either is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EdgeLimits {
    /// Sustained SYNs per second allowed per source (IPv4 address, IPv6 /64).
    pub syn_rate: u32,
    /// Bucket size: SYNs a source may send at once after being idle.
    pub syn_burst: u32,
}

/// Value of [`MAP_SYN_BUCKETS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynBucket {
    /// Tokens left, in 1/[`TOKEN_SCALE`] of a SYN.
    pub tokens: u64,
    /// `bpf_ktime_get_ns()` of the last refill.
    pub last_ns: u64,
}

/// Why the data path did what it did: index into [`MAP_REASON_STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4/IPv6 (ARP, LLDP, ...): XDP_PASS.
    PassNonIp = 0,
    /// IP but not TCP to a configured VIP:port (other hosts, other ports, UDP, ...): XDP_PASS.
    PassNonVip = 1,
    /// Truncated or malformed headers: XDP_PASS untouched, the kernel discards it.
    PassMalformed = 2,
    /// VIP in `local` mode: XDP_PASS to a service on this node.
    PassLocal = 3,
    /// IP fragment sent to a VIP address: dropped (no L4 header to hash on; TCP sets DF).
    DropFragment = 4,
    /// VIP has no back-end able to take the flow (empty ring): dropped.
    DropNoBackend = 5,
    /// dsr-ipip: no next hop (no route and no fallback MAC): dropped.
    DropNoRoute = 6,
    /// dsr-ipip: the packet could not be grown for the outer header (or no outer source set).
    DropEncap = 7,
    /// Forwarded to a back-end.
    Forwarded = 8,
    /// ICMP error about a VIP flow, forwarded to that flow's back-end.
    IcmpForwarded = 9,
    /// IPv6 with extension headers before TCP to a VIP address: XDP_PASS untouched.
    PassIpv6Ext = 10,
    /// Decap program: outer header removed.
    Decapsulated = 11,
    /// Edge protection: a SYN (or a packet without conntrack entry) to a VIP from a source in
    /// the block list (and not in the allow list): dropped.
    DropBlocked = 12,
    /// Edge protection: a SYN to a VIP from a source whose token bucket is empty: dropped.
    DropRateLimited = 13,
    /// No back-end can take the flow and the VIP sheds ([`vip_flags::SHED`]): passed to this
    /// node's tempfail responder.
    PassShed = 14,
    /// The VIP is on standby on this node ([`vip_flags::STANDBY`]: another node is the VRRP
    /// master): XDP_PASS untouched.
    PassStandby = 15,
}

/// Number of slots in [`MAP_REASON_STATS`] (room for reasons added later).
pub const REASON_SLOTS: u32 = 32;

impl Reason {
    /// Every reason, in index order (for listings).
    pub const ALL: [Reason; 16] = [
        Reason::PassNonIp,
        Reason::PassNonVip,
        Reason::PassMalformed,
        Reason::PassLocal,
        Reason::DropFragment,
        Reason::DropNoBackend,
        Reason::DropNoRoute,
        Reason::DropEncap,
        Reason::Forwarded,
        Reason::IcmpForwarded,
        Reason::PassIpv6Ext,
        Reason::Decapsulated,
        Reason::DropBlocked,
        Reason::DropRateLimited,
        Reason::PassShed,
        Reason::PassStandby,
    ];

    /// Stable snake_case name used by `mxlb stats` and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNonIp => "pass_non_ip",
            Reason::PassNonVip => "pass_non_vip",
            Reason::PassMalformed => "pass_malformed",
            Reason::PassLocal => "pass_local",
            Reason::DropFragment => "drop_fragment",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropNoRoute => "drop_no_route",
            Reason::DropEncap => "drop_encap",
            Reason::Forwarded => "forwarded",
            Reason::IcmpForwarded => "icmp_forwarded",
            Reason::PassIpv6Ext => "pass_ipv6_ext",
            Reason::Decapsulated => "decapsulated",
            Reason::DropBlocked => "drop_blocked",
            Reason::DropRateLimited => "drop_rate_limited",
            Reason::PassShed => "pass_shed",
            Reason::PassStandby => "pass_standby",
        }
    }
}

/// The flow hash that picks a Maglev slot: `flow_hash(key) % RING_SIZE`.
///
/// It has no seed and no per-node state on purpose: every LB node must map a flow to the same
/// slot, so sessions survive a VRRP failover without conntrack sync. It is a murmur3-style mix
/// over the key's ten 32-bit words (fixed loop, verifier-friendly), and it is shared with
/// userspace so tests can predict the back-end of any flow.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    #[inline(always)]
    fn word(b: &[u8; 16], i: usize) -> u32 {
        u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
    }
    flow_hash_words(&[
        word(&key.src, 0),
        word(&key.src, 4),
        word(&key.src, 8),
        word(&key.src, 12),
        word(&key.dst, 0),
        word(&key.dst, 4),
        word(&key.dst, 8),
        word(&key.dst, 12),
        (key.sport as u32) | ((key.dport as u32) << 16),
        key.proto as u32,
    ])
}

/// [`flow_hash`] over the key's ten 32-bit words as read from its memory (little-endian).
///
/// The data path keeps its flow key as words (building it byte by byte costs dozens of BPF
/// instructions), so it hashes them directly; the result is the same as [`flow_hash`].
#[inline(always)]
pub fn flow_hash_words(words: &[u32; 10]) -> u32 {
    let mut h: u32 = 0x6d78_6c62; // "mxlb"
    let mut i = 0;
    while i < 10 {
        let mut k = words[i].wrapping_mul(0xcc9e_2d51);
        k = k.rotate_left(15).wrapping_mul(0x1b87_3593);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
        i += 1;
    }
    h ^= 40;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The [`MAP_VIP_FILTER`] bit of an address given as its four 32-bit words in memory order
/// (little-endian): a multiplicative (Fibonacci) hash of the rotated words.
#[inline(always)]
pub fn vip_filter_bit(addr: [u32; 4]) -> u32 {
    let x = addr[0] ^ addr[1].rotate_left(8) ^ addr[2].rotate_left(16) ^ addr[3].rotate_left(24);
    x.wrapping_mul(0x9e37_79b1) >> (32 - VIP_FILTER_BITS.trailing_zeros())
}

/// [`vip_filter_bit`] of a 16-byte map-encoded address (IPv4-mapped for IPv4).
#[inline(always)]
pub fn vip_filter_bit_of(addr: &[u8; 16]) -> u32 {
    let w = |i: usize| u32::from_le_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    vip_filter_bit([w(0), w(4), w(8), w(12)])
}

/// Port as stored in map keys (network byte order) from a host-order port.
pub const fn port_to_key(port: u16) -> u16 {
    port.to_be()
}

/// Host-order port from a map key port.
pub const fn port_from_key(port: u16) -> u16 {
    u16::from_be(port)
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    use std::net::{IpAddr, Ipv6Addr};

    // SAFETY: all of these are #[repr(C)], contain only integers and byte arrays, and have
    // explicit padding fields, so every bit pattern is valid and there are no uninit bytes.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipMeta {}
    unsafe impl aya::Pod for VipSlot {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowState {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for LbConfig {}
    unsafe impl aya::Pod for PrefixKey {}
    unsafe impl aya::Pod for EdgeLimits {}
    unsafe impl aya::Pod for SynBucket {}
    unsafe impl aya::Pod for SplicePeer {}

    /// Map encoding of an address (IPv4-mapped for IPv4).
    pub fn addr_to_key(ip: IpAddr) -> [u8; 16] {
        match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        }
    }

    /// Address from its map encoding.
    pub fn addr_from_key(bytes: [u8; 16]) -> IpAddr {
        Ipv6Addr::from(bytes).to_canonical()
    }

    impl core::ops::AddAssign for Counters {
        fn add_assign(&mut self, o: Counters) {
            self.packets += o.packets;
            self.bytes += o.bytes;
            self.new_flows += o.new_flows;
        }
    }
}
#[cfg(feature = "user")]
pub use user::{addr_from_key, addr_to_key};

#[cfg(all(test, feature = "user"))]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<VipKey>(), 20);
        assert_eq!(core::mem::size_of::<VipMeta>(), 12);
        assert_eq!(core::mem::size_of::<VipSlot>(), 32);
        assert_eq!(core::mem::size_of::<Backend>(), 24);
        assert_eq!(core::mem::size_of::<FlowKey>(), 40);
        assert_eq!(core::mem::size_of::<FlowState>(), 8);
        assert_eq!(core::mem::size_of::<Counters>(), 24);
        assert_eq!(core::mem::size_of::<LbConfig>(), 20);
        assert_eq!(core::mem::size_of::<PrefixKey>(), 20);
        assert_eq!(core::mem::size_of::<EdgeLimits>(), 8);
        assert_eq!(core::mem::size_of::<SynBucket>(), 16);
        for name in [MAP_BLOCK, MAP_ALLOW, MAP_SYN_BUCKETS, MAP_EDGE_CONFIG, MAP_VIP_SLOTS, MAP_VIP_FILTER] {
            assert!(name.len() <= 15, "{name}: BPF map names hold 15 characters");
        }
    }

    #[test]
    fn flow_hash_spreads_sequential_ports() {
        // smtp-source opens connections from consecutive ports; the hash must still spread them.
        let mut buckets = [0u32; 3];
        for p in 0..3000u16 {
            let k = FlowKey {
                src: addr_to_key("198.18.0.1".parse().unwrap()),
                dst: addr_to_key("198.18.0.100".parse().unwrap()),
                sport: port_to_key(40000 + p),
                dport: port_to_key(25),
                proto: 6,
                _pad: [0; 3],
            };
            buckets[((flow_hash(&k) % RING_SIZE) % 3) as usize] += 1;
        }
        for b in buckets {
            assert!((900..1100).contains(&b), "{buckets:?}");
        }
    }

    #[test]
    fn flow_hash_words_matches_flow_hash() {
        for (src, dst, sport) in [
            ("198.18.0.1", "198.18.0.100", 40000),
            ("2001:db8:1::1", "2001:db8::100", 1024),
        ] {
            let k = FlowKey {
                src: addr_to_key(src.parse().unwrap()),
                dst: addr_to_key(dst.parse().unwrap()),
                sport: port_to_key(sport),
                dport: port_to_key(25),
                proto: 6,
                _pad: [0; 3],
            };
            // SAFETY: FlowKey is 40 bytes of plain integers; read as ten (unaligned) LE words.
            let bytes: [u8; 40] = unsafe { core::mem::transmute(k) };
            let words: [u32; 10] = core::array::from_fn(|i| {
                u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap())
            });
            assert_eq!(flow_hash_words(&words), flow_hash(&k));
        }
    }

    #[test]
    fn address_encoding_round_trips() {
        for s in ["198.18.0.1", "2001:db8::1"] {
            let ip: std::net::IpAddr = s.parse().unwrap();
            assert_eq!(addr_from_key(addr_to_key(ip)), ip);
        }
    }
}
