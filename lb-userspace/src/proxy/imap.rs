//! The IMAP dialogue before login (RFC 3501 with LITERAL+ 7888, SASL-IR 4959, ID 2971), as a
//! pure state machine: bytes from the client in, [`Action`]s out. It answers as a Dovecot
//! login process does (its capabilities and wording) until the client has logged in with
//! LOGIN or AUTHENTICATE PLAIN/LOGIN; the session then takes the login to the owner.
//!
//! Literals are read only up to [`MAX_LITERAL`] bytes: the size a client announces is checked
//! before anything is read or allocated, and a larger one ends the connection.
use super::login::{
    Action, Credentials, LOGIN_PASS_PROMPT, LOGIN_USER_PROMPT, LoginRequest, MAX_BAD_COMMANDS, MAX_LINE, MAX_LITERAL, Method,
    decode_b64, parse_plain, take_line, user_name,
};

/// The capabilities every pre-login CAPABILITY lists, as Dovecot's (STARTTLS and the AUTH=
/// entries follow the connection's state).
const BASE_CAPABILITIES: &str = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+";

/// Answer to a failed login (wrong password, unknown user): Dovecot's words.
pub fn auth_failed(tag: &str) -> Vec<u8> {
    format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n").into_bytes()
}

/// Answer when the owner cannot be reached or the source is blocked: try later.
pub fn temp_failure(tag: &str) -> Vec<u8> {
    format!("{tag} NO [UNAVAILABLE] Account is temporarily unavailable.\r\n").into_bytes()
}

/// The client did not log in within the login timeout.
pub const TIMEOUT: &[u8] = b"* BYE Disconnected for inactivity.\r\n";
/// Too many sessions (in all or from this source).
pub const TOO_MANY: &[u8] = b"* BYE [UNAVAILABLE] Too many connections, try again later.\r\n";

/// One part of a command: line text, or a literal's content.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(Vec<u8>),
    Literal(Vec<u8>),
}

/// A token of a command line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Atom(Vec<u8>),
    /// A quoted string or a literal.
    Str(Vec<u8>),
    Open,
    Close,
}

impl Tok {
    /// An `astring` (RFC 3501): an atom, a quoted string or a literal.
    fn astring(&self) -> Option<&[u8]> {
        match self {
            Tok::Atom(b) | Tok::Str(b) => Some(b),
            _ => None,
        }
    }
}

