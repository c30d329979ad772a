//! HAProxy (Debian package) as a `mode tcp` load balancer on the LB node of the [`Lab`]: the
//! comparison row beside mxlb (same back-ends, same weights, `balance roundrobin`).
//!
//! HAProxy runs in the LB node's namespace as a single process in the foreground
//! (`haproxy -db -f CFG`, no master-worker), so [`HaproxyTcp::pid`] is the process that does the
//! work and its `/proc/PID/stat` covers all its threads (see [`crate::cpu`]). It listens on an
//! address of the LB node itself (not the VIP: the LB namespace holds no VIP address), proxies
//! every connection to a back-end's own IPv4 address and port, and the back-end answers
//! HAProxy (a full proxy, not DSR). The config and a stats socket live in
//! `/tmp/{prefix}-haproxy-tcp{port}/`, removed on drop.
//!
//! HAProxy weights go from 0 to 256; [`config_text`] divides the weights by their greatest
//! common divisor and, if the largest is still above 256, scales them down to it (rounding, at
//! least 1 for a non-zero weight), so 100/200/300 becomes 1/2/3 with the same shares.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use lab::haproxy::{HaproxyOpts, HaproxyTcp};
//! let lab = lab::Lab::builder().backends(3).build()?;
//! let opts = HaproxyOpts::new(&lab, vec![100, 200, 300]);
//! let hap = HaproxyTcp::start(&lab, &opts)?;
//! lab.smtp_source(hap.listen(), &lab::SourceOpts::default())?.assert_ok();
//! # Ok(()) }
//! ```

use crate::{Daemon, Lab, Netns};
use anyhow::{Context, Result, bail, ensure};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Settings of a `mode tcp` HAProxy on the LB node.
#[derive(Clone, Debug)]
pub struct HaproxyOpts {
    /// Where it listens: an address of the LB node (e.g. `lab.lb().v4():2525`).
    pub listen: SocketAddr,
    /// The back-ends' port (25).
    pub port: u16,
    /// One weight per back-end, index 0 = b1; as many back-ends as weights.
    pub weights: Vec<u32>,
    /// Global and frontend `maxconn`. Default 4096.
    pub maxconn: u32,
    /// `nbthread` (None: HAProxy's default, one per CPU).
    pub nbthread: Option<u32>,
    /// `timeout connect`. Default 2 s.
    pub timeout_connect: Duration,
    /// `timeout client` / `timeout server`. Default 30 s.
    pub timeout_idle: Duration,
    /// Health checks (`check inter 200ms fall 2 rise 1`, TCP connect). Default off.
    pub check: bool,
}

impl HaproxyOpts {
    /// Defaults for `lab`: listen on the LB's IPv4 address port 2525, back-ends on port 25.
    pub fn new(lab: &Lab, weights: Vec<u32>) -> HaproxyOpts {
        HaproxyOpts {
            listen: SocketAddr::from((lab.lb().v4(), 2525)),
            port: 25,
            weights,
            maxconn: 4096,
            nbthread: None,
            timeout_connect: Duration::from_secs(2),
            timeout_idle: Duration::from_secs(30),
            check: false,
        }
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The weights HAProxy is given for `weights` (pure): divided by their GCD, then scaled so the
/// largest is at most 256 (rounded, a non-zero weight stays ≥ 1).
pub fn haproxy_weights(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let w: Vec<u32> = weights.iter().map(|w| w / g).collect();
    let max = w.iter().copied().max().unwrap_or(0);
    if max <= 256 {
        return w;
    }
    w.iter()
        .map(|&x| {
            if x == 0 {
                0
            } else {
                ((u64::from(x) * 256 + u64::from(max) / 2) / u64::from(max)).max(1) as u32
            }
        })
        .collect()
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// The HAProxy configuration (pure): frontend `mail` on `opts.listen`, backend `mail` with
/// `server bN ADDR:PORT weight W` for back-end N at `backends[N-1]`; `stats_socket` if given.
pub fn config_text(
    opts: &HaproxyOpts,
    backends: &[Ipv4Addr],
    stats_socket: Option<&Path>,
) -> Result<String> {
    ensure!(!opts.weights.is_empty(), "no back-end weights");
    ensure!(
        opts.weights.len() <= backends.len(),
        "{} weights for {} back-ends",
        opts.weights.len(),
        backends.len()
    );
    ensure!(opts.weights.iter().any(|&w| w > 0), "all weights are 0");
    ensure!(opts.maxconn > 0, "maxconn must be > 0");
    let listen = match opts.listen {
        SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    };
    let mut s = String::new();
    writeln!(s, "# written by the mxlb lab")?;
    writeln!(s, "global")?;
    writeln!(s, "    maxconn {}", opts.maxconn)?;
    if let Some(n) = opts.nbthread {
        writeln!(s, "    nbthread {n}")?;
    }
    if let Some(sock) = stats_socket {
        writeln!(s, "    stats socket {} level admin", sock.display())?;
    }
    writeln!(s)?;
    writeln!(s, "defaults")?;
    writeln!(s, "    mode tcp")?;
    writeln!(s, "    timeout connect {}", ms(opts.timeout_connect))?;
    writeln!(s, "    timeout client {}", ms(opts.timeout_idle))?;
    writeln!(s, "    timeout server {}", ms(opts.timeout_idle))?;
    writeln!(s)?;
    writeln!(s, "frontend mail")?;
    writeln!(s, "    bind {listen}")?;
    writeln!(s, "    maxconn {}", opts.maxconn)?;
    writeln!(s, "    default_backend mail")?;
    writeln!(s)?;
    writeln!(s, "backend mail")?;
    writeln!(s, "    balance roundrobin")?;
    let check = if opts.check {
        " check inter 200ms fall 2 rise 1"
    } else {
        ""
    };
    for (i, w) in haproxy_weights(&opts.weights).iter().enumerate() {
        writeln!(
            s,
            "    server b{} {}:{} weight {w}{check}",
            i + 1,
            backends[i],
            opts.port
        )?;
    }
    Ok(s)
}

/// Where haproxy is installed, or an error that says how to get it.
pub fn haproxy_bin() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from));
    for d in dirs {
        let p = d.join("haproxy");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "haproxy is not installed: run `cargo xtask setup` (it installs the Debian package haproxy)"
    )
}

