//! `cargo xtask bench relay`: mxlb's store-and-forward relay with synchronous mirroring, next
//! to a real Postfix relay, in one lab and one run; then crash trials that count lost and
//! duplicated messages.
//!
//! Lab ([`lab::relay::relay_lab`]): client, two LB nodes (the client finds the VIP by ARP),
//! [`BACKENDS`] back-ends running smtp-sink that dump every message ([`DumpSinks`]).
//!
//! Rows, measured one after the other (only one relay runs at a time):
//! 1. `postfix`: Postfix 3.7 ([`lab::postfix::PostfixRelay`]) in LB 1's namespace, listening on
//!    LB 1's address, `relayhost = [back-end 1]:25`, Postfix's defaults otherwise;
//! 2. `mxlb`: `mxlb run` on LB 1 and LB 2 ([`RelayPair`] with the default [`RelayOpts`]: strict
//!    synchronous mirroring, LB 1 VRRP master), relaying to every back-end; clients use the VIP.
//!
//! Per row: [`WARMUP`] unmeasured messages, then [`REPEATS`] runs of smtp-source
//! (`-s 20 -l 4096 -m MESSAGES`, one message per session, `-f sender@example.com -t
//! rcpt@example.net`); accepted msgs/s = messages acknowledged (smtp-source's completed count)
//! / wall time of smtp-source, the row's figure is the median of its runs. After each run the
//! bench waits (bounded) until the relay has delivered it all (sink counters; for Postfix also
//! an empty queue), so a run never competes with the previous one's deliveries. Then one
//! `mxlb-bench smtp` run ([`LATENCY_MESSAGES`] messages, 20 concurrent, 4096 bytes) gives the
//! p99 accept latency: from the write carrying the final `.` to the 250 reply.
//!
//! Kill trials ([`KILL_TRIALS`], each on a fresh pair and fresh sinks): smtp-source `-v` sends
//! [`KILL_MESSAGES`] messages to the VIP; at a pseudo-random instant between 25% and 75% of the
//! run's expected length (from the measured rate) LB 1's `mxlb run` gets SIGKILL; LB 2 takes
//! the VIP (VRRP) and LB 1's queue (mirror takeover). The ids of every `250 ... queued as ID`
//! reply ([`acknowledged_ids`]) must all reach the sinks (waited for, bounded); [`reconcile`]
//! gives the lost ones (must be 0: the bench exits non-zero otherwise) and the duplicates
//! (counted after the arrivals have settled).
//!
//! Writes target/bench/relay.json and prints a table. The bench reports, it does not judge:
//! the only failures are lost messages and a row it could not measure (the JSON is written
//! first, with what was measured and the error).
//!
//! Options (after `bench relay`): `--messages N` (per run, default [`MESSAGES`]), `--repeats N`,
//! `--trials N`, `--kill-messages N`.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lab::{
    AddrFamily, Lab, SourceOpts, loadgen,
    postfix::{PostfixRelay, require_postfix},
    relay::{DumpSinks, RelayOpts, RelayPair, relay_lab},
};
use serde_json::{Value, json};

use super::{machine, median, today};

const BACKENDS: usize = 2;
/// Messages per measured smtp-source run (one per session).
const MESSAGES: u32 = 5000;
const REPEATS: usize = 3;
/// Unmeasured messages before each row's runs, the same for both: enough to reach steady
/// state (mxlb's spool reuses finished message files, which a fresh spool does not have yet;
/// Postfix's queue directories and process pools warm up too).
const WARMUP: u32 = 2000;
const CONCURRENCY: u32 = 20;
const MSG_SIZE: usize = 4096;
/// Messages of the mxlb-bench latency run.
const LATENCY_MESSAGES: u32 = 2000;
const KILL_TRIALS: usize = 3;
const KILL_MESSAGES: u32 = 2000;
const FROM: &str = "sender@example.com";
const TO: &str = "rcpt@example.net";
/// Bound on waiting for a run's messages to arrive at the sinks.
const DELIVERY_LIMIT: Duration = Duration::from_secs(180);

struct Params {
    messages: u32,
    repeats: usize,
    trials: usize,
    kill_messages: u32,
}

