//! The agent's map writer against the real eBPF object: what `mxlb run` and the CLI write is
//! what the data path reads (rings, back-end states, VIP entries), tables switch atomically
//! between the two rings of a VIP, and pinned maps (conntrack included) survive a restart.
//! Needs root (BPF); skips locally otherwise, fails under CI=true.
use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use lb_common::{FlowKey, FlowState, LbConfig, RING_SIZE, VipKey, VipSlot, addr_to_key, port_to_key, state};
use mxlb::{
    config::Config,
    dataplane::Balancer,
    desired::{Change, Desired, Health, plan},
    maglev::{self, Member},
    maps::DataplaneMaps,
};

/// A bpffs directory for one test, removed on drop (also when the test fails).
struct PinDir(PathBuf);

impl PinDir {
    fn new(name: &str) -> PinDir {
        let dir = PathBuf::from(format!("/sys/fs/bpf/mxlb-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        PinDir(dir)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn macs() -> BTreeMap<IpAddr, [u8; 6]> {
    (11..=13u8).map(|i| (IpAddr::from([198, 18, 0, i]), [2, 0, 0, 0, 0, i])).collect()
}

fn vip_ring(snap: &mxlb::maps::Snapshot, addr: &str, port: u16) -> u32 {
    let key = addr_to_key(addr.parse().unwrap());
    snap.vips.iter().find(|(k, _)| k.addr == key && k.port == port_to_key(port)).expect("VIP entry").1.ring
}

fn expected_table(desired: &Desired, snap: &mxlb::maps::Snapshot, vip: &str) -> Vec<u32> {
    let v = desired.config.vip(vip).unwrap();
    let members: Vec<Member> = v
        .backends
        .iter()
        .map(|n| desired.config.backend(n).unwrap())
        .filter(|b| !desired.drained.contains(&b.name))
        .map(|b| {
            let id = *snap.backends.iter().find(|(_, e)| e.addr == addr_to_key(b.address)).unwrap().0;
            Member { id, address: b.address, weight: b.weight }
        })
        .collect();
    maglev::build(&members, RING_SIZE)
}

fn conntrack(dir: &PinDir) -> BpfHashMap<MapData, FlowKey, FlowState> {
    let data = MapData::from_pin(dir.0.join(lb_common::MAP_CONNTRACK)).unwrap();
    BpfHashMap::try_from(Map::from_map_data(data).unwrap()).unwrap()
}

/// The fast-path copies of the VIP table agree with it: every VIP:port entry sits in the
/// `MXLB_VIP_SLOTS` slot of its id and every other slot is empty; every VIP address has its
/// `MXLB_VIP_FILTER` bit and no other bit is set.
#[track_caller]
fn assert_fast_path_tables_match(dir: &PinDir, snap: &mxlb::maps::Snapshot) {
    let open = |name: &str| Map::from_map_data(MapData::from_pin(dir.0.join(name)).unwrap()).unwrap();
    let slots: Array<MapData, VipSlot> = Array::try_from(open(lb_common::MAP_VIP_SLOTS)).unwrap();
    let filter: Array<MapData, u64> = Array::try_from(open(lb_common::MAP_VIP_FILTER)).unwrap();
    let owned: BTreeMap<u32, VipSlot> =
        snap.vips.iter().filter(|(k, _)| k.port != 0).map(|(k, m)| (m.id, VipSlot { key: *k, meta: *m })).collect();
    for id in 0..lb_common::MAX_VIPS {
        let slot = slots.get(&id, 0).unwrap();
        match owned.get(&id) {
            Some(want) => assert_eq!(&slot, want, "slot {id}"),
            None => assert_eq!(slot, VipSlot::EMPTY, "slot {id} should be empty"),
        }
    }
    let mut bits = std::collections::BTreeSet::new();
    for (k, _) in &snap.vips {
        bits.insert(lb_common::vip_filter_bit_of(&k.addr));
    }
    for word in 0..lb_common::VIP_FILTER_BITS / 64 {
        let want = bits.iter().filter(|b| *b >> 6 == word).fold(0u64, |w, b| w | 1 << (b & 63));
        assert_eq!(filter.get(&word, 0).unwrap(), want, "filter word {word}");
    }
}

fn flow(port: u16) -> FlowKey {
    FlowKey {
        src: addr_to_key("198.18.0.1".parse().unwrap()),
        dst: addr_to_key("198.18.0.100".parse().unwrap()),
        sport: port_to_key(port),
        dport: port_to_key(25),
        proto: 6,
        _pad: [0; 3],
    }
}

#[test]
fn applied_plan_is_what_the_data_path_reads_and_survives_restart() {
    if !lab::require_root("applied_plan_is_what_the_data_path_reads_and_survives_restart") {
        return;
    }
    let dir = PinDir::new("apply");
    let balancer = Balancer::load(&dir.0, 65536).expect("load balancer");
    let mut maps = DataplaneMaps::open_pinned(&dir.0).unwrap();
    let mut desired = Desired::new(Config::embedded_default());
    let health = BTreeMap::new();
    let encap = LbConfig { src_v4: [198, 18, 0, 2], src_v6: [0; 16] };

    // First apply: every back-end, VIP port and ring written.
    let r = maps.apply(&plan(&desired, &health, &BTreeMap::new(), &macs(), encap, &Default::default())).unwrap();
    assert_eq!(r.rings_switched, 2, "one table per VIP: {r:?}");
    let snap = maps.snapshot().unwrap();
    assert_eq!(snap.backends.len(), 3);
    assert!(snap.backends.values().all(|b| b.state == state::UP));
    for (_, b) in &snap.backends {
        let ip = lb_common::addr_from_key(b.addr);
        assert_eq!(b.mac, macs()[&ip], "MAC written for {ip}");
    }
    // 2 ports + the address marker per VIP.
    assert_eq!(snap.vips.len(), 6);
    let ring = vip_ring(&snap, "198.18.0.100", 25);
    assert_eq!(ring, vip_ring(&snap, "198.18.0.100", 587), "ports of one VIP share its ring");
    assert_ne!(ring / 2, vip_ring(&snap, "2001:db8::100", 25) / 2, "VIPs own distinct ring pairs");
    assert_eq!(maps.read_ring(ring).unwrap(), expected_table(&desired, &snap, "mx"));
    assert_fast_path_tables_match(&dir, &snap);

    // Idempotent: nothing is rewritten or switched.
    let r = maps.apply(&plan(&desired, &health, &BTreeMap::new(), &macs(), encap, &Default::default())).unwrap();
    assert_eq!((r.ring_slots_written, r.rings_switched), (0, 0), "{r:?}");

    // A weight change is written to the idle ring, then the VIP switches to it.
    desired.apply(&Change::Weight { name: "mail1".into(), weight: 600 }).unwrap();
    let r = maps.apply(&plan(&desired, &health, &BTreeMap::new(), &macs(), encap, &Default::default())).unwrap();
    assert_eq!(r.rings_switched, 2);
    let snap = maps.snapshot().unwrap();
    let new_ring = vip_ring(&snap, "198.18.0.100", 25);
    assert_eq!(new_ring, ring ^ 1, "switched to the other ring of the pair");
    assert_eq!(maps.read_ring(new_ring).unwrap(), expected_table(&desired, &snap, "mx"));
    assert_fast_path_tables_match(&dir, &snap);

    // Drain: state DRAINING and no slots; down (health): state DOWN.
    desired.apply(&Change::Drain { name: "mail2".into() }).unwrap();
    let down = BTreeMap::from([("mail3".to_string(), Health::Down)]);
    maps.apply(&plan(&desired, &down, &BTreeMap::new(), &macs(), encap, &Default::default())).unwrap();
    let snap = maps.snapshot().unwrap();
    let by_addr = |a: &str| *snap.backends.iter().find(|(_, b)| b.addr == addr_to_key(a.parse().unwrap())).unwrap().0;
    let (id1, id2, id3) = (by_addr("198.18.0.11"), by_addr("198.18.0.12"), by_addr("198.18.0.13"));
    assert_eq!(snap.backends[&id2].state, state::DRAINING);
    assert_eq!(snap.backends[&id3].state, state::DOWN);
    let table = maps.read_ring(vip_ring(&snap, "198.18.0.100", 25)).unwrap();
    assert!(table.iter().all(|&id| id == id1), "only mail1 takes new flows");

    // Removing a back-end frees its slot and flushes its flows, keeping others' flows.
    let mut ct = conntrack(&dir);
    ct.insert(flow(40001), FlowState { backend: id3, vip: 1 }, 0).unwrap();
    ct.insert(flow(40002), FlowState { backend: id1, vip: 1 }, 0).unwrap();
    desired.apply(&Change::BackendRemove { name: "mail3".into() }).unwrap();
    let r = maps.apply(&plan(&desired, &health, &BTreeMap::new(), &macs(), encap, &Default::default())).unwrap();
    assert_eq!((r.backends_removed, r.flows_flushed), (1, 1), "{r:?}");
    assert!(ct.get(&flow(40001), 0).is_err(), "flow of the removed back-end is gone");
    assert_eq!(ct.get(&flow(40002), 0).unwrap().backend, id1);
    assert!(!maps.snapshot().unwrap().backends.contains_key(&id3));

    // A VIP on VRRP standby keeps its ports' entries (ids, rings) with the STANDBY flag and
    // loses its address marker; back to active, both return.
    let standby: std::collections::BTreeSet<String> = ["mx".to_string()].into();
    let r = maps.apply(&plan(&desired, &health, &BTreeMap::new(), &macs(), encap, &standby)).unwrap();
    assert_eq!((r.ring_slots_written, r.rings_switched), (0, 0), "a hand-over does not touch the tables: {r:?}");
    let snap = maps.snapshot().unwrap();
    let mx = |snap: &mxlb::maps::Snapshot| -> Vec<(u16, u8)> {
        let addr = addr_to_key("198.18.0.100".parse().unwrap());
        snap.vips.iter().filter(|(k, _)| k.addr == addr).map(|(k, m)| (u16::from_be(k.port), m.flags & lb_common::vip_flags::STANDBY)).collect()
    };
    let mut got = mx(&snap);
    got.sort();
    assert_eq!(got, [(25, lb_common::vip_flags::STANDBY), (587, lb_common::vip_flags::STANDBY)], "ports on standby, no marker");
    assert_fast_path_tables_match(&dir, &snap);
    maps.apply(&plan(&desired, &health, &BTreeMap::new(), &macs(), encap, &Default::default())).unwrap();
    let mut got = mx(&maps.snapshot().unwrap());
    got.sort();
    assert_eq!(got, [(0, 0), (25, 0), (587, 0)], "active again, marker back");

    // Removing a VIP removes its entries.
    desired.apply(&Change::VipRemove { name: "mx6".into() }).unwrap();
    let r = maps.apply(&plan(&desired, &health, &BTreeMap::new(), &macs(), encap, &Default::default())).unwrap();
    assert_eq!(r.vip_entries_removed, 3);
    assert_fast_path_tables_match(&dir, &maps.snapshot().unwrap());

    // Restart: a new load reuses the pinned maps (conntrack and VIPs are still there).
    drop(maps);
    drop(balancer);
    let _balancer = Balancer::load(&dir.0, 65536).expect("reload balancer");
    let maps = DataplaneMaps::open_pinned(&dir.0).unwrap();
    assert_eq!(conntrack(&dir).get(&flow(40002), 0).unwrap().backend, id1, "conntrack survived");
    let snap = maps.snapshot().unwrap();
    assert_eq!(snap.vips.len(), 3);
    assert!(snap.vips.iter().any(|(k, _)| *k == VipKey { addr: addr_to_key("198.18.0.100".parse().unwrap()), port: port_to_key(25), proto: 6, _pad: 0 }));
}
