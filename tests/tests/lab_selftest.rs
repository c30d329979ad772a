//! Self-test of the lab (no load balancer): topology, addressing, smtp-sink counting,
//! smtp-source, isolation of the VIP and cleanup. Needs root (skips without it unless CI=true).

use lab::{AddrFamily, Lab, SinkCounts, SourceOpts};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const SESSIONS: u32 = 300;

/// smtp-source from the client straight to back-end 1's own address: back-end 1's sink must
/// count exactly SESSIONS sessions and messages, the others none; afterwards nothing of the
/// lab is left.
fn direct_to_backend(fam: AddrFamily, test: &str) {
    if !lab::require_root(test) {
        return;
    }
    let t0 = Instant::now();
    let lab = Lab::builder().backends(3).build().expect("build lab");
    let prefix = lab.prefix().to_string();
    eprintln!("{test}: lab {prefix} built in {:?}", t0.elapsed());
    assert_eq!(
        lab::namespaces_with_prefix(&prefix).len(),
        6,
        "bridge, client, lb, 3 back-ends"
    );

    let target = SocketAddr::new(lab.backend(1).addr(fam), 25);
    let opts = SourceOpts {
        sessions: SESSIONS,
        concurrency: 20,
        msg_size: 2000,
        ..Default::default()
    };
    let r = lab.smtp_source(target, &opts).expect("run smtp-source");
    eprintln!(
        "{test}: {} sessions to {target} in {:?}",
        r.sessions, r.elapsed
    );
    r.assert_ok();
    assert_eq!(
        r.completed,
        u64::from(SESSIONS),
        "smtp-source's own DATA counter"
    );

    let counts = lab
        .wait_sessions(u64::from(SESSIONS), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.sink(1).logs()));
    let n = u64::from(SESSIONS);
    assert_eq!(
        counts,
        vec![
            SinkCounts {
                sessions: n,
                quits: n,
                messages: n
            },
            SinkCounts::default(),
            SinkCounts::default()
        ]
    );
    let other = if fam == AddrFamily::V4 {
        AddrFamily::V6
    } else {
        AddrFamily::V4
    };
    assert_eq!(lab.sink(1).counts_by_family(fam).sessions, n);
    assert_eq!(lab.sink(1).counts_by_family(other), SinkCounts::default());

    drop(lab);
    assert_eq!(
        lab::namespaces_with_prefix(&prefix),
        Vec::<String>::new(),
        "namespaces left behind"
    );
    eprintln!("{test}: total {:?}", t0.elapsed());
}

#[test]
fn direct_to_backend_v4_is_counted_exactly() {
    direct_to_backend(AddrFamily::V4, "direct_to_backend_v4_is_counted_exactly");
}

#[test]
fn direct_to_backend_v6_is_counted_exactly() {
    direct_to_backend(AddrFamily::V6, "direct_to_backend_v6_is_counted_exactly");
}

/// Without an LB program nobody answers for the VIP: the client's static neighbour entry sends
/// it to the LB (whose eth0 sees the SYNs), the LB has no VIP, and the back-ends neither answer
/// ARP/ND for it nor see the connection.
#[test]
fn vip_is_not_answered_without_lb() {
    if !lab::require_root("vip_is_not_answered_without_lb") {
        return;
    }
    let lab = Lab::builder().backends(2).build().expect("build lab");
    let lb = lab.lb();
    for fam in AddrFamily::ALL {
        let before = lb.ns().link_stats("eth0").unwrap();
        let t = Instant::now();
        let vip = lab.vip_addr(fam, 25);
        let connected = lab.client_can_connect(vip, Duration::from_secs(1)).unwrap();
        assert!(
            !connected,
            "{fam}: connection to the VIP {vip} succeeded without an LB"
        );
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "probe not bounded: {:?}",
            t.elapsed()
        );
        let after = lb.ns().link_stats("eth0").unwrap();
        assert!(
            after.rx_packets > before.rx_packets,
            "{fam}: the LB's eth0 saw nothing: {before:?} {after:?}"
        );
    }
    // The client resolves the VIPs to the LB's MAC (stand-in for VRRP).
    let neigh = lab
        .client()
        .ns()
        .ip(&["neigh", "show", "dev", "eth0"])
        .unwrap();
    let lb_mac = lab::mac_to_string(&lb.mac());
    for fam in AddrFamily::ALL {
        let vip = lab.vip(fam).to_string();
        assert!(
            neigh.lines().any(|l| l.starts_with(&format!("{vip} "))
                && l.contains(&lb_mac)
                && l.contains("PERMANENT")),
            "no permanent {vip} -> {lb_mac} in:\n{neigh}"
        );
    }
    // Back-ends saw no session at all.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(lab.sink_counts(), vec![SinkCounts::default(); 2]);
    // And the back-ends are reachable directly, so the failure above is about the VIP only.
    assert!(
        lab.client_can_connect(
            SocketAddr::new(lab.backend(2).addr(AddrFamily::V6), 25),
            Duration::from_secs(2)
        )
        .unwrap()
    );
}

