//! The load generator `mxlb-bench` against real servers in the lab (no load balancer):
//! - smtp mode, closed loop, against back-end 1's smtp-sink: no error, every message counted
//!   by the sink; its rate next to Postfix's smtp-source run with the same concurrency, count
//!   and message size on the same sink is printed (within 15% when run alone; rates are not
//!   asserted in tests, the benchmark output is where they belong);
//! - connect mode, open loop: a positive rate, no error, valid JSON;
//! - pop3 and imap modes against Dovecot with a seeded mailbox: no error, one message
//!   retrieved per session.
//!
//! Needs root; skips locally otherwise, fails under CI=true.
use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lab::{
    AddrFamily, Lab, SourceOpts,
    dovecot::Dovecot,
    loadgen::{bench_bin, mxlb_bench, pin_apart, rate},
};

/// One lab at a time: two load runs side by side on two cores would measure each other.
static SERIAL: Mutex<()> = Mutex::new(());

/// Sessions per run: about a second each, so that the scheduling noise of a shared two-core
/// machine (±15% on 0.3 s runs of 2000) averages out.
const SESSIONS: u32 = 5000;
const CONCURRENCY: u32 = 20;
/// 20 kB messages: the comparison must measure the sink, not the generators. With 1 kB
/// messages on a two-core machine smtp-source saturates its own core (measured: 1.16 s of CPU
/// for 1.26 s of wall time at ~8000 msg/s) and steals CPU from the sink, while mxlb-bench needs
/// about 30% less CPU per session, so the two disagree by 20-30% about the generators, not about
/// the server. From ~20 kB the sink is the bottleneck and the rates meet (the sink is also
/// pinned to its own CPU, see `pin_apart`). The 1 kB figures are still printed, for information.
const SIZE: usize = 20_000;
const SMALL: usize = 1024;

/// Fails unless every error count is zero (and exit status 0 is implied by the caller).
fn assert_no_errors(v: &serde_json::Value) -> Result<()> {
    let errors = v["errors"].as_object().context("errors")?;
    ensure!(errors.len() >= 5, "error kinds missing: {errors:?}");
    for (k, n) in errors {
        ensure!(
            n.as_u64() == Some(0),
            "{n} {k} errors: {}",
            v["error_samples"]
        );
    }
    Ok(())
}

