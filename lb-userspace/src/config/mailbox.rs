//! `[mailbox]`: the mailbox map shared by the POP3/IMAP proxy and the relay's `partitioned`
//! delivery (see [`crate::mailbox`]).
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Config, KeyPath};

/// Which back-ends hold mailboxes, and how their owners are found.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MailboxConfig {
    /// `[[backend]]` names holding mailboxes. Those with an `agent_port` report their mailbox
    /// lists (`mxlb agent --mailboxes ...`); once every one of those has reported, a mailbox
    /// found on none of them does not exist (the relay answers `550 5.1.1` at RCPT).
    pub backends: Vec<String>,
    /// Explicit owners: `mailbox backend-name` lines, read at start, on `mxlb mailbox reload`
    /// and SIGHUP; `mxlb mailbox move` rewrites it. A missing file is an empty table.
    #[serde(default)]
    pub table: Option<PathBuf>,
    /// How often the back-ends' lists are fetched (also on `mxlb mailbox refresh`).
    #[serde(default = "default_refresh_interval_s")]
    pub refresh_interval_s: u64,
    /// Bound on one fetch of one list.
    #[serde(default = "default_fetch_timeout_ms")]
    pub fetch_timeout_ms: u64,
}

fn default_refresh_interval_s() -> u64 {
    60
}

fn default_fetch_timeout_ms() -> u64 {
    10_000
}

impl MailboxConfig {
    /// The mailbox map's back-ends, from the `[[backend]]`s named here.
    pub fn backends(&self, config: &Config) -> Vec<crate::mailbox::MailboxBackend> {
        self.backends
            .iter()
            .filter_map(|n| config.backend(n))
            .map(|b| crate::mailbox::MailboxBackend {
                name: b.name.clone(),
                address: b.address,
                weight: b.weight,
                agent: b.agent_port.map(|p| std::net::SocketAddr::new(b.address, p)),
            })
            .collect()
    }

    /// The map for this configuration (reads the table).
    pub fn directory(&self, config: &Config) -> Result<crate::mailbox::Directory, crate::mailbox::MailboxError> {
        let mut d = crate::mailbox::Directory::new(self.backends(config), self.table.clone())?;
        d.refresh_interval = std::time::Duration::from_secs(self.refresh_interval_s);
        d.fetch_timeout = std::time::Duration::from_millis(self.fetch_timeout_ms);
        Ok(d)
    }
}

/// Checks `[mailbox]` against the rest of the file.
pub(super) fn validate(config: &Config, p: &mut impl FnMut(KeyPath, String)) {
    let partitioned =
        config.relay.as_ref().is_some_and(|r| r.delivery.routing == super::relay::Routing::Partitioned);
    let Some(m) = &config.mailbox else {
        if partitioned {
            p(
                KeyPath::new("relay").key("delivery").key("routing"),
                "partitioned routing needs a [mailbox] section (the back-ends holding the mailboxes)".into(),
            );
        }
        return;
    };
    let at = KeyPath::new("mailbox");
    if m.backends.is_empty() {
        p(at.key("backends"), "at least one back-end is required".into());
    }
    let mut seen = std::collections::HashSet::new();
    for (i, b) in m.backends.iter().enumerate() {
        if config.backend(b).is_none() {
            p(at.key("backends").index(i), format!("no [[backend]] is named `{b}`"));
        } else if !seen.insert(b) {
            p(at.key("backends").index(i), format!("back-end `{b}` is listed twice"));
        }
    }
    if !(1..=86_400).contains(&m.refresh_interval_s) {
        p(at.key("refresh_interval_s"), format!("{} is out of range (1 to 86400)", m.refresh_interval_s));
    }
    if !(10..=600_000).contains(&m.fetch_timeout_ms) {
        p(at.key("fetch_timeout_ms"), format!("{} is out of range (10 to 600000)", m.fetch_timeout_ms));
    }
    if let (Some(table), true) = (&m.table, !m.backends.is_empty()) {
        let names: Vec<&str> = m.backends.iter().map(String::as_str).collect();
        if let Err(e) = crate::mailbox::Table::load_or_empty(table, &names) {
            p(at.key("table"), e.to_string());
        }
    }
    if let (Some(r), true) = (&config.relay, partitioned) {
        for (i, b) in r.delivery.backends.iter().enumerate() {
            if !m.backends.contains(b) {
                p(
                    KeyPath::new("relay").key("delivery").key("backends").index(i),
                    format!("`{b}` holds no mailboxes: partitioned delivery goes to [mailbox] backends only"),
                );
            }
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
name = "store1"
address = "198.18.0.11"
agent_port = 5555

[[backend]]
name = "store2"
address = "198.18.0.12"
weight = 2

[[vip]]
name = "mail"
address = "198.18.0.100"
ports = [25]
mode = "local"

[relay]
vip = "mail"
node_name = "lb1"
hostname = "mx.example.net"
domains = ["example.net"]

[relay.delivery]
backends = ["store1", "store2"]
protocol = "lmtp"
routing = "partitioned"
"#;

    #[test]
    fn the_mailbox_map_is_built_from_the_backends_it_names() {
        let c = Config::parse(&format!("{BASE}\n[mailbox]\nbackends = [\"store1\", \"store2\"]\n"), "t.toml").unwrap();
        let m = c.mailbox.as_ref().unwrap();
        assert_eq!(m.refresh_interval_s, 60);
        let d = m.directory(&c).unwrap();
        let b = d.backends();
        assert_eq!(b[0].agent, Some("198.18.0.11:5555".parse().unwrap()), "learned from the back-end's agent");
        assert_eq!((b[1].agent, b[1].weight), (None, 2));
        assert!(d.learning());
    }

    #[test]
    fn mailbox_errors_name_line_and_key() {
        let e = Config::parse(BASE, "t.toml").unwrap_err().to_string();
        assert!(e.contains("relay.delivery.routing: partitioned routing needs a [mailbox] section"), "{e}");
        let bad = format!("{BASE}\n[mailbox]\nbackends = [\"store1\", \"nope\", \"store1\"]\nrefresh_interval_s = 0\n");
        let e = Config::parse(&bad, "t.toml").unwrap_err().to_string();
        assert!(e.contains("t.toml:33: mailbox.backends[1]: no [[backend]] is named `nope`"), "{e}");
        assert!(e.contains("mailbox.backends[2]: back-end `store1` is listed twice"), "{e}");
        assert!(e.contains("t.toml:34: mailbox.refresh_interval_s: 0 is out of range"), "{e}");
        assert!(e.contains("relay.delivery.backends[1]: `store2` holds no mailboxes"), "{e}");
        let typo = format!("{BASE}\n[mailbox]\nbackends = [\"store1\", \"store2\"]\nrefresh = 5\n");
        let e = Config::parse(&typo, "t.toml").unwrap_err().to_string();
        assert!(e.contains("mailbox") && e.contains("refresh"), "{e}");
    }

    #[test]
    fn a_broken_table_is_a_config_error_naming_its_own_line() {
        let dir = std::env::temp_dir().join(format!("mxlb-cfg-table-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let table = dir.join("mailboxes");
        std::fs::write(&table, "alice@example.net store1\nbob@example.net store9\n").unwrap();
        let text = format!("{BASE}\n[mailbox]\nbackends = [\"store1\", \"store2\"]\ntable = \"{}\"\n", table.display());
        let e = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(e.contains(&format!("mailbox.table: {}:2: no mailbox back-end is named `store9`", table.display())), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
