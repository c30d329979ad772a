//! The load policy: what a back-end's agent report and its probes' response time mean for its
//! weight, and when it is overloaded enough to be drained.
//!
//! - Share of the admin weight = the agent's reported percentage × a response-time factor (1
//!   up to `resume.response_ms`, falling linearly to 0.1 at `drain.response_ms`), rounded to
//!   5% steps so small wobbles in load do not rebuild the Maglev tables.
//! - Overload, with hysteresis: a back-end is drained when its queue, spool disk or response
//!   time reaches the `drain` threshold (or its agent asks for a drain), and taken back only
//!   when all three are at or below the `resume` thresholds, so it cannot flap around one value.
//!
//! Pure: the prober feeds it, the controller publishes what it returns.
use std::time::Duration;

pub use crate::agent::Figures as AgentReport;
use crate::{config::HealthConfig, desired::Load};

impl AgentReport {
    /// The percentage in the agent's line (None for drain/down or no percentage).
    fn percent(&self) -> Option<f64> {
        self.reply
            .split(|c: char| c.is_whitespace() || c == ',')
            .find_map(|w| w.strip_suffix('%'))
            .and_then(|p| p.parse::<f64>().ok())
    }

    fn asks_drain(&self) -> Option<String> {
        let first = self.reply.split_whitespace().next().unwrap_or("");
        match first {
            "drain" | "maint" => Some(format!("agent says {first}")),
            "down" | "fail" | "stopped" => Some(format!("agent says {}", self.reply.trim())),
            _ => None,
        }
    }
}

/// Per-back-end policy state (whether it is currently held drained for overload).
#[derive(Debug, Clone, Default)]
pub struct LoadState {
    overloaded: Option<String>,
}

impl LoadState {
    /// Judges one new observation. `report` is None when the back-end has no agent or it did
    /// not answer (then only the response time counts); `rtt` is the probes' moving average.
    pub fn evaluate(&mut self, report: Option<&AgentReport>, rtt: Option<Duration>, h: &HealthConfig) -> Load {
        let rt_ms = rtt.map(|d| d.as_secs_f64() * 1e3);
        let reasons: Vec<String> = [
            report.and_then(|r| (r.queue >= h.drain.queue).then(|| format!("queue {} >= {}", r.queue, h.drain.queue))),
            report.and_then(|r| {
                (r.disk_used_pct >= h.drain.disk_pct).then(|| format!("disk {:.0}% >= {:.0}%", r.disk_used_pct, h.drain.disk_pct))
            }),
            rt_ms.and_then(|ms| (ms >= h.drain.response_ms as f64).then(|| format!("response {ms:.0} ms >= {} ms", h.drain.response_ms))),
            report.and_then(AgentReport::asks_drain),
        ]
        .into_iter()
        .flatten()
        .collect();
        let calm = report.is_none_or(|r| {
            r.queue <= h.resume.queue && r.disk_used_pct <= h.resume.disk_pct && r.asks_drain().is_none()
        }) && rt_ms.is_none_or(|ms| ms <= h.resume.response_ms as f64);
        if !reasons.is_empty() {
            self.overloaded = Some(reasons.join(", "));
        } else if calm {
            self.overloaded = None;
        }
        let agent = report.and_then(AgentReport::percent).map_or(1.0, |p| (p / 100.0).clamp(0.01, 1.0));
        let rt_factor = match rt_ms {
            Some(ms) if ms > h.resume.response_ms as f64 => {
                let span = (h.drain.response_ms - h.resume.response_ms) as f64;
                (1.0 - 0.9 * (ms - h.resume.response_ms as f64) / span).clamp(0.1, 1.0)
            }
            _ => 1.0,
        };
        let share = ((agent * rt_factor * 20.0).round() / 20.0).max(0.05);
        Load { share, overloaded: self.overloaded.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(queue: u64, disk: f64, reply: &str) -> AgentReport {
        AgentReport { queue, disk_used_pct: disk, load1: 0.0, run_queue: 0, cpus: 1, reply: reply.into() }
    }

    fn settings() -> HealthConfig {
        let mut h = HealthConfig::default();
        h.drain.queue = 100;
        h.resume.queue = 50;
        h
    }

    #[test]
    fn share_follows_the_agent_and_response_time_in_5_percent_steps() {
        let h = settings();
        let mut s = LoadState::default();
        assert_eq!(s.evaluate(Some(&report(10, 20.0, "up ready 75% maxconn:300")), None, &h).share, 0.75);
        assert_eq!(s.evaluate(Some(&report(10, 20.0, "up ready 50%\n")), None, &h).share, 0.5, "as the agent sends it");
        assert_eq!(s.evaluate(Some(&report(10, 20.0, "up ready 73%")), None, &h).share, 0.75);
        // Halfway between resume (1000 ms) and drain (2000 ms): factor 0.55.
        let l = s.evaluate(None, Some(Duration::from_millis(1500)), &h);
        assert_eq!((l.share, l.overloaded), (0.55, None));
        assert_eq!(s.evaluate(None, Some(Duration::from_millis(5)), &h).share, 1.0);
        assert_eq!(s.evaluate(Some(&report(10, 20.0, "up ready 1%")), None, &h).share, 0.05, "floor");
    }

    #[test]
    fn overload_drains_with_hysteresis() {
        let h = settings();
        let mut s = LoadState::default();
        assert!(s.evaluate(Some(&report(99, 20.0, "up 10%")), None, &h).overloaded.is_none());
        let l = s.evaluate(Some(&report(100, 20.0, "up 10%")), None, &h);
        assert_eq!(l.overloaded.as_deref(), Some("queue 100 >= 100"));
        // Between resume (50) and drain (100): still drained, no flapping.
        for q in [99, 70, 51] {
            assert!(s.evaluate(Some(&report(q, 20.0, "up 40%")), None, &h).overloaded.is_some(), "queue {q}");
        }
        assert!(s.evaluate(Some(&report(50, 20.0, "up 60%")), None, &h).overloaded.is_none());
        // Disk, response time and the agent's own verdict drain too.
        assert!(s.evaluate(Some(&report(0, 96.0, "up 90%")), None, &h).overloaded.unwrap().starts_with("disk 96%"));
        let mut s = LoadState::default();
        assert!(s.evaluate(None, Some(Duration::from_secs(3)), &h).overloaded.unwrap().starts_with("response 3000 ms"));
        let mut s = LoadState::default();
        assert_eq!(s.evaluate(Some(&report(0, 10.0, "drain")), None, &h).overloaded.as_deref(), Some("agent says drain"));
        assert!(s.evaluate(Some(&report(0, 10.0, "up ready 100%")), None, &h).overloaded.is_none());
    }
}
