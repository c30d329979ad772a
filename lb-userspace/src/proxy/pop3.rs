//! The POP3 dialogue before login (RFC 1939, 2449 CAPA, 2595 STLS, 5034 SASL), as a pure state
//! machine: bytes from the client in, [`Action`]s out. It answers what a Dovecot login process
//! answers, with Dovecot's wording, until the client has given a user name and password; the
//! session then takes the login to the owner's back-end.
//!
//! APOP is not offered (no timestamp in the greeting) and refused as Dovecot refuses it when
//! disabled: the proxy needs the clear password to replay the login.
use super::login::{
    Action, Credentials, LOGIN_PASS_PROMPT, LOGIN_USER_PROMPT, LoginRequest, MAX_BAD_COMMANDS, Method, decode_b64, parse_plain,
    take_line, user_name,
};

/// Answer to a failed login (wrong password, unknown user): Dovecot's words.
pub const AUTH_FAILED: &[u8] = b"-ERR [AUTH] Authentication failed.\r\n";
/// Answer when the owner cannot be reached or the source is blocked: try later.
pub const TEMP_FAILURE: &[u8] = b"-ERR [SYS/TEMP] Account is temporarily unavailable.\r\n";
/// The client did not log in within the login timeout.
pub const TIMEOUT: &[u8] = b"-ERR Disconnected for inactivity.\r\n";
/// Too many sessions (in all or from this source).
pub const TOO_MANY: &[u8] = b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n";

/// Where the dialogue is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wait {
    /// A command line.
    Command,
    /// AUTH PLAIN without initial response: the base64 response.
    PlainResponse,
    /// AUTH LOGIN: the user name, then the password.
    LoginUser,
    LoginPassword(String),
    /// STLS or a login is being carried out: nothing is read meanwhile.
    Paused,
    Closed,
}

/// One client's POP3 pre-login dialogue.
#[derive(Debug)]
pub struct Pop3 {
    tls_available: bool,
    allow_plaintext: bool,
    secure: bool,
    buf: Vec<u8>,
    wait: Wait,
    /// The USER given, awaiting PASS.
    user: Option<String>,
    bad: u32,
}

impl Pop3 {
    /// `tls_available`: STLS can be offered (a certificate is configured and the connection
    /// is not TLS yet). `secure`: the connection is TLS already (995).
    pub fn new(tls_available: bool, allow_plaintext: bool, secure: bool) -> Pop3 {
        Pop3 { tls_available, allow_plaintext, secure, buf: Vec::new(), wait: Wait::Command, user: None, bad: 0 }
    }

    /// The greeting (no APOP timestamp).
    pub fn greeting(text: &str) -> Vec<u8> {
        format!("+OK {text}\r\n").into_bytes()
    }

    /// Input from the client; the actions it causes.
    pub fn feed(&mut self, data: &[u8]) -> Vec<Action> {
        if self.wait != Wait::Closed {
            self.buf.extend_from_slice(data);
        }
        self.run()
    }

    /// After a failed login: go on with input the client sent meanwhile (pipelining).
    pub fn resume(&mut self) -> Vec<Action> {
        if self.wait == Wait::Paused {
            self.wait = Wait::Command;
        }
        self.run()
    }

    /// The TLS handshake after STLS succeeded.
    pub fn tls_started(&mut self) -> Vec<Action> {
        self.secure = true;
        self.tls_available = false;
        self.user = None;
        self.buf.clear();
        self.resume()
    }

    /// What the client sent after its successful login (for the back-end).
    pub fn take_leftover(&mut self) -> Vec<u8> {
        self.wait = Wait::Closed;
        std::mem::take(&mut self.buf)
    }

    fn plaintext_ok(&self) -> bool {
        self.secure || self.allow_plaintext
    }

    fn run(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        while matches!(self.wait, Wait::Command | Wait::PlainResponse | Wait::LoginUser | Wait::LoginPassword(_)) {
            let line = match take_line(&mut self.buf) {
                Ok(Some(l)) => l,
                Ok(None) => break,
                Err(_) => {
                    out.push(Action::Send(b"-ERR Input line too long.\r\n".to_vec()));
                    self.close(&mut out);
                    break;
                }
            };
            match std::mem::replace(&mut self.wait, Wait::Command) {
                Wait::Command => self.command(&line, &mut out),
                Wait::PlainResponse => self.sasl_plain(&line, &mut out),
                Wait::LoginUser => self.sasl_login_user(&line, &mut out),
                Wait::LoginPassword(user) => self.sasl_login_password(user, &line, &mut out),
                Wait::Paused | Wait::Closed => unreachable_state(&mut out),
            }
        }
        out
    }

