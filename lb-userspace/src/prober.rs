//! Runs the health probes of `mxlb run`: one task per back-end and service (check kind and
//! port), and one per back-end with an `agent_port` asking its `mxlb agent` for its load. All
//! report to one supervisor that owns the rise/fall state and the load policy, and tells the
//! [`Controller`] when a back-end goes down, comes back, or its load changes its weight share
//! or drains it (so a verdict reaches the maps through the same code as a CLI change).
//!
//! The probe targets follow the desired state: a back-end added or removed with the CLI gains
//! or loses its probes within a second.
//!
//! What is probed: each back-end's own address on its VIP's first port, with that VIP's
//! check; and, for dsr VIPs, the path real traffic takes — a SYN to VIP:port sent through the
//! back-end the way the data path forwards ([`crate::vippath`]), so a back-end that lost the
//! VIP from its loopback or its decapsulation is taken out although its own address answers.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use tokio::{
    sync::{Mutex, mpsc, watch},
    task::JoinHandle,
};
use tracing::warn;

use crate::{
    config::{CheckSetting, ForwardingMode, HealthConfig},
    control::Controller,
    desired::{Desired, Health, Load},
    health::{self, CheckKind, Ewma, ProbeError, RiseFall},
    policy::{AgentReport, LoadState},
};

/// One probe: a back-end, a check, an address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub backend: String,
    pub kind: CheckKind,
    pub addr: SocketAddr,
    /// Implicit TLS (smtps, pop3s, imaps).
    pub tls: bool,
    /// A VIP-path probe (`addr` is then VIP:port): a SYN sent through this back-end the way the
    /// data path forwards (`ipip`: encapsulated), see [`crate::vippath`].
    pub via: Option<Via>,
    /// Send a PROXY v2 `LOCAL` header first: the mailbox proxy's back-end ports with
    /// `pass_client = "proxy-v2"` are Dovecot `haproxy = yes` listeners, which refuse a
    /// connection that does not start with one (LOCAL: "a health check, use the real
    /// addresses", as HAProxy's own checks send).
    pub proxy_header: bool,
}

/// The back-end a VIP-path probe goes through.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Via {
    pub backend: std::net::IpAddr,
    pub ipip: bool,
}

impl Target {
    /// The check's name as configured: smtp, pop3s, imaps, ...
    pub fn check_name(&self) -> String {
        if self.via.is_some() {
            return "vip-path".into();
        }
        let proxied = if self.proxy_header { "+proxy-v2" } else { "" };
        format!("{}{}{proxied}", self.kind.as_str(), if self.tls { "s" } else { "" })
    }
}

