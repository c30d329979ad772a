//! The SMTP/LMTP client dialogue as a pure state machine: replies in, commands out, one
//! outcome per recipient. No sockets here; [`super::conn`] moves the bytes.
//!
//! A session is: greeting, `EHLO` (`LHLO` for LMTP), then any number of transactions. Each
//! transaction on a reused session starts with `RSET` (which also proves the idle connection
//! is still alive before anything is committed); then, when configured and advertised,
//! `XCLIENT` with the original client's address and HELO, answered by a new greeting and a new
//! `EHLO` (Postfix resets the session after XCLIENT); then `MAIL`, `RCPT`s and `DATA` — in one
//! write when the server offers PIPELINING (RFC 2920), replies matched in order — and the
//! dot-stuffed content. LMTP (RFC 2033) answers the end of data once per accepted recipient.
use std::{collections::VecDeque, fmt::Write as _, mem, net::IpAddr, time::Duration};

use super::reply::{self, Reply};

/// Which protocol the back-ends speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Smtp,
    Lmtp,
}

/// What the back-end announced in its EHLO/LHLO reply that changes what we send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    pub pipelining: bool,
    /// `SIZE` with its limit (0: no fixed limit).
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    /// The attribute names listed after `XCLIENT`, upper-case; `None` when not offered.
    pub xclient: Option<Vec<String>>,
}

impl Extensions {
    /// Reads the EHLO reply: the first line is the server's name, each further line one
    /// keyword and its parameters (RFC 5321 §4.1.1.1). Unknown keywords are ignored.
    pub fn parse(ehlo: &Reply) -> Extensions {
        let mut ext = Extensions::default();
        for line in ehlo.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else { continue };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => ext.pipelining = true,
                "SIZE" => ext.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => ext.eight_bit_mime = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                "XCLIENT" => ext.xclient = Some(words.map(str::to_ascii_uppercase).collect()),
                _ => {}
            }
        }
        ext
    }
}

/// The original client, passed to the back-end with XCLIENT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XclientInfo {
    /// `None` (or an unspecified address) for mail we generated ourselves (DSNs).
    pub addr: Option<IpAddr>,
    pub helo: String,
}

/// One message to hand over: the envelope as the back-end must see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// Reverse-path without brackets; empty for `<>`.
    pub mail_from: String,
    pub rcpts: Vec<String>,
    pub eight_bit: bool,
    pub smtputf8: bool,
    pub size: u64,
    /// Sent only when [`Client::new`] was told to use XCLIENT and the server offers it.
    pub xclient: Option<XclientInfo>,
}

/// What became of one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `2xx` after the data: the back-end has it.
    Delivered(Reply),
    /// `5xx`: it will never be accepted; bounce.
    Failed(Reply),
    /// `4xx`, a broken connection, a timeout: try again later.
    Deferred(Reply),
}

impl Outcome {
    /// The outcome a final reply to a recipient means.
    pub fn of(reply: Reply) -> Outcome {
        if reply.is_positive() {
            Outcome::Delivered(reply)
        } else if reply.is_permanent() {
            Outcome::Failed(reply)
        } else {
            Outcome::Deferred(reply)
        }
    }

    pub fn reply(&self) -> &Reply {
        match self {
            Outcome::Delivered(r) | Outcome::Failed(r) | Outcome::Deferred(r) => r,
        }
    }
}

/// A finished transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// One per recipient of the [`Transaction`], same order.
    pub outcomes: Vec<Outcome>,
    /// `MAIL` was sent. When false nothing reached the back-end (the `RSET` of a reused
    /// session failed, say), so the caller may retry on a fresh connection at no risk.
    pub sent_mail: bool,
}

/// The reply being waited for; picks the RFC 5321 §4.5.3.2 timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    Greeting,
    Ehlo,
    Xclient,
    Rset,
    Mail,
    Rcpt,
    /// The `354` to `DATA`.
    DataStart,
    /// The reply(ies) after the final dot.
    DataEnd,
}

/// Per-reply timeouts. Defaults from RFC 5321 §4.5.3.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    /// Greeting, and the replies to EHLO, XCLIENT and RSET.
    pub greeting: Duration,
    pub mail: Duration,
    pub rcpt: Duration,
    pub data_start: Duration,
    /// Each write of the content.
    pub data_block: Duration,
    pub data_end: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        let min = |m: u64| Duration::from_secs(60 * m);
        Timeouts {
            connect: Duration::from_secs(30),
            greeting: min(5),
            mail: min(5),
            rcpt: min(5),
            data_start: min(2),
            data_block: min(3),
            data_end: min(10),
        }
    }
}