    fn close(&mut self, out: &mut Vec<Action>) {
        out.push(Action::Close);
        self.wait = Wait::Closed;
        self.buf.clear();
    }

    fn bad_command(&mut self, reply: &str, out: &mut Vec<Action>) {
        self.bad += 1;
        if self.bad >= MAX_BAD_COMMANDS {
            out.push(Action::Send(b"-ERR Too many invalid bad commands.\r\n".to_vec()));
            self.close(out);
        } else {
            out.push(Action::Send(format!("-ERR {reply}\r\n").into_bytes()));
        }
    }

    fn login(&mut self, credentials: Credentials, method: Method, out: &mut Vec<Action>) {
        self.wait = Wait::Paused;
        self.user = None;
        out.push(Action::Login(LoginRequest { credentials, method, tag: None }));
    }

    fn command(&mut self, line: &[u8], out: &mut Vec<Action>) {
        let text = String::from_utf8_lossy(line);
        let (verb, args) = match text.split_once(' ') {
            Some((v, a)) => (v.to_ascii_uppercase(), a),
            None => (text.to_ascii_uppercase(), ""),
        };
        let send = |out: &mut Vec<Action>, s: &str| out.push(Action::Send(s.as_bytes().to_vec()));
        match verb.as_str() {
            "CAPA" => {
                let mut s = String::from("+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n");
                if self.tls_available {
                    s += "STLS\r\n";
                }
                if self.plaintext_ok() {
                    s += "USER\r\nSASL PLAIN LOGIN\r\n";
                }
                s += ".\r\n";
                send(out, &s);
            }
            "QUIT" => {
                send(out, "+OK Logging out\r\n");
                self.close(out);
            }
            "STLS" if self.secure => send(out, "-ERR TLS is already active.\r\n"),
            "STLS" if !self.tls_available => send(out, "-ERR TLS support isn't enabled.\r\n"),
            "STLS" => {
                send(out, "+OK Begin TLS negotiation now.\r\n");
                // Anything after STLS in the same read was sent in clear: never act on it.
                self.buf.clear();
                self.wait = Wait::Paused;
                out.push(Action::StartTls);
            }
            "USER" | "PASS" | "AUTH" if !(self.plaintext_ok() || verb == "AUTH" && args.is_empty()) => {
                send(out, "-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n")
            }
            "USER" => match user_name(args.as_bytes()) {
                Ok(u) if !args.contains(' ') => {
                    self.user = Some(u);
                    send(out, "+OK\r\n");
                }
                _ => self.bad_command("Invalid user name.", out),
            },
            "PASS" => match self.user.take() {
                // The password is everything after "PASS " (it may contain spaces), as bytes.
                Some(user) => {
                    let password = line.get(5..).unwrap_or_default().to_vec();
                    self.login(Credentials { user, password }, Method::Pop3UserPass, out);
                }
                None => send(out, "-ERR No username given.\r\n"),
            },
            "APOP" => send(out, "-ERR APOP not enabled.\r\n"),
            "AUTH" if args.is_empty() => send(out, "+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"),
            "AUTH" => {
                let mut words = args.split(' ');
                let mech = words.next().unwrap_or_default().to_ascii_uppercase();
                let initial = words.next();
                if words.next().is_some() {
                    return self.bad_command("Invalid AUTH parameters.", out);
                }
                match (mech.as_str(), initial) {
                    ("PLAIN", Some(ir)) => self.sasl_plain(ir.as_bytes(), out),
                    ("PLAIN", None) => {
                        send(out, "+ \r\n");
                        self.wait = Wait::PlainResponse;
                    }
                    ("LOGIN", Some(ir)) => self.sasl_login_user(ir.as_bytes(), out),
                    ("LOGIN", None) => {
                        send(out, &format!("+ {LOGIN_USER_PROMPT}\r\n"));
                        self.wait = Wait::LoginUser;
                    }
                    _ => send(out, "-ERR Unsupported authentication mechanism.\r\n"),
                }
            }
            _ => self.bad_command("Unknown command.", out),
        }
    }

    /// `*` cancels an exchange (RFC 5034 §4).
    fn cancelled(line: &[u8], out: &mut Vec<Action>) -> bool {
        if line.trim_ascii() == b"*" {
            out.push(Action::Send(b"-ERR Authentication aborted by client.\r\n".to_vec()));
            return true;
        }
        false
    }

