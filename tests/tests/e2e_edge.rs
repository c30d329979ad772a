//! Edge protection end to end:
//! - in the lab: a second source on the client (198.18.0.3) floods raw SYNs at the VIP far
//!   above its bucket while the normal client (198.18.0.1) runs real SMTP sessions: every
//!   normal session succeeds and the flood's excess shows as `drop_rate_limited` in
//!   `mxlb stats --json`; `mxlb block add` of the normal client makes its next connections time
//!   out at once (IPv4 and IPv6), the entries survive an agent restart, `block remove` restores
//!   service; bad CIDRs are refused and change nothing;
//! - without the lab: `edge::restore` rebuilds the maps from `state_dir/edge.json` after a
//!   "reboot" (fresh maps).
//! Needs root; skips locally otherwise, fails under CI=true.
use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use lab::{
    AddrFamily, Lab,
    flood::syn_flood,
    node::{MxlbNode, NodeOpts},
    sessions::{Progress, SessionOpts, run_sessions},
};

/// The flooding source: a secondary address of the client.
const FLOODER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const RATE: u32 = 2000;
const BURST: u32 = 2000;
/// SYNs the flood sends (bounded in count) ...
const FLOOD_SYNS: u32 = 60_000;
/// ... and in time.
const FLOOD_MAX: Duration = Duration::from_secs(10);

/// Total packets of a decision in `mxlb stats --json`.
fn reason_total(node: &MxlbNode, name: &str) -> u64 {
    let out = node.cli(&["stats", "--json", "--interval", "0.05"]).expect("stats");
    let v: serde_json::Value = serde_json::from_str(&out).expect("stats json");
    v["reasons"]
        .as_array()
        .expect("reasons")
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("reason {name} missing in {out}"))["total"]["packets"]
        .as_u64()
        .unwrap()
}

fn can_connect(lab: &Lab, fam: AddrFamily) -> bool {
    lab.client_can_connect(lab.vip_addr(fam, 25), Duration::from_secs(1)).expect("netns")
}

#[test]
fn syn_flood_and_block_list_in_the_lab() {
    if !lab::require_root("syn_flood_and_block_list_in_the_lab") {
        return;
    }
    let lab = Lab::builder().backends(2).build().expect("lab");
    let mut node = MxlbNode::start(&lab, NodeOpts::default()).expect("mxlb starts");
    lab.client().ns().ip(&["addr", "add", &format!("{FLOODER}/24"), "dev", lab.client().dev()]).expect("secondary address");
    node.cli(&["block", "rate", &RATE.to_string(), "--burst", &BURST.to_string()]).expect("block rate");
    let listing: serde_json::Value = serde_json::from_str(&node.cli(&["block", "list", "--json"]).unwrap()).unwrap();
    assert_eq!((listing["syn_rate"].as_u64(), listing["syn_burst"].as_u64()), (Some(RATE as u64), Some(BURST as u64)), "{listing}");
    assert_eq!(listing["applied"], true, "{listing}");

    // 1. Flood from 198.18.0.3 while 198.18.0.1 runs real sessions.
    let dropped_before = reason_total(&node, "drop_rate_limited");
    let vip4 = match lab.vip(AddrFamily::V4) {
        IpAddr::V4(v) => v,
        _ => unreachable!(),
    };
    let opts = SessionOpts { sessions: 400, concurrency: 2, deadline: Duration::from_secs(60), ..Default::default() };
    let progress = Progress::default();
    let (outcomes, (sent, flood_time)) = std::thread::scope(|s| {
        let load = s.spawn(|| run_sessions(lab.client().ns(), lab.vip_addr(AddrFamily::V4, 25), &opts, &progress).expect("sessions"));
        progress.wait_done(20, Duration::from_secs(20));
        let flood = lab
            .client()
            .ns()
            .run(|| syn_flood(FLOODER, vip4, FLOOD_SYNS, FLOOD_MAX))
            .expect("netns")
            .expect("raw socket flood");
        (load.join().expect("load thread"), flood)
    });
    let failed: Vec<_> = outcomes.iter().filter(|o| o.error.is_some()).collect();
    assert!(outcomes.len() >= 100, "only {} normal sessions ran", outcomes.len());
    assert!(failed.is_empty(), "normal client sessions failed during the flood: {failed:?}");
    // The flood's excess over its bucket (burst + rate × duration, one second of slack) is
    // dropped and counted.
    let admitted_max = BURST as u64 + (RATE as f64 * (flood_time.as_secs_f64() + 1.0)) as u64;
    let dropped = reason_total(&node, "drop_rate_limited") - dropped_before;
    assert!(sent as u64 > admitted_max, "the flood ({sent} SYNs in {flood_time:?}) did not exceed its bucket");
    assert!(
        dropped >= sent as u64 - admitted_max && dropped <= sent as u64,
        "{dropped} SYNs rate-limited of {sent} sent in {flood_time:?} (at most {admitted_max} admitted)"
    );
    eprintln!("flood: {sent} SYNs in {flood_time:?}, {dropped} dropped; {} normal sessions, none failed", outcomes.len());

    // 2. Block list: the normal client's address, IPv4 and IPv6.
    assert!(can_connect(&lab, AddrFamily::V4) && can_connect(&lab, AddrFamily::V6));
    let (ok, _, err) = node.cli_output(&["block", "add", "198.18.0.1/24"]).unwrap();
    assert!(!ok && err.contains("host bits set"), "{err}");
    let (ok, _, err) = node.cli_output(&["block", "add", "198.18.0.0/24", "not-a-cidr"]).unwrap();
    assert!(!ok && err.contains("not-a-cidr") && err.contains("nothing changed"), "{err}");
    let listing: serde_json::Value = serde_json::from_str(&node.cli(&["block", "list", "--json"]).unwrap()).unwrap();
    assert_eq!(listing["block"], serde_json::json!([]), "a refused command changed nothing: {listing}");

    let client4 = lab.client().addr(AddrFamily::V4).to_string();
    let client6 = lab.client().addr(AddrFamily::V6).to_string();
    let blocked_before = reason_total(&node, "drop_blocked");
    node.cli(&["block", "add", &client4, &client6]).expect("block add");
    let t = Instant::now();
    assert!(!can_connect(&lab, AddrFamily::V4), "IPv4 client still connects while blocked");
    assert!(!can_connect(&lab, AddrFamily::V6), "IPv6 client still connects while blocked");
    assert!(t.elapsed() < Duration::from_secs(4), "blocked attempts should time out at once");
    assert!(reason_total(&node, "drop_blocked") > blocked_before, "blocked SYNs counted");
    // The entries are in the pinned maps: they survive an agent restart.
    node.stop().expect("stop");
    node.launch().expect("restart");
    assert!(!can_connect(&lab, AddrFamily::V4), "block lost across an agent restart");
    let listing: serde_json::Value = serde_json::from_str(&node.cli(&["block", "list", "--json"]).unwrap()).unwrap();
    assert_eq!(listing["block"], serde_json::json!([format!("{client4}/32"), format!("{client6}/128")]), "{listing}");

    node.cli(&["block", "remove", &client4, &client6]).expect("block remove");
    assert!(can_connect(&lab, AddrFamily::V4), "IPv4 service not restored after block remove");
    assert!(can_connect(&lab, AddrFamily::V6), "IPv6 service not restored after block remove");
    let (ok, _, err) = node.cli_output(&["block", "remove", &client4]).unwrap();
    assert!(!ok && err.contains("not in the block list"), "{err}");

    // The allow list beats a block of the whole lab range.
    node.cli(&["block", "add", "198.18.0.0/15"]).unwrap();
    assert!(!can_connect(&lab, AddrFamily::V4));
    node.cli(&["block", "add", "--allow", &client4]).unwrap();
    assert!(can_connect(&lab, AddrFamily::V4), "allow list does not override the block list");
    node.cli(&["block", "remove", "198.18.0.0/15"]).unwrap();
    node.cli(&["block", "remove", "--allow", &client4]).unwrap();
    assert!(can_connect(&lab, AddrFamily::V4));
}

