//! Prometheus metrics (`/metrics`, address in `[node] metrics_listen`) and the status that
//! `mxlb status` prints: per-VIP and per-back-end counters from the data path's maps, health and
//! load state, admin and effective weights, probe latency histograms, and every data-path
//! decision (dropped, shed, passed) by reason.
//!
//! Counters live in the BPF maps and state in the controller, so they are read at scrape time
//! (a [`Collector`]); probe latencies are observed as they happen (histograms).
use std::{net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::Histogram,
    },
    registry::Registry,
};
use serde::Serialize;
use tokio::{net::TcpListener, sync::Mutex};
use tracing::{info, warn};

use crate::{control::Controller, report};

/// Labels of the probe metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub backend: String,
    pub check: String,
}

/// One back-end at a glance (`mxlb status`, and the source of the per-back-end gauges).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct BackendStatus {
    pub name: String,
    pub address: std::net::IpAddr,
    /// State in the data path: up, draining, down, unused.
    pub state: String,
    /// What the probes say (up/down), before drains.
    pub health: String,
    pub admin_weight: u32,
    /// Weight in the Maglev tables now (admin × load share; 0 when drained or down).
    pub effective_weight: u32,
    pub load_share: f64,
    /// Why it is drained for overload, if it is.
    pub overloaded: Option<String>,
    pub drained_by_operator: bool,
    /// Probes' moving-average response time.
    pub probe_ms: Option<f64>,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// Everything `mxlb status` shows.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Status {
    pub backends: Vec<BackendStatus>,
    pub vips: Vec<report::VipRow>,
    /// Data-path decisions (packets) by reason: forwarded, dropped, passed, shed.
    pub decisions: Vec<(String, u64)>,
    /// VRRP instances: state, priority, master, counters.
    #[serde(default)]
    pub vrrp: Vec<crate::vrrp::InstanceStatus>,
    /// The relay's queue and mirror, when this node runs one.
    #[serde(default)]
    pub relay: Option<crate::relay::service::RelaySnapshot>,
    /// The POP3/IMAP proxy's counters, when this node runs one.
    #[serde(default)]
    pub proxy: Option<crate::proxy::Snapshot>,
}

