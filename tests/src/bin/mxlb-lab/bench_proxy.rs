//! `cargo xtask bench proxy`: what mxlb's POP3/IMAP proxy costs a mail session, next to no
//! proxy at all and next to perdition, in one lab and one run.
//!
//! Lab ([`ProxyLab`]): the client, the LB node running `mxlb run` with `[proxy]` on the VIP
//! (ports 110/143, PROXY v2 to the back-ends' `haproxy = yes` listeners), three Dovecot
//! back-ends, one mailbox owner each ([`USERS`]: alice on back-end 1, bob on 2, carol on 3).
//! Each owner's INBOX holds [`MESSAGES`] messages of [`MESSAGE_BYTES`] bytes. Every back-end
//! also knows the other two users (with empty mailboxes), as in a cluster with shared
//! authentication and partitioned mail: a session sent to the wrong back-end then logs in
//! there (a `Login: user=<u>` line on a back-end that does not own u, counted as *misrouted*)
//! and fails on the empty mailbox, instead of hiding as an authentication error.
//!
//! Rows, measured back to back in this order, the sequence repeated [`REPEATS`] times (figures
//! are medians of the repeats):
//! - `direct`: the client straight to each user's owner on its normal ports 110/143;
//! - `mxlb_sockmap`: through `mxlb run`'s proxy on the IPv4 VIP, `relaying = "sockmap"`
//!   (after login the kernel splices the two sockets);
//! - `mxlb_copy`: the same node restarted with `relaying = "copy"` (userspace copy loop);
//! - `perdition`: Debian's perdition 2.2 in the LB's namespace on the LB's own address, ports
//!   110/143, popmap `^user$: owner:110|143` (regex library), plain text both sides, to the
//!   back-ends' normal ports.
//!
//! Only the row's proxy runs during its row (`mxlb run` is stopped for `direct` and
//! `perdition`, perdition runs only for its row).
//!
//! Load: `mxlb-bench` in the client namespace, closed loop, [`CONCURRENCY`] sessions at all
//! times, for POP3 then IMAP: each session logs in (USER/PASS; LOGIN), retrieves messages
//! 1..[`MESSAGES`] (POP3 RETR each; IMAP one `FETCH 1:N (BODY.PEEK[])`, so no flag changes and
//! every session sees the same mailbox), checks each is [`MESSAGE_BYTES`] bytes, and logs out.
//! Sessions take the three users in turn (`--account` ×3), so all three back-ends carry the
//! load in every row. For `direct`, one mxlb-bench process does the same rotation with each user
//! sent to its owner (`--user-target`), rather than three processes of a third of the
//! concurrency each: then every row has the same generator, the same concurrency per user and
//! one latency histogram (p99s of separate processes cannot be merged). Each run has
//! [`WARMUP_S`] s of unmeasured sessions, then [`SECONDS`] s measured.
//!
//! Per row and repeat: sessions/s and p99 of the whole session (connect to close) per
//! protocol; the row's combined figure is all sessions over both runs' time, and the worse of
//! the two protocols' p99 (an upper bound of the combined p99, which two histograms cannot
//! give). Misrouted: after each run, each back-end's `Login:` lines for users it does not own
//! (must be 0; the JSON is written anyway and a FAIL line printed).
//!
//! Output: the table, target/bench/proxy.json and the `proxy` section of bench/RESULTS.md.
//! Options (after `bench proxy`), for diagnosis: `--repeats N`, `--seconds S`,
//! `--concurrency N`, `--fetch N` (messages per session, at most [`MESSAGES`]), `--rows
//! direct,perdition,...` (a subset; direct is always measured, as the baseline). A run with
//! any of them changed writes target/bench/proxy-check.json instead and leaves RESULTS.md
//! alone: only the default settings are the reported figures.
use std::{collections::BTreeMap, net::SocketAddr};

