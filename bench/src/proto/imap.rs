//! IMAP client dialogue: greeting, LOGIN, SELECT INBOX, one FETCH of messages 1..N
//! (`BODY.PEEK[]`, so the session changes no flag and the mailbox stays the same from one
//! session to the next), LOGOUT.
//!
//! FETCH data arrives as literals (`{N}` then N raw bytes), which may contain anything,
//! including lines that look like tagged replies; the machine counts literal bytes so it never
//! reads message content as protocol. Each `BODY[]` literal is one retrieved message of that
//! many bytes (checked against the expected size, if given), and the tagged OK must come after
//! exactly N of them.
use super::{Dialogue, ErrorKind, Event, Fetch, ProtoError, Step};

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
    fetch: Fetch,
    state: State,
    /// Bytes of a literal still to skip.
    literal: usize,
    /// Size of the literal being read, when it is a message (`BODY[]` in a FETCH response).
    message: Option<usize>,
    /// A literal just ended at a line boundary: the next line continues that response.
    continuation: bool,
    exists: Option<u64>,
    /// Messages received in the FETCH response so far.
    retrieved: u32,
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

/// The FETCH command for messages 1..=n (`1` alone for one, as before `--fetch` existed).
fn fetch_command(n: u32) -> String {
    if n <= 1 {
        "a3 FETCH 1 (BODY.PEEK[])\r\n".to_string()
    } else {
        format!("a3 FETCH 1:{n} (BODY.PEEK[])\r\n")
    }
}

impl Imap {
    /// One message, no size check (the tests' shorthand).
    #[cfg(test)]
    pub fn new(user: &str, pass: &str) -> Imap {
        Imap::with_fetch(user, pass, Fetch::default())
    }

