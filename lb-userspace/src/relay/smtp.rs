//! The server side of ESMTP (RFC 5321 with PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES,
//! SMTPUTF8, CHUNKING, STARTTLS) as a pure state machine: bytes in, [`Action`]s out, no I/O.
//!
//! Hand-written because no crate offers a smuggling-safe SMTP server with pipelining
//! enforcement; keeping it free of I/O lets the tests drive every byte sequence directly.
//!
//! # Rules a client meets here
//! - **End of DATA** is only the raw `CR LF . CR LF` (the first content line counts as following
//!   a CR LF). Bare LF and bare CR in content are each turned into CR LF (Postfix's
//!   `smtpd_forbid_bare_newline = normalize`), so the content we store has CR LF line endings
//!   only; a line that merely looks like an end of data (`\n.\n`, `\r\n.\r`, …) is kept as the
//!   content line `.`, which delivery dot-stuffs on the way out. A content line starting with
//!   `.` loses that first dot (RFC 5321 §4.5.2). BDAT content gets the same CR/LF normalisation
//!   and no dot handling.
//! - **Pipelining** (RFC 2920) is enforced for clients that are not authenticated, like Postfix's
//!   `smtpd_forbid_unauth_pipelining = yes`: only `MAIL`, `RCPT`, `RSET` and `BDAT` may be
//!   followed by more input before their reply, and only after `EHLO` (which offered
//!   PIPELINING). Every other command ends a group (`EHLO`, `HELO`, `DATA`, `NOOP`, `VRFY`,
//!   `STARTTLS`, …). The end of a message (`.` after DATA, or the `BDAT … LAST` chunk) may be
//!   followed only by `QUIT\r\n` (or the first bytes of it): a smuggled transaction after a
//!   fake end-of-data arrives exactly there. A violation is answered
//!   `554 5.5.0 Error: SMTP protocol synchronization`, the message is dropped and the
//!   connection closed. Authenticated clients may pipeline freely.
//! - **Limits** (RFC 5321 §4.5.3.1): a command line of more than 512 octets (CR LF included) is
//!   answered `500 5.5.2` once its end arrives, the excess is discarded as it comes. A content
//!   line of more than 1000 octets (CR LF and a stuffing dot included) does not fit through
//!   SMTP to a back-end, so such a message is read to its end and then rejected with
//!   `500 5.5.6 Error: line too long`. Content beyond `max_message_size` is read and discarded,
//!   then `552 5.3.4` at the end of the message.
//! - **Enhanced status codes** (RFC 2034) on every reply except the greeting, the EHLO/HELO
//!   reply and `354`, which RFC 2034 exempts.
//!
//! # Memory
//! The machine holds at most one command line (512 octets), the message content (at most
//! `max_message_size`), at most 1000-ish recipients, and — only while a finished message waits
//! for [`SmtpServer::message_result`] — the rest of the input given to that one `feed` call.
use std::fmt::Write as _;

use super::{MessageId, RcptVerdict};

/// RFC 5321 §4.5.3.1.4: a command line, CR LF included.
pub const COMMAND_LINE_MAX: usize = 512;
/// RFC 5321 §4.5.3.1.6: a text line, CR LF included.
pub const TEXT_LINE_MAX: usize = 1000;
/// RFC 5321 §4.5.3.1.1.
pub const LOCAL_PART_MAX: usize = 64;
/// RFC 5321 §4.5.3.1.2.
pub const DOMAIN_MAX: usize = 255;
/// RFC 5321 §4.5.3.1.3: a reverse- or forward-path, angle brackets included.
pub const PATH_MAX: usize = 256;

/// The policy knobs of one SMTP session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpSettings {
    /// Our name in the greeting and the EHLO reply.
    pub hostname: String,
    /// Largest content accepted, in octets (advertised as `SIZE`).
    pub max_message_size: u64,
    /// Recipients per message; RFC 5321 requires at least 100 to be accepted.
    pub max_recipients: usize,
    /// Error replies a client may provoke before it is disconnected (`421 4.7.0`); reset by
    /// an accepted message, like Postfix's `smtpd_hard_error_limit` ("without delivering mail").
    pub max_errors: u32,
    /// Messages accepted per connection; the next `MAIL` gets `421 4.7.0`.
    pub max_messages: u32,
    /// STARTTLS is offered (the session has a TLS configuration).
    pub starttls: bool,
    /// SMTP AUTH (PLAIN, LOGIN) is offered, once TLS is active (never over plain text, like
    /// Postfix's `smtpd_tls_auth_only = yes`).
    pub auth: bool,
}

impl SmtpSettings {
    /// Defaults close to Postfix's: 10 240 000 octets, 1000 recipients, 20 errors.
    pub fn new(hostname: impl Into<String>) -> SmtpSettings {
        SmtpSettings {
            hostname: hostname.into(),
            max_message_size: 10_240_000,
            max_recipients: 1000,
            auth: false,
            max_errors: 20,
            max_messages: 100,
            starttls: false,
        }
    }
}

/// A message that reached its end and passed every check: what the acceptor needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    /// The EHLO/HELO argument.
    pub helo: String,
    /// The client said EHLO (for the Received header's protocol name, RFC 3848).
    pub esmtp: bool,
    /// The reverse-path without angle brackets; empty for `<>`.
    pub mail_from: String,
    /// Accepted forward-paths without angle brackets, in order, without duplicates.
    pub rcpts: Vec<String>,
    /// `BODY=8BITMIME` was given.
    pub eight_bit: bool,
    /// `SMTPUTF8` was given.
    pub smtputf8: bool,
    /// Headers and body: CR LF line endings only, not dot-stuffed, no Received header of ours.
    pub content: Vec<u8>,
}

/// What the I/O layer must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send these bytes (one complete reply, CR LF included).
    Reply(Vec<u8>),
    /// Send nothing more in plain text, run the TLS handshake, then call
    /// [`SmtpServer::tls_established`]. Input buffered before the handshake has been dropped
    /// (RFC 3207 §4.2; the STARTTLS command-injection attack lives there).
    StartTls,
    /// A complete message: queue it, then call [`SmtpServer::message_result`]. Until then the
    /// machine answers nothing.
    Message(Draft),
    /// AUTH credentials to check: then call [`SmtpServer::auth_result`]. Until then the machine
    /// answers nothing.
    Authenticate { user: String, password: String },
    /// Close the connection after sending the replies before this action.
    Close,
}

/// Which timeout applies to the next read (see the session's timeout rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for (the rest of) a command line.
    Command,
    /// Reading message content (DATA or a BDAT chunk).
    Content,
    /// Waiting for [`SmtpServer::message_result`] or [`SmtpServer::tls_established`].
    Waiting,
    /// The session is over.
    Closed,
}

/// Why a path in MAIL or RCPT was refused; the text goes into the reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("address must be enclosed in <>")]
    Brackets,
    #[error("path longer than {PATH_MAX} octets")]
    PathTooLong,
    #[error("local part longer than {LOCAL_PART_MAX} octets")]
    LocalPartTooLong,
    #[error("domain longer than {DOMAIN_MAX} octets")]
    DomainTooLong,
    #[error("malformed address")]
    Syntax,
    #[error("the null address <> is not allowed here")]
    Null,
    #[error("non-ASCII address requires the SMTPUTF8 parameter")]
    NeedsSmtpUtf8,
}

/// The ESMTP state machine of one connection.
#[derive(Debug)]
pub struct SmtpServer {
    settings: SmtpSettings,
    /// Pipelining is not enforced (a trusted client, or one with a verified certificate).
    authenticated: bool,
    tls: bool,
    helo: Option<String>,
    esmtp: bool,
    tx: Option<Transaction>,
    mode: Mode,
    /// The command line being read (CR included, LF not); at most [`COMMAND_LINE_MAX`].
    line: Vec<u8>,
    /// The current command line outgrew the limit; its bytes are being discarded.
    line_overflow: bool,
    /// Input after a finished message, processed after `message_result`.
    held: Vec<u8>,
    errors: u32,
    messages: u32,
    /// The next line is an AUTH response (after a `334`), not a command.
    pending_auth: Option<AuthStep>,
    /// Who logged in with AUTH.
    auth_user: Option<String>,
    /// The user of the AUTH being checked.
    auth_candidate: Option<String>,
}

/// Where an AUTH exchange stands between `334` challenges.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AuthStep {
    /// `AUTH PLAIN` without an initial response: the next line is the response.
    Plain,
    /// `AUTH LOGIN`: the next line is the user name, then the password.
    LoginUser,
    LoginPassword(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Command,
    Data,
    /// Reading a BDAT chunk; `rejected` chunks are read and discarded (RFC 3030 §2).
    Chunk {
        remaining: u64,
        size: u64,
        last: bool,
        rejected: Option<ChunkReject>,
    },
    AwaitingResult,
    AwaitingTls,
    AwaitingAuth,
    Closed,
}

/// Why a BDAT chunk is read but not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkReject {
    Helo,
    MailFirst,
    RcptFirst,
    AllRcptsRejected,
}

/// The envelope and content of the mail transaction in progress.
#[derive(Debug, Default)]
struct Transaction {
    mail_from: String,
    eight_bit: bool,
    smtputf8: bool,
    rcpts: Vec<String>,
    /// RCPT commands tried (to tell "need RCPT" from "no valid recipients").
    rcpt_attempts: u32,
    /// A BDAT chunk was accepted: DATA, MAIL and RCPT are out of sequence now.
    chunking: bool,
    body: Body,
}

/// Message content as it arrives, with the counters the limits need.
#[derive(Debug)]
struct Body {
    content: Vec<u8>,
    /// Octets of content so far, including discarded ones.
    size: u64,
    too_big: bool,
    /// Octets in the current line (a removed stuffing dot counts: it goes back on the wire).
    line_len: usize,
    long_line: bool,
    scan: Scan,
    /// BDAT: the previous chunk ended in a CR that may be the first half of a CR LF.
    chunk_cr: bool,
}

impl Default for Body {
    fn default() -> Body {
        Body {
            content: Vec::new(),
            size: 0,
            too_big: false,
            line_len: 0,
            long_line: false,
            scan: Scan::LineStart { real: true },
            chunk_cr: false,
        }
    }
}

/// Where DATA input stands, in raw (wire) terms: this decides what ends the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// At the start of a line; `real` if the previous line ended in a raw CR LF (or this is
    /// the first line), the only place an end-of-data dot may stand.
    LineStart { real: bool },
    /// Saw `.` at the start of a line.
    Dot { real: bool },
    /// Saw `.` CR at the start of a line.
    DotCr { real: bool },
    /// Inside a line.
    Mid,
    /// Saw CR inside a line (or on an empty one): CR LF or a bare CR, the next byte tells.
    Cr,
}

impl Body {
    fn put(&mut self, bytes: &[u8], max: u64) {
        self.line_len = self.line_len.saturating_add(bytes.len());
        if self.line_len > TEXT_LINE_MAX - 2 {
            self.long_line = true;
        }
        self.grow(bytes, max);
    }

