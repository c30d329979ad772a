//! The maps shared by all programs. Names, key/value types and sizes are the contract in
//! `lb-common`; every map is pinned by name so userspace (`EbpfLoader::map_pin_path`) can keep
//! them, and the traffic they steer, across agent restarts.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::{
    Backend, VipSlot, CONNTRACK_DEFAULT_SIZE, Counters, EdgeLimits, FlowKey, FlowState, LbConfig,
    MAX_BACKENDS, MAX_PREFIXES, MAX_RINGS, MAX_VIPS, REASON_SLOTS, RING_SIZE, Reason,
    SYN_BUCKETS_SIZE, SynBucket, VIP_FILTER_BITS, VipKey, VipMeta, vip_filter_bit,
};

/// `MXLB_VIPS`: (address, port, protocol) → VIP metadata. A port-0 entry marks the address
/// itself as a VIP (fragments to it are dropped, extension headers reported as such).
#[map(name = "MXLB_VIPS")]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::pinned(MAX_VIPS, 0);

/// `MXLB_VIP_SLOTS`: [`VipMeta::id`] → the `MXLB_VIPS` entry that owns it, for the
/// established fast path (conntrack hit → VIP mode and flags without a second hash lookup).
#[map(name = "MXLB_VIP_SLOTS")]
pub static VIP_SLOTS: Array<VipSlot> = Array::pinned(MAX_VIPS, 0);

/// `MXLB_VIP_FILTER`: one bit per VIP address (see [`maybe_vip`]).
#[map(name = "MXLB_VIP_FILTER")]
pub static VIP_FILTER: Array<u64> = Array::pinned(VIP_FILTER_BITS / 64, 0);

/// Whether `addr` (words in memory order) may be a VIP address: false only when its
/// `MXLB_VIP_FILTER` bit is clear, so traffic to other addresses is passed after one array
/// lookup, with no hash lookup. A missing word (cannot happen: the index is masked) counts
/// as "maybe".
#[inline(always)]
pub fn maybe_vip(addr: [u32; 4]) -> bool {
    let bit = vip_filter_bit(addr);
    match VIP_FILTER.get(bit >> 6) {
        Some(w) => *w & (1u64 << (bit & 63)) != 0,
        None => true,
    }
}

/// `MXLB_BACKENDS`: back-end id → address, MAC and state. Id 0 is never used.
#[map(name = "MXLB_BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);

/// `MXLB_RINGS`: `MAX_RINGS` Maglev tables of `RING_SIZE` back-end ids each (0 = empty slot).
#[map(name = "MXLB_RINGS")]
pub static RINGS: Array<u32> = Array::pinned(MAX_RINGS * RING_SIZE, 0);

/// `MXLB_CONNTRACK`: client → VIP flow → back-end it is pinned to (LRU, so it never fills up).
#[map(name = "MXLB_CONNTRACK")]
pub static CONNTRACK: LruHashMap<FlowKey, FlowState> =
    LruHashMap::pinned(CONNTRACK_DEFAULT_SIZE, 0);

/// `MXLB_VIP_STATS`: per-CPU counters indexed by `VipMeta::id`.
#[map(name = "MXLB_VIP_STATS")]
pub static VIP_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_VIPS, 0);

/// `MXLB_BE_STATS`: per-CPU counters indexed by back-end id.
#[map(name = "MXLB_BE_STATS")]
pub static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_BACKENDS, 0);

/// `MXLB_REASONS`: per-CPU counters indexed by [`Reason`]: one increment per decision.
#[map(name = "MXLB_REASONS")]
pub static REASON_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(REASON_SLOTS, 0);

/// `MXLB_CONFIG`: node-wide settings, a single [`LbConfig`] at index 0.
#[map(name = "MXLB_CONFIG")]
pub static CONFIG: Array<LbConfig> = Array::pinned(1, 0);

/// `MXLB_BLOCK`: source prefixes (16-byte, IPv4-mapped for IPv4) whose new flows to a VIP are
/// dropped. Keys are `lb_common::PrefixKey`; the data type here is the address as words.
#[map(name = "MXLB_BLOCK")]
pub static BLOCK: LpmTrie<[u32; 4], u32> = LpmTrie::pinned(MAX_PREFIXES, 0);

/// `MXLB_ALLOW`: source prefixes exempt from the block list and the SYN rate limit.
#[map(name = "MXLB_ALLOW")]
pub static ALLOW: LpmTrie<[u32; 4], u32> = LpmTrie::pinned(MAX_PREFIXES, 0);

/// `MXLB_GROUPS`: client-group source prefixes → the minimum VIP capacity (percent) below which
/// their new sessions are shed (longest prefix wins; no match = 0).
#[map(name = "MXLB_GROUPS")]
pub static GROUPS: LpmTrie<[u32; 4], u32> = LpmTrie::pinned(MAX_PREFIXES, 0);

/// `MXLB_SYN_BUCKET`: per-source SYN token buckets (IPv4 address, IPv6 /64), LRU.
#[map(name = "MXLB_SYN_BUCKET")]
pub static SYN_BUCKETS: LruHashMap<[u32; 4], SynBucket> =
    LruHashMap::pinned(SYN_BUCKETS_SIZE, 0);

/// `MXLB_EDGE_CFG`: SYN rate and burst per source, a single [`EdgeLimits`] at index 0.
#[map(name = "MXLB_EDGE_CFG")]
pub static EDGE_CONFIG: Array<EdgeLimits> = Array::pinned(1, 0);

/// Adds one packet of `bytes` (and `new_flows` new flows) to slot `idx` of a counter map.
#[inline(always)]
pub fn count(map: &PerCpuArray<Counters>, idx: u32, bytes: u64, new_flows: u64) {
    if let Some(c) = map.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU; pointer from a map lookup.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += new_flows;
        }
    }
}

/// Counts one decision in [`REASON_STATS`].
#[inline(always)]
pub fn count_reason(reason: Reason, bytes: u64) {
    count(&REASON_STATS, reason as u32, bytes, 0);
}