use anyhow::{Context as _, Result, bail, ensure};
use lab::{
    AddrFamily, Lab, loadgen,
    perdition::{Perdition, require_perdition},
    proxy::{ProxyLab, USERS},
};
use serde_json::{Value, json};

use super::{machine, median, today};

const REPEATS: usize = 3;
/// 4 sessions per user at a time: under Dovecot's `mail_max_userip_connections` (10 per user
/// and client address), which every row shares.
const CONCURRENCY: u32 = 12;
const MESSAGES: u32 = 20;
const MESSAGE_BYTES: usize = 8192;
/// Measured seconds per run; 4 rows × 2 protocols × 3 repeats keep the bench near 3 minutes.
const SECONDS: f64 = 4.0;
/// Unmeasured seconds at the start of each run (connections, process pools, caches).
const WARMUP_S: f64 = 0.5;
/// The target: mxlb with sockmap relaying at most 10% below direct, and ahead of
/// perdition (shown, not asserted).
const TARGET_SOCKMAP_LOSS: f64 = 0.10;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Row {
    Direct,
    MxlbSockmap,
    MxlbCopy,
    Perdition,
}

impl Row {
    const ALL: [Row; 4] = [Row::Direct, Row::MxlbSockmap, Row::MxlbCopy, Row::Perdition];

    fn key(self) -> &'static str {
        match self {
            Row::Direct => "direct",
            Row::MxlbSockmap => "mxlb_sockmap",
            Row::MxlbCopy => "mxlb_copy",
            Row::Perdition => "perdition",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Row::Direct => "direct to the owner (baseline)",
            Row::MxlbSockmap => "mxlb proxy, sockmap relaying",
            Row::MxlbCopy => "mxlb proxy, userspace copy",
            Row::Perdition => "perdition 2.2",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proto {
    Pop3,
    Imap,
}

impl Proto {
    const ALL: [Proto; 2] = [Proto::Pop3, Proto::Imap];

    fn key(self) -> &'static str {
        match self {
            Proto::Pop3 => "pop3",
            Proto::Imap => "imap",
        }
    }

    fn port(self) -> u16 {
        match self {
            Proto::Pop3 => 110,
            Proto::Imap => 143,
        }
    }
}

/// One mxlb-bench run.
#[derive(Clone, Debug)]
struct Run {
    sessions_ok: u64,
    failed: u64,
    elapsed_s: f64,
    sessions_per_s: f64,
    p99_ms: f64,
    bytes: u64,
    messages: u64,
    misrouted: usize,
    errors: Value,
}

impl Run {
    fn json(&self) -> Value {
        json!({
            "sessions_per_s": round(self.sessions_per_s, 1),
            "p99_ms": round(self.p99_ms, 2),
            "sessions_ok": self.sessions_ok,
            "sessions_failed": self.failed,
            "elapsed_s": round(self.elapsed_s, 3),
            "messages": self.messages,
            "bytes_retrieved": self.bytes,
            "misrouted": self.misrouted,
            "errors": self.errors,
        })
    }
}

/// A row's runs: `runs[repeat][proto]`.
#[derive(Default, Debug)]
struct RowRuns {
    runs: Vec<[Option<Run>; 2]>,
}

/// Figures of a row over its repeats.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Figures {
    sessions_per_s: f64,
    p99_ms: f64,
}

/// Combines one repeat's POP3 and IMAP runs: all sessions over both runs' time, and the worse
/// p99 (pure).
fn combine(a: &Run, b: &Run) -> Figures {
    let t = a.elapsed_s + b.elapsed_s;
    Figures {
        sessions_per_s: if t > 0.0 { (a.sessions_ok + b.sessions_ok) as f64 / t } else { 0.0 },
        p99_ms: a.p99_ms.max(b.p99_ms),
    }
}

impl RowRuns {
    fn complete(&self) -> impl Iterator<Item = (&Run, &Run)> {
        self.runs.iter().filter_map(|r| Some((r[0].as_ref()?, r[1].as_ref()?)))
    }

