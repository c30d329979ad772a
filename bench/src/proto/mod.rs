//! Protocol dialogues, kept free of I/O: each is a small state machine that is fed the server's
//! lines (with their line ending) and answers with what to send next. The socket code in
//! `session.rs` only moves bytes and takes times, so every dialogue is unit-tested with canned
//! replies and no network.
pub mod imap;
pub mod pop3;
pub mod smtp;

use serde::Serialize;

/// Why a session failed. Every failure is counted under exactly one kind and reported, so a
/// fast but failing run cannot pass for a fast one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum ErrorKind {
    /// The connection was refused (RST to the SYN).
    Refused,
    /// The connection was reset (or the pipe broke) by the peer.
    Reset,
    /// An operation (connect, read of a line, write) took longer than `--timeout`.
    Timeout,
    /// A 4xx SMTP reply (IMAP `NO` too: the server declined, possibly for now).
    Temp4xx,
    /// A 5xx SMTP reply (POP3 `-ERR`, IMAP `BAD` too: the server rejected the command).
    Perm5xx,
    /// The server closed the connection before the dialogue ended.
    Closed,
    /// A reply that does not parse or does not fit the dialogue (also: a seeded mailbox with
    /// fewer messages than `--fetch`, a message of the wrong size).
    Protocol,
    /// Any other I/O error (address unreachable, too many open files…).
    Io,
    /// Open loop only: a scheduled start not launched because `--max-in-flight` sessions were
    /// already running. Counted instead of silently delaying the start (which would hide the
    /// overload the schedule exists to reveal).
    InFlightCap,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::Refused,
        ErrorKind::Reset,
        ErrorKind::Timeout,
        ErrorKind::Temp4xx,
        ErrorKind::Perm5xx,
        ErrorKind::Closed,
        ErrorKind::Protocol,
        ErrorKind::Io,
        ErrorKind::InFlightCap,
    ];

    /// The stable key used in the table and in `--json`.
    pub fn key(self) -> &'static str {
        match self {
            ErrorKind::Refused => "refused",
            ErrorKind::Reset => "reset",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Temp4xx => "4xx",
            ErrorKind::Perm5xx => "5xx",
            ErrorKind::Closed => "closed",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Io => "io",
            ErrorKind::InFlightCap => "in_flight_cap",
        }
    }

    pub fn index(self) -> usize {
        ErrorKind::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }
}

/// A dialogue failure: its kind and the offending line, for diagnostics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", kind.key())]
pub struct ProtoError {
    pub kind: ErrorKind,
    pub detail: String,
}

impl ProtoError {
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        ProtoError {
            kind,
            detail: detail.into(),
        }
    }

    /// A reply that does not fit, quoting it (trimmed, lossy).
    pub fn unexpected(line: &[u8]) -> Self {
        ProtoError::new(
            ErrorKind::Protocol,
            format!("unexpected reply {:?}", trim(line)),
        )
    }
}

/// What a session retrieves: how many messages, and the size each must have (if known).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetch {
    /// Messages 1..=count are retrieved, one command each (at least 1).
    pub count: u32,
    /// Each message must be exactly this many bytes (as received; CRLFs included).
    pub expect_size: Option<u64>,
}

impl Default for Fetch {
    fn default() -> Self {
        Fetch { count: 1, expect_size: None }
    }
}

impl Fetch {
    /// Checks one retrieved message's size against the expected one.
    pub fn check_size(&self, which: &str, got: u64) -> Result<(), ProtoError> {
        match self.expect_size {
            Some(want) if want != got => Err(ProtoError::new(
                ErrorKind::Protocol,
                format!("{which}: {got} bytes, expected {want}"),
            )),
            _ => Ok(()),
        }
    }
}

/// Something that happened in the dialogue that the session code timestamps or counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The server's greeting is complete.
    Greeting,
    /// The end-of-DATA reply (250) arrived: one message accepted. Its latency runs from the
    /// end of the write that carried the message's final `.`.
    DataAck,
    /// One message retrieved (POP3 RETR, IMAP FETCH), `bytes` long as the client received it
    /// (POP3: dot-unstuffed, CRLFs included; IMAP: the literal), so a run can show it moved
    /// the bytes it claims to have moved.
    Retrieved { bytes: u64 },
}

/// What to do after a line: bytes to send (maybe none, then read on), events, whether the
/// dialogue is over.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Step {
    pub send: Vec<u8>,
    pub events: Vec<Event>,
    /// Start the end-of-DATA clock once `send` is written.
    pub timed_send: bool,
    pub done: bool,
}

impl Step {
    pub fn read_on() -> Step {
        Step::default()
    }

    pub fn send(bytes: impl Into<Vec<u8>>) -> Step {
        Step {
            send: bytes.into(),
            ..Step::default()
        }
    }

    pub fn event(mut self, e: Event) -> Step {
        self.events.push(e);
        self
    }

    pub fn done() -> Step {
        Step {
            done: true,
            ..Step::default()
        }
    }
}

/// A client dialogue: fed each line the server sends (including its `\r\n`).
pub trait Dialogue: Send {
    fn feed(&mut self, line: &[u8]) -> Result<Step, ProtoError>;

    /// Whether an end of stream now is the normal end (the logout/quit was sent; some servers
    /// close before or instead of answering it).
    fn eof_ok(&self) -> bool;
}

/// The line without its line ending, as text (lossy), for messages.
pub fn trim(line: &[u8]) -> String {
    String::from_utf8_lossy(line)
        .trim_end_matches(['\r', '\n'])
        .to_string()
}
