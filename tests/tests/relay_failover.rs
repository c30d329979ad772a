//! Zero message loss under faults: two mirrored relay nodes (LB 1 VRRP master and primary,
//! LB 2 backup and mirror), smtp-sink back-ends dumping what they receive, smtp-source as the
//! client. After each fault every message the client saw acknowledged (`250 ... queued as ID`)
//! must reach a back-end; duplicates are counted and reported.
//!
//! - the primary is SIGKILLed at pseudo-random instants of runs of 2000 messages (three
//!   trials, LB 1 restarted between them);
//! - the mirror is killed during a run (strict mode: the relay refuses with 451 while it is
//!   gone, and nothing acknowledged is lost) and comes back;
//! - a back-end is killed during a run (its share is delivered to the other one).
//!
//! Needs root; skips locally otherwise, fails under CI=true.
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use lab::relay::{
    DumpSinks, RelayOpts, RelayPair, acknowledged_ids, kill_trial, logged_load, reconcile, relay_lab, under_load,
};

/// Pseudo-random kill instants (no rand crate needed): spread over the run.
fn kill_instant(trial: u32) -> Duration {
    let nanos = Instant::now().elapsed().as_nanos() as u64 ^ (u64::from(std::process::id()) << 7);
    Duration::from_millis(300 + (nanos.wrapping_mul(2654435761).wrapping_add(u64::from(trial) * 977) % 1500))
}

