//! Back-end health checks, pingora-style: a probe connects to a back-end and, for mail
//! services, checks that the server greets and answers the way a client would need it to.
//!
//! Split per principle 6 (protocol code is pure where it can be):
//! - [`Dialogue`] (with [`dialogue`] and [`parse_reply`]) is the protocol: it is given the bytes
//!   received so far and says what to send next, or that the back-end passed, or why it
//!   failed. It never touches a socket, so every split of every reply is unit-tested.
//! - [`probe`] is the thin I/O edge: one TCP connection moving bytes between a socket and a
//!   [`Dialogue`], under one deadline for the whole probe.
//! - [`RiseFall`] (the up/down verdict over successive probes) and [`Ewma`] (the response time
//!   shown to operators) are pure state machines.
//!
//! Scheduling probes, mapping configuration to [`CheckKind`], and acting on a verdict belong to
//! the caller (`prober`).
//!
//! What the checks send: SMTP `EHLO mxlb-probe` then `QUIT`, POP3 `QUIT`, IMAP `a1 LOGOUT`; no
//! authentication and no mail, so a probe is a harmless, short session in the back-end's logs.
//! The reply to the final `QUIT`/`LOGOUT` is not awaited: the server has already proved it
//! works, and waiting would only add the server's tear-down time to every probe.
use std::{fmt, io, net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{Instant, timeout_at},
};

/// Longest SMTP or POP3 line accepted, CRLF not counted. RFC 5321 (§4.5.3.1.5) and RFC 1939
/// allow 512 bytes including CRLF; two bytes of slack cost nothing and spare a server that
/// counts differently from being marked down.
pub const MAX_LINE: usize = 512;

/// Longest IMAP greeting line accepted. IMAP sets no line limit and servers commonly put their
/// whole `[CAPABILITY ...]` list in the greeting, which can pass 512 bytes; this only stops a
/// server that streams without ever ending the line.
pub const MAX_IMAP_LINE: usize = 8192;

/// Longest whole (multi-line) reply accepted. Real EHLO replies are well under 1 KiB; the bound
/// keeps a misbehaving server from growing the buffer (and the re-parsing cost) without limit.
pub const MAX_REPLY: usize = 16 * 1024;

/// Longest reply text kept in a [`Failure::Rejected`] reason, so one reason stays one log line.
const MAX_REASON: usize = 1024;

/// How much of unexpected data a [`Failure::Garbage`] reason quotes.
const EXCERPT: usize = 64;

/// Which dialogue a probe runs. The names are the ones used in configuration and JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// Connect only: something accepts connections on the port.
    Tcp,
    /// A complete `220` greeting, `EHLO` answered with `250`, then `QUIT`.
    Smtp,
    /// A `+OK` greeting, then `QUIT`.
    Pop3,
    /// A `* OK` greeting, then `LOGOUT`.
    Imap,
}

impl CheckKind {
    /// The check a port gets when none is configured: the mail protocol usually served there
    /// (25/587/2525 SMTP, 110 POP3, 143 IMAP), else a plain connect. Implicit-TLS ports
    /// (465, 993, 995) get a connect: a greeting check would need TLS.
    pub fn default_for_port(port: u16) -> CheckKind {
        match port {
            25 | 587 | 2525 => CheckKind::Smtp,
            110 => CheckKind::Pop3,
            143 => CheckKind::Imap,
            _ => CheckKind::Tcp,
        }
    }

    /// The configuration name (`tcp`, `smtp`, `pop3`, `imap`).
    pub fn as_str(self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Smtp => "smtp",
            CheckKind::Pop3 => "pop3",
            CheckKind::Imap => "imap",
        }
    }
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where in a probe something went wrong; named in [`ProbeError`] reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Opening the TCP connection.
    Connect,
    /// The TLS handshake (implicit-TLS ports: 465, 993, 995).
    Tls,
    /// Waiting for the server's greeting.
    Greeting,
    /// Sending `EHLO` and waiting for its reply (SMTP only).
    Ehlo,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Connect => "connect",
            Stage::Tls => "TLS handshake",
            Stage::Greeting => "greeting",
            Stage::Ehlo => "EHLO",
        })
    }
}

/// The reply a [`Step`] waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A complete SMTP reply (every line of a multi-line one) with this code. A `4xx`/`5xx`
    /// reply is a rejection; any other code is a protocol error.
    Smtp(u16),
    /// A POP3 `+OK` line; `-ERR` is a rejection.
    Pop3Ok,
    /// An IMAP untagged `* OK` (or `* PREAUTH`) greeting; `* BYE` (or `* NO`, `* BAD`) is a
    /// rejection.
    ImapOk,
}

/// One exchange of a dialogue: wait for `expect`, then send `send`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// What the probe is doing while it waits for this step's reply.
    pub stage: Stage,
    pub expect: Expect,
    /// Sent once the reply is accepted. The last step's `send` is the goodbye: by then the
    /// back-end has passed, and the goodbye's reply is not awaited.
    pub send: &'static [u8],
}

const SMTP_STEPS: &[Step] = &[
    Step { stage: Stage::Greeting, expect: Expect::Smtp(220), send: b"EHLO mxlb-probe\r\n" },
    Step { stage: Stage::Ehlo, expect: Expect::Smtp(250), send: b"QUIT\r\n" },
];
const POP3_STEPS: &[Step] = &[Step { stage: Stage::Greeting, expect: Expect::Pop3Ok, send: b"QUIT\r\n" }];
const IMAP_STEPS: &[Step] = &[Step { stage: Stage::Greeting, expect: Expect::ImapOk, send: b"a1 LOGOUT\r\n" }];

/// The exchanges of a check, in order. Empty for [`CheckKind::Tcp`]: connecting is the check.
pub fn dialogue(kind: CheckKind) -> &'static [Step] {
    match kind {
        CheckKind::Tcp => &[],
        CheckKind::Smtp => SMTP_STEPS,
        CheckKind::Pop3 => POP3_STEPS,
        CheckKind::Imap => IMAP_STEPS,
    }
}

/// Why a server failed its dialogue (as opposed to the connection failing).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The server answered in protocol but said no (`421`, `554`, `-ERR`, `* BYE`); the reply
    /// text, control bytes excluded, is kept because it usually says why (overload, shutdown).
    #[error("rejected: {0}")]
    Rejected(String),
    /// What came back is not the protocol expected: another service on the port, binary data
    /// (TLS, a proxy protocol), a line that never ends.
    #[error("garbage: {0}")]
    Garbage(String),
}

/// What [`parse_reply`] makes of the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// No verdict yet: more bytes are needed.
    Incomplete,
    /// The expected reply; it took the first `len` bytes (what follows belongs to later replies).
    Accepted { len: usize },
    /// A verdict against the server. Reached as early as the bytes allow: a first byte that
    /// cannot start the expected reply fails at once, without waiting for the end of the line.
    Failed(Failure),
}

