//! Operator control: the [`Controller`] that owns desired state, and the Unix-socket protocol
//! the CLI uses to reach a running agent.
//!
//! One code path for every change: whether the agent runs or not, a CLI change goes through
//! [`Controller::change`] (in the agent, reached over the socket; without an agent, in the CLI
//! process itself), which validates it, records it durably in the change log, plans, and writes
//! the maps through `maps::DataplaneMaps::apply`. A file lock in the state directory serialises
//! the two cases.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::LbConfig;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::Mutex,
};
use tracing::{info, warn};

use crate::{
    config::{Config, ForwardingMode},
    desired::{Change, ChangeError, ChangeLog, Desired, Health, Load, Plan, StateError, plan},
    maps::{ApplyReport, DataplaneMaps, MapsError},
    neighbours,
};

/// Errors of the control path.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Change(#[from] ChangeError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("{0}")]
    Io(String),
}

/// Owns the desired state of one node and applies it to the maps.
pub struct Controller {
    config: Config,
    desired: Desired,
    maps: Option<DataplaneMaps>,
    /// Health as the prober last decided it (absent = up).
    probed: BTreeMap<String, Health>,
    /// Load as the load policy last judged it (absent = full share, not overloaded).
    load: BTreeMap<String, Load>,
    /// Probes' moving-average response time per back-end (the slowest of its probes).
    probe_rtt: BTreeMap<String, Duration>,
    /// Back-ends of dsr-l2 VIPs with no known MAC: held down until it is known, since frames
    /// cannot be addressed to them.
    unaddressable: BTreeSet<String>,
    macs: BTreeMap<IpAddr, [u8; 6]>,
    encap: LbConfig,
    /// Whether MACs and addresses have been read in this process: a plan is never published
    /// without them (it would address frames to 00:00:00:00:00:00).
    refreshed: bool,
    last_plan: Option<Plan>,
    /// VIPs whose VRRP instance is not master here: on standby in the data path. Every VIP
    /// held by a `[[vrrp]]` instance starts here; only the running agent's VRRP, as master,
    /// takes one out (a CLI writing the maps without an agent keeps them on standby: no VRRP
    /// runs, so this node is not the master).
    standby: BTreeSet<String>,
    /// What the VRRP instances report, for `mxlb status` and metrics. Shared, not behind the
    /// controller's lock: VRRP updates it after every event and must never wait for a status
    /// or metrics request that holds the controller while it reads the maps.
    vrrp: crate::vrrp::StatusBoard,
}

impl Controller {
    /// Loads the change log over `config`. `maps` is None when nothing is pinned yet (the CLI
    /// before the first `mxlb run`): changes are then only recorded.
    pub fn open(config: Config, maps: Option<DataplaneMaps>) -> Result<Controller, ControlError> {
        let log = ChangeLog::load(&config.node.state_dir)?;
        let (desired, skipped) = log.replay(config.clone());
        for (change, why) in skipped {
            warn!(?change, %why, "recorded CLI change no longer applies to the config; skipped");
        }
        let standby = config.vrrp.iter().flat_map(|r| r.vips.iter().cloned()).collect();
        Ok(Controller {
            standby,
            vrrp: crate::vrrp::StatusBoard::default(),
            config,
            desired,
            maps,
            probed: BTreeMap::new(),
            load: BTreeMap::new(),
            probe_rtt: BTreeMap::new(),
            unaddressable: BTreeSet::new(),
            macs: BTreeMap::new(),
            encap: LbConfig::default(),
            refreshed: false,
            last_plan: None,
        })
    }

    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    pub fn maps(&self) -> Option<&DataplaneMaps> {
        self.maps.as_ref()
    }

