//! keepalived as a VRRPv3 peer on an LB node of the [`Lab`], run the way
//! `shared/docs/vrrp-reference.md` describes: inside the LB's namespace,
//! `keepalived -n -l -D -f CONF -p PID -r VRRP_PID -c CHK_PID`, one config and set of pid files
//! per node under `/tmp/{prefix}-keepalived{k}/`.
//!
//! keepalived adds and removes the VIPs on the LB's `eth0` itself and announces them
//! (gratuitous ARP / unsolicited NA); the XDP balancer is not involved on a keepalived node, it
//! is a plain VRRP peer for an `mxlb run` node (or another keepalived) to fail over with.
//!
//! IPv4 and IPv6 VIPs go into two instances with the same VRID (`VI_{vrid}_4`, `VI_{vrid}_6`):
//! VRRPv3 advertises one address family per virtual router. IPv6 adverts come from the LB's
//! link-local address.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use lab::keepalived::{Keepalived, KeepalivedOpts};
//! let lab = lab::Lab::builder().lbs(2).vip_by_arp().no_sinks().build()?;
//! let opts = KeepalivedOpts { priority: 150, advert_int_ms: 100, ..Default::default() };
//! let master = Keepalived::start(&lab, 1, &opts)?;
//! master.wait_master(std::time::Duration::from_secs(5))?;
//! let backup = Keepalived::start(&lab, 2, &KeepalivedOpts { priority: 100, ..opts })?;
//! # Ok(()) }
//! ```

use crate::{Daemon, Lab, Netns, VIP4};
use anyhow::{Context, Result, bail, ensure};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Settings of one keepalived node (one VRRP instance per address family).
#[derive(Clone, Debug)]
pub struct KeepalivedOpts {
    /// `virtual_router_id` (1..=255). Default 51.
    pub vrid: u8,
    /// 1..=255 (255 = address owner: master at once). Default 100.
    pub priority: u8,
    /// `advert_int`, in milliseconds, a multiple of 10 from 10 to 40950 (VRRPv3 centiseconds):
    /// typically 100 or 1000 (default).
    pub advert_int_ms: u32,
    /// The virtual addresses (default: 198.18.0.100). Added as `/32` (IPv4) or `/128` (IPv6)
    /// on `eth0`.
    pub vips: Vec<IpAddr>,
    /// `state BACKUP` (default true) or `state MASTER`.
    pub state_backup: bool,
    /// `nopreempt` (needs `state BACKUP`).
    pub nopreempt: bool,
    /// Unicast peers instead of multicast (empty = multicast). Each family's instance gets the
    /// peers of its family, with the LB's own address of that family as `unicast_src_ip`.
    pub unicast_peers: Vec<IpAddr>,
    /// Lines added inside each `vrrp_instance` block (e.g. `garp_master_delay 1`).
    pub extra_instance: Option<String>,
}

impl Default for KeepalivedOpts {
    fn default() -> Self {
        KeepalivedOpts {
            vrid: 51,
            priority: 100,
            advert_int_ms: 1000,
            vips: vec![VIP4.into()],
            state_backup: true,
            nopreempt: false,
            unicast_peers: Vec::new(),
            extra_instance: None,
        }
    }
}

/// VRRP state of an instance, from keepalived's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VrrpState {
    Backup,
    Master,
    Fault,
}

/// Names of the instances [`config_text`] writes for `opts`, IPv4 first.
pub fn instance_names(opts: &KeepalivedOpts) -> Vec<String> {
    let mut v = Vec::new();
    if opts.vips.iter().any(IpAddr::is_ipv4) {
        v.push(format!("VI_{}_4", opts.vrid));
    }
    if opts.vips.iter().any(IpAddr::is_ipv6) {
        v.push(format!("VI_{}_6", opts.vrid));
    }
    v
}

/// `advert_int` in seconds as keepalived reads it ("0.1", "1", "0.25").
fn advert_int_text(ms: u32) -> String {
    let (s, frac) = (ms / 1000, ms % 1000);
    if frac == 0 {
        s.to_string()
    } else {
        format!("{s}.{}", format!("{frac:03}").trim_end_matches('0'))
    }
}

