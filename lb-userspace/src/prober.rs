//! Runs the health probes of `mxlb run`: one task per back-end and service (check kind and
//! port), reporting to one supervisor that owns the rise/fall state and tells the
//! [`Controller`] when a back-end goes down or comes back (so a verdict reaches the maps
//! through the same code as a CLI change).
//!
//! The probe targets follow the desired state: a back-end added or removed with the CLI gains
//! or loses its probes within a second.
//!
//! What is probed: each back-end's own address on its VIP's first port, with that VIP's
//! check. In DSR modes real traffic reaches the back-end addressed to the VIP; a back-end
//! that answers on its own address but lost the VIP on its loopback would still pass. Probing
//! the VIP path itself needs packets steered to one chosen back-end (a tc program on the LB's
//! egress, as Katran does); that is left for later and noted in the README.
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
    config::{CheckSetting, HealthConfig},
    control::Controller,
    desired::{Desired, Health},
    health::{self, CheckKind, Ewma, ProbeError, RiseFall},
};

/// One probe: a back-end, a check, an address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub backend: String,
    pub kind: CheckKind,
    pub addr: SocketAddr,
}

/// The probes the desired state calls for, one per back-end, check and port.
pub fn targets(desired: &Desired) -> BTreeSet<Target> {
    let c = &desired.config;
    let mut out = BTreeSet::new();
    for v in &c.vips {
        let kind = match v.check() {
            CheckSetting::None => continue,
            CheckSetting::Tcp => CheckKind::Tcp,
            CheckSetting::Smtp => CheckKind::Smtp,
            CheckSetting::Pop3 => CheckKind::Pop3,
            CheckSetting::Imap => CheckKind::Imap,
        };
        let Some(port) = v.ports.first() else { continue };
        for name in &v.backends {
            if let Some(b) = c.backend(name) {
                out.insert(Target { backend: name.clone(), kind, addr: SocketAddr::new(b.address, *port) });
            }
        }
    }
    out
}

struct Report {
    target: Target,
    result: Result<Duration, ProbeError>,
}

/// Per-target state kept by the supervisor.
struct Tracked {
    task: JoinHandle<()>,
    verdict: RiseFall,
    rtt: Ewma,
    last_error: Option<String>,
}

/// Runs until `stop` turns true.
pub async fn run(controller: Arc<Mutex<Controller>>, settings: HealthConfig, mut stop: watch::Receiver<bool>) {
    let interval = Duration::from_millis(settings.interval_ms);
    let timeout = Duration::from_millis(settings.timeout_ms);
    let (tx, mut rx) = mpsc::channel::<Report>(1024);
    let mut tracked: BTreeMap<Target, Tracked> = BTreeMap::new();
    let mut resync = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = resync.tick() => {
                let wanted = targets(controller.lock().await.desired());
                let gone: Vec<Target> = tracked.keys().filter(|t| !wanted.contains(*t)).cloned().collect();
                for t in gone {
                    if let Some(tr) = tracked.remove(&t) {
                        tr.task.abort();
                    }
                    if !tracked.keys().any(|k| k.backend == t.backend) {
                        // No probe left for it (removed, or its VIP's check turned off).
                        let _ = controller.lock().await.set_health(&t.backend, Health::Up, "no longer probed");
                    }
                }
                for (i, t) in wanted.into_iter().enumerate() {
                    if tracked.contains_key(&t) {
                        continue;
                    }
                    // Spread the probes over the interval rather than all at once.
                    let offset = interval.mul_f64((i % 16) as f64 / 16.0);
                    let task = tokio::spawn(probe_loop(t.clone(), interval, timeout, offset, tx.clone()));
                    tracked.insert(t, Tracked {
                        task,
                        verdict: RiseFall::new(settings.rise, settings.fall),
                        rtt: Ewma::new(0.3),
                        last_error: None,
                    });
                }
            }
            Some(report) = rx.recv() => {
                let Some(tr) = tracked.get_mut(&report.target) else { continue };
                let ok = report.result.is_ok();
                match &report.result {
                    Ok(rtt) => { tr.rtt.update(*rtt); tr.last_error = None; }
                    Err(e) => tr.last_error = Some(e.to_string()),
                }
                if tr.verdict.observe(ok).is_none() {
                    continue;
                }
                let backend = report.target.backend.clone();
                // A back-end is down while any of its probes is down.
                let down: Vec<String> = tracked
                    .iter()
                    .filter(|(t, tr)| t.backend == backend && tr.verdict.is_down())
                    .map(|(t, tr)| format!("{:?} {}: {}", t.kind, t.addr, tr.last_error.as_deref().unwrap_or("failing")))
                    .collect();
                let (health, reason) = if down.is_empty() {
                    let rtt = tracked.get(&report.target).and_then(|tr| tr.rtt.get());
                    (Health::Up, format!("{:?} {} answering (avg {:.1} ms)", report.target.kind, report.target.addr, rtt.unwrap_or_default().as_secs_f64() * 1e3))
                } else {
                    (Health::Down, down.join("; "))
                };
                if let Err(e) = controller.lock().await.set_health(&backend, health, &reason) {
                    warn!(%backend, error = %e, "could not publish a health change");
                }
            }
        }
    }
    for (_, tr) in tracked {
        tr.task.abort();
    }
}

async fn probe_loop(target: Target, interval: Duration, timeout: Duration, offset: Duration, tx: mpsc::Sender<Report>) {
    tokio::time::sleep(offset).await;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = health::probe(target.kind, target.addr, timeout).await;
        if tx.send(Report { target: target.clone(), result }).await.is_err() {
            return;
        }
    }
}
