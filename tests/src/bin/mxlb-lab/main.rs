//! `mxlb-lab`: the lab as a program, for `cargo xtask run` (the demo) and `cargo xtask bench`.
//! Same topology and helpers as the integration tests (architecture principle 5: one lab).
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use lab::{
    AddrFamily, Lab, SourceOpts,
    node::{Mode, MxlbNode, NodeOpts},
};

mod bench_failover;
mod bench_health;
mod bench_xdp;

/// Writes `target/bench/NAME.json` (`MXLB_BENCH_DIR` overrides the directory) and says where.
fn write_bench(name: &str, json: &serde_json::Value) -> Result<()> {
    let dir = std::env::var_os("MXLB_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench")));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(json)? + "\n")?;
    println!("wrote {}", path.display());
    Ok(())
}

fn usage() -> ! {
    eprintln!(
        "usage: mxlb-lab run [--mode dsr-l2|dsr-ipip] [--sessions N] [--for SECONDS] [--ha]\n       mxlb-lab bench xdp|health|failover"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => demo(&args[1..]),
        Some("bench") => match args.get(1).map(String::as_str) {
            Some("xdp") => bench_xdp::run(),
            Some("health") => bench_health::run(),
            Some("failover") => bench_failover::run(),
            Some(other) => Err(anyhow::anyhow!("unknown benchmark `{other}` (available: xdp, health, failover)")),
            None => usage(),
        },
        _ => usage(),
    };
    if let Err(e) = result {
        eprintln!("mxlb-lab: {e:#}");
        std::process::exit(1);
    }
}

