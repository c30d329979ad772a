//! The one writer of the data path's maps (architecture principle 1).
//!
//! [`DataplaneMaps::apply`] takes a [`Plan`] and makes the pinned maps match it. Allocation
//! state (which back-end id an address has, which Maglev ring pair a VIP owns, which stats
//! slot a VIP port uses) is read back from the maps themselves, not kept in a side file: the
//! maps are pinned, so they are the one record that is always in step with what the data path
//! sees, whether the agent or the CLI wrote last.
//!
//! Atomicity: a VIP owns two rings; a new table is written into the idle one and only then is
//! the VIP entry (one hash-map update, atomic for the data path) switched to it.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    os::fd::AsFd as _,
    path::Path,
};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray};
use lb_common::{
    Backend, Counters, FlowKey, FlowState, LbConfig, MAX_BACKENDS, MAX_RINGS, MAX_VIPS, RING_SIZE, VipKey, VipMeta,
    VipSlot,
    addr_from_key, addr_to_key, port_to_key, state,
};

use crate::{
    config::ForwardingMode,
    desired::Plan,
    maglev::{self, Member},
};

const TCP: u8 = 6;

/// Errors talking to the pinned maps.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("cannot open pinned map {path}: {source} (is `mxlb run` started, or the bpffs dir right?)")]
    Open {
        path: String,
        #[source]
        source: MapError,
    },
    #[error("map {map}: {source}")]
    Access {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("no free {0} left")]
    Full(&'static str),
}

fn access(map: &'static str) -> impl Fn(MapError) -> MapsError {
    move |source| MapsError::Access { map, source }
}

/// Handles on every map the data path uses.
pub struct DataplaneMaps {
    vips: BpfHashMap<MapData, VipKey, VipMeta>,
    /// `MXLB_VIP_SLOTS`: each VIP entry again under its id (the established fast path).
    vip_slots: Array<MapData, VipSlot>,
    /// `MXLB_VIP_FILTER`: one bit per VIP address (transit traffic skips the hash lookups).
    vip_filter: Array<MapData, u64>,
    backends: Array<MapData, Backend>,
    rings: Array<MapData, u32>,
    /// A second handle on the rings for batch writes ([`update_batch`]).
    rings_raw: MapData,
    /// Client-group prefixes → minimum capacity (percent).
    groups: aya::maps::LpmTrie<MapData, [u8; 16], u32>,
    conntrack: BpfHashMap<MapData, FlowKey, FlowState>,
    vip_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    reasons: PerCpuArray<MapData, Counters>,
    config: Array<MapData, LbConfig>,
    /// What this process knows each ring holds, so a rebuild writes only the slots that differ
    /// (Maglev changes few slots per change). Empty after start: the first write is complete.
    ring_cache: HashMap<u32, Vec<u32>>,
    /// The members each cached ring was built from: a plan that changes nothing about a VIP's
    /// pool (a VRRP hand-over, another VIP's health) skips the table build (~1 ms per VIP).
    ring_members: HashMap<u32, Vec<Member>>,
}

/// The data path's state as read back from the maps.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Back-end id → entry.
    pub backends: BTreeMap<u32, Backend>,
    pub vips: Vec<(VipKey, VipMeta)>,
}

/// What [`DataplaneMaps::apply`] did (for logs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub ring_slots_written: usize,
    pub rings_switched: usize,
    pub vip_entries_removed: usize,
    pub backends_removed: usize,
    pub flows_flushed: usize,
}

/// Opens the map pinned as `dir/name` as a typed map.
fn open<T: TryFrom<Map, Error = MapError>>(dir: &Path, name: &str) -> Result<T, MapsError> {
    let path = dir.join(name);
    let err = |source| MapsError::Open { path: path.display().to_string(), source };
    let data = MapData::from_pin(&path).map_err(err)?;
    let map = Map::from_map_data(data).map_err(err)?;
    T::try_from(map).map_err(err)
}

