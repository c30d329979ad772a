//! A throwaway Postfix relay in the lab (`lab::postfix`), the comparison row of
//! `cargo xtask bench relay`: what the client sends to it arrives at the back-end's sink, and
//! its queue drains. Two instances run side by side (one per LB namespace), as the bench's
//! lab may need.
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use lab::{AddrFamily, Lab, SourceOpts, postfix::PostfixRelay, relay::DumpSinks};

const MESSAGES: u32 = 200;
const SECOND: u32 = 50;

#[test]
fn postfix_relays_everything_to_the_sink_and_drains() -> Result<()> {
    if !lab::require_root("postfix_relays_everything_to_the_sink_and_drains") {
        return Ok(());
    }
    let lab = Lab::builder().lbs(2).backends(1).no_sinks().build()?;
    let sinks = DumpSinks::start(&lab)?;
    let b1 = (lab.backend(1).addr(AddrFamily::V4), 25).into();
    let pf = PostfixRelay::start(lab.lb().ns(), "relay", lab.lb().addr(AddrFamily::V4), b1)?;
    // A second instance in another namespace, at the same time: separate dirs, no clash.
    let pf2 = PostfixRelay::start(lab.lb_n(2).ns(), "relay", lab.lb_n(2).addr(AddrFamily::V4), b1)?;
    ensure!(pf.dir() != pf2.dir() && pf.master_pid() != pf2.master_pid(), "{pf:?} vs {pf2:?}");

    let opts = SourceOpts {
        sessions: MESSAGES,
        concurrency: 20,
        msg_size: 4096,
        timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let r = lab.smtp_source(pf.listen(), &opts)?;
    r.assert_ok();
    assert_eq!(r.completed, u64::from(MESSAGES), "{r:#?}");
    let r2 = lab.smtp_source(pf2.listen(), &SourceOpts { sessions: SECOND, ..opts.clone() })?;
    r2.assert_ok();

    let drained = pf.wait_empty(Duration::from_secs(60))?;
    pf2.wait_empty(Duration::from_secs(60))?;
    eprintln!("{MESSAGES} messages accepted in {:?}, queue empty {drained:?} later", r.elapsed);

    // Every message arrives, once.
    let want = u64::from(MESSAGES + SECOND);
    let deadline = Instant::now() + Duration::from_secs(20);
    let got = loop {
        let got = sinks.sinks[0].counts().messages;
        if got >= want || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(300));
    let settled = sinks.sinks[0].counts().messages;
    assert_eq!((got, settled), (want, want), "sink counts; {}", pf.log_tail(20));
    // Postfix relayed each of them once (its Received header is in the dump; smtp-source
    // says HELO, hence "with SMTP").
    let dump = std::fs::read_to_string(&sinks.dumps[0])?;
    let relayed = dump.matches("by relay.relay.test (Postfix) with SMTP id").count();
    assert_eq!(relayed as u64, want, "Postfix Received headers in the dump: {}", &dump[..dump.len().min(1500)]);
    assert!(dump.contains("rcpt@example.net"));
    assert_eq!(pf.queue_len(), 0);
    assert!(pf.log_problems().is_empty(), "{:?}", pf.log_problems());

    // Stopping removes the instance's processes and directory.
    let (dir, master) = (pf.dir().to_path_buf(), pf.master_pid().expect("master pid"));
    drop(pf);
    ensure!(!dir.exists(), "{} left behind", dir.display());
    let stat = std::fs::read_to_string(format!("/proc/{master}/stat")).unwrap_or_default();
    ensure!(stat.is_empty() || stat.contains(") Z"), "master {master} still runs: {stat}");
    drop(pf2);
    Ok(())
}