/// Which SASL exchange is waiting for a response line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sasl {
    Plain,
    LoginUser,
    LoginPassword(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Wait {
    /// A command line (or the rest of one after a literal).
    Command,
    /// `n` bytes of literal.
    Literal(usize),
    /// A SASL response line for the command tagged `tag`.
    Response { tag: String, sasl: Sasl },
    /// STARTTLS or a login is being carried out.
    Paused,
    Closed,
}

/// One client's IMAP pre-login dialogue.
#[derive(Debug)]
pub struct Imap {
    tls_available: bool,
    allow_plaintext: bool,
    secure: bool,
    buf: Vec<u8>,
    wait: Wait,
    /// The command being assembled (text and literals), and its size so far.
    pieces: Vec<Piece>,
    size: usize,
    bad: u32,
}

impl Imap {
    /// `tls_available`: STARTTLS can be offered. `secure`: the connection is TLS already (993).
    pub fn new(tls_available: bool, allow_plaintext: bool, secure: bool) -> Imap {
        Imap { tls_available, allow_plaintext, secure, buf: Vec::new(), wait: Wait::Command, pieces: Vec::new(), size: 0, bad: 0 }
    }

    /// The pre-login capabilities now.
    pub fn capabilities(&self) -> String {
        let mut s = String::from(BASE_CAPABILITIES);
        if self.tls_available && !self.secure {
            s += " STARTTLS";
        }
        s += if self.plaintext_ok() { " AUTH=PLAIN AUTH=LOGIN" } else { " LOGINDISABLED" };
        s
    }

    /// The greeting, with the capabilities in it (as Dovecot's).
    pub fn greeting(&self, text: &str) -> Vec<u8> {
        format!("* OK [CAPABILITY {}] {text}\r\n", self.capabilities()).into_bytes()
    }

    fn plaintext_ok(&self) -> bool {
        self.secure || self.allow_plaintext
    }

    /// Input from the client; the actions it causes.
    pub fn feed(&mut self, data: &[u8]) -> Vec<Action> {
        if self.wait != Wait::Closed {
            self.buf.extend_from_slice(data);
        }
        self.run()
    }

    /// After a failed login: go on with input the client sent meanwhile.
    pub fn resume(&mut self) -> Vec<Action> {
        if self.wait == Wait::Paused {
            self.wait = Wait::Command;
        }
        self.run()
    }

    /// The TLS handshake after STARTTLS succeeded.
    pub fn tls_started(&mut self) -> Vec<Action> {
        self.secure = true;
        self.tls_available = false;
        self.buf.clear();
        self.resume()
    }

    /// What the client sent after its successful login (for the back-end).
    pub fn take_leftover(&mut self) -> Vec<u8> {
        self.wait = Wait::Closed;
        std::mem::take(&mut self.buf)
    }

    fn close(&mut self, out: &mut Vec<Action>) {
        out.push(Action::Close);
        self.wait = Wait::Closed;
        self.buf.clear();
        self.pieces.clear();
    }

    fn run(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        loop {
            match self.wait {
                Wait::Paused | Wait::Closed => break,
                Wait::Literal(n) => {
                    if self.buf.len() < n {
                        break;
                    }
                    let literal: Vec<u8> = self.buf.drain(..n).collect();
                    self.pieces.push(Piece::Literal(literal));
                    self.wait = Wait::Command;
                }
                Wait::Command | Wait::Response { .. } => {
                    let line = match take_line(&mut self.buf) {
                        Ok(Some(l)) => l,
                        Ok(None) => break,
                        Err(_) => {
                            self.too_long(&mut out);
                            break;
                        }
                    };
                    match std::mem::replace(&mut self.wait, Wait::Command) {
                        Wait::Response { tag, sasl } => self.sasl_response(&tag, sasl, &line, &mut out),
                        _ => self.command_line(line, &mut out),
                    }
                }
            }
        }
        out
    }

    /// One line of a command: either the whole command, or text up to a literal (`{n}` /
    /// `{n+}`) whose size is checked before a byte of it is read.
    fn command_line(&mut self, line: Vec<u8>, out: &mut Vec<Action>) {
        self.size += line.len() + 2;
        if self.size > MAX_LINE {
            return self.too_long(out);
        }
        match literal_marker(&line) {
            Some((text_len, size, sync)) => {
                let tag = self.current_tag(&line);
                match size {
                    Some(n) if n <= MAX_LITERAL && self.size + n <= MAX_LINE => {
                        self.size += n;
                        self.pieces.push(Piece::Text(line[..text_len].to_vec()));
                        if sync {
                            out.push(Action::Send(b"+ OK\r\n".to_vec()));
                        }
                        self.wait = Wait::Literal(n);
                    }
                    _ => {
                        out.push(Action::Send(format!("{tag} BAD Literal too large.\r\n").into_bytes()));
                        self.close(out);
                    }
                }
            }
            None => {
                self.pieces.push(Piece::Text(line));
                let pieces = std::mem::take(&mut self.pieces);
                self.size = 0;
                self.command(pieces, out);
            }
        }
    }

    fn too_long(&mut self, out: &mut Vec<Action>) {
        out.push(Action::Send(b"* BAD Command line too long.\r\n".to_vec()));
        out.push(Action::Send(b"* BYE Too long command line, closing.\r\n".to_vec()));
        self.close(out);
    }

    /// The tag of the command being assembled (for an error answer), or `*`.
    fn current_tag(&self, line: &[u8]) -> String {
        let first = match self.pieces.first() {
            Some(Piece::Text(t)) => t.as_slice(),
            _ => line,
        };
        let tag = first.split(|b| *b == b' ').next().unwrap_or_default();
        match valid_tag(tag) {
            true => String::from_utf8_lossy(tag).into_owned(),
            false => "*".into(),
        }
    }

    fn bad_command(&mut self, tag: &str, reply: &str, out: &mut Vec<Action>) {
        self.bad += 1;
        if self.bad >= MAX_BAD_COMMANDS {
            out.push(Action::Send(b"* BYE Too many invalid IMAP commands.\r\n".to_vec()));
            self.close(out);
        } else {
            out.push(Action::Send(format!("{tag} BAD {reply}\r\n").into_bytes()));
        }
    }

    fn login(&mut self, tag: &str, credentials: Credentials, method: Method, out: &mut Vec<Action>) {
        self.wait = Wait::Paused;
        out.push(Action::Login(LoginRequest { credentials, method, tag: Some(tag.to_string()) }));
    }

    fn command(&mut self, pieces: Vec<Piece>, out: &mut Vec<Action>) {
        let toks = match tokenize(&pieces) {
            Some(t) => t,
            None => {
                let tag = match pieces.first() {
                    Some(Piece::Text(t)) => self.current_tag(t),
                    _ => "*".into(),
                };
                return self.bad_command(&tag, "Error in IMAP command received by server.", out);
            }
        };
        let (tag, verb, args) = match toks.as_slice() {
            [Tok::Atom(tag), Tok::Atom(verb), args @ ..] if valid_tag(tag) => {
                (String::from_utf8_lossy(tag).into_owned(), String::from_utf8_lossy(verb).to_ascii_uppercase(), args)
            }
            [Tok::Atom(tag), ..] if valid_tag(tag) => {
                let tag = String::from_utf8_lossy(tag).into_owned();
                return self.bad_command(&tag, "Error in IMAP command received by server.", out);
            }
            [] => return, // an empty line: ignored, as Dovecot does
            _ => return self.bad_command("*", "Error in IMAP command received by server.", out),
        };
        let send = |out: &mut Vec<Action>, s: String| out.push(Action::Send(s.into_bytes()));
        match (verb.as_str(), args) {
            ("CAPABILITY", []) => send(
                out,
                format!(
                    "* CAPABILITY {}\r\n{tag} OK Pre-login capabilities listed, post-login capabilities have more.\r\n",
                    self.capabilities()
                ),
            ),
            ("NOOP", []) => send(out, format!("{tag} OK NOOP completed.\r\n")),
            ("LOGOUT", []) => {
                send(out, format!("* BYE Logging out\r\n{tag} OK Logout completed.\r\n"));
                self.close(out);
            }
            ("ID", [Tok::Atom(nil)]) if nil.eq_ignore_ascii_case(b"NIL") => send(out, format!("* ID NIL\r\n{tag} OK ID completed.\r\n")),
            ("ID", [Tok::Open, rest @ .., Tok::Close]) if rest.iter().all(|t| matches!(t, Tok::Str(_) | Tok::Atom(_))) => {
                send(out, format!("* ID NIL\r\n{tag} OK ID completed.\r\n"))
            }
            ("STARTTLS", []) if self.secure => send(out, format!("{tag} BAD TLS is already active.\r\n")),
            ("STARTTLS", []) if !self.tls_available => send(out, format!("{tag} BAD TLS support isn't enabled.\r\n")),
            ("STARTTLS", []) => {
                send(out, format!("{tag} OK Begin TLS negotiation now.\r\n"));
                // Anything after STARTTLS in the same read was sent in clear: never act on it.
                self.buf.clear();
                self.wait = Wait::Paused;
                out.push(Action::StartTls);
            }
            ("LOGIN" | "AUTHENTICATE", _) if !self.plaintext_ok() => send(
                out,
                format!("{tag} NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n"),
            ),
            ("LOGIN", [user, password]) => match (user.astring().map(user_name), password.astring()) {
                (Some(Ok(user)), Some(password)) => {
                    let c = Credentials { user, password: password.to_vec() };
                    self.login(&tag, c, Method::ImapLogin, out)
                }
                (Some(Err(_)), Some(_)) => send(out, String::from_utf8_lossy(&auth_failed(&tag)).into_owned()),
                _ => self.bad_command(&tag, "Error in IMAP command LOGIN: Invalid arguments.", out),
            },
            ("LOGIN", _) => self.bad_command(&tag, "Error in IMAP command LOGIN: Invalid arguments.", out),
            ("AUTHENTICATE", [Tok::Atom(mech), rest @ ..]) if rest.len() <= 1 => {
                let initial = match rest.first() {
                    None => None,
                    Some(Tok::Atom(ir)) => Some(ir.clone()),
                    Some(_) => return self.bad_command(&tag, "Error in IMAP command AUTHENTICATE: Invalid arguments.", out),
                };
                let sasl = match mech.to_ascii_uppercase().as_slice() {
                    b"PLAIN" => Sasl::Plain,
                    b"LOGIN" => Sasl::LoginUser,
                    _ => return send(out, format!("{tag} NO Unsupported authentication mechanism.\r\n")),
                };
                match initial {
                    Some(ir) => self.sasl_response(&tag, sasl, &ir, out),
                    None => {
                        let prompt = if sasl == Sasl::LoginUser { LOGIN_USER_PROMPT } else { "" };
                        send(out, format!("+ {prompt}\r\n"));
                        self.wait = Wait::Response { tag, sasl };
                    }
                }
            }
            _ => self.bad_command(&tag, "Error in IMAP command received by server.", out),
        }
    }

    fn sasl_response(&mut self, tag: &str, sasl: Sasl, line: &[u8], out: &mut Vec<Action>) {
        if line.trim_ascii() == b"*" {
            out.push(Action::Send(format!("{tag} BAD Authentication aborted by client.\r\n").into_bytes()));
            return;
        }
        let Ok(raw) = decode_b64(line) else {
            out.push(Action::Send(format!("{tag} BAD Invalid base64 data in continued response\r\n").into_bytes()));
            return;
        };
        match sasl {
            Sasl::Plain => match parse_plain(&raw) {
                Ok(c) => self.login(tag, c, Method::ImapAuthenticate, out),
                Err(_) => out.push(Action::Send(auth_failed(tag))),
            },
            Sasl::LoginUser => match user_name(&raw) {
                Ok(user) => {
                    out.push(Action::Send(format!("+ {LOGIN_PASS_PROMPT}\r\n").into_bytes()));
                    self.wait = Wait::Response { tag: tag.to_string(), sasl: Sasl::LoginPassword(user) };
                }
                Err(_) => out.push(Action::Send(auth_failed(tag))),
            },
            Sasl::LoginPassword(user) => self.login(tag, Credentials { user, password: raw }, Method::ImapAuthenticate, out),
        }
    }
}

/// A tag: atom characters except `+` (RFC 3501 §9).
fn valid_tag(tag: &[u8]) -> bool {
    !tag.is_empty() && tag.iter().all(|&b| b > b' ' && b < 0x7f && !b"(){%*\"\\+]".contains(&b))
}

/// A literal announcement at the end of `line`: where its text ends, the size (`None`: too
/// large to even parse) and whether it is synchronizing (`{n}`, not `{n+}`).
fn literal_marker(line: &[u8]) -> Option<(usize, Option<usize>, bool)> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|b| *b == b'{')?;
    let spec = &inner[open + 1..];
    let (digits, sync) = match spec.strip_suffix(b"+") {
        Some(d) => (d, false),
        None => (spec, true),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 7 digits are ever parsed: the limit is far smaller, and no overflow is possible.
    let size = match digits.len() <= 7 {
        true => std::str::from_utf8(digits).ok().and_then(|d| d.parse().ok()),
        false => None,
    };
    Some((open, size, sync))
}