impl Timeouts {
    pub fn reply(&self, wait: Wait) -> Duration {
        match wait {
            Wait::Greeting | Wait::Ehlo | Wait::Xclient | Wait::Rset => self.greeting,
            Wait::Mail => self.mail,
            Wait::Rcpt => self.rcpt,
            Wait::DataStart => self.data_start,
            Wait::DataEnd => self.data_end,
        }
    }
}

/// What the I/O side does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write all of this, then poll again.
    Send(Vec<u8>),
    /// Read, give the bytes to [`Client::receive`], poll again.
    Receive(Wait),
    /// Ready for [`Client::begin`].
    Idle,
    /// The transaction is over.
    Done(Finished),
    /// The session is unusable (the reason); close it. Comes after the `Done` of a
    /// transaction it interrupted.
    Broken(String),
}

/// [`Client::begin`] called while a session is not idle: a bug in the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the back-end session is not ready for a new transaction")]
pub struct NotIdle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Greeting,
    Ehlo {
        in_txn: bool,
    },
    Xclient,
    Rset,
    Mail,
    Rcpt(usize),
    Data,
    /// LMTP: the reply for this recipient; SMTP: `None`, one reply for all.
    End(Option<usize>),
    /// The reply to a lone dot sent after an unwanted `354`; its content does not matter.
    Discard,
}

impl Expect {
    fn wait(self) -> Wait {
        match self {
            Expect::Greeting => Wait::Greeting,
            Expect::Ehlo { .. } => Wait::Ehlo,
            Expect::Xclient => Wait::Xclient,
            Expect::Rset => Wait::Rset,
            Expect::Mail => Wait::Mail,
            Expect::Rcpt(_) => Wait::Rcpt,
            Expect::Data => Wait::DataStart,
            Expect::End(_) | Expect::Discard => Wait::DataEnd,
        }
    }
}

struct Txn {
    t: Transaction,
    /// The dot-stuffed content with its terminating `.` line.
    body: Vec<u8>,
    outcomes: Vec<Option<Outcome>>,
    accepted: Vec<usize>,
    mail_failed: bool,
    sent_mail: bool,
    pipelined: bool,
}

/// One client session with a back-end. See the module documentation.
pub struct Client {
    protocol: Protocol,
    helo_name: String,
    use_xclient: bool,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    expect: VecDeque<Expect>,
    ext: Extensions,
    ready: bool,
    /// A transaction ran: the next starts with RSET.
    used: bool,
    txn: Option<Txn>,
    done: Option<Finished>,
    broken: Option<String>,
    /// XCLIENT changed who the back-end thinks we are: the session now speaks for one
    /// client and is not reused for another (Postfix would refuse a second XCLIENT from the
    /// impersonated address anyway).
    impersonating: bool,
}

impl Client {
    /// A session about to read the greeting of a just-opened connection.
    pub fn new(protocol: Protocol, helo_name: &str, use_xclient: bool) -> Client {
        Client {
            protocol,
            helo_name: helo_name.to_string(),
            use_xclient,
            inbuf: Vec::new(),
            out: Vec::new(),
            expect: VecDeque::from([Expect::Greeting]),
            ext: Extensions::default(),
            ready: false,
            used: false,
            txn: None,
            done: None,
            broken: None,
            impersonating: false,
        }
    }

    /// Whether another transaction may run on this session (see `impersonating`).
    pub fn reusable(&self) -> bool {
        !self.impersonating
    }

    /// What the back-end offered in its last EHLO/LHLO reply.
    pub fn extensions(&self) -> &Extensions {
        &self.ext
    }

    /// Bytes read from the back-end.
    pub fn receive(&mut self, data: &[u8]) {
        if self.broken.is_none() {
            self.inbuf.extend_from_slice(data);
        }
    }

