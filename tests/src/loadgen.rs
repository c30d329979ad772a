//! `mxlb-bench`, the mail load generator (the `bench` crate), driven in the lab's client
//! namespace: shared by the integration tests and `cargo xtask bench l4`, so a figure in a test
//! and in a benchmark come from the same command line.
//!
//! On a two-core machine the generator and the servers compete for CPU: [`pin_apart`] keeps
//! the sinks on the last CPU and the generators on CPU 0, so a generator that needs more CPU
//! cannot slow a server down and make the comparison measure the generator.
use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use crate::Lab;

/// Bound on one `mxlb-bench` run.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// The release `mxlb-bench` (built first when run under cargo): a debug build would measure
/// itself rather than the server.
pub fn bench_bin() -> Result<PathBuf> {
    crate::node::workspace_bin("mxlb-bench", "mxlb-bench", true)
}

/// Runs `mxlb-bench ARGS --json` in the client namespace (bounded: 120 s) and returns its JSON
/// report, with the wall-clock time of the whole command added as `wall_s` (timed from
/// outside, as the lab times smtp-source, so the two tools can be compared the same way).
pub fn mxlb_bench(lab: &Lab, args: &[&str]) -> Result<serde_json::Value> {
    let bin = bench_bin()?;
    let mut c = lab.client().ns().command(bin.to_str().context("mxlb-bench path is not UTF-8")?);
    c.args(args).arg("--json");
    let t0 = Instant::now();
    let (out, timed_out) = crate::run_bounded(&mut c, RUN_TIMEOUT)?;
    let wall = t0.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!timed_out, "mxlb-bench {args:?} timed out: {stderr}");
    let mut v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("mxlb-bench {args:?} ({}) printed no JSON: {stderr}", out.status))?;
    eprintln!(
        "mxlb-bench {}: {} sessions/s, {} messages/s, errors {}",
        args.join(" "),
        v["sessions_per_s"],
        v["messages_per_s"],
        v["errors"]
    );
    v["wall_s"] = wall.into();
    Ok(v)
}

/// The number at `key` of a report, or an error that shows the report.
pub fn rate(v: &serde_json::Value, key: &str) -> Result<f64> {
    v[key].as_f64().with_context(|| format!("{key} in {v}"))
}

/// Pins every sink of the lab to the last CPU and the calling thread (hence the generators it
/// starts from now on) to CPU 0; returns whether it could (one CPU: nothing to separate).
pub fn pin_apart(lab: &Lab) -> bool {
    pin_sinks(lab) && pin_this_thread(0)
}

/// Runs `f` on a thread of its own pinned to CPU 0, for load generators started while other
/// daemons (a load balancer under test) must still be started unpinned from the caller.
pub fn on_generator_cpu<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| {
        s.spawn(|| {
            pin_this_thread(0);
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Pins the lab's sinks to the last CPU (`taskset`); false if there is one CPU or it failed.
pub fn pin_sinks(lab: &Lab) -> bool {
    let n = cpus();
    if n < 2 {
        return false;
    }
    let cpu = (n - 1).to_string();
    (1..=lab.sink_counts().len()).flat_map(|i| lab.sink(i).pids()).all(|pid| {
        Command::new("taskset")
            .args(["-pc", &cpu, &pid.to_string()])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn pin_this_thread(cpu: usize) -> bool {
    if cpus() < 2 {
        return false;
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity(0, ..)
    // only touch it and this thread's affinity.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}
