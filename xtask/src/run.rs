//! `cargo xtask run`: bring up the lab (tests crate, `lab::Lab`) with the load balancer in its LB
//! namespace, the smtp-sink back-ends and a client, and keep it up until Ctrl-C.

use anyhow::{Result, bail};

pub fn run(_args: &[String]) -> Result<()> {
    // TODO(lead): build `lab::Lab::builder().backends(N).build()`, attach the PASS program on
    // `lab.lb_peer_port()`, start lb-userspace in `lab.lb().ns()`, print how to reach the VIP.
    bail!("`cargo xtask run` is not yet implemented (placeholder; see xtask/src/run.rs)")
}
