//! A throwaway Postfix (Debian package, 3.7) as a store-and-forward relay in a lab namespace:
//! the comparison row beside mxlb's relay (`cargo xtask bench relay`).
//!
//! Each instance has its own directory `/tmp/{namespace}-postfix-{name}/` (the namespace name
//! starts with the lab prefix, so parallel labs never share one):
//!
//! ```text
//! etc/main.cf etc/master.cf   the configuration (`postfix -c DIR/etc`)
//! queue/                      queue_directory (master's lock: queue/pid/master.pid)
//! data/                       data_directory (owned by postfix)
//! maillog                     maillog_file (through the postlogd service)
//! ```
//!
//! so several instances run side by side, one per namespace. `postfix -c DIR/etc start` runs
//! inside the namespace ([`Netns::exec_output`]), so its master, hence every smtpd, binds
//! that namespace's addresses. No service is chrooted (master.cf column 5 is `n`): a chroot
//! would need copies of /etc files under the queue directory.
//!
//! Settings that matter to a fair comparison are Postfix's defaults (`in_flow_delay`, the
//! destination concurrency of 20, `default_process_limit = 100`); what is set is what a
//! relay in a test network needs: `mydestination` empty, `relay_domains = example.net`,
//! `relayhost = [IP]:PORT`, `mynetworks` = the lab's nets (198.18.0.0/15, 2001:db8::/32),
//! no DNS (peer name lookups off, the relayhost is an address), and the anti-smuggling
//! settings of 3.7.11 (`smtpd_forbid_bare_newline = normalize`,
//! `smtpd_forbid_unauth_pipelining = yes`).
//!
//! The `postfix` command reports errors only to syslog or to a terminal: when `start` fails,
//! the error shows the maillog and the output of `postfix check` run under `script(1)` (a
//! pseudo-terminal), where Postfix does print its reason.
//!
//! Dropping a [`PostfixRelay`] runs `postfix stop`, waits (bounded) for the master to exit,
//! SIGKILLs what is left of this instance (the master's process group, and any process whose
//! environment has this instance's `MAIL_CONFIG`), and removes the directory.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use lab::postfix::PostfixRelay;
//! let lab = lab::Lab::builder().backends(1).build()?;
//! let b1 = lab.backend(1).addr(lab::AddrFamily::V4);
//! let pf = PostfixRelay::start(lab.lb().ns(), "relay", lab.lb().addr(lab::AddrFamily::V4), (b1, 25).into())?;
//! lab.smtp_source(pf.listen(), &lab::SourceOpts::default())?.assert_ok();
//! pf.wait_empty(std::time::Duration::from_secs(30))?;
//! # Ok(()) }
//! ```

use crate::Netns;
use anyhow::{Context as _, Result, bail};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The `postfix` command.
pub const POSTFIX: &str = "/usr/sbin/postfix";
/// Bound on `postfix start`/`stop`/`check` and `postqueue`.
const CMD_LIMIT: Duration = Duration::from_secs(30);
/// How long `start` waits for the 220 greeting.
const GREETING_LIMIT: Duration = Duration::from_secs(20);
/// Queue areas that hold messages not yet delivered (each may have hashed subdirectories).
const QUEUE_AREAS: [&str; 5] = ["maildrop", "incoming", "active", "deferred", "hold"];

/// Fails with a clear message unless Postfix and its user and group are installed.
pub fn require_postfix() -> Result<()> {
    if !Path::new(POSTFIX).is_file() {
        bail!(
            "{POSTFIX} is missing: Postfix is not installed; run `cargo xtask setup` (it installs the Debian package postfix)"
        );
    }
    if user_ids("postfix").is_none() || group_id("postdrop").is_none() {
        bail!(
            "the postfix user or the postdrop group is missing: reinstall the Debian package postfix (`cargo xtask setup`)"
        );
    }
    Ok(())
}

/// uid and gid of a user (getpwnam).
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam with a valid C string; the result is read at once (this lab is the
    // only user of the passwd functions in the process, and the fields are copied).
    unsafe {
        let pw = libc::getpwnam(c.as_ptr());
        (!pw.is_null()).then(|| ((*pw).pw_uid, (*pw).pw_gid))
    }
}

