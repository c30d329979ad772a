//! Health probing end to end: a back-end whose mail server dies under load is marked down by
//! the agent's SMTP probes (interval 100 ms, fall 3), after which no new session reaches it and
//! none fails; when the server returns, the back-end is marked up (rise 2) and takes sessions
//! again. Needs root; skips locally otherwise, fails under CI=true.
use std::{
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant},
};

use lab::{
    AddrFamily, Lab, SinkOpts, SmtpSink,
    node::{Mode, MxlbNode, NodeOpts},
    sessions::{Progress, SessionOpts, run_sessions},
};

fn fill(dir: &std::path::Path, n: usize) {
    for i in 0..n {
        std::fs::write(dir.join(format!("Q{i:05}")), b"queued").unwrap();
    }
}

fn trim(dir: &std::path::Path, keep: usize) {
    let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for f in files.into_iter().skip(keep) {
        std::fs::remove_file(f).unwrap();
    }
}

#[test]
fn agent_queue_drains_a_backend_with_hysteresis_and_scales_its_weight() {
    if !lab::require_root("agent_queue_drains_a_backend_with_hysteresis_and_scales_its_weight") {
        return;
    }
    let lab = Lab::builder().backends(3).build().expect("lab");
    let spool = std::env::temp_dir().join(format!("{}-spool", lab.prefix()));
    let active = spool.join("active");
    std::fs::create_dir_all(&active).unwrap();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(spool.clone());
    // The agent's own limit (100) only shapes its weight share; the LB drains at 50 and takes
    // the back-end back at 20.
    let b1 = lab.backend(1);
    let mut cmd = std::process::Command::new(lab::node::mxlb_bin().unwrap());
    cmd.args(["--netns", b1.ns().name(), "agent", "--listen", &format!("{}:5555", b1.v4()), "--max-queue", "100", "--max-load", "1000000"])
        .arg("--spool")
        .arg(&spool);
    let _agent = lab::Daemon::spawn("mxlb agent", cmd, None).unwrap();
    let metrics_addr: std::net::SocketAddr = format!("{}:9464", lab.lb().v4()).parse().unwrap();
    let opts = NodeOpts {
        mode: Mode::DsrL2,
        agent_port: Some(5555),
        metrics_listen: Some(metrics_addr),
        health: Some("interval_ms = 100\nagent_interval_ms = 100\n[health.drain]\nqueue = 50\ndisk_pct = 99.9\nresponse_ms = 5000\n[health.resume]\nqueue = 20\ndisk_pct = 99.0\nresponse_ms = 4000".into()),
        ..Default::default()
    };
    let node = MxlbNode::start(&lab, opts).expect("mxlb starts");
    assert!(wait_state(&node, "b1", "up", Duration::from_secs(5)).is_some());

    // 25 queued: the agent reports 75%, the LB scales b1's weight, no drain.
    fill(&active, 25);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.log().contains("share=0.75") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(node.log().contains("share=0.75"), "weight share follows the agent:\n{}", node.log());
    assert_eq!(state(&node, "b1"), "up");

    // 60 queued (>= 50): drained.
    fill(&active, 60);
    wait_state(&node, "b1", "draining", Duration::from_secs(10)).unwrap_or_else(|| panic!("never drained:\n{}", node.log()));
    // The agent may count the queue while it is being filled: any count from 50 to 60 is right.
    let drain_reason = |r: &str| {
        r.strip_prefix("queue ").and_then(|x| x.split(' ').next()).and_then(|n| n.parse::<u32>().ok()).is_some_and(|n| (50..=60).contains(&n)) && r.ends_with(">= 50")
    };
    assert!(
        node.log().lines().any(|l| l.contains("draining") && l.split("reason=").nth(1).is_some_and(|r| drain_reason(r.trim_matches('"')))),
        "{}",
        node.log()
    );

    // `mxlb status` and the Prometheus endpoint say why.
    let st: serde_json::Value = serde_json::from_str(&node.cli(&["status", "--json"]).unwrap()).unwrap();
    let b1_status = st["backends"].as_array().unwrap().iter().find(|b| b["name"] == "b1").unwrap().clone();
    assert_eq!(b1_status["state"], "draining", "{b1_status}");
    assert!(drain_reason(b1_status["overloaded"].as_str().unwrap_or("")), "{b1_status}");
    assert!(b1_status["probe_ms"].as_f64().is_some(), "{b1_status}");
    let scrape = scrape(&lab, metrics_addr);
    for want in [
        "mxlb_backend_overloaded{backend=\"b1\"} 1",
        "mxlb_backend_state{backend=\"b1\",state=\"draining\"} 1",
        "mxlb_backend_effective_weight{backend=\"b1\"} 0",
        "mxlb_backend_effective_weight{backend=\"b2\"} 100",
        "mxlb_probe_duration_seconds_bucket{",
        "mxlb_decisions_total{reason=\"forwarded\"}",
        "mxlb_vip_packets_total{vip=\"mx\",port=\"25\"}",
    ] {
        assert!(scrape.contains(want), "metrics lack `{want}`:\n{scrape}");
    }

    // 35 queued: between resume and drain, it stays drained at every look for 1.5 s.
    trim(&active, 35);
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert_eq!(state(&node, "b1"), "draining", "flapped back with the queue above resume");
        std::thread::sleep(Duration::from_millis(100));
    }

    // 10 queued (<= 20): taken back, and new sessions reach it again.
    trim(&active, 10);
    wait_state(&node, "b1", "up", Duration::from_secs(10)).unwrap_or_else(|| panic!("never resumed:\n{}", node.log()));
    let outcomes = run_sessions(lab.client().ns(), lab.vip_addr(AddrFamily::V4, 25), &SessionOpts { sessions: 300, ..Default::default() }, &Progress::default()).unwrap();
    assert!(outcomes.iter().all(|o| o.error.is_none()));
    assert!(outcomes.iter().any(|o| o.backend.as_deref() == Some(b1.name().as_str())));
}