/// The agent's metrics: the probe histograms, and a collector reading the rest on scrape.
pub struct Metrics {
    registry: Registry,
    probe_duration: Family<ProbeLabels, Histogram>,
    probe_failures: Family<ProbeLabels, Counter>,
    current: Arc<std::sync::Mutex<Option<Status>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

#[derive(Debug)]
struct StatusCollector(Arc<std::sync::Mutex<Option<Status>>>);

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mxlb");
        let probe_duration = Family::<ProbeLabels, Histogram>::new_with_constructor(|| {
            // 0.5 ms .. ~4 s
            Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0])
        });
        registry.register("probe_duration_seconds", "Duration of successful health probes", probe_duration.clone());
        let probe_failures = Family::<ProbeLabels, Counter>::default();
        registry.register("probe_failures", "Failed health probes", probe_failures.clone());
        let current = Arc::new(std::sync::Mutex::new(None));
        registry.register_collector(Box::new(StatusCollector(current.clone())));
        Metrics { registry, probe_duration, probe_failures, current }
    }

    /// Exports the proxy's counters (`mxlb_proxy_*`).
    pub fn register_proxy(&mut self, proxy: Arc<crate::proxy::Proxy>) {
        self.registry.register_collector(Box::new(ProxyCollector(proxy)));
    }

    /// Exports the relay's counters (`mxlb_relay_*`).
    pub fn register_relay(&mut self, relay: Arc<crate::relay::service::Relay>) {
        self.registry.register_collector(Box::new(RelayCollector(relay)));
    }

    /// Records one probe result.
    pub fn observe_probe(&self, backend: &str, check: &str, result: Result<Duration, ()>) {
        let labels = ProbeLabels { backend: backend.to_string(), check: check.to_string() };
        match result {
            Ok(d) => self.probe_duration.get_or_create(&labels).observe(d.as_secs_f64()),
            Err(()) => {
                self.probe_failures.get_or_create(&labels).inc();
            }
        }
    }

    /// The text exposition of everything, with `status` as the current state.
    pub fn render(&self, status: Status) -> Result<String, std::fmt::Error> {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = guard.as_ref() else { return Ok(()) };
        type Pick = fn(&BackendStatus) -> f64;
        let counters: [(&str, &str, fn(&BackendStatus) -> u64); 3] = [
            ("backend_packets", "Packets forwarded to the back-end", |b| b.packets),
            ("backend_bytes", "Bytes forwarded to the back-end (as received)", |b| b.bytes),
            ("backend_new_flows", "Flows for which the back-end was newly selected", |b| b.new_flows),
        ];
        for (name, help, pick) in counters {
            let mut me = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for b in &s.backends {
                ConstCounter::new(pick(b)).encode(me.encode_family(&[("backend", b.name.as_str())])?)?;
            }
        }
        let gauges: [(&str, &str, Pick); 5] = [
            ("backend_up", "1 when the probes say the back-end is up", |b| (b.health == "up") as u8 as f64),
            ("backend_admin_weight", "Weight set by the operator", |b| b.admin_weight as f64),
            ("backend_effective_weight", "Weight in the Maglev tables now", |b| b.effective_weight as f64),
            ("backend_load_share", "Share of the admin weight granted for its load", |b| b.load_share),
            ("backend_overloaded", "1 while drained for overload", |b| b.overloaded.is_some() as u8 as f64),
        ];
        for (name, help, pick) in gauges {
            let mut me = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for b in &s.backends {
                ConstGauge::new(pick(b)).encode(me.encode_family(&[("backend", b.name.as_str())])?)?;
            }
        }
        let mut me = encoder.encode_descriptor("backend_state", "1 for the back-end's state in the data path", None, MetricType::Gauge)?;
        for b in &s.backends {
            for st in ["up", "draining", "down"] {
                ConstGauge::new((b.state == st) as i64).encode(me.encode_family(&[("backend", b.name.as_str()), ("state", st)])?)?;
            }
        }
        let vip_counters: [(&str, &str, fn(&lb_common::Counters) -> u64); 3] = [
            ("vip_packets", "Packets to the VIP port", |c| c.packets),
            ("vip_bytes", "Bytes to the VIP port", |c| c.bytes),
            ("vip_new_flows", "New flows to the VIP port", |c| c.new_flows),
        ];
        for (name, help, pick) in vip_counters {
            let mut me = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for v in &s.vips {
                for p in &v.ports {
                    let port = p.port.to_string();
                    ConstCounter::new(pick(&p.counters))
                        .encode(me.encode_family(&[("vip", v.name.as_str()), ("port", port.as_str())])?)?;
                }
            }
        }
        let mut me = encoder.encode_descriptor(
            "decisions",
            "Data-path decisions by reason (forwarded, dropped, passed, shed)",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in &s.decisions {
            ConstCounter::new(*n).encode(me.encode_family(&[("reason", reason.as_str())])?)?;
        }
        let mut me = encoder.encode_descriptor("vrrp_state", "1 for the VRRP instance's state", None, MetricType::Gauge)?;
        for r in &s.vrrp {
            for st in ["MASTER", "BACKUP", "FAULT", "STOP"] {
                ConstGauge::new((r.state.name() == st) as i64).encode(me.encode_family(&[("instance", r.name.as_str()), ("state", st)])?)?;
            }
        }
        type VrrpPick = fn(&crate::vrrp::InstanceStatus) -> u64;
        let vrrp_gauges: [(&str, &str, VrrpPick); 2] = [
            ("vrrp_priority", "Effective VRRP priority (configured, adjusted by tracking)", |r| r.priority as u64),
            ("vrrp_configured_priority", "Configured VRRP priority", |r| r.configured_priority as u64),
        ];
        for (name, help, pick) in vrrp_gauges {
            let mut me = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for r in &s.vrrp {
                ConstGauge::new(pick(r) as i64).encode(me.encode_family(&[("instance", r.name.as_str())])?)?;
            }
        }
        let vrrp_counters: [(&str, &str, VrrpPick); 4] = [
            ("vrrp_transitions", "VRRP state changes", |r| r.transitions),
            ("vrrp_became_master", "Times the instance became master", |r| r.became_master),
            ("vrrp_adverts_sent", "VRRP advertisements sent", |r| r.adverts_sent),
            ("vrrp_adverts_received", "Valid VRRP advertisements received for this VRID", |r| r.adverts_received),
        ];
        for (name, help, pick) in vrrp_counters {
            let mut me = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for r in &s.vrrp {
                ConstCounter::new(pick(r)).encode(me.encode_family(&[("instance", r.name.as_str())])?)?;
            }
        }
        let mut me = encoder.encode_descriptor("vrrp_dropped", "Received VRRP packets dropped, by reason", None, MetricType::Counter)?;
        for r in &s.vrrp {
            for (reason, n) in &r.dropped {
                ConstCounter::new(*n).encode(me.encode_family(&[("instance", r.name.as_str()), ("reason", reason.as_str())])?)?;
            }
        }
        Ok(())
    }
}

