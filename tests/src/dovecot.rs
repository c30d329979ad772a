//! Dovecot (Debian's dovecot-imapd/-pop3d/-lmtpd) as a real POP3/IMAP/LMTP back-end in a lab
//! namespace: its own config, runtime and mail directories under a temp dir, passwd-file users,
//! greeting with the back-end's name so a client can tell which back-end answered. Stopped and
//! removed on drop.
use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{Daemon, Netns};

/// The extra POP3 and IMAP listeners expecting a PROXY v2 header ([`DovecotOpts`]).
pub const HAPROXY_POP3_PORT: u16 = 10110;
pub const HAPROXY_IMAP_PORT: u16 = 10143;

/// Settings beyond the defaults of [`Dovecot::start`].
#[derive(Debug, Clone, Default)]
pub struct DovecotOpts {
    /// `haproxy_trusted_networks`; also adds listeners with `haproxy = yes` on
    /// [`HAPROXY_POP3_PORT`] and [`HAPROXY_IMAP_PORT`].
    pub haproxy_trusted_networks: Option<String>,
    /// `login_trusted_networks` (who may pass a client address with IMAP ID).
    pub login_trusted_networks: Option<String>,
    /// `auth_failure_delay` in seconds (Dovecot 2.3 takes whole seconds here).
    pub auth_failure_delay_s: Option<u32>,
}

/// A running Dovecot.
pub struct Dovecot {
    daemon: Option<Daemon>,
    dir: PathBuf,
    /// Its name, as it appears in its greetings (`+OK NAME ready.`, `* OK ... NAME ready.`).
    pub name: String,
}

impl Dovecot {
    /// Starts Dovecot in `ns` with POP3 on 110, IMAP on 143 and LMTP on 24 (IPv4 and IPv6), and
    /// `users` (name, password); waits (≤ 10 s) until IMAP and POP3 answer on `probe_addr`'s IP.
    pub fn start(ns: &Netns, name: &str, users: &[(&str, &str)], probe_ip: std::net::IpAddr) -> Result<Dovecot> {
        Self::start_with_tls(ns, name, users, probe_ip, None)
    }