    /// Medians of the combined figures of the complete repeats.
    fn combined(&self) -> Option<Figures> {
        let c: Vec<Figures> = self.complete().map(|(a, b)| combine(a, b)).collect();
        (!c.is_empty()).then(|| Figures {
            sessions_per_s: median(c.iter().map(|f| f.sessions_per_s).collect()),
            p99_ms: median(c.iter().map(|f| f.p99_ms).collect()),
        })
    }

    /// Medians of one protocol's runs.
    fn proto(&self, i: usize) -> Option<Figures> {
        let r: Vec<&Run> = self.runs.iter().filter_map(|r| r[i].as_ref()).collect();
        (!r.is_empty()).then(|| Figures {
            sessions_per_s: median(r.iter().map(|r| r.sessions_per_s).collect()),
            p99_ms: median(r.iter().map(|r| r.p99_ms).collect()),
        })
    }

    fn misrouted(&self) -> usize {
        self.runs.iter().flatten().flatten().map(|r| r.misrouted).sum()
    }

    fn failed(&self) -> u64 {
        self.runs.iter().flatten().flatten().map(|r| r.failed).sum()
    }
}

#[derive(Clone, Copy)]
struct Params {
    repeats: usize,
    seconds: f64,
    concurrency: u32,
    fetch: u32,
    /// Which rows run (index as in [`Row::ALL`]).
    rows: [bool; 4],
}

impl Params {
    fn is_default(&self) -> bool {
        self.repeats == REPEATS && self.seconds == SECONDS && self.concurrency == CONCURRENCY && self.fetch == MESSAGES && self.rows == [true; 4]
    }
}

fn params() -> Result<Params> {
    let mut p = Params { repeats: REPEATS, seconds: SECONDS, concurrency: CONCURRENCY, fetch: MESSAGES, rows: [true; 4] };
    // mxlb-lab bench proxy [options]
    let args: Vec<String> = std::env::args().skip(3).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--repeats" => p.repeats = val()?.parse::<usize>().context("--repeats N")?.clamp(1, 20),
            "--seconds" => p.seconds = val()?.parse::<f64>().context("--seconds S")?.clamp(0.5, 60.0),
            "--concurrency" => p.concurrency = val()?.parse::<u32>().context("--concurrency N")?.clamp(1, 27),
            "--fetch" => p.fetch = val()?.parse::<u32>().context("--fetch N")?.clamp(1, MESSAGES),
            "--rows" => {
                p.rows = [true, false, false, false];
                for name in val()?.split(',') {
                    let i = Row::ALL.iter().position(|r| r.key() == name).with_context(|| format!("--rows: no row {name}"))?;
                    p.rows[i] = true;
                }
            }
            other => bail!("bench proxy: unknown option {other} (--repeats N, --seconds S, --concurrency N, --fetch N, --rows A,B)"),
        }
    }
    Ok(p)
}

fn round(v: f64, digits: i32) -> f64 {
    let k = 10f64.powi(digits);
    (v * k).round() / k
}

/// Logins per back-end (index 0 = back-end 1) and user, from the Dovecot logs.
fn logins(p: &ProxyLab) -> Vec<BTreeMap<String, usize>> {
    p.dovecots.iter().map(|d| d.logins_by_user()).collect()
}

/// Logins between `before` and `after` on back-ends that do not own the user (pure).
fn misrouted(before: &[BTreeMap<String, usize>], after: &[BTreeMap<String, usize>], owners: &[(&str, usize)]) -> usize {
    let mut n = 0;
    for (i, (b, a)) in before.iter().zip(after).enumerate() {
        for (user, count) in a {
            let owned_here = owners.iter().any(|(u, owner)| u == user && *owner == i + 1);
            if !owned_here {
                n += count.saturating_sub(b.get(user).copied().unwrap_or(0));
            }
        }
    }
    n
}

