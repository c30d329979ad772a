//! POP3 client dialogue: greeting, USER, PASS, STAT, RETR 1 … RETR N (each multi-line, to the
//! lone `.`), QUIT. The mailbox must be seeded with at least N messages: fewer is a `protocol`
//! error, since a run that retrieves less would measure mostly the login.
//!
//! Each message's bytes are counted as the client receives them (dot-unstuffed, CRLFs
//! included) and checked against the size the server announced (`+OK 8192 octets`, Dovecot's
//! form) and, when given, the size the caller expects: a proxy that lost or duplicated bytes
//! must not pass for a fast one.
use super::{Dialogue, ErrorKind, Event, Fetch, ProtoError, Step};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    User,
    Pass,
    Stat,
    RetrStatus,
    RetrBody,
    Quit,
    Done,
}

pub struct Pop3 {
    user: String,
    pass: String,
    fetch: Fetch,
    state: State,
    /// The message being retrieved (1-based).
    current: u32,
    /// Its size as the `+OK` of RETR announced it, if it did.
    announced: Option<u64>,
    /// Its bytes received so far.
    got: u64,
}

impl Pop3 {
    /// One message, no size check (the tests' shorthand).
    #[cfg(test)]
    pub fn new(user: &str, pass: &str) -> Pop3 {
        Pop3::with_fetch(user, pass, Fetch::default())
    }

    pub fn with_fetch(user: &str, pass: &str, fetch: Fetch) -> Pop3 {
        Pop3 {
            user: user.into(),
            pass: pass.into(),
            fetch: Fetch { count: fetch.count.max(1), ..fetch },
            state: State::Greeting,
            current: 0,
            announced: None,
            got: 0,
        }
    }

    /// Asks for the next message.
    fn retr_next(&mut self) -> Step {
        self.current += 1;
        self.announced = None;
        self.got = 0;
        self.state = State::RetrStatus;
        Step::send(format!("RETR {}\r\n", self.current))
    }

    /// The lone `.` ended message `current`: check it, then the next RETR or QUIT.
    fn message_done(&mut self) -> Result<Step, ProtoError> {
        let which = format!("RETR {}", self.current);
        if let Some(n) = self.announced
            && n != self.got
        {
            return Err(ProtoError::new(
                ErrorKind::Protocol,
                format!("{which}: announced {n} octets, received {}", self.got),
            ));
        }
        self.fetch.check_size(&which, self.got)?;
        let event = Event::Retrieved { bytes: self.got };
        if self.current < self.fetch.count {
            return Ok(self.retr_next().event(event));
        }
        self.state = State::Quit;
        Ok(Step::send(&b"QUIT\r\n"[..]).event(event))
    }
}

/// `+OK …` → Ok(rest), `-ERR …` → the `5xx` kind (the server refused the command).
fn status(line: &[u8]) -> Result<String, ProtoError> {
    let t = super::trim(line);
    if let Some(rest) = t.strip_prefix("+OK") {
        Ok(rest.trim().to_string())
    } else if t.starts_with("-ERR") {
        Err(ProtoError::new(ErrorKind::Perm5xx, t))
    } else {
        Err(ProtoError::unexpected(line))
    }
}