/// GET /metrics from the client namespace.
fn scrape(lab: &Lab, addr: std::net::SocketAddr) -> String {
    use std::io::{Read as _, Write as _};
    lab.client()
        .ns()
        .run(move || {
            let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to /metrics");
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n").unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).unwrap();
            assert!(out.starts_with("HTTP/1.1 200"), "{out}");
            out
        })
        .unwrap()
}

fn state(node: &MxlbNode, name: &str) -> String {
    let json = node.backends_json().expect("backend list --json");
    json.as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .map(|b| b["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Polls the data path's state of `name` until it is `want` (bounded).
fn wait_state(node: &MxlbNode, name: &str, want: &str, max: Duration) -> Option<Instant> {
    let deadline = Instant::now() + max;
    while Instant::now() < deadline {
        if state(node, name) == want {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn dead_mail_server_is_marked_down_and_avoided_then_returns() {
    if !lab::require_root("dead_mail_server_is_marked_down_and_avoided_then_returns") {
        return;
    }
    let lab = Lab::builder().backends(3).build().expect("lab");
    let opts = NodeOpts {
        mode: Mode::DsrL2,
        health: Some("interval_ms = 100\ntimeout_ms = 200\nrise = 2\nfall = 3".into()),
        ..Default::default()
    };
    let node = MxlbNode::start(&lab, opts).expect("mxlb starts");
    assert!(wait_state(&node, "b1", "up", Duration::from_secs(5)).is_some());
    let victim = lab.backend(1).name();

    let progress = Progress::default();
    let sessions = SessionOpts { sessions: 100_000, concurrency: 10, ..Default::default() };
    let (outcomes, detected) = std::thread::scope(|s| {
        let load = s.spawn(|| run_sessions(lab.client().ns(), lab.vip_addr(AddrFamily::V4, 25), &sessions, &progress).expect("load"));
        progress.wait_done(300, Duration::from_secs(60));
        // The mail server on back-end 1 dies (both its IPv4 and IPv6 listeners).
        for pid in lab.sink(1).pids() {
            // SAFETY: kill(2) on a process the lab started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let detected = wait_state(&node, "b1", "down", Duration::from_secs(10));
        progress.wait_done(progress.done.load(Relaxed) + 500, Duration::from_secs(60));
        progress.stop();
        (load.join().expect("load thread"), detected)
    });
    let detected = detected.unwrap_or_else(|| panic!("back-end 1 was never marked down:\n{}", node.log()));
    assert!(node.log().contains("back-end down"), "the agent logs the transition with its reason:\n{}", node.log());

    // After the detection point: no session fails and none reaches the dead back-end.
    let late: Vec<_> = outcomes.iter().filter(|o| o.started > detected).collect();
    assert!(late.len() >= 400, "only {} sessions after detection", late.len());
    let failed: Vec<_> = late.iter().filter(|o| o.error.is_some()).collect();
    assert!(failed.is_empty(), "{} sessions failed after the back-end was marked down: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    assert!(late.iter().all(|o| o.backend.as_deref() != Some(victim.as_str())));

    // The server returns: marked up after `rise` good probes, and takes sessions again.
    let revived = SmtpSink::start(lab.backend(1).ns(), &SinkOpts { hostname: Some(victim.clone()), ..Default::default() }).expect("restart sink");
    wait_state(&node, "b1", "up", Duration::from_secs(10)).unwrap_or_else(|| panic!("back-end 1 never came back:\n{}", node.log()));
    let outcomes = run_sessions(lab.client().ns(), lab.vip_addr(AddrFamily::V4, 25), &SessionOpts { sessions: 300, ..Default::default() }, &Progress::default()).unwrap();
    assert!(outcomes.iter().all(|o| o.error.is_none()), "{:?}", outcomes.iter().find(|o| o.error.is_some()));
    assert!(outcomes.iter().any(|o| o.backend.as_deref() == Some(victim.as_str())), "back-end 1 takes sessions again");
    drop(revived);
}

/// A hostile "mail server" on back-end `i`'s port 25 (IPv4 and IPv6), run on threads inside its
/// namespace until `stop`: `tarpit` accepts and never answers; otherwise it sends garbage.
fn hostile_server(lab: &Lab, i: usize, tarpit: bool, stop: &'static std::sync::atomic::AtomicBool) {
    let host = lab.backend(i);
    // On every address, as a mail server listens (the VIP on its loopback included).
    let addrs: [std::net::SocketAddr; 2] = ["0.0.0.0:25".parse().unwrap(), "[::]:25".parse().unwrap()];
    for addr in addrs {
        let listener = host
            .ns()
            .run(move || {
                // The killed sink's socket may take a moment to go: retry (bounded) rather than
                // leave the port closed, which the probes would report as "refused" instead.
                let deadline = std::time::Instant::now() + Duration::from_secs(2);
                loop {
                    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
                    if addr.is_ipv6() {
                        s.set_only_v6(true)?;
                    }
                    s.set_reuse_address(true)?;
                    match s.bind(&addr.into()) {
                        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && std::time::Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(2));
                            continue;
                        }
                        r => r?,
                    }
                    s.listen(128)?;
                    return Ok::<std::net::TcpListener, std::io::Error>(s.into());
                }
            })
            .unwrap()
            .expect("bind hostile server");
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            use std::io::Write as _;
            let mut held = Vec::new();
            while !stop.load(Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) if !tarpit => {
                        let _ = s.write_all(b"\x16\x03\x01\x00\xa5 HTTP/1.1 400 Bad Request\r\n");
                        held.push(s);
                    }
                    Ok((s, _)) => held.push(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
                held.truncate(1000);
            }
        });
    }
}

#[test]
fn servers_that_hang_or_send_garbage_are_marked_down_with_a_reason() {
    if !lab::require_root("servers_that_hang_or_send_garbage_are_marked_down_with_a_reason") {
        return;
    }
    static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let lab = Lab::builder().backends(3).build().expect("lab");
    let opts = NodeOpts {
        mode: Mode::DsrL2,
        // fall 4: the swap below leaves the port closed for a moment, which must not be
        // enough to mark the back-end down (for the wrong reason) on a loaded machine.
        health: Some("interval_ms = 100\ntimeout_ms = 300\nrise = 2\nfall = 4".into()),
        ..Default::default()
    };
    let node = MxlbNode::start(&lab, opts).expect("mxlb starts");
    assert!(wait_state(&node, "b1", "up", Duration::from_secs(5)).is_some());
    // Replace the sinks of back-ends 1 and 2 with a tarpit and a garbage sender.
    for i in [1, 2] {
        for pid in lab.sink(i).pids() {
            // SAFETY: kill(2) on a process the lab started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
    hostile_server(&lab, 1, true, &STOP);
    hostile_server(&lab, 2, false, &STOP);
    let down1 = wait_state(&node, "b1", "down", Duration::from_secs(10));
    let down2 = wait_state(&node, "b2", "down", Duration::from_secs(10));
    STOP.store(true, Relaxed);
    assert!(down1.is_some() && down2.is_some(), "both marked down:\n{}", node.log());
    let log = node.log();
    assert!(log.contains("backend=b1") && log.contains("timed out at greeting"), "tarpit reason:\n{log}");
    assert!(log.contains("backend=b2") && log.contains("garbage"), "garbage reason:\n{log}");
    // The agent still serves and answers: probes never hang it.
    assert_eq!(state(&node, "b3"), "up");
    let outcomes = run_sessions(lab.client().ns(), lab.vip_addr(AddrFamily::V4, 25), &SessionOpts { sessions: 100, ..Default::default() }, &Progress::default()).unwrap();
    assert!(outcomes.iter().all(|o| o.error.is_none() && o.backend.as_deref() == Some(lab.backend(3).name().as_str())));
}

/// Reads the greeting of a POP3/IMAP session through the VIP and says which Dovecot sent it.
fn greeting_via_vip(lab: &Lab, port: u16, names: &[String]) -> Result<String, String> {
    use std::io::Read as _;
    let vip = lab.vip_addr(AddrFamily::V4, port);
    let names = names.to_vec();
    lab.client()
        .ns()
        .run(move || {
            let mut s = std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(3)).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
            let mut buf = [0u8; 512];
            let n = s.read(&mut buf).map_err(|e| e.to_string())?;
            let g = String::from_utf8_lossy(&buf[..n]).to_string();
            names.into_iter().find(|name| g.contains(&format!("{name} ready."))).ok_or(g)
        })
        .map_err(|e| e.to_string())?
}

#[test]
fn pop3_and_imap_probes_follow_real_dovecot() {
    if !lab::require_root("pop3_and_imap_probes_follow_real_dovecot") {
        return;
    }
    for (port, check) in [(143u16, "imap"), (110, "pop3")] {
        let lab = Lab::builder().backends(3).no_sinks().build().expect("lab");
        let mut dovecots: Vec<lab::dovecot::Dovecot> = lab
            .backends()
            .iter()
            .map(|b| lab::dovecot::Dovecot::start(b.ns(), &b.name(), &[("alice@example.com", "secret")], b.v4().into()).expect("dovecot"))
            .collect();
        let names: Vec<String> = dovecots.iter().map(|d| d.name.clone()).collect();
        let opts = NodeOpts {
            mode: Mode::DsrL2,
            ports: vec![port],
            check: Some(check.into()),
            health: Some("interval_ms = 100\ntimeout_ms = 500\nrise = 2\nfall = 2".into()),
            ..Default::default()
        };
        let node = MxlbNode::start(&lab, opts).expect("mxlb starts");
        // The real servers pass the probe; sessions through the VIP reach all of them.
        for b in ["b1", "b2", "b3"] {
            assert!(wait_state(&node, b, "up", Duration::from_secs(5)).is_some(), "{check}: {b}");
        }
        std::thread::sleep(Duration::from_millis(500));
        assert!(!node.log().contains("back-end down"), "{check}: a real Dovecot failed the probe:\n{}", node.log());
        // Dovecot on back-end 1 stops: it is marked down and no greeting comes from it.
        dovecots[0].stop();
        wait_state(&node, "b1", "down", Duration::from_secs(10)).unwrap_or_else(|| panic!("{check}: never marked down:\n{}", node.log()));
        for _ in 0..30 {
            let from = greeting_via_vip(&lab, port, &names).unwrap_or_else(|g| panic!("{check}: unexpected greeting {g:?}"));
            assert_ne!(from, names[0], "{check}: a session reached the stopped server");
        }
        drop(node);
        dovecots.clear();
    }
}

/// A throwaway CA and a server certificate for `mail.example.net` signed by it, in `dir`.
fn make_pki(dir: &std::path::Path, ca_name: &str) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let ext = dir.join("ext.cnf");
    std::fs::write(&ext, "subjectAltName=DNS:mail.example.net\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n").unwrap();
    for args in [
        vec!["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &p("ca.key"), "-out", &p("ca.pem"), "-days", "2", "-subj", &format!("/CN={ca_name}")],
        vec!["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &p("leaf.key"), "-out", &p("leaf.csr"), "-subj", "/CN=mail.example.net"],
        vec!["x509", "-req", "-in", &p("leaf.csr"), "-CA", &p("ca.pem"), "-CAkey", &p("ca.key"), "-CAcreateserial", "-out", &p("leaf.pem"), "-days", "2", "-extfile", ext.to_str().unwrap()],
    ] {
        let out = std::process::Command::new("openssl").args(&args).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Dovecot's unprivileged processes read the key through its master, but keep it readable.
    (dir.join("ca.pem"), dir.join("leaf.pem"), dir.join("leaf.key"))
}

#[test]
fn implicit_tls_probes_verify_against_the_configured_ca() {
    if !lab::require_root("implicit_tls_probes_verify_against_the_configured_ca") {
        return;
    }
    let lab = Lab::builder().backends(3).no_sinks().build().expect("lab");
    let pki = std::env::temp_dir().join(format!("{}-pki", lab.prefix()));
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(pki.clone());
    let (ca, cert, key) = make_pki(&pki.join("good"), "mxlb test CA");
    let (other_ca, _, _) = make_pki(&pki.join("other"), "some other CA");
    let mut dovecots: Vec<lab::dovecot::Dovecot> = lab
        .backends()
        .iter()
        .map(|b| {
            lab::dovecot::Dovecot::start_with_tls(b.ns(), &b.name(), &[("alice@example.com", "secret")], b.v4().into(), Some((&cert, &key)))
                .expect("dovecot with TLS")
        })
        .collect();
    let base = "interval_ms = 100\ntimeout_ms = 1000\nrise = 2\nfall = 2\ntls_server_name = \"mail.example.net\"";
    let with = |ca: Option<&std::path::Path>| match ca {
        Some(ca) => format!("{base}\ntls_ca = \"{}\"", ca.display()),
        None => base.to_string(),
    };

    // IMAPS (993, imaps by port) with the right CA: all up; a stopped server goes down.
    {
        let opts = NodeOpts { ports: vec![993], health: Some(with(Some(&ca))), ..Default::default() };
        let node = MxlbNode::start(&lab, opts).expect("mxlb starts");
        std::thread::sleep(Duration::from_millis(800));
        assert!(!node.log().contains("back-end down"), "a valid certificate failed:\n{}", node.log());
        for b in ["b1", "b2", "b3"] {
            assert_eq!(state(&node, b), "up");
        }
        dovecots[0].stop();
        wait_state(&node, "b1", "down", Duration::from_secs(10)).unwrap_or_else(|| panic!("never down:\n{}", node.log()));
    }
    // POP3S (995) against a CA that did not sign the servers' certificates: down, with why.
    {
        let opts = NodeOpts { ports: vec![995], health: Some(with(Some(&other_ca))), ..Default::default() };
        let node = MxlbNode::start(&lab, opts).expect("mxlb starts");
        wait_state(&node, "b2", "down", Duration::from_secs(10)).unwrap_or_else(|| panic!("bad certificate accepted:\n{}", node.log()));
        assert!(node.log().contains("TLS handshake") && node.log().contains("certificate"), "{}", node.log());
    }
    // Without a CA the certificate is not checked: up.
    {
        let opts = NodeOpts { ports: vec![995], health: Some(with(None)), ..Default::default() };
        let node = MxlbNode::start(&lab, opts).expect("mxlb starts");
        std::thread::sleep(Duration::from_millis(800));
        assert_eq!(state(&node, "b2"), "up", "{}", node.log());
        assert_eq!(state(&node, "b3"), "up", "{}", node.log());
    }
}

/// The first line a new connection from the client to the VIP receives (bounded).
fn first_line_via_vip(lab: &Lab) -> String {
    first_line_from(lab, lab.client().v4().into())
}

#[test]
fn full_or_dead_cluster_answers_421_and_established_sessions_finish() {
    if !lab::require_root("full_or_dead_cluster_answers_421_and_established_sessions_finish") {
        return;
    }
    let lab = Lab::builder().backends(3).build().expect("lab");
    let opts = NodeOpts {
        mode: Mode::DsrL2,
        health: Some("interval_ms = 100\ntimeout_ms = 300\nrise = 2\nfall = 2".into()),
        ..Default::default()
    };
    let node = MxlbNode::start(&lab, opts).expect("mxlb starts");
    // The VIP is local on the LB node (VRRP puts it on the master's interface).
    lab.lb().ns().ip(&["addr", "add", "198.18.0.100/32", "dev", "lo"]).unwrap();
    assert!(first_line_via_vip(&lab).starts_with("220 "), "served by a back-end first");

    // Sessions established before the cluster fills up.
    let held: Vec<_> = (0..6).map(|_| held_session(&lab)).collect();
    for b in ["b1", "b2", "b3"] {
        node.cli(&["backend", "drain", b]).unwrap();
    }
    // Full: new sessions get SMTP's "try again later" from the LB, not a timeout or a reset.
    for _ in 0..10 {
        let line = first_line_via_vip(&lab);
        assert!(line.starts_with("421 4.3.2 "), "got {line:?}");
    }
    // The established sessions finish on their back-ends.
    for s in held {
        finish_held(s);
    }
    let stats: serde_json::Value = serde_json::from_str(&node.cli(&["stats", "--json", "--interval", "0.1"]).unwrap()).unwrap();
    let shed = stats["reasons"].as_array().unwrap().iter().find(|r| r["name"] == "pass_shed").map(|r| r["total"]["packets"].as_u64().unwrap());
    assert!(shed.unwrap_or(0) >= 10, "{stats}");

    // Dead: every mail server stops; once marked down the same answer comes.
    for b in ["b1", "b2", "b3"] {
        node.cli(&["backend", "undrain", b]).unwrap();
    }
    assert!(first_line_via_vip(&lab).starts_with("220 "));
    for i in 1..=3 {
        for pid in lab.sink(i).pids() {
            // SAFETY: kill(2) on a process the lab started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
    for b in ["b1", "b2", "b3"] {
        wait_state(&node, b, "down", Duration::from_secs(10)).unwrap_or_else(|| panic!("{b} never down:\n{}", node.log()));
    }
    let line = first_line_via_vip(&lab);
    assert!(line.starts_with("421 4.3.2 "), "got {line:?}");
}

#[test]
fn shed_pop3_and_imap_sessions_get_their_protocols_tempfail() {
    if !lab::require_root("shed_pop3_and_imap_sessions_get_their_protocols_tempfail") {
        return;
    }
    let lab = Lab::builder().backends(2).build().expect("lab");
    // One VIP with SMTP (probed), POP3 and IMAP ports; every back-end drained: all shed.
    let opts = NodeOpts { mode: Mode::DsrL2, ports: vec![25, 110, 143], ..Default::default() };
    let node = MxlbNode::start(&lab, opts).expect("mxlb starts");
    lab.lb().ns().ip(&["addr", "add", "198.18.0.100/32", "dev", "lo"]).unwrap();
    for b in ["b1", "b2"] {
        node.cli(&["backend", "drain", b]).unwrap();
    }
    for (port, want) in [(110u16, "-ERR [SYS/TEMP] "), (143, "* BYE [UNAVAILABLE] "), (25, "421 4.3.2 ")] {
        let vip = lab.vip_addr(AddrFamily::V4, port);
        let line = lab
            .client()
            .ns()
            .run(move || {
                use std::io::BufRead as _;
                let s = std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(3)).map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
                let mut line = String::new();
                std::io::BufReader::new(s).read_line(&mut line).map_err(|e| e.to_string())?;
                Ok::<_, String>(line)
            })
            .unwrap()
            .unwrap_or_else(|e| e);
        assert!(line.starts_with(want) && line.ends_with("\r\n"), "port {port}: {line:?}");
    }
}

type Held = (std::io::BufReader<std::net::TcpStream>, std::net::TcpStream);

fn held_session(lab: &Lab) -> Held {
    use std::io::BufRead as _;
    let vip = lab.vip_addr(AddrFamily::V4, 25);
    let s = lab.client().ns().run(move || std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(3))).unwrap().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let w = s.try_clone().unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("220 "), "{line}");
    (r, w)
}

fn finish_held((mut r, mut w): Held) {
    use std::io::{BufRead as _, Write as _};
    for (cmd, want) in [
        ("EHLO client.example.com", "250 "),
        ("MAIL FROM:<a@example.com>", "250"),
        ("RCPT TO:<b@example.net>", "250"),
        ("DATA", "354"),
        ("Subject: held\r\n\r\nbody\r\n.", "250"),
        ("QUIT", "221"),
    ] {
        w.write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).expect("reply");
            assert!(!line.is_empty(), "closed after {cmd}");
            if line.len() >= 4 && line.as_bytes()[3] == b' ' {
                assert!(line.starts_with(&want[..3]), "{cmd}: {line}");
                break;
            }
        }
    }
}

/// The first line a connection from source `src` (an address of the client) to the VIP:25
/// receives, or what went wrong (bounded).
fn first_line_from(lab: &Lab, src: std::net::IpAddr) -> String {
    use std::io::BufRead as _;
    let vip = lab.vip_addr(AddrFamily::V4, 25);
    lab.client()
        .ns()
        .run(move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).map_err(|e| e.to_string())?;
            s.bind(&std::net::SocketAddr::new(src, 0).into()).map_err(|e| e.to_string())?;
            s.connect_timeout(&vip.into(), Duration::from_secs(3)).map_err(|e| format!("connect: {e}"))?;
            let s: std::net::TcpStream = s.into();
            s.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
            let mut line = String::new();
            std::io::BufReader::new(s).read_line(&mut line).map_err(|e| format!("read: {e}"))?;
            Ok::<_, String>(line)
        })
        .unwrap()
        .unwrap_or_else(|e| e)
}

#[test]
fn premium_client_group_keeps_service_longest() {
    if !lab::require_root("premium_client_group_keeps_service_longest") {
        return;
    }
    let lab = Lab::builder().backends(3).build().expect("lab");
    let groups = "[[client_group]]\nname = \"standard\"\ncidrs = [\"0.0.0.0/0\", \"::/0\"]\nmin_capacity = 50\n\n\
                  [[client_group]]\nname = \"premium\"\ncidrs = [\"198.18.0.4/32\"]\nmin_capacity = 0\n";
    let opts = NodeOpts { mode: Mode::DsrL2, extra: Some(groups.into()), ..Default::default() };
    let node = MxlbNode::start(&lab, opts).expect("mxlb starts");
    lab.lb().ns().ip(&["addr", "add", "198.18.0.100/32", "dev", "lo"]).unwrap();
    lab.client().ns().ip(&["addr", "add", "198.18.0.4/24", "dev", lab.client().dev()]).unwrap();
    let (standard, premium): (std::net::IpAddr, std::net::IpAddr) = (lab.client().v4().into(), "198.18.0.4".parse().unwrap());
    assert!(first_line_from(&lab, standard).starts_with("220 "));

    // Two of three equal back-ends drained: 33% capacity, below the standard group's 50%.
    node.cli(&["backend", "drain", "b2"]).unwrap();
    node.cli(&["backend", "drain", "b3"]).unwrap();
    for _ in 0..10 {
        let line = first_line_from(&lab, standard);
        assert!(line.starts_with("421 4.3.2 "), "standard client: {line:?}");
        let line = first_line_from(&lab, premium);
        assert!(line.starts_with("220 ") && line.contains(&lab.backend(1).name()), "premium client: {line:?}");
    }
    // Back to 66%: the standard group is served again.
    node.cli(&["backend", "undrain", "b2"]).unwrap();
    for _ in 0..10 {
        assert!(first_line_from(&lab, standard).starts_with("220 "));
    }
}

#[test]
fn dsr_backends_are_probed_on_the_path_real_traffic_takes() {
    if !lab::require_root("dsr_backends_are_probed_on_the_path_real_traffic_takes") {
        return;
    }
    for mode in [Mode::DsrL2, Mode::DsrIpip] {
        let lab = Lab::builder().backends(3).build().expect("lab");
        let opts = NodeOpts { mode, health: Some("interval_ms = 100\ntimeout_ms = 300\nrise = 2\nfall = 2".into()), ..Default::default() };
        let node = MxlbNode::start(&lab, opts).expect("mxlb starts");
        std::thread::sleep(Duration::from_millis(600));
        assert!(!node.log().contains("back-end down"), "{mode:?}: healthy back-ends failed a probe:\n{}", node.log());
        // Back-end 1 still answers SMTP on its own address, but traffic for the VIP no longer
        // reaches its mail server: the VIP is gone from its loopback (dsr-l2), or the
        // decapsulation is (dsr-ipip).
        let b1 = lab.backend(1);
        match mode {
            Mode::DsrL2 => {
                b1.ns().ip(&["addr", "del", "198.18.0.100/32", "dev", "lo"]).unwrap();
            }
            Mode::DsrIpip => {
                let out = std::process::Command::new(lab::node::mxlb_bin().unwrap())
                    .args(["--netns", b1.ns().name(), "decap", "detach", b1.dev()])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{out:?}");
            }
        }
        wait_state(&node, "b1", "down", Duration::from_secs(10)).unwrap_or_else(|| panic!("{mode:?}: never marked down:\n{}", node.log()));
        assert!(node.log().contains("vip-path 198.18.0.100:25"), "{mode:?}: reason names the VIP path:\n{}", node.log());
        assert_eq!(state(&node, "b2"), "up", "{mode:?}");
        let outcomes = run_sessions(lab.client().ns(), lab.vip_addr(AddrFamily::V4, 25), &SessionOpts { sessions: 200, ..Default::default() }, &Progress::default()).unwrap();
        assert!(outcomes.iter().all(|o| o.error.is_none()), "{mode:?}: {:?}", outcomes.iter().find(|o| o.error.is_some()));
        assert!(outcomes.iter().all(|o| o.backend.as_deref() != Some(b1.name().as_str())), "{mode:?}");
    }
}