/// One mxlb-bench run of `proto` to `target` (or, with `direct`, each user to its owner).
fn measure(lab: &Lab, p: &ProxyLab, proto: Proto, target: SocketAddr, direct: bool, prm: &Params) -> Result<Run> {
    let mut args: Vec<String> = vec![
        proto.key().into(),
        target.to_string(),
        "-c".into(),
        prm.concurrency.to_string(),
        "-d".into(),
        prm.seconds.to_string(),
        "-w".into(),
        WARMUP_S.to_string(),
        "-t".into(),
        "10".into(),
        "--fetch".into(),
        prm.fetch.to_string(),
        "--expect-size".into(),
        MESSAGE_BYTES.to_string(),
        "-q".into(),
    ];
    for &(user, pw, owner) in &USERS {
        args.push("--account".into());
        args.push(format!("{user}:{pw}"));
        if direct {
            args.push("--user-target".into());
            args.push(format!("{user}={}", SocketAddr::new(lab.backend(owner).addr(AddrFamily::V4), proto.port())));
        }
    }
    let before = logins(p);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let v = loadgen::mxlb_bench(lab, &argv)?;
    let after = logins(p);
    let owners: Vec<(&str, usize)> = USERS.iter().map(|&(u, _, i)| (u, i)).collect();
    let num = |k: &str| v[k].as_u64().unwrap_or(0);
    let run = Run {
        sessions_ok: num("sessions_ok"),
        failed: num("sessions_failed"),
        elapsed_s: v["elapsed_s"].as_f64().unwrap_or(0.0),
        sessions_per_s: loadgen::rate(&v, "sessions_per_s")?,
        p99_ms: v["latency_ms"]["session"]["p99"].as_f64().unwrap_or(f64::NAN),
        bytes: num("bytes_retrieved"),
        messages: num("messages"),
        misrouted: misrouted(&before, &after, &owners),
        errors: json!({ "by_kind": v["errors"], "samples": v["error_samples"] }),
    };
    ensure!(run.sessions_ok > 0, "{} to {target}: no session succeeded: {}", proto.key(), v["error_samples"]);
    // Every owner must have served: the rotation reaches all three back-ends.
    let owner_logins: Vec<usize> = USERS
        .iter()
        .map(|&(u, _, i)| after[i - 1].get(u).copied().unwrap_or(0) - before[i - 1].get(u).copied().unwrap_or(0))
        .collect();
    if owner_logins.contains(&0) {
        eprintln!("   WARNING: a back-end served no session of its owner: {owner_logins:?}");
    }
    println!(
        "   {:<4}: {:>6.1} sessions/s, p99 {:>7.2} ms, {} ok, {} failed, {} messages / {} bytes, owner logins per back-end {owner_logins:?}, misrouted {}",
        proto.key(),
        run.sessions_per_s,
        run.p99_ms,
        run.sessions_ok,
        run.failed,
        run.messages,
        run.bytes,
        run.misrouted
    );
    if run.failed > 0 {
        println!("   WARNING: {} failed sessions: {}", run.failed, v["error_samples"]);
    }
    Ok(run)
}

