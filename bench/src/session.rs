//! One session over a real socket: connect, then shuttle lines between the server and a
//! [`Dialogue`], timing the phases. Every wait is bounded by the per-operation timeout.
use std::{
    io,
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{timeout, timeout_at},
};

use crate::proto::{Dialogue, ErrorKind, Event, ProtoError};

/// Longest reply line accepted; a server sending more without a newline is broken.
const MAX_LINE: usize = 64 * 1024;

/// Bytes asked of the kernel per read: a whole SMTP/POP3 reply, or most of a small fetched
/// message, in one `recv`.
const READ_CHUNK: usize = 8 * 1024;

/// Splits the server's byte stream into lines without copying or allocating per line.
///
/// Cheaper than tokio's `BufReader` + `read_until`: the buffer is not zero-filled when it is
/// created (tokio's is, 8 KiB per session), a line already buffered (the lines of a
/// multi-line reply usually arrive in one segment) is handed out without arming a timer, and
/// the line is borrowed from the buffer instead of being copied out of it.
struct LineReader {
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    pos: usize,
}

impl LineReader {
    fn new() -> LineReader {
        LineReader {
            buf: Vec::with_capacity(READ_CHUNK),
            pos: 0,
        }
    }

    /// Whether unconsumed bytes (a line without its newline) are buffered.
    fn partial(&self) -> bool {
        self.pos < self.buf.len()
    }

    /// The next line, with its `\n`; `None` at the end of the stream (check [`partial`] for
    /// a truncated last line). Waits at most `op_timeout` in total for the line.
    ///
    /// [`partial`]: LineReader::partial
    async fn next_line<R: AsyncRead + Unpin>(
        &mut self,
        stream: &mut R,
        op_timeout: Duration,
    ) -> Result<Option<&[u8]>, ProtoError> {
        let mut searched = self.pos;
        let mut deadline = None;
        loop {
            if let Some(i) = self.buf[searched..].iter().position(|&b| b == b'\n') {
                let (start, end) = (self.pos, searched + i + 1);
                if end - start > MAX_LINE {
                    return Err(too_long());
                }
                self.pos = end;
                return Ok(Some(&self.buf[start..end]));
            }
            if self.buf.len() - self.pos >= MAX_LINE {
                return Err(too_long());
            }
            // Nothing left to hand out: move the partial line (if any) to the front so the
            // buffer does not grow with the session.
            if self.pos > 0 {
                self.buf.drain(..self.pos);
                self.pos = 0;
            }
            searched = self.buf.len();
            self.buf.reserve(READ_CHUNK);
            let deadline = *deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + op_timeout);
            let n = timeout_at(deadline, stream.read_buf(&mut self.buf))
                .await
                .map_err(|_| timed_out("reading a reply"))?
                .map_err(|e| io_err("read", &e))?;
            if n == 0 {
                return Ok(None);
            }
        }
    }
}

fn too_long() -> ProtoError {
    ProtoError::new(ErrorKind::Protocol, "reply line too long")
}

/// What a session measured.
#[derive(Debug, Default)]
pub struct Outcome {
    pub connect: Option<Duration>,
    pub greeting: Option<Duration>,
    pub data_acks: Vec<Duration>,
    /// Messages accepted (SMTP) or retrieved (POP3/IMAP).
    pub messages: u64,
    /// Bytes of the retrieved messages (POP3/IMAP).
    pub bytes: u64,
    /// Start to end (successful sessions).
    pub session: Duration,
    pub error: Option<ProtoError>,
}

/// Maps an I/O error to its kind.
pub fn io_kind(e: &io::Error) -> ErrorKind {
    use io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => ErrorKind::Refused,
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => ErrorKind::Reset,
        K::TimedOut => ErrorKind::Timeout,
        K::UnexpectedEof => ErrorKind::Closed,
        _ => ErrorKind::Io,
    }
}

fn io_err(what: &str, e: &io::Error) -> ProtoError {
    ProtoError::new(io_kind(e), format!("{what}: {e}"))
}

fn timed_out(what: &str) -> ProtoError {
    ProtoError::new(ErrorKind::Timeout, format!("{what}: no answer in time"))
}