    /// Starts a transaction; `content` is the stored message (CRLF lines, not dot-stuffed).
    pub fn begin(&mut self, t: Transaction, content: &[u8]) -> Result<(), NotIdle> {
        if !self.ready || self.txn.is_some() || self.done.is_some() || self.broken.is_some() {
            return Err(NotIdle);
        }
        let n = t.rcpts.len();
        let pipelined = self.ext.pipelining;
        let mut txn = Txn {
            t,
            body: Vec::new(),
            outcomes: vec![None; n],
            accepted: Vec::new(),
            mail_failed: false,
            sent_mail: false,
            pipelined,
        };
        if !clean(&txn.t.mail_from) {
            let r = Reply::local(553, "5.1.7 the sender address contains control characters or brackets");
            txn.outcomes.iter_mut().for_each(|o| *o = Some(Outcome::Failed(r.clone())));
        }
        for (o, rcpt) in txn.outcomes.iter_mut().zip(&txn.t.rcpts) {
            if o.is_none() && !clean(rcpt) {
                *o = Some(Outcome::Failed(Reply::local(
                    553,
                    "5.1.3 the recipient address contains control characters or brackets",
                )));
            }
        }
        txn.body = dot_stuff(content);
        self.ready = false;
        self.txn = Some(txn);
        if self.used {
            self.send_line("RSET");
            self.expect.push_back(Expect::Rset);
        } else {
            self.start_txn();
        }
        Ok(())
    }

    /// The I/O failed or timed out (the reason): the session is over. Recipients of an
    /// interrupted transaction are deferred; the result comes from the next [`poll`](Self::poll)
    /// as [`Step::Done`].
    pub fn abort(&mut self, reason: &str) {
        self.fail(reason.to_string());
    }

    /// What to do now. See [`Step`].
    pub fn poll(&mut self) -> Step {
        loop {
            if let Some(done) = self.done.take() {
                return Step::Done(done);
            }
            if let Some(reason) = &self.broken {
                return Step::Broken(reason.clone());
            }
            if !self.out.is_empty() {
                return Step::Send(mem::take(&mut self.out));
            }
            if let Some(&front) = self.expect.front() {
                match reply::parse(&self.inbuf) {
                    Err(e) => self.fail(e.to_string()),
                    Ok(None) => return Step::Receive(front.wait()),
                    Ok(Some((reply, len))) => {
                        self.inbuf.drain(..len.min(self.inbuf.len()));
                        self.expect.pop_front();
                        self.handle(front, reply);
                    }
                }
                continue;
            }
            if self.ready {
                return Step::Idle;
            }
            // Unreachable by construction; a broken session is the safe answer.
            self.fail("client state machine has nothing to do".into());
        }
    }

    fn handle(&mut self, e: Expect, reply: Reply) {
        if reply.code / 100 == 3 && e != Expect::Data {
            return self.fail(format!("unexpected reply {reply}"));
        }
        match e {
            Expect::Greeting if reply.is_positive() => self.send_ehlo(false),
            Expect::Greeting => self.fail(format!("greeting: {reply}")),
            Expect::Ehlo { in_txn } if reply.is_positive() => {
                self.ext = Extensions::parse(&reply);
                if in_txn { self.send_envelope() } else { self.ready = true }
            }
            Expect::Ehlo { .. } => self.fail(format!("{}: {reply}", self.hello_verb())),
            Expect::Rset if reply.is_positive() => self.start_txn(),
            Expect::Rset => self.fail(format!("RSET: {reply}")),
            Expect::Xclient if reply.is_positive() => {
                // Greet again as the original client, as Postfix's XCLIENT_README does: an
                // EHLO with our own name would replace the HELO name XCLIENT just set.
                self.impersonating = true;
                let helo = self.txn.as_ref().and_then(|t| t.t.xclient.as_ref()).map(|x| x.helo.clone()).unwrap_or_default();
                let name = if helo.is_empty() || !helo.bytes().all(|b| b.is_ascii_graphic()) { self.helo_name.clone() } else { helo };
                let line = format!("{} {name}", self.hello_verb());
                self.send_line(&line);
                self.expect.push_back(Expect::Ehlo { in_txn: true });
            }
            // Our configuration or the back-end's authorisation is wrong, not the recipients:
            // defer them all, whatever the code, and leave the session usable.
            Expect::Xclient => self.finish_all(Outcome::Deferred(reply)),
            Expect::Mail => self.on_mail(reply),
            Expect::Rcpt(i) => self.on_rcpt(i, reply),
            Expect::Data => self.on_data(reply),
            Expect::End(None) => {
                if let Some(txn) = &mut self.txn {
                    for &i in &txn.accepted {
                        set(&mut txn.outcomes, i, Outcome::of(reply.clone()));
                    }
                }
                self.finish();
            }
            Expect::End(Some(i)) => {
                if let Some(txn) = &mut self.txn {
                    set(&mut txn.outcomes, i, Outcome::of(reply));
                }
                if !matches!(self.expect.front(), Some(Expect::End(_))) {
                    self.finish();
                }
            }
            Expect::Discard => self.finish(),
        }
    }

