//! The POP3/IMAP proxy against real Dovecot back-ends: every login method, in clear, after
//! STARTTLS/STLS and over implicit TLS, over IPv4 and IPv6, lands on the user's own back-end
//! with the client's address (Dovecot's `Login:` log line, `rip=` via PROXY v2); failures
//! look alike; a down owner gets "try later"; hostile clients are bounded. Mail the relay
//! takes on the same VIP's port 25 reads back through the proxy byte for byte; a mailbox
//! move ends the user's open sessions and sends the next one to the new owner; with
//! `pass_client = "imap-id"` the owners see the client's address on their normal ports.
//!
//! The tests take turns ([`serial`]); each builds its own lab. Needs root; skips locally
//! otherwise, fails under CI=true.
use std::{
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use lab::{
    AddrFamily,
    proxy::{MailClient, ProxyLab, ProxyOpts, USERS, imap_quoted, inbox, plain, wait_inbox},
    relay::{DOMAIN, metric, send_all, transport_test_message},
    wait_some,
};

fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// An IMAP quoted string.
#[test]
fn every_login_method_lands_on_the_owner_with_the_client_address() -> Result<()> {
    if !lab::require_root("every_login_method_lands_on_the_owner_with_the_client_address") {
        return Ok(());
    }
    let _serial = serial();
    let lab = ProxyLab::lab()?;
    let p = ProxyLab::start(&lab, "")?;
    for fam in [AddrFamily::V4, AddrFamily::V6] {
        let (pop3, pop3s, imap, imaps) = (p.vip(fam, 110), p.vip(fam, 995), p.vip(fam, 143), p.vip(fam, 993));
        for &(user, pw, i) in &USERS {
            let before = p.logins(i, user, p.client_ip(fam));
            let (user, pw) = (user.to_string(), pw.to_string());
            let done = p.client(move |tls| -> Result<usize> {
                let mut n = 0;
                // POP3 USER/PASS in clear: the owner's own reply, then its own commands.
                let mut c = MailClient::connect(pop3, None)?;
                ensure!(c.line()?.is_some_and(|g| g.starts_with("+OK ")), "greeting");
                ensure!(c.cmd(&format!("USER {user}"))? == "+OK");
                let ok = c.cmd(&format!("PASS {pw}"))?;
                ensure!(ok.starts_with("+OK") && ok.contains("Logged in"), "PASS: {ok}");
                ensure!(c.cmd("STAT")?.starts_with("+OK 0 0"), "STAT through the proxy");
                ensure!(c.cmd("QUIT")?.starts_with("+OK"));
                n += 1;
                // POP3 STLS then AUTH PLAIN with an initial response.
                let mut c = MailClient::connect(pop3, None)?;
                c.line()?;
                let capa = {
                    c.send(b"CAPA\r\n")?;
                    let mut v = Vec::new();
                    while let Some(l) = c.line()? {
                        if l == "." {
                            break;
                        }
                        v.push(l);
                    }
                    v
                };
                ensure!(capa.iter().any(|l| l == "STLS") && capa.iter().any(|l| l == "SASL PLAIN LOGIN"), "{capa:?}");
                ensure!(c.cmd("STLS")?.starts_with("+OK"));
                c.start_tls(tls.clone())?;
                let ok = c.cmd(&format!("AUTH PLAIN {}", plain(&user, &pw)))?;
                ensure!(ok.starts_with("+OK"), "AUTH PLAIN: {ok}");
                c.cmd("QUIT")?;
                n += 1;
                // POP3S (995) with AUTH LOGIN and continuations.
                let mut c = MailClient::connect(pop3s, Some(tls.clone()))?;
                c.line()?;
                ensure!(c.cmd("AUTH LOGIN")? == "+ VXNlcm5hbWU6");
                ensure!(c.cmd(&lab::proxy::b64(user.as_bytes()))? == "+ UGFzc3dvcmQ6");
                let ok = c.cmd(&lab::proxy::b64(pw.as_bytes()))?;
                ensure!(ok.starts_with("+OK"), "AUTH LOGIN: {ok}");
                c.cmd("QUIT")?;
                n += 1;
                // IMAP LOGIN in clear, with a literal for the password; the tagged answer is
                // the owner's (its capabilities), then a command it answers.
                let mut c = MailClient::connect(imap, None)?;
                let g = c.line()?.unwrap_or_default();
                ensure!(g.starts_with("* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS AUTH=PLAIN AUTH=LOGIN]"), "{g}");
                c.send(format!("a1 LOGIN {} {{{}}}\r\n", imap_quoted(&user), pw.len()).as_bytes())?;
                ensure!(c.line()?.as_deref() == Some("+ OK"), "literal continuation");
                c.send(format!("{pw}\r\n").as_bytes())?;
                let r = c.until_tagged("a1")?;
                ensure!(r.last().is_some_and(|l| l.starts_with("a1 OK")), "LOGIN: {r:?}");
                let r = c.imap("a2", "SELECT INBOX")?;
                ensure!(r.last().is_some_and(|l| l.starts_with("a2 OK")), "SELECT: {r:?}");
                c.imap("a3", "LOGOUT")?;
                n += 1;
                // IMAP STARTTLS then AUTHENTICATE PLAIN with a continuation.
                let mut c = MailClient::connect(imap, None)?;
                c.line()?;
                let r = c.imap("s", "STARTTLS")?;
                ensure!(r.last().is_some_and(|l| l.starts_with("s OK")), "{r:?}");
                c.start_tls(tls.clone())?;
                let caps = c.imap("c", "CAPABILITY")?;
                ensure!(!caps[0].contains("STARTTLS"), "{caps:?}");
                ensure!(c.cmd("b AUTHENTICATE PLAIN")? == "+ ");
                c.send(format!("{}\r\n", plain(&user, &pw)).as_bytes())?;
                let r = c.until_tagged("b")?;
                ensure!(r.last().is_some_and(|l| l.starts_with("b OK")), "AUTHENTICATE: {r:?}");
                c.imap("z", "LOGOUT")?;
                n += 1;
                // IMAPS (993) with SASL-IR.
                let mut c = MailClient::connect(imaps, Some(tls))?;
                c.line()?;
                let r = c.imap("x", &format!("AUTHENTICATE PLAIN {}", plain(&user, &pw)))?;
                ensure!(r.last().is_some_and(|l| l.starts_with("x OK")), "SASL-IR: {r:?}");
                c.imap("y", "LOGOUT")?;
                n += 1;
                Ok(n)
            })?;
            // Each login reached the user's own back-end, with the client's address.
            let wait_for = before + done;
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while p.logins(i, USERS[i - 1].0, p.client_ip(fam)) < wait_for && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let got = p.logins(i, USERS[i - 1].0, p.client_ip(fam));
            ensure!(got == wait_for, "back-end {i}: {got} logins of {} from {} (expected {wait_for}):\n{}", USERS[i - 1].0, p.client_ip(fam), p.dovecots[i - 1].log());
            for other in (1..=3).filter(|o| *o != i) {
                ensure!(p.logins(other, USERS[i - 1].0, p.client_ip(fam)) == 0, "{} reached back-end {other}", USERS[i - 1].0);
            }
        }
    }
    Ok(())
}

#[test]
fn failures_look_alike_and_a_down_owner_means_try_later() -> Result<()> {
    if !lab::require_root("failures_look_alike_and_a_down_owner_means_try_later") {
        return Ok(());
    }
    let _serial = serial();
    let lab = ProxyLab::lab()?;
    let mut p = ProxyLab::start(&lab, "")?;
    let (pop3, imap) = (p.vip(AddrFamily::V4, 110), p.vip(AddrFamily::V4, 143));
    let answers = p.client(move |_| -> Result<Vec<String>> {
        let mut out = Vec::new();
        for user in ["alice", "nobody-at-all"] {
            let mut c = MailClient::connect(pop3, None)?;
            c.line()?;
            c.cmd(&format!("USER {user}"))?;
            out.push(c.cmd("PASS wrong")?);
            let mut c = MailClient::connect(imap, None)?;
            c.line()?;
            out.push(c.imap("t1", &format!("LOGIN {user} wrong"))?.join("\n"));
        }
        Ok(out)
    })?;
    assert_eq!(answers[0], "-ERR [AUTH] Authentication failed.");
    assert_eq!(answers[1], "t1 NO [AUTHENTICATIONFAILED] Authentication failed.");
    assert_eq!(answers[0], answers[2], "unknown user vs wrong password (POP3)");
    assert_eq!(answers[1], answers[3], "unknown user vs wrong password (IMAP)");

    // carol's back-end goes down: her logins get "try later", not a failure.
    p.dovecots[2].stop();
    let (user, pw, _) = USERS[2];
    let down = p.client(move |_| -> Result<(String, String)> {
        let mut c = MailClient::connect(pop3, None)?;
        c.line()?;
        c.cmd(&format!("USER {user}"))?;
        let a = c.cmd(&format!("PASS {pw}"))?;
        let mut c = MailClient::connect(imap, None)?;
        c.line()?;
        let b = c.imap("t", &format!("LOGIN {user} {}", imap_quoted(pw)))?.join("\n");
        Ok((a, b))
    })?;
    assert_eq!(down.0, "-ERR [SYS/TEMP] Account is temporarily unavailable.");
    assert_eq!(down.1, "t NO [UNAVAILABLE] Account is temporarily unavailable.");

    // The prober watches the owners on the ports the proxy logs in to (PROXY v2 listeners,
    // probed with a LOCAL header): the mailbox map learns that carol's owner is down, while
    // alice's, probed as often over the same kind of listener, stays up.
    wait_some("carol's owner going down in the mailbox map", Duration::from_secs(20), || Ok((!p.owner_healthy("carol")?).then_some(())))
        .with_context(|| format!("LB log:\n{}", p.node.log()))?;
    ensure!(p.owner_healthy("alice")?, "alice's owner was marked down: its probe fails against a healthy Dovecot\n{}", p.node.log());
    Ok(())
}

#[test]
fn hostile_clients_are_answered_and_closed() -> Result<()> {
    if !lab::require_root("hostile_clients_are_answered_and_closed") {
        return Ok(());
    }
    let _serial = serial();
    let lab = ProxyLab::lab()?;
    let p = ProxyLab::start(&lab, "login_timeout_ms = 3000")?;
    let (pop3, imap) = (p.vip(AddrFamily::V4, 110), p.vip(AddrFamily::V4, 143));
    p.client(move |_| -> Result<()> {
        // Over-long lines.
        let mut c = MailClient::connect(pop3, None)?;
        c.line()?;
        c.send(&vec![b'A'; 20_000])?;
        assert_eq!(c.line()?.as_deref(), Some("-ERR Input line too long."));
        assert_eq!(c.line()?, None);
        let mut c = MailClient::connect(imap, None)?;
        c.line()?;
        c.send(&vec![b'A'; 20_000])?;
        assert_eq!(c.line()?.as_deref(), Some("* BAD Command line too long."));
        // A literal size no one can send.
        let mut c = MailClient::connect(imap, None)?;
        c.line()?;
        assert_eq!(c.cmd("a LOGIN {4294967295}")?, "a BAD Literal too large.");
        assert_eq!(c.line()?, None);
        // A client that never logs in.
        let mut c = MailClient::connect(imap, None)?;
        c.line()?;
        assert_eq!(c.line()?.as_deref(), Some("* BYE Disconnected for inactivity."));
        assert_eq!(c.line()?, None);
        let mut c = MailClient::connect(pop3, None)?;
        c.line()?;
        assert_eq!(c.line()?.as_deref(), Some("-ERR Disconnected for inactivity."));
        // 50 wrong passwords from one source: refused, then (blocked) "try later".
        let mut answers = Vec::new();
        for _ in 0..50 {
            let mut c = MailClient::connect(pop3, None)?;
            c.line()?;
            c.cmd("USER alice")?;
            answers.push(c.cmd("PASS guess")?);
        }
        assert!(answers[..10].iter().all(|a| a == "-ERR [AUTH] Authentication failed."), "{answers:?}");
        assert!(answers[10..].iter().all(|a| a == "-ERR [SYS/TEMP] Account is temporarily unavailable."), "{answers:?}");
        // Blocked: even the right password gets "try later".
        let mut c = MailClient::connect(pop3, None)?;
        c.line()?;
        c.cmd("USER alice")?;
        assert_eq!(c.cmd("PASS alice-pw")?, "-ERR [SYS/TEMP] Account is temporarily unavailable.");
        Ok(())
    })?;
    let status = p.node.cli(&["status"])?;
    let line = status.lines().find(|l| l.starts_with("proxy:")).unwrap_or_default().to_string();
    assert!(line.contains("10 failed, 7 slowed, 41 blocked"), "{line}");
    Ok(())
}

/// The transport test message for `user`, distinct per user.
fn message_for(user: &str) -> Vec<u8> {
    transport_test_message(user, &format!("for {user}"), &format!("{user}.proxy@example.com"))
}

/// Waits (bounded) until the node's metrics satisfy `ok` (counters of sessions are updated
/// as the proxy finishes with them, a moment after the client sees the end).
fn wait_metrics(p: &ProxyLab, what: &str, ok: impl Fn(&str) -> bool) -> Result<()> {
    let mut last = String::new();
    let got = wait_some(what, Duration::from_secs(10), || {
        last = p.metrics()?;
        Ok(ok(&last).then_some(()))
    });
    got.with_context(|| format!("metrics:\n{last}"))
}

/// `name{labels}` in a metrics text, 0 when absent.
fn counter(metrics: &str, name: &str) -> f64 {
    metric(metrics, name).unwrap_or(0.0)
}

#[test]
fn mail_to_port_25_reads_back_through_the_proxy_with_identical_bytes() -> Result<()> {
    if !lab::require_root("mail_to_port_25_reads_back_through_the_proxy_with_identical_bytes") {
        return Ok(());
    }
    let _serial = serial();
    let lab = ProxyLab::lab()?;
    // The relay and the proxy share the IPv4 VIP: 25 for the relay, 110/143/993/995 for the
    // proxy; one mailbox map routes both.
    let users: Vec<(String, String, usize)> = USERS.iter().map(|(u, pw, i)| (format!("{u}@{DOMAIN}"), pw.to_string(), *i)).collect();
    let p = ProxyLab::start_with(&lab, ProxyOpts { users: users.clone(), relay: true, ..Default::default() })?;
    let msgs: Vec<(String, Vec<String>, Vec<u8>)> = users.iter().map(|(u, _, _)| ("sender@example.com".to_string(), vec![u.clone()], message_for(u))).collect();
    send_all(&lab, p.vip(AddrFamily::V4, 25), msgs)?;

    for (user, pw, i) in &users {
        let mut on_owner = wait_inbox(&lab, *i, user, pw, 1, Duration::from_secs(30)).with_context(|| format!("LB log:\n{}", p.node.log()))?;
        ensure!(on_owner.len() == 1, "{user} got {} messages on b{i}", on_owner.len());
        let stored = on_owner.remove(0);
        let sent = [message_for(user), b"\r\n".to_vec()].concat();
        ensure!(stored.ends_with(&sent), "{user}'s message on b{i} does not end with what was sent:\n{}", String::from_utf8_lossy(&stored));
        // Through the proxy: IMAP in clear (kernel-spliced) and POP3 over implicit TLS (copied).
        let (imap, pop3s) = (p.vip(AddrFamily::V4, 143), p.vip(AddrFamily::V4, 995));
        let (u, pw) = (user.clone(), pw.clone());
        let (via_imap, via_pop3) = p.client(move |tls| -> Result<(Vec<Vec<u8>>, Vec<u8>)> {
            let via_imap = inbox(imap, &u, &pw)?;
            let mut c = MailClient::connect(pop3s, Some(tls))?;
            c.line()?;
            ensure!(c.cmd(&format!("USER {u}"))?.starts_with("+OK"));
            ensure!(c.cmd(&format!("PASS {pw}"))?.starts_with("+OK"));
            let r = c.cmd("RETR 1")?;
            ensure!(r.starts_with("+OK"), "RETR 1: {r}");
            let body = c.pop3_body()?;
            c.cmd("QUIT")?;
            Ok((via_imap, body))
        })?;
        ensure!(via_imap.len() == 1 && via_imap[0] == stored, "IMAP through the proxy differs from b{i}'s copy for {user}:\n{:?}", via_imap.iter().map(|m| String::from_utf8_lossy(m)).collect::<Vec<_>>());
        ensure!(via_pop3 == stored, "POP3 through the proxy differs from b{i}'s copy for {user}:\n{}", String::from_utf8_lossy(&via_pop3));
        let client = p.client_ip(AddrFamily::V4);
        ensure!(p.logins(*i, user, client) == 2, "{user}: {} logins from the client on b{i}", p.logins(*i, user, client));
    }
    for (user, _, i) in &users {
        for other in (1..=3).filter(|o| o != i) {
            ensure!(p.logins(other, user, p.client_ip(AddrFamily::V4)) == 0, "{user} reached b{other}");
        }
    }
    // Plaintext sessions went through the kernel splice, TLS ones through userspace copying.
    wait_metrics(&p, "3 spliced and 3 copied sessions", |m| {
        counter(m, "mxlb_proxy_relayed_total{path=\"sockmap\"}") == 3.0 && counter(m, "mxlb_proxy_relayed_total{path=\"copy\"}") == 3.0
    })
}

#[test]
fn a_mailbox_move_ends_open_sessions_and_the_next_login_reaches_the_new_owner() -> Result<()> {
    if !lab::require_root("a_mailbox_move_ends_open_sessions_and_the_next_login_reaches_the_new_owner") {
        return Ok(());
    }
    let _serial = serial();
    let lab = ProxyLab::lab()?;
    let p = ProxyLab::start(&lab, "")?;
    let (user, pw, _) = USERS[0];
    // alice lives on b1; her mailbox is being copied to b2, which therefore knows her too.
    p.dovecots[1].add_user(user, pw)?;
    let (imap, pop3s) = (p.vip(AddrFamily::V4, 143), p.vip(AddrFamily::V4, 995));
    let (mut spliced, mut copied) = p.client(move |tls| -> Result<(MailClient, MailClient)> {
        let mut a = MailClient::connect(imap, None)?;
        a.line()?;
        a.imap("a", &format!("LOGIN {user} {}", imap_quoted(pw)))?;
        let sel = a.imap("b", "SELECT INBOX")?;
        ensure!(sel.last().is_some_and(|l| l.starts_with("b OK")), "{sel:?}");
        let mut b = MailClient::connect(pop3s, Some(tls))?;
        b.line()?;
        b.cmd(&format!("USER {user}"))?;
        ensure!(b.cmd(&format!("PASS {pw}"))?.starts_with("+OK"));
        ensure!(b.cmd("STAT")?.starts_with("+OK"));
        Ok((a, b))
    })?;
    let m = p.metrics()?;
    ensure!(counter(&m, "mxlb_proxy_active_sessions") == 2.0, "metrics:\n{m}");

    let out = p.node.cli(&["mailbox", "move", user, "b2"])?;
    ensure!(out.contains("b2"), "mailbox move said: {out}");
    // Both open sessions are closed by the proxy (the client sees the connection end; a
    // reconnecting client reaches the new owner).
    for (name, c) in [("spliced IMAP", &mut spliced), ("copied POP3S", &mut copied)] {
        let mut after = Vec::new();
        while let Some(l) = c.line().with_context(|| format!("the {name} session was not ended"))? {
            after.push(l);
            ensure!(after.len() < 5, "the {name} session goes on after the move: {after:?}");
        }
    }
    // Ended sessions are counted by the path that relayed them: the clear one was spliced.
    wait_metrics(&p, "2 sessions ended by the move, 1 spliced and 1 copied", |m| {
        counter(m, "mxlb_proxy_ended_by_move_total") == 2.0
            && counter(m, "mxlb_proxy_relayed_total{path=\"sockmap\"}") == 1.0
            && counter(m, "mxlb_proxy_relayed_total{path=\"copy\"}") == 1.0
    })?;
    let w: serde_json::Value = serde_json::from_str(&p.node.cli(&["mailbox", "where", user, "--json"])?)?;
    ensure!(w["owner"]["backend"] == "b2" && w["owner"]["source"] == "table", "{w}");

    p.client(move |_| -> Result<()> {
        let mut c = MailClient::connect(imap, None)?;
        c.line()?;
        let r = c.imap("a", &format!("LOGIN {user} {}", imap_quoted(pw)))?;
        ensure!(r.last().is_some_and(|l| l.starts_with("a OK")), "{r:?}");
        c.imap("b", "LOGOUT")?;
        Ok(())
    })?;
    let client = p.client_ip(AddrFamily::V4);
    ensure!(p.logins(2, user, client) == 1, "the login after the move did not reach b2:\n{}", p.dovecots[1].log());
    ensure!(p.logins(1, user, client) == 2, "b1 saw other than the two sessions before the move:\n{}", p.dovecots[0].log());
    Ok(())
}

#[test]
fn with_imap_id_the_owners_see_the_client_on_their_normal_ports() -> Result<()> {
    if !lab::require_root("with_imap_id_the_owners_see_the_client_on_their_normal_ports") {
        return Ok(());
    }
    let _serial = serial();
    let lab = ProxyLab::lab()?;
    let p = ProxyLab::start_with(&lab, ProxyOpts { pass_client: "imap-id", ..Default::default() })?;
    let (imap, pop3) = (p.vip(AddrFamily::V4, 143), p.vip(AddrFamily::V6, 110));
    p.client(move |_| -> Result<()> {
        for (user, pw, _) in USERS {
            let mut c = MailClient::connect(imap, None)?;
            c.line()?;
            let r = c.imap("a", &format!("LOGIN {} {}", imap_quoted(user), imap_quoted(pw)))?;
            ensure!(r.last().is_some_and(|l| l.starts_with("a OK")), "{user}: {r:?}");
            c.imap("b", "LOGOUT")?;
            let mut c = MailClient::connect(pop3, None)?;
            c.line()?;
            c.cmd(&format!("USER {user}"))?;
            let r = c.cmd(&format!("PASS {pw}"))?;
            ensure!(r.starts_with("+OK"), "{user}: {r}");
            c.cmd("QUIT")?;
        }
        Ok(())
    })?;
    // IMAP by ID, POP3 by XCLIENT: each owner logs the client's own address (v4 and v6).
    for (user, _, i) in USERS {
        for fam in [AddrFamily::V4, AddrFamily::V6] {
            let client = p.client_ip(fam);
            ensure!(p.logins(i, user, client) == 1, "{user} on b{i} with rip={client}:\n{}", p.dovecots[i - 1].log());
        }
    }
    // The owners are probed on the same normal ports, without a PROXY header: the probes pass.
    let mut last = String::new();
    let probed = wait_some("two passed probes of each owner on 110 and 143", Duration::from_secs(20), || {
        last = p.metrics()?;
        let m = &last;
        let passed = |b: &str, check: &str| counter(m, &format!("mxlb_probe_duration_seconds_count{{backend=\"{b}\",check=\"{check}\"}}"));
        let failed: f64 = ["b1", "b2", "b3"].iter().flat_map(|b| ["pop3", "imap"].map(|c| counter(m, &format!("mxlb_probe_failures_total{{backend=\"{b}\",check=\"{c}\"}}")))).sum();
        ensure!(failed == 0.0, "probes of the owners failed:\n{m}");
        Ok(["b1", "b2", "b3"].iter().all(|b| passed(b, "pop3") >= 2.0 && passed(b, "imap") >= 2.0).then_some(()))
    });
    probed.with_context(|| format!("metrics:\n{last}"))
}
