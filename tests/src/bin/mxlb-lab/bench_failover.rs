//! `cargo xtask bench failover`: how long a VRRP failover takes on the wire, for mxlb and for
//! keepalived on the same machine in the same run, and whether sessions survive it.
//!
//! Adverts every 100 ms, priorities 150 (LB 1, master) and 100 (LB 2, backup), VRID 51 holding
//! the IPv4 VIP; the client learns the VIP by ARP. Times come from a capture on the bridge ports
//! (kernel receive timestamps; see `lab::failover` for the definitions):
//!
//! - `crash_failover_ms`: LB 1's agent is killed (SIGKILL) and its `eth0` taken down; from its
//!   last advert to LB 2's first gratuitous ARP for the VIP. Median of [`TRIALS`]; after each,
//!   LB 1 comes back (as after a reboot) and preempts.
//! - `graceful_failover_ms`: LB 1's agent gets SIGTERM; from its priority-0 advert to LB 2's
//!   first gratuitous ARP. Median of [`TRIALS`].
//! - `keepalived_crash_failover_ms` (and `keepalived_graceful_failover_ms`): the same with two
//!   keepalived nodes in a second lab (crash = SIGKILL of both its processes, VIP removed by hand,
//!   `eth0` down).
//! - `sessions_total` / `sessions_survived`: one run of the survival scenario
//!   (`lab::failover::survive_crash`): 50 SMTP sessions held in DATA and 20 POP3 sessions held
//!   logged in, opened through LB 1, finished after LB 1 crashed and LB 2 took over.
//!
//! RFC 5798 bounds at priority 100 and 0.1 s: Master_Down_Interval 360.9 ms (crash) and
//! Skew_Time 60.9 ms (graceful); the targets are those + 20 ms.
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use lab::{
    AddrFamily, Lab,
    capture::WireCapture,
    failover::{
        ADVERT_MS, BACKUP_PRIORITY, MASTER_PRIORITY, MxlbPair, Takeover, VRID, crash_takeover,
        failover_lab, graceful_takeover, master_down_interval, median, pop3_users, skew_time,
        start_dovecots, survive_crash, wait_announcement,
    },
    keepalived::{Keepalived, KeepalivedOpts, VrrpState},
};

/// Crash and graceful trials, each, per implementation.
pub const TRIALS: usize = 5;
const SMTP: usize = 50;
const POP3: usize = 20;
/// Slack the issue allows over the RFC bounds.
const SLACK_MS: f64 = 20.0;

#[derive(Default)]
struct Series {
    crash: Vec<Takeover>,
    graceful: Vec<Takeover>,
}

fn ms(v: &[Takeover]) -> Vec<f64> {
    v.iter().map(Takeover::ms).collect()
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round_all(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| round1(*x)).collect()
}

struct Survival {
    total: usize,
    survived: usize,
    messages_expected: u64,
    messages_delivered: u64,
    pop3_misplaced: usize,
    failures: Vec<String>,
    takeover_ms: Option<f64>,
    slowest_finish_ms: f64,
}

/// The mxlb pair: the survival run, then crash and graceful trials.
fn mxlb_series(deadline: Instant) -> Result<(Series, Survival)> {
    let lab = failover_lab()?;
    let dovecots = start_dovecots(&lab, &pop3_users(POP3))?;
    let mut pair = MxlbPair::start(&lab, &[25, 110])?;
    let cap = WireCapture::segment(&lab)?;
    let (m1, m2, vip) = (
        lab.lb_n(1).mac(),
        lab.lb_n(2).mac(),
        lab.vip(AddrFamily::V4),
    );

    println!("== mxlb: {SMTP} SMTP + {POP3} POP3 sessions held through LB 1, LB 1 crashes");
    let r = survive_crash(&lab, &mut pair, &dovecots, &cap, SMTP, POP3)?;
    let survival = Survival {
        total: r.total(),
        survived: r.survived(),
        messages_expected: r.messages_expected,
        messages_delivered: r.messages_delivered(),
        pop3_misplaced: r.pop3_misplaced.len(),
        failures: r.failures(),
        takeover_ms: r.takeover.as_ref().map(Takeover::ms),
        slowest_finish_ms: r
            .outcomes
            .iter()
            .filter_map(|o| o.finish_took)
            .max()
            .unwrap_or_default()
            .as_secs_f64()
            * 1e3,
    };
    if let Err(e) = r.check() {
        println!("   NOT ALL SURVIVED: {e:#}");
    }
    println!(
        "   {}/{} survived, {}/{} messages at the sinks",
        survival.survived, survival.total, survival.messages_delivered, survival.messages_expected
    );
    pair.restore_lb1()?;

    let mut s = Series::default();
    for i in 0..TRIALS {
        check_time(deadline)?;
        let killed = pair.crash_lb1()?;
        pair.wait_lb2_takeover(&cap, killed)?;
        let t = crash_takeover(&cap.events(), m1, m2, VRID, vip, cap.at(killed))?;
        println!("== mxlb crash {}: {:.1} ms", i + 1, t.ms());
        s.crash.push(t);
        pair.restore_lb1()?;
    }
    for i in 0..TRIALS {
        check_time(deadline)?;
        let stopped = pair.stop_lb1()?;
        pair.wait_lb2_takeover(&cap, stopped)?;
        let t = graceful_takeover(&cap.events(), m1, m2, VRID, vip, cap.at(stopped))?;
        println!("== mxlb graceful {}: {:.1} ms", i + 1, t.ms());
        s.graceful.push(t);
        pair.restore_lb1()?;
    }
    if cap.overflowed() > 0 {
        bail!("the capture overflowed ({} events lost)", cap.overflowed());
    }
    Ok((s, survival))
}

