//! The configuration file: what the operator wants balanced, and how.
//!
//! Parsing is two steps, as in pingora: serde turns TOML into [`Config`] (unknown keys are
//! errors, so a typo never silently does nothing), then [`Config::validate`] checks what types
//! cannot (unique names, known back-ends, port ranges, table capacity). Every error names the
//! file, line and key ([`ConfigError`]), and validation reports all errors at once so a broken
//! file is fixed in one round.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

pub mod mailbox;
pub mod proxy;
pub mod relay;

/// The configuration used when none is given: the lab topology that `cargo xtask run` builds
/// (one SMTP VIP over three smtp-sink back-ends). Also the example config in the README.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../mxlb.example.toml");

/// Highest admin weight. Weights are relative; 0 means "no new sessions" (like HAProxy).
pub const MAX_WEIGHT: u32 = 1000;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    /// Back-end health probing (defaults apply when the section is absent).
    #[serde(default)]
    pub health: HealthConfig,
    /// Per-source SYN rate limit (block and allow lists are managed with `mxlb block`).
    #[serde(default)]
    pub edge: crate::edge::EdgeConfig,
    #[serde(default, rename = "vip")]
    pub vips: Vec<VipConfig>,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
    /// Client groups for overload shedding (premium networks keep service longest).
    #[serde(default, rename = "client_group")]
    pub client_groups: Vec<ClientGroup>,
    /// VRRPv3 instances: which VIPs this node holds together with its peers.
    #[serde(default, rename = "vrrp")]
    pub vrrp: Vec<VrrpInstanceConfig>,
    /// Instances that change state together (the SMTP and the POP/IMAP VIPs on one node).
    #[serde(default, rename = "vrrp_sync_group")]
    pub vrrp_sync_groups: Vec<VrrpSyncGroupConfig>,
    /// The store-and-forward SMTP relay with a mirrored queue (on a `local` VIP).
    #[serde(default)]
    pub relay: Option<relay::RelayConfig>,
    /// The mailbox map (which back-end holds each mailbox) for the proxy and partitioned
    /// delivery.
    #[serde(default)]
    pub mailbox: Option<mailbox::MailboxConfig>,
    /// The POP3/IMAP proxy with mailbox affinity (on a `local` VIP, possibly the relay's).
    #[serde(default)]
    pub proxy: Option<proxy::ProxyConfig>,
}

/// One VRRPv3 virtual router (RFC 5798/9568): the node with the highest priority holds the
/// addresses of `vips`; the others keep them on standby in the data path and take over when
/// its advertisements stop. Field names follow keepalived's where they mean the same.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VrrpInstanceConfig {
    /// Shown in logs, `mxlb status`, metrics, and passed to the notify hook.
    pub name: String,
    /// Virtual router id (1-255), the same on every node of this router.
    pub vrid: u8,
    /// Where advertisements go and the VIPs are added; default: the first `[node] interfaces`.
    #[serde(default)]
    pub interface: Option<String>,
    /// 1-254, higher wins; 255 = the address owner (master at once).
    #[serde(default = "default_vrrp_priority")]
    pub priority: u8,
    /// Advertisement interval, in milliseconds, a multiple of 10 (centiseconds on the wire),
    /// 10 to 40950. A backup takes over 3 intervals plus a skew after the last advertisement.
    #[serde(default = "default_advert_interval_ms")]
    pub advert_interval_ms: u32,
    /// Take over from a lower-priority master (false = keepalived's `nopreempt`).
    #[serde(default = "default_true")]
    pub preempt: bool,
    /// After start (or recovering from FAULT), wait this long before preempting a
    /// lower-priority master, so health checks settle first.
    #[serde(default)]
    pub preempt_delay_ms: u64,
    /// Names of `[[vip]]` entries whose addresses this instance holds (all one family).
    pub vips: Vec<String>,
    /// Send advertisements to these peers instead of 224.0.0.18 / ff02::12 (networks that
    /// block multicast, clouds). Empty = multicast.
    #[serde(default)]
    pub unicast_peers: Vec<IpAddr>,
    /// IPv4 checksum: `pseudo-header` (RFC 5798, keepalived) or `no-pseudo-header` (RFC 9568's
    /// IPv4 variant some vendors use). IPv6 always includes it.
    #[serde(default)]
    pub checksum: VrrpChecksum,
    /// Gratuitous ARPs / unsolicited NAs sent on becoming master (and again 5 s later).
    #[serde(default = "default_garp_repeat")]
    pub garp_repeat: u32,
    /// While master, repeat them this often (ms) so caches stay right; 0 = off.
    #[serde(default = "default_garp_refresh_ms")]
    pub garp_refresh_ms: u64,
    /// Run on every state change as `COMMAND INSTANCE NAME STATE PRIORITY` (keepalived's
    /// `notify` arguments; STATE is MASTER, BACKUP, FAULT or STOP).
    #[serde(default)]
    pub notify: Option<PathBuf>,
    /// Interfaces whose loss lowers the priority (or means FAULT).
    #[serde(default)]
    pub track_interface: Vec<TrackInterface>,
    /// VIPs whose healthy back-end count is tracked.
    #[serde(default)]
    pub track_backends: Vec<TrackBackends>,
}

/// keepalived's track weight: absent or 0 → FAULT while the check fails; negative → the
/// priority is lowered by that much while it fails; positive → raised by that much while it
/// holds. The result is kept within 1-254.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrackInterface {
    pub name: String,
    #[serde(default)]
    pub weight: i32,
}

/// Fails while fewer than `need` back-ends of VIP `vip` are healthy (probed up).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrackBackends {
    pub vip: String,
    pub need: u32,
    #[serde(default)]
    pub weight: i32,
}

