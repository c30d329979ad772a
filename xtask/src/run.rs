//! `cargo xtask run`: the main job.
//!
//! - No arguments: installs what is missing, builds, and runs `mxlb-lab run` (tests crate): the
//!   lab topology (client, LB node, three smtp-sink back-ends) with `mxlb run` on the LB node, a
//!   burst of real SMTP through the VIPs, the per-back-end distribution and counters, then the
//!   lab stays up until Ctrl-C. `-- --mode dsr-ipip`, `-- --sessions N`, `-- --for SECONDS` are
//!   passed to it.
//! - `-- --config FILE [mxlb run options]`: runs `mxlb run` on this machine's real interfaces
//!   with that config.
//!
//! The final program replaces this process (exec), so Ctrl-C reaches it directly and it cleans
//! up before exiting.

use crate::util::{cargo, run_visible, say};
use anyhow::{Context, Result, bail};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;

pub fn run(args: &[String]) -> Result<()> {
    crate::setup::run()?;
    if !crate::util::is_root() {
        bail!("mxlb needs root (BPF, XDP, network namespaces): run `sudo -E cargo xtask run`");
    }
    let target = target_dir()?;
    if let Some(pos) = args.iter().position(|a| a == "--config") {
        let file = args.get(pos + 1).context("--config needs a file")?;
        say("run", "building mxlb (release)");
        run_visible(cargo().args(["build", "--release", "-p", "lb-userspace", "--bin", "mxlb"]))?;
        let rest: Vec<&String> = args.iter().enumerate().filter(|(i, _)| *i != pos && *i != pos + 1).map(|(_, a)| a).collect();
        let bin = target.join("release/mxlb");
        say("run", &format!("{} --config {file} run", bin.display()));
        let err = std::process::Command::new(bin).arg("--config").arg(file).arg("run").args(rest).exec();
        bail!("cannot start mxlb: {err}");
    }
    say("run", "building mxlb and the lab (release)");
    run_visible(cargo().args(["build", "--release", "-p", "lb-userspace", "--bin", "mxlb"]))?;
    run_visible(cargo().args(["build", "--release", "-p", "mxlb-tests", "--bin", "mxlb-lab"]))?;
    let err = std::process::Command::new(target.join("release/mxlb-lab")).arg("run").args(args).exec();
    bail!("cannot start mxlb-lab: {err}")
}

/// The workspace's target directory (honours CARGO_TARGET_DIR).
pub fn target_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return Ok(PathBuf::from(d));
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest.parent().context("workspace root")?.join("target"))
}
