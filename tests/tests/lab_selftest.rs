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
    // The bridge forwards like a switch: no host iptables on bridged frames (the keys exist
    // only where the host has br_netfilter loaded, as this kind of machine does).
    for family in ["iptables", "ip6tables", "arptables"] {
        let key = format!("net.bridge.bridge-nf-call-{family}");
        if let Ok(v) = lab.bridge_ns().sysctl_get(&key) {
            assert_eq!(v, "0", "{key} in the bridge namespace");
        }
    }

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

/// Three LB nodes: names, addresses, MACs, ports, sysctls and offloads as documented, each LB
/// answers the client's ping on both families, and nothing is left after the drop.
#[test]
fn three_lbs_are_built_and_reachable() -> anyhow::Result<()> {
    if !lab::require_root("three_lbs_are_built_and_reachable") {
        return Ok(());
    }
    let lab = Lab::builder().lbs(3).backends(1).no_sinks().build()?;
    let p = lab.prefix().to_string();
    let mut names = lab.namespaces().to_vec();
    names.sort();
    let mut want: Vec<String> = ["br", "client", "lb", "lb2", "lb3", "b1"]
        .iter()
        .map(|s| format!("{p}-{s}"))
        .collect();
    want.sort();
    assert_eq!(names, want);
    assert_eq!(lab::namespaces_with_prefix(&p), want);
    assert_eq!(lab.lbs().len(), 3);
    assert_eq!(lab.lb().ns(), lab.lb_n(1).ns(), "lab.lb() is LB 1");
    for k in 1..=3 {
        let lb = lab.lb_n(k);
        assert_eq!(lb.role(), lab::Role::Lb(k));
        let name = if k == 1 {
            "lb".to_string()
        } else {
            format!("lb{k}")
        };
        assert_eq!(lb.name(), name);
        assert_eq!(lb.ns().name(), format!("{p}-{name}"));
        assert_eq!(lb.v4().to_string(), format!("198.18.0.{}", 1 + k));
        assert_eq!(lb.v6().to_string(), format!("2001:db8::{}", 1 + k));
        assert_eq!(lb.mac(), [2, 0x6d, 0x78, 0, 0, 1 + k as u8]);
        assert_eq!(lb.link()?.mac, lb.mac());
        assert_eq!(lb.link()?.mtu, lab::PATH_MTU);
        assert_eq!(
            lab.host_by_mac(lb.mac()).map(|h| h.role()),
            Some(lab::Role::Lb(k))
        );
        let port = lab.lb_peer_port_of(k)?;
        assert_eq!(port.name, format!("{p}{name}"));
        assert_eq!(port.name, lb.bridge_port());
        let off = port.ns.exec(&["ethtool", "-k", &port.name])?;
        assert!(off.contains("tx-checksumming: off"), "LB {k} port: {off}");
        assert_eq!(lb.ns().sysctl_get("net.ipv4.conf.eth0.forwarding")?, "1");
        assert_eq!(lb.ns().sysctl_get("net.ipv6.conf.eth0.forwarding")?, "1");
        assert_eq!(
            lb.ns().sysctl_get("net.ipv4.conf.eth0.send_redirects")?,
            "0"
        );
        for fam in AddrFamily::ALL {
            let rtt = lab.client().ping(lb.addr(fam), Duration::from_secs(2))?;
            eprintln!("three_lbs: client -> LB {k} {}: {rtt:?}", lb.addr(fam));
            assert!(
                rtt.is_some(),
                "LB {k} {} does not answer ping",
                lb.addr(fam)
            );
        }
    }
    assert_eq!(lab.lb_peer_port()?.name, lab.lb_peer_port_of(1)?.name);
    assert!(lab.lb_peer_port_of(4).is_err());
    // LBs see each other (VRRP peers).
    assert!(
        lab.lb_n(2)
            .ping(lab.lb_n(3).v4().into(), Duration::from_secs(2))?
            .is_some()
    );
    // Nobody answers an address no host has: ping is bounded and says so.
    let t = Instant::now();
    assert_eq!(
        lab.client()
            .ping("198.18.0.9".parse()?, Duration::from_millis(300))?,
        None
    );
    assert!(t.elapsed() < Duration::from_secs(2));
    // The default still points the VIPs at LB 1 statically.
    assert!(!lab.vip_by_arp());
    for fam in AddrFamily::ALL {
        assert_eq!(lab.client_neighbour(lab.vip(fam))?, Some(lab.lb().mac()));
    }
    // Nothing in the root namespace.
    let root = lab::run_checked(
        std::process::Command::new("ip").args(["addr"]),
        lab::CMD_TIMEOUT,
    )?;
    assert!(!root.contains("198.18.") && !root.contains("2001:db8:") && !root.contains(&p));

    drop(lab);
    assert_eq!(
        lab::namespaces_with_prefix(&p),
        Vec::<String>::new(),
        "namespaces left behind"
    );
    Ok(())
}