/// Instances that move together: one becoming master, backup or faulty takes the others
/// with it, and their track adjustments add up for all of them (so the peer node sees every
/// member's priority fall at once and takes them all, instead of splitting the group).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VrrpSyncGroupConfig {
    pub name: String,
    pub instances: Vec<String>,
    /// Run on every group state change as `COMMAND GROUP NAME STATE 0`.
    #[serde(default)]
    pub notify: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum VrrpChecksum {
    #[default]
    PseudoHeader,
    NoPseudoHeader,
}

fn default_vrrp_priority() -> u8 {
    100
}
fn default_advert_interval_ms() -> u32 {
    1000
}
fn default_true() -> bool {
    true
}
fn default_garp_repeat() -> u32 {
    5
}
fn default_garp_refresh_ms() -> u64 {
    60_000
}

impl VrrpInstanceConfig {
    /// The interface it runs on.
    pub fn interface<'a>(&'a self, node: &'a NodeConfig) -> &'a str {
        self.interface.as_deref().or(node.interfaces.first().map(String::as_str)).unwrap_or("")
    }
}

/// Source networks that share a shedding threshold: while a shedding VIP's capacity (the share
/// of its admin weight its back-ends can take now) is below `min_capacity` percent, new sessions
/// from these networks get the tempfail reply. The longest matching prefix decides; sources in
/// no group are shed only when no back-end is left. Give everyone else a threshold with a group
/// over `0.0.0.0/0` and `::/0`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientGroup {
    pub name: String,
    pub cidrs: Vec<String>,
    pub min_capacity: u8,
}

/// Settings of this LB node.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Interfaces the balancer attaches to (where VIP traffic arrives).
    pub interfaces: Vec<String>,
    /// `auto` (native, falling back to generic with a warning), `native` or `generic`.
    #[serde(default)]
    pub xdp_mode: XdpModeSetting,
    /// bpffs directory for pinned maps and links: what lets traffic flow, and conntrack
    /// survive, while the agent restarts.
    #[serde(default = "default_bpffs_dir")]
    pub bpffs_dir: PathBuf,
    /// Where operator changes made with the CLI are kept across restarts.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Unix socket the CLI uses to reach the running agent.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Tracked flows (conntrack LRU size).
    #[serde(default = "default_conntrack_size")]
    pub conntrack_size: u32,
    /// Outer IPv4 source for dsr-ipip; default: the first IPv4 address of the first interface.
    #[serde(default)]
    pub encap_source_v4: Option<Ipv4Addr>,
    /// Outer IPv6 source for dsr-ipip; default: the first global IPv6 address of the first interface.
    #[serde(default)]
    pub encap_source_v6: Option<Ipv6Addr>,
    /// Where to serve Prometheus metrics (`/metrics`); off when absent.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    #[default]
    Auto,
    Native,
    Generic,
}

/// How back-ends are probed. A back-end is marked down after `fall` consecutive failed probes
/// and up again after `rise` consecutive good ones (HAProxy's and pingora's model), so one lost
/// probe does not flap it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Time between probes of one back-end (100 ms to 60 s).
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// Bound on one whole probe: connect, greeting, every reply (10 ms to 60 s).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Consecutive good probes to mark a down back-end up.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failed probes to mark an up back-end down.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// How often back-ends with an `agent_port` are asked for their load.
    #[serde(default = "default_agent_interval_ms")]
    pub agent_interval_ms: u64,
    /// Load thresholds with hysteresis: a back-end is drained at `drain_*` and taken back only
    /// at `resume_*`, so it does not flap around one value.
    #[serde(default)]
    pub drain: LoadThresholds,
    /// See `drain`.
    #[serde(default = "LoadThresholds::resume_defaults")]
    pub resume: LoadThresholds,
    /// PEM file of the CA(s) for implicit-TLS probes (smtps/pop3s/imaps); without it the
    /// certificate is not checked (the probe tests TLS and the protocol, not identity).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Name the back-ends' certificates must carry (default: the back-end's address).
    #[serde(default)]
    pub tls_server_name: Option<String>,
}

/// Queue length, spool disk utilisation and probe response time at which a back-end is
/// drained (`[health.drain]`) or taken back (`[health.resume]`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoadThresholds {
    pub queue: u64,
    pub disk_pct: f64,
    pub response_ms: u64,
}

impl Default for LoadThresholds {
    fn default() -> Self {
        LoadThresholds { queue: 5000, disk_pct: 95.0, response_ms: 2000 }
    }
}

impl LoadThresholds {
    fn resume_defaults() -> Self {
        LoadThresholds { queue: 4000, disk_pct: 90.0, response_ms: 1000 }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval_ms: default_interval_ms(),
            timeout_ms: default_timeout_ms(),
            rise: default_rise(),
            fall: default_fall(),
            agent_interval_ms: default_agent_interval_ms(),
            drain: LoadThresholds::default(),
            resume: LoadThresholds::resume_defaults(),
            tls_ca: None,
            tls_server_name: None,
        }
    }
}

fn default_agent_interval_ms() -> u64 {
    1000
}

fn default_interval_ms() -> u64 {
    1000
}
fn default_timeout_ms() -> u64 {
    1000
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

/// Which probe a VIP's back-ends get (`check` key of a `[[vip]]`).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CheckSetting {
    /// No probing: back-ends are taken as up.
    None,
    /// TCP connect only.
    Tcp,
    /// 220 greeting, EHLO → 250, QUIT.
    Smtp,
    /// +OK greeting, QUIT.
    Pop3,
    /// `* OK` greeting, LOGOUT.
    Imap,
    /// SMTP over implicit TLS (port 465).
    Smtps,
    /// POP3 over implicit TLS (port 995).
    Pop3s,
    /// IMAP over implicit TLS (port 993).
    Imaps,
}

