//! Aggregated results: one HDR histogram per phase (microseconds, 3 significant digits, so
//! percentiles are exact to 0.1% over 1 µs … 1 h without keeping every sample), error counts
//! by kind, session and message counts.
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::proto::ErrorKind;
use crate::session::Outcome;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Session start (scheduled start in open loop) to TCP connection established.
    Connect,
    /// Connection established to the end of the server's greeting.
    Greeting,
    /// End of writing a message's final `.` to the server's end-of-DATA reply (per message).
    DataAck,
    /// Session start (scheduled, in open loop) to the end of the dialogue; successful sessions.
    Session,
}

impl Phase {
    pub const ALL: [Phase; 4] = [
        Phase::Connect,
        Phase::Greeting,
        Phase::DataAck,
        Phase::Session,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Phase::Connect => "connect",
            Phase::Greeting => "greeting",
            Phase::DataAck => "data_ack",
            Phase::Session => "session",
        }
    }
}

pub struct Stats {
    pub hist: Vec<Histogram<u64>>,
    pub errors: [u64; ErrorKind::ALL.len()],
    pub sessions_ok: u64,
    pub messages: u64,
    /// Bytes of retrieved messages (POP3/IMAP), failed sessions' included like `messages`.
    pub bytes: u64,
    /// The first few distinct error details, for the report (never all: a run may fail
    /// millions).
    pub samples: Vec<String>,
}

const MAX_US: u64 = 3_600_000_000;

impl Default for Stats {
    fn default() -> Self {
        Stats {
            hist: Phase::ALL
                .iter()
                .map(|_| Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds"))
                .collect(),
            errors: [0; ErrorKind::ALL.len()],
            sessions_ok: 0,
            messages: 0,
            bytes: 0,
            samples: Vec::new(),
        }
    }
}

impl Stats {
    pub fn record_latency(&mut self, phase: Phase, d: Duration) {
        let us = u64::try_from(d.as_micros())
            .unwrap_or(MAX_US)
            .clamp(1, MAX_US);
        // saturating_record clamps instead of failing on out-of-range values.
        self.hist[phase as usize].saturating_record(us);
    }

    pub fn record_error(&mut self, kind: ErrorKind, detail: &str) {
        self.errors[kind.index()] += 1;
        let sample = format!("{}: {detail}", kind.key());
        if self.samples.len() < 5 && !self.samples.contains(&sample) {
            self.samples.push(sample);
        }
    }

    /// Adds one finished session.
    pub fn record(&mut self, o: &Outcome) {
        if let Some(d) = o.connect {
            self.record_latency(Phase::Connect, d);
        }
        if let Some(d) = o.greeting {
            self.record_latency(Phase::Greeting, d);
        }
        for d in &o.data_acks {
            self.record_latency(Phase::DataAck, *d);
        }
        self.messages += o.messages;
        self.bytes += o.bytes;
        match &o.error {
            None => {
                self.sessions_ok += 1;
                self.record_latency(Phase::Session, o.session);
            }
            Some(e) => self.record_error(e.kind, &e.detail),
        }
    }

    pub fn error_total(&self) -> u64 {
        self.errors.iter().sum()
    }

    pub fn samples(&self, phase: Phase) -> u64 {
        self.hist[phase as usize].len()
    }

    /// Latency at quantile `q` of `phase`, in ms; `None` without samples.
    pub fn quantile_ms(&self, phase: Phase, q: f64) -> Option<f64> {
        let h = &self.hist[phase as usize];
        (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
    }

    pub fn max_ms(&self, phase: Phase) -> Option<f64> {
        let h = &self.hist[phase as usize];
        (!h.is_empty()).then(|| h.max() as f64 / 1000.0)
    }
}