    /// Applies, records and publishes one operator change.
    pub async fn change(&mut self, change: Change) -> Result<String, ControlError> {
        let state_dir = self.config.node.state_dir.clone();
        // One change at a time, whether the agent or a CLI process applies it.
        let _lock = crate::statefile::lock(&state_dir, "lock")?;
        // Re-read the log under the lock: another CLI process may have written it.
        let mut log = ChangeLog::load(&state_dir)?;
        let (mut desired, _) = log.replay(self.config.clone());
        desired.apply(&change)?;
        log.record(change.clone());
        log.save(&state_dir)?;
        self.desired = desired;
        info!(?change, "operator change recorded");
        if self.maps.is_none() {
            return Ok("recorded; it takes effect when `mxlb run` starts".into());
        }
        // The neighbour table is read when this process has not read it yet (the CLI writing
        // directly) or a back-end is new (its MAC); otherwise the change is published at once,
        // well within the 100 ms an operator expects.
        let report = if !self.refreshed || matches!(change, Change::BackendAdd { .. }) {
            self.refresh().await?
        } else {
            self.publish()?
        };
        Ok(format!(
            "applied ({} ring slots written, {} tables switched, {} flows flushed)",
            report.ring_slots_written, report.rings_switched, report.flows_flushed
        ))
    }

    /// Re-reads what the plan depends on in the kernel (MACs, interface addresses), plans,
    /// and writes the maps. Cheap when nothing changed.
    pub async fn refresh(&mut self) -> Result<ApplyReport, ControlError> {
        let observed = self.observation().observe().await;
        self.apply_observed(observed)
    }

    /// What [`Controller::refresh`] must look up, detached from `self` so a long-running
    /// owner can do the slow part (resolving an unreachable back-end waits up to 500 ms)
    /// without holding the controller, and CLI changes are not held up meanwhile.
    pub fn observation(&self) -> Observation {
        Observation {
            backends: self.desired.config.backends.iter().map(|b| b.address).collect(),
            node: self.config.node.clone(),
        }
    }

    /// Publishes with freshly observed MACs and addresses.
    pub fn apply_observed(&mut self, observed: Observed) -> Result<ApplyReport, ControlError> {
        // Merged, not replaced: a back-end added (and resolved) while this observation was
        // being made keeps its MAC; a changed MAC is overwritten by the newer reading.
        if let Some(macs) = observed.macs {
            self.macs.extend(macs);
        }
        self.encap = observed.encap;
        self.mark_unaddressable();
        self.refreshed = true;
        self.publish()
    }

    /// Records the prober's verdict on a back-end and publishes it if it changed.
    pub fn set_health(&mut self, backend: &str, health: Health, reason: &str) -> Result<ApplyReport, ControlError> {
        let before = self.probed.get(backend).copied().unwrap_or(Health::Up);
        if health == Health::Up {
            self.probed.remove(backend);
        } else {
            self.probed.insert(backend.to_string(), health);
        }
        if before == health {
            return Ok(ApplyReport::default());
        }
        match health {
            Health::Down => warn!(%backend, %reason, "back-end down"),
            Health::Up => info!(%backend, %reason, "back-end up"),
        }
        self.publish()
    }

    /// Records the load policy's judgement of a back-end and publishes it if it changed.
    pub fn set_load(&mut self, backend: &str, load: Load) -> Result<ApplyReport, ControlError> {
        let full = Load { share: 1.0, overloaded: None };
        let before = self.load.get(backend).cloned().unwrap_or(full.clone());
        if before == load {
            return Ok(ApplyReport::default());
        }
        match (&before.overloaded, &load.overloaded) {
            (None, Some(why)) => warn!(%backend, reason = %why, "back-end overloaded: draining"),
            (Some(_), None) => info!(%backend, "back-end no longer overloaded: taking sessions again"),
            _ => {}
        }
        if before.share != load.share {
            info!(%backend, share = load.share, "back-end weight share changed (agent load, response time)");
        }
        if load == full {
            self.load.remove(backend);
        } else {
            self.load.insert(backend.to_string(), load);
        }
        self.publish()
    }

    /// The MAC frames to back-end `addr` are sent to (config `mac`, else the resolved one).
    pub fn mac_of(&self, addr: IpAddr) -> Option<[u8; 6]> {
        let configured = self.desired.config.backends.iter().find(|b| b.address == addr).and_then(|b| b.mac);
        configured.map(|m| m.0).or_else(|| self.macs.get(&addr).copied())
    }