/// One virtual address with the ports it balances over one back-end pool.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    pub name: String,
    pub address: IpAddr,
    pub ports: Vec<u16>,
    pub mode: ForwardingMode,
    /// Names of `[[backend]]` entries; empty for `local` mode.
    #[serde(default)]
    pub backends: Vec<String>,
    /// Probe for this VIP's back-ends, sent to each back-end's address on the VIP's first
    /// port. Default: by that port (25/587/2525 smtp, 110 pop3, 143 imap, 465 smtps,
    /// 995 pop3s, 993 imaps, else tcp).
    #[serde(default)]
    pub check: Option<CheckSetting>,
    /// When no back-end can take new sessions, answer them from this node with the
    /// protocol's "try again later" (SMTP 421, POP3 -ERR [SYS/TEMP], IMAP * BYE) instead of
    /// letting them time out. Default on for dsr VIPs.
    #[serde(default = "default_shed")]
    pub shed: bool,
}

fn default_shed() -> bool {
    true
}

impl VipConfig {
    /// The probe this VIP's back-ends get, if any (`local` VIPs have no back-ends to probe).
    pub fn check(&self) -> CheckSetting {
        if self.mode == ForwardingMode::Local {
            return CheckSetting::None;
        }
        self.check.unwrap_or(match self.ports.first() {
            Some(25 | 587 | 2525) => CheckSetting::Smtp,
            Some(110) => CheckSetting::Pop3,
            Some(143) => CheckSetting::Imap,
            Some(465) => CheckSetting::Smtps,
            Some(995) => CheckSetting::Pop3s,
            Some(993) => CheckSetting::Imaps,
            _ => CheckSetting::Tcp,
        })
    }
}

/// How packets for a VIP reach a back-end (see `lb_common::mode`).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
pub enum ForwardingMode {
    /// Same L2 segment: rewrite MACs; back-ends hold the VIP on loopback.
    #[serde(rename = "dsr-l2")]
    DsrL2,
    /// Routed: IPIP/IP6IP6 encapsulation; back-ends run `mxlb decap attach`.
    #[serde(rename = "dsr-ipip")]
    DsrIpip,
    /// Served by this node (relay, proxies): passed to the kernel.
    #[serde(rename = "local")]
    Local,
}

impl ForwardingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardingMode::DsrL2 => "dsr-l2",
            ForwardingMode::DsrIpip => "dsr-ipip",
            ForwardingMode::Local => "local",
        }
    }

    /// The data-plane encoding (`lb_common::mode`).
    pub fn to_map(self) -> u8 {
        match self {
            ForwardingMode::DsrL2 => lb_common::mode::DSR_L2,
            ForwardingMode::DsrIpip => lb_common::mode::DSR_IPIP,
            ForwardingMode::Local => lb_common::mode::LOCAL,
        }
    }
}

impl FromStr for ForwardingMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dsr-l2" => Ok(ForwardingMode::DsrL2),
            "dsr-ipip" => Ok(ForwardingMode::DsrIpip),
            "local" => Ok(ForwardingMode::Local),
            other => Err(format!("unknown mode `{other}` (expected dsr-l2, dsr-ipip or local)")),
        }
    }
}

/// One mail server.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub name: String,
    pub address: IpAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// MAC to send dsr-l2 frames to; default: resolved from the neighbour table.
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// Port of `mxlb agent` on this back-end: its load then scales the weight and can drain it.
    #[serde(default)]
    pub agent_port: Option<u16>,
}

/// An Ethernet address, written `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let mut mac = [0u8; 6];
        if parts.len() != 6 {
            return Err(format!("`{s}` is not a MAC address (expected aa:bb:cc:dd:ee:ff)"));
        }
        for (i, p) in parts.iter().enumerate() {
            mac[i] = u8::from_str_radix(p, 16)
                .ok()
                .filter(|_| p.len() == 2)
                .ok_or_else(|| format!("`{s}` is not a MAC address (expected aa:bb:cc:dd:ee:ff)"))?;
        }
        Ok(MacAddr(mac))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn default_bpffs_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/mxlb")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/mxlb")
}
fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/mxlb/mxlb.sock")
}
fn default_conntrack_size() -> u32 {
    lb_common::CONNTRACK_DEFAULT_SIZE
}
fn default_weight() -> u32 {
    100
}

/// One problem in a configuration file, located for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {key}: {message}")]
pub struct ConfigError {
    pub file: String,
    /// 1-based; 0 when the key is absent from the file (a missing required key).
    pub line: usize,
    /// Dotted path, e.g. `vip[1].ports`.
    pub key: String,
    pub message: String,
}

/// All problems found in a file (never empty).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// Errors from loading a config file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] ConfigErrors),
}