/// Names, addresses, MTUs and offloads are what the lab documents, and nothing is in the root
/// namespace.
#[test]
fn topology_is_as_documented() {
    if !lab::require_root("topology_is_as_documented") {
        return;
    }
    let lab = Lab::builder()
        .backends(2)
        .no_sinks()
        .build()
        .expect("build lab");
    let p = lab.prefix();
    assert!(
        p.len() == 7 && p.starts_with("mx") && p[2..].chars().all(|c| c.is_ascii_hexdigit()),
        "{p}"
    );
    for ns in lab.namespaces() {
        assert!(ns.starts_with(p), "{ns}");
    }
    // No lab address and no lab link in the root namespace.
    let root_addrs = lab::run_checked(
        std::process::Command::new("ip").args(["addr"]),
        lab::CMD_TIMEOUT,
    )
    .unwrap();
    assert!(
        !root_addrs.contains("198.18.") && !root_addrs.contains("2001:db8:"),
        "lab address in root ns"
    );
    assert!(!root_addrs.contains(p), "lab link in root ns");

    assert_eq!(lab.client().addr(AddrFamily::V4).to_string(), "198.18.0.1");
    assert_eq!(lab.lb().addr(AddrFamily::V6).to_string(), "2001:db8::2");
    assert_eq!(
        lab.backend(2).addr(AddrFamily::V4).to_string(),
        "198.18.0.12"
    );
    assert_eq!(
        lab.backend(2).addr(AddrFamily::V6).to_string(),
        "2001:db8::12"
    );
    assert_eq!(lab.vip(AddrFamily::V6).to_string(), "2001:db8::100");

    let lb = lab.lb().link().unwrap();
    assert_eq!(lb.mac, lab.lb().mac());
    assert_eq!(lb.mtu, lab::PATH_MTU);
    assert_eq!(lab.client().link().unwrap().mtu, lab::CLIENT_MTU);
    assert_eq!(lab.backend(1).link().unwrap().mtu, lab::PATH_MTU);
    let port = lab.lb_peer_port().unwrap();
    assert!(port.name.len() <= 15 && port.name.starts_with(p));
    assert_eq!(port.ns.link(&port.name).unwrap().mtu, lab::PATH_MTU);

    // Offloads and sysctls.
    let k = lab.client().ns().exec(&["ethtool", "-k", "eth0"]).unwrap();
    assert!(k.contains("tx-checksumming: off"), "{k}");
    let k = port.ns.exec(&["ethtool", "-k", &port.name]).unwrap();
    assert!(k.contains("tx-checksumming: off"), "{k}");
    assert_eq!(
        lab.lb()
            .ns()
            .sysctl_get("net.ipv4.conf.eth0.forwarding")
            .unwrap(),
        "1"
    );
    assert_eq!(
        lab.lb()
            .ns()
            .sysctl_get("net.ipv6.conf.all.forwarding")
            .unwrap(),
        "1"
    );
    assert_eq!(
        lab.backend(1)
            .ns()
            .sysctl_get("net.ipv4.conf.eth0.arp_ignore")
            .unwrap(),
        "1"
    );
    assert_eq!(
        lab.backend(1)
            .ns()
            .sysctl_get("net.ipv4.conf.all.arp_announce")
            .unwrap(),
        "2"
    );
    let lo = lab
        .backend(1)
        .ns()
        .ip(&["addr", "show", "dev", "lo"])
        .unwrap();
    assert!(
        lo.contains("198.18.0.100/32") && lo.contains("2001:db8::100/128"),
        "{lo}"
    );

    // `run` and `enter` really switch namespaces, and `enter` switches back.
    let ifaces = |dev: &str| -> Vec<String> {
        dev.lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(|n| n.trim().to_string())
            .collect()
    };
    let read_dev = || std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
    let seen = ifaces(&lab.backend(1).ns().run(read_dev).unwrap());
    assert_eq!(
        seen,
        ["lo", "eth0"]
            .map(String::from)
            .to_vec()
            .into_iter()
            .filter(|n| seen.contains(n))
            .collect::<Vec<_>>()
    );
    assert!(
        seen.contains(&"eth0".to_string()) && seen.len() == 2,
        "{seen:?}"
    );
    let mine = ifaces(&read_dev());
    {
        let _g = lab.backend(1).ns().enter().unwrap();
        let mut inside = ifaces(&read_dev());
        inside.sort();
        let mut s2 = seen.clone();
        s2.sort();
        assert_eq!(inside, s2, "enter sees the same namespace as run");
    }
    assert_eq!(
        ifaces(&read_dev()),
        mine,
        "enter's guard restores the namespace"
    );
}

/// A panic while a lab is alive still removes all of it.
#[test]
fn lab_is_removed_on_panic() {
    if !lab::require_root("lab_is_removed_on_panic") {
        return;
    }
    let mut prefix = String::new();
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = Lab::builder().backends(1).build().expect("build lab");
        prefix = lab.prefix().to_string();
        assert!(!lab::namespaces_with_prefix(&prefix).is_empty());
        panic!("deliberate panic with the lab alive");
    }));
    assert!(res.is_err());
    assert!(!prefix.is_empty());
    assert_eq!(lab::namespaces_with_prefix(&prefix), Vec::<String>::new());
}

/// smtp-source failures are reported, and a run against an unanswered address is bounded.
#[test]
fn smtp_source_failures_are_reported() {
    if !lab::require_root("smtp_source_failures_are_reported") {
        return;
    }
    let lab = Lab::builder().backends(1).build().expect("build lab");
    // Nothing listens on port 2626: connection refused.
    let refused = SocketAddr::new(lab.backend(1).addr(AddrFamily::V4), 2626);
    let r = lab
        .smtp_source(
            refused,
            &SourceOpts {
                sessions: 5,
                concurrency: 1,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(!r.ok() && r.failures() > 0 && r.completed == 0, "{r:#?}");
    // The VIP without an LB: nobody answers; the run is killed at its time limit (or fails sooner).
    let t = Instant::now();
    let opts = SourceOpts {
        sessions: 5,
        concurrency: 1,
        timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let r = lab
        .smtp_source(lab.vip_addr(AddrFamily::V6, 25), &opts)
        .unwrap();
    assert!(!r.ok() && r.completed == 0, "{r:#?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(lab.sink_counts(), vec![SinkCounts::default()]);
}
