//! Non-delivery reports (RFC 3464): what the sender gets back for recipients that failed
//! permanently or expired in the queue. Pure: the caller queues the result like any message.
use std::{fmt::Write as _, net::SocketAddr};

use crate::relay::{ClientInfo, Envelope, MessageId, Recipient, rfc5322_date};

/// Most of the original header section quoted back; a huge header block should not make a
/// huge bounce.
const MAX_HEADERS: usize = 64 * 1024;

/// One recipient the report is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedRcpt {
    pub address: String,
    /// RFC 3463 status, e.g. `5.1.1`, or `4.4.7` for expiry.
    pub status: String,
    /// The back-end's reply (`550 5.1.1 no such user`) or our own reason; becomes the
    /// `Diagnostic-Code`.
    pub diagnostic: String,
    /// The back-end that gave the reply, if one did.
    pub remote_mta: Option<String>,
}

/// The bounce for `failed` recipients of `original`, or `None` when the original sender is
/// `<>` (never bounce a bounce: RFC 5321 §6.1, no loops). `content` is the original content
/// (only its header section is quoted); `reporting_mta` is our host name.
pub fn build(
    reporting_mta: &str,
    original: &Envelope,
    failed: &[FailedRcpt],
    content: &[u8],
    now: u64,
) -> Option<(Envelope, Vec<u8>)> {
    if original.mail_from.is_empty() || failed.is_empty() {
        return None;
    }
    let id = MessageId::generate();
    let headers = header_section(content);
    let mut boundary = format!("mxlb-dsn-{id}");
    while find(headers, boundary.as_bytes()) {
        boundary.push('x');
    }
    let date = rfc5322_date(now);
    let mut m = String::new();
    let _ = write!(
        m,
        "From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>\r\n\
         To: <{to}>\r\n\
         Subject: Undelivered Mail Returned to Sender\r\n\
         Date: {date}\r\n\
         Message-ID: <{id}@{reporting_mta}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated message.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Description: Notification\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         This is the mail system at {reporting_mta}.\r\n\
         \r\n\
         Your message (queue id {orig}) could not be delivered to one or more\r\n\
         recipients. It is attached below.\r\n\
         \r\n",
        to = original.mail_from,
        orig = original.id,
    );
    for f in failed {
        let _ = write!(m, "<{}>: {}\r\n", f.address, f.diagnostic);
    }
    let _ = write!(
        m,
        "\r\n--{boundary}\r\n\
         Content-Description: Delivery report\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {reporting_mta}\r\n\
         X-Mxlb-Queue-ID: {orig}\r\n\
         Arrival-Date: {arrival}\r\n",
        orig = original.id,
        arrival = rfc5322_date(original.accepted_at),
    );
    for f in failed {
        // RFC 6533: a non-ASCII address is of type utf-8.
        let kind = if f.address.is_ascii() { "rfc822" } else { "utf-8" };
        let _ = write!(m, "\r\nFinal-Recipient: {kind}; {}\r\nAction: failed\r\nStatus: {}\r\n", f.address, f.status);
        if let Some(mta) = &f.remote_mta {
            let _ = write!(m, "Remote-MTA: dns; {mta}\r\n");
        }
        let _ = write!(m, "Diagnostic-Code: smtp; {}\r\n", f.diagnostic);
    }
    let _ = write!(
        m,
        "\r\n--{boundary}\r\n\
         Content-Description: Undelivered Message Headers\r\n\
         Content-Type: text/rfc822-headers\r\n\
         \r\n"
    );
    let mut out = m.into_bytes();
    out.extend_from_slice(headers);
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());

    let envelope = Envelope {
        id,
        mail_from: String::new(),
        rcpts: vec![Recipient::new(original.mail_from.clone())],
        accepted_at: now,
        accepted_by: original.accepted_by.clone(),
        // Generated here: no client. An unspecified address makes XCLIENT say [UNAVAILABLE].
        client: ClientInfo {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            helo: reporting_mta.to_string(),
            tls: false,
            authenticated: false,
        },
        eight_bit: !out.is_ascii(),
        smtputf8: !original.mail_from.is_ascii(),
        size: out.len() as u64,
    };
    Some((envelope, out))
}

