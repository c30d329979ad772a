//! An mxlb LB node inside a [`Lab`]: writes its config, attaches the helpers the topology
//! needs (XDP_PASS on the LB's bridge port, `mxlb decap` on dsr-ipip back-ends), runs
//! `mxlb run` in the LB namespace and drives the CLI there, exactly as an operator would.
//! Shared by the end-to-end tests, `cargo xtask run` and the benchmarks.
//!
//! A lab with several LBs ([`LabBuilder::lbs`](crate::LabBuilder::lbs)) can run one node per
//! LB ([`NodeOpts::lb`] or [`MxlbNode::start_on`]). Everything of a node is its own: config
//! dir `/tmp/{prefix}-mxlb` for LB 1 and `/tmp/{prefix}-mxlb{k}` for LB k ≥ 2 (state dir and
//! control socket inside), bpffs dir `/sys/fs/bpf/{prefix}-mxlb[k]`, the PASS program on that
//! LB's bridge port, `[node] interfaces` and the encapsulation sources from that LB. The decap
//! helper on the back-ends is per back-end, not per LB: the lab counts the dsr-ipip nodes that
//! need it, the first one started attaches it and the last one dropped detaches it, in whatever
//! order they start and stop.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use lab::node::{MxlbNode, NodeOpts};
//! let lab = lab::Lab::builder().lbs(2).vip_by_arp().build()?;
//! let vrrp = "[vrrp]\n...".to_string(); // the VRRP settings, per node
//! let n1 = MxlbNode::start_on(&lab, 1, NodeOpts { extra: Some(vrrp.clone()), ..Default::default() })?;
//! let n2 = MxlbNode::start_on(&lab, 2, NodeOpts { extra: Some(vrrp), ..Default::default() })?;
//! assert_eq!(n2.lb().v4().to_string(), "198.18.0.3");
//! # Ok(()) }
//! ```
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{AddrFamily, Daemon, Host, Lab, run_checked};

/// Path of the `mxlb` binary next to the running test or tool (target/<profile>/mxlb).
///
/// Under cargo (`$CARGO` set, as in `cargo test`), it is built once per process first, so a
/// test never runs a stale agent (`cargo test -p mxlb-tests` alone would not rebuild it).
/// `cargo xtask run/bench` build it before starting `mxlb-lab`.
pub fn mxlb_bin() -> Result<PathBuf> {
    workspace_bin("lb-userspace", "mxlb", false)
}

/// Path of binary `bin` of workspace package `package`, in the profile of the running test or
/// tool (or in release when `release`), built once per process first when run under cargo.
pub fn workspace_bin(package: &str, bin: &str, release: bool) -> Result<PathBuf> {
    type Built = std::collections::HashMap<(String, bool), std::result::Result<PathBuf, String>>;
    static BUILT: std::sync::Mutex<Option<Built>> = std::sync::Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    built
        .get_or_insert_with(Default::default)
        .entry((format!("{package}/{bin}"), release))
        .or_insert_with(|| locate_and_build(package, bin, release).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

fn locate_and_build(package: &str, name: &str, release: bool) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let mut dir = exe.parent().context("exe dir")?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let release = release || dir.ends_with("release");
    if release && !dir.ends_with("release") {
        dir = dir.parent().context("target dir")?.join("release");
    }
    let bin = dir.join(name);
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut c = Command::new(cargo);
        c.args(["build", "--quiet", "-p", package, "--bin", name]);
        if release {
            c.arg("--release");
        }
        // The variables cargo sets for this test's own crate would leak into build scripts of
        // the nested build (ring's reruns when they change), rebuilding half the tree each
        // time `cargo test` and a plain build take turns.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR"]
                .iter()
                .any(|p| k.starts_with(p))
            {
                c.env_remove(k.as_ref());
            }
        }
        let out = c.output().with_context(|| format!("building {name}"))?;
        if !out.status.success() {
            bail!("building {name} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        }
    }
    if !bin.exists() {
        bail!("{} is missing: run `cargo build{} -p {package}`", bin.display(), if release { " --release" } else { "" });
    }
    Ok(bin)
}

/// Forwarding mode of the lab's VIPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    DsrL2,
    DsrIpip,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::DsrL2 => "dsr-l2",
            Mode::DsrIpip => "dsr-ipip",
        }
    }
}

