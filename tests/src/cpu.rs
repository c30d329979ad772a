//! CPU time spent on the LB node during a measurement window, for "CPU per 1000 sessions".
//!
//! ## Method
//! [`CpuSample::take`] reads, at one instant:
//! - for each given process, `utime + stime` (fields 14 and 15 of `/proc/PID/stat`), which the
//!   kernel keeps for the whole thread group, so all threads of HAProxy or `mxlb run` are counted;
//! - the system-wide `softirq` column of the `cpu` line of `/proc/stat` (all CPUs), plus the
//!   whole `cpu` line's busy time (everything but idle and iowait) for context.
//!
//! [`CpuSample::delta`] turns two samples into a [`CpuUse`] (milliseconds over the wall time
//! between them), [`CpuUse::minus`] subtracts a baseline window and [`CpuUse::per_1000`] scales
//! to 1000 sessions.
//!
//! What each figure means:
//! - **mxlb**: the XDP program runs in the driver's receive path, in softirq (NAPI) context, so
//!   its data-path cost is **softirq time**, not time of the `mxlb run` process (which only
//!   loads the program, updates maps and runs health checks; its process time is the control
//!   plane).
//! - **HAProxy**: a full proxy; its cost is mostly **process time** (user space plus the
//!   syscalls on its two sockets per session), plus the softirq time of the TCP receive path
//!   of those sockets.
//! - **softirq** is system-wide: on this shared lab machine it also holds the client's and the
//!   back-ends' network stacks (all veths are on the same kernel) and anything else running. So
//!   measure a **baseline** window with the same traffic (same `smtp-source` options) sent
//!   directly from the client to a back-end, with no LB in the path, and subtract it:
//!   `LB softirq ≈ softirq(through LB) − softirq(direct)`. With direct server return the
//!   difference is close to mxlb's own cost; through HAProxy it also includes the second TCP
//!   connection's stack work on both ends (which is the price of a full proxy).
//!
//! ## Limits
//! - Resolution is one clock tick (`sysconf(_SC_CLK_TCK)`, 100 Hz: 10 ms), and with the
//!   default tick-based accounting (`CONFIG_TICK_CPU_ACCOUNTING`, no
//!   `CONFIG_IRQ_TIME_ACCOUNTING`, as on this kernel) times are *sampled* at each tick: run
//!   enough sessions that a window is worth hundreds of ticks, and repeat.
//! - Without `CONFIG_IRQ_TIME_ACCOUNTING`, a tick that lands in softirq served on the way out of
//!   a syscall (e.g. veth transmit processed inline) is charged both to the softirq column and
//!   to the interrupted task's `stime`: the two figures can overlap; report them side by side
//!   rather than add them.
//! - Softirq work done by `ksoftirqd` is counted as softirq; softirq time is not attributable to
//!   a namespace or a process, hence the baseline.
//! - A process that exits during the window is not counted (its pid is gone in the second
//!   sample), nor are its reaped children (`cutime`/`cstime` are not used): sample long-lived
//!   daemons only.

use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// `sysconf(_SC_CLK_TCK)`: the unit of `/proc` CPU times.
pub fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// The aggregate `cpu` line of `/proc/stat`, in ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTicks {
    /// `softirq` column (7th value).
    pub softirq: u64,
    /// Everything but `idle` and `iowait` (user, nice, system, irq, softirq, steal); guest time
    /// is already inside user/nice.
    pub busy: u64,
    /// All columns up to `steal` (busy + idle + iowait).
    pub total: u64,
}

/// Parses the `cpu ` line of `/proc/stat` text (pure).
pub fn parse_proc_stat(text: &str) -> Result<CpuTicks> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))
        .context("no `cpu` line in /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse::<u64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad /proc/stat line {line:?}"))?;
    if v.len() < 7 {
        bail!("short /proc/stat line {line:?}");
    }
    // user nice system idle iowait irq softirq steal guest guest_nice
    let steal = v.get(7).copied().unwrap_or(0);
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + steal;
    Ok(CpuTicks {
        softirq: v[6],
        busy,
        total: busy + v[3] + v[4],
    })
}

