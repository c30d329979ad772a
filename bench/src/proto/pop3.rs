//! POP3 client dialogue: greeting, USER, PASS, STAT, RETR 1 (multi-line, to the lone `.`),
//! QUIT. The mailbox must be seeded: an empty one is a `protocol` error, since a run that
//! retrieves nothing would measure only the login.
use super::{Dialogue, ErrorKind, Event, ProtoError, Step};

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
    state: State,
}

impl Pop3 {
    pub fn new(user: &str, pass: &str) -> Pop3 {
        Pop3 {
            user: user.into(),
            pass: pass.into(),
            state: State::Greeting,
        }
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
            // Multi-line: ends at a line that is a lone "."; ".." lines are stuffed data.
            if super::trim(line) == "." {
                self.state = State::Quit;
                return Ok(Step::send(&b"QUIT\r\n"[..]).event(Event::Retrieved));
            }
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
                self.state = State::RetrStatus;
                Step::send(&b"RETR 1\r\n"[..])
            }
            State::RetrStatus => {
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
        assert_eq!(d.feed(b"+OK 320 octets\r\n").unwrap(), Step::read_on());
        assert_eq!(d.feed(b"Subject: x\r\n").unwrap(), Step::read_on());
        assert_eq!(
            d.feed(b"+OK looks like a status\r\n").unwrap(),
            Step::read_on()
        );
        assert_eq!(d.feed(b"..stuffed\r\n").unwrap(), Step::read_on());
        let s = d.feed(b".\r\n").unwrap();
        assert_eq!(
            (sent(&s).as_str(), s.events.as_slice()),
            ("QUIT\r\n", &[Event::Retrieved][..])
        );
        assert!(d.eof_ok());
        assert!(d.feed(b"+OK Logging out.\r\n").unwrap().done);
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
    }
}