    /// Notes a back-end's probe response time (shown by `mxlb status` and metrics).
    pub fn record_probe_rtt(&mut self, backend: &str, rtt: Option<Duration>) {
        match rtt {
            Some(d) => self.probe_rtt.insert(backend.to_string(), d),
            None => self.probe_rtt.remove(backend),
        };
    }

    /// Everything at a glance: state, health, weights, load, probe times, counters.
    pub fn status(&self) -> Result<crate::metrics::Status, ControlError> {
        let view = crate::report::MapsView::read(self.maps.as_ref())?;
        let rows = crate::report::backends(&self.desired, &view)?;
        let backends = rows
            .into_iter()
            .map(|r| {
                let planned = self.last_plan.as_ref().and_then(|p| p.backends.iter().find(|b| b.name == r.name));
                let load = self.load.get(&r.name);
                crate::metrics::BackendStatus {
                    health: match self.probed_health(&r.name) {
                        Health::Up => "up".into(),
                        Health::Down => "down".into(),
                    },
                    effective_weight: planned.map_or(0, |b| b.weight),
                    load_share: load.map_or(1.0, |l| l.share),
                    overloaded: load.and_then(|l| l.overloaded.clone()),
                    drained_by_operator: r.drained,
                    probe_ms: self.probe_rtt.get(&r.name).map(|d| d.as_secs_f64() * 1e3),
                    admin_weight: r.weight,
                    packets: r.counters.packets,
                    bytes: r.counters.bytes,
                    new_flows: r.counters.new_flows,
                    name: r.name,
                    address: r.address,
                    state: r.state,
                }
            })
            .collect();
        let vips = crate::report::vips(&self.desired, &view)?;
        let decisions = match &self.maps {
            Some(m) => m.reason_counters()?.into_iter().map(|(r, c)| (r.name().to_string(), c.packets)).collect(),
            None => Vec::new(),
        };
        Ok(crate::metrics::Status { backends, vips, decisions, vrrp: self.vrrp.read(), relay: None, proxy: None })
    }

    /// VRRP: this node became master of `vips` (`active`) or stopped being it. Published at
    /// once: the data path must balance before the addresses are announced.
    /// Whether this node serves VIP `name` now (not on VRRP standby).
    pub fn vip_active(&self, name: &str) -> bool {
        !self.standby.contains(name)
    }

    pub fn set_vips_active(&mut self, vips: &[String], active: bool) -> Result<ApplyReport, ControlError> {
        let before = self.standby.clone();
        for v in vips {
            if active {
                self.standby.remove(v);
            } else {
                self.standby.insert(v.clone());
            }
        }
        if before == self.standby || !self.refreshed {
            return Ok(ApplyReport::default());
        }
        self.publish()
    }

    /// Where VRRP posts its report for `mxlb status` and metrics.
    pub fn vrrp_board(&self) -> crate::vrrp::StatusBoard {
        self.vrrp.clone()
    }

    /// Back-ends of VIP `vip` that can take sessions per the probes (for VRRP tracking).
    pub fn healthy_backends(&self, vip: &str) -> usize {
        let Some(v) = self.desired.config.vip(vip) else { return 0 };
        v.backends
            .iter()
            .filter(|b| self.probed_health(b) == Health::Up && !self.unaddressable.contains(*b))
            .count()
    }

    /// The prober's current verdict on a back-end (absent = up).
    pub fn probed_health(&self, backend: &str) -> Health {
        self.probed.get(backend).copied().unwrap_or(Health::Up)
    }

    fn publish(&mut self) -> Result<ApplyReport, ControlError> {
        if !self.refreshed {
            return Err(ControlError::Io("internal: publish before the first refresh".into()));
        }
        let mut health = self.probed.clone();
        for name in &self.unaddressable {
            health.insert(name.clone(), Health::Down);
        }
        let p = plan(&self.desired, &health, &self.load, &self.macs, self.encap, &self.standby);
        let Some(maps) = self.maps.as_mut() else { return Ok(ApplyReport::default()) };
        let report = maps.apply(&p)?;
        if self.last_plan.as_ref() != Some(&p) {
            for b in &p.backends {
                let before = self.last_plan.as_ref().and_then(|lp| lp.backends.iter().find(|x| x.name == b.name));
                if before.map(|x| (x.state, x.weight)) != Some((b.state, b.weight)) {
                    info!(backend = %b.name, address = %b.address, state = state_name(b.state), weight = b.weight, "back-end published");
                }
            }
            self.last_plan = Some(p);
        }
        Ok(report)
    }

