//! What an attempt's outcomes do to an envelope: delivered, bounced, or pending again after
//! an exponential backoff, and bounced once the message has been queued too long. Expiry
//! happens through an attempt: the last retry is scheduled at the expiry time, and a deferral
//! at or after it bounces. Pure, so the schedule is tested without waiting.
use std::time::Duration;

use super::{client::Outcome, dsn::FailedRcpt};
use crate::relay::{Envelope, RcptState};

/// Retry schedule and queue lifetime.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Wait after the first failed attempt.
    pub first: Duration,
    /// Each further wait is this many times the previous (>= 1).
    pub factor: f64,
    /// The longest wait.
    pub max: Duration,
    /// A recipient still pending this long after the message was accepted is bounced
    /// (Postfix's `maximal_queue_lifetime`).
    pub lifetime: Duration,
}

impl Default for RetryPolicy {
    /// Postfix-like: 5 minutes, doubling, at most 1 hour between attempts; 5 days in the queue.
    fn default() -> RetryPolicy {
        RetryPolicy {
            first: Duration::from_secs(300),
            factor: 2.0,
            max: Duration::from_secs(3600),
            lifetime: Duration::from_secs(5 * 86_400),
        }
    }
}

impl RetryPolicy {
    /// The wait after `attempts` failed attempts (1 after the first).
    pub fn delay(&self, attempts: u32) -> Duration {
        let exp = i32::try_from(attempts.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.first.as_secs_f64() * self.factor.max(1.0).powi(exp);
        Duration::try_from_secs_f64(secs).map_or(self.max, |d| d.min(self.max))
    }

    /// Unix time after which pending recipients of `env` are bounced.
    pub fn expires_at(&self, env: &Envelope) -> u64 {
        env.accepted_at.saturating_add(self.lifetime.as_secs())
    }
}

/// Records the outcome of one attempt for recipient `index`; returns the recipient to report
/// to the sender when it is now bounced. `backend` names who replied (for the DSN).
pub fn apply(
    env: &mut Envelope,
    index: usize,
    outcome: &Outcome,
    backend: Option<&str>,
    now: u64,
    policy: &RetryPolicy,
) -> Option<FailedRcpt> {
    let expires = policy.expires_at(env);
    let rcpt = env.rcpts.get_mut(index)?;
    let RcptState::Pending { attempts, .. } = rcpt.state else {
        return None;
    };
    let reply = outcome.reply();
    match outcome {
        Outcome::Delivered(_) => {
            rcpt.state = RcptState::Delivered { reply: reply.to_string() };
            None
        }
        Outcome::Failed(_) => {
            rcpt.state = RcptState::Bounced { reply: reply.to_string() };
            Some(FailedRcpt {
                address: rcpt.address.clone(),
                status: reply.enhanced_status().unwrap_or("5.0.0").to_string(),
                diagnostic: reply.to_string(),
                remote_mta: backend.map(str::to_string),
            })
        }
        Outcome::Deferred(_) => {
            let attempts = attempts.saturating_add(1);
            if now >= expires {
                rcpt.state = RcptState::Bounced { reply: format!("expired in the queue; last reply: {reply}") };
                return Some(FailedRcpt {
                    address: rcpt.address.clone(),
                    status: "4.4.7".into(),
                    diagnostic: reply.to_string(),
                    remote_mta: backend.map(str::to_string),
                });
            }
            // The last retry falls on the expiry time, so a message gets its chance up to the
            // end of its lifetime and is bounced promptly after it.
            let wait = policy.delay(attempts).as_secs_f64().ceil() as u64;
            let next_attempt = now.saturating_add(wait.max(1)).min(expires);
            rcpt.state = RcptState::Pending { attempts, next_attempt, last_reply: Some(reply.to_string()) };
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::{ClientInfo, Recipient, delivery::reply::Reply};

    fn policy() -> RetryPolicy {
        RetryPolicy {
            first: Duration::from_secs(60),
            factor: 2.0,
            max: Duration::from_secs(600),
            lifetime: Duration::from_secs(3600),
        }
    }

    fn env() -> Envelope {
        Envelope {
            id: "0006000000000000deadbeef".parse().unwrap(),
            mail_from: "a@src".into(),
            rcpts: vec![Recipient::new("x@d".into()), Recipient::new("y@d".into()), Recipient::new("z@d".into())],
            accepted_at: 1000,
            accepted_by: "lb1".into(),
            client: ClientInfo {
                addr: "192.0.2.1:1".parse().unwrap(),
                helo: "c".into(),
                tls: false,
                authenticated: false,
            },
            eight_bit: false,
            smtputf8: false,
            size: 1,
        }
    }

    fn deferred() -> Outcome {
        Outcome::Deferred(Reply::local(451, "4.3.0 busy"))
    }

    #[test]
    fn backoff_grows_by_the_factor_up_to_the_maximum() {
        let p = policy();
        let secs: Vec<u64> = (1..=7).map(|n| p.delay(n).as_secs()).collect();
        assert_eq!(secs, [60, 120, 240, 480, 600, 600, 600]);
        assert_eq!(p.delay(u32::MAX), p.max);

        // The delays land in the recipient's state, attempt after attempt.
        let mut e = env();
        let mut now = 1000;
        for expected_wait in [60, 120, 240] {
            assert_eq!(apply(&mut e, 0, &deferred(), Some("mb1"), now, &p), None);
            let RcptState::Pending { attempts, next_attempt, last_reply } = &e.rcpts[0].state else { panic!() };
            assert_eq!(*next_attempt, now + expected_wait);
            assert_eq!(last_reply.as_deref(), Some("451 4.3.0 busy"));
            now = *next_attempt;
            assert!(*attempts >= 1);
        }
        let RcptState::Pending { attempts, .. } = e.rcpts[0].state else { panic!() };
        assert_eq!(attempts, 3);
    }

    #[test]
    fn last_retry_is_at_expiry_and_a_deferral_then_bounces() {
        let p = policy();
        let mut e = env();
        apply(&mut e, 0, &deferred(), None, 4580, &p);
        let RcptState::Pending { next_attempt, .. } = e.rcpts[0].state else { panic!() };
        assert_eq!(next_attempt, 4600, "capped at accepted_at + lifetime");
        let failed = apply(&mut e, 0, &deferred(), Some("mb1"), 4600, &p).unwrap();
        assert_eq!(failed.status, "4.4.7");
        assert_eq!(failed.diagnostic, "451 4.3.0 busy");
        assert!(matches!(&e.rcpts[0].state, RcptState::Bounced { .. }));
    }

    #[test]
    fn permanent_failure_bounces_with_the_reply_status() {
        let mut e = env();
        let f =
            apply(&mut e, 2, &Outcome::Failed(Reply::local(550, "5.1.1 no such user")), Some("mb2"), 1100, &policy())
                .unwrap();
        assert_eq!((f.address.as_str(), f.status.as_str(), f.remote_mta.as_deref()), ("z@d", "5.1.1", Some("mb2")));
        // An outcome for a recipient already done changes nothing.
        assert_eq!(apply(&mut e, 2, &deferred(), None, 1200, &policy()), None);
        assert!(matches!(e.rcpts[2].state, RcptState::Bounced { .. }));
    }
}