/// The probes the desired state calls for, one per back-end, check and port.
pub fn targets(desired: &Desired) -> BTreeSet<Target> {
    let c = &desired.config;
    let mut out = BTreeSet::new();
    for v in &c.vips {
        let (kind, tls) = match v.check() {
            CheckSetting::None => continue,
            CheckSetting::Tcp => (CheckKind::Tcp, false),
            CheckSetting::Smtp => (CheckKind::Smtp, false),
            CheckSetting::Pop3 => (CheckKind::Pop3, false),
            CheckSetting::Imap => (CheckKind::Imap, false),
            CheckSetting::Smtps => (CheckKind::Smtp, true),
            CheckSetting::Pop3s => (CheckKind::Pop3, true),
            CheckSetting::Imaps => (CheckKind::Imap, true),
        };
        let Some(port) = v.ports.first() else { continue };
        for name in &v.backends {
            if let Some(b) = c.backend(name) {
                out.insert(Target { backend: name.clone(), kind, addr: SocketAddr::new(b.address, *port), tls, via: None, proxy_header: false });
                // In DSR modes real traffic reaches the back-end addressed to the VIP: check
                // that path too (VIP on its loopback, decapsulation, a listener on the VIP).
                if matches!(v.mode, ForwardingMode::DsrL2 | ForwardingMode::DsrIpip) {
                    out.insert(Target {
                        backend: name.clone(),
                        kind: CheckKind::Tcp,
                        addr: SocketAddr::new(v.address, *port),
                        tls: false,
                        via: Some(Via { backend: b.address, ipip: v.mode == ForwardingMode::DsrIpip }),
                        proxy_header: false,
                    });
                }
            }
        }
    }
    // The relay's delivery back-ends, on the port it delivers to (LMTP has no probe dialogue
    // of its own here: a TCP connect).
    if let Some(r) = &c.relay {
        let kind = match r.delivery.protocol {
            crate::config::relay::DeliveryProtocol::Smtp => CheckKind::Smtp,
            crate::config::relay::DeliveryProtocol::Lmtp => CheckKind::Tcp,
        };
        for name in &r.delivery.backends {
            if let Some(b) = c.backend(name) {
                let addr = SocketAddr::new(b.address, r.delivery.port());
                out.insert(Target { backend: name.clone(), kind, addr, tls: false, via: None, proxy_header: false });
            }
        }
    }
    // The mailbox proxy's owners, on the ports it logs users in to: the mailbox map follows
    // these verdicts (a down owner's users get "try later" instead of a connection error).
    if let (Some(p), Some(m)) = (&c.proxy, &c.mailbox) {
        let proxy_header = p.pass_client == crate::config::proxy::PassClient::ProxyV2;
        for name in &m.backends {
            if let Some(b) = c.backend(name) {
                for (kind, port) in [(CheckKind::Pop3, p.backend_pop3_port), (CheckKind::Imap, p.backend_imap_port)] {
                    let addr = SocketAddr::new(b.address, port);
                    out.insert(Target { backend: name.clone(), kind, addr, tls: false, via: None, proxy_header });
                }
            }
        }
    }
    out
}

/// The agents the desired state calls for: back-end name → agent address.
pub fn agents(desired: &Desired) -> BTreeMap<String, SocketAddr> {
    let c = &desired.config;
    let used = c.used_backends();
    c.backends
        .iter()
        .filter(|b| used.contains(b.name.as_str()))
        .filter_map(|b| b.agent_port.map(|p| (b.name.clone(), SocketAddr::new(b.address, p))))
        .collect()
}

enum Report {
    Probe { target: Target, result: Result<Duration, ProbeError> },
    Agent { backend: String, addr: SocketAddr, result: Result<AgentReport, String> },
}

/// Load-policy state of one back-end.
#[derive(Default)]
struct LoadTracked {
    state: LoadState,
    report: Option<AgentReport>,
    /// Consecutive failed agent queries (the first is logged).
    agent_failures: u32,
}

/// Failed agent queries in a row after which its last report is forgotten (and its load no
/// longer counts). Until then the last report stands: one slow answer under load must not lift
/// an overload drain.
const AGENT_STALE_AFTER: u32 = 5;

/// Per-target state kept by the supervisor.
struct Tracked {
    task: JoinHandle<()>,
    verdict: RiseFall,
    rtt: Ewma,
    last_error: Option<String>,
}

/// Runs until `stop` turns true.
pub async fn run(
    controller: Arc<Mutex<Controller>>,
    settings: HealthConfig,
    metrics: Arc<crate::metrics::Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::channel::<Report>(1024);
    let tls = match health::ProbeTls::new(settings.tls_ca.as_deref(), settings.tls_server_name.as_deref()) {
        Ok(t) => Some(t),
        Err(e) => {
            warn!(error = %e, "TLS probes cannot run; they will fail");
            None
        }
    };
    let iface = controller.lock().await.desired().config.node.interfaces.first().cloned();
    let origin = match iface {
        Some(i) => match crate::vippath::origin(&i).await {
            Ok(o) => Some(o),
            Err(e) => {
                warn!(iface = %i, error = %e, "VIP-path probes cannot run; they will fail");
                None
            }
        },
        None => None,
    };
    let mut sup = Supervisor {
        tls,
        origin,
        controller,
        metrics,
        settings,
        tx,
        tracked: BTreeMap::new(),
        agent_tasks: BTreeMap::new(),
        loads: BTreeMap::new(),
    };
    let mut resync = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = resync.tick() => sup.resync().await,
            Some(report) = rx.recv() => match report {
                Report::Probe { target, result } => sup.on_probe(target, result).await,
                Report::Agent { backend, addr, result } => sup.on_agent(backend, addr, result).await,
            },
        }
    }
    for (_, tr) in sup.tracked {
        tr.task.abort();
    }
    for (_, (_, task)) in sup.agent_tasks {
        task.abort();
    }
}

