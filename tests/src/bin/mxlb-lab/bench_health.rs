//! `cargo xtask bench health`: how fast a dead back-end leaves the data path, and what that
//! costs clients.
//!
//! In the lab (client, LB, three smtp-sink back-ends), with probes every 100 ms and fall 3: a
//! steady SMTP load runs (per-session client: every session attributed to its back-end, with
//! its start time) while back-end 1's mail server is killed (SIGKILL). The bench watches the
//! pinned back-end map directly (every 2 ms) for the moment back-end 1 turns DOWN:
//! `detect_ms` is kill → DOWN in the map (median of the trials), `failed_after_detect` counts
//! sessions started after that moment that failed (must be 0). The configured bound,
//! fall × interval (+ one probe timeout), is reported next to it.
//!
//! Then, with a SYN limit of 2000/s (burst 2000) per source, one source floods 60 000 raw SYNs
//! at the VIP while a normal client runs SMTP sessions: `flood_other_success` is the normal
//! client's success ratio. `xdp_syn_limited_ns` is the cost of dropping a SYN over its limit,
//! through BPF_PROG_TEST_RUN, next to the XDP_PASS baseline of the same run.
use std::{
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lab::{
    AddrFamily, Lab, SinkOpts, SmtpSink,
    node::{Mode, MxlbNode, NodeOpts},
    sessions::{Progress, SessionOpts, run_sessions},
};
use lb_common::{addr_to_key, state};
use mxlb::maps::DataplaneMaps;

const TRIALS: usize = 5;
const INTERVAL_MS: u64 = 100;
const FALL: u32 = 3;
const TIMEOUT_MS: u64 = 200;

/// State of the back-end at `addr` in the pinned map.
fn backend_state(maps: &DataplaneMaps, addr: std::net::IpAddr) -> Option<u8> {
    let key = addr_to_key(addr);
    maps.snapshot().ok()?.backends.values().find(|b| b.addr == key).map(|b| b.state)
}

fn wait_for(maps: &DataplaneMaps, addr: std::net::IpAddr, want: u8, max: Duration) -> Option<Instant> {
    let deadline = Instant::now() + max;
    while Instant::now() < deadline {
        if backend_state(maps, addr) == Some(want) {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

pub struct HealthResults {
    pub flood_other_success: f64,
    pub flood_other_sessions: usize,
    pub flood_syns: u32,
    pub flood_secs: f64,
    pub detect_ms: f64,
    pub detect_trials_ms: Vec<f64>,
    pub failed_after_detect: usize,
    pub sessions_after_detect: usize,
    pub bound_ms: f64,
}

pub fn measure() -> Result<HealthResults> {
    let lab = Lab::builder().backends(3).build()?;
    let opts = NodeOpts {
        mode: Mode::DsrL2,
        health: Some(format!("interval_ms = {INTERVAL_MS}\ntimeout_ms = {TIMEOUT_MS}\nrise = 2\nfall = {FALL}")),
        ..Default::default()
    };
    let node = MxlbNode::start(&lab, opts)?;
    let maps = DataplaneMaps::open_pinned(&node.bpffs_dir)?;
    let victim = lab.backend(1);
    let addr: std::net::IpAddr = victim.v4().into();
    wait_for(&maps, addr, state::UP, Duration::from_secs(10)).context("back-end 1 never up")?;
    let mut replacement: Option<SmtpSink> = None;
    let (mut trials, mut failed, mut after) = (Vec::new(), 0, 0);
    for trial in 0..TRIALS {
        let progress = Progress::default();
        let opts = SessionOpts { sessions: 100_000, concurrency: 10, ..Default::default() };
        let (outcomes, killed, detected) = std::thread::scope(|s| {
            let load = s.spawn(|| run_sessions(lab.client().ns(), lab.vip_addr(AddrFamily::V4, 25), &opts, &progress));
            progress.wait_done(200, Duration::from_secs(30));
            let pids = match &replacement {
                Some(r) => r.pids(),
                None => lab.sink(1).pids(),
            };
            let killed = Instant::now();
            for pid in pids {
                // SAFETY: kill(2) on a process the lab started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            let detected = wait_for(&maps, addr, state::DOWN, Duration::from_secs(10));
            progress.wait_done(progress.done.load(Relaxed) + 400, Duration::from_secs(30));
            progress.stop();
            (load.join().expect("load thread"), killed, detected)
        });
        let outcomes = outcomes?;
        let Some(detected) = detected else { bail!("trial {trial}: back-end 1 never marked down") };
        trials.push(detected.duration_since(killed).as_secs_f64() * 1e3);
        let late: Vec<_> = outcomes.iter().filter(|o| o.started > detected).collect();
        after += late.len();
        failed += late.iter().filter(|o| o.error.is_some()).count();
        // Bring it back for the next trial.
        drop(replacement.take());
        replacement = Some(SmtpSink::start(victim.ns(), &SinkOpts { hostname: Some(victim.name()), ..Default::default() })?);
        wait_for(&maps, addr, state::UP, Duration::from_secs(10)).context("back-end 1 never came back")?;
    }

    // A single-source SYN flood against the normal client's sessions.
    node.cli(&["block", "rate", "2000", "--burst", "2000"])?;
    let flooder = std::net::Ipv4Addr::new(198, 18, 0, 3);
    lab.client().ns().ip(&["addr", "add", &format!("{flooder}/24"), "dev", lab.client().dev()])?;
    let progress = Progress::default();
    let opts = SessionOpts { sessions: 100_000, concurrency: 4, ..Default::default() };
    let (outcomes, flood) = std::thread::scope(|s| {
        let load = s.spawn(|| run_sessions(lab.client().ns(), lab.vip_addr(AddrFamily::V4, 25), &opts, &progress));
        progress.wait_done(20, Duration::from_secs(20));
        let flood = lab.client().ns().run(|| lab::flood::syn_flood(flooder, lab::VIP4, 60_000, Duration::from_secs(10)));
        progress.stop();
        (load.join().expect("load thread"), flood)
    });
    let outcomes = outcomes?;
    let (flood_syns, flood_time) = flood??;
    let ok = outcomes.iter().filter(|o| o.error.is_none()).count();
    Ok(HealthResults {
        flood_other_success: ok as f64 / outcomes.len().max(1) as f64,
        flood_other_sessions: outcomes.len(),
        flood_syns,
        flood_secs: flood_time.as_secs_f64(),
        detect_ms: super::median(trials.clone()),
        detect_trials_ms: trials,
        failed_after_detect: failed,
        sessions_after_detect: after,
        bound_ms: (FALL as u64 * INTERVAL_MS + TIMEOUT_MS) as f64,
    })
}

pub fn run() -> Result<()> {
    if !lab::is_root() {
        bail!("bench health needs root (network namespaces, BPF)");
    }
    let r = measure()?;
    let xdp = super::bench_xdp::measure_isolated()?;
    let (pass_ns, limited_ns) = (xdp.figures["pass_ns"], xdp.figures["syn_limited_ns"]);
    println!("\nmxlb health: back-end death to removal from the data path ({TRIALS} trials, probes every {INTERVAL_MS} ms, fall {FALL})");
    println!("  detect_ms (median)        {:>8.1}   trials {:?}", r.detect_ms, r.detect_trials_ms.iter().map(|t| t.round()).collect::<Vec<_>>());
    println!("  configured bound          {:>8.1}   (fall x interval + one probe timeout)", r.bound_ms);
    println!("  failed_after_detect       {:>8}   of {} sessions started after detection", r.failed_after_detect, r.sessions_after_detect);
    println!(
        "  flood_other_success       {:>8.4}   ({} sessions of a normal client while one source sent {} SYNs in {:.2} s)",
        r.flood_other_success, r.flood_other_sessions, r.flood_syns, r.flood_secs
    );
    println!("  xdp_syn_limited_ns        {:>8.1}   (XDP_PASS baseline in the same run: {pass_ns:.1} ns)", limited_ns);
    let json = serde_json::json!({
        "detect_ms": (r.detect_ms * 10.0).round() / 10.0,
        "detect_trials_ms": r.detect_trials_ms.iter().map(|t| (t * 10.0).round() / 10.0).collect::<Vec<_>>(),
        "detect_bound_ms": r.bound_ms,
        "failed_after_detect": r.failed_after_detect,
        "sessions_after_detect": r.sessions_after_detect,
        "probe_interval_ms": INTERVAL_MS,
        "flood_other_success": r.flood_other_success,
        "flood_other_sessions": r.flood_other_sessions,
        "flood_syns": r.flood_syns,
        "flood_secs": (r.flood_secs * 100.0).round() / 100.0,
        "xdp_syn_limited_ns": limited_ns,
        "xdp_pass_ns": pass_ns,
        "fall": FALL,
        "method": "SIGKILL of back-end 1's smtp-sink under a 10-session SMTP load; detection = back-end DOWN in the pinned map (polled every 2 ms); failures counted for sessions started after detection",
    });
    super::write_bench("health", &json)
}
