//! SMTP client dialogue: greeting, EHLO, then per message MAIL, RCPT×n, DATA, body; QUIT.
//! One command at a time (no PIPELINING), as smtp-source does by default, so the two are
//! comparable.
use super::{Dialogue, ErrorKind, Event, ProtoError, Step};

/// Parameters of an SMTP session.
#[derive(Debug, Clone)]
pub struct SmtpParams {
    pub helo: String,
    pub from: String,
    pub to: String,
    pub rcpts: u32,
    pub messages: u32,
    /// The message (headers and body), dot-stuffed and terminated, built once by [`make_body`].
    pub body: std::sync::Arc<Vec<u8>>,
}

/// One line of a reply: its code and whether it is the last line (`250 ` vs `250-`).
///
/// Works on the bytes as they are, without a lossy text copy: this runs for every reply line
/// of every session, and only the error path needs the line as text.
pub fn parse_reply_line(line: &[u8]) -> Result<(u16, bool), ProtoError> {
    // Every trailing CR and LF goes, as in `trim`.
    let mut b = line;
    while let [rest @ .., b'\r' | b'\n'] = b {
        b = rest;
    }
    if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_digit) {
        return Err(ProtoError::unexpected(line));
    }
    let code = u16::from(b[0] - b'0') * 100 + u16::from(b[1] - b'0') * 10 + u16::from(b[2] - b'0');
    match b.get(3) {
        None | Some(b' ') => Ok((code, true)),
        Some(b'-') => Ok((code, false)),
        Some(_) => Err(ProtoError::unexpected(line)),
    }
}

/// Maps a reply code to the error it means when it is not the expected class.
pub fn code_error(code: u16, line: &[u8]) -> ProtoError {
    let kind = match code / 100 {
        4 => ErrorKind::Temp4xx,
        5 => ErrorKind::Perm5xx,
        _ => ErrorKind::Protocol,
    };
    ProtoError::new(kind, format!("reply {:?}", super::trim(line)))
}

/// Builds a message of about `size` bytes (headers included, like smtp-source's `-l` counts
/// the content), CRLF lines of at most 78 characters that never start with a dot, followed by
/// the `.` terminator.
pub fn make_body(size: usize, from: &str, to: &str) -> Vec<u8> {
    let mut m = format!("From: <{from}>\r\nTo: <{to}>\r\nSubject: mxlb-bench\r\n\r\n").into_bytes();
    while m.len() < size {
        let n = (size - m.len()).clamp(3, 80) - 2;
        m.extend(std::iter::repeat_n(b'X', n));
        m.extend_from_slice(b"\r\n");
    }
    m.extend_from_slice(b".\r\n");
    m
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    Ehlo,
    Mail,
    Rcpt(u32),
    Data,
    Body,
    Quit,
    Done,
}

/// The SMTP dialogue state machine.
pub struct Smtp {
    p: SmtpParams,
    state: State,
    sent_messages: u32,
}

impl Smtp {
    pub fn new(p: SmtpParams) -> Smtp {
        Smtp {
            p,
            state: State::Greeting,
            sent_messages: 0,
        }
    }

    fn rcpt(&self, i: u32) -> Vec<u8> {
        // Distinct recipients when several are asked for, numbered like smtp-source does.
        if self.p.rcpts > 1 {
            format!("RCPT TO:<{i}{}>\r\n", self.p.to).into_bytes()
        } else {
            format!("RCPT TO:<{}>\r\n", self.p.to).into_bytes()
        }
    }

    fn mail(&self) -> Vec<u8> {
        format!("MAIL FROM:<{}>\r\n", self.p.from).into_bytes()
    }
}

impl Dialogue for Smtp {
    fn feed(&mut self, line: &[u8]) -> Result<Step, ProtoError> {
        let (code, last) = parse_reply_line(line)?;
        if !last {
            return Ok(Step::read_on());
        }
        let expect = match self.state {
            State::Greeting => 220,
            State::Ehlo | State::Mail | State::Rcpt(_) | State::Body => 250,
            State::Data => 354,
            State::Quit => 221,
            State::Done => return Err(ProtoError::unexpected(line)),
        };
        if code != expect && !(self.state == State::Quit && code / 100 == 2) {
            return Err(code_error(code, line));
        }
        let step = match self.state {
            State::Greeting => {
                self.state = State::Ehlo;
                Step::send(format!("EHLO {}\r\n", self.p.helo)).event(Event::Greeting)
            }
            State::Ehlo => {
                self.state = State::Mail;
                Step::send(self.mail())
            }
            State::Mail => {
                self.state = State::Rcpt(1);
                Step::send(self.rcpt(1))
            }
            State::Rcpt(i) if i < self.p.rcpts.max(1) => {
                self.state = State::Rcpt(i + 1);
                Step::send(self.rcpt(i + 1))
            }
            State::Rcpt(_) => {
                self.state = State::Data;
                Step::send(&b"DATA\r\n"[..])
            }
            State::Data => {
                self.state = State::Body;
                Step {
                    send: self.p.body.to_vec(),
                    timed_send: true,
                    ..Step::default()
                }
            }
            State::Body => {
                self.sent_messages += 1;
                let s = if self.sent_messages < self.p.messages.max(1) {
                    self.state = State::Mail;
                    Step::send(self.mail())
                } else {
                    self.state = State::Quit;
                    Step::send(&b"QUIT\r\n"[..])
                };
                s.event(Event::DataAck)
            }
            State::Quit => {
                self.state = State::Done;
                Step::done()
            }
            State::Done => unreachable!("handled above"),
        };
        Ok(step)
    }