/// gid of a group (getgrnam).
fn group_id(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: as in user_ids.
    unsafe {
        let gr = libc::getgrnam(c.as_ptr());
        (!gr.is_null()).then(|| (*gr).gr_gid)
    }
}

/// `relayhost` syntax for an address: `[198.18.0.11]:25`, `[ipv6:2001:db8::11]:25`.
pub fn relayhost_text(to: SocketAddr) -> String {
    match to.ip() {
        IpAddr::V4(ip) => format!("[{ip}]:{}", to.port()),
        IpAddr::V6(ip) => format!("[ipv6:{ip}]:{}", to.port()),
    }
}

/// main.cf for an instance in `dir` (pure): listening on `listen` (unspecified: all
/// interfaces), relaying example.net to `relayhost`.
pub fn main_cf(dir: &Path, name: &str, listen: IpAddr, relayhost: SocketAddr) -> String {
    let d = dir.display();
    let interfaces = if listen.is_unspecified() { "all".to_string() } else { listen.to_string() };
    let v6 = listen.is_ipv6() || relayhost.is_ipv6();
    let v4 = listen.is_ipv4() || listen.is_unspecified() || relayhost.is_ipv4();
    let protocols = match (v4, v6) {
        (true, true) => "all",
        (false, true) => "ipv6",
        _ => "ipv4",
    };
    let mut networks = String::new();
    if v4 {
        networks += "127.0.0.0/8 198.18.0.0/15";
    }
    if v6 {
        networks += if networks.is_empty() { "" } else { " " };
        networks += "[::1]/128 [2001:db8::]/32";
    }
    let mut s = String::new();
    let _ = write!(
        s,
        "# written by the mxlb lab (tests/src/postfix.rs): a throwaway relay\n\
         compatibility_level = 3.6\n\
         queue_directory = {d}/queue\n\
         data_directory = {d}/data\n\
         mail_owner = postfix\n\
         setgid_group = postdrop\n\
         myhostname = {name}.relay.test\n\
         inet_interfaces = {interfaces}\n\
         inet_protocols = {protocols}\n\
         mydestination =\n\
         relay_domains = example.net\n\
         relayhost = {relay}\n\
         mynetworks = {networks}\n\
         smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n\
         local_recipient_maps =\n\
         alias_maps =\n\
         alias_database =\n\
         biff = no\n\
         maillog_file = {d}/maillog\n\
         maillog_file_prefixes = {d}\n\
         default_process_limit = 100\n\
         smtpd_peername_lookup = no\n\
         smtp_dns_support_level = disabled\n\
         smtp_host_lookup = native\n\
         smtpd_forbid_bare_newline = normalize\n\
         smtpd_forbid_unauth_pipelining = yes\n",
        relay = relayhost_text(relayhost),
    );
    s
}

/// master.cf (pure): Debian's services that a relay uses, none chrooted, plus postlogd for
/// `maillog_file`.
pub fn master_cf() -> &'static str {
    "# written by the mxlb lab (tests/src/postfix.rs): no chroot (column 5 = n)\n\
     # service type  private unpriv  chroot  wakeup  maxproc command\n\
     smtp      inet  n       -       n       -       -       smtpd\n\
     pickup    unix  n       -       n       60      1       pickup\n\
     cleanup   unix  n       -       n       -       0       cleanup\n\
     qmgr      unix  n       -       n       300     1       qmgr\n\
     rewrite   unix  -       -       n       -       -       trivial-rewrite\n\
     bounce    unix  -       -       n       -       0       bounce\n\
     defer     unix  -       -       n       -       0       bounce\n\
     trace     unix  -       -       n       -       0       bounce\n\
     verify    unix  -       -       n       -       1       verify\n\
     flush     unix  n       -       n       1000?   0       flush\n\
     proxymap  unix  -       -       n       -       -       proxymap\n\
     proxywrite unix -       -       n       -       1       proxymap\n\
     smtp      unix  -       -       n       -       -       smtp\n\
     relay     unix  -       -       n       -       -       smtp\n\
     showq     unix  n       -       n       -       -       showq\n\
     error     unix  -       -       n       -       -       error\n\
     retry     unix  -       -       n       -       -       error\n\
     discard   unix  -       -       n       -       -       discard\n\
     local     unix  -       n       n       -       -       local\n\
     anvil     unix  -       -       n       -       1       anvil\n\
     scache    unix  -       -       n       -       1       scache\n\
     postlog   unix-dgram n  -       n       -       1       postlogd\n"
}