/// Options for [`MxlbNode::start`].
#[derive(Debug, Clone)]
pub struct NodeOpts {
    pub mode: Mode,
    /// Weight per back-end (index 0 = back-end 1); missing entries get 100.
    pub weights: Vec<u32>,
    /// SMTP ports of the VIPs `mx` and `mx6`; empty: no such VIPs (e.g. a relay-only node).
    pub ports: Vec<u16>,
    /// `auto`, `native` or `generic`.
    pub xdp_mode: String,
    /// Body of a `[health]` section (e.g. `interval_ms = 100`), if any.
    pub health: Option<String>,
    /// `agent_port` of the IPv4 back-ends (where `mxlb agent` listens on them), if any.
    pub agent_port: Option<u16>,
    /// `[node] metrics_listen`, if any (e.g. the LB's address and a port).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The VIPs' `check` (default: by port).
    pub check: Option<String>,
    /// TOML appended to the config (e.g. `[[client_group]]` tables, VRRP settings).
    pub extra: Option<String>,
    /// Which LB node (1-based) runs this agent; default 1.
    pub lb: usize,
}

impl Default for NodeOpts {
    fn default() -> Self {
        NodeOpts { mode: Mode::DsrL2, weights: vec![], ports: vec![25], xdp_mode: "native".into(), health: None, agent_port: None, metrics_listen: None, check: None, extra: None, lb: 1 }
    }
}

/// An `mxlb run` on one of the lab's LB nodes ([`NodeOpts::lb`], default LB 1). Dropped before
/// the lab (declare it after the lab): it stops the agent, detaches the helpers and removes its
/// pinned maps and state.
pub struct MxlbNode<'a> {
    lab: &'a Lab,
    bin: PathBuf,
    pub opts: NodeOpts,
    /// Config file, state dir and socket live here.
    dir: PathBuf,
    pub config_path: PathBuf,
    pub bpffs_dir: PathBuf,
    daemon: Option<Daemon>,
    /// The LB (1-based) this node runs on, fixed at start (`opts.lb` may be changed later).
    k: usize,
    /// Counted as a user of the back-ends' decap helper (see the module docs).
    decap_attached: bool,
    pass_attached: bool,
}

impl<'a> MxlbNode<'a> {
    /// Writes the config, attaches the helpers and starts the agent; returns once the agent
    /// answers on its control socket.
    pub fn start(lab: &'a Lab, opts: NodeOpts) -> Result<MxlbNode<'a>> {
        let k = opts.lb;
        anyhow::ensure!(
            k >= 1 && k <= lab.lbs().len(),
            "NodeOpts.lb = {k}, but the lab has {} LB node(s)",
            lab.lbs().len()
        );
        let bin = mxlb_bin()?;
        // LB 1 keeps the names it had before there were several LBs. bpffs names may not
        // contain '.', so the LB number, not its address, tells nodes apart.
        let name = if k == 1 { format!("{}-mxlb", lab.prefix()) } else { format!("{}-mxlb{k}", lab.prefix()) };
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir)?;
        let bpffs_dir = PathBuf::from(format!("/sys/fs/bpf/{name}"));
        let mut node = MxlbNode {
            lab,
            bin,
            opts,
            config_path: dir.join("mxlb.toml"),
            dir,
            bpffs_dir,
            daemon: None,
            k,
            decap_attached: false,
            pass_attached: false,
        };
        std::fs::write(&node.config_path, node.config_text())?;
        // Native XDP_TX on a veth delivers only when the peer runs a native XDP program.
        let peer = lab.lb_peer_port_of(k)?;
        node.helper_in(&peer.ns, &["pass", "attach", &peer.name, "--mode", "native"])?;
        node.pass_attached = true;
        if node.opts.mode == Mode::DsrIpip {
            // Counted first, so a failure half-way still releases (and detaches) on drop.
            node.decap_attached = true;
            if lab.decap_acquire() {
                for b in lab.backends() {
                    node.helper_in(b.ns(), &["decap", "attach", b.dev(), "--mode", "native"])?;
                }
            }
        }
        node.launch()?;
        Ok(node)
    }

