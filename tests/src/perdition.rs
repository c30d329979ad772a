//! perdition (Debian's package, 2.2) as the comparison POP3/IMAP proxy: user → back-end from a
//! popmap of POSIX regular expressions (`libperditiondb_posix_regex`), plain text on both
//! sides, run in a lab namespace in the foreground: one process for POP3 (`-P POP3`) and one for
//! IMAP (`-P IMAP4`), each forking a child per connection, as perdition does.
//!
//! Everything it reads is written under a temp dir and passed on the command line (`-f` an
//! empty config file, so `/etc/perdition/*.conf` is never read; `-m` the popmap; `--pid_file`),
//! so nothing in /etc changes. Its log goes to stderr (`-F +`), errors only (`-q`). Stopped
//! (SIGTERM then SIGKILL to each process group, which holds the per-connection children too)
//! and its dir removed on drop.
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{Daemon, Netns};

pub const PERDITION: &str = "/usr/sbin/perdition";
/// The popmap library for regular-expression maps (Debian's multiarch path).
pub const POSIX_REGEX_LIB: &str = "/usr/lib/x86_64-linux-gnu/libperditiondb_posix_regex.so.0";

/// Fails with what to do unless perdition and its regex map library are installed.
pub fn require_perdition() -> Result<()> {
    for p in [PERDITION, POSIX_REGEX_LIB] {
        if !Path::new(p).exists() {
            bail!("{p} is missing: perdition is not installed; run `cargo xtask setup` (it installs the Debian package perdition)");
        }
    }
    Ok(())
}

/// A popmap for `libperditiondb_posix_regex`: one `^USER$: IP:PORT` line per user, first match
/// wins. Regex metacharacters in a user name are put in brackets (`[.]`): the map file's own
/// parser eats backslashes. IPv4 back-ends only: `IP:PORT` has no bracket form for IPv6.
pub fn popmap_text(routes: &[(&str, SocketAddr)]) -> Result<String> {
    let mut s = String::from("# written by the mxlb lab\n");
    for (user, to) in routes {
        if to.is_ipv6() {
            bail!("perdition's popmap takes IPv4 back-ends here, not {to}");
        }
        if user.is_empty() || !user.chars().all(|c| c.is_ascii_alphanumeric() || "._+-@".contains(c)) {
            bail!("user {user:?}: only letters, digits and . _ + - @ fit in a popmap line");
        }
        let re: String = user.chars().map(|c| if ".+".contains(c) { format!("[{c}]") } else { c.to_string() }).collect();
        s += &format!("^{re}$: {}:{}\n", to.ip(), to.port());
    }
    Ok(s)
}

/// The running POP3 and IMAP perdition processes.
pub struct Perdition {
    daemons: Vec<Daemon>,
    dir: PathBuf,
    /// Where it answers POP3 and IMAP.
    pub pop3: SocketAddr,
    pub imap: SocketAddr,
}

impl Perdition {
    /// Starts perdition in `ns` listening on `listen` ports 110 (POP3) and 143 (IMAP), routing
    /// each user of `pop3_map`/`imap_map` to its back-end; waits (≤ 10 s) until both accept.
    pub fn start(
        ns: &Netns,
        listen: IpAddr,
        pop3_map: &[(&str, SocketAddr)],
        imap_map: &[(&str, SocketAddr)],
    ) -> Result<Perdition> {
        require_perdition()?;
        let dir = std::env::temp_dir().join(format!("{}-perdition", ns.name()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut p = Perdition {
            daemons: Vec::new(),
            dir: dir.clone(),
            pop3: SocketAddr::new(listen, 110),
            imap: SocketAddr::new(listen, 143),
        };
        let conf = dir.join("perdition.conf");
        std::fs::write(&conf, "# empty: every option is on the command line\n")?;
        for (proto, addr, map) in [("POP3", p.pop3, pop3_map), ("IMAP4", p.imap, imap_map)] {
            let popmap = dir.join(format!("popmap.{}.re", proto.to_lowercase()));
            std::fs::write(&popmap, popmap_text(map)?)?;
            let pid = dir.join(format!("perdition.{}.pid", proto.to_lowercase()));
            let args: Vec<String> = vec![
                PERDITION.into(),
                "--no_daemon".into(),
                "-f".into(),
                path(&conf)?,
                "-P".into(),
                proto.into(),
                "-b".into(),
                addr.ip().to_string(),
                "-l".into(),
                addr.port().to_string(),
                "-M".into(),
                POSIX_REGEX_LIB.into(),
                "-m".into(),
                path(&popmap)?,
                // The popmap holds addresses: no DNS.
                "-n".into(),
                "--ssl_mode".into(),
                "none".into(),
                "--pid_file".into(),
                path(&pid)?,
                "-u".into(),
                "nobody".into(),
                "-g".into(),
                "nogroup".into(),
                "-F".into(),
                "+".into(),
                "-q".into(),
                "--connect_relog".into(),
                "0".into(),
            ];
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            p.daemons.push(ns.spawn(&format!("perdition {proto}"), &args)?);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (i, addr) in [p.pop3, p.imap].into_iter().enumerate() {
            loop {
                let up = ns.run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())?;
                if up {
                    break;
                }
                if let Some(st) = p.daemons[i].exited() {
                    bail!("perdition on {addr} exited ({st}): {}", p.log());
                }
                if Instant::now() > deadline {
                    bail!("perdition does not listen on {addr}: {}", p.log());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(p)
    }

    /// Both processes' output so far (errors only).
    pub fn log(&self) -> String {
        self.daemons.iter().map(|d| format!("[{}]\n{}", d.label(), d.log())).collect::<Vec<_>>().join("\n")
    }

    /// The listening processes (their per-connection children are in their process groups).
    pub fn pids(&self) -> Vec<u32> {
        self.daemons.iter().map(Daemon::pid).collect()
    }
}

fn path(p: &Path) -> Result<String> {
    p.to_str().map(str::to_string).with_context(|| format!("{} is not UTF-8", p.display()))
}

impl Drop for Perdition {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            d.stop(Duration::from_secs(3));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn popmap_lines_anchor_each_user_and_name_its_backend() {
        let b1: SocketAddr = "198.18.0.11:110".parse().unwrap();
        let b2: SocketAddr = "198.18.0.12:143".parse().unwrap();
        let t = popmap_text(&[("alice", b1), ("bob.smith+x", b2)]).unwrap();
        assert_eq!(t, "# written by the mxlb lab\n^alice$: 198.18.0.11:110\n^bob[.]smith[+]x$: 198.18.0.12:143\n");
        assert!(popmap_text(&[("a b", b1)]).is_err());
        assert!(popmap_text(&[("a", "[2001:db8::11]:110".parse().unwrap())]).is_err());
    }
}