impl Dialogue for Pop3 {
    fn feed(&mut self, line: &[u8]) -> Result<Step, ProtoError> {
        if self.state == State::RetrBody {
            // Multi-line: ends at a line that is a lone "."; a line starting with "." carries
            // one stuffed dot, which is not message content.
            if line == b".\r\n" || line == b".\n" {
                return self.message_done();
            }
            let stuffed = u64::from(line.first() == Some(&b'.'));
            self.got += line.len() as u64 - stuffed;
            return Ok(Step::read_on());
        }
        let rest = status(line)?;
        let step = match self.state {
            State::Greeting => {
                self.state = State::User;
                Step::send(format!("USER {}\r\n", self.user)).event(Event::Greeting)
            }
            State::User => {
                self.state = State::Pass;
                Step::send(format!("PASS {}\r\n", self.pass))
            }
            State::Pass => {
                self.state = State::Stat;
                Step::send(&b"STAT\r\n"[..])
            }
            State::Stat => {
                let n: u64 = rest
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| ProtoError::unexpected(line))?;
                if n == 0 {
                    return Err(ProtoError::new(
                        ErrorKind::Protocol,
                        "mailbox is empty (seed it)",
                    ));
                }
                if n < u64::from(self.fetch.count) {
                    return Err(ProtoError::new(
                        ErrorKind::Protocol,
                        format!("mailbox holds {n} messages, {} to fetch", self.fetch.count),
                    ));
                }
                self.retr_next()
            }
            State::RetrStatus => {
                // `+OK 8192 octets` (Dovecot, RFC 1939's example); other wordings are not
                // checked.
                self.announced = rest
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok());
                self.state = State::RetrBody;
                Step::read_on()
            }
            State::Quit => {
                self.state = State::Done;
                Step::done()
            }
            State::RetrBody | State::Done => return Err(ProtoError::unexpected(line)),
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

    fn sent(s: &Step) -> String {
        String::from_utf8_lossy(&s.send).into_owned()
    }

    #[test]
    fn full_session() {
        let mut d = Pop3::new("u", "p");
        let s = d.feed(b"+OK b1 ready.\r\n").unwrap();
        assert_eq!(
            (sent(&s).as_str(), s.events.as_slice()),
            ("USER u\r\n", &[Event::Greeting][..])
        );
        assert_eq!(sent(&d.feed(b"+OK\r\n").unwrap()), "PASS p\r\n");
        assert_eq!(sent(&d.feed(b"+OK Logged in.\r\n").unwrap()), "STAT\r\n");
        assert_eq!(sent(&d.feed(b"+OK 2 640\r\n").unwrap()), "RETR 1\r\n");
        // 12 + 25 + 10 (one stuffed dot removed) = 47 bytes.
        assert_eq!(d.feed(b"+OK 47 octets\r\n").unwrap(), Step::read_on());
        assert_eq!(d.feed(b"Subject: x\r\n").unwrap(), Step::read_on());
        assert_eq!(
            d.feed(b"+OK looks like a status\r\n").unwrap(),
            Step::read_on()
        );
        assert_eq!(d.feed(b"..stuffed\r\n").unwrap(), Step::read_on());
        let s = d.feed(b".\r\n").unwrap();
        assert_eq!(
            (sent(&s).as_str(), s.events.as_slice()),
            ("QUIT\r\n", &[Event::Retrieved { bytes: 47 }][..])
        );
        assert!(d.eof_ok());
        assert!(d.feed(b"+OK Logging out.\r\n").unwrap().done);
    }

    /// Feeds a whole session fetching `fetch.count` messages whose bodies are `bodies`
    /// (already stuffed, as on the wire), announcing `announced` octets each; returns the
    /// events and what was sent.
    fn run(fetch: Fetch, stat: &str, bodies: &[&[&[u8]]], announced: &[u64]) -> Result<(Vec<Event>, String), ProtoError> {
        let mut d = Pop3::with_fetch("u", "p", fetch);
        let (mut events, mut out) = (Vec::new(), String::new());
        let mut feed = |d: &mut Pop3, l: &[u8]| -> Result<bool, ProtoError> {
            let s = d.feed(l)?;
            events.extend(s.events.iter().copied());
            out += &sent(&s);
            Ok(s.done)
        };
        for l in [&b"+OK hi\r\n"[..], b"+OK\r\n", b"+OK in\r\n", stat.as_bytes()] {
            feed(&mut d, l)?;
        }
        for (body, n) in bodies.iter().zip(announced) {
            feed(&mut d, format!("+OK {n} octets\r\n").as_bytes())?;
            for l in *body {
                feed(&mut d, l)?;
            }
            feed(&mut d, b".\r\n")?;
        }
        assert!(feed(&mut d, b"+OK bye\r\n")?);
        Ok((events, out))
    }