/// (comm, utime + stime in ticks) from the text of `/proc/PID/stat` (pure). The command name
/// is between the first `(` and the LAST `)`: it may hold spaces and parentheses.
pub fn parse_pid_stat(text: &str) -> Result<(String, u64)> {
    let open = text.find('(').context("no `(` in /proc/PID/stat")?;
    let close = text.rfind(')').context("no `)` in /proc/PID/stat")?;
    if close < open {
        bail!("bad /proc/PID/stat {text:?}");
    }
    let comm = text[open + 1..close].to_string();
    // After the name: state(3) ppid(4) ... utime(14) stime(15); index 0 here is field 3.
    let f: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        f.get(n - 3)
            .with_context(|| format!("/proc/PID/stat has no field {n}"))?
            .parse::<u64>()
            .with_context(|| format!("/proc/PID/stat field {n} is not a number"))
    };
    Ok((comm, field(14)? + field(15)?))
}

/// CPU counters at one instant.
#[derive(Clone, Debug)]
pub struct CpuSample {
    pub at: Instant,
    /// pid → (comm, utime + stime ticks); pids that could not be read are missing.
    pub procs: BTreeMap<u32, (String, u64)>,
    /// System-wide `/proc/stat` counters.
    pub system: CpuTicks,
}

/// CPU used between two samples.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuUse {
    /// Wall time between the samples.
    pub wall_ms: f64,
    /// utime + stime of the sampled processes (present in both samples).
    pub process_ms: f64,
    /// System-wide softirq time (all CPUs).
    pub softirq_ms: f64,
    /// System-wide busy time (all CPUs), for context.
    pub busy_ms: f64,
}

impl CpuSample {
    /// Reads the counters of `pids` (missing processes are skipped) and of `/proc/stat`.
    pub fn take(pids: &[u32]) -> CpuSample {
        let mut procs = BTreeMap::new();
        for &pid in pids {
            if let Ok(t) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                && let Ok(p) = parse_pid_stat(&t)
            {
                procs.insert(pid, p);
            }
        }
        let system = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| parse_proc_stat(&t).ok())
            .unwrap_or_default();
        CpuSample {
            at: Instant::now(),
            procs,
            system,
        }
    }

    /// What was used from `before` to `after` (ticks converted with [`clk_tck`]).
    pub fn delta(before: &CpuSample, after: &CpuSample) -> CpuUse {
        Self::delta_with_tck(before, after, clk_tck())
    }

    fn delta_with_tck(before: &CpuSample, after: &CpuSample, tck: u64) -> CpuUse {
        let ms = |ticks: u64| ticks as f64 * 1000.0 / tck as f64;
        let process: u64 = after
            .procs
            .iter()
            .filter_map(|(pid, (_, t))| Some(t.saturating_sub(before.procs.get(pid)?.1)))
            .sum();
        CpuUse {
            wall_ms: after.at.saturating_duration_since(before.at).as_secs_f64() * 1000.0,
            process_ms: ms(process),
            softirq_ms: ms(after.system.softirq.saturating_sub(before.system.softirq)),
            busy_ms: ms(after.system.busy.saturating_sub(before.system.busy)),
        }
    }
}

impl CpuUse {
    /// Measures `f`: samples `pids` before and after it. Returns `f`'s result and the use.
    pub fn measure<R>(pids: &[u32], f: impl FnOnce() -> R) -> (R, CpuUse) {
        let before = CpuSample::take(pids);
        let r = f();
        let after = CpuSample::take(pids);
        (r, CpuSample::delta(&before, &after))
    }

    /// This window minus a baseline window (per-field, may go negative: noise).
    pub fn minus(&self, base: &CpuUse) -> CpuUse {
        CpuUse {
            wall_ms: self.wall_ms,
            process_ms: self.process_ms - base.process_ms,
            softirq_ms: self.softirq_ms - base.softirq_ms,
            busy_ms: self.busy_ms - base.busy_ms,
        }
    }

    /// Scaled to 1000 sessions (`sessions` = sessions in the window; wall time kept).
    pub fn per_1000(&self, sessions: u64) -> CpuUse {
        let k = 1000.0 / sessions.max(1) as f64;
        CpuUse {
            wall_ms: self.wall_ms,
            process_ms: self.process_ms * k,
            softirq_ms: self.softirq_ms * k,
            busy_ms: self.busy_ms * k,
        }
    }

