//! `[relay]`: the store-and-forward SMTP relay on a `local` VIP, its delivery to the back-ends
//! and its mirror node (see [`crate::relay`]).
use std::{net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use super::{Config, ForwardingMode, KeyPath};

/// The relay. Absent: this node runs no relay.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// The `local` VIP the relay answers on (all its ports: 25, and 587 for submission).
    pub vip: String,
    /// This node's name in envelopes, logs and the mirror handshake; different on each node.
    pub node_name: String,
    /// The name in the greeting and the Received header (e.g. `mx.example.net`).
    pub hostname: String,
    /// The durable queue (fsynced files; see `relay::spool`).
    #[serde(default = "default_spool_dir")]
    pub spool_dir: PathBuf,
    /// Domains the cluster receives mail for (`.example.net` also matches its subdomains).
    pub domains: Vec<String>,
    /// Clients allowed to relay to any domain (CIDRs, like Postfix's `mynetworks`).
    #[serde(default)]
    pub trusted_networks: Vec<String>,
    /// Valid mailboxes (one address per line, `@domain` = catch-all); unknown users of a listed
    /// domain get `550 5.1.1` at RCPT time. Re-read by `mxlb queue reload` and on SIGHUP.
    #[serde(default)]
    pub mailboxes: Option<PathBuf>,
    /// Largest message in bytes (SIZE).
    #[serde(default = "default_max_message_size")]
    pub max_message_size: u64,
    /// Recipients per message (RFC 5321 asks for at least 100).
    #[serde(default = "default_max_recipients")]
    pub max_recipients: u32,
    /// Concurrent sessions in all.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: u32,
    /// Concurrent sessions from one client address.
    #[serde(default = "default_max_sessions_per_source")]
    pub max_sessions_per_source: u32,
    /// Messages per session.
    #[serde(default = "default_max_messages_per_session")]
    pub max_messages_per_session: u32,
    /// Waiting for a command (RFC 5321 §4.5.3.2: 5 minutes).
    #[serde(default = "default_command_timeout_ms")]
    pub command_timeout_ms: u64,
    /// Waiting for each block of DATA (RFC 5321 §4.5.3.2: 3 minutes).
    #[serde(default = "default_data_timeout_ms")]
    pub data_timeout_ms: u64,
    /// STARTTLS: certificate chain and key (PEM). Without them STARTTLS is not offered.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Clients presenting a certificate from this CA during STARTTLS count as authenticated
    /// and may relay to any domain.
    #[serde(default)]
    pub tls_client_ca: Option<PathBuf>,
    /// SMTP AUTH (PLAIN, LOGIN; offered only after STARTTLS): users in Dovecot's passwd-file
    /// format (`user:{SHA512-CRYPT}$6$...`). Logged-in clients may relay to any domain
    /// (submission). Re-read with the mailbox list.
    #[serde(default)]
    pub auth_users: Option<PathBuf>,
    pub delivery: DeliveryConfig,
    /// The peer node holding the copies. Absent: messages are on this node's disk only.
    #[serde(default)]
    pub mirror: Option<MirrorConfig>,
}

/// How queued messages reach the back-ends.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// `[[backend]]` names the relay delivers to.
    pub backends: Vec<String>,
    /// `smtp` or `lmtp` (Dovecot, Cyrus).
    #[serde(default)]
    pub protocol: DeliveryProtocol,
    /// Port on the back-ends (default 25 for smtp, 24 for lmtp).
    #[serde(default)]
    pub port: Option<u16>,
    /// `shared`: any healthy back-end by weight; `partitioned`: each mailbox has one owner,
    /// found in the mailbox map (`[mailbox]`).
    #[serde(default)]
    pub routing: Routing,
    /// Pass the client's address on with XCLIENT to back-ends that offer it.
    #[serde(default = "yes")]
    pub xclient: bool,
    /// Concurrent connections to one back-end.
    #[serde(default = "default_connections_per_backend")]
    pub connections_per_backend: u32,
    /// Concurrent deliveries for one recipient domain (one slow domain cannot block others).
    #[serde(default = "default_per_domain_concurrency")]
    pub per_domain_concurrency: u32,
    /// First retry after a temporary failure; doubles up to `retry_max_ms` (the queue
    /// schedules in whole seconds: waits are rounded up to the next second).
    #[serde(default = "default_retry_first_ms")]
    pub retry_first_ms: u64,
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// A message still undelivered after this long is bounced (Postfix: 5 days).
    #[serde(default = "default_max_queue_lifetime_s")]
    pub max_queue_lifetime_s: u64,
    /// Bound on each step of a delivery (connect, each reply).
    #[serde(default = "default_delivery_timeout_ms")]
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryProtocol {
    #[default]
    Smtp,
    Lmtp,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    #[default]
    Shared,
    Partitioned,
}