    fn sasl_plain(&mut self, line: &[u8], out: &mut Vec<Action>) {
        if Self::cancelled(line, out) {
            return;
        }
        match decode_b64(line) {
            Err(_) => out.push(Action::Send(b"-ERR Invalid base64 data in continued response\r\n".to_vec())),
            // A well-formed but unusable response is a failed login, as the server would say.
            Ok(raw) => match parse_plain(&raw) {
                Ok(c) => self.login(c, Method::Pop3Sasl, out),
                Err(_) => out.push(Action::Send(AUTH_FAILED.to_vec())),
            },
        }
    }

    fn sasl_login_user(&mut self, line: &[u8], out: &mut Vec<Action>) {
        if Self::cancelled(line, out) {
            return;
        }
        match decode_b64(line).map(|raw| user_name(&raw)) {
            Err(_) => out.push(Action::Send(b"-ERR Invalid base64 data in continued response\r\n".to_vec())),
            Ok(Err(_)) => out.push(Action::Send(AUTH_FAILED.to_vec())),
            Ok(Ok(user)) => {
                out.push(Action::Send(format!("+ {LOGIN_PASS_PROMPT}\r\n").into_bytes()));
                self.wait = Wait::LoginPassword(user);
            }
        }
    }

    fn sasl_login_password(&mut self, user: String, line: &[u8], out: &mut Vec<Action>) {
        if Self::cancelled(line, out) {
            return;
        }
        match decode_b64(line) {
            Err(_) => out.push(Action::Send(b"-ERR Invalid base64 data in continued response\r\n".to_vec())),
            Ok(password) => self.login(Credentials { user, password }, Method::Pop3Sasl, out),
        }
    }
}

