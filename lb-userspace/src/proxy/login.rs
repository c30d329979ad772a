//! What the POP3 and IMAP dialogues share: the credentials a client gave, how it gave them
//! (so the replay to the back-end uses the same kind of command), the actions a dialogue asks
//! the session to carry out, and SASL PLAIN/LOGIN decoding.
//!
//! The proxy needs the password in clear: it replays the login to the owner, which checks it
//! (the proxy holds no user database). That is also why only PLAIN and LOGIN are offered, as
//! Dovecot's own proxy does; APOP and CRAM-MD5 answers could not be replayed.
use std::fmt;

use base64::Engine as _;

/// Longest pre-login command line (and SASL response line), CRLF included. Dovecot's login
/// processes allow about as much; a longer line is an attack or a broken client.
pub const MAX_LINE: usize = 8192;
/// Largest IMAP literal accepted before login (a user name or password). The size a client
/// announces is compared with this before anything is allocated.
pub const MAX_LITERAL: usize = 1024;
/// Invalid commands before the connection is closed (Dovecot: 10).
pub const MAX_BAD_COMMANDS: u32 = 10;

/// A user name and password, as the client sent them.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: Vec<u8>,
}

impl fmt::Debug for Credentials {
    /// Never prints the password (sessions are logged).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).field("password", &"<hidden>").finish()
    }
}

/// How the client logged in; the replay to the back-end uses the same family of command, so
/// the back-end's answer fits what the client expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// POP3 `USER` + `PASS`.
    Pop3UserPass,
    /// POP3 `AUTH PLAIN` or `AUTH LOGIN`.
    Pop3Sasl,
    /// IMAP `LOGIN`.
    ImapLogin,
    /// IMAP `AUTHENTICATE PLAIN` or `AUTHENTICATE LOGIN`.
    ImapAuthenticate,
}

/// A complete login the session must take to the owner of the mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRequest {
    pub credentials: Credentials,
    pub method: Method,
    /// The IMAP command's tag (the back-end's tagged answer then fits the client unchanged).
    pub tag: Option<String>,
}

/// What a dialogue asks the session to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write these bytes to the client.
    Send(Vec<u8>),
    /// The TLS handshake starts now (the positive answer was sent before). Input that arrived
    /// after the command is already discarded: it was sent in clear before TLS (an injection).
    StartTls,
    /// Take this login to the back-end; the dialogue waits until told how it went.
    Login(LoginRequest),
    /// Close the connection (after the replies before it).
    Close,
}

/// A SASL response that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    #[error("invalid base64 data")]
    Base64,
    #[error("malformed PLAIN response")]
    Malformed,
}

/// Decodes one base64 SASL response (`=` is the empty response, RFC 4959/5034).
pub fn decode_b64(text: &[u8]) -> Result<Vec<u8>, SaslError> {
    let text = text.trim_ascii();
    if text == b"=" {
        return Ok(Vec::new());
    }
    base64::engine::general_purpose::STANDARD.decode(text).map_err(|_| SaslError::Base64)
}

/// The credentials in a decoded PLAIN response (`authzid NUL authcid NUL password`, RFC 4616).
/// An authorization identity other than the user itself (a master-user login) is refused: the
/// proxy could not tell the back-end which identity it checked.
pub fn parse_plain(decoded: &[u8]) -> Result<Credentials, SaslError> {
    let mut parts = decoded.split(|b| *b == 0);
    let (Some(authz), Some(user), Some(password), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(SaslError::Malformed);
    };
    let user = String::from_utf8(user.to_vec()).map_err(|_| SaslError::Malformed)?;
    if user.is_empty() || !(authz.is_empty() || authz == user.as_bytes()) {
        return Err(SaslError::Malformed);
    }
    Ok(Credentials { user, password: password.to_vec() })
}

/// A user name from LOGIN's first response or a USER/LOGIN argument.
pub fn user_name(raw: &[u8]) -> Result<String, SaslError> {
    String::from_utf8(raw.to_vec()).map_err(|_| SaslError::Malformed).and_then(|u| match u.is_empty() {
        true => Err(SaslError::Malformed),
        false => Ok(u),
    })
}

