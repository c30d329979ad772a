//! IMAP client dialogue: greeting, LOGIN, SELECT INBOX, FETCH 1 (BODY.PEEK[]), LOGOUT.
//! FETCH data arrives as a literal (`{N}` then N raw bytes), which may contain anything,
//! including lines that look like tagged replies; the machine counts literal bytes so it never
//! reads message content as protocol.
use super::{Dialogue, ErrorKind, Event, ProtoError, Step};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    Login,
    Select,
    Fetch,
    Logout,
    Done,
}

pub struct Imap {
    user: String,
    pass: String,
    state: State,
    /// Bytes of a literal still to skip.
    literal: usize,
    /// A literal just ended at a line boundary: the next line continues that response.
    continuation: bool,
    exists: Option<u64>,
}

/// `{N}` (or `{N+}`) at the end of a line: the size of the literal that follows.
pub fn literal_size(line: &[u8]) -> Option<usize> {
    let t = super::trim(line);
    let inner = t.strip_suffix('}')?;
    let open = inner.rfind('{')?;
    inner[open + 1..].trim_end_matches('+').parse().ok()
}

/// A quoted IMAP string.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

impl Imap {
    pub fn new(user: &str, pass: &str) -> Imap {
        Imap {
            user: user.into(),
            pass: pass.into(),
            state: State::Greeting,
            literal: 0,
            continuation: false,
            exists: None,
        }
    }

    fn tag(&self) -> &'static str {
        match self.state {
            State::Login => "a1",
            State::Select => "a2",
            State::Fetch => "a3",
            State::Logout => "a4",
            State::Greeting | State::Done => "",
        }
    }

    /// A complete (literal-free) response line.
    fn response(&mut self, line: &[u8]) -> Result<Step, ProtoError> {
        let t = super::trim(line);
        if self.state == State::Greeting {
            return if t.starts_with("* OK") || t.starts_with("* PREAUTH") {
                self.state = State::Login;
                Ok(Step::send(format!(
                    "a1 LOGIN {} {}\r\n",
                    quote(&self.user),
                    quote(&self.pass)
                ))
                .event(Event::Greeting))
            } else if t.starts_with("* BYE") {
                Err(ProtoError::new(ErrorKind::Temp4xx, t))
            } else {
                Err(ProtoError::unexpected(line))
            };
        }
        if let Some(rest) = t.strip_prefix("* ") {
            if let Some(n) = rest.strip_suffix(" EXISTS") {
                self.exists = n.parse().ok();
            }
            return Ok(Step::read_on());
        }
        if t.starts_with('+') {
            return Err(ProtoError::unexpected(line));
        }
        let Some(rest) = t.strip_prefix(self.tag()).and_then(|r| r.strip_prefix(' ')) else {
            return Err(ProtoError::unexpected(line));
        };
        let word = rest.split_whitespace().next().unwrap_or("");
        match word.to_ascii_uppercase().as_str() {
            "OK" => {}
            // NO: the server declined (possibly for now); BAD: it rejected the command.
            "NO" => return Err(ProtoError::new(ErrorKind::Temp4xx, t)),
            "BAD" => return Err(ProtoError::new(ErrorKind::Perm5xx, t)),
            _ => return Err(ProtoError::unexpected(line)),
        }
        Ok(match self.state {
            State::Login => {
                self.state = State::Select;
                Step::send(&b"a2 SELECT INBOX\r\n"[..])
            }
            State::Select => {
                if self.exists.unwrap_or(0) == 0 {
                    return Err(ProtoError::new(
                        ErrorKind::Protocol,
                        "mailbox is empty (seed it)",
                    ));
                }
                self.state = State::Fetch;
                Step::send(&b"a3 FETCH 1 (BODY.PEEK[])\r\n"[..])
            }
            State::Fetch => {
                self.state = State::Logout;
                Step::send(&b"a4 LOGOUT\r\n"[..]).event(Event::Retrieved)
            }
            State::Logout => {
                self.state = State::Done;
                Step::done()
            }
            State::Greeting | State::Done => return Err(ProtoError::unexpected(line)),
        })
    }
}

impl Dialogue for Imap {
    fn feed(&mut self, line: &[u8]) -> Result<Step, ProtoError> {
        let mut line = line;
        if self.literal > 0 {
            if line.len() <= self.literal {
                self.literal -= line.len();
                self.continuation = self.literal == 0;
                return Ok(Step::read_on());
            }
            // The literal ends inside this line; the rest continues the response line.
            line = &line[self.literal..];
            self.literal = 0;
            if let Some(n) = literal_size(line) {
                self.literal = n;
            }
            return Ok(Step::read_on());
        }
        if std::mem::take(&mut self.continuation) {
            self.literal = literal_size(line).unwrap_or(0);
            return Ok(Step::read_on());
        }
        if let Some(n) = literal_size(line) {
            self.literal = n;
            return Ok(Step::read_on());
        }
        self.response(line)
    }

