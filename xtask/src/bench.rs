//! `cargo xtask bench NAME`: a named benchmark, run by `mxlb-lab bench NAME` (tests crate) in
//! the same lab the tests use; each writes target/bench/NAME.json next to a baseline measured
//! in the same run.

use crate::util::{cargo, run_visible, say};
use anyhow::{Result, bail};
use std::os::unix::process::CommandExt as _;

pub fn run(name: &str, args: &[String]) -> Result<()> {
    crate::setup::run()?;
    if !crate::util::is_root() {
        bail!("benchmarks need root (BPF_PROG_TEST_RUN, network namespaces)");
    }
    say("bench", "building mxlb and the lab (release)");
    run_visible(cargo().args(["build", "--release", "-p", "lb-userspace", "--bin", "mxlb"]))?;
    run_visible(cargo().args(["build", "--release", "-p", "mxlb-tests", "--bin", "mxlb-lab"]))?;
    let target = crate::run::target_dir()?;
    let err = std::process::Command::new(target.join("release/mxlb-lab"))
        .args(["bench", name])
        .args(args)
        .env("MXLB_BENCH_DIR", target.join("bench"))
        .exec();
    bail!("cannot start mxlb-lab: {err}")
}
