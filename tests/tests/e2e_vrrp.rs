//! VRRP between mxlb nodes, end to end in the lab: two or three LB nodes on one segment with
//! the client learning the VIP's MAC by ARP (no static entry), back-ends running smtp-sink.
//! Needs root; skips locally otherwise, fails under CI=true.
use std::time::Duration;

use anyhow::{Result, ensure};
use lab::{
    AddrFamily, Lab, SourceOpts,
    node::{MxlbNode, NodeOpts},
    vrrp::{VrrpOpts, vrrp_state, vrrp_status, wait_backends_up, wait_vrrp},
};
use mxlb::vrrp::instance::State;

fn lab(lbs: usize) -> Result<Lab> {
    Lab::builder().lbs(lbs).backends(3).vip_by_arp().build()
}

fn node<'a>(lab: &'a Lab, k: usize, vrrp: &[VrrpOpts]) -> Result<MxlbNode<'a>> {
    let extra = vrrp.iter().map(VrrpOpts::toml).collect::<String>();
    ready(MxlbNode::start_on(lab, k, NodeOpts { extra: Some(extra), health: Some("interval_ms = 200\ntimeout_ms = 200".into()), ..Default::default() })?)
}

/// A started node once all its back-ends are up (MACs resolved).
fn ready(node: MxlbNode<'_>) -> Result<MxlbNode<'_>> {
    wait_backends_up(&node, Duration::from_secs(10))?;
    Ok(node)
}

/// SMTP sessions through the VIP all succeed.
fn sessions_ok(lab: &Lab, fam: AddrFamily, n: u32) -> Result<()> {
    let r = lab.smtp_source(lab.vip_addr(fam, 25), &SourceOpts { sessions: n, ..Default::default() })?;
    ensure!(r.ok(), "smtp-source to the {fam} VIP failed: {r:#?}");
    Ok(())
}

#[test]
fn election_then_crash_failover_to_the_backup() -> Result<()> {
    if !lab::require_root("election_then_crash_failover_to_the_backup") {
        return Ok(());
    }
    let lab = lab(2)?;
    let mut n1 = node(&lab, 1, &[VrrpOpts { priority: 150, ..Default::default() }])?;
    let n2 = node(&lab, 2, &[VrrpOpts { priority: 100, ..Default::default() }])?;
    wait_vrrp(&n1, "smtp", State::Master, Duration::from_secs(3))?;
    wait_vrrp(&n2, "smtp", State::Backup, Duration::from_secs(1))?;
    sessions_ok(&lab, AddrFamily::V4, 20)?;
    let vip = lab.vip(AddrFamily::V4);
    ensure!(lab.client_neighbour(vip)? == Some(lab.lb_n(1).mac()), "client reaches the VIP through LB1");
    // Crash: the agent dies and the machine with it (its link goes down).
    n1.kill();
    lab.lb_n(1).ns().ip(&["link", "set", "eth0", "down"])?;
    wait_vrrp(&n2, "smtp", State::Master, Duration::from_secs(2))?;
    sessions_ok(&lab, AddrFamily::V4, 20)?;
    ensure!(lab.client_neighbour(vip)? == Some(lab.lb_n(2).mac()), "the client's ARP entry moved to LB2");
    let st = vrrp_status(&n2)?;
    ensure!(st[0].became_master == 1 && st[0].adverts_sent > 0, "{st:?}");
    Ok(())
}

/// An interface on LB1 to track: `uplink0`, a veth whose peer `uplink0p` stays in LB1's
/// namespace (the kernel has no dummy devices); both up.
fn uplink(lab: &Lab) -> Result<()> {
    let ns = lab.lb_n(1).ns();
    ns.ip(&["link", "add", "uplink0", "type", "veth", "peer", "name", "uplink0p"])?;
    ns.ip(&["link", "set", "uplink0", "up"])?;
    ns.ip(&["link", "set", "uplink0p", "up"])?;
    Ok(())
}

fn prio(priority: u8) -> VrrpOpts {
    VrrpOpts { priority, ..Default::default() }
}

#[test]
fn graceful_handover_preemption_and_nopreempt() -> Result<()> {
    if !lab::require_root("graceful_handover_preemption_and_nopreempt") {
        return Ok(());
    }
    let lab = lab(2)?;
    let mut n1 = node(&lab, 1, &[prio(150)])?;
    let n2 = node(&lab, 2, &[prio(100)])?;
    wait_vrrp(&n1, "smtp", State::Master, Duration::from_secs(3))?;
    wait_vrrp(&n2, "smtp", State::Backup, Duration::from_secs(1))?;
    // Graceful stop: priority 0, so the backup waits only Skew_Time (61 ms), not 361 ms.
    let cap = lab::capture::WireCapture::segment(&lab)?;
    n1.stop()?;
    wait_vrrp(&n2, "smtp", State::Master, Duration::from_secs(1))?;
    let ev = cap.events();
    let bye = ev
        .iter()
        .find(|e| e.src_mac == lab.lb_n(1).mac() && e.advert().is_some_and(|a| a.priority == 0))
        .expect("the stopping master sent a priority-0 advertisement");
    let took = ev
        .iter()
        .find(|e| e.at > bye.at && e.src_mac == lab.lb_n(2).mac() && e.advert().is_some())
        .expect("the backup advertised as master");
    let gap = took.at - bye.at;
    ensure!(gap < Duration::from_millis(250), "takeover {gap:?} after the priority-0 advert (Skew_Time 61 ms)");
    ensure!(!lab::keepalived::holds_addr(lab.lb_n(1).ns(), "eth0", lab.vip(AddrFamily::V4))?, "the stopped node released the VIP");
    sessions_ok(&lab, AddrFamily::V4, 10)?;
    // The higher priority returns and preempts (after its own Master_Down_Interval).
    n1.launch()?;
    wait_vrrp(&n1, "smtp", State::Master, Duration::from_secs(3))?;
    wait_vrrp(&n2, "smtp", State::Backup, Duration::from_secs(1))?;
    ensure!(!lab::keepalived::holds_addr(lab.lb_n(2).ns(), "eth0", lab.vip(AddrFamily::V4))?, "the preempted node released the VIP");
    sessions_ok(&lab, AddrFamily::V4, 10)?;
    drop((n1, n2));

    // nopreempt: a returning higher priority stays backup while the master lives.
    let lab = self::lab(2)?;
    let n2 = node(&lab, 2, &[prio(100)])?;
    wait_vrrp(&n2, "smtp", State::Master, Duration::from_secs(3))?;
    let n1 = node(&lab, 1, &[VrrpOpts { priority: 150, preempt: false, ..Default::default() }])?;
    std::thread::sleep(Duration::from_millis(1500));
    ensure!(vrrp_state(&n1, "smtp")? == State::Backup && vrrp_state(&n2, "smtp")? == State::Master, "nopreempt preempted");
    drop(n1);
    Ok(())
}

#[test]
fn preempt_delay_holds_off_the_takeover() -> Result<()> {
    if !lab::require_root("preempt_delay_holds_off_the_takeover") {
        return Ok(());
    }
    let lab = lab(2)?;
    let n2 = node(&lab, 2, &[prio(100)])?;
    wait_vrrp(&n2, "smtp", State::Master, Duration::from_secs(3))?;
    let n1 = node(&lab, 1, &[VrrpOpts { priority: 150, preempt_delay_ms: 2000, ..Default::default() }])?;
    std::thread::sleep(Duration::from_millis(1200));
    ensure!(vrrp_state(&n1, "smtp")? == State::Backup, "preempted before preempt_delay");
    // 2 s after its start, plus one Master_Down_Interval (0.32 s at priority 150).
    wait_vrrp(&n1, "smtp", State::Master, Duration::from_secs(3))?;
    wait_vrrp(&n2, "smtp", State::Backup, Duration::from_secs(1))?;
    Ok(())
}

#[test]
fn tracking_moves_the_vip_and_fault_releases_it() -> Result<()> {
    if !lab::require_root("tracking_moves_the_vip_and_fault_releases_it") {
        return Ok(());
    }
    let lab = lab(2)?;
    // LB1 has an uplink (a dummy interface) tracked without weight (FAULT) and needs all
    // three back-ends healthy or it drops 60 below LB2.
    uplink(&lab)?;
    let tracked = VrrpOpts {
        priority: 150,
        extra: "track_interface = [{ name = \"uplink0\" }]\ntrack_backends = [{ vip = \"mx\", need = 3, weight = -60 }]\n".into(),
        ..Default::default()
    };
    let n1 = node(&lab, 1, &[tracked])?;
    let n2 = node(&lab, 2, &[prio(100)])?;
    wait_vrrp(&n1, "smtp", State::Master, Duration::from_secs(3))?;
    wait_vrrp(&n2, "smtp", State::Backup, Duration::from_secs(1))?;

    // Interface down → FAULT: the VIP goes at once (priority 0), LB2 takes over.
    lab.lb_n(1).ns().ip(&["link", "set", "uplink0", "down"])?;
    wait_vrrp(&n1, "smtp", State::Fault, Duration::from_secs(1))?;
    wait_vrrp(&n2, "smtp", State::Master, Duration::from_secs(1))?;
    let st = vrrp_status(&n1)?;
    ensure!(st[0].failing_tracks == ["interface uplink0 down"], "{st:?}");
    ensure!(!lab::keepalived::holds_addr(lab.lb_n(1).ns(), "eth0", lab.vip(AddrFamily::V4))?, "a faulty node holds the VIP");
    sessions_ok(&lab, AddrFamily::V4, 10)?;
    // Back up: backup first, then it preempts.
    lab.lb_n(1).ns().ip(&["link", "set", "uplink0", "up"])?;
    wait_vrrp(&n1, "smtp", State::Master, Duration::from_secs(3))?;
    wait_vrrp(&n2, "smtp", State::Backup, Duration::from_secs(1))?;

    // A back-end fails its probes: LB1 falls to priority 90 < 100 and LB2 takes over.
    lab.backend(3).ns().ip(&["link", "set", "eth0", "down"])?;
    wait_vrrp(&n2, "smtp", State::Master, Duration::from_secs(5))?;
    wait_vrrp(&n1, "smtp", State::Backup, Duration::from_secs(1))?;
    let st = vrrp_status(&n1)?;
    ensure!(st[0].priority == 90 && st[0].configured_priority == 150, "{st:?}");
    lab.backend(3).ns().ip(&["link", "set", "eth0", "up"])?;
    wait_vrrp(&n1, "smtp", State::Master, Duration::from_secs(5))?;
    Ok(())
}

#[test]
fn sync_group_moves_smtp_and_smtp6_together_and_notifies() -> Result<()> {
    if !lab::require_root("sync_group_moves_smtp_and_smtp6_together_and_notifies") {
        return Ok(());
    }
    let lab = lab(2)?;
    let hook_dir = std::env::temp_dir().join(format!("{}-notify", lab.prefix()));
    std::fs::create_dir_all(&hook_dir)?;
    let hook = hook_dir.join("notify.sh");
    let log = hook_dir.join("events");
    std::fs::write(&hook, format!("#!/bin/sh\necho \"$@\" >> {}\n", log.display()))?;
    std::process::Command::new("chmod").arg("755").arg(&hook).status()?;
    uplink(&lab)?;
    let group = "[[vrrp_sync_group]]\nname = \"mail\"\ninstances = [\"smtp\", \"smtp6\"]\n";
    let pair = |priority: u8, track: bool| {
        vec![
            VrrpOpts { priority, extra: format!("notify = \"{}\"\n", hook.display()), ..Default::default() },
            VrrpOpts {
                name: "smtp6".into(),
                vrid: 52,
                priority,
                vips: vec!["mx6".into()],
                extra: if track { "track_interface = [{ name = \"uplink0\" }]\n".into() } else { String::new() },
                ..Default::default()
            },
        ]
    };
    let start = |k: usize, v: Vec<VrrpOpts>| {
        let extra = v.iter().map(VrrpOpts::toml).collect::<String>() + group;
        ready(MxlbNode::start_on(&lab, k, NodeOpts { extra: Some(extra), ..Default::default() })?)
    };
    let n1 = start(1, pair(150, true))?;
    let n2 = start(2, pair(100, false))?;
    for name in ["smtp", "smtp6"] {
        wait_vrrp(&n1, name, State::Master, Duration::from_secs(3))?;
        wait_vrrp(&n2, name, State::Backup, Duration::from_secs(1))?;
    }
    sessions_ok(&lab, AddrFamily::V4, 10)?;
    sessions_ok(&lab, AddrFamily::V6, 10)?;
    // Only smtp6's track fails, but the whole group leaves LB1.
    lab.lb_n(1).ns().ip(&["link", "set", "uplink0", "down"])?;
    for name in ["smtp", "smtp6"] {
        wait_vrrp(&n1, name, State::Fault, Duration::from_secs(1))?;
        wait_vrrp(&n2, name, State::Master, Duration::from_secs(1))?;
    }
    sessions_ok(&lab, AddrFamily::V4, 10)?;
    sessions_ok(&lab, AddrFamily::V6, 10)?;
    std::thread::sleep(Duration::from_millis(300));
    let events = std::fs::read_to_string(&log)?;
    for want in ["INSTANCE smtp BACKUP 150", "INSTANCE smtp MASTER 150", "INSTANCE smtp FAULT 150", "INSTANCE smtp MASTER 100"] {
        ensure!(events.lines().any(|l| l == want), "notify hook did not get `{want}`:\n{events}");
    }
    let _ = std::fs::remove_dir_all(&hook_dir);
    Ok(())
}

#[test]
fn active_active_each_node_masters_one_vip() -> Result<()> {
    if !lab::require_root("active_active_each_node_masters_one_vip") {
        return Ok(());
    }
    let lab = lab(2)?;
    let both = |p4: u8, p6: u8| {
        vec![prio(p4), VrrpOpts { name: "smtp6".into(), vrid: 52, priority: p6, vips: vec!["mx6".into()], ..Default::default() }]
    };
    let mut n1 = node(&lab, 1, &both(150, 100))?;
    let n2 = node(&lab, 2, &both(100, 150))?;
    wait_vrrp(&n1, "smtp", State::Master, Duration::from_secs(3))?;
    wait_vrrp(&n2, "smtp6", State::Master, Duration::from_secs(3))?;
    wait_vrrp(&n1, "smtp6", State::Backup, Duration::from_secs(1))?;
    wait_vrrp(&n2, "smtp", State::Backup, Duration::from_secs(1))?;
    sessions_ok(&lab, AddrFamily::V4, 10)?;
    if let Err(e) = sessions_ok(&lab, AddrFamily::V6, 10) {
        eprintln!("n1: {:?}\nn2: {:?}", vrrp_status(&n1)?, vrrp_status(&n2)?);
        eprintln!("client: {}", lab.client().ns().ip(&["-6", "neigh"])?);
        eprintln!("lb1: {}\nlb2: {}", lab.lb_n(1).ns().ip(&["-6", "addr"])?, lab.lb_n(2).ns().ip(&["-6", "addr"])?);
        eprintln!("n2 stats: {}", n2.cli(&["stats", "--interval", "0.1"])?);
        eprintln!("n1 stats: {}", n1.cli(&["stats", "--interval", "0.1"])?);
        return Err(e);
    }
    ensure!(lab.client_neighbour(lab.vip(AddrFamily::V4))? == Some(lab.lb_n(1).mac()));
    ensure!(lab.client_neighbour(lab.vip(AddrFamily::V6))? == Some(lab.lb_n(2).mac()));
    // One node dies: the other holds both.
    n1.kill();
    lab.lb_n(1).ns().ip(&["link", "set", "eth0", "down"])?;
    wait_vrrp(&n2, "smtp", State::Master, Duration::from_secs(2))?;
    sessions_ok(&lab, AddrFamily::V4, 10)?;
    if let Err(e) = sessions_ok(&lab, AddrFamily::V6, 10) {
        eprintln!("n2 log: {}", n2.log());
        eprintln!("n2 backends: {}", n2.cli(&["backend", "list"])?);
        return Err(e);
    }
    Ok(())
}

#[test]
fn unicast_peers_and_ipv6_failover() -> Result<()> {
    if !lab::require_root("unicast_peers_and_ipv6_failover") {
        return Ok(());
    }
    let lab = lab(2)?;
    let (a1, a2) = (lab.lb_n(1).v4(), lab.lb_n(2).v4());
    let cap = lab::capture::WireCapture::segment(&lab)?;
    let uni = |priority: u8, peer: std::net::Ipv4Addr| VrrpOpts { priority, unicast_peers: vec![peer.into()], ..Default::default() };
    let v6 = |priority: u8| VrrpOpts { name: "smtp6".into(), vrid: 52, priority, vips: vec!["mx6".into()], ..Default::default() };
    let mut n1 = node(&lab, 1, &[uni(150, a2), v6(150)])?;
    let n2 = node(&lab, 2, &[uni(100, a1), v6(100)])?;
    wait_vrrp(&n1, "smtp", State::Master, Duration::from_secs(3))?;
    wait_vrrp(&n1, "smtp6", State::Master, Duration::from_secs(3))?;
    wait_vrrp(&n2, "smtp", State::Backup, Duration::from_secs(1))?;
    wait_vrrp(&n2, "smtp6", State::Backup, Duration::from_secs(1))?;
    let adverts = cap.adverts(51);
    ensure!(!adverts.is_empty(), "no VRID 51 adverts seen");
    for e in &adverts {
        let a = e.advert().expect("advert");
        ensure!(a.dst_ip == std::net::IpAddr::from(a2) || a.dst_ip == std::net::IpAddr::from(a1), "VRID 51 advert to {} (unicast expected)", a.dst_ip);
    }
    let v6ads = cap.adverts(52);
    ensure!(v6ads.iter().all(|e| e.advert().is_some_and(|a| a.dst_ip == std::net::IpAddr::from(mxlb::vrrp::packet::MULTICAST_V6))), "IPv6 adverts go to ff02::12");
    sessions_ok(&lab, AddrFamily::V6, 10)?;
    n1.kill();
    lab.lb_n(1).ns().ip(&["link", "set", "eth0", "down"])?;
    wait_vrrp(&n2, "smtp", State::Master, Duration::from_secs(2))?;
    wait_vrrp(&n2, "smtp6", State::Master, Duration::from_secs(2))?;
    sessions_ok(&lab, AddrFamily::V4, 10)?;
    sessions_ok(&lab, AddrFamily::V6, 10)?;
    ensure!(lab.client_neighbour(lab.vip(AddrFamily::V6))? == Some(lab.lb_n(2).mac()), "unsolicited NA moved the client's IPv6 neighbour entry");
    Ok(())
}

#[test]
fn split_brain_heals_to_one_master_that_reannounces() -> Result<()> {
    if !lab::require_root("split_brain_heals_to_one_master_that_reannounces") {
        return Ok(());
    }
    let lab = lab(2)?;
    let n1 = node(&lab, 1, &[prio(150)])?;
    let n2 = node(&lab, 2, &[prio(100)])?;
    wait_vrrp(&n1, "smtp", State::Master, Duration::from_secs(3))?;
    wait_vrrp(&n2, "smtp", State::Backup, Duration::from_secs(1))?;
    // Partition: the two LB ports may not talk to each other (both still reach the client).
    let br = lab.bridge_ns();
    for k in [1, 2] {
        br.exec(&["bridge", "link", "set", "dev", lab.lb_n(k).bridge_port(), "isolated", "on"])?;
    }
    wait_vrrp(&n2, "smtp", State::Master, Duration::from_secs(2))?;
    ensure!(vrrp_state(&n1, "smtp")? == State::Master, "both are master during the partition");
    // Its GARPs pulled the client over to LB2.
    let vip = lab.vip(AddrFamily::V4);
    let t = std::time::Instant::now();
    while lab.client_neighbour(vip)? != Some(lab.lb_n(2).mac()) && t.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(lab.client_neighbour(vip)? == Some(lab.lb_n(2).mac()), "client not on LB2 during the split");
    // Heal: exactly one master (the higher priority), and the client is told to come back.
    for k in [1, 2] {
        br.exec(&["bridge", "link", "set", "dev", lab.lb_n(k).bridge_port(), "isolated", "off"])?;
    }
    wait_vrrp(&n2, "smtp", State::Backup, Duration::from_secs(2))?;
    ensure!(vrrp_state(&n1, "smtp")? == State::Master);
    let t = std::time::Instant::now();
    while lab.client_neighbour(vip)? != Some(lab.lb_n(1).mac()) && t.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(lab.client_neighbour(vip)? == Some(lab.lb_n(1).mac()), "stale ARP entry not corrected after the heal");
    sessions_ok(&lab, AddrFamily::V4, 10)?;
    Ok(())
}

#[test]
fn three_nodes_elect_one_master_and_the_next_priority_takes_over() -> Result<()> {
    if !lab::require_root("three_nodes_elect_one_master_and_the_next_priority_takes_over") {
        return Ok(());
    }
    let lab = lab(3)?;
    let mut n1 = node(&lab, 1, &[prio(150)])?;
    let n2 = node(&lab, 2, &[prio(100)])?;
    let n3 = node(&lab, 3, &[prio(50)])?;
    wait_vrrp(&n1, "smtp", State::Master, Duration::from_secs(3))?;
    wait_vrrp(&n2, "smtp", State::Backup, Duration::from_secs(1))?;
    wait_vrrp(&n3, "smtp", State::Backup, Duration::from_secs(1))?;
    let holders = |lab: &Lab| -> Result<Vec<usize>> {
        let mut v = Vec::new();
        for k in 1..=3 {
            if lab::keepalived::holds_addr(lab.lb_n(k).ns(), "eth0", lab.vip(AddrFamily::V4))? {
                v.push(k);
            }
        }
        Ok(v)
    };
    ensure!(holders(&lab)? == [1], "VIP held by {:?}", holders(&lab)?);
    // The master dies: priority 100 has the shorter Skew_Time, so it wins and 50 stays backup.
    n1.kill();
    lab.lb_n(1).ns().ip(&["link", "set", "eth0", "down"])?;
    wait_vrrp(&n2, "smtp", State::Master, Duration::from_secs(2))?;
    std::thread::sleep(Duration::from_millis(500));
    ensure!(vrrp_state(&n3, "smtp")? == State::Backup, "priority 50 took over too");
    ensure!(vrrp_status(&n3)?[0].became_master == 0, "priority 50 was master at some point");
    ensure!(holders(&lab)? == [1, 2] || holders(&lab)? == [2], "VIP held by {:?}", holders(&lab)?);
    sessions_ok(&lab, AddrFamily::V4, 10)?;
    Ok(())
}

#[test]
fn ipv4_checksum_without_pseudo_header_is_a_setting() -> Result<()> {
    if !lab::require_root("ipv4_checksum_without_pseudo_header_is_a_setting") {
        return Ok(());
    }
    let lab = lab(2)?;
    let without = |priority: u8| VrrpOpts { priority, extra: "checksum = \"no-pseudo-header\"\n".into(), ..Default::default() };
    // Both without the pseudo-header (RFC 9568's IPv4 variant): a normal election.
    let n1 = node(&lab, 1, &[without(150)])?;
    let mut n2 = node(&lab, 2, &[without(100)])?;
    wait_vrrp(&n1, "smtp", State::Master, Duration::from_secs(3))?;
    wait_vrrp(&n2, "smtp", State::Backup, Duration::from_secs(1))?;
    let st = vrrp_status(&n2)?;
    ensure!(st[0].adverts_received > 0 && st[0].dropped.is_empty(), "{st:?}");
    // A peer set the other way: every advert fails the checksum, counted, and it takes over.
    n2.stop()?;
    drop(n2);
    let n2 = node(&lab, 2, &[prio(100)])?;
    wait_vrrp(&n2, "smtp", State::Master, Duration::from_secs(3))?;
    let st = vrrp_status(&n2)?;
    ensure!(st[0].dropped.get("checksum").copied().unwrap_or(0) > 0 && st[0].adverts_received == 0, "{st:?}");
    Ok(())
}

#[test]
fn a_node_that_cannot_take_part_in_vrrp_refuses_to_start() -> Result<()> {
    if !lab::require_root("a_node_that_cannot_take_part_in_vrrp_refuses_to_start") {
        return Ok(());
    }
    let lab = lab(1)?;
    uplink(&lab)?;
    // VRRP on an interface without an IPv4 address to advertise from.
    let bad = VrrpOpts { extra: "interface = \"uplink0\"\n".into(), ..Default::default() };
    let err = match MxlbNode::start_on(&lab, 1, NodeOpts { extra: Some(bad.toml()), ..Default::default() }) {
        Ok(_) => anyhow::bail!("mxlb run started without a usable VRRP interface"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(err.contains("setting up VRRP") && err.contains("uplink0 has no IPv4 address"), "{err}");
    let link = lab.lb_n(1).ns().ip(&["-d", "link", "show", "dev", "eth0"])?;
    ensure!(!link.contains("prog/xdp"), "the balancer stayed attached: {link}");
    Ok(())
}

#[test]
fn the_master_repeats_and_refreshes_its_announcements() -> Result<()> {
    if !lab::require_root("the_master_repeats_and_refreshes_its_announcements") {
        return Ok(());
    }
    let lab = lab(1)?;
    let cap = lab::capture::WireCapture::segment(&lab)?;
    let n1 = node(&lab, 1, &[VrrpOpts { extra: "garp_repeat = 3\ngarp_refresh_ms = 1000\n".into(), ..Default::default() }])?;
    wait_vrrp(&n1, "smtp", State::Master, Duration::from_secs(3))?;
    let became = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(3500));
    let (mac, vip) = (lab.lb_n(1).mac(), lab.vip(AddrFamily::V4));
    let garps: Vec<Duration> = cap.events().iter().filter(|e| e.is_announcement(mac, vip)).map(|e| e.at).collect();
    let start = cap.at(became).saturating_sub(Duration::from_millis(500));
    let garps: Vec<Duration> = garps.into_iter().filter(|t| *t >= start).collect();
    // A burst of 3 on becoming master, then one a second (the second burst comes at 5 s).
    ensure!(garps.len() >= 3 + 2 && garps.len() <= 3 + 4, "announcements at {garps:?}");
    ensure!(garps[2] - garps[0] < Duration::from_millis(200), "the first 3 form a burst: {garps:?}");
    for w in garps[3..].windows(2) {
        let gap = w[1] - w[0];
        ensure!(gap > Duration::from_millis(800) && gap < Duration::from_millis(1300), "refresh every ~1 s: {garps:?}");
    }
    Ok(())
}
