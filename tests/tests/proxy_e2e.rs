//! The POP3/IMAP proxy against real Dovecot back-ends: every login method, in clear, after
//! STARTTLS/STLS and over implicit TLS, over IPv4 and IPv6, lands on the user's own back-end
//! with the client's address (Dovecot's `Login:` log line, `rip=` via PROXY v2); failures
//! look alike; a down owner gets "try later"; hostile clients are bounded.
//!
//! The tests take turns ([`serial`]); each builds its own lab. Needs root; skips locally
//! otherwise, fails under CI=true.
use std::{
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use anyhow::{Result, ensure};
use lab::{
    AddrFamily,
    proxy::{MailClient, ProxyLab, USERS, plain},
};

fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// An IMAP quoted string.
fn q(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

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
                c.send(format!("a1 LOGIN {} {{{}}}\r\n", q(&user), pw.len()).as_bytes())?;
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
        let b = c.imap("t", &format!("LOGIN {user} {}", q(pw)))?.join("\n");
        Ok((a, b))
    })?;
    assert_eq!(down.0, "-ERR [SYS/TEMP] Account is temporarily unavailable.");
    assert_eq!(down.1, "t NO [UNAVAILABLE] Account is temporarily unavailable.");
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