impl DataplaneMaps {
    /// Opens the maps pinned under `dir` (by `mxlb run`).
    pub fn open_pinned(dir: &Path) -> Result<DataplaneMaps, MapsError> {
        Ok(DataplaneMaps {
            vips: open(dir, lb_common::MAP_VIPS)?,
            vip_slots: open(dir, lb_common::MAP_VIP_SLOTS)?,
            vip_filter: open(dir, lb_common::MAP_VIP_FILTER)?,
            backends: open(dir, lb_common::MAP_BACKENDS)?,
            rings: open(dir, lb_common::MAP_RINGS)?,
            rings_raw: {
                let path = dir.join(lb_common::MAP_RINGS);
                MapData::from_pin(&path).map_err(|source| MapsError::Open { path: path.display().to_string(), source })?
            },
            groups: open(dir, lb_common::MAP_GROUPS)?,
            conntrack: open(dir, lb_common::MAP_CONNTRACK)?,
            vip_stats: open(dir, lb_common::MAP_VIP_STATS)?,
            backend_stats: open(dir, lb_common::MAP_BACKEND_STATS)?,
            reasons: open(dir, lb_common::MAP_REASON_STATS)?,
            config: open(dir, lb_common::MAP_CONFIG)?,
            ring_cache: HashMap::new(),
            ring_members: HashMap::new(),
        })
    }

    /// Whether maps are pinned under `dir`.
    pub fn pinned_in(dir: &Path) -> bool {
        dir.join(lb_common::MAP_VIPS).exists()
    }

    /// Makes the filter words that hold a bit of any of `touched` carry exactly the bits of
    /// `keep` (other words hold no VIP address and stay as they are).
    fn write_filter(&mut self, touched: impl Iterator<Item = [u8; 16]>, keep: impl Iterator<Item = [u8; 16]>) -> Result<(), MapsError> {
        let mut words: BTreeMap<u32, u64> = touched.map(|a| (lb_common::vip_filter_bit_of(&a) >> 6, 0)).collect();
        for bit in keep.map(|a| lb_common::vip_filter_bit_of(&a)) {
            *words.entry(bit >> 6).or_default() |= 1 << (bit & 63);
        }
        for (index, word) in words {
            if self.vip_filter.get(&index, 0).map_err(access("vip filter"))? != word {
                self.vip_filter.set(index, word, 0).map_err(access("vip filter"))?;
            }
        }
        Ok(())
    }

    /// Reads back back-ends and VIP entries.
    pub fn snapshot(&self) -> Result<Snapshot, MapsError> {
        let mut snap = Snapshot::default();
        for id in 1..MAX_BACKENDS {
            let b = self.backends.get(&id, 0).map_err(access("backends"))?;
            if b.state != state::UNUSED {
                snap.backends.insert(id, b);
            }
        }
        for entry in self.vips.iter() {
            snap.vips.push(entry.map_err(access("vips"))?);
        }
        snap.vips.sort_by_key(|(k, _)| (k.addr, u16::from_be(k.port)));
        Ok(snap)
    }

