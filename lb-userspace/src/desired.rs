//! Desired state: the config file plus the operator's CLI changes, and the one function
//! ([`plan`]) that turns that intent and observed health into what the data path must do.
//!
//! Why a change log and not a snapshot: CLI changes must survive restarts (architecture
//! principle 2), but an operator who later edits the config file expects those edits to take
//! effect too. So the CLI's changes are kept as a short, compacted list of operations
//! ([`Change`]) in `state_dir/changes.json` and replayed over the config at every start. A
//! change that no longer applies (its back-end was removed from the file) is skipped with a
//! warning rather than blocking the start.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use lb_common::LbConfig;
use serde::{Deserialize, Serialize};

use crate::config::{BackendConfig, Config, ForwardingMode, MAX_WEIGHT, VipConfig, validate_name};

/// One operator change, as made with the CLI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    VipAdd { vip: VipConfig },
    VipRemove { name: String },
    /// Adds a back-end and puts it in the pools of `vips` (all non-local VIPs when empty).
    BackendAdd { backend: BackendConfig, vips: Vec<String> },
    BackendRemove { name: String },
    Weight { name: String, weight: u32 },
    Drain { name: String },
    Undrain { name: String },
}

impl Change {
    /// The object the change is about (for compaction).
    fn subject(&self) -> &str {
        match self {
            Change::VipAdd { vip } => &vip.name,
            Change::BackendAdd { backend, .. } => &backend.name,
            Change::VipRemove { name }
            | Change::BackendRemove { name }
            | Change::Weight { name, .. }
            | Change::Drain { name }
            | Change::Undrain { name } => name,
        }
    }

    fn is_vip(&self) -> bool {
        matches!(self, Change::VipAdd { .. } | Change::VipRemove { .. })
    }
}

/// Why a change was refused. Nothing is modified when this is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("no VIP is named `{0}`")]
    UnknownVip(String),
    #[error("no back-end is named `{0}`")]
    UnknownBackend(String),
    #[error("a VIP named `{0}` already exists")]
    VipExists(String),
    #[error("a back-end named `{0}` already exists")]
    BackendExists(String),
    #[error("weight {0} is out of range (0 to {MAX_WEIGHT})")]
    WeightRange(u32),
    #[error("{0}")]
    Invalid(String),
}

/// The operator's intent: the effective configuration and the drained back-ends.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub config: Config,
    pub drained: BTreeSet<String>,
}

impl Desired {
    pub fn new(config: Config) -> Desired {
        Desired { config, drained: BTreeSet::new() }
    }

    /// Applies one change, or refuses it and leaves `self` untouched.
    pub fn apply(&mut self, change: &Change) -> Result<(), ChangeError> {
        let mut next = self.clone();
        next.apply_unchecked(change)?;
        let problems = next.config.validate();
        if let Some(p) = problems.first() {
            return Err(ChangeError::Invalid(format!("{}: {}", p.path, p.message)));
        }
        *self = next;
        Ok(())
    }

