//! `cargo xtask bench l4`: what mxlb costs a mail session, next to the floor (no load balancer)
//! and next to HAProxy, in one lab and one run.
//!
//! Topology: the lab's client, LB node and three back-ends, each running smtp-sink on port 25
//! and Dovecot (idle here: the rows measure SMTP and TCP connects). The rows, measured back to
//! back in this order, the whole sequence repeated [`REPEATS`] times (a figure is the median of
//! its repeats, so one disturbed run on a shared machine does not decide it):
//! - `direct`: the client straight to back-end 1's sink, the floor;
//! - `mxlb_l2`, `mxlb_ipip`: `mxlb run` on the LB node in dsr-l2 / dsr-ipip, weights
//!   100/200/300, to the IPv4 VIP;
//! - `haproxy`: HAProxy `mode tcp` on the LB node, `balance roundrobin` over the same back-ends
//!   with the same weights (a full proxy: the replies come back through it).
//!
//! Each LB is started for its row and stopped after it, so only one is ever in the path (an XDP
//! program left attached would also touch HAProxy's packets).
//!
//! Per row and repeat, `mxlb-bench` in the client namespace, closed loop at [`CONCURRENCY`]:
//! [`WARMUP`] unmeasured sessions (ARP/ND, conntrack, HAProxy's first connections), then
//! [`SESSIONS`] SMTP sessions of one [`MSG_SIZE`]-byte message each (sessions/s; p99 of the
//! whole session, connect to close), then [`CONNECTS`] bare TCP connects (connect/s).
//!
//! CPU on the LB node, around the measured SMTP run ([`lab::cpu`] explains the method): the
//! LB's process time (for mxlb the control plane only: its data path runs in softirq) and the
//! system-wide softirq and busy time less the same repeat's `direct` window (same sessions, no
//! LB), all per 1000 sessions. The two can overlap, so they are shown side by side, not added.
//!
//! The generators run on CPU 0 and the sinks on the last CPU ([`lab::loadgen`]), so the
//! generator cannot make a row look slower by taking a server's CPU; the LBs are not pinned.
//!
//! On the direct row, Postfix's smtp-source also runs [`SESSIONS`] sessions: its rate and
//! mxlb-bench's, both timed from outside (process start included), and their difference are
//! shown (issue 6 expects them within 15%), not asserted.
//!
//! Output: the table on stdout, `target/bench/l4.json`, the chart `target/bench/l4.png` (copied
//! to `bench/l4.png`), and the `l4` sections of `bench/RESULTS.md` and `README.md`.
use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use lab::{
    AddrFamily, Lab, SourceOpts,
    cpu::CpuUse,
    dovecot::Dovecot,
    haproxy::{HaproxyOpts, HaproxyTcp},
    loadgen,
    node::{Mode, MxlbNode, NodeOpts},
};
use serde_json::{Value, json};

use super::median;

const REPEATS: usize = 3;
/// About a second per window at this machine's rates: a few hundred clock ticks for the CPU
/// figures, and the whole run stays near three minutes.
const SESSIONS: u32 = 6000;
/// Connects are ~3× faster than sessions: more of them for a window of similar length.
const CONNECTS: u32 = 8000;
const WARMUP: u32 = 300;
const CONCURRENCY: u32 = 20;
/// 1 KiB: a typical small message, so the figures weigh the connection handling the LB adds
/// rather than bulk transfer.
const MSG_SIZE: usize = 1024;
const WEIGHTS: [u32; 3] = [100, 200, 300];
/// Issue 6's targets for mxlb, shown beside the figures (a benchmark reports, it does not
/// assert): sessions/s at most 5% below the floor, p99 at most 0.2 ms above it.
const TARGET_RATE_LOSS: f64 = 0.05;
const TARGET_P99_ADDED_MS: f64 = 0.2;
/// Issue 6: mxlb-bench and smtp-source agree within 15% on the same sink.
const SOURCE_CHECK_PCT: f64 = 15.0;
/// The chart's text: read at run time (Debian's fonts-dejavu-core), no fontconfig needed.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Row {
    Direct,
    MxlbL2,
    MxlbIpip,
    Haproxy,
}

impl Row {
    const ALL: [Row; 4] = [Row::Direct, Row::MxlbL2, Row::MxlbIpip, Row::Haproxy];