/// Regular files under `dir`, recursively (hashed queue subdirectories); 0 if it is missing.
fn count_files(dir: &Path, depth: usize) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() && depth < 4 => count_files(&e.path(), depth + 1),
            Ok(t) if t.is_file() => 1,
            _ => 0,
        })
        .sum()
}

/// Is `pid` alive (and not a zombie)?
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(s) => s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Does process `pid` belong to the instance configured in `etc` (its environment carries
/// `MAIL_CONFIG=etc`, as every process the master starts does)?
fn belongs_to(pid: i32, etc: &Path) -> bool {
    let want = format!("MAIL_CONFIG={}", etc.display());
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| env.split(|&b| b == 0).any(|kv| kv == want.as_bytes()))
        .unwrap_or(false)
}

/// Processes of the instance configured in `etc`.
fn instance_pids(etc: &Path) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| belongs_to(pid, etc))
        .collect()
}

/// A Postfix relay running in a lab namespace; stopped and removed on drop.
pub struct PostfixRelay {
    ns: Netns,
    dir: PathBuf,
    listen: SocketAddr,
    relayhost: SocketAddr,
    master: Option<i32>,
}

impl PostfixRelay {
    /// Writes the configuration under `/tmp/{ns}-postfix-{name}/`, runs `postfix start` inside
    /// `ns`, and returns once port 25 of `listen` greets with 220 (bounded: 20 s). `listen`
    /// unspecified (0.0.0.0) listens everywhere; the greeting is then awaited on 127.0.0.1.
    pub fn start(ns: &Netns, name: &str, listen: IpAddr, relayhost: SocketAddr) -> Result<PostfixRelay> {
        Self::start_with(ns, name, listen, relayhost, "")
    }