#[test]
fn no_acknowledged_message_is_lost_when_the_primary_dies() -> Result<()> {
    if !lab::require_root("no_acknowledged_message_is_lost_when_the_primary_dies") {
        return Ok(());
    }
    let lab = relay_lab(2)?;
    let sinks = DumpSinks::start(&lab)?;
    let mut pair = RelayPair::start(&lab, RelayOpts::default())?;
    let mut report = Vec::new();
    for trial in 0..3 {
        // Strict mode: LB 2 alone refuses (451) until LB 1 is back, 2 s after the crash.
        let t = kill_trial(&lab, &mut pair, &sinks, 2000, kill_instant(trial), Some(Duration::from_secs(2)))?;
        eprintln!(
            "trial {trial}: killed after {:?}, LB 2 master {:?} later; {} smtp-source run(s) completed {} messages; \
             acknowledged {}, arrived {}, lost {}, duplicates {}",
            t.killed_after,
            t.lb2_master_after,
            t.runs.len(),
            t.completed,
            t.outcome.acknowledged,
            t.outcome.arrived,
            t.outcome.lost.len(),
            t.outcome.duplicates,
        );
        ensure!(t.completed >= 2000, "the run did not reach 2000 messages: {:?}", t.runs.last());
        ensure!(t.runs.len() > 1 || t.runs[0].completed >= 2000, "no run");
        if !t.outcome.lost.is_empty() {
            bail!(
                "trial {trial}: {} acknowledged message(s) lost, e.g. {:?}\nLB 2 log:\n{}",
                t.outcome.lost.len(),
                &t.outcome.lost[..t.outcome.lost.len().min(5)],
                pair.lb2.as_ref().map(|n| n.log()).unwrap_or_default()
            );
        }
        report.push(t.outcome.duplicates);
    }
    eprintln!("duplicates per trial: {report:?}");
    // Everything was delivered: nothing stays queued or mirrored on either node.
    let deadline = Instant::now() + Duration::from_secs(20);
    while [pair.spooled(1, "queue"), pair.spooled(1, "replica"), pair.spooled(2, "queue"), pair.spooled(2, "replica")].iter().any(|v| !v.is_empty()) {
        if Instant::now() > deadline {
            bail!(
                "still queued: LB 1 {:?} / {:?}, LB 2 {:?} / {:?}",
                pair.spooled(1, "queue"),
                pair.spooled(1, "replica"),
                pair.spooled(2, "queue"),
                pair.spooled(2, "replica")
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

#[test]
fn a_dead_mirror_means_451_in_strict_mode_and_nothing_acknowledged_is_lost() -> Result<()> {
    if !lab::require_root("a_dead_mirror_means_451_in_strict_mode_and_nothing_acknowledged_is_lost") {
        return Ok(());
    }
    let lab = relay_lab(2)?;
    let sinks = DumpSinks::start(&lab)?;
    let mut pair = RelayPair::start(&lab, RelayOpts::default())?;
    let vip = pair.vip();
    let source = under_load(&lab, vip, &logged_load(1500), || {
        std::thread::sleep(Duration::from_millis(500));
        if let Some(lb2) = pair.lb2.as_mut() {
            lb2.kill();
        }
        std::thread::sleep(Duration::from_millis(1500));
        if let Some(lb2) = pair.lb2.as_mut() {
            lb2.launch()?;
        }
        Ok(())
    })?;
    let mut acknowledged = acknowledged_ids(&source.stderr);
    // smtp-source gives up at the first 451; strict mode refuses only while the mirror is gone.
    let refused = source.stderr.matches("451 4.3.0").count();
    ensure!(refused > 0, "no 451 while the mirror was down (strict mode): {}", &source.stderr[source.stderr.len().saturating_sub(2000)..]);
    ensure!(pair.lb2.as_ref().is_some_and(|n| n.pid().is_some()), "LB 2 did not come back");
    // Once the mirror is back (its link re-established), mail is accepted again.
    acknowledged.extend(pair.wait_accepting(Duration::from_secs(15))?);
    let after = lab.smtp_source(vip, &logged_load(300))?;
    ensure!(after.completed == 300, "after the mirror returned: {:?}", after.warnings);
    acknowledged.extend(acknowledged_ids(&after.stderr));
    let outcome = reconcile(&acknowledged, &sinks.wait_for(&acknowledged, Duration::from_secs(60)));
    eprintln!("acknowledged {}, refused with 451 while the mirror was gone {refused}, {outcome:?}", acknowledged.len());
    ensure!(outcome.lost.is_empty(), "lost {:?}", outcome.lost);
    Ok(())
}

#[test]
fn degraded_mode_accepts_alone_and_resyncs_the_backlog() -> Result<()> {
    if !lab::require_root("degraded_mode_accepts_alone_and_resyncs_the_backlog") {
        return Ok(());
    }
    let lab = relay_lab(1)?;
    let sinks = DumpSinks::start(&lab)?;
    // Deliveries wait (the back-end's sink is stopped) so the backlog stays queued.
    let mut pair = RelayPair::start(&lab, RelayOpts { on_failure: "degraded".into(), ..Default::default() })?;
    drop(sinks);
    if let Some(lb2) = pair.lb2.as_mut() {
        lb2.kill();
    }
    std::thread::sleep(Duration::from_millis(500));
    let r = lab.smtp_source(pair.vip(), &lab::SourceOpts { sessions: 50, concurrency: 5, to: "rcpt@example.net".into(), extra: vec!["-v".into()], ..Default::default() })?;
    let acknowledged = acknowledged_ids(&r.stderr);
    ensure!(acknowledged.len() == 50, "degraded mode refused mail: {} of 50 ({:?})", acknowledged.len(), r.warnings);
    ensure!(pair.spooled(2, "replica").is_empty());
    // The alarm: every message accepted on one disk is counted, and the link shows down.
    let m = pair.metrics(1)?;
    ensure!(lab::relay::metric(&m, "mxlb_relay_accepted_unmirrored_total") == Some(50.0), "metrics:\n{m}");
    ensure!(lab::relay::metric(&m, "mxlb_relay_mirror_connected") == Some(0.0), "metrics:\n{m}");
    if let Some(lb2) = pair.lb2.as_mut() {
        lb2.launch()?;
    }
    // The backlog is copied to the mirror as soon as it is back.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let replicas = pair.spooled(2, "replica");
        if acknowledged.iter().all(|id| replicas.contains(id)) {
            break;
        }
        if Instant::now() > deadline {
            bail!("after the mirror returned it holds {} of {} copies", replicas.len(), acknowledged.len());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let m = pair.metrics(1)?;
    ensure!(lab::relay::metric(&m, "mxlb_relay_mirror_connected") == Some(1.0), "metrics:\n{m}");
    ensure!(lab::relay::metric(&m, "mxlb_relay_mirror_resynced_total").is_some_and(|n| n >= 50.0), "metrics:\n{m}");
    Ok(())
}

#[test]
fn a_dead_backend_loses_nothing() -> Result<()> {
    if !lab::require_root("a_dead_backend_loses_nothing") {
        return Ok(());
    }
    let lab = relay_lab(2)?;
    let mut sinks = DumpSinks::start(&lab)?;
    let pair = RelayPair::start(&lab, RelayOpts::default())?;
    let source = under_load(&lab, pair.vip(), &logged_load(1000), || {
        std::thread::sleep(Duration::from_millis(400));
        sinks.kill(1);
        Ok(())
    })?;
    let acknowledged = acknowledged_ids(&source.stderr);
    let outcome = reconcile(&acknowledged, &sinks.wait_for(&acknowledged, Duration::from_secs(60)));
    eprintln!("acknowledged {}: {outcome:?}", acknowledged.len());
    ensure!(acknowledged.len() == 1000, "the client saw failures although one back-end was still up: {:?}", source.warnings);
    ensure!(outcome.lost.is_empty(), "lost {:?}", outcome.lost);
    Ok(())
}

#[test]
fn the_mirror_delivers_everything_for_a_primary_that_stays_dead() -> Result<()> {
    if !lab::require_root("the_mirror_delivers_everything_for_a_primary_that_stays_dead") {
        return Ok(());
    }
    let lab = relay_lab(2)?;
    let sinks = DumpSinks::start(&lab)?;
    // Degraded mode: LB 2 goes on accepting alone after the crash; LB 1 never returns, so
    // whatever it had acknowledged and not delivered arrives only through LB 2's takeover.
    let mut pair = RelayPair::start(&lab, RelayOpts { on_failure: "degraded".into(), ..Default::default() })?;
    let t = kill_trial(&lab, &mut pair, &sinks, 2000, kill_instant(7), None)?;
    eprintln!(
        "killed after {:?}; {} run(s) completed {}; acknowledged {}, arrived {}, lost {}, duplicates {}",
        t.killed_after,
        t.runs.len(),
        t.completed,
        t.outcome.acknowledged,
        t.outcome.arrived,
        t.outcome.lost.len(),
        t.outcome.duplicates
    );
    ensure!(t.completed >= 2000, "the run did not reach 2000 messages");
    ensure!(t.outcome.lost.is_empty(), "lost {:?}\nLB 2 log:\n{}", t.outcome.lost, pair.lb2.as_ref().map(|n| n.log()).unwrap_or_default());
    // LB 2 remembers each id it took over (until LB 1 hears of it): the takeover happened.
    let markers = std::fs::read_dir(pair.spool(2).join("taken-over")).map(|d| d.count()).unwrap_or(0);
    ensure!(markers > 0, "LB 2 never took LB 1's copies over");
    eprintln!("LB 2 took over {markers} message(s)");
    Ok(())
}