    /// Makes the maps match `plan`. Idempotent: applying the same plan twice writes nothing
    /// the second time (beyond reads).
    pub fn apply(&mut self, plan: &Plan) -> Result<ApplyReport, MapsError> {
        let mut report = ApplyReport::default();
        let snap = self.snapshot()?;

        // 1. Back-ends: keep ids by address, free the ones no longer planned (and forget
        //    their flows, so a reused id never inherits another server's connections).
        let planned: BTreeSet<IpAddr> = plan.backends.iter().map(|b| b.address).collect();
        let mut ids: HashMap<IpAddr, u32> = HashMap::new();
        let mut removed = BTreeSet::new();
        for (id, b) in &snap.backends {
            let addr = addr_from_key(b.addr);
            if planned.contains(&addr) {
                ids.insert(addr, *id);
            } else {
                removed.insert(*id);
            }
        }
        for id in &removed {
            self.backends.set(*id, unused_backend(), 0).map_err(access("backends"))?;
        }
        report.backends_removed = removed.len();
        if !removed.is_empty() {
            report.flows_flushed = self.flush_flows(|s| removed.contains(&s.backend))?;
        }
        let taken: BTreeSet<u32> = ids.values().copied().collect();
        let mut free_ids = (1..MAX_BACKENDS).filter(|id| !taken.contains(id));
        for b in &plan.backends {
            let id = match ids.get(&b.address) {
                Some(id) => *id,
                None => {
                    let id = free_ids.next().ok_or(MapsError::Full("back-end slots"))?;
                    ids.insert(b.address, id);
                    id
                }
            };
            let entry = Backend { addr: addr_to_key(b.address), mac: b.mac, state: b.state, _pad: 0 };
            if snap.backends.get(&id) != Some(&entry) {
                self.backends.set(id, entry, 0).map_err(access("backends"))?;
            }
        }

        // 2. VIPs: rings and entries.
        let mut wanted: HashMap<VipKey, VipMeta> = HashMap::new();
        let existing: HashMap<VipKey, VipMeta> = snap.vips.iter().copied().collect();
        let mut used_ids: BTreeSet<u32> = existing.values().map(|m| m.id).collect();
        let mut used_pairs: BTreeSet<u32> = existing
            .values()
            .filter(|m| m.mode != lb_common::mode::LOCAL)
            .map(|m| m.ring / 2)
            .collect();
        let weights: HashMap<&str, (u32, IpAddr)> =
            plan.backends.iter().map(|b| (b.name.as_str(), (b.weight, b.address))).collect();
        for vip in &plan.vips {
            let addr = addr_to_key(vip.address);
            let current = existing.iter().find(|(k, m)| k.addr == addr && m.mode != lb_common::mode::LOCAL);
            let ring = if vip.mode == ForwardingMode::Local {
                0
            } else {
                let members: Vec<Member> = vip
                    .members
                    .iter()
                    .filter_map(|n| weights.get(n.as_str()))
                    .map(|(weight, address)| Member { id: ids[address], address: *address, weight: *weight })
                    .collect();
                let active = current.map(|(_, m)| m.ring);
                let unchanged_pool = active.is_some_and(|r| self.ring_members.get(&r) == Some(&members) && self.ring_cache.contains_key(&r));
                let table = if unchanged_pool { Vec::new() } else { maglev::build(&members, RING_SIZE) };
                match active {
                    // Same pool as the active ring was built from: nothing to build or switch.
                    Some(active) if unchanged_pool => active,
                    // Unchanged table (known from this process's cache): no switch needed.
                    Some(active) if self.ring_cache.get(&active) == Some(&table) => {
                        self.ring_members.insert(active, members);
                        active
                    }
                    Some(active) => {
                        let idle = active ^ 1;
                        report.ring_slots_written += self.write_ring(idle, table)?;
                        report.rings_switched += 1;
                        self.ring_members.insert(idle, members);
                        idle
                    }
                    None => {
                        let pair = (0..MAX_RINGS / 2)
                            .find(|p| !used_pairs.contains(p))
                            .ok_or(MapsError::Full("Maglev rings"))?;
                        used_pairs.insert(pair);
                        report.ring_slots_written += self.write_ring(pair * 2, table)?;
                        report.rings_switched += 1;
                        self.ring_members.insert(pair * 2, members);
                        pair * 2
                    }
                }
            };
            let mode = vip.mode.to_map();
            // Port 0 marks the address itself (fragments to it are dropped); stats id 0 is
            // reserved for these markers.
            // A standby VIP (another node is VRRP master) has no marker: nothing about the
            // address is decided here.
            let marker = VipKey { addr, port: 0, proto: TCP, _pad: 0 };
            if !vip.standby {
                wanted.insert(marker, VipMeta { id: 0, ring, mode, flags: 0, capacity: 100, _pad: 0 });
            }
            for port in &vip.ports {
                let key = VipKey { addr, port: port_to_key(*port), proto: TCP, _pad: 0 };
                let id = match existing.get(&key) {
                    Some(m) if m.id != 0 => m.id,
                    _ => {
                        let id = (1..MAX_VIPS).find(|i| !used_ids.contains(i)).ok_or(MapsError::Full("VIP slots"))?;
                        used_ids.insert(id);
                        id
                    }
                };
                let mut flags = if vip.shed { lb_common::vip_flags::SHED } else { 0 };
                if vip.standby {
                    flags |= lb_common::vip_flags::STANDBY;
                }
                wanted.insert(key, VipMeta { id, ring, mode, flags, capacity: vip.capacity, _pad: 0 });
            }
        }
        // The slots follow the entries: a slot is filled after its entry exists (only flows
        // that entry admitted can reach it) and emptied before its entry goes, so the fast
        // path never outlives the VIP.
        let slots: HashMap<u32, VipSlot> = wanted
            .iter()
            .filter(|(_, m)| m.id != 0)
            .map(|(key, meta)| (meta.id, VipSlot { key: *key, meta: *meta }))
            .collect();
        // The filter must let every VIP address through before its entries exist and may
        // forget an address only after they are gone: old and new addresses first, the new
        // ones alone at the end.
        let old_and_new = existing.keys().chain(wanted.keys()).map(|k| k.addr);
        self.write_filter(old_and_new.clone(), old_and_new)?;
        for (key, meta) in &wanted {
            if existing.get(key) != Some(meta) {
                self.vips.insert(key, meta, 0).map_err(access("vips"))?;
            }
        }
        let slot_ids: BTreeSet<u32> = existing.values().chain(wanted.values()).map(|m| m.id).filter(|id| *id != 0).collect();
        for id in slot_ids {
            let slot = slots.get(&id).copied().unwrap_or(VipSlot::EMPTY);
            if self.vip_slots.get(&id, 0).map_err(access("vip slots"))? != slot {
                self.vip_slots.set(id, slot, 0).map_err(access("vip slots"))?;
            }
        }
        for key in existing.keys().filter(|k| !wanted.contains_key(k)) {
            self.vips.remove(key).map_err(access("vips"))?;
            report.vip_entries_removed += 1;
        }
        self.write_filter(existing.keys().chain(wanted.keys()).map(|k| k.addr), wanted.keys().map(|k| k.addr))?;

        // 3. Client groups.
        let wanted_groups: HashMap<([u8; 16], u32), u32> =
            plan.groups.iter().map(|(k, min)| ((k.addr, k.prefix_len), *min)).collect();
        let present: Vec<aya::maps::lpm_trie::Key<[u8; 16]>> = self.groups.keys().filter_map(|k| k.ok()).collect();
        for k in present {
            if !wanted_groups.contains_key(&(k.data(), k.prefix_len())) {
                self.groups.remove(&k).map_err(access("groups"))?;
            }
        }
        for ((addr, len), min) in &wanted_groups {
            let k = aya::maps::lpm_trie::Key::new(*len, *addr);
            if self.groups.get(&k, 0).ok() != Some(*min) {
                self.groups.insert(&k, *min, 0).map_err(access("groups"))?;
            }
        }

        // 4. Node settings.
        if self.config.get(&0, 0).map_err(access("config"))? != plan.encap {
            self.config.set(0, plan.encap, 0).map_err(access("config"))?;
        }
        Ok(report)
    }

