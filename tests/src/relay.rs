//! The relay scenario: two `mxlb run` nodes whose store-and-forward relay answers on VIP
//! `relay` (the lab's IPv4 VIP in `local` mode, held by VRRP), mirroring to each other, and
//! back-ends running smtp-sink that dump every message they receive, so a test can compare
//! the queue ids the client saw acknowledged with the ids that arrived (our Received header
//! carries the queue id).
//!
//! Certificates (a cluster CA, one certificate per LB node for the mirror channel, one for
//! STARTTLS and one client certificate) are made with rcgen in the node's temp directory.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    AddrFamily, Lab, SinkOpts, SmtpSink,
    failover::{ADVERT_MS, BACKUP_PRIORITY, MASTER_PRIORITY},
    node::{MxlbNode, NodeOpts},
    vrrp::{VrrpOpts, wait_vrrp},
};

/// The mirror channel's port on each LB node.
pub const MIRROR_PORT: u16 = 2526;
/// The domain the relay receives mail for.
pub const DOMAIN: &str = "example.net";
/// The VRRP instance holding the relay VIP.
pub const INSTANCE: &str = "relay";

/// PEM files for one identity.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The test PKI.
#[derive(Debug, Clone)]
pub struct RelayCerts {
    pub ca: PathBuf,
    /// Mirror identities of LB 1 and LB 2 (`lb1.mxlb.test`, `lb2.mxlb.test`).
    pub nodes: Vec<Identity>,
    /// STARTTLS server identity (`mx.example.net`).
    pub server: Identity,
    /// A client certificate from the CA (may relay), and one from another CA (may not).
    pub client: Identity,
    pub stranger: Identity,
}

/// The name in LB `k`'s mirror certificate.
pub fn node_cert_name(k: usize) -> String {
    format!("lb{k}.mxlb.test")
}

impl RelayCerts {
    /// Makes a CA and the identities in `dir`.
    pub fn generate(dir: &Path) -> Result<RelayCerts> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
        std::fs::create_dir_all(dir)?;
        let ca_for = |cn: &str| -> Result<(rcgen::Certificate, Issuer<'static, KeyPair>)> {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, cn);
            let key = KeyPair::generate()?;
            let cert = params.self_signed(&key)?;
            Ok((cert, Issuer::new(params, key)))
        };
        let (ca, issuer) = ca_for("mxlb test cluster CA")?;
        let (_, other) = ca_for("someone else's CA")?;
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, ca.pem())?;
        let issue = |name: &str, file: &str, signer: &Issuer<'static, KeyPair>| -> Result<Identity> {
            let mut params = CertificateParams::new(vec![name.to_string()])?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, signer)?;
            let id = Identity { cert: dir.join(format!("{file}.pem")), key: dir.join(format!("{file}.key")) };
            std::fs::write(&id.cert, cert.pem())?;
            std::fs::write(&id.key, key.serialize_pem())?;
            Ok(id)
        };
        Ok(RelayCerts {
            nodes: vec![issue(&node_cert_name(1), "lb1", &issuer)?, issue(&node_cert_name(2), "lb2", &issuer)?],
            server: issue("mx.example.net", "server", &issuer)?,
            client: issue("client.example.com", "client", &issuer)?,
            stranger: issue("stranger.example.org", "stranger", &other)?,
            ca: ca_path,
        })
    }
}

/// How the pair is set up.
#[derive(Debug, Clone)]
pub struct RelayOpts {
    /// `strict` or `degraded`.
    pub on_failure: String,
    /// `smtp` (to smtp-sink on 25) or `lmtp` (to Dovecot on 24).
    pub protocol: String,
    /// `[relay] domains`.
    pub domains: Vec<String>,
    /// Lines added to `[relay]` (e.g. limits, `mailboxes = "..."`).
    pub relay_extra: String,
    /// Lines added to `[relay.delivery]`.
    pub delivery_extra: String,
    /// A `[mailbox]` section over every lab back-end with these extra lines (e.g.
    /// `table = "..."`); `None`: no mailbox map (needed for `routing = "partitioned"`).
    pub mailbox: Option<String>,
    /// `agent_port` of the back-ends (where `mxlb agent` listens on them).
    pub agent_port: Option<u16>,
    pub takeover_after_ms: u64,
    /// Hold the relay VIP with VRRP (LB 1 master); false: every node holds it (single node).
    pub vrrp: bool,
    /// Start LB 2 as well (mirror); false: LB 1 alone, without `[relay.mirror]`.
    pub mirrored: bool,
}