    /// Like [`PostfixRelay::start`], with `extra` lines appended to main.cf (later settings
    /// win, e.g. `smtpd_authorized_xclient_hosts = 198.18.0.2`).
    pub fn start_with(ns: &Netns, name: &str, listen: IpAddr, relayhost: SocketAddr, extra: &str) -> Result<PostfixRelay> {
        require_postfix()?;
        let (uid, gid) = user_ids("postfix").context("no postfix user")?;
        let dir = std::env::temp_dir().join(format!("{}-postfix-{name}", ns.name()));
        // A leftover of a crashed run with the same namespace name: stop it first.
        if dir.join("etc/main.cf").exists() {
            let _ = ns.exec_output(&[POSTFIX, "-c", &dir.join("etc").display().to_string(), "stop"], CMD_LIMIT);
            for pid in instance_pids(&dir.join("etc")) {
                // SAFETY: kill(2) on a process of that leftover instance.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["etc", "queue", "data"] {
            std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        std::os::unix::fs::chown(dir.join("data"), Some(uid), Some(gid)).context("chown data_directory to postfix")?;
        let mut cf = main_cf(&dir, name, listen, relayhost);
        if !extra.is_empty() {
            cf += extra;
            cf += "\n";
        }
        std::fs::write(dir.join("etc/main.cf"), cf)?;
        std::fs::write(dir.join("etc/master.cf"), master_cf())?;
        let listen = SocketAddr::new(listen, 25);
        let mut pf = PostfixRelay { ns: ns.clone(), dir, listen, relayhost, master: None };
        let etc = pf.etc();
        let (out, timed_out) = pf.ns.exec_output(&[POSTFIX, "-c", &etc, "start"], CMD_LIMIT)?;
        if timed_out || !out.status.success() {
            bail!(
                "postfix -c {etc} start failed ({}{}): {}{}\n{}",
                out.status,
                if timed_out { ", timed out" } else { "" },
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                pf.diagnostics()
            );
        }
        // The master writes its pid once it runs; then wait for the greeting.
        let deadline = Instant::now() + GREETING_LIMIT;
        let probe = if listen.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], 25)) } else { listen };
        loop {
            if pf.master.is_none() {
                pf.master = pf.read_master_pid();
            }
            let greeting = pf.ns.run(move || crate::relay::greeting_of(probe))?;
            if pf.master.is_some() && greeting.as_deref().is_some_and(|g| g.starts_with("220")) {
                return Ok(pf);
            }
            if Instant::now() >= deadline {
                bail!(
                    "Postfix in {} did not greet on {probe} within {GREETING_LIMIT:?} (master pid {:?}, last reply {greeting:?})\n{}",
                    pf.ns.name(),
                    pf.master,
                    pf.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn etc(&self) -> String {
        self.dir.join("etc").display().to_string()
    }

    fn read_master_pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.dir.join("queue/pid/master.pid")).ok()?.trim().parse().ok()?;
        (pid > 1 && alive(pid)).then_some(pid)
    }

    /// Where clients connect (port 25).
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Where it relays to.
    pub fn relayhost(&self) -> SocketAddr {
        self.relayhost
    }

    /// The instance's directory (config in `etc/`, queue in `queue/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The master process (its process group holds the instance's daemons).
    pub fn master_pid(&self) -> Option<i32> {
        self.master
    }

    /// Messages in the queue (files in maildrop, incoming, active, deferred and hold), counted
    /// on disk: no showq round trip, fine to poll.
    pub fn queue_len(&self) -> usize {
        QUEUE_AREAS.iter().map(|a| count_files(&self.dir.join("queue").join(a), 0)).sum()
    }

    /// Messages in the deferred queue (delivery failed at least once).
    pub fn deferred_len(&self) -> usize {
        count_files(&self.dir.join("queue/deferred"), 0)
    }

    /// Waits (≤ `timeout`) until the queue is empty; returns how long it took. Errors with the
    /// queue listing and the log's tail if it does not drain.
    pub fn wait_empty(&self, timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        loop {
            let n = self.queue_len();
            if n == 0 {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() >= timeout {
                bail!(
                    "Postfix's queue still holds {n} message(s) ({} deferred) after {timeout:?}:\n{}\n{}",
                    self.deferred_len(),
                    self.postqueue().unwrap_or_else(|e| format!("postqueue: {e:#}")),
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `postqueue -p` (the queue listing).
    pub fn postqueue(&self) -> Result<String> {
        let (out, timed_out) = self.ns.exec_output(&["/usr/sbin/postqueue", "-c", &self.etc(), "-p"], CMD_LIMIT)?;
        if timed_out {
            bail!("postqueue -p timed out");
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    }

    /// The whole maillog.
    pub fn log(&self) -> String {
        std::fs::read(self.dir.join("maillog")).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The last `n` lines of the maillog.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        format!("maillog ({}):\n{}", self.dir.join("maillog").display(), lines[lines.len().saturating_sub(n)..].join("\n"))
    }

    /// The maillog's warnings, errors and fatal lines (except clock-skew notices, see below).
    pub fn log_problems(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains("warning:") || l.contains("error:") || l.contains("fatal:") || l.contains("panic:"))
            // The VM's file-system clock running a second ahead is the machine's, not a mail
            // problem: cleanup(8) says so and resets the time stamps.
            .filter(|l| !l.contains("file system clock is") && !l.contains("resetting file time stamps"))
            .map(str::to_string)
            .collect()
    }

    /// The maillog's tail and `postfix check` run on a pseudo-terminal (where Postfix prints
    /// its errors instead of sending them to syslog only).
    fn diagnostics(&self) -> String {
        let check = std::process::Command::new("script")
            .args(["-qec", &format!("{POSTFIX} -c {} check", self.etc()), "/dev/null"])
            .stdin(std::process::Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
            .unwrap_or_else(|e| format!("(script(1) unavailable: {e})"));
        format!("postfix check says:\n{}\n{}", check.trim(), self.log_tail(20))
    }

    /// `postfix stop`, then SIGKILL for what is left; bounded (≈ 40 s at worst). Idempotent.
    pub fn stop(&mut self) {
        let etc_path = self.dir.join("etc");
        if etc_path.join("main.cf").exists() {
            let _ = self.ns.exec_output(&[POSTFIX, "-c", &self.etc(), "stop"], CMD_LIMIT);
        }
        let master = self.master.take().or_else(|| self.read_master_pid());
        if let Some(pid) = master {
            let deadline = Instant::now() + Duration::from_secs(5);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // The master called setsid(): its group is this instance's daemons.
            if belongs_to(pid, &etc_path) || !alive(pid) {
                // SAFETY: kill(2) on the process group led by this instance's master.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
        }
        // Anything of this instance that left the group.
        for pid in instance_pids(&etc_path) {
            // SAFETY: kill(2) on a process carrying this instance's MAIL_CONFIG.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl Drop for PostfixRelay {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl std::fmt::Debug for PostfixRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostfixRelay")
            .field("ns", &self.ns.name())
            .field("listen", &self.listen)
            .field("relayhost", &self.relayhost)
            .field("master", &self.master)
            .field("dir", &self.dir)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayhost_syntax() {
        assert_eq!(relayhost_text("198.18.0.11:25".parse().unwrap()), "[198.18.0.11]:25");
        assert_eq!(relayhost_text("[2001:db8::11]:2525".parse().unwrap()), "[ipv6:2001:db8::11]:2525");
    }

    #[test]
    fn main_cf_relays_the_test_domain_to_the_relayhost() {
        let dir = Path::new("/tmp/mx12345-lb-postfix-relay");
        let cf = main_cf(dir, "relay", "198.18.0.2".parse().unwrap(), "198.18.0.11:25".parse().unwrap());
        for line in [
            "compatibility_level = 3.6\n",
            "queue_directory = /tmp/mx12345-lb-postfix-relay/queue\n",
            "data_directory = /tmp/mx12345-lb-postfix-relay/data\n",
            "inet_interfaces = 198.18.0.2\n",
            "inet_protocols = ipv4\n",
            "mydestination =\n",
            "relay_domains = example.net\n",
            "relayhost = [198.18.0.11]:25\n",
            "mynetworks = 127.0.0.0/8 198.18.0.0/15\n",
            "maillog_file = /tmp/mx12345-lb-postfix-relay/maillog\n",
            "maillog_file_prefixes = /tmp/mx12345-lb-postfix-relay\n",
        ] {
            assert!(cf.contains(line), "{line:?} missing from\n{cf}");
        }
        let all = main_cf(dir, "r", "0.0.0.0".parse().unwrap(), "[2001:db8::11]:25".parse().unwrap());
        assert!(all.contains("inet_interfaces = all\n") && all.contains("inet_protocols = all\n"), "{all}");
        assert!(all.contains("mynetworks = 127.0.0.0/8 198.18.0.0/15 [::1]/128 [2001:db8::]/32\n"), "{all}");
    }

    #[test]
    fn master_cf_chroots_nothing_and_has_postlog() {
        for l in master_cf().lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f[4], "n", "chrooted: {l}");
        }
        assert!(master_cf().contains("postlog   unix-dgram"));
    }

    #[test]
    fn queue_files_are_counted_in_hashed_subdirectories() {
        let d = std::env::temp_dir().join(format!("postfix-count-{}", std::process::id()));
        std::fs::create_dir_all(d.join("deferred/A")).unwrap();
        std::fs::write(d.join("deferred/A/ABC"), "").unwrap();
        std::fs::write(d.join("x"), "").unwrap();
        assert_eq!(count_files(&d, 0), 2);
        assert_eq!(count_files(&d.join("missing"), 0), 0);
        let _ = std::fs::remove_dir_all(&d);
    }
}