    /// Back-ends of dsr-l2 VIPs need a MAC; without one they are held down (and logged once).
    fn mark_unaddressable(&mut self) {
        let c = &self.desired.config;
        let mut now = BTreeSet::new();
        for b in &c.backends {
            let l2 = c.vips.iter().any(|v| v.mode == ForwardingMode::DsrL2 && v.backends.contains(&b.name));
            let known = b.mac.is_some() || self.macs.contains_key(&b.address);
            if l2 && !known {
                if !self.unaddressable.contains(&b.name) {
                    warn!(backend = %b.name, address = %b.address, "no MAC address known (not on this segment?); held down");
                }
                now.insert(b.name.clone());
            } else if self.unaddressable.contains(&b.name) {
                info!(backend = %b.name, address = %b.address, "MAC address now known");
            }
        }
        self.unaddressable = now;
    }

}

/// The kernel state a plan depends on, to be looked up ([`Observation::observe`]).
pub struct Observation {
    backends: Vec<IpAddr>,
    node: crate::config::NodeConfig,
}

/// Result of [`Observation::observe`].
pub struct Observed {
    /// None when the neighbour table could not be read (the last known MACs are kept).
    macs: Option<BTreeMap<IpAddr, [u8; 6]>>,
    encap: LbConfig,
}

impl Observation {
    /// Back-end MACs (resolving missing ones) and the dsr-ipip outer sources.
    pub async fn observe(self) -> Observed {
        let macs = match neighbours::resolve_macs(&self.backends, Duration::from_millis(500)).await {
            Ok(m) => Some(m),
            Err(e) => {
                warn!(error = %e, "cannot read the neighbour table");
                None
            }
        };
        let n = &self.node;
        let (mut v4, mut v6) = (n.encap_source_v4, n.encap_source_v6);
        if v4.is_none() || v6.is_none() {
            if let Some(iface) = n.interfaces.first() {
                if let Ok((a4, a6)) = neighbours::interface_addresses(iface).await {
                    v4 = v4.or(a4);
                    v6 = v6.or(a6);
                }
            }
        }
        let encap = LbConfig {
            src_v4: v4.map(|a| a.octets()).unwrap_or_default(),
            src_v6: v6.map(|a| a.octets()).unwrap_or_default(),
        };
        Observed { macs, encap }
    }
}

/// Name of a back-end state for people.
pub fn state_name(s: u8) -> &'static str {
    match s {
        lb_common::state::UP => "up",
        lb_common::state::DRAINING => "draining",
        lb_common::state::DOWN => "down",
        _ => "unused",
    }
}

/// A request on the control socket (one JSON object per line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Change { change: Change },
    /// `mxlb status`: the answer's message is the [`crate::metrics::Status`] as JSON.
    Status,
    /// `mxlb queue ...`: the relay's queue (answered by [`crate::relay::service::Relay::handle`]).
    Queue { action: crate::relay::service::QueueAction },
    /// `mxlb mailbox ...`: the mailbox map (answered by
    /// [`crate::mailbox::service::MailboxService::handle`]).
    Mailbox { action: crate::mailbox::service::MailboxAction },
    Ping,
}

/// Calls `apply` with the controller every 200 ms until `stop` changes: how the services on
/// local VIPs (the relay, the mailbox map) follow the prober's verdicts and VRRP's VIP state.
/// `apply` runs under the controller's lock: copy what is needed, do nothing slow.
pub fn follow(
    controller: std::sync::Arc<Mutex<Controller>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut apply: impl FnMut(&Controller) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = tick.tick() => apply(&*controller.lock().await),
            }
        }
    })
}

/// The answer (one JSON object per line).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub message: String,
}

/// The services on local VIPs that the control socket reaches (each `None` when not
/// configured).
#[derive(Clone, Default)]
pub struct Services {
    pub relay: Option<std::sync::Arc<crate::relay::service::Relay>>,
    pub mailboxes: Option<std::sync::Arc<crate::mailbox::service::MailboxService>>,
    pub proxy: Option<std::sync::Arc<crate::proxy::Proxy>>,
}

