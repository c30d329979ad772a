//! The POP3/IMAP proxy scenario: one `mxlb run` LB node whose `[proxy]` answers on the lab's
//! IPv4 and IPv6 VIPs (`local` mode, addresses on the LB's `lo`) on 110, 143, 993 and 995, and
//! three Dovecot back-ends, each holding a different user. Dovecot gets the client's address
//! through PROXY v2 on extra `haproxy = yes` listeners trusted for the LB's address, so its
//! `Login: user=<...>, ... rip=...` log lines show which back-end a login reached and that
//! the client's address arrived.
//!
//! [`MailClient`] is a line client over plain TCP or rustls (implicit TLS or after
//! STARTTLS/STLS), run from the client's namespace.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    AddrFamily, Lab,
    dovecot::{Dovecot, DovecotOpts, HAPROXY_IMAP_PORT, HAPROXY_POP3_PORT},
    node::{MxlbNode, NodeOpts},
    relay::{RelayCerts, RelayOpts},
};

/// The users: name, password, the back-end (1-based) holding the mailbox.
pub const USERS: [(&str, &str, usize); 3] = [("alice", "alice-pw", 1), ("bob", "bob pw", 2), ("carol", "carol\"pw", 3)];

/// The name in the proxy's certificate.
pub const SERVER_NAME: &str = "mx.example.net";

/// Dovecot's `auth_failure_delay` in the lab, and the proxy's for unknown users.
pub const AUTH_FAILURE_DELAY_S: u32 = 1;

/// What a scenario runs beyond the defaults.
#[derive(Debug, Clone)]
pub struct ProxyOpts {
    /// Keys added to `[proxy]`.
    pub extra: String,
    /// The users (login, password, back-end 1..=3); [`USERS`] by default.
    pub users: Vec<(String, String, usize)>,
    /// `pass_client`: `proxy-v2` (the back-ends' `haproxy = yes` ports) or `imap-id` (their
    /// normal ports, the LB in `login_trusted_networks`).
    pub pass_client: &'static str,
    /// Also run the relay on the IPv4 VIP's port 25, delivering by LMTP to each recipient's
    /// owner (the users must then be mail addresses in [`crate::relay::DOMAIN`]).
    pub relay: bool,
}

impl Default for ProxyOpts {
    fn default() -> Self {
        ProxyOpts {
            extra: String::new(),
            users: USERS.iter().map(|(u, p, i)| (u.to_string(), p.to_string(), *i)).collect(),
            pass_client: "proxy-v2",
            relay: false,
        }
    }
}

/// Where the scenario's node serves `/metrics` (the LB's own address).
const METRICS_PORT: u16 = 9464;

/// The running scenario. Dropped before the lab.
pub struct ProxyLab<'a> {
    lab: &'a Lab,
    pub node: MxlbNode<'a>,
    pub dovecots: Vec<Dovecot>,
    pub certs: RelayCerts,
    pub opts: ProxyOpts,
    dir: PathBuf,
}

impl<'a> ProxyLab<'a> {
    /// The lab for it: one LB, three back-ends without sinks.
    pub fn lab() -> Result<Lab> {
        Lab::builder().backends(3).no_sinks().build()
    }

