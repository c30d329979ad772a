//! One session over a real socket: connect, then shuttle lines between the server and a
//! [`Dialogue`], timing the phases. Every wait is bounded by the per-operation timeout.
use std::{
    io,
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    time::timeout,
};

use crate::proto::{Dialogue, ErrorKind, Event, ProtoError};

/// Longest reply line accepted; a server sending more without a newline is broken.
const MAX_LINE: u64 = 64 * 1024;

/// What a session measured.
#[derive(Debug, Default)]
pub struct Outcome {
    pub connect: Option<Duration>,
    pub greeting: Option<Duration>,
    pub data_acks: Vec<Duration>,
    /// Messages accepted (SMTP) or retrieved (POP3/IMAP).
    pub messages: u64,
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
    let stream = timeout(op_timeout, TcpStream::connect(target))
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
    let mut reader = BufReader::new(stream);
    let mut line = Vec::with_capacity(512);
    let mut data_sent: Option<Instant> = None;
    loop {
        line.clear();
        let n = timeout(
            op_timeout,
            (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line),
        )
        .await
        .map_err(|_| timed_out("reading a reply"))?
        .map_err(|e| io_err("read", &e))?;
        if n == 0 {
            if d.eof_ok() {
                return Ok(());
            }
            return Err(ProtoError::new(
                ErrorKind::Closed,
                "connection closed by the server",
            ));
        }
        if !line.ends_with(b"\n") {
            if line.len() as u64 >= MAX_LINE {
                return Err(ProtoError::new(ErrorKind::Protocol, "reply line too long"));
            }
            if d.eof_ok() {
                return Ok(());
            }
            return Err(ProtoError::new(
                ErrorKind::Closed,
                "connection closed mid-line",
            ));
        }
        let step = d.feed(&line)?;
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
                Event::Retrieved => out.messages += 1,
            }
        }
        if !step.send.is_empty() {
            timeout(op_timeout, reader.get_mut().write_all(&step.send))
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