/// A node's Prometheus metrics at `addr`, fetched from the lab client's namespace.
pub fn scrape_metrics(lab: &Lab, addr: SocketAddr) -> Result<String> {
    use std::io::{Read as _, Write as _};
    lab.client().ns().run(move || -> Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: lb\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })?
}

/// Where LB `k` serves `/metrics` in the relay scenario.
pub fn metrics_addr(lab: &Lab, k: usize) -> SocketAddr {
    SocketAddr::new(lab.lb_n(k).v4().into(), 9464)
}

impl Default for RelayOpts {
    fn default() -> Self {
        RelayOpts {
            on_failure: "strict".into(),
            protocol: "smtp".into(),
            domains: vec![DOMAIN.into()],
            relay_extra: String::new(),
            delivery_extra: "retry_first_ms = 200\nretry_max_ms = 1000\ntimeout_ms = 5000".into(),
            mailbox: None,
            agent_port: None,
            takeover_after_ms: 1000,
            vrrp: true,
            mirrored: true,
        }
    }
}

/// The config appended to LB `k`'s node config (VIP, VRRP, relay, mirror).
pub fn relay_toml(lab: &Lab, k: usize, certs: &RelayCerts, spool: &Path, opts: &RelayOpts) -> String {
    let vip = lab.vip(AddrFamily::V4);
    let backends = (1..=lab.backends().len()).map(|i| format!("\"b{i}\"")).collect::<Vec<_>>().join(", ");
    let mut s = format!("[[vip]]\nname = \"relay\"\naddress = \"{vip}\"\nports = [25]\nmode = \"local\"\n\n");
    if opts.vrrp {
        let vrrp = VrrpOpts {
            name: INSTANCE.into(),
            priority: if k == 1 { MASTER_PRIORITY } else { BACKUP_PRIORITY },
            advert_ms: ADVERT_MS,
            vips: vec!["relay".into()],
            ..Default::default()
        };
        s += &vrrp.toml();
        s += "\n";
    }
    s += &relay_section(lab, k, "relay", certs, spool, opts);
    if let Some(extra) = &opts.mailbox {
        s += &format!("[mailbox]\nbackends = [{backends}]\n{extra}\n\n");
    }
    if opts.mirrored {
        let other = if k == 1 { 2 } else { 1 };
        let me = &certs.nodes[k - 1];
        s += &format!(
            "[relay.mirror]\nlisten = \"{}\"\npeer = \"{}\"\npeer_name = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_ca = \"{}\"\n\
             on_failure = \"{}\"\nheartbeat_ms = 100\ntakeover_after_ms = {}\nack_timeout_ms = 3000\n",
            SocketAddr::new(lab.lb_n(k).v4().into(), MIRROR_PORT),
            SocketAddr::new(lab.lb_n(other).v4().into(), MIRROR_PORT),
            node_cert_name(other),
            me.cert.display(),
            me.key.display(),
            certs.ca.display(),
            opts.on_failure,
            opts.takeover_after_ms,
        );
    }
    s
}

/// The `[relay]` and `[relay.delivery]` sections of LB `k` for the VIP named `vip` (partly
/// from `opts`: protocol, domains, extra keys); delivery to every back-end of the lab.
pub fn relay_section(lab: &Lab, k: usize, vip: &str, certs: &RelayCerts, spool: &Path, opts: &RelayOpts) -> String {
    let backends = (1..=lab.backends().len()).map(|i| format!("\"b{i}\"")).collect::<Vec<_>>().join(", ");
    format!(
        "[relay]\nvip = \"{vip}\"\nnode_name = \"lb{k}\"\nhostname = \"mx.{DOMAIN}\"\nspool_dir = \"{spool}\"\n\
         domains = [{domains}]\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\ntls_client_ca = \"{ca}\"\n{extra}\n\n\
         [relay.delivery]\nbackends = [{backends}]\nprotocol = \"{proto}\"\n{dextra}\n\n",
        spool = spool.display(),
        cert = certs.server.cert.display(),
        key = certs.server.key.display(),
        ca = certs.ca.display(),
        domains = opts.domains.iter().map(|d| format!("\"{d}\"")).collect::<Vec<_>>().join(", "),
        extra = opts.relay_extra,
        proto = opts.protocol,
        dextra = opts.delivery_extra,
    )
}