/// The keepalived configuration for a node whose segment interface is `dev` with addresses
/// `own` (IPv4, IPv6; the `unicast_src_ip`s) (pure; see [`KeepalivedOpts`]).
pub fn config_text(
    router_id: &str,
    dev: &str,
    own: (Ipv4Addr, Ipv6Addr),
    opts: &KeepalivedOpts,
) -> Result<String> {
    ensure!(opts.vrid >= 1, "vrid must be 1..=255");
    ensure!(opts.priority >= 1, "priority must be 1..=255");
    ensure!(
        opts.advert_int_ms.is_multiple_of(10) && (10..=40950).contains(&opts.advert_int_ms),
        "advert_int_ms must be a multiple of 10 in 10..=40950, got {}",
        opts.advert_int_ms
    );
    ensure!(!opts.vips.is_empty(), "no VIPs");
    ensure!(
        !opts.nopreempt || opts.state_backup,
        "nopreempt needs state BACKUP"
    );
    let mut s = String::new();
    writeln!(s, "# written by the mxlb lab for {router_id}")?;
    writeln!(
        s,
        "global_defs {{\n    router_id {router_id}\n    vrrp_version 3\n}}\n"
    )?;
    for (name, v6) in instance_names(opts).iter().map(|n| (n, n.ends_with("_6"))) {
        let fam = |ip: &IpAddr| ip.is_ipv6() == v6;
        writeln!(s, "vrrp_instance {name} {{")?;
        writeln!(
            s,
            "    state {}",
            if opts.state_backup {
                "BACKUP"
            } else {
                "MASTER"
            }
        )?;
        writeln!(s, "    interface {dev}")?;
        writeln!(s, "    virtual_router_id {}", opts.vrid)?;
        writeln!(s, "    priority {}", opts.priority)?;
        writeln!(s, "    advert_int {}", advert_int_text(opts.advert_int_ms))?;
        if opts.nopreempt {
            writeln!(s, "    nopreempt")?;
        }
        let peers: Vec<&IpAddr> = opts.unicast_peers.iter().filter(|p| fam(p)).collect();
        if !peers.is_empty() {
            let src = if v6 {
                IpAddr::from(own.1)
            } else {
                IpAddr::from(own.0)
            };
            writeln!(s, "    unicast_src_ip {src}")?;
            writeln!(s, "    unicast_peer {{")?;
            for p in peers {
                writeln!(s, "        {p}")?;
            }
            writeln!(s, "    }}")?;
        }
        writeln!(s, "    virtual_ipaddress {{")?;
        for vip in opts.vips.iter().filter(|v| fam(v)) {
            let len = if v6 { 128 } else { 32 };
            writeln!(s, "        {vip}/{len} dev {dev}")?;
        }
        writeln!(s, "    }}")?;
        if let Some(extra) = &opts.extra_instance {
            for l in extra.lines() {
                writeln!(s, "    {l}")?;
            }
        }
        writeln!(s, "}}\n")?;
    }
    Ok(s)
}

/// The last state keepalived logged for `instance` ("(VI_51_4) Entering MASTER STATE").
pub fn last_state(log: &str, instance: &str) -> Option<VrrpState> {
    let tag = format!("({instance}) Entering ");
    log.lines().rev().find_map(|l| {
        let rest = &l[l.find(&tag)? + tag.len()..];
        match rest.split_whitespace().next()? {
            "MASTER" => Some(VrrpState::Master),
            "BACKUP" => Some(VrrpState::Backup),
            "FAULT" => Some(VrrpState::Fault),
            _ => None,
        }
    })
}

/// Where keepalived is installed, or an error that says how to get it.
pub fn keepalived_bin() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from));
    for d in dirs {
        let p = d.join("keepalived");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "keepalived is not installed: run `cargo xtask setup` (it installs the Debian package keepalived)"
    )
}

/// A keepalived running on LB `k` of a lab. Dropping it stops it (SIGTERM, bounded), removes
/// any VIP it left and its files.
pub struct Keepalived<'a> {
    _lab: std::marker::PhantomData<&'a Lab>,
    k: usize,
    ns: Netns,
    dev: &'static str,
    opts: KeepalivedOpts,
    dir: PathBuf,
    daemon: Option<Daemon>,
    /// The log of a stopped or killed daemon.
    final_log: String,
}