struct ProxyCollector(Arc<crate::proxy::Proxy>);

impl std::fmt::Debug for ProxyCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProxyCollector")
    }
}

impl Collector for ProxyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.snapshot();
        let counters: [(&str, &str, u64); 7] = [
            ("proxy_sessions", "POP3/IMAP connections accepted", s.sessions),
            ("proxy_sessions_refused", "Connections refused by max_sessions or max_sessions_per_source", s.sessions_refused),
            ("proxy_logins_ok", "Logins the owner accepted", s.logins_ok),
            ("proxy_logins_failed", "Failed logins (wrong password or unknown user)", s.logins_failed),
            ("proxy_logins_blocked", "Logins answered 'try later' because their source is blocked", s.logins_blocked),
            ("proxy_logins_slowed", "Failure answers delayed by the per-source limiter", s.logins_slowed),
            ("proxy_logins_unavailable", "Logins answered 'try later' because the owner was down or unreachable", s.logins_unavailable),
        ];
        for (name, help, n) in counters {
            let me = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(n).encode(me)?;
        }
        let mut me = encoder.encode_descriptor("proxy_relayed", "Logged-in sessions relayed to their end, by path (sockmap: kernel splice; copy: userspace)", None, MetricType::Counter)?;
        for (path, n) in [("copy", s.relayed_copy), ("sockmap", s.relayed_sockmap)] {
            ConstCounter::new(n).encode(me.encode_family(&[("path", path)])?)?;
        }
        let me = encoder.encode_descriptor("proxy_ended_by_move", "Sessions ended because their mailbox moved", None, MetricType::Counter)?;
        ConstCounter::new(s.ended_by_move).encode(me)?;
        let me = encoder.encode_descriptor("proxy_active_sessions", "Open POP3/IMAP sessions", None, MetricType::Gauge)?;
        ConstGauge::new(s.active as i64).encode(me)?;
        Ok(())
    }
}

struct RelayCollector(Arc<crate::relay::service::Relay>);

impl std::fmt::Debug for RelayCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RelayCollector")
    }
}

