//! `[proxy]`: the POP3/IMAP proxy with mailbox affinity on a `local` VIP (see
//! [`crate::proxy`]).
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Config, ForwardingMode, KeyPath, VipConfig};

/// The proxy. Absent: this node runs no POP3/IMAP proxy.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// The `local` VIP(s) the proxy answers on: one name, or a list (an IPv4 and an IPv6 VIP
    /// of one service). It takes each VIP's ports listed below; the relay (if it shares a
    /// VIP) keeps the others.
    pub vip: VipNames,
    /// POP3 ports (STLS offered when a certificate is set). Default: 110 if the VIP has it.
    #[serde(default)]
    pub pop3: Option<Vec<u16>>,
    /// IMAP ports (STARTTLS offered when a certificate is set). Default: 143 if the VIP has it.
    #[serde(default)]
    pub imap: Option<Vec<u16>>,
    /// POP3 over implicit TLS. Default: 995 if the VIP has it.
    #[serde(default)]
    pub pop3s: Option<Vec<u16>>,
    /// IMAP over implicit TLS. Default: 993 if the VIP has it.
    #[serde(default)]
    pub imaps: Option<Vec<u16>>,
    /// Where the back-ends' POP3 and IMAP listen (plaintext; e.g. Dovecot listeners with
    /// `haproxy = yes` when `pass_client = "proxy-v2"`).
    #[serde(default = "default_pop3_port")]
    pub backend_pop3_port: u16,
    #[serde(default = "default_imap_port")]
    pub backend_imap_port: u16,
    /// Certificate chain and key (PEM): needed for 993/995 and to offer STARTTLS/STLS.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// How the back-end learns the client's address: a PROXY protocol v2 header (Dovecot
    /// `haproxy = yes` listeners, `haproxy_trusted_networks`); `imap-id`: what Dovecot's own
    /// proxy sends to back-ends that list it in `login_trusted_networks`, IMAP `ID
    /// ("x-originating-ip" ...)` and POP3 `XCLIENT ADDR=... PORT=...` (when the greeting
    /// offers `[XCLIENT]`); or not at all.
    #[serde(default)]
    pub pass_client: PassClient,
    /// After login: `sockmap` (kernel splice where possible, see `proxy::relay_logged_in`)
    /// or `copy` (userspace).
    #[serde(default)]
    pub relaying: Relaying,
    /// Accept logins in clear on 110/143 before STARTTLS (Dovecot's `disable_plaintext_auth
    /// = no`). Default true, as most lab and internal setups; set false on public networks:
    /// then only TLS sessions may log in and the capabilities say LOGINDISABLED.
    #[serde(default = "yes")]
    pub allow_plaintext_login: bool,
    /// A client that has not logged in by then is disconnected.
    #[serde(default = "default_login_timeout_ms")]
    pub login_timeout_ms: u64,
    /// Connecting to the owner; a slower owner counts as down (temporary answer).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// The whole login dialogue with the owner (greeting, client address, login).
    #[serde(default = "default_backend_timeout_ms")]
    pub backend_timeout_ms: u64,
    /// The wait before answering a login for a user who exists nowhere: the back-ends'
    /// `auth_failure_delay` (Dovecot: 2 s), so the answer cannot tell unknown users apart.
    #[serde(default = "default_auth_failure_delay_ms")]
    pub auth_failure_delay_ms: u64,
    /// Concurrent sessions in all, and from one client address.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: u32,
    #[serde(default = "default_max_sessions_per_source")]
    pub max_sessions_per_source: u32,
    /// Failed logins from one source (IPv4 address, IPv6 /64) within `failure_window_s`
    /// before each further failure is answered later (from `slow_delay_ms`, doubling, at most
    /// `slow_delay_max_ms`).
    #[serde(default = "default_slow_after")]
    pub slow_after: u32,
    /// Failed logins before the source is blocked for `block_for_s` (its logins are answered
    /// "try later" without asking a back-end).
    #[serde(default = "default_block_after")]
    pub block_after: u32,
    #[serde(default = "default_block_for_s")]
    pub block_for_s: u64,
    #[serde(default = "default_failure_window_s")]
    pub failure_window_s: u64,
    #[serde(default = "default_slow_delay_ms")]
    pub slow_delay_ms: u64,
    #[serde(default = "default_slow_delay_max_ms")]
    pub slow_delay_max_ms: u64,
    /// Text of the greeting (`+OK TEXT`, `* OK [CAPABILITY ...] TEXT`).
    #[serde(default = "default_greeting")]
    pub greeting: String,
}