    /// Its key in l4.json.
    fn key(self) -> &'static str {
        match self {
            Row::Direct => "direct",
            Row::MxlbL2 => "mxlb_l2",
            Row::MxlbIpip => "mxlb_ipip",
            Row::Haproxy => "haproxy",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Row::Direct => "direct to one back-end (floor)",
            Row::MxlbL2 => "mxlb dsr-l2",
            Row::MxlbIpip => "mxlb dsr-ipip",
            Row::Haproxy => "HAProxy mode tcp",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Row::Direct => "direct",
            Row::MxlbL2 => "mxlb l2",
            Row::MxlbIpip => "mxlb ipip",
            Row::Haproxy => "HAProxy",
        }
    }

    fn is_mxlb(self) -> bool {
        matches!(self, Row::MxlbL2 | Row::MxlbIpip)
    }
}

/// The load balancer of the row being measured; dropping it stops it.
enum Lb<'a> {
    None,
    Mxlb(MxlbNode<'a>),
    Haproxy(HaproxyTcp<'a>),
}

impl<'a> Lb<'a> {
    /// Starts the row's LB; returns it and where the client connects.
    fn start(lab: &'a Lab, row: Row) -> Result<(Lb<'a>, SocketAddr)> {
        Ok(match row {
            Row::Direct => (Lb::None, SocketAddr::new(lab.backend(1).addr(AddrFamily::V4), 25)),
            Row::MxlbL2 | Row::MxlbIpip => {
                let mode = if row == Row::MxlbL2 { Mode::DsrL2 } else { Mode::DsrIpip };
                let node = MxlbNode::start(lab, NodeOpts { mode, weights: WEIGHTS.to_vec(), ..Default::default() })?;
                lab::vrrp::wait_backends_up(&node, Duration::from_secs(10))?;
                (Lb::Mxlb(node), lab.vip_addr(AddrFamily::V4, 25))
            }
            Row::Haproxy => {
                let hap = HaproxyTcp::start(lab, &HaproxyOpts::new(lab, WEIGHTS.to_vec()))?;
                let listen = hap.listen();
                (Lb::Haproxy(hap), listen)
            }
        })
    }

    /// The processes whose CPU time is the LB's.
    fn pids(&self) -> Vec<u32> {
        match self {
            Lb::None => vec![],
            Lb::Mxlb(n) => n.pid().into_iter().collect(),
            Lb::Haproxy(h) => vec![h.pid()],
        }
    }
}

/// One row's figures in one repeat.
#[derive(Clone, Debug)]
struct Sample {
    sessions_per_s: f64,
    p99_ms: f64,
    connect_per_s: f64,
    /// The SMTP run's wall time timed from outside (for the smtp-source comparison).
    wall_s: f64,
    /// CPU during the SMTP run (LB processes, system-wide softirq and busy).
    cpu: CpuUse,
}

/// `mxlb-bench MODE TARGET -c CONCURRENCY -n N` on the generator CPU; fails unless all N
/// sessions succeeded (a rate with failures in it is not comparable).
fn load(lab: &Lab, mode: &str, target: SocketAddr, n: u32) -> Result<Value> {
    let (t, c, n_s, size) = (target.to_string(), CONCURRENCY.to_string(), n.to_string(), MSG_SIZE.to_string());
    let v = loadgen::on_generator_cpu(|| loadgen::mxlb_bench(lab, &[mode, &t, "-c", &c, "-n", &n_s, "-s", &size, "-q"]))?;
    ensure!(
        v["sessions_ok"] == n,
        "{mode} to {target}: {} of {n} sessions succeeded; errors {} {}",
        v["sessions_ok"],
        v["errors"],
        v["error_samples"]
    );
    Ok(v)
}

fn measure(lab: &Lab, target: SocketAddr, lb: &Lb) -> Result<Sample> {
    load(lab, "smtp", target, WARMUP)?;
    let (v, cpu) = CpuUse::measure(&lb.pids(), || load(lab, "smtp", target, SESSIONS));
    let v = v?;
    let conn = load(lab, "connect", target, CONNECTS)?;
    Ok(Sample {
        sessions_per_s: loadgen::rate(&v, "sessions_per_s")?,
        p99_ms: v["latency_ms"]["session"]["p99"].as_f64().with_context(|| format!("no session p99 in {v}"))?,
        connect_per_s: loadgen::rate(&conn, "sessions_per_s")?,
        wall_s: loadgen::rate(&v, "wall_s")?,
        cpu,
    })
}

/// smtp-source with the direct row's sessions, concurrency and size; its rate timed from
/// outside (sessions / wall time).
fn smtp_source_rate(lab: &Lab, target: SocketAddr) -> Result<f64> {
    let opts = SourceOpts {
        sessions: SESSIONS,
        concurrency: CONCURRENCY,
        msg_size: MSG_SIZE,
        timeout: Duration::from_secs(120),
        ..Default::default()
    };
    let r = loadgen::on_generator_cpu(|| lab.smtp_source(target, &opts))?;
    ensure!(r.ok(), "smtp-source to {target} failed: {} problems\n{}", r.failures(), r.stderr);
    Ok(r.completed as f64 / r.elapsed.as_secs_f64())
}

/// A row's medians over the repeats, and its LB CPU per 1000 sessions.
struct Figures {
    row: Row,
    samples: Vec<Sample>,
    sessions_per_s: f64,
    p99_ms: f64,
    connect_per_s: f64,
    /// LB processes, ms per 1000 sessions (median over repeats).
    process_ms: f64,
    /// System-wide softirq above the same repeat's direct window, ms per 1000 sessions.
    softirq_ms: f64,
    /// System-wide busy time above the same repeat's direct window, ms per 1000 sessions.
    busy_ms: f64,
}

impl Figures {
    fn new(row: Row, samples: Vec<Sample>, direct: &[Sample]) -> Figures {
        let of = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
        let net: Vec<CpuUse> =
            samples.iter().zip(direct).map(|(s, d)| s.cpu.minus(&d.cpu).per_1000(u64::from(SESSIONS))).collect();
        let cpu = |f: fn(&CpuUse) -> f64| median(net.iter().map(f).collect());
        Figures {
            row,
            sessions_per_s: of(|s| s.sessions_per_s),
            p99_ms: of(|s| s.p99_ms),
            connect_per_s: of(|s| s.connect_per_s),
            process_ms: cpu(|c| c.process_ms),
            softirq_ms: cpu(|c| c.softirq_ms),
            busy_ms: cpu(|c| c.busy_ms),
            samples,
        }
    }

    /// Sessions/s relative to the floor (-0.03 = 3% fewer).
    fn rate_vs(&self, floor: &Figures) -> f64 {
        self.sessions_per_s / floor.sessions_per_s - 1.0
    }

    /// Whether mxlb meets issue 6's targets against the floor.
    fn meets_targets(&self, floor: &Figures) -> bool {
        self.rate_vs(floor) >= -TARGET_RATE_LOSS && self.p99_ms - floor.p99_ms <= TARGET_P99_ADDED_MS
    }
}

/// mxlb-bench against smtp-source on the direct row: (mxlb-bench/s, smtp-source/s) per repeat.
struct SourceCheck(Vec<(f64, f64)>);

impl SourceCheck {
    /// Medians (mxlb-bench/s, smtp-source/s) and the difference in % of smtp-source's.
    fn summary(&self) -> (f64, f64, f64) {
        let a = median(self.0.iter().map(|p| p.0).collect());
        let b = median(self.0.iter().map(|p| p.1).collect());
        (a, b, (a - b) / b * 100.0)
    }
}

pub fn run() -> Result<()> {
    if !lab::is_root() {
        bail!("bench l4 needs root (network namespaces, BPF)");
    }
    loadgen::bench_bin()?;
    lab::haproxy::haproxy_bin()?;
    let machine = super::machine();
    println!(
        "== bench l4 on {machine}: {REPEATS} repeats of {} rows; per row {WARMUP} warm-up + {SESSIONS} SMTP sessions of {MSG_SIZE} B and {CONNECTS} connects, concurrency {CONCURRENCY}",
        Row::ALL.len()
    );
    let lab = Lab::builder().backends(3).build()?;
    // Every row opens ~15 000 connections from one client address to one server address and
    // port, and the rows repeat within TIME_WAIT's 60 s: widen the client's ephemeral ports,
    // let it reuse TIME_WAIT ones and keep few of them (as on a tuned load-generator host).
    // Without this, a row that follows another to the same destination measured up to 5x fewer
    // connects/s (connect() searching a port range full of TIME_WAIT entries), whatever the LB.
    let client = lab.client().ns();
    client.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    client.sysctl("net.ipv4.tcp_max_tw_buckets", "4096")?;
    let _dovecots = lab
        .backends()
        .iter()
        .enumerate()
        .map(|(i, b)| Dovecot::start(b.ns(), &format!("b{}", i + 1), &[("bench", "bench")], b.addr(AddrFamily::V4)))
        .collect::<Result<Vec<_>>>()?;
    let pinned = loadgen::pin_sinks(&lab);
    println!("   lab {} up; sinks pinned to the last CPU, generators to CPU 0: {pinned}", lab.prefix());

    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); Row::ALL.len()];
    let mut check = SourceCheck(Vec::new());
    for rep in 1..=REPEATS {
        for (i, row) in Row::ALL.into_iter().enumerate() {
            println!("== repeat {rep}/{REPEATS}: {}", row.label());
            let (lb, target) = Lb::start(&lab, row).with_context(|| format!("starting the {} row", row.key()))?;
            let s = measure(&lab, target, &lb).with_context(|| format!("measuring the {} row", row.key()))?;
            println!(
                "   {:.0} sessions/s, p99 {:.2} ms, {:.0} connect/s; CPU in the SMTP window: {}",
                s.sessions_per_s, s.p99_ms, s.connect_per_s, s.cpu
            );
            if row == Row::Direct {
                let theirs = smtp_source_rate(&lab, target)?;
                let ours = f64::from(SESSIONS) / s.wall_s;
                println!("   smtp-source, same sessions: {theirs:.0}/s; mxlb-bench timed the same way: {ours:.0}/s");
                check.0.push((ours, theirs));
            }
            drop(lb);
            samples[i].push(s);
        }
    }
    drop(_dovecots);
    drop(lab);

    let direct = samples[0].clone();
    let figures: Vec<Figures> = Row::ALL.into_iter().zip(samples).map(|(row, s)| Figures::new(row, s, &direct)).collect();
    print_table(&figures, &check);
    super::write_bench("l4", &to_json(&figures, &check, &machine, pinned))?;
    let png = super::bench_dir()?.join("l4.png");
    chart(&figures, &machine, &png)?;
    println!("wrote {}", png.display());
    let copy = super::source_file("bench/l4.png");
    std::fs::copy(&png, &copy).with_context(|| format!("copying the chart to {}", copy.display()))?;
    println!("copied it to {}", copy.display());
    super::update_section("bench/RESULTS.md", "l4", &markdown(&figures, &check, &machine, "l4.png"))?;
    super::update_section("README.md", "l4", &markdown(&figures, &check, &machine, "bench/l4.png"))
}

