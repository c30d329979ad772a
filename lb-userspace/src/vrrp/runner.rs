//! VRRP inside `mxlb run`: one task that owns every instance of this node, their sockets and
//! timers, and carries out what the state machines ([`super::instance`]) decide.
//!
//! - **Receiving**: one socket per (interface, family), read by its own task; a message is
//!   checked with the settings of the instance its VRID byte names ([`super::packet`]), and
//!   dropped, counted by reason, when it fails (or names no instance here).
//! - **Becoming master**: advertise, put the VIPs in the data path (the controller, the one map
//!   writer), add the addresses to the interface, then announce them: `garp_repeat` gratuitous
//!   ARPs / unsolicited NAs at once, as many again 5 s later, and one every `garp_refresh_ms`.
//!   The data path is enabled first so the first packet the announcement attracts is balanced.
//! - **Leaving master**: the reverse (standby in the data path, addresses removed).
//! - **Tracking** (every 100 ms): interfaces' link state and VIPs' healthy back-end counts set
//!   each instance's priority or FAULT; in a sync group the adjustments add up and any member's
//!   FAULT is the group's.
//! - **Sync groups**: one member's change to MASTER or BACKUP is followed by the others.
//! - **Notify hooks**: `COMMAND INSTANCE NAME STATE PRIORITY` (and `GROUP NAME STATE 0`), run in
//!   the background; their exit status is logged.
//! - **Shutdown**: a master sends priority 0, releases its VIPs, then the task returns.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use tokio::{
    sync::{Mutex, mpsc, watch},
    task::JoinHandle,
    time::Instant,
};
use tracing::{debug, info, warn};

use super::{
    InstanceStatus,
    announce,
    instance::{Action, Instance, Settings, State},
    packet::{Advert, Checksum, MULTICAST_V4, MULTICAST_V6},
    socket::{self, Received, VrrpSocket},
};
use crate::{
    config::{Config, VrrpChecksum, VrrpInstanceConfig},
    control::Controller,
};

/// How often tracked interfaces and back-end pools are looked at.
const TRACK_EVERY: Duration = Duration::from_millis(100);
/// The second burst of announcements after becoming master (keepalived's garp_master_delay).
const SECOND_BURST: Duration = Duration::from_secs(5);
/// Spacing of the announcements in one burst.
const BURST_SPACING: Duration = Duration::from_millis(10);

