//! The VRRPv3 state machine of one virtual router (RFC 5798 §6.4 as updated by RFC 9568), pure:
//! events in (start, a received advertisement, the clock, a tracking change, shutdown), actions
//! out (send an advertisement, take or release the addresses). The runner in [`super::node`]
//! does the I/O; everything here is tested without sockets.
//!
//! Beyond the RFC, what keepalived users expect:
//! - **preempt_delay**: after start or leaving FAULT, a lower-priority master is tolerated
//!   for that long before this node preempts it;
//! - **FAULT** (a failed track with no weight): addresses released, no advertisements, a
//!   priority-0 advertisement first if it was master so a backup takes over within Skew_Time;
//! - **split brain healing**: a master that hears a lower-priority master re-advertises at
//!   once and announces its addresses again, so caches that followed the other one come back;
//!   a master stepping down sends one last advertisement of its own first, so the winner hears
//!   it even when the winner's advertisement arrived first.
use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use super::{
    packet::Advert,
    timers::{master_down_interval, skew_time},
};

/// RFC 5798 states, plus keepalived's FAULT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum State {
    /// Not started, or stopped.
    Init,
    Backup,
    Master,
    /// A tracked interface or back-end pool failed with no weight: out of the election.
    Fault,
}

impl State {
    /// keepalived's names (notify hooks, status, metrics).
    pub fn name(self) -> &'static str {
        match self {
            State::Init => "STOP",
            State::Backup => "BACKUP",
            State::Master => "MASTER",
            State::Fault => "FAULT",
        }
    }
}

/// What the runner must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send an advertisement with this priority (0 = leaving).
    Advertise { priority: u8 },
    /// Became master: enable the VIPs in the data path, add the addresses, announce them.
    TakeAddresses,
    /// Announce the addresses again (gratuitous ARP / unsolicited NA) without other changes.
    Reannounce,
    /// No longer master: disable the VIPs in the data path, remove the addresses.
    ReleaseAddresses,
    /// The state changed (for logs, the notify hook, status and the sync group).
    Transition { from: State, to: State },
}

/// The fixed settings of one instance.
#[derive(Debug, Clone)]
pub struct Settings {
    pub vrid: u8,
    /// Configured priority (1-255).
    pub priority: u8,
    /// Advertisement_Interval in centiseconds.
    pub adver_cs: u16,
    pub preempt: bool,
    pub preempt_delay: Duration,
    /// This node's address on the interface (the advertisement's source): breaks priority ties.
    pub primary: IpAddr,
}

/// One virtual router as this node sees it.
#[derive(Debug, Clone)]
pub struct Instance {
    s: Settings,
    state: State,
    /// Effective priority (configured, adjusted by tracking; 1-254 unless the owner's 255).
    priority: u8,
    /// Master_Adver_Interval: learnt from the master's advertisements.
    master_adver_cs: u16,
    master_down_at: Option<Instant>,
    adver_at: Option<Instant>,
    /// Before this instant a lower-priority master is accepted (preempt_delay).
    preempt_after: Instant,
    /// The master's address, as last heard (or ours).
    master: Option<IpAddr>,
    /// A track without weight failed.
    faulty: bool,
}