/// The mirror channel (mutual TLS with the cluster CA).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// This node's mirror listener (its own address, not the VIP).
    pub listen: SocketAddr,
    /// The peer node's mirror listener.
    pub peer: SocketAddr,
    /// The name in the peer's certificate.
    pub peer_name: String,
    /// This node's certificate chain and key, and the CA both nodes' certificates come from.
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub tls_ca: PathBuf,
    /// `strict`: no copy, no acceptance (451 4.3.0). `degraded`: accept on one disk, alarm,
    /// copy the backlog when the peer returns.
    #[serde(default = "default_on_failure")]
    pub on_failure: crate::relay::mirror::OnMirrorFailure,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// The peer silent this long: its copies are taken over and delivered from here.
    #[serde(default = "default_takeover_after_ms")]
    pub takeover_after_ms: u64,
    /// Longest wait for the peer's confirmation of one copy.
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
}

fn yes() -> bool {
    true
}
fn default_spool_dir() -> PathBuf {
    PathBuf::from("/var/spool/mxlb")
}
fn default_max_message_size() -> u64 {
    50 * 1024 * 1024
}
fn default_max_recipients() -> u32 {
    1000
}
fn default_max_sessions() -> u32 {
    1000
}
fn default_max_sessions_per_source() -> u32 {
    50
}
fn default_max_messages_per_session() -> u32 {
    1000
}
fn default_command_timeout_ms() -> u64 {
    300_000
}
fn default_data_timeout_ms() -> u64 {
    180_000
}
fn default_connections_per_backend() -> u32 {
    20
}
fn default_per_domain_concurrency() -> u32 {
    20
}
fn default_retry_first_ms() -> u64 {
    60_000
}
fn default_retry_max_ms() -> u64 {
    3_600_000
}
fn default_max_queue_lifetime_s() -> u64 {
    5 * 24 * 3600
}
fn default_delivery_timeout_ms() -> u64 {
    300_000
}
fn default_on_failure() -> crate::relay::mirror::OnMirrorFailure {
    crate::relay::mirror::OnMirrorFailure::Strict
}
fn default_heartbeat_ms() -> u64 {
    200
}
fn default_takeover_after_ms() -> u64 {
    3000
}
fn default_ack_timeout_ms() -> u64 {
    5000
}

impl DeliveryConfig {
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(match self.protocol {
            DeliveryProtocol::Smtp => 25,
            DeliveryProtocol::Lmtp => 24,
        })
    }
}