/// One VIP name or several.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum VipNames {
    One(String),
    Many(Vec<String>),
}

impl VipNames {
    pub fn names(&self) -> Vec<&str> {
        match self {
            VipNames::One(n) => vec![n.as_str()],
            VipNames::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

impl From<&str> for VipNames {
    fn from(s: &str) -> Self {
        VipNames::One(s.to_string())
    }
}

/// How the client's address reaches the back-end.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PassClient {
    #[default]
    ProxyV2,
    ImapId,
    None,
}

/// How bytes move after login.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Relaying {
    #[default]
    Sockmap,
    Copy,
}

/// The ports the proxy serves, by service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyPorts {
    pub pop3: Vec<u16>,
    pub imap: Vec<u16>,
    pub pop3s: Vec<u16>,
    pub imaps: Vec<u16>,
}

impl ProxyPorts {
    pub fn all(&self) -> impl Iterator<Item = u16> + '_ {
        self.pop3.iter().chain(&self.imap).chain(&self.pop3s).chain(&self.imaps).copied()
    }
}

impl ProxyConfig {
    /// The ports taken on `vip`: the lists given, or the standard port of each service when
    /// the VIP has it.
    pub fn ports(&self, vip: &VipConfig) -> ProxyPorts {
        let pick = |given: &Option<Vec<u16>>, default: u16| match given {
            Some(list) => list.clone(),
            None => vip.ports.iter().copied().filter(|p| *p == default).collect(),
        };
        ProxyPorts { pop3: pick(&self.pop3, 110), imap: pick(&self.imap, 143), pop3s: pick(&self.pop3s, 995), imaps: pick(&self.imaps, 993) }
    }
}

/// The ports of VIP `vip` that the proxy takes (the relay leaves them alone).
pub fn taken_ports(config: &Config, vip: &str) -> Vec<u16> {
    match (&config.proxy, config.vip(vip)) {
        (Some(p), Some(v)) if p.vip.names().contains(&vip) => p.ports(v).all().collect(),
        _ => Vec::new(),
    }
}