/// Builds the lab, runs `mxlb run` in it, sends a burst of real SMTP through the VIPs, prints
/// where it went, and keeps the lab up until Ctrl-C (or `--for SECONDS`).
fn demo(args: &[String]) -> Result<()> {
    let mut mode = Mode::DsrL2;
    let mut sessions = 600u32;
    let mut hold: Option<Duration> = None;
    let mut ha = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--mode" => {
                mode = match it.next().map(String::as_str) {
                    Some("dsr-l2") => Mode::DsrL2,
                    Some("dsr-ipip") => Mode::DsrIpip,
                    _ => bail!("--mode takes dsr-l2 or dsr-ipip"),
                }
            }
            "--sessions" => sessions = it.next().context("--sessions N")?.parse().context("--sessions N")?,
            "--ha" => ha = true,
            "--for" => hold = Some(Duration::from_secs(it.next().context("--for SECONDS")?.parse().context("--for SECONDS")?)),
            _ => usage(),
        }
    }
    if !lab::is_root() {
        bail!("the lab needs root (network namespaces, BPF): run as root");
    }
    let weights = vec![100, 200, 300];
    let lbs = if ha { 2 } else { 1 };
    println!("== building the lab: client, {lbs} LB node(s), 3 smtp-sink back-ends on one bridge (namespaces)");
    let mut builder = Lab::builder().backends(3).lbs(lbs);
    if ha {
        // The client finds the VIP by ARP/ND, answered by whichever node is VRRP master.
        builder = builder.vip_by_arp();
    }
    let lab = builder.build()?;
    println!("   prefix {}; namespaces: {}", lab.prefix(), lab.namespaces().join(" "));
    println!("== starting `mxlb run` on the LB node ({}; weights 100/200/300)", mode.as_str());
    // With --ha: both VIPs in a sync group under VRRP, LB1 priority 150, LB2 100.
    let vrrp = |priority: u8| {
        let inst = |name: &str, vip: &str| lab::vrrp::VrrpOpts { name: name.into(), priority, vips: vec![vip.into()], ..Default::default() }.toml();
        format!("{}{}[[vrrp_sync_group]]\nname = \"mail\"\ninstances = [\"smtp\", \"smtp6\"]\n", inst("smtp", "mx"), inst("smtp6", "mx6"))
    };
    let node = MxlbNode::start(&lab, NodeOpts { mode, weights: weights.clone(), extra: ha.then(|| vrrp(150)), ..Default::default() })?;
    let backup = if ha {
        println!("== starting `mxlb run` on LB2 (VRRP priority 100; LB1 has 150)");
        let b = MxlbNode::start_on(&lab, 2, NodeOpts { mode, weights, extra: Some(vrrp(100)), ..Default::default() })?;
        lab::vrrp::wait_vrrp(&node, "smtp", mxlb::vrrp::instance::State::Master, Duration::from_secs(5))?;
        lab::vrrp::wait_backends_up(&node, Duration::from_secs(10))?;
        Some(b)
    } else {
        None
    };
    println!("   config {}:\n", node.config_path.display());
    for line in node.config_text().lines().filter(|l| !l.is_empty()) {
        println!("   | {line}");
    }
    for fam in AddrFamily::ALL {
        let vip = lab.vip_addr(fam, 25);
        let per_family = if fam == AddrFamily::V4 { sessions } else { sessions / 2 };
        println!("\n== smtp-source: {per_family} SMTP sessions from the client to {vip}");
        let before: Vec<u64> = (1..=3).map(|i| lab.sink(i).counts_by_family(fam).messages).collect();
        let r = lab.smtp_source(vip, &SourceOpts { sessions: per_family, concurrency: 20, ..Default::default() })?;
        let total: u64 = before.iter().sum::<u64>() + r.completed;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let after = loop {
            let now: Vec<u64> = (1..=3).map(|i| lab.sink(i).counts_by_family(fam).messages).collect();
            if now.iter().sum::<u64>() >= total || std::time::Instant::now() > deadline {
                break now;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Messages, not sessions: the agent's health probes open sessions too.
        println!(
            "   {} completed in {:.2} s, {} failed",
            r.completed,
            r.elapsed.as_secs_f64(),
            r.failures()
        );
        for (i, (a, b)) in after.iter().zip(&before).enumerate() {
            let n = a - b;
            println!(
                "   back-end {} ({}): {:>5} sessions ({:>5.1}%)  weight {}",
                i + 1,
                lab.backend(i + 1).addr(fam),
                n,
                100.0 * n as f64 / r.completed.max(1) as f64,
                [100, 200, 300][i]
            );
        }
    }
    if let Some(b) = &backup {
        println!("\n== mxlb status on LB1 (master)\n{}", node.cli(&["status"])?);
        println!("== mxlb status on LB2 (backup)\n{}", b.cli(&["status"])?);
    }
    println!("\n== mxlb backend list\n{}", node.cli(&["backend", "list"])?);
    println!("== mxlb vip list\n{}", node.cli(&["vip", "list"])?);
    println!("== mxlb stats (1 s)\n{}", node.cli(&["stats", "--interval", "1"])?);
    let lb = lab.lb().ns().name().to_string();
    let client = lab.client().ns().name().to_string();
    let bin = lab::node::mxlb_bin()?;
    println!("== the lab stays up; try, in another terminal:");
    let mxlb = format!("{} --netns {lb} --config {}", bin.display(), node.config_path.display());
    println!("   {mxlb} backend weight b1 600");
    println!("   {mxlb} backend drain b3");
    println!("   ip netns exec {client} smtp-source -s 20 -m 1000 -l 1024 {}:25", lab.vip(AddrFamily::V4));
    println!("   {mxlb} stats");
    if let Some(b) = &backup {
        let lb2 = lab.lb_n(2).ns().name().to_string();
        println!("   ip netns exec {lb} ip link set eth0 down     # LB1 dies: LB2 takes the VIPs in ~0.36 s");
        println!("   {} --netns {lb2} --config {} status", bin.display(), b.config_path.display());
    }
    match hold {
        Some(d) => println!("== holding for {} s (Ctrl-C stops earlier), then cleaning up", d.as_secs()),
        None => println!("== Ctrl-C stops the agent and removes the lab"),
    }
    lab::wait_for_interrupt(hold);
    println!("== cleaning up");
    drop(backup);
    drop(node);
    drop(lab);
    println!("== done");
    Ok(())
}