/// The keepalived pair in its own lab (no balancer: a plain VRRP pair).
fn keepalived_series(deadline: Instant) -> Result<Series> {
    let lab = Lab::builder()
        .lbs(2)
        .backends(1)
        .vip_by_arp()
        .no_sinks()
        .build()?;
    let cap = WireCapture::segment(&lab)?;
    let (m1, m2, vip) = (
        lab.lb_n(1).mac(),
        lab.lb_n(2).mac(),
        lab.vip(AddrFamily::V4),
    );
    let opts = |priority| KeepalivedOpts {
        vrid: VRID,
        priority,
        advert_int_ms: ADVERT_MS,
        ..Default::default()
    };
    let start_lb1 = || -> Result<Keepalived<'_>> {
        let ka = Keepalived::start(&lab, 1, &opts(MASTER_PRIORITY))?;
        ka.wait_master(Duration::from_secs(5))?;
        Ok(ka)
    };
    let mut ka1 = start_lb1()?;
    let ka2 = Keepalived::start(&lab, 2, &opts(BACKUP_PRIORITY))?;
    ka2.wait_state(VrrpState::Backup, Duration::from_secs(5))?;
    let lb1 = lab.lb_n(1);
    let mut s = Series::default();
    for i in 0..2 * TRIALS {
        check_time(deadline)?;
        let crash = i < TRIALS;
        let at = if crash {
            let t = ka1.kill();
            lb1.ns().ip(&["link", "set", "eth0", "down"])?;
            t
        } else {
            let t = Instant::now();
            ka1.stop()?;
            t
        };
        // The wire first, then keepalived's log and addresses (as for mxlb).
        let after = cap.at(at);
        wait_announcement(&cap, m2, vip, after, Duration::from_secs(3))?;
        ka2.wait_master(Duration::from_secs(1))?;
        let evs = cap.events();
        let t = if crash {
            crash_takeover(&evs, m1, m2, VRID, vip, after)?
        } else {
            graceful_takeover(&evs, m1, m2, VRID, vip, after)?
        };
        println!(
            "== keepalived {} {}: {:.1} ms",
            if crash { "crash" } else { "graceful" },
            i % TRIALS + 1,
            t.ms()
        );
        if crash {
            s.crash.push(t);
            lb1.ns().ip(&["link", "set", "eth0", "up"])?;
            lb1.ns().ip(&[
                "addr",
                "replace",
                &format!("{}/64", lb1.v6()),
                "dev",
                "eth0",
                "nodad",
            ])?;
        } else {
            s.graceful.push(t);
        }
        drop(ka1);
        ka1 = start_lb1().context("keepalived on LB 1 back")?;
        ka2.wait_state(VrrpState::Backup, Duration::from_secs(5))?;
    }
    Ok(s)
}

fn check_time(deadline: Instant) -> Result<()> {
    if Instant::now() > deadline {
        bail!("bench failover ran over its time limit");
    }
    Ok(())
}