    fn eol(&mut self, max: u64) {
        self.line_len = 0;
        self.grow(b"\r\n", max);
    }

    fn grow(&mut self, bytes: &[u8], max: u64) {
        self.size = self.size.saturating_add(bytes.len() as u64);
        if self.size > max {
            if !self.too_big {
                self.too_big = true;
                // Nothing of it will be used: give the memory back now.
                self.content = Vec::new();
            }
        } else {
            self.content.extend_from_slice(bytes);
        }
    }

    /// Consumes DATA input; `Some(n)` when the end-of-data sequence ends at `n`.
    fn data(&mut self, input: &[u8], max: u64) -> Option<usize> {
        let mut i = 0;
        while let Some(&b) = input.get(i) {
            match (self.scan, b) {
                (Scan::Mid, b'\r') => {
                    self.scan = Scan::Cr;
                    i += 1;
                }
                (Scan::Mid, b'\n') => {
                    self.eol(max);
                    self.scan = Scan::LineStart { real: false };
                    i += 1;
                }
                (Scan::Mid, _) => {
                    let rest = input.get(i..).unwrap_or_default();
                    let run = rest.iter().position(|&c| c == b'\r' || c == b'\n').unwrap_or(rest.len());
                    self.put(rest.get(..run).unwrap_or_default(), max);
                    i += run;
                }
                (Scan::Cr, b'\n') => {
                    self.eol(max);
                    self.scan = Scan::LineStart { real: true };
                    i += 1;
                }
                (Scan::Cr, _) => {
                    // A bare CR ends the line; `b` starts the next one.
                    self.eol(max);
                    self.scan = Scan::LineStart { real: false };
                }
                (Scan::LineStart { real }, b'.') => {
                    self.scan = Scan::Dot { real };
                    i += 1;
                }
                (Scan::LineStart { .. }, _) => self.scan = Scan::Mid,
                (Scan::Dot { real }, b'\r') => {
                    self.scan = Scan::DotCr { real };
                    i += 1;
                }
                (Scan::Dot { .. }, b'\n') => {
                    // `.` LF is no end of data: the line `.` stays content.
                    self.put(b".", max);
                    self.eol(max);
                    self.scan = Scan::LineStart { real: false };
                    i += 1;
                }
                (Scan::Dot { .. }, _) => {
                    // A stuffed dot: drop it (it still counts toward the line's wire length).
                    self.line_len += 1;
                    self.scan = Scan::Mid;
                }
                (Scan::DotCr { real: true }, b'\n') => return Some(i + 1),
                (Scan::DotCr { real: false }, b'\n') => {
                    self.put(b".", max);
                    self.eol(max);
                    self.scan = Scan::LineStart { real: true };
                    i += 1;
                }
                (Scan::DotCr { .. }, _) => {
                    // `.` and a bare CR: the line `.`; `b` starts the next line.
                    self.put(b".", max);
                    self.eol(max);
                    self.scan = Scan::LineStart { real: false };
                }
            }
        }
        None
    }

    /// Consumes one BDAT chunk's bytes (no dot handling, bare CR/LF normalised).
    fn chunk(&mut self, input: &[u8], max: u64) {
        let mut i = 0;
        while let Some(&b) = input.get(i) {
            if self.chunk_cr {
                self.chunk_cr = false;
                self.eol(max);
                if b == b'\n' {
                    i += 1;
                }
                continue;
            }
            match b {
                b'\r' => self.chunk_cr = true,
                b'\n' => self.eol(max),
                _ => {
                    let rest = input.get(i..).unwrap_or_default();
                    let run = rest.iter().position(|&c| c == b'\r' || c == b'\n').unwrap_or(rest.len());
                    self.put(rest.get(..run).unwrap_or_default(), max);
                    i += run;
                    continue;
                }
            }
            i += 1;
        }
    }

    /// After `BDAT … LAST`: a trailing CR becomes CR LF and an unfinished last line is ended,
    /// so the content can go out through DATA.
    fn finish_chunks(&mut self, max: u64) {
        if self.chunk_cr {
            self.chunk_cr = false;
            self.eol(max);
        } else if self.line_len > 0 {
            self.eol(max);
        }
    }
}

/// Commands that may be followed by more input before their reply (RFC 2920 §3.1, and
/// BDAT whose chunk follows by definition, RFC 3030 §4.2).
fn pipelinable(verb: &str) -> bool {
    matches!(verb, "MAIL" | "RCPT" | "RSET" | "BDAT")
}

/// `rest` is `QUIT\r\n` or its beginning (any case): the only input a client that is not
/// authenticated may send along with the end of a message. A beginning can only complete to
/// QUIT or to an error, so accepting it costs nothing and spares a client whose QUIT was split
/// across reads.
fn quit_prefix(rest: &[u8]) -> bool {
    rest.len() <= 6 && b"QUIT\r\n".get(..rest.len()).is_some_and(|q| q.eq_ignore_ascii_case(rest))
}

/// Text from elsewhere (an acceptor's error) made safe for one reply line.
fn one_line(text: &str) -> String {
    let t: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).take(400).collect();
    if t.trim().is_empty() { "Error: temporary failure".to_string() } else { t }
}

impl SmtpServer {
    /// A session whose client is (`authenticated`) or is not yet trusted to pipeline freely.
    pub fn new(settings: SmtpSettings, authenticated: bool) -> SmtpServer {
        SmtpServer {
            settings,
            authenticated,
            tls: false,
            helo: None,
            esmtp: false,
            tx: None,
            mode: Mode::Command,
            line: Vec::with_capacity(COMMAND_LINE_MAX),
            line_overflow: false,
            held: Vec::new(),
            errors: 0,
            messages: 0,
            pending_auth: None,
            auth_user: None,
            auth_candidate: None,
        }
    }

    /// The user who logged in with AUTH, if any.
    pub fn auth_user(&self) -> Option<&str> {
        self.auth_user.as_deref()
    }

    /// The answer to the last [`Action::Authenticate`]. Returns the reply and whatever the
    /// held input leads to.
    pub fn auth_result(&mut self, ok: bool, rcpt_check: &dyn Fn(&str) -> RcptVerdict) -> Vec<Action> {
        let mut out = Vec::new();
        if self.mode != Mode::AwaitingAuth {
            return out;
        }
        self.mode = Mode::Command;
        let user = self.auth_candidate.take();
        if ok {
            self.auth_user = user;
            // A client that proved who it is may relay and pipeline, as with a certificate.
            self.authenticated = true;
            self.reply(&mut out, 235, "2.7.0 Authentication successful");
        } else {
            self.error(&mut out, 535, "5.7.8 Error: authentication failed");
        }
        let held = std::mem::take(&mut self.held);
        self.run(&held, rcpt_check, &mut out);
        out
    }

    /// The `220` greeting to send first.
    pub fn greeting(&self) -> Vec<u8> {
        format!("220 {} ESMTP mxlb\r\n", self.settings.hostname).into_bytes()
    }