/// A lab that leaves the VIP to ARP/ND: no static entry, GARP and unsolicited NA accepted.
#[test]
fn vip_by_arp_lab_has_no_static_vip_entry() -> anyhow::Result<()> {
    if !lab::require_root("vip_by_arp_lab_has_no_static_vip_entry") {
        return Ok(());
    }
    let lab = Lab::builder()
        .lbs(2)
        .backends(1)
        .no_sinks()
        .vip_by_arp()
        .build()?;
    assert!(lab.vip_by_arp());
    let c = lab.client().ns();
    for fam in AddrFamily::ALL {
        assert_eq!(lab.client_neighbour(lab.vip(fam))?, None);
        // Nobody holds the VIP yet: it does not resolve.
        assert_eq!(
            lab.client()
                .ping(lab.vip(fam), Duration::from_millis(500))?,
            None
        );
        assert_eq!(lab.client_neighbour(lab.vip(fam))?, None);
    }
    assert_eq!(c.sysctl_get("net.ipv4.conf.all.arp_accept")?, "1");
    assert_eq!(c.sysctl_get("net.ipv4.conf.eth0.arp_accept")?, "1");
    if c.sysctl_get("net.ipv6.conf.all.accept_untracked_na")
        .is_ok()
    {
        assert_eq!(c.sysctl_get("net.ipv6.conf.eth0.accept_untracked_na")?, "1");
    }
    // A host that adds the VIP by hand answers for it, and the client learns its MAC.
    lab.lb_n(2)
        .ns()
        .ip(&["addr", "add", "198.18.0.100/32", "dev", "eth0"])?;
    assert!(
        lab.client()
            .ping(lab::VIP4.into(), Duration::from_secs(2))?
            .is_some()
    );
    assert_eq!(
        lab.client_neighbour(lab::VIP4.into())?,
        Some(lab.lb_n(2).mac())
    );
    Ok(())
}

