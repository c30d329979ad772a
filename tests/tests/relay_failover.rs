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
use lab::relay::{DumpSinks, RelayOpts, RelayPair, acknowledged_ids, kill_trial, reconcile, relay_lab};

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
        if trial > 0 {
            pair.restart_lb1()?;
        }
        let t = kill_trial(&lab, &mut pair, &sinks, 2000, kill_instant(trial))?;
        eprintln!(
            "trial {trial}: killed after {:?}; acknowledged {}, arrived {}, lost {}, duplicates {}; smtp-source completed {} ({} warnings)",
            t.killed_after,
            t.outcome.acknowledged,
            t.outcome.arrived,
            t.outcome.lost.len(),
            t.outcome.duplicates,
            t.source.completed,
            t.source.warnings.len()
        );
        ensure!(t.outcome.acknowledged > 100, "too few messages acknowledged to mean anything: {:?}", t.source);
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
    // LB 1 back: it learns what LB 2 delivered for it and does not deliver it again.
    pair.restart_lb1()?;
    std::thread::sleep(Duration::from_secs(3));
    ensure!(pair.spooled(1, "queue").is_empty(), "LB 1 still queues {:?}", pair.spooled(1, "queue"));
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
    let opts = lab::SourceOpts {
        sessions: 1500,
        concurrency: 20,
        msg_size: 4096,
        to: "rcpt@example.net".into(),
        timeout: Duration::from_secs(120),
        extra: vec!["-v".into()],
        ..Default::default()
    };
    let vip = pair.vip();
    let source = std::thread::scope(|s| -> Result<lab::SourceResult> {
        let load = s.spawn(|| lab.smtp_source(vip, &opts));
        std::thread::sleep(Duration::from_millis(500));
        if let Some(lb2) = pair.lb2.as_mut() {
            lb2.kill();
        }
        std::thread::sleep(Duration::from_millis(1500));
        if let Some(lb2) = pair.lb2.as_mut() {
            lb2.launch()?;
        }
        load.join().map_err(|_| anyhow::anyhow!("smtp-source thread panicked"))?
    })?;
    let acknowledged = acknowledged_ids(&source.stderr);
    let refused = source.stderr.matches("451 4.3.0").count();
    let outcome = reconcile(&acknowledged, &sinks.wait_for(&acknowledged, Duration::from_secs(60)));
    eprintln!("acknowledged {}, refused with 451 while the mirror was gone {refused}, {outcome:?}", acknowledged.len());
    ensure!(refused > 0, "no 451 while the mirror was down (strict mode): {}", &source.stderr[..source.stderr.len().min(2000)]);
    ensure!(outcome.lost.is_empty(), "lost {:?}", outcome.lost);
    ensure!(acknowledged.len() > 100, "the relay did not recover after the mirror came back");
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
    let opts = lab::SourceOpts {
        sessions: 1000,
        concurrency: 20,
        msg_size: 4096,
        to: "rcpt@example.net".into(),
        timeout: Duration::from_secs(120),
        extra: vec!["-v".into()],
        ..Default::default()
    };
    let vip = pair.vip();
    let source = std::thread::scope(|s| -> Result<lab::SourceResult> {
        let load = s.spawn(|| lab.smtp_source(vip, &opts));
        std::thread::sleep(Duration::from_millis(400));
        sinks.kill(1);
        load.join().map_err(|_| anyhow::anyhow!("smtp-source thread panicked"))?
    })?;
    let acknowledged = acknowledged_ids(&source.stderr);
    let outcome = reconcile(&acknowledged, &sinks.wait_for(&acknowledged, Duration::from_secs(60)));
    eprintln!("acknowledged {}: {outcome:?}", acknowledged.len());
    ensure!(acknowledged.len() == 1000, "the client saw failures although one back-end was still up: {:?}", source.warnings);
    ensure!(outcome.lost.is_empty(), "lost {:?}", outcome.lost);
    Ok(())
}