    /// Writes a ring, skipping slots known to hold the right value already, in one batch.
    fn write_ring(&mut self, ring: u32, table: Vec<u32>) -> Result<usize, MapsError> {
        let base = ring * RING_SIZE;
        let old = self.ring_cache.remove(&ring);
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for (slot, id) in table.iter().enumerate() {
            if old.as_ref().is_some_and(|o| o[slot] == *id) {
                continue;
            }
            keys.push(base + slot as u32);
            values.push(*id);
        }
        if update_batch(self.rings_raw.fd().as_fd(), &keys, &values).is_err() {
            // A kernel without batch operations (before 5.6): one update per slot.
            for (k, v) in keys.iter().zip(&values) {
                self.rings.set(*k, *v, 0).map_err(access("rings"))?;
            }
        }
        self.ring_cache.insert(ring, table);
        Ok(keys.len())
    }

    /// Reads one ring (for tests and diagnostics).
    pub fn read_ring(&self, ring: u32) -> Result<Vec<u32>, MapsError> {
        (0..RING_SIZE).map(|s| self.rings.get(&(ring * RING_SIZE + s), 0).map_err(access("rings"))).collect()
    }

    /// Removes the conntrack entries for which `pred` holds; returns how many.
    pub fn flush_flows(&mut self, pred: impl Fn(&FlowState) -> bool) -> Result<usize, MapsError> {
        let doomed: Vec<FlowKey> = self
            .conntrack
            .iter()
            .filter_map(|e| e.ok())
            .filter(|(_, s)| pred(s))
            .map(|(k, _)| k)
            .collect();
        for k in &doomed {
            // An entry may have been evicted meanwhile (LRU): not an error.
            let _ = self.conntrack.remove(k);
        }
        Ok(doomed.len())
    }