pub fn run() -> Result<()> {
    if !lab::is_root() {
        bail!("bench proxy needs root (network namespaces, BPF)");
    }
    let prm = params()?;
    loadgen::bench_bin()?;
    require_perdition()?;
    let machine = machine();
    println!(
        "== bench proxy on {machine}: {} repeats of {} rows x POP3 and IMAP; sessions of {} messages x {MESSAGE_BYTES} B, \
         concurrency {}, {WARMUP_S} s warm-up + {} s per run",
        prm.repeats,
        prm.rows.iter().filter(|r| **r).count(),
        prm.fetch,
        prm.concurrency,
        prm.seconds
    );
    let lab = ProxyLab::lab()?;
    // Tens of thousands of connections from one client address to a few server addresses,
    // and from the LB to the back-ends, within TIME_WAIT (as `bench l4`).
    for ns in [lab.client().ns(), lab.lb().ns()] {
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        ns.sysctl("net.ipv4.tcp_max_tw_buckets", "4096")?;
    }
    let mut p = ProxyLab::start(&lab, "relaying = \"sockmap\"")?;
    for &(user, _, i) in &USERS {
        let d = &p.dovecots[i - 1];
        d.seed_mailbox(user, MESSAGES as usize, MESSAGE_BYTES)?;
        // The other users exist here too, with empty mailboxes (see the module doc).
        for &(other, pw, j) in &USERS {
            if j != i {
                d.add_user(other, pw)?;
            }
        }
    }
    println!("   lab {} up: mxlb proxy on {}, 3 Dovecots seeded", lab.prefix(), lab.vip(AddrFamily::V4));

    let perdition_map = |proto: Proto| -> Vec<(&str, SocketAddr)> {
        USERS.iter().map(|&(u, _, i)| (u, SocketAddr::new(lab.backend(i).addr(AddrFamily::V4), proto.port()))).collect()
    };
    let (pop3_map, imap_map) = (perdition_map(Proto::Pop3), perdition_map(Proto::Imap));

    let mut rows: Vec<RowRuns> = Row::ALL.iter().map(|_| RowRuns::default()).collect();
    let mut failure: Option<String> = None;
    // The first logins build each mailbox's index: one unmeasured direct run first.
    {
        let quick = Params { seconds: 1.0, ..prm };
        for proto in Proto::ALL {
            let target = SocketAddr::new(lab.backend(1).addr(AddrFamily::V4), proto.port());
            measure(&lab, &p, proto, target, true, &quick).with_context(|| format!("warm-up {}", proto.key()))?;
        }
    }
    'repeats: for rep in 1..=prm.repeats {
        for (ri, row) in Row::ALL.into_iter().enumerate() {
            if !prm.rows[ri] {
                continue;
            }
            println!("== repeat {rep}/{}: {}", prm.repeats, row.label());
            let mut perdition = None;
            let setup = match row {
                Row::Direct | Row::Perdition => p.stop_node(),
                Row::MxlbSockmap => p.relaunch("sockmap"),
                Row::MxlbCopy => p.relaunch("copy"),
            };
            let started = setup.and_then(|()| {
                if row == Row::Perdition {
                    perdition = Some(Perdition::start(lab.lb().ns(), lab.lb().v4().into(), &pop3_map, &imap_map)?);
                }
                Ok(())
            });
            if let Err(e) = started {
                failure = Some(format!("starting the {} row: {e:#}", row.key()));
                break 'repeats;
            }
            let mut this = [None, None];
            for (pi, proto) in Proto::ALL.into_iter().enumerate() {
                let target = match row {
                    Row::Direct => SocketAddr::new(lab.backend(1).addr(AddrFamily::V4), proto.port()),
                    Row::MxlbSockmap | Row::MxlbCopy => p.vip(AddrFamily::V4, proto.port()),
                    Row::Perdition => {
                        let pd = perdition.as_ref().context("perdition")?;
                        if proto == Proto::Pop3 { pd.pop3 } else { pd.imap }
                    }
                };
                match measure(&lab, &p, proto, target, row == Row::Direct, &prm) {
                    Ok(r) => this[pi] = Some(r),
                    Err(e) => {
                        let logs = match &perdition {
                            Some(pd) => pd.log(),
                            None => p.node.log().lines().rev().take(20).collect::<Vec<_>>().join("\n"),
                        };
                        failure = Some(format!("measuring {} {}: {e:#}\n{logs}", row.key(), proto.key()));
                        rows[ri].runs.push(this);
                        break 'repeats;
                    }
                }
            }
            rows[ri].runs.push(this);
            drop(perdition);
        }
    }
    let _ = p.stop_node();
    drop(p);
    drop(lab);

    print_table(&rows, &prm);
    let out = to_json(&rows, &prm, &machine, failure.as_deref());
    if prm.is_default() {
        super::write_bench("proxy", &out)?;
        super::update_section("bench/RESULTS.md", "proxy", &markdown(&rows, &prm, &machine, failure.as_deref()))?;
    } else {
        println!("(settings other than the defaults: a check, not the reported figures; RESULTS.md unchanged)");
        super::write_bench("proxy-check", &out)?;
    }
    let misrouted_total: usize = rows.iter().map(RowRuns::misrouted).sum();
    if misrouted_total > 0 {
        println!("FAIL: {misrouted_total} session(s) reached a back-end other than the mailbox owner");
    }
    if let Some(f) = failure {
        bail!("bench proxy incomplete: {f}");
    }
    if misrouted_total > 0 {
        bail!("misrouted sessions: {misrouted_total}");
    }
    Ok(())
}