impl Instance {
    pub fn new(settings: Settings, now: Instant) -> Instance {
        Instance {
            priority: settings.priority,
            master_adver_cs: settings.adver_cs,
            s: settings,
            state: State::Init,
            master_down_at: None,
            adver_at: None,
            preempt_after: now,
            master: None,
            faulty: false,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }
    /// Effective priority now.
    pub fn priority(&self) -> u8 {
        self.priority
    }
    pub fn settings(&self) -> &Settings {
        &self.s
    }
    /// The current master's address, if known.
    pub fn master(&self) -> Option<IpAddr> {
        self.master
    }
    /// Master_Adver_Interval in centiseconds.
    pub fn master_adver_cs(&self) -> u16 {
        self.master_adver_cs
    }

    /// The next instant [`Instance::on_timer`] has something to do.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Master => self.adver_at,
            State::Backup => self.master_down_at,
            State::Init | State::Fault => None,
        }
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(self.s.adver_cs as u64 * 10)
    }

    fn owner(&self) -> bool {
        self.s.priority == 255
    }

    /// Startup event (§6.4.1).
    pub fn start(&mut self, now: Instant) -> Vec<Action> {
        if self.state != State::Init {
            return Vec::new();
        }
        self.preempt_after = now + self.s.preempt_delay;
        if self.faulty {
            return self.go(State::Fault, now);
        }
        if self.owner() {
            self.go(State::Master, now)
        } else {
            self.go(State::Backup, now)
        }
    }

    /// Shutdown event: a master says goodbye with priority 0 (§6.4.3), so a backup takes over
    /// after Skew_Time instead of Master_Down_Interval.
    pub fn shutdown(&mut self, now: Instant) -> Vec<Action> {
        self.go(State::Init, now)
    }

    /// The clock reached [`Instance::deadline`] (or any time later; early calls do nothing).
    pub fn on_timer(&mut self, now: Instant) -> Vec<Action> {
        match self.state {
            State::Backup if self.master_down_at.is_some_and(|t| now >= t) => self.go(State::Master, now),
            State::Master if self.adver_at.is_some_and(|t| now >= t) => {
                self.adver_at = Some(now + self.interval());
                vec![Action::Advertise { priority: self.priority }]
            }
            _ => Vec::new(),
        }
    }

    /// An advertisement for this VRID that passed the receive checks, from `src`.
    pub fn on_advert(&mut self, now: Instant, src: IpAddr, adv: &Advert) -> Vec<Action> {
        if src == self.s.primary {
            return Vec::new();
        }
        match self.state {
            State::Init | State::Fault => Vec::new(),
            State::Backup => {
                if adv.priority == 0 {
                    // The master is leaving: take over after Skew_Time only.
                    self.master_down_at = Some(now + skew_time(self.priority, self.master_adver_cs));
                    return Vec::new();
                }
                let tolerated = !self.s.preempt || now < self.preempt_after;
                if adv.priority >= self.priority || (tolerated && !self.owner()) {
                    self.master = Some(src);
                    self.master_adver_cs = adv.max_adver_cs.max(1);
                    self.master_down_at = Some(now + master_down_interval(self.priority, self.master_adver_cs));
                }
                // Else a lower-priority master we preempt: let Master_Down_Timer run out.
                Vec::new()
            }
            State::Master => {
                if adv.priority == 0 {
                    // Another master leaving: make sure the backups hear us at once.
                    self.adver_at = Some(now + self.interval());
                    return vec![Action::Advertise { priority: self.priority }];
                }
                let wins = adv.priority > self.priority || (adv.priority == self.priority && ip_greater(src, self.s.primary));
                if wins {
                    // One last advertisement of ours before stepping down: after a partition
                    // heals, the winner may never have heard us (we stop as soon as we hear
                    // it), yet clients that followed our announcements must be pointed back.
                    // Hearing a lower-priority master makes it re-announce (below).
                    let mut out = vec![Action::Advertise { priority: self.priority }];
                    out.extend(self.go(State::Backup, now));
                    self.master = Some(src);
                    self.master_adver_cs = adv.max_adver_cs.max(1);
                    self.master_down_at = Some(now + master_down_interval(self.priority, self.master_adver_cs));
                    out
                } else {
                    // A lower-priority master (a healed partition, or a peer that just
                    // started): it must hear us now, and caches that followed it come back.
                    self.adver_at = Some(now + self.interval());
                    vec![Action::Advertise { priority: self.priority }, Action::Reannounce]
                }
            }
        }
    }

    /// Tracking changed: the effective priority (the owner keeps 255) and whether a track
    /// without weight failed.
    pub fn set_tracking(&mut self, now: Instant, priority: u8, faulty: bool) -> Vec<Action> {
        let mut out = Vec::new();
        let priority = if self.owner() { 255 } else { priority.clamp(1, 254) };
        let changed = priority != self.priority;
        self.priority = priority;
        self.faulty = faulty;
        match (self.state, faulty) {
            (State::Backup | State::Master, true) => out.extend(self.go(State::Fault, now)),
            (State::Fault, false) => {
                self.preempt_after = now + self.s.preempt_delay;
                out.extend(if self.owner() { self.go(State::Master, now) } else { self.go(State::Backup, now) });
            }
            (State::Master, false) if changed => {
                // Backups learn the new priority at once (one with preempt and a higher
                // priority will then stop accepting ours and take over).
                self.adver_at = Some(now + self.interval());
                out.push(Action::Advertise { priority: self.priority });
            }
            _ => {}
        }
        out
    }

    /// A sync-group peer changed to `to`: follow it (without re-propagating).
    pub fn follow(&mut self, now: Instant, to: State) -> Vec<Action> {
        if self.state == to || self.state == State::Init {
            return Vec::new();
        }
        match to {
            State::Master if self.state == State::Backup => self.go(State::Master, now),
            State::Backup if self.state == State::Master => self.go(State::Backup, now),
            State::Fault => self.go(State::Fault, now),
            State::Backup if self.state == State::Fault && !self.faulty => self.go(State::Backup, now),
            _ => Vec::new(),
        }
    }

    /// Moves to `to`, returning what that takes.
    fn go(&mut self, to: State, now: Instant) -> Vec<Action> {
        let from = self.state;
        if from == to {
            return Vec::new();
        }
        let mut out = Vec::new();
        if from == State::Master {
            // Leaving master (for backup, fault or stop): a goodbye unless a higher priority
            // took over (it already advertises), then the addresses go.
            if to != State::Backup {
                out.push(Action::Advertise { priority: 0 });
            }
            out.push(Action::ReleaseAddresses);
        }
        self.state = to;
        self.adver_at = None;
        self.master_down_at = None;
        match to {
            State::Master => {
                self.master = Some(self.s.primary);
                self.adver_at = Some(now + self.interval());
                out.push(Action::Advertise { priority: self.priority });
                out.push(Action::TakeAddresses);
            }
            State::Backup => {
                self.master_adver_cs = self.s.adver_cs;
                self.master_down_at = Some(now + master_down_interval(self.priority, self.master_adver_cs));
                if from == State::Master {
                    self.master = None;
                }
            }
            State::Fault | State::Init => self.master = None,
        }
        out.push(Action::Transition { from, to });
        out
    }
}

