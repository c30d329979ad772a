//! The store-and-forward SMTP relay: no message this cluster has answered `250` to is lost.
//!
//! A message is accepted on a `local` VIP (the XDP program passes its port to this node), written
//! durably to this node's spool *and* to the peer node's spool (the mirror), and only then
//! acknowledged. The node that accepted it delivers it to the back-ends and tells the mirror
//! when each message is done; if the node dies first, the mirror takes its copies over and
//! delivers them. Both nodes run both roles (each mirrors the other), so active-active VIPs work.
//!
//! # Layout
//! - [`smtp`]: the server side of SMTP as a pure state machine (bytes in, replies and events
//!   out): commands, extensions, limits, DATA/BDAT with smuggling-safe end-of-data detection.
//! - [`session`]: one client connection on a socket: timeouts, STARTTLS, per-source limits,
//!   the Received header; hands a finished message to an [`session::Acceptor`].
//! - [`auth`]: SMTP AUTH credentials (Dovecot passwd-file format).
//! - [`recipients`]: who may send mail to whom (relay domains, trusted networks, valid mailboxes).
//! - [`spool`]: the durable on-disk queue (own messages and the peer's replicas).
//! - [`mirror`]: the authenticated replication channel to the peer node and takeover.
//! - [`delivery`]: SMTP/LMTP to the back-ends: routing, connection reuse, retries, DSNs.
//! - [`service`]: ties them together inside `mxlb run`, and the queue commands of the CLI.
use std::{
    fmt,
    net::SocketAddr,
    str::FromStr,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

pub mod auth;
pub mod delivery;
pub mod mirror;
pub mod recipients;
pub mod service;
pub mod session;
pub mod smtp;
pub mod spool;

/// A queue id, unique across the cluster: the accept time in microseconds (so ids sort by
/// age, as Postfix's long queue ids do) and 32 random bits (so two nodes accepting in the same
/// microsecond do not collide). 24 lowercase hex digits; safe as a file name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MessageId(String);

impl MessageId {
    /// A fresh id for a message accepted now.
    pub fn generate() -> MessageId {
        let micros = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0);
        let mut random = [0u8; 4];
        // The OS random source only fails on a broken system; a zero suffix is still unique
        // within this node because the clock part moves on.
        let _ = getrandom::getrandom(&mut random);
        MessageId(format!("{:016x}{:08x}", micros as u64, u32::from_be_bytes(random)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An id that did not come from [`MessageId::generate`] (from the CLI, a file name, the peer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a queue id (24 hex digits)")]
pub struct BadMessageId(pub String);

impl FromStr for MessageId {
    type Err = BadMessageId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == 24 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(MessageId(s.to_string()))
        } else {
            Err(BadMessageId(s.to_string()))
        }
    }
}

impl TryFrom<String> for MessageId {
    type Error = BadMessageId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<MessageId> for String {
    fn from(id: MessageId) -> String {
        id.0
    }
}

/// Who handed us the message: shown in the Received header and passed on to back-ends that
/// accept XCLIENT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub addr: SocketAddr,
    /// The EHLO/HELO argument.
    pub helo: String,
    /// The session ran over TLS (STARTTLS).
    pub tls: bool,
    /// The client proved who it is (a certificate from the configured client CA): it may relay.
    pub authenticated: bool,
}

/// The relay's answer to `RCPT TO`, decided by [`recipients`] (relay rules, valid mailboxes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptVerdict {
    /// `250 2.1.5`.
    Accept,
    /// Not one of our domains and the client may not relay: `554 5.7.1 Relay access denied`.
    RelayDenied,
    /// One of our domains, but no such mailbox: `550 5.1.1`.
    UnknownUser,
    /// Cannot decide now (e.g. the mailbox list is unreadable): `450 4.x.x` with this text.
    TempFail(String),
}

/// What happened to one recipient so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RcptState {
    /// Still to deliver; `attempts` made so far, the next one not before `next_attempt` (unix s).
    Pending { attempts: u32, next_attempt: u64, last_reply: Option<String> },
    /// A back-end accepted it (its reply).
    Delivered { reply: String },
    /// Failed permanently or expired; a DSN went to the sender (unless the sender was `<>`).
    Bounced { reply: String },
}

impl RcptState {
    pub fn is_done(&self) -> bool {
        !matches!(self, RcptState::Pending { .. })
    }
}

/// One envelope recipient and its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// The forward-path without angle brackets (`user@example.net`).
    pub address: String,
    /// Flattened: `{"address": ..., "state": "pending", "attempts": 1, ...}` in JSON.
    #[serde(flatten)]
    pub state: RcptState,
}

impl Recipient {
    pub fn new(address: String) -> Recipient {
        Recipient { address, state: RcptState::Pending { attempts: 0, next_attempt: 0, last_reply: None } }
    }
}

/// The envelope of a queued message: everything except the content. The content (headers and
/// body, CRLF line endings, not dot-stuffed, our Received header first) is stored beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: MessageId,
    /// The reverse-path without angle brackets; empty for the null sender `<>` (bounces).
    pub mail_from: String,
    pub rcpts: Vec<Recipient>,
    /// Unix time of the 250 reply.
    pub accepted_at: u64,
    /// The node that accepted it (config `[node] name`, else the host name).
    pub accepted_by: String,
    pub client: ClientInfo,
    /// `BODY=8BITMIME` was given.
    pub eight_bit: bool,
    /// `SMTPUTF8` was given.
    pub smtputf8: bool,
    /// Content length in bytes.
    pub size: u64,
}

impl Envelope {
    /// Every recipient is delivered or bounced: the message can leave the queue.
    pub fn is_done(&self) -> bool {
        self.rcpts.iter().all(|r| r.state.is_done())
    }
}

/// `Tue, 03 Mar 2026 10:00:00 +0000` (RFC 5322 §3.3, in UTC): the Received header's date and
/// the dates in bounces.
pub fn rfc5322_date(unix: u64) -> String {
    let t = chrono::DateTime::from_timestamp(i64::try_from(unix).unwrap_or(i64::MAX), 0).unwrap_or_default();
    t.format("%a, %d %b %Y %H:%M:%S +0000").to_string()
}

/// Unix time now, in seconds.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_unique_sortable_and_parse_back() {
        let a = MessageId::generate();
        std::thread::sleep(std::time::Duration::from_micros(5));
        let b = MessageId::generate();
        assert_ne!(a, b);
        assert!(a < b, "{a} should sort before {b}");
        assert_eq!(a.as_str().parse::<MessageId>().unwrap(), a);
        assert!("../etc/passwd0000000000000".parse::<MessageId>().is_err());
        assert!("ABCDEF0123456789abcdef01".parse::<MessageId>().is_err());
    }
}