    pub fn with_fetch(user: &str, pass: &str, fetch: Fetch) -> Imap {
        Imap {
            user: user.into(),
            pass: pass.into(),
            fetch: Fetch { count: fetch.count.max(1), ..fetch },
            state: State::Greeting,
            literal: 0,
            message: None,
            continuation: false,
            exists: None,
            retrieved: 0,
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

    /// `line` (a response line, or what follows a literal on it) announces a literal of `n`
    /// bytes; a `{0}` one ends at once.
    fn start_literal(&mut self, line: &[u8], n: usize, step: &mut Step) -> Result<(), ProtoError> {
        let is_message = self.state == State::Fetch && line.windows(5).any(|w| w.eq_ignore_ascii_case(b"BODY["));
        self.message = is_message.then_some(n);
        self.literal = n;
        if n == 0 {
            self.continuation = true;
            self.literal_done(step)?;
        }
        Ok(())
    }

    /// The current literal has been read in full.
    fn literal_done(&mut self, step: &mut Step) -> Result<(), ProtoError> {
        if let Some(n) = self.message.take() {
            self.retrieved += 1;
            let bytes = n as u64;
            self.fetch.check_size(&format!("FETCH message {}", self.retrieved), bytes)?;
            step.events.push(Event::Retrieved { bytes });
        }
        Ok(())
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
                let exists = self.exists.unwrap_or(0);
                if exists == 0 {
                    return Err(ProtoError::new(
                        ErrorKind::Protocol,
                        "mailbox is empty (seed it)",
                    ));
                }
                if exists < u64::from(self.fetch.count) {
                    return Err(ProtoError::new(
                        ErrorKind::Protocol,
                        format!("mailbox holds {exists} messages, {} to fetch", self.fetch.count),
                    ));
                }
                self.state = State::Fetch;
                Step::send(fetch_command(self.fetch.count))
            }
            State::Fetch => {
                if self.retrieved != self.fetch.count {
                    return Err(ProtoError::new(
                        ErrorKind::Protocol,
                        format!("FETCH ended after {} of {} messages", self.retrieved, self.fetch.count),
                    ));
                }
                self.state = State::Logout;
                Step::send(&b"a4 LOGOUT\r\n"[..])
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
        let mut step = Step::read_on();
        if self.literal > 0 {
            if line.len() <= self.literal {
                self.literal -= line.len();
                if self.literal == 0 {
                    self.continuation = true;
                    self.literal_done(&mut step)?;
                }
                return Ok(step);
            }
            // The literal ends inside this line; the rest continues the response line (and
            // may announce another literal).
            let rest = &line[self.literal..];
            self.literal = 0;
            self.literal_done(&mut step)?;
            if let Some(n) = literal_size(rest) {
                self.start_literal(rest, n, &mut step)?;
            }
            return Ok(step);
        }
        if std::mem::take(&mut self.continuation) {
            if let Some(n) = literal_size(line) {
                self.start_literal(line, n, &mut step)?;
            }
            return Ok(step);
        }
        if let Some(n) = literal_size(line) {
            self.start_literal(line, n, &mut step)?;
            return Ok(step);
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
        assert_eq!(
            d.feed(b"Body line\r\n").unwrap().events,
            vec![Event::Retrieved { bytes: 23 }]
        );
        assert_eq!(d.feed(b")\r\n").unwrap(), Step::read_on());
        let s = d.feed(b"a3 OK Fetch completed.\r\n").unwrap();
        assert_eq!(
            (sent(&s).as_str(), s.events.as_slice()),
            ("a4 LOGOUT\r\n", &[][..])
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
        assert_eq!(
            d.feed(b"ab)\r\n").unwrap().events,
            vec![Event::Retrieved { bytes: 2 }]
        );
        assert_eq!(d.literal, 0);
        assert_eq!(sent(&d.feed(b"a3 OK done\r\n").unwrap()), "a4 LOGOUT\r\n");
    }

    /// Feeds the server's lines from the SELECT answer on; returns every event, what was
    /// sent, and the first error.
    fn after_select(d: &mut Imap, lines: &[&[u8]]) -> (Vec<Event>, String, Option<ProtoError>) {
        let (mut events, mut out) = (Vec::new(), String::new());
        for l in [&b"* OK hi\r\n"[..], b"a1 OK in\r\n"].iter().chain(lines) {
            match d.feed(l) {
                Ok(s) => {
                    events.extend(s.events.iter().copied());
                    out += &sent(&s);
                }
                Err(e) => return (events, out, Some(e)),
            }
        }
        (events, out, None)
    }

    #[test]
    fn fetches_n_messages_in_one_command_counting_each_literal() {
        let mut d = Imap::with_fetch("u", "p", Fetch { count: 3, expect_size: Some(10) });
        let (events, out, err) = after_select(
            &mut d,
            &[
                b"* 5 EXISTS\r\n",
                b"a2 OK sel\r\n",
                // Message 1: a 10-byte literal over two lines, then ")".
                b"* 1 FETCH (BODY[] {10}\r\n",
                b"a3 OK\r\n",
                b"z\r\n",
                b")\r\n",
                // Message 2: ends mid-line, the next response item follows on that line.
                b"* 2 FETCH (BODY[] {10}\r\n",
                b"0123456789 FLAGS (\\Seen))\r\n",
                // An unsolicited FETCH without a body is not a message.
                b"* 4 FETCH (FLAGS (\\Deleted))\r\n",
                // Message 3: a literal whose content looks like a literal announcement.
                b"* 3 FETCH (UID 9 BODY[] {10}\r\n",
                b"* 12 {3}\r\n",
                b")\r\n",
                b"a3 OK Fetch completed.\r\n",
                b"a4 OK bye\r\n",
            ],
        );
        assert!(err.is_none(), "{err:?}");
        assert_eq!(out, "a1 LOGIN \"u\" \"p\"\r\na2 SELECT INBOX\r\na3 FETCH 1:3 (BODY.PEEK[])\r\na4 LOGOUT\r\n");
        let retrieved: Vec<_> = events.iter().filter(|e| matches!(e, Event::Retrieved { .. })).collect();
        assert_eq!(retrieved, vec![&Event::Retrieved { bytes: 10 }; 3]);
        assert_eq!(d.state, State::Done);
    }

    #[test]
    fn fetch_errors_fewer_messages_wrong_size_small_mailbox() {
        // The tagged OK after 1 of 2 messages.
        let mut d = Imap::with_fetch("u", "p", Fetch { count: 2, expect_size: None });
        let (_, _, err) = after_select(
            &mut d,
            &[b"* 2 EXISTS\r\n", b"a2 OK sel\r\n", b"* 1 FETCH (BODY[] {3}\r\n", b"abc)\r\n", b"a3 OK done\r\n"],
        );
        let err = err.expect("an error");
        assert_eq!(err.kind, ErrorKind::Protocol);
        assert!(err.detail.contains("after 1 of 2"), "{err}");
        // A message of the wrong size.
        let mut d = Imap::with_fetch("u", "p", Fetch { count: 1, expect_size: Some(4) });
        let (_, _, err) = after_select(&mut d, &[b"* 1 EXISTS\r\n", b"a2 OK sel\r\n", b"* 1 FETCH (BODY[] {3}\r\n", b"abc)\r\n"]);
        assert!(err.is_some_and(|e| e.detail.contains("FETCH message 1: 3 bytes, expected 4")));
        // Fewer messages than asked for.
        let mut d = Imap::with_fetch("u", "p", Fetch { count: 20, expect_size: None });
        let (_, out, err) = after_select(&mut d, &[b"* 19 EXISTS\r\n", b"a2 OK sel\r\n"]);
        assert!(err.is_some_and(|e| e.detail.contains("holds 19 messages, 20 to fetch")));
        assert!(!out.contains("FETCH"));
        // An empty literal is a message of 0 bytes, and the line after it continues it.
        let mut d = Imap::with_fetch("u", "p", Fetch { count: 1, expect_size: None });
        let (events, _, err) =
            after_select(&mut d, &[b"* 1 EXISTS\r\n", b"a2 OK sel\r\n", b"* 1 FETCH (BODY[] {0}\r\n", b")\r\n", b"a3 OK done\r\n"]);
        assert!(err.is_none(), "{err:?}");
        assert!(events.contains(&Event::Retrieved { bytes: 0 }));
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
