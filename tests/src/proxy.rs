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

use anyhow::{Context as _, Result, bail};

use crate::{
    AddrFamily, Lab,
    dovecot::{Dovecot, DovecotOpts, HAPROXY_IMAP_PORT, HAPROXY_POP3_PORT},
    node::{MxlbNode, NodeOpts},
    relay::RelayCerts,
};

/// The users: name, password, the back-end (1-based) holding the mailbox.
pub const USERS: [(&str, &str, usize); 3] = [("alice", "alice-pw", 1), ("bob", "bob pw", 2), ("carol", "carol\"pw", 3)];

/// The name in the proxy's certificate.
pub const SERVER_NAME: &str = "mx.example.net";

/// Dovecot's `auth_failure_delay` in the lab, and the proxy's for unknown users.
pub const AUTH_FAILURE_DELAY_S: u32 = 1;

/// The running scenario. Dropped before the lab.
pub struct ProxyLab<'a> {
    lab: &'a Lab,
    pub node: MxlbNode<'a>,
    pub dovecots: Vec<Dovecot>,
    pub certs: RelayCerts,
    dir: PathBuf,
}

impl<'a> ProxyLab<'a> {
    /// The lab for it: one LB, three back-ends without sinks.
    pub fn lab() -> Result<Lab> {
        Lab::builder().backends(3).no_sinks().build()
    }

    /// Starts the Dovecots and the node; `extra` is added to `[proxy]`.
    pub fn start(lab: &'a Lab, extra: &str) -> Result<ProxyLab<'a>> {
        let dir = std::env::temp_dir().join(format!("{}-proxy", lab.prefix()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let certs = RelayCerts::generate(&dir.join("pki"))?;
        let lb = lab.lb();
        // The LB holds the VIPs itself (no VRRP in this scenario).
        lb.ns().ip(&["addr", "add", &format!("{}/32", lab.vip(AddrFamily::V4)), "dev", "lo"])?;
        lb.ns().ip(&["addr", "add", &format!("{}/128", lab.vip(AddrFamily::V6)), "dev", "lo", "nodad"])?;
        let opts = DovecotOpts {
            haproxy_trusted_networks: Some(format!("{}/32 {}/128", lb.v4(), lb.v6())),
            login_trusted_networks: Some(format!("{}/32 {}/128", lb.v4(), lb.v6())),
            auth_failure_delay_s: Some(AUTH_FAILURE_DELAY_S),
        };
        let mut dovecots = Vec::new();
        for &(user, pw, i) in &USERS {
            let b = lab.backend(i);
            dovecots.push(Dovecot::start_with(b.ns(), &b.name(), &[(user, pw)], b.v4().into(), None, &opts)?);
        }
        let table = dir.join("mailboxes");
        std::fs::write(&table, USERS.iter().map(|(u, _, i)| format!("{u} b{i}\n")).collect::<String>())?;
        let vips: String = [("mail", AddrFamily::V4), ("mail6", AddrFamily::V6)]
            .iter()
            .map(|(n, f)| format!("[[vip]]\nname = \"{n}\"\naddress = \"{}\"\nports = [110, 143, 993, 995]\nmode = \"local\"\n\n", lab.vip(*f)))
            .collect();
        let toml = format!(
            "{vips}[proxy]\nvip = [\"mail\", \"mail6\"]\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n\
             backend_pop3_port = {HAPROXY_POP3_PORT}\nbackend_imap_port = {HAPROXY_IMAP_PORT}\n\
             auth_failure_delay_ms = {delay}\nslow_delay_ms = 50\nslow_delay_max_ms = 200\n{extra}\n\n\
             [mailbox]\nbackends = [\"b1\", \"b2\", \"b3\"]\ntable = \"{table}\"\n",
            cert = certs.server.cert.display(),
            key = certs.server.key.display(),
            table = table.display(),
            delay = AUTH_FAILURE_DELAY_S * 1000,
        );
        let node = match MxlbNode::start(lab, NodeOpts { ports: vec![], extra: Some(toml), ..Default::default() }) {
            Ok(n) => n,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let p = ProxyLab { lab, node, dovecots, certs, dir };
        p.wait_serving(Duration::from_secs(10))?;
        Ok(p)
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
        loop {
            let g = self.lab.client().ns().run(move || crate::relay::greeting_of(addr))?;
            if g.as_deref().is_some_and(|g| g.starts_with("+OK")) {
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

    /// `Login: user=<user>` lines in back-end `i`'s Dovecot log with `rip=ip`.
    pub fn logins(&self, i: usize, user: &str, ip: IpAddr) -> usize {
        let (u, r) = (format!("Login: user=<{user}>"), format!("rip={ip},"));
        self.dovecots[i - 1].log().lines().filter(|l| l.contains(&u) && l.contains(&r)).count()
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
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let l: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(Some(String::from_utf8_lossy(&l).trim_end_matches(['\r', '\n']).to_string()));
            }
            let mut chunk = [0u8; 4096];
            let n = match self.conn.as_mut().context("closed")? {
                Conn::Plain(s) => s.read(&mut chunk),
                Conn::Tls(s) => s.read(&mut chunk),
            };
            match n {
                Ok(0) => return Ok(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
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
