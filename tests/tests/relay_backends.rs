//! The relay against real back-end software: LMTP into Dovecot read back over IMAP byte for
//! byte, bounces (RFC 3464 DSNs) for recipients a back-end refuses, retries with backoff after
//! a temporary refusal, XCLIENT into a real Postfix, and partitioned routing (every mailbox on
//! one owner; mail for a down owner waits for it instead of landing elsewhere).
//!
//! The tests take turns ([`serial`]): each builds its own lab, and on a small machine their
//! timings (VRRP, health probes, retries) should not be each other's. Needs root; skips
//! locally otherwise, fails under CI=true.
use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    path::PathBuf,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lab::{
    Lab, SinkOpts, SmtpSink,
    dovecot::Dovecot,
    postfix::PostfixRelay,
    proxy::wait_inbox,
    wait_some,
    relay::{DumpSinks, RawSmtp, RelayOpts, RelayPair, SmtpReply, relay_lab, send_all, transport_test_message},
};

fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Helpers.

/// `mxlb queue list --json` on LB 1: the entries of its own queue (not the peer's replicas).
fn queued(pair: &RelayPair) -> Result<Vec<serde_json::Value>> {
    let out = pair.lb1.cli(&["queue", "list", "--json"])?;
    let v: Vec<serde_json::Value> = serde_json::from_str(&out).with_context(|| format!("queue list --json: {out}"))?;
    Ok(v.into_iter().filter(|e| e["area"] == "queue").collect())
}