/// One or two relay nodes on the lab (LB 1 master when `vrrp`). Dropped before the lab.
pub struct RelayPair<'a> {
    lab: &'a Lab,
    pub lb1: MxlbNode<'a>,
    pub lb2: Option<MxlbNode<'a>>,
    pub certs: RelayCerts,
    pub opts: RelayOpts,
    dir: PathBuf,
}

impl<'a> RelayPair<'a> {
    /// Starts LB 2 (if mirrored) then LB 1, and waits (bounded) until LB 1 serves the VIP.
    pub fn start(lab: &'a Lab, opts: RelayOpts) -> Result<RelayPair<'a>> {
        let dir = std::env::temp_dir().join(format!("{}-relay", lab.prefix()));
        let _ = std::fs::remove_dir_all(&dir);
        let certs = RelayCerts::generate(&dir.join("pki"))?;
        let node = |k: usize| -> Result<MxlbNode<'a>> {
            let spool = dir.join(format!("spool{k}"));
            MxlbNode::start_on(
                lab,
                k,
                NodeOpts {
                    ports: vec![],
                    agent_port: opts.agent_port,
                    metrics_listen: Some(metrics_addr(lab, k)),
                    extra: Some(relay_toml(lab, k, &certs, &spool, &opts)),
                    ..Default::default()
                },
            )
        };
        // The directory goes with the pair; a node failing to start must not leave it behind.
        let started = (|| -> Result<_> {
            let lb2 = if opts.mirrored { Some(node(2)?) } else { None };
            Ok((node(1)?, lb2))
        })();
        let (lb1, lb2) = match started {
            Ok(nodes) => nodes,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let pair = RelayPair { lab, lb1, lb2, certs, opts, dir };
        if pair.opts.vrrp {
            wait_vrrp(&pair.lb1, INSTANCE, mxlb::vrrp::instance::State::Master, Duration::from_secs(5))?;
        }
        pair.wait_serving(Duration::from_secs(10))?;
        Ok(pair)
    }

    /// The relay's address as clients use it.
    pub fn vip(&self) -> SocketAddr {
        SocketAddr::new(self.lab.vip(AddrFamily::V4), 25)
    }

    /// LB `k`'s spool directory.
    pub fn spool(&self, k: usize) -> PathBuf {
        self.dir.join(format!("spool{k}"))
    }

    /// Waits until the client gets a 220 greeting from the VIP.
    pub fn wait_serving(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let vip = self.vip();
        loop {
            let greeting = self.lab.client().ns().run(move || greeting_of(vip))?;
            if greeting.as_deref().is_some_and(|g| g.starts_with("220 ")) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the relay on {vip} did not greet within {timeout:?} (last: {greeting:?})\nLB 1 log:\n{}", self.lb1.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// LB `k`'s Prometheus metrics (fetched from the client's namespace).
    pub fn metrics(&self, k: usize) -> Result<String> {
        scrape_metrics(self.lab, metrics_addr(self.lab, k))
    }

    /// Queue ids in LB `k`'s spool area (`queue` or `replica`), read from the file names.
    pub fn spooled(&self, k: usize, area: &str) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(self.spool(k).join(area))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .filter(|n| is_queue_id(n))
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }
}

impl Drop for RelayPair<'_> {
    fn drop(&mut self) {
        // The agents first (bounded), or a node still storing a copy recreates its spool
        // after the directory is gone.
        if let Some(lb2) = self.lb2.as_mut() {
            let _ = lb2.stop();
        }
        let _ = self.lb1.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads the first line a server sends (bounded), from the current namespace.
pub fn greeting_of(addr: SocketAddr) -> Option<String> {
    use std::io::Read as _;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).lines().next()?.to_string())
}

/// Whether `s` is an mxlb queue id (24 lowercase hex digits).
pub fn is_queue_id(s: &str) -> bool {
    s.len() == 24 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Queue ids in `250 ... queued as ID` replies found in a client's log (smtp-source `-v`,
/// swaks), in order.
pub fn acknowledged_ids(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("250") && l.contains("queued as "))
        .filter_map(|l| l.split("queued as ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(|id| id.trim_end_matches(['.', ')', ']', ';']).to_string())
        .filter(|id| is_queue_id(id))
        .collect()
}

/// Queue ids in the Received headers the relay added (`(mxlb) with ESMTP id ID`), with how
/// often each occurs: what arrived at the back-ends, duplicates counted.
pub fn relayed_ids(dump: &str) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    let mut rest = dump;
    while let Some(i) = rest.find("(mxlb) with ") {
        rest = &rest[i + 12..];
        if let Some(j) = rest.find(" id ") {
            let id: String = rest[j + 4..].chars().take(24).collect();
            if is_queue_id(&id) && j < 16 {
                *out.entry(id).or_insert(0) += 1;
            }
        }
    }
    out
}

/// smtp-sink on every back-end (port 25, IPv4 and IPv6) appending each message to a dump file.
pub struct DumpSinks {
    pub sinks: Vec<SmtpSink>,
    pub dumps: Vec<PathBuf>,
    dir: PathBuf,
}

impl DumpSinks {
    pub fn start(lab: &Lab) -> Result<DumpSinks> {
        let dir = std::env::temp_dir().join(format!("{}-dumps", lab.prefix()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        // smtp-sink runs as nobody: it must be able to create its dump files.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
        let mut sinks = Vec::new();
        let mut dumps = Vec::new();
        for (i, b) in lab.backends().iter().enumerate() {
            let dump = dir.join(format!("b{}", i + 1));
            let opts = SinkOpts {
                hostname: Some(b.name()),
                extra: vec!["-D".into(), dump.display().to_string()],
                ..Default::default()
            };
            sinks.push(SmtpSink::start(b.ns(), &opts).with_context(|| format!("smtp-sink on {}", b.name()))?);
            dumps.push(dump);
        }
        Ok(DumpSinks { sinks, dumps, dir })
    }

    /// Kills back-end `i`'s sink (1-based): the back-end refuses connections from now on.
    /// What it received so far stays readable.
    pub fn kill(&mut self, i: usize) {
        if let Some(sink) = self.sinks.get_mut(i - 1) {
            for pid in sink.pids() {
                // SAFETY: plain kill(2) on a pid we started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }

    /// Every relayed queue id received by any back-end, with its count.
    pub fn received(&self) -> HashMap<String, usize> {
        let mut all = HashMap::new();
        for d in &self.dumps {
            let text = std::fs::read(d).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
            for (id, n) in relayed_ids(&text) {
                *all.entry(id).or_insert(0) += n;
            }
        }
        all
    }

    /// The dumped message (as smtp-sink wrote it, its own headers first) carrying queue id
    /// `id` in our Received header.
    pub fn message(&self, id: &str) -> Option<String> {
        for d in &self.dumps {
            let text = std::fs::read(d).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
            // smtp-sink starts every dumped message with its X-Client-Addr header.
            for msg in text.split("X-Client-Addr: ").skip(1) {
                if relayed_ids(msg).contains_key(id) {
                    return Some(format!("X-Client-Addr: {msg}"));
                }
            }
        }
        None
    }

    /// Waits (bounded) until every id in `ids` has arrived; returns what arrived.
    pub fn wait_for(&self, ids: &[String], timeout: Duration) -> HashMap<String, usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.received();
            if ids.iter().all(|id| got.contains_key(id)) || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for DumpSinks {
    fn drop(&mut self) {
        self.sinks.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The value of metric `name` (no labels) in a Prometheus text exposition.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// Lost and duplicated messages: acknowledged ids that never arrived, and arrivals beyond one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciliation {
    pub acknowledged: usize,
    pub arrived: usize,
    pub lost: Vec<String>,
    pub duplicates: usize,
}

pub fn reconcile(acknowledged: &[String], received: &HashMap<String, usize>) -> Reconciliation {
    Reconciliation {
        acknowledged: acknowledged.len(),
        arrived: received.len(),
        lost: acknowledged.iter().filter(|id| !received.contains_key(*id)).cloned().collect(),
        duplicates: received.values().map(|n| n.saturating_sub(1)).sum(),
    }
}

/// The lab: two LBs, `backends` back-ends without the default sinks, VIP by ARP.
pub fn relay_lab(backends: usize) -> Result<Lab> {
    Lab::builder().lbs(2).backends(backends).no_sinks().vip_by_arp().build()
}

/// `ip` as Postfix's smtp-source wants it.
pub fn endpoint(ip: IpAddr, port: u16) -> String {
    crate::postfix_endpoint(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_read_from_client_logs_and_received_headers() {
        let log = "smtp-source: <<< 250 2.0.0 Ok: queued as 0005f1a2b3c4d5e6aabbccdd\nsmtp-source: <<< 250 2.1.0 Ok\n\
                   smtp-source: <<< 451 4.3.0 mirror\n<<< 250 2.0.0 Ok: queued as 0005f1a2b3c4d5e6aabbccde\n";
        assert_eq!(acknowledged_ids(log), vec!["0005f1a2b3c4d5e6aabbccdd", "0005f1a2b3c4d5e6aabbccde"]);
        let dump = "Received: from vm ([198.18.0.1])\r\n\tby mx.example.net (mxlb) with ESMTP id 0005f1a2b3c4d5e6aabbccdd\r\n\tfor <a@example.net>; x\r\n\
                    Received: from vm ([198.18.0.1])\r\n\tby mx.example.net (mxlb) with ESMTPS id 0005f1a2b3c4d5e6aabbccdd; x\r\n\
                    Received: by smtp-sink (smtp-sink) with SMTP id 775cd8bc;\r\n";
        let got = relayed_ids(dump);
        assert_eq!(got.get("0005f1a2b3c4d5e6aabbccdd"), Some(&2));
        assert_eq!(got.len(), 1);
        let r = reconcile(&acknowledged_ids(log), &got);
        assert_eq!(r.lost, vec!["0005f1a2b3c4d5e6aabbccde"]);
        assert_eq!(r.duplicates, 1);
    }
}

/// A message that tests a mail transport's transparency: lines that need dot-stuffing (a
/// leading dot, two dots, a line of only a dot), 8-bit UTF-8, a 900-byte line, spaces and
/// tabs at the edges. Without a final CRLF (the end of data adds it).
pub fn transport_test_message(to: &str, subject: &str, message_id: &str) -> Vec<u8> {
    let long: String = (0..900).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let lines: Vec<String> = vec![
        "From: Sender <sender@example.com>".into(),
        format!("To: <{to}>"),
        format!("Subject: {subject}"),
        format!("Message-ID: <{message_id}>"),
        "MIME-Version: 1.0".into(),
        "Content-Type: text/plain; charset=utf-8".into(),
        "Content-Transfer-Encoding: 8bit".into(),
        String::new(),
        ".a line starting with a dot".into(),
        "..two dots".into(),
        ".".into(),
        "the line before was a single dot".into(),
        "8-bit: h\u{e9}llo w\u{f6}rld \u{2014} \u{65e5}\u{672c}\u{8a9e} \u{2709}".into(),
        long,
        "  leading and trailing spaces  ".into(),
        "\ttab first".into(),
        String::new(),
        "last line".into(),
    ];
    lines.join("\r\n").into_bytes()
}

/// Dot-stuffing as a client does it: a line starting with `.` gets one more.
pub fn dot_stuff(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 16);
    let mut at_line_start = true;
    for &b in content {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

/// One transaction on an open session (after EHLO): MAIL (with `params`), RCPTs, DATA, the
/// content (dot-stuffed here) and the end of data. The content must not end with CRLF (the
/// end-of-data sequence adds it). Returns the final reply.
pub fn transaction(c: &mut RawSmtp, from: &str, params: &str, rcpts: &[&str], content: &[u8]) -> Result<SmtpReply> {
    let r = c.cmd(&format!("MAIL FROM:<{from}>{params}"))?;
    ensure!(r.code == 250, "MAIL: {r:?}");
    for rcpt in rcpts {
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"))?;
        ensure!(r.code == 250, "RCPT {rcpt}: {r:?}");
    }
    let r = c.cmd("DATA")?;
    ensure!(r.code == 354, "DATA: {r:?}");
    c.send(&dot_stuff(content))?;
    c.send(b"\r\n.\r\n")?;
    c.reply()
}

/// Sends each `(from, rcpts, content)` as one message in one session from the lab client;
/// returns the queue ids the relay acknowledged, in order.
pub fn send_all(lab: &Lab, vip: SocketAddr, msgs: Vec<(String, Vec<String>, Vec<u8>)>) -> Result<Vec<String>> {
    lab.client().ns().run(move || -> Result<Vec<String>> {
        let (mut c, greeting) = RawSmtp::connect(vip)?;
        ensure!(greeting.code == 220, "greeting {greeting:?}");
        let r = c.cmd("EHLO client.example.com")?;
        ensure!(r.code == 250, "EHLO: {r:?}");
        let mut ids = Vec::new();
        for (from, rcpts, content) in &msgs {
            let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
            let params = if content.is_ascii() { "" } else { " BODY=8BITMIME" };
            let r = transaction(&mut c, from, params, &rcpts, content)?;
            ensure!(r.code == 250, "end of data: {r:?}");
            ids.push(r.queue_id().with_context(|| format!("no queue id in {r:?}"))?);
        }
        let _ = c.cmd("QUIT");
        Ok(ids)
    })?
}

/// A blocking SMTP client for scripted sessions (run it inside the client's namespace with
/// `ns.run`): sends exactly the bytes it is given, so a test can send what real clients never
/// would (smuggling sequences, bare CR/LF, over-long lines, pipelined groups).
pub struct RawSmtp {
    stream: std::net::TcpStream,
    buf: Vec<u8>,
}

/// One reply: its code and all its lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpReply {
    pub code: u16,
    pub text: String,
}

impl SmtpReply {
    /// The queue id of a `250 ... queued as ID` reply.
    pub fn queue_id(&self) -> Option<String> {
        acknowledged_ids(&self.text).into_iter().next()
    }
}

impl RawSmtp {
    /// Connects and reads the greeting.
    pub fn connect(addr: SocketAddr) -> Result<(RawSmtp, SmtpReply)> {
        let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).with_context(|| format!("connect {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut c = RawSmtp { stream, buf: Vec::new() };
        let greeting = c.reply()?;
        Ok((c, greeting))
    }

    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        use std::io::Write as _;
        self.stream.write_all(bytes).context("send")
    }

    /// Sends `line` + CRLF and reads one reply.
    pub fn cmd(&mut self, line: &str) -> Result<SmtpReply> {
        self.send(format!("{line}\r\n").as_bytes())?;
        self.reply()
    }

    /// Reads one (possibly multi-line) reply; fails on EOF or after the read timeout.
    pub fn reply(&mut self) -> Result<SmtpReply> {
        use std::io::Read as _;
        let mut text = String::new();
        loop {
            while let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..end + 2).collect();
                let line = String::from_utf8_lossy(&line[..end]).into_owned();
                text.push_str(&line);
                text.push('\n');
                if line.len() < 4 || line.as_bytes()[3] != b'-' {
                    let code = line.get(..3).and_then(|c| c.parse().ok()).with_context(|| format!("bad reply line {line:?}"))?;
                    return Ok(SmtpReply { code, text });
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).context("reading a reply")?;
            if n == 0 {
                bail!("connection closed (after {text:?})");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Whether the server closed the connection (reads until EOF, bounded by the timeout).
    pub fn closed(&mut self) -> bool {
        use std::io::Read as _;
        let mut chunk = [0u8; 512];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => return matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe),
            }
        }
    }

    /// EHLO, MAIL, RCPT (each), DATA, the content (dot-stuffed by the caller if needed) and
    /// the end of data; returns the final reply.
    pub fn send_message(&mut self, from: &str, rcpts: &[&str], content: &[u8]) -> Result<SmtpReply> {
        let r = self.cmd("EHLO client.example.com")?;
        anyhow::ensure!(r.code == 250, "EHLO: {r:?}");
        let r = self.cmd(&format!("MAIL FROM:<{from}>"))?;
        anyhow::ensure!(r.code == 250, "MAIL: {r:?}");
        for rcpt in rcpts {
            let r = self.cmd(&format!("RCPT TO:<{rcpt}>"))?;
            anyhow::ensure!(r.code == 250, "RCPT {rcpt}: {r:?}");
        }
        let r = self.cmd("DATA")?;
        anyhow::ensure!(r.code == 354, "DATA: {r:?}");
        self.send(content)?;
        self.send(b"\r\n.\r\n")?;
        self.reply()
    }
}

/// The fault tests' load: smtp-source with `messages` 4 KiB messages over 20 sessions to
/// `rcpt@example.net`, `-v` so its log carries every `250 ... queued as ID` (see
/// [`acknowledged_ids`]), bounded to 2 minutes.
pub fn logged_load(messages: u32) -> crate::SourceOpts {
    crate::SourceOpts {
        sessions: messages,
        concurrency: 20,
        msg_size: 4096,
        to: format!("rcpt@{DOMAIN}"),
        timeout: Duration::from_secs(120),
        extra: vec!["-v".into()],
        ..Default::default()
    }
}

/// Runs `load` from the client against `target` while `fault` runs on this thread (a kill,
/// a restart); returns smtp-source's result once both are done.
pub fn under_load(
    lab: &Lab,
    target: SocketAddr,
    load: &crate::SourceOpts,
    fault: impl FnOnce() -> Result<()>,
) -> Result<crate::SourceResult> {
    std::thread::scope(|s| {
        let running = s.spawn(|| lab.smtp_source(target, load));
        let faulted = fault();
        let source = running.join().map_err(|_| anyhow::anyhow!("the smtp-source thread panicked"))??;
        faulted.map(|()| source)
    })
}

/// What one crash trial saw.
#[derive(Debug, Clone)]
pub struct KillTrial {
    /// When LB 1 was killed, after the load started.
    pub killed_after: Duration,
    /// How long after the kill LB 2 was VRRP master (None: not within 10 s).
    pub lb2_master_after: Option<Duration>,
    /// The smtp-source runs: the first one usually ends at the crash (smtp-source gives up on
    /// a broken session), the next ones carry on against LB 2 until `messages` were sent.
    pub runs: Vec<crate::SourceResult>,
    /// Messages the runs completed (DATA finished) in all.
    pub completed: u64,
    /// Until every acknowledged id had arrived (or the bound).
    pub arrival_wait: Duration,
    /// Over the messages of this trial only.
    pub outcome: Reconciliation,
}

/// Arrivals once they stopped changing for 2 s (bounded: 30 s).
pub fn settled(sinks: &DumpSinks) -> HashMap<String, usize> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = sinks.received();
    let mut since = Instant::now();
    while Instant::now() < deadline && since.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(250));
        let now = sinks.received();
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
    last
}

/// The crash trial of the issue: smtp-source sends `messages` (4 KiB, 20 sessions, `-v` so its
/// log carries every `250 ... queued as ID`) to the VIP while LB 1 (VRRP master, primary) is
/// SIGKILLed `kill_after` into the run; LB 2 takes the VIP (VRRP) and LB 1's copies (mirror
/// takeover), and the load goes on against it. Waits (bounded) until every acknowledged id
/// reached a back-end and arrivals settled, then reconciles what arrived during this trial
/// (earlier trials on the same sinks are not counted again). LB 1 stays down;
/// [`RelayPair::restart_lb1`] brings it back.
///
/// In `strict` mode LB 2 alone refuses mail with 451 (it has no peer for copies), so the load
/// only goes on once LB 1 is back: `restart_after` restarts it that long after the kill (it
/// then learns which of its messages LB 2 took over, and drops them). In `degraded` mode LB 2
/// accepts alone, and `None` leaves LB 1 down.
pub fn kill_trial(
    lab: &Lab,
    pair: &mut RelayPair,
    sinks: &DumpSinks,
    messages: u32,
    kill_after: Duration,
    restart_after: Option<Duration>,
) -> Result<KillTrial> {
    let before = sinks.received();
    let vip = pair.vip();
    let started = Instant::now();
    let (runs, killed_after, lb2_master_after) = std::thread::scope(|s| -> Result<_> {
        let load = s.spawn(|| -> Result<Vec<crate::SourceResult>> {
            let mut runs: Vec<crate::SourceResult> = Vec::new();
            let mut completed = 0u64;
            while completed < u64::from(messages) && runs.len() < 40 && started.elapsed() < Duration::from_secs(240) {
                let opts = logged_load(messages - completed as u32);
                let r = lab.smtp_source(vip, &opts)?;
                completed += r.completed;
                let short = r.completed < u64::from(opts.sessions);
                runs.push(r);
                if short {
                    // The VIP is moving, or the survivor refuses without a peer: try again
                    // a little later, as a sending MTA would.
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
            Ok(runs)
        });
        std::thread::sleep(kill_after);
        pair.lb1.kill();
        let killed_after = started.elapsed();
        let killed = Instant::now();
        let master = pair.lb2.as_ref().and_then(|lb2| {
            wait_vrrp(lb2, INSTANCE, mxlb::vrrp::instance::State::Master, Duration::from_secs(10)).ok().map(|_| killed.elapsed())
        });
        if let Some(after) = restart_after {
            std::thread::sleep(after.saturating_sub(killed.elapsed()));
            pair.restart_lb1()?;
        }
        let runs = load.join().map_err(|_| anyhow::anyhow!("the smtp-source thread panicked"))??;
        Ok((runs, killed_after, master))
    })?;
    let acknowledged: Vec<String> = runs.iter().flat_map(|r| acknowledged_ids(&r.stderr)).collect();
    let t0 = Instant::now();
    sinks.wait_for(&acknowledged, Duration::from_secs(90));
    let arrival_wait = t0.elapsed();
    let during: HashMap<String, usize> = settled(sinks)
        .into_iter()
        .filter_map(|(id, n)| {
            let n = n - before.get(&id).copied().unwrap_or(0).min(n);
            (n > 0).then_some((id, n))
        })
        .collect();
    Ok(KillTrial {
        killed_after,
        lb2_master_after,
        completed: runs.iter().map(|r| r.completed).sum(),
        runs,
        arrival_wait,
        outcome: reconcile(&acknowledged, &during),
    })
}

impl RelayPair<'_> {
    /// Sends one small message from the client until the relay answers 250 (bounded): the
    /// relay accepts mail again (e.g. once its mirror link is back). Returns the ids accepted.
    pub fn wait_accepting(&self, timeout: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let vip = self.vip();
        loop {
            let reply = self.lab.client().ns().run(move || -> Result<SmtpReply> {
                let (mut c, _) = RawSmtp::connect(vip)?;
                c.send_message("probe@example.com", &[&format!("probe@{DOMAIN}")], b"Subject: probe\r\n\r\nprobe\r\n")
            })?;
            match reply {
                Ok(r) if r.code == 250 => return Ok(r.queue_id().into_iter().collect()),
                other if Instant::now() > deadline => bail!("the relay does not accept mail after {timeout:?}: {other:?}"),
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Starts LB 1 again (after [`kill_trial`]) and waits until it is master and serving.
    pub fn restart_lb1(&mut self) -> Result<()> {
        self.lb1.launch()?;
        if self.opts.vrrp {
            wait_vrrp(&self.lb1, INSTANCE, mxlb::vrrp::instance::State::Master, Duration::from_secs(10))?;
        }
        self.wait_serving(Duration::from_secs(10))
    }
}

// ---------------------------------------------------------------------------------------------
// Added for tests/tests/relay_backends.rs: bringing a killed dump sink back.

impl DumpSinks {
    /// Starts back-end `i`'s sink again (1-based) after [`DumpSinks::kill`], appending to the
    /// same dump file, so what it received before and after is read together.
    pub fn restart(&mut self, lab: &Lab, i: usize) -> Result<()> {
        let b = lab.backend(i);
        let opts = SinkOpts {
            hostname: Some(b.name()),
            extra: vec!["-D".into(), self.dumps[i - 1].display().to_string()],
            ..Default::default()
        };
        let sink = SmtpSink::start(b.ns(), &opts).with_context(|| format!("smtp-sink on {} (restart)", b.name()))?;
        // The old one is dead; dropping it reaps it.
        self.sinks[i - 1] = sink;
        Ok(())
    }

    /// The dump file of back-end `i` (1-based) as text ("" before anything arrived).
    pub fn dump_text(&self, i: usize) -> String {
        std::fs::read(&self.dumps[i - 1]).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }
}