    #[test]
    fn fetches_n_messages_one_retr_each_and_counts_their_bytes() {
        let m1: &[&[u8]] = &[b"Subject: 1\r\n", b"\r\n", b"body\r\n"]; // 12 + 2 + 6
        let m2: &[&[u8]] = &[b"Subject: 2\r\n", b"..\r\n", b"...x\r\n"]; // 12 + 3 + 5
        let m3: &[&[u8]] = &[b"Subject: 3\r\n", b"a.b\r\n"]; // 12 + 5
        let fetch = Fetch { count: 3, expect_size: None };
        let (events, out) = run(fetch, "+OK 5 999\r\n", &[m1, m2, m3], &[20, 20, 17]).unwrap();
        assert_eq!(out, "USER u\r\nPASS p\r\nSTAT\r\nRETR 1\r\nRETR 2\r\nRETR 3\r\nQUIT\r\n");
        assert_eq!(
            events,
            vec![
                Event::Greeting,
                Event::Retrieved { bytes: 20 },
                Event::Retrieved { bytes: 20 },
                Event::Retrieved { bytes: 17 }
            ]
        );
        // The expected size holds for every message, or the session fails on the first
        // that differs.
        let fetch = Fetch { count: 2, expect_size: Some(20) };
        assert!(run(fetch, "+OK 2 40\r\n", &[m1, m2], &[20, 20]).is_ok());
        let fetch = Fetch { count: 3, expect_size: Some(20) };
        let e = run(fetch, "+OK 3 57\r\n", &[m1, m2, m3], &[20, 20, 17]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Protocol);
        assert!(e.detail.contains("RETR 3: 17 bytes, expected 20"), "{e}");
    }

    #[test]
    fn a_short_or_long_message_and_a_small_mailbox_are_errors() {
        let m: &[&[u8]] = &[b"Subject: 1\r\n"];
        // Announced 13, received 12: bytes lost on the way.
        let e = run(Fetch::default(), "+OK 1 13\r\n", &[m], &[13]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Protocol);
        assert!(e.detail.contains("announced 13 octets, received 12"), "{e}");
        // Two to fetch, one in the mailbox.
        let e = run(Fetch { count: 2, expect_size: None }, "+OK 1 12\r\n", &[], &[]).unwrap_err();
        assert!(e.detail.contains("holds 1 messages, 2 to fetch"), "{e}");
        // A server that announces no size is not checked against one.
        let mut d = Pop3::new("u", "p");
        for l in [&b"+OK\r\n"[..], b"+OK\r\n", b"+OK\r\n", b"+OK 1 12\r\n", b"+OK message follows\r\n", b"Subject: 1\r\n"] {
            d.feed(l).unwrap();
        }
        assert_eq!(d.feed(b".\r\n").unwrap().events, vec![Event::Retrieved { bytes: 12 }]);
    }

    #[test]
    fn errors() {
        let mut d = Pop3::new("u", "p");
        d.feed(b"+OK hi\r\n").unwrap();
        d.feed(b"+OK\r\n").unwrap();
        assert_eq!(
            d.feed(b"-ERR [AUTH] Authentication failed.\r\n")
                .unwrap_err()
                .kind,
            ErrorKind::Perm5xx
        );
        let mut d = Pop3::new("u", "p");
        assert_eq!(
            d.feed(b"* OK imap\r\n").unwrap_err().kind,
            ErrorKind::Protocol
        );
        let mut d = Pop3::new("u", "p");
        for l in [&b"+OK\r\n"[..], b"+OK\r\n", b"+OK\r\n"] {
            d.feed(l).unwrap();
        }
        assert_eq!(
            d.feed(b"+OK 0 0\r\n").unwrap_err().kind,
            ErrorKind::Protocol
        );
        // A RETR refused mid-session.
        let mut d = Pop3::with_fetch("u", "p", Fetch { count: 2, expect_size: None });
        for l in [&b"+OK\r\n"[..], b"+OK\r\n", b"+OK\r\n", b"+OK 2 24\r\n", b"+OK 12 octets\r\n", b"Subject: 1\r\n", b".\r\n"] {
            d.feed(l).unwrap();
        }
        assert_eq!(d.feed(b"-ERR no such message\r\n").unwrap_err().kind, ErrorKind::Perm5xx);
    }
}