impl Config {
    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Config::parse(&text, &path.display().to_string())?)
    }

    /// The embedded default (see [`EMBEDDED_DEFAULT`]).
    pub fn embedded_default() -> Config {
        Config::parse(EMBEDDED_DEFAULT, "<embedded default>")
            .expect("the embedded default config is validated by a unit test")
    }

    /// Parses and validates TOML text; `file` is used in error messages.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigErrors> {
        let locator = Locator::new(text, file);
        let config: Config = match toml::from_str(text) {
            Ok(c) => c,
            Err(e) => {
                let (line, key) = match e.span() {
                    Some(span) => (locator.line_of(span.start), locator.key_at(span.start)),
                    None => (0, String::new()),
                };
                return Err(ConfigErrors(vec![ConfigError {
                    file: file.to_string(),
                    line,
                    key: if key.is_empty() { "<document>".into() } else { key },
                    message: e.message().trim().to_string(),
                }]));
            }
        };
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(
                problems
                    .into_iter()
                    .map(|p| ConfigError {
                        file: file.to_string(),
                        line: locator.line_of_path(&p.path),
                        key: p.path.to_string(),
                        message: p.message,
                    })
                    .collect(),
            ))
        }
    }

    /// Checks what the types cannot. Returns every problem found (empty = valid).
    pub fn validate(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut p = |path: KeyPath, message: String| out.push(Problem { path, message });
        let n = &self.node;
        if n.interfaces.is_empty() {
            p(KeyPath::new("node").key("interfaces"), "at least one interface is required".into());
        }
        for (i, iface) in n.interfaces.iter().enumerate() {
            if iface.is_empty() || iface.len() > 15 || iface.contains(['/', ' ']) {
                p(
                    KeyPath::new("node").key("interfaces").index(i),
                    format!("`{iface}` is not a valid interface name (1-15 characters, no '/' or space)"),
                );
            }
        }
        if n.conntrack_size < 1024 || n.conntrack_size > 64 * 1024 * 1024 {
            p(
                KeyPath::new("node").key("conntrack_size"),
                format!("{} is out of range (1024 to 67108864)", n.conntrack_size),
            );
        }

        let h = &self.health;
        if !(100..=60_000).contains(&h.interval_ms) {
            p(KeyPath::new("health").key("interval_ms"), format!("{} is out of range (100 to 60000)", h.interval_ms));
        }
        if !(10..=60_000).contains(&h.timeout_ms) {
            p(KeyPath::new("health").key("timeout_ms"), format!("{} is out of range (10 to 60000)", h.timeout_ms));
        }
        for (key, v) in [("rise", h.rise), ("fall", h.fall)] {
            if !(1..=100).contains(&v) {
                p(KeyPath::new("health").key(key), format!("{v} is out of range (1 to 100)"));
            }
        }
        if h.tls_ca.is_some() || h.tls_server_name.is_some() {
            if let Err(e) = crate::health::ProbeTls::new(h.tls_ca.as_deref(), h.tls_server_name.as_deref()) {
                let key = if matches!(e, crate::health::TlsSetupError::Name(_)) { "tls_server_name" } else { "tls_ca" };
                p(KeyPath::new("health").key(key), e.to_string());
            }
        }
        if !(100..=60_000).contains(&h.agent_interval_ms) {
            p(KeyPath::new("health").key("agent_interval_ms"), format!("{} is out of range (100 to 60000)", h.agent_interval_ms));
        }
        for (key, resume, drain) in [
            ("queue", h.resume.queue as f64, h.drain.queue as f64),
            ("disk_pct", h.resume.disk_pct, h.drain.disk_pct),
            ("response_ms", h.resume.response_ms as f64, h.drain.response_ms as f64),
        ] {
            if !(resume < drain) {
                p(KeyPath::new("health").key("resume").key(key), format!("must be below health.drain.{key} ({drain}), or the back-end would flap"));
            }
        }
        if !(h.drain.disk_pct > 0.0 && h.drain.disk_pct <= 100.0) {
            p(KeyPath::new("health").key("drain").key("disk_pct"), format!("{} is out of range (0 to 100)", h.drain.disk_pct));
        }

        if let Err(m) = self.edge.validate() {
            p(KeyPath::new("edge"), m);
        }
        let mut group_names = HashSet::new();
        let mut group_cidrs = HashMap::new();
        for (i, g) in self.client_groups.iter().enumerate() {
            let at = KeyPath::new("client_group").index(i);
            if let Err(m) = validate_name(&g.name) {
                p(at.key("name"), m);
            } else if !group_names.insert(g.name.as_str()) {
                p(at.key("name"), format!("client group `{}` is defined twice", g.name));
            }
            if g.min_capacity > 100 {
                p(at.key("min_capacity"), format!("{} is out of range (0 to 100 percent)", g.min_capacity));
            }
            for (j, c) in g.cidrs.iter().enumerate() {
                match c.parse::<crate::edge::Cidr>() {
                    Err(e) => p(at.key("cidrs").index(j), e.to_string()),
                    Ok(cidr) => {
                        if let Some(prev) = group_cidrs.insert(cidr, i) {
                            p(at.key("cidrs").index(j), format!("{c} is already in client_group[{prev}]"));
                        }
                    }
                }
            }
        }

        let mut backend_names = HashMap::new();
        let mut backend_addrs = HashMap::new();
        for (i, b) in self.backends.iter().enumerate() {
            let at = KeyPath::new("backend").index(i);
            if let Err(m) = validate_name(&b.name) {
                p(at.key("name"), m);
            }
            if let Some(prev) = backend_names.insert(b.name.as_str(), i) {
                p(at.key("name"), format!("back-end `{}` is already defined as backend[{prev}]", b.name));
            }
            if let Some(prev) = backend_addrs.insert(b.address, i) {
                p(at.key("address"), format!("address {} is already used by backend[{prev}]", b.address));
            }
            if let Err(m) = validate_unicast(b.address) {
                p(at.key("address"), m);
            }
            if b.weight > MAX_WEIGHT {
                p(at.key("weight"), format!("{} is out of range (0 to {MAX_WEIGHT})", b.weight));
            }
            if b.agent_port == Some(0) {
                p(at.key("agent_port"), "port 0 is not a valid port".into());
            }
        }
        if self.backends.len() >= lb_common::MAX_BACKENDS as usize {
            p(KeyPath::new("backend"), format!("at most {} back-ends", lb_common::MAX_BACKENDS - 1));
        }

        let mut vip_names = HashMap::new();
        let mut listeners: HashMap<(IpAddr, u16), usize> = HashMap::new();
        let mut vip_keys = 0usize;
        for (i, v) in self.vips.iter().enumerate() {
            let at = KeyPath::new("vip").index(i);
            if let Err(m) = validate_name(&v.name) {
                p(at.key("name"), m);
            }
            if let Some(prev) = vip_names.insert(v.name.as_str(), i) {
                p(at.key("name"), format!("VIP `{}` is already defined as vip[{prev}]", v.name));
            }
            if let Err(m) = validate_unicast(v.address) {
                p(at.key("address"), m);
            }
            if v.ports.is_empty() {
                p(at.key("ports"), "at least one port is required".into());
            }
            let mut seen = HashSet::new();
            for (j, port) in v.ports.iter().enumerate() {
                if *port == 0 {
                    p(at.key("ports").index(j), "port 0 is not a valid port".into());
                } else if !seen.insert(*port) {
                    p(at.key("ports").index(j), format!("port {port} is listed twice"));
                } else if let Some(prev) = listeners.insert((v.address, *port), i) {
                    p(at.key("ports").index(j), format!("{}:{port} is already served by vip[{prev}]", v.address));
                }
            }
            vip_keys += v.ports.len() + 1;
            match v.mode {
                ForwardingMode::Local if !v.backends.is_empty() => {
                    p(at.key("backends"), "a `local` VIP is served by this node and takes no back-ends".into())
                }
                ForwardingMode::DsrL2 | ForwardingMode::DsrIpip if v.backends.is_empty() => {
                    p(at.key("backends"), format!("a `{}` VIP needs at least one back-end", v.mode.as_str()))
                }
                _ => {}
            }
            let mut listed = HashSet::new();
            for (j, name) in v.backends.iter().enumerate() {
                if !backend_names.contains_key(name.as_str()) {
                    p(at.key("backends").index(j), format!("no [[backend]] is named `{name}`"));
                } else if !listed.insert(name) {
                    p(at.key("backends").index(j), format!("back-end `{name}` is listed twice"));
                }
            }
        }
        if self.vips.len() > (lb_common::MAX_RINGS / 2) as usize {
            p(KeyPath::new("vip"), format!("at most {} VIPs", lb_common::MAX_RINGS / 2));
        }
        if vip_keys > lb_common::MAX_VIPS as usize {
            p(KeyPath::new("vip"), format!("too many VIP ports (at most {} address:port pairs)", lb_common::MAX_VIPS));
        }
        self.validate_vrrp(&mut p);
        relay::validate(self, &mut p);
        mailbox::validate(self, &mut p);
        proxy::validate(self, &mut p);
        out
    }

    fn validate_vrrp(&self, p: &mut impl FnMut(KeyPath, String)) {
        let mut names = HashMap::new();
        let mut routers: HashMap<(String, bool, u8), usize> = HashMap::new();
        let mut held: HashMap<&str, usize> = HashMap::new();
        for (i, r) in self.vrrp.iter().enumerate() {
            let at = KeyPath::new("vrrp").index(i);
            if let Err(m) = validate_name(&r.name) {
                p(at.key("name"), m);
            } else if let Some(prev) = names.insert(r.name.as_str(), i) {
                p(at.key("name"), format!("VRRP instance `{}` is already defined as vrrp[{prev}]", r.name));
            }
            if r.vrid == 0 {
                p(at.key("vrid"), "0 is not a valid virtual router id (1 to 255)".into());
            }
            if r.priority == 0 {
                p(at.key("priority"), "0 is reserved for a master that is leaving (1 to 255)".into());
            }
            if !(10..=40_950).contains(&r.advert_interval_ms) || r.advert_interval_ms % 10 != 0 {
                p(
                    at.key("advert_interval_ms"),
                    format!("{} must be a multiple of 10 from 10 to 40950 (centiseconds on the wire)", r.advert_interval_ms),
                );
            }
            if r.preempt_delay_ms > 3_600_000 {
                p(at.key("preempt_delay_ms"), format!("{} is out of range (0 to 3600000)", r.preempt_delay_ms));
            }
            if r.garp_repeat > 100 {
                p(at.key("garp_repeat"), format!("{} is out of range (0 to 100)", r.garp_repeat));
            }
            if r.garp_refresh_ms != 0 && r.garp_refresh_ms < 1000 {
                p(at.key("garp_refresh_ms"), format!("{} is out of range (0 = off, or at least 1000)", r.garp_refresh_ms));
            }
            let iface = r.interface(&self.node);
            if iface.is_empty() {
                p(at.key("interface"), "no interface: set it or `[node] interfaces`".into());
            }
            if r.vips.is_empty() {
                p(at.key("vips"), "at least one [[vip]] is required".into());
            }
            let mut family = None;
            for (j, name) in r.vips.iter().enumerate() {
                match self.vip(name) {
                    None => p(at.key("vips").index(j), format!("no [[vip]] is named `{name}`")),
                    Some(v) => {
                        if let Some(prev) = held.insert(name.as_str(), i) {
                            p(at.key("vips").index(j), format!("VIP `{name}` is already held by vrrp[{prev}]"));
                        }
                        match family {
                            None => family = Some(v.address.is_ipv6()),
                            Some(v6) if v6 != v.address.is_ipv6() => p(
                                at.key("vips").index(j),
                                format!("`{name}` is of the other address family: one instance holds IPv4 or IPv6 addresses, not both"),
                            ),
                            _ => {}
                        }
                    }
                }
            }
            let v6 = family.unwrap_or(false);
            for (j, peer) in r.unicast_peers.iter().enumerate() {
                if peer.is_ipv6() != v6 {
                    p(at.key("unicast_peers").index(j), format!("{peer} is not of the VIPs' address family"));
                } else if let Err(m) = validate_unicast(*peer) {
                    p(at.key("unicast_peers").index(j), m);
                }
            }
            if v6 && r.checksum == VrrpChecksum::NoPseudoHeader {
                p(at.key("checksum"), "IPv6 always includes the pseudo-header".into());
            }
            if family.is_some() {
                if let Some(prev) = routers.insert((iface.to_string(), v6, r.vrid), i) {
                    p(at.key("vrid"), format!("vrrp[{prev}] already uses VRID {} for this family on {iface}", r.vrid));
                }
            }
            for (j, t) in r.track_interface.iter().enumerate() {
                if t.name.is_empty() || t.name.len() > 15 {
                    p(at.key("track_interface").index(j).key("name"), format!("`{}` is not a valid interface name", t.name));
                }
                if !(-254..=254).contains(&t.weight) {
                    p(at.key("track_interface").index(j).key("weight"), format!("{} is out of range (-254 to 254)", t.weight));
                }
            }
            for (j, t) in r.track_backends.iter().enumerate() {
                let tat = at.key("track_backends").index(j);
                match self.vip(&t.vip) {
                    None => p(tat.key("vip"), format!("no [[vip]] is named `{}`", t.vip)),
                    Some(v) if t.need as usize > v.backends.len() => {
                        p(tat.key("need"), format!("{} is more than the {} back-ends of `{}`", t.need, v.backends.len(), t.vip))
                    }
                    _ => {}
                }
                if !(-254..=254).contains(&t.weight) {
                    p(tat.key("weight"), format!("{} is out of range (-254 to 254)", t.weight));
                }
            }
        }
        let mut group_names = HashSet::new();
        let mut grouped: HashMap<&str, usize> = HashMap::new();
        for (i, g) in self.vrrp_sync_groups.iter().enumerate() {
            let at = KeyPath::new("vrrp_sync_group").index(i);
            if let Err(m) = validate_name(&g.name) {
                p(at.key("name"), m);
            } else if !group_names.insert(g.name.as_str()) {
                p(at.key("name"), format!("sync group `{}` is defined twice", g.name));
            }
            if g.instances.len() < 2 {
                p(at.key("instances"), "a sync group needs at least two instances".into());
            }
            for (j, name) in g.instances.iter().enumerate() {
                if !names.contains_key(name.as_str()) {
                    p(at.key("instances").index(j), format!("no [[vrrp]] instance is named `{name}`"));
                } else if let Some(prev) = grouped.insert(name.as_str(), i) {
                    p(at.key("instances").index(j), format!("`{name}` is already in vrrp_sync_group[{prev}]"));
                }
            }
        }
    }

    /// The VRRP instance holding VIP `name`, if any.
    pub fn vrrp_of_vip(&self, name: &str) -> Option<&VrrpInstanceConfig> {
        self.vrrp.iter().find(|r| r.vips.iter().any(|v| v == name))
    }

    pub fn backend(&self, name: &str) -> Option<&BackendConfig> {
        self.backends.iter().find(|b| b.name == name)
    }

    pub fn vip(&self, name: &str) -> Option<&VipConfig> {
        self.vips.iter().find(|v| v.name == name)
    }

    /// Back-end names referenced by any VIP, sorted.
    pub fn used_backends(&self) -> BTreeSet<&str> {
        self.vips.iter().flat_map(|v| v.backends.iter().map(String::as_str)).collect()
    }
}

