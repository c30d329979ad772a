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
}

impl SmtpSettings {
    /// Defaults close to Postfix's: 10 240 000 octets, 1000 recipients, 20 errors.
    pub fn new(hostname: impl Into<String>) -> SmtpSettings {
        SmtpSettings {
            hostname: hostname.into(),
            max_message_size: 10_240_000,
            max_recipients: 1000,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Command,
    Data,
    /// Reading a BDAT chunk; `rejected` chunks are read and discarded (RFC 3030 §2).
    Chunk { remaining: u64, size: u64, last: bool, rejected: Option<ChunkReject> },
    AwaitingResult,
    AwaitingTls,
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
        }
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
            Mode::AwaitingResult | Mode::AwaitingTls => Phase::Waiting,
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
                Mode::AwaitingResult => {
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
        let Ok(text) = std::str::from_utf8(line) else {
            self.error(out, 500, "5.5.2 Error: bad UTF-8 syntax");
            return;
        };
        let (verb, arg) = text.split_once(' ').unwrap_or((text, ""));
        let verb = verb.to_ascii_uppercase();
        if !self.authenticated
            && !rest.is_empty()
            && verb != "QUIT"
            && (!self.esmtp || !pipelinable(&verb))
        {
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
            "EXPN" | "AUTH" => self.error(out, 502, "5.5.1 Error: command not implemented"),
            "HELP" => self.reply(out, 214, "2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY STARTTLS"),
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
            Ok(Address::Postmaster) => return self.error(out, 501, "5.1.7 Bad sender address syntax: malformed address"),
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
        literal
            .strip_suffix(']')
            .is_some_and(|l| !l.is_empty() && l.bytes().all(|b| matches!(b, 33..=90 | 94..=126)))
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