#[test]
fn smtp_rate_agrees_with_smtp_source_and_connect_mode() -> Result<()> {
    if !lab::require_root("smtp_rate_agrees_with_smtp_source_and_connect_mode") {
        return Ok(());
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    bench_bin()?;
    let lab = Lab::builder().backends(1).build()?;
    let target = SocketAddr::new(lab.backend(1).addr(AddrFamily::V4), 25);
    let t = target.to_string();
    let (n, c, s) = (
        SESSIONS.to_string(),
        CONCURRENCY.to_string(),
        SIZE.to_string(),
    );
    let opts = SourceOpts {
        sessions: SESSIONS,
        concurrency: CONCURRENCY,
        msg_size: SIZE,
        timeout: Duration::from_secs(120),
        ..Default::default()
    };

    // Sink on CPU 1, generators (children of this thread inherit its affinity) on CPU 0: the
    // generators then cannot slow the sink down by competing for its CPU, which would make the
    // comparison depend on their own efficiency (see SIZE).
    let pinned = pin_apart(&lab);

    // Alternate the two tools, three runs each, and compare the pooled rates (all messages
    // over all run time): a single run on a shared machine can be disturbed by anything.
    // smtp-source reports no rate of its own, so both are timed the same way, from outside
    // (process start included); mxlb-bench's own figure, which starts its clock at its first
    // connection, must agree with its outside one too.
    let (mut our_time, mut their_time) = (0.0, 0.0);
    for round in 0..3 {
        let before = lab.sink(1).counts();
        let v = mxlb_bench(&lab, &["smtp", &t, "-c", &c, "-n", &n, "-s", &s, "-q"])?;
        assert_no_errors(&v)?;
        ensure!(
            v["sessions_ok"] == SESSIONS,
            "sessions_ok {}",
            v["sessions_ok"]
        );
        ensure!(v["messages"] == SESSIONS, "messages {}", v["messages"]);
        // The sink counts what arrived (its counters lag the replies by a little).
        let deadline = Instant::now() + Duration::from_secs(10);
        let got = loop {
            let got = lab.sink(1).counts().messages - before.messages;
            if got >= u64::from(SESSIONS) || Instant::now() > deadline {
                break got;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        ensure!(
            got == u64::from(SESSIONS),
            "the sink counted {got} messages from mxlb-bench"
        );
        for p in ["connect", "greeting", "data_ack", "session"] {
            ensure!(
                v["latency_ms"][p]["p50"].as_f64().is_some_and(|x| x > 0.0),
                "no {p} latency"
            );
        }
        let ours = rate(&v, "messages_per_s")?;
        let wall = rate(&v, "wall_s")?;
        let outside = f64::from(SESSIONS) / wall;
        // Its own clock runs inside the wall-clock window, so it can only report more.
        ensure!(ours >= outside * 0.99, "mxlb-bench says {ours:.0}/s, timed from outside {outside:.0}/s");
        our_time += wall;

        let r = lab.smtp_source(target, &opts)?;
        r.assert_ok();
        let src = r.completed as f64 / r.elapsed.as_secs_f64();
        eprintln!(
            "round {round}: mxlb-bench {ours:.0} msg/s (timed from outside: {outside:.0}), smtp-source {src:.0} msg/s"
        );
        their_time += r.elapsed.as_secs_f64();
    }
    let total = 3.0 * f64::from(SESSIONS);
    let (a, b) = (total / our_time, total / their_time);
    let diff = (a - b).abs() / b;
    eprintln!(
        "SMTP rate timed from outside, {SESSIONS} sessions x {SIZE} B, {CONCURRENCY} concurrent: mxlb-bench {a:.0}/s, smtp-source {b:.0}/s, difference {:.1}%",
        diff * 100.0
    );
    eprintln!("(sink and generators pinned to separate CPUs: {pinned})");
    // Shown, not asserted: rates are for benchmarks (DEVELOPERS.md), and on a shared machine
    // running the rest of the suite in parallel a round swings by more than the 15% the issue
    // allows (17% seen in CI-like runs; 1-8% when run alone). The bench output shows it.

    // For information only (see SIZE): 1 kB messages, where the generators' own CPU matters.
    let small = SMALL.to_string();
    let v = mxlb_bench(&lab, &["smtp", &t, "-c", &c, "-n", &n, "-s", &small, "-q"])?;
    assert_no_errors(&v)?;
    let r = lab.smtp_source(
        target,
        &SourceOpts {
            msg_size: SMALL,
            ..opts.clone()
        },
    )?;
    r.assert_ok();
    eprintln!(
        "SMTP rate, {SESSIONS} sessions x {SMALL} B, {CONCURRENCY} concurrent (not asserted): mxlb-bench {:.0}/s, smtp-source {:.0}/s",
        rate(&v, "messages_per_s")?,
        r.completed as f64 / r.elapsed.as_secs_f64()
    );

    // connect mode, open loop for one second.
    let v = mxlb_bench(&lab, &["connect", &t, "-r", "500", "-d", "1", "-q"])?;
    assert_no_errors(&v)?;
    ensure!(
        rate(&v, "sessions_per_s")? > 0.0,
        "connect rate {}",
        v["sessions_per_s"]
    );
    ensure!(
        v["latency_ms"]["connect"]["p99"].as_f64().is_some(),
        "no connect latency"
    );
    Ok(())
}

/// Drops one message into `user`'s Maildir (Dovecot's `mail_location = maildir:~/Maildir`,
/// home under the Dovecot directory, owned by nobody as Dovecot runs mail processes).
fn seed_maildir(ns: &lab::Netns, name: &str, user: &str) -> Result<()> {
    let home = std::env::temp_dir()
        .join(format!("{}-dovecot-{name}", ns.name()))
        .join("mail")
        .join(user);
    let md = home.join("Maildir");
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(md.join(sub))?;
    }
    let msg = "From: <a@example.com>\r\nTo: <bench@example.net>\r\nSubject: seed\r\n\r\nseeded message\r\n.leading dot line\r\n";
    std::fs::write(md.join("new").join("1700000000.seed.host"), msg)?;
    let st = Command::new("chown")
        .args(["-R", "nobody:nogroup"])
        .arg(&home)
        .status()?;
    ensure!(st.success(), "chown {}", home.display());
    Ok(())
}

#[test]
fn pop3_and_imap_against_dovecot() -> Result<()> {
    if !lab::require_root("pop3_and_imap_against_dovecot") {
        return Ok(());
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    bench_bin()?;
    let lab = Lab::builder().backends(1).build()?;
    let b1 = lab.backend(1);
    let ip: IpAddr = b1.addr(AddrFamily::V4);
    let dc = Dovecot::start(b1.ns(), "b1", &[("bench", "secret")], ip)?;
    seed_maildir(b1.ns(), "b1", "bench")?;
    for (mode, port) in [("pop3", 110u16), ("imap", 143)] {
        let t = SocketAddr::new(ip, port).to_string();
        let v = mxlb_bench(
            &lab,
            &[
                mode, &t, "-c", "4", "-n", "100", "--user", "bench", "--pass", "secret", "-q",
            ],
        )
        .with_context(|| dc.log())?;
        assert_no_errors(&v).with_context(|| dc.log())?;
        ensure!(
            v["sessions_ok"] == 100 && v["messages"] == 100,
            "{mode}: {v}"
        );
        ensure!(rate(&v, "messages_per_s")? > 0.0, "{mode}: {v}");
    }
    // A wrong password is counted, not hidden.
    let t = SocketAddr::new(ip, 110).to_string();
    let v = mxlb_bench(
        &lab,
        &[
            "pop3", &t, "-c", "1", "-n", "2", "--user", "bench", "--pass", "wrong", "-q",
        ],
    )?;
    ensure!(v["errors"]["5xx"] == 2 && v["sessions_ok"] == 0, "{v}");
    Ok(())
}