    /// Like [`Dovecot::start`], also with implicit TLS (IMAPS on 993, POP3S on 995) using the
    /// PEM certificate and key `tls`.
    pub fn start_with_tls(
        ns: &Netns,
        name: &str,
        users: &[(&str, &str)],
        probe_ip: std::net::IpAddr,
        tls: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<Dovecot> {
        Self::start_with(ns, name, users, probe_ip, tls, &DovecotOpts::default())
    }

    /// Like [`Dovecot::start_with_tls`], with the extra settings of `opts`.
    pub fn start_with(
        ns: &Netns,
        name: &str,
        users: &[(&str, &str)],
        probe_ip: std::net::IpAddr,
        tls: Option<(&std::path::Path, &std::path::Path)>,
        opts: &DovecotOpts,
    ) -> Result<Dovecot> {
        let dir = std::env::temp_dir().join(format!("{}-dovecot-{name}", ns.name()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["run", "state", "mail"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        // Dovecot drops privileges to nobody for mail and logins.
        let chown = |p: &PathBuf| std::process::Command::new("chown").args(["-R", "nobody:nogroup"]).arg(p).status();
        chown(&dir.join("mail")).context("chown mail dir")?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let users_file = dir.join("users");
        let lines: String = users
            .iter()
            .map(|(u, p)| format!("{u}:{{PLAIN}}{p}:65534:65534::{}::\n", dir.join("mail").join(u).display()))
            .collect();
        std::fs::write(&users_file, lines)?;
        let d = dir.display();
        let (ssl, imaps, pop3s) = match tls {
            None => ("ssl = no".to_string(), String::new(), String::new()),
            Some((cert, key)) => (
                format!("ssl = yes\nssl_cert = <{}\nssl_key = <{}", cert.display(), key.display()),
                "  inet_listener imaps {\n    port = 993\n    ssl = yes\n  }\n".to_string(),
                "  inet_listener pop3s {\n    port = 995\n    ssl = yes\n  }\n".to_string(),
            ),
        };
        let (mut imaps, mut pop3s) = (imaps, pop3s);
        let mut globals = String::new();
        if let Some(trusted) = &opts.haproxy_trusted_networks {
            globals += &format!("haproxy_trusted_networks = {trusted}\n");
            imaps += &format!("  inet_listener imap_haproxy {{\n    port = {HAPROXY_IMAP_PORT}\n    haproxy = yes\n  }}\n");
            pop3s += &format!("  inet_listener pop3_haproxy {{\n    port = {HAPROXY_POP3_PORT}\n    haproxy = yes\n  }}\n");
        }
        if let Some(delay) = opts.auth_failure_delay_s {
            globals += &format!("auth_failure_delay = {delay} secs\n");
        }
        if let Some(trusted) = &opts.login_trusted_networks {
            globals += &format!("login_trusted_networks = {trusted}\n");
        }
        let conf = format!(
            "{globals}base_dir = {d}/run\nstate_dir = {d}/state\nlog_path = {d}/dovecot.log\n\
             protocols = imap pop3 lmtp\nlisten = *, ::\n{ssl}\ndisable_plaintext_auth = no\n\
             auth_mechanisms = plain login\nlogin_greeting = {name} ready.\n\
             default_internal_user = nobody\ndefault_internal_group = nogroup\ndefault_login_user = nobody\n\
             mail_location = maildir:~/Maildir\n\
             passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN username_format=%u {users}\n}}\n\
             userdb {{\n  driver = passwd-file\n  args = username_format=%u {users}\n}}\n\
             service imap-login {{\n  chroot =\n  inet_listener imap {{\n    port = 143\n  }}\n{imaps}}}\n\
             service pop3-login {{\n  chroot =\n  inet_listener pop3 {{\n    port = 110\n  }}\n{pop3s}}}\n\
             service lmtp {{\n  inet_listener lmtp {{\n    port = 24\n  }}\n}}\n\
             service anvil {{\n  chroot =\n}}\n\
             service imap-urlauth-login {{\n  chroot =\n}}\n",
            users = users_file.display()
        );
        let conf_path = dir.join("dovecot.conf");
        std::fs::write(&conf_path, conf)?;
        let daemon = ns.spawn(&format!("dovecot {name}"), &["dovecot", "-F", "-c", conf_path.to_str().context("path")?])?;
        let mut dc = Dovecot { daemon: Some(daemon), dir, name: name.to_string() };
        let deadline = Instant::now() + Duration::from_secs(10);
        for port in [143u16, 110] {
            let addr = SocketAddr::new(probe_ip, port);
            loop {
                let up = ns.run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())?;
                if up {
                    break;
                }
                if let Some(d) = dc.daemon.as_mut() {
                    if let Some(st) = d.exited() {
                        bail!("dovecot {name} exited ({st}): {}\n{}", d.log(), dc.log());
                    }
                }
                if Instant::now() > deadline {
                    bail!("dovecot {name} does not listen on {addr}:\n{}", dc.log());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(dc)
    }

    /// Its config file (for `doveadm -c`).
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("dovecot.conf")
    }

    /// Adds a user to its passwd-file (Dovecot re-reads the file when it changes).
    pub fn add_user(&self, user: &str, password: &str) -> Result<()> {
        use std::io::Write as _;
        let line = format!("{user}:{{PLAIN}}{password}:65534:65534::{}::\n", self.dir.join("mail").join(user).display());
        std::fs::OpenOptions::new().append(true).open(self.dir.join("users"))?.write_all(line.as_bytes())?;
        Ok(())
    }

    /// Its log file.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dovecot.log")).unwrap_or_default()
    }

    /// Stops it (SIGTERM to its process group, then SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop(Duration::from_secs(5));
        }
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---- Seeded mailboxes and login counts (for `bench proxy`) ----------------------------------

/// A test message of exactly `size` bytes (sizes below its headers plus 2, about 80, are raised
/// to that), CRLF line endings, numbered `n` in its
/// Subject: headers, a blank line, then 76-character lines of `x` (no line starts with a dot, so
/// a POP3 client receives it unstuffed, byte for byte).
pub fn test_message(n: usize, size: usize) -> Vec<u8> {
    let mut m = format!("From: <bench@example.com>\r\nTo: <user@example.net>\r\nSubject: bench message {n}\r\n\r\n").into_bytes();
    let size = size.max(m.len() + 2);
    while m.len() < size {
        // A full line if it fits with room for at least a 1-byte last line, else the rest.
        let left = size - m.len();
        let body = if left >= 78 + 3 { 76 } else { left - 2 };
        m.extend(std::iter::repeat_n(b'x', body));
        m.extend_from_slice(b"\r\n");
    }
    m
}

/// The successful logins of a Dovecot log (POP3 and IMAP `Login: user=<NAME>, ... rip=IP, ...`
/// lines): the user and the client address Dovecot saw (`None` when the line has no `rip=`).
pub fn logins(log: &str) -> impl Iterator<Item = (&str, Option<&str>)> {
    log.lines().filter_map(|line| {
        let (_, rest) = line.split_once("Login: user=<")?;
        let (user, fields) = rest.split_once('>')?;
        let rip = fields.split_once("rip=").map(|(_, r)| r.split(',').next().unwrap_or(r).trim());
        Some((user, rip))
    })
}

/// [`logins`] counted by user: which users logged in on a back-end, whatever the client's
/// address.
pub fn count_logins(log: &str) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for (user, _) in logins(log) {
        *counts.entry(user.to_string()).or_insert(0) += 1;
    }
    counts
}

impl Dovecot {
    /// Fills `user`'s INBOX with `count` messages of exactly `size` bytes ([`test_message`]),
    /// written straight into the Maildir (`mail_location = maildir:~/Maildir`, the home in the
    /// passwd-file line) as Dovecot would have delivered them to `cur/`, owned by nobody as its
    /// mail processes run. Faster and more predictable than `doveadm save` per message; Dovecot
    /// indexes them at the first login. Call it before the user's first session.
    pub fn seed_mailbox(&self, user: &str, count: usize, size: usize) -> Result<()> {
        let home = self.dir.join("mail").join(user);
        let md = home.join("Maildir");
        for sub in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(md.join(sub))?;
        }
        for n in 1..=count {
            let msg = test_message(n, size);
            // The S= size lets Dovecot skip a stat; ":2," = no flags.
            let name = format!("1700000000.M{n}P1.bench,S={}:2,", msg.len());
            std::fs::write(md.join("cur").join(name), msg)?;
        }
        let st = std::process::Command::new("chown").args(["-R", "nobody:nogroup"]).arg(&home).status().context("chown")?;
        if !st.success() {
            bail!("chown -R nobody:nogroup {}: {st}", home.display());
        }
        Ok(())
    }

    /// [`count_logins`] of its log so far.
    pub fn logins_by_user(&self) -> std::collections::BTreeMap<String, usize> {
        count_logins(&self.log())
    }
}

#[cfg(test)]
mod bench_helpers_tests {
    use super::*;

    #[test]
    fn test_messages_have_the_exact_size_and_no_dot_lines() {
        assert_eq!(test_message(1, 10).len(), test_message(1, 0).len());
        for size in [100, 160, 161, 162, 8192, 8193, 8271] {
            let m = test_message(7, size);
            assert_eq!(m.len(), size);
            assert!(m.ends_with(b"\r\n"));
            let text = String::from_utf8(m).unwrap();
            assert!(text.contains("Subject: bench message 7\r\n"));
            for l in text.split("\r\n") {
                assert!(!l.starts_with('.') && !l.contains('\n') && !l.contains('\r') && l.len() <= 78, "{l:?}");
            }
        }
    }

    #[test]
    fn logins_are_counted_by_user() {
        let log = "Jun 01 12:00:00 pop3-login: Info: Login: user=<alice>, method=PLAIN, rip=198.18.0.1, lip=198.18.0.11\n\
                   Jun 01 12:00:00 imap-login: Info: Login: user=<alice>, method=PLAIN, rip=198.18.0.2\n\
                   Jun 01 12:00:00 imap(alice)<1><x>: Info: Logged out in=10 out=20\n\
                   Jun 01 12:00:01 imap-login: Info: Login: user=<bob pw>, method=PLAIN\n\
                   Jun 01 12:00:01 imap-login: Info: Disconnected (auth failed, 1 attempts): user=<carol>\n";
        let c = count_logins(log);
        assert_eq!(c.into_iter().collect::<Vec<_>>(), vec![("alice".to_string(), 2), ("bob pw".to_string(), 1)]);
        let with_rip: Vec<_> = logins(log).collect();
        assert_eq!(with_rip, vec![("alice", Some("198.18.0.1")), ("alice", Some("198.18.0.2")), ("bob pw", None)]);
    }
}