/// The one owner of probe and load state.
struct Supervisor {
    /// TLS for implicit-TLS probes (validated with the config, so present when it loads).
    tls: Option<health::ProbeTls>,
    /// Where VIP-path probes leave from.
    origin: Option<crate::vippath::Origin>,
    controller: Arc<Mutex<Controller>>,
    metrics: Arc<crate::metrics::Metrics>,
    settings: HealthConfig,
    tx: mpsc::Sender<Report>,
    tracked: BTreeMap<Target, Tracked>,
    agent_tasks: BTreeMap<String, (SocketAddr, JoinHandle<()>)>,
    loads: BTreeMap<String, LoadTracked>,
}

impl Supervisor {
    /// Starts and stops probe and agent tasks to match the desired state.
    async fn resync(&mut self) {
        let (wanted, wanted_agents) = {
            let c = self.controller.lock().await;
            (targets(c.desired()), agents(c.desired()))
        };
        let interval = Duration::from_millis(self.settings.interval_ms);
        let timeout = Duration::from_millis(self.settings.timeout_ms);
        let gone: Vec<Target> = self.tracked.keys().filter(|t| !wanted.contains(*t)).cloned().collect();
        for t in gone {
            if let Some(tr) = self.tracked.remove(&t) {
                tr.task.abort();
            }
            if !self.tracked.keys().any(|k| k.backend == t.backend) {
                // No probe left for it (removed, or its VIP's check turned off).
                let _ = self.controller.lock().await.set_health(&t.backend, Health::Up, "no longer probed");
            }
        }
        for (i, t) in wanted.into_iter().enumerate() {
            if self.tracked.contains_key(&t) {
                continue;
            }
            // Spread the probes over the interval rather than all at once.
            let offset = interval.mul_f64((i % 16) as f64 / 16.0);
            let ctx = ProbeCtx {
                timeout,
                tls: self.tls.clone(),
                origin: self.origin.clone(),
                controller: self.controller.clone(),
            };
            let task = tokio::spawn(probe_loop(t.clone(), interval, offset, ctx, self.tx.clone()));
            let verdict = RiseFall::new(self.settings.rise, self.settings.fall);
            self.tracked.insert(t, Tracked { task, verdict, rtt: Ewma::new(0.3), last_error: None });
        }
        self.agent_tasks.retain(|name, (addr, task)| {
            let keep = wanted_agents.get(name) == Some(addr);
            if !keep {
                task.abort();
            }
            keep
        });
        for (name, addr) in wanted_agents {
            if self.agent_tasks.contains_key(&name) {
                continue;
            }
            let every = Duration::from_millis(self.settings.agent_interval_ms);
            let task = tokio::spawn(agent_loop(name.clone(), addr, every, timeout, self.tx.clone()));
            self.agent_tasks.insert(name, (addr, task));
        }
        let forgotten: Vec<String> = self
            .loads
            .keys()
            .filter(|b| !self.agent_tasks.contains_key(*b) && !self.tracked.keys().any(|t| &t.backend == *b))
            .cloned()
            .collect();
        for b in forgotten {
            self.loads.remove(&b);
            let _ = self.controller.lock().await.set_load(&b, Load { share: 1.0, overloaded: None });
        }
    }