impl<'a> Keepalived<'a> {
    /// Writes the config and starts keepalived in LB `k`'s namespace; returns once every
    /// instance has logged its first state (bounded: 10 s), failing with the log if keepalived
    /// exits or does not get there.
    pub fn start(lab: &'a Lab, k: usize, opts: &KeepalivedOpts) -> Result<Keepalived<'a>> {
        ensure!(
            k >= 1 && k <= lab.lbs().len(),
            "LB {k} of {}",
            lab.lbs().len()
        );
        let bin = keepalived_bin()?;
        let host = lab.lb_n(k);
        let router_id = format!("{}-{}", lab.prefix(), host.name());
        let conf = config_text(&router_id, host.dev(), (host.v4(), host.v6()), opts)?;
        let dir = std::env::temp_dir().join(format!("{}-keepalived{k}", lab.prefix()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut ka = Keepalived {
            _lab: std::marker::PhantomData,
            k,
            ns: host.ns().clone(),
            dev: host.dev(),
            opts: opts.clone(),
            dir,
            daemon: None,
            final_log: String::new(),
        };
        std::fs::write(ka.conf_path(), conf)?;
        let p = |f: &str| ka.dir.join(f).display().to_string();
        let (conf, pid, vrrp, chk) = (
            p("keepalived.conf"),
            p("keepalived.pid"),
            p("vrrp.pid"),
            p("checkers.pid"),
        );
        let bin = bin.display().to_string();
        let daemon = ka.ns.spawn(
            &format!("keepalived lb{k}"),
            &[
                &bin, "-n", "-l", "-D", "-f", &conf, "-p", &pid, "-r", &vrrp, "-c", &chk,
            ],
        )?;
        ka.daemon = Some(daemon);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let d = ka.daemon.as_mut().expect("just set");
            if let Some(st) = d.exited() {
                bail!("keepalived on LB {k} exited at start ({st}):\n{}", d.log());
            }
            let log = d.log();
            if ka.instances().iter().all(|i| last_state(&log, i).is_some()) && ka.pids().1.is_some()
            {
                return Ok(ka);
            }
            if Instant::now() >= deadline {
                bail!("keepalived on LB {k} logged no VRRP state within 10 s:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The LB (1-based) it runs on.
    pub fn lb(&self) -> usize {
        self.k
    }
    pub fn opts(&self) -> &KeepalivedOpts {
        &self.opts
    }
    /// The config file it runs with.
    pub fn conf_path(&self) -> PathBuf {
        self.dir.join("keepalived.conf")
    }
    /// Its instance names (`VI_{vrid}_4`, `VI_{vrid}_6`).
    pub fn instances(&self) -> Vec<String> {
        instance_names(&self.opts)
    }

    fn read_pid(path: &Path) -> Option<u32> {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// (parent pid, VRRP child pid) from the pid files, while it runs.
    pub fn pids(&self) -> (Option<u32>, Option<u32>) {
        if self.daemon.is_none() {
            return (None, None);
        }
        (
            Self::read_pid(&self.dir.join("keepalived.pid")),
            Self::read_pid(&self.dir.join("vrrp.pid")),
        )
    }

    /// keepalived's console log so far (kept after it stopped).
    pub fn log(&self) -> String {
        match &self.daemon {
            Some(d) => d.log(),
            None => self.final_log.clone(),
        }
    }

    /// The state of the first instance, from the log (None before the first transition or once
    /// stopped).
    pub fn state(&self) -> Option<VrrpState> {
        self.daemon.as_ref()?;
        last_state(&self.log(), self.instances().first()?)
    }

    /// Is `addr` currently an address of the LB's `eth0`?
    pub fn holds_vip(&self, addr: IpAddr) -> Result<bool> {
        holds_addr(&self.ns, self.dev, addr)
    }

    /// Does it hold all its VIPs?
    pub fn holds_all_vips(&self) -> Result<bool> {
        for v in &self.opts.vips {
            if !self.holds_vip(*v)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Waits (≤ `timeout`) until it holds all its VIPs and logs MASTER for every instance.
    pub fn wait_master(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            let master = self
                .instances()
                .iter()
                .all(|i| last_state(&log, i) == Some(VrrpState::Master));
            if master && self.holds_all_vips()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "keepalived on LB {} is not master after {timeout:?}:\n{log}",
                    self.k
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (≤ `timeout`) until every instance logs `state`.
    pub fn wait_state(&self, state: VrrpState, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if self
                .instances()
                .iter()
                .all(|i| last_state(&log, i) == Some(state))
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "keepalived on LB {} is not {state:?} after {timeout:?}:\n{log}",
                    self.k
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Graceful stop: SIGTERM (keepalived sends priority-0 adverts and removes its VIPs),
    /// waits up to 5 s, then SIGKILL. Errors if it had to be killed.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut d) = self.daemon.take() else {
            return Ok(());
        };
        let st = d.stop(Duration::from_secs(5));
        self.final_log = d.log();
        let ok = st.is_some_and(|s| s.success() || s.code().is_some());
        self.remove_vips();
        if !ok {
            bail!(
                "keepalived on LB {} did not stop on SIGTERM ({st:?}):\n{}",
                self.k,
                self.final_log
            );
        }
        Ok(())
    }

    /// Crash: SIGKILL to the parent and the VRRP child at once (their process group, then
    /// any pid from the pid files still alive), then the VIPs are removed by hand (a killed
    /// keepalived leaves them, and the node would keep answering ARP for them). Returns when
    /// the SIGKILL was sent.
    pub fn kill(&mut self) -> Instant {
        let (parent, child) = self.pids();
        let Some(mut d) = self.daemon.take() else {
            return Instant::now();
        };
        let t = Instant::now();
        d.signal(libc::SIGKILL);
        for pid in [child, parent].into_iter().flatten() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "keepalived" {
                // SAFETY: kill(2) on a keepalived process this node started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        d.stop(Duration::from_secs(5));
        self.final_log = d.log();
        self.remove_vips();
        t
    }

    /// Removes the VIPs from `eth0` if present (best effort).
    fn remove_vips(&self) {
        for v in &self.opts.vips {
            if holds_addr(&self.ns, self.dev, *v).unwrap_or(false) {
                let len = if v.is_ipv4() { 32 } else { 128 };
                let _ = self
                    .ns
                    .ip(&["addr", "del", &format!("{v}/{len}"), "dev", self.dev]);
            }
        }
    }
}

/// Is `addr` an address of `dev` in `ns`?
pub fn holds_addr(ns: &Netns, dev: &str, addr: IpAddr) -> Result<bool> {
    let out = ns.ip(&["-j", "addr", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip -j addr output")?;
    Ok(v.as_array().into_iter().flatten().any(|l| {
        l["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["local"].as_str().and_then(|s| s.parse::<IpAddr>().ok()) == Some(addr))
    }))
}

impl Drop for Keepalived<'_> {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop(Duration::from_secs(5));
        }
        self.remove_vips();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl std::fmt::Debug for Keepalived<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keepalived")
            .field("lb", &self.k)
            .field("ns", &self.ns.name())
            .field("pids", &self.pids())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advert_int_as_seconds() {
        assert_eq!(advert_int_text(100), "0.1");
        assert_eq!(advert_int_text(1000), "1");
        assert_eq!(advert_int_text(250), "0.25");
        assert_eq!(advert_int_text(1500), "1.5");
        assert_eq!(advert_int_text(40950), "40.95");
    }

    #[test]
    fn state_from_log() {
        let log = "Sun Jan  1 00:00:00 2025: (VI_51_4) Entering BACKUP STATE (init)\n\
                   Sun Jan  1 00:00:01 2025: (VI_51_4) Entering MASTER STATE\n\
                   Sun Jan  1 00:00:01 2025: (VI_51_6) Entering BACKUP STATE (init)\n";
        assert_eq!(last_state(log, "VI_51_4"), Some(VrrpState::Master));
        assert_eq!(last_state(log, "VI_51_6"), Some(VrrpState::Backup));
        assert_eq!(last_state(log, "VI_52_4"), None);
        assert_eq!(last_state("", "VI_51_4"), None);
    }

    #[test]
    fn config_as_documented() {
        let o = KeepalivedOpts {
            priority: 150,
            advert_int_ms: 100,
            ..Default::default()
        };
        let own = (
            "198.18.0.2".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
        );
        let c = config_text("mx12345-lb", "eth0", own, &o).unwrap();
        assert_eq!(
            c,
            "# written by the mxlb lab for mx12345-lb\n\
             global_defs {\n    router_id mx12345-lb\n    vrrp_version 3\n}\n\n\
             vrrp_instance VI_51_4 {\n    state BACKUP\n    interface eth0\n    virtual_router_id 51\n\
             \x20   priority 150\n    advert_int 0.1\n    virtual_ipaddress {\n        198.18.0.100/32 dev eth0\n\
             \x20   }\n}\n\n"
        );
        let o = KeepalivedOpts {
            vips: vec![
                "198.18.0.100".parse().unwrap(),
                "2001:db8::100".parse().unwrap(),
            ],
            unicast_peers: vec![
                "198.18.0.3".parse().unwrap(),
                "2001:db8::3".parse().unwrap(),
            ],
            nopreempt: true,
            ..Default::default()
        };
        let c = config_text("r", "eth0", own, &o).unwrap();
        let v6 = &c[c.find("VI_51_6").unwrap()..];
        assert!(
            v6.contains(
                "unicast_src_ip 2001:db8::2\n    unicast_peer {\n        2001:db8::3\n    }"
            ),
            "{c}"
        );
        assert!(
            v6.contains("2001:db8::100/128 dev eth0") && !v6.contains("198.18.0"),
            "{c}"
        );
        let v4 = &c[..c.find("VI_51_6").unwrap()];
        assert!(
            v4.contains("unicast_src_ip 198.18.0.2")
                && v4.contains("nopreempt")
                && !v4.contains("2001:"),
            "{c}"
        );
        let rejected = |opts: KeepalivedOpts| config_text("r", "eth0", own, &opts).is_err();
        assert!(rejected(KeepalivedOpts { advert_int_ms: 105, ..Default::default() }));
        assert!(rejected(KeepalivedOpts { vips: vec![], ..Default::default() }));
        assert!(rejected(KeepalivedOpts { nopreempt: true, state_backup: false, ..Default::default() }));
    }

    #[test]
    fn instances_per_family() {
        let mut o = KeepalivedOpts::default();
        assert_eq!(instance_names(&o), ["VI_51_4"]);
        o.vips.push("2001:db8::100".parse().unwrap());
        o.vrid = 7;
        assert_eq!(instance_names(&o), ["VI_7_4", "VI_7_6"]);
    }
}