/// Checks `[relay]` against the rest of the file.
pub(super) fn validate(config: &Config, p: &mut impl FnMut(KeyPath, String)) {
    let Some(r) = &config.relay else { return };
    let at = KeyPath::new("relay");
    match config.vip(&r.vip) {
        None => p(at.key("vip"), format!("no [[vip]] is named `{}`", r.vip)),
        Some(v) if v.mode != ForwardingMode::Local => {
            p(at.key("vip"), format!("VIP `{}` must have mode = \"local\" (the relay runs on this node)", r.vip))
        }
        Some(_) => {}
    }
    if let Err(m) = super::validate_name(&r.node_name) {
        p(at.key("node_name"), m);
    }
    if r.hostname.is_empty() || r.hostname.contains(|c: char| c.is_whitespace() || c.is_control()) {
        p(at.key("hostname"), format!("`{}` is not a host name", r.hostname));
    }
    if r.domains.is_empty() {
        p(at.key("domains"), "at least one domain is required (the relay is not an open relay)".into());
    }
    for (i, d) in r.domains.iter().enumerate() {
        let name = d.strip_prefix('.').unwrap_or(d);
        if name.is_empty() || name.len() > 255 || !name.split('.').all(|l| !l.is_empty() && l.len() <= 63) {
            p(at.key("domains").index(i), format!("`{d}` is not a domain"));
        }
    }
    for (i, c) in r.trusted_networks.iter().enumerate() {
        if let Err(e) = c.parse::<crate::edge::Cidr>() {
            p(at.key("trusted_networks").index(i), e.to_string());
        }
    }
    if r.max_message_size < 1024 || r.max_message_size > 1 << 32 {
        p(at.key("max_message_size"), format!("{} is out of range (1024 to 4294967296)", r.max_message_size));
    }
    if r.max_recipients < 100 {
        p(at.key("max_recipients"), format!("{} is below the 100 RFC 5321 requires", r.max_recipients));
    }
    for (key, v) in [
        ("max_sessions", r.max_sessions),
        ("max_sessions_per_source", r.max_sessions_per_source),
        ("max_messages_per_session", r.max_messages_per_session),
    ] {
        if v == 0 {
            p(at.key(key), "must be at least 1".into());
        }
    }
    for (key, v) in [("command_timeout_ms", r.command_timeout_ms), ("data_timeout_ms", r.data_timeout_ms)] {
        if !(100..=3_600_000).contains(&v) {
            p(at.key(key), format!("{v} is out of range (100 to 3600000)"));
        }
    }
    match (&r.tls_cert, &r.tls_key) {
        (Some(_), None) => p(at.key("tls_key"), "tls_cert needs tls_key".into()),
        (None, Some(_)) => p(at.key("tls_cert"), "tls_key needs tls_cert".into()),
        _ => {}
    }
    if r.tls_client_ca.is_some() && r.tls_cert.is_none() {
        p(at.key("tls_client_ca"), "client certificates need STARTTLS (tls_cert and tls_key)".into());
    }
    if r.auth_users.is_some() && r.tls_cert.is_none() {
        p(at.key("auth_users"), "AUTH is offered only over TLS: it needs tls_cert and tls_key".into());
    }
    let d = &r.delivery;
    let dat = at.key("delivery");
    if d.backends.is_empty() {
        p(dat.key("backends"), "at least one back-end is required".into());
    }
    for (i, b) in d.backends.iter().enumerate() {
        if config.backend(b).is_none() {
            p(dat.key("backends").index(i), format!("no [[backend]] is named `{b}`"));
        }
    }
    if d.port == Some(0) {
        p(dat.key("port"), "port 0 is not a valid port".into());
    }
    for (key, v) in [("connections_per_backend", d.connections_per_backend), ("per_domain_concurrency", d.per_domain_concurrency)] {
        if !(1..=1000).contains(&v) {
            p(dat.key(key), format!("{v} is out of range (1 to 1000)"));
        }
    }
    if d.retry_first_ms < 10 || d.retry_first_ms > d.retry_max_ms {
        p(dat.key("retry_first_ms"), format!("{} must be at least 10 and at most retry_max_ms ({})", d.retry_first_ms, d.retry_max_ms));
    }
    if d.max_queue_lifetime_s == 0 {
        p(dat.key("max_queue_lifetime_s"), "must be at least 1".into());
    }
    if !(10..=3_600_000).contains(&d.timeout_ms) {
        p(dat.key("timeout_ms"), format!("{} is out of range (10 to 3600000)", d.timeout_ms));
    }
    if let Some(m) = &r.mirror {
        let mat = at.key("mirror");
        if m.listen == m.peer {
            p(mat.key("peer"), "the peer must be another node (it equals listen)".into());
        }
        if rustls::pki_types::ServerName::try_from(m.peer_name.as_str()).is_err() {
            p(mat.key("peer_name"), format!("`{}` is not a valid TLS server name", m.peer_name));
        }
        if !(10..=10_000).contains(&m.heartbeat_ms) {
            p(mat.key("heartbeat_ms"), format!("{} is out of range (10 to 10000)", m.heartbeat_ms));
        }
        if m.takeover_after_ms < 3 * m.heartbeat_ms {
            p(mat.key("takeover_after_ms"), format!("{} must be at least 3 heartbeats ({})", m.takeover_after_ms, 3 * m.heartbeat_ms));
        }
        if !(10..=600_000).contains(&m.ack_timeout_ms) {
            p(mat.key("ack_timeout_ms"), format!("{} is out of range (10 to 600000)", m.ack_timeout_ms));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const BASE: &str = r#"
[node]
interfaces = ["eth0"]

[[backend]]
name = "mail1"
address = "198.18.0.11"

[[vip]]
name = "relay"
address = "198.18.0.100"
ports = [25, 587]
mode = "local"
"#;

    const RELAY: &str = r#"
[relay]
vip = "relay"
node_name = "lb1"
hostname = "mx.example.net"
domains = ["example.net"]
trusted_networks = ["198.18.1.0/24"]

[relay.delivery]
backends = ["mail1"]
protocol = "lmtp"

[relay.mirror]
listen = "198.18.0.2:2526"
peer = "198.18.0.3:2526"
peer_name = "lb2.example.net"
tls_cert = "/etc/mxlb/lb1.pem"
tls_key = "/etc/mxlb/lb1.key"
tls_ca = "/etc/mxlb/ca.pem"
on_failure = "degraded"
"#;

    #[test]
    fn a_relay_section_parses_with_defaults() {
        let c = Config::parse(&format!("{BASE}{RELAY}"), "t.toml").unwrap();
        let r = c.relay.unwrap();
        assert_eq!(r.delivery.port(), 24);
        assert_eq!(r.max_recipients, 1000);
        let m = r.mirror.unwrap();
        assert_eq!(m.on_failure, crate::relay::mirror::OnMirrorFailure::Degraded);
        assert_eq!(m.takeover_after_ms, 3000);
    }

    #[test]
    fn relay_errors_name_line_and_key() {
        let bad = RELAY
            .replace("vip = \"relay\"", "vip = \"nope\"")
            .replace("trusted_networks = [\"198.18.1.0/24\"]", "trusted_networks = [\"198.18.1.1/24\"]")
            .replace("backends = [\"mail1\"]", "backends = [\"mail9\"]");
        let e = Config::parse(&format!("{BASE}{bad}"), "t.toml").unwrap_err().to_string();
        assert!(e.contains("t.toml:16: relay.vip: no [[vip]] is named `nope`"), "{e}");
        assert!(e.contains("relay.trusted_networks[0]"), "{e}");
        assert!(e.contains("relay.delivery.backends[0]: no [[backend]] is named `mail9`"), "{e}");
        let typo = RELAY.replace("on_failure", "on_fail");
        let e = Config::parse(&format!("{BASE}{typo}"), "t.toml").unwrap_err().to_string();
        assert!(e.contains("relay.mirror") && e.contains("on_fail"), "{e}");
    }

    #[test]
    fn auth_needs_tls() {
        let with_auth = RELAY.replace("domains = [\"example.net\"]", "domains = [\"example.net\"]\nauth_users = \"/etc/dovecot/users\"");
        let e = Config::parse(&format!("{BASE}{with_auth}"), "t.toml").unwrap_err().to_string();
        assert!(e.contains("relay.auth_users: AUTH is offered only over TLS"), "{e}");
        let with_tls = with_auth.replace("auth_users", "tls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\nauth_users");
        assert!(Config::parse(&format!("{BASE}{with_tls}"), "t.toml").is_ok());
    }

    #[test]
    fn the_relay_vip_must_be_local() {
        let base = BASE.replace("mode = \"local\"", "mode = \"dsr-l2\"\nbackends = [\"mail1\"]");
        let e = Config::parse(&format!("{base}{RELAY}"), "t.toml").unwrap_err().to_string();
        assert!(e.contains("must have mode = \"local\""), "{e}");
    }
}