fn print_table(figures: &[Figures], check: &SourceCheck) {
    let floor = &figures[0];
    println!(
        "\nL4, medians of {REPEATS} repeats ({SESSIONS} SMTP sessions x {MSG_SIZE} B and {CONNECTS} connects, concurrency {CONCURRENCY})"
    );
    println!(
        "{:<32} {:>10} {:>8} {:>8} {:>8} {:>10} | LB CPU ms/1000 sessions: {:>7} {:>8} {:>6}",
        "row", "sessions/s", "vs floor", "p99 ms", "+p99 ms", "connect/s", "process", "softirq+", "busy+"
    );
    for f in figures {
        let (vs, added) = if f.row == Row::Direct {
            (String::new(), String::new())
        } else {
            (format!("{:+.1}%", f.rate_vs(floor) * 100.0), format!("{:+.2}", f.p99_ms - floor.p99_ms))
        };
        println!(
            "{:<32} {:>10.0} {:>8} {:>8.2} {:>8} {:>10.0} | {:>31.1} {:>8.1} {:>6.1}",
            f.row.label(),
            f.sessions_per_s,
            vs,
            f.p99_ms,
            added,
            f.connect_per_s,
            f.process_ms,
            f.softirq_ms,
            f.busy_ms
        );
    }
    for f in figures.iter().filter(|f| f.row.is_mxlb()) {
        println!(
            "target for {} (shown, not asserted): sessions/s within {:.0}% of the floor and p99 at most {TARGET_P99_ADDED_MS} ms above it: {}",
            f.row.label(),
            TARGET_RATE_LOSS * 100.0,
            if f.meets_targets(floor) { "met" } else { "NOT met" }
        );
    }
    let (ours, theirs, diff) = check.summary();
    println!(
        "smtp-source check (direct row, timed from outside): mxlb-bench {ours:.0}/s, smtp-source {theirs:.0}/s, difference {diff:+.1}% (issue 6: within {SOURCE_CHECK_PCT}%)"
    );
}