/// The tokens of a command (text pieces with literals between them).
fn tokenize(pieces: &[Piece]) -> Option<Vec<Tok>> {
    let mut toks = Vec::new();
    for piece in pieces {
        let text = match piece {
            Piece::Literal(l) => {
                toks.push(Tok::Str(l.clone()));
                continue;
            }
            Piece::Text(t) => t,
        };
        let mut i = 0;
        while i < text.len() {
            match text[i] {
                b' ' => i += 1,
                b'(' => {
                    toks.push(Tok::Open);
                    i += 1;
                }
                b')' => {
                    toks.push(Tok::Close);
                    i += 1;
                }
                b'"' => {
                    let mut s = Vec::new();
                    i += 1;
                    loop {
                        match text.get(i)? {
                            b'"' => break,
                            b'\\' => {
                                let c = *text.get(i + 1)?;
                                if c != b'"' && c != b'\\' {
                                    return None;
                                }
                                s.push(c);
                                i += 2;
                            }
                            &c => {
                                s.push(c);
                                i += 1;
                            }
                        }
                    }
                    i += 1;
                    toks.push(Tok::Str(s));
                }
                _ => {
                    let start = i;
                    while i < text.len() && !b" ()\"".contains(&text[i]) {
                        if text[i] < b' ' || text[i] == 0x7f {
                            return None;
                        }
                        i += 1;
                    }
                    toks.push(Tok::Atom(text[start..i].to_vec()));
                }
            }
        }
    }
    Some(toks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::login::encode_plain;

    fn sent(actions: &[Action]) -> String {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(b) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            })
            .collect()
    }

    fn login_of(actions: &[Action]) -> Option<LoginRequest> {
        actions.iter().find_map(|a| match a {
            Action::Login(l) => Some(l.clone()),
            _ => None,
        })
    }

    fn creds(user: &str, pw: &[u8]) -> Credentials {
        Credentials { user: user.into(), password: pw.to_vec() }
    }

    fn open() -> Imap {
        Imap::new(true, true, false)
    }

    #[test]
    fn greeting_and_capabilities_look_like_dovecot() {
        let i = open();
        assert_eq!(
            String::from_utf8_lossy(&i.greeting("Dovecot ready.")),
            "* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS AUTH=PLAIN AUTH=LOGIN] Dovecot ready.\r\n"
        );
        let mut i = Imap::new(true, false, false);
        let caps = sent(&i.feed(b"a1 capability\r\n"));
        assert!(caps.starts_with("* CAPABILITY IMAP4rev1 ") && caps.contains("STARTTLS LOGINDISABLED\r\na1 OK "), "{caps}");
        let mut i = Imap::new(false, true, true);
        assert!(!sent(&i.feed(b"a CAPABILITY\r\n")).contains("STARTTLS"));
    }

    #[test]
    fn login_with_atoms_quoted_strings_and_literals() {
        let mut i = open();
        let l = login_of(&i.feed(b"a1 LOGIN alice secret\r\n")).unwrap();
        assert_eq!((l.credentials, l.method, l.tag), (creds("alice", b"secret"), Method::ImapLogin, Some("a1".into())));

        let mut i = open();
        let l = login_of(&i.feed(b"a2 login \"bob\" \"with \\\"quote\\\" \\\\ and space\"\r\n")).unwrap();
        assert_eq!(l.credentials, creds("bob", b"with \"quote\" \\ and space"));

        let mut i = open();
        assert_eq!(sent(&i.feed(b"a3 LOGIN {5}\r\n")), "+ OK\r\n");
        assert_eq!(sent(&i.feed(b"carol {4}\r\n")), "+ OK\r\n");
        let l = login_of(&i.feed(b"p w\n\r\n")).unwrap();
        assert_eq!(l.credentials, creds("carol", b"p w\n"));

        // LITERAL+: no continuation request.
        let mut i = open();
        let a = i.feed(b"a4 LOGIN {4+}\r\ndave {2+}\r\npw\r\n");
        assert_eq!(sent(&a), "");
        assert_eq!(login_of(&a).unwrap().credentials, creds("dave", b"pw"));
    }

    #[test]
    fn literal_sizes_are_checked_before_reading() {
        for huge in ["{4294967295}", "{99999999999999999999999}", "{1025+}"] {
            let mut i = open();
            let a = i.feed(format!("a1 LOGIN {huge}\r\n").as_bytes());
            assert_eq!(a, vec![Action::Send(b"a1 BAD Literal too large.\r\n".to_vec()), Action::Close], "{huge}");
            assert!(i.feed(b"alice\r\n").is_empty());
        }
        let mut i = open();
        assert_eq!(sent(&i.feed(b"x LOGIN {1024}\r\n")), "+ OK\r\n");
    }

    #[test]
    fn authenticate_plain_with_sasl_ir_and_continuation() {
        let ir = encode_plain(&creds("alice", b"pw"));
        let mut i = open();
        let l = login_of(&i.feed(format!("t AUTHENTICATE PLAIN {ir}\r\n").as_bytes())).unwrap();
        assert_eq!((l.credentials, l.method), (creds("alice", b"pw"), Method::ImapAuthenticate));

        let mut i = open();
        assert_eq!(sent(&i.feed(b"t AUTHENTICATE plain\r\n")), "+ \r\n");
        let l = login_of(&i.feed(format!("{ir}\r\n").as_bytes())).unwrap();
        assert_eq!((l.credentials, l.tag), (creds("alice", b"pw"), Some("t".into())));
    }

    #[test]
    fn authenticate_login_with_and_without_initial_response() {
        let mut i = open();
        assert_eq!(sent(&i.feed(b"t AUTHENTICATE LOGIN\r\n")), "+ VXNlcm5hbWU6\r\n");
        assert_eq!(sent(&i.feed(b"Ym9i\r\n")), "+ UGFzc3dvcmQ6\r\n");
        assert_eq!(login_of(&i.feed(b"cHc=\r\n")).unwrap().credentials, creds("bob", b"pw"));
        let mut i = open();
        assert_eq!(sent(&i.feed(b"t AUTHENTICATE LOGIN Ym9i\r\n")), "+ UGFzc3dvcmQ6\r\n");
        assert!(login_of(&i.feed(b"cHc=\r\n")).is_some());
    }

    #[test]
    fn sasl_errors_cancel_and_unknown_mechanisms() {
        let mut i = open();
        i.feed(b"t AUTHENTICATE PLAIN\r\n");
        assert_eq!(sent(&i.feed(b"%%%\r\n")), "t BAD Invalid base64 data in continued response\r\n");
        i.feed(b"t AUTHENTICATE PLAIN\r\n");
        assert_eq!(sent(&i.feed(b"*\r\n")), "t BAD Authentication aborted by client.\r\n");
        assert_eq!(sent(&i.feed(b"t AUTHENTICATE PLAIN AHVzZXI=\r\n")), "t NO [AUTHENTICATIONFAILED] Authentication failed.\r\n");
        assert_eq!(sent(&i.feed(b"t AUTHENTICATE CRAM-MD5\r\n")), "t NO Unsupported authentication mechanism.\r\n");
        // Still usable afterwards.
        assert!(login_of(&i.feed(b"u LOGIN a b\r\n")).is_some());
    }

    #[test]
    fn id_noop_logout() {
        let mut i = open();
        assert_eq!(
            sent(&i.feed(b"1 ID (\"name\" \"Thunderbird\" \"version\" {3+}\r\n1.0)\r\n")),
            "* ID NIL\r\n1 OK ID completed.\r\n"
        );
        assert_eq!(sent(&i.feed(b"2 ID NIL\r\n")), "* ID NIL\r\n2 OK ID completed.\r\n");
        assert_eq!(sent(&i.feed(b"3 NOOP\r\n")), "3 OK NOOP completed.\r\n");
        let a = i.feed(b"4 LOGOUT\r\n5 NOOP\r\n");
        assert_eq!(sent(&a), "* BYE Logging out\r\n4 OK Logout completed.\r\n");
        assert_eq!(a.last(), Some(&Action::Close));
    }

    #[test]
    fn starttls_discards_injection_and_refuses_twice() {
        let mut i = Imap::new(true, false, false);
        assert!(sent(&i.feed(b"a LOGIN x y\r\n")).starts_with("a NO [PRIVACYREQUIRED]"));
        let a = i.feed(b"b STARTTLS\r\nc LOGIN mallory x\r\n");
        assert_eq!(a, vec![Action::Send(b"b OK Begin TLS negotiation now.\r\n".to_vec()), Action::StartTls]);
        assert!(i.tls_started().is_empty());
        assert_eq!(sent(&i.feed(b"d STARTTLS\r\n")), "d BAD TLS is already active.\r\n");
        assert!(login_of(&i.feed(b"e LOGIN alice pw\r\n")).is_some());

        let mut i = Imap::new(false, true, false);
        assert_eq!(sent(&i.feed(b"b STARTTLS\r\n")), "b BAD TLS support isn't enabled.\r\n");
    }

    #[test]
    fn pipelined_commands_after_login_are_left_for_the_back_end() {
        let mut i = open();
        let a = i.feed(b"a LOGIN u p\r\nb SELECT INBOX\r\n");
        assert!(login_of(&a).is_some());
        assert_eq!(i.take_leftover(), b"b SELECT INBOX\r\n");

        let mut i = open();
        i.feed(b"a LOGIN u p\r\nb NOOP\r\n");
        assert_eq!(sent(&i.resume()), "b OK NOOP completed.\r\n");
    }

    #[test]
    fn over_long_lines_and_commands_close() {
        let mut i = open();
        let a = i.feed(&vec![b'a'; MAX_LINE + 1]);
        assert!(sent(&a).starts_with("* BAD Command line too long."));
        assert_eq!(a.last(), Some(&Action::Close));
        // Many literals adding up beyond the line limit.
        let mut i = open();
        let mut input = b"a ID (".to_vec();
        for _ in 0..20 {
            input.extend_from_slice(b"{1000+}\r\n");
            input.extend_from_slice(&[b'x'; 1000]);
        }
        let a = i.feed(&input);
        assert_eq!(a.last(), Some(&Action::Close));
    }

    #[test]
    fn bad_commands_are_counted() {
        let mut i = open();
        assert_eq!(sent(&i.feed(b"a SELECT INBOX\r\n")), "a BAD Error in IMAP command received by server.\r\n");
        assert_eq!(sent(&i.feed(b"\"unbalanced\r\n")), "* BAD Error in IMAP command received by server.\r\n");
        assert_eq!(sent(&i.feed(b"a LOGIN onlyuser\r\n")), "a BAD Error in IMAP command LOGIN: Invalid arguments.\r\n");
        // Three so far; the tenth closes.
        let mut last = Vec::new();
        for _ in 3..MAX_BAD_COMMANDS {
            last = i.feed(b"x FETCH 1\r\n");
        }
        assert_eq!(sent(&last), "* BYE Too many invalid IMAP commands.\r\n");
        assert_eq!(last.last(), Some(&Action::Close));
    }

    #[test]
    fn the_literal_marker_parser() {
        assert_eq!(literal_marker(b"a LOGIN {5}"), Some((8, Some(5), true)));
        assert_eq!(literal_marker(b"a LOGIN {5+}"), Some((8, Some(5), false)));
        assert_eq!(literal_marker(b"a LOGIN {}"), None);
        assert_eq!(literal_marker(b"a LOGIN {x}"), None);
        assert_eq!(literal_marker(b"a LOGIN {4294967295}"), Some((8, None, true)));
    }
}