    fn on_mail(&mut self, reply: Reply) {
        let Some(txn) = &mut self.txn else { return };
        if reply.is_positive() {
            if !txn.pipelined {
                self.next_rcpt(0);
            }
            return;
        }
        txn.mail_failed = true;
        let o = Outcome::of(reply);
        for slot in txn.outcomes.iter_mut().filter(|o| o.is_none()) {
            *slot = Some(o.clone());
        }
        if !txn.pipelined {
            self.finish();
        }
    }

    fn on_rcpt(&mut self, i: usize, reply: Reply) {
        let Some(txn) = &mut self.txn else { return };
        if txn.mail_failed {
            return;
        }
        if reply.is_positive() {
            txn.accepted.push(i);
        } else {
            set(&mut txn.outcomes, i, Outcome::of(reply));
        }
        if !txn.pipelined {
            self.next_rcpt(i + 1);
        }
    }

    /// Non-pipelined: sends the first recipient from `from` not already failed locally, or
    /// DATA once all are sent, or ends the transaction when none was accepted.
    fn next_rcpt(&mut self, from: usize) {
        let Some(txn) = &self.txn else { return };
        let next = (from..txn.t.rcpts.len()).find(|&i| txn.outcomes.get(i).is_some_and(Option::is_none));
        match next {
            Some(i) => {
                let line = format!("RCPT TO:<{}>", txn.t.rcpts.get(i).map_or("", String::as_str));
                self.send_line(&line);
                self.expect.push_back(Expect::Rcpt(i));
            }
            None if txn.accepted.is_empty() => self.finish(),
            None => {
                self.send_line("DATA");
                self.expect.push_back(Expect::Data);
            }
        }
    }

    fn on_data(&mut self, reply: Reply) {
        let lmtp = self.protocol == Protocol::Lmtp;
        let Some(txn) = &mut self.txn else { return };
        if reply.code == 354 {
            if txn.mail_failed || txn.accepted.is_empty() {
                // RFC 2920 §3.1: the pipelined DATA was accepted although nothing else was;
                // an empty message ends it and its reply is meaningless.
                self.out.extend_from_slice(b".\r\n");
                self.expect.push_back(Expect::Discard);
            } else {
                self.out.append(&mut txn.body);
                if lmtp {
                    self.expect.extend(txn.accepted.iter().map(|&i| Expect::End(Some(i))));
                } else {
                    self.expect.push_back(Expect::End(None));
                }
            }
            return;
        }
        if reply.is_positive() {
            return self.fail(format!("DATA answered with {reply} instead of 354"));
        }
        if !txn.mail_failed {
            for &i in &txn.accepted {
                set(&mut txn.outcomes, i, Outcome::of(reply.clone()));
            }
        }
        self.finish();
    }

    fn start_txn(&mut self) {
        let Some(txn) = &self.txn else { return };
        if let (true, Some(info), Some(attrs)) = (self.use_xclient, &txn.t.xclient, &self.ext.xclient) {
            let line = xclient_command(info, attrs);
            self.send_line(&line);
            self.expect.push_back(Expect::Xclient);
        } else {
            self.send_envelope();
        }
    }

    fn send_envelope(&mut self) {
        let ext = self.ext.clone();
        let Some(txn) = &mut self.txn else { return };
        txn.pipelined = ext.pipelining;
        if txn.outcomes.iter().all(Option::is_some) {
            return self.finish();
        }
        if txn.t.smtputf8 && !ext.smtputf8 {
            let r = Reply::local(553, "5.6.7 the message needs SMTPUTF8, which the back-end does not offer");
            return self.finish_all(Outcome::Failed(r));
        }
        if let Some(limit) = ext.size
            && limit > 0
            && txn.t.size > limit
        {
            let r = Reply::local(
                552,
                format!("5.3.4 message of {} bytes exceeds the back-end's limit of {limit}", txn.t.size),
            );
            return self.finish_all(Outcome::Failed(r));
        }
        let mut mail = format!("MAIL FROM:<{}>", txn.t.mail_from);
        if ext.size.is_some() {
            let _ = write!(mail, " SIZE={}", txn.t.size);
        }
        // Without 8BITMIME the content goes as it is, as Postfix does by default: the back-ends
        // are our own servers, and refusing or downgrading would lose more than it protects.
        if txn.t.eight_bit && ext.eight_bit_mime {
            mail.push_str(" BODY=8BITMIME");
        }
        if txn.t.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        txn.sent_mail = true;
        let mut lines = vec![(mail, Expect::Mail)];
        if txn.pipelined {
            for (i, rcpt) in txn.t.rcpts.iter().enumerate() {
                if txn.outcomes.get(i).is_some_and(Option::is_none) {
                    lines.push((format!("RCPT TO:<{rcpt}>"), Expect::Rcpt(i)));
                }
            }
            lines.push(("DATA".to_string(), Expect::Data));
        }
        for (line, e) in lines {
            self.send_line(&line);
            self.expect.push_back(e);
        }
    }