/// Sockmap's verdicts: (within 10% of direct, ahead of perdition), when measured.
fn verdicts(rows: &[RowRuns]) -> (Option<bool>, Option<bool>) {
    let f = |r: Row| rows[r as usize].combined();
    let (d, s, pd) = (f(Row::Direct), f(Row::MxlbSockmap), f(Row::Perdition));
    let within = d.zip(s).map(|(d, s)| s.sessions_per_s >= d.sessions_per_s * (1.0 - TARGET_SOCKMAP_LOSS));
    let ahead = pd.zip(s).map(|(pd, s)| s.sessions_per_s > pd.sessions_per_s);
    (within, ahead)
}

fn vs(x: Option<Figures>, base: Option<Figures>) -> String {
    match (x, base) {
        (Some(x), Some(b)) if b.sessions_per_s > 0.0 => format!("{:+.1}%", (x.sessions_per_s / b.sessions_per_s - 1.0) * 100.0),
        _ => "—".into(),
    }
}

fn fig(f: Option<Figures>) -> (String, String) {
    f.map_or(("—".into(), "—".into()), |f| (format!("{:.0}", f.sessions_per_s), format!("{:.1}", f.p99_ms)))
}

fn verdict_text(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not measured",
    }
}

fn print_table(rows: &[RowRuns], prm: &Params) {
    let direct = &rows[0];
    println!(
        "\nPOP3/IMAP proxy, medians of {} repeats (sessions of {} x {MESSAGE_BYTES} B, concurrency {}, {} s per run)",
        prm.repeats, prm.fetch, prm.concurrency, prm.seconds
    );
    println!(
        "{:<32} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>9} {:>6}",
        "row", "POP3 s/s", "vs dir", "p99 ms", "IMAP s/s", "vs dir", "p99 ms", "all s/s", "vs dir", "p99 ms", "misrouted", "failed"
    );
    for (row, r) in Row::ALL.into_iter().zip(rows) {
        let cells: Vec<String> = [(r.proto(0), direct.proto(0)), (r.proto(1), direct.proto(1)), (r.combined(), direct.combined())]
            .into_iter()
            .map(|(x, b)| {
                let (s, p99) = fig(x);
                format!("{s:>8} {:>8} {p99:>8}", if row == Row::Direct { "—".into() } else { vs(x, b) })
            })
            .collect();
        println!("{:<32} | {} | {:>9} {:>6}", row.label(), cells.join(" | "), r.misrouted(), r.failed());
    }
    let (within, ahead) = verdicts(rows);
    println!(
        "target (shown, not asserted): mxlb sockmap within {:.0}% of direct: {}; ahead of perdition: {}",
        TARGET_SOCKMAP_LOSS * 100.0,
        verdict_text(within),
        verdict_text(ahead)
    );
}

