//! What the CLI shows: VIP and back-end listings (desired state joined with what the data path
//! holds) and counter samples for rates. Plain data with `Serialize`, so `--json` prints
//! exactly what the table shows.
use std::{collections::BTreeMap, net::IpAddr, time::Instant};

use lb_common::{Counters, addr_to_key, port_to_key};
use serde::Serialize;

use crate::{control::state_name, desired::Desired, maps::{DataplaneMaps, MapsError, Snapshot}};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BackendRow {
    pub name: String,
    pub address: IpAddr,
    /// Admin weight (config + CLI).
    pub weight: u32,
    pub drained: bool,
    /// State in the data path: up, draining, down; `unused` when no VIP uses it, `not-loaded`
    /// when no agent has pinned maps yet.
    pub state: String,
    pub id: Option<u32>,
    pub mac: Option<String>,
    pub vips: Vec<String>,
    pub counters: Counters,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct VipRow {
    pub name: String,
    pub address: IpAddr,
    pub mode: String,
    pub backends: Vec<String>,
    /// Whether the data path has this VIP (false before `mxlb run`).
    pub active: bool,
    pub ports: Vec<PortRow>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct PortRow {
    pub port: u16,
    pub counters: Counters,
}

/// The maps as read once for one listing (a snapshot walks every back-end slot).
pub struct MapsView<'a> {
    maps: Option<&'a DataplaneMaps>,
    snap: Option<Snapshot>,
}

impl<'a> MapsView<'a> {
    /// Reads the maps' state now (nothing when no maps are pinned yet).
    pub fn read(maps: Option<&'a DataplaneMaps>) -> Result<MapsView<'a>, MapsError> {
        Ok(MapsView { maps, snap: maps.map(|m| m.snapshot()).transpose()? })
    }
}

pub fn backends(desired: &Desired, view: &MapsView) -> Result<Vec<BackendRow>, MapsError> {
    let (maps, snap) = (view.maps, &view.snap);
    let c = &desired.config;
    let mut rows = Vec::new();
    for b in &c.backends {
        let key = addr_to_key(b.address);
        let entry = snap.as_ref().and_then(|s| s.backends.iter().find(|(_, e)| e.addr == key));
        let counters = match (maps, entry) {
            (Some(m), Some((id, _))) => m.backend_counters(*id)?,
            _ => Counters::default(),
        };
        rows.push(BackendRow {
            name: b.name.clone(),
            address: b.address,
            weight: b.weight,
            drained: desired.drained.contains(&b.name),
            state: match (&snap, entry) {
                (None, _) => "not-loaded".into(),
                (Some(_), None) => "unused".into(),
                (Some(_), Some((_, e))) => state_name(e.state).into(),
            },
            id: entry.map(|(id, _)| *id),
            mac: entry.map(|(_, e)| crate::config::MacAddr(e.mac).to_string()),
            vips: c.vips.iter().filter(|v| v.backends.contains(&b.name)).map(|v| v.name.clone()).collect(),
            counters,
        });
    }
    Ok(rows)
}

pub fn vips(desired: &Desired, view: &MapsView) -> Result<Vec<VipRow>, MapsError> {
    let (maps, snap) = (view.maps, &view.snap);
    let mut rows = Vec::new();
    for v in &desired.config.vips {
        let addr = addr_to_key(v.address);
        let mut ports = Vec::new();
        let mut active = false;
        for p in &v.ports {
            let meta = snap
                .as_ref()
                .and_then(|s| s.vips.iter().find(|(k, _)| k.addr == addr && k.port == port_to_key(*p)))
                .map(|(_, m)| *m);
            active |= meta.is_some();
            let counters = match (maps, meta) {
                (Some(m), Some(meta)) => m.vip_counters(meta.id)?,
                _ => Counters::default(),
            };
            ports.push(PortRow { port: *p, counters });
        }
        rows.push(VipRow {
            name: v.name.clone(),
            address: v.address,
            mode: v.mode.as_str().into(),
            backends: v.backends.clone(),
            active,
            ports,
        });
    }
    Ok(rows)
}

/// Counters at one instant.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    /// "vip:port" → counters.
    pub vips: BTreeMap<String, Counters>,
    /// back-end name → counters.
    pub backends: BTreeMap<String, Counters>,
    pub reasons: BTreeMap<String, Counters>,
}

pub fn sample(desired: &Desired, maps: &DataplaneMaps) -> Result<Sample, MapsError> {
    let at = Instant::now();
    let view = MapsView::read(Some(maps))?;
    let vips = vips(desired, &view)?
        .into_iter()
        .flat_map(|v| v.ports.into_iter().map(move |p| (format!("{}:{}", v.name, p.port), p.counters)))
        .collect();
    let backends = backends(desired, &view)?.into_iter().map(|b| (b.name, b.counters)).collect();
    let reasons = maps.reason_counters()?.into_iter().map(|(r, c)| (r.name().to_string(), c)).collect();
    Ok(Sample { at, vips, backends, reasons })
}

/// Per-second rates between two samples, with the totals of the later one.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Rate {
    pub name: String,
    pub packets_per_s: f64,
    pub bytes_per_s: f64,
    pub new_flows_per_s: f64,
    pub total: Counters,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Rates {
    pub interval_s: f64,
    pub vips: Vec<Rate>,
    pub backends: Vec<Rate>,
    pub reasons: Vec<Rate>,
}

pub fn rates(before: &Sample, after: &Sample) -> Rates {
    let dt = after.at.duration_since(before.at).as_secs_f64().max(1e-6);
    let diff = |a: &BTreeMap<String, Counters>, b: &BTreeMap<String, Counters>| -> Vec<Rate> {
        b.iter()
            .map(|(name, now)| {
                let then = a.get(name).copied().unwrap_or_default();
                Rate {
                    name: name.clone(),
                    packets_per_s: now.packets.saturating_sub(then.packets) as f64 / dt,
                    bytes_per_s: now.bytes.saturating_sub(then.bytes) as f64 / dt,
                    new_flows_per_s: now.new_flows.saturating_sub(then.new_flows) as f64 / dt,
                    total: *now,
                }
            })
            .collect()
    };
    Rates {
        interval_s: dt,
        vips: diff(&before.vips, &after.vips),
        backends: diff(&before.backends, &after.backends),
        reasons: diff(&before.reasons, &after.reasons),
    }
}

/// `mxlb queue list`: one block per message, as Postfix's mailq shows it (id, size, age,
/// sender), then one line per recipient with its state, attempts and last reply.
pub fn queue_table(entries: &[crate::relay::service::QueueEntry], now: u64) -> String {
    use crate::relay::RcptState;
    use std::fmt::Write as _;
    let mut out = String::new();
    if entries.is_empty() {
        out.push_str("queue empty\n");
        return out;
    }
    let _ = writeln!(out, "{:<24} {:>9} {:>8} {:<8} SENDER", "ID", "SIZE", "AGE", "AREA");
    for e in entries {
        let env = &e.envelope;
        let sender = if env.mail_from.is_empty() { "<>" } else { env.mail_from.as_str() };
        let age = now.saturating_sub(env.accepted_at);
        let _ = writeln!(out, "{:<24} {:>9} {:>7}s {:<8} {sender}", env.id, env.size, age, e.area);
        for r in &env.rcpts {
            let state = match &r.state {
                RcptState::Pending { attempts, next_attempt, last_reply } => format!(
                    "pending, {attempts} attempt(s), next in {}s{}",
                    next_attempt.saturating_sub(now),
                    last_reply.as_ref().map(|l| format!(": {l}")).unwrap_or_default()
                ),
                RcptState::Delivered { reply } => format!("delivered: {reply}"),
                RcptState::Bounced { reply } => format!("bounced: {reply}"),
            };
            let _ = writeln!(out, "    {:<40} {state}", r.address);
        }
    }
    let _ = writeln!(out, "{} message(s)", entries.len());
    out
}

/// `mxlb mailbox where`: the owner and why, or that the mailbox exists nowhere.
pub fn whereabouts(w: &crate::mailbox::Whereabouts) -> String {
    let reported = match w.reported_by.as_slice() {
        [] => String::new(),
        r => format!("; reported by {}", r.join(", ")),
    };
    match &w.owner {
        None => format!("{}: exists on no back-end (every back-end reported its list){reported}\n", w.mailbox),
        Some(o) => format!(
            "{}: {} ({}), {}{}{reported}\n",
            w.mailbox,
            o.backend,
            o.address,
            source_text(o.source),
            if o.healthy { "" } else { ", DOWN" }
        ),
    }
}

fn source_text(s: crate::mailbox::Source) -> &'static str {
    match s {
        crate::mailbox::Source::Table => "from the table",
        crate::mailbox::Source::Learned => "learned from the back-ends",
        crate::mailbox::Source::Hashed => "by consistent hashing",
    }
}

/// `mxlb mailbox list`: one line per mailbox, then each back-end's list state.
pub fn mailbox_table(l: &crate::mailbox::service::MailboxListing) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "{:<40} {:<16} SOURCE", "MAILBOX", "BACK-END");
    for e in &l.mailboxes {
        let _ = writeln!(out, "{:<40} {:<16} {}", e.mailbox, e.backend, source_text(e.source));
    }
    let _ = writeln!(out, "{} mailbox(es)\n", l.mailboxes.len());
    let _ = writeln!(out, "{:<16} {:>9} {:<12} LAST ERROR", "BACK-END", "MAILBOXES", "FETCHED AT");
    for b in &l.backends {
        let at = b.fetched_at.map(|t| t.to_string()).unwrap_or_else(|| "never".into());
        let _ = writeln!(out, "{:<16} {:>9} {:<12} {}", b.backend, b.mailboxes, at, b.last_error.as_deref().unwrap_or("-"));
    }
    out
}