    /// [`MxlbNode::start`] on LB `k` (1-based): `opts.lb` is set to `k`.
    pub fn start_on(lab: &'a Lab, k: usize, mut opts: NodeOpts) -> Result<MxlbNode<'a>> {
        opts.lb = k;
        MxlbNode::start(lab, opts)
    }

    /// The LB host this node runs on.
    pub fn lb(&self) -> &'a Host {
        self.lab.lb_n(self.k)
    }

    /// Process id of the running `mxlb run` (None when stopped or killed). It runs in its own
    /// process group, so this is also the group id.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Daemon::pid)
    }

    /// The config this node runs with: VIP `mx` (IPv4) over back-ends `b1..bN` at their IPv4
    /// addresses, and VIP `mx6` (IPv6) over `b1v6..bNv6`, the same hosts at their IPv6 addresses
    /// (so dsr-ipip uses IPv4 and IPv6 outer headers respectively).
    pub fn config_text(&self) -> String {
        let lab = self.lab;
        let ports = self.opts.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
        let n = lab.backends().len();
        let list = |suffix: &str| (1..=n).map(|i| format!("\"b{i}{suffix}\"")).collect::<Vec<_>>().join(", ");
        let mut s = format!(
            "[node]\ninterfaces = [\"{dev}\"]\nxdp_mode = \"{xdp}\"\nbpffs_dir = \"{bpffs}\"\nstate_dir = \"{state}\"\n\
             control_socket = \"{sock}\"\nconntrack_size = 65536\nencap_source_v4 = \"{src4}\"\nencap_source_v6 = \"{src6}\"\n\n",
            dev = self.lb().dev(),
            xdp = self.opts.xdp_mode,
            bpffs = self.bpffs_dir.display(),
            state = self.dir.join("state").display(),
            sock = self.socket().display(),
            src4 = self.lb().v4(),
            src6 = self.lb().v6(),
        );
        if let Some(m) = self.opts.metrics_listen {
            s += &format!("metrics_listen = \"{m}\"\n\n");
        }
        if let Some(h) = &self.opts.health {
            s += &format!("[health]\n{h}\n\n");
        }
        // No ports: no balanced VIPs (a node that only runs the relay on a `local` VIP).
        let balanced: &[(&str, AddrFamily, &str)] =
            if self.opts.ports.is_empty() { &[] } else { &[("mx", AddrFamily::V4, ""), ("mx6", AddrFamily::V6, "v6")] };
        for &(name, fam, suffix) in balanced {
            s += &format!(
                "[[vip]]\nname = \"{name}\"\naddress = \"{}\"\nports = [{ports}]\nmode = \"{}\"\nbackends = [{}]\n{}\n",
                lab.vip(fam),
                self.opts.mode.as_str(),
                list(suffix),
                self.opts.check.as_ref().map(|c| format!("check = \"{c}\"\n")).unwrap_or_default()
            );
        }
        for (fam, suffix) in [(AddrFamily::V4, ""), (AddrFamily::V6, "v6")] {
            for (i, b) in lab.backends().iter().enumerate() {
                let w = self.opts.weights.get(i).copied().unwrap_or(100);
                s += &format!("[[backend]]\nname = \"b{}{suffix}\"\naddress = \"{}\"\nweight = {w}\n", i + 1, b.addr(fam));
                if let (Some(port), AddrFamily::V4) = (self.opts.agent_port, fam) {
                    s += &format!("agent_port = {port}\n");
                }
                s += "\n";
            }
        }
        if let Some(extra) = &self.opts.extra {
            s += extra;
            s += "\n";
        }
        s
    }

    /// Name of back-end `i` (1-based) in the pool of the VIP of `fam`.
    pub fn backend_name(fam: AddrFamily, i: usize) -> String {
        match fam {
            AddrFamily::V4 => format!("b{i}"),
            AddrFamily::V6 => format!("b{i}v6"),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("mxlb.sock")
    }

    /// `mxlb --netns NS`: mxlb enters the network namespace itself, keeping the host's
    /// /sys/fs/bpf (`ip netns exec` would give it a private /sys, and its pins would vanish).
    fn mxlb_in(&self, ns: &crate::Netns) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--netns").arg(ns.name());
        c
    }

    fn helper_in(&self, ns: &crate::Netns, args: &[&str]) -> Result<String> {
        let mut c = self.mxlb_in(ns);
        c.args(args);
        run_checked(&mut c, Duration::from_secs(30))
    }

    /// Starts `mxlb run` and waits until it serves the CLI (bounded).
    pub fn launch(&mut self) -> Result<()> {
        self.launch_with(&[])
    }

    /// Starts `mxlb run` with extra arguments (e.g. `--keep-attached`).
    pub fn launch_with(&mut self, extra: &[&str]) -> Result<()> {
        let mut cmd = self.mxlb_in(self.lb().ns());
        cmd.arg("--config").arg(&self.config_path).arg("run").args(extra);
        let mut daemon = Daemon::spawn(&format!("mxlb run on {}", self.lb().name()), cmd, None)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = daemon.exited() {
                bail!("mxlb run exited ({st}):\n{}", daemon.log());
            }
            if self.socket().exists() && daemon.log().contains("mxlb running") {
                break;
            }
            if Instant::now() > deadline {
                bail!("mxlb run did not come up within 30 s:\n{}", daemon.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.daemon = Some(daemon);
        Ok(())
    }

    /// Runs `mxlb --config CFG args...` in this node's LB namespace; fails unless it exits 0.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let mut c = self.mxlb_in(self.lb().ns());
        c.arg("--config").arg(&self.config_path).args(args);
        run_checked(&mut c, Duration::from_secs(30))
    }

    /// Runs the CLI and returns (success, stdout, stderr) without failing on a non-zero exit.
    pub fn cli_output(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let mut c = self.mxlb_in(self.lb().ns());
        c.arg("--config").arg(&self.config_path).args(args);
        let (out, timed_out) = crate::run_bounded(&mut c, Duration::from_secs(30))?;
        if timed_out {
            bail!("mxlb {args:?} timed out");
        }
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// `backend list --json`, parsed.
    pub fn backends_json(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.cli(&["backend", "list", "--json"])?)?)
    }

    /// The agent's output so far.
    pub fn log(&self) -> String {
        self.daemon.as_ref().map(|d| d.log()).unwrap_or_default()
    }

    /// SIGTERM and wait: the agent detaches (unless started with `--keep-attached`).
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut d) = self.daemon.take() {
            let st = d.stop(Duration::from_secs(10));
            if !st.is_some_and(|s| s.success()) {
                bail!("mxlb run did not exit cleanly ({st:?}):\n{}", d.log());
            }
        }
        Ok(())
    }

    /// SIGKILL: the agent dies without cleaning up (a crash).
    pub fn kill(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.signal(libc::SIGKILL);
            drop(d);
        }
    }

    /// Whether an XDP program is attached to this node's LB interface.
    pub fn xdp_attached(&self) -> Result<bool> {
        let out = self.lb().ns().ip(&["-d", "link", "show", "dev", self.lb().dev()])?;
        Ok(out.contains("xdp") || out.contains("prog/xdp"))
    }

    pub fn backend_addr(&self, fam: AddrFamily, i: usize) -> IpAddr {
        self.lab.backend(i).addr(fam)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for MxlbNode<'_> {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop(Duration::from_secs(5));
        }
        if self.pass_attached
            && let Ok(peer) = self.lab.lb_peer_port_of(self.k)
        {
            let _ = self.helper_in(&peer.ns, &["pass", "detach", &peer.name]);
        }
        // Only the last node that needed the decap helper removes it.
        if self.decap_attached && self.lab.decap_release() {
            for b in self.lab.backends() {
                let _ = self.helper_in(b.ns(), &["decap", "detach", b.dev()]);
            }
        }
        // A killed agent leaves its links pinned: remove them so the interface is released.
        let _ = std::fs::remove_dir_all(&self.bpffs_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