pub fn run() -> Result<()> {
    if !lab::is_root() {
        bail!("bench failover needs root (network namespaces, BPF)");
    }
    let deadline = Instant::now() + Duration::from_secs(240);
    let (mx, surv) = mxlb_series(deadline)?;
    let ka = keepalived_series(deadline)?;
    let mdi = master_down_interval().as_secs_f64() * 1e3;
    let skew = skew_time().as_secs_f64() * 1e3;
    let (crash, graceful) = (median(&ms(&mx.crash)), median(&ms(&mx.graceful)));
    let (ka_crash, ka_graceful) = (median(&ms(&ka.crash)), median(&ms(&ka.graceful)));
    let verdict = |v: f64, bound: f64| if v <= bound + SLACK_MS { "ok" } else { "OVER" };
    println!(
        "\nVRRP failover on the wire (advert {ADVERT_MS} ms, priorities {MASTER_PRIORITY}/{BACKUP_PRIORITY}, median of {TRIALS}; keepalived measured in the same run)"
    );
    println!(
        "                           mxlb   keepalived   RFC bound   target (bound + {SLACK_MS} ms)"
    );
    println!(
        "  crash_failover_ms    {crash:>8.1}   {ka_crash:>10.1}   {mdi:>9.1}   {:>6.1}  {}",
        mdi + SLACK_MS,
        verdict(crash, mdi)
    );
    println!(
        "  graceful_failover_ms {graceful:>8.1}   {ka_graceful:>10.1}   {skew:>9.1}   {:>6.1}  {}",
        skew + SLACK_MS,
        verdict(graceful, skew)
    );
    println!("  mxlb crash trials     {:?}", round_all(&ms(&mx.crash)));
    println!("  mxlb graceful trials  {:?}", round_all(&ms(&mx.graceful)));
    println!("  keepalived crash      {:?}", round_all(&ms(&ka.crash)));
    println!("  keepalived graceful   {:?}", round_all(&ms(&ka.graceful)));
    println!(
        "  sessions survived    {}/{} ({SMTP} SMTP held in DATA, {POP3} POP3 logged in; {}/{} messages at the sinks; crash took {} ms on the wire; slowest finish {:.0} ms)",
        surv.survived,
        surv.total,
        surv.messages_delivered,
        surv.messages_expected,
        surv.takeover_ms.map_or("?".into(), |t| format!("{t:.1}")),
        surv.slowest_finish_ms
    );
    for f in &surv.failures {
        println!("    failed: {f}");
    }
    let adv = |v: &[Takeover]| {
        v.iter()
            .map(|t| t.advert_ms().map(round1))
            .collect::<Vec<_>>()
    };
    let json = serde_json::json!({
        "crash_failover_ms": round1(crash),
        "graceful_failover_ms": round1(graceful),
        "keepalived_crash_failover_ms": round1(ka_crash),
        "keepalived_graceful_failover_ms": round1(ka_graceful),
        "sessions_total": surv.total,
        "sessions_survived": surv.survived,
        "crash_trials_ms": round_all(&ms(&mx.crash)),
        "graceful_trials_ms": round_all(&ms(&mx.graceful)),
        "keepalived_crash_trials_ms": round_all(&ms(&ka.crash)),
        "keepalived_graceful_trials_ms": round_all(&ms(&ka.graceful)),
        "crash_first_advert_ms": adv(&mx.crash),
        "graceful_first_advert_ms": adv(&mx.graceful),
        "keepalived_crash_first_advert_ms": adv(&ka.crash),
        "keepalived_graceful_first_advert_ms": adv(&ka.graceful),
        "master_down_interval_ms": round1(mdi),
        "skew_time_ms": round1(skew),
        "crash_target_ms": round1(mdi + SLACK_MS),
        "graceful_target_ms": round1(skew + SLACK_MS),
        "crash_within_target": crash <= mdi + SLACK_MS,
        "graceful_within_target": graceful <= skew + SLACK_MS,
        "sessions_smtp": SMTP,
        "sessions_pop3": POP3,
        "messages_expected": surv.messages_expected,
        "messages_delivered": surv.messages_delivered,
        "pop3_not_on_their_backend": surv.pop3_misplaced,
        "session_failures": surv.failures,
        "survival_crash_failover_ms": surv.takeover_ms.map(round1),
        "slowest_session_finish_ms": round1(surv.slowest_finish_ms),
        "advert_interval_ms": ADVERT_MS,
        "priorities": [MASTER_PRIORITY, BACKUP_PRIORITY],
        "trials": TRIALS,
        "method": "wire time from a capture on the bridge ports (kernel receive timestamps). crash: SIGKILL of the master's agent + its eth0 down; from the dead master's last advert to the backup's first gratuitous ARP for the VIP (counted from the backup's first advert on). graceful: SIGTERM; from the master's priority-0 advert to the backup's first gratuitous ARP. keepalived: the same topology with two keepalived nodes in a second lab, same run. sessions: one crash with 50 SMTP sessions held in DATA and 20 POP3 sessions held logged in, finished after the takeover.",
    });
    super::write_bench("failover", &json)
}