/// Runs one session against `target`. `start` is when the session was due: the scheduled
/// instant in open loop (so time spent waiting to be launched counts, see `load.rs`), now in
/// closed loop. `dialogue` is `None` for connect mode.
pub async fn run(
    target: SocketAddr,
    start: Instant,
    op_timeout: Duration,
    dialogue: Option<Box<dyn Dialogue>>,
) -> Outcome {
    let mut out = Outcome::default();
    if let Err(e) = drive(target, start, op_timeout, dialogue, &mut out).await {
        out.error = Some(e);
    }
    out.session = start.elapsed();
    out
}

async fn drive(
    target: SocketAddr,
    start: Instant,
    op_timeout: Duration,
    dialogue: Option<Box<dyn Dialogue>>,
    out: &mut Outcome,
) -> Result<(), ProtoError> {
    let mut stream = timeout(op_timeout, TcpStream::connect(target))
        .await
        .map_err(|_| timed_out("connect"))?
        .map_err(|e| io_err("connect", &e))?;
    let connected = Instant::now();
    out.connect = Some(connected - start);
    let Some(mut d) = dialogue else {
        return Ok(());
    };
    // Small request/reply exchanges: no Nagle delay on the client side.
    let _ = stream.set_nodelay(true);
    let mut lines = LineReader::new();
    let mut data_sent: Option<Instant> = None;
    loop {
        // One deadline per reply line, however many reads it takes (as `--timeout` says).
        let line = match lines.next_line(&mut stream, op_timeout).await? {
            Some(line) => line,
            None if d.eof_ok() => return Ok(()),
            None => {
                return Err(ProtoError::new(
                    ErrorKind::Closed,
                    if lines.partial() {
                        "connection closed mid-line"
                    } else {
                        "connection closed by the server"
                    },
                ));
            }
        };
        let step = d.feed(line)?;
        let now = Instant::now();
        for e in &step.events {
            match e {
                Event::Greeting => out.greeting = Some(now - connected),
                Event::DataAck => {
                    if let Some(t) = data_sent.take() {
                        out.data_acks.push(now - t);
                    }
                    out.messages += 1;
                }
                Event::Retrieved { bytes } => {
                    out.messages += 1;
                    out.bytes += bytes;
                }
            }
        }
        if !step.send.is_empty() {
            timeout(op_timeout, stream.write_all(&step.send))
                .await
                .map_err(|_| timed_out("write"))?
                .map_err(|e| io_err("write", &e))?;
            if step.timed_send {
                data_sent = Some(Instant::now());
            }
        }
        if step.done {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_split_joined_and_bounded() {
        let (mut client, mut server) = tokio::io::duplex(256 * 1024);
        let t = Duration::from_secs(5);
        let mut r = LineReader::new();
        // Several lines in one read, then a line split across two writes.
        server.write_all(b"250-a\r\n250 b\r\n25").await.unwrap();
        assert_eq!(r.next_line(&mut client, t).await.unwrap(), Some(&b"250-a\r\n"[..]));
        assert_eq!(r.next_line(&mut client, t).await.unwrap(), Some(&b"250 b\r\n"[..]));
        server.write_all(b"0 c\r\n").await.unwrap();
        assert_eq!(r.next_line(&mut client, t).await.unwrap(), Some(&b"250 c\r\n"[..]));
        // A truncated last line: end of stream, with the partial line noticed.
        server.write_all(b"221 by").await.unwrap();
        drop(server);
        assert_eq!(r.next_line(&mut client, t).await.unwrap(), None);
        assert!(r.partial());

        let (mut client, mut server) = tokio::io::duplex(256 * 1024);
        let mut r = LineReader::new();
        server.write_all(&vec![b'x'; MAX_LINE + 10]).await.unwrap();
        let e = r.next_line(&mut client, t).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Protocol);
    }

    #[tokio::test]
    async fn one_deadline_per_line() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let mut r = LineReader::new();
        server.write_all(b"220 no end").await.unwrap();
        let e = r
            .next_line(&mut client, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Timeout);
    }
}