    fn apply_unchecked(&mut self, change: &Change) -> Result<(), ChangeError> {
        let c = &mut self.config;
        match change {
            Change::VipAdd { vip } => {
                validate_name(&vip.name).map_err(ChangeError::Invalid)?;
                if c.vip(&vip.name).is_some() {
                    return Err(ChangeError::VipExists(vip.name.clone()));
                }
                if let Some(b) = vip.backends.iter().find(|b| c.backend(b).is_none()) {
                    return Err(ChangeError::UnknownBackend(b.clone()));
                }
                c.vips.push(vip.clone());
            }
            Change::VipRemove { name } => {
                let before = c.vips.len();
                c.vips.retain(|v| &v.name != name);
                if c.vips.len() == before {
                    return Err(ChangeError::UnknownVip(name.clone()));
                }
            }
            Change::BackendAdd { backend, vips } => {
                validate_name(&backend.name).map_err(ChangeError::Invalid)?;
                if c.backend(&backend.name).is_some() {
                    return Err(ChangeError::BackendExists(backend.name.clone()));
                }
                if backend.weight > MAX_WEIGHT {
                    return Err(ChangeError::WeightRange(backend.weight));
                }
                if let Some(v) = vips.iter().find(|v| c.vip(v).is_none()) {
                    return Err(ChangeError::UnknownVip(v.clone()));
                }
                c.backends.push(backend.clone());
                for v in c.vips.iter_mut() {
                    let wanted = if vips.is_empty() { v.mode != ForwardingMode::Local } else { vips.contains(&v.name) };
                    if wanted && !v.backends.contains(&backend.name) {
                        v.backends.push(backend.name.clone());
                    }
                }
            }
            Change::BackendRemove { name } => {
                if c.backend(name).is_none() {
                    return Err(ChangeError::UnknownBackend(name.clone()));
                }
                c.backends.retain(|b| &b.name != name);
                for v in c.vips.iter_mut() {
                    v.backends.retain(|b| b != name);
                }
                self.drained.remove(name);
            }
            Change::Weight { name, weight } => {
                if *weight > MAX_WEIGHT {
                    return Err(ChangeError::WeightRange(*weight));
                }
                let b = c.backends.iter_mut().find(|b| &b.name == name);
                b.ok_or_else(|| ChangeError::UnknownBackend(name.clone()))?.weight = *weight;
            }
            Change::Drain { name } | Change::Undrain { name } => {
                if c.backend(name).is_none() {
                    return Err(ChangeError::UnknownBackend(name.clone()));
                }
                if matches!(change, Change::Drain { .. }) {
                    self.drained.insert(name.clone());
                } else {
                    self.drained.remove(name);
                }
            }
        }
        Ok(())
    }
}

/// The persisted list of CLI changes (`state_dir/changes.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChangeLog {
    pub changes: Vec<Change>,
}

pub use crate::statefile::StateError;

impl ChangeLog {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("changes.json")
    }

    /// Loads the log; a missing file is an empty log.
    pub fn load(state_dir: &Path) -> Result<ChangeLog, StateError> {
        crate::statefile::load(&Self::path(state_dir), "change log")
    }

    /// Writes the log atomically and durably ([`crate::statefile::save`]).
    pub fn save(&self, state_dir: &Path) -> Result<(), StateError> {
        crate::statefile::save(state_dir, "changes.json", self)
    }

    /// Appends a change, dropping earlier ones it makes irrelevant, so the log stays as short
    /// as the set of things the operator actually changed.
    pub fn record(&mut self, change: Change) {
        let subject = change.subject().to_string();
        let is_vip = change.is_vip();
        let same = |c: &Change| c.subject() == subject && c.is_vip() == is_vip;
        match &change {
            Change::Weight { .. } => self.changes.retain(|c| !(same(c) && matches!(c, Change::Weight { .. }))),
            Change::Drain { .. } | Change::Undrain { .. } => self
                .changes
                .retain(|c| !(same(c) && matches!(c, Change::Drain { .. } | Change::Undrain { .. }))),
            Change::VipRemove { .. } | Change::BackendRemove { .. } => self.changes.retain(|c| !same(c)),
            Change::VipAdd { .. } | Change::BackendAdd { .. } => {}
        }
        self.changes.push(change);
    }

    /// Replays the log over `config`. Changes that no longer apply are returned with the
    /// reason, and skipped.
    pub fn replay(&self, config: Config) -> (Desired, Vec<(Change, ChangeError)>) {
        let mut desired = Desired::new(config);
        let mut skipped = Vec::new();
        for change in &self.changes {
            if let Err(e) = desired.apply(change) {
                skipped.push((change.clone(), e));
            }
        }
        (desired, skipped)
    }
}

/// Observed health of a back-end (filled by the health prober; absent = up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Up,
    Down,
}