impl Collector for RelayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.snapshot();
        let counters: [(&str, &str, u64); 7] = [
            ("relay_accepted", "Messages answered 250 (stored on both nodes, or this one in degraded mode)", s.accepted),
            ("relay_refused_unstored", "Messages answered 451 because no second copy (or no local copy) was possible", s.refused_unstored),
            ("relay_mirror_copies_confirmed", "Copies the peer confirmed as durable", s.copies_confirmed),
            ("relay_mirror_copies_failed", "Copies the peer did not confirm", s.copies_failed),
            ("relay_accepted_unmirrored", "Messages accepted on this node's disk only (degraded mode): the alarm", s.accepted_unmirrored),
            ("relay_mirror_resynced", "Copies sent again to a returning peer", s.resynced),
            ("relay_taken_over", "The peer's messages taken over after it died", s.taken_over),
        ];
        for (name, help, n) in counters {
            let me = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(n).encode(me)?;
        }
        let mut gauges: Vec<(&str, &str, i64)> = vec![
            ("relay_queued", "Messages in this node's queue", s.queued as i64),
            ("relay_replicas", "Copies held for the peer", s.replicas as i64),
        ];
        if let Some(up) = s.mirror_connected {
            gauges.push(("relay_mirror_connected", "1 while the link to the peer is up", up as i64));
        }
        for (name, help, n) in gauges {
            let me = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(n).encode(me)?;
        }
        Ok(())
    }
}

/// Serves `/metrics` on `addr` until `stop` resolves.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    controller: Arc<Mutex<Controller>>,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    info!(%addr, "metrics on http://{addr}/metrics");
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let (metrics, controller) = (metrics.clone(), controller.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (metrics, controller) = (metrics.clone(), controller.clone());
                        async move { Ok::<_, std::convert::Infallible>(respond(req, &metrics, &controller).await) }
                    });
                    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    if let Err(e) = tokio::time::timeout(Duration::from_secs(30), conn).await.unwrap_or(Ok(())) {
                        warn!(error = %e, "metrics connection");
                    }
                });
            }
        }
    }
}

async fn respond(req: Request<hyper::body::Incoming>, metrics: &Metrics, controller: &Mutex<Controller>) -> Response<Full<Bytes>> {
    let reply = |code: u16, ctype: &str, body: String| {
        Response::builder()
            .status(code)
            .header("Content-Type", ctype)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    };
    if req.method() != hyper::Method::GET || req.uri().path() != "/metrics" {
        return reply(404, "text/plain", "not found: try /metrics\n".into());
    }
    let status = controller.lock().await.status();
    match status.map_err(|e| e.to_string()).and_then(|s| metrics.render(s).map_err(|e| e.to_string())) {
        Ok(text) => reply(200, "text/plain; version=0.0.4; charset=utf-8", text),
        Err(e) => reply(500, "text/plain", format!("{e}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vrrp::{InstanceStatus, instance::State};

    #[test]
    fn vrrp_instances_are_exported() {
        let vrrp = InstanceStatus {
            name: "smtp".into(),
            vrid: 51,
            interface: "eth0".into(),
            family: "ipv4".into(),
            state: State::Master,
            priority: 90,
            configured_priority: 150,
            master: None,
            addresses: vec![],
            sync_group: None,
            failing_tracks: vec!["mx has 1 healthy back-ends, needs 2".into()],
            transitions: 3,
            became_master: 2,
            adverts_sent: 40,
            adverts_received: 7,
            dropped: [("checksum".to_string(), 5u64)].into(),
        };
        let status = Status { backends: vec![], vips: vec![], decisions: vec![], vrrp: vec![vrrp], relay: None, proxy: None };
        let text = Metrics::new().render(status).unwrap();
        for want in [
            "mxlb_vrrp_state{instance=\"smtp\",state=\"MASTER\"} 1",
            "mxlb_vrrp_state{instance=\"smtp\",state=\"BACKUP\"} 0",
            "mxlb_vrrp_priority{instance=\"smtp\"} 90",
            "mxlb_vrrp_configured_priority{instance=\"smtp\"} 150",
            "mxlb_vrrp_transitions_total{instance=\"smtp\"} 3",
            "mxlb_vrrp_became_master_total{instance=\"smtp\"} 2",
            "mxlb_vrrp_adverts_sent_total{instance=\"smtp\"} 40",
            "mxlb_vrrp_adverts_received_total{instance=\"smtp\"} 7",
            "mxlb_vrrp_dropped_total{instance=\"smtp\",reason=\"checksum\"} 5",
        ] {
            assert!(text.contains(want), "missing `{want}` in:\n{text}");
        }
    }
}