/// Parses the reply at the start of `buf`. Pure and total: any bytes, split anywhere, give
/// [`Reply::Incomplete`] until they are decisive, and a verdict reached on a prefix holds for
/// every longer input.
///
/// Lines end in CRLF; a bare LF is accepted too (liberal in what we accept: a health check
/// should not fail a working server on a nit). A CR anywhere else, or any other control byte
/// except TAB, is garbage; bytes >= 0x80 are allowed (UTF-8 text in greetings).
pub fn parse_reply(expect: Expect, buf: &[u8]) -> Reply {
    let parsed = match expect {
        Expect::Smtp(code) => parse_smtp(code, buf),
        Expect::Pop3Ok => parse_status(buf, MAX_LINE, &[b"+OK"], &[b"-ERR"], "a +OK greeting"),
        Expect::ImapOk => parse_status(
            buf,
            MAX_IMAP_LINE,
            &[b"* OK", b"* PREAUTH"],
            &[b"* BYE", b"* NO", b"* BAD"],
            "a * OK greeting",
        ),
    };
    match parsed {
        Ok(Some(len)) => Reply::Accepted { len },
        Ok(None) => Reply::Incomplete,
        Err(f) => Reply::Failed(f),
    }
}

/// One line at the start of a buffer.
enum Line<'a> {
    /// A whole line: its text (terminator removed) and its length with the terminator.
    Complete { text: &'a [u8], len: usize },
    /// The line so far, no terminator yet (a trailing CR, which may be half of a CRLF, removed).
    Partial(&'a [u8]),
}

fn split_line(buf: &[u8], limit: usize) -> Result<Line<'_>, Failure> {
    let newline = buf.iter().position(|&b| b == b'\n');
    let raw = newline.map_or(buf, |i| &buf[..i]);
    let text = raw.strip_suffix(b"\r").unwrap_or(raw);
    if text.len() > limit {
        return Err(garbage(format!("line longer than {limit} bytes: {}", excerpt(text))));
    }
    if let Some(&b) = text.iter().find(|&&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(garbage(format!("binary data (byte 0x{b:02x}) in {}", excerpt(text))));
    }
    Ok(match newline {
        Some(i) => Line::Complete { text, len: i + 1 },
        None => Line::Partial(text),
    })
}

/// An SMTP reply: `ddd-text` continuation lines, then one `ddd text` (or bare `ddd`) line,
/// all with the same code (RFC 5321 §4.2.1).
fn parse_smtp(expected: u16, buf: &[u8]) -> Result<Option<usize>, Failure> {
    let mut pos = 0;
    let mut code: Option<[u8; 3]> = None;
    let mut lines: Vec<&[u8]> = Vec::new();
    loop {
        if pos > MAX_REPLY {
            return Err(garbage(format!("reply longer than {MAX_REPLY} bytes")));
        }
        let (text, len) = match split_line(&buf[pos..], MAX_LINE)? {
            Line::Partial(p) => {
                smtp_line_prefix(p, code)?;
                return Ok(None);
            }
            Line::Complete { text, len } => (text, len),
        };
        smtp_line_prefix(text, code)?;
        let &[a, b, c, ..] = text else {
            return Err(garbage(format!("not an SMTP reply: {}", excerpt(text))));
        };
        code = Some([a, b, c]);
        lines.push(text);
        pos += len;
        if text.get(3) == Some(&b'-') {
            continue;
        }
        let got = u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0');
        return if got == expected {
            Ok(Some(pos))
        } else if a == b'4' || a == b'5' {
            Err(Failure::Rejected(reason(&lines)))
        } else {
            Err(garbage(format!("expected a {expected} reply, got {}", excerpt(&lines.join(&b" / "[..])))))
        };
    }
}

/// Checks what of `ddd[ -]` is present at the start of a (possibly partial) line; `code` is the
/// code of the reply's earlier lines, which every line must repeat.
fn smtp_line_prefix(line: &[u8], code: Option<[u8; 3]>) -> Result<(), Failure> {
    for (i, &b) in line.iter().take(4).enumerate() {
        if i == 3 {
            if b != b' ' && b != b'-' {
                return Err(garbage(format!("not an SMTP reply: {}", excerpt(line))));
            }
        } else if !b.is_ascii_digit() {
            return Err(garbage(format!("not an SMTP reply: {}", excerpt(line))));
        } else if let Some(code) = code
            && code[i] != b
        {
            return Err(garbage(format!(
                "reply code changed from {} within a multi-line reply: {}",
                String::from_utf8_lossy(&code),
                excerpt(line)
            )));
        }
    }
    Ok(())
}

/// A one-line status reply (POP3, IMAP greeting): the line starts with one of `ok` or `bad`
/// (ASCII case-insensitive), followed by a space or the end of the line.
fn parse_status(buf: &[u8], limit: usize, ok: &[&[u8]], bad: &[&[u8]], what: &str) -> Result<Option<usize>, Failure> {
    let (text, len) = match split_line(buf, limit)? {
        Line::Partial(p) => {
            return if ok.iter().chain(bad).any(|c| could_start(p, c)) {
                Ok(None)
            } else {
                Err(garbage(format!("expected {what}, got {}", excerpt(p))))
            };
        }
        Line::Complete { text, len } => (text, len),
    };
    if ok.iter().any(|c| starts(text, c)) {
        Ok(Some(len))
    } else if bad.iter().any(|c| starts(text, c)) {
        Err(Failure::Rejected(reason(&[text])))
    } else {
        Err(garbage(format!("expected {what}, got {}", excerpt(text))))
    }
}

/// `line` is exactly `word`, or `word` then a space and more.
fn starts(line: &[u8], word: &[u8]) -> bool {
    line.len() >= word.len()
        && line[..word.len()].eq_ignore_ascii_case(word)
        && (line.len() == word.len() || line[word.len()] == b' ')
}

/// Some completion of the partial line `p` satisfies [`starts`] for `word`.
fn could_start(p: &[u8], word: &[u8]) -> bool {
    if p.len() <= word.len() { word[..p.len()].eq_ignore_ascii_case(p) } else { starts(p, word) }
}

fn garbage(detail: String) -> Failure {
    Failure::Garbage(detail)
}

/// A quoted, escaped start of unexpected data, for a reason in a log line.
fn excerpt(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(EXCERPT)];
    let more = if bytes.len() > EXCERPT { "..." } else { "" };
    format!("\"{}\"{more}", cut.escape_ascii())
}