/// The header section of a message: up to and including the line before the first empty
/// line, bounded by [`MAX_HEADERS`] (cut at a line end).
fn header_section(content: &[u8]) -> &[u8] {
    let end = content.windows(4).position(|w| w == b"\r\n\r\n").map_or(content.len(), |i| i + 2);
    let end = end.min(MAX_HEADERS);
    let cut = &content[..end];
    if end < content.len() && !cut.ends_with(b"\r\n") {
        return cut.windows(2).rposition(|w| w == b"\r\n").map_or(&[][..], |i| &cut[..i + 2]);
    }
    cut
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn original(from: &str) -> Envelope {
        Envelope {
            id: "0006000000000000deadbeef".parse().unwrap(),
            mail_from: from.into(),
            rcpts: vec![Recipient::new("gone@d.test".into()), Recipient::new("ok@d.test".into())],
            accepted_at: 1_700_000_000,
            accepted_by: "lb1".into(),
            client: ClientInfo {
                addr: "192.0.2.1:4000".parse().unwrap(),
                helo: "c".into(),
                tls: false,
                authenticated: false,
            },
            eight_bit: false,
            smtputf8: false,
            size: 10,
        }
    }

    /// Splits a MIME body on `--boundary` lines: the parts between the first and the closing one.
    fn parts<'a>(body: &'a str, boundary: &str) -> Vec<&'a str> {
        let open = format!("\r\n--{boundary}\r\n");
        let close = format!("\r\n--{boundary}--\r\n");
        let (inner, after) = body.split_once(&close).expect("closing boundary");
        assert_eq!(after, "");
        inner.split(&open).skip(1).collect()
    }

    /// `Name: value` fields of a header block (unfolded), in order.
    fn fields(block: &str) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for line in block.split("\r\n") {
            if let Some(cont) = line.strip_prefix('\t') {
                if let Some(last) = out.last_mut() {
                    last.1.push(' ');
                    last.1.push_str(cont);
                }
            } else if let Some((k, v)) = line.split_once(": ") {
                out.push((k.to_string(), v.to_string()));
            }
        }
        out
    }

    #[test]
    fn bounce_is_a_delivery_status_report_with_the_original_headers() {
        let failed = [
            FailedRcpt {
                address: "gone@d.test".into(),
                status: "5.1.1".into(),
                diagnostic: "550 5.1.1 <gone@d.test>: no such user".into(),
                remote_mta: Some("mb1".into()),
            },
            FailedRcpt {
                address: "late@d.test".into(),
                status: "4.4.7".into(),
                diagnostic: "451 4.3.0 try later".into(),
                remote_mta: None,
            },
        ];
        let content = b"Subject: hello\r\nMessage-ID: <m1@src>\r\n\r\nsecret body\r\n";
        let (env, dsn) = build("relay.example", &original("alice@src.test"), &failed, content, 1_772_532_000).unwrap();
        assert_eq!(env.mail_from, "", "a bounce has the null reverse-path");
        assert_eq!(env.rcpts.iter().map(|r| r.address.as_str()).collect::<Vec<_>>(), ["alice@src.test"]);
        assert_eq!(env.size, dsn.len() as u64);

        let text = String::from_utf8(dsn).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let head = fields(head);
        let get = |k: &str| head.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(get("To"), "<alice@src.test>");
        assert_eq!(get("Date"), "Tue, 03 Mar 2026 10:00:00 +0000");
        let ctype = get("Content-Type");
        assert!(ctype.starts_with("multipart/report; report-type=delivery-status;"), "{ctype}");
        let boundary = ctype.split("boundary=\"").nth(1).unwrap().trim_end_matches('"');

        let parts = parts(body, boundary);
        assert_eq!(parts.len(), 3);
        let (h0, human) = parts[0].split_once("\r\n\r\n").unwrap();
        assert!(h0.contains("Content-Type: text/plain"));
        assert!(human.contains("<gone@d.test>: 550 5.1.1"));

        let (h1, status) = parts[1].split_once("\r\n\r\n").unwrap();
        assert!(h1.contains("Content-Type: message/delivery-status"));
        let groups: Vec<Vec<(String, String)>> = status.split("\r\n\r\n").map(fields).collect();
        assert_eq!(groups.len(), 3, "per-message fields and one group per recipient");
        assert!(groups[0].contains(&("Reporting-MTA".into(), "dns; relay.example".into())));
        let expect = [
            ("gone@d.test", "5.1.1", "smtp; 550 5.1.1 <gone@d.test>: no such user"),
            ("late@d.test", "4.4.7", "smtp; 451 4.3.0 try later"),
        ];
        for (g, (addr, st, diag)) in groups[1..].iter().zip(expect) {
            let get = |k: &str| g.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
            assert_eq!(get("Final-Recipient"), Some(format!("rfc822; {addr}").as_str()));
            assert_eq!(get("Action"), Some("failed"));
            assert_eq!(get("Status"), Some(st));
            assert_eq!(get("Diagnostic-Code"), Some(diag));
        }

        let (h2, quoted) = parts[2].split_once("\r\n\r\n").unwrap();
        assert!(h2.contains("Content-Type: text/rfc822-headers"));
        assert_eq!(quoted, "Subject: hello\r\nMessage-ID: <m1@src>\r\n");
        assert!(!text.contains("secret body"), "the body is not sent back");
    }

    #[test]
    fn no_bounce_to_the_null_sender() {
        let f =
            FailedRcpt { address: "x@y".into(), status: "5.0.0".into(), diagnostic: "550 no".into(), remote_mta: None };
        assert!(build("relay.example", &original(""), &[f], b"S: x\r\n\r\n", 0).is_none());
    }

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
    }
}