    fn send_ehlo(&mut self, in_txn: bool) {
        let line = format!("{} {}", self.hello_verb(), self.helo_name);
        self.send_line(&line);
        self.expect.push_back(Expect::Ehlo { in_txn });
    }

    fn hello_verb(&self) -> &'static str {
        match self.protocol {
            Protocol::Smtp => "EHLO",
            Protocol::Lmtp => "LHLO",
        }
    }

    fn send_line(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    fn finish_all(&mut self, outcome: Outcome) {
        if let Some(txn) = &mut self.txn {
            for slot in txn.outcomes.iter_mut().filter(|o| o.is_none()) {
                *slot = Some(outcome.clone());
            }
        }
        self.finish();
    }

    fn finish(&mut self) {
        if let Some(txn) = self.txn.take() {
            let missing = Reply::local(451, "4.4.2 no reply from the back-end");
            let outcomes =
                txn.outcomes.into_iter().map(|o| o.unwrap_or_else(|| Outcome::Deferred(missing.clone()))).collect();
            self.done = Some(Finished { outcomes, sent_mail: txn.sent_mail });
        }
        self.used = true;
        self.ready = self.broken.is_none();
    }

    fn fail(&mut self, reason: String) {
        let r = Reply::local(451, format!("4.4.2 back-end session failed: {reason}"));
        self.broken = Some(reason);
        self.finish_all(Outcome::Deferred(r));
        self.expect.clear();
        self.out.clear();
        self.ready = false;
    }
}

fn set(outcomes: &mut [Option<Outcome>], i: usize, o: Outcome) {
    if let Some(slot) = outcomes.get_mut(i) {
        *slot = Some(o);
    }
}

/// An address that cannot break the command line it is put in.
fn clean(address: &str) -> bool {
    !address.bytes().any(|b| b < 0x20 || b == 0x7f || b == b'<' || b == b'>')
}