    /// The EHLO/HELO argument, once given.
    pub fn helo(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    /// Where the session stands, so the I/O layer picks the right timeout.
    pub fn phase(&self) -> Phase {
        match self.mode {
            Mode::Command => Phase::Command,
            Mode::Data | Mode::Chunk { .. } => Phase::Content,
            Mode::AwaitingResult | Mode::AwaitingTls | Mode::AwaitingAuth => Phase::Waiting,
            Mode::Closed => Phase::Closed,
        }
    }

    /// Bytes from the client, in any fragmentation. `rcpt_check` decides each RCPT (it gets the
    /// address without brackets, or `postmaster`).
    ///
    /// While a [`Action::Message`] waits for its result the input is kept, not interpreted;
    /// the caller keeps that bounded by not reading while it waits.
    pub fn feed(&mut self, input: &[u8], rcpt_check: &dyn Fn(&str) -> RcptVerdict) -> Vec<Action> {
        let mut out = Vec::new();
        self.run(input, rcpt_check, &mut out);
        out
    }

    /// The acceptor's answer to the last [`Action::Message`]: `Ok` with its queue id, or `Err`
    /// with a reason for the client. Returns the reply and whatever the held input leads to.
    pub fn message_result(
        &mut self,
        result: Result<&MessageId, &str>,
        rcpt_check: &dyn Fn(&str) -> RcptVerdict,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        if self.mode != Mode::AwaitingResult {
            return out;
        }
        self.mode = Mode::Command;
        match result {
            Ok(id) => {
                self.messages = self.messages.saturating_add(1);
                self.errors = 0;
                self.reply(&mut out, 250, &format!("2.0.0 Ok: queued as {id}"));
            }
            // Our failure, not the client's: not counted as its error.
            Err(text) => self.reply(&mut out, 451, &format!("4.3.0 {}", one_line(text))),
        }
        let held = std::mem::take(&mut self.held);
        self.run(&held, rcpt_check, &mut out);
        out
    }

    /// The TLS handshake after STARTTLS succeeded; `authenticated` if the client presented a
    /// certificate the configuration accepts. Everything learnt before is forgotten
    /// (RFC 3207 §4.2): the client must say EHLO again.
    pub fn tls_established(&mut self, authenticated: bool) {
        if self.mode != Mode::AwaitingTls {
            return;
        }
        self.tls = true;
        self.authenticated |= authenticated;
        self.helo = None;
        self.esmtp = false;
        self.tx = None;
        self.line.clear();
        self.line_overflow = false;
        self.mode = Mode::Command;
    }

    fn run(&mut self, mut input: &[u8], check: &dyn Fn(&str) -> RcptVerdict, out: &mut Vec<Action>) {
        loop {
            if self.mode != Mode::Closed && self.errors >= self.settings.max_errors {
                let text = format!("4.7.0 {} Error: too many errors", self.settings.hostname);
                self.fatal(out, 421, &text);
            }
            if input.is_empty() {
                return;
            }
            match self.mode {
                Mode::Command => match input.iter().position(|&b| b == b'\n') {
                    None => {
                        self.push_line(input);
                        input = &[];
                    }
                    Some(p) => {
                        let (line, rest) = input.split_at(p);
                        self.push_line(line);
                        input = rest.get(1..).unwrap_or_default();
                        self.command(input, check, out);
                    }
                },
                Mode::Data => {
                    let max = self.settings.max_message_size;
                    let Some(tx) = self.tx.as_mut() else {
                        self.mode = Mode::Command;
                        continue;
                    };
                    match tx.body.data(input, max) {
                        None => input = &[],
                        Some(n) => {
                            input = input.get(n..).unwrap_or_default();
                            self.end_of_message(input, out);
                        }
                    }
                }
                Mode::Chunk { remaining, size, last, rejected } => {
                    let take = usize::try_from(remaining).unwrap_or(usize::MAX).min(input.len());
                    let (chunk, rest) = input.split_at(take);
                    input = rest;
                    if rejected.is_none()
                        && let Some(tx) = self.tx.as_mut()
                    {
                        tx.body.chunk(chunk, self.settings.max_message_size);
                    }
                    let remaining = remaining - take as u64;
                    self.mode = Mode::Chunk { remaining, size, last, rejected };
                    if remaining == 0 {
                        self.chunk_done(input, out);
                    }
                }
                Mode::AwaitingResult | Mode::AwaitingAuth => {
                    self.held.extend_from_slice(input);
                    return;
                }
                Mode::AwaitingTls | Mode::Closed => return,
            }
        }
    }

    fn push_line(&mut self, bytes: &[u8]) {
        if self.line_overflow {
            return;
        }
        // Room for the payload and its CR; the LF never enters the buffer.
        if self.line.len() + bytes.len() > COMMAND_LINE_MAX - 1 {
            self.line_overflow = true;
            self.line.clear();
        } else {
            self.line.extend_from_slice(bytes);
        }
    }

    fn reply(&mut self, out: &mut Vec<Action>, code: u16, text: &str) {
        out.push(Action::Reply(format!("{code} {text}\r\n").into_bytes()));
    }

    /// An error reply that counts toward `max_errors`.
    fn error(&mut self, out: &mut Vec<Action>, code: u16, text: &str) {
        self.errors = self.errors.saturating_add(1);
        self.reply(out, code, text);
    }

    /// A last reply, then the connection is closed.
    fn fatal(&mut self, out: &mut Vec<Action>, code: u16, text: &str) {
        self.reply(out, code, text);
        out.push(Action::Close);
        self.mode = Mode::Closed;
        self.tx = None;
        self.held.clear();
    }

    fn desync(&mut self, out: &mut Vec<Action>) {
        self.fatal(out, 554, "5.5.0 Error: SMTP protocol synchronization");
    }

    /// One complete command line is in `self.line`; `rest` is the input after it.
    fn command(&mut self, rest: &[u8], check: &dyn Fn(&str) -> RcptVerdict, out: &mut Vec<Action>) {
        let mut line = std::mem::take(&mut self.line);
        let overflow = std::mem::replace(&mut self.line_overflow, false);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if overflow || line.len() > COMMAND_LINE_MAX - 2 {
            self.error(out, 500, "5.5.2 Error: line too long");
        } else {
            self.dispatch(&line, rest, check, out);
        }
        // Reuse the allocation for the next line.
        line.clear();
        self.line = line;
    }

    fn dispatch(&mut self, line: &[u8], rest: &[u8], check: &dyn Fn(&str) -> RcptVerdict, out: &mut Vec<Action>) {
        if let Some(step) = self.pending_auth.take() {
            return self.auth_response(step, line, out);
        }
        let Ok(text) = std::str::from_utf8(line) else {
            self.error(out, 500, "5.5.2 Error: bad UTF-8 syntax");
            return;
        };
        let (verb, arg) = text.split_once(' ').unwrap_or((text, ""));
        let verb = verb.to_ascii_uppercase();
        if !self.authenticated && !rest.is_empty() && verb != "QUIT" && (!self.esmtp || !pipelinable(&verb)) {
            self.desync(out);
            return;
        }
        match verb.as_str() {
            "EHLO" | "HELO" => self.hello(&verb, arg, out),
            "MAIL" => self.mail(arg, out),
            "RCPT" => self.rcpt(arg, check, out),
            "DATA" => self.data_command(arg, out),
            "BDAT" => self.bdat(arg, rest, out),
            "RSET" => {
                if arg.trim().is_empty() {
                    self.tx = None;
                    self.reply(out, 250, "2.0.0 Ok");
                } else {
                    self.error(out, 501, "5.5.4 Syntax: RSET");
                }
            }
            "NOOP" => self.reply(out, 250, "2.0.0 Ok"),
            "QUIT" => self.fatal(out, 221, "2.0.0 Bye"),
            "VRFY" => {
                if arg.trim().is_empty() {
                    self.error(out, 501, "5.5.4 Syntax: VRFY address");
                } else {
                    self.reply(out, 252, "2.5.2 Cannot VRFY user, but will accept message and attempt delivery");
                }
            }
            "EXPN" => self.error(out, 502, "5.5.1 Error: command not implemented"),
            "AUTH" => self.auth(arg, out),
            "HELP" => {
                self.reply(out, 214, "2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY STARTTLS")
            }
            "STARTTLS" => self.starttls(arg, out),
            "" => self.error(out, 500, "5.5.2 Error: bad syntax"),
            _ => self.error(out, 500, "5.5.2 Error: command not recognized"),
        }
    }

    fn hello(&mut self, verb: &str, arg: &str, out: &mut Vec<Action>) {
        let name = arg.split(' ').find(|w| !w.is_empty()).unwrap_or_default();
        if name.is_empty() || name.len() > DOMAIN_MAX || name.chars().any(char::is_control) {
            self.error(out, 501, &format!("5.5.4 Syntax: {verb} hostname"));
            return;
        }
        self.tx = None;
        self.helo = Some(name.to_string());
        self.esmtp = verb == "EHLO";
        let host = &self.settings.hostname;
        let reply = if self.esmtp {
            let mut r = format!("250-{host}\r\n250-PIPELINING\r\n");
            let _ = write!(r, "250-SIZE {}\r\n", self.settings.max_message_size);
            r.push_str("250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n");
            if self.settings.starttls && !self.tls {
                r.push_str("250-STARTTLS\r\n");
            }
            if self.settings.auth && self.tls {
                r.push_str("250-AUTH PLAIN LOGIN\r\n");
            }
            r.push_str("250 CHUNKING\r\n");
            r
        } else {
            format!("250 {host}\r\n")
        };
        out.push(Action::Reply(reply.into_bytes()));
    }

    fn mail(&mut self, arg: &str, out: &mut Vec<Action>) {
        if self.helo.is_none() {
            return self.error(out, 503, "5.5.1 Error: send HELO/EHLO first");
        }
        if self.tx.is_some() {
            return self.error(out, 503, "5.5.1 Error: nested MAIL command");
        }
        if self.messages >= self.settings.max_messages {
            let text = format!("4.7.0 {} Error: too many messages in this session", self.settings.hostname);
            return self.fatal(out, 421, &text);
        }
        let Some(after) = strip_prefix_ci(arg, "FROM:") else {
            return self.error(out, 501, "5.5.4 Syntax: MAIL FROM:<address>");
        };
        let (path, params) = match split_path(after) {
            Ok(p) => p,
            Err(e) => return self.error(out, 501, &format!("5.1.7 Bad sender address syntax: {e}")),
        };
        let mut tx = Transaction::default();
        for param in params.split(' ').filter(|p| !p.is_empty()) {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            let key = key.to_ascii_uppercase();
            match (key.as_str(), self.esmtp) {
                ("SIZE", true) => match value.parse::<u64>() {
                    Ok(size) if size > self.settings.max_message_size => {
                        return self.error(out, 552, "5.3.4 Error: message size exceeds fixed limit");
                    }
                    Ok(_) => {}
                    Err(_) => return self.error(out, 501, "5.5.4 Bad SIZE parameter syntax"),
                },
                ("BODY", true) => match value.to_ascii_uppercase().as_str() {
                    "7BIT" => tx.eight_bit = false,
                    "8BITMIME" => tx.eight_bit = true,
                    _ => return self.error(out, 501, "5.5.4 Unsupported BODY parameter"),
                },
                ("SMTPUTF8", true) if value.is_empty() => tx.smtputf8 = true,
                _ => return self.error(out, 555, &format!("5.5.4 Unsupported option: {}", one_line(param))),
            }
        }
        match check_address(path, tx.smtputf8) {
            Ok(Address::Null) => {}
            Ok(Address::Postmaster) => {
                return self.error(out, 501, "5.1.7 Bad sender address syntax: malformed address");
            }
            Ok(Address::Mailbox(addr)) => tx.mail_from = addr.to_string(),
            Err(PathError::NeedsSmtpUtf8) => {
                return self.error(out, 553, &format!("5.6.7 Error: {}", PathError::NeedsSmtpUtf8));
            }
            Err(e) => return self.error(out, 501, &format!("5.1.7 Bad sender address syntax: {e}")),
        }
        self.tx = Some(tx);
        self.reply(out, 250, "2.1.0 Ok");
    }

    fn rcpt(&mut self, arg: &str, check: &dyn Fn(&str) -> RcptVerdict, out: &mut Vec<Action>) {
        let max = self.settings.max_recipients;
        let Some(tx) = self.tx.as_mut() else {
            return self.error(out, 503, "5.5.1 Error: need MAIL command");
        };
        if tx.chunking {
            return self.error(out, 503, "5.5.1 Error: RCPT after BDAT");
        }
        let Some(after) = strip_prefix_ci(arg, "TO:") else {
            return self.error(out, 501, "5.5.4 Syntax: RCPT TO:<address>");
        };
        tx.rcpt_attempts = tx.rcpt_attempts.saturating_add(1);
        if tx.rcpts.len() >= max {
            // RFC 5321 §4.5.3.1.10: the client sends the rest later; not counted as an error.
            return self.reply(out, 452, "4.5.3 Error: too many recipients");
        }
        let smtputf8 = tx.smtputf8;
        let (path, params) = match split_path(after) {
            Ok(p) => p,
            Err(e) => return self.error(out, 501, &format!("5.1.3 Bad recipient address syntax: {e}")),
        };
        if let Some(param) = params.split(' ').find(|p| !p.is_empty()) {
            return self.error(out, 555, &format!("5.5.4 Unsupported option: {}", one_line(param)));
        }
        let addr = match check_address(path, smtputf8) {
            Ok(Address::Mailbox(a)) => a.to_string(),
            Ok(Address::Postmaster) => "postmaster".to_string(),
            Ok(Address::Null) => {
                return self.error(out, 501, &format!("5.1.3 Bad recipient address syntax: {}", PathError::Null));
            }
            Err(PathError::NeedsSmtpUtf8) => {
                return self.error(out, 553, &format!("5.6.7 Error: {}", PathError::NeedsSmtpUtf8));
            }
            Err(e) => return self.error(out, 501, &format!("5.1.3 Bad recipient address syntax: {e}")),
        };
        match check(&addr) {
            RcptVerdict::Accept => {
                if let Some(tx) = self.tx.as_mut()
                    && !tx.rcpts.contains(&addr)
                {
                    tx.rcpts.push(addr);
                }
                self.reply(out, 250, "2.1.5 Ok");
            }
            RcptVerdict::RelayDenied => self.error(out, 554, &format!("5.7.1 <{addr}>: Relay access denied")),
            RcptVerdict::UnknownUser => {
                self.error(out, 550, &format!("5.1.1 <{addr}>: Recipient address rejected: User unknown"))
            }
            RcptVerdict::TempFail(text) => self.error(out, 450, &format!("4.3.0 {}", one_line(&text))),
        }
    }

    /// Why DATA or BDAT cannot start a message now, if it cannot.
    fn content_refusal(&self) -> Option<ChunkReject> {
        match &self.tx {
            None => Some(ChunkReject::MailFirst),
            Some(tx) if tx.rcpts.is_empty() && tx.rcpt_attempts > 0 => Some(ChunkReject::AllRcptsRejected),
            Some(tx) if tx.rcpts.is_empty() => Some(ChunkReject::RcptFirst),
            Some(_) => None,
        }
    }

    fn refuse_content(&mut self, why: ChunkReject, out: &mut Vec<Action>) {
        match why {
            ChunkReject::Helo => self.error(out, 503, "5.5.1 Error: send EHLO first"),
            ChunkReject::MailFirst => self.error(out, 503, "5.5.1 Error: need MAIL command"),
            ChunkReject::RcptFirst => self.error(out, 503, "5.5.1 Error: need RCPT command"),
            ChunkReject::AllRcptsRejected => self.error(out, 554, "5.5.1 Error: no valid recipients"),
        }
    }

    fn data_command(&mut self, arg: &str, out: &mut Vec<Action>) {
        if !arg.trim().is_empty() {
            return self.error(out, 501, "5.5.4 Syntax: DATA");
        }
        if let Some(why) = self.content_refusal() {
            return self.refuse_content(why, out);
        }
        if self.tx.as_ref().is_some_and(|tx| tx.chunking) {
            return self.error(out, 503, "5.5.1 Error: DATA after BDAT");
        }
        self.mode = Mode::Data;
        out.push(Action::Reply(b"354 End data with <CR><LF>.<CR><LF>\r\n".to_vec()));
    }

    fn bdat(&mut self, arg: &str, rest: &[u8], out: &mut Vec<Action>) {
        let mut words = arg.split(' ').filter(|w| !w.is_empty());
        let size = words.next().filter(|w| w.bytes().all(|b| b.is_ascii_digit())).and_then(|w| w.parse::<u64>().ok());
        let last = match words.next() {
            None => Some(false),
            Some(w) if w.eq_ignore_ascii_case("LAST") => Some(true),
            Some(_) => None,
        };
        let (Some(size), Some(last), None) = (size, last, words.next()) else {
            // Without a size the chunk cannot be skipped; what follows is read as commands.
            return self.error(out, 501, "5.5.4 Syntax: BDAT count [LAST]");
        };
        let rejected = if self.esmtp { self.content_refusal() } else { Some(ChunkReject::Helo) };
        if rejected.is_none()
            && let Some(tx) = self.tx.as_mut()
            && !tx.chunking
        {
            tx.chunking = true;
            tx.body.scan = Scan::Mid;
        }
        self.mode = Mode::Chunk { remaining: size, size, last, rejected };
        if size == 0 {
            self.chunk_done(rest, out);
        }
    }

    fn chunk_done(&mut self, rest: &[u8], out: &mut Vec<Action>) {
        let Mode::Chunk { size, last, rejected, .. } = self.mode else {
            return;
        };
        self.mode = Mode::Command;
        if let Some(why) = rejected {
            return self.refuse_content(why, out);
        }
        let too_big = self.tx.as_ref().is_some_and(|tx| tx.body.too_big);
        if last {
            if let Some(tx) = self.tx.as_mut() {
                tx.body.finish_chunks(self.settings.max_message_size);
            }
            self.end_of_message(rest, out);
        } else if too_big {
            // RFC 3030 §2: the transaction fails; later chunks meet "need MAIL".
            self.tx = None;
            self.error(out, 552, "5.3.4 Error: message file too big");
        } else {
            self.reply(out, 250, &format!("2.0.0 Ok: {size} octets received"));
        }
    }

    /// The message ended (end of DATA or the LAST chunk); `rest` is the input after it.
    fn end_of_message(&mut self, rest: &[u8], out: &mut Vec<Action>) {
        self.mode = Mode::Command;
        if !self.authenticated && !rest.is_empty() && !quit_prefix(rest) {
            return self.desync(out);
        }
        let Some(tx) = self.tx.take() else {
            return self.error(out, 503, "5.5.1 Error: need MAIL command");
        };
        if tx.body.too_big {
            return self.error(out, 552, "5.3.4 Error: message file too big");
        }
        if tx.body.long_line {
            return self.error(out, 500, "5.5.6 Error: line too long");
        }
        out.push(Action::Message(Draft {
            helo: self.helo.clone().unwrap_or_default(),
            esmtp: self.esmtp,
            mail_from: tx.mail_from,
            rcpts: tx.rcpts,
            eight_bit: tx.eight_bit,
            smtputf8: tx.smtputf8,
            content: tx.body.content,
        }));
        self.mode = Mode::AwaitingResult;
    }

    /// `AUTH mechanism [initial-response]` (RFC 4954): PLAIN and LOGIN, only over TLS.
    fn auth(&mut self, arg: &str, out: &mut Vec<Action>) {
        if !self.settings.auth {
            return self.error(out, 502, "5.5.1 Error: command not implemented");
        }
        if !self.tls {
            return self.error(out, 538, "5.7.11 Encryption required for requested authentication mechanism");
        }
        if !self.esmtp {
            return self.error(out, 503, "5.5.1 Error: send EHLO first");
        }
        if self.auth_user.is_some() {
            return self.error(out, 503, "5.5.1 Error: already authenticated");
        }
        if self.tx.is_some() {
            return self.error(out, 503, "5.5.1 Error: MAIL transaction in progress");
        }
        let mut words = arg.split(' ').filter(|w| !w.is_empty());
        let mechanism = words.next().unwrap_or_default().to_ascii_uppercase();
        let initial = words.next();
        match (mechanism.as_str(), initial) {
            ("PLAIN", Some(response)) => self.auth_response(AuthStep::Plain, response.as_bytes(), out),
            ("PLAIN", None) => {
                self.pending_auth = Some(AuthStep::Plain);
                self.reply(out, 334, "");
            }
            ("LOGIN", Some(user)) => self.auth_response(AuthStep::LoginUser, user.as_bytes(), out),
            ("LOGIN", None) => {
                self.pending_auth = Some(AuthStep::LoginUser);
                self.reply(out, 334, "VXNlcm5hbWU6");
            }
            ("", _) => self.error(out, 501, "5.5.4 Syntax: AUTH mechanism"),
            _ => self.error(out, 504, "5.5.4 Error: unsupported authentication mechanism"),
        }
    }

    /// One base64 response line of an AUTH exchange (`*` cancels it).
    fn auth_response(&mut self, step: AuthStep, line: &[u8], out: &mut Vec<Action>) {
        use base64::Engine as _;
        if line == b"*" {
            return self.error(out, 501, "5.7.0 Authentication aborted");
        }
        // `=` is an empty initial response (RFC 4954 §4).
        let decoded = if line == b"=" { Ok(Vec::new()) } else { base64::engine::general_purpose::STANDARD.decode(line) };
        let Ok(decoded) = decoded else {
            return self.error(out, 501, "5.5.2 Error: invalid base64 data");
        };
        let Ok(text) = String::from_utf8(decoded) else {
            return self.error(out, 501, "5.5.2 Error: invalid UTF-8 in credentials");
        };
        let (user, password) = match step {
            // authzid NUL authcid NUL password; an authzid other than the authcid is refused.
            AuthStep::Plain => {
                let mut parts = text.split('\0');
                let (Some(authz), Some(user), Some(password), None) = (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return self.error(out, 501, "5.5.2 Error: malformed PLAIN response");
                };
                if !authz.is_empty() && authz != user {
                    return self.error(out, 535, "5.7.8 Error: authentication failed");
                }
                (user.to_string(), password.to_string())
            }
            AuthStep::LoginUser => {
                self.pending_auth = Some(AuthStep::LoginPassword(text));
                return self.reply(out, 334, "UGFzc3dvcmQ6");
            }
            AuthStep::LoginPassword(user) => (user, text),
        };
        if user.is_empty() {
            return self.error(out, 535, "5.7.8 Error: authentication failed");
        }
        self.auth_candidate = Some(user.clone());
        self.mode = Mode::AwaitingAuth;
        out.push(Action::Authenticate { user, password });
    }

    fn starttls(&mut self, arg: &str, out: &mut Vec<Action>) {
        if !arg.trim().is_empty() {
            return self.error(out, 501, "5.5.4 Syntax: STARTTLS");
        }
        if !self.settings.starttls {
            return self.error(out, 502, "5.5.1 Error: command not implemented");
        }
        if self.tls {
            return self.error(out, 554, "5.5.1 Error: TLS already active");
        }
        if !self.esmtp {
            return self.error(out, 503, "5.5.1 Error: send EHLO first");
        }
        if self.tx.is_some() {
            return self.error(out, 503, "5.5.1 Error: MAIL transaction in progress");
        }
        self.reply(out, 220, "2.0.0 Ready to start TLS");
        out.push(Action::StartTls);
        self.mode = Mode::AwaitingTls;
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| s.get(prefix.len()..)).flatten()
}

/// Splits `<path> params` (a space after the colon is tolerated, as Postfix does) into the
/// text inside the brackets and the parameters.
fn split_path(s: &str) -> Result<(&str, &str), PathError> {
    let s = s.trim_start_matches(' ');
    let inner = s.strip_prefix('<').ok_or(PathError::Brackets)?;
    // The closing bracket is the first one outside a quoted string.
    let mut quoted = false;
    let mut escaped = false;
    let mut end = None;
    for (i, c) in inner.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '>' if !quoted => {
                end = Some(i);
                break;
            }
            _ => {}
        }
    }
    let end = end.ok_or(PathError::Brackets)?;
    if end + 2 > PATH_MAX {
        return Err(PathError::PathTooLong);
    }
    let path = inner.get(..end).ok_or(PathError::Syntax)?;
    let params = inner.get(end + 1..).unwrap_or_default();
    if !params.is_empty() && !params.starts_with(' ') {
        return Err(PathError::Syntax);
    }
    Ok((path, params))
}