    /// The wall time as a Duration.
    pub fn wall(&self) -> Duration {
        Duration::from_secs_f64(self.wall_ms.max(0.0) / 1000.0)
    }
}

impl std::fmt::Display for CpuUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "process {:.0} ms, softirq {:.0} ms, busy {:.0} ms (wall {:.0} ms)",
            self.process_ms, self.softirq_ms, self.busy_ms, self.wall_ms
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  577399 0 146610 288325 3677 0 7112 479 0 0\n\
        cpu0 288000 0 73000 144000 1800 0 3500 200 0 0\n\
        intr 123 4 5\nsoftirq 9 8 7\n";

    #[test]
    fn parses_the_cpu_line_of_proc_stat() {
        let t = parse_proc_stat(STAT).unwrap();
        assert_eq!(t.softirq, 7112);
        assert_eq!(t.busy, 577399 + 146610 + 7112 + 479);
        assert_eq!(t.total, t.busy + 288325 + 3677);
        // Old kernels: no steal/guest columns.
        let t = parse_proc_stat("cpu 1 2 3 4 5 6 7\n").unwrap();
        assert_eq!((t.softirq, t.busy, t.total), (7, 1 + 2 + 3 + 6 + 7, 28));
        assert!(parse_proc_stat("cpu0 1 2 3 4 5 6 7\n").is_err());
        assert!(parse_proc_stat("cpu 1 2 x\n").is_err());
    }

    #[test]
    fn parses_pid_stat_with_an_awkward_name() {
        // comm "a) (b c" : spaces and parentheses; utime 1234, stime 56.
        let text = "4242 (a) (b c) S 1 4242 4242 0 -1 4194560 900 0 0 0 1234 56 0 0 20 0 2 0 \
                    12345 1000000 200 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(parse_pid_stat(text).unwrap(), ("a) (b c".to_string(), 1290));
        let hap = "77 (haproxy) S 70 77 77 0 -1 4194624 5 0 0 0 3 4 0 0 20 0 2 0 99 1 1 1";
        assert_eq!(parse_pid_stat(hap).unwrap(), ("haproxy".to_string(), 7));
        assert!(parse_pid_stat("77 (haproxy) S 70 77").is_err());
        assert!(parse_pid_stat("no name here").is_err());
    }

    #[test]
    fn delta_minus_and_per_1000() {
        let t0 = Instant::now();
        let s = |dt: u64, procs: &[(u32, u64)], softirq: u64, busy: u64| CpuSample {
            at: t0 + Duration::from_millis(dt),
            procs: procs.iter().map(|&(p, t)| (p, ("x".into(), t))).collect(),
            system: CpuTicks {
                softirq,
                busy,
                total: busy + 1000,
            },
        };
        let a = s(0, &[(1, 10), (2, 5)], 100, 1000);
        // pid 2 gone, pid 3 new: neither counts.
        let b = s(2000, &[(1, 60), (3, 999)], 130, 1200);
        let u = CpuSample::delta_with_tck(&a, &b, 100);
        assert_eq!(u.process_ms, 500.0);
        assert_eq!(u.softirq_ms, 300.0);
        assert_eq!(u.busy_ms, 2000.0);
        assert!((u.wall_ms - 2000.0).abs() < 1e-6);
        let base = CpuUse {
            wall_ms: 1.0,
            process_ms: 0.0,
            softirq_ms: 100.0,
            busy_ms: 500.0,
        };
        let net = u.minus(&base).per_1000(500);
        assert_eq!(
            (net.process_ms, net.softirq_ms, net.busy_ms),
            (1000.0, 400.0, 3000.0)
        );
        assert_eq!(CpuSample::delta(&b, &a).process_ms, 0.0);
    }

    #[test]
    fn samples_this_process() {
        let me = std::process::id();
        let s = CpuSample::take(&[me, u32::MAX]);
        assert!(s.procs.contains_key(&me) && !s.procs.contains_key(&u32::MAX));
        assert!(s.system.total > 0);
    }
}