/// Never reached (the loop only reads in reading states); closes rather than panics.
fn unreachable_state(out: &mut Vec<Action>) {
    out.push(Action::Close);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::login::{MAX_LINE, encode_plain};

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

    fn creds(user: &str, pw: &str) -> Credentials {
        Credentials { user: user.into(), password: pw.as_bytes().to_vec() }
    }

    #[test]
    fn user_pass_logs_in_with_a_password_containing_spaces() {
        let mut p = Pop3::new(true, true, false);
        let a = p.feed(b"USER alice\r\n");
        assert_eq!(sent(&a), "+OK\r\n");
        let a = p.feed(b"PASS two words\r\n");
        let l = login_of(&a).unwrap();
        assert_eq!(l.credentials, creds("alice", "two words"));
        assert_eq!(l.method, Method::Pop3UserPass);
        // Paused while the login runs: nothing more is read.
        assert!(p.feed(b"STAT\r\n").is_empty());
        assert_eq!(p.take_leftover(), b"STAT\r\n");
    }

    #[test]
    fn pass_without_user_is_refused() {
        let mut p = Pop3::new(false, true, false);
        assert_eq!(sent(&p.feed(b"PASS x\r\n")), "-ERR No username given.\r\n");
    }

    #[test]
    fn auth_plain_with_and_without_initial_response() {
        let ir = encode_plain(&creds("bob", "pw"));
        let mut p = Pop3::new(false, true, false);
        let l = login_of(&p.feed(format!("AUTH PLAIN {ir}\r\n").as_bytes())).unwrap();
        assert_eq!((l.credentials, l.method), (creds("bob", "pw"), Method::Pop3Sasl));

        let mut p = Pop3::new(false, true, false);
        assert_eq!(sent(&p.feed(b"auth plain\r\n")), "+ \r\n");
        let l = login_of(&p.feed(format!("{ir}\r\n").as_bytes())).unwrap();
        assert_eq!(l.credentials, creds("bob", "pw"));
    }

    #[test]
    fn auth_login_with_continuations_and_initial_response() {
        let mut p = Pop3::new(false, true, false);
        assert_eq!(sent(&p.feed(b"AUTH LOGIN\r\n")), "+ VXNlcm5hbWU6\r\n");
        assert_eq!(sent(&p.feed(b"Y2Fyb2w=\r\n")), "+ UGFzc3dvcmQ6\r\n");
        let l = login_of(&p.feed(b"cHc=\r\n")).unwrap();
        assert_eq!(l.credentials, creds("carol", "pw"));

        let mut p = Pop3::new(false, true, false);
        assert_eq!(sent(&p.feed(b"AUTH LOGIN Y2Fyb2w=\r\n")), "+ UGFzc3dvcmQ6\r\n");
        assert!(login_of(&p.feed(b"cHc=\r\n")).is_some());
    }

    #[test]
    fn sasl_errors_and_cancel() {
        let mut p = Pop3::new(false, true, false);
        p.feed(b"AUTH PLAIN\r\n");
        assert_eq!(sent(&p.feed(b"***notbase64\r\n")), "-ERR Invalid base64 data in continued response\r\n");
        p.feed(b"AUTH PLAIN\r\n");
        assert_eq!(sent(&p.feed(b"*\r\n")), "-ERR Authentication aborted by client.\r\n");
        // A master-user identity or a missing password: a failed login, as Dovecot answers.
        assert_eq!(sent(&p.feed(b"AUTH PLAIN YWRtaW4AYWxpY2UAcHc=\r\n")), "-ERR [AUTH] Authentication failed.\r\n");
        assert_eq!(sent(&p.feed(b"AUTH CRAM-MD5\r\n")), "-ERR Unsupported authentication mechanism.\r\n");
        assert_eq!(sent(&p.feed(b"AUTH\r\n")), "+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n");
    }

    #[test]
    fn apop_is_refused_like_a_server_without_it() {
        let mut p = Pop3::new(false, true, false);
        assert_eq!(sent(&p.feed(b"APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n")), "-ERR APOP not enabled.\r\n");
        assert!(!String::from_utf8_lossy(&Pop3::greeting("ready.")).contains('<'));
    }

    #[test]
    fn capa_follows_tls_and_plaintext_settings() {
        let mut p = Pop3::new(true, true, false);
        let capa = sent(&p.feed(b"CAPA\r\n"));
        assert!(capa.starts_with("+OK\r\nCAPA\r\n") && capa.ends_with(".\r\n"), "{capa}");
        assert!(capa.contains("STLS\r\n") && capa.contains("USER\r\n") && capa.contains("SASL PLAIN LOGIN\r\n"));
        assert!(!capa.contains("APOP"));

        let mut p = Pop3::new(true, false, false);
        let capa = sent(&p.feed(b"CAPA\r\n"));
        assert!(capa.contains("STLS") && !capa.contains("USER") && !capa.contains("SASL"), "{capa}");
        assert!(sent(&p.feed(b"USER alice\r\n")).starts_with("-ERR [AUTH] Plaintext authentication disallowed"));
        assert!(sent(&p.feed(b"AUTH PLAIN AGEAYg==\r\n")).starts_with("-ERR [AUTH] Plaintext"));
    }

    #[test]
    fn stls_discards_injected_commands_and_then_allows_login() {
        let mut p = Pop3::new(true, false, false);
        let a = p.feed(b"STLS\r\nUSER mallory\r\nPASS x\r\n");
        assert_eq!(a, vec![Action::Send(b"+OK Begin TLS negotiation now.\r\n".to_vec()), Action::StartTls]);
        assert!(p.tls_started().is_empty());
        let capa = sent(&p.feed(b"CAPA\r\n"));
        assert!(!capa.contains("STLS") && capa.contains("USER"), "{capa}");
        assert_eq!(sent(&p.feed(b"STLS\r\n")), "-ERR TLS is already active.\r\n");
        // The USER before STLS was dropped.
        assert_eq!(sent(&p.feed(b"PASS x\r\n")), "-ERR No username given.\r\n");
    }

    #[test]
    fn stls_without_a_certificate() {
        let mut p = Pop3::new(false, true, false);
        assert_eq!(sent(&p.feed(b"STLS\r\n")), "-ERR TLS support isn't enabled.\r\n");
    }

    #[test]
    fn a_failed_login_resumes_with_pipelined_commands() {
        let mut p = Pop3::new(false, true, false);
        let a = p.feed(b"USER a\r\nPASS b\r\nQUIT\r\n");
        assert!(login_of(&a).is_some());
        let a = p.resume();
        assert_eq!(a, vec![Action::Send(b"+OK Logging out\r\n".to_vec()), Action::Close]);
    }

    #[test]
    fn over_long_lines_close() {
        let mut p = Pop3::new(false, true, false);
        let a = p.feed(&vec![b'A'; MAX_LINE + 1]);
        assert_eq!(a, vec![Action::Send(b"-ERR Input line too long.\r\n".to_vec()), Action::Close]);
        assert!(p.feed(b"CAPA\r\n").is_empty());
    }

    #[test]
    fn split_input_and_bare_lf() {
        let mut p = Pop3::new(false, true, false);
        assert!(p.feed(b"US").is_empty());
        assert_eq!(sent(&p.feed(b"ER x\n")), "+OK\r\n");
    }

    #[test]
    fn too_many_bad_commands_close() {
        let mut p = Pop3::new(false, true, false);
        let mut last = Vec::new();
        for _ in 0..MAX_BAD_COMMANDS {
            last = p.feed(b"RETR 1\r\n");
        }
        assert_eq!(last.last(), Some(&Action::Close));
        assert!(sent(&last).contains("Too many invalid"));
    }
}
