//! End to end: real SMTP sessions from Postfix's smtp-source, through `mxlb run` on the LB
//! node's XDP program, to three smtp-sink back-ends, in network namespaces. Per mode (dsr-l2,
//! dsr-ipip) and family (IPv4, IPv6):
//! - 6000 sessions spread by weight (100/200/300) within ±10%, none failing;
//! - a weight change and a drain made with the CLI mid-run take effect at once, with zero
//!   failed sessions;
//! - a back-end removed mid-run: no session to the others fails (each session attributed to
//!   the back-end that greeted it).
//! Needs root; skips locally otherwise, fails under CI=true.
use std::{
    sync::{Mutex, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use lab::{
    AddrFamily, Lab, SinkCounts, SinkOpts, SourceOpts,
    node::{Mode, MxlbNode, NodeOpts},
    sessions::{Progress, SessionOpts, run_sessions},
};

/// Labs in this binary run one at a time: on two cores, parallel load runs would measure the
/// machine, not mxlb.
static SERIAL: Mutex<()> = Mutex::new(());

/// Sessions per measured run. Flows hash like random draws, so a share's spread is binomial:
/// 6000 sessions put ±10% of the smallest share (1/6) at 3.5 standard deviations, a test that
/// fails for a wrong distribution and not for an unlucky one.
const SESSIONS: u32 = 6000;
const CONCURRENCY: u32 = 20;

fn source_opts(sessions: u32) -> SourceOpts {
    SourceOpts {
        sessions,
        concurrency: CONCURRENCY,
        msg_size: 1024,
        timeout: Duration::from_secs(120),
        ..Default::default()
    }
}

fn counts(lab: &Lab, fam: AddrFamily) -> Vec<SinkCounts> {
    (1..=lab.backends().len()).map(|i| lab.sink(i).counts_by_family(fam)).collect()
}

/// Messages each sink received between two readings. Messages, not sessions: the agent's
/// health probes open sessions too (EHLO, QUIT) but never send a message.
fn diff(after: &[SinkCounts], before: &[SinkCounts]) -> Vec<u64> {
    after.iter().zip(before).map(|(a, b)| a.messages - b.messages).collect()
}

/// Waits until the sinks of `fam` have received `total` messages in all.
fn wait_total(lab: &Lab, fam: AddrFamily, total: u64) -> Vec<SinkCounts> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = counts(lab, fam);
        let sum: u64 = c.iter().map(|c| c.messages).sum();
        if sum >= total || Instant::now() > deadline {
            return c;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The sinks' counters once they have stopped moving (they are read from the sinks' output,
/// which can trail the sessions under load): a clean before/after boundary for a measurement.
fn settled(lab: &Lab, fam: AddrFamily) -> Vec<SinkCounts> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = counts(lab, fam);
    let mut since = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let now = counts(lab, fam);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= Duration::from_millis(400) {
            break;
        }
    }
    last
}

/// Every back-end's share of `got` is within ±10% of its share of `weights`.
#[track_caller]
fn assert_weighted(got: &[u64], weights: &[u32], what: &str) {
    let total: u64 = got.iter().sum();
    let wsum: u32 = weights.iter().sum();
    for (i, (g, w)) in got.iter().zip(weights).enumerate() {
        let expected = total as f64 * *w as f64 / wsum as f64;
        if *w == 0 {
            assert_eq!(*g, 0, "{what}: back-end {} has weight 0 but got {g} sessions ({got:?})", i + 1);
            continue;
        }
        let err = (*g as f64 - expected).abs() / expected;
        assert!(err <= 0.10, "{what}: back-end {} got {g} sessions, expected {expected:.0} ±10% ({got:?})", i + 1);
    }
}

fn scenario(mode: Mode, fam: AddrFamily) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let weights = [100, 200, 300];
    let sinks = SinkOpts { backlog: 1024, ..Default::default() };
    let lab = Lab::builder().backends(3).sinks(sinks).build().expect("lab");
    let node = MxlbNode::start(&lab, NodeOpts { mode, weights: weights.to_vec(), ..Default::default() }).expect("mxlb starts");
    let name = |i| MxlbNode::backend_name(fam, i);
    let what = format!("{} {fam:?}", mode.as_str());

    // 1. Distribution by weight, no failure.
    let before = settled(&lab, fam);
    let r = lab.smtp_source(lab.vip_addr(fam, 25), &source_opts(SESSIONS)).expect("smtp-source");
    assert!(r.ok(), "{what}: sessions failed: {r:#?}\nagent log:\n{}", node.log());
    wait_total(&lab, fam, before.iter().map(|c| c.messages).sum::<u64>() + SESSIONS as u64);
    let after = settled(&lab, fam);
    let got = diff(&after, &before);
    assert_eq!(got.iter().sum::<u64>(), SESSIONS as u64, "{what}: every session reached a back-end: {got:?}");
    assert_weighted(&got, &weights, &format!("{what} distribution"));

    // 2. Mid-run: weight of back-end 1 to 600, then drain back-end 3; the load goes on for
    //    1000 more sessions after the drain returns. Zero failures, and no session that started
    //    after the drain reaches back-end 3 (per-session client: each session is attributed to
    //    the back-end that greeted it, with its start time).
    let drained_host = lab.backend(3).name();
    let opts = SessionOpts { sessions: 50_000, concurrency: CONCURRENCY, ..Default::default() };
    let progress = Progress::default();
    let (outcomes, drained_at) = std::thread::scope(|s| {
        let load = s.spawn(|| run_sessions(lab.client().ns(), lab.vip_addr(fam, 25), &opts, &progress).expect("sessions run"));
        progress.wait_done(600, Duration::from_secs(60));
        node.cli(&["backend", "weight", &name(1), "600"]).expect("weight change");
        let n = progress.wait_done(progress.done.load(Relaxed) + 600, Duration::from_secs(60));
        node.cli(&["backend", "drain", &name(3)]).expect("drain");
        let drained_at = Instant::now();
        progress.wait_done(n.max(progress.done.load(Relaxed)) + 1000, Duration::from_secs(60));
        progress.stop();
        (load.join().expect("load thread"), drained_at)
    });
    let failed: Vec<_> = outcomes.iter().filter(|o| o.error.is_some()).collect();
    assert!(failed.is_empty(), "{what}: sessions failed during the weight change and drain: {failed:?}");
    let late: Vec<_> = outcomes.iter().filter(|o| o.started > drained_at).collect();
    assert!(late.len() >= 900, "{what}: only {} sessions after the drain", late.len());
    let to_drained = late.iter().filter(|o| o.backend.as_deref() == Some(drained_host.as_str())).count();
    assert_eq!(to_drained, 0, "{what}: {to_drained} sessions started after the drain reached the drained back-end");
    // Afterwards the new weights hold: 600:200:drained.
    let before = settled(&lab, fam);
    let r = lab.smtp_source(lab.vip_addr(fam, 25), &source_opts(4000)).expect("smtp-source");
    assert!(r.ok(), "{what}: {r:#?}");
    wait_total(&lab, fam, before.iter().map(|c| c.messages).sum::<u64>() + 4000);
    let after = settled(&lab, fam);
    assert_weighted(&diff(&after, &before), &[600, 200, 0], &format!("{what} after weight change and drain"));
    node.cli(&["backend", "undrain", &name(3)]).expect("undrain");

    // 3. Mid-run removal of back-end 2, the load going on for 1000 sessions after it. Only
    //    sessions in flight at that instant may fail, and only those of the removed back-end
    //    (greeted by it, or reset before their greeting arrived); every session that started
    //    after the removal succeeds on back-end 1 or 3.
    let removed_host = lab.backend(2).name();
    let opts = SessionOpts { sessions: 50_000, concurrency: CONCURRENCY, ..Default::default() };
    let progress = Progress::default();
    let (outcomes, removed_at) = std::thread::scope(|s| {
        let load = s.spawn(|| run_sessions(lab.client().ns(), lab.vip_addr(fam, 25), &opts, &progress).expect("sessions run"));
        progress.wait_done(500, Duration::from_secs(60));
        node.cli(&["backend", "remove", &name(2)]).expect("remove");
        let removed_at = Instant::now();
        progress.wait_done(progress.done.load(Relaxed) + 1000, Duration::from_secs(60));
        progress.stop();
        (load.join().expect("load thread"), removed_at)
    });
    let failed: Vec<_> = outcomes.iter().filter(|o| o.error.is_some()).collect();
    assert!(
        failed.iter().all(|o| o.backend.as_deref().is_none_or(|b| b == removed_host) && o.started < removed_at),
        "{what}: sessions other than those in flight to the removed back-end failed: {failed:?}"
    );
    assert!(failed.len() <= CONCURRENCY as usize, "{what}: {} failures (> sessions in flight)", failed.len());
    let late: Vec<_> = outcomes.iter().filter(|o| o.started > removed_at).collect();
    assert!(late.len() >= 900, "{what}: only {} sessions after the removal", late.len());
    assert!(late.iter().all(|o| o.error.is_none() && o.backend.as_deref() != Some(removed_host.as_str())), "{what}: a session after the removal failed or reached the removed back-end");
    let json = node.backends_json().expect("backend list");
    assert!(json.as_array().unwrap().iter().all(|b| b["name"] != name(2).as_str()), "{json}");
}

#[test]
fn dsr_l2_ipv4() {
    if !lab::require_root("dsr_l2_ipv4") {
        return;
    }
    scenario(Mode::DsrL2, AddrFamily::V4);
}

#[test]
fn dsr_l2_ipv6() {
    if !lab::require_root("dsr_l2_ipv6") {
        return;
    }
    scenario(Mode::DsrL2, AddrFamily::V6);
}

#[test]
fn dsr_ipip_ipv4() {
    if !lab::require_root("dsr_ipip_ipv4") {
        return;
    }
    scenario(Mode::DsrIpip, AddrFamily::V4);
}

#[test]
fn dsr_ipip_ipv6() {
    if !lab::require_root("dsr_ipip_ipv6") {
        return;
    }
    scenario(Mode::DsrIpip, AddrFamily::V6);
}
