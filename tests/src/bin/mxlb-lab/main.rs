//! `mxlb-lab`: the lab as a program, for `cargo xtask run` (the demo) and `cargo xtask bench`.
//! Same topology and helpers as the integration tests (architecture principle 5: one lab).
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use lab::{
    AddrFamily, Lab, SourceOpts,
    node::{Mode, MxlbNode, NodeOpts},
};

mod bench_failover;
mod bench_health;
mod bench_l4;
mod bench_proxy;
mod bench_relay;
mod bench_xdp;

/// Writes `target/bench/NAME.json` (`MXLB_BENCH_DIR` overrides the directory) and says where.
fn write_bench(name: &str, json: &serde_json::Value) -> Result<()> {
    let path = bench_dir()?.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(json)? + "\n").with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// `target/bench` (or `MXLB_BENCH_DIR`), created if missing: where a run's figures go.
fn bench_dir() -> Result<PathBuf> {
    let dir = std::env::var_os("MXLB_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench")));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// A file of the source tree (`bench/RESULTS.md`, `README.md`, ...), by its path from the
/// workspace root: the benchmarks keep their committed summaries up to date.
fn source_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Replaces the section of `text` between `<!-- NAME:begin -->` and `<!-- NAME:end -->` with
/// `body` (pure). Without the markers, the section is appended at the end, markers included,
/// so a new benchmark's section appears by itself and later runs replace only it: the
/// hand-written text around it survives every run.
fn replace_section(text: &str, name: &str, body: &str) -> String {
    let (begin, end) = (format!("<!-- {name}:begin -->"), format!("<!-- {name}:end -->"));
    let section = format!("{begin}\n{}\n{end}", body.trim_end());
    if let Some(b) = text.find(&begin)
        && let Some(e) = text[b..].find(&end)
    {
        return format!("{}{section}{}", &text[..b], &text[b + e + end.len()..]);
    }
    let sep = if text.is_empty() || text.ends_with("\n\n") { "" } else if text.ends_with('\n') { "\n" } else { "\n\n" };
    format!("{text}{sep}{section}\n")
}

/// [`replace_section`] on the file `rel` of the source tree (created if missing), and says so.
fn update_section(rel: &str, name: &str, body: &str) -> Result<()> {
    let path = source_file(rel);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    std::fs::write(&path, replace_section(&text, name, body)).with_context(|| format!("writing {}", path.display()))?;
    println!("updated the `{name}` section of {rel}");
    Ok(())
}

/// The middle value (the upper one of an even count); NaN for none. Benchmarks report medians
/// of repeats: one disturbed run on a shared machine does not move them.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Today's date (UTC, `date -u +%F`), to date a summary.
fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(|| "date unknown".into(), |o| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// The machine a run measured, recorded next to its figures (they compare only within one
/// run on one machine): CPU count and model, kernel release.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|(_, m)| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default();
    format!("{cpus} CPUs ({model}), kernel {kernel}")
}

fn usage() -> ! {
    eprintln!(
        "usage: mxlb-lab run [--mode dsr-l2|dsr-ipip] [--sessions N] [--for SECONDS] [--ha]\n       mxlb-lab bench xdp|health|failover|l4|relay|proxy"
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
            Some("l4") => bench_l4::run(),
            Some("relay") => bench_relay::run(),
            Some("proxy") => bench_proxy::run(),
            Some(other) => Err(anyhow::anyhow!("unknown benchmark `{other}` (available: xdp, health, failover, l4, relay, proxy)")),
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

#[cfg(test)]
mod tests {
    use super::replace_section;

    #[test]
    fn a_marked_section_is_replaced_and_the_text_around_it_kept() {
        let text = "# Results\nhand text\n<!-- l4:begin -->\nold\ntable\n<!-- l4:end -->\nmore hand text\n";
        let new = replace_section(text, "l4", "new table\n");
        assert_eq!(new, "# Results\nhand text\n<!-- l4:begin -->\nnew table\n<!-- l4:end -->\nmore hand text\n");
        // Idempotent, and another section is left alone.
        assert_eq!(replace_section(&new, "l4", "new table"), new);
        let both = replace_section(&new, "xdp", "xdp table");
        assert!(both.starts_with(&new) && both.ends_with("\n\n<!-- xdp:begin -->\nxdp table\n<!-- xdp:end -->\n"), "{both}");
        assert_eq!(replace_section(&both, "l4", "x"), replace_section(&replace_section(text, "l4", "x"), "xdp", "xdp table"));
    }

    #[test]
    fn a_missing_section_is_appended() {
        assert_eq!(replace_section("", "l4", "t"), "<!-- l4:begin -->\nt\n<!-- l4:end -->\n");
        assert_eq!(replace_section("a", "l4", "t"), "a\n\n<!-- l4:begin -->\nt\n<!-- l4:end -->\n");
        // An end marker without its begin is not a section.
        assert_eq!(replace_section("<!-- l4:end -->\n", "l4", "t"), "<!-- l4:end -->\n\n<!-- l4:begin -->\nt\n<!-- l4:end -->\n");
    }
}