    /// Number of tracked flows (walks the LRU map).
    pub fn flow_count(&self) -> usize {
        self.conntrack.keys().filter(|k| k.is_ok()).count()
    }

    /// Tracked flows pinned to back-end `id`.
    pub fn flows_to(&self, id: u32) -> usize {
        self.conntrack.iter().filter_map(|e| e.ok()).filter(|(_, s)| s.backend == id).count()
    }

    fn sum(map: &PerCpuArray<MapData, Counters>, index: u32, name: &'static str) -> Result<Counters, MapsError> {
        let per_cpu = map.get(&index, 0).map_err(access(name))?;
        let mut total = Counters::default();
        for c in per_cpu.iter() {
            total += *c;
        }
        Ok(total)
    }

    /// Counters of a VIP entry (by [`VipMeta::id`]), summed over CPUs.
    pub fn vip_counters(&self, id: u32) -> Result<Counters, MapsError> {
        Self::sum(&self.vip_stats, id, "vip_stats")
    }

    /// Counters of a back-end id, summed over CPUs.
    pub fn backend_counters(&self, id: u32) -> Result<Counters, MapsError> {
        Self::sum(&self.backend_stats, id, "backend_stats")
    }

    /// Counters per data-path decision, summed over CPUs.
    pub fn reason_counters(&self) -> Result<Vec<(lb_common::Reason, Counters)>, MapsError> {
        lb_common::Reason::ALL
            .iter()
            .map(|r| Ok((*r, Self::sum(&self.reasons, *r as u32, "reasons")?)))
            .collect()
    }
}

/// `BPF_MAP_UPDATE_BATCH` on an array of `u32`: many slots in one syscall.
///
/// Written by hand because aya 0.14 exposes no batch operations, and a Maglev table written one
/// `bpf(BPF_MAP_UPDATE_ELEM)` at a time costs ~50 ms (65537 syscalls), which would put a
/// CLI change without an agent, or an agent's first table, over the 100 ms an operator expects.
fn update_batch(fd: std::os::fd::BorrowedFd<'_>, keys: &[u32], values: &[u32]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    /// `union bpf_attr`'s `batch` member (include/uapi/linux/bpf.h).
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    assert_eq!(keys.len(), values.len());
    let mut done = 0;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: (keys.len() - done) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: attr points at key/value arrays that outlive the call; the kernel reads
        // `count` elements of each and writes back how many it processed.
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_UPDATE_BATCH, &mut attr as *mut BatchAttr, std::mem::size_of::<BatchAttr>())
        };
        if rc < 0 && attr.count == 0 {
            return Err(std::io::Error::last_os_error());
        }
        done += attr.count as usize;
    }
    Ok(())
}

fn unused_backend() -> Backend {
    Backend { addr: [0; 16], mac: [0; 6], state: state::UNUSED, _pad: 0 }
}