/// The base64 PLAIN response for `c` (no authorization identity), for the replay.
pub fn encode_plain(c: &Credentials) -> String {
    let mut raw = Vec::with_capacity(c.user.len() + c.password.len() + 2);
    raw.push(0);
    raw.extend_from_slice(c.user.as_bytes());
    raw.push(0);
    raw.extend_from_slice(&c.password);
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// The base64 prompts of the LOGIN mechanism (`Username:`, `Password:`), as Dovecot sends them.
pub const LOGIN_USER_PROMPT: &str = "VXNlcm5hbWU6";
pub const LOGIN_PASS_PROMPT: &str = "UGFzc3dvcmQ6";

/// No line end within [`MAX_LINE`] bytes: the caller answers and closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("line too long")]
pub struct LineTooLong;

/// The next complete line in `buf` (without its line end), removed from it.
pub fn take_line(buf: &mut Vec<u8>) -> Result<Option<Vec<u8>>, LineTooLong> {
    match buf.iter().position(|b| *b == b'\n') {
        Some(i) if i + 1 > MAX_LINE => Err(LineTooLong),
        Some(i) => {
            let mut line: Vec<u8> = buf.drain(..=i).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            Ok(Some(line))
        }
        None if buf.len() >= MAX_LINE => Err(LineTooLong),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_responses_decode_and_refuse_other_identities() {
        let c = parse_plain(b"\0alice\0s3cret pw").unwrap();
        assert_eq!(c.user, "alice");
        assert_eq!(c.password, b"s3cret pw");
        assert_eq!(parse_plain(b"alice\0alice\0pw").unwrap().user, "alice");
        assert_eq!(parse_plain(b"admin\0alice\0pw"), Err(SaslError::Malformed));
        assert_eq!(parse_plain(b"\0alice"), Err(SaslError::Malformed));
        assert_eq!(parse_plain(b"\0\0pw"), Err(SaslError::Malformed));
        assert_eq!(parse_plain(b"\0a\0b\0c"), Err(SaslError::Malformed));
        assert_eq!(parse_plain(b"\0\xff\0pw"), Err(SaslError::Malformed));
    }

    #[test]
    fn base64_round_trip_and_errors() {
        let c = Credentials { user: "bob".into(), password: b"x\0y".to_vec() };
        let enc = encode_plain(&c);
        assert_eq!(parse_plain(&decode_b64(enc.as_bytes()).unwrap()).unwrap_err(), SaslError::Malformed);
        let c = Credentials { user: "bob".into(), password: b"pw".to_vec() };
        assert_eq!(parse_plain(&decode_b64(encode_plain(&c).as_bytes()).unwrap()).unwrap(), c);
        assert_eq!(decode_b64(b"="), Ok(vec![]));
        assert_eq!(decode_b64(b"!!!"), Err(SaslError::Base64));
        assert_eq!(decode_b64(b"YWJj\r"), Ok(b"abc".to_vec()));
    }

    #[test]
    fn lines_are_bounded() {
        let mut b = b"abc\r\ndef\nxy".to_vec();
        assert_eq!(take_line(&mut b), Ok(Some(b"abc".to_vec())));
        assert_eq!(take_line(&mut b), Ok(Some(b"def".to_vec())));
        assert_eq!(take_line(&mut b), Ok(None));
        let mut long = vec![b'a'; MAX_LINE];
        assert_eq!(take_line(&mut long), Err(LineTooLong));
        let mut long = vec![b'a'; MAX_LINE + 5];
        long.push(b'\n');
        assert_eq!(take_line(&mut long), Err(LineTooLong));
    }

    #[test]
    fn debug_hides_the_password() {
        let c = Credentials { user: "u".into(), password: b"topsecret".to_vec() };
        assert!(!format!("{c:?}").contains("topsecret"));
    }
}