/// keepalived failover on the wire (validates the keepalived peer, the capture and GARP
/// acceptance): LB 1 (priority 150) is master, LB 2 (100) backup, adverts every 100 ms; LB 1's
/// keepalived is SIGKILLed; LB 2 must send its first advert one Master_Down_Interval (361 ms
/// at priority 100) after LB 1's last one, and the client's ARP entry for the VIP must move to
/// LB 2's MAC by its gratuitous ARP.
#[test]
fn keepalived_failover_is_timed_on_the_wire() -> anyhow::Result<()> {
    use lab::capture::WireCapture;
    use lab::keepalived::{Keepalived, KeepalivedOpts, VrrpState};
    let test = "keepalived_failover_is_timed_on_the_wire";
    if !lab::require_root(test) {
        return Ok(());
    }
    const VRID: u8 = 51;
    let vip: std::net::IpAddr = lab::VIP4.into();
    let lab = Lab::builder()
        .lbs(2)
        .backends(1)
        .no_sinks()
        .vip_by_arp()
        .build()?;
    let (lb1, lb2) = (lab.lb_n(1), lab.lb_n(2));
    let cap = WireCapture::segment(&lab)?;
    let opts = KeepalivedOpts {
        vrid: VRID,
        priority: 150,
        advert_int_ms: 100,
        vips: vec![vip],
        ..Default::default()
    };
    let mut k1 = Keepalived::start(&lab, 1, &opts)?;
    k1.wait_master(Duration::from_secs(5))?;
    let adv1 = cap
        .wait_for(Duration::from_secs(2), |e| {
            e.is_advert_from(&lb1.mac().into(), VRID)
        })
        .ok_or_else(|| anyhow::anyhow!("no advert from LB 1 on the wire\n{}", cap.dump()))?;
    let a = adv1.advert().unwrap();
    assert_eq!(
        (a.version, a.priority, a.interval_cs, a.src_ip),
        (3, 150, 10, lb1.v4().into()),
        "{adv1:?}"
    );
    assert_eq!(a.addrs, vec![vip]);

    let k2 = Keepalived::start(
        &lab,
        2,
        &KeepalivedOpts {
            priority: 100,
            ..opts.clone()
        },
    )?;
    k2.wait_state(VrrpState::Backup, Duration::from_secs(5))?;
    assert!(k1.holds_vip(vip)? && !k2.holds_vip(vip)?);

    // The client resolves the VIP to LB 1.
    assert!(
        lab.client().ping(vip, Duration::from_secs(2))?.is_some(),
        "VIP does not answer"
    );
    assert_eq!(lab.client_neighbour(vip)?, Some(lb1.mac()));
    // LB 2 stays backup for a while: no advert from it.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !k2.holds_vip(vip)?,
        "LB 2 took the VIP while LB 1 runs:\n{}",
        k2.log()
    );

    let t_kill = k1.kill();
    assert!(!k1.holds_vip(vip)?, "VIP left on LB 1 after the kill");
    k2.wait_master(Duration::from_secs(3))?;
    let kill_at = cap.at(t_kill);
    let first2 = cap
        .wait_for(Duration::from_secs(2), |e| {
            e.is_advert_from(&lb2.mac().into(), VRID)
        })
        .ok_or_else(|| anyhow::anyhow!("no advert from LB 2\n{}", cap.dump()))?;
    let diag = || format!("{}\nLB 1:\n{}\nLB 2:\n{}", cap.dump(), k1.log(), k2.log());
    assert!(
        first2.at >= kill_at,
        "LB 2 advertised before the kill\n{}",
        diag()
    );
    assert_eq!(first2.advert().unwrap().priority, 100);
    let last1 = cap
        .last_advert_from(lb1.mac(), VRID, first2.at)
        .expect("LB 1 advertised");
    assert!(
        last1.at <= kill_at + Duration::from_millis(5),
        "LB 1 advertised {:?} after the kill\n{}",
        last1.at - kill_at,
        diag()
    );
    let gap = first2.at - last1.at;
    let garp = cap
        .wait_for(Duration::from_secs(2), |e| {
            e.at >= first2.at && e.is_announcement(lb2.mac(), vip)
        })
        .ok_or_else(|| anyhow::anyhow!("no gratuitous ARP from LB 2\n{}", diag()))?;
    // The client's entry follows the GARP (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(2);
    let moved = loop {
        let n = lab.client_neighbour(vip)?;
        if n == Some(lb2.mac()) {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "client still has {n:?} for the VIP\n{}",
            diag()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    eprintln!(
        "{test}: LB 1 last advert -> LB 2 first advert {:.1} ms (expected ~361); kill -> LB 2 first advert {:.1} ms; \
         LB 2 first advert -> first GARP {:.1} ms; kill -> client entry on LB 2 seen {:.1} ms (polled)",
        gap.as_secs_f64() * 1e3,
        (first2.at - kill_at).as_secs_f64() * 1e3,
        (garp.at - first2.at).as_secs_f64() * 1e3,
        cap.at(moved).saturating_sub(kill_at).as_secs_f64() * 1e3,
    );
    assert!(
        gap >= Duration::from_millis(300) && gap <= Duration::from_millis(500),
        "failover gap {gap:?} outside [300, 500] ms\n{}",
        diag()
    );
    // LB 2 answers for the VIP now.
    assert!(lab.client().ping(vip, Duration::from_secs(2))?.is_some());
    assert_eq!(lab.client_neighbour(vip)?, Some(lb2.mac()));
    assert_eq!(cap.overflowed(), 0);
    assert_eq!(cap.error(), None);

    // Drop: keepalived gone, VIP removed, namespaces gone.
    let pids = k2.pids();
    let prefix = lab.prefix().to_string();
    drop(k2);
    drop(k1);
    drop(cap);
    for pid in [pids.0, pids.1].into_iter().flatten() {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists() || {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                comm.trim() != "keepalived"
            },
            "keepalived {pid} still runs"
        );
    }
    assert!(!lab::keepalived::holds_addr(lab.lb_n(2).ns(), "eth0", vip)?);
    drop(lab);
    assert_eq!(lab::namespaces_with_prefix(&prefix), Vec::<String>::new());
    Ok(())
}

