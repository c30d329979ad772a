//! Load shapes.
//!
//! Closed loop: N workers, each starting a session when its previous one ends. The offered
//! load adapts to the server (a slow server gets fewer sessions), which is what smtp-source
//! `-s N` does, so the two compare directly.
//!
//! Open loop: session starts are scheduled at the target rate, independent of how the
//! previous sessions fare, and every latency is measured from the *scheduled* start, not from
//! when the task actually got to run. Measuring from the actual start would hide exactly the
//! stalls that matter ("coordinated omission": a stalled server stalls the generator, whose
//! missing samples are the slow ones). A start that cannot be launched because
//! `max_in_flight` sessions are already running is counted as an `in_flight_cap` error rather
//! than delayed or dropped silently. Tokio's timer has a 1 ms resolution: a start may fire up
//! to ~1 ms after its scheduled instant, and that delay is (correctly) part of the measured
//! latency, so open-loop latencies below ~1 ms are not meaningful.
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use tokio::task::JoinSet;

use crate::{proto::Dialogue, session, stats::Stats};

#[derive(Debug, Clone, Copy)]
pub enum Shape {
    Closed { concurrency: usize },
    Open { rate: f64, max_in_flight: usize },
}

#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub shape: Shape,
    /// Measured sessions to run (`None`: until `duration`).
    pub count: Option<u64>,
    /// Measurement time after which no session starts (`None`: until `count`).
    pub duration: Option<Duration>,
    pub warmup: Duration,
    pub op_timeout: Duration,
}

/// One session to make: where to connect and what to say (`None` in connect mode).
pub struct SessionPlan {
    pub target: SocketAddr,
    pub dialogue: Option<Box<dyn Dialogue>>,
}

/// Makes each session's plan, called once per session start: a fresh dialogue each time, and
/// the target and account of the session (several accounts are taken in turn, each possibly
/// on its own server, see `main.rs`).
pub type DialogueFactory = Arc<dyn Fn() -> SessionPlan + Send + Sync>;

/// What a run produced.
pub struct RunResult {
    pub stats: Stats,
    /// From the end of the warm-up to the end of the last measured session.
    pub elapsed: Duration,
}

/// Open-loop start offsets from the beginning of the run: `i / rate` for i = 0, 1, …; warm-up
/// starts (offset < `warmup`) are flagged unmeasured; it ends after `count` measured starts
/// or at `warmup + duration`.
pub fn schedule(
    rate: f64,
    warmup: Duration,
    count: Option<u64>,
    duration: Option<Duration>,
) -> impl Iterator<Item = (Duration, bool)> {
    let end = duration.map(|d| warmup + d);
    let mut measured = 0u64;
    (0u64..)
        .map(move |i| Duration::from_secs_f64(i as f64 / rate))
        .map(move |at| (at, at >= warmup))
        .take_while(move |(at, m)| {
            if end.is_some_and(|e| *at >= e) || count.is_some_and(|c| *m && measured >= c) {
                return false;
            }
            measured += u64::from(*m);
            true
        })
}

/// Runs the plan, each session where `make` says; `progress` counts finished measured
/// sessions.
pub async fn run(
    plan: Plan,
    make: DialogueFactory,
    progress: Arc<AtomicU64>,
) -> RunResult {
    let stats = Arc::new(Mutex::new(Stats::default()));
    let t0 = Instant::now();
    let measure_from = t0 + plan.warmup;
    match plan.shape {
        Shape::Closed { concurrency } => {
            let issued = Arc::new(AtomicU64::new(0));
            let mut set = JoinSet::new();
            for _ in 0..concurrency.max(1) {
                let (stats, issued, make, progress) = (
                    stats.clone(),
                    issued.clone(),
                    make.clone(),
                    progress.clone(),
                );
                set.spawn(async move {
                    loop {
                        let start = Instant::now();
                        let measured = start >= measure_from;
                        if plan.duration.is_some_and(|d| start >= measure_from + d) {
                            break;
                        }
                        if measured
                            && plan
                                .count
                                .is_some_and(|c| issued.fetch_add(1, Relaxed) >= c)
                        {
                            break;
                        }
                        let s = make();
                        let o = session::run(s.target, start, plan.op_timeout, s.dialogue).await;
                        if measured {
                            lock(&stats).record(&o);
                            progress.fetch_add(1, Relaxed);
                        }
                    }
                });
            }
            while set.join_next().await.is_some() {}
        }
        Shape::Open {
            rate,
            max_in_flight,
        } => {
            let in_flight = Arc::new(AtomicUsize::new(0));
            let mut set = JoinSet::new();
            for (offset, measured) in schedule(rate, plan.warmup, plan.count, plan.duration) {
                let due = t0 + offset;
                tokio::time::sleep_until(due.into()).await;
                while set.try_join_next().is_some() {}
                if in_flight.load(Relaxed) >= max_in_flight {
                    if measured {
                        lock(&stats).record_error(
                            crate::proto::ErrorKind::InFlightCap,
                            "start not launched",
                        );
                        progress.fetch_add(1, Relaxed);
                    }
                    continue;
                }
                in_flight.fetch_add(1, Relaxed);
                let (stats, in_flight, make, progress) = (
                    stats.clone(),
                    in_flight.clone(),
                    make.clone(),
                    progress.clone(),
                );
                set.spawn(async move {
                    // `due`, not now: latency from the scheduled start (see the module doc).
                    let s = make();
                    let o = session::run(s.target, due, plan.op_timeout, s.dialogue).await;
                    in_flight.fetch_sub(1, Relaxed);
                    if measured {
                        lock(&stats).record(&o);
                        progress.fetch_add(1, Relaxed);
                    }
                });
            }
            while set.join_next().await.is_some() {}
        }
    }
    let elapsed = Instant::now().saturating_duration_since(measure_from);
    let stats = match Arc::try_unwrap(stats) {
        Ok(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
        Err(arc) => std::mem::take(&mut *lock(&arc)),
    };
    RunResult { stats, elapsed }
}

/// The stats lock; a panicking recorder cannot leave it inconsistent enough to matter.
fn lock(m: &Mutex<Stats>) -> std::sync::MutexGuard<'_, Stats> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_evenly_spaced_and_count_bounded() {
        let s: Vec<_> = schedule(100.0, Duration::ZERO, Some(5), None).collect();
        assert_eq!(s.len(), 5);
        for (i, (at, m)) in s.iter().enumerate() {
            assert!(m);
            assert_eq!(at.as_micros(), i as u128 * 10_000);
        }
    }

    #[test]
    fn schedule_duration_bound_and_warmup() {
        let s: Vec<_> = schedule(
            10.0,
            Duration::from_secs(1),
            None,
            Some(Duration::from_secs(2)),
        )
        .collect();
        // 1 s warm-up at 10/s = 10 unmeasured, then 2 s = 20 measured.
        assert_eq!(s.iter().filter(|(_, m)| !m).count(), 10);
        assert_eq!(s.iter().filter(|(_, m)| *m).count(), 20);
        assert!(s.last().is_some_and(|(at, _)| *at < Duration::from_secs(3)));
        // Count bound counts measured starts only; the first bound reached wins.
        let s: Vec<_> = schedule(
            10.0,
            Duration::from_secs(1),
            Some(3),
            Some(Duration::from_secs(2)),
        )
        .collect();
        assert_eq!(s.len(), 13);
    }
}