/// Reply lines as one reason: joined with ` / `, bounded. Control bytes cannot occur (they
/// are garbage), so the text cannot break a log line.
fn reason(lines: &[&[u8]]) -> String {
    let mut s = String::from_utf8_lossy(&lines.join(&b" / "[..])).into_owned();
    if s.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

/// What the I/O side should do next; see [`Dialogue::advance`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Read more bytes and give them to [`Dialogue::receive`].
    Read,
    /// Write these bytes, then ask again.
    Send(&'static [u8]),
    /// The back-end passed. Send `goodbye` (may be empty) if possible, without awaiting a
    /// reply or failing on an error, and close.
    Pass { goodbye: &'static [u8] },
    /// The back-end failed.
    Fail(Failure),
}

/// A check's dialogue as a pure state machine: feed it received bytes with
/// [`receive`](Dialogue::receive), ask [`advance`](Dialogue::advance) what to do.
///
/// Bytes that arrive early (a reply pipelined behind the greeting) are kept for the next step.
#[derive(Debug, Clone)]
pub struct Dialogue {
    steps: &'static [Step],
    /// Index of the step whose reply is awaited; `steps.len()` once passed.
    step: usize,
    /// Received bytes not yet consumed by an accepted reply.
    buf: Vec<u8>,
    failed: Option<Failure>,
}

impl Dialogue {
    pub fn new(kind: CheckKind) -> Dialogue {
        Dialogue { steps: dialogue(kind), step: 0, buf: Vec::new(), failed: None }
    }

    /// Where the dialogue is, for naming a timeout or closed connection: the awaited step's
    /// stage ([`Stage::Connect`] for a dialogue with no steps, the last step's once passed).
    pub fn stage(&self) -> Stage {
        self.steps.get(self.step).or(self.steps.last()).map_or(Stage::Connect, |s| s.stage)
    }

    /// Adds bytes read from the server. Ignored once the dialogue has a verdict.
    pub fn receive(&mut self, data: &[u8]) {
        if self.failed.is_none() && self.step < self.steps.len() {
            self.buf.extend_from_slice(data);
        }
    }

    /// What to do now. After [`Next::Send`] the bytes are taken as sent; a verdict
    /// ([`Next::Pass`], [`Next::Fail`]) is final and repeated by later calls.
    pub fn advance(&mut self) -> Next {
        if let Some(f) = &self.failed {
            return Next::Fail(f.clone());
        }
        let Some(step) = self.steps.get(self.step) else {
            return Next::Pass { goodbye: self.steps.last().map_or(&b""[..], |s| s.send) };
        };
        match parse_reply(step.expect, &self.buf) {
            Reply::Incomplete => Next::Read,
            Reply::Accepted { len } => {
                self.buf.drain(..len);
                self.step += 1;
                if self.step == self.steps.len() {
                    self.buf = Vec::new();
                    Next::Pass { goodbye: step.send }
                } else {
                    Next::Send(step.send)
                }
            }
            Reply::Failed(f) => {
                self.failed = Some(f.clone());
                self.buf = Vec::new();
                Next::Fail(f)
            }
        }
    }
}

/// Why a probe failed. The `Display` text is meant as the "down" reason in logs and listings
/// (the caller adds the back-end and address).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The TCP connection could not be opened (refused, unreachable).
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    /// The probe's deadline passed; `stage` is what it was waiting for.
    #[error("timed out at {stage}")]
    Timeout { stage: Stage },
    /// The server closed the connection before the dialogue was done.
    #[error("connection closed by server at {stage}")]
    Closed { stage: Stage },
    /// Reading or writing failed on an open connection (typically a reset).
    #[error("{source} at {stage}")]
    Io {
        stage: Stage,
        #[source]
        source: io::Error,
    },
    /// The server answered in protocol but refused (`421 ...`, `-ERR ...`, `* BYE ...`).
    #[error("rejected: {reply}")]
    Rejected { reply: String },
    /// The server answered with something that is not the expected protocol.
    #[error("garbage: {detail}")]
    Garbage { detail: String },
}

impl From<Failure> for ProbeError {
    fn from(f: Failure) -> ProbeError {
        match f {
            Failure::Rejected(reply) => ProbeError::Rejected { reply },
            Failure::Garbage(detail) => ProbeError::Garbage { detail },
        }
    }
}

/// TLS for probes of implicit-TLS ports.
///
/// With a CA the server's certificate must chain to it and name `server_name`; without one the
/// certificate is not checked: the probe then tests that TLS and the mail protocol work on the
/// back-end, not its identity (it sends no secret), as HAProxy's `check-ssl verify none` does.
#[derive(Clone)]
pub struct ProbeTls {
    connector: tokio_rustls::TlsConnector,
    server_name: Option<rustls::pki_types::ServerName<'static>>,
}

impl fmt::Debug for ProbeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProbeTls").field("server_name", &self.server_name).finish()
    }
}

/// Errors setting up probe TLS (reported at start with the file).
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{path}: {message}")]
    Ca { path: String, message: String },
    #[error("`{0}` is not a valid TLS server name")]
    Name(String),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

impl ProbeTls {
    /// `ca`: PEM file of the CA(s) that sign the back-ends' certificates (None: not checked).
    /// `server_name`: the name certificates must carry (default: the back-end's address).
    pub fn new(ca: Option<&std::path::Path>, server_name: Option<&str>) -> Result<ProbeTls, TlsSetupError> {
        use rustls::pki_types::ServerName;
        let provider = crate::tls::provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let config = match ca {
            Some(path) => {
                let roots = crate::tls::load_roots(path)
                    .map_err(|e| TlsSetupError::Ca { path: e.path, message: e.message })?;
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(std::sync::Arc::new(AnyCertificate(provider)))
                .with_no_client_auth(),
        };
        let server_name = server_name
            .map(|n| ServerName::try_from(n.to_string()).map_err(|_| TlsSetupError::Name(n.to_string())))
            .transpose()?;
        Ok(ProbeTls { connector: tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)), server_name })
    }
}

/// Accepts any certificate (see [`ProbeTls`]); signatures are still verified, so the handshake
/// is a real one.
#[derive(Debug)]
struct AnyCertificate(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Probes `addr` with the `kind` dialogue (over TLS when `tls` is given), all of it bounded by
/// one deadline `timeout` away; returns how long the dialogue took. `preamble` is written as
/// soon as the connection is up, before anything is read: a PROXY protocol header for
/// listeners that require one (Dovecot's `haproxy = yes` ports behind the mailbox proxy).
pub async fn probe(
    kind: CheckKind,
    addr: SocketAddr,
    timeout: Duration,
    tls: Option<&ProbeTls>,
    preamble: &[u8],
) -> Result<Duration, ProbeError> {
    let start = Instant::now();
    // A timeout too large to add (Duration::MAX) means "no practical bound", not a panic.
    let deadline = start.checked_add(timeout).unwrap_or_else(|| start + Duration::from_secs(365 * 86400));
    let mut stream = match timeout_at(deadline, TcpStream::connect(addr)).await {
        Err(_) => return Err(ProbeError::Timeout { stage: Stage::Connect }),
        Ok(Err(e)) => return Err(ProbeError::Connect(e)),
        Ok(Ok(s)) => s,
    };
    // Commands are single small writes; do not let Nagle hold one back behind the last.
    let _ = stream.set_nodelay(true);
    if !preamble.is_empty() {
        match timeout_at(deadline, stream.write_all(preamble)).await {
            Err(_) => return Err(ProbeError::Timeout { stage: Stage::Connect }),
            Ok(Err(source)) => return Err(ProbeError::Io { stage: Stage::Connect, source }),
            Ok(Ok(())) => {}
        }
    }
    match tls {
        None => converse(stream, kind, start, deadline).await,
        Some(t) => {
            let name = t.server_name.clone().unwrap_or_else(|| rustls::pki_types::ServerName::IpAddress(addr.ip().into()));
            let tls_stream = match timeout_at(deadline, t.connector.connect(name, stream)).await {
                Err(_) => return Err(ProbeError::Timeout { stage: Stage::Tls }),
                Ok(Err(source)) => return Err(ProbeError::Io { stage: Stage::Tls, source }),
                Ok(Ok(s)) => s,
            };
            converse(tls_stream, kind, start, deadline).await
        }
    }
}

/// The dialogue over an open connection (plain or TLS).
async fn converse<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    kind: CheckKind,
    start: Instant,
    deadline: Instant,
) -> Result<Duration, ProbeError> {
    let mut dialogue = Dialogue::new(kind);
    let mut buf = [0u8; 2048];
    loop {
        let stage = dialogue.stage();
        match dialogue.advance() {
            Next::Read => match timeout_at(deadline, stream.read(&mut buf)).await {
                Err(_) => return Err(ProbeError::Timeout { stage }),
                Ok(Err(source)) => return Err(ProbeError::Io { stage, source }),
                Ok(Ok(0)) => return Err(ProbeError::Closed { stage }),
                Ok(Ok(n)) => dialogue.receive(&buf[..n]),
            },
            Next::Send(bytes) => {
                // Sending belongs to the stage that awaits the reply to it.
                let stage = dialogue.stage();
                match timeout_at(deadline, stream.write_all(bytes)).await {
                    Err(_) => return Err(ProbeError::Timeout { stage }),
                    Ok(Err(source)) => return Err(ProbeError::Io { stage, source }),
                    Ok(Ok(())) => {}
                }
            }
            Next::Pass { goodbye } => {
                let elapsed = start.elapsed();
                if !goodbye.is_empty() {
                    // Courtesy only: the verdict is in, so errors and the deadline just end it.
                    let _ = timeout_at(deadline, async {
                        stream.write_all(goodbye).await?;
                        stream.shutdown().await
                    })
                    .await;
                }
                return Ok(elapsed);
            }
            Next::Fail(f) => return Err(f.into()),
        }
    }
}