/// Runs `f` in a thread with private network and mount namespaces and its own bpffs.
fn isolated(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: plain syscalls on this thread; the namespaces die with it.
        unsafe {
            assert_eq!(libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS), 0);
            assert_eq!(
                libc::mount(std::ptr::null(), c"/".as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()),
                0
            );
            assert_eq!(libc::mount(c"bpf".as_ptr(), c"/sys/fs/bpf".as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()), 0);
        }
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

#[test]
fn restore_rebuilds_the_maps_after_a_reboot() {
    if !lab::require_root("restore_rebuilds_the_maps_after_a_reboot") {
        return;
    }
    isolated(|| {
        use mxlb::{edge, maps::EdgeMaps};
        let state_dir = std::env::temp_dir().join(format!("mxlb-edge-restore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state_dir);
        let pin_dir = std::path::PathBuf::from("/sys/fs/bpf/mxlb-edge");
        let mut config = mxlb::config::Config::embedded_default();
        config.node.state_dir = state_dir.clone();
        config.node.bpffs_dir = pin_dir.clone();
        let c = |s: &str| s.parse::<edge::Cidr>().unwrap();

        // CLI before any agent: only the file is written.
        {
            let mut e = edge::Edge::open(&config).unwrap();
            assert!(!e.applied());
            e.add(false, &[c("198.18.128.0/17"), c("2001:db8:bad::/48")]).unwrap();
            e.add(true, &[c("198.18.200.1")]).unwrap();
            e.set_rate(Some(edge::EdgeConfig { syn_rate: 300, syn_burst: 600 })).unwrap();
        }
        // "Boot": fresh maps; one stale entry the state does not know.
        let _balancer = mxlb::dataplane::Balancer::load(&pin_dir, 4096).expect("load");
        let mut maps = EdgeMaps::open_pinned(&pin_dir).unwrap();
        maps.insert_prefix(false, c("198.18.1.0/24").key()).unwrap();
        let report = edge::restore(&config, &mut maps).unwrap();
        assert_eq!(report, edge::SyncReport { added: 3, removed: 1 });
        let mut block: Vec<_> = maps.prefixes(false).unwrap().into_iter().filter_map(edge::Cidr::from_key).collect();
        block.sort();
        assert_eq!(block, vec![c("198.18.128.0/17"), c("2001:db8:bad::/48")]);
        let allow: Vec<_> = maps.prefixes(true).unwrap().into_iter().filter_map(edge::Cidr::from_key).collect();
        assert_eq!(allow, vec![c("198.18.200.1/32")]);
        assert_eq!(maps.limits().unwrap(), lb_common::EdgeLimits { syn_rate: 300, syn_burst: 600 });
        // Idempotent.
        assert_eq!(edge::restore(&config, &mut maps).unwrap(), edge::SyncReport::default());
        // With maps pinned, the CLI writes them directly; `rate --reset` returns to the config
        // (off by default).
        {
            let mut e = edge::Edge::open(&config).unwrap();
            assert!(e.applied());
            e.remove(false, &[c("2001:db8:bad::/48")]).unwrap();
            e.set_rate(None).unwrap();
        }
        assert_eq!(maps.prefixes(false).unwrap().len(), 1);
        assert_eq!(maps.limits().unwrap(), lb_common::EdgeLimits::default());
        let _ = std::fs::remove_dir_all(&state_dir);
    });
}
