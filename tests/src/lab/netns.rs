//! Network namespaces: running commands inside them, entering them from Rust, sysctls, links.

use crate::lab::cmd::{CMD_TIMEOUT, Daemon, LineSink, run_bounded, run_checked};
use anyhow::{Context, Result, anyhow, bail};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::time::Duration;

/// A named network namespace (`/run/netns/NAME`). This handle does not own it: the [`Lab`]
/// that created it deletes it.
///
/// [`Lab`]: crate::Lab
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    name: String,
}

/// What the lab needs to know about an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// Interface counters (`ip -s link`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn mac_to_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("bad MAC {s:?}");
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).with_context(|| format!("bad MAC {s:?}"))?;
    }
    Ok(mac)
}

impl Netns {
    /// A handle on an existing namespace (no check that it exists).
    pub fn from_name(name: impl Into<String>) -> Netns {
        Netns { name: name.into() }
    }

    /// Creates `/run/netns/NAME` (`ip netns add`), brings `lo` up and turns IPv6 DAD off for
    /// interfaces created later, so addresses are usable at once.
    pub(crate) fn create(name: &str) -> Result<Netns> {
        run_checked(Command::new("ip").args(["netns", "add", name]), CMD_TIMEOUT)?;
        let ns = Netns::from_name(name);
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME program`: a command that runs inside the namespace. Its stdio, env
    /// and arguments are the caller's to set. Prefer [`Netns::exec`]/[`Netns::spawn`], which bound it.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    fn command_args(&self, args: &[&str]) -> Result<Command> {
        let (prog, rest) = args.split_first().ok_or_else(|| anyhow!("empty command"))?;
        let mut c = self.command(prog);
        c.args(rest);
        Ok(c)
    }

    /// Runs `args` inside the namespace (20 s limit); fails unless it exits 0; returns stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        run_checked(&mut self.command_args(args)?, CMD_TIMEOUT)
            .with_context(|| format!("in netns {}", self.name))
    }

    /// Runs `args` inside the namespace, killed after `timeout`; returns its output whatever the
    /// exit status, and whether it timed out.
    pub fn exec_output(&self, args: &[&str], timeout: Duration) -> Result<(Output, bool)> {
        run_bounded(&mut self.command_args(args)?, timeout)
    }

    /// `ip -n NAME args...` (20 s limit, must succeed); returns stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut c = Command::new("ip");
        c.args(["-n", &self.name]).args(args);
        run_checked(&mut c, CMD_TIMEOUT)
    }

    /// Starts `args` inside the namespace as a guarded background process (killed on drop).
    pub fn spawn(&self, label: &str, args: &[&str]) -> Result<Daemon> {
        Daemon::spawn(label, self.command_args(args)?, None)
    }

    /// Like [`Netns::spawn`], with each stdout line handed to `lines`.
    pub fn spawn_with_stdout(&self, label: &str, args: &[&str], lines: LineSink) -> Result<Daemon> {
        Daemon::spawn(label, self.command_args(args)?, Some(lines))
    }

    /// Writes a sysctl (`net.ipv4.conf.all.rp_filter`, ...) inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let v = value.to_string();
        self.run(move || std::fs::write(&path, v))?
            .with_context(|| format!("sysctl {key}={value} in netns {}", self.name))
    }

    /// Reads a sysctl inside the namespace.
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        Ok(self
            .run(move || std::fs::read_to_string(&path))??
            .trim()
            .to_string())
    }

    /// Runs `f` on a fresh thread that has joined this namespace (the calling thread is not
    /// touched). Sockets opened there stay in the namespace; use it for TCP probes, reading
    /// `/proc/thread-self/net/...`, or loading/attaching BPF programs by ifindex.
    pub fn run<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> Result<R> {
        let file = self.open()?;
        std::thread::scope(|s| {
            s.spawn(move || -> Result<R> {
                setns(&file)?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow!("thread in netns {} panicked", self.name))?
        })
    }

    /// Moves the CURRENT thread into this namespace until the guard drops (then back).
    /// The guard cannot leave the thread.
    pub fn enter(&self) -> Result<NetnsGuard> {
        let back =
            File::open("/proc/thread-self/ns/net").context("open /proc/thread-self/ns/net")?;
        setns(&self.open()?)?;
        Ok(NetnsGuard {
            back,
            _not_send: std::marker::PhantomData,
        })
    }

    fn open(&self) -> Result<File> {
        File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("netns {} not found", self.name))
    }

    /// Index, MAC and MTU of interface `dev`.
    pub fn link(&self, dev: &str) -> Result<LinkInfo> {
        let out = self.ip(&["-j", "link", "show", "dev", dev])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("ip -j link output")?;
        let l = v
            .get(0)
            .ok_or_else(|| anyhow!("no link {dev} in {}", self.name))?;
        Ok(LinkInfo {
            name: dev.to_string(),
            ifindex: l["ifindex"].as_u64().ok_or_else(|| anyhow!("no ifindex"))? as u32,
            mac: parse_mac(l["address"].as_str().unwrap_or(""))?,
            mtu: l["mtu"].as_u64().unwrap_or(0) as u32,
        })
    }

    /// Packet/byte counters of `dev`.
    pub fn link_stats(&self, dev: &str) -> Result<LinkStats> {
        let out = self.ip(&["-s", "-j", "link", "show", "dev", dev])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("ip -s -j link output")?;
        let s = &v[0]["stats64"];
        let n = |dir: &str, k: &str| s[dir][k].as_u64().unwrap_or(0);
        Ok(LinkStats {
            rx_packets: n("rx", "packets"),
            rx_bytes: n("rx", "bytes"),
            rx_dropped: n("rx", "dropped"),
            tx_packets: n("tx", "packets"),
            tx_bytes: n("tx", "bytes"),
            tx_dropped: n("tx", "dropped"),
        })
    }

    /// `ethtool -K dev feature on|off ...` inside the namespace.
    pub fn ethtool_k(&self, dev: &str, settings: &[&str]) -> Result<()> {
        let mut args = vec!["ethtool", "-K", dev];
        args.extend_from_slice(settings);
        self.exec(&args).map(|_| ())
    }
}

fn setns(file: &File) -> Result<()> {
    // SAFETY: setns(2) on a valid namespace fd; only affects the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Returned by [`Netns::enter`]: puts the thread back into its previous namespace on drop.
pub struct NetnsGuard {
    back: File,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.back) {
            // A thread stuck in a lab namespace would poison later work on it: fail loudly.
            if !std::thread::panicking() {
                panic!("cannot return to the previous network namespace: {e}");
            }
        }
    }
}

/// Names of all namespaces in `/run/netns` that start with `prefix`.
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

/// Deletes a namespace (`ip netns del`), best effort: processes still inside keep it alive
/// anonymously, but the lab kills its processes first.
pub(crate) fn delete(name: &str) {
    let _ = run_bounded(Command::new("ip").args(["netns", "del", name]), CMD_TIMEOUT);
}

/// `ip args...` in the root namespace (20 s limit, must succeed). The lab uses it only for
/// commands that name their target namespaces (`ip link add ... netns X ... peer ... netns Y`).
pub(crate) fn run_ip(args: &[&str]) -> Result<String> {
    run_checked(Command::new("ip").args(args), CMD_TIMEOUT)
}