enum Address<'a> {
    Null,
    /// `<postmaster>` without a domain (RFC 5321 §4.1.1.3).
    Postmaster,
    Mailbox(&'a str),
}

/// Checks the text inside `<>`: a source route is dropped (RFC 5321 §4.1.2 says to ignore
/// it), then `local@domain` within the RFC 5321 length limits, non-ASCII only with SMTPUTF8.
fn check_address(path: &str, smtputf8: bool) -> Result<Address<'_>, PathError> {
    let mailbox = if path.starts_with('@') { path.split_once(':').ok_or(PathError::Syntax)?.1 } else { path };
    if mailbox.is_empty() {
        return if path.is_empty() { Ok(Address::Null) } else { Err(PathError::Syntax) };
    }
    if !smtputf8 && !mailbox.is_ascii() {
        return Err(PathError::NeedsSmtpUtf8);
    }
    if mailbox.eq_ignore_ascii_case("postmaster") {
        return Ok(Address::Postmaster);
    }
    let (local, domain) = if let Some(quoted) = mailbox.strip_prefix('"') {
        let mut escaped = false;
        let mut close = None;
        for (i, c) in quoted.char_indices() {
            match c {
                _ if escaped => {
                    if c.is_control() {
                        return Err(PathError::Syntax);
                    }
                    escaped = false;
                }
                '\\' => escaped = true,
                '"' => {
                    close = Some(i);
                    break;
                }
                _ if c.is_control() => return Err(PathError::Syntax),
                _ => {}
            }
        }
        let close = close.ok_or(PathError::Syntax)?;
        let local_len = close + 2;
        let after = quoted.get(close + 1..).ok_or(PathError::Syntax)?;
        let domain = after.strip_prefix('@').ok_or(PathError::Syntax)?;
        (mailbox.get(..local_len).ok_or(PathError::Syntax)?, domain)
    } else {
        let (local, domain) = mailbox.split_once('@').ok_or(PathError::Syntax)?;
        let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c) || !c.is_ascii();
        if local.is_empty() || !local.chars().all(atext) {
            return Err(PathError::Syntax);
        }
        (local, domain)
    };
    if local.len() > LOCAL_PART_MAX {
        return Err(PathError::LocalPartTooLong);
    }
    if domain.len() > DOMAIN_MAX {
        return Err(PathError::DomainTooLong);
    }
    let domain_ok = if let Some(literal) = domain.strip_prefix('[') {
        literal.strip_suffix(']').is_some_and(|l| !l.is_empty() && l.bytes().all(|b| matches!(b, 33..=90 | 94..=126)))
    } else {
        !domain.is_empty()
            && domain.split('.').all(|label| {
                !label.is_empty()
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || !c.is_ascii())
            })
    };
    if !domain_ok {
        return Err(PathError::Syntax);
    }
    Ok(Address::Mailbox(mailbox))
}

