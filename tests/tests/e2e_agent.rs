//! The agent's lifecycle and the operator's CLI, end to end in the lab:
//! - established SMTP sessions keep their back-end across a weight change, an agent crash
//!   (the pinned program keeps forwarding) and a restart (pinned conntrack reused);
//! - the CLI works with no agent running, and its changes survive the agent's restart;
//! - SIGTERM detaches cleanly; bad CLI input and broken config files get clear errors and
//!   change nothing.
//! Needs root; skips locally otherwise, fails under CI=true.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use lab::{
    AddrFamily, Lab, SourceOpts,
    node::{Mode, MxlbNode, NodeOpts},
};

/// A hand-driven SMTP session held open across agent events.
struct Session {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The back-end's name from its 220 greeting.
    backend: String,
}

impl Session {
    fn open(lab: &Lab, vip: SocketAddr) -> Session {
        let stream = lab
            .client()
            .ns()
            .run(move || TcpStream::connect_timeout(&vip, Duration::from_secs(5)))
            .expect("netns")
            .expect("connect to the VIP");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let writer = stream.try_clone().unwrap();
        let mut s = Session { reader: BufReader::new(stream), writer, backend: String::new() };
        let greeting = s.reply();
        assert!(greeting.starts_with("220 "), "greeting: {greeting}");
        s.backend = greeting[4..].split_whitespace().next().unwrap_or_default().to_string();
        s
    }

    /// Reads one (possibly multi-line) reply; returns its last line.
    fn reply(&mut self) -> String {
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("reply from the back-end");
            assert!(n > 0, "connection closed by {}", self.backend);
            if line.len() >= 4 && line.as_bytes()[3] == b' ' {
                return line.trim_end().to_string();
            }
        }
    }

    fn command(&mut self, cmd: &str, expect: &str) -> String {
        self.writer.write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
        let r = self.reply();
        assert!(r.starts_with(expect), "{cmd} to {} answered {r}", self.backend);
        r
    }

    fn finish(mut self) {
        self.command("MAIL FROM:<held@example.com>", "250");
        self.command("RCPT TO:<rcpt@example.net>", "250");
        self.command("DATA", "354");
        self.command("Subject: held across agent events\r\n\r\nbody\r\n.", "250");
        self.command("QUIT", "221");
    }
}