/// Why VRRP could not start.
#[derive(Debug, thiserror::Error)]
pub enum VrrpError {
    #[error("vrrp `{instance}`: {message}")]
    Setup { instance: String, message: String },
    #[error(transparent)]
    Socket(#[from] socket::SocketError),
    #[error("vrrp thread: {0}")]
    Thread(String),
}

/// Starts VRRP on a thread of its own, with its own single-threaded runtime, so that its timers
/// and answers are never held up by health probes, agent queries or status requests on the
/// main runtime (on a 2-core node they cost tens of milliseconds of takeover jitter). Returns
/// once the instances are set up, or why they could not be; the thread ends after `stop`.
pub async fn start(config: Config, controller: Arc<Mutex<Controller>>, stop: watch::Receiver<bool>) -> Result<std::thread::JoinHandle<()>, VrrpError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("mxlb-vrrp".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(VrrpError::Thread(format!("runtime: {e}"))));
                    return;
                }
            };
            rt.block_on(async move {
                match setup(&config, controller).await {
                    Ok(vrrp) => {
                        let _ = tx.send(Ok(()));
                        vrrp.run(stop).await
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        })
        .map_err(|e| VrrpError::Thread(e.to_string()))?;
    rx.await.map_err(|_| VrrpError::Thread("ended during set-up".into()))??;
    Ok(thread)
}

/// One instance with what it needs at run time.
struct Member {
    cfg: VrrpInstanceConfig,
    iface: String,
    v6: bool,
    checksum: Checksum,
    primary: IpAddr,
    addrs: Vec<IpAddr>,
    /// Index into the socket list.
    socket: usize,
    group: Option<usize>,
    sm: Instance,
    status: InstanceStatus,
    /// The announcement bursts of the current mastership (aborted on leaving it).
    announcer: Option<JoinHandle<()>>,
    next_refresh: Option<Instant>,
    /// Own failing tracks: (priority adjustment, fault, descriptions).
    track: (i32, bool, Vec<String>),
    warned_addrs: BTreeSet<IpAddr>,
}

/// What tracking looks at, read once per round.
#[derive(Debug, Default, Clone)]
pub struct TrackInputs {
    /// Interface → link up.
    pub links: BTreeMap<String, bool>,
    /// VIP name → healthy back-ends.
    pub healthy: BTreeMap<String, usize>,
}

/// keepalived's track semantics for one instance: (priority adjustment, FAULT, failing tracks).
/// A failing track with weight 0 means FAULT; a negative weight is subtracted while it fails; a
/// positive one is added while it holds.
pub fn evaluate_tracks(cfg: &VrrpInstanceConfig, inputs: &TrackInputs) -> (i32, bool, Vec<String>) {
    let mut adj = 0;
    let mut fault = false;
    let mut failing = Vec::new();
    let checks = cfg
        .track_interface
        .iter()
        .map(|t| (t.weight, inputs.links.get(&t.name).copied().unwrap_or(false), format!("interface {} down", t.name)))
        .chain(cfg.track_backends.iter().map(|t| {
            let n = inputs.healthy.get(&t.vip).copied().unwrap_or(0);
            (t.weight, n >= t.need as usize, format!("{} has {n} healthy back-ends, needs {}", t.vip, t.need))
        }));
    for (weight, ok, why) in checks {
        match (ok, weight) {
            (false, 0) => {
                fault = true;
                failing.push(why);
            }
            (false, w) if w < 0 => {
                adj += w;
                failing.push(why);
            }
            (false, _) => failing.push(why),
            (true, w) if w > 0 => adj += w,
            (true, _) => {}
        }
    }
    (adj, fault, failing)
}

/// Effective priority from the configured one and the adjustment, within 1-254 (the owner's
/// 255 is kept by the state machine).
pub fn effective_priority(configured: u8, adj: i32) -> u8 {
    (configured as i32 + adj).clamp(1, 254) as u8
}

/// The VRRP instances of this node, set up and ready to run.
pub struct Vrrp {
    node: Node,
}

/// Prepares every `[[vrrp]]` instance of `config`: removes VIP addresses an earlier run left
/// behind, finds each interface's source address, opens the sockets. Errors here stop
/// `mxlb run` before it serves anything (a node that cannot take part in VRRP must say so).
pub async fn setup(config: &Config, controller: Arc<Mutex<Controller>>) -> Result<Vrrp, VrrpError> {
    let mut sockets: Vec<Arc<VrrpSocket>> = Vec::new();
    let mut socket_keys: Vec<(String, bool)> = Vec::new();
    let mut members = Vec::new();
    for cfg in &config.vrrp {
        let iface = cfg.interface(&config.node).to_string();
        let setup = |message: String| VrrpError::Setup { instance: cfg.name.clone(), message };
        let addrs: Vec<IpAddr> = cfg.vips.iter().filter_map(|v| config.vip(v)).map(|v| v.address).collect();
        let v6 = addrs.first().is_some_and(IpAddr::is_ipv6);
        // Addresses left by an earlier run that died as master: this node starts as backup.
        for a in &addrs {
            announce::remove_address(&iface, *a).await.map_err(|e| setup(e.to_string()))?;
        }
        let primary: IpAddr = if v6 {
            socket::link_local_v6(&iface)
                .await?
                .ok_or_else(|| setup(format!("{iface} has no link-local IPv6 address to advertise from")))?
                .into()
        } else {
            crate::neighbours::interface_addresses(&iface)
                .await
                .map_err(|e| setup(e.to_string()))?
                .0
                .ok_or_else(|| setup(format!("{iface} has no IPv4 address to advertise from")))?
                .into()
        };
        let key = (iface.clone(), v6);
        let socket = match socket_keys.iter().position(|k| *k == key) {
            Some(i) => i,
            None => {
                sockets.push(Arc::new(VrrpSocket::open(&iface, v6)?));
                socket_keys.push(key);
                sockets.len() - 1
            }
        };
        let group = config.vrrp_sync_groups.iter().position(|g| g.instances.contains(&cfg.name));
        let settings = Settings {
            vrid: cfg.vrid,
            priority: cfg.priority,
            adver_cs: (cfg.advert_interval_ms / 10) as u16,
            preempt: cfg.preempt,
            preempt_delay: Duration::from_millis(cfg.preempt_delay_ms),
            primary,
        };
        let status = InstanceStatus {
            name: cfg.name.clone(),
            vrid: cfg.vrid,
            interface: iface.clone(),
            family: if v6 { "ipv6" } else { "ipv4" }.into(),
            state: State::Init,
            priority: cfg.priority,
            configured_priority: cfg.priority,
            master: None,
            addresses: addrs.clone(),
            sync_group: group.map(|g| config.vrrp_sync_groups[g].name.clone()),
            failing_tracks: Vec::new(),
            transitions: 0,
            became_master: 0,
            adverts_sent: 0,
            adverts_received: 0,
            dropped: BTreeMap::new(),
        };
        members.push(Member {
            checksum: match cfg.checksum {
                VrrpChecksum::PseudoHeader => Checksum::WithPseudoHeader,
                VrrpChecksum::NoPseudoHeader => Checksum::WithoutPseudoHeader,
            },
            cfg: cfg.clone(),
            iface,
            v6,
            primary,
            addrs,
            socket,
            group,
            sm: Instance::new(settings, Instant::now().into_std()),
            status,
            announcer: None,
            next_refresh: None,
            track: (0, false, Vec::new()),
            warned_addrs: BTreeSet::new(),
        });
    }
    let board = controller.lock().await.vrrp_board();
    let node = Node { members, sockets, controller, board, groups: config.vrrp_sync_groups.iter().map(|g| (g.name.clone(), g.notify.clone())).collect() };
    Ok(Vrrp { node })
}

impl Vrrp {
    /// Runs the instances until `stop` turns true, then hands the VIPs over (priority 0) and
    /// returns. Returns at once when there are none.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        if !self.node.members.is_empty() {
            run(self.node, stop).await
        }
    }
}