/// Up or down, as decided by [`RiseFall`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Up,
    Down,
}

/// A change of [`Status`] reported by [`RiseFall::observe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transition {
    /// `fall` consecutive failures while up.
    UpToDown,
    /// `rise` consecutive successes while down.
    DownToUp,
}

/// The verdict over successive probes (HAProxy's and pingora's rise/fall): down after `fall`
/// consecutive failures, up again after `rise` consecutive successes. One lost probe does not
/// move traffic, and a back-end that just came back must prove itself before it gets any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RiseFall {
    rise: u32,
    fall: u32,
    status: Status,
    /// Consecutive results against the current status (failures while up, successes while
    /// down); reset by a result agreeing with it.
    streak: u32,
}

impl RiseFall {
    /// Starts up: a back-end is presumed healthy until probes say otherwise, so starting the
    /// agent does not take traffic away for `rise` intervals. A `rise` or `fall` of 0 is taken
    /// as 1.
    pub fn new(rise: u32, fall: u32) -> RiseFall {
        RiseFall::with_initial(rise, fall, Status::Up)
    }

    /// Starts in `initial` (e.g. down for a back-end that must pass `rise` probes first).
    pub fn with_initial(rise: u32, fall: u32, initial: Status) -> RiseFall {
        RiseFall { rise: rise.max(1), fall: fall.max(1), status: initial, streak: 0 }
    }

    /// Records one probe result; returns the transition it causes, if any.
    pub fn observe(&mut self, ok: bool) -> Option<Transition> {
        let (against, needed, next, transition) = match self.status {
            Status::Up => (!ok, self.fall, Status::Down, Transition::UpToDown),
            Status::Down => (ok, self.rise, Status::Up, Transition::DownToUp),
        };
        if !against {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        if self.streak < needed {
            return None;
        }
        self.status = next;
        self.streak = 0;
        Some(transition)
    }

    pub fn status(&self) -> Status {
        self.status
    }

    pub fn is_up(&self) -> bool {
        self.status == Status::Up
    }

    pub fn is_down(&self) -> bool {
        self.status == Status::Down
    }

    pub fn rise(&self) -> u32 {
        self.rise
    }

    pub fn fall(&self) -> u32 {
        self.fall
    }
}

/// Exponentially weighted moving average of response times: each sample moves the average
/// by `alpha` of the difference, so it follows trends without jumping on one slow probe.
#[derive(Debug, Clone, PartialEq)]
pub struct Ewma {
    alpha: f64,
    /// Seconds; `None` until the first sample.
    value: Option<f64>,
}

impl Ewma {
    /// The weight used by the prober: a sample counts for 30%, so the average settles within
    /// about ten probes.
    pub const DEFAULT_ALPHA: f64 = 0.3;

    /// `alpha` is the weight of a new sample, in (0, 1]; values outside are clamped into it
    /// (a NaN is taken as 1: the average is the last sample).
    pub fn new(alpha: f64) -> Ewma {
        let alpha = if alpha.is_nan() { 1.0 } else { alpha.clamp(f64::MIN_POSITIVE, 1.0) };
        Ewma { alpha, value: None }
    }

    /// Adds a sample; the first one sets the average.
    pub fn update(&mut self, sample: Duration) {
        let x = sample.as_secs_f64();
        self.value = Some(match self.value {
            None => x,
            Some(v) => v + self.alpha * (x - v),
        });
    }

    /// The average, or `None` before any sample.
    pub fn get(&self) -> Option<Duration> {
        self.value.and_then(|v| Duration::try_from_secs_f64(v).ok())
    }

