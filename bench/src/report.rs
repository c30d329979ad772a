//! The results, as a human table or as JSON with stable keys: `sessions_per_s`,
//! `messages_per_s`, `errors{kind: n}` (every kind, zeros included), `latency_ms{phase: {p50,
//! p90, p99, p999, max}}` (every phase; `null` values for a phase without samples).
use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use serde::Serialize;

use crate::{
    proto::ErrorKind,
    stats::{Phase, Stats},
};

#[derive(Debug, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub max: Option<f64>,
    pub samples: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub mode: String,
    pub target: String,
    /// "closed" or "open".
    pub load: String,
    pub concurrency: Option<usize>,
    pub rate: Option<f64>,
    pub elapsed_s: f64,
    pub sessions_ok: u64,
    pub sessions_failed: u64,
    pub messages: u64,
    /// Bytes of the retrieved messages (POP3/IMAP; 0 otherwise).
    pub bytes_retrieved: u64,
    pub sessions_per_s: f64,
    pub messages_per_s: f64,
    pub errors: BTreeMap<&'static str, u64>,
    pub latency_ms: BTreeMap<&'static str, Percentiles>,
    /// The first few error messages.
    pub error_samples: Vec<String>,
}

fn per_s(n: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 { n as f64 / s } else { 0.0 }
}

impl Report {
    pub fn new(
        mode: &str,
        target: String,
        concurrency: Option<usize>,
        rate: Option<f64>,
        stats: &Stats,
        elapsed: Duration,
    ) -> Report {
        let latency_ms = Phase::ALL
            .iter()
            .map(|&p| {
                let q = |q| stats.quantile_ms(p, q);
                (
                    p.key(),
                    Percentiles {
                        p50: q(0.5),
                        p90: q(0.9),
                        p99: q(0.99),
                        p999: q(0.999),
                        max: stats.max_ms(p),
                        samples: stats.samples(p),
                    },
                )
            })
            .collect();
        Report {
            mode: mode.into(),
            target,
            load: if rate.is_some() { "open" } else { "closed" }.into(),
            concurrency,
            rate,
            elapsed_s: elapsed.as_secs_f64(),
            sessions_ok: stats.sessions_ok,
            sessions_failed: stats.error_total(),
            messages: stats.messages,
            bytes_retrieved: stats.bytes,
            sessions_per_s: per_s(stats.sessions_ok, elapsed),
            messages_per_s: per_s(stats.messages, elapsed),
            errors: ErrorKind::ALL
                .iter()
                .map(|k| (k.key(), stats.errors[k.index()]))
                .collect(),
            latency_ms,
            error_samples: stats.samples.clone(),
        }
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    pub fn table(&self) -> String {
        let mut s = String::new();
        let load = match (self.concurrency, self.rate) {
            (_, Some(r)) => format!("open loop, {r} sessions/s scheduled"),
            (Some(c), None) => format!("closed loop, {c} concurrent"),
            (None, None) => String::new(),
        };
        let _ = writeln!(
            s,
            "mxlb-bench {} -> {}, {load}: {} sessions ok, {} failed, {} messages in {:.2} s",
            self.mode,
            self.target,
            self.sessions_ok,
            self.sessions_failed,
            self.messages,
            self.elapsed_s
        );
        let _ = writeln!(
            s,
            "{:<10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "phase (ms)", "p50", "p90", "p99", "p99.9", "max", "samples"
        );
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        for p in Phase::ALL {
            let Some(l) = self.latency_ms.get(p.key()) else {
                continue;
            };
            if l.samples == 0 {
                continue;
            }
            let _ = writeln!(
                s,
                "{:<10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                p.key(),
                f(l.p50),
                f(l.p90),
                f(l.p99),
                f(l.p999),
                f(l.max),
                l.samples
            );
        }
        let _ = writeln!(
            s,
            "sessions/s {:.1}   messages/s {:.1}",
            self.sessions_per_s, self.messages_per_s
        );
        if self.bytes_retrieved > 0 {
            let _ = writeln!(s, "bytes retrieved {}", self.bytes_retrieved);
        }
        let errs: Vec<String> = ErrorKind::ALL
            .iter()
            .map(|k| {
                format!(
                    "{} {}",
                    k.key(),
                    self.errors.get(k.key()).copied().unwrap_or(0)
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "errors ({} total): {}",
            self.sessions_failed,
            errs.join(", ")
        );
        for e in &self.error_samples {
            let _ = writeln!(s, "  e.g. {e}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{proto::ProtoError, session::Outcome};

    fn stats() -> Stats {
        let mut st = Stats::default();
        for i in 1..=1000u64 {
            st.record(&Outcome {
                connect: Some(Duration::from_micros(i)),
                greeting: Some(Duration::from_millis(1)),
                data_acks: vec![Duration::from_millis(2)],
                messages: 1,
                session: Duration::from_millis(i),
                bytes: 0,
                error: None,
            });
        }
        st.record(&Outcome {
            error: Some(ProtoError::new(ErrorKind::Temp4xx, "421 busy")),
            ..Outcome::default()
        });
        st.record(&Outcome {
            error: Some(ProtoError::new(ErrorKind::Refused, "connect")),
            ..Outcome::default()
        });
        st
    }

    #[test]
    fn percentiles_rates_and_errors() {
        let r = Report::new(
            "smtp",
            "x:25".into(),
            Some(4),
            None,
            &stats(),
            Duration::from_secs(2),
        );
        assert_eq!(
            (r.sessions_ok, r.sessions_failed, r.messages),
            (1000, 2, 1000)
        );
        assert_eq!((r.sessions_per_s, r.messages_per_s), (500.0, 500.0));
        let s = &r.latency_ms["session"];
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() <= b * 0.002);
        assert!(
            close(s.p50, 500.0)
                && close(s.p90, 900.0)
                && close(s.p99, 990.0)
                && close(s.p999, 999.0),
            "{s:?}"
        );
        assert!(close(s.max, 1000.0));
        assert_eq!(r.errors["4xx"], 1);
        assert_eq!(r.errors["refused"], 1);
        assert_eq!(r.errors["5xx"], 0);
        let t = r.table();
        assert!(
            t.contains("sessions/s 500.0") && t.contains("4xx 1") && t.contains("data_ack"),
            "{t}"
        );
    }

    #[test]
    fn json_has_stable_keys() {
        let r = Report::new(
            "connect",
            "x:25".into(),
            None,
            Some(10.0),
            &Stats::default(),
            Duration::ZERO,
        );
        let v: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(v["sessions_per_s"], 0.0);
        assert!(v["messages_per_s"].is_number());
        for k in [
            "refused",
            "reset",
            "timeout",
            "4xx",
            "5xx",
            "closed",
            "protocol",
            "io",
            "in_flight_cap",
        ] {
            assert_eq!(v["errors"][k], 0, "{k}");
        }
        for p in ["connect", "greeting", "data_ack", "session"] {
            for q in ["p50", "p90", "p99", "p999", "max"] {
                assert!(v["latency_ms"][p][q].is_null(), "{p}.{q}");
            }
        }
        assert_eq!(v["load"], "open");
    }
}