fn yes() -> bool {
    true
}
fn default_pop3_port() -> u16 {
    110
}
fn default_imap_port() -> u16 {
    143
}
fn default_login_timeout_ms() -> u64 {
    60_000
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_backend_timeout_ms() -> u64 {
    30_000
}
fn default_auth_failure_delay_ms() -> u64 {
    2_000
}
fn default_max_sessions() -> u32 {
    10_000
}
fn default_max_sessions_per_source() -> u32 {
    50
}
fn default_slow_after() -> u32 {
    3
}
fn default_block_after() -> u32 {
    10
}
fn default_block_for_s() -> u64 {
    300
}
fn default_failure_window_s() -> u64 {
    600
}
fn default_slow_delay_ms() -> u64 {
    1_000
}
fn default_slow_delay_max_ms() -> u64 {
    15_000
}
fn default_greeting() -> String {
    "Mail server ready.".into()
}

/// Checks `[proxy]` against the rest of the file.
pub(super) fn validate(config: &Config, p: &mut impl FnMut(KeyPath, String)) {
    let Some(x) = &config.proxy else { return };
    let at = KeyPath::new("proxy");
    let names = x.vip.names();
    if names.is_empty() {
        p(at.key("vip"), "at least one VIP is required".into());
    }
    for (i, name) in names.iter().enumerate() {
        let key = match &x.vip {
            VipNames::One(_) => at.key("vip"),
            VipNames::Many(_) => at.key("vip").index(i),
        };
        if names[..i].contains(name) {
            p(key.clone(), format!("VIP `{name}` is listed twice"));
        }
        let v = match config.vip(name) {
            None => {
                p(key, format!("no [[vip]] is named `{name}`"));
                continue;
            }
            Some(v) if v.mode != ForwardingMode::Local => {
                p(key, format!("VIP `{name}` must have mode = \"local\" (the proxy runs on this node)"));
                continue;
            }
            Some(v) => v,
        };
        let ports = x.ports(v);
        let mut seen = Vec::new();
        for (key, list) in [("pop3", &ports.pop3), ("imap", &ports.imap), ("pop3s", &ports.pop3s), ("imaps", &ports.imaps)] {
            // Explicit lists apply to every VIP; only a port missing from all of them is wrong.
            for (j, port) in list.iter().enumerate() {
                if seen.contains(port) {
                    p(at.key(key).index(j), format!("port {port} is listed twice"));
                } else if !v.ports.contains(port) {
                    p(at.key(key).index(j), format!("port {port} is not among VIP `{}`'s ports", v.name));
                }
                seen.push(*port);
            }
        }
        if seen.is_empty() {
            p(key, format!("VIP `{}` has none of the proxy's ports (110, 143, 993, 995, or those listed)", v.name));
        }
        if x.tls_cert.is_none() {
            for (key, list) in [("pop3s", &ports.pop3s), ("imaps", &ports.imaps)] {
                if let Some(port) = list.first() {
                    p(at.key("tls_cert"), format!("implicit TLS ({key} port {port}) needs tls_cert and tls_key"));
                }
            }
        }
    }
    match (&x.tls_cert, &x.tls_key) {
        (Some(_), None) => p(at.key("tls_key"), "tls_cert needs tls_key".into()),
        (None, Some(_)) => p(at.key("tls_cert"), "tls_key needs tls_cert".into()),
        _ => {}
    }
    for (key, port) in [("backend_pop3_port", x.backend_pop3_port), ("backend_imap_port", x.backend_imap_port)] {
        if port == 0 {
            p(at.key(key), "port 0 is not a valid port".into());
        }
    }
    for (key, v, lo, hi) in [
        ("login_timeout_ms", x.login_timeout_ms, 100, 3_600_000),
        ("connect_timeout_ms", x.connect_timeout_ms, 10, 600_000),
        ("backend_timeout_ms", x.backend_timeout_ms, 10, 600_000),
        ("auth_failure_delay_ms", x.auth_failure_delay_ms, 0, 60_000),
        ("slow_delay_ms", x.slow_delay_ms, 0, 600_000),
        ("slow_delay_max_ms", x.slow_delay_max_ms, 0, 600_000),
        ("block_for_s", x.block_for_s, 1, 86_400 * 7),
        ("failure_window_s", x.failure_window_s, 1, 86_400 * 7),
    ] {
        if !(lo..=hi).contains(&v) {
            p(at.key(key), format!("{v} is out of range ({lo} to {hi})"));
        }
    }
    if x.slow_delay_max_ms < x.slow_delay_ms {
        p(at.key("slow_delay_max_ms"), format!("must be at least slow_delay_ms ({})", x.slow_delay_ms));
    }
    for (key, v) in [("max_sessions", x.max_sessions), ("max_sessions_per_source", x.max_sessions_per_source), ("slow_after", x.slow_after)] {
        if v == 0 {
            p(at.key(key), "must be at least 1".into());
        }
    }
    if x.block_after <= x.slow_after {
        p(at.key("block_after"), format!("must be above slow_after ({})", x.slow_after));
    }
    if x.greeting.is_empty() || x.greeting.contains(['\r', '\n']) || x.greeting.len() > 200 {
        p(at.key("greeting"), "must be one line of 1 to 200 characters".into());
    }
    if config.mailbox.is_none() {
        p(at.key("vip"), "the proxy needs a [mailbox] section (the back-ends holding the mailboxes)".into());
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, proxy::taken_ports};

    const BASE: &str = r#"
[node]
interfaces = ["eth0"]

[[backend]]
name = "mail1"
address = "198.18.0.11"

[[vip]]
name = "mail"
address = "198.18.0.100"
ports = [25, 110, 143, 993, 995]
mode = "local"

[mailbox]
backends = ["mail1"]
"#;

    const PROXY: &str = r#"
[proxy]
vip = "mail"
tls_cert = "/etc/mxlb/mail.pem"
tls_key = "/etc/mxlb/mail.key"
"#;

    #[test]
    fn a_proxy_section_parses_with_defaults() {
        let c = Config::parse(&format!("{BASE}{PROXY}"), "t.toml").unwrap();
        let x = c.proxy.clone().unwrap();
        assert_eq!(x.pass_client, super::PassClient::ProxyV2);
        assert_eq!(x.relaying, super::Relaying::Sockmap);
        assert!(x.allow_plaintext_login);
        assert_eq!((x.slow_after, x.block_after, x.block_for_s, x.login_timeout_ms), (3, 10, 300, 60_000));
        assert_eq!((x.backend_pop3_port, x.backend_imap_port), (110, 143));
        let mut taken = taken_ports(&c, "mail");
        taken.sort();
        assert_eq!(taken, vec![110, 143, 993, 995]);
    }

    #[test]
    fn proxy_errors_name_line_and_key() {
        let bad = PROXY
            .replace("vip = \"mail\"", "vip = \"mail\"\nimap = [144]\npass_client = \"proxy-v2\"")
            .replace("tls_key = \"/etc/mxlb/mail.key\"", "tls_key = \"/etc/mxlb/mail.key\"\nblock_after = 2");
        let e = Config::parse(&format!("{BASE}{bad}"), "t.toml").unwrap_err().to_string();
        assert!(e.contains("t.toml:20: proxy.imap[0]: port 144 is not among VIP `mail`'s ports"), "{e}");
        assert!(e.contains("proxy.block_after: must be above slow_after (3)"), "{e}");
        let no_map = BASE.replace("[mailbox]\nbackends = [\"mail1\"]\n", "");
        let e = Config::parse(&format!("{no_map}{PROXY}"), "t.toml").unwrap_err().to_string();
        assert!(e.contains("proxy.vip: the proxy needs a [mailbox] section"), "{e}");
        let typo = PROXY.replace("tls_key", "tls_keys");
        let e = Config::parse(&format!("{BASE}{typo}"), "t.toml").unwrap_err().to_string();
        assert!(e.contains("tls_keys"), "{e}");
    }

    #[test]
    fn implicit_tls_needs_a_certificate() {
        let no_tls = PROXY.replace("tls_cert = \"/etc/mxlb/mail.pem\"\ntls_key = \"/etc/mxlb/mail.key\"\n", "");
        let e = Config::parse(&format!("{BASE}{no_tls}"), "t.toml").unwrap_err().to_string();
        assert!(e.contains("proxy.tls_cert: implicit TLS (pop3s port 995)"), "{e}");
        let plain_only = no_tls.replace("vip = \"mail\"", "vip = \"mail\"\npop3s = []\nimaps = []");
        assert!(Config::parse(&format!("{BASE}{plain_only}"), "t.toml").is_ok());
    }

    #[test]
    fn an_ipv4_and_an_ipv6_vip() {
        let two = format!("{BASE}\n[[vip]]\nname = \"mail6\"\naddress = \"2001:db8::100\"\nports = [110, 143]\nmode = \"local\"\n");
        let x = PROXY.replace("vip = \"mail\"", "vip = [\"mail\", \"mail6\"]\npop3s = []\nimaps = []");
        let c = Config::parse(&format!("{two}{x}"), "t.toml").unwrap();
        assert_eq!(taken_ports(&c, "mail6"), vec![110, 143]);
        let bad = x.replace("\"mail6\"]", "\"mail7\"]");
        let e = Config::parse(&format!("{two}{bad}"), "t.toml").unwrap_err().to_string();
        assert!(e.contains("proxy.vip[1]: no [[vip]] is named `mail7`"), "{e}");
    }

    #[test]
    fn the_proxy_vip_must_be_local() {
        let base = BASE.replace("mode = \"local\"", "mode = \"dsr-l2\"\nbackends = [\"mail1\"]");
        let e = Config::parse(&format!("{base}{PROXY}"), "t.toml").unwrap_err().to_string();
        assert!(e.contains("must have mode = \"local\""), "{e}");
    }
}
