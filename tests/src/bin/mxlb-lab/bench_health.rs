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
    let mut sorted = trials.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    Ok(HealthResults {
        detect_ms: sorted[sorted.len() / 2],
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
    println!("\nmxlb health: back-end death to removal from the data path ({TRIALS} trials, probes every {INTERVAL_MS} ms, fall {FALL})");
    println!("  detect_ms (median)        {:>8.1}   trials {:?}", r.detect_ms, r.detect_trials_ms.iter().map(|t| t.round()).collect::<Vec<_>>());
    println!("  configured bound          {:>8.1}   (fall x interval + one probe timeout)", r.bound_ms);
    println!("  failed_after_detect       {:>8}   of {} sessions started after detection", r.failed_after_detect, r.sessions_after_detect);
    let json = serde_json::json!({
        "detect_ms": (r.detect_ms * 10.0).round() / 10.0,
        "detect_trials_ms": r.detect_trials_ms.iter().map(|t| (t * 10.0).round() / 10.0).collect::<Vec<_>>(),
        "detect_bound_ms": r.bound_ms,
        "failed_after_detect": r.failed_after_detect,
        "sessions_after_detect": r.sessions_after_detect,
        "probe_interval_ms": INTERVAL_MS,
        "fall": FALL,
        "method": "SIGKILL of back-end 1's smtp-sink under a 10-session SMTP load; detection = back-end DOWN in the pinned map (polled every 2 ms); failures counted for sessions started after detection",
    });
    super::write_bench("health", &json)
}
