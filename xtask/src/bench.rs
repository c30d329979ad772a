//! `cargo xtask bench NAME`: a named benchmark, run by `mxlb-lab bench NAME` (tests crate) in
//! the same lab the tests use; each writes target/bench/NAME.json next to a baseline measured
//! in the same run:
//! - `xdp`: the data path's ns/packet through BPF_PROG_TEST_RUN, next to a trivial XDP_PASS;
//! - `health`: how fast a dead back-end leaves the data path, and a single-source SYN flood;
//! - `failover`: VRRP failover on the wire, mxlb and keepalived pairs, sessions held across it;
//! - `l4`: SMTP sessions/s, p99 and connect/s straight to a back-end (the floor), through mxlb
//!   dsr-l2 and dsr-ipip and through HAProxy `mode tcp`, with LB CPU per 1000 sessions; also
//!   writes target/bench/l4.png;
//! - `relay`: accepted msgs/s of mxlb's store-and-forward relay (strict synchronous mirroring)
//!   next to a Postfix 3.7 relay on the same lab, p99 accept latency, and kill trials (SIGKILL
//!   of the master node during a run) counting lost (must be 0) and duplicated messages;
//! - `proxy`: POP3 and IMAP sessions (login, fetch 20 messages of 8 KiB, logout) straight to
//!   each mailbox's owner, through mxlb's proxy with sockmap and with userspace relaying, and
//!   through perdition; writes sessions/s, p99 and misrouted sessions (must be 0).
//!
//! `xdp`, `l4` and `proxy` also regenerate their sections of bench/RESULTS.md (and `l4` the
//! README's).

use crate::util::{cargo, run_visible, say};
use anyhow::{Result, bail};
use std::os::unix::process::CommandExt as _;

pub fn run(name: &str, args: &[String]) -> Result<()> {
    crate::setup::run()?;
    if !crate::util::is_root() {
        bail!("benchmarks need root (BPF_PROG_TEST_RUN, network namespaces)");
    }
    say("bench", "building mxlb, the lab and mxlb-bench (release)");
    run_visible(cargo().args(["build", "--release", "-p", "lb-userspace", "--bin", "mxlb"]))?;
    run_visible(cargo().args(["build", "--release", "-p", "mxlb-tests", "--bin", "mxlb-lab"]))?;
    // The load generator of `l4` (and of any benchmark that drives mail sessions).
    run_visible(cargo().args(["build", "--release", "-p", "mxlb-bench", "--bin", "mxlb-bench"]))?;
    let target = crate::run::target_dir()?;
    let err = std::process::Command::new(target.join("release/mxlb-lab"))
        .args(["bench", name])
        .args(args)
        .env("MXLB_BENCH_DIR", target.join("bench"))
        .exec();
    bail!("cannot start mxlb-lab: {err}")
}