    pub fn alpha(&self) -> f64 {
        self.alpha
    }
}

impl Default for Ewma {
    fn default() -> Ewma {
        Ewma::new(Ewma::DEFAULT_ALPHA)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- pure dialogue ----

    /// How a transcript ends when fed to a [`Dialogue`].
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Outcome {
        /// Passed; what was sent, the goodbye last.
        Pass(Vec<&'static [u8]>),
        Fail(Failure),
        /// Ran out of input before a verdict.
        Incomplete,
    }

    impl Outcome {
        /// Same verdict, ignoring garbage details (which quote the data seen when it was
        /// decided, so may be shorter on an early decision).
        fn same_verdict(&self, other: &Outcome) -> bool {
            match (self, other) {
                (Outcome::Fail(Failure::Garbage(_)), Outcome::Fail(Failure::Garbage(_))) => true,
                _ => self == other,
            }
        }
    }

    /// Feeds the server's bytes as `chunks`, one per read.
    fn drive(kind: CheckKind, chunks: &[&[u8]]) -> Outcome {
        let mut d = Dialogue::new(kind);
        let mut sent = Vec::new();
        let mut chunks = chunks.iter();
        // Bounded: each round either consumes a chunk or advances a step.
        for _ in 0..100_000 {
            match d.advance() {
                Next::Read => match chunks.next() {
                    Some(c) => d.receive(c),
                    None => return Outcome::Incomplete,
                },
                Next::Send(b) => sent.push(b),
                Next::Pass { goodbye } => {
                    sent.push(goodbye);
                    return Outcome::Pass(sent);
                }
                Next::Fail(f) => return Outcome::Fail(f),
            }
        }
        panic!("dialogue did not converge");
    }

    fn whole(kind: CheckKind, t: &[u8]) -> Outcome {
        drive(kind, &[t])
    }

    /// Every way of cutting `t` gives the verdict of `t` whole: in two at every boundary, and
    /// one byte per read. Every strict prefix is undecided or already has that verdict.
    fn check_splits(kind: CheckKind, t: &[u8]) -> Outcome {
        let expected = whole(kind, t);
        for i in 0..=t.len() {
            let got = drive(kind, &[&t[..i], &t[i..]]);
            assert!(
                got.same_verdict(&expected),
                "{kind} {:?} split at {i}: {got:?} != {expected:?}",
                t.escape_ascii().to_string()
            );
            let prefix = whole(kind, &t[..i]);
            assert!(
                prefix == Outcome::Incomplete || prefix.same_verdict(&expected),
                "{kind} prefix {:?}: {prefix:?} but whole gives {expected:?}",
                t[..i].escape_ascii().to_string()
            );
        }
        let bytes: Vec<&[u8]> = t.chunks(1).collect();
        let got = drive(kind, &bytes);
        assert!(got.same_verdict(&expected), "{kind} byte by byte: {got:?} != {expected:?}");
        expected
    }

    const SMTP_OK: &[u8] = b"220-mx1.example.net ESMTP\r\n220-no UCE\r\n220 ready\r\n\
        250-mx1.example.net\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 8BITMIME\r\n";

    fn smtp_pass() -> Outcome {
        Outcome::Pass(vec![b"EHLO mxlb-probe\r\n", b"QUIT\r\n"])
    }

    fn is_garbage(o: &Outcome) -> bool {
        matches!(o, Outcome::Fail(Failure::Garbage(_)))
    }

    #[test]
    fn default_check_by_port() {
        for p in [25, 587, 2525] {
            assert_eq!(CheckKind::default_for_port(p), CheckKind::Smtp);
        }
        assert_eq!(CheckKind::default_for_port(110), CheckKind::Pop3);
        assert_eq!(CheckKind::default_for_port(143), CheckKind::Imap);
        for p in [0, 22, 80, 465, 993, 995, 4190, 65535] {
            assert_eq!(CheckKind::default_for_port(p), CheckKind::Tcp);
        }
    }

    #[test]
    fn check_kind_serde_names() {
        for (k, name) in
            [(CheckKind::Tcp, "tcp"), (CheckKind::Smtp, "smtp"), (CheckKind::Pop3, "pop3"), (CheckKind::Imap, "imap")]
        {
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<CheckKind>(&format!("\"{name}\"")).unwrap(), k);
            assert_eq!(k.to_string(), name);
        }
        assert!(serde_json::from_str::<CheckKind>("\"SMTP\"").is_err());
    }

    #[test]
    fn dialogues_send_what_the_brief_says() {
        assert!(dialogue(CheckKind::Tcp).is_empty());
        let sends = |k| dialogue(k).iter().map(|s| s.send).collect::<Vec<_>>();
        assert_eq!(sends(CheckKind::Smtp), vec![&b"EHLO mxlb-probe\r\n"[..], b"QUIT\r\n"]);
        assert_eq!(sends(CheckKind::Pop3), vec![&b"QUIT\r\n"[..]]);
        assert_eq!(sends(CheckKind::Imap), vec![&b"a1 LOGOUT\r\n"[..]]);
    }

    #[test]
    fn tcp_passes_without_reading() {
        assert_eq!(drive(CheckKind::Tcp, &[]), Outcome::Pass(vec![b""]));
        let mut d = Dialogue::new(CheckKind::Tcp);
        assert_eq!(d.stage(), Stage::Connect);
        assert_eq!(d.advance(), Next::Pass { goodbye: b"" });
    }

    #[test]
    fn smtp_multiline_greeting_and_ehlo_at_every_split() {
        assert_eq!(check_splits(CheckKind::Smtp, SMTP_OK), smtp_pass());
    }

    #[test]
    fn smtp_single_lines_bare_lf_and_codes_without_text() {
        assert_eq!(check_splits(CheckKind::Smtp, b"220 hi\r\n250 ok\r\n"), smtp_pass());
        assert_eq!(check_splits(CheckKind::Smtp, b"220 hi\n250-a\n250 b\n"), smtp_pass());
        assert_eq!(check_splits(CheckKind::Smtp, b"220\r\n250\r\n"), smtp_pass());
        assert_eq!(check_splits(CheckKind::Smtp, b"220-\r\n220 \r\n250 ok\r\n"), smtp_pass());
        // UTF-8 and tabs in the text are fine.
        assert_eq!(check_splits(CheckKind::Smtp, "220 m\u{e9}l\tready\r\n250 ok\r\n".as_bytes()), smtp_pass());
    }

    #[test]
    fn smtp_waits_for_the_whole_reply() {
        let mut d = Dialogue::new(CheckKind::Smtp);
        assert_eq!(d.stage(), Stage::Greeting);
        d.receive(b"220-first\r\n");
        assert_eq!(d.advance(), Next::Read, "a continuation line is not the whole greeting");
        d.receive(b"220 last");
        assert_eq!(d.advance(), Next::Read, "no CRLF yet");
        d.receive(b"\r\n");
        assert_eq!(d.advance(), Next::Send(b"EHLO mxlb-probe\r\n"));
        assert_eq!(d.stage(), Stage::Ehlo);
        assert_eq!(d.advance(), Next::Read);
        d.receive(b"250-a\r\n");
        assert_eq!(d.advance(), Next::Read);
        d.receive(b"250 b\r\n");
        assert_eq!(d.advance(), Next::Pass { goodbye: b"QUIT\r\n" });
        assert_eq!(d.advance(), Next::Pass { goodbye: b"QUIT\r\n" }, "a verdict is final");
        for t in [&b""[..], b"2", b"220", b"220-", b"220-a\r\n", b"220 a\r", b"220 a\r\n250-b\r\n"] {
            assert_eq!(whole(CheckKind::Smtp, t), Outcome::Incomplete, "{:?}", t.escape_ascii().to_string());
        }
    }

    #[test]
    fn smtp_rejections_keep_the_reply_text() {
        let rejected = |s: &str| Outcome::Fail(Failure::Rejected(s.into()));
        assert_eq!(check_splits(CheckKind::Smtp, b"421 4.3.2 try later\r\n"), rejected("421 4.3.2 try later"));
        assert_eq!(check_splits(CheckKind::Smtp, b"554 no\r\n"), rejected("554 no"));
        assert_eq!(
            check_splits(CheckKind::Smtp, b"554-mx1 says\r\n554 go away\r\n"),
            rejected("554-mx1 says / 554 go away")
        );
        // The EHLO reply can be a rejection too (after EHLO was sent).
        assert_eq!(check_splits(CheckKind::Smtp, b"220 hi\r\n550 5.7.1 no\r\n"), rejected("550 5.7.1 no"));
        assert_eq!(Failure::Rejected("421 busy".into()).to_string(), "rejected: 421 busy");
    }

    #[test]
    fn smtp_garbage() {
        for t in [
            &b"HTTP/1.1 400 Bad Request\r\n"[..],
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"+OK pop3 ready\r\n",
            b"* OK imap ready\r\n",
            b"\x16\x03\x01\x00\xa5",
            b"22", // too short for a code once the line ends
            b"22\r\n",
            b"220x\r\n", // no separator after the code
            b"2a0 hi\r\n",
            b"250 hello\r\n", // in protocol, but not a greeting
            b"354 go on\r\n",
            b"220-a\r\n250 b\r\n", // code changes within a reply
            b"220 a\rb\r\n",       // bare CR
            b"220 nul \x00 here\r\n",
            b"220 esc \x1b[31m\r\n",
            b"220 hi\r\n220 hi again\r\n", // a second greeting instead of a 250
        ] {
            let got = check_splits(CheckKind::Smtp, t);
            // b"22" alone is undecided; everything else is garbage.
            if t == b"22" {
                assert_eq!(got, Outcome::Incomplete);
            } else {
                assert!(is_garbage(&got), "{:?}: {got:?}", t.escape_ascii().to_string());
            }
        }
    }

    #[test]
    fn garbage_is_decided_early_and_explained() {
        // Binary without a newline must not wait for one (it would only time out).
        let Outcome::Fail(Failure::Garbage(d)) = whole(CheckKind::Smtp, b"\x16\x03") else { panic!() };
        assert!(d.contains("binary data (byte 0x16)"), "{d}");
        let Outcome::Fail(Failure::Garbage(d)) = whole(CheckKind::Smtp, b"HTTP") else { panic!() };
        assert!(d.contains("not an SMTP reply: \"HTTP\""), "{d}");
        assert_eq!(Failure::Garbage("x".into()).to_string(), "garbage: x");
        let Outcome::Fail(Failure::Garbage(d)) = whole(CheckKind::Smtp, b"250 hi\r\n") else { panic!() };
        assert_eq!(d, "expected a 220 reply, got \"250 hi\"");
    }

    #[test]
    fn line_length_limit() {
        let line = |n: usize| {
            let mut v = b"220 ".to_vec();
            v.resize(n, b'a');
            v
        };
        // Exactly the limit, with or without its CRLF yet: fine.
        assert_eq!(whole(CheckKind::Smtp, &line(MAX_LINE)), Outcome::Incomplete);
        let mut ok = line(MAX_LINE);
        ok.extend_from_slice(b"\r\n250 ok\r\n");
        assert_eq!(whole(CheckKind::Smtp, &ok), smtp_pass());
        // One more byte without a line end is garbage at once, and so is the complete line.
        let Outcome::Fail(Failure::Garbage(d)) = whole(CheckKind::Smtp, &line(MAX_LINE + 1)) else { panic!() };
        assert!(d.starts_with("line longer than 512 bytes: \"220 aaa"), "{d}");
        assert!(d.ends_with("\"..."), "excerpt is bounded: {d}");
        assert!(d.len() < 200);
        let mut long = line(MAX_LINE + 1);
        long.extend_from_slice(b"\r\n");
        assert!(is_garbage(&whole(CheckKind::Smtp, &long)));
        // Same for POP3; IMAP allows long greetings.
        let mut pop = b"+OK ".to_vec();
        pop.resize(MAX_LINE + 1, b'a');
        assert!(is_garbage(&whole(CheckKind::Pop3, &pop)));
        let mut imap = b"* OK [CAPABILITY".to_vec();
        imap.resize(2000, b'X');
        assert_eq!(whole(CheckKind::Imap, &imap), Outcome::Incomplete);
        imap.extend_from_slice(b"]\r\n");
        assert!(matches!(whole(CheckKind::Imap, &imap), Outcome::Pass(_)));
        let mut imap = b"* OK [CAPABILITY".to_vec();
        imap.resize(MAX_IMAP_LINE, b'X');
        assert_eq!(whole(CheckKind::Imap, &imap), Outcome::Incomplete);
        imap.push(b'X');
        assert!(is_garbage(&whole(CheckKind::Imap, &imap)));
    }

    #[test]
    fn endless_multiline_reply_is_bounded() {
        let mut t = Vec::new();
        while t.len() <= MAX_REPLY {
            t.extend_from_slice(b"220-still going\r\n");
        }
        let Outcome::Fail(Failure::Garbage(d)) = whole(CheckKind::Smtp, &t) else { panic!() };
        assert!(d.contains("reply longer than"), "{d}");
    }

    #[test]
    fn pop3() {
        let pass = Outcome::Pass(vec![b"QUIT\r\n"]);
        assert_eq!(check_splits(CheckKind::Pop3, b"+OK Dovecot ready.\r\n"), pass);
        assert_eq!(check_splits(CheckKind::Pop3, b"+OK\r\n"), pass);
        assert_eq!(check_splits(CheckKind::Pop3, b"+ok lower case\n"), pass);
        assert_eq!(
            check_splits(CheckKind::Pop3, b"-ERR [SYS/TEMP] maintenance\r\n"),
            Outcome::Fail(Failure::Rejected("-ERR [SYS/TEMP] maintenance".into()))
        );
        for t in [&b"+OKAY\r\n"[..], b"OK\r\n", b"220 smtp\r\n", b"* OK imap\r\n", b"+", b"\x00"] {
            let got = check_splits(CheckKind::Pop3, t);
            if t == b"+" {
                assert_eq!(got, Outcome::Incomplete);
            } else {
                assert!(is_garbage(&got), "{:?}: {got:?}", t.escape_ascii().to_string());
            }
        }
    }

    #[test]
    fn imap() {
        let pass = Outcome::Pass(vec![b"a1 LOGOUT\r\n"]);
        assert_eq!(
            check_splits(CheckKind::Imap, b"* OK [CAPABILITY IMAP4rev1 SASL-IR STARTTLS] Dovecot ready.\r\n"),
            pass
        );
        assert_eq!(check_splits(CheckKind::Imap, b"* ok ready\r\n"), pass);
        assert_eq!(check_splits(CheckKind::Imap, b"* PREAUTH logged in\r\n"), pass);
        assert_eq!(
            check_splits(CheckKind::Imap, b"* BYE too many connections\r\n"),
            Outcome::Fail(Failure::Rejected("* BYE too many connections".into()))
        );
        assert!(matches!(check_splits(CheckKind::Imap, b"* NO go away\r\n"), Outcome::Fail(Failure::Rejected(_))));
        for t in
            [&b"a1 OK\r\n"[..], b"*OK\r\n", b"* OKAY\r\n", b"* CAPABILITY IMAP4rev1\r\n", b"+OK\r\n", b"220 hi\r\n"]
        {
            let got = check_splits(CheckKind::Imap, t);
            assert!(is_garbage(&got), "{:?}: {got:?}", t.escape_ascii().to_string());
        }
    }

    #[test]
    fn verdict_is_final_and_later_bytes_ignored() {
        let mut d = Dialogue::new(CheckKind::Pop3);
        d.receive(b"-ERR no\r\n");
        let f = Next::Fail(Failure::Rejected("-ERR no".into()));
        assert_eq!(d.advance(), f);
        d.receive(b"+OK changed my mind\r\n");
        assert_eq!(d.advance(), f);
    }

    #[test]
    fn parse_reply_reports_length_for_pipelined_data() {
        assert_eq!(parse_reply(Expect::Smtp(220), b"220-a\r\n220 b\r\n250"), Reply::Accepted { len: 14 });
        assert_eq!(parse_reply(Expect::Pop3Ok, b"+OK\r\nextra"), Reply::Accepted { len: 5 });
        assert_eq!(parse_reply(Expect::ImapOk, b""), Reply::Incomplete);
    }

    /// Every prefix of many inputs, fed byte by byte, never panics and agrees with the whole.
    #[test]
    fn no_panics_on_odd_input() {
        let mut inputs: Vec<Vec<u8>> = vec![b"\r\n".to_vec(), b"\n\n\n".to_vec(), b"\r\r\r".to_vec(), vec![0xff; 40]];
        // A cheap deterministic byte soup biased towards protocol characters.
        let alphabet = b"0123459 -\r\n+OKERR*BYEokx\t\xc3\xa9\x00";
        let mut seed: u32 = 0x1234_5678;
        for _ in 0..300 {
            let mut v = Vec::new();
            for _ in 0..(seed % 24) {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                v.push(alphabet[(seed >> 16) as usize % alphabet.len()]);
            }
            inputs.push(v);
        }
        for t in &inputs {
            for kind in [CheckKind::Smtp, CheckKind::Pop3, CheckKind::Imap] {
                check_splits(kind, t);
            }
        }
    }

    // ---- rise/fall ----

    #[test]
    fn rise_fall_transitions() {
        let mut rf = RiseFall::new(2, 3);
        assert!(rf.is_up());
        assert_eq!(rf.observe(false), None);
        assert_eq!(rf.observe(false), None);
        assert_eq!(rf.observe(true), None, "a success resets the failure streak");
        assert_eq!(rf.observe(false), None);
        assert_eq!(rf.observe(false), None);
        assert_eq!(rf.observe(false), Some(Transition::UpToDown));
        assert!(rf.is_down());
        assert_eq!(rf.observe(false), None, "already down");
        assert_eq!(rf.observe(true), None);
        assert_eq!(rf.observe(false), None, "a failure resets the success streak");
        assert_eq!(rf.observe(true), None);
        assert_eq!(rf.observe(true), Some(Transition::DownToUp));
        assert_eq!(rf.status(), Status::Up);
        assert_eq!(rf.observe(true), None, "already up");
        // The streak starts afresh after a transition.
        assert_eq!(rf.observe(false), None);
        assert_eq!(rf.observe(false), None);
        assert_eq!(rf.observe(false), Some(Transition::UpToDown));
    }

    #[test]
    fn rise_fall_initial_state_and_zero_thresholds() {
        let mut rf = RiseFall::with_initial(2, 3, Status::Down);
        assert!(rf.is_down());
        assert_eq!(rf.observe(true), None);
        assert_eq!(rf.observe(true), Some(Transition::DownToUp));

        let mut rf = RiseFall::new(0, 0);
        assert_eq!((rf.rise(), rf.fall()), (1, 1));
        assert_eq!(rf.observe(false), Some(Transition::UpToDown));
        assert_eq!(rf.observe(true), Some(Transition::DownToUp));

        let mut rf = RiseFall::new(1, 1);
        assert_eq!(rf.observe(true), None);
        assert_eq!(rf.observe(false), Some(Transition::UpToDown));
        assert_eq!(rf.observe(false), None);
    }

    // ---- EWMA ----

    #[test]
    fn ewma() {
        let ms = Duration::from_millis;
        let mut e = Ewma::new(0.3);
        assert_eq!(e.get(), None);
        e.update(ms(100));
        assert_eq!(e.get(), Some(ms(100)), "the first sample sets the average");
        e.update(ms(200));
        let v = e.get().unwrap().as_secs_f64();
        assert!((v - 0.130).abs() < 1e-9, "{v}");
        for _ in 0..100 {
            e.update(ms(50));
        }
        assert!((e.get().unwrap().as_secs_f64() - 0.050).abs() < 1e-6);

        let mut last = Ewma::new(1.0);
        last.update(ms(5));
        last.update(ms(7));
        assert_eq!(last.get(), Some(ms(7)));
        assert_eq!(Ewma::new(f64::NAN).alpha(), 1.0);
        assert_eq!(Ewma::new(7.0).alpha(), 1.0);
        assert!(Ewma::new(-1.0).alpha() > 0.0);
        assert_eq!(Ewma::default().alpha(), Ewma::DEFAULT_ALPHA);
        let mut big = Ewma::default();
        big.update(Duration::MAX);
        let _ = big.get(); // must not panic
    }

    // ---- probe over real sockets (127.0.0.1 only) ----

    use tokio::{
        io::{AsyncBufReadExt, BufReader},
        net::TcpListener,
        task::JoinHandle,
    };

    /// Bound on any test-side wait, so a broken probe fails a test instead of hanging it.
    const GUARD: Duration = Duration::from_secs(10);

    /// What an in-test server does with its one connection.
    #[derive(Clone, Copy)]
    enum Script {
        /// Write these replies in order, each after reading one command line (the first
        /// before reading anything); then read until the client closes.
        Dialogue(&'static [&'static [u8]]),
        /// Write these bytes one at a time, flushed separately, then read until closed.
        Dribble(&'static [u8]),
        /// Accept and keep the connection open, saying nothing.
        Silent,
        /// Accept and close at once.
        Close,
        /// Write these bytes, then close.
        SayAndClose(&'static [u8]),
    }

    /// Serves one connection on 127.0.0.1:0; the task returns every line the client sent.
    async fn serve(script: Script) -> (SocketAddr, JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut received = Vec::new();
            let Ok(Ok((sock, _))) = tokio::time::timeout(GUARD, listener.accept()).await else {
                return received;
            };
            let (rd, mut wr) = sock.into_split();
            let mut rd = BufReader::new(rd);
            let replies: &[&[u8]] = match script {
                Script::Close => return received,
                Script::SayAndClose(bytes) => {
                    let _ = wr.write_all(bytes).await;
                    return received;
                }
                Script::Silent => {
                    tokio::time::sleep(GUARD).await;
                    return received;
                }
                Script::Dribble(bytes) => {
                    for b in bytes.chunks(1) {
                        if wr.write_all(b).await.is_err() {
                            return received;
                        }
                        let _ = wr.flush().await;
                        tokio::task::yield_now().await;
                    }
                    &[]
                }
                Script::Dialogue(replies) => replies,
            };
            for (i, reply) in replies.iter().enumerate() {
                if i > 0 {
                    let mut line = String::new();
                    match tokio::time::timeout(GUARD, rd.read_line(&mut line)).await {
                        Ok(Ok(n)) if n > 0 => received.push(line),
                        _ => return received,
                    }
                }
                if wr.write_all(reply).await.is_err() {
                    return received;
                }
            }
            loop {
                let mut line = String::new();
                match tokio::time::timeout(GUARD, rd.read_line(&mut line)).await {
                    Ok(Ok(n)) if n > 0 => received.push(line),
                    _ => return received,
                }
            }
        });
        (addr, task)
    }