/// Waits (bounded) until LB 1's queue and LB 2's replicas are empty.
fn wait_queue_empty(pair: &RelayPair, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let q = queued(pair)?;
        let replicas = pair.spooled(2, "replica");
        if q.is_empty() && replicas.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("still queued after {timeout:?}: {q:#?}\nreplicas on LB 2: {replicas:?}\nLB 1 log:\n{}", pair.lb1.log());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A scratch directory smtp-sink (running as nobody) can write its dumps into; removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(lab: &Lab, what: &str) -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("{}-{what}", lab.prefix()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
        Ok(Scratch(dir))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The messages of an smtp-sink dump file (each starts with its `X-Client-Addr:` record).
fn dumped_messages(dump: &std::path::Path) -> Vec<String> {
    let text = std::fs::read(dump).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    text.split("X-Client-Addr: ").skip(1).map(|m| format!("X-Client-Addr: {m}")).collect()
}

/// The header fields of a message (unfolded), in order; stops at the first empty line.
fn header_fields(msg: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in msg.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            out.push((k.to_string(), v.trim().to_string()));
        }
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// 1. LMTP into Dovecot.

#[test]
fn lmtp_to_dovecot_reads_back_identical_over_imap_and_unknown_users_bounce() -> Result<()> {
    if !lab::require_root("lmtp_to_dovecot_reads_back_identical_over_imap_and_unknown_users_bounce") {
        return Ok(());
    }
    let _serial = serial();
    let lab = relay_lab(2)?;
    let users = [("u1@example.net", "pw1"), ("u2@example.net", "pw2")];
    let _dovecots: Vec<Dovecot> = lab
        .backends()
        .iter()
        .map(|b| Dovecot::start(b.ns(), &b.name(), &users, b.v4().into()).with_context(|| format!("dovecot on {}", b.name())))
        .collect::<Result<_>>()?;
    // u1 lives on b1, u2 on b2; the unknown user goes wherever the hash puts it.
    let scratch = Scratch::new(&lab, "lmtp")?;
    let map = scratch.path("mailbox_table");
    std::fs::write(&map, "u1@example.net b1\nu2@example.net b2\n")?;
    let opts = RelayOpts {
        protocol: "lmtp".into(),
        delivery_extra: "routing = \"partitioned\"\nretry_first_ms = 200\nretry_max_ms = 1000\ntimeout_ms = 5000".into(),
        mailbox: Some(format!("table = \"{}\"", map.display())),
        ..Default::default()
    };
    let pair = RelayPair::start(&lab, opts)?;
    let vip = pair.vip();

    let content = transport_test_message("u1@example.net", "interop bytes", "interop-1@example.com");
    let expected_tail = [content.as_slice(), b"\r\n"].concat();

    let ids = send_all(
        &lab,
        vip,
        vec![
            ("sender@example.com".into(), vec!["u1@example.net".into()], content.clone()),
            // From a mailbox of ours (so the bounce comes back to a Dovecot), to one user Dovecot
            // knows and one it does not: the known one gets it, the sender hears of the other.
            (
                "u2@example.net".into(),
                vec!["u1@example.net".into(), "nobody@example.net".into()],
                b"From: <u2@example.net>\r\nTo: <u1@example.net>, <nobody@example.net>\r\nSubject: half deliverable\r\n\r\nhello".to_vec(),
            ),
        ],
    )?;
    eprintln!("accepted: {ids:?}");

    let inbox = wait_inbox(&lab, 1, "u1@example.net", "pw1", 2, Duration::from_secs(30))
        .with_context(|| format!("LB 1 log:\n{}", pair.lb1.log()))?;
    let first = inbox.iter().find(|m| find(m, b"Subject: interop bytes")).context("the byte-test message is not in u1's INBOX")?;
    if !first.ends_with(&expected_tail) {
        bail!(
            "the message read back over IMAP does not end with what the client sent.\nsent (unstuffed):\n{:?}\nfetched:\n{:?}",
            String::from_utf8_lossy(&expected_tail),
            String::from_utf8_lossy(first)
        );
    }
    let prefix = &first[..first.len() - expected_tail.len()];
    let prefix_text = String::from_utf8_lossy(prefix);
    eprintln!("headers prepended on the way:\n{prefix_text}");
    let prepended: Vec<String> = header_fields(&prefix_text).into_iter().map(|(k, _)| k.to_ascii_lowercase()).collect();
    ensure!(
        prepended.iter().all(|k| ["return-path", "delivered-to", "received"].contains(&k.as_str())),
        "something other than trace headers was added in front: {prepended:?}"
    );
    ensure!(
        prefix_text.contains(&format!("(mxlb) with ESMTP id {}", ids[0])),
        "our Received header with the queue id is missing:\n{prefix_text}"
    );
    ensure!(prefix_text.contains("Return-Path: <sender@example.com>"), "envelope sender not kept:\n{prefix_text}");
    ensure!(inbox.iter().any(|m| find(m, b"Subject: half deliverable")), "the deliverable half of message 2 did not reach u1");

    // The bounce for nobody@example.net comes back to u2 (on b2) from the null sender.
    let u2 = wait_inbox(&lab, 2, "u2@example.net", "pw2", 1, Duration::from_secs(30))
        .with_context(|| format!("no bounce reached the sender u2@example.net\nLB 1 log:\n{}", pair.lb1.log()))?;
    let dsn = u2
        .iter()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .find(|m| m.contains("report-type=delivery-status"))
        .with_context(|| format!("u2's INBOX has no DSN: {:?}", u2.iter().map(|m| String::from_utf8_lossy(m)).collect::<Vec<_>>()))?;
    eprintln!("the DSN as u2 reads it:\n{dsn}");
    ensure!(dsn.contains("Return-Path: <>"), "the DSN is not from the null sender");
    ensure!(dsn.contains("Final-Recipient: rfc822; nobody@example.net"), "no Final-Recipient for the unknown user");
    ensure!(dsn.contains("Action: failed") && dsn.contains("Status: 5.1.1"), "not a 5.1.1 failure report");
    ensure!(!dsn.contains("Final-Recipient: rfc822; u1@example.net"), "the delivered recipient is reported as failed");
    ensure!(dsn.contains("Subject: half deliverable"), "the original headers are not quoted");
    ensure!(dsn.contains(&format!("X-Mxlb-Queue-ID: {}", ids[1])), "the DSN does not name the original queue id");
    ensure!(u2.len() == 1, "u2 got {} messages, expected the one DSN", u2.len());

    wait_queue_empty(&pair, Duration::from_secs(15))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Bounce on a permanent failure, through smtp-sink.

#[test]
fn a_permanent_refusal_bounces_to_the_sender() -> Result<()> {
    if !lab::require_root("a_permanent_refusal_bounces_to_the_sender") {
        return Ok(());
    }
    let _serial = serial();
    let lab = relay_lab(2)?;
    let scratch = Scratch::new(&lab, "dsn")?;
    // b1 refuses every recipient with a hard error; b2 takes everything and dumps it.
    let _refusing = SmtpSink::start(
        lab.backend(1).ns(),
        &SinkOpts {
            hostname: Some("b1".into()),
            extra: vec!["-f".into(), "rcpt".into(), "-B".into(), "550 5.1.1 Recipient address rejected: no such user".into()],
            ..Default::default()
        },
    )?;
    let dump2 = scratch.path("b2");
    let _taking = SmtpSink::start(
        lab.backend(2).ns(),
        &SinkOpts { hostname: Some("b2".into()), extra: vec!["-D".into(), dump2.display().to_string()], ..Default::default() },
    )?;
    let map = scratch.path("mailbox_table");
    std::fs::write(&map, "gone@example.net b1\nsender@example.net b2\n")?;
    let opts = RelayOpts {
        delivery_extra: "routing = \"partitioned\"\nretry_first_ms = 200\nretry_max_ms = 1000\ntimeout_ms = 5000".into(),
        mailbox: Some(format!("table = \"{}\"", map.display())),
        ..Default::default()
    };
    let pair = RelayPair::start(&lab, opts)?;
    let ids = send_all(
        &lab,
        pair.vip(),
        vec![(
            "sender@example.net".into(),
            vec!["gone@example.net".into()],
            b"From: <sender@example.net>\r\nTo: <gone@example.net>\r\nSubject: to a gone mailbox\r\nMessage-ID: <gone-1@example.net>\r\n\r\nhello".to_vec(),
        )],
    )?;
    let original = &ids[0];

    let dsn = wait_some("a DSN at the sender's back-end b2", Duration::from_secs(30), || {
        Ok(dumped_messages(&dump2).into_iter().find(|m| m.contains("report-type=delivery-status")))
    })
    .with_context(|| format!("LB 1 log:\n{}", pair.lb1.log()))?;
    eprintln!("the DSN as b2 received it:\n{dsn}");
    // smtp-sink's records: `X-Mail-Args: <>` is `MAIL FROM:<>`, `X-Rcpt-Args` each RCPT TO.
    let envelope: Vec<&str> = dsn.lines().take_while(|l| l.starts_with("X-")).collect();
    ensure!(
        envelope.iter().any(|l| *l == "X-Mail-Args: <>" || l.starts_with("X-Mail-Args: <> ")),
        "the DSN is not from the null sender: {envelope:?}"
    );
    ensure!(
        envelope.iter().any(|l| l.to_ascii_lowercase().starts_with("x-rcpt-args: <sender@example.net>")),
        "the DSN is not addressed to the original sender: {envelope:?}"
    );
    let fields = header_fields(&dsn);
    let ctype = fields.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-type")).map(|(_, v)| v.as_str()).unwrap_or("");
    ensure!(ctype.starts_with("multipart/report") && ctype.contains("report-type=delivery-status"), "Content-Type: {ctype}");
    ensure!(dsn.contains("Final-Recipient: rfc822; gone@example.net"), "no Final-Recipient");
    ensure!(dsn.contains("Action: failed"), "no Action: failed");
    ensure!(dsn.contains("Status: 5.1.1"), "the status is not the back-end's 5.1.1");
    ensure!(dsn.contains("Diagnostic-Code: smtp; 550 5.1.1"), "the back-end's reply is not the Diagnostic-Code");
    ensure!(dsn.contains(&format!("X-Mxlb-Queue-ID: {original}")), "the original queue id is not named");
    ensure!(dsn.contains("Subject: to a gone mailbox"), "the original headers are not quoted");

    // Exactly one bounce, the original delivered nowhere, nothing left queued.
    wait_queue_empty(&pair, Duration::from_secs(15))?;
    std::thread::sleep(Duration::from_secs(1));
    let all = dumped_messages(&dump2);
    ensure!(all.iter().filter(|m| m.contains("report-type=delivery-status")).count() == 1, "more than one DSN: {all:#?}");
    ensure!(!all.iter().any(|m| m.contains("Subject: to a gone mailbox") && !m.contains("delivery-status")), "the original was delivered");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. A temporary refusal, then success.

#[test]
fn a_temporary_refusal_is_retried_with_backoff_until_delivered_once() -> Result<()> {
    if !lab::require_root("a_temporary_refusal_is_retried_with_backoff_until_delivered_once") {
        return Ok(());
    }
    let _serial = serial();
    let lab = relay_lab(1)?;
    // b1 answers but refuses every recipient with 450 for now.
    let soft = SmtpSink::start(
        lab.backend(1).ns(),
        &SinkOpts { hostname: Some("b1".into()), extra: vec!["-r".into(), "rcpt".into()], ..Default::default() },
    )?;
    let pair = RelayPair::start(&lab, RelayOpts::default())?;
    let ids = send_all(
        &lab,
        pair.vip(),
        vec![("sender@example.com".into(), vec!["u@example.net".into()], b"Subject: retried\r\n\r\nhello".to_vec())],
    )?;
    let id = ids[0].clone();

    // Pending, retried more than once, the back-end's 450 recorded.
    let first_seen = Instant::now();
    let entry = wait_some("the message pending after 2 attempts", Duration::from_secs(15), || {
        Ok(queued(&pair)?.into_iter().find(|e| e["id"] == id.as_str() && e["rcpts"][0]["attempts"].as_u64().unwrap_or(0) >= 2))
    })
    .with_context(|| format!("LB 1 log:\n{}", pair.lb1.log()))?;
    eprintln!("pending: {entry}");
    let rcpt = &entry["rcpts"][0];
    ensure!(rcpt["state"] == "pending", "{entry}");
    ensure!(rcpt["last_reply"].as_str().unwrap_or_default().starts_with("450"), "the 450 is not recorded: {entry}");
    // Backoff: with retry_first_ms = 200 doubling to 1000 ms, 3 more seconds bring a handful
    // of attempts (about 5), not a busy loop.
    std::thread::sleep(Duration::from_secs(3).saturating_sub(first_seen.elapsed()));
    let later = queued(&pair)?;
    let attempts = later.iter().find(|e| e["id"] == id.as_str()).and_then(|e| e["rcpts"][0]["attempts"].as_u64()).unwrap_or(0);
    eprintln!("attempts after ~3 s: {attempts}");
    ensure!((2..=12).contains(&attempts), "attempts after ~3 s: {attempts} (backoff not applied?) {later:?}");

    // The back-end recovers: exactly one delivery, and the queue empties.
    drop(soft);
    let sinks = DumpSinks::start(&lab)?;
    let got = sinks.wait_for(std::slice::from_ref(&id), Duration::from_secs(15));
    ensure!(got.get(&id) == Some(&1), "{id} arrived {:?} times\nLB 1 log:\n{}", got.get(&id), pair.lb1.log());
    wait_queue_empty(&pair, Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(sinks.received().get(&id) == Some(&1), "delivered again later: {:?}", sinks.received());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. XCLIENT into Postfix.

/// What Postfix made of one message relayed through it with XCLIENT.
struct ViaPostfix {
    /// Postfix's Received header (unfolded).
    received: String,
    /// Postfix's maillog.
    log: String,
    client: String,
    lb1: String,
}

/// Postfix on b1:25 (XCLIENT allowed from the LB nodes) as the relay's back-end, relaying on
/// to a dumping smtp-sink on b1:2525; one message from the lab client through the VIP.
fn through_postfix() -> Result<ViaPostfix> {
    let lab = relay_lab(1)?;
    let b1 = lab.backend(1);
    let scratch = Scratch::new(&lab, "xclient")?;
    let dump = scratch.path("final");
    let _final = SmtpSink::start(
        b1.ns(),
        &SinkOpts { port: 2525, hostname: Some("final".into()), extra: vec!["-D".into(), dump.display().to_string()], ..Default::default() },
    )?;
    let lbs = format!("{} {}", lab.lb_n(1).v4(), lab.lb_n(2).v4());
    let pf = PostfixRelay::start_with(
        b1.ns(),
        "b1",
        b1.v4().into(),
        SocketAddr::new(b1.v4().into(), 2525),
        &format!("smtpd_authorized_xclient_hosts = {lbs}"),
    )?;
    let pair = RelayPair::start(&lab, RelayOpts::default())?;
    let ids = send_all(
        &lab,
        pair.vip(),
        vec![("sender@example.com".into(), vec!["u@example.net".into()], b"Subject: via postfix\r\n\r\nhello".to_vec())],
    )?;
    let msg = wait_some("the message at the sink behind Postfix", Duration::from_secs(30), || {
        Ok(dumped_messages(&dump).into_iter().find(|m| m.contains(&ids[0])))
    })
    .with_context(|| format!("LB 1 log:\n{}\n{}", pair.lb1.log(), pf.log_tail(30)))?;
    eprintln!("at the final sink:\n{msg}");
    let received = header_fields(&msg)
        .into_iter()
        .find(|(k, v)| k == "Received" && v.contains("(Postfix)"))
        .map(|(_, v)| v)
        .with_context(|| format!("no Received header from Postfix:\n{msg}"))?;
    Ok(ViaPostfix { received, log: pf.log(), client: lab.client().v4().to_string(), lb1: lab.lb_n(1).v4().to_string() })
}

#[test]
fn xclient_gives_postfix_the_original_client_address() -> Result<()> {
    if !lab::require_root("xclient_gives_postfix_the_original_client_address") {
        return Ok(());
    }
    let _serial = serial();
    let v = through_postfix()?;
    let (client, lb1) = (&v.client, &v.lb1);
    ensure!(v.received.contains(&format!("[{client}]")), "Postfix's Received header does not name the client {client}: {}", v.received);
    ensure!(!v.received.contains(&format!("[{lb1}]")), "Postfix's Received header names the LB node: {}", v.received);
    // What Postfix's own checks (smtpd restrictions, policy services, postscreen logs) see.
    ensure!(v.log.contains(&format!("client=unknown[{client}]")), "Postfix's log does not name the client:\n{}", v.log);
    Ok(())
}

/// XCLIENT's `HELO=` is overwritten by the EHLO that must follow XCLIENT unless that EHLO
/// repeats the client's name (Postfix's XCLIENT_README and nginx's mail proxy send the
/// original client's HELO name there): Postfix's Received header should say
/// `from client.example.com`, as the client greeted.
#[test]
fn xclient_gives_postfix_the_original_client_helo() -> Result<()> {
    if !lab::require_root("xclient_gives_postfix_the_original_client_helo") {
        return Ok(());
    }
    let _serial = serial();
    let v = through_postfix()?;
    ensure!(
        v.received.starts_with("from client.example.com "),
        "Postfix's Received header does not carry the client's HELO (client.example.com): {}\n\
         (the relay sends `EHLO <its own hostname>` after XCLIENT, which replaces the HELO= it passed)",
        v.received
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. Partitioned routing.

#[test]
fn partitioned_routing_keeps_each_mailbox_on_its_owner_and_waits_for_it() -> Result<()> {
    if !lab::require_root("partitioned_routing_keeps_each_mailbox_on_its_owner_and_waits_for_it") {
        return Ok(());
    }
    let _serial = serial();
    let lab = relay_lab(2)?;
    let mut sinks = DumpSinks::start(&lab)?;
    let opts = RelayOpts {
        delivery_extra: "routing = \"partitioned\"\nretry_first_ms = 200\nretry_max_ms = 1000\ntimeout_ms = 5000".into(),
        mailbox: Some(String::new()),
        ..Default::default()
    };
    let pair = RelayPair::start(&lab, opts)?;
    let mailboxes: Vec<String> = (1..=5).map(|i| format!("box{i}@example.net")).collect();

    // 20 messages to each mailbox, interleaved, over a few sessions.
    let mut owner_of: HashMap<String, String> = HashMap::new(); // queue id -> mailbox
    for round in 0..4 {
        let msgs: Vec<(String, Vec<String>, Vec<u8>)> = (0..5)
            .flat_map(|k| mailboxes.iter().map(move |m| (k, m.clone())))
            .map(|(k, m)| {
                let body = format!("Subject: partitioned {round}/{k} for {m}\r\n\r\nhello {m}");
                ("sender@example.com".to_string(), vec![m], body.into_bytes())
            })
            .collect();
        let targets: Vec<String> = msgs.iter().map(|(_, r, _)| r[0].clone()).collect();
        let ids = send_all(&lab, pair.vip(), msgs)?;
        owner_of.extend(ids.into_iter().zip(targets));
    }
    let all: Vec<String> = owner_of.keys().cloned().collect();
    let got = sinks.wait_for(&all, Duration::from_secs(60));
    let missing: Vec<&String> = all.iter().filter(|id| !got.contains_key(*id)).collect();
    ensure!(missing.is_empty(), "{} of 100 never arrived: {missing:?}\nLB 1 log:\n{}", missing.len(), pair.lb1.log());
    ensure!(got.values().all(|&n| n == 1), "duplicates: {:?}", got.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>());

    let per_backend: Vec<HashMap<String, usize>> = (1..=2).map(|i| lab::relay::relayed_ids(&sinks.dump_text(i))).collect();
    let mut backends_of: HashMap<&str, BTreeSet<usize>> = HashMap::new();
    for (id, mailbox) in &owner_of {
        for (i, ids) in per_backend.iter().enumerate() {
            if ids.contains_key(id) {
                backends_of.entry(mailbox.as_str()).or_default().insert(i + 1);
            }
        }
    }
    eprintln!("mailbox -> back-ends: {backends_of:?}");
    for m in &mailboxes {
        let set = backends_of.get(m.as_str()).cloned().unwrap_or_default();
        ensure!(set.len() == 1, "{m} was delivered to back-ends {set:?}, not to one owner");
    }
    let owner = |m: &str| *backends_of[m].iter().next().unwrap_or(&0);

    // The owner of box1 goes down: its mail waits, and none of it goes to the other back-end,
    // while mail for a mailbox of the other back-end (if one has it) still flows.
    let down = owner(&mailboxes[0]);
    let other_box = mailboxes.iter().find(|m| owner(m) != down).cloned();
    eprintln!("stopping b{down} (owner of {}); other back-end's mailbox: {other_box:?}", mailboxes[0]);
    sinks.kill(down);
    let mut msgs: Vec<(String, Vec<String>, Vec<u8>)> = (0..5)
        .map(|k| ("sender@example.com".into(), vec![mailboxes[0].clone()], format!("Subject: while down {k}\r\n\r\nwait").into_bytes()))
        .collect();
    if let Some(o) = &other_box {
        msgs.extend((0..5).map(|k| ("sender@example.com".into(), vec![o.clone()], format!("Subject: flowing {k}\r\n\r\ngo").into_bytes())));
    }
    let ids = send_all(&lab, pair.vip(), msgs)?;
    let (waiting, flowing) = ids.split_at(5);
    let got = sinks.wait_for(flowing, Duration::from_secs(20));
    ensure!(flowing.iter().all(|id| got.get(id) == Some(&1)), "mail for the healthy owner did not flow: {flowing:?} / {got:?}");
    // Give the relay time to misroute if it would (health probes mark b{down} down within ~1 s).
    std::thread::sleep(Duration::from_secs(4));
    let got = sinks.received();
    let misrouted: Vec<&String> = waiting.iter().filter(|id| got.contains_key(*id)).collect();
    ensure!(misrouted.is_empty(), "mail for the down owner was delivered elsewhere: {misrouted:?}");
    let q = queued(&pair)?;
    let pending: Vec<&serde_json::Value> = q.iter().filter(|e| waiting.iter().any(|id| e["id"] == id.as_str())).collect();
    ensure!(pending.len() == 5, "not all 5 are waiting in the queue: {q:#?}");
    eprintln!("waiting: {}", pending[0]);

    // The owner is back: its mail arrives there, once each.
    sinks.restart(&lab, down)?;
    let got = sinks.wait_for(waiting, Duration::from_secs(30));
    ensure!(waiting.iter().all(|id| got.get(id) == Some(&1)), "after the restart: {waiting:?} / {got:?}\nLB 1 log:\n{}", pair.lb1.log());
    let on_owner = lab::relay::relayed_ids(&sinks.dump_text(down));
    ensure!(waiting.iter().all(|id| on_owner.contains_key(id)), "delivered, but not to the owner b{down}");
    wait_queue_empty(&pair, Duration::from_secs(10))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. Mailboxes learned from the back-ends.

/// `mxlb agent --mailboxes` on back-end `b`, listing its Dovecot's users with doveadm.
fn mailbox_agent(b: &lab::Host, dovecot: &Dovecot) -> Result<lab::Daemon> {
    let mut cmd = std::process::Command::new(lab::node::mxlb_bin()?);
    let listing = format!("command:doveadm -c {} user '*'", dovecot.config_path().display());
    cmd.args(["--netns", b.ns().name(), "agent", "--listen", &format!("{}:5555", b.v4())])
        .args(["--queue-command", "echo 0", "--mailboxes", &listing]);
    lab::Daemon::spawn("mxlb agent", cmd, None)
}

#[test]
fn users_added_on_a_back_end_become_deliverable_and_unknown_users_get_550_at_rcpt() -> Result<()> {
    if !lab::require_root("users_added_on_a_back_end_become_deliverable_and_unknown_users_get_550_at_rcpt") {
        return Ok(());
    }
    let _serial = serial();
    let lab = relay_lab(2)?;
    // Each back-end has its own users; the LB config names none of them.
    let dovecots: Vec<Dovecot> = [("b1", ("alice@example.net", "pa")), ("b2", ("bob@example.net", "pb"))]
        .iter()
        .zip(lab.backends())
        .map(|((name, user), b)| Dovecot::start(b.ns(), name, &[*user], b.v4().into()))
        .collect::<Result<_>>()?;
    let _agents: Vec<lab::Daemon> =
        lab.backends().iter().zip(&dovecots).map(|(b, d)| mailbox_agent(b, d)).collect::<Result<_>>()?;
    let refresh_s = 2;
    let scratch = Scratch::new(&lab, "learned")?;
    let table = scratch.path("mailbox_table");
    let opts = RelayOpts {
        protocol: "lmtp".into(),
        delivery_extra: "routing = \"partitioned\"\nretry_first_ms = 200\nretry_max_ms = 1000\ntimeout_ms = 5000".into(),
        mailbox: Some(format!("refresh_interval_s = {refresh_s}\ntable = \"{}\"", table.display())),
        agent_port: Some(5555),
        mirrored: false,
        ..Default::default()
    };
    let pair = RelayPair::start(&lab, opts)?;
    let vip = pair.vip();
    let rcpt = |address: &str| -> Result<SmtpReply> {
        let address = address.to_string();
        lab.client().ns().run(move || -> Result<SmtpReply> {
            let (mut c, _) = RawSmtp::connect(vip)?;
            c.cmd("EHLO client.example.com")?;
            c.cmd("MAIL FROM:<sender@example.com>")?;
            c.cmd(&format!("RCPT TO:<{address}>"))
        })?
    };
    // Until both lists are in, the answer is "try later"; then known users pass, others 550.
    wait_some("both back-ends' lists", Duration::from_secs(20), || Ok((rcpt("alice@example.net")?.code == 250).then_some(())))?;
    for (user, code, enhanced) in
        [("alice@example.net", 250, "2.1.5"), ("BOB@example.net", 250, "2.1.5"), ("nobody@example.net", 550, "5.1.1")]
    {
        let r = rcpt(user)?;
        ensure!(r.code == code && r.text.contains(enhanced), "RCPT {user}: {r:?}");
    }

    // A user added on b2 only: deliverable within one refresh interval (plus the fetch).
    ensure!(rcpt("carol@example.net")?.code == 550, "carol does not exist yet");
    dovecots[1].add_user("carol@example.net", "pc")?;
    let added = Instant::now();
    wait_some("carol learned", Duration::from_secs(refresh_s + 5), || Ok((rcpt("carol@example.net")?.code == 250).then_some(())))?;
    eprintln!("carol accepted {:?} after she was added (refresh interval {refresh_s} s)", added.elapsed());
    let where_carol = pair.lb1.cli(&["mailbox", "where", "carol@example.net", "--json"])?;
    let w: serde_json::Value = serde_json::from_str(&where_carol).context(where_carol.clone())?;
    ensure!(w["owner"]["backend"] == "b2" && w["owner"]["source"] == "learned", "{where_carol}");

    // Mail for her goes to b2, the back-end that has her, and reads back there.
    let ids = send_all(
        &lab,
        vip,
        vec![("sender@example.com".into(), vec!["carol@example.net".into()], b"Subject: welcome\r\n\r\nhello carol".to_vec())],
    )?;
    ensure!(ids.len() == 1);
    let got = wait_inbox(&lab, 2, "carol@example.net", "pc", 1, Duration::from_secs(20))?;
    ensure!(find(&got[0], b"hello carol"), "{}", String::from_utf8_lossy(&got[0]));

    // The listing shows every learned mailbox and both back-ends' lists.
    let list = pair.lb1.cli(&["mailbox", "list", "--json"])?;
    let l: serde_json::Value = serde_json::from_str(&list).context(list.clone())?;
    let names: Vec<&str> = l["mailboxes"].as_array().into_iter().flatten().filter_map(|m| m["mailbox"].as_str()).collect();
    ensure!(names == ["alice@example.net", "bob@example.net", "carol@example.net"], "{list}");
    ensure!(l["backends"].as_array().is_some_and(|b| b.iter().all(|b| b["last_error"].is_null())), "{list}");

    // The operator moves her: the table wins over what the back-ends report.
    let moved = pair.lb1.cli(&["mailbox", "move", "Carol@example.net", "b1"])?;
    ensure!(moved.contains("now on b1"), "{moved}");
    let w: serde_json::Value = serde_json::from_str(&pair.lb1.cli(&["mailbox", "where", "carol@example.net", "--json"])?)?;
    ensure!(w["owner"]["backend"] == "b1" && w["owner"]["source"] == "table", "{w}");
    let refused = pair.lb1.cli(&["mailbox", "move", "carol@example.net", "b9"]);
    ensure!(refused.as_ref().is_err_and(|e| e.to_string().contains("no mailbox back-end is named `b9`")), "{refused:?}");
    Ok(())
}