    async fn on_probe(&mut self, target: Target, result: Result<Duration, ProbeError>) {
        let Some(tr) = self.tracked.get_mut(&target) else { return };
        self.metrics.observe_probe(&target.backend, &target.check_name(), result.as_ref().map(|d| *d).map_err(|_| ()));
        match &result {
            Ok(rtt) => {
                tr.rtt.update(*rtt);
                tr.last_error = None;
            }
            Err(e) => tr.last_error = Some(e.to_string()),
        }
        let changed = tr.verdict.observe(result.is_ok()).is_some();
        // Response times feed the load policy whether or not the verdict changes.
        self.judge_load(&target.backend).await;
        if !changed {
            return;
        }
        // A back-end is down while any of its probes is down.
        let down: Vec<String> = self
            .tracked
            .iter()
            .filter(|(t, tr)| t.backend == target.backend && tr.verdict.is_down())
            .map(|(t, tr)| format!("{} {}: {}", t.check_name(), t.addr, tr.last_error.as_deref().unwrap_or("failing")))
            .collect();
        let (health, reason) = if down.is_empty() {
            let rtt = self.tracked.get(&target).and_then(|tr| tr.rtt.get()).unwrap_or_default();
            (Health::Up, format!("{} {} answering (avg {:.1} ms)", target.check_name(), target.addr, rtt.as_secs_f64() * 1e3))
        } else {
            (Health::Down, down.join("; "))
        };
        if let Err(e) = self.controller.lock().await.set_health(&target.backend, health, &reason) {
            warn!(backend = %target.backend, error = %e, "could not publish a health change");
        }
    }

    async fn on_agent(&mut self, backend: String, addr: SocketAddr, result: Result<AgentReport, String>) {
        if self.agent_tasks.get(&backend).map(|(a, _)| *a) != Some(addr) {
            return;
        }
        let lt = self.loads.entry(backend.clone()).or_default();
        match result {
            Ok(r) => {
                lt.report = Some(r);
                lt.agent_failures = 0;
            }
            Err(e) => {
                if lt.agent_failures == 0 {
                    warn!(%backend, agent = %addr, error = %e, "agent not answering; its last report stands for now");
                }
                lt.agent_failures += 1;
                if lt.agent_failures == AGENT_STALE_AFTER {
                    warn!(%backend, agent = %addr, "agent still not answering; its load is ignored until it does");
                    lt.report = None;
                }
            }
        }
        self.judge_load(&backend).await;
    }

    /// Re-judges a back-end's load (agent report + slowest probe's average response time) and
    /// hands the result to the controller, which publishes only a change.
    async fn judge_load(&mut self, backend: &str) {
        let rtt = self.tracked.iter().filter(|(t, _)| t.backend == backend).filter_map(|(_, tr)| tr.rtt.get()).max();
        let lt = self.loads.entry(backend.to_string()).or_default();
        let load = lt.state.evaluate(lt.report.as_ref(), rtt, &self.settings);
        let mut controller = self.controller.lock().await;
        controller.record_probe_rtt(backend, rtt);
        if let Err(e) = controller.set_load(backend, load) {
            warn!(%backend, error = %e, "could not publish a load change");
        }
    }
}

async fn agent_loop(backend: String, addr: SocketAddr, every: Duration, timeout: Duration, tx: mpsc::Sender<Report>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = crate::agent::fetch(addr, timeout).await;
        if tx.send(Report::Agent { backend: backend.clone(), addr, result }).await.is_err() {
            return;
        }
    }
}