    /// Starts the Dovecots and the node with [`USERS`]; `extra` is added to `[proxy]`.
    pub fn start(lab: &'a Lab, extra: &str) -> Result<ProxyLab<'a>> {
        Self::start_with(lab, ProxyOpts { extra: extra.into(), ..Default::default() })
    }

    /// Starts the Dovecots (each with its users) and the node as `opts` says.
    pub fn start_with(lab: &'a Lab, opts: ProxyOpts) -> Result<ProxyLab<'a>> {
        let dir = std::env::temp_dir().join(format!("{}-proxy", lab.prefix()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let certs = RelayCerts::generate(&dir.join("pki"))?;
        let lb = lab.lb();
        // The LB holds the VIPs itself (no VRRP in this scenario).
        lb.ns().ip(&["addr", "add", &format!("{}/32", lab.vip(AddrFamily::V4)), "dev", "lo"])?;
        lb.ns().ip(&["addr", "add", &format!("{}/128", lab.vip(AddrFamily::V6)), "dev", "lo", "nodad"])?;
        let dovecot_opts = DovecotOpts {
            haproxy_trusted_networks: Some(format!("{}/32 {}/128", lb.v4(), lb.v6())),
            login_trusted_networks: Some(format!("{}/32 {}/128", lb.v4(), lb.v6())),
            auth_failure_delay_s: Some(AUTH_FAILURE_DELAY_S),
        };
        let mut dovecots = Vec::new();
        for i in 1..=3 {
            let b = lab.backend(i);
            let users: Vec<(&str, &str)> = opts.users.iter().filter(|u| u.2 == i).map(|(u, p, _)| (u.as_str(), p.as_str())).collect();
            dovecots.push(Dovecot::start_with(b.ns(), &b.name(), &users, b.v4().into(), None, &dovecot_opts)?);
        }
        let table = dir.join("mailboxes");
        std::fs::write(&table, opts.users.iter().map(|(u, _, i)| format!("{u} b{i}\n")).collect::<String>())?;
        let v4_ports = if opts.relay { "25, 110, 143, 993, 995" } else { "110, 143, 993, 995" };
        let vips: String = [("mail", AddrFamily::V4, v4_ports), ("mail6", AddrFamily::V6, "110, 143, 993, 995")]
            .iter()
            .map(|(n, f, ports)| format!("[[vip]]\nname = \"{n}\"\naddress = \"{}\"\nports = [{ports}]\nmode = \"local\"\n\n", lab.vip(*f)))
            .collect();
        let (pop3_port, imap_port) = match opts.pass_client {
            "proxy-v2" => (HAPROXY_POP3_PORT, HAPROXY_IMAP_PORT),
            _ => (110, 143),
        };
        let relay = if opts.relay {
            let relay_opts = RelayOpts {
                protocol: "lmtp".into(),
                delivery_extra: "routing = \"partitioned\"\nretry_first_ms = 200\nretry_max_ms = 1000\ntimeout_ms = 5000".into(),
                vrrp: false,
                mirrored: false,
                ..Default::default()
            };
            crate::relay::relay_section(lab, 1, "mail", &certs, &dir.join("spool"), &relay_opts)
        } else {
            String::new()
        };
        let toml = format!(
            "{vips}[proxy]\nvip = [\"mail\", \"mail6\"]\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n\
             pass_client = \"{pass}\"\nbackend_pop3_port = {pop3_port}\nbackend_imap_port = {imap_port}\n\
             auth_failure_delay_ms = {delay}\nslow_delay_ms = 50\nslow_delay_max_ms = 200\n{extra}\n\n\
             [mailbox]\nbackends = [\"b1\", \"b2\", \"b3\"]\ntable = \"{table}\"\n\n{relay}",
            cert = certs.server.cert.display(),
            key = certs.server.key.display(),
            table = table.display(),
            delay = AUTH_FAILURE_DELAY_S * 1000,
            pass = opts.pass_client,
            extra = opts.extra,
        );
        let node_opts = NodeOpts {
            ports: vec![],
            extra: Some(toml),
            metrics_listen: Some(SocketAddr::new(lb.v4().into(), METRICS_PORT)),
            ..Default::default()
        };
        let node = match MxlbNode::start(lab, node_opts) {
            Ok(n) => n,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let p = ProxyLab { lab, node, dovecots, certs, opts, dir };
        p.wait_serving(Duration::from_secs(10))?;
        Ok(p)
    }

    /// The node's Prometheus metrics (fetched from the client's namespace).
    pub fn metrics(&self) -> Result<String> {
        crate::relay::scrape_metrics(self.lab, SocketAddr::new(self.lab.lb().v4().into(), METRICS_PORT))
    }

    /// The VIP of `fam` on `port`.
    pub fn vip(&self, fam: AddrFamily, port: u16) -> SocketAddr {
        SocketAddr::new(self.lab.vip(fam), port)
    }

    /// The client's address in `fam` (what the back-ends must see as `rip`).
    pub fn client_ip(&self, fam: AddrFamily) -> IpAddr {
        self.lab.client().addr(fam)
    }

    fn wait_serving(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let addr = self.vip(AddrFamily::V4, 110);
        let smtp = self.opts.relay.then(|| self.vip(AddrFamily::V4, 25));
        loop {
            let (g, relay) = self.lab.client().ns().run(move || (crate::relay::greeting_of(addr), smtp.map(crate::relay::greeting_of)))?;
            let relay_ready = relay.is_none_or(|g| g.as_deref().is_some_and(|g| g.starts_with("220 ")));
            if g.as_deref().is_some_and(|g| g.starts_with("+OK")) && relay_ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the proxy on {addr} did not greet within {timeout:?} (last: {g:?})\nLB log:\n{}", self.node.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `f` with a fresh TLS client config (trusting the test CA) in the client's
    /// namespace.
    pub fn client<R: Send>(&self, f: impl FnOnce(Arc<rustls::ClientConfig>) -> Result<R> + Send) -> Result<R> {
        let tls = tls_client(&self.certs.ca)?;
        self.lab.client().ns().run(move || f(tls))?
    }

    /// Whether the mailbox map of the running node holds `user`'s owner healthy
    /// (`mxlb mailbox where USER --json`).
    pub fn owner_healthy(&self, user: &str) -> Result<bool> {
        let out = self.node.cli(&["mailbox", "where", user, "--json"])?;
        let w: serde_json::Value = serde_json::from_str(&out).with_context(|| out.clone())?;
        w["owner"]["healthy"].as_bool().with_context(|| format!("no owner health in {out}"))
    }

    /// `Login: user=<user>` lines in back-end `i`'s Dovecot log with `rip=ip`.
    pub fn logins(&self, i: usize, user: &str, ip: IpAddr) -> usize {
        let (log, ip) = (self.dovecots[i - 1].log(), ip.to_string());
        crate::dovecot::logins(&log).filter(|(u, rip)| *u == user && *rip == Some(ip.as_str())).count()
    }
}

impl Drop for ProxyLab<'_> {
    fn drop(&mut self) {
        let _ = self.node.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A rustls client config trusting `ca`.
pub fn tls_client(ca: &std::path::Path) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

/// A line client for POP3/IMAP (plain, implicit TLS, or upgraded with [`MailClient::start_tls`]).
pub struct MailClient {
    conn: Option<Conn>,
    buf: Vec<u8>,
}

impl MailClient {
    /// Connects (bounded); with `tls`, handshakes at once (993/995).
    pub fn connect(addr: SocketAddr, tls: Option<Arc<rustls::ClientConfig>>) -> Result<MailClient> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).with_context(|| format!("connect {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        s.set_write_timeout(Some(Duration::from_secs(15)))?;
        let mut c = MailClient { conn: Some(Conn::Plain(s)), buf: Vec::new() };
        if let Some(tls) = tls {
            c.start_tls(tls)?;
        }
        Ok(c)
    }

    /// Upgrades the connection to TLS (after STLS/STARTTLS was answered positively).
    pub fn start_tls(&mut self, tls: Arc<rustls::ClientConfig>) -> Result<()> {
        let Some(Conn::Plain(s)) = self.conn.take() else { bail!("already TLS") };
        let name = rustls::pki_types::ServerName::try_from(SERVER_NAME)?;
        let conn = rustls::ClientConnection::new(tls, name)?;
        self.conn = Some(Conn::Tls(Box::new(rustls::StreamOwned::new(conn, s))));
        Ok(())
    }

    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        match self.conn.as_mut().context("closed")? {
            Conn::Plain(s) => s.write_all(bytes)?,
            Conn::Tls(s) => {
                s.write_all(bytes)?;
                s.flush()?;
            }
        }
        Ok(())
    }

    /// The next line without its CRLF; `None` when the server closed the connection.
    pub fn line(&mut self) -> Result<Option<String>> {
        Ok(self.raw_line()?.map(|l| String::from_utf8_lossy(&l).trim_end_matches(['\r', '\n']).to_string()))
    }

    /// The next line as sent, line end included; `None` when the server closed the connection.
    pub fn raw_line(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                return Ok(Some(self.buf.drain(..=i).collect()));
            }
            if !self.fill()? {
                return Ok(None);
            }
        }
    }

    /// The next `n` bytes exactly (an IMAP literal).
    pub fn bytes(&mut self, n: usize) -> Result<Vec<u8>> {
        while self.buf.len() < n {
            ensure!(self.fill()?, "closed inside a {n}-byte literal");
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Reads more; false when the server closed the connection.
    fn fill(&mut self) -> Result<bool> {
        let mut chunk = [0u8; 16384];
        let n = match self.conn.as_mut().context("closed")? {
            Conn::Plain(s) => s.read(&mut chunk),
            Conn::Tls(s) => s.read(&mut chunk),
        };
        match n {
            Ok(0) => Ok(false),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends `TAG COMMAND`; returns the response lines (CRLF removed) and the literals they
    /// announced, byte for byte; fails unless the tagged reply is OK.
    pub fn imap_literals(&mut self, tag: &str, command: &str) -> Result<(Vec<String>, Vec<Vec<u8>>)> {
        self.send(format!("{tag} {command}\r\n").as_bytes())?;
        let (mut lines, mut literals) = (Vec::new(), Vec::new());
        loop {
            let l = self.line()?.with_context(|| format!("closed before `{tag}`'s answer: {lines:?}"))?;
            if let Some(rest) = l.strip_prefix(&format!("{tag} ")) {
                ensure!(rest.starts_with("OK"), "IMAP {command}: {l}\n{lines:?}");
                return Ok((lines, literals));
            }
            // A line ending with {n} is followed by n octets of literal, then the line goes on.
            if let Some(n) = l.strip_suffix('}').and_then(|t| t.rsplit_once('{')).and_then(|(_, n)| n.parse::<usize>().ok()) {
                literals.push(self.bytes(n)?);
            }
            lines.push(l);
        }
    }

    /// After a positive POP3 reply to RETR/TOP: the multi-line body up to the lone `.`, with
    /// dot-stuffing removed, line ends kept as sent.
    pub fn pop3_body(&mut self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let l = self.raw_line()?.context("closed inside a multi-line reply")?;
            if l == b".\r\n" {
                return Ok(out);
            }
            out.extend_from_slice(l.strip_prefix(b".").unwrap_or(&l));
        }
    }

    /// Sends `line` + CRLF and reads one line.
    pub fn cmd(&mut self, line: &str) -> Result<String> {
        self.send(format!("{line}\r\n").as_bytes())?;
        self.line()?.context("connection closed")
    }

    /// Sends an IMAP command and reads up to its tagged answer; returns every line.
    pub fn imap(&mut self, tag: &str, command: &str) -> Result<Vec<String>> {
        self.send(format!("{tag} {command}\r\n").as_bytes())?;
        self.until_tagged(tag)
    }

    /// Lines up to and including the one tagged `tag`.
    pub fn until_tagged(&mut self, tag: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        loop {
            let l = self.line()?.with_context(|| format!("closed before `{tag}`'s answer: {out:?}"))?;
            let done = l.starts_with(&format!("{tag} "));
            out.push(l);
            if done {
                return Ok(out);
            }
        }
    }
}

/// Every message in `user`'s INBOX at `addr` (BODY[], byte for byte, in order), over plain
/// IMAP; run it in a namespace that reaches `addr` (a back-end's Dovecot, or the proxy).
pub fn inbox(addr: SocketAddr, user: &str, password: &str) -> Result<Vec<Vec<u8>>> {
    let mut c = MailClient::connect(addr, None)?;
    let greeting = c.line()?.context("no IMAP greeting")?;
    ensure!(greeting.starts_with("* OK"), "IMAP greeting {greeting:?}");
    c.imap_literals("a", &format!("LOGIN {} {}", imap_quoted(user), imap_quoted(password)))?;
    let (lines, _) = c.imap_literals("b", "SELECT INBOX")?;
    let exists: usize = lines
        .iter()
        .find_map(|l| l.strip_prefix("* ").and_then(|r| r.strip_suffix(" EXISTS")).and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    if exists == 0 {
        return Ok(Vec::new());
    }
    let (_, literals) = c.imap_literals("c", "FETCH 1:* BODY.PEEK[]")?;
    let _ = c.imap_literals("d", "LOGOUT");
    ensure!(literals.len() == exists, "{exists} messages, {} literals fetched", literals.len());
    Ok(literals)
}

/// Waits (bounded) until `user`'s INBOX on back-end `i`, read there directly, holds at least
/// `n` messages; returns them.
pub fn wait_inbox(lab: &Lab, i: usize, user: &str, password: &str, n: usize, timeout: Duration) -> Result<Vec<Vec<u8>>> {
    let b = lab.backend(i);
    let addr = SocketAddr::new(b.v4().into(), 143);
    let (user, password) = (user.to_string(), password.to_string());
    let mut last = Vec::new();
    let got = crate::wait_some(&format!("{n} message(s) for {user} on b{i}"), timeout, || {
        last = b.ns().run(|| inbox(addr, &user, &password))??;
        Ok((last.len() >= n).then(|| last.clone()))
    });
    got.with_context(|| format!("{user}'s INBOX on b{i} holds {} message(s)", last.len()))
}

/// `s` as an IMAP quoted string (backslash and double quote escaped).
pub fn imap_quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Base64 for SASL in the tests.
pub fn b64(raw: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// The SASL PLAIN response for `user`/`password`.
pub fn plain(user: &str, password: &str) -> String {
    b64(format!("\0{user}\0{password}").as_bytes())
}

// ---- Switching the relaying mode, for `bench proxy` -------------------------------------------

/// `text` (the `[proxy]` TOML the scenario wrote) with its `relaying` key set to `relaying`:
/// an existing `relaying = ...` line is dropped and the new one goes right after the `[proxy]`
/// header. `None` if there is no `[proxy]` table.
pub fn with_relaying(text: &str, relaying: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len() + 32);
    let mut found = false;
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with("relaying") && line.contains('=') {
            continue;
        }
        out += line;
        if line.trim() == "[proxy]" {
            found = true;
            if !line.ends_with('\n') {
                out += "\n";
            }
            out += &format!("relaying = \"{relaying}\"\n");
        }
    }
    found.then_some(out)
}

impl ProxyLab<'_> {
    /// Stops `mxlb run` (the Dovecots and everything else stay), e.g. while a row without the
    /// proxy is measured; [`ProxyLab::relaunch`] starts it again.
    pub fn stop_node(&mut self) -> Result<()> {
        self.node.stop()
    }

    /// Restarts `mxlb run` with `[proxy] relaying = "RELAYING"` (`sockmap` or `copy`), the rest
    /// of the config unchanged, and waits until the proxy greets (bounded: 10 s). The same
    /// back-ends, mailboxes and logs serve both modes, so they compare within one run.
    pub fn relaunch(&mut self, relaying: &str) -> Result<()> {
        self.node.stop()?;
        let extra = self.node.opts.extra.as_deref().unwrap_or_default();
        let Some(extra) = with_relaying(extra, relaying) else { bail!("the node's config has no [proxy] table") };
        self.node.opts.extra = Some(extra);
        std::fs::write(&self.node.config_path, self.node.config_text())?;
        self.node.launch()?;
        self.wait_serving(Duration::from_secs(10))
    }
}

#[cfg(test)]
mod relaying_tests {
    use super::with_relaying;

    #[test]
    fn relaying_is_set_inside_the_proxy_table_once() {
        let t = "[[vip]]\nname = \"mail\"\n\n[proxy]\nvip = [\"mail\"]\nrelaying = \"sockmap\"\n\n[mailbox]\nbackends = []\n";
        let copy = with_relaying(t, "copy").unwrap();
        assert_eq!(copy, "[[vip]]\nname = \"mail\"\n\n[proxy]\nrelaying = \"copy\"\nvip = [\"mail\"]\n\n[mailbox]\nbackends = []\n");
        assert_eq!(with_relaying(&copy, "sockmap").unwrap(), copy.replace("copy", "sockmap"));
        assert_eq!(with_relaying("[mailbox]\n", "copy"), None);
    }
}