async fn run(mut node: Node, mut stop: watch::Receiver<bool>) {
    for m in &node.members {
        info!(instance = %m.cfg.name, vrid = m.cfg.vrid, iface = %m.iface, priority = m.cfg.priority, source = %m.primary, "vrrp instance starting");
    }

    // Receivers: one task per socket into one channel.
    let (tx, mut rx) = mpsc::channel::<(usize, Received)>(1024);
    let mut receivers = Vec::new();
    for (i, s) in node.sockets.iter().enumerate() {
        let (s, tx) = (s.clone(), tx.clone());
        receivers.push(tokio::spawn(async move {
            loop {
                match s.recv().await {
                    Ok(r) => {
                        if tx.send((i, r)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "vrrp receive");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }

    // Tracking before the start, so a node that is already faulty does not start as master.
    node.track().await;
    let now = Instant::now();
    for i in 0..node.members.len() {
        let actions = node.members[i].sm.start(now.into_std());
        node.execute(i, actions, true).await;
    }
    node.publish_status();

    let mut track_tick = tokio::time::interval(TRACK_EVERY);
    track_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let deadline = node.next_deadline();
        tokio::select! {
            changed = stop.changed() => if changed.is_err() || *stop.borrow() { break },
            Some((sock, r)) = rx.recv() => node.receive(sock, r).await,
            _ = sleep_until(deadline) => node.on_timers().await,
            _ = track_tick.tick() => node.track().await,
        }
        node.publish_status();
    }
    info!("vrrp stopping: handing the VIPs over");
    let now = Instant::now().into_std();
    for i in 0..node.members.len() {
        let actions = node.members[i].sm.shutdown(now);
        node.execute(i, actions, false).await;
    }
    node.publish_status();
    for r in receivers {
        r.abort();
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

struct Node {
    members: Vec<Member>,
    sockets: Vec<Arc<VrrpSocket>>,
    controller: Arc<Mutex<Controller>>,
    board: super::StatusBoard,
    /// Sync groups: name and notify hook.
    groups: Vec<(String, Option<PathBuf>)>,
}

impl Node {
    fn next_deadline(&self) -> Option<Instant> {
        self.members
            .iter()
            .flat_map(|m| [m.sm.deadline().map(Instant::from_std), if m.sm.state() == State::Master { m.next_refresh } else { None }])
            .flatten()
            .min()
    }

    async fn on_timers(&mut self) {
        let now = Instant::now();
        for i in 0..self.members.len() {
            let actions = self.members[i].sm.on_timer(now.into_std());
            self.execute(i, actions, true).await;
            let m = &mut self.members[i];
            if m.sm.state() == State::Master && m.next_refresh.is_some_and(|t| now >= t) {
                m.next_refresh = refresh_after(&m.cfg, now);
                spawn_announce(&m.iface, &m.addrs, 1);
            }
        }
    }

    async fn receive(&mut self, sock: usize, r: Received) {
        let now = Instant::now().into_std();
        // The VRID byte picks whose settings check the message; a message too short to have
        // one, or for a VRID we do not run, is counted against every instance on the socket.
        let vrid = r.msg.get(1).copied();
        let Some(i) = self.members.iter().position(|m| m.socket == sock && Some(m.cfg.vrid) == vrid) else {
            for m in self.members.iter_mut().filter(|m| m.socket == sock) {
                let why = if vrid.is_none() { "short" } else { "unknown_vrid" };
                *m.status.dropped.entry(why.into()).or_default() += 1;
            }
            debug!(src = %r.src, ?vrid, "vrrp advertisement for no instance here");
            return;
        };
        let m = &mut self.members[i];
        if !m.cfg.unicast_peers.is_empty() && !m.cfg.unicast_peers.contains(&r.src) {
            *m.status.dropped.entry("unknown_peer".into()).or_default() += 1;
            return;
        }
        let advert = match Advert::decode(&r.msg, r.src, r.dst, r.ttl, m.checksum) {
            Ok(a) => a,
            Err(why) => {
                *m.status.dropped.entry(why.name().into()).or_default() += 1;
                debug!(instance = %m.cfg.name, src = %r.src, %why, "vrrp advertisement dropped");
                return;
            }
        };
        m.status.adverts_received += 1;
        let mut theirs = advert.addrs.clone();
        theirs.sort();
        let mut ours = m.addrs.clone();
        ours.sort();
        if advert.priority != 0 && theirs != ours && m.warned_addrs.insert(r.src) {
            // RFC 5798 §6.4: a mismatch is logged, the advertisement still counts.
            warn!(instance = %m.cfg.name, src = %r.src, ?theirs, ?ours, "vrrp peer advertises other addresses for this VRID");
        }
        let actions = m.sm.on_advert(now, r.src, &advert);
        self.execute(i, actions, true).await;
    }

    /// Reads the tracked inputs and feeds each instance its priority and FAULT flag.
    async fn track(&mut self) {
        if self.members.iter().all(|m| m.cfg.track_interface.is_empty() && m.cfg.track_backends.is_empty()) {
            return;
        }
        let mut inputs = TrackInputs::default();
        let ifaces: BTreeSet<String> = self.members.iter().flat_map(|m| m.cfg.track_interface.iter().map(|t| t.name.clone())).collect();
        for name in ifaces {
            let up = announce::link_is_up(&name).await.unwrap_or(false);
            inputs.links.insert(name, up);
        }
        {
            let c = self.controller.lock().await;
            for m in &self.members {
                for t in &m.cfg.track_backends {
                    inputs.healthy.insert(t.vip.clone(), c.healthy_backends(&t.vip));
                }
            }
        }
        for m in &mut self.members {
            m.track = evaluate_tracks(&m.cfg, &inputs);
        }
        let now = Instant::now().into_std();
        for i in 0..self.members.len() {
            // A sync group's members share one adjustment and one FAULT.
            let (adj, fault) = match self.members[i].group {
                Some(g) => self.members.iter().filter(|m| m.group == Some(g)).fold((0, false), |(a, f), m| (a + m.track.0, f || m.track.1)),
                None => (self.members[i].track.0, self.members[i].track.1),
            };
            let m = &mut self.members[i];
            let priority = effective_priority(m.cfg.priority, adj);
            if m.track.2 != m.status.failing_tracks {
                if m.track.2.is_empty() {
                    info!(instance = %m.cfg.name, "vrrp tracks all good");
                } else {
                    warn!(instance = %m.cfg.name, failing = ?m.track.2, priority, fault, "vrrp track failing");
                }
                m.status.failing_tracks = m.track.2.clone();
            }
            let actions = m.sm.set_tracking(now, priority, fault);
            self.execute(i, actions, true).await;
        }
    }

    /// Carries out one instance's actions; `propagate`: a transition is followed by the rest of
    /// its sync group.
    async fn execute(&mut self, i: usize, actions: Vec<Action>, propagate: bool) {
        for action in actions {
            match action {
                Action::Advertise { priority } => self.advertise(i, priority).await,
                Action::TakeAddresses => self.hand_over(i, true).await,
                Action::Reannounce => {
                    let m = &self.members[i];
                    spawn_announce(&m.iface, &m.addrs, m.cfg.garp_repeat.max(1));
                }
                Action::ReleaseAddresses => self.hand_over(i, false).await,
                Action::Transition { from, to } => {
                    let group = {
                        let m = &mut self.members[i];
                        m.status.transitions += 1;
                        if to == State::Master {
                            m.status.became_master += 1;
                        }
                        info!(instance = %m.cfg.name, vrid = m.cfg.vrid, from = from.name(), to = to.name(), priority = m.sm.priority(), "vrrp state change");
                        if let Some(hook) = &m.cfg.notify {
                            notify(hook.clone(), "INSTANCE", m.cfg.name.clone(), to, m.sm.priority());
                        }
                        m.group
                    };
                    let Some(g) = group.filter(|_| propagate && matches!(to, State::Master | State::Backup)) else { continue };
                    if let Some(hook) = &self.groups[g].1 {
                        notify(hook.clone(), "GROUP", self.groups[g].0.clone(), to, 0);
                    }
                    let now = Instant::now().into_std();
                    for j in 0..self.members.len() {
                        if j != i && self.members[j].group == Some(g) {
                            let follow = self.members[j].sm.follow(now, to);
                            Box::pin(self.execute(j, follow, false)).await;
                        }
                    }
                }
            }
        }
    }

    /// Takes (`take`) or releases member `i`'s VIPs. Taking enables them in the data path
    /// before adding the addresses, so the first packet the announcements attract is balanced,
    /// then starts the announcements; releasing stops those first.
    async fn hand_over(&mut self, i: usize, take: bool) {
        let m = &mut self.members[i];
        if let Some(a) = m.announcer.take() {
            a.abort();
        }
        m.next_refresh = None;
        let (vips, iface, addrs) = (m.cfg.vips.clone(), m.iface.clone(), m.addrs.clone());
        if let Err(e) = self.controller.lock().await.set_vips_active(&vips, take) {
            let what = if take { "enabling the VIPs in the data path" } else { "putting the VIPs on standby" };
            warn!(error = %e, "vrrp: {what} failed");
        }
        for a in &addrs {
            let changed = if take { announce::add_address(&iface, *a).await } else { announce::remove_address(&iface, *a).await };
            if let Err(e) = changed {
                let what = if take { "adding" } else { "removing" };
                warn!(error = %e, "vrrp: {what} the VIP address failed");
            }
        }
        if take {
            let m = &mut self.members[i];
            let repeat = m.cfg.garp_repeat;
            m.announcer = Some(tokio::spawn(async move {
                announce_burst(&iface, &addrs, repeat).await;
                tokio::time::sleep(SECOND_BURST).await;
                announce_burst(&iface, &addrs, repeat).await;
            }));
            m.next_refresh = refresh_after(&m.cfg, Instant::now());
        }
    }

    async fn advertise(&mut self, i: usize, priority: u8) {
        let m = &mut self.members[i];
        let advert = Advert { vrid: m.cfg.vrid, priority, max_adver_cs: (m.cfg.advert_interval_ms / 10) as u16, addrs: m.addrs.clone() };
        let dsts: Vec<IpAddr> = if m.cfg.unicast_peers.is_empty() {
            vec![if m.v6 { MULTICAST_V6.into() } else { MULTICAST_V4.into() }]
        } else {
            m.cfg.unicast_peers.clone()
        };
        for dst in dsts {
            let msg = advert.encode(m.primary, dst, m.checksum);
            match self.sockets[m.socket].send(m.primary, dst, &msg).await {
                Ok(()) => m.status.adverts_sent += 1,
                Err(e) => warn!(instance = %m.cfg.name, %dst, error = %e, "vrrp advertisement not sent"),
            }
        }
    }

    fn publish_status(&mut self) {
        let status: Vec<InstanceStatus> = self
            .members
            .iter_mut()
            .map(|m| {
                m.status.state = m.sm.state();
                m.status.priority = m.sm.priority();
                m.status.master = m.sm.master();
                m.status.clone()
            })
            .collect();
        self.board.post(status);
    }
}

fn refresh_after(cfg: &VrrpInstanceConfig, now: Instant) -> Option<Instant> {
    (cfg.garp_refresh_ms > 0).then(|| now + Duration::from_millis(cfg.garp_refresh_ms))
}

async fn announce_burst(iface: &str, addrs: &[IpAddr], repeat: u32) {
    for k in 0..repeat {
        if k > 0 {
            tokio::time::sleep(BURST_SPACING).await;
        }
        for a in addrs {
            if let Err(e) = announce::announce(iface, *a).await {
                warn!(error = %e, "vrrp: announcing the VIP failed");
            }
        }
    }
}

fn spawn_announce(iface: &str, addrs: &[IpAddr], repeat: u32) {
    let (iface, addrs) = (iface.to_string(), addrs.to_vec());
    tokio::spawn(async move { announce_burst(&iface, &addrs, repeat).await });
}

/// Runs a notify hook in the background (keepalived's arguments) and logs how it ended.
fn notify(hook: PathBuf, kind: &'static str, name: String, state: State, priority: u8) {
    tokio::spawn(async move {
        let mut cmd = tokio::process::Command::new(&hook);
        cmd.args([kind, name.as_str(), state.name(), &priority.to_string()]).kill_on_drop(false);
        match cmd.status().await {
            Ok(st) if st.success() => debug!(hook = %hook.display(), %name, state = state.name(), "notify hook done"),
            Ok(st) => warn!(hook = %hook.display(), %name, state = state.name(), %st, "notify hook failed"),
            Err(e) => warn!(hook = %hook.display(), %name, error = %e, "notify hook could not run"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{TrackBackends, TrackInterface};

    fn cfg() -> VrrpInstanceConfig {
        let c = Config::parse(
            r#"
[node]
interfaces = ["eth0"]
[[vip]]
name = "mx"
address = "198.18.0.100"
ports = [25]
mode = "dsr-l2"
backends = ["a", "b", "c"]
[[backend]]
name = "a"
address = "198.18.0.11"
[[backend]]
name = "b"
address = "198.18.0.12"
[[backend]]
name = "c"
address = "198.18.0.13"
[[vrrp]]
name = "smtp"
vrid = 51
priority = 150
vips = ["mx"]
"#,
            "t.toml",
        )
        .unwrap();
        c.vrrp[0].clone()
    }

    #[test]
    fn tracks_follow_keepalived_weights() {
        let mut c = cfg();
        c.track_interface = vec![TrackInterface { name: "eth1".into(), weight: -50 }, TrackInterface { name: "eth0".into(), weight: 10 }];
        c.track_backends = vec![TrackBackends { vip: "mx".into(), need: 2, weight: 0 }];
        let mut inputs = TrackInputs::default();
        inputs.links.insert("eth0".into(), true);
        inputs.links.insert("eth1".into(), true);
        inputs.healthy.insert("mx".into(), 3);
        assert_eq!(evaluate_tracks(&c, &inputs), (10, false, vec![]), "a positive weight is added while it holds");
        inputs.links.insert("eth1".into(), false);
        let (adj, fault, failing) = evaluate_tracks(&c, &inputs);
        assert_eq!((adj, fault), (-40, false));
        assert_eq!(failing, ["interface eth1 down"]);
        assert_eq!(effective_priority(150, adj), 110);
        inputs.healthy.insert("mx".into(), 1);
        let (_, fault, failing) = evaluate_tracks(&c, &inputs);
        assert!(fault, "no weight: FAULT");
        assert_eq!(failing[1], "mx has 1 healthy back-ends, needs 2");
        // A missing interface counts as down.
        inputs.links.clear();
        assert_eq!(evaluate_tracks(&c, &inputs).0, -50);
    }

    #[test]
    fn effective_priority_stays_in_range() {
        assert_eq!(effective_priority(100, -200), 1);
        assert_eq!(effective_priority(200, 100), 254);
        assert_eq!(effective_priority(100, 0), 100);
    }
}
