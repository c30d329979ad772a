//! Interop: a real HAProxy (Debian package) reads `mxlb agent` with `agent-check` and applies
//! what it says. The agent runs on back-end 1 with a spool directory the test fills: a growing
//! mail queue lowers the weight HAProxy uses, a full queue drains the server (weight 0), and an
//! emptied queue brings it back. Needs root (namespaces); skips locally otherwise, fails under
//! CI=true.
use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lab::{Daemon, Lab};

/// (status, weight) of server mail/b1 from `show stat` on HAProxy's stats socket, e.g.
/// ("UP", 75) or ("DRAIN (agent)", 100): HAProxy keeps the weight and marks the drain in the
/// status.
fn server_stat(socket: &Path) -> Option<(String, u32)> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"show stat\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (status, weight) = (col("status")?, col("weight")?);
    let row: Vec<&str> = lines.map(|l| l.split(',').collect::<Vec<_>>()).find(|f| f.len() > 1 && f[0] == "mail" && f[1] == "b1")?;
    Some((row.get(status)?.to_string(), row.get(weight)?.parse().ok()?))
}

fn wait_stat(socket: &Path, what: &str, ok: impl Fn(&str, u32) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = None;
    while Instant::now() < deadline {
        last = server_stat(socket);
        if let Some((status, weight)) = &last {
            if ok(status, *weight) {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: HAProxy shows b1 as {last:?}");
}

fn fill(dir: &Path, n: usize) {
    for i in 0..n {
        std::fs::write(dir.join(format!("Q{i:05}")), b"queued message").unwrap();
    }
}

#[test]
fn haproxy_applies_the_agents_weight_drain_and_recovery() {
    if !lab::require_root("haproxy_applies_the_agents_weight_drain_and_recovery") {
        return;
    }
    let lab = Lab::builder().backends(1).build().expect("lab");
    let work = std::env::temp_dir().join(format!("{}-haproxy", lab.prefix()));
    let spool = work.join("spool");
    let active = spool.join("active");
    std::fs::create_dir_all(&active).unwrap();
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(work.clone());

    let bin = lab::node::mxlb_bin().unwrap();
    let b1 = lab.backend(1);
    let agent_addr = format!("{}:5555", b1.v4());
    let mut cmd = std::process::Command::new(&bin);
    cmd.args(["--netns", b1.ns().name(), "agent", "--listen", &agent_addr, "--max-queue", "100", "--max-load", "1000000"])
        .arg("--spool")
        .arg(&spool);
    let _agent = Daemon::spawn("mxlb agent", cmd, None).unwrap();

    let socket = work.join("haproxy.sock");
    let cfg = work.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  stats socket {} level admin\n\ndefaults\n  mode tcp\n  timeout connect 1s\n  timeout client 5s\n  timeout server 5s\n\n\
             backend mail\n  server b1 {}:25 weight 100 agent-check agent-port 5555 agent-inter 200ms\n",
            socket.display(),
            b1.v4()
        ),
    )
    .unwrap();
    let mut haproxy = lab.client().ns().spawn("haproxy", &["haproxy", "-db", "-f", cfg.to_str().unwrap()]).unwrap();

    let drained = |status: &str| status.starts_with("DRAIN");
    // Empty queue: full weight.
    wait_stat(&socket, "empty queue", |st, w| !drained(st) && w == 100);
    // 25 of 100: 75% of the configured weight.
    fill(&active, 25);
    wait_stat(&socket, "queue 25 of 100", |st, w| !drained(st) && w == 75);
    // At the limit the agent asks for a drain: no new sessions, established ones finish.
    fill(&active, 100);
    wait_stat(&socket, "queue at the limit", |st, _| drained(st));
    // The queue empties: the agent's `ready` lifts the drain and the weight is full again.
    for e in std::fs::read_dir(&active).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    wait_stat(&socket, "queue emptied", |st, w| !drained(st) && w == 100);
    assert!(haproxy.exited().is_none(), "haproxy exited:\n{}", haproxy.log());
}