/// Is something LISTENing on `addr` in the calling thread's namespace
/// (`/proc/thread-self/net/tcp{,6}`)?
fn listening(addr: SocketAddr) -> bool {
    crate::lab::smtp::listening(if addr.is_ipv4() { "tcp" } else { "tcp6" }, addr.port())
}

/// A HAProxy in `mode tcp` on the lab's LB node. Dropping it stops it (SIGTERM, then SIGKILL
/// after 2 s) and removes its directory.
pub struct HaproxyTcp<'a> {
    _lab: std::marker::PhantomData<&'a Lab>,
    ns: Netns,
    opts: HaproxyOpts,
    dir: PathBuf,
    daemon: Option<Daemon>,
    final_log: String,
}

impl<'a> HaproxyTcp<'a> {
    /// Writes the config and starts HAProxy in the LB node's namespace; returns once it listens
    /// on `opts.listen` (bounded: 10 s), failing with its log if it exits or does not.
    pub fn start(lab: &'a Lab, opts: &HaproxyOpts) -> Result<HaproxyTcp<'a>> {
        let bin = haproxy_bin()?;
        let backends: Vec<Ipv4Addr> = lab.backends().iter().map(|h| h.v4()).collect();
        let dir = std::env::temp_dir().join(format!(
            "{}-haproxy-tcp{}",
            lab.prefix(),
            opts.listen.port()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut hap = HaproxyTcp {
            _lab: std::marker::PhantomData,
            ns: lab.lb().ns().clone(),
            opts: opts.clone(),
            dir,
            daemon: None,
            final_log: String::new(),
        };
        let text = config_text(opts, &backends, Some(&hap.stats_socket()))?;
        std::fs::write(hap.cfg_path(), text)?;
        let cfg = hap.cfg_path().display().to_string();
        let bin = bin.display().to_string();
        // Check the config first: a clear error instead of an early exit.
        let (out, timed_out) = hap
            .ns
            .exec_output(&[&bin, "-c", "-q", "-f", &cfg], Duration::from_secs(10))?;
        ensure!(
            !timed_out && out.status.success(),
            "haproxy -c rejects {cfg}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        hap.daemon = Some(hap.ns.spawn(
            &format!("haproxy tcp {}", opts.listen),
            &[&bin, "-db", "-f", &cfg],
        )?);
        let deadline = Instant::now() + Duration::from_secs(10);
        let listen = opts.listen;
        loop {
            let d = hap.daemon.as_mut().expect("just set");
            if let Some(st) = d.exited() {
                bail!("haproxy exited at start ({st}):\n{}", d.log());
            }
            if hap.ns.run(move || listening(listen))? {
                return Ok(hap);
            }
            if Instant::now() >= deadline {
                bail!(
                    "haproxy not listening on {listen} after 10 s:\n{}",
                    hap.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where clients connect.
    pub fn listen(&self) -> SocketAddr {
        self.opts.listen
    }
    pub fn opts(&self) -> &HaproxyOpts {
        &self.opts
    }
    /// The config file it runs with.
    pub fn cfg_path(&self) -> PathBuf {
        self.dir.join("haproxy.cfg")
    }
    /// Its admin stats socket (`show stat`, `set weight mail/b1 50`, ...).
    pub fn stats_socket(&self) -> PathBuf {
        self.dir.join("haproxy.sock")
    }

    /// The HAProxy process (all its threads), while it runs; 0 once stopped.
    pub fn pid(&self) -> u32 {
        self.daemon.as_ref().map_or(0, Daemon::pid)
    }

    /// Its output so far (kept after it stopped).
    pub fn log(&self) -> String {
        match &self.daemon {
            Some(d) => d.log(),
            None => self.final_log.clone(),
        }
    }

    /// Is it still running?
    pub fn running(&mut self) -> bool {
        self.daemon.as_mut().is_some_and(|d| d.exited().is_none())
    }

    /// Stops it: SIGTERM, up to 2 s, then SIGKILL. Errors if it had exited on its own with a
    /// failure before.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut d) = self.daemon.take() else {
            return Ok(());
        };
        let early = d.exited();
        d.stop(Duration::from_secs(2));
        self.final_log = d.log();
        if let Some(st) = early
            && !st.success()
        {
            bail!("haproxy had exited ({st}):\n{}", self.final_log);
        }
        Ok(())
    }
}

impl Drop for HaproxyTcp<'_> {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl std::fmt::Debug for HaproxyTcp<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HaproxyTcp")
            .field("listen", &self.opts.listen)
            .field("pid", &self.pid())
            .field("dir", &self.dir)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(weights: Vec<u32>) -> HaproxyOpts {
        HaproxyOpts {
            listen: "198.18.0.2:2525".parse().unwrap(),
            port: 25,
            weights,
            maxconn: 1000,
            nbthread: Some(2),
            timeout_connect: Duration::from_secs(1),
            timeout_idle: Duration::from_millis(5500),
            check: false,
        }
    }

    #[test]
    fn weights_are_reduced_and_scaled_to_haproxys_range() {
        assert_eq!(haproxy_weights(&[100, 200, 300]), [1, 2, 3]);
        assert_eq!(haproxy_weights(&[7, 0, 14]), [1, 0, 2]);
        assert_eq!(haproxy_weights(&[256, 255]), [256, 255]);
        assert_eq!(haproxy_weights(&[1000, 1, 513]), [256, 1, 131]);
        assert_eq!(haproxy_weights(&[0, 0]), [0, 0]);
    }

    #[test]
    fn config_text_lists_every_weighted_server() {
        let b: Vec<Ipv4Addr> = (11..=13).map(|i| Ipv4Addr::new(198, 18, 0, i)).collect();
        let sock = Path::new("/tmp/x/haproxy.sock");
        let text = config_text(&opts(vec![100, 200, 300]), &b, Some(sock)).unwrap();
        let want = "# written by the mxlb lab
global
    maxconn 1000
    nbthread 2
    stats socket /tmp/x/haproxy.sock level admin

defaults
    mode tcp
    timeout connect 1000ms
    timeout client 5500ms
    timeout server 5500ms

frontend mail
    bind 198.18.0.2:2525
    maxconn 1000
    default_backend mail

backend mail
    balance roundrobin
    server b1 198.18.0.11:25 weight 1
    server b2 198.18.0.12:25 weight 2
    server b3 198.18.0.13:25 weight 3
";
        assert_eq!(text, want);
        let mut o = opts(vec![1]);
        o.check = true;
        o.listen = "[2001:db8::2]:2525".parse().unwrap();
        o.nbthread = None;
        let text = config_text(&o, &b, None).unwrap();
        assert!(text.contains("bind [2001:db8::2]:2525\n"), "{text}");
        assert!(
            text.contains("server b1 198.18.0.11:25 weight 1 check inter 200ms fall 2 rise 1\n")
        );
        assert!(
            !text.contains("b2") && !text.contains("stats socket") && !text.contains("nbthread")
        );
    }

    #[test]
    fn config_text_rejects_bad_weights() {
        let b = [Ipv4Addr::new(198, 18, 0, 11)];
        assert!(config_text(&opts(vec![]), &b, None).is_err());
        assert!(config_text(&opts(vec![0]), &b, None).is_err());
        assert!(config_text(&opts(vec![1, 1]), &b, None).is_err());
    }
}