fn weights(node: &MxlbNode) -> Vec<(String, u64, String)> {
    let json = node.backends_json().expect("backend list --json");
    json.as_array()
        .unwrap()
        .iter()
        .map(|b| (b["name"].as_str().unwrap().to_string(), b["weight"].as_u64().unwrap(), b["state"].as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn sessions_survive_weight_change_crash_and_restart_and_cli_works_without_agent() {
    if !lab::require_root("sessions_survive_weight_change_crash_and_restart_and_cli_works_without_agent") {
        return;
    }
    let lab = Lab::builder().backends(3).build().expect("lab");
    let mut node = MxlbNode::start(&lab, NodeOpts { mode: Mode::DsrL2, ..Default::default() }).expect("mxlb starts");
    let vip = lab.vip_addr(AddrFamily::V4, 25);

    // Held sessions, spread over the back-ends.
    let mut sessions: Vec<Session> = (0..12).map(|_| Session::open(&lab, vip)).collect();
    let names: std::collections::BTreeSet<String> = sessions.iter().map(|s| s.backend.clone()).collect();
    assert!(names.len() >= 2, "12 sessions should reach several back-ends: {names:?}");
    let b3_host = lab.backend(3).name();

    // Only back-end 3 may take new sessions now; held sessions keep theirs (conntrack).
    node.cli(&["backend", "weight", "b1", "0"]).unwrap();
    node.cli(&["backend", "weight", "b2", "0"]).unwrap();
    for s in &mut sessions {
        let r = s.command("EHLO client.example.com", "250");
        assert!(!r.is_empty());
    }
    let fresh = Session::open(&lab, vip);
    assert_eq!(fresh.backend, b3_host, "new sessions go to the only back-end with weight");
    fresh.finish();

    // Crash: the pinned program keeps forwarding with no agent.
    node.kill();
    std::thread::sleep(Duration::from_millis(200));
    assert!(node.xdp_attached().unwrap(), "program stays attached after an agent crash");
    for s in &mut sessions {
        s.command("NOOP", "250");
    }

    // The CLI without an agent writes the maps directly: back-end 1 takes sessions again.
    let out = node.cli(&["backend", "weight", "b1", "100"]).unwrap();
    assert!(out.contains("no agent running"), "{out}");
    let before = lab.sink(1).counts_by_family(AddrFamily::V4);
    let r = lab
        .smtp_source(vip, &SourceOpts { sessions: 300, concurrency: 10, ..Default::default() })
        .unwrap();
    assert!(r.ok(), "{r:#?}");
    let after = lab.sink(1).wait_sessions(before.sessions + 1, Duration::from_secs(10)).unwrap();
    assert!(after.sessions > before.sessions + 50, "back-end 1 gets sessions again: {before:?} -> {after:?}");

    // `mxlb stats` reads the data path's counters (no agent needed): the sessions just sent
    // show up per back-end and as forwarded decisions.
    let stats: serde_json::Value = serde_json::from_str(&node.cli(&["stats", "--json", "--interval", "0.2"]).unwrap()).unwrap();
    let total = |list: &str, name: &str, field: &str| -> u64 {
        stats[list].as_array().unwrap().iter().find(|r| r["name"] == name).map(|r| r["total"][field].as_u64().unwrap()).unwrap_or(0)
    };
    assert!(total("backends", "b1", "new_flows") >= 50, "{stats}");
    assert!(total("backends", "b3", "packets") > 0, "{stats}");
    assert!(total("vips", "mx:25", "packets") > total("backends", "b1", "packets"), "{stats}");
    assert!(total("reasons", "forwarded", "packets") >= total("vips", "mx:25", "packets") / 2, "{stats}");

    // Restart: the program is replaced on the pinned link, conntrack is reused, and the CLI
    // changes are still in force.
    node.launch().expect("restart");
    let w = weights(&node);
    assert!(w.contains(&("b1".into(), 100, "up".into())), "{w:?}");
    assert!(w.contains(&("b2".into(), 0, "up".into())), "{w:?}");
    let before: u64 = (1..=3).map(|i| lab.sink(i).counts_by_family(AddrFamily::V4).messages).sum();
    let held = sessions.len() as u64;
    for s in sessions {
        s.finish();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now: u64 = (1..=3).map(|i| lab.sink(i).counts_by_family(AddrFamily::V4).messages).sum();
        if now >= before + held {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "held sessions' messages did not all arrive ({now} < {})", before + held);
        std::thread::sleep(Duration::from_millis(20));
    }

    // SIGTERM: detached, maps stay pinned for the next start.
    node.stop().unwrap();
    assert!(!node.xdp_attached().unwrap(), "SIGTERM detaches the program");
    assert!(node.bpffs_dir.join(lb_common::MAP_CONNTRACK).exists(), "maps stay pinned");

    // Bad input: clear errors, nothing changed.
    let state = std::fs::read(node.dir().join("state/changes.json")).unwrap();
    for (args, expect) in [
        (vec!["backend", "weight", "nope", "5"], "no back-end is named `nope`"),
        (vec!["backend", "weight", "b1", "5000"], "out of range"),
        (vec!["backend", "drain", "nope"], "no back-end is named `nope`"),
        (vec!["vip", "remove", "nope"], "no VIP is named `nope`"),
        (vec!["vip", "add", "x", "198.18.0.100", "--port", "25", "--mode", "dsr-l2", "--backend", "b1"], "already served"),
        (vec!["backend", "add", "b9", "198.18.0.300"], "invalid"),
        (vec!["backend", "add", "b9", "198.18.0.19", "--vip", "nope"], "no VIP is named `nope`"),
    ] {
        let (ok, stdout, stderr) = node.cli_output(&args).unwrap();
        assert!(!ok, "{args:?} should fail: {stdout}");
        assert!(stderr.contains(expect), "{args:?}: expected `{expect}` in: {stderr}");
    }
    assert_eq!(std::fs::read(node.dir().join("state/changes.json")).unwrap(), state, "refused changes wrote nothing");
}

#[test]
fn check_config_names_file_line_and_key() {
    let bin = lab::node::mxlb_bin().unwrap();
    let dir = std::env::temp_dir().join(format!("mxlb-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("broken.toml");
    std::fs::write(
        &file,
        "[node]\ninterfaces = [\"eth0\"]\n\n[[vip]]\nname = \"mx\"\naddress = \"198.18.0.100\"\nports = [25, 25]\nmode = \"dsr-l2\"\nbackends = [\"ghost\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(&bin).arg("check-config").arg(&file).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    let f = file.display().to_string();
    assert!(stdout.contains(&format!("{f}:7: vip[0].ports[1]: port 25 is listed twice")), "{stdout}");
    assert!(stdout.contains(&format!("{f}:9: vip[0].backends[0]: no [[backend]] is named `ghost`")), "{stdout}");
    let good = std::process::Command::new(&bin)
        .arg("check-config")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../mxlb.example.toml"))
        .output()
        .unwrap();
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stdout));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn native_attach_falls_back_to_generic_with_a_warning() {
    if !lab::require_root("native_attach_falls_back_to_generic_with_a_warning") {
        return;
    }
    // Loopback has no native XDP: `auto` must fall back to generic (skb) mode and say so.
    let lab = Lab::builder().backends(1).no_sinks().build().expect("lab");
    let bin = lab::node::mxlb_bin().unwrap();
    let ns = lab.client().ns().name().to_string();
    let out = std::process::Command::new(&bin).args(["--netns", &ns, "pass", "attach", "lo"]).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("Generic"), "{stdout}");
    assert!(stderr.contains("falling back to generic"), "{stderr}");
    let link = lab.client().ns().ip(&["-d", "link", "show", "dev", "lo"]).unwrap();
    assert!(link.contains("xdpgeneric"), "{link}");
    let out = std::process::Command::new(&bin).args(["--netns", &ns, "pass", "detach", "lo"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("detached"), "{out:?}");
    // `native` refuses rather than fall back.
    let out = std::process::Command::new(&bin).args(["--netns", &ns, "pass", "attach", "lo", "--mode", "native"]).output().unwrap();
    assert!(!out.status.success(), "native attach on lo must fail: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("attaching to lo"), "{out:?}");
    let link = lab.client().ns().ip(&["-d", "link", "show", "dev", "lo"]).unwrap();
    assert!(!link.contains("xdp"), "nothing left attached: {link}");
    let netns = std::fs::metadata(format!("/run/netns/{ns}")).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir("/sys/fs/bpf/mxlb-helpers")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(&format!("{netns}-"))).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "nothing left pinned: {leftovers:?}");
}
