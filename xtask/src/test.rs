//! `cargo xtask test`: `setup`, then the whole workspace's tests with their output shown.
//!
//! This is the README's (and CI's) test command. The exit code is cargo test's. The lab tests
//! need root; without root and with CI unset they print a skip message and pass.

use crate::util::{cargo, say};
use anyhow::{Context, Result};

pub fn run(extra: &[String]) -> Result<i32> {
    crate::setup::run()?;
    let mut cmd = cargo();
    // --workspace ignores default-members, so the eBPF crate (bpfel only) must be excluded.
    cmd.args([
        "test",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--no-fail-fast",
    ]);
    cmd.args(extra);
    say("test", &format!("running {cmd:?}"));
    // stdout/stderr inherited: the harness's "test result: ..." lines reach our stdout.
    let status = cmd.status().context("cannot run cargo test")?;
    let code = status.code().unwrap_or(1);
    say("test", &format!("cargo test exited with {code}"));
    Ok(code)
}
