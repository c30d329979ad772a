//! The queue across a crash, and the operator's queue commands: messages deferred because the
//! back-end is down survive a SIGKILL and restart of the node, are listed by `mxlb queue list`
//! (also `--json`), shown by `mxlb queue show`, removed on both nodes by `mxlb queue delete`,
//! and delivered once the back-end is back (`mxlb queue retry` at once, the rest by backoff).
//!
//! Needs root; skips locally otherwise, fails under CI=true.
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use lab::relay::{DumpSinks, RawSmtp, RelayOpts, RelayPair, relay_lab};

#[test]
fn deferred_messages_survive_a_crash_and_the_queue_commands_work() -> Result<()> {
    if !lab::require_root("deferred_messages_survive_a_crash_and_the_queue_commands_work") {
        return Ok(());
    }
    let lab = relay_lab(1)?;
    // No takeover while LB 1 restarts: this test is about LB 1's own queue.
    let opts = RelayOpts { takeover_after_ms: 120_000, ..Default::default() };
    let mut pair = RelayPair::start(&lab, opts)?;
    let vip = pair.vip();
    // The back-end's sink is not running: every delivery is deferred.
    let ids: Vec<String> = lab.client().ns().run(move || -> Result<Vec<String>> {
        (0..5)
            .map(|i| {
                let (mut c, _) = RawSmtp::connect(vip)?;
                let r = c.send_message("sender@example.com", &["u@example.net"], format!("Subject: deferred {i}\r\n\r\nbody {i}\r\n").as_bytes())?;
                ensure!(r.code == 250, "{r:?}");
                r.queue_id().context("no queue id")
            })
            .collect()
    })??;
    std::thread::sleep(Duration::from_secs(1));

    let listed = |pair: &RelayPair| -> Result<Vec<serde_json::Value>> {
        let out = pair.lb1.cli(&["queue", "list", "--json"])?;
        let v: Vec<serde_json::Value> = serde_json::from_str(&out).with_context(|| format!("queue list --json: {out}"))?;
        Ok(v.into_iter().filter(|e| e["area"] == "queue").collect())
    };
    let before = listed(&pair)?;
    ensure!(before.len() == 5, "queue before the crash: {before:?}");
    ensure!(
        before.iter().all(|e| e["rcpts"][0]["state"] == "pending" && e["rcpts"][0]["attempts"].as_u64().unwrap_or(0) >= 1),
        "not deferred after an attempt: {before:?}"
    );
    // `mxlb status` shows the relay: its queue and the mirror link.
    let st: serde_json::Value = serde_json::from_str(&pair.lb1.cli(&["status", "--json"])?)?;
    ensure!(st["relay"]["queued"] == 5 && st["relay"]["mirror_connected"] == true, "status: {}", st["relay"]);
    ensure!(st["relay"]["accepted"] == 5, "status: {}", st["relay"]);
    let text = pair.lb1.cli(&["status"])?;
    ensure!(text.contains("queue 5") && text.contains("mirror: connected"), "status:\n{text}");
    let text = pair.lb1.cli(&["queue", "list"])?;
    ensure!(ids.iter().all(|id| text.contains(id.as_str())), "plain listing lacks ids:\n{text}");
    let shown = pair.lb1.cli(&["queue", "show", &ids[0]])?;
    ensure!(shown.contains("Subject: deferred 0") && shown.contains("(mxlb) with ESMTP id"), "queue show:\n{shown}");

    pair.lb1.kill();
    pair.restart_lb1()?;
    let after = listed(&pair)?;
    ensure!(after.len() == 5, "queue after the crash and restart: {after:?}");

    pair.lb1.cli(&["queue", "delete", &ids[4]])?;
    ensure!(listed(&pair)?.len() == 4, "delete did not remove the message");
    let deadline = Instant::now() + Duration::from_secs(5);
    while pair.spooled(2, "replica").contains(&ids[4]) {
        if Instant::now() > deadline {
            bail!("the mirror still holds the deleted message");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, _, err) = pair.lb1.cli_output(&["queue", "retry", "000000000000000000000000"])?;
    ensure!(!ok && err.contains("no message"), "retry of an unknown id: {err}");

    let sinks = DumpSinks::start(&lab)?;
    pair.lb1.cli(&["queue", "retry", &ids[0]])?;
    let got = sinks.wait_for(&ids[..4], Duration::from_secs(30));
    for id in &ids[..4] {
        ensure!(got.get(id) == Some(&1), "{id} arrived {:?} times", got.get(id));
    }
    ensure!(!got.contains_key(&ids[4]), "the deleted message was delivered");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listed(&pair)?.is_empty() || !pair.spooled(2, "replica").is_empty() {
        if Instant::now() > deadline {
            bail!("delivered messages still queued: {:?} / replicas {:?}", listed(&pair)?, pair.spooled(2, "replica"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
