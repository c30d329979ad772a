//! VRRPv3 (RFC 5798 as updated by RFC 9568) between LB nodes, interoperable with keepalived.
//!
//! - [`packet`]: the advertisement codec and its receive checks (pure);
//! - [`timers`]: Skew_Time and Master_Down_Interval;
//! - [`instance`]: the state machine of one virtual router (pure: events in, actions out);
//! - [`socket`]: sending and receiving advertisements (raw IP sockets, TTL 255);
//! - [`announce`]: VIP addresses through rtnetlink, gratuitous ARP / unsolicited NA, link state;
//! - [`runner`]: the task in `mxlb run` that ties them to the controller (the one map writer).
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

pub mod announce;
pub mod instance;
pub mod packet;
pub mod runner;
pub mod socket;
pub mod timers;

/// One instance as `mxlb status` and `/metrics` show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InstanceStatus {
    pub name: String,
    pub vrid: u8,
    pub interface: String,
    /// `ipv4` or `ipv6`.
    pub family: String,
    pub state: instance::State,
    /// Effective priority (configured, adjusted by tracking).
    pub priority: u8,
    pub configured_priority: u8,
    /// The master's address as last heard (ours while master).
    pub master: Option<IpAddr>,
    pub addresses: Vec<IpAddr>,
    pub sync_group: Option<String>,
    /// Tracks failing now, described.
    pub failing_tracks: Vec<String>,
    pub transitions: u64,
    pub became_master: u64,
    pub adverts_sent: u64,
    pub adverts_received: u64,
    /// Received packets dropped, by reason (ttl, checksum, version, unknown_vrid, ...).
    pub dropped: BTreeMap<String, u64>,
}

/// The instances' latest status, posted by the runner and read by `mxlb status` and metrics.
#[derive(Debug, Clone, Default)]
pub struct StatusBoard(Arc<Mutex<Vec<InstanceStatus>>>);

impl StatusBoard {
    pub fn post(&self, status: Vec<InstanceStatus>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = status;
    }
    pub fn read(&self) -> Vec<InstanceStatus> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