fn params() -> Result<Params> {
    let mut p = Params { messages: MESSAGES, repeats: REPEATS, trials: KILL_TRIALS, kill_messages: KILL_MESSAGES };
    // mxlb-lab bench relay [options]
    let args: Vec<String> = std::env::args().skip(3).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = |what: &str| -> Result<u64> {
            it.next().with_context(|| format!("{a} needs {what}"))?.parse().with_context(|| format!("{a} {what}"))
        };
        match a.as_str() {
            "--messages" => p.messages = num("N")?.clamp(1, 1_000_000) as u32,
            "--repeats" => p.repeats = num("N")?.clamp(1, 20) as usize,
            "--trials" => p.trials = num("N")?.clamp(0, 50) as usize,
            "--kill-messages" => p.kill_messages = num("N")?.clamp(1, 1_000_000) as u32,
            other => bail!("bench relay: unknown option {other} (--messages N, --repeats N, --trials N, --kill-messages N)"),
        }
    }
    Ok(p)
}

/// One measured smtp-source run.
struct Run {
    completed: u64,
    elapsed: Duration,
    failures: usize,
    /// From the end of smtp-source until the sinks had every message.
    delivered_after: Duration,
}

impl Run {
    fn rate(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn json(&self) -> Value {
        json!({
            "completed": self.completed,
            "elapsed_s": round(self.elapsed.as_secs_f64(), 3),
            "msgs_per_s": round(self.rate(), 1),
            "failures": self.failures,
            "delivered_after_s": round(self.delivered_after.as_secs_f64(), 2),
        })
    }
}

/// A row's figures.
#[derive(Default)]
struct Row {
    runs: Vec<Run>,
    p99_ms: Option<f64>,
    latency: Value,
}

impl Row {
    fn rate(&self) -> Option<f64> {
        (!self.runs.is_empty()).then(|| median(self.runs.iter().map(Run::rate).collect()))
    }
    fn json(&self) -> Value {
        json!({
            "msgs_per_s": self.rate().map(|r| round(r, 1)),
            "runs": self.runs.iter().map(Run::json).collect::<Vec<_>>(),
            "p99_accept_ms": self.p99_ms.map(|v| round(v, 2)),
            "latency_run": self.latency,
        })
    }
}

/// One crash trial.
struct Trial {
    kill_at: Duration,
    /// Messages smtp-source completed over the trial's runs.
    completed: u64,
    runs: usize,
    acknowledged: usize,
    arrived: usize,
    lost: Vec<String>,
    duplicates: usize,
    lb2_master_after: Option<Duration>,
    arrival_wait: Duration,
}

impl Trial {
    fn json(&self) -> Value {
        json!({
            "kill_at_s": round(self.kill_at.as_secs_f64(), 3),
            "source_completed": self.completed,
            "source_runs": self.runs,
            "acknowledged": self.acknowledged,
            "arrived": self.arrived,
            "lost": self.lost.len(),
            "lost_ids": self.lost.iter().take(20).collect::<Vec<_>>(),
            "duplicates": self.duplicates,
            "lb2_master_after_kill_ms": self.lb2_master_after.map(|d| round(d.as_secs_f64() * 1000.0, 1)),
            "arrival_wait_s": round(self.arrival_wait.as_secs_f64(), 2),
        })
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn source_opts(messages: u32) -> SourceOpts {
    SourceOpts {
        sessions: messages,
        concurrency: CONCURRENCY,
        msg_size: MSG_SIZE,
        from: FROM.into(),
        to: TO.into(),
        // At least 50 msgs/s, or the run is cut short (and reported so).
        timeout: Duration::from_secs(30 + u64::from(messages) / 50),
        ..Default::default()
    }
}

fn sink_messages(sinks: &DumpSinks) -> u64 {
    sinks.sinks.iter().map(|s| s.counts().messages).sum()
}

/// Waits (bounded) until the sinks have received `total` messages; returns how long it took.
fn wait_delivered(sinks: &DumpSinks, total: u64, what: &str) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        let got = sink_messages(sinks);
        if got >= total {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > DELIVERY_LIMIT {
            bail!("{what}: the sinks have {got} of {total} messages after {DELIVERY_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One smtp-source run to `target`, then the wait for its deliveries (`drained` adds the
/// relay's own check, e.g. Postfix's empty queue).
fn measure_run(
    lab: &Lab,
    sinks: &DumpSinks,
    target: SocketAddr,
    messages: u32,
    what: &str,
    drained: &dyn Fn() -> Result<()>,
) -> Result<Run> {
    let before = sink_messages(sinks);
    let r = lab.smtp_source(target, &source_opts(messages))?;
    if r.completed == 0 {
        bail!("{what}: smtp-source to {target} completed no message: {:?} {:?}\n{}", r.fatal, r.warnings.first(), tail(&r.stderr, 10));
    }
    let t0 = Instant::now();
    wait_delivered(sinks, before + r.completed, what)?;
    drained()?;
    let run = Run { completed: r.completed, elapsed: r.elapsed, failures: r.failures(), delivered_after: t0.elapsed() };
    eprintln!(
        "  {what}: {} of {messages} accepted in {:.2} s = {:.0} msgs/s ({} failures), delivered {:.2} s later",
        run.completed,
        run.elapsed.as_secs_f64(),
        run.rate(),
        run.failures,
        run.delivered_after.as_secs_f64()
    );
    Ok(run)
}

/// The p99 accept latency from one mxlb-bench run (and its report).
fn latency(lab: &Lab, sinks: &DumpSinks, target: SocketAddr, drained: &dyn Fn() -> Result<()>) -> Result<(Option<f64>, Value)> {
    let before = sink_messages(sinks);
    let target_s = target.to_string();
    let (n, c, s) = (LATENCY_MESSAGES.to_string(), CONCURRENCY.to_string(), MSG_SIZE.to_string());
    let v = loadgen::mxlb_bench(lab, &["smtp", &target_s, "-c", &c, "-n", &n, "-s", &s, "--from", FROM, "--to", TO, "-t", "30", "-q"])?;
    let p99 = v["latency_ms"]["data_ack"]["p99"].as_f64();
    let messages = v["messages"].as_u64().unwrap_or(0);
    wait_delivered(sinks, before + messages, "latency run")?;
    drained()?;
    let keep = json!({
        "messages": v["messages"],
        "sessions_failed": v["sessions_failed"],
        "messages_per_s": v["messages_per_s"],
        "data_ack_ms": v["latency_ms"]["data_ack"],
        "session_ms": v["latency_ms"]["session"],
    });
    Ok((p99, keep))
}

/// The 1-minute load average (`/proc/loadavg`).
fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

fn tail(s: &str, n: usize) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

/// Warm-up, repeats and the latency run against one relay.
fn measure_row(lab: &Lab, sinks: &DumpSinks, target: SocketAddr, p: &Params, what: &str, drained: &dyn Fn() -> Result<()>) -> Result<Row> {
    let mut row = Row::default();
    measure_run(lab, sinks, target, WARMUP, &format!("{what} warm-up"), drained)?;
    for i in 1..=p.repeats {
        row.runs.push(measure_run(lab, sinks, target, p.messages, &format!("{what} run {i}/{}", p.repeats), drained)?);
    }
    let (p99, report) = latency(lab, sinks, target, drained)?;
    eprintln!("  {what}: p99 accept latency {p99:?} ms (mxlb-bench, {LATENCY_MESSAGES} messages)");
    row.p99_ms = p99;
    row.latency = report;
    Ok(row)
}

/// xorshift64* seeded from the clock: pseudo-random kill instants, different each run.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        Rng(t ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }
    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One crash trial ([`lab::relay::kill_trial`]) on a fresh pair and fresh sinks; `rate`
/// (msgs/s) places the kill between a quarter and three quarters into the run.
fn kill_trial(lab: &Lab, p: &Params, rate: f64, rng: &mut Rng, k: usize) -> Result<Trial> {
    let sinks = DumpSinks::start(lab)?;
    let mut pair = RelayPair::start(lab, RelayOpts::default()).context("starting the relay pair")?;
    let expected = Duration::from_secs_f64(f64::from(p.kill_messages) / rate.max(1.0));
    let kill_at = expected.mul_f64(0.25 + 0.5 * rng.next_f64());
    // Strict mirroring: LB 1 comes back 2 s after the crash so the load can go on.
    let t = lab::relay::kill_trial(lab, &mut pair, &sinks, p.kill_messages, kill_at, Some(Duration::from_secs(2)))?;
    let trial = Trial {
        kill_at: t.killed_after,
        acknowledged: t.outcome.acknowledged,
        arrived: t.outcome.arrived,
        lost: t.outcome.lost.clone(),
        duplicates: t.outcome.duplicates,
        lb2_master_after: t.lb2_master_after,
        arrival_wait: t.arrival_wait,
        completed: t.completed,
        runs: t.runs.len(),
    };
    eprintln!(
        "  kill trial {k}: SIGKILL at {:.2} s; {} acknowledged ({} completed in {} run(s)), {} arrived, {} lost, {} duplicates; LB 2 master after {:?}",
        trial.kill_at.as_secs_f64(),
        trial.acknowledged,
        trial.completed,
        trial.runs,
        trial.arrived,
        trial.lost.len(),
        trial.duplicates,
        trial.lb2_master_after
    );
    if trial.acknowledged == 0 {
        let log = t.runs.first().map(|r| tail(&r.stderr, 10)).unwrap_or_default();
        bail!("kill trial {k}: no `250 ... queued as ID` reply in smtp-source's log (mxlb's relay did not accept anything?):\n{log}");
    }
    drop(pair);
    drop(sinks);
    Ok(trial)
}

pub fn run() -> Result<()> {
    let p = params()?;
    if !lab::is_root() {
        bail!("the relay benchmark needs root (network namespaces): run as root");
    }
    require_postfix()?;
    let machine = machine();
    let load_start = loadavg();
    println!(
        "== relay: {BACKENDS} back-ends (smtp-sink, dumping), {} messages of {MSG_SIZE} B per run, {CONCURRENCY} sessions, {} runs per row",
        p.messages, p.repeats
    );
    let lab = relay_lab(BACKENDS)?;
    let sinks = DumpSinks::start(&lab)?;

    // (b) Postfix on LB 1, relaying to back-end 1.
    println!("== Postfix relay on LB 1 ({}), relayhost back-end 1", lab.lb().v4());
    let b1 = SocketAddr::new(lab.backend(1).addr(AddrFamily::V4), 25);
    let postfix = (|| -> Result<Row> {
        let pf = PostfixRelay::start(lab.lb().ns(), "relay", lab.lb().addr(AddrFamily::V4), b1)?;
        let drained = || pf.wait_empty(DELIVERY_LIMIT).map(|_| ());
        let row = measure_row(&lab, &sinks, pf.listen(), &p, "postfix", &drained)?;
        let problems = pf.log_problems();
        if !problems.is_empty() {
            eprintln!("  Postfix logged {} warning(s)/error(s), first: {}", problems.len(), problems[0]);
        }
        Ok(row)
    })();

    // (a) mxlb's relay pair, LB 1 master, strict mirroring.
    println!("== mxlb relay: LB 1 master, LB 2 mirror (strict), VIP {}", lab.vip(AddrFamily::V4));
    let mxlb = (|| -> Result<Row> {
        let pair = RelayPair::start(&lab, RelayOpts::default()).context("starting mxlb's relay pair")?;
        let vip = pair.vip();
        measure_row(&lab, &sinks, vip, &p, "mxlb", &|| Ok(()))
    })();
    drop(sinks);

    // Kill trials, only when mxlb's relay could be measured (it sets the kill instants).
    let mut trials = Vec::new();
    let mut trial_error = None;
    if let Ok(row) = &mxlb {
        let rate = row.rate().unwrap_or(100.0);
        let mut rng = Rng::new();
        println!("== kill trials: {} × {} messages, SIGKILL of LB 1's mxlb during the run", p.trials, p.kill_messages);
        for k in 1..=p.trials {
            match kill_trial(&lab, &p, rate, &mut rng, k) {
                Ok(t) => trials.push(t),
                Err(e) => {
                    eprintln!("  kill trial {k} failed: {e:#}");
                    trial_error = Some(format!("kill trial {k}: {e:#}"));
                    break;
                }
            }
        }
    }

    let pf_rate = postfix.as_ref().ok().and_then(Row::rate);
    let mx_rate = mxlb.as_ref().ok().and_then(Row::rate);
    let lost: usize = trials.iter().map(|t| t.lost.len()).sum();
    let duplicates: usize = trials.iter().map(|t| t.duplicates).sum();
    let have_trials = !trials.is_empty();
    let err_text = |r: &Result<Row>| r.as_ref().err().map(|e| format!("{e:#}"));
    let json = json!({
        "benchmark": "relay",
        "mxlb_msgs_per_s": mx_rate.map(|r| round(r, 1)),
        "postfix_msgs_per_s": pf_rate.map(|r| round(r, 1)),
        "ratio": mx_rate.zip(pf_rate).map(|(m, p)| round(m / p, 3)),
        "mxlb_p99_accept_ms": mxlb.as_ref().ok().and_then(|r| r.p99_ms).map(|v| round(v, 2)),
        "postfix_p99_accept_ms": postfix.as_ref().ok().and_then(|r| r.p99_ms).map(|v| round(v, 2)),
        "kill_trials": trials.len(),
        "lost": have_trials.then_some(lost),
        "duplicates": have_trials.then_some(duplicates),
        "messages": p.messages,
        "repeats": p.repeats,
        "kill_trial_messages": p.kill_messages,
        "concurrency": CONCURRENCY,
        "msg_size": MSG_SIZE,
        "backends": BACKENDS,
        "postfix": postfix.as_ref().map_or_else(|e| json!({ "error": format!("{e:#}") }), Row::json),
        "mxlb": mxlb.as_ref().map_or_else(|e| json!({ "error": format!("{e:#}") }), Row::json),
        "trials": trials.iter().map(Trial::json).collect::<Vec<_>>(),
        "trial_error": trial_error,
        "machine": machine,
        // Other work on the machine disturbs the figures: the 1-minute load around the run.
        "load_average_1m": [load_start, loadavg()],
        "date": today(),
    });
    super::write_bench("relay", &json)?;

    let f = |v: Option<f64>, d: usize| v.map_or_else(|| "-".to_string(), |x| format!("{x:.d$}"));
    println!("\n{:<34} {:>16} {:>16}", "relay (4 KiB, 20 sessions)", "accepted msgs/s", "p99 accept (ms)");
    println!("{:<34} {:>16} {:>16}", "Postfix 3.7 (relayhost b1)", f(pf_rate, 0), f(postfix.as_ref().ok().and_then(|r| r.p99_ms), 2));
    println!("{:<34} {:>16} {:>16}", "mxlb, strict mirroring", f(mx_rate, 0), f(mxlb.as_ref().ok().and_then(|r| r.p99_ms), 2));
    println!("mxlb / Postfix: {}", f(mx_rate.zip(pf_rate).map(|(m, p)| m / p), 2));
    if have_trials {
        println!("kill trials: {}, lost {lost}, duplicates {duplicates}", trials.len());
    }

    let mut problems = Vec::new();
    if let Some(e) = err_text(&postfix) {
        problems.push(format!("the Postfix row could not be measured: {e}"));
    }
    if let Some(e) = err_text(&mxlb) {
        problems.push(format!("mxlb's relay could not be measured: {e}"));
    }
    if let Some(e) = trial_error {
        problems.push(e);
    }
    if lost > 0 {
        let ids: Vec<&String> = trials.iter().flat_map(|t| &t.lost).take(10).collect();
        problems.push(format!("{lost} acknowledged message(s) LOST in the kill trials (must be 0), e.g. {ids:?}"));
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_instants_are_spread_within_the_unit_interval() {
        let mut rng = Rng::new();
        let v: Vec<f64> = (0..1000).map(|_| rng.next_f64()).collect();
        assert!(v.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(v.iter().any(|&x| x < 0.2) && v.iter().any(|&x| x > 0.8), "{v:?}");
    }

    #[test]
    fn a_row_reports_the_median_of_its_runs() {
        let run = |completed, ms| Run { completed, elapsed: Duration::from_millis(ms), failures: 0, delivered_after: Duration::ZERO };
        let row = Row { runs: vec![run(5000, 10_000), run(5000, 5_000), run(5000, 20_000)], ..Default::default() };
        assert_eq!(row.rate(), Some(500.0));
        assert_eq!(Row::default().rate(), None);
        assert_eq!(row.json()["runs"][1]["msgs_per_s"], 1000.0);
    }
}