fn to_json(rows: &[RowRuns], prm: &Params, machine: &str, failure: Option<&str>) -> Value {
    let direct = rows[0].combined();
    let mut out = serde_json::Map::new();
    for (row, r) in Row::ALL.into_iter().zip(rows) {
        let c = r.combined();
        let mut v = json!({
            "sessions_per_s": c.map(|f| round(f.sessions_per_s, 1)),
            "p99_ms": c.map(|f| round(f.p99_ms, 2)),
            "misrouted": r.misrouted(),
            "sessions_failed": r.failed(),
        });
        for (i, proto) in Proto::ALL.into_iter().enumerate() {
            let f = r.proto(i);
            v[proto.key()] = json!({
                "sessions_per_s": f.map(|f| round(f.sessions_per_s, 1)),
                "p99_ms": f.map(|f| round(f.p99_ms, 2)),
                "repeats": r.runs.iter().map(|x| x[i].as_ref().map(Run::json)).collect::<Vec<_>>(),
            });
        }
        if row != Row::Direct
            && let (Some(c), Some(d)) = (c, direct)
        {
            v["sessions_vs_direct_pct"] = round((c.sessions_per_s / d.sessions_per_s - 1.0) * 100.0, 2).into();
        }
        out.insert(row.key().into(), v);
    }
    let (within, ahead) = verdicts(rows);
    out.insert("misrouted".into(), rows.iter().map(RowRuns::misrouted).sum::<usize>().into());
    out.insert("machine".into(), machine.into());
    out.insert("date".into(), today().into());
    out.insert("concurrency".into(), prm.concurrency.into());
    out.insert("messages".into(), prm.fetch.into());
    out.insert("message_bytes".into(), MESSAGE_BYTES.into());
    out.insert(
        "targets".into(),
        json!({
            "mxlb_sockmap_vs_direct_pct": -TARGET_SOCKMAP_LOSS * 100.0,
            "mxlb_sockmap_within_target": within,
            "mxlb_sockmap_ahead_of_perdition": ahead,
        }),
    );
    out.insert(
        "settings".into(),
        json!({
            "repeats": prm.repeats, "seconds_per_run": prm.seconds, "warmup_s": WARMUP_S,
            "users": USERS.iter().map(|(u, _, i)| json!({"user": u, "owner": format!("b{i}")})).collect::<Vec<_>>(),
        }),
    );
    out.insert(
        "method".into(),
        "rows direct, mxlb_sockmap, mxlb_copy, perdition measured back to back, the sequence repeated; per row POP3 then \
         IMAP runs of mxlb-bench (closed loop, sessions rotating over the three users: login, retrieve every message, \
         logout); a row's sessions_per_s = its sessions over both runs' time, p99_ms = the worse protocol's p99; medians \
         of the repeats; misrouted = Login lines on back-ends that do not own the user (tests/src/bin/mxlb-lab/bench_proxy.rs)"
            .into(),
    );
    if let Some(f) = failure {
        out.insert("incomplete".into(), f.into());
    }
    Value::Object(out)
}