fn round(v: f64, digits: i32) -> f64 {
    let k = 10f64.powi(digits);
    (v * k).round() / k
}

fn to_json(figures: &[Figures], check: &SourceCheck, machine: &str, pinned: bool) -> Value {
    let floor = &figures[0];
    let mut out = serde_json::Map::new();
    for f in figures {
        let each = |g: fn(&Sample) -> f64, d: i32| f.samples.iter().map(|s| round(g(s), d)).collect::<Vec<_>>();
        let mut row = json!({
            "sessions_per_s": round(f.sessions_per_s, 1),
            "p99_ms": round(f.p99_ms, 3),
            "connect_per_s": round(f.connect_per_s, 1),
            "repeats": {
                "sessions_per_s": each(|s| s.sessions_per_s, 1),
                "p99_ms": each(|s| s.p99_ms, 3),
                "connect_per_s": each(|s| s.connect_per_s, 1),
                "cpu_window": f.samples.iter().map(|s| json!({
                    "wall_ms": round(s.cpu.wall_ms, 1),
                    "lb_process_ms": round(s.cpu.process_ms, 1),
                    "softirq_ms": round(s.cpu.softirq_ms, 1),
                    "busy_ms": round(s.cpu.busy_ms, 1),
                })).collect::<Vec<_>>(),
            },
        });
        if f.row != Row::Direct {
            row["sessions_vs_direct_pct"] = round(f.rate_vs(floor) * 100.0, 2).into();
            row["p99_added_ms"] = round(f.p99_ms - floor.p99_ms, 3).into();
            row["lb_cpu_ms_per_1000_sessions"] = json!({
                "process": round(f.process_ms, 2),
                "softirq_above_direct": round(f.softirq_ms, 2),
                "busy_above_direct": round(f.busy_ms, 2),
            });
        }
        if f.row.is_mxlb() {
            row["meets_targets"] = f.meets_targets(floor).into();
        }
        out.insert(f.row.key().into(), row);
    }
    let (ours, theirs, diff) = check.summary();
    out.insert(
        "smtp_source_check".into(),
        json!({
            "mxlb_bench_per_s": round(ours, 1),
            "smtp_source_per_s": round(theirs, 1),
            "difference_pct": round(diff, 2),
            "target_pct": SOURCE_CHECK_PCT,
            "repeats": check.0.iter().map(|(a, b)| json!([round(*a, 1), round(*b, 1)])).collect::<Vec<_>>(),
            "method": "the direct row's sessions, concurrency and message size; both rates timed from outside (sessions / wall time of the command)",
        }),
    );
    out.insert(
        "targets".into(),
        json!({ "mxlb_sessions_vs_direct_pct": -TARGET_RATE_LOSS * 100.0, "mxlb_p99_added_ms": TARGET_P99_ADDED_MS }),
    );
    out.insert(
        "settings".into(),
        json!({
            "repeats": REPEATS, "sessions": SESSIONS, "connects": CONNECTS, "warmup_sessions": WARMUP,
            "concurrency": CONCURRENCY, "msg_size": MSG_SIZE, "weights": WEIGHTS, "pinned": pinned,
        }),
    );
    out.insert("machine".into(), machine.into());
    out.insert(
        "method".into(),
        "rows direct, mxlb_l2, mxlb_ipip, haproxy measured back to back, the sequence repeated; medians of the repeats; \
         mxlb-bench closed loop in the client namespace; LB CPU per 1000 sessions: LB process time and system-wide \
         softirq/busy less the same repeat's direct window (tests/src/cpu.rs)"
            .into(),
    );
    Value::Object(out)
}