/// A back-end's load as the load policy judges it (from its agent's report and the probes'
/// response times; absent = share 1.0, not overloaded).
#[derive(Debug, Clone, PartialEq)]
pub struct Load {
    /// Share of the admin weight it should get, in (0, 1].
    pub share: f64,
    /// Set while it is overloaded: drained, with the reason.
    pub overloaded: Option<String>,
}

/// What the data path must hold: the output of [`plan`], the input of `maps::apply`.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub backends: Vec<PlannedBackend>,
    pub vips: Vec<PlannedVip>,
    pub encap: LbConfig,
    /// Client-group prefixes → minimum VIP capacity (percent) to be served.
    pub groups: Vec<(lb_common::PrefixKey, u32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlannedBackend {
    pub name: String,
    pub address: IpAddr,
    pub mac: [u8; 6],
    /// One of `lb_common::state`.
    pub state: u8,
    /// Weight in the Maglev tables (0 when draining or down).
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlannedVip {
    pub name: String,
    pub address: IpAddr,
    pub ports: Vec<u16>,
    pub mode: ForwardingMode,
    /// Back-end names in the pool.
    pub members: Vec<String>,
    /// Hand new flows to the local tempfail responder when no back-end can take them.
    pub shed: bool,
    /// Share of the admin weight of its back-ends that can take sessions now, in percent.
    pub capacity: u8,
    /// Another node is (or may be) the VRRP master: the data path passes its packets.
    pub standby: bool,
}

/// Turns intent and health into the data path's state (architecture principle 1: the CLI,
/// the health policy and VRRP all feed this one function; `maps::apply` is the one writer).
///
/// - Maglev weight = admin weight × load share (at least 1 while both are positive); drained
///   (by the operator or for overload) or down → weight 0 and state DRAINING / DOWN;
/// - back-ends that no VIP uses are left out of the data path;
/// - `macs` gives each back-end's resolved MAC (config `mac` wins).
/// - `standby` names the VIPs whose VRRP instance is not master on this node.
pub fn plan(
    desired: &Desired,
    health: &BTreeMap<String, Health>,
    load: &BTreeMap<String, Load>,
    macs: &BTreeMap<IpAddr, [u8; 6]>,
    encap: LbConfig,
    standby: &BTreeSet<String>,
) -> Plan {
    let c = &desired.config;
    let used = c.used_backends();
    let backends: Vec<PlannedBackend> = c
        .backends
        .iter()
        .filter(|b| used.contains(b.name.as_str()))
        .map(|b| {
            let down = health.get(&b.name) == Some(&Health::Down);
            let load = load.get(&b.name);
            let drained = desired.drained.contains(&b.name) || load.is_some_and(|l| l.overloaded.is_some());
            let share = load.map_or(1.0, |l| l.share.clamp(0.0, 1.0));
            let state = if down {
                lb_common::state::DOWN
            } else if drained {
                lb_common::state::DRAINING
            } else {
                lb_common::state::UP
            };
            PlannedBackend {
                name: b.name.clone(),
                address: b.address,
                mac: b.mac.map(|m| m.0).or_else(|| macs.get(&b.address).copied()).unwrap_or([0; 6]),
                state,
                weight: match state {
                    lb_common::state::UP if b.weight > 0 && share > 0.0 => ((b.weight as f64 * share).round() as u32).max(1),
                    _ => 0,
                },
            }
        })
        .collect();
    let vips = c
        .vips
        .iter()
        .map(|v| {
            let (now, full) = v.backends.iter().fold((0u64, 0u64), |(now, full), name| {
                let admin = c.backend(name).map_or(0, |b| b.weight) as u64;
                let effective = backends.iter().find(|b: &&PlannedBackend| &b.name == name).map_or(0, |b| b.weight) as u64;
                (now + effective.min(admin), full + admin)
            });
            PlannedVip {
                name: v.name.clone(),
                address: v.address,
                ports: v.ports.clone(),
                mode: v.mode,
                members: v.backends.clone(),
                shed: v.shed && v.mode != ForwardingMode::Local,
                capacity: if full == 0 { 0 } else { (100 * now / full) as u8 },
                standby: standby.contains(&v.name),
            }
        })
        .collect();
    let groups = c
        .client_groups
        .iter()
        .flat_map(|g| g.cidrs.iter().filter_map(move |cidr| cidr.parse::<crate::edge::Cidr>().ok().map(|k| (k.key(), g.min_capacity as u32))))
        .collect();
    Plan { backends, vips, encap, groups }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use lb_common::state;

    fn desired() -> Desired {
        Desired::new(Config::embedded_default())
    }

    fn backend(name: &str, addr: &str) -> BackendConfig {
        BackendConfig { name: name.into(), address: addr.parse().unwrap(), weight: 50, mac: None, agent_port: None }
    }

    #[test]
    fn changes_apply_and_bad_ones_change_nothing() {
        let mut d = desired();
        d.apply(&Change::Weight { name: "mail1".into(), weight: 700 }).unwrap();
        assert_eq!(d.config.backend("mail1").unwrap().weight, 700);
        let before = d.clone();
        assert_eq!(d.apply(&Change::Weight { name: "nope".into(), weight: 1 }), Err(ChangeError::UnknownBackend("nope".into())));
        assert_eq!(d.apply(&Change::Weight { name: "mail1".into(), weight: 1001 }), Err(ChangeError::WeightRange(1001)));
        assert_eq!(d.apply(&Change::Drain { name: "x".into() }), Err(ChangeError::UnknownBackend("x".into())));
        assert_eq!(d.apply(&Change::VipRemove { name: "x".into() }), Err(ChangeError::UnknownVip("x".into())));
        // Address already used by mail1: caught by validate().
        let e = d.apply(&Change::BackendAdd { backend: backend("dup", "198.18.0.11"), vips: vec![] }).unwrap_err();
        assert!(matches!(e, ChangeError::Invalid(ref m) if m.contains("already used")), "{e}");
        assert_eq!(d, before);
    }

    #[test]
    fn backend_add_joins_all_dsr_vips_by_default_and_remove_leaves_every_pool() {
        let mut d = desired();
        d.apply(&Change::BackendAdd { backend: backend("mail4", "198.18.0.14"), vips: vec![] }).unwrap();
        assert!(d.config.vips.iter().all(|v| v.backends.contains(&"mail4".to_string())));
        d.apply(&Change::BackendRemove { name: "mail4".into() }).unwrap();
        assert!(d.config.backend("mail4").is_none());
        assert!(d.config.vips.iter().all(|v| !v.backends.contains(&"mail4".to_string())));
        d.apply(&Change::BackendAdd { backend: backend("mail5", "198.18.0.15"), vips: vec!["mx".into()] }).unwrap();
        assert!(d.config.vip("mx").unwrap().backends.contains(&"mail5".to_string()));
        assert!(!d.config.vip("mx6").unwrap().backends.contains(&"mail5".to_string()));
    }

    #[test]
    fn plan_turns_drain_and_health_into_states_and_weights() {
        let mut d = desired();
        d.apply(&Change::Drain { name: "mail2".into() }).unwrap();
        let health = BTreeMap::from([("mail3".to_string(), Health::Down)]);
        let macs = BTreeMap::from([("198.18.0.11".parse().unwrap(), [2, 0, 0, 0, 0, 0x11])]);
        let load = BTreeMap::from([("mail1".to_string(), Load { share: 0.75, overloaded: None })]);
        let p = plan(&d, &health, &load, &macs, LbConfig::default(), &BTreeSet::new());
        let get = |n: &str| p.backends.iter().find(|b| b.name == n).unwrap().clone();
        assert_eq!((get("mail1").state, get("mail1").weight, get("mail1").mac), (state::UP, 75, [2, 0, 0, 0, 0, 0x11]));
        assert_eq!((get("mail2").state, get("mail2").weight), (state::DRAINING, 0));
        assert_eq!((get("mail3").state, get("mail3").weight), (state::DOWN, 0));
        // Overload drains; a tiny share never rounds a live back-end to zero.
        d.apply(&Change::Undrain { name: "mail2".into() }).unwrap();
        let load = BTreeMap::from([
            ("mail1".to_string(), Load { share: 0.001, overloaded: None }),
            ("mail2".to_string(), Load { share: 1.0, overloaded: Some("queue 6000 >= 5000".into()) }),
        ]);
        let p = plan(&d, &BTreeMap::new(), &load, &macs, LbConfig::default(), &BTreeSet::new());
        let get = |n: &str| p.backends.iter().find(|b| b.name == n).unwrap().clone();
        assert_eq!((get("mail1").state, get("mail1").weight), (state::UP, 1));
        assert_eq!((get("mail2").state, get("mail2").weight), (state::DRAINING, 0));
    }

    #[test]
    fn plan_reports_each_vips_capacity_and_the_client_groups() {
        let mut c = Config::embedded_default();
        c.client_groups = vec![crate::config::ClientGroup {
            name: "standard".into(),
            cidrs: vec!["0.0.0.0/0".into(), "::/0".into()],
            min_capacity: 50,
        }];
        let mut d = Desired::new(c);
        let capacity = |d: &Desired| plan(d, &BTreeMap::new(), &BTreeMap::new(), &BTreeMap::new(), LbConfig::default(), &BTreeSet::new()).vips[0].capacity;
        assert_eq!(capacity(&d), 100);
        // Admin weights 100/200/300: draining the 300 leaves half.
        d.apply(&Change::Drain { name: "mail3".into() }).unwrap();
        assert_eq!(capacity(&d), 50);
        let p = plan(&d, &BTreeMap::new(), &BTreeMap::new(), &BTreeMap::new(), LbConfig::default(), &BTreeSet::new());
        assert_eq!(p.groups.len(), 2);
        assert!(p.groups.iter().all(|(_, min)| *min == 50));
        assert_eq!(p.groups[0].0.prefix_len, 96, "0.0.0.0/0 is ::ffff:0:0/96");
    }

    #[test]
    fn log_survives_save_and_load_and_compacts() {
        let dir = std::env::temp_dir().join(format!("mxlb-state-{}", std::process::id()));
        let mut log = ChangeLog::default();
        log.record(Change::Weight { name: "mail1".into(), weight: 10 });
        log.record(Change::Weight { name: "mail1".into(), weight: 20 });
        log.record(Change::Drain { name: "mail2".into() });
        log.record(Change::Undrain { name: "mail2".into() });
        log.record(Change::Drain { name: "mail3".into() });
        assert_eq!(log.changes.len(), 3, "{:?}", log.changes);
        log.save(&dir).unwrap();
        let loaded = ChangeLog::load(&dir).unwrap();
        assert_eq!(loaded, log);
        let (d, skipped) = loaded.replay(Config::embedded_default());
        assert!(skipped.is_empty());
        assert_eq!(d.config.backend("mail1").unwrap().weight, 20);
        assert!(d.drained.contains("mail3") && !d.drained.contains("mail2"));
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(ChangeLog::load(&dir).unwrap(), ChangeLog::default());
    }

    #[test]
    fn replay_skips_changes_that_no_longer_apply() {
        let mut log = ChangeLog::default();
        log.record(Change::Weight { name: "gone".into(), weight: 10 });
        log.record(Change::Weight { name: "mail2".into(), weight: 10 });
        let (d, skipped) = log.replay(Config::embedded_default());
        assert_eq!(skipped.len(), 1);
        assert_eq!(d.config.backend("mail2").unwrap().weight, 10);
    }

    #[test]
    fn corrupt_log_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("mxlb-state-bad-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(ChangeLog::path(&dir), b"{not json").unwrap();
        let e = ChangeLog::load(&dir).unwrap_err();
        assert!(e.to_string().contains("changes.json"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