/// Names are used on the command line and in metrics labels.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err("a name must have 1 to 63 characters".into());
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.') {
        return Err(format!("`{name}` may contain only letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}

/// VIPs and back-ends are unicast host addresses.
pub fn validate_unicast(ip: IpAddr) -> Result<(), String> {
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        return Err(format!("{ip} is not a usable unicast address"));
    }
    if let IpAddr::V4(v4) = ip {
        if v4.is_broadcast() {
            return Err(format!("{ip} is not a usable unicast address"));
        }
    }
    Ok(())
}

/// A validation problem before it is located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: KeyPath,
    pub message: String,
}

/// A key inside the document, e.g. `vip[1].ports[0]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPath(Vec<Seg>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

impl KeyPath {
    pub fn new(key: &str) -> KeyPath {
        KeyPath(vec![Seg::Key(key.to_string())])
    }
    pub fn key(&self, key: &str) -> KeyPath {
        let mut v = self.0.clone();
        v.push(Seg::Key(key.to_string()));
        KeyPath(v)
    }
    pub fn index(&self, i: usize) -> KeyPath {
        let mut v = self.0.clone();
        v.push(Seg::Index(i));
        KeyPath(v)
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            match s {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Finds lines and key paths in the original text (toml_edit keeps spans; serde's model
/// does not).
struct Locator<'a> {
    text: &'a str,
    doc: Option<toml_edit::Document<&'a str>>,
}

impl<'a> Locator<'a> {
    fn new(text: &'a str, _file: &str) -> Self {
        Locator { text, doc: toml_edit::Document::parse(text).ok() }
    }

    fn line_of(&self, offset: usize) -> usize {
        let offset = offset.min(self.text.len());
        self.text.as_bytes()[..offset].iter().filter(|&&b| b == b'\n').count() + 1
    }

    /// Line of the deepest existing part of `path` (the key itself when present).
    fn line_of_path(&self, path: &KeyPath) -> usize {
        let Some(doc) = &self.doc else { return 0 };
        let mut span = None;
        let mut item: Option<&toml_edit::Item> = None;
        let mut table: Option<&toml_edit::Table> = Some(doc.as_table());
        for seg in &path.0 {
            match seg {
                Seg::Key(k) => {
                    // The schema has no inline tables, so keys only live in tables.
                    let Some((key, it)) = table.and_then(|t| t.get_key_value(k)) else { break };
                    span = key.span().or(span);
                    item = Some(it);
                    table = item.and_then(|i| i.as_table());
                }
                Seg::Index(n) => match item {
                    Some(toml_edit::Item::ArrayOfTables(a)) => {
                        let Some(t) = a.get(*n) else { break };
                        span = t.span().or(span);
                        table = Some(t);
                        item = None;
                    }
                    Some(toml_edit::Item::Value(toml_edit::Value::Array(a))) => {
                        let Some(v) = a.get(*n) else { break };
                        span = v.span().or(span);
                        table = None;
                        item = None;
                    }
                    _ => break,
                },
            }
        }
        span.map(|s| self.line_of(s.start)).unwrap_or(0)
    }

    /// The dotted key path of the innermost key whose span contains `offset`.
    fn key_at(&self, offset: usize) -> String {
        let Some(doc) = &self.doc else { return String::new() };
        let mut best = String::new();
        walk_table(doc.as_table(), String::new(), offset, &mut best);
        best
    }
}

fn contains(span: Option<std::ops::Range<usize>>, offset: usize) -> bool {
    span.is_some_and(|s| s.start <= offset && offset <= s.end)
}

fn walk_table(t: &toml_edit::Table, prefix: String, offset: usize, best: &mut String) {
    for (k, item) in t.iter() {
        let path = if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
        let key_span = t.key(k).and_then(|key| key.span());
        if contains(key_span, offset) {
            *best = path.clone();
        }
        match item {
            toml_edit::Item::Table(sub) => walk_table(sub, path, offset, best),
            toml_edit::Item::ArrayOfTables(a) => {
                for (i, sub) in a.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    if contains(sub.span(), offset) {
                        *best = p.clone();
                    }
                    walk_table(sub, p, offset, best);
                }
            }
            toml_edit::Item::Value(v) => walk_value(v, path, offset, best),
            toml_edit::Item::None => {}
        }
    }
}

fn walk_value(v: &toml_edit::Value, path: String, offset: usize, best: &mut String) {
    if contains(v.span(), offset) {
        *best = path.clone();
    }
    match v {
        toml_edit::Value::Array(a) => {
            for (i, e) in a.iter().enumerate() {
                walk_value(e, format!("{path}[{i}]"), offset, best);
            }
        }
        toml_edit::Value::InlineTable(t) => {
            for (k, e) in t.iter() {
                walk_value(e, format!("{path}.{k}"), offset, best);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<ConfigError> {
        Config::parse(text, "test.toml").expect_err("config should be rejected").0
    }

    const GOOD: &str = r#"
[node]
interfaces = ["eth0"]

[[vip]]
name = "mx"
address = "198.18.0.100"
ports = [25, 587]
mode = "dsr-l2"
backends = ["a", "b"]

[[backend]]
name = "a"
address = "198.18.0.11"
weight = 100

[[backend]]
name = "b"
address = "198.18.0.12"
mac = "02:00:00:00:00:0b"
"#;

    const VRRP: &str = r#"
[[vip]]
name = "mx6"
address = "2001:db8::100"
ports = [25]
mode = "dsr-l2"
backends = ["a"]

[[vrrp]]
name = "smtp"
vrid = 51
priority = 150
advert_interval_ms = 100
vips = ["mx"]
track_interface = [{ name = "eth0" }]
track_backends = [{ vip = "mx", need = 1, weight = -60 }]

[[vrrp]]
name = "smtp6"
vrid = 51
vips = ["mx6"]

[[vrrp_sync_group]]
name = "mail"
instances = ["smtp", "smtp6"]
"#;

    #[test]
    fn vrrp_instances_parse_with_keepalived_defaults() {
        let c = Config::parse(&format!("{GOOD}{VRRP}"), "test.toml").unwrap();
        let r = &c.vrrp[0];
        assert_eq!((r.vrid, r.priority, r.advert_interval_ms, r.preempt), (51, 150, 100, true));
        assert_eq!(r.interface(&c.node), "eth0", "defaults to the first node interface");
        assert_eq!(r.track_interface[0].weight, 0, "no weight = FAULT, as in keepalived");
        assert_eq!((c.vrrp[1].priority, c.vrrp[1].advert_interval_ms), (100, 1000));
        assert_eq!(c.vrrp[0].checksum, VrrpChecksum::PseudoHeader);
        assert_eq!(c.vrrp_of_vip("mx6").map(|r| r.name.as_str()), Some("smtp6"), "the same VRID may serve each family");
        assert_eq!(c.vrrp_sync_groups[0].instances.len(), 2);
    }

    #[test]
    fn vrrp_mistakes_are_located() {
        let base = format!("{GOOD}{VRRP}");
        let keys = |text: &str| errors(text).into_iter().map(|e| (e.line, e.key)).collect::<Vec<_>>();
        // line 31 is `vrid = 51` of the first instance, 33 its interval.
        assert_eq!(keys(&base.replacen("vrid = 51", "vrid = 0", 1)), [(31, "vrrp[0].vrid".to_string())]);
        assert_eq!(keys(&base.replace("advert_interval_ms = 100", "advert_interval_ms = 105")), [(33, "vrrp[0].advert_interval_ms".to_string())]);
        assert_eq!(keys(&base.replace("vips = [\"mx6\"]", "vips = [\"mx\"]"))[0].1, "vrrp[1].vips[0]", "one VIP, one instance");
        assert_eq!(keys(&base.replace("vips = [\"mx6\"]", "vips = [\"nope\"]"))[0].1, "vrrp[1].vips[0]");
        assert_eq!(keys(&base.replace("need = 1", "need = 3"))[0].1, "vrrp[0].track_backends[0].need");
        assert_eq!(keys(&base.replace("weight = -60", "weight = -300"))[0].1, "vrrp[0].track_backends[0].weight");
        assert_eq!(keys(&base.replace("\"smtp\", \"smtp6\"", "\"smtp\", \"imap\""))[0].1, "vrrp_sync_group[0].instances[1]");
        assert_eq!(keys(&base.replace("name = \"smtp6\"\nvrid = 51\nvips = [\"mx6\"]", "name = \"smtp6\"\nvrid = 51\nvips = [\"mx6\"]\nchecksum = \"no-pseudo-header\""))[0].1, "vrrp[1].checksum");
        let mixed = base.replace("vips = [\"mx\"]", "vips = [\"mx\", \"mx6\"]").replace("vips = [\"mx6\"]\n", "vips = []\n");
        let e = errors(&mixed);
        assert!(e.iter().any(|e| e.key == "vrrp[0].vips[1]" && e.message.contains("family")), "{e:?}");
        let unknown = errors(&base.replace("priority = 150", "priority = 150\nauth_pass = \"x\""));
        assert!(unknown[0].message.contains("unknown field") && unknown[0].key.starts_with("vrrp[0]"), "{unknown:?}");
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::parse(EMBEDDED_DEFAULT, "default").unwrap();
        assert!(!c.vips.is_empty() && !c.backends.is_empty());
    }

    #[test]
    fn parses_a_good_file_with_defaults() {
        let c = Config::parse(GOOD, "test.toml").unwrap();
        assert_eq!(c.node.xdp_mode, XdpModeSetting::Auto);
        assert_eq!(c.node.bpffs_dir, PathBuf::from("/sys/fs/bpf/mxlb"));
        assert_eq!(c.backends[1].weight, 100);
        assert_eq!(c.backends[1].mac, Some(MacAddr([2, 0, 0, 0, 0, 0x0b])));
        assert_eq!(c.vips[0].mode, ForwardingMode::DsrL2);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = GOOD.replace("weight = 100", "wieght = 100");
        let e = errors(&text);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].file, "test.toml");
        assert_eq!(e[0].line, 15, "{e:?}");
        assert_eq!(e[0].key, "backend[0].wieght");
        assert!(e[0].message.contains("unknown field"), "{}", e[0].message);
    }

    #[test]
    fn bad_value_type_is_located() {
        let text = GOOD.replace("ports = [25, 587]", "ports = [25, \"smtp\"]");
        let e = errors(&text);
        assert_eq!(e[0].line, 8, "{e:?}");
        assert!(e[0].key.starts_with("vip[0].ports"), "{e:?}");
    }

    #[test]
    fn bad_address_and_mode_are_located() {
        let e = errors(&GOOD.replace("198.18.0.100", "198.18.0.300"));
        assert_eq!((e[0].line, e[0].key.as_str()), (7, "vip[0].address"), "{e:?}");
        let e = errors(&GOOD.replace("dsr-l2", "nat"));
        assert_eq!((e[0].line, e[0].key.as_str()), (9, "vip[0].mode"), "{e:?}");
    }

    #[test]
    fn validation_reports_every_problem_with_its_line() {
        let text = GOOD
            .replace("backends = [\"a\", \"b\"]", "backends = [\"a\", \"c\"]")
            .replace("weight = 100", "weight = 5000")
            .replace("ports = [25, 587]", "ports = [25, 25, 0]")
            .replace("name = \"b\"", "name = \"a\"");
        let e = errors(&text);
        let found: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert!(found.contains(&(15, "backend[0].weight")), "{found:?}");
        assert!(found.contains(&(18, "backend[1].name")), "{found:?}");
        assert!(found.contains(&(8, "vip[0].ports[1]")), "{found:?}");
        assert!(found.contains(&(8, "vip[0].ports[2]")), "{found:?}");
        assert!(found.contains(&(10, "vip[0].backends[1]")), "{found:?}");
        assert!(e.iter().all(|e| e.file == "test.toml"));
        assert!(e.iter().any(|e| e.message.contains("no [[backend]] is named `c`")), "{e:?}");
    }

    #[test]
    fn missing_required_key_is_reported() {
        let e = errors("[node]\n");
        assert!(e[0].message.contains("interfaces"), "{e:?}");
        assert_eq!(e[0].file, "test.toml");
    }

    #[test]
    fn overlapping_listeners_and_local_backends_are_rejected() {
        let text = format!(
            "{GOOD}\n[[vip]]\nname = \"mx2\"\naddress = \"198.18.0.100\"\nports = [587]\nmode = \"local\"\nbackends = [\"a\"]\n"
        );
        let e = errors(&text);
        let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"vip[1].ports[0]"), "{e:?}");
        assert!(keys.contains(&"vip[1].backends"), "{e:?}");
    }

    #[test]
    fn rejects_unusable_addresses_and_weights() {
        let e = errors(&GOOD.replace("198.18.0.11", "0.0.0.0"));
        assert_eq!(e[0].key, "backend[0].address");
        let e = errors(&GOOD.replace("mac = \"02:00:00:00:00:0b\"", "mac = \"02:00:00\""));
        assert_eq!(e[0].key, "backend[1].mac", "{e:?}");
    }

    #[test]
    fn health_defaults_checks_and_ranges() {
        let c = Config::parse(GOOD, "test.toml").unwrap();
        assert_eq!((c.health.interval_ms, c.health.timeout_ms, c.health.rise, c.health.fall), (1000, 1000, 2, 3));
        assert_eq!(c.vips[0].check(), CheckSetting::Smtp, "port 25 gets the SMTP probe");
        let text = format!("{GOOD}\n[health]\ninterval_ms = 50\nfall = 0\n");
        let e = errors(&text);
        let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["health.interval_ms", "health.fall"], "{e:?}");
        assert_eq!((e[0].line, e[1].line), (23, 24), "{e:?}");
        let text = GOOD.replace("mode = \"dsr-l2\"", "mode = \"dsr-l2\"\ncheck = \"none\"");
        assert_eq!(Config::parse(&text, "t").unwrap().vips[0].check(), CheckSetting::None);
        let e = errors(&GOOD.replace("mode = \"dsr-l2\"", "mode = \"dsr-l2\"\ncheck = \"http\""));
        assert_eq!(e[0].key, "vip[0].check", "{e:?}");
        // Hysteresis: resume thresholds must sit below drain thresholds.
        let e = errors(&format!("{GOOD}\n[health.drain]\nqueue = 100\ndisk_pct = 90.0\nresponse_ms = 500\n"));
        let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["health.resume.queue", "health.resume.disk_pct", "health.resume.response_ms"], "{e:?}");
    }

    #[test]
    fn mac_round_trips() {
        let m: MacAddr = "02:aa:00:01:ff:10".parse().unwrap();
        assert_eq!(m.to_string(), "02:aa:00:01:ff:10");
        assert!("02:aa:00:01:ff".parse::<MacAddr>().is_err());
        assert!("02:aa:00:01:ff:1".parse::<MacAddr>().is_err());
    }
}