/// The `l4` section of RESULTS.md and README.md (`img`: the chart, relative to the file).
fn markdown(figures: &[Figures], check: &SourceCheck, machine: &str, img: &str) -> String {
    let floor = &figures[0];
    let mut s = format!(
        "Latest `cargo xtask bench l4`: {machine}, {}. Medians of {REPEATS} repeats; per row {SESSIONS} SMTP sessions \
         (one {MSG_SIZE}-byte message each) and {CONNECTS} TCP connects, {CONCURRENCY} concurrent.\n\n\
         | row | SMTP sessions/s | vs floor | p99 session, ms | vs floor | connect/s | LB CPU per 1000 sessions, ms: process | softirq above floor | busy above floor |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        super::today()
    );
    for f in figures {
        let (vs, added, cpu) = if f.row == Row::Direct {
            ("—".to_string(), "—".to_string(), "— | — | —".to_string())
        } else {
            (
                format!("{:+.1}%", f.rate_vs(floor) * 100.0),
                format!("{:+.2} ms", f.p99_ms - floor.p99_ms),
                format!("{:.1} | {:.1} | {:.1}", f.process_ms, f.softirq_ms, f.busy_ms),
            )
        };
        s += &format!(
            "| {} | {:.0} | {vs} | {:.2} | {added} | {:.0} | {cpu} |\n",
            f.row.label(),
            f.sessions_per_s,
            f.p99_ms,
            f.connect_per_s
        );
    }
    s += &format!(
        "\n- Targets for mxlb (shown, not asserted): sessions/s within {:.0}% of the floor and p99 at most {TARGET_P99_ADDED_MS} ms above it — ",
        TARGET_RATE_LOSS * 100.0
    );
    let verdicts: Vec<String> = figures
        .iter()
        .filter(|f| f.row.is_mxlb())
        .map(|f| format!("{}: {}", f.row.label(), if f.meets_targets(floor) { "met" } else { "not met" }))
        .collect();
    s += &verdicts.join("; ");
    let (ours, theirs, diff) = check.summary();
    s += &format!(
        ".\n- Load generator check on the direct row (same sessions, timed from outside): mxlb-bench {ours:.0}/s, \
         Postfix smtp-source {theirs:.0}/s, difference {diff:+.1}% (expected within {SOURCE_CHECK_PCT}%).\n\n\
         ![SMTP sessions/s, p99 session latency and connect/s per row]({img})\n"
    );
    s
}

