//! The VRRP failover scenario as a library, so the survival test (`e2e_failover_survival`) and
//! `cargo xtask bench failover` run the same thing (architecture principle 5).
//!
//! * [`MxlbPair`]: two `mxlb run` nodes on LB 1 and LB 2 of a [`Lab`] built with
//!   [`failover_lab`] (client learns the VIP by ARP), one VRRP instance (VRID [`VRID`], VIP `mx`,
//!   adverts every [`ADVERT_MS`] ms, priorities [`MASTER_PRIORITY`] / [`BACKUP_PRIORITY`]).
//!   [`MxlbPair::crash_lb1`] is a crash: SIGKILL of the agent and LB 1's `eth0` down, so the dead
//!   node neither forwards nor answers; [`MxlbPair::stop_lb1`] a graceful stop (SIGTERM: a
//!   priority-0 advert); [`MxlbPair::restore_lb1`] brings it back (as after a reboot) and waits
//!   until it has preempted again.
//! * [`HeldSessions`]: SMTP and POP3 sessions opened through the VIP and held open mid-way (SMTP
//!   in the middle of DATA, POP3 logged in), each on its own thread in the client's namespace;
//!   [`HeldSessions::finish`] completes them and returns one [`HeldOutcome`] each.
//! * [`survive_crash`]: the whole survival scenario (open, crash LB 1, backup takes over, finish,
//!   count messages at the sinks, check every POP3 session ended on the Dovecot it started on).
//! * [`crash_takeover`] / [`graceful_takeover`]: failover times from a [`WireCapture`].
//!
//! ## What the failover times measure
//! Wire time, from the capture's kernel receive timestamps on the bridge ports:
//!
//! * **crash**: from the dead master's *last advertisement* for the VRID to the backup's *first
//!   gratuitous ARP for the VIP* (an unsolicited NA for an IPv6 VIP). The gratuitous ARP is the
//!   moment the VIP is owned by the backup as the segment sees it: the new master has put the
//!   VIP in its data path and on its interface before sending it (mxlb's runner, and keepalived,
//!   announce after taking the address), and it is what moves the clients' ARP caches. RFC 5798
//!   bounds this by Master_Down_Interval = 3 × Advert_Interval + Skew_Time of the backup's
//!   priority (360.9 ms at priority 100 and 0.1 s).
//! * **graceful**: from the master's *priority-0 advertisement* (sent on SIGTERM) to the backup's
//!   first gratuitous ARP; bounded by Skew_Time (60.9 ms).
//!
//! The backup's first advertisement as master is recorded too ([`Takeover::first_advert`]); it
//! comes a little before the gratuitous ARP (mxlb and keepalived both advertise, take the
//! address, then announce), and the gratuitous ARP counted is the first one from then on, so an
//! announcement left over from an earlier mastership of the same node is never taken for the
//! takeover.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{Arc, Condvar, Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use mxlb::vrrp::instance::State;

use crate::{
    AddrFamily, Lab, Netns,
    capture::{WireCapture, WireEvent, first_garp_in, last_advert_in},
    dovecot::Dovecot,
    keepalived::holds_addr,
    node::{MxlbNode, NodeOpts},
    vrrp::{VrrpOpts, vrrp_state, wait_vrrp},
};

/// The virtual router of the scenario.
pub const VRID: u8 = 51;
/// Advertisement interval of the scenario (the figure is for 100 ms).
pub const ADVERT_MS: u32 = 100;
/// LB 1's priority (master).
pub const MASTER_PRIORITY: u8 = 150;
/// LB 2's priority (backup).
pub const BACKUP_PRIORITY: u8 = 100;
/// The VRRP instance name in the nodes' config.
pub const INSTANCE: &str = "smtp";
/// Health settings of the nodes (as in e2e_vrrp).
pub const HEALTH: &str = "interval_ms = 200\ntimeout_ms = 200";

/// Skew_Time of the backup (RFC 5798 §6.1).
pub fn skew_time() -> Duration {
    mxlb::vrrp::timers::skew_time(BACKUP_PRIORITY, (ADVERT_MS / 10) as u16)
}

/// Master_Down_Interval of the backup (RFC 5798 §6.1).
pub fn master_down_interval() -> Duration {
    mxlb::vrrp::timers::master_down_interval(BACKUP_PRIORITY, (ADVERT_MS / 10) as u16)
}

/// The lab of the scenario: two LBs, three back-ends with smtp-sink, the client learning the VIP
/// by ARP.
pub fn failover_lab() -> Result<Lab> {
    Lab::builder().lbs(2).backends(3).vip_by_arp().build()
}

/// POP3 users `u1..uN` with passwords `pw1..pwN`.
pub fn pop3_users(n: usize) -> Vec<(String, String)> {
    (1..=n)
        .map(|i| (format!("u{i}"), format!("pw{i}")))
        .collect()
}