    fn eof_ok(&self) -> bool {
        matches!(self.state, State::Quit | State::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(rcpts: u32, messages: u32) -> SmtpParams {
        SmtpParams {
            helo: "bench".into(),
            from: "a@x".into(),
            to: "b@y".into(),
            rcpts,
            messages,
            body: std::sync::Arc::new(make_body(200, "a@x", "b@y")),
        }
    }

    fn sent(s: &Step) -> String {
        String::from_utf8_lossy(&s.send).into_owned()
    }

    #[test]
    fn reply_lines() {
        assert_eq!(
            parse_reply_line(b"250-PIPELINING\r\n").unwrap(),
            (250, false)
        );
        assert_eq!(parse_reply_line(b"250 OK\r\n").unwrap(), (250, true));
        assert_eq!(parse_reply_line(b"221\r\n").unwrap(), (221, true));
        assert_eq!(
            parse_reply_line(b"hello\r\n").unwrap_err().kind,
            ErrorKind::Protocol
        );
        assert_eq!(
            parse_reply_line(b"25\r\n").unwrap_err().kind,
            ErrorKind::Protocol
        );
        assert_eq!(
            parse_reply_line(b"250+x\r\n").unwrap_err().kind,
            ErrorKind::Protocol
        );
    }

    #[test]
    fn full_transaction_two_rcpts_two_messages() {
        let mut d = Smtp::new(params(2, 2));
        let s = d.feed(b"220 sink ESMTP\r\n").unwrap();
        assert_eq!(sent(&s), "EHLO bench\r\n");
        assert_eq!(s.events, vec![Event::Greeting]);
        // Multi-line EHLO reply: nothing sent until the last line.
        assert_eq!(d.feed(b"250-sink\r\n").unwrap(), Step::read_on());
        assert_eq!(d.feed(b"250-PIPELINING\r\n").unwrap(), Step::read_on());
        // First message, after the EHLO reply; the second after the first's end-of-DATA 250.
        for (reply, ack) in [
            (&b"250 8BITMIME\r\n"[..], false),
            (&b"250 queued\r\n"[..], true),
        ] {
            let s = d.feed(reply).unwrap();
            assert_eq!(sent(&s), "MAIL FROM:<a@x>\r\n");
            assert_eq!(s.events.contains(&Event::DataAck), ack);
            assert_eq!(sent(&d.feed(b"250 ok\r\n").unwrap()), "RCPT TO:<1b@y>\r\n");
            assert_eq!(sent(&d.feed(b"250 ok\r\n").unwrap()), "RCPT TO:<2b@y>\r\n");
            assert_eq!(sent(&d.feed(b"250 ok\r\n").unwrap()), "DATA\r\n");
            let s = d.feed(b"354 go\r\n").unwrap();
            assert!(s.timed_send);
            assert!(sent(&s).ends_with("\r\n.\r\n"));
            assert!(!d.eof_ok());
        }
        let s = d.feed(b"250 queued\r\n").unwrap();
        assert_eq!(s.events, vec![Event::DataAck]);
        assert_eq!(sent(&s), "QUIT\r\n");
        assert!(d.eof_ok());
        assert!(d.feed(b"221 bye\r\n").unwrap().done);
    }

    #[test]
    fn codes_map_to_kinds() {
        let mut d = Smtp::new(params(1, 1));
        assert_eq!(
            d.feed(b"421 busy\r\n").unwrap_err().kind,
            ErrorKind::Temp4xx
        );
        let mut d = Smtp::new(params(1, 1));
        d.feed(b"220 hi\r\n").unwrap();
        d.feed(b"250 hi\r\n").unwrap();
        assert_eq!(d.feed(b"550-no\r\n").unwrap(), Step::read_on());
        assert_eq!(
            d.feed(b"550 no such user\r\n").unwrap_err().kind,
            ErrorKind::Perm5xx
        );
        let mut d = Smtp::new(params(1, 1));
        assert_eq!(
            d.feed(b"354 what\r\n").unwrap_err().kind,
            ErrorKind::Protocol
        );
    }

    #[test]
    fn body_size_and_stuffing() {
        for size in [0, 10, 100, 1024, 10_000] {
            let b = make_body(size, "a@x", "b@y");
            assert!(b.ends_with(b"\r\n.\r\n"));
            let content = b.len() - 3;
            assert!(
                content >= size && content <= size.max(60) + 2,
                "size {size}: {content}"
            );
            for l in b.split(|c| *c == b'\n') {
                assert!(l.len() <= 80);
                assert!(!l.starts_with(b".") || l == b".\r");
            }
        }
    }
}