/// The fake end-of-data sequences of SMTP smuggling (CVE-2023-51764/51765/51766,
/// mail-reference.md): none of them may end DATA, each must stay content. Public so the unit
/// tests here and the end-to-end suite (through a VIP, to real back-ends) use one list.
pub const SMUGGLING_SEQUENCES: [&[u8]; 12] = [
    b"\n.\n",
    b"\n.\r",
    b"\r.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n.\n",
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\r\n.\r\r\n",
    b"\r\r\n.\r\r\n",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn accept_all(_: &str) -> RcptVerdict {
        RcptVerdict::Accept
    }

    fn server() -> SmtpServer {
        SmtpServer::new(SmtpSettings::new("mx.test"), false)
    }

    fn feed(s: &mut SmtpServer, input: &[u8]) -> Vec<Action> {
        s.feed(input, &accept_all)
    }

    /// Each reply's text; messages and other actions as markers.
    fn texts(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::Reply(r) => String::from_utf8_lossy(r).into_owned(),
                Action::StartTls => "<starttls>".to_string(),
                Action::Message(_) => "<message>".to_string(),
                Action::Authenticate { user, password } => format!("<auth {user}/{password}>"),
                Action::Close => "<close>".to_string(),
            })
            .collect()
    }

    /// The reply codes (three digits) and markers.
    fn codes(actions: &[Action]) -> Vec<String> {
        texts(actions).into_iter().map(|t| if t.starts_with('<') { t } else { t.chars().take(3).collect() }).collect()
    }

    fn drafts(actions: Vec<Action>) -> Vec<Draft> {
        actions
            .into_iter()
            .filter_map(|a| match a {
                Action::Message(d) => Some(d),
                _ => None,
            })
            .collect()
    }

    /// Feeds one command and returns its single reply text.
    fn say(s: &mut SmtpServer, line: &str) -> String {
        let out = feed(s, line.as_bytes());
        texts(&out).join("")
    }

    /// EHLO, MAIL, RCPT, DATA one at a time (no pipelining); ready for content.
    fn in_data(s: &mut SmtpServer) {
        assert!(say(s, "EHLO client.test\r\n").starts_with("250-mx.test\r\n"));
        assert_eq!(say(s, "MAIL FROM:<a@example.org>\r\n"), "250 2.1.0 Ok\r\n");
        assert_eq!(say(s, "RCPT TO:<b@example.net>\r\n"), "250 2.1.5 Ok\r\n");
        assert_eq!(say(s, "DATA\r\n"), "354 End data with <CR><LF>.<CR><LF>\r\n");
    }

    fn id() -> MessageId {
        "0123456789abcdef01234567".parse().unwrap()
    }

    /// No CR without LF after it, no LF without CR before it.
    fn only_crlf(content: &[u8]) -> bool {
        content.iter().enumerate().all(|(i, &b)| match b {
            b'\r' => content.get(i + 1) == Some(&b'\n'),
            b'\n' => i > 0 && content.get(i - 1) == Some(&b'\r'),
            _ => true,
        })
    }

    #[test]
    fn greeting_and_ehlo_advertise_the_extensions() {
        let mut s = server();
        assert_eq!(s.greeting(), b"220 mx.test ESMTP mxlb\r\n");
        assert_eq!(
            say(&mut s, "EHLO client.test\r\n"),
            "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n\
             250-SMTPUTF8\r\n250 CHUNKING\r\n"
        );
        let mut settings = SmtpSettings::new("mx.test");
        settings.starttls = true;
        let mut s = SmtpServer::new(settings, false);
        assert!(say(&mut s, "ehlo client.test\r\n").contains("\r\n250-STARTTLS\r\n"));
        let mut s = server();
        assert_eq!(say(&mut s, "HELO client.test\r\n"), "250 mx.test\r\n");
        assert_eq!(s.helo(), Some("client.test"));
        assert_eq!(say(&mut s, "EHLO\r\n"), "501 5.5.4 Syntax: EHLO hostname\r\n");
    }

    #[test]
    fn a_whole_transaction_produces_a_draft_and_the_queue_reply() {
        let mut s = server();
        in_data(&mut s);
        let out = feed(&mut s, b"Subject: hi\r\n\r\nbody\r\n.\r\n");
        let d = drafts(out);
        assert_eq!(d.len(), 1);
        let d = &d[0];
        assert_eq!(d.helo, "client.test");
        assert!(d.esmtp);
        assert_eq!(d.mail_from, "a@example.org");
        assert_eq!(d.rcpts, vec!["b@example.net".to_string()]);
        assert_eq!(d.content, b"Subject: hi\r\n\r\nbody\r\n");
        assert_eq!(s.phase(), Phase::Waiting);
        // Nothing is answered while the message is being queued.
        assert!(feed(&mut s, b"QUIT\r\n").is_empty());
        let out = s.message_result(Ok(&id()), &accept_all);
        assert_eq!(
            texts(&out),
            ["250 2.0.0 Ok: queued as 0123456789abcdef01234567\r\n", "221 2.0.0 Bye\r\n", "<close>"]
        );
    }

    #[test]
    fn a_failed_queue_is_451_and_the_session_goes_on() {
        let mut s = server();
        in_data(&mut s);
        assert_eq!(drafts(feed(&mut s, b"x\r\n.\r\n")).len(), 1);
        let out = s.message_result(Err("spool full\r\nINJECTED"), &accept_all);
        assert_eq!(texts(&out), ["451 4.3.0 spool full  INJECTED\r\n"]);
        assert_eq!(say(&mut s, "MAIL FROM:<>\r\n"), "250 2.1.0 Ok\r\n");
    }

    #[test]
    fn simple_commands_and_their_replies() {
        let mut s = server();
        assert_eq!(say(&mut s, "NOOP\r\n"), "250 2.0.0 Ok\r\n");
        assert_eq!(say(&mut s, "MAIL FROM:<a@b.c>\r\n"), "503 5.5.1 Error: send HELO/EHLO first\r\n");
        say(&mut s, "EHLO c\r\n");
        assert_eq!(
            say(&mut s, "VRFY root\r\n"),
            "252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery\r\n"
        );
        assert_eq!(say(&mut s, "VRFY\r\n"), "501 5.5.4 Syntax: VRFY address\r\n");
        assert_eq!(say(&mut s, "EXPN list\r\n"), "502 5.5.1 Error: command not implemented\r\n");
        assert_eq!(say(&mut s, "AUTH PLAIN AAAA\r\n"), "502 5.5.1 Error: command not implemented\r\n");
        assert!(say(&mut s, "HELP\r\n").starts_with("214 2.0.0 "));
        assert_eq!(say(&mut s, "STARTTLS\r\n"), "502 5.5.1 Error: command not implemented\r\n");
        assert_eq!(say(&mut s, "FOO bar\r\n"), "500 5.5.2 Error: command not recognized\r\n");
        assert_eq!(say(&mut s, "\r\n"), "500 5.5.2 Error: bad syntax\r\n");
        assert_eq!(say(&mut s, "RCPT TO:<a@b.c>\r\n"), "503 5.5.1 Error: need MAIL command\r\n");
        assert_eq!(say(&mut s, "DATA\r\n"), "503 5.5.1 Error: need MAIL command\r\n");
        assert_eq!(say(&mut s, "MAIL FROM:<a@b.c>\r\n"), "250 2.1.0 Ok\r\n");
        assert_eq!(say(&mut s, "MAIL FROM:<a@b.c>\r\n"), "503 5.5.1 Error: nested MAIL command\r\n");
        assert_eq!(say(&mut s, "DATA\r\n"), "503 5.5.1 Error: need RCPT command\r\n");
        assert_eq!(say(&mut s, "RSET\r\n"), "250 2.0.0 Ok\r\n");
        assert_eq!(say(&mut s, "RCPT TO:<a@b.c>\r\n"), "503 5.5.1 Error: need MAIL command\r\n");
        assert_eq!(texts(&feed(&mut s, b"quit\r\n")), ["221 2.0.0 Bye\r\n", "<close>"]);
        assert_eq!(s.phase(), Phase::Closed);
        assert!(feed(&mut s, b"NOOP\r\n").is_empty());
    }

    #[test]
    fn mail_and_rcpt_syntax_errors() {
        let mut s = server();
        say(&mut s, "EHLO c\r\n");
        assert_eq!(say(&mut s, "MAIL TO:<a@b.c>\r\n"), "501 5.5.4 Syntax: MAIL FROM:<address>\r\n");
        assert_eq!(
            say(&mut s, "MAIL FROM:a@b.c\r\n"),
            "501 5.1.7 Bad sender address syntax: address must be enclosed in <>\r\n"
        );
        assert_eq!(
            say(&mut s, "MAIL FROM:<a b@c.d>\r\n"),
            "501 5.1.7 Bad sender address syntax: malformed address\r\n"
        );
        assert_eq!(say(&mut s, "MAIL FROM:<ab.c>\r\n"), "501 5.1.7 Bad sender address syntax: malformed address\r\n");
        assert_eq!(say(&mut s, "MAIL FROM:<a@b.c> FOO=1\r\n"), "555 5.5.4 Unsupported option: FOO=1\r\n");
        assert_eq!(say(&mut s, "MAIL FROM:<a@b.c> BODY=BINARYMIME\r\n"), "501 5.5.4 Unsupported BODY parameter\r\n");
        assert_eq!(say(&mut s, "MAIL FROM:<a@b.c> SIZE=x\r\n"), "501 5.5.4 Bad SIZE parameter syntax\r\n");
        // Tolerated as Postfix does: a space after the colon; a source route is ignored.
        assert_eq!(say(&mut s, "MAIL FROM: <@relay.example:a@b.c> BODY=8BITMIME SIZE=100\r\n"), "250 2.1.0 Ok\r\n");
        assert_eq!(
            say(&mut s, "RCPT TO:<>\r\n"),
            "501 5.1.3 Bad recipient address syntax: the null address <> is not allowed here\r\n"
        );
        assert_eq!(
            say(&mut s, "RCPT TO:b@c.d\r\n"),
            "501 5.1.3 Bad recipient address syntax: address must be enclosed in <>\r\n"
        );
        assert_eq!(
            say(&mut s, "RCPT TO:<b@c..d>\r\n"),
            "501 5.1.3 Bad recipient address syntax: malformed address\r\n"
        );
        assert_eq!(say(&mut s, "RCPT TO:<b@c.d> NOTIFY=NEVER\r\n"), "555 5.5.4 Unsupported option: NOTIFY=NEVER\r\n");
        assert_eq!(say(&mut s, "RCPT FROM:<b@c.d>\r\n"), "501 5.5.4 Syntax: RCPT TO:<address>\r\n");
        assert_eq!(say(&mut s, "RCPT TO:<\"john doe\"@c.d>\r\n"), "250 2.1.5 Ok\r\n");
        assert_eq!(say(&mut s, "RCPT TO:<x@[192.0.2.1]>\r\n"), "250 2.1.5 Ok\r\n");
        assert_eq!(say(&mut s, "DATA\r\n"), "354 End data with <CR><LF>.<CR><LF>\r\n");
        let d = drafts(feed(&mut s, b".\r\n"));
        assert_eq!(d[0].mail_from, "a@b.c");
        assert!(d[0].eight_bit);
        assert_eq!(d[0].rcpts, ["\"john doe\"@c.d", "x@[192.0.2.1]"]);
        assert!(d[0].content.is_empty());
    }

    #[test]
    fn null_sender_and_postmaster_are_accepted() {
        let mut s = server();
        say(&mut s, "EHLO c\r\n");
        assert_eq!(say(&mut s, "MAIL FROM:<>\r\n"), "250 2.1.0 Ok\r\n");
        let seen = std::cell::RefCell::new(Vec::new());
        let check = |r: &str| {
            seen.borrow_mut().push(r.to_string());
            RcptVerdict::Accept
        };
        assert_eq!(texts(&s.feed(b"RCPT TO:<Postmaster>\r\n", &check)), ["250 2.1.5 Ok\r\n"]);
        assert_eq!(seen.borrow().as_slice(), ["postmaster"]);
        say(&mut s, "DATA\r\n");
        let d = drafts(feed(&mut s, b"x\r\n.\r\n"));
        assert_eq!(d[0].mail_from, "");
        assert_eq!(d[0].rcpts, ["postmaster"]);
    }

    #[test]
    fn recipient_verdicts_become_their_replies() {
        let mut s = server();
        say(&mut s, "EHLO c\r\n");
        say(&mut s, "MAIL FROM:<a@b.c>\r\n");
        let check = |r: &str| match r {
            "relay@elsewhere.test" => RcptVerdict::RelayDenied,
            "nobody@example.net" => RcptVerdict::UnknownUser,
            "later@example.net" => RcptVerdict::TempFail("Error: mailbox list unavailable".into()),
            _ => RcptVerdict::Accept,
        };
        let mut rcpt = |line: &str| texts(&s.feed(line.as_bytes(), &check)).join("");
        assert_eq!(
            rcpt("RCPT TO:<relay@elsewhere.test>\r\n"),
            "554 5.7.1 <relay@elsewhere.test>: Relay access denied\r\n"
        );
        assert_eq!(
            rcpt("RCPT TO:<nobody@example.net>\r\n"),
            "550 5.1.1 <nobody@example.net>: Recipient address rejected: User unknown\r\n"
        );
        assert_eq!(rcpt("RCPT TO:<later@example.net>\r\n"), "450 4.3.0 Error: mailbox list unavailable\r\n");
        assert_eq!(rcpt("DATA\r\n"), "554 5.5.1 Error: no valid recipients\r\n");
        assert_eq!(rcpt("RCPT TO:<ok@example.net>\r\n"), "250 2.1.5 Ok\r\n");
        assert_eq!(rcpt("RCPT TO:<ok@example.net>\r\n"), "250 2.1.5 Ok\r\n");
        assert_eq!(rcpt("DATA\r\n"), "354 End data with <CR><LF>.<CR><LF>\r\n");
        let d = drafts(feed(&mut s, b".\r\n"));
        assert_eq!(d[0].rcpts, ["ok@example.net"], "rejected ones left out, the duplicate once");
    }

    #[test]
    fn path_length_limits() {
        let mut s = server();
        say(&mut s, "EHLO c\r\n");
        say(&mut s, "MAIL FROM:<a@b.c>\r\n");
        let local64 = "l".repeat(64);
        assert_eq!(say(&mut s, &format!("RCPT TO:<{local64}@b.c>\r\n")), "250 2.1.5 Ok\r\n");
        assert_eq!(
            say(&mut s, &format!("RCPT TO:<{local64}x@b.c>\r\n")),
            "501 5.1.3 Bad recipient address syntax: local part longer than 64 octets\r\n"
        );
        // A 254-octet path inside the brackets: 256 with them.
        let domain = format!("{}.{}.{}", "d".repeat(63), "e".repeat(63), "f".repeat(61));
        let path254 = format!("{local64}@{domain}");
        assert_eq!(path254.len(), 254);
        assert_eq!(say(&mut s, &format!("RCPT TO:<{path254}>\r\n")), "250 2.1.5 Ok\r\n");
        assert_eq!(
            say(&mut s, &format!("RCPT TO:<x{path254}>\r\n")),
            "501 5.1.3 Bad recipient address syntax: path longer than 256 octets\r\n"
        );
        // A domain over 255 octets is caught by the path limit in RCPT; check the domain rule
        // on its own.
        let long_domain = format!("{}.{}.{}.{}.x", "a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(62));
        assert_eq!(long_domain.len(), 256);
        assert_eq!(check_address(&format!("u@{long_domain}"), false).err(), Some(PathError::DomainTooLong));
    }

    #[test]
    fn non_ascii_addresses_need_smtputf8() {
        let mut s = server();
        say(&mut s, "EHLO c\r\n");
        assert_eq!(
            say(&mut s, "MAIL FROM:<jürgen@example.org>\r\n"),
            "553 5.6.7 Error: non-ASCII address requires the SMTPUTF8 parameter\r\n"
        );
        assert_eq!(say(&mut s, "MAIL FROM:<a@example.org>\r\n"), "250 2.1.0 Ok\r\n");
        assert_eq!(
            say(&mut s, "RCPT TO:<δοκιμή@παράδειγμα.δοκιμή>\r\n"),
            "553 5.6.7 Error: non-ASCII address requires the SMTPUTF8 parameter\r\n"
        );
        say(&mut s, "RSET\r\n");
        assert_eq!(say(&mut s, "MAIL FROM:<jürgen@example.org> SMTPUTF8\r\n"), "250 2.1.0 Ok\r\n");
        assert_eq!(say(&mut s, "RCPT TO:<δοκιμή@παράδειγμα.δοκιμή>\r\n"), "250 2.1.5 Ok\r\n");
        say(&mut s, "DATA\r\n");
        let d = drafts(feed(&mut s, b".\r\n"));
        assert!(d[0].smtputf8);
        assert_eq!(d[0].mail_from, "jürgen@example.org");
        assert_eq!(d[0].rcpts, ["δοκιμή@παράδειγμα.δοκιμή"]);
    }

    #[test]
    fn helo_offers_no_extensions() {
        let mut s = server();
        say(&mut s, "HELO c\r\n");
        assert_eq!(say(&mut s, "MAIL FROM:<a@b.c> SIZE=10\r\n"), "555 5.5.4 Unsupported option: SIZE=10\r\n");
        assert_eq!(say(&mut s, "MAIL FROM:<a@b.c>\r\n"), "250 2.1.0 Ok\r\n");
        say(&mut s, "RCPT TO:<b@c.d>\r\n");
        // BDAT's chunk is still read (RFC 3030), so "QUIT" inside it is no command.
        assert_eq!(say(&mut s, "BDAT 4 LAST\r\n"), "");
        assert_eq!(say(&mut s, "QUIT"), "503 5.5.1 Error: send EHLO first\r\n");
        say(&mut s, "DATA\r\n");
        assert!(!drafts(feed(&mut s, b"x\r\n.\r\n"))[0].esmtp);
    }

    #[test]
    fn size_limit_at_mail_and_at_end_of_data() {
        let mut settings = SmtpSettings::new("mx.test");
        settings.max_message_size = 100;
        let mut s = SmtpServer::new(settings, false);
        say(&mut s, "EHLO c\r\n");
        assert!(say(&mut s, "EHLO c\r\n").contains("250-SIZE 100\r\n"));
        assert_eq!(
            say(&mut s, "MAIL FROM:<a@b.c> SIZE=101\r\n"),
            "552 5.3.4 Error: message size exceeds fixed limit\r\n"
        );
        assert_eq!(say(&mut s, "MAIL FROM:<a@b.c> SIZE=100\r\n"), "250 2.1.0 Ok\r\n");
        say(&mut s, "RCPT TO:<b@c.d>\r\n");
        say(&mut s, "DATA\r\n");
        // 98 octets and CR LF: exactly the limit.
        let mut exact = vec![b'x'; 98];
        exact.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(drafts(feed(&mut s, &exact))[0].content.len(), 100);
        s.message_result(Ok(&id()), &accept_all);
        say(&mut s, "MAIL FROM:<a@b.c>\r\n");
        say(&mut s, "RCPT TO:<b@c.d>\r\n");
        say(&mut s, "DATA\r\n");
        for _ in 0..1000 {
            assert!(feed(&mut s, b"0123456789\r\n").is_empty(), "content is read to its end");
        }
        assert_eq!(texts(&feed(&mut s, b".\r\n")), ["552 5.3.4 Error: message file too big\r\n"]);
        assert_eq!(s.phase(), Phase::Command);
        assert_eq!(say(&mut s, "MAIL FROM:<a@b.c>\r\n"), "250 2.1.0 Ok\r\n", "the transaction was reset");
    }

    #[test]
    fn command_line_limit_is_512_octets_with_crlf() {
        let mut s = server();
        say(&mut s, "EHLO c\r\n");
        let ok = format!("NOOP {}\r\n", "x".repeat(512 - 7));
        assert_eq!(ok.len(), 512);
        assert_eq!(say(&mut s, &ok), "250 2.0.0 Ok\r\n");
        let long = format!("NOOP {}\r\n", "x".repeat(512 - 6));
        assert_eq!(say(&mut s, &long), "500 5.5.2 Error: line too long\r\n");
        // A huge line, even in pieces, is discarded to its end and answered once.
        let mut s2 = server();
        for _ in 0..1000 {
            assert!(feed(&mut s2, &[b'A'; 1000]).is_empty());
        }
        assert_eq!(texts(&feed(&mut s2, b"\r\n")), ["500 5.5.2 Error: line too long\r\n"]);
        assert!(s2.line.capacity() <= COMMAND_LINE_MAX * 2, "memory stays bounded");
        assert_eq!(say(&mut s2, "NOOP\r\n"), "250 2.0.0 Ok\r\n");
    }

    #[test]
    fn text_line_limit_is_1000_octets_with_crlf() {
        let mut s = server();
        in_data(&mut s);
        let mut ok = vec![b'x'; 998];
        ok.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(drafts(feed(&mut s, &ok)).len(), 1);
        s.message_result(Ok(&id()), &accept_all);
        say(&mut s, "MAIL FROM:<a@b.c>\r\n");
        say(&mut s, "RCPT TO:<b@c.d>\r\n");
        say(&mut s, "DATA\r\n");
        // 998 octets after a stuffing dot: 999 on the wire, too long once stuffed again.
        let mut long = b"..".to_vec();
        long.extend_from_slice(&[b'x'; 997]);
        long.extend_from_slice(b"\r\nshort line\r\n.\r\n");
        assert_eq!(texts(&feed(&mut s, &long)), ["500 5.5.6 Error: line too long\r\n"]);
        assert_eq!(say(&mut s, "MAIL FROM:<a@b.c>\r\n"), "250 2.1.0 Ok\r\n");
    }

    #[test]
    fn recipient_limit() {
        let mut s = server();
        say(&mut s, "EHLO c\r\n");
        say(&mut s, "MAIL FROM:<a@b.c>\r\n");
        for i in 0..1000 {
            assert_eq!(say(&mut s, &format!("RCPT TO:<u{i}@example.net>\r\n")), "250 2.1.5 Ok\r\n");
        }
        for _ in 0..30 {
            // Not counted as errors: the client sends the rest in another transaction.
            assert_eq!(say(&mut s, "RCPT TO:<u1001@example.net>\r\n"), "452 4.5.3 Error: too many recipients\r\n");
        }
        say(&mut s, "DATA\r\n");
        assert_eq!(drafts(feed(&mut s, b"x\r\n.\r\n"))[0].rcpts.len(), 1000);
    }

    #[test]
    fn error_limit_disconnects() {
        let mut s = server();
        for _ in 0..19 {
            assert_eq!(say(&mut s, "BOGUS\r\n"), "500 5.5.2 Error: command not recognized\r\n");
        }
        assert_eq!(
            texts(&feed(&mut s, b"BOGUS\r\n")),
            ["500 5.5.2 Error: command not recognized\r\n", "421 4.7.0 mx.test Error: too many errors\r\n", "<close>"]
        );
        assert_eq!(s.phase(), Phase::Closed);
    }

    #[test]
    fn message_limit_per_connection() {
        let mut settings = SmtpSettings::new("mx.test");
        settings.max_messages = 2;
        let mut s = SmtpServer::new(settings, false);
        say(&mut s, "EHLO c\r\n");
        for _ in 0..2 {
            say(&mut s, "MAIL FROM:<a@b.c>\r\n");
            say(&mut s, "RCPT TO:<b@c.d>\r\n");
            say(&mut s, "DATA\r\n");
            assert_eq!(drafts(feed(&mut s, b"x\r\n.\r\n")).len(), 1);
            s.message_result(Ok(&id()), &accept_all);
        }
        assert_eq!(
            texts(&feed(&mut s, b"MAIL FROM:<a@b.c>\r\n")),
            ["421 4.7.0 mx.test Error: too many messages in this session\r\n", "<close>"]
        );
    }

    #[test]
    fn dot_unstuffing_and_lines_that_only_look_like_the_end() {
        let mut s = server();
        in_data(&mut s);
        let d = drafts(feed(&mut s, b"..leading dot\r\n..\r\n.\tx\r\nend\r\n.\r\n"));
        assert_eq!(d[0].content, b".leading dot\r\n.\r\n\tx\r\nend\r\n");
        s.message_result(Ok(&id()), &accept_all);
        say(&mut s, "MAIL FROM:<a@b.c>\r\n");
        say(&mut s, "RCPT TO:<b@c.d>\r\n");
        say(&mut s, "DATA\r\n");
        // The very first line may end the data.
        let out = feed(&mut s, b".\r\n");
        assert_eq!(drafts(out)[0].content, b"");
    }

    #[test]
    fn bare_cr_and_lf_are_normalised() {
        let mut s = server();
        in_data(&mut s);
        let d = drafts(feed(&mut s, b"a\nb\rc\r\r\nd\n\ne\r\n.\r\n"));
        assert_eq!(d[0].content, b"a\r\nb\r\nc\r\n\r\nd\r\n\r\ne\r\n");
    }

    fn smuggling_input(seq: &[u8]) -> Vec<u8> {
        let mut input = b"Subject: innocent\r\n\r\nhello".to_vec();
        input.extend_from_slice(seq);
        input.extend_from_slice(
            b"MAIL FROM:<admin@example.net>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nFrom: admin\r\n\r\nsmuggled\r\n",
        );
        input.extend_from_slice(b".\r\n");
        input
    }

    fn check_smuggled(seq: &[u8], actions: Vec<Action>) {
        let all = texts(&actions);
        let d = drafts(actions);
        assert_eq!(d.len(), 1, "{seq:?}: exactly one message, got {all:?}");
        let c = &d[0].content;
        assert!(only_crlf(c), "{seq:?}: bare CR or LF in {:?}", String::from_utf8_lossy(c));
        let text = String::from_utf8_lossy(c);
        assert!(text.starts_with("Subject: innocent\r\n\r\nhello"), "{seq:?}: {text:?}");
        assert!(
            text.contains("MAIL FROM:<admin@example.net>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"),
            "{seq:?}: {text:?}"
        );
        assert!(text.ends_with("smuggled\r\n"), "{seq:?}: {text:?}");
        assert_eq!(all.last().map(String::as_str), Some("<message>"), "{seq:?}: no reply before the result");
    }

    #[test]
    fn smuggling_sequences_are_content_in_one_piece() {
        for seq in SMUGGLING_SEQUENCES {
            let mut s = server();
            in_data(&mut s);
            check_smuggled(seq, feed(&mut s, &smuggling_input(seq)));
        }
    }

    #[test]
    fn smuggling_sequences_are_content_byte_by_byte() {
        for seq in SMUGGLING_SEQUENCES {
            let mut s = server();
            in_data(&mut s);
            let mut actions = Vec::new();
            for b in smuggling_input(seq) {
                actions.extend(feed(&mut s, &[b]));
            }
            check_smuggled(seq, actions);
        }
    }

    #[test]
    fn smuggling_sequences_are_content_for_an_authenticated_pipelining_client() {
        for seq in SMUGGLING_SEQUENCES {
            let mut s = SmtpServer::new(SmtpSettings::new("mx.test"), true);
            let mut input = b"EHLO c\r\n".to_vec();
            let mut all = feed(&mut s, &input);
            input = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n".to_vec();
            input.extend_from_slice(&smuggling_input(seq));
            all.extend(feed(&mut s, &input));
            all.retain(|a| matches!(a, Action::Message(_)));
            check_smuggled(seq, all);
        }
    }

    #[test]
    fn exact_content_for_some_fake_ends() {
        let cases: [(&[u8], &[u8]); 4] = [
            (b"a\n.\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
            (b"a\r\n.\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
            (b"a\r\n.\rb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
            (b"a\r\r\n.\r\r\nb\r\n.\r\n", b"a\r\n\r\n.\r\n\r\nb\r\n"),
        ];
        for (input, want) in cases {
            let mut s = server();
            in_data(&mut s);
            let d = drafts(feed(&mut s, input));
            assert_eq!(String::from_utf8_lossy(&d[0].content), String::from_utf8_lossy(want), "{input:?}");
        }
    }

    #[test]
    fn a_whole_session_byte_by_byte_equals_one_command_at_a_time() {
        let commands: [&[u8]; 6] = [
            b"EHLO client.test\r\n",
            b"MAIL FROM:<a@example.org> BODY=8BITMIME\r\n",
            b"RCPT TO:<b@example.net>\r\n",
            b"DATA\r\n",
            b"Subject: x\r\n\r\n..dot\r\nbody\r\n.\r\n",
            b"QUIT\r\n",
        ];
        let mut whole = server();
        let mut expected = Vec::new();
        for c in commands {
            expected.extend(feed(&mut whole, c));
            expected.extend(whole.message_result(Ok(&id()), &accept_all));
        }
        let mut bytes = server();
        let mut got = Vec::new();
        for c in commands {
            for &b in c {
                got.extend(feed(&mut bytes, &[b]));
                got.extend(bytes.message_result(Ok(&id()), &accept_all));
            }
        }
        assert_eq!(got, expected);
        assert_eq!(codes(&got), ["250", "250", "250", "354", "<message>", "250", "221", "<close>"]);
    }

    #[test]
    fn rfc2920_pipelining_gets_replies_in_order() {
        let mut s = server();
        say(&mut s, "EHLO c\r\n");
        let out = feed(&mut s, b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nRCPT TO:<bad>\r\nRCPT TO:<w@y.z>\r\nDATA\r\n");
        assert_eq!(codes(&out), ["250", "250", "501", "250", "354"]);
        let out = feed(&mut s, b"body\r\n.\r\nQUIT\r\n");
        assert_eq!(codes(&out), ["<message>"], "QUIT may follow the end of data");
        let out = s.message_result(Ok(&id()), &accept_all);
        assert_eq!(codes(&out), ["250", "221", "<close>"]);
        // QUIT split across reads.
        let mut s = server();
        in_data(&mut s);
        assert_eq!(codes(&feed(&mut s, b"x\r\n.\r\nQU")), ["<message>"]);
        assert_eq!(codes(&s.message_result(Ok(&id()), &accept_all)), ["250"]);
        assert_eq!(codes(&feed(&mut s, b"IT\r\n")), ["221", "<close>"]);
    }

    fn desynced(actions: &[Action]) -> bool {
        texts(actions)
            .ends_with(&["554 5.5.0 Error: SMTP protocol synchronization\r\n".to_string(), "<close>".to_string()])
            && !actions.iter().any(|a| matches!(a, Action::Message(_)))
    }

    #[test]
    fn pipelining_violations_by_unauthenticated_clients() {
        // Something after EHLO before its reply.
        let mut s = server();
        assert!(desynced(&feed(&mut s, b"EHLO c\r\nMAIL FROM:<a@b.c>\r\n")));
        // Any pipelining after HELO.
        let mut s = server();
        say(&mut s, "HELO c\r\n");
        assert!(desynced(&feed(&mut s, b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\n")));
        // Content sent with DATA, before the 354.
        let mut s = server();
        say(&mut s, "EHLO c\r\n");
        assert!(desynced(&feed(&mut s, b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\nSubject: x\r\n")));
        // A next transaction sent with the end of data: the message is dropped.
        let mut s = server();
        in_data(&mut s);
        assert!(desynced(&feed(&mut s, b"x\r\n.\r\nMAIL FROM:<a@b.c>\r\n")));
        assert_eq!(s.phase(), Phase::Closed);
        // Likewise after BDAT LAST.
        let mut s = server();
        say(&mut s, "EHLO c\r\n");
        say(&mut s, "MAIL FROM:<a@b.c>\r\n");
        say(&mut s, "RCPT TO:<x@y.z>\r\n");
        assert!(desynced(&feed(&mut s, b"BDAT 3 LAST\r\nx\r\nRSET\r\n")));
        // Commands after NOOP before its reply.
        let mut s = server();
        say(&mut s, "EHLO c\r\n");
        assert!(desynced(&feed(&mut s, b"NOOP\r\nNOOP\r\n")));
    }

    #[test]
    fn authenticated_clients_may_pipeline_after_the_end_of_data() {
        let mut s = SmtpServer::new(SmtpSettings::new("mx.test"), true);
        say(&mut s, "EHLO c\r\n");
        let one = b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\nfirst\r\n.\r\n";
        let two = b"MAIL FROM:<d@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\nsecond\r\n.\r\nQUIT\r\n";
        let out = feed(&mut s, &[&one[..], &two[..]].concat());
        assert_eq!(codes(&out), ["250", "250", "354", "<message>"]);
        let out = s.message_result(Ok(&id()), &accept_all);
        assert_eq!(codes(&out), ["250", "250", "250", "354", "<message>"]);
        let d = drafts(out);
        assert_eq!(d[0].mail_from, "d@b.c");
        assert_eq!(d[0].content, b"second\r\n");
        assert_eq!(codes(&s.message_result(Ok(&id()), &accept_all)), ["250", "221", "<close>"]);
    }

    #[test]
    fn bdat_chunks() {
        let mut s = server();
        say(&mut s, "EHLO c\r\n");
        let out = feed(
            &mut s,
            b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nBDAT 9\r\n.a\nb\rc\r\r\nBDAT 1\r\n\nBDAT 5 LAST\r\nDATA\r",
        );
        assert_eq!(codes(&out), ["250", "250", "250", "250", "<message>"]);
        assert_eq!(texts(&out)[2], "250 2.0.0 Ok: 9 octets received\r\n");
        // No dot handling; a CR at a chunk's end pairs with the LF at the next one's start;
        // an unfinished last line gets its CR LF.
        assert_eq!(drafts(out)[0].content, b".a\r\nb\r\nc\r\n\r\n\r\nDATA\r\n");
    }

    #[test]
    fn bdat_zero_last_and_bdat_errors() {
        let mut s = server();
        say(&mut s, "EHLO c\r\n");
        // Without a transaction the chunk is still read and not taken for commands.
        assert_eq!(texts(&feed(&mut s, b"BDAT 6\r\n")), Vec::<String>::new());
        assert_eq!(texts(&feed(&mut s, b"QUIT\r\n")), ["503 5.5.1 Error: need MAIL command\r\n"]);
        assert_eq!(say(&mut s, "BDAT x\r\n"), "501 5.5.4 Syntax: BDAT count [LAST]\r\n");
        assert_eq!(say(&mut s, "BDAT 1 FIRST\r\n"), "501 5.5.4 Syntax: BDAT count [LAST]\r\n");
        say(&mut s, "MAIL FROM:<a@b.c>\r\n");
        say(&mut s, "RCPT TO:<x@y.z>\r\n");
        assert_eq!(say(&mut s, "BDAT 3\r\nabc"), "250 2.0.0 Ok: 3 octets received\r\n");
        assert_eq!(say(&mut s, "DATA\r\n"), "503 5.5.1 Error: DATA after BDAT\r\n");
        assert_eq!(say(&mut s, "RCPT TO:<w@y.z>\r\n"), "503 5.5.1 Error: RCPT after BDAT\r\n");
        let out = feed(&mut s, b"BDAT 0 LAST\r\n");
        assert_eq!(drafts(out)[0].content, b"abc\r\n");
    }

    #[test]
    fn bdat_over_the_size_limit_fails_the_transaction() {
        let mut settings = SmtpSettings::new("mx.test");
        settings.max_message_size = 10;
        let mut s = SmtpServer::new(settings, false);
        say(&mut s, "EHLO c\r\n");
        say(&mut s, "MAIL FROM:<a@b.c>\r\n");
        say(&mut s, "RCPT TO:<x@y.z>\r\n");
        assert_eq!(say(&mut s, "BDAT 20\r\n0123456789012345678\n"), "552 5.3.4 Error: message file too big\r\n");
        assert_eq!(say(&mut s, "BDAT 2 LAST\r\nab"), "503 5.5.1 Error: need MAIL command\r\n");
    }

    #[test]
    fn starttls_resets_the_session() {
        let mut settings = SmtpSettings::new("mx.test");
        settings.starttls = true;
        let mut s = SmtpServer::new(settings, false);
        assert_eq!(say(&mut s, "STARTTLS\r\n"), "503 5.5.1 Error: send EHLO first\r\n");
        say(&mut s, "EHLO c\r\n");
        say(&mut s, "MAIL FROM:<a@b.c>\r\n");
        assert_eq!(say(&mut s, "STARTTLS\r\n"), "503 5.5.1 Error: MAIL transaction in progress\r\n");
        say(&mut s, "RSET\r\n");
        assert_eq!(texts(&feed(&mut s, b"STARTTLS\r\n")), ["220 2.0.0 Ready to start TLS\r\n", "<starttls>"]);
        assert_eq!(s.phase(), Phase::Waiting);
        assert!(feed(&mut s, b"MAIL FROM:<injected@b.c>\r\n").is_empty(), "plain text after STARTTLS is dropped");
        s.tls_established(false);
        assert_eq!(s.helo(), None);
        assert_eq!(say(&mut s, "MAIL FROM:<a@b.c>\r\n"), "503 5.5.1 Error: send HELO/EHLO first\r\n");
        let ehlo = say(&mut s, "EHLO c\r\n");
        assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
        assert_eq!(say(&mut s, "STARTTLS\r\n"), "554 5.5.1 Error: TLS already active\r\n");
    }

    #[test]
    fn starttls_with_pipelined_plain_text_is_a_violation() {
        let mut settings = SmtpSettings::new("mx.test");
        settings.starttls = true;
        let mut s = SmtpServer::new(settings, false);
        say(&mut s, "EHLO c\r\n");
        let out = feed(&mut s, b"STARTTLS\r\nMAIL FROM:<injected@b.c>\r\n");
        assert!(desynced(&out));
        assert!(!out.contains(&Action::StartTls));
    }

    /// A session after STARTTLS and EHLO, AUTH configured.
    fn tls_session_with_auth() -> SmtpServer {
        let mut settings = SmtpSettings::new("mx.test");
        settings.starttls = true;
        settings.auth = true;
        let mut s = SmtpServer::new(settings, false);
        let ehlo = say(&mut s, "EHLO c\r\n");
        assert!(!ehlo.contains("AUTH"), "AUTH offered before TLS: {ehlo}");
        assert_eq!(say(&mut s, "AUTH PLAIN AGJvYgBwdw==\r\n"), "538 5.7.11 Encryption required for requested authentication mechanism\r\n");
        feed(&mut s, b"STARTTLS\r\n");
        s.tls_established(false);
        assert!(say(&mut s, "EHLO c\r\n").contains("250-AUTH PLAIN LOGIN\r\n"));
        s
    }

    #[test]
    fn auth_plain_and_login_over_tls() {
        use base64::Engine as _;
        let b64 = |t: &str| base64::engine::general_purpose::STANDARD.encode(t);
        // PLAIN with an initial response; success lifts relay and pipelining limits.
        let mut s = tls_session_with_auth();
        let out = feed(&mut s, format!("AUTH PLAIN {}\r\n", b64("\0bob\0pw")).as_bytes());
        assert_eq!(texts(&out), ["<auth bob/pw>"]);
        assert_eq!(s.phase(), Phase::Waiting);
        assert!(feed(&mut s, b"MAIL FROM:<a@b.c>\r\n").is_empty(), "nothing is answered while the check runs");
        assert_eq!(codes(&s.auth_result(true, &accept_all)), ["235", "250"]);
        assert_eq!(s.auth_user(), Some("bob"));
        let out = feed(&mut s, b"RCPT TO:<x@y.z>\r\nDATA\r\nx\r\n.\r\nRSET\r\n");
        assert_eq!(codes(&out), ["250", "354", "<message>"]);
        assert_eq!(codes(&s.message_result(Ok(&id()), &accept_all)), ["250", "250"], "pipelined RSET after the data");
        assert_eq!(say(&mut s, "AUTH PLAIN\r\n"), "503 5.5.1 Error: already authenticated\r\n");

        // LOGIN, step by step, with a wrong password.
        let mut s = tls_session_with_auth();
        assert_eq!(say(&mut s, "AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
        assert_eq!(say(&mut s, &format!("{}\r\n", b64("alice"))), "334 UGFzc3dvcmQ6\r\n");
        assert_eq!(texts(&feed(&mut s, format!("{}\r\n", b64("nope")).as_bytes())), ["<auth alice/nope>"]);
        assert_eq!(texts(&s.auth_result(false, &accept_all)), ["535 5.7.8 Error: authentication failed\r\n"]);
        assert_eq!(s.auth_user(), None);
        // PLAIN without an initial response, cancelled; junk; another identity; bad mechanism.
        assert_eq!(say(&mut s, "AUTH PLAIN\r\n"), "334 \r\n");
        assert_eq!(say(&mut s, "*\r\n"), "501 5.7.0 Authentication aborted\r\n");
        assert_eq!(say(&mut s, "AUTH PLAIN %%%\r\n"), "501 5.5.2 Error: invalid base64 data\r\n");
        let other = format!("AUTH PLAIN {}\r\n", b64("admin\0bob\0pw"));
        assert_eq!(say(&mut s, &other), "535 5.7.8 Error: authentication failed\r\n");
        assert_eq!(say(&mut s, "AUTH CRAM-MD5\r\n"), "504 5.5.4 Error: unsupported authentication mechanism\r\n");
        // Not configured: not offered, not accepted.
        let mut s = server();
        assert!(!say(&mut s, "EHLO c\r\n").contains("AUTH"));
        assert_eq!(say(&mut s, "AUTH PLAIN AGJvYgBwdw==\r\n"), "502 5.5.1 Error: command not implemented\r\n");
    }

    #[test]
    fn certificate_authentication_lifts_pipelining_enforcement() {
        let mut settings = SmtpSettings::new("mx.test");
        settings.starttls = true;
        let mut s = SmtpServer::new(settings, false);
        say(&mut s, "EHLO c\r\n");
        feed(&mut s, b"STARTTLS\r\n");
        s.tls_established(true);
        say(&mut s, "EHLO c\r\n");
        let out = feed(&mut s, b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\nx\r\n.\r\nMAIL FROM:<a@b.c>\r\n");
        assert_eq!(codes(&out), ["250", "250", "354", "<message>"]);
        assert_eq!(codes(&s.message_result(Ok(&id()), &accept_all)), ["250", "250"]);
    }
}