/// Starts one Dovecot per back-end (POP3 on 110, greeting with the back-end's name), every one
/// with all of `users`.
pub fn start_dovecots(lab: &Lab, users: &[(String, String)]) -> Result<Vec<Dovecot>> {
    let u: Vec<(&str, &str)> = users
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    lab.backends()
        .iter()
        .map(|b| {
            Dovecot::start(b.ns(), &b.name(), &u, b.v4().into())
                .with_context(|| format!("dovecot on {}", b.name()))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The mxlb pair.

/// Two `mxlb run` nodes, LB 1 (priority 150, the master) and LB 2 (priority 100), with VIP `mx`
/// on `ports` under VRRP. Dropped before the lab.
pub struct MxlbPair<'a> {
    lab: &'a Lab,
    pub lb1: MxlbNode<'a>,
    pub lb2: MxlbNode<'a>,
}

impl<'a> MxlbPair<'a> {
    /// Starts LB 2 then LB 1 and waits (bounded) until LB 1 is master, LB 2 backup and the
    /// client reaches the VIP through LB 1.
    pub fn start(lab: &'a Lab, ports: &[u16]) -> Result<MxlbPair<'a>> {
        let node = |k: usize, priority: u8| {
            let vrrp = VrrpOpts {
                priority,
                advert_ms: ADVERT_MS,
                vrid: VRID,
                name: INSTANCE.into(),
                ..Default::default()
            };
            MxlbNode::start_on(
                lab,
                k,
                NodeOpts {
                    extra: Some(vrrp.toml()),
                    health: Some(HEALTH.into()),
                    ports: ports.to_vec(),
                    ..Default::default()
                },
            )
        };
        let lb1 = node(1, MASTER_PRIORITY)?;
        let lb2 = node(2, BACKUP_PRIORITY)?;
        let pair = MxlbPair { lab, lb1, lb2 };
        pair.wait_lb1_master(Duration::from_secs(5))?;
        Ok(pair)
    }

    /// The VIP of the VRRP instance.
    pub fn vip(&self) -> IpAddr {
        self.lab.vip(AddrFamily::V4)
    }

    /// Waits until LB 1 is master, LB 2 backup, and the client's ARP entry for the VIP (after a
    /// connection attempt resolves it) is LB 1's MAC.
    pub fn wait_lb1_master(&self, timeout: Duration) -> Result<()> {
        wait_vrrp(&self.lb1, INSTANCE, State::Master, timeout)?;
        wait_vrrp(&self.lb2, INSTANCE, State::Backup, Duration::from_secs(2))?;
        let vip = self.vip();
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if self.lab.client_neighbour(vip)? == Some(self.lab.lb_n(1).mac()) {
                return Ok(());
            }
            // Resolve (or refresh) the entry: a connection to the VIP makes the client ARP.
            let _ = self
                .lab
                .client_can_connect(SocketAddr::new(vip, 25), Duration::from_millis(200));
            if Instant::now() > deadline {
                bail!(
                    "the client's ARP entry for {vip} is {:?}, not LB 1",
                    self.lab.client_neighbour(vip)?
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Crash of LB 1: SIGKILL of its agent, then its `eth0` down (the machine is gone: it
    /// neither forwards nor answers). Returns the moment the SIGKILL was sent.
    pub fn crash_lb1(&mut self) -> Result<Instant> {
        let t = Instant::now();
        self.lb1.kill();
        self.lab.lb_n(1).ns().ip(&["link", "set", "eth0", "down"])?;
        Ok(t)
    }

    /// Graceful stop of LB 1 (SIGTERM: priority-0 advert, VIP released). Returns the moment the
    /// signal was sent.
    pub fn stop_lb1(&mut self) -> Result<Instant> {
        let t = Instant::now();
        self.lb1.stop()?;
        Ok(t)
    }

    /// Waits until LB 2 is master (polls `mxlb status` every 20 ms).
    pub fn wait_lb2_master(&self, timeout: Duration) -> Result<Duration> {
        wait_vrrp(&self.lb2, INSTANCE, State::Master, timeout)
    }

    /// Waits (≤ 3 s) for LB 2's takeover after `since` (a crash or stop): first on the wire, for
    /// its gratuitous ARP in `cap`, then for `mxlb status` to say MASTER. Watching the wire
    /// first keeps the CLI's status polls (a process and a control-socket request every 20 ms,
    /// on a small machine) off the node while it is timing the takeover.
    pub fn wait_lb2_takeover(&self, cap: &WireCapture, since: Instant) -> Result<()> {
        wait_announcement(
            cap,
            self.lab.lb_n(2).mac(),
            self.vip(),
            cap.at(since),
            Duration::from_secs(3),
        )?;
        self.wait_lb2_master(Duration::from_secs(1)).map(drop)
    }

    /// Brings LB 1 back after [`MxlbPair::crash_lb1`] or [`MxlbPair::stop_lb1`], as after a
    /// reboot: the VIP address a killed agent left is removed (a rebooted machine has none),
    /// `eth0` up (with its IPv6 address, which the kernel drops on link down), the agent started
    /// again; waits until it has preempted LB 2 and the client is back on LB 1.
    pub fn restore_lb1(&mut self) -> Result<()> {
        let host = self.lab.lb_n(1);
        let ns = host.ns();
        let vip = self.vip();
        if holds_addr(ns, "eth0", vip)? {
            ns.ip(&["addr", "del", &format!("{vip}/32"), "dev", "eth0"])?;
        }
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&[
            "addr",
            "replace",
            &format!("{}/64", host.v6()),
            "dev",
            "eth0",
            "nodad",
        ])?;
        self.lb1.launch()?;
        self.wait_lb1_master(Duration::from_secs(5))
    }

    /// Which node is master now (1, 2, or 0 if neither says so).
    pub fn master(&self) -> usize {
        if vrrp_state(&self.lb1, INSTANCE).is_ok_and(|s| s == State::Master) {
            1
        } else if vrrp_state(&self.lb2, INSTANCE).is_ok_and(|s| s == State::Master) {
            2
        } else {
            0
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Failover times from the wire.

/// One failover as the segment saw it (times since the capture started).
#[derive(Clone, Debug, PartialEq)]
pub struct Takeover {
    /// Crash: the dead master's last advertisement; graceful: its priority-0 advertisement.
    pub from: Duration,
    /// The backup's first gratuitous ARP (unsolicited NA) for the VIP: the VIP is owned by the
    /// backup.
    pub owned: Duration,
    /// The backup's first advertisement after `from`.
    pub first_advert: Option<Duration>,
}

impl Takeover {
    /// `owned − from` in milliseconds: the failover time.
    pub fn ms(&self) -> f64 {
        self.owned.saturating_sub(self.from).as_secs_f64() * 1e3
    }
    /// `first_advert − from` in milliseconds.
    pub fn advert_ms(&self) -> Option<f64> {
        self.first_advert
            .map(|a| a.saturating_sub(self.from).as_secs_f64() * 1e3)
    }
}

fn first_advert_after(
    evs: &[WireEvent],
    mac: [u8; 6],
    vrid: u8,
    after: Duration,
) -> Option<Duration> {
    evs.iter()
        .find(|e| e.at >= after && e.is_advert_from(&mac.into(), vrid))
        .map(|e| e.at)
}

/// The backup (`new`)'s takeover at or after `after`: its first advertisement (a backup sends
/// none, so this is its first as master) and its first announcement of `vip` from then on. Both
/// mxlb and keepalived advertise before they announce; starting the search at the advertisement
/// keeps out a late announcement an earlier mastership scheduled (keepalived's second burst 5 s
/// after becoming master).
fn takeover_after(
    evs: &[WireEvent],
    new: [u8; 6],
    vrid: u8,
    vip: IpAddr,
    after: Duration,
) -> Result<(Option<Duration>, Duration)> {
    let first_advert = first_advert_after(evs, new, vrid, after);
    let owned = first_garp_in(evs, new, vip, first_advert.unwrap_or(after))
        .with_context(|| format!("no announcement of {vip} from the backup after {after:?}"))?
        .at;
    Ok((first_advert, owned))
}

/// Crash failover: the backup (`new`)'s first announcement of `vip` after the crash (`after`;
/// see [`Takeover`]), and the dead master (`dead`)'s last advertisement for `vrid` before it
/// (pure: works on recorded events).
pub fn crash_takeover(
    evs: &[WireEvent],
    dead: [u8; 6],
    new: [u8; 6],
    vrid: u8,
    vip: IpAddr,
    after: Duration,
) -> Result<Takeover> {
    let (first_advert, owned) = takeover_after(evs, new, vrid, vip, after)?;
    let from = last_advert_in(evs, dead.into(), vrid, owned)
        .context("no advertisement from the dead master before the takeover")?
        .at;
    Ok(Takeover {
        from,
        owned,
        first_advert,
    })
}

/// Graceful failover: the master (`old`)'s first priority-0 advertisement for `vrid` at or after
/// `after`, and the backup (`new`)'s first announcement of `vip` after it (pure).
pub fn graceful_takeover(
    evs: &[WireEvent],
    old: [u8; 6],
    new: [u8; 6],
    vrid: u8,
    vip: IpAddr,
    after: Duration,
) -> Result<Takeover> {
    let bye = evs
        .iter()
        .find(|e| {
            e.at >= after
                && e.is_advert_from(&old.into(), vrid)
                && e.advert().is_some_and(|a| a.priority == 0)
        })
        .context("no priority-0 advertisement from the stopping master")?
        .at;
    let (first_advert, owned) = takeover_after(evs, new, vrid, vip, bye)?;
    Ok(Takeover {
        from: bye,
        owned,
        first_advert,
    })
}

/// Waits (≤ `timeout`) until `cap` has recorded an announcement of `vip` from `mac` at or after
/// `after`, so the events a takeover is measured on are all there.
pub fn wait_announcement(
    cap: &WireCapture,
    mac: [u8; 6],
    vip: IpAddr,
    after: Duration,
    timeout: Duration,
) -> Result<()> {
    cap.wait_for(timeout, |e| e.at >= after && e.is_announcement(mac, vip))
        .map(|_| ())
        .with_context(|| {
            format!(
                "no announcement of {vip} from {} within {timeout:?}",
                crate::mac_to_string(&mac)
            )
        })
}

/// Median of `v` (the mean of the middle two for an even count); NaN when empty.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

// ---------------------------------------------------------------------------------------------
// Held sessions.

/// Which protocol a held session speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Smtp,
    Pop3,
}

/// Options for [`HeldSessions::open`].
#[derive(Clone, Debug)]
pub struct HeldOpts {
    pub smtp: usize,
    pub pop3: usize,
    /// Where the sessions go: the VIP's address and its SMTP / POP3 ports.
    pub target: IpAddr,
    pub smtp_port: u16,
    pub pop3_port: u16,
    /// POP3 session i logs in as `users[i % len]` (give one user per session to tell their
    /// logs apart).
    pub users: Vec<(String, String)>,
    /// Lines of body sent before the hold, and after it.
    pub body_lines: usize,
    /// Per operation (connect, each reply).
    pub timeout: Duration,
    /// Bounds the whole open phase.
    pub open_deadline: Duration,
    /// A held session that is told nothing for this long gives up on its own.
    pub hold_max: Duration,
}

impl HeldOpts {
    /// `smtp` + `pop3` sessions to the lab's IPv4 VIP on ports 25 and 110, users `u1..u{pop3}`.
    pub fn new(lab: &Lab, smtp: usize, pop3: usize) -> HeldOpts {
        HeldOpts {
            smtp,
            pop3,
            target: lab.vip(AddrFamily::V4),
            smtp_port: 25,
            pop3_port: 110,
            users: pop3_users(pop3.max(1)),
            body_lines: 20,
            timeout: Duration::from_secs(10),
            open_deadline: Duration::from_secs(30),
            hold_max: Duration::from_secs(120),
        }
    }
}

/// How one held session went.
#[derive(Clone, Debug)]
pub struct HeldOutcome {
    pub proto: Proto,
    /// 0-based within its protocol.
    pub id: usize,
    /// POP3: the user it logged in as.
    pub user: Option<String>,
    /// The client's address of the connection.
    pub local: Option<SocketAddr>,
    /// The back-end named by the greeting (smtp-sink's `-h`, Dovecot's `login_greeting`).
    pub backend: Option<String>,
    /// Whether the open phase completed (the session was held).
    pub held: bool,
    /// None: completed (SMTP: message accepted with 250 and QUIT answered; POP3: STAT, LIST and
    /// QUIT answered +OK). Otherwise where and why it failed.
    pub error: Option<String>,
    /// How long the finishing phase took (a TCP retransmission shows as ≥ 200 ms).
    pub finish_took: Option<Duration>,
}

impl HeldOutcome {
    pub fn ok(&self) -> bool {
        self.held && self.error.is_none()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    Hold,
    Finish,
    Abort,
}

#[derive(Default)]
struct Shared {
    gate: Mutex<Option<Gate>>,
    cv: Condvar,
}

impl Shared {
    fn set(&self, g: Gate) {
        *self.gate.lock().unwrap_or_else(|e| e.into_inner()) = Some(g);
        self.cv.notify_all();
    }
    /// Waits (≤ `max`) for Finish or Abort; Hold on timeout.
    fn wait(&self, max: Duration) -> Gate {
        let deadline = Instant::now() + max;
        let mut g = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match *g {
                Some(Gate::Finish) => return Gate::Finish,
                Some(Gate::Abort) => return Gate::Abort,
                _ => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Gate::Hold;
            }
            g = self
                .cv
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Sessions held open through the VIP (see the module docs). Dropping it without
/// [`HeldSessions::finish`] aborts them (sockets closed) and joins the threads.
pub struct HeldSessions {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<HeldOutcome>>,
    /// Outcome-so-far of each session after the open phase, in thread order.
    opened: Vec<HeldOutcome>,
}

impl HeldSessions {
    /// Opens `opts.smtp` SMTP sessions (greeting, EHLO, MAIL, RCPT, DATA, the first
    /// `body_lines` lines of the body) and `opts.pop3` POP3 sessions (greeting, USER, PASS,
    /// STAT), each on its own thread in the client's namespace, and returns once every one is
    /// held or failed (bounded by `opts.open_deadline`). Fails, aborting the others, if any
    /// could not be opened.
    pub fn open(lab: &Lab, opts: &HeldOpts) -> Result<HeldSessions> {
        // Built first, so an error below drops it: the threads already started are aborted
        // and joined.
        let mut sessions = HeldSessions {
            shared: Arc::new(Shared::default()),
            threads: Vec::new(),
            opened: Vec::new(),
        };
        let (tx, rx) = mpsc::channel::<(usize, HeldOutcome)>();
        let mut slots = Vec::new();
        for (proto, count) in [(Proto::Smtp, opts.smtp), (Proto::Pop3, opts.pop3)] {
            for id in 0..count {
                let (ns, sh, tx, o) = (
                    lab.client().ns().clone(),
                    sessions.shared.clone(),
                    tx.clone(),
                    opts.clone(),
                );
                let slot = slots.len();
                slots.push((proto, id));
                let t = std::thread::Builder::new()
                    .name(format!(
                        "held-{}-{id}",
                        if proto == Proto::Smtp { "smtp" } else { "pop3" }
                    ))
                    .spawn(move || {
                        held_session(&ns, proto, id, &o, &sh, &move |out| {
                            drop(tx.send((slot, out)))
                        })
                    })
                    .context("spawning a session thread")?;
                sessions.threads.push(t);
            }
        }
        drop(tx);
        let n = slots.len();
        let mut opened: Vec<Option<HeldOutcome>> = vec![None; n];
        let deadline = Instant::now() + opts.open_deadline;
        let mut got = 0;
        while got < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((slot, out)) => {
                    opened[slot] = Some(out);
                    got += 1;
                }
                Err(_) => break,
            }
        }
        sessions.opened = opened
            .into_iter()
            .zip(slots)
            .map(|(o, (proto, id))| {
                o.unwrap_or_else(|| HeldOutcome {
                    proto,
                    id,
                    user: None,
                    local: None,
                    backend: None,
                    held: false,
                    error: Some("not opened within the open deadline".into()),
                    finish_took: None,
                })
            })
            .collect();
        let failed: Vec<String> = sessions
            .opened
            .iter()
            .filter(|o| !o.held)
            .map(|o| {
                format!(
                    "{:?} {}: {}",
                    o.proto,
                    o.id,
                    o.error.as_deref().unwrap_or("?")
                )
            })
            .collect();
        if !failed.is_empty() {
            bail!(
                "{} of {n} sessions could not be opened (aborted all):\n{}",
                failed.len(),
                failed.join("\n")
            );
        }
        Ok(sessions)
    }

    /// The sessions as they were once held (back-end, client port).
    pub fn opened(&self) -> &[HeldOutcome] {
        &self.opened
    }

    /// Number of held sessions.
    pub fn len(&self) -> usize {
        self.opened.iter().filter(|o| o.held).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Completes every session (SMTP: rest of the body, "." → 250, QUIT → 221; POP3: STAT,
    /// LIST, QUIT) and returns their outcomes, SMTP first, each bounded by the options' timeout.
    pub fn finish(mut self) -> Vec<HeldOutcome> {
        self.shared.set(Gate::Finish);
        std::mem::take(&mut self.threads)
            .into_iter()
            .zip(&self.opened)
            .map(|(t, o)| {
                t.join().unwrap_or_else(|_| HeldOutcome {
                    error: Some("session thread panicked".into()),
                    ..o.clone()
                })
            })
            .collect()
    }
}

impl Drop for HeldSessions {
    fn drop(&mut self) {
        self.shared.set(Gate::Abort);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A line-based client connection.
struct Conn {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Conn {
    fn connect(target: SocketAddr, timeout: Duration) -> std::result::Result<Conn, String> {
        let s =
            TcpStream::connect_timeout(&target, timeout).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(Conn {
            w: s.try_clone().map_err(|e| e.to_string())?,
            r: BufReader::new(s),
        })
    }
    fn send(&mut self, data: &str) -> std::result::Result<(), String> {
        self.w
            .write_all(data.as_bytes())
            .map_err(|e| format!("send: {e}"))
    }
    fn line(&mut self) -> std::result::Result<String, String> {
        let mut l = String::new();
        match self.r.read_line(&mut l) {
            Ok(0) => Err("connection closed".into()),
            Ok(_) => Ok(l.trim_end().to_string()),
            Err(e) => Err(format!("read: {e}")),
        }
    }
    /// One SMTP reply (multi-line: the last line).
    fn smtp_reply(&mut self) -> std::result::Result<String, String> {
        loop {
            let l = self.line()?;
            if l.len() < 4 || l.as_bytes()[3] != b'-' {
                return Ok(l);
            }
        }
    }
    /// Sends an SMTP command and expects a reply starting with `want`.
    fn smtp(&mut self, cmd: &str, want: &str) -> std::result::Result<String, String> {
        self.send(&format!("{cmd}\r\n"))?;
        let r = self
            .smtp_reply()
            .map_err(|e| format!("{}: {e}", verb(cmd)))?;
        if r.starts_with(want) {
            Ok(r)
        } else {
            Err(format!("{}: {r}", verb(cmd)))
        }
    }
    /// Sends a POP3 command and expects `+OK`; `multi`: then reads the data up to ".".
    fn pop3(&mut self, cmd: &str, multi: bool) -> std::result::Result<String, String> {
        self.send(&format!("{cmd}\r\n"))?;
        let r = self.line().map_err(|e| format!("{}: {e}", verb(cmd)))?;
        if !r.starts_with("+OK") {
            return Err(format!("{}: {r}", verb(cmd)));
        }
        if multi {
            for _ in 0..100_000 {
                if self
                    .line()
                    .map_err(|e| format!("{} data: {e}", verb(cmd)))?
                    == "."
                {
                    return Ok(r);
                }
            }
            return Err(format!("{}: endless listing", verb(cmd)));
        }
        Ok(r)
    }
}

fn verb(cmd: &str) -> &str {
    match cmd.split_whitespace().next() {
        Some("PASS") => "PASS",
        Some(v) if v.len() <= 8 => v,
        _ => "body",
    }
}

/// The thread of one held session: opens, reports (`report`), waits at the gate, finishes.
fn held_session(
    ns: &Netns,
    proto: Proto,
    id: usize,
    o: &HeldOpts,
    gate: &Shared,
    report: &dyn Fn(HeldOutcome),
) -> HeldOutcome {
    let user = (proto == Proto::Pop3).then(|| o.users[id % o.users.len()].clone());
    let mut out = HeldOutcome {
        proto,
        id,
        user: user.as_ref().map(|u| u.0.clone()),
        local: None,
        backend: None,
        held: false,
        error: None,
        finish_took: None,
    };
    let _guard = match ns.enter() {
        Ok(g) => g,
        Err(e) => {
            out.error = Some(format!("entering the client namespace: {e:#}"));
            report(out.clone());
            return out;
        }
    };
    let port = if proto == Proto::Smtp {
        o.smtp_port
    } else {
        o.pop3_port
    };
    let target = SocketAddr::new(o.target, port);
    let line = |k: usize| {
        format!("held session {id} line {k}: the quick brown fox jumps over the lazy dog\r\n")
    };
    // Open phase.
    let opened = (|| -> std::result::Result<Conn, String> {
        let mut c = Conn::connect(target, o.timeout)?;
        out.local = c.w.local_addr().ok();
        match proto {
            Proto::Smtp => {
                let g = c.smtp_reply().map_err(|e| format!("greeting: {e}"))?;
                if !g.starts_with("220") {
                    return Err(format!("greeting: {g}"));
                }
                out.backend = g
                    .get(4..)
                    .and_then(|g| g.split_whitespace().next())
                    .map(str::to_string);
                c.smtp("EHLO client.example.com", "250")?;
                c.smtp("MAIL FROM:<sender@example.com>", "250")?;
                c.smtp(&format!("RCPT TO:<held{id}@example.net>"), "250")?;
                c.smtp("DATA", "354")?;
                let mut body = format!("Subject: held session {id}\r\n\r\n");
                for k in 0..o.body_lines {
                    body += &line(k);
                }
                c.send(&body)?;
            }
            Proto::Pop3 => {
                let g = c.line().map_err(|e| format!("greeting: {e}"))?;
                if !g.starts_with("+OK") {
                    return Err(format!("greeting: {g}"));
                }
                out.backend = g
                    .get(4..)
                    .and_then(|g| g.split_whitespace().next())
                    .map(str::to_string);
                let (u, p) = user.as_ref().expect("pop3 user");
                c.pop3(&format!("USER {u}"), false)?;
                c.pop3(&format!("PASS {p}"), false)?;
                c.pop3("STAT", false)?;
            }
        }
        Ok(c)
    })();
    let mut c = match opened {
        Ok(c) => c,
        Err(e) => {
            out.error = Some(format!("open: {e}"));
            report(out.clone());
            return out;
        }
    };
    out.held = true;
    report(out.clone());
    match gate.wait(o.hold_max) {
        Gate::Finish => {}
        Gate::Abort => {
            out.error = Some("aborted".into());
            return out;
        }
        Gate::Hold => {
            out.error = Some(format!("not told to finish within {:?}", o.hold_max));
            return out;
        }
    }
    // Finishing phase.
    let t = Instant::now();
    let done = (|| -> std::result::Result<(), String> {
        match proto {
            Proto::Smtp => {
                let mut body = String::new();
                for k in o.body_lines..2 * o.body_lines {
                    body += &line(k);
                }
                c.send(&body)?;
                c.smtp(".", "250")
                    .map_err(|e| format!("end of DATA: {e}"))?;
                c.smtp("QUIT", "221")?;
            }
            Proto::Pop3 => {
                c.pop3("STAT", false)?;
                c.pop3("LIST", true)?;
                c.pop3("QUIT", false)?;
            }
        }
        Ok(())
    })();
    out.finish_took = Some(t.elapsed());
    if let Err(e) = done {
        out.error = Some(format!("finish: {e}"));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The survival scenario.

/// What [`survive_crash`] saw.
#[derive(Debug)]
pub struct SurvivalReport {
    pub outcomes: Vec<HeldOutcome>,
    /// Messages the SMTP sessions should have delivered (one each).
    pub messages_expected: u64,
    /// New messages at the sinks, per back-end (index 0 = back-end 1).
    pub messages_by_backend: Vec<u64>,
    /// Completed SMTP sessions per back-end named in their greeting.
    pub smtp_by_backend: Vec<u64>,
    /// POP3 sessions whose logout is not (only) in the log of the Dovecot that greeted them.
    pub pop3_misplaced: Vec<String>,
    /// The crash as the wire saw it.
    pub takeover: Option<Takeover>,
    /// Kill → LB 2's announcement seen on the wire and its status MASTER (when the sessions
    /// were told to finish).
    pub master_after: Duration,
    /// The client's ARP entry for the VIP after the sessions finished.
    pub client_vip_mac: Option<[u8; 6]>,
    /// Held sessions (SMTP and POP3) per back-end named in their greeting.
    pub held_by_backend: Vec<u64>,
    /// Flows LB 2's data path newly assigned to each back-end from the crash until the
    /// sessions finished: each held session is a conntrack miss there and must be assigned, by
    /// the Maglev table alone, to the back-end it started on.
    pub lb2_new_flows_by_backend: Vec<u64>,
}

impl SurvivalReport {
    pub fn total(&self) -> usize {
        self.outcomes.len()
    }
    /// Sessions that completed.
    pub fn survived(&self) -> usize {
        self.outcomes.iter().filter(|o| o.ok()).count()
    }
    pub fn messages_delivered(&self) -> u64 {
        self.messages_by_backend.iter().sum()
    }
    /// The failures, one line each.
    pub fn failures(&self) -> Vec<String> {
        self.outcomes
            .iter()
            .filter(|o| !o.ok())
            .map(|o| {
                format!(
                    "{:?} {} (client {:?}, back-end {:?}{}): {}",
                    o.proto,
                    o.id,
                    o.local,
                    o.backend,
                    o.user
                        .as_ref()
                        .map(|u| format!(", user {u}"))
                        .unwrap_or_default(),
                    o.error.as_deref().unwrap_or("?")
                )
            })
            .collect()
    }
    /// Every session completed, every message arrived at the back-end that greeted its session,
    /// every POP3 session ended on the Dovecot it started on.
    pub fn check(&self) -> Result<()> {
        let f = self.failures();
        ensure!(
            f.is_empty(),
            "{} of {} held sessions failed:\n{}",
            f.len(),
            self.total(),
            f.join("\n")
        );
        ensure!(
            self.messages_delivered() == self.messages_expected,
            "sinks got {} messages ({:?}), expected {}",
            self.messages_delivered(),
            self.messages_by_backend,
            self.messages_expected
        );
        ensure!(
            self.messages_by_backend == self.smtp_by_backend,
            "messages per sink {:?} differ from SMTP sessions per greeting back-end {:?}",
            self.messages_by_backend,
            self.smtp_by_backend
        );
        ensure!(
            self.pop3_misplaced.is_empty(),
            "POP3 sessions not ended where they started:\n{}",
            self.pop3_misplaced.join("\n")
        );
        ensure!(
            self.lb2_new_flows_by_backend == self.held_by_backend,
            "LB 2 assigned new flows {:?} per back-end, the held sessions started on {:?}",
            self.lb2_new_flows_by_backend,
            self.held_by_backend
        );
        Ok(())
    }
}

fn messages(lab: &Lab) -> Vec<u64> {
    lab.sink_counts().iter().map(|c| c.messages).collect()
}

/// `new_flows` of each IPv4 back-end (`b1..bN`) in `node`'s data path.
pub fn new_flows(lab: &Lab, node: &MxlbNode) -> Result<Vec<u64>> {
    let rows = node.backends_json()?;
    (1..=lab.backends().len())
        .map(|i| {
            let name = MxlbNode::backend_name(AddrFamily::V4, i);
            rows.as_array()
                .into_iter()
                .flatten()
                .find(|r| r["name"] == name.as_str())
                .and_then(|r| r["counters"]["new_flows"].as_u64())
                .with_context(|| format!("no counters for {name} in `backend list --json`"))
        })
        .collect()
}

/// The survival scenario: with LB 1 master, opens `smtp` + `pop3` held sessions through the
/// VIP, crashes LB 1 ([`MxlbPair::crash_lb1`]), waits until LB 2 is master, finishes every
/// session, then counts the messages at the sinks (messages, not sessions: health probes open
/// sessions too) and checks each POP3 session's logout in the Dovecot logs. `cap` (a
/// [`WireCapture::segment`] started at least one advert interval before) times the takeover and
/// tells when it happened. Leaves LB 1 down: call
/// [`MxlbPair::restore_lb1`] to go on.
pub fn survive_crash(
    lab: &Lab,
    pair: &mut MxlbPair,
    dovecots: &[Dovecot],
    cap: &WireCapture,
    smtp: usize,
    pop3: usize,
) -> Result<SurvivalReport> {
    ensure!(pair.master() == 1, "LB 1 must be master before the crash");
    let opts = HeldOpts::new(lab, smtp, pop3);
    ensure!(pop3 <= opts.users.len(), "one POP3 user per session");
    let before = messages(lab);
    let held = HeldSessions::open(lab, &opts)?;
    // Every session went through LB 1.
    ensure!(
        lab.client_neighbour(pair.vip())? == Some(lab.lb_n(1).mac()),
        "sessions were not opened through LB 1"
    );
    let flows_before = new_flows(lab, &pair.lb2)?;
    let killed = pair.crash_lb1()?;
    pair.wait_lb2_takeover(cap, killed)?;
    let master_after = killed.elapsed();
    let outcomes = held.finish();
    let lb2_new_flows_by_backend = new_flows(lab, &pair.lb2)?
        .iter()
        .zip(&flows_before)
        .map(|(a, b)| a - b)
        .collect();
    let takeover = crash_takeover(
        &cap.events(),
        lab.lb_n(1).mac(),
        lab.lb_n(2).mac(),
        VRID,
        pair.vip(),
        cap.at(killed),
    )
    .ok();
    // Messages at the sinks (smtp-sink counts a message at its final "."; wait, bounded).
    let expected = outcomes
        .iter()
        .filter(|o| o.proto == Proto::Smtp && o.ok())
        .count() as u64;
    let deadline = Instant::now() + Duration::from_secs(5);
    let delta = loop {
        let d: Vec<u64> = messages(lab)
            .iter()
            .zip(&before)
            .map(|(a, b)| a - b)
            .collect();
        if d.iter().sum::<u64>() >= expected || Instant::now() > deadline {
            break d;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let names: Vec<String> = lab.backends().iter().map(|b| b.name()).collect();
    let smtp_by_backend = names
        .iter()
        .map(|n| {
            outcomes
                .iter()
                .filter(|o| o.proto == Proto::Smtp && o.ok() && o.backend.as_deref() == Some(n))
                .count() as u64
        })
        .collect();
    let held_by_backend = names
        .iter()
        .map(|n| {
            outcomes
                .iter()
                .filter(|o| o.held && o.backend.as_deref() == Some(n))
                .count() as u64
        })
        .collect();
    // POP3: the user's logout must be in the log of the Dovecot that greeted it, and no other.
    let deadline = Instant::now() + Duration::from_secs(3);
    let pop3_misplaced = loop {
        let logs: Vec<(String, String)> =
            dovecots.iter().map(|d| (d.name.clone(), d.log())).collect();
        let bad: Vec<String> = outcomes
            .iter()
            .filter(|o| o.proto == Proto::Pop3 && o.ok())
            .filter_map(|o| {
                let user = o.user.as_deref()?;
                let tag = format!("pop3({user})");
                let ended: Vec<&str> = logs
                    .iter()
                    .filter(|(_, l)| {
                        l.lines()
                            .any(|x| x.contains(&tag) && x.contains("Logged out"))
                    })
                    .map(|(n, _)| n.as_str())
                    .collect();
                (ended != [o.backend.as_deref().unwrap_or("?")]).then(|| {
                    format!(
                        "POP3 {} user {user}: greeted by {:?}, logged out on {ended:?}",
                        o.id, o.backend
                    )
                })
            })
            .collect();
        if bad.is_empty() || Instant::now() > deadline {
            break bad;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(SurvivalReport {
        messages_expected: smtp as u64,
        messages_by_backend: delta,
        smtp_by_backend,
        pop3_misplaced,
        takeover,
        master_after,
        client_vip_mac: lab.client_neighbour(pair.vip())?,
        held_by_backend,
        lb2_new_flows_by_backend,
        outcomes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{Advert, WireKind};
    use std::net::Ipv4Addr;

    const M1: [u8; 6] = [2, 0x6d, 0x78, 0, 0, 2];
    const M2: [u8; 6] = [2, 0x6d, 0x78, 0, 0, 3];

    fn adv(ms: u64, mac: [u8; 6], prio: u8) -> WireEvent {
        WireEvent {
            at: Duration::from_millis(ms),
            src_mac: mac,
            ifindex: 1,
            kind: WireKind::Advert(Advert {
                version: 3,
                vrid: VRID,
                priority: prio,
                interval_cs: 10,
                src_ip: Ipv4Addr::new(198, 18, 0, mac[5]).into(),
                dst_ip: "224.0.0.18".parse().unwrap(),
                addrs: vec![],
            }),
        }
    }

    fn garp(ms: u64, mac: [u8; 6]) -> WireEvent {
        WireEvent {
            at: Duration::from_millis(ms),
            src_mac: mac,
            ifindex: 1,
            kind: WireKind::Garp {
                ip: Ipv4Addr::new(198, 18, 0, 100),
                op: 1,
                sender_mac: mac,
            },
        }
    }

    #[test]
    fn crash_is_last_advert_to_first_garp() {
        let vip: IpAddr = "198.18.0.100".parse().unwrap();
        // An old GARP of LB 2 (an earlier mastership) before the crash is ignored.
        // So is one it scheduled then that comes after the crash, before its takeover.
        let evs = [
            garp(10, M2),
            adv(100, M1, 150),
            adv(200, M1, 150),
            garp(300, M2),
            adv(562, M2, 100),
            garp(563, M2),
            garp(573, M2),
        ];
        let t = crash_takeover(&evs, M1, M2, VRID, vip, Duration::from_millis(250)).unwrap();
        assert_eq!(t.from, Duration::from_millis(200));
        assert_eq!(t.owned, Duration::from_millis(563));
        assert_eq!(t.first_advert, Some(Duration::from_millis(562)));
        assert!((t.ms() - 363.0).abs() < 1e-9);
        assert!((t.advert_ms().unwrap() - 362.0).abs() < 1e-9);
        assert!(crash_takeover(&evs, M1, M2, VRID, vip, Duration::from_millis(600)).is_err());
        assert!(crash_takeover(&evs, M1, M2, 52, vip, Duration::from_millis(250)).is_err());
    }

    #[test]
    fn graceful_is_priority_zero_to_first_garp() {
        let vip: IpAddr = "198.18.0.100".parse().unwrap();
        let evs = [
            adv(100, M1, 150),
            adv(150, M1, 0),
            adv(212, M2, 100),
            garp(213, M2),
        ];
        let t = graceful_takeover(&evs, M1, M2, VRID, vip, Duration::ZERO).unwrap();
        assert_eq!(
            (t.from, t.owned),
            (Duration::from_millis(150), Duration::from_millis(213))
        );
        assert!(graceful_takeover(&evs[..1], M1, M2, VRID, vip, Duration::ZERO).is_err());
    }

    #[test]
    fn bounds_and_median() {
        assert_eq!(master_down_interval(), Duration::from_micros(360_937));
        assert_eq!(skew_time(), Duration::from_micros(60_937));
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(
            pop3_users(2),
            [
                ("u1".to_string(), "pw1".to_string()),
                ("u2".into(), "pw2".into())
            ]
        );
    }
}
