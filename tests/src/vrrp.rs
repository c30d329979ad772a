//! VRRP on lab nodes: the `[[vrrp]]` TOML an [`MxlbNode`] runs with, and its VRRP state as
//! `mxlb status --json` reports it.
use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use mxlb::vrrp::{InstanceStatus, instance::State};

use crate::node::MxlbNode;

/// One `[[vrrp]]` instance (defaults: VRID 51 holding VIP `mx`, priority 100, 100 ms adverts).
#[derive(Debug, Clone)]
pub struct VrrpOpts {
    pub name: String,
    pub vrid: u8,
    pub priority: u8,
    pub advert_ms: u32,
    pub preempt: bool,
    pub preempt_delay_ms: u64,
    /// `[[vip]]` names (the node's config has `mx`, IPv4, and `mx6`, IPv6).
    pub vips: Vec<String>,
    pub unicast_peers: Vec<IpAddr>,
    /// More lines for the table (`track_interface = [...]`, `notify = "..."`).
    pub extra: String,
}

impl Default for VrrpOpts {
    fn default() -> Self {
        VrrpOpts {
            name: "smtp".into(),
            vrid: 51,
            priority: 100,
            advert_ms: 100,
            preempt: true,
            preempt_delay_ms: 0,
            vips: vec!["mx".into()],
            unicast_peers: Vec::new(),
            extra: String::new(),
        }
    }
}

impl VrrpOpts {
    pub fn toml(&self) -> String {
        let list = |v: Vec<String>| v.join(", ");
        format!(
            "[[vrrp]]\nname = \"{}\"\nvrid = {}\npriority = {}\nadvert_interval_ms = {}\npreempt = {}\npreempt_delay_ms = {}\nvips = [{}]\nunicast_peers = [{}]\n{}\n",
            self.name,
            self.vrid,
            self.priority,
            self.advert_ms,
            self.preempt,
            self.preempt_delay_ms,
            list(self.vips.iter().map(|v| format!("\"{v}\"")).collect()),
            list(self.unicast_peers.iter().map(|p| format!("\"{p}\"")).collect()),
            self.extra
        )
    }
}

/// The node's VRRP instances, from `mxlb status --json`.
pub fn vrrp_status(node: &MxlbNode) -> Result<Vec<InstanceStatus>> {
    let out = node.cli(&["status", "--json"])?;
    let st: mxlb::metrics::Status = serde_json::from_str(&out).context("status JSON")?;
    Ok(st.vrrp)
}

/// The state of instance `name` on `node`.
pub fn vrrp_state(node: &MxlbNode, name: &str) -> Result<State> {
    vrrp_status(node)?
        .into_iter()
        .find(|i| i.name == name)
        .map(|i| i.state)
        .with_context(|| format!("no VRRP instance `{name}`"))
}

/// Waits (bounded) until instance `name` on `node` is in `state`; returns how long it took.
pub fn wait_vrrp(node: &MxlbNode, name: &str, state: State, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let now = vrrp_state(node, name)?;
        if now == state {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("VRRP `{name}` on {} is {now:?}, not {state:?}, after {timeout:?}\n{}", node.lb().name(), node.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (bounded) until every back-end of `node` is up in its data path: a node just started
/// may not have resolved every back-end's MAC yet (they are held down until it has), and a test
/// that makes it master at once would see its VIP shed.
pub fn wait_backends_up(node: &MxlbNode, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let json = node.backends_json()?;
        let states: Vec<String> = json
            .as_array()
            .map(|a| a.iter().map(|b| b["state"].as_str().unwrap_or("?").to_string()).collect())
            .unwrap_or_default();
        if !states.is_empty() && states.iter().all(|s| s == "up") {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("back-ends of {} not all up after {timeout:?}: {states:?}", node.lb().name());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
