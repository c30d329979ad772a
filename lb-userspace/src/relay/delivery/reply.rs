//! SMTP/LMTP replies as the delivery client reads them: any code, every line kept.
//!
//! [`crate::health::parse_reply`] does not fit here and is not generalised in place: it answers
//! "is this the one reply code I expected?" and keeps neither the code of a rejection (delivery
//! must tell `4xx` from `5xx` per recipient) nor the lines of an accepted reply (EHLO keywords,
//! the `250 ... queued as` text recorded per recipient). This parser returns the code and the
//! lines of whatever reply arrives, with the same line rules (CRLF or bare LF, no control
//! bytes, bounded lines and replies, one code per multi-line reply).
use std::fmt;

/// Longest reply line accepted, terminator not counted. RFC 5321 allows 512 octets; back-ends
/// in the cluster are trusted enough that a long EHLO line should not fail delivery, while a
/// bound still stops a peer that never ends a line.
pub const MAX_LINE: usize = 4096;

/// Longest multi-line reply accepted (an EHLO with many extensions is well under 2 KiB).
pub const MAX_REPLY: usize = 64 * 1024;

/// One complete reply: its three-digit code and the text of each line (after `ddd-`/`ddd `).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// A reply made up locally, for a failure the back-end never answered (a timeout, a
    /// missing extension), so that every recipient outcome carries the same kind of text.
    pub fn local(code: u16, text: impl Into<String>) -> Reply {
        Reply { code, lines: vec![text.into()] }
    }

    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// The RFC 3463 enhanced status code at the start of the text (`5.1.1`), if any.
    pub fn enhanced_status(&self) -> Option<&str> {
        let first = self.lines.first()?;
        let word = first.split(' ').next()?;
        let mut parts = word.split('.');
        let class = parts.next()?;
        let (subject, detail) = (parts.next()?, parts.next()?);
        let ok = matches!(class, "2" | "4" | "5")
            && parts.next().is_none()
            && [subject, detail].iter().all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
        ok.then_some(word)
    }
}

impl fmt::Display for Reply {
    /// `550 5.1.1 no such user / second line`: one log line, and the Diagnostic-Code of a DSN.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        for (i, line) in self.lines.iter().enumerate() {
            f.write_str(if i == 0 { " " } else { " / " })?;
            f.write_str(line)?;
        }
        Ok(())
    }
}

/// Bytes that are not an SMTP reply: the connection cannot be trusted any further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed reply from the back-end: {0}")]
pub struct Malformed(pub String);

/// Parses the reply at the start of `buf`: `Ok(None)` until it is complete, then the reply and
/// how many bytes it took (what follows belongs to later, pipelined replies).
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, Malformed> {
    let mut pos = 0;
    let mut code: Option<[u8; 3]> = None;
    let mut lines = Vec::new();
    loop {
        if pos > MAX_REPLY {
            return Err(Malformed(format!("reply longer than {MAX_REPLY} bytes")));
        }
        let rest = buf.get(pos..).unwrap_or_default();
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            if rest.len() > MAX_LINE + 1 {
                return Err(Malformed(format!("line longer than {MAX_LINE} bytes")));
            }
            return Ok(None);
        };
        let raw = &rest[..nl];
        let text = raw.strip_suffix(b"\r").unwrap_or(raw);
        if text.len() > MAX_LINE {
            return Err(Malformed(format!("line longer than {MAX_LINE} bytes")));
        }
        if let Some(&b) = text.iter().find(|&&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(Malformed(format!("control byte 0x{b:02x} in {}", excerpt(text))));
        }
        let (digits, sep, body) = match text {
            [a, b, c] => ([*a, *b, *c], b' ', &[][..]),
            [a, b, c, sep, body @ ..] => ([*a, *b, *c], *sep, body),
            _ => return Err(Malformed(format!("not a reply line: {}", excerpt(text)))),
        };
        if !digits.iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&digits[0]) || !matches!(sep, b' ' | b'-')
        {
            return Err(Malformed(format!("not a reply line: {}", excerpt(text))));
        }
        if let Some(c) = code
            && c != digits
        {
            return Err(Malformed(format!("code changed within a multi-line reply: {}", excerpt(text))));
        }
        code = Some(digits);
        lines.push(String::from_utf8_lossy(body).into_owned());
        pos += nl + 1;
        if sep == b' ' {
            let code = digits.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
            return Ok(Some((Reply { code, lines }, pos)));
        }
    }
}

fn excerpt(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(64)];
    format!("\"{}\"{}", cut.escape_ascii(), if bytes.len() > 64 { "..." } else { "" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_reply_is_complete_only_at_its_last_line_and_keeps_every_line() {
        let data = b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 1000\r\n354 go";
        for cut in 0..47 {
            assert_eq!(parse(&data[..cut]), Ok(None), "cut at {cut}");
        }
        let (reply, len) = parse(data).unwrap().unwrap();
        assert_eq!(len, 47);
        assert_eq!(reply.code, 250);
        assert_eq!(reply.lines, ["mx.example", "PIPELINING", "SIZE 1000"]);
        assert_eq!(reply.to_string(), "250 mx.example / PIPELINING / SIZE 1000");
    }

    #[test]
    fn bare_code_bare_lf_and_enhanced_status() {
        assert_eq!(parse(b"250\n").unwrap().unwrap().0, Reply { code: 250, lines: vec![String::new()] });
        let (r, _) = parse(b"550 5.1.1 <x@y>: no such user\r\n").unwrap().unwrap();
        assert!(r.is_permanent());
        assert_eq!(r.enhanced_status(), Some("5.1.1"));
        assert_eq!(parse(b"451 try later\r\n").unwrap().unwrap().0.enhanced_status(), None);
    }

    #[test]
    fn garbage_is_refused() {
        assert!(parse(b"HTTP/1.1 400 Bad\r\n").is_err());
        assert!(parse(b"250-a\r\n251 b\r\n").is_err());
        assert!(parse(b"250 a\x00b\r\n").is_err());
        assert!(parse(b"650 what\r\n").is_err());
        assert!(parse(&vec![b'2'; MAX_LINE + 10]).is_err());
    }
}