/// One VIP-path probe, its failure phrased as a probe failure.
async fn vip_path(target: &Target, via: &Via, ctx: &ProbeCtx) -> Result<Duration, ProbeError> {
    let Some(origin) = &ctx.origin else {
        return Err(ProbeError::Io { stage: health::Stage::Connect, source: std::io::Error::other("the LB interface cannot be read") });
    };
    let mac = ctx.controller.lock().await.mac_of(via.backend);
    let mode = if via.ipip { ForwardingMode::DsrIpip } else { ForwardingMode::DsrL2 };
    crate::vippath::probe(origin, mode, via.backend, mac, target.addr, ctx.timeout)
        .await
        .map_err(|e| ProbeError::Io { stage: health::Stage::Connect, source: std::io::Error::other(e.to_string()) })
}

/// What a probe task needs besides its target.
struct ProbeCtx {
    timeout: Duration,
    tls: Option<health::ProbeTls>,
    /// Where VIP-path probes leave from (None: the interface could not be read).
    origin: Option<crate::vippath::Origin>,
    controller: Arc<Mutex<Controller>>,
}

async fn probe_loop(target: Target, interval: Duration, offset: Duration, ctx: ProbeCtx, tx: mpsc::Sender<Report>) {
    let (timeout, tls) = (ctx.timeout, &ctx.tls);
    let preamble = if target.proxy_header { crate::proxy::backend::proxy_v2_local_header() } else { Vec::new() };
    let preamble = preamble.as_slice();
    tokio::time::sleep(offset).await;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = match (&target.via, target.tls, tls) {
            (Some(via), _, _) => vip_path(&target, via, &ctx).await,
            (None, false, _) => health::probe(target.kind, target.addr, timeout, None, preamble).await,
            (None, true, Some(t)) => health::probe(target.kind, target.addr, timeout, Some(t), preamble).await,
            (None, true, None) => Err(ProbeError::Io { stage: health::Stage::Tls, source: std::io::Error::other("no usable TLS settings") }),
        };
        if tx.send(Report::Probe { target: target.clone(), result }).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const PROXIED: &str = r#"
[node]
interfaces = ["eth0"]

[[backend]]
name = "mail1"
address = "198.18.0.11"

[[backend]]
name = "mail2"
address = "198.18.0.12"

[[vip]]
name = "mail"
address = "198.18.0.100"
ports = [110, 143, 993, 995]
mode = "local"

[mailbox]
backends = ["mail1", "mail2"]

[proxy]
vip = "mail"
pop3s = []
imaps = []
backend_pop3_port = 10110
backend_imap_port = 10143
"#;

    fn targets_of(toml: &str) -> Vec<Target> {
        targets(&Desired::new(Config::parse(toml, "t.toml").unwrap())).into_iter().collect()
    }

    #[test]
    fn the_proxys_owners_are_probed_on_its_back_end_ports_with_a_proxy_header() {
        let t = targets_of(PROXIED);
        let probed: Vec<(String, String, SocketAddr)> = t.iter().map(|t| (t.backend.clone(), t.check_name(), t.addr)).collect();
        let want = |b: &str, check: &str, addr: &str| (b.to_string(), check.to_string(), addr.parse::<SocketAddr>().unwrap());
        assert_eq!(
            probed,
            vec![
                want("mail1", "pop3+proxy-v2", "198.18.0.11:10110"),
                want("mail1", "imap+proxy-v2", "198.18.0.11:10143"),
                want("mail2", "pop3+proxy-v2", "198.18.0.12:10110"),
                want("mail2", "imap+proxy-v2", "198.18.0.12:10143"),
            ]
        );
    }

    #[test]
    fn with_imap_id_the_owners_are_probed_without_a_header() {
        let t = targets_of(&PROXIED.replace("backend_imap_port = 10143", "backend_imap_port = 10143\npass_client = \"imap-id\""));
        assert_eq!(t.len(), 4);
        assert!(t.iter().all(|t| !t.proxy_header && !t.tls && t.via.is_none()), "{t:?}");
    }

    #[test]
    fn without_a_proxy_mailbox_back_ends_are_not_probed_for_it() {
        let no_proxy = &PROXIED[..PROXIED.find("[proxy]").unwrap()];
        assert!(targets_of(no_proxy).is_empty());
    }
}