/// Bars per row for sessions/s, p99 and connect/s, each repeat as a dot.
fn chart(figures: &[Figures], machine: &str, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};

    let font = std::fs::read(FONT).with_context(|| format!("reading {FONT} (Debian package fonts-dejavu-core)"))?;
    // plotters keeps registered fonts for the life of the process.
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice()))
        .map_err(|_| anyhow!("{FONT} is not a usable TrueType font"))?;
    let err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing {}: {e}", path.display());
    let colors = [RGBColor(120, 120, 120), RGBColor(31, 119, 180), RGBColor(44, 160, 44), RGBColor(214, 39, 40)];
    let root = BitMapBackend::new(path, (1500, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled(
            &format!("mxlb L4: {SESSIONS} SMTP sessions x {MSG_SIZE} B, {CONCURRENCY} concurrent, median of {REPEATS} (dots: repeats) — {machine}"),
            ("sans-serif", 20),
        )
        .map_err(err)?;
    let panels: [(&str, fn(&Figures) -> f64, fn(&Sample) -> f64, usize); 3] = [
        ("SMTP sessions/s (higher is better)", |f| f.sessions_per_s, |s| s.sessions_per_s, 0),
        ("p99 session latency, ms (lower is better)", |f| f.p99_ms, |s| s.p99_ms, 2),
        ("TCP connects/s (higher is better)", |f| f.connect_per_s, |s| s.connect_per_s, 0),
    ];
    for (area, (title, median_of, sample_of, digits)) in root.split_evenly((1, 3)).iter().zip(panels) {
        // The highest dot or bar of each row, for its value label.
        let highest: Vec<f64> =
            figures.iter().map(|f| f.samples.iter().map(sample_of).fold(median_of(f), f64::max)).collect();
        let top = highest.iter().copied().fold(0.0, f64::max);
        let mut c = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 17))
            .margin(14)
            .x_label_area_size(34)
            .y_label_area_size(62)
            // A segmented range includes its end: 0..n-1 makes n segments.
            .build_cartesian_2d((0..figures.len().saturating_sub(1)).into_segmented(), 0.0..top * 1.15)
            .map_err(err)?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => figures.get(*i).map_or("", |f| f.row.short()).to_string(),
                _ => String::new(),
            })
            .y_label_formatter(&|v| format!("{v:.0$}", digits.saturating_sub(1)))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        c.draw_series(figures.iter().enumerate().map(|(i, f)| {
            let mut bar = Rectangle::new(
                [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), median_of(f))],
                colors[i % colors.len()].filled(),
            );
            bar.set_margin(0, 0, 16, 16);
            bar
        }))
        .map_err(err)?;
        c.draw_series(figures.iter().enumerate().flat_map(|(i, f)| {
            f.samples.iter().map(move |s| Circle::new((SegmentValue::CenterOf(i), sample_of(s)), 3, BLACK.filled()))
        }))
        .map_err(err)?;
        let label = ("sans-serif", 15).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Bottom));
        c.draw_series(figures.iter().zip(&highest).enumerate().map(|(i, (f, h))| {
            Text::new(format!("{:.digits$}", median_of(f)), (SegmentValue::CenterOf(i), h + top * 0.03), label.clone())
        }))
        .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}