/// The content as it goes on the wire after `354`: a `.` doubled at the start of every line
/// (RFC 5321 §4.5.2), any bare LF made CRLF (so no back-end sees a line end we did not
/// count), a final CRLF if missing, then the `.` line.
pub fn dot_stuff(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + content.len() / 64 + 8);
    let mut line_start = true;
    let mut prev = 0u8;
    for &b in content {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        line_start = b == b'\n';
        prev = b;
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// `XCLIENT` with those of ADDR, NAME, HELO and PROTO the server listed, values as xtext.
/// NAME is `[UNAVAILABLE]`: we do not look up the client's name, and a stale or forged one
/// would be worse than none.
pub fn xclient_command(info: &XclientInfo, offered: &[String]) -> String {
    let addr = match info.addr.map(|a| a.to_canonical()) {
        Some(a) if a.is_unspecified() => "[UNAVAILABLE]".to_string(),
        None => "[UNAVAILABLE]".to_string(),
        Some(IpAddr::V4(a)) => a.to_string(),
        Some(IpAddr::V6(a)) => format!("IPV6:{a}"),
    };
    let helo = if info.helo.is_empty() { "[UNAVAILABLE]".to_string() } else { xtext(&info.helo) };
    let mut line = String::from("XCLIENT");
    for (name, value) in
        [("ADDR", addr.as_str()), ("NAME", "[UNAVAILABLE]"), ("HELO", helo.as_str()), ("PROTO", "ESMTP")]
    {
        if offered.iter().any(|o| o == name) {
            let _ = write!(line, " {name}={value}");
        }
    }
    line
}

/// RFC 3461 §4 xtext: `+`, `=` and anything outside `!`..`~` as `+XX`.
fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "+{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `reply` (may be empty), then collects what the client sends until it waits.
    fn exchange(c: &mut Client, reply: &str) -> (String, Step) {
        c.receive(reply.as_bytes());
        let mut sent = String::new();
        loop {
            match c.poll() {
                Step::Send(b) => sent.push_str(&String::from_utf8_lossy(&b)),
                other => return (sent, other),
            }
        }
    }

    const EHLO_FULL: &str = "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 XCLIENT ADDR NAME HELO PROTO\r\n";
    const EHLO_PLAIN: &str = "250-mx.test\r\n250 8BITMIME\r\n";

    fn ready(protocol: Protocol, ehlo: &str, xclient: bool) -> Client {
        let mut c = Client::new(protocol, "relay.test", xclient);
        assert_eq!(c.poll(), Step::Receive(Wait::Greeting));
        let (sent, _) = exchange(&mut c, "220 mx.test ESMTP\r\n");
        assert_eq!(sent, if protocol == Protocol::Lmtp { "LHLO relay.test\r\n" } else { "EHLO relay.test\r\n" });
        assert_eq!(exchange(&mut c, ehlo), (String::new(), Step::Idle));
        c
    }

    fn txn(rcpts: &[&str]) -> Transaction {
        Transaction {
            mail_from: "a@src.test".into(),
            rcpts: rcpts.iter().map(|r| r.to_string()).collect(),
            eight_bit: true,
            smtputf8: false,
            size: 20,
            xclient: Some(XclientInfo { addr: Some("2001:db8::7".parse().unwrap()), helo: "client helo".into() }),
        }
    }

    fn done(step: Step) -> Finished {
        match step {
            Step::Done(f) => f,
            other => panic!("expected Done, got {other:?}"),
        }
    }

    fn codes(f: &Finished) -> Vec<(char, u16)> {
        f.outcomes
            .iter()
            .map(|o| match o {
                Outcome::Delivered(r) => ('D', r.code),
                Outcome::Failed(r) => ('F', r.code),
                Outcome::Deferred(r) => ('T', r.code),
            })
            .collect()
    }

    #[test]
    fn pipelined_smtp_sends_the_envelope_in_one_write_and_matches_replies_in_order() {
        let mut c = ready(Protocol::Smtp, EHLO_FULL, false);
        c.begin(txn(&["x@d.test", "y@d.test", "z@d.test"]), b"Subject: t\r\n\r\nhi\r\n").unwrap();
        let (sent, step) = exchange(&mut c, "");
        assert_eq!(
            sent,
            "MAIL FROM:<a@src.test> SIZE=20 BODY=8BITMIME\r\nRCPT TO:<x@d.test>\r\nRCPT TO:<y@d.test>\r\nRCPT TO:<z@d.test>\r\nDATA\r\n"
        );
        assert_eq!(step, Step::Receive(Wait::Mail));
        // Replies may arrive split anywhere and several at once.
        let (sent, _) = exchange(&mut c, "250 ok\r\n250 ok\r\n550 5.1.1 no such user\r\n45");
        assert_eq!(sent, "");
        let (sent, step) = exchange(&mut c, "1 4.2.1 busy\r\n354 go\r\n");
        assert_eq!(sent, "Subject: t\r\n\r\nhi\r\n.\r\n");
        assert_eq!(step, Step::Receive(Wait::DataEnd));
        let f = done(exchange(&mut c, "250 2.0.0 queued as X\r\n").1);
        assert_eq!(codes(&f), [('D', 250), ('F', 550), ('T', 451)]);
        assert_eq!(f.outcomes[0].reply().to_string(), "250 2.0.0 queued as X");
        assert_eq!(c.poll(), Step::Idle);
        // The next transaction on this session starts with RSET, alone.
        c.begin(txn(&["x@d.test"]), b"x\r\n").unwrap();
        assert_eq!(exchange(&mut c, ""), ("RSET\r\n".into(), Step::Receive(Wait::Rset)));
        assert!(exchange(&mut c, "250 ok\r\n").0.starts_with("MAIL FROM:"));
    }

    #[test]
    fn without_pipelining_each_command_waits_for_its_reply() {
        let mut c = ready(Protocol::Smtp, EHLO_PLAIN, false);
        c.begin(txn(&["x@d.test", "y@d.test"]), b"hi\r\n").unwrap();
        assert_eq!(
            exchange(&mut c, ""),
            ("MAIL FROM:<a@src.test> BODY=8BITMIME\r\n".into(), Step::Receive(Wait::Mail))
        );
        assert_eq!(exchange(&mut c, "250 ok\r\n"), ("RCPT TO:<x@d.test>\r\n".into(), Step::Receive(Wait::Rcpt)));
        assert_eq!(exchange(&mut c, "550 no\r\n"), ("RCPT TO:<y@d.test>\r\n".into(), Step::Receive(Wait::Rcpt)));
        assert_eq!(exchange(&mut c, "250 ok\r\n"), ("DATA\r\n".into(), Step::Receive(Wait::DataStart)));
        assert_eq!(exchange(&mut c, "354 go\r\n").0, "hi\r\n.\r\n");
        let f = done(exchange(&mut c, "250 ok\r\n").1);
        assert_eq!(codes(&f), [('F', 550), ('D', 250)]);
    }

    #[test]
    fn rejected_mail_from_applies_to_every_recipient_and_no_data_is_sent() {
        let mut c = ready(Protocol::Smtp, EHLO_FULL, false);
        c.begin(txn(&["x@d.test", "y@d.test"]), b"hi\r\n").unwrap();
        exchange(&mut c, "");
        // A server that wrongly accepts the pipelined DATA gets a lone dot, not the message.
        let (sent, step) = exchange(&mut c, "452 4.3.1 full\r\n503 no\r\n503 no\r\n354 go\r\n");
        assert_eq!(sent, ".\r\n");
        assert_eq!(step, Step::Receive(Wait::DataEnd));
        let f = done(exchange(&mut c, "250 ok\r\n").1);
        assert_eq!(codes(&f), [('T', 452), ('T', 452)]);
        assert!(f.sent_mail);
    }

    #[test]
    fn all_recipients_refused_and_data_refused_ends_without_content() {
        let mut c = ready(Protocol::Smtp, EHLO_FULL, false);
        c.begin(txn(&["x@d.test"]), b"hi\r\n").unwrap();
        exchange(&mut c, "");
        let (sent, step) = exchange(&mut c, "250 ok\r\n550 5.1.1 unknown\r\n554 5.5.1 no valid recipients\r\n");
        assert_eq!(sent, "");
        assert_eq!(codes(&done(step)), [('F', 550)]);
    }

    #[test]
    fn lmtp_gives_one_reply_per_accepted_recipient_after_the_data() {
        let mut c = ready(Protocol::Lmtp, "250-mx.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n", false);
        c.begin(txn(&["a@d.test", "b@d.test", "c@d.test", "d@d.test"]), b"hi\r\n").unwrap();
        exchange(&mut c, "");
        let (sent, _) = exchange(&mut c, "250 ok\r\n250 ok\r\n250 ok\r\n550 5.1.1 no\r\n250 ok\r\n354 go\r\n");
        assert_eq!(sent, "hi\r\n.\r\n");
        // a, b, d accepted: three replies, in that order.
        assert_eq!(exchange(&mut c, "250 2.0.0 a saved\r\n452 4.2.2 b over quota\r\n").1, Step::Receive(Wait::DataEnd));
        let f = done(exchange(&mut c, "552 5.2.2 d over quota for good\r\n").1);
        assert_eq!(codes(&f), [('D', 250), ('T', 452), ('F', 550), ('F', 552)]);
    }

    #[test]
    fn lmtp_connection_lost_after_some_replies_keeps_those_and_defers_the_rest() {
        let mut c = ready(Protocol::Lmtp, "250-mx.test\r\n250 PIPELINING\r\n", false);
        c.begin(txn(&["a@d.test", "b@d.test"]), b"hi\r\n").unwrap();
        exchange(&mut c, "250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n250 a saved\r\n");
        c.abort("connection reset");
        let f = done(c.poll());
        assert_eq!(codes(&f), [('D', 250), ('T', 451)]);
        assert!(matches!(c.poll(), Step::Broken(r) if r == "connection reset"));
    }

    #[test]
    fn dot_stuffing_doubles_leading_dots_only() {
        let content = b".\r\nhead\r\n..\r\na.b\r\n.x\r\nlast";
        assert_eq!(dot_stuff(content), b"..\r\nhead\r\n...\r\na.b\r\n..x\r\nlast\r\n.\r\n");
        assert_eq!(dot_stuff(b"bare\nlf\n.dot\n"), b"bare\r\nlf\r\n..dot\r\n.\r\n");
        let mut c = ready(Protocol::Smtp, EHLO_FULL, false);
        c.begin(txn(&["x@d.test"]), b"A\r\n.\r\n..\r\n").unwrap();
        exchange(&mut c, "");
        assert_eq!(exchange(&mut c, "250 ok\r\n250 ok\r\n354 go\r\n").0, "A\r\n..\r\n...\r\n.\r\n");
    }

    #[test]
    fn xclient_passes_the_original_client_then_greets_again() {
        let mut c = ready(Protocol::Smtp, EHLO_FULL, true);
        c.begin(txn(&["x@d.test"]), b"hi\r\n").unwrap();
        let (sent, step) = exchange(&mut c, "");
        assert_eq!(sent, "XCLIENT ADDR=IPV6:2001:db8::7 NAME=[UNAVAILABLE] HELO=client+20helo PROTO=ESMTP\r\n");
        assert_eq!(step, Step::Receive(Wait::Xclient));
        // The HELO "client helo" has a space: not a usable EHLO argument, so ours is used.
        assert_eq!(exchange(&mut c, "220 mx.test ESMTP\r\n").0, "EHLO relay.test\r\n");
        assert!(exchange(&mut c, EHLO_FULL).0.starts_with("MAIL FROM:<a@src.test>"));
        assert!(!c.reusable(), "a session that impersonated one client is not reused");
        // A usable HELO name: the new greeting carries it, so the back-end keeps it.
        let mut c = ready(Protocol::Smtp, EHLO_FULL, true);
        let mut t = txn(&["x@d.test"]);
        t.xclient = Some(XclientInfo { addr: Some("198.18.0.1".parse().unwrap()), helo: "client.example.com".into() });
        c.begin(t, b"hi\r\n").unwrap();
        exchange(&mut c, "");
        assert_eq!(exchange(&mut c, "220 mx.test ESMTP\r\n").0, "EHLO client.example.com\r\n");
        // IPv4 (also when mapped into IPv6), and only the attributes the server offers.
        let info = XclientInfo { addr: Some("::ffff:192.0.2.1".parse().unwrap()), helo: String::new() };
        assert_eq!(
            xclient_command(&info, &["ADDR".into(), "HELO".into()]),
            "XCLIENT ADDR=192.0.2.1 HELO=[UNAVAILABLE]"
        );
    }

    #[test]
    fn xclient_is_not_sent_when_not_offered_and_refusal_defers() {
        let mut c = ready(Protocol::Smtp, EHLO_PLAIN, true);
        c.begin(txn(&["x@d.test"]), b"hi\r\n").unwrap();
        assert!(exchange(&mut c, "").0.starts_with("MAIL FROM:"));
        let mut c = ready(Protocol::Smtp, EHLO_FULL, true);
        c.begin(txn(&["x@d.test"]), b"hi\r\n").unwrap();
        exchange(&mut c, "");
        let f = done(exchange(&mut c, "550 5.7.0 insufficient authorization\r\n").1);
        assert_eq!(codes(&f), [('T', 550)]);
        assert!(!f.sent_mail);
        assert_eq!(c.poll(), Step::Idle);
    }

    #[test]
    fn smtputf8_message_fails_permanently_on_a_server_without_it() {
        let mut c = ready(Protocol::Smtp, EHLO_PLAIN, false);
        let mut t = txn(&["ü@d.test", "y@d.test"]);
        t.smtputf8 = true;
        c.begin(t, b"hi\r\n").unwrap();
        let (sent, step) = exchange(&mut c, "");
        assert_eq!(sent, "");
        let f = done(step);
        assert_eq!(codes(&f), [('F', 553), ('F', 553)]);
        assert_eq!(f.outcomes[0].reply().enhanced_status(), Some("5.6.7"));
        // With SMTPUTF8 offered the parameter is sent.
        let mut c = ready(Protocol::Smtp, EHLO_FULL, false);
        let mut t = txn(&["ü@d.test"]);
        t.smtputf8 = true;
        c.begin(t, b"hi\r\n").unwrap();
        assert!(exchange(&mut c, "").0.starts_with("MAIL FROM:<a@src.test> SIZE=20 BODY=8BITMIME SMTPUTF8\r\n"));
    }

    #[test]
    fn broken_greeting_and_garbage_break_the_session() {
        let mut c = Client::new(Protocol::Smtp, "relay.test", false);
        assert!(matches!(exchange(&mut c, "421 4.3.2 shutting down\r\n").1, Step::Broken(r) if r.contains("421")));
        let mut c = ready(Protocol::Smtp, EHLO_FULL, false);
        c.begin(txn(&["x@d.test"]), b"hi\r\n").unwrap();
        exchange(&mut c, "");
        let f = done(exchange(&mut c, "HTTP/1.0 400\r\n").1);
        assert_eq!(codes(&f), [('T', 451)]);
        assert!(matches!(c.poll(), Step::Broken(_)));
        assert_eq!(c.begin(txn(&["x@d.test"]), b""), Err(NotIdle));
    }
}