/// RFC 5798 §6.4.3: on equal priority the higher primary address wins (as unsigned integers).
fn ip_greater(a: IpAddr, b: IpAddr) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => u32::from(a) > u32::from(b),
        (IpAddr::V6(a), IpAddr::V6(b)) => u128::from(a) > u128::from(b),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "198.18.0.3";
    const PEER: &str = "198.18.0.2";

    fn settings(priority: u8) -> Settings {
        Settings {
            vrid: 51,
            priority,
            adver_cs: 10,
            preempt: true,
            preempt_delay: Duration::ZERO,
            primary: ME.parse().unwrap(),
        }
    }

    fn advert(priority: u8) -> Advert {
        Advert { vrid: 51, priority, max_adver_cs: 10, addrs: vec!["198.18.0.100".parse().unwrap()] }
    }

    fn peer() -> IpAddr {
        PEER.parse().unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn became(actions: &[Action], to: State) -> bool {
        actions.iter().any(|a| matches!(a, Action::Transition { to: t, .. } if *t == to))
    }

    #[test]
    fn a_backup_takes_over_after_master_down_interval_of_silence() {
        let t0 = Instant::now();
        let mut i = Instance::new(settings(100), t0);
        assert!(became(&i.start(t0), State::Backup));
        // The master advertises every 100 ms: the backup stays backup.
        for k in 1..=10 {
            assert!(i.on_advert(t0 + ms(100 * k), peer(), &advert(150)).is_empty());
            assert!(i.on_timer(t0 + ms(100 * k + 50)).is_empty());
        }
        assert_eq!(i.master(), Some(peer()));
        // Last advert at 1000 ms; Master_Down_Interval at priority 100, 0.1 s = 360.9 ms.
        let last = t0 + ms(1000);
        assert_eq!(i.deadline(), Some(last + Duration::from_micros(360_937)));
        assert!(i.on_timer(last + ms(360)).is_empty());
        let a = i.on_timer(last + ms(361));
        assert_eq!(
            a,
            [
                Action::Advertise { priority: 100 },
                Action::TakeAddresses,
                Action::Transition { from: State::Backup, to: State::Master }
            ]
        );
        assert_eq!(i.master(), Some(ME.parse().unwrap()));
        // Then advertises every interval.
        assert_eq!(i.on_timer(last + ms(461)), [Action::Advertise { priority: 100 }]);
    }

    #[test]
    fn a_priority_zero_goodbye_means_takeover_after_skew_time() {
        let t0 = Instant::now();
        let mut i = Instance::new(settings(100), t0);
        i.start(t0);
        i.on_advert(t0 + ms(50), peer(), &advert(150));
        i.on_advert(t0 + ms(100), peer(), &advert(0));
        // Skew_Time at priority 100, 0.1 s = 60.9 ms.
        assert_eq!(i.deadline(), Some(t0 + ms(100) + Duration::from_micros(60_937)));
        assert!(became(&i.on_timer(t0 + ms(161)), State::Master));
    }

    #[test]
    fn a_master_steps_down_for_higher_priority_or_equal_priority_and_higher_address() {
        let t0 = Instant::now();
        let mut i = Instance::new(settings(100), t0);
        i.start(t0);
        i.on_timer(t0 + ms(400));
        assert_eq!(i.state(), State::Master);
        let a = i.on_advert(t0 + ms(450), peer(), &advert(200));
        assert_eq!(
            a,
            [
                Action::Advertise { priority: 100 },
                Action::ReleaseAddresses,
                Action::Transition { from: State::Master, to: State::Backup }
            ],
            "no goodbye (the winner already advertises), but one last advert so it re-announces"
        );
        assert_eq!(i.master(), Some(peer()));
        // Equal priority: the higher address wins (198.18.0.3 > .2: we stay master).
        let mut j = Instance::new(settings(100), t0);
        j.start(t0);
        j.on_timer(t0 + ms(400));
        let a = j.on_advert(t0 + ms(450), peer(), &advert(100));
        assert_eq!(a, [Action::Advertise { priority: 100 }, Action::Reannounce]);
        assert_eq!(j.state(), State::Master);
        let a = j.on_advert(t0 + ms(460), "198.18.0.9".parse().unwrap(), &advert(100));
        assert!(became(&a, State::Backup));
    }

    #[test]
    fn a_master_hearing_a_lower_priority_readvertises_and_reannounces_at_once() {
        // The split-brain heal: both were master; the higher one answers at once.
        let t0 = Instant::now();
        let mut i = Instance::new(settings(200), t0);
        i.start(t0);
        i.on_timer(t0 + ms(400));
        let a = i.on_advert(t0 + ms(420), peer(), &advert(100));
        assert_eq!(a, [Action::Advertise { priority: 200 }, Action::Reannounce]);
        assert_eq!(i.deadline(), Some(t0 + ms(520)), "advert timer restarted");
        // The lower one, hearing it, steps down.
        let mut lower = Instance::new(Settings { primary: peer(), ..settings(100) }, t0);
        lower.start(t0);
        lower.on_timer(t0 + ms(400));
        assert!(became(&lower.on_advert(t0 + ms(421), ME.parse().unwrap(), &advert(200)), State::Backup));
    }

    #[test]
    fn preemption_nopreempt_and_preempt_delay() {
        let t0 = Instant::now();
        // preempt (default): a higher-priority backup ignores a lower master and takes over.
        let mut i = Instance::new(settings(200), t0);
        i.start(t0);
        for k in 1..=3 {
            i.on_advert(t0 + ms(100 * k), peer(), &advert(100));
        }
        // Master_Down_Interval from the start at priority 200, 0.1 s: 321.9 ms.
        assert!(became(&i.on_timer(t0 + ms(322)), State::Master));

        // nopreempt: it keeps accepting the lower master.
        let mut n = Instance::new(Settings { preempt: false, ..settings(200) }, t0);
        n.start(t0);
        for k in 1..=20 {
            n.on_advert(t0 + ms(100 * k), peer(), &advert(100));
            assert!(n.on_timer(t0 + ms(100 * k + 99)).is_empty());
        }
        assert_eq!(n.state(), State::Backup);
        // ...but takes over if the master goes silent.
        assert!(became(&n.on_timer(t0 + ms(2000 + 322)), State::Master));

        // preempt_delay 1 s: tolerated until 1 s after start, then preempted.
        let mut d = Instance::new(Settings { preempt_delay: ms(1000), ..settings(200) }, t0);
        d.start(t0);
        let mut took = None;
        for k in 1..=20 {
            let now = t0 + ms(100 * k);
            if became(&d.on_timer(now), State::Master) {
                took = Some(100 * k);
                break;
            }
            d.on_advert(now, peer(), &advert(100));
        }
        let took = took.expect("preempted eventually");
        assert!((1300..=1400).contains(&took), "preempted at {took} ms, expected ~1000 + 322");
    }

    #[test]
    fn the_owner_is_master_at_once_and_always_preempts() {
        let t0 = Instant::now();
        let mut o = Instance::new(Settings { preempt: false, ..settings(255) }, t0);
        assert!(became(&o.start(t0), State::Master));
        assert_eq!(o.set_tracking(t0, 100, false), [], "the owner keeps 255");
        assert_eq!(o.priority(), 255);
    }

    #[test]
    fn shutdown_and_fault_say_goodbye_and_release() {
        let t0 = Instant::now();
        let mut i = Instance::new(settings(100), t0);
        i.start(t0);
        i.on_timer(t0 + ms(400));
        let a = i.shutdown(t0 + ms(500));
        assert_eq!(
            a,
            [Action::Advertise { priority: 0 }, Action::ReleaseAddresses, Action::Transition { from: State::Master, to: State::Init }]
        );
        assert_eq!(i.deadline(), None);

        let mut f = Instance::new(settings(100), t0);
        f.start(t0);
        f.on_timer(t0 + ms(400));
        let a = f.set_tracking(t0 + ms(500), 100, true);
        assert_eq!(a[..2], [Action::Advertise { priority: 0 }, Action::ReleaseAddresses]);
        assert_eq!(f.state(), State::Fault);
        assert!(f.on_advert(t0 + ms(510), peer(), &advert(50)).is_empty(), "a faulty node stays out");
        assert_eq!(f.deadline(), None);
        // Recovery: back to backup, master again only after Master_Down_Interval of silence.
        assert!(became(&f.set_tracking(t0 + ms(600), 100, false), State::Backup));
        assert!(became(&f.on_timer(t0 + ms(961)), State::Master));
        // A faulty node does not start as master.
        let mut s = Instance::new(settings(100), t0);
        s.set_tracking(t0, 100, true);
        assert!(became(&s.start(t0), State::Fault));
    }

    #[test]
    fn a_priority_change_while_master_is_advertised_at_once() {
        let t0 = Instant::now();
        let mut i = Instance::new(settings(150), t0);
        i.start(t0);
        i.on_timer(t0 + ms(400));
        assert_eq!(i.set_tracking(t0 + ms(450), 90, false), [Action::Advertise { priority: 90 }]);
        assert_eq!(i.priority(), 90);
        assert_eq!(i.set_tracking(t0 + ms(460), 90, false), [], "no change, nothing sent");
        // The clamp keeps tracked priorities within 1-254.
        i.set_tracking(t0 + ms(470), 0, false);
        assert_eq!(i.priority(), 1);
    }

    #[test]
    fn sync_group_members_follow_without_looping() {
        let t0 = Instant::now();
        let mut i = Instance::new(settings(100), t0);
        i.start(t0);
        assert!(became(&i.follow(t0 + ms(10), State::Master), State::Master));
        assert!(i.follow(t0 + ms(20), State::Master).is_empty());
        assert!(became(&i.follow(t0 + ms(30), State::Backup), State::Backup));
        assert!(became(&i.follow(t0 + ms(40), State::Fault), State::Fault));
        assert!(became(&i.follow(t0 + ms(50), State::Backup), State::Backup));
        let mut stopped = Instance::new(settings(100), t0);
        assert!(stopped.follow(t0, State::Master).is_empty(), "a stopped instance stays stopped");
    }

    #[test]
    fn own_advertisements_are_ignored() {
        let t0 = Instant::now();
        let mut i = Instance::new(settings(100), t0);
        i.start(t0);
        i.on_timer(t0 + ms(400));
        assert!(i.on_advert(t0 + ms(410), ME.parse().unwrap(), &advert(200)).is_empty());
        assert_eq!(i.state(), State::Master);
    }
}