    fn eof_ok(&self) -> bool {
        matches!(self.state, State::Logout | State::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(s: &Step) -> String {
        String::from_utf8_lossy(&s.send).into_owned()
    }

    #[test]
    fn literal_sizes() {
        assert_eq!(literal_size(b"* 1 FETCH (BODY[] {42}\r\n"), Some(42));
        assert_eq!(literal_size(b"a1 LOGIN {3+}\r\n"), Some(3));
        assert_eq!(literal_size(b"a3 OK done\r\n"), None);
    }

    #[test]
    fn full_session_with_tricky_literal() {
        let mut d = Imap::new("u", "p\"w");
        let s = d
            .feed(b"* OK [CAPABILITY IMAP4rev1] b1 ready.\r\n")
            .unwrap();
        assert_eq!(sent(&s), "a1 LOGIN \"u\" \"p\\\"w\"\r\n");
        assert_eq!(s.events, vec![Event::Greeting]);
        assert_eq!(
            sent(
                &d.feed(b"a1 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
                    .unwrap()
            ),
            "a2 SELECT INBOX\r\n"
        );
        for l in [
            &b"* FLAGS (\\Seen)\r\n"[..],
            b"* 3 EXISTS\r\n",
            b"* 0 RECENT\r\n",
        ] {
            assert_eq!(d.feed(l).unwrap(), Step::read_on());
        }
        assert_eq!(
            sent(&d.feed(b"a2 OK [READ-WRITE] Select completed\r\n").unwrap()),
            "a3 FETCH 1 (BODY.PEEK[])\r\n"
        );
        // Literal of 23 bytes: "a3 OK fake\r\n" (12) + "Body line\r\n" (11), then ")\r\n".
        assert_eq!(
            d.feed(b"* 1 FETCH (BODY[] {23}\r\n").unwrap(),
            Step::read_on()
        );
        assert_eq!(d.feed(b"a3 OK fake\r\n").unwrap(), Step::read_on());
        assert_eq!(d.feed(b"Body line\r\n").unwrap(), Step::read_on());
        assert_eq!(d.feed(b")\r\n").unwrap(), Step::read_on());
        let s = d.feed(b"a3 OK Fetch completed.\r\n").unwrap();
        assert_eq!(
            (sent(&s).as_str(), s.events.as_slice()),
            ("a4 LOGOUT\r\n", &[Event::Retrieved][..])
        );
        assert!(d.eof_ok());
        assert_eq!(d.feed(b"* BYE Logging out\r\n").unwrap(), Step::read_on());
        assert!(d.feed(b"a4 OK Logout completed.\r\n").unwrap().done);
    }

    #[test]
    fn literal_ending_mid_line() {
        let mut d = Imap::new("u", "p");
        d.state = State::Fetch;
        // 5-byte literal "abc\r\n" arrives as "abc\r\n" then... here: literal "ab" + ")\r\n".
        d.feed(b"* 1 FETCH (BODY[] {2}\r\n").unwrap();
        assert_eq!(d.feed(b"ab)\r\n").unwrap(), Step::read_on());
        assert_eq!(d.literal, 0);
        assert_eq!(sent(&d.feed(b"a3 OK done\r\n").unwrap()), "a4 LOGOUT\r\n");
    }

    #[test]
    fn errors() {
        let mut d = Imap::new("u", "p");
        d.feed(b"* OK hi\r\n").unwrap();
        assert_eq!(
            d.feed(b"a1 NO [AUTHENTICATIONFAILED] no\r\n")
                .unwrap_err()
                .kind,
            ErrorKind::Temp4xx
        );
        let mut d = Imap::new("u", "p");
        d.feed(b"* OK hi\r\n").unwrap();
        assert_eq!(
            d.feed(b"a1 BAD syntax\r\n").unwrap_err().kind,
            ErrorKind::Perm5xx
        );
        let mut d = Imap::new("u", "p");
        assert_eq!(
            d.feed(b"* BYE too many\r\n").unwrap_err().kind,
            ErrorKind::Temp4xx
        );
        let mut d = Imap::new("u", "p");
        d.feed(b"* OK hi\r\n").unwrap();
        d.feed(b"a1 OK in\r\n").unwrap();
        d.feed(b"* 0 EXISTS\r\n").unwrap();
        assert_eq!(
            d.feed(b"a2 OK sel\r\n").unwrap_err().kind,
            ErrorKind::Protocol
        );
    }
}