fn markdown(rows: &[RowRuns], prm: &Params, machine: &str, failure: Option<&str>) -> String {
    let direct = &rows[0];
    let mut s = format!(
        "Latest `cargo xtask bench proxy`: {machine}, {}. Medians of {} repeats; per row a POP3 and an IMAP run of {} s \
         (after {WARMUP_S} s unmeasured), {} concurrent sessions rotating over alice, bob and carol (one owner back-end \
         each), each session retrieving {} messages of {MESSAGE_BYTES} bytes.\n\n\
         | row | POP3 sessions/s | vs direct | POP3 p99, ms | IMAP sessions/s | vs direct | IMAP p99, ms | all sessions/s | vs direct | p99 (worse protocol), ms | misrouted | failed sessions |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        today(),
        prm.repeats,
        prm.seconds,
        prm.concurrency,
        prm.fetch
    );
    for (row, r) in Row::ALL.into_iter().zip(rows) {
        let cells: Vec<String> = [(r.proto(0), direct.proto(0)), (r.proto(1), direct.proto(1)), (r.combined(), direct.combined())]
            .into_iter()
            .map(|(x, b)| {
                let (sps, p99) = fig(x);
                format!("{sps} | {} | {p99}", if row == Row::Direct { "—".into() } else { vs(x, b) })
            })
            .collect();
        s += &format!("| {} | {} | {} | {} |\n", row.label(), cells.join(" | "), r.misrouted(), r.failed());
    }
    let (within, ahead) = verdicts(rows);
    s += &format!(
        "\n- Targets (shown, not asserted): mxlb with sockmap relaying within {:.0}% of direct — {}; ahead of perdition — {}.\n",
        TARGET_SOCKMAP_LOSS * 100.0,
        verdict_text(within),
        verdict_text(ahead)
    );
    let mis: usize = rows.iter().map(RowRuns::misrouted).sum();
    s += &format!("- Misrouted sessions (a login on a back-end that does not own the mailbox): {mis}{}.\n", if mis == 0 { "" } else { " — FAIL" });
    if let Some(f) = failure {
        s += &format!("- The run did not complete: {}\n", f.lines().next().unwrap_or(f));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(ok: u64, elapsed: f64, p99: f64) -> Run {
        Run {
            sessions_ok: ok,
            failed: 0,
            elapsed_s: elapsed,
            sessions_per_s: ok as f64 / elapsed,
            p99_ms: p99,
            bytes: 0,
            messages: 0,
            misrouted: 0,
            errors: Value::Null,
        }
    }

    #[test]
    fn a_row_combines_both_protocols_then_takes_the_median_of_repeats() {
        // POP3 100/s for 4 s, IMAP 50/s for 4 s: 600 sessions in 8 s = 75/s; p99 the worse.
        assert_eq!(combine(&run(400, 4.0, 10.0), &run(200, 4.0, 30.0)), Figures { sessions_per_s: 75.0, p99_ms: 30.0 });
        let r = RowRuns {
            runs: vec![
                [Some(run(400, 4.0, 10.0)), Some(run(200, 4.0, 30.0))],
                [Some(run(800, 4.0, 5.0)), Some(run(800, 4.0, 5.0))],
                [Some(run(40, 4.0, 50.0)), Some(run(40, 4.0, 60.0))],
                // An incomplete repeat counts for its protocol only.
                [Some(run(4000, 4.0, 1.0)), None],
            ],
        };
        assert_eq!(r.combined(), Some(Figures { sessions_per_s: 75.0, p99_ms: 30.0 }));
        assert_eq!(r.proto(0).map(|f| f.sessions_per_s), Some(200.0));
        assert_eq!(r.proto(1).map(|f| f.p99_ms), Some(30.0));
        assert_eq!(RowRuns::default().combined(), None);
    }

    #[test]
    fn misrouted_counts_new_logins_of_users_a_backend_does_not_own() {
        let m = |pairs: &[(&str, usize)]| pairs.iter().map(|(u, n)| (u.to_string(), *n)).collect::<BTreeMap<_, _>>();
        let owners = [("alice", 1), ("bob", 2)];
        let before = vec![m(&[("alice", 10), ("bob", 1)]), m(&[("bob", 5)])];
        // Back-end 1: 5 more alice (fine), 2 more bob (misrouted); back-end 2: 1 new alice.
        let after = vec![m(&[("alice", 15), ("bob", 3)]), m(&[("bob", 9), ("alice", 1)])];
        assert_eq!(misrouted(&before, &after, &owners), 3);
        assert_eq!(misrouted(&after, &after, &owners), 0);
    }

    #[test]
    fn verdicts_compare_sockmap_with_direct_and_perdition() {
        let row = |rate: f64| RowRuns { runs: vec![[Some(run(rate as u64 * 4, 4.0, 1.0)), Some(run(rate as u64 * 4, 4.0, 1.0))]] };
        let rows = vec![row(100.0), row(91.0), row(80.0), row(95.0)];
        assert_eq!(verdicts(&rows), (Some(true), Some(false)));
        let rows = vec![row(100.0), row(89.0), row(80.0), row(50.0)];
        assert_eq!(verdicts(&rows), (Some(false), Some(true)));
        let rows = vec![row(100.0), RowRuns::default(), row(80.0), row(50.0)];
        assert_eq!(verdicts(&rows), (None, None));
    }
}