/// Serves the control socket until `shutdown` resolves.
pub async fn serve(
    path: PathBuf,
    controller: std::sync::Arc<Mutex<Controller>>,
    services: Services,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ControlError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| ControlError::Io(format!("{}: {e}", dir.display())))?;
    }
    // A socket file left by a crashed agent would make bind fail.
    if UnixStream::connect(&path).await.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    let listener = UnixListener::bind(&path).map_err(|e| ControlError::Io(format!("{}: {e}", path.display())))?;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let (controller, services) = (controller.clone(), services.clone());
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, controller, services).await {
                        warn!(error = %e, "control connection");
                    }
                });
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Longest request line accepted (a change is a few hundred bytes).
const MAX_REQUEST: usize = 64 * 1024;

async fn handle(
    stream: UnixStream,
    controller: std::sync::Arc<Mutex<Controller>>,
    services: Services,
) -> std::io::Result<()> {
    let Services { relay, mailboxes, proxy } = services;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(MAX_REQUEST as u64 * 16));
    let mut line = String::new();
    loop {
        line.clear();
        let n = tokio::time::timeout(Duration::from_secs(30), lines.read_line(&mut line))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "idle control connection"))??;
        if n == 0 {
            return Ok(());
        }
        let response = if line.len() > MAX_REQUEST {
            Response { ok: false, message: "request too long".into() }
        } else {
            match serde_json::from_str::<Request>(&line) {
                Err(e) => Response { ok: false, message: format!("bad request: {e}") },
                Ok(Request::Ping) => Response { ok: true, message: "pong".into() },
                Ok(Request::Status) => match controller.lock().await.status() {
                    Ok(mut st) => {
                        if let Some(r) = &relay {
                            let r = r.clone();
                            st.relay = tokio::task::spawn_blocking(move || r.snapshot()).await.ok();
                        }
                        st.proxy = proxy.as_ref().map(|p| p.snapshot());
                        Response { ok: true, message: serde_json::to_string(&st).unwrap_or_default() }
                    }
                    Err(e) => Response { ok: false, message: e.to_string() },
                },
                Ok(Request::Change { change }) => match controller.lock().await.change(change).await {
                    Ok(m) => Response { ok: true, message: m },
                    Err(e) => Response { ok: false, message: e.to_string() },
                },
                Ok(Request::Queue { action }) => match &relay {
                    None => Response { ok: false, message: "this node runs no relay ([relay] is not configured)".into() },
                    Some(r) => match r.handle(action).await {
                        Ok(m) => Response { ok: true, message: m },
                        Err(m) => Response { ok: false, message: m },
                    },
                },
                Ok(Request::Mailbox { action }) => match &mailboxes {
                    None => Response { ok: false, message: "no mailbox map ([mailbox] is not configured)".into() },
                    Some(m) => match m.handle(action).await {
                        Ok(m) => Response { ok: true, message: m },
                        Err(m) => Response { ok: false, message: m },
                    },
                },
            }
        };
        let mut out = serde_json::to_vec(&response).expect("response serialises");
        out.push(b'\n');
        write.write_all(&out).await?;
    }
}

/// Sends one request to a running agent. `Ok(None)` when no agent listens on `path`.
pub async fn request(path: &Path, req: &Request) -> Result<Option<Response>, ControlError> {
    let Ok(stream) = UnixStream::connect(path).await else { return Ok(None) };
    let io = |e: std::io::Error| ControlError::Io(format!("{}: {e}", path.display()));
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(req).expect("request serialises");
    line.push(b'\n');
    write.write_all(&line).await.map_err(io)?;
    let mut reader = BufReader::new(read);
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(30), reader.read_line(&mut answer))
        .await
        .map_err(|_| ControlError::Io(format!("{}: the agent did not answer within 30 s", path.display())))?
        .map_err(io)?;
    serde_json::from_str(&answer)
        .map(Some)
        .map_err(|e| ControlError::Io(format!("{}: bad answer from the agent: {e}", path.display())))
}