/// Handles on the edge-protection maps (block list, allow list, SYN buckets, limits).
///
/// Separate from [`DataplaneMaps`] on purpose: these maps do not depend on the back-end plan,
/// and their one writer is [`crate::edge`] (the CLI and `edge::restore`), whether the agent
/// runs or not.
pub struct EdgeMaps {
    block: aya::maps::LpmTrie<MapData, [u8; 16], u32>,
    allow: aya::maps::LpmTrie<MapData, [u8; 16], u32>,
    buckets: BpfHashMap<MapData, [u8; 16], lb_common::SynBucket>,
    limits: Array<MapData, lb_common::EdgeLimits>,
}

impl EdgeMaps {
    /// Opens the edge maps pinned under `dir` (by `mxlb run`).
    pub fn open_pinned(dir: &Path) -> Result<EdgeMaps, MapsError> {
        Ok(EdgeMaps {
            block: open(dir, lb_common::MAP_BLOCK)?,
            allow: open(dir, lb_common::MAP_ALLOW)?,
            buckets: open(dir, lb_common::MAP_SYN_BUCKETS)?,
            limits: open(dir, lb_common::MAP_EDGE_CONFIG)?,
        })
    }

    /// Whether the edge maps are pinned under `dir` (an agent of this version has run).
    pub fn pinned_in(dir: &Path) -> bool {
        dir.join(lb_common::MAP_BLOCK).exists()
    }

    fn list(&self, allow: bool) -> &aya::maps::LpmTrie<MapData, [u8; 16], u32> {
        if allow { &self.allow } else { &self.block }
    }

    /// The prefixes in the block list (`allow` false) or the allow list, unsorted.
    pub fn prefixes(&self, allow: bool) -> Result<Vec<lb_common::PrefixKey>, MapsError> {
        let name = if allow { "allow" } else { "block" };
        self.list(allow)
            .keys()
            .map(|k| {
                let k = k.map_err(access(name))?;
                Ok(lb_common::PrefixKey { prefix_len: k.prefix_len(), addr: k.data() })
            })
            .collect()
    }

    /// Adds a prefix (no-op if present).
    pub fn insert_prefix(&mut self, allow: bool, key: lb_common::PrefixKey) -> Result<(), MapsError> {
        let k = aya::maps::lpm_trie::Key::new(key.prefix_len, key.addr);
        if allow {
            self.allow.insert(&k, 1, 0).map_err(access("allow"))
        } else {
            self.block.insert(&k, 1, 0).map_err(access("block"))
        }
    }

    /// Removes a prefix; returns whether it was there.
    pub fn remove_prefix(&mut self, allow: bool, key: lb_common::PrefixKey) -> Result<bool, MapsError> {
        let k = aya::maps::lpm_trie::Key::new(key.prefix_len, key.addr);
        let r = if allow { self.allow.remove(&k) } else { self.block.remove(&k) };
        match r {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(MapsError::Access { map: "edge prefixes", source: e }),
        }
    }

    /// The SYN rate and burst the data path uses now.
    pub fn limits(&self) -> Result<lb_common::EdgeLimits, MapsError> {
        self.limits.get(&0, 0).map_err(access("edge config"))
    }

    /// Sets the SYN rate and burst (burst or rate 0 = limiting off).
    pub fn set_limits(&mut self, limits: lb_common::EdgeLimits) -> Result<(), MapsError> {
        self.limits.set(0, limits, 0).map_err(access("edge config"))
    }

    /// The bucket of a source key (IPv4-mapped address, or IPv6 /64 with the low half zero).
    pub fn bucket(&self, key: [u8; 16]) -> Option<lb_common::SynBucket> {
        self.buckets.get(&key, 0).ok()
    }

    /// Overwrites a bucket (tests: age its timestamp instead of sleeping).
    pub fn set_bucket(&mut self, key: [u8; 16], bucket: lb_common::SynBucket) -> Result<(), MapsError> {
        self.buckets.insert(key, bucket, 0).map_err(access("syn buckets"))
    }

    /// Number of sources with a bucket (walks the LRU map).
    pub fn bucket_count(&self) -> usize {
        self.buckets.keys().filter(|k| k.is_ok()).count()
    }
}