/// The IPv6 side: keepalived with the IPv6 VIP; a new master's unsolicited NA is on the wire
/// and moves the client's neighbour entry.
#[test]
fn keepalived_ipv6_failover_moves_the_client_by_na() -> anyhow::Result<()> {
    use lab::capture::WireCapture;
    use lab::keepalived::{Keepalived, KeepalivedOpts, VrrpState};
    let test = "keepalived_ipv6_failover_moves_the_client_by_na";
    if !lab::require_root(test) {
        return Ok(());
    }
    const VRID: u8 = 52;
    let vip: std::net::IpAddr = lab::VIP6.into();
    let lab = Lab::builder()
        .lbs(2)
        .backends(1)
        .no_sinks()
        .vip_by_arp()
        .build()?;
    let (lb1, lb2) = (lab.lb_n(1), lab.lb_n(2));
    let cap = WireCapture::segment(&lab)?;
    let opts = KeepalivedOpts {
        vrid: VRID,
        priority: 150,
        advert_int_ms: 100,
        vips: vec![vip],
        ..Default::default()
    };
    let mut k1 = Keepalived::start(&lab, 1, &opts)?;
    k1.wait_master(Duration::from_secs(5))?;
    let k2 = Keepalived::start(
        &lab,
        2,
        &KeepalivedOpts {
            priority: 100,
            ..opts.clone()
        },
    )?;
    k2.wait_state(VrrpState::Backup, Duration::from_secs(5))?;
    let adv = cap
        .wait_for(Duration::from_secs(2), |e| {
            e.is_advert_from(&lb1.mac().into(), VRID)
        })
        .ok_or_else(|| anyhow::anyhow!("no IPv6 advert from LB 1\n{}", cap.dump()))?;
    let a = adv.advert().unwrap();
    assert!(
        matches!(a.src_ip, std::net::IpAddr::V6(s) if s.segments()[0] == 0xfe80),
        "{a:?}"
    );
    assert_eq!(a.dst_ip.to_string(), "ff02::12");
    assert_eq!(a.addrs, vec![vip]);
    assert!(
        lab.client().ping(vip, Duration::from_secs(2))?.is_some(),
        "VIP6 does not answer"
    );
    assert_eq!(lab.client_neighbour(vip)?, Some(lb1.mac()));
    // Let LB 2 hear LB 1 for a while, so its Master_Down timer runs from LB 1's adverts.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !k2.holds_vip(vip)?,
        "LB 2 took the VIP while LB 1 runs:\n{}",
        k2.log()
    );

    let t_kill = k1.kill();
    k2.wait_master(Duration::from_secs(3))?;
    let kill_at = cap.at(t_kill);
    let na = cap
        .wait_for(Duration::from_secs(2), |e| {
            e.at >= kill_at && e.is_announcement(lb2.mac(), vip)
        })
        .ok_or_else(|| anyhow::anyhow!("no unsolicited NA from LB 2\n{}", cap.dump()))?;
    let first2 = cap
        .first_advert_from(lb2.mac(), VRID, kill_at)
        .expect("LB 2 advertised");
    let last1 = cap
        .last_advert_from(lb1.mac(), VRID, first2.at)
        .expect("LB 1 advertised");
    let deadline = Instant::now() + Duration::from_secs(2);
    while lab.client_neighbour(vip)? != Some(lb2.mac()) {
        assert!(
            Instant::now() < deadline,
            "client still has {:?} for {vip}\n{}",
            lab.client_neighbour(vip)?,
            cap.dump()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!(
        "{test}: LB 1 last advert -> LB 2 first advert {:.1} ms; -> first NA {:.1} ms ({:?})",
        (first2.at - last1.at).as_secs_f64() * 1e3,
        (na.at - first2.at).as_secs_f64() * 1e3,
        na.kind
    );
    let gap = first2.at - last1.at;
    assert!(
        gap >= Duration::from_millis(300) && gap <= Duration::from_millis(500),
        "failover gap {gap:?} outside [300, 500] ms\n{}",
        cap.dump()
    );
    assert!(lab.client().ping(vip, Duration::from_secs(2))?.is_some());
    Ok(())
}

/// Two `mxlb run` nodes in one lab (dsr-ipip): each has its own dirs, PASS program and XDP on
/// its own LB; the back-ends' decap helper is attached once and stays until the last node that
/// needs it is dropped, whichever goes first.
#[test]
fn two_mxlb_nodes_share_the_decap_helper() -> anyhow::Result<()> {
    use lab::node::{Mode, MxlbNode, NodeOpts};
    let test = "two_mxlb_nodes_share_the_decap_helper";
    if !lab::require_root(test) {
        return Ok(());
    }
    let lab = Lab::builder().lbs(2).backends(2).build()?;
    let opts = NodeOpts {
        mode: Mode::DsrIpip,
        ..Default::default()
    };
    let n1 = MxlbNode::start(&lab, opts.clone())?;
    let n2 = MxlbNode::start_on(&lab, 2, opts)?;
    let p = lab.prefix();
    assert_eq!(n1.lb().ns(), lab.lb().ns());
    assert_eq!(n2.lb().ns(), lab.lb_n(2).ns());
    assert_eq!(
        n1.bpffs_dir,
        std::path::PathBuf::from(format!("/sys/fs/bpf/{p}-mxlb"))
    );
    assert_eq!(
        n2.bpffs_dir,
        std::path::PathBuf::from(format!("/sys/fs/bpf/{p}-mxlb2"))
    );
    assert_eq!(n1.dir(), std::env::temp_dir().join(format!("{p}-mxlb")));
    assert_eq!(n2.dir(), std::env::temp_dir().join(format!("{p}-mxlb2")));
    let cfg2 = std::fs::read_to_string(&n2.config_path)?;
    assert!(
        cfg2.contains("encap_source_v4 = \"198.18.0.3\"")
            && cfg2.contains("encap_source_v6 = \"2001:db8::3\""),
        "{cfg2}"
    );
    assert!(n1.xdp_attached()? && n2.xdp_attached()?);
    assert!(n1.pid().is_some() && n2.pid().is_some() && n1.pid() != n2.pid());
    let xdp_on = |ns: &lab::Netns, dev: &str| -> anyhow::Result<bool> {
        Ok(ns.ip(&["-d", "link", "show", "dev", dev])?.contains("xdp"))
    };
    for k in 1..=2 {
        let port = lab.lb_peer_port_of(k)?;
        assert!(
            xdp_on(&port.ns, &port.name)?,
            "no PASS program on LB {k}'s port"
        );
    }
    let decap_everywhere = || -> anyhow::Result<bool> {
        for b in lab.backends() {
            if !xdp_on(b.ns(), b.dev())? {
                return Ok(false);
            }
        }
        Ok(true)
    };
    assert!(decap_everywhere()?);
    // Node 2's CLI talks to node 2.
    assert_eq!(
        n2.backends_json()?.as_array().map(Vec::len),
        Some(4),
        "b1, b2, b1v6, b2v6"
    );

    let send = |what: &str| -> anyhow::Result<()> {
        for fam in AddrFamily::ALL {
            let r = lab.smtp_source(
                lab.vip_addr(fam, 25),
                &SourceOpts {
                    sessions: 20,
                    concurrency: 4,
                    ..Default::default()
                },
            )?;
            assert!(r.ok(), "{what} {fam}: {r:#?}");
        }
        Ok(())
    };
    send("through LB 1")?;
    // Node 1 goes first: its PASS program goes, the decap helper stays for node 2.
    drop(n1);
    assert!(!xdp_on(
        &lab.lb_peer_port_of(1)?.ns,
        &lab.lb_peer_port_of(1)?.name
    )?);
    assert!(
        decap_everywhere()?,
        "dropping node 1 detached node 2's decap helper"
    );
    assert!(!std::path::Path::new(&format!("/sys/fs/bpf/{p}-mxlb")).exists());
    // The client now sends the VIPs to LB 2 (a stand-in for VRRP): dsr-ipip still works.
    let mac2 = lab::mac_to_string(&lab.lb_n(2).mac());
    for fam in AddrFamily::ALL {
        lab.client().ns().ip(&[
            "neigh",
            "replace",
            &lab.vip(fam).to_string(),
            "lladdr",
            &mac2,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
    }
    send("through LB 2")?;
    drop(n2);
    for b in lab.backends() {
        assert!(!xdp_on(b.ns(), b.dev())?, "decap left on {}", b.name());
    }
    assert!(!std::path::Path::new(&format!("/sys/fs/bpf/{p}-mxlb2")).exists());
    Ok(())
}

/// A decap link pinned for an interface that has since gone (deleted, or its namespace gone
/// when a run was killed) is stale: attaching to a new interface with the same pin path
/// replaces it instead of failing with `bpf_link_update` (ENOLINK).
#[test]
fn a_helper_link_left_by_a_vanished_interface_is_replaced() -> anyhow::Result<()> {
    let test = "a_helper_link_left_by_a_vanished_interface_is_replaced";
    if !lab::require_root(test) {
        return Ok(());
    }
    let lab = Lab::builder().backends(1).build()?;
    let ns = lab.backend(1).ns().clone();
    let mxlb = |args: &[&str]| -> anyhow::Result<String> {
        let mut c = std::process::Command::new(lab::node::mxlb_bin()?);
        c.args(["--netns", ns.name()]).args(args);
        lab::run_checked(&mut c, Duration::from_secs(30))
    };
    /// Detaches (removing the pin) however the test ends.
    struct Detach<'a>(&'a dyn Fn(&[&str]) -> anyhow::Result<String>);
    impl Drop for Detach<'_> {
        fn drop(&mut self) {
            let _ = (self.0)(&["decap", "detach", "stale0"]);
        }
    }
    let new_veth = || ns.ip(&["link", "add", "stale0", "type", "veth", "peer", "name", "stale1"]).and(ns.ip(&["link", "set", "stale0", "up"]));
    new_veth()?;
    mxlb(&["decap", "attach", "stale0", "--mode", "generic"])?;
    let _detach = Detach(&mxlb);
    ns.ip(&["link", "del", "stale0"])?;
    new_veth()?;
    mxlb(&["decap", "attach", "stale0", "--mode", "generic"])?;
    assert!(ns.ip(&["-d", "link", "show", "dev", "stale0"])?.contains("xdp"), "the new interface has the decap program");
    Ok(())
}

/// A lab whose run was killed (no drop guard could run) is removed when the next lab starts:
/// its processes are killed and its namespaces deleted. A lab whose owner is alive is not.
#[test]
fn a_killed_runs_lab_is_swept_by_the_next_lab() -> anyhow::Result<()> {
    if !lab::require_root("a_killed_runs_lab_is_swept_by_the_next_lab") {
        return Ok(());
    }
    // A pid that is gone: a child that has exited and been reaped.
    let mut gone = std::process::Command::new("true").spawn()?;
    let dead_pid = gone.id();
    gone.wait()?;
    let free_prefix = |seed: u32| {
        (0..64u32)
            .map(|i| format!("mx{:05x}", (seed.wrapping_mul(2_654_435_761).wrapping_add(i * 7919)) & 0xF_FFFF))
            .find(|p| lab::namespaces_with_prefix(p).is_empty() && !std::path::Path::new(lab::OWNERS_DIR).join(p).exists())
            .expect("a free prefix")
    };
    let dead = free_prefix(dead_pid);
    let live = free_prefix(dead_pid ^ 0x5A5A5);
    std::fs::create_dir_all(lab::OWNERS_DIR)?;
    let ns = |prefix: &str| format!("{prefix}-b1");
    for (prefix, owner) in [(&dead, dead_pid), (&live, std::process::id())] {
        lab::run_checked(std::process::Command::new("ip").args(["netns", "add", &ns(prefix)]), lab::CMD_TIMEOUT)?;
        std::fs::write(std::path::Path::new(lab::OWNERS_DIR).join(prefix), owner.to_string())?;
    }
    // Removes the live one (and the dead one if the sweep failed) however the test ends.
    struct Cleanup(Vec<String>, Option<std::process::Child>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Some(c) = &mut self.1 {
                let _ = c.kill();
                let _ = c.wait();
            }
            for p in &self.0 {
                let _ = lab::run_bounded(std::process::Command::new("ip").args(["netns", "del", &format!("{p}-b1")]), lab::CMD_TIMEOUT);
                let _ = std::fs::remove_file(std::path::Path::new(lab::OWNERS_DIR).join(p));
            }
        }
    }
    let mut cleanup = Cleanup(vec![dead.clone(), live.clone()], None);
    // A daemon the killed run left running inside its namespace.
    let leftover = cleanup.1.insert(std::process::Command::new("ip").args(["netns", "exec", &ns(&dead), "sleep", "300"]).spawn()?);

    let _lab = Lab::builder().backends(1).no_sinks().build()?;

    assert!(lab::namespaces_with_prefix(&dead).is_empty(), "the dead run's namespace is still there");
    assert!(!std::path::Path::new(lab::OWNERS_DIR).join(&dead).exists(), "the dead run's owner file is still there");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while leftover.try_wait()?.is_none() {
        assert!(std::time::Instant::now() < deadline, "the dead run's daemon is still running");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(lab::namespaces_with_prefix(&live), vec![ns(&live)], "a live run's lab was touched");
    Ok(())
}
