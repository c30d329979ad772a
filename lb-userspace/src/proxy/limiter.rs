//! Failed logins per source: password guessing is slowed, then blocked, before it reaches
//! the back-ends (as Dovecot's `auth_penalty` and fail2ban do, but in front of every back-end
//! at once).
//!
//! A source is one IPv4 address or one IPv6 /64 (a single host usually has a whole /64).
//! Within `window` after its first counted failure: up to `slow_after` failures are answered
//! at the back-end's own pace; each further one waits longer (doubling from `slow_delay`, at
//! most `slow_delay_max`); from `block_after` failures on, the source is blocked for
//! `block_for`: its logins get the temporary answer without any back-end being asked.
//!
//! Memory is bounded: at most `max_entries` sources are tracked; when full, expired entries
//! go first, then the one seen longest ago (an attacker cycling through addresses can at worst
//! make the limiter forget old sources, never grow it).
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    time::{Duration, Instant},
};

/// The limiter's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub slow_after: u32,
    pub block_after: u32,
    pub block_for: Duration,
    pub window: Duration,
    pub slow_delay: Duration,
    pub slow_delay_max: Duration,
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            slow_after: 3,
            block_after: 10,
            block_for: Duration::from_secs(300),
            window: Duration::from_secs(600),
            slow_delay: Duration::from_millis(1000),
            slow_delay_max: Duration::from_secs(15),
            max_entries: 100_000,
        }
    }
}

/// What the limiter says about a login about to be tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Blocked until then: answer "try later" without asking a back-end.
    Blocked,
}

/// How to answer a failure just recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureAnswer {
    /// Extra wait before the answer (zero until `slow_after` failures).
    pub delay: Duration,
    /// This failure blocked the source.
    pub now_blocked: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    failures: u32,
    first: Instant,
    last: Instant,
    blocked_until: Option<Instant>,
}

/// The failure counts by source.
#[derive(Debug)]
pub struct Limiter {
    limits: Limits,
    entries: HashMap<IpAddr, Entry>,
}

/// The key of a source: the address, or its /64 for IPv6 (IPv4-mapped addresses as IPv4).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl Limiter {
    pub fn new(limits: Limits) -> Limiter {
        Limiter { limits, entries: HashMap::new() }
    }

    /// Sources tracked now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether a login from `ip` may be tried at `now`.
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> Verdict {
        let key = source_key(ip);
        let Some(e) = self.entries.get(&key) else { return Verdict::Allow };
        match e.blocked_until {
            Some(until) if now < until => Verdict::Blocked,
            Some(_) => {
                // The block is over: the source starts afresh.
                self.entries.remove(&key);
                Verdict::Allow
            }
            None => Verdict::Allow,
        }
    }

    /// Records a failed login from `ip` at `now`.
    pub fn failure(&mut self, ip: IpAddr, now: Instant) -> FailureAnswer {
        let key = source_key(ip);
        if !self.entries.contains_key(&key) && self.entries.len() >= self.limits.max_entries {
            self.make_room(now);
        }
        let limits = &self.limits;
        let e = self.entries.entry(key).or_insert(Entry { failures: 0, first: now, last: now, blocked_until: None });
        if e.blocked_until.is_none() && now.duration_since(e.first) > limits.window {
            *e = Entry { failures: 0, first: now, last: now, blocked_until: None };
        }
        e.failures = e.failures.saturating_add(1);
        e.last = now;
        let mut now_blocked = false;
        if e.failures >= limits.block_after && e.blocked_until.is_none() {
            e.blocked_until = Some(now + limits.block_for);
            now_blocked = true;
        }
        let delay = match e.failures.checked_sub(limits.slow_after) {
            None | Some(0) => Duration::ZERO,
            Some(over) => {
                let factor = 1u32.checked_shl(over.saturating_sub(1).min(20)).unwrap_or(u32::MAX);
                limits.slow_delay.saturating_mul(factor).min(limits.slow_delay_max)
            }
        };
        FailureAnswer { delay, now_blocked }
    }

    /// Drops expired entries; if none expired, the one seen longest ago.
    fn make_room(&mut self, now: Instant) {
        let limits = &self.limits;
        self.entries.retain(|_, e| match e.blocked_until {
            Some(until) => now < until,
            None => now.duration_since(e.first) <= limits.window,
        });
        let oldest = self.entries.iter().min_by_key(|(_, e)| e.last).map(|(k, _)| *k);
        if let (true, Some(oldest)) = (self.entries.len() >= self.limits.max_entries, oldest) {
            self.entries.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            slow_after: 3,
            block_after: 10,
            block_for: Duration::from_secs(300),
            window: Duration::from_secs(600),
            slow_delay: Duration::from_millis(100),
            slow_delay_max: Duration::from_millis(1000),
            max_entries: 4,
        }
    }

    #[test]
    fn failures_are_slowed_then_blocked_then_forgiven() {
        let mut l = Limiter::new(limits());
        let ip: IpAddr = "198.18.1.5".parse().unwrap();
        let t0 = Instant::now();
        let delays: Vec<u64> = (0..9).map(|_| l.failure(ip, t0).delay.as_millis() as u64).collect();
        assert_eq!(delays, vec![0, 0, 0, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(l.check(ip, t0), Verdict::Allow);
        assert!(l.failure(ip, t0).now_blocked);
        assert_eq!(l.check(ip, t0), Verdict::Blocked);
        assert_eq!(l.check(ip, t0 + Duration::from_secs(299)), Verdict::Blocked);
        assert_eq!(l.check(ip, t0 + Duration::from_secs(301)), Verdict::Allow);
        assert_eq!(l.failure(ip, t0 + Duration::from_secs(301)).delay, Duration::ZERO);
    }

    #[test]
    fn failures_outside_the_window_start_afresh() {
        let mut l = Limiter::new(limits());
        let ip: IpAddr = "198.18.1.5".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..5 {
            l.failure(ip, t0);
        }
        assert_eq!(l.failure(ip, t0 + Duration::from_secs(601)).delay, Duration::ZERO);
    }

    #[test]
    fn ipv6_sources_are_counted_per_64() {
        let mut l = Limiter::new(limits());
        let t0 = Instant::now();
        for i in 0..10u16 {
            let ip = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, i, i, i, i));
            l.failure(ip, t0);
        }
        assert_eq!(l.check("2001:db8:1:2::99".parse().unwrap(), t0), Verdict::Blocked);
        assert_eq!(l.check("2001:db8:1:3::99".parse().unwrap(), t0), Verdict::Allow);
        assert_eq!(source_key("::ffff:198.18.1.1".parse().unwrap()), "198.18.1.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn memory_is_bounded() {
        let mut l = Limiter::new(limits());
        let t0 = Instant::now();
        for i in 0..100u8 {
            l.failure(IpAddr::from([198, 18, 2, i]), t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(l.len(), 4);
        // The most recent sources are the ones kept.
        l.failure(IpAddr::from([198, 18, 2, 99]), t0 + Duration::from_secs(1));
        assert_eq!(l.len(), 4);
    }
}