    /// Runs a probe under [`GUARD`]: the test fails, rather than hangs, if it never returns.
    async fn run(kind: CheckKind, addr: SocketAddr, timeout: Duration) -> Result<Duration, ProbeError> {
        tokio::time::timeout(GUARD, probe(kind, addr, timeout, None, &[])).await.expect("probe returned within its guard")
    }

    async fn client_sent(task: JoinHandle<Vec<String>>) -> Vec<String> {
        tokio::time::timeout(GUARD, task).await.expect("server finished").expect("server task")
    }

    const T: Duration = Duration::from_secs(2);

    /// A POP3 server behind a PROXY-protocol listener (Dovecot `haproxy = yes`): it greets
    /// only after the 16-byte header it expects, and closes on anything else.
    async fn serve_after_header(header: Vec<u8>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let header = header.clone();
                tokio::spawn(async move {
                    let mut got = vec![0u8; header.len()];
                    match tokio::time::timeout(T, s.read_exact(&mut got)).await {
                        Ok(Ok(_)) if got == header => {}
                        _ => return,
                    }
                    let _ = s.write_all(b"+OK Dovecot ready.\r\n").await;
                    let mut rest = [0u8; 64];
                    let _ = tokio::time::timeout(T, s.read(&mut rest)).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_preamble_opens_a_proxy_protocol_listener() {
        let header = crate::proxy::backend::proxy_v2_local_header();
        let addr = serve_after_header(header.clone()).await;
        let with = tokio::time::timeout(GUARD, probe(CheckKind::Pop3, addr, T, None, &header)).await.expect("guard");
        assert!(with.is_ok(), "{with:?}");
        let without = tokio::time::timeout(GUARD, probe(CheckKind::Pop3, addr, Duration::from_millis(300), None, &[])).await.expect("guard");
        assert!(without.is_err(), "a listener waiting for its header must not pass a bare probe");
    }

    #[tokio::test]
    async fn probe_smtp_ok() {
        let (addr, server) = serve(Script::Dialogue(&[
            b"220-mx.test ESMTP\r\n220 ready\r\n",
            b"250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
        ]))
        .await;
        let rtt = run(CheckKind::Smtp, addr, T).await.expect("smtp probe passes");
        assert!(rtt < T);
        assert_eq!(client_sent(server).await, ["EHLO mxlb-probe\r\n", "QUIT\r\n"]);
    }

    #[tokio::test]
    async fn probe_smtp_greeting_one_byte_per_segment() {
        let (addr, server) = serve(Script::Dribble(b"220-mx.test\r\n220 ok\r\n250 ok\r\n")).await;
        run(CheckKind::Smtp, addr, T).await.expect("split greeting still passes");
        assert_eq!(client_sent(server).await, ["EHLO mxlb-probe\r\n", "QUIT\r\n"]);
    }

    #[tokio::test]
    async fn probe_pop3_ok() {
        let (addr, server) = serve(Script::Dialogue(&[b"+OK POP3 ready\r\n"])).await;
        run(CheckKind::Pop3, addr, T).await.expect("pop3 probe passes");
        assert_eq!(client_sent(server).await, ["QUIT\r\n"]);
    }

    #[tokio::test]
    async fn probe_imap_ok() {
        let (addr, server) = serve(Script::Dialogue(&[b"* OK [CAPABILITY IMAP4rev1] ready\r\n"])).await;
        run(CheckKind::Imap, addr, T).await.expect("imap probe passes");
        assert_eq!(client_sent(server).await, ["a1 LOGOUT\r\n"]);
    }

    #[tokio::test]
    async fn probe_tcp_ok_even_if_server_closes() {
        let (addr, server) = serve(Script::Close).await;
        run(CheckKind::Tcp, addr, T).await.expect("connect is enough");
        assert!(client_sent(server).await.is_empty());
    }

    #[tokio::test]
    async fn probe_silent_server_times_out() {
        for (kind, stage) in
            [(CheckKind::Smtp, Stage::Greeting), (CheckKind::Pop3, Stage::Greeting), (CheckKind::Imap, Stage::Greeting)]
        {
            let (addr, _server) = serve(Script::Silent).await;
            let timeout = Duration::from_millis(200);
            match run(kind, addr, timeout).await {
                Err(ProbeError::Timeout { stage: s }) => assert_eq!(s, stage),
                other => panic!("{kind}: expected a timeout, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn probe_timeout_covers_the_whole_dialogue() {
        // Greets, then never answers EHLO.
        let (addr, _server) = serve(Script::Dialogue(&[b"220 hi\r\n", b""])).await;
        let err = run(CheckKind::Smtp, addr, Duration::from_millis(200)).await.unwrap_err();
        assert!(matches!(err, ProbeError::Timeout { stage: Stage::Ehlo }), "{err:?}");
        assert_eq!(err.to_string(), "timed out at EHLO");
    }

    #[tokio::test]
    async fn probe_garbage() {
        let (addr, _server) = serve(Script::Dialogue(&[b"HTTP/1.1 400 Bad Request\r\n\r\n"])).await;
        let err = run(CheckKind::Smtp, addr, T).await.unwrap_err();
        assert!(matches!(err, ProbeError::Garbage { .. }), "{err:?}");
        assert!(err.to_string().starts_with("garbage: not an SMTP reply: \"HTTP"), "{err}");

        // Binary with no line end fails on the spot, well before the timeout.
        let (addr, _server) = serve(Script::Dialogue(&[b"\x16\x03\x01\x02\x00"])).await;
        let started = std::time::Instant::now();
        let err = run(CheckKind::Imap, addr, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, ProbeError::Garbage { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn probe_rejected() {
        let (addr, _server) = serve(Script::Dialogue(&[b"421 4.3.2 try later\r\n"])).await;
        match run(CheckKind::Smtp, addr, T).await {
            Err(e @ ProbeError::Rejected { .. }) => assert_eq!(e.to_string(), "rejected: 421 4.3.2 try later"),
            other => panic!("expected a rejection, got {other:?}"),
        }
        let (addr, _server) = serve(Script::Dialogue(&[b"-ERR go away\r\n"])).await;
        assert!(matches!(run(CheckKind::Pop3, addr, T).await, Err(ProbeError::Rejected { .. })));
    }

    #[tokio::test]
    async fn probe_closed() {
        for kind in [CheckKind::Smtp, CheckKind::Pop3, CheckKind::Imap] {
            let (addr, _server) = serve(Script::Close).await;
            match run(kind, addr, T).await {
                Err(e @ ProbeError::Closed { stage: Stage::Greeting }) => {
                    assert_eq!(e.to_string(), "connection closed by server at greeting")
                }
                // A close can surface as a reset, depending on timing; still a failure at the greeting.
                Err(ProbeError::Io { stage: Stage::Greeting, .. }) => {}
                other => panic!("{kind}: expected closed, got {other:?}"),
            }
        }
        // Closing mid-reply is a close, not a pass.
        let (addr, _server) = serve(Script::SayAndClose(b"220-half of it\r\n")).await;
        assert!(matches!(
            run(CheckKind::Smtp, addr, T).await,
            Err(ProbeError::Closed { stage: Stage::Greeting } | ProbeError::Io { .. })
        ));
    }

    #[tokio::test]
    async fn probe_nothing_listening() {
        // Bind then drop, to get a port nothing listens on.
        let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        for kind in [CheckKind::Tcp, CheckKind::Smtp] {
            match run(kind, addr, T).await {
                Err(e @ ProbeError::Connect(_)) => assert!(e.to_string().starts_with("connect: "), "{e}"),
                other => panic!("{kind}: expected a connect error, got {other:?}"),
            }
        }
    }
}
